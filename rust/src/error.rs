//! The one error type of the Rust core. `py::errors` is the single place it becomes a Python
//! exception; nothing else in the core knows Python exists.

use std::path::{Path, PathBuf};

/// Every failure the Rust core can report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused a read, write, open, rename or fsync on `path`.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The bytes of `path` do not follow its format (safetensors header, index JSON, adapter config).
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    /// A caller-supplied argument is outside its domain (size string, blocksize, dtype name).
    #[error("{0}")]
    InvalidArgument(String),
    /// Well-formed input whose values or shapes the operation cannot accept (NaN weights, a LoRA
    /// factor whose shape does not fit its base tensor).
    #[error("{0}")]
    InvalidData(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), source }
    }

    pub fn format(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }

    pub fn arg(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    pub fn data(msg: impl Into<String>) -> Self {
        Error::InvalidData(msg.into())
    }
}

/// The product of `factors`, or an [`Error::InvalidArgument`] naming `what` (a caller's argument
/// or a size computed from its shape) when it does not fit in a `usize`. Every size that a bounds
/// check in front of unsafe code relies on is computed this way, so a huge shape is refused
/// instead of wrapping around to a small number that passes the check.
pub(crate) fn product(what: &str, factors: &[usize]) -> Result<usize> {
    factors.iter().try_fold(1usize, |acc, &f| acc.checked_mul(f)).ok_or_else(|| {
        let sizes: Vec<String> = factors.iter().map(|f| f.to_string()).collect();
        Error::arg(format!("{what} = {} does not fit in a usize; check the shape", sizes.join(" x ")))
    })
}

/// Attach a path to a bare `std::io::Result`.
pub trait IoContext<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_refuses_an_overflow_naming_what() {
        assert_eq!(product("n", &[3, 5, 7]).unwrap(), 105);
        assert_eq!(product("n", &[usize::MAX, 0]).unwrap(), 0);
        let err = product("rope: x's span", &[1 << 40, 1 << 30]).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)));
        assert_eq!(
            err.to_string(),
            "rope: x's span = 1099511627776 x 1073741824 does not fit in a usize; check the shape"
        );
    }
}
