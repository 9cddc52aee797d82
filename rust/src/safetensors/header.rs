//! The safetensors header: parsed defensively (every length, offset and product checked against the
//! file) and built for writing.
//!
//! Layout: 8 bytes little-endian header length N, N bytes of JSON, then the data section. Offsets in
//! the JSON are relative to the data section and must tile it exactly: contiguous from 0, no holes,
//! no overlap, ending at the end of the file.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use serde::de::{Deserializer, Error as _, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::dtype::Dtype;
use crate::error::{Error, Result};

/// Largest header accepted, as the reference implementation: a larger length field means a corrupt
/// or hostile file, and reading it would allocate without bound.
pub const MAX_HEADER_SIZE: u64 = 100_000_000;

/// The data section starts on this boundary; writers pad the JSON with spaces up to it.
pub const HEADER_ALIGN: usize = 8;

/// One tensor's entry: where its bytes live in the data section and what they mean.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    /// Byte range `[begin, end)` relative to the data section.
    pub begin: u64,
    pub end: u64,
}

impl TensorInfo {
    pub fn nbytes(&self) -> u64 {
        self.end - self.begin
    }

    /// Element count; valid because parsing checked the product for overflow.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// A parsed header. `tensors` is sorted by data offset, the order the bytes sit on disk.
#[derive(Clone, Debug)]
pub struct Header {
    pub metadata: Vec<(String, String)>,
    pub tensors: Vec<TensorInfo>,
    /// Absolute file offset of the data section (8 + header length).
    pub data_start: u64,
}

/// The header JSON as ordered (key, value) pairs, refusing duplicate keys. serde_json's own map
/// would silently keep the last duplicate, hiding a corrupt file.
struct Entries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<Entries, A::Error> {
                let mut seen = HashSet::new();
                let mut out = Vec::new();
                while let Some(key) = m.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(A::Error::custom(format!("duplicate tensor name {key:?}")));
                    }
                    out.push((key, m.next_value::<Value>()?));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// Parse and validate the header of a whole safetensors file held in `file` (usually an mmap).
/// `path` only labels errors.
pub fn parse_header(path: &Path, file: &[u8]) -> Result<Header> {
    let bad = |msg: String| Error::format(path, format!("not a valid safetensors file: {msg}"));
    let file_len = file.len() as u64;
    if file.len() < 8 {
        return Err(bad(format!("the file is {file_len} bytes, shorter than the 8-byte length prefix")));
    }
    let n = u64::from_le_bytes(file[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER_SIZE {
        return Err(bad(format!("header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit")));
    }
    if 8 + n > file_len {
        return Err(bad(format!("header length {n} runs past the end of the {file_len}-byte file (truncated?)")));
    }
    let json = &file[8..8 + n as usize];
    if json.first() != Some(&b'{') {
        return Err(bad("the header does not start with '{'".into()));
    }
    let entries: Entries = serde_json::from_slice(json).map_err(|e| bad(format!("header JSON: {e}")))?;
    let data_start = 8 + n;
    let data_len = file_len - data_start;

    let mut metadata = Vec::new();
    let mut tensors = Vec::new();
    for (name, value) in entries.0 {
        if name == "__metadata__" {
            let Value::Object(map) = value else {
                return Err(bad("__metadata__ is not an object of strings".into()));
            };
            for (k, v) in map {
                let Value::String(s) = v else {
                    return Err(bad(format!("__metadata__ value for {k:?} is not a string")));
                };
                metadata.push((k, s));
            }
            continue;
        }
        let raw: RawEntry = serde_json::from_value(value)
            .map_err(|e| bad(format!("tensor {name:?}: {e} (expected dtype, shape, data_offsets)")))?;
        tensors.push(check_entry(name, raw).map_err(bad)?);
    }

    tensors.sort_by_key(|t| (t.begin, t.end));
    let mut expected = 0u64;
    for t in &tensors {
        if t.begin != expected {
            let what = if t.begin < expected { "overlaps the tensor before it" } else { "leaves a hole before it" };
            return Err(bad(format!(
                "tensor {:?} starts at data offset {} but the previous tensor ends at {expected}: it {what}",
                t.name, t.begin
            )));
        }
        expected = t.end;
    }
    if expected != data_len {
        // Name the first tensor whose bytes are missing, so a truncated file says what it lost.
        let cut = match tensors.iter().find(|t| t.end > data_len) {
            Some(t) => format!("; tensor {:?} ends at data offset {} (truncated?)", t.name, t.end),
            None => String::new(),
        };
        return Err(bad(format!(
            "the tensors cover {expected} data bytes but the file holds {data_len} after the header{cut}"
        )));
    }
    Ok(Header { metadata, tensors, data_start })
}

fn check_entry(name: String, raw: RawEntry) -> std::result::Result<TensorInfo, String> {
    let dtype =
        Dtype::from_name(&raw.dtype).ok_or_else(|| format!("tensor {name:?} has unsupported dtype {:?}", raw.dtype))?;
    let numel = raw
        .shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("tensor {name:?}: shape {:?} overflows 64 bits", raw.shape))?;
    let nbytes = numel
        .checked_mul(dtype.size() as u64)
        .ok_or_else(|| format!("tensor {name:?}: byte size of shape {:?} overflows 64 bits", raw.shape))?;
    let (begin, end) = raw.data_offsets;
    if end < begin || end - begin != nbytes {
        return Err(format!(
            "tensor {name:?}: data_offsets [{begin}, {end}) hold {} bytes but {} {:?} needs {nbytes}",
            end.wrapping_sub(begin) as i128,
            dtype.name(),
            raw.shape
        ));
    }
    Ok(TensorInfo { name, dtype, shape: raw.shape, begin, end })
}

/// Serialize a header for tensors laid out back to back in the given order: the 8-byte length,
/// the JSON (metadata first) and the space padding. Returns the bytes and the data length.
pub fn build_header(tensors: &[(&str, Dtype, &[u64])], metadata: &[(String, String)]) -> (Vec<u8>, u64) {
    let mut obj = Map::new();
    if !metadata.is_empty() {
        let meta: Map<String, Value> = metadata.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        obj.insert("__metadata__".into(), Value::Object(meta));
    }
    let mut offset = 0u64;
    for (name, dtype, shape) in tensors {
        let nbytes = shape.iter().product::<u64>() * dtype.size() as u64;
        let mut e = Map::new();
        e.insert("dtype".into(), Value::String(dtype.name().into()));
        e.insert("shape".into(), Value::from(shape.to_vec()));
        e.insert("data_offsets".into(), Value::from(vec![offset, offset + nbytes]));
        obj.insert((*name).to_string(), Value::Object(e));
        offset += nbytes;
    }
    let mut json = serde_json::to_vec(&Value::Object(obj)).expect("a JSON map always serializes");
    while !(8 + json.len()).is_multiple_of(HEADER_ALIGN) {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    (out, offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(json: &str, data: usize) -> Vec<u8> {
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v.resize(v.len() + data, 0);
        v
    }

    fn err(bytes: &[u8]) -> String {
        parse_header(Path::new("x.safetensors"), bytes).unwrap_err().to_string()
    }

    #[test]
    fn round_trip_built_header() {
        let shape: &[u64] = &[2, 3];
        let meta = vec![("format".to_string(), "pt".to_string())];
        let (mut bytes, len) = build_header(&[("a", Dtype::BF16, shape), ("b", Dtype::F32, &[4])], &meta);
        assert_eq!(bytes.len() % 8, 0);
        bytes.resize(bytes.len() + len as usize, 7);
        let h = parse_header(Path::new("x"), &bytes).unwrap();
        assert_eq!(h.metadata, meta);
        assert_eq!(h.tensors.len(), 2);
        assert_eq!((h.tensors[1].begin, h.tensors[1].end), (12, 28));
        assert_eq!(h.tensors[0].numel(), 6);
    }

    #[test]
    fn corrupt_files_are_named_errors() {
        assert!(err(b"").contains("shorter than the 8-byte"));
        assert!(err(&u64::MAX.to_le_bytes()).contains("exceeds"));
        assert!(err(&file_with("{}", 0)[..9]).contains("runs past the end"));
        assert!(err(&file_with("[]", 0)).contains("does not start with"));
        assert!(err(&file_with("{\"a\":1", 0)).contains("header JSON"));
        let dup = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        assert!(err(&file_with(dup, 2)).contains("duplicate tensor name"));
        let overlap = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#;
        assert!(err(&file_with(overlap, 3)).contains("overlaps"));
        let hole = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        assert!(err(&file_with(hole, 2)).contains("hole"));
        let truncated = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        assert!(err(&file_with(truncated, 8)).contains("truncated"));
        let overflow = r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#;
        assert!(err(&file_with(overflow, 0)).contains("overflows"));
        let size = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#;
        assert!(err(&file_with(size, 8)).contains("needs 16"));
        let backwards = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[8,0]}}"#;
        assert!(err(&file_with(backwards, 8)).contains("data_offsets"));
        let dtype = r#"{"a":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}"#;
        assert!(err(&file_with(dtype, 2)).contains("unsupported dtype"));
        let meta = r#"{"__metadata__":{"format":1}}"#;
        assert!(err(&file_with(meta, 0)).contains("not a string"));
    }

    #[test]
    fn empty_and_zero_sized_tensors_are_fine() {
        let json = r#"{"e":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]},"a":{"dtype":"U8","shape":[],"data_offsets":[0,1]}}"#;
        let h = parse_header(Path::new("x"), &file_with(json, 1)).unwrap();
        assert_eq!(h.tensors.len(), 2);
        assert!(parse_header(Path::new("x"), &file_with("{}", 0)).unwrap().tensors.is_empty());
    }
}
