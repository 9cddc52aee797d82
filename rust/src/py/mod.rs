//! Thin PyO3 bindings: extract arguments into owned Rust values, release the GIL for long work,
//! call the core, convert the error once (errors.rs).

pub mod errors;
pub mod info;
pub mod kernels;
pub mod merge;
pub mod optim;
pub mod partial;
pub mod peft;
pub mod quant;
pub mod safetensors;
pub mod units;

use pyo3::exceptions::PyValueError;
use pyo3::PyResult;

/// A numpy array's data, or a ValueError naming the argument and the layout it needs
/// (`kind`: "array", "float32 array").
pub(crate) fn contiguous<'a, T>(
    what: &str,
    kind: &str,
    data: Result<&'a [T], numpy::AsSliceError>,
) -> PyResult<&'a [T]> {
    data.map_err(|_| PyValueError::new_err(format!("{what} must be a contiguous {kind}")))
}

/// [`contiguous`] for a writable array.
pub(crate) fn contiguous_mut<'a, T>(
    what: &str,
    kind: &str,
    data: Result<&'a mut [T], numpy::AsSliceError>,
) -> PyResult<&'a mut [T]> {
    data.map_err(|_| PyValueError::new_err(format!("{what} must be a contiguous {kind}")))
}
