//! NF4 / FP4 blockwise quantization and dequantization, byte-identical to bitsandbytes.
//!
//! Per block of `blocksize` elements (flat, C order): absmax in f32; a full block is scaled by
//! `x * (1 / max(absmax, 1e-38))`, the short last block by `x / max(absmax, 1e-38)` and stores that
//! clamped absmax (bitsandbytes' two code paths round differently, so we follow both); the scaled
//! value is clamped to [-1, 1] and takes the nearest code, a midpoint going to the lower one.
//! Two codes per byte, the even element in the high nibble; an odd tail is padded with the code of 0.

use rayon::prelude::*;

use super::codebook::{Boundaries, QuantType};
use super::elem::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, Elems, FloatDtype};
use super::{check_blocksize, check_len, num_blocks, MAX_BLOCKSIZE};
use crate::error::{Error, Result};
use crate::omp::{self, Shared};
use crate::simd::multiversion;

/// Elements one rayon task handles: large enough to amortize scheduling, small enough to balance.
const TASK_ELEMS: usize = 1 << 16;

/// The floor bitsandbytes puts under a block's absmax before dividing by it.
const ABSMAX_FLOOR: f32 = 1e-38;

/// Quantize `input` (raw bytes of `dtype` elements) into `packed` ((n + 1) / 2 bytes) and `absmax`
/// (one f32 per block). `name` names the tensor in errors.
///
/// Errors: `InvalidData` naming the tensor and the first element when an input is NaN or infinite;
/// `InvalidArgument` for a bad blocksize or wrongly sized buffers.
pub fn quantize_4bit(
    input: &[u8],
    dtype: FloatDtype,
    quant_type: QuantType,
    blocksize: usize,
    name: &str,
    packed: &mut [u8],
    absmax: &mut [f32],
) -> Result<()> {
    check_blocksize(blocksize)?;
    let x = Elems::from_bytes(input, dtype, &format!("tensor {name:?}"))?;
    let n = x.len();
    check_len("packed output", packed.len(), n.div_ceil(2))?;
    check_len("absmax output", absmax.len(), num_blocks(n, blocksize))?;
    let bounds = Boundaries::new(quant_type);
    let pair_map = (quant_type == QuantType::Fp4).then(|| pair_remap(&bounds));
    let blocks_per_task = (TASK_ELEMS / blocksize).max(1);

    let clean = packed
        .par_chunks_mut(blocks_per_task * blocksize / 2)
        .zip(absmax.par_chunks_mut(blocks_per_task))
        .enumerate()
        .map(|(task, (packed, absmax))| {
            let first = task * blocks_per_task * blocksize;
            let task_end = (first + blocks_per_task * blocksize).min(n);
            quantize_task(x.slice(first, task_end), blocksize, &bounds, pair_map.as_ref(), packed, absmax)
        })
        .all(|ok| ok);
    if clean {
        Ok(())
    } else {
        Err(non_finite_error(&x, name))
    }
}

/// The first NaN or infinite element, for the error message (only runs once a block failed).
fn non_finite_error(x: &Elems, name: &str) -> Error {
    let at = (0..x.len()).find(|&i| !x.get(i).is_finite()).unwrap_or(0);
    Error::data(format!(
        "tensor '{name}' holds {} at flat index {at}; 4-bit quantization needs finite weights \
         (the checkpoint is corrupt or training diverged)",
        x.get(at)
    ))
}

/// Byte of two ranks -> byte of the two nibbles they stand for (FP4's codes are not in value order).
fn pair_remap(bounds: &Boundaries) -> [u8; 256] {
    let nib = bounds.nibble_of_rank;
    std::array::from_fn(|b| (nib[b >> 4] << 4) | nib[b & 15])
}

multiversion! {
    /// Quantize consecutive blocks (`x` starts on a block boundary); false when one of them holds
    /// a NaN or an infinity.
    fn quantize_task(
        x: Elems,
        blocksize: usize,
        bounds: &Boundaries,
        pair_map: Option<&[u8; 256]>,
        packed: &mut [u8],
        absmax: &mut [f32],
    ) -> bool {
        let mut scaled = [0f32; MAX_BLOCKSIZE];
        let mut ranks = [0u32; MAX_BLOCKSIZE + 1];
        for (b, (packed, absmax)) in packed.chunks_mut(blocksize / 2).zip(absmax.iter_mut()).enumerate() {
            let start = b * blocksize;
            let end = (start + blocksize).min(x.len());
            let short = end - start < blocksize;
            let Some(scale) = quantize_block(x.slice(start, end), short, bounds, &mut scaled, &mut ranks, packed)
            else {
                return false;
            };
            *absmax = scale;
            if let Some(map) = pair_map {
                packed.iter_mut().for_each(|byte| *byte = map[*byte as usize]);
            }
        }
        true
    }
}

/// One block: returns its stored absmax, or None when it holds a NaN or an infinity.
#[inline(always)]
fn quantize_block(
    block: Elems,
    short: bool,
    bounds: &Boundaries,
    scaled: &mut [f32],
    ranks: &mut [u32],
    packed: &mut [u8],
) -> Option<f32> {
    let len = block.len();
    let scaled = &mut scaled[..len];
    let max_bits = widen(block, scaled);
    if max_bits >= 0x7f80_0000 {
        return None;
    }
    let absmax = f32::from_bits(max_bits);
    let stored = if short {
        let divisor = absmax.max(ABSMAX_FLOOR);
        rank_block(scaled, bounds, Scale::Divide(divisor), &mut ranks[..len]);
        divisor
    } else {
        let inverse = 1.0 / absmax.max(ABSMAX_FLOOR);
        rank_block(scaled, bounds, Scale::Multiply(inverse), &mut ranks[..len]);
        absmax
    };
    if len % 2 == 1 {
        ranks[len] = bounds.rank(0.0);
    }
    pack_pairs(&ranks[..len + len % 2], packed);
    Some(stored)
}

#[derive(Clone, Copy)]
enum Scale {
    Multiply(f32),
    Divide(f32),
}

/// Widen a block to f32 in `out`; returns the largest |x| as f32 bits (>= 0x7f80_0000 means a
/// NaN or infinity is present: positive floats order like their bit patterns).
#[inline(always)]
fn widen(block: Elems, out: &mut [f32]) -> u32 {
    match block {
        Elems::F32(s) => out.copy_from_slice(s),
        Elems::F16(s) => out.iter_mut().zip(s).for_each(|(o, &h)| *o = f16_to_f32(h)),
        Elems::BF16(s) => out.iter_mut().zip(s).for_each(|(o, &h)| *o = bf16_to_f32(h)),
    }
    out.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff))
}

#[inline(always)]
fn rank_block(x: &[f32], bounds: &Boundaries, scale: Scale, ranks: &mut [u32]) {
    match scale {
        Scale::Multiply(inv) => {
            for (r, &v) in ranks.iter_mut().zip(x) {
                *r = bounds.rank((v * inv).clamp(-1.0, 1.0));
            }
        }
        Scale::Divide(d) => {
            for (r, &v) in ranks.iter_mut().zip(x) {
                *r = bounds.rank((v / d).clamp(-1.0, 1.0));
            }
        }
    }
}

#[inline(always)]
fn pack_pairs(ranks: &[u32], packed: &mut [u8]) {
    for (byte, pair) in packed.iter_mut().zip(ranks.chunks_exact(2)) {
        *byte = ((pair[0] << 4) | pair[1]) as u8;
    }
}

/// Dequantize `packed` (n codes) with per-block `absmax` into `out`, raw bytes of `n` elements of
/// `dtype`: `code[nibble] * absmax` in f32, rounded to nearest-even into the output dtype.
pub fn dequantize_4bit(
    packed: &[u8],
    absmax: &[f32],
    quant_type: QuantType,
    blocksize: usize,
    n: usize,
    dtype: FloatDtype,
    out: &mut [u8],
) -> Result<()> {
    check_blocksize(blocksize)?;
    check_len("packed input", packed.len(), n.div_ceil(2))?;
    check_len("absmax", absmax.len(), num_blocks(n, blocksize))?;
    check_len(
        "output bytes",
        out.len(),
        crate::error::product("dequantize_4bit: n x element size", &[n, dtype.size()])?,
    )?;
    if n == 0 {
        return Ok(()); // an empty numpy buffer may have an unaligned dangling pointer
    }
    super::pages::advise_huge_pages(out);
    let code = quant_type.code();
    let misfit = |_| Error::arg("output buffer is not aligned to its element size; pass a fresh tensor");
    let blocks_per_task = (TASK_ELEMS / blocksize).max(1);
    match dtype {
        FloatDtype::F32 => {
            let out: &mut [f32] = bytemuck::try_cast_slice_mut(out).map_err(misfit)?;
            by_tasks(out, packed, absmax, blocksize, blocks_per_task, |out, packed, absmax| {
                #[cfg(target_arch = "x86_64")]
                if crate::simd::has_avx512() {
                    // SAFETY: the CPU has AVX-512 F/BW/VL (checked just above).
                    return unsafe {
                        super::expand_x86::expand_f32_blocks_avx512(&code, blocksize, packed, absmax, out)
                    };
                }
                expand_f32(&code, blocksize, packed, absmax, out)
            });
        }
        FloatDtype::BF16 => {
            let out: &mut [u16] = bytemuck::try_cast_slice_mut(out).map_err(misfit)?;
            by_tasks(out, packed, absmax, blocksize, blocks_per_task, |out, packed, absmax| {
                #[cfg(target_arch = "x86_64")]
                if crate::simd::has_avx2() {
                    // SAFETY: the CPU has AVX2 (checked just above).
                    return unsafe {
                        super::expand_x86::expand_u16_blocks(&code, blocksize, packed, absmax, out, f32_to_bf16)
                    };
                }
                expand_bf16(&code, blocksize, packed, absmax, out)
            });
        }
        FloatDtype::F16 => {
            let out: &mut [u16] = bytemuck::try_cast_slice_mut(out).map_err(misfit)?;
            by_tasks(out, packed, absmax, blocksize, blocks_per_task, |out, packed, absmax| {
                #[cfg(target_arch = "x86_64")]
                if crate::simd::has_avx2() {
                    // SAFETY: the CPU has AVX2 (checked just above).
                    return unsafe {
                        super::expand_x86::expand_u16_blocks(&code, blocksize, packed, absmax, out, f32_to_f16)
                    };
                }
                expand_f16(&code, blocksize, packed, absmax, out)
            });
        }
    }
    Ok(())
}

/// `expand(out, packed, absmax)` over parts of `blocks_per_task` whole blocks. On torch's OpenMP
/// team when the process has one: a dequantization runs between torch ops (QLoRA: between two
/// products), whose team would otherwise still be spinning on the cores that a second pool's
/// threads need. Else on rayon's pool.
fn by_tasks<T: Send>(
    out: &mut [T],
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    blocks_per_task: usize,
    expand: impl Fn(&mut [T], &[u8], &[f32]) + Sync,
) {
    let n = out.len();
    if omp::available() {
        let shared = Shared::new(out);
        let ok = omp::run(absmax.len().div_ceil(blocks_per_task), &|t| {
            let (b0, b1) = (t * blocks_per_task, ((t + 1) * blocks_per_task).min(absmax.len()));
            let (e0, e1) = (b0 * blocksize, (b1 * blocksize).min(n));
            // SAFETY: part t alone writes elements e0..e1.
            expand(unsafe { shared.range(e0, e1) }, &packed[e0 / 2..e1.div_ceil(2)], &absmax[b0..b1]);
        });
        assert!(ok, "a part of the 4-bit dequantization panicked");
    } else {
        let task_elems = blocks_per_task * blocksize;
        let tasks = packed.par_chunks(task_elems / 2).zip(absmax.par_chunks(blocks_per_task));
        out.par_chunks_mut(task_elems).zip(tasks).for_each(|(out, (packed, absmax))| expand(out, packed, absmax));
    }
}

multiversion! {
    fn expand_f32(code: &[f32; 16], blocksize: usize, packed: &[u8], absmax: &[f32], out: &mut [f32]) {
        expand_blocks(blocksize, packed, absmax, out, |k, s| code[k] * s)
    }
}

multiversion! {
    fn expand_bf16(code: &[f32; 16], blocksize: usize, packed: &[u8], absmax: &[f32], out: &mut [u16]) {
        expand_blocks(blocksize, packed, absmax, out, |k, s| f32_to_bf16(code[k] * s))
    }
}

multiversion! {
    fn expand_f16(code: &[f32; 16], blocksize: usize, packed: &[u8], absmax: &[f32], out: &mut [u16]) {
        expand_blocks(blocksize, packed, absmax, out, |k, s| f32_to_f16(code[k] * s))
    }
}

/// Each block builds its 16 output values once (`value(nibble, absmax)`), then every byte is two
/// table lookups.
#[inline(always)]
fn expand_blocks<T: Copy>(
    blocksize: usize,
    packed: &[u8],
    absmax: &[f32],
    out: &mut [T],
    value: impl Fn(usize, f32) -> T,
) {
    for ((out, packed), &scale) in out.chunks_mut(blocksize).zip(packed.chunks(blocksize / 2)).zip(absmax) {
        // Built as plain arrays so the 16 products and conversions vectorize.
        let table: [T; 16] = std::array::from_fn(|k| value(k, scale));
        expand_pairs(&table, packed, out);
    }
}

/// Two table lookups per packed byte (high nibble first); an odd `out` takes the last byte's high
/// nibble alone.
#[inline(always)]
pub(crate) fn expand_pairs<T: Copy>(table: &[T; 16], packed: &[u8], out: &mut [T]) {
    let mut pairs = out.chunks_exact_mut(2);
    for (pair, &byte) in (&mut pairs).zip(packed) {
        pair[0] = table[(byte >> 4) as usize];
        pair[1] = table[(byte & 15) as usize];
    }
    if let [last] = pairs.into_remainder() {
        *last = table[(packed[packed.len() - 1] >> 4) as usize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quantize_f32(x: &[f32], qt: QuantType, blocksize: usize) -> Result<(Vec<u8>, Vec<f32>)> {
        let mut packed = vec![0u8; x.len().div_ceil(2)];
        let mut absmax = vec![0f32; num_blocks(x.len(), blocksize)];
        quantize_4bit(bytemuck::cast_slice(x), FloatDtype::F32, qt, blocksize, "w", &mut packed, &mut absmax)?;
        Ok((packed, absmax))
    }

    #[test]
    fn codes_round_trip_exactly() {
        // A block holding every NF4 code times 2 dequantizes back to itself.
        let code = QuantType::Nf4.code();
        let x: Vec<f32> = (0..64).map(|i| code[i % 16] * 2.0).collect();
        let (packed, absmax) = quantize_f32(&x, QuantType::Nf4, 64).unwrap();
        assert_eq!(absmax, vec![2.0]);
        assert_eq!(packed[0], 0x01);
        let mut out = vec![0u8; 64 * 4];
        dequantize_4bit(&packed, &absmax, QuantType::Nf4, 64, 64, FloatDtype::F32, &mut out).unwrap();
        let back: &[f32] = bytemuck::cast_slice(&out);
        assert_eq!(back, &x[..]);
    }

    #[test]
    fn zero_block_and_odd_tail() {
        let mut x = vec![0f32; 64];
        x.extend([0.5, -1.0, 0.25]);
        let (packed, absmax) = quantize_f32(&x, QuantType::Nf4, 64).unwrap();
        assert_eq!(absmax, vec![0.0, 1.0]);
        assert!(packed[..32].iter().all(|&b| b == 0x77));
        assert_eq!(packed.len(), 34);
        assert_eq!(packed[33] & 15, 7, "odd tail is padded with the code of zero");
    }

    #[test]
    fn non_finite_names_the_tensor_and_element() {
        let mut x = vec![1f32; 200];
        x[130] = f32::NAN;
        let err = quantize_f32(&x, QuantType::Nf4, 64).unwrap_err().to_string();
        assert!(err.contains("'w'") && err.contains("130"), "{err}");
        x[130] = f32::NEG_INFINITY;
        assert!(quantize_f32(&x, QuantType::Fp4, 64).is_err());
    }

    #[test]
    fn dequantize_matches_the_formula_for_every_dtype_and_blocksize() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            let code = qt.code();
            for blocksize in crate::quant::BLOCKSIZES {
                for n in [1, 31, 32, 33, blocksize * 3 + 17, 5000] {
                    let packed: Vec<u8> = (0..n.div_ceil(2)).map(|_| next() as u8).collect();
                    let absmax: Vec<f32> =
                        (0..num_blocks(n, blocksize)).map(|_| (next() % 1000) as f32 / 7.0 - 50.0).collect();
                    let want = |i: usize| {
                        let byte = packed[i / 2];
                        code[if i.is_multiple_of(2) { byte >> 4 } else { byte & 15 } as usize] * absmax[i / blocksize]
                    };
                    for dtype in [FloatDtype::F32, FloatDtype::BF16, FloatDtype::F16] {
                        let mut out = vec![0u8; n * dtype.size()];
                        dequantize_4bit(&packed, &absmax, qt, blocksize, n, dtype, &mut out).unwrap();
                        for i in 0..n {
                            let got = match dtype {
                                FloatDtype::F32 => u32::from_le_bytes(out[4 * i..4 * i + 4].try_into().unwrap()),
                                _ => u16::from_le_bytes([out[2 * i], out[2 * i + 1]]) as u32,
                            };
                            let expected = match dtype {
                                FloatDtype::F32 => want(i).to_bits(),
                                FloatDtype::BF16 => f32_to_bf16(want(i)) as u32,
                                FloatDtype::F16 => f32_to_f16(want(i)) as u32,
                            };
                            assert_eq!(got, expected, "{qt:?} bs={blocksize} n={n} {dtype:?} i={i}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_bad_blocksize_and_buffers() {
        assert!(quantize_f32(&[1.0; 10], QuantType::Nf4, 48).is_err());
        let mut packed = vec![0u8; 4];
        let mut absmax = vec![0f32; 1];
        let x = [1f32; 10];
        let r =
            quantize_4bit(bytemuck::cast_slice(&x), FloatDtype::F32, QuantType::Nf4, 64, "w", &mut packed, &mut absmax);
        assert!(r.is_err());
    }
}
