//! The high-level API shared by the CLI and the JavaScript bindings: a loaded model with its
//! tokenizer, named adapters over it, and logits / training / generation calls.

use crate::quant::BaseFormat;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use web_time::Instant;

use crate::device::{Compute, memory_usage};
use crate::error::{Result, bail, err};
use crate::generate::{GenerateOptions, generate};
use crate::io::gguf::Gguf;
use crate::io::safetensors::HostTensor;
use crate::io::source::ModelFiles;
use crate::models::hooks::{Adapter, PerRow, Stack};
use crate::models::llama::{Inputs, Llama};
use crate::peft::lora::combine::{CombineOptions, Weighted, add_weighted_adapter};
use crate::peft::lora::{LoraAdapter, LoraConfig};
use crate::peft::{AnyAdapter, Group, MultiTask, Trainable, load_all_params, read_params, set_trainable};
use crate::tensor::{ints, read};
use crate::tokenizer::Tokenizer;
use crate::train::checkpoint::Checkpoint;
use crate::train::data::{Batch, Batcher, Example, Tokenized, tokenize, tokenize_all};
use crate::train::loss::{causal_lm_loss, row_nll};
use crate::train::memory;
use crate::train::privacy::{self, DpConfig};
use crate::train::{AdamWConfig, Schedule, StepStats, TrainConfig, Trainer};

pub struct Session {
    pub compute: Compute,
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub adapters: BTreeMap<String, AnyAdapter>,
    /// Adapters folded into the weights, in merge order, with what to restore.
    pub merged: Vec<(String, AnyAdapter, crate::peft::merge::Merged)>,
}

/// Options of a training run (the CLI's flags).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub steps: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub warmup: usize,
    pub schedule: Schedule,
    pub weight_decay: f64,
    pub max_grad_norm: Option<f64>,
    pub seed: u64,
    pub append_eos: bool,
    /// DP-SGD (per-example clipping, noise, accountant); `max_grad_norm` then does not apply.
    pub dp: Option<DpConfig>,
    /// Hand out a [`Checkpoint`] in the step report every this many steps (and after the
    /// last); 0 = never.
    pub checkpoint_every: usize,
    /// The most memory a training step may use, in MiB (e.g. what a browser tab can spare):
    /// larger batches run as micro-batches to stay within it.
    pub memory_budget_mib: Option<u64>,
    /// Continue the run this checkpoint was taken from (same data and settings): the result
    /// is the one the uninterrupted run gives, to the byte.
    pub resume: Option<Checkpoint>,
    /// Pause: once the flag is set (from another task, e.g. a UI's pause button, while the
    /// run awaits the device), the run stops after the current step and that step's report
    /// carries a checkpoint (`paused: true`), from which `resume` continues to the byte.
    pub pause: Option<Arc<AtomicBool>>,
    /// Held-out examples: their mean loss (adapter in eval mode, no dropout) is reported in
    /// `StepReport::eval` every `eval_every` steps and after the last. Empty = none.
    pub validation: Vec<Example>,
    /// Evaluate on `validation` every this many steps (0 = only after the last).
    pub eval_every: usize,
    /// Gradient checkpointing (recompute activations in the backward pass: far less memory,
    /// one more forward pass): `Some` forces it on or off; `None` turns it on when the memory
    /// plan needs it to keep the batch whole.
    pub gradient_checkpointing: Option<bool>,
}

impl TrainOptions {
    /// What decides a run's course: a checkpoint resumes only under the same.
    fn fingerprint(&self, data: &Batcher, tasks: &[String]) -> serde_json::Value {
        serde_json::json!({
            "steps": self.steps, "batch": self.batch, "seq_len": self.seq_len, "grad_accum": self.grad_accum, "lr": self.lr, "warmup": self.warmup,
            "schedule": format!("{:?}", self.schedule), "weight_decay": self.weight_decay, "max_grad_norm": self.max_grad_norm, "seed": self.seed,
            "append_eos": self.append_eos, "dp": self.dp.map(|d| format!("{d:?}")), "examples": data.num_rows(), "data_sha256": data.digest(), "tasks": tasks,
        })
    }
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            steps: 10,
            batch: 1,
            seq_len: 128,
            grad_accum: 1,
            lr: 2e-4,
            warmup: 0,
            schedule: Schedule::Constant,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            seed: 0,
            append_eos: false,
            dp: None,
            checkpoint_every: 0,
            memory_budget_mib: None,
            resume: None,
            pause: None,
            validation: Vec::new(),
            eval_every: 0,
            gradient_checkpointing: None,
        }
    }
}

/// Held-out evaluation.
#[derive(Debug, Clone)]
pub struct EvalReport {
    /// Mean next-token cross-entropy over the counted positions.
    pub loss: f64,
    pub targets: usize,
    /// With choices: the fraction of examples whose completion scored highest.
    pub accuracy: Option<f64>,
}

/// What a training run would take ([`Session::estimate`]).
#[derive(Debug, Clone)]
pub struct RunEstimate {
    pub plan: memory::Plan,
    pub trainable: usize,
    /// Measured: one optimizer step over one row of `seq_len` tokens.
    pub row_seconds: Option<f64>,
    /// Estimated from it: one optimizer step (every row of the batch and its accumulation).
    pub step_seconds: Option<f64>,
    /// The FLOPs of one optimizer step (every row of the batch and its accumulation), as
    /// [`flops`](crate::train::flops) counts them.
    pub step_flops: crate::train::flops::StepFlops,
}

/// One step's report for progress displays.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub stats: StepStats,
    pub seconds: f64,
    pub tokens_per_second: f64,
    pub epoch: usize,
    /// Device memory in use after the step (bytes), when the backend reports it.
    pub memory_in_use: Option<u64>,
    /// Multi-task training: the adapter of each entry of `stats.task_losses`.
    pub task_names: Vec<String>,
    /// DP-SGD: the (ε, δ = `dp.delta`) spent so far, from the RDP accountant.
    pub epsilon: Option<f64>,
    /// The run's state after this step, every `checkpoint_every` steps and after the last
    /// (only in the report passed to `on_step`; not kept in the returned list).
    pub checkpoint: Option<Checkpoint>,
    /// The run stops here because `TrainOptions::pause` was set (the checkpoint is there).
    pub paused: bool,
    /// The steps of the whole run (`TrainOptions::steps`).
    pub total_steps: usize,
    /// The loss on `TrainOptions::validation` after this step, when one was due.
    pub eval: Option<EvalReport>,
}

impl Session {
    /// Upload a model's weights and build its tokenizer.
    /// Load a decoder, its base held as this device does by default
    /// ([`BaseFormat::default_for`]: a GGUF's quantization kept on a GPU, the rest in f16 on
    /// hardware with fast f16; f32 on the CPU).
    pub fn load(files: &ModelFiles, compute: Compute) -> Result<Self> {
        let format = BaseFormat::default_for(&compute);
        Self::load_as(files, compute, format)
    }

    /// Load a decoder with its weight matrices held in `format` (f32, a GGUF's own block
    /// formats, or quantized at load).
    pub fn load_as(files: &ModelFiles, compute: Compute, format: BaseFormat) -> Result<Self> {
        let format = format.check_device(&compute.device)?;
        let (weights, tokenizer) = decoder_parts(files, format)?;
        let model = Llama::from_weights(weights, &compute.device)?;
        Ok(Session { compute, model, tokenizer, adapters: BTreeMap::new(), merged: Vec::new() })
    }

    fn adapter(&self, name: &str) -> Result<&AnyAdapter> {
        self.adapters.get(name).ok_or_else(|| err!(Config, "no adapter named {name:?}"))
    }

    /// Several adapters applied together, in the given order.
    pub fn stack(&self, names: &[&str]) -> Result<Stack<'_>> {
        Ok(Stack(names.iter().map(|n| self.adapter(n).map(|a| a as &dyn Adapter)).collect::<Result<_>>()?))
    }

    /// Add a new adapter from a peft config (any supported `peft_type`).
    pub fn add_adapter(&mut self, name: &str, config: &serde_json::Value, seed: u64) -> Result<()> {
        let a = AnyAdapter::new(config, &self.model, &self.tokenizer, seed)?;
        self.adapters.insert(name.to_string(), a);
        Ok(())
    }

    pub fn add_lora(&mut self, name: &str, config: LoraConfig, seed: u64) -> Result<()> {
        let a = LoraAdapter::new(config, &self.model, seed)?;
        self.adapters.insert(name.to_string(), AnyAdapter::Lora(a));
        Ok(())
    }

    pub fn load_adapter(&mut self, name: &str, config_json: &str, weights: &[u8]) -> Result<()> {
        let a = AnyAdapter::from_peft(config_json, weights, &self.model)?;
        self.adapters.insert(name.to_string(), a);
        Ok(())
    }

    /// Fold adapter `name` into the base weights (LoRA, DoRA, IA3): afterwards the plain model
    /// computes what model + adapter did, at no extra cost. The adapter leaves `adapters`.
    pub fn merge_adapter(&mut self, name: &str) -> Result<()> {
        let a = self.adapters.remove(name).ok_or_else(|| err!(Config, "no adapter named {name:?}"))?;
        match crate::peft::merge::merge(&mut self.model, &a) {
            Ok(m) => {
                self.merged.push((name.to_string(), a, m));
                Ok(())
            }
            Err(e) => {
                self.adapters.insert(name.to_string(), a);
                Err(e)
            }
        }
    }

    /// Undo [`Session::merge_adapter`] of the most recently merged adapter: the original
    /// weights come back exactly.
    pub fn unmerge_adapter(&mut self, name: &str) -> Result<()> {
        match self.merged.last() {
            Some((n, ..)) if n == name => {}
            Some((n, ..)) if self.merged.iter().any(|(m, ..)| m == name) => bail!(Config, "unmerge {n:?} first (adapters unmerge in reverse merge order)"),
            _ => bail!(Config, "no merged adapter named {name:?}"),
        }
        let (n, a, m) = self.merged.pop().expect("checked");
        crate::peft::merge::unmerge(&mut self.model, m);
        self.adapters.insert(n, a);
        Ok(())
    }

    /// Drop adapter `name` (the base is untouched).
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        if self.merged.iter().any(|(n, ..)| n == name) {
            bail!(Config, "adapter {name:?} is merged into the weights: unmerge it first");
        }
        self.adapters.remove(name).map(|_| ()).ok_or_else(|| err!(Config, "no adapter named {name:?}"))
    }

    /// The loaded adapters: (name, method), by name.
    pub fn adapter_list(&self) -> Vec<(String, &'static str)> {
        self.adapters.iter().map(|(n, a)| (n.clone(), a.method())).collect()
    }

    /// A new LoRA adapter `new_name` combining LoRA adapters with weights, as peft's
    /// `add_weighted_adapter` (see [`crate::peft::lora::combine`]).
    pub async fn add_weighted_adapter(&mut self, new_name: &str, parts: &[(&str, f64)], o: &CombineOptions) -> Result<()> {
        if self.adapters.contains_key(new_name) {
            bail!(Config, "an adapter named {new_name:?} exists already");
        }
        let mut files = Vec::new();
        for (name, _) in parts {
            let a = self.adapters.get_mut(*name).ok_or_else(|| err!(Config, "no adapter named {name:?}"))?;
            let AnyAdapter::Lora(l) = a else { bail!(Unsupported, "adapter {name:?} is {}: only LoRA adapters can be combined", a.method()) };
            files.push((l.config.clone(), read_params(l).await?));
        }
        let inputs: Vec<Weighted<'_>> = files.iter().zip(parts).map(|((config, tensors), (_, weight))| Weighted { config, tensors, weight: *weight }).collect();
        let (config, tensors) = add_weighted_adapter(&inputs, o)?;
        let mut a = LoraAdapter::new(config, &self.model, 0)?;
        load_all_params(&mut a, &tensors)?;
        self.adapters.insert(new_name.to_string(), AnyAdapter::Lora(a));
        Ok(())
    }

    /// The model as a Hugging Face folder (`config.json`, `model.safetensors`,
    /// `tokenizer.json`, `tokenizer_config.json`), with the merged adapters folded in.
    pub async fn export_model(&self) -> Result<Vec<(String, Vec<u8>)>> {
        crate::io::export::hf_folder(&self.model, &self.tokenizer).await
    }

    /// Logits [rows, T, vocab] of several sequences in one batch, each with its own adapter
    /// (`None`: the frozen model), like peft's `adapter_names=`. Shorter rows are padded on
    /// the right; their logits past the end are meaningless.
    pub async fn logits_per_row(&self, rows: &[Vec<u32>], adapters: &[Option<&str>]) -> Result<HostTensor> {
        if rows.is_empty() || rows.len() != adapters.len() {
            bail!(Config, "give one adapter (or none) per row: {} rows, {} adapters", rows.len(), adapters.len());
        }
        let v = self.model.config.vocab_size;
        let t = rows.iter().map(Vec::len).max().unwrap_or(0);
        if rows.iter().any(Vec::is_empty) {
            bail!(Data, "an empty row");
        }
        if let Some(bad) = rows.iter().flatten().find(|&&i| i as usize >= v) {
            bail!(Data, "token id {bad} is outside the vocabulary ({v})");
        }
        let mut names: Vec<&str> = adapters.iter().flatten().copied().collect();
        names.sort();
        names.dedup();
        let mut parts: Vec<&dyn Adapter> = Vec::new();
        for n in &names {
            let a = self.adapter(n)?;
            if !a.mixable() {
                bail!(Unsupported, "adapter {n:?} ({}) cannot be mixed per row: only LoRA (without modules_to_save / trained biases), IA3 and bottleneck adapters", a.method());
            }
            parts.push(a);
        }
        let which: Vec<Option<usize>> = adapters.iter().map(|a| a.map(|n| names.iter().position(|m| *m == n).expect("listed"))).collect();
        let hook = PerRow::new(parts, &which, t, &self.model.device);
        let pad = self.tokenizer.eos_id.unwrap_or(0) as i64;
        let mut ids = Vec::with_capacity(rows.len() * t);
        let mut mask = Vec::with_capacity(rows.len() * t);
        for r in rows {
            ids.extend(r.iter().map(|&i| i as i64).chain(std::iter::repeat_n(pad, t - r.len())));
            mask.extend(std::iter::repeat_n(1i64, r.len()).chain(std::iter::repeat_n(0, t - r.len())));
        }
        let ragged = mask.contains(&0);
        let inputs = Inputs { ids: ints(ids, [rows.len(), t], &self.model.device), attention_mask: ragged.then_some(mask) };
        read(self.model.forward(&inputs, &hook, None)?).await
    }

    pub async fn save_adapter(&mut self, name: &str) -> Result<(String, Vec<u8>)> {
        self.adapters.get_mut(name).ok_or_else(|| err!(Config, "no adapter named {name:?}"))?.to_peft().await
    }

    /// Logits [1, T, vocab] for token ids, with the named adapters applied together.
    pub async fn logits(&self, ids: &[u32], adapters: &[&str]) -> Result<HostTensor> {
        if ids.is_empty() {
            bail!(Data, "no tokens");
        }
        let v = self.model.config.vocab_size;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= v) {
            bail!(Data, "token id {bad} is outside the vocabulary ({v})");
        }
        let inputs = Inputs { ids: ints(ids.iter().map(|&i| i as i64).collect(), [1, ids.len()], &self.model.device), attention_mask: None };
        read(self.model.forward(&inputs, &self.stack(adapters)?, None)?).await
    }

    pub async fn generate(&self, prompt: &str, chat: bool, opts: &GenerateOptions, adapters: &[&str], on_token: impl FnMut(u32) -> bool) -> Result<String> {
        let text = if chat { self.tokenizer.apply_chat_template(&[("user".into(), prompt.into())], true)? } else { prompt.to_string() };
        let ids = self.tokenizer.encode(&text)?;
        let mut opts = opts.clone();
        if opts.stop.is_none() {
            opts.stop = self.tokenizer.eos_id;
        }
        let out = generate(&self.model, &self.stack(adapters)?, &ids, &opts, on_token).await?;
        self.tokenizer.decode(&out, true)
    }

    /// Mean next-token loss of `examples` (tokenised as for training) with the named adapters.
    /// With `choices`, also the accuracy of picking each prompt/completion example's
    /// completion among `choices` by total log-likelihood (classification with an LM).
    pub async fn evaluate(&self, adapters: &[&str], examples: &[Example], seq_len: usize, batch: usize, choices: &[String]) -> Result<EvalReport> {
        let stack = self.stack(adapters)?;
        let rows = tokenize_all(&self.tokenizer, examples, false, seq_len)?;
        let pad = self.tokenizer.eos_id.unwrap_or(0);
        let held_out = held_out_loss(&self.model, &stack, &rows, batch, pad).await?;
        let mut accuracy = None;
        if !choices.is_empty() {
            let mut right = 0usize;
            let mut total = 0usize;
            for e in examples {
                let Example::PromptCompletion { prompt, completion } = e else {
                    continue;
                };
                let rows = choices
                    .iter()
                    .map(|c| tokenize(&self.tokenizer, &Example::PromptCompletion { prompt: prompt.clone(), completion: c.clone() }, false, seq_len))
                    .collect::<Result<Vec<_>>>()?;
                let b = Batch::new(&rows, pad)?;
                let scores: Vec<f32> = read(row_nll(&self.model, &stack, &b)?).await?.data.iter().map(|x| -x).collect();
                let best = scores.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i);
                total += 1;
                if best.is_some_and(|i| choices[i].trim() == completion.trim()) {
                    right += 1;
                }
            }
            if total == 0 {
                bail!(Data, "choices need prompt/completion examples");
            }
            accuracy = Some(right as f64 / total as f64);
        }
        Ok(EvalReport { accuracy, ..held_out })
    }

    /// Train adapter `name` on `examples`; `on_step` gets a report after every step and may
    /// return false to stop early.
    pub async fn train(&mut self, name: &str, examples: &[Example], o: &TrainOptions, on_step: impl FnMut(&StepReport) -> bool) -> Result<Vec<StepReport>> {
        self.train_together(&[name], examples, o, on_step).await
    }

    /// Train several adapters at once (a hybrid of methods): they are applied together and
    /// their parameters share one optimizer.
    pub async fn train_together(&mut self, names: &[&str], examples: &[Example], o: &TrainOptions, on_step: impl FnMut(&StepReport) -> bool) -> Result<Vec<StepReport>> {
        check_options(o)?;
        let rows = tokenize_all(&self.tokenizer, examples, o.append_eos, o.seq_len)?;
        let held_out = tokenize_all(&self.tokenizer, &o.validation, o.append_eos, o.seq_len).map_err(|e| e.context("validation"))?;
        let pad = self.tokenizer.eos_id.unwrap_or(0);
        let batcher = Batcher::new(rows, o.batch, pad, o.seed)?;
        let members = pick(&mut self.adapters, names)?;
        run_training(&self.model, &self.compute, &mut Group(members), batcher, o, &[], &held_out, on_step).await
    }

    /// What training adapters `names` under `o` will take: the memory estimate and the
    /// micro-batching that fits the device's largest buffer (an error names the setting to
    /// change when nothing fits). Training applies the same plan.
    pub fn memory_plan(&mut self, names: &[&str], o: &TrainOptions) -> Result<memory::Plan> {
        check_options(o)?;
        let members = pick(&mut self.adapters, names)?;
        plan_memory(&self.model, &self.compute, &mut Group(members), o)
    }

    /// What a run would take, before starting it: the memory plan of a new adapter made from
    /// `config` (as [`Session::add_adapter`]) trained under `o`, its trainable values, and with
    /// `probe` the measured time of one optimizer step over a single row of `o.seq_len`
    /// tokens, timed on a second step after the first compiled the kernels; a step of the run
    /// is put at that time per row (an upper bound: the fixed costs of a step are counted per
    /// row). Nothing is kept.
    pub async fn estimate(&mut self, config: &serde_json::Value, o: &TrainOptions, probe: bool) -> Result<RunEstimate> {
        const NAME: &str = "\u{0}estimate";
        self.add_adapter(NAME, config, o.seed)?;
        let result = async {
            let plan = self.memory_plan(&[NAME], o)?;
            let adapter = self.adapters.get_mut(NAME).expect("just added");
            let trainable = adapter.num_parameters();
            let step_flops = crate::train::flops::training_step(&self.model, adapter, o.batch * o.grad_accum, o.seq_len);
            let row_seconds = if probe {
                let ids: Vec<u32> = (0..o.seq_len as u32).map(|i| 100 + i % 1000).collect();
                let b = Batch::new(&[Tokenized { labels: ids.iter().map(|&i| i as i64).collect(), ids }], self.tokenizer.eos_id.unwrap_or(0))?;
                set_trainable(adapter, true);
                // A real optimizer step (forward, backward, clipping, AdamW, the reads it does)
                // on the throw-away adapter: what a step costs beyond the rows themselves too.
                let mut trainer = Trainer::new(TrainConfig {
                    optim: AdamWConfig { lr: o.lr, ..Default::default() },
                    max_grad_norm: o.max_grad_norm,
                    total_steps: 2,
                    gradient_checkpointing: plan.checkpointing,
                    ..Default::default()
                });
                let r = async {
                    trainer.step(&self.model, adapter, std::slice::from_ref(&b)).await?;
                    let t0 = Instant::now();
                    trainer.step(&self.model, adapter, std::slice::from_ref(&b)).await?;
                    Ok::<f64, crate::Error>(t0.elapsed().as_secs_f64())
                }
                .await;
                Some(r?)
            } else {
                None
            };
            let rows_per_step = (o.batch * o.grad_accum) as f64;
            Ok(RunEstimate { step_seconds: row_seconds.map(|f| f * rows_per_step), row_seconds, plan, trainable, step_flops })
        }
        .await;
        self.adapters.remove(NAME); // with its autodiff state: nothing of the probe stays
        result
    }

    /// Multi-task training: task `k`'s examples train adapter `tasks[k].0`, all over the shared
    /// base in one run. Batches mix the tasks' rows (in proportion to their sizes), each row
    /// routed to its task's adapter; each step reports every task's loss (`task_losses`).
    pub async fn train_multitask(&mut self, tasks: &[(&str, &[Example])], o: &TrainOptions, on_step: impl FnMut(&StepReport) -> bool) -> Result<Vec<StepReport>> {
        check_options(o)?;
        if tasks.is_empty() {
            bail!(Config, "no tasks");
        }
        if !o.validation.is_empty() {
            bail!(Unsupported, "a validation set with multi-task training: evaluate each task's adapter after the run (evaluate)");
        }
        let mut rows = Vec::new();
        let mut labels = Vec::new();
        for (k, (name, examples)) in tasks.iter().enumerate() {
            if examples.is_empty() {
                bail!(Data, "task {name:?} has no examples");
            }
            let task_rows = tokenize_all(&self.tokenizer, examples, o.append_eos, o.seq_len).map_err(|e| e.context(format!("task {name:?}")))?;
            labels.extend(std::iter::repeat_n(k, task_rows.len()));
            rows.extend(task_rows);
        }
        let pad = self.tokenizer.eos_id.unwrap_or(0);
        let batcher = Batcher::with_tasks(rows, labels, o.batch, pad, o.seed)?;
        let names: Vec<&str> = tasks.iter().map(|t| t.0).collect();
        let members = pick(&mut self.adapters, &names)?;
        let mut multi = MultiTask::new(members, &self.model.device)?;
        let task_names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        run_training(&self.model, &self.compute, &mut multi, batcher, o, &task_names, &[], on_step).await
    }
}

/// A decoder's weights (for a base held in `format`) and its tokenizer, checked against each other.
pub fn decoder_parts(files: &ModelFiles, format: BaseFormat) -> Result<(crate::io::source::LoadedWeights, Tokenizer)> {
    let weights = files.load_weights_as(format)?;
    let tokenizer = match files {
        ModelFiles::HfFolder { tokenizer: Some(t), chat_template, .. } => Tokenizer::from_json(t, chat_template.clone(), weights.config.bos_token_id, weights.config.eos_token_id)?,
        ModelFiles::HfFolder { tokenizer: None, .. } => bail!(Io, "tokenizer.json missing from the model folder"),
        ModelFiles::Gguf { bytes, .. } => Tokenizer::from_gguf(&Gguf::parse(bytes)?)?,
    };
    if tokenizer.vocab_size() > weights.config.vocab_size {
        bail!(Config, "tokenizer has {} tokens but the model only {}", tokenizer.vocab_size(), weights.config.vocab_size);
    }
    Ok((weights, tokenizer))
}

/// The memory plan of training `adapter` under `o` on `compute` (see [`memory::plan`]).
fn plan_memory(model: &Llama, compute: &Compute, adapter: &mut dyn Trainable, o: &TrainOptions) -> Result<memory::Plan> {
    let trainable: usize = adapter.params_mut().iter().map(|p| p.tensor.dims().iter().product::<usize>()).sum();
    let prefix = adapter.virtual_tokens();
    let asked = if o.dp.is_some() { 1 } else { o.batch };
    let limits = memory::Limits { max_buffer: compute.max_buffer, budget: o.memory_budget_mib.map(|m| m << 20) };
    memory::plan(&model.config, model.base_memory(), trainable, asked, o.grad_accum, o.seq_len + prefix, limits, o.gradient_checkpointing, model.runs_attention())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn check_options(o: &TrainOptions) -> Result<()> {
    if o.steps == 0 || o.batch == 0 || o.grad_accum == 0 || o.seq_len < 2 {
        bail!(Config, "steps, batch and grad-accum must be >= 1 and seq-len >= 2");
    }
    if !(o.lr.is_finite() && o.lr > 0.0) {
        bail!(Config, "lr must be a positive number");
    }
    Ok(())
}

/// The named adapters, mutably, in the given order.
fn pick<'a>(adapters: &'a mut BTreeMap<String, AnyAdapter>, names: &[&str]) -> Result<Vec<&'a mut AnyAdapter>> {
    if let Some(missing) = names.iter().find(|n| !adapters.contains_key(**n)) {
        bail!(Config, "no adapter named {missing:?}");
    }
    let mut by_name: BTreeMap<&str, &mut AnyAdapter> = adapters.iter_mut().filter(|(k, _)| names.contains(&k.as_str())).map(|(k, a)| (k.as_str(), a)).collect();
    names.iter().map(|n| by_name.remove(n).ok_or_else(|| err!(Config, "adapter {n:?} named twice"))).collect()
}

/// Mean next-token loss of tokenised `rows` under `hook`, `batch` rows at a time.
async fn held_out_loss(model: &Llama, hook: &dyn Adapter, rows: &[Tokenized], batch: usize, pad: u32) -> Result<EvalReport> {
    let n_virtual = hook.virtual_tokens();
    let (mut nll, mut count) = (0f64, 0usize);
    for chunk in rows.chunks(batch.max(1)) {
        let b = Batch::new(chunk, pad)?;
        let n = b.num_targets_with_prefix(n_virtual);
        if n == 0 {
            continue;
        }
        let l = causal_lm_loss(model, hook, &b, 1)?;
        nll += read(l).await?.data[0] as f64;
        count += n;
    }
    if count == 0 {
        bail!(Data, "nothing to evaluate");
    }
    Ok(EvalReport { loss: nll / count as f64, targets: count, accuracy: None })
}

/// The training loop shared by single-adapter, hybrid and multi-task runs; `held_out` rows are
/// evaluated as `o.eval_every` says.
#[allow(clippy::too_many_arguments)]
async fn run_training(
    model: &Llama,
    compute: &Compute,
    adapter: &mut dyn Trainable,
    mut batcher: Batcher,
    o: &TrainOptions,
    task_names: &[String],
    held_out: &[Tokenized],
    mut on_step: impl FnMut(&StepReport) -> bool,
) -> Result<Vec<StepReport>> {
    let mut config = TrainConfig {
        optim: AdamWConfig { lr: o.lr, weight_decay: o.weight_decay, ..Default::default() },
        schedule: o.schedule,
        warmup: o.warmup,
        total_steps: o.steps,
        max_grad_norm: o.max_grad_norm,
        seed: o.seed,
        ..Default::default()
    };
    // DP-SGD: the accountant's RDP of one step, at Opacus's orders.
    let orders = privacy::default_orders();
    let mut dp_rdp = None;
    let dp_config = match o.dp {
        Some(mut dp) => {
            dp.validate()?;
            if dp.noise_multiplier.is_none() {
                let q = ((o.batch * o.grad_accum) as f64 / batcher.num_rows() as f64).min(1.0);
                let target = dp.target_epsilon.expect("validated");
                let sigma = privacy::noise_for_epsilon(target, q, o.steps, dp.delta, 0.01)?;
                log::info!("DP: noise multiplier {sigma:.4} keeps epsilon <= {target} over {} steps at q = {q:.4}", o.steps);
                dp.noise_multiplier = Some(sigma);
            }
            Some(dp)
        }
        None => None,
    };
    if let Some(dp) = dp_config {
        if dp.poisson {
            // One Poisson sample per step (rate batch * grad_accum / N), as the accountant
            // assumes; DP processes examples one by one anyway, so it is not split further.
            batcher.set_poisson_batch(o.batch * o.grad_accum);
        }
        config.dp = Some(dp);
        config.dp_expected_batch = o.batch * o.grad_accum;
        config.max_grad_norm = None;
        let q = ((o.batch * o.grad_accum) as f64 / batcher.num_rows() as f64).min(1.0);
        dp_rdp = Some(privacy::compute_rdp(q, dp.noise_multiplier.expect("resolved"), 1, &orders));
    }
    let epsilon_after = |steps: usize| -> Option<f64> {
        let (dp, rdp) = (dp_config?, dp_rdp.as_ref()?);
        let total: Vec<f64> = rdp.iter().map(|r| r * steps as f64).collect();
        Some(privacy::privacy_spent(&orders, &total, dp.delta).0)
    };
    // Memory: fit the batch to the device's largest buffer (DP runs one example at a time).
    let plan = plan_memory(model, compute, adapter, o)?;
    let est = plan.estimate;
    log::info!(
        "memory estimate: {:.1} MiB (weights {:.1}, adapter + optimizer {:.1}, activations {:.1}{}, attention {:.1}, logits {:.1}); largest buffer {:.1} MiB ({})",
        mib(est.total()),
        mib(est.weights),
        mib(est.adapter),
        mib(est.activations),
        if plan.checkpointing { " with gradient checkpointing" } else { "" },
        mib(est.attention),
        mib(est.logits),
        mib(est.largest_buffer.0),
        est.largest_buffer.1
    );
    let mut grad_accum = o.grad_accum;
    if dp_config.is_none() && plan.batch != o.batch {
        batcher.set_batch(plan.batch);
        grad_accum = plan.grad_accum;
    }
    config.gradient_checkpointing = plan.checkpointing;
    let mut trainer = Trainer::new(config);
    let fingerprint = o.fingerprint(&batcher, task_names);
    let draws = if dp_config.is_some_and(|d| d.poisson) { 1 } else { grad_accum };
    let start = match &o.resume {
        Some(c) => {
            c.restore(adapter, &mut trainer, &fingerprint)?;
            // The batches the first part of the run drew (host-side shuffles only).
            for _ in 0..c.iteration * draws {
                batcher.next_batch()?;
            }
            log::info!("resuming at step {} of {}", c.iteration, o.steps);
            c.iteration
        }
        None => 0,
    };
    set_trainable(adapter, true);
    let mut reports = Vec::new();
    let result = async {
        for step in start..o.steps {
            // Randomness keyed by the step (dropout on the device, DP noise on the host), so a
            // resumed run draws what the uninterrupted one would have.
            compute.device.seed(o.seed ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            trainer.seed_noise(step);
            if let (Some(budget), Some(next)) = (o.dp.and_then(|d| d.target_epsilon), epsilon_after(step + 1))
                && next > budget
            {
                log::warn!("DP: stopping after {step} steps: the next would spend epsilon {next:.3} > budget {budget}");
                break;
            }
            let micro = (0..draws).map(|_| batcher.next_batch()).collect::<Result<Vec<_>>>()?;
            let t0 = Instant::now();
            let stats = trainer.step(model, adapter, &micro).await?;
            let seconds = t0.elapsed().as_secs_f64();
            let paused = o.pause.as_ref().is_some_and(|p| p.load(Ordering::SeqCst)) && step + 1 < o.steps;
            let due = paused || (o.checkpoint_every > 0 && ((step + 1) % o.checkpoint_every == 0 || step + 1 == o.steps));
            let checkpoint = if due { Some(Checkpoint::capture(adapter, &trainer, step + 1, fingerprint.clone()).await?) } else { None };
            let eval_due = !held_out.is_empty() && (step + 1 == o.steps || (o.eval_every > 0 && (step + 1) % o.eval_every == 0));
            let eval = if eval_due {
                // In eval mode (no dropout, no autodiff graph); the next step re-seeds the device.
                set_trainable(adapter, false);
                let r = held_out_loss(model, &*adapter, held_out, plan.batch, batcher.pad_id()).await;
                set_trainable(adapter, true);
                Some(r?)
            } else {
                None
            };
            let mut r = StepReport {
                tokens_per_second: stats.tokens as f64 / seconds.max(1e-9),
                stats,
                seconds,
                epoch: batcher.epoch,
                memory_in_use: memory_usage(&compute.device).map(|m| m.0),
                task_names: task_names.to_vec(),
                epsilon: epsilon_after(step + 1),
                checkpoint,
                paused,
                total_steps: o.steps,
                eval,
            };
            let go_on = on_step(&r) && !paused;
            r.checkpoint = None;
            reports.push(r);
            if !go_on {
                break;
            }
        }
        Ok::<(), crate::Error>(())
    }
    .await;
    set_trainable(adapter, false);
    result.map(|_| reports)
}
