//! LoRA (Hu et al. 2021) with peft's semantics: `y = x W + s * (dropout(x) A) B`, computed
//! without materialising `W + s A B`, so autodiff only ever sees rank-r tensors.

pub mod combine;
pub mod config;
pub mod layer;
pub mod model;

pub use config::{BiasMode, InitLora, LoraConfig};
pub use layer::LoraLayer;
pub use model::LoraAdapter;
