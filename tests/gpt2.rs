#![cfg(not(target_family = "wasm"))]
//! GPT-2 against transformers + peft (fixtures from scripts/fixtures/make_family_fixtures.py,
//! tiny-gpt2/): the forward pass on a padded batch, a peft LoRA on the Conv1D layers
//! (`fan_in_fan_out`), one AdamW step of it on the causal-LM loss, generation with the KV
//! cache, GPT-2 as a classifier, and what is refused.

mod common;

use common::*;
use webpeft::generate::GenerateOptions;
use webpeft::io::safetensors::read_all_f32;
use webpeft::io::source::ModelFiles;
use webpeft::models::hooks::NoHook;
use webpeft::models::llama::{Inputs, KvCache};
use webpeft::session::Session;
use webpeft::tensor::{block_on, ints, read};
use webpeft::train::data::Batch;
use webpeft::train::{AdamWConfig, TrainConfig, Trainer};

fn gpt2() -> Session {
    Session::load(&ModelFiles::from_path(&fixture("tiny-gpt2")).unwrap(), compute()).unwrap()
}

/// Logits of the fixture batch, only at real (unpadded) positions.
fn real_logits(s: &Session, adapters: &[&str]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let fx = load("tiny-gpt2/expected.safetensors");
    let (shape, ids) = &fx.i64["input_ids"];
    let mask = fx.i64["attention_mask"].1.clone();
    let inputs = Inputs { ids: ints(ids.clone(), [shape[0], shape[1]], &s.model.device), attention_mask: Some(mask.clone()) };
    let got = block_on(read(s.model.forward(&inputs, &s.stack(adapters).unwrap(), None).unwrap())).unwrap().data;
    let v = s.model.config.vocab_size;
    let keep = |x: &[f32]| -> Vec<f32> { x.chunks(v).zip(&mask).filter(|(_, m)| **m == 1).flat_map(|(c, _)| c.to_vec()).collect() };
    (keep(&got), keep(&fx.f32["logits"].data), keep(&fx.f32["lora_logits"].data))
}

#[test]
fn tiny_gpt2_logits_match_transformers() {
    let s = gpt2();
    assert!(s.model.config.is_gpt2() && s.model.positions.is_some());
    let (got, want, _) = real_logits(&s, &[]);
    assert_close("tiny GPT-2 logits (padded batch, real positions)", &got, &want, 1e-4);
    // The KV cache: prompt then one token at a time gives the full pass's last logits.
    let fx = load("tiny-gpt2/expected.safetensors");
    let ids: Vec<i64> = fx.i64["input_ids"].1[..10].to_vec();
    let dev = &s.model.device;
    let mut cache = KvCache::default();
    let first = s.model.forward(&Inputs { ids: ints(ids[..6].to_vec(), [1, 6], dev), attention_mask: None }, &NoHook, Some(&mut cache)).unwrap();
    let mut last = None;
    for &i in &ids[6..] {
        last = Some(block_on(read(s.model.forward(&Inputs { ids: ints(vec![i], [1, 1], dev), attention_mask: None }, &NoHook, Some(&mut cache)).unwrap())).unwrap().data);
    }
    drop(first);
    let v = s.model.config.vocab_size;
    assert_close("GPT-2 with the KV cache (learned positions past the cache)", &last.unwrap(), &fx.f32["logits"].data[9 * v..10 * v], 1e-4);
}

#[test]
fn peft_lora_on_conv1d_loads_trains_and_round_trips() {
    let mut s = gpt2();
    load_dir(&mut s, "lora", "tiny-gpt2/lora");
    let (got, _, want) = real_logits(&s, &["lora"]);
    assert_close("tiny GPT-2 + peft LoRA (c_attn, mlp.c_fc; fan_in_fan_out)", &got, &want, 1e-4);
    // Saved again: peft's keys and fan_in_fan_out = true, as peft writes it for Conv1D.
    let (cfg, bytes) = block_on(s.save_adapter("lora")).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(cfg["fan_in_fan_out"], true);
    let theirs = read_all_f32(&std::fs::read(fixture("tiny-gpt2/lora/adapter_model.safetensors")).unwrap()).unwrap();
    let ours = read_all_f32(&bytes).unwrap();
    assert_eq!(ours, theirs, "bit-identical, key by key");
    // One AdamW step on the causal-LM loss.
    let fx = load("tiny-gpt2/expected.safetensors");
    let (shape, ids) = &fx.i64["input_ids"];
    let batch = Batch { batch: shape[0], len: shape[1], input_ids: ids.clone(), attention_mask: fx.i64["attention_mask"].1.clone(), labels: fx.i64["labels"].1.clone(), tasks: vec![] };
    let hp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("tiny-gpt2/train.json")).unwrap()).unwrap();
    let mut tr =
        Trainer::new(TrainConfig { optim: AdamWConfig { lr: hp["lr"].as_f64().unwrap(), weight_decay: hp["weight_decay"].as_f64().unwrap(), ..Default::default() }, ..Default::default() });
    let a = s.adapters.get_mut("lora").unwrap();
    webpeft::peft::set_trainable(a, true);
    let st = block_on(tr.step(&s.model, a, std::slice::from_ref(&batch))).unwrap();
    webpeft::peft::set_trainable(a, false);
    let d = (st.loss as f64 - hp["loss"].as_f64().unwrap()).abs();
    eprintln!("GPT-2 LM loss {} vs torch {}: |d| = {d:.2e}", st.loss, hp["loss"]);
    assert!(d < 1e-5);
    let (_, bytes) = block_on(s.save_adapter("lora")).unwrap();
    let want = load("tiny-gpt2/train.safetensors");
    for (k, t) in read_all_f32(&bytes).unwrap() {
        assert_close(&format!("after one step: {k}"), &t.data, &want.f32[&k].data, 5e-5);
        assert!(max_abs_diff(&theirs[&k].data, &want.f32[&k].data) > 1e-3, "{k} moved");
    }
    // Merged into the Conv1D weights, the adapter gives the same logits.
    let before = real_logits(&s, &["lora"]).0;
    s.merge_adapter("lora").unwrap();
    assert_close("GPT-2 LoRA merged into the weights", &real_logits(&s, &[]).0, &before, 2e-5);
}

#[test]
fn gpt2_trains_generates_and_classifies() {
    let mut s = gpt2();
    let cfg = serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"]});
    s.add_adapter("a", &cfg, 0).unwrap();
    assert_eq!(s.adapters["a"].method(), "lora");
    let examples: Vec<_> =
        ["Beautiful is better than ugly.", "Explicit is better than implicit.", "Simple is better than complex."].iter().map(|t| webpeft::train::Example::Text(t.to_string())).collect();
    let o = webpeft::session::TrainOptions { steps: 12, batch: 3, seq_len: 32, lr: 3e-2, ..Default::default() };
    let r = block_on(s.train("a", &examples, &o, |_| true)).unwrap();
    let (first, last) = (r[0].stats.loss, r.last().unwrap().stats.loss);
    eprintln!("GPT-2 LoRA training: loss {first:.4} -> {last:.4}");
    assert!(last < first * 0.7, "{first} -> {last}");
    let g = GenerateOptions { max_new_tokens: 8, temperature: 0.0, top_p: 1.0, seed: 0, stop: None };
    let text = block_on(s.generate("Beautiful is", false, &g, &["a"], |_| true)).unwrap();
    assert!(!text.is_empty());
    // Only LoRA so far: other methods and options are refused with a clear error.
    for (cfg, what) in [
        (serde_json::json!({"peft_type": "IA3", "target_modules": ["c_attn"], "feedforward_modules": []}), "IA3"),
        (serde_json::json!({"peft_type": "LORA", "target_modules": ["c_attn"], "use_dora": true}), "DoRA"),
        (serde_json::json!({"peft_type": "LORA", "target_modules": ["c_attn"], "modules_to_save": ["lm_head"]}), "modules_to_save"),
    ] {
        let e = s.add_adapter("x", &cfg, 0).unwrap_err();
        assert!(e.to_string().contains(what) && e.code == webpeft::ErrorCode::Unsupported, "{e}");
    }
    assert!(block_on(s.export_model()).unwrap_err().to_string().contains("GPT-2"));
    // GPT-2 as a classifier (GPT2ForSequenceClassification: a score head on the last token).
    use webpeft::task::{ClassifyOptions, TaskKind, TaskSession};
    let mut c = TaskSession::load(&ModelFiles::from_path(&fixture("tiny-gpt2")).unwrap(), compute(), TaskKind::Classification).unwrap();
    let lora = webpeft::peft::lora::LoraConfig::from_value(&serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]})).unwrap();
    c.add_lora(lora, 0).unwrap();
    let rows: Vec<_> =
        (0..12).map(|i| webpeft::train::classify::Labeled { text: ["free cash now", "dinner tonight?", "meeting moved"][i % 3].into(), label: ["a", "b", "c"][i % 3].into() }).collect();
    let rep = block_on(c.train_classifier(&rows, &ClassifyOptions { epochs: 5, batch: 6, lr: 5e-2, val_fraction: 0.25, ..Default::default() }, |_| true)).unwrap();
    assert!(rep.epochs.last().unwrap().train_loss < rep.epochs[0].train_loss);
    let files = block_on(c.save_adapter()).unwrap();
    let keys: Vec<String> = read_all_f32(&files[1].1).unwrap().into_keys().collect();
    assert!(keys.contains(&"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight".to_string()) && keys.contains(&"base_model.model.score.weight".to_string()), "{keys:?}");
}

#[test]
fn gpt2_config_refusals() {
    let cfg = std::fs::read_to_string(fixture("tiny-gpt2/config.json")).unwrap();
    for (text, word) in [
        (cfg.replace("\"gelu_new\"", "\"relu\""), "activation_function"),
        (cfg.replace("\"scale_attn_by_inverse_layer_idx\": false", "\"scale_attn_by_inverse_layer_idx\": true"), "scale_attn_by_inverse_layer_idx"),
        (cfg.replace("\"n_layer\": 2", "\"n_layer\": 100000"), "num_hidden_layers"),
        (cfg.replace("\"tie_word_embeddings\": true", "\"tie_word_embeddings\": false"), "untied"),
    ] {
        let e = webpeft::models::config::LlamaConfig::from_json(&text).unwrap_err();
        assert!(e.to_string().contains(word), "{e} should name {word}");
    }
    // Longer than n_positions: an error, not a panic.
    let s = gpt2();
    let ids = ints(vec![5; 200], [1, 200], &s.model.device);
    let e = s.model.forward(&Inputs { ids, attention_mask: None }, &NoHook, None).err().unwrap();
    assert!(e.to_string().contains("n_positions"), "{e}");
}
