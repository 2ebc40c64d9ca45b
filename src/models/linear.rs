//! The frozen linear layer every architecture shares.

use burn::tensor::Tensor;

/// A frozen linear layer, weight stored as [in, out] so that `y = x @ W (+ b)`.
#[derive(Clone)]
pub struct Linear {
    pub weight: Tensor<2>,
    pub bias: Option<Tensor<1>>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor<2>) -> Tensor<2> {
        self.forward_with(x, None, None)
    }

    /// The same with trainable replacements for the weight [in, out] / bias [1, out].
    pub fn forward_with(&self, x: &Tensor<2>, weight: Option<Tensor<2>>, bias: Option<Tensor<2>>) -> Tensor<2> {
        let y = x.clone().matmul(weight.unwrap_or_else(|| self.weight.clone()));
        match (bias, &self.bias) {
            (Some(b), _) => y + b,
            (None, Some(b)) => y + b.clone().unsqueeze(),
            (None, None) => y,
        }
    }
    pub fn in_features(&self) -> usize {
        self.weight.dims()[0]
    }
    pub fn out_features(&self) -> usize {
        self.weight.dims()[1]
    }
}
