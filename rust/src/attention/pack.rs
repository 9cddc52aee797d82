//! Packing: K^T and V^T per (batch, key head), (D, padded T), so the products read them as rows.

use super::{at, bad, Dims, Input};
use crate::error::Result;
use crate::omp::{self, Shared};
use crate::simd::multiversion512;

multiversion512! {
    /// Head (b, h) of `x` transposed into `o`: (D, padded T), zeros past T.
    fn transpose_head(x: Input<'_>, d: Dims, b: usize, h: usize, o: &mut [f32]) {
        let (t, tp) = (d.seq, d.padded());
        for (k, row) in o.chunks_exact_mut(tp).enumerate() {
            let (live, pad) = row.split_at_mut(t);
            for (i, v) in live.iter_mut().enumerate() {
                *v = x.data[at(x.strides, b, h, i) + k];
            }
            pad.fill(0.0);
        }
    }
}

pub(super) fn pack_transposed(x: &Input<'_>, d: &Dims, out: &mut [f32]) -> Result<()> {
    let block = d.dim * d.padded();
    let dst = Shared::new(out);
    let ok = omp::run(d.batch * d.kv_heads, &|part| {
        // SAFETY: part `part` owns its (D, padded T) block.
        let o = unsafe { dst.range(part * block, (part + 1) * block) };
        transpose_head(*x, *d, part / d.kv_heads, part % d.kv_heads, o);
    });
    ok.then_some(()).ok_or_else(|| bad("a part of the packing panicked".into()))
}
