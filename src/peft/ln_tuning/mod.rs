//! LN tuning (Zhao et al. 2023; peft LN_TUNING): trainable copies of the normalisation
//! layers' weights, everything else frozen. Saved as peft does:
//! `base_model.model.<norm module>.ln_tuning_layers.weight` [hidden].

use std::collections::BTreeMap;

use burn::tensor::Tensor;
use serde_json::{Value as Json, json};

use crate::error::{Result, bail};
use crate::models::hooks::{Adapter, Norm};
use crate::models::llama::Llama;
use crate::peft::targets::{Matcher, Targets};
use crate::peft::{Layout, NamedParam, load_all_params};

#[derive(Debug, Clone, PartialEq)]
pub struct LnTuningConfig {
    pub target_modules: Targets,
    pub exclude_modules: Option<Targets>,
    pub task_type: Option<String>,
    pub base_model_name_or_path: Option<String>,
}

impl LnTuningConfig {
    pub fn from_value(v: &Json) -> Result<Self> {
        let o = crate::peft::config_object(v, "LN_TUNING")?;
        if o.get("modules_to_save").is_some_and(|x| !x.is_null()) {
            bail!(Unsupported, "modules_to_save is not supported yet");
        }
        let s = |k: &str| crate::peft::string_field(o, k);
        Ok(LnTuningConfig {
            // peft's default for Llama-family models.
            target_modules: Targets::from_json(o.get("target_modules"))?.unwrap_or_else(|| Targets::List(vec!["input_layernorm".into(), "post_attention_layernorm".into(), "norm".into()])),
            exclude_modules: Targets::from_json(o.get("exclude_modules"))?,
            task_type: s("task_type"),
            base_model_name_or_path: s("base_model_name_or_path"),
        })
    }

    fn to_json(&self) -> String {
        serde_json::to_string_pretty(&json!({
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "exclude_modules": self.exclude_modules.as_ref().map(Targets::to_json),
            "inference_mode": true,
            "modules_to_save": null,
            "peft_type": "LN_TUNING",
            "revision": null,
            "target_modules": self.target_modules.to_json(),
            "task_type": self.task_type,
        }))
        .expect("serialisable")
    }
}

pub struct LnTuningAdapter {
    pub config: LnTuningConfig,
    /// [1, hidden] per tuned norm.
    pub weights: BTreeMap<Norm, Tensor<2>>,
}

fn key(n: Norm) -> String {
    format!("base_model.model.{}.ln_tuning_layers.weight", n.module_name())
}

impl LnTuningAdapter {
    fn targets<'m>(config: &LnTuningConfig, model: &'m Llama) -> Result<Vec<(Norm, &'m Tensor<1>)>> {
        let m = Matcher::new(config.target_modules.clone(), config.exclude_modules.clone(), None, None)?;
        let v: Vec<_> = model.norms().into_iter().filter(|(n, _)| m.matches(&n.module_name(), false)).collect();
        if v.is_empty() {
            bail!(Config, "target_modules {:?} matches no normalisation layer (names look like model.layers.0.input_layernorm, model.norm)", config.target_modules);
        }
        Ok(v)
    }

    /// Start from copies of the model's own norm weights.
    pub fn new(config: LnTuningConfig, model: &Llama) -> Result<Self> {
        let weights = Self::targets(&config, model)?.into_iter().map(|(n, w)| (n, w.clone().unsqueeze::<2>())).collect();
        Ok(LnTuningAdapter { config, weights })
    }

    pub fn from_peft(config: LnTuningConfig, bytes: &[u8], model: &Llama) -> Result<Self> {
        let tensors = crate::peft::read_weights(bytes)?;
        let mut a = Self::new(config, model)?;
        load_all_params(&mut a, &tensors)?;
        Ok(a)
    }

    pub async fn to_peft(&mut self) -> Result<(String, Vec<u8>)> {
        let config = self.config.to_json();
        crate::peft::save_all_params(self, config).await
    }

    pub fn params_mut(&mut self) -> Vec<NamedParam<'_>> {
        self.weights.iter_mut().map(|(n, w)| NamedParam::new(key(*n), w, Layout::Row)).collect()
    }
}

impl Adapter for LnTuningAdapter {
    fn norm_weight(&self, norm: Norm) -> Option<Tensor<2>> {
        self.weights.get(&norm).cloned()
    }
}
