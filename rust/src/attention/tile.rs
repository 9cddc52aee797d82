//! The register tile every product of the attention kernels runs on: MR query rows times up to
//! NV 16-lane vectors of accumulators, multiply-adds in a fixed order; [`rows`] walks a row block
//! across 64-column tiles. [`wide_tiles`] says whether the AVX-512 form (`super::x86`) runs.

#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{LANES, NV};

/// `c[i][j] = (c[i][j] if accumulate, else 0) + sum over k in 0..kd of a[i*ars + k*acs] * b[k*brs + j]`
/// for i < M, j < W * 16: multiply-adds in k order.
///
/// SAFETY: every index named above is inside its allocation.
#[inline(always)]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn tile<const M: usize, const W: usize>(
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
    let mut acc = [[[0f32; LANES]; W]; M];
    if accumulate {
        for i in 0..M {
            for w in 0..W {
                for l in 0..LANES {
                    acc[i][w][l] = *c.add(i * crs + w * LANES + l);
                }
            }
        }
    }
    for k in 0..kd {
        let bk = b.add(k * brs);
        let mut bv = [[0f32; LANES]; W];
        for w in 0..W {
            for l in 0..LANES {
                bv[w][l] = *bk.add(w * LANES + l);
            }
        }
        let ak = a.add(k * acs);
        for i in 0..M {
            let av = *ak.add(i * ars);
            for w in 0..W {
                for l in 0..LANES {
                    acc[i][w][l] = av.mul_add(bv[w][l], acc[i][w][l]);
                }
            }
        }
    }
    for i in 0..M {
        for w in 0..W {
            for l in 0..LANES {
                *c.add(i * crs + w * LANES + l) = acc[i][w][l];
            }
        }
    }
}

/// [`tile`] for `m` (1..=MR) rows of `w` (1..=NV) vectors; `wide`: on AVX-512 registers.
///
/// SAFETY: as [`tile`]; `wide` only where the CPU has AVX-512F.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_mw(
    wide: bool,
    m: usize,
    w: usize,
    kd: usize,
    a: *const f32,
    ars: usize,
    acs: usize,
    b: *const f32,
    brs: usize,
    c: *mut f32,
    crs: usize,
    acc: bool,
) {
    macro_rules! one {
        ($m:literal, $w:literal) => {{
            #[cfg(target_arch = "x86_64")]
            if wide {
                return x86::tile::<$m, $w>(kd, a, ars, acs, b, brs, c, crs, acc);
            }
            tile::<$m, $w>(kd, a, ars, acs, b, brs, c, crs, acc)
        }};
    }
    macro_rules! widths {
        ($m:literal) => {
            match w {
                1 => one!($m, 1),
                2 => one!($m, 2),
                3 => one!($m, 3),
                _ => one!($m, 4),
            }
        };
    }
    match m {
        1 => widths!(1),
        2 => widths!(2),
        3 => widths!(3),
        4 => widths!(4),
        5 => widths!(5),
        _ => widths!(6),
    }
}

/// `m` rows (<= MR) of `c[.., 0..n] (+)= a @ b` with n a multiple of 16, in 64-column tiles.
///
/// SAFETY: as [`tile`], for every column below `n`; `wide` only where the CPU has AVX-512F.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn rows(
    wide: bool,
    m: usize,
    n: usize,
    kd: usize,
    a: *const f32,
    ars: usize,
    acs: usize,
    b: *const f32,
    brs: usize,
    c: *mut f32,
    crs: usize,
    acc: bool,
) {
    for j in (0..n).step_by(NV * LANES) {
        let w = ((n - j) / LANES).min(NV);
        tile_mw(wide, m, w, kd, a, ars, acs, b.add(j), brs, c.add(j), crs, acc);
    }
}

/// Whether the tiles run on AVX-512 registers (the CPU has it and `TUNEX_SIMD` allows it).
pub(super) fn wide_tiles() -> bool {
    #[cfg(target_arch = "x86_64")]
    return crate::simd::has_avx512();
    #[allow(unreachable_code)]
    false
}
