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

/// Output columns of one workgroup (64 threads × 4).
const TILE_P: usize = 256;

/// Rows per workgroup: fewer for few rows (generation), so that no work goes to padding.
fn rows_per_tile(m: usize) -> usize {
    match m {
        0..=1 => 1,
        2..=4 => 4,
        _ => 16,
    }
}

mod gpu {
    use cubecl::prelude::*;

    /// `out[m, p] = Σ_q a[m, q] · W(p, q)`, where `W(p, q)` is the stored matrix's value at
    /// `p * wcols + q` (`transposed = false`: `W` is [P, Q]) or at `q * wcols + p`
    /// (`transposed = true`: `W` is [Q, P]), decoded from its code (Q8_0: the signed byte;
    /// Q4_0: code − 8; Q4_1: the code; NF4: the level) times its block's scale (+ minimum).
    ///
    /// A workgroup of 64 threads computes `rm` rows × 256 columns: thread `t` holds columns
    /// `t, t + 64, t + 128, t + 192` of every row in registers. The inner dimension goes 8
    /// values at a time through workgroup memory: the `a` tile, and the `W` tile, which the
    /// workgroup decodes once, each thread 8 quads of 4 stored values sharing a code word and
    /// a block. In the inner loop every thread reads the same `a` value (a broadcast) and
    /// neighbouring threads neighbouring `W` values. Workgroup memory: (8 × 256 + 8 rm + 16)
    /// f32, under 9 KiB (WebGPU guarantees 16 KiB). No subgroups, no f16.
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
        #[comptime] rm: usize,
    ) {
        let t = UNIT_POS_X as usize;
        let row0 = CUBE_POS_Y as usize * rm;
        let col0 = CUBE_POS_X as usize * 256;
        let (m, p, q, wcols) = (m as usize, p as usize, q as usize, wcols as usize);
        let bits_u = bits as usize;
        let block_u = block as usize;
        let mask = (1u32 << bits) - 1;

        // NF4's code → level table, once per workgroup.
        let mut lut_s = Shared::new_slice(16usize);
        if comptime!(format == 3) {
            if t < 16 {
                lut_s[t] = lut[t];
            }
        }
        let mut a_s = Shared::new_slice(comptime!(rm * 8));
        let mut w_s = Shared::new_slice(2048usize);
        let mut acc = Array::new(comptime!(rm * 4));
        #[unroll]
        for i in 0..comptime!(rm * 4) {
            acc[i] = f32::new(0.0);
        }
        sync_cube();

        let mut k0 = 0usize;
        while k0 < q {
            // The a tile [rm rows][8 k].
            #[unroll]
            for i in 0..comptime!((rm * 8).div_ceil(64)) {
                let e = t + 64 * i;
                if e < comptime!(rm * 8) {
                    let (r, kk) = (e / 8, e % 8);
                    let mut av = f32::new(0.0);
                    if row0 + r < m && k0 + kk < q {
                        av = a[(row0 + r) * q + k0 + kk];
                    }
                    a_s[e] = av;
                }
            }
            // The W tile [8 k][256 columns], as 512 quads.
            #[unroll]
            for i in 0..8usize {
                let u = t + 64 * i;
                // Quads run along the stored rows: along k (forward), along p (transposed).
                let mut c = u / 2;
                let mut kq = (u % 2) * 4;
                if comptime!(transposed) {
                    c = (u % 64) * 4;
                    kq = u / 64;
                }
                let (wp, ka) = (col0 + c, k0 + kq);
                let mut idx = wp * wcols + ka;
                if comptime!(transposed) {
                    idx = ka * wcols + wp;
                }
                let mut word = 0u32;
                let mut scale = f32::new(0.0);
                let mut min = f32::new(0.0);
                if wp < p && ka < q {
                    let bit = idx * bits_u;
                    word = codes[bit / 32] >> ((bit % 32) as u32);
                    let b = idx / block_u;
                    scale = scales[b];
                    if comptime!(has_min) {
                        min = mins[b];
                    }
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
                    let mut ok = ka + j < q && wp < p;
                    let mut at = (kq + j) * 256 + c;
                    if comptime!(transposed) {
                        ok = ka < q && wp + j < p;
                        at = kq * 256 + c + j;
                    }
                    if !ok {
                        v = f32::new(0.0);
                    }
                    w_s[at] = v;
                }
            }
            sync_cube();
            #[unroll]
            for kk in 0..8usize {
                let mut wr = Array::new(4usize);
                #[unroll]
                for j in 0..4usize {
                    wr[j] = w_s[kk * 256 + t + 64 * j];
                }
                #[unroll]
                for r in 0..rm {
                    let av = a_s[r * 8 + kk];
                    #[unroll]
                    for j in 0..4usize {
                        acc[r * 4 + j] += av * wr[j];
                    }
                }
            }
            sync_cube();
            k0 += 8usize;
        }
        #[unroll]
        for r in 0..rm {
            #[unroll]
            for j in 0..4usize {
                let (row, col) = (row0 + r, col0 + t + 64 * j);
                if row < m && col < p {
                    out[row * p + col] = acc[r * 4 + j];
                }
            }
        }
    }
}
use gpu::qmatmul_kernel;

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
        let rm = rows_per_tile(m);
        let count = CubeCount::Static(p.div_ceil(TILE_P) as u32, m.div_ceil(rm) as u32, 1);
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
                QuantFormat::ALL.iter().position(|x| *x == f).expect("a known format") as u32,
                f.bits() as u32,
                f.block() as u32,
                f.has_min(),
                spec.transposed,
                rm,
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
