//! Inference kernels for decoding on the CPU: one token at a time, so every linear layer is a
//! matrix-vector product that reads each weight once. torch runs those on one core at about half
//! the memory bandwidth; these split the rows across the decode pool ([`pool`]) and stream them
//! with wide accumulators, so the cores together approach the bandwidth.

use crate::error::{Error, Result};
use crate::simd::{multiversion, multiversion512};

pub mod pool;
#[cfg(target_arch = "x86_64")]
mod rows_x86;

/// Lanes summed independently: 4 AVX2 registers, so the adds do not wait on each other.
const LANES: usize = 32;

/// `dot(row, x)` summed in `LANES` independent lanes, reduced pairwise, then the tail: every
/// product of [`rows_dot`] adds in this one order, whatever the number of input rows, so a token's
/// outputs do not depend on what it is batched with. The tests' oracle: the kernels below keep
/// its order in register tiles.
#[cfg(any(test, doc))] // the docs of the kernels below link to it
fn dot(row: &[f32], x: &[f32]) -> f32 {
    let main = x.len() - x.len() % LANES;
    let mut acc = [0f32; LANES];
    for (chunk, xs) in row[..main].chunks_exact(LANES).zip(x[..main].chunks_exact(LANES)) {
        for j in 0..LANES {
            acc[j] += chunk[j] * xs[j];
        }
    }
    finish(&mut acc, &row[main..], &x[main..])
}

/// The end of [`dot`] (and of each output of [`dot_tile`]): the lanes reduced pairwise, then the
/// tail's products added in order.
#[inline(always)]
fn finish(acc: &mut [f32; LANES], row_tail: &[f32], x_tail: &[f32]) -> f32 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for j in 0..width {
            acc[j] += acc[j + width];
        }
    }
    let mut s = acc[0];
    for (a, b) in row_tail.iter().zip(x_tail) {
        s += a * b;
    }
    s
}

/// Half of [`LANES`]: a tile sums lanes `0..HALF` over all chunks, then lanes `HALF..LANES`, so
/// its accumulators fit in the registers (each lane's sum does not depend on the others').
const HALF: usize = LANES / 2;

/// `out[r][i] = dot(w[r], x[i]) + bias[r]` for a tile of `R` weight rows and `C` inputs (`cols`
/// columns each): each loaded weight chunk serves `C` inputs and each input chunk `R` rows, while
/// every output adds in exactly [`dot`]'s order (its lane `j` sums `chunk[j] * x[j]` over the
/// chunks in order, the same pairwise reduction, then the tail), so its bits are [`dot`]'s.
#[inline(always)]
fn dot_tile<const R: usize, const C: usize>(w: [&[f32]; R], x: [&[f32]; C], bias: [f32; R]) -> [[f32; C]; R] {
    let cols = x[0].len();
    let main = cols - cols % LANES;
    let mut acc = [[[0f32; LANES]; C]; R];
    for h in [0, HALF] {
        let mut part = [[[0f32; HALF]; C]; R];
        let mut k = h;
        while k < main {
            let ws: [&[f32; HALF]; R] = std::array::from_fn(|r| w[r][k..k + HALF].try_into().unwrap());
            let xs: [&[f32; HALF]; C] = std::array::from_fn(|i| x[i][k..k + HALF].try_into().unwrap());
            for r in 0..R {
                for i in 0..C {
                    for j in 0..HALF {
                        part[r][i][j] += ws[r][j] * xs[i][j];
                    }
                }
            }
            k += LANES;
        }
        for r in 0..R {
            for i in 0..C {
                acc[r][i][h..h + HALF].copy_from_slice(&part[r][i]);
            }
        }
    }
    let mut out = [[0f32; C]; R];
    for r in 0..R {
        for i in 0..C {
            out[r][i] = finish(&mut acc[r][i], &w[r][main..], &x[i][main..]) + bias[r];
        }
    }
    out
}

/// Inputs per tile of [`rows_dot`] (with 2 weight rows: 12 of the 16 AVX2 registers accumulate).
const TILE_INPUTS: usize = 3;

/// [`dot_tile`] for `R` weight rows starting at `r` and the `C` inputs starting at `i`, written out.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows_tile<const R: usize, const C: usize>(
    w: &[f32],
    x: &[f32],
    cols: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    stride: usize,
    r: usize,
    i: usize,
) {
    let ws: [&[f32]; R] = std::array::from_fn(|k| &w[(r + k) * cols..(r + k + 1) * cols]);
    let xs: [&[f32]; C] = std::array::from_fn(|k| &x[(i + k) * cols..(i + k + 1) * cols]);
    let bs: [f32; R] = std::array::from_fn(|k| bias.map_or(0.0, |b| b[r + k]));
    let out = dot_tile::<R, C>(ws, xs, bs);
    for (k, o) in out.iter().enumerate() {
        for (l, v) in o.iter().enumerate() {
            y[(i + l) * stride + r + k] = *v;
        }
    }
}

/// One strip of `R` weight rows starting at `r` against all `n` inputs, `TILE_INPUTS` at a time.
#[inline(always)]
fn rows_strip<const R: usize>(
    w: &[f32],
    x: &[f32],
    cols: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    stride: usize,
    r: usize,
) {
    let n = x.len() / cols;
    let mut i = 0;
    while i + TILE_INPUTS <= n {
        rows_tile::<R, TILE_INPUTS>(w, x, cols, bias, y, stride, r, i);
        i += TILE_INPUTS;
    }
    match n - i {
        2 => rows_tile::<R, 2>(w, x, cols, bias, y, stride, r, i),
        1 => rows_tile::<R, 1>(w, x, cols, bias, y, stride, r, i),
        _ => {}
    }
}

multiversion512! {
    /// [`rows_dot`] for several inputs, in tiles of 2 rows by [`TILE_INPUTS`] inputs: what CPUs
    /// without AVX-512 run (those with it take `rows_x86`'s register tiles; the tests run both,
    /// and this one's AVX-512 build, against the one-row dot).
    fn rows_dot_tiled(w: &[f32], x: &[f32], cols: usize, bias: Option<&[f32]>, y: &mut [f32], stride: usize) {
        let rows = w.len() / cols;
        let mut r = 0;
        while r + 2 <= rows {
            rows_strip::<2>(w, x, cols, bias, y, stride, r);
            r += 2;
        }
        if r < rows {
            rows_strip::<1>(w, x, cols, bias, y, stride, r);
        }
    }
}

/// `y[i * stride + r] = dot(w[r, :], x[i, :]) (+ bias[r])` for the rows `r` of `w` (row-major,
/// `cols` columns) and the `n = x.len() / cols` rows `i` of `x`; each weight row is read from
/// memory once for all of `x`'s rows.
fn rows_dot(w: &[f32], x: &[f32], cols: usize, bias: Option<&[f32]>, y: &mut [f32], stride: usize) {
    // one input too: rustc 1.95 vectorized a one-input loop over `dot` two lanes wide (64-bit
    // loads); on one thread the register tiles ran 1.6-2.4x faster than it, the portable tiles
    // 1.1-1.2x
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx512() {
        // SAFETY: the CPU has the kernel's features.
        unsafe { rows_x86::rows_dot_avx512(w, x, cols, bias, y, stride) };
        return;
    }
    rows_dot_tiled(w, x, cols, bias, y, stride);
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
    gemv_rows_f32(x, 1, batch)
}

/// [`gemv_f32`] for `n` inputs at once (`x` holds `n` row-major rows; each product's `y` holds `n`
/// rows of outputs): each weight is read once for all of them (decoding several sequences in one
/// step), and every output is bit for bit what [`gemv_f32`] gives for its input row alone.
pub fn gemv_rows_f32(x: &[f32], n: usize, batch: &mut [Gemv<'_>]) -> Result<()> {
    if n == 0 || !x.len().is_multiple_of(n) {
        return Err(Error::InvalidArgument(format!(
            "gemv: an input of {} values does not hold {n} whole rows (expected a positive row count that divides it)",
            x.len()
        )));
    }
    let cols = x.len() / n;
    for (i, g) in batch.iter().enumerate() {
        if !g.y.len().is_multiple_of(n) {
            return Err(Error::InvalidArgument(format!(
                "gemv: output {i} has {} values, expected {n} rows of the same length",
                g.y.len()
            )));
        }
        let rows = g.y.len() / n;
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
    let rows: usize = batch.iter().map(|g| g.y.len() / n).sum();
    if cols == 0 {
        for g in batch.iter_mut() {
            let out_rows = g.y.len() / n;
            g.y.iter_mut().enumerate().for_each(|(r, o)| *o = g.bias.map_or(0.0, |b| b[r % out_rows]));
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
            let out_rows = g.y.len() / n;
            rows_dot(g.w, x, cols, g.bias, g.y, out_rows);
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
                let m = g.y.len() / n;
                let item = (first, m, g.w, g.bias, SendPtr(g.y.as_mut_ptr()));
                first += m;
                item
            })
            .collect()
    };
    let ok = pool::run(parts, &|p| {
        let (lo, hi) = (p * rows / parts, (p + 1) * rows / parts);
        let mut staged = Vec::new();
        for &(first, m, w, bias, ref y) in &outs {
            let (a, b) = (lo.max(first), hi.min(first + m));
            if a >= b {
                continue;
            }
            let (a, b) = (a - first, b - first);
            let (w, bias) = (&w[a * cols..b * cols], bias.map(|v| &v[a..b]));
            if n == 1 {
                // SAFETY: parts cover disjoint row ranges, each within this output's `m` rows, and
                // the outputs outlive `pool::run`, which returns only after every part finished.
                let out = unsafe { std::slice::from_raw_parts_mut(y.0.add(a), b - a) };
                rows_dot(w, x, cols, bias, out, b - a);
            } else {
                // the part's columns of each output row are strided: computed here, then copied
                staged.clear();
                staged.resize(n * (b - a), 0.0);
                rows_dot(w, x, cols, bias, &mut staged, b - a);
                for (i, src) in staged.chunks_exact(b - a).enumerate() {
                    // SAFETY: as above; row i's columns [a, b) lie inside its `m` values.
                    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), y.0.add(i * m + a), b - a) };
                }
            }
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
    fn several_rows_give_each_row_its_own_bits() {
        for &(rows, cols, n) in &[(7, 33, 3), (576, 576, 16), (4099, 513, 5), (64, 64, 1), (3, 0, 2), (130, 1537, 2)] {
            let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
            let x: Vec<f32> = (0..n * cols).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
            let b: Vec<f32> = (0..rows).map(|i| i as f32 / 3.0).collect();
            let w2 = vec![0.25f32; 5 * cols];
            let mut y = vec![f32::NAN; n * rows];
            let mut y2 = vec![f32::NAN; n * 5];
            let mut batch = [Gemv { w: &w, bias: Some(&b), y: &mut y }, Gemv { w: &w2, bias: None, y: &mut y2 }];
            gemv_rows_f32(&x, n, &mut batch).unwrap();
            for i in 0..n {
                let mut one = vec![f32::NAN; rows];
                let mut one2 = vec![f32::NAN; 5];
                let xi = &x[i * cols..(i + 1) * cols];
                gemv_f32(
                    xi,
                    &mut [Gemv { w: &w, bias: Some(&b), y: &mut one }, Gemv { w: &w2, bias: None, y: &mut one2 }],
                )
                .unwrap();
                let got: Vec<u32> = y[i * rows..(i + 1) * rows].iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{rows}x{cols}, row {i} of {n}");
                let got2: Vec<u32> = y2[i * 5..(i + 1) * 5].iter().map(|v| v.to_bits()).collect();
                assert_eq!(got2, one2.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            }
        }
        let mut y = vec![0.0; 6];
        assert!(gemv_rows_f32(&[0.0; 5], 2, &mut [Gemv { w: &[0.0; 6], bias: None, y: &mut y }]).is_err());
        assert!(gemv_rows_f32(&[0.0; 4], 0, &mut [Gemv { w: &[0.0; 6], bias: None, y: &mut y }]).is_err());
        assert!(gemv_rows_f32(&[0.0; 4], 2, &mut [Gemv { w: &[0.0; 6], bias: None, y: &mut y[..5] }]).is_err());
    }

    /// A small xorshift generator: values in [-2, 2) with varied exponents, so sums round.
    fn random(state: &mut u64, len: usize) -> Vec<f32> {
        (0..len)
            .map(|_| {
                *state ^= *state << 13;
                *state ^= *state >> 7;
                *state ^= *state << 17;
                (*state >> 40) as f32 / (1u64 << 22) as f32 - 2.0
            })
            .collect()
    }

    #[test]
    fn tiled_rows_equal_the_one_row_dot_bitwise() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for rows in 1..=9 {
            for &cols in &[1, 5, 31, 32, 33, 64, 95, 130, 577] {
                for n in 1..=17 {
                    let w = random(&mut state, rows * cols);
                    let x = random(&mut state, n * cols);
                    let b = random(&mut state, rows);
                    for bias in [None, Some(b.as_slice())] {
                        let mut y = vec![f32::NAN; n * rows];
                        gemv_rows_f32(&x, n, &mut [Gemv { w: &w, bias, y: &mut y }]).unwrap();
                        // the portable tiles too, which machines without AVX-512 run
                        let mut portable = vec![f32::NAN; n * rows];
                        rows_dot_tiled(&w, &x, cols, bias, &mut portable, rows);
                        for i in 0..n {
                            for r in 0..rows {
                                let want = dot(&w[r * cols..(r + 1) * cols], &x[i * cols..(i + 1) * cols])
                                    + bias.map_or(0.0, |b| b[r]);
                                for (path, got) in [("chosen", &y), ("portable", &portable)] {
                                    assert_eq!(
                                        got[i * rows + r].to_bits(),
                                        want.to_bits(),
                                        "{path}: {rows}x{cols}, n {n}, input {i}, row {r}, bias {}",
                                        bias.is_some()
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
        // large enough to be split across the pool, with a row count that leaves odd parts
        for &(rows, cols, n) in &[(577, 576, 16), (1537, 576, 10), (101, 1536, 7), (1537, 576, 1)] {
            let w = random(&mut state, rows * cols);
            let x = random(&mut state, n * cols);
            let mut y = vec![f32::NAN; n * rows];
            gemv_rows_f32(&x, n, &mut [Gemv { w: &w, bias: None, y: &mut y }]).unwrap();
            for i in 0..n {
                for r in 0..rows {
                    let want = dot(&w[r * cols..(r + 1) * cols], &x[i * cols..(i + 1) * cols]);
                    assert_eq!(y[i * rows + r].to_bits(), want.to_bits(), "{rows}x{cols}, n {n}, input {i}, row {r}");
                }
            }
        }
    }

    /// `cargo test --release -- --ignored --nocapture rows_dot_speed`: one thread, the path
    /// `rows_dot` takes (the AVX-512 register tiles where the CPU has them) vs the portable tiles,
    /// alternating, on SmolLM2-135M's shapes; prints the best of each.
    #[test]
    #[ignore]
    fn rows_dot_speed() {
        let mut state = 1u64 << 33 | 7;
        for &(rows, cols) in &[(576, 576), (1536, 576), (576, 1536), (49152, 576)] {
            let w = random(&mut state, rows * cols);
            for n in [1, 4, 10, 16] {
                let x = random(&mut state, n * cols);
                let mut y = vec![0f32; n * rows];
                let reps = (2_000_000_000 / (rows * cols * n * 2)).clamp(1, 200);
                let (mut best_new, mut best_old) = (f64::MAX, f64::MAX);
                for _ in 0..5 {
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        rows_dot(&w, &x, cols, None, &mut y, rows);
                    }
                    best_new = best_new.min(t.elapsed().as_secs_f64() / reps as f64);
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        rows_dot_tiled(&w, &x, cols, None, &mut y, rows);
                    }
                    best_old = best_old.min(t.elapsed().as_secs_f64() / reps as f64);
                }
                let gflop = 2.0 * (rows * cols * n) as f64 / 1e9;
                println!(
                    "{rows}x{cols} n={n}: chosen {:.3} ms ({:.1} GFLOP/s), portable {:.3} ms ({:.1} GFLOP/s), {:.2}x",
                    best_new * 1e3,
                    gflop / best_new,
                    best_old * 1e3,
                    gflop / best_old,
                    best_old / best_new
                );
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
