//! GGUF reader (llama.cpp's file format): metadata, tensor directory, and dequantisation of
//! the block formats F32, F16, BF16, Q8_0, Q4_0 and Q4_1 to f32 on the host.
//!
//! Every size read from the file is checked against the file length before anything is
//! allocated, so a truncated or hostile file gives an error, never a panic or a huge
//! allocation.

use std::collections::BTreeMap;

use half::{bf16, f16};

use crate::error::{Result, bail, err};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor types this reader can turn into f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }
    /// (values per block, bytes per block)
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
        }
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Shape in PyTorch order (outermost first): GGUF's `ne` reversed.
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    /// Byte range inside the file.
    pub start: usize,
    pub len: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed GGUF file borrowing its bytes.
pub struct Gguf<'a> {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorInfo>,
    bytes: &'a [u8],
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| err!(Format, "truncated GGUF header: needed {n} bytes at offset {}, file has {}", self.pos, self.b.len()))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    /// A count that must be plausible given the bytes left (each item takes >= `min_item` bytes).
    fn count(&mut self, min_item: usize, what: &str) -> Result<usize> {
        let n = self.u64()?;
        let left = (self.b.len() - self.pos) as u64;
        if n.saturating_mul(min_item as u64) > left {
            bail!(Format, "GGUF {what} count {n} exceeds what the file can hold ({left} bytes left)");
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String> {
        let n = self.count(1, "string length")?;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| err!(Format, "GGUF string is not UTF-8"))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>()?[0]),
            1 => Value::I8(self.arr::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr()?)),
            3 => Value::I16(i16::from_le_bytes(self.arr()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.arr()?)),
            6 => Value::F32(f32::from_le_bytes(self.arr()?)),
            7 => Value::Bool(self.arr::<1>()?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 2 {
                    bail!(Format, "GGUF arrays nested too deeply");
                }
                let ity = self.u32()?;
                let n = self.count(1, "array")?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(ity, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.arr()?)),
            12 => Value::F64(f64::from_le_bytes(self.arr()?)),
            t => bail!(Format, "unknown GGUF metadata value type {t}"),
        })
    }
}

impl<'a> Gguf<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        let mut r = Reader { b: bytes, pos: 0 };
        if r.take(4).map_err(|_| err!(Format, "file too short to be GGUF"))? != b"GGUF" {
            bail!(Format, "not a GGUF file (bad magic)");
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            bail!(Unsupported, "GGUF version {version} (supported: 2, 3)");
        }
        let n_tensors = r.count(8, "tensor")?;
        let n_kv = r.count(12, "metadata")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty, 0).map_err(|e| e.context(format!("metadata key {key}")))?;
            metadata.insert(key, v);
        }
        let mut raw = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let nd = r.u32()? as usize;
            if nd == 0 || nd > 4 {
                bail!(Format, "tensor {name}: {nd} dimensions");
            }
            let mut ne = Vec::with_capacity(nd);
            for _ in 0..nd {
                ne.push(r.u64()?);
            }
            let tid = r.u32()?;
            let off = r.u64()?;
            raw.push((name, ne, tid, off));
        }
        let align = metadata.get("general.alignment").and_then(Value::as_u64).unwrap_or(32) as usize;
        if align == 0 || !align.is_power_of_two() {
            bail!(Format, "bad general.alignment {align}");
        }
        let data_start = r.pos.div_ceil(align) * align;
        let mut tensors = BTreeMap::new();
        for (name, ne, tid, off) in raw {
            let shape: Vec<usize> = ne.iter().rev().map(|&d| d as usize).collect();
            let numel = ne.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let numel = numel.filter(|&n| n < (1u64 << 40)).ok_or_else(|| err!(Format, "tensor {name}: absurd shape {shape:?}"))? as usize;
            let ty = GgmlType::from_id(tid).ok_or_else(|| err!(Unsupported, "tensor {name}: ggml type {tid} (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)"))?;
            let (bs, bb) = ty.block();
            if ne[0] as usize % bs != 0 {
                bail!(Format, "tensor {name}: row length {} is not a multiple of the block size {bs}", ne[0]);
            }
            let len = numel / bs * bb;
            let start = data_start.checked_add(off as usize).ok_or_else(|| err!(Format, "tensor {name}: bad offset"))?;
            if start.checked_add(len).is_none_or(|e| e > bytes.len()) {
                bail!(Format, "tensor {name}: data [{start}, +{len}) lies beyond the end of the file ({} bytes): truncated file?", bytes.len());
            }
            tensors.insert(name.clone(), TensorInfo { name, shape, ty, start, len });
        }
        Ok(Gguf { version, metadata, tensors, bytes })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.get(key).and_then(Value::as_u64).ok_or_else(|| err!(Format, "GGUF metadata {key} missing or not an integer"))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        self.get(key).and_then(Value::as_f64).ok_or_else(|| err!(Format, "GGUF metadata {key} missing or not a number"))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key).and_then(Value::as_str).ok_or_else(|| err!(Format, "GGUF metadata {key} missing or not a string"))
    }

    /// One tensor's raw bytes (its blocks, as stored).
    pub fn tensor_bytes(&self, name: &str) -> Result<&'a [u8]> {
        let info = self.tensors.get(name).ok_or_else(|| err!(Format, "GGUF has no tensor {name}"))?;
        Ok(&self.bytes[info.start..info.start + info.len])
    }

    /// Dequantise one tensor to f32 (row-major, PyTorch shape order).
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.tensors.get(name).ok_or_else(|| err!(Format, "GGUF has no tensor {name}"))?;
        let data = &self.bytes[info.start..info.start + info.len];
        Ok((info.shape.clone(), dequantize(info.ty, data, info.numel())))
    }
}

/// Dequantise `n` values of type `ty` from `data` (which holds exactly their blocks).
/// Arithmetic follows gguf-py's numpy code (f16 scales widened to f32, then `d * q (+ m)`).
pub fn dequantize(ty: GgmlType, data: &[u8], n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    let h = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    match ty {
        GgmlType::F32 => out.extend(data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        GgmlType::F16 => out.extend(data.chunks_exact(2).map(h)),
        GgmlType::BF16 => out.extend(data.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())),
        GgmlType::Q8_0 => {
            for blk in data.chunks_exact(34) {
                let d = h(&blk[0..2]);
                out.extend(blk[2..].iter().map(|&q| d * (q as i8) as f32));
            }
        }
        GgmlType::Q4_0 => {
            for blk in data.chunks_exact(18) {
                let d = h(&blk[0..2]);
                let qs = &blk[2..];
                out.extend(qs.iter().map(|&q| d * ((q & 0x0f) as i32 - 8) as f32));
                out.extend(qs.iter().map(|&q| d * ((q >> 4) as i32 - 8) as f32));
            }
        }
        GgmlType::Q4_1 => {
            for blk in data.chunks_exact(20) {
                let d = h(&blk[0..2]);
                let m = h(&blk[2..4]);
                let qs = &blk[4..];
                out.extend(qs.iter().map(|&q| d * (q & 0x0f) as f32 + m));
                out.extend(qs.iter().map(|&q| d * (q >> 4) as f32 + m));
            }
        }
    }
    debug_assert_eq!(out.len(), n);
    out
}

/// Undo llama.cpp's RoPE row permutation of attn_q / attn_k weights (and biases), giving
/// back the Hugging Face layout. `rows` = n_head * head_dim, `cols` = values per row.
pub fn unpermute_qk(w: &[f32], n_head: usize, rows: usize, cols: usize) -> Vec<f32> {
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut out = vec![0.0; w.len()];
    // llama.cpp wrote row (h, j, i) [j in 0..half, i in 0..2] from HF row (h, i, j).
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..half {
                let hf_row = h * head_dim + i * half + j;
                let gg_row = h * head_dim + j * 2 + i;
                out[hf_row * cols..(hf_row + 1) * cols].copy_from_slice(&w[gg_row * cols..(gg_row + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_garbage_and_truncation() {
        assert!(Gguf::parse(b"").is_err());
        assert!(Gguf::parse(b"GGML\x03\0\0\0").is_err());
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(u64::MAX.to_le_bytes()); // absurd tensor count
        b.extend(0u64.to_le_bytes());
        let e = Gguf::parse(&b).err().unwrap();
        assert!(e.message.contains("count"), "{e}");
    }

    #[test]
    fn q4_1_block() {
        let mut blk = Vec::new();
        blk.extend(f16::from_f32(0.5).to_le_bytes());
        blk.extend(f16::from_f32(-1.0).to_le_bytes());
        blk.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let v = dequantize(GgmlType::Q4_1, &blk, 32);
        assert_eq!(v[0], -1.0);
        assert_eq!(v[3], 0.5);
        assert_eq!(v[16], 6.5);
    }

    #[test]
    fn unpermute_inverts_permute() {
        // HF rows 0..8 for 2 heads of dim 4, 1 column; llama.cpp order per head: 0,2,1,3.
        let hf: Vec<f32> = (0..8).map(|x| x as f32).collect();
        let gg = vec![0., 2., 1., 3., 4., 6., 5., 7.];
        assert_eq!(unpermute_qk(&gg, 2, 8, 1), hf);
    }
}
