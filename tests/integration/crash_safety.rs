//! Crash safety of the head store: a process publishing head versions in a loop
//! (examples/publish_loop.rs) is killed with SIGKILL at random moments, many
//! times. After every kill the store must open, every version whose manifest
//! exists must load, no number may be skipped, and the next version number
//! must be above every existing one.

use crate::common;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use tlserve::{
    head::{
        store::{HeadStore, DEFAULT_RESIDENT_ADAPTERS},
        HeadRef,
    },
    storage::{Location, Storage},
};

const KILLS: usize = 25;

fn publish_loop() -> std::path::PathBuf {
    common::example_binary("publish_loop")
}

/// Every published version of `name` in the store directory: the version
/// folders holding a manifest.
fn published(root: &std::path::Path, name: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(root.join("heads").join(name)) else {
        return Vec::new();
    };
    let mut versions: Vec<u32> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse().ok()?;
            e.path().join("head.json").is_file().then_some(version)
        })
        .collect();
    versions.sort();
    versions
}

/// Writes a kill cut short: temporary files, and weights no manifest names.
fn cut_short(root: &std::path::Path, name: &str) -> usize {
    let head = root.join("heads").join(name);
    let mut named = std::collections::HashSet::new();
    let mut temporary = 0;
    for version in std::fs::read_dir(&head).into_iter().flatten().flatten() {
        for file in std::fs::read_dir(version.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let file_name = file.file_name().to_string_lossy().into_owned();
            if file_name.starts_with(".tmp-") {
                temporary += 1;
            } else if file_name == "head.json" {
                let manifest: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(file.path()).expect("manifest"))
                        .expect("every manifest parses");
                if let Some(blob) = manifest["weights"].as_str() {
                    named.insert(blob.rsplit('/').next().unwrap_or_default().to_owned());
                }
            }
        }
    }
    let unnamed = std::fs::read_dir(head.join("blobs"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|blob| !named.contains(&*blob.file_name().to_string_lossy()))
        .count();
    temporary + unnamed
}

async fn open(root: &std::path::Path) -> tlserve::Result<HeadStore> {
    let storage = Storage::open(&Location::Volume(root.to_owned()))?;
    HeadStore::open(storage, usize::MAX, DEFAULT_RESIDENT_ADAPTERS).await
}

#[tokio::test]
async fn sigkill_while_publishing_never_leaves_a_broken_head() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    let binary = publish_loop();
    // Deterministic "random" delays: a SplitMix64 over 5..=120 ms.
    let mut state = 0x00C0_FFEE_u64;
    let mut published_before = 0;
    for kill in 0..KILLS {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let delay = Duration::from_millis(5 + (z ^ (z >> 31)) % 116);

        let mut child = Command::new(&binary)
            .arg(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start publish_loop");
        std::thread::sleep(delay);
        child.kill().expect("SIGKILL"); // std's kill sends SIGKILL on Unix
        child.wait().expect("reap");

        let store = open(root)
            .await
            .unwrap_or_else(|err| panic!("after kill {kill}: the store does not open: {err}"));
        let versions = published(root, "crash");
        let expected: Vec<u32> = (1..=versions.len() as u32).collect();
        assert_eq!(
            versions, expected,
            "after kill {kill}: numbers are gap-free"
        );
        for &version in &versions {
            let reference = HeadRef {
                name: "crash".into(),
                version: Some(version),
            };
            let head = store.get(&reference).await.unwrap_or_else(|err| {
                panic!("after kill {kill} ({delay:?}): version {version} does not load: {err}")
            });
            assert_eq!(head.meta.version, version);
            assert_eq!(head.weights.input_dim(), 384);
        }
        assert!(
            versions.len() >= published_before,
            "a published version vanished"
        );
        published_before = versions.len();
    }
    // Leftovers are kills that landed inside a write (the store removes them
    // once they are an hour old).
    let interrupted = cut_short(root, "crash");
    eprintln!(
        "{KILLS} kills: {published_before} versions published, {interrupted} writes cut short"
    );
    assert!(interrupted > 0, "no kill landed inside a write");
    assert!(
        published_before >= KILLS,
        "the loop published only {published_before} versions in {KILLS} runs: \
         the kills did not land during publishing"
    );

    // Versions only increase, whatever the crashes left behind.
    let store = open(root).await.expect("open");
    let highest = published(root, "crash").into_iter().max().unwrap_or(0);
    let output = Command::new(publish_loop())
        .arg(root)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start");
    drop(store);
    let mut child = output;
    std::thread::sleep(Duration::from_millis(300));
    child.kill().expect("kill");
    let out = child.wait_with_output().expect("output");
    let first: u32 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .and_then(|l| l.parse().ok())
        .expect("a version published");
    assert!(first > highest, "new version {first} not above {highest}");
}
