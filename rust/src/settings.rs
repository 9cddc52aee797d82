//! Every `TUNEX_*` environment switch the Rust core reads, each read here and nowhere else.
//! Python declares the same switches (name, default, choices) in `python/tunex/settings.py`;
//! this module is the Rust side of that table. A function here reads the variable each time it is
//! called; the doc of each says which caller calls it once per process and why.
//!
//! | switch               | default | effect                                                            |
//! |----------------------|---------|-------------------------------------------------------------------|
//! | `TUNEX_SIMD`         | auto    | `avx2`: AVX2 at most; `portable`: baseline x86-64 code only        |
//! | `TUNEX_DIRECT_IO`    | 1       | `0`: the shard writer uses buffered writes instead of O_DIRECT     |
//! | `TUNEX_OMP_KERNELS`  | 1       | `0`: CPU training kernels run their parts in turn on the caller    |
//! | `TUNEX_NUM_THREADS`  | (cores) | threads of the decode pool, the caller included                    |
//!
//! A value a switch does not name (or one that is not valid Unicode) means the default, as it
//! always has; `tunex.settings` rejects such values on the Python side before they get here.

use std::env;

fn var(name: &str) -> Option<String> {
    env::var(name).ok()
}

/// The highest SIMD tier `TUNEX_SIMD` allows.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // only x86-64 has tiers
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SimdCap {
    /// `auto` (or unset): the CPU's best tier.
    Native,
    /// `avx2`: AVX2 at most, so tests can check that tier on an AVX-512 machine.
    Avx2,
    /// `portable`: the baseline x86-64 code only, so tests can check that every tier gives the
    /// same bytes.
    Portable,
}

/// `TUNEX_SIMD`. Read once per process by `crate::simd` (its first dispatch decides the tier for
/// good): every kernel of a process must run one tier, or a forward and its backward could round
/// differently.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn simd_cap() -> SimdCap {
    match var("TUNEX_SIMD").as_deref() {
        Some("portable") => SimdCap::Portable,
        Some("avx2") => SimdCap::Avx2,
        _ => SimdCap::Native,
    }
}

/// `TUNEX_DIRECT_IO` (default on). Read at every shard file the writer creates
/// (`safetensors::direct::DirectFile::new`): it is a per-file choice with no state to keep
/// consistent, so a change between two merges in one process takes effect.
pub(crate) fn direct_io() -> bool {
    var("TUNEX_DIRECT_IO").is_none_or(|v| v != "0")
}

/// `TUNEX_OMP_KERNELS` (default on). Read once per process by `crate::omp` (together with the
/// lookup of libgomp's entry point, which it gates). Tests and A/B runs switch the kernels at call
/// time with `tunex._native.set_omp_kernels` instead.
pub(crate) fn omp_kernels() -> bool {
    var("TUNEX_OMP_KERNELS").is_none_or(|v| v != "0")
}

/// `TUNEX_NUM_THREADS`: a positive thread count, or None (unset, empty, zero or not a number)
/// for the cores this process may use. Read once per process by `crate::infer::pool`, whose
/// helper threads are started once and live as long as the process.
pub(crate) fn num_threads() -> Option<usize> {
    var("TUNEX_NUM_THREADS").and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 0)
}
