//! The frozen linear layer every architecture shares, and the embedding table; either weight
//! is f32 on the device or kept in a block format ([`crate::quant`]) and dequantized inside
//! the matmul kernel.

use burn::tensor::{Int, Tensor};

use crate::quant::QuantFormat;
use crate::quant::kernel::matmul_t;
use crate::quant::weight::QuantWeight;

/// A frozen weight matrix as the device holds it.
#[derive(Clone, Debug)]
pub enum Weight {
    /// f32, stored `[in, out]` so that `y = x @ W`.
    Dense(Tensor<2>),
    /// A block format, stored `[out, in]` (PyTorch / GGUF layout).
    Quant(QuantWeight),
}

impl Weight {
    /// `x @ W` → [rows, out].
    pub fn matmul(&self, x: Tensor<2>) -> Tensor<2> {
        match self {
            Weight::Dense(w) => x.matmul(w.clone()),
            Weight::Quant(q) => matmul_t(x, q),
        }
    }

    /// The f32 matrix `[in, out]` (a quantized weight is dequantized, on the device).
    pub fn dense(&self) -> Tensor<2> {
        match self {
            Weight::Dense(w) => w.clone(),
            Weight::Quant(q) => q.dequantize().transpose(),
        }
    }

    /// `[in, out]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            Weight::Dense(w) => w.dims(),
            Weight::Quant(q) => [q.cols, q.rows],
        }
    }

    pub fn format(&self) -> Option<QuantFormat> {
        match self {
            Weight::Dense(_) => None,
            Weight::Quant(q) => Some(q.format),
        }
    }

    /// Bytes the device holds for it.
    pub fn device_bytes(&self) -> usize {
        match self {
            Weight::Dense(w) => 4 * w.dims().iter().product::<usize>(),
            Weight::Quant(q) => q.device_bytes(),
        }
    }
}

/// A frozen linear layer, `y = x @ W (+ b)`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor<1>>,
}

impl Linear {
    /// A dense layer from an `[in, out]` weight.
    pub fn dense(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Self {
        Linear { weight: Weight::Dense(weight), bias }
    }

    pub fn forward(&self, x: &Tensor<2>) -> Tensor<2> {
        self.forward_with(x, None, None)
    }

    /// The same with trainable replacements for the weight [in, out] / bias [1, out].
    pub fn forward_with(&self, x: &Tensor<2>, weight: Option<Tensor<2>>, bias: Option<Tensor<2>>) -> Tensor<2> {
        let y = match weight {
            Some(w) => x.clone().matmul(w),
            None => self.weight.matmul(x.clone()),
        };
        match (bias, &self.bias) {
            (Some(b), _) => y + b,
            (None, Some(b)) => y + b.clone().unsqueeze(),
            (None, None) => y,
        }
    }

    /// The weight as an f32 `[in, out]` tensor (dequantized if it is kept quantized).
    pub fn dense_weight(&self) -> Tensor<2> {
        self.weight.dense()
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[0]
    }
    pub fn out_features(&self) -> usize {
        self.weight.dims()[1]
    }
}

/// A frozen embedding table `[vocab, hidden]`, f32 or in a block format.
#[derive(Clone, Debug)]
pub enum Embedding {
    Dense(Tensor<2>),
    Quant(QuantWeight),
}

impl Embedding {
    /// Rows `ids` → [ids, hidden].
    pub fn rows(&self, ids: Tensor<1, Int>) -> Tensor<2> {
        match self {
            Embedding::Dense(t) => t.clone().select(0, ids),
            Embedding::Quant(q) => q.select_rows(ids),
        }
    }

    /// `h @ Eᵀ` → [rows, vocab] (a tied LM head).
    pub fn logits(&self, h: Tensor<2>) -> Tensor<2> {
        match self {
            Embedding::Dense(t) => h.matmul(t.clone().transpose()),
            Embedding::Quant(q) => matmul_t(h, q),
        }
    }

    /// The f32 table (a quantized one is dequantized, on the device).
    pub fn dense(&self) -> Tensor<2> {
        match self {
            Embedding::Dense(t) => t.clone(),
            Embedding::Quant(q) => q.dequantize(),
        }
    }

    /// `[vocab, hidden]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            Embedding::Dense(t) => t.dims(),
            Embedding::Quant(q) => [q.rows, q.cols],
        }
    }

    pub fn device_bytes(&self) -> usize {
        match self {
            Embedding::Dense(t) => 4 * t.dims().iter().product::<usize>(),
            Embedding::Quant(q) => q.device_bytes(),
        }
    }
}
