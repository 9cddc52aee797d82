//! RMSNorm forward (with the per-row `rstd` that backward needs) and backward for float32 CPU
//! training, one pass over each row each way. torch spends six elementwise passes on the forward
//! and eight on the backward, each a full read and write of a (tokens, hidden) tensor.
//!
//! Forward: `rstd = 1 / sqrt(mean(x^2) + eps)`, `y = x * rstd * w`.
//! Backward, with `x_hat = x * rstd`: `dx = rstd * (w*dy - x_hat * mean(x_hat * w*dy))`,
//! `dw = sum over rows of dy * x_hat`.

use crate::error::{Error, Result};
use crate::omp::{self, Shared};
use crate::simd::multiversion;

const LANES: usize = 16;

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let main = a.len() - a.len() % LANES;
    for (ca, cb) in a[..main].chunks_exact(LANES).zip(b[..main].chunks_exact(LANES)) {
        for j in 0..LANES {
            acc[j] += ca[j] * cb[j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in a[main..].iter().zip(&b[main..]) {
        s += x * y;
    }
    s
}

multiversion! {
    fn forward_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32], rstd: &mut [f32]) {
        let n = weight.len();
        for ((row, dst), r) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)).zip(rstd.iter_mut()) {
            let inv = 1.0 / (dot(row, row) / n as f32 + eps).sqrt();
            *r = inv;
            for ((o, v), w) in dst.iter_mut().zip(row).zip(weight) {
                *o = v * inv * w;
            }
        }
    }
}

multiversion! {
    fn backward_rows(dy: &[f32], x: &[f32], weight: &[f32], rstd: &[f32], dx: &mut [f32], dw: Option<&mut [f32]>) {
        let n = weight.len();
        let mut dw = dw;
        let mut wdy = vec![0f32; n];
        for (((g, row), d), &r) in dy.chunks_exact(n).zip(x.chunks_exact(n)).zip(dx.chunks_exact_mut(n)).zip(rstd) {
            for ((o, &gv), &w) in wdy.iter_mut().zip(g).zip(weight) {
                *o = gv * w;
            }
            // mean(x_hat * w*dy) = rstd * mean(x * w*dy)
            let mean = r * dot(row, &wdy) / n as f32;
            for ((o, &v), &wg) in d.iter_mut().zip(row).zip(&wdy) {
                *o = r * (wg - v * r * mean);
            }
            if let Some(dw) = dw.as_deref_mut() {
                for ((acc, &gv), &v) in dw.iter_mut().zip(g).zip(row) {
                    *acc += gv * v * r;
                }
            }
        }
    }
}

fn rows(what: &str, n: usize, lens: &[(&str, usize)], rstd: usize) -> Result<()> {
    let count = lens[0].1 / n.max(1);
    if n == 0 || lens.iter().any(|(_, len)| *len != count * n) || rstd != count {
        return Err(Error::InvalidArgument(format!(
            "rms_norm {what}: {lens:?} and rstd of {rstd} do not hold the same whole rows of the weight's {n} values"
        )));
    }
    Ok(())
}

/// `out = x * rstd * weight` row by row, `rstd` (one per row) written for the backward.
pub fn forward_f32(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32], rstd: &mut [f32]) -> Result<()> {
    rows("forward", weight.len(), &[("x", x.len()), ("out", out.len())], rstd.len())?;
    let n = weight.len();
    let (out, rstd_out) = (Shared::new(out), Shared::new(rstd));
    by_rows(x.len() / n, n, &|a, b| {
        // SAFETY: rows a..b of out and rstd are this part's alone.
        let (o, r) = unsafe { (out.range(a * n, b * n), rstd_out.range(a, b)) };
        forward_rows(&x[a * n..b * n], weight, eps, o, r)
    });
    Ok(())
}

/// `task(a, b)` over row ranges on torch's OpenMP team (rows are independent, so the bytes do not
/// depend on the split).
fn by_rows(rows: usize, n: usize, task: &(dyn Fn(usize, usize) + Sync)) {
    assert!(omp::by_rows(rows, n, task), "a part of an RMSNorm kernel panicked");
}

/// `dx` of RMSNorm given `dy`, the forward's `x` and `rstd`; `dw` (zeroed by the caller) gets the
/// weight's gradient added when given.
pub fn backward_f32(
    dy: &[f32],
    x: &[f32],
    weight: &[f32],
    rstd: &[f32],
    dx: &mut [f32],
    dw: Option<&mut [f32]>,
) -> Result<()> {
    let n = weight.len();
    rows("backward", n, &[("dy", dy.len()), ("x", x.len()), ("dx", dx.len())], rstd.len())?;
    if let Some(dw) = &dw {
        if dw.len() != n {
            return Err(Error::InvalidArgument(format!("rms_norm backward: dw has {} values, expected {n}", dw.len())));
        }
    }
    if dw.is_some() {
        // the weight's gradient sums over all rows: one pass keeps that sum's order fixed
        backward_rows(dy, x, weight, rstd, dx, dw);
        return Ok(());
    }
    let out = Shared::new(dx);
    by_rows(rstd.len(), n, &|a, b| {
        // SAFETY: rows a..b of dx are this part's alone.
        let d = unsafe { out.range(a * n, b * n) };
        backward_rows(&dy[a * n..b * n], &x[a * n..b * n], weight, &rstd[a..b], d, None)
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_and_backward_match_a_float64_reference() {
        let (rows_n, n) = (5usize, 37usize);
        let x: Vec<f32> = (0..rows_n * n).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0).collect();
        let w: Vec<f32> = (0..n).map(|i| 0.5 + i as f32 / n as f32).collect();
        let dy: Vec<f32> = (0..rows_n * n).map(|i| ((i * 104729) % 97) as f32 / 48.0 - 1.0).collect();
        let (mut y, mut rstd) = (vec![0f32; rows_n * n], vec![0f32; rows_n]);
        forward_f32(&x, &w, 1e-5, &mut y, &mut rstd).unwrap();
        let (mut dx, mut dw) = (vec![0f32; rows_n * n], vec![0f32; n]);
        backward_f32(&dy, &x, &w, &rstd, &mut dx, Some(&mut dw)).unwrap();
        let mut dw_ref = vec![0f64; n];
        for r in 0..rows_n {
            let row: Vec<f64> = x[r * n..(r + 1) * n].iter().map(|v| *v as f64).collect();
            let g: Vec<f64> = dy[r * n..(r + 1) * n].iter().map(|v| *v as f64).collect();
            let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / n as f64 + 1e-5).sqrt();
            assert!((rstd[r] as f64 - inv).abs() < 1e-5 * inv);
            let xh: Vec<f64> = row.iter().map(|v| v * inv).collect();
            let wdy: Vec<f64> = g.iter().zip(&w).map(|(a, b)| a * *b as f64).collect();
            let mean = xh.iter().zip(&wdy).map(|(a, b)| a * b).sum::<f64>() / n as f64;
            for i in 0..n {
                assert!((y[r * n + i] as f64 - xh[i] * w[i] as f64).abs() < 1e-5);
                assert!((dx[r * n + i] as f64 - inv * (wdy[i] - xh[i] * mean)).abs() < 1e-4);
                dw_ref[i] += g[i] * xh[i];
            }
        }
        for i in 0..n {
            assert!((dw[i] as f64 - dw_ref[i]).abs() < 1e-4);
        }
    }

    #[test]
    fn mismatched_lengths_are_errors() {
        let w = vec![1.0f32; 4];
        let (mut y, mut rstd) = (vec![0f32; 8], vec![0f32; 2]);
        assert!(forward_f32(&[0.0; 8], &w, 1e-5, &mut y, &mut rstd[..1]).is_err());
        assert!(forward_f32(&[0.0; 7], &w, 1e-5, &mut y[..7], &mut rstd[..1]).is_err());
        assert!(forward_f32(&[0.0; 8], &[], 1e-5, &mut y, &mut rstd).is_err());
        let mut dx = vec![0f32; 8];
        assert!(backward_f32(&[0.0; 8], &[0.0; 8], &w, &rstd, &mut dx, Some(&mut [0.0; 3])).is_err());
        assert!(backward_f32(&[0.0; 4], &[0.0; 8], &w, &rstd, &mut dx, None).is_err());
    }
}
