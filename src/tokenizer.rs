//! Tokenisation with Hugging Face `tokenizers`: from a `tokenizer.json`, or rebuilt from GGUF
//! metadata the way transformers converts a GGUF tokenizer (byte-level BPE), plus chat
//! templates rendered with minijinja (the Jinja subset transformers uses).

use serde_json::{Value as Json, json};
use tokenizers::Tokenizer as HfTokenizer;

use crate::error::{Result, bail, err};
use crate::io::gguf::{Gguf, Value};

pub struct Tokenizer {
    inner: HfTokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub chat_template: Option<String>,
}

impl Tokenizer {
    pub fn from_json(text: &str, chat_template: Option<String>, bos_id: Option<u32>, eos_id: Option<u32>) -> Result<Self> {
        // Parse the JSON first, then build from the value: tokenizers 0.22 panics (rather than
        // failing) on a syntax error or an out-of-range number inside the `decoder` object
        // when it reads text (found by fuzz/fuzz_targets/tokenizer_json.rs).
        let value: Json = serde_json::from_str(text).map_err(|e| err!(Parse, "tokenizer.json: {e}"))?;
        let inner: HfTokenizer = serde_json::from_value(value).map_err(|e| err!(Parse, "tokenizer.json: {e}"))?;
        Ok(Tokenizer { inner, bos_id, eos_id, chat_template })
    }

    /// Rebuild the tokenizer stored in GGUF metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(g: &Gguf<'_>) -> Result<Self> {
        let model = g.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            bail!(Unsupported, "GGUF tokenizer model {model:?} (supported: gpt2 byte-level BPE)");
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            let a = g.get(key).and_then(Value::as_array).ok_or_else(|| err!(Format, "GGUF metadata {key} missing"))?;
            a.iter().map(|v| v.as_str().map(str::to_string).ok_or_else(|| err!(Format, "GGUF metadata {key}: not strings"))).collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<u64> = g.get("tokenizer.ggml.token_type").and_then(Value::as_array).map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect()).unwrap_or_default();
        let id = |k: &str| g.get(k).and_then(Value::as_u64).map(|v| v as u32);
        let bos_id = id("tokenizer.ggml.bos_token_id");
        let eos_id = id("tokenizer.ggml.eos_token_id");
        let add_bos = g.get("tokenizer.ggml.add_bos_token").is_some_and(|v| *v == Value::Bool(true));
        // As transformers' GGUF converter: tokens spelled outside the byte-level alphabet are
        // re-spelled in it; control tokens (type 3) become special added tokens unless they
        // use characters outside the alphabet (a llama.cpp mislabel), user-defined (4) plain ones.
        let (spell, alphabet) = byte_level_alphabet();
        let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
        let vocab: serde_json::Map<String, Json> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let k = if in_alphabet(t) { t.clone() } else { t.bytes().map(|b| spell[b as usize]).collect() };
                (k, json!(i))
            })
            .collect();
        let added: Vec<Json> = tokens
            .iter()
            .enumerate()
            .filter(|(i, t)| match types.get(*i) {
                Some(3) => in_alphabet(t),
                Some(4) => true,
                _ => false,
            })
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": types.get(i) == Some(&3)})
            })
            .collect();
        let post = if add_bos && let Some(b) = bos_id {
            let bos = &tokens[b as usize];
            json!({"type": "TemplateProcessing",
                   "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                   "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                            {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                   "special_tokens": {bos.clone(): {"id": bos, "ids": [b], "tokens": [bos]}}})
        } else {
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
        };
        let tj = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer(g.get("tokenizer.ggml.pre").and_then(Value::as_str)),
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges}
        });
        let chat_template = g.get("tokenizer.chat_template").and_then(Value::as_str).map(str::to_string);
        Self::from_json(&tj.to_string(), chat_template, bos_id, eos_id)
    }

    /// Set up for an encoder's inputs: no padding (batches are padded by the caller) and
    /// truncation to `max_len` tokens, special tokens included (as `tokenizer(text,
    /// truncation=True, max_length=max_len)`), whatever `tokenizer.json` says.
    pub fn with_truncation(mut self, max_len: usize) -> Result<Self> {
        let params = tokenizers::TruncationParams { max_length: max_len, ..Default::default() };
        self.inner.with_padding(None).with_truncation(Some(params)).map_err(|e| err!(Config, "tokenizer truncation: {e}"))?;
        Ok(self)
    }

    /// Encode with the tokenizer's default special-token handling (as `tokenizer(text)`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_opts(text, true)
    }

    pub fn encode_opts(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special).map_err(|e| err!(Data, "tokenize: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids and each token's byte range in `text` (special tokens included as `add_special`).
    pub fn encode_with_offsets(&self, text: &str, add_special: bool) -> Result<(Vec<u32>, Vec<(usize, usize)>)> {
        let enc = self.inner.encode(text, add_special).map_err(|e| err!(Data, "tokenize: {e}"))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| err!(Data, "detokenize: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The tokenizer as `tokenizer.json` text (what `tokenizers` and transformers load).
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(|e| err!(Format, "tokenizer.json: {e}"))
    }

    /// The `tokenizer_config.json` transformers needs besides `tokenizer.json`: the special
    /// tokens and the chat template.
    pub fn config_json(&self) -> String {
        let tok = |id: Option<u32>| id.and_then(|i| self.inner.id_to_token(i)).map_or(serde_json::Value::Null, serde_json::Value::from);
        let v = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tok(self.bos_id),
            "eos_token": tok(self.eos_id),
            "clean_up_tokenization_spaces": false,
        });
        serde_json::to_string_pretty(&v).expect("serialisable")
    }

    pub fn token_to_id(&self, t: &str) -> Option<u32> {
        self.inner.token_to_id(t)
    }

    fn token_str(&self, id: Option<u32>) -> String {
        id.and_then(|i| self.inner.id_to_token(i)).unwrap_or_default()
    }

    /// Render a conversation with the model's chat template (Jinja, as transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`).
    pub fn apply_chat_template(&self, messages: &[(String, String)], add_generation_prompt: bool) -> Result<String> {
        let tpl = self.chat_template.as_deref().ok_or_else(|| err!(Config, "this model has no chat template"))?;
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_template("chat", tpl).map_err(|e| err!(Parse, "chat template: {e}"))?;
        let msgs: Vec<Json> = messages.iter().map(|(r, c)| json!({"role": r, "content": c})).collect();
        let ctx = json!({
            "messages": msgs,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.token_str(self.bos_id),
            "eos_token": self.token_str(self.eos_id),
        });
        env.get_template("chat").and_then(|t| t.render(ctx)).map_err(|e| err!(Data, "chat template: {e}"))
    }
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer for a GGUF `tokenizer.ggml.pre` value: the regex split the vocabulary's
/// merges were learned with (as llama.cpp and the models' own tokenizer.json files do), else
/// GPT-2's byte-level split. "smollm" splits digits one by one first, like SmolLM2's
/// tokenizer.json (transformers' GGUF loader does not know "smollm" and skips that step).
fn pre_tokenizer(pre: Option<&str>) -> Json {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |re: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            byte_level(false)]})
    };
    match pre {
        Some("smollm") => {
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]})
        }
        Some("llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx") => split(LLAMA3_SPLIT),
        Some("qwen2" | "deepseek-r1-qwen") => split(QWEN2_SPLIT),
        _ => byte_level(true),
    }
}

/// GPT-2's `bytes_to_unicode`: the character each byte is spelled with, and the set of them.
fn byte_level_alphabet() -> (Vec<char>, std::collections::HashSet<char>) {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut n = 0;
    let spell: Vec<char> = (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("latin-1")
            } else {
                n += 1;
                char::from_u32(255 + n).expect("valid")
            }
        })
        .collect();
    let set = spell.iter().copied().collect();
    (spell, set)
}
