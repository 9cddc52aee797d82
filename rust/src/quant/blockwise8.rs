//! bitsandbytes' 8-bit blockwise quantization with a 256-entry codebook (the "dynamic" map),
//! used for double quantization: the per-block absmax of a 4-bit tensor, minus its mean, is
//! stored as one byte per block plus one f32 per 256 blocks.
//!
//! bitsandbytes' CPU kernel does not search the codebook exactly: it divides [-1, 1] into 65536
//! bins and maps each bin to the code nearest to the bin's centre. We build the same table and
//! index it the same way, so the bytes agree even where that differs from the true nearest code.

use rayon::prelude::*;

use super::check_len;
use crate::error::{Error, Result};
use crate::simd::multiversion;

/// Entries in the dynamic map (and any 8-bit codebook).
pub const DYNAMIC_CODE_LEN: usize = 256;

/// Bins of the value -> code table over [-1, 1].
const BINS: usize = 65536;

/// Quantize `x = input - offset` (one f32 subtraction, as torch's `absmax - mean`) in blocks of
/// `blocksize`: `absmax` gets each block's max |x| (0 for a zero block, whose codes are all 0),
/// `out` the code index nearest to `x / absmax` through the bin table.
pub fn quantize_blockwise_8bit(
    input: &[f32],
    offset: f32,
    code: &[f32],
    blocksize: usize,
    out: &mut [u8],
    absmax: &mut [f32],
) -> Result<()> {
    check_code(code)?;
    if blocksize == 0 {
        return Err(Error::arg("blocksize must be positive"));
    }
    check_len("8-bit output", out.len(), input.len())?;
    check_len("8-bit absmax output", absmax.len(), input.len().div_ceil(blocksize))?;
    if let Some(at) = input.iter().position(|v| !v.is_finite()) {
        return Err(Error::data(format!(
            "the absmax being double-quantized holds {} at index {at}; it must be finite",
            input[at]
        )));
    }
    let table = bin_table(code);
    out.par_chunks_mut(blocksize)
        .zip(input.par_chunks(blocksize))
        .zip(absmax.par_iter_mut())
        .for_each(|((out, x), absmax)| *absmax = quantize_block(x, offset, &table, out));
    Ok(())
}

multiversion! {
    fn quantize_block(x: &[f32], offset: f32, table: &[u8], out: &mut [u8]) -> f32 {
        let absmax = x.iter().fold(0f32, |m, v| m.max((v - offset).abs()));
        if absmax == 0.0 {
            out.fill(0);
            return 0.0;
        }
        let inverse = 1.0 / absmax;
        for (o, &v) in out.iter_mut().zip(x) {
            *o = table[bin_of((v - offset) * inverse)];
        }
        absmax
    }
}

/// The bin a normalized value falls in: round((v + 1) / 2 * 65535), computed in this exact order.
#[inline(always)]
fn bin_of(v: f32) -> usize {
    let v = v.clamp(-1.0, 1.0);
    ((v + 1.0) * 0.5 * (BINS - 1) as f32 + 0.5) as u16 as usize
}

/// For each bin centre `-1 + 2i / 65535`, the index of the nearest code (a midpoint goes low).
fn bin_table(code: &[f32]) -> Vec<u8> {
    let midpoints: Vec<f32> = code.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
    let mut table = vec![0u8; BINS];
    let mut idx = 0usize;
    for (i, slot) in table.iter_mut().enumerate() {
        let centre = -1.0f32 + (2.0f32 * i as f32) / (BINS - 1) as f32;
        while idx < midpoints.len() && midpoints[idx] < centre {
            idx += 1;
        }
        *slot = idx as u8;
    }
    table
}

fn check_code(code: &[f32]) -> Result<()> {
    check_len("8-bit codebook", code.len(), DYNAMIC_CODE_LEN)?;
    if code.iter().any(|v| !v.is_finite()) || code.windows(2).any(|w| w[0] > w[1]) {
        return Err(Error::arg("the 8-bit codebook must be 256 finite values in ascending order"));
    }
    Ok(())
}

/// `out[i] = code[q[i]] * absmax[i / blocksize] + offset`, two f32 roundings as bitsandbytes
/// (dequantize, then add the mean back).
pub fn dequantize_blockwise_8bit(
    q: &[u8],
    absmax: &[f32],
    code: &[f32],
    blocksize: usize,
    offset: f32,
    out: &mut [f32],
) -> Result<()> {
    check_len("8-bit codebook", code.len(), DYNAMIC_CODE_LEN)?;
    if blocksize == 0 {
        return Err(Error::arg("blocksize must be positive"));
    }
    check_len("dequantized output", out.len(), q.len())?;
    check_len("8-bit absmax", absmax.len(), q.len().div_ceil(blocksize))?;
    let block = |((out, q), &scale): ((&mut [f32], &[u8]), &f32)| {
        for (o, &k) in out.iter_mut().zip(q) {
            *o = code[k as usize] * scale + offset;
        }
    };
    if out.len() <= SERIAL_MAX {
        // The double-quantized absmax of one weight (numel / 64 values) is decoded before each of
        // its 4-bit dequantizations: waking a thread pool for ~14k values cost 10x the work.
        out.chunks_mut(blocksize).zip(q.chunks(blocksize)).zip(absmax).for_each(block);
    } else {
        out.par_chunks_mut(blocksize).zip(q.par_chunks(blocksize)).zip(absmax.par_iter()).for_each(block);
    }
    Ok(())
}

/// Up to this many values the 8-bit dequantization runs on the calling thread.
const SERIAL_MAX: usize = 1 << 18;

#[cfg(test)]
mod tests {
    use super::*;

    fn linear_code() -> Vec<f32> {
        (0..256).map(|i| -1.0 + 2.0 * i as f32 / 255.0).collect()
    }

    #[test]
    fn round_trip_on_a_linear_code() {
        let code = linear_code();
        let x: Vec<f32> = (0..300).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
        let mut q = vec![0u8; 300];
        let mut absmax = vec![0f32; 2];
        quantize_blockwise_8bit(&x, 0.0, &code, 256, &mut q, &mut absmax).unwrap();
        let mut back = vec![0f32; 300];
        dequantize_blockwise_8bit(&q, &absmax, &code, 256, 0.0, &mut back).unwrap();
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() <= 1.0 / 255.0 + 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn zero_block_and_bad_input() {
        let code = linear_code();
        let mut q = vec![9u8; 4];
        let mut absmax = vec![1f32; 1];
        quantize_blockwise_8bit(&[0.5; 4], 0.5, &code, 256, &mut q, &mut absmax).unwrap();
        assert_eq!((q, absmax), (vec![0; 4], vec![0.0]));
        let mut q = vec![0u8; 2];
        let mut absmax = vec![0f32; 1];
        assert!(quantize_blockwise_8bit(&[1.0, f32::NAN], 0.0, &code, 256, &mut q, &mut absmax).is_err());
        let unsorted: Vec<f32> = linear_code().into_iter().rev().collect();
        assert!(quantize_blockwise_8bit(&[1.0, 0.5], 0.0, &unsorted, 256, &mut q, &mut absmax).is_err());
    }
}
