//! What a training step costs in floating-point operations, and what the device can do: the
//! benchmark's achieved TFLOP/s and its fraction of a measured peak (`webpeft bench`,
//! `webpeft peak`).
//!
//! A step over `B` rows of `T` tokens counts the matrix products only, 2 FLOPs per
//! multiply-add (norms, activations, softmax, the loss and the optimizer are left out, as
//! model-FLOP counts usually do):
//!
//! - **forward** `2·N·B·T' + 4·L·B·T'·S·d`, where `N` is the base's matrix parameters (every
//!   linear layer of the blocks and the LM head, tied or not), `T' = T + P` with `P` the
//!   adapter's virtual tokens (prompt tuning, p-tuning), `S = T' + K` with `K` its prefix keys
//!   (prefix tuning), `L` layers and `d = heads · head_dim` (scores `Q·Kᵀ` and `P·V`, counted
//!   over the whole `T' × S` matrix, masked positions included);
//! - **backward**, input gradients only (the base is frozen and gets no weight gradient):
//!   `2·N·B·T' + 8·L·B·T'·S·d` (two products per product of the forward pass in attention,
//!   one per frozen matrix);
//! - **adapter** `6·A·B·T' + 2·F·B·T'`: `A` parameters in matrices the adapter adds (LoRA's A
//!   and B, a bottleneck adapter's down and up: their forward, input gradient and weight
//!   gradient), `F` in base matrices trained in full (`modules_to_save`, selective tuning: their
//!   weight gradient; their forward and input gradient are in `N`). IA3's vectors, prompt
//!   embeddings and norm weights are elementwise or gathered: 0.
//!
//! Gradient checkpointing's recomputed forward pass is not counted: the count is the model's
//! work, not the work done, so that a step with it shows a lower rate.

use burn::tensor::{Device, Tensor};

use crate::error::{Result, bail};
use crate::models::linear::Weight;
use crate::models::llama::Llama;
use crate::peft::{Layout, Trainable};
use crate::tensor::{floats, wait_for};

/// The FLOPs of one training step, by part (see the module's formula).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StepFlops {
    pub forward: f64,
    pub backward: f64,
    pub adapter: f64,
}

impl StepFlops {
    pub fn total(&self) -> f64 {
        self.forward + self.backward + self.adapter
    }
}

/// The base's matrix parameters `N`: every linear layer of the blocks and the LM head (the
/// embedding table when tied: the logits are a product with it).
pub fn matrix_parameters(model: &Llama) -> usize {
    let c = &model.config;
    let head = model.lm_head.as_ref().map_or(c.vocab_size * c.hidden_size, |l| l.in_features() * l.out_features());
    head + model.blocks.iter().flat_map(|b| b.linears.values()).map(|l| l.in_features() * l.out_features()).sum::<usize>()
}

/// A trainable tensor's part in the count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MatrixKind {
    /// A matrix the adapter adds (`A`: LoRA's A and B, a bottleneck's down and up).
    Added,
    /// A base matrix trained in full (`F`).
    Full,
    /// Elementwise or gathered: not counted.
    Other,
}

fn matrix_kind(name: &str, layout: Layout) -> MatrixKind {
    if ["lora_A.weight", "lora_B.weight", "lora_embedding_B", ".down.weight", ".up.weight"].iter().any(|s| name.ends_with(s)) {
        MatrixKind::Added
    } else if layout == Layout::Transposed && !name.ends_with("lora_embedding_A") {
        MatrixKind::Full
    } else {
        MatrixKind::Other
    }
}

/// The FLOPs of one training step of `adapter` on `model` over `batch` rows of `seq_len`
/// tokens (see the module's formula).
pub fn training_step(model: &Llama, adapter: &mut dyn Trainable, batch: usize, seq_len: usize) -> StepFlops {
    let c = &model.config;
    let virtual_tokens = adapter.virtual_tokens();
    let prefix_keys = adapter.prefix_kv().and_then(|kv| kv.first().map(|(k, _)| k.dims()[2])).unwrap_or(0);
    let (mut added, mut full) = (0usize, 0usize);
    for p in adapter.params_mut() {
        let n: usize = p.tensor.dims().iter().product();
        match matrix_kind(&p.name, p.layout) {
            MatrixKind::Added => added += n,
            MatrixKind::Full => full += n,
            MatrixKind::Other => {}
        }
    }
    let t = (seq_len + virtual_tokens) as f64;
    let s = t + prefix_keys as f64;
    let rows = batch as f64 * t;
    let attention = c.num_hidden_layers as f64 * batch as f64 * t * s * (c.num_attention_heads * c.head_dim) as f64;
    let n = matrix_parameters(model) as f64;
    StepFlops { forward: 2.0 * n * rows + 4.0 * attention, backward: 2.0 * n * rows + 8.0 * attention, adapter: (6.0 * added as f64 + 2.0 * full as f64) * rows }
}

/// One matmul's measured rate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MatmulRate {
    /// `f32`, `f16` (Burn's matmul), `f32-ours` (our f32 kernel, [`crate::matmul`]) or `q4_1`
    /// (the dequantizing kernel of [`crate::quant`]).
    pub kernel: String,
    /// `[n, n] · [n, n]`.
    pub n: usize,
    pub seconds: f64,
    pub tflops: f64,
}

/// The device's measured peak: the best rate of our matmuls.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Peak {
    pub tflops: f64,
    pub kernel: String,
    pub n: usize,
    pub rates: Vec<MatmulRate>,
}

/// Time `[n, n] · [n, n]` products with each matmul the training step uses (Burn's f32 matmul,
/// its f16 matmul where the device has f16, the Q4_1 dequantizing kernel on a GPU) at each
/// size in `sizes`: one warm-up, then `reps` products submitted together and waited for once.
/// The best rate is the device's peak as far as this toolkit can reach it.
pub async fn matmul_peak(device: &Device, sizes: &[usize], reps: usize) -> Result<Peak> {
    if sizes.is_empty() || reps == 0 || sizes.contains(&0) {
        bail!(Config, "peak: sizes and repetitions must be >= 1");
    }
    let mut rates = Vec::new();
    for &n in sizes {
        crate::tensor::check_size("peak matrix", &[n, n])?;
        let values = |seed: usize| (0..n * n).map(|i| (((i * 7919 + seed) % 1009) as f32 / 1009.0 - 0.5) * 0.1).collect::<Vec<f32>>();
        let x = floats(values(1), [n, n], device);
        let w = values(2);
        // Each matmul training uses, as `x ↦ x · W`.
        type Product = Box<dyn Fn(Tensor<2>) -> Tensor<2>>;
        let dense = floats(w.clone(), [n, n], device);
        let d = dense.clone();
        let mut products: Vec<(&str, Product)> = vec![("f32", Box::new(move |x: Tensor<2>| x.matmul(d.clone())))];
        if crate::matmul::takes(&x, &dense) {
            products.push(("f32-ours", Box::new(move |x| crate::matmul::kernel(x, dense.clone()))));
        }
        if device.supports_dtype(burn::tensor::FloatDType::F16) {
            let h = Weight::Half(crate::tensor::halves(&w, [n, n], device));
            products.push(("f16", Box::new(move |x| h.matmul(x))));
        }
        if crate::quant::kernel::runs_kernel(device) && n % 32 == 0 {
            let q = Weight::Quant(crate::quant::weight::quantize_upload(crate::quant::QuantFormat::Q4_1, n, n, &w, device)?);
            products.push(("q4_1", Box::new(move |x| q.matmul(x))));
        }
        for (kernel, product) in products {
            let run = async |k: usize| -> Result<f64> {
                let t0 = web_time::Instant::now();
                wait_for((0..k).map(|_| product(x.clone())).collect()).await?;
                Ok(t0.elapsed().as_secs_f64())
            };
            run(1).await?;
            let seconds = run(reps).await? / reps as f64;
            rates.push(MatmulRate { kernel: kernel.into(), n, seconds, tflops: 2.0 * (n as f64).powi(3) / seconds / 1e12 });
        }
    }
    let best = rates.iter().max_by(|a, b| a.tflops.total_cmp(&b.tflops)).expect("at least one rate").clone();
    Ok(Peak { tflops: best.tflops, kernel: best.kernel, n: best.n, rates })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrices_are_told_apart_by_name_and_layout() {
        assert_eq!(matrix_kind("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", Layout::Transposed), MatrixKind::Added);
        assert_eq!(matrix_kind("base_model.model.model.layers.0.mlp.adapter.down.weight", Layout::Transposed), MatrixKind::Added);
        assert_eq!(matrix_kind("base_model.model.model.embed_tokens.lora_embedding_A", Layout::Transposed), MatrixKind::Other);
        assert_eq!(matrix_kind("base_model.model.lm_head.weight", Layout::Transposed), MatrixKind::Full);
        assert_eq!(matrix_kind("base_model.model.model.layers.0.mlp.down_proj.ia3_l", Layout::Row), MatrixKind::Other);
        assert_eq!(matrix_kind("prompt_embeddings", Layout::Same), MatrixKind::Other);
    }
}
