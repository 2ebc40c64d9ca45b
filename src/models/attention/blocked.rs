//! Attention in blocks of queries, through the matmul kernels, with its own backward: memory
//! linear in the sequence length without a hand-written attention kernel.
//!
//! The forward takes the queries a block at a time (as many as keep one block's scores under
//! [`block_bytes`]), computes the block's scores against the keys it can see (causal: up to
//! `past + last query`), its softmax and its output, and keeps only the output and one
//! log-sum-exp per query row. The backward recomputes each block's probabilities from the
//! log-sum-exp (`p = exp(s − lse)`) and forms `dq`, and the block's share of `dk` and `dv`:
//!
//! ```text
//! dP = dO·Vᵀ   D = rowsum(dO ∘ O)   dS = P ∘ (dP − D)
//! dQ = scale · dS·K   dK += scale · dSᵀ·Q   dV += Pᵀ·dO
//! ```
//!
//! Grouped-query attention runs without repeating the keys: the `rep = heads / kv_heads`
//! query heads of a kv head are stacked as one [rep · block, head_dim] operand, so `dk` and
//! `dv` come out summed over the group. The mask is the reference's, value for value (a
//! hidden key's score is `score + (−1e30)`): built once per forward pass on the host
//! ([`block_masks`]: per block, [B, queries × keys it sees], shared by every layer and head),
//! as the reference uploads its [B, T, S] mask. Every product goes through
//! [`crate::matmul::matmul`] (the tiled kernel where it runs); no [heads, T, S] buffer exists
//! beyond one block.

use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::Tensor;

use super::HIDDEN;
use crate::matmul::matmul;

/// Bytes of one block's scores ([batch, heads, block, S] f32) the blocks are sized to.
static BLOCK_BYTES: AtomicUsize = AtomicUsize::new(16 << 20);

/// Size the blocks to `bytes` of scores (tests: several blocks at small sizes).
pub fn set_block_bytes(bytes: usize) {
    BLOCK_BYTES.store(bytes.max(1), Ordering::Relaxed);
}

/// Bytes of one block's scores the blocks are sized to (16 MiB unless set).
pub fn block_bytes() -> usize {
    BLOCK_BYTES.load(Ordering::Relaxed)
}

/// Query rows per block: as many as keep `batch × heads × rows × keys` f32 within
/// [`block_bytes`], at least one.
pub fn block_rows(batch: usize, heads: usize, keys: usize) -> usize {
    (block_bytes() / (batch * heads * keys * 4).max(1)).max(1)
}

/// The blocks of `t` queries behind `past` keys, `rows` at a time: (first query, queries, keys
/// they see: up to `past` + the last one, causal).
fn blocks(t: usize, s: usize, past: usize, rows: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    (0..t).step_by(rows.max(1)).map(move |i0| {
        let c = rows.min(t - i0);
        (i0, c, (past + i0 + c).min(s))
    })
}

/// Every block's additive mask, one after the other per row of the batch: [B, Σ queries ×
/// keys], −1e30 where key `j` is hidden from query `i` (`j > past + i`, or `key_bias[j]`
/// set), else 0. `key_bias` is [B, S] (0 or −1e30).
pub fn block_masks(key_bias: &[f32], batch: usize, t: usize, past: usize, rows: usize) -> (Vec<f32>, usize) {
    let s = past + t;
    let per_row: usize = blocks(t, s, past, rows).map(|(_, c, keys)| c * keys).sum();
    let mut m = Vec::with_capacity(batch * per_row);
    for b in 0..batch {
        let bias = &key_bias[b * s..][..s];
        for (i0, c, keys) in blocks(t, s, past, rows) {
            for i in i0..i0 + c {
                m.extend((0..keys).map(|j| if j > past + i { HIDDEN } else { bias[j] }));
            }
        }
    }
    (m, per_row)
}

/// The sizes of one call.
#[derive(Debug, Clone, Copy)]
struct Shape {
    b: usize,
    nkv: usize,
    rep: usize,
    t: usize,
    s: usize,
    hd: usize,
    past: usize,
    rows: usize,
}

impl Shape {
    fn of(q: &Tensor<4>, k: &Tensor<4>, past: usize, rows: usize) -> Shape {
        let [b, nh, t, hd] = q.dims();
        let [_, nkv, s, _] = k.dims();
        Shape { b, nkv, rep: nh / nkv, t, s, hd, past, rows }
    }

    /// The blocks, with where each one's mask starts in a row of [`block_masks`].
    fn blocks(&self) -> impl Iterator<Item = ((usize, usize, usize), usize)> + use<> {
        let mut off = 0;
        blocks(self.t, self.s, self.past, self.rows).map(move |blk| {
            let at = off;
            off += blk.1 * blk.2;
            (blk, at)
        })
    }

    /// Rows `i0..i0 + c` of a [B, heads, T, x] tensor as [B, kv_heads, rep · c, x].
    fn rows(&self, x: &Tensor<4>, i0: usize, c: usize) -> Tensor<4> {
        let w = x.dims()[3];
        x.clone().reshape([self.b, self.nkv, self.rep, self.t, w]).narrow(3, i0, c).reshape([self.b, self.nkv, self.rep * c, w])
    }

    /// Blocks of [B, kv_heads, rep · c, x] back to [B, heads, T, x].
    fn join(&self, mut parts: Vec<Tensor<4>>) -> Tensor<4> {
        let w = parts[0].dims()[3];
        let whole = [self.b, self.nkv * self.rep, self.t, w];
        if parts.len() == 1 {
            return parts.remove(0).reshape([self.b, self.nkv, self.rep, self.t, w]).reshape(whole);
        }
        let parts = parts.into_iter().map(|p| {
            let c = p.dims()[2] / self.rep;
            p.reshape([self.b, self.nkv, self.rep, c, w])
        });
        Tensor::cat(parts.collect(), 3).reshape(whole)
    }

    /// The scores `q·kᵀ·scale + mask` of queries `i0..i0 + c` (as [`Shape::rows`]) against
    /// the first `keys` keys, the mask at `at` in `masks` ([`block_masks`]): [B, kv_heads,
    /// rep · c, keys].
    fn scores(&self, q: Tensor<4>, k: &Tensor<4>, masks: &Tensor<2>, ((_, c, keys), at): ((usize, usize, usize), usize), scale: f32) -> Tensor<4> {
        let Shape { b, nkv, rep, .. } = *self;
        let s = matmul(q, k.clone().narrow(2, 0, keys).swap_dims(2, 3)).mul_scalar(scale);
        let mask = masks.clone().narrow(1, at, c * keys).reshape([b, 1, 1, c, keys]);
        (s.reshape([b, nkv, rep, c, keys]) + mask).reshape([b, nkv, rep * c, keys])
    }
}

/// `q` [B, heads, T, hd], `k`, `v` [B, kv_heads, S, hd], `masks` the [`block_masks`] of
/// blocks of `rows` queries, `past` = S − T keys in front → (output [B, heads, T, hd], and
/// with `keep_lse` (for the backward) the log-sum-exp [B, heads, T]).
#[allow(clippy::too_many_arguments)]
pub fn forward(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, masks: Tensor<2>, past: usize, rows: usize, scale: f32, keep_lse: bool) -> (Tensor<4>, Option<Tensor<3>>) {
    let sh = Shape::of(&q, &k, past, rows);
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for blk in sh.blocks() {
        let ((i0, c, keys), _) = blk;
        let s = sh.scores(sh.rows(&q, i0, c), &k, &masks, blk, scale);
        let m = s.clone().max_dim(3);
        let p = (s - m.clone()).exp();
        let l = p.clone().sum_dim(3);
        outs.push(matmul(p, v.clone().narrow(2, 0, keys)).div(l.clone()));
        if keep_lse {
            lses.push(m + l.log());
        }
    }
    let lse = keep_lse.then(|| sh.join(lses).reshape([sh.b, sh.nkv * sh.rep, sh.t]));
    (sh.join(outs), lse)
}

/// The gradients (dq, dk, dv) of [`forward`] for the output's gradient `dout`, from its
/// output `o` and log-sum-exp `lse`.
#[allow(clippy::too_many_arguments)]
pub fn backward(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, masks: Tensor<2>, o: Tensor<4>, lse: Tensor<3>, dout: Tensor<4>, past: usize, rows: usize, scale: f32) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
    let sh = Shape::of(&q, &k, past, rows);
    let lse = lse.reshape([sh.b, sh.nkv * sh.rep, sh.t, 1]);
    let mut dk = Tensor::<4>::zeros([sh.b, sh.nkv, sh.s, sh.hd], &q.device());
    let mut dv = dk.clone();
    let mut dqs = Vec::new();
    for blk in sh.blocks() {
        let ((i0, c, keys), _) = blk;
        let (qb, ob, db) = (sh.rows(&q, i0, c), sh.rows(&o, i0, c), sh.rows(&dout, i0, c));
        let (kb, vb) = (k.clone().narrow(2, 0, keys), v.clone().narrow(2, 0, keys));
        let p = (sh.scores(qb.clone(), &k, &masks, blk, scale) - sh.rows(&lse, i0, c)).exp();
        let dp = matmul(db.clone(), vb.swap_dims(2, 3));
        let d = (db.clone() * ob).sum_dim(3);
        let ds = p.clone() * (dp - d);
        dqs.push(matmul(ds.clone(), kb).mul_scalar(scale));
        let dk_b = matmul(ds.swap_dims(2, 3), qb).mul_scalar(scale);
        let dv_b = matmul(p.swap_dims(2, 3), db);
        (dk, dv) = (add_front(dk, dk_b), add_front(dv, dv_b));
    }
    (sh.join(dqs), dk, dv)
}

/// `acc` [B, kv_heads, S, hd] with `part` [B, kv_heads, keys ≤ S, hd] added to its first keys.
fn add_front(acc: Tensor<4>, part: Tensor<4>) -> Tensor<4> {
    let [b, g, s, hd] = acc.dims();
    let keys = part.dims()[2];
    if keys == s {
        return acc + part;
    }
    let front = acc.clone().narrow(2, 0, keys) + part;
    acc.slice_assign([0..b, 0..g, 0..keys, 0..hd], front)
}
