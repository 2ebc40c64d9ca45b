//! Memory planning for a training run: before the first step, estimate what a (model,
//! adapter, batch, sequence length) needs and check it against the device's limits. A
//! batch whose largest buffer does not fit one device buffer is split into micro-batches
//! (gradient accumulation gives the same update); when even one row does not fit, training
//! is refused with a message naming the setting to change.
//!
//! The estimate (f32 everywhere, B = batch, T = sequence length, per layer of hidden size h,
//! MLP size i, q/kv widths q and k, H heads, vocabulary V):
//!   weights     what the base holds on the device (parameters × 4 bytes in f32; its codes,
//!               scales and minimums when kept quantized)
//!   adapter     trainable parameters × 16 bytes (value, gradient, AdamW's two moments)
//!   activations B·T·(10h + 3q + 4k + 5i) × 4 per layer: what autodiff keeps for backward
//!               (norm inputs and outputs, q/k/v before and after RoPE, attention output,
//!               gate/up/SiLU/product, residuals)
//!   attention   B·H·T² × 4 per layer (the softmax autodiff keeps), + 2 for the layer being
//!               run (scores, their gradient); with gradient checkpointing 3 in all. With the
//!               fused kernels (`models::attention`) no T² buffer exists: B·H·T × 4 per layer
//!               (the log-sum-exp kept) + 1 (D of the backward); with the blocked attention
//!               the same per layer, plus 4 blocks of scores (the backward's probabilities,
//!               their gradient and its two factors), a block being at most
//!               [`block_bytes`](crate::models::attention::blocked::block_bytes) (or one row),
//!               plus the blocks' mask, B·T² × 4 at most (shared by every layer and head)
//!   logits      B·T·V × 4 × 3 (logits, log-softmax, gradient)
//! and the largest single buffer is the biggest of one chunk of logits (the loss projects
//! [`LOGIT_CHUNK_BYTES`](crate::train::loss::LOGIT_CHUNK_BYTES) of positions at a time), the
//! attention scores (a block of them with the blocked attention, none with the fused kernels)
//! and the embedding table. With gradient checkpointing (`recompute`), activations are the blocks'
//! inputs, (layers + 1)·B·T·h × 4, plus one layer's as above (the block being recomputed).
//!
//! The plan tries, from the asked batch down through its divisors, the batch without and
//! then with gradient checkpointing (when it is not forced on or off): a batch too big for
//! the device is first kept whole by checkpointing (one more forward pass per step), and
//! only then split into micro-batches.

use crate::error::{Result, bail};
use crate::models::attention::{AttentionImpl, blocked};
use crate::models::config::LlamaConfig;

/// Bytes each part of a training step needs (see the module note for the formulas).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEstimate {
    pub weights: u64,
    pub adapter: u64,
    pub activations: u64,
    pub attention: u64,
    pub logits: u64,
    /// The largest single buffer of the step, and what it is.
    pub largest_buffer: (u64, &'static str),
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.weights + self.adapter + self.activations + self.attention + self.logits
    }
}

const F32: u64 = 4;

/// The reference attention's scores, as the largest buffer is named.
const SCORES: &str = "attention scores (batch × heads × seq-len²)";

/// What the frozen base holds on the device: all its bytes, and its largest single tensor
/// (the embedding table, or its codes when quantized).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BaseMemory {
    pub bytes: u64,
    pub largest: u64,
}

impl BaseMemory {
    /// A base of `parameters` f32 values.
    pub fn f32(c: &LlamaConfig, parameters: usize) -> Self {
        BaseMemory { bytes: parameters as u64 * F32, largest: (c.vocab_size * c.hidden_size) as u64 * F32 }
    }
}

/// The estimate for `batch` rows of `seq_len` tokens (`prefix` virtual tokens added to the
/// attention by prompt-style adapters); `attn`: the attention that runs.
pub fn estimate(c: &LlamaConfig, base: BaseMemory, trainable: usize, batch: usize, seq_len: usize, checkpointing: bool, attn: AttentionImpl) -> MemoryEstimate {
    let (b, t) = (batch as u64, seq_len as u64);
    let (h, i, v, layers) = (c.hidden_size as u64, c.intermediate_size as u64, c.vocab_size as u64, c.num_hidden_layers as u64);
    let (heads, q, k) = (c.num_attention_heads as u64, (c.num_attention_heads * c.head_dim) as u64, (c.num_key_value_heads * c.head_dim) as u64);
    let per_token = 10 * h + 3 * q + 4 * k + 5 * i;
    let all_scores = b * heads * t * t * F32;
    let row = b * heads * t * F32;
    let scores = match attn {
        AttentionImpl::Reference => all_scores,
        AttentionImpl::Blocked => all_scores.min((blocked::block_bytes() as u64).max(row)),
        AttentionImpl::Fused => 0,
    };
    let kept = if checkpointing { 1 } else { layers };
    let attention = match attn {
        AttentionImpl::Reference => (kept + 2) * scores,
        AttentionImpl::Blocked => (kept + 1) * row + 4 * scores + b * t * t * F32,
        AttentionImpl::Fused => (kept + 1) * row,
    };
    let logits = b * t * v * F32;
    let logit_chunk = (b * t).min(crate::train::loss::logit_chunk_rows(c.vocab_size) as u64) * v * F32;
    let embedding = base.largest;
    let largest_buffer = [(logit_chunk, "one chunk of logits (positions × vocabulary)"), (scores, if attn == AttentionImpl::Reference { SCORES } else { "one block of attention scores (batch × heads × rows × seq-len)" }), (embedding, "embedding table")].into_iter().max_by_key(|x| x.0).expect("three");
    let activations = if checkpointing { ((layers + 1) * h + per_token) * b * t * F32 } else { layers * b * t * per_token * F32 };
    MemoryEstimate { weights: base.bytes, adapter: trainable as u64 * 4 * F32, activations, attention, logits: 3 * logits, largest_buffer }
}

/// How a run will be executed: the micro-batch size, gradient-accumulation factor, and
/// whether activations are recomputed (gradient checkpointing).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    pub batch: usize,
    pub grad_accum: usize,
    pub checkpointing: bool,
    pub estimate: MemoryEstimate,
}

/// What a run may use: the device's largest buffer, and a budget for the whole step (what
/// the caller allows, e.g. a browser tab's share); `None` = no limit known.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    pub max_buffer: Option<u64>,
    pub budget: Option<u64>,
}

/// Fit the requested (batch, grad_accum) to `limits`: the largest divisor of `batch` whose
/// biggest buffer fits the device and whose whole step fits the budget, with the
/// accumulation multiplied to keep the effective batch (and the update) the same. What no
/// split can fix is refused, naming what to change: the model (embedding table, or weights
/// and adapter over the budget) or `seq-len` (one row too big).
/// `checkpointing`: `Some` forces gradient checkpointing on or off, `None` lets the plan
/// turn it on when the batch does not fit without it. `attn`: as [`estimate`].
#[allow(clippy::too_many_arguments)]
pub fn plan(
    c: &LlamaConfig,
    base: BaseMemory,
    trainable: usize,
    batch: usize,
    grad_accum: usize,
    seq_len: usize,
    limits: Limits,
    checkpointing: Option<bool>,
    attn: AttentionImpl,
) -> Result<Plan> {
    let est = |(b, ck): (usize, bool)| estimate(c, base, trainable, b, seq_len, ck, attn);
    let mib = |x: u64| x as f64 / (1u64 << 20) as f64;
    let (max, budget) = (limits.max_buffer.unwrap_or(u64::MAX), limits.budget.unwrap_or(u64::MAX));
    let embedding = base.largest;
    if embedding > max {
        bail!(Device, "the model's embedding table ({:.0} MiB) is larger than this device's largest buffer ({:.0} MiB): use a smaller model", mib(embedding), mib(max));
    }
    let modes: &[bool] = match checkpointing {
        Some(true) => &[true],
        Some(false) => &[false],
        None => &[false, true],
    };
    let one = est((1, *modes.last().expect("a mode")));
    if one.weights + one.adapter > budget {
        bail!(
            Config,
            "the model ({:.0} MiB) and the adapter with its optimizer state ({:.0} MiB) alone exceed the memory budget ({:.0} MiB): use a smaller model or raise the budget",
            mib(one.weights),
            mib(one.adapter),
            mib(budget)
        );
    }
    let fits = |e: &MemoryEstimate| e.largest_buffer.0 <= max && e.total() <= budget;
    let Some((b, ck)) = (1..=batch).rev().filter(|d| batch.is_multiple_of(*d)).flat_map(|d| modes.iter().map(move |&m| (d, m))).find(|&x| fits(&est(x))) else {
        let (bytes, what) = one.largest_buffer;
        if bytes > max {
            // Only the reference attention has all the scores in one buffer.
            let fused = if what == SCORES && attn == AttentionImpl::Reference { " or use the blocked attention (CLI: --attention blocked)" } else { "" };
            bail!(Config, "one row of seq-len {seq_len} needs {what} of {:.0} MiB, more than this device's largest buffer ({:.0} MiB): reduce seq-len{fused}", mib(bytes), mib(max));
        }
        bail!(Config, "one row of seq-len {seq_len} needs {:.0} MiB in all, more than the memory budget ({:.0} MiB): reduce seq-len or raise the budget", mib(one.total()), mib(budget));
    };
    if ck && checkpointing.is_none() {
        log::info!("gradient checkpointing on: batch {b} does not fit the limits without it");
    }
    if b < batch {
        let e = est((batch, ck));
        let limit = |x: Option<u64>| x.map_or("none".to_string(), |x| format!("{:.0} MiB", mib(x)));
        log::info!(
            "batch {batch} needs {:.0} MiB in all and a {:.0} MiB buffer ({}), beyond the limits (budget {}, largest buffer {}): running {} micro-batches of {b} per step (same update)",
            mib(e.total()),
            mib(e.largest_buffer.0),
            e.largest_buffer.1,
            limit(limits.budget),
            limit(limits.max_buffer),
            batch / b
        );
    }
    Ok(Plan { batch: b, grad_accum: grad_accum * (batch / b), checkpointing: ck, estimate: est((b, ck)) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use AttentionImpl::{Blocked as B, Fused as F, Reference as R};

    fn smollm2() -> LlamaConfig {
        let j = r#"{"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
            "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": true}"#;
        LlamaConfig::from_json(j).unwrap()
    }

    #[test]
    fn splits_batches_that_do_not_fit_and_names_the_setting_otherwise() {
        let c = smollm2();
        // The attention scores of 4 × 9 heads × 1024² f32 = 144 MiB: fit 256 MiB, not 128 MiB
        // (the embedding table is 108 MiB; the logits go in chunks of 64 MiB).
        let buf = |mib: u64| Limits { max_buffer: Some(mib << 20), budget: None };
        let p = plan(&c, BaseMemory::f32(&c, 134_515_008), 460_800, 4, 1, 1024, buf(256), Some(false), R).unwrap();
        assert_eq!((p.batch, p.grad_accum), (4, 1));
        let p = plan(&c, BaseMemory::f32(&c, 134_515_008), 460_800, 4, 2, 1024, buf(128), Some(false), R).unwrap();
        assert_eq!((p.batch, p.grad_accum), (2, 4), "two micro-batches of 2 per step, same effective batch");
        let e = plan(&c, BaseMemory::f32(&c, 134_515_008), 460_800, 4, 1, 4096, buf(256), Some(false), R).unwrap_err();
        assert!(e.message.contains("reduce seq-len"), "{e}");
        let e = plan(&c, BaseMemory::f32(&c, 134_515_008), 460_800, 1, 1, 16, buf(64), Some(false), R).unwrap_err();
        assert!(e.message.contains("embedding table"), "{e}");
        assert_eq!(plan(&c, BaseMemory::f32(&c, 1), 1, 3, 1, 64, Limits::default(), None, R).unwrap().batch, 3, "no limit known: as asked");
        // A budget for the whole step: 8 rows of 256 need about 5.3 GiB, 2 rows 1.7 GiB.
        let budget = |mib: u64| Limits { max_buffer: None, budget: Some(mib << 20) };
        let p = plan(&c, BaseMemory::f32(&c, 134_515_008), 460_800, 8, 1, 256, budget(2048), Some(false), R).unwrap();
        assert_eq!((p.batch, p.grad_accum), (2, 4), "{p:?}");
        assert!(p.estimate.total() <= 2048 << 20);
        // Left to choose, the plan keeps all 8 rows by recomputing activations (the blocks'
        // inputs, 263 MiB, instead of 3.9 GiB); forced on, the same.
        for ck in [None, Some(true)] {
            let p = plan(&c, BaseMemory::f32(&c, 134_515_008), 460_800, 8, 1, 256, budget(2048), ck, R).unwrap();
            assert_eq!((p.batch, p.grad_accum, p.checkpointing), (8, 1, true), "{p:?}");
            assert_eq!(p.estimate.activations, (31 * 576 + 15936) * 8 * 256 * 4);
        }
        assert!(!plan(&c, BaseMemory::f32(&c, 134_515_008), 460_800, 2, 1, 256, budget(2048), None, R).unwrap().checkpointing, "not when the batch fits without");
        let e = plan(&c, BaseMemory::f32(&c, 134_515_008), 460_800, 8, 1, 256, budget(400), Some(false), R).unwrap_err();
        assert!(e.message.contains("smaller model or raise the budget"), "{e}");
        let e = plan(&c, BaseMemory::f32(&c, 134_515_008), 460_800, 8, 1, 2048, budget(1024), Some(false), R).unwrap_err();
        assert!(e.message.contains("reduce seq-len or raise the budget"), "{e}");
    }

    #[test]
    fn linear_attention_has_no_quadratic_term() {
        let c = smollm2();
        let base = BaseMemory::f32(&c, 134_515_008);
        let (r1, r2) = (estimate(&c, base, 1, 1, 1024, false, R), estimate(&c, base, 1, 1, 2048, false, R));
        let (f1, f2) = (estimate(&c, base, 1, 1, 1024, false, F), estimate(&c, base, 1, 1, 2048, false, F));
        assert_eq!(r2.attention, 4 * r1.attention, "the reference: T²");
        assert_eq!(f2.attention, 2 * f1.attention, "fused: linear in T");
        assert_eq!(f1.attention, 31 * 9 * 1024 * 4);
        assert_eq!(r1.attention, 32 * 9 * 1024 * 1024 * 4);
        // Blocked: the same per layer, plus 4 blocks of 16 MiB (or one row, or all the scores
        // when they are smaller), plus the mask (T² × 4 per row of the batch, for all layers
        // and heads).
        let (b1, b2) = (estimate(&c, base, 1, 1, 1024, false, B), estimate(&c, base, 1, 1, 2048, false, B));
        assert_eq!(b1.attention, f1.attention + 4 * (16 << 20) + 1024 * 1024 * 4);
        assert_eq!(b2.attention - 4 * (16 << 20) - 2048 * 2048 * 4, 2 * f1.attention);
        assert_eq!(b1.largest_buffer.1, "embedding table", "a block (16 MiB) is not the largest");
        let small = estimate(&c, base, 1, 1, 128, false, B);
        assert_eq!(small.attention, 31 * 9 * 128 * 4 + 4 * 9 * 128 * 128 * 4 + 128 * 128 * 4);
        let long = estimate(&c, base, 1, 1, 1 << 22, true, B);
        assert_eq!(long.largest_buffer.0, 9 * (1 << 22) * 4, "one row of scores");
        // One row of 8192 tokens: the scores (2.25 GiB) exceed a 2 GiB buffer; fused or
        // blocked, the largest buffer is the embedding table, so only those steps fit.
        let buf = Limits { max_buffer: Some(2048 << 20), budget: None };
        let e = plan(&c, base, 1, 1, 1, 8192, buf, Some(true), R).unwrap_err();
        assert!(e.message.contains("reduce seq-len or use the blocked attention"), "{e}");
        assert!(plan(&c, base, 1, 1, 1, 8192, buf, Some(true), F).is_ok());
        assert!(plan(&c, base, 1, 1, 1, 8192, buf, Some(true), B).is_ok());
    }

    #[test]
    fn logits_go_in_chunks() {
        let c = smollm2();
        let base = BaseMemory::f32(&c, 134_515_008);
        // 341 positions × 49152 × 4 bytes ≤ 64 MiB.
        assert_eq!(crate::train::loss::logit_chunk_rows(49152), 341);
        let e = estimate(&c, base, 1, 4, 256, false, R);
        assert_eq!(e.logits, 3 * 4 * 256 * 49152 * 4, "all positions' logits count in the total");
        assert_eq!(e.largest_buffer, (49152 * 576 * 4, "embedding table"), "but no buffer holds them all");
        // One row of 1024 on a device whose largest buffer is 128 MiB (lavapipe): its logits
        // (192 MiB) in one buffer were refused; in chunks it trains.
        let buf = Limits { max_buffer: Some(128 << 20), budget: None };
        let p = plan(&c, base, 1, 1, 1, 1024, buf, Some(false), R).unwrap();
        assert_eq!((p.batch, p.grad_accum), (1, 1));
    }
}
