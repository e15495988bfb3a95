//! Jobs that another replica runs, answered from their records in the shared
//! store: WatchJob, ListJobs and CancelJob work on any replica. A watcher here
//! reads the record every [`FOLLOW_EVERY`]; the owner writes it within about
//! a second of a change (`SYNC_EVERY`), so an event reaches such a watcher at
//! most about 1.5 s after it happened, plus the store's latency.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::broadcast;

use super::{
    journal::{self, JobJournal, JobRecord},
    JobEvent, JobInfo, JobState, Stage,
};
use crate::head::{store::HeadStore, HeadRef};

/// How often a watcher on another replica reads the job's record.
pub const FOLLOW_EVERY: Duration = Duration::from_millis(500);

/// The job's last event, as its record says.
pub async fn event(record: &JobRecord, store: &HeadStore) -> JobEvent {
    let head = match (record.state, record.head_version) {
        (JobState::Succeeded, Some(version)) => store
            .get(&HeadRef {
                name: record.head_name.clone(),
                version: Some(version),
            })
            .await
            .ok(),
        _ => None,
    };
    let stage = Stage::of_record(record, head);
    let time = record
        .finished_at_ms
        .unwrap_or(record.updated_at_ms.max(record.created_at_ms));
    JobEvent {
        job_id: Arc::from(record.id.as_str()),
        time: journal::from_millis(time),
        stage,
        progress: record.progress.clone(),
    }
}

pub async fn info(record: &JobRecord, store: &HeadStore) -> JobInfo {
    JobInfo {
        id: Arc::from(record.id.as_str()),
        backbone: record.backbone.clone(),
        head_name: record.head_name.clone(),
        created_at: journal::from_millis(record.created_at_ms),
        finished_at: record.finished_at_ms.map(journal::from_millis),
        last_event: event(record, store).await,
    }
}

/// The job's last event and, unless it has ended, a subscription to the
/// events read from its record from now on, until it ends or nobody listens.
pub async fn follow(
    journal: Arc<JobJournal>,
    store: Arc<HeadStore>,
    record: JobRecord,
) -> (JobEvent, Option<broadcast::Receiver<JobEvent>>) {
    let first = event(&record, &store).await;
    if record.state.is_final() {
        return (first, None);
    }
    let (sender, receiver) = broadcast::channel(16);
    tokio::spawn(async move {
        let mut quiet = Quiet::new(&record);
        let mut last = record;
        loop {
            tokio::time::sleep(FOLLOW_EVERY).await;
            if sender.receiver_count() == 0 {
                return;
            }
            let next = match journal.read(&last.id).await {
                Ok(Some(next)) => next,
                // Forgotten (the retention limit): nothing more to tell.
                Ok(None) => return,
                Err(err) => {
                    tracing::warn!(job = %last.id, error = %err, "cannot read a job's record");
                    continue;
                }
            };
            let next = match abandoned(&next, quiet.since(&next)) {
                Some(failed) => failed,
                None if changed(&last, &next) => next,
                None => continue,
            };
            let _ = sender.send(event(&next, &store).await);
            if next.state.is_final() {
                return;
            }
            last = next;
        }
    });
    (first, Some(receiver))
}

/// Whether a watcher has something new to hear.
fn changed(before: &JobRecord, after: &JobRecord) -> bool {
    (
        before.state,
        &before.progress,
        &before.error,
        before.head_version,
    ) != (
        after.state,
        &after.progress,
        &after.error,
        after.head_version,
    )
}

/// How long past its lease a job may stay unclaimed before a watcher is told
/// it failed, in leases: every replica looks for jobs to take over each
/// sixth of a lease, so only a job no replica can run (its backbone is
/// configured nowhere else) stays unclaimed this long.
const UNCLAIMED_LEASES: u32 = 10;

/// How long a watched record has stayed unchanged, by the watcher's own
/// monotonic clock (never the writer's wall clock).
struct Quiet {
    what: journal::Signature,
    since: Instant,
}

impl Quiet {
    fn new(record: &JobRecord) -> Self {
        Self {
            what: journal::signature(record),
            since: Instant::now(),
        }
    }

    /// How long `record` has been as it is now.
    fn since(&mut self, record: &JobRecord) -> Duration {
        let what = journal::signature(record);
        if what != self.what {
            *self = Self {
                what,
                since: Instant::now(),
            };
        }
        self.since.elapsed()
    }
}

/// The record as FAILED when it stayed unchanged for many leases (`quiet`)
/// and no replica took it over: a watcher is told the job will not end by
/// itself.
fn abandoned(record: &JobRecord, quiet: Duration) -> Option<JobRecord> {
    // Records of earlier versions: the lease is their two times' difference
    // (one writer's clock, so no skew between clocks enters it).
    let lease_ms = record.lease_ms.unwrap_or_else(|| {
        record
            .lease_until_ms
            .map_or(0, |until| until.saturating_sub(record.updated_at_ms))
    });
    let stale_after = Duration::from_millis(lease_ms.max(1_000)) * UNCLAIMED_LEASES;
    if record.state.is_final() || quiet < stale_after {
        return None;
    }
    let owner = record.owner.as_deref().unwrap_or("unknown");
    Some(JobRecord {
        state: JobState::Failed,
        error: Some(journal::abandoned(owner)),
        finished_at_ms: Some(journal::millis(crate::clock::now())),
        ..record.clone()
    })
}
