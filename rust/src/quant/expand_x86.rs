//! AVX2 expansion of packed 4-bit codes into 16-bit outputs (bf16 / f16): 32 outputs per step
//! from 16 packed bytes with two byte shuffles (`vpshufb`) against the block's 16-entry table,
//! instead of 32 scalar table lookups. The table holds already-rounded outputs, so the result is
//! the same bits as the scalar path (a test compares both builds).

use std::arch::x86_64::*;

/// Expand every block of `packed` into `out` with the per-block table `round(code[k] * absmax)`.
/// The caller checks that the CPU has AVX2 (`crate::simd::has_avx2`).
///
/// The table is built in a plain loop here, where AVX2 is enabled and `round` (an
/// `#[inline(always)]` conversion) vectorizes: built out of line (an `array::map` LLVM chose not
/// to inline), its 16 scalar roundings per 64-element block cost as much as the expansion itself.
///
/// # Safety
/// AVX2 must be available.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn expand_u16_blocks(
    code: &[f32; 16],
    blocksize: usize,
    packed: &[u8],
    absmax: &[f32],
    out: &mut [u16],
    round: impl Fn(f32) -> u16,
) {
    for ((out, packed), &scale) in out.chunks_mut(blocksize).zip(packed.chunks(blocksize / 2)).zip(absmax) {
        let mut values = [0u16; 16];
        for (value, &c) in values.iter_mut().zip(code) {
            *value = round(c * scale);
        }
        let steps = (out.len() / 32).min(packed.len() / 16);
        // SAFETY: AVX2 is enabled for this function; every load reads 16 bytes at 16 * i with
        // i < steps <= packed.len() / 16, every store writes 32 u16 at 32 * i < out.len() - 31.
        unsafe { expand_steps(&values, &packed[..steps * 16], &mut out[..steps * 32]) };
        super::fourbit::expand_pairs(&values, &packed[steps * 16..], &mut out[steps * 32..]);
    }
}

/// # Safety
/// AVX2 must be available, `packed` must hold whole 16-byte steps and `out` 32 values per step.
#[target_feature(enable = "avx2")]
unsafe fn expand_steps(values: &[u16; 16], packed: &[u8], out: &mut [u16]) {
    // SAFETY (whole body): AVX2 is enabled; loads and stores stay inside the slices, whose lengths
    // are 16 * steps and 32 * steps (unaligned loads/stores are used throughout).
    unsafe {
        // The table's low and high bytes, split in registers. The table is read as the two 16-byte
        // halves it was just written in: one wider load across both stores cannot take the data
        // from the store buffer and stalls every block (it halved the bf16 rate).
        let first = _mm_loadu_si128(values.as_ptr().cast());
        let second = _mm_loadu_si128(values.as_ptr().add(8).cast());
        let byte = _mm_set1_epi16(0xff);
        let lo = _mm_packus_epi16(_mm_and_si128(first, byte), _mm_and_si128(second, byte));
        let hi = _mm_packus_epi16(_mm_srli_epi16(first, 8), _mm_srli_epi16(second, 8));
        let lo_table = _mm256_broadcastsi128_si256(lo);
        let hi_table = _mm256_broadcastsi128_si256(hi);
        let nibble = _mm_set1_epi8(0x0f);
        for (i, chunk) in packed.chunks_exact(16).enumerate() {
            let bytes = _mm_loadu_si128(chunk.as_ptr().cast());
            let high = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble); // even elements
            let low = _mm_and_si128(bytes, nibble); // odd elements
            let first = _mm_unpacklo_epi8(high, low); // elements 0..16 in order
            let second = _mm_unpackhi_epi8(high, low); // elements 16..32
            let index = _mm256_inserti128_si256(_mm256_castsi128_si256(first), second, 1);
            let lo = _mm256_shuffle_epi8(lo_table, index);
            let hi = _mm256_shuffle_epi8(hi_table, index);
            let a = _mm256_unpacklo_epi8(lo, hi); // elements 0..8 | 16..24
            let b = _mm256_unpackhi_epi8(lo, hi); // elements 8..16 | 24..32
            let dst = out.as_mut_ptr().add(i * 32);
            _mm256_storeu_si256(dst.cast(), _mm256_permute2x128_si256(a, b, 0x20));
            _mm256_storeu_si256(dst.add(16).cast(), _mm256_permute2x128_si256(a, b, 0x31));
        }
    }
}

/// AVX-512 expansion of packed 4-bit codes into f32: the block's 16 values (`code[k] * absmax`,
/// the same single rounding as the scalar path) sit in one register and each group of 16 codes
/// is one `vpermps` lookup.
///
/// # Safety
/// AVX-512 F/BW/VL must be available (`crate::simd::has_avx512`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn expand_f32_blocks_avx512(
    code: &[f32; 16],
    blocksize: usize,
    packed: &[u8],
    absmax: &[f32],
    out: &mut [f32],
) {
    // SAFETY (whole body): AVX-512 is enabled; every load reads 16 bytes at 16 * i with
    // i < steps <= packed.len() / 16 and every store writes 32 f32 at 32 * i < out.len() - 31.
    unsafe {
        let codes = _mm512_loadu_ps(code.as_ptr());
        let nibble = _mm_set1_epi8(0x0f);
        for ((out, packed), &scale) in out.chunks_mut(blocksize).zip(packed.chunks(blocksize / 2)).zip(absmax) {
            let table = _mm512_mul_ps(codes, _mm512_set1_ps(scale));
            let steps = (out.len() / 32).min(packed.len() / 16);
            for i in 0..steps {
                let bytes = _mm_loadu_si128(packed.as_ptr().add(i * 16).cast());
                let high = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble); // even elements
                let low = _mm_and_si128(bytes, nibble); // odd elements
                let first = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(high, low)); // elements 0..16
                let second = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(high, low)); // elements 16..32
                let dst = out.as_mut_ptr().add(i * 32);
                _mm512_storeu_ps(dst, _mm512_permutexvar_ps(first, table));
                _mm512_storeu_ps(dst.add(16), _mm512_permutexvar_ps(second, table));
            }
            let mut values = [0f32; 16];
            _mm512_storeu_ps(values.as_mut_ptr(), table);
            super::fourbit::expand_pairs(&values, &packed[steps * 16..], &mut out[steps * 32..]);
        }
    }
}
