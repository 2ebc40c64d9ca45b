//! A LoRA adapter over a model: which modules it covers, creation with peft's initialisation,
//! and the PEFT file format (`adapter_config.json` + `adapter_model.safetensors`).
//! Besides LoRA pairs on linear layers it carries, as peft does: DoRA magnitudes, lora_B
//! biases (`lora_bias`), LoRA on the token embeddings (`lora_embedding_A/B`), and trainable
//! copies of the model's biases (`bias` = all / lora_only) and of `modules_to_save`.

use std::collections::BTreeMap;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use burn::tensor::{Int, Tensor};

use crate::error::{Result, bail};
use crate::io::safetensors::HostTensor;
use crate::models::Base;
use crate::models::hooks::{Adapter, Norm, Site};
use crate::peft::lora::layer::{Dora, weight_norm};
use crate::peft::lora::{BiasMode, InitLora, LoraConfig, LoraLayer};
use crate::peft::selective::{SelectiveAdapter, SelectiveConfig};
use crate::peft::targets::{Matcher, Targets};
use crate::peft::{Layout, NamedParam, Trainable, load_all_params};
use crate::tensor::{check_size, upload};

/// LoRA on the token embeddings: `embed(ids) + s * A[ids] B`.
pub struct EmbeddingLora {
    /// [vocab, r] (peft's `lora_embedding_A` [r, vocab], transposed)
    pub a: Tensor<2>,
    /// [r, hidden] (peft's `lora_embedding_B` [hidden, r], transposed)
    pub b: Tensor<2>,
    pub scaling: f64,
    /// The base embedding's padding row (no gradient, as peft's lookup with padding_idx).
    pub pad: Option<usize>,
}

pub struct LoraAdapter {
    pub config: LoraConfig,
    pub layers: BTreeMap<Site, LoraLayer>,
    pub embedding: Option<EmbeddingLora>,
    /// Trainable copies of base tensors (`bias`, `modules_to_save`).
    pub extra: Option<SelectiveAdapter>,
    /// Dropout is applied only while training.
    pub training: bool,
}

/// peft's key for a tensor of this site, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
pub fn peft_key(site: Site, which: &str) -> String {
    format!("base_model.model.{}.{which}", site.module_name())
}

const EMBED: &str = "model.embed_tokens";

/// Box-Muller normal sample.
fn normal(rng: &mut SmallRng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// kaiming_uniform(a=sqrt(5)) on a [fan_out, fan_in] weight: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
fn uniform(rng: &mut SmallRng, n: usize, fan_in: usize) -> Vec<f32> {
    let bound = 1.0 / (fan_in as f32).sqrt();
    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
}

impl LoraAdapter {
    fn matcher(config: &LoraConfig) -> Result<Matcher> {
        Matcher::new(config.target_modules.clone(), config.exclude_modules.clone(), config.layers_to_transform.clone(), config.layers_pattern.as_deref())
    }

    /// The linear sites of `model` this config targets, with their (rank, scaling).
    pub fn resolve_sites(config: &LoraConfig, model: &dyn Base) -> Result<Vec<(Site, usize, f64)>> {
        let m = Self::matcher(config)?;
        if m.matches("lm_head", true) {
            bail!(Unsupported, "LoRA on lm_head is not supported yet (use modules_to_save: [\"lm_head\"] to train it in full)");
        }
        let sites: Vec<_> = model
            .sites()
            .into_iter()
            .filter(|s| m.matches(&s.module_name(), false))
            .map(|s| {
                let (r, sc) = config.rank_and_scaling(&s.module_name());
                (s, r, sc)
            })
            .collect();
        if sites.is_empty() && !Self::targets_embedding(config)? {
            let example = model.sites().first().map(Site::module_name).unwrap_or_default();
            bail!(Config, "target_modules {:?} matches no linear layer of the model (names look like {example})", config.target_modules);
        }
        Ok(sites)
    }

    fn targets_embedding(config: &LoraConfig) -> Result<bool> {
        Ok(config.target_modules != Targets::AllLinear && Self::matcher(config)?.matches(EMBED, false))
    }

    /// The base parameters trained in full: biases (`bias`) and `modules_to_save`.
    fn extra_for(config: &LoraConfig, model: &dyn Base, sites: &[(Site, usize, f64)]) -> Result<Option<SelectiveAdapter>> {
        let modules = &config.modules_to_save;
        if config.bias == BiasMode::None && modules.is_empty() {
            return Ok(None);
        }
        let Some(model) = model.as_llama() else {
            bail!(
                Unsupported,
                "LoRA's bias = \"all\"/\"lora_only\" and modules_to_save {modules:?} are supported on Llama-family models only (not BERT or GPT-2; a classifier head trains in full by itself)"
            );
        };
        let mut names: Vec<String> = Vec::new();
        let has_bias = |s: &Site| model.linear(*s).bias.is_some();
        match config.bias {
            BiasMode::None => {}
            BiasMode::All => names.extend(model.sites().iter().filter(|s| has_bias(s)).map(|s| format!("{}.bias", s.module_name()))),
            BiasMode::LoraOnly => names.extend(sites.iter().filter(|(s, ..)| has_bias(s)).map(|(s, ..)| format!("{}.bias", s.module_name()))),
        }
        for m in modules {
            let full = match m.as_str() {
                "lm_head" if model.lm_head.is_some() => "lm_head.weight".to_string(),
                "lm_head" => bail!(Unsupported, "modules_to_save lm_head on a model with tied embeddings"),
                "embed_tokens" | "model.embed_tokens" => "model.embed_tokens.weight".to_string(),
                other => {
                    let hit = model.norms().into_iter().map(|(n, _)| n.module_name()).find(|n| n == other || n.ends_with(&format!(".{other}")));
                    match hit {
                        Some(n) if !other.contains("layernorm") || n == other => format!("{n}.weight"),
                        _ => bail!(Unsupported, "modules_to_save entry {other:?} (supported: lm_head, embed_tokens, model.norm, or a full norm module name)"),
                    }
                }
            };
            names.push(full);
        }
        if names.is_empty() {
            return Ok(None);
        }
        let parameters = names.iter().map(|n| regex::escape(n)).collect::<Vec<_>>().join("|");
        Ok(Some(SelectiveAdapter::new(SelectiveConfig { parameters, task_type: None, base_model_name_or_path: None }, model)?))
    }

    /// A new adapter initialised as peft does (see [`InitLora`]), deterministic in `seed`.
    pub fn new(mut config: LoraConfig, model: &dyn Base, seed: u64) -> Result<Self> {
        // peft corrects fan_in_fan_out to the layers' kind (with a warning); so do we.
        config.fan_in_fan_out = model.conv1d();
        if config.use_dora && model.conv1d() {
            bail!(Unsupported, "DoRA on Conv1D layers (GPT-2) is not supported yet");
        }
        let mut rng = SmallRng::seed_from_u64(seed);
        let dev = model.device();
        let sites = Self::resolve_sites(&config, model)?;
        let mut layers = BTreeMap::new();
        for &(site, r, scaling) in &sites {
            let lin = model.linear(site);
            let (fin, fout) = (lin.in_features(), lin.out_features());
            check_size("r", &[fin.max(fout), r])?;
            let a = match config.init_lora_weights {
                InitLora::Gaussian => (0..fin * r).map(|_| normal(&mut rng) / r as f32).collect(),
                _ => uniform(&mut rng, fin * r, fin),
            };
            let b = match config.init_lora_weights {
                InitLora::Off => uniform(&mut rng, r * fout, r),
                _ => vec![0.0; r * fout],
            };
            let a = upload(&HostTensor::new(vec![fin, r], a), dev)?;
            let b = upload(&HostTensor::new(vec![r, fout], b), dev)?;
            let dora = config.use_dora.then(|| {
                // DoRA reads the base weight itself: a quantized base gives it a dequantized copy.
                let base = lin.dense_weight();
                Dora { magnitude: weight_norm(&base, &a, &b, scaling), base_weight: base, base_bias: lin.bias.clone() }
            });
            let bias = if config.lora_bias { Some(Tensor::zeros([1, fout], dev)) } else { None };
            layers.insert(site, LoraLayer { a, b, scaling, dropout: config.lora_dropout, dora, bias });
        }
        let embedding = if Self::targets_embedding(&config)? {
            let Some(llama) = model.as_llama() else { bail!(Unsupported, "LoRA on the token embeddings is supported on Llama-family models only (not BERT or GPT-2)") };
            let (r, scaling) = config.rank_and_scaling(EMBED);
            let (v, h) = (llama.config.vocab_size, llama.config.hidden_size);
            check_size("r", &[v.max(h), r])?;
            // peft: A zero, B normal (the reverse of linear layers).
            let b = (0..r * h).map(|_| normal(&mut rng)).collect();
            let pad = llama.config.pad_token_id.map(|p| p as usize);
            Some(EmbeddingLora { a: Tensor::zeros([v, r], dev), b: upload(&HostTensor::new(vec![r, h], b), dev)?, scaling, pad })
        } else {
            None
        };
        let extra = Self::extra_for(&config, model, &sites)?;
        Ok(LoraAdapter { config, layers, embedding, extra, training: false })
    }

    /// Load a peft adapter (`adapter_config.json` text + `adapter_model.safetensors` bytes).
    pub fn from_peft(config_json: &str, weights: &[u8], model: &dyn Base) -> Result<Self> {
        let config = LoraConfig::from_json(config_json)?;
        let tensors = crate::peft::read_weights(weights)?;
        // Tolerate keys that still carry the adapter name (`lora_A.default.weight`).
        // peft also saves the frozen embedding when LoRA targets it (`base_layer.weight`).
        let tensors = tensors.into_iter().filter(|(k, _)| !k.ends_with(".base_layer.weight")).map(|(k, v)| (k.replace(".default.", ".").replace(".default", ""), v)).collect();
        let mut a = Self::new(config, model, 0)?;
        load_all_params(&mut a, &tensors)?;
        Ok(a)
    }

    /// The two PEFT files: (`adapter_config.json`, `adapter_model.safetensors`).
    pub async fn to_peft(&mut self) -> Result<(String, Vec<u8>)> {
        let config = self.config.to_json();
        crate::peft::save_all_params(self, config).await
    }
}

impl Trainable for LoraAdapter {
    /// Every trainable tensor under its peft name.
    fn params_mut(&mut self) -> Vec<NamedParam<'_>> {
        let wrapped: Vec<String> = self.layers.keys().map(|s| format!("base_model.model.{}.bias", s.module_name())).collect();
        let mut v = Vec::new();
        for (site, l) in self.layers.iter_mut() {
            v.push(NamedParam::new(peft_key(*site, "lora_A.weight"), &mut l.a, Layout::Transposed));
            v.push(NamedParam::new(peft_key(*site, "lora_B.weight"), &mut l.b, Layout::Transposed));
            if let Some(b) = l.bias.as_mut() {
                v.push(NamedParam::new(peft_key(*site, "lora_B.bias"), b, Layout::Row));
            }
            if let Some(d) = l.dora.as_mut() {
                v.push(NamedParam::new(peft_key(*site, "lora_magnitude_vector"), &mut d.magnitude, Layout::Row));
            }
        }
        if let Some(e) = self.embedding.as_mut() {
            v.push(NamedParam::new(format!("base_model.model.{EMBED}.lora_embedding_A"), &mut e.a, Layout::Transposed));
            v.push(NamedParam::new(format!("base_model.model.{EMBED}.lora_embedding_B"), &mut e.b, Layout::Transposed));
        }
        if let Some(x) = self.extra.as_mut() {
            // peft names the bias of a layer it wrapped with LoRA `<module>.base_layer.bias`.
            v.extend(x.params_mut().into_iter().map(|mut p| {
                if wrapped.contains(&p.name) {
                    p.name = p.name.replace(".bias", ".base_layer.bias");
                }
                p
            }));
        }
        v
    }

    fn set_training(&mut self, on: bool) {
        self.training = on;
    }
}

impl Adapter for LoraAdapter {
    fn linear_output(&self, site: Site, x: &Tensor<2>, y: Tensor<2>) -> Tensor<2> {
        match self.layers.get(&site) {
            Some(l) => l.apply(x, y, self.training),
            None => y,
        }
    }
    fn embed_output(&self, ids: &Tensor<1, Int>, x: Tensor<2>) -> Tensor<2> {
        match &self.embedding {
            // peft looks A up with the base embedding's padding_idx: no gradient for that row.
            Some(e) => x + crate::matmul::matmul(crate::tensor::freeze_row(e.a.clone(), e.pad).select(0, ids.clone()), e.b.clone()).mul_scalar(e.scaling),
            None => x,
        }
    }
    fn linear_bias(&self, site: Site) -> Option<Tensor<2>> {
        self.extra.as_ref().and_then(|x| x.linear_bias(site))
    }
    fn norm_weight(&self, norm: Norm) -> Option<Tensor<2>> {
        self.extra.as_ref().and_then(|x| x.norm_weight(norm))
    }
    fn embedding(&self) -> Option<Tensor<2>> {
        self.extra.as_ref().and_then(|x| x.embedding())
    }
    fn lm_head(&self) -> Option<Tensor<2>> {
        self.extra.as_ref().and_then(|x| x.lm_head())
    }
}
