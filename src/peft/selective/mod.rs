//! Selective tuning: train chosen base parameters themselves (peft has no such method; the
//! format is defined here). BitFit is `".*\.bias"`, norm tuning `".*norm.*"`, full
//! fine-tuning `".*"`. Config `{"peft_type": "SELECTIVE", "parameters": REGEX}` (matched
//! against the whole transformers parameter name, e.g. `model.layers.0.self_attn.q_proj.bias`,
//! `bert.encoder.layer.0.attention.output.LayerNorm.bias`); tensors saved as
//! `base_model.model.<name>` in PyTorch layout, so `model.load_state_dict` takes them once
//! the prefix is cut. On an encoder (BERT, ViT) the candidates are the linear layers' weights
//! and biases, the LayerNorms' weights and biases and ViT's patch-embedding bias; on a decoder
//! also the embeddings and the LM head.

use std::collections::BTreeMap;

use burn::tensor::Tensor;
use serde_json::{Value as Json, json};

use crate::error::{Result, bail, err};

use crate::models::Base;
use crate::models::hooks::{Adapter, Norm, Site, Tunable};
use crate::peft::{Layout, NamedParam, Trainable, load_all_params};

/// BitFit's `parameters`: every bias.
pub const BITFIT: &str = r".*\.bias";

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

    pub fn to_json(&self) -> String {
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
    Other(Tunable),
    Embedding,
    LmHead,
}

pub struct SelectiveAdapter {
    pub config: SelectiveConfig,
    params: BTreeMap<Target, (String, Tensor<2>)>,
}

impl SelectiveAdapter {
    /// Trainable copies of the matching parameters, starting from the model's values.
    pub fn new(config: SelectiveConfig, model: &dyn Base) -> Result<Self> {
        let re = regex::Regex::new(&format!("^(?:{})$", config.parameters)).map_err(|e| err!(Config, "parameters: bad regex: {e}"))?;
        let mut all: Vec<(Target, String, Tensor<2>)> = Vec::new();
        for site in model.sites() {
            let lin = model.linear(site);
            let n = site.module_name();
            all.push((Target::Weight(site), format!("{n}.weight"), lin.dense_weight()));
            if let Some(b) = &lin.bias {
                all.push((Target::Bias(site), format!("{n}.bias"), b.clone().unsqueeze()));
            }
        }
        all.extend(model.tunables().into_iter().map(|(t, n, w)| (Target::Other(t), n, w.unsqueeze())));
        if let Some(llama) = model.as_llama() {
            for (norm, w) in llama.norms() {
                all.push((Target::Norm(norm), format!("{}.weight", norm.module_name()), w.clone().unsqueeze()));
            }
            all.push((Target::Embedding, "model.embed_tokens.weight".into(), llama.embed.dense()));
            if let Some(h) = &llama.lm_head {
                all.push((Target::LmHead, "lm_head.weight".into(), h.dense_weight()));
            }
        }
        let biases = all.iter().filter(|(_, n, _)| n.ends_with(".bias")).count();
        let example = all.first().map_or(String::new(), |(_, n, _)| n.clone());
        let params: BTreeMap<_, _> = all.into_iter().filter(|(_, n, _)| re.is_match(n)).map(|(t, n, w)| (t, (format!("base_model.model.{n}"), w))).collect();
        if params.is_empty() {
            bail!(Config, "parameters {:?} matches no parameter of the model (names look like {example}; this model has {biases} bias tensors)", config.parameters);
        }
        Ok(SelectiveAdapter { config, params })
    }

    pub fn from_peft(config: SelectiveConfig, weights: &[u8], model: &dyn Base) -> Result<Self> {
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
                    Target::Bias(_) | Target::Norm(_) | Target::Other(_) => Layout::Row,
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
    fn tunable(&self, t: Tunable) -> Option<Tensor<2>> {
        self.get(Target::Other(t))
    }
    fn embedding(&self) -> Option<Tensor<2>> {
        self.get(Target::Embedding)
    }
    fn lm_head(&self) -> Option<Tensor<2>> {
        self.get(Target::LmHead)
    }
}
