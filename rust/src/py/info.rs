//! `build_info()`: what this build of the extension is, for `tunex doctor`.

use pyo3::prelude::*;
use pyo3::types::PyDict;

/// The SIMD tier the kernels run at in this process (after `TUNEX_SIMD` and the CPU's features).
fn simd_tier() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::simd::has_avx512() {
            return "avx512";
        }
        if crate::simd::has_avx2() {
            return "avx2";
        }
    }
    "portable"
}

/// A dict: version, cargo features, target arch and OS, the SIMD tiers compiled in and the one
/// chosen at run time, and whether this is a debug build.
#[pyfunction]
fn build_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("version", env!("CARGO_PKG_VERSION"))?;
    // this module exists only with the crate's `python` feature, its one optional feature
    d.set_item("features", vec!["python"])?;
    d.set_item("target_arch", std::env::consts::ARCH)?;
    d.set_item("target_os", std::env::consts::OS)?;
    let compiled: Vec<&str> =
        if cfg!(target_arch = "x86_64") { vec!["portable", "avx2", "avx512"] } else { vec!["portable"] };
    d.set_item("simd_compiled", compiled)?;
    d.set_item("simd_tier", simd_tier())?;
    d.set_item("debug_build", cfg!(debug_assertions))?;
    Ok(d)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(build_info, m)?)
}
