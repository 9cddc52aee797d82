//! HF sharded checkpoints: the `*.safetensors.index.json` file and finding a folder's weight files.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, IoContext, Result};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The parsed index: tensor name -> shard file name, in file order.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardIndex {
    pub weight_map: Vec<(String, String)>,
    pub total_size: Option<u64>,
}

impl ShardIndex {
    /// Shard file names in the order they first appear, sorted as HF numbers them.
    pub fn files(&self) -> Vec<String> {
        let mut seen = HashSet::new();
        let mut files: Vec<String> =
            self.weight_map.iter().filter(|(_, f)| seen.insert(f.clone())).map(|(_, f)| f.clone()).collect();
        files.sort();
        files
    }
}

/// Parse index JSON bytes. Shard names must be plain file names: an index pointing outside its
/// folder (`../x`, `/etc/passwd`) is refused rather than followed.
pub fn parse_index(path: &Path, bytes: &[u8]) -> Result<ShardIndex> {
    let bad = |msg: String| Error::format(path, format!("not a valid safetensors index: {msg}"));
    let root: Value = serde_json::from_slice(bytes).map_err(|e| bad(format!("JSON: {e}")))?;
    let Value::Object(root) = root else { return Err(bad("the top level is not an object".into())) };
    let total_size = match root.get("metadata").and_then(|m| m.get("total_size")) {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                .ok_or_else(|| bad(format!("metadata.total_size is {v}, not a byte count")))?,
        ),
    };
    let Some(Value::Object(map)) = root.get("weight_map") else {
        return Err(bad("no \"weight_map\" object mapping tensor names to shard files".into()));
    };
    let mut weight_map = Vec::with_capacity(map.len());
    for (name, file) in map {
        let Value::String(file) = file else {
            return Err(bad(format!("weight_map[{name:?}] is {file}, not a file name")));
        };
        if !is_plain_file_name(file) {
            return Err(bad(format!("weight_map[{name:?}] = {file:?} is not a plain file name in the index's folder")));
        }
        weight_map.push((name.clone(), file.clone()));
    }
    Ok(ShardIndex { weight_map, total_size })
}

fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
}

/// The index JSON as HF writes it: indent 2, sorted keys, trailing newline.
pub fn index_json(weight_map: &[(String, String)], total_size: u64) -> String {
    let map: BTreeMap<&str, &str> = weight_map.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut meta = BTreeMap::new();
    meta.insert("total_size", total_size);
    let root = serde_json::json!({ "metadata": meta, "weight_map": map });
    let mut s = serde_json::to_string_pretty(&root).expect("maps of strings serialize");
    s.push('\n');
    s
}

/// The safetensors weight files of a HF model folder, in shard order, plus the parsed index when
/// there is one. Fails naming the folder and what it does contain.
pub fn weight_files(dir: &Path) -> Result<(Vec<PathBuf>, Option<ShardIndex>)> {
    let meta = std::fs::metadata(dir).at(dir)?;
    if !meta.is_dir() {
        return Err(Error::arg(format!("{} is not a folder; expected a HF model folder", dir.display())));
    }
    let index_path = dir.join(INDEX_FILE);
    if index_path.is_file() {
        let bytes = std::fs::read(&index_path).at(&index_path)?;
        let index = parse_index(&index_path, &bytes)?;
        let files = index.files().iter().map(|f| dir.join(f)).collect();
        return Ok((files, Some(index)));
    }
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok((vec![single], None));
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .at(dir)?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    names.sort();
    Err(Error::io(
        dir,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "no {SINGLE_FILE} or {INDEX_FILE} in this folder (it holds: {})",
                if names.is_empty() { "nothing".to_string() } else { names.join(", ") }
            ),
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_round_trip_and_refusals() {
        let wm =
            vec![("b".to_string(), "m-2.safetensors".to_string()), ("a".to_string(), "m-1.safetensors".to_string())];
        let text = index_json(&wm, 42);
        assert!(text.starts_with("{\n  \"metadata\": {\n    \"total_size\": 42\n  },"));
        assert!(text.ends_with("}\n"));
        let idx = parse_index(Path::new("i.json"), text.as_bytes()).unwrap();
        assert_eq!(idx.total_size, Some(42));
        assert_eq!(idx.files(), vec!["m-1.safetensors", "m-2.safetensors"]);
        let e = parse_index(Path::new("i.json"), br#"{"weight_map":{"a":"../x"}}"#).unwrap_err();
        assert!(e.to_string().contains("plain file name"));
        let e = parse_index(Path::new("i.json"), br#"{"metadata":{}}"#).unwrap_err();
        assert!(e.to_string().contains("weight_map"));
        let e = parse_index(Path::new("i.json"), br#"{"weight_map":{"a":3}}"#).unwrap_err();
        assert!(e.to_string().contains("not a file name"));
    }

    #[test]
    fn weight_files_names_what_the_folder_holds() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pytorch_model.bin"), b"x").unwrap();
        let e = weight_files(dir.path()).unwrap_err().to_string();
        assert!(e.contains("pytorch_model.bin"), "{e}");
        std::fs::write(dir.path().join(SINGLE_FILE), b"x").unwrap();
        assert_eq!(weight_files(dir.path()).unwrap().0.len(), 1);
    }
}
