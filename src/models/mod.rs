//! Model architectures. One file per architecture; adapters plug in through [`hooks`].

pub mod bert;
pub mod config;
pub mod hooks;
pub mod linear;
pub mod llama;
pub mod vit;

use burn::tensor::Device;

use hooks::Site;
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
