//! The register tile of `tile.rs` on AVX-512 registers: the same multiply-adds in the same order, so
//! the same bytes.

use super::LANES;
use std::arch::x86_64::*;

/// SAFETY: as the portable `tile` in `tile.rs`; the CPU has AVX-512F.
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
pub(super) unsafe fn tile<const M: usize, const W: usize>(
    kd: usize,
    a: *const f32,
    ars: usize,
    acs: usize,
    b: *const f32,
    brs: usize,
    c: *mut f32,
    crs: usize,
    accumulate: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); W]; M];
    if accumulate {
        for i in 0..M {
            for w in 0..W {
                acc[i][w] = _mm512_loadu_ps(c.add(i * crs + w * LANES));
            }
        }
    }
    for k in 0..kd {
        let bk = b.add(k * brs);
        let mut bv = [_mm512_setzero_ps(); W];
        for w in 0..W {
            bv[w] = _mm512_loadu_ps(bk.add(w * LANES));
        }
        let ak = a.add(k * acs);
        for i in 0..M {
            let av = _mm512_set1_ps(*ak.add(i * ars));
            for w in 0..W {
                acc[i][w] = _mm512_fmadd_ps(av, bv[w], acc[i][w]);
            }
        }
    }
    for i in 0..M {
        for w in 0..W {
            _mm512_storeu_ps(c.add(i * crs + w * LANES), acc[i][w]);
        }
    }
}
