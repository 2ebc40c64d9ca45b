//! File formats: safetensors, GGUF, and the Hugging Face folder layout. Everything here
//! works on bytes; native code reads files into bytes, the browser hands over ArrayBuffers.

pub mod archive;
pub mod export;
pub mod gguf;
pub mod safetensors;
pub mod source;
