//! Our f32 matmul kernel (`webpeft::matmul`) against an f64 product on the host and against
//! Burn's matmul: every tile shape it picks, sizes that are not multiples of the tiles,
//! transposed views, batched (attention-shaped) products, and the gradients of both operands.
//! On Burn's CPU backend the kernel does not run; `matmul` is then Burn's, checked against f64.

mod common;

use burn::tensor::{Device, Tensor};
use webpeft::matmul::{GEMV_ROWS, TileShape, kernel, matmul, takes};
use webpeft::quant::kernel::runs_kernel;
use webpeft::tensor::{block_on, floats, read};

/// `[batch.., m, k] · [batch.., k, n]` in f64, both row-major.
fn host(a: &[f32], b: &[f32], batch: usize, m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; batch * m * n];
    for z in 0..batch {
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|q| a[(z * m + i) * k + q] as f64 * b[(z * k + q) * n + j] as f64).sum();
                out[(z * m + i) * n + j] = s as f32;
            }
        }
    }
    out
}

/// Max |Δ| relative to the largest |value| of `want`.
fn rel(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(scale > 1e-3, "the reference is (nearly) zero");
    common::max_abs_diff(got, want) / scale
}

fn read_all<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    block_on(read(t)).unwrap().data
}

/// One product: `a` [batch, m, k] given as itself or as the transpose of a [batch, k, m]
/// tensor (a strided view), likewise `b`.
struct Case {
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    a_t: bool,
    b_t: bool,
}

/// Upload `x` (row-major [batch, r, c]) as a 3-D tensor, or as the transposed view of its
/// [batch, c, r] transpose.
fn operand(x: &[f32], batch: usize, r: usize, c: usize, t: bool, device: &Device) -> Tensor<3> {
    if !t {
        return floats(x.to_vec(), [batch, r, c], device);
    }
    let mut tr = vec![0f32; x.len()];
    for z in 0..batch {
        for i in 0..r {
            for j in 0..c {
                tr[(z * c + j) * r + i] = x[(z * r + i) * c + j];
            }
        }
    }
    floats(tr, [batch, c, r], device).swap_dims(1, 2)
}

const CASES: [Case; 17] = [
    // Wide outputs: a row (generation: the matrix-vector kernel), LoRA's up-projection, odd sizes.
    Case { batch: 1, m: 1, k: 576, n: 576, a_t: false, b_t: false },
    Case { batch: 1, m: 37, k: 100, n: 300, a_t: false, b_t: true },
    Case { batch: 1, m: 8, k: 200, n: 576, a_t: true, b_t: false },
    Case { batch: 1, m: 130, k: 8, n: 576, a_t: false, b_t: false },
    Case { batch: 1, m: 5, k: 33, n: 100, a_t: false, b_t: false },
    Case { batch: 1, m: 20, k: 50, n: 300, a_t: false, b_t: true },
    // Head-sized outputs: attention's products, batched over (batch, heads).
    Case { batch: 6, m: 37, k: 64, n: 45, a_t: false, b_t: true },
    Case { batch: 6, m: 37, k: 45, n: 64, a_t: false, b_t: false },
    Case { batch: 6, m: 45, k: 37, n: 64, a_t: true, b_t: false },
    // Rank-sized outputs (LoRA's down-projection and its gradients).
    Case { batch: 1, m: 300, k: 576, n: 8, a_t: false, b_t: false },
    Case { batch: 1, m: 576, k: 300, n: 16, a_t: true, b_t: false },
    Case { batch: 1, m: 70, k: 13, n: 1, a_t: false, b_t: true },
    Case { batch: 2, m: 3, k: 5, n: 7, a_t: true, b_t: true },
    // Generation's matrix-vector products (at most GEMV_ROWS rows): attention against a
    // 33-token cache, LoRA's down-projection, two rows of a wide output.
    Case { batch: 9, m: 1, k: 64, n: 33, a_t: false, b_t: true },
    Case { batch: 9, m: 1, k: 33, n: 64, a_t: false, b_t: false },
    Case { batch: 1, m: 1, k: 576, n: 8, a_t: false, b_t: true },
    Case { batch: 1, m: 2, k: 130, n: 200, a_t: true, b_t: false },
];

#[test]
fn the_kernel_matches_f64_and_burns_matmul() {
    let device = common::compute().device;
    let on_gpu = runs_kernel(&device);
    let mut tiles = std::collections::BTreeSet::new();
    for (i, c) in CASES.iter().enumerate() {
        let a = common::values(c.batch * c.m * c.k, 2 * i as u64 + 1);
        let b = common::values(c.batch * c.k * c.n, 2 * i as u64 + 2);
        let want = host(&a, &b, c.batch, c.m, c.k, c.n);
        let (ta, tb) = (operand(&a, c.batch, c.m, c.k, c.a_t, &device), operand(&b, c.batch, c.k, c.n, c.b_t, &device));
        let burn = read_all(ta.clone().matmul(tb.clone()));
        let r_burn = rel(&burn, &want);
        assert!(r_burn < 1e-5, "case {i}: Burn's matmul vs f64 {r_burn:.2e}");
        assert_eq!(takes(&ta, &tb), on_gpu, "case {i}");
        if !on_gpu {
            let r = rel(&read_all(matmul(ta, tb)), &want);
            assert!(r < 1e-5, "case {i}: matmul (Burn's, CPU) vs f64 {r:.2e}");
            continue;
        }
        tiles.insert(if c.m <= GEMV_ROWS { "matrix-vector".to_string() } else { format!("{:?}", TileShape::for_output(c.m, c.n)) });
        let ours = read_all(kernel(ta, tb));
        let r = rel(&ours, &want);
        eprintln!("case {i} [{}×{}×{}]×{}: kernel vs f64 {r:.2e}, Burn's vs f64 {r_burn:.2e}", c.m, c.k, c.n, c.batch);
        assert!(r < 1e-5, "case {i}: kernel vs f64 {r:.2e}");
    }
    if on_gpu {
        // Every kind of tile the kernel picks was exercised, and the matrix-vector kernel.
        assert!(tiles.len() >= 8 && tiles.contains("matrix-vector"), "tiles exercised: {tiles:?}");
    }
}

/// A 4-D product (attention's `q · kᵀ`, `k` a transposed view) equals Burn's.
#[test]
fn a_four_dimensional_product_equals_burns() {
    let device = common::compute().device;
    if !runs_kernel(&device) {
        eprintln!("skipping: the kernel runs on a CubeCL device (WEBPEFT_TEST_DEVICE=gpu)");
        return;
    }
    let q: Tensor<4> = floats(common::values(2 * 3 * 29 * 32, 7), [2, 3, 29, 32], &device);
    let k: Tensor<4> = floats(common::values(2 * 3 * 41 * 32, 8), [2, 3, 41, 32], &device);
    let want = read_all(q.clone().matmul(k.clone().swap_dims(2, 3)));
    let got = read_all(kernel(q, k.swap_dims(2, 3)));
    let r = rel(&got, &want);
    eprintln!("[2, 3, 29, 32] · [2, 3, 32, 41]: kernel vs Burn's {r:.2e}");
    assert!(r < 1e-5, "kernel vs Burn's {r:.2e}");
}

/// `sum(a · b ∘ w)`'s gradients through the kernel equal Burn's autodiff: both operands
/// tracked, then only one (the other's gradient is not computed: nothing kept for it).
#[test]
fn the_kernels_gradients_equal_burns() {
    let device = common::compute().device;
    if !runs_kernel(&device) {
        eprintln!("skipping: the kernel runs on a CubeCL device (WEBPEFT_TEST_DEVICE=gpu)");
        return;
    }
    let (batch, m, k, n) = (3, 21, 19, 40);
    let a = common::values(batch * m * k, 11);
    let b = common::values(batch * k * n, 12);
    let w: Tensor<3> = floats(common::values(batch * m * n, 13), [batch, m, n], &device).autodiff();
    for (track_a, track_b) in [(true, true), (true, false), (false, true)] {
        let run = |ours: bool| {
            let mut ta = floats(a.clone(), [batch, m, k], &device).autodiff();
            // b as a transposed view of a tracked [batch, n, k] leaf: its gradient comes back
            // through the view.
            let mut tb_leaf: Tensor<3> = operand(&b, batch, k, n, true, &device).swap_dims(1, 2).autodiff();
            if track_a {
                ta = ta.require_grad();
            }
            if track_b {
                tb_leaf = tb_leaf.require_grad();
            }
            let tb = tb_leaf.clone().swap_dims(1, 2);
            let out = if ours { kernel(ta.clone(), tb) } else { ta.clone().matmul(tb) };
            let grads = (out * w.clone()).sum().backward();
            let g = |x: &Tensor<3>| x.grad(&grads).map(|g| block_on(read(g)).unwrap().data);
            (g(&ta), g(&tb_leaf))
        };
        let (want, got) = (run(false), run(true));
        for (name, tracked, w, g) in [("da", track_a, &want.0, &got.0), ("db", track_b, &want.1, &got.1)] {
            assert_eq!(g.is_some(), tracked, "{name}: a gradient exactly when tracked");
            if let (Some(w), Some(g)) = (w, g) {
                let r = rel(g, w);
                eprintln!("tracked ({track_a}, {track_b}): {name} kernel vs Burn's {r:.2e}");
                assert!(r < 1e-5, "{name}: {r:.2e}");
            }
        }
    }
}

/// Broadcast batches, other dtypes and mismatched sizes are not the kernel's: `matmul` hands
/// them to Burn's.
#[test]
fn what_the_kernel_does_not_take_goes_to_burn() {
    let device = common::compute().device;
    let a: Tensor<3> = floats(common::values(2 * 4 * 5, 1), [2, 4, 5], &device);
    let b1: Tensor<3> = floats(common::values(5 * 6, 2), [1, 5, 6], &device);
    assert!(!takes(&a, &b1), "a broadcast batch");
    let b2: Tensor<3> = floats(common::values(2 * 4 * 6, 3), [2, 4, 6], &device);
    assert!(!takes(&a, &b2), "inner sizes differ");
    let want = read_all(a.clone().matmul(b1.clone()));
    assert_eq!(read_all(matmul(a, b1)), want);
}

/// Time of the kernel against Burn's matmul on the products of a SmolLM2-135M LoRA step at
/// batch 4 × 128 (M = 512): `cargo test --release --test matmul -- --ignored --nocapture`
/// (WEBPEFT_TEST_DEVICE=gpu).
#[test]
#[ignore]
fn matmul_timing() {
    let device = common::compute().device;
    if !runs_kernel(&device) {
        eprintln!("skipping: the kernel runs on a CubeCL device (WEBPEFT_TEST_DEVICE=gpu)");
        return;
    }
    let cases = [
        ("q_proj (f32 base)", Case { batch: 1, m: 512, k: 576, n: 576, a_t: false, b_t: false }),
        ("gate_proj (f32 base)", Case { batch: 1, m: 512, k: 576, n: 1536, a_t: false, b_t: false }),
        ("down_proj (f32 base)", Case { batch: 1, m: 512, k: 1536, n: 576, a_t: false, b_t: false }),
        ("x·A", Case { batch: 1, m: 512, k: 576, n: 8, a_t: false, b_t: false }),
        ("(xA)·B", Case { batch: 1, m: 512, k: 8, n: 576, a_t: false, b_t: false }),
        ("dA = xᵀ·d(xA)", Case { batch: 1, m: 576, k: 512, n: 8, a_t: true, b_t: false }),
        ("dB = (xA)ᵀ·dy", Case { batch: 1, m: 8, k: 512, n: 576, a_t: true, b_t: false }),
        ("q·kᵀ", Case { batch: 36, m: 128, k: 64, n: 128, a_t: false, b_t: true }),
        ("p·v", Case { batch: 36, m: 128, k: 128, n: 64, a_t: false, b_t: false }),
        ("dv = pᵀ·do", Case { batch: 36, m: 128, k: 128, n: 64, a_t: true, b_t: false }),
        // One token of generation (a 160-token cache).
        ("decode q_proj", Case { batch: 1, m: 1, k: 576, n: 576, a_t: false, b_t: true }),
        ("decode x·A", Case { batch: 1, m: 1, k: 576, n: 8, a_t: false, b_t: true }),
        ("decode q·kᵀ", Case { batch: 9, m: 1, k: 64, n: 160, a_t: false, b_t: true }),
        ("decode p·v", Case { batch: 9, m: 1, k: 160, n: 64, a_t: false, b_t: false }),
    ];
    for (name, c) in cases {
        let (ta, tb) =
            (operand(&common::values(c.batch * c.m * c.k, 1), c.batch, c.m, c.k, c.a_t, &device), operand(&common::values(c.batch * c.k * c.n, 2), c.batch, c.k, c.n, c.b_t, &device));
        let flop = 2.0 * (c.batch * c.m * c.k * c.n) as f64;
        let mut line = format!("{name:<22} [{}×{}×{}]×{:<3}", c.m, c.k, c.n, c.batch);
        for ours in [false, true] {
            let run = |reps: usize| {
                let t0 = std::time::Instant::now();
                let outs: Vec<Tensor<2>> = (0..reps).map(|_| if ours { kernel(ta.clone(), tb.clone()) } else { ta.clone().matmul(tb.clone()) }.flatten(0, 1)).collect();
                block_on(webpeft::tensor::wait_for(outs)).unwrap();
                t0.elapsed().as_secs_f64()
            };
            run(1);
            let reps = 5;
            let s = run(reps) / reps as f64;
            line += &format!("  {}: {:8.2} ms {:7.2} GFLOP/s", if ours { "ours" } else { "Burn" }, s * 1e3, flop / s / 1e9);
        }
        eprintln!("{line}");
    }
}

/// Empty products (no rows, no columns, an empty inner size) give what Burn's give.
#[test]
fn empty_products_equal_burns() {
    let device = common::compute().device;
    for (m, k, n) in [(0, 5, 7), (3, 5, 0), (3, 0, 7)] {
        let a: Tensor<2> = floats(common::values(m * k, 1), [m, k], &device);
        let b: Tensor<2> = floats(common::values(k * n, 2), [k, n], &device);
        let want = read_all(a.clone().matmul(b.clone()));
        assert_eq!(want.len(), m * n);
        if takes(&a, &b) {
            assert_eq!(read_all(kernel(a, b)), want, "[{m}×{k}]·[{k}×{n}]");
        }
    }
}
