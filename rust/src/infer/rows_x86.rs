//! The GEMV ([`super::gemv_rows_f32`], one input row or several) with AVX-512 registers written
//! out: a tile of `R` weight rows by `C` input rows keeps its `R * C` accumulators in registers,
//! where the portable tile (`super::dot_tile`) spills or is not vectorized for shapes past 2 x 3.
//! Serving decodes up to 16 sequences per step, so this product is most of a step; decoding one
//! sequence runs it with one input row.
//!
//! The bits are [`super::dot`]'s for every output: lane `j` of 32 sums `w[k + j] * x[k + j]` over
//! the chunks `k` in order, as a multiply then an add (no fused multiply-add), lanes `0..16` in a
//! first pass and `16..32` in a second (one register per output per pass; a tile of one input
//! keeps both halves' registers in one pass, [`pass_one`]); then the same pairwise
//! reduction (`j += j + 16`, `+ 8`, `+ 4`, `+ 2`, `+ 1`, done on registers), the tail's products in
//! order, and the bias. A test compares every output with `gemv_f32`'s for its row alone.

use std::arch::x86_64::*;

/// Weight rows per tile.
const ROWS: usize = 4;
/// Input rows per tile: with [`ROWS`], 24 accumulators and 4 weight registers of the 32.
const INPUTS: usize = 6;

/// `acc` (lanes `0..16`) plus `hi` (lanes `16..32`) reduced pairwise as [`super::finish`] does,
/// then the tail's products added in order.
///
/// # Safety
/// The CPU has AVX-512F.
#[inline(always)]
unsafe fn reduce(acc: __m512, hi: __m512, w_tail: &[f32], x_tail: &[f32]) -> f32 {
    let s = _mm512_add_ps(acc, hi);
    let lo8 = _mm512_castps512_ps256(s);
    let hi8 = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s)));
    let s8 = _mm256_add_ps(lo8, hi8);
    let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2));
    let mut sum = _mm_cvtss_f32(s1);
    for (a, b) in w_tail.iter().zip(x_tail) {
        sum += a * b;
    }
    sum
}

/// One pass of a tile: lanes `h..h + 16` of every output's 32, summed over the chunks below `main`.
///
/// # Safety
/// The CPU has AVX-512F; each pointer starts a row of at least `main` floats (a multiple of 32).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn pass<const R: usize, const C: usize>(
    wp: &[*const f32; R],
    xp: &[*const f32; C],
    h: usize,
    main: usize,
    next: Option<&[*const f32; R]>,
) -> [[__m512; C]; R] {
    let zero = _mm512_setzero_ps();
    let mut acc = [[zero; C]; R];
    let mut k = h;
    while k < main {
        let mut ws = [zero; R];
        for a in 0..R {
            // SAFETY: 16 floats at an offset below `main` from a row's start.
            ws[a] = unsafe { _mm512_loadu_ps(wp[a].add(k)) };
        }
        if let Some(next) = next {
            for p in next {
                // a hint only: it reads nothing, and the addresses stay inside the weight
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(k - h).cast());
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(k - h + 16).cast());
            }
        }
        for l in 0..C {
            // SAFETY: as above.
            let xv = unsafe { _mm512_loadu_ps(xp[l].add(k)) };
            for a in 0..R {
                acc[a][l] = _mm512_add_ps(acc[a][l], _mm512_mul_ps(ws[a], xv));
            }
        }
        k += 32;
    }
    acc
}

/// [`pass`] for a tile of one input, both halves at once: lanes `0..16` and `16..32` of each
/// 32-value chunk in their own registers, so each weight row streams through once, in order (two
/// half passes left a one-input product at about half of what a core reads from cache). The same
/// sums in the same order as the two passes.
///
/// # Safety
/// As [`pass`].
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn pass_one<const R: usize>(
    wp: &[*const f32; R],
    xp: *const f32,
    main: usize,
    next: Option<&[*const f32; R]>,
) -> ([__m512; R], [__m512; R]) {
    let zero = _mm512_setzero_ps();
    let (mut low, mut high) = ([zero; R], [zero; R]);
    let mut k = 0;
    while k < main {
        // SAFETY: 32 floats at an offset below `main` from the input's start.
        let (xl, xh) = unsafe { (_mm512_loadu_ps(xp.add(k)), _mm512_loadu_ps(xp.add(k + 16))) };
        if let Some(next) = next {
            for p in next {
                // a hint only, as in `pass`
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(k).cast());
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(k + 16).cast());
            }
        }
        for a in 0..R {
            // SAFETY: as above, for a weight row.
            let (wl, wh) = unsafe { (_mm512_loadu_ps(wp[a].add(k)), _mm512_loadu_ps(wp[a].add(k + 16))) };
            low[a] = _mm512_add_ps(low[a], _mm512_mul_ps(wl, xl));
            high[a] = _mm512_add_ps(high[a], _mm512_mul_ps(wh, xh));
        }
        k += 32;
    }
    (low, high)
}

/// What every tile of one product reads: the weight (rows of `cols`), the inputs (rows of `cols`),
/// the bias, and the distance between two inputs' outputs in `y`.
struct Operands<'a> {
    w: &'a [f32],
    x: &'a [f32],
    cols: usize,
    bias: Option<&'a [f32]>,
    stride: usize,
}

/// The outputs of weight rows `r..r + R` for inputs `i..i + C` into `y[(i + l) * stride + r + k]`.
///
/// # Safety
/// The CPU has AVX-512F; `o.w` holds rows `r..r + R` and `o.x` rows `i..i + C`.
#[inline(always)]
unsafe fn tile<const R: usize, const C: usize>(o: &Operands<'_>, y: &mut [f32], r: usize, i: usize) {
    let (w, x, cols) = (o.w, o.x, o.cols);
    let main = cols - cols % 32;
    let mut wp = [w.as_ptr(); R];
    for (a, p) in wp.iter_mut().enumerate() {
        *p = w[(r + a) * cols..].as_ptr();
    }
    let mut xp = [x.as_ptr(); C];
    for (l, p) in xp.iter_mut().enumerate() {
        *p = x[(i + l) * cols..].as_ptr();
    }
    // the first tile of a strip asks for the weights two strips on, which it will reach after
    // this strip's other tiles (the hardware's own prefetch lags behind the tiles' eight streams)
    let next = (i == 0 && (r + 3 * R) * cols <= w.len()).then(|| {
        let mut p = wp;
        for q in p.iter_mut() {
            *q = q.wrapping_add(2 * R * cols);
        }
        p
    });
    let (low, high) = if C == 1 {
        // SAFETY: AVX-512F and the rows, as the caller vouches.
        let (lo, hi) = unsafe { pass_one::<R>(&wp, xp[0], main, next.as_ref()) };
        let zero = _mm512_setzero_ps();
        let (mut low, mut high) = ([[zero; C]; R], [[zero; C]; R]);
        for a in 0..R {
            (low[a][0], high[a][0]) = (lo[a], hi[a]);
        }
        (low, high)
    } else {
        // SAFETY: AVX-512F and the rows, as the caller vouches.
        unsafe { (pass::<R, C>(&wp, &xp, 0, main, next.as_ref()), pass::<R, C>(&wp, &xp, 16, main, None)) }
    };
    for a in 0..R {
        let w_tail = &w[(r + a) * cols + main..(r + a + 1) * cols];
        let b = o.bias.map_or(0.0, |b| b[r + a]);
        for l in 0..C {
            let x_tail = &x[(i + l) * cols + main..(i + l + 1) * cols];
            // SAFETY: AVX-512F, as the caller vouches.
            y[(i + l) * o.stride + r + a] = unsafe { reduce(low[a][l], high[a][l], w_tail, x_tail) } + b;
        }
    }
}

/// One strip of `R` weight rows starting at `r` against all inputs, in `tiles` tiles of as equal
/// widths as can be (at most `C`: the widest tile the caller chose `R` for).
///
/// # Safety
/// As [`tile`].
#[inline(always)]
unsafe fn strip<const R: usize, const C: usize>(o: &Operands<'_>, y: &mut [f32], r: usize, tiles: usize) {
    let n = o.x.len() / o.cols;
    let mut i = 0;
    for t in 0..tiles {
        let width = ((n - i) / (tiles - t)).min(C);
        // SAFETY (all calls): the tile covers input rows `i..i + width`, below `n`, and the strip.
        match width {
            6 => unsafe { tile::<R, 6>(o, y, r, i) },
            5 => unsafe { tile::<R, 5>(o, y, r, i) },
            4 => unsafe { tile::<R, 4>(o, y, r, i) },
            3 => unsafe { tile::<R, 3>(o, y, r, i) },
            2 => unsafe { tile::<R, 2>(o, y, r, i) },
            1 => unsafe { tile::<R, 1>(o, y, r, i) },
            _ => {}
        }
        i += width;
    }
}

/// All weight rows in strips of `R` (the last rows one by one) against the inputs in `tiles` tiles.
///
/// # Safety
/// As [`tile`].
#[inline(always)]
unsafe fn strips<const R: usize, const C: usize>(o: &Operands<'_>, y: &mut [f32], tiles: usize) {
    let rows = o.w.len() / o.cols;
    let mut r = 0;
    // SAFETY (all calls): the strips cover weight rows below `rows`.
    while r + R <= rows {
        unsafe { strip::<R, C>(o, y, r, tiles) };
        r += R;
    }
    while r < rows {
        unsafe { strip::<1, C>(o, y, r, tiles) };
        r += 1;
    }
}

/// `y[i * stride + r] = dot(w[r, :], x[i, :]) (+ bias[r])` for every weight row `r` and input row
/// `i`: the inputs in the fewest tiles of at most [`INPUTS`], widths as equal as can be, and as
/// many weight rows per tile as the registers hold for that width (narrow tiles take more rows,
/// so each loaded input serves more of them). Each weight row is read from memory once.
///
/// # Safety
/// The CPU has every feature enabled here (`crate::simd::has_avx512` checks them all).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
pub(super) unsafe fn rows_dot_avx512(
    w: &[f32],
    x: &[f32],
    cols: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    stride: usize,
) {
    let n = x.len() / cols;
    let tiles = n.div_ceil(INPUTS);
    let o = Operands { w, x, cols, bias, stride };
    // SAFETY (all calls): AVX-512 as vouched; the strips stay inside `w`, `x` and `y`.
    match n.div_ceil(tiles) {
        1 | 2 => unsafe { strips::<8, 2>(&o, y, tiles) },
        3 => unsafe { strips::<6, 3>(&o, y, tiles) },
        _ => unsafe { strips::<ROWS, INPUTS>(&o, y, tiles) },
    }
}
