//! The grid of packed GGUF blocks, and new levels written into them: what error-compensated rounding
//! (GPTQ) needs. It chooses each block's parameters first (d, dmin, the sub-block scales and mins,
//! by the usual search), then rounds the values one column at a time to that block's grid while
//! earlier columns' errors move the later values, and finally stores the levels it chose under the
//! parameters it kept.
//!
//! Every value of a block type reads back as `a * k - b` for an integer level `k` in the type's
//! range ([`level_range`]), with `a` and `b` per value (shared by a block or sub-block) evaluated in
//! f32 as llama.cpp's `dequantize_row_*` does, so `a * k - b` in f32 is bit for bit the value
//! llama.cpp reads:
//! - Q8_0: `a = d`, `b = 0`, `k` in -128..=127.
//! - Q5_0: `a = d`, `b = 0`, `k` in -16..=15 (stored as `k + 16`).
//! - Q5_1: `a = d`, `b = -m`, `k` in 0..=31.
//! - Q4_K / Q5_K: `a = d * scale`, `b = dmin * min` of the value's 32-value group, `k` in 0..=15 / 0..=31.
//! - Q6_K: `a = d * scale` of the value's 16-value group, `b = 0`, `k` in -32..=31 (stored as `k + 32`).

use half::f16;
use rayon::prelude::*;

use super::ggml::{ggml_packed_len, pack_q5, q4_k_pack, q5_k_pack, q6_k_pack, scale_min_k4, GgmlType};
use crate::error::{Error, Result};

/// The levels `k` a value of `ty` can take (see the module's documentation).
pub fn level_range(ty: GgmlType) -> (i32, i32) {
    match ty {
        GgmlType::Q8_0 => (-128, 127),
        GgmlType::Q5_0 => (-16, 15),
        GgmlType::Q5_1 | GgmlType::Q5K => (0, 31),
        GgmlType::Q4K => (0, 15),
        GgmlType::Q6K => (-32, 31),
    }
}

fn check_len(what: &str, got: usize, expected: usize, name: &str) -> Result<()> {
    if got != expected {
        return Err(Error::arg(format!(
            "tensor '{name}': {what} has {got} values, expected {expected} (one per weight)"
        )));
    }
    Ok(())
}

/// Rows of `row_len` values packed as `ty` in `packed`: how many values, after checking the bytes
/// are whole rows of whole blocks.
fn values_of(packed: &[u8], row_len: usize, ty: GgmlType, name: &str) -> Result<usize> {
    let (n, b) = (ty.block_elems(), ty.block_bytes());
    if row_len == 0 || !packed.len().is_multiple_of(b) {
        return Err(Error::arg(format!(
            "tensor '{name}': {} bytes are not whole {} blocks of {b} bytes",
            packed.len(),
            ty.name().to_uppercase()
        )));
    }
    let values = packed.len() / b * n;
    ggml_packed_len(values, row_len, ty, name)?;
    Ok(values)
}

fn half(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Each value's `a` and `b` (see the module's documentation) of the blocks in `packed` (rows of
/// `row_len` values of type `ty`) into `a` and `b`, one per value. Errors (`InvalidArgument`
/// naming the tensor) when the bytes are not whole rows of blocks or `a` / `b` have the wrong length.
pub fn ggml_grid(packed: &[u8], row_len: usize, ty: GgmlType, name: &str, a: &mut [f32], b: &mut [f32]) -> Result<()> {
    let values = values_of(packed, row_len, ty, name)?;
    check_len("the scale output", a.len(), values, name)?;
    check_len("the offset output", b.len(), values, name)?;
    let (n, bytes) = (ty.block_elems(), ty.block_bytes());
    packed.par_chunks(bytes).zip(a.par_chunks_mut(n)).zip(b.par_chunks_mut(n)).for_each(|((blk, a), b)| match ty {
        GgmlType::Q8_0 | GgmlType::Q5_0 => {
            a.fill(half(blk));
            b.fill(0.0);
        }
        GgmlType::Q5_1 => {
            a.fill(half(blk));
            b.fill(-half(&blk[2..]));
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            let (d, dmin) = (half(blk), half(&blk[2..]));
            for j in 0..8 {
                let (sc, m) = scale_min_k4(&blk[4..16], j);
                a[32 * j..32 * j + 32].fill(d * sc as f32);
                b[32 * j..32 * j + 32].fill(dmin * m as f32);
            }
        }
        GgmlType::Q6K => {
            let d = half(&blk[208..]);
            for j in 0..16 {
                a[16 * j..16 * j + 16].fill(d * blk[192 + j] as i8 as f32);
            }
            b.fill(0.0);
        }
    });
    Ok(())
}

/// Writes the levels `k` (one per value, in the type's [`level_range`]) into the blocks of
/// `packed`, keeping every block's parameters: afterwards value `i` reads back as
/// `a[i] * k[i] - b[i]` of [`ggml_grid`]. Errors (`InvalidArgument` naming the tensor) on a
/// level out of range (the first one's index), or lengths that do not match; `packed` is then
/// left as it was.
pub fn ggml_set_levels(levels: &[i8], row_len: usize, ty: GgmlType, name: &str, packed: &mut [u8]) -> Result<()> {
    let values = values_of(packed, row_len, ty, name)?;
    check_len("the levels", levels.len(), values, name)?;
    let (lo, hi) = level_range(ty);
    if let Some(at) = levels.iter().position(|&k| !(lo..=hi).contains(&(k as i32))) {
        return Err(Error::arg(format!(
            "tensor '{name}': level {} at index {at} is outside {}'s {lo}..={hi}",
            levels[at],
            ty.name().to_uppercase()
        )));
    }
    let (n, bytes) = (ty.block_elems(), ty.block_bytes());
    packed.par_chunks_mut(bytes).zip(levels.par_chunks(n)).for_each(|(blk, k)| match ty {
        GgmlType::Q8_0 => {
            for (q, &v) in blk[2..].iter_mut().zip(k) {
                *q = v as u8;
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let q: [u8; 32] = std::array::from_fn(|j| (k[j] as i32 - lo) as u8);
            let (qh, qs) = blk[if ty == GgmlType::Q5_0 { 2 } else { 4 }..].split_at_mut(4);
            pack_q5(&q, qh, qs);
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            let q: [u8; 256] = std::array::from_fn(|j| k[j] as u8);
            if ty == GgmlType::Q4K {
                q4_k_pack(&q, &mut blk[16..]);
            } else {
                q5_k_pack(&q, &mut blk[16..]);
            }
        }
        GgmlType::Q6K => {
            let q: [u8; 256] = std::array::from_fn(|j| (k[j] as i32 - lo) as u8);
            q6_k_pack(&q, blk);
        }
    });
    Ok(())
}

/// Where a block of `ty` keeps its f16 `d` (the scale every level multiplies): its byte offset.
fn d_offset(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q6K => 208,
        GgmlType::Q8_0 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => 0,
    }
}

/// Multiplies every block's `d` in `packed` (rows of `row_len` values of type `ty`) by `s`, in f32
/// and rounded to f16 (to nearest, ties to even); a block whose scaled `d` would not be a finite
/// f16 keeps its own. The levels and the other parameters (dmin, sub-block scales and mins) are
/// left as they are, so afterwards each value's `a` of [`ggml_grid`] is the new `d` times its
/// sub-block scale. Errors (`InvalidArgument` naming the tensor) when the bytes are not whole rows
/// of blocks or `s` is not finite; `packed` is then left as it was.
pub fn ggml_scale_d(packed: &mut [u8], row_len: usize, ty: GgmlType, name: &str, s: f32) -> Result<()> {
    values_of(packed, row_len, ty, name)?;
    if !s.is_finite() {
        return Err(Error::arg(format!("tensor '{name}': the scale factor {s} is not a finite number")));
    }
    let at = d_offset(ty);
    packed.par_chunks_mut(ty.block_bytes()).for_each(|blk| {
        let scaled = f16::from_f32(half(&blk[at..]) * s);
        if scaled.is_finite() {
            blk[at..at + 2].copy_from_slice(&scaled.to_le_bytes());
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::ggml::tests::{decode, sample};
    use crate::quant::quantize_ggml;

    /// Levels a quantizer wrote, read back through the grid: `a * k - b` from the packed bytes.
    fn levels_of(ty: GgmlType, packed: &[u8], a: &[f32], b: &[f32]) -> Vec<i8> {
        let back = decode(ty, packed);
        back.iter()
            .zip(a.iter().zip(b))
            .map(|(&v, (&a, &b))| if a == 0.0 { 0 } else { ((v + b) / a).round() as i8 })
            .collect()
    }

    /// `x` quantized as `ty` in rows of 512, with each value's grid (a, b) read back.
    fn packed_with_grid(x: &[f32], ty: GgmlType) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
        let mut packed = vec![0u8; ggml_packed_len(x.len(), 512, ty, "w").unwrap()];
        quantize_ggml(x, 512, ty, "w", &mut packed).unwrap();
        let (a, b) = grid(&packed, ty);
        (packed, a, b)
    }

    fn grid(packed: &[u8], ty: GgmlType) -> (Vec<f32>, Vec<f32>) {
        let n = packed.len() / ty.block_bytes() * ty.block_elems();
        let (mut a, mut b) = (vec![0.0f32; n], vec![0.0f32; n]);
        ggml_grid(packed, 512, ty, "w", &mut a, &mut b).unwrap();
        (a, b)
    }

    #[test]
    fn new_levels_read_back_as_a_times_k_minus_b() {
        let x = sample(1024, 5);
        for ty in GgmlType::ALL {
            let (mut packed, a, b) = packed_with_grid(&x, ty);
            // rewriting the quantizer's own levels leaves the bytes as they were
            let own = levels_of(ty, &packed, &a, &b);
            let mut again = packed.clone();
            ggml_set_levels(&own, 512, ty, "w", &mut again).unwrap();
            assert_eq!(again, packed, "{ty:?}");
            let (lo, hi) = level_range(ty);
            let k: Vec<i8> = (0..1024).map(|i| (lo + (i * 7 + i / 3) % (hi - lo + 1)) as i8).collect();
            ggml_set_levels(&k, 512, ty, "w", &mut packed).unwrap();
            let back = decode(ty, &packed);
            for i in 0..1024 {
                assert_eq!(back[i], a[i] * k[i] as f32 - b[i], "{ty:?} value {i}");
            }
        }
    }

    #[test]
    fn a_scaled_d_scales_every_value_of_the_grid() {
        let x = sample(1024, 11);
        for ty in GgmlType::ALL {
            let (packed, a, b) = packed_with_grid(&x, ty);
            let mut scaled = packed.clone();
            ggml_scale_d(&mut scaled, 512, ty, "w", 0.9).unwrap();
            let (a2, b2) = grid(&scaled, ty);
            assert_eq!(b2, b, "{ty:?}: the offsets stay");
            let n = ty.block_elems();
            for (i, (&new, &old)) in a2.iter().zip(&a).enumerate() {
                // d read from the original block, scaled in f32, rounded to f16, times the sub-block scale
                let d = half(&packed[i / n * ty.block_bytes() + d_offset(ty)..]);
                let d2 = f16::from_f32(d * 0.9).to_f32();
                let sub = if d == 0.0 { 0.0 } else { old / d };
                assert_eq!(new, d2 * sub, "{ty:?} value {i}");
            }
            // only d's two bytes of each block change
            let changed = packed.iter().zip(&scaled).enumerate().filter(|(_, (p, q))| p != q);
            for (i, _) in changed {
                let at = i % ty.block_bytes();
                assert!((d_offset(ty)..d_offset(ty) + 2).contains(&at), "{ty:?} byte {at}");
            }
        }
        // a d that would overflow f16 is kept; a bad factor or length is an error, nothing changed
        let mut blk = vec![0u8; 34];
        blk[..2].copy_from_slice(&f16::from_f32(60000.0).to_le_bytes());
        ggml_scale_d(&mut blk, 32, GgmlType::Q8_0, "w", 2.0).unwrap();
        assert_eq!(half(&blk), 60000.0);
        let before = blk.clone();
        let msg = ggml_scale_d(&mut blk, 32, GgmlType::Q8_0, "blk.0.attn_q.weight", f32::NAN).unwrap_err().to_string();
        assert!(msg.contains("blk.0.attn_q.weight") && !msg.contains('\n'), "{msg}");
        assert!(ggml_scale_d(&mut blk[..33], 32, GgmlType::Q8_0, "w", 1.0).is_err());
        assert_eq!(blk, before);
    }

    #[test]
    fn bad_levels_and_lengths_get_one_line_errors() {
        let mut packed = vec![0u8; 144];
        let mut k = vec![0i8; 256];
        k[9] = 16;
        let before = packed.clone();
        let msg = ggml_set_levels(&k, 256, GgmlType::Q4K, "blk.1.attn_q.weight", &mut packed).unwrap_err().to_string();
        assert!(msg.contains("blk.1.attn_q.weight") && msg.contains("index 9") && !msg.contains('\n'), "{msg}");
        assert_eq!(packed, before);
        let msg = ggml_set_levels(&k[..255], 256, GgmlType::Q4K, "w", &mut packed).unwrap_err().to_string();
        assert!(msg.contains("255"), "{msg}");
        let (mut a, mut b) = (vec![0.0f32; 256], vec![0.0f32; 256]);
        assert!(ggml_grid(&packed[..143], 256, GgmlType::Q4K, "w", &mut a, &mut b).is_err());
        assert!(ggml_grid(&packed, 128, GgmlType::Q4K, "w", &mut a, &mut b).is_err());
        assert!(ggml_grid(&packed, 256, GgmlType::Q4K, "w", &mut a[..10], &mut b).is_err());
        assert!(ggml_grid(&packed, 0, GgmlType::Q4K, "w", &mut a, &mut b).is_err());
    }
}
