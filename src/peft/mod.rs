//! Parameter-efficient fine-tuning methods, one folder per method (config, layer, model),
//! as in Hugging Face `peft`. Each method turns into a [`crate::models::hooks::LinearHook`]
//! for the forward pass and a list of named trainable tensors for the trainer.

pub mod lora;
pub mod targets;

use burn::tensor::Tensor;

/// A trainable tensor with its name in the saved adapter.
pub struct NamedParam<'a> {
    pub name: String,
    pub tensor: &'a mut Tensor<2>,
}
