//! Training jobs on disk, so that what happened to a job survives a restart.
//!
//! Every job gets a small JSON record in `<head store>/.jobs/<id>.json`, written
//! when it is submitted and again when it ends (temporary file, fsync, rename:
//! a crash leaves the old record or the new one, never half of one). At start-up
//! the records are read back: ended jobs are listed again for WatchJob and
//! ListJobs, and a job whose record never reached an end was running when the
//! process stopped, so it is recorded FAILED with that reason for its client
//! to read.
//!
//! Replicas share the store, and so the journal. A record names the replica
//! that runs the job (its owner) and holds a lease, which the owner renews
//! while the job runs. At start-up a replica fails only the unended jobs of
//! its own earlier run (same replica name) and those whose lease ran out (their
//! replica is gone); a job another replica is running is left alone. Likewise
//! only temporary files old enough to be crash leftovers are removed: a young
//! one may be another replica's write in progress.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use super::JobState;
use crate::fsutil;

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

/// Temporary files younger than this may be a write in progress.
const LEFTOVER_AGE: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub backbone: String,
    pub head_name: String,
    /// Queued, or how the job ended (only ends are worth telling apart after
    /// a restart).
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
}

pub struct JobJournal {
    dir: PathBuf,
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
    /// The journal inside a head store folder (created when missing), for
    /// the replica named `owner`, whose jobs are its own for `lease` after
    /// each renewal.
    pub fn open(store_root: &Path, owner: &str, lease: Duration) -> std::io::Result<Self> {
        let dir = store_root.join(".jobs");
        fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            owner: owner.to_owned(),
            lease,
        })
    }

    /// How often a running job's lease is renewed: often enough that a
    /// renewal can be late or fail a few times before the lease runs out.
    pub fn renew_every(&self) -> Duration {
        self.lease / 6
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes (or replaces) a job's record durably. Errors are logged, not
    /// returned: a job must not fail because its record could not be written.
    pub fn write(&self, record: &JobRecord) {
        if let Err(err) = self.try_write(record) {
            tracing::error!(job = %record.id, error = %err, "cannot write the job's record");
        }
    }

    /// Writes the record as this replica's, with a fresh lease while the job
    /// has not ended.
    fn try_write(&self, record: &JobRecord) -> std::io::Result<()> {
        let mut record = record.clone();
        record.owner = Some(self.owner.clone());
        record.lease_until_ms =
            (!record.state.is_final()).then(|| millis(SystemTime::now() + self.lease));
        let json = serde_json::to_vec_pretty(&record).map_err(std::io::Error::other)?;
        fsutil::write_atomically(&self.path(&record.id), &json)
    }

    pub fn remove(&self, id: &str) {
        let _ = fs::remove_file(self.path(id));
    }

    /// Every record but those of jobs another replica is running, oldest
    /// first. Records of unended jobs of this replica's earlier run are
    /// rewritten as FAILED with `INTERRUPTED`, those of other replicas whose
    /// lease ran out as FAILED naming the replica; unreadable files are
    /// logged and skipped.
    pub fn recover(&self) -> Vec<JobRecord> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') {
                remove_if_leftover(&path);
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            let mut record = match read_record(&path) {
                Ok(record) => record,
                Err(reason) => {
                    // An unknown state is an error too, never a silent FAILED.
                    tracing::error!(file = %path.display(), error = %reason,
                        "unreadable job record skipped");
                    continue;
                }
            };
            if !record.state.is_final() {
                let Some(reason) = self.end_of_unended(&record) else {
                    tracing::info!(job = %record.id, owner = ?record.owner,
                        "training job runs on another replica; left alone");
                    continue;
                };
                record.state = JobState::Failed;
                record.error = Some(reason);
                record.finished_at_ms = Some(millis(SystemTime::now()));
                self.write(&record);
                tracing::warn!(job = %record.id, head = %record.head_name,
                    error = record.error.as_deref().unwrap_or_default(),
                    "training job did not finish; recorded as failed");
            }
            records.push(record);
        }
        records.sort_by_key(|r| (r.created_at_ms, r.id.clone()));
        records
    }
}

impl JobJournal {
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

/// Removes a temporary file old enough to be a crash's leftover.
fn remove_if_leftover(path: &Path) {
    if fsutil::is_older_than(path, LEFTOVER_AGE) {
        let _ = fs::remove_file(path);
    }
}

fn read_record(path: &Path) -> Result<JobRecord, String> {
    let bytes = fs::read(path).map_err(|err| err.to_string())?;
    serde_json::from_slice(&bytes).map_err(|err| err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        }
    }

    fn journal(dir: &Path, owner: &str) -> JobJournal {
        JobJournal::open(dir, owner, Duration::from_secs(30)).unwrap()
    }

    /// Writes `record` as another replica would have, its lease ending at
    /// `lease_until_ms`.
    fn write_foreign(dir: &Path, record: JobRecord, owner: &str, lease_until_ms: u64) {
        let record = JobRecord {
            owner: Some(owner.into()),
            lease_until_ms: Some(lease_until_ms),
            ..record
        };
        let path = dir.join(format!(".jobs/{}.json", record.id));
        std::fs::write(path, serde_json::to_vec(&record).unwrap()).unwrap();
    }

    /// A replica's start leaves alone (and does not list) the job another
    /// live replica runs, fails the one whose replica stopped renewing its
    /// lease, naming that replica, and fails its own earlier run's job.
    #[test]
    fn only_own_and_abandoned_jobs_are_failed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        journal(dir.path(), "a").write(&record("mine", JobState::Training, 1));
        let now = millis(SystemTime::now());
        write_foreign(
            dir.path(),
            record("live", JobState::Training, 2),
            "b",
            now + 20_000,
        );
        write_foreign(
            dir.path(),
            record("gone", JobState::Queued, 3),
            "c",
            now - 1,
        );
        let recovered = journal(dir.path(), "a").recover();
        let ids: Vec<&str> = recovered.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["mine", "gone"]);
        assert_eq!(recovered[0].error.as_deref(), Some(INTERRUPTED));
        assert_eq!(recovered[1].error.as_deref(), Some(abandoned("c").as_str()));
        assert!(recovered.iter().all(|r| r.state == JobState::Failed));
        let live = read_record(&dir.path().join(".jobs/live.json")).unwrap();
        assert_eq!(
            (live.state, live.owner.as_deref()),
            (JobState::Training, Some("b")),
            "untouched"
        );
    }

    /// A running job's record names its replica and a lease ahead; an ended
    /// one keeps the name and drops the lease.
    #[test]
    fn records_carry_their_owner_and_lease() {
        let dir = tempfile::tempdir().unwrap();
        let journal = journal(dir.path(), "a");
        journal.write(&record("j", JobState::Training, 1));
        let path = dir.path().join(".jobs/j.json");
        let running = read_record(&path).unwrap();
        let ahead = running.lease_until_ms.unwrap() - millis(SystemTime::now());
        assert!((29_000..=30_000).contains(&ahead), "{ahead} ms");
        assert_eq!(running.owner.as_deref(), Some("a"));
        journal.write(&record("j", JobState::Succeeded, 1));
        let ended = read_record(&path).unwrap();
        assert_eq!(
            (ended.owner.as_deref(), ended.lease_until_ms),
            (Some("a"), None)
        );
        assert_eq!(journal.renew_every(), Duration::from_secs(5));
    }

    #[test]
    fn interrupted_jobs_come_back_failed_and_ended_ones_as_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let journal = journal(dir.path(), "a");
        journal.write(&record("b", JobState::Queued, 2));
        journal.write(&JobRecord {
            head_version: Some(4),
            ..record("a", JobState::Succeeded, 1)
        });
        // A crash's leftover (an hour old) and another writer's temporary
        // file in progress (new).
        std::fs::write(dir.path().join(".jobs/.c.tmp"), b"{half").unwrap();
        std::fs::File::options()
            .write(true)
            .open(dir.path().join(".jobs/.c.tmp"))
            .and_then(|f| f.set_modified(SystemTime::now() - Duration::from_secs(3600)))
            .unwrap();
        std::fs::write(dir.path().join(".jobs/.f.tmp"), b"{writing").unwrap();
        std::fs::write(dir.path().join(".jobs/d.json"), b"not json").unwrap();
        // A state this version does not know is refused, not read as FAILED.
        let unknown = serde_json::to_string(&record("e", JobState::Queued, 3))
            .unwrap()
            .replace("\"queued\"", "\"succeded\"");
        std::fs::write(dir.path().join(".jobs/e.json"), unknown).unwrap();

        let recovered = journal.recover();
        assert_eq!(recovered.len(), 2);
        assert_eq!(recovered[0].id, "a");
        assert_eq!(recovered[0].state, JobState::Succeeded);
        assert_eq!(recovered[0].head_version, Some(4));
        assert_eq!(recovered[1].state, JobState::Failed);
        assert_eq!(recovered[1].error.as_deref(), Some(INTERRUPTED));
        assert!(!dir.path().join(".jobs/.c.tmp").exists());
        assert!(dir.path().join(".jobs/.f.tmp").exists(), "young: kept");
        // The rewrite is durable: a second recovery reads it as failed.
        let again = journal.recover();
        assert_eq!(again[1].state, JobState::Failed);
        assert!(again[1].finished_at_ms.is_some());
    }
}
