//! Rotary position embedding (rotate-half, as HF Llama) for float32 on the CPU, one pass each way,
//! between any two (B, H, T, D) layouts whose head dim is contiguous.
//!
//! torch spends six elementwise ops and a concatenation on each direction; here each value is read
//! and written once. The layouts are free so that the forward reads the projection's (B, T, H, D)
//! output in place and writes the (B, H, T, D) heads attention wants, and the backward writes its
//! gradient straight back in the projection's layout (no transposing copy on either side).
//!
//! ```text
//! forward   y1 = x1 * cos1 - x2 * sin1      y2 = x2 * cos2 + x1 * sin2
//! backward  x1 = y1 * cos1 + y2 * sin2      x2 = y2 * cos2 - y1 * sin1
//! ```
//!
//! (x1, x2 the halves of the head dim). Each product is rounded on its own and never fused into a
//! multiply-add, so the bytes equal torch's elementwise version.

use crate::error::{Error, Result};
use crate::omp::{self, Shared};
use crate::simd::multiversion;

/// Element strides of a (B, H, T, D) tensor's first three axes (D is contiguous).
#[derive(Clone, Copy, Debug)]
pub struct Strides {
    pub batch: usize,
    pub head: usize,
    pub pos: usize,
}

/// Sizes of the (B, H, T, D) tensors.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub batch: usize,
    pub heads: usize,
    pub seq: usize,
    pub dim: usize,
}

impl Shape {
    /// One past the largest index a tensor of this shape with strides `s` touches (0 when it has
    /// no elements), or None when that index does not fit in a `usize`.
    pub(crate) fn span(&self, s: Strides) -> Option<usize> {
        if self.batch == 0 || self.heads == 0 || self.seq == 0 || self.dim == 0 {
            return Some(0);
        }
        let last = |size: usize, stride: usize| (size - 1).checked_mul(stride);
        last(self.batch, s.batch)?
            .checked_add(last(self.heads, s.head)?)?
            .checked_add(last(self.seq, s.pos)?)?
            .checked_add(self.dim)
    }

    /// Whether strides `s` give every element its own slot (so parts writing rows never collide).
    /// A layout whose extent overflows a `usize` is not dense (no buffer could hold it).
    pub(crate) fn dense(&self, s: Strides) -> bool {
        let mut axes = [(s.batch, self.batch), (s.head, self.heads), (s.pos, self.seq)];
        axes.sort_unstable();
        let mut need = self.dim;
        for (stride, size) in axes {
            if size > 1 {
                if stride < need {
                    return false;
                }
                match stride.checked_mul(size) {
                    Some(n) => need = n,
                    None => return false,
                }
            }
        }
        true
    }

    /// Whether a tensor of this shape with strides `s` lies inside `len` values; else an error
    /// (of `what`, the kernel) naming the argument `name` and how far its strides reach.
    pub(crate) fn check_within(&self, what: &str, name: &str, len: usize, s: Strides) -> Result<()> {
        match self.span(s) {
            Some(span) if span <= len => Ok(()),
            span => Err(Error::InvalidArgument(format!(
                "{what}: {name} holds {len} values; its strides {s:?} for shape {self:?} reach {}",
                span.map_or("past the largest usize".to_string(), |n| n.to_string())
            ))),
        }
    }
}

multiversion! {
    fn rotate_row(x: &[f32], out: &mut [f32], cos: &[f32], sin: &[f32], backward: bool) {
        let half = x.len() / 2;
        let (x1, x2) = x.split_at(half);
        let (c1, c2) = cos.split_at(half);
        let (s1, s2) = sin.split_at(half);
        let (o1, o2) = out.split_at_mut(half);
        if backward {
            for i in 0..half {
                o1[i] = x1[i] * c1[i] + x2[i] * s2[i];
                o2[i] = x2[i] * c2[i] - x1[i] * s1[i];
            }
        } else {
            for i in 0..half {
                o1[i] = x1[i] * c1[i] - x2[i] * s1[i];
                o2[i] = x2[i] * c2[i] + x1[i] * s2[i];
            }
        }
    }
}

/// `out` = RoPE of `x` (`backward`: its transpose, for a gradient) with `cos`/`sin` tables of
/// (T, D) per batch row, `table_batch` values apart (0: one table for all rows).
#[allow(clippy::too_many_arguments)]
pub fn rotate(
    x: &[f32],
    xs: Strides,
    out: &mut [f32],
    os: Strides,
    cos: &[f32],
    sin: &[f32],
    table_batch: usize,
    shape: Shape,
    backward: bool,
) -> Result<()> {
    let Shape { batch, heads, seq, dim } = shape;
    let bad = |why: String| Err(Error::InvalidArgument(format!("rope: {why}")));
    if batch == 0 || heads == 0 || seq == 0 {
        return Ok(());
    }
    if dim == 0 || dim % 2 != 0 {
        return bad(format!("head dim {dim}; expected a positive even number"));
    }
    shape.check_within("rope", "x", x.len(), xs)?;
    if shape.span(os).is_none_or(|span| span > out.len()) || !shape.dense(os) {
        return bad(format!(
            "out holds {} values with strides {os:?}; expected a layout of shape {shape:?} \
                            that gives each element its own slot within them",
            out.len()
        ));
    }
    let table = (batch - 1).checked_mul(table_batch).and_then(|n| n.checked_add(seq.checked_mul(dim)?));
    let Some(table) = table else {
        return bad(format!(
            "table_batch {table_batch} and (T, D) = ({seq}, {dim}) put the cos/sin tables past the largest usize"
        ));
    };
    if cos.len() < table || sin.len() != cos.len() {
        return bad(format!(
            "cos/sin hold {} and {} values; expected {table} ((T, D) = ({seq}, {dim}) per \
                            batch row, {table_batch} apart)",
            cos.len(),
            sin.len()
        ));
    }
    let dst = Shared::new(out);
    // Every index below is under a span checked above (x's, out's, the tables'), so no product or
    // sum of them overflows. One part handles whole (batch, position) rows: all heads of them.
    let ok = omp::by_rows(batch * seq, heads * dim, &|lo, hi| {
        for row in lo..hi {
            let (b, t) = (row / seq, row % seq);
            let at = b * table_batch + t * dim;
            let (c, s) = (&cos[at..at + dim], &sin[at..at + dim]);
            for h in 0..heads {
                let src = b * xs.batch + h * xs.head + t * xs.pos;
                let o = b * os.batch + h * os.head + t * os.pos;
                // SAFETY: `out`'s layout is dense (checked), so element (b, h, t, ..) is this row's alone.
                rotate_row(&x[src..src + dim], unsafe { dst.range(o, o + dim) }, c, s, backward);
            }
        }
    });
    if !ok {
        return bad("a part of the kernel panicked".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, k: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * k % 101) as f32 - 50.0) / 25.0).collect()
    }

    #[test]
    fn both_directions_match_the_formulas_across_layouts() {
        let shape = Shape { batch: 2, heads: 3, seq: 5, dim: 8 };
        let (b, h, t, d) = (2, 3, 5, 8);
        let bthd = Strides { batch: t * h * d, head: d, pos: h * d };
        let bhtd = Strides { batch: h * t * d, head: t * d, pos: d };
        let x = values(b * h * t * d, 7);
        let (cos, sin) = (values(b * t * d, 3), values(b * t * d, 11));
        for backward in [false, true] {
            let mut out = vec![f32::NAN; x.len()];
            rotate(&x, bthd, &mut out, bhtd, &cos, &sin, t * d, shape, backward).unwrap();
            for (bi, hi, ti, i) in (0..b).flat_map(|bi| {
                (0..h).flat_map(move |hi| (0..t).flat_map(move |ti| (0..d / 2).map(move |i| (bi, hi, ti, i))))
            }) {
                let xi = |j: usize| x[bi * bthd.batch + hi * bthd.head + ti * bthd.pos + j];
                let tab = |v: &Vec<f32>, j: usize| v[bi * t * d + ti * d + j];
                let o = |j: usize| out[bi * bhtd.batch + hi * bhtd.head + ti * bhtd.pos + j];
                let (x1, x2) = (xi(i), xi(i + d / 2));
                let (c1, c2, s1, s2) = (tab(&cos, i), tab(&cos, i + d / 2), tab(&sin, i), tab(&sin, i + d / 2));
                let want = if backward {
                    (x1 * c1 + x2 * s2, x2 * c2 - x1 * s1)
                } else {
                    (x1 * c1 - x2 * s1, x2 * c2 + x1 * s2)
                };
                assert_eq!((o(i), o(i + d / 2)), want, "({bi},{hi},{ti},{i}) backward={backward}");
            }
        }
        // one table shared by the batch rows
        let mut shared = vec![0f32; x.len()];
        rotate(&x, bthd, &mut shared, bhtd, &cos[..t * d], &sin[..t * d], 0, shape, false).unwrap();
        let mut first = vec![0f32; x.len()];
        rotate(&x, bthd, &mut first, bhtd, &cos, &sin, t * d, shape, false).unwrap();
        assert_eq!(shared[..h * t * d], first[..h * t * d]);
    }

    #[test]
    fn shapes_and_strides_that_overflow_are_errors_not_wrapped() {
        let shape = Shape { batch: 3, heads: 1, seq: 2, dim: 2 };
        let dense = Strides { batch: 4, head: 4, pos: 2 };
        let (x, cos, sin) = (vec![1f32; 12], vec![1f32; 4], vec![0f32; 4]);
        let mut out = vec![0f32; 12];
        let message = |r: Result<()>| match r {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        };
        // x's strides reach past usize::MAX: (3 - 1) * 2^63 wraps to 0, which would pass
        let huge = Strides { batch: 1 << 63, ..dense };
        let m = message(rotate(&x, huge, &mut out, dense, &cos, &sin, 0, shape, false));
        assert!(m.starts_with("rope: x holds 12 values") && m.contains("past the largest usize"), "{m}");
        // so do out's
        let m = message(rotate(&x, dense, &mut out, huge, &cos, &sin, 0, shape, false));
        assert!(m.starts_with("rope: out holds 12 values"), "{m}");
        // the tables': (3 - 1) * 2^63 + 4 wraps to 4, which the 4-value tables would satisfy
        let m = message(rotate(&x, dense, &mut out, dense, &cos, &sin, 1 << 63, shape, false));
        assert!(m.contains("table_batch") && m.contains("past the largest usize"), "{m}");
        // batch and head on one stride of 2^63: 2 x 2^63 wrapped to 0 made them look disjoint
        let two = Shape { batch: 2, heads: 2, seq: 1, dim: 2 };
        let same = Strides { batch: 1 << 63, head: 1 << 63, pos: 0 };
        assert!(!two.dense(same));
        assert_eq!(two.span(same), None);
        assert!(out.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn bad_shapes_and_layouts_are_errors() {
        let shape = Shape { batch: 1, heads: 2, seq: 3, dim: 4 };
        let dense = Strides { batch: 24, head: 12, pos: 4 };
        let x = vec![1f32; 24];
        let (cos, sin) = (vec![1f32; 12], vec![0f32; 12]);
        let mut out = vec![0f32; 24];
        assert!(rotate(&x[..23], dense, &mut out, dense, &cos, &sin, 0, shape, false).is_err());
        let overlapping = Strides { batch: 24, head: 4, pos: 4 };
        assert!(rotate(&x, dense, &mut out, overlapping, &cos, &sin, 0, shape, false).is_err());
        assert!(rotate(&x, dense, &mut out, dense, &cos[..11], &sin, 0, shape, false).is_err());
        assert!(rotate(&x, dense, &mut out, dense, &cos, &sin, 0, Shape { dim: 3, ..shape }, false).is_err());
        assert!(out.iter().all(|&v| v == 0.0));
        rotate(&x, dense, &mut out, dense, &cos, &sin, 0, shape, false).unwrap();
        assert!(out.iter().all(|&v| v == 1.0));
    }
}
