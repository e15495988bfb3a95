//! Uploaded training sets, kept in memory until a job uses them or they expire,
//! so large sets reach TrainHead in chunks instead of one giant message.
//!
//! Memory is bounded while the stream arrives, not when it completes: an
//! upload in progress holds a slot among `max_datasets` and reserves its
//! bytes against a per-upload and a total budget chunk by chunk; a finished
//! dataset keeps its slot and bytes until a job takes it and lets it go, or it
//! expires.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant, SystemTime},
};

use crate::{jobs::Example, Error, Result};

/// Bounds on what uploads may hold.
#[derive(Debug, Clone, Copy)]
pub struct DatasetLimits {
    /// How long a finished upload waits for its job.
    pub ttl: Duration,
    /// Uploads in progress and datasets waiting, together.
    pub max_datasets: usize,
    /// Bytes of one upload.
    pub max_upload_bytes: usize,
    /// Bytes of all uploads in progress and datasets waiting.
    pub max_total_bytes: usize,
}

pub struct Dataset {
    pub id: String,
    pub examples: Vec<Example>,
    pub label_counts: BTreeMap<String, u64>,
    pub expires_at: SystemTime,
    expires: Instant,
    /// Its bytes, given back to the budget when the last holder drops it.
    _bytes: Reservation,
}

struct Shared {
    limits: DatasetLimits,
    datasets: Mutex<HashMap<String, Arc<Dataset>>>,
    /// Uploads begun and not yet finished or dropped.
    uploads: AtomicUsize,
    /// Bytes reserved by uploads and datasets.
    bytes: AtomicUsize,
}

pub struct DatasetStore {
    shared: Arc<Shared>,
}

/// Bytes taken from the total budget; given back on drop.
struct Reservation {
    shared: Arc<Shared>,
    bytes: usize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.shared.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// An upload in progress: a slot among the datasets and its bytes so far.
/// Dropping it (the client went away, a limit was hit) frees both.
pub struct PendingUpload {
    reservation: Reservation,
}

impl Drop for PendingUpload {
    fn drop(&mut self) {
        self.reservation
            .shared
            .uploads
            .fetch_sub(1, Ordering::AcqRel);
    }
}

impl PendingUpload {
    /// Reserves `bytes` more for this upload, or refuses them.
    pub fn reserve(&mut self, bytes: usize) -> Result<()> {
        let shared = &self.reservation.shared;
        let limits = shared.limits;
        let wanted = self.reservation.bytes.saturating_add(bytes);
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
                "uploads and waiting datasets hold {before} bytes, near the most they \
                 may hold together ({}, heads.max_dataset_bytes); retry later",
                limits.max_total_bytes
            )));
        }
        self.reservation.bytes = wanted;
        Ok(())
    }
}

impl DatasetStore {
    pub fn new(limits: DatasetLimits) -> Self {
        Self {
            shared: Arc::new(Shared {
                limits,
                datasets: Mutex::new(HashMap::new()),
                uploads: AtomicUsize::new(0),
                bytes: AtomicUsize::new(0),
            }),
        }
    }

    /// The map with expired datasets dropped.
    fn live(&self) -> MutexGuard<'_, HashMap<String, Arc<Dataset>>> {
        let mut datasets = crate::sync::lock(&self.shared.datasets);
        let now = Instant::now();
        datasets.retain(|_, d| d.expires > now);
        datasets
    }

    /// Starts an upload, if a slot is free.
    pub fn begin_upload(&self) -> Result<PendingUpload> {
        let datasets = self.live();
        let max = self.shared.limits.max_datasets;
        let uploads = self.shared.uploads.fetch_add(1, Ordering::AcqRel);
        // Counted before the check, so two uploads racing for the last slot
        // cannot both win.
        let pending = PendingUpload {
            reservation: Reservation {
                shared: Arc::clone(&self.shared),
                bytes: 0,
            },
        };
        if datasets.len() + uploads >= max {
            return Err(Error::LimitExceeded(format!(
                "{} uploaded datasets are waiting to be used and {uploads} uploads are in \
                 progress (heads.max_datasets is {max}); use or let them expire first",
                datasets.len()
            )));
        }
        Ok(pending)
    }

    /// Keeps a complete upload and returns it; it keeps the upload's slot and
    /// bytes.
    pub fn finish(&self, upload: PendingUpload, examples: Vec<Example>) -> Arc<Dataset> {
        let mut label_counts = BTreeMap::new();
        for example in &examples {
            *label_counts.entry(example.label.clone()).or_default() += 1;
        }
        let ttl = self.shared.limits.ttl;
        // The dataset takes over the upload's bytes.
        let bytes = upload.reservation.bytes;
        let upload = upload.without_bytes();
        let dataset = Arc::new(Dataset {
            id: uuid::Uuid::new_v4().to_string(),
            examples,
            label_counts,
            expires_at: SystemTime::now() + ttl,
            expires: Instant::now() + ttl,
            _bytes: Reservation {
                shared: Arc::clone(&self.shared),
                bytes,
            },
        });
        self.live().insert(dataset.id.clone(), Arc::clone(&dataset));
        // Only now, with the dataset in the map, does the upload's slot go.
        drop(upload);
        dataset
    }

    /// Puts back a dataset that [`DatasetStore::take`] returned, for a job that
    /// was refused: the client may retry with the same id. It keeps its slot
    /// and expiry time.
    pub fn restore(&self, dataset: Arc<Dataset>) {
        self.live().insert(dataset.id.clone(), dataset);
    }

    /// Removes and returns a dataset: each upload trains one job.
    pub fn take(&self, id: &str) -> Result<Arc<Dataset>> {
        self.live().remove(id).ok_or_else(|| Error::NotFound {
            kind: "dataset",
            id: id.to_owned(),
        })
    }

    /// Bytes held by uploads in progress and waiting datasets.
    pub fn bytes_held(&self) -> usize {
        self.shared.bytes.load(Ordering::Acquire)
    }
}

impl PendingUpload {
    /// The upload with its bytes handed on: dropping it frees only its slot.
    fn without_bytes(mut self) -> Self {
        self.reservation.bytes = 0;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::Input;

    fn example(label: &str) -> Example {
        Example {
            input: Input::Text("x".into()),
            label: label.into(),
        }
    }

    fn limits(ttl: Duration, max_datasets: usize) -> DatasetLimits {
        DatasetLimits {
            ttl,
            max_datasets,
            max_upload_bytes: 100,
            max_total_bytes: 150,
        }
    }

    fn insert(store: &DatasetStore, examples: Vec<Example>) -> Result<Arc<Dataset>> {
        let upload = store.begin_upload()?;
        Ok(store.finish(upload, examples))
    }

    #[test]
    fn datasets_are_counted_taken_once_and_expire() {
        let store = DatasetStore::new(limits(Duration::from_secs(60), 2));
        let d = insert(&store, vec![example("a"), example("b"), example("a")]).unwrap();
        assert_eq!(d.label_counts["a"], 2);
        assert_eq!(store.take(&d.id).unwrap().examples.len(), 3);
        assert!(store.take(&d.id).is_err());

        insert(&store, vec![example("a")]).unwrap();
        insert(&store, vec![example("a")]).unwrap();
        assert!(matches!(
            insert(&store, vec![example("a")]),
            Err(Error::LimitExceeded(_))
        ));

        let short = DatasetStore::new(limits(Duration::ZERO, 2));
        let d = insert(&short, vec![example("a")]).unwrap();
        assert!(short.take(&d.id).is_err());
    }

    #[test]
    fn uploads_in_progress_hold_slots_and_bytes_until_dropped() {
        let store = DatasetStore::new(limits(Duration::from_secs(60), 2));
        let mut first = store.begin_upload().unwrap();
        let mut second = store.begin_upload().unwrap();
        // Two uploads in progress fill both slots, finished or not.
        assert!(matches!(store.begin_upload(), Err(Error::LimitExceeded(_))));
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
        let dataset = store.finish(second, vec![example("a")]);
        // The finished dataset keeps its bytes and its slot.
        assert_eq!(store.bytes_held(), 60);
        let _third = store.begin_upload().unwrap();
        assert!(store.begin_upload().is_err());
        let taken = store.take(&dataset.id).unwrap();
        drop(dataset);
        drop(taken);
        assert_eq!(store.bytes_held(), 0);
    }
}
