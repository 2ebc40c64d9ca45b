//! Where a model's pieces come from: a Hugging Face folder (config.json, model.safetensors
//! or a sharded index, tokenizer.json) or a single GGUF file, on disk or in memory.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Result, bail, err};
use crate::io::gguf::{Gguf, unpermute_qk};
use crate::io::safetensors::{HostTensor, parse, view_to_f32};
use crate::models::config::LlamaConfig;
use crate::quant::{BaseFormat, QuantFormat, QuantHost};

/// The files of a model, as bytes.
pub enum ModelFiles {
    /// A Hugging Face folder: `config.json`, one or more safetensors shards, `tokenizer.json`.
    HfFolder { config: String, shards: Vec<(String, Vec<u8>)>, tokenizer: Option<String>, chat_template: Option<String>, preprocessor: Option<String> },
    /// A GGUF file (weights, config and tokenizer in one).
    Gguf { name: String, bytes: Vec<u8> },
}

impl ModelFiles {
    /// Build from named in-memory files (the browser, or tests): either a `*.gguf`, or
    /// `config.json` + `model.safetensors` / `model.safetensors.index.json` + shards.
    pub fn from_named(mut files: BTreeMap<String, Vec<u8>>) -> Result<Self> {
        let base = |n: &str| n.rsplit('/').next().unwrap_or(n).to_string();
        files = files.into_iter().map(|(k, v)| (base(&k), v)).collect();
        if let Some(name) = files.keys().find(|k| k.ends_with(".gguf")).cloned() {
            let bytes = files.remove(&name).expect("present");
            return Ok(ModelFiles::Gguf { name, bytes });
        }
        let text = |files: &mut BTreeMap<String, Vec<u8>>, n: &str| -> Result<Option<String>> {
            files.remove(n).map(|b| String::from_utf8(b).map_err(|_| err!(Format, "{n} is not UTF-8"))).transpose()
        };
        let config = text(&mut files, "config.json")?.ok_or_else(|| err!(Io, "model files: config.json missing (or give a .gguf file)"))?;
        let tokenizer = text(&mut files, "tokenizer.json")?;
        // transformers 5 saves the template as chat_template.jinja; older folders keep it in
        // tokenizer_config.json.
        let chat_template = match text(&mut files, "chat_template.jinja")? {
            Some(t) => Some(t),
            None => match text(&mut files, "tokenizer_config.json")? {
                Some(c) => {
                    serde_json::from_str::<serde_json::Value>(&c).map_err(|e| err!(Parse, "tokenizer_config.json: {e}"))?.get("chat_template").and_then(|t| t.as_str()).map(str::to_string)
                }
                None => None,
            },
        };
        let shards = if let Some(index) = text(&mut files, "model.safetensors.index.json")? {
            let names = shard_names(&index)?;
            names
                .into_iter()
                .map(|n| {
                    let b = files.remove(&n).ok_or_else(|| err!(Io, "model files: shard {n} named in model.safetensors.index.json is missing"))?;
                    Ok((n, b))
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            let b = files.remove("model.safetensors").ok_or_else(|| err!(Io, "model files: model.safetensors (or model.safetensors.index.json) missing"))?;
            vec![("model.safetensors".to_string(), b)]
        };
        let preprocessor = text(&mut files, "preprocessor_config.json")?;
        Ok(ModelFiles::HfFolder { config, shards, tokenizer, chat_template, preprocessor })
    }

    /// Read a Hugging Face folder or a .gguf file from disk.
    pub fn from_path(path: &Path) -> Result<Self> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| err!(Io, "{}: {e}", p.display()));
        if path.is_file() {
            if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
                bail!(Io, "{}: expected a .gguf file or a Hugging Face folder", path.display());
            }
            return Ok(ModelFiles::Gguf { name: path.display().to_string(), bytes: read(path)? });
        }
        if !path.is_dir() {
            bail!(Io, "{}: no such file or folder", path.display());
        }
        let mut files = BTreeMap::new();
        for n in ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json", "model.safetensors", "model.safetensors.index.json"] {
            let p = path.join(n);
            if p.is_file() {
                files.insert(n.to_string(), read(&p)?);
            }
        }
        if let Some(index) = files.get("model.safetensors.index.json") {
            for n in shard_names(std::str::from_utf8(index).map_err(|_| err!(Format, "index is not UTF-8"))?)? {
                if n.contains('/') || n.contains("..") {
                    bail!(Format, "model.safetensors.index.json: bad shard name {n:?}");
                }
                files.insert(n.clone(), read(&path.join(&n))?);
            }
        }
        Self::from_named(files).map_err(|e| e.context(path.display()))
    }
}

fn shard_names(index: &str) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(index).map_err(|e| err!(Parse, "model.safetensors.index.json: {e}"))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| err!(Format, "model.safetensors.index.json: no weight_map"))?;
    let mut names: Vec<String> = map.values().filter_map(|x| x.as_str().map(str::to_string)).collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Weights by Hugging Face name, plus the config: f32 host tensors, and the GGUF block
/// tensors kept in their format (when the base format keeps them).
pub struct LoadedWeights {
    pub config: LlamaConfig,
    pub tensors: BTreeMap<String, HostTensor>,
    pub quant: BTreeMap<String, QuantHost>,
    /// How the model should hold its weight matrices on the device.
    pub format: BaseFormat,
}

impl ModelFiles {
    /// Every weight as f32 (GGUF blocks dequantized).
    pub fn load_weights(&self) -> Result<LoadedWeights> {
        self.load_weights_as(BaseFormat::F32)
    }

    /// The weights for a base held in `format`.
    pub fn load_weights_as(&self, format: BaseFormat) -> Result<LoadedWeights> {
        match self {
            ModelFiles::HfFolder { config, shards, .. } => {
                let config = LlamaConfig::from_json(config)?;
                Ok(LoadedWeights { config, tensors: shard_tensors(shards)?, quant: BTreeMap::new(), format })
            }
            ModelFiles::Gguf { name, bytes } => gguf_weights(bytes, format).map_err(|e| e.context(name)),
        }
    }
}

/// Every tensor of safetensors shards by name, as f32; integer buffers that are no weights
/// (BERT's `embeddings.position_ids`) are left out.
pub fn shard_tensors(shards: &[(String, Vec<u8>)]) -> Result<BTreeMap<String, HostTensor>> {
    let mut tensors = BTreeMap::new();
    for (name, bytes) in shards {
        let st = parse(bytes).map_err(|e| e.context(name))?;
        for (k, v) in st.tensors() {
            if k.ends_with("position_ids") && matches!(v.dtype(), safetensors::Dtype::I64 | safetensors::Dtype::I32) {
                continue;
            }
            tensors.insert(k.clone(), view_to_f32(&k, &v).map_err(|e| e.context(name))?);
        }
    }
    Ok(tensors)
}

/// GGUF tensor names mapped to Hugging Face names, with Q/K un-permuted. Block tensors
/// (Q8_0, Q4_0, Q4_1) stay in their format unless `format` is f32 or f16.
fn gguf_weights(bytes: &[u8], format: BaseFormat) -> Result<LoadedWeights> {
    let g = Gguf::parse(bytes)?;
    let config = LlamaConfig::from_gguf(&g)?;
    let mut tensors = BTreeMap::new();
    let mut quant = BTreeMap::new();
    for (gname, info) in g.tensors.iter() {
        let hf = gguf_to_hf_name(gname).ok_or_else(|| err!(Unsupported, "unexpected GGUF tensor {gname}"))?;
        let heads = if gname.contains(".attn_q.") {
            Some(config.num_attention_heads)
        } else if gname.contains(".attn_k.") {
            Some(config.num_key_value_heads)
        } else {
            None
        };
        // llama.cpp permutes Q/K only for the llama architecture.
        let heads = heads.filter(|_| config.model_type == "llama");
        let rows = info.shape[0];
        let cols = if info.shape.len() == 2 { info.shape[1] } else { 1 };
        if format.keeps_blocks() && info.shape.len() == 2 && QuantFormat::of_ggml(info.ty).is_some() {
            let mut q = QuantHost::from_gguf(info.ty, rows, cols, g.tensor_bytes(gname)?).map_err(|e| e.context(gname))?;
            if let Some(h) = heads {
                let order: Vec<f32> = (0..rows).map(|r| r as f32).collect();
                let order: Vec<usize> = unpermute_qk(&order, h, rows, 1).into_iter().map(|r| r as usize).collect();
                q = q.rows_reordered(&order)?;
            }
            quant.insert(hf, q);
            continue;
        }
        let (shape, mut data) = g.tensor_f32(gname)?;
        if let Some(h) = heads {
            data = unpermute_qk(&data, h, rows, cols);
        }
        tensors.insert(hf, HostTensor::new(shape, data));
    }
    Ok(LoadedWeights { config, tensors, quant, format })
}

fn gguf_to_hf_name(g: &str) -> Option<String> {
    Some(match g {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        "rope_freqs.weight" => return None,
        _ => {
            let rest = g.strip_prefix("blk.")?;
            let (i, rest) = rest.split_once('.')?;
            let (module, kind) = rest.split_once('.')?;
            let m = match module {
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                "attn_norm" => "input_layernorm",
                "ffn_norm" => "post_attention_layernorm",
                _ => return None,
            };
            format!("model.layers.{i}.{m}.{kind}")
        }
    })
}
