//! Hostile input: every parser of untrusted files refuses malformed input with a typed
//! error (a stable code, and a message naming the file and the problem), and sizes are
//! checked before anything is allocated. The fuzzers (scripts/fuzz) look for panics; this
//! suite pins the error each kind of damage gets.

mod common;

use std::collections::BTreeMap;

use common::{compute, fixture};
use webpeft::ErrorCode::{self, *};
use webpeft::io::gguf::Gguf;
use webpeft::io::source::ModelFiles;
use webpeft::session::Session;
use webpeft::train::data::parse_data_file;
use webpeft::{Error, Result};

/// Assert `r` failed with `code` and a message containing every one of `words`.
#[track_caller]
fn refused<T>(case: &str, r: Result<T>, code: ErrorCode, words: &[&str]) {
    let e: Error = match r {
        Ok(_) => panic!("{case}: accepted"),
        Err(e) => e,
    };
    eprintln!("{case}: {e}");
    assert_eq!(e.code, code, "{case}: {e}");
    for w in words {
        assert!(e.message.contains(w), "{case}: message lacks {w:?}: {e}");
    }
}

fn read(p: &str) -> Vec<u8> {
    std::fs::read(fixture(p)).unwrap()
}

/// The tiny Llama folder's files, with `edit` applied, loaded as a browser hands them over.
fn load_folder(edit: impl FnOnce(&mut BTreeMap<String, Vec<u8>>)) -> Result<Session> {
    let mut files: BTreeMap<String, Vec<u8>> = ["config.json", "model.safetensors", "tokenizer.json"].iter().map(|n| (n.to_string(), read(&format!("tiny-llama/{n}")))).collect();
    edit(&mut files);
    Session::load(&ModelFiles::from_named(files)?, compute())
}

fn config_with(key: &str, value: serde_json::Value) -> Vec<u8> {
    let mut c: serde_json::Value = serde_json::from_slice(&read("tiny-llama/config.json")).unwrap();
    c[key] = value;
    serde_json::to_vec(&c).unwrap()
}

/// A safetensors file whose header is `header` (JSON) and whose data is `data`.
fn safetensors_with(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

#[test]
fn model_folder() {
    let st = read("tiny-llama/model.safetensors");
    let half = st[..st.len() / 2].to_vec();
    refused("truncated model.safetensors", load_folder(|f| drop(f.insert("model.safetensors".into(), half))), Format, &["model.safetensors", "safetensors"]);
    let mut huge_header = st.clone();
    huge_header[..8].copy_from_slice(&100_000_000_000u64.to_le_bytes());
    refused("header length of 100 GB", load_folder(|f| drop(f.insert("model.safetensors".into(), huge_header))), Format, &["model.safetensors"]);
    let claim = safetensors_with(r#"{"model.embed_tokens.weight":{"dtype":"F32","shape":[100000,250000],"data_offsets":[0,100000000000]}}"#, &[0; 64]);
    refused("a tensor claiming 100 GB", load_folder(|f| drop(f.insert("model.safetensors".into(), claim))), Format, &["model.safetensors"]);
    refused("config.json not JSON", load_folder(|f| drop(f.insert("config.json".into(), b"{\"hidden_size\": 64,".to_vec()))), Config, &["config.json"]);
    refused(
        "config.json absurd layer count",
        load_folder(|f| drop(f.insert("config.json".into(), config_with("num_hidden_layers", 1_000_000_000_000u64.into())))),
        Config,
        &["config.json", "num_hidden_layers"],
    );
    refused("config.json absurd vocabulary", load_folder(|f| drop(f.insert("config.json".into(), config_with("vocab_size", (1u64 << 40).into())))), Config, &["vocab_size"]);
    refused(
        "config.json unknown architecture",
        load_folder(|f| drop(f.insert("config.json".into(), config_with("model_type", "gpt_neox".into())))),
        Unsupported,
        &["config.json", "gpt_neox"],
    );
    refused(
        "config.json sizes the weights do not have",
        load_folder(|f| drop(f.insert("config.json".into(), config_with("intermediate_size", 4096.into())))),
        Shape,
        &["mlp.gate_proj.weight"],
    );
    refused("config.json missing", load_folder(|f| drop(f.remove("config.json"))), Io, &["config.json"]);
    refused("tokenizer.json garbage", load_folder(|f| drop(f.insert("tokenizer.json".into(), b"{\"model\": 3}".to_vec()))), Parse, &["tokenizer.json"]);
    refused("tokenizer.json not UTF-8", load_folder(|f| drop(f.insert("tokenizer.json".into(), vec![0xff, 0xfe, 0x00]))), Format, &["tokenizer.json", "UTF-8"]);
    let bad_dtype = safetensors_with(r#"{"model.norm.weight":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#, &[1, 2, 3, 4]);
    refused("integer weights", load_folder(|f| drop(f.insert("model.safetensors".into(), bad_dtype))), Unsupported, &["model.norm.weight", "dtype"]);
}

fn gguf(bytes: Vec<u8>) -> Result<Session> {
    Session::load(&ModelFiles::from_named(BTreeMap::from([("tiny.gguf".to_string(), bytes)]))?, compute())
}

#[test]
fn gguf_files() {
    let g = read("tiny-gguf/tiny-q4_0.gguf");
    refused("truncated GGUF", gguf(g[..g.len() - 1000].to_vec()), Format, &["tiny.gguf", "truncated"]);
    refused("GGUF cut inside the header", gguf(g[..100].to_vec()), Format, &["tiny.gguf"]);
    let mut magic = g.clone();
    magic[..4].copy_from_slice(b"GGML");
    refused("bad magic", gguf(magic), Format, &["tiny.gguf", "magic"]);
    let mut version = g.clone();
    version[4..8].copy_from_slice(&7u32.to_le_bytes());
    refused("GGUF version 7", gguf(version), Unsupported, &["version 7"]);
    let mut count = g.clone();
    count[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    refused("tensor count 2^64-1", gguf(count), Format, &["tensor count"]);
    // The first tensor's shape, claimed at 100 G elements: refused by size, not attempted.
    let parsed = Gguf::parse(&g).unwrap();
    let first = parsed.tensors.values().map(|t| t.name.clone()).next().unwrap();
    let at = g.windows(first.len()).position(|w| w == first.as_bytes()).unwrap() + first.len();
    let mut shape = g.clone();
    shape[at + 4..at + 12].copy_from_slice(&100_000_000_000u64.to_le_bytes());
    refused("a GGUF tensor claiming 100 G elements", gguf(shape), Format, &["tiny.gguf"]);
}

fn adapter(config: &str, weights: &[u8]) -> Result<()> {
    let mut s = common::tiny();
    s.load_adapter("x", config, weights)
}

#[test]
fn adapters() {
    let cfg = std::fs::read_to_string(fixture("tiny-adapters/qv/adapter_config.json")).unwrap();
    let w = read("tiny-adapters/qv/adapter_model.safetensors");
    adapter(&cfg, &w).expect("the fixture itself loads");
    let with = |k: &str, v: serde_json::Value| {
        let mut c: serde_json::Value = serde_json::from_str(&cfg).unwrap();
        c[k] = v;
        c.to_string()
    };
    refused("adapter_config.json not JSON", adapter("{\"r\": 8", &w), Parse, &["adapter_config.json"]);
    refused("unknown method", adapter(&with("peft_type", "LOHA".into()), &w), Unsupported, &["LOHA"]);
    refused("a misspelt key", adapter(&with("lora_alpah", 16.into()), &w), Config, &["adapter_config.json", "lora_alpah"]);
    adapter(&with("some_future_flag", false.into()), &w).expect("an unknown key left unset loads");
    refused("a peft feature not implemented", adapter(&with("use_bdlora", true.into()), &w), Unsupported, &["BD-LoRA"]);
    refused("r = 10^12", adapter(&with("r", 1_000_000_000_000u64.into()), &w), Config, &["adapter_config.json", "reduce r"]);
    refused("r not matching the weights", adapter(&with("r", 3.into()), &w), Shape, &["lora_A"]);
    refused("truncated adapter_model.safetensors", adapter(&cfg, &w[..w.len() - 7]), Format, &["adapter_model.safetensors"]);
    refused("adapter_model.safetensors empty", adapter(&cfg, &[]), Format, &["adapter_model.safetensors"]);
    let pt = r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 10000000000, "token_dim": 64}"#;
    refused("10^10 virtual tokens", adapter(pt, &w), Config, &["num_virtual_tokens"]);
    let mut s = common::tiny();
    let p = serde_json::json!({"peft_type": "P_TUNING", "num_virtual_tokens": 4, "encoder_hidden_size": 1u64 << 40});
    refused("a 2^40-wide p-tuning encoder", s.add_adapter("p", &p, 0), Config, &["encoder_hidden_size"]);
}

#[test]
fn data_files() {
    refused("JSONL with a broken line", parse_data_file("d.jsonl", "{\"text\": \"a\"}\n{\"text\": \"b\"\n"), Data, &["d.jsonl", "line 2", "JSON"]);
    refused("JSONL without text", parse_data_file("d.jsonl", "{\"txt\": \"a\"}\n"), Data, &["d.jsonl", "line 1"]);
    refused("CSV with a ragged row", parse_data_file("d.csv", "text,id\na,1\nb,2,3\n"), Data, &["d.csv"]);
    refused("CSV without a text column", parse_data_file("d.csv", "body\na\n"), Data, &["d.csv", "text"]);
    refused("CSV with labels", parse_data_file("d.csv", "text,label\na,spam\n"), Unsupported, &["d.csv", "label"]);
    refused("an empty file", parse_data_file("d.txt", "\n \n"), Data, &["d.txt", "empty"]);
    refused("CSV header only", parse_data_file("d.csv", "text\n"), Data, &["d.csv", "empty"]);
    // Classification rows and embedding pairs.
    use webpeft::train::classify::parse_labeled_file;
    use webpeft::train::contrastive::parse_pairs_file;
    refused("labelled CSV without a label column", parse_labeled_file("l.csv", "text,tag\na,b\n"), Data, &["l.csv", "label"]);
    refused("labelled CSV with an empty label", parse_labeled_file("l.csv", "text,label\na, \n"), Data, &["l.csv", "empty label"]);
    refused("labelled JSONL with a list label", parse_labeled_file("l.jsonl", "{\"text\": \"a\", \"label\": [1]}\n"), Data, &["l.jsonl", "line 1", "label"]);
    refused("labelled data as plain text", parse_labeled_file("l.txt", "a\n"), Data, &["l.txt", "label"]);
    refused("labelled CSV header only", parse_labeled_file("l.csv", "text,label\n"), Data, &["l.csv", "no examples"]);
    refused("one pair only", parse_pairs_file("p.jsonl", "{\"anchor\": \"a\", \"positive\": \"b\"}\n"), Data, &["p.jsonl", "two pairs"]);
    refused("pairs without positives", parse_pairs_file("p.csv", "anchor,other\na,b\n"), Data, &["p.csv", "positive"]);
}

/// Every input that once crashed a fuzzer (fuzz/regressions/<target>/) is refused cleanly
/// through the same entry point, so the fix stays in place without nightly Rust.
#[test]
fn fuzz_regressions() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut n = 0;
    for dir in std::fs::read_dir(&root).unwrap() {
        let dir = dir.unwrap().path();
        let target = dir.file_name().unwrap().to_str().unwrap().to_string();
        for f in std::fs::read_dir(&dir).unwrap() {
            let path = f.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let text = || String::from_utf8_lossy(&bytes).into_owned();
            let r: Result<()> = match target.as_str() {
                "tokenizer_json" => webpeft::tokenizer::Tokenizer::from_json(&text(), None, None, None).map(drop),
                "config_json" => webpeft::models::config::LlamaConfig::from_json(&text()).map(drop),
                "safetensors" => webpeft::io::safetensors::read_all_f32(&bytes).map(drop),
                "gguf" => gguf(bytes.clone()).map(drop),
                other => panic!("no replay for fuzz target {other}"),
            };
            eprintln!("{}: {:?}", path.display(), r.as_ref().err().map(ToString::to_string));
            n += 1;
        }
    }
    assert!(n > 0, "no regression inputs found under {}", root.display());
}
