//! Planning a merge from headers alone: the base tensors in output order, what the adapter does
//! to each, and every output dtype and shape. Nothing here reads weight data.

use std::collections::HashMap;
use std::path::Path;

use super::targets::{resolve, TensorEdit};
use super::MergeOptions;
use crate::adapter::AdapterConfig;
use crate::error::{Error, IoContext, Result};
use crate::safetensors::{weight_files, Dtype, SafeFile, TensorInfo, TensorSpec};

/// Everything a merge needs, opened and checked.
pub struct MergePlan {
    pub shards: Vec<SafeFile>,
    pub adapter: SafeFile,
    /// Output order: (shard index, tensor index within the shard's header).
    pub order: Vec<(usize, usize)>,
    pub specs: Vec<TensorSpec>,
    /// Edits keyed by base tensor name.
    pub edits: HashMap<String, TensorEdit>,
}

impl MergePlan {
    pub fn build(base: &Path, adapter_config: &Path, adapter_weights: &Path, opts: &MergeOptions) -> Result<MergePlan> {
        let config_bytes = std::fs::read(adapter_config).at(adapter_config)?;
        let config = AdapterConfig::parse(adapter_config, &config_bytes)?;
        let adapter = SafeFile::open(adapter_weights)?;
        let shards = open_base(base)?;
        let order = base_order(base, &shards, opts.is_clip)?;
        let info = |&(f, t): &(usize, usize)| &shards[f].tensors()[t];
        let by_name: HashMap<&str, &TensorInfo> = order.iter().map(|o| (info(o).name.as_str(), info(o))).collect();
        let prefixes: &[&str] = if opts.is_clip { &["", "vision_model."] } else { &[""] };
        let edits = resolve(&config, adapter.tensors(), &by_name, prefixes)?;
        let specs = order
            .iter()
            .map(|o| {
                let t = info(o);
                let dtype = output_dtype(t, edits.get(&t.name), opts.dtype)?;
                Ok(TensorSpec { name: t.name.clone(), dtype, shape: t.shape.clone() })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(MergePlan { shards, adapter, order, specs, edits })
    }

    /// The base file and header entry of output tensor `i`.
    pub fn base(&self, i: usize) -> (&SafeFile, &TensorInfo) {
        let (f, t) = self.order[i];
        (&self.shards[f], &self.shards[f].tensors()[t])
    }
}

fn open_base(base: &Path) -> Result<Vec<SafeFile>> {
    let (files, index) = weight_files(base)?;
    let shards = files.iter().map(SafeFile::open).collect::<Result<Vec<_>>>()?;
    if let Some(index) = index {
        let names: HashMap<String, &SafeFile> = shards
            .iter()
            .map(|f| (f.path().file_name().unwrap_or_default().to_string_lossy().into_owned(), f))
            .collect();
        let index_path = base.join(crate::safetensors::index::INDEX_FILE);
        for (tensor, file) in &index.weight_map {
            let f = names.get(file.as_str()).expect("index.files() listed every mapped file");
            if f.get(tensor).is_none() {
                return Err(Error::format(&index_path, format!("maps {tensor:?} to {file}, which has no such tensor")));
            }
        }
    }
    Ok(shards)
}

/// Base tensors in output order: shard by shard, each in on-disk order (sequential reads).
fn base_order(base: &Path, shards: &[SafeFile], is_clip: bool) -> Result<Vec<(usize, usize)>> {
    let mut seen: HashMap<&str, &Path> = HashMap::new();
    let mut order = Vec::new();
    for (fi, file) in shards.iter().enumerate() {
        for (ti, info) in file.tensors().iter().enumerate() {
            if let Some(other) = seen.insert(&info.name, file.path()) {
                return Err(Error::format(
                    file.path(),
                    format!("tensor {:?} is also in {}", info.name, other.display()),
                ));
            }
            if !is_clip || info.name.starts_with("vision_model.") {
                order.push((fi, ti));
            }
        }
    }
    if is_clip && order.is_empty() {
        return Err(Error::arg(format!(
            "--is-clip: {} has no vision_model.* tensors; is it a CLIP checkpoint?",
            base.display()
        )));
    }
    Ok(order)
}

fn output_dtype(base: &TensorInfo, edit: Option<&TensorEdit>, want: Option<Dtype>) -> Result<Dtype> {
    let float = base.dtype.is_mergeable_float();
    let changes = edit.is_some_and(|e| e.lora.is_some() || e.bias.is_some());
    if changes && !float {
        return Err(Error::data(format!(
            "base tensor {} is {}; LoRA can only be merged into F16, BF16 or F32 weights",
            base.name,
            base.dtype.name()
        )));
    }
    if let Some(r) = edit.and_then(|e| e.replace.as_ref()) {
        if r.dtype != base.dtype && !(float && r.dtype.is_mergeable_float()) {
            return Err(Error::data(format!(
                "adapter tensor {} is {} but base tensor {} is {}",
                r.name,
                r.dtype.name(),
                base.name,
                base.dtype.name()
            )));
        }
    }
    Ok(match want {
        Some(d) if float => d,
        _ => base.dtype,
    })
}
