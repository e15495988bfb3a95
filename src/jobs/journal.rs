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
//! lease, which the owner renews while the job runs. A job is another
//! replica's to take over only once its lease ran out (its replica is gone,
//! or released it when drained), or when it was this replica's own before a
//! restart; a job a live replica runs is left alone. Each run of a job is
//! claimed by creating `jobs/<id>/attempt-<n>` only if absent: of replicas
//! racing to take a job over, one gets it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{JobSpec, JobState, Progress};
use crate::{storage::Storage, Result};

/// The reason recorded for jobs that were running when the process stopped.
pub const INTERRUPTED: &str =
    "the server stopped before the job finished (shutdown or crash); submit it again";

/// Why a job's run ended without an end of its own, and what that means.
#[derive(Debug, Clone, PartialEq)]
pub struct Interruption {
    /// For the note of the next run: what happened, briefly.
    pub what: String,
    /// For the job's error if no run is left.
    pub reason: String,
}

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
    /// What the job was asked to do, to run it again; absent in records of
    /// earlier versions.
    #[serde(default)]
    pub spec: Option<JobSpec>,
    /// Why its owner gave the job up unfinished (a drain past its grace
    /// period), for whoever takes it over.
    #[serde(default)]
    pub released: Option<String>,
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
        self.write_leased(record, self.lease).await;
    }

    /// Writes an unended job's record as given up, its lease already over:
    /// the next replica to look takes it over.
    pub async fn release(&self, record: &JobRecord, reason: &str) {
        let record = JobRecord {
            released: Some(reason.to_owned()),
            ..record.clone()
        };
        self.write_leased(&record, Duration::ZERO).await;
    }

    async fn write_leased(&self, record: &JobRecord, lease: Duration) {
        let mut record = record.clone();
        record.owner = Some(self.owner.clone());
        let now = SystemTime::now();
        record.lease_until_ms = (!record.state.is_final()).then(|| millis(now + lease));
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

    /// Removes everything of the job: its markers, then its record.
    pub async fn remove(&self, id: &str) {
        let prefix = format!("{PREFIX}/{id}");
        let mut keys: Vec<String> = match self.storage.list(&prefix).await {
            Ok(entries) => entries.into_iter().map(|e| e.key).collect(),
            Err(err) => {
                tracing::warn!(job = %id, error = %err, "cannot list the job's objects");
                vec![cancel_key(id)]
            }
        };
        keys.retain(|key| *key != record_key(id));
        keys.push(record_key(id));
        for key in keys {
            if let Err(err) = self.storage.delete(&key).await {
                tracing::warn!(job = %id, error = %err, "cannot remove the job's record");
            }
        }
    }

    /// Claims run `attempt` of a job for this replica; false when another
    /// replica claimed it first.
    pub async fn claim(&self, id: &str, attempt: u32) -> Result<bool> {
        let key = format!("{PREFIX}/{id}/attempt-{attempt}");
        self.storage
            .create(&key, Bytes::from(self.owner.clone()))
            .await
    }

    /// Asks the job's owner, wherever it runs, to cancel it.
    pub async fn request_cancel(&self, id: &str) -> Result<()> {
        self.storage.put(&cancel_key(id), Bytes::new()).await
    }

    /// Whether someone asked to cancel the job.
    pub async fn cancel_requested(&self, id: &str) -> bool {
        matches!(self.storage.get(&cancel_key(id)).await, Ok(Some(_)))
    }

    /// The records of ended jobs, oldest first: listed again for WatchJob
    /// and ListJobs after a start. Unended ones are for the take-over scan.
    pub async fn ended(&self) -> Result<Vec<JobRecord>> {
        let mut records = self.all().await?;
        records.retain(|record| record.state.is_final());
        Ok(records)
    }

    /// Why a job's run is over though the job has not ended, making it this
    /// replica's to take over: it was this replica's own before a restart
    /// (or nobody's), its owner released it, or its lease ran out. None: a
    /// live replica runs it, or it ended. `local`: this replica runs it now.
    pub fn interruption(&self, record: &JobRecord, local: bool) -> Option<Interruption> {
        if record.state.is_final() || local {
            return None;
        }
        let now = millis(SystemTime::now());
        let owner = record.owner.as_deref();
        let mine = owner.is_none_or(|owner| owner == self.owner);
        let expired = record.lease_until_ms.is_none_or(|until| until <= now);
        let owner = owner.unwrap_or("unknown");
        if let Some(reason) = &record.released {
            return expired.then(|| Interruption {
                what: format!("replica {owner} shut down before the job finished"),
                reason: reason.clone(),
            });
        }
        if mine {
            return Some(Interruption {
                what: format!("replica {owner}, which ran it, restarted"),
                reason: INTERRUPTED.into(),
            });
        }
        expired.then(|| Interruption {
            what: format!("replica {owner} stopped renewing its lease"),
            reason: abandoned(owner),
        })
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
            spec: None,
            released: None,
        }
    }

    fn storage(dir: &std::path::Path) -> Storage {
        Storage::open(&Location::Volume(dir.to_owned())).unwrap()
    }

    fn journal(dir: &std::path::Path, owner: &str) -> JobJournal {
        JobJournal::new(storage(dir), owner, Duration::from_secs(30))
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

    /// Another replica's job is this one's to take over only once its lease
    /// ran out or it was released; a job of this replica's earlier run is
    /// at once; a job that ended or runs here never is.
    #[tokio::test]
    async fn only_own_released_and_abandoned_jobs_are_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let a = journal(dir.path(), "a");
        a.write(&record("mine", JobState::Training, 1)).await;
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
        journal(dir.path(), "d")
            .release(&record("drained", JobState::Training, 4), "shut down")
            .await;
        write_foreign(
            dir.path(),
            record("done", JobState::Succeeded, 5),
            "b",
            now - 1,
        )
        .await;
        let all = a.all().await.unwrap();
        let what: Vec<(&str, Option<Interruption>)> = all
            .iter()
            .map(|r| (r.id.as_str(), a.interruption(r, false)))
            .collect();
        assert_eq!(what[0].0, "mine");
        assert_eq!(what[0].1.as_ref().unwrap().reason, INTERRUPTED);
        assert_eq!(what[1], ("live", None));
        assert_eq!(what[2].1.as_ref().unwrap().reason, abandoned("c"));
        assert!(what[2].1.as_ref().unwrap().what.contains("replica c"));
        assert_eq!(what[3].1.as_ref().unwrap().reason, "shut down");
        assert_eq!(what[4], ("done", None));
        assert_eq!(a.interruption(&all[0], true), None, "running here");
        // Of two replicas claiming the next run, one gets it.
        let b = journal(dir.path(), "b");
        let (first, second) = tokio::join!(a.claim("gone", 2), b.claim("gone", 2));
        assert!(first.unwrap() != second.unwrap());
        let ended = a.ended().await.unwrap();
        assert_eq!(
            ended.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["done"]
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

    /// Unreadable records are skipped, and a state this version does not
    /// know is refused, not read as FAILED.
    #[tokio::test]
    async fn unreadable_records_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let journal = journal(dir.path(), "a");
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
        let unknown = serde_json::to_string(&record("e", JobState::Queued, 3))
            .unwrap()
            .replace("\"queued\"", "\"succeded\"");
        store
            .put(&record_key("e"), Bytes::from(unknown))
            .await
            .unwrap();
        let all = journal.all().await.unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(
            (all[0].state, all[0].head_version),
            (JobState::Succeeded, Some(4))
        );
    }
}
