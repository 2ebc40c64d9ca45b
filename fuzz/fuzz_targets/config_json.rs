//! A model's config.json.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(c) = webpeft::models::config::LlamaConfig::from_json(text) {
        let _ = c.rope_inv_freq();
    }
});
