//! Packed batches: attention inside each document of a row, one [`forward`] / [`backward`] call
//! per document on a view of the operands.

use super::backward::backward;
use super::forward::forward;
use super::{at, bad, check_backward, check_forward, check_options, Dims, Input, Output};
use crate::error::Result;
use crate::rope::Strides;

/// One document of a packed batch: row `batch`, positions `start..start + len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub batch: usize,
    pub start: usize,
    pub len: usize,
}

/// Checks that `spans` tile every row of `d` (in row order, each row's documents back to back from
/// position 0 to T, none empty); returns the number of positions they cover (B x T).
fn check_spans(spans: &[Span], d: &Dims) -> Result<usize> {
    let (mut row, mut pos) = (0usize, 0usize);
    for (i, s) in spans.iter().enumerate() {
        if pos == d.seq {
            (row, pos) = (row + 1, 0);
        }
        let end = s.start.checked_add(s.len);
        if s.batch != row || s.start != pos || s.len == 0 || end.is_none_or(|e| e > d.seq) {
            return Err(bad(format!(
                "document {i} is (row {}, start {}, length {}); expected row {row} from position {pos}: \
                 the documents must tile each of the {} rows of {} positions in order, none empty",
                s.batch, s.start, s.len, d.batch, d.seq
            )));
        }
        pos += s.len;
    }
    if d.batch > 0 && d.seq > 0 && (row + 1 != d.batch || pos != d.seq) {
        return Err(bad(format!(
            "the documents end at row {row}, position {pos}; expected them to tile all {} rows of {} positions",
            d.batch, d.seq
        )));
    }
    crate::error::product("attention: B x T", &[d.batch, d.seq])
}

/// `x` from document `s` on: a (1, heads, s.len, D) operand with `x`'s strides. `x` was checked for
/// the whole (B, heads, T, D) shape and `s` lies inside it, so the offset is within `x`.
fn doc_offset(strides: Strides, s: &Span) -> usize {
    at(strides, s.batch, 0, s.start)
}

fn doc_input<'a>(x: Input<'a>, s: &Span) -> Input<'a> {
    Input { data: &x.data[doc_offset(x.strides, s)..], strides: x.strides }
}

fn doc_dims(d: &Dims, s: &Span) -> Dims {
    Dims { batch: 1, seq: s.len, ..*d }
}

/// [`forward`] of a packed batch whose rows hold several documents: each query attends causally
/// to the keys of its own document only (cost: the sum of the documents' squared lengths, not
/// T^2 per row; with a `window`, of their lengths times the window). `lse` holds H x len values
/// per document, in `spans` order (B x H x T in all).
#[allow(clippy::too_many_arguments)]
pub fn forward_docs(
    q: Input<'_>,
    k: Input<'_>,
    v: Input<'_>,
    out: Output<'_>,
    lse: &mut [f32],
    d: Dims,
    spans: &[Span],
    scale: f32,
    window: Option<usize>,
    softcap: Option<f32>,
) -> Result<()> {
    check_options(&d, window, softcap)?;
    check_forward(&q, &k, &v, &out, lse.len(), &d)?;
    check_spans(spans, &d)?;
    if d.heads == 0 {
        return Ok(());
    }
    let mut done = 0;
    for s in spans {
        let n = d.heads * s.len; // <= B x H x T: checked by check_dims
        let doc = |x| doc_input(x, s);
        let o = Output { data: &mut out.data[doc_offset(out.strides, s)..], strides: out.strides };
        forward(doc(q), doc(k), doc(v), o, &mut lse[done..done + n], doc_dims(&d, s), scale, window, softcap)?;
        done += n;
    }
    Ok(())
}

/// The gradients of [`forward_docs`] (as [`backward`] is of [`forward`]), for the same `window` and
/// `softcap`.
#[allow(clippy::too_many_arguments)]
pub fn backward_docs(
    dout: Input<'_>,
    q: Input<'_>,
    k: Input<'_>,
    v: Input<'_>,
    out: Input<'_>,
    lse: &[f32],
    dq: Output<'_>,
    dk: Output<'_>,
    dv: Output<'_>,
    d: Dims,
    spans: &[Span],
    scale: f32,
    window: Option<usize>,
    softcap: Option<f32>,
) -> Result<()> {
    check_options(&d, window, softcap)?;
    check_backward([&dout, &q, &k, &v, &out], lse.len(), [&dq, &dk, &dv], &d)?;
    check_spans(spans, &d)?;
    if d.heads == 0 {
        return Ok(());
    }
    let mut done = 0;
    for s in spans {
        let n = d.heads * s.len;
        let doc = |x| doc_input(x, s);
        let (dqo, dko, dvo) = (doc_offset(dq.strides, s), doc_offset(dk.strides, s), doc_offset(dv.strides, s));
        backward(
            doc(dout),
            doc(q),
            doc(k),
            doc(v),
            doc(out),
            &lse[done..done + n],
            Output { data: &mut dq.data[dqo..], strides: dq.strides },
            Output { data: &mut dk.data[dko..], strides: dk.strides },
            Output { data: &mut dv.data[dvo..], strides: dv.strides },
            doc_dims(&d, s),
            scale,
            window,
            softcap,
        )?;
        done += n;
    }
    Ok(())
}
