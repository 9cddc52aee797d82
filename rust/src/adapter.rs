//! PEFT LoRA adapter configs (`adapter_config.json`): the fields that change merged weights, with
//! PEFT's per-module rank/alpha pattern rules and its `target_modules` rules. These rules live only
//! here; Python calls them through `tunex._native.peft_pattern_keys` / `peft_targets`.
//!
//! Fields that only matter for training (target_modules, dropout, init) are ignored: a merge applies
//! exactly the factors present in the adapter file.

use std::path::Path;

use regex::Regex;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// A rank or alpha override: its value and the compiled `(.*\.)?(KEY)$` matcher.
#[derive(Clone, Debug)]
struct Pattern<T> {
    value: T,
    re: Regex,
}

#[derive(Clone, Debug)]
pub struct AdapterConfig {
    pub r: u64,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub fan_in_fan_out: bool,
    pub use_dora: bool,
    pub lora_bias: bool,
    pub modules_to_save: Vec<String>,
    rank_pattern: Vec<Pattern<u64>>,
    alpha_pattern: Vec<Pattern<f64>>,
}

fn field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

impl AdapterConfig {
    /// Parse `adapter_config.json` bytes; `path` labels errors.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<AdapterConfig> {
        let bad = |msg: String| Error::format(path, msg);
        let root: Value = serde_json::from_slice(bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let Value::Object(obj) = root else { return Err(bad("the top level is not a JSON object".into())) };
        if let Some(t) = field(&obj, "peft_type") {
            if t.as_str() != Some("LORA") {
                return Err(bad(format!("peft_type is {t}; only LoRA adapters (\"LORA\") can be merged")));
            }
        }
        let r = match field(&obj, "r") {
            Some(v) => positive_int(v).ok_or_else(|| bad(format!("\"r\" is {v}; expected a positive integer")))?,
            None => return Err(bad("missing \"r\" (the LoRA rank)".into())),
        };
        let lora_alpha = match field(&obj, "lora_alpha") {
            Some(v) => finite(v).ok_or_else(|| bad(format!("\"lora_alpha\" is {v}; expected a number")))?,
            // PEFT's LoraConfig default.
            None => 8.0,
        };
        let flag = |key: &str| -> Result<bool> {
            match field(&obj, key) {
                None => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => Err(bad(format!("\"{key}\" is {v}; expected true or false"))),
            }
        };
        let modules_to_save = match field(&obj, "modules_to_save") {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("\"modules_to_save\" must be a list of module names".into()))?,
            Some(v) => return Err(bad(format!("\"modules_to_save\" is {v}; expected a list of module names"))),
        };
        Ok(AdapterConfig {
            r,
            lora_alpha,
            use_rslora: flag("use_rslora")?,
            fan_in_fan_out: flag("fan_in_fan_out")?,
            use_dora: flag("use_dora")?,
            lora_bias: flag("lora_bias")?,
            modules_to_save,
            rank_pattern: patterns(path, &obj, "rank_pattern", positive_int)?,
            alpha_pattern: patterns(path, &obj, "alpha_pattern", finite)?,
        })
    }

    /// Rank of `module` (a dotted module path such as `model.layers.0.self_attn.q_proj`).
    pub fn rank_for(&self, module: &str) -> u64 {
        first_match(&self.rank_pattern, module).unwrap_or(self.r)
    }

    pub fn alpha_for(&self, module: &str) -> f64 {
        first_match(&self.alpha_pattern, module).unwrap_or(self.lora_alpha)
    }

    /// `(rank, scaling)` of `module`: alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub fn scaling_for(&self, module: &str) -> (u64, f64) {
        let r = self.rank_for(module);
        let alpha = self.alpha_for(module);
        let s = if self.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
        (r, s)
    }
}

fn positive_int(v: &Value) -> Option<u64> {
    v.as_u64()
        .filter(|&n| n > 0)
        .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && *f >= 1.0 && *f < 1e15).map(|f| f as u64))
}

fn finite(v: &Value) -> Option<f64> {
    v.as_f64().filter(|f| f.is_finite())
}

/// PEFT matches each pattern key as the regex `(.*\.)?(KEY)$` anchored at the start of the module
/// name; the first key (in file order) that matches wins.
fn patterns<T>(
    path: &Path,
    obj: &Map<String, Value>,
    name: &str,
    value: fn(&Value) -> Option<T>,
) -> Result<Vec<Pattern<T>>> {
    let Some(v) = field(obj, name) else { return Ok(Vec::new()) };
    let Value::Object(map) = v else {
        return Err(Error::format(path, format!("\"{name}\" is {v}; expected an object of module pattern -> value")));
    };
    let mut out = Vec::with_capacity(map.len());
    for (key, v) in map {
        let value = value(v)
            .ok_or_else(|| Error::format(path, format!("\"{name}\"[{key:?}] is {v}; expected a positive number")))?;
        let re = pattern_regex(key).map_err(|e| {
            Error::format(path, format!("\"{name}\" key {key:?} is not a valid regular expression: {}", reason(&e)))
        })?;
        out.push(Pattern { value, re });
    }
    Ok(out)
}

/// A regex error on one line: the crate's syntax errors draw the pattern and a caret over several
/// lines; the last line says what is wrong.
fn reason(e: &regex::Error) -> String {
    let text = e.to_string();
    let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    last.trim().trim_start_matches("error: ").to_string()
}

/// PEFT's rule for a `rank_pattern` / `alpha_pattern` key (peft's `get_pattern_key`): the key is a
/// regex that must match a whole number of trailing dotted components of the module name, i.e.
/// `(.*\.)?(KEY)$` matched from the start of the name.
pub fn pattern_regex(key: &str) -> std::result::Result<Regex, regex::Error> {
    Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
}

/// For each module, the index of the first key (in the order given) whose pattern matches it.
/// A key that is not a valid regex is an error naming it.
pub fn first_pattern_keys(keys: &[String], modules: &[String]) -> Result<Vec<Option<usize>>> {
    let res = keys
        .iter()
        .map(|k| {
            pattern_regex(k)
                .map_err(|e| Error::arg(format!("pattern key {k:?} is not a valid regular expression: {}", reason(&e))))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(modules.iter().map(|m| res.iter().position(|re| re.is_match(m))).collect())
}

/// PEFT's `target_modules`: a string is a regex that must match the whole module name; a list
/// selects a module whose name equals an entry or ends with `.` + an entry.
pub enum Targets {
    Regex(Regex),
    Names(Vec<String>),
}

impl Targets {
    pub fn regex(pattern: &str) -> Result<Targets> {
        Regex::new(&format!("^(?:{pattern})$")).map(Targets::Regex).map_err(|e| {
            Error::arg(format!("target_modules {pattern:?} is not a valid regular expression: {}", reason(&e)))
        })
    }

    pub fn matches(&self, module: &str) -> bool {
        match self {
            Targets::Regex(re) => re.is_match(module),
            Targets::Names(names) => names.iter().any(|n| {
                module == n
                    || (module.len() > n.len()
                        && module.ends_with(n.as_str())
                        && module.as_bytes()[module.len() - n.len() - 1] == b'.')
            }),
        }
    }
}

fn first_match<T: Copy>(patterns: &[Pattern<T>], module: &str) -> Option<T> {
    patterns.iter().find(|p| p.re.is_match(module)).map(|p| p.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<AdapterConfig> {
        AdapterConfig::parse(Path::new("adapter_config.json"), json.as_bytes())
    }

    #[test]
    fn scaling_rules() {
        let c = parse(
            r#"{"peft_type":"LORA","r":8,"lora_alpha":16,"rank_pattern":{"q_proj":4},
                          "alpha_pattern":{"layers\\.1\\.mlp\\.down_proj":2}}"#,
        )
        .unwrap();
        assert_eq!(c.scaling_for("model.layers.0.self_attn.q_proj"), (4, 4.0));
        assert_eq!(c.scaling_for("model.layers.0.self_attn.k_proj"), (8, 2.0));
        assert_eq!(c.scaling_for("model.layers.1.mlp.down_proj"), (8, 0.25));
        assert_eq!(c.scaling_for("model.layers.11.mlp.down_proj"), (8, 2.0));
        // Suffix match is on whole dotted components: "q_proj" must not match "xq_proj".
        assert_eq!(c.rank_for("model.layers.0.self_attn.xq_proj"), 8);
        let c = parse(r#"{"r":16,"lora_alpha":8,"use_rslora":true,"modules_to_save":null}"#).unwrap();
        assert_eq!(c.scaling_for("a").1, 2.0);
        assert!(c.modules_to_save.is_empty());
    }

    #[test]
    fn pattern_and_target_rules() {
        let keys = vec!["q_proj".to_string(), r"layers\.1\..*".to_string()];
        let mods: Vec<String> =
            ["a.q_proj", "xq_proj", "q_proj", "model.layers.1.mlp", "model.layers.11.mlp"].map(String::from).into();
        assert_eq!(first_pattern_keys(&keys, &mods).unwrap(), vec![Some(0), None, Some(0), Some(1), None]);
        assert!(first_pattern_keys(&["(".to_string()], &mods).unwrap_err().to_string().contains("\"(\""));
        let t = Targets::Names(vec!["q_proj".into(), "mlp.up_proj".into()]);
        assert!(t.matches("q_proj") && t.matches("m.q_proj") && t.matches("l.mlp.up_proj"));
        assert!(!t.matches("m.xq_proj") && !t.matches("m.q_proj.lora") && !t.matches("xmlp.up_proj"));
        let t = Targets::regex(r".*\.(q|v)_proj").unwrap();
        assert!(t.matches("m.q_proj") && !t.matches("m.q_proj2") && !t.matches("q_proj"));
        assert!(Targets::regex("a|b").unwrap().matches("b") && !Targets::regex("a|b").unwrap().matches("ab"));
        let e = Targets::regex("q_proj([").err().unwrap().to_string();
        assert!(!e.contains('\n') && e.contains("q_proj(["), "{e}");
    }

    #[test]
    fn bad_configs_name_the_field() {
        for (json, needle) in [
            ("[]", "not a JSON object"),
            ("{", "not valid JSON"),
            (r#"{"peft_type":"IA3","r":8}"#, "only LoRA"),
            (r#"{"lora_alpha":8}"#, "missing \"r\""),
            (r#"{"r":0}"#, "positive integer"),
            (r#"{"r":8,"lora_alpha":"x"}"#, "lora_alpha"),
            (r#"{"r":8,"use_dora":"yes"}"#, "use_dora"),
            (r#"{"r":8,"rank_pattern":{"(":4}}"#, "regular expression"),
            (r#"{"r":8,"rank_pattern":{"q":-1}}"#, "rank_pattern"),
            (r#"{"r":8,"modules_to_save":[1]}"#, "modules_to_save"),
        ] {
            let e = parse(json).unwrap_err().to_string();
            assert!(e.contains(needle), "{json}: {e}");
            assert!(e.contains("adapter_config.json"), "{e}");
        }
    }
}
