//! llama.cpp's importance-weighted quantization of the GGUF block types (what `llama-quantize`
//! runs when given an importance matrix: `quantize_q5_0`, `quantize_q5_1`, `quantize_q4_K`,
//! `quantize_q5_K` and `quantize_q6_K` with `quant_weights`), so the blocks are the ones llama.cpp
//! would write for the same weights and importance, and its dequantizer reads them as any other.
//!
//! The importance is one non-negative value per input column (the mean square of that column's
//! activations over calibration text). Each search minimises the importance-weighted squared error
//! instead of the plain one: Q5_0 tries 19 scales (`make_qx_quants`), Q5_1 and the 32-value groups
//! of Q4_K / Q5_K fit scale and offset by weighted least squares over 37 candidate level
//! assignments (`make_qkx3_quants`), and Q4_K / Q5_K then choose their 6-bit scales and mins by a
//! weighted search too (`make_qp_quants`). Q8_0 takes no importance (llama.cpp's neither).
//!
//! Rows are independent (Q5_0 / Q5_1 weigh by the row's mean square), so rows spread over
//! rayon's pool and the bytes do not depend on the thread count. The f32 operations follow ggml's
//! order, as in `ggml.rs`.

use rayon::prelude::*;

use super::ggml::{
    fp16_bytes, ggml_packed_len, k_store, make_qkx2_quants, make_qx_quants_by, nearest_int, pack_q5, put_scale_min_k4,
    q6_k_finish, q8_0_block, scale_min_k4, GgmlType, KSearch, GROUP_MAX_EPS,
};
use crate::error::{Error, Result};

/// Quantize `x` (rows of `row_len` f32 values) as `ty` into `out` with `importance` (`row_len`
/// non-negative values, one per column) weighting each value's error. Errors as
/// [`super::quantize_ggml`], and `InvalidArgument` naming the tensor when `importance` has the
/// wrong length or a negative or non-finite value.
pub fn quantize_ggml_weighted(
    x: &[f32],
    row_len: usize,
    ty: GgmlType,
    name: &str,
    importance: &[f32],
    out: &mut [u8],
) -> Result<()> {
    let expected = ggml_packed_len(x.len(), row_len, ty, name)?;
    if out.len() != expected {
        return Err(Error::arg(format!(
            "tensor '{name}': the {} output has {} bytes, expected {expected}",
            ty.name(),
            out.len()
        )));
    }
    if importance.len() != row_len {
        return Err(Error::arg(format!(
            "tensor '{name}': the importance has {} values, expected {row_len} (one per input column)",
            importance.len()
        )));
    }
    if let Some(at) = importance.iter().position(|v| !(v.is_finite() && *v >= 0.0)) {
        return Err(Error::arg(format!(
            "tensor '{name}': importance value {} at column {at} is not a finite non-negative number; \
             recollect the importance matrix",
            importance[at]
        )));
    }
    if let Some(at) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::data(format!(
            "tensor '{name}' holds {} at flat index {at}; GGUF quantization needs finite weights \
             (the checkpoint is corrupt or training diverged)",
            x[at]
        )));
    }
    if x.is_empty() {
        return Ok(());
    }
    let row_bytes = row_len / ty.block_elems() * ty.block_bytes();
    x.par_chunks(row_len)
        .zip(out.par_chunks_mut(row_bytes))
        .with_min_len(8)
        .for_each(|(xr, or)| weighted_row(ty, xr, importance, or));
    Ok(())
}

fn weighted_row(ty: GgmlType, x: &[f32], qw: &[f32], out: &mut [u8]) {
    let (n, bytes) = (ty.block_elems(), ty.block_bytes());
    let blocks = x.chunks_exact(n).zip(qw.chunks_exact(n)).zip(out.chunks_exact_mut(bytes));
    match ty {
        GgmlType::Q8_0 => {
            for ((xb, _), ob) in blocks {
                q8_0_block(xb, ob);
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let mut sum_x2 = 0.0f32;
            for &v in x {
                sum_x2 += v * v;
            }
            let sigma2 = sum_x2 / x.len() as f32;
            for ((xb, qb), ob) in blocks {
                let w: [f32; 32] = std::array::from_fn(|j| qb[j] * (sigma2 + xb[j] * xb[j]).sqrt());
                if ty == GgmlType::Q5_0 {
                    q5_0_weighted(xb, &w, ob);
                } else {
                    q5_1_weighted(xb, &w, ob);
                }
            }
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            for ((xb, qb), ob) in blocks {
                k_weighted(ty, xb, qb, ob);
            }
        }
        GgmlType::Q6K => {
            for ((xb, qb), ob) in blocks {
                let mut levels = [0u8; 256];
                let mut scales = [0.0f32; 16];
                for (ib, scale) in scales.iter_mut().enumerate() {
                    let r = 16 * ib..16 * ib + 16;
                    *scale = make_qx_quants_weighted(&xb[r.clone()], &qb[r.clone()], 32, &mut levels[r]);
                }
                q6_k_finish(xb, &scales, levels, ob);
            }
        }
    }
}

/// ggml's `make_qx_quants` (`rmse_type` 1) with weights `w` (see [`make_qx_quants_by`]).
fn make_qx_quants_weighted(x: &[f32], w: &[f32], nmax: i32, l: &mut [u8]) -> f32 {
    make_qx_quants_by(x, nmax, l, |i, _| w[i])
}

fn q5_0_weighted(x: &[f32], w: &[f32; 32], out: &mut [u8]) {
    let mut q = [0u8; 32];
    let d = make_qx_quants_weighted(x, w, 16, &mut q);
    out[..2].copy_from_slice(&fp16_bytes(d));
    let (qh, qs) = out[2..].split_at_mut(4);
    pack_q5(&q, qh, qs);
}

fn q5_1_weighted(x: &[f32], w: &[f32; 32], out: &mut [u8]) {
    let mut q = [0u8; 32];
    let (d, neg_min) = make_qkx2_quants(x, w, 31, -0.9, 0.05, 36, &mut q);
    out[..2].copy_from_slice(&fp16_bytes(d));
    out[2..4].copy_from_slice(&fp16_bytes(-neg_min));
    let (qh, qs) = out[4..].split_at_mut(4);
    pack_q5(&q, qh, qs);
}

/// A Q4_K / Q5_K block, llama.cpp's `quantize_row_q4_K_impl` / `q5_K_impl` with weights: each
/// 32-value group searched with weights `qw * sqrt(sigma2 + x^2)` (sigma2 twice the block's mean
/// square), the 6-bit scales and mins chosen by [`make_qp_quants`] weighted by the groups' weight
/// sums, then every value requantized against the stored scales.
fn k_weighted(ty: GgmlType, x: &[f32], qw: &[f32], out: &mut [u8]) {
    let nmax = KSearch::of(ty).nmax;
    let mut sum_x2 = 0.0f32;
    for &v in x {
        sum_x2 += v * v;
    }
    let sigma2 = 2.0 * sum_x2 / 256.0;
    let mut levels = [0u8; 256];
    let (mut scales, mut mins, mut sw) = ([0.0f32; 8], [0.0f32; 8], [0.0f32; 8]);
    for j in 0..8 {
        let (xs, qs) = (&x[32 * j..32 * j + 32], &qw[32 * j..32 * j + 32]);
        let w: [f32; 32] = std::array::from_fn(|l| qs[l] * (sigma2 + xs[l] * xs[l]).sqrt());
        let mut sumw = 0.0f32;
        for &v in &w {
            sumw += v;
        }
        sw[j] = sumw;
        let (scale, min) = make_qkx2_quants(xs, &w, nmax, -0.9, 0.05, 36, &mut levels[32 * j..32 * j + 32]);
        scales[j] = scale;
        mins[j] = min;
    }
    let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
    let d_block = make_qp_quants(&scales, 63, &mut ls, &sw);
    let m_block = make_qp_quants(&mins, 63, &mut lm, &sw);
    let chosen: [(u8, u8); 8] =
        std::array::from_fn(|j| if ty == GgmlType::Q5K { (ls[j].min(63), lm[j].min(63)) } else { (ls[j], lm[j]) });
    put_scale_min_k4(&mut out[4..16], &chosen);
    // the values llama.cpp's get_scale_min_k4 reads back from the packed bytes
    let six_bit: [(u8, u8); 8] = std::array::from_fn(|j| scale_min_k4(&out[4..16], j));
    k_store(ty, x, &six_bit, d_block, m_block, levels, out);
}

/// ggml's `make_qp_quants`: non-negative levels 0..=nmax for the non-negative `x` with weights
/// `w` (a K block's group scales or mins); returns the scale. Tries 9 scales near `max / nmax`,
/// then moves single levels while that improves the weighted fit (at most 5 rounds).
fn make_qp_quants(x: &[f32; 8], nmax: i32, l: &mut [u8; 8], w: &[f32; 8]) -> f32 {
    let mut max = 0.0f32;
    for &v in x {
        max = if max > v { max } else { v };
    }
    if max < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let nmax_f = nmax as f32;
    let mut iscale = nmax_f / max;
    for (li, &v) in l.iter_mut().zip(x) {
        *li = nearest_int(iscale * v) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0.0f32;
    for i in 0..8 {
        let diff = x[i] - scale * l[i] as f32;
        best_mse += w[i] * diff * diff;
    }
    for is in -4..=4 {
        if is == 0 {
            continue;
        }
        let iscale_is = (0.1 * is as f32 + nmax_f) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0.0f32;
        for i in 0..8 {
            let q = nearest_int(iscale_is * x[i]).min(nmax);
            let diff = x[i] - scale_is * q as f32;
            mse += w[i] * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    let mut li = [0i32; 8];
    for i in 0..8 {
        li[i] = nearest_int(iscale * x[i]).min(nmax);
        let q = li[i] as f32;
        sumlx += w[i] * x[i] * q;
        suml2 += w[i] * q * q;
    }
    for _ in 0..5 {
        let mut changed = false;
        for i in 0..8 {
            let q = li[i] as f32;
            let mut slx = sumlx - w[i] * x[i] * q;
            let mut sl2 = suml2 - w[i] * q * q;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(x[i] * sl2 / slx).min(nmax);
                if new_l != li[i] {
                    let nq = new_l as f32;
                    slx += w[i] * x[i] * nq;
                    sl2 += w[i] * nq * nq;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        li[i] = new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    for i in 0..8 {
        l[i] = li[i] as u8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::ggml::tests::sample;
    use crate::quant::quantize_ggml;

    #[test]
    fn bad_importance_gets_one_line_errors_naming_the_tensor() {
        let x = sample(512, 1);
        let mut out = vec![0u8; ggml_packed_len(512, 256, GgmlType::Q4K, "w").unwrap()];
        let err = quantize_ggml_weighted(&x, 256, GgmlType::Q4K, "blk.0.ffn_up.weight", &[1.0; 255], &mut out);
        let msg = err.unwrap_err().to_string();
        assert!(msg.contains("blk.0.ffn_up.weight") && msg.contains("255") && !msg.contains('\n'), "{msg}");
        let mut qw = vec![1.0f32; 256];
        qw[7] = f32::NAN;
        let msg = quantize_ggml_weighted(&x, 256, GgmlType::Q4K, "w", &qw, &mut out).unwrap_err().to_string();
        assert!(msg.contains("column 7"), "{msg}");
        qw[7] = -1.0;
        assert!(quantize_ggml_weighted(&x, 256, GgmlType::Q4K, "w", &qw, &mut out).is_err());
        let mut bad = x.clone();
        bad[300] = f32::INFINITY;
        let err = quantize_ggml_weighted(&bad, 256, GgmlType::Q4K, "w", &[1.0; 256], &mut out).unwrap_err();
        assert!(matches!(err, Error::InvalidData(_)) && err.to_string().contains("index 300"), "{err}");
    }

    #[test]
    fn q8_0_ignores_the_importance() {
        let x = sample(1024, 2);
        let qw: Vec<f32> = (0..512).map(|i| i as f32).collect();
        let mut a = vec![0u8; ggml_packed_len(1024, 512, GgmlType::Q8_0, "w").unwrap()];
        let mut b = a.clone();
        quantize_ggml(&x, 512, GgmlType::Q8_0, "w", &mut a).unwrap();
        quantize_ggml_weighted(&x, 512, GgmlType::Q8_0, "w", &qw, &mut b).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn zero_rows_stay_zero_and_work_for_every_type() {
        let x = vec![0.0f32; 512];
        for ty in GgmlType::ALL {
            let mut out = vec![7u8; ggml_packed_len(512, 256, ty, "w").unwrap()];
            quantize_ggml_weighted(&x, 256, ty, "w", &[1.0; 256], &mut out).unwrap();
            assert!(out.iter().all(|&b| b == 0), "{ty:?}");
        }
    }
}
