//! Writing a loaded model back out as a Hugging Face folder (`config.json`,
//! `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`) that transformers'
//! `AutoModelForCausalLM.from_pretrained` loads: used to export a model with adapters merged
//! into its weights. Weights are written in f32 with transformers' names and layouts.

use std::collections::BTreeMap;

use serde_json::json;

use crate::error::Result;
use crate::io::safetensors::{OutTensor, write};
use crate::models::config::{LlamaConfig, RopeScaling};
use crate::models::llama::Llama;
use crate::tensor::read;
use crate::tokenizer::Tokenizer;

/// `config.json` for `config` (transformers 4.x and 5.x both read it).
pub fn config_json(c: &LlamaConfig) -> String {
    let qwen2 = c.model_type == "qwen2";
    let mut rope = json!({ "rope_type": "default", "rope_theta": c.rope_theta });
    match c.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => rope = json!({ "rope_type": "linear", "rope_theta": c.rope_theta, "factor": factor }),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            rope = json!({
                "rope_type": "llama3", "rope_theta": c.rope_theta, "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_max_position_embeddings,
            })
        }
    }
    let scaling = if c.rope_scaling == RopeScaling::None { serde_json::Value::Null } else { rope.clone() };
    let mut v = json!({
        "architectures": [if qwen2 { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
        "model_type": if qwen2 { "qwen2" } else { "llama" },
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": rope,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "torch_dtype": "float32",
        "dtype": "float32",
        "use_cache": true,
    });
    if qwen2 {
        v["use_sliding_window"] = json!(false);
    } else {
        v["attention_bias"] = json!(c.o_bias);
        v["mlp_bias"] = json!(c.mlp_bias);
    }
    serde_json::to_string_pretty(&v).expect("serialisable")
}

/// transformers' state dict of `model` (weights as the model holds them now).
pub async fn state_dict(model: &Llama) -> Result<BTreeMap<String, OutTensor>> {
    if model.config.is_gpt2() {
        return Err(crate::error::Error::new(crate::error::ErrorCode::Unsupported, "exporting a merged GPT-2 is not supported yet (Llama-family models only)"));
    }
    let mut out = BTreeMap::new();
    out.insert("model.embed_tokens.weight".to_string(), OutTensor::F32(read(model.embed.dense()).await?));
    out.insert("model.norm.weight".to_string(), OutTensor::F32(read(model.norm.clone()).await?));
    if let Some(head) = &model.lm_head {
        out.insert("lm_head.weight".to_string(), OutTensor::F32(read(head.dense_weight()).await?.transposed()));
    }
    for site in model.sites() {
        let lin = model.linear(site);
        let name = site.module_name();
        out.insert(format!("{name}.weight"), OutTensor::F32(read(lin.dense_weight()).await?.transposed()));
        if let Some(b) = &lin.bias {
            out.insert(format!("{name}.bias"), OutTensor::F32(read(b.clone()).await?));
        }
    }
    for (l, b) in model.blocks.iter().enumerate() {
        out.insert(format!("model.layers.{l}.input_layernorm.weight"), OutTensor::F32(read(b.input_norm.clone()).await?));
        out.insert(format!("model.layers.{l}.post_attention_layernorm.weight"), OutTensor::F32(read(b.post_attn_norm.clone()).await?));
    }
    Ok(out)
}

/// The files of a Hugging Face folder for `model` and `tokenizer`, by name.
pub async fn hf_folder(model: &Llama, tokenizer: &Tokenizer) -> Result<Vec<(String, Vec<u8>)>> {
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let weights = write(&state_dict(model).await?, Some(meta))?;
    let mut files = vec![
        ("config.json".to_string(), config_json(&model.config).into_bytes()),
        ("model.safetensors".to_string(), weights),
        ("tokenizer.json".to_string(), tokenizer.to_json()?.into_bytes()),
        ("tokenizer_config.json".to_string(), tokenizer.config_json().into_bytes()),
    ];
    if let Some(t) = &tokenizer.chat_template {
        files.push(("chat_template.jinja".to_string(), t.clone().into_bytes()));
    }
    Ok(files)
}
