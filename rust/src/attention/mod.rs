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

use crate::error::{Error, Result};
use crate::lora::tree;
use crate::omp::{self, Shared};
use crate::rope::{Shape, Strides};
use crate::simd::multiversion512;
use crate::swiglu::exp_f32;

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

// ---- the register tile ----

/// `c[i][j] = (c[i][j] if accumulate, else 0) + sum over k in 0..kd of a[i*ars + k*acs] * b[k*brs + j]`
/// for i < M, j < W * 16: multiply-adds in k order.
///
/// SAFETY: every index named above is inside its allocation.
#[inline(always)]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn tile<const M: usize, const W: usize>(
    kd: usize,
    a: *const f32,
    ars: usize,
    acs: usize,
    b: *const f32,
    brs: usize,
    c: *mut f32,
    crs: usize,
    accumulate: bool,
) {
    let mut acc = [[[0f32; LANES]; W]; M];
    if accumulate {
        for i in 0..M {
            for w in 0..W {
                for l in 0..LANES {
                    acc[i][w][l] = *c.add(i * crs + w * LANES + l);
                }
            }
        }
    }
    for k in 0..kd {
        let bk = b.add(k * brs);
        let mut bv = [[0f32; LANES]; W];
        for w in 0..W {
            for l in 0..LANES {
                bv[w][l] = *bk.add(w * LANES + l);
            }
        }
        let ak = a.add(k * acs);
        for i in 0..M {
            let av = *ak.add(i * ars);
            for w in 0..W {
                for l in 0..LANES {
                    acc[i][w][l] = av.mul_add(bv[w][l], acc[i][w][l]);
                }
            }
        }
    }
    for i in 0..M {
        for w in 0..W {
            for l in 0..LANES {
                *c.add(i * crs + w * LANES + l) = acc[i][w][l];
            }
        }
    }
}

/// The same tile on AVX-512 registers: the same multiply-adds in the same order, so the same bytes.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::LANES;
    use std::arch::x86_64::*;

    /// SAFETY: as [`super::tile`]; the CPU has AVX-512F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    pub(super) unsafe fn tile<const M: usize, const W: usize>(
        kd: usize,
        a: *const f32,
        ars: usize,
        acs: usize,
        b: *const f32,
        brs: usize,
        c: *mut f32,
        crs: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); W]; M];
        if accumulate {
            for i in 0..M {
                for w in 0..W {
                    acc[i][w] = _mm512_loadu_ps(c.add(i * crs + w * LANES));
                }
            }
        }
        for k in 0..kd {
            let bk = b.add(k * brs);
            let mut bv = [_mm512_setzero_ps(); W];
            for w in 0..W {
                bv[w] = _mm512_loadu_ps(bk.add(w * LANES));
            }
            let ak = a.add(k * acs);
            for i in 0..M {
                let av = _mm512_set1_ps(*ak.add(i * ars));
                for w in 0..W {
                    acc[i][w] = _mm512_fmadd_ps(av, bv[w], acc[i][w]);
                }
            }
        }
        for i in 0..M {
            for w in 0..W {
                _mm512_storeu_ps(c.add(i * crs + w * LANES), acc[i][w]);
            }
        }
    }
}

/// [`tile`] for `m` (1..=MR) rows of `w` (1..=NV) vectors; `wide`: on AVX-512 registers.
///
/// SAFETY: as [`tile`]; `wide` only where the CPU has AVX-512F.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_mw(
    wide: bool,
    m: usize,
    w: usize,
    kd: usize,
    a: *const f32,
    ars: usize,
    acs: usize,
    b: *const f32,
    brs: usize,
    c: *mut f32,
    crs: usize,
    acc: bool,
) {
    macro_rules! one {
        ($m:literal, $w:literal) => {{
            #[cfg(target_arch = "x86_64")]
            if wide {
                return x86::tile::<$m, $w>(kd, a, ars, acs, b, brs, c, crs, acc);
            }
            tile::<$m, $w>(kd, a, ars, acs, b, brs, c, crs, acc)
        }};
    }
    macro_rules! widths {
        ($m:literal) => {
            match w {
                1 => one!($m, 1),
                2 => one!($m, 2),
                3 => one!($m, 3),
                _ => one!($m, 4),
            }
        };
    }
    match m {
        1 => widths!(1),
        2 => widths!(2),
        3 => widths!(3),
        4 => widths!(4),
        5 => widths!(5),
        _ => widths!(6),
    }
}

/// `m` rows (<= MR) of `c[.., 0..n] (+)= a @ b` with n a multiple of 16, in 64-column tiles.
///
/// SAFETY: as [`tile`], for every column below `n`; `wide` only where the CPU has AVX-512F.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn rows(
    wide: bool,
    m: usize,
    n: usize,
    kd: usize,
    a: *const f32,
    ars: usize,
    acs: usize,
    b: *const f32,
    brs: usize,
    c: *mut f32,
    crs: usize,
    acc: bool,
) {
    for j in (0..n).step_by(NV * LANES) {
        let w = ((n - j) / LANES).min(NV);
        tile_mw(wide, m, w, kd, a, ars, acs, b.add(j), brs, c.add(j), crs, acc);
    }
}

/// Whether the tiles run on AVX-512 registers (the CPU has it and `TUNEX_SIMD` allows it).
fn wide_tiles() -> bool {
    #[cfg(target_arch = "x86_64")]
    return crate::simd::has_avx512();
    #[allow(unreachable_code)]
    false
}

// ---- row helpers (16 lanes, one fixed pairing) ----

/// The largest value of a row (a NaN never wins a comparison: its exponential makes the row NaN).
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
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
fn exp_row(row: &mut [f32], n: usize, scale: f32, shift: f32) -> f32 {
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
fn dot(x: &[f32], y: &[f32]) -> f32 {
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
fn tanh_f32(x: f32) -> f32 {
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
fn cap_row(row: &mut [f32], scale: f32, cap: f32, grad: Option<&mut [f32]>) {
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

// ---- packing: K^T and V^T per (batch, key head), (D, padded T) ----

multiversion512! {
    /// Head (b, h) of `x` transposed into `o`: (D, padded T), zeros past T.
    fn transpose_head(x: Input<'_>, d: Dims, b: usize, h: usize, o: &mut [f32]) {
        let (t, tp) = (d.seq, d.padded());
        for (k, row) in o.chunks_exact_mut(tp).enumerate() {
            let (live, pad) = row.split_at_mut(t);
            for (i, v) in live.iter_mut().enumerate() {
                *v = x.data[at(x.strides, b, h, i) + k];
            }
            pad.fill(0.0);
        }
    }
}

fn pack_transposed(x: &Input<'_>, d: &Dims, out: &mut [f32]) -> Result<()> {
    let block = d.dim * d.padded();
    let dst = Shared::new(out);
    let ok = omp::run(d.batch * d.kv_heads, &|part| {
        // SAFETY: part `part` owns its (D, padded T) block.
        let o = unsafe { dst.range(part * block, (part + 1) * block) };
        transpose_head(*x, *d, part / d.kv_heads, part % d.kv_heads, o);
    });
    ok.then_some(()).ok_or_else(|| bad("a part of the packing panicked".into()))
}

// ---- forward ----

multiversion512! {
    #[allow(clippy::too_many_arguments)]
    fn forward_head(q: Input<'_>, kt: &[f32], v: Input<'_>, out: &Shared, os: Strides, lse: &Shared, d: Dims,
                    b: usize, h: usize, scale: f32, window: usize, cap: Option<f32>) {
        let (t, dim, tp) = (d.seq, d.dim, d.padded());
        let kvh = h / d.group();
        let wide = wide_tiles();
        let mut s = vec![0f32; MR * tp];
        let mut o = vec![0f32; MR * dim];
        let mut l = [0f32; MR];
        let v0 = at(v.strides, b, kvh, 0);
        for i0 in (0..t).step_by(MR) {
            let m = MR.min(t - i0);
            let last = i0 + m; // columns the tile's last row sees
            // the first column the tile's first row sees, down to whole vectors: the tile's scores
            // cover columns c0..last, kept from column 0 of s (c0 = 0 without a window)
            let c0 = first_key(i0, window) / LANES * LANES;
            let q0 = at(q.strides, b, h, i0);
            // SAFETY: rows i0..last of q, columns c0..round16(last) <= tp of kt, rows of s.
            unsafe {
                rows(wide, m, last.div_ceil(LANES) * LANES - c0, dim, q.data[q0..].as_ptr(), q.strides.pos, 1,
                     kt.as_ptr().add(c0), tp, s.as_mut_ptr(), tp, false);
            }
            for r in 0..m {
                let i = i0 + r;
                let row = &mut s[r * tp..r * tp + last.max((i + 1).div_ceil(LANES) * LANES) - c0];
                let lo = first_key(i, window) - c0; // keys before it lie outside the window
                row[..lo].fill(0.0);
                let top = match cap {
                    None => {
                        let top = row_max(&row[lo..=i - c0]) * scale;
                        l[r] = exp_row(&mut row[lo..], i + 1 - c0 - lo, scale, top);
                        top
                    }
                    Some(c) => {
                        cap_row(&mut row[lo..=i - c0], scale, c, None);
                        let top = row_max(&row[lo..=i - c0]);
                        l[r] = exp_row(&mut row[lo..], i + 1 - c0 - lo, 1.0, top);
                        top
                    }
                };
                let li = (b * d.heads + h) * t + i;
                // SAFETY: lse element (b, h, i) belongs to this part.
                unsafe { lse.range(li, li + 1)[0] = top + l[r].ln() };
            }
            // SAFETY: rows c0..last of v (token stride), columns 0..dim; m rows of o.
            unsafe {
                rows(wide, m, dim, last - c0, s.as_ptr(), tp, 1, v.data[v0 + c0 * v.strides.pos..].as_ptr(),
                     v.strides.pos, o.as_mut_ptr(), dim, false);
            }
            for r in 0..m {
                let inv = 1.0 / l[r];
                let dst = at(os, b, h, i0 + r);
                // SAFETY: out's layout is dense (checked): row (b, h, i0 + r) is this part's alone.
                let row = unsafe { out.range(dst, dst + dim) };
                for (x, &y) in row.iter_mut().zip(&o[r * dim..(r + 1) * dim]) {
                    *x = y * inv;
                }
            }
        }
    }
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

/// `out` = causal attention of `q` over `k`, `v`; `lse` (B, H, T) contiguous gets each row's
/// log-sum-exp of the scaled scores (what [`backward`] needs besides the inputs and `out`).
/// `window`: a causal sliding window, query i seeing keys j with i - window < j <= i (cost
/// proportional to the window, not to T); None: all keys j <= i. `softcap`: Gemma 2's cap c, the
/// logits being `c tanh(scale q.k / c)` (`lse` is then their log-sum-exp); None: `scale q.k`.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    q: Input<'_>,
    k: Input<'_>,
    v: Input<'_>,
    out: Output<'_>,
    lse: &mut [f32],
    d: Dims,
    scale: f32,
    window: Option<usize>,
    softcap: Option<f32>,
) -> Result<()> {
    check_dims(&d)?;
    let window = window_keys(window)?;
    let cap = softcap_value(softcap)?;
    if d.batch == 0 || d.heads == 0 || d.seq == 0 {
        return Ok(());
    }
    check_forward(&q, &k, &v, &out, lse.len(), &d)?;
    let mut kt = vec![0f32; d.batch * d.kv_heads * d.dim * d.padded()];
    pack_transposed(&k, &d, &mut kt)?;
    let (os, dst, lse) = (out.strides, Shared::new(out.data), Shared::new(lse));
    let block = d.dim * d.padded();
    let ok = omp::run(d.batch * d.heads, &|part| {
        let (b, h) = (part / d.heads, part % d.heads);
        let kvh = h / d.group();
        let kt = &kt[(b * d.kv_heads + kvh) * block..][..block];
        forward_head(q, kt, v, &dst, os, &lse, d, b, h, scale, window, cap);
    });
    ok.then_some(()).ok_or_else(|| bad("a part of the forward panicked".into()))
}

// ---- backward ----

/// Everything one backward part reads.
#[derive(Clone, Copy)]
struct Saved<'a> {
    q: Input<'a>,
    k: Input<'a>,
    out: Input<'a>,
    dout: Input<'a>,
    lse: &'a [f32],
    kt: &'a [f32],
    vt: &'a [f32],
}

multiversion512! {
    #[allow(clippy::too_many_arguments)]
    fn backward_head(s: Saved<'_>, dq: &Shared, dqs: Strides, dk: &mut [f32], dv: &mut [f32], d: Dims, b: usize,
                     h: usize, scale: f32, window: usize, cap: Option<f32>) {
        let (t, dim, tp) = (d.seq, d.dim, d.padded());
        let kvh = h / d.group();
        let wide = wide_tiles();
        let (q, k, dout) = (s.q, s.k, s.dout);
        let lse = &s.lse[(b * d.heads + h) * t..][..t];
        let mut delta = vec![0f32; t];
        for (i, dl) in delta.iter_mut().enumerate() {
            *dl = dot(&dout.data[at(dout.strides, b, h, i)..][..dim], &s.out.data[at(s.out.strides, b, h, i)..][..dim]);
        }
        let mut p = vec![0f32; BLOCK * tp];
        let mut ds = vec![0f32; BLOCK * tp];
        // with a cap: one row's d logit / d score (1 - tanh^2) at the keys it sees; the other columns
        // hold an earlier row's (finite) values, multiplied by a zero P
        let mut slope = vec![0f32; if cap.is_some() { tp } else { 0 }];
        let (q0, k0, o0) = (at(q.strides, b, h, 0), at(k.strides, b, kvh, 0), at(dout.strides, b, h, 0));
        let (qp, kp, op) = (q.data[q0..].as_ptr(), k.data[k0..].as_ptr(), dout.data[o0..].as_ptr());
        let (qs, ks, dos) = (q.strides.pos, k.strides.pos, dout.strides.pos);
        for blk in (0..t).step_by(BLOCK) {
            let end = t.min(blk + BLOCK); // rows blk..end; they see columns first_key(blk)..end
            // the block's keys from the first its first row sees, down to a multiple of both MR and
            // the vector width (BLOCK is one): p and ds hold columns cb.. from their column 0
            let kb = first_key(blk, window);
            let cb = kb / BLOCK * BLOCK;
            for i0 in (blk..end).step_by(MR) {
                let m = MR.min(end - i0);
                let last = i0 + m;
                let c0 = first_key(i0, window) / LANES * LANES; // this tile's columns: c0..n
                let n = last.div_ceil(LANES) * LANES;
                let r0 = (i0 - blk) * tp + c0 - cb;
                // SAFETY (all four products): rows i0..last of q / dout / dq, columns c0..n <= tp of the
                // packed kt / vt, rows c0..last of k, and rows of this part's p / ds.
                unsafe {
                    rows(wide, m, n - c0, dim, qp.add(i0 * qs), qs, 1, s.kt.as_ptr().add(c0), tp, p.as_mut_ptr().add(r0),
                         tp, false);
                    rows(wide, m, n - c0, dim, op.add(i0 * dos), dos, 1, s.vt.as_ptr().add(c0), tp,
                         ds.as_mut_ptr().add(r0), tp, false);
                }
                for r in 0..m {
                    let i = i0 + r;
                    let row0 = (i0 - blk + r) * tp;
                    // the columns read below (up to end); exp_row zeroes those past the row's own
                    let width = end.max((i + 1).div_ceil(LANES) * LANES) - cb;
                    let pr = &mut p[row0..row0 + width];
                    let lo = first_key(i, window) - cb; // keys before it lie outside the window
                    pr[..lo].fill(0.0);
                    let dr = &mut ds[row0..row0 + width];
                    // P is zero outside the window and past the diagonal, so dS is too (dP there is
                    // finite: computed, or left from an earlier block)
                    match cap {
                        None => {
                            exp_row(&mut pr[lo..], i + 1 - cb - lo, scale, lse[i]);
                            for (g, &pv) in dr.iter_mut().zip(pr.iter()) {
                                *g = if pv == 0.0 { 0.0 } else { pv * (*g - delta[i]) * scale };
                            }
                        }
                        Some(c) => {
                            let sl = &mut slope[..width];
                            cap_row(&mut pr[lo..=i - cb], scale, c, Some(&mut sl[lo..=i - cb]));
                            exp_row(&mut pr[lo..], i + 1 - cb - lo, 1.0, lse[i]);
                            for ((g, &pv), &f) in dr.iter_mut().zip(pr.iter()).zip(sl.iter()) {
                                *g = if pv == 0.0 { 0.0 } else { pv * (*g - delta[i]) * scale * f };
                            }
                        }
                    }
                }
                let dst = at(dqs, b, h, i0);
                // SAFETY: dq's layout is dense (checked): its rows (b, h, i0..last) are this part's.
                unsafe {
                    rows(wide, m, dim, last - c0, ds.as_ptr().add(r0), tp, 1, kp.add(c0 * ks), ks, dq.ptr(dst), dqs.pos,
                         false);
                }
            }
            // dK[j] += sum_i dS[i, j] Q[i] and dV[j] += sum_i P[i, j] dO[i] over this block's rows
            // i >= j that see key j (i < j + window)
            for j0 in (kb / MR * MR..end).step_by(MR) {
                let m = MR.min(end - j0);
                let first = blk.max(j0);
                let stop = end.min((j0 + m - 1).saturating_add(window));
                let (a, kd) = ((first - blk) * tp + j0 - cb, stop - first);
                // SAFETY: columns j0..j0+m of rows first..stop of p / ds (zero outside the window and
                // above the diagonal), rows first..stop of q / dout, rows j0..j0+m of dk / dv.
                unsafe {
                    rows(wide, m, dim, kd, ds.as_ptr().add(a), 1, tp, qp.add(first * qs), qs, dk.as_mut_ptr().add(j0 * dim),
                         dim, true);
                    rows(wide, m, dim, kd, p.as_ptr().add(a), 1, tp, op.add(first * dos), dos, dv.as_mut_ptr().add(j0 * dim),
                         dim, true);
                }
            }
        }
    }
}

/// The gradients of [`forward`]: `dq` (B, H, T, D), `dk` and `dv` (B, Hkv, T, D), overwritten.
/// `out` and `lse` are what the forward wrote for the same `q`, `k`, `v`, `window` and `softcap`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
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
    scale: f32,
    window: Option<usize>,
    softcap: Option<f32>,
) -> Result<()> {
    check_dims(&d)?;
    let window = window_keys(window)?;
    let cap = softcap_value(softcap)?;
    if d.batch == 0 || d.heads == 0 || d.seq == 0 {
        return Ok(());
    }
    check_backward([&dout, &q, &k, &v, &out], lse.len(), [&dq, &dk, &dv], &d)?;
    let block = d.dim * d.padded();
    let mut kt = vec![0f32; d.batch * d.kv_heads * block];
    let mut vt = vec![0f32; d.batch * d.kv_heads * block];
    pack_transposed(&k, &d, &mut kt)?;
    pack_transposed(&v, &d, &mut vt)?;
    // each query head's dK and dV, (B, H, T, D): summed over its group below
    let head = d.seq * d.dim;
    let mut dkh = vec![0f32; d.batch * d.heads * head];
    let mut dvh = vec![0f32; d.batch * d.heads * head];
    let (dqs, dq) = (dq.strides, Shared::new(dq.data));
    let (dks, dvs) = (Shared::new(&mut dkh), Shared::new(&mut dvh));
    let ok = omp::run(d.batch * d.heads, &|part| {
        let (b, h) = (part / d.heads, part % d.heads);
        let kvh = h / d.group();
        let packed = (b * d.kv_heads + kvh) * block;
        let saved = Saved { q, k, out, dout, lse, kt: &kt[packed..][..block], vt: &vt[packed..][..block] };
        // SAFETY: part `part` owns head (b, h) of the per-head sums.
        let (dk, dv) =
            unsafe { (dks.range(part * head, (part + 1) * head), dvs.range(part * head, (part + 1) * head)) };
        backward_head(saved, &dq, dqs, dk, dv, d, b, h, scale, window, cap);
    });
    if !ok {
        return Err(bad("a part of the backward panicked".into()));
    }
    let group = d.group();
    for (sums, out) in [(&dkh, dk), (&dvh, dv)] {
        let (os, dst) = (out.strides, Shared::new(out.data));
        let ok = omp::run(d.batch * d.kv_heads, &|part| {
            let (b, kvh) = (part / d.kv_heads, part % d.kv_heads);
            let first = (b * d.heads + kvh * group) * head;
            for i in 0..d.seq {
                let o = at(os, b, kvh, i);
                // SAFETY: out's layout is dense (checked): row (b, kvh, i) is this part's alone.
                let row = unsafe { dst.range(o, o + d.dim) };
                row.copy_from_slice(&sums[first + i * d.dim..][..d.dim]);
                for g in 1..group {
                    for (x, &y) in row.iter_mut().zip(&sums[first + g * head + i * d.dim..][..d.dim]) {
                        *x += y;
                    }
                }
            }
        });
        if !ok {
            return Err(bad("a part of the gradient sum panicked".into()));
        }
    }
    Ok(())
}

// ---- packed batches: attention inside each document ----

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
    check_dims(&d)?;
    window_keys(window)?;
    softcap_value(softcap)?;
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
    check_dims(&d)?;
    window_keys(window)?;
    softcap_value(softcap)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, k: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * k % 97) as f32 - 48.0) / 40.0).collect()
    }

    fn dense(h: usize, t: usize, d: usize) -> Strides {
        Strides { batch: h * t * d, head: t * d, pos: d }
    }

    /// Plain f64 attention for one (b, h): (out, lse, dq, dk, dv) with dk, dv for this head only;
    /// query i sees keys j <= i, and with a window only those with i - j < window. With a cap c the
    /// logits are c tanh(s / c) of the scaled scores s, and dS picks up the factor 1 - tanh(s / c)^2.
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    fn reference(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        dout: &[f64],
        t: usize,
        d: usize,
        scale: f64,
        window: Option<usize>,
        cap: Option<f64>,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut p = vec![0f64; t * t];
        let mut slope = vec![1f64; t * t];
        let mut lse = vec![0f64; t];
        for i in 0..t {
            let seen: Vec<usize> = (0..=i).filter(|&j| window.is_none_or(|w| i - j < w)).collect();
            let mut s: Vec<f64> =
                seen.iter().map(|&j| (0..d).map(|x| q[i * d + x] * k[j * d + x]).sum::<f64>() * scale).collect();
            if let Some(c) = cap {
                for (&j, sj) in seen.iter().zip(s.iter_mut()) {
                    let th = (*sj / c).tanh();
                    slope[i * t + j] = 1.0 - th * th;
                    *sj = c * th;
                }
            }
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            lse[i] = m + z.ln();
            for (&j, &sj) in seen.iter().zip(&s) {
                p[i * t + j] = (sj - lse[i]).exp();
            }
        }
        let mm = |a: &dyn Fn(usize, usize) -> f64, b: &dyn Fn(usize, usize) -> f64, n: usize, kd: usize| -> Vec<f64> {
            let mut c = vec![0f64; n * d];
            for i in 0..n {
                for x in 0..d {
                    c[i * d + x] = (0..kd).map(|j| a(i, j) * b(j, x)).sum();
                }
            }
            c
        };
        let out = mm(&|i, j| p[i * t + j], &|j, x| v[j * d + x], t, t);
        let mut ds = vec![0f64; t * t];
        for i in 0..t {
            let delta: f64 = (0..d).map(|x| dout[i * d + x] * out[i * d + x]).sum();
            for j in 0..=i {
                let dp: f64 = (0..d).map(|x| dout[i * d + x] * v[j * d + x]).sum();
                ds[i * t + j] = p[i * t + j] * (dp - delta) * slope[i * t + j] * scale;
            }
        }
        let dq = mm(&|i, j| ds[i * t + j], &|j, x| k[j * d + x], t, t);
        let dk = mm(&|j, i| ds[i * t + j], &|i, x| q[i * d + x], t, t);
        let dv = mm(&|j, i| p[i * t + j], &|i, x| dout[i * d + x], t, t);
        (out, lse, dq, dk, dv)
    }

    fn close(got: f32, want: f64, what: &str) {
        assert!((got as f64 - want).abs() <= 2e-5 * (1.0 + want.abs()), "{what}: {got} vs {want}");
    }

    #[test]
    fn forward_and_backward_match_a_plain_f64_reference() {
        // grouped heads, a head dim of more than one tile width, T not a multiple of the tiles
        for (b, h, hkv, t, dim) in [(2, 4, 2, 53, 80), (1, 3, 3, 7, 16), (1, 2, 1, 1, 32), (1, 1, 1, 100, 64)] {
            check_against_reference(b, h, hkv, t, dim, None, None);
        }
    }

    #[test]
    fn sliding_windows_match_a_plain_f64_reference() {
        // windows of one key, inside a tile, across tiles, blocks and vector widths, and longer than T;
        // T past two backward blocks so a block's first key is not 0
        for window in [1, 2, 5, 16, 17, 47, 48, 49, 97, 200] {
            for (b, h, hkv, t, dim) in [(1, 2, 1, 150, 32), (2, 4, 2, 53, 80), (1, 1, 1, 7, 16), (1, 1, 1, 1, 16)] {
                check_against_reference(b, h, hkv, t, dim, Some(window), None);
            }
        }
    }

    #[test]
    fn soft_capped_scores_match_a_plain_f64_reference() {
        // caps that bite hard (below the scores), moderately, and hardly at all; with and without windows
        for cap in [0.3, 1.5, 50.0] {
            for (b, h, hkv, t, dim, window) in [
                (2, 4, 2, 53, 80, None),
                (1, 2, 1, 150, 32, Some(17)),
                (1, 1, 1, 7, 16, Some(2)),
                (1, 1, 1, 1, 16, None),
            ] {
                check_against_reference(b, h, hkv, t, dim, window, Some(cap));
            }
        }
    }

    #[test]
    fn tanh_matches_the_standard_library() {
        let mut worst = 0f64;
        for i in -40_000..=40_000 {
            let x = i as f32 * 5e-4;
            for y in [x, x * 1e-3, x * 40.0] {
                let want = (y as f64).tanh();
                worst = worst.max((tanh_f32(y) as f64 - want).abs() / want.abs().max(1e-30));
            }
        }
        assert!(worst < 4e-7, "largest relative error {worst}");
        assert_eq!(tanh_f32(1e30), 1.0);
        assert_eq!(tanh_f32(-1e30), -1.0);
        assert!(tanh_f32(f32::NAN).is_nan());
    }

    #[test]
    fn caps_that_are_not_positive_and_finite_are_errors_and_write_nothing() {
        let (s, x) = (dense(1, 2, 16), vec![1f32; 32]);
        let (mut out, mut lse) = (vec![0f32; 32], vec![0f32; 2]);
        let input = Input { data: &x, strides: s };
        let dims = Dims { batch: 1, heads: 1, kv_heads: 1, seq: 2, dim: 16 };
        for cap in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            let o = Output { data: &mut out, strides: s };
            let r = forward(input, input, input, o, &mut lse, dims, 0.25, None, Some(cap));
            assert!(matches!(&r, Err(Error::InvalidArgument(m)) if m.starts_with("attention: softcap")), "{r:?}");
            let docs = [Span { batch: 0, start: 0, len: 2 }];
            let o = Output { data: &mut out, strides: s };
            let r = forward_docs(input, input, input, o, &mut lse, dims, &docs, 0.25, None, Some(cap));
            assert!(matches!(&r, Err(Error::InvalidArgument(m)) if m.starts_with("attention: softcap")), "{r:?}");
        }
        assert!(out.iter().all(|&v| v == 0.0) && lse.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn a_window_of_no_keys_is_an_error() {
        let (s, x) = (dense(1, 2, 16), vec![1f32; 32]);
        let (mut out, mut lse) = (vec![0f32; 32], vec![0f32; 2]);
        let input = Input { data: &x, strides: s };
        let dims = Dims { batch: 1, heads: 1, kv_heads: 1, seq: 2, dim: 16 };
        let r =
            forward(input, input, input, Output { data: &mut out, strides: s }, &mut lse, dims, 0.25, Some(0), None);
        assert!(matches!(r, Err(Error::InvalidArgument(m)) if m.starts_with("attention: window 0")));
        assert!(out.iter().all(|&v| v == 0.0));
    }

    fn check_against_reference(
        b: usize,
        h: usize,
        hkv: usize,
        t: usize,
        dim: usize,
        window: Option<usize>,
        cap: Option<f32>,
    ) {
        {
            let dims = Dims { batch: b, heads: h, kv_heads: hkv, seq: t, dim };
            let scale = 1.0 / (dim as f32).sqrt();
            // q and dout in (B, T, H, D) order, as the training layer hands them over
            let bthd = Strides { batch: t * h * dim, head: dim, pos: h * dim };
            let (q, dout) = (values(b * h * t * dim, 7), values(b * h * t * dim, 13));
            let (k, v) = (values(b * hkv * t * dim, 11), values(b * hkv * t * dim, 5));
            let (kvs, qs) = (dense(hkv, t, dim), dense(h, t, dim));
            let mut out = vec![f32::NAN; q.len()];
            let mut lse = vec![f32::NAN; b * h * t];
            forward(
                Input { data: &q, strides: bthd },
                Input { data: &k, strides: kvs },
                Input { data: &v, strides: kvs },
                Output { data: &mut out, strides: bthd },
                &mut lse,
                dims,
                scale,
                window,
                cap,
            )
            .unwrap();
            let (mut dq, mut dk, mut dv) = (vec![f32::NAN; q.len()], vec![f32::NAN; k.len()], vec![f32::NAN; v.len()]);
            backward(
                Input { data: &dout, strides: bthd },
                Input { data: &q, strides: bthd },
                Input { data: &k, strides: kvs },
                Input { data: &v, strides: kvs },
                Input { data: &out, strides: bthd },
                &lse,
                Output { data: &mut dq, strides: qs },
                Output { data: &mut dk, strides: kvs },
                Output { data: &mut dv, strides: kvs },
                dims,
                scale,
                window,
                cap,
            )
            .unwrap();
            let mut dk_want = vec![0f64; k.len()];
            let mut dv_want = vec![0f64; v.len()];
            for bi in 0..b {
                for hi in 0..h {
                    let kvh = hi / (h / hkv);
                    let head = |x: &[f32], s: Strides, hh: usize| -> Vec<f64> {
                        (0..t).flat_map(|i| x[at(s, bi, hh, i)..][..dim].iter().map(|&y| y as f64)).collect()
                    };
                    let (o, l, gq, gk, gv) = reference(
                        &head(&q, bthd, hi),
                        &head(&k, kvs, kvh),
                        &head(&v, kvs, kvh),
                        &head(&dout, bthd, hi),
                        t,
                        dim,
                        scale as f64,
                        window,
                        cap.map(f64::from),
                    );
                    for i in 0..t {
                        close(lse[(bi * h + hi) * t + i], l[i], "lse");
                        for x in 0..dim {
                            close(out[at(bthd, bi, hi, i) + x], o[i * dim + x], "out");
                            close(dq[at(qs, bi, hi, i) + x], gq[i * dim + x], "dq");
                            dk_want[at(kvs, bi, kvh, i) + x] += gk[i * dim + x];
                            dv_want[at(kvs, bi, kvh, i) + x] += gv[i * dim + x];
                        }
                    }
                }
            }
            for (i, (&g, &w)) in dk.iter().zip(&dk_want).enumerate() {
                close(g, w, &format!("dk[{i}] of {b}x{h}x{hkv}x{t}x{dim}, window {window:?}, cap {cap:?}"));
            }
            for (i, (&g, &w)) in dv.iter().zip(&dv_want).enumerate() {
                close(g, w, &format!("dv[{i}] of {b}x{h}x{hkv}x{t}x{dim}, window {window:?}, cap {cap:?}"));
            }
        }
    }

    #[test]
    fn shapes_that_overflow_are_errors_not_wrapped() {
        let s = dense(1, 1, 16);
        let x = vec![1f32; 16];
        let (mut out, mut lse) = (vec![0f32; 16], vec![0f32; 1]);
        let call = |dims: Dims, qs: Strides, out: &mut [f32], lse: &mut [f32]| {
            let input = Input { data: &x, strides: qs };
            forward(input, input, input, Output { data: out, strides: s }, lse, dims, 0.25, None, None)
        };
        let message = |r: Result<()>| match r {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        };
        let one = Dims { batch: 1, heads: 1, kv_heads: 1, seq: 1, dim: 16 };
        // B x H x T x D = 2^62 x 2 x 16 x 16 wraps to 0
        let m = message(call(Dims { batch: 1 << 62, heads: 2, kv_heads: 1, ..one }, s, &mut out, &mut lse));
        assert!(m.starts_with("attention: shape B x H x T (padded) x D") && m.contains("does not fit"), "{m}");
        // a T whose padding to 16 overflows
        assert!(call(Dims { seq: usize::MAX - 3, ..one }, s, &mut out, &mut lse).is_err());
        // q's strides reach past usize::MAX
        let big = Dims { seq: 3, ..one };
        let m = message(call(big, Strides { pos: usize::MAX / 2 + 1, ..s }, &mut out, &mut lse));
        assert!(m.starts_with("attention: q holds 16 values") && m.contains("past the largest usize"), "{m}");
        assert!(out.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn bad_shapes_are_errors_and_write_nothing() {
        let s = dense(2, 4, 16);
        let x = vec![1f32; 128];
        let mut out = vec![0f32; 128];
        let mut lse = vec![0f32; 8];
        let dims = Dims { batch: 1, heads: 2, kv_heads: 1, seq: 4, dim: 16 };
        let kv = dense(1, 4, 16);
        let call = |dims: Dims, q: &[f32], out: &mut [f32], lse: &mut [f32]| {
            forward(
                Input { data: q, strides: s },
                Input { data: &x[..64], strides: kv },
                Input { data: &x[..64], strides: kv },
                Output { data: out, strides: s },
                lse,
                dims,
                0.25,
                None,
                None,
            )
        };
        assert!(call(Dims { dim: 12, ..dims }, &x, &mut out, &mut lse).is_err());
        assert!(call(Dims { kv_heads: 3, ..dims }, &x, &mut out, &mut lse).is_err());
        assert!(call(dims, &x[..127], &mut out, &mut lse).is_err());
        assert!(call(dims, &x, &mut out[..100], &mut lse).is_err());
        assert!(call(dims, &x, &mut out, &mut lse[..7]).is_err());
        assert!(out.iter().all(|&v| v == 0.0));
        call(dims, &x, &mut out, &mut lse).unwrap();
        assert!(out.iter().all(|&v| (v - 1.0).abs() < 1e-6));
    }

    #[test]
    fn documents_attend_inside_themselves_only() {
        // windows: of one key, shorter than some documents, longer than all; with and without a cap
        for window in [None, Some(1), Some(4), Some(30)] {
            for cap in [None, Some(0.7)] {
                documents_match_the_reference(window, cap);
            }
        }
    }

    fn documents_match_the_reference(window: Option<usize>, cap: Option<f32>) {
        let (b, h, hkv, t, dim) = (2, 2, 1, 23, 16);
        let dims = Dims { batch: b, heads: h, kv_heads: hkv, seq: t, dim };
        let docs =
            [(0, 0, 1), (0, 1, 9), (0, 10, 13), (1, 0, 23)].map(|(batch, start, len)| Span { batch, start, len });
        let scale = 0.25;
        let (qs, kvs) = (dense(h, t, dim), dense(hkv, t, dim));
        let (q, dout) = (values(b * h * t * dim, 7), values(b * h * t * dim, 13));
        let (k, v) = (values(b * hkv * t * dim, 11), values(b * hkv * t * dim, 5));
        let mut out = vec![f32::NAN; q.len()];
        let mut lse = vec![f32::NAN; b * h * t];
        fn input(x: &[f32], s: Strides) -> Input<'_> {
            Input { data: x, strides: s }
        }
        forward_docs(
            input(&q, qs),
            input(&k, kvs),
            input(&v, kvs),
            Output { data: &mut out, strides: qs },
            &mut lse,
            dims,
            &docs,
            scale,
            window,
            cap,
        )
        .unwrap();
        let (mut dq, mut dk, mut dv) = (vec![f32::NAN; q.len()], vec![f32::NAN; k.len()], vec![f32::NAN; v.len()]);
        backward_docs(
            input(&dout, qs),
            input(&q, qs),
            input(&k, kvs),
            input(&v, kvs),
            input(&out, qs),
            &lse,
            Output { data: &mut dq, strides: qs },
            Output { data: &mut dk, strides: kvs },
            Output { data: &mut dv, strides: kvs },
            dims,
            &docs,
            scale,
            window,
            cap,
        )
        .unwrap();
        let mut done = 0;
        for doc in &docs {
            let (bi, n) = (doc.batch, doc.len);
            let (mut dk_want, mut dv_want) = (vec![0f64; n * dim], vec![0f64; n * dim]);
            for hi in 0..h {
                let head = |x: &[f32], s: Strides, hh: usize| -> Vec<f64> {
                    (0..n).flat_map(|i| x[at(s, bi, hh, doc.start + i)..][..dim].iter().map(|&y| y as f64)).collect()
                };
                let (o, l, gq, gk, gv) = reference(
                    &head(&q, qs, hi),
                    &head(&k, kvs, 0),
                    &head(&v, kvs, 0),
                    &head(&dout, qs, hi),
                    n,
                    dim,
                    0.25,
                    window,
                    cap.map(f64::from),
                );
                for i in 0..n {
                    close(lse[done + hi * n + i], l[i], "lse");
                    for x in 0..dim {
                        close(out[at(qs, bi, hi, doc.start + i) + x], o[i * dim + x], "out");
                        close(dq[at(qs, bi, hi, doc.start + i) + x], gq[i * dim + x], "dq");
                        dk_want[i * dim + x] += gk[i * dim + x];
                        dv_want[i * dim + x] += gv[i * dim + x];
                    }
                }
            }
            for i in 0..n * dim {
                close(dk[at(kvs, bi, 0, doc.start) + i], dk_want[i], "dk");
                close(dv[at(kvs, bi, 0, doc.start) + i], dv_want[i], "dv");
            }
            done += h * n;
        }
    }

    #[test]
    fn documents_that_do_not_tile_the_rows_are_errors_and_write_nothing() {
        let dims = Dims { batch: 1, heads: 1, kv_heads: 1, seq: 4, dim: 16 };
        let s = dense(1, 4, 16);
        let x = vec![1f32; 64];
        let (mut out, mut lse) = (vec![0f32; 64], vec![0f32; 4]);
        for docs in [
            vec![(0, 0, 3)],            // short of the row
            vec![(0, 0, 2), (0, 3, 1)], // a gap
            vec![(0, 0, 2), (0, 1, 3)], // an overlap
            vec![(0, 0, 0), (0, 0, 4)], // an empty document
            vec![(0, 0, 4), (1, 0, 4)], // a row that is not there
            vec![(0, 2, usize::MAX)],   // start + length overflows
        ] {
            let docs: Vec<Span> = docs.into_iter().map(|(batch, start, len)| Span { batch, start, len }).collect();
            let input = Input { data: &x, strides: s };
            let r = forward_docs(
                input,
                input,
                input,
                Output { data: &mut out, strides: s },
                &mut lse,
                dims,
                &docs,
                0.25,
                None,
                None,
            );
            let m = match r {
                Err(Error::InvalidArgument(m)) => m,
                other => panic!("expected an error for {docs:?}, got {other:?}"),
            };
            assert!(m.starts_with("attention: ") && m.contains("tile"), "{m}");
        }
        assert!(out.iter().all(|&v| v == 0.0) && lse.iter().all(|&v| v == 0.0));
    }
}
