//! The quantized frozen base: the matmul kernel (forward and input gradient) against the
//! host dequantization for every format, and whole models held quantized against the same
//! models dequantized to f32 (logits, a LoRA step). On the CPU backend the reference path
//! (tensor-op dequantization) runs where the GPU runs the kernel.

#![cfg(not(target_family = "wasm"))]

mod common;

use burn::tensor::{Device, Tensor, TensorData};
use common::*;
use webpeft::io::source::ModelFiles;
use webpeft::models::linear::{Linear, Weight};
use webpeft::quant::weight::QuantWeight;
use webpeft::quant::{BaseFormat, QuantFormat, QuantHost, reference_matmul, reference_matmul_t};
use webpeft::session::Session;
use webpeft::session::TrainOptions;
use webpeft::tensor::{block_on, read};

fn tensor(data: Vec<f32>, shape: [usize; 2], device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(data, shape), device)
}

#[test]
fn quantized_matmul_and_its_input_gradient_match_the_dequantized_weight() {
    let c = compute();
    assert_eq!(webpeft::quant::kernel::runs_kernel(&c.device), c.is_gpu, "the kernel runs exactly on the GPU");
    assert_eq!(webpeft::quant::kernel::runs_kernel(&c.device.clone().autodiff()), c.is_gpu);
    // Odd sizes: partial tiles everywhere (37 and 20 rows of 53 columns: both 64-row tiles;
    // tests/matmul.rs covers the 16-row ones); NF4's 64-value blocks straddle rows of 80; 1
    // and 3 rows run the forward as matrix-vector products.
    let n = 53;
    for (m, f) in [37, 20, 1, 3].into_iter().flat_map(|m| QuantFormat::ALL.map(|f| (m, f))) {
        for k in [96, 80] {
            if k % f.block() != 0 && f != QuantFormat::Nf4 {
                continue;
            }
            let q = QuantHost::quantize(f, n, k, &values(n * k, 1 + k as u64)).unwrap();
            let x = values(m * k, 7);
            let g = values(m * n, 11);
            let qw = QuantWeight::upload(&q, &c.device).unwrap();
            let lin = Linear { weight: Weight::Quant(qw.clone()), bias: None };
            // Forward.
            let y = block_on(read(lin.forward(&tensor(x.clone(), [m, k], &c.device)))).unwrap();
            let what = format!("{} [{m}, {k}] · [{n}, {k}]ᵀ", f.name());
            assert_close(&format!("{what}: forward"), &y.data, &reference_matmul_t(&x, m, &q), 2e-5);
            // Backward: d/dx of sum(y * g) = g · W.
            let ad = c.device.clone().autodiff();
            let xa = tensor(x.clone(), [m, k], &ad).require_grad();
            let loss = (lin.forward(&xa) * tensor(g.clone(), [m, n], &ad)).sum();
            let grads = loss.backward();
            let dx = block_on(read(xa.grad(&grads).expect("x has a gradient"))).unwrap();
            assert_close(&format!("{what}: input gradient"), &dx.data, &reference_matmul(&g, m, &q), 2e-5);
            // The tensor-op dequantization (merging, DoRA) equals the host's.
            assert_close(&format!("{what}: dequantize on the device"), &block_on(read(qw.dequantize())).unwrap().data, &q.dequantize(), 0.0);
        }
    }
}

#[test]
fn embedding_rows_decode_only_what_is_asked() {
    let c = compute();
    let (v, h) = (50, 64);
    for f in QuantFormat::ALL {
        let q = QuantHost::quantize(f, v, h, &values(v * h, 3)).unwrap();
        let full = q.dequantize();
        let qw = QuantWeight::upload(&q, &c.device).unwrap();
        let ids = webpeft::tensor::ints(vec![3, 0, 49, 3], [4], &c.device);
        let got = block_on(read(qw.select_rows(ids))).unwrap();
        let want: Vec<f32> = [3, 0, 49, 3].iter().flat_map(|&r| full[r * h..(r + 1) * h].to_vec()).collect();
        assert_eq!(got.data, want, "{}", f.name());
    }
}

fn gguf(name: &str) -> ModelFiles {
    ModelFiles::from_path(&fixture(&format!("tiny-gguf/{name}"))).unwrap()
}

fn logits(s: &Session, adapter: &[&str]) -> Vec<f32> {
    block_on(s.logits(&[1, 5, 9, 14, 2, 7, 30, 11], adapter)).unwrap().data
}

#[test]
fn a_gguf_base_kept_quantized_equals_it_dequantized() {
    for (file, format) in [("tiny-q8_0.gguf", QuantFormat::Q8_0), ("tiny-q4_0.gguf", QuantFormat::Q4_0), ("tiny-q4_1.gguf", QuantFormat::Q4_1)] {
        let kept = Session::load_as(&gguf(file), compute(), BaseFormat::Keep).unwrap();
        let f32 = Session::load_as(&gguf(file), compute(), BaseFormat::F32).unwrap();
        let formats: Vec<_> = kept.model.sites().into_iter().map(|s| kept.model.linear(s).weight.format()).collect();
        assert!(formats.iter().all(|f| *f == Some(format)), "{file}: every linear layer kept as {format:?}: {formats:?}");
        let (a, b) = (kept.model.base_memory().bytes, f32.model.base_memory().bytes);
        eprintln!("{file}: base {a} bytes kept, {b} bytes in f32 ({:.1}%)", 100.0 * a as f64 / b as f64);
        assert!(a < b);
        assert_close(&format!("{file}: logits kept vs dequantized"), &logits(&kept, &[]), &logits(&f32, &[]), 1e-4);
    }
}

#[test]
fn lora_trains_on_a_quantized_base_as_on_its_f32_reference() {
    let cfg = serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]});
    let ex = zen_examples();
    let o = TrainOptions { steps: 3, batch: 2, seq_len: 24, lr: 1e-2, seed: 5, ..Default::default() };
    for format in [BaseFormat::Keep, BaseFormat::To(QuantFormat::Nf4), BaseFormat::To(QuantFormat::Q8_0)] {
        let run = |f: BaseFormat, reference: bool| {
            // The reference holds the same (de)quantized values in f32.
            let mut s = Session::load_as(&gguf("tiny-q4_1.gguf"), compute(), f).unwrap();
            if reference {
                s.model.dequantize_all();
                assert_eq!(s.model.base_memory().bytes, Session::load_as(&gguf("tiny-q4_1.gguf"), compute(), BaseFormat::F32).unwrap().model.base_memory().bytes);
            }
            s.add_adapter("a", &cfg, 0).unwrap();
            let reports = block_on(s.train("a", &ex, &o, |_| true)).unwrap();
            (reports.iter().map(|r| r.stats.loss).collect::<Vec<_>>(), logits(&s, &["a"]))
        };
        let (lq, yq) = run(format, false);
        let (lr, yr) = run(format, true);
        eprintln!("{}: losses {lq:?} vs reference {lr:?}", format.name());
        assert_close(&format!("{}: training losses vs the f32 reference", format.name()), &lq, &lr, 1e-4);
        assert_close(&format!("{}: logits after 3 LoRA steps vs the f32 reference", format.name()), &yq, &yr, 1e-3);
    }
}

/// Timing of the kernel against Burn's f32 matmul at SmolLM2's shapes (run by hand:
/// `cargo test --release --test quant -- --ignored --nocapture`).
#[test]
#[ignore]
fn kernel_timing_against_the_dense_matmul() {
    let c = compute();
    for (m, k, n) in [(64, 576, 1536), (64, 1536, 576), (64, 576, 49152), (1, 576, 1536), (1, 576, 49152), (256, 576, 1536)] {
        let w = values(n * k, 3);
        let x = tensor(values(m * k, 5), [m, k], &c.device);
        let dense = tensor(w.clone(), [n, k], &c.device).transpose();
        for f in [QuantFormat::Q4_1, QuantFormat::Q8_0] {
            let q = QuantWeight::upload(&QuantHost::quantize(f, n, k, &w).unwrap(), &c.device).unwrap();
            let lin = Linear { weight: Weight::Quant(q), bias: None };
            let time = |g: &dyn Fn() -> Tensor<2>| {
                block_on(read(g())).unwrap();
                let t = std::time::Instant::now();
                for _ in 0..3 {
                    block_on(read(g().narrow(0, 0, 1).narrow(1, 0, 1))).unwrap();
                }
                t.elapsed().as_secs_f64() / 3.0 * 1e3
            };
            let tq = time(&|| lin.forward(&x));
            let td = time(&|| x.clone().matmul(dense.clone()));
            let gflop = 2.0 * (m * k * n) as f64 / 1e9;
            eprintln!("[{m},{k}]·[{k},{n}] {}: kernel {tq:.1} ms ({:.2} GFLOP/s), dense {td:.1} ms ({:.2} GFLOP/s)", f.name(), gflop / tq * 1e3, gflop / td * 1e3);
        }
    }
}

#[test]
fn smollm2_q4_1_kept_quantized_fits_the_memory_target_with_the_same_logits() {
    let Some(p) = smollm2_path() else { return };
    let files = ModelFiles::from_path(&p).unwrap();
    let kept = Session::load_as(&files, compute(), BaseFormat::Keep).unwrap();
    let mut reference = Session::load_as(&files, compute(), BaseFormat::Keep).unwrap();
    reference.model.dequantize_all();
    let (q, f) = (kept.model.base_memory().bytes, reference.model.base_memory().bytes);
    eprintln!("SmolLM2 base: {:.1} MiB kept (Q4_1 layers, Q8_0 embeddings) vs {:.1} MiB f32 = {:.1}%", q as f64 / 1048576.0, f as f64 / 1048576.0, 100.0 * q as f64 / f as f64);
    assert!(q * 10 <= f * 3, "the Q4_1 base holds at most 30% of its f32 memory");
    let ids = kept.tokenizer.encode("The capital of France is").unwrap();
    let a = block_on(kept.logits(&ids, &[])).unwrap().data;
    assert_close("SmolLM2 logits, Q4_1 kept vs dequantized to f32", &a, &block_on(reference.logits(&ids, &[])).unwrap().data, 1e-4);
}
