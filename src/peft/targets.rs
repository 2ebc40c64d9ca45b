//! Which modules a PEFT config applies to, with peft's exact matching rules
//! (`check_target_module_exists`): a list of names matches a module whose name equals an
//! entry or ends with `.entry`; a string is a regex that must match the whole name;
//! `layers_to_transform` filters by layer index (list targets only, as in peft).

use regex::Regex;
use serde_json::Value as Json;

use crate::error::{Result, bail, err};

#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    List(Vec<String>),
    Regex(String),
    AllLinear,
}

impl Targets {
    pub fn from_json(v: Option<&Json>) -> Result<Option<Self>> {
        Ok(match v {
            None | Some(Json::Null) => None,
            Some(Json::String(s)) if s == "all-linear" => Some(Targets::AllLinear),
            Some(Json::String(s)) => Some(Targets::Regex(s.clone())),
            Some(Json::Array(a)) => {
                Some(Targets::List(a.iter().map(|x| x.as_str().map(str::to_string).ok_or_else(|| err!(Config, "target_modules entries must be strings"))).collect::<Result<_>>()?))
            }
            Some(other) => bail!(Config, "target_modules must be a list or a string, got {other}"),
        })
    }

    pub fn to_json(&self) -> Json {
        match self {
            Targets::List(l) => {
                let mut l = l.clone();
                l.sort();
                Json::from(l)
            }
            Targets::Regex(s) => Json::from(s.clone()),
            Targets::AllLinear => Json::from("all-linear"),
        }
    }

    /// Parse a CLI value: `all-linear`, a comma-separated list, or a regex (anything with
    /// regex metacharacters).
    pub fn from_cli(s: &str) -> Self {
        if s == "all-linear" {
            Targets::AllLinear
        } else if s.chars().any(|c| "*()[]|\\^$+?".contains(c)) {
            Targets::Regex(s.to_string())
        } else {
            Targets::List(s.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect())
        }
    }
}

/// A compiled matcher for module names.
pub struct Matcher {
    targets: Targets,
    regex: Option<Regex>,
    exclude: Option<Targets>,
    exclude_regex: Option<Regex>,
    layers: Option<Vec<usize>>,
    layer_re: Regex,
}

fn full_regex(s: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{s})$")).map_err(|e| err!(Config, "bad regex {s:?}: {e}"))
}

impl Matcher {
    pub fn new(targets: Targets, exclude: Option<Targets>, layers: Option<Vec<usize>>, layers_pattern: Option<&str>) -> Result<Self> {
        let regex = match &targets {
            Targets::Regex(s) => Some(full_regex(s)?),
            _ => None,
        };
        let exclude_regex = match &exclude {
            Some(Targets::Regex(s)) => Some(full_regex(s)?),
            _ => None,
        };
        let pat = layers_pattern.map(regex::escape).unwrap_or_else(|| "layers|h|block|blocks|layer".to_string());
        let layer_re = Regex::new(&format!(r"^.*\.(?:{pat})\.(\d+)\.")).expect("static regex");
        Ok(Matcher { targets, regex, exclude, exclude_regex, layers, layer_re })
    }

    fn list_match(list: &[String], key: &str) -> bool {
        list.iter().any(|t| key == t || key.ends_with(&format!(".{t}")))
    }

    /// Does the (linear) module `key` get the method? `is_output` marks the LM head,
    /// which "all-linear" leaves out.
    pub fn matches(&self, key: &str, is_output: bool) -> bool {
        if let Some(ex) = &self.exclude {
            let hit = match ex {
                Targets::List(l) => Self::list_match(l, key),
                Targets::Regex(_) => self.exclude_regex.as_ref().is_some_and(|r| r.is_match(key)),
                Targets::AllLinear => true,
            };
            if hit {
                return false;
            }
        }
        match &self.targets {
            Targets::AllLinear => !is_output,
            Targets::Regex(_) => self.regex.as_ref().is_some_and(|r| r.is_match(key)),
            Targets::List(l) => {
                if l.iter().any(|t| t == key) {
                    return true;
                }
                let found = Self::list_match(l, key);
                match (&self.layers, found) {
                    (Some(layers), true) if !layers.is_empty() => self.layer_re.captures(key).and_then(|c| c[1].parse::<usize>().ok()).is_some_and(|i| layers.contains(&i)),
                    _ => found,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_rules() {
        let m = Matcher::new(Targets::List(vec!["q_proj".into()]), None, Some(vec![1]), None).unwrap();
        assert!(!m.matches("model.layers.0.self_attn.q_proj", false));
        assert!(m.matches("model.layers.1.self_attn.q_proj", false));
        let m = Matcher::new(Targets::Regex(r".*\.(k_proj|o_proj)".into()), None, Some(vec![1]), None).unwrap();
        assert!(m.matches("model.layers.0.self_attn.k_proj", false), "layers_to_transform ignored with a regex, as peft");
        assert!(!m.matches("model.layers.0.self_attn.q_proj", false));
        let m = Matcher::new(Targets::AllLinear, Some(Targets::List(vec!["down_proj".into()])), None, None).unwrap();
        assert!(!m.matches("model.layers.0.mlp.down_proj", false));
        assert!(m.matches("model.layers.0.mlp.up_proj", false));
        assert!(!m.matches("lm_head", true));
        assert_eq!(Targets::from_cli("q_proj,v_proj"), Targets::List(vec!["q_proj".into(), "v_proj".into()]));
        assert_eq!(Targets::from_cli(r".*\.q_proj"), Targets::Regex(r".*\.q_proj".into()));
    }
}
