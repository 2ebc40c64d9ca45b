//! Model architectures. One file per architecture; adapters plug in through [`hooks`].

pub mod config;
pub mod hooks;
pub mod llama;
