//! webpeft: parameter-efficient fine-tuning of language models on WebGPU, in the browser
//! and natively, with adapters in the Hugging Face PEFT format.
//!
//! Layout: `io` (file formats), `models` (architectures), `peft` (methods), `train`
//! (loss, optimiser, loop), `generate` (decoding), `device` (device choice and self-check), `matmul` (our f32 matmul kernel), `profile` (GPU time per kernel),
//! `session` (the high-level API the CLI and the JS bindings share; `task` is its
//! counterpart for sequence classification and sentence embeddings, on encoders and decoders), `wasm` (JS boundary).

pub mod device;
pub mod error;
pub mod generate;
pub mod io;
pub mod matmul;
pub mod models;
pub mod peft;
pub mod profile;
pub mod quant;
pub mod session;
pub mod task;
pub mod tensor;
pub mod tokenizer;
pub mod train;

#[cfg(target_family = "wasm")]
pub mod wasm;

pub use error::{Error, ErrorCode, Result};
