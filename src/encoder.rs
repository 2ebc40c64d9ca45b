//! The high-level API for encoder models (BERT, MiniLM): sequence classification with a LoRA
//! adapter and a classification head (peft `task_type` SEQ_CLS), and sentence embeddings
//! (FEATURE_EXTRACTION: mean pooling + L2 normalisation, as sentence-transformers). Shared by
//! the CLI (`webpeft classify`, `webpeft embed`) and, later, the JS bindings.
//!
//! A classifier adapter is saved as peft saves one: `adapter_config.json` (LoRA, task_type
//! SEQ_CLS, `modules_to_save: ["classifier"]`) and `adapter_model.safetensors` (the LoRA pairs
//! under `base_model.model.bert.encoder...` and the head under `base_model.model.classifier.*`),
//! so `PeftModel.from_pretrained(AutoModelForSequenceClassification...)` loads it. The label
//! names and the fitted temperature go beside them in `webpeft_head.json`, which peft ignores.

use std::collections::BTreeMap;

use burn::tensor::Tensor;
use web_time::Instant;

use crate::device::Compute;
use crate::error::{Result, bail, err};
use crate::io::safetensors::HostTensor;
use crate::io::source::{ModelFiles, shard_tensors};
use crate::models::bert::{Bert, BertConfig};
use crate::models::hooks::{Adapter, NoHook, Site};
use crate::peft::lora::{LoraAdapter, LoraConfig};
use crate::peft::{NamedParam, Trainable, load_all_params, load_params, params_for_save, peft_files, read_params, set_trainable};
use crate::tensor::{ints, read};
use crate::tokenizer::Tokenizer;
use crate::train::classify::{self, ClassifierHead, Labeled, Metrics};
use crate::train::{AdamWConfig, Schedule, StepStats, TrainConfig, Trainer};

/// What the encoder is used for; it decides the module names adapters use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderTask {
    /// `BertForSequenceClassification`: modules under `bert.`, a head on the pooler.
    Classification,
    /// A bare `BertModel`: sentence embeddings.
    Embedding,
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

/// The LoRA adapter and the classification head, trained and applied together.
struct Tuned<'a> {
    lora: Option<&'a mut LoraAdapter>,
    head: Option<&'a mut ClassifierHead>,
}

impl Adapter for Tuned<'_> {
    fn linear_input(&self, site: Site, x: Tensor<2>) -> Tensor<2> {
        match &self.lora {
            Some(l) => l.linear_input(site, x),
            None => x,
        }
    }
    fn linear_output(&self, site: Site, x: &Tensor<2>, y: Tensor<2>) -> Tensor<2> {
        match &self.lora {
            Some(l) => l.linear_output(site, x, y),
            None => y,
        }
    }
}

impl Trainable for Tuned<'_> {
    fn params_mut(&mut self) -> Vec<NamedParam<'_>> {
        let mut v = self.lora.as_mut().map(|l| l.params_mut()).unwrap_or_default();
        if let Some(h) = self.head.as_mut() {
            v.extend(h.params_mut());
        }
        v
    }
    fn set_training(&mut self, on: bool) {
        if let Some(l) = self.lora.as_mut() {
            l.set_training(on);
        }
    }
}

pub struct EncoderSession {
    pub compute: Compute,
    pub model: Bert,
    pub tokenizer: Tokenizer,
    pub task: EncoderTask,
    pub lora: Option<LoraAdapter>,
    pub head: Option<ClassifierHead>,
    /// Class names by id (from the adapter, the data, or the checkpoint's `id2label`).
    pub labels: Vec<String>,
    /// Temperature applied to the logits for probabilities (temperature scaling).
    pub temperature: f64,
}

/// Token ids and mask [B, T] of texts, padded on the right with `pad`.
pub struct EncodedBatch {
    pub ids: Vec<i64>,
    pub mask: Vec<i64>,
    pub rows: usize,
    pub len: usize,
}

impl EncoderSession {
    /// Load a BERT-family Hugging Face folder for `task`.
    pub fn load(files: &ModelFiles, compute: Compute, task: EncoderTask) -> Result<Self> {
        let ModelFiles::HfFolder { config, shards, tokenizer, .. } = files else {
            bail!(Unsupported, "an encoder model comes as a Hugging Face folder (config.json, model.safetensors, tokenizer.json), not GGUF")
        };
        let cfg = BertConfig::from_json(config).map_err(|e| e.context("config.json"))?;
        let tokenizer = tokenizer.as_deref().ok_or_else(|| err!(Io, "tokenizer.json missing from the model folder"))?;
        let tokenizer = Tokenizer::from_json(tokenizer, None, None, None)?.with_truncation(cfg.max_position_embeddings)?;
        if tokenizer.vocab_size() > cfg.vocab_size {
            bail!(Config, "tokenizer has {} tokens but the model only {}", tokenizer.vocab_size(), cfg.vocab_size);
        }
        let prefix = match task {
            EncoderTask::Classification => "bert.",
            EncoderTask::Embedding => "",
        };
        let labels = cfg.labels.clone();
        let model = Bert::from_weights(cfg, shard_tensors(shards)?, prefix, &compute.device)?;
        let head = match (&model.classifier, task) {
            (Some((w, b)), EncoderTask::Classification) => Some(ClassifierHead::from_host(w, b, &compute.device)?),
            _ => None,
        };
        let labels = if head.as_ref().is_some_and(|h| h.num_labels() == labels.len()) { labels } else { Vec::new() };
        Ok(EncoderSession { compute, model, tokenizer, task, lora: None, head, labels, temperature: 1.0 })
    }

    /// Tokenise texts (truncated to `max_len` tokens) into one right-padded batch.
    pub fn encode(&self, texts: &[&str], max_len: usize) -> Result<EncodedBatch> {
        encode_texts(&self.tokenizer, &self.model.config, texts, max_len)
    }

    /// A new LoRA adapter from a peft LoRA config (its `task_type` is set to the session's).
    pub fn add_lora(&mut self, mut config: LoraConfig, seed: u64) -> Result<()> {
        config.task_type = Some(self.peft_task_type().into());
        if self.task == EncoderTask::Classification {
            config.modules_to_save.retain(|m| m != "classifier" && m != "score");
            config.modules_to_save.push("classifier".into());
        }
        self.lora = Some(LoraAdapter::new(config, &self.model, seed)?);
        Ok(())
    }

    fn peft_task_type(&self) -> &'static str {
        match self.task {
            EncoderTask::Classification => "SEQ_CLS",
            EncoderTask::Embedding => "FEATURE_EXTRACTION",
        }
    }

    /// Load a peft adapter (LoRA; for classification with its `classifier` head) and, when
    /// given, `webpeft_head.json` (labels, temperature).
    pub fn load_adapter(&mut self, config_json: &str, weights: &[u8], head_json: Option<&str>) -> Result<()> {
        let config = LoraConfig::from_json(config_json).map_err(|e| e.context("adapter_config.json"))?;
        let mut tensors = crate::peft::read_weights(weights)?;
        let head_keys = ["base_model.model.classifier.weight", "base_model.model.classifier.bias"];
        let head = match (tensors.remove(head_keys[0]), tensors.remove(head_keys[1])) {
            (Some(w), Some(b)) if self.task == EncoderTask::Classification => {
                if w.shape.len() != 2 || w.shape[1] != self.model.config.hidden_size || b.shape != [w.shape[0]] {
                    bail!(Shape, "adapter_model.safetensors: classifier weight {:?} / bias {:?} do not fit hidden size {}", w.shape, b.shape, self.model.config.hidden_size);
                }
                Some(ClassifierHead::from_host(&w, &b, &self.compute.device)?)
            }
            (None, None) if self.task == EncoderTask::Classification => bail!(Format, "adapter_model.safetensors: no classifier head (base_model.model.classifier.weight/bias)"),
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => bail!(Format, "adapter_model.safetensors: classifier weight and bias must come together"),
            _ => bail!(Config, "this adapter carries a classifier head: load it for classification"),
        };
        let mut lora = LoraAdapter::new(config, &self.model, 0)?;
        load_all_params(&mut lora, &tensors)?;
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
        self.lora = Some(lora);
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
        let lora = self.lora.as_mut().ok_or_else(|| err!(Config, "no adapter to save"))?;
        let config = lora.config.to_json();
        let mut tuned = Tuned { lora: Some(lora), head: self.head.as_mut() };
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
        (self.lora.as_ref().map_or(&NoHook as &dyn Adapter, |l| l as &dyn Adapter), self.head.as_ref())
    }

    /// Classifier logits of texts, [texts][labels] (at temperature 1).
    pub async fn logits(&self, texts: &[&str], seq_len: usize, batch: usize) -> Result<Vec<Vec<f32>>> {
        let (adapter, head) = self.view();
        let head = head.ok_or_else(|| err!(Config, "no classification head: train or load a classifier adapter first"))?;
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(batch.max(1)) {
            let b = self.encode(chunk, seq_len)?;
            let l = read(head_logits(&self.model, &b, adapter, head, &self.compute.device)?).await?;
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
        let h = self.model.config.hidden_size;
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(batch.max(1)) {
            let b = self.encode(chunk, seq_len)?;
            let ids = ints(b.ids.clone(), [b.rows, b.len], &self.compute.device);
            let hidden = self.model.hidden(ids, Some(&b.mask), adapter)?;
            let e = read(Bert::mean_pool(hidden, &b.mask, b.rows)).await?;
            out.extend(e.data.chunks(h).map(<[f32]>::to_vec));
        }
        Ok(out)
    }

    /// One optimizer step of the adapter and the head on `texts` with label ids `labels`
    /// (as a training run takes each batch; for tests and custom loops).
    pub async fn train_step(&mut self, trainer: &mut Trainer, texts: &[&str], labels: &[usize], weights: Option<&[f32]>, seq_len: usize) -> Result<StepStats> {
        let b = self.encode(texts, seq_len)?;
        let device = self.compute.device.clone();
        let mut tuned = Tuned { lora: self.lora.as_mut(), head: self.head.as_mut() };
        if tuned.head.is_none() {
            bail!(Config, "no classification head");
        }
        set_trainable(&mut tuned, true);
        let r = classifier_step(trainer, &self.model, &mut tuned, &b, labels, weights, &device).await;
        set_trainable(&mut tuned, false);
        r
    }

    /// The adapter's and the head's trainable tensors by their peft names, in PyTorch layout.
    pub async fn trainable_tensors(&mut self) -> Result<BTreeMap<String, HostTensor>> {
        read_params(&mut Tuned { lora: self.lora.as_mut(), head: self.head.as_mut() }).await
    }

    /// Train the LoRA adapter and the classification head on labelled examples: stratified
    /// validation split, per-epoch metrics, optional class weights, early stopping and
    /// temperature scaling. `on_epoch` gets each epoch's report and may return false to stop.
    pub async fn train_classifier(&mut self, data: &[Labeled], o: &ClassifyOptions, mut on_epoch: impl FnMut(&EpochReport) -> bool) -> Result<ClassifyReport> {
        if self.task != EncoderTask::Classification {
            bail!(Config, "this session was loaded for embeddings, not classification");
        }
        if o.epochs == 0 || o.batch == 0 || o.seq_len < 2 || !(o.lr.is_finite() && o.lr > 0.0) {
            bail!(Config, "epochs and batch must be >= 1, seq-len >= 2 and lr a positive number");
        }
        if !(0.0..1.0).contains(&o.val_fraction) {
            bail!(Config, "the validation fraction must be in [0, 1)");
        }
        if self.lora.is_none() {
            bail!(Config, "no LoRA adapter: add one before training");
        }
        let known = if self.head.is_some() { self.labels.clone() } else { Vec::new() };
        let (labels, ids) = classify::label_ids(data, &known)?;
        if let Some(h) = &self.head
            && h.num_labels() != labels.len()
        {
            bail!(Config, "the head has {} labels, the data {}", h.num_labels(), labels.len());
        }
        if self.head.is_none() {
            self.head = Some(ClassifierHead::new(self.model.config.hidden_size, labels.len(), o.seed, &self.compute.device)?);
        }
        self.labels = labels.clone();
        self.temperature = 1.0;
        let (train, val) = classify::stratified_split(&ids, labels.len(), o.val_fraction, o.seed);
        if train.is_empty() {
            bail!(Data, "no training examples left after the validation split");
        }
        let weights = o.class_weights.then(|| classify::balanced_weights(&train.iter().map(|&i| ids[i]).collect::<Vec<_>>(), labels.len()));
        // Tokenise once: rows of token ids.
        let tokenized: Vec<Vec<u32>> = data.iter().map(|d| encode_row(&self.tokenizer, &d.text, o.seq_len.min(self.model.config.max_position_embeddings))).collect::<Result<_>>()?;
        let pad = self.model.config.pad_token_id.unwrap_or(0) as i64;
        let steps_per_epoch = train.len().div_ceil(o.batch);
        let total = o.max_steps.unwrap_or(usize::MAX).min(steps_per_epoch * o.epochs).max(1);
        let config = TrainConfig {
            optim: AdamWConfig { lr: o.lr, weight_decay: o.weight_decay, ..Default::default() },
            schedule: o.schedule,
            warmup: o.warmup,
            total_steps: total,
            max_grad_norm: o.max_grad_norm,
            seed: o.seed,
            ..Default::default()
        };
        let mut trainer = Trainer::new(config);
        let mut order = train.clone();
        let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(o.seed);
        let mut epochs: Vec<EpochReport> = Vec::new();
        // (validation loss, epoch, the trainable tensors then)
        let mut best: Option<(f64, usize, BTreeMap<String, HostTensor>)> = None;
        let mut steps = 0usize;
        let val_rows: Vec<&[u32]> = val.iter().map(|&i| tokenized[i].as_slice()).collect();
        let val_labels: Vec<usize> = val.iter().map(|&i| ids[i]).collect();
        let device = self.compute.device.clone();
        let model = &self.model;
        let mut tuned = Tuned { lora: self.lora.as_mut(), head: self.head.as_mut() };
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
                    let b = pad_rows(&chunk.iter().map(|&i| tokenized[i].as_slice()).collect::<Vec<_>>(), pad);
                    let y: Vec<usize> = chunk.iter().map(|&i| ids[i]).collect();
                    let stats = classifier_step(&mut trainer, model, &mut tuned, &b, &y, weights.as_deref(), &device).await?;
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
                    let logits = batched_logits(model, &tuned, &val_rows, o.batch, pad, &device).await?;
                    Some(classify::metrics(&logits, &val_labels, 1.0))
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
async fn classifier_step(
    trainer: &mut Trainer,
    model: &Bert,
    tuned: &mut Tuned<'_>,
    b: &EncodedBatch,
    y: &[usize],
    weights: Option<&[f32]>,
    device: &burn::tensor::Device,
) -> Result<StepStats> {
    let real = b.mask.iter().filter(|&&m| m != 0).count();
    let denom = classify::loss_denominator(y, weights);
    trainer
        .step_loss(tuned, 1, real, |t, _| {
            let head = t.head.as_deref().ok_or_else(|| err!(Config, "no classification head"))?;
            classify::cross_entropy(head_logits(model, b, t, head, device)?, y, weights, denom)
        })
        .await
}

/// One text's token ids, truncated to `max_len` keeping the closing special token (as the
/// tokenizer's own truncation does).
fn encode_row(tokenizer: &Tokenizer, text: &str, max_len: usize) -> Result<Vec<u32>> {
    let mut ids = tokenizer.encode(text)?;
    if ids.len() > max_len {
        let last = *ids.last().expect("non-empty");
        ids.truncate(max_len - 1);
        ids.push(last);
    }
    Ok(ids)
}

/// Rows of token ids as one batch padded on the right with `pad`.
fn pad_rows(rows: &[&[u32]], pad: i64) -> EncodedBatch {
    let len = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(rows.len() * len);
    let mut mask = Vec::with_capacity(rows.len() * len);
    for r in rows {
        ids.extend(r.iter().map(|&i| i as i64).chain(std::iter::repeat_n(pad, len - r.len())));
        mask.extend(std::iter::repeat_n(1i64, r.len()).chain(std::iter::repeat_n(0, len - r.len())));
    }
    EncodedBatch { ids, mask, rows: rows.len(), len }
}

fn encode_texts(tokenizer: &Tokenizer, config: &BertConfig, texts: &[&str], max_len: usize) -> Result<EncodedBatch> {
    if texts.is_empty() {
        bail!(Data, "no texts");
    }
    let max_len = max_len.clamp(2, config.max_position_embeddings);
    let rows: Vec<Vec<u32>> = texts.iter().map(|t| encode_row(tokenizer, t, max_len)).collect::<Result<_>>()?;
    Ok(pad_rows(&rows.iter().map(Vec::as_slice).collect::<Vec<_>>(), config.pad_token_id.unwrap_or(0) as i64))
}

/// Logits [B, labels] of an encoded batch through `adapter` and `head`.
fn head_logits(model: &Bert, b: &EncodedBatch, adapter: &dyn Adapter, head: &ClassifierHead, device: &burn::tensor::Device) -> Result<Tensor<2>> {
    let ids = ints(b.ids.clone(), [b.rows, b.len], device);
    let h = model.hidden(ids, Some(&b.mask), adapter)?;
    Ok(head.forward(model.pool(h, b.rows)?))
}

/// Host logits of token rows, in batches (no gradients).
async fn batched_logits(model: &Bert, tuned: &Tuned<'_>, rows: &[&[u32]], batch: usize, pad: i64, device: &burn::tensor::Device) -> Result<Vec<Vec<f32>>> {
    let head = tuned.head.as_deref().ok_or_else(|| err!(Config, "no classification head"))?;
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(batch.max(1)) {
        let b = pad_rows(chunk, pad);
        let l = read(head_logits(model, &b, tuned, head, device)?.detach()).await?;
        out.extend(l.data.chunks(head.num_labels()).map(<[f32]>::to_vec));
    }
    Ok(out)
}
