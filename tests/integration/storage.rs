//! The shared store's two backends behave alike: a folder (what a shared
//! volume is) and S3-compatible object storage (moto's server on loopback,
//! talked to over HTTP by the same client that talks to S3). Each runs the
//! same checks: reads, replacing writes, creates that only one of many
//! concurrent creators wins, listings by prefix, deletes.

use crate::common;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::moto::Moto;
use tlserve::storage::{Location, Storage};

#[tokio::test]
async fn a_volume_keeps_the_store_contract() {
    let dir = tempfile::tempdir().expect("temp dir");
    let storage = Storage::open(&Location::Volume(dir.path().join("store"))).expect("open");
    keeps_the_store_contract(&storage).await;
    // The volume's temporary files (a write cut short) are never listed.
    std::fs::write(dir.path().join("store/heads/.tmp-x"), b"half").expect("temp file");
    let keys = keys(&storage, "heads").await;
    assert!(keys.iter().all(|k| !k.contains(".tmp")), "{keys:?}");
}

#[tokio::test]
async fn s3_keeps_the_store_contract() {
    let moto = Moto::start("tlserve-test");
    for prefix in ["", "replicas/a"] {
        let storage =
            Storage::open(&Location::S3(moto.location("tlserve-test", prefix))).expect("open");
        keeps_the_store_contract(&storage).await;
    }
    // A store under a prefix sees only its own objects.
    let other =
        Storage::open(&Location::S3(moto.location("tlserve-test", "replicas/b"))).expect("open");
    assert!(keys(&other, "").await.is_empty());
}

async fn keys(storage: &Storage, prefix: &str) -> Vec<String> {
    let entries = storage.list(prefix).await.expect("list");
    entries.into_iter().map(|e| e.key).collect()
}

async fn keeps_the_store_contract(storage: &Storage) {
    let started = SystemTime::now() - Duration::from_secs(60);
    assert_eq!(storage.get("heads/a/1.json").await.expect("get"), None);
    storage
        .put("heads/a/1.json", Bytes::from_static(b"one"))
        .await
        .expect("put");
    storage
        .put("heads/a/1.json", Bytes::from_static(b"uno"))
        .await
        .expect("replace");
    assert_eq!(
        storage.get("heads/a/1.json").await.expect("get").as_deref(),
        Some(&b"uno"[..])
    );

    assert!(storage
        .create("heads/a/2.json", Bytes::from_static(b"two"))
        .await
        .expect("create"));
    assert!(!storage
        .create("heads/a/2.json", Bytes::from_static(b"deux"))
        .await
        .expect("second create"));
    assert_eq!(
        storage.get("heads/a/2.json").await.expect("get").as_deref(),
        Some(&b"two"[..]),
        "a create that lost leaves the object as it was"
    );
    only_one_of_many_creators_wins(storage).await;

    storage
        .put("heads/ab/1.json", Bytes::from_static(b"other name"))
        .await
        .expect("put");
    assert_eq!(
        keys(storage, "heads/a").await,
        ["heads/a/1.json", "heads/a/2.json", "heads/a/race.json"],
        "a prefix is whole segments"
    );
    let entries = storage.list("heads").await.expect("list");
    assert_eq!(entries.len(), 4);
    for entry in &entries {
        assert!(entry.size > 0 && entry.modified > started, "{entry:?}");
    }

    storage.delete("heads/a/1.json").await.expect("delete");
    storage
        .delete("heads/a/1.json")
        .await
        .expect("delete again");
    assert_eq!(storage.get("heads/a/1.json").await.expect("get"), None);
    for key in ["heads/a/2.json", "heads/a/race.json", "heads/ab/1.json"] {
        storage.delete(key).await.expect("clean up");
    }
    assert!(storage.get("../escape").await.is_err(), "keys stay inside");
}

/// Sixteen creators of one key at once: exactly one is told it created the
/// object, and the object is that one's.
async fn only_one_of_many_creators_wins(storage: &Storage) {
    let attempts: Vec<_> = (0..16)
        .map(|i| {
            let storage = storage.clone();
            tokio::spawn(async move {
                let bytes = Bytes::from(format!("creator {i}"));
                let won = storage
                    .create("heads/a/race.json", bytes)
                    .await
                    .expect("create");
                (i, won)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for attempt in attempts {
        let (i, won) = attempt.await.expect("join");
        if won {
            winners.push(i);
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let stored = storage
        .get("heads/a/race.json")
        .await
        .expect("get")
        .expect("created");
    assert_eq!(stored, format!("creator {}", winners[0]).as_bytes());
}

/// `processes` publishers, each a process of its own, publish `each`
/// versions of one head at once; every version number from 1 up is handed
/// out exactly once, and every version reads back.
async fn concurrent_publishers_get_each_number_once(
    store: &[String],
    env: &[(&str, &str)],
    location: &Location,
) {
    let (processes, each) = (4, 6);
    let children: Vec<std::process::Child> = (0..processes)
        .map(|_| {
            std::process::Command::new(common::example_binary("publish_loop"))
                .args(store)
                .arg(each.to_string())
                .envs(env.iter().copied())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("start a publisher")
        })
        .collect();
    let mut versions: Vec<u32> = Vec::new();
    for child in children {
        let output = child.wait_with_output().expect("publisher");
        assert!(output.status.success(), "a publisher failed");
        let text = String::from_utf8(output.stdout).expect("utf-8");
        versions.extend(text.lines().map(|l| l.parse::<u32>().expect("a version")));
    }
    versions.sort_unstable();
    let expected: Vec<u32> = (1..=(processes * each) as u32).collect();
    assert_eq!(versions, expected, "gap-free, duplicate-free");

    let storage = Storage::open(location).expect("open");
    let store = tlserve::head::store::HeadStore::open(
        storage,
        usize::MAX,
        tlserve::head::store::DEFAULT_RESIDENT_ADAPTERS,
    )
    .await
    .expect("store");
    assert_eq!(store.list(None, true).await.len(), expected.len());
}

#[tokio::test]
async fn concurrent_publishers_on_a_volume() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = [dir.path().display().to_string()];
    let location = Location::Volume(dir.path().to_owned());
    concurrent_publishers_get_each_number_once(&store, &[], &location).await;
}

#[tokio::test]
async fn concurrent_publishers_on_s3() {
    let moto = Moto::start("tlserve-publish");
    let store = [
        "s3".to_owned(),
        format!("http://{}", moto.addr),
        "tlserve-publish".to_owned(),
        "publishers".to_owned(),
    ];
    let env = [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
    ];
    let location = Location::S3(moto.location("tlserve-publish", "publishers"));
    concurrent_publishers_get_each_number_once(&store, &env, &location).await;
}
