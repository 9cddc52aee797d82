//! Decoding attention: one new token per sequence, each over its own key/value cache (one
//! sequence decoded alone, or several decoded together in one step). The call writes each
//! sequence's new key and value into its cache at its next position, then each query head attends
//! over all of that sequence's positions (its own length, grouped-query heads), or with a sliding
//! window over the `window` latest of them (the new one included).
//!
//! Each (sequence, query head) runs the same sequential code whatever else the call holds and
//! however the parts are spread over the decode pool's threads, so a sequence's output is bit for
//! bit what it gets decoded alone: scores by [`dot`](super::row::dot) in key order, the softmax
//! by [`row_max`] and [`exp_row`], the output as multiply-adds over the keys in order, divided by
//! the sum of the exponentials.

use super::row::{dot, exp_row, row_max};
use super::{bad, first_key, window_keys, LANES};
use crate::error::{product, Error, Result};
use crate::infer::pool;
use crate::simd::multiversion;
use std::sync::Mutex;

/// Multiply-adds below which a call runs on the calling thread alone (a fork-join costs more).
const SPLIT_MACS: usize = 1 << 15;

/// The heads of a call: query heads, key/value heads (a divisor of the query heads) and head dim.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub dim: usize,
}

/// The step's new token of every sequence: its queries (sequences, heads, dim) and its key and
/// value (sequences, kv_heads, dim), contiguous.
#[derive(Clone, Copy, Debug)]
pub struct Step<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
}

/// One sequence's cache, as the call sees it: the keys and values of all its layers (flat, the
/// same layout each), the start of this layer's block of `kv_heads x capacity x dim` values,
/// the block's `capacity` in positions, and the positions it holds already (`past`: the new
/// token's key and value go to that position).
#[derive(Debug)]
pub struct Cache<'a> {
    pub k: &'a mut [f32],
    pub v: &'a mut [f32],
    pub offset: usize,
    pub capacity: usize,
    pub past: usize,
}

fn check(q: usize, k_new: usize, v_new: usize, caches: &[Cache<'_>], out: usize, h: Heads) -> Result<()> {
    if h.dim == 0 || !h.dim.is_multiple_of(LANES) {
        return Err(bad(format!("decode: head dim {}; expected a positive multiple of {LANES}", h.dim)));
    }
    if h.kv_heads == 0 || !h.heads.is_multiple_of(h.kv_heads) {
        return Err(bad(format!(
            "decode: {} query heads over {} key/value heads; expected a whole number of query heads per \
             key/value head",
            h.heads, h.kv_heads
        )));
    }
    let n = caches.len();
    let want_q = product("attention: decode: sequences x heads x dim", &[n, h.heads, h.dim])?;
    let want_kv = product("attention: decode: sequences x kv heads x dim", &[n, h.kv_heads, h.dim])?;
    for (what, len, want) in [("q", q, want_q), ("out", out, want_q), ("k", k_new, want_kv), ("v", v_new, want_kv)] {
        if len != want {
            return Err(bad(format!(
                "decode: {what} holds {len} values; expected {want} ({n} sequences x their heads x head dim {})",
                h.dim
            )));
        }
    }
    for (i, c) in caches.iter().enumerate() {
        if c.past >= c.capacity {
            return Err(bad(format!(
                "decode: cache {i} holds {} positions of its {}; no room for the new token (allocate a longer cache)",
                c.past, c.capacity
            )));
        }
        let block = product("attention: decode: cache kv heads x capacity x dim", &[h.kv_heads, c.capacity, h.dim])?;
        let end = c.offset.checked_add(block);
        for (what, len) in [("keys", c.k.len()), ("values", c.v.len())] {
            if end.is_none_or(|e| e > len) {
                return Err(bad(format!(
                    "decode: cache {i}'s {what} hold {len} values; its layer block at {} of {} x {} x {} values \
                     does not fit in them",
                    c.offset, h.kv_heads, c.capacity, h.dim
                )));
            }
        }
    }
    Ok(())
}

multiversion! {
    /// The query heads of one group (`q`, `out`: group x dim) over one key/value head's first
    /// `keys` positions (`k`, `v`: keys x dim); `scores` holds `keys` values of scratch.
    fn attend_group(q: &[f32], k: &[f32], v: &[f32], scale: f32, scores: &mut [f32], out: &mut [f32]) {
        let dim = k.len() / scores.len();
        for (qh, oh) in q.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            for (s, kj) in scores.iter_mut().zip(k.chunks_exact(dim)) {
                *s = dot(qh, kj);
            }
            let top = row_max(scores);
            let sum = exp_row(scores, scores.len(), scale, top * scale);
            oh.fill(0.0);
            for (&p, vj) in scores.iter().zip(v.chunks_exact(dim)) {
                for (o, &x) in oh.iter_mut().zip(vj) {
                    *o = p.mul_add(x, *o);
                }
            }
            for o in oh.iter_mut() {
                *o /= sum;
            }
        }
    }
}

/// Decoding attention for `caches.len()` sequences, their new tokens in `step`: the new keys and
/// values are written into each sequence's cache at position `past`, then `out` (sequences, heads, dim)
/// gets each query head's softmax(scale q.K^T) V over positions `0..=past` of its key/value head
/// (with a `window`, over the `window` latest of them only). Does not change `past` (the caller
/// advances its caches once every layer has run).
pub fn decode(
    step: Step<'_>,
    caches: &mut [Cache<'_>],
    out: &mut [f32],
    h: Heads,
    scale: f32,
    window: Option<usize>,
) -> Result<()> {
    let Step { q, k: k_new, v: v_new } = step;
    check(q.len(), k_new.len(), v_new.len(), caches, out.len(), h)?;
    let window = window_keys(window)?;
    let (d, kvh) = (h.dim, h.kv_heads);
    let group = h.heads / kvh;
    for (i, c) in caches.iter_mut().enumerate() {
        for g in 0..kvh {
            let at = c.offset + (g * c.capacity + c.past) * d;
            let from = (i * kvh + g) * d;
            c.k[at..at + d].copy_from_slice(&k_new[from..from + d]);
            c.v[at..at + d].copy_from_slice(&v_new[from..from + d]);
        }
    }
    // part p = (sequence p / kvh, key/value head p % kvh): its group's query heads, whose outputs
    // are the p-th run of group x dim values of `out`
    let blocks: Vec<(&[f32], &[f32], usize, usize)> =
        caches.iter().map(|c| (&*c.k, &*c.v, c.offset, c.capacity)).collect();
    // each sequence's first key and the number of keys from it to the new one
    let keys: Vec<(usize, usize)> = caches
        .iter()
        .map(|c| {
            let first = first_key(c.past, window);
            (first, c.past + 1 - first)
        })
        .collect();
    let run = |p: usize, o: &mut [f32]| {
        let (i, g) = (p / kvh, p % kvh);
        let (k, v, offset, capacity) = blocks[i];
        let (first, n) = keys[i];
        let start = offset + (g * capacity + first) * d;
        let span = start..start + n * d;
        let mut scores = vec![0f32; n];
        attend_group(&q[p * group * d..(p + 1) * group * d], &k[span.clone()], &v[span], scale, &mut scores, o);
    };
    let macs = keys.iter().fold(0usize, |a, &(_, n)| a.saturating_add(n.saturating_mul(h.heads * d)));
    if macs < SPLIT_MACS || pool::threads() == 1 {
        for (p, o) in out.chunks_exact_mut(group * d).enumerate() {
            run(p, o);
        }
        return Ok(());
    }
    let outs: Vec<Mutex<&mut [f32]>> = out.chunks_exact_mut(group * d).map(Mutex::new).collect();
    let ok = pool::run(outs.len(), &|p| {
        let mut o = outs[p].lock().unwrap_or_else(|e| e.into_inner());
        run(p, &mut o);
    });
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidData("attention: decode: a worker thread panicked (a tunex bug: please report it)".into()))
    }
}
