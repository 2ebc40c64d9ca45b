#![cfg(not(target_family = "wasm"))]
//! Many adapters over one base: peft's `add_weighted_adapter` combinations, mixed-adapter
//! batches (`adapter_names=`), switching and deleting adapters without touching the base,
//! and exporting a merged model as a Hugging Face folder.

mod common;

use common::*;
use webpeft::io::safetensors::read_all_f32;
use webpeft::io::source::ModelFiles;
use webpeft::peft::AnyAdapter;
use webpeft::peft::lora::combine::{Combination, CombineOptions, SignMethod};
use webpeft::session::Session;
use webpeft::tensor::{block_on, uploaded_bytes};

fn with_x_and_y() -> Session {
    let mut s = tiny();
    load_dir(&mut s, "x", "tiny-combine/x");
    load_dir(&mut s, "y", "tiny-combine/y");
    s
}

/// `s * B A` per site of a saved LoRA, keyed by module.
fn deltas(tensors: &std::collections::BTreeMap<String, webpeft::io::safetensors::HostTensor>, scaling: f32) -> Vec<(String, Vec<f32>)> {
    tensors
        .iter()
        .filter(|(k, _)| k.ends_with("lora_A.weight"))
        .map(|(k, a)| {
            let b = &tensors[&k.replace("lora_A", "lora_B")];
            let (r, n_in, n_out) = (a.shape[0], a.shape[1], b.shape[0]);
            let d = (0..n_out * n_in).map(|i| (0..r).map(|j| b.data[i / n_in * r + j] * a.data[j * n_in + i % n_in]).sum::<f32>() * scaling).collect();
            (k.replace(".lora_A.weight", ""), d)
        })
        .collect()
}

#[test]
fn add_weighted_adapter_matches_peft() {
    let combos: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("tiny-combine/combos.json")).unwrap()).unwrap();
    let want = load("tiny-combine/expected.safetensors");
    let mut s = with_x_and_y();
    assert_close("x", &logits_with(&s, &s.adapters["x"]), &want.f32["x/logits"].data, 1e-4);
    for (name, c) in combos["combos"].as_object().unwrap() {
        let weights: Vec<f64> = c["weights"].as_array().unwrap().iter().map(|w| w.as_f64().unwrap()).collect();
        let o = CombineOptions {
            combination: Combination::parse(c["combination_type"].as_str().unwrap()).unwrap(),
            svd_rank: c["svd_rank"].as_u64().map(|r| r as usize),
            svd_clamp: c["svd_clamp"].as_f64(),
            density: c["density"].as_f64(),
            majority_sign: if c["majority_sign_method"] == "frequency" { SignMethod::Frequency } else { SignMethod::Total },
            seed: 0,
        };
        block_on(s.add_weighted_adapter(name, &[("x", weights[0]), ("y", weights[1])], &o)).unwrap();
        let AnyAdapter::Lora(l) = &s.adapters[name.as_str()] else { panic!("a LoRA") };
        assert_eq!((l.config.r as u64, l.config.lora_alpha), (c["r"].as_u64().unwrap(), c["lora_alpha"].as_f64().unwrap()), "{name}: r and alpha");
        let got = logits_with(&s, &s.adapters[name.as_str()]);
        // svd_clamp clamps at a quantile of the factors' entries, which depends on each
        // singular pair's arbitrary sign (LAPACK's vs ours): only close, not equal.
        let tol = if name == "svd_clamp" { 0.5 } else { 1e-4 };
        assert_close(&format!("add_weighted_adapter {name}"), &got, &want.f32[&format!("{name}/logits")].data, tol);
        let (_, bytes) = block_on(s.save_adapter(name)).unwrap();
        let ours = read_all_f32(&bytes).unwrap();
        let theirs: std::collections::BTreeMap<_, _> =
            want.f32.iter().filter_map(|(k, v)| k.strip_prefix(&format!("{name}/base_model")).map(|rest| (format!("base_model{rest}"), v.clone()))).collect();
        assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>(), "{name}: keys");
        if name.contains("svd") {
            // Factors are defined up to sign; compare the products B A.
            for ((k, d1), (_, d2)) in deltas(&ours, 1.0).iter().zip(deltas(&theirs, 1.0)) {
                let tol = if name == "svd_clamp" { 0.1 } else { 1e-5 };
                assert_close(&format!("{name} {k} B A"), d1, &d2, tol);
            }
        } else {
            for (k, t) in &theirs {
                assert_close(&format!("{name} {k}"), &ours[k].data, &t.data, 1e-6);
            }
        }
    }
}

#[test]
fn combining_refuses_what_peft_refuses() {
    let mut s = with_x_and_y();
    load_dir(&mut s, "r8", "tiny-adapters/all_rslora");
    let linear = CombineOptions { combination: Combination::Linear, ..Default::default() };
    let e = block_on(s.add_weighted_adapter("z", &[("x", 1.0), ("r8", 1.0)], &linear)).unwrap_err();
    assert!(e.message.contains("same r"), "{e}");
    let ties = CombineOptions { combination: Combination::Ties, ..Default::default() };
    let e = block_on(s.add_weighted_adapter("z", &[("x", 1.0), ("y", 1.0)], &ties)).unwrap_err();
    assert!(e.message.contains("density"), "{e}");
    load_dir(&mut s, "ia3", "tiny-adapters/ia3");
    let e = block_on(s.add_weighted_adapter("z", &[("x", 1.0), ("ia3", 1.0)], &CombineOptions::default())).unwrap_err();
    assert!(e.message.contains("only LoRA"), "{e}");
    let e = block_on(s.add_weighted_adapter("x", &[("y", 1.0)], &CombineOptions::default())).unwrap_err();
    assert!(e.message.contains("exists"), "{e}");
    assert!(!s.adapters.contains_key("z"));
}

#[test]
fn dare_prunes_at_the_density_and_rescales() {
    let mut s = with_x_and_y();
    let o = CombineOptions { combination: Combination::DareLinear, density: Some(0.5), seed: 7, ..Default::default() };
    block_on(s.add_weighted_adapter("d", &[("x", 1.0), ("y", 1.0)], &o)).unwrap();
    let (_, bytes) = block_on(s.save_adapter("d")).unwrap();
    let d = read_all_f32(&bytes).unwrap();
    let a = &d["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"];
    let kept = a.data.iter().filter(|x| **x != 0.0).count() as f64 / a.data.len() as f64;
    assert!((0.4..0.6).contains(&kept), "about half kept: {kept}");
    // o_proj has only y: the kept entries are y's A times sqrt(w s) / density.
    let y = read_all_f32(&std::fs::read(fixture("tiny-combine/y/adapter_model.safetensors")).unwrap()).unwrap();
    let ya = &y["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"];
    let f = (4.0f32).sqrt() / 0.5;
    for (g, w) in a.data.iter().zip(&ya.data) {
        assert!(*g == 0.0 || (g - w * f).abs() < 1e-6, "{g} vs {}", w * f);
    }
    // The same seed gives the same adapter.
    block_on(s.add_weighted_adapter("d2", &[("x", 1.0), ("y", 1.0)], &o)).unwrap();
    assert_eq!(block_on(s.save_adapter("d2")).unwrap().1, bytes);
}

#[test]
fn mixed_adapter_batch_matches_peft_adapter_names() {
    let s = with_x_and_y();
    let want = load("tiny-combine/expected.safetensors");
    let (shape, ids) = &want.i64["mixed/input_ids"];
    let rows: Vec<Vec<u32>> = ids.chunks(shape[1]).map(|r| r.iter().map(|&i| i as u32).collect()).collect();
    let got = block_on(s.logits_per_row(&rows, &[Some("x"), Some("y"), None])).unwrap();
    assert_eq!(got.shape, vec![3, 12, 512]);
    assert_close("mixed batch x / y / base", &got.data, &want.f32["mixed/logits"].data, 1e-4);
    // Ragged rows: each row's logits equal running it alone.
    let short = vec![rows[1][..7].to_vec(), rows[0].clone()];
    let got = block_on(s.logits_per_row(&short, &[Some("y"), Some("x")])).unwrap();
    let alone = block_on(s.logits(&short[0], &["y"])).unwrap();
    assert_close("ragged row 0 alone", &got.data[..7 * 512], &alone.data, 1e-4);
    let mut s = s;
    load_dir(&mut s, "prompt", "tiny-adapters/prompt");
    let e = block_on(s.logits_per_row(&rows, &[Some("prompt"), None, None])).unwrap_err();
    assert!(e.message.contains("cannot be mixed"), "{e}");
}

#[test]
fn switching_and_deleting_adapters_uploads_nothing_of_the_base() {
    let mut s = with_x_and_y();
    let ids: Vec<u32> = (3..15).collect();
    let base = block_on(s.logits(&ids, &[])).unwrap();
    let with_x = block_on(s.logits(&ids, &["x"])).unwrap();
    let before = uploaded_bytes();
    let with_y = block_on(s.logits(&ids, &["y"])).unwrap();
    let again_x = block_on(s.logits(&ids, &["x"])).unwrap();
    let sent = uploaded_bytes() - before;
    // Per call only the inputs go to the device: 12 token ids (i64) and the 12 x 12 causal
    // mask (f32); nothing of the base (0.5 MB of weights) or of the adapters.
    assert_eq!(sent, 2 * (12 * 8 + 12 * 12 * 4), "switching adapters uploaded {sent} bytes");
    assert_eq!(with_x.data, again_x.data);
    assert!(max_abs_diff(&with_x.data, &with_y.data) > 0.1);
    s.delete_adapter("x").unwrap();
    assert!(s.delete_adapter("x").unwrap_err().message.contains("no adapter"));
    assert_eq!(s.adapter_list(), vec![("y".to_string(), "lora")]);
    assert_eq!(block_on(s.logits(&ids, &[])).unwrap().data, base.data, "deleting an adapter leaves the base");
}

#[test]
fn merged_model_exports_as_a_folder_with_the_adapter_logits() {
    for (base, adapter) in [("tiny-llama", "tiny-adapters/dora"), ("tiny-qwen2", "tiny-qwen2/lora")] {
        let mut s = Session::load(&ModelFiles::from_path(&fixture(base)).unwrap(), compute()).unwrap();
        load_dir(&mut s, "a", adapter);
        let ids: Vec<u32> = (5..40).collect();
        let with = block_on(s.logits(&ids, &["a"])).unwrap();
        s.merge_adapter("a").unwrap();
        let files = block_on(s.export_model()).unwrap();
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]);
        let exported = Session::load(&ModelFiles::from_named(files.into_iter().collect()).unwrap(), compute()).unwrap();
        let got = block_on(exported.logits(&ids, &[])).unwrap();
        assert_close(&format!("{base}: exported merged model vs base + adapter"), &got.data, &with.data, 1e-4);
        assert_eq!(exported.tokenizer.encode("Beautiful is better 123").unwrap(), s.tokenizer.encode("Beautiful is better 123").unwrap());
        assert_eq!(exported.model.config, s.model.config, "{base}: config round-trips");
        assert_eq!(exported.tokenizer.chat_template, s.tokenizer.chat_template, "{base}: chat template");
    }
    // A GGUF base exports too (its weights as f32, Q/K back in transformers' layout).
    let mut s = Session::load(&ModelFiles::from_path(&fixture("tiny-gguf/tiny-q8_0.gguf")).unwrap(), compute()).unwrap();
    let ids: Vec<u32> = (5..20).collect();
    let before = block_on(s.logits(&ids, &[])).unwrap();
    let files = block_on(s.export_model()).unwrap();
    s = Session::load(&ModelFiles::from_named(files.into_iter().collect()).unwrap(), compute()).unwrap();
    assert_close("GGUF export reloads", &block_on(s.logits(&ids, &[])).unwrap().data, &before.data, 1e-5);
}

#[test]
fn multitask_training_routes_each_row_to_its_adapter() {
    use webpeft::session::TrainOptions;
    use webpeft::train::data::Example;
    let tx: Vec<Example> = ["Beautiful is better than ugly.", "Explicit is better than implicit."].iter().map(|t| Example::Text(t.to_string())).collect();
    let ty: Vec<Example> = ["Simple is better than complex.", "Flat is better than nested, sparse better than dense."].iter().map(|t| Example::Text(t.to_string())).collect();
    let o = TrainOptions { steps: 3, batch: 4, seq_len: 32, lr: 1e-2, max_grad_norm: None, ..Default::default() };
    let mut s = with_x_and_y();
    let before_x = block_on(s.evaluate(&["x"], &tx, 32, 4, &[])).unwrap().loss;
    let before_y = block_on(s.evaluate(&["y"], &ty, 32, 4, &[])).unwrap().loss;
    let reports = block_on(s.train_multitask(&[("x", &tx), ("y", &ty)], &o, |_| true)).unwrap();
    // Every step sees all four rows: step 1's per-task losses are each adapter's loss on its
    // own examples before any update.
    let t = &reports[0].stats.task_losses;
    assert!((t[0] as f64 - before_x).abs() < 1e-4 && (t[1] as f64 - before_y).abs() < 1e-4, "{t:?} vs {before_x} {before_y}");
    assert!(reports[2].stats.task_losses.iter().zip(t).all(|(a, b)| a < b), "both tasks' losses fall: {:?}", reports.iter().map(|r| r.stats.task_losses.clone()).collect::<Vec<_>>());
    // Adam is invariant to the loss scale, so each adapter ends where training it alone on its
    // own rows takes it; had rows leaked to the other adapter, it would not.
    let (_, multi_x) = block_on(s.save_adapter("x")).unwrap();
    let (_, multi_y) = block_on(s.save_adapter("y")).unwrap();
    for (name, data, multi) in [("x", &tx, &multi_x), ("y", &ty, &multi_y)] {
        let mut alone = with_x_and_y();
        block_on(alone.train(name, data, &TrainOptions { batch: 2, ..o.clone() }, |_| true)).unwrap();
        let (_, w) = block_on(alone.save_adapter(name)).unwrap();
        let (a, b) = (read_all_f32(multi).unwrap(), read_all_f32(&w).unwrap());
        let init = read_all_f32(&std::fs::read(fixture(&format!("tiny-combine/{name}/adapter_model.safetensors"))).unwrap()).unwrap();
        for (k, t) in &a {
            assert_close(&format!("multi-task {name} {k} vs alone"), &t.data, &b[k].data, 1e-4);
            assert!(max_abs_diff(&t.data, &init[k].data) > 1e-3, "{k} trained");
        }
    }
    let mut s = with_x_and_y();
    load_dir(&mut s, "prompt", "tiny-adapters/prompt");
    let e = block_on(s.train_multitask(&[("x", &tx), ("prompt", &ty)], &o, |_| true)).unwrap_err();
    assert!(e.message.contains("cannot share a batch"), "{e}");
}
