//! Parameter-efficient fine-tuning methods, one folder per method (config, layer, model),
//! as in Hugging Face `peft`. Each method is an [`Adapter`] for the forward pass and a list
//! of named trainable tensors for the trainer; [`AnyAdapter`] picks the method from a peft
//! `adapter_config.json`.

pub mod bottleneck;
pub mod ia3;
pub mod ln_tuning;
pub mod lora;
pub mod merge;
pub mod p_tuning;
pub mod prefix_tuning;
pub mod prompt_tuning;
pub mod reparam;
pub mod selective;
pub mod targets;

use burn::tensor::Tensor;
use serde_json::Value as Json;

use crate::error::{Result, bail, err};
use crate::models::hooks::{Adapter, PerRow, Stack, row_masks};
use crate::models::llama::Llama;
use crate::tokenizer::Tokenizer;

use bottleneck::{BottleneckAdapter, BottleneckConfig};
use ia3::{Ia3Adapter, Ia3Config};
use ln_tuning::{LnTuningAdapter, LnTuningConfig};
use lora::{LoraAdapter, LoraConfig};
use p_tuning::{PTuningAdapter, PTuningConfig};
use prefix_tuning::{PrefixTuningAdapter, PrefixTuningConfig};
use prompt_tuning::{PromptTuningAdapter, PromptTuningConfig};
use selective::{SelectiveAdapter, SelectiveConfig};

const SUPPORTED: &str = "supported: LORA, IA3, PROMPT_TUNING, P_TUNING, PREFIX_TUNING, LN_TUNING, BOTTLENECK, SELECTIVE";

/// Methods whose `params_mut` is an inherent method become [`Trainable`] here.
macro_rules! trainable {
    ($($t:ty),*) => {$(
        impl Trainable for $t {
            fn params_mut(&mut self) -> Vec<NamedParam<'_>> {
                <$t>::params_mut(self)
            }
        }
    )*};
}
trainable!(Ia3Adapter, PromptTuningAdapter, PTuningAdapter, PrefixTuningAdapter, LnTuningAdapter);

/// The JSON object of an `adapter_config.json` whose `peft_type` must be `peft_type`; its
/// keys are checked with [`check_keys`].
pub fn config_object<'a>(v: &'a Json, peft_type: &str) -> Result<&'a serde_json::Map<String, Json>> {
    let o = v.as_object().ok_or_else(|| err!(Config, "not a JSON object"))?;
    if o.get("peft_type").and_then(Json::as_str) != Some(peft_type) {
        bail!(Config, "peft_type must be {peft_type}");
    }
    check_keys(o, peft_type)?;
    Ok(o)
}

/// The keys of each config: peft 0.21's dataclass fields (`PeftConfig`'s own, the prompt
/// learning ones, the method's), and this toolkit's for its own methods.
fn known_keys(peft_type: &str) -> Vec<&'static str> {
    const BASE: &[&str] = &["auto_mapping", "base_model_name_or_path", "inference_mode", "peft_type", "peft_version", "revision", "task_type"];
    const PROMPT: &[&str] = &["modules_to_save", "num_attention_heads", "num_layers", "num_transformer_submodules", "num_virtual_tokens", "token_dim"];
    let (prompt, own): (bool, &[&str]) = match peft_type {
        "LORA" => (
            false,
            &[
                "alora_invocation_tokens",
                "alpha_pattern",
                "arrow_config",
                "bias",
                "corda_config",
                "ensure_weight_tying",
                "eva_config",
                "exclude_modules",
                "fan_in_fan_out",
                "init_lora_weights",
                "kasa_config",
                "layer_replication",
                "layers_pattern",
                "layers_to_transform",
                "loftq_config",
                "lora_alpha",
                "lora_bias",
                "lora_dropout",
                "lora_ga_config",
                "megatron_config",
                "megatron_core",
                "modules_to_save",
                "monteclora_config",
                "qalora_group_size",
                "r",
                "rank_pattern",
                "runtime_config",
                "target_modules",
                "target_parameters",
                "trainable_token_indices",
                "use_bdlora",
                "use_dora",
                "use_qalora",
                "use_rslora",
                "velora_config",
            ],
        ),
        "IA3" => (false, &["exclude_modules", "fan_in_fan_out", "feedforward_modules", "init_ia3_weights", "modules_to_save", "target_modules"]),
        "PROMPT_TUNING" => (true, &["prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_kwargs", "tokenizer_name_or_path"]),
        "PREFIX_TUNING" => (true, &["encoder_hidden_size", "init_weights", "prefix_projection"]),
        "P_TUNING" => (true, &["encoder_dropout", "encoder_hidden_size", "encoder_num_layers", "encoder_reparameterization_type"]),
        "LN_TUNING" => (false, &["exclude_modules", "modules_to_save", "target_modules"]),
        "BOTTLENECK" => (false, &["adapter_type", "non_linearity", "placement", "reduction_factor", "scaling"]),
        "SELECTIVE" => (false, &["parameters"]),
        _ => (false, &[]),
    };
    BASE.iter().chain(if prompt { PROMPT } else { &[] }).chain(own).copied().collect()
}

/// Whether a config value means "not set": absent, null, false, "", "none", [] or {}.
pub fn is_unset(v: Option<&Json>) -> bool {
    match v {
        None | Some(Json::Null) | Some(Json::Bool(false)) => true,
        Some(Json::Array(a)) => a.is_empty(),
        Some(Json::Object(o)) => o.is_empty(),
        Some(Json::String(s)) => s.is_empty() || s == "none",
        _ => false,
    }
}

/// Refuse a key that is not a setting of the method, unless it is left unset (see
/// [`is_unset`]): a typo such as `"lora_alpah": 16` must not be silently ignored, while a
/// newer peft's new field left at its default still loads.
pub fn check_keys(o: &serde_json::Map<String, Json>, peft_type: &str) -> Result<()> {
    let known = known_keys(peft_type);
    if let Some((k, v)) = o.iter().find(|(k, v)| !known.contains(&k.as_str()) && !is_unset(Some(v))) {
        bail!(Config, "unknown key {k:?} (= {v}): not a {peft_type} setting (check the spelling)");
    }
    Ok(())
}

/// A string field of a config object.
pub fn string_field(o: &serde_json::Map<String, Json>, key: &str) -> Option<String> {
    o.get(key).and_then(Json::as_str).map(str::to_string)
}

/// The two PEFT files: the config text and the tensors as safetensors (with peft's metadata).
pub fn peft_files(config_json: String, tensors: &std::collections::BTreeMap<String, crate::io::safetensors::OutTensor>) -> Result<(String, Vec<u8>)> {
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    Ok((config_json, crate::io::safetensors::write(tensors, Some(meta))?))
}

/// How a trainable tensor is stored here relative to its PyTorch state_dict entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Same shape.
    Same,
    /// Transposed (Linear weights and LoRA matrices are kept [in, out] for `x @ W`).
    Transposed,
    /// A vector kept as [1, n] so it broadcasts over rows (torch: [n], [n, 1] or [1, n]).
    Row,
}

/// A trainable tensor with its name (the saved key, or the state_dict name for tensors
/// peft does not save, like a prompt encoder's).
pub struct NamedParam<'a> {
    pub name: String,
    pub tensor: &'a mut Tensor<2>,
    pub layout: Layout,
}

impl<'a> NamedParam<'a> {
    pub fn new(name: impl Into<String>, tensor: &'a mut Tensor<2>, layout: Layout) -> Self {
        NamedParam { name: name.into(), tensor, layout }
    }
}

/// Set trainable tensors from PyTorch-layout host tensors by name (e.g. to start from a
/// given state); names not in `tensors` are left as they are. Returns how many were set.
pub fn load_params(a: &mut dyn Trainable, tensors: &std::collections::BTreeMap<String, crate::io::safetensors::HostTensor>) -> Result<usize> {
    let mut n = 0;
    for p in a.params_mut() {
        let Some(h) = tensors.get(&p.name) else { continue };
        let dims = p.tensor.dims();
        let h = match p.layout {
            Layout::Same => h.clone(),
            Layout::Transposed if h.shape.len() == 2 => h.transposed(),
            Layout::Row => crate::io::safetensors::HostTensor::new(vec![1, h.data.len()], h.data.clone()),
            Layout::Transposed => bail!(Shape, "{}: expected a matrix, got shape {:?}", p.name, h.shape),
        };
        if h.shape != dims {
            bail!(Shape, "{}: shape {:?} does not fit {:?}", p.name, h.shape, dims);
        }
        let device = p.tensor.device();
        *p.tensor = crate::tensor::upload(&h, &device)?;
        n += 1;
    }
    Ok(n)
}

/// Trainable tensors as PyTorch saves them: matrices transposed back, row vectors 1-D.
pub async fn params_for_save(a: &mut dyn Trainable) -> Result<std::collections::BTreeMap<String, crate::io::safetensors::OutTensor>> {
    use crate::io::safetensors::{HostTensor, OutTensor};
    let mut out = std::collections::BTreeMap::new();
    for p in a.params_mut() {
        let h = crate::tensor::read(p.tensor.clone().without_autodiff()).await?;
        let h = match p.layout {
            Layout::Same => h,
            Layout::Transposed => h.transposed(),
            Layout::Row => HostTensor::new(vec![h.data.len()], h.data),
        };
        out.insert(p.name.clone(), OutTensor::F32(h));
    }
    Ok(out)
}

/// The tensors of an `adapter_model.safetensors`.
pub fn read_weights(bytes: &[u8]) -> Result<std::collections::BTreeMap<String, crate::io::safetensors::HostTensor>> {
    crate::io::safetensors::read_all_f32(bytes).map_err(|e| e.context("adapter_model.safetensors"))
}

/// The two PEFT files of an adapter saved as its trainable tensors (under their names).
pub async fn save_all_params(a: &mut dyn Trainable, config_json: String) -> Result<(String, Vec<u8>)> {
    let out = params_for_save(a).await?;
    peft_files(config_json, &out)
}

/// Start `a` from saved tensors: every trainable tensor must be present and nothing else.
pub fn load_all_params(a: &mut dyn Trainable, tensors: &std::collections::BTreeMap<String, crate::io::safetensors::HostTensor>) -> Result<()> {
    let names: std::collections::HashSet<String> = a.params_mut().into_iter().map(|p| p.name).collect();
    if let Some(k) = tensors.keys().find(|k| !names.contains(*k)) {
        bail!(Format, "adapter_model.safetensors: tensor {k} does not belong to this adapter");
    }
    if let Some(n) = names.iter().find(|n| !tensors.contains_key(*n)) {
        bail!(Format, "adapter_model.safetensors: missing {n}");
    }
    load_params(a, tensors).map(|_| ()).map_err(|e| e.context("adapter_model.safetensors"))
}

/// Trainable tensors by name, data in PyTorch element order (for comparisons and reports).
pub async fn read_params(a: &mut dyn Trainable) -> Result<std::collections::BTreeMap<String, crate::io::safetensors::HostTensor>> {
    let mut out = std::collections::BTreeMap::new();
    for p in a.params_mut() {
        let h = crate::tensor::read(p.tensor.clone().without_autodiff()).await?;
        out.insert(p.name.clone(), if p.layout == Layout::Transposed { h.transposed() } else { h });
    }
    Ok(out)
}

/// An adapter the trainer can update.
pub trait Trainable: Adapter {
    fn params_mut(&mut self) -> Vec<NamedParam<'_>>;
    /// Switch dropout and the like (not gradient tracking: see [`set_trainable`]).
    fn set_training(&mut self, _on: bool) {}
    /// Called before each micro-batch's forward pass (multi-task routing reads the rows' tasks).
    fn prepare(&mut self, _batch: &crate::train::data::Batch) {}
    /// How many tasks a multi-task adapter routes to (0: not multi-task).
    fn num_tasks(&self) -> usize {
        0
    }
}

/// Track gradients of every trainable tensor (on), or drop the autodiff graph (off).
pub fn set_trainable(a: &mut dyn Trainable, on: bool) {
    a.set_training(on);
    for p in a.params_mut() {
        let t = p.tensor.clone().without_autodiff();
        *p.tensor = if on { t.autodiff().require_grad() } else { t };
    }
}

/// Any supported method, chosen by `peft_type`.
pub enum AnyAdapter {
    Lora(LoraAdapter),
    Ia3(Ia3Adapter),
    PromptTuning(PromptTuningAdapter),
    PTuning(PTuningAdapter),
    PrefixTuning(PrefixTuningAdapter),
    LnTuning(LnTuningAdapter),
    Bottleneck(BottleneckAdapter),
    Selective(SelectiveAdapter),
}

/// GPT-2 takes LoRA only so far: the other methods name Llama's modules or are not checked
/// against peft on it.
fn check_architecture(peft_type: Option<&str>, model: &Llama) -> Result<()> {
    match peft_type {
        Some(t) if model.config.is_gpt2() && t != "LORA" => bail!(Unsupported, "peft_type {t} on GPT-2 is not supported yet (LORA is)"),
        _ => Ok(()),
    }
}

fn parse(config_json: &str) -> Result<Json> {
    serde_json::from_str(config_json).map_err(|e| err!(Parse, "adapter_config.json: {e}"))
}

impl AnyAdapter {
    /// A new adapter from a peft config (`peft_type` LORA, IA3 or PROMPT_TUNING).
    pub fn new(config: &Json, model: &Llama, tokenizer: &Tokenizer, seed: u64) -> Result<Self> {
        check_architecture(config.get("peft_type").and_then(Json::as_str), model)?;
        Ok(match config.get("peft_type").and_then(Json::as_str) {
            Some("LORA") => AnyAdapter::Lora(LoraAdapter::new(LoraConfig::from_value(config)?, model, seed)?),
            Some("IA3") => AnyAdapter::Ia3(Ia3Adapter::new(Ia3Config::from_value(config)?, model)?),
            Some("PROMPT_TUNING") => AnyAdapter::PromptTuning(PromptTuningAdapter::new(PromptTuningConfig::from_value(config)?, model, tokenizer, seed)?),
            Some("P_TUNING") => AnyAdapter::PTuning(PTuningAdapter::new(PTuningConfig::from_value(config)?, model, seed)?),
            Some("PREFIX_TUNING") => AnyAdapter::PrefixTuning(PrefixTuningAdapter::new(PrefixTuningConfig::from_value(config)?, model, seed)?),
            Some("LN_TUNING") => AnyAdapter::LnTuning(LnTuningAdapter::new(LnTuningConfig::from_value(config)?, model)?),
            Some("BOTTLENECK") => AnyAdapter::Bottleneck(BottleneckAdapter::new(BottleneckConfig::from_value(config)?, model, seed)?),
            Some("SELECTIVE") => AnyAdapter::Selective(SelectiveAdapter::new(SelectiveConfig::from_value(config)?, model)?),
            other => bail!(Unsupported, "peft_type {other:?} ({SUPPORTED})"),
        })
    }

    /// Load the two PEFT files.
    pub fn from_peft(config_json: &str, weights: &[u8], model: &Llama) -> Result<Self> {
        let v = parse(config_json)?;
        check_architecture(v.get("peft_type").and_then(Json::as_str), model).map_err(|e| e.context("adapter_config.json"))?;
        let r = match v.get("peft_type").and_then(Json::as_str) {
            Some("LORA") => LoraAdapter::from_peft(config_json, weights, model).map(AnyAdapter::Lora),
            Some("IA3") => Ia3Config::from_value(&v).and_then(|c| Ia3Adapter::from_peft(c, weights, model)).map(AnyAdapter::Ia3),
            Some("PROMPT_TUNING") => PromptTuningConfig::from_value(&v).and_then(|c| PromptTuningAdapter::from_peft(c, weights, model)).map(AnyAdapter::PromptTuning),
            Some("P_TUNING") => PTuningConfig::from_value(&v).and_then(|c| PTuningAdapter::from_peft(c, weights, model)).map(AnyAdapter::PTuning),
            Some("PREFIX_TUNING") => PrefixTuningConfig::from_value(&v).and_then(|c| PrefixTuningAdapter::from_peft(c, weights, model)).map(AnyAdapter::PrefixTuning),
            Some("LN_TUNING") => LnTuningConfig::from_value(&v).and_then(|c| LnTuningAdapter::from_peft(c, weights, model)).map(AnyAdapter::LnTuning),
            Some("BOTTLENECK") => BottleneckConfig::from_value(&v).and_then(|c| BottleneckAdapter::from_peft(c, weights, model)).map(AnyAdapter::Bottleneck),
            Some("SELECTIVE") => SelectiveConfig::from_value(&v).and_then(|c| SelectiveAdapter::from_peft(c, weights, model)).map(AnyAdapter::Selective),
            Some(other) => Err(err!(Unsupported, "peft_type {other:?} ({SUPPORTED})")),
            None => Err(err!(Config, "peft_type missing")),
        };
        r.map_err(|e| if e.message.starts_with("adapter_") { e } else { e.context("adapter_config.json") })
    }

    pub async fn to_peft(&mut self) -> Result<(String, Vec<u8>)> {
        match self {
            AnyAdapter::Lora(a) => a.to_peft().await,
            AnyAdapter::Ia3(a) => a.to_peft().await,
            AnyAdapter::PromptTuning(a) => a.to_peft().await,
            AnyAdapter::PTuning(a) => a.to_peft().await,
            AnyAdapter::PrefixTuning(a) => a.to_peft().await,
            AnyAdapter::LnTuning(a) => a.to_peft().await,
            AnyAdapter::Bottleneck(a) => a.to_peft().await,
            AnyAdapter::Selective(a) => a.to_peft().await,
        }
    }

    /// Whether the adapter can share a batch with others, each on its own rows (it changes
    /// values in place: LoRA without trained base tensors, IA3, bottleneck adapters).
    pub fn mixable(&self) -> bool {
        match self {
            AnyAdapter::Lora(l) => l.extra.is_none(),
            AnyAdapter::Ia3(_) | AnyAdapter::Bottleneck(_) => true,
            _ => false,
        }
    }

    pub fn method(&self) -> &'static str {
        match self {
            AnyAdapter::Lora(_) => "lora",
            AnyAdapter::Ia3(_) => "ia3",
            AnyAdapter::PromptTuning(_) => "prompt-tuning",
            AnyAdapter::PTuning(_) => "p-tuning",
            AnyAdapter::PrefixTuning(_) => "prefix-tuning",
            AnyAdapter::LnTuning(_) => "ln-tuning",
            AnyAdapter::Bottleneck(a) => match a.config.kind {
                bottleneck::Kind::Serial => "adapter",
                bottleneck::Kind::Parallel => "parallel-adapter",
            },
            AnyAdapter::Selective(_) => "selective",
        }
    }

    fn inner(&self) -> &dyn Trainable {
        match self {
            AnyAdapter::Lora(a) => a,
            AnyAdapter::Ia3(a) => a,
            AnyAdapter::PromptTuning(a) => a,
            AnyAdapter::PTuning(a) => a,
            AnyAdapter::PrefixTuning(a) => a,
            AnyAdapter::LnTuning(a) => a,
            AnyAdapter::Bottleneck(a) => a,
            AnyAdapter::Selective(a) => a,
        }
    }

    fn inner_mut(&mut self) -> &mut dyn Trainable {
        match self {
            AnyAdapter::Lora(a) => a,
            AnyAdapter::Ia3(a) => a,
            AnyAdapter::PromptTuning(a) => a,
            AnyAdapter::PTuning(a) => a,
            AnyAdapter::PrefixTuning(a) => a,
            AnyAdapter::LnTuning(a) => a,
            AnyAdapter::Bottleneck(a) => a,
            AnyAdapter::Selective(a) => a,
        }
    }

    /// Number of trainable values.
    pub fn num_parameters(&mut self) -> usize {
        self.params_mut().iter().map(|p| p.tensor.dims().iter().product::<usize>()).sum()
    }
}

/// Forwards every hook to the wrapped method.
macro_rules! delegate_adapter {
    ($t:ty, $this:ident => $inner:expr) => {
        impl $crate::models::hooks::Adapter for $t {
            fn linear_input(&$this, site: $crate::models::hooks::Site, x: burn::tensor::Tensor<2>) -> burn::tensor::Tensor<2> {
                $inner.linear_input(site, x)
            }
            fn linear_output(&$this, site: $crate::models::hooks::Site, x: &burn::tensor::Tensor<2>, y: burn::tensor::Tensor<2>) -> burn::tensor::Tensor<2> {
                $inner.linear_output(site, x, y)
            }
            fn prefix(&$this) -> Option<burn::tensor::Tensor<2>> {
                $inner.prefix()
            }
            fn prefix_kv(&$this) -> Option<Vec<(burn::tensor::Tensor<4>, burn::tensor::Tensor<4>)>> {
                $inner.prefix_kv()
            }
            fn norm_weight(&$this, norm: $crate::models::hooks::Norm) -> Option<burn::tensor::Tensor<2>> {
                $inner.norm_weight(norm)
            }
            fn tunable(&$this, t: $crate::models::hooks::Tunable) -> Option<burn::tensor::Tensor<2>> {
                $inner.tunable(t)
            }
            fn sublayer_output(&$this, layer: usize, which: $crate::models::hooks::Sublayer, normed: &burn::tensor::Tensor<2>, out: burn::tensor::Tensor<2>) -> burn::tensor::Tensor<2> {
                $inner.sublayer_output(layer, which, normed, out)
            }
            fn linear_weight(&$this, site: $crate::models::hooks::Site) -> Option<burn::tensor::Tensor<2>> {
                $inner.linear_weight(site)
            }
            fn linear_bias(&$this, site: $crate::models::hooks::Site) -> Option<burn::tensor::Tensor<2>> {
                $inner.linear_bias(site)
            }
            fn embedding(&$this) -> Option<burn::tensor::Tensor<2>> {
                $inner.embedding()
            }
            fn lm_head(&$this) -> Option<burn::tensor::Tensor<2>> {
                $inner.lm_head()
            }
            fn embed_output(&$this, ids: &burn::tensor::Tensor<1, burn::tensor::Int>, x: burn::tensor::Tensor<2>) -> burn::tensor::Tensor<2> {
                $inner.embed_output(ids, x)
            }
        }
    };
}

pub(crate) use delegate_adapter;

delegate_adapter!(AnyAdapter, self => self.inner());

impl Trainable for AnyAdapter {
    fn params_mut(&mut self) -> Vec<NamedParam<'_>> {
        self.inner_mut().params_mut()
    }
    fn set_training(&mut self, on: bool) {
        self.inner_mut().set_training(on);
    }
}

/// Several adapters trained together (hybrid methods, e.g. LoRA + prompt tuning): applied in
/// order in the forward pass, their parameters updated as one set.
pub struct Group<'a>(pub Vec<&'a mut AnyAdapter>);

impl Group<'_> {
    fn stack(&self) -> Stack<'_> {
        Stack(self.0.iter().map(|a| &**a as &dyn Adapter).collect())
    }
}

delegate_adapter!(Group<'_>, self => self.stack());

/// Multi-task training: several adapters over the shared base, each batch row routed to its
/// task's adapter (as a mixed `adapter_names=` batch), their parameters updated together.
pub struct MultiTask<'a> {
    pub adapters: Vec<&'a mut AnyAdapter>,
    masks: Vec<Option<Tensor<2>>>,
    device: burn::tensor::Device,
}

impl<'a> MultiTask<'a> {
    pub fn new(adapters: Vec<&'a mut AnyAdapter>, device: &burn::tensor::Device) -> Result<Self> {
        for a in &adapters {
            if !a.mixable() {
                bail!(
                    Unsupported,
                    "{} adapters cannot share a batch with others: multi-task training takes LoRA (without modules_to_save / trained biases), IA3 and bottleneck adapters",
                    a.method()
                );
            }
        }
        Ok(MultiTask { adapters, masks: Vec::new(), device: device.clone() })
    }

    fn view(&self) -> PerRow<'_> {
        PerRow::from_masks(self.adapters.iter().zip(&self.masks).filter_map(|(a, m)| m.clone().map(|m| (&**a as &dyn Adapter, m))).collect())
    }
}

delegate_adapter!(MultiTask<'_>, self => self.view());

impl Trainable for MultiTask<'_> {
    fn params_mut(&mut self) -> Vec<NamedParam<'_>> {
        self.adapters.iter_mut().flat_map(|a| a.params_mut()).collect()
    }
    fn set_training(&mut self, on: bool) {
        self.adapters.iter_mut().for_each(|a| a.set_training(on));
    }
    fn prepare(&mut self, batch: &crate::train::data::Batch) {
        let rows: Vec<Option<usize>> = batch.tasks.iter().map(|&t| Some(t)).collect();
        self.masks = row_masks(self.adapters.len(), &rows, batch.len, &self.device);
    }
    fn num_tasks(&self) -> usize {
        self.adapters.len()
    }
}

impl Trainable for Group<'_> {
    fn params_mut(&mut self) -> Vec<NamedParam<'_>> {
        self.0.iter_mut().flat_map(|a| a.params_mut()).collect()
    }
    fn set_training(&mut self, on: bool) {
        self.0.iter_mut().for_each(|a| a.set_training(on));
    }
}
