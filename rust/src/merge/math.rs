//! The arithmetic of a merge: widen to f32, add the low-rank product with a GEMM, apply DoRA's
//! row renormalisation, round once to the output dtype (round-to-nearest-even). Parallel over rows.

use half::f16;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::safetensors::Dtype;

/// Elements per parallel work item: big enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 1 << 16;

fn u16s(bytes: &[u8]) -> impl Iterator<Item = u16> + '_ {
    bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]))
}

/// bf16 bits -> f32: the bf16 is the f32's upper half.
#[inline]
fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 -> bf16 bits, round-to-nearest-even, NaN kept quiet (the same bits as half::bf16::from_f32
/// and torch). Branch-free so the loops over it vectorize.
#[inline]
fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16;
    let quiet_nan = (b >> 16) | 0x40;
    (if x.is_nan() { quiet_nan } else { rounded }) as u16
}

fn widen_seq(s: &[u8], dtype: Dtype, d: &mut [f32]) {
    // Fast path: aligned little-endian u16 data (every real checkpoint) as a plain slice.
    #[cfg(target_endian = "little")]
    if dtype == Dtype::BF16 {
        if let Ok(w) = bytemuck::try_cast_slice::<u8, u16>(s) {
            d.iter_mut().zip(w).for_each(|(o, &b)| *o = bf16_to_f32(b));
            return;
        }
    }
    match dtype {
        Dtype::BF16 => d.iter_mut().zip(u16s(s)).for_each(|(o, b)| *o = bf16_to_f32(b)),
        Dtype::F16 => d.iter_mut().zip(u16s(s)).for_each(|(o, b)| *o = f16::from_bits(b).to_f32()),
        _ => d.iter_mut().zip(s.chunks_exact(4)).for_each(|(o, c)| *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    }
}

/// Round into `d`; returns whether every value was finite (checked while the data is in cache).
fn narrow_seq(s: &[f32], dtype: Dtype, d: &mut [u8]) -> bool {
    #[cfg(target_endian = "little")]
    let fast = dtype == Dtype::BF16 && bytemuck::try_cast_slice_mut::<u8, u16>(d).is_ok();
    #[cfg(not(target_endian = "little"))]
    let fast = false;
    if fast {
        let out = bytemuck::cast_slice_mut::<u8, u16>(d);
        out.iter_mut().zip(s).for_each(|(o, &x)| *o = f32_to_bf16(x));
    } else {
        match dtype {
            Dtype::BF16 => {
                s.iter().zip(d.chunks_exact_mut(2)).for_each(|(x, o)| o.copy_from_slice(&f32_to_bf16(*x).to_le_bytes()))
            }
            Dtype::F16 => s
                .iter()
                .zip(d.chunks_exact_mut(2))
                .for_each(|(x, o)| o.copy_from_slice(&f16::from_f32(*x).to_bits().to_le_bytes())),
            _ => s.iter().zip(d.chunks_exact_mut(4)).for_each(|(x, o)| o.copy_from_slice(&x.to_le_bytes())),
        }
    }
    s.iter().fold(true, |ok, x| ok & x.is_finite())
}

fn check_float(dtype: Dtype) -> Result<()> {
    if dtype.is_mergeable_float() {
        Ok(())
    } else {
        Err(Error::data(format!("cannot merge into a {} tensor; expected F16, BF16 or F32", dtype.name())))
    }
}

/// Widen `src` (little-endian elements of `dtype`) into `dst`, which must hold exactly its elements.
pub fn to_f32(src: &[u8], dtype: Dtype, dst: &mut [f32]) -> Result<()> {
    check_float(dtype)?;
    let size = dtype.size();
    if dst.len().checked_mul(size) != Some(src.len()) {
        return Err(Error::data(format!("{} bytes do not hold {} {} values", src.len(), dst.len(), dtype.name())));
    }
    src.par_chunks(CHUNK * size).zip(dst.par_chunks_mut(CHUNK)).for_each(|(s, d)| widen_seq(s, dtype, d));
    Ok(())
}

/// Round `src` into `dst` (little-endian `dtype` bytes, `src.len() * size` long), nearest-even.
/// Returns whether every value was finite.
pub fn from_f32(src: &[f32], dtype: Dtype, dst: &mut [u8]) -> Result<bool> {
    check_float(dtype)?;
    let size = dtype.size();
    if src.len().checked_mul(size) != Some(dst.len()) {
        return Err(Error::data(format!(
            "cannot round {} values into {} {} bytes",
            src.len(),
            dst.len(),
            dtype.name()
        )));
    }
    Ok(src
        .par_chunks(CHUNK)
        .zip(dst.par_chunks_mut(CHUNK * size))
        .map(|(s, d)| narrow_seq(s, dtype, d))
        .reduce(|| true, |a, b| a & b))
}

/// How the low-rank product lands on the stored weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `W (out, in) += s * B (out, r) @ A (r, in)`: nn.Linear.
    Normal,
    /// `W (in, out) += s * (B @ A)^T`: Conv1D with fan_in_fan_out, and embedding LoRA where
    /// `A (r, num_embeddings)`, `B (dim, r)` and `W (num_embeddings, dim)`.
    Transposed,
}

/// The factors of one update, widened to f32: `a` is (r, a_cols) and `b` is (b_rows, r),
/// row-major; the stored weight is (b_rows, a_cols) for Normal and (a_cols, b_rows) for Transposed.
#[derive(Clone, Copy)]
pub struct LowRank<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub rank: usize,
    pub layout: Layout,
    pub scaling: f32,
}

impl LowRank<'_> {
    /// (rows, cols) of the stored weight.
    pub fn weight_shape(&self) -> (usize, usize) {
        let per_rank = |n: usize| n.checked_div(self.rank).unwrap_or(0);
        let (a_cols, b_rows) = (per_rank(self.a.len()), per_rank(self.b.len()));
        match self.layout {
            Layout::Normal => (b_rows, a_cols),
            Layout::Transposed => (a_cols, b_rows),
        }
    }

    /// `block += scaling * product` for the stored rows `[row0, row0 + block.len() / cols)`.
    fn add_to_rows(&self, block: &mut [f32], row0: usize) {
        let (rows, cols) = self.weight_shape();
        let (r, m) = (self.rank, block.len() / cols.max(1));
        if m == 0 || cols == 0 || r == 0 {
            return;
        }
        assert!(row0 + m <= rows, "caller passes blocks inside the weight");
        // Left factor rows [row0, row0+m) with its strides; the right factor is shared.
        let (lhs, rsl, csl, rhs, rsr, csr) = match self.layout {
            // C = B @ A: B (rows, r) row-major, A (r, cols) row-major.
            Layout::Normal => (&self.b[row0 * r..], r as isize, 1, self.a, cols as isize, 1),
            // C = A^T @ B^T: A^T[i][k] = A[k][i], B^T[k][j] = B[j][k].
            Layout::Transposed => (&self.a[row0..], 1, rows as isize, self.b, 1, r as isize),
        };
        // SAFETY: the strides describe in-bounds (m x r) and (r x cols) views (rows row0..row0+m
        // of B for Normal, columns row0..row0+m of A for Transposed), and `block` is an
        // exclusive (m x cols) row-major slab of W.
        unsafe {
            matrixmultiply::sgemm(
                m,
                r,
                cols,
                self.scaling,
                lhs.as_ptr(),
                rsl,
                csl,
                rhs.as_ptr(),
                rsr,
                csr,
                1.0,
                block.as_mut_ptr(),
                cols as isize,
                1,
            );
        }
    }
}

fn rows_per_block(rows: usize, cols: usize) -> usize {
    // About 1 MiB of f32 per block: widen, GEMM and round all happen while it sits in cache.
    (BLOCK_ELEMS / cols.max(1)).clamp(8, 1024).min(rows.max(1))
}

/// Elements of f32 scratch per fused block.
const BLOCK_ELEMS: usize = 1 << 18;

thread_local! {
    static BLOCK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The fused merge of one weight: `out = round(src + scaling * product)`, with DoRA's per-row
/// rescale when `magnitude` is given (Normal layout only). Runs block by block of rows so each
/// block is widened, updated and rounded while in cache. Returns whether all values were finite.
pub fn merge_rows(
    src: &[u8],
    in_dtype: Dtype,
    out: &mut [u8],
    out_dtype: Dtype,
    lr: &LowRank,
    magnitude: Option<&[f32]>,
) -> Result<bool> {
    check_float(in_dtype)?;
    check_float(out_dtype)?;
    let (rows, cols) = lr.weight_shape();
    let (isz, osz) = (in_dtype.size(), out_dtype.size());
    let bytes = |size: usize| rows.checked_mul(cols).and_then(|n| n.checked_mul(size));
    if bytes(isz) != Some(src.len()) || bytes(osz) != Some(out.len()) {
        return Err(Error::data(format!(
            "a {rows}x{cols} weight does not fit {} input / {} output bytes",
            src.len(),
            out.len()
        )));
    }
    if magnitude.is_some_and(|m| m.len() != rows || lr.layout != Layout::Normal) {
        return Err(Error::data("DoRA magnitudes must match the rows of a Normal-layout weight"));
    }
    if rows == 0 || cols == 0 {
        return Ok(true);
    }
    let block = rows_per_block(rows, cols);
    let finite = src
        .par_chunks(block * cols * isz)
        .zip(out.par_chunks_mut(block * cols * osz))
        .enumerate()
        .map(|(i, (s, o))| {
            BLOCK.with(|buf| {
                let mut w = buf.borrow_mut();
                w.resize(s.len() / isz, 0.0);
                widen_seq(s, in_dtype, &mut w);
                lr.add_to_rows(&mut w, i * block);
                if let Some(m) = magnitude {
                    let m = &m[i * block..];
                    for (row, &mag) in w.chunks_mut(cols).zip(m) {
                        scale_to_norm(row, mag);
                    }
                }
                narrow_seq(&w, out_dtype, o)
            })
        })
        .reduce(|| true, |a, b| a & b);
    Ok(finite)
}

fn scale_to_norm(row: &mut [f32], magnitude: f32) {
    let norm = row.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt() as f32;
    let f = magnitude / norm;
    row.iter_mut().for_each(|x| *x *= f);
}

/// `w += scaling * product` over a whole f32 weight (the unfused path: DoRA on transposed
/// layouts needs every row before any can be rescaled).
pub fn add_low_rank(w: &mut [f32], lr: &LowRank) {
    let (rows, cols) = lr.weight_shape();
    assert_eq!(rows.checked_mul(cols), Some(w.len()), "caller checked shapes");
    if rows == 0 || cols == 0 {
        return;
    }
    let block = rows_per_block(rows, cols);
    w.par_chunks_mut(block * cols).enumerate().for_each(|(i, chunk)| lr.add_to_rows(chunk, i * block));
}

/// DoRA: scale each output feature of `w` to the learned magnitude, `w *= m / ||w||` with the norm
/// over the input dimension. Output features are rows for Normal and columns for Transposed.
pub fn dora_rescale(w: &mut [f32], rows: usize, cols: usize, magnitude: &[f32], layout: Layout) {
    match layout {
        Layout::Normal => {
            assert_eq!(magnitude.len(), rows);
            w.par_chunks_mut(cols.max(1)).zip(magnitude.par_iter()).for_each(|(row, &m)| scale_to_norm(row, m));
        }
        Layout::Transposed => {
            assert_eq!(magnitude.len(), cols);
            let mut sums = vec![0f64; cols];
            for row in w.chunks(cols.max(1)) {
                sums.iter_mut().zip(row).for_each(|(s, &x)| *s += (x as f64) * (x as f64));
            }
            let factors: Vec<f32> = sums.iter().zip(magnitude).map(|(s, &m)| m / (s.sqrt() as f32)).collect();
            w.par_chunks_mut(cols.max(1)).for_each(|row| row.iter_mut().zip(&factors).for_each(|(x, f)| *x *= f));
        }
    }
}

/// Index of the first NaN or infinity, if any (for error messages).
pub fn first_non_finite(w: &[f32]) -> Option<usize> {
    w.iter().position(|x| !x.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], r: usize, rows: usize, cols: usize) -> Vec<f32> {
        let mut c = vec![0f32; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                c[i * cols + j] = (0..r).map(|k| b[i * r + k] * a[k * cols + j]).sum();
            }
        }
        c
    }

    #[test]
    fn low_rank_matches_naive_in_both_layouts() {
        let (rows, cols, r) = (37, 29, 5);
        let a: Vec<f32> = (0..r * cols).map(|i| ((i * 7 % 11) as f32 - 5.0) / 8.0).collect();
        let b: Vec<f32> = (0..rows * r).map(|i| ((i * 5 % 13) as f32 - 6.0) / 8.0).collect();
        let want = naive(&a, &b, r, rows, cols);
        let mut w = vec![1.0f32; rows * cols];
        add_low_rank(&mut w, &LowRank { a: &a, b: &b, rank: r, layout: Layout::Normal, scaling: 2.0 });
        for (x, y) in w.iter().zip(&want) {
            assert!((x - (1.0 + 2.0 * y)).abs() < 1e-5);
        }
        let mut wt = vec![0.0f32; rows * cols];
        add_low_rank(&mut wt, &LowRank { a: &a, b: &b, rank: r, layout: Layout::Transposed, scaling: 1.0 });
        for i in 0..rows {
            for j in 0..cols {
                assert!((wt[j * rows + i] - want[i * cols + j]).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn fused_rows_equal_the_unfused_path() {
        // Enough rows for several blocks and a ragged last one.
        let (rows, cols, r) = (700, 513, 3);
        let a: Vec<f32> = (0..r * cols).map(|i| ((i * 7 % 11) as f32 - 5.0) / 64.0).collect();
        let b: Vec<f32> = (0..rows * r).map(|i| ((i * 5 % 13) as f32 - 6.0) / 64.0).collect();
        let base: Vec<f32> = (0..rows * cols).map(|i| ((i * 3 % 17) as f32 - 8.0) / 16.0).collect();
        let mut src = vec![0u8; rows * cols * 2];
        from_f32(&base, Dtype::BF16, &mut src).unwrap();
        let mag: Vec<f32> = (0..rows).map(|i| 1.0 + i as f32 / 100.0).collect();
        for (layout, dora) in [(Layout::Normal, false), (Layout::Normal, true), (Layout::Transposed, false)] {
            let (a, b) = if layout == Layout::Normal { (&a, &b) } else { (&b, &a) };
            let lr = LowRank { a: a.as_slice(), b: b.as_slice(), rank: r, layout, scaling: 0.5 };
            let mut w = vec![0f32; rows * cols];
            to_f32(&src, Dtype::BF16, &mut w).unwrap();
            add_low_rank(&mut w, &lr);
            let m = dora.then_some(mag.as_slice());
            if let Some(m) = m {
                dora_rescale(&mut w, rows, cols, m, layout);
            }
            let mut want = vec![0u8; rows * cols * 2];
            from_f32(&w, Dtype::BF16, &mut want).unwrap();
            let mut got = vec![0u8; rows * cols * 2];
            assert!(merge_rows(&src, Dtype::BF16, &mut got, Dtype::BF16, &lr, m).unwrap());
            assert!(got == want, "{layout:?} dora={dora}");
        }
    }

    #[test]
    fn bf16_rounding_matches_half_bit_for_bit() {
        let mut x = 0x0123_4567u32;
        let specials = [
            0.0f32,
            -0.0,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            1e-45,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001),
            1.0 + 2f32.powi(-8),
        ];
        for i in 0..200_000u32 {
            // xorshift over all bit patterns, plus the edge cases
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = if (i as usize) < specials.len() { specials[i as usize] } else { f32::from_bits(x) };
            assert_eq!(f32_to_bf16(v), half::bf16::from_f32(v).to_bits(), "{v:e} ({:#x})", v.to_bits());
        }
    }

    #[test]
    fn rounding_is_nearest_even() {
        // 1 + 2^-8 is halfway between two bf16 neighbours: ties go to the even mantissa (1.0).
        let x = [1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), -0.0, f32::INFINITY];
        let mut out = vec![0u8; 8];
        assert!(!from_f32(&x, Dtype::BF16, &mut out).unwrap(), "infinity is reported");
        assert!(from_f32(&x[..3], Dtype::BF16, &mut out[..6]).unwrap());
        let back: Vec<u16> = out.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        assert_eq!(back, vec![0x3f80, 0x3f82, 0x8000, 0x7f80]);
        let mut wide = vec![0f32; 4];
        to_f32(&out, Dtype::BF16, &mut wide).unwrap();
        assert_eq!(wide[1], 1.0 + 2.0 * 2f32.powi(-7));
        assert!(to_f32(&out, Dtype::I32, &mut wide[..2]).is_err());
    }

    #[test]
    fn dora_sets_row_norms_to_magnitude() {
        let mut w = vec![3.0, 4.0, 0.0, 2.0];
        dora_rescale(&mut w, 2, 2, &[10.0, 1.0], Layout::Normal);
        assert_eq!(w, vec![6.0, 8.0, 0.0, 1.0]);
        let mut w = vec![3.0, 0.0, 4.0, 2.0];
        dora_rescale(&mut w, 2, 2, &[10.0, 1.0], Layout::Transposed);
        assert_eq!(w, vec![6.0, 0.0, 8.0, 1.0]);
        assert_eq!(first_non_finite(&[1.0, f32::NAN]), Some(1));
    }
}
