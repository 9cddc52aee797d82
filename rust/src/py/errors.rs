//! The one boundary where `crate::error::Error` becomes a Python exception.
//!
//! I/O failures become the built-in OSError family (FileNotFoundError, PermissionError, ...) with
//! `filename` set; bad arguments become ValueError; format and data problems become tunex's own
//! classes from `tunex.errors` (subclasses of both `TunexError` and `ValueError`).

use pyo3::exceptions::{
    PyFileExistsError, PyFileNotFoundError, PyIsADirectoryError, PyOSError, PyPermissionError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::PyType;

use crate::error::Error;

fn tunex_class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyType>> {
    Ok(py.import("tunex.errors")?.getattr(name)?.cast_into::<PyType>()?)
}

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        let msg = err.to_string();
        match err {
            Error::Io { path, source } => {
                let filename = path.display().to_string();
                let args = (source.raw_os_error().unwrap_or(0), msg, filename);
                match source.kind() {
                    std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(args),
                    std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(args),
                    std::io::ErrorKind::AlreadyExists => PyFileExistsError::new_err(args),
                    std::io::ErrorKind::IsADirectory => PyIsADirectoryError::new_err(args),
                    _ => PyOSError::new_err(args),
                }
            }
            Error::InvalidArgument(_) => PyValueError::new_err(msg),
            Error::Format { .. } => tunex_err("FormatError", msg),
            Error::InvalidData(_) => tunex_err("DataError", msg),
        }
    }
}

fn tunex_err(class: &str, msg: String) -> PyErr {
    Python::attach(|py| match tunex_class(py, class) {
        Ok(cls) => PyErr::from_type(cls, msg),
        Err(import_failure) => import_failure,
    })
}
