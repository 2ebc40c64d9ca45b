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
