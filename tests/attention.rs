//! The blocked attention and the fused attention kernels against the reference tensor ops and
//! against a direct f64 computation on the host: outputs, and the gradients of q, k and v
//! (causal, grouped-query, keys in front of the queries, padding, head sizes 32/64/128, sizes
//! that are not multiples of the tiles; the blocked attention in one block and in several).
//! On Burn's CPU backend only the reference runs (against f64).

mod common;

use burn::tensor::Tensor;
use webpeft::models::attention::{AttentionImpl, Mask, PreparedMask, attention, blocked};
use webpeft::quant::kernel::runs_kernel;
use webpeft::tensor::{block_on, floats, read};

struct Case {
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    past: usize,
    hd: usize,
    /// Padding keys at the start of the last row (left padding).
    pad: usize,
}

/// out = softmax(q·kᵀ·scale + mask)·v in f64, the mask as the reference's.
fn host(c: &Case, q: &[f32], k: &[f32], v: &[f32], mask: &Mask) -> Vec<f64> {
    let s = c.past + c.t;
    let scale = 1.0 / (c.hd as f64).sqrt();
    let mut out = vec![0f64; c.b * c.nh * c.t * c.hd];
    for b in 0..c.b {
        for h in 0..c.nh {
            let g = h / (c.nh / c.nkv);
            for i in 0..c.t {
                let qi = &q[((b * c.nh + h) * c.t + i) * c.hd..][..c.hd];
                let scores: Vec<f64> = (0..s)
                    .map(|j| {
                        let kj = &k[((b * c.nkv + g) * s + j) * c.hd..][..c.hd];
                        let dot: f64 = qi.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let hidden = j > c.past + i || mask.keys.as_ref().is_some_and(|m| m[b * s + j] == 0);
                        if hidden { f64::NEG_INFINITY } else { dot * scale }
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, p) in e.iter().enumerate() {
                    let vj = &v[((b * c.nkv + g) * s + j) * c.hd..][..c.hd];
                    for d in 0..c.hd {
                        out[((b * c.nh + h) * c.t + i) * c.hd + d] += p / z * vj[d] as f64;
                    }
                }
            }
        }
    }
    out
}

/// (output, dq, dk, dv) of `sum(attention(q, k, v) * w)`.
fn run(c: &Case, imp: AttentionImpl, data: &[Vec<f32>; 4], mask: &Mask, device: &burn::tensor::Device) -> [Vec<f32>; 4] {
    let s = c.past + c.t;
    let prepared = mask.prepare(imp, c.nh, c.hd, device);
    assert_eq!(matches!(prepared, PreparedMask::Keys { .. }), imp != AttentionImpl::Reference && runs_kernel(device));
    let t = |x: &Vec<f32>, shape: [usize; 4]| floats(x.clone(), shape, device).autodiff().require_grad();
    let q = t(&data[0], [c.b, c.nh, c.t, c.hd]);
    let k = t(&data[1], [c.b, c.nkv, s, c.hd]);
    let v = t(&data[2], [c.b, c.nkv, s, c.hd]);
    let w: Tensor<4> = floats(data[3].clone(), [c.b, c.nh, c.t, c.hd], device).autodiff();
    let out = attention(q.clone(), k.clone(), v.clone(), &prepared, 1.0 / (c.hd as f64).sqrt());
    let grads = (out.clone() * w).sum().backward();
    let g = |x: &Tensor<4>| block_on(read(x.grad(&grads).expect("a gradient"))).unwrap().data;
    [block_on(read(out)).unwrap().data, g(&q), g(&k), g(&v)]
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    common::max_abs_diff(a, b) / scale
}

#[test]
fn blocked_and_fused_attention_match_the_reference_and_f64() {
    let compute = common::compute();
    let device = compute.device.clone();
    let cases = [
        Case { b: 2, nh: 4, nkv: 2, t: 37, past: 5, hd: 64, pad: 3 },
        Case { b: 1, nh: 3, nkv: 3, t: 1, past: 40, hd: 64, pad: 0 },
        Case { b: 2, nh: 2, nkv: 1, t: 70, past: 0, hd: 128, pad: 0 },
        Case { b: 1, nh: 2, nkv: 2, t: 33, past: 17, hd: 32, pad: 6 },
    ];
    for (n, c) in cases.iter().enumerate() {
        let s = c.past + c.t;
        let data = [
            common::values(c.b * c.nh * c.t * c.hd, 10 * n as u64 + 1).iter().map(|x| x * 3.0).collect(),
            common::values(c.b * c.nkv * s * c.hd, 10 * n as u64 + 2).iter().map(|x| x * 3.0).collect(),
            common::values(c.b * c.nkv * s * c.hd, 10 * n as u64 + 3),
            common::values(c.b * c.nh * c.t * c.hd, 10 * n as u64 + 4),
        ];
        let keys = (c.pad > 0).then(|| (0..c.b * s).map(|i| if i / s == c.b - 1 && i % s < c.pad { 0 } else { 1 }).collect());
        let mask = Mask { batch: c.b, t: c.t, past: c.past, keys };
        let expect: Vec<f32> = host(c, &data[0], &data[1], &data[2], &mask).iter().map(|x| *x as f32).collect();
        let reference = run(c, AttentionImpl::Reference, &data, &mask, &device);
        let r = max_rel(&reference[0], &expect);
        eprintln!("case {n}: reference vs f64: output {r:.2e}");
        assert!(r < 1e-5, "case {n}: reference output vs f64 {r:.2e}");
        if !runs_kernel(&device) {
            continue;
        }
        // The blocked attention in one block, then in blocks of 8 query rows (the last one
        // shorter; the keys each block sees cut causally), then the fused kernels.
        let one_row = c.b * c.nh * s * 4;
        for (imp, block_bytes) in [(AttentionImpl::Blocked, 16 << 20), (AttentionImpl::Blocked, 8 * one_row), (AttentionImpl::Fused, 16 << 20)] {
            blocked::set_block_bytes(block_bytes);
            let blocks = if imp == AttentionImpl::Blocked { c.t.div_ceil(blocked::block_rows(c.b, c.nh, s)) } else { 0 };
            let got = run(c, imp, &data, &mask, &device);
            let o = max_rel(&got[0], &expect);
            let grads: Vec<f32> = (1..4).map(|i| max_rel(&got[i], &reference[i])).collect();
            eprintln!("case {n}: {imp:?} ({blocks} blocks) vs f64: output {o:.2e}; vs reference: dq {:.2e} dk {:.2e} dv {:.2e}", grads[0], grads[1], grads[2]);
            assert!(o < 1e-5, "case {n}: {imp:?} output vs f64 {o:.2e}");
            for (name, g) in ["dq", "dk", "dv"].iter().zip(&grads) {
                assert!(*g < 1e-4, "case {n}: {imp:?} {name} vs reference {g:.2e}");
            }
        }
        blocked::set_block_bytes(16 << 20);
    }
}

/// Time and memory of one attention forward + backward at SmolLM2-135M's shape (9 heads, 3 kv
/// heads, head size 64), every implementation, T = 128..2048: `cargo test --release --test
/// attention -- --ignored --nocapture` (WEBPEFT_TEST_DEVICE=gpu).
#[test]
#[ignore]
fn attention_timing() {
    let compute = common::compute();
    let device = compute.device.clone();
    if !runs_kernel(&device) {
        eprintln!("skipping: the fused kernels need a GPU (WEBPEFT_TEST_DEVICE=gpu)");
        return;
    }
    for t in [128, 256, 512, 1024, 2048] {
        let c = Case { b: 2, nh: 9, nkv: 3, t, past: 0, hd: 64, pad: 0 };
        let data = [common::values(2 * 9 * t * 64, 1), common::values(2 * 3 * t * 64, 2), common::values(2 * 3 * t * 64, 3), common::values(2 * 9 * t * 64, 4)];
        let mask = Mask { batch: 2, t, past: 0, keys: None };
        for imp in [AttentionImpl::Reference, AttentionImpl::Blocked, AttentionImpl::Fused] {
            if (imp == AttentionImpl::Fused && t > 1024) || (imp == AttentionImpl::Reference && t > 1024 && std::env::var("WEBPEFT_TIME_REFERENCE_2048").is_err()) {
                continue;
            }
            run(&c, imp, &data, &mask, &device);
            let before = webpeft::device::memory_usage(&device).map_or(0, |m| m.1);
            let t0 = std::time::Instant::now();
            run(&c, imp, &data, &mask, &device);
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            let after = webpeft::device::memory_usage(&device).map_or(0, |m| m.1);
            eprintln!(
                "T={t} {}: forward+backward {ms:.0} ms, pool reserved {:.1} MiB (+{:.1})",
                imp.name(),
                after as f64 / 1048576.0,
                (after - before.min(after)) as f64 / 1048576.0
            );
        }
    }
}
