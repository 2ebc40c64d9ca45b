#![cfg(not(target_family = "wasm"))]
//! DoRA, prefix tuning (with and without projection), p-tuning and LN tuning against peft:
//! logits of peft's saved adapters, one AdamW step from the same start, generation.

mod common;

use common::*;
use webpeft::io::safetensors::read_all_f32;
use webpeft::models::hooks::NoHook;
use webpeft::peft::{AnyAdapter, load_params, read_params, set_trainable};
use webpeft::tensor::block_on;
use webpeft::train::data::Batch;
use webpeft::train::{AdamWConfig, TrainConfig, Trainer};

fn session(model: &str) -> webpeft::session::Session {
    let files = webpeft::io::source::ModelFiles::from_path(&fixture(model)).unwrap();
    webpeft::session::Session::load(&files, compute()).unwrap()
}

/// peft's logits for the fixture adapter `name`, real positions only (p-tuning's include
/// `virtual_first` virtual positions first).
fn check_logits(name: &str, virtual_first: usize) {
    check_logits_on("tiny-llama", "tiny", name, virtual_first)
}

fn check_logits_on(model: &str, ids_key: &str, name: &str, virtual_first: usize) {
    let mut s = session(model);
    load_dir(&mut s, name, &format!("tiny-adapters/{name}"));
    let w = &load(&format!("tiny-adapters/{name}/expected.safetensors")).f32["logits"];
    let (b, t_all, v) = (w.shape[0], w.shape[1], w.shape[2]);
    let want: Vec<f32> = (0..b).flat_map(|i| w.data[(i * t_all + virtual_first) * v..(i + 1) * t_all * v].to_vec()).collect();
    let fx = load("tiny-logits.safetensors");
    let (shape, ids) = &fx.i64[&format!("{ids_key}.input_ids")];
    let run = |a: &dyn webpeft::models::hooks::Adapter| {
        let inputs = webpeft::models::llama::Inputs { ids: webpeft::tensor::ints(ids.clone(), [shape[0], shape[1]], &s.model.device), attention_mask: None };
        block_on(webpeft::tensor::read(s.model.forward(&inputs, a, None).unwrap())).unwrap().data
    };
    assert!(max_abs_diff(&run(&NoHook), &want) > 0.1, "{name} must change the logits");
    assert_close(&format!("{name} logits"), &run(&s.adapters[name]), &want, 1e-4);
    // What we save is what peft saved.
    let (cfg, bytes) = block_on(s.save_adapter(name)).unwrap();
    let mut theirs = read_all_f32(&std::fs::read(fixture(&format!("tiny-adapters/{name}/adapter_model.safetensors"))).unwrap()).unwrap();
    // peft also stores the frozen embedding when LoRA targets it; we do not save frozen weights.
    theirs.retain(|k, _| !k.ends_with(".base_layer.weight"));
    let ours = read_all_f32(&bytes).unwrap();
    assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>(), "{name} keys");
    for (k, t) in &theirs {
        assert_close(&format!("{name} saved {k}"), &ours[k].data, &t.data, 1e-6);
    }
    s.load_adapter("again", &cfg, &bytes).unwrap();
}

#[test]
fn dora_logits_match_peft() {
    check_logits("dora", 0);
}

#[test]
fn prefix_tuning_logits_match_peft() {
    check_logits("prefix", 0);
    check_logits("prefix_proj", 0);
}

#[test]
fn p_tuning_logits_match_peft() {
    check_logits("ptuning", 4);
}

#[test]
fn ln_tuning_logits_match_peft() {
    check_logits("ln", 0);
}

/// One AdamW step from the fixture's `init.*` state on its batch; every trainable tensor
/// (and the saved adapter) must equal PyTorch's `step1.*`.
fn one_step(name: &str, train: &str, trainable_config: bool) {
    one_step_on("tiny-llama", name, train, trainable_config, None)
}

/// `config`: start from this config on the model itself (no adapter folder). Each case runs
/// twice: as is, and with gradient checkpointing (activations recomputed block by block),
/// both against PyTorch.
fn one_step_on(model: &str, name: &str, train: &str, trainable_config: bool, config: Option<serde_json::Value>) {
    for gradient_checkpointing in [false, true] {
        one_step_with(model, name, train, trainable_config, config.clone(), gradient_checkpointing);
    }
}

fn one_step_with(model: &str, name: &str, train: &str, trainable_config: bool, config: Option<serde_json::Value>, gradient_checkpointing: bool) {
    let name_ck = format!("{name}{}", if gradient_checkpointing { " (gradient checkpointing)" } else { "" });
    let mut s = session(model);
    let fx = load(train);
    let dir = fixture(&format!("tiny-adapters/{name}"));
    if let Some(cfg) = config {
        s.add_adapter(name, &cfg, 0).unwrap();
    } else if trainable_config {
        // Prompt encoders are not in the saved file: build the trainable form, then set it.
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
        cfg["inference_mode"] = false.into();
        s.add_adapter(name, &cfg, 0).unwrap();
    } else {
        load_dir(&mut s, name, &format!("tiny-adapters/{name}"));
    }
    let init: std::collections::BTreeMap<_, _> = fx.f32.iter().filter_map(|(k, v)| k.strip_prefix("init.").map(|k| (k.to_string(), v.clone()))).collect();
    let a = s.adapters.get_mut(name).unwrap();
    let n = load_params(a, &init).unwrap();
    assert!(n > 0 || init.is_empty(), "{name}: no parameter set from init.*");
    let (shape, ids) = &fx.i64["input_ids"];
    let batch = Batch { batch: shape[0], len: shape[1], input_ids: ids.clone(), attention_mask: fx.i64["attention_mask"].1.clone(), labels: fx.i64["labels"].1.clone(), tasks: vec![] };
    let mut tr = Trainer::new(TrainConfig {
        optim: AdamWConfig { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, ..Default::default() },
        gradient_checkpointing,
        ..Default::default()
    });
    set_trainable(a, true);
    let st = block_on(tr.step(&s.model, a, std::slice::from_ref(&batch))).unwrap();
    let want = fx.f32["loss_step0"].data[0];
    let key = name;
    let name = name_ck.as_str();
    eprintln!("{name}: loss {} vs torch {want}", st.loss);
    assert!((st.loss - want).abs() < 1e-5, "{name} loss {} vs {want}", st.loss);
    let mut checked = 0;
    // The largest gradient of any trainable tensor: the scale of the f32 accumulation noise.
    // (A tensor's own largest gradient is no scale for the small elements of a gradient that
    // sums many larger terms which nearly cancel: a bias's gradient sums its layer's output
    // gradients over every position, so its error follows their size, not its own. k_proj's
    // bias in lora_bias_all has elements of 7e-8 beside a largest of 0.14: the blocked
    // attention, which sums dk over the query heads of a group in one product, lands its
    // first Adam step 3.5e-3 from PyTorch's there.)
    let gmax = fx.f32.iter().filter(|(k, _)| k.starts_with("grad0.")).flat_map(|(_, g)| g.data.iter()).fold(0f32, |m, x| m.max(x.abs())) as f64;
    for (k, t) in block_on(read_params(a)).unwrap() {
        let want = &fx.f32[&format!("step1.{k}")].data;
        // A first Adam step is lr * g / (|g| + eps): its sensitivity to the gradient,
        // lr * eps / (|g| + eps)^2, is huge where |g| is near eps. Allow for a gradient error
        // of 1e-6 of the largest gradient (f32 accumulation noise) on top of 5e-5.
        match fx.f32.get(&format!("grad0.{k}")) {
            Some(g) => {
                let (mut worst, mut excess) = (0f64, 0f64);
                for ((a, b), g) in t.data.iter().zip(want).zip(&g.data) {
                    let d = (a - b).abs() as f64;
                    let sens = 1e-2 * 1e-8 / (g.abs() as f64 + 1e-8).powi(2);
                    let bound = 5e-5 + sens * 1e-6 * gmax;
                    worst = worst.max(d);
                    excess = excess.max(d / bound);
                }
                eprintln!("{name} step1 {k}: max |d| = {worst:.3e} (at most {excess:.2} of the sensitivity-aware bound)");
                assert!(excess <= 1.0, "{name} step1 {k}: |d| beyond the bound ({excess})");
            }
            None => {
                assert_close(&format!("{name} step1 {k}"), &t.data, want, 5e-5);
            }
        }
        checked += 1;
    }
    let (_, bytes) = block_on(s.save_adapter(key)).unwrap();
    // The saved file holds the same values (or, for prompt encoders, their output).
    for (k, t) in read_all_f32(&bytes).unwrap() {
        if !fx.f32.contains_key(&format!("grad0.{k}")) {
            assert_close(&format!("{name} saved after step {k}"), &t.data, &fx.f32[&format!("step1.{k}")].data, 5e-5);
        }
        checked += 1;
    }
    assert!(checked >= 2);
    let a = s.adapters.get_mut(key).unwrap();
    let after = block_on(tr.step(&s.model, a, std::slice::from_ref(&batch))).unwrap();
    assert!((after.loss - fx.f32["loss_step1"].data[0]).abs() < 1e-4, "{name} loss after one step");
}

#[test]
fn dora_one_step_matches_pytorch() {
    one_step("dora", "tiny-train-dora.safetensors", false);
}

#[test]
fn prefix_tuning_one_step_matches_pytorch() {
    one_step("prefix", "tiny-train-prefix.safetensors", false);
    one_step("prefix_proj", "tiny-train-prefix_proj.safetensors", true);
}

#[test]
fn p_tuning_one_step_matches_pytorch() {
    one_step("ptuning", "tiny-train-ptuning.safetensors", true);
}

#[test]
fn ln_tuning_one_step_matches_pytorch() {
    one_step("ln", "tiny-train-ln.safetensors", false);
}

#[test]
fn prefix_tuning_greedy_generation_matches_reference() {
    let mut s = tiny();
    load_dir(&mut s, "prefix", "tiny-adapters/prefix");
    let g: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("tiny-prefix-generate.json")).unwrap()).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
    let want = ids(&g["new_ids"]);
    let opts = webpeft::generate::GenerateOptions { max_new_tokens: want.len(), ..Default::default() };
    let got = block_on(webpeft::generate::generate(&s.model, &s.adapters["prefix"], &ids(&g["prompt_ids"]), &opts, |_| true)).unwrap();
    assert_eq!(got, want);
    assert!(matches!(s.adapters["prefix"], AnyAdapter::PrefixTuning(_)));
}

#[test]
fn bottleneck_adapters_match_pytorch_reference() {
    check_logits("bottleneck_serial", 0);
    check_logits("bottleneck_parallel", 0);
    one_step("bottleneck_serial", "tiny-train-bottleneck_serial.safetensors", false);
    one_step("bottleneck_parallel", "tiny-train-bottleneck_parallel.safetensors", false);
}

#[test]
fn bitfit_matches_pytorch_reference() {
    check_logits_on("tiny-llama-bias", "bias", "bitfit", 0);
    one_step_on("tiny-llama-bias", "bitfit", "tiny-train-bitfit.safetensors", false, None);
}

#[test]
fn full_fine_tuning_matches_pytorch() {
    let cfg = serde_json::json!({"peft_type": "SELECTIVE", "parameters": ".*"});
    one_step_on("tiny-llama", "full", "tiny-train-full.safetensors", false, Some(cfg));
}

#[test]
fn lora_variants_match_peft() {
    // bias = "all" / "lora_only" on the model with biases; lora_bias; LoRA on the embeddings;
    // modules_to_save = ["lm_head"].
    for (model, ids, name) in [
        ("tiny-llama-bias", "bias", "lora_bias_all"),
        ("tiny-llama-bias", "bias", "lora_bias_lora_only"),
        ("tiny-llama", "tiny", "lora_bias_param"),
        ("tiny-llama", "tiny", "lora_embed"),
        ("tiny-llama", "tiny", "lora_mts"),
    ] {
        check_logits_on(model, ids, name, 0);
        one_step_on(model, name, &format!("tiny-train-{name}.safetensors"), false, None);
    }
}

#[test]
fn merging_lora_dora_ia3_gives_the_same_logits_and_unmerging_restores() {
    for name in ["qv", "all_rslora", "dora", "ia3", "lora_bias_param"] {
        let mut s = tiny();
        load_dir(&mut s, name, &format!("tiny-adapters/{name}"));
        let base = logits_with(&s, &NoHook);
        let with = logits_with(&s, &s.adapters[name]);
        s.merge_adapter(name).unwrap();
        assert!(!s.adapters.contains_key(name));
        let merged = logits_with(&s, &NoHook);
        assert_close(&format!("{name} merged vs adapter"), &merged, &with, 1e-4);
        s.unmerge_adapter(name).unwrap();
        assert_eq!(max_abs_diff(&logits_with(&s, &NoHook), &base), 0.0, "{name}: unmerge restores the base exactly");
    }
    let mut s = tiny();
    load_dir(&mut s, "prompt", "tiny-adapters/prompt");
    let e = s.merge_adapter("prompt").unwrap_err();
    assert!(e.message.contains("cannot be merged"), "{e}");
    assert!(s.adapters.contains_key("prompt"), "a refused merge keeps the adapter");
}

#[test]
fn prompt_tuning_text_and_vocab_inits_take_token_embeddings() {
    let mut s = tiny();
    let text = "Beautiful is better";
    let cfg = serde_json::json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 7, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": text});
    s.add_adapter("t", &cfg, 0).unwrap();
    let ids = s.tokenizer.encode(text).unwrap();
    let embed = block_on(webpeft::tensor::read(s.model.embed.dense())).unwrap();
    let h = s.model.config.hidden_size;
    // peft: the text's token ids repeated, then cut to num_virtual_tokens.
    let want: Vec<f32> = ids.iter().cycle().take(7).flat_map(|&i| embed.data[i as usize * h..(i as usize + 1) * h].to_vec()).collect();
    let got = block_on(read_params(s.adapters.get_mut("t").unwrap())).unwrap();
    assert_eq!(got["prompt_embeddings"].data, want);
    let cfg = serde_json::json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 5, "prompt_tuning_init": "SAMPLE_VOCAB"});
    s.add_adapter("v", &cfg, 3).unwrap();
    let got = block_on(read_params(s.adapters.get_mut("v").unwrap())).unwrap();
    for row in got["prompt_embeddings"].data.chunks(h) {
        assert!(embed.data.chunks(h).any(|e| e == row), "each virtual token is some token's embedding");
    }
}
