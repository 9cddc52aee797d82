//! Bindings for `crate::merge`: the streaming merge with the GIL released (a progress callback
//! re-takes it briefly per tensor), and the merge plan for the torch (GPU) path.

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::merge::math::Layout;
use crate::merge::{merge, MergeOptions, MergePlan, Progress};
use crate::safetensors::Dtype;

fn options(
    max_shard_size: u64,
    dtype: Option<&str>,
    overwrite: bool,
    is_clip: bool,
    extra_files: Vec<(PathBuf, String)>,
    fsync: bool,
) -> PyResult<MergeOptions> {
    Ok(MergeOptions {
        fsync,
        max_shard_size,
        dtype: dtype.map(Dtype::from_user).transpose()?,
        overwrite,
        is_clip,
        extra_files,
    })
}

/// Merge a LoRA adapter into a HF model folder; returns tensors, merged, replaced, bytes_written,
/// files, seconds. `progress(name, done, total, bytes_done, bytes_total)` is called per tensor.
#[pyfunction]
#[pyo3(signature = (base, adapter_config, adapter_weights, out, max_shard_size, dtype=None, overwrite=false, is_clip=false, extra_files=Vec::new(), progress=None, fsync=true))]
#[allow(clippy::too_many_arguments)]
fn merge_lora<'py>(
    py: Python<'py>,
    base: PathBuf,
    adapter_config: PathBuf,
    adapter_weights: PathBuf,
    out: PathBuf,
    max_shard_size: u64,
    dtype: Option<&str>,
    overwrite: bool,
    is_clip: bool,
    extra_files: Vec<(PathBuf, String)>,
    progress: Option<Py<PyAny>>,
    fsync: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let opts = options(max_shard_size, dtype, overwrite, is_clip, extra_files, fsync)?;
    let mut failure: Option<PyErr> = None;
    let result = py.detach(|| {
        let mut report = |p: &Progress| -> bool {
            Python::attach(|py| {
                // Ctrl-C lands here: the merge stops and its temporary folder is removed.
                let called = py.check_signals().and_then(|_| match &progress {
                    Some(cb) => cb.call1(py, (p.name, p.done, p.total, p.bytes_done, p.bytes_total)).map(|_| ()),
                    None => Ok(()),
                });
                match called {
                    Ok(()) => true,
                    Err(e) => {
                        failure = Some(e);
                        false
                    }
                }
            })
        };
        merge(&base, &adapter_config, &adapter_weights, &out, &opts, &mut report)
    });
    if let Some(e) = failure {
        return Err(e);
    }
    let r = result?;
    let d = PyDict::new(py);
    d.set_item("tensors", r.tensors)?;
    d.set_item("merged", r.merged)?;
    d.set_item("replaced", r.replaced)?;
    d.set_item("bytes_written", r.bytes_written)?;
    d.set_item("files", r.files)?;
    d.set_item("seconds", r.seconds)?;
    d.set_item("io", r.io)?;
    Ok(d)
}

/// The merge plan, for executing the arithmetic elsewhere (torch on a GPU): one dict per output
/// tensor with name, dtype, shape, source ("base" file path or "adapter") and source_name, plus
/// lora (a, b, scaling, transposed, magnitude) and bias (name, scaling) when the adapter changes it.
#[pyfunction]
#[pyo3(signature = (base, adapter_config, adapter_weights, dtype=None, is_clip=false))]
fn merge_plan<'py>(
    py: Python<'py>,
    base: PathBuf,
    adapter_config: PathBuf,
    adapter_weights: PathBuf,
    dtype: Option<&str>,
    is_clip: bool,
) -> PyResult<Bound<'py, PyList>> {
    let opts = options(1, dtype, false, is_clip, Vec::new(), true)?;
    let plan = py.detach(|| MergePlan::build(&base, &adapter_config, &adapter_weights, &opts))?;
    let out = PyList::empty(py);
    for (i, spec) in plan.specs.iter().enumerate() {
        let (file, info) = plan.base(i);
        let d = PyDict::new(py);
        d.set_item("name", &spec.name)?;
        d.set_item("dtype", spec.dtype.name())?;
        d.set_item("shape", spec.shape.clone())?;
        let edit = plan.edits.get(&info.name);
        match edit.and_then(|e| e.replace.as_ref()) {
            Some(r) => {
                d.set_item("source", "adapter")?;
                d.set_item("source_name", &r.name)?;
            }
            None => {
                d.set_item("source", file.path().to_path_buf())?;
                d.set_item("source_name", &info.name)?;
            }
        }
        let lora = match edit.and_then(|e| e.lora.as_ref()) {
            Some(l) => {
                let ld = PyDict::new(py);
                ld.set_item("a", &l.a.name)?;
                ld.set_item("b", &l.b.name)?;
                ld.set_item("scaling", l.scaling)?;
                ld.set_item("transposed", l.layout == Layout::Transposed)?;
                ld.set_item("magnitude", l.magnitude.as_ref().map(|m| m.name.clone()))?;
                Some(ld)
            }
            None => None,
        };
        d.set_item("lora", lora)?;
        d.set_item("bias", edit.and_then(|e| e.bias.as_ref()).map(|(b, s)| (b.name.clone(), *s)))?;
        out.append(d)?;
    }
    Ok(out)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(merge_lora, m)?)?;
    m.add_function(wrap_pyfunction!(merge_plan, m)?)?;
    Ok(())
}
