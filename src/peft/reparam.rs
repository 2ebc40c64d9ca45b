//! The small MLPs peft uses to reparameterise soft prompts during training: p-tuning's
//! prompt encoder (Linear-ReLU-Linear-ReLU-Linear) and prefix tuning's projection
//! (Linear-Tanh-Linear). Weights are initialised as torch's `nn.Linear` (kaiming-uniform
//! weight, uniform bias, both bound 1/sqrt(fan_in)).

use burn::tensor::Tensor;
use burn::tensor::activation::{relu, tanh};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::error::Result;
use crate::io::safetensors::HostTensor;
use crate::peft::{Layout, NamedParam};
use crate::tensor::upload;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Relu,
    Tanh,
}

/// One `nn.Linear`: weight [in, out] (transposed from torch), bias [1, out].
pub struct Dense {
    pub w: Tensor<2>,
    pub b: Tensor<2>,
}

impl Dense {
    /// torch's default `nn.Linear` init.
    pub fn torch_default(fin: usize, fout: usize, rng: &mut SmallRng, device: &burn::tensor::Device) -> Result<Self> {
        crate::tensor::check_size("encoder_hidden_size", &[fin, fout])?;
        let bound = 1.0 / (fin as f32).sqrt();
        let mut u = |n: usize| (0..n).map(|_| rng.random_range(-bound..bound)).collect::<Vec<f32>>();
        let w = upload(&HostTensor::new(vec![fin, fout], u(fin * fout)), device)?;
        let b = upload(&HostTensor::new(vec![1, fout], u(fout)), device)?;
        Ok(Dense { w, b })
    }
}

pub struct Mlp {
    /// (torch index in the nn.Sequential, layer)
    pub layers: Vec<(usize, Dense)>,
    pub activation: Activation,
    /// state_dict prefix, e.g. `prompt_encoder.default.mlp_head`.
    pub prefix: String,
}

impl Mlp {
    /// Layers of sizes `dims[0] -> dims[1] -> ... -> dims[k]`, an activation between them.
    pub fn new(dims: &[usize], activation: Activation, prefix: &str, seed: u64, device: &burn::tensor::Device) -> Result<Self> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut layers = Vec::new();
        for (i, w) in dims.windows(2).enumerate() {
            layers.push((2 * i, Dense::torch_default(w[0], w[1], &mut rng, device)?));
        }
        Ok(Mlp { layers, activation, prefix: prefix.to_string() })
    }

    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let last = self.layers.len() - 1;
        self.layers.iter().enumerate().fold(x, |x, (i, (_, d))| {
            let y = crate::matmul::matmul(x, d.w.clone()) + d.b.clone();
            match (i == last, self.activation) {
                (true, _) => y,
                (false, Activation::Relu) => relu(y),
                (false, Activation::Tanh) => tanh(y),
            }
        })
    }

    pub fn params_mut(&mut self) -> Vec<NamedParam<'_>> {
        let p = &self.prefix;
        self.layers
            .iter_mut()
            .flat_map(|(i, d)| [NamedParam::new(format!("{p}.{i}.weight"), &mut d.w, Layout::Transposed), NamedParam::new(format!("{p}.{i}.bias"), &mut d.b, Layout::Row)])
            .collect()
    }
}

/// N(0, 1) samples (Box-Muller), as `nn.Embedding`'s default init.
pub fn normal_init(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(1e-300);
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect()
}
