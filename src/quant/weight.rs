//! A quantized weight matrix on the device, and its reference dequantization in tensor ops.

use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use super::{QuantFormat, QuantHost};
use crate::error::Result;

/// A frozen `[rows, cols]` matrix (rows = output features) held on the device in its block
/// format (see [`crate::quant`]): codes as u32 words, f32 scales (and minimums), and the
/// format's code → value table.
#[derive(Clone, Debug)]
pub struct QuantWeight {
    pub format: QuantFormat,
    pub rows: usize,
    pub cols: usize,
    pub codes: Tensor<1, Int>,
    pub scales: Tensor<1>,
    pub mins: Option<Tensor<1>>,
    pub lut: Tensor<1>,
}

impl QuantWeight {
    /// Send a host matrix to `device` (outside autodiff: the weight is frozen).
    pub fn upload(h: &QuantHost, device: &Device) -> Result<Self> {
        let device = device.clone().inner();
        crate::tensor::count_uploaded(h.device_bytes());
        let f32s = |v: &[f32]| Tensor::<1>::from_data(TensorData::new(v.to_vec(), [v.len()]), &device);
        Ok(QuantWeight {
            format: h.format,
            rows: h.rows,
            cols: h.cols,
            codes: Tensor::from_data(TensorData::new(h.codes.clone(), [h.codes.len()]), (&device, DType::U32)),
            scales: f32s(&h.scales),
            mins: h.format.has_min().then(|| f32s(&h.mins)),
            lut: f32s(&h.format.lut()),
        })
    }

    /// Bytes held on the device (the lookup table aside).
    pub fn device_bytes(&self) -> usize {
        4 * (self.codes.dims()[0] + self.scales.dims()[0] + self.mins.as_ref().map_or(0, |m| m.dims()[0]))
    }

    /// The f32 matrix `[rows, cols]`, computed with tensor ops on the weight's device: the
    /// reference the kernel is checked against, and what merging or DoRA read.
    pub fn dequantize(&self) -> Tensor<2> {
        decode(self.format, &self.lut, self.codes.clone(), self.scales.clone(), self.mins.clone(), self.rows * self.cols).reshape([self.rows, self.cols])
    }

    /// Rows `ids` as f32 `[ids, cols]` (an embedding lookup): only those rows are decoded
    /// when every row holds whole code words and whole blocks.
    pub fn select_rows(&self, ids: Tensor<1, Int>) -> Tensor<2> {
        let (bits, block) = (self.format.bits(), self.format.block());
        if (self.cols * bits) % 32 != 0 || self.cols % block != 0 {
            return self.dequantize().select(0, ids);
        }
        let n = ids.dims()[0];
        let (wpr, bpr) = (self.cols * bits / 32, self.cols / block);
        let rows = |t: Tensor<1>| t.reshape([self.rows, bpr]).select(0, ids.clone()).reshape([n * bpr]);
        let codes = self.codes.clone().reshape([self.rows, wpr]).select(0, ids.clone()).reshape([n * wpr]);
        decode(self.format, &self.lut, codes, rows(self.scales.clone()), self.mins.clone().map(rows), n * self.cols).reshape([n, self.cols])
    }
}

/// The first `n` values of packed codes with their per-block scales (and minimums).
fn decode(format: QuantFormat, lut: &Tensor<1>, codes: Tensor<1, Int>, scales: Tensor<1>, mins: Option<Tensor<1>>, n: usize) -> Tensor<1> {
    let bits = format.bits();
    let per_word = 32 / bits;
    let words = codes.dims()[0];
    let w = codes.reshape([words, 1]);
    let mask = (1i64 << bits) - 1;
    let parts: Vec<Tensor<2, Int>> = (0..per_word).map(|j| w.clone().bitwise_right_shift_scalar((j * bits) as i64).bitwise_and_scalar(mask)).collect();
    let codes = Tensor::cat(parts, 1).reshape([words * per_word]).slice(0..n).cast(DType::I32);
    let values = lut.clone().select(0, codes);
    let block = format.block();
    let nb = scales.dims()[0];
    let per_block = |t: Tensor<1>| t.reshape([nb, 1]).expand([nb, block]).reshape([nb * block]).slice(0..n);
    let v = values * per_block(scales);
    match mins {
        Some(m) => v + per_block(m),
        None => v,
    }
}

/// Quantize an f32 `[rows, cols]` device-independent host matrix and upload it.
pub fn quantize_upload(format: QuantFormat, rows: usize, cols: usize, data: &[f32], device: &Device) -> Result<QuantWeight> {
    QuantWeight::upload(&QuantHost::quantize(format, rows, cols, data)?, device)
}
