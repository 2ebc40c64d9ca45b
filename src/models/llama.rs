//! The decoder: the Llama architecture (SmolLM2, TinyLlama, Mistral-style, Qwen2-style):
//! RMSNorm, RoPE (rotate_half convention, optional scaling), grouped-query attention,
//! SiLU-gated MLP, tied or untied embeddings, optional q/k/v(/o) biases; and GPT-2 on the same
//! skeleton: LayerNorm with biases, learned absolute positions, one fused `c_attn` projection,
//! a GELU-tanh MLP, Conv1D weights (already [in, out]), a tied LM head. Weights are frozen:
//! they are plain (non-autodiff) tensors, so autodiff never computes their gradients;
//! adapters enter through [`Adapter`].

use std::collections::BTreeMap;

use burn::tensor::activation::silu;
use burn::tensor::{Device, Int, Tensor};

use crate::error::{Result, bail};
use crate::io::safetensors::{HostTensor, take};
use crate::io::source::LoadedWeights;
use crate::models::attention::{self, AttentionImpl, Mask, attention};
use crate::models::config::LlamaConfig;
use crate::models::hooks::{Adapter, Family, Norm, Proj, Site, Sublayer};
pub use crate::models::linear::{Embedding, Linear, Weight};
use crate::quant::weight::QuantWeight;
use crate::quant::{BaseFormat, QuantFormat, QuantHost};
use crate::tensor::{floats, halves, upload};

#[derive(Clone)]
pub struct Block {
    pub input_norm: Tensor<1>,
    pub post_attn_norm: Tensor<1>,
    /// The norms' biases: LayerNorm (GPT-2); None = RMSNorm (Llama).
    pub input_norm_bias: Option<Tensor<1>>,
    pub post_attn_norm_bias: Option<Tensor<1>>,
    /// The block's linear layers: Llama's Q, K, V, O, Gate, Up, Down, or GPT-2's Qkv
    /// (`c_attn`), O (`attn.c_proj`), Up (`c_fc`), Down (`mlp.c_proj`).
    pub linears: BTreeMap<Proj, Linear>,
}

impl Block {
    pub fn linear_mut(&mut self, p: Proj) -> &mut Linear {
        self.linears.get_mut(&p).expect("a site of this block")
    }

    pub fn linear(&self, p: Proj) -> &Linear {
        &self.linears[&p]
    }
}

/// Keys and values of earlier positions, per layer: [B, n_kv_heads, S, head_dim].
#[derive(Default, Clone)]
pub struct KvCache {
    pub layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    /// Positions cached, virtual tokens included.
    pub len: usize,
    /// Of which virtual tokens (prompt tuning).
    pub virtual_len: usize,
}

/// A stretch of the forward pass ([`Llama::pass`]): start at the embeddings (`from: None`)
/// or at block `l` with its input, run the blocks up to `to` (exclusive), then the final
/// norm if `final_norm`; `before_block` sees each block's input as it starts.
pub struct Segment<'a> {
    pub from: Option<(usize, Tensor<2>)>,
    pub to: usize,
    pub final_norm: bool,
    pub before_block: Option<&'a mut dyn FnMut(usize, &Tensor<2>)>,
}

impl Segment<'_> {
    /// The whole pass: embeddings, every block, the final norm.
    pub fn all(layers: usize) -> Self {
        Segment { from: None, to: layers, final_norm: true, before_block: None }
    }
}

/// Per-call inputs besides the token ids.
pub struct Inputs {
    pub ids: Tensor<2, Int>,
    /// 1 for real tokens, 0 for padding, [B, T]; None = all real.
    pub attention_mask: Option<Vec<i64>>,
}

pub struct Llama {
    pub config: LlamaConfig,
    pub embed: Embedding,
    /// Learned absolute position embeddings [positions, hidden] (GPT-2's `wpe`); None = RoPE.
    pub positions: Option<Tensor<2>>,
    pub blocks: Vec<Block>,
    pub norm: Tensor<1>,
    /// The final LayerNorm's bias (GPT-2's `ln_f`).
    pub norm_bias: Option<Tensor<1>>,
    /// hidden → vocab; None = tied to `embed`.
    pub lm_head: Option<Linear>,
    inv_freq: Vec<f32>,
    /// cos/sin for positions 0..ROPE_CACHED on the device, [positions, head_dim]: computed
    /// once at load, so a forward pass uploads no RoPE table.
    rope_cache: (Tensor<2>, Tensor<2>),
    /// How attention is computed where the device allows it ([`attention::runs`]): the
    /// reference tensor ops, the blocked attention (the default) or the fused kernels (see
    /// [`attention`](crate::models::attention)).
    pub attention: AttentionImpl,
    pub device: Device,
}

/// GELU with the tanh approximation (GPT-2's `gelu_new`):
/// `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`.
fn gelu_tanh(x: Tensor<2>) -> Tensor<2> {
    let inner = (x.clone() + x.clone().powi_scalar(3).mul_scalar(0.044715)).mul_scalar((2.0 / std::f64::consts::PI).sqrt());
    x.clone().mul_scalar(0.5) * inner.tanh().add_scalar(1.0)
}

/// Positions whose RoPE tables are kept on the device.
const ROPE_CACHED: usize = 4096;

/// cos/sin of positions `start..start+t` row-major [t, head_dim], in f32 as transformers
/// computes them (freqs = inv_freq * pos; emb = cat(freqs, freqs)).
fn rope_host(inv_freq: &[f32], start: usize, t: usize) -> (Vec<f32>, Vec<f32>) {
    let n = t * inv_freq.len() * 2;
    let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for p in start..start + t {
        for _half in 0..2 {
            for &f in inv_freq {
                let a = f * p as f32;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    (cos, sin)
}

/// A linear layer's weight `name` ([out, inp] in PyTorch layout) as the base format asks:
/// a GGUF block tensor kept as it is, or quantized at load, or dense f32 / f16 [inp, out].
fn matrix(t: &mut BTreeMap<String, HostTensor>, quant: &mut BTreeMap<String, QuantHost>, format: BaseFormat, name: &str, out: usize, inp: usize, device: &Device) -> Result<Weight> {
    if let Some(q) = quant.remove(name) {
        if (q.rows, q.cols) != (out, inp) {
            bail!(Shape, "tensor {name}: shape [{}, {}], expected [{out}, {inp}]", q.rows, q.cols);
        }
        return Ok(match format {
            BaseFormat::To(f) if f != q.format => Weight::Quant(QuantWeight::upload(&QuantHost::quantize(f, out, inp, &q.dequantize())?, device)?),
            _ => Weight::Quant(QuantWeight::upload(&q, device)?),
        });
    }
    let w = take(t, name, &[out, inp])?;
    Ok(match format {
        BaseFormat::To(f) => Weight::Quant(QuantWeight::upload(&QuantHost::quantize(f, out, inp, &w.data)?, device)?),
        _ => dense(&w.transposed(), format, device)?,
    })
}

/// A dense weight `w` [inp, out] held as the base format asks: f16 or f32.
fn dense(w: &HostTensor, format: BaseFormat, device: &Device) -> Result<Weight> {
    Ok(if format.half() { Weight::Half(halves(&w.data, [w.shape[0], w.shape[1]], device)) } else { Weight::Dense(upload(w, device)?) })
}

/// An embedding table `name` [rows, cols], kept or quantized as [`matrix`], except that a
/// table quantized at load goes to Q8_0 whatever the layers' format (as llama.cpp keeps token
/// embeddings at 8 bits or more for its 4-bit models: with a tied LM head, 4-bit embeddings
/// would cost far more accuracy than 4-bit layers).
fn table(t: &mut BTreeMap<String, HostTensor>, quant: &mut BTreeMap<String, QuantHost>, format: BaseFormat, name: &str, rows: usize, cols: usize, device: &Device) -> Result<Embedding> {
    let format = match format {
        BaseFormat::To(_) => BaseFormat::To(QuantFormat::Q8_0),
        other => other,
    };
    if quant.contains_key(name) || matches!(format, BaseFormat::To(_)) {
        return Ok(match matrix(t, quant, format, name, rows, cols, device)? {
            Weight::Quant(q) => Embedding::Quant(q),
            Weight::Dense(d) => Embedding::Dense(d.transpose()),
            Weight::Half(d) => Embedding::Half(d.transpose()),
        });
    }
    let e = take(t, name, &[rows, cols])?;
    Ok(if format.half() { Embedding::Half(halves(&e.data, [rows, cols], device)) } else { Embedding::Dense(upload(&e, device)?) })
}

impl Llama {
    /// Upload weights (HF names) to `device`. Checks every shape; refuses leftovers that
    /// would mean an unsupported architecture variant.
    pub fn from_weights(w: LoadedWeights, device: &Device) -> Result<Self> {
        if w.config.is_gpt2() {
            return Self::gpt2_from_weights(w, device);
        }
        let LoadedWeights { config: c, mut tensors, mut quant, format } = w;
        let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (qd, kvd) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
        let t = &mut tensors;
        let mut lin = |t: &mut BTreeMap<String, HostTensor>, name: &str, inp: usize, out: usize, bias: bool| -> Result<Linear> {
            let weight = matrix(t, &mut quant, format, &format!("{name}.weight"), out, inp, device)?;
            let bias = if bias { Some(upload(&take(t, &format!("{name}.bias"), &[out])?, device)?) } else { None };
            Ok(Linear { weight, bias })
        };
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let dims = [
                (Proj::Q, h, qd, c.qkv_bias),
                (Proj::K, h, kvd, c.qkv_bias),
                (Proj::V, h, kvd, c.qkv_bias),
                (Proj::O, qd, h, c.o_bias),
                (Proj::Gate, h, i, c.mlp_bias),
                (Proj::Up, h, i, c.mlp_bias),
                (Proj::Down, i, h, c.mlp_bias),
            ];
            let mut linears = BTreeMap::new();
            for (proj, inp, out, bias) in dims {
                linears.insert(proj, lin(t, &format!("{p}.{}", proj.module_path()), inp, out, bias)?);
            }
            blocks.push(Block {
                input_norm: upload(&take(t, &format!("{p}.input_layernorm.weight"), &[h])?, device)?,
                post_attn_norm: upload(&take(t, &format!("{p}.post_attention_layernorm.weight"), &[h])?, device)?,
                input_norm_bias: None,
                post_attn_norm_bias: None,
                linears,
            });
        }
        let embed = table(&mut tensors, &mut quant, format, "model.embed_tokens.weight", v, h, device)?;
        let norm = upload(&take(&mut tensors, "model.norm.weight", &[h])?, device)?;
        let has_head = tensors.contains_key("lm_head.weight") || quant.contains_key("lm_head.weight");
        let lm_head = if c.tie_word_embeddings {
            // transformers ties lm_head to the embeddings whenever the config says so.
            tensors.remove("lm_head.weight");
            quant.remove("lm_head.weight");
            None
        } else if has_head {
            Some(Linear { weight: matrix(&mut tensors, &mut quant, format, "lm_head.weight", v, h, device)?, bias: None })
        } else {
            bail!(Format, "missing tensor lm_head.weight (config says embeddings are not tied)")
        };
        tensors.retain(|k, _| !k.ends_with("rotary_emb.inv_freq"));
        if let Some(k) = tensors.keys().chain(quant.keys()).next() {
            bail!(Unsupported, "unexpected tensor {k} ({} unused): not a plain Llama checkpoint", tensors.len() + quant.len());
        }
        let inv_freq = c.rope_inv_freq();
        let cached = c.max_position_embeddings.clamp(1, ROPE_CACHED);
        let (cos, sin) = rope_host(&inv_freq, 0, cached);
        let d = c.head_dim;
        let rope_cache = (floats(cos, [cached, d], device), floats(sin, [cached, d], device));
        Ok(Llama { config: c, embed, positions: None, blocks, norm, norm_bias: None, lm_head, inv_freq, rope_cache, attention: AttentionImpl::default(), device: device.clone() })
    }

    /// GPT-2 weights (`transformer.*`, Conv1D layers stored [in, out] as they are used).
    fn gpt2_from_weights(w: LoadedWeights, device: &Device) -> Result<Self> {
        let LoadedWeights { config: c, mut tensors, quant, format } = w;
        if let Some(k) = quant.keys().next() {
            bail!(Unsupported, "{k}: a GPT-2 GGUF with quantized tensors (load GPT-2 from safetensors)");
        }
        let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        // The attention-mask buffers of older checkpoints, and the tied LM head.
        tensors.retain(|k, _| !(k.ends_with(".attn.bias") && !k.contains("c_attn")) && !k.ends_with(".attn.masked_bias") && k != "lm_head.weight");
        let t = &mut tensors;
        let up = |t: &mut BTreeMap<String, HostTensor>, name: &str, shape: &[usize]| -> Result<Tensor<1>> { upload(&take(t, name, shape)?, device) };
        let conv = |t: &mut BTreeMap<String, HostTensor>, name: &str, inp: usize, out: usize| -> Result<Linear> {
            // Conv1D weights are [in, out]: as used when dense, transposed to quantize.
            let w = take(t, &format!("{name}.weight"), &[inp, out])?;
            let weight = match format {
                BaseFormat::To(f) => Weight::Quant(QuantWeight::upload(&QuantHost::quantize(f, out, inp, &w.transposed().data)?, device)?),
                _ => dense(&w, format, device)?,
            };
            Ok(Linear { weight, bias: Some(upload(&take(t, &format!("{name}.bias"), &[out])?, device)?) })
        };
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("transformer.h.{l}");
            let linears = BTreeMap::from([
                (Proj::Qkv, conv(t, &format!("{p}.attn.c_attn"), h, 3 * h)?),
                (Proj::O, conv(t, &format!("{p}.attn.c_proj"), h, h)?),
                (Proj::Up, conv(t, &format!("{p}.mlp.c_fc"), h, i)?),
                (Proj::Down, conv(t, &format!("{p}.mlp.c_proj"), i, h)?),
            ]);
            blocks.push(Block {
                input_norm: up(t, &format!("{p}.ln_1.weight"), &[h])?,
                input_norm_bias: Some(up(t, &format!("{p}.ln_1.bias"), &[h])?),
                post_attn_norm: up(t, &format!("{p}.ln_2.weight"), &[h])?,
                post_attn_norm_bias: Some(up(t, &format!("{p}.ln_2.bias"), &[h])?),
                linears,
            });
        }
        let embed = table(t, &mut BTreeMap::new(), format, "transformer.wte.weight", v, h, device)?;
        let positions = Some(upload(&take(t, "transformer.wpe.weight", &[c.max_position_embeddings, h])?, device)?);
        let norm = up(t, "transformer.ln_f.weight", &[h])?;
        let norm_bias = Some(up(t, "transformer.ln_f.bias", &[h])?);
        if let Some(k) = tensors.keys().next() {
            bail!(Unsupported, "unexpected tensor {k} ({} unused): not a plain GPT-2 checkpoint", tensors.len());
        }
        let hd = c.head_dim;
        let empty = || floats(vec![], [0, hd], device);
        Ok(Llama {
            config: c,
            embed,
            positions,
            blocks,
            norm,
            norm_bias,
            lm_head: None,
            inv_freq: Vec::new(),
            rope_cache: (empty(), empty()),
            attention: AttentionImpl::default(),
            device: device.clone(),
        })
    }

    /// The architecture's module naming.
    pub fn family(&self) -> Family {
        if self.config.is_gpt2() { Family::Gpt2 } else { Family::Llama }
    }

    /// RMSNorm with the frozen weight `w` (or the adapter's replacement for `site`); with a
    /// bias, LayerNorm (GPT-2).
    fn rms_norm(&self, x: Tensor<2>, w: &Tensor<1>, bias: Option<&Tensor<1>>, site: Norm, adapter: &dyn Adapter) -> Tensor<2> {
        let eps = self.config.rms_norm_eps;
        let x = match bias {
            Some(_) => {
                let centered = x.clone() - x.mean_dim(1);
                let var = centered.clone().square().mean_dim(1);
                centered * (var + eps).sqrt().recip()
            }
            None => {
                let var = x.clone().square().mean_dim(1);
                x * (var + eps).sqrt().recip()
            }
        };
        let x = match adapter.norm_weight(site) {
            Some(w) => x * w,
            None => x * w.clone().unsqueeze(),
        };
        match bias {
            Some(b) => x + b.clone().unsqueeze(),
            None => x,
        }
    }

    /// cos/sin tables for positions `start..start+t`, [1, 1, t, head_dim]: a slice of the
    /// cached table, or (past it) computed on the host.
    fn rope_tables(&self, start: usize, t: usize) -> (Tensor<4>, Tensor<4>) {
        let d = self.config.head_dim;
        let (cc, sc) = &self.rope_cache;
        if start + t <= cc.dims()[0] {
            return (cc.clone().narrow(0, start, t).reshape([1, 1, t, d]), sc.clone().narrow(0, start, t).reshape([1, 1, t, d]));
        }
        let (cos, sin) = rope_host(&self.inv_freq, start, t);
        (floats(cos, [1, 1, t, d], &self.device), floats(sin, [1, 1, t, d], &self.device))
    }

    fn rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
        let d = x.dims()[3];
        let x1 = x.clone().narrow(3, 0, d / 2);
        let x2 = x.clone().narrow(3, d / 2, d / 2);
        let rot = Tensor::cat(vec![x2.neg(), x1], 3);
        x * cos.clone() + rot * sin.clone()
    }

    /// The attention that runs: the one asked for (`attention`) where this model's device and
    /// head size allow it, else the reference.
    pub fn runs_attention(&self) -> AttentionImpl {
        attention::runs(self.attention, self.config.head_dim, &self.device)
    }

    /// Hidden states after the final norm for the real (non-virtual) positions, [B*T, hidden].
    ///
    /// `attention_mask` covers the real tokens of this call (and, with a cache, the earlier
    /// ones). Virtual tokens from the adapter's `prefix()` are put first on the first pass
    /// (empty cache); they are always attended to and sit at positions 0..n, as in peft.
    pub fn hidden(&self, inp: &Inputs, adapter: &dyn Adapter, cache: Option<&mut KvCache>) -> Result<Tensor<2>> {
        let [b, t] = inp.ids.dims();
        let (h, n) = self.hidden_all(inp, adapter, cache)?;
        Ok(if n > 0 {
            let hs = self.config.hidden_size;
            h.reshape([b, n + t, hs]).narrow(1, n, t).reshape([b * t, hs])
        } else {
            h
        })
    }

    /// Hidden states of all positions, virtual tokens first: ([B*(n+T), hidden], n).
    pub fn hidden_all(&self, inp: &Inputs, adapter: &dyn Adapter, cache: Option<&mut KvCache>) -> Result<(Tensor<2>, usize)> {
        self.pass(inp, adapter, cache, Segment::all(self.blocks.len()))
    }

    /// Run one segment of the forward pass (gradient checkpointing runs them one by one):
    /// from the embeddings or from a block's input, through blocks `..to`, optionally with the
    /// final norm. Gives (hidden [B*(n+T), hidden], n), n the virtual tokens in front.
    pub fn pass(&self, inp: &Inputs, adapter: &dyn Adapter, cache: Option<&mut KvCache>, mut seg: Segment<'_>) -> Result<(Tensor<2>, usize)> {
        let c = &self.config;
        let [b, t] = inp.ids.dims();
        if t == 0 {
            bail!(Shape, "empty input");
        }
        // Prefix tuning: its keys/values pre-fill the cache (a local one when none is given).
        let mut local = KvCache::default();
        let mut cache: Option<&mut KvCache> = cache;
        let pkv = if cache.as_ref().is_none_or(|k| k.len == 0) { adapter.prefix_kv() } else { None };
        if let Some(kvs) = pkv {
            if kvs.len() != self.blocks.len() {
                bail!(Shape, "prefix has {} layers, the model {}", kvs.len(), self.blocks.len());
            }
            let kc = match cache {
                Some(k) => k,
                None => &mut local,
            };
            let n = kvs[0].0.dims()[2];
            kc.layers = kvs.into_iter().map(|(k, v)| Some((k.repeat_dim(0, b), v.repeat_dim(0, b)))).collect();
            kc.len = n;
            kc.virtual_len = n;
            cache = Some(kc);
        }
        let past = cache.as_ref().map_or(0, |k| k.len);
        let prefix = if past == 0 { adapter.prefix() } else { None };
        let n = prefix.as_ref().map_or(0, |p| p.dims()[0]);
        let real_past = cache.as_ref().map_or(0, |k| k.len - k.virtual_len);
        let mask = match &inp.attention_mask {
            Some(m) if m.len() != b * (real_past + t) => bail!(Shape, "attention_mask has {} values, expected {}x{}", m.len(), b, real_past + t),
            Some(m) => {
                // Keys: [virtual tokens of earlier passes or this one][real tokens].
                let virt = n + cache.as_ref().map_or(0, |k| k.virtual_len);
                let row = real_past + t;
                Some((0..b).flat_map(|bi| std::iter::repeat_n(1, virt).chain(m[bi * row..(bi + 1) * row].iter().copied())).collect::<Vec<i64>>())
            }
            None => None,
        };
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let t_all = n + t;
        let (first, mut x) = match seg.from.take() {
            Some((l, x)) => {
                if x.dims() != [b * t_all, c.hidden_size] {
                    bail!(Shape, "block {l} input is {:?}, expected [{}, {}]", x.dims(), b * t_all, c.hidden_size);
                }
                (l, x)
            }
            None => (0, self.embed_input(inp, adapter, prefix, past)?),
        };
        // RoPE tables, unless the positions are learned (GPT-2).
        let rope = self.positions.is_none().then(|| self.rope_tables(past, t_all));
        let mask = Mask { batch: b, t: t_all, past, keys: mask }.prepare(self.attention, nh, hd, &self.device);
        let scale = 1.0 / (hd as f64).sqrt();
        if let Some(k) = cache.as_deref_mut()
            && k.layers.len() != self.blocks.len()
        {
            k.layers = vec![None; self.blocks.len()];
        }
        let family = self.family();
        for (l, blk) in self.blocks.iter().enumerate().take(seg.to).skip(first) {
            if let Some(f) = seg.before_block.as_mut() {
                f(l, &x);
            }
            let lin = |p: Proj, x: &Tensor<2>| {
                let site = Site { layer: l, proj: p, family };
                let x = adapter.linear_input(site, x.clone());
                let y = blk.linear(p).forward_with(&x, adapter.linear_weight(site), adapter.linear_bias(site));
                adapter.linear_output(site, &x, y)
            };
            let t = t_all;
            let hx = self.rms_norm(x.clone(), &blk.input_norm, blk.input_norm_bias.as_ref(), Norm::Input(l), adapter);
            let (q, k, v) = if blk.linears.contains_key(&Proj::Qkv) {
                let qkv = lin(Proj::Qkv, &hx);
                let (qd, kvd) = (nh * hd, nkv * hd);
                (qkv.clone().narrow(1, 0, qd), qkv.clone().narrow(1, qd, kvd), qkv.narrow(1, qd + kvd, kvd))
            } else {
                (lin(Proj::Q, &hx), lin(Proj::K, &hx), lin(Proj::V, &hx))
            };
            let q = q.reshape([b, t, nh, hd]).swap_dims(1, 2);
            let k = k.reshape([b, t, nkv, hd]).swap_dims(1, 2);
            let mut v = v.reshape([b, t, nkv, hd]).swap_dims(1, 2);
            let (q, mut k) = match &rope {
                Some((cos, sin)) => (Self::rope(q, cos, sin), Self::rope(k, cos, sin)),
                None => (q, k),
            };
            if let Some(kc) = cache.as_deref_mut() {
                if let Some((pk, pv)) = kc.layers[l].take() {
                    k = Tensor::cat(vec![pk, k], 2);
                    v = Tensor::cat(vec![pv, v], 2);
                }
                kc.layers[l] = Some((k.clone(), v.clone()));
            }
            let att = attention(q, k, v, &mask, scale);
            let att = att.swap_dims(1, 2).reshape([b * t, nh * hd]);
            let a = lin(Proj::O, &att);
            x = x + adapter.sublayer_output(l, Sublayer::Attention, &hx, a);
            let hx = self.rms_norm(x.clone(), &blk.post_attn_norm, blk.post_attn_norm_bias.as_ref(), Norm::PostAttention(l), adapter);
            let inner = if blk.linears.contains_key(&Proj::Gate) { silu(lin(Proj::Gate, &hx)) * lin(Proj::Up, &hx) } else { gelu_tanh(lin(Proj::Up, &hx)) };
            let m = lin(Proj::Down, &inner);
            x = x + adapter.sublayer_output(l, Sublayer::Mlp, &hx, m);
        }
        if let Some(k) = cache {
            k.len += t_all;
            k.virtual_len += n;
        }
        if !seg.final_norm {
            return Ok((x, n));
        }
        Ok((self.rms_norm(x, &self.norm, self.norm_bias.as_ref(), Norm::Final, adapter), n))
    }

    /// The first block's input [B*(n+T), hidden]: token embeddings (the adapter's, when it
    /// trains them), the adapter's virtual tokens in front, learned positions (GPT-2).
    fn embed_input(&self, inp: &Inputs, adapter: &dyn Adapter, prefix: Option<Tensor<2>>, past: usize) -> Result<Tensor<2>> {
        let c = &self.config;
        let [b, t] = inp.ids.dims();
        let ids = inp.ids.clone().reshape([b * t]);
        let x = match adapter.embedding() {
            Some(e) => self.freeze_pad_row(e).select(0, ids.clone()),
            None => self.embed.rows(ids.clone()),
        };
        let mut x = adapter.embed_output(&ids, x);
        let n = prefix.as_ref().map_or(0, |p| p.dims()[0]);
        let t_all = n + t;
        if let Some(p) = prefix {
            let h = c.hidden_size;
            let p: Tensor<3> = p.unsqueeze::<3>().repeat_dim(0, b);
            x = Tensor::cat(vec![p, x.reshape([b, t, h])], 1).reshape([b * t_all, h]);
        }
        // Learned positions (GPT-2): positions past..past+t_all, as the RoPE tables.
        if let Some(wpe) = &self.positions {
            if past + t_all > c.max_position_embeddings {
                bail!(Data, "{} positions is more than the model's {} (n_positions): shorten the input", past + t_all, c.max_position_embeddings);
            }
            let h = c.hidden_size;
            let pos: Tensor<3> = wpe.clone().narrow(0, past, t_all).unsqueeze::<3>();
            x = (x.reshape([b, t_all, h]) + pos).reshape([b * t_all, h]);
        }
        Ok(x)
    }

    /// Project hidden states [N, hidden] to logits [N, vocab] (with the adapter's trainable
    /// LM head or embeddings, when it has them).
    pub fn logits_of(&self, h: Tensor<2>, adapter: &dyn Adapter) -> Tensor<2> {
        if let Some(w) = adapter.lm_head() {
            return crate::matmul::matmul(h, w);
        }
        match (&self.lm_head, adapter.embedding()) {
            (Some(w), _) => w.forward(&h),
            (None, Some(e)) => crate::matmul::matmul(h, e.transpose()),
            (None, None) => self.embed.logits(h),
        }
    }

    /// Logits [B, T, vocab].
    pub fn forward(&self, inp: &Inputs, adapter: &dyn Adapter, cache: Option<&mut KvCache>) -> Result<Tensor<3>> {
        let [b, t] = inp.ids.dims();
        let h = self.hidden(inp, adapter, cache)?;
        Ok(self.logits_of(h, adapter).reshape([b, t, self.config.vocab_size]))
    }

    /// All linear sites of the model.
    pub fn sites(&self) -> Vec<Site> {
        let family = self.family();
        self.blocks.iter().enumerate().flat_map(|(layer, b)| b.linears.keys().map(move |&proj| Site { layer, proj, family })).collect()
    }

    /// `table` [vocab, d] with the padding row cut out of the autodiff graph, as torch's
    /// `nn.Embedding(padding_idx=...)` gives that row no gradient.
    pub fn freeze_pad_row(&self, table: Tensor<2>) -> Tensor<2> {
        crate::tensor::freeze_row(table, self.config.pad_token_id.map(|p| p as usize))
    }

    /// The linear layers' storage formats, e.g. "q4_1", "f32", "f16", or "q4_1+q8_0" for a mix.
    pub fn base_formats(&self) -> String {
        let formats: std::collections::BTreeSet<&str> = self.sites().into_iter().map(|x| self.linear(x).weight.format_name()).collect();
        formats.into_iter().collect::<Vec<_>>().join("+")
    }

    /// Replace every quantized or f16 weight by its f32 values (on the device): the
    /// "dequantize, then f32" reference a quantized or f16 base is compared with.
    pub fn dequantize_all(&mut self) {
        for b in &mut self.blocks {
            for l in b.linears.values_mut() {
                l.weight = Weight::Dense(l.weight.dense());
            }
        }
        if let Some(h) = &mut self.lm_head {
            h.weight = Weight::Dense(h.weight.dense());
        }
        self.embed = Embedding::Dense(self.embed.dense());
    }

    /// Whether any weight matrix is held in f16 (training then scales the loss).
    pub fn has_half_weights(&self) -> bool {
        matches!(self.embed, Embedding::Half(_)) || self.lm_head.iter().chain(self.blocks.iter().flat_map(|b| b.linears.values())).any(|l| matches!(l.weight, Weight::Half(_)))
    }

    /// All normalisation layers, with their frozen weights.
    pub fn norms(&self) -> Vec<(Norm, &Tensor<1>)> {
        let mut v: Vec<(Norm, &Tensor<1>)> = Vec::new();
        for (l, b) in self.blocks.iter().enumerate() {
            v.push((Norm::Input(l), &b.input_norm));
            v.push((Norm::PostAttention(l), &b.post_attn_norm));
        }
        v.push((Norm::Final, &self.norm));
        v
    }

    pub fn linear(&self, s: Site) -> &Linear {
        self.blocks[s.layer].linear(s.proj)
    }

    pub fn linear_mut(&mut self, s: Site) -> &mut Linear {
        self.blocks[s.layer].linear_mut(s.proj)
    }

    /// What the frozen base holds on the device (f32 tensors, or codes + scales for the
    /// weights kept quantized), and its largest single tensor.
    pub fn base_memory(&self) -> crate::train::memory::BaseMemory {
        let t = |x: &Tensor<1>| 4 * x.dims()[0] as u64;
        let opt = |x: &Option<Tensor<1>>| x.as_ref().map_or(0, t);
        let lin = |l: &Linear| l.weight.device_bytes() as u64 + opt(&l.bias);
        let mut bytes = self.embed.device_bytes() as u64 + self.lm_head.as_ref().map_or(0, lin) + t(&self.norm) + opt(&self.norm_bias);
        bytes += self.positions.as_ref().map_or(0, |p| 4 * p.dims().iter().product::<usize>() as u64);
        let mut largest = self.embed.device_bytes() as u64;
        for b in &self.blocks {
            bytes += t(&b.input_norm) + t(&b.post_attn_norm) + opt(&b.input_norm_bias) + opt(&b.post_attn_norm_bias);
            for l in b.linears.values() {
                bytes += lin(l);
                largest = largest.max(l.weight.device_bytes() as u64);
            }
        }
        crate::train::memory::BaseMemory { bytes, largest }
    }

    pub fn num_parameters(&self) -> usize {
        let c = &self.config;
        let per = self.blocks.first().map_or(0, |b| {
            b.linears.values().map(|l| l.in_features() * l.out_features() + l.bias.as_ref().map_or(0, |x| x.dims()[0])).sum::<usize>()
                + 2 * c.hidden_size * if b.input_norm_bias.is_some() { 2 } else { 1 }
        });
        let positions = self.positions.as_ref().map_or(0, |p| p.dims().iter().product());
        c.vocab_size * c.hidden_size * if self.lm_head.is_some() { 2 } else { 1 } + per * self.blocks.len() + c.hidden_size * if self.norm_bias.is_some() { 2 } else { 1 } + positions
    }
}
