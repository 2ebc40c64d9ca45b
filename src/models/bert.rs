//! The BERT encoder family (BERT, MiniLM; `model_type: "bert"`): learned absolute positions
//! and token types, post-LayerNorm blocks, exact (erf) GELU, a tanh pooler on `[CLS]`.
//! Weights are frozen plain tensors; adapters enter through [`Adapter`] at every linear
//! layer, under the module names of `BertForSequenceClassification` (`bert.encoder.layer.0.
//! attention.self.query`) or of a bare `BertModel` (`encoder.layer.0...`), as the task asks.

use std::collections::BTreeMap;

use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{Device, Int, Tensor};
use serde::Deserialize;
use serde_json::Value as Json;

use crate::error::{Result, bail, err};
use crate::io::safetensors::{HostTensor, take};
use crate::matmul::matmul;
use crate::models::Base;
use crate::models::hooks::{Adapter, Family, NoHook, Norm, Proj, Site, Tunable};
use crate::models::linear::Linear;
use crate::tensor::{floats, upload};

/// The projections of a BERT layer, in module order (BERT has no gate).
pub const PROJS: [Proj; 6] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Up, Proj::Down];

#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub pad_token_id: Option<u32>,
    /// Class names by id (`id2label`), when the checkpoint is a classifier.
    pub labels: Vec<String>,
}

#[derive(Deserialize)]
struct RawBert {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: Option<usize>,
    type_vocab_size: Option<usize>,
    layer_norm_eps: Option<f64>,
    hidden_act: Option<String>,
    position_embedding_type: Option<String>,
    pad_token_id: Option<u32>,
    is_decoder: Option<bool>,
}

impl BertConfig {
    /// Whether a `config.json` describes a BERT-family encoder.
    pub fn is_bert(config_json: &str) -> bool {
        serde_json::from_str::<Json>(config_json).ok().and_then(|v| v.get("model_type").and_then(Json::as_str).map(|t| t == "bert")).unwrap_or(false)
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawBert = serde_json::from_str(text).map_err(|e| err!(Config, "config.json: {e}"))?;
        match raw.model_type.as_deref() {
            Some("bert") => {}
            other => bail!(Unsupported, "config.json: model_type {other:?} is not a BERT encoder (supported: bert)"),
        }
        if let Some(act) = raw.hidden_act.as_deref().filter(|a| *a != "gelu") {
            bail!(Unsupported, "config.json: hidden_act {act:?} (BERT: only gelu)");
        }
        if let Some(p) = raw.position_embedding_type.as_deref().filter(|p| *p != "absolute") {
            bail!(Unsupported, "config.json: position_embedding_type {p:?} (only absolute)");
        }
        if raw.is_decoder == Some(true) {
            bail!(Unsupported, "config.json: is_decoder = true (BERT as a decoder is not supported)");
        }
        let sizes = [
            ("hidden_size", raw.hidden_size, 1 << 20),
            ("intermediate_size", raw.intermediate_size, 1 << 20),
            ("vocab_size", raw.vocab_size, 1 << 22),
            ("num_hidden_layers", raw.num_hidden_layers, 1024),
            ("num_attention_heads", raw.num_attention_heads, 4096),
            ("max_position_embeddings", raw.max_position_embeddings.unwrap_or(512), 1 << 16),
            ("type_vocab_size", raw.type_vocab_size.unwrap_or(2), 1 << 10),
        ];
        for (name, v, max) in sizes {
            if v == 0 || v > max {
                bail!(Config, "config.json: {name} = {v} is outside 1..={max}");
            }
        }
        if raw.hidden_size % raw.num_attention_heads != 0 {
            bail!(Config, "config.json: hidden_size {} not divisible by num_attention_heads {}", raw.hidden_size, raw.num_attention_heads);
        }
        let eps = raw.layer_norm_eps.unwrap_or(1e-12);
        if !(eps.is_finite() && eps >= 0.0) {
            bail!(Config, "config.json: layer_norm_eps {eps} must be finite and >= 0");
        }
        let labels = crate::models::config::id2label(text)?;
        Ok(BertConfig {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            intermediate_size: raw.intermediate_size,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(512),
            type_vocab_size: raw.type_vocab_size.unwrap_or(2),
            layer_norm_eps: eps,
            pad_token_id: raw.pad_token_id,
            labels,
        })
    }
}

/// A LayerNorm's weight and bias.
#[derive(Clone)]
pub struct LayerNorm {
    pub weight: Tensor<1>,
    pub bias: Tensor<1>,
}

impl LayerNorm {
    /// `(x - mean) / sqrt(var + eps) * w + b` over the last dimension (biased variance, as torch).
    pub fn forward(&self, x: Tensor<2>, eps: f64) -> Tensor<2> {
        self.forward_with(x, eps, Norm::Final, &NoHook)
    }

    /// The same with the adapter's replacements for norm `norm`'s weight and bias [1, hidden].
    pub fn forward_with(&self, x: Tensor<2>, eps: f64, norm: Norm, adapter: &dyn Adapter) -> Tensor<2> {
        let mean = x.clone().mean_dim(1);
        let centered = x - mean;
        let var = centered.clone().square().mean_dim(1);
        let w = adapter.tunable(Tunable::NormWeight(norm)).unwrap_or_else(|| self.weight.clone().unsqueeze());
        let b = adapter.tunable(Tunable::NormBias(norm)).unwrap_or_else(|| self.bias.clone().unsqueeze());
        centered * (var + eps).sqrt().recip() * w + b
    }

    /// Its weight and bias as [`Tunable`]s of `norm`, named under `module`.
    pub fn tunables(&self, norm: Norm, module: &str) -> [(Tunable, String, Tensor<1>); 2] {
        [(Tunable::NormWeight(norm), format!("{module}.weight"), self.weight.clone()), (Tunable::NormBias(norm), format!("{module}.bias"), self.bias.clone())]
    }
}

#[derive(Clone)]
pub struct BertLayer {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    /// `attention.output.dense`
    pub o: Linear,
    pub attn_norm: LayerNorm,
    /// `intermediate.dense`
    pub up: Linear,
    /// `output.dense`
    pub down: Linear,
    pub out_norm: LayerNorm,
}

impl BertLayer {
    fn linear(&self, p: Proj) -> &Linear {
        match p {
            Proj::Q => &self.q,
            Proj::K => &self.k,
            Proj::V => &self.v,
            Proj::O => &self.o,
            Proj::Up | Proj::Gate | Proj::Qkv => &self.up,
            Proj::Down => &self.down,
        }
    }
}

pub struct Bert {
    pub config: BertConfig,
    pub word: Tensor<2>,
    pub position: Tensor<2>,
    pub token_type: Tensor<2>,
    pub embed_norm: LayerNorm,
    pub layers: Vec<BertLayer>,
    /// `pooler.dense` (tanh of it on `[CLS]`), when the checkpoint has one.
    pub pooler: Option<Linear>,
    /// A classification head of the checkpoint (`classifier.weight` [labels, hidden], bias), as host tensors.
    pub classifier: Option<(HostTensor, HostTensor)>,
    /// Module naming of the sites (`bert.` inside a sequence classifier).
    pub family: Family,
    pub device: Device,
}

impl Bert {
    /// Upload weights named as in `BertModel` (`encoder.layer.0...`) or inside a task model
    /// (`bert.encoder...`, `classifier.*`). `prefix` is the naming adapters will use:
    /// `"bert."` for sequence classification, `""` for a bare encoder (embeddings).
    pub fn from_weights(config: BertConfig, mut tensors: BTreeMap<String, HostTensor>, prefix: &'static str, device: &Device) -> Result<Self> {
        let c = &config;
        // Strip the task wrapper's prefix, and the buffers and heads an encoder does not use.
        tensors = tensors.into_iter().map(|(k, v)| (k.strip_prefix("bert.").map(str::to_string).unwrap_or(k), v)).collect();
        tensors.retain(|k, _| !k.starts_with("cls.") && !k.ends_with("position_ids"));
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let t = &mut tensors;
        let lin = |t: &mut BTreeMap<String, HostTensor>, name: &str, inp: usize, out: usize| -> Result<Linear> {
            let w = take(t, &format!("{name}.weight"), &[out, inp])?;
            let b = take(t, &format!("{name}.bias"), &[out])?;
            Ok(Linear::dense(upload(&w.transposed(), device)?, Some(upload(&b, device)?)))
        };
        let norm = |t: &mut BTreeMap<String, HostTensor>, name: &str| -> Result<LayerNorm> {
            Ok(LayerNorm { weight: upload(&take(t, &format!("{name}.weight"), &[h])?, device)?, bias: upload(&take(t, &format!("{name}.bias"), &[h])?, device)? })
        };
        let word = upload(&take(t, "embeddings.word_embeddings.weight", &[c.vocab_size, h])?, device)?;
        let position = upload(&take(t, "embeddings.position_embeddings.weight", &[c.max_position_embeddings, h])?, device)?;
        let token_type = upload(&take(t, "embeddings.token_type_embeddings.weight", &[c.type_vocab_size, h])?, device)?;
        let embed_norm = norm(t, "embeddings.LayerNorm")?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            layers.push(BertLayer {
                q: lin(t, &format!("{p}.attention.self.query"), h, h)?,
                k: lin(t, &format!("{p}.attention.self.key"), h, h)?,
                v: lin(t, &format!("{p}.attention.self.value"), h, h)?,
                o: lin(t, &format!("{p}.attention.output.dense"), h, h)?,
                attn_norm: norm(t, &format!("{p}.attention.output.LayerNorm"))?,
                up: lin(t, &format!("{p}.intermediate.dense"), h, i)?,
                down: lin(t, &format!("{p}.output.dense"), i, h)?,
                out_norm: norm(t, &format!("{p}.output.LayerNorm"))?,
            });
        }
        let pooler = if t.contains_key("pooler.dense.weight") { Some(lin(t, "pooler.dense", h, h)?) } else { None };
        let classifier = match (t.remove("classifier.weight"), t.remove("classifier.bias")) {
            (Some(w), Some(b)) if w.shape.len() == 2 && w.shape[1] == h && b.shape == [w.shape[0]] => Some((w, b)),
            (None, None) => None,
            _ => bail!(Shape, "classifier.weight / classifier.bias: expected [labels, {h}] and [labels]"),
        };
        if let Some(k) = t.keys().next() {
            bail!(Unsupported, "unexpected tensor {k} ({} unused): not a plain BERT checkpoint", t.len());
        }
        Ok(Bert { config, word, position, token_type, embed_norm, layers, pooler, classifier, family: Family::Bert { prefix }, device: device.clone() })
    }

    /// The last hidden states [B*T, hidden] of token ids [B, T]; `mask` [B*T] is 1 for real
    /// tokens and 0 for padding (None: all real). Token types are all 0 (single sentences).
    pub fn hidden(&self, ids: Tensor<2, Int>, mask: Option<&[i64]>, adapter: &dyn Adapter) -> Result<Tensor<2>> {
        let c = &self.config;
        let [b, t] = ids.dims();
        if t == 0 {
            bail!(Shape, "empty input");
        }
        if t > c.max_position_embeddings {
            bail!(Data, "{t} tokens is more than the model's {} positions (max_position_embeddings): truncate the text or lower seq-len", c.max_position_embeddings);
        }
        if let Some(m) = mask
            && m.len() != b * t
        {
            bail!(Shape, "attention_mask has {} values, expected {b}x{t}", m.len());
        }
        let (h, nh) = (c.hidden_size, c.num_attention_heads);
        let hd = h / nh;
        let eps = c.layer_norm_eps;
        let words = self.word.clone().select(0, ids.reshape([b * t]));
        let pos: Tensor<3> = self.position.clone().narrow(0, 0, t).unsqueeze::<3>();
        let typ: Tensor<3> = self.token_type.clone().narrow(0, 0, 1).unsqueeze::<3>();
        let x = (words.reshape([b, t, h]) + pos + typ).reshape([b * t, h]);
        let mut x = self.embed_norm.forward_with(x, eps, Norm::Embedding, adapter);
        // Additive key mask [B, 1, 1, T]: transformers adds finfo(f32).min at padded keys.
        let key_mask = mask.map(|m| floats(m.iter().map(|&v| if v == 0 { f32::MIN } else { 0.0 }).collect(), [b, 1, 1, t], &self.device));
        let scale = 1.0 / (hd as f64).sqrt();
        for (l, layer) in self.layers.iter().enumerate() {
            let lin = |p: Proj, x: &Tensor<2>| {
                let site = Site { layer: l, proj: p, family: self.family };
                let x = adapter.linear_input(site, x.clone());
                let y = layer.linear(p).forward_with(&x, adapter.linear_weight(site), adapter.linear_bias(site));
                adapter.linear_output(site, &x, y)
            };
            let heads = |y: Tensor<2>| y.reshape([b, t, nh, hd]).swap_dims(1, 2);
            let q = heads(lin(Proj::Q, &x));
            let k = heads(lin(Proj::K, &x));
            let v = heads(lin(Proj::V, &x));
            let mut scores = matmul(q, k.swap_dims(2, 3)).mul_scalar(scale);
            if let Some(m) = &key_mask {
                scores = scores + m.clone();
            }
            let ctx = matmul(softmax(scores, 3), v).swap_dims(1, 2).reshape([b * t, h]);
            let a = layer.attn_norm.forward_with(lin(Proj::O, &ctx) + x, eps, Norm::PostAttention(l), adapter);
            let inter = gelu(lin(Proj::Up, &a));
            x = layer.out_norm.forward_with(lin(Proj::Down, &inter) + a, eps, Norm::Output(l), adapter);
        }
        Ok(x)
    }

    /// The pooler's output `tanh(dense(h[CLS]))` [B, hidden] from hidden states [B*T, hidden].
    pub fn pool(&self, hidden: Tensor<2>, b: usize, adapter: &dyn Adapter) -> Result<Tensor<2>> {
        let p = self.pooler.as_ref().ok_or_else(|| err!(Unsupported, "this checkpoint has no pooler (pooler.dense): it cannot be a BertForSequenceClassification"))?;
        let h = self.config.hidden_size;
        let t = hidden.dims()[0] / b;
        let cls = hidden.reshape([b, t, h]).narrow(1, 0, 1).reshape([b, h]);
        Ok(p.forward_with(&cls, None, adapter.tunable(Tunable::PoolerBias)).tanh())
    }

    /// Sentence embeddings as sentence-transformers computes them: the mean of the real
    /// tokens' hidden states, L2-normalised, [B, hidden].
    pub fn mean_pool(hidden: Tensor<2>, mask: &[i64], b: usize) -> Tensor<2> {
        let bt = hidden.dims()[0];
        let (t, h) = (bt / b, hidden.dims()[1]);
        let device = hidden.device();
        let m: Tensor<3> = floats(mask.iter().map(|&v| if v == 0 { 0.0 } else { 1.0 }).collect(), [b, t, 1], &device);
        let sum = (hidden.reshape([b, t, h]) * m.clone()).sum_dim(1).reshape([b, h]);
        let count = m.sum_dim(1).reshape([b, 1]).clamp_min(1e-9);
        let mean = sum / count;
        let norm = mean.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
        mean / norm
    }

    pub fn num_parameters(&self) -> usize {
        let c = &self.config;
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let per = 4 * (h * h + h) + 2 * (h * i) + i + h + 4 * h;
        (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * h + 2 * h + per * c.num_hidden_layers + self.pooler.as_ref().map_or(0, |_| h * h + h)
    }
}

impl Base for Bert {
    fn sites(&self) -> Vec<Site> {
        (0..self.layers.len()).flat_map(|layer| PROJS.iter().map(move |&proj| Site { layer, proj, family: self.family })).collect()
    }
    fn linear(&self, site: Site) -> &Linear {
        self.layers[site.layer].linear(site.proj)
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn tunables(&self) -> Vec<(Tunable, String, Tensor<1>)> {
        let name = |n: Norm| n.module_name_in(self.family);
        let mut v = self.embed_norm.tunables(Norm::Embedding, &name(Norm::Embedding)).to_vec();
        for (l, layer) in self.layers.iter().enumerate() {
            v.extend(layer.attn_norm.tunables(Norm::PostAttention(l), &name(Norm::PostAttention(l))));
            v.extend(layer.out_norm.tunables(Norm::Output(l), &name(Norm::Output(l))));
        }
        if let Some(b) = self.pooler.as_ref().and_then(|p| p.bias.as_ref()) {
            let prefix = if let Family::Bert { prefix } = self.family { prefix } else { "" };
            v.push((Tunable::PoolerBias, format!("{prefix}pooler.dense.bias"), b.clone()));
        }
        v
    }
}
