//! safetensors reading, shard planning and atomic sharded writing. Pure Rust: the Python bindings
//! live in `py::safetensors`.

pub mod direct;
pub mod dtype;
pub mod header;
pub mod index;
pub mod outdir;
pub mod plan;
pub mod reader;
pub mod writer;

#[cfg(test)]
mod fuzz_tests;

pub use dtype::Dtype;
pub use header::{parse_header, Header, TensorInfo, MAX_HEADER_SIZE};
pub use index::{parse_index, weight_files, ShardIndex};
pub use outdir::OutputDir;
pub use reader::SafeFile;
pub use writer::{ShardedWriter, TensorSpec, WriteSummary};
