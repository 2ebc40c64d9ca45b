//! One LoRA pair on one linear layer.

use burn::tensor::{Distribution, Tensor};

/// `A` is stored [in, r] and `B` [r, out] (the transposes of peft's `lora_A.weight` [r, in]
/// and `lora_B.weight` [out, r]) so the forward pass is two plain matmuls.
#[derive(Clone)]
pub struct LoraLayer {
    pub a: Tensor<2>,
    pub b: Tensor<2>,
    pub scaling: f64,
    pub dropout: f64,
}

impl LoraLayer {
    /// The LoRA term `s * (dropout(x) A) B` for input x [N, in].
    pub fn delta(&self, x: &Tensor<2>, training: bool) -> Tensor<2> {
        let x = if training && self.dropout > 0.0 {
            let keep = x.random_like(Distribution::Bernoulli(1.0 - self.dropout));
            x.clone() * keep / (1.0 - self.dropout)
        } else {
            x.clone()
        };
        x.matmul(self.a.clone()).matmul(self.b.clone()).mul_scalar(self.scaling)
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[1]
    }
}
