//! Differential privacy for training (DP-SGD, Abadi et al. 2016): per-example gradient
//! clipping and Gaussian noise (in [`crate::train::Trainer`]), and the RDP accountant for the
//! sampled Gaussian mechanism (Mironov, Talwar, Zhang 2019) that turns (sampling rate q,
//! noise multiplier σ, steps) into (ε, δ). The accountant follows Opacus's
//! `opacus/accountants/analysis/rdp.py` (its orders, its RDP → (ε, δ) conversion) and is
//! checked against Opacus's numbers in `tests/fixtures/dp/rdp.json`.

use crate::error::{Result, bail};

/// DP-SGD settings of a training run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpConfig {
    /// Per-example gradient norm bound C.
    pub max_grad_norm: f64,
    /// σ: the noise added to the sum of clipped gradients has standard deviation σ C. None:
    /// the smallest σ that keeps ε within `target_epsilon` for the whole run (as Opacus's
    /// `make_private_with_epsilon`).
    pub noise_multiplier: Option<f64>,
    /// The δ of the reported (ε, δ).
    pub delta: f64,
    /// Stop before a step that would take ε past this budget.
    pub target_epsilon: Option<f64>,
    /// Poisson sampling (each example joins each step's batch with probability batch / N,
    /// as the accountant assumes); false = shuffled fixed-size batches (the common practical
    /// choice, for which the reported ε is the usual approximation).
    pub poisson: bool,
}

impl DpConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm > 0.0) {
            bail!(Config, "DP: the per-example clipping norm must be a positive number");
        }
        match self.noise_multiplier {
            Some(s) if !(s.is_finite() && s >= 0.0) => bail!(Config, "DP: the noise multiplier must be >= 0"),
            None if self.target_epsilon.is_none() => bail!(Config, "DP: give a noise multiplier or an epsilon target"),
            _ => {}
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            bail!(Config, "DP: delta must be in (0, 1)");
        }
        if let Some(e) = self.target_epsilon
            && !(e > 0.0)
        {
            bail!(Config, "DP: the epsilon budget must be positive");
        }
        Ok(())
    }
}

/// A standard normal sample (Box-Muller) from a seeded generator.
pub fn gaussian(rng: &mut impl rand::Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Opacus's default RDP orders: 1.1, 1.2, ..., 10.9, then 12, 13, ..., 63.
pub fn default_orders() -> Vec<f64> {
    (1..100).map(|x| 1.0 + x as f64 / 10.0).chain((12..64).map(|x| x as f64)).collect()
}

/// log(exp(x) + exp(y)).
fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = (x.min(y), x.max(y));
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

/// log(exp(x) - exp(y)), x >= y.
fn log_sub(x: f64, y: f64) -> f64 {
    if y == f64::NEG_INFINITY {
        return x;
    }
    if x == y {
        return f64::NEG_INFINITY;
    }
    let d = (x - y).exp_m1();
    if d.is_finite() { d.ln() + y } else { x }
}

/// log(erfc(x)), accurate far into the tail (where erfc underflows).
fn log_erfc(x: f64) -> f64 {
    if x < 25.0 {
        return libm::erfc(x).ln();
    }
    // erfc(x) = exp(-x²) / (x √π) · (1 - 1/(2x²) + 3/(4x⁴) - 15/(8x⁶) + 105/(16x⁸) - ...)
    let x2 = x * x;
    let series = 1.0 - 1.0 / (2.0 * x2) + 3.0 / (4.0 * x2 * x2) - 15.0 / (8.0 * x2 * x2 * x2) + 105.0 / (16.0 * x2 * x2 * x2 * x2);
    -x2 - x.ln() - 0.5 * std::f64::consts::PI.ln() + series.ln()
}

/// The generalised binomial coefficient C(α, i) for real α.
fn binom(alpha: f64, i: usize) -> f64 {
    (0..i).fold(1.0, |c, k| c * (alpha - k as f64) / (k + 1) as f64)
}

/// log A_α for integer α (Mironov et al., section 3.3).
fn log_a_int(q: f64, sigma: f64, alpha: usize) -> f64 {
    (0..=alpha).fold(f64::NEG_INFINITY, |acc, i| {
        let log_coef = binom(alpha as f64, i).ln() + i as f64 * q.ln() + (alpha - i) as f64 * (1.0 - q).ln();
        log_add(acc, log_coef + (i * i - i) as f64 / (2.0 * sigma * sigma))
    })
}

/// log A_α for fractional α (Mironov et al., section 3.3): two converging series.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut a0, mut a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let s2 = 2.0 * sigma * sigma;
    for i in 0.. {
        let coef = binom(alpha, i);
        let log_coef = coef.abs().ln();
        let (fi, j) = (i as f64, alpha - i as f64);
        let log_t0 = log_coef + fi * q.ln() + j * (1.0 - q).ln();
        let log_t1 = log_coef + j * q.ln() + fi * (1.0 - q).ln();
        let log_e0 = 0.5f64.ln() + log_erfc((fi - z0) / (std::f64::consts::SQRT_2 * sigma));
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / (std::f64::consts::SQRT_2 * sigma));
        let log_s0 = log_t0 + (fi * fi - fi) / s2 + log_e0;
        let log_s1 = log_t1 + (j * j - j) / s2 + log_e1;
        if coef > 0.0 {
            a0 = log_add(a0, log_s0);
            a1 = log_add(a1, log_s1);
        } else {
            a0 = log_sub(a0, log_s0);
            a1 = log_sub(a1, log_s1);
        }
        if log_s0.max(log_s1) < -30.0 {
            break;
        }
    }
    log_add(a0, a1)
}

/// RDP of one step of the sampled Gaussian mechanism at order α.
fn rdp_one(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        0.0
    } else if sigma == 0.0 {
        f64::INFINITY
    } else if q == 1.0 {
        alpha / (2.0 * sigma * sigma)
    } else if alpha.is_infinite() {
        f64::INFINITY
    } else {
        let log_a = if alpha.fract() == 0.0 { log_a_int(q, sigma, alpha as usize) } else { log_a_frac(q, sigma, alpha) };
        log_a / (alpha - 1.0)
    }
}

/// RDP after `steps` steps at each order.
pub fn compute_rdp(q: f64, sigma: f64, steps: usize, orders: &[f64]) -> Vec<f64> {
    orders.iter().map(|&a| rdp_one(q, sigma, a) * steps as f64).collect()
}

/// (ε, best order) for `delta` from RDP values (Opacus's conversion, Balle et al. 2020).
pub fn privacy_spent(orders: &[f64], rdp: &[f64], delta: f64) -> (f64, f64) {
    let mut best = (f64::INFINITY, f64::NAN);
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = r - (delta.ln() + a.ln()) / (a - 1.0) + ((a - 1.0) / a).ln();
        if eps.is_finite() && eps < best.0 {
            best = (eps, a);
        }
    }
    best
}

/// ε after `steps` steps at sampling rate `q` and noise multiplier `sigma`, for `delta`.
pub fn epsilon(q: f64, sigma: f64, steps: usize, delta: f64) -> f64 {
    let orders = default_orders();
    privacy_spent(&orders, &compute_rdp(q, sigma, steps, &orders), delta).0
}

/// The noise multiplier σ that keeps ε ≤ `target_epsilon` after `steps` steps at sampling
/// rate `q` (Opacus's `get_noise_multiplier` procedure: double σ until ε is under the target,
/// then bisect until ε is within `tolerance` of it; returns the upper end).
pub fn noise_for_epsilon(target_epsilon: f64, q: f64, steps: usize, delta: f64, tolerance: f64) -> Result<f64> {
    if !(target_epsilon > 0.0) || !(q > 0.0 && q <= 1.0) || steps == 0 {
        bail!(Config, "DP: need a positive epsilon target, a sampling rate in (0, 1] and at least one step");
    }
    let (mut low, mut high, mut eps_high) = (0.0f64, 10.0f64, f64::INFINITY);
    while eps_high > target_epsilon {
        high *= 2.0;
        eps_high = epsilon(q, high, steps, delta);
        if high > 1e6 {
            bail!(Config, "DP: no noise multiplier reaches epsilon {target_epsilon} in {steps} steps at q = {q}");
        }
    }
    while target_epsilon - eps_high > tolerance {
        let sigma = (low + high) / 2.0;
        let eps = epsilon(q, sigma, steps, delta);
        if eps < target_epsilon {
            high = sigma;
            eps_high = eps;
        } else {
            low = sigma;
        }
    }
    Ok(high)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_erfc_is_continuous_at_the_switch() {
        let (a, b) = ((libm::erfc(24.999)).ln(), log_erfc(25.001));
        assert!((a - b).abs() < 0.2, "{a} {b}");
        assert!((log_erfc(25.0) - (-625.0 - 25f64.ln() - 0.5 * std::f64::consts::PI.ln())).abs() < 1e-3);
    }

    #[test]
    fn full_batch_is_the_gaussian_mechanism() {
        // q = 1: RDP = α / (2 σ²) exactly.
        let r = compute_rdp(1.0, 2.0, 3, &[2.0, 10.0]);
        assert_eq!(r, vec![3.0 * 2.0 / 8.0, 3.0 * 10.0 / 8.0]);
        // More noise, less privacy loss; more steps, more.
        assert!(epsilon(0.01, 2.0, 100, 1e-5) < epsilon(0.01, 1.0, 100, 1e-5));
        assert!(epsilon(0.01, 1.0, 1000, 1e-5) > epsilon(0.01, 1.0, 100, 1e-5));
    }
}
