//! Dynamic loss scaling, for training over an f16 base: the gradients that flow back through
//! the f16 matmuls would underflow to zero in f16, so the loss is multiplied by a large scale
//! before the backward pass and the adapter's (f32) gradients are divided by it after. The
//! rule is `torch.amp.GradScaler`'s: start at 2^16; a step whose gradients are not finite
//! (overflow) is skipped and halves the scale; 2000 finite steps in a row double it.

use burn::tensor::{Gradients, Tensor};
use serde::{Deserialize, Serialize};

/// The gradients of `scale * loss` (of `loss` itself when `scale` is 1).
pub fn scaled_backward(loss: Tensor<1>, scale: f32) -> Gradients {
    if scale == 1.0 { loss.backward() } else { loss.mul_scalar(scale).backward() }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f32,
    /// Finite steps since the scale last changed.
    pub good_steps: usize,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler { scale: Self::INIT, good_steps: 0 }
    }
}

impl LossScaler {
    pub const INIT: f32 = 65536.0;
    pub const GROWTH_INTERVAL: usize = 2000;
    /// Below this scale an overflow is no longer blamed on the scale: the gradients are not
    /// finite at any scale, and the step counts as a non-finite one.
    pub const MIN: f32 = 1.0;

    /// Record a step whose scaled gradients were finite.
    pub fn finite_step(&mut self) {
        self.good_steps += 1;
        if self.good_steps >= Self::GROWTH_INTERVAL {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
    }

    /// Record an overflow: returns false when the scale is already at its minimum (the step
    /// is then a genuine non-finite one).
    pub fn overflow(&mut self) -> bool {
        if self.scale <= Self::MIN {
            return false;
        }
        self.scale = (self.scale * 0.5).max(Self::MIN);
        self.good_steps = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_halves_and_a_run_of_finite_steps_doubles() {
        let mut s = LossScaler::default();
        assert!(s.overflow());
        assert_eq!(s.scale, 32768.0);
        for _ in 0..LossScaler::GROWTH_INTERVAL - 1 {
            s.finite_step();
        }
        assert_eq!(s.scale, 32768.0);
        s.finite_step();
        assert_eq!((s.scale, s.good_steps), (65536.0, 0));
        let mut low = LossScaler { scale: 1.0, good_steps: 3 };
        assert!(!low.overflow());
        assert_eq!(low.scale, 1.0);
    }
}
