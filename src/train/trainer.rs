//! The training step: micro-batches with gradient accumulation, global-norm clipping, the
//! LR schedule and AdamW; non-finite losses skip the update and, repeated, stop training.
//! Over a base with f16 weights the loss is scaled dynamically ([`LossScaler`]).

use burn::tensor::Tensor;
use rand::SeedableRng;
use rand::rngs::SmallRng;

use crate::error::{Result, bail};
use crate::models::llama::Llama;
use crate::peft::Trainable;
use crate::tensor::floats;
use crate::tensor::read;
use crate::train::data::Batch;
use crate::train::loss::{causal_lm_loss, causal_lm_loss_by_task};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::privacy::{self, DpConfig};
use crate::train::recompute;
use crate::train::scaler::{LossScaler, scaled_backward};
use crate::train::schedule::Schedule;

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub optim: AdamWConfig,
    pub schedule: Schedule,
    pub warmup: usize,
    pub total_steps: usize,
    pub max_grad_norm: Option<f64>,
    /// Consecutive non-finite steps tolerated before training stops with an error.
    pub max_nonfinite: usize,
    /// DP-SGD: per-example clipping and Gaussian noise (`max_grad_norm` then does not apply).
    pub dp: Option<DpConfig>,
    /// DP-SGD: the expected number of examples per step (the noisy sum is divided by it).
    pub dp_expected_batch: usize,
    /// Seed of the DP noise (drawn on the host, so runs repeat on every backend), and of
    /// dropout under gradient checkpointing.
    pub seed: u64,
    /// Gradient checkpointing: recompute each block's activations in the backward pass
    /// instead of keeping them (`recompute`).
    pub gradient_checkpointing: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            optim: AdamWConfig::default(),
            schedule: Schedule::Constant,
            warmup: 0,
            total_steps: 1,
            max_grad_norm: None,
            max_nonfinite: 5,
            dp: None,
            dp_expected_batch: 1,
            seed: 0,
            gradient_checkpointing: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct StepStats {
    /// 1-based number of this optimizer step.
    pub step: usize,
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    pub lr: f64,
    /// Real (non-padding) tokens processed.
    pub tokens: usize,
    /// True when the loss or gradients were not finite and the update was skipped.
    pub skipped: bool,
    /// Multi-task training: each task's mean loss over its targets in this step (NaN when
    /// the step had no row of that task).
    pub task_losses: Vec<f32>,
}

pub struct Trainer {
    pub config: TrainConfig,
    pub opt: AdamW,
    /// Non-finite steps in a row so far (kept in checkpoints).
    pub nonfinite: usize,
    /// Loss scaling: on from the first step over a model with f16 weights (kept in
    /// checkpoints).
    pub scaler: Option<LossScaler>,
    noise: SmallRng,
}

/// Backpropagate `loss` and add each trainable tensor's gradient to `acc` (and the loss,
/// detached, to `loss_sum`).
/// With `scale` ≠ 1 the gradients are those of `scale * loss` (loss scaling).
fn accumulate(adapter: &mut dyn Trainable, loss: Tensor<1>, scale: f32, acc: &mut Vec<Option<Tensor<2>>>, loss_sum: &mut Option<Tensor<1>>) {
    let grads = scaled_backward(loss.clone(), scale);
    let g: Vec<Option<Tensor<2>>> = adapter.params_mut().iter().map(|p| p.tensor.grad(&grads)).collect();
    add_gradients(adapter, g, loss.without_autodiff(), acc, loss_sum);
}

/// Add gradients (`params_mut` order; a missing one counts as zero) to `acc`, and the
/// detached loss to `loss_sum`.
fn add_gradients(adapter: &mut dyn Trainable, grads: Vec<Option<Tensor<2>>>, loss: Tensor<1>, acc: &mut Vec<Option<Tensor<2>>>, loss_sum: &mut Option<Tensor<1>>) {
    let params = adapter.params_mut();
    acc.resize_with(params.len(), || None);
    for (i, (a, p)) in acc.iter_mut().zip(params.iter()).enumerate() {
        let g = grads.get(i).cloned().flatten().unwrap_or_else(|| p.tensor.clone().without_autodiff().zeros_like());
        *a = Some(match a.take() {
            Some(prev) => prev + g,
            None => g,
        });
    }
    *loss_sum = Some(match loss_sum.take() {
        Some(s) => s + loss,
        None => loss,
    });
}

/// The seed of micro-batch `k` of optimizer step `step` (dropout under gradient checkpointing).
fn micro_seed(seed: u64, step: usize, k: usize) -> u64 {
    seed ^ (step as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (k as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9)
}

/// The host RNG of the DP noise for loop iteration `step` of a run seeded with `seed`.
fn noise_rng(seed: u64, step: usize) -> SmallRng {
    SmallRng::seed_from_u64(seed ^ 0x5eed_d95d ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

impl Trainer {
    pub fn new(config: TrainConfig) -> Self {
        Trainer { opt: AdamW::new(config.optim), noise: noise_rng(config.seed, 0), config, nonfinite: 0, scaler: None }
    }

    /// Seed the DP noise for loop iteration `step` (so a resumed run draws the same noise).
    pub fn seed_noise(&mut self, step: usize) {
        self.noise = noise_rng(self.config.seed, step);
    }

    /// Learning rate of the next optimizer step.
    pub fn lr(&self) -> f64 {
        self.config.optim.lr * self.config.schedule.factor(self.opt.step, self.config.warmup, self.config.total_steps)
    }

    /// One optimizer step over `micro` batches (gradient accumulation: the loss is the sum
    /// over all micro-batches divided by their total number of targets, as transformers'
    /// Trainer computes it). The adapter must be trainable (`peft::set_trainable(.., true)`).
    pub async fn step(&mut self, model: &Llama, adapter: &mut dyn Trainable, micro: &[Batch]) -> Result<StepStats> {
        if let Some(dp) = self.config.dp {
            return self.step_dp(model, adapter, micro, dp).await;
        }
        if self.scaler.is_none() && model.has_half_weights() {
            self.scaler = Some(LossScaler::default());
        }
        let scale = self.scale();
        let n = adapter.virtual_tokens();
        let total: usize = micro.iter().map(|b| b.num_targets_with_prefix(n)).sum();
        let tokens = micro.iter().map(Batch::num_tokens).sum();
        let mut loss_sum: Option<Tensor<1>> = None;
        let mut acc: Vec<Option<Tensor<2>>> = Vec::new();
        let n_tasks = adapter.num_tasks();
        let mut task_sums: Option<Tensor<1>> = None;
        let mut task_counts = vec![0usize; n_tasks];
        for (k, mb) in micro.iter().enumerate() {
            adapter.prepare(mb);
            let by_task = if self.config.gradient_checkpointing {
                let _phase = crate::profile::phase("forward+backward (recomputed)");
                let r = recompute::loss_and_grads(model, adapter, mb, total, n_tasks, micro_seed(self.config.seed, self.opt.step, k), scale)?;
                add_gradients(adapter, r.grads, r.loss, &mut acc, &mut loss_sum);
                r.by_task
            } else {
                let (loss, by_task) = {
                    let _phase = crate::profile::phase("forward");
                    causal_lm_loss_by_task(model, &*adapter, mb, total, n_tasks)?
                };
                let _phase = crate::profile::phase("backward");
                accumulate(adapter, loss, scale, &mut acc, &mut loss_sum);
                by_task
            };
            if let Some((sums, counts)) = by_task {
                task_counts.iter_mut().zip(counts).for_each(|(a, c)| *a += c);
                task_sums = Some(match task_sums {
                    Some(s) => s + sums,
                    None => sums,
                });
            }
        }
        let (mut stats, extra) = {
            let _phase = crate::profile::phase("update");
            self.update(adapter, acc, loss_sum, task_sums, tokens).await?
        };
        stats.task_losses = task_counts.iter().enumerate().map(|(k, &c)| if c == 0 { f32::NAN } else { extra[k] / c as f32 }).collect();
        Ok(stats)
    }

    /// One optimizer step of any objective: `loss_of(adapter, k)` is micro-batch `k`'s share
    /// of the loss (already divided by the step's total), for `k` in `0..micro`; `tokens` is
    /// what the step processed (for the report). Gradients accumulate over the micro-batches,
    /// then clipping, the schedule and AdamW, as [`Trainer::step`].
    pub async fn step_loss<T: Trainable>(&mut self, adapter: &mut T, micro: usize, tokens: usize, mut loss_of: impl FnMut(&T, usize) -> Result<Tensor<1>>) -> Result<StepStats> {
        if self.config.dp.is_some() {
            bail!(Unsupported, "DP-SGD is available for language-model training only");
        }
        let mut loss_sum: Option<Tensor<1>> = None;
        let mut acc: Vec<Option<Tensor<2>>> = Vec::new();
        let scale = self.scale();
        for k in 0..micro {
            let loss = loss_of(&*adapter, k)?;
            accumulate(&mut *adapter, loss, scale, &mut acc, &mut loss_sum);
        }
        Ok(self.update(&mut *adapter, acc, loss_sum, None, tokens).await?.0)
    }

    /// The loss scale of the next step (1 without loss scaling).
    pub fn scale(&self) -> f32 {
        self.scaler.map_or(1.0, |s| s.scale)
    }

    /// Unscale and clip the accumulated gradients, read the loss and norm back (with `extra`, in the same
    /// single readback) and apply the update through [`Trainer::finish`].
    async fn update(
        &mut self,
        adapter: &mut dyn Trainable,
        acc: Vec<Option<Tensor<2>>>,
        loss_sum: Option<Tensor<1>>,
        extra: Option<Tensor<1>>,
        tokens: usize,
    ) -> Result<(StepStats, Vec<f32>)> {
        let Some(loss) = loss_sum else { bail!(Data, "no micro-batch") };
        let mut grads: Vec<Tensor<2>> = acc.into_iter().flatten().collect();
        let scale = self.scale();
        if scale != 1.0 {
            grads = grads.into_iter().map(|g| g.mul_scalar(1.0 / scale)).collect();
        }
        let sq: Vec<Tensor<1>> = grads.iter().map(|g| g.clone().square().sum()).collect();
        let norm = Tensor::cat(sq, 0).sum().sqrt();
        // torch.nn.utils.clip_grad_norm_: coef = min(max / (norm + 1e-6), 1), applied to the
        // gradients by the optimizer (inside its kernel where it has one).
        let coef = self.config.max_grad_norm.map(|max| norm.clone().add_scalar(1e-6).recip().mul_scalar(max).clamp_max(1.0));
        // One readback per step: the loss, the gradient norm and the extra values.
        let both = read(Tensor::cat(vec![loss, norm].into_iter().chain(extra).collect(), 0)).await?;
        let (loss, grad_norm) = (both.data[0], both.data[1]);
        let stats = self.finish(adapter, grads, coef, StepStats { step: self.opt.step + 1, loss, grad_norm, lr: self.lr(), tokens, skipped: false, task_losses: Vec::new() }, true)?;
        Ok((stats, both.data[2..].to_vec()))
    }

    /// Apply the update, unless the loss or gradients are not finite: then the step is
    /// skipped and logged, and after `max_nonfinite` such steps in a row training stops with
    /// an error, the adapter keeping its last good weights.
    /// `has_loss` is false for a DP step without examples (Poisson sampling): only noise.
    fn finish(&mut self, adapter: &mut dyn Trainable, grads: Vec<Tensor<2>>, coef: Option<Tensor<1>>, mut stats: StepStats, has_loss: bool) -> Result<StepStats> {
        let (loss, grad_norm) = (stats.loss, stats.grad_norm);
        if let Some(s) = &mut self.scaler
            && loss.is_finite()
        {
            let before = s.scale;
            if grad_norm.is_finite() {
                s.finite_step();
            } else if s.overflow() {
                // An overflow of the scaled f16 gradients: skipped, not an error.
                log::info!("step {}: the f16 gradients overflowed at loss scale {before}; update skipped, the scale is now {}", stats.step, s.scale);
                stats.skipped = true;
                return Ok(stats);
            }
        }
        if !grad_norm.is_finite() || (has_loss && !loss.is_finite()) {
            self.nonfinite += 1;
            stats.skipped = true;
            if self.nonfinite >= self.config.max_nonfinite {
                bail!(
                    Numeric,
                    "loss or gradients were not finite for {} steps in a row (last loss {loss}); stopped, the adapter keeps its last good weights. Lower --lr or check the data",
                    self.nonfinite
                );
            }
            log::warn!("step {}: non-finite loss/gradient ({loss}, {grad_norm}); update skipped", stats.step);
            return Ok(stats);
        }
        self.nonfinite = 0;
        let mut params = adapter.params_mut();
        let mut refs: Vec<&mut Tensor<2>> = params.iter_mut().map(|p| &mut *p.tensor).collect();
        self.opt.update_clipped(&mut refs, grads, stats.lr, coef);
        Ok(stats)
    }

    /// A DP-SGD step: every example's gradient (of its own mean loss) is clipped to norm C,
    /// the clipped gradients are summed, Gaussian noise N(0, σ²C²) is added to each
    /// coordinate, and the result is divided by the expected batch size (Opacus's
    /// semantics); then AdamW. An empty batch (Poisson sampling) still takes a noise step.
    /// The reported loss is the mean of the examples' losses; the gradient norm is the noisy
    /// gradient's.
    async fn step_dp(&mut self, model: &Llama, adapter: &mut dyn Trainable, micro: &[Batch], dp: DpConfig) -> Result<StepStats> {
        let tokens = micro.iter().map(Batch::num_tokens).sum();
        let (grads, loss, n) = self.dp_gradients(model, adapter, micro, dp)?;
        let norm = Tensor::cat(grads.iter().map(|g| g.clone().square().sum()).collect(), 0).sum().sqrt();
        let both = read(Tensor::cat(vec![loss, norm], 0)).await?;
        let (loss, grad_norm) = (if n == 0 { f32::NAN } else { both.data[0] }, both.data[1]);
        self.finish(adapter, grads, None, StepStats { step: self.opt.step + 1, loss, grad_norm, lr: self.lr(), tokens, skipped: false, task_losses: Vec::new() }, n > 0)
    }

    /// The DP-SGD gradient of each trainable tensor (in `params_mut` order), the mean of the
    /// examples' losses [1] and the number of examples.
    pub fn dp_gradients(&mut self, model: &Llama, adapter: &mut dyn Trainable, micro: &[Batch], dp: DpConfig) -> Result<(Vec<Tensor<2>>, Tensor<1>, usize)> {
        let rows: Vec<Batch> = micro.iter().flat_map(Batch::rows).collect();
        let n_prefix = adapter.virtual_tokens();
        let mut sum: Vec<Option<Tensor<2>>> = Vec::new();
        let mut losses: Vec<Tensor<1>> = Vec::new();
        for (k, row) in rows.iter().filter(|r| r.num_targets_with_prefix(n_prefix) > 0).enumerate() {
            adapter.prepare(row);
            let denominator = row.num_targets_with_prefix(n_prefix);
            let (loss, g) = if self.config.gradient_checkpointing {
                let r = recompute::loss_and_grads(model, adapter, row, denominator, 0, micro_seed(self.config.seed, self.opt.step, k), 1.0)?;
                (r.loss, r.grads)
            } else {
                let loss = causal_lm_loss(model, &*adapter, row, denominator)?;
                let grads = loss.backward();
                let g = adapter.params_mut().iter().map(|p| p.tensor.grad(&grads)).collect();
                (loss, g)
            };
            let params = adapter.params_mut();
            let g: Vec<Tensor<2>> = params.iter().enumerate().map(|(i, p)| g.get(i).cloned().flatten().unwrap_or_else(|| p.tensor.clone().without_autodiff().zeros_like())).collect();
            // c = min(1, C / (||g|| + 1e-6)), on the device: no readback per example.
            let norm = Tensor::cat(g.iter().map(|t| t.clone().square().sum()).collect(), 0).sum().sqrt();
            let c: Tensor<2> = norm.add_scalar(1e-6).recip().mul_scalar(dp.max_grad_norm).clamp_max(1.0).unsqueeze();
            sum.resize_with(g.len(), || None);
            for (s, t) in sum.iter_mut().zip(g) {
                let t = t * c.clone();
                *s = Some(match s.take() {
                    Some(prev) => prev + t,
                    None => t,
                });
            }
            losses.push(loss.without_autodiff());
        }
        let expected = self.config.dp_expected_batch.max(1) as f64;
        let std = dp.noise_multiplier.unwrap_or(0.0) * dp.max_grad_norm;
        let params = adapter.params_mut();
        let grads: Vec<Tensor<2>> = params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let zero = p.tensor.clone().without_autodiff().zeros_like();
                let s = sum.get(i).cloned().flatten().unwrap_or_else(|| zero.clone());
                let noisy = if std > 0.0 {
                    let [r, c] = zero.dims();
                    let z: Vec<f32> = (0..r * c).map(|_| (privacy::gaussian(&mut self.noise) * std) as f32).collect();
                    s + floats(z, [r, c], &zero.device())
                } else {
                    s
                };
                noisy.div_scalar(expected)
            })
            .collect();
        let n = losses.len();
        let loss = if n == 0 { floats(vec![0.0], [1], &model.device) } else { Tensor::cat(losses, 0).sum().div_scalar(n as f64).reshape([1]) };
        Ok((grads, loss, n))
    }
}
