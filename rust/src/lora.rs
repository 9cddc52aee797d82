//! The adapter side of a LoRA linear on float32 CPU tensors, with the adapter's dropout fused in:
//!
//! ```text
//! down     h   = dropout(x) @ A^T          (rows, r)
//! grad_a   dA  = dh^T @ dropout(x)         (r, cols)
//! add_up   dx += dropout(dh @ A)           (rows, cols), in place
//! ```
//!
//! for x (rows, cols), A (r, cols), dh (rows, r). The mask is `crate::dropout`'s for the same seed
//! (element (n, j) has index n * cols + j), regenerated where it is needed: dropout(x) is never
//! written out. Unfused, each of these is a BLAS product with a rank of 16 on one side (oneDNN
//! runs such shapes at a fraction of its speed, and in a training step they stream from memory)
//! plus a dropout pass over a (rows, cols) tensor; here each reads x (or dx) once.
//!
//! Every output element has one fixed order of operations (fused multiply-adds in index order,
//! sums over 16 lanes combined by one fixed pairing), the same in the AVX-512 version and the
//! portable one, so the bytes depend neither on the CPU nor on the number of threads.

use crate::dropout;
use crate::error::{Error, Result};
use crate::omp::{self, Shared};
use crate::simd::multiversion512;

const LANES: usize = 16;

/// The dropout of one adapter call.
#[derive(Clone, Copy, Debug)]
pub struct Mask {
    seed: u64,
    cut: u32,
    scale: f32,
    on: bool,
}

impl Mask {
    /// Drop probability `p` in [0, 1); 0 switches the mask off (x passes unchanged).
    pub fn new(seed: u64, p: f32) -> Result<Mask> {
        let cut = dropout::threshold(p)?;
        Ok(Mask { seed, cut, scale: (1.0 / (1.0 - p as f64)) as f32, on: p > 0.0 })
    }

    /// dropout of value `v` at flat index `i`: `v * scale` when kept, 0 when dropped.
    #[inline(always)]
    fn apply(&self, i: u64, v: f32) -> f32 {
        if !self.on {
            v
        } else if dropout::draw(self.seed, i) >= self.cut {
            v * self.scale
        } else {
            0.0
        }
    }
}

/// The sum of 16 lanes, paired (l, l + 8), then (l, l + 4), (l, l + 2), (l, l + 1) (also the
/// attention kernel's row sums).
#[inline(always)]
pub(crate) fn tree(mut s: [f32; LANES]) -> f32 {
    for width in [8, 4, 2, 1] {
        for l in 0..width {
            s[l] += s[l + width];
        }
    }
    s[0]
}

/// (rows, r) of a kernel's three operands: `big` (rows, cols), `adapter` (r, cols), `small` (rows, r).
fn dims(
    what: &str,
    big: (&str, usize),
    adapter: (&str, usize),
    small: (&str, usize),
    cols: usize,
) -> Result<(usize, usize)> {
    if cols == 0 {
        return Err(mismatch(what, "rows of 0 values".into()));
    }
    for (name, len) in [big, adapter] {
        if len % cols != 0 {
            return Err(mismatch(what, format!("{name} holds {len} values, not a whole number of rows of {cols}")));
        }
    }
    let (rows, r) = (big.1 / cols, adapter.1 / cols);
    if rows.checked_mul(r) != Some(small.1) {
        return Err(mismatch(what, format!("{} holds {} values; expected rows x r = {rows} x {r}", small.0, small.1)));
    }
    Ok((rows, r))
}

fn mismatch(what: &str, detail: String) -> Error {
    Error::InvalidArgument(format!("lora {what}: {detail}"))
}

// ---- portable versions (and the AVX2 tier, by auto-vectorization): the reference order ----

multiversion512! {
    #[allow(clippy::needless_range_loop)] // lane-parallel loops: the index is the lane
    fn down_rows_portable(x: &[f32], a: &[f32], cols: usize, mask: Mask, first_row: usize, h: &mut [f32]) {
        let r = a.len() / cols;
        let padded = cols.div_ceil(LANES) * LANES;
        let mut xd = vec![0f32; padded];
        for (k, (row, out)) in x.chunks_exact(cols).zip(h.chunks_exact_mut(r)).enumerate() {
            let base = ((first_row + k) * cols) as u64;
            for (j, (d, &v)) in xd.iter_mut().zip(row).enumerate() {
                *d = mask.apply(base + j as u64, v);
            }
            for (q, o) in out.iter_mut().enumerate() {
                let w = &a[q * cols..(q + 1) * cols];
                let mut acc = [0f32; LANES];
                for j0 in (0..padded).step_by(LANES) {
                    for l in 0..LANES {
                        let j = j0 + l;
                        let wv = if j < cols { w[j] } else { 0.0 };
                        acc[l] = xd[j].mul_add(wv, acc[l]);
                    }
                }
                *o = tree(acc);
            }
        }
    }
}

multiversion512! {
    fn grad_a_cols_portable(dh: &[f32], x: &[f32], cols: usize, mask: Mask, j0: usize, j1: usize, d_a: &Shared) {
        let rows = x.len() / cols;
        let r = dh.len() / rows.max(1);
        let mut acc = vec![0f32; r * (j1 - j0)];
        for n in 0..rows {
            for j in j0..j1 {
                let xd = mask.apply((n * cols + j) as u64, x[n * cols + j]);
                for q in 0..r {
                    let slot = &mut acc[q * (j1 - j0) + j - j0];
                    *slot = dh[n * r + q].mul_add(xd, *slot);
                }
            }
        }
        for q in 0..r {
            // SAFETY: columns j0..j1 of every row of d_a belong to this part alone.
            let out = unsafe { d_a.range(q * cols + j0, q * cols + j1) };
            out.copy_from_slice(&acc[q * (j1 - j0)..(q + 1) * (j1 - j0)]);
        }
    }
}

multiversion512! {
    fn add_up_rows_portable(dx: &mut [f32], dh: &[f32], a: &[f32], cols: usize, mask: Mask, first_row: usize) {
        let r = a.len() / cols;
        for (k, (row, d)) in dx.chunks_exact_mut(cols).zip(dh.chunks_exact(r)).enumerate() {
            let base = ((first_row + k) * cols) as u64;
            for (j, v) in row.iter_mut().enumerate() {
                let mut acc = 0f32;
                for q in 0..r {
                    acc = d[q].mul_add(a[q * cols + j], acc);
                }
                *v += mask.apply(base + j as u64, acc);
            }
        }
    }
}

// ---- AVX-512 versions: the same operations, 16 lanes at a time ----

/// The AVX-512 kernels. Every function here is `unsafe` for the same two reasons, stated once:
/// the CPU must have AVX-512 F/BW/VL (the callers go through `tiered!`, after `wide` checked it),
/// and loads and stores use raw pointers at offsets computed from shapes that `dims` checked:
/// rows of `cols` values (or `r` for `dh` and `h`), each row's last chunk masked by `tail_mask`,
/// so no lane touches memory past its row.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Mask, Shared, LANES};
    use crate::dropout;
    use std::arch::x86_64::*;

    /// The keep bits of the 16 elements from flat index `i` (all below 2^32), `tail` lanes only.
    #[inline(always)]
    unsafe fn keep(mask: &Mask, key: __m512i, i: usize, tail: __mmask16) -> __mmask16 {
        if !mask.on {
            return tail;
        }
        let lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        let mut v = _mm512_xor_si512(_mm512_add_epi32(_mm512_set1_epi32(i as u32 as i32), lanes), key);
        v = _mm512_xor_si512(v, _mm512_srli_epi32(v, 16));
        v = _mm512_mullo_epi32(v, _mm512_set1_epi32(0x7feb_352du32 as i32));
        v = _mm512_xor_si512(v, _mm512_srli_epi32(v, 15));
        v = _mm512_mullo_epi32(v, _mm512_set1_epi32(0x846c_a68bu32 as i32));
        v = _mm512_xor_si512(v, _mm512_srli_epi32(v, 16));
        _mm512_mask_cmpge_epu32_mask(tail, v, _mm512_set1_epi32(mask.cut as i32))
    }

    #[inline(always)]
    unsafe fn dropped(mask: &Mask, key: __m512i, i: usize, tail: __mmask16, v: __m512) -> __m512 {
        if mask.on {
            _mm512_maskz_mul_ps(keep(mask, key, i, tail), v, _mm512_set1_ps(mask.scale))
        } else {
            v
        }
    }

    #[inline(always)]
    unsafe fn tail_mask(left: usize) -> __mmask16 {
        if left >= LANES {
            0xffff
        } else {
            ((1u32 << left) - 1) as __mmask16
        }
    }

    /// `super::tree` on a register: the same pairing.
    #[inline(always)]
    unsafe fn tree(v: __m512) -> f32 {
        let v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0b11_10_11_10)); // l + 8
        let v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0b01_01_01_01)); // l + 4
        let v = _mm512_add_ps(v, _mm512_permute_ps(v, 0b11_10_11_10)); // l + 2
        let v = _mm512_add_ps(v, _mm512_permute_ps(v, 0b01_01_01_01)); // l + 1
        _mm512_cvtss_f32(v)
    }

    /// # Safety
    /// The CPU has AVX-512F.
    pub(super) unsafe fn key0(mask: &Mask) -> __m512i {
        // SAFETY: a register broadcast; the caller promises AVX-512F.
        unsafe { _mm512_set1_epi32(dropout::key(mask.seed, 0) as i32) }
    }

    /// dropout(row) into `xd` (padded to whole 16-lane chunks with zeros, as the masked loads read).
    #[inline(always)]
    unsafe fn drop_row(row: &[f32], mask: &Mask, key: __m512i, base: usize, xd: &mut [f32]) {
        let cols = row.len();
        let mut j = 0;
        while j < cols {
            let t = tail_mask(cols - j);
            let v = dropped(mask, key, base + j, t, _mm512_maskz_loadu_ps(t, row.as_ptr().add(j)));
            _mm512_storeu_ps(xd.as_mut_ptr().add(j), _mm512_maskz_mov_ps(t, v));
            j += LANES;
        }
    }

    /// h[., q0..q0+QB] of ROWS rows whose dropped values are in `xd` (ROWS padded rows of `stride`).
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn down_block<const ROWS: usize, const QB: usize>(
        xd: &[f32],
        stride: usize,
        a: &[f32],
        cols: usize,
        q0: usize,
        r: usize,
        out: &mut [f32],
    ) {
        let mut acc = [[_mm512_setzero_ps(); QB]; ROWS];
        let mut j = 0;
        while j < cols {
            let t = tail_mask(cols - j);
            let x: [__m512; ROWS] = std::array::from_fn(|k| _mm512_loadu_ps(xd.as_ptr().add(k * stride + j)));
            for g in 0..QB {
                let w = _mm512_maskz_loadu_ps(t, a.as_ptr().add((q0 + g) * cols + j));
                for k in 0..ROWS {
                    acc[k][g] = _mm512_fmadd_ps(x[k], w, acc[k][g]);
                }
            }
            j += LANES;
        }
        for k in 0..ROWS {
            for g in 0..QB {
                out[k * r + q0 + g] = tree(acc[k][g]);
            }
        }
    }

    #[inline(always)]
    unsafe fn down_rank<const ROWS: usize>(
        xd: &[f32],
        stride: usize,
        a: &[f32],
        cols: usize,
        r: usize,
        out: &mut [f32],
    ) {
        let mut q = 0;
        while q + 8 <= r {
            down_block::<ROWS, 8>(xd, stride, a, cols, q, r, out);
            q += 8;
        }
        while q < r {
            down_block::<ROWS, 1>(xd, stride, a, cols, q, r, out);
            q += 1;
        }
    }

    /// # Safety
    /// AVX-512 F/BW/VL must be present; the whole x below 2^32 elements.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) unsafe fn down_rows(x: &[f32], a: &[f32], cols: usize, mask: Mask, first_row: usize, h: &mut [f32]) {
        let r = a.len() / cols;
        let key = key0(&mask);
        let stride = cols.div_ceil(LANES) * LANES;
        let mut xd = vec![0f32; 2 * stride];
        let rows = x.len() / cols;
        let mut n = 0;
        while n < rows {
            let take = (rows - n).min(2);
            for k in 0..take {
                let row = &x[(n + k) * cols..(n + k + 1) * cols];
                drop_row(row, &mask, key, (first_row + n + k) * cols, &mut xd[k * stride..(k + 1) * stride]);
            }
            let out = &mut h[n * r..(n + take) * r];
            if take == 2 {
                down_rank::<2>(&xd, stride, a, cols, r, out);
            } else {
                down_rank::<1>(&xd, stride, a, cols, r, out);
            }
            n += take;
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn grad_a_block<const QB: usize>(
        dh: &[f32],
        x: &[f32],
        cols: usize,
        r: usize,
        q0: usize,
        mask: &Mask,
        key: __m512i,
        j: usize,
        d_a: &Shared,
    ) {
        let rows = x.len() / cols;
        let t = tail_mask(cols - j);
        let mut acc = [_mm512_setzero_ps(); QB];
        for n in 0..rows {
            let i = n * cols + j;
            let xd = dropped(mask, key, i, t, _mm512_maskz_loadu_ps(t, x.as_ptr().add(i)));
            let d = dh.as_ptr().add(n * r + q0);
            for (g, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(*d.add(g)), xd, *acc);
            }
        }
        for (g, acc) in acc.iter().enumerate() {
            let at = (q0 + g) * cols + j;
            // columns j..j+16 of d_a's rows belong to this part alone
            let out = d_a.range(at, at + (cols - j).min(LANES));
            _mm512_mask_storeu_ps(out.as_mut_ptr(), t, *acc);
        }
    }

    /// # Safety
    /// As [`down_rows`]; columns j0..j1 of `d_a` (r, cols) are this caller's alone.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) unsafe fn grad_a_cols(
        dh: &[f32],
        x: &[f32],
        cols: usize,
        mask: Mask,
        j0: usize,
        j1: usize,
        d_a: &Shared,
    ) {
        let rows = x.len() / cols;
        let r = dh.len() / rows.max(1);
        let key = key0(&mask);
        let mut j = j0;
        while j < j1 {
            let mut q = 0;
            while q + 16 <= r {
                grad_a_block::<16>(dh, x, cols, r, q, &mask, key, j, d_a);
                q += 16;
            }
            while q + 8 <= r {
                grad_a_block::<8>(dh, x, cols, r, q, &mask, key, j, d_a);
                q += 8;
            }
            while q < r {
                grad_a_block::<1>(dh, x, cols, r, q, &mask, key, j, d_a);
                q += 1;
            }
            j += LANES;
        }
    }

    /// add_up for rank R: per 16-column chunk the chunk of every A row sits in a register while
    /// the rows go by (the same operations per element as the row-wise loop).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn add_up_held<const R: usize>(
        dx: &mut [f32],
        dh: &[f32],
        a: &[f32],
        cols: usize,
        mask: &Mask,
        key: __m512i,
        first_row: usize,
    ) {
        let rows = dx.len() / cols;
        let mut j = 0;
        while j < cols {
            let t = tail_mask(cols - j);
            let w: [__m512; R] = std::array::from_fn(|q| _mm512_maskz_loadu_ps(t, a.as_ptr().add(q * cols + j)));
            // four rows at a time: four independent chains of multiply-adds keep the FMA units
            // busy (one row's chain of R is latency-bound)
            let mut n = 0;
            while n + 4 <= rows {
                add_up_chunk::<R, 4>(dx, dh, &w, cols, mask, key, first_row, n, j, t);
                n += 4;
            }
            while n < rows {
                add_up_chunk::<R, 1>(dx, dh, &w, cols, mask, key, first_row, n, j, t);
                n += 1;
            }
            j += LANES;
        }
    }

    /// Rows n..n+ROWS of one 16-column chunk of add_up, A's chunk in `w`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn add_up_chunk<const R: usize, const ROWS: usize>(
        dx: &mut [f32],
        dh: &[f32],
        w: &[__m512; R],
        cols: usize,
        mask: &Mask,
        key: __m512i,
        first_row: usize,
        n: usize,
        j: usize,
        t: __mmask16,
    ) {
        let mut acc = [_mm512_setzero_ps(); ROWS];
        for (q, w) in w.iter().enumerate() {
            for (k, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(*dh.as_ptr().add((n + k) * R + q)), *w, *acc);
            }
        }
        for (k, acc) in acc.iter().enumerate() {
            let p = dx.as_mut_ptr().add((n + k) * cols + j);
            let v =
                _mm512_add_ps(_mm512_maskz_loadu_ps(t, p), dropped(mask, key, (first_row + n + k) * cols + j, t, *acc));
            _mm512_mask_storeu_ps(p, t, v);
        }
    }

    /// # Safety
    /// As [`down_rows`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) unsafe fn add_up_rows(dx: &mut [f32], dh: &[f32], a: &[f32], cols: usize, mask: Mask, first_row: usize) {
        let r = a.len() / cols;
        let key = key0(&mask);
        match r {
            16 => return add_up_held::<16>(dx, dh, a, cols, &mask, key, first_row),
            8 => return add_up_held::<8>(dx, dh, a, cols, &mask, key, first_row),
            4 => return add_up_held::<4>(dx, dh, a, cols, &mask, key, first_row),
            _ => {}
        }
        for (k, (row, d)) in dx.chunks_exact_mut(cols).zip(dh.chunks_exact(r)).enumerate() {
            let base = (first_row + k) * cols;
            let mut j = 0;
            while j < cols {
                let t = tail_mask(cols - j);
                let mut acc = _mm512_setzero_ps();
                for (q, &dq) in d.iter().enumerate() {
                    acc = _mm512_fmadd_ps(
                        _mm512_set1_ps(dq),
                        _mm512_maskz_loadu_ps(t, a.as_ptr().add(q * cols + j)),
                        acc,
                    );
                }
                let p = row.as_mut_ptr().add(j);
                let v = _mm512_add_ps(_mm512_maskz_loadu_ps(t, p), dropped(&mask, key, base + j, t, acc));
                _mm512_mask_storeu_ps(p, t, v);
                j += LANES;
            }
        }
    }
}

/// Whether the AVX-512 versions run: on a CPU with them (and `TUNEX_SIMD` not capping the tier),
/// for tensors whose flat indices stay below 2^32 (one dropout key for all).
fn wide(elements: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::simd::has_avx512() && (elements as u64) < (1u64 << 32)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = elements;
        false
    }
}

/// `$wide(args)` (the AVX-512 version) when `$fast`, else `$portable(args)`, as a part's body.
macro_rules! tiered {
    ($fast:expr, $wide:path, $portable:path, ($($arg:expr),* $(,)?)) => {{
        #[cfg(target_arch = "x86_64")]
        if $fast {
            // SAFETY: `wide` checked the CPU and the index range; the part's output is its own.
            return unsafe { $wide($($arg),*) };
        }
        let _ = $fast;
        $portable($($arg),*)
    }};
}

fn parts_ok(ok: bool, what: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(mismatch(what, "a part of the kernel panicked".into()))
    }
}

/// `h = dropout(x) @ a^T` for x (rows, cols), a (r, cols), h (rows, r).
pub fn down(x: &[f32], cols: usize, a: &[f32], mask: Mask, h: &mut [f32]) -> Result<()> {
    let (rows, r) = dims("down", ("x", x.len()), ("a", a.len()), ("h", h.len()), cols)?;
    if rows == 0 || r == 0 {
        return Ok(());
    }
    let out = Shared::new(h);
    let fast = wide(x.len());
    let ok = omp::by_rows(rows, cols, &|lo, hi| {
        let xs = &x[lo * cols..hi * cols];
        // SAFETY: rows lo..hi of h are this part's alone.
        let hs = unsafe { out.range(lo * r, hi * r) };
        tiered!(fast, x86::down_rows, down_rows_portable, (xs, a, cols, mask, lo, hs))
    });
    parts_ok(ok, "down")
}

/// `d_a = dh^T @ dropout(x)` for dh (rows, r), x (rows, cols), d_a (r, cols).
pub fn grad_a(dh: &[f32], x: &[f32], cols: usize, mask: Mask, d_a: &mut [f32]) -> Result<()> {
    let (rows, _) = dims("grad_a", ("x", x.len()), ("d_a", d_a.len()), ("dh", dh.len()), cols)?;
    if rows == 0 {
        d_a.fill(0.0);
        return Ok(());
    }
    let out = Shared::new(d_a);
    let fast = wide(x.len());
    let chunks = cols.div_ceil(LANES);
    let ok = omp::run(chunks, &|c| {
        let (j0, j1) = (c * LANES, ((c + 1) * LANES).min(cols)); // columns j0..j1 are this part's
        tiered!(fast, x86::grad_a_cols, grad_a_cols_portable, (dh, x, cols, mask, j0, j1, &out))
    });
    parts_ok(ok, "grad_a")
}

/// `dx += dropout(dh @ a)` for dx (rows, cols), dh (rows, r), a (r, cols).
pub fn add_up(dx: &mut [f32], dh: &[f32], a: &[f32], cols: usize, mask: Mask) -> Result<()> {
    let (rows, r) = dims("add_up", ("dx", dx.len()), ("a", a.len()), ("dh", dh.len()), cols)?;
    if rows == 0 || r == 0 {
        return Ok(());
    }
    let fast = wide(dx.len());
    let out = Shared::new(dx);
    let ok = omp::by_rows(rows, cols, &|lo, hi| {
        // SAFETY: rows lo..hi of dx are this part's alone.
        let rows_out = unsafe { out.range(lo * cols, hi * cols) };
        let d = &dh[lo * r..hi * r];
        tiered!(fast, x86::add_up_rows, add_up_rows_portable, (rows_out, d, a, cols, mask, lo))
    });
    parts_ok(ok, "add_up")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, k: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * k % 97) as f32 - 48.0) / 17.0).collect()
    }

    fn reference_xd(x: &[f32], mask: &Mask) -> Vec<f64> {
        x.iter().enumerate().map(|(i, &v)| mask.apply(i as u64, v) as f64).collect()
    }

    #[test]
    fn the_three_kernels_match_a_float64_reference() {
        let (rows, cols, r) = (37, 45, 19); // ragged 16-lane tails, rank above one 16-block
        let x = values(rows * cols, 7);
        let a = values(r * cols, 11);
        let dh = values(rows * r, 13);
        for p in [0.0f32, 0.3] {
            let mask = Mask::new(99, p).unwrap();
            let xd = reference_xd(&x, &mask);
            let mut h = vec![0f32; rows * r];
            down(&x, cols, &a, mask, &mut h).unwrap();
            let mut d_a = vec![f32::NAN; r * cols];
            grad_a(&dh, &x, cols, mask, &mut d_a).unwrap();
            let mut dx = values(rows * cols, 5);
            let dx0 = dx.clone();
            add_up(&mut dx, &dh, &a, cols, mask).unwrap();
            for n in 0..rows {
                for q in 0..r {
                    let want: f64 = (0..cols).map(|j| xd[n * cols + j] * a[q * cols + j] as f64).sum();
                    assert!((h[n * r + q] as f64 - want).abs() < 1e-4, "h[{n},{q}] {} vs {want}", h[n * r + q]);
                }
                for j in 0..cols {
                    let up: f64 = (0..r).map(|q| dh[n * r + q] as f64 * a[q * cols + j] as f64).sum();
                    let want = dx0[n * cols + j] as f64 + mask.apply((n * cols + j) as u64, 1.0) as f64 * up;
                    assert!((dx[n * cols + j] as f64 - want).abs() < 1e-4, "dx[{n},{j}]");
                }
            }
            for q in 0..r {
                for j in 0..cols {
                    let want: f64 = (0..rows).map(|n| dh[n * r + q] as f64 * xd[n * cols + j]).sum();
                    assert!((d_a[q * cols + j] as f64 - want).abs() < 1e-4, "d_a[{q},{j}]");
                }
            }
        }
    }

    #[test]
    fn the_avx512_versions_give_the_portable_bytes() {
        if !wide(1) {
            return;
        }
        for r in [4, 8, 16, 19] {
            let (rows, cols) = (21, 77); // an odd row count: the two-row and one-row blocks
            let x = values(rows * cols, 3);
            let a = values(r * cols, 5);
            let dh = values(rows * r, 7);
            let mask = Mask::new(5, 0.2).unwrap();
            let mut fast = vec![0f32; rows * r];
            down(&x, cols, &a, mask, &mut fast).unwrap();
            let mut slow = vec![0f32; rows * r];
            down_rows_portable(&x, &a, cols, mask, 0, &mut slow);
            assert_eq!(fast, slow, "down, r={r}");
            let mut fast = values(rows * cols, 2);
            let mut slow = fast.clone();
            add_up(&mut fast, &dh, &a, cols, mask).unwrap();
            add_up_rows_portable(&mut slow, &dh, &a, cols, mask, 0);
            assert_eq!(fast, slow, "add_up, r={r}");
            let mut fast = vec![0f32; r * cols];
            grad_a(&dh, &x, cols, mask, &mut fast).unwrap();
            let mut slow = vec![0f32; r * cols];
            let shared = Shared::new(&mut slow);
            for c in 0..cols.div_ceil(LANES) {
                grad_a_cols_portable(&dh, &x, cols, mask, c * LANES, ((c + 1) * LANES).min(cols), &shared);
            }
            assert_eq!(fast, slow, "grad_a, r={r}");
        }
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors() {
        let mask = Mask::new(1, 0.1).unwrap();
        let mut h = vec![0f32; 6];
        assert!(down(&[0.0; 10], 4, &[0.0; 8], mask, &mut h).is_err());
        assert!(down(&[0.0; 12], 4, &[0.0; 8], mask, &mut h[..5]).is_err());
        assert!(grad_a(&[0.0; 5], &[0.0; 12], 4, mask, &mut [0.0; 8]).is_err());
        assert!(add_up(&mut [0.0; 12], &[0.0; 6], &[0.0; 8], 0, mask).is_err());
        assert!(Mask::new(1, 1.0).is_err());
    }
}
