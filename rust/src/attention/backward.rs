//! The backward: each (batch, head) part recomputes P block by block, writes its rows of dQ and
//! sums its head's dK and dV; the heads of a group are then added in head order.

use super::pack::pack_transposed;
use super::row::{cap_row, dot, exp_row};
use super::tile::{rows, wide_tiles};
use super::{at, bad, check_backward, check_options, first_key, Dims, Input, Output, BLOCK, LANES, MR};
use crate::error::Result;
use crate::omp::{self, Shared};
use crate::rope::Strides;
use crate::simd::multiversion512;

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

/// The gradients of [`forward`](fn@super::forward): `dq` (B, H, T, D), `dk` and `dv` (B, Hkv, T, D), overwritten.
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
    let (window, cap) = check_options(&d, window, softcap)?;
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
