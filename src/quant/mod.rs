//! Quantized frozen weights (QLoRA-style bases): GGUF's block formats Q8_0, Q4_0 and Q4_1 and
//! bitsandbytes' NF4, as the device holds them, with their host-side quantizers and
//! dequantizers (the reference every kernel is checked against).
//!
//! A matrix `[rows, cols]` (PyTorch layout: a row per output feature) is stored over its flat
//! row-major index `i = row * cols + col`:
//! - `codes`: `bits`-wide codes packed little-endian into u32 words (value `i` in word
//!   `i * bits / 32`, at bit `(i * bits) % 32`);
//! - `scales` (and `mins` for Q4_1): one f32 per block of `block` consecutive values.
//!
//! A value is `lut[code] * scale (+ min)`, where the format's lookup table `lut` turns a code
//! into its unscaled value (Q8_0: the signed byte; Q4_0: `code - 8`; Q4_1: the code; NF4:
//! the 16 normal-float levels). GGUF's own blocks are repacked into this layout at load
//! (34 → 36 bytes per 32 values for Q8_0, 18 → 20 for Q4_0, 20 → 24 for Q4_1): the f16
//! scales are widened to f32 so that no shader needs f16, and the values are exactly
//! those of gguf-py's dequantization.

pub mod kernel;
pub mod weight;

use half::f16;

use crate::error::{Result, bail, err};
use crate::io::gguf::GgmlType;

/// The storage format of a frozen weight matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// 8-bit signed codes, one scale per 32 values (GGUF Q8_0).
    Q8_0,
    /// 4-bit codes around 8, one scale per 32 values (GGUF Q4_0).
    Q4_0,
    /// 4-bit codes, one scale and one minimum per 32 values (GGUF Q4_1).
    Q4_1,
    /// 4-bit normal-float codes, one absmax scale per 64 values (bitsandbytes NF4, without
    /// double quantization).
    Nf4,
}

/// bitsandbytes' NF4 levels (`bitsandbytes.functional.get_4bit_type("nf4")`).
#[allow(clippy::excessive_precision)]
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

impl QuantFormat {
    pub const ALL: [QuantFormat; 4] = [QuantFormat::Q8_0, QuantFormat::Q4_0, QuantFormat::Q4_1, QuantFormat::Nf4];

    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Q8_0 => "q8_0",
            QuantFormat::Q4_0 => "q4_0",
            QuantFormat::Q4_1 => "q4_1",
            QuantFormat::Nf4 => "nf4",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        QuantFormat::ALL.into_iter().find(|f| f.name().eq_ignore_ascii_case(s)).ok_or_else(|| err!(Config, "unknown quantization {s:?} (known: q8_0, q4_0, q4_1, nf4)"))
    }

    /// Bits per code.
    pub fn bits(self) -> usize {
        match self {
            QuantFormat::Q8_0 => 8,
            _ => 4,
        }
    }

    /// Values per scale.
    pub fn block(self) -> usize {
        match self {
            QuantFormat::Nf4 => 64,
            _ => 32,
        }
    }

    pub fn has_min(self) -> bool {
        self == QuantFormat::Q4_1
    }

    /// Code → unscaled value (2^bits entries).
    pub fn lut(self) -> Vec<f32> {
        match self {
            QuantFormat::Q8_0 => (0..256).map(|c| (c as u8 as i8) as f32).collect(),
            QuantFormat::Q4_0 => (0..16).map(|c| (c - 8) as f32).collect(),
            QuantFormat::Q4_1 => (0..16).map(|c| c as f32).collect(),
            QuantFormat::Nf4 => NF4_LEVELS.to_vec(),
        }
    }

    /// The GGUF type this format repacks, if any.
    pub fn of_ggml(ty: GgmlType) -> Option<Self> {
        match ty {
            GgmlType::Q8_0 => Some(QuantFormat::Q8_0),
            GgmlType::Q4_0 => Some(QuantFormat::Q4_0),
            GgmlType::Q4_1 => Some(QuantFormat::Q4_1),
            _ => None,
        }
    }
}

/// How the frozen base's weight matrices (linear layers and embeddings) are held on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseFormat {
    /// All f32: GGUF block tensors are dequantized at load.
    F32,
    /// Every weight matrix (linear layers, embeddings) in f16, used as autocast does (see
    /// [`crate::models::linear`]; GGUF block tensors are dequantized at load). Needs a device
    /// with f16 (WebGPU's `shader-f16`).
    F16,
    /// GGUF block tensors (Q8_0, Q4_0, Q4_1) stay in their format; the rest is f32.
    Keep,
    /// GGUF block tensors stay in their format; the other matrices are f16: the default on
    /// hardware with fast f16.
    KeepF16,
    /// Every linear layer quantized at load to this format, and the embedding table to Q8_0
    /// (GGUF blocks of another format are dequantized and quantized again).
    To(QuantFormat),
}

impl BaseFormat {
    /// `f32`, `f16`, `keep`, or a format name (`q8_0`, `q4_0`, `q4_1`, `nf4`).
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "none" => Ok(BaseFormat::F32),
            "f16" | "fp16" | "half" => Ok(BaseFormat::F16),
            "keep" => Ok(BaseFormat::Keep),
            "keep-f16" => Ok(BaseFormat::KeepF16),
            other => QuantFormat::parse(other).map(BaseFormat::To).map_err(|_| err!(Config, "unknown base format {s:?} (f32, f16, keep, keep-f16, q8_0, q4_0, q4_1, nf4)")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BaseFormat::F32 => "f32",
            BaseFormat::F16 => "f16",
            BaseFormat::Keep => "keep",
            BaseFormat::KeepF16 => "keep-f16",
            BaseFormat::To(f) => f.name(),
        }
    }

    /// Whether a GGUF's block tensors are loaded as blocks (kept, or quantized again).
    pub fn keeps_blocks(self) -> bool {
        !matches!(self, BaseFormat::F32 | BaseFormat::F16)
    }

    /// Whether the matrices that are not kept in a block format are held in f16.
    pub fn half(self) -> bool {
        matches!(self, BaseFormat::F16 | BaseFormat::KeepF16)
    }

    /// The default for a device: a GPU keeps a GGUF's quantization (memory is what a browser
    /// tab lacks), and holds the other matrices in f16 where it has fast f16
    /// ([`crate::device::Compute::fast_f16`]: a hardware adapter with `shader-f16`); Burn's
    /// CPU backend, where memory is plentiful and dequantizing on every pass would only cost
    /// time, loads f32.
    pub fn default_for(compute: &crate::device::Compute) -> Self {
        match (compute.is_gpu, compute.fast_f16) {
            (true, true) => BaseFormat::KeepF16,
            (true, false) => BaseFormat::Keep,
            (false, _) => BaseFormat::F32,
        }
    }

    /// Refuse a format the device cannot hold (f16 without `shader-f16`).
    pub fn check_device(self, device: &burn::tensor::Device) -> Result<Self> {
        if self.half() && !device.supports_dtype(burn::tensor::FloatDType::F16) {
            bail!(Device, "this device has no f16 (the WebGPU adapter does not offer shader-f16): hold the base in f32 or quantized (--base f32 | keep | q8_0 | q4_1 | nf4, JS base)");
        }
        Ok(self)
    }
}

/// A quantized matrix on the host, in the device layout (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct QuantHost {
    pub format: QuantFormat,
    pub rows: usize,
    pub cols: usize,
    pub codes: Vec<u32>,
    pub scales: Vec<f32>,
    /// Per-block minimums (Q4_1), else empty.
    pub mins: Vec<f32>,
}

/// f32 → f16 → f32, as GGUF stores its scales.
fn f16_round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

impl QuantHost {
    fn empty(format: QuantFormat, rows: usize, cols: usize) -> Self {
        let n = rows * cols;
        let blocks = n.div_ceil(format.block());
        QuantHost { format, rows, cols, codes: vec![0; (n * format.bits()).div_ceil(32)], scales: vec![0.0; blocks], mins: if format.has_min() { vec![0.0; blocks] } else { Vec::new() } }
    }

    fn put(&mut self, i: usize, code: u32) {
        let bits = self.format.bits();
        let (w, s) = ((i * bits) / 32, (i * bits) % 32);
        self.codes[w] |= code << s;
    }

    /// The code of value `i`.
    pub fn code(&self, i: usize) -> u32 {
        let bits = self.format.bits();
        let (w, s) = ((i * bits) / 32, (i * bits) % 32);
        (self.codes[w] >> s) & ((1u32 << bits) - 1)
    }

    /// Quantize a row-major `[rows, cols]` f32 matrix, as llama.cpp's reference quantizers
    /// (`quantize_row_q8_0_ref` / `q4_0` / `q4_1`: scales rounded to f16) and bitsandbytes'
    /// NF4 (absmax per 64 values, nearest level).
    pub fn quantize(format: QuantFormat, rows: usize, cols: usize, data: &[f32]) -> Result<Self> {
        if data.len() != rows * cols {
            bail!(Shape, "quantize: {} values for a [{rows}, {cols}] matrix", data.len());
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            bail!(Format, "quantize: value {i} is not finite ({})", data[i]);
        }
        let mut q = QuantHost::empty(format, rows, cols);
        let block = format.block();
        for (b, xs) in data.chunks(block).enumerate() {
            let base = b * block;
            match format {
                QuantFormat::Q8_0 => {
                    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    q.scales[b] = f16_round(d);
                    for (j, &v) in xs.iter().enumerate() {
                        q.put(base + j, ((v * id).round() as i32 as i8) as u8 as u32);
                    }
                }
                QuantFormat::Q4_0 => {
                    let (mut amax, mut max) = (0f32, 0f32);
                    for &v in xs {
                        if amax < v.abs() {
                            amax = v.abs();
                            max = v;
                        }
                    }
                    let d = max / -8.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    q.scales[b] = f16_round(d);
                    for (j, &v) in xs.iter().enumerate() {
                        q.put(base + j, ((v * id + 8.5) as i8).min(15) as u32);
                    }
                }
                QuantFormat::Q4_1 => {
                    let min = xs.iter().copied().fold(f32::INFINITY, f32::min);
                    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let d = (max - min) / 15.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    q.scales[b] = f16_round(d);
                    q.mins[b] = f16_round(min);
                    for (j, &v) in xs.iter().enumerate() {
                        q.put(base + j, (((v - min) * id + 0.5) as i8).min(15) as u32);
                    }
                }
                QuantFormat::Nf4 => {
                    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                    q.scales[b] = amax;
                    let inv = if amax != 0.0 { 1.0 / amax } else { 0.0 };
                    for (j, &v) in xs.iter().enumerate() {
                        let x = v * inv;
                        let code = NF4_LEVELS.iter().enumerate().min_by(|a, b| (a.1 - x).abs().total_cmp(&(b.1 - x).abs())).map(|(c, _)| c).unwrap_or(7);
                        q.put(base + j, code as u32);
                    }
                }
            }
        }
        Ok(q)
    }

    /// Repack a GGUF tensor's raw blocks (`[rows, cols]`, blocks along each row).
    pub fn from_gguf(ty: GgmlType, rows: usize, cols: usize, raw: &[u8]) -> Result<Self> {
        let Some(format) = QuantFormat::of_ggml(ty) else { bail!(Unsupported, "GGUF type {ty:?} is not a block format that stays quantized") };
        let (block_vals, block_bytes) = ty.block();
        let n = rows * cols;
        if cols % block_vals != 0 || raw.len() != n / block_vals * block_bytes {
            bail!(Format, "{ty:?} tensor [{rows}, {cols}]: {} bytes, expected {} (rows of whole {block_vals}-value blocks)", raw.len(), n.div_ceil(block_vals) * block_bytes);
        }
        let mut q = QuantHost::empty(format, rows, cols);
        let h = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
        for (b, blk) in raw.chunks_exact(block_bytes).enumerate() {
            let base = b * 32;
            q.scales[b] = h(&blk[0..2]);
            match format {
                QuantFormat::Q8_0 => {
                    for (j, &c) in blk[2..].iter().enumerate() {
                        q.put(base + j, c as u32);
                    }
                }
                QuantFormat::Q4_0 | QuantFormat::Q4_1 => {
                    let qs = if format == QuantFormat::Q4_1 {
                        q.mins[b] = h(&blk[2..4]);
                        &blk[4..]
                    } else {
                        &blk[2..]
                    };
                    // GGUF: value j is the low nibble of byte j, value j + 16 its high nibble.
                    for (j, &c) in qs.iter().enumerate() {
                        q.put(base + j, (c & 0x0f) as u32);
                        q.put(base + j + 16, (c >> 4) as u32);
                    }
                }
                QuantFormat::Nf4 => unreachable!("not a GGUF type"),
            }
        }
        Ok(q)
    }

    /// The f32 matrix, row-major: `lut[code] * scale (+ min)` in f32, as the kernels compute it.
    pub fn dequantize(&self) -> Vec<f32> {
        let lut = self.format.lut();
        let block = self.format.block();
        (0..self.rows * self.cols)
            .map(|i| {
                let b = i / block;
                let v = lut[self.code(i) as usize] * self.scales[b];
                if self.format.has_min() { v + self.mins[b] } else { v }
            })
            .collect()
    }

    /// The same matrix with its rows reordered: row `r` of the result is row `order[r]`.
    /// Needs whole blocks per row (true of every GGUF tensor).
    pub fn rows_reordered(&self, order: &[usize]) -> Result<Self> {
        let (block, bits) = (self.format.block(), self.format.bits());
        if order.len() != self.rows || self.cols % block != 0 || (self.cols * bits) % 32 != 0 {
            bail!(Shape, "reordering the rows of a [{}, {}] {} matrix", self.rows, self.cols, self.format.name());
        }
        let (wpr, bpr) = (self.cols * bits / 32, self.cols / block);
        let mut out = QuantHost { codes: Vec::with_capacity(self.codes.len()), scales: Vec::with_capacity(self.scales.len()), mins: Vec::with_capacity(self.mins.len()), ..self.clone() };
        for &r in order {
            out.codes.extend_from_slice(&self.codes[r * wpr..(r + 1) * wpr]);
            out.scales.extend_from_slice(&self.scales[r * bpr..(r + 1) * bpr]);
            if !self.mins.is_empty() {
                out.mins.extend_from_slice(&self.mins[r * bpr..(r + 1) * bpr]);
            }
        }
        Ok(out)
    }

    /// Bytes the device holds for it (codes + scales + mins).
    pub fn device_bytes(&self) -> usize {
        4 * (self.codes.len() + self.scales.len() + self.mins.len())
    }
}

/// The host reference of the kernels (f64 accumulation): `x[m, cols] · Wᵀ` → [m, rows].
pub fn reference_matmul_t(x: &[f32], m: usize, w: &QuantHost) -> Vec<f32> {
    let (n, k) = (w.rows, w.cols);
    let wd = w.dequantize();
    (0..m * n).map(|o| (0..k).map(|t| x[(o / n) * k + t] as f64 * wd[(o % n) * k + t] as f64).sum::<f64>() as f32).collect()
}

/// The host reference of the input gradient: `g[m, rows] · W` → [m, cols].
pub fn reference_matmul(g: &[f32], m: usize, w: &QuantHost) -> Vec<f32> {
    let (n, k) = (w.rows, w.cols);
    let wd = w.dequantize();
    (0..m * k).map(|o| (0..n).map(|t| g[(o / k) * n + t] as f64 * wd[t * k + o % k] as f64).sum::<f64>() as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919) % 113) as f32 / 17.0 - 3.1).collect()
    }

    #[test]
    fn base_formats_parse_and_default_by_device() {
        for f in [BaseFormat::F32, BaseFormat::F16, BaseFormat::Keep, BaseFormat::KeepF16, BaseFormat::To(QuantFormat::Nf4)] {
            assert_eq!(BaseFormat::parse(f.name()).unwrap(), f);
        }
        assert!(BaseFormat::parse("bf16").unwrap_err().message.contains("f16, keep, keep-f16"));
        let c = |is_gpu, fast_f16| crate::device::Compute { device: burn::tensor::Device::flex(), name: String::new(), is_gpu, max_buffer: None, fast_f16 };
        assert_eq!(BaseFormat::default_for(&c(true, true)), BaseFormat::KeepF16);
        assert_eq!(BaseFormat::default_for(&c(true, false)), BaseFormat::Keep);
        assert_eq!(BaseFormat::default_for(&c(false, false)), BaseFormat::F32);
        assert!(BaseFormat::KeepF16.keeps_blocks() && !BaseFormat::F16.keeps_blocks() && BaseFormat::F16.half() && !BaseFormat::Keep.half());
    }

    #[test]
    fn quantize_then_dequantize_is_close_for_every_format() {
        let x = ramp(4 * 64);
        for f in QuantFormat::ALL {
            let q = QuantHost::quantize(f, 4, 64, &x).unwrap();
            let y = q.dequantize();
            let err = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let tol = match f {
                QuantFormat::Q8_0 => 0.03,
                QuantFormat::Nf4 => 0.6,
                _ => 0.3,
            };
            assert!(err < tol, "{f:?}: max |Δ| {err}");
        }
    }

    #[test]
    fn gguf_blocks_repack_to_the_same_values() {
        let x = ramp(2 * 32);
        // Q4_1 written as ggml would: f16 d, f16 m, value j low nibble / j + 16 high nibble.
        let q = QuantHost::quantize(QuantFormat::Q4_1, 2, 32, &x).unwrap();
        let mut raw = Vec::new();
        for b in 0..2 {
            raw.extend(f16::from_f32(q.scales[b]).to_le_bytes());
            raw.extend(f16::from_f32(q.mins[b]).to_le_bytes());
            raw.extend((0..16).map(|j| (q.code(b * 32 + j) | (q.code(b * 32 + j + 16) << 4)) as u8));
        }
        let r = QuantHost::from_gguf(GgmlType::Q4_1, 2, 32, &raw).unwrap();
        assert_eq!(r, q);
        assert_eq!(r.dequantize(), crate::io::gguf::dequantize(GgmlType::Q4_1, &raw, 64));
        assert!(QuantHost::from_gguf(GgmlType::Q4_1, 2, 32, &raw[..39]).is_err());
    }

    #[test]
    fn row_reorder_moves_codes_and_scales() {
        let x = ramp(3 * 32);
        let q = QuantHost::quantize(QuantFormat::Q4_0, 3, 32, &x).unwrap();
        let r = q.rows_reordered(&[2, 0, 1]).unwrap();
        let (a, b) = (q.dequantize(), r.dequantize());
        assert_eq!(&b[..32], &a[64..]);
        assert_eq!(&b[32..64], &a[..32]);
    }

    #[test]
    fn nf4_levels_are_nearest() {
        let mut v = vec![0.0, 1.0, -1.0, 0.5, 0.08];
        v.resize(64, 0.0);
        let q = QuantHost::quantize(QuantFormat::Nf4, 1, 64, &v).unwrap();
        assert_eq!((q.code(0), q.code(1), q.code(2), q.code(4)), (7, 15, 0, 8));
        assert_eq!(q.code(3), 12); // 0.5 lies nearer 0.4407 than 0.5626
    }
}
