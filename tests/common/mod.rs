//! Shared helpers for the integration tests: the device under test (WEBPEFT_TEST_DEVICE =
//! cpu | gpu | auto), fixture paths and comparisons.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use webpeft::device::{Compute, DeviceChoice, select};
use webpeft::io::safetensors::{HostTensor, parse, view_to_f32, view_to_i64};
use webpeft::io::source::ModelFiles;
use webpeft::models::hooks::Adapter;
use webpeft::models::llama::Inputs;
use webpeft::session::Session;
use webpeft::tensor::{block_on, ints, read};

pub fn compute() -> Compute {
    let choice = std::env::var("WEBPEFT_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    select(DeviceChoice::parse(&choice).expect("device")).expect("device available")
}

pub fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p)
}

pub fn smollm2_path() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else if std::env::var("WEBPEFT_REQUIRE_SMOLLM2").is_ok() {
        panic!("SmolLM2 is required (WEBPEFT_REQUIRE_SMOLLM2) but {} is missing: run scripts/fetch-model", p.display());
    } else {
        eprintln!("skipping: {} missing (scripts/fetch-model fetches it)", p.display());
        None
    }
}

pub struct Fixture {
    pub f32: BTreeMap<String, HostTensor>,
    pub i64: BTreeMap<String, (Vec<usize>, Vec<i64>)>,
}

pub fn load(p: &str) -> Fixture {
    let bytes = std::fs::read(fixture(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let st = parse(&bytes).unwrap();
    let mut f = Fixture { f32: BTreeMap::new(), i64: BTreeMap::new() };
    for (k, v) in st.tensors() {
        if let Ok(t) = view_to_f32(&k, &v) {
            f.f32.insert(k, t);
        } else {
            f.i64.insert(k.clone(), view_to_i64(&k, &v).unwrap());
        }
    }
    f
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) -> f32 {
    let d = max_abs_diff(got, want);
    eprintln!("{what}: max |d| = {d:.3e} (tol {tol:.0e})");
    assert!(d <= tol, "{what}: max |d| = {d:e} > {tol:e}");
    // Guard against comparing something with itself or with zeros.
    assert!(want.iter().any(|x| x.abs() > 1e-6), "{what}: reference is all zeros");
    d
}

/// The tiny random Llama (HF folder fixture) on the device under test.
pub fn tiny() -> Session {
    Session::load(&ModelFiles::from_path(&fixture("tiny-llama")).unwrap(), compute()).unwrap()
}

/// Load the PEFT folder `dir` (under tests/fixtures) as adapter `name`.
pub fn load_dir(s: &mut Session, name: &str, dir: &str) {
    let d = fixture(dir);
    let cfg = std::fs::read_to_string(d.join("adapter_config.json")).unwrap();
    let w = std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    s.load_adapter(name, &cfg, &w).unwrap();
}

/// Logits [2, 12, 512] of `tiny.input_ids` through `adapter`.
pub fn logits_with(s: &Session, adapter: &dyn Adapter) -> Vec<f32> {
    let fx = load("tiny-logits.safetensors");
    let (shape, ids) = &fx.i64["tiny.input_ids"];
    let inputs = Inputs { ids: ints(ids.clone(), [shape[0], shape[1]], &s.model.device), attention_mask: None };
    block_on(read(s.model.forward(&inputs, adapter, None).unwrap())).unwrap().data
}

/// Five short lines of the Zen of Python as training examples.
pub fn zen_examples() -> Vec<webpeft::train::data::Example> {
    ["Beautiful is better than ugly.", "Explicit is better than implicit.", "Simple is better than complex.", "Complex is better than complicated.", "Flat is better than nested."]
        .iter()
        .map(|t| webpeft::train::data::Example::Text(t.to_string()))
        .collect()
}

/// A task session (classification or embeddings) on the fixture model folder `dir`.
pub fn task_session(dir: &str, task: webpeft::task::TaskKind) -> webpeft::task::TaskSession {
    webpeft::task::TaskSession::load(&ModelFiles::from_path(&fixture(dir)).unwrap(), compute(), task).unwrap()
}

/// Load the adapter folder `dir` (under tests/fixtures) into a task session.
pub fn load_task_adapter(s: &mut webpeft::task::TaskSession, dir: &str) {
    let d = fixture(dir);
    s.load_adapter(&std::fs::read_to_string(d.join("adapter_config.json")).unwrap(), &std::fs::read(d.join("adapter_model.safetensors")).unwrap(), None).unwrap();
}

/// Rows flattened.
pub fn flat(v: Vec<Vec<f32>>) -> Vec<f32> {
    v.into_iter().flatten().collect()
}

/// A JSON fixture.
pub fn json(p: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(p)).unwrap()).unwrap()
}

/// The `labels` list of a fixture's train.json.
pub fn label_ids(hp: &serde_json::Value) -> Vec<usize> {
    hp["labels"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect()
}

/// A one-step AdamW trainer with a fixture's hyper-parameters (lr, weight_decay), no clipping.
pub fn trainer_from(hp: &serde_json::Value) -> webpeft::train::Trainer {
    webpeft::train::Trainer::new(webpeft::train::TrainConfig {
        optim: webpeft::train::AdamWConfig { lr: hp["lr"].as_f64().unwrap(), weight_decay: hp["weight_decay"].as_f64().unwrap(), ..Default::default() },
        total_steps: 1,
        max_grad_norm: None,
        ..Default::default()
    })
}

/// Every tensor after one step equals PyTorch's (the same names), and moved.
pub fn assert_step(before: &BTreeMap<String, HostTensor>, after: &BTreeMap<String, HostTensor>, want: &Fixture) {
    assert_step_moving(before, after, want, |_| true);
}

/// The same where only the tensors `moves(name)` must have moved: a key projection's bias
/// gets no gradient (softmax is invariant to it: q·b_k is the same for every key), only
/// rounding noise (~1e-9) that AdamW's normalisation turns into steps of up to ~lr·|g|/eps
/// in either implementation; those are compared within 1e-3 (they stay within 1e-3 of the
/// start: weight decay alone).
pub fn assert_step_moving(before: &BTreeMap<String, HostTensor>, after: &BTreeMap<String, HostTensor>, want: &Fixture, moves: impl Fn(&str) -> bool) {
    assert_eq!(after.keys().collect::<Vec<_>>(), want.f32.keys().collect::<Vec<_>>(), "the trainable tensors under peft's names");
    for (k, w) in &want.f32 {
        if moves(k) {
            assert_close(&format!("after one step: {k}"), &after[k].data, &w.data, 5e-5);
            assert!(max_abs_diff(&before[k].data, &w.data) > 1e-3, "{k} moved");
        } else {
            assert_close(&format!("after one step (no gradient): {k}"), &after[k].data, &w.data, 1e-3);
            assert!(max_abs_diff(&before[k].data, &after[k].data) < 1e-3, "{k} has no gradient, yet moved");
        }
    }
}

/// Whether a tensor is a key projection's bias (no gradient: see [`assert_step_moving`]).
pub fn not_key_bias(name: &str) -> bool {
    !(name.ends_with("key.bias") || name.ends_with("k_proj.bias"))
}

/// A step's loss equals PyTorch's (train.json `key`) within 1e-5.
pub fn assert_loss(what: &str, got: f32, hp: &serde_json::Value, key: &str) {
    let want = hp[key].as_f64().unwrap();
    let d = (got as f64 - want).abs();
    eprintln!("{what}: loss {got} vs torch {want}: |d| = {d:.2e}");
    assert!(d < 1e-5, "{what}: |d| = {d:e}");
}

/// Training seeds the device's random stream at each step (dropout draws from it), and the
/// tests of one binary run in parallel on the same device: a test that trains holds this lock
/// so another's seeding cannot land between its seed and its draws.
#[allow(dead_code)]
pub fn device_rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Deterministic values in about [-1, 1].
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect()
}
