//! A .gguf file: header, metadata, tensor directory, dequantisation, the model config and
//! the tokenizer rebuilt from its metadata.
#![no_main]
use libfuzzer_sys::fuzz_target;
use webpeft::io::gguf::Gguf;
use webpeft::io::source::ModelFiles;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = Gguf::parse(data) else { return };
    let _ = webpeft::models::config::LlamaConfig::from_gguf(&g);
    if let Ok(t) = webpeft::tokenizer::Tokenizer::from_gguf(&g) {
        let _ = t.encode("Hello, world");
    }
    let _ = ModelFiles::Gguf { name: "fuzz.gguf".into(), bytes: data.to_vec() }.load_weights();
});
