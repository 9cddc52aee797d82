//! The two 4-bit codebooks and the decision boundaries bitsandbytes quantizes with.

use crate::error::{Error, Result};

/// NormalFloat4: quantiles of N(0, 1) scaled to [-1, 1], index order (already sorted).
/// Written with bitsandbytes' published digits; each rounds to the float32 it stores.
#[allow(clippy::excessive_precision)]
const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// FP4 (1 sign, 2 exponent, 1 mantissa bit) in bit-pattern order, before the division by 12
/// that maps it into [-1, 1]. Index 8 (the sign bit alone) is +0.0, not -0.0: bitsandbytes' table
/// (`get_4bit_type`, stored as `quant_map`) is built from the integer 0 there, and its torch and
/// AVX-512 dequantizers therefore write +0.
const FP4_RAW: [f32; 16] =
    [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0];

/// FP4 indices in ascending value order, as bitsandbytes' `argsort` of its table yields them.
/// The tie between the two zeros (index 0 and 8) is resolved index 0 first; that order decides which
/// nibble tiny values get (|x| below the first midpoint: 0 for x <= 0, 8 for x > 0).
const FP4_ORDER: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

/// Which 4-bit data type a tensor is stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantType {
    Nf4,
    Fp4,
}

impl QuantType {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            other => Err(Error::arg(format!("quant_type {other:?} is not supported; use \"nf4\" or \"fp4\""))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// The 16 dequantized values, indexed by nibble.
    pub fn code(self) -> [f32; 16] {
        match self {
            QuantType::Nf4 => NF4,
            // bitsandbytes divides the table by its absolute maximum (12) in float32.
            QuantType::Fp4 => FP4_RAW.map(|v| v / 12.0),
        }
    }
}

/// The nearest-code search: 15 midpoints between value-sorted codes, and the nibble of each
/// sorted position.
pub(crate) struct Boundaries {
    pub midpoints: [f32; 15],
    pub nibble_of_rank: [u8; 16],
}

impl Boundaries {
    pub fn new(quant_type: QuantType) -> Self {
        let code = quant_type.code();
        let order: [u8; 16] = match quant_type {
            QuantType::Nf4 => std::array::from_fn(|i| i as u8),
            QuantType::Fp4 => FP4_ORDER,
        };
        // Midpoints are (a + b) / 2 in float32, exactly as torch computes them.
        let midpoints = std::array::from_fn(|i| (code[order[i] as usize] + code[order[i + 1] as usize]) / 2.0);
        Boundaries { midpoints, nibble_of_rank: order }
    }

    /// Rank of `x` among the sorted codes: the number of midpoints strictly below it, so a value
    /// exactly on a midpoint takes the lower code (torch.bucketize with right=False).
    #[inline(always)]
    pub fn rank(&self, x: f32) -> u32 {
        // Counted (and returned) in 32-bit lanes, the width of the f32 comparison masks, so a loop
        // over a block vectorizes without repacking every comparison to bytes.
        let mut rank = 0u32;
        for &m in &self.midpoints {
            rank += (m < x) as u32;
        }
        rank
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_is_sorted_and_midpoint_goes_low() {
        let b = Boundaries::new(QuantType::Nf4);
        assert!(b.midpoints.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(b.rank(b.midpoints[10]), 10);
        assert_eq!(b.rank(f32::from_bits(b.midpoints[10].to_bits() + 1)), 11);
        assert_eq!(b.rank(0.0), 7);
        assert_eq!(b.rank(-1.0), 0);
        assert_eq!(b.rank(1.0), 15);
    }

    #[test]
    fn fp4_order_sorts_the_table() {
        let code = QuantType::Fp4.code();
        let sorted: Vec<f32> = FP4_ORDER.iter().map(|&i| code[i as usize]).collect();
        assert!(sorted.windows(2).all(|w| w[0] <= w[1]));
        let b = Boundaries::new(QuantType::Fp4);
        assert_eq!(b.nibble_of_rank[b.rank(0.0) as usize], 0);
        assert_eq!(b.nibble_of_rank[b.rank(1e-4) as usize], 8);
        assert_eq!(b.nibble_of_rank[b.rank(1.0) as usize], 3);
        assert_eq!(b.nibble_of_rank[b.rank(-1.0) as usize], 11);
    }
}
