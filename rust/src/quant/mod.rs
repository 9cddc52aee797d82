//! 4-bit (NF4 / FP4) block quantization, byte-identical to bitsandbytes, the 8-bit "dynamic"
//! blockwise quantization bitsandbytes uses to compress the 4-bit absmax ("double quant"), and
//! llama.cpp's GGUF block types (`ggml`: Q8_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) byte-identical to ggml,
//! plain or importance-weighted (`ggml_weighted`), and their blocks' grids with new levels written
//! into them (`ggml_levels`) and GPTQ's column loop over them (`ggml_gptq`), for error-compensated rounding.
//!
//! Everything here works on flat slices owned by the caller: the Python wrapper allocates the
//! output tensors and lends their bytes, so nothing is copied on the way in or out.
//! The exact rules (tie breaking, clamping, padding) are in `shared/design/FORMATS.md` and in
//! `docs/QUANT.md`; the tests compare against bitsandbytes itself.

mod blockwise8;
mod codebook;
mod elem;
#[cfg(target_arch = "x86_64")]
mod expand_x86;
mod fourbit;
mod ggml;
mod ggml_gptq;
#[cfg(target_arch = "x86_64")]
mod ggml_lanes;
mod ggml_levels;
#[cfg(target_arch = "x86_64")]
mod ggml_q8_x86;
mod ggml_weighted;
mod pages;

pub use blockwise8::{dequantize_blockwise_8bit, quantize_blockwise_8bit, DYNAMIC_CODE_LEN};
pub use codebook::QuantType;
pub use elem::FloatDtype;
pub use fourbit::{dequantize_4bit, quantize_4bit};
pub use ggml::{ggml_packed_len, quantize_ggml, GgmlType};
pub use ggml_gptq::ggml_gptq_run;
pub use ggml_levels::{ggml_grid, ggml_scale_d, ggml_set_levels};
pub use ggml_weighted::quantize_ggml_weighted;

use crate::error::{Error, Result};

/// Block sizes bitsandbytes accepts for 4-bit quantization.
pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Largest block: per-block scratch buffers are sized by it.
pub(crate) const MAX_BLOCKSIZE: usize = 4096;

pub(crate) fn check_blocksize(blocksize: usize) -> Result<()> {
    if BLOCKSIZES.contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::arg(format!(
            "blocksize {blocksize} is not supported; use a power of two from 32 to 4096 \
             (32, 64, 128, ..., 4096); 64 is the QLoRA default"
        )))
    }
}

pub(crate) fn num_blocks(n: usize, blocksize: usize) -> usize {
    n.div_ceil(blocksize)
}

/// `what` has `got` entries where `expected` were needed: a caller sized a buffer wrongly.
pub(crate) fn check_len(what: &str, got: usize, expected: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::arg(format!("{what} has {got} entries, expected {expected}")))
    }
}
