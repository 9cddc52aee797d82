//! Causal self-attention for float32 on the CPU, forward and backward, for training: queries
//! (B, H, T, D) over keys and values (B, Hkv, T, D), H a multiple of Hkv (grouped-query heads).
//!
//! ```text
//! forward   S = Q K^T * scale (j <= i)   P = softmax_j(S)   O = P V   lse_i = log sum_j exp(S_ij)
//! backward  P = exp(S - lse)   dP = dO V^T   delta_i = sum_d dO_id O_id   dS = P * (dP - delta)
//!           dQ = dS K * scale   dK = dS^T Q * scale   dV = P^T dO
//! ```
//!
//! One part handles one (batch, head) pair. It walks the queries in tiles of [`MR`] rows: a tile's
//! scores (MR x T) stay in L1, and K^T, V^T (packed once per key head) and V stay in L2, so no
//! score row goes to memory. The products run on one register-tile kernel (MR rows x 64 columns
//! of accumulators) that skips the masked triangle at tile granularity. For T = 256, D = 64 (a
//! SmolLM2 layer at batch 4) this is about twice as fast as torch's CPU flash attention, whose
//! tiles of scores and probabilities go through memory between small GEMM calls.
//!
//! A causal sliding window (query i sees keys j with i - window < j <= i: Mistral's, Phi-3's, the
//! local layers of Gemma) narrows each tile to the columns its rows see, from the first one down
//! to a whole vector, so a window's cost follows the window, not T.
//!
//! Soft-capping (Gemma 2): with a cap c the logits are `c tanh(S / c)` instead of S, capped before
//! the causal / window / document masking (as transformers does), and the backward multiplies dS by
//! `1 - tanh(S / c)^2`, recomputed from the scores it recomputes anyway. The cap is applied to each
//! row of a tile after its product, in a branch of its own: uncapped rows take no per-element test.
//!
//! Grouped heads: each query head's dK and dV are summed over the rows of its own part, then the
//! heads of a group are added in head order. Every output element has one fixed order of
//! operations (multiply-adds in index order; row sums over 16 lanes combined by one fixed pairing),
//! so the bytes depend neither on the CPU's vector width nor on the number of threads.
//!
//! The files: [`forward`](fn@forward) and [`backward`](fn@backward) in `forward.rs` and `backward.rs`,
//! the packed documents ([`forward_docs`], [`backward_docs`]) in `documents.rs`, decoding (one new
//! token per sequence over its own cache: [`decode`](fn@decode)) in `decode.rs`; below them the
//! packing of K^T / V^T (`pack.rs`), the register tile (`tile.rs`, its AVX-512 form in `x86.rs`)
//! and the row helpers: max, exponentials, dot product, soft-cap (`row.rs`). This file holds the
//! shared types, sizes and argument checks.

mod backward;
mod decode;
mod documents;
mod forward;
mod pack;
mod row;
#[cfg(test)]
mod tests;
mod tile;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use backward::backward;
pub use decode::{decode, Cache, Heads, Step};
pub use documents::{backward_docs, forward_docs, Span};
pub use forward::forward;

use crate::error::{Error, Result};
use crate::rope::{Shape, Strides};

const LANES: usize = 16;
/// Query rows per register tile.
const MR: usize = 6;
/// 16-lane vectors per register tile row (64 columns).
const NV: usize = 4;
/// Query rows per backward block: dK and dV take rank-BLOCK updates.
const BLOCK: usize = 8 * MR;

/// The sizes of one call: queries (batch, heads, seq, dim), keys and values (batch, kv_heads, seq, dim).
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seq: usize,
    pub dim: usize,
}

impl Dims {
    fn q(&self) -> Shape {
        Shape { batch: self.batch, heads: self.heads, seq: self.seq, dim: self.dim }
    }

    fn kv(&self) -> Shape {
        Shape { batch: self.batch, heads: self.kv_heads, seq: self.seq, dim: self.dim }
    }

    /// Columns of a packed K^T / V^T row: T rounded up to whole vectors (the rest zeros).
    fn padded(&self) -> usize {
        self.seq.div_ceil(LANES) * LANES
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// A (B, H, T, D) operand: its values and the strides of its first three axes.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    pub data: &'a [f32],
    pub strides: Strides,
}

/// A (B, H, T, D) result: its values and the strides of its first three axes.
#[derive(Debug)]
pub struct Output<'a> {
    pub data: &'a mut [f32],
    pub strides: Strides,
}

fn bad(why: String) -> Error {
    Error::InvalidArgument(format!("attention: {why}"))
}

/// The checks every entry point makes first, in this order: the dims ([`check_dims`]), the window
/// ([`window_keys`]) and the cap ([`softcap_value`]); returns the window's keys and the cap.
fn check_options(d: &Dims, window: Option<usize>, softcap: Option<f32>) -> Result<(usize, Option<f32>)> {
    check_dims(d)?;
    Ok((window_keys(window)?, softcap_value(softcap)?))
}

fn check_dims(d: &Dims) -> Result<()> {
    if d.dim == 0 || !d.dim.is_multiple_of(LANES) {
        return Err(bad(format!("head dim {}; expected a positive multiple of {LANES}", d.dim)));
    }
    if d.kv_heads == 0 || !d.heads.is_multiple_of(d.kv_heads) {
        return Err(bad(format!(
            "{} query heads over {} key/value heads; expected a whole number of query \
                                heads per key/value head",
            d.heads, d.kv_heads
        )));
    }
    // The largest buffer a call sizes from the shape (kv_heads <= heads, T <= padded T): once this
    // fits, so does every size and index the kernels compute from it.
    let padded = d.seq.checked_next_multiple_of(LANES).unwrap_or(usize::MAX);
    crate::error::product("attention: shape B x H x T (padded) x D", &[d.batch, d.heads, padded, d.dim])?;
    Ok(())
}

fn check_in(name: &str, t: &Input<'_>, shape: Shape) -> Result<()> {
    shape.check_within("attention", name, t.data.len(), t.strides)
}

fn check_out(name: &str, t: &Output<'_>, shape: Shape) -> Result<()> {
    if shape.span(t.strides).is_none_or(|span| span > t.data.len()) || !shape.dense(t.strides) {
        return Err(bad(format!(
            "{name} holds {} values with strides {:?}; expected a layout of shape {shape:?} \
                                that gives each element its own slot within them",
            t.data.len(),
            t.strides
        )));
    }
    Ok(())
}

fn check_lse(len: usize, d: &Dims) -> Result<()> {
    if len != d.batch * d.heads * d.seq {
        return Err(bad(format!("lse holds {len} values; expected B x H x T = {} x {} x {}", d.batch, d.heads, d.seq)));
    }
    Ok(())
}

/// The operand checks of a forward call (after [`check_dims`]).
fn check_forward(q: &Input<'_>, k: &Input<'_>, v: &Input<'_>, out: &Output<'_>, lse: usize, d: &Dims) -> Result<()> {
    check_in("q", q, d.q())?;
    check_in("k", k, d.kv())?;
    check_in("v", v, d.kv())?;
    check_out("out", out, d.q())?;
    check_lse(lse, d)
}

/// The operand checks of a backward call (after [`check_dims`]): inputs dout, q, k, v, out and
/// outputs dq, dk, dv.
fn check_backward(inputs: [&Input<'_>; 5], lse: usize, outputs: [&Output<'_>; 3], d: &Dims) -> Result<()> {
    let [dout, q, k, v, out] = inputs;
    for (name, t) in [("dout", dout), ("q", q), ("out", out)] {
        check_in(name, t, d.q())?;
    }
    check_in("k", k, d.kv())?;
    check_in("v", v, d.kv())?;
    let [dq, dk, dv] = outputs;
    check_out("dq", dq, d.q())?;
    check_out("dk", dk, d.kv())?;
    check_out("dv", dv, d.kv())?;
    check_lse(lse, d)
}

fn at(s: Strides, b: usize, h: usize, t: usize) -> usize {
    b * s.batch + h * s.head + t * s.pos
}

/// The first key query `i` sees under a causal window of `window` keys (itself included):
/// `i + 1 - window`, or 0. Without a window, `window` is `usize::MAX`.
#[inline(always)]
fn first_key(i: usize, window: usize) -> usize {
    (i + 1).saturating_sub(window)
}

/// The window of a call as the kernels take it (`usize::MAX`: none); a window of no keys is an error.
fn window_keys(window: Option<usize>) -> Result<usize> {
    match window {
        Some(0) => {
            Err(bad("window 0; expected a positive number of keys each query sees (itself included), or none".into()))
        }
        Some(w) => Ok(w),
        None => Ok(usize::MAX),
    }
}

/// The soft-cap of a call, checked: positive and finite, or none.
fn softcap_value(softcap: Option<f32>) -> Result<Option<f32>> {
    match softcap {
        Some(c) if !(c.is_finite() && c > 0.0) => {
            Err(bad(format!("softcap {c}; expected a positive finite cap (logits c * tanh(scores / c)), or none")))
        }
        cap => Ok(cap),
    }
}
