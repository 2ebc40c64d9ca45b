//! Selective tuning: train chosen base parameters themselves (peft has no such method; the
//! format is defined here). BitFit is `".*\.bias"`, norm tuning `".*norm.*"`, full
//! fine-tuning `".*"`. Config `{"peft_type": "SELECTIVE", "parameters": REGEX}` (matched
//! against the whole transformers parameter name, e.g. `model.layers.0.self_attn.q_proj.bias`);
//! tensors saved as `base_model.model.<name>` in PyTorch layout.

use std::collections::BTreeMap;

use burn::tensor::Tensor;
use serde_json::{Value as Json, json};

use crate::error::{Result, bail, err};

use crate::models::hooks::{Adapter, Norm, Site};
use crate::models::llama::Llama;
use crate::peft::{Layout, NamedParam, Trainable, load_all_params};

#[derive(Debug, Clone, PartialEq)]
pub struct SelectiveConfig {
    pub parameters: String,
    pub task_type: Option<String>,
    pub base_model_name_or_path: Option<String>,
}

impl SelectiveConfig {
    pub fn from_value(v: &Json) -> Result<Self> {
        let o = crate::peft::config_object(v, "SELECTIVE")?;
        let parameters = o.get("parameters").and_then(Json::as_str).ok_or_else(|| err!(Config, "parameters (a regex over parameter names) is required"))?.to_string();
        let s = |k: &str| crate::peft::string_field(o, k);
        Ok(SelectiveConfig { parameters, task_type: s("task_type"), base_model_name_or_path: s("base_model_name_or_path") })
    }

    fn to_json(&self) -> String {
        serde_json::to_string_pretty(&json!({
            "base_model_name_or_path": self.base_model_name_or_path,
            "parameters": self.parameters,
            "peft_type": "SELECTIVE",
            "task_type": self.task_type.clone().unwrap_or_else(|| "CAUSAL_LM".into()),
        }))
        .expect("serialisable")
    }
}

/// Which frozen tensor a trainable copy replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Weight(Site),
    Bias(Site),
    Norm(Norm),
    Embedding,
    LmHead,
}

pub struct SelectiveAdapter {
    pub config: SelectiveConfig,
    params: BTreeMap<Target, (String, Tensor<2>)>,
}

impl SelectiveAdapter {
    /// Trainable copies of the matching parameters, starting from the model's values.
    pub fn new(config: SelectiveConfig, model: &Llama) -> Result<Self> {
        let re = regex::Regex::new(&format!("^(?:{})$", config.parameters)).map_err(|e| err!(Config, "parameters: bad regex: {e}"))?;
        let mut all: Vec<(Target, String, Tensor<2>)> = Vec::new();
        for site in model.sites() {
            let lin = model.linear(site);
            let n = site.module_name();
            all.push((Target::Weight(site), format!("{n}.weight"), lin.weight.clone()));
            if let Some(b) = &lin.bias {
                all.push((Target::Bias(site), format!("{n}.bias"), b.clone().unsqueeze()));
            }
        }
        for (norm, w) in model.norms() {
            all.push((Target::Norm(norm), format!("{}.weight", norm.module_name()), w.clone().unsqueeze()));
        }
        all.push((Target::Embedding, "model.embed_tokens.weight".into(), model.embed.clone()));
        if let Some(h) = &model.lm_head {
            all.push((Target::LmHead, "lm_head.weight".into(), h.clone()));
        }
        let params: BTreeMap<_, _> = all.into_iter().filter(|(_, n, _)| re.is_match(n)).map(|(t, n, w)| (t, (format!("base_model.model.{n}"), w))).collect();
        if params.is_empty() {
            bail!(
                Config,
                "parameters {:?} matches no parameter of the model (names look like model.layers.0.self_attn.q_proj.weight; this model has {} biases)",
                config.parameters,
                if model.config.qkv_bias { "q/k/v" } else { "no" }
            );
        }
        Ok(SelectiveAdapter { config, params })
    }

    pub fn from_peft(config: SelectiveConfig, weights: &[u8], model: &Llama) -> Result<Self> {
        let tensors = crate::peft::read_weights(weights)?;
        let mut a = Self::new(config, model)?;
        load_all_params(&mut a, &tensors)?;
        Ok(a)
    }

    pub async fn to_peft(&mut self) -> Result<(String, Vec<u8>)> {
        let config = self.config.to_json();
        crate::peft::save_all_params(self, config).await
    }

    fn get(&self, t: Target) -> Option<Tensor<2>> {
        self.params.get(&t).map(|(_, w)| w.clone())
    }
}

impl Trainable for SelectiveAdapter {
    fn params_mut(&mut self) -> Vec<NamedParam<'_>> {
        self.params
            .iter_mut()
            .map(|(t, (n, w))| {
                let layout = match t {
                    Target::Weight(_) | Target::LmHead => Layout::Transposed,
                    Target::Bias(_) | Target::Norm(_) => Layout::Row,
                    Target::Embedding => Layout::Same,
                };
                NamedParam::new(n.clone(), w, layout)
            })
            .collect()
    }
}

impl Adapter for SelectiveAdapter {
    fn linear_weight(&self, site: Site) -> Option<Tensor<2>> {
        self.get(Target::Weight(site))
    }
    fn linear_bias(&self, site: Site) -> Option<Tensor<2>> {
        self.get(Target::Bias(site))
    }
    fn norm_weight(&self, norm: Norm) -> Option<Tensor<2>> {
        self.get(Target::Norm(norm))
    }
    fn embedding(&self) -> Option<Tensor<2>> {
        self.get(Target::Embedding)
    }
    fn lm_head(&self) -> Option<Tensor<2>> {
        self.get(Target::LmHead)
    }
}
