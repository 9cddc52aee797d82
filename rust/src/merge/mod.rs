//! The streaming LoRA merge: plan every output shard from the headers, then read, merge and write
//! each tensor once. Resident memory is about one merged tensor (in f32) plus its output bytes,
//! whatever the model size: base pages are handed back to the page cache after each tensor.

pub mod math;
pub mod plan;
pub mod targets;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::safetensors::{Dtype, OutputDir, SafeFile, ShardedWriter, TensorInfo};
use math::{add_low_rank, dora_rescale, from_f32, merge_rows, to_f32, Layout, LowRank};
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
    /// fsync every file before the final rename (see `OutputDir::set_durable`).
    pub fsync: bool,
}

#[derive(Clone, Debug, Default)]
pub struct MergeReport {
    pub tensors: usize,
    pub merged: usize,
    pub replaced: usize,
    pub bytes_written: u64,
    pub files: Vec<String>,
    pub seconds: f64,
    /// How the shards were written (see `WriteSummary::io`).
    pub io: String,
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
///
/// Two threads of work overlap: this thread computes tensor i+1 (its rayon pool doing the GEMM and
/// conversions) while a writer thread hands tensor i to the kernel.
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
    let mut dir = OutputDir::new_folder(out, opts.overwrite)?;
    dir.set_durable(opts.fsync);
    let meta = vec![("format".to_string(), "pt".to_string())];
    let writer = ShardedWriter::new(dir, plan.specs.clone(), opts.max_shard_size, meta, "model")?;

    let mut report = MergeReport::default();
    let (tx, rx) = mpsc::sync_channel::<Msg>(6);
    let (recycle_tx, recycle_rx) = mpsc::channel::<Vec<u8>>();
    let (computed, writer) = std::thread::scope(|scope| {
        let handle = scope.spawn(move || write_loop(writer, rx, recycle_tx));
        let mut sink = Sink { tx, recycle: recycle_rx };
        let computed = compute_loop(&plan, &mut sink, &mut report, bytes_total, progress);
        drop(sink);
        let written = handle.join().unwrap_or_else(|_| Err(Error::data("the merge writer thread panicked")));
        (computed, written)
    });
    // A writer failure (disk full, ...) is the root cause of a closed channel: report it first.
    let writer = writer?;
    computed?;
    let (mut dir, summary) = writer.finish()?;
    for (src, name) in &opts.extra_files {
        dir.copy_as(src, name)?;
    }
    dir.commit("model")?;
    report.tensors = summary.tensors;
    report.bytes_written = summary.file_bytes;
    report.io = summary.io;
    report.files = summary.files;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// What the compute side sends the writer thread.
enum Msg<'a> {
    Begin(&'a str),
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
    /// The tensor is complete; its source pages may be dropped once written.
    End(Option<(&'a SafeFile, &'a TensorInfo)>),
}

struct Sink<'a> {
    tx: mpsc::SyncSender<Msg<'a>>,
    recycle: mpsc::Receiver<Vec<u8>>,
}

impl<'a> Sink<'a> {
    fn send(&self, msg: Msg<'a>) -> Result<()> {
        // A closed channel means the writer failed; merge() reports the writer's own error.
        self.tx.send(msg).map_err(|_| Error::data("the merge writer stopped"))
    }

    /// An output buffer of `len` bytes, reusing one the writer has finished with.
    fn buffer(&self, len: usize) -> Vec<u8> {
        let mut v = self.recycle.try_recv().unwrap_or_default();
        v.resize(len, 0);
        v
    }
}

fn write_loop(
    mut writer: ShardedWriter,
    rx: mpsc::Receiver<Msg>,
    recycle: mpsc::Sender<Vec<u8>>,
) -> Result<ShardedWriter> {
    for msg in rx {
        match msg {
            Msg::Begin(name) => writer.begin(name)?,
            Msg::Borrowed(bytes) => writer.write(bytes)?,
            Msg::Owned(buf) => {
                writer.write(&buf)?;
                let _ = recycle.send(buf);
            }
            Msg::End(release) => {
                writer.end()?;
                if let Some((file, info)) = release {
                    file.release(info);
                }
            }
        }
    }
    Ok(writer)
}

/// Where output tensor `i` comes from: the base, or the adapter tensor replacing it.
fn plan_source(plan: &MergePlan, i: usize) -> Source<'_> {
    let (file, info) = plan.base(i);
    match plan.edits.get(&info.name).and_then(|e| e.replace.as_ref()) {
        Some(r) => Source { file: &plan.adapter, info: r },
        None => Source { file, info },
    }
}

/// Start reading tensor `i` (and its LoRA factors) while the current one is computed and written.
fn prefetch(plan: &MergePlan, i: usize) {
    let src = plan_source(plan, i);
    src.file.prefetch(src.info);
    if let Some(l) = plan.edits.get(&plan.base(i).1.name).and_then(|e| e.lora.as_ref()) {
        plan.adapter.prefetch(&l.a);
        plan.adapter.prefetch(&l.b);
    }
}

fn compute_loop<'a>(
    plan: &'a MergePlan,
    sink: &mut Sink<'a>,
    report: &mut MergeReport,
    bytes_total: u64,
    progress: &mut dyn FnMut(&Progress) -> bool,
) -> Result<()> {
    let mut scratch = Scratch::default();
    let mut bytes_done = 0u64;
    for (i, spec) in plan.specs.iter().enumerate() {
        let src = plan_source(plan, i);
        let edit = plan.edits.get(&plan.base(i).1.name);
        if edit.is_some_and(|e| e.replace.is_some()) {
            report.replaced += 1;
        }
        if i + 1 < plan.specs.len() {
            prefetch(plan, i + 1);
        }
        sink.send(Msg::Begin(&spec.name))?;
        match edit.filter(|e| e.lora.is_some() || e.bias.is_some()) {
            Some(e) => {
                merge_one(sink, &src, e, &plan.adapter, spec.dtype, &mut scratch)?;
                report.merged += 1;
            }
            None => pass_through(sink, &src, spec.dtype, &mut scratch)?,
        }
        sink.send(Msg::End(Some((src.file, src.info))))?;
        bytes_done += spec.nbytes()?;
        let p = Progress { name: &spec.name, done: i + 1, total: plan.specs.len(), bytes_done, bytes_total };
        if !progress(&p) {
            return Err(Error::arg("merge cancelled"));
        }
    }
    Ok(())
}

/// Reusable buffers, grown to the largest merged tensor and kept.
#[derive(Default)]
struct Scratch {
    w: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    extra: Vec<f32>,
}

fn widen_into(buf: &mut Vec<f32>, file: &SafeFile, info: &TensorInfo) -> Result<()> {
    // Every element is overwritten, so only growth needs initialising.
    buf.resize(info.numel() as usize, 0.0);
    to_f32(file.bytes(info), info.dtype, buf).map_err(|e| Error::data(format!("{}: {e}", info.name)))?;
    // Each factor is read once: drop its pages so the adapter never becomes resident as a whole.
    file.release(info);
    Ok(())
}

fn merge_one<'a>(
    sink: &Sink<'a>,
    src: &Source,
    edit: &TensorEdit,
    adapter: &SafeFile,
    out_dtype: Dtype,
    s: &mut Scratch,
) -> Result<()> {
    let numel = src.info.numel() as usize;
    let mut out = sink.buffer(numel * out_dtype.size());
    let non_finite = || {
        Error::data(format!(
            "merging into {} produced a non-finite value: the adapter or the base holds NaN or infinity",
            src.info.name
        ))
    };
    if let Some(l) = &edit.lora {
        widen_into(&mut s.a, adapter, &l.a)?;
        widen_into(&mut s.b, adapter, &l.b)?;
        let lr = LowRank { a: &s.a, b: &s.b, rank: l.rank, layout: l.layout, scaling: l.scaling };
        let magnitude = match &l.magnitude {
            Some(m) => {
                widen_into(&mut s.extra, adapter, m)?;
                Some(s.extra.as_slice())
            }
            None => None,
        };
        if l.layout == Layout::Normal || magnitude.is_none() {
            // The common case, fused block by block in cache.
            if !merge_rows(src.file.bytes(src.info), src.info.dtype, &mut out, out_dtype, &lr, magnitude)? {
                return Err(non_finite());
            }
            return sink.send(Msg::Owned(out));
        }
        // DoRA on a transposed weight: column norms need the whole matrix first.
        widen_into(&mut s.w, src.file, src.info)?;
        add_low_rank(&mut s.w, &lr);
        let (rows, cols) = lr.weight_shape();
        dora_rescale(&mut s.w, rows, cols, magnitude.unwrap_or_default(), l.layout);
    } else {
        widen_into(&mut s.w, src.file, src.info)?;
    }
    if let Some((bias, scaling)) = &edit.bias {
        widen_into(&mut s.extra, adapter, bias)?;
        s.w.iter_mut().zip(&s.extra).for_each(|(w, b)| *w += scaling * b);
    }
    if !from_f32(&s.w, out_dtype, &mut out)? {
        return Err(non_finite());
    }
    sink.send(Msg::Owned(out))
}

/// A tensor without an update: copied byte for byte, or converted in bounded steps.
fn pass_through<'a>(sink: &Sink<'a>, src: &Source<'a>, out_dtype: Dtype, s: &mut Scratch) -> Result<()> {
    let bytes = src.file.bytes(src.info);
    if src.info.dtype == out_dtype {
        for piece in bytes.chunks(COPY_STEP) {
            sink.send(Msg::Borrowed(piece))?;
        }
        return Ok(());
    }
    let in_size = src.info.dtype.size();
    for piece in bytes.chunks(CONVERT_STEP * in_size) {
        let n = piece.len() / in_size;
        s.extra.resize(n, 0.0);
        to_f32(piece, src.info.dtype, &mut s.extra)?;
        let mut out = sink.buffer(n * out_dtype.size());
        from_f32(&s.extra, out_dtype, &mut out)?;
        sink.send(Msg::Owned(out))?;
    }
    Ok(())
}
