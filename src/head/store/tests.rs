//! The head store on a volume; tests/integration/storage.rs runs the same publishing
//! across processes and on S3.

use std::{fs, time::SystemTime};

use super::*;
use crate::head::fine_tune::Method;
use crate::storage::Location;
use crate::{
    head::{BackboneRef, FeatureSettings, HeadKind},
    nn::Dense,
};

fn head(name: &str) -> (HeadMetadata, HeadWeights) {
    let backbone = BackboneRef {
        name: "bb".into(),
        fingerprint: "fp".into(),
    };
    let features = FeatureSettings {
        pooling: crate::backbone::Pooling::Mean,
        normalize: true,
    };
    let labels = vec!["a".into(), "b".into()];
    let meta = HeadMetadata {
        train_examples: 10,
        validation_examples: 2,
        created_at_ms: 1,
        ..HeadMetadata::new(name, HeadKind::Linear, backbone, features, 2, labels)
    };
    let weights = HeadWeights::Linear {
        output: Dense {
            weight: vec![1.0, 2.0, 3.0, 4.0],
            bias: vec![0.5, -0.5],
            inputs: 2,
            outputs: 2,
        },
    };
    (meta, weights)
}

fn reference(text: &str) -> HeadRef {
    HeadRef::parse(text).unwrap()
}

/// A fine-tuned head: its record and a one-layer adapter whose values
/// start at `seed`.
fn tuned(name: &str, seed: f32) -> (HeadMetadata, HeadWeights, Adapter) {
    use crate::backbone::bert::adapter::{LoraAdapter, LowRankWeights};
    use crate::head::fine_tune::{FineTuneParams, LoraSettings, LoraTargets};
    let (mut meta, weights) = head(name);
    let mut params = FineTuneParams::defaults(1);
    params.method = Method::Lora(LoraSettings {
        layers: 1,
        rank: 1,
        alpha: 2.0,
        dropout: 0.0,
        targets: LoraTargets::default(),
    });
    let (training, tuning) = params.record();
    (meta.training, meta.fine_tuning) = (training, Some(tuning));
    let mut slots: crate::backbone::bert::adapter::LayerSlots = Default::default();
    slots[0] = Some(LowRankWeights {
        a: vec![seed, seed + 1.0],
        b: vec![seed + 2.0, seed + 3.0],
        rank: 1,
        inputs: 2,
        outputs: 2,
    });
    let adapter = Adapter::Lora(LoraAdapter {
        rank: 1,
        alpha: 2.0,
        first_layer: 5,
        layers: vec![slots],
    });
    (meta, weights, adapter)
}

/// A head fine-tuned with its top layer trained in full (width 2,
/// feed-forward 3), the layer's values starting at `seed`.
fn tuned_layers(name: &str, seed: f32) -> (HeadMetadata, HeadWeights, Adapter) {
    use crate::backbone::bert::top_layers::{LayerWeights, NormWeights, TopLayers};
    use crate::head::fine_tune::FineTuneParams;
    let (mut meta, weights) = head(name);
    let (training, tuning) = FineTuneParams::top_layers(1).record();
    (meta.training, meta.fine_tuning) = (training, Some(tuning));
    let dense = |inputs: usize, outputs: usize, at: f32| Dense {
        weight: (0..inputs * outputs).map(|i| at + i as f32).collect(),
        bias: vec![at; outputs],
        inputs,
        outputs,
    };
    let norm = NormWeights {
        weight: vec![seed, seed],
        bias: vec![-seed, seed],
    };
    let layer = LayerWeights {
        dense: [
            dense(2, 2, seed),
            dense(2, 2, seed + 1.0),
            dense(2, 2, seed + 2.0),
            dense(2, 2, seed + 3.0),
            dense(2, 3, seed + 4.0),
            dense(3, 2, seed + 5.0),
        ],
        norms: [norm.clone(), norm],
    };
    (
        meta,
        weights,
        Adapter::Layers(TopLayers::new(5, vec![layer])),
    )
}

async fn open_with(
    dir: &std::path::Path,
    max_heads: usize,
    resident: ResidentAdapters,
) -> HeadStore {
    let storage = Storage::open(&Location::Volume(dir.to_owned())).unwrap();
    HeadStore::open(storage, max_heads, resident).await.unwrap()
}

async fn latest(store: &HeadStore, name: &str) -> u32 {
    store.get(&reference(name)).await.unwrap().meta.version
}

async fn open(dir: &std::path::Path, max_heads: usize) -> HeadStore {
    open_with(dir, max_heads, DEFAULT_RESIDENT_ADAPTERS).await
}

/// A head with its own top layers is published and read back, after a
/// reopen too, with the same weights.
#[tokio::test]
async fn top_layers_are_stored_with_their_head() {
    let dir = tempfile::tempdir().unwrap();
    let (meta, weights, adapter) = tuned_layers("layers", 0.5);
    let stored = {
        let store = open_with(dir.path(), 10, ResidentAdapters::count(4)).await;
        store
            .publish(meta, weights, Some(adapter.clone()))
            .await
            .unwrap()
    };
    let reopened = open_with(dir.path(), 10, ResidentAdapters::count(4)).await;
    let read = reopened
        .adapter(&stored)
        .await
        .unwrap()
        .expect("an adapter");
    assert_eq!(*read, adapter);
    let storage = Storage::open(&Location::Volume(dir.path().to_owned())).unwrap();
    let (_, direct) = read_head(&storage, &reference("layers")).await.unwrap();
    assert_eq!(direct, Some(adapter));
}

/// Beyond the resident bound the least recently used adapter is dropped
/// and read back from the store, the same; a reopened store reads them too.
#[tokio::test]
async fn adapters_beyond_the_bound_are_read_back_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), 10, ResidentAdapters::count(1)).await;
    let (meta, weights, first_adapter) = tuned("first", 1.0);
    let first = store
        .publish(meta, weights, Some(first_adapter.clone()))
        .await
        .unwrap();
    let (meta, weights, second_adapter) = tuned("second", 5.0);
    let second = store
        .publish(meta, weights, Some(second_adapter.clone()))
        .await
        .unwrap();
    assert!(
        store.cached_adapter(&first).is_none(),
        "dropped for the second"
    );
    let read = store.adapter(&first).await.unwrap().expect("an adapter");
    assert_eq!(*read, first_adapter);
    assert!(
        store.cached_adapter(&second).is_none(),
        "dropped for the first"
    );
    assert_eq!(
        *store.adapter(&second).await.unwrap().unwrap(),
        second_adapter
    );
    let (meta, weights) = head("frozen");
    let frozen = store.publish(meta, weights, None).await.unwrap();
    assert!(store.adapter(&frozen).await.unwrap().is_none());
    let (meta, weights, _) = tuned("lost", 0.0);
    assert!(
        store.publish(meta, weights, None).await.is_err(),
        "a record without its adapter"
    );

    let reopened = open_with(dir.path(), 10, ResidentAdapters::count(4)).await;
    let head = reopened.get(&reference("first")).await.unwrap();
    assert_eq!(
        *reopened.cached_adapter(&head).expect("loaded"),
        first_adapter
    );
}

#[tokio::test]
async fn publish_reload_list_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 100).await;
    let (meta, weights) = head("sentiment");
    for expected in [1, 2] {
        let published = store.publish(meta.clone(), weights.clone(), None).await;
        assert_eq!(published.unwrap().meta.version, expected);
    }
    let topic = head("topic").0;
    store.publish(topic, weights.clone(), None).await.unwrap();

    let reopened = open(dir.path(), 100).await;
    let latest = reopened.get(&reference("sentiment")).await.unwrap();
    assert_eq!(latest.meta.version, 2);
    let first = reopened.get(&reference("sentiment@1")).await.unwrap();
    assert_eq!(first.weights, weights);
    assert_eq!(reopened.list(None, false).await.len(), 2);
    assert_eq!(reopened.list(None, true).await.len(), 3);
    assert_eq!(reopened.list(Some("other"), true).await.len(), 0);

    assert_eq!(
        reopened.delete(&reference("sentiment@2")).await.unwrap(),
        vec![2]
    );
    // Versions never go back, even after the latest was deleted.
    let third = reopened.publish(meta, weights.clone(), None).await.unwrap();
    assert_eq!(third.meta.version, 3);
    assert_eq!(
        reopened.delete(&reference("sentiment")).await.unwrap(),
        vec![1, 3]
    );
    assert!(matches!(
        reopened.get(&reference("sentiment")).await,
        Err(Error::HeadNotFound(_))
    ));
    let again = open(dir.path(), 100).await;
    assert!(again.get(&reference("sentiment")).await.is_err());
    // Nothing of the deleted versions is left but their markers.
    let storage = Storage::open(&Location::Volume(dir.path().to_owned())).unwrap();
    let left: Vec<String> = storage
        .list("heads/sentiment")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(
        left,
        [
            "heads/sentiment/1/deleted",
            "heads/sentiment/2/deleted",
            "heads/sentiment/3/deleted"
        ]
    );
}

#[tokio::test]
async fn leftovers_and_broken_versions_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 100).await;
    let (meta, weights) = head("good");
    store.publish(meta, weights, None).await.unwrap();
    // Weights of a publish that crashed long ago, of one that may still be
    // running on another replica, and a version with corrupt metadata.
    let blobs = dir.path().join("heads/good/blobs");
    fs::write(blobs.join("crashed.safetensors"), b"w").unwrap();
    fs::File::options()
        .write(true)
        .open(blobs.join("crashed.safetensors"))
        .and_then(|f| f.set_modified(SystemTime::now() - 2 * LEFTOVER_AGE))
        .unwrap();
    fs::write(blobs.join("in-flight.safetensors"), b"w").unwrap();
    fs::create_dir_all(dir.path().join("heads/good/7")).unwrap();
    fs::write(dir.path().join("heads/good/7/head.json"), b"{not json").unwrap();

    let reopened = open(dir.path(), 100).await;
    assert_eq!(reopened.list(None, true).await.len(), 1);
    assert!(!blobs.join("crashed.safetensors").exists());
    assert!(blobs.join("in-flight.safetensors").exists());
    assert_eq!(
        fs::read_dir(&blobs).unwrap().count(),
        2,
        "the live version's too"
    );
    // The broken version's number is not reused.
    let (meta, weights) = head("good");
    let next = reopened.publish(meta, weights, None).await.unwrap();
    assert_eq!(next.meta.version, 8);
}

#[tokio::test]
async fn replicas_sharing_a_store_see_each_others_changes() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path(), 100).await;
    let mut b = open(dir.path(), 100).await;
    b.refresh_interval = Duration::ZERO;
    let (meta, weights) = head("shared");

    a.publish(meta.clone(), weights.clone(), None)
        .await
        .unwrap();
    assert_eq!(latest(&b, "shared").await, 1);
    a.publish(meta.clone(), weights.clone(), None)
        .await
        .unwrap();
    assert_eq!(latest(&b, "shared").await, 2);
    assert_eq!(b.list(None, true).await.len(), 2);
    a.delete(&reference("shared@2")).await.unwrap();
    assert_eq!(latest(&b, "shared").await, 1);
    assert!(b.get(&reference("shared@2")).await.is_err());

    // Both publish at once: each gets its own version, with no gap.
    let (va, vb) = tokio::join!(
        a.publish(meta.clone(), weights.clone(), None),
        b.publish(meta.clone(), weights.clone(), None)
    );
    let mut versions = [va.unwrap().meta.version, vb.unwrap().meta.version];
    versions.sort();
    assert_eq!(versions, [3, 4]);
    assert_eq!(b.list(None, true).await.len(), 3);
}

#[tokio::test]
async fn the_head_limit_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1).await;
    let (meta, weights) = head("one");
    store
        .publish(meta.clone(), weights.clone(), None)
        .await
        .unwrap();
    assert!(matches!(
        store.publish(meta, weights, None).await,
        Err(Error::LimitExceeded(_))
    ));
}

#[tokio::test]
async fn a_version_at_the_top_of_the_range_does_not_wrap_the_counter() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 100).await;
    let top = dir.path().join("heads/full").join(u32::MAX.to_string());
    fs::create_dir_all(&top).unwrap();
    fs::write(top.join("deleted"), b"").unwrap();
    let (meta, weights) = head("full");
    let err = store.publish(meta, weights, None).await.unwrap_err();
    assert!(
        matches!(&err, Error::LimitExceeded(m) if m.contains("every version")),
        "{err}"
    );
    assert!(
        !err.to_string().contains(&*dir.path().to_string_lossy()),
        "{err}"
    );
    assert!(
        fs::read_dir(dir.path().join("heads/full/blobs"))
            .unwrap()
            .next()
            .is_none(),
        "the refused publish's weights are removed"
    );
}

#[tokio::test]
async fn lookups_of_unknown_names_keep_a_bounded_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 100).await;
    for i in 0..MAX_SCAN_RECORDS + 500 {
        let missing = reference(&format!("missing-{i}"));
        assert!(store.get(&missing).await.is_err());
    }
    assert!(lock(&store.scanned).len() <= MAX_SCAN_RECORDS);
    assert!(lock(&store.missed).len() <= MAX_SCAN_RECORDS);
}

/// Two stores on `dir`: `a` published versions 1 and 2 of `name`, `b` read
/// the store (its periodic re-read ran) between the two.
async fn one_version_behind(dir: &std::path::Path, name: &str) -> (HeadStore, HeadStore) {
    let a = open(dir, 100).await;
    let b = open(dir, 100).await;
    let (meta, weights) = head(name);
    a.publish(meta.clone(), weights.clone(), None)
        .await
        .unwrap();
    b.refresh_all().await.unwrap();
    a.publish(meta, weights, None).await.unwrap();
    (a, b)
}

/// A version another replica publishes is read at once on a miss, however
/// recently the periodic re-read ran; a second miss on the name within the
/// refresh interval waits for the next one.
#[tokio::test]
async fn a_miss_reads_the_store_at_once_whatever_the_periodic_reads() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = one_version_behind(dir.path(), "fresh").await;
    let found = b.get(&reference("fresh@2")).await.unwrap();
    assert_eq!(found.meta.version, 2);
    let (meta, weights) = head("fresh");
    a.publish(meta, weights, None).await.unwrap();
    assert!(
        b.get(&reference("fresh@3")).await.is_err(),
        "one read per name and interval"
    );
}

#[tokio::test]
async fn the_in_memory_view_changes_only_by_refresh_or_own_writes() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path(), 100).await;
    let b = open(dir.path(), 100).await;
    let (meta, weights) = head("seen");
    a.publish(meta, weights, None).await.unwrap();
    assert_eq!(a.cached(&reference("seen")).unwrap().meta.version, 1);
    // b has not looked at the store since it opened.
    assert!(b.cached(&reference("seen")).is_none());
    b.refresh_all().await.unwrap();
    assert_eq!(b.cached(&reference("seen")).unwrap().meta.version, 1);
}

/// Heads of the layout before namespaces are moved at start and served.
#[tokio::test]
async fn heads_of_the_earlier_layout_are_carried_over() {
    let dir = tempfile::tempdir().unwrap();
    let (mut meta, weights) = head("old");
    meta.version = 2;
    let folder = dir.path().join("old/2");
    fs::create_dir_all(&folder).unwrap();
    fs::write(folder.join("head.json"), serde_json::to_vec(&meta).unwrap()).unwrap();
    let blob = layout::encode_weights(&weights, None).unwrap();
    fs::write(folder.join("weights.safetensors"), &blob).unwrap();
    fs::write(dir.path().join("old/LATEST"), b"4").unwrap();

    assert_eq!(migrate_volume(dir.path()).unwrap(), 1);
    let store = open(dir.path(), 100).await;
    let found = store.get(&reference("old")).await.unwrap();
    assert_eq!((found.meta.version, &found.weights), (2, &weights));
    let (meta, weights) = head("old");
    let next = store.publish(meta, weights, None).await.unwrap();
    assert_eq!(next.meta.version, 5, "above the remembered 4");
}

/// Makes the object at `path` look written `age` ago.
fn age(path: &std::path::Path, age: Duration) {
    fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(SystemTime::now() - age))
        .unwrap();
}

/// A store written by a newer server during a rolling upgrade: version 1
/// loads here but its manifest names a second blob under a field this
/// server does not know; version 2 has a head kind it cannot load at all.
/// The sweep keeps every blob some manifest names, loadable or not, and
/// still removes a crashed publish's weights; deleting every version then
/// removes the unloadable one too.
#[tokio::test]
async fn weights_named_by_manifests_this_replica_cannot_load_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (meta, weights) = head("future");
    open(dir.path(), 100)
        .await
        .publish(meta, weights, None)
        .await
        .unwrap();
    let root = dir.path().join("heads/future");
    let blobs = root.join("blobs");
    let blob_of = |id: &str| blobs.join(format!("{id}.safetensors"));
    let key_of = |id: &str| format!("heads/future/blobs/{id}.safetensors");
    let manifest = |version: u32| root.join(format!("{version}/head.json"));
    let mut first: serde_json::Value =
        serde_json::from_slice(&fs::read(manifest(1)).unwrap()).unwrap();
    first["router_weights"] = key_of("1-router").into();
    fs::write(manifest(1), serde_json::to_vec(&first).unwrap()).unwrap();
    let mut second = first.clone();
    second["version"] = 2.into();
    second["kind"] = serde_json::json!({"type": "mixture", "experts": 4});
    second["weights"] = key_of("2-experts").into();
    second.as_object_mut().unwrap().remove("router_weights");
    fs::create_dir_all(root.join("2")).unwrap();
    fs::write(manifest(2), serde_json::to_vec(&second).unwrap()).unwrap();
    for id in ["1-router", "2-experts", "crashed"] {
        fs::write(blob_of(id), b"w").unwrap();
    }
    for entry in fs::read_dir(&blobs).unwrap() {
        age(&entry.unwrap().path(), 2 * LEFTOVER_AGE);
    }

    let replica = open(dir.path(), 100).await;
    let loaded: Vec<u32> = replica
        .list(None, true)
        .await
        .iter()
        .map(|h| h.meta.version)
        .collect();
    assert_eq!(loaded, [1], "version 2 cannot be loaded here");
    assert!(
        !blob_of("crashed").exists(),
        "a crashed publish's weights go"
    );
    assert!(blob_of("1-router").exists(), "named by a loaded manifest");
    assert!(blob_of("2-experts").exists(), "named by an unloadable one");
    assert_eq!(fs::read_dir(&blobs).unwrap().count(), 3);

    assert_eq!(
        replica.delete(&reference("future")).await.unwrap(),
        [1, 2],
        "every version in the store"
    );
    assert!(!blob_of("2-experts").exists() && !manifest(2).exists());
    // What only the deleted versions named goes with the next sweep.
    *lock(&replica.swept) = None;
    replica.refresh_all().await.unwrap();
    assert_eq!(fs::read_dir(&blobs).unwrap().count(), 0);
}

/// A replica deleting every version of a name reads them from the store:
/// a version another replica published a moment ago, which its in-memory
/// view has not seen, goes too.
#[tokio::test]
async fn deleting_every_version_reads_the_store_not_the_view() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = one_version_behind(dir.path(), "fresh").await;
    assert_eq!(
        b.cached(&reference("fresh")).unwrap().meta.version,
        1,
        "b's view lags"
    );

    assert_eq!(b.delete(&reference("fresh")).await.unwrap(), [1, 2]);
    let mut a = a;
    a.refresh_interval = Duration::ZERO;
    assert!(matches!(
        a.get(&reference("fresh")).await,
        Err(Error::HeadNotFound(_))
    ));
    assert!(b.delete(&reference("fresh")).await.is_err(), "nothing left");
}

/// A namespace holds its share of the head versions and no more; other
/// namespaces still publish until the store's own bound.
#[tokio::test]
async fn a_namespace_holds_its_share_of_the_head_versions() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 3).await.with_namespace_share(2);
    let (meta, weights) = head("team-a.one");
    for _ in 0..2 {
        store
            .publish(meta.clone(), weights.clone(), None)
            .await
            .unwrap();
    }
    let (other, _) = head("team-a.two");
    let refused = store
        .publish(other, weights.clone(), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, Error::LimitExceeded(m)
            if m.contains("max_heads_per_namespace") && m.contains("`team-a`")),
        "{refused}"
    );
    let (meta, _) = head("team-b.one");
    store.publish(meta, weights.clone(), None).await.unwrap();
    let (meta, _) = head("plain");
    let full = store.publish(meta, weights, None).await.unwrap_err();
    assert!(
        matches!(&full, Error::LimitExceeded(m) if m.contains("heads.max_heads)")),
        "{full}"
    );
}
