//! The streaming LoRA merge: plan every output shard from the headers, then read, merge and write
//! each tensor once. Resident memory is about one merged tensor (in f32) plus its output bytes,
//! whatever the model size: base pages are handed back to the page cache after each tensor.

pub mod math;
pub mod plan;
pub mod targets;

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{Error, IoContext, Result};
use crate::safetensors::{Dtype, OutputDir, SafeFile, ShardedWriter, TensorInfo};
use math::{add_low_rank, dora_rescale, first_non_finite, from_f32, to_f32};
pub use plan::MergePlan;
use targets::TensorEdit;

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
    let plan = MergePlan::build(base, adapter_config, adapter_weights, opts)?;
    let bytes_total = plan.specs.iter().map(|s| s.nbytes()).sum::<Result<u64>>()?;
    let dir = OutputDir::new_folder(out, opts.overwrite)?;
    let meta = vec![("format".to_string(), "pt".to_string())];
    let mut writer = ShardedWriter::new(dir, plan.specs.clone(), opts.max_shard_size, meta, "model")?;

    let mut report = MergeReport::default();
    let mut scratch = Scratch::default();
    let mut bytes_done = 0u64;
    for (i, spec) in plan.specs.iter().enumerate() {
        let (file, info) = plan.base(i);
        let edit = plan.edits.get(&info.name);
        let src = match edit.and_then(|e| e.replace.as_ref()) {
            Some(r) => {
                report.replaced += 1;
                Source { file: &plan.adapter, info: r }
            }
            None => Source { file, info },
        };
        writer.begin(&spec.name)?;
        match edit.filter(|e| e.lora.is_some() || e.bias.is_some()) {
            Some(e) => {
                merge_one(&mut writer, &src, e, &plan.adapter, spec.dtype, &mut scratch)?;
                report.merged += 1;
            }
            None => pass_through(&mut writer, &src, spec.dtype, &mut scratch)?,
        }
        writer.end()?;
        src.file.release(src.info);
        bytes_done += spec.nbytes()?;
        let p = Progress { name: &spec.name, done: i + 1, total: plan.specs.len(), bytes_done, bytes_total };
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
