//! The arithmetic of a merge: widen to f32, add the low-rank product with a GEMM, apply DoRA's
//! row renormalisation, round once to the output dtype (round-to-nearest-even). Parallel over rows.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::safetensors::Dtype;

/// Elements per parallel work item: big enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 1 << 16;

fn u16s(bytes: &[u8]) -> impl Iterator<Item = u16> + '_ {
    bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]))
}

/// Widen `src` (little-endian elements of `dtype`) into `dst`, which must hold exactly its elements.
pub fn to_f32(src: &[u8], dtype: Dtype, dst: &mut [f32]) -> Result<()> {
    let size = dtype.size();
    if src.len() != dst.len() * size {
        return Err(Error::data(format!("{} bytes do not hold {} {} values", src.len(), dst.len(), dtype.name())));
    }
    let widen = |(s, d): (&[u8], &mut [f32])| match dtype {
        Dtype::BF16 => d.iter_mut().zip(u16s(s)).for_each(|(o, b)| *o = f32::from_bits((b as u32) << 16)),
        Dtype::F16 => d.iter_mut().zip(u16s(s)).for_each(|(o, b)| *o = f16::from_bits(b).to_f32()),
        _ => d
            .iter_mut()
            .zip(s.chunks_exact(4))
            .for_each(|(o, c)| *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    };
    if !dtype.is_mergeable_float() {
        return Err(Error::data(format!("cannot merge into a {} tensor; expected F16, BF16 or F32", dtype.name())));
    }
    src.par_chunks(CHUNK * size).zip(dst.par_chunks_mut(CHUNK)).for_each(widen);
    Ok(())
}

/// Round `src` into `dst` (little-endian `dtype` bytes, `src.len() * size` long), nearest-even.
/// Returns whether every value was finite (checked while the data is hot in cache).
pub fn from_f32(src: &[f32], dtype: Dtype, dst: &mut [u8]) -> Result<bool> {
    let size = dtype.size();
    if dst.len() != src.len() * size || !dtype.is_mergeable_float() {
        return Err(Error::data(format!("cannot round {} values into {} {} bytes", src.len(), dst.len(), dtype.name())));
    }
    let narrow = |(s, d): (&[f32], &mut [u8])| {
        match dtype {
            Dtype::BF16 => s.iter().zip(d.chunks_exact_mut(2)).for_each(|(x, o)| o.copy_from_slice(&bf16::from_f32(*x).to_bits().to_le_bytes())),
            Dtype::F16 => s.iter().zip(d.chunks_exact_mut(2)).for_each(|(x, o)| o.copy_from_slice(&f16::from_f32(*x).to_bits().to_le_bytes())),
            _ => s.iter().zip(d.chunks_exact_mut(4)).for_each(|(x, o)| o.copy_from_slice(&x.to_le_bytes())),
        }
        // Branch-free: the exponent of inf/NaN is all ones.
        s.iter().fold(true, |ok, x| ok & x.is_finite())
    };
    Ok(src.par_chunks(CHUNK).zip(dst.par_chunks_mut(CHUNK * size)).map(narrow).reduce(|| true, |a, b| a & b))
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

/// `w += scaling * product(B, A)` in f32. `a` is (r, a_cols) and `b` is (b_rows, r), row-major;
/// `w` is (b_rows, a_cols) for Normal and (a_cols, b_rows) for Transposed.
pub fn add_low_rank(w: &mut [f32], a: &[f32], b: &[f32], r: usize, layout: Layout, scaling: f32) {
    let a_cols = if r == 0 { 0 } else { a.len() / r };
    let b_rows = if r == 0 { 0 } else { b.len() / r };
    let (rows, cols) = match layout {
        Layout::Normal => (b_rows, a_cols),
        Layout::Transposed => (a_cols, b_rows),
    };
    assert_eq!(w.len(), rows * cols, "caller checked shapes");
    assert_eq!(a.len(), r * a_cols);
    assert_eq!(b.len(), r * b_rows);
    if rows == 0 || cols == 0 || r == 0 {
        return;
    }
    // Rows of W are independent, so split them across threads; each block is one sgemm.
    let block = (rows / (4 * rayon::current_num_threads())).clamp(16, 1024);
    w.par_chunks_mut(block * cols).enumerate().for_each(|(i, chunk)| {
        let row0 = i * block;
        let m = chunk.len() / cols;
        // Left factor rows [row0, row0+m) and its strides; the right factor is shared.
        let (lhs, rsl, csl, rhs, rsr, csr) = match layout {
            // C = B @ A: B (rows, r) row-major, A (r, cols) row-major.
            Layout::Normal => (&b[row0 * r..], r as isize, 1, a, cols as isize, 1),
            // C = A^T @ B^T: A^T[i][k] = A[k][i], B^T[k][j] = B[j][k].
            Layout::Transposed => (&a[row0..], 1, rows as isize, b, 1, r as isize),
        };
        // SAFETY: the strides describe in-bounds (m x r) and (r x cols) views: for Normal the left
        // view spans rows row0..row0+m of B, for Transposed columns row0..row0+m of A; `chunk`
        // is an exclusive (m x cols) row-major block of W.
        unsafe {
            matrixmultiply::sgemm(
                m, r, cols, scaling,
                lhs.as_ptr(), rsl, csl,
                rhs.as_ptr(), rsr, csr,
                1.0, chunk.as_mut_ptr(), cols as isize, 1,
            );
        }
    });
}

/// DoRA: scale each output feature of `w` to the learned magnitude, `w *= m / ||w||` with the norm
/// over the input dimension. Output features are rows for Normal and columns for Transposed.
pub fn dora_rescale(w: &mut [f32], rows: usize, cols: usize, magnitude: &[f32], layout: Layout) {
    match layout {
        Layout::Normal => {
            assert_eq!(magnitude.len(), rows);
            w.par_chunks_mut(cols.max(1)).zip(magnitude.par_iter()).for_each(|(row, &m)| {
                let norm = row.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt() as f32;
                let f = m / norm;
                row.iter_mut().for_each(|x| *x *= f);
            });
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
        add_low_rank(&mut w, &a, &b, r, Layout::Normal, 2.0);
        for (x, y) in w.iter().zip(&want) {
            assert!((x - (1.0 + 2.0 * y)).abs() < 1e-5);
        }
        let mut wt = vec![0.0f32; rows * cols];
        add_low_rank(&mut wt, &a, &b, r, Layout::Transposed, 1.0);
        for i in 0..rows {
            for j in 0..cols {
                assert!((wt[j * rows + i] - want[i * cols + j]).abs() < 1e-5);
            }
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
