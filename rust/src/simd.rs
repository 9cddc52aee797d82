//! SIMD dispatch for every CPU kernel of the crate (quantization, decode GEMV, attention, LoRA,
//! SwiGLU, RMSNorm, RoPE, cross-entropy, dropout): compile hot loops several times, for AVX-512,
//! AVX2 and the baseline x86-64 target, and pick one at run time. The loops are written as plain
//! Rust over slices; LLVM vectorizes them once the wider instruction set is allowed. Rust never
//! fuses a multiply and an add on its own, so every version rounds exactly like the scalar code
//! (and like bitsandbytes); kernels that use `mul_add` do so in every version alike.
//!
//! The tier is decided once per process, from the CPU and `TUNEX_SIMD`
//! ([`crate::settings::simd_cap`]); kernels with hand-written intrinsics (attention's tiles,
//! LoRA's AVX-512 loops, the 4-bit expansion) ask [`has_avx512`] / [`has_avx2`] directly.

#[cfg(target_arch = "x86_64")]
use crate::settings::SimdCap;

/// Declare `fn NAME(args) -> R { body }` compiled for AVX2+FMA and for the baseline target,
/// dispatched on the CPU it runs on.
macro_rules! multiversion {
    ($($item:tt)*) => { $crate::simd::multiversion_tiers! { false; $($item)* } };
}
pub(crate) use multiversion;

/// Like [`multiversion!`], with an AVX-512 version tried first. For integer-heavy loops (the
/// dropout hash: 32-bit multiplies) and the exp polynomial, where 16 lanes beat 8 even on cores
/// that split 512-bit instructions in two; `TUNEX_SIMD=portable` still forces the baseline.
macro_rules! multiversion512 {
    ($($item:tt)*) => { $crate::simd::multiversion_tiers! { true; $($item)* } };
}
pub(crate) use multiversion512;

/// The body of both: `$wide` says whether the AVX-512 version is tried.
macro_rules! multiversion_tiers {
    ($wide:literal; $(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            {
                /// # Safety
                /// The CPU has every feature enabled here (`has_avx512` checks them all).
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,bmi1,bmi2,lzcnt,popcnt,f16c")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    portable($($arg),*)
                }
                /// # Safety
                /// The CPU has every feature enabled here (`has_avx2` checks them all).
                #[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt,f16c")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    portable($($arg),*)
                }
                if $wide && $crate::simd::has_avx512() {
                    // SAFETY: the CPU reports every feature `avx512` was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if $crate::simd::has_avx2() {
                    // SAFETY: the CPU reports every feature `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            portable($($arg),*)
        }
    };
}
pub(crate) use multiversion_tiers;

/// Whether this CPU runs the AVX-512 versions of [`multiversion512!`] (AVX2 ones too).
/// `TUNEX_SIMD=avx2` stops at AVX2, so tests can check that tier on an AVX-512 machine.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx512() -> bool {
    static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX512.get_or_init(|| {
        has_avx2()
            && crate::settings::simd_cap() != SimdCap::Avx2
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
    })
}

/// Whether this CPU runs the AVX2 versions (decided once per process). `TUNEX_SIMD=portable`
/// forces the baseline versions, so tests can check that both give the same bytes.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx2() -> bool {
    static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX2.get_or_init(|| {
        crate::settings::simd_cap() != SimdCap::Portable
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("bmi1")
            && std::is_x86_feature_detected!("bmi2")
            && std::is_x86_feature_detected!("lzcnt")
            && std::is_x86_feature_detected!("popcnt")
            && std::is_x86_feature_detected!("f16c")
    })
}
