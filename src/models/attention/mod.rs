//! Scaled dot-product attention of the decoder (causal, grouped-query, padded keys, a KV
//! cache or prefix in front), in two implementations that tests compare:
//!
//! - [`reference`]: tensor ops, as the model is written in PyTorch: the scores `q·kᵀ·scale +
//!   mask` as a [B, heads, T, S] tensor, softmax, times `v`. Autodiff keeps the T × S
//!   probabilities of every layer for the backward, so memory grows with T².
//! - [`blocked`]: the queries a block at a time through the matmul kernels, with a backward
//!   that recomputes each block's probabilities: no T × S matrix beyond one block, on any
//!   CubeCL device (WebGPU / Vulkan).
//! - the fused kernels (flash-attention style, CubeCL, WebGPU / Vulkan): one pass over the keys
//!   with an online softmax per query row, keeping only the output and one log-sum-exp per row;
//!   the backward recomputes the probabilities tile by tile (one kernel for `dq`, one for
//!   `dk, dv`). No T × S matrix exists in memory, forward or backward: attention's memory is
//!   linear in the sequence length. f32 throughout, workgroup memory under 9 KiB, no
//!   subgroups: the same kernels run natively and in the browser.
//!
//! The mask is the reference's, value for value: a key is hidden (its score replaced by
//! `score + (-1e30)`) when it is in the future of the query (`j > past + i`) or padding. Rows
//! whose every key is hidden (padding queries) differ between the two: the reference averages
//! all S values, the kernel the keys up to its causal tile; such rows never reach a loss or a
//! real token's output.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, Dispatch, backend_extension};
use burn::tensor::activation::softmax;
use burn::tensor::{DType, Device, Shape, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use cubecl::prelude::{CubeCount, CubeDim};

use crate::matmul::matmul;
use crate::quant::kernel::runs_kernel;
use crate::tensor::floats;

pub mod blocked;

/// The value a hidden key adds to its score (the reference's).
const HIDDEN: f32 = -1e30;

/// How the decoder computes attention (what runs also depends on the device: [`runs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionImpl {
    /// [`reference`]: tensor ops with the [B, heads, T, S] scores; every device.
    Reference,
    /// [`blocked`]: query blocks through the matmul kernels (CubeCL devices; the default
    /// there: the reference's step time on lavapipe, −5% to +3% across runs, with memory linear in the
    /// sequence length; Burn's CPU backend runs the reference).
    #[default]
    Blocked,
    /// The flash-attention-style kernels (CubeCL devices, head sizes up to 256).
    Fused,
}

impl AttentionImpl {
    /// Whether attention's memory is linear in the sequence length (no T × S buffer kept).
    pub fn linear_memory(self) -> bool {
        self != AttentionImpl::Reference
    }

    /// "blocked" | "reference" | "fused".
    pub fn parse(name: &str) -> crate::error::Result<AttentionImpl> {
        match name {
            "blocked" => Ok(AttentionImpl::Blocked),
            "reference" => Ok(AttentionImpl::Reference),
            "fused" => Ok(AttentionImpl::Fused),
            other => crate::error::bail!(Config, "attention {other:?} is not one of blocked | reference | fused"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            AttentionImpl::Reference => "reference",
            AttentionImpl::Blocked => "blocked",
            AttentionImpl::Fused => "fused",
        }
    }
}

/// Query (or key) rows per workgroup: one thread each.
const ROWS: usize = 32;

/// Head sizes the kernels take (per-thread arrays of `head_dim` values).
const MAX_HEAD_DIM: usize = 256;

/// Keys (or queries) per tile in workgroup memory: two tiles of `tile × head_dim` f32 in
/// 8 KiB (WebGPU guarantees 16 KiB), at most one per thread.
fn tile(head_dim: usize) -> usize {
    (1024 / head_dim).clamp(1, ROWS)
}

/// Which keys each query sees: causal (key `j` hidden from query `i` when `j > past + i`),
/// and padding. Built once per forward pass, on the host.
#[derive(Debug, Clone)]
pub struct Mask {
    pub batch: usize,
    /// Queries of this pass.
    pub t: usize,
    /// Keys in front of them (cache, prefix): S = past + t.
    pub past: usize,
    /// [batch, S]: 1 = a real key, 0 = padding; None = no padding.
    pub keys: Option<Vec<i64>>,
}

impl Mask {
    fn s(&self) -> usize {
        self.past + self.t
    }

    fn hidden_key(&self, b: usize, j: usize) -> bool {
        self.keys.as_ref().is_some_and(|k| k[b * self.s() + j] == 0)
    }

    /// The additive mask [B, 1, T, S] (0 or -1e30) of the reference.
    fn scores(&self, device: &Device) -> Tensor<4> {
        let (b, t, s) = (self.batch, self.t, self.s());
        let mut m = vec![0f32; b * t * s];
        for bi in 0..b {
            for qi in 0..t {
                for ki in 0..s {
                    if ki > self.past + qi || self.hidden_key(bi, ki) {
                        m[(bi * t + qi) * s + ki] = HIDDEN;
                    }
                }
            }
        }
        floats(m, [b, 1, t, s], device)
    }

    /// The padding as a per-key additive bias [B, S] (0 or -1e30) of the kernels.
    fn key_bias(&self) -> Vec<f32> {
        let (b, s) = (self.batch, self.s());
        (0..b * s).map(|i| if self.hidden_key(i / s, i % s) { HIDDEN } else { 0.0 }).collect()
    }

    /// The mask uploaded for the implementation that will run on `device`, for `heads` query
    /// heads of `head_dim`.
    pub fn prepare(&self, asked: AttentionImpl, heads: usize, head_dim: usize, device: &Device) -> PreparedMask {
        match runs(asked, head_dim, device) {
            AttentionImpl::Reference => PreparedMask::Scores(self.scores(device)),
            AttentionImpl::Blocked => {
                let rows = blocked::block_rows(self.batch, heads, self.s());
                let (m, per_row) = blocked::block_masks(&self.key_bias(), self.batch, self.t, self.past, rows);
                PreparedMask::Keys { bias: floats(m, [self.batch, per_row], device), past: self.past, blocked: Some(rows) }
            }
            AttentionImpl::Fused => PreparedMask::Keys { bias: floats(self.key_bias(), [self.batch, self.s()], device), past: self.past, blocked: None },
        }
    }
}

/// What runs when `asked` is asked for: the blocked attention and the fused kernels on a
/// CubeCL device (WebGPU, Vulkan), the kernels for head sizes up to 256; else the reference.
pub fn runs(asked: AttentionImpl, head_dim: usize, device: &Device) -> AttentionImpl {
    match asked {
        AttentionImpl::Blocked if runs_kernel(device) => asked,
        AttentionImpl::Fused if runs_kernel(device) && head_dim <= MAX_HEAD_DIM => asked,
        _ => AttentionImpl::Reference,
    }
}

/// A [`Mask`] on the device: the full additive mask [B, 1, T, S] (reference), the blocked
/// attention's masks of its blocks of `rows` queries (`blocked: Some(rows)`, `bias`: see
/// [`blocked::block_masks`]) or the fused kernels' per-key padding bias [B, S] (they compute
/// causality themselves).
#[derive(Debug, Clone)]
pub enum PreparedMask {
    Scores(Tensor<4>),
    Keys { bias: Tensor<2>, past: usize, blocked: Option<usize> },
}

/// Attention of `q` [B, heads, T, hd] over `k`, `v` [B, kv_heads, S, hd] (grouped-query:
/// `heads` a multiple of `kv_heads`) → [B, heads, T, hd]; the implementation the mask was
/// prepared for.
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: &PreparedMask, scale: f64) -> Tensor<4> {
    match mask {
        PreparedMask::Keys { bias, past, blocked } => fused(q, k, v, bias.clone(), AttnSpec { past: *past, scale: scale as f32, blocked: *blocked }),
        PreparedMask::Scores(m) => reference(q, k, v, m, scale),
    }
}

/// The reference: scores, softmax, weighted values, with tensor ops.
pub fn reference(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: &Tensor<4>, scale: f64) -> Tensor<4> {
    let [b, nh, _, hd] = q.dims();
    let [_, nkv, s, _] = k.dims();
    let (k, v) = if nkv != nh {
        let rep = nh / nkv;
        let e = |x: Tensor<4>| x.reshape([b, nkv, 1, s, hd]).repeat_dim(2, rep).reshape([b, nh, s, hd]);
        (e(k), e(v))
    } else {
        (k, v)
    };
    let scores = matmul(q, k.swap_dims(2, 3)).mul_scalar(scale) + mask.clone();
    matmul(softmax(scores, 3), v)
}

/// The blocked attention or the fused kernels, as `spec` says (on a CubeCL device; under
/// autodiff with their backward). They compute in f32: other inputs are widened.
pub fn fused(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, key_bias: Tensor<2>, spec: AttnSpec) -> Tensor<4> {
    let f32 = |x: Tensor<4>| if x.dtype() == DType::F32 { x } else { x.cast(DType::F32) };
    let (q, k, v) = (f32(q), f32(k), f32(v));
    Tensor::from_dispatch(Dispatch::flash_attention(q.into_dispatch(), k.into_dispatch(), v.into_dispatch(), key_bias.into_dispatch(), spec))
}

mod gpu {
    use cubecl::prelude::*;

    /// Keys and values `j0..j0 + tile` of one (batch, kv head) into workgroup memory (zeros past
    /// `s`), with their padding bias: every thread of the workgroup takes part.
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn load_tile(
        k: &Tensor<f32>,
        v: &Tensor<f32>,
        bias: &Tensor<f32>,
        ks: &mut Shared<[f32]>,
        vs: &mut Shared<[f32]>,
        bs: &mut Shared<[f32]>,
        tid: usize,
        j0: usize,
        s: usize,
        kbase: usize,
        bbase: usize,
        #[comptime] hd: usize,
        #[comptime] rows: usize,
        #[comptime] tile: usize,
    ) {
        for r in 0..comptime!((tile * hd).div_ceil(rows)) {
            let e = tid + rows * r;
            if e < comptime!(tile * hd) {
                let j = j0 + e / hd;
                let mut kv = f32::new(0.0);
                let mut vv = f32::new(0.0);
                if j < s {
                    kv = k[kbase + j * hd + e % hd];
                    vv = v[kbase + j * hd + e % hd];
                }
                ks[e] = kv;
                vs[e] = vv;
            }
        }
        if tid < tile {
            let mut bv = f32::new(0.0);
            if j0 + tid < s {
                bv = bias[bbase + j0 + tid];
            }
            bs[tid] = bv;
        }
    }

    /// The queries a workgroup of [`flash_fwd`] / [`flash_dq`] takes: `rows` of one (batch,
    /// head), query `i` for thread `tid`; `qbase` is its row's offset in q / o / dO, `kbase`
    /// the offset of its kv head's keys, and `kend` is one past the last key any of the
    /// workgroup's queries sees.
    #[derive(CubeType)]
    struct QueryRows {
        tid: usize,
        b: usize,
        i: usize,
        row_ok: bool,
        qbase: usize,
        kbase: usize,
        kend: usize,
    }

    #[cube]
    fn query_rows(nh: u32, nkv: u32, t: u32, s: u32, past: u32, #[comptime] hd: usize, #[comptime] rows: usize) -> QueryRows {
        let tid = UNIT_POS_X as usize;
        let bh = CUBE_POS_Y as usize;
        let (nh, nkv, t, s, past) = (nh as usize, nkv as usize, t as usize, s as usize, past as usize);
        let b = bh / nh;
        let g = (bh % nh) / (nh / nkv);
        let i0 = CUBE_POS_X as usize * rows;
        let i = i0 + tid;
        let mut kend = past + i0 + rows;
        if kend > s {
            kend = s;
        }
        QueryRows { tid, b, i, row_ok: i < t, qbase: (bh * t + i) * hd, kbase: (b * nkv + g) * s * hd, kend }
    }

    /// The score of query `i` against key `j`: `dot · scale` plus the key's padding `bias`,
    /// or −1e30 where the key lies past the query (causal).
    #[cube]
    fn masked_score(dot: f32, scale: f32, bias: f32, i: usize, j: usize, past: usize) -> f32 {
        let mut hidden = bias;
        if j > past + i {
            hidden = f32::new(-1.0e30);
        }
        dot * scale + hidden
    }

    /// Forward: `o[b, h, i] = Σ_j softmax_j(q_i·k_j·scale + mask) v_j` and the row's
    /// log-sum-exp `lse[b, h, i]`. A workgroup takes `rows` queries of one (batch, head), one
    /// per thread; keys and values go through workgroup memory `tile` at a time, up to the
    /// last key any of its queries sees; the thread keeps its query, its output accumulator,
    /// the running maximum and sum (online softmax, one rescale per tile).
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    pub fn flash_fwd(
        q: &Tensor<f32>,
        k: &Tensor<f32>,
        v: &Tensor<f32>,
        bias: &Tensor<f32>,
        o: &mut Tensor<f32>,
        lse: &mut Tensor<f32>,
        nh: u32,
        nkv: u32,
        t: u32,
        s: u32,
        past: u32,
        scale: f32,
        #[comptime] hd: usize,
        #[comptime] rows: usize,
        #[comptime] tile: usize,
    ) {
        let w = query_rows(nh, nkv, t, s, past, hd, rows);
        let (tid, i, row_ok, qbase, kbase, kend) = (w.tid, w.i, w.row_ok, w.qbase, w.kbase, w.kend);
        let (t, s, past) = (t as usize, s as usize, past as usize);
        let bh = CUBE_POS_Y as usize;

        let mut qr = Array::new(hd);
        let mut acc = Array::new(hd);
        for d in 0..hd {
            let mut x = f32::new(0.0);
            if row_ok {
                x = q[qbase + d];
            }
            qr[d] = x;
            acc[d] = f32::new(0.0);
        }
        let mut m = f32::new(-3.0e38);
        let mut l = f32::new(0.0);
        let mut ks = Shared::new_slice(comptime!(tile * hd));
        let mut vs = Shared::new_slice(comptime!(tile * hd));
        let mut bs = Shared::new_slice(tile);
        let mut sc = Array::new(tile);
        let mut j0 = 0usize;
        while j0 < kend {
            load_tile(k, v, bias, &mut ks, &mut vs, &mut bs, tid, j0, s, kbase, w.b * s, hd, rows, tile);
            sync_cube();
            let mut tmax = m;
            for jj in 0..tile {
                let j = j0 + jj;
                let mut dot = f32::new(0.0);
                for d in 0..hd {
                    dot += qr[d] * ks[jj * hd + d];
                }
                let mut sv = masked_score(dot, scale, bs[jj], i, j, past);
                if j >= s {
                    sv = f32::new(-3.0e38);
                }
                sc[jj] = sv;
                if sv > tmax {
                    tmax = sv;
                }
            }
            let corr = (m - tmax).exp();
            l *= corr;
            for d in 0..hd {
                acc[d] *= corr;
            }
            for jj in 0..tile {
                let p = (sc[jj] - tmax).exp();
                l += p;
                for d in 0..hd {
                    acc[d] += p * vs[jj * hd + d];
                }
            }
            m = tmax;
            sync_cube();
            j0 += tile;
        }
        if row_ok {
            for d in 0..hd {
                o[qbase + d] = acc[d] / l;
            }
            lse[bh * t + i] = m + l.ln();
        }
    }

    /// Backward, queries: `dq_i = scale · Σ_j p_ij (dp_ij − D_i) k_j` with `p` recomputed from
    /// the forward's log-sum-exp, `dp_ij = do_i·v_j`, `D_i = do_i·o_i` (written to `dsum` for
    /// [`flash_dkv`]). The forward's decomposition: `rows` queries per workgroup, key tiles.
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    pub fn flash_dq(
        q: &Tensor<f32>,
        k: &Tensor<f32>,
        v: &Tensor<f32>,
        bias: &Tensor<f32>,
        o: &Tensor<f32>,
        lse: &Tensor<f32>,
        dout: &Tensor<f32>,
        dq: &mut Tensor<f32>,
        dsum: &mut Tensor<f32>,
        nh: u32,
        nkv: u32,
        t: u32,
        s: u32,
        past: u32,
        scale: f32,
        #[comptime] hd: usize,
        #[comptime] rows: usize,
        #[comptime] tile: usize,
    ) {
        let w = query_rows(nh, nkv, t, s, past, hd, rows);
        let (tid, i, row_ok, qbase, kbase, kend) = (w.tid, w.i, w.row_ok, w.qbase, w.kbase, w.kend);
        let (t, s, past) = (t as usize, s as usize, past as usize);
        let bh = CUBE_POS_Y as usize;

        let mut qr = Array::new(hd);
        let mut dor = Array::new(hd);
        let mut acc = Array::new(hd);
        let mut dd = f32::new(0.0);
        let mut lrow = f32::new(0.0);
        for d in 0..hd {
            let mut x = f32::new(0.0);
            let mut y = f32::new(0.0);
            if row_ok {
                x = q[qbase + d];
                y = dout[qbase + d];
                dd += y * o[qbase + d];
            }
            qr[d] = x;
            dor[d] = y;
            acc[d] = f32::new(0.0);
        }
        if row_ok {
            lrow = lse[bh * t + i];
        }
        let mut ks = Shared::new_slice(comptime!(tile * hd));
        let mut vs = Shared::new_slice(comptime!(tile * hd));
        let mut bs = Shared::new_slice(tile);
        let mut j0 = 0usize;
        while j0 < kend {
            load_tile(k, v, bias, &mut ks, &mut vs, &mut bs, tid, j0, s, kbase, w.b * s, hd, rows, tile);
            sync_cube();
            for jj in 0..tile {
                let j = j0 + jj;
                let mut dot = f32::new(0.0);
                let mut dp = f32::new(0.0);
                for d in 0..hd {
                    dot += qr[d] * ks[jj * hd + d];
                    dp += dor[d] * vs[jj * hd + d];
                }
                let mut p = (masked_score(dot, scale, bs[jj], i, j, past) - lrow).exp();
                if j >= s {
                    p = f32::new(0.0);
                }
                let ds = p * (dp - dd);
                for d in 0..hd {
                    acc[d] += ds * ks[jj * hd + d];
                }
            }
            sync_cube();
            j0 += tile;
        }
        if row_ok {
            for d in 0..hd {
                dq[qbase + d] = acc[d] * scale;
            }
            dsum[bh * t + i] = dd;
        }
    }

    /// Backward, keys and values: a workgroup takes `rows` keys of one (batch, kv head), one
    /// per thread, and goes over the queries of every head of its group that can see them,
    /// `tile` at a time through workgroup memory: `dv_j = Σ_i p_ij do_i`,
    /// `dk_j = scale · Σ_i p_ij (dp_ij − D_i) q_i`.
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    pub fn flash_dkv(
        q: &Tensor<f32>,
        k: &Tensor<f32>,
        v: &Tensor<f32>,
        bias: &Tensor<f32>,
        lse: &Tensor<f32>,
        dsum: &Tensor<f32>,
        dout: &Tensor<f32>,
        dk: &mut Tensor<f32>,
        dv: &mut Tensor<f32>,
        nh: u32,
        nkv: u32,
        t: u32,
        s: u32,
        past: u32,
        scale: f32,
        #[comptime] hd: usize,
        #[comptime] rows: usize,
        #[comptime] tile: usize,
    ) {
        let tid = UNIT_POS_X as usize;
        let bg = CUBE_POS_Y as usize;
        let (nh, nkv, t, s, past) = (nh as usize, nkv as usize, t as usize, s as usize, past as usize);
        let b = bg / nkv;
        let g = bg % nkv;
        let rep = nh / nkv;
        let j0 = CUBE_POS_X as usize * rows;
        let j = j0 + tid;
        let key_ok = j < s;
        let kbase = (bg * s + j) * hd;

        let mut kr = Array::new(hd);
        let mut vr = Array::new(hd);
        let mut dka = Array::new(hd);
        let mut dva = Array::new(hd);
        let mut hidden = f32::new(0.0);
        for d in 0..hd {
            let mut x = f32::new(0.0);
            let mut y = f32::new(0.0);
            if key_ok {
                x = k[kbase + d];
                y = v[kbase + d];
            }
            kr[d] = x;
            vr[d] = y;
            dka[d] = f32::new(0.0);
            dva[d] = f32::new(0.0);
        }
        if key_ok {
            hidden = bias[b * s + j];
        }
        let mut qs = Shared::new_slice(comptime!(tile * hd));
        let mut dos = Shared::new_slice(comptime!(tile * hd));
        let mut ls = Shared::new_slice(tile);
        let mut ds_s = Shared::new_slice(tile);
        // The first query that sees a key of this workgroup: past + i >= j0.
        let mut istart = 0usize;
        if j0 > past {
            istart = j0 - past;
        }
        for hh in 0..rep {
            let bh = b * nh + g * rep + hh;
            let mut i0 = istart;
            while i0 < t {
                for r in 0..comptime!((tile * hd).div_ceil(rows)) {
                    let e = tid + rows * r;
                    if e < comptime!(tile * hd) {
                        let i = i0 + e / hd;
                        let mut x = f32::new(0.0);
                        let mut y = f32::new(0.0);
                        if i < t {
                            x = q[(bh * t + i) * hd + e % hd];
                            y = dout[(bh * t + i) * hd + e % hd];
                        }
                        qs[e] = x;
                        dos[e] = y;
                    }
                }
                if tid < tile {
                    let mut lv = f32::new(0.0);
                    let mut dv_ = f32::new(0.0);
                    if i0 + tid < t {
                        lv = lse[bh * t + i0 + tid];
                        dv_ = dsum[bh * t + i0 + tid];
                    }
                    ls[tid] = lv;
                    ds_s[tid] = dv_;
                }
                sync_cube();
                for ii in 0..tile {
                    let i = i0 + ii;
                    let mut dot = f32::new(0.0);
                    let mut dp = f32::new(0.0);
                    for d in 0..hd {
                        dot += qs[ii * hd + d] * kr[d];
                        dp += dos[ii * hd + d] * vr[d];
                    }
                    let mut p = (masked_score(dot, scale, hidden, i, j, past) - ls[ii]).exp();
                    if i >= t || !key_ok {
                        p = f32::new(0.0);
                    }
                    let ds = p * (dp - ds_s[ii]);
                    for d in 0..hd {
                        dva[d] += p * dos[ii * hd + d];
                        dka[d] += ds * qs[ii * hd + d];
                    }
                }
                sync_cube();
                i0 += tile;
            }
        }
        if key_ok {
            for d in 0..hd {
                dk[kbase + d] = dka[d] * scale;
                dv[kbase + d] = dva[d];
            }
        }
    }
}

/// What the kernels need besides the tensors.
#[derive(Debug, Clone, Copy)]
pub struct AttnSpec {
    /// Keys in front of the queries (cache, prefix).
    pub past: usize,
    pub scale: f32,
    /// The blocked attention ([`blocked`]) in blocks of this many queries, instead of the
    /// fused kernels.
    pub blocked: Option<usize>,
}

/// The fused attention as a Burn backend operation (WebGPU / Vulkan through CubeCL; under
/// autodiff with its backward for `q`, `k` and `v`; the padding bias is a constant).
#[backend_extension(Cube, Autodiff)]
pub trait FlashAttentionOps: Backend {
    /// `q` [B, heads, T, hd], `k`, `v` [B, kv_heads, S, hd], `key_bias` [B, S] → [B, heads, T, hd].
    fn flash_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, key_bias: FloatTensor<Self>, spec: AttnSpec) -> FloatTensor<Self>;
}

type Cube = FloatTensor<CubeBackend>;

/// The sizes of a launch, read from the tensors.
struct Dims {
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    s: usize,
    hd: usize,
}

fn dims(q: &Cube, k: &Cube) -> Dims {
    let (qd, kd) = (q.meta.shape().clone(), k.meta.shape().clone());
    Dims { b: qd[0], nh: qd[1], t: qd[2], hd: qd[3], nkv: kd[1], s: kd[2] }
}

fn empty(like: &Cube, shape: Shape) -> Cube {
    empty_device_dtype(like.client.clone(), like.device.clone(), shape, DType::F32)
}

/// A CubeCL tensor as a (non-autodiff) tensor of the high-level API, and back.
fn tensor<const D: usize>(x: Cube) -> Tensor<D> {
    Tensor::from_primitive::<CubeBackend>(x)
}

fn cube<const D: usize>(x: Tensor<D>) -> Cube {
    x.try_into_primitive::<CubeBackend>().expect("made from CubeCL tensors")
}

/// The forward: (output, log-sum-exp); the blocked attention computes the log-sum-exp only
/// when it is to be kept (`keep_lse`: for the backward).
fn forward(q: Cube, k: Cube, v: Cube, bias: Cube, spec: AttnSpec, keep_lse: bool) -> (Cube, Option<Cube>) {
    if let Some(rows) = spec.blocked {
        let (o, lse) = blocked::forward(tensor(q), tensor(k), tensor(v), tensor(bias), spec.past, rows, spec.scale, keep_lse);
        return (cube(o), lse.map(cube));
    }
    let (q, k, v, bias) = (into_contiguous(q), into_contiguous(k), into_contiguous(v), into_contiguous(bias));
    let d = dims(&q, &k);
    let o = empty(&q, Shape::new([d.b, d.nh, d.t, d.hd]));
    let lse = empty(&q, Shape::new([d.b, d.nh, d.t]));
    let count = CubeCount::Static(d.t.div_ceil(ROWS) as u32, (d.b * d.nh) as u32, 1);
    // SAFETY: the kernel tests every index against the sizes passed with it; the buffers are
    // contiguous and of those sizes.
    unsafe {
        gpu::flash_fwd::launch_unchecked(
            &q.client.clone(),
            count,
            CubeDim::new_1d(ROWS as u32),
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            bias.into_tensor_arg(),
            o.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            d.nh as u32,
            d.nkv as u32,
            d.t as u32,
            d.s as u32,
            spec.past as u32,
            spec.scale,
            d.hd,
            ROWS,
            tile(d.hd),
        );
    }
    (o, Some(lse))
}

/// What the backward keeps from the forward.
#[derive(Debug, Clone)]
struct FlashState {
    q: Cube,
    k: Cube,
    v: Cube,
    bias: Cube,
    o: Cube,
    lse: Cube,
    spec: AttnSpec,
}

/// The backward: (dq, dk, dv).
fn backward(st: FlashState, dout: Cube) -> (Cube, Cube, Cube) {
    let FlashState { q, k, v, bias, o, lse, spec } = st;
    if let Some(rows) = spec.blocked {
        let (dq, dk, dv) = blocked::backward(tensor(q), tensor(k), tensor(v), tensor(bias), tensor(o), tensor(lse), tensor(dout), spec.past, rows, spec.scale);
        return (cube(dq), cube(dk), cube(dv));
    }
    let dout = into_contiguous(dout);
    let d = dims(&q, &k);
    let client = q.client.clone();
    let dq = empty(&q, Shape::new([d.b, d.nh, d.t, d.hd]));
    let dsum = empty(&q, Shape::new([d.b, d.nh, d.t]));
    let dk = empty(&q, Shape::new([d.b, d.nkv, d.s, d.hd]));
    let dv = empty(&q, Shape::new([d.b, d.nkv, d.s, d.hd]));
    let sizes = (d.nh as u32, d.nkv as u32, d.t as u32, d.s as u32, spec.past as u32);
    // SAFETY: as in `forward`; `dsum` is written by the first launch before the second reads
    // it (launches on one client run in order).
    unsafe {
        gpu::flash_dq::launch_unchecked(
            &client,
            CubeCount::Static(d.t.div_ceil(ROWS) as u32, (d.b * d.nh) as u32, 1),
            CubeDim::new_1d(ROWS as u32),
            q.clone().into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            bias.clone().into_tensor_arg(),
            o.into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            dout.clone().into_tensor_arg(),
            dq.clone().into_tensor_arg(),
            dsum.clone().into_tensor_arg(),
            sizes.0,
            sizes.1,
            sizes.2,
            sizes.3,
            sizes.4,
            spec.scale,
            d.hd,
            ROWS,
            tile(d.hd),
        );
        gpu::flash_dkv::launch_unchecked(
            &client,
            CubeCount::Static(d.s.div_ceil(ROWS) as u32, (d.b * d.nkv) as u32, 1),
            CubeDim::new_1d(ROWS as u32),
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            bias.into_tensor_arg(),
            lse.into_tensor_arg(),
            dsum.into_tensor_arg(),
            dout.into_tensor_arg(),
            dk.clone().into_tensor_arg(),
            dv.clone().into_tensor_arg(),
            sizes.0,
            sizes.1,
            sizes.2,
            sizes.3,
            sizes.4,
            spec.scale,
            d.hd,
            ROWS,
            tile(d.hd),
        );
    }
    (dq, dk, dv)
}

impl FlashAttentionOps for CubeBackend {
    fn flash_attention(q: Cube, k: Cube, v: Cube, key_bias: Cube, spec: AttnSpec) -> Cube {
        forward(q, k, v, key_bias, spec, false).0
    }
}

#[derive(Debug)]
struct FlashBackward;

impl Backward<CubeBackend, 3> for FlashBackward {
    type State = FlashState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [nq, nk, nv] = ops.parents;
        let dout = grads.consume::<CubeBackend>(&ops.node);
        let (dq, dk, dv) = backward(ops.state, dout);
        for (node, g) in [(nq, dq), (nk, dk), (nv, dv)] {
            if let Some(n) = node {
                grads.register::<CubeBackend>(n.id, g);
            }
        }
    }
}

impl<C: CheckpointStrategy> FlashAttentionOps for Autodiff<CubeBackend, C> {
    fn flash_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, key_bias: FloatTensor<Self>, spec: AttnSpec) -> FloatTensor<Self> {
        let bias = <Self as AutodiffBackend>::inner(key_bias);
        match FlashBackward.prepare::<C>([q.node(), k.node(), v.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (q, k, v) = (into_contiguous(q.into_primitive()), into_contiguous(k.into_primitive()), into_contiguous(v.into_primitive()));
                let bias = into_contiguous(bias);
                let (o, lse) = forward(q.clone(), k.clone(), v.clone(), bias.clone(), spec, true);
                let lse = lse.expect("asked for");
                prep.finish(FlashState { q, k, v, bias, o: o.clone(), lse, spec }, o)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(q.into_primitive(), k.into_primitive(), v.into_primitive(), bias, spec, false).0),
        }
    }
}
