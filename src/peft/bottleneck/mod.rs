//! Bottleneck adapters (peft has none; format defined here, checked against a PyTorch
//! reference in scripts/fixtures): per decoder layer and placement (`attn`, `mlp`), a small
//! MLP `up(act(down(.)))` with `down: hidden -> hidden / reduction_factor`.
//!
//! - serial (Houlsby et al. 2019): on the branch output, `out + up(act(down(out)))`;
//! - parallel (He et al. 2022): beside the branch, `out + scaling * up(act(down(normed input)))`.
//!
//! New adapters start as the identity (`up` = 0). Saved as `adapter_config.json`
//! `{"peft_type": "BOTTLENECK", "adapter_type", "reduction_factor", "non_linearity",
//! "placement", "scaling"}` and tensors
//! `base_model.model.model.layers.{l}.{attn|mlp}_adapter.{down|up}.{weight|bias}` (torch layout).

use std::collections::BTreeMap;

use burn::tensor::Tensor;
use burn::tensor::activation::{gelu, relu, silu, tanh};
use serde_json::{Value as Json, json};

use crate::error::{Result, bail, err};
use crate::matmul::matmul;
use crate::models::hooks::{Adapter, Sublayer};
use crate::models::llama::Llama;
use crate::peft::reparam::Dense;
use crate::peft::{Layout, NamedParam, Trainable};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Serial,
    Parallel,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NonLinearity {
    Relu,
    Gelu,
    Silu,
    Tanh,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BottleneckConfig {
    pub kind: Kind,
    pub reduction_factor: usize,
    pub non_linearity: NonLinearity,
    pub placement: Vec<Sublayer>,
    pub scaling: f64,
    pub task_type: Option<String>,
    pub base_model_name_or_path: Option<String>,
}

fn place_name(p: Sublayer) -> &'static str {
    match p {
        Sublayer::Attention => "attn",
        Sublayer::Mlp => "mlp",
    }
}

impl BottleneckConfig {
    pub fn from_value(v: &Json) -> Result<Self> {
        let o = crate::peft::config_object(v, "BOTTLENECK")?;
        let kind = match o.get("adapter_type").and_then(Json::as_str).unwrap_or("serial") {
            "serial" => Kind::Serial,
            "parallel" => Kind::Parallel,
            other => bail!(Config, "adapter_type {other:?} (serial, parallel)"),
        };
        let non_linearity = match o.get("non_linearity").and_then(Json::as_str).unwrap_or("relu") {
            "relu" => NonLinearity::Relu,
            "gelu" => NonLinearity::Gelu,
            "silu" | "swish" => NonLinearity::Silu,
            "tanh" => NonLinearity::Tanh,
            other => bail!(Config, "non_linearity {other:?} (relu, gelu, silu, tanh)"),
        };
        let default_place = match kind {
            Kind::Serial => json!(["attn", "mlp"]),
            Kind::Parallel => json!(["mlp"]),
        };
        let placement = o
            .get("placement")
            .unwrap_or(&default_place)
            .as_array()
            .ok_or_else(|| err!(Config, "placement must be a list of \"attn\" / \"mlp\""))?
            .iter()
            .map(|p| match p.as_str() {
                Some("attn") => Ok(Sublayer::Attention),
                Some("mlp") => Ok(Sublayer::Mlp),
                _ => Err(err!(Config, "placement entries are \"attn\" or \"mlp\", got {p}")),
            })
            .collect::<Result<Vec<_>>>()?;
        if placement.is_empty() {
            bail!(Config, "placement is empty");
        }
        let rf = o.get("reduction_factor").and_then(Json::as_u64).unwrap_or(16);
        if rf == 0 {
            bail!(Config, "reduction_factor must be >= 1");
        }
        let s = |k: &str| crate::peft::string_field(o, k);
        Ok(BottleneckConfig {
            kind,
            reduction_factor: rf as usize,
            non_linearity,
            placement,
            scaling: o.get("scaling").and_then(Json::as_f64).unwrap_or(1.0),
            task_type: s("task_type"),
            base_model_name_or_path: s("base_model_name_or_path"),
        })
    }

    fn to_json(&self) -> String {
        serde_json::to_string_pretty(&json!({
            "adapter_type": match self.kind { Kind::Serial => "serial", Kind::Parallel => "parallel" },
            "base_model_name_or_path": self.base_model_name_or_path,
            "non_linearity": match self.non_linearity {
                NonLinearity::Relu => "relu", NonLinearity::Gelu => "gelu", NonLinearity::Silu => "silu", NonLinearity::Tanh => "tanh",
            },
            "peft_type": "BOTTLENECK",
            "placement": self.placement.iter().map(|p| place_name(*p)).collect::<Vec<_>>(),
            "reduction_factor": self.reduction_factor,
            "scaling": self.scaling,
            "task_type": self.task_type.clone().unwrap_or_else(|| "CAUSAL_LM".into()),
        }))
        .expect("serialisable")
    }
}

pub struct BottleneckLayer {
    pub down: Dense,
    pub up: Dense,
}

pub struct BottleneckAdapter {
    pub config: BottleneckConfig,
    pub layers: BTreeMap<(usize, Sublayer), BottleneckLayer>,
}

fn prefix(l: usize, p: Sublayer) -> String {
    format!("base_model.model.model.layers.{l}.{}_adapter", place_name(p))
}

impl BottleneckAdapter {
    fn size(config: &BottleneckConfig, model: &Llama) -> Result<usize> {
        let h = model.config.hidden_size;
        let r = h / config.reduction_factor;
        if r == 0 {
            bail!(Config, "reduction_factor {} leaves no bottleneck for hidden size {h}", config.reduction_factor);
        }
        Ok(r)
    }

    /// New adapters: `down` as nn.Linear's default init, `up` zero (identity at start).
    pub fn new(config: BottleneckConfig, model: &Llama, seed: u64) -> Result<Self> {
        let (h, r) = (model.config.hidden_size, Self::size(&config, model)?);
        let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(seed);
        let mut layers = BTreeMap::new();
        for l in 0..model.config.num_hidden_layers {
            for &p in &config.placement {
                let down = Dense::torch_default(h, r, &mut rng, &model.device)?;
                let up = Dense { w: Tensor::zeros([r, h], &model.device), b: Tensor::zeros([1, h], &model.device) };
                layers.insert((l, p), BottleneckLayer { down, up });
            }
        }
        Ok(BottleneckAdapter { config, layers })
    }

    pub fn from_peft(config: BottleneckConfig, weights: &[u8], model: &Llama) -> Result<Self> {
        let (h, r) = (model.config.hidden_size, Self::size(&config, model)?);
        let tensors = crate::peft::read_weights(weights)?;
        let mut a = Self::new(config, model, 0)?;
        crate::peft::load_all_params(&mut a, &tensors).map_err(|e| e.context(format!("bottleneck r = {r}, hidden = {h}")))?;
        Ok(a)
    }

    pub async fn to_peft(&mut self) -> Result<(String, Vec<u8>)> {
        let config = self.config.to_json();
        crate::peft::save_all_params(self, config).await
    }

    fn act(&self, x: Tensor<2>) -> Tensor<2> {
        match self.config.non_linearity {
            NonLinearity::Relu => relu(x),
            NonLinearity::Gelu => gelu(x),
            NonLinearity::Silu => silu(x),
            NonLinearity::Tanh => tanh(x),
        }
    }
}

impl Trainable for BottleneckAdapter {
    fn params_mut(&mut self) -> Vec<NamedParam<'_>> {
        self.layers
            .iter_mut()
            .flat_map(|((l, p), a)| {
                let pre = prefix(*l, *p);
                [
                    NamedParam::new(format!("{pre}.down.weight"), &mut a.down.w, Layout::Transposed),
                    NamedParam::new(format!("{pre}.down.bias"), &mut a.down.b, Layout::Row),
                    NamedParam::new(format!("{pre}.up.weight"), &mut a.up.w, Layout::Transposed),
                    NamedParam::new(format!("{pre}.up.bias"), &mut a.up.b, Layout::Row),
                ]
            })
            .collect()
    }
}

impl Adapter for BottleneckAdapter {
    fn sublayer_output(&self, layer: usize, which: Sublayer, normed: &Tensor<2>, out: Tensor<2>) -> Tensor<2> {
        let Some(a) = self.layers.get(&(layer, which)) else { return out };
        let run = |x: Tensor<2>| {
            let hidden = self.act(matmul(x, a.down.w.clone()) + a.down.b.clone());
            matmul(hidden, a.up.w.clone()) + a.up.b.clone()
        };
        match self.config.kind {
            Kind::Serial => out.clone() + run(out),
            Kind::Parallel => out + run(normed.clone()).mul_scalar(self.config.scaling),
        }
    }
}
