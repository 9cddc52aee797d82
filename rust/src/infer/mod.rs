//! Inference kernels for decoding on the CPU: one token at a time, so every linear layer is a
//! matrix-vector product that reads each weight once. torch runs those on one core at about half
//! the memory bandwidth; these split the rows across the decode pool ([`pool`]) and stream them
//! with wide accumulators, so the cores together approach the bandwidth.

use crate::error::{Error, Result};
use crate::simd::multiversion;

pub mod pool;

/// Lanes summed independently: 4 AVX2 registers, so the adds do not wait on each other.
const LANES: usize = 32;

multiversion! {
    /// `y[r] = dot(w[r, :], x) (+ bias[r])` for the rows in `w` (row-major, `x.len()` columns).
    fn rows_dot(w: &[f32], x: &[f32], bias: Option<&[f32]>, y: &mut [f32]) {
        let cols = x.len();
        let main = cols - cols % LANES;
        for (r, out) in y.iter_mut().enumerate() {
            let row = &w[r * cols..(r + 1) * cols];
            let mut acc = [0f32; LANES];
            for (chunk, xs) in row[..main].chunks_exact(LANES).zip(x[..main].chunks_exact(LANES)) {
                for j in 0..LANES {
                    acc[j] += chunk[j] * xs[j];
                }
            }
            // pairwise reduction of the lanes, then the tail
            let mut width = LANES;
            while width > 1 {
                width /= 2;
                for j in 0..width {
                    acc[j] += acc[j + width];
                }
            }
            let mut s = acc[0];
            for (a, b) in row[main..].iter().zip(&x[main..]) {
                s += a * b;
            }
            *out = s + bias.map_or(0.0, |b| b[r]);
        }
    }
}

/// One product of a batch: a row-major weight (`y.len()` rows of `x.len()` columns), its optional
/// bias and its output.
pub struct Gemv<'a> {
    pub w: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub y: &'a mut [f32],
}

/// Bytes of weights below which a product is not worth splitting across threads.
const SPLIT_BYTES: usize = 64 * 1024;

/// `y = w @ x (+ bias)` for every product in `batch`, all of the same input `x`: the rows of all
/// of them are split into one set of parts, so q/k/v (or gate/up) cost one fork-join, not three.
pub fn gemv_f32(x: &[f32], batch: &mut [Gemv<'_>]) -> Result<()> {
    let cols = x.len();
    for (i, g) in batch.iter().enumerate() {
        let rows = g.y.len();
        // checked: a wrapped product must not match the weight's length
        if rows.checked_mul(cols) != Some(g.w.len()) {
            let want = rows.checked_mul(cols).map_or("more than fit in a usize".to_string(), |n| n.to_string());
            return Err(Error::InvalidArgument(format!(
                "gemv: weight {i} has {} elements, expected {rows} x {cols} = {want} (rows of its output x length of the input)",
                g.w.len(),
            )));
        }
        if let Some(b) = g.bias {
            if b.len() != rows {
                return Err(Error::InvalidArgument(format!(
                    "gemv: bias {i} has {} elements, expected {rows}",
                    b.len()
                )));
            }
        }
    }
    let rows: usize = batch.iter().map(|g| g.y.len()).sum();
    if cols == 0 {
        for g in batch.iter_mut() {
            g.y.iter_mut().enumerate().for_each(|(r, o)| *o = g.bias.map_or(0.0, |b| b[r]));
        }
        return Ok(());
    }
    let threads = pool::threads();
    // saturating: products may share one weight, so this total need not fit in memory (or a usize)
    let parts = if rows.saturating_mul(cols).saturating_mul(4) < SPLIT_BYTES || threads == 1 {
        1
    } else {
        (threads * 4).min(rows)
    };
    if parts == 1 {
        for g in batch.iter_mut() {
            rows_dot(g.w, x, g.bias, g.y);
        }
        return Ok(());
    }
    // Part p covers global rows [p*rows/parts, (p+1)*rows/parts); each product's output rows are
    // handed out as raw pointers because parts write disjoint ranges of them.
    let outs: Vec<OutRows<'_>> = {
        let mut first = 0;
        batch
            .iter_mut()
            .map(|g| {
                let n = g.y.len();
                let item = (first, n, g.w, g.bias, SendPtr(g.y.as_mut_ptr()));
                first += n;
                item
            })
            .collect()
    };
    let ok = pool::run(parts, &|p| {
        let (lo, hi) = (p * rows / parts, (p + 1) * rows / parts);
        for &(first, n, w, bias, ref y) in &outs {
            let (a, b) = (lo.max(first), hi.min(first + n));
            if a >= b {
                continue;
            }
            let (a, b) = (a - first, b - first);
            // SAFETY: parts cover disjoint row ranges, each within this output's `n` rows, and
            // the outputs outlive `pool::run`, which returns only after every part finished.
            let out = unsafe { std::slice::from_raw_parts_mut(y.0.add(a), b - a) };
            rows_dot(&w[a * cols..b * cols], x, bias.map(|v| &v[a..b]), out);
        }
    });
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidData("gemv: a worker thread panicked (a tunex bug: please report it)".into()))
    }
}

/// One product of a split batch: its first row among all products' rows, its row count, its
/// weight, its bias and its output.
type OutRows<'a> = (usize, usize, &'a [f32], Option<&'a [f32]>, SendPtr);

struct SendPtr(*mut f32);
// SAFETY: see the use in `gemv_f32`: disjoint writes, joined before the borrow ends.
unsafe impl Sync for SendPtr {}

multiversion! {
    /// RMSNorm of each `n`-wide row of `x` into `out`: `x / sqrt(mean(x^2) + eps) * weight`.
    fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        let n = weight.len();
        for (row, dst) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            let mut acc = [0f32; LANES];
            let main = n - n % LANES;
            for chunk in row[..main].chunks_exact(LANES) {
                for j in 0..LANES {
                    acc[j] += chunk[j] * chunk[j];
                }
            }
            let mut s: f32 = acc.iter().sum();
            for v in &row[main..] {
                s += v * v;
            }
            let rstd = 1.0 / (s / n as f32 + eps).sqrt();
            for ((o, v), w) in dst.iter_mut().zip(row).zip(weight) {
                *o = v * rstd * w;
            }
        }
    }
}

/// RMSNorm over rows of `weight.len()` values (`x` and `out` hold whole rows).
pub fn rms_norm_f32(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
    let n = weight.len();
    if n == 0 || !x.len().is_multiple_of(n) || out.len() != x.len() {
        return Err(Error::InvalidArgument(format!(
            "rms_norm: input of {} and output of {} values do not hold whole rows of the weight's {n}",
            x.len(),
            out.len()
        )));
    }
    rms_norm_rows(x, weight, eps, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(w: &[f32], x: &[f32], bias: Option<&[f32]>, rows: usize) -> Vec<f64> {
        (0..rows)
            .map(|r| {
                let dot: f64 =
                    w[r * x.len()..(r + 1) * x.len()].iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum();
                dot + bias.map_or(0.0, |b| b[r] as f64)
            })
            .collect()
    }

    #[test]
    fn matches_a_float64_reference_for_awkward_shapes() {
        for &(rows, cols) in &[(1, 1), (3, 31), (7, 32), (65, 33), (576, 576), (130, 1537), (5, 0), (4099, 513)] {
            let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
            let x: Vec<f32> = (0..cols).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
            let b: Vec<f32> = (0..rows).map(|i| i as f32 / 3.0).collect();
            for bias in [None, Some(b.as_slice())] {
                let mut y = vec![f32::NAN; rows];
                let mut y2 = vec![f32::NAN; 3];
                let w2 = vec![0.5f32; 3 * cols];
                let mut batch = [Gemv { w: &w, bias, y: &mut y }, Gemv { w: &w2, bias: None, y: &mut y2 }];
                gemv_f32(&x, &mut batch).unwrap();
                let sum: f32 = x.iter().sum();
                assert!(y2.iter().all(|v| (v - 0.5 * sum).abs() <= 1e-3 * (1.0 + sum.abs())));
                for (got, want) in y.iter().zip(reference(&w, &x, bias, rows)) {
                    assert!((*got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()), "{rows}x{cols}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn rms_norm_matches_its_formula() {
        let x: Vec<f32> = (0..2 * 45).map(|i| (i as f32 - 40.0) / 9.0).collect();
        let w: Vec<f32> = (0..45).map(|i| 0.5 + i as f32 / 45.0).collect();
        let mut out = vec![0.0; x.len()];
        rms_norm_f32(&x, &w, 1e-5, &mut out).unwrap();
        for r in 0..2 {
            let row = &x[r * 45..(r + 1) * 45];
            let ms: f64 = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / 45.0;
            for j in 0..45 {
                let want = row[j] as f64 / (ms + 1e-5).sqrt() * w[j] as f64;
                assert!((out[r * 45 + j] as f64 - want).abs() < 1e-5 * (1.0 + want.abs()));
            }
        }
        assert!(rms_norm_f32(&x[..44], &w, 1e-5, &mut out[..44]).is_err());
    }

    #[test]
    fn wrong_shapes_are_errors_not_panics() {
        let mut y = vec![0.0; 3];
        assert!(gemv_f32(&[0.0; 2], &mut [Gemv { w: &[0.0; 5], bias: None, y: &mut y }]).is_err());
        assert!(gemv_f32(&[0.0; 2], &mut [Gemv { w: &[0.0; 6], bias: Some(&[0.0; 2]), y: &mut y }]).is_err());
    }
}
