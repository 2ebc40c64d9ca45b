//! One LoRA pair on one linear layer, optionally with DoRA's magnitude vector.

use burn::tensor::{Distribution, Tensor};

use crate::matmul::matmul;

/// DoRA (Liu et al. 2024): the layer's weight is re-normalised per output unit and scaled by a
/// learned magnitude. Holds handles to the frozen base weight/bias it needs (no copies).
#[derive(Clone)]
pub struct Dora {
    /// [1, out]
    pub magnitude: Tensor<2>,
    /// The frozen base weight [in, out] and bias [out].
    pub base_weight: Tensor<2>,
    pub base_bias: Option<Tensor<1>>,
}

/// `A` is stored [in, r] and `B` [r, out] (the transposes of peft's `lora_A.weight` [r, in]
/// and `lora_B.weight` [out, r]) so the forward pass is two plain matmuls.
#[derive(Clone)]
pub struct LoraLayer {
    pub a: Tensor<2>,
    pub b: Tensor<2>,
    pub scaling: f64,
    pub dropout: f64,
    pub dora: Option<Dora>,
    /// lora_B's bias [1, out] (peft `lora_bias`); scaled with the LoRA term.
    pub bias: Option<Tensor<2>>,
}

/// Column norms of `W + s * A B` ([in, out] layout): the per-output-unit L2 norm, [1, out].
pub fn weight_norm(w: &Tensor<2>, a: &Tensor<2>, b: &Tensor<2>, scaling: f64) -> Tensor<2> {
    let full = w.clone() + a.clone().matmul(b.clone()).mul_scalar(scaling);
    full.square().sum_dim(0).sqrt()
}

impl LoraLayer {
    fn dropped(&self, x: &Tensor<2>, training: bool) -> Tensor<2> {
        if training && self.dropout > 0.0 {
            let keep = x.random_like(Distribution::Bernoulli(1.0 - self.dropout));
            x.clone() * keep / (1.0 - self.dropout)
        } else {
            x.clone()
        }
    }

    /// The output with this layer applied, given the input x [N, in] and the frozen output y.
    ///
    /// LoRA: `y + s * (dropout(x) A) B`. DoRA, as peft computes it (the norm is detached,
    /// section 4.3 of the paper): with `m = magnitude / ||W + s A B||_c`,
    /// `y + (m - 1) * (y - bias) + m * s * (x A) B`; under dropout, `y - bias` is recomputed
    /// from the dropped-out input.
    pub fn apply(&self, x: &Tensor<2>, y: Tensor<2>, training: bool) -> Tensor<2> {
        let xd = self.dropped(x, training);
        let ab = matmul(matmul(xd.clone(), self.a.clone()), self.b.clone());
        let ab = match &self.bias {
            Some(b) => ab + b.clone(),
            None => ab,
        };
        let lora = ab.mul_scalar(self.scaling);
        let Some(d) = &self.dora else { return y + lora };
        let norm = weight_norm(&d.base_weight, &self.a.clone().without_autodiff(), &self.b.clone().without_autodiff(), self.scaling);
        let m = d.magnitude.clone() / norm;
        let base = if training && self.dropout > 0.0 {
            matmul(xd, d.base_weight.clone())
        } else {
            match &d.base_bias {
                Some(bias) => y.clone() - bias.clone().unsqueeze(),
                None => y.clone(),
            }
        };
        y + base * m.clone().sub_scalar(1.0) + lora * m
    }
}
