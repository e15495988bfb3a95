//! Training sets in the shared store: uploaded ones waiting for their job, and
//! the examples of every job, so that any replica can start a job on an
//! upload received by another, and run a job again after its replica is gone.
//!
//! ```text
//! datasets/<id>/examples.json   the examples (codec.rs)
//! datasets/<id>/namespace.<ns>  the namespace whose quota the upload counts
//!                               against; none for the namespace of tokens
//!                               without namespaces
//! datasets/<id>/meta.json       counts and expiry; written last: the dataset
//!                               exists once it does
//! datasets/<id>/taken           created by the one job that uses it
//! ```
//!
//! Memory is bounded while an upload arrives, not when it completes: an
//! upload in progress holds a slot among `max_datasets`, and among its
//! namespace's share of them, and reserves its bytes against a per-upload
//! and a total budget chunk by chunk. The namespace is in a key, not in the
//! meta, so that counting a namespace's datasets takes one listing. A finished
//! upload is written to the store and leaves memory; it keeps a slot until a
//! job takes it or it expires. A job's dataset is removed when the job ends.
//!
//! Ages are measured on the store's clock: from when the store says the meta
//! was written to the store's time now ([`Storage::now`]), so that a replica
//! whose wall clock runs ahead never takes another's fresh upload for an
//! expired one.

mod codec;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{
    backbone::Input,
    head::namespace::{at_share, describe},
    storage::{Entry, Storage, LEFTOVER_AGE},
    sync::lock,
    task::run_blocking,
    Error, Result,
};

/// One labelled example.
#[derive(Debug, Clone)]
pub struct Example {
    pub input: Input,
    pub label: String,
}

/// Bounds on what uploads may hold.
#[derive(Debug, Clone, Copy)]
pub struct DatasetLimits {
    /// How long a finished upload waits for its job.
    pub ttl: Duration,
    /// Uploads in progress on this replica and datasets waiting in the store,
    /// together.
    pub max_datasets: usize,
    /// Of those, the most one namespace may hold.
    pub max_per_namespace: usize,
    /// Bytes of one upload.
    pub max_upload_bytes: usize,
    /// Bytes of all uploads in progress on this replica.
    pub max_total_bytes: usize,
}

/// What a dataset's inputs are, kept in its meta so that a backbone that
/// cannot take them is refused before the examples are read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputKinds {
    /// Texts and token ids.
    Text,
    /// Encoded images and tensors, all tensors of one shape.
    Images { tensor_shape: Option<Vec<usize>> },
}

impl InputKinds {
    /// The kinds of one input.
    pub fn of(input: &Input) -> Self {
        match input {
            Input::Text(_) | Input::TokenIds(_) => InputKinds::Text,
            Input::Image(_) => InputKinds::Images { tensor_shape: None },
            Input::Tensor { shape, .. } => InputKinds::Images {
                tensor_shape: Some(shape.clone()),
            },
        }
    }

    /// Both together, or why no backbone takes both.
    pub fn and(self, other: &Self) -> std::result::Result<Self, String> {
        use InputKinds::*;
        match (self, other) {
            (Text, Text) => Ok(Text),
            (Images { tensor_shape: a }, Images { tensor_shape: b }) => match (a, b) {
                (Some(a), Some(b)) if a != *b => Err(format!(
                    "tensors of shapes {a:?} and {b:?}: a backbone takes one shape"
                )),
                (a, b) => Ok(Images {
                    tensor_shape: a.or_else(|| b.clone()),
                }),
            },
            _ => Err("texts and images together: a backbone takes one or the other".into()),
        }
    }

    /// The kinds of `examples`' inputs; None for no examples.
    pub fn of_examples(examples: &[Example]) -> std::result::Result<Option<Self>, String> {
        examples
            .iter()
            .try_fold(None, |kinds: Option<Self>, example| {
                let this = Self::of(&example.input);
                match kinds {
                    None => Ok(Some(this)),
                    Some(kinds) => kinds.and(&this).map(Some),
                }
            })
    }
}

/// A finished upload, as its client learns of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dataset {
    pub id: String,
    pub example_count: u64,
    pub label_counts: BTreeMap<String, u64>,
    /// Milliseconds since the Unix epoch after which an unused dataset is
    /// removed.
    pub expires_at_ms: u64,
    /// None in datasets stored before it was recorded.
    #[serde(default)]
    pub inputs: Option<InputKinds>,
}

impl Dataset {
    pub fn expires_at(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(self.expires_at_ms)
    }
}

const PREFIX: &str = "datasets";

fn key(id: &str, file: &str) -> String {
    format!("{PREFIX}/{id}/{file}")
}

/// The file that names a dataset's namespace.
const NAMESPACE: &str = "namespace.";

/// How long a taken dataset is kept at most: its job removes it when it
/// ends; this only bounds what a job that never ended leaves behind.
const TAKEN_KEPT: Duration = Duration::from_secs(7 * 24 * 3600);

struct Shared {
    limits: DatasetLimits,
    /// Uploads begun and not yet finished or dropped.
    uploads: AtomicUsize,
    /// Those by namespace; none at zero.
    uploads_by_namespace: Mutex<HashMap<String, usize>>,
    /// Bytes reserved by uploads in progress.
    bytes: AtomicUsize,
}

pub struct DatasetStore {
    shared: Arc<Shared>,
    storage: Storage,
}

/// An upload in progress: a slot among the datasets and its bytes so far.
/// Dropping it (the client went away, a limit was hit, it was stored) frees
/// both.
pub struct PendingUpload {
    shared: Arc<Shared>,
    bytes: usize,
    /// Whose share the upload counts against ("": tokens without namespaces).
    namespace: String,
}

impl Drop for PendingUpload {
    fn drop(&mut self) {
        self.shared.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
        self.shared.uploads.fetch_sub(1, Ordering::AcqRel);
        let mut by_namespace = lock(&self.shared.uploads_by_namespace);
        if let Some(count) = by_namespace.get_mut(&self.namespace) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                by_namespace.remove(&self.namespace);
            }
        }
    }
}

impl PendingUpload {
    /// Reserves `bytes` more for this upload, or refuses them.
    pub fn reserve(&mut self, bytes: usize) -> Result<()> {
        let shared = &self.shared;
        let limits = shared.limits;
        let wanted = self.bytes.saturating_add(bytes);
        if wanted > limits.max_upload_bytes {
            return Err(Error::LimitExceeded(format!(
                "the upload passed {} bytes, the most one upload may hold \
                 (heads.max_upload_bytes); split the data set",
                limits.max_upload_bytes
            )));
        }
        let before = shared.bytes.fetch_add(bytes, Ordering::AcqRel);
        if before.saturating_add(bytes) > limits.max_total_bytes {
            shared.bytes.fetch_sub(bytes, Ordering::AcqRel);
            return Err(Error::LimitExceeded(format!(
                "uploads in progress hold {before} bytes, near the most they may hold \
                 together ({}, heads.max_dataset_bytes); retry later",
                limits.max_total_bytes
            )));
        }
        self.bytes = wanted;
        Ok(())
    }
}

/// The state of one dataset in a listing.
#[derive(Default)]
struct Listed {
    meta: Option<Entry>,
    examples: Option<Entry>,
    taken: Option<Entry>,
    /// The namespace file and the namespace it names.
    namespace: Option<(Entry, String)>,
}

impl DatasetStore {
    pub fn new(limits: DatasetLimits, storage: Storage) -> Self {
        Self {
            shared: Arc::new(Shared {
                limits,
                uploads: AtomicUsize::new(0),
                uploads_by_namespace: Mutex::new(HashMap::new()),
                bytes: AtomicUsize::new(0),
            }),
            storage,
        }
    }

    /// Every dataset in the store, by id.
    async fn listing(&self) -> Result<HashMap<String, Listed>> {
        let mut datasets: HashMap<String, Listed> = HashMap::new();
        for entry in self.storage.list(PREFIX).await? {
            let mut parts = entry.key.splitn(3, '/').skip(1);
            let (Some(id), Some(file)) = (parts.next(), parts.next()) else {
                continue;
            };
            let listed = datasets.entry(id.to_owned()).or_default();
            match file {
                "meta.json" => listed.meta = Some(entry),
                "examples.json" => listed.examples = Some(entry),
                "taken" => listed.taken = Some(entry),
                _ => {
                    if let Some(namespace) = file.strip_prefix(NAMESPACE) {
                        listed.namespace = Some((entry.clone(), namespace.to_owned()));
                    }
                }
            }
        }
        Ok(datasets)
    }

    /// Whether an untaken dataset written at `written` is past its time.
    fn expired(&self, written: SystemTime, now: SystemTime) -> bool {
        now.duration_since(written)
            .is_ok_and(|age| age >= self.shared.limits.ttl)
    }

    /// Starts an upload counted against `namespace` ("" for tokens without
    /// namespaces), if a slot is free in the store and in its share.
    pub async fn begin_upload(&self, namespace: &str) -> Result<PendingUpload> {
        let now = self.storage.now().await?;
        let listing = self.listing().await?;
        let waiting: Vec<&Listed> = listing
            .values()
            .filter(|d| d.taken.is_none())
            .filter(|d| {
                d.meta
                    .as_ref()
                    .is_some_and(|m| !self.expired(m.modified, now))
            })
            .collect();
        let waiting_here = waiting
            .iter()
            .filter(|d| d.namespace.as_ref().map_or("", |(_, n)| n.as_str()) == namespace)
            .count();
        // Counted before the checks, so two uploads racing for the last slot
        // cannot both win.
        let uploads = self.shared.uploads.fetch_add(1, Ordering::AcqRel);
        let uploads_here = {
            let mut by_namespace = lock(&self.shared.uploads_by_namespace);
            let count = by_namespace.entry(namespace.to_owned()).or_default();
            *count += 1;
            *count - 1
        };
        let pending = PendingUpload {
            shared: Arc::clone(&self.shared),
            bytes: 0,
            namespace: namespace.to_owned(),
        };
        let limits = self.shared.limits;
        if waiting.len() + uploads >= limits.max_datasets {
            return Err(Error::LimitExceeded(format!(
                "{} uploaded datasets are waiting to be used and {uploads} uploads are in \
                 progress here (heads.max_datasets is {}); use or let them expire first",
                waiting.len(),
                limits.max_datasets
            )));
        }
        if at_share(
            namespace,
            waiting_here + uploads_here,
            limits.max_per_namespace,
        ) {
            return Err(Error::LimitExceeded(format!(
                "{} has {waiting_here} uploaded datasets waiting to be used and {uploads_here} \
                 uploads in progress here, its share (heads.max_datasets_per_namespace is {}); \
                 use or let them expire first",
                describe(namespace),
                limits.max_per_namespace
            )));
        }
        Ok(pending)
    }

    /// Writes a complete upload to the store and returns it; the upload's
    /// slot and bytes go once it is there.
    pub async fn finish(&self, upload: PendingUpload, examples: Vec<Example>) -> Result<Dataset> {
        let ttl = self.shared.limits.ttl;
        let expires_at = self.storage.now().await? + ttl;
        let dataset = self.write(examples, expires_at, &upload.namespace).await?;
        drop(upload);
        Ok(dataset)
    }

    /// Writes `examples` as a new dataset of `namespace`: the examples, the
    /// namespace, then its meta.
    async fn write(
        &self,
        examples: Vec<Example>,
        expires_at: SystemTime,
        namespace: &str,
    ) -> Result<Dataset> {
        let mut label_counts = BTreeMap::new();
        for example in &examples {
            *label_counts.entry(example.label.clone()).or_default() += 1;
        }
        let dataset = Dataset {
            id: uuid::Uuid::new_v4().to_string(),
            example_count: examples.len() as u64,
            label_counts,
            inputs: InputKinds::of_examples(&examples).ok().flatten(),
            expires_at_ms: expires_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        let encoded =
            run_blocking("encoding a dataset", move || codec::encode(&examples)).await??;
        self.storage
            .put(&key(&dataset.id, "examples.json"), encoded)
            .await?;
        if !namespace.is_empty() {
            let file = format!("{NAMESPACE}{namespace}");
            self.storage
                .put(&key(&dataset.id, &file), Bytes::new())
                .await?;
        }
        let meta = serde_json::to_vec(&dataset)
            .map_err(|err| Error::Storage(format!("cannot encode a dataset's meta: {err}")))?;
        self.storage
            .put(&key(&dataset.id, "meta.json"), Bytes::from(meta))
            .await?;
        Ok(dataset)
    }

    /// Stores a job's inline examples as a dataset that job has taken, so that
    /// the job can be run again from the store.
    pub async fn keep_for_job(&self, examples: &[Example]) -> Result<String> {
        let dataset = self
            .write(examples.to_vec(), crate::clock::now() + TAKEN_KEPT, "")
            .await?;
        self.storage
            .put(&key(&dataset.id, "taken"), Bytes::new())
            .await?;
        Ok(dataset.id)
    }

    /// A dataset's meta, while it waits for a job (NOT_FOUND otherwise, and
    /// for an unknown id).
    pub async fn waiting(&self, id: &str) -> Result<Dataset> {
        let not_found = || Error::NotFound {
            kind: "dataset",
            id: id.to_owned(),
        };
        // Ids come from clients: only what the store could have handed out.
        if !crate::config::is_valid_name(id) {
            return Err(not_found());
        }
        let written = self
            .storage
            .modified(&key(id, "meta.json"))
            .await?
            .ok_or_else(not_found)?;
        if self.expired(written, self.storage.now().await?) {
            return Err(not_found());
        }
        let meta = self
            .storage
            .get(&key(id, "meta.json"))
            .await?
            .ok_or_else(not_found)?;
        serde_json::from_slice(&meta)
            .map_err(|err| Error::Storage(format!("dataset {id}'s meta is invalid: {err}")))
    }

    /// Takes a dataset for one job: of concurrent takers, on any replicas,
    /// one gets its examples; the others NOT_FOUND, as for an unknown id.
    pub async fn take(&self, id: &str) -> Result<Vec<Example>> {
        let not_found = || Error::NotFound {
            kind: "dataset",
            id: id.to_owned(),
        };
        self.waiting(id).await?;
        if !self.storage.create(&key(id, "taken"), Bytes::new()).await? {
            return Err(not_found());
        }
        self.examples(id).await
    }

    /// A dataset's examples, taken or not.
    pub async fn examples(&self, id: &str) -> Result<Vec<Example>> {
        let bytes = self
            .storage
            .get(&key(id, "examples.json"))
            .await?
            .ok_or_else(|| Error::Storage(format!("dataset {id} lost its examples")))?;
        run_blocking("decoding a dataset", move || codec::decode(&bytes)).await?
    }

    /// Gives back a dataset that [`DatasetStore::take`] returned, for a job
    /// that was refused: the client may retry with the same id until it
    /// expires.
    pub async fn restore(&self, id: &str) {
        if let Err(err) = self.storage.delete(&key(id, "taken")).await {
            tracing::warn!(dataset = %id, error = %err, "cannot give a dataset back");
        }
    }

    /// Removes a dataset (its job ended): its meta first, so that it stops
    /// existing at once, then whatever else it has.
    pub async fn remove(&self, id: &str) {
        if let Err(err) = self.remove_files(id).await {
            tracing::warn!(dataset = %id, error = %err, "cannot remove a dataset");
        }
    }

    async fn remove_files(&self, id: &str) -> Result<()> {
        self.storage.delete(&key(id, "meta.json")).await?;
        for entry in self.storage.list(&format!("{PREFIX}/{id}")).await? {
            self.storage.delete(&entry.key).await?;
        }
        Ok(())
    }

    /// Removes expired datasets, taken ones kept past [`TAKEN_KEPT`], and
    /// examples of uploads cut short; returns how many.
    pub async fn sweep(&self) -> Result<usize> {
        let now = self.storage.now().await?;
        let old = |entry: &Entry, age: Duration| {
            now.duration_since(entry.modified)
                .is_ok_and(|elapsed| elapsed >= age)
        };
        let mut removed = 0;
        for (id, listed) in self.listing().await? {
            let gone = match (&listed.meta, &listed.taken) {
                (_, Some(taken)) => old(taken, TAKEN_KEPT),
                (Some(meta), None) => self.expired(meta.modified, now),
                (None, None) => listed
                    .examples
                    .iter()
                    .chain(listed.namespace.as_ref().map(|(entry, _)| entry))
                    .any(|e| old(e, LEFTOVER_AGE)),
            };
            if gone {
                self.remove(&id).await;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Sweeps the store every minute for as long as the store lives.
    pub fn spawn_sweeper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_secs(60));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(store) = weak.upgrade() else { return };
                match store.sweep().await {
                    Ok(0) => {}
                    Ok(removed) => tracing::info!(removed, "expired datasets removed"),
                    Err(err) => tracing::warn!(error = %err, "cannot sweep the datasets"),
                }
            }
        })
    }

    /// Bytes held by uploads in progress.
    pub fn bytes_held(&self) -> usize {
        self.shared.bytes.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Location;

    fn example(label: &str) -> Example {
        Example {
            input: Input::Text("x".into()),
            label: label.into(),
        }
    }

    fn store(dir: &std::path::Path, ttl: Duration, max_datasets: usize) -> DatasetStore {
        let limits = DatasetLimits {
            ttl,
            max_datasets,
            max_per_namespace: max_datasets,
            max_upload_bytes: 100,
            max_total_bytes: 150,
        };
        let storage = Storage::open(&Location::Volume(dir.to_owned())).unwrap();
        DatasetStore::new(limits, storage)
    }

    async fn insert(store: &DatasetStore, examples: Vec<Example>) -> Result<Dataset> {
        let upload = store.begin_upload("").await?;
        store.finish(upload, examples).await
    }

    /// An upload on one replica is taken by exactly one job on another;
    /// given back, it can be taken again; expired, it is gone.
    #[tokio::test]
    async fn datasets_are_shared_counted_taken_once_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let a = store(dir.path(), Duration::from_secs(60), 2);
        let b = store(dir.path(), Duration::from_secs(60), 2);
        let d = insert(&a, vec![example("a"), example("b"), example("a")])
            .await
            .unwrap();
        assert_eq!((d.example_count, d.label_counts["a"]), (3, 2));
        let (first, second) = tokio::join!(a.take(&d.id), b.take(&d.id));
        assert!(first.is_ok() != second.is_ok(), "one taker wins");
        assert_eq!(first.or(second).unwrap().len(), 3);
        b.restore(&d.id).await;
        assert_eq!(b.take(&d.id).await.unwrap()[1].label, "b");
        assert!(matches!(
            a.take("../etc").await,
            Err(Error::NotFound { .. })
        ));

        // The taken one holds no slot; two waiting fill both.
        insert(&a, vec![example("a")]).await.unwrap();
        insert(&b, vec![example("a")]).await.unwrap();
        assert!(matches!(
            insert(&a, vec![example("a")]).await,
            Err(Error::LimitExceeded(_))
        ));

        let short_dir = tempfile::tempdir().unwrap();
        let short = store(short_dir.path(), Duration::ZERO, 2);
        let d = insert(&short, vec![example("a")]).await.unwrap();
        assert!(short.take(&d.id).await.is_err());
        assert_eq!(short.sweep().await.unwrap(), 1);
        assert!(short.storage.list(PREFIX).await.unwrap().is_empty());
    }

    #[test]
    fn input_kinds_take_one_modality_and_one_tensor_shape() {
        let tensor = |shape: Vec<usize>| Example {
            input: Input::Tensor {
                values: vec![0.0; shape.iter().product()],
                shape,
            },
            label: "a".into(),
        };
        let image = Example {
            input: Input::Image(vec![1]),
            label: "a".into(),
        };
        let ids = Example {
            input: Input::TokenIds(vec![1]),
            label: "a".into(),
        };
        assert_eq!(
            InputKinds::of_examples(&[example("a"), ids.clone()]),
            Ok(Some(InputKinds::Text))
        );
        assert_eq!(
            InputKinds::of_examples(&[image.clone(), tensor(vec![3, 2, 2])]),
            Ok(Some(InputKinds::Images {
                tensor_shape: Some(vec![3, 2, 2])
            }))
        );
        assert!(InputKinds::of_examples(&[example("a"), image]).is_err());
        assert!(InputKinds::of_examples(&[tensor(vec![3, 2, 2]), tensor(vec![3, 4, 4])]).is_err());
        assert_eq!(InputKinds::of_examples(&[]), Ok(None));
    }

    /// A namespace fills its share and no more, its stored uploads counted
    /// on every replica and those in progress where they arrive; the
    /// others (and tokens without namespaces) still upload. A dataset's
    /// removal takes its namespace file with it.
    #[tokio::test]
    async fn a_namespace_holds_its_share_of_the_datasets() {
        let dir = tempfile::tempdir().unwrap();
        let with_share = || {
            let mut store = store(dir.path(), Duration::from_secs(60), 4);
            Arc::get_mut(&mut store.shared)
                .unwrap()
                .limits
                .max_per_namespace = 2;
            store
        };
        let (a, b) = (with_share(), with_share());
        let first = upload_as(&a, "team-a").await.unwrap();
        // b sees a's stored upload, and its own in progress.
        let in_progress = b.begin_upload("team-a").await.unwrap();
        let refused = b.begin_upload("team-a").await.err().unwrap();
        assert!(
            matches!(&refused, Error::LimitExceeded(m)
                if m.contains("max_datasets_per_namespace") && m.contains("team-a")),
            "{refused}"
        );
        drop(in_progress);
        upload_as(&b, "team-a").await.unwrap();
        assert!(
            upload_as(&b, "team-a").await.is_err(),
            "the stored one counts"
        );
        upload_as(&a, "team-b").await.unwrap();
        upload_as(&b, "").await.unwrap();
        // The store is full now, for every namespace.
        assert!(matches!(
            upload_as(&a, "team-c").await,
            Err(Error::LimitExceeded(m)) if m.contains("heads.max_datasets ")
        ));
        a.take(&first.id).await.unwrap();
        a.remove(&first.id).await;
        let left = a.storage.list(&format!("{PREFIX}/{}", first.id)).await;
        assert!(left.unwrap().is_empty());
        upload_as(&a, "team-a").await.unwrap();
    }

    async fn upload_as(store: &DatasetStore, namespace: &str) -> Result<Dataset> {
        let upload = store.begin_upload(namespace).await?;
        store.finish(upload, vec![example("a")]).await
    }

    #[tokio::test]
    async fn a_jobs_examples_are_kept_taken_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), Duration::ZERO, 2);
        let id = store
            .keep_for_job(&[example("a"), example("b")])
            .await
            .unwrap();
        assert!(store.take(&id).await.is_err(), "already its job's");
        assert_eq!(
            store.sweep().await.unwrap(),
            0,
            "kept while its job may need it"
        );
        assert_eq!(store.examples(&id).await.unwrap().len(), 2);
        store.remove(&id).await;
        assert!(store.storage.list(PREFIX).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn uploads_in_progress_hold_slots_and_bytes_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), Duration::from_secs(60), 2);
        let mut first = store.begin_upload("").await.unwrap();
        let mut second = store.begin_upload("").await.unwrap();
        // Two uploads in progress fill both slots, finished or not.
        assert!(matches!(
            store.begin_upload("").await,
            Err(Error::LimitExceeded(_))
        ));
        first.reserve(60).unwrap();
        assert!(
            matches!(first.reserve(41), Err(Error::LimitExceeded(m)) if m.contains("max_upload_bytes"))
        );
        second.reserve(60).unwrap();
        // 120 of 150 held: the total budget refuses what one upload would allow.
        assert!(
            matches!(second.reserve(40), Err(Error::LimitExceeded(m)) if m.contains("max_dataset_bytes"))
        );
        assert_eq!(store.bytes_held(), 120);
        drop(first);
        assert_eq!(store.bytes_held(), 60);
        let dataset = store.finish(second, vec![example("a")]).await.unwrap();
        // Stored: its bytes leave memory, it keeps a slot.
        assert_eq!(store.bytes_held(), 0);
        let _third = store.begin_upload("").await.unwrap();
        assert!(store.begin_upload("").await.is_err());
        store.take(&dataset.id).await.unwrap();
        let _fourth = store.begin_upload("").await.unwrap();
    }
}
