//! Prefix tuning (Li & Liang 2021; peft PREFIX_TUNING): trainable keys and values put before
//! the real ones in every attention layer, like a pre-filled KV cache of `n` positions
//! (no RoPE on them; real tokens then sit at positions n..). Saved as peft does: one tensor
//! `prompt_embeddings` [n, layers * 2 * kv_heads * head_dim]; with `prefix_projection` the
//! projection MLP is trained and its output is what gets saved.

use std::collections::BTreeMap;

use burn::tensor::Tensor;
use serde_json::{Value as Json, json};

use crate::error::{Result, bail, err};
use crate::io::safetensors::{HostTensor, OutTensor};
use crate::models::config::LlamaConfig;
use crate::models::hooks::Adapter;
use crate::models::llama::Llama;
use crate::peft::prompt_tuning::model::{KEY, read_prompt_embeddings};
use crate::peft::reparam::{Activation, Mlp, normal_init};
use crate::peft::{Layout, NamedParam};
use crate::tensor::{check_size, read, upload};

#[derive(Debug, Clone, PartialEq)]
pub struct PrefixTuningConfig {
    pub num_virtual_tokens: usize,
    pub prefix_projection: bool,
    pub encoder_hidden_size: usize,
    pub task_type: Option<String>,
    pub base_model_name_or_path: Option<String>,
}

impl PrefixTuningConfig {
    pub fn from_value(v: &Json) -> Result<Self> {
        let o = crate::peft::config_object(v, "PREFIX_TUNING")?;
        let n = o.get("num_virtual_tokens").and_then(Json::as_u64).filter(|&n| (1..=4096).contains(&n)).ok_or_else(|| err!(Config, "num_virtual_tokens must be an integer in 1..=4096"))?;
        let s = |k: &str| crate::peft::string_field(o, k);
        let c = PrefixTuningConfig {
            num_virtual_tokens: n as usize,
            prefix_projection: o.get("prefix_projection").and_then(Json::as_bool).unwrap_or(false),
            encoder_hidden_size: o.get("encoder_hidden_size").and_then(Json::as_u64).map_or(0, |x| x as usize),
            task_type: s("task_type"),
            base_model_name_or_path: s("base_model_name_or_path"),
        };
        if c.prefix_projection && c.encoder_hidden_size == 0 {
            bail!(Config, "prefix_projection needs encoder_hidden_size");
        }
        Ok(c)
    }

    fn to_json(&self, c: &LlamaConfig) -> String {
        serde_json::to_string_pretty(&json!({
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "encoder_hidden_size": self.encoder_hidden_size,
            "inference_mode": true,
            "num_attention_heads": c.num_key_value_heads,
            "num_layers": c.num_hidden_layers,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": self.num_virtual_tokens,
            "peft_type": "PREFIX_TUNING",
            "prefix_projection": self.prefix_projection,
            "revision": null,
            "task_type": self.task_type.clone().unwrap_or_else(|| "CAUSAL_LM".into()),
            "token_dim": c.num_key_value_heads * c.head_dim,
        }))
        .expect("serialisable")
    }
}

pub struct PrefixTuningAdapter {
    pub config: PrefixTuningConfig,
    /// Without projection (or loaded): [n, L*2*kv_dim]; with projection: [n, kv_dim].
    pub embedding: Tensor<2>,
    pub projection: Option<Mlp>,
    model_config: LlamaConfig,
}

impl PrefixTuningAdapter {
    fn kv_dim(c: &LlamaConfig) -> usize {
        c.num_key_value_heads * c.head_dim
    }

    pub fn new(config: PrefixTuningConfig, model: &Llama, seed: u64) -> Result<Self> {
        let c = &model.config;
        let (n, d) = (config.num_virtual_tokens, Self::kv_dim(c));
        let out = c.num_hidden_layers * 2 * d;
        check_size("num_virtual_tokens", &[n, out])?;
        let (embedding, projection) = if config.prefix_projection {
            let e = config.encoder_hidden_size;
            let mlp = Mlp::new(&[d, e, out], Activation::Tanh, "prompt_encoder.default.transform", seed.wrapping_add(1), &model.device)?;
            (upload(&HostTensor::new(vec![n, d], normal_init(n * d, seed)), &model.device)?, Some(mlp))
        } else {
            (upload(&HostTensor::new(vec![n, out], normal_init(n * out, seed)), &model.device)?, None)
        };
        Ok(PrefixTuningAdapter { config, embedding, projection, model_config: c.clone() })
    }

    pub fn from_peft(config: PrefixTuningConfig, weights: &[u8], model: &Llama) -> Result<Self> {
        let c = &model.config;
        let want = [config.num_virtual_tokens, c.num_hidden_layers * 2 * Self::kv_dim(c)];
        let e = read_prompt_embeddings(weights, want).map_err(|e| e.context("prefix tuning (layers * 2 * kv_heads * head_dim)"))?;
        Ok(PrefixTuningAdapter { config, embedding: upload(&e, &model.device)?, projection: None, model_config: c.clone() })
    }

    /// The saved form: [n, L*2*kv_dim].
    fn past(&self) -> Tensor<2> {
        match &self.projection {
            Some(p) => p.forward(self.embedding.clone()),
            None => self.embedding.clone(),
        }
    }

    pub async fn to_peft(&self) -> Result<(String, Vec<u8>)> {
        let mut out = BTreeMap::new();
        out.insert(KEY.to_string(), OutTensor::F32(read(self.past().without_autodiff()).await?));
        crate::peft::peft_files(self.config.to_json(&self.model_config), &out)
    }

    /// With projection the trained table is the encoder's embedding; without, it is
    /// exactly the saved tensor.
    fn embedding_name(&self) -> &'static str {
        if self.projection.is_some() { "prompt_encoder.default.embedding.weight" } else { KEY }
    }

    pub fn params_mut(&mut self) -> Vec<NamedParam<'_>> {
        let mut v = vec![NamedParam::new(self.embedding_name(), &mut self.embedding, Layout::Same)];
        if let Some(p) = self.projection.as_mut() {
            v.extend(p.params_mut());
        }
        v
    }
}

impl Adapter for PrefixTuningAdapter {
    /// peft: view(n, L*2, kv_heads, head_dim), permute to [L*2, kv_heads, n, head_dim],
    /// then pairs (key, value) per layer.
    fn prefix_kv(&self) -> Option<Vec<(Tensor<4>, Tensor<4>)>> {
        let c = &self.model_config;
        let (n, l, h, d) = (self.config.num_virtual_tokens, c.num_hidden_layers, c.num_key_value_heads, c.head_dim);
        let p: Tensor<4> = self.past().reshape([n, l * 2, h, d]).permute([1, 2, 0, 3]);
        Some(
            (0..l)
                .map(|i| {
                    let k = p.clone().narrow(0, 2 * i, 1);
                    let v = p.clone().narrow(0, 2 * i + 1, 1);
                    (k, v)
                })
                .collect(),
        )
    }
}
