//! P-tuning (Liu et al. 2021; peft P_TUNING): virtual tokens produced by a prompt encoder
//! (an MLP over a trainable embedding table) while training. As in peft, what is saved is
//! the encoder's output (`prompt_embeddings` [n, hidden]); a loaded adapter uses it directly.

use std::collections::BTreeMap;

use burn::tensor::Tensor;
use serde_json::{Value as Json, json};

use crate::error::{Result, bail, err};
use crate::io::safetensors::{HostTensor, OutTensor};
use crate::models::hooks::Adapter;
use crate::models::llama::Llama;
use crate::peft::prompt_tuning::model::{KEY, read_prompt_embeddings};
use crate::peft::reparam::{Activation, Mlp, normal_init};
use crate::peft::{Layout, NamedParam};
use crate::tensor::{check_size, read, upload};

#[derive(Debug, Clone, PartialEq)]
pub struct PTuningConfig {
    pub num_virtual_tokens: usize,
    pub encoder_hidden_size: usize,
    pub task_type: Option<String>,
    pub base_model_name_or_path: Option<String>,
}

impl PTuningConfig {
    pub fn from_value(v: &Json) -> Result<Self> {
        let o = crate::peft::config_object(v, "P_TUNING")?;
        let n = o.get("num_virtual_tokens").and_then(Json::as_u64).filter(|&n| (1..=4096).contains(&n)).ok_or_else(|| err!(Config, "num_virtual_tokens must be an integer in 1..=4096"))?;
        match o.get("encoder_reparameterization_type").and_then(Json::as_str).unwrap_or("MLP") {
            "MLP" => {}
            other => bail!(Unsupported, "encoder_reparameterization_type {other:?} (supported: MLP)"),
        }
        if let Some(k) = o.get("num_transformer_submodules").and_then(Json::as_u64)
            && k != 1
        {
            bail!(Unsupported, "num_transformer_submodules = {k} (decoder-only models use 1)");
        }
        if o.get("encoder_dropout").and_then(Json::as_f64).is_some_and(|d| d != 0.0) {
            bail!(Unsupported, "encoder_dropout > 0 is not supported yet");
        }
        let s = |k: &str| crate::peft::string_field(o, k);
        Ok(PTuningConfig {
            num_virtual_tokens: n as usize,
            encoder_hidden_size: o.get("encoder_hidden_size").and_then(Json::as_u64).map_or(0, |x| x as usize),
            task_type: s("task_type"),
            base_model_name_or_path: s("base_model_name_or_path"),
        })
    }

    fn to_json(&self, c: &crate::models::config::LlamaConfig) -> String {
        serde_json::to_string_pretty(&json!({
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "encoder_dropout": 0.0,
            "encoder_hidden_size": self.encoder_hidden_size,
            "encoder_num_layers": 2,
            "encoder_reparameterization_type": "MLP",
            "inference_mode": true,
            "num_attention_heads": c.num_attention_heads,
            "num_layers": c.num_hidden_layers,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": self.num_virtual_tokens,
            "peft_type": "P_TUNING",
            "revision": null,
            "task_type": self.task_type.clone().unwrap_or_else(|| "CAUSAL_LM".into()),
            "token_dim": c.hidden_size,
        }))
        .expect("serialisable")
    }
}

pub struct PTuningAdapter {
    pub config: PTuningConfig,
    /// Training: the embedding table the encoder reads; loaded: the final virtual tokens.
    pub embedding: Tensor<2>,
    /// The prompt encoder (None for an adapter loaded from its saved output).
    pub encoder: Option<Mlp>,
    model_config: crate::models::config::LlamaConfig,
}

impl PTuningAdapter {
    pub fn new(config: PTuningConfig, model: &Llama, seed: u64) -> Result<Self> {
        let h = model.config.hidden_size;
        if config.encoder_hidden_size == 0 {
            bail!(Config, "encoder_hidden_size is required for p-tuning");
        }
        let n = config.num_virtual_tokens;
        check_size("num_virtual_tokens", &[n, h])?;
        let embedding = upload(&HostTensor::new(vec![n, h], normal_init(n * h, seed)), &model.device)?;
        let e = config.encoder_hidden_size;
        let encoder = Mlp::new(&[h, e, e, h], Activation::Relu, "prompt_encoder.default.mlp_head", seed.wrapping_add(1), &model.device)?;
        Ok(PTuningAdapter { config, embedding, encoder: Some(encoder), model_config: model.config.clone() })
    }

    pub fn from_peft(config: PTuningConfig, weights: &[u8], model: &Llama) -> Result<Self> {
        let e = read_prompt_embeddings(weights, [config.num_virtual_tokens, model.config.hidden_size])?;
        Ok(PTuningAdapter { config, embedding: upload(&e, &model.device)?, encoder: None, model_config: model.config.clone() })
    }

    pub async fn to_peft(&self) -> Result<(String, Vec<u8>)> {
        let prompts = self.prefix().expect("always has virtual tokens").without_autodiff();
        let mut out = BTreeMap::new();
        out.insert(KEY.to_string(), OutTensor::F32(read(prompts).await?));
        crate::peft::peft_files(self.config.to_json(&self.model_config), &out)
    }

    pub fn params_mut(&mut self) -> Vec<NamedParam<'_>> {
        let mut v = vec![NamedParam::new(if self.encoder.is_some() { "prompt_encoder.default.embedding.weight" } else { KEY }, &mut self.embedding, Layout::Same)];
        if let Some(e) = self.encoder.as_mut() {
            v.extend(e.params_mut());
        }
        v
    }
}

impl Adapter for PTuningAdapter {
    fn prefix(&self) -> Option<Tensor<2>> {
        Some(match &self.encoder {
            Some(e) => e.forward(self.embedding.clone()),
            None => self.embedding.clone(),
        })
    }
}
