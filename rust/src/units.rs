//! Human size strings (`--max-shard-size 2GB`) to byte counts.
//!
//! Decimal units follow HF transformers (KB = 10^3 ... TB = 10^12); binary units (KiB ... TiB) are
//! accepted as older transformers did. A bare number is bytes.

use crate::error::{Error, Result};

const UNITS: &[(&str, f64)] = &[
    ("B", 1.0),
    ("KB", 1e3),
    ("MB", 1e6),
    ("GB", 1e9),
    ("TB", 1e12),
    ("KIB", 1024.0),
    ("MIB", 1048576.0),
    ("GIB", 1073741824.0),
    ("TIB", 1099511627776.0),
];

/// Parse `"2GB"`, `"1.5 GiB"`, `"500MB"` or `"1048576"` into bytes.
pub fn parse_size(text: &str) -> Result<u64> {
    let s = text.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = (s[..split].trim(), s[split..].trim());
    let bad = |why: &str| {
        Error::arg(format!(
            "bad size {text:?}: {why}; expected a positive number with an optional unit \
             (B, KB, MB, GB, TB decimal, or KiB, MiB, GiB, TiB binary), e.g. \"2GB\" or \"500MiB\""
        ))
    };
    if num.is_empty() {
        return Err(bad("no number"));
    }
    let value: f64 = num.parse().map_err(|_| bad("the number does not parse"))?;
    // "2Gb" is gigabits in HF transformers; rather than guess, refuse mixed case ending in 'b'.
    if unit.ends_with('b') && unit.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(bad("a lowercase 'b' means bits, which is ambiguous; write B for bytes"));
    }
    let upper = unit.to_ascii_uppercase();
    let factor = if upper.is_empty() {
        1.0
    } else {
        UNITS
            .iter()
            .find(|(u, _)| *u == upper)
            .map(|(_, f)| *f)
            .ok_or_else(|| bad(&format!("unknown unit {unit:?}")))?
    };
    let bytes = value * factor;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(bad("the size must be at least one byte"));
    }
    Ok(bytes.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_and_binary_units() {
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("500 MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("2gb").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("10KiB").unwrap(), 10240);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("7B").unwrap(), 7);
    }

    #[test]
    fn rejects_nonsense() {
        for s in ["", "GB", "2XB", "-1GB", "0", "1.2.3GB", "2Gb", "nanGB"] {
            let e = parse_size(s).unwrap_err().to_string();
            assert!(e.contains("bad size"), "{s}: {e}");
        }
    }
}
