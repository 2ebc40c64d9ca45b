//! AdamW with `torch.optim.AdamW`'s semantics (decoupled weight decay applied first, bias
//! corrections as in torch's single-tensor implementation). State lives on the device; no
//! value is read back to the host.

use burn::tensor::Tensor;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// torch's defaults.
    fn default() -> Self {
        AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
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
        let AdamWConfig { beta1, beta2, eps, weight_decay, .. } = self.config;
        self.step += 1;
        if self.state.len() != params.len() {
            self.state.resize_with(params.len(), || None);
        }
        let t = self.step as i32;
        let bc1 = 1.0 - beta1.powi(t);
        let bc2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        let step_size = lr / bc1;
        for ((p, g), st) in params.iter_mut().zip(grads).zip(self.state.iter_mut()) {
            let param = p.clone().without_autodiff();
            let g = g.without_autodiff();
            let (m, v) = match st.take() {
                Some(Moments { m, v }) => (m, v),
                None => (g.zeros_like(), g.zeros_like()),
            };
            // torch: exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
            let m = m.clone() + (g.clone() - m).mul_scalar(1.0 - beta1);
            let v = v.mul_scalar(beta2) + (g.clone() * g).mul_scalar(1.0 - beta2);
            let param = if weight_decay != 0.0 { param.mul_scalar(1.0 - lr * weight_decay) } else { param };
            let denom = v.clone().sqrt().div_scalar(bc2_sqrt).add_scalar(eps);
            let new = param - (m.clone() / denom).mul_scalar(step_size);
            *st = Some(Moments { m, v });
            **p = new.autodiff().require_grad();
        }
    }
}
