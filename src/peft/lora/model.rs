//! A LoRA adapter over a model: which sites it covers, creation with peft's initialisation,
//! and the PEFT file format (`adapter_config.json` + `adapter_model.safetensors`).

use std::collections::{BTreeMap, HashSet};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use burn::tensor::Tensor;

use crate::error::{Result, bail, err};
use crate::io::safetensors::{self as st, HostTensor, OutTensor};
use crate::models::hooks::{Adapter, Site};
use crate::models::llama::Llama;
use crate::peft::{Layout, NamedParam};
use crate::peft::lora::layer::{Dora, weight_norm};
use crate::peft::lora::{InitLora, LoraConfig, LoraLayer};
use crate::peft::targets::{Matcher, Targets};
use crate::tensor::{read, upload};

pub struct LoraAdapter {
    pub config: LoraConfig,
    pub layers: BTreeMap<Site, LoraLayer>,
    /// Dropout is applied only while training.
    pub training: bool,
}

/// peft's key for a tensor of this site, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
pub fn peft_key(site: Site, which: &str) -> String {
    format!("base_model.model.{}.{which}.weight", site.module_name())
}

/// DoRA's magnitude key (peft saves it without `.weight`).
pub fn magnitude_key(site: Site) -> String {
    format!("base_model.model.{}.lora_magnitude_vector", site.module_name())
}

/// DoRA state for a layer: the magnitude (given, or initialised to the current weight norm).
fn dora_for(model: &Llama, site: Site, a: &Tensor<2>, b: &Tensor<2>, scaling: f64, magnitude: Option<Tensor<2>>) -> Dora {
    let lin = model.linear(site);
    let magnitude = magnitude.unwrap_or_else(|| weight_norm(&lin.weight, a, b, scaling));
    Dora { magnitude, base_weight: lin.weight.clone(), base_bias: lin.bias.clone() }
}

/// Box-Muller normal sample.
fn normal(rng: &mut SmallRng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

impl LoraAdapter {
    /// The sites of `model` this config targets, with their (rank, scaling).
    pub fn resolve_sites(config: &LoraConfig, model: &Llama) -> Result<Vec<(Site, usize, f64)>> {
        let m = Matcher::new(config.target_modules.clone(), config.exclude_modules.clone(), config.layers_to_transform.clone(), config.layers_pattern.as_deref())?;
        let embed_hit = config.target_modules != Targets::AllLinear && m.matches("model.embed_tokens", false);
        if m.matches("lm_head", true) || embed_hit {
            bail!(Unsupported, "LoRA on lm_head / embed_tokens is not supported yet");
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
        if sites.is_empty() {
            bail!(Config, "target_modules {:?} matches no linear layer of the model (names look like model.layers.0.self_attn.q_proj)", config.target_modules);
        }
        Ok(sites)
    }

    /// A new adapter initialised as peft does (see [`InitLora`]), deterministic in `seed`.
    pub fn new(config: LoraConfig, model: &Llama, seed: u64) -> Result<Self> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut layers = BTreeMap::new();
        for (site, r, scaling) in Self::resolve_sites(&config, model)? {
            let lin = model.linear(site);
            let (fin, fout) = (lin.in_features(), lin.out_features());
            // kaiming_uniform(a=sqrt(5)) on a [fan_out, fan_in] weight: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
            let uniform = |rng: &mut SmallRng, n: usize, fan_in: usize| -> Vec<f32> {
                let bound = 1.0 / (fan_in as f32).sqrt();
                (0..n).map(|_| rng.random_range(-bound..bound)).collect()
            };
            let a = match config.init_lora_weights {
                InitLora::Gaussian => (0..fin * r).map(|_| normal(&mut rng) / r as f32).collect(),
                _ => uniform(&mut rng, fin * r, fin),
            };
            let b = match config.init_lora_weights {
                InitLora::Off => uniform(&mut rng, r * fout, r),
                _ => vec![0.0; r * fout],
            };
            let a = upload(&HostTensor::new(vec![fin, r], a), &model.device)?;
            let b = upload(&HostTensor::new(vec![r, fout], b), &model.device)?;
            let dora = config.use_dora.then(|| dora_for(model, site, &a, &b, scaling, None));
            layers.insert(site, LoraLayer { a, b, scaling, dropout: config.lora_dropout, dora });
        }
        Ok(LoraAdapter { config, layers, training: false })
    }

    /// Load a peft adapter (`adapter_config.json` text + `adapter_model.safetensors` bytes).
    pub fn from_peft(config_json: &str, weights: &[u8], model: &Llama) -> Result<Self> {
        let config = LoraConfig::from_json(config_json)?;
        let mut tensors = st::read_all_f32(weights).map_err(|e| e.context("adapter_model.safetensors"))?;
        // Tolerate keys that still carry the adapter name (`lora_A.default.weight`).
        tensors = tensors.into_iter().map(|(k, v)| (k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."), v)).collect();
        let mut used = HashSet::new();
        let mut layers = BTreeMap::new();
        for (site, r, scaling) in Self::resolve_sites(&config, model)? {
            let lin = model.linear(site);
            let (fin, fout) = (lin.in_features(), lin.out_features());
            let get = |which: &str, shape: [usize; 2]| -> Result<HostTensor> {
                let k = peft_key(site, which);
                let t = tensors.get(&k).ok_or_else(|| err!(Format, "adapter_model.safetensors: missing {k}"))?;
                if t.shape != shape {
                    bail!(Shape, "adapter_model.safetensors: {k} has shape {:?}, expected {shape:?}", t.shape);
                }
                Ok(t.clone())
            };
            let a = upload(&get("lora_A", [r, fin])?.transposed(), &model.device)?;
            let b = upload(&get("lora_B", [fout, r])?.transposed(), &model.device)?;
            used.insert(peft_key(site, "lora_A"));
            used.insert(peft_key(site, "lora_B"));
            let dora = if config.use_dora {
                let k = magnitude_key(site);
                let t = tensors.get(&k).ok_or_else(|| err!(Format, "adapter_model.safetensors: missing {k} (use_dora = true)"))?;
                if t.shape != [fout] {
                    bail!(Shape, "adapter_model.safetensors: {k} has shape {:?}, expected [{fout}]", t.shape);
                }
                used.insert(k);
                let m = upload(&HostTensor::new(vec![1, fout], t.data.clone()), &model.device)?;
                Some(dora_for(model, site, &a, &b, scaling, Some(m)))
            } else {
                None
            };
            layers.insert(site, LoraLayer { a, b, scaling, dropout: config.lora_dropout, dora });
        }
        if let Some(extra) = tensors.keys().find(|k| !used.contains(*k)) {
            bail!(Format, "adapter_model.safetensors: tensor {extra} does not belong to any targeted module");
        }
        Ok(LoraAdapter { config, layers, training: false })
    }

    /// The two PEFT files: (`adapter_config.json`, `adapter_model.safetensors`).
    pub async fn to_peft(&self) -> Result<(String, Vec<u8>)> {
        let mut out = BTreeMap::new();
        for (site, l) in &self.layers {
            out.insert(peft_key(*site, "lora_A"), OutTensor::F32(read(l.a.clone()).await?.transposed()));
            out.insert(peft_key(*site, "lora_B"), OutTensor::F32(read(l.b.clone()).await?.transposed()));
            if let Some(d) = &l.dora {
                let m = read(d.magnitude.clone()).await?;
                out.insert(magnitude_key(*site), OutTensor::F32(HostTensor::new(vec![m.data.len()], m.data)));
            }
        }
        crate::peft::peft_files(self.config.to_json(), &out)
    }

    /// Trainable tensors with their peft names (A and B of each layer).
    pub fn params_mut(&mut self) -> Vec<NamedParam<'_>> {
        let mut v = Vec::new();
        for (site, l) in self.layers.iter_mut() {
            v.push(NamedParam::new(peft_key(*site, "lora_A"), &mut l.a, Layout::Transposed));
            v.push(NamedParam::new(peft_key(*site, "lora_B"), &mut l.b, Layout::Transposed));
            if let Some(d) = l.dora.as_mut() {
                v.push(NamedParam::new(magnitude_key(*site), &mut d.magnitude, Layout::Row));
            }
        }
        v
    }
}

impl Adapter for LoraAdapter {
    fn linear_output(&self, site: Site, x: &Tensor<2>, y: Tensor<2>) -> Tensor<2> {
        match self.layers.get(&site) {
            Some(l) => l.apply(x, y, self.training),
            None => y,
        }
    }
}
