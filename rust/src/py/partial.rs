//! Bindings for `crate::partial`: the owner-stamped partial names, the sweep and the final rename,
//! so tunex's Python writers follow the same rule as the Rust ones.

use std::path::PathBuf;

use pyo3::prelude::*;

use crate::partial::{self, Fate};

/// The partial path for `target`: `.{name}.tunex-{tag}.{owner token}` in the same folder.
#[pyfunction]
fn partial_path(target: PathBuf, tag: &str) -> PyResult<PathBuf> {
    Ok(partial::partial_path(&target, tag)?)
}

/// Remove the partials in `folder` whose owner is provably dead; returns the removed paths.
#[pyfunction]
fn sweep_partials(py: Python<'_>, folder: PathBuf) -> Vec<PathBuf> {
    py.detach(|| partial::sweep(&folder))
}

/// "alive", "dead" or "foreign" for a partial's file name; None when it is not one.
#[pyfunction]
fn partial_fate(name: &str) -> Option<&'static str> {
    partial::fate(name).map(|f| match f {
        Fate::Alive => "alive",
        Fate::Dead => "dead",
        Fate::Foreign => "foreign",
    })
}

/// Rename the finished partial `work` to `target` and fsync the parent (see `partial::publish`).
#[pyfunction]
#[pyo3(signature = (work, target, overwrite=false))]
fn publish(py: Python<'_>, work: PathBuf, target: PathBuf, overwrite: bool) -> PyResult<()> {
    Ok(py.detach(|| partial::publish(&work, &target, overwrite))?)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(partial_path, m)?)?;
    m.add_function(wrap_pyfunction!(sweep_partials, m)?)?;
    m.add_function(wrap_pyfunction!(partial_fate, m)?)?;
    m.add_function(wrap_pyfunction!(publish, m)?)?;
    Ok(())
}
