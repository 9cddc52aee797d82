//! One step of 8-bit blockwise AdamW on the CPU (`train.optimizer = "adamw_8bit"`), the scheme of
//! bitsandbytes' blockwise 8-bit Adam: both moments are stored as one byte per element, an index
//! into a sorted 256-entry code table (a signed dynamic map for `m`, an unsigned one for `v`),
//! scaled by one float32 absmax per block of [`BLOCK`] elements.
//!
//! Per block: dequantize `m` and `v`, take the AdamW step in float32 from the updated (not yet
//! requantized) moments, then requantize each moment to its nearest code under the block's new
//! absmax. As in bitsandbytes, a code of `m` whose sign differs from `m` moves one step towards
//! `m`'s sign (the momentum never flips sign through rounding), and an element whose gradient is
//! not finite gets zero moments and keeps its weight. Weight decay is applied before the Adam
//! update (torch's AdamW order). bf16 weights are rounded to bf16 stochastically with the
//! counter-based draw of `crate::dropout` (element index, per-step seed), so an update below half
//! a bf16 ulp still moves the weight in expectation.
//!
//! The Triton kernel (`tunex/kernels/adamw_8bit_triton.py`) and the torch path compute the same
//! float32 operations in the same order; the tests compare them with this step.

use std::sync::Mutex;

use crate::dropout::draw;
use crate::error::{Error, Result};
use crate::omp;

/// Elements per absmax block (bitsandbytes' blockwise optimizers use 256).
pub const BLOCK: usize = 256;
/// Entries of a code table: every value of a byte.
pub const CODES: usize = 256;
/// Blocks per parallel part: the step's work is split into runs of whole blocks.
const BLOCKS_PER_PART: usize = 256;

/// The scalars of one step, precomputed once in float64 by the caller and rounded to float32, so
/// every implementation uses the same values.
#[derive(Clone, Copy, Debug)]
pub struct Hyper {
    pub beta1: f32,
    pub beta2: f32,
    /// `1 - beta1` and `1 - beta2`, rounded once from float64 (not recomputed in float32).
    pub one_minus_beta1: f32,
    pub one_minus_beta2: f32,
    pub eps: f32,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// `1 / sqrt(1 - beta2^t)`.
    pub inv_sqrt_bc2: f32,
    /// `1 - lr * weight_decay`.
    pub decay: f32,
}

/// The two code tables, each [`CODES`] sorted finite values.
pub struct Maps<'a> {
    pub signed: &'a [f32],
    pub unsigned: &'a [f32],
}

/// The quantized moments of one parameter: a code per element, an absmax per block.
pub struct State<'a> {
    pub codes1: &'a mut [u8],
    pub codes2: &'a mut [u8],
    pub absmax1: &'a mut [f32],
    pub absmax2: &'a mut [f32],
}

/// A weight format the step reads to float32 and writes back from it.
trait Weight: Copy + Send + Sync {
    fn load(self) -> f32;
    fn store(x: f32, index: u64, seed: u64) -> Self;
}

impl Weight for f32 {
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
    #[inline(always)]
    fn store(x: f32, _index: u64, _seed: u64) -> Self {
        x
    }
}

/// A bf16 weight, as its bit pattern.
impl Weight for u16 {
    #[inline(always)]
    fn load(self) -> f32 {
        f32::from_bits(u32::from(self) << 16)
    }
    #[inline(always)]
    fn store(x: f32, index: u64, seed: u64) -> Self {
        stochastic_bf16(x, draw(seed, index))
    }
}

/// `x` rounded to bf16 up or down with the probability that makes the expectation `x`: add the
/// draw's top 16 bits below the kept half, then truncate. Non-finite values are truncated as they are.
#[inline(always)]
pub fn stochastic_bf16(x: f32, draw: u32) -> u16 {
    let bits = x.to_bits();
    if !x.is_finite() {
        return (bits >> 16) as u16;
    }
    (bits.wrapping_add(draw >> 16) >> 16) as u16
}

/// The index of the entry of the sorted `map` nearest to `x` (the lower one on a tie): a
/// branch-free binary search for the last entry <= x, then the closer of it and the next one.
#[inline(always)]
pub fn nearest_code(map: &[f32; CODES], x: f32) -> u8 {
    let mut pos = 0usize;
    let mut step = CODES / 2;
    while step > 0 {
        if map[pos + step] <= x {
            pos += step;
        }
        step /= 2;
    }
    let lo = pos.min(CODES - 2);
    let pick = if x - map[lo] <= map[lo + 1] - x { lo } else { lo + 1 };
    pick as u8
}

/// Sign and exponent buckets of the finder: exponents from 2^-25 to 2^0, each split into
/// 2^[`SPLIT_BITS`] mantissa ranges; smaller magnitudes share the lowest bucket.
const SPLIT_BITS: u32 = 5;
const EXPONENTS: u32 = 26;
const LOWEST: u32 = 127 - 25;
const BUCKETS: usize = (2 * EXPONENTS as usize) << SPLIT_BITS;

/// The bucket of `x` (|x| < 2): its sign, exponent (clamped below) and top mantissa bits.
#[inline(always)]
fn bucket(x: f32) -> usize {
    let bits = x.to_bits();
    let exponent = (bits >> 23) & 0xff;
    let e = exponent.clamp(LOWEST, LOWEST + EXPONENTS - 1) - LOWEST;
    let m = if exponent < LOWEST { 0 } else { (bits >> (23 - SPLIT_BITS)) & ((1 << SPLIT_BITS) - 1) };
    ((((bits >> 31) * EXPONENTS + e) << SPLIT_BITS) | m) as usize
}

/// [`nearest_code`] by table: per bucket of `x`'s float bits, the last entry at or below every
/// value of the bucket, from which a short scan (a few entries: the dynamic maps' densest steps
/// are a few per bucket) reaches the last entry at or below `x`. The same result as the binary
/// search, whose data-dependent branches mispredict on every other step for random values.
struct Finder<'a> {
    map: &'a [f32; CODES],
    start: [u8; BUCKETS],
}

impl<'a> Finder<'a> {
    fn new(map: &'a [f32; CODES]) -> Self {
        let mut start = [0u8; BUCKETS];
        for (k, s) in start.iter_mut().enumerate() {
            let negative = k >> SPLIT_BITS >= EXPONENTS as usize;
            let e = ((k >> SPLIT_BITS) % EXPONENTS as usize) as i32;
            let m = (k & ((1 << SPLIT_BITS) - 1)) as f32;
            let unit = 2f32.powi(e + LOWEST as i32 - 127);
            let step = unit / (1 << SPLIT_BITS) as f32;
            // the bucket's magnitudes lie in [low, high): exact powers of two times small integers
            let low = if e == 0 { 0.0 } else { unit + m * step };
            let high = unit + (m + 1.0) * step;
            let least = if negative { -high } else { low };
            *s = map.partition_point(|&v| v <= least).saturating_sub(1) as u8;
        }
        Finder { map, start }
    }

    #[inline(always)]
    fn nearest(&self, x: f32) -> u8 {
        if x.is_nan() || x.abs() >= 2.0 {
            return nearest_code(self.map, x); // outside the buckets (or NaN): the plain search
        }
        let map = self.map;
        let mut lo = self.start[bucket(x)] as usize;
        while lo < CODES - 1 && map[lo + 1] <= x {
            lo += 1;
        }
        let lo = lo.min(CODES - 2);
        let pick = if x - map[lo] <= map[lo + 1] - x { lo } else { lo + 1 };
        pick as u8
    }
}

/// `m`'s code, moved one step towards `m`'s sign when the nearest code has the other sign.
#[inline(always)]
fn signed_code(finder: &Finder<'_>, x: f32, m: f32) -> u8 {
    let map = finder.map;
    let c = finder.nearest(x);
    if map[c as usize].is_sign_negative() == m.is_sign_negative() {
        c
    } else if m.is_sign_negative() {
        c.saturating_sub(1)
    } else {
        c.saturating_add(1)
    }
}

fn table<'a>(what: &str, map: &'a [f32]) -> Result<&'a [f32; CODES]> {
    let table: &[f32; CODES] = map.try_into().map_err(|_| {
        Error::arg(format!("adamw_8bit: the {what} code table has {} entries; expected {CODES}", map.len()))
    })?;
    if table.iter().any(|v| !v.is_finite()) || table.windows(2).any(|w| w[0] > w[1]) {
        return Err(Error::arg(format!("adamw_8bit: the {what} code table must be finite and sorted ascending")));
    }
    Ok(table)
}

fn hyper_ok(h: &Hyper) -> Result<()> {
    let all = [h.beta1, h.beta2, h.one_minus_beta1, h.one_minus_beta2, h.eps, h.step_size, h.inv_sqrt_bc2, h.decay];
    if all.iter().any(|v| !v.is_finite()) || !(0.0..1.0).contains(&h.beta1) || !(0.0..1.0).contains(&h.beta2) {
        return Err(Error::arg(format!("adamw_8bit: step scalars must be finite with betas in [0, 1), got {h:?}")));
    }
    Ok(())
}

/// One block of the step: `p`, `g`, `c1`, `c2` hold the block's elements (at most [`BLOCK`]),
/// `a1`, `a2` its absmax; `first` is the tensor index of its first element.
#[allow(clippy::too_many_arguments)]
fn block<W: Weight>(
    p: &mut [W],
    g: &[W],
    c1: &mut [u8],
    c2: &mut [u8],
    a1: &mut f32,
    a2: &mut f32,
    finders: (&Finder<'_>, &Finder<'_>),
    h: &Hyper,
    first: u64,
    seed: u64,
) {
    let (signed, unsigned) = (finders.0.map, finders.1.map);
    let (old1, old2) = (*a1, *a2);
    let mut m = [0f32; BLOCK];
    let mut v = [0f32; BLOCK];
    let (mut max1, mut max2) = (0f32, 0f32);
    let (one_minus_b1, one_minus_b2) = (h.one_minus_beta1, h.one_minus_beta2);
    for j in 0..p.len() {
        let gj = g[j].load();
        if gj.is_finite() {
            m[j] = signed[c1[j] as usize] * old1 * h.beta1 + one_minus_b1 * gj;
            v[j] = unsigned[c2[j] as usize] * old2 * h.beta2 + one_minus_b2 * gj * gj;
            let w = p[j].load() * h.decay;
            let denom = v[j].sqrt() * h.inv_sqrt_bc2 + h.eps;
            p[j] = W::store(w - h.step_size * (m[j] / denom), first + j as u64, seed);
        }
        max1 = max1.max(m[j].abs());
        max2 = max2.max(v[j]);
    }
    *a1 = max1;
    *a2 = max2;
    for j in 0..p.len() {
        let x1 = if max1 > 0.0 { m[j] / max1 } else { 0.0 };
        let x2 = if max2 > 0.0 { v[j] / max2 } else { 0.0 };
        c1[j] = signed_code(finders.0, x1, m[j]);
        c2[j] = finders.1.nearest(x2);
    }
}

/// The whole step over one parameter, split into parts of whole blocks run on the OpenMP team.
fn run<W: Weight>(p: &mut [W], g: &[W], state: State<'_>, maps: &Maps<'_>, h: &Hyper, seed: u64) -> Result<()> {
    let n = p.len();
    let blocks = n.div_ceil(BLOCK);
    let sizes = [
        ("gradient", g.len(), n),
        ("m codes", state.codes1.len(), n),
        ("v codes", state.codes2.len(), n),
        ("m absmax", state.absmax1.len(), blocks),
        ("v absmax", state.absmax2.len(), blocks),
    ];
    for (what, got, want) in sizes {
        if got != want {
            return Err(Error::arg(format!(
                "adamw_8bit: the {what} has {got} values; expected {want} for a parameter of {n} elements"
            )));
        }
    }
    let (signed, unsigned) = (table("signed (m)", maps.signed)?, table("unsigned (v)", maps.unsigned)?);
    hyper_ok(h)?;
    let finders = (&Finder::new(signed), &Finder::new(unsigned));
    let part = BLOCKS_PER_PART.checked_mul(BLOCK).ok_or_else(|| Error::arg("adamw_8bit: part size overflows"))?;
    // Each part owns disjoint chunks of every buffer; the mutex only hands a part its own chunks
    // (never contended), so the split needs no unsafe code.
    let parts: Vec<Mutex<_>> = p
        .chunks_mut(part)
        .zip(g.chunks(part))
        .zip(state.codes1.chunks_mut(part).zip(state.codes2.chunks_mut(part)))
        .zip(state.absmax1.chunks_mut(BLOCKS_PER_PART).zip(state.absmax2.chunks_mut(BLOCKS_PER_PART)))
        .map(Mutex::new)
        .collect();
    let ok = omp::run(parts.len(), &|i| {
        let mut guard = parts[i].lock().unwrap_or_else(|e| e.into_inner());
        let (((p, g), (c1, c2)), (a1, a2)) = &mut *guard;
        let start = i.checked_mul(part).expect("part offset fits: it indexes a slice") as u64;
        let chunks = p
            .chunks_mut(BLOCK)
            .zip(g.chunks(BLOCK))
            .zip(c1.chunks_mut(BLOCK).zip(c2.chunks_mut(BLOCK)))
            .zip(a1.iter_mut().zip(a2.iter_mut()));
        for (b, (((p, g), (c1, c2)), (a1, a2))) in chunks.enumerate() {
            let first = start + (b * BLOCK) as u64;
            block(p, g, c1, c2, a1, a2, finders, h, first, seed);
        }
    });
    assert!(ok, "a part of the adamw_8bit step panicked");
    Ok(())
}

/// One 8-bit AdamW step of a float32 parameter `p` with gradient `g`, in place.
pub fn step_f32(p: &mut [f32], g: &[f32], state: State<'_>, maps: &Maps<'_>, h: &Hyper) -> Result<()> {
    run(p, g, state, maps, h, 0)
}

/// One 8-bit AdamW step of a bf16 parameter (`p`, `g` as bf16 bit patterns), in place; the new
/// weight is rounded stochastically with the draws of `seed`.
pub fn step_bf16(p: &mut [u16], g: &[u16], state: State<'_>, maps: &Maps<'_>, h: &Hyper, seed: u64) -> Result<()> {
    run(p, g, state, maps, h, seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sorted signed table: 256 evenly spaced values from -1 to 1 (no zero entry).
    fn signed_map() -> Vec<f32> {
        (0..CODES).map(|i| (i as f32 - 127.5) / 127.5).collect()
    }

    fn unsigned_map() -> Vec<f32> {
        (0..CODES).map(|i| i as f32 / 255.0).collect()
    }

    fn hyper(lr: f64, wd: f64, t: i32) -> Hyper {
        let (b1, b2) = (0.9f64, 0.99f64);
        Hyper {
            beta1: b1 as f32,
            beta2: b2 as f32,
            one_minus_beta1: (1.0 - b1) as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            eps: 1e-8,
            step_size: (lr / (1.0 - b1.powi(t))) as f32,
            inv_sqrt_bc2: (1.0 / (1.0 - b2.powi(t)).sqrt()) as f32,
            decay: (1.0 - lr * wd) as f32,
        }
    }

    #[test]
    fn nearest_code_picks_the_closest_entry() {
        let map: [f32; CODES] = signed_map().try_into().unwrap();
        for &x in &[-2.0f32, -1.0, -0.3, -0.001, 0.0, 0.0017, 0.5, 0.99, 1.0, 3.0] {
            let c = nearest_code(&map, x) as usize;
            let best = (0..CODES).map(|i| (map[i] - x).abs()).fold(f32::INFINITY, f32::min);
            assert_eq!((map[c] - x).abs(), best, "x = {x}");
        }
    }

    /// bitsandbytes' dynamic map construction (signed or not), for the finder test.
    fn dynamic_map(signed: bool) -> [f32; CODES] {
        let mut v = vec![0f32, 1.0];
        for k in 0..7 {
            let steps = if signed { 1 << k } else { 2 << k };
            for j in 0..steps {
                let edge = |i: i32| 0.1 + 0.9 * i as f32 / steps as f32;
                let mid = (edge(j) + edge(j + 1)) / 2.0 * 10f32.powi(k - 6);
                v.push(mid);
                if signed {
                    v.push(-mid);
                }
            }
        }
        v.sort_by(f32::total_cmp);
        v.try_into().unwrap()
    }

    #[test]
    fn the_finder_agrees_with_the_binary_search() {
        let mut tables = vec![dynamic_map(true), dynamic_map(false)];
        tables.push(signed_map().try_into().unwrap());
        let mut lumpy: [f32; CODES] = unsigned_map().try_into().unwrap();
        lumpy[200..].fill(0.9); // repeated entries
        tables.push(lumpy);
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            state
        };
        for map in &tables {
            let finder = Finder::new(map);
            let mut xs: Vec<f32> = vec![0.0, -0.0, 1.0, -1.0, 1.5, -1.5, 2.0, -3.0, 1e-30, -1e-30, f32::NAN];
            xs.extend(
                map.iter().flat_map(|&v| [v, f32::from_bits(v.to_bits() + 1), f32::from_bits(v.to_bits().max(1) - 1)]),
            );
            for _ in 0..200_000 {
                let r = next();
                let magnitude = 10f32.powf(-9.0 * (r >> 40) as f32 / (1u64 << 24) as f32);
                xs.push(if r & 1 == 1 { -magnitude } else { magnitude });
            }
            for &x in &xs {
                assert_eq!(finder.nearest(x), nearest_code(map, x), "x = {x:e}");
            }
        }
    }

    #[test]
    fn first_step_matches_float_adam_within_the_code_spacing() {
        let n = 1000; // 3 full blocks and a partial one
        let g: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let mut p = vec![0.5f32; n];
        let (mut c1, mut c2) = (vec![0u8; n], vec![0u8; n]);
        let blocks = n.div_ceil(BLOCK);
        let (mut a1, mut a2) = (vec![0f32; blocks], vec![0f32; blocks]);
        let (s, u) = (signed_map(), unsigned_map());
        let maps = Maps { signed: &s, unsigned: &u };
        let h = hyper(1e-2, 0.1, 1);
        let state = State { codes1: &mut c1, codes2: &mut c2, absmax1: &mut a1, absmax2: &mut a2 };
        step_f32(&mut p, &g, state, &maps, &h).unwrap();
        for j in 0..n {
            // step 1 of Adam: m_hat = g, v_hat = g^2, so the update is lr * sign(g) (g != 0)
            let want = 0.5 * (1.0 - 1e-3) - 1e-2 * g[j] / (g[j].abs() + 1e-8);
            assert!((p[j] - want).abs() < 1e-6, "{j}: {} vs {want}", p[j]);
            let b = j / BLOCK;
            let m = s[c1[j] as usize] * a1[b];
            assert!((m - 0.1 * g[j]).abs() <= a1[b] / 255.0 + 1e-7, "m of {j}");
            let v = u[c2[j] as usize] * a2[b];
            assert!((v - 0.01 * g[j] * g[j]).abs() <= a2[b] / 510.0 + 1e-9, "v of {j}");
        }
    }

    #[test]
    fn momentum_keeps_its_sign_and_bad_gradients_leave_the_weight() {
        let n = BLOCK;
        let mut g = vec![1e-9f32; n];
        g[0] = 100.0; // makes every other m tiny next to the block's absmax
        g[1] = -1e-9;
        g[2] = f32::NAN;
        let mut p = vec![1.0f32; n];
        let (mut c1, mut c2, mut a1, mut a2) = (vec![0u8; n], vec![0u8; n], vec![0f32; 1], vec![0f32; 1]);
        let (mut s, u) = (signed_map(), unsigned_map());
        s[127] = 0.0; // a zero code, as the dynamic map has: the nearest code of a tiny negative m
        assert_eq!(s[126..129].iter().filter(|v| **v == 0.0).count(), 1);
        let maps = Maps { signed: &s, unsigned: &u };
        let state = State { codes1: &mut c1, codes2: &mut c2, absmax1: &mut a1, absmax2: &mut a2 };
        step_f32(&mut p, &g, state, &maps, &hyper(1e-3, 0.0, 1)).unwrap();
        assert!(s[c1[1] as usize] < 0.0, "a negative momentum stays negative");
        assert!(s[c1[3] as usize] >= 0.0);
        assert_eq!(p[2], 1.0);
        assert_eq!(s[c1[2] as usize] * a1[0], 0.0);
    }

    #[test]
    fn bf16_rounding_is_unbiased() {
        // 1 + 2^-10 lies 1/8 of a bf16 ulp above 1.0
        let x = 1.0f32 + 2f32.powi(-10);
        let up = (0..100_000u64).filter(|&i| stochastic_bf16(x, draw(5, i)) != 0x3f80).count();
        assert!((up as f64 / 1e5 - 0.125).abs() < 0.005, "{up}");
        assert_eq!(stochastic_bf16(2.0, u32::MAX), 0x4000); // representable: unchanged
    }

    #[test]
    fn bad_sizes_and_tables_are_errors_not_panics() {
        let (s, u) = (signed_map(), unsigned_map());
        let maps = Maps { signed: &s, unsigned: &u };
        let h = hyper(1e-3, 0.0, 1);
        let mut p = vec![0f32; 300];
        let g = vec![0f32; 300];
        let (mut c1, mut c2) = (vec![0u8; 300], vec![0u8; 300]);
        let (mut a1, mut a2) = (vec![0f32; 1], vec![0f32; 2]); // 300 elements need 2 blocks
        let state = State { codes1: &mut c1, codes2: &mut c2, absmax1: &mut a1, absmax2: &mut a2 };
        let e = step_f32(&mut p, &g, state, &maps, &h).unwrap_err().to_string();
        assert!(e.contains("m absmax has 1 values; expected 2"), "{e}");
        let short = &s[..255];
        let bad = Maps { signed: short, unsigned: &u };
        let mut a1 = vec![0f32; 2];
        let state = State { codes1: &mut c1, codes2: &mut c2, absmax1: &mut a1, absmax2: &mut a2 };
        assert!(step_f32(&mut p, &g, state, &bad, &h).unwrap_err().to_string().contains("255 entries"));
        let mut unsorted = u.clone();
        unsorted.swap(3, 4);
        let bad = Maps { signed: &s, unsigned: &unsorted };
        let state = State { codes1: &mut c1, codes2: &mut c2, absmax1: &mut a1, absmax2: &mut a2 };
        assert!(step_f32(&mut p, &g, state, &bad, &h).unwrap_err().to_string().contains("sorted"));
        let mut nan = h;
        nan.step_size = f32::NAN;
        let state = State { codes1: &mut c1, codes2: &mut c2, absmax1: &mut a1, absmax2: &mut a2 };
        assert!(step_f32(&mut p, &g, state, &maps, &nan).is_err());
    }

    #[test]
    fn parts_cover_a_tensor_larger_than_one_part() {
        // two parts and a partial block: every element is stepped exactly once
        let n = 2 * BLOCKS_PER_PART * BLOCK + 77;
        let g = vec![1.0f32; n];
        let mut p = vec![0.0f32; n];
        let blocks = n.div_ceil(BLOCK);
        let (mut c1, mut c2, mut a1, mut a2) = (vec![0u8; n], vec![0u8; n], vec![0f32; blocks], vec![0f32; blocks]);
        let (s, u) = (signed_map(), unsigned_map());
        let maps = Maps { signed: &s, unsigned: &u };
        let state = State { codes1: &mut c1, codes2: &mut c2, absmax1: &mut a1, absmax2: &mut a2 };
        step_f32(&mut p, &g, state, &maps, &hyper(1e-2, 0.0, 1)).unwrap();
        assert!(p.iter().all(|&w| (w + 1e-2).abs() < 1e-6));
        assert!(a1.iter().all(|&a| (a - 0.1).abs() < 1e-7));
    }
}
