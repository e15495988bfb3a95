//! What the monitoring files may name: the metrics src/metrics.rs declares,
//! the labels Prometheus adds, the RPCs of the contract; and where the names
//! are in the dashboard, the rules and the docs.

use std::collections::BTreeSet;

use serde_json::Value;

use super::read;
use crate::common::repo_file;

/// Labels that Prometheus attaches to scraped series (target labels, from the
/// ServiceMonitor's Kubernetes discovery), usable on every tlserve metric.
pub const TARGET_LABELS: [&str; 6] = [
    "job",
    "instance",
    "namespace",
    "pod",
    "container",
    "endpoint",
];

/// Reasons of tlserve_queue_rejections_total (src/batching).
pub const REJECTION_REASONS: [&str; 3] = ["queue_full", "deadline", "cancelled"];

/// Every string under the key `key`, anywhere in `value`.
pub fn strings_under(value: &Value, key: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if k == key {
                    if let Some(s) = v.as_str() {
                        out.push(s.to_owned());
                    }
                }
                strings_under(v, key, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| strings_under(v, key, out)),
        _ => {}
    }
}

/// Every `tlserve_*` word in a text (names, not parts of recording-rule names).
pub fn tlserve_words(text: &str) -> BTreeSet<String> {
    let mut words = BTreeSet::new();
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while i < bytes.len() {
        if word(bytes[i]) {
            let start = i;
            while i < bytes.len() && word(bytes[i]) {
                i += 1;
            }
            let w = &text[start..i];
            // `tlserve_*` (the prefix itself) names no metric.
            if w.len() > "tlserve_".len() && w.starts_with("tlserve_") && !w.contains(':') {
                words.insert(w.to_owned());
            }
        } else {
            i += 1;
        }
    }
    words
}

/// The metric names declared in src/metrics.rs (`pub const X: &str = "tlserve_..."`).
pub fn declared_metric_names() -> BTreeSet<String> {
    let source = read("src/metrics.rs");
    let names: BTreeSet<String> = source
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            line.starts_with("pub const ")
                .then(|| line.split('"').nth(1))
                .flatten()
                .filter(|name| name.starts_with("tlserve_"))
                .map(str::to_owned)
        })
        .collect();
    assert!(
        names.len() >= 15,
        "src/metrics.rs declares its names: {names:?}"
    );
    names
}

/// The RPC method names of the public contract (proto/).
pub fn rpc_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(repo_file("proto/tlserve/v1")).expect("proto dir") {
        let source = std::fs::read_to_string(entry.expect("entry").path()).expect("proto");
        for line in source.lines() {
            if let Some(rest) = line.trim().strip_prefix("rpc ") {
                names.insert(rest.split('(').next().unwrap().trim().to_owned());
            }
        }
    }
    names
}
