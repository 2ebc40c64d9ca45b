//! Gradient checkpointing (activation recomputation, what transformers' `gradient_checkpointing`
//! does): the forward pass runs without autodiff and keeps only each block's input; the
//! backward pass then goes block by block from the top, recomputing one block's activations
//! from its saved input and backpropagating the gradient that reached its output. What the
//! step holds for backward drops from every block's activations to (layers + 1) block inputs
//! plus one block's activations, for one more forward pass of compute.
//!
//! The gradients equal the plain step's (every method's one-step check against PyTorch in
//! `tests/methods.rs` runs both ways). Dropout draws the same masks in the first pass and the
//! recomputation: the device's RNG is seeded before each block.

use burn::tensor::Tensor;

use crate::error::{Result, bail};
use crate::models::llama::{Llama, Segment};
use crate::peft::{Trainable, set_trainable};
use crate::train::data::Batch;
use crate::train::loss::{batch_inputs, causal_lm_loss_from};

/// Each trainable tensor's gradient (`params_mut` order; `None` where it got none), the loss
/// (detached) and, for a multi-task batch, each task's summed loss and target count.
pub struct Gradients {
    pub grads: Vec<Option<Tensor<2>>>,
    pub loss: Tensor<1>,
    pub by_task: Option<(Tensor<1>, Vec<usize>)>,
}

/// The seed of block `l`'s random draws in a micro-batch seeded with `seed`.
fn block_seed(seed: u64, l: usize) -> u64 {
    seed ^ (l as u64 + 1).wrapping_mul(0xd1b5_4a32_d192_ed03)
}

/// Add the gradients `backward` produced for the adapter's tensors to `acc`.
fn collect(adapter: &mut dyn Trainable, grads: &burn::tensor::Gradients, acc: &mut Vec<Option<Tensor<2>>>) {
    let params = adapter.params_mut();
    acc.resize_with(params.len(), || None);
    for (a, p) in acc.iter_mut().zip(params.iter()) {
        if let Some(g) = p.tensor.grad(grads) {
            *a = Some(match a.take() {
                Some(prev) => prev + g,
                None => g,
            });
        }
    }
}

/// The causal-LM loss of `batch` (its target sum divided by `denominator`, as
/// [`causal_lm_loss_from`]) and the adapter's gradients, with activations recomputed block by
/// block. The adapter must be trainable; `seed` seeds its dropout (one seed per micro-batch).
/// With `scale` ≠ 1 the gradients are those of `scale * loss` (loss scaling).
pub fn loss_and_grads(model: &Llama, adapter: &mut dyn Trainable, batch: &Batch, denominator: usize, n_tasks: usize, seed: u64, scale: f32) -> Result<Gradients> {
    let layers = model.blocks.len();
    let dev = model.device.clone();
    let inputs = batch_inputs(batch, &dev);
    // The first pass, without autodiff (the adapter's tensors detached, dropout on): each
    // block's input is kept, and the last block's output.
    set_trainable(adapter, false);
    adapter.set_training(true);
    let mut saved: Vec<Tensor<2>> = Vec::with_capacity(layers + 1);
    let first = {
        let mut keep = |l: usize, x: &Tensor<2>| {
            saved.push(x.clone());
            dev.seed(block_seed(seed, l));
        };
        model.pass(&inputs, &*adapter, None, Segment { from: None, to: layers, final_norm: false, before_block: Some(&mut keep) })
    };
    set_trainable(adapter, true);
    let (last, _) = first?;
    // The top: final norm, head and loss, from the last block's output.
    let mut acc = Vec::new();
    let x = last.autodiff().require_grad();
    let (loss, by_task) = causal_lm_loss_from(model, &*adapter, batch, denominator, n_tasks, Some(x.clone()))?;
    let grads = crate::train::scaler::scaled_backward(loss.clone(), scale);
    collect(adapter, &grads, &mut acc);
    let Some(mut g) = x.grad(&grads) else { bail!(Shape, "gradient checkpointing: the loss does not depend on the last block") };
    // Each block from the top: recompute it from its input, backpropagate what reached its output.
    for l in (0..layers).rev() {
        let x = saved.pop().expect("one input per block").autodiff().require_grad();
        dev.seed(block_seed(seed, l));
        let (y, _) = model.pass(&inputs, &*adapter, None, Segment { from: Some((l, x.clone())), to: l + 1, final_norm: false, before_block: None })?;
        let grads = (y * g).sum().backward();
        collect(adapter, &grads, &mut acc);
        let Some(gx) = x.grad(&grads) else { bail!(Shape, "gradient checkpointing: block {l}'s output does not depend on its input") };
        g = gx;
    }
    // The embeddings, when the adapter trains something there (prompt tuning, embeddings).
    let (x0, _) = model.pass(&inputs, &*adapter, None, Segment { from: None, to: 0, final_norm: false, before_block: None })?;
    if x0.is_tracked() {
        let grads = (x0 * g).sum().backward();
        collect(adapter, &grads, &mut acc);
    }
    Ok(Gradients { grads: acc, loss: loss.without_autodiff(), by_task })
}
