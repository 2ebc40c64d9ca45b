//! A model's config.json, read as a decoder (Llama family, GPT-2), a BERT encoder and a ViT.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(c) = webpeft::models::config::LlamaConfig::from_json(text) {
        let _ = c.rope_inv_freq();
    }
    let _ = webpeft::models::bert::BertConfig::from_json(text);
    if let Ok(c) = webpeft::models::vit::VitConfig::from_json(text) {
        let _ = webpeft::models::vit::Preprocess::from_json(None, &c);
    }
});
