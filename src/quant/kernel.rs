//! The quantized matmul: `out[M, P] = a[M, Q] · op(W)` where `W` stays in its block format on
//! the device and is dequantized tile by tile inside the kernel (never as a whole matrix).
//!
//! - forward of a frozen linear layer, `y = x · Wᵀ` (`W` = [out, in], PyTorch layout);
//! - its input gradient, `dx = dy · W` (the same kernel reading `W` the other way). A frozen
//!   weight needs no gradient of its own, so this is the whole backward.
//!
//! One CubeCL kernel serves every format (Q8_0, Q4_0, Q4_1, NF4: see [`crate::quant`]) with
//! the code width, the block size and the minimum as compile-time switches; it uses only
//! f32/u32 arithmetic and workgroup memory (no subgroups, no f16), so the same kernel runs
//! natively on Vulkan and in the browser on WebGPU. On Burn's CPU backend the reference path
//! (dequantize with tensor ops, then `matmul`) runs instead; tests compare the two.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, AutodiffBackend, Backend, Dispatch, DispatchDevice, ExtensionType, TensorMetadata, backend_extension};
use burn::tensor::{DType, Shape, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use cubecl::prelude::{CubeCount, CubeDim};

use super::QuantFormat;
use super::weight::QuantWeight;
use crate::matmul::{GEMV_ROWS, TileShape};

mod gpu {
    use cubecl::prelude::*;

    use crate::matmul::gpu::{V4, load_a, multiply_tiles, store};

    /// Four consecutive stored values from index `idx` (a multiple of 4, so one code word and
    /// one block), decoded: Q8_0 the signed byte, Q4_0 code − 8, Q4_1 the code, NF4 the level;
    /// times the block's scale (+ its minimum). Lanes where `valid` is false are zero.
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn decode_quad(
        codes: &Tensor<u32>,
        scales: &Tensor<f32>,
        mins: &Tensor<f32>,
        lut_s: &Shared<[f32]>,
        idx: usize,
        valid: Vector<bool, Const<4>>,
        #[comptime] format: u32,
        #[comptime] bits: u32,
        #[comptime] block: u32,
        #[comptime] has_min: bool,
    ) -> V4 {
        let mask = (1u32 << bits) - 1;
        let mut out = V4::new(0.0);
        if valid.extract(0usize) {
            let bit = idx * comptime!(bits as usize);
            let word = codes[bit / 32] >> ((bit % 32) as u32);
            let b = idx / comptime!(block as usize);
            let scale = scales[b];
            let mut min = f32::new(0.0);
            if comptime!(has_min) {
                min = mins[b];
            }
            #[unroll]
            for j in 0..4usize {
                let code = (word >> (j as u32 * bits)) & mask;
                let mut v = f32::cast_from(code);
                if comptime!(format == 0) {
                    if code >= 128u32 {
                        v -= 256.0;
                    }
                } else if comptime!(format == 1) {
                    v -= 8.0;
                } else if comptime!(format == 3) {
                    v = lut_s[code as usize];
                }
                v = v * scale + min;
                if !valid.extract(j) {
                    v = f32::new(0.0);
                }
                out.insert(j, v);
            }
        }
        out
    }

    /// `out[m, p] = Σ_q a[m, q] · W(p, q)` with `W` [P, Q] not transposed, for a few rows
    /// (`rows` ≥ m: generation's matrix-vector products). The tiled kernel below needs two
    /// workgroup barriers per 8 k; with one row that is 32 multiply-adds per thread between
    /// barriers, and SwiftShader (a CPU) pays each barrier by switching between the
    /// workgroup's invocations. Here thread `t` computes column `64·x + t` alone, with no
    /// workgroup memory: it walks the column's row of `W` a code word (8 or 4 values of one
    /// block) at a time, straight from the buffer into its `rows` sums, the block's scale
    /// applied once per word and Q4_1's minimum once, times the sum of the word's inputs.
    /// (Splitting a row between 2–16 threads measured slower on SwiftShader and no faster on
    /// lavapipe.)
    ///
    /// Launched unchecked: reads are guarded (rows clamped to `m − 1`, columns tested), and
    /// the caller guarantees that a row of `W` is whole code words and whole 4-wide vectors
    /// of `a` (`q·bits % 32 == 0`, `q % 4 == 0`).
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    pub fn qgemv_kernel(
        a: &Tensor<V4>,
        codes: &Tensor<u32>,
        scales: &Tensor<f32>,
        mins: &Tensor<f32>,
        lut: &Tensor<f32>,
        out: &mut Tensor<f32>,
        m: u32,
        p: u32,
        q: u32,
        #[comptime] format: u32,
        #[comptime] bits: u32,
        #[comptime] block: u32,
        #[comptime] has_min: bool,
        #[comptime] rows: usize,
    ) {
        let vpw = comptime!(32 / bits as usize);
        let mask = (1u32 << bits) - 1;
        let t = UNIT_POS_X as usize;
        let (m, p, q) = (m as usize, p as usize, q as usize);
        let col = CUBE_POS_X as usize * 64 + t;
        let mut lut_s = Shared::<[f32]>::new_slice(16usize);
        if comptime!(format == 3) {
            if t < 16 {
                lut_s[t] = lut[t];
            }
            sync_cube();
        }
        if col < p {
            let mut acc = Array::<f32>::new(rows);
            #[unroll]
            for r in 0..rows {
                acc[r] = f32::new(0.0);
            }
            let words = q / vpw;
            for w in 0..words {
                let word = codes[col * words + w];
                let k = w * vpw;
                let b = (col * q + k) / comptime!(block as usize);
                let scale = scales[b];
                // The word's values (Q4_1: its codes; the minimum comes with the inputs' sum).
                let mut v = Array::<f32>::new(vpw);
                #[unroll]
                for j in 0..vpw {
                    let code = (word >> (j as u32 * bits)) & mask;
                    let mut x = f32::cast_from(code);
                    if comptime!(format == 0) {
                        if code >= 128u32 {
                            x -= 256.0;
                        }
                    } else if comptime!(format == 1) {
                        x -= 8.0;
                    } else if comptime!(format == 3) {
                        x = lut_s[code as usize];
                    }
                    v[j] = x;
                }
                #[unroll]
                for r in 0..rows {
                    let i = (min(r, m - 1) * q + k) / 4;
                    let mut dot = f32::new(0.0);
                    let mut sum = f32::new(0.0);
                    #[unroll]
                    for h in 0..comptime!(vpw / 4) {
                        let x = a[i + h];
                        #[unroll]
                        for j in 0..4usize {
                            dot += v[h * 4 + j] * x.extract(j);
                        }
                        if comptime!(has_min) {
                            sum += x.extract(0usize) + x.extract(1usize) + x.extract(2usize) + x.extract(3usize);
                        }
                    }
                    if comptime!(has_min) {
                        acc[r] += dot * scale + sum * mins[b];
                    } else {
                        acc[r] += dot * scale;
                    }
                }
            }
            #[unroll]
            for r in 0..rows {
                if r < m {
                    out[r * p + col] = acc[r];
                }
            }
        }
    }

    /// `out[m, p] = Σ_q a[m, q] · W(p, q)`, where `W(p, q)` is the stored matrix's value at
    /// `p * wcols + q` (`transposed = false`: `W` is [P, Q]) or at `q * wcols + p`
    /// (`transposed = true`: `W` is [Q, P]), decoded from its block format.
    ///
    /// The layout of our f32 kernel ([`crate::matmul`]): 64 threads, thread `t` holds `tm` rows
    /// × 4 adjacent columns in 4-wide registers, `K` 8 at a time through workgroup memory as
    /// 4-wide vectors, the same multiply-add ([`multiply_tiles`]). Only the `W` tile differs:
    /// the workgroup decodes it once. Transposed, 4 stored values are 4 adjacent columns at
    /// one k: one vector. Otherwise they are 4 k of one column, so a thread decodes a 4 × 4
    /// patch (4 columns × 4 k) and writes it as 4 vectors of 4 columns. Workgroup memory at
    /// most (8·(64 + 256) + 16) f32, under 11 KiB (WebGPU guarantees 16 KiB). No subgroups,
    /// no f16.
    ///
    /// Launched unchecked: every read and write is guarded by the bounds tests here; the
    /// caller guarantees `wcols % 4 == 0`.
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    pub fn qmatmul_kernel(
        a: &Tensor<f32>,
        codes: &Tensor<u32>,
        scales: &Tensor<f32>,
        mins: &Tensor<f32>,
        lut: &Tensor<f32>,
        out: &mut Tensor<f32>,
        m: u32,
        p: u32,
        q: u32,
        wcols: u32,
        #[comptime] format: u32,
        #[comptime] bits: u32,
        #[comptime] block: u32,
        #[comptime] has_min: bool,
        #[comptime] transposed: bool,
        #[comptime] tm: usize,
        #[comptime] tx: usize,
    ) {
        let bm = comptime!(64 / tx * tm);
        let bn = comptime!(tx * 4);
        let t = UNIT_POS_X as usize;
        let row0 = CUBE_POS_Y as usize * bm;
        let col0 = CUBE_POS_X as usize * bn;
        let (m, p, q, wcols) = (m as usize, p as usize, q as usize, wcols as usize);

        // NF4's code → level table, once per workgroup.
        let mut lut_s = Shared::<[f32]>::new_slice(16usize);
        if comptime!(format == 3) {
            if t < 16 {
                lut_s[t] = lut[t];
            }
        }
        let mut a_s = Shared::<[V4]>::new_slice(comptime!(2 * bm));
        let mut w_s = Shared::<[V4]>::new_slice(comptime!(2 * bn));
        let mut acc = Array::<V4>::new(tm);
        #[unroll]
        for r in 0..tm {
            acc[r] = V4::new(0.0);
        }
        sync_cube();

        let mut k0 = 0usize;
        while k0 < q {
            load_a(a, &mut a_s, 0usize, q, 1usize, m, q, k0, row0, bm);
            if comptime!(transposed) {
                // Quad `e`: k `e / tx`, columns `4·(e % tx)` .. `+ 3`, stored adjacent.
                #[unroll]
                for i in 0..comptime!((2 * bn).div_ceil(64)) {
                    let e = t + 64 * i;
                    if e < comptime!(2 * bn) {
                        let (kk, c) = (e / tx, (e % tx) * 4);
                        let (ka, wp) = (k0 + kk, col0 + c);
                        let mut valid = Vector::<bool, Const<4>>::new(false);
                        #[unroll]
                        for j in 0..4usize {
                            valid.insert(j, ka < q && wp + j < p);
                        }
                        w_s[e] = decode_quad(codes, scales, mins, &lut_s, ka * wcols + wp, valid, format, bits, block, has_min);
                    }
                }
            } else {
                // Patch `e`: columns `4·(e % tx)` .. `+ 3`, k `4·(e / tx)` .. `+ 3`.
                #[unroll]
                for i in 0..comptime!((bn / 2).div_ceil(64)) {
                    let e = t + 64 * i;
                    if e < comptime!(bn / 2) {
                        let (c, kq) = ((e % tx) * 4, (e / tx) * 4);
                        let mut cols = Array::<V4>::new(4usize);
                        #[unroll]
                        for cc in 0..4usize {
                            let (wp, ka) = (col0 + c + cc, k0 + kq);
                            let mut valid = Vector::<bool, Const<4>>::new(false);
                            #[unroll]
                            for j in 0..4usize {
                                valid.insert(j, wp < p && ka + j < q);
                            }
                            cols[cc] = decode_quad(codes, scales, mins, &lut_s, wp * wcols + ka, valid, format, bits, block, has_min);
                        }
                        #[unroll]
                        for j in 0..4usize {
                            let mut v = V4::new(0.0);
                            #[unroll]
                            for cc in 0..4usize {
                                v.insert(cc, cols[cc].extract(j));
                            }
                            w_s[(kq + j) * tx + e % tx] = v;
                        }
                    }
                }
            }
            sync_cube();
            multiply_tiles(&a_s, &w_s, &mut acc, tm, tx);
            sync_cube();
            k0 += 8usize;
        }
        store(out, &acc, 0usize, m, p, row0, col0, tm, tx);
    }
}
use gpu::{qgemv_kernel, qmatmul_kernel};

/// A quantized weight's device buffers, as a backend operation takes them.
#[derive(ExtensionType, Debug, Clone)]
pub struct QuantParts<B: Backend> {
    pub codes: IntTensor<B>,
    pub scales: FloatTensor<B>,
    /// Q4_1's minimums; the other formats bind the scales here, unread.
    pub mins: FloatTensor<B>,
    pub lut: FloatTensor<B>,
}

/// What one launch computes: `out[M, p] = a[M, Q] · op(W)` with `W` stored with `wcols`
/// columns, read as `W` [p, Q] (`transposed = false`) or as `W` [Q, p] (`transposed = true`).
#[derive(Debug, Clone, Copy)]
pub struct QuantSpec {
    pub p: usize,
    pub wcols: usize,
    pub format: QuantFormat,
    pub transposed: bool,
}

/// The quantized matmul as a Burn backend operation (WebGPU / Vulkan through CubeCL; under
/// autodiff with its input gradient).
#[backend_extension(Cube, Autodiff)]
pub trait QuantMatmulOps: Backend {
    /// `a[M, Q] · op(W)` → [M, spec.p] (see [`qmatmul_kernel`]).
    fn quant_matmul(a: FloatTensor<Self>, #[extension_type] w: QuantParts<Self>, spec: QuantSpec) -> FloatTensor<Self>;
}

impl QuantMatmulOps for CubeBackend {
    fn quant_matmul(a: FloatTensor<Self>, w: QuantParts<Self>, spec: QuantSpec) -> FloatTensor<Self> {
        let (f, p) = (spec.format, spec.p);
        let a = into_contiguous(a);
        let dims = a.meta.shape().clone();
        let (m, q) = (dims[0], dims[1]);
        let out = empty_device_dtype(a.client.clone(), a.device.clone(), Shape::new([m, p]), DType::F32);
        let client = a.client.clone();
        let fmt = QuantFormat::ALL.iter().position(|x| *x == f).expect("a known format") as u32;
        if !spec.transposed && (1..=GEMV_ROWS).contains(&m) && (q * f.bits()) % 32 == 0 {
            let count = CubeCount::Static(p.div_ceil(64) as u32, 1, 1);
            // SAFETY: as below; `q == wcols` is a multiple of 4 (checked by the callers) and rows
            // are whole code words (tested here).
            unsafe {
                qgemv_kernel::launch_unchecked(
                    &client,
                    count,
                    CubeDim::new_1d(64),
                    a.into_tensor_arg(),
                    into_contiguous(w.codes).into_tensor_arg(),
                    into_contiguous(w.scales).into_tensor_arg(),
                    into_contiguous(w.mins).into_tensor_arg(),
                    into_contiguous(w.lut).into_tensor_arg(),
                    out.clone().into_tensor_arg(),
                    m as u32,
                    p as u32,
                    q as u32,
                    fmt,
                    f.bits() as u32,
                    f.block() as u32,
                    f.has_min(),
                    m,
                );
            }
            return out;
        }
        let tile = TileShape::for_output(m, p);
        let count = CubeCount::Static(p.div_ceil(tile.cols()) as u32, m.div_ceil(tile.rows()) as u32, 1);
        // SAFETY: the kernel tests every index against the sizes passed with it, and the
        // buffers are those sizes (contiguous, from the same weight).
        unsafe {
            qmatmul_kernel::launch_unchecked(
                &client,
                count,
                CubeDim::new_1d(64),
                a.into_tensor_arg(),
                into_contiguous(w.codes).into_tensor_arg(),
                into_contiguous(w.scales).into_tensor_arg(),
                into_contiguous(w.mins).into_tensor_arg(),
                into_contiguous(w.lut).into_tensor_arg(),
                out.clone().into_tensor_arg(),
                m as u32,
                p as u32,
                q as u32,
                spec.wcols as u32,
                fmt,
                f.bits() as u32,
                f.block() as u32,
                f.has_min(),
                spec.transposed,
                tile.tm,
                tile.tx,
            );
        }
        out
    }
}

/// What the backward needs: the (frozen) weight, the forward's spec and its inner size.
#[derive(Debug, Clone)]
struct QuantState<B: Backend> {
    w: QuantParts<B>,
    spec: QuantSpec,
    /// The forward's Q (`a`'s columns): the input gradient's columns.
    q: usize,
}

#[derive(Debug)]
struct QuantMatmulBackward;

impl<B: QuantMatmulOps> Backward<B, 1> for QuantMatmulBackward {
    type State = QuantState<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let QuantState { w, spec, q } = ops.state;
        // out = a · op(W) ⇒ da = dout · op(W)ᵀ: the same kernel reading the weight the other
        // way, with the forward's Q as its output width.
        let back = QuantSpec { p: q, transposed: !spec.transposed, ..spec };
        unary::<B, _>(ops.parents, ops.node, grads, |dout| B::quant_matmul(dout, w, back));
    }
}

impl<B: QuantMatmulOps, C: CheckpointStrategy> QuantMatmulOps for Autodiff<B, C> {
    fn quant_matmul(a: FloatTensor<Self>, w: QuantParts<Self>, spec: QuantSpec) -> FloatTensor<Self> {
        // The weight is a constant of the graph: its float parts leave autodiff.
        let inner = <Self as AutodiffBackend>::inner;
        let w = QuantParts::<B> { codes: w.codes, scales: inner(w.scales), mins: inner(w.mins), lut: inner(w.lut) };
        match QuantMatmulBackward.prepare::<C>([a.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let q = a.primitive().shape()[1];
                let out = B::quant_matmul(a.into_primitive(), w.clone(), spec);
                prep.finish(QuantState { w, spec, q }, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::quant_matmul(a.into_primitive(), w, spec)),
        }
    }
}

/// True when tensors on `device` go through the kernel (a CubeCL device: WebGPU, Vulkan);
/// elsewhere (Burn's CPU backend) the reference path runs.
pub fn runs_kernel(device: &burn::tensor::Device) -> bool {
    matches!(device.clone().inner().as_dispatch(), DispatchDevice::Cube(_))
}

fn on_cube(t: &Tensor<2>) -> bool {
    runs_kernel(&t.device())
}

/// `x[M, in] · Wᵀ` → [M, out] for a quantized `W` [out, in].
pub fn matmul_t(x: Tensor<2>, w: &QuantWeight) -> Tensor<2> {
    // The kernel decodes 4 stored values at a time from one code word: rows of a multiple of
    // 4 values (every real model's).
    if !on_cube(&x) || w.cols % 4 != 0 {
        return x.matmul(w.dequantize().transpose());
    }
    let parts = QuantParts::<Dispatch> {
        codes: w.codes.clone().into_dispatch(),
        scales: w.scales.clone().into_dispatch(),
        mins: w.mins.clone().unwrap_or_else(|| w.scales.clone()).into_dispatch(),
        lut: w.lut.clone().into_dispatch(),
    };
    Tensor::from_dispatch(Dispatch::quant_matmul(x.into_dispatch(), parts, QuantSpec { p: w.rows, wcols: w.cols, format: w.format, transposed: false }))
}
