//! Training jobs on disk, so that what happened to a job survives a restart.
//!
//! Every job gets a small JSON record in `<head store>/.jobs/<id>.json`, written
//! when it is submitted and again when it ends (temporary file, fsync, rename:
//! a crash leaves the old record or the new one, never half of one). At start-up
//! the records are read back: ended jobs are listed again for WatchJob and
//! ListJobs, and a job whose record never reached an end was running when the
//! process stopped, so it is recorded FAILED with that reason for its client
//! to read.

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
}

pub struct JobJournal {
    dir: PathBuf,
}

pub fn millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl JobJournal {
    /// The journal inside a head store folder; created when missing.
    pub fn open(store_root: &Path) -> std::io::Result<Self> {
        let dir = store_root.join(".jobs");
        fs::create_dir_all(&dir)?;
        Ok(Self { dir })
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

    fn try_write(&self, record: &JobRecord) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
        fsutil::write_atomically(&self.path(&record.id), &json)
    }

    pub fn remove(&self, id: &str) {
        let _ = fs::remove_file(self.path(id));
    }

    /// Every record, oldest first. Records of jobs that had not ended are
    /// rewritten as FAILED with `INTERRUPTED`; unreadable files are logged and
    /// skipped.
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
                // A write cut short by a crash.
                let _ = fs::remove_file(&path);
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
                record.state = JobState::Failed;
                record.error = Some(INTERRUPTED.into());
                record.finished_at_ms = Some(millis(SystemTime::now()));
                self.write(&record);
                tracing::warn!(job = %record.id, head = %record.head_name,
                    "training job was interrupted by the last shutdown; recorded as failed");
            }
            records.push(record);
        }
        records.sort_by_key(|r| (r.created_at_ms, r.id.clone()));
        records
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
        }
    }

    #[test]
    fn interrupted_jobs_come_back_failed_and_ended_ones_as_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let journal = JobJournal::open(dir.path()).unwrap();
        journal.write(&record("b", JobState::Queued, 2));
        journal.write(&JobRecord {
            head_version: Some(4),
            ..record("a", JobState::Succeeded, 1)
        });
        std::fs::write(dir.path().join(".jobs/.c.tmp"), b"{half").unwrap();
        std::fs::write(dir.path().join(".jobs/d.json"), b"not json").unwrap();
        // A state this version does not know is refused, not read as FAILED.
        let unknown = serde_json::to_string(&record("e", JobState::Queued, 3))
            .unwrap()
            .replace("\"queued\"", "\"succeded\"");
        std::fs::write(dir.path().join(".jobs/e.json"), unknown).unwrap();

        let recovered = JobJournal::open(dir.path()).unwrap().recover();
        assert_eq!(recovered.len(), 2);
        assert_eq!(recovered[0].id, "a");
        assert_eq!(recovered[0].state, JobState::Succeeded);
        assert_eq!(recovered[0].head_version, Some(4));
        assert_eq!(recovered[1].state, JobState::Failed);
        assert_eq!(recovered[1].error.as_deref(), Some(INTERRUPTED));
        assert!(!dir.path().join(".jobs/.c.tmp").exists());
        // The rewrite is durable: a second recovery reads it as failed.
        let again = JobJournal::open(dir.path()).unwrap().recover();
        assert_eq!(again[1].state, JobState::Failed);
        assert!(again[1].finished_at_ms.is_some());
    }
}
