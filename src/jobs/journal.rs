//! Training jobs in the shared store, so that what happened to a job survives
//! its replica and any replica can answer for it.
//!
//! ```text
//! jobs/<id>/record.json   the job: its state, progress, owner and lease
//! jobs/<id>/cancel        a cancel request, from any replica, for the owner
//! ```
//!
//! The owner writes the record when the job is submitted, at most about once
//! a second while it runs (only when something changed, or to renew the
//! lease), and when it ends; each write replaces the whole record at once. At
//! start-up ended jobs are listed again for WatchJob and ListJobs, and a job
//! whose record never reached an end was running when its replica stopped.
//!
//! A record names the replica that runs the job (its owner) and holds a
//! lease, which the owner renews while the job runs. At start-up a replica
//! fails only the unended jobs of its own earlier run (same replica name) and
//! those whose lease ran out (their replica is gone); a job another replica
//! is running is left alone.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{JobState, Progress};
use crate::{storage::Storage, Result};

/// The reason recorded for jobs that were running when the process stopped.
pub const INTERRUPTED: &str =
    "the server stopped before the job finished (shutdown or crash); submit it again";

/// The reason recorded for another replica's job whose lease ran out.
pub fn abandoned(owner: &str) -> String {
    format!(
        "replica {owner}, which ran the job, stopped renewing its lease (it crashed or was \
         removed); submit it again"
    )
}

const PREFIX: &str = "jobs";

fn record_key(id: &str) -> String {
    format!("{PREFIX}/{id}/record.json")
}

fn cancel_key(id: &str) -> String {
    format!("{PREFIX}/{id}/cancel")
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub backbone: String,
    pub head_name: String,
    pub state: JobState,
    pub created_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    pub error: Option<String>,
    /// The published version, for succeeded jobs.
    pub head_version: Option<u32>,
    pub total_epochs: u32,
    /// The replica that runs (or ran) the job; absent in records written
    /// before replicas had names.
    #[serde(default)]
    pub owner: Option<String>,
    /// Until when the owner holds the job, for jobs that have not ended.
    #[serde(default)]
    pub lease_until_ms: Option<u64>,
    /// How far the job got, as its last event said.
    #[serde(default)]
    pub progress: Progress,
    /// The stored dataset holding the job's examples.
    #[serde(default)]
    pub dataset: Option<String>,
    /// When the owner last wrote the record; a watcher on another replica
    /// reports this as the event's time.
    #[serde(default)]
    pub updated_at_ms: u64,
}

/// Moves job records of the layout before the shared store
/// (`<store_dir>/.jobs/<id>.json`) to where the journal reads them; returns
/// how many moved. Renames only: of replicas migrating at once, one moves
/// each record.
pub fn migrate_volume(root: &std::path::Path) -> std::io::Result<usize> {
    let old = root.join(".jobs");
    let Ok(entries) = std::fs::read_dir(&old) else {
        return Ok(0);
    };
    let mut moved = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".json") else {
            continue;
        };
        if !crate::config::is_valid_name(id) {
            continue;
        }
        let target = root.join(PREFIX).join(id);
        std::fs::create_dir_all(&target)?;
        match std::fs::rename(entry.path(), target.join("record.json")) {
            Ok(()) => moved += 1,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
    }
    // Only once empty: leftovers of crashed writes stay for a person to see.
    let _ = std::fs::remove_dir(&old);
    Ok(moved)
}

pub struct JobJournal {
    storage: Storage,
    /// This replica's name.
    owner: String,
    lease: Duration,
}

pub fn millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl JobJournal {
    /// The journal in the shared store, for the replica named `owner`, whose
    /// jobs are its own for `lease` after each renewal.
    pub fn new(storage: Storage, owner: &str, lease: Duration) -> Self {
        Self {
            storage,
            owner: owner.to_owned(),
            lease,
        }
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// How often a running job's lease is renewed: often enough that a
    /// renewal can be late or fail a few times before the lease runs out.
    pub fn renew_every(&self) -> Duration {
        self.lease / 6
    }

    /// Writes (or replaces) a job's record as this replica's, with a fresh
    /// lease while the job has not ended. Errors are logged, not returned: a
    /// job must not fail because its record could not be written.
    pub async fn write(&self, record: &JobRecord) {
        let mut record = record.clone();
        record.owner = Some(self.owner.clone());
        let now = SystemTime::now();
        record.lease_until_ms = (!record.state.is_final()).then(|| millis(now + self.lease));
        record.updated_at_ms = millis(now);
        let written = match serde_json::to_vec_pretty(&record) {
            Ok(json) => {
                self.storage
                    .put(&record_key(&record.id), Bytes::from(json))
                    .await
            }
            Err(err) => Err(crate::Error::Internal(err.to_string())),
        };
        if let Err(err) = written {
            tracing::error!(job = %record.id, error = %err, "cannot write the job's record");
        }
    }

    /// A job's record; None when the store has none.
    pub async fn read(&self, id: &str) -> Result<Option<JobRecord>> {
        let Some(bytes) = self.storage.get(&record_key(id)).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|err| crate::Error::Storage(format!("job {id}'s record is invalid: {err}")))
    }

    /// Every readable record, oldest first; unreadable ones are logged and
    /// skipped (an unknown state is an error too, never a silent FAILED).
    pub async fn all(&self) -> Result<Vec<JobRecord>> {
        use futures_util::StreamExt;
        let ids: Vec<String> = self
            .storage
            .list(PREFIX)
            .await?
            .into_iter()
            .filter_map(|entry| {
                let id = entry
                    .key
                    .strip_prefix("jobs/")?
                    .strip_suffix("/record.json")?;
                Some(id.to_owned())
            })
            .collect();
        // Read side by side: on object storage each is a round trip.
        let reads: Vec<(String, Result<Option<JobRecord>>)> = futures_util::stream::iter(ids)
            .map(|id| async move {
                let read = self.read(&id).await;
                (id, read)
            })
            .buffer_unordered(16)
            .collect()
            .await;
        let mut records = Vec::new();
        for (id, read) in reads {
            match read {
                Ok(Some(record)) => records.push(record),
                Ok(None) => {}
                Err(err) => tracing::error!(job = %id, error = %err,
                    "unreadable job record skipped"),
            }
        }
        records.sort_by_key(|r| (r.created_at_ms, r.id.clone()));
        Ok(records)
    }

    pub async fn remove(&self, id: &str) {
        for key in [cancel_key(id), record_key(id)] {
            if let Err(err) = self.storage.delete(&key).await {
                tracing::warn!(job = %id, error = %err, "cannot remove the job's record");
            }
        }
    }

    /// Asks the job's owner, wherever it runs, to cancel it.
    pub async fn request_cancel(&self, id: &str) -> Result<()> {
        self.storage.put(&cancel_key(id), Bytes::new()).await
    }

    /// Whether someone asked to cancel the job.
    pub async fn cancel_requested(&self, id: &str) -> bool {
        matches!(self.storage.get(&cancel_key(id)).await, Ok(Some(_)))
    }

    /// Every record but those of jobs another replica is running, oldest
    /// first, each with whether this call ended it. Records of unended jobs
    /// of this replica's earlier run are rewritten as FAILED with
    /// `INTERRUPTED`, those of other replicas whose lease ran out as FAILED
    /// naming the replica.
    pub async fn recover(&self) -> Result<Vec<(JobRecord, bool)>> {
        let mut records = Vec::new();
        for mut record in self.all().await? {
            let unended = !record.state.is_final();
            if unended {
                let Some(reason) = self.end_of_unended(&record) else {
                    tracing::info!(job = %record.id, owner = ?record.owner,
                        "training job runs on another replica; left alone");
                    continue;
                };
                record.state = JobState::Failed;
                record.error = Some(reason);
                record.finished_at_ms = Some(millis(SystemTime::now()));
                self.write(&record).await;
                tracing::warn!(job = %record.id, head = %record.head_name,
                    error = record.error.as_deref().unwrap_or_default(),
                    "training job did not finish; recorded as failed");
            }
            records.push((record, unended));
        }
        Ok(records)
    }

    /// Why an unended job found at start-up is over: it was this replica's
    /// (its earlier run stopped) or nobody's, or its lease ran out. None: a
    /// live replica runs it.
    fn end_of_unended(&self, record: &JobRecord) -> Option<String> {
        let now = millis(SystemTime::now());
        match (&record.owner, record.lease_until_ms) {
            (Some(owner), _) if *owner == self.owner => Some(INTERRUPTED.into()),
            (Some(_), Some(until)) if until > now => None,
            (Some(owner), _) => Some(abandoned(owner)),
            (None, _) => Some(INTERRUPTED.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Location;

    fn record(id: &str, state: JobState, created: u64) -> JobRecord {
        JobRecord {
            id: id.into(),
            backbone: "b".into(),
            head_name: "h".into(),
            state,
            created_at_ms: created,
            finished_at_ms: None,
            error: None,
            head_version: None,
            total_epochs: 3,
            owner: None,
            lease_until_ms: None,
            progress: Progress::default(),
            dataset: None,
            updated_at_ms: 0,
        }
    }

    fn storage(dir: &std::path::Path) -> Storage {
        Storage::open(&Location::Volume(dir.to_owned())).unwrap()
    }

    fn journal(dir: &std::path::Path, owner: &str) -> JobJournal {
        JobJournal::new(storage(dir), owner, Duration::from_secs(30))
    }

    async fn recover_records(journal: &JobJournal) -> Vec<JobRecord> {
        let recovered = journal.recover().await.unwrap();
        recovered.into_iter().map(|(record, _)| record).collect()
    }

    /// Writes `record` as another replica would have, its lease ending at
    /// `lease_until_ms`.
    async fn write_foreign(
        dir: &std::path::Path,
        record: JobRecord,
        owner: &str,
        lease_until_ms: u64,
    ) {
        let record = JobRecord {
            owner: Some(owner.into()),
            lease_until_ms: Some(lease_until_ms),
            ..record
        };
        let json = serde_json::to_vec(&record).unwrap();
        storage(dir)
            .put(&record_key(&record.id), Bytes::from(json))
            .await
            .unwrap();
    }

    /// A replica's start leaves alone (and does not list) the job another
    /// live replica runs, fails the one whose replica stopped renewing its
    /// lease, naming that replica, and fails its own earlier run's job.
    #[tokio::test]
    async fn only_own_and_abandoned_jobs_are_failed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        journal(dir.path(), "a")
            .write(&record("mine", JobState::Training, 1))
            .await;
        let now = millis(SystemTime::now());
        write_foreign(
            dir.path(),
            record("live", JobState::Training, 2),
            "b",
            now + 20_000,
        )
        .await;
        write_foreign(
            dir.path(),
            record("gone", JobState::Queued, 3),
            "c",
            now - 1,
        )
        .await;
        let recovered = recover_records(&journal(dir.path(), "a")).await;
        let ids: Vec<&str> = recovered.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["mine", "gone"]);
        assert_eq!(recovered[0].error.as_deref(), Some(INTERRUPTED));
        assert_eq!(recovered[1].error.as_deref(), Some(abandoned("c").as_str()));
        assert!(recovered.iter().all(|r| r.state == JobState::Failed));
        let live = journal(dir.path(), "a")
            .read("live")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (live.state, live.owner.as_deref()),
            (JobState::Training, Some("b")),
            "untouched"
        );
    }

    /// A running job's record names its replica and a lease ahead; an ended
    /// one keeps the name and drops the lease.
    #[tokio::test]
    async fn records_carry_their_owner_and_lease() {
        let dir = tempfile::tempdir().unwrap();
        let journal = journal(dir.path(), "a");
        journal.write(&record("j", JobState::Training, 1)).await;
        let running = journal.read("j").await.unwrap().unwrap();
        let ahead = running.lease_until_ms.unwrap() - millis(SystemTime::now());
        assert!((29_000..=30_000).contains(&ahead), "{ahead} ms");
        assert_eq!(running.owner.as_deref(), Some("a"));
        assert_eq!(
            running.state,
            JobState::Training,
            "the true state, for watchers"
        );
        journal.write(&record("j", JobState::Succeeded, 1)).await;
        let ended = journal.read("j").await.unwrap().unwrap();
        assert_eq!(
            (ended.owner.as_deref(), ended.lease_until_ms),
            (Some("a"), None)
        );
        assert_eq!(journal.renew_every(), Duration::from_secs(5));
        assert!(!journal.cancel_requested("j").await);
        journal.request_cancel("j").await.unwrap();
        assert!(journal.cancel_requested("j").await);
        journal.remove("j").await;
        assert!(journal.read("j").await.unwrap().is_none());
        assert!(!journal.cancel_requested("j").await);
    }

    #[tokio::test]
    async fn records_of_the_earlier_layout_are_carried_over() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(".jobs")).unwrap();
        let old = record("old", JobState::Succeeded, 1);
        std::fs::write(
            dir.path().join(".jobs/old.json"),
            serde_json::to_vec(&old).unwrap(),
        )
        .unwrap();
        assert_eq!(migrate_volume(dir.path()).unwrap(), 1);
        let read = journal(dir.path(), "a").read("old").await.unwrap().unwrap();
        assert_eq!((read.id.as_str(), read.state), ("old", JobState::Succeeded));
        assert!(!dir.path().join(".jobs").exists());
    }

    #[tokio::test]
    async fn interrupted_jobs_come_back_failed_and_ended_ones_as_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let journal = journal(dir.path(), "a");
        journal.write(&record("b", JobState::Queued, 2)).await;
        journal
            .write(&JobRecord {
                head_version: Some(4),
                ..record("a", JobState::Succeeded, 1)
            })
            .await;
        let store = storage(dir.path());
        store
            .put(&record_key("d"), Bytes::from_static(b"not json"))
            .await
            .unwrap();
        // A state this version does not know is refused, not read as FAILED.
        let unknown = serde_json::to_string(&record("e", JobState::Queued, 3))
            .unwrap()
            .replace("\"queued\"", "\"succeded\"");
        store
            .put(&record_key("e"), Bytes::from(unknown))
            .await
            .unwrap();

        let recovered = recover_records(&journal).await;
        assert_eq!(recovered.len(), 2);
        assert_eq!(recovered[0].id, "a");
        assert_eq!(recovered[0].state, JobState::Succeeded);
        assert_eq!(recovered[0].head_version, Some(4));
        assert_eq!(recovered[1].state, JobState::Failed);
        assert_eq!(recovered[1].error.as_deref(), Some(INTERRUPTED));
        // The rewrite is durable: a second recovery reads it as failed.
        let again = recover_records(&journal).await;
        assert_eq!(again[1].state, JobState::Failed);
        assert!(again[1].finished_at_ms.is_some());
    }
}
