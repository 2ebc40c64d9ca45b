//! AdamW with `torch.optim.AdamW`'s semantics (decoupled weight decay applied first, bias
//! corrections as in torch's single-tensor implementation). State lives on the device; no
//! value is read back to the host. On a CubeCL device each f32 tensor's update is one kernel
//! (`adamw_kernel`, torch's `fused=True`); elsewhere, and with `fused: false`, tensor ops.

use burn::tensor::Tensor;

use super::adamw_kernel::{self, AdamWSpec};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// One kernel per tensor where the device runs CubeCL kernels (same arithmetic as the
    /// tensor ops, in 1 launch instead of 14).
    pub fused: bool,
}

impl Default for AdamWConfig {
    /// torch's defaults.
    fn default() -> Self {
        AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, fused: true }
    }
}

/// Moments of one parameter.
pub struct Moments {
    pub m: Tensor<2>,
    pub v: Tensor<2>,
}

pub struct AdamW {
    pub config: AdamWConfig,
    /// Completed optimizer steps.
    pub step: usize,
    pub state: Vec<Option<Moments>>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW { config, step: 0, state: Vec::new() }
    }

    /// One update of every parameter with its gradient, at learning rate `lr`.
    /// `params[i]` must always be the same parameter across calls.
    pub fn update(&mut self, params: &mut [&mut Tensor<2>], grads: Vec<Tensor<2>>, lr: f64) {
        self.update_clipped(params, grads, lr, None)
    }

    /// [`update`](Self::update) with every gradient first multiplied by `coef` [1] (gradient
    /// clipping's coefficient, on the device).
    pub fn update_clipped(&mut self, params: &mut [&mut Tensor<2>], grads: Vec<Tensor<2>>, lr: f64, coef: Option<Tensor<1>>) {
        let AdamWConfig { beta1, beta2, eps, weight_decay, fused, .. } = self.config;
        self.step += 1;
        if self.state.len() != params.len() {
            self.state.resize_with(params.len(), || None);
        }
        let t = self.step as i32;
        let bc1 = 1.0 - beta1.powi(t);
        let bc2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        let step_size = lr / bc1;
        let decay = if weight_decay != 0.0 { 1.0 - lr * weight_decay } else { 1.0 };
        let spec = AdamWSpec {
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            decay: decay as f32,
            bc2_sqrt: bc2_sqrt as f32,
            eps: eps as f32,
            step_size: step_size as f32,
        };
        let coef = coef.map(|c| c.without_autodiff());
        for ((p, g), st) in params.iter_mut().zip(grads).zip(self.state.iter_mut()) {
            let param = p.clone().without_autodiff();
            let g = g.without_autodiff();
            let (m, v) = match st.take() {
                Some(Moments { m, v }) => (m, v),
                None => (g.zeros_like(), g.zeros_like()),
            };
            let (new, m, v) = if fused && adamw_kernel::applies(&param) && g.dtype() == param.dtype() {
                adamw_kernel::update(param, g, m, v, coef.clone(), spec)
            } else {
                reference(param, g, m, v, coef.clone(), spec)
            };
            *st = Some(Moments { m, v });
            **p = new.autodiff().require_grad();
        }
    }
}

/// The update as tensor ops: torch's `exp_avg.lerp_(grad, 1 - beta1)`,
/// `exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)`, decoupled decay, then the step.
pub fn reference(param: Tensor<2>, g: Tensor<2>, m: Tensor<2>, v: Tensor<2>, coef: Option<Tensor<1>>, s: AdamWSpec) -> (Tensor<2>, Tensor<2>, Tensor<2>) {
    let g = match coef {
        Some(c) => g * c.unsqueeze::<2>(),
        None => g,
    };
    let m = m.clone() + (g.clone() - m).mul_scalar(s.one_minus_beta1);
    let v = v.mul_scalar(s.beta2) + (g.clone() * g).mul_scalar(s.one_minus_beta2);
    let param = if s.decay != 1.0 { param.mul_scalar(s.decay) } else { param };
    let denom = v.clone().sqrt().div_scalar(s.bc2_sqrt).add_scalar(s.eps);
    (param - (m.clone() / denom).mul_scalar(s.step_size), m, v)
}
