//! One job on this replica: its status, the events its watchers hear, its
//! cancellation, and what the journal keeps of it. A job only moves forward:
//! once it has ended, later events are dropped, so a late progress report
//! can never undo an end.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Instant, SystemTime},
};

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::{
    journal::{self, JobRecord},
    JobEvent, JobInfo, JobRequest, JobSpec, JobState, Progress, Stage,
};
use crate::{head::store::HeadStore, sync::lock, Error, Result};

/// One job on this replica, from its QUEUED event to its end (or to its
/// hand-over to another replica).
pub(super) struct Job {
    pub(super) id: Arc<str>,
    pub(super) backbone: String,
    pub(super) head_name: String,
    pub(super) created_at: SystemTime,
    pub(super) started: Instant,
    pub(super) cancel: CancellationToken,
    pub(super) status: Mutex<JobStatus>,
    pub(super) events: broadcast::Sender<JobEvent>,
    /// The stored dataset with the job's examples.
    pub(super) dataset: Option<String>,
    /// What it was asked to do; None for jobs listed from a record.
    pub(super) spec: Option<JobSpec>,
    /// Which run of the job this is, from 1.
    pub(super) attempt: u32,
    /// This replica no longer runs the job: it released it (drained) or
    /// another replica took it over. Its end is then not this replica's to
    /// record.
    pub(super) handed_off: AtomicBool,
    /// The record was written once: later writes replace it, and find it
    /// gone only when the job ended elsewhere and was forgotten.
    pub(super) recorded: AtomicBool,
    /// Events since the record was last written.
    pub(super) unwritten: AtomicBool,
    /// When the record was last written (its lease renewed).
    pub(super) written_at: Mutex<Instant>,
    /// Held while the record is read and written, so that writes land in
    /// the order of the states they record: a renewal taken before the end
    /// can never overwrite the end in the store.
    pub(super) record_lock: tokio::sync::Mutex<()>,
}

/// A job's latest event and, once it ended, when.
pub(super) struct JobStatus {
    pub(super) last: JobEvent,
    pub(super) finished_at: Option<SystemTime>,
}

impl Job {
    /// Run `run` of a job, created at `created_at`; `note` says why it is not
    /// the first.
    pub(super) fn new(id: Arc<str>, request: &JobRequest, dataset: String, run: Run) -> Self {
        let now = SystemTime::now();
        let (events, _) = broadcast::channel(256);
        let first = JobEvent {
            job_id: Arc::clone(&id),
            time: now,
            stage: Stage::Queued,
            progress: Progress {
                total_epochs: request.params.planned_steps() as u32,
                attempt: run.attempt,
                note: run.note,
                ..Progress::default()
            },
        };
        Self {
            id,
            backbone: request.backbone.clone(),
            head_name: request.head_name.clone(),
            created_at: run.created_at,
            started: Instant::now(),
            cancel: CancellationToken::new(),
            status: Mutex::new(JobStatus {
                last: first,
                finished_at: None,
            }),
            events,
            dataset: Some(dataset),
            spec: Some(JobSpec::of(request)),
            attempt: run.attempt,
            handed_off: AtomicBool::new(false),
            recorded: AtomicBool::new(false),
            unwritten: AtomicBool::new(false),
            written_at: Mutex::new(Instant::now()),
            record_lock: tokio::sync::Mutex::new(()),
        }
    }

    pub(super) fn status(&self) -> MutexGuard<'_, JobStatus> {
        lock(&self.status)
    }

    pub(super) fn state(&self) -> JobState {
        self.status().last.state()
    }

    pub(super) fn info(&self) -> JobInfo {
        let status = self.status();
        JobInfo {
            id: Arc::clone(&self.id),
            backbone: self.backbone.clone(),
            head_name: self.head_name.clone(),
            created_at: self.created_at,
            finished_at: status.finished_at,
            last_event: status.last.clone(),
        }
    }

    /// Records and broadcasts the next event: the previous one with its
    /// progress updated and, when given, a new stage.
    pub(super) fn emit(&self, stage: Option<Stage>, update: impl FnOnce(&mut Progress)) {
        let mut status = self.status();
        if let Some(event) = Self::advance(&mut status, stage, update) {
            self.unwritten.store(true, Ordering::Release);
            // Sent under the lock, so a watcher that subscribes under the same
            // lock sees every later event exactly once.
            let _ = self.events.send(event);
        }
    }

    /// Records the job's end without telling anyone yet: the caller writes
    /// the record and the metrics first, then [`Job::announce`]s it, so a
    /// client that hears of the end finds it everywhere. A watcher arriving
    /// in between reads the end from the status and subscribes to nothing.
    pub(super) fn settle(
        &self,
        stage: Stage,
        update: impl FnOnce(&mut Progress),
    ) -> Option<JobEvent> {
        Self::advance(&mut self.status(), Some(stage), update)
    }

    pub(super) fn announce(&self, event: JobEvent) {
        let _ = self.events.send(event);
    }

    /// Takes `event`, of the run that took the job over, as the job's
    /// latest here and tells this replica's watchers: their streams go on
    /// with the new owner's events and end with its end.
    pub(super) fn follow(&self, event: JobEvent) {
        let mut status = self.status();
        if event.state().is_final() {
            status.finished_at = Some(event.time);
        }
        status.last = event.clone();
        let _ = self.events.send(event);
    }

    /// The next event, recorded in `status`; None once the job has ended.
    fn advance(
        status: &mut JobStatus,
        stage: Option<Stage>,
        update: impl FnOnce(&mut Progress),
    ) -> Option<JobEvent> {
        if status.last.state().is_final() {
            return None;
        }
        let mut event = status.last.clone();
        event.time = SystemTime::now();
        if let Some(stage) = stage {
            event.stage = stage;
        }
        update(&mut event.progress);
        if event.state().is_final() {
            status.finished_at = Some(event.time);
        }
        status.last = event.clone();
        Some(event)
    }

    pub(super) fn check_cancelled(&self) -> Result<()> {
        if self.cancel.is_cancelled() {
            return Err(Error::Cancelled("the job was cancelled".into()));
        }
        Ok(())
    }

    /// What the journal keeps of the job.
    pub(super) fn record(&self) -> JobRecord {
        let status = self.status();
        let last = &status.last;
        JobRecord {
            id: self.id.to_string(),
            backbone: self.backbone.clone(),
            head_name: self.head_name.clone(),
            state: last.state(),
            created_at_ms: journal::millis(self.created_at),
            finished_at_ms: status.finished_at.map(journal::millis),
            error: last.error().map(str::to_owned),
            head_version: last.head().map(|h| h.meta.version),
            total_epochs: last.progress.total_epochs,
            // The journal writes its own name, lease and time.
            owner: None,
            lease_until_ms: None,
            progress: last.progress.clone(),
            dataset: self.dataset.clone(),
            updated_at_ms: 0,
            spec: self.spec.clone(),
            released: None,
            renewals: 0,
            lease_ms: None,
        }
    }

    /// A job of an earlier run, from its record; ended, nothing to watch live.
    pub(super) fn ended(record: &JobRecord, store: &HeadStore) -> Self {
        let id: Arc<str> = Arc::from(record.id.as_str());
        let head = record.head_version.and_then(|version| {
            store.cached(&crate::head::HeadRef {
                name: record.head_name.clone(),
                version: Some(version),
            })
        });
        let stage = Stage::of_record(record, head.clone());
        let finished_at = record.finished_at_ms.map(journal::from_millis);
        let (events, _) = broadcast::channel(1);
        Self {
            id: Arc::clone(&id),
            backbone: record.backbone.clone(),
            head_name: record.head_name.clone(),
            created_at: journal::from_millis(record.created_at_ms),
            started: Instant::now(),
            cancel: CancellationToken::new(),
            status: Mutex::new(JobStatus {
                last: JobEvent {
                    job_id: id,
                    time: finished_at.unwrap_or_else(SystemTime::now),
                    stage,
                    progress: Progress {
                        total_epochs: record.total_epochs,
                        metrics: head.as_ref().map(|h| h.meta.metrics.clone()),
                        ..record.progress.clone()
                    },
                },
                finished_at,
            }),
            events,
            dataset: record.dataset.clone(),
            spec: None,
            attempt: record.progress.attempt.max(1),
            handed_off: AtomicBool::new(false),
            recorded: AtomicBool::new(false),
            unwritten: AtomicBool::new(false),
            written_at: Mutex::new(Instant::now()),
            record_lock: tokio::sync::Mutex::new(()),
        }
    }
}

/// Which run of a job a [`Job`] is.
pub(super) struct Run {
    pub(super) attempt: u32,
    pub(super) note: Option<String>,
    pub(super) created_at: SystemTime,
}

impl Run {
    pub(super) fn first() -> Self {
        Self {
            attempt: 1,
            note: None,
            created_at: SystemTime::now(),
        }
    }
}
