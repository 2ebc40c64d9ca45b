//! Merging an adapter into the frozen weights (and undoing it), for the methods whose change
//! is a weight change: LoRA (`W + s A B`, with lora_B's bias into the bias), DoRA
//! (`m / ||W + s A B||_c * (W + s A B)`) and IA3 (`W * l` on the scaled side). Unmerging
//! restores the original tensors exactly (they are kept), rather than subtracting.

use crate::error::{Result, bail};
use crate::models::hooks::Site;
use crate::models::llama::{Linear, Llama};
use crate::peft::AnyAdapter;
use crate::peft::lora::layer::weight_norm;

/// The merged layers' original weights, to restore on unmerge.
pub struct Merged {
    pub originals: Vec<(Site, Linear)>,
}

/// Fold `adapter` into `model`'s weights. Refuses adapters that are not weight changes
/// (soft prompts, prefixes, bottleneck adapters) or that also train other tensors.
pub fn merge(model: &mut Llama, adapter: &AnyAdapter) -> Result<Merged> {
    let mut new: Vec<(Site, Linear)> = Vec::new();
    match adapter {
        AnyAdapter::Lora(a) => {
            if a.embedding.is_some() || a.extra.is_some() {
                bail!(Unsupported, "merging LoRA with embedding targets, trained biases or modules_to_save is not supported yet");
            }
            for (&site, l) in &a.layers {
                let lin = model.linear(site);
                let (la, lb) = (l.a.clone().without_autodiff(), l.b.clone().without_autodiff());
                let base = lin.dense_weight();
                let w = base.clone() + la.clone().matmul(lb.clone()).mul_scalar(l.scaling);
                let w = match &l.dora {
                    Some(d) => w * (d.magnitude.clone().without_autodiff() / weight_norm(&base, &la, &lb, l.scaling)),
                    None => w,
                };
                let bias = match (&l.bias, &lin.bias) {
                    (Some(bb), Some(b)) => Some(b.clone() + bb.clone().without_autodiff().reshape([lin.out_features()]).mul_scalar(l.scaling)),
                    (Some(bb), None) => Some(bb.clone().without_autodiff().reshape([lin.out_features()]).mul_scalar(l.scaling)),
                    (None, b) => b.clone(),
                };
                new.push((site, Linear::dense(w, bias)));
            }
        }
        AnyAdapter::Ia3(a) => {
            for (&site, l) in &a.layers {
                let lin = model.linear(site);
                let v = l.l.clone().without_autodiff();
                let merged = if l.feedforward {
                    // y = W (x * l): scale the rows of our [in, out] weight.
                    Linear::dense(lin.dense_weight() * v.transpose(), lin.bias.clone())
                } else {
                    // y = (W x + b) * l: scale the columns and the bias.
                    let n = lin.out_features();
                    Linear::dense(lin.dense_weight() * v.clone(), lin.bias.clone().map(|b| b * v.reshape([n])))
                };
                new.push((site, merged));
            }
        }
        other => bail!(Unsupported, "{} adapters cannot be merged into the weights (only LoRA, DoRA and IA3)", other.method()),
    }
    let mut originals = Vec::with_capacity(new.len());
    for (site, lin) in new {
        originals.push((site, std::mem::replace(model.linear_mut(site), lin)));
    }
    Ok(Merged { originals })
}

/// Restore the weights a [`merge`] replaced.
pub fn unmerge(model: &mut Llama, merged: Merged) {
    for (site, lin) in merged.originals {
        *model.linear_mut(site) = lin;
    }
}
