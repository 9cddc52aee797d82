//! The three float element types a weight can have, viewed as raw little-endian bytes, and the
//! exact conversions between them and f32 (round-to-nearest-even, as torch and bitsandbytes do).

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatDtype {
    F32,
    F16,
    BF16,
}

impl FloatDtype {
    /// Accepts torch's names (`float32`, `float16`, `bfloat16`) and safetensors' (`F32`, ...).
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "float32" | "F32" | "float" => Ok(FloatDtype::F32),
            "float16" | "F16" | "half" => Ok(FloatDtype::F16),
            "bfloat16" | "BF16" => Ok(FloatDtype::BF16),
            other => Err(Error::arg(format!(
                "dtype {other:?} cannot be 4-bit quantized; expected float32, float16 or bfloat16"
            ))),
        }
    }

    pub fn size(self) -> usize {
        match self {
            FloatDtype::F32 => 4,
            FloatDtype::F16 | FloatDtype::BF16 => 2,
        }
    }
}

/// A read-only view of float elements in one of the three dtypes.
#[derive(Clone, Copy)]
pub(crate) enum Elems<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
    BF16(&'a [u16]),
}

impl<'a> Elems<'a> {
    /// View `bytes` as elements of `dtype`; the bytes must be aligned to the element size (numpy
    /// and torch buffers always are).
    pub fn from_bytes(bytes: &'a [u8], dtype: FloatDtype, what: &str) -> Result<Self> {
        let misfit = |e: bytemuck::PodCastError| {
            Error::arg(format!(
                "{what}: {} bytes cannot be viewed as {dtype:?} elements ({e:?}); pass a contiguous \
                 tensor of that dtype",
                bytes.len()
            ))
        };
        // An empty buffer may come with a dangling, unaligned pointer (numpy does that).
        if bytes.is_empty() {
            return Ok(match dtype {
                FloatDtype::F32 => Elems::F32(&[]),
                FloatDtype::F16 => Elems::F16(&[]),
                FloatDtype::BF16 => Elems::BF16(&[]),
            });
        }
        Ok(match dtype {
            FloatDtype::F32 => Elems::F32(bytemuck::try_cast_slice(bytes).map_err(misfit)?),
            FloatDtype::F16 => Elems::F16(bytemuck::try_cast_slice(bytes).map_err(misfit)?),
            FloatDtype::BF16 => Elems::BF16(bytemuck::try_cast_slice(bytes).map_err(misfit)?),
        })
    }

    pub fn len(&self) -> usize {
        match self {
            Elems::F32(s) => s.len(),
            Elems::F16(s) | Elems::BF16(s) => s.len(),
        }
    }

    pub fn slice(&self, start: usize, end: usize) -> Self {
        match self {
            Elems::F32(s) => Elems::F32(&s[start..end]),
            Elems::F16(s) => Elems::F16(&s[start..end]),
            Elems::BF16(s) => Elems::BF16(&s[start..end]),
        }
    }

    /// Element `i` as f32 (exact: every f16 and bf16 value is an f32 value).
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Elems::F32(s) => s[i],
            Elems::F16(s) => f16_to_f32(s[i]),
            Elems::BF16(s) => bf16_to_f32(s[i]),
        }
    }
}

#[inline(always)]
pub(crate) fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Branch-free f16 -> f32 so the conversion loop vectorizes. Exponent and mantissa are moved into
/// f32 position and rescaled by 2^112 (exact, also for subnormals); inf and NaN keep an all-ones
/// exponent.
#[inline(always)]
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let magnitude = h & 0x7fff;
    let rescaled = (f32::from_bits(magnitude << 13) * f32::from_bits(0x7780_0000)).to_bits();
    let special = (magnitude << 13) | 0x7f80_0000;
    let bits = if magnitude >= 0x7c00 { special } else { rescaled };
    f32::from_bits(bits | sign)
}

/// f32 -> bf16 rounding to nearest, ties to even; NaN stays a (quiet) NaN. Branch-free.
#[inline(always)]
pub(crate) fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) as u16) | 0x0040;
    if x.is_nan() {
        nan
    } else {
        rounded
    }
}

/// f32 -> f16 rounding to nearest, ties to even, with subnormals, overflow to inf and NaN kept.
/// Written as selects over three candidate results so that loops over it vectorize; subnormal
/// results are rounded by the FPU itself (adding a magic constant aligns the mantissa).
#[inline(always)]
pub(crate) fn f32_to_f16(x: f32) -> u16 {
    const F32_INF: u32 = 255 << 23;
    const F16_OVERFLOW: u32 = (127 + 16) << 23;
    const SUBNORMAL_LIMIT: u32 = 113 << 23;
    const SUBNORMAL_MAGIC: u32 = ((127 - 15) + (23 - 10) + 1) << 23;
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let mag = bits & 0x7fff_ffff;
    let special = if mag > F32_INF { 0x7e00u32 } else { 0x7c00 };
    let subnormal = (f32::from_bits(mag) + f32::from_bits(SUBNORMAL_MAGIC)).to_bits().wrapping_sub(SUBNORMAL_MAGIC);
    let normal = mag.wrapping_add(((15i32 - 127) << 23) as u32).wrapping_add(0xfff).wrapping_add((mag >> 13) & 1) >> 13;
    let out = if mag >= F16_OVERFLOW {
        special
    } else if mag < SUBNORMAL_LIMIT {
        subnormal
    } else {
        normal
    };
    out as u16 | sign
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_matches_half_for_every_value() {
        for h in 0..=u16::MAX {
            let want = half::f16::from_bits(h).to_f32();
            let got = f16_to_f32(h);
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{h:#x}");
        }
    }

    #[test]
    fn f16_rounding_matches_half() {
        // Every f32 with a stride through the bit patterns, plus the boundary regions densely.
        let mut bits: Vec<u32> = (0..=u32::MAX).step_by(4093).collect();
        for centre in [0x3380_0000u32, 0x3880_0000, 0x4780_0000, 0x477f_e000, 0x7f80_0000] {
            bits.extend(centre.saturating_sub(1 << 16)..centre.saturating_add(1 << 16));
        }
        for b in bits {
            for x in [f32::from_bits(b), -f32::from_bits(b)] {
                let want = half::f16::from_f32(x);
                let got = half::f16::from_bits(f32_to_f16(x));
                assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{b:#x}");
            }
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        // exactly halfway between 0x3f80 and 0x3f81: ties to the even one
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
    }
}
