//! The K-quant searches of `ggml.rs` (`make_qkx2_quants` for Q4_K / Q5_K, `make_qx_quants` for
//! Q6_K) run on 16 groups at once, one group per SIMD lane.
//!
//! A group's search is a chain of order-dependent f32 sums, so it cannot be split inside a group
//! without changing a rounding. Across groups it can: every lane here performs the scalar
//! search's exact sequence of operations on its own group (the same sums in the same order, the
//! same `nearest_int`, divisions kept as divisions, no fused multiply-adds), and the scalar code's
//! branches (a flat group, a group below `GROUP_MAX_EPS`, `det > 0`, a better error) become
//! per-lane selects. The values are held transposed, `[value][lane]`, and every step is a plain
//! loop over the lanes, which LLVM turns into vector instructions where AVX2 / AVX-512 is enabled
//! (the callers at the bottom of this file). A test checks the bytes against the scalar path.

use super::ggml::{k_finish, nearest_int, q6_k_finish, GgmlType, KSearch, GROUP_MAX_EPS};

/// Groups searched at once: two Q4_K / Q5_K blocks (8 groups of 32) or one Q6_K block (16 of 16).
const LANES: usize = 16;

type Fv = [f32; LANES];

/// `[f(0), ..., f(LANES - 1)]`: one step of every lane.
#[inline(always)]
fn each<T: Copy + Default>(f: impl Fn(usize) -> T) -> [T; LANES] {
    let mut r = [T::default(); LANES];
    for (k, r) in r.iter_mut().enumerate() {
        *r = f(k);
    }
    r
}

/// `if take { a } else { b }` per lane, as a blend of bits (LLVM vectorizes the loops around a
/// bit blend more reliably than around a branchy select).
#[inline(always)]
fn select(take: &[bool; LANES], a: &Fv, b: &Fv) -> Fv {
    each(|k| {
        let mask = (take[k] as u32).wrapping_neg();
        f32::from_bits((a[k].to_bits() & mask) | (b[k].to_bits() & !mask))
    })
}

/// `make_qkx2_quants` (rdelta 0.1) on 16 groups of 32 values, `x[i][lane]` with weights `w`:
/// per lane the scale and minus the offset; the levels go to `levels[i][lane]`.
#[inline(always)]
fn qkx2_lanes(x: &[Fv; 32], w: &[Fv; 32], p: KSearch, levels: &mut [[u8; LANES]; 32]) -> (Fv, Fv) {
    let nmax = p.nmax;
    let (mut min, mut max, mut sum_w) = (x[0], x[0], w[0]);
    let mut sum_x = each(|k| sum_w[k] * x[0][k]);
    for (xi, wi) in x.iter().zip(w).skip(1) {
        min = each(|k| if xi[k] < min[k] { xi[k] } else { min[k] });
        max = each(|k| if xi[k] > max[k] { xi[k] } else { max[k] });
        sum_w = each(|k| sum_w[k] + wi[k]);
        sum_x = each(|k| sum_x[k] + wi[k] * xi[k]);
    }
    min = each(|k| if min[k] > 0.0 { 0.0 } else { min[k] });
    let flat = each(|k| max[k] == min[k]);
    let flat_min = min;
    // a plain function, not a closure: a closure LLVM does not inline is compiled without the
    // target features of the function it sits in
    #[inline(always)]
    fn level(iscale: &Fv, min: &Fv, xi: &Fv, nmax: i32) -> [i32; LANES] {
        each(|k| nearest_int(iscale[k] * (xi[k] - min[k])).max(0).min(nmax))
    }
    let nmax_f = nmax as f32;
    // the levels kept so far are level(best_iscale, best_min, x): remade once at the end
    let mut best_iscale = each(|k| nmax_f / (max[k] - min[k]));
    let mut best_min = min;
    let mut scale = each(|k| 1.0 / best_iscale[k]);
    let mut best_error = [0.0f32; LANES];
    for (xi, wi) in x.iter().zip(w) {
        let q = level(&best_iscale, &min, xi, nmax);
        best_error = each(|k| {
            let diff = scale[k] * q[k] as f32 + min[k] - xi[k];
            best_error[k] + wi[k] * (diff * diff)
        });
    }
    let mut laux = [[0.0f32; LANES]; 32];
    for is in 0..=p.nstep {
        let numerator = p.rmin + 0.1 * is as f32 + nmax_f;
        let iscale = each(|k| numerator / (max[k] - min[k]));
        let (mut sum_l, mut sum_l2, mut sum_xl) = ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
        for ((xi, wi), li) in x.iter().zip(w).zip(&mut laux) {
            let q = level(&iscale, &min, xi, nmax);
            *li = each(|k| q[k] as f32);
            sum_l = each(|k| sum_l[k] + wi[k] * li[k]);
            sum_l2 = each(|k| sum_l2[k] + wi[k] * li[k] * li[k]);
            sum_xl = each(|k| sum_xl[k] + wi[k] * li[k] * xi[k]);
        }
        let det = each(|k| sum_w[k] * sum_l2[k] - sum_l[k] * sum_l[k]);
        let this_scale = each(|k| (sum_w[k] * sum_xl[k] - sum_x[k] * sum_l[k]) / det[k]);
        let this_min = each(|k| (sum_l2[k] * sum_x[k] - sum_l[k] * sum_xl[k]) / det[k]);
        let clipped = each(|k| this_min[k] > 0.0);
        let this_scale = select(&clipped, &each(|k| sum_xl[k] / sum_l2[k]), &this_scale);
        let this_min = select(&clipped, &[0.0; LANES], &this_min);
        let mut cur_error = [0.0f32; LANES];
        for ((xi, wi), li) in x.iter().zip(w).zip(&laux) {
            cur_error = each(|k| {
                let diff = this_scale[k] * li[k] + this_min[k] - xi[k];
                cur_error[k] + wi[k] * (diff * diff)
            });
        }
        let take = each(|k| (det[k] > 0.0) & (cur_error[k] < best_error[k]));
        best_iscale = select(&take, &iscale, &best_iscale);
        best_min = select(&take, &min, &best_min);
        best_error = select(&take, &cur_error, &best_error);
        scale = select(&take, &this_scale, &scale);
        min = select(&take, &this_min, &min);
    }
    for (xi, li) in x.iter().zip(levels) {
        let q = level(&best_iscale, &best_min, xi, nmax);
        *li = each(|k| if flat[k] { 0 } else { q[k] as u8 });
    }
    let scale = select(&flat, &[0.0; LANES], &scale);
    let min = select(&flat, &flat_min, &min);
    (scale, each(|k| -min[k]))
}

/// `make_qx_quants` for Q6_K (nmax 32, weights x^2) on 16 groups of 16 values, `x[i][lane]`:
/// per lane the scale; the levels (plus 32) go to `levels[i][lane]`.
#[inline(always)]
fn qx_lanes(x: &[Fv; 16], levels: &mut [[u8; LANES]; 16]) -> Fv {
    const NMAX: i32 = 32;
    let (mut max, mut amax) = ([0.0f32; LANES], [0.0f32; LANES]);
    for xi in x {
        let larger = each(|k| xi[k].abs() > amax[k]);
        amax = select(&larger, &each(|k| xi[k].abs()), &amax);
        max = select(&larger, xi, &max);
    }
    let zero = each(|k| amax[k] < GROUP_MAX_EPS);
    let nmax_f = NMAX as f32;
    // plain functions, not closures (see qkx2_lanes)
    #[inline(always)]
    fn level(iscale: &Fv, xi: &Fv) -> [i32; LANES] {
        each(|k| nearest_int(iscale[k] * xi[k]).clamp(-NMAX, NMAX - 1))
    }
    #[inline(always)]
    fn sums(x: &[Fv; 16], iscale: &Fv) -> (Fv, Fv) {
        let (mut sumlx, mut suml2) = ([0.0f32; LANES], [0.0f32; LANES]);
        for xi in x {
            let q = level(iscale, xi);
            for k in 0..LANES {
                let (v, q) = (xi[k], q[k] as f32);
                let w = v * v;
                sumlx[k] += w * v * q;
                suml2[k] += w * q * q;
            }
        }
        (sumlx, suml2)
    }
    let mut best_iscale = each(|k| -nmax_f / max[k]);
    let (sumlx, suml2) = sums(x, &best_iscale);
    let mut scale = each(|k| if suml2[k] != 0.0 { sumlx[k] / suml2[k] } else { 0.0 });
    let mut best = each(|k| scale[k] * sumlx[k]);
    for is in (-9..=9).filter(|&is| is != 0) {
        let numerator = nmax_f + 0.1 * is as f32;
        let iscale = each(|k| -numerator / max[k]);
        let (sumlx, suml2) = sums(x, &iscale);
        let take = each(|k| (suml2[k] > 0.0) & (sumlx[k] * sumlx[k] > best[k] * suml2[k]));
        let this_scale = each(|k| sumlx[k] / suml2[k]);
        best_iscale = select(&take, &iscale, &best_iscale);
        best = select(&take, &each(|k| this_scale[k] * sumlx[k]), &best);
        scale = select(&take, &this_scale, &scale);
    }
    for (xi, li) in x.iter().zip(levels) {
        let q = level(&best_iscale, xi);
        *li = each(|k| if zero[k] { 0 } else { (q[k] + NMAX) as u8 });
    }
    select(&zero, &[0.0; LANES], &scale)
}

/// Q4_K / Q5_K blocks of `x` into `out`, two blocks (16 groups) per search; an odd last block is
/// searched beside zeros.
#[inline(always)]
fn qk_blocks(ty: GgmlType, x: &[f32], out: &mut [u8]) {
    let p = KSearch::of(ty);
    let bytes = ty.block_bytes();
    for (x2, o2) in x.chunks(512).zip(out.chunks_mut(2 * bytes)) {
        let mut xt = [[0.0f32; LANES]; 32];
        for (g, group) in x2.chunks_exact(32).enumerate() {
            for (i, &v) in group.iter().enumerate() {
                xt[i][g] = v;
            }
        }
        let mut sum_x2 = [0.0f32; LANES];
        for xi in &xt {
            sum_x2 = each(|k| sum_x2[k] + xi[k] * xi[k]);
        }
        let av_x = each(|k| (sum_x2[k] / 32.0).sqrt());
        let mut w = [[0.0f32; LANES]; 32];
        for (wi, xi) in w.iter_mut().zip(&xt) {
            *wi = each(|k| av_x[k] + xi[k].abs());
        }
        let mut lv = [[0u8; LANES]; 32];
        let (scale, neg_min) = qkx2_lanes(&xt, &w, p, &mut lv);
        for (b, (xb, ob)) in x2.chunks_exact(256).zip(o2.chunks_exact_mut(bytes)).enumerate() {
            let (mut scales, mut mins, mut levels) = ([0.0f32; 8], [0.0f32; 8], [0u8; 256]);
            for j in 0..8 {
                scales[j] = scale[8 * b + j];
                mins[j] = neg_min[8 * b + j];
                for (i, li) in lv.iter().enumerate() {
                    levels[32 * j + i] = li[8 * b + j];
                }
            }
            k_finish(ty, xb, &scales, &mins, levels, ob);
        }
    }
}

/// Q6_K blocks of `x` into `out`, one block (16 groups) per search.
#[inline(always)]
fn q6_k_blocks(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(256).zip(out.chunks_exact_mut(210)) {
        let mut xt = [[0.0f32; LANES]; 16];
        for (g, group) in xb.chunks_exact(16).enumerate() {
            for (i, &v) in group.iter().enumerate() {
                xt[i][g] = v;
            }
        }
        let mut lv = [[0u8; LANES]; 16];
        let scales = qx_lanes(&xt, &mut lv);
        let mut levels = [0u8; 256];
        for (i, li) in lv.iter().enumerate() {
            for (g, &l) in li.iter().enumerate() {
                levels[16 * g + i] = l;
            }
        }
        q6_k_finish(xb, &scales, levels, ob);
    }
}

/// Whole blocks of the K type `ty` (Q4_K, Q5_K or Q6_K) in `x` packed into `out`, the same bytes as
/// the scalar path. Compiled for whatever the caller enables; see `k_blocks_avx512` / `_avx2`.
#[inline(always)]
pub(super) fn k_blocks(ty: GgmlType, x: &[f32], out: &mut [u8]) {
    match ty {
        GgmlType::Q6K => q6_k_blocks(x, out),
        _ => qk_blocks(ty, x, out),
    }
}

/// [`k_blocks`] with AVX-512: one 512-bit register per step of the 16 lanes.
///
/// # Safety
/// The CPU has every feature enabled here (`crate::simd::has_avx512` checks them all).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,bmi1,bmi2,lzcnt,popcnt,f16c")]
pub(super) unsafe fn k_blocks_avx512(ty: GgmlType, x: &[f32], out: &mut [u8]) {
    k_blocks(ty, x, out)
}

/// [`k_blocks`] with AVX2: two 256-bit registers per step of the 16 lanes.
///
/// # Safety
/// The CPU has every feature enabled here (`crate::simd::has_avx2` checks them all).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt,f16c")]
pub(super) unsafe fn k_blocks_avx2(ty: GgmlType, x: &[f32], out: &mut [u8]) {
    k_blocks(ty, x, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A generator of awkward groups: every 32 values (a Q4_K / Q5_K group, two Q6_K groups) one of
    /// the cases where a per-lane select could differ from the scalar branch.
    struct Groups(u64);

    impl Groups {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            self.0 >> 33
        }

        /// Uniform in [-1, 1).
        fn unit(&mut self) -> f32 {
            self.next() as f32 / (1u64 << 30) as f32 - 1.0
        }

        fn group(&mut self) -> [f32; 32] {
            let scale = 10f32.powi((self.next() % 40) as i32 - 30); // 1e-30 .. 1e9
            let mut g: [f32; 32] = std::array::from_fn(|_| self.unit() * scale);
            match self.next() % 12 {
                0 => g = [0.0; 32],
                1 => g = [self.unit() * scale; 32], // constant, either sign
                2 => g.iter_mut().for_each(|v| *v = *v * 1e-15 / scale), // about GROUP_MAX_EPS
                3 => g[(self.next() % 32) as usize] = 1e4 * scale.max(1e-3), // one outlier
                4 => g.iter_mut().for_each(|v| *v = -v.abs()), // negative only
                5 => g.iter_mut().for_each(|v| *v = v.abs()), // positive only
                6 => g.iter_mut().for_each(|v| *v = *v * 1e-38 / scale), // subnormal
                7 => g.iter_mut().enumerate().for_each(|(i, v)| *v *= 10f32.powi(i as i32 % 9 - 4)),
                8 => g.iter_mut().for_each(|v| *v = if *v > 0.0 { 0.0 } else { -0.0 }),
                9 => g.iter_mut().for_each(|v| *v = (*v * 8.0 / scale).round() * scale), // few values
                10 => g[..16].fill(0.0), // one Q6_K group zero, its neighbour not
                _ => {}
            }
            g
        }
    }

    /// `blocks` blocks of 256 values: random groups, whole blocks of one kind now and then.
    fn sample(blocks: usize, seed: u64) -> Vec<f32> {
        let mut gen = Groups(seed);
        let mut x = Vec::with_capacity(blocks * 256);
        for b in 0..blocks {
            let whole = gen.next() % 8;
            for _ in 0..8 {
                let g = gen.group();
                x.extend(g.map(|v| match (b % 5 == 0, whole) {
                    (true, 0) => 0.0,
                    (true, 1) => v * 1e-25,
                    (true, 2) => 0.02,
                    _ => v,
                }));
            }
        }
        x
    }

    #[test]
    fn lanes_write_the_scalar_bytes() {
        for (seed, blocks) in [(1u64, 301usize), (2, 64), (3, 1)] {
            let x = sample(blocks, seed);
            for ty in [GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K] {
                let mut scalar = vec![0u8; blocks * ty.block_bytes()];
                ty.quantize_blocks_scalar(&x, &mut scalar);
                let mut lanes = vec![0xaa_u8; scalar.len()];
                k_blocks(ty, &x, &mut lanes);
                let first = |other: &[u8]| scalar.iter().zip(other).position(|(a, b)| a != b);
                assert_eq!(first(&lanes), None, "{ty:?}, seed {seed}: first differing byte");
                if crate::simd::has_avx2() {
                    lanes.fill(0xaa);
                    // SAFETY: the CPU has AVX2 (checked just above)
                    unsafe { k_blocks_avx2(ty, &x, &mut lanes) };
                    assert_eq!(first(&lanes), None, "{ty:?} AVX2, seed {seed}: first differing byte");
                }
                if crate::simd::has_avx512() {
                    lanes.fill(0xaa);
                    // SAFETY: the CPU has AVX-512 (checked just above)
                    unsafe { k_blocks_avx512(ty, &x, &mut lanes) };
                    assert_eq!(first(&lanes), None, "{ty:?} AVX-512, seed {seed}: first differing byte");
                }
            }
        }
    }
}
