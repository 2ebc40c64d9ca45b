//! The f16 base (`BaseFormat::F16`): weight matrices held in f16 and used as autocast uses
//! them (matmul inputs rounded to f16, f32 accumulation, f16 outputs widened), checked
//! against PyTorch running the same scheme on tiny-llama (tests/fixtures/tiny-f16.*, made by
//! scripts/fixtures/make_f16_fixture.py): logits, and one LoRA step with loss scaling. Also
//! the loss scaler's overflow rule and `keep-f16` on a GGUF.

#![cfg(not(target_family = "wasm"))]

mod common;

use common::*;
use webpeft::io::source::ModelFiles;
use webpeft::peft::{load_params, read_params, set_trainable};
use webpeft::quant::{BaseFormat, QuantFormat};
use webpeft::session::Session;
use webpeft::tensor::block_on;
use webpeft::train::data::Batch;
use webpeft::train::scaler::LossScaler;
use webpeft::train::{AdamWConfig, TrainConfig, Trainer};

fn tiny_as(format: BaseFormat) -> Session {
    Session::load_as(&ModelFiles::from_path(&fixture("tiny-llama")).unwrap(), compute(), format).unwrap()
}

fn train_batch(fx: &Fixture) -> Batch {
    let (shape, ids) = &fx.i64["input_ids"];
    Batch { batch: shape[0], len: shape[1], input_ids: ids.clone(), attention_mask: fx.i64["attention_mask"].1.clone(), labels: fx.i64["labels"].1.clone(), tasks: vec![] }
}

/// The first row of tiny-train's batch (no padding) as token ids.
fn first_row(fx: &Fixture) -> Vec<u32> {
    let (shape, ids) = &fx.i64["input_ids"];
    ids[..shape[1]].iter().map(|&i| i as u32).collect()
}

#[test]
fn an_f16_base_holds_half_the_bytes_and_gives_pytorchs_logits() {
    let half = tiny_as(BaseFormat::F16);
    let full = tiny_as(BaseFormat::F32);
    assert!(half.model.has_half_weights() && !full.model.has_half_weights());
    assert_eq!(half.model.base_formats(), "f16");
    let (h, f) = (half.model.base_memory().bytes, full.model.base_memory().bytes);
    // Everything but the norm weights (5 × 64 f32) is halved.
    assert_eq!(h, (f - 5 * 64 * 4) / 2 + 5 * 64 * 4, "f16 base bytes {h} vs f32 {f}");
    let fx = load("tiny-f16.safetensors");
    let train = load("tiny-train.safetensors");
    let ids = first_row(&train);
    let n = ids.len() * 512;
    let got = block_on(half.logits(&ids, &[])).unwrap().data;
    let f16_vs_f32 = max_abs_diff(&fx.f32["logits"].data[..n], &fx.f32["logits_f32"].data[..n]);
    eprintln!("PyTorch: the f16 scheme moves the logits by {f16_vs_f32:.3e} from f32");
    // Every matmul output is rounded to f16, so an f32 accumulation that differs from
    // PyTorch's in its last bits may round to the neighbouring f16 value, and such steps add
    // up through the layers: allow a third of what f16 moves the logits by, and require the
    // match to be far closer than f16 is to f32 on average.
    let want = &fx.f32["logits"].data[..n];
    let flips = got.iter().zip(want).filter(|(g, w)| (*g - *w).abs() > 1e-4).count();
    let max = max_abs_diff(&got, want);
    assert!(max <= f16_vs_f32 / 3.0, "f16 base logits vs PyTorch: {max:e}");
    let mean = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32;
    let (m, m32) = (mean(&got, want), mean(want, &fx.f32["logits_f32"].data[..n]));
    eprintln!("f16 base logits vs PyTorch (same scheme): max |d| {max:.3e}, mean {m:.3e}, {flips}/{n} differ; f16 vs f32 mean {m32:.3e}");
    assert!(m * 4.0 < m32, "the match ({m:e}) is much closer than f16 is to f32 ({m32:e})");
    // Against the f32 base and the f16 weights widened to f32 (the "dequantized" reference).
    let mut widened = tiny_as(BaseFormat::F16);
    widened.model.dequantize_all();
    assert!(!widened.model.has_half_weights());
    let w = block_on(widened.logits(&ids, &[])).unwrap().data;
    eprintln!("f16 base vs its weights widened to f32: {:.3e}; vs the f32 base: {:.3e}", max_abs_diff(&got, &w), max_abs_diff(&got, &block_on(full.logits(&ids, &[])).unwrap().data));
}

#[test]
fn a_lora_step_on_an_f16_base_with_loss_scaling_matches_pytorch() {
    let fx = load("tiny-f16.safetensors");
    let train = load("tiny-train.safetensors");
    let mut s = tiny_as(BaseFormat::F16);
    load_dir(&mut s, "qv", "tiny-adapters/qv");
    let init: std::collections::BTreeMap<_, _> = train.f32.iter().filter_map(|(k, v)| k.strip_prefix("init.").map(|k| (k.to_string(), v.clone()))).collect();
    let a = s.adapters.get_mut("qv").unwrap();
    assert!(load_params(a, &init).unwrap() > 0);
    set_trainable(a, true);
    let mut tr = Trainer::new(TrainConfig { optim: AdamWConfig { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, ..Default::default() }, ..Default::default() });
    let batch = train_batch(&train);
    // PyTorch halved the scale `overflows` times before the gradients were finite: each of
    // those is a skipped step here.
    let overflows = fx.f32["overflows"].data[0] as usize;
    let mut skipped = 0;
    let st = loop {
        let st = block_on(tr.step(&s.model, a, std::slice::from_ref(&batch))).unwrap();
        if !st.skipped {
            break st;
        }
        skipped += 1;
        assert!(skipped <= overflows, "more overflows than PyTorch's {overflows}");
    };
    assert_eq!(skipped, overflows);
    assert_eq!(tr.scaler.map(|s| s.scale), Some(fx.f32["scale"].data[0]), "the loss scale in use");
    assert_eq!(tr.nonfinite, 0, "an overflow is not a non-finite step");
    let want = fx.f32["loss_step0"].data[0];
    eprintln!("loss {} vs torch {want} (f32 run: {})", st.loss, train.f32["loss_step0"].data[0]);
    assert!((st.loss - want).abs() < 1e-3, "loss {} vs {want}", st.loss);
    for (k, t) in block_on(read_params(a)).unwrap() {
        let want = &fx.f32[&format!("step1.{k}")].data;
        let g = &fx.f32[&format!("grad0.{k}")].data;
        // A first Adam step is lr·g/(|g|+eps): where |g| is tiny next to the tensor's largest
        // gradient, f16 rounding of the backward pass can move it by up to lr; elsewhere it
        // must agree closely.
        let gmax = g.iter().fold(0f32, |m, x| m.max(x.abs()));
        let (mut worst, mut moved) = (0f32, 0usize);
        for ((a, b), g) in t.data.iter().zip(want).zip(g) {
            let d = (a - b).abs();
            if g.abs() > 1e-2 * gmax {
                worst = worst.max(d);
            } else if d > 1e-3 {
                moved += 1;
            }
            assert!(d <= 2.0 * 1e-2 + 1e-6, "{k}: |d| = {d} beyond one Adam step");
        }
        eprintln!("{k}: max |d| = {worst:.3e} where |g| > 1% of max; {moved}/{} small-gradient entries moved > 1e-3", t.data.len());
        assert!(worst < 1e-3, "{k}: {worst}");
        assert!(moved * 20 <= t.data.len(), "{k}: {moved} entries with small gradients differ");
    }
}

#[test]
fn an_overflow_skips_the_step_halves_the_scale_and_keeps_the_adapter() {
    let train = load("tiny-train.safetensors");
    let mut s = tiny_as(BaseFormat::F16);
    load_dir(&mut s, "qv", "tiny-adapters/qv");
    let a = s.adapters.get_mut("qv").unwrap();
    set_trainable(a, true);
    let before = block_on(read_params(a)).unwrap();
    let mut tr = Trainer::new(TrainConfig { optim: AdamWConfig { lr: 1e-2, ..Default::default() }, max_nonfinite: 1, ..Default::default() });
    // A scale far beyond f16's range: the gradients through the f16 matmuls overflow.
    tr.scaler = Some(LossScaler { scale: 1e30, good_steps: 7 });
    let st = block_on(tr.step(&s.model, a, std::slice::from_ref(&train_batch(&train)))).unwrap();
    assert!(st.skipped && st.loss.is_finite(), "{st:?}");
    assert_eq!(tr.scaler, Some(LossScaler { scale: 5e29, good_steps: 0 }));
    assert_eq!((tr.nonfinite, tr.opt.step), (0, 0), "not a non-finite step (max_nonfinite 1 would have stopped), no update");
    for ((k, x), (_, y)) in block_on(read_params(a)).unwrap().iter().zip(&before) {
        assert_eq!(x.data, y.data, "{k} unchanged");
    }
    // On an f32 base there is no loss scaling.
    let mut f = tiny_as(BaseFormat::F32);
    load_dir(&mut f, "qv", "tiny-adapters/qv");
    let a = f.adapters.get_mut("qv").unwrap();
    set_trainable(a, true);
    let mut tr = Trainer::new(TrainConfig::default());
    block_on(tr.step(&f.model, a, std::slice::from_ref(&train_batch(&train)))).unwrap();
    assert_eq!(tr.scaler, None);
}

#[test]
fn keep_f16_keeps_a_ggufs_blocks_and_holds_the_rest_in_f16() {
    let ids = [1, 5, 9, 14, 2, 7, 30, 11];
    let load = |file: &str, f: BaseFormat| Session::load_as(&ModelFiles::from_path(&fixture(&format!("tiny-gguf/{file}"))).unwrap(), compute(), f).unwrap();
    // Every matrix of tiny-q4_1.gguf is a Q4_1 block tensor: keep-f16 keeps them all.
    let (keep, kf16, f16) = (load("tiny-q4_1.gguf", BaseFormat::Keep), load("tiny-q4_1.gguf", BaseFormat::KeepF16), load("tiny-q4_1.gguf", BaseFormat::F16));
    assert_eq!(kf16.model.base_formats(), QuantFormat::Q4_1.name(), "linear layers kept as Q4_1");
    assert_eq!(kf16.model.base_memory().bytes, keep.model.base_memory().bytes);
    assert!(!kf16.model.has_half_weights());
    assert_eq!(block_on(kf16.logits(&ids, &[])).unwrap().data, block_on(keep.logits(&ids, &[])).unwrap().data);
    assert_eq!(f16.model.base_formats(), "f16", "f16 dequantizes the blocks");
    // tiny-f32.gguf holds dense matrices: keep-f16 holds them in f16, as f16 does.
    let (kf16, f16, keep) = (load("tiny-f32.gguf", BaseFormat::KeepF16), load("tiny-f32.gguf", BaseFormat::F16), load("tiny-f32.gguf", BaseFormat::Keep));
    assert_eq!(kf16.model.base_formats(), "f16");
    assert_eq!(kf16.model.base_memory().bytes, f16.model.base_memory().bytes);
    assert!(kf16.model.base_memory().bytes < keep.model.base_memory().bytes);
    assert_eq!(block_on(kf16.logits(&ids, &[])).unwrap().data, block_on(f16.logits(&ids, &[])).unwrap().data);
}
