//! Crash safety of the head store: a process publishing head versions in a loop
//! (examples/publish_loop.rs) is killed with SIGKILL at random moments, many
//! times. After every kill the store must open, every version folder in it must
//! load, and the next version number must be above every existing one.

mod common;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use tlserve::head::{store::HeadStore, HeadRef};

const KILLS: usize = 25;

/// examples/publish_loop, built by `cargo test` next to the test binaries.
fn publish_loop() -> std::path::PathBuf {
    let deps = std::env::current_exe().expect("test binary");
    let path = deps
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("examples/publish_loop");
    assert!(
        path.is_file(),
        "{} is missing: cargo test builds it",
        path.display()
    );
    path
}

/// Every version folder of `name` in the store directory.
fn version_dirs(root: &std::path::Path, name: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(root.join(name)) else {
        return Vec::new();
    };
    let mut versions: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort();
    versions
}

#[test]
fn sigkill_while_publishing_never_leaves_a_broken_head() {
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

        let store = HeadStore::open(root, usize::MAX)
            .unwrap_or_else(|err| panic!("after kill {kill}: the store does not open: {err}"));
        let versions = version_dirs(root, "crash");
        for &version in &versions {
            let reference = HeadRef {
                name: "crash".into(),
                version: Some(version),
            };
            let head = store.get(&reference).unwrap_or_else(|err| {
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
    // Leftover temporary folders are kills that landed inside a write (the
    // store removes them once they are an hour old).
    let interrupted = std::fs::read_dir(root)
        .expect("store dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        })
        .count();
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
    let store = HeadStore::open(root, usize::MAX).expect("open");
    let highest = version_dirs(root, "crash").into_iter().max().unwrap_or(0);
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
