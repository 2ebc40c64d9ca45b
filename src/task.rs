//! The high-level API for tasks other than generation: sequence classification with a LoRA
//! adapter and a classification head (peft `task_type` SEQ_CLS) on an encoder (BERT, MiniLM:
//! `BertForSequenceClassification`, a head on the pooler) or a decoder (Llama family:
//! `LlamaForSequenceClassification`, a `score` head on the last non-padding token), and
//! sentence embeddings on an encoder (FEATURE_EXTRACTION: mean pooling + L2 normalisation, as
//! sentence-transformers). Shared by the CLI (`webpeft classify | predict | embed`).
//!
//! A classifier adapter is saved as peft saves one: `adapter_config.json` (LoRA, task_type
//! SEQ_CLS, `modules_to_save: ["classifier"]` or `["score"]`) and `adapter_model.safetensors`
//! (the LoRA pairs, e.g. under `base_model.model.bert.encoder...`, and the head under
//! `base_model.model.classifier.*` / `base_model.model.score.weight`), so
//! `PeftModel.from_pretrained(AutoModelForSequenceClassification...)` loads it. The label
//! names and the fitted temperature go beside them in `webpeft_head.json`, which peft ignores.

use std::collections::BTreeMap;

use burn::tensor::Tensor;
use web_time::Instant;

use crate::device::Compute;
use crate::error::{Result, bail, err};
use crate::io::safetensors::HostTensor;
use crate::io::source::{ModelFiles, shard_tensors};
use crate::models::Base;
use crate::models::bert::{Bert, BertConfig};
use crate::models::config::id2label;
use crate::models::hooks::{Adapter, NoHook};
use crate::models::llama::{Inputs, Llama};
use crate::models::vit::{Preprocess, Vit, VitConfig};
use crate::peft::lora::{LoraAdapter, LoraConfig};
use crate::peft::selective::{BITFIT, SelectiveAdapter, SelectiveConfig};
use crate::peft::{AnyAdapter, NamedParam, Trainable, delegate_adapter, load_all_params, load_params, params_for_save, peft_files, read_params, set_trainable};
use crate::tensor::{ints, read};
use crate::tokenizer::Tokenizer;
use crate::train::classify::{self, ClassifierHead, Labeled, Metrics};
use crate::train::contrastive::{self, Pair};
use crate::train::{AdamWConfig, Schedule, StepStats, TrainConfig, Trainer};

/// What the model is used for; on an encoder it decides the module names adapters use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    /// `BertForSequenceClassification` (modules under `bert.`, a head on the pooler) or
    /// `LlamaForSequenceClassification` (a `score` head on the last non-padding token).
    Classification,
    /// A bare `BertModel`: sentence embeddings.
    Embedding,
}

/// The frozen model under a task.
pub enum Backbone {
    Bert(Bert),
    Decoder(Llama),
    /// An image classifier (`ViTForImageClassification`): inputs are pixel values.
    Vit(Vit),
}

impl Backbone {
    pub fn base(&self) -> &dyn Base {
        match self {
            Backbone::Bert(m) => m,
            Backbone::Decoder(m) => m,
            Backbone::Vit(m) => m,
        }
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            Backbone::Bert(m) => m.config.hidden_size,
            Backbone::Decoder(m) => m.config.hidden_size,
            Backbone::Vit(m) => m.config.hidden_size,
        }
    }

    fn max_positions(&self) -> usize {
        match self {
            Backbone::Bert(m) => m.config.max_position_embeddings,
            Backbone::Decoder(m) => m.config.max_position_embeddings,
            Backbone::Vit(m) => 1 + m.config.num_patches(),
        }
    }

    /// The classification head's module name in transformers.
    pub fn head_module(&self) -> &'static str {
        match self {
            Backbone::Bert(_) | Backbone::Vit(_) => "classifier",
            Backbone::Decoder(_) => "score",
        }
    }

    /// What the head reads, [B, hidden]: BERT's pooler output, or a decoder's last hidden
    /// state at each row's last non-padding token (as transformers picks it: the rightmost
    /// position whose id is not `pad`, else 0).
    fn features(&self, b: &EncodedBatch, pad: i64, adapter: &dyn Adapter, device: &burn::tensor::Device) -> Result<Tensor<2>> {
        if let Backbone::Vit(m) = self {
            return m.cls_states(&b.pixels, b.rows, adapter);
        }
        if !b.pixels.is_empty() {
            bail!(Unsupported, "this model takes text, not images");
        }
        let ids = ints(b.ids.clone(), [b.rows, b.len], device);
        match self {
            Backbone::Vit(_) => unreachable!("handled above"),
            Backbone::Bert(m) => m.pool(m.hidden(ids, Some(&b.mask), adapter)?, b.rows, adapter),
            Backbone::Decoder(m) => {
                let h = m.hidden(&Inputs { ids, attention_mask: Some(b.mask.clone()) }, adapter, None)?;
                let last: Vec<i64> = b.ids.chunks(b.len).enumerate().map(|(r, row)| (r * b.len + row.iter().rposition(|&i| i != pad).unwrap_or(0)) as i64).collect();
                Ok(h.select(0, ints(last, [b.rows], device)))
            }
        }
    }
}

/// The side file of a classifier adapter.
pub const HEAD_FILE: &str = "webpeft_head.json";

/// Options of a classifier training run.
#[derive(Debug, Clone)]
pub struct ClassifyOptions {
    pub epochs: usize,
    /// Stop after this many optimizer steps in all (None: run the epochs).
    pub max_steps: Option<usize>,
    pub batch: usize,
    /// Longest input in tokens (special tokens included); longer texts are truncated.
    pub seq_len: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup: usize,
    pub schedule: Schedule,
    pub max_grad_norm: Option<f64>,
    pub seed: u64,
    /// Share of each class held out for validation (stratified).
    pub val_fraction: f64,
    /// Weight the loss by scikit-learn's "balanced" class weights (imbalanced data).
    pub class_weights: bool,
    /// Early stopping: stop when the validation loss has not improved for this many epochs
    /// (the best epoch's adapter is kept).
    pub patience: Option<usize>,
    /// Fit a temperature on the validation split after training (temperature scaling).
    pub calibrate: bool,
}

impl Default for ClassifyOptions {
    fn default() -> Self {
        ClassifyOptions {
            epochs: 3,
            max_steps: None,
            batch: 16,
            seq_len: 128,
            lr: 5e-4,
            weight_decay: 0.01,
            warmup: 0,
            schedule: Schedule::Linear,
            max_grad_norm: Some(1.0),
            seed: 0,
            val_fraction: 0.1,
            class_weights: false,
            patience: None,
            calibrate: true,
        }
    }
}

impl ClassifyOptions {
    /// The trainer of a run of `total` optimizer steps with these options.
    fn trainer(&self, total: usize) -> Trainer {
        Trainer::new(TrainConfig {
            optim: AdamWConfig { lr: self.lr, weight_decay: self.weight_decay, ..Default::default() },
            schedule: self.schedule,
            warmup: self.warmup,
            total_steps: total,
            max_grad_norm: self.max_grad_norm,
            seed: self.seed,
            ..Default::default()
        })
    }
}

/// One epoch's report.
#[derive(Debug, Clone)]
pub struct EpochReport {
    pub epoch: usize,
    /// Optimizer steps so far.
    pub steps: usize,
    /// Mean training loss over the epoch's steps.
    pub train_loss: f64,
    /// Validation metrics at temperature 1 (None without a validation split).
    pub val: Option<Metrics>,
    pub seconds: f64,
    pub tokens_per_second: f64,
}

/// The outcome of a classifier training run.
#[derive(Debug, Clone)]
pub struct ClassifyReport {
    pub labels: Vec<String>,
    pub epochs: Vec<EpochReport>,
    /// The epoch whose adapter was kept (early stopping keeps the best validation loss).
    pub best_epoch: usize,
    pub train_examples: usize,
    pub val_examples: usize,
    /// The fitted temperature (1 without calibration), and the validation metrics at T = 1 and at T.
    pub temperature: f64,
    pub val_uncalibrated: Option<Metrics>,
    pub val_calibrated: Option<Metrics>,
}

/// The adapter (LoRA or selective tuning such as BitFit) and the classification head,
/// trained and applied together.
struct Tuned<'a> {
    adapter: Option<&'a mut AnyAdapter>,
    head: Option<&'a mut ClassifierHead>,
}

impl Tuned<'_> {
    fn hooks(&self) -> &dyn Adapter {
        self.adapter.as_deref().map_or(&NoHook as &dyn Adapter, |a| a as &dyn Adapter)
    }
}

delegate_adapter!(Tuned<'_>, self => self.hooks());

impl Trainable for Tuned<'_> {
    fn params_mut(&mut self) -> Vec<NamedParam<'_>> {
        let mut v = self.adapter.as_mut().map(|l| l.params_mut()).unwrap_or_default();
        if let Some(h) = self.head.as_mut() {
            v.extend(h.params_mut());
        }
        v
    }
    fn set_training(&mut self, on: bool) {
        if let Some(l) = self.adapter.as_mut() {
            l.set_training(on);
        }
    }
}

pub struct TaskSession {
    pub compute: Compute,
    pub model: Backbone,
    /// None for an image model.
    pub tokenizer: Option<Tokenizer>,
    /// An image model's preprocessing (`preprocessor_config.json`).
    pub preprocess: Option<Preprocess>,
    /// The padding id of batches (the config's `pad_token_id`, else a decoder's EOS).
    pub pad: i64,
    pub task: TaskKind,
    /// The adapter being trained or applied: LoRA, or selective tuning (BitFit).
    pub adapter: Option<AnyAdapter>,
    pub head: Option<ClassifierHead>,
    /// Class names by id (from the adapter, the data, or the checkpoint's `id2label`).
    pub labels: Vec<String>,
    /// Temperature applied to the logits for probabilities (temperature scaling).
    pub temperature: f64,
}

/// A batch of `rows` inputs: token ids and mask [B, T] of texts, padded on the right with
/// the padding id, or the pixel values [B, C, H, W] of images (then `ids` and `mask` are empty).
pub struct EncodedBatch {
    pub ids: Vec<i64>,
    pub mask: Vec<i64>,
    pub rows: usize,
    pub len: usize,
    pub pixels: Vec<f32>,
}

impl EncodedBatch {
    /// What the step processed, for the tokens/s report: real tokens, or images.
    fn units(&self) -> usize {
        if self.pixels.is_empty() { self.mask.iter().filter(|&&m| m != 0).count() } else { self.rows }
    }
}

/// One input: a text's token ids, or an image's pixel values [C, H, W].
enum Row {
    Tokens(Vec<u32>),
    Pixels(Vec<f32>),
}

/// One labelled image: pixel values [C, H, W] after the model's preprocessing
/// ([`TaskSession::image_pixels`]) and its label.
#[derive(Debug, Clone)]
pub struct LabeledImage {
    pub pixels: Vec<f32>,
    pub label: String,
}

impl TaskSession {
    /// Load a model for `task`: a BERT-family Hugging Face folder, or a Llama-family folder or
    /// GGUF (classification only). A `BertForSequenceClassification` /
    /// `LlamaForSequenceClassification` checkpoint keeps its head and `id2label`.
    pub fn load(files: &ModelFiles, compute: Compute, task: TaskKind) -> Result<Self> {
        let mut preprocess = None;
        let (model, tokenizer, head, labels, pad) = match files {
            ModelFiles::HfFolder { config, shards, preprocessor, .. } if VitConfig::is_vit(config) => {
                if task == TaskKind::Embedding {
                    bail!(Unsupported, "sentence embeddings need a text encoder, not a ViT");
                }
                let cfg = VitConfig::from_json(config).map_err(|e| e.context("config.json"))?;
                preprocess = Some(Preprocess::from_json(preprocessor.as_deref(), &cfg)?);
                let model = Vit::from_weights(cfg, shard_tensors(shards)?, &compute.device)?;
                let head = match &model.classifier {
                    Some((w, b)) => Some(ClassifierHead::from_host(w, Some(b), "classifier", &compute.device)?),
                    None => None,
                };
                let labels = model.config.labels.clone();
                (Backbone::Vit(model), None, head, labels, 0)
            }
            ModelFiles::HfFolder { config, shards, tokenizer, .. } if BertConfig::is_bert(config) => {
                let cfg = BertConfig::from_json(config).map_err(|e| e.context("config.json"))?;
                let tokenizer = tokenizer.as_deref().ok_or_else(|| err!(Io, "tokenizer.json missing from the model folder"))?;
                let tokenizer = Tokenizer::from_json(tokenizer, None, None, None)?.with_truncation(cfg.max_position_embeddings)?;
                if tokenizer.vocab_size() > cfg.vocab_size {
                    bail!(Config, "tokenizer has {} tokens but the model only {}", tokenizer.vocab_size(), cfg.vocab_size);
                }
                let prefix = match task {
                    TaskKind::Classification => "bert.",
                    TaskKind::Embedding => "",
                };
                let pad = cfg.pad_token_id.unwrap_or(0) as i64;
                let model = Bert::from_weights(cfg, shard_tensors(shards)?, prefix, &compute.device)?;
                let head = match (&model.classifier, task) {
                    (Some((w, b)), TaskKind::Classification) => Some(ClassifierHead::from_host(w, Some(b), "classifier", &compute.device)?),
                    _ => None,
                };
                let labels = model.config.labels.clone();
                (Backbone::Bert(model), Some(tokenizer), head, labels, pad)
            }
            _ => {
                if task == TaskKind::Embedding {
                    bail!(Unsupported, "sentence embeddings need an encoder (a BERT-family model such as MiniLM), not a decoder");
                }
                let (mut weights, tokenizer) = crate::session::decoder_parts(files, crate::quant::BaseFormat::default_for(&compute))?;
                // A LlamaForSequenceClassification checkpoint: its head, and no LM head (which
                // a classifier never uses).
                let score = weights.tensors.remove("score.weight");
                if score.is_some() && !weights.tensors.contains_key("lm_head.weight") {
                    weights.config.tie_word_embeddings = true;
                }
                let labels = match files {
                    ModelFiles::HfFolder { config, .. } => id2label(config).map_err(|e| e.context("config.json"))?,
                    ModelFiles::Gguf { .. } => Vec::new(),
                };
                let pad = weights.config.pad_token_id.or(tokenizer.eos_id).unwrap_or(0) as i64;
                let model = Llama::from_weights(weights, &compute.device)?;
                let head = match score {
                    Some(w) if w.shape.len() == 2 && w.shape[1] == model.config.hidden_size => Some(ClassifierHead::from_host(&w, None, "score", &compute.device)?),
                    Some(w) => bail!(Shape, "score.weight: shape {:?}, expected [labels, {}]", w.shape, model.config.hidden_size),
                    None => None,
                };
                (Backbone::Decoder(model), Some(tokenizer), head, labels, pad)
            }
        };
        let labels = if head.as_ref().is_some_and(|h| h.num_labels() == labels.len()) { labels } else { Vec::new() };
        Ok(TaskSession { compute, model, tokenizer, preprocess, pad, task, adapter: None, head, labels, temperature: 1.0 })
    }

    /// Tokenise texts (truncated to `max_len` tokens) into one right-padded batch.
    pub fn encode(&self, texts: &[&str], max_len: usize) -> Result<EncodedBatch> {
        if texts.is_empty() {
            bail!(Data, "no texts");
        }
        let rows: Vec<Row> = texts.iter().map(|t| self.encode_row(t, max_len).map(Row::Tokens)).collect::<Result<_>>()?;
        make_batch(&rows.iter().collect::<Vec<_>>(), self.pad)
    }

    /// One text's token ids, at most `max_len` (and the model's positions): an encoder keeps
    /// its closing special token, as the tokenizer's own truncation does; a decoder keeps the
    /// first tokens, as transformers' right-side truncation.
    fn encode_row(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        let max_len = max_len.clamp(2, self.model.max_positions());
        let tokenizer = self.tokenizer.as_ref().ok_or_else(|| err!(Unsupported, "this model takes images, not text"))?;
        let mut ids = tokenizer.encode(text)?;
        if ids.len() > max_len {
            let last = *ids.last().expect("non-empty");
            ids.truncate(max_len);
            if matches!(self.model, Backbone::Bert(_)) {
                ids[max_len - 1] = last;
            }
        }
        Ok(ids)
    }

    /// A new LoRA adapter from a peft LoRA config (its `task_type` is set to the session's).
    pub fn add_lora(&mut self, mut config: LoraConfig, seed: u64) -> Result<()> {
        config.task_type = Some(self.peft_task_type().into());
        if self.task == TaskKind::Classification {
            config.modules_to_save.retain(|m| m != "classifier" && m != "score");
            config.modules_to_save.push(self.model.head_module().into());
        }
        self.adapter = Some(AnyAdapter::Lora(self.new_lora(config, seed)?));
        Ok(())
    }

    /// A new selective-tuning adapter: trainable copies of the base parameters whose names
    /// match `config.parameters` (see [`crate::peft::selective`]); the head trains beside it.
    pub fn add_selective(&mut self, mut config: SelectiveConfig) -> Result<()> {
        config.task_type = Some(self.peft_task_type().into());
        self.adapter = Some(AnyAdapter::Selective(self.new_selective(config)?));
        Ok(())
    }

    /// BitFit (Ben Zaken et al. 2021): every bias of the model trains (linear layers,
    /// LayerNorms, ViT's patch embedding, BERT's pooler), with the classification head.
    pub fn add_bitfit(&mut self) -> Result<()> {
        self.add_selective(SelectiveConfig { parameters: BITFIT.into(), task_type: None, base_model_name_or_path: None })
    }

    fn new_selective(&self, config: SelectiveConfig) -> Result<SelectiveAdapter> {
        if self.model.base().conv1d() {
            bail!(Unsupported, "selective tuning (BitFit) on GPT-2 is not supported yet (LoRA is)");
        }
        SelectiveAdapter::new(config, self.model.base())
    }

    /// A LoRA over the backbone. The head's `modules_to_save` entries (`classifier`, `score`)
    /// are the head's, trained here in full, so the adapter leaves them out; its config keeps
    /// them for peft.
    fn new_lora(&self, config: LoraConfig, seed: u64) -> Result<LoraAdapter> {
        let mut own = config.clone();
        own.modules_to_save.retain(|m| m != "classifier" && m != "score");
        let mut lora = LoraAdapter::new(own, self.model.base(), seed)?;
        lora.config.modules_to_save = config.modules_to_save;
        Ok(lora)
    }

    fn peft_task_type(&self) -> &'static str {
        match self.task {
            TaskKind::Classification => "SEQ_CLS",
            TaskKind::Embedding => "FEATURE_EXTRACTION",
        }
    }

    /// Load a peft adapter (LoRA, or SELECTIVE such as BitFit; for classification with its
    /// `classifier` head) and, when given, `webpeft_head.json` (labels, temperature).
    pub fn load_adapter(&mut self, config_json: &str, weights: &[u8], head_json: Option<&str>) -> Result<()> {
        let value: serde_json::Value = serde_json::from_str(config_json).map_err(|e| err!(Parse, "adapter_config.json: {e}"))?;
        let mut tensors = crate::peft::read_weights(weights)?;
        let m = self.model.head_module();
        let (wk, bk) = (format!("base_model.model.{m}.weight"), format!("base_model.model.{m}.bias"));
        let h = self.model.hidden_size();
        let head = match (tensors.remove(&wk), tensors.remove(&bk)) {
            (Some(w), b) if self.task == TaskKind::Classification => {
                if w.shape.len() != 2 || w.shape[1] != h || b.as_ref().is_some_and(|b| b.shape != [w.shape[0]]) {
                    bail!(Shape, "adapter_model.safetensors: {m} weight {:?} / bias {:?} do not fit hidden size {h}", w.shape, b.map(|b| b.shape));
                }
                if b.is_none() && !matches!(self.model, Backbone::Decoder(_)) {
                    bail!(Format, "adapter_model.safetensors: {bk} missing");
                }
                Some(ClassifierHead::from_host(&w, b.as_ref(), m, &self.compute.device)?)
            }
            (None, _) if self.task == TaskKind::Classification => bail!(Format, "adapter_model.safetensors: no classifier head ({wk})"),
            (None, None) => None,
            _ => bail!(Config, "this adapter carries a classifier head: load it for classification"),
        };
        let mut adapter = match value.get("peft_type").and_then(serde_json::Value::as_str) {
            Some("SELECTIVE") => AnyAdapter::Selective(self.new_selective(SelectiveConfig::from_value(&value).map_err(|e| e.context("adapter_config.json"))?)?),
            _ => AnyAdapter::Lora(self.new_lora(LoraConfig::from_value(&value).map_err(|e| e.context("adapter_config.json"))?, 0)?),
        };
        load_all_params(&mut adapter, &tensors)?;
        let (labels, temperature) = match head_json {
            Some(text) => {
                let v: serde_json::Value = serde_json::from_str(text).map_err(|e| err!(Parse, "{HEAD_FILE}: {e}"))?;
                let labels: Vec<String> = v.get("labels").and_then(|l| l.as_array()).map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect()).unwrap_or_default();
                let t = v.get("temperature").and_then(|t| t.as_f64()).unwrap_or(1.0);
                if !(t.is_finite() && t > 0.0) {
                    bail!(Config, "{HEAD_FILE}: temperature {t} must be a positive number");
                }
                (labels, t)
            }
            None => (Vec::new(), 1.0),
        };
        if let Some(h) = &head
            && !labels.is_empty()
            && labels.len() != h.num_labels()
        {
            bail!(Config, "{HEAD_FILE}: {} labels for a head of {}", labels.len(), h.num_labels());
        }
        self.adapter = Some(adapter);
        if head.is_some() {
            self.labels = labels;
            self.head = head;
        }
        self.temperature = temperature;
        Ok(())
    }

    /// The adapter's files: `adapter_config.json`, `adapter_model.safetensors` and, for a
    /// classifier, `webpeft_head.json`.
    pub async fn save_adapter(&mut self) -> Result<Vec<(String, Vec<u8>)>> {
        let adapter = self.adapter.as_mut().ok_or_else(|| err!(Config, "no adapter to save"))?;
        let config = match &*adapter {
            AnyAdapter::Lora(l) => l.config.to_json(),
            AnyAdapter::Selective(a) => a.config.to_json(),
            other => bail!(Unsupported, "a task adapter is LoRA or selective tuning, not {}", other.method()),
        };
        let mut tuned = Tuned { adapter: Some(adapter), head: self.head.as_mut() };
        let tensors = params_for_save(&mut tuned).await?;
        let (config, weights) = peft_files(config, &tensors)?;
        let mut files = vec![("adapter_config.json".to_string(), config.into_bytes()), ("adapter_model.safetensors".to_string(), weights)];
        if self.head.is_some() {
            let head = serde_json::json!({"labels": self.labels, "temperature": self.temperature, "task_type": "SEQ_CLS"});
            files.push((HEAD_FILE.to_string(), serde_json::to_string_pretty(&head).expect("serialisable").into_bytes()));
        }
        Ok(files)
    }

    fn view(&self) -> (&dyn Adapter, Option<&ClassifierHead>) {
        (self.adapter.as_ref().map_or(&NoHook as &dyn Adapter, |l| l as &dyn Adapter), self.head.as_ref())
    }

    /// Classifier logits of texts, [texts][labels] (at temperature 1).
    pub async fn logits(&self, texts: &[&str], seq_len: usize, batch: usize) -> Result<Vec<Vec<f32>>> {
        let (adapter, head) = self.view();
        let head = head.ok_or_else(|| err!(Config, "no classification head: train or load a classifier adapter first"))?;
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(batch.max(1)) {
            let b = self.encode(chunk, seq_len)?;
            let l = read(head.forward(self.model.features(&b, self.pad, adapter, &self.compute.device)?)).await?;
            out.extend(l.data.chunks(head.num_labels()).map(<[f32]>::to_vec));
        }
        Ok(out)
    }

    /// Class probabilities of texts with the fitted temperature, [texts][labels].
    pub async fn predict(&self, texts: &[&str], seq_len: usize, batch: usize) -> Result<Vec<Vec<f64>>> {
        Ok(classify::softmax_rows(&self.logits(texts, seq_len, batch).await?, self.temperature))
    }

    /// Sentence embeddings (mean pooling over real tokens, L2-normalised), [texts][hidden].
    pub async fn embed(&self, texts: &[&str], seq_len: usize, batch: usize) -> Result<Vec<Vec<f32>>> {
        let (adapter, _) = self.view();
        let Backbone::Bert(model) = &self.model else { bail!(Unsupported, "sentence embeddings need an encoder") };
        let h = model.config.hidden_size;
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(batch.max(1)) {
            let b = self.encode(chunk, seq_len)?;
            let ids = ints(b.ids.clone(), [b.rows, b.len], &self.compute.device);
            let hidden = model.hidden(ids, Some(&b.mask), adapter)?;
            let e = read(Bert::mean_pool(hidden, &b.mask, b.rows)).await?;
            out.extend(e.data.chunks(h).map(<[f32]>::to_vec));
        }
        Ok(out)
    }

    /// One optimizer step of the adapter and the head on `texts` with label ids `labels`
    /// (as a training run takes each batch; for tests and custom loops).
    pub async fn train_step(&mut self, trainer: &mut Trainer, texts: &[&str], labels: &[usize], weights: Option<&[f32]>, seq_len: usize) -> Result<StepStats> {
        let b = self.encode(texts, seq_len)?;
        self.step_on(trainer, &b, labels, weights).await
    }

    async fn step_on(&mut self, trainer: &mut Trainer, b: &EncodedBatch, labels: &[usize], weights: Option<&[f32]>) -> Result<StepStats> {
        let device = self.compute.device.clone();
        let mut tuned = Tuned { adapter: self.adapter.as_mut(), head: self.head.as_mut() };
        if tuned.head.is_none() {
            bail!(Config, "no classification head");
        }
        set_trainable(&mut tuned, true);
        let r = classifier_step(trainer, &self.model, self.pad, &mut tuned, b, labels, weights, &device).await;
        set_trainable(&mut tuned, false);
        r
    }

    /// Embeddings [B, hidden] of an encoded batch through `adapter` (differentiable).
    fn embeddings_of(&self, b: &EncodedBatch, adapter: &dyn Adapter) -> Result<Tensor<2>> {
        let Backbone::Bert(model) = &self.model else { bail!(Unsupported, "sentence embeddings need an encoder") };
        let ids = ints(b.ids.clone(), [b.rows, b.len], &self.compute.device);
        Ok(Bert::mean_pool(model.hidden(ids, Some(&b.mask), adapter)?, &b.mask, b.rows))
    }

    /// One optimizer step of the embedding LoRA on (anchor, positive) pairs with
    /// MultipleNegativesRankingLoss at `scale` (see [`crate::train::contrastive`]).
    pub async fn embedding_step(&mut self, trainer: &mut Trainer, pairs: &[(&str, &str)], scale: f64, seq_len: usize) -> Result<StepStats> {
        if self.task != TaskKind::Embedding {
            bail!(Config, "this session was loaded for classification: load it for embeddings to tune them");
        }
        let a = self.encode(&pairs.iter().map(|p| p.0).collect::<Vec<_>>(), seq_len)?;
        let p = self.encode(&pairs.iter().map(|p| p.1).collect::<Vec<_>>(), seq_len)?;
        let tokens = a.mask.iter().chain(&p.mask).filter(|&&m| m != 0).count();
        let mut adapter = self.adapter.take().ok_or_else(|| err!(Config, "no adapter: add one (LoRA, BitFit) before training"))?;
        set_trainable(&mut adapter, true);
        let r = trainer.step_loss(&mut adapter, 1, tokens, |l, _| contrastive::mnrl_loss(self.embeddings_of(&a, l)?, self.embeddings_of(&p, l)?, scale)).await;
        set_trainable(&mut adapter, false);
        self.adapter = Some(adapter);
        r
    }

    /// Tune the embedding LoRA on pairs: `epochs` passes over shuffled batches of `batch` pairs
    /// (each batch's other positives are its negatives). `on_step` gets every step's stats
    /// and may return false to stop. Returns each step's stats.
    pub async fn train_embeddings(&mut self, pairs: &[Pair], o: &ClassifyOptions, mut on_step: impl FnMut(&StepStats) -> bool) -> Result<Vec<StepStats>> {
        if o.epochs == 0 || o.batch < 2 || !(o.lr.is_finite() && o.lr > 0.0) {
            bail!(Config, "epochs must be >= 1, batch >= 2 (in-batch negatives) and lr a positive number");
        }
        let per_epoch = pairs.len().div_ceil(o.batch);
        let total = o.max_steps.unwrap_or(usize::MAX).min(per_epoch * o.epochs).max(1);
        let mut trainer = o.trainer(total);
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(o.seed);
        let mut out = Vec::new();
        'run: for _ in 0..o.epochs {
            rand::seq::SliceRandom::shuffle(&mut order[..], &mut rng);
            // A last batch of one pair has no negative: it joins the previous one.
            let mut chunks: Vec<&[usize]> = order.chunks(o.batch).collect();
            if chunks.len() > 1 && chunks.last().is_some_and(|c| c.len() < 2) {
                chunks.pop();
            }
            for chunk in chunks {
                if out.len() >= total {
                    break 'run;
                }
                self.compute.device.seed(o.seed ^ (out.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let batch: Vec<(&str, &str)> = chunk.iter().map(|&i| (pairs[i].anchor.as_str(), pairs[i].positive.as_str())).collect();
                let stats = self.embedding_step(&mut trainer, &batch, contrastive::MNRL_SCALE, o.seq_len).await?;
                let go_on = on_step(&stats);
                out.push(stats);
                if !go_on {
                    break 'run;
                }
            }
        }
        Ok(out)
    }

    /// How many values train: the adapter's and the head's.
    pub fn num_trainable(&mut self) -> usize {
        Tuned { adapter: self.adapter.as_mut(), head: self.head.as_mut() }.params_mut().iter().map(|p| p.tensor.dims().iter().product::<usize>()).sum()
    }

    /// The adapter's and the head's trainable tensors by their peft names, in PyTorch layout.
    pub async fn trainable_tensors(&mut self) -> Result<BTreeMap<String, HostTensor>> {
        read_params(&mut Tuned { adapter: self.adapter.as_mut(), head: self.head.as_mut() }).await
    }

    /// Train the LoRA adapter and the classification head on labelled examples: stratified
    /// validation split, per-epoch metrics, optional class weights, early stopping and
    /// temperature scaling. `on_epoch` gets each epoch's report and may return false to stop.
    pub async fn train_classifier(&mut self, data: &[Labeled], o: &ClassifyOptions, on_epoch: impl FnMut(&EpochReport) -> bool) -> Result<ClassifyReport> {
        let rows = data.iter().map(|d| self.encode_row(&d.text, o.seq_len).map(Row::Tokens)).collect::<Result<Vec<_>>>()?;
        let labels: Vec<&str> = data.iter().map(|d| d.label.as_str()).collect();
        self.fit(rows, &labels, o, on_epoch).await
    }

    /// The same for an image classifier (ViT), on preprocessed images.
    pub async fn train_image_classifier(&mut self, data: &[LabeledImage], o: &ClassifyOptions, on_epoch: impl FnMut(&EpochReport) -> bool) -> Result<ClassifyReport> {
        let rows = data.iter().map(|d| self.check_pixels(&d.pixels).map(|_| Row::Pixels(d.pixels.clone()))).collect::<Result<Vec<_>>>()?;
        let labels: Vec<&str> = data.iter().map(|d| d.label.as_str()).collect();
        self.fit(rows, &labels, o, on_epoch).await
    }

    fn check_pixels(&self, pixels: &[f32]) -> Result<()> {
        let Backbone::Vit(m) = &self.model else { bail!(Unsupported, "this model takes text, not images") };
        if pixels.len() != m.config.pixels_per_image() {
            bail!(Shape, "an image of {} values; the model takes {} ({}x{s}x{s})", pixels.len(), m.config.pixels_per_image(), m.config.num_channels, s = m.config.image_size);
        }
        Ok(())
    }

    /// An image file (PNG, JPEG) as the model's pixel values (decoded, resized, normalised).
    pub fn image_pixels(&self, bytes: &[u8]) -> Result<Vec<f32>> {
        self.preprocess.as_ref().ok_or_else(|| err!(Unsupported, "this model takes text, not images"))?.decode(bytes)
    }

    /// Classifier logits of preprocessed images, [images][labels] (at temperature 1).
    pub async fn image_logits(&self, images: &[Vec<f32>], batch: usize) -> Result<Vec<Vec<f32>>> {
        let head = self.head.as_ref().ok_or_else(|| err!(Config, "no classification head: train or load a classifier adapter first"))?;
        let (adapter, _) = self.view();
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(batch.max(1)) {
            let rows = chunk.iter().map(|p| self.check_pixels(p).map(|_| Row::Pixels(p.clone()))).collect::<Result<Vec<_>>>()?;
            let b = make_batch(&rows.iter().collect::<Vec<_>>(), self.pad)?;
            let l = read(head.forward(self.model.features(&b, self.pad, adapter, &self.compute.device)?)).await?;
            out.extend(l.data.chunks(head.num_labels()).map(<[f32]>::to_vec));
        }
        Ok(out)
    }

    /// One optimizer step of the adapter and the head on preprocessed images with label ids.
    pub async fn train_step_images(&mut self, trainer: &mut Trainer, images: &[Vec<f32>], labels: &[usize]) -> Result<StepStats> {
        let rows = images.iter().map(|p| self.check_pixels(p).map(|_| Row::Pixels(p.clone()))).collect::<Result<Vec<_>>>()?;
        let b = make_batch(&rows.iter().collect::<Vec<_>>(), self.pad)?;
        self.step_on(trainer, &b, labels, None).await
    }

    /// Training on prepared rows (token ids or pixels) with labels: see [`TaskSession::train_classifier`].
    async fn fit(&mut self, rows: Vec<Row>, data: &[&str], o: &ClassifyOptions, mut on_epoch: impl FnMut(&EpochReport) -> bool) -> Result<ClassifyReport> {
        if self.task != TaskKind::Classification {
            bail!(Config, "this session was loaded for embeddings, not classification");
        }
        if o.epochs == 0 || o.batch == 0 || o.seq_len < 2 || !(o.lr.is_finite() && o.lr > 0.0) {
            bail!(Config, "epochs and batch must be >= 1, seq-len >= 2 and lr a positive number");
        }
        if !(0.0..1.0).contains(&o.val_fraction) {
            bail!(Config, "the validation fraction must be in [0, 1)");
        }
        if self.adapter.is_none() {
            bail!(Config, "no adapter: add one (LoRA, BitFit) before training");
        }
        // A head (of the checkpoint or a loaded adapter) trains on when its labels cover the
        // data's; otherwise a new head is trained for the data's labels.
        let fits = self.head.as_ref().is_some_and(|h| h.num_labels() == self.labels.len()) && data.iter().all(|d| self.labels.iter().any(|l| l == d));
        if self.head.is_some() && !fits {
            log::info!("the existing head's labels {:?} do not cover the data's: a new head is trained", self.labels);
            self.head = None;
        }
        let known = if self.head.is_some() { self.labels.clone() } else { Vec::new() };
        let (labels, ids) = classify::label_ids(data, &known)?;
        if self.head.is_none() {
            let bias = !matches!(self.model, Backbone::Decoder(_));
            self.head = Some(ClassifierHead::new(self.model.hidden_size(), labels.len(), bias, self.model.head_module(), o.seed, &self.compute.device)?);
        }
        self.labels = labels.clone();
        self.temperature = 1.0;
        let (train, val) = classify::stratified_split(&ids, labels.len(), o.val_fraction, o.seed);
        if train.is_empty() {
            bail!(Data, "no training examples left after the validation split");
        }
        let weights = o.class_weights.then(|| classify::balanced_weights(&train.iter().map(|&i| ids[i]).collect::<Vec<_>>(), labels.len()));
        let pad = self.pad;
        let steps_per_epoch = train.len().div_ceil(o.batch);
        let total = o.max_steps.unwrap_or(usize::MAX).min(steps_per_epoch * o.epochs).max(1);
        let mut trainer = o.trainer(total);
        let mut order = train.clone();
        let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(o.seed);
        let mut epochs: Vec<EpochReport> = Vec::new();
        // (validation loss, epoch, the trainable tensors then)
        let mut best: Option<(f64, usize, BTreeMap<String, HostTensor>)> = None;
        let mut steps = 0usize;
        let val_rows: Vec<&Row> = val.iter().map(|&i| &rows[i]).collect();
        let val_labels: Vec<usize> = val.iter().map(|&i| ids[i]).collect();
        let device = self.compute.device.clone();
        let model = &self.model;
        let mut tuned = Tuned { adapter: self.adapter.as_mut(), head: self.head.as_mut() };
        set_trainable(&mut tuned, true);
        let result: Result<()> = async {
            for epoch in 1..=o.epochs {
                rand::seq::SliceRandom::shuffle(&mut order[..], &mut rng);
                let t0 = Instant::now();
                let (mut loss_sum, mut loss_n, mut tokens) = (0f64, 0usize, 0usize);
                for chunk in order.chunks(o.batch) {
                    if steps >= total {
                        break;
                    }
                    // Dropout draws keyed by the step, as the LM trainer.
                    device.seed(o.seed ^ (steps as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                    let b = make_batch(&chunk.iter().map(|&i| &rows[i]).collect::<Vec<_>>(), pad)?;
                    let y: Vec<usize> = chunk.iter().map(|&i| ids[i]).collect();
                    let stats = classifier_step(&mut trainer, model, pad, &mut tuned, &b, &y, weights.as_deref(), &device).await?;
                    steps += 1;
                    tokens += stats.tokens;
                    if !stats.skipped {
                        loss_sum += stats.loss as f64;
                        loss_n += 1;
                    }
                }
                let seconds = t0.elapsed().as_secs_f64();
                let metrics = if val_rows.is_empty() {
                    None
                } else {
                    // In eval mode (no dropout) and without gradient tracking.
                    set_trainable(&mut tuned, false);
                    let logits = batched_logits(model, &tuned, &val_rows, o.batch, pad, &device).await;
                    set_trainable(&mut tuned, true);
                    Some(classify::metrics(&logits?, &val_labels, 1.0))
                };
                let r = EpochReport { epoch, steps, train_loss: loss_sum / loss_n.max(1) as f64, val: metrics, seconds, tokens_per_second: tokens as f64 / seconds.max(1e-9) };
                let val_loss = r.val.as_ref().map(|m| m.loss);
                let go_on = on_epoch(&r);
                epochs.push(r);
                if let Some(l) = val_loss {
                    if best.as_ref().is_none_or(|(b, ..)| l < *b) {
                        best = Some((l, epoch, read_params(&mut tuned).await?));
                    } else if o.patience.is_some_and(|p| epoch - best.as_ref().map_or(0, |b| b.1) >= p) {
                        log::info!("early stopping after epoch {epoch}: the validation loss has not improved since epoch {}", best.as_ref().map_or(0, |b| b.1));
                        break;
                    }
                }
                if !go_on || steps >= total {
                    break;
                }
            }
            Ok(())
        }
        .await;
        set_trainable(&mut tuned, false);
        result?;
        let last = epochs.last().map_or(0, |e| e.epoch);
        let best_epoch = match best {
            Some((_, e, tensors)) if e != last => {
                load_params(&mut tuned, &tensors)?;
                e
            }
            Some((_, e, _)) => e,
            None => last,
        };
        let (mut val_uncalibrated, mut val_calibrated, mut temperature) = (None, None, 1.0);
        if !val_rows.is_empty() {
            let logits = batched_logits(model, &tuned, &val_rows, o.batch, pad, &device).await?;
            val_uncalibrated = Some(classify::metrics(&logits, &val_labels, 1.0));
            if o.calibrate {
                temperature = classify::fit_temperature(&logits, &val_labels);
                val_calibrated = Some(classify::metrics(&logits, &val_labels, temperature));
            }
        }
        self.temperature = temperature;
        Ok(ClassifyReport { labels, epochs, best_epoch, train_examples: train.len(), val_examples: val.len(), temperature, val_uncalibrated, val_calibrated })
    }
}

/// One optimizer step of the LoRA adapter and the head on a batch with labels `y`:
/// cross-entropy (weighted by `weights`, divided by the rows' total weight, as torch's
/// `cross_entropy(weight=...)`), then clipping, the schedule and AdamW.
#[allow(clippy::too_many_arguments)]
async fn classifier_step(
    trainer: &mut Trainer,
    model: &Backbone,
    pad: i64,
    tuned: &mut Tuned<'_>,
    b: &EncodedBatch,
    y: &[usize],
    weights: Option<&[f32]>,
    device: &burn::tensor::Device,
) -> Result<StepStats> {
    let denom = classify::loss_denominator(y, weights);
    trainer
        .step_loss(tuned, 1, b.units(), |t, _| {
            let head = t.head.as_deref().ok_or_else(|| err!(Config, "no classification head"))?;
            classify::cross_entropy(head.forward(model.features(b, pad, t, device)?), y, weights, denom)
        })
        .await
}

/// Rows as one batch: token ids padded on the right with `pad`, or images' pixels stacked.
fn make_batch(rows: &[&Row], pad: i64) -> Result<EncodedBatch> {
    let mut b = EncodedBatch { ids: Vec::new(), mask: Vec::new(), rows: rows.len(), len: 0, pixels: Vec::new() };
    let len = rows.iter().map(|r| if let Row::Tokens(t) = r { t.len() } else { 0 }).max().unwrap_or(0).max(1);
    for r in rows {
        match r {
            Row::Tokens(t) => {
                b.ids.extend(t.iter().map(|&i| i as i64).chain(std::iter::repeat_n(pad, len - t.len())));
                b.mask.extend(std::iter::repeat_n(1i64, t.len()).chain(std::iter::repeat_n(0, len - t.len())));
                b.len = len;
            }
            Row::Pixels(p) => b.pixels.extend_from_slice(p),
        }
    }
    if !b.ids.is_empty() && !b.pixels.is_empty() {
        bail!(Data, "a batch mixes texts and images");
    }
    Ok(b)
}

/// Host logits of rows, in batches (the caller leaves the adapter untracked: no graph is built).
async fn batched_logits(model: &Backbone, tuned: &Tuned<'_>, rows: &[&Row], batch: usize, pad: i64, device: &burn::tensor::Device) -> Result<Vec<Vec<f32>>> {
    let head = tuned.head.as_deref().ok_or_else(|| err!(Config, "no classification head"))?;
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(batch.max(1)) {
        let b = make_batch(chunk, pad)?;
        let l = read(head.forward(model.features(&b, pad, tuned, device)?)).await?;
        out.extend(l.data.chunks(head.num_labels()).map(<[f32]>::to_vec));
    }
    Ok(out)
}
