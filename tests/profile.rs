#![cfg(not(target_family = "wasm"))]
//! The kernel profiler (`webpeft::profile`): launches counted by kernel, timed on the device.
//! Its own test binary, with one test: the launch observer is process-wide, so kernels of
//! tests running beside it would land in its profiles.

mod common;

use common::*;
use webpeft::profile::{KernelProfile, Profiler};
use webpeft::tensor::{block_on, floats, wait_for};
use webpeft::train::data::Batch;
use webpeft::train::{TrainConfig, Trainer};

fn launches(p: &KernelProfile, prefix: &str) -> usize {
    p.kernels.iter().filter(|k| k.kernel.starts_with(prefix)).map(|k| k.launches).sum()
}

/// What every profile must satisfy: the table adds up, and the device time fits in the host
/// time that waited for it.
fn check_totals(p: &KernelProfile) {
    assert_eq!(p.launches, p.kernels.iter().map(|k| k.launches).sum::<usize>());
    assert_eq!(p.timed, p.launches, "every launch carries a measurement");
    let sum: f64 = p.kernels.iter().map(|k| k.seconds).sum();
    assert!((sum - p.kernel_seconds).abs() <= 1e-9 * p.kernel_seconds.max(1.0));
    assert!((p.kernels.iter().map(|k| k.share).sum::<f64>() - 1.0).abs() < 1e-9);
    assert!(p.kernels.windows(2).all(|w| w[0].seconds >= w[1].seconds), "most time first");
    assert!(p.kernels.iter().all(|k| k.seconds > 0.0), "{p:?}");
    if p.timing == "device" {
        // Kernels on one queue do not overlap: their time fits in their span, and the span
        // in the host's wait (a unit error in the timestamp period would break one of these).
        let (span, idle) = (p.span_seconds.unwrap(), p.idle_seconds.unwrap());
        assert!(p.kernel_seconds <= span * 1.0001 && span <= p.wall_seconds, "{p:?}");
        assert!(idle >= 0.0 && idle <= span, "{p:?}");
    }
}

#[test]
fn kernels_are_counted_by_name_and_timed_on_the_device() {
    let c = compute();
    let dev = c.device.clone();
    let n = 256;
    let a = floats(values(n * n, 1), [n, n], &dev);
    let b = floats(values(n * n, 2), [n, n], &dev);
    block_on(wait_for(vec![a.clone(), b.clone()])).unwrap();

    // A known composition: three products, each plus b.
    let profiler = Profiler::start();
    let outs = (0..3).map(|_| a.clone().matmul(b.clone()).add(b.clone())).collect();
    block_on(wait_for(outs)).unwrap();
    let p = block_on(profiler.finish());
    eprintln!("{}", p.table(10));
    if !c.is_gpu {
        assert_eq!(p.launches, 0, "the CPU backend launches no kernels: {p:?}");
        return;
    }
    assert_eq!(launches(&p, "MatmulEntry"), 3, "{p:?}");
    assert_eq!(launches(&p, "KernelBinop<AddOp>"), 3, "{p:?}");
    check_totals(&p);
    let matmul: f64 = p.kernels.iter().filter(|k| k.kernel.starts_with("MatmulEntry")).map(|k| k.seconds).sum();
    // Nothing multiplies at a PFLOP/s: a tick count read as nanoseconds where it was
    // microseconds (or the reverse) would show here or in the wall-time bound above.
    assert!(matmul >= 3.0 * 2.0 * (n as f64).powi(3) / 1e15, "{matmul}");

    // AdamW: one kernel per tensor (after the first step, which also makes the zero moments),
    // where the tensor ops launch 14.
    for (fused, per_tensor) in [(true, 1), (false, 14)] {
        let mut opt = webpeft::train::AdamW::new(webpeft::train::AdamWConfig { fused, ..Default::default() });
        let mut params: Vec<burn::tensor::Tensor<2>> = (0..3).map(|i| floats(values(40 * (i + 1), 7 + i as u64), [4, 10 * (i + 1)], &dev).autodiff().require_grad()).collect();
        let grads = |params: &[burn::tensor::Tensor<2>]| params.iter().map(|p| p.clone().without_autodiff().mul_scalar(0.5)).collect::<Vec<_>>();
        let g = grads(&params);
        opt.update(&mut params.iter_mut().collect::<Vec<_>>(), g, 1e-3);
        let g = grads(&params);
        block_on(wait_for(g.clone())).unwrap();
        let profiler = Profiler::start();
        opt.update(&mut params.iter_mut().collect::<Vec<_>>(), g, 1e-3);
        block_on(wait_for(params.iter().map(|p| p.clone().without_autodiff()).collect())).unwrap();
        let p = block_on(profiler.finish());
        let updates = p.launches - launches(&p, "SliceKernel") - launches(&p, "SliceAssignKernel") - launches(&p, "CopyKernel");
        assert_eq!(updates, 3 * per_tensor, "fused {fused}: {}", p.table(20));
        if fused {
            assert_eq!(launches(&p, "AdamwKernel"), 3, "{}", p.table(20));
        }
    }

    // Two identical training steps launch the same kernels the same number of times.
    let mut s = tiny();
    let lora = serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]});
    s.add_adapter("a", &lora, 0).unwrap();
    let (rows, len) = (2, 12);
    let ids: Vec<i64> = (0..rows * len).map(|i| (i * 37 % 500) as i64 + 3).collect();
    let batch = Batch { batch: rows, len, input_ids: ids.clone(), attention_mask: vec![1; rows * len], labels: ids, tasks: vec![] };
    let mut tr = Trainer::new(TrainConfig::default());
    let adapter = s.adapters.get_mut("a").unwrap();
    webpeft::peft::set_trainable(adapter, true);
    block_on(tr.step(&s.model, adapter, std::slice::from_ref(&batch))).unwrap();
    let mut profiles = Vec::new();
    for _ in 0..2 {
        let profiler = Profiler::start();
        block_on(tr.step(&s.model, adapter, std::slice::from_ref(&batch))).unwrap();
        profiles.push(block_on(profiler.finish()));
    }
    let counts = |p: &KernelProfile| {
        let mut v: Vec<(String, usize)> = p.kernels.iter().map(|k| (k.kernel.clone(), k.launches)).collect();
        v.sort();
        v
    };
    for p in &profiles {
        check_totals(p);
        // A LoRA step multiplies: the base's projections, the adapter's, their gradients.
        assert!(launches(p, "MatmulEntry") >= 2 * 7, "{}", p.table(30));
    }
    assert_eq!(counts(&profiles[0]), counts(&profiles[1]));
    // By phase: the trainer's three, adding up to the totals; the optimizer's kernels (one
    // per LoRA tensor: 2 layers × q, v × A, B) in `update` only, matmuls in the passes.
    let p = &profiles[1];
    let names: Vec<&str> = p.phases.iter().map(|ph| ph.phase).collect();
    assert_eq!(names, ["forward", "backward", "update"], "{}", p.table(10));
    assert_eq!(p.phases.iter().map(|ph| ph.launches).sum::<usize>(), p.launches);
    assert!((p.phases.iter().map(|ph| ph.seconds).sum::<f64>() - p.kernel_seconds).abs() <= 1e-9 * p.kernel_seconds.max(1.0));
    assert!(p.phases.iter().all(|ph| ph.seconds > 0.0 && ph.launches > 0), "{p:?}");
    let update = p.phases.iter().find(|ph| ph.phase == "update").unwrap();
    assert!(update.launches >= 8 && update.launches < 60, "the update: 8 AdamW kernels, the norm and clipping coefficient: {}", p.table(10));
    eprintln!("tiny Llama LoRA step:\n{}", profiles[1].table(12));
}
