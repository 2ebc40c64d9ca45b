#![cfg(not(target_family = "wasm"))]
//! Forward pass, loaders and tokenizer against transformers (fixtures from
//! scripts/fixtures/make_fixtures.py).

mod common;

use std::collections::BTreeMap;

use common::*;
use webpeft::io::source::ModelFiles;
use webpeft::models::attention::AttentionImpl;
use webpeft::models::hooks::NoHook;
use webpeft::models::llama::{Inputs, Llama};
use webpeft::session::Session;
use webpeft::tensor::{block_on, ints, read};

fn tiny(name: &str) -> Session {
    Session::load(&ModelFiles::from_path(&fixture(name)).unwrap(), compute()).unwrap()
}

fn logits(model: &Llama, ids: &(Vec<usize>, Vec<i64>), mask: Option<&(Vec<usize>, Vec<i64>)>) -> Vec<f32> {
    let inputs = Inputs { ids: ints(ids.1.clone(), [ids.0[0], ids.0[1]], &model.device), attention_mask: mask.map(|m| m.1.clone()) };
    block_on(read(model.forward(&inputs, &NoHook, None).unwrap())).unwrap().data
}

#[test]
fn tiny_llama_logits_match_transformers() {
    let fx = load("tiny-logits.safetensors");
    // Every attention implementation (the blocked one and the fused kernels run on a GPU
    // only; the blocked one here a query row per block, which only this test runs).
    webpeft::models::attention::blocked::set_block_bytes(1);
    let imps = [AttentionImpl::Reference, AttentionImpl::Blocked, AttentionImpl::Fused];
    for (dir, key, imp) in [("tiny-llama", "tiny"), ("tiny-llama-bias", "bias")].into_iter().flat_map(|(d, k)| imps.map(|i| (d, k, i))) {
        let mut s = tiny(dir);
        s.model.attention = imp;
        let got = logits(&s.model, &fx.i64[&format!("{key}.input_ids")], None);
        assert_close(&format!("{dir} logits"), &got, &fx.f32[&format!("{key}.logits")].data, 1e-4);
        // Right padding: compare only the real (unpadded) positions.
        let mask = &fx.i64[&format!("{key}.attention_mask")];
        let got = logits(&s.model, &fx.i64[&format!("{key}.masked_input_ids")], Some(mask));
        let want = &fx.f32[&format!("{key}.masked_logits")].data;
        let v = s.model.config.vocab_size;
        let keep = |x: &[f32]| -> Vec<f32> { x.chunks(v).zip(&mask.1).filter(|(_, m)| **m == 1).flat_map(|(c, _)| c.to_vec()).collect() };
        assert_close(&format!("{dir} padded logits"), &keep(&got), &keep(want), 1e-4);
    }
}

#[test]
fn tiny_qwen2_logits_match_transformers() {
    // Qwen2: biases on q/k/v (none on o_proj), rope_theta 1e6 under rope_parameters; the tied
    // variant also has linear RoPE scaling; plus a peft LoRA on q/k/v.
    for (dir, adapter) in [("tiny-qwen2", Some("tiny-qwen2/lora")), ("tiny-qwen2-tied", None)] {
        let mut s = tiny(dir);
        assert_eq!(s.model.config.model_type, "qwen2");
        assert!(s.model.config.qkv_bias && !s.model.config.o_bias);
        let fx = load(&format!("{dir}/expected.safetensors"));
        let got = logits(&s.model, &fx.i64["input_ids"], None);
        assert_close(&format!("{dir} logits"), &got, &fx.f32["logits"].data, 1e-4);
        if let Some(a) = adapter {
            load_dir(&mut s, "lora", a);
            let want = load(&format!("{a}/expected.safetensors"));
            assert_close(&format!("{dir} + peft LoRA"), &logits_with_ids(&s, "lora", &want.i64["input_ids"]), &want.f32["logits"].data, 1e-4);
        }
    }
    let cfg = std::fs::read_to_string(fixture("tiny-qwen2/config.json")).unwrap();
    let e = webpeft::models::config::LlamaConfig::from_json(&cfg.replace("\"use_sliding_window\": false", "\"use_sliding_window\": true")).unwrap_err();
    assert!(e.message.contains("sliding"), "{e}");
}

fn logits_with_ids(s: &Session, adapter: &str, ids: &(Vec<usize>, Vec<i64>)) -> Vec<f32> {
    let inputs = Inputs { ids: ints(ids.1.clone(), [ids.0[0], ids.0[1]], &s.model.device), attention_mask: None };
    block_on(read(s.model.forward(&inputs, &s.adapters[adapter], None).unwrap())).unwrap().data
}

#[test]
fn tiny_gguf_all_types_match_transformers() {
    let fx = load("tiny-gguf/logits.safetensors");
    let ids = &fx.i64["input_ids"];
    for ty in ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"] {
        let s = Session::load(&ModelFiles::from_path(&fixture(&format!("tiny-gguf/tiny-{ty}.gguf"))).unwrap(), compute()).unwrap();
        assert_close(&format!("gguf {ty}"), &logits(&s.model, ids, None), &fx.f32[ty].data, 1e-4);
    }
}

#[test]
fn in_memory_files_equal_folder() {
    let dir = fixture("tiny-llama");
    let mut files = BTreeMap::new();
    for n in ["config.json", "model.safetensors", "tokenizer.json"] {
        files.insert(format!("some/prefix/{n}"), std::fs::read(dir.join(n)).unwrap());
    }
    let a = Session::load(&ModelFiles::from_named(files).unwrap(), compute()).unwrap();
    let fx = load("tiny-logits.safetensors");
    assert_close("from bytes", &logits(&a.model, &fx.i64["tiny.input_ids"], None), &fx.f32["tiny.logits"].data, 1e-4);
}

#[test]
fn tiny_tokenizer_matches_transformers() {
    let s = tiny("tiny-llama");
    check_tokenizer(&s, "tiny-tokenizer.json");
}

fn check_tokenizer(s: &Session, file: &str) {
    let cases: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(fixture(file)).unwrap()).unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(s.tokenizer.encode(text).unwrap(), want, "text {text:?}");
    }
}

#[test]
fn smollm2_tokenizer_logits_and_greedy_generation() {
    let Some(path) = smollm2_path() else { return };
    let s = Session::load(&ModelFiles::from_path(&path).unwrap(), compute()).unwrap();
    check_tokenizer(&s, "smollm2-tokenizer.json");
    let fx = load("smollm2-logits.safetensors");
    for p in ["p0", "p1", "p2"] {
        assert_close(&format!("smollm2 {p}"), &logits(&s.model, &fx.i64[&format!("{p}.input_ids")], None), &fx.f32[&format!("{p}.logits")].data, 1e-3);
    }
    let g: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("smollm2-generate.json")).unwrap()).unwrap();
    let prompt: Vec<u32> = g["prompt_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let want: Vec<u32> = g["new_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let opts = webpeft::generate::GenerateOptions { max_new_tokens: want.len(), ..Default::default() };
    let got = block_on(webpeft::generate::generate(&s.model, &NoHook, &prompt, &opts, |_| true)).unwrap();
    assert_eq!(got, want, "greedy continuation");
    // The chat template renders as transformers' apply_chat_template.
    let cases: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(fixture("smollm2-tokenizer.json")).unwrap()).unwrap();
    if let Some(chat) = cases.iter().find(|c| c.get("chat_messages").is_some()) {
        let msgs: Vec<(String, String)> = chat["chat_messages"].as_array().unwrap().iter().map(|m| (m["role"].as_str().unwrap().into(), m["content"].as_str().unwrap().into())).collect();
        assert_eq!(s.tokenizer.apply_chat_template(&msgs, true).unwrap(), chat["text"].as_str().unwrap());
    }
}

#[test]
fn bad_model_files_give_clear_errors() {
    let dir = fixture("tiny-llama");
    let cfg = std::fs::read(dir.join("config.json")).unwrap();
    let weights = std::fs::read(dir.join("model.safetensors")).unwrap();
    let tok = std::fs::read(dir.join("tokenizer.json")).unwrap();
    let load_named = |files: Vec<(&str, Vec<u8>)>| {
        let m: BTreeMap<String, Vec<u8>> = files.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        ModelFiles::from_named(m).and_then(|f| Session::load(&f, compute()).map(|_| ()))
    };
    // Truncated weights.
    let e = load_named(vec![("config.json", cfg.clone()), ("model.safetensors", weights[..weights.len() / 2].to_vec()), ("tokenizer.json", tok.clone())]).unwrap_err();
    assert!(e.message.contains("safetensors"), "{e}");
    // Unknown architecture.
    let bad = String::from_utf8(cfg.clone()).unwrap().replace("\"llama\"", "\"bert\"");
    let e = load_named(vec![("config.json", bad.into_bytes()), ("model.safetensors", weights.clone()), ("tokenizer.json", tok.clone())]).unwrap_err();
    assert!(e.message.contains("not supported"), "{e}");
    // Wrong shape: claim a bigger hidden size.
    let bad = String::from_utf8(cfg.clone()).unwrap().replace("\"intermediate_size\": 128", "\"intermediate_size\": 96");
    let e = load_named(vec![("config.json", bad.into_bytes()), ("model.safetensors", weights.clone()), ("tokenizer.json", tok.clone())]).unwrap_err();
    assert!(e.message.contains("shape"), "{e}");
    // Missing config.
    let e = load_named(vec![("model.safetensors", weights)]).unwrap_err();
    assert!(e.message.contains("config.json"), "{e}");
    // Truncated GGUF.
    let g = std::fs::read(fixture("tiny-gguf/tiny-q4_1.gguf")).unwrap();
    for cut in [10, 200, g.len() / 2, g.len() - 1] {
        let e = load_named(vec![("m.gguf", g[..cut].to_vec())]).unwrap_err();
        assert!(e.message.contains("GGUF") || e.message.contains("truncated"), "cut {cut}: {e}");
    }
}

#[test]
fn smollm2_peft_adapter_matches_peft() {
    let Some(path) = smollm2_path() else { return };
    let mut s = Session::load(&ModelFiles::from_path(&path).unwrap(), compute()).unwrap();
    let d = fixture("smollm2-adapter");
    let cfg = std::fs::read_to_string(d.join("adapter_config.json")).unwrap();
    s.load_adapter("a", &cfg, &std::fs::read(d.join("adapter_model.safetensors")).unwrap()).unwrap();
    let fx = load("smollm2-adapter/expected.safetensors");
    let ids: Vec<u32> = fx.i64["input_ids"].1.iter().map(|&i| i as u32).collect();
    let got = block_on(s.logits(&ids, &["a"])).unwrap();
    assert_close("smollm2 + peft LoRA", &got.data, &fx.f32["logits"].data, 1e-3);
}

#[test]
fn sharded_safetensors_folder_loads() {
    use webpeft::io::safetensors::{OutTensor, read_all_f32, write};
    let dir = fixture("tiny-llama");
    let all = read_all_f32(&std::fs::read(dir.join("model.safetensors")).unwrap()).unwrap();
    let tmp = std::env::temp_dir().join(format!("webpeft-shards-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let mut shards = [BTreeMap::new(), BTreeMap::new()];
    let mut weight_map = serde_json::Map::new();
    for (i, (k, v)) in all.into_iter().enumerate() {
        let name = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        weight_map.insert(k.clone(), name.into());
        shards[i % 2].insert(k, OutTensor::F32(v));
    }
    for (i, s) in shards.iter().enumerate() {
        std::fs::write(tmp.join(format!("model-0000{}-of-00002.safetensors", i + 1)), write(s, None).unwrap()).unwrap();
    }
    std::fs::write(tmp.join("model.safetensors.index.json"), serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string()).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(dir.join(f), tmp.join(f)).unwrap();
    }
    let s = Session::load(&ModelFiles::from_path(&tmp).unwrap(), compute()).unwrap();
    let fx = load("tiny-logits.safetensors");
    assert_close("sharded", &logits(&s.model, &fx.i64["tiny.input_ids"], None), &fx.f32["tiny.logits"].data, 1e-4);
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn smollm2_chat_examples_tokenize_as_transformers_and_train_only_assistant_turns() {
    use webpeft::train::data::{Example, IGNORE, tokenize};
    let Some(path) = smollm2_path() else { return };
    let bytes = std::fs::read(&path).unwrap();
    let tok = webpeft::tokenizer::Tokenizer::from_gguf(&webpeft::io::gguf::Gguf::parse(&bytes).unwrap()).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(fixture("smollm2-chat-sft.json")).unwrap()).unwrap();
    assert!(cases.len() >= 3);
    let nums = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect::<Vec<i64>>();
    for c in &cases {
        let ex = Example::from_json(c).unwrap();
        let t = tokenize(&tok, &ex, false, 4096).unwrap();
        let want_ids: Vec<u32> = nums(&c["ids"]).iter().map(|&x| x as u32).collect();
        assert_eq!(t.ids, want_ids, "ids of {}", c["text"]);
        assert_eq!(t.labels, nums(&c["labels"]), "labels of {}", c["text"]);
        // Cut to a shorter window: the same prefix.
        let cut = tokenize(&tok, &ex, false, 20).unwrap();
        assert_eq!((cut.ids.as_slice(), cut.labels.as_slice()), (&t.ids[..20], &t.labels[..20]));
    }
    assert!(cases.iter().any(|c| nums(&c["labels"]).iter().filter(|&&l| l != IGNORE).count() > 10));
    // Nothing to train on, or no template: clear errors.
    let e = tokenize(&tok, &Example::Chat { messages: vec![("user".into(), "hi".into())] }, false, 64).unwrap_err();
    assert!(e.message.contains("no assistant message"), "{e}");
}

#[test]
fn the_loss_over_chunks_of_logits_equals_one_projection() {
    // The loss projects a long sequence's positions onto the vocabulary a chunk at a time
    // (`loss::LOGIT_CHUNK_BYTES`); the log-probabilities and their gradients must be those of
    // one projection of all positions. 7 positions, chunks of 3 (3 + 3 + 1) and of 1.
    use webpeft::train::loss::target_log_probs_chunked;
    let s = tiny("tiny-llama");
    let (m, h, v) = (7, s.model.config.hidden_size, s.model.config.vocab_size);
    let x = webpeft::tensor::floats(values(m * h, 5), [m, h], &s.model.device);
    let targets: Vec<i64> = (0..m as i64).map(|i| (i * 37 + 11) % v as i64).collect();
    let run = |chunk: usize| {
        let x = x.clone().autodiff().require_grad();
        let lp = target_log_probs_chunked(&s.model, &NoHook, x.clone(), &targets, chunk);
        // Weighted, so that each position's gradient differs.
        let w = webpeft::tensor::floats((1..=m).map(|i| i as f32).collect(), [m, 1], &s.model.device);
        let grads = (lp.clone() * w).sum().backward();
        let g = x.grad(&grads).expect("the log-probabilities depend on the hidden states");
        (block_on(read(lp.without_autodiff())).unwrap().data, block_on(read(g)).unwrap().data)
    };
    let (lp, g) = run(m);
    assert_eq!(lp.len(), m);
    for chunk in [3, 1] {
        let (lpc, gc) = run(chunk);
        assert_close(&format!("log-probs, chunks of {chunk}"), &lpc, &lp, 1e-5);
        assert_close(&format!("d/dhidden, chunks of {chunk}"), &gc, &g, 1e-5);
    }
}

/// The FLOP count of a training step (`train::flops`) on the tiny Llama against counts made
/// by hand from its config.json (hidden 64, 4 heads × 16, 2 KV heads, MLP 128, 2 layers,
/// vocabulary 512, untied): the matrices are every parameter but the norms and the embedding
/// table; LoRA adds 6 FLOPs per parameter and token; prompt tuning's virtual tokens cost what
/// real tokens cost and add nothing of their own; IA3 adds nothing; `estimate` counts the
/// rows of the whole optimizer step.
#[test]
fn a_training_steps_flops_follow_the_formula() {
    use webpeft::train::flops::{matrix_parameters, training_step};
    let mut s = common::tiny();
    let per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128;
    let n = 2 * per_layer + 512 * 64;
    assert_eq!(matrix_parameters(&s.model), n);
    assert_eq!(matrix_parameters(&s.model), s.model.num_parameters() - (2 * 2 + 1) * 64 - 512 * 64);
    let (b, t) = (3usize, 10usize);
    let attention = |t: usize| (2 * b * t * t * 64) as f64;
    let forward = |t: usize| 2.0 * (n * b * t) as f64 + 4.0 * attention(t);
    let backward = |t: usize| 2.0 * (n * b * t) as f64 + 8.0 * attention(t);
    let configs = [
        ("lora", serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})),
        ("prompt", serde_json::json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 5, "task_type": "CAUSAL_LM"})),
        ("ia3", serde_json::json!({"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]})),
    ];
    for (name, cfg) in &configs {
        s.add_adapter(name, cfg, 0).unwrap();
        let a = s.adapters.get_mut(*name).unwrap();
        let f = training_step(&s.model, a, b, t);
        let (tt, adapter) = match *name {
            // A and B of q_proj (64 -> 64) and v_proj (64 -> 32), rank 4, in both layers.
            "lora" => {
                let lora = 2 * 4 * ((64 + 64) + (64 + 32));
                assert_eq!(a.num_parameters(), lora);
                (t, 6.0 * (lora * b * t) as f64)
            }
            "prompt" => (t + 5, 0.0),
            _ => (t, 0.0),
        };
        assert_eq!((f.forward, f.backward, f.adapter), (forward(tt), backward(tt), adapter), "{name}");
        assert_eq!(f.total(), f.forward + f.backward + f.adapter);
    }
    let o = webpeft::session::TrainOptions { batch: 2, grad_accum: 3, seq_len: t, ..Default::default() };
    let e = block_on(s.estimate(&configs[0].1, &o, false)).unwrap();
    let a = s.adapters.get_mut("lora").unwrap();
    assert_eq!(e.step_flops, training_step(&s.model, a, 6, t));
}

/// `train::flops::matmul_peak` times each matmul it can run here and reports the best.
#[test]
fn the_peak_is_the_best_measured_matmul() {
    let c = compute();
    let p = block_on(webpeft::train::flops::matmul_peak(&c.device, &[64, 128], 2)).unwrap();
    let kernels: Vec<&str> = p.rates.iter().map(|r| r.kernel.as_str()).collect();
    assert!(kernels.contains(&"f32"), "{kernels:?}");
    assert_eq!(kernels.contains(&"q4_1"), c.is_gpu, "the dequantizing kernel runs on a GPU only: {kernels:?}");
    for r in &p.rates {
        assert!(r.seconds > 0.0 && (r.tflops - 2.0 * (r.n as f64).powi(3) / r.seconds / 1e12).abs() <= 1e-9 * r.tflops, "{r:?}");
    }
    assert_eq!(p.tflops, p.rates.iter().map(|r| r.tflops).fold(0.0, f64::max));
    assert!(block_on(webpeft::train::flops::matmul_peak(&c.device, &[], 2)).is_err());
}
