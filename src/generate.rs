//! Decoding with the KV cache: greedy (temperature 0) or temperature + top-p sampling.
//! Sampling happens on the host after an async read of one logits row per token.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::error::{Result, bail};
use crate::models::hooks::Adapter;
use crate::models::llama::{Inputs, KvCache, Llama};
use crate::tensor::{ints, read};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// Stop at this token (usually EOS); it is not included in the output.
    pub stop: Option<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_new_tokens: 32, temperature: 0.0, top_p: 1.0, seed: 0, stop: None }
    }
}

/// Pick the next token from a logits row.
pub fn sample(logits: &[f32], opts: &GenerateOptions, rng: &mut SmallRng) -> u32 {
    if opts.temperature <= 0.0 {
        // First maximum, as torch.argmax.
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let t = opts.temperature as f32;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f32)> = logits.iter().enumerate().map(|(i, &v)| (i, ((v - max) / t).exp())).collect();
    let sum: f32 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= sum);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    if opts.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = 0;
        for p in &probs {
            keep += 1;
            cum += p.1;
            if cum >= opts.top_p as f32 {
                break;
            }
        }
        probs.truncate(keep.max(1));
    }
    let total: f32 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.random::<f32>() * total;
    for &(i, p) in &probs {
        if u < p {
            return i as u32;
        }
        u -= p;
    }
    probs.last().map_or(0, |p| p.0 as u32)
}

/// Generate up to `max_new_tokens` after `prompt`; `on_token` sees each new token as it comes
/// and returns whether to go on (`false` stops after that token, e.g. a caller's cancel).
pub async fn generate(model: &Llama, hook: &dyn Adapter, prompt: &[u32], opts: &GenerateOptions, mut on_token: impl FnMut(u32) -> bool) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        bail!(Data, "empty prompt");
    }
    let max_pos = model.config.max_position_embeddings;
    let mut rng = SmallRng::seed_from_u64(opts.seed);
    let mut cache = KvCache::default();
    let mut out = Vec::new();
    let mut next_input: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    for _ in 0..opts.max_new_tokens {
        if cache.len + next_input.len() > max_pos {
            break;
        }
        let t = next_input.len();
        let inputs = Inputs { ids: ints(next_input, [1, t], &model.device), attention_mask: None };
        // Only the last position's logits: a long prompt projects one row onto the vocabulary.
        let hidden = model.hidden(&inputs, hook, Some(&mut cache))?;
        let last = read(model.logits_of(hidden.narrow(0, t - 1, 1), hook)).await?;
        let tok = sample(&last.data, opts, &mut rng);
        if Some(tok) == opts.stop {
            break;
        }
        out.push(tok);
        if !on_token(tok) {
            break;
        }
        next_input = vec![tok as i64];
    }
    Ok(out)
}
