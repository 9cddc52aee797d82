//! Property-based fuzzing of every parser that reads user files: the safetensors header, the shard
//! index and the adapter config. Each case must return Ok or a typed error, never panic. Cases are
//! bounded (PROPTEST_CASES overrides) so `cargo test` stays fast; any input that ever crashed one
//! of these parsers is kept below as a named regression test.

use std::path::Path;

use proptest::prelude::*;

use super::header::{build_header, parse_header};
use super::index::parse_index;
use super::Dtype;
use crate::adapter::AdapterConfig;

/// 512 cases per property by default (a few seconds); CI or a long local run sets PROPTEST_CASES.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// A valid file image to mutate: a few tensors with real data.
fn valid_file(n: usize) -> Vec<u8> {
    let shapes: Vec<Vec<u64>> = (0..n).map(|i| vec![(i as u64 % 3) + 1, 2]).collect();
    let names: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
    let entries: Vec<(&str, Dtype, &[u64])> =
        names.iter().zip(&shapes).map(|(n, s)| (n.as_str(), Dtype::F16, s.as_slice())).collect();
    let (mut bytes, data) = build_header(&entries, &[("format".into(), "pt".into())]);
    bytes.resize(bytes.len() + data as usize, 0x3c);
    bytes
}

fn json_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        "[a-zA-Z_.()*|0-9\\\\]{0,12}".prop_map(|s| format!("{s:?}")),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec(("[a-z_]{0,8}", inner), 0..4).prop_map(|kv| {
                let body: Vec<String> = kv.iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
                format!("{{{}}}", body.join(","))
            }),
        ]
    })
}

/// Header entries with plausible keys and adversarial numbers.
fn header_json() -> impl Strategy<Value = String> {
    let dtype = prop_oneof![Just("F32"), Just("BF16"), Just("U8"), Just("F4"), Just("")];
    let num = prop_oneof![0u64..64, Just(u64::MAX), Just(1u64 << 32), any::<u64>()];
    let entry = (dtype, prop::collection::vec(num.clone(), 0..4), num.clone(), num);
    prop::collection::vec(("[a-c]{1,2}", entry), 0..5).prop_map(|es| {
        let body: Vec<String> = es
            .iter()
            .map(|(n, (d, s, b, e))| format!("{n:?}:{{\"dtype\":{d:?},\"shape\":{s:?},\"data_offsets\":[{b},{e}]}}"))
            .collect();
        format!("{{{}}}", body.join(","))
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn header_never_panics_on_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse_header(Path::new("f"), &bytes);
    }

    #[test]
    fn header_never_panics_on_mutated_files(n in 0usize..5, flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6), cut in any::<usize>()) {
        let mut bytes = valid_file(n);
        for (pos, val) in flips {
            let len = bytes.len();
            bytes[pos % len] = val;
        }
        let keep = bytes.len() - cut % 3.min(bytes.len());
        if let Ok(h) = parse_header(Path::new("f"), &bytes[..keep]) {
            // Whatever parses must describe bytes inside the file.
            for t in &h.tensors {
                prop_assert!(h.data_start + t.end <= keep as u64);
            }
        }
    }

    #[test]
    fn header_never_panics_on_adversarial_entries(json in header_json(), data in 0usize..64) {
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes.resize(bytes.len() + data, 0);
        if let Ok(h) = parse_header(Path::new("f"), &bytes) {
            let covered: u64 = h.tensors.iter().map(|t| t.nbytes()).sum();
            prop_assert_eq!(h.data_start + covered, bytes.len() as u64);
        }
    }

    #[test]
    fn index_never_panics(json in json_value(), wm in prop::collection::vec(("[a-z.]{0,6}", "[a-z./\\\\]{0,8}"), 0..4)) {
        let _ = parse_index(Path::new("i"), json.as_bytes());
        let body: Vec<String> = wm.iter().map(|(k, v)| format!("{k:?}:{v:?}")).collect();
        let text = format!("{{\"metadata\":{json},\"weight_map\":{{{}}}}}", body.join(","));
        if let Ok(idx) = parse_index(Path::new("i"), text.as_bytes()) {
            for (_, f) in &idx.weight_map {
                prop_assert!(!f.contains('/') && f != "..");
            }
        }
    }

    #[test]
    fn adapter_config_never_panics(r in json_value(), alpha in json_value(), pat in json_value(), key in "[a-z_.()*|\\[\\]{}0-9\\\\]{0,10}") {
        let text = format!(
            "{{\"peft_type\":\"LORA\",\"r\":{r},\"lora_alpha\":{alpha},\"rank_pattern\":{{{key:?}:{pat}}},\"alpha_pattern\":{pat},\"use_rslora\":{pat}}}"
        );
        if let Ok(c) = AdapterConfig::parse(Path::new("a"), text.as_bytes()) {
            let (rank, s) = c.scaling_for("model.layers.0.q_proj");
            prop_assert!(rank > 0);
            prop_assert!(!s.is_nan() || c.lora_alpha.is_nan());
        }
    }
}

// Regression inputs: each one once crashed or nearly crashed a parser.

#[test]
fn regression_offsets_past_u64_when_added_to_header_start() {
    // data_offsets near u64::MAX must not overflow when added to the data start.
    let json = r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[18446744073709551615,18446744073709551615]}}"#;
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json.as_bytes());
    assert!(parse_header(Path::new("f"), &bytes).is_err());
}

#[test]
fn regression_deeply_nested_json_is_an_error_not_a_stack_overflow() {
    let json = format!("{{\"__metadata__\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json.as_bytes());
    assert!(parse_header(Path::new("f"), &bytes).is_err());
    assert!(parse_index(Path::new("i"), json.as_bytes()).is_err());
    assert!(AdapterConfig::parse(Path::new("a"), json.as_bytes()).is_err());
}

#[test]
fn regression_huge_regex_in_rank_pattern_is_refused() {
    let text = "{\"r\":8,\"rank_pattern\":{\"(a{1000}){1000}\":4}}".to_string();
    assert!(AdapterConfig::parse(Path::new("a"), text.as_bytes()).is_err());
}
