//! The seam between a frozen model and the PEFT methods that modify it. A model calls its
//! hook at every linear projection; a method (LoRA, ...) adds its term there. Keeping this a
//! small trait lets every method plug into every architecture without touching either.

use burn::tensor::Tensor;

/// The projections of a transformer block, by their Hugging Face module names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    /// Dotted module path under the decoder layer, e.g. `self_attn.q_proj`.
    pub fn module_path(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }
}

/// A linear layer of the model: decoder layer index + projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Site {
    pub layer: usize,
    pub proj: Proj,
}

impl Site {
    /// Full module name as in transformers' `named_modules()` (e.g. `model.layers.0.self_attn.q_proj`).
    pub fn module_name(&self) -> String {
        format!("model.layers.{}.{}", self.layer, self.proj.module_path())
    }
}

/// Called by the model at every linear projection: `x` is the input [N, in], `y` the frozen
/// output [N, out]; returns the output to use.
pub trait LinearHook {
    fn linear(&self, site: Site, x: &Tensor<2>, y: Tensor<2>) -> Tensor<2>;
}

/// No adapter: the frozen model.
pub struct NoHook;

impl LinearHook for NoHook {
    fn linear(&self, _site: Site, _x: &Tensor<2>, y: Tensor<2>) -> Tensor<2> {
        y
    }
}
