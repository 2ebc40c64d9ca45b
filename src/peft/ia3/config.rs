//! `IA3Config` as peft writes it in `adapter_config.json`.

use serde_json::{Value as Json, json};

use crate::error::{Result, bail};
use crate::peft::targets::Targets;

#[derive(Debug, Clone, PartialEq)]
pub struct Ia3Config {
    pub target_modules: Targets,
    pub feedforward_modules: Targets,
    pub exclude_modules: Option<Targets>,
    pub init_ia3_weights: bool,
    pub task_type: Option<String>,
    pub base_model_name_or_path: Option<String>,
}

impl Default for Ia3Config {
    /// peft's defaults for Llama-family models.
    fn default() -> Self {
        Ia3Config {
            target_modules: Targets::List(vec!["k_proj".into(), "v_proj".into(), "down_proj".into()]),
            feedforward_modules: Targets::List(vec!["down_proj".into()]),
            exclude_modules: None,
            init_ia3_weights: true,
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: None,
        }
    }
}

impl Ia3Config {
    pub fn from_value(v: &Json) -> Result<Self> {
        let o = crate::peft::config_object(v, "IA3")?;
        for key in ["modules_to_save"] {
            if o.get(key).is_some_and(|x| !x.is_null() && x.as_array().is_none_or(|a| !a.is_empty())) {
                bail!(Unsupported, "{key} is not supported yet");
            }
        }
        if o.get("fan_in_fan_out").and_then(Json::as_bool) == Some(true) {
            bail!(Unsupported, "fan_in_fan_out = true does not apply to Llama's nn.Linear layers");
        }
        let d = Ia3Config::default();
        let target_modules = Targets::from_json(o.get("target_modules"))?.unwrap_or(d.target_modules);
        let feedforward_modules = Targets::from_json(o.get("feedforward_modules"))?.unwrap_or(d.feedforward_modules);
        if let (Targets::List(t), Targets::List(f)) = (&target_modules, &feedforward_modules)
            && let Some(x) = f.iter().find(|x| !t.contains(x))
        {
            bail!(Config, "feedforward_modules entry {x:?} is not in target_modules (peft requires a subset)");
        }
        Ok(Ia3Config {
            target_modules,
            feedforward_modules,
            exclude_modules: Targets::from_json(o.get("exclude_modules"))?,
            init_ia3_weights: o.get("init_ia3_weights").and_then(Json::as_bool).unwrap_or(true),
            task_type: o.get("task_type").and_then(Json::as_str).map(str::to_string),
            base_model_name_or_path: o.get("base_model_name_or_path").and_then(Json::as_str).map(str::to_string),
        })
    }

    /// peft's `_check_target_module_feedforward`: a regex must match the whole name; list
    /// entries match as plain suffixes.
    pub fn is_feedforward(&self, module: &str) -> bool {
        match &self.feedforward_modules {
            Targets::Regex(r) => regex::Regex::new(&format!("^(?:{r})$")).is_ok_and(|re| re.is_match(module)),
            Targets::List(l) => l.iter().any(|t| module.ends_with(t.as_str())),
            Targets::AllLinear => true,
        }
    }

    pub fn to_json(&self) -> String {
        let v = json!({
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "exclude_modules": self.exclude_modules.as_ref().map(Targets::to_json),
            "fan_in_fan_out": false,
            "feedforward_modules": self.feedforward_modules.to_json(),
            "inference_mode": true,
            "init_ia3_weights": self.init_ia3_weights,
            "modules_to_save": null,
            "peft_type": "IA3",
            "revision": null,
            "target_modules": self.target_modules.to_json(),
            "task_type": self.task_type,
        });
        serde_json::to_string_pretty(&v).expect("serialisable")
    }
}
