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

/// Attach a path to a bare `std::io::Result`.
pub trait IoContext<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
