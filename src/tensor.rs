//! Small helpers between host data and device tensors. Reads are async so the same code
//! runs in the browser (where WebGPU cannot block); native code wraps them in `block_on`.

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::error::{Result, err};
use crate::io::safetensors::HostTensor;

thread_local! {
    static UPLOADED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Bytes this thread has sent host → device through these helpers (every upload in the
/// crate goes through them): lets tests assert that e.g. switching adapters re-sends nothing
/// of the base.
pub fn uploaded_bytes() -> u64 {
    UPLOADED.with(|u| u.get())
}

fn count(bytes: usize) {
    UPLOADED.with(|u| u.set(u.get() + bytes as u64));
}

/// Count an upload made outside these helpers (e.g. quantized weights).
pub fn count_uploaded(bytes: usize) {
    count(bytes)
}

/// Largest tensor sized from a config (elements): 2^26 f32 = 256 MiB, the buffer size every
/// WebGPU device allows by default (`maxBufferSize`), far beyond any adapter's tensor.
pub const MAX_TENSOR_ELEMENTS: usize = 1 << 26;

/// Check a tensor shape sized from a config before anything is allocated for it: the
/// element count must not overflow nor exceed [`MAX_TENSOR_ELEMENTS`]. `setting` names what
/// to reduce (e.g. "r", "num_virtual_tokens").
pub fn check_size(setting: &str, dims: &[usize]) -> Result<usize> {
    let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).filter(|&n| n <= MAX_TENSOR_ELEMENTS);
    n.ok_or_else(|| err!(Config, "{setting}: a {dims:?} tensor is larger than the {} MiB limit for one tensor; reduce {setting}", (MAX_TENSOR_ELEMENTS * 4) >> 20))
}

pub fn upload<const D: usize>(t: &HostTensor, device: &Device) -> Result<Tensor<D>> {
    if t.shape.len() != D {
        return Err(err!(Shape, "expected a {D}-D tensor, got shape {:?}", t.shape));
    }
    count(t.data.len() * 4);
    Ok(Tensor::from_data(TensorData::new(t.data.clone(), t.shape.clone()), device))
}

pub fn floats<const D: usize>(data: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    count(data.len() * 4);
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// Upload f32 values as an f16 tensor (rounded to nearest; 2 bytes an element on the device).
pub fn halves<const D: usize>(data: &[f32], shape: [usize; D], device: &Device) -> Tensor<D> {
    count(data.len() * 2);
    let data: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
    Tensor::from_data(TensorData::new(data, shape), (device, burn::tensor::DType::F16))
}

pub fn ints<const D: usize>(data: Vec<i64>, shape: [usize; D], device: &Device) -> Tensor<D, Int> {
    count(data.len() * 8);
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// `table` with row `row` cut out of the autodiff graph (same values, no gradient there).
pub fn freeze_row(table: Tensor<2>, row: Option<usize>) -> Tensor<2> {
    let [v, _] = table.dims();
    let Some(row) = row.filter(|&r| r < v) else {
        return table;
    };
    if !table.is_require_grad() && !table.is_tracked() {
        return table;
    }
    let mut keep = vec![1f32; v];
    keep[row] = 0.0;
    let keep: Tensor<2> = floats(keep, [v, 1], &table.device());
    let frozen = table.clone().detach();
    table * keep.clone() + frozen * keep.neg().add_scalar(1.0)
}

/// Read a float tensor back to the host.
pub async fn read<const D: usize>(t: Tensor<D>) -> Result<HostTensor> {
    let shape = t.dims().to_vec();
    let data = t.into_data_async().await?;
    let data = data.convert::<f32>().try_to_vec::<f32>().map_err(|e| crate::error::device_error(format!("read back: {e:?}")))?;
    Ok(HostTensor::new(shape, data))
}

/// Wait until every tensor of `ts` is computed: one readback of the first value of each (a
/// timing's end, without reading the tensors themselves). Each tensor must have a value.
pub async fn wait_for(ts: Vec<Tensor<2>>) -> Result<()> {
    let firsts: Vec<Tensor<2>> = ts.into_iter().map(|t| t.narrow(0, 0, 1).narrow(1, 0, 1)).collect();
    read(Tensor::cat(firsts, 0)).await.map(|_| ())
}

/// Read a scalar (a 1-element tensor).
pub async fn read_scalar(t: Tensor<1>) -> Result<f32> {
    Ok(read(t).await?.data[0])
}

/// Run an async computation to completion on native targets.
#[cfg(not(target_family = "wasm"))]
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    pollster::block_on(f)
}
