//! SwiGLU (`silu(gate) * up`) forward and backward for float32 on the CPU, one pass each.
//!
//! torch spends ~10 elementwise passes on the backward; here each element is read and written
//! once. `exp` is a vectorizable polynomial (Cephes' expf: range reduction by ln 2, degree-6
//! polynomial, within 2 ulp over the float range) because the libm call does not vectorize.

use crate::error::{Error, Result};
use crate::omp::{self, Shared};
use crate::simd::multiversion512;

/// e^x for float32, 2-ulp accurate, branch-free (so loops over it vectorize).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n without a float-to-int conversion (Rust's saturating `as` kept LLVM from vectorizing
    // the loop): n + 127 is a whole number in 1..=254, and adding 2^23 puts it in the mantissa bits
    let biased = (n + 127.0 + 8_388_608.0).to_bits() & 0x7f_ffff;
    e * f32::from_bits(biased << 23)
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

multiversion512! {
    fn forward_seq(gate: &[f32], up: &[f32], y: &mut [f32]) {
        for ((o, &g), &u) in y.iter_mut().zip(gate).zip(up) {
            *o = g * sigmoid(g) * u;
        }
    }
}

multiversion512! {
    fn backward_seq(dy: &[f32], gate: &[f32], up: &[f32], d_gate: &mut [f32], d_up: &mut [f32]) {
        for ((((dg, du), &d), &g), &u) in d_gate.iter_mut().zip(d_up.iter_mut()).zip(dy).zip(gate).zip(up) {
            let s = sigmoid(g);
            *du = d * g * s;
            *dg = d * u * s * (1.0 + g * (1.0 - s));
        }
    }
}

/// One element of [`backward_weighted`]'s row: (the dot's term, d_gate, d_up), one sigmoid.
#[inline(always)]
fn weighted_element(d: f32, g: f32, u: f32, w: f32) -> (f32, f32, f32) {
    let s = sigmoid(g);
    let gs = g * s;
    let dw = d * w;
    (d * gs * u, dw * u * s * (1.0 + g * (1.0 - s)), dw * gs)
}

multiversion512! {
    fn backward_weighted_row(dy: &[f32], gate: &[f32], up: &[f32], w: f32, d_gate: &mut [f32], d_up: &mut [f32]) -> f32 {
        // one pass: the dot <dy, silu(gate) * up> in 16 lanes (one strict sum would not
        // vectorize) beside the gradients of w * dy
        let mut lanes = [0.0f32; 16];
        let tail = dy.len() / 16 * 16;
        let chunks = dy[..tail].chunks_exact(16).zip(gate[..tail].chunks_exact(16)).zip(up[..tail].chunks_exact(16));
        let outs = d_gate[..tail].chunks_exact_mut(16).zip(d_up[..tail].chunks_exact_mut(16));
        for (((d, g), u), (dg, du)) in chunks.zip(outs) {
            for l in 0..16 {
                let (dot, a, b) = weighted_element(d[l], g[l], u[l], w);
                lanes[l] += dot;
                dg[l] = a;
                du[l] = b;
            }
        }
        let mut dot = lanes.iter().sum::<f32>();
        for i in tail..dy.len() {
            let (t, a, b) = weighted_element(dy[i], gate[i], up[i], w);
            dot += t;
            d_gate[i] = a;
            d_up[i] = b;
        }
        dot
    }
}

fn same_len(what: &str, lens: &[usize]) -> Result<()> {
    if lens.iter().all(|&n| n == lens[0]) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!("swiglu {what}: arrays of {lens:?} values; expected one length")))
    }
}

/// `y = silu(gate) * up`.
pub fn forward(gate: &[f32], up: &[f32], y: &mut [f32]) -> Result<()> {
    same_len("forward (gate, up, y)", &[gate.len(), up.len(), y.len()])?;
    let out = Shared::new(y);
    // SAFETY: each range a..b is written by one part only.
    omp::for_ranges(gate.len(), &|a, b| forward_seq(&gate[a..b], &up[a..b], unsafe { out.range(a, b) }));
    Ok(())
}

/// With s = sigmoid(gate): `d_up = dy * gate * s`, `d_gate = dy * up * s * (1 + gate * (1 - s))`.
pub fn backward(dy: &[f32], gate: &[f32], up: &[f32], d_gate: &mut [f32], d_up: &mut [f32]) -> Result<()> {
    same_len("backward (dy, gate, up, d_gate, d_up)", &[dy.len(), gate.len(), up.len(), d_gate.len(), d_up.len()])?;
    let (dg, du) = (Shared::new(d_gate), Shared::new(d_up));
    // SAFETY: each range a..b of each output is written by one part only.
    omp::for_ranges(dy.len(), &|a, b| {
        backward_seq(&dy[a..b], &gate[a..b], &up[a..b], unsafe { dg.range(a, b) }, unsafe { du.range(a, b) })
    });
    Ok(())
}

/// The backward of rows `y_r = w_r * silu(gate_r) * up_r` (`w`: one weight per row, rows of
/// `dy.len() / w.len()` values) for the upstream gradient `dy`: `d_gate`, `d_up` as [`backward`]
/// gives them for `w_r * dy_r`, and `d_w_r = <dy_r, silu(gate_r) * up_r>` (the gradient of each
/// row's weight). A mixture-of-experts block weights each (token, expert) row of its experts'
/// outputs; this is that weight's gradient with the SwiGLU output rebuilt in the same pass instead
/// of the weighted outputs kept from forward.
pub fn backward_weighted(
    dy: &[f32],
    gate: &[f32],
    up: &[f32],
    w: &[f32],
    d_gate: &mut [f32],
    d_up: &mut [f32],
    d_w: &mut [f32],
) -> Result<()> {
    same_len(
        "weighted backward (dy, gate, up, d_gate, d_up)",
        &[dy.len(), gate.len(), up.len(), d_gate.len(), d_up.len()],
    )?;
    same_len("weighted backward (w, d_w)", &[w.len(), d_w.len()])?;
    let rows = w.len();
    if !dy.len().is_multiple_of(rows) {
        return Err(Error::InvalidArgument(format!(
            "swiglu weighted backward: {} values do not split into {rows} rows (one weight per row)",
            dy.len()
        )));
    }
    let width = dy.len().checked_div(rows).unwrap_or(0);
    let (dg, du, dw) = (Shared::new(d_gate), Shared::new(d_up), Shared::new(d_w));
    let ok = omp::by_rows(rows, width, &|a, b| {
        // SAFETY: rows a..b of each output are written by this part only.
        let (dg, du) = unsafe { (dg.range(a * width, b * width), du.range(a * width, b * width)) };
        let dw = unsafe { dw.range(a, b) };
        for (i, r) in (a..b).enumerate() {
            let (lo, hi) = (r * width, (r + 1) * width);
            let at = i * width..(i + 1) * width;
            dw[i] =
                backward_weighted_row(&dy[lo..hi], &gate[lo..hi], &up[lo..hi], w[r], &mut dg[at.clone()], &mut du[at]);
        }
    });
    assert!(ok, "a part of a parallel kernel panicked");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_libm() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp_f32(x), (x as f64).exp());
            assert!(((got as f64 - want) / want).abs() < 3e-7, "exp({x}) = {got}, want {want}");
            x += 0.0137;
        }
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1000.0) < 1e-37 && exp_f32(1000.0) > 1e38);
    }

    #[test]
    fn forward_and_backward_match_the_formulas() {
        let gate: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) / 40.0).collect();
        let up: Vec<f32> = (0..1000).map(|i| ((i * 7 % 13) as f32 - 6.0) / 3.0).collect();
        let dy: Vec<f32> = (0..1000).map(|i| ((i * 5 % 11) as f32 - 5.0) / 2.0).collect();
        let mut y = vec![0.0; 1000];
        forward(&gate, &up, &mut y).unwrap();
        let (mut dg, mut du) = (vec![0.0; 1000], vec![0.0; 1000]);
        backward(&dy, &gate, &up, &mut dg, &mut du).unwrap();
        for i in 0..1000 {
            let (g, u, d) = (gate[i] as f64, up[i] as f64, dy[i] as f64);
            let s = 1.0 / (1.0 + (-g).exp());
            let close = |a: f32, b: f64| (a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs());
            assert!(close(y[i], g * s * u));
            assert!(close(du[i], d * g * s));
            assert!(close(dg[i], d * u * s * (1.0 + g * (1.0 - s))));
        }
        assert!(forward(&gate, &up[..3], &mut y).is_err());
    }

    #[test]
    fn weighted_backward_scales_the_gradients_and_gives_each_rows_dot() {
        // 3 rows of 37 values: a width with a tail past the 16 lanes
        let n = 3 * 37;
        let gate: Vec<f32> = (0..n).map(|i| (i as f32 - 50.0) / 9.0).collect();
        let up: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) / 3.0).collect();
        let dy: Vec<f32> = (0..n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 2.0).collect();
        let w = [0.25f32, 1.0, -2.0];
        let (mut dg, mut du, mut dw) = (vec![0.0; n], vec![0.0; n], vec![0.0; 3]);
        backward_weighted(&dy, &gate, &up, &w, &mut dg, &mut du, &mut dw).unwrap();
        for r in 0..3 {
            let mut dot = 0.0f64;
            for i in r * 37..(r + 1) * 37 {
                let (g, u, d) = (gate[i] as f64, up[i] as f64, dy[i] as f64 * w[r] as f64);
                let s = 1.0 / (1.0 + (-g).exp());
                let close = |a: f32, b: f64| (a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs());
                assert!(close(du[i], d * g * s));
                assert!(close(dg[i], d * u * s * (1.0 + g * (1.0 - s))));
                dot += dy[i] as f64 * g * s * u;
            }
            assert!((dw[r] as f64 - dot).abs() <= 1e-4 * (1.0 + dot.abs()), "row {r}: {} vs {dot}", dw[r]);
        }
        assert!(backward_weighted(&dy, &gate, &up, &w[..2], &mut dg, &mut du, &mut dw[..2]).is_err());
        assert!(backward_weighted(&dy, &gate, &up, &w, &mut dg, &mut du, &mut dw[..2]).is_err());
    }
}
