//! The causal-LM loss with transformers' semantics: position t predicts label t+1, labels
//! equal to -100 are ignored, and the loss is the mean over counted positions (or the sum
//! divided by a given count, for gradient accumulation as transformers' Trainer does).

use burn::tensor::Tensor;
use burn::tensor::activation::log_softmax;

use crate::error::{Result, bail};
use crate::models::hooks::Adapter;
use crate::models::llama::{Inputs, Llama, Segment};
use crate::tensor::ints;
use crate::train::data::{Batch, IGNORE};

/// Sum of the negative log-likelihoods of the batch's targets divided by `denominator`
/// (pass `batch.num_targets()` for the plain mean). Logits are computed only at the
/// positions that count, so prompt and padding positions cost no vocabulary projection.
pub fn causal_lm_loss(model: &Llama, hook: &dyn Adapter, batch: &Batch, denominator: usize) -> Result<Tensor<1>> {
    let (logp, _) = target_log_probs(model, hook, batch, None)?;
    if denominator == 0 {
        bail!(Data, "the batch has no position to predict (all labels are -100)");
    }
    Ok(logp.sum().neg().div_scalar(denominator as f64))
}

/// The loss as [`causal_lm_loss`] plus, for a multi-task batch (`batch.tasks` set), each
/// task's summed negative log-likelihood [n_tasks] and its number of targets (host side).
pub fn causal_lm_loss_by_task(model: &Llama, hook: &dyn Adapter, batch: &Batch, denominator: usize, n_tasks: usize) -> Result<(Tensor<1>, Option<(Tensor<1>, Vec<usize>)>)> {
    causal_lm_loss_from(model, hook, batch, denominator, n_tasks, None)
}

/// [`causal_lm_loss_by_task`] from the last block's output `last` [B*(n+T), hidden] when
/// given (only the final norm and the head then run: gradient checkpointing's top segment).
pub fn causal_lm_loss_from(
    model: &Llama,
    hook: &dyn Adapter,
    batch: &Batch,
    denominator: usize,
    n_tasks: usize,
    last: Option<Tensor<2>>,
) -> Result<(Tensor<1>, Option<(Tensor<1>, Vec<usize>)>)> {
    let (logp, rows) = target_log_probs(model, hook, batch, last)?;
    if denominator == 0 {
        bail!(Data, "the batch has no position to predict (all labels are -100)");
    }
    let loss = logp.clone().sum().neg().div_scalar(denominator as f64);
    if batch.tasks.is_empty() || n_tasks == 0 {
        return Ok((loss, None));
    }
    let per_row = batch.len + hook.virtual_tokens();
    let mut onehot = vec![0f32; n_tasks * rows.len()];
    let mut counts = vec![0usize; n_tasks];
    for (j, &r) in rows.iter().enumerate() {
        let task = batch.tasks[r as usize / per_row];
        onehot[task * rows.len() + j] = 1.0;
        counts[task] += 1;
    }
    let m = crate::tensor::floats(onehot, [n_tasks, rows.len()], &model.device);
    let sums = m.matmul(logp.detach()).neg().reshape([n_tasks]);
    Ok((loss, Some((sums, counts))))
}

/// Negative log-likelihood of each row's targets, [B] (e.g. to score choices).
pub fn row_nll(model: &Llama, hook: &dyn Adapter, batch: &Batch) -> Result<Tensor<1>> {
    let (logp, rows) = target_log_probs(model, hook, batch, None)?;
    // One-hot [B, M] of which row each counted position belongs to.
    let row_len = rows.len().max(1);
    let per_row = batch.len + hook.virtual_tokens();
    let mut onehot = vec![0f32; batch.batch * row_len];
    for (j, &r) in rows.iter().enumerate() {
        onehot[(r as usize / per_row) * row_len + j] = 1.0;
    }
    let m = crate::tensor::floats(onehot, [batch.batch, row_len], &model.device);
    Ok(m.matmul(logp).neg().reshape([batch.batch]))
}

/// A batch as the model's inputs (ids and attention mask).
pub fn batch_inputs(batch: &Batch, dev: &burn::tensor::Device) -> Inputs {
    Inputs { ids: ints(batch.input_ids.clone(), [batch.batch, batch.len], dev), attention_mask: Some(batch.attention_mask.clone()) }
}

/// Log-probabilities [M, 1] of the counted targets and their flat row-position indices.
fn target_log_probs(model: &Llama, hook: &dyn Adapter, batch: &Batch, last: Option<Tensor<2>>) -> Result<(Tensor<2>, Vec<i64>)> {
    let dev = &model.device;
    // Virtual tokens (prompt tuning) come first with label -100, as peft does; so the last
    // one predicts the first real token.
    let n = hook.virtual_tokens();
    let targets = batch.shifted_targets_with_prefix(n);
    let rows: Vec<i64> = targets.iter().enumerate().filter(|(_, t)| **t != IGNORE).map(|(i, _)| i as i64).collect();
    if rows.is_empty() {
        bail!(Data, "the batch has no position to predict (all labels are -100)");
    }
    let vocab = model.config.vocab_size as i64;
    if let Some(bad) = targets.iter().find(|&&t| t != IGNORE && !(0..vocab).contains(&t)) {
        bail!(Data, "label {bad} is outside the vocabulary (size {vocab})");
    }
    let inputs = batch_inputs(batch, dev);
    let layers = model.blocks.len();
    let seg = match last {
        Some(x) => Segment { from: Some((layers, x)), ..Segment::all(layers) },
        None => Segment::all(layers),
    };
    let (hidden, n2) = model.pass(&inputs, hook, None, seg)?;
    debug_assert_eq!(n, n2);
    let m = rows.len();
    let hidden = hidden.select(0, ints(rows.clone(), [m], dev));
    let tgt: Vec<i64> = rows.iter().map(|&r| targets[r as usize]).collect();
    Ok((target_log_probs_chunked(model, hook, hidden, &tgt, logit_chunk_rows(model.config.vocab_size)), rows))
}

/// The most bytes one chunk of logits may take: well under WebGPU's default limits
/// (`maxStorageBufferBindingSize` 128 MiB, `maxBufferSize` 256 MiB), so that a long sequence
/// never asks the device for one [tokens, vocabulary] buffer.
pub const LOGIT_CHUNK_BYTES: u64 = 64 << 20;

/// How many positions' logits [`LOGIT_CHUNK_BYTES`] holds for a vocabulary of `vocab` (f32).
pub fn logit_chunk_rows(vocab: usize) -> usize {
    (LOGIT_CHUNK_BYTES / (vocab as u64 * 4)).max(1) as usize
}

/// `log_softmax(hidden · head)[i, targets[i]]` [M, 1] for the final hidden states `hidden`
/// [M, h], `chunk` positions at a time: each chunk's logits and log-softmax are their own
/// buffers (the same values as one projection of all rows; autodiff backpropagates through
/// each chunk).
pub fn target_log_probs_chunked(model: &Llama, hook: &dyn Adapter, hidden: Tensor<2>, targets: &[i64], chunk: usize) -> Tensor<2> {
    let dev = &model.device;
    let m = targets.len();
    let chunk = chunk.max(1);
    let parts: Vec<Tensor<2>> = (0..m)
        .step_by(chunk)
        .map(|start| {
            let len = chunk.min(m - start);
            let h = if len == m { hidden.clone() } else { hidden.clone().narrow(0, start, len) };
            let logits = model.logits_of(h, hook);
            log_softmax(logits, 1).gather(1, ints(targets[start..start + len].to_vec(), [len, 1], dev))
        })
        .collect();
    if parts.len() == 1 { parts.into_iter().next().expect("one") } else { Tensor::cat(parts, 0) }
}
