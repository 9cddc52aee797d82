//! Q8_0 blocks with AVX-512: a block's 32 values are two registers, so its largest magnitude,
//! scale, rounding and packing take a few instructions, and the check that every value is finite
//! rides along (the largest magnitude's bits, kept over the whole task).
//!
//! The bytes are `q8_0_block`'s: the magnitudes are compared as integers (the bits of a
//! non-negative float order as the float does), `amax / 127` and `1 / d` are the same scalar
//! divisions, the rounding is the same `v * id + copysign(0.49999997, v * id)` truncated, the
//! i32 -> i8 narrowing keeps the low byte as `as i8` does, and F16C's round-to-nearest-even
//! conversion is the `half` crate's. A block whose `1 / d` overflows to infinity (a largest
//! magnitude below about 1e-36) goes to the scalar code, whose saturating casts differ there from
//! the vector truncation. A test compares both paths.

use std::arch::x86_64::*;

/// Bits of a float at or above which it is infinite or NaN, once its sign bit is cleared.
const NON_FINITE: u32 = 0x7f80_0000;

/// Pack the whole Q8_0 blocks of `x` into `out` (34 bytes each) as `q8_0_block` does. Returns false
/// when a value is NaN or infinite (the blocks are written all the same; the caller reports it).
///
/// # Safety
/// The CPU has every feature enabled here (`crate::simd::has_avx512` checks them all).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
pub(super) unsafe fn q8_0_blocks_avx512(x: &[f32], out: &mut [u8]) -> bool {
    let abs_bits = _mm512_set1_epi32(0x7fff_ffff);
    let sign_bit = _mm512_set1_epi32(i32::MIN);
    let half = _mm512_castps_si512(_mm512_set1_ps(0.499_999_97));
    let mut largest = _mm512_setzero_si512();
    for (xb, ob) in x.chunks_exact(32).zip(out.chunks_exact_mut(34)) {
        // SAFETY: xb holds 32 floats, two unaligned 16-float loads; ob holds 34 bytes, the two
        // 16-byte stores cover bytes 2..34.
        unsafe {
            let a = _mm512_castps_si512(_mm512_loadu_ps(xb.as_ptr()));
            let b = _mm512_castps_si512(_mm512_loadu_ps(xb.as_ptr().add(16)));
            let m = _mm512_max_epu32(_mm512_and_si512(a, abs_bits), _mm512_and_si512(b, abs_bits));
            largest = _mm512_max_epu32(largest, m);
            let amax = f32::from_bits(_mm512_reduce_max_epu32(m));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            if id == f32::INFINITY {
                super::ggml::q8_0_block(xb, ob);
                continue;
            }
            let d16 = _mm_extract_epi16::<0>(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(d))) as u16;
            ob[..2].copy_from_slice(&d16.to_le_bytes());
            let id = _mm512_set1_ps(id);
            let round = |v: __m512i| {
                let p = _mm512_mul_ps(_mm512_castsi512_ps(v), id);
                let off = _mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(p), sign_bit), half);
                _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(_mm512_add_ps(p, _mm512_castsi512_ps(off))))
            };
            _mm_storeu_si128(ob.as_mut_ptr().add(2).cast(), round(a));
            _mm_storeu_si128(ob.as_mut_ptr().add(18).cast(), round(b));
        }
    }
    _mm512_reduce_max_epu32(largest) < NON_FINITE
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks over every magnitude a float has (1e-44 .. 1e38), with exact halves of the step,
    /// signed zeros, constant blocks and d overflowing fp16.
    fn sample(blocks: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        let mut next = move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            s >> 33
        };
        let mut x = Vec::with_capacity(blocks * 32);
        for _ in 0..blocks {
            let scale = 10f32.powi((next() % 83) as i32 - 44).max(f32::from_bits(1));
            let kind = next() % 6;
            for j in 0..32 {
                let u = (next() as f32 / (1u64 << 30) as f32 - 1.0) * scale;
                x.push(match kind {
                    0 => u,
                    1 => (u / scale * 254.0).round() / 254.0 * scale, // near halves of the step
                    2 if j == 0 => scale,                             // the step is exact
                    2 => ((next() % 255) as f32 - 127.0) / 2.0 / 127.0 * scale,
                    3 => [0.0, -0.0][j % 2],
                    4 => scale,
                    _ => u / scale * 1e38, // d past fp16's range
                });
            }
        }
        x
    }

    #[test]
    fn avx512_q8_0_writes_the_scalar_bytes_and_finds_non_finite_values() {
        if !crate::simd::has_avx512() {
            return;
        }
        let blocks = 20_000;
        let x = sample(blocks, 7);
        assert!(x.iter().all(|v| v.is_finite()));
        let mut scalar = vec![0u8; blocks * 34];
        for (xb, ob) in x.chunks_exact(32).zip(scalar.chunks_exact_mut(34)) {
            super::super::ggml::q8_0_block(xb, ob);
        }
        let mut fast = vec![0xaa_u8; scalar.len()];
        // SAFETY: the CPU has AVX-512 (checked above)
        assert!(unsafe { q8_0_blocks_avx512(&x, &mut fast) });
        let first = scalar.iter().zip(&fast).position(|(a, b)| a != b);
        assert_eq!(first, None, "first differing byte");
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN] {
            for at in [0, 17, 31, 32 * 77 + 5, x.len() - 1] {
                let mut y = x.clone();
                y[at] = bad;
                // SAFETY: as above
                assert!(!unsafe { q8_0_blocks_avx512(&y, &mut fast) }, "{bad} at {at}");
            }
        }
    }
}
