//! The frozen linear layer every architecture shares, and the embedding table; either weight
//! is f32 on the device, f16, or kept in a block format ([`crate::quant`]) and dequantized
//! inside the matmul kernel.
//!
//! An f16 weight is used as PyTorch's autocast uses one: the matmul's input is rounded to f16,
//! the kernel accumulates in f32 and rounds its output to f16, and the result goes on in f32
//! (norms, attention, softmax, the loss and every adapter stay f32).

use burn::tensor::{FloatDType, Int, Tensor};

use crate::matmul::matmul;
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
    /// f16, stored `[in, out]`.
    Half(Tensor<2>),
}

/// `x @ w` with `w` in f16: x rounded to f16, f32 accumulation, the f16 result widened.
fn half_matmul(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    x.cast(FloatDType::F16).matmul(w).cast(FloatDType::F32)
}

impl Weight {
    /// `x @ W` → [rows, out].
    pub fn matmul(&self, x: Tensor<2>) -> Tensor<2> {
        match self {
            Weight::Dense(w) => matmul(x, w.clone()),
            Weight::Quant(q) => matmul_t(x, q),
            Weight::Half(w) => half_matmul(x, w.clone()),
        }
    }

    /// The f32 matrix `[in, out]` (a quantized weight is dequantized, on the device).
    pub fn dense(&self) -> Tensor<2> {
        match self {
            Weight::Dense(w) => w.clone(),
            Weight::Quant(q) => q.dequantize().transpose(),
            Weight::Half(w) => w.clone().cast(FloatDType::F32),
        }
    }

    /// `[in, out]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            Weight::Dense(w) | Weight::Half(w) => w.dims(),
            Weight::Quant(q) => [q.cols, q.rows],
        }
    }

    pub fn format(&self) -> Option<QuantFormat> {
        match self {
            Weight::Dense(_) | Weight::Half(_) => None,
            Weight::Quant(q) => Some(q.format),
        }
    }

    /// The storage format's name: "f32", "f16" or a block format's.
    pub fn format_name(&self) -> &'static str {
        match self {
            Weight::Dense(_) => "f32",
            Weight::Half(_) => "f16",
            Weight::Quant(q) => q.format.name(),
        }
    }

    /// Bytes the device holds for it.
    pub fn device_bytes(&self) -> usize {
        match self {
            Weight::Dense(w) => 4 * w.dims().iter().product::<usize>(),
            Weight::Half(w) => 2 * w.dims().iter().product::<usize>(),
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
            Some(w) => matmul(x.clone(), w),
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

/// A frozen embedding table `[vocab, hidden]`, f32, f16 or in a block format.
#[derive(Clone, Debug)]
pub enum Embedding {
    Dense(Tensor<2>),
    Quant(QuantWeight),
    Half(Tensor<2>),
}

impl Embedding {
    /// Rows `ids` → [ids, hidden].
    pub fn rows(&self, ids: Tensor<1, Int>) -> Tensor<2> {
        match self {
            Embedding::Dense(t) => t.clone().select(0, ids),
            Embedding::Quant(q) => q.select_rows(ids),
            Embedding::Half(t) => t.clone().select(0, ids).cast(FloatDType::F32),
        }
    }

    /// `h @ Eᵀ` → [rows, vocab] (a tied LM head).
    pub fn logits(&self, h: Tensor<2>) -> Tensor<2> {
        match self {
            Embedding::Dense(t) => matmul(h, t.clone().transpose()),
            Embedding::Quant(q) => matmul_t(h, q),
            Embedding::Half(t) => half_matmul(h, t.clone().transpose()),
        }
    }

    /// The f32 table (a quantized one is dequantized, on the device).
    pub fn dense(&self) -> Tensor<2> {
        match self {
            Embedding::Dense(t) => t.clone(),
            Embedding::Quant(q) => q.dequantize(),
            Embedding::Half(t) => t.clone().cast(FloatDType::F32),
        }
    }

    /// `[vocab, hidden]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            Embedding::Dense(t) | Embedding::Half(t) => t.dims(),
            Embedding::Quant(q) => [q.rows, q.cols],
        }
    }

    pub fn device_bytes(&self) -> usize {
        match self {
            Embedding::Dense(t) => 4 * t.dims().iter().product::<usize>(),
            Embedding::Half(t) => 2 * t.dims().iter().product::<usize>(),
            Embedding::Quant(q) => q.device_bytes(),
        }
    }
}
