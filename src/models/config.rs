//! Decoder hyper-parameters (the Llama family, and GPT-2 mapped onto the same fields), read
//! from a Hugging Face `config.json` or from GGUF metadata.

use serde::Deserialize;
use serde_json::Value as Json;

use crate::error::{Result, bail, err};
use crate::io::gguf::Gguf;

/// RoPE frequency scaling (`rope_scaling` in config.json).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Position interpolation: frequencies divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.x scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// The norms' epsilon (RMSNorm; GPT-2: LayerNorm's `layer_norm_epsilon`).
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2 style, or Llama `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (Llama `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub model_type: String,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// The embedding's `padding_idx`: its row gets no gradient (as torch's nn.Embedding).
    pub pad_token_id: Option<u32>,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Json>,
    rope_parameters: Option<Json>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<Json>,
    eos_token_id: Option<Json>,
    pad_token_id: Option<Json>,
}

/// A classifier checkpoint's class names by id (`id2label` of config.json; empty when absent).
pub fn id2label(config_json: &str) -> Result<Vec<String>> {
    let v: Json = serde_json::from_str(config_json).map_err(|e| err!(Config, "config.json: {e}"))?;
    let Some(m) = v.get("id2label").and_then(Json::as_object) else { return Ok(Vec::new()) };
    let mut by_id: Vec<(usize, String)> = m
        .iter()
        .map(|(k, v)| {
            let id = k.parse::<usize>().map_err(|_| err!(Config, "config.json: id2label key {k:?} is not a number"))?;
            Ok((id, v.as_str().ok_or_else(|| err!(Config, "config.json: id2label values must be strings"))?.to_string()))
        })
        .collect::<Result<_>>()?;
    by_id.sort();
    if by_id.iter().enumerate().any(|(i, (k, _))| i != *k) {
        bail!(Config, "config.json: id2label ids must be 0..n");
    }
    Ok(by_id.into_iter().map(|(_, v)| v).collect())
}

fn first_id(v: &Option<Json>) -> Option<u32> {
    match v {
        Some(Json::Number(n)) => n.as_u64().map(|x| x as u32),
        Some(Json::Array(a)) => a.first().and_then(|x| x.as_u64()).map(|x| x as u32),
        _ => None,
    }
}

fn parse_rope_scaling(v: Option<&Json>) -> Result<RopeScaling> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(RopeScaling::None);
    };
    let ty = v.get("rope_type").or_else(|| v.get("type")).and_then(Json::as_str).unwrap_or("default");
    let num = |k: &str| v.get(k).and_then(Json::as_f64).ok_or_else(|| err!(Config, "rope_scaling.{k} missing"));
    Ok(match ty {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: num("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        other => bail!(Unsupported, "rope_scaling type {other:?} (supported: default, linear, llama3)"),
    })
}

/// GPT-2's config.json keys.
#[derive(Deserialize)]
struct RawGpt2 {
    vocab_size: usize,
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    n_positions: Option<usize>,
    n_inner: Option<usize>,
    layer_norm_epsilon: Option<f64>,
    activation_function: Option<String>,
    tie_word_embeddings: Option<bool>,
    scale_attn_weights: Option<bool>,
    scale_attn_by_inverse_layer_idx: Option<bool>,
    add_cross_attention: Option<bool>,
    bos_token_id: Option<Json>,
    eos_token_id: Option<Json>,
    pad_token_id: Option<Json>,
}

impl LlamaConfig {
    /// GPT-2 (LayerNorm, learned positions, Conv1D layers with biases, GELU-tanh MLP).
    pub fn is_gpt2(&self) -> bool {
        self.model_type == "gpt2"
    }

    fn gpt2_from_json(text: &str) -> Result<Self> {
        let raw: RawGpt2 = serde_json::from_str(text).map_err(|e| err!(Config, "config.json: {e}"))?;
        if let Some(act) = raw.activation_function.as_deref().filter(|a| !["gelu_new", "gelu_pytorch_tanh"].contains(a)) {
            bail!(Unsupported, "config.json: activation_function {act:?} (GPT-2: gelu_new)");
        }
        if raw.scale_attn_weights == Some(false) || raw.scale_attn_by_inverse_layer_idx == Some(true) || raw.add_cross_attention == Some(true) {
            bail!(Unsupported, "config.json: GPT-2 attention variants (scale_attn_weights false, scale_attn_by_inverse_layer_idx, add_cross_attention) are not supported");
        }
        if raw.n_head == 0 || raw.n_embd % raw.n_head != 0 {
            bail!(Config, "config.json: n_embd {} not divisible by n_head {}", raw.n_embd, raw.n_head);
        }
        if raw.tie_word_embeddings == Some(false) {
            bail!(Unsupported, "config.json: GPT-2 with an untied LM head");
        }
        LlamaConfig {
            vocab_size: raw.vocab_size,
            hidden_size: raw.n_embd,
            intermediate_size: raw.n_inner.unwrap_or(4 * raw.n_embd),
            num_hidden_layers: raw.n_layer,
            num_attention_heads: raw.n_head,
            num_key_value_heads: raw.n_head,
            head_dim: raw.n_embd / raw.n_head,
            rms_norm_eps: raw.layer_norm_epsilon.unwrap_or(1e-5),
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: raw.n_positions.unwrap_or(1024),
            tie_word_embeddings: true,
            qkv_bias: true,
            o_bias: true,
            mlp_bias: true,
            model_type: "gpt2".into(),
            bos_token_id: first_id(&raw.bos_token_id),
            eos_token_id: first_id(&raw.eos_token_id),
            pad_token_id: first_id(&raw.pad_token_id),
        }
        .checked()
        .map_err(|e| e.context("config.json"))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        if serde_json::from_str::<Json>(text).ok().and_then(|v| v.get("model_type").and_then(Json::as_str).map(|t| t == "gpt2")).unwrap_or(false) {
            return Self::gpt2_from_json(text);
        }
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| err!(Config, "config.json: {e}"))?;
        let model_type = raw.model_type.clone().unwrap_or_default();
        let supported = ["llama", "mistral", "qwen2", "smollm", "smollm2"];
        if !supported.contains(&model_type.as_str()) {
            let arch = raw.architectures.unwrap_or_default().join(",");
            bail!(Unsupported, "config.json: model_type {model_type:?} ({arch}) is not supported (supported: llama, mistral, qwen2, gpt2; bert for classification and embeddings)");
        }
        if let Some(act) = &raw.hidden_act
            && act != "silu"
        {
            bail!(Unsupported, "config.json: hidden_act {act:?} (only silu)");
        }
        if raw.num_attention_heads == 0 || raw.hidden_size % raw.num_attention_heads != 0 && raw.head_dim.is_none() {
            bail!(Config, "config.json: hidden_size {} not divisible by num_attention_heads {}", raw.hidden_size, raw.num_attention_heads);
        }
        let kv = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if kv == 0 || raw.num_attention_heads % kv != 0 {
            bail!(Config, "config.json: num_attention_heads {} not a multiple of num_key_value_heads {kv}", raw.num_attention_heads);
        }
        // transformers 5 may nest rope settings under `rope_parameters`.
        let rp = raw.rope_parameters.as_ref();
        let rope_theta = raw.rope_theta.or_else(|| rp.and_then(|p| p.get("rope_theta")).and_then(Json::as_f64)).unwrap_or(10000.0);
        let rope_scaling = parse_rope_scaling(raw.rope_scaling.as_ref().or(rp))?;
        let is_qwen2 = model_type == "qwen2";
        if raw.use_sliding_window == Some(true) {
            bail!(Unsupported, "config.json: use_sliding_window = true (sliding-window attention) is not supported");
        }
        let attention_bias = raw.attention_bias.unwrap_or(false);
        LlamaConfig {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: kv,
            head_dim: raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: is_qwen2 || attention_bias,
            o_bias: attention_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            model_type,
            bos_token_id: first_id(&raw.bos_token_id),
            eos_token_id: first_id(&raw.eos_token_id),
            pad_token_id: first_id(&raw.pad_token_id),
        }
        .checked()
        .map_err(|e| e.context("config.json"))
    }

    /// Hyper-parameters from GGUF metadata (`llama.*` / `qwen2.*` keys).
    pub fn from_gguf(g: &Gguf<'_>) -> Result<Self> {
        let arch = g.get_str("general.architecture")?.to_string();
        if !["llama", "qwen2", "mistral"].contains(&arch.as_str()) {
            bail!(Unsupported, "GGUF architecture {arch:?} (supported: llama, qwen2, mistral)");
        }
        let k = |s: &str| format!("{arch}.{s}");
        let hidden = g.get_u64(&k("embedding_length"))? as usize;
        let heads = g.get_u64(&k("attention.head_count"))? as usize;
        let kv = g.get(&k("attention.head_count_kv")).and_then(|v| v.as_u64()).map(|v| v as usize).unwrap_or(heads);
        let (vocab_rows, _) = g.tensors.get("token_embd.weight").map(|t| (t.shape[0], t.shape[1])).ok_or_else(|| err!(Format, "GGUF has no token_embd.weight"))?;
        let head_dim = g.get(&k("attention.key_length")).and_then(|v| v.as_u64()).map(|v| v as usize).unwrap_or(hidden / heads.max(1));
        if heads == 0 || kv == 0 || heads % kv != 0 {
            bail!(Format, "GGUF: bad head counts {heads}/{kv}");
        }
        let scaling = match g.get(&k("rope.scaling.type")).and_then(|v| v.as_str()) {
            Some("linear") => RopeScaling::Linear { factor: g.get_f64(&k("rope.scaling.factor"))? },
            None | Some("none") => RopeScaling::None,
            Some(other) => bail!(Unsupported, "GGUF rope scaling {other:?}"),
        };
        LlamaConfig {
            vocab_size: vocab_rows,
            hidden_size: hidden,
            intermediate_size: g.get_u64(&k("feed_forward_length"))? as usize,
            num_hidden_layers: g.get_u64(&k("block_count"))? as usize,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: g.get_f64(&k("attention.layer_norm_rms_epsilon"))?,
            rope_theta: g.get(&k("rope.freq_base")).and_then(|v| v.as_f64()).unwrap_or(10000.0),
            rope_scaling: scaling,
            max_position_embeddings: g.get(&k("context_length")).and_then(|v| v.as_u64()).unwrap_or(2048) as usize,
            tie_word_embeddings: !g.tensors.contains_key("output.weight"),
            qkv_bias: g.tensors.contains_key("blk.0.attn_q.bias"),
            o_bias: g.tensors.contains_key("blk.0.attn_output.bias"),
            mlp_bias: false,
            model_type: arch,
            bos_token_id: g.get("tokenizer.ggml.bos_token_id").and_then(|v| v.as_u64()).map(|v| v as u32),
            eos_token_id: g.get("tokenizer.ggml.eos_token_id").and_then(|v| v.as_u64()).map(|v| v as u32),
            // transformers builds the embedding with padding_idx = the GGUF padding token.
            pad_token_id: g.get("tokenizer.ggml.padding_token_id").and_then(|v| v.as_u64()).map(|v| v as u32),
        }
        .checked()
        .map_err(|e| e.context("GGUF metadata"))
    }

    /// Refuse sizes that no real checkpoint has, before anything is sized from them: a
    /// hostile config must give an error, not a huge allocation. Limits: widths and the
    /// context length up to 2^20, the vocabulary up to 2^22 (4M), 1024 layers, 4096 heads.
    fn checked(self) -> Result<Self> {
        let sizes = [
            ("hidden_size", self.hidden_size, 1 << 20),
            ("intermediate_size", self.intermediate_size, 1 << 20),
            ("head_dim", self.head_dim, 1 << 16),
            ("vocab_size", self.vocab_size, 1 << 22),
            ("num_hidden_layers", self.num_hidden_layers, 1024),
            ("num_attention_heads", self.num_attention_heads, 4096),
            ("num_key_value_heads", self.num_key_value_heads, 4096),
            ("max_position_embeddings", self.max_position_embeddings, 1 << 24),
        ];
        for (name, v, max) in sizes {
            if v == 0 || v > max {
                bail!(Config, "{name} = {v} is outside 1..={max}");
            }
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0 && self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            bail!(Config, "rms_norm_eps {} / rope_theta {} must be finite and positive", self.rms_norm_eps, self.rope_theta);
        }
        Ok(self)
    }

    /// Inverse frequencies for RoPE (HF `rotate_half` convention), length head_dim/2,
    /// computed as transformers does (f32 from an f64-free formula, then scaled).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        // transformers: 1 / (base ** (arange(0, d, 2, dtype=int64).float() / d)), in f32.
        let base = self.rope_theta as f32;
        let inv: Vec<f32> = (0..d / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / d as f32)).collect();
        match self.rope_scaling {
            RopeScaling::None => inv,
            RopeScaling::Linear { factor } => inv.iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let (factor, lo, hi, old) = (factor as f32, low_freq_factor as f32, high_freq_factor as f32, original_max_position_embeddings as f32);
                let low_wavelen = old / lo;
                let high_wavelen = old / hi;
                inv.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
                        let is_medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                        if is_medium { smoothed } else { scaled }
                    })
                    .collect()
            }
        }
    }
}
