#![cfg(not(target_family = "wasm"))]
//! Differentially private training: the RDP accountant against Opacus,
//! per-example clipping against a PyTorch reference, the epsilon budget and Poisson sampling.

mod common;

use common::*;
use webpeft::session::TrainOptions;
use webpeft::tensor::block_on;
use webpeft::train::privacy::{DpConfig, compute_rdp, default_orders, privacy_spent};

fn dp(noise: f64) -> DpConfig {
    DpConfig { max_grad_norm: 0.5, noise_multiplier: Some(noise), delta: 1e-5, target_epsilon: None, poisson: true }
}

#[test]
fn epsilon_budget_stops_training() {
    let mut s = tiny();
    s.add_adapter("a", &serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}), 0).unwrap();
    let budget = 6.0;
    let o = TrainOptions { steps: 50, batch: 5, seq_len: 32, lr: 1e-2, dp: Some(DpConfig { target_epsilon: Some(budget), ..dp(1.0) }), ..Default::default() };
    let r = block_on(s.train("a", &zen_examples(), &o, |_| true)).unwrap();
    let eps: Vec<f64> = r.iter().map(|r| r.epsilon.unwrap()).collect();
    assert!(!r.is_empty() && r.len() < 50, "stopped early after {} steps", r.len());
    assert!(eps.windows(2).all(|w| w[1] > w[0]) && *eps.last().unwrap() <= budget, "{eps:?}");
    // q = 1 (the whole data set per step): the next step would pass the budget.
    let orders = default_orders();
    let next = privacy_spent(&orders, &compute_rdp(1.0, 1.0, r.len() + 1, &orders), 1e-5).0;
    assert!(next > budget);
}

#[test]
fn rdp_accountant_matches_opacus() {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("dp/rdp.json")).unwrap()).unwrap();
    let orders: Vec<f64> = v["orders"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(orders, default_orders(), "Opacus's default orders");
    let mut worst = 0f64;
    for g in v["grid"].as_array().unwrap() {
        let (q, sigma, steps, delta) = (g["q"].as_f64().unwrap(), g["sigma"].as_f64().unwrap(), g["steps"].as_u64().unwrap() as usize, g["delta"].as_f64().unwrap());
        let (eps, alpha) = privacy_spent(&orders, &compute_rdp(q, sigma, steps, &orders), delta);
        let want = g["epsilon"].as_f64().unwrap();
        let rel = (eps - want).abs() / want.abs().max(1e-12);
        worst = worst.max(rel);
        assert!(rel < 1e-9, "q {q} sigma {sigma} steps {steps} delta {delta}: epsilon {eps} vs Opacus {want}");
        assert_eq!(alpha, g["best_alpha"].as_f64().unwrap(), "best order");
    }
    eprintln!("RDP accountant vs Opacus, 250 points: max relative |d epsilon| = {worst:.2e}");
    for t in v["noise_for_target"].as_array().unwrap() {
        let sigma = webpeft::train::privacy::noise_for_epsilon(
            t["target_epsilon"].as_f64().unwrap(),
            t["sample_rate"].as_f64().unwrap(),
            t["steps"].as_u64().unwrap() as usize,
            t["target_delta"].as_f64().unwrap(),
            t["epsilon_tolerance"].as_f64().unwrap(),
        )
        .unwrap();
        assert_eq!(sigma, t["noise_multiplier"].as_f64().unwrap(), "noise for {t}");
    }
}

#[test]
fn per_example_clipping_matches_pytorch() {
    use webpeft::peft::{Layout, Trainable, set_trainable};
    use webpeft::train::data::Batch;
    use webpeft::train::{AdamWConfig, TrainConfig, Trainer};
    let fx = load("dp/clip.safetensors");
    let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("dp/clip.json")).unwrap()).unwrap();
    let c = info["max_grad_norm"].as_f64().unwrap();
    let (shape, ids) = &fx.i64["input_ids"];
    let batch = Batch { batch: shape[0], len: shape[1], input_ids: ids.clone(), attention_mask: fx.i64["attention_mask"].1.clone(), labels: fx.i64["labels"].1.clone(), tasks: vec![] };
    let mut s = tiny();
    load_dir(&mut s, "qv", "tiny-adapters/qv");
    let dp = DpConfig { max_grad_norm: c, noise_multiplier: Some(0.0), delta: 1e-5, target_epsilon: None, poisson: false };
    let config = TrainConfig { optim: AdamWConfig { lr: 1e-2, weight_decay: 0.0, ..Default::default() }, dp: Some(dp), dp_expected_batch: 4, ..Default::default() };
    let mut tr = Trainer::new(config);
    let a = s.adapters.get_mut("qv").unwrap();
    set_trainable(a, true);
    let (grads, loss, n) = tr.dp_gradients(&s.model, a, std::slice::from_ref(&batch), dp).unwrap();
    assert_eq!(n, 4);
    let want_loss = fx.f32["losses"].data.iter().sum::<f32>() / 4.0;
    assert!((block_on(webpeft::tensor::read(loss)).unwrap().data[0] - want_loss).abs() < 1e-5);
    let names: Vec<(String, Layout)> = a.params_mut().iter().map(|p| (p.name.clone(), p.layout)).collect();
    for ((name, layout), g) in names.iter().zip(grads) {
        let mut got = block_on(webpeft::tensor::read(g)).unwrap();
        if *layout == Layout::Transposed {
            got = got.transposed();
        }
        assert_close(&format!("DP gradient {name}"), &got.data, &fx.f32[&format!("grad.{name}")].data, 2e-6);
    }
    // The whole step: AdamW on the DP gradient.
    block_on(tr.step(&s.model, s.adapters.get_mut("qv").unwrap(), &[batch])).unwrap();
    let a = s.adapters.get_mut("qv").unwrap();
    set_trainable(a, false);
    let saved = block_on(webpeft::peft::read_params(a)).unwrap();
    for (name, t) in &saved {
        assert_close(&format!("DP step {name}"), &t.data, &fx.f32[&format!("step1.{name}")].data, 1e-4);
    }
}

#[test]
fn poisson_sampling_varies_the_batch_around_its_expected_size() {
    use webpeft::train::data::{Batcher, Tokenized};
    let rows: Vec<Tokenized> = (0..200).map(|i| Tokenized { ids: vec![i, i + 1], labels: vec![i as i64, i as i64 + 1] }).collect();
    let mut b = Batcher::new(rows, 20, 0, 5).unwrap();
    b.set_poisson();
    let sizes: Vec<usize> = (0..200).map(|_| b.next_batch().unwrap().batch).collect();
    let mean = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
    assert!((mean - 20.0).abs() < 1.0, "mean batch {mean}");
    assert!(sizes.iter().any(|&n| n != 20), "sizes vary");
}
