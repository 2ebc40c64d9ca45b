//! The virtual-token embeddings and their PEFT file.

use std::collections::BTreeMap;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use burn::tensor::Tensor;

use crate::error::{Result, bail, err};
use crate::io::safetensors::{HostTensor, OutTensor};
use crate::models::hooks::Adapter;
use crate::models::llama::Llama;
use crate::peft::prompt_tuning::{PromptInit, PromptTuningConfig};
use crate::peft::{Layout, NamedParam};
use crate::tensor::{ints, read, upload};
use crate::tokenizer::Tokenizer;

pub const KEY: &str = "prompt_embeddings";

/// The one tensor of a prompt-learning adapter file (prompt, p- and prefix tuning), checked
/// to be `prompt_embeddings` with shape `want`.
pub fn read_prompt_embeddings(weights: &[u8], want: [usize; 2]) -> Result<HostTensor> {
    let mut tensors = crate::peft::read_weights(weights)?;
    let t = tensors.remove(KEY).ok_or_else(|| err!(Format, "adapter_model.safetensors: missing {KEY}"))?;
    if let Some(extra) = tensors.keys().next() {
        bail!(Format, "adapter_model.safetensors: unexpected tensor {extra}");
    }
    if t.shape != want {
        bail!(Shape, "adapter_model.safetensors: {KEY} has shape {:?}, expected {want:?}", t.shape);
    }
    Ok(t)
}

pub struct PromptTuningAdapter {
    pub config: PromptTuningConfig,
    /// [num_virtual_tokens, hidden]
    pub embeddings: Tensor<2>,
    hidden: usize,
    heads: usize,
    layers: usize,
}

fn normal(rng: &mut SmallRng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

impl PromptTuningAdapter {
    fn check(config: &PromptTuningConfig, model: &Llama) -> Result<()> {
        let h = model.config.hidden_size;
        if let Some(d) = config.token_dim
            && d != h
        {
            bail!(Config, "token_dim {d} does not match the model's hidden size {h}");
        }
        crate::tensor::check_size("num_virtual_tokens", &[config.num_virtual_tokens, h])?;
        Ok(())
    }

    fn wrap(config: PromptTuningConfig, embeddings: Tensor<2>, model: &Llama) -> Self {
        let c = &model.config;
        PromptTuningAdapter { config, embeddings, hidden: c.hidden_size, heads: c.num_attention_heads, layers: c.num_hidden_layers }
    }

    /// A new adapter initialised as peft does for `config.init` (deterministic in `seed`).
    pub fn new(config: PromptTuningConfig, model: &Llama, tokenizer: &Tokenizer, seed: u64) -> Result<Self> {
        Self::check(&config, model)?;
        let (n, h, v) = (config.num_virtual_tokens, model.config.hidden_size, model.config.vocab_size);
        let mut rng = SmallRng::seed_from_u64(seed);
        let token_ids = |ids: Vec<i64>| model.embed.rows(ints(ids.clone(), [ids.len()], &model.device));
        let embeddings = match &config.init {
            PromptInit::Random => upload(&HostTensor::new(vec![n, h], (0..n * h).map(|_| normal(&mut rng)).collect()), &model.device)?,
            PromptInit::SampleVocab => token_ids((0..n).map(|_| rng.random_range(0..v as i64)).collect()),
            PromptInit::Text(text) => {
                let ids = tokenizer.encode(text)?;
                if ids.is_empty() {
                    bail!(Config, "prompt_tuning_init_text encodes to no tokens");
                }
                token_ids(ids.iter().cycle().take(n).map(|&i| i as i64).collect())
            }
        };
        Ok(Self::wrap(config, embeddings, model))
    }

    pub fn from_peft(config: PromptTuningConfig, weights: &[u8], model: &Llama) -> Result<Self> {
        Self::check(&config, model)?;
        let t = read_prompt_embeddings(weights, [config.num_virtual_tokens, model.config.hidden_size])?;
        let e = upload(&t, &model.device)?;
        Ok(Self::wrap(config, e, model))
    }

    pub async fn to_peft(&self) -> Result<(String, Vec<u8>)> {
        let mut out = BTreeMap::new();
        out.insert(KEY.to_string(), OutTensor::F32(read(self.embeddings.clone()).await?));
        crate::peft::peft_files(self.config.to_json(self.hidden, self.heads, self.layers), &out)
    }

    pub fn params_mut(&mut self) -> Vec<NamedParam<'_>> {
        vec![NamedParam::new(KEY, &mut self.embeddings, Layout::Same)]
    }
}

impl Adapter for PromptTuningAdapter {
    fn prefix(&self) -> Option<Tensor<2>> {
        Some(self.embeddings.clone())
    }
}
