//! Element types a safetensors header may name, with their sizes.

use crate::error::{Error, Result};

/// One safetensors dtype string. Sub-byte types (F4, F6_*) are not listed: tunex neither reads nor
/// writes them, and a header naming one is reported as unsupported rather than misread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    F8E5M2,
    F8E4M3,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
}

const NAMES: &[(Dtype, &str)] = &[
    (Dtype::Bool, "BOOL"),
    (Dtype::U8, "U8"),
    (Dtype::I8, "I8"),
    (Dtype::F8E5M2, "F8_E5M2"),
    (Dtype::F8E4M3, "F8_E4M3"),
    (Dtype::I16, "I16"),
    (Dtype::U16, "U16"),
    (Dtype::F16, "F16"),
    (Dtype::BF16, "BF16"),
    (Dtype::I32, "I32"),
    (Dtype::U32, "U32"),
    (Dtype::F32, "F32"),
    (Dtype::F64, "F64"),
    (Dtype::I64, "I64"),
    (Dtype::U64, "U64"),
];

impl Dtype {
    /// The header spelling, e.g. `"BF16"`.
    pub fn name(self) -> &'static str {
        NAMES.iter().find(|(d, _)| *d == self).map(|(_, n)| *n).unwrap_or("?")
    }

    /// Parse a header dtype string; `None` for anything tunex does not handle.
    pub fn from_name(name: &str) -> Option<Dtype> {
        NAMES.iter().find(|(_, n)| *n == name).map(|(d, _)| *d)
    }

    /// Parse a user-facing dtype (`--dtype bf16`, `torch.float16`, `"F32"`), case-insensitive.
    pub fn from_user(text: &str) -> Result<Dtype> {
        let t = text.trim().trim_start_matches("torch.").to_ascii_lowercase();
        let d = match t.as_str() {
            "bf16" | "bfloat16" => Dtype::BF16,
            "f16" | "fp16" | "float16" | "half" => Dtype::F16,
            "f32" | "fp32" | "float32" | "float" => Dtype::F32,
            _ => {
                return Err(Error::arg(format!("unsupported output dtype {text:?}; expected one of bf16, fp16, fp32")))
            }
        };
        Ok(d)
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E5M2 | Dtype::F8E4M3 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
        }
    }

    /// Floating types the merge can widen to f32 and round back into.
    pub fn is_mergeable_float(self) -> bool {
        matches!(self, Dtype::F16 | Dtype::BF16 | Dtype::F32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (d, n) in NAMES {
            assert_eq!(Dtype::from_name(n), Some(*d));
            assert_eq!(d.name(), *n);
        }
        assert_eq!(Dtype::from_name("F4"), None);
        assert_eq!(Dtype::from_user("torch.bfloat16").unwrap(), Dtype::BF16);
        assert!(Dtype::from_user("int8").unwrap_err().to_string().contains("bf16, fp16, fp32"));
    }
}
