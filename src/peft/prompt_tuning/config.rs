//! `PromptTuningConfig` as peft writes it in `adapter_config.json`.

use serde_json::{Value as Json, json};

use crate::error::{Result, bail, err};

#[derive(Debug, Clone, PartialEq)]
pub enum PromptInit {
    /// N(0, 1), as `nn.Embedding`'s default init.
    Random,
    /// Embeddings of randomly drawn vocabulary tokens.
    SampleVocab,
    /// Embeddings of the tokens of a text, repeated / truncated to `num_virtual_tokens`.
    Text(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct PromptTuningConfig {
    pub num_virtual_tokens: usize,
    pub token_dim: Option<usize>,
    pub init: PromptInit,
    pub task_type: Option<String>,
    pub base_model_name_or_path: Option<String>,
    pub tokenizer_name_or_path: Option<String>,
}

impl PromptTuningConfig {
    pub fn from_value(v: &Json) -> Result<Self> {
        let o = crate::peft::config_object(v, "PROMPT_TUNING")?;
        let n = o.get("num_virtual_tokens").and_then(Json::as_u64).ok_or_else(|| err!(Config, "num_virtual_tokens (a positive integer) is required"))?;
        if n == 0 || n > 4096 {
            bail!(Config, "num_virtual_tokens must be in 1..=4096, got {n}");
        }
        if let Some(k) = o.get("num_transformer_submodules").and_then(Json::as_u64)
            && k != 1
        {
            bail!(Unsupported, "num_transformer_submodules = {k} (decoder-only models use 1)");
        }
        let init = match o.get("prompt_tuning_init").and_then(Json::as_str).unwrap_or("RANDOM") {
            "RANDOM" => PromptInit::Random,
            "SAMPLE_VOCAB" => PromptInit::SampleVocab,
            "TEXT" => PromptInit::Text(
                o.get("prompt_tuning_init_text")
                    .and_then(Json::as_str)
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| err!(Config, "prompt_tuning_init TEXT needs prompt_tuning_init_text"))?
                    .to_string(),
            ),
            other => bail!(Config, "prompt_tuning_init {other:?} (RANDOM, SAMPLE_VOCAB, TEXT)"),
        };
        let s = |k: &str| crate::peft::string_field(o, k);
        Ok(PromptTuningConfig {
            num_virtual_tokens: n as usize,
            token_dim: o.get("token_dim").and_then(Json::as_u64).map(|x| x as usize),
            init,
            task_type: s("task_type"),
            base_model_name_or_path: s("base_model_name_or_path"),
            tokenizer_name_or_path: s("tokenizer_name_or_path"),
        })
    }

    /// peft's file for a model with `hidden` size, `heads` and `layers`.
    pub fn to_json(&self, hidden: usize, heads: usize, layers: usize) -> String {
        let (init, text) = match &self.init {
            PromptInit::Random => ("RANDOM", None),
            PromptInit::SampleVocab => ("SAMPLE_VOCAB", None),
            PromptInit::Text(t) => ("TEXT", Some(t.clone())),
        };
        let v = json!({
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "inference_mode": true,
            "num_attention_heads": heads,
            "num_layers": layers,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": self.num_virtual_tokens,
            "peft_type": "PROMPT_TUNING",
            "prompt_tuning_init": init,
            "prompt_tuning_init_text": text,
            "revision": null,
            "task_type": self.task_type.clone().unwrap_or_else(|| "CAUSAL_LM".into()),
            "token_dim": hidden,
            "tokenizer_kwargs": null,
            "tokenizer_name_or_path": self.tokenizer_name_or_path,
        });
        serde_json::to_string_pretty(&v).expect("serialisable")
    }
}
