//! `LoraConfig` as peft writes it in `adapter_config.json`. Unknown keys are accepted (peft
//! adds keys over versions); features this toolkit does not implement yet are refused
//! with a clear error instead of being silently ignored.

use std::collections::BTreeMap;

use serde_json::{Value as Json, json};

use crate::error::{Result, bail, err};
use crate::peft::is_unset;
use crate::peft::targets::Targets;

#[derive(Debug, Clone, PartialEq)]
pub enum InitLora {
    /// Kaiming-uniform A (a = sqrt(5)), zero B: the adapter starts as a no-op.
    Default,
    /// A ~ N(0, 1/r), zero B.
    Gaussian,
    /// No special init: A and B keep nn.Linear's default init (B non-zero).
    Off,
}

/// peft's `bias`: which of the model's own biases are trained along with LoRA.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BiasMode {
    None,
    All,
    LoraOnly,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: Targets,
    pub exclude_modules: Option<Targets>,
    pub use_rslora: bool,
    pub init_lora_weights: InitLora,
    pub layers_to_transform: Option<Vec<usize>>,
    pub layers_pattern: Option<String>,
    pub use_dora: bool,
    pub bias: BiasMode,
    /// A trainable bias on lora_B (peft `lora_bias`).
    pub lora_bias: bool,
    /// Modules trained in full and saved whole (e.g. `lm_head`).
    pub modules_to_save: Vec<String>,
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    pub task_type: Option<String>,
    pub base_model_name_or_path: Option<String>,
    pub inference_mode: bool,
    /// peft's `fan_in_fan_out`: the targeted layers store their weight [in, out] (GPT-2's
    /// Conv1D). It changes only how peft merges; the adapter sets it from the model, as peft does.
    pub fan_in_fan_out: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: Targets::List(vec!["q_proj".into(), "v_proj".into()]),
            exclude_modules: None,
            use_rslora: false,
            init_lora_weights: InitLora::Default,
            layers_to_transform: None,
            layers_pattern: None,
            use_dora: false,
            bias: BiasMode::None,
            lora_bias: false,
            modules_to_save: Vec::new(),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: None,
            inference_mode: false,
            fan_in_fan_out: false,
        }
    }
}

impl LoraConfig {
    /// Parse `adapter_config.json` (peft_type must be LORA).
    pub fn from_json(text: &str) -> Result<Self> {
        let v: Json = serde_json::from_str(text).map_err(|e| err!(Parse, "adapter_config.json: {e}"))?;
        Self::from_value(&v).map_err(|e| e.context("adapter_config.json"))
    }

    pub fn from_value(v: &Json) -> Result<Self> {
        let o = v.as_object().ok_or_else(|| err!(Config, "not a JSON object"))?;
        match o.get("peft_type").and_then(Json::as_str) {
            Some("LORA") => {}
            Some(other) => bail!(Unsupported, "peft_type {other:?}: this build supports LORA"),
            None => bail!(Config, "peft_type missing"),
        }
        crate::peft::check_keys(o, "LORA")?;
        for (key, what) in [
            ("layer_replication", "layer_replication"),
            ("megatron_config", "megatron_config"),
            ("loftq_config", "LoftQ"),
            ("eva_config", "EVA init"),
            ("corda_config", "CorDA init"),
            ("trainable_token_indices", "trainable_token_indices"),
            ("alora_invocation_tokens", "aLoRA"),
            ("arrow_config", "Arrow routing"),
            ("kasa_config", "KaSA"),
            ("lora_ga_config", "LoRA-GA init"),
            ("monteclora_config", "MonteCLoRA"),
            ("velora_config", "VeLoRA"),
            ("use_bdlora", "BD-LoRA"),
        ] {
            if let Some(x) = o.get(key)
                && !is_unset(Some(x))
            {
                bail!(Unsupported, "{what} is not supported yet ({key} = {x})");
            }
        }
        if o.get("use_qalora").and_then(Json::as_bool) == Some(true) {
            bail!(Unsupported, "QALoRA is not supported yet");
        }
        let bias = match o.get("bias").and_then(Json::as_str).unwrap_or("none") {
            "none" => BiasMode::None,
            "all" => BiasMode::All,
            "lora_only" => BiasMode::LoraOnly,
            other => bail!(Config, "bias = {other:?} (none, all, lora_only)"),
        };
        let modules_to_save = match o.get("modules_to_save") {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::Array(a)) => a.iter().map(|x| x.as_str().map(str::to_string).ok_or_else(|| err!(Config, "modules_to_save entries must be strings"))).collect::<Result<_>>()?,
            Some(other) => bail!(Config, "modules_to_save must be a list, got {other}"),
        };
        if !is_unset(o.get("target_parameters")) {
            bail!(Unsupported, "target_parameters is not supported yet");
        }
        let num = |k: &str, d: f64| -> Result<f64> {
            match o.get(k) {
                None | Some(Json::Null) => Ok(d),
                Some(x) => x.as_f64().ok_or_else(|| err!(Config, "{k} must be a number")),
            }
        };
        let r = num("r", 8.0)?;
        if r < 1.0 || r.fract() != 0.0 {
            bail!(Config, "r must be a positive integer, got {r}");
        }
        let lora_dropout = num("lora_dropout", 0.0)?;
        if !(0.0..1.0).contains(&lora_dropout) {
            bail!(Config, "lora_dropout must be in [0, 1), got {lora_dropout}");
        }
        let target_modules =
            Targets::from_json(o.get("target_modules"))?.ok_or_else(|| err!(Config, "target_modules is required (peft's per-architecture default is [\"q_proj\", \"v_proj\"] for Llama)"))?;
        let init_lora_weights = match o.get("init_lora_weights") {
            None | Some(Json::Null) | Some(Json::Bool(true)) => InitLora::Default,
            Some(Json::Bool(false)) => InitLora::Off,
            Some(Json::String(s)) if s == "gaussian" => InitLora::Gaussian,
            Some(other) => bail!(Unsupported, "init_lora_weights = {other} (supported: true, false, \"gaussian\")"),
        };
        let layers_to_transform = match o.get("layers_to_transform") {
            None | Some(Json::Null) => None,
            Some(Json::Number(n)) => Some(vec![n.as_u64().ok_or_else(|| err!(Config, "layers_to_transform"))? as usize]),
            Some(Json::Array(a)) => {
                Some(a.iter().map(|x| x.as_u64().map(|v| v as usize).ok_or_else(|| err!(Config, "layers_to_transform entries must be integers"))).collect::<Result<_>>()?)
            }
            Some(other) => bail!(Config, "layers_to_transform = {other}"),
        };
        let layers_pattern = match o.get("layers_pattern") {
            None | Some(Json::Null) => None,
            Some(Json::String(s)) => Some(s.clone()),
            Some(Json::Array(a)) if a.len() == 1 => a[0].as_str().map(str::to_string),
            Some(Json::Array(a)) if a.is_empty() => None,
            Some(other) => bail!(Unsupported, "layers_pattern = {other}"),
        };
        let map = |k: &str| -> Result<BTreeMap<String, f64>> {
            match o.get(k) {
                None | Some(Json::Null) => Ok(BTreeMap::new()),
                Some(Json::Object(m)) => m.iter().map(|(p, x)| Ok((p.clone(), x.as_f64().ok_or_else(|| err!(Config, "{k}.{p} must be a number"))?))).collect(),
                Some(other) => bail!(Config, "{k} must be an object, got {other}"),
            }
        };
        let rank_pattern = map("rank_pattern")?.into_iter().map(|(k, v)| (k, v as usize)).collect();
        Ok(LoraConfig {
            r: r as usize,
            lora_alpha: num("lora_alpha", 8.0)?,
            lora_dropout,
            target_modules,
            exclude_modules: Targets::from_json(o.get("exclude_modules"))?,
            use_rslora: o.get("use_rslora").and_then(Json::as_bool).unwrap_or(false),
            init_lora_weights,
            layers_to_transform,
            layers_pattern,
            use_dora: o.get("use_dora").and_then(Json::as_bool).unwrap_or(false),
            bias,
            lora_bias: o.get("lora_bias").and_then(Json::as_bool).unwrap_or(false),
            modules_to_save,
            rank_pattern,
            alpha_pattern: map("alpha_pattern")?,
            task_type: o.get("task_type").and_then(Json::as_str).map(str::to_string),
            base_model_name_or_path: o.get("base_model_name_or_path").and_then(Json::as_str).map(str::to_string),
            inference_mode: o.get("inference_mode").and_then(Json::as_bool).unwrap_or(false),
            fan_in_fan_out: o.get("fan_in_fan_out").and_then(Json::as_bool).unwrap_or(false),
        })
    }

    /// peft's pattern lookup: the first pattern key that matches `(.*\.)?(key)$`.
    fn pattern_for<'a, T>(pat: &'a BTreeMap<String, T>, module: &str) -> Option<&'a T> {
        pat.iter().find(|(k, _)| regex::Regex::new(&format!(r"(?:^|.*\.)(?:{k})$")).is_ok_and(|re| re.is_match(module))).map(|(_, v)| v)
    }

    /// Rank and scaling for one module, with rank_pattern / alpha_pattern applied.
    pub fn rank_and_scaling(&self, module: &str) -> (usize, f64) {
        let r = Self::pattern_for(&self.rank_pattern, module).copied().unwrap_or(self.r);
        let alpha = Self::pattern_for(&self.alpha_pattern, module).copied().unwrap_or(self.lora_alpha);
        let scaling = if self.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
        (r, scaling)
    }

    /// The `adapter_config.json` peft writes for this config.
    pub fn to_json(&self) -> String {
        let init = match self.init_lora_weights {
            InitLora::Default => json!(true),
            InitLora::Gaussian => json!("gaussian"),
            InitLora::Off => json!(false),
        };
        let v = json!({
            "alpha_pattern": self.alpha_pattern,
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": match self.bias { BiasMode::None => "none", BiasMode::All => "all", BiasMode::LoraOnly => "lora_only" },
            "exclude_modules": self.exclude_modules.as_ref().map(Targets::to_json),
            "fan_in_fan_out": self.fan_in_fan_out,
            "inference_mode": true,
            "init_lora_weights": init,
            "layer_replication": null,
            "layers_pattern": self.layers_pattern,
            "layers_to_transform": self.layers_to_transform,
            "lora_alpha": self.lora_alpha,
            "lora_bias": self.lora_bias,
            "lora_dropout": self.lora_dropout,
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "modules_to_save": if self.modules_to_save.is_empty() { Json::Null } else { json!(self.modules_to_save) },
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": self.rank_pattern,
            "revision": null,
            "target_modules": self.target_modules.to_json(),
            "task_type": self.task_type,
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora
        });
        serde_json::to_string_pretty(&v).expect("serialisable")
    }
}
