//! tokenizer.json (Hugging Face tokenizers), then encoding and decoding with it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(t) = webpeft::tokenizer::Tokenizer::from_json(text, None, None, None) else { return };
    if let Ok(ids) = t.encode("Hello, world! 123") {
        let _ = t.decode(&ids, true);
    }
});
