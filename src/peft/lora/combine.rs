//! Combining LoRA adapters into a new one with peft's `add_weighted_adapter` semantics
//! (`peft/tuners/lora/model.py` and `peft/utils/merge_utils.py`):
//!
//! - `cat`: stack the factors, `A = [w_i s_i A_i]`, `B = [B_i]` (rank = the sum of ranks; exact);
//! - `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: combine the A factors and
//!   the B factors separately with weights `±sqrt(|w_i s_i|)` (sign on A) — cheap but only an
//!   approximation of the weighted sum, as peft warns; all ranks must be equal;
//! - `svd` and the `*_svd` variants: combine the full deltas `s_i B_i A_i`, then keep the
//!   top `svd_rank` singular directions: `B = U S`, `A = Vh` (optionally clamped at a quantile).
//!
//! The new adapter takes the first adapter's config with `r = lora_alpha = new rank` (so its
//! scaling is 1, or `sqrt(r)` under rsLoRA, exactly as peft) and the union of the target modules.
//! It works on PEFT files (host tensors), so it needs no model and no device.

use std::collections::BTreeMap;

use nalgebra::DMatrix;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::error::{Result, bail, err};
use crate::io::safetensors::HostTensor;
use crate::peft::lora::LoraConfig;
use crate::peft::targets::Targets;

/// peft's `combination_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combination {
    Linear,
    Cat,
    Svd,
    Ties,
    TiesSvd,
    DareLinear,
    DareLinearSvd,
    DareTies,
    DareTiesSvd,
    MagnitudePrune,
    MagnitudePruneSvd,
}

impl Combination {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "linear" => Self::Linear,
            "cat" => Self::Cat,
            "svd" => Self::Svd,
            "ties" => Self::Ties,
            "ties_svd" => Self::TiesSvd,
            "dare_linear" => Self::DareLinear,
            "dare_linear_svd" => Self::DareLinearSvd,
            "dare_ties" => Self::DareTies,
            "dare_ties_svd" => Self::DareTiesSvd,
            "magnitude_prune" => Self::MagnitudePrune,
            "magnitude_prune_svd" => Self::MagnitudePruneSvd,
            other => {
                bail!(Config, "combination_type {other:?} (linear, cat, svd, ties, ties_svd, dare_linear, dare_linear_svd, dare_ties, dare_ties_svd, magnitude_prune, magnitude_prune_svd)")
            }
        })
    }

    fn is_svd(self) -> bool {
        matches!(self, Self::Svd | Self::TiesSvd | Self::DareLinearSvd | Self::DareTiesSvd | Self::MagnitudePruneSvd)
    }

    /// How the task tensors are merged (the part before `_svd`).
    fn merge(self) -> Merge {
        match self {
            Self::Linear | Self::Svd | Self::Cat => Merge::TaskArithmetic,
            Self::Ties | Self::TiesSvd => Merge::Ties,
            Self::DareLinear | Self::DareLinearSvd => Merge::DareLinear,
            Self::DareTies | Self::DareTiesSvd => Merge::DareTies,
            Self::MagnitudePrune | Self::MagnitudePruneSvd => Merge::MagnitudePrune,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Merge {
    TaskArithmetic,
    Ties,
    DareLinear,
    DareTies,
    MagnitudePrune,
}

/// peft's `majority_sign_method` for TIES.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SignMethod {
    #[default]
    Total,
    Frequency,
}

/// The arguments of `add_weighted_adapter` besides the adapters and weights.
#[derive(Debug, Clone)]
pub struct CombineOptions {
    pub combination: Combination,
    pub svd_rank: Option<usize>,
    /// Quantile in [0, 1] at which the SVD factors are clamped.
    pub svd_clamp: Option<f64>,
    /// Fraction of values kept by the pruning methods (ties, dare, magnitude_prune).
    pub density: Option<f64>,
    pub majority_sign: SignMethod,
    /// Seed of DARE's random pruning (peft uses torch's global generator).
    pub seed: u64,
}

impl Default for CombineOptions {
    fn default() -> Self {
        CombineOptions { combination: Combination::Svd, svd_rank: None, svd_clamp: None, density: None, majority_sign: SignMethod::Total, seed: 0 }
    }
}

/// One input adapter: its config, its tensors (peft keys and layout) and its weight.
pub struct Weighted<'a> {
    pub config: &'a LoraConfig,
    pub tensors: &'a BTreeMap<String, HostTensor>,
    pub weight: f64,
}

const A_SUFFIX: &str = ".lora_A.weight";
const B_SUFFIX: &str = ".lora_B.weight";

/// The module (`model.layers.0.self_attn.q_proj`) of a peft LoRA key.
fn module_of(key: &str) -> Option<&str> {
    key.strip_prefix("base_model.model.")?.strip_suffix(A_SUFFIX)
}

/// The largest rank an adapter may use (peft: `max(r, *rank_pattern.values())`).
fn max_rank(c: &LoraConfig) -> usize {
    c.rank_pattern.values().copied().chain([c.r]).max().unwrap_or(c.r)
}

/// The union of the adapters' target modules, as peft forms it.
fn union_targets(configs: &[&LoraConfig]) -> Result<Targets> {
    let all_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    let mut list: Vec<String> = Vec::new();
    let mut regexes: Vec<String> = Vec::new();
    for c in configs {
        match &c.target_modules {
            Targets::List(l) => list.extend(l.iter().cloned()),
            Targets::AllLinear => list.extend(all_linear.iter().map(|s| s.to_string())),
            Targets::Regex(r) => regexes.push(format!("({r})")),
        }
    }
    match (list.is_empty(), regexes.is_empty()) {
        (false, true) => {
            list.sort();
            list.dedup();
            Ok(Targets::List(list))
        }
        (true, false) => Ok(Targets::Regex(regexes.join("|"))),
        _ => bail!(Unsupported, "cannot combine adapters whose target_modules mix lists and regular expressions (as peft)"),
    }
}

/// `add_weighted_adapter`: the new adapter's config and tensors (peft keys and layout).
pub fn add_weighted_adapter(inputs: &[Weighted<'_>], o: &CombineOptions) -> Result<(LoraConfig, BTreeMap<String, HostTensor>)> {
    let Some(first) = inputs.first() else { bail!(Config, "no adapters to combine") };
    for (i, x) in inputs.iter().enumerate() {
        let c = x.config;
        if c.use_dora {
            bail!(Unsupported, "combining DoRA adapters is not supported (adapter {i})");
        }
        if !x.weight.is_finite() {
            bail!(Config, "weight {i} is not a finite number");
        }
        if let Some(k) = x.tensors.keys().find(|k| !(k.ends_with(A_SUFFIX) || k.ends_with(B_SUFFIX))) {
            bail!(Unsupported, "adapter {i} has {k}: only plain LoRA pairs (no biases, embeddings or modules_to_save) can be combined");
        }
    }
    // With a single adapter peft always uses linear merging.
    let combination = if inputs.len() == 1 { Combination::Linear } else { o.combination };
    let ranks: Vec<usize> = inputs.iter().map(|x| max_rank(x.config)).collect();
    let new_rank = match combination {
        Combination::Cat => ranks.iter().sum(),
        c if c.is_svd() => o.svd_rank.unwrap_or_else(|| *ranks.iter().max().expect("non-empty")),
        _ => {
            if ranks.iter().any(|&r| r != ranks[0]) {
                bail!(Config, "all adapters must have the same r for combination {combination:?} (got {ranks:?}); use cat or svd");
            }
            ranks[0]
        }
    };
    if new_rank == 0 {
        bail!(Config, "svd_rank must be >= 1");
    }
    let merge = combination.merge();
    if merge != Merge::TaskArithmetic {
        match o.density {
            Some(d) if (0.0..=1.0).contains(&d) => {}
            Some(d) => bail!(Config, "density must be in [0, 1], got {d}"),
            None => bail!(Config, "combination {combination:?} needs a density"),
        }
    }
    if let Some(q) = o.svd_clamp
        && !(0.0..=1.0).contains(&q)
    {
        bail!(Config, "svd_clamp must be a quantile in [0, 1], got {q}");
    }
    let configs: Vec<&LoraConfig> = inputs.iter().map(|x| x.config).collect();
    let mut config = first.config.clone();
    config.r = new_rank;
    config.lora_alpha = new_rank as f64;
    config.target_modules = union_targets(&configs)?;
    config.rank_pattern.clear();
    config.alpha_pattern.clear();

    let mut modules: Vec<&str> = inputs.iter().flat_map(|x| x.tensors.keys().filter_map(|k| module_of(k))).collect();
    modules.sort();
    modules.dedup();
    let mut rng = SmallRng::seed_from_u64(o.seed);
    let mut out = BTreeMap::new();
    for module in modules {
        // (A [r, in], B [out, r], scaling, weight) of each adapter present at this module.
        let mut present = Vec::new();
        for x in inputs {
            let a = x.tensors.get(&format!("base_model.model.{module}{A_SUFFIX}"));
            let b = x.tensors.get(&format!("base_model.model.{module}{B_SUFFIX}"));
            match (a, b) {
                (Some(a), Some(b)) => {
                    let (_, s) = x.config.rank_and_scaling(module);
                    if a.shape.len() != 2 || b.shape.len() != 2 || a.shape[0] != b.shape[1] {
                        bail!(Shape, "{module}: lora_A {:?} and lora_B {:?} do not pair", a.shape, b.shape);
                    }
                    present.push((a, b, s, x.weight));
                }
                (None, None) => {}
                _ => bail!(Format, "{module}: lora_A without lora_B or the reverse"),
            }
        }
        let (n_in, n_out) = (present[0].0.shape[1], present[0].1.shape[0]);
        if present.iter().any(|p| p.0.shape[1] != n_in || p.1.shape[0] != n_out) {
            bail!(Shape, "{module}: the adapters disagree on the layer's shape");
        }
        let (a, b) = match combination {
            Combination::Cat => {
                let mut a = vec![0f32; new_rank * n_in];
                let mut b = vec![0f32; n_out * new_rank];
                let mut row = 0;
                for (pa, pb, s, w) in &present {
                    let r = pa.shape[0];
                    let f = (w * s) as f32;
                    for (dst, src) in a[row * n_in..(row + r) * n_in].iter_mut().zip(&pa.data) {
                        *dst = src * f;
                    }
                    for o in 0..n_out {
                        b[o * new_rank + row..o * new_rank + row + r].copy_from_slice(&pb.data[o * r..(o + 1) * r]);
                    }
                    row += r;
                }
                (HostTensor::new(vec![new_rank, n_in], a), HostTensor::new(vec![n_out, new_rank], b))
            }
            c if c.is_svd() && merge == Merge::TaskArithmetic => {
                // Σ w_i s_i B_i A_i = [w_1 s_1 B_1, ...] [A_1; ...]: stays low-rank.
                let total: usize = present.iter().map(|p| p.0.shape[0]).sum();
                let mut bc = DMatrix::zeros(n_out, total);
                let mut ac = DMatrix::zeros(total, n_in);
                let mut at = 0;
                for (pa, pb, s, w) in &present {
                    let r = pa.shape[0];
                    for k in 0..r {
                        for o in 0..n_out {
                            bc[(o, at + k)] = pb.data[o * r + k] as f64 * w * s;
                        }
                        for i in 0..n_in {
                            ac[(at + k, i)] = pa.data[k * n_in + i] as f64;
                        }
                    }
                    at += r;
                }
                svd_factors_low_rank(module, bc, ac, new_rank, o.svd_clamp).map_err(|e| e.context(module))?
            }
            c if c.is_svd() => {
                let deltas: Vec<Vec<f32>> = present.iter().map(|(pa, pb, s, _)| delta(pa, pb, *s)).collect();
                let weights: Vec<f64> = present.iter().map(|p| p.3).collect();
                let d = merge_tasks(merge, deltas, &weights, o, &mut rng);
                svd_factors(module, &d, n_out, n_in, new_rank, o.svd_clamp).map_err(|e| e.context(module))?
            }
            _ => {
                let (mut wa, mut wb) = (Vec::new(), Vec::new());
                for (.., s, w) in &present {
                    let ws = w * s;
                    let root = ws.abs().sqrt();
                    wa.push(if ws >= 0.0 { root } else { -root });
                    wb.push(root);
                }
                let a = merge_tasks(merge, present.iter().map(|p| p.0.data.clone()).collect(), &wa, o, &mut rng);
                let b = merge_tasks(merge, present.iter().map(|p| p.1.data.clone()).collect(), &wb, o, &mut rng);
                (HostTensor::new(vec![new_rank, n_in], a), HostTensor::new(vec![n_out, new_rank], b))
            }
        };
        out.insert(format!("base_model.model.{module}{A_SUFFIX}"), a);
        out.insert(format!("base_model.model.{module}{B_SUFFIX}"), b);
    }
    Ok((config, out))
}

/// `s * B @ A` as [out, in] row-major (peft's `get_delta_weight`), accumulated in f64.
fn delta(a: &HostTensor, b: &HostTensor, s: f64) -> Vec<f32> {
    let (r, n_in, n_out) = (a.shape[0], a.shape[1], b.shape[0]);
    let mut d = vec![0f32; n_out * n_in];
    for o in 0..n_out {
        for i in 0..n_in {
            let acc: f64 = (0..r).map(|k| b.data[o * r + k] as f64 * a.data[k * n_in + i] as f64).sum();
            d[o * n_in + i] = (acc * s) as f32;
        }
    }
    d
}

/// Keep the `density` fraction of largest magnitudes (`magnitude_based_pruning`).
fn prune_magnitude(t: &mut [f32], density: f64) {
    if density >= 1.0 {
        return;
    }
    let k = (density * t.len() as f64) as usize;
    let mut order: Vec<usize> = (0..t.len()).collect();
    order.sort_by(|&i, &j| t[j].abs().total_cmp(&t[i].abs()).then(i.cmp(&j)));
    let mut keep = vec![false; t.len()];
    for &i in &order[..k] {
        keep[i] = true;
    }
    for (x, k) in t.iter_mut().zip(keep) {
        if !k {
            *x = 0.0;
        }
    }
}

/// Keep each value with probability `density` and divide by it (`random_pruning` with rescale).
fn prune_random(t: &mut [f32], density: f64, rng: &mut SmallRng) {
    if density >= 1.0 {
        return;
    }
    for x in t.iter_mut() {
        *x = if rng.random::<f64>() < density { (*x as f64 / density) as f32 } else { 0.0 };
    }
}

fn sign(x: f32) -> i8 {
    if x > 0.0 {
        1
    } else if x < 0.0 {
        -1
    } else {
        0
    }
}

/// merge_utils: `task_arithmetic`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`.
fn merge_tasks(merge: Merge, mut tasks: Vec<Vec<f32>>, weights: &[f64], o: &CombineOptions, rng: &mut SmallRng) -> Vec<f32> {
    let density = o.density.unwrap_or(1.0);
    match merge {
        Merge::TaskArithmetic => {}
        Merge::Ties | Merge::MagnitudePrune => tasks.iter_mut().for_each(|t| prune_magnitude(t, density)),
        Merge::DareLinear | Merge::DareTies => tasks.iter_mut().for_each(|t| prune_random(t, density, rng)),
    }
    let n = tasks[0].len();
    let disjoint = matches!(merge, Merge::Ties | Merge::DareTies);
    (0..n)
        .map(|j| {
            if !disjoint {
                return tasks.iter().zip(weights).map(|(t, w)| t[j] as f64 * w).sum::<f64>() as f32;
            }
            // The majority sign among the (pruned, unweighted) task values; only values of that
            // sign count, averaged over how many there are.
            let magnitude: f64 = match o.majority_sign {
                SignMethod::Total => tasks.iter().map(|t| t[j] as f64).sum(),
                SignMethod::Frequency => tasks.iter().map(|t| sign(t[j]) as f64).sum(),
            };
            let majority = if magnitude >= 0.0 { 1 } else { -1 };
            let (mut sum, mut count) = (0f64, 0usize);
            for (t, w) in tasks.iter().zip(weights) {
                if sign(t[j]) == majority {
                    sum += t[j] as f64 * w;
                    count += 1;
                }
            }
            (sum / count.max(1) as f64) as f32
        })
        .collect()
}

/// torch.quantile with linear interpolation.
fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let pos = q * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// The top-`rank` SVD factors of `d` [out, in]: (A = Vh [rank, in], B = U S [out, rank]).
fn svd_factors(module: &str, d: &[f32], n_out: usize, n_in: usize, rank: usize, clamp: Option<f64>) -> Result<(HostTensor, HostTensor)> {
    if d.iter().any(|x| !x.is_finite()) {
        bail!(Data, "{module}: the combined weights are not finite");
    }
    let m = DMatrix::from_fn(n_out, n_in, |r, c| d[r * n_in + c] as f64);
    let svd = nalgebra::linalg::SVD::try_new(m, true, true, f64::EPSILON, 0).ok_or_else(|| err!(Data, "{module}: SVD did not converge"))?;
    let (u, vt) = (svd.u.expect("computed"), svd.v_t.expect("computed"));
    factors(&u, svd.singular_values.as_slice(), &vt, n_out, n_in, rank, clamp)
}

/// The same for `d = Bc Ac` given as factors (Bc [out, R], Ac [R, in], R small): SVD of the
/// R x R core between two thin QRs, so a weighted sum of LoRAs costs O((out + in) R^2), not a
/// full SVD of the out x in matrix.
fn svd_factors_low_rank(module: &str, bc: DMatrix<f64>, ac: DMatrix<f64>, rank: usize, clamp: Option<f64>) -> Result<(HostTensor, HostTensor)> {
    let (n_out, n_in) = (bc.nrows(), ac.ncols());
    if bc.iter().chain(ac.iter()).any(|x| !x.is_finite()) {
        bail!(Data, "{module}: the adapters' weights are not finite");
    }
    let (q1, r1) = bc.qr().unpack();
    let (q2, r2) = ac.transpose().qr().unpack();
    let core = r1 * r2.transpose();
    let svd = nalgebra::linalg::SVD::try_new(core, true, true, f64::EPSILON, 0).ok_or_else(|| err!(Data, "{module}: SVD did not converge"))?;
    let u = q1 * svd.u.expect("computed");
    let vt = svd.v_t.expect("computed") * q2.transpose();
    factors(&u, svd.singular_values.as_slice(), &vt, n_out, n_in, rank, clamp)
}

/// (A = Vh[:rank], B = U[:, :rank] S[:rank]) from an SVD with singular values in descending
/// order, clamped at a quantile as peft's `svd_clamp`. Directions beyond the SVD's own size
/// (the matrix has a lower rank than asked) are zero.
fn factors(u: &DMatrix<f64>, s: &[f64], vt: &DMatrix<f64>, n_out: usize, n_in: usize, rank: usize, clamp: Option<f64>) -> Result<(HostTensor, HostTensor)> {
    if rank > n_out.min(n_in) {
        bail!(Config, "svd_rank {rank} exceeds the layer's smaller side {}", n_out.min(n_in));
    }
    let k = rank.min(s.len());
    // Each singular pair's sign is arbitrary; fix it so the largest entry of u is positive
    // (the product U S Vh does not depend on it).
    let flips: Vec<f64> = (0..k)
        .map(|j| {
            let big = u.column(j).iter().copied().max_by(|a, b| a.abs().total_cmp(&b.abs())).unwrap_or(1.0);
            if big < 0.0 { -1.0 } else { 1.0 }
        })
        .collect();
    let mut b = vec![0f64; n_out * rank];
    let mut a = vec![0f64; rank * n_in];
    for j in 0..k {
        for o in 0..n_out {
            b[o * rank + j] = u[(o, j)] * s[j] * flips[j];
        }
        for i in 0..n_in {
            a[j * n_in + i] = vt[(j, i)] * flips[j];
        }
    }
    if let Some(q) = clamp {
        let hi = quantile(b.iter().chain(a.iter()).copied().collect(), q);
        for x in a.iter_mut().chain(b.iter_mut()) {
            *x = x.clamp(-hi, hi);
        }
    }
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
    Ok((HostTensor::new(vec![rank, n_in], f(a)), HostTensor::new(vec![n_out, rank], f(b))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_elects_the_sign_and_averages_the_agreeing_values() {
        let o = CombineOptions { density: Some(1.0), ..Default::default() };
        let mut rng = SmallRng::seed_from_u64(0);
        // Column 0: signs +,+,- with total +: mean of the two positive weighted values.
        let r = merge_tasks(Merge::Ties, vec![vec![1.0, 0.0], vec![3.0, -2.0], vec![-1.0, 1.0]], &[1.0, 0.5, 2.0], &o, &mut rng);
        assert_eq!(r, vec![(1.0 + 1.5) / 2.0, -1.0]);
    }

    #[test]
    fn magnitude_pruning_keeps_the_largest() {
        let mut t = vec![0.1, -3.0, 2.0, -0.5];
        prune_magnitude(&mut t, 0.5);
        assert_eq!(t, vec![0.0, -3.0, 2.0, 0.0]);
    }

    #[test]
    fn quantile_interpolates_like_torch() {
        assert_eq!(quantile(vec![4.0, 1.0, 2.0, 3.0], 0.5), 2.5);
        assert_eq!(quantile(vec![1.0, 2.0, 3.0], 1.0), 3.0);
    }

    #[test]
    fn svd_of_a_low_rank_matrix_is_exact() {
        // d = u v^T + 2 w z^T, rank 2 in a 3 x 4 matrix.
        let (u, v, w, z) = ([1.0, 2.0, -1.0], [0.5, -1.0, 0.0, 2.0], [0.0, 1.0, 1.0], [1.0, 1.0, -1.0, 0.5]);
        let d: Vec<f32> = (0..12).map(|i| (u[i / 4] * v[i % 4] + 2.0 * w[i / 4] * z[i % 4]) as f32).collect();
        let (a, b) = svd_factors("m", &d, 3, 4, 2, None).unwrap();
        let back = delta(&a, &b, 1.0);
        for (x, y) in back.iter().zip(&d) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
        // The low-rank path gives the same product (and zero directions past the true rank).
        let bc = DMatrix::from_fn(3, 2, |r, c| if c == 0 { u[r] } else { 2.0 * w[r] });
        let ac = DMatrix::from_fn(2, 4, |r, c| if r == 0 { v[c] } else { z[c] });
        let (a, b) = svd_factors_low_rank("m", bc, ac, 3, None).unwrap();
        for (x, y) in delta(&a, &b, 1.0).iter().zip(&d) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }
}
