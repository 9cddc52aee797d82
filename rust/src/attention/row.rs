//! Row helpers of the softmax and its gradient, on 16 lanes with one fixed pairing of the lane
//! sums: max, exponentials and their sum, dot product, and Gemma 2's soft-cap (tanh).

use super::LANES;
use crate::lora::tree;
use crate::swiglu::exp_f32;

/// The largest value of a row (a NaN never wins a comparison: its exponential makes the row NaN).
#[inline(always)]
pub(super) fn row_max(row: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for l in 0..LANES {
            m[l] = if chunk[l] > m[l] { chunk[l] } else { m[l] };
        }
    }
    // the rest as one padded chunk: every lane index stays a constant, so `m` stays in a register
    let mut rest = [f32::NEG_INFINITY; LANES];
    rest[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    for l in 0..LANES {
        m[l] = if rest[l] > m[l] { rest[l] } else { m[l] };
    }
    m.into_iter().fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a })
}

/// One chunk of [`exp_row`]: lanes from `j0` on, kept below `n`.
#[inline(always)]
fn exp_chunk(chunk: &mut [f32; LANES], j0: usize, n: usize, scale: f32, shift: f32, sum: &mut [f32; LANES]) {
    for l in 0..LANES {
        let e = exp_f32(chunk[l].mul_add(scale, -shift));
        chunk[l] = if j0 + l < n { e } else { 0.0 };
        sum[l] += chunk[l];
    }
}

/// `row[j] = exp(row[j] * scale - shift)` for j < n, zero for n <= j < row.len(); the sum of the
/// exponentials. Whole 16-lane chunks: lanes past n are computed and then cleared, so the row must
/// hold finite values up to n rounded up to 16 (or end there).
#[inline(always)]
pub(super) fn exp_row(row: &mut [f32], n: usize, scale: f32, shift: f32) -> f32 {
    let mut sum = [0f32; LANES];
    let live = n.div_ceil(LANES) * LANES;
    let (head, dead) = row.split_at_mut(live.min(row.len()));
    let mut chunks = head.chunks_exact_mut(LANES);
    let mut j0 = 0;
    for chunk in &mut chunks {
        exp_chunk(chunk.try_into().unwrap(), j0, n, scale, shift, &mut sum);
        j0 += LANES;
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let mut tmp = [0f32; LANES];
        tmp[..rest.len()].copy_from_slice(rest);
        exp_chunk(&mut tmp, j0, n, scale, shift, &mut sum);
        rest.copy_from_slice(&tmp[..rest.len()]);
    }
    dead.fill(0.0);
    tree(sum)
}

#[inline(always)]
pub(super) fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut s = [0f32; LANES];
    for (xc, yc) in x.chunks_exact(LANES).zip(y.chunks_exact(LANES)) {
        for l in 0..LANES {
            s[l] = xc[l].mul_add(yc[l], s[l]);
        }
    }
    tree(s)
}

/// tanh for float32 in operations that vectorize: `(1 - e) / (1 + e)` with `e = exp(-2|x|)`, and
/// below |x| = 1/4 (where `1 - e` would cancel) its Taylor series to x^9 (truncated there by under 1e-8).
#[inline(always)]
pub(super) fn tanh_f32(x: f32) -> f32 {
    let a = x.abs();
    let e = exp_f32(-2.0 * a);
    let far = (1.0 - e) / (1.0 + e);
    let x2 = a * a;
    let near = a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))));
    (if a < 0.25 { near } else { far }).copysign(x)
}

/// `row[j] = cap * tanh(row[j] * scale / cap)` (the soft-capped logits of raw dot products); with
/// `grad`, also `grad[j] = 1 - tanh(..)^2`, the logits' derivative by the scaled scores.
#[inline(always)]
pub(super) fn cap_row(row: &mut [f32], scale: f32, cap: f32, grad: Option<&mut [f32]>) {
    let inner = scale / cap;
    match grad {
        None => {
            for x in row.iter_mut() {
                *x = cap * tanh_f32(*x * inner);
            }
        }
        Some(g) => {
            for (x, g) in row.iter_mut().zip(g.iter_mut()) {
                let t = tanh_f32(*x * inner);
                *x = cap * t;
                *g = 1.0 - t * t;
            }
        }
    }
}
