//! Thin PyO3 bindings: extract arguments into owned Rust values, release the GIL for long work,
//! call the core, convert the error once (errors.rs).

pub mod errors;
pub mod kernels;
pub mod merge;
pub mod quant;
pub mod safetensors;
pub mod units;
