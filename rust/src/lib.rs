//! tunex's Rust core: bytes in, bytes out. Pure Rust modules first; the Python bindings live under
//! `py/` and are compiled only with the `python` feature (maturin turns it on).

pub mod adapter;
pub mod attention;
pub mod dropout;
pub mod error;
pub mod infer;
pub mod lora;
pub mod merge;
pub mod omp;
pub mod quant;
pub mod rmsnorm;
pub mod rope;
pub mod safetensors;
pub mod swiglu;
pub mod units;
pub mod xent;

#[cfg(feature = "python")]
mod py;

#[cfg(feature = "python")]
use pyo3::prelude::*;

/// The private native module, `tunex._native`. Only tunex's wrapper modules import it.
#[cfg(feature = "python")]
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    py::units::register(m)?;
    py::safetensors::register(m)?;
    py::merge::register(m)?;
    py::quant::register(m)?;
    py::kernels::register(m)?;
    py::info::register(m)?;
    Ok(())
}
