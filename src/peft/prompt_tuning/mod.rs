//! Prompt tuning (Lester et al. 2021) with peft's semantics: `num_virtual_tokens` trainable
//! embeddings put before every sequence (training, logits and generation), attended to by
//! every token, labelled -100; saved as one tensor `prompt_embeddings` [n, hidden].

pub mod config;
pub mod model;

pub use config::{PromptInit, PromptTuningConfig};
pub use model::PromptTuningAdapter;
