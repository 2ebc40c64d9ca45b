//! The native command line: `webpeft logits | train | generate | eval | export | combine | bench | peak`
//! for generation, `webpeft classify | predict | embed | embed-train` for classification and embeddings.
//! Every subcommand exits non-zero with a one-line reason on bad input.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use web_time::Instant;

use webpeft::device::{self, DeviceChoice};
use webpeft::error::{Error, ErrorCode, Result};
use webpeft::generate::GenerateOptions;
use webpeft::io::safetensors::{self as st, OutTensor};
use webpeft::models::attention::AttentionImpl;
use webpeft::io::source::ModelFiles;
use webpeft::peft::lora::LoraConfig;
use webpeft::peft::targets::Targets;
use webpeft::quant::BaseFormat;
use webpeft::session::{Session, StepReport, TrainOptions};
use webpeft::task::{Backbone, ClassifyOptions, LabeledImage, TaskKind, TaskSession};
use webpeft::tensor::block_on;
use webpeft::train::classify::{Labeled, Metrics, parse_labeled_file};
use webpeft::train::contrastive::parse_pairs_file;
use webpeft::train::data::{Batch, Tokenized, parse_data_file};
use webpeft::train::{Schedule, checkpoint};

#[derive(Parser)]
#[command(name = "webpeft", version, about = "Parameter-efficient fine-tuning on WebGPU (natively: wgpu or CPU)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Common {
    /// A Hugging Face folder (config.json, model.safetensors, tokenizer.json) or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// gpu | cpu | auto (auto: the GPU when wgpu finds one, else Burn's CPU backend).
    #[arg(long, default_value = "auto")]
    device: String,
    /// How the frozen base holds its weight matrices: keep (a GGUF's Q8_0/Q4_0/Q4_1 stay as
    /// they are, dequantized inside the matmul kernels), f32, f16 (matmuls with f16 inputs
    /// and outputs, f32 accumulation, the loss scaled in training; needs shader-f16),
    /// keep-f16 (blocks kept, the rest f16), or q8_0 | q4_0 | q4_1 | nf4 (quantized at load).
    /// Default: keep-f16 on a hardware GPU with shader-f16, keep on other GPUs (lavapipe:
    /// f16 is no faster there), f32 on the CPU backend.
    #[arg(long)]
    base: Option<String>,
    /// blocked (the default: query blocks through the matmul kernels with their own backward,
    /// on a GPU: memory linear in the sequence length) | reference (tensor ops, a T x S score
    /// matrix per head) | fused (flash-attention-style kernels on a GPU: memory linear,
    /// slower on lavapipe). Burn's CPU backend always runs the reference.
    #[arg(long, value_enum)]
    attention: Option<AttentionChoice>,
    /// burn (Burn's matmul) | ours (webpeft's f32 matmul kernel, the browser's default) for the
    /// f32 products on a GPU (attention, LoRA, an f32 base). Default: burn, or what
    /// WEBPEFT_MATMUL says; Burn's CPU backend always runs Burn's.
    #[arg(long, value_enum)]
    matmul: Option<MatmulChoice>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
enum MatmulChoice {
    Burn,
    Ours,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
enum AttentionChoice {
    Blocked,
    Fused,
    Reference,
}

impl AttentionChoice {
    fn imp(self) -> AttentionImpl {
        match self {
            AttentionChoice::Blocked => AttentionImpl::Blocked,
            AttentionChoice::Fused => AttentionImpl::Fused,
            AttentionChoice::Reference => AttentionImpl::Reference,
        }
    }
}

#[derive(Args, Clone)]
struct MethodArgs {
    /// PEFT method: lora | dora | ia3 | prompt-tuning | p-tuning | prefix-tuning | ln-tuning |
    /// adapter (serial bottleneck) | parallel-adapter | bitfit | full | selective.
    /// Repeat to train several methods together (each is saved as its own adapter).
    #[arg(long = "method", default_value = "lora")]
    methods: Vec<String>,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    r: usize,
    /// LoRA alpha (scaling = alpha / r, or alpha / sqrt(r) with --rslora).
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// Target modules (LoRA, IA3): comma-separated names, a regex, or all-linear.
    /// Default: q_proj,v_proj for LoRA; k_proj,v_proj,down_proj for IA3.
    #[arg(long)]
    target: Option<String>,
    #[arg(long)]
    rslora: bool,
    /// LoRA: which base biases train too: none | all | lora_only.
    #[arg(long, default_value = "none")]
    bias: String,
    /// LoRA: a trainable bias on lora_B.
    #[arg(long)]
    lora_bias: bool,
    /// LoRA: modules trained in full and saved whole, comma-separated (e.g. lm_head).
    #[arg(long)]
    modules_to_save: Option<String>,
    /// LoRA init: true | false | gaussian.
    #[arg(long, default_value = "true")]
    init: String,
    /// IA3: modules whose input (not output) is scaled (default down_proj).
    #[arg(long)]
    feedforward: Option<String>,
    /// P-tuning / prefix tuning (with --prefix-projection): hidden size of the encoder MLP.
    #[arg(long, default_value_t = 128)]
    encoder_hidden_size: usize,
    /// Prefix tuning: train the prefix through peft's projection MLP.
    #[arg(long)]
    prefix_projection: bool,
    /// Bottleneck adapters: hidden / bottleneck size.
    #[arg(long, default_value_t = 16)]
    reduction_factor: usize,
    /// Bottleneck adapters: relu | gelu | silu | tanh.
    #[arg(long, default_value = "relu")]
    non_linearity: String,
    /// Bottleneck adapters: where, comma-separated attn,mlp (serial default both, parallel mlp).
    #[arg(long)]
    placement: Option<String>,
    /// Parallel adapter: output scaling.
    #[arg(long, default_value_t = 1.0)]
    adapter_scaling: f64,
    /// Selective tuning: regex over parameter names (e.g. ".*\.bias", ".*norm.*").
    #[arg(long)]
    parameters: Option<String>,
    /// Prompt / prefix / p-tuning: number of virtual tokens.
    #[arg(long, default_value_t = 20)]
    num_virtual_tokens: usize,
    /// Prompt tuning init: random | sample-vocab | text.
    #[arg(long, default_value = "random")]
    prompt_init: String,
    /// Prompt tuning: the text whose token embeddings initialise the prompt (--prompt-init text).
    #[arg(long)]
    prompt_init_text: Option<String>,
}

impl MethodArgs {
    /// (adapter name, peft config) per `--method`: the first is "default" (saved in the
    /// output folder), the others are named after their method (saved in subfolders, as peft
    /// saves several adapters).
    fn configs(&self, model: &Path) -> Result<Vec<(String, serde_json::Value)>> {
        let mut seen = std::collections::HashSet::new();
        self.methods
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if !seen.insert(m) {
                    return Err(Error::new(ErrorCode::Config, format!("--method {m} given twice")));
                }
                Ok((if i == 0 { "default".to_string() } else { m.clone() }, self.config(m, model)?))
            })
            .collect()
    }

    /// The peft `adapter_config.json` of `method` with these flags.
    fn config(&self, method: &str, model: &Path) -> Result<serde_json::Value> {
        let base = model.display().to_string();
        let targets = |default: &str| Targets::from_cli(self.target.as_deref().unwrap_or(default)).to_json();
        Ok(match method {
            "lora" | "dora" => serde_json::json!({
                "use_dora": method == "dora",
                "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
                "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "target_modules": targets("q_proj,v_proj"), "use_rslora": self.rslora,
                "bias": self.bias, "lora_bias": self.lora_bias,
                "modules_to_save": self.modules_to_save.as_deref().map(|m| m.split(',').collect::<Vec<_>>()),
                "init_lora_weights": match self.init.as_str() {
                    "true" => serde_json::json!(true),
                    "false" => serde_json::json!(false),
                    "gaussian" => serde_json::json!("gaussian"),
                    o => return Err(Error::new(ErrorCode::Config, format!("--init {o}: expected true, false or gaussian"))),
                },
            }),
            "ia3" => serde_json::json!({
                "peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
                "target_modules": targets("k_proj,v_proj,down_proj"),
                "feedforward_modules": Targets::from_cli(self.feedforward.as_deref().unwrap_or("down_proj")).to_json(),
            }),
            "prompt-tuning" => serde_json::json!({
                "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
                "num_virtual_tokens": self.num_virtual_tokens,
                "prompt_tuning_init": match self.prompt_init.as_str() {
                    "random" => "RANDOM",
                    "sample-vocab" => "SAMPLE_VOCAB",
                    "text" => "TEXT",
                    o => return Err(Error::new(ErrorCode::Config, format!("--prompt-init {o}: expected random, sample-vocab or text"))),
                },
                "prompt_tuning_init_text": self.prompt_init_text,
            }),
            "p-tuning" => serde_json::json!({
                "peft_type": "P_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
                "num_virtual_tokens": self.num_virtual_tokens, "encoder_reparameterization_type": "MLP",
                "encoder_hidden_size": self.encoder_hidden_size,
            }),
            "prefix-tuning" => serde_json::json!({
                "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
                "num_virtual_tokens": self.num_virtual_tokens, "prefix_projection": self.prefix_projection,
                "encoder_hidden_size": self.encoder_hidden_size,
            }),
            "ln-tuning" => serde_json::json!({
                "peft_type": "LN_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
                "target_modules": targets("input_layernorm,post_attention_layernorm,norm"),
            }),
            "adapter" | "parallel-adapter" => {
                let parallel = method == "parallel-adapter";
                let placement: Vec<&str> = self.placement.as_deref().unwrap_or(if parallel { "mlp" } else { "attn,mlp" }).split(',').collect();
                serde_json::json!({
                    "peft_type": "BOTTLENECK", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
                    "adapter_type": if parallel { "parallel" } else { "serial" }, "reduction_factor": self.reduction_factor,
                    "non_linearity": self.non_linearity, "placement": placement, "scaling": self.adapter_scaling,
                })
            }
            "bitfit" | "full" | "selective" => {
                let parameters = match method {
                    "bitfit" => webpeft::peft::selective::BITFIT.to_string(),
                    "full" => ".*".to_string(),
                    _ => self.parameters.clone().ok_or_else(|| Error::new(ErrorCode::Config, "--method selective needs --parameters REGEX"))?,
                };
                serde_json::json!({"peft_type": "SELECTIVE", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "parameters": parameters})
            }
            other => {
                return Err(Error::new(
                    ErrorCode::Unsupported,
                    format!("--method {other}: supported are lora, dora, ia3, prompt-tuning, p-tuning, prefix-tuning, ln-tuning, adapter, parallel-adapter, bitfit, full, selective"),
                ));
            }
        })
    }
}

/// Differentially private training (DP-SGD).
#[derive(Args, Clone)]
struct DpArgs {
    /// Turn on DP-SGD with this noise multiplier σ (noise std σ·C on the clipped sum);
    /// without it, --dp-epsilon alone picks the smallest σ that keeps ε within it for the run.
    #[arg(long)]
    dp_noise: Option<f64>,
    /// DP-SGD: clip each example's gradient to this norm C.
    #[arg(long, default_value_t = 1.0)]
    dp_clip: f64,
    /// DP-SGD: the δ of the reported (ε, δ).
    #[arg(long, default_value_t = 1e-5)]
    dp_delta: f64,
    /// DP-SGD: stop before ε would pass this budget.
    #[arg(long)]
    dp_epsilon: Option<f64>,
    /// DP-SGD batches: poisson (as the accountant assumes) or shuffle (fixed size).
    #[arg(long, default_value = "poisson")]
    dp_sampling: String,
}

impl DpArgs {
    fn config(&self) -> Result<Option<webpeft::train::privacy::DpConfig>> {
        if self.dp_noise.is_none() && self.dp_epsilon.is_none() {
            return Ok(None);
        }
        let poisson = match self.dp_sampling.as_str() {
            "poisson" => true,
            "shuffle" => false,
            other => return Err(Error::new(ErrorCode::Config, format!("--dp-sampling {other:?} (poisson, shuffle)"))),
        };
        Ok(Some(webpeft::train::privacy::DpConfig { max_grad_norm: self.dp_clip, noise_multiplier: self.dp_noise, delta: self.dp_delta, target_epsilon: self.dp_epsilon, poisson }))
    }
}

/// A LoRA training run on a task (`classify`, `embed-train`): the data, the LoRA and the run's options.
#[derive(Args, Clone)]
struct TaskTrainArgs {
    /// lora | bitfit (every bias of the model, with the head). classify: repeat to compare methods
    /// from the same start (each written to OUT/<method>, with a table of the results).
    #[arg(long = "method", default_value = "lora")]
    methods: Vec<String>,
    /// classify: CSV/TSV with `text` and `label` columns, or JSONL {"text": ..., "label": ...}
    /// (an image classifier: `image` (a path relative to the data file) and `label`);
    /// embed-train: `anchor` and `positive` columns / keys.
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 8)]
    r: usize,
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    #[arg(long, default_value_t = 0.1)]
    dropout: f64,
    /// LoRA target modules (comma-separated, a regex, or all-linear).
    #[arg(long, default_value = "query,value")]
    target: String,
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Stop after this many steps in all.
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    #[arg(long, default_value_t = 5e-4)]
    lr: f64,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    #[arg(long, default_value = "linear")]
    schedule: String,
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// What only `classify` takes.
#[derive(Args, Clone)]
struct ClassifyFlags {
    /// Share of each class held out for validation.
    #[arg(long, default_value_t = 0.1)]
    val_split: f64,
    /// Weight the loss by balanced class weights (for imbalanced labels).
    #[arg(long)]
    class_weights: bool,
    /// Early stopping: epochs without a better validation loss before stopping.
    #[arg(long)]
    patience: Option<usize>,
    /// Skip temperature scaling.
    #[arg(long)]
    no_calibrate: bool,
    /// Also write the run's report (epochs, metrics, temperature) as JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
}

impl TaskTrainArgs {
    /// Add the adapter of `method` to a task session.
    fn add_method(&self, s: &mut TaskSession, method: &str, model: &Path, task_type: &str) -> Result<()> {
        match method {
            "lora" => s.add_lora(self.lora(model, task_type)?, self.seed),
            "bitfit" => s.add_bitfit(),
            other => Err(Error::new(ErrorCode::Unsupported, format!("--method {other}: classify and embed-train take lora or bitfit"))),
        }
    }

    fn lora(&self, model: &Path, task_type: &str) -> Result<LoraConfig> {
        LoraConfig::from_value(&serde_json::json!({
            "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": model.display().to_string(),
            "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout, "target_modules": Targets::from_cli(&self.target).to_json(),
        }))
    }

    fn options(&self, c: Option<&ClassifyFlags>) -> Result<ClassifyOptions> {
        let d = ClassifyOptions::default();
        Ok(ClassifyOptions {
            epochs: self.epochs,
            max_steps: self.max_steps,
            batch: self.batch,
            seq_len: self.seq_len,
            lr: self.lr,
            weight_decay: self.weight_decay,
            warmup: self.warmup,
            schedule: Schedule::parse(&self.schedule)?,
            max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
            seed: self.seed,
            val_fraction: c.map_or(d.val_fraction, |c| c.val_split),
            class_weights: c.is_some_and(|c| c.class_weights),
            patience: c.and_then(|c| c.patience),
            calibrate: c.is_none_or(|c| !c.no_calibrate),
        })
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a text classifier on an encoder (BERT, MiniLM) or a decoder (Llama family): LoRA + a classification head
    /// (peft SEQ_CLS), with a stratified validation split, per-epoch accuracy / macro F1 /
    /// confusion matrix, and temperature scaling; writes a PEFT folder.
    Classify {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: TaskTrainArgs,
        #[command(flatten)]
        flags: ClassifyFlags,
    },
    /// Tune sentence embeddings of an encoder to (anchor, positive) pairs: a FEATURE_EXTRACTION
    /// LoRA trained with MultipleNegativesRankingLoss (in-batch negatives); writes a PEFT folder.
    EmbedTrain {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: TaskTrainArgs,
    },
    /// Classify texts with a classifier adapter: prints one JSON line per text
    /// (label, probabilities with the adapter's temperature, logits); with --data of labelled
    /// examples, also the accuracy.
    Predict {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        text: Vec<String>,
        /// An image file (PNG, JPEG) for an image classifier (ViT); repeatable.
        #[arg(long)]
        image: Vec<PathBuf>,
        /// Labelled data (as for classify): predict every row and report the metrics.
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        #[arg(long, default_value_t = 32)]
        batch: usize,
    },
    /// Sentence embeddings of an encoder (mean pooling + L2 normalisation), one JSON array per
    /// line, optionally with a FEATURE_EXTRACTION LoRA.
    Embed {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long, required = true)]
        text: Vec<String>,
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
    },
    /// Write input_ids and logits of a text to a safetensors file.
    Logits {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Fold the adapter(s) into the weights first (LoRA, DoRA, IA3).
        #[arg(long)]
        merge: bool,
        #[arg(long)]
        text: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Train an adapter and write it as a PEFT folder.
    Train {
        #[command(flatten)]
        common: Common,
        /// Plain text (one example per line) or JSONL ({"text"} or {"prompt","completion"}).
        #[arg(long, required_unless_present = "task", conflicts_with = "task")]
        data: Option<PathBuf>,
        /// Multi-task training: NAME=DATA, repeated; each task trains its own adapter (one
        /// --method) on the shared base, rows of all tasks mixed in every batch; written to
        /// OUT/NAME/.
        #[arg(long, value_name = "NAME=DATA")]
        task: Vec<String>,
        #[arg(long)]
        out: PathBuf,
        /// Continue from a saved PEFT adapter.
        #[arg(long)]
        init_adapter: Option<PathBuf>,
        /// Start a new adapter from a peft `adapter_config.json` (any supported peft_type;
        /// the method flags are then ignored).
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        method: MethodArgs,
        #[arg(long, default_value_t = 20)]
        steps: usize,
        #[arg(long, default_value_t = 2e-4)]
        lr: f64,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        #[arg(long, default_value_t = 1)]
        grad_accum: usize,
        #[arg(long, default_value_t = 0)]
        warmup: usize,
        #[arg(long, default_value = "constant")]
        schedule: String,
        #[arg(long, default_value_t = 0.0)]
        weight_decay: f64,
        /// Clip gradients to this global norm (0 = off).
        #[arg(long, default_value_t = 1.0)]
        max_grad_norm: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Append EOS to plain-text examples.
        #[arg(long)]
        append_eos: bool,
        #[command(flatten)]
        dp: DpArgs,
        /// Save a checkpoint (adapter tensors, optimizer state, counters) to OUT/checkpoint
        /// every N steps and after the last, atomically (0 = never).
        #[arg(long, default_value_t = 0)]
        checkpoint_every: usize,
        /// Continue from OUT/checkpoint (the same data and flags): ends where the
        /// uninterrupted run ends.
        #[arg(long)]
        resume: bool,
        /// The most memory a training step may use (MiB): larger batches run as
        /// micro-batches (the same update) to stay within it.
        #[arg(long)]
        memory_budget_mib: Option<u64>,
        /// Hold out this share of the examples (seeded by --seed) and report their loss
        /// every --eval-every steps and after the last.
        #[arg(long, default_value_t = 0.0)]
        val_split: f64,
        /// Evaluate on the held-out examples every N steps (0 = only after the last).
        #[arg(long, default_value_t = 0)]
        eval_every: usize,
        /// Gradient checkpointing: recompute each block's activations in the backward pass
        /// (far less memory, one more forward pass). auto: when the memory plan needs it.
        #[arg(long, value_enum, default_value_t = Toggle::Auto)]
        gradient_checkpointing: Toggle,
        /// Testing aid: destroy the GPU device after step N (as a driver reset would). The
        /// run then recovers as from a real loss: a new device, the model reloaded, training
        /// resumed from the last checkpoint (needs --checkpoint-every).
        #[arg(long, value_name = "N")]
        simulate_device_loss: Option<usize>,
    },
    /// Generate text (greedy when --temperature 0), with the KV cache.
    Generate {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Wrap the prompt in the model's chat template.
        #[arg(long)]
        chat: bool,
    },
    /// Held-out loss of a data file (and, with --choices, classification accuracy); one JSON line.
    Eval {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Same formats as `train --data`.
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Comma-separated completions to choose from for prompt/completion examples
        /// (e.g. " ham, spam"): reports the accuracy of the most likely one.
        #[arg(long)]
        choices: Option<String>,
    },
    /// Merge PEFT adapter(s) into the model and write it as a Hugging Face folder
    /// (config.json, model.safetensors, tokenizer files) that transformers loads.
    Export {
        #[command(flatten)]
        common: Common,
        /// PEFT folder(s) to merge first (LoRA, DoRA, IA3), in order; none: export as is.
        #[arg(long)]
        adapter: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Combine LoRA adapters into a new one with peft's add_weighted_adapter semantics.
    Combine {
        #[command(flatten)]
        common: Common,
        /// PEFT folders to combine (repeat).
        #[arg(long, required = true)]
        adapter: Vec<PathBuf>,
        /// One weight per adapter, comma-separated (e.g. 0.7,0.3).
        #[arg(long, value_delimiter = ',', required = true)]
        weights: Vec<f64>,
        /// svd | linear | cat | ties | ties_svd | dare_linear | dare_linear_svd | dare_ties |
        /// dare_ties_svd | magnitude_prune | magnitude_prune_svd
        #[arg(long, default_value = "svd")]
        combination: String,
        #[arg(long)]
        svd_rank: Option<usize>,
        #[arg(long)]
        svd_clamp: Option<f64>,
        #[arg(long)]
        density: Option<f64>,
        /// total | frequency (TIES sign election)
        #[arg(long, default_value = "total")]
        majority_sign_method: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output PEFT folder.
        #[arg(long)]
        out: PathBuf,
    },
    /// Time training, forward and generation; print one JSON object.
    Bench {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        method: MethodArgs,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        #[arg(long, default_value_t = 3)]
        steps: usize,
        #[arg(long, default_value_t = 16)]
        gen_tokens: usize,
        /// Gradient checkpointing, as `train --gradient-checkpointing`.
        #[arg(long, value_enum, default_value_t = Toggle::Auto)]
        gradient_checkpointing: Toggle,
        /// The most memory a training step may use (MiB), as `train --memory-budget-mib`.
        #[arg(long)]
        memory_budget_mib: Option<u64>,
        /// Time every kernel of one more training step on the device (wgpu timestamp queries)
        /// and report them by kernel: a table on stderr, `profile` in the JSON (GPU only).
        #[arg(long)]
        profile: bool,
        /// AdamW as 14 tensor ops per parameter instead of one kernel (for comparison).
        #[arg(long)]
        unfused_adamw: bool,
    },
    /// The device's measured peak: the best TFLOP/s of the matmuls training uses ([n, n] · [n, n]:
    /// f32, f16 where the device has it, the Q4_1 dequantizing kernel on a GPU); one JSON
    /// object (`bench` reports its achieved rate as a fraction of this).
    Peak {
        /// gpu | cpu | auto, as for the other commands.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Comma-separated matrix sizes n.
        #[arg(long, default_value = "512,1024,2048")]
        sizes: String,
        /// Products timed per kernel and size (submitted together, waited for once).
        #[arg(long, default_value_t = 4)]
        reps: usize,
    },
    /// The frozen base in each storage format (one JSON object per format, then a table):
    /// device memory against f32, logits against the same weights dequantized to f32 (the
    /// kernels' reference) and against the f32 base, and a LoRA merged into the quantized base
    /// against the unmerged adapter.
    QuantReport {
        #[command(flatten)]
        common: Common,
        /// Comma-separated: keep, f16, keep-f16, q8_0, q4_0, q4_1, nf4.
        #[arg(long, default_value = "keep,q8_0,q4_0,q4_1,nf4")]
        formats: String,
        #[arg(long, default_value = "The capital of France is")]
        text: String,
    },
}

/// Train one classifier with `method` and write it to `out`: its report (JSON) and a row of
/// the comparison table.
fn classify(common: &Common, args: &TaskTrainArgs, flags: &ClassifyFlags, method: &str, out: &Path) -> Result<(serde_json::Value, String)> {
    let mut s = open_task(common, TaskKind::Classification)?;
    args.add_method(&mut s, method, &common.model, "SEQ_CLS")?;
    let o = args.options(Some(flags))?;
    let t0 = Instant::now();
    let show = |e: &webpeft::task::EpochReport| {
        let val =
            e.val.as_ref().map_or(String::new(), |m| format!(" val_loss {:.4} val_acc {:.4} macro_f1 {:.4} ece {:.4} confusion {:?}", m.loss, m.accuracy, m.macro_f1, m.ece, m.confusion));
        eprintln!("[{method}] epoch {} step {} train_loss {:.4}{val} {:.1}s {:.0} tok/s", e.epoch, e.steps, e.train_loss, e.seconds, e.tokens_per_second);
        true
    };
    let rep = if s.preprocess.is_some() {
        let images = read_images(&s, &args.data)?;
        let data: Vec<LabeledImage> = images.into_iter().map(|(_, pixels, label)| LabeledImage { pixels, label }).collect();
        block_on(s.train_image_classifier(&data, &o, show))?
    } else {
        block_on(s.train_classifier(&parse_labeled_file(&args.data.display().to_string(), &read_text(&args.data)?)?, &o, show))?
    };
    let seconds = t0.elapsed().as_secs_f64();
    eprintln!(
        "[{method}] labels {:?}; {} train / {} validation examples; kept epoch {}; temperature {:.4} (val ECE {:.4} -> {:.4}) in {seconds:.1}s",
        rep.labels,
        rep.train_examples,
        rep.val_examples,
        rep.best_epoch,
        rep.temperature,
        rep.val_uncalibrated.as_ref().map_or(f64::NAN, |m| m.ece),
        rep.val_calibrated.as_ref().map_or(f64::NAN, |m| m.ece),
    );
    let trainable = s.num_trainable();
    write_files(out, block_on(s.save_adapter())?)?;
    eprintln!("[{method}] wrote {}", out.display());
    let n = rep.epochs.len().max(1) as f64;
    let per_epoch = rep.epochs.iter().map(|e| e.seconds).sum::<f64>() / n;
    let rate = rep.epochs.iter().map(|e| e.tokens_per_second).sum::<f64>() / n;
    let val = rep.val_uncalibrated.as_ref();
    let row = format!(
        "{method:<8} {trainable:>10} {:>7} {:>8.4} {:>8.4} {:>7.4} {per_epoch:>9.2} {rate:>10.1}",
        rep.epochs.len(),
        val.map_or(f64::NAN, |m| m.accuracy),
        val.map_or(f64::NAN, |m| m.macro_f1),
        val.map_or(f64::NAN, |m| m.ece)
    );
    let j = serde_json::json!({
        "method": method, "trainable_parameters": trainable, "seconds": seconds,
        "labels": rep.labels, "train_examples": rep.train_examples, "val_examples": rep.val_examples, "best_epoch": rep.best_epoch,
        "temperature": rep.temperature, "val": val.map(metrics_json), "val_calibrated": rep.val_calibrated.as_ref().map(metrics_json),
        "epochs": rep.epochs.iter().map(|e| serde_json::json!({"epoch": e.epoch, "steps": e.steps, "train_loss": e.train_loss, "seconds": e.seconds,
            "tokens_per_second": e.tokens_per_second, "val": e.val.as_ref().map(metrics_json)})).collect::<Vec<_>>(),
    });
    Ok((j, row))
}

/// The device `--device` names (announced on stderr), with `--matmul` applied.
fn select_device(common: &Common) -> Result<webpeft::device::Compute> {
    let compute = device::select(DeviceChoice::parse(&common.device)?)?;
    eprintln!("device: {}", compute.name);
    if let Some(m) = common.matmul {
        webpeft::matmul::set_tiled(m == MatmulChoice::Ours);
    }
    Ok(compute)
}

fn open_task(common: &Common, task: TaskKind) -> Result<TaskSession> {
    let files = ModelFiles::from_path(&common.model)?;
    let compute = select_device(common)?;
    if common.base.is_some() {
        return Err(Error::new(ErrorCode::Unsupported, "--base applies to generation and causal-LM training; classification and embedding sessions hold the base as the device's default"));
    }
    let mut s = TaskSession::load(&files, compute, task).map_err(|e| e.context(common.model.display()))?;
    if let Some(a) = common.attention {
        match &mut s.model {
            Backbone::Decoder(m) => m.attention = a.imp(),
            _ => return Err(Error::new(ErrorCode::Unsupported, "--attention: encoder models (BERT, ViT) run the reference attention only")),
        }
    }
    Ok(s)
}

/// Load an encoder adapter folder (adapter_config.json, adapter_model.safetensors and, for a
/// classifier, webpeft_head.json).
fn load_task_adapter(s: &mut TaskSession, dir: &Path) -> Result<()> {
    let cfg = read_text(&dir.join("adapter_config.json"))?;
    let w = std::fs::read(dir.join("adapter_model.safetensors")).map_err(|e| Error::new(ErrorCode::Io, format!("{}/adapter_model.safetensors: {e}", dir.display())))?;
    let head = dir.join(webpeft::task::HEAD_FILE);
    let head = if head.is_file() { Some(read_text(&head)?) } else { None };
    s.load_adapter(&cfg, &w, head.as_deref()).map_err(|e| e.context(dir.display()))
}

/// Labelled images: a CSV/TSV with `image` and `label` columns (or JSONL), image paths relative
/// to the data file's folder; each decoded and preprocessed for the model. (path, pixels, label)
fn read_images(s: &TaskSession, data: &Path) -> Result<Vec<(String, Vec<f32>, String)>> {
    let dir = data.parent().unwrap_or(Path::new("."));
    let rows = webpeft::train::data::two_fields(&data.display().to_string(), &read_text(data)?, ["image", "label"])?;
    if rows.is_empty() {
        return Err(Error::new(ErrorCode::Data, format!("{}: the data has no examples", data.display())));
    }
    rows.into_iter()
        .map(|[file, label]| {
            let p = dir.join(&file);
            let bytes = std::fs::read(&p).map_err(|e| Error::new(ErrorCode::Io, format!("{}: {e}", p.display())))?;
            Ok((file, s.image_pixels(&bytes).map_err(|e| e.context(p.display()))?, label.trim().to_string()))
        })
        .collect()
}

/// Write files into `dir`, each through a temporary file and a rename.
fn write_files(dir: &Path, files: Vec<(String, Vec<u8>)>) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for (file, bytes) in files {
        let tmp = dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, dir.join(file))?;
    }
    Ok(())
}

fn metrics_json(m: &Metrics) -> serde_json::Value {
    serde_json::json!({"loss": m.loss, "accuracy": m.accuracy, "macro_f1": m.macro_f1, "ece": m.ece, "confusion": m.confusion})
}

fn open(common: &Common) -> Result<Session> {
    let files = ModelFiles::from_path(&common.model)?;
    let compute = select_device(common)?;
    let format = match &common.base {
        Some(b) => BaseFormat::parse(b)?,
        None => BaseFormat::default_for(&compute),
    };
    let mut s = Session::load_as(&files, compute, format)?;
    if let Some(a) = common.attention {
        s.model.attention = a.imp();
    }
    let m = s.model.base_memory();
    eprintln!("base: {} ({:.1} MiB on the device)", format.name(), m.bytes as f64 / (1u64 << 20) as f64);
    Ok(s)
}

fn read_text(p: &Path) -> Result<String> {
    std::fs::read_to_string(p).map_err(|e| Error::new(ErrorCode::Io, format!("{}: {e}", p.display())))
}

/// A data file (text, JSONL or CSV, by its extension); errors name the file and line.
fn read_examples(p: &Path) -> Result<Vec<webpeft::train::data::Example>> {
    parse_data_file(&p.display().to_string(), &read_text(p)?)
}

fn load_adapter_dir(s: &mut Session, name: &str, dir: &Path) -> Result<()> {
    let cfg = read_text(&dir.join("adapter_config.json"))?;
    let w = std::fs::read(dir.join("adapter_model.safetensors")).map_err(|e| Error::new(ErrorCode::Io, format!("{}/adapter_model.safetensors: {e}", dir.display())))?;
    s.load_adapter(name, &cfg, &w).map_err(|e| e.context(dir.display()))
}

/// Load a PEFT folder as "default" plus, as peft saves several adapters, every subfolder
/// holding an adapter_config.json under its folder name. Returns the names, in order.
fn load_adapters(s: &mut Session, dir: &Path) -> Result<Vec<String>> {
    load_adapter_dir(s, "default", dir)?;
    let mut names = vec!["default".to_string()];
    let mut subs: Vec<_> = std::fs::read_dir(dir)?.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.join("adapter_config.json").is_file()).collect();
    subs.sort();
    for p in subs {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("extra").to_string();
        load_adapter_dir(s, &name, &p)?;
        names.push(name);
    }
    Ok(names)
}

/// Writes the checkpoints a training run hands out to OUT/checkpoint; a failed write stops
/// the run and is reported after it.
struct Keeper {
    dir: PathBuf,
    error: Option<Error>,
}

impl Keeper {
    fn new(out: &Path) -> Self {
        Keeper { dir: out.join("checkpoint"), error: None }
    }
    fn keep(&mut self, r: &StepReport) -> bool {
        let Some(c) = &r.checkpoint else { return true };
        match checkpoint::save_dir(&self.dir, c) {
            Ok(()) => {
                eprintln!("checkpoint at step {} written to {}", c.iteration, self.dir.display());
                true
            }
            Err(e) => {
                self.error = Some(e);
                false
            }
        }
    }
    fn result(self) -> Result<()> {
        self.error.map_or(Ok(()), Err)
    }
}

/// Write adapter `name` to `dir` ("default") or to `dir/<name>/`.
fn write_adapter(s: &mut Session, name: &str, dir: &Path) -> Result<()> {
    let dir = if name == "default" { dir.to_path_buf() } else { dir.join(name) };
    let (cfg, w) = block_on(s.save_adapter(name))?;
    // Write-then-rename so an interrupted save never leaves a half-written adapter.
    write_files(&dir, vec![("adapter_config.json".into(), cfg.into_bytes()), ("adapter_model.safetensors".into(), w)])
}

/// How many times one `train` run replaces a lost GPU device before it gives up.
const MAX_RECOVERIES: usize = 3;

/// One training attempt of `train --data`: load the model, add or load the adapters, train
/// (resuming from `opts.resume` when set), write the adapters. `latest` follows the
/// checkpoints written; `lose_at` destroys the GPU device after that step (testing aid).
#[allow(clippy::too_many_arguments)]
fn train_run(
    common: &Common,
    method: &MethodArgs,
    init_adapter: Option<&Path>,
    config: Option<&Path>,
    examples: &[webpeft::train::data::Example],
    opts: &TrainOptions,
    out: &Path,
    latest: &mut Option<usize>,
    lose_at: Option<usize>,
) -> Result<()> {
    let mut s = open(common)?;
    block_on(device::self_check(&s.compute.device))?;
    let names = match (init_adapter, config) {
        (Some(_), Some(_)) => {
            return Err(Error::new(ErrorCode::Config, "give --init-adapter or --config, not both"));
        }
        (Some(d), None) => load_adapters(&mut s, d)?,
        (None, Some(c)) => {
            let v: serde_json::Value = serde_json::from_str(&read_text(c)?).map_err(|e| Error::new(ErrorCode::Parse, format!("{}: {e}", c.display())))?;
            s.add_adapter("default", &v, opts.seed).map_err(|e| e.context(c.display()))?;
            vec!["default".to_string()]
        }
        (None, None) => {
            let configs = method.configs(&common.model)?;
            for (name, cfg) in &configs {
                s.add_adapter(name, cfg, opts.seed)?;
            }
            configs.into_iter().map(|(n, _)| n).collect()
        }
    };
    for n in &names {
        let a = s.adapters.get_mut(n).expect("just added");
        eprintln!("adapter {n}: {} with {} trainable parameters", a.method(), a.num_parameters());
    }
    eprintln!("training on {} examples, {} held out ({} base parameters frozen)", examples.len(), opts.validation.len(), s.model.num_parameters());
    let t0 = Instant::now();
    let mut keeper = Keeper::new(out);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let plan = s.memory_plan(&refs, opts)?;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    eprintln!(
        "memory estimate {:.1} MiB (largest buffer {:.1} MiB: {}); micro-batch {} x grad-accum {}{}",
        mib(plan.estimate.total()),
        mib(plan.estimate.largest_buffer.0),
        plan.estimate.largest_buffer.1,
        plan.batch,
        plan.grad_accum,
        if plan.checkpointing { "; gradient checkpointing" } else { "" }
    );
    block_on(s.train_together(&refs, examples, opts, |r| {
        println!(
            "step {:>4}  loss {:.4}  lr {:.3e}  grad_norm {:.3}  {:.0} tok/s  {:.0} ms{}{}",
            r.stats.step,
            r.stats.loss,
            r.stats.lr,
            r.stats.grad_norm,
            r.tokens_per_second,
            r.seconds * 1e3,
            if r.stats.skipped { "  (skipped: non-finite)" } else { "" },
            r.epsilon.map(|e| format!("  epsilon {e:.3}")).unwrap_or_default()
        );
        if let Some(e) = &r.eval {
            println!("eval {:>4}  val_loss {:.4}  ({} targets)", r.stats.step, e.loss, e.targets);
        }
        let kept = keeper.keep(r);
        if let (true, Some(c)) = (kept, &r.checkpoint) {
            *latest = Some(c.iteration);
        }
        if lose_at == Some(r.stats.step) {
            eprintln!("simulating a lost GPU device after step {}", r.stats.step);
            if let Err(e) = device::simulate_device_loss() {
                keeper.error = Some(e);
                return false;
            }
        }
        kept
    }))?;
    keeper.result()?;
    for n in &names {
        write_adapter(&mut s, n, out)?;
    }
    let peak_device = device::memory_usage(&s.compute.device).map(|m| m.1);
    eprintln!("trained {} steps in {:.1} s; adapter written to {}", opts.steps, t0.elapsed().as_secs_f64(), out.display());
    let trainable: usize = names.iter().map(|n| s.adapters.get_mut(n).expect("present").num_parameters()).sum();
    println!(
        "{}",
        serde_json::json!({"summary": {"seconds": t0.elapsed().as_secs_f64(), "trainable_parameters": trainable, "model_parameters": s.model.num_parameters(),
            "peak_rss_bytes": peak_rss(), "device_memory_reserved_bytes": peak_device, "memory_estimate_bytes": plan.estimate.total(), "device": s.compute.name}})
    );
    Ok(())
}

/// `train --task NAME=DATA ...`: one adapter per task, trained together with per-row routing.
fn train_tasks(common: &Common, tasks: &[String], method: &MethodArgs, opts: &TrainOptions, out: &Path) -> Result<()> {
    let configs = method.configs(&common.model)?;
    let [(_, cfg)] = &configs[..] else { return Err(Error::new(ErrorCode::Config, "multi-task training takes one --method")) };
    let mut data = Vec::new();
    for t in tasks {
        let (name, path) = t.split_once('=').ok_or_else(|| Error::new(ErrorCode::Config, format!("--task {t:?}: expected NAME=DATA")))?;
        if name.is_empty() || name.contains(['/', '\\', '.']) {
            return Err(Error::new(ErrorCode::Config, format!("--task {t:?}: the name must be a plain folder name")));
        }
        let p = PathBuf::from(path);
        data.push((name.to_string(), read_examples(&p)?));
    }
    let mut s = open(common)?;
    block_on(device::self_check(&s.compute.device))?;
    for (name, _) in &data {
        s.add_adapter(name, cfg, opts.seed)?;
    }
    let refs: Vec<(&str, &[webpeft::train::data::Example])> = data.iter().map(|(n, e)| (n.as_str(), e.as_slice())).collect();
    eprintln!("multi-task training: {}", data.iter().map(|(n, e)| format!("{n} ({} examples)", e.len())).collect::<Vec<_>>().join(", "));
    let t0 = Instant::now();
    let mut keeper = Keeper::new(out);
    block_on(s.train_multitask(&refs, opts, |r| {
        let per_task: Vec<String> = data.iter().zip(&r.stats.task_losses).map(|((n, _), l)| format!("{n} {l:.4}")).collect();
        println!(
            "step {:>4}  loss {:.4}  [{}]  lr {:.3e}  grad_norm {:.3}  {:.0} tok/s  {:.0} ms",
            r.stats.step,
            r.stats.loss,
            per_task.join(", "),
            r.stats.lr,
            r.stats.grad_norm,
            r.tokens_per_second,
            r.seconds * 1e3
        );
        keeper.keep(r)
    }))?;
    keeper.result()?;
    for (name, _) in &data {
        write_adapter(&mut s, name, out)?;
    }
    eprintln!("trained {} steps in {:.1} s; adapters written to {}/<task>", opts.steps, t0.elapsed().as_secs_f64(), out.display());
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::EmbedTrain { common, args } => {
            let pairs = parse_pairs_file(&args.data.display().to_string(), &read_text(&args.data)?)?;
            let mut s = open_task(&common, TaskKind::Embedding)?;
            let [method] = args.methods.as_slice() else { return Err(Error::new(ErrorCode::Config, "embed-train takes one --method")) };
            args.add_method(&mut s, method, &common.model, "FEATURE_EXTRACTION")?;
            let t0 = Instant::now();
            let steps = block_on(s.train_embeddings(&pairs, &args.options(None)?, |st| {
                eprintln!("step {} loss {:.4} lr {:.3e} grad_norm {:.3} tokens {}", st.step, st.loss, st.lr, st.grad_norm, st.tokens);
                true
            }))?;
            eprintln!("{} pairs, {} steps in {:.1}s", pairs.len(), steps.len(), t0.elapsed().as_secs_f64());
            write_files(&args.out, block_on(s.save_adapter())?)?;
            eprintln!("wrote {}", args.out.display());
        }
        Cmd::Classify { common, args, flags } => {
            let compare = args.methods.len() > 1;
            let mut reports = serde_json::Map::new();
            let mut table = Vec::new();
            for method in &args.methods {
                let out = if compare { args.out.join(method) } else { args.out.clone() };
                let (report, row) = classify(&common, &args, &flags, method, &out)?;
                reports.insert(method.clone(), report);
                table.push(row);
            }
            if compare {
                println!("{:<8} {:>10} {:>7} {:>8} {:>8} {:>7} {:>9} {:>10}", "method", "trainable", "epochs", "val_acc", "macro_f1", "ece", "s/epoch", "inputs/s");
                for r in &table {
                    println!("{r}");
                }
            }
            if let Some(path) = &flags.report {
                let j = if compare { serde_json::json!({ "methods": reports }) } else { reports.into_values().next().unwrap_or_default() };
                std::fs::write(path, serde_json::to_string_pretty(&j).expect("json"))?;
            }
        }
        Cmd::Predict { common, adapter, text, image, data, seq_len, batch } => {
            let mut s = open_task(&common, TaskKind::Classification)?;
            load_task_adapter(&mut s, &adapter)?;
            let logits;
            let rows = if s.preprocess.is_some() {
                let images: Vec<(String, Vec<f32>, String)> = match &data {
                    Some(p) => read_images(&s, p)?,
                    None => image
                        .iter()
                        .map(|p| Ok((p.display().to_string(), s.image_pixels(&std::fs::read(p).map_err(|e| Error::new(ErrorCode::Io, format!("{}: {e}", p.display())))?)?, String::new())))
                        .collect::<Result<_>>()?,
                };
                logits = block_on(s.image_logits(&images.iter().map(|i| i.1.clone()).collect::<Vec<_>>(), batch))?;
                images.into_iter().map(|(text, _, label)| Labeled { text, label }).collect::<Vec<_>>()
            } else {
                let rows = match &data {
                    Some(p) => parse_labeled_file(&p.display().to_string(), &read_text(p)?)?,
                    None => text.iter().map(|t| Labeled { text: t.clone(), label: String::new() }).collect(),
                };
                logits = block_on(s.logits(&rows.iter().map(|r| r.text.as_str()).collect::<Vec<_>>(), seq_len, batch))?;
                rows
            };
            if rows.is_empty() {
                return Err(Error::new(ErrorCode::Config, "give --text / --image (repeatable) or --data"));
            }
            let probs = webpeft::train::classify::softmax_rows(&logits, s.temperature);
            for (l, p) in logits.iter().zip(&probs) {
                let k = p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
                println!("{}", serde_json::json!({"label": s.labels.get(k).cloned().unwrap_or_else(|| k.to_string()), "id": k, "probabilities": p, "logits": l}));
            }
            if data.is_some() {
                let ids = webpeft::train::classify::ids_of(&rows, &s.labels)?;
                let m = webpeft::train::classify::metrics(&logits, &ids, s.temperature);
                eprintln!("{}", metrics_json(&m));
            }
        }
        Cmd::Embed { common, adapter, text, seq_len } => {
            let mut s = open_task(&common, TaskKind::Embedding)?;
            if let Some(d) = &adapter {
                load_task_adapter(&mut s, d)?;
            }
            let texts: Vec<&str> = text.iter().map(String::as_str).collect();
            for e in block_on(s.embed(&texts, seq_len, 32))? {
                println!("{}", serde_json::json!(e));
            }
        }
        Cmd::Logits { common, adapter, merge, text, out } => {
            let mut s = open(&common)?;
            let mut names = adapter.as_ref().map(|d| load_adapters(&mut s, d)).transpose()?.unwrap_or_default();
            if merge {
                for n in names.drain(..) {
                    s.merge_adapter(&n)?;
                }
            }
            let ids = s.tokenizer.encode(&text)?;
            let logits = block_on(s.logits(&ids, &names.iter().map(String::as_str).collect::<Vec<_>>()))?;
            let mut m = BTreeMap::new();
            m.insert("input_ids".to_string(), OutTensor::I64(vec![1, ids.len()], ids.iter().map(|&i| i as i64).collect()));
            m.insert("logits".to_string(), OutTensor::F32(logits));
            std::fs::write(&out, st::write(&m, None)?)?;
            eprintln!("wrote {} tokens of logits to {}", ids.len(), out.display());
        }
        Cmd::Export { common, adapter, out } => {
            let mut s = open(&common)?;
            for (i, d) in adapter.iter().enumerate() {
                let name = format!("merge{i}");
                load_adapter_dir(&mut s, &name, d)?;
                s.merge_adapter(&name).map_err(|e| e.context(d.display()))?;
            }
            let files = block_on(s.export_model())?;
            std::fs::create_dir_all(&out)?;
            for (name, bytes) in files {
                let tmp = out.join(format!(".{name}.tmp"));
                std::fs::write(&tmp, bytes)?;
                std::fs::rename(&tmp, out.join(&name))?;
            }
            eprintln!("wrote the model with {} merged adapter(s) to {}", adapter.len(), out.display());
        }
        Cmd::Combine { common, adapter, weights, combination, svd_rank, svd_clamp, density, majority_sign_method, seed, out } => {
            use webpeft::peft::lora::combine::{Combination, CombineOptions, SignMethod};
            if adapter.len() != weights.len() {
                return Err(Error::new(ErrorCode::Config, format!("{} adapters but {} weights", adapter.len(), weights.len())));
            }
            let o = CombineOptions {
                combination: Combination::parse(&combination)?,
                svd_rank,
                svd_clamp,
                density,
                majority_sign: match majority_sign_method.as_str() {
                    "total" => SignMethod::Total,
                    "frequency" => SignMethod::Frequency,
                    other => {
                        return Err(Error::new(ErrorCode::Config, format!("--majority-sign-method {other:?} (total, frequency)")));
                    }
                },
                seed,
            };
            let mut s = open(&common)?;
            let names: Vec<String> = (0..adapter.len()).map(|i| format!("in{i}")).collect();
            for (n, d) in names.iter().zip(&adapter) {
                load_adapter_dir(&mut s, n, d)?;
            }
            let parts: Vec<(&str, f64)> = names.iter().map(String::as_str).zip(weights).collect();
            let t0 = Instant::now();
            block_on(s.add_weighted_adapter("default", &parts, &o))?;
            eprintln!("combined {} adapters ({combination}) in {:.2} s", adapter.len(), t0.elapsed().as_secs_f64());
            write_adapter(&mut s, "default", &out)?;
            eprintln!("wrote {}", out.display());
        }
        Cmd::Train {
            common,
            data,
            task,
            out,
            init_adapter,
            config,
            method,
            steps,
            lr,
            batch,
            seq_len,
            grad_accum,
            warmup,
            schedule,
            weight_decay,
            max_grad_norm,
            seed,
            append_eos,
            dp,
            checkpoint_every,
            resume,
            memory_budget_mib,
            val_split,
            eval_every,
            gradient_checkpointing,
            simulate_device_loss,
        } => {
            let resume = if resume {
                let c =
                    checkpoint::load_dir(&out.join("checkpoint"))?.ok_or_else(|| Error::new(ErrorCode::Io, format!("--resume: no checkpoint in {}", out.join("checkpoint").display())))?;
                eprintln!("resuming from {} at step {}", out.join("checkpoint").display(), c.iteration);
                Some(c)
            } else {
                None
            };
            let opts = TrainOptions {
                checkpoint_every,
                memory_budget_mib,
                resume,
                steps,
                batch,
                seq_len,
                grad_accum,
                lr,
                warmup,
                schedule: Schedule::parse(&schedule)?,
                weight_decay,
                max_grad_norm: (max_grad_norm > 0.0).then_some(max_grad_norm),
                seed,
                append_eos,
                dp: dp.config()?,
                pause: None,
                validation: Vec::new(),
                eval_every,
                gradient_checkpointing: gradient_checkpointing.choice(),
            };
            let Some(data) = data else {
                if val_split > 0.0 {
                    return Err(Error::new(ErrorCode::Unsupported, "--val-split with --task: evaluate each task's adapter after the run (webpeft eval)"));
                }
                return train_tasks(&common, &task, &method, &opts, &out);
            };
            let (examples, validation) = webpeft::train::data::split_validation(&read_examples(&data)?, val_split, seed)?;
            let mut opts = TrainOptions { validation, ..opts };
            // The checkpoint this run may go back to: the one it resumed from, then each it writes.
            let mut latest = opts.resume.as_ref().map(|c| c.iteration);
            let mut lose_at = simulate_device_loss;
            let mut recoveries = 0;
            loop {
                match train_run(&common, &method, init_adapter.as_deref(), config.as_deref(), &examples, &opts, &out, &mut latest, lose_at.take()) {
                    // A lost GPU device: a new one, the model reloaded, and the run resumed
                    // from its last checkpoint; what was trained after that is done again.
                    Err(e) if e.is_device_lost() && recoveries < MAX_RECOVERIES => {
                        let Some(step) = latest else {
                            return Err(e.context("no checkpoint of this run to resume from (train with --checkpoint-every N to survive a lost device)"));
                        };
                        let c = checkpoint::load_dir(&out.join("checkpoint"))?.filter(|c| c.iteration == step).ok_or_else(|| e.clone().context("its checkpoint is gone"))?;
                        recoveries += 1;
                        eprintln!("warning: {}", e.message);
                        let t = std::time::Instant::now();
                        let compute = device::reacquire().map_err(|r| r.context(&e.message))?;
                        eprintln!(
                            "acquired a new device ({}) in {:.0} ms; reloading the model and resuming from the checkpoint at step {step}",
                            compute.name,
                            t.elapsed().as_secs_f64() * 1e3
                        );
                        opts.resume = Some(c);
                    }
                    r => break r?,
                }
            }
        }
        Cmd::Generate { common, adapter, prompt, max_new_tokens, temperature, top_p, seed, chat } => {
            let mut s = open(&common)?;
            let names = adapter.as_ref().map(|d| load_adapters(&mut s, d)).transpose()?.unwrap_or_default();
            let opts = GenerateOptions { max_new_tokens, temperature, top_p, seed, stop: None };
            let text = block_on(s.generate(&prompt, chat, &opts, &names.iter().map(String::as_str).collect::<Vec<_>>(), |_| true))?;
            println!("{text}");
        }
        Cmd::Eval { common, adapter, data, seq_len, batch, choices } => {
            let examples = read_examples(&data)?;
            let mut s = open(&common)?;
            let names = adapter.as_ref().map(|d| load_adapters(&mut s, d)).transpose()?.unwrap_or_default();
            let choices: Vec<String> = choices.map(|c| c.split(',').map(str::to_string).collect()).unwrap_or_default();
            let r = block_on(s.evaluate(&names.iter().map(String::as_str).collect::<Vec<_>>(), &examples, seq_len, batch, &choices))?;
            println!("{}", serde_json::json!({"loss": r.loss, "perplexity": r.loss.exp(), "targets": r.targets, "accuracy": r.accuracy, "examples": examples.len()}));
        }
        Cmd::QuantReport { common, formats, text } => quant_report(&common, &formats, &text)?,
        Cmd::Peak { device, sizes, reps } => {
            let compute = device::select(DeviceChoice::parse(&device)?)?;
            eprintln!("device: {}", compute.name);
            let sizes = sizes.split(',').map(|x| x.trim().parse::<usize>().map_err(|_| Error::new(ErrorCode::Config, format!("--sizes: not a size: {x:?}")))).collect::<Result<Vec<_>>>()?;
            let peak = block_on(webpeft::train::flops::matmul_peak(&compute.device, &sizes, reps))?;
            for r in &peak.rates {
                eprintln!("{:>5} n={:<5} {:>9.2} ms  {:.4} TFLOP/s", r.kernel, r.n, r.seconds * 1e3, r.tflops);
            }
            let mut v = serde_json::to_value(&peak).expect("json");
            v["device"] = compute.name.into();
            println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        }
        Cmd::Bench { common, method, batch, seq_len, steps, gen_tokens, gradient_checkpointing, memory_budget_mib, profile, unfused_adamw } => {
            let mut s = open(&common)?;
            let configs = method.configs(&common.model)?;
            if configs.len() != 1 {
                return Err(Error::new(ErrorCode::Config, "bench takes one --method"));
            }
            let o = TrainOptions { batch, seq_len, steps, gradient_checkpointing: gradient_checkpointing.choice(), memory_budget_mib, ..Default::default() };
            let report = bench(&mut s, &configs[0].1, &o, gen_tokens, profile, !unfused_adamw)?;
            println!("{}", serde_json::to_string_pretty(&report).expect("json"));
        }
    }
    Ok(())
}

fn quant_report(common: &Common, formats: &str, text: &str) -> Result<()> {
    let f32_common = Common { base: Some("f32".into()), ..common.clone() };
    let reference = open(&f32_common)?;
    let ids = reference.tokenizer.encode(text)?;
    let f32_logits = block_on(reference.logits(&ids, &[]))?.data;
    let f32_bytes = reference.model.base_memory().bytes;
    drop(reference);
    let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let lora = serde_json::json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": false});
    let mut rows = vec![format!(
        "| base | device MiB | % of f32 | logits vs dequantized f32 | logits vs f32 base | merged vs unmerged LoRA |\n|---|---:|---:|---:|---:|---:|\n| f32 | {:.1} | 100% | – | – | – |",
        mib(f32_bytes)
    )];
    for f in formats.split(',') {
        let mut s = open(&Common { base: Some(f.trim().to_string()), ..common.clone() })?;
        let bytes = s.model.base_memory().bytes;
        let logits = block_on(s.logits(&ids, &[]))?.data;
        // A LoRA (random B, so that it changes the outputs) merged into the quantized base.
        s.add_adapter("m", &lora, 1)?;
        let unmerged = block_on(s.logits(&ids, &["m"]))?.data;
        s.merge_adapter("m")?;
        let merged = block_on(s.logits(&ids, &[]))?.data;
        s.unmerge_adapter("m")?;
        let restored = diff(&block_on(s.logits(&ids, &[]))?.data, &logits);
        s.model.dequantize_all();
        let dequantized = block_on(s.logits(&ids, &[]))?.data;
        let r = serde_json::json!({
            "base": f, "device_bytes": bytes, "f32_bytes": f32_bytes, "fraction_of_f32": bytes as f64 / f32_bytes as f64,
            "logits_vs_dequantized_f32": diff(&logits, &dequantized), "logits_vs_f32_base": diff(&logits, &f32_logits),
            "merged_vs_unmerged": diff(&merged, &unmerged), "unmerge_restores": restored, "tokens": ids.len(),
        });
        println!("{r}");
        rows.push(format!(
            "| {f} | {:.1} | {:.1}% | {:.2e} | {:.2e} | {:.2e} |",
            mib(bytes),
            100.0 * bytes as f64 / f32_bytes as f64,
            diff(&logits, &dequantized),
            diff(&logits, &f32_logits),
            diff(&merged, &unmerged)
        ));
    }
    eprintln!("{}", rows.join("\n"));
    Ok(())
}

/// Training, forward and generation timings on synthetic tokens: `o.steps` timed steps of
/// `o.batch` rows of `o.seq_len` tokens, planned as training plans them (micro-batches,
/// gradient checkpointing, `o.memory_budget_mib`).
fn bench(s: &mut Session, cfg: &serde_json::Value, o: &TrainOptions, gen_tokens: usize, profile: bool, fused_adamw: bool) -> Result<serde_json::Value> {
    use webpeft::train::{AdamWConfig, TrainConfig, Trainer};
    let (batch, seq_len, steps) = (o.batch, o.seq_len, o.steps);
    if batch == 0 || seq_len < 2 || steps == 0 {
        return Err(Error::new(ErrorCode::Config, "batch, steps >= 1 and seq-len >= 2"));
    }
    if profile && !s.compute.is_gpu {
        return Err(Error::new(ErrorCode::Config, "--profile times GPU kernels; the CPU backend launches none (profile it with perf)"));
    }
    s.add_adapter("bench", cfg, 0)?;
    let v = s.model.config.vocab_size as u32;
    let rows: Vec<Tokenized> = (0..batch)
        .map(|b| {
            let ids: Vec<u32> = (0..seq_len).map(|i| ((b * 7919 + i * 104729) as u32 % (v - 10)) + 5).collect();
            Tokenized { labels: ids.iter().map(|&x| x as i64).collect(), ids }
        })
        .collect();
    // As training does: a batch over the device's limits runs as micro-batches (same update).
    let plan = s.memory_plan(&["bench"], o)?;
    let micro = plan.batch;
    let batch_data = rows.chunks(micro).map(|c| Batch::new(c, 0)).collect::<Result<Vec<_>>>()?;
    let tokens = batch * seq_len;
    let mut trainer = Trainer::new(TrainConfig {
        optim: AdamWConfig { lr: 1e-4, fused: fused_adamw, ..Default::default() },
        total_steps: steps + 1,
        max_grad_norm: Some(1.0),
        gradient_checkpointing: plan.checkpointing,
        ..Default::default()
    });
    let dev = s.compute.device.clone();
    let mut peak = 0u64;
    let sample_mem = |peak: &mut u64| {
        if let Some((used, _)) = device::memory_usage(&dev) {
            *peak = (*peak).max(used);
        }
    };
    let adapter = s.adapters.get_mut("bench").expect("just added");
    let flops = webpeft::train::flops::training_step(&s.model, adapter, batch, seq_len);
    webpeft::peft::set_trainable(adapter, true);
    let t_warm = Instant::now();
    block_on(trainer.step(&s.model, adapter, &batch_data))?;
    let warmup_s = t_warm.elapsed().as_secs_f64();
    let t0 = Instant::now();
    for _ in 0..steps {
        block_on(trainer.step(&s.model, adapter, &batch_data))?;
        sample_mem(&mut peak);
    }
    let step_s = t0.elapsed().as_secs_f64() / steps as f64;
    // The pool's size after training only: the training step's peak.
    let train_reserved = device::memory_usage(&dev).map(|m| m.1);
    let kernels = if profile {
        let profiler = webpeft::profile::Profiler::start();
        block_on(trainer.step(&s.model, adapter, &batch_data))?;
        let p = block_on(profiler.finish());
        eprintln!("one training step, by kernel:\n{}", p.table(20));
        Some(p)
    } else {
        None
    };
    webpeft::peft::set_trainable(adapter, false);
    // Forward only (logits of every position, micro-batch by micro-batch, projected in chunks
    // as the loss does), warm once, then timed.
    let fwd = |s: &Session| -> Result<()> {
        let stack = s.stack(&["bench"])?;
        let per_chunk = webpeft::train::loss::logit_chunk_rows(s.model.config.vocab_size);
        for chunk in rows.chunks(micro) {
            let ids: Vec<i64> = chunk.iter().flat_map(|r| r.ids.iter().map(|&i| i as i64)).collect();
            let inputs = webpeft::models::llama::Inputs { ids: webpeft::tensor::ints(ids, [chunk.len(), seq_len], &s.model.device), attention_mask: None };
            let h = s.model.hidden(&inputs, &stack, None)?;
            let n = chunk.len() * seq_len;
            // Every chunk's logits computed, none read back whole.
            block_on(webpeft::tensor::wait_for((0..n).step_by(per_chunk).map(|i| s.model.logits_of(h.clone().narrow(0, i, per_chunk.min(n - i)), &stack)).collect()))?;
        }
        Ok(())
    };
    fwd(s)?;
    let t1 = Instant::now();
    for _ in 0..steps {
        fwd(s)?;
        sample_mem(&mut peak);
    }
    let fwd_s = t1.elapsed().as_secs_f64() / steps as f64;
    // Generation: 32-token prompt, greedy, KV cache. A first run meets every shape the timed
    // run will (each cache length's kernels compiled once; timed apart as `generate_first_s`).
    let prompt: Vec<u32> = rows[0].ids.iter().copied().cycle().take(32).collect();
    let gen_opts = GenerateOptions { max_new_tokens: gen_tokens, ..Default::default() };
    let stack = s.stack(&["bench"])?;
    let t2 = Instant::now();
    block_on(webpeft::generate::generate(&s.model, &stack, &prompt, &gen_opts, |_| true))?;
    let gen_first_s = t2.elapsed().as_secs_f64();
    let t2 = Instant::now();
    let out = block_on(webpeft::generate::generate(&s.model, &stack, &prompt, &gen_opts, |_| true))?;
    let gen_s = t2.elapsed().as_secs_f64();
    let gen_kernels = if profile {
        let profiler = webpeft::profile::Profiler::start();
        block_on(webpeft::generate::generate(&s.model, &stack, &prompt, &gen_opts, |_| true))?;
        let p = block_on(profiler.finish());
        eprintln!("one generation ({gen_tokens} tokens after a 32-token prompt), by kernel:\n{}", p.table(20));
        Some(p)
    } else {
        None
    };
    sample_mem(&mut peak);
    let reserved = device::memory_usage(&s.compute.device).map(|m| m.1);
    Ok(serde_json::json!({
        "device": s.compute.name,
        "base": s.model.base_formats(),
        "attention": s.model.runs_attention().name(),
        "fused_adamw": fused_adamw && s.compute.is_gpu,
        "matmul": if webpeft::matmul::tiled() && s.compute.is_gpu { "ours" } else { "burn" },
        "base_bytes": s.model.base_memory().bytes,
        "model_parameters": s.model.num_parameters(),
        "method": s.adapters["bench"].method(),
        "config": cfg,
        "trainable_parameters": s.adapters.get_mut("bench").expect("added").num_parameters(),
        "batch": batch,
        "micro_batch": micro,
        "gradient_checkpointing": plan.checkpointing,
        "memory_estimate": {"weights": plan.estimate.weights, "adapter": plan.estimate.adapter, "activations": plan.estimate.activations, "attention": plan.estimate.attention, "logits": plan.estimate.logits, "total": plan.estimate.total()},
        "seq_len": seq_len,
        "steps": steps,
        "first_step_s": warmup_s,
        "train_ms_per_step": step_s * 1e3,
        "train_tokens_per_s": tokens as f64 / step_s,
        "train_flops_per_step": flops.total(),
        "train_flops": flops,
        "train_tflops_per_s": flops.total() / step_s / 1e12,
        "forward_tokens_per_s": tokens as f64 / fwd_s,
        "generate_tokens_per_s": out.len() as f64 / gen_s,
        "generate_first_s": gen_first_s,
        "generated_tokens": out.len(),
        "peak_memory_in_use_bytes": if peak > 0 { Some(peak) } else { None },
        "memory_reserved_bytes": reserved,
        "train_memory_reserved_bytes": train_reserved,
        "profile": kernels,
        "generate_profile": gen_kernels,
    }))
}

/// The process's peak resident memory (Linux), for reports on the CPU backend.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// Our own log lines (info and up: skipped steps, DP noise and budget) on stderr; the
/// engine's crates stay quiet unless they warn.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn || (m.level() <= log::Level::Info && m.target().starts_with("webpeft"))
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!("webpeft: {}: {}", r.level().as_str().to_lowercase(), r.args());
        }
    }
    fn flush(&self) {}
}

/// A setting forced on or off, or left to the program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Toggle {
    Auto,
    On,
    Off,
}

impl Toggle {
    fn choice(self) -> Option<bool> {
        match self {
            Toggle::Auto => None,
            Toggle::On => Some(true),
            Toggle::Off => Some(false),
        }
    }
}

fn main() -> ExitCode {
    static LOG: StderrLog = StderrLog;
    if log::set_logger(&LOG).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("webpeft: {e}");
            ExitCode::FAILURE
        }
    }
}
