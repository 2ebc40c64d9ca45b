//! Model architectures. One file per architecture; adapters plug in through [`hooks`].

pub mod attention;
pub mod bert;
pub mod config;
pub mod hooks;
pub mod linear;
pub mod llama;
pub mod vit;

use burn::tensor::{Device, Tensor};

use hooks::{Site, Tunable};
use linear::Linear;

/// What a PEFT method that works on linear layers (LoRA) needs to know of a frozen model,
/// whatever its architecture.
pub trait Base {
    /// Every linear layer an adapter may target.
    fn sites(&self) -> Vec<Site>;
    fn linear(&self, site: Site) -> &Linear;
    fn device(&self) -> &Device;
    /// The Llama-family model, for the methods and options that exist only there (trained
    /// base biases, `modules_to_save` of norms and the LM head, LoRA on the embeddings).
    fn as_llama(&self) -> Option<&llama::Llama> {
        None
    }
    /// Whether the linear layers are Conv1D (weights saved [in, out]: GPT-2), which peft
    /// records as LoRA's `fan_in_fan_out`.
    fn conv1d(&self) -> bool {
        false
    }
    /// The base tensors outside the linear layers that selective tuning may train (an
    /// encoder's LayerNorms, ViT's patch bias), with their transformers parameter names
    /// (a decoder's norms and embeddings are reached through [`Base::as_llama`]).
    fn tunables(&self) -> Vec<(Tunable, String, Tensor<1>)> {
        Vec::new()
    }
}

impl Base for llama::Llama {
    fn sites(&self) -> Vec<Site> {
        llama::Llama::sites(self)
    }
    fn linear(&self, site: Site) -> &Linear {
        llama::Llama::linear(self, site)
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn as_llama(&self) -> Option<&llama::Llama> {
        (!self.config.is_gpt2()).then_some(self)
    }
    fn conv1d(&self) -> bool {
        self.config.is_gpt2()
    }
}
