//! Shard planning: which tensors go to which output file, decided from sizes alone before any byte
//! is read, so a streaming writer can emit each file's header first.

use std::ops::Range;

/// Split tensors (given by byte size, in output order) into consecutive shards of at most
/// `max_shard_size` bytes: greedy, a new shard starts when the next tensor would tip the current
/// one over the limit, and a tensor larger than the limit gets a shard of its own.
pub fn plan_shards(sizes: &[u64], max_shard_size: u64) -> Vec<Range<usize>> {
    let mut shards = Vec::new();
    let (mut start, mut current) = (0usize, 0u64);
    for (i, &size) in sizes.iter().enumerate() {
        if i > start && current.saturating_add(size) > max_shard_size {
            shards.push(start..i);
            start = i;
            current = 0;
        }
        current = current.saturating_add(size);
    }
    if start < sizes.len() || shards.is_empty() {
        shards.push(start..sizes.len());
    }
    shards
}

/// HF file names: `model.safetensors` alone, else `model-00001-of-00003.safetensors` ...
pub fn shard_file_names(prefix: &str, count: usize) -> Vec<String> {
    if count <= 1 {
        return vec![format!("{prefix}.safetensors")];
    }
    (1..=count).map(|i| format!("{prefix}-{i:05}-of-{count:05}.safetensors")).collect()
}

/// The index file name that goes with `prefix` (`model.safetensors.index.json`).
pub fn index_file_name(prefix: &str) -> String {
    format!("{prefix}.safetensors.index.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_split_edge_cases() {
        assert_eq!(plan_shards(&[], 10), vec![0..0]);
        assert_eq!(plan_shards(&[4, 4, 4], 10), vec![0..2, 2..3]);
        // Exactly at the limit stays in one shard.
        assert_eq!(plan_shards(&[5, 5], 10), vec![0..2]);
        // An oversized tensor sits alone; what follows starts afresh.
        assert_eq!(plan_shards(&[3, 25, 3, 3], 10), vec![0..1, 1..2, 2..4]);
        assert_eq!(plan_shards(&[25], 10), vec![0..1]);
        assert_eq!(plan_shards(&[0, 0, 10, 0], 10), vec![0..4]);
        assert_eq!(plan_shards(&[u64::MAX, 1], 10), vec![0..1, 1..2]);
    }

    #[test]
    fn hf_file_names() {
        assert_eq!(shard_file_names("model", 1), vec!["model.safetensors"]);
        assert_eq!(shard_file_names("model", 2)[1], "model-00002-of-00002.safetensors");
        assert_eq!(index_file_name("adapter_model"), "adapter_model.safetensors.index.json");
    }
}
