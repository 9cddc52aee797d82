//! The forward: each (batch, head) part computes its rows' outputs and log-sum-exps tile by tile.

use super::pack::pack_transposed;
use super::row::{cap_row, exp_row, row_max};
use super::tile::{rows, wide_tiles};
use super::{at, bad, check_forward, check_options, first_key, Dims, Input, Output, LANES, MR};
use crate::error::Result;
use crate::omp::{self, Shared};
use crate::rope::Strides;
use crate::simd::multiversion512;

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

/// `out` = causal attention of `q` over `k`, `v`; `lse` (B, H, T) contiguous gets each row's
/// log-sum-exp of the scaled scores (what [`backward`](fn@super::backward) needs besides the inputs and `out`).
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
    let (window, cap) = check_options(&d, window, softcap)?;
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
