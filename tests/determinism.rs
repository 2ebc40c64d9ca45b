#![cfg(not(target_family = "wasm"))]
//! Determinism: two runs with the same seed, data and device give byte-identical adapters.
//! Its own test binary with one test: Burn's device RNG (dropout) is shared by the threads of
//! a process, so another test training at the same time would reseed it.

mod common;

use common::*;
use webpeft::session::TrainOptions;
use webpeft::tensor::block_on;
use webpeft::train::privacy::DpConfig;

#[test]
fn same_seed_gives_byte_identical_adapters() {
    let run = |o: &TrainOptions| {
        let mut s = tiny();
        let cfg = serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]});
        s.add_adapter("a", &cfg, 3).unwrap();
        block_on(s.train("a", &zen_examples(), o, |_| true)).unwrap();
        block_on(s.save_adapter("a")).unwrap().1
    };
    // Dropout, shuffling, Poisson sampling and DP noise all draw from the seed.
    let o = TrainOptions {
        steps: 4,
        batch: 2,
        seq_len: 32,
        lr: 1e-2,
        seed: 11,
        dp: Some(DpConfig { max_grad_norm: 0.5, noise_multiplier: Some(1.0), delta: 1e-5, target_epsilon: None, poisson: true }),
        ..Default::default()
    };
    let first = run(&o);
    assert_eq!(first, run(&o), "same seed, same bytes");
    assert_ne!(first, run(&TrainOptions { seed: 12, ..o.clone() }), "another seed differs");
    let plain = TrainOptions { dp: None, ..o.clone() };
    assert_eq!(run(&plain), run(&plain));
}
