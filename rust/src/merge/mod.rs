//! The streaming LoRA merge: plan every output shard from the headers, then read, merge and write
//! each tensor once. Resident memory is about one merged tensor (in f32) plus its output bytes,
//! whatever the model size: base pages are handed back to the page cache after each tensor.

pub mod math;
pub mod targets;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::adapter::AdapterConfig;
use crate::error::{Error, IoContext, Result};
use crate::safetensors::{weight_files, Dtype, OutputDir, SafeFile, ShardedWriter, TensorInfo, TensorSpec};
use math::{add_low_rank, dora_rescale, first_non_finite, from_f32, to_f32};
use targets::{resolve, TensorEdit};

/// Elements converted per step when a tensor only changes dtype (bounds the scratch buffers).
const CONVERT_STEP: usize = 1 << 22;
/// Bytes copied per write when a tensor passes through unchanged.
const COPY_STEP: usize = 64 << 20;

#[derive(Clone, Debug)]
pub struct MergeOptions {
    pub max_shard_size: u64,
    /// Output dtype for floating tensors; `None` keeps each base tensor's dtype.
    pub dtype: Option<Dtype>,
    pub overwrite: bool,
    /// The base is a CLIP checkpoint: keep only its vision tower (`vision_model.*`), as
    /// CLIPVisionModel.save_pretrained would.
    pub is_clip: bool,
    /// Non-weight files to place in the output: (source path, file name in the output).
    pub extra_files: Vec<(PathBuf, String)>,
}

#[derive(Clone, Debug, Default)]
pub struct MergeReport {
    pub tensors: usize,
    pub merged: usize,
    pub replaced: usize,
    pub bytes_written: u64,
    pub files: Vec<String>,
    pub seconds: f64,
}

/// Where a merge stands, for progress bars. Returning `false` from the callback cancels the merge.
pub struct Progress<'a> {
    pub name: &'a str,
    pub done: usize,
    pub total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

struct Source<'a> {
    file: &'a SafeFile,
    info: &'a TensorInfo,
}

/// Merge the LoRA adapter (`adapter_config`, `adapter_weights`: a .safetensors file) into the HF
/// model folder `base`, writing a sharded HF checkpoint to `out` atomically.
pub fn merge(
    base: &Path,
    adapter_config: &Path,
    adapter_weights: &Path,
    out: &Path,
    opts: &MergeOptions,
    progress: &mut dyn FnMut(&Progress) -> bool,
) -> Result<MergeReport> {
    let start = Instant::now();
    let config_bytes = std::fs::read(adapter_config).at(adapter_config)?;
    let config = AdapterConfig::parse(adapter_config, &config_bytes)?;
    let adapter = SafeFile::open(adapter_weights)?;
    let shards = open_base(base)?;
    let order = base_order(base, &shards, opts.is_clip)?;
    let by_name: HashMap<&str, &TensorInfo> = order.iter().map(|s| (s.info.name.as_str(), s.info)).collect();
    let edits = resolve(&config, adapter.tensors(), &by_name)?;

    let mut specs = Vec::with_capacity(order.len());
    for s in &order {
        let edit = edits.get(&s.info.name);
        specs.push(TensorSpec { name: s.info.name.clone(), dtype: output_dtype(s.info, edit, opts.dtype)?, shape: s.info.shape.clone() });
    }
    let bytes_total = specs.iter().map(|s| s.nbytes()).sum::<Result<u64>>()?;
    let dir = OutputDir::new_folder(out, opts.overwrite)?;
    let meta = vec![("format".to_string(), "pt".to_string())];
    let mut writer = ShardedWriter::new(dir, specs.clone(), opts.max_shard_size, meta, "model")?;

    let mut report = MergeReport::default();
    let mut scratch = Scratch::default();
    let mut bytes_done = 0u64;
    for (i, (s, spec)) in order.iter().zip(&specs).enumerate() {
        let edit = edits.get(&s.info.name);
        let src = match edit.and_then(|e| e.replace.as_ref()) {
            Some(r) => {
                report.replaced += 1;
                Source { file: &adapter, info: r }
            }
            None => Source { file: s.file, info: s.info },
        };
        writer.begin(&spec.name)?;
        match edit.filter(|e| e.lora.is_some() || e.bias.is_some()) {
            Some(e) => {
                merge_one(&mut writer, &src, e, &adapter, spec.dtype, &mut scratch)?;
                report.merged += 1;
            }
            None => pass_through(&mut writer, &src, spec.dtype, &mut scratch)?,
        }
        writer.end()?;
        src.file.release(src.info);
        bytes_done += spec.nbytes()?;
        let p = Progress { name: &spec.name, done: i + 1, total: specs.len(), bytes_done, bytes_total };
        if !progress(&p) {
            return Err(Error::arg("merge cancelled"));
        }
    }
    let (mut dir, summary) = writer.finish()?;
    for (src, name) in &opts.extra_files {
        copy_extra(&mut dir, src, name)?;
    }
    dir.commit("model")?;
    report.tensors = summary.tensors;
    report.bytes_written = summary.file_bytes;
    report.files = summary.files;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

fn copy_extra(dir: &mut OutputDir, src: &Path, name: &str) -> Result<()> {
    let (dst, _) = dir.create(name)?;
    std::fs::copy(src, &dst).at(src)?;
    std::fs::File::open(&dst).and_then(|f| f.sync_all()).at(&dst)?;
    Ok(())
}

fn open_base(base: &Path) -> Result<Vec<SafeFile>> {
    let (files, index) = weight_files(base)?;
    let shards = files.iter().map(SafeFile::open).collect::<Result<Vec<_>>>()?;
    if let Some(index) = index {
        let names: HashMap<String, &SafeFile> =
            shards.iter().map(|f| (f.path().file_name().unwrap_or_default().to_string_lossy().into_owned(), f)).collect();
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
fn base_order<'a>(base: &Path, shards: &'a [SafeFile], is_clip: bool) -> Result<Vec<Source<'a>>> {
    let mut seen: HashMap<&str, &Path> = HashMap::new();
    let mut order = Vec::new();
    for file in shards {
        for info in file.tensors() {
            if let Some(other) = seen.insert(&info.name, file.path()) {
                return Err(Error::format(file.path(), format!("tensor {:?} is also in {}", info.name, other.display())));
            }
            if !is_clip || info.name.starts_with("vision_model.") {
                order.push(Source { file, info });
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
            base.name, base.dtype.name()
        )));
    }
    if let Some(r) = edit.and_then(|e| e.replace.as_ref()) {
        if r.dtype != base.dtype && !(float && r.dtype.is_mergeable_float()) {
            return Err(Error::data(format!(
                "adapter tensor {} is {} but base tensor {} is {}",
                r.name, r.dtype.name(), base.name, base.dtype.name()
            )));
        }
    }
    Ok(match want {
        Some(d) if float => d,
        _ => base.dtype,
    })
}

/// Reusable buffers, grown to the largest merged tensor and kept.
#[derive(Default)]
struct Scratch {
    w: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    extra: Vec<f32>,
    out: Vec<u8>,
}

fn widen_into(buf: &mut Vec<f32>, file: &SafeFile, info: &TensorInfo) -> Result<()> {
    buf.clear();
    buf.resize(info.numel() as usize, 0.0);
    to_f32(file.bytes(info), info.dtype, buf).map_err(|e| Error::data(format!("{}: {e}", info.name)))
}

fn merge_one(
    writer: &mut ShardedWriter,
    src: &Source,
    edit: &TensorEdit,
    adapter: &SafeFile,
    out_dtype: Dtype,
    s: &mut Scratch,
) -> Result<()> {
    widen_into(&mut s.w, src.file, src.info)?;
    if let Some(l) = &edit.lora {
        widen_into(&mut s.a, adapter, &l.a)?;
        widen_into(&mut s.b, adapter, &l.b)?;
        add_low_rank(&mut s.w, &s.a, &s.b, l.rank, l.layout, l.scaling);
        if let Some(m) = &l.magnitude {
            widen_into(&mut s.extra, adapter, m)?;
            let (rows, cols) = (src.info.shape[0] as usize, src.info.shape[1] as usize);
            dora_rescale(&mut s.w, rows, cols, &s.extra, l.layout);
        }
    }
    if let Some((bias, scaling)) = &edit.bias {
        widen_into(&mut s.extra, adapter, bias)?;
        s.w.iter_mut().zip(&s.extra).for_each(|(w, b)| *w += scaling * b);
    }
    if let Some(i) = first_non_finite(&s.w) {
        return Err(Error::data(format!(
            "merging into {} produced a non-finite value (element {i}): the adapter or the base holds NaN or infinity",
            src.info.name
        )));
    }
    s.out.clear();
    s.out.resize(s.w.len() * out_dtype.size(), 0);
    from_f32(&s.w, out_dtype, &mut s.out)?;
    writer.write(&s.out)
}

/// A tensor without an update: copied byte for byte, or converted in bounded steps.
fn pass_through(writer: &mut ShardedWriter, src: &Source, out_dtype: Dtype, s: &mut Scratch) -> Result<()> {
    let bytes = src.file.bytes(src.info);
    if src.info.dtype == out_dtype {
        for piece in bytes.chunks(COPY_STEP) {
            writer.write(piece)?;
        }
        return Ok(());
    }
    let in_size = src.info.dtype.size();
    for piece in bytes.chunks(CONVERT_STEP * in_size) {
        let n = piece.len() / in_size;
        s.extra.clear();
        s.extra.resize(n, 0.0);
        to_f32(piece, src.info.dtype, &mut s.extra)?;
        s.out.clear();
        s.out.resize(n * out_dtype.size(), 0);
        from_f32(&s.extra, out_dtype, &mut s.out)?;
        writer.write(&s.out)?;
    }
    Ok(())
}
