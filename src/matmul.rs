//! Our f32 matmul kernel (CubeCL, WebGPU / Vulkan): `out[..., M, N] = a[..., M, K] · b[..., K, N]`
//! with a register tile per thread, sized to the product's shape, and the operands read
//! through their strides (a transposed view costs no copy).
//!
//! Why: in Chromium (SwiftShader) Burn's matmul ran the attention and LoRA products at
//! 0.00037–0.00047 TFLOP/s, 27% of a LoRA step in the kernel profile; this kernel reaches
//! 0.0030 there. The quantized kernel ([`crate::quant::kernel`]) shares its tile code
//! ([`gpu::load_a`], [`gpu::multiply_tiles`], [`gpu::store`]). It is on by default in the
//! browser (wasm) and off natively, where Burn's matmul is faster on lavapipe's large
//! products; [`set_tiled`] (CLI `--matmul`, env `WEBPEFT_MATMUL`) chooses.
//!
//! Products of at most [`GEMV_ROWS`] rows (generation's one token at a time) run as
//! matrix-vector products instead ([`gpu::gemv_kernel`]: a thread per output column, no
//! workgroup memory, no barriers), as do the quantized ones ([`crate::quant::kernel`]).
//!
//! [`matmul`] takes any rank ≥ 2 with equal batch dimensions; broadcast batches, other dtypes
//! and Burn's CPU backend go to Burn's `matmul`, the reference the tests compare with. Under
//! autodiff the backward is the same kernel on transposed views: `da = dout · bᵀ`,
//! `db = aᵀ · dout`.

use std::sync::atomic::{AtomicU8, Ordering};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, binary};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::{DType, Shape, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::ops::numeric::empty_device_dtype;
use cubecl::prelude::{CubeCount, CubeDim};

/// Threads per workgroup.
const THREADS: usize = 64;

/// Up to this many rows, a product runs as matrix-vector products ([`gpu::gemv_kernel`]).
pub const GEMV_ROWS: usize = 4;

/// WebGPU's smallest guaranteed `maxComputeWorkgroupsPerDimension`.
const MAX_GROUPS: usize = 65_535;

/// 0: not chosen yet (the default applies), 1: Burn's, 2: ours.
static TILED: AtomicU8 = AtomicU8::new(0);

/// Use our kernel (`true`) or Burn's matmul (`false`) for [`matmul`] on a CubeCL device, for
/// this process.
pub fn set_tiled(on: bool) {
    TILED.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// Whether [`matmul`] runs our kernel on a CubeCL device. Unless [`set_tiled`] chose: ours in
/// the browser (wasm), Burn's natively, where `WEBPEFT_MATMUL=ours` (or `burn`) sets it (the
/// test suite runs the PyTorch comparisons once more through ours this way).
pub fn tiled() -> bool {
    match TILED.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let on = cfg!(target_family = "wasm") || std::env::var("WEBPEFT_MATMUL").is_ok_and(|v| v == "ours");
            set_tiled(on);
            on
        }
    }
}

/// A launch's register tile: each of the 64 threads computes `tm` rows × 4 columns, the
/// threads laid out `64 / tx` rows × `tx` columns, so a workgroup covers
/// `(64 / tx)·tm × 4·tx` outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileShape {
    pub tm: usize,
    pub tx: usize,
}

impl TileShape {
    /// The tile for an `[m, n]` output: 64 rows × 128 columns for large outputs, fewer rows
    /// (and up to 256 columns) for few rows, 64 × 64 for head-sized outputs, and narrow tiles
    /// of many rows for LoRA's rank-sized ones, so that few threads compute padding. Chosen by
    /// timing on SwiftShader and lavapipe (`tests/matmul.rs`, `matmul_timing`).
    pub fn for_output(m: usize, n: usize) -> TileShape {
        if n > 64 {
            let tm = match m {
                0..=1 => 1,
                2..=4 => 4,
                5..=8 => 8,
                // Up to 32 rows in 16-row tiles: a 64-row tile left half of a 32-token
                // prompt's work padding (its Q4_1 products 6.5 → 4.8 s on SwiftShader).
                9..=32 => 16,
                _ => 32,
            };
            // 64 × 128 tiles for many rows (the fewest reads per multiply-add that measured
            // fastest); 256 columns for few rows of a wide output.
            TileShape { tm, tx: if tm == 32 || n <= 128 { 32 } else { 64 } }
        } else if n > 32 {
            TileShape { tm: if m <= 8 { 2 } else { 16 }, tx: 16 }
        } else {
            let tx = n.div_ceil(4).next_power_of_two();
            TileShape { tm: 4, tx }
        }
    }

    pub fn rows(&self) -> usize {
        THREADS / self.tx * self.tm
    }

    pub fn cols(&self) -> usize {
        self.tx * 4
    }
}

pub(crate) mod gpu {
    use cubecl::prelude::*;

    /// Four f32 in one register / one workgroup-memory access.
    pub type V4 = Vector<f32, Const<4>>;

    /// Load the `a` tile of `k0` .. `k0 + 7` into `a_s` as [rows][2 × 4 k] (zero outside the
    /// `m × k` matrix at `off`, row stride `sam`, column stride `sak`).
    #[cube]
    #[allow(clippy::too_many_arguments)]
    pub fn load_a(a: &Tensor<f32>, a_s: &mut Shared<[V4]>, off: usize, sam: usize, sak: usize, m: usize, k: usize, k0: usize, row0: usize, #[comptime] bm: usize) {
        let t = UNIT_POS_X as usize;
        // Quad `e`: row `e / 2`, k `4·(e % 2)` .. `+ 3`.
        #[unroll]
        for i in 0..comptime!((2 * bm).div_ceil(64)) {
            let e = t + 64 * i;
            if e < comptime!(2 * bm) {
                let (r, kq) = (e / 2, (e % 2) * 4);
                let mut v = V4::new(0.0);
                #[unroll]
                for j in 0..4usize {
                    let mut x = f32::new(0.0);
                    if row0 + r < m && k0 + kq + j < k {
                        x = a[off + (row0 + r) * sam + (k0 + kq + j) * sak];
                    }
                    v.insert(j, x);
                }
                a_s[e] = v;
            }
        }
    }

    /// `acc[r] += Σ_kk a(row r, kk) · b(kk, the thread's 4 columns)` over the 8 k of the tiles
    /// in workgroup memory (`a_s` [rows][2 × 4 k], `b_s` [8 k][cols / 4]): per 8 k, 8 + 2·tm
    /// vector reads for 8·tm vector multiply-adds, summed in k order.
    #[cube]
    pub fn multiply_tiles(a_s: &Shared<[V4]>, b_s: &Shared<[V4]>, acc: &mut Array<V4>, #[comptime] tm: usize, #[comptime] tx: usize) {
        let t = UNIT_POS_X as usize;
        let (trow, tcol) = (t / tx, t % tx);
        let ty = comptime!(64 / tx);
        #[unroll]
        for kq in 0..2usize {
            let w0 = b_s[(kq * 4) * tx + tcol];
            let w1 = b_s[(kq * 4 + 1) * tx + tcol];
            let w2 = b_s[(kq * 4 + 2) * tx + tcol];
            let w3 = b_s[(kq * 4 + 3) * tx + tcol];
            #[unroll]
            for r in 0..tm {
                let av = a_s[(trow + ty * r) * 2 + kq];
                acc[r] = acc[r] + V4::new(av.extract(0usize)) * w0 + V4::new(av.extract(1usize)) * w1 + V4::new(av.extract(2usize)) * w2 + V4::new(av.extract(3usize)) * w3;
            }
        }
    }

    /// Write the thread's `tm` × 4 outputs into the contiguous `m × n` matrix at `off`: rows
    /// `row0 + t / tx + (64 / tx)·r` (r < tm), columns `col0 + 4·(t % tx)` .. `+ 3`.
    #[cube]
    #[allow(clippy::too_many_arguments)]
    pub fn store(out: &mut Tensor<f32>, acc: &Array<V4>, off: usize, m: usize, n: usize, row0: usize, col0: usize, #[comptime] tm: usize, #[comptime] tx: usize) {
        let ty = comptime!(64 / tx);
        let t = UNIT_POS_X as usize;
        let (trow, tcol) = (t / tx, t % tx);
        #[unroll]
        for r in 0..tm {
            let row = row0 + trow + ty * r;
            let v = acc[r];
            #[unroll]
            for j in 0..4usize {
                let col = col0 + tcol * 4 + j;
                if row < m && col < n {
                    out[off + row * n + col] = v.extract(j);
                }
            }
        }
    }

    /// The offsets of batch `CUBE_POS_Z` (the leading dimensions flattened) in `a`, `b` and
    /// `out`, from the last batch dimension to the first; a size-1 dimension of `a` or `b` is
    /// broadcast.
    #[cube]
    fn batch_offsets(a: &Tensor<f32>, b: &Tensor<f32>, out: &mut Tensor<f32>) -> (usize, usize, usize) {
        let mut rest = CUBE_POS_Z as usize;
        let mut off_a = 0usize;
        let mut off_b = 0usize;
        let mut off_o = 0usize;
        let mut d = out.rank() - 2;
        while d > 0 {
            d -= 1;
            let i = rest % out.shape(d);
            rest /= out.shape(d);
            off_a += (i % a.shape(d)) * a.stride(d);
            off_b += (i % b.shape(d)) * b.stride(d);
            off_o += i * out.stride(d);
        }
        (off_a, off_b, off_o)
    }

    /// `out[z, i, j] = Σ_k a[z, i, k] · b[z, k, j]` for at most `rows` rows (generation's
    /// matrix-vector products): thread `t` computes column `64·x + t` of batch `z =
    /// CUBE_POS_Z` alone, k by k in order, with no workgroup memory. The tiled kernel below
    /// needs two workgroup barriers per 8 k, and with one row that is 32 multiply-adds per
    /// thread between barriers; SwiftShader (a CPU) pays each barrier by switching between the
    /// workgroup's invocations.
    ///
    /// Launched unchecked: reads are guarded (rows clamped to `m − 1`, columns tested); `m ≥ 1`
    /// and `out` is contiguous.
    #[cube(launch_unchecked)]
    pub fn gemv_kernel(a: &Tensor<f32>, b: &Tensor<f32>, out: &mut Tensor<f32>, #[comptime] rows: usize) {
        let rank = out.rank();
        let (m, n, k) = (out.shape(rank - 2), out.shape(rank - 1), a.shape(rank - 1));
        let col = CUBE_POS_X as usize * 64 + UNIT_POS_X as usize;
        let (off_a, off_b, off_o) = batch_offsets(a, b, out);
        let (sam, sak) = (a.stride(rank - 2), a.stride(rank - 1));
        let (sbk, sbn) = (b.stride(rank - 2), b.stride(rank - 1));
        if col < n {
            let mut acc = Array::<f32>::new(rows);
            #[unroll]
            for r in 0..rows {
                acc[r] = f32::new(0.0);
            }
            for kk in 0..k {
                let w = b[off_b + kk * sbk + col * sbn];
                #[unroll]
                for r in 0..rows {
                    acc[r] += a[off_a + min(r, m - 1) * sam + kk * sak] * w;
                }
            }
            #[unroll]
            for r in 0..rows {
                if r < m {
                    out[off_o + r * n + col] = acc[r];
                }
            }
        }
    }

    /// `out[z, i, j] = Σ_k a[z, i, k] · b[z, k, j]` for the batch `z = CUBE_POS_Z` (the
    /// leading dimensions flattened; `a` and `b` index theirs through their strides, a size-1
    /// dimension broadcast). Thread `t` holds rows `row0 + t / tx + (64 / tx)·r` (r < tm) and
    /// the 4 adjacent columns `col0 + 4·(t % tx)` .. `+ 3` in `tm` 4-wide registers. `K` goes 8
    /// at a time through workgroup memory, both tiles stored as 4-wide vectors (zero outside
    /// the matrices): `a` as [rows][2 × 4 k], `b` as [8 k][cols / 4] ([`multiply_tiles`]; on
    /// a CPU-emulated device, as SwiftShader, the reads are what costs, hence vectors and many
    /// rows per thread). Workgroup memory at most 8·(64 + 256) f32 = 10 KiB (WebGPU
    /// guarantees 16 KiB). No subgroups, no f16.
    ///
    /// Launched unchecked: every read and write is guarded here by the operands' shapes; `out`
    /// is contiguous.
    #[cube(launch_unchecked)]
    pub fn matmul_kernel(a: &Tensor<f32>, b: &Tensor<f32>, out: &mut Tensor<f32>, #[comptime] tm: usize, #[comptime] tx: usize) {
        let bm = comptime!(64 / tx * tm);
        let bn = comptime!(tx * 4);
        let rank = out.rank();
        let (m, n, k) = (out.shape(rank - 2), out.shape(rank - 1), a.shape(rank - 1));
        let t = UNIT_POS_X as usize;
        let row0 = CUBE_POS_Y as usize * bm;
        let col0 = CUBE_POS_X as usize * bn;

        let (off_a, off_b, off_o) = batch_offsets(a, b, out);
        let (sam, sak) = (a.stride(rank - 2), a.stride(rank - 1));
        let (sbk, sbn) = (b.stride(rank - 2), b.stride(rank - 1));

        let mut a_s = Shared::<[V4]>::new_slice(comptime!(2 * bm));
        let mut b_s = Shared::<[V4]>::new_slice(comptime!(2 * bn));
        let mut acc = Array::<V4>::new(tm);
        #[unroll]
        for r in 0..tm {
            acc[r] = V4::new(0.0);
        }

        let mut k0 = 0usize;
        while k0 < k {
            load_a(a, &mut a_s, off_a, sam, sak, m, k, k0, row0, bm);
            // The b tile: quad `e` is k `e / tx`, columns `4·(e % tx)` .. `+ 3`.
            #[unroll]
            for i in 0..comptime!((2 * bn).div_ceil(64)) {
                let e = t + 64 * i;
                if e < comptime!(2 * bn) {
                    let (kk, c) = (e / tx, (e % tx) * 4);
                    let mut v = V4::new(0.0);
                    #[unroll]
                    for j in 0..4usize {
                        let mut x = f32::new(0.0);
                        if col0 + c + j < n && k0 + kk < k {
                            x = b[off_b + (k0 + kk) * sbk + (col0 + c + j) * sbn];
                        }
                        v.insert(j, x);
                    }
                    b_s[e] = v;
                }
            }
            sync_cube();
            multiply_tiles(&a_s, &b_s, &mut acc, tm, tx);
            sync_cube();
            k0 += 8usize;
        }
        store(out, &acc, off_o, m, n, row0, col0, tm, tx);
    }
}

/// The kernel as a Burn backend operation (WebGPU / Vulkan through CubeCL; under autodiff
/// with its backward).
#[backend_extension(Cube, Autodiff)]
pub trait TiledMatmulOps: Backend {
    /// `a [..., M, K] · b [..., K, N]` → [..., M, N] (equal batch dimensions, f32).
    fn tiled_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self>;
}

type Cube = FloatTensor<CubeBackend>;

impl TiledMatmulOps for CubeBackend {
    fn tiled_matmul(a: Cube, b: Cube) -> Cube {
        let (sa, sb) = (a.meta.shape().clone(), b.meta.shape().clone());
        let rank = sa.num_dims();
        let (m, n) = (sa[rank - 2], sb[rank - 1]);
        let mut dims: Vec<usize> = (0..rank - 2).map(|d| sa[d].max(sb[d])).collect();
        let batch: usize = dims.iter().product();
        dims.extend([m, n]);
        let out = empty_device_dtype(a.client.clone(), a.device.clone(), Shape::from(dims), DType::F32);
        let client = a.client.clone();
        if (1..=GEMV_ROWS).contains(&m) {
            let count = CubeCount::Static(n.div_ceil(THREADS) as u32, 1, batch as u32);
            // SAFETY: as below; at least one row.
            unsafe {
                gpu::gemv_kernel::launch_unchecked(&client, count, CubeDim::new_1d(THREADS as u32), a.into_tensor_arg(), b.into_tensor_arg(), out.clone().into_tensor_arg(), m);
            }
            return out;
        }
        let tile = TileShape::for_output(m, n);
        let count = CubeCount::Static(n.div_ceil(tile.cols()) as u32, m.div_ceil(tile.rows()) as u32, batch as u32);
        // SAFETY: the kernel tests every index against the operands' shapes, read with the
        // strides they are bound with; `out` is a new contiguous buffer of the product's shape.
        unsafe {
            gpu::matmul_kernel::launch_unchecked(&client, count, CubeDim::new_1d(THREADS as u32), a.into_tensor_arg(), b.into_tensor_arg(), out.clone().into_tensor_arg(), tile.tm, tile.tx);
        }
        out
    }
}

/// What the backward keeps: each operand when the other one needs a gradient.
#[derive(Debug, Clone)]
struct MatmulState<B: Backend> {
    a: Option<FloatTensor<B>>,
    b: Option<FloatTensor<B>>,
}

#[derive(Debug)]
struct TiledMatmulBackward;

fn transposed<B: Backend>(t: FloatTensor<B>) -> FloatTensor<B> {
    let rank = t.shape().num_dims();
    B::float_swap_dims(t, rank - 2, rank - 1)
}

impl<B: TiledMatmulOps> Backward<B, 2> for TiledMatmulBackward {
    type State = MatmulState<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let MatmulState { a, b } = ops.state;
        binary::<B, _, _>(
            ops.parents,
            ops.node,
            grads,
            |dout| B::tiled_matmul(dout, transposed::<B>(b.expect("kept for a's gradient"))),
            |dout| B::tiled_matmul(transposed::<B>(a.expect("kept for b's gradient")), dout),
        );
    }
}

impl<B: TiledMatmulOps, C: CheckpointStrategy> TiledMatmulOps for Autodiff<B, C> {
    fn tiled_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        let (a_tracked, b_tracked) = (a.is_tracked(), b.is_tracked());
        match TiledMatmulBackward.prepare::<C>([a.node(), b.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (a, b) = (a.into_primitive(), b.into_primitive());
                let state = MatmulState { a: b_tracked.then(|| a.clone()), b: a_tracked.then(|| b.clone()) };
                prep.finish(state, B::tiled_matmul(a, b))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::tiled_matmul(a.into_primitive(), b.into_primitive())),
        }
    }
}

/// Whether [`matmul`] would run the kernel on these operands: a CubeCL device, f32, equal
/// batch dimensions, at most 65,535 batches (one workgroup row each).
pub fn takes<const D: usize>(a: &Tensor<D>, b: &Tensor<D>) -> bool {
    let (da, db) = (a.dims(), b.dims());
    D >= 2
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && da[..D - 2] == db[..D - 2]
        && da[..D - 2].iter().product::<usize>() <= MAX_GROUPS
        && da[D - 1] == db[D - 2]
        && crate::quant::kernel::runs_kernel(&a.device())
}

/// `a · b` with the kernel ([`takes`] and [`tiled`]), else Burn's `matmul`.
pub fn matmul<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    if tiled() && takes(&a, &b) { kernel(a, b) } else { a.matmul(b) }
}

/// `a · b` with the kernel, whatever [`tiled`] says (tests, benchmarks). The caller checks
/// [`takes`].
pub fn kernel<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(Dispatch::tiled_matmul(a.into_dispatch(), b.into_dispatch()))
}

#[cfg(test)]
mod tests {
    use super::TileShape;

    #[test]
    fn tiles_fit_the_output_and_workgroup_memory() {
        for (m, n) in [(1, 576), (4, 49152), (8, 576), (512, 576), (128, 64), (128, 128), (512, 8), (512, 16), (512, 1), (3, 40)] {
            let t = TileShape::for_output(m, n);
            assert_eq!(super::THREADS % t.tx, 0, "{m}×{n}: {t:?}");
            assert!(8 * (t.rows() + t.cols()) * 4 <= 12 * 1024, "{m}×{n}: {t:?}");
            assert!(t.cols() < 2 * n.max(4) || t.cols() == 256, "{m}×{n}: {t:?} wastes columns");
        }
    }
}
