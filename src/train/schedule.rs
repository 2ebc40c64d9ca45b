//! Learning-rate schedules with transformers' semantics (`get_*_schedule_with_warmup`):
//! the multiplier for optimizer step `s` (0-based) is `lambda(s)`.

use std::f64::consts::PI;

use crate::error::{Result, bail};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

impl Schedule {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "constant" => Schedule::Constant,
            "linear" => Schedule::Linear,
            "cosine" => Schedule::Cosine,
            other => bail!(Config, "unknown schedule {other:?} (constant, linear, cosine)"),
        })
    }

    /// LR multiplier at step `step` of `total`, with `warmup` linear warm-up steps.
    pub fn factor(self, step: usize, warmup: usize, total: usize) -> f64 {
        let (s, w, t) = (step as f64, warmup as f64, total as f64);
        if step < warmup {
            return s / w.max(1.0);
        }
        match self {
            Schedule::Constant => 1.0,
            Schedule::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            Schedule::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_transformers() {
        // get_cosine_schedule_with_warmup(warmup=2, total=5): 0, .5, 1, .75, .25
        let f: Vec<f64> = (0..5).map(|s| Schedule::Cosine.factor(s, 2, 5)).collect();
        let want = [0.0, 0.5, 1.0, 0.75, 0.25];
        for (a, b) in f.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{f:?}");
        }
        assert_eq!(Schedule::Linear.factor(3, 1, 5), 0.5);
        assert_eq!(Schedule::Constant.factor(0, 0, 5), 1.0);
    }
}
