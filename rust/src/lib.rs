//! tunex's Rust core: bytes in, bytes out. Pure Rust modules first; the Python bindings live under
//! `py/` and are compiled only with the `python` feature (maturin turns it on).
//!
//! # Where things are decided
//! - [`settings`]: every `TUNEX_*` environment switch the Rust side reads, and when.
//! - [`simd`]: which SIMD tier (AVX-512, AVX2, baseline) each CPU kernel runs.
//! - [`error`]: the one error type; `py::errors` maps it to Python exceptions (a bad argument,
//!   including a shape whose sizes overflow, is `InvalidArgument`, a `ValueError` in Python).
//!
//! # Three ways to run work in parallel, each for one kind of job
//! The crate keeps three runtimes because the jobs differ in size, in who else wants the cores at
//! the time, and in how often they start; each was chosen by an interleaved A/B against the
//! alternatives (BENCHMARKS.md and the commit log hold the numbers).
//! - **rayon** (`merge`, `quant`): big, uneven, throughput-bound jobs (merging a checkpoint's
//!   tensors, quantizing or dequantizing whole weights). Work stealing balances tensors of
//!   different sizes; the pool's wake-up (tens of µs) is small against them. Where such a job runs
//!   inside a training step it moves off rayon: 4-bit dequantization to f32 runs on the OpenMP
//!   team when there is one, and 8-bit dequantization of a small absmax stays on the caller.
//! - **the OpenMP team of the process** (`omp`: RMSNorm, RoPE, attention, SwiGLU, cross-entropy,
//!   dropout, LoRA, the 8-bit AdamW step, and 4-bit dequantization to f32 during training): these kernels run between
//!   torch's own CPU ops in a training step, and torch's OpenMP threads are then awake and own the
//!   cores. Running on that same team (libgomp's `GOMP_parallel`, looked up at run time so the
//!   crate links no OpenMP) avoids a second pool contending for the cores: a rayon version made the
//!   LoRA step 6% slower, this one 3-4% faster. Without libgomp in the process the parts run in
//!   turn on the caller.
//! - **the decode pool** (`infer::pool`: the GEMV of token-by-token generation): ~200 products of
//!   tens to hundreds of µs per token with small torch ops between them. rayon's sleeping workers
//!   take about as long to wake as a product takes; the OpenMP team cannot serve either, because
//!   decoding holds torch to one thread (`torch.set_num_threads(1)` in `models/generate.py`, so that
//!   torch's pool does not fight the GEMV for the cores), which leaves that team with one thread.
//!   Its helpers spin a few ms between products, then park.
//!
//! The OpenMP team and the decode pool hand a job to other threads as a pointer to the caller's
//! stack; both return only after every thread has let go of it, including when a part panics
//! (`part::run` stops the panic where it happens). See their SAFETY comments.

pub mod adamw8bit;
pub mod adapter;
pub mod attention;
pub mod dropout;
pub mod error;
pub mod infer;
pub mod lora;
pub mod merge;
pub mod omp;
mod part;
pub mod partial;
pub mod quant;
pub mod rmsnorm;
pub mod rope;
pub mod safetensors;
pub(crate) mod settings;
pub(crate) mod simd;
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
    py::partial::register(m)?;
    py::peft::register(m)?;
    py::quant::register(m)?;
    py::kernels::register(m)?;
    py::optim::register(m)?;
    py::info::register(m)?;
    Ok(())
}
