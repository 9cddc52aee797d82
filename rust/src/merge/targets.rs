//! Which adapter tensors change which base tensors: PEFT key names resolved against the base
//! checkpoint's headers, with every shape checked before a byte of weight data is read.

use std::collections::{BTreeMap, HashMap};

use crate::adapter::AdapterConfig;
use crate::error::{Error, Result};
use crate::merge::math::Layout;
use crate::safetensors::TensorInfo;

/// PEFT saves module paths under this prefix; XTuner's and tunex's adapters do too.
const PEFT_PREFIX: &str = "base_model.model.";

/// A low-rank update of one base weight.
#[derive(Clone, Debug)]
pub struct LoraUpdate {
    pub module: String,
    pub a: TensorInfo,
    pub b: TensorInfo,
    pub rank: usize,
    pub scaling: f32,
    pub layout: Layout,
    pub magnitude: Option<TensorInfo>,
}

/// Everything that happens to one base tensor.
#[derive(Clone, Debug, Default)]
pub struct TensorEdit {
    /// Adapter tensor whose bytes replace the base tensor (modules_to_save, saved base layers,
    /// trained biases).
    pub replace: Option<TensorInfo>,
    pub lora: Option<LoraUpdate>,
    /// `lora_B.bias` added to a bias with this scaling (lora_bias=True).
    pub bias: Option<(TensorInfo, f32)>,
}

#[derive(Default)]
struct ModuleParts {
    a: Option<TensorInfo>,
    b: Option<TensorInfo>,
    embedding: bool,
    b_bias: Option<TensorInfo>,
    magnitude: Option<TensorInfo>,
}

fn shape_str(s: &[u64]) -> String {
    format!("({})", s.iter().map(u64::to_string).collect::<Vec<_>>().join(", "))
}

/// Resolve the adapter's tensors against `base` (name -> header entry). Returns the edits keyed
/// by base tensor name. Adapter entries that fit no base tensor are all listed in one error.
///
/// `prefixes` are tried in order in front of adapter module paths (`""` first): a CLIP vision tower
/// adapted as a bare CLIPVisionModel names `encoder.layers...` what the checkpoint calls
/// `vision_model.encoder.layers...`.
pub fn resolve(
    config: &AdapterConfig,
    adapter: &[TensorInfo],
    base: &HashMap<&str, &TensorInfo>,
    prefixes: &[&str],
) -> Result<HashMap<String, TensorEdit>> {
    let find = |name: &str| -> Option<(String, &TensorInfo)> {
        prefixes.iter().find_map(|p| {
            let full = format!("{p}{name}");
            base.get(full.as_str()).map(|t| (full, *t))
        })
    };
    let mut modules: BTreeMap<String, ModuleParts> = BTreeMap::new();
    let mut edits: HashMap<String, TensorEdit> = HashMap::new();
    let mut unmatched = Vec::new();
    let mut unsupported = Vec::new();

    for t in adapter {
        let key = t.name.strip_prefix(PEFT_PREFIX).unwrap_or(&t.name);
        let split = |suffix: &str| key.strip_suffix(suffix).map(str::to_string);
        if let Some(m) = split(".lora_A.weight") {
            modules.entry(m).or_default().a = Some(t.clone());
        } else if let Some(m) = split(".lora_B.weight") {
            modules.entry(m).or_default().b = Some(t.clone());
        } else if let Some(m) = split(".lora_B.bias") {
            modules.entry(m).or_default().b_bias = Some(t.clone());
        } else if let Some(m) = split(".lora_embedding_A") {
            let p = modules.entry(m).or_default();
            p.a = Some(t.clone());
            p.embedding = true;
        } else if let Some(m) = split(".lora_embedding_B") {
            let p = modules.entry(m).or_default();
            p.b = Some(t.clone());
            p.embedding = true;
        } else if let Some(m) = split(".lora_magnitude_vector").or_else(|| split(".lora_magnitude_vector.weight")) {
            modules.entry(m).or_default().magnitude = Some(t.clone());
        } else if key.contains(".lora_") {
            unsupported.push(t.name.clone());
        } else {
            // A full tensor: `X.base_layer.weight` is the saved base weight of a LoRA-wrapped layer
            // (embeddings saved with save_embedding_layers); anything else is modules_to_save or a
            // trained bias. Both replace the base tensor of the same name.
            let target = key.replacen(".base_layer.", ".", 1);
            match find(&target) {
                Some((target, b)) if b.shape == t.shape => edits.entry(target).or_default().replace = Some(t.clone()),
                Some((target, b)) => {
                    return Err(Error::data(format!(
                        "adapter tensor {} has shape {} but base tensor {target} has shape {}",
                        t.name,
                        shape_str(&t.shape),
                        shape_str(&b.shape)
                    )))
                }
                None => unmatched.push(t.name.clone()),
            }
        }
    }
    if !unsupported.is_empty() {
        return Err(Error::data(format!(
            "the adapter holds tensors of a LoRA variant tunex cannot merge: {}",
            unsupported.join(", ")
        )));
    }

    for (module, parts) in modules {
        let Some((weight_name, w)) = find(&format!("{module}.weight")) else {
            unmatched.push(format!("{module} (no base tensor {module}.weight)"));
            continue;
        };
        let (Some(a), Some(b)) = (parts.a, parts.b) else {
            return Err(Error::data(format!("adapter module {module} has only one of its two LoRA factors (A and B)")));
        };
        let lora = check_lora(config, &module, w, a, b, parts.embedding, parts.magnitude)?;
        if let Some(bias) = parts.b_bias {
            let bias_name = format!("{}.bias", weight_name.strip_suffix(".weight").unwrap_or(&weight_name));
            let Some(base_bias) = base.get(bias_name.as_str()) else {
                return Err(Error::data(format!(
                    "adapter module {module} has a lora_B bias (lora_bias=True) but the base has no {bias_name} to add it to"
                )));
            };
            if base_bias.shape != bias.shape {
                return Err(Error::data(format!(
                    "adapter tensor {} has shape {} but base tensor {bias_name} has shape {}",
                    bias.name,
                    shape_str(&bias.shape),
                    shape_str(&base_bias.shape)
                )));
            }
            edits.entry(bias_name).or_default().bias = Some((bias, lora.scaling));
        }
        edits.entry(weight_name).or_default().lora = Some(lora);
    }
    if !unmatched.is_empty() {
        return Err(Error::data(format!(
            "{} adapter {} no tensor of the base model (is this the right base?): {}",
            unmatched.len(),
            if unmatched.len() == 1 { "entry matches" } else { "entries match" },
            unmatched.join(", ")
        )));
    }
    Ok(edits)
}

fn check_lora(
    config: &AdapterConfig,
    module: &str,
    w: &TensorInfo,
    a: TensorInfo,
    b: TensorInfo,
    embedding: bool,
    magnitude: Option<TensorInfo>,
) -> Result<LoraUpdate> {
    if w.shape.len() != 2 || a.shape.len() != 2 || b.shape.len() != 2 {
        return Err(Error::data(format!(
            "adapter module {module}: only 2-D weights can be merged (base {}, lora_A {}, lora_B {}); \
             convolution LoRA is not supported",
            shape_str(&w.shape),
            shape_str(&a.shape),
            shape_str(&b.shape)
        )));
    }
    let (r, a_cols, b_rows) = (a.shape[0], a.shape[1], b.shape[0]);
    if b.shape[1] != r {
        return Err(Error::data(format!(
            "adapter module {module}: lora_A {} and lora_B {} disagree on the rank",
            shape_str(&a.shape),
            shape_str(&b.shape)
        )));
    }
    let (want_r, scaling) = config.scaling_for(module);
    if want_r != r {
        return Err(Error::data(format!(
            "adapter module {module}: the factors have rank {r} but adapter_config.json gives r={want_r} \
             for it (r / rank_pattern)"
        )));
    }
    let layout = if embedding || config.fan_in_fan_out { Layout::Transposed } else { Layout::Normal };
    let product = match layout {
        Layout::Normal => vec![b_rows, a_cols],
        Layout::Transposed => vec![a_cols, b_rows],
    };
    if w.shape != product {
        return Err(Error::data(format!(
            "adapter module {module}: lora_B {} @ lora_A {} gives a {} update{} but base tensor {} has shape {}",
            shape_str(&b.shape),
            shape_str(&a.shape),
            shape_str(&product),
            if layout == Layout::Transposed { " (transposed)" } else { "" },
            w.name,
            shape_str(&w.shape)
        )));
    }
    match (&magnitude, config.use_dora) {
        (None, true) => {
            return Err(Error::data(format!(
                "adapter_config.json sets use_dora but module {module} has no lora_magnitude_vector"
            )))
        }
        (Some(_), false) => {
            return Err(Error::data(format!(
                "module {module} has a DoRA lora_magnitude_vector but adapter_config.json does not set use_dora"
            )))
        }
        // One magnitude per output feature: rows of a Linear, the embedding dim (columns) of an
        // Embedding; both are lora_B's rows.
        (Some(m), true) if m.shape != vec![b_rows] => {
            return Err(Error::data(format!(
                "module {module}: lora_magnitude_vector has shape {} but the layer has {b_rows} output features",
                shape_str(&m.shape)
            )))
        }
        _ => {}
    }
    Ok(LoraUpdate { module: module.to_string(), a, b, rank: r as usize, scaling: scaling as f32, layout, magnitude })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors::Dtype;
    use std::path::Path;

    fn t(name: &str, shape: &[u64]) -> TensorInfo {
        TensorInfo { name: name.into(), dtype: Dtype::F32, shape: shape.to_vec(), begin: 0, end: 0 }
    }

    fn config(json: &str) -> AdapterConfig {
        AdapterConfig::parse(Path::new("adapter_config.json"), json.as_bytes()).unwrap()
    }

    #[test]
    fn resolves_lora_dora_bias_and_replacements() {
        let base =
            [t("m.q.weight", &[6, 4]), t("m.q.bias", &[6]), t("emb.weight", &[10, 4]), t("head.weight", &[10, 4])];
        let map: HashMap<&str, &TensorInfo> = base.iter().map(|b| (b.name.as_str(), b)).collect();
        let adapter = [
            t("base_model.model.m.q.lora_A.weight", &[2, 4]),
            t("base_model.model.m.q.lora_B.weight", &[6, 2]),
            t("base_model.model.m.q.lora_B.bias", &[6]),
            t("base_model.model.emb.lora_embedding_A", &[2, 10]),
            t("base_model.model.emb.lora_embedding_B", &[4, 2]),
            t("base_model.model.head.weight", &[10, 4]),
        ];
        let edits = resolve(&config(r#"{"r":2,"lora_alpha":4}"#), &adapter, &map, &[""]).unwrap();
        let q = edits["m.q.weight"].lora.as_ref().unwrap();
        assert_eq!((q.rank, q.scaling, q.layout), (2, 2.0, Layout::Normal));
        assert_eq!(edits["m.q.bias"].bias.as_ref().unwrap().1, 2.0);
        assert_eq!(edits["emb.weight"].lora.as_ref().unwrap().layout, Layout::Transposed);
        assert!(edits["head.weight"].replace.is_some());
    }

    #[test]
    fn problems_are_reported_with_names_and_shapes() {
        let base = [t("m.q.weight", &[6, 4])];
        let map: HashMap<&str, &TensorInfo> = base.iter().map(|b| (b.name.as_str(), b)).collect();
        let cfg = config(r#"{"r":2}"#);
        let err = |adapter: &[TensorInfo]| resolve(&cfg, adapter, &map, &[""]).unwrap_err().to_string();
        let e = err(&[t("x.lora_A.weight", &[2, 4]), t("x.lora_B.weight", &[6, 2]), t("y.lora_A.weight", &[2, 4])]);
        assert!(
            e.contains("2 adapter entries match no tensor") && e.contains("x (no base") && e.contains("y (no base"),
            "{e}"
        );
        let e = err(&[t("m.q.lora_A.weight", &[2, 5]), t("m.q.lora_B.weight", &[6, 2])]);
        assert!(e.contains("(6, 5)") && e.contains("(6, 4)"), "{e}");
        let e = err(&[t("m.q.lora_A.weight", &[2, 4])]);
        assert!(e.contains("only one of its two LoRA factors"), "{e}");
        let e = err(&[t("m.q.lora_A.weight", &[3, 4]), t("m.q.lora_B.weight", &[6, 3])]);
        assert!(e.contains("rank 3") && e.contains("r=2"), "{e}");
        let e = err(&[t("m.q.lora_E", &[2])]);
        assert!(e.contains("LoRA variant"), "{e}");
        let e = err(&[
            t("m.q.lora_A.weight", &[2, 4]),
            t("m.q.lora_B.weight", &[6, 2]),
            t("m.q.lora_magnitude_vector", &[6]),
        ]);
        assert!(e.contains("does not set use_dora"), "{e}");
    }
}
