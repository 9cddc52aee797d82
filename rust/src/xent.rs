//! Cross-entropy over one chunk of float32 logits: per row the log-sum-exp, the label's logit and,
//! when asked, the gradient `(softmax - onehot) * weight`, written over the logits or into a
//! buffer of its own.
//!
//! torch spends five passes over the chunk on this (max, subtract, exp, sum, scale), each a full
//! read (and three a write) of tens of MB. Here a row (one vocabulary's worth, ~200 KB) is read
//! from memory once for its maximum and then stays in the core's L2 cache for the exp-and-sum
//! pass and the scaling pass. `exp` is the vectorizable polynomial of the SwiGLU kernels.

use crate::error::{Error, Result};
use crate::omp::{self, Shared};
use crate::simd::multiversion512;
use crate::swiglu::exp_f32;

const LANES: usize = 16;

multiversion512! {
    fn row_max(row: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let main = row.len() - row.len() % LANES;
        for chunk in row[..main].chunks_exact(LANES) {
            for j in 0..LANES {
                acc[j] = if chunk[j] > acc[j] { chunk[j] } else { acc[j] };
            }
        }
        let mut m = row[main..].iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
        for &a in &acc {
            m = if a > m { a } else { m };
        }
        m
    }
}

multiversion512! {
    /// Sum of exp(row - top).
    fn exp_total(row: &[f32], top: f32) -> f32 {
        let mut acc = [0f32; LANES];
        let main = row.len() - row.len() % LANES;
        for chunk in row[..main].chunks_exact(LANES) {
            for j in 0..LANES {
                acc[j] += exp_f32(chunk[j] - top);
            }
        }
        let mut s: f32 = acc.iter().sum();
        for v in &row[main..] {
            s += exp_f32(*v - top);
        }
        s
    }
}

multiversion512! {
    /// Sum of exp(row - top); with `write`, the row becomes exp(row - top).
    fn exp_sum(row: &mut [f32], top: f32, write: bool) -> f32 {
        if !write {
            return exp_total(row, top);
        }
        let mut acc = [0f32; LANES];
        let main = row.len() - row.len() % LANES;
        for chunk in row[..main].chunks_exact_mut(LANES) {
            for j in 0..LANES {
                let e = exp_f32(chunk[j] - top);
                chunk[j] = e;
                acc[j] += e;
            }
        }
        let mut s: f32 = acc.iter().sum();
        for v in &mut row[main..] {
            let e = exp_f32(*v - top);
            *v = e;
            s += e;
        }
        s
    }
}

multiversion512! {
    /// [`exp_sum`] with `write`, writing exp(src - top) into `dst` instead of over `src`: the same
    /// operations in the same order, so the same bytes.
    fn exp_sum_to(src: &[f32], top: f32, dst: &mut [f32]) -> f32 {
        let mut acc = [0f32; LANES];
        let main = src.len() - src.len() % LANES;
        for (chunk, out) in src[..main].chunks_exact(LANES).zip(dst[..main].chunks_exact_mut(LANES)) {
            for j in 0..LANES {
                let e = exp_f32(chunk[j] - top);
                out[j] = e;
                acc[j] += e;
            }
        }
        let mut s: f32 = acc.iter().sum();
        for (v, o) in src[main..].iter().zip(&mut dst[main..]) {
            let e = exp_f32(*v - top);
            *o = e;
            s += e;
        }
        s
    }
}

multiversion512! {
    fn scale(row: &mut [f32], by: f32) {
        for v in row {
            *v *= by;
        }
    }
}

/// For each of the `rows` rows of `logits` (row-major, `vocab` wide): `lse[r]` = log-sum-exp and
/// `picked[r]` = the logit at `labels[r]`. With `grad`, row r is overwritten with
/// `(softmax(row) - onehot(labels[r])) * weight[r]`; rows of weight 0 become zeros.
/// A label outside `0..vocab` is an error (nothing is written then).
pub fn forward_backward(
    logits: &mut [f32],
    vocab: usize,
    labels: &[i64],
    weight: &[f32],
    grad: bool,
    lse: &mut [f32],
    picked: &mut [f32],
) -> Result<()> {
    run(Rows::InPlace(logits), vocab, labels, weight, grad, lse, picked)
}

/// [`forward_backward`] with the gradient written into `grad_out` (rows x vocab) instead of over
/// the logits, which stay as they are: the same bytes. The loss gathers the gradients of several
/// logit chunks in one buffer this way, for one product with more rows.
pub fn forward_backward_to(
    logits: &[f32],
    vocab: usize,
    labels: &[i64],
    weight: &[f32],
    grad_out: &mut [f32],
    lse: &mut [f32],
    picked: &mut [f32],
) -> Result<()> {
    if grad_out.len() != logits.len() {
        return Err(Error::InvalidArgument(format!(
            "cross-entropy: grad_out holds {} values; expected as many as the logits ({})",
            grad_out.len(),
            logits.len()
        )));
    }
    run(Rows::To(logits, grad_out), vocab, labels, weight, true, lse, picked)
}

/// Where the gradient rows go.
enum Rows<'a> {
    InPlace(&'a mut [f32]),
    To(&'a [f32], &'a mut [f32]),
}

fn run(
    rows_of: Rows<'_>,
    vocab: usize,
    labels: &[i64],
    weight: &[f32],
    grad: bool,
    lse: &mut [f32],
    picked: &mut [f32],
) -> Result<()> {
    let rows = labels.len();
    let n_logits = match &rows_of {
        Rows::InPlace(l) => l.len(),
        Rows::To(l, _) => l.len(),
    };
    crate::error::product("cross-entropy: labels x vocab (the logits' size)", &[rows, vocab])?;
    if vocab == 0 || rows * vocab != n_logits || weight.len() != rows || lse.len() != rows || picked.len() != rows {
        return Err(Error::InvalidArgument(format!(
            "cross-entropy: {} logits, {} labels, {} weights, {} lse and {} picked slots for vocab {vocab}; \
             expected rows x vocab logits and one of each per row",
            n_logits,
            rows,
            weight.len(),
            lse.len(),
            picked.len()
        )));
    }
    if let Some((r, &bad)) = labels.iter().enumerate().find(|(_, &l)| l < 0 || l as u64 >= vocab as u64) {
        return Err(Error::InvalidArgument(format!(
            "cross-entropy: label {bad} at row {r} is outside the vocabulary 0..{vocab}; \
             mask ignored positions with -100 before the loss"
        )));
    }
    let (src, out) = match rows_of {
        Rows::InPlace(l) => (None, Shared::new(l)),
        Rows::To(l, g) => (Some(l), Shared::new(g)),
    };
    let (lse_out, picked_out) = (Shared::new(lse), Shared::new(picked));
    let ok = omp::run(rows, &|r| {
        // SAFETY: part r alone touches row r of the output and slot r of lse and picked.
        let row = unsafe { out.range(r * vocab, (r + 1) * vocab) };
        let label = labels[r] as usize;
        let write = grad && weight[r] != 0.0;
        let (top, at_label, sum) = match src {
            None => {
                let (at_label, top) = (row[label], row_max(row));
                (top, at_label, exp_sum(row, top, write))
            }
            Some(l) => {
                let src = &l[r * vocab..(r + 1) * vocab];
                let top = row_max(src);
                (top, src[label], if write { exp_sum_to(src, top, row) } else { exp_total(src, top) })
            }
        };
        // SAFETY: slot r of lse and picked belongs to part r alone.
        let (lse_r, picked_r) = unsafe { (lse_out.range(r, r + 1), picked_out.range(r, r + 1)) };
        lse_r[0] = top + sum.ln();
        picked_r[0] = at_label;
        if write {
            scale(row, weight[r] / sum);
            row[label] -= weight[r];
        } else if grad {
            row.fill(0.0);
        }
    });
    if !ok {
        return Err(Error::InvalidArgument("cross-entropy: a row's part panicked".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vocab_whose_logits_overflow_is_refused() {
        // 2 rows x 2^63 wraps to 0 logits: it must not pass as "no logits", nor reach the rows
        let (mut lse, mut picked) = ([0f32; 2], [0f32; 2]);
        let err = forward_backward(&mut [], 1 << 63, &[0, 1], &[1.0, 1.0], true, &mut lse, &mut picked).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        assert!(err.to_string().contains("vocab") && err.to_string().contains("does not fit in a usize"), "{err}");
        let mut g: [f32; 0] = [];
        assert!(forward_backward_to(&[], 1 << 63, &[0, 1], &[1.0, 1.0], &mut g, &mut lse, &mut picked).is_err());
    }

    fn reference(row: &[f32], label: usize, w: f32) -> (f64, Vec<f64>) {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let s: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
        let grad = row
            .iter()
            .enumerate()
            .map(|(i, &v)| ((v as f64 - m).exp() / s - if i == label { 1.0 } else { 0.0 }) * w as f64)
            .collect();
        (m + s.ln(), grad)
    }

    #[test]
    fn matches_a_float64_reference() {
        let (rows, vocab) = (5, 1003);
        let logits: Vec<f32> = (0..rows * vocab).map(|i| ((i * 7919 % 1000) as f32 / 50.0) - 10.0).collect();
        let labels = vec![0i64, 1002, 17, 500, 3];
        let weight = vec![0.5f32, 0.25, 0.0, 1.0, 0.125];
        let mut g = logits.clone();
        let (mut lse, mut picked) = (vec![0f32; rows], vec![0f32; rows]);
        forward_backward(&mut g, vocab, &labels, &weight, true, &mut lse, &mut picked).unwrap();
        for r in 0..rows {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let (want_lse, want_grad) = reference(row, labels[r] as usize, weight[r]);
            assert!((lse[r] as f64 - want_lse).abs() < 1e-5 * want_lse.abs().max(1.0), "row {r}: lse {}", lse[r]);
            assert_eq!(picked[r], row[labels[r] as usize]);
            for (i, (&got, want)) in g[r * vocab..(r + 1) * vocab].iter().zip(&want_grad).enumerate() {
                assert!((got as f64 - want).abs() < 1e-6, "row {r} col {i}: {got} vs {want}");
            }
        }
        // into a separate buffer: the same bytes, the logits untouched
        let mut to = vec![f32::NAN; rows * vocab];
        let (mut lse2, mut picked2) = (vec![0f32; rows], vec![0f32; rows]);
        forward_backward_to(&logits, vocab, &labels, &weight, &mut to, &mut lse2, &mut picked2).unwrap();
        assert_eq!((&to, &lse2, &picked2), (&g, &lse, &picked));
        assert!(forward_backward_to(&logits, vocab, &labels, &weight, &mut to[1..], &mut lse2, &mut picked2).is_err());
        // without the gradient the logits stay as they were
        let mut same = logits.clone();
        forward_backward(&mut same, vocab, &labels, &weight, false, &mut lse, &mut picked).unwrap();
        assert_eq!(same, logits);
    }

    #[test]
    fn bad_labels_and_shapes_are_errors_that_write_nothing() {
        let mut logits = vec![1.0f32; 20];
        let (mut lse, mut picked) = (vec![0f32; 2], vec![0f32; 2]);
        for bad in [-100i64, 10, i64::MAX] {
            let err = forward_backward(&mut logits, 10, &[1, bad], &[1.0, 1.0], true, &mut lse, &mut picked)
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("label {bad} at row 1")), "{err}");
        }
        assert!(logits.iter().all(|&v| v == 1.0));
        assert!(forward_backward(&mut logits, 7, &[1, 2], &[1.0, 1.0], true, &mut lse, &mut picked).is_err());
        assert!(forward_backward(&mut logits, 0, &[], &[], true, &mut [], &mut []).is_err());
    }
}
