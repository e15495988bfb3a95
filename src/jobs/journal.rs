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
//!
//! A lease runs out when the record stayed unchanged for the lease's length
//! as the observer watched it: each write counts a renewal, and the
//! observer measures the silence on its own monotonic clock from when it
//! first saw the record as it is. No replica's wall clock is compared with
//! another's (`lease_until_ms` is written for people only), so a replica
//! whose clock runs ahead never takes a live job for abandoned.
//!
//! Every write is a compare-and-set on the record ([`Storage::update`]) that
//! lands only while the record is still the writer's run: a replica paused
//! past its lease, whose job another took over, comes back to find its
//! writes refused, and follows the new owner's record instead.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{JobSpec, JobState, Progress};
use crate::{storage::Storage, sync::lock, Result};

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
    /// How many times the record was written before this write, any run:
    /// what a replica watching the lease sees change while the owner lives.
    #[serde(default)]
    pub renewals: u64,
    /// The owner's lease, in milliseconds: how long a watcher waits, after
    /// it last saw the record change, before it takes the owner for gone.
    #[serde(default)]
    pub lease_ms: Option<u64>,
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

/// A stored record, decoded.
fn parse(id: &str, bytes: &[u8]) -> Result<JobRecord> {
    serde_json::from_slice(bytes)
        .map_err(|err| crate::Error::Storage(format!("job {id}'s record is invalid: {err}")))
}

/// What became of a write of a job's record.
#[derive(Debug, Clone, PartialEq)]
pub enum Written {
    /// The record is the writer's, as given.
    Done,
    /// Nothing written: a later run owns the record (another replica took
    /// the job over) or the job ended; the record as it is now, None when
    /// it is gone (ended and forgotten).
    Superseded(Option<Box<JobRecord>>),
    /// Nothing written: the store failed (logged).
    Failed,
}

/// How many times a write reads the record again when another write came
/// between its read and its compare-and-set.
const WRITE_TRIES: usize = 8;

pub struct JobJournal {
    storage: Storage,
    /// This replica's name.
    owner: String,
    lease: Duration,
    /// Other replicas' unended records as this replica last saw them, by
    /// job id.
    seen: Mutex<HashMap<String, Seen>>,
}

/// What changes in a record at every write ([`signature`]).
pub(super) type Signature = (u32, Option<String>, u64, u64);

/// A record as an observer last saw it, and since when (its own clock).
struct Seen {
    what: Signature,
    since: Instant,
}

/// What changes in a record at every write: its run, owner and renewal
/// count (and, from writers of earlier versions, which count no renewals,
/// their time stamp).
pub(super) fn signature(record: &JobRecord) -> Signature {
    (
        record.progress.attempt,
        record.owner.clone(),
        record.renewals,
        record.updated_at_ms,
    )
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
            seen: Mutex::new(HashMap::new()),
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

    /// Writes (or replaces) a job's record as this replica's run `run` (the
    /// attempt it claimed), with a fresh lease while the job has not ended;
    /// `first`: the job's first write, which creates the record. The write
    /// lands only while the record is still this run's (see
    /// [`JobJournal::may_write`]), by a compare-and-set on the record: a run
    /// that another replica took over while this one was paused past its
    /// lease never overwrites the new owner's record. Store errors are
    /// logged, not returned: a job must not fail because its record could
    /// not be written.
    pub async fn write(&self, record: &JobRecord, run: u32, first: bool) -> Written {
        self.write_leased(record, run, first, self.lease).await
    }

    /// Writes an unended job's record as given up, its lease already over:
    /// the next replica to look takes it over. Like [`JobJournal::write`],
    /// only while the record is still run `run`'s.
    pub async fn release(&self, record: &JobRecord, run: u32, reason: &str) -> Written {
        let record = JobRecord {
            released: Some(reason.to_owned()),
            ..record.clone()
        };
        self.write_leased(&record, run, false, Duration::ZERO).await
    }

    async fn write_leased(
        &self,
        record: &JobRecord,
        run: u32,
        first: bool,
        lease: Duration,
    ) -> Written {
        match self.try_write(record, run, first, lease).await {
            Ok(written) => written,
            Err(err) => {
                tracing::error!(job = %record.id, error = %err, "cannot write the job's record");
                Written::Failed
            }
        }
    }

    /// Reads the record and replaces that version of it, again when another
    /// write came in between, up to [`WRITE_TRIES`] times.
    async fn try_write(
        &self,
        record: &JobRecord,
        run: u32,
        first: bool,
        lease: Duration,
    ) -> Result<Written> {
        let key = record_key(&record.id);
        for _ in 0..WRITE_TRIES {
            let written = match self.storage.get_versioned(&key).await? {
                None if first => {
                    let json = self.stamped(record, 0, lease)?;
                    self.storage.create(&key, json).await?
                }
                // Removed: the job ended elsewhere and was forgotten.
                None => return Ok(Written::Superseded(None)),
                Some(current) => {
                    let stored = parse(&record.id, &current.bytes)?;
                    if !self.may_write(&stored, run) {
                        return Ok(Written::Superseded(Some(Box::new(stored))));
                    }
                    let json = self.stamped(record, stored.renewals.wrapping_add(1), lease)?;
                    self.storage.update(&key, json, &current.version).await?
                }
            };
            if written {
                return Ok(Written::Done);
            }
        }
        Err(crate::Error::Storage(format!(
            "job {}'s record changed under {WRITE_TRIES} writes in a row",
            record.id
        )))
    }

    /// `record` as this replica writes it: its name, the lease, the time and
    /// the renewal count; encoded.
    fn stamped(&self, record: &JobRecord, renewals: u64, lease: Duration) -> Result<Bytes> {
        let mut record = record.clone();
        record.owner = Some(self.owner.clone());
        let now = crate::clock::now();
        record.lease_until_ms = (!record.state.is_final()).then(|| millis(now + lease));
        record.lease_ms = Some(lease.as_millis() as u64);
        record.updated_at_ms = millis(now);
        record.renewals = renewals;
        serde_json::to_vec_pretty(&record)
            .map(Bytes::from)
            .map_err(|err| crate::Error::Internal(err.to_string()))
    }

    /// Whether run `run` on this replica may still write a record that is
    /// `stored` now: the job has not ended, and the record is of an earlier
    /// run (this one took the job over) or of this run on this replica. A
    /// later run, or the same run recorded by another replica (which gave
    /// the job up as FAILED), means the job is no longer this run's.
    pub fn may_write(&self, stored: &JobRecord, run: u32) -> bool {
        let theirs = stored.progress.attempt.max(1);
        let mine = stored
            .owner
            .as_deref()
            .is_none_or(|owner| owner == self.owner);
        !stored.state.is_final() && (theirs < run || (theirs == run && mine))
    }

    /// A job's record; None when the store has none.
    pub async fn read(&self, id: &str) -> Result<Option<JobRecord>> {
        let Some(bytes) = self.storage.get(&record_key(id)).await? else {
            return Ok(None);
        };
        parse(id, &bytes).map(Some)
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

    /// How long `record` has stayed as it is while this replica watched it,
    /// by this replica's monotonic clock; zero the first time it is seen
    /// so. A record is read every scan (a sixth of a lease), so a live
    /// owner's renewal is seen well within a lease.
    fn silent_for(&self, record: &JobRecord) -> Duration {
        let what = signature(record);
        let mut seen = lock(&self.seen);
        match seen.get(&record.id) {
            Some(last) if last.what == what => last.since.elapsed(),
            _ => {
                let since = Instant::now();
                seen.insert(record.id.clone(), Seen { what, since });
                Duration::ZERO
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
        if record.state.is_final() {
            lock(&self.seen).remove(&record.id);
            return None;
        }
        if local {
            return None;
        }
        let owner = record.owner.as_deref();
        let mine = owner.is_none_or(|owner| owner == self.owner);
        let owner = owner.unwrap_or("unknown");
        if let Some(reason) = &record.released {
            return Some(Interruption {
                what: format!("replica {owner} shut down before the job finished"),
                reason: reason.clone(),
            });
        }
        let lease = record.lease_ms.map_or(self.lease, Duration::from_millis);
        let expired = self.silent_for(record) >= lease;
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
            renewals: 0,
            lease_ms: None,
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
    /// ran out (its record unchanged for a lease as this replica watched it,
    /// whatever the clocks say) or it was released; a job of this replica's
    /// earlier run is at once; a job that ended or runs here never is.
    #[tokio::test]
    async fn only_own_released_and_abandoned_jobs_are_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let lease = Duration::from_millis(300);
        let a = JobJournal::new(storage(dir.path()), "a", lease);
        a.write(&record("mine", JobState::Training, 1), 1, true)
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
        let d = journal(dir.path(), "d");
        let drained = record("drained", JobState::Training, 4);
        d.write(&drained, 1, true).await;
        d.release(&drained, 1, "shut down").await;
        write_foreign(
            dir.path(),
            record("done", JobState::Succeeded, 5),
            "b",
            now - 1,
        )
        .await;
        // First seen: no lease has run out, whatever its time stamps say.
        for record in a.all().await.unwrap() {
            if record.owner.as_deref() == Some("c") {
                assert_eq!(a.interruption(&record, false), None);
            }
        }
        tokio::time::sleep(lease).await;
        // B renewed; C did not.
        write_foreign(
            dir.path(),
            JobRecord {
                renewals: 1,
                ..record("live", JobState::Training, 2)
            },
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

    /// A run another replica took over writes nothing more: not its
    /// progress, not its end, not a release at shutdown; the new run's
    /// record stays. A record that ended is nobody's to write.
    #[tokio::test]
    async fn a_run_taken_over_never_writes_the_record_again() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (journal(dir.path(), "a"), journal(dir.path(), "b"));
        let first = record("j", JobState::Training, 1);
        assert_eq!(a.write(&first, 1, true).await, Written::Done);
        // B takes the job over as run 2.
        assert!(b.claim("j", 2).await.unwrap());
        let mut second = first.clone();
        second.progress.attempt = 2;
        assert_eq!(b.write(&second, 2, false).await, Written::Done);
        let mut done = second.clone();
        done.state = JobState::Succeeded;
        assert_eq!(b.write(&done, 2, false).await, Written::Done);
        // A comes back: its progress, its end and its release are refused.
        let mut stale_end = first.clone();
        stale_end.state = JobState::Failed;
        for written in [
            a.write(&first, 1, false).await,
            a.write(&stale_end, 1, false).await,
            a.release(&first, 1, "shut down").await,
        ] {
            let Written::Superseded(Some(now)) = written else {
                panic!("{written:?}")
            };
            assert_eq!((now.state, now.progress.attempt), (JobState::Succeeded, 2));
        }
        let stored = a.read("j").await.unwrap().unwrap();
        assert_eq!(stored.state, JobState::Succeeded);
        assert_eq!(stored.owner.as_deref(), Some("b"));
        // The same run, given up by another replica, is not A's either.
        a.write(&record("k", JobState::Training, 2), 1, true).await;
        let mut failed = record("k", JobState::Failed, 2);
        failed.progress.attempt = 1;
        assert_eq!(b.write(&failed, 2, false).await, Written::Done);
        assert!(!a.may_write(&a.read("k").await.unwrap().unwrap(), 1));
        // A removed record is not written again.
        a.remove("k").await;
        assert_eq!(
            a.write(&record("k", JobState::Training, 2), 1, false).await,
            Written::Superseded(None)
        );
    }

    /// A running job's record names its replica and a lease ahead; an ended
    /// one keeps the name and drops the lease.
    #[tokio::test]
    async fn records_carry_their_owner_and_lease() {
        let dir = tempfile::tempdir().unwrap();
        let journal = journal(dir.path(), "a");
        journal
            .write(&record("j", JobState::Training, 1), 1, true)
            .await;
        let running = journal.read("j").await.unwrap().unwrap();
        let ahead = running.lease_until_ms.unwrap() - millis(SystemTime::now());
        assert!((29_000..=30_000).contains(&ahead), "{ahead} ms");
        assert_eq!(running.owner.as_deref(), Some("a"));
        assert_eq!(
            running.state,
            JobState::Training,
            "the true state, for watchers"
        );
        journal
            .write(&record("j", JobState::Succeeded, 1), 1, false)
            .await;
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
            .write(
                &JobRecord {
                    head_version: Some(4),
                    ..record("a", JobState::Succeeded, 1)
                },
                1,
                true,
            )
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
