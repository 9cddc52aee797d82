//! llama.cpp's GGUF block types Q8_0, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K: quantization byte-identical
//! to ggml's reference quantizers (`quantize_row_*_ref`, what `llama-quantize` runs without an
//! importance matrix), so llama.cpp's own dequantizer reads the blocks back.
//!
//! Every block is quantized on its own (a row is a run of whole blocks), so the blocks of a tensor
//! are spread over rayon's pool in fixed chunks and the bytes do not depend on the thread count.
//! The arithmetic follows ggml's order of f32 operations step by step (no fused multiply-adds,
//! `nearest_int`'s add-a-magic-number rounding, fp16 by round-to-nearest-even), since a different
//! order changes a rounding here and there and with it a quantized value.
//!
//! The code here is the reference, block by block. Where the CPU has AVX2 or AVX-512 the K types'
//! per-group searches run 16 groups at a time, one per vector lane, each lane doing this code's
//! operations in this code's order (`ggml_lanes.rs`), and with AVX-512 Q8_0 runs hand-written
//! vector code that also checks the values are finite (`ggml_q8_x86.rs`); `TUNEX_SIMD=portable`
//! keeps the scalar code. Tests compare the bytes of both.
//!
//! Block layouts (bytes, little-endian), as `ggml-common.h` declares them:
//! - Q8_0 (32 values, 34 B): fp16 d, 32 x i8.
//! - Q5_0 (32 values, 22 B): fp16 d, u32 high bits, 16 B of low nibbles.
//! - Q5_1 (32 values, 24 B): fp16 d, fp16 m, u32 high bits, 16 B of low nibbles.
//! - Q4_K (256 values, 144 B): fp16 d, fp16 dmin, 12 B of 6-bit scales and mins, 128 B of nibbles.
//! - Q5_K (256 values, 176 B): fp16 d, fp16 dmin, 12 B scales/mins, 32 B high bits, 128 B nibbles.
//! - Q6_K (256 values, 210 B): 128 B low nibbles, 64 B high 2-bit pairs, 16 x i8 scales, fp16 d.

use half::f16;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::ggml_lanes as lanes;
#[cfg(target_arch = "x86_64")]
use super::ggml_q8_x86 as q8_x86;
use crate::error::{Error, Result};

/// Values one rayon task quantizes: 256 K-quant blocks, 2048 Q8_0 blocks (256 KB of input, so the
/// pool's per-task cost stays small next to Q8_0's few instructions a block).
const TASK_VALUES: usize = 1 << 16;

/// ggml's floor under a group's largest magnitude: below it the group is all zeros.
pub(super) const GROUP_MAX_EPS: f32 = 1e-15;

/// A GGUF tensor type tunex writes with its own packing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    Q8_0,
    Q5_0,
    Q5_1,
    Q4K,
    Q5K,
    Q6K,
}

impl GgmlType {
    pub const ALL: [GgmlType; 6] =
        [GgmlType::Q8_0, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K];

    /// Parse a type by its lowercase GGUF name (`q8_0`, `q5_0`, `q5_1`, `q4_k`, `q5_k`, `q6_k`).
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|t| t.name()).collect();
            Error::arg(format!("GGUF tensor type {name:?} is not supported; expected one of {}", names.join(", ")))
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::Q8_0 => "q8_0",
            GgmlType::Q5_0 => "q5_0",
            GgmlType::Q5_1 => "q5_1",
            GgmlType::Q4K => "q4_k",
            GgmlType::Q5K => "q5_k",
            GgmlType::Q6K => "q6_k",
        }
    }

    /// Values per block.
    pub fn block_elems(self) -> usize {
        match self {
            GgmlType::Q8_0 | GgmlType::Q5_0 | GgmlType::Q5_1 => 32,
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::Q8_0 => 34,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }

    /// Whole blocks of `x` packed into `out`, or false (and `out` unfinished) when a value is NaN
    /// or infinite.
    fn quantize_task(self, x: &[f32], out: &mut [u8]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self == GgmlType::Q8_0 && crate::simd::has_avx512() {
            // SAFETY: the CPU reports every feature `q8_0_blocks_avx512` is compiled for.
            return unsafe { q8_x86::q8_0_blocks_avx512(x, out) };
        }
        // no early exit: the whole task's check vectorizes, and a bad value is rare
        if !x.iter().fold(true, |ok, v| ok & v.is_finite()) {
            return false;
        }
        self.quantize_blocks(x, out);
        true
    }

    /// Whole blocks of `x` packed into `out`: the K types' searches run 16 groups at a time where
    /// the CPU has AVX2 or AVX-512 (`ggml_lanes`, the same bytes), the rest block by block.
    fn quantize_blocks(self, x: &[f32], out: &mut [u8]) {
        #[cfg(target_arch = "x86_64")]
        if matches!(self, GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K) && crate::simd::has_avx2() {
            if crate::simd::has_avx512() {
                // SAFETY: the CPU reports every feature `k_blocks_avx512` is compiled for.
                unsafe { lanes::k_blocks_avx512(self, x, out) };
            } else {
                // SAFETY: the CPU reports every feature `k_blocks_avx2` is compiled for.
                unsafe { lanes::k_blocks_avx2(self, x, out) };
            }
            return;
        }
        self.quantize_blocks_scalar(x, out);
    }

    /// [`Self::quantize_blocks`] one block at a time: ggml's reference code step for step.
    pub(super) fn quantize_blocks_scalar(self, x: &[f32], out: &mut [u8]) {
        for (xb, ob) in x.chunks_exact(self.block_elems()).zip(out.chunks_exact_mut(self.block_bytes())) {
            self.quantize_block(xb, ob);
        }
    }

    fn quantize_block(self, x: &[f32], out: &mut [u8]) {
        match self {
            GgmlType::Q8_0 => q8_0_block(x, out),
            GgmlType::Q5_0 => q5_0_block(x, out),
            GgmlType::Q5_1 => q5_1_block(x, out),
            GgmlType::Q4K | GgmlType::Q5K => qk_block(self, x, out),
            GgmlType::Q6K => q6_k_block(x, out),
        }
    }
}

/// Bytes the packing of `n` values in rows of `row_len` takes as `ty`, after the checks
/// [`quantize_ggml`] makes (`name` names the tensor in the error).
pub fn ggml_packed_len(n: usize, row_len: usize, ty: GgmlType, name: &str) -> Result<usize> {
    if row_len == 0 || !n.is_multiple_of(row_len) {
        return Err(Error::arg(format!(
            "tensor '{name}': {n} values are not a whole number of rows of {row_len}; pass the length of its last dimension"
        )));
    }
    let block = ty.block_elems();
    if !row_len.is_multiple_of(block) {
        return Err(Error::arg(format!(
            "tensor '{name}': rows of {row_len} values cannot be stored as {} (blocks of {block} values); \
             use a type whose block divides the row (q8_0, q5_0 and q5_1 need a multiple of 32) or f16",
            ty.name().to_uppercase()
        )));
    }
    Ok(n / block * ty.block_bytes())
}

/// Quantize `x` (rows of `row_len` f32 values, C order) as `ty` into `out`
/// ([`ggml_packed_len`] bytes). `name` names the tensor in errors.
///
/// Errors: `InvalidArgument` when the rows are not whole blocks or `out` has the wrong size;
/// `InvalidData` naming the tensor and the first element when a value is NaN or infinite.
pub fn quantize_ggml(x: &[f32], row_len: usize, ty: GgmlType, name: &str, out: &mut [u8]) -> Result<()> {
    let expected = ggml_packed_len(x.len(), row_len, ty, name)?;
    if out.len() != expected {
        return Err(Error::arg(format!(
            "tensor '{name}': the {} output has {} bytes, expected {expected}",
            ty.name(),
            out.len()
        )));
    }
    let clean = x
        .par_chunks(TASK_VALUES)
        .zip(out.par_chunks_mut(TASK_VALUES / ty.block_elems() * ty.block_bytes()))
        .map(|(x, out)| ty.quantize_task(x, out))
        .all(|ok| ok);
    if clean {
        return Ok(());
    }
    let at = x.iter().position(|v| !v.is_finite()).unwrap_or(0);
    Err(Error::data(format!(
        "tensor '{name}' holds {} at flat index {at}; GGUF quantization needs finite weights \
         (the checkpoint is corrupt or training diverged)",
        x[at]
    )))
}

/// ggml's `nearest_int`: round to nearest, ties to even, by adding 1.5 * 2^23 and reading the
/// mantissa (exact for |f| < 2^22, the range every caller stays in).
#[inline]
pub(super) fn nearest_int(f: f32) -> i32 {
    let v = f + 12_582_912.0f32;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

#[inline]
pub(super) fn fp16_bytes(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

#[inline]
fn fp16_round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// C's `roundf` (halves away from zero) of `f`, |f| < 2^22, as an integer: truncating
/// `f + copysign(0.49999997, f)` rounds every such float as `roundf` does (it is LLVM's own
/// expansion of round where SSE4.1 exists), and unlike `f32::round` it needs no libm call on the
/// x86-64 baseline, so a block's loop vectorizes.
#[inline]
fn round_away(f: f32) -> i32 {
    (f + 0.499_999_97f32.copysign(f)) as i32
}

pub(super) fn q8_0_block(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |m, v| if m > v.abs() { m } else { v.abs() });
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[..2].copy_from_slice(&fp16_bytes(d));
    for (q, &v) in out[2..].iter_mut().zip(x) {
        *q = round_away(v * id) as i8 as u8;
    }
}

/// The value of largest magnitude (the first of equals) and that magnitude.
pub(super) fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (max, amax)
}

/// Low nibbles of the two halves and the fifth bits of a 32-value Q5_0 / Q5_1 block.
pub(super) fn pack_q5(q: &[u8; 32], qh: &mut [u8], qs: &mut [u8]) {
    let mut high = 0u32;
    for j in 0..16 {
        let (a, b) = (q[j], q[j + 16]);
        qs[j] = (a & 0x0f) | ((b & 0x0f) << 4);
        high |= (((a & 0x10) >> 4) as u32) << j;
        high |= (((b & 0x10) >> 4) as u32) << (j + 16);
    }
    qh.copy_from_slice(&high.to_le_bytes());
}

fn q5_0_block(x: &[f32], out: &mut [u8]) {
    let (max, _) = signed_absmax(x);
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[..2].copy_from_slice(&fp16_bytes(d));
    let q: [u8; 32] = std::array::from_fn(|j| ((x[j] * id + 16.5) as i8).min(31) as u8);
    let (qh, qs) = out[2..].split_at_mut(4);
    pack_q5(&q, qh, qs);
}

fn q5_1_block(x: &[f32], out: &mut [u8]) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[..2].copy_from_slice(&fp16_bytes(d));
    out[2..4].copy_from_slice(&fp16_bytes(min));
    let q: [u8; 32] = std::array::from_fn(|j| ((x[j] - min) * id + 0.5) as u8);
    let (qh, qs) = out[4..].split_at_mut(4);
    pack_q5(&q, qh, qs);
}

/// ggml's `make_qkx2_quants` for a 32-value group with weights `w` (sum of squared errors):
/// levels 0..=nmax in `l`, returns (scale, minus the offset). Tries `nstep + 1` rescalings
/// `(rmin + rdelta * is + nmax) / (max - min)` and keeps the least weighted error.
#[allow(clippy::too_many_arguments)]
pub(super) fn make_qkx2_quants(
    x: &[f32],
    w: &[f32; 32],
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    l: &mut [u8],
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..n].fill(0);
        return (0.0, -min);
    }
    let nmax_f = nmax as f32;
    let mut iscale = nmax_f / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        l[i] = nearest_int(iscale * (x[i] - min)).clamp(0, nmax) as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += w[i] * (diff * diff);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax_f) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let lf = q as f32;
            sum_l += w[i] * lf;
            sum_l2 += w[i] * lf * lf;
            sum_xl += w[i] * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += w[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// The search parameters of Q4_K and Q5_K: levels 0..=nmax, and `make_qkx2_quants`'s first
/// rescaling offset and number of further steps.
#[derive(Clone, Copy)]
pub(super) struct KSearch {
    pub nmax: i32,
    pub rmin: f32,
    pub nstep: i32,
}

impl KSearch {
    pub fn of(ty: GgmlType) -> Self {
        match ty {
            GgmlType::Q5K => KSearch { nmax: 31, rmin: -0.5, nstep: 15 },
            _ => KSearch { nmax: 15, rmin: -1.0, nstep: 20 },
        }
    }
}

/// A Q4_K or Q5_K block: per 32-value group a scale and a min (qkx2 search), both stored as 6 bits
/// against the block's fp16 `d` and `dmin`; then every value requantized against the stored
/// scales ([`k_finish`]).
fn qk_block(ty: GgmlType, x: &[f32], out: &mut [u8]) {
    let p = KSearch::of(ty);
    let mut levels = [0u8; 256];
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let w: [f32; 32] = std::array::from_fn(|l| av_x + xs[l].abs());
        let (scale, min) = make_qkx2_quants(xs, &w, p.nmax, p.rmin, 0.1, p.nstep, &mut levels[32 * j..32 * j + 32]);
        scales[j] = scale;
        mins[j] = min;
    }
    k_finish(ty, x, &scales, &mins, levels, out);
}

/// The second half of a Q4_K / Q5_K block from its groups' searched `scales`, `mins` and `levels`:
/// writes d, dmin and the 12 bytes of 6-bit scales, requantizes every group whose stored scale is
/// not zero, and packs the levels.
#[inline(always)]
pub(super) fn k_finish(ty: GgmlType, x: &[f32], scales: &[f32; 8], mins: &[f32; 8], levels: [u8; 256], out: &mut [u8]) {
    let head = &mut out[..16];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for (&scale, &min) in scales.iter().zip(mins) {
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let six_bit: [(u8, u8); 8] = std::array::from_fn(|j| {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        (ls, lm)
    });
    put_scale_min_k4(&mut head[4..16], &six_bit);
    k_store(ty, x, &six_bit, max_scale / 63.0, max_min / 63.0, levels, out);
}

/// A Q4_K / Q5_K block's 12 bytes of 6-bit (scale, min) pairs, one per 32-value group, packed as
/// llama.cpp packs them (the first four whole, the high bits of the last four in their top bits).
pub(super) fn put_scale_min_k4(packed: &mut [u8], six_bit: &[(u8, u8); 8]) {
    packed[..12].fill(0);
    for (j, &(s, m)) in six_bit.iter().enumerate() {
        if j < 4 {
            packed[j] = s;
            packed[j + 4] = m;
        } else {
            packed[j + 4] = (s & 0x0f) | ((m & 0x0f) << 4);
            packed[j - 4] |= (s >> 4) << 6;
            packed[j] |= (m >> 4) << 6;
        }
    }
}

/// Group `j`'s 6-bit (scale, min) read from a Q4_K / Q5_K block's 12 packed bytes `s`, as
/// llama.cpp's `get_scale_min_k4` reads them.
pub(super) fn scale_min_k4(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// The rest of a Q4_K / Q5_K block from its packed 12 bytes of scales (in `out[4..16]`), their
/// values `six_bit` (scale, min) and the block's `d` and `dmin`: writes both as fp16, requantizes
/// every group whose stored scale is not zero against the stored values, and packs the levels.
#[inline(always)]
pub(super) fn k_store(
    ty: GgmlType,
    x: &[f32],
    six_bit: &[(u8, u8); 8],
    d: f32,
    dmin: f32,
    mut levels: [u8; 256],
    out: &mut [u8],
) {
    let nmax = KSearch::of(ty).nmax;
    let (head, rest) = out.split_at_mut(16);
    let d16 = fp16_round(d);
    let dmin16 = fp16_round(dmin);
    head[..2].copy_from_slice(&fp16_bytes(d));
    head[2..4].copy_from_slice(&fp16_bytes(dmin));
    for (j, &(sc, m)) in six_bit.iter().enumerate() {
        let d = d16 * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin16 * m as f32;
        for ii in 0..32 {
            levels[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, nmax) as u8;
        }
    }
    if ty == GgmlType::Q4K {
        q4_k_pack(&levels, rest);
    } else {
        q5_k_pack(&levels, rest);
    }
}

/// Q4_K's 128 bytes of nibbles: the low nibbles hold groups 0, 2, 4, 6, the high ones 1, 3, 5, 7.
pub(super) fn q4_k_pack(levels: &[u8; 256], qs: &mut [u8]) {
    for (c, q) in qs.chunks_exact_mut(32).enumerate() {
        let base = 64 * c;
        for l in 0..32 {
            q[l] = levels[base + l] | (levels[base + l + 32] << 4);
        }
    }
}

/// Q5_K's 32 bytes of fifth bits and 128 bytes of nibbles.
pub(super) fn q5_k_pack(levels: &[u8; 256], rest: &mut [u8]) {
    let (qh, qs) = rest.split_at_mut(32);
    qh.fill(0);
    for (c, q) in qs.chunks_exact_mut(32).enumerate() {
        let base = 64 * c;
        let (m1, m2) = (1u8 << (2 * c), 2u8 << (2 * c));
        for j in 0..32 {
            let (mut l1, mut l2) = (levels[base + j], levels[base + j + 32]);
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            q[j] = l1 | (l2 << 4);
        }
    }
}

/// ggml's `make_qx_quants` with `rmse_type` 1 and no importance weights (weights x^2), for Q6_K:
/// signed levels -nmax..nmax-1 stored as level + nmax in `l`; returns the scale.
fn make_qx_quants(x: &[f32], nmax: i32, l: &mut [u8]) -> f32 {
    make_qx_quants_by(x, nmax, l, |_, v| v * v)
}

/// ggml's `make_qx_quants` (`rmse_type` 1) with the weight of value `i` given by `weight(i, x[i])`
/// (x^2 without importance, the importance with it). Tries the scales `max / -(nmax + 0.1 is)`, is
/// in -9..=9, and keeps the least-squares scale of the one that explains most of the weighted data.
pub(super) fn make_qx_quants_by(x: &[f32], nmax: i32, l: &mut [u8], weight: impl Fn(usize, f32) -> f32) -> f32 {
    let (max, amax) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        l[..x.len()].fill(0);
        return 0.0;
    }
    let nmax_f = nmax as f32;
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for (i, &v) in x.iter().enumerate() {
            let q = level(iscale, v) as f32;
            let w = weight(i, v);
            sumlx += w * v * q;
            suml2 += w * q * q;
        }
        (sumlx, suml2)
    };
    let mut iscale = -nmax_f / max;
    for (li, &v) in l.iter_mut().zip(x) {
        *li = (level(iscale, v) + nmax) as u8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax_f + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (li, &v) in l.iter_mut().zip(x) {
                *li = (level(iscale, v) + nmax) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

fn q6_k_block(x: &[f32], out: &mut [u8]) {
    let mut levels = [0u8; 256];
    let mut scales = [0.0f32; 16];
    for ib in 0..16 {
        scales[ib] = make_qx_quants(&x[16 * ib..16 * ib + 16], 32, &mut levels[16 * ib..16 * ib + 16]);
    }
    q6_k_finish(x, &scales, levels, out);
}

/// The second half of a Q6_K block from its 16-value groups' searched `scales` and `levels`
/// (plus 32): the 8-bit scales against the block's fp16 `d`, every group whose stored scale is not
/// zero requantized, and the packing.
#[inline(always)]
pub(super) fn q6_k_finish(x: &[f32], scales: &[f32; 16], mut levels: [u8; 256], out: &mut [u8]) {
    let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
    for &scale in scales {
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        out.fill(0);
        return;
    }
    let iscale = -128.0f32 / max_scale;
    let d_bytes = fp16_bytes(1.0 / iscale);
    let d16 = f16::from_le_bytes(d_bytes).to_f32();
    let mut sc = [0i8; 16];
    for ib in 0..16 {
        sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
    }
    for j in 0..16 {
        let d = d16 * sc[j] as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            levels[16 * j + ii] = (nearest_int(x[16 * j + ii] / d).clamp(-32, 31) + 32) as u8;
        }
    }
    q6_k_pack(&levels, out);
    let tail = &mut out[192..];
    for (t, s) in tail[..16].iter_mut().zip(sc) {
        *t = s as u8;
    }
    tail[16..18].copy_from_slice(&d_bytes);
}

/// Q6_K's 128 bytes of low nibbles and 64 bytes of high bit pairs (`out[..192]`) from its levels
/// (plus 32).
pub(super) fn q6_k_pack(levels: &[u8; 256], out: &mut [u8]) {
    let (ql, rest) = out.split_at_mut(128);
    let qh = &mut rest[..64];
    for half in 0..2 {
        let (j, ql, qh) = (128 * half, &mut ql[64 * half..64 * half + 64], &mut qh[32 * half..32 * half + 32]);
        for l in 0..32 {
            let (a, b, c, e) = (levels[j + l], levels[j + l + 32], levels[j + l + 64], levels[j + l + 96]);
            ql[l] = (a & 0x0f) | ((c & 0x0f) << 4);
            ql[l + 32] = (b & 0x0f) | ((e & 0x0f) << 4);
            qh[l] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6);
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Weight-like test values in about -0.1..0.1 from a seeded LCG.
    pub(in crate::quant) fn sample(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
            })
            .collect()
    }

    #[test]
    fn round_away_is_roundf() {
        // every half-integer up to 2^22 and its neighbours, and a stride through all floats below 2^22
        for k in -(1i32 << 21)..(1i32 << 21) {
            let half = k as f32 + 0.5;
            for f in [half, f32::from_bits(half.to_bits() + 1), f32::from_bits(half.to_bits() - 1)] {
                assert_eq!(round_away(f), f.round() as i32, "{f:e}");
            }
        }
        for bits in (0..0x4a80_0000u32).step_by(997) {
            for f in [f32::from_bits(bits), -f32::from_bits(bits)] {
                assert_eq!(round_away(f), f.round() as i32, "{f:e}");
            }
        }
    }

    #[test]
    fn nearest_int_rounds_ties_to_even() {
        assert_eq!([0.5, 1.5, 2.5, -0.5, -1.5, 3.4, -3.6].map(nearest_int), [0, 2, 2, 0, -2, 3, -4]);
    }

    #[test]
    fn bad_shapes_get_one_line_errors_naming_the_tensor() {
        let x = sample(512, 1);
        let mut out = vec![0u8; 10];
        let err = quantize_ggml(&x, 500, GgmlType::Q4K, "blk.0.ffn_up.weight", &mut out).unwrap_err();
        assert!(err.to_string().contains("not a whole number of rows"), "{err}");
        let err = quantize_ggml(&x, 64, GgmlType::Q6K, "blk.0.attn_q.weight", &mut out).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("blk.0.attn_q.weight") && msg.contains("Q6_K") && !msg.contains('\n'), "{msg}");
        let err = quantize_ggml(&x, 256, GgmlType::Q4K, "w", &mut out).unwrap_err();
        assert!(err.to_string().contains("expected 288"), "{err}");
        assert!(GgmlType::parse("q3_k").is_err());
    }

    #[test]
    fn non_finite_values_are_refused_with_their_index() {
        let mut x = sample(256, 2);
        x[77] = f32::NAN;
        let mut out = vec![0u8; 144];
        let err = quantize_ggml(&x, 256, GgmlType::Q4K, "w", &mut out).unwrap_err();
        assert!(matches!(err, Error::InvalidData(_)) && err.to_string().contains("index 77"), "{err}");
    }

    #[test]
    fn packings_round_trip_within_their_step() {
        // decode with the layouts above and check every value lies within one quantization step
        let x = sample(1024, 3);
        for ty in GgmlType::ALL {
            let mut out = vec![0u8; ggml_packed_len(x.len(), 1024, ty, "w").unwrap()];
            quantize_ggml(&x, 1024, ty, "w", &mut out).unwrap();
            let back = decode(ty, &out);
            let worst = x.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            let bound = match ty {
                GgmlType::Q8_0 => 0.0005,
                GgmlType::Q6K => 0.002,
                // Q5_0 maps the largest magnitude to -16 and clamps its opposite at +15: one step
                GgmlType::Q5_0 => 0.1 / 16.0 * 1.1,
                GgmlType::Q5_1 | GgmlType::Q5K => 0.005,
                GgmlType::Q4K => 0.01,
            };
            assert!(worst < bound, "{ty:?}: worst error {worst}");
        }
    }

    #[test]
    fn zero_blocks_stay_zero() {
        let x = vec![0.0f32; 256];
        for ty in GgmlType::ALL {
            let mut out = vec![0u8; ggml_packed_len(256, 256, ty, "w").unwrap()];
            quantize_ggml(&x, 256, ty, "w", &mut out).unwrap();
            assert!(decode(ty, &out).iter().all(|&v| v == 0.0), "{ty:?}");
        }
    }

    fn h(b: &[u8]) -> f32 {
        f16::from_le_bytes([b[0], b[1]]).to_f32()
    }

    /// A plain decoder of the layouts (llama.cpp's dequantize_row_* read the same bytes; the Python
    /// tests compare against gguf's and llama.cpp's own dequantizers).
    pub(in crate::quant) fn decode(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
        let mut y = Vec::new();
        for b in bytes.chunks_exact(ty.block_bytes()) {
            match ty {
                GgmlType::Q8_0 => y.extend(b[2..].iter().map(|&q| h(b) * q as i8 as f32)),
                GgmlType::Q5_0 | GgmlType::Q5_1 => {
                    let off = if ty == GgmlType::Q5_0 { 2 } else { 4 };
                    let qh = u32::from_le_bytes(b[off..off + 4].try_into().unwrap());
                    let qs = &b[off + 4..];
                    for j in 0..32 {
                        let nib = if j < 16 { qs[j] & 15 } else { qs[j - 16] >> 4 };
                        let q = (nib | ((((qh >> j) & 1) as u8) << 4)) as f32;
                        y.push(if ty == GgmlType::Q5_0 { h(b) * (q - 16.0) } else { h(b) * q + h(&b[2..]) });
                    }
                }
                GgmlType::Q4K | GgmlType::Q5K => {
                    let (d, dmin, s) = (h(b), h(&b[2..]), &b[4..16]);
                    let (qh, qs) = if ty == GgmlType::Q5K { (&b[16..48], &b[48..]) } else { (&b[..0], &b[16..]) };
                    for j in 0..8 {
                        let (sc, m) = scale_min_k4(s, j);
                        for l in 0..32 {
                            let byte = qs[32 * (j / 2) + l];
                            let mut q = if j % 2 == 0 { byte & 15 } else { byte >> 4 };
                            if ty == GgmlType::Q5K {
                                q |= ((qh[l] >> j) & 1) << 4;
                            }
                            y.push(d * sc as f32 * q as f32 - dmin * m as f32);
                        }
                    }
                }
                GgmlType::Q6K => {
                    let (ql, qh, sc, d) = (&b[..128], &b[128..192], &b[192..208], h(&b[208..]));
                    let mut block = [0.0f32; 256];
                    for half in 0..2 {
                        let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
                        for l in 0..32 {
                            let q = [
                                (ql[l] & 15) | ((qh[l] & 3) << 4),
                                (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4),
                                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
                            ];
                            for (k, &qk) in q.iter().enumerate() {
                                let i = 128 * half + 32 * k + l;
                                block[i] = d * sc[i / 16] as i8 as f32 * (qk as i32 - 32) as f32;
                            }
                        }
                    }
                    y.extend(block);
                }
            }
        }
        y
    }
}
