#![cfg(not(target_family = "wasm"))]
//! Differentially private training: the RDP accountant against Opacus,
//! per-example clipping against a PyTorch reference, the epsilon budget and Poisson sampling.

mod common;

use common::*;
use webpeft::session::TrainOptions;
use webpeft::tensor::block_on;
use webpeft::train::data::Example;
use webpeft::train::privacy::{DpConfig, compute_rdp, default_orders, privacy_spent};

fn texts() -> Vec<Example> {
    ["Beautiful is better than ugly.", "Explicit is better than implicit.", "Simple is better than complex.", "Complex is better than complicated.", "Flat is better than nested."]
        .iter()
        .map(|t| Example::Text(t.to_string()))
        .collect()
}

fn dp(noise: f64) -> DpConfig {
    DpConfig { max_grad_norm: 0.5, noise_multiplier: noise, delta: 1e-5, target_epsilon: None, poisson: true }
}

#[test]
fn epsilon_budget_stops_training() {
    let mut s = tiny();
    s.add_adapter("a", &serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}), 0).unwrap();
    let budget = 6.0;
    let o = TrainOptions { steps: 50, batch: 5, seq_len: 32, lr: 1e-2, dp: Some(DpConfig { target_epsilon: Some(budget), ..dp(1.0) }), ..Default::default() };
    let r = block_on(s.train("a", &texts(), &o, |_| true)).unwrap();
    let eps: Vec<f64> = r.iter().map(|r| r.epsilon.unwrap()).collect();
    assert!(!r.is_empty() && r.len() < 50, "stopped early after {} steps", r.len());
    assert!(eps.windows(2).all(|w| w[1] > w[0]) && *eps.last().unwrap() <= budget, "{eps:?}");
    // q = 1 (the whole data set per step): the next step would pass the budget.
    let orders = default_orders();
    let next = privacy_spent(&orders, &compute_rdp(1.0, 1.0, r.len() + 1, &orders), 1e-5).0;
    assert!(next > budget);
}
