//! GPTQ's column loop over one run of columns whose grid is fixed (`ggml_levels`): each column is
//! rounded to its nearest level, its error divided by the factor's diagonal, and that error moves
//! the run's later columns (row by row: `w[j] -= u[c, j] * err[c]`). The product that carries a run's
//! errors to the columns after it stays with the caller (one large matrix product).
//!
//! The weights come column-major (one input column of all rows contiguous), so every step is a
//! loop over rows; rows are independent, so large runs are split by rows across the cores. The
//! arithmetic is the float32 of the torch loop it replaced, in the same order:
//! `k = clamp(round_half_even((w + b) / a), lo, hi)` (`k = 0` where `a == 0`), `q = a * k - b`,
//! `err = (w - q) / u[c, c]`.

use rayon::prelude::*;

use super::ggml::GgmlType;
use super::ggml_levels::level_range;
use crate::error::{Error, Result};
use crate::simd::multiversion;

/// Rows per parallel task: below this many rows a run is one task.
const ROWS_PER_TASK: usize = 256;

/// One run of `m = w.len() / rows` columns of `rows` values each (column-major), rounded by GPTQ
/// to the grid `a * k - b` (`a`, `b`: one per value, as [`super::ggml_grid`] gives them
/// transposed to columns) of block type `ty`. `u`: the factor's rows for the run's columns
/// restricted to them (`m x m`, row-major; only the upper triangle is read). Writes each value's
/// level, the value it reads back as and its error scaled by `1 / u[c, c]` (what moves the
/// columns after the run), and moves the run's later columns of `w` by the earlier ones' errors.
///
/// Errors (`InvalidArgument` naming the tensor, one line) before writing anything: lengths that
/// do not match, a NaN / inf in `w`, `a`, `b` or `u`, a diagonal of `u` not positive.
#[allow(clippy::too_many_arguments)]
pub fn ggml_gptq_run(
    w: &mut [f32],
    rows: usize,
    a: &[f32],
    b: &[f32],
    u: &[f32],
    ty: GgmlType,
    name: &str,
    levels: &mut [i8],
    values: &mut [f32],
    err: &mut [f32],
) -> Result<()> {
    let bad = |msg: String| Err(Error::arg(format!("tensor '{name}': {msg}")));
    if rows == 0 || w.is_empty() || !w.len().is_multiple_of(rows) {
        return bad(format!("{} weights are not whole columns of {rows} rows", w.len()));
    }
    let m = w.len() / rows;
    for (what, got) in [
        ("the scale grid a", a.len()),
        ("the offset grid b", b.len()),
        ("the levels output", levels.len()),
        ("the values output", values.len()),
        ("the errors output", err.len()),
    ] {
        if got != w.len() {
            return bad(format!("{what} has {got} values, expected {} ({m} columns of {rows})", w.len()));
        }
    }
    if u.len() != m * m {
        return bad(format!("the factor has {} values, expected {} ({m} x {m} for {m} columns)", u.len(), m * m));
    }
    for (what, data) in [("the weights", &*w), ("the scale grid a", a), ("the offset grid b", b), ("the factor", u)] {
        if let Some(at) = data.iter().position(|v| !v.is_finite()) {
            return bad(format!("{what} hold {} at index {at}; GPTQ needs finite values", data[at]));
        }
    }
    if let Some(c) = (0..m).find(|&c| u[c * m + c] <= 0.0) {
        return bad(format!("the factor's diagonal is {} at column {c}, expected positive", u[c * m + c]));
    }
    let (lo, hi) = level_range(ty);
    let (lo, hi) = (lo as f32, hi as f32);
    let per = if rows < 2 * ROWS_PER_TASK {
        rows
    } else {
        rows.div_ceil(rayon::current_num_threads().max(1)).next_multiple_of(64).max(ROWS_PER_TASK)
    };
    // each task's slices: its rows of every column
    let tasks = rows.div_ceil(per);
    let mut parts: Vec<Task> = (0..tasks).map(|_| Task::default()).collect();
    for (t, piece) in pieces_mut(w, rows, per) {
        parts[t].w.push(piece);
    }
    for (t, piece) in pieces_mut(levels, rows, per) {
        parts[t].k.push(piece);
    }
    for (t, piece) in pieces_mut(values, rows, per) {
        parts[t].q.push(piece);
    }
    for (t, piece) in pieces_mut(err, rows, per) {
        parts[t].e.push(piece);
    }
    for (t, piece) in a.chunks(rows).flat_map(|column| column.chunks(per).enumerate()) {
        parts[t].a.push(piece);
    }
    for (t, piece) in b.chunks(rows).flat_map(|column| column.chunks(per).enumerate()) {
        parts[t].b.push(piece);
    }
    if tasks == 1 {
        run_rows(&mut parts[0], u, m, lo, hi);
    } else {
        parts.par_iter_mut().for_each(|task| run_rows(task, u, m, lo, hi));
    }
    Ok(())
}

/// One task's rows of every column of a run.
#[derive(Default)]
struct Task<'a> {
    w: Vec<&'a mut [f32]>,
    k: Vec<&'a mut [i8]>,
    q: Vec<&'a mut [f32]>,
    e: Vec<&'a mut [f32]>,
    a: Vec<&'a [f32]>,
    b: Vec<&'a [f32]>,
}

/// Every column's (`rows` values of `data`) pieces of `per` rows, each with the task it goes to.
fn pieces_mut<T>(data: &mut [T], rows: usize, per: usize) -> impl Iterator<Item = (usize, &mut [T])> {
    data.chunks_mut(rows).flat_map(move |column| column.chunks_mut(per).enumerate())
}

fn run_rows(t: &mut Task<'_>, u: &[f32], m: usize, lo: f32, hi: f32) {
    for c in 0..m {
        let (done, later) = t.w.split_at_mut(c + 1);
        round_column(done[c], t.a[c], t.b[c], [u[c * m + c], lo, hi], t.k[c], t.q[c], t.e[c]);
        for (j, col) in later.iter_mut().enumerate() {
            subtract_scaled(col, u[c * m + c + 1 + j], t.e[c]);
        }
    }
}

multiversion! {
    /// `consts`: the factor's diagonal at this column, the lowest and highest level.
    fn round_column(w: &[f32], a: &[f32], b: &[f32], consts: [f32; 3], k: &mut [i8], q: &mut [f32], e: &mut [f32]) {
        let [diag, lo, hi] = consts;
        for i in 0..w.len() {
            let (x, s, o) = (w[i], a[i], b[i]);
            let level = if s != 0.0 { ((x + o) / s).round_ties_even().clamp(lo, hi) } else { 0.0 };
            let v = s * level - o;
            k[i] = level as i8;
            q[i] = v;
            e[i] = (x - v) / diag;
        }
    }
}

multiversion! {
    fn subtract_scaled(col: &mut [f32], f: f32, e: &[f32]) {
        let f = -f;
        for (x, &e) in col.iter_mut().zip(e) {
            *x = f.mul_add(e, *x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loop written out scalar, one row at a time (what the vectorized, row-split version must equal).
    #[allow(clippy::too_many_arguments)]
    fn reference(w: &mut [f32], rows: usize, a: &[f32], b: &[f32], u: &[f32], lo: f32, hi: f32) -> Vec<f32> {
        let m = w.len() / rows;
        let mut out = vec![0.0f32; w.len()];
        for r in 0..rows {
            for c in 0..m {
                let i = c * rows + r;
                let k = if a[i] != 0.0 { ((w[i] + b[i]) / a[i]).round_ties_even().clamp(lo, hi) } else { 0.0 };
                let q = a[i] * k - b[i];
                out[i] = q;
                let e = (w[i] - q) / u[c * m + c];
                for j in c + 1..m {
                    w[j * rows + r] = (-u[c * m + j]).mul_add(e, w[j * rows + r]);
                }
            }
        }
        out
    }

    fn data(rows: usize, m: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let x = crate::quant::ggml::tests::sample(rows * m * 3 + m * m, 11);
        let w = x[..rows * m].to_vec();
        let a: Vec<f32> =
            x[rows * m..2 * rows * m].iter().map(|v| if *v > 1.5 { 0.0 } else { 0.05 + v.abs() * 0.01 }).collect();
        let b: Vec<f32> = x[2 * rows * m..3 * rows * m].iter().map(|v| v * 0.1).collect();
        let mut u: Vec<f32> = x[3 * rows * m..].iter().map(|v| v * 0.2).collect();
        for c in 0..m {
            u[c * m + c] = 1.0 + u[c * m + c].abs();
        }
        (w, a, b, u)
    }

    #[test]
    fn the_run_is_the_scalar_loop_row_by_row() {
        for rows in [7, 600, 2000] {
            let m = 32;
            let (w, a, b, u) = data(rows, m);
            let mut theirs = w.clone();
            let want = reference(&mut theirs, rows, &a, &b, &u, 0.0, 15.0);
            let mut ours = w.clone();
            let (mut k, mut q, mut e) = (vec![0i8; w.len()], vec![0.0f32; w.len()], vec![0.0f32; w.len()]);
            ggml_gptq_run(&mut ours, rows, &a, &b, &u, GgmlType::Q4K, "w", &mut k, &mut q, &mut e).unwrap();
            assert_eq!(q, want, "rows {rows}");
            assert_eq!(ours, theirs, "rows {rows}");
            for i in 0..w.len() {
                assert!((0..=15).contains(&k[i]));
                assert_eq!(q[i], a[i] * k[i] as f32 - b[i]);
            }
        }
    }

    #[test]
    fn bad_input_is_a_one_line_error_and_writes_nothing() {
        let (rows, m) = (8, 4);
        let (w, a, b, u) = data(rows, m);
        let n = w.len();
        type Change<'a> = Box<dyn Fn(&mut Vec<f32>, &mut Vec<f32>, &mut Vec<f32>) + 'a>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|w, _, _| w[5] = f32::NAN), "weights hold NaN at index 5"),
            (Box::new(|_, a, _| a[3] = f32::INFINITY), "scale grid a hold inf at index 3"),
            (Box::new(move |_, _, u| u[2 * m + 2] = 0.0), "diagonal is 0 at column 2"),
            (Box::new(|_, _, u| u.truncate(15)), "factor has 15 values"),
            (Box::new(|w, _, _| w.truncate(30)), "not whole columns of 8"),
        ];
        for (change, message) in cases {
            let (mut w, mut a, mut u) = (w.clone(), a.clone(), u.clone());
            change(&mut w, &mut a, &mut u);
            let before = w.clone();
            let (mut k, mut q, mut e) = (vec![7i8; n], vec![7.0f32; n], vec![7.0f32; n]);
            let msg =
                ggml_gptq_run(&mut w, rows, &a, &b, &u, GgmlType::Q5_0, "blk.0.attn_q.weight", &mut k, &mut q, &mut e)
                    .unwrap_err()
                    .to_string();
            assert!(msg.contains(message) && msg.contains("blk.0.attn_q.weight") && !msg.contains('\n'), "{msg}");
            assert!(w.iter().zip(&before).all(|(x, y)| x.to_bits() == y.to_bits()));
            assert!(k.iter().all(|&v| v == 7) && q.iter().chain(&e).all(|&v| v == 7.0));
        }
        let (mut k, mut q, mut e) = (vec![0i8; n - 1], vec![0.0f32; n], vec![0.0f32; n]);
        let msg = ggml_gptq_run(&mut w.clone(), rows, &a, &b, &u, GgmlType::Q5_0, "w", &mut k, &mut q, &mut e)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("levels output has 31 values, expected 32"), "{msg}");
    }
}
