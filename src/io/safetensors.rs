//! Reading and writing safetensors (via the `safetensors` crate), from bytes so the same
//! code serves files natively and `ArrayBuffer`s in the browser.

use std::collections::BTreeMap;

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::error::{Result, err};

/// An owned host tensor: the unit of exchange between file formats and the device.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }

    /// The transpose of a 2-D tensor.
    pub fn transposed(&self) -> HostTensor {
        let (r, c) = (self.shape[0], self.shape[1]);
        let mut out = vec![0.0; r * c];
        for i in 0..r {
            for j in 0..c {
                out[j * r + i] = self.data[i * c + j];
            }
        }
        HostTensor::new(vec![c, r], out)
    }
}

/// Remove tensor `name` from a model's weights, checking its shape (loaders take every tensor
/// they use, then refuse leftovers).
pub fn take(t: &mut BTreeMap<String, HostTensor>, name: &str, shape: &[usize]) -> Result<HostTensor> {
    let h = t.remove(name).ok_or_else(|| err!(Format, "missing tensor {name}"))?;
    if h.shape != shape {
        return Err(err!(Shape, "tensor {name}: shape {:?}, expected {shape:?}", h.shape));
    }
    Ok(h)
}

/// Parse the safetensors header and check it against the buffer.
pub fn parse(bytes: &[u8]) -> Result<SafeTensors<'_>> {
    SafeTensors::deserialize(bytes).map_err(|e| err!(Format, "invalid safetensors ({} bytes): {e}", bytes.len()))
}

/// Convert a floating tensor view to f32 (bf16/f16 are widened exactly).
pub fn view_to_f32(name: &str, v: &TensorView<'_>) -> Result<HostTensor> {
    let b = v.data();
    let data: Vec<f32> = match v.dtype() {
        Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F64 => b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect(),
        d => return Err(err!(Unsupported, "tensor {name}: dtype {d:?} (expected a float type)")),
    };
    Ok(HostTensor::new(v.shape().to_vec(), data))
}

/// Read an integer tensor (i64/i32) as i64.
pub fn view_to_i64(name: &str, v: &TensorView<'_>) -> Result<(Vec<usize>, Vec<i64>)> {
    let b = v.data();
    let data = match v.dtype() {
        Dtype::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(),
        Dtype::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64).collect(),
        d => return Err(err!(Unsupported, "tensor {name}: dtype {d:?} (expected i64 or i32)")),
    };
    Ok((v.shape().to_vec(), data))
}

/// Read every float tensor of a safetensors buffer.
pub fn read_all_f32(bytes: &[u8]) -> Result<BTreeMap<String, HostTensor>> {
    let st = parse(bytes)?;
    st.tensors().into_iter().map(|(k, v)| Ok((k.clone(), view_to_f32(&k, &v)?))).collect()
}

/// A tensor to write: f32 or i64.
pub enum OutTensor {
    F32(HostTensor),
    I64(Vec<usize>, Vec<i64>),
}

/// Serialise tensors (sorted by name) with optional `__metadata__`.
pub fn write(tensors: &BTreeMap<String, OutTensor>, metadata: Option<std::collections::HashMap<String, String>>) -> Result<Vec<u8>> {
    let bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, t)| match t {
            OutTensor::F32(h) => (k.clone(), Dtype::F32, h.shape.clone(), h.data.iter().flat_map(|x| x.to_le_bytes()).collect()),
            OutTensor::I64(s, d) => (k.clone(), Dtype::I64, s.clone(), d.iter().flat_map(|x| x.to_le_bytes()).collect()),
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> =
        bufs.iter().map(|(k, dt, s, b)| Ok((k.clone(), TensorView::new(*dt, s.clone(), b).map_err(|e| err!(Shape, "tensor {k}: {e}"))?))).collect::<Result<_>>()?;
    safetensors::serialize(views, metadata).map_err(|e| err!(Format, "safetensors serialise: {e}"))
}
