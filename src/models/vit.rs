//! The Vision Transformer (`model_type: "vit"`, as `ViTForImageClassification`): a patch
//! embedding (a Conv2d with stride = kernel, computed as a linear layer over flattened
//! patches), a `[CLS]` token and learned positions, pre-LayerNorm blocks with exact GELU, a
//! final LayerNorm; the classifier reads the `[CLS]` state. Checkpoints carry the classic key
//! names (`vit.encoder.layer.N.attention.attention.query`); adapters use transformers 5's
//! module names (`vit.layers.N.attention.q_proj`, `mlp.fc1`), which peft's keys follow.
//! Images come as pixel values [C, H, W] after the model's preprocessing ([`Preprocess`]).

use std::collections::BTreeMap;

use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{Device, Tensor};
use serde::Deserialize;
use serde_json::Value as Json;

use crate::error::{Result, bail, err};
use crate::io::safetensors::{HostTensor, take};
use crate::matmul::matmul;
use crate::models::Base;
use crate::models::bert::LayerNorm;
use crate::models::hooks::{Adapter, Family, Norm, Proj, Site, Tunable};
use crate::models::linear::Linear;
use crate::tensor::{floats, upload};

/// A ViT block's projections: q, k, v, o (attention), up = `mlp.fc1`, down = `mlp.fc2`.
pub const PROJS: [Proj; 6] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Up, Proj::Down];

#[derive(Debug, Clone, PartialEq)]
pub struct VitConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub layer_norm_eps: f64,
    pub labels: Vec<String>,
}

#[derive(Deserialize)]
struct RawVit {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    image_size: Option<usize>,
    patch_size: Option<usize>,
    num_channels: Option<usize>,
    layer_norm_eps: Option<f64>,
    hidden_act: Option<String>,
    qkv_bias: Option<bool>,
}

impl VitConfig {
    pub fn is_vit(config_json: &str) -> bool {
        serde_json::from_str::<Json>(config_json).ok().and_then(|v| v.get("model_type").and_then(Json::as_str).map(|t| t == "vit")).unwrap_or(false)
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawVit = serde_json::from_str(text).map_err(|e| err!(Config, "config.json: {e}"))?;
        if !Self::is_vit(text) {
            bail!(Unsupported, "config.json: not a ViT (model_type vit)");
        }
        if let Some(act) = raw.hidden_act.as_deref().filter(|a| *a != "gelu") {
            bail!(Unsupported, "config.json: hidden_act {act:?} (ViT: only gelu)");
        }
        if raw.qkv_bias == Some(false) {
            bail!(Unsupported, "config.json: qkv_bias = false");
        }
        let c = VitConfig {
            hidden_size: raw.hidden_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            intermediate_size: raw.intermediate_size,
            image_size: raw.image_size.unwrap_or(224),
            patch_size: raw.patch_size.unwrap_or(16),
            num_channels: raw.num_channels.unwrap_or(3),
            layer_norm_eps: raw.layer_norm_eps.unwrap_or(1e-12),
            labels: crate::models::config::id2label(text)?,
        };
        let sizes = [
            ("hidden_size", c.hidden_size, 1 << 20),
            ("intermediate_size", c.intermediate_size, 1 << 20),
            ("num_hidden_layers", c.num_hidden_layers, 1024),
            ("num_attention_heads", c.num_attention_heads, 4096),
            ("image_size", c.image_size, 1 << 14),
            ("patch_size", c.patch_size, 1 << 10),
            ("num_channels", c.num_channels, 16),
        ];
        for (name, v, max) in sizes {
            if v == 0 || v > max {
                bail!(Config, "config.json: {name} = {v} is outside 1..={max}");
            }
        }
        if c.hidden_size % c.num_attention_heads != 0 || c.image_size % c.patch_size != 0 {
            bail!(Config, "config.json: hidden_size must divide by num_attention_heads and image_size by patch_size");
        }
        Ok(c)
    }

    /// Patches per image.
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// Values per image (C x H x W).
    pub fn pixels_per_image(&self) -> usize {
        self.num_channels * self.image_size * self.image_size
    }
}

/// The image preprocessing of `preprocessor_config.json` (ViTImageProcessor): resize to the
/// model's size (bilinear), scale by `rescale_factor` (1/255), normalise per channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    pub height: usize,
    pub width: usize,
    pub do_resize: bool,
    pub rescale: Option<f64>,
    pub normalize: Option<([f64; 3], [f64; 3])>,
}

impl Preprocess {
    /// From `preprocessor_config.json`, or ViT's defaults (the model's size, 1/255, mean = std = 0.5).
    pub fn from_json(text: Option<&str>, c: &VitConfig) -> Result<Self> {
        let v: Json = match text {
            Some(t) => serde_json::from_str(t).map_err(|e| err!(Parse, "preprocessor_config.json: {e}"))?,
            None => Json::Null,
        };
        let flag = |k: &str| v.get(k).and_then(Json::as_bool).unwrap_or(true);
        let three = |k: &str| -> Result<[f64; 3]> {
            match v.get(k) {
                None => Ok([0.5; 3]),
                Some(Json::Array(a)) if a.len() == 3 => Ok([0, 1, 2].map(|i| a[i].as_f64().unwrap_or(0.5))),
                Some(other) => bail!(Config, "preprocessor_config.json: {k} = {other} (expected three numbers)"),
            }
        };
        let size = |k: &str| v.get("size").and_then(|s| s.get(k)).and_then(Json::as_u64).map_or(c.image_size, |x| x as usize);
        let (height, width) = (size("height"), size("width"));
        if height != c.image_size || width != c.image_size {
            bail!(Unsupported, "preprocessor_config.json: size {height}x{width} differs from the model's image_size {}", c.image_size);
        }
        if v.get("resample").and_then(Json::as_u64).is_some_and(|r| r != 2) {
            bail!(Unsupported, "preprocessor_config.json: resample other than bilinear (2)");
        }
        let std = three("image_std")?;
        if std.iter().any(|s| *s == 0.0) {
            bail!(Config, "preprocessor_config.json: image_std has a zero");
        }
        Ok(Preprocess {
            height,
            width,
            do_resize: flag("do_resize"),
            rescale: flag("do_rescale").then(|| v.get("rescale_factor").and_then(Json::as_f64).unwrap_or(1.0 / 255.0)),
            normalize: if flag("do_normalize") { Some((three("image_mean")?, std)) } else { None },
        })
    }

    /// Pixel values [3, H, W] of an RGB image (8 bits per channel, row-major `width x height`).
    pub fn apply(&self, rgb: &[u8], width: usize, height: usize) -> Result<Vec<f32>> {
        if width == 0 || height == 0 || rgb.len() != width * height * 3 {
            bail!(Data, "image: {} bytes for {width}x{height} RGB", rgb.len());
        }
        let (w, h) = (self.width, self.height);
        let pixels: Vec<u8> = if (width, height) == (w, h) {
            rgb.to_vec()
        } else if self.do_resize {
            let img = image::RgbImage::from_raw(width as u32, height as u32, rgb.to_vec()).ok_or_else(|| err!(Data, "image: bad size"))?;
            image::imageops::resize(&img, w as u32, h as u32, image::imageops::FilterType::Triangle).into_raw()
        } else {
            bail!(Data, "image is {width}x{height}, the model takes {w}x{h} (and the preprocessor does not resize)");
        };
        let mut out = vec![0f32; 3 * w * h];
        for (i, px) in pixels.chunks_exact(3).enumerate() {
            for c in 0..3 {
                let mut v = px[c] as f64;
                if let Some(r) = self.rescale {
                    v *= r;
                }
                if let Some((mean, std)) = &self.normalize {
                    v = (v - mean[c]) / std[c];
                }
                out[c * w * h + i] = v as f32;
            }
        }
        Ok(out)
    }

    /// Decode an image file (PNG or JPEG) and preprocess it.
    pub fn decode(&self, bytes: &[u8]) -> Result<Vec<f32>> {
        let img = image::load_from_memory(bytes).map_err(|e| err!(Format, "image: {e}"))?.to_rgb8();
        let (w, h) = img.dimensions();
        self.apply(img.as_raw(), w as usize, h as usize)
    }
}

#[derive(Clone)]
pub struct VitLayer {
    pub norm_before: LayerNorm,
    pub norm_after: LayerNorm,
    pub linears: BTreeMap<Proj, Linear>,
}

pub struct Vit {
    pub config: VitConfig,
    /// The patch embedding as a linear layer over flattened patches [C*P*P, hidden].
    pub patch: Linear,
    /// [1, hidden]
    pub cls: Tensor<2>,
    /// [1 + patches, hidden]
    pub positions: Tensor<2>,
    pub layers: Vec<VitLayer>,
    pub norm: LayerNorm,
    /// The checkpoint's classifier (`classifier.weight` [labels, hidden], bias), as host tensors.
    pub classifier: Option<(HostTensor, HostTensor)>,
    pub device: Device,
}

impl Vit {
    /// Upload weights named as `ViTForImageClassification` saves them (`vit.` prefix optional).
    pub fn from_weights(config: VitConfig, tensors: BTreeMap<String, HostTensor>, device: &Device) -> Result<Self> {
        let c = &config;
        let mut t: BTreeMap<String, HostTensor> = tensors.into_iter().map(|(k, v)| (k.strip_prefix("vit.").map(str::to_string).unwrap_or(k), v)).collect();
        t.retain(|k, _| !k.starts_with("pooler."));
        let (h, i, ch, p) = (c.hidden_size, c.intermediate_size, c.num_channels, c.patch_size);
        let n = c.num_patches();
        let t = &mut t;
        let lin = |t: &mut BTreeMap<String, HostTensor>, name: &str, inp: usize, out: usize| -> Result<Linear> {
            let w = take(t, &format!("{name}.weight"), &[out, inp])?;
            Ok(Linear::dense(upload(&w.transposed(), device)?, Some(upload(&take(t, &format!("{name}.bias"), &[out])?, device)?)))
        };
        let norm = |t: &mut BTreeMap<String, HostTensor>, name: &str| -> Result<LayerNorm> {
            Ok(LayerNorm { weight: upload(&take(t, &format!("{name}.weight"), &[h])?, device)?, bias: upload(&take(t, &format!("{name}.bias"), &[h])?, device)? })
        };
        // Conv2d [hidden, C, P, P] as [hidden, C*P*P]: the patch features run (c, y, x).
        let w = take(t, "embeddings.patch_embeddings.projection.weight", &[h, ch, p, p])?;
        let w = HostTensor::new(vec![h, ch * p * p], w.data);
        let patch = Linear::dense(upload(&w.transposed(), device)?, Some(upload(&take(t, "embeddings.patch_embeddings.projection.bias", &[h])?, device)?));
        let cls = take(t, "embeddings.cls_token", &[1, 1, h])?;
        let cls = upload(&HostTensor::new(vec![1, h], cls.data), device)?;
        let pos = take(t, "embeddings.position_embeddings", &[1, 1 + n, h])?;
        let positions = upload(&HostTensor::new(vec![1 + n, h], pos.data), device)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let pre = format!("encoder.layer.{l}");
            let dims = [
                (Proj::Q, "attention.attention.query", h, h),
                (Proj::K, "attention.attention.key", h, h),
                (Proj::V, "attention.attention.value", h, h),
                (Proj::O, "attention.output.dense", h, h),
                (Proj::Up, "intermediate.dense", h, i),
                (Proj::Down, "output.dense", i, h),
            ];
            let mut linears = BTreeMap::new();
            for (proj, name, inp, out) in dims {
                linears.insert(proj, lin(t, &format!("{pre}.{name}"), inp, out)?);
            }
            layers.push(VitLayer { norm_before: norm(t, &format!("{pre}.layernorm_before"))?, norm_after: norm(t, &format!("{pre}.layernorm_after"))?, linears });
        }
        let final_norm = norm(t, "layernorm")?;
        let classifier = match (t.remove("classifier.weight"), t.remove("classifier.bias")) {
            (Some(w), Some(b)) if w.shape.len() == 2 && w.shape[1] == h && b.shape == [w.shape[0]] => Some((w, b)),
            (None, None) => None,
            _ => bail!(Shape, "classifier.weight / classifier.bias: expected [labels, {h}] and [labels]"),
        };
        if let Some(k) = t.keys().next() {
            bail!(Unsupported, "unexpected tensor {k} ({} unused): not a plain ViT checkpoint", t.len());
        }
        Ok(Vit { config, patch, cls, positions, layers, norm: final_norm, classifier, device: device.clone() })
    }

    /// Flattened patches [B * patches, C*P*P] of pixel values [B, C, H, W] (row-major).
    fn patches(&self, pixels: &[f32], b: usize) -> Result<Tensor<2>> {
        let c = &self.config;
        let (ch, s, p) = (c.num_channels, c.image_size, c.patch_size);
        if pixels.len() != b * c.pixels_per_image() {
            bail!(Shape, "{} pixel values for {b} images of {ch}x{s}x{s}", pixels.len());
        }
        let g = s / p;
        let f = ch * p * p;
        let mut out = vec![0f32; b * g * g * f];
        for img in 0..b {
            for py in 0..g {
                for px in 0..g {
                    let row = ((img * g + py) * g + px) * f;
                    for cc in 0..ch {
                        for y in 0..p {
                            for x in 0..p {
                                out[row + (cc * p + y) * p + x] = pixels[((img * ch + cc) * s + py * p + y) * s + px * p + x];
                            }
                        }
                    }
                }
            }
        }
        Ok(floats(out, [b * g * g, f], &self.device))
    }

    /// The final hidden states [B * (1 + patches), hidden] of `b` images.
    pub fn hidden(&self, pixels: &[f32], b: usize, adapter: &dyn Adapter) -> Result<Tensor<2>> {
        let c = &self.config;
        let (h, nh) = (c.hidden_size, c.num_attention_heads);
        let (hd, t) = (h / nh, 1 + c.num_patches());
        let eps = c.layer_norm_eps;
        let x = self.patch.forward_with(&self.patches(pixels, b)?, None, adapter.tunable(Tunable::PatchBias)).reshape([b, t - 1, h]);
        let cls: Tensor<3> = self.cls.clone().unsqueeze::<3>().repeat_dim(0, b);
        let x = Tensor::cat(vec![cls, x], 1) + self.positions.clone().unsqueeze::<3>();
        let mut x = x.reshape([b * t, h]);
        let scale = 1.0 / (hd as f64).sqrt();
        for (l, layer) in self.layers.iter().enumerate() {
            let lin = |p: Proj, x: &Tensor<2>| {
                let site = Site { layer: l, proj: p, family: Family::Vit };
                let x = adapter.linear_input(site, x.clone());
                let y = layer.linears[&p].forward_with(&x, adapter.linear_weight(site), adapter.linear_bias(site));
                adapter.linear_output(site, &x, y)
            };
            let heads = |y: Tensor<2>| y.reshape([b, t, nh, hd]).swap_dims(1, 2);
            let hx = layer.norm_before.forward_with(x.clone(), eps, Norm::Input(l), adapter);
            let (q, k, v) = (heads(lin(Proj::Q, &hx)), heads(lin(Proj::K, &hx)), heads(lin(Proj::V, &hx)));
            let ctx = matmul(softmax(matmul(q, k.swap_dims(2, 3)).mul_scalar(scale), 3), v).swap_dims(1, 2).reshape([b * t, h]);
            x = x + lin(Proj::O, &ctx);
            let hx = layer.norm_after.forward_with(x.clone(), eps, Norm::PostAttention(l), adapter);
            x = x.clone() + lin(Proj::Down, &gelu(lin(Proj::Up, &hx)));
        }
        Ok(self.norm.forward_with(x, eps, Norm::Final, adapter))
    }

    /// The `[CLS]` states [B, hidden] the classifier reads.
    pub fn cls_states(&self, pixels: &[f32], b: usize, adapter: &dyn Adapter) -> Result<Tensor<2>> {
        let (t, h) = (1 + self.config.num_patches(), self.config.hidden_size);
        Ok(self.hidden(pixels, b, adapter)?.reshape([b, t, h]).narrow(1, 0, 1).reshape([b, h]))
    }
}

impl Base for Vit {
    fn sites(&self) -> Vec<Site> {
        (0..self.layers.len()).flat_map(|layer| PROJS.iter().map(move |&proj| Site { layer, proj, family: Family::Vit })).collect()
    }
    fn linear(&self, site: Site) -> &Linear {
        &self.layers[site.layer].linears[&site.proj]
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn tunables(&self) -> Vec<(Tunable, String, Tensor<1>)> {
        let name = |n: Norm| n.module_name_in(Family::Vit);
        let mut v = Vec::new();
        if let Some(b) = &self.patch.bias {
            v.push((Tunable::PatchBias, "vit.embeddings.patch_embeddings.projection.bias".to_string(), b.clone()));
        }
        for (l, layer) in self.layers.iter().enumerate() {
            v.extend(layer.norm_before.tunables(Norm::Input(l), &name(Norm::Input(l))));
            v.extend(layer.norm_after.tunables(Norm::PostAttention(l), &name(Norm::PostAttention(l))));
        }
        v.extend(self.norm.tunables(Norm::Final, &name(Norm::Final)));
        v
    }
}
