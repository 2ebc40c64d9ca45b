#![cfg(not(target_family = "wasm"))]
//! LoRA against peft: adapters saved by peft load here with peft's logits; adapters saved
//! here round-trip; training steps equal PyTorch's AdamW updates.

mod common;

use common::*;
use webpeft::io::safetensors::read_all_f32;
use webpeft::models::attention::AttentionImpl;
use webpeft::models::llama::Inputs;
use webpeft::peft::lora::{LoraAdapter, LoraConfig};
use webpeft::session::Session;
use webpeft::tensor::{block_on, ints, read};
use webpeft::train::data::Batch;
use webpeft::train::{AdamWConfig, Schedule, TrainConfig, Trainer};

#[test]
fn peft_adapters_load_with_peft_logits() {
    let mut s = tiny();
    for dir in ["qv", "all_rslora", "regex_layers"] {
        load_dir(&mut s, dir, &format!("tiny-adapters/{dir}"));
        let want = load(&format!("tiny-adapters/{dir}/expected.safetensors"));
        let base = logits_with(&s, &webpeft::models::hooks::NoHook);
        let got = logits_with(&s, &s.adapters[dir]);
        assert!(max_abs_diff(&base, &want.f32["logits"].data) > 0.1, "{dir}: the adapter must change the logits");
        assert_close(&format!("peft adapter {dir}"), &got, &want.f32["logits"].data, 1e-4);
    }
    // The second adapter of a multi-adapter save (peft's subfolder), with layers_to_transform.
    load_dir(&mut s, "upgate", "tiny-adapters/regex_layers/upgate");
    let want = load("tiny-adapters/regex_layers/expected.safetensors");
    assert_close("peft adapter upgate", &logits_with(&s, &s.adapters["upgate"]), &want.f32["logits_upgate"].data, 1e-4);
    let webpeft::peft::AnyAdapter::Lora(up) = &s.adapters["upgate"] else { panic!("LoRA") };
    assert_eq!(up.layers.len(), 2, "layers_to_transform [1]: only layer 1's up/gate");
}

#[test]
fn adapter_round_trip_is_exact_and_keys_match_peft() {
    let mut s = tiny();
    load_dir(&mut s, "a", "tiny-adapters/all_rslora");
    let (cfg, bytes) = block_on(s.save_adapter("a")).unwrap();
    s.load_adapter("b", &cfg, &bytes).unwrap();
    let (a, b) = (logits_with(&s, &s.adapters["a"]), logits_with(&s, &s.adapters["b"]));
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    let ours = read_all_f32(&bytes).unwrap();
    let theirs = read_all_f32(&std::fs::read(fixture("tiny-adapters/all_rslora/adapter_model.safetensors")).unwrap()).unwrap();
    assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>());
    for (k, t) in &theirs {
        assert_eq!(ours[k], *t, "{k} bit-exact");
    }
    let c = LoraConfig::from_json(&cfg).unwrap();
    assert!(c.use_rslora && c.r == 8 && c.lora_alpha == 16.0);
}

#[test]
fn new_adapter_follows_peft_init() {
    let s = tiny();
    let peft_cfg = std::fs::read_to_string(fixture("tiny-adapters/qv_init/adapter_config.json")).unwrap();
    let a = LoraAdapter::new(LoraConfig::from_json(&peft_cfg).unwrap(), &s.model, 0).unwrap();
    assert_eq!(a.layers.len(), 4);
    for l in a.layers.values() {
        let av = block_on(read(l.a.clone())).unwrap().data;
        let bv = block_on(read(l.b.clone())).unwrap().data;
        let bound = 1.0 / (64f32).sqrt();
        assert!(av.iter().all(|x| x.abs() <= bound) && av.iter().any(|x| x.abs() > bound * 0.5), "kaiming-uniform A");
        assert!(bv.iter().all(|&x| x == 0.0), "zero B");
    }
    // A fresh adapter is a no-op.
    let base = logits_with(&s, &webpeft::models::hooks::NoHook);
    assert_eq!(max_abs_diff(&base, &logits_with(&s, &a)), 0.0);
}

#[test]
fn bad_adapters_are_refused_clearly() {
    let mut s = tiny();
    let d = fixture("tiny-adapters/qv");
    let cfg = std::fs::read_to_string(d.join("adapter_config.json")).unwrap();
    let w = std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    let e = s.load_adapter("x", &cfg.replace("\"use_dora\": false", "\"use_dora\": true"), &w).unwrap_err();
    assert!(e.message.contains("lora_magnitude_vector"), "{e}");
    let e = s.load_adapter("x", &cfg.replace("\"r\": 4", "\"r\": 8"), &w).unwrap_err();
    assert!(e.message.contains("shape"), "{e}");
    let e = s.load_adapter("x", &cfg, &w[..w.len() - 7]).unwrap_err();
    assert!(e.message.contains("safetensors"), "{e}");
    let e = s.load_adapter("x", "{\"peft_type\": \"LORA\"", &w).unwrap_err();
    assert!(e.message.contains("adapter_config.json"), "{e}");
    let e = s.load_adapter("x", &cfg.replace("\"LORA\"", "\"FOO\""), &w).unwrap_err();
    assert!(e.message.contains("FOO"), "{e}");
    let e = s.load_adapter("x", &cfg.replace("\"v_proj\"", "\"nope_proj\""), &w).unwrap_err();
    assert!(e.message.contains("does not belong") || e.message.contains("missing"), "{e}");
}

/// The fixture batch, and the trainer over the `qv` starting adapter.
fn train_setup(steps: usize, clip: Option<f64>, schedule: Schedule, warmup: usize) -> (Session, Batch, Trainer) {
    let mut s = tiny();
    load_dir(&mut s, "qv", "tiny-adapters/qv");
    let fx = load("tiny-train.safetensors");
    let (shape, ids) = &fx.i64["input_ids"];
    let batch = Batch { batch: shape[0], len: shape[1], input_ids: ids.clone(), attention_mask: fx.i64["attention_mask"].1.clone(), labels: fx.i64["labels"].1.clone(), tasks: vec![] };
    let cfg = TrainConfig {
        optim: AdamWConfig { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, ..Default::default() },
        schedule,
        warmup,
        total_steps: steps,
        max_grad_norm: clip,
        ..Default::default()
    };
    webpeft::peft::set_trainable(s.adapters.get_mut("qv").unwrap(), true);
    (s, batch, Trainer::new(cfg))
}

fn compare_weights(s: &mut Session, prefix: &str, tol: f32) {
    let fx = load("tiny-train.safetensors");
    let (_, bytes) = block_on(s.save_adapter("qv")).unwrap();
    let ours = read_all_f32(&bytes).unwrap();
    for (k, t) in &ours {
        assert_close(&format!("{prefix} {k}"), &t.data, &fx.f32[&format!("{prefix}.{k}")].data, tol);
    }
}

#[test]
fn one_adamw_step_matches_pytorch() {
    // With every attention implementation (the blocked one and the fused kernels, with
    // their backward, run on a GPU only; the batch has right padding).
    for imp in [AttentionImpl::Reference, AttentionImpl::Blocked, AttentionImpl::Fused] {
        let (mut s, batch, mut tr) = train_setup(1, None, Schedule::Constant, 0);
        s.model.attention = imp;
        let fx = load("tiny-train.safetensors");
        let a = s.adapters.get_mut("qv").unwrap();
        let st = block_on(tr.step(&s.model, a, std::slice::from_ref(&batch))).unwrap();
        let want_loss = fx.f32["loss_step0"].data[0];
        eprintln!("attention {imp:?}: loss {} vs {want_loss}; grad norm {}", st.loss, st.grad_norm);
        assert!((st.loss - want_loss).abs() < 1e-5, "loss {} vs {want_loss}", st.loss);
        assert!((st.grad_norm - 2.7853563).abs() < 1e-4, "grad norm {}", st.grad_norm);
        compare_weights(&mut s, "step1", 5e-5);
    }
}

#[test]
fn five_steps_with_clipping_and_cosine_warmup_match_pytorch() {
    let (mut s, batch, mut tr) = train_setup(5, Some(0.5), Schedule::Cosine, 2);
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("tiny-train.json")).unwrap()).unwrap();
    let losses: Vec<f64> = j["run5"]["losses"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    let lrs: Vec<f64> = j["run5"]["lrs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    for k in 0..5 {
        let a = s.adapters.get_mut("qv").unwrap();
        let st = block_on(tr.step(&s.model, a, std::slice::from_ref(&batch))).unwrap();
        eprintln!("step {k}: loss {} (torch {}), lr {} (torch {})", st.loss, losses[k], st.lr, lrs[k]);
        assert!((st.loss as f64 - losses[k]).abs() < 1e-4, "loss at step {k}");
        assert!((st.lr - lrs[k]).abs() < 1e-12, "lr at step {k}");
    }
    compare_weights(&mut s, "step5", 1e-4);
}

#[test]
fn gradient_accumulation_equals_the_full_batch() {
    let (mut s, batch, mut tr) = train_setup(1, None, Schedule::Constant, 0);
    let row = |b: usize| Batch {
        batch: 1,
        len: batch.len,
        input_ids: batch.input_ids[b * batch.len..(b + 1) * batch.len].to_vec(),
        attention_mask: batch.attention_mask[b * batch.len..(b + 1) * batch.len].to_vec(),
        labels: batch.labels[b * batch.len..(b + 1) * batch.len].to_vec(),
        tasks: vec![],
    };
    let a = s.adapters.get_mut("qv").unwrap();
    let st = block_on(tr.step(&s.model, a, &[row(0), row(1)])).unwrap();
    let fx = load("tiny-train.safetensors");
    assert!((st.loss - fx.f32["loss_step0"].data[0]).abs() < 1e-5);
    compare_weights(&mut s, "step1", 5e-5);
}

#[test]
fn seeded_training_is_repeatable_and_dropout_only_trains() {
    let _rng = device_rng_lock();
    use webpeft::session::TrainOptions;
    use webpeft::train::data::Example;
    let run = || {
        let mut s = tiny();
        let cfg = LoraConfig { r: 4, lora_alpha: 8.0, lora_dropout: 0.2, ..Default::default() };
        s.add_lora("d", cfg, 7).unwrap();
        let ex: Vec<Example> = ["one two three four", "five six seven eight"].iter().map(|t| Example::Text(t.to_string())).collect();
        let opts = TrainOptions { steps: 3, batch: 2, seq_len: 16, lr: 1e-2, seed: 3, ..Default::default() };
        let r = block_on(s.train("d", &ex, &opts, |_| true)).unwrap();
        (s, r.iter().map(|x| x.stats.loss).collect::<Vec<_>>())
    };
    let (s, a) = run();
    let (_, b) = run();
    assert_eq!(a, b, "same seed, same losses (dropout included)");
    // Outside training, dropout is off: two forward passes agree exactly.
    let x = logits_with(&s, &s.adapters["d"]);
    let y = logits_with(&s, &s.adapters["d"]);
    assert_eq!(max_abs_diff(&x, &y), 0.0);
}

/// Load `dir` from the tiny adapters, compare logits on the fixture ids with peft's.
fn check_method_logits(name: &str, real_from: usize) {
    let mut s = tiny();
    load_dir(&mut s, name, &format!("tiny-adapters/{name}"));
    let want = load(&format!("tiny-adapters/{name}/expected.safetensors"));
    let w = &want.f32["logits"];
    // peft's logits include the virtual positions first (prompt tuning): keep the real ones.
    let (b, t_all, v) = (w.shape[0], w.shape[1], w.shape[2]);
    let real: Vec<f32> = (0..b).flat_map(|i| w.data[(i * t_all + real_from) * v..(i + 1) * t_all * v].to_vec()).collect();
    let got = logits_with(&s, &s.adapters[name]);
    assert!(max_abs_diff(&logits_with(&s, &webpeft::models::hooks::NoHook), &real) > 0.1, "{name} must change the logits");
    assert_close(&format!("peft {name} logits"), &got, &real, 1e-4);
    // Round trip: our file equals peft's tensors.
    let (cfg, bytes) = block_on(s.save_adapter(name)).unwrap();
    let theirs = read_all_f32(&std::fs::read(fixture(&format!("tiny-adapters/{name}/adapter_model.safetensors"))).unwrap()).unwrap();
    assert_eq!(read_all_f32(&bytes).unwrap(), theirs, "{name}: saved tensors equal peft's");
    s.load_adapter("again", &cfg, &bytes).unwrap();
}

#[test]
fn ia3_adapter_matches_peft() {
    check_method_logits("ia3", 0);
}

#[test]
fn prompt_tuning_adapter_matches_peft() {
    check_method_logits("prompt", 4);
    // With right padding: peft extends the mask with ones for the virtual tokens.
    let mut s = tiny();
    load_dir(&mut s, "p", "tiny-adapters/prompt");
    let fx = load("tiny-logits.safetensors");
    let (shape, ids) = &fx.i64["tiny.masked_input_ids"];
    let mask = fx.i64["tiny.attention_mask"].1.clone();
    let inputs = Inputs { ids: ints(ids.clone(), [shape[0], shape[1]], &s.model.device), attention_mask: Some(mask.clone()) };
    let got = block_on(read(s.model.forward(&inputs, &s.adapters["p"], None).unwrap())).unwrap().data;
    let w = &load("tiny-adapters/prompt/expected.safetensors").f32["masked_logits"];
    let v = 512;
    let mut a = Vec::new();
    let mut b = Vec::new();
    for (i, m) in mask.iter().enumerate() {
        let (row, t) = (i / 12, i % 12);
        if *m == 1 {
            a.extend_from_slice(&got[i * v..(i + 1) * v]);
            b.extend_from_slice(&w.data[(row * 16 + 4 + t) * v..(row * 16 + 5 + t) * v]);
        }
    }
    assert_close("peft prompt masked logits", &a, &b, 1e-4);
}

fn one_step_matches(name: &str, train_file: &str, weight_tol: f32) {
    let mut s = tiny();
    load_dir(&mut s, name, &format!("tiny-adapters/{name}"));
    let fx = load(train_file);
    let (shape, ids) = &fx.i64["input_ids"];
    let batch = Batch { batch: shape[0], len: shape[1], input_ids: ids.clone(), attention_mask: fx.i64["attention_mask"].1.clone(), labels: fx.i64["labels"].1.clone(), tasks: vec![] };
    let mut tr = Trainer::new(TrainConfig { optim: AdamWConfig { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, ..Default::default() }, ..Default::default() });
    let a = s.adapters.get_mut(name).unwrap();
    webpeft::peft::set_trainable(a, true);
    let st = block_on(tr.step(&s.model, a, std::slice::from_ref(&batch))).unwrap();
    let want = fx.f32["loss_step0"].data[0];
    eprintln!("{name}: loss {} vs torch {want}", st.loss);
    assert!((st.loss - want).abs() < 1e-5, "{name} loss {} vs {want}", st.loss);
    let (_, bytes) = block_on(s.save_adapter(name)).unwrap();
    for (k, t) in read_all_f32(&bytes).unwrap() {
        assert_close(&format!("{name} step1 {k}"), &t.data, &fx.f32[&format!("step1.{k}")].data, weight_tol);
    }
    let after = block_on(tr.step(&s.model, s.adapters.get_mut(name).unwrap(), std::slice::from_ref(&batch))).unwrap();
    assert!((after.loss - fx.f32["loss_step1"].data[0]).abs() < 1e-4, "{name} loss after one step");
}

#[test]
fn ia3_one_step_matches_pytorch() {
    one_step_matches("ia3", "tiny-train-ia3.safetensors", 5e-5);
}

#[test]
fn prompt_tuning_one_step_matches_pytorch() {
    one_step_matches("prompt", "tiny-train-prompt.safetensors", 5e-5);
}

#[test]
fn prompt_tuning_greedy_generation_matches_peft() {
    let mut s = tiny();
    for name in ["prompt", "ia3"] {
        load_dir(&mut s, name, &format!("tiny-adapters/{name}"));
    }
    let g: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("tiny-prompt-generate.json")).unwrap()).unwrap();
    eprintln!("{}", serde_json::to_string(&g).unwrap().chars().take(600).collect::<String>());
    let ids = |v: &serde_json::Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
    let prompt = ids(&g["prompt_ids"]);
    for name in ["prompt", "ia3"] {
        let want = ids(&g[name]["new_ids"]);
        let opts = webpeft::generate::GenerateOptions { max_new_tokens: want.len(), ..Default::default() };
        let got = block_on(webpeft::generate::generate(&s.model, &s.adapters[name], &prompt, &opts, |_| true)).unwrap();
        assert_eq!(got, want, "{name} greedy (KV cache)");
    }
}

/// Memory planning: a batch whose logits do not fit the device's largest buffer runs as
/// micro-batches with the same update; what cannot fit at all is refused by name.
#[test]
fn batches_too_big_for_a_buffer_run_as_micro_batches() {
    let _rng = device_rng_lock();
    use webpeft::session::TrainOptions;
    let run = |max_buffer: Option<u64>, batch: usize, grad_accum: usize| {
        let mut s = tiny();
        s.compute.max_buffer = max_buffer;
        s.add_lora("m", LoraConfig { r: 4, lora_alpha: 8.0, ..Default::default() }, 7).unwrap();
        let opts = TrainOptions { steps: 3, batch, grad_accum, seq_len: 32, lr: 1e-2, seed: 3, ..Default::default() };
        let r = block_on(s.train("m", &zen_examples(), &opts, |_| true)).map(|r| r.iter().map(|x| x.stats.loss).collect::<Vec<_>>());
        (r, block_on(s.save_adapter("m")).unwrap().1)
    };
    // Tiny model: logits of 4 rows × 32 × 512 f32 = 256 KiB, of 2 rows 128 KiB; the
    // embedding table 128 KiB. A 160 KiB buffer limit makes batch 4 run as 2 × 2.
    let (whole, _) = run(None, 4, 1);
    let (split, w_split) = run(Some(160 << 10), 4, 1);
    let (manual, w_manual) = run(None, 2, 2);
    assert_eq!(split.as_ref().unwrap(), manual.as_ref().unwrap(), "the planned split is batch 2 × grad-accum 2");
    assert_eq!(w_split, w_manual);
    let d = whole.unwrap().iter().zip(split.unwrap()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    eprintln!("batch 4 vs 2 micro-batches of 2: losses differ by {d:.1e}");
    assert!(d < 1e-5, "same update up to float summation: {d}");
    let e = run(Some(100 << 10), 1, 1).0.unwrap_err();
    assert!(e.message.contains("embedding table"), "{e}");
    let mut s = tiny();
    s.compute.max_buffer = Some(150 << 10);
    s.add_lora("m", LoraConfig { r: 4, lora_alpha: 8.0, ..Default::default() }, 7).unwrap();
    let e = block_on(s.train("m", &zen_examples(), &TrainOptions { steps: 1, batch: 2, seq_len: 128, ..Default::default() }, |_| true)).unwrap_err();
    assert!(e.message.contains("reduce seq-len"), "{e}");
}

#[test]
fn validation_loss_during_training_is_the_held_out_loss_and_changes_nothing() {
    let _rng = device_rng_lock();
    use webpeft::session::TrainOptions;
    use webpeft::train::data::{Example, split_validation};
    let all: Vec<Example> = (0..10).map(|i| Example::Text(format!("sample number {i} says hello to {}", i * 7))).collect();
    let (train, val) = split_validation(&all, 0.2, 5).unwrap();
    assert_eq!((train.len(), val.len()), (8, 2));
    let run = |validation: Vec<Example>| {
        let mut s = tiny();
        s.add_lora("v", LoraConfig { r: 4, lora_alpha: 8.0, lora_dropout: 0.1, ..Default::default() }, 1).unwrap();
        let opts = TrainOptions { steps: 5, batch: 2, seq_len: 16, lr: 1e-2, seed: 2, validation, eval_every: 2, ..Default::default() };
        let r = block_on(s.train("v", &train, &opts, |_| true)).unwrap();
        let bytes = block_on(s.save_adapter("v")).unwrap().1;
        (s, r, bytes)
    };
    let (s, reports, with_eval) = run(val.clone());
    let evals: Vec<(usize, f64)> = reports.iter().filter_map(|r| r.eval.as_ref().map(|e| (r.stats.step, e.loss))).collect();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), [2, 4, 5], "every 2 steps and after the last");
    // The last one is the held-out loss of the trained adapter (as `evaluate` computes it).
    let after = block_on(s.evaluate(&["v"], &val, 16, 2, &[])).unwrap();
    assert!((after.loss - evals[2].1).abs() < 1e-5, "{} vs {}", after.loss, evals[2].1);
    assert!(evals[2].1 < evals[0].1, "the validation loss falls: {evals:?}");
    // Evaluating inside the run (eval mode, no dropout) leaves training to the byte as without.
    let (_, _, without) = run(vec![]);
    assert_eq!(with_eval, without, "evaluation must not change training");
}

#[test]
fn chat_examples_train_on_a_model_with_a_chat_template() {
    let _rng = device_rng_lock();
    use webpeft::session::TrainOptions;
    use webpeft::train::data::{Example, IGNORE, tokenize};
    let mut s = tiny();
    assert!(s.tokenizer.chat_template.is_some(), "tiny-llama has chat_template.jinja");
    let ex = Example::Chat { messages: vec![("user".into(), "what is one".into()), ("assistant".into(), "one is a number".into())] };
    let t = tokenize(&s.tokenizer, &ex, false, 128).unwrap();
    let trained: Vec<u32> = t.ids.iter().zip(&t.labels).filter(|(_, l)| **l != IGNORE).map(|(i, _)| *i).collect();
    let text = s.tokenizer.decode(&trained, false).unwrap();
    assert!(text.starts_with("one is a number"), "{text:?}");
    assert!(t.labels[0] == IGNORE && trained.len() < t.ids.len());
    s.add_lora("c", LoraConfig { r: 4, lora_alpha: 8.0, ..Default::default() }, 1).unwrap();
    let r = block_on(s.train("c", &[ex], &TrainOptions { steps: 6, seq_len: 64, lr: 2e-2, ..Default::default() }, |_| true)).unwrap();
    assert!(r[5].stats.loss < r[0].stats.loss, "{:?}", r.iter().map(|x| x.stats.loss).collect::<Vec<_>>());
    assert_eq!(r[0].stats.tokens, t.ids.len());
}

#[test]
fn estimate_plans_and_times_a_run_without_keeping_anything() {
    use webpeft::session::TrainOptions;
    let _rng = device_rng_lock();
    let mut s = tiny();
    let cfg = serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]});
    let o = TrainOptions { steps: 10, batch: 3, grad_accum: 2, seq_len: 24, ..Default::default() };
    let e = block_on(s.estimate(&cfg, &o, true)).unwrap();
    assert!(s.adapters.is_empty(), "the estimate's adapter is gone");
    s.add_adapter("x", &cfg, 0).unwrap();
    let plan = s.memory_plan(&["x"], &o).unwrap();
    assert_eq!((e.plan.batch, e.plan.grad_accum, e.plan.estimate.total()), (plan.batch, plan.grad_accum, plan.estimate.total()));
    assert_eq!(e.trainable, s.adapters.get_mut("x").unwrap().num_parameters());
    let (row, step) = (e.row_seconds.unwrap(), e.step_seconds.unwrap());
    assert!(row > 0.0 && (step - 6.0 * row).abs() < 1e-12, "{row} {step}");
    assert!(block_on(s.estimate(&cfg, &o, false)).unwrap().row_seconds.is_none());
    let bad = serde_json::json!({"peft_type": "LORA", "r": 4, "target_modules": ["nope"]});
    assert!(block_on(s.estimate(&bad, &o, false)).is_err());
    assert_eq!(s.adapters.len(), 1);
}

#[test]
fn a_long_text_trains_as_windows_not_cut_short() {
    use webpeft::train::data::{Example, tokenize_all};
    let s = tiny();
    let long = "Beautiful is better than ugly. Explicit is better than implicit. ".repeat(12);
    let ids = s.tokenizer.encode(&long).unwrap();
    assert!(ids.len() > 3 * 32, "{} tokens", ids.len());
    let rows = tokenize_all(&s.tokenizer, &[Example::Text(long), Example::Text("Simple is better than complex.".into())], false, 32).unwrap();
    let windows = &rows[..rows.len() - 1];
    // Consecutive windows of 32 tokens covering the whole text (a 1-token tail has nothing to predict).
    let covered: Vec<u32> = windows.iter().flat_map(|r| r.ids.clone()).collect();
    let expect = if ids.len() % 32 == 1 { &ids[..ids.len() - 1] } else { &ids[..] };
    assert_eq!(covered, expect);
    assert!(windows.iter().all(|r| r.ids.len() <= 32 && r.ids.len() >= 2 && r.labels == r.ids.iter().map(|&i| i as i64).collect::<Vec<_>>()));
    assert_eq!(windows.len(), ids.len() / 32 + usize::from(ids.len() % 32 >= 2));
    // A short text stays one row, as before.
    assert_eq!(rows.last().unwrap().ids, s.tokenizer.encode("Simple is better than complex.").unwrap());
}

/// The fused AdamW kernel (one launch per tensor on a GPU) against the same update as tensor
/// ops: three steps of decay, bias corrections and (after the first) a clipping coefficient, on shapes that are
/// not multiples of the workgroup. On the CPU backend both configurations run the tensor ops.
#[test]
fn the_fused_adamw_kernel_equals_the_tensor_ops() {
    use burn::tensor::Tensor;
    use webpeft::train::AdamW;
    use webpeft::train::adamw_kernel::applies;
    let c = compute();
    let dev = c.device.clone();
    let shapes = [[8usize, 576], [1, 7], [33, 65]];
    let init: Vec<Tensor<2>> = shapes.iter().enumerate().map(|(i, &[r, k])| webpeft::tensor::floats(values(r * k, 10 + i as u64), [r, k], &dev)).collect();
    assert_eq!(applies(&init[0]), c.is_gpu, "the kernel runs on a GPU only");
    let run = |fused: bool| {
        let mut opt = AdamW::new(AdamWConfig { lr: 3e-2, weight_decay: 0.1, fused, ..Default::default() });
        let mut params: Vec<Tensor<2>> = init.iter().map(|p| p.clone().autodiff().require_grad()).collect();
        for step in 0..3u64 {
            let grads: Vec<Tensor<2>> = shapes.iter().enumerate().map(|(i, &[r, k])| webpeft::tensor::floats(values(r * k, 100 * step + i as u64), [r, k], &dev)).collect();
            // The first step unclipped, then a clipping coefficient.
            let coef = (step > 0).then(|| webpeft::tensor::floats(vec![0.9 - 0.2 * step as f32], [1], &dev));
            let mut refs: Vec<&mut Tensor<2>> = params.iter_mut().collect();
            opt.update_clipped(&mut refs, grads, 3e-2, coef);
        }
        let moments: Vec<Vec<f32>> = opt
            .state
            .iter()
            .flat_map(|m| {
                let m = m.as_ref().unwrap();
                [block_on(read(m.m.clone())).unwrap().data, block_on(read(m.v.clone())).unwrap().data]
            })
            .collect();
        (params.into_iter().map(|p| block_on(read(p)).unwrap().data).collect::<Vec<_>>(), moments)
    };
    let (p_fused, m_fused) = run(true);
    let (p_ref, m_ref) = run(false);
    for (i, (a, b)) in p_fused.iter().zip(&p_ref).enumerate() {
        let moved = max_abs_diff(b, &block_on(read(init[i].clone())).unwrap().data);
        assert!(moved > 1e-2, "the parameters moved: {moved}");
        assert_close(&format!("parameter {i}, fused vs tensor ops"), a, b, 1e-6);
    }
    for (i, (a, b)) in m_fused.iter().zip(&m_ref).enumerate() {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert_close(&format!("moment {i}, fused vs tensor ops"), a, b, 1e-6 * scale.max(1e-3));
    }
}
