//! Training jobs: QUEUED -> EMBEDDING -> TRAINING -> SUCCEEDED | FAILED | CANCELLED.
//!
//! A job runs on the server whether or not anyone watches it. Its examples are
//! embedded through the backbone's queue at bulk priority (so online Embed and
//! Predict traffic keeps its latency), identical inputs only once; the head is
//! trained on a blocking thread and published to the head store. At most
//! `max_concurrent_jobs` run at once; the others wait QUEUED.

mod fine_tune;
pub mod journal;

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::{
    backbone::{Adapter, BackboneDescriptor, EmbedOptions, Input, Prepared, Want},
    batching::{BackboneQueue, Priority},
    datasets::DatasetStore,
    head::{
        finetune::{FineTuneParams, Method, DEFAULT_TOP_LAYERS},
        model::HeadWeights,
        namespace::{at_share, describe, namespace_of},
        store::{HeadStore, StoredHead},
        train::{self, TrainedHead, TrainingSet},
        HeadKind, HeadMetadata, HeadMetrics, TrainingParams,
    },
    metrics,
    registry::{BackboneRegistry, LoadedBackbone},
    sync::lock,
    task::run_blocking,
    Error, Result,
};
use journal::{JobJournal, JobRecord, Written};

mod remote;
pub mod replica;
mod takeover;

pub use crate::datasets::Example;

/// What a job was asked to do, but its examples: kept in its record, so that
/// another replica can run it again from its stored dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub backbone: String,
    pub head_name: String,
    pub kind: HeadKind,
    pub params: TrainingParams,
    pub labels: Vec<String>,
    pub fine_tune: Option<FineTuneParams>,
}

impl JobSpec {
    fn of(request: &JobRequest) -> Self {
        Self {
            backbone: request.backbone.clone(),
            head_name: request.head_name.clone(),
            kind: request.kind.clone(),
            params: request.params.clone(),
            labels: request.labels.clone(),
            fine_tune: request.fine_tune,
        }
    }

    /// The request again, with its examples read back from `dataset`.
    fn into_request(self, examples: Vec<Example>, dataset: String) -> JobRequest {
        JobRequest {
            backbone: self.backbone,
            head_name: self.head_name,
            kind: self.kind,
            params: self.params,
            examples,
            labels: self.labels,
            fine_tune: self.fine_tune,
            dataset: Some(dataset),
        }
    }
}

/// What a client asks a job to do, validated by the server.
pub struct JobRequest {
    pub backbone: String,
    pub head_name: String,
    pub kind: HeadKind,
    pub params: TrainingParams,
    pub examples: Vec<Example>,
    /// The head's label order; every example's label is in it.
    pub labels: Vec<String>,
    /// Fine-tune the backbone's top layers with the head; None: train the
    /// head on frozen features.
    pub fine_tune: Option<FineTuneParams>,
    /// The stored dataset the examples came from (taken for this job); None:
    /// they came inline, and the job stores them.
    pub dataset: Option<String>,
}

/// Where a job stands; stored in its record (lower-case names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Embedding,
    Training,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Embedding => "embedding",
            JobState::Training => "training",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Embedding,
        JobState::Training,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];
}

/// What a job is doing, with what only that stage has.
#[derive(Debug, Clone)]
pub enum Stage {
    Queued,
    Embedding,
    Training,
    /// The published head.
    Succeeded(Arc<StoredHead>),
    /// Why it failed.
    Failed(String),
    /// Why it was cancelled.
    Cancelled(String),
}

impl Stage {
    /// The stage a job's record shows, given the head it published if that
    /// is still there: a success whose head is gone cannot show it, and
    /// reads as FAILED.
    fn of_record(record: &JobRecord, head: Option<Arc<StoredHead>>) -> Self {
        let error = record.error.clone().unwrap_or_default();
        match (record.state, head) {
            (JobState::Queued, _) => Stage::Queued,
            (JobState::Embedding, _) => Stage::Embedding,
            (JobState::Training, _) => Stage::Training,
            (JobState::Succeeded, Some(head)) => Stage::Succeeded(head),
            (JobState::Cancelled, _) => Stage::Cancelled(error),
            (JobState::Succeeded | JobState::Failed, _) => Stage::Failed(error),
        }
    }

    pub fn state(&self) -> JobState {
        match self {
            Stage::Queued => JobState::Queued,
            Stage::Embedding => JobState::Embedding,
            Stage::Training => JobState::Training,
            Stage::Succeeded(_) => JobState::Succeeded,
            Stage::Failed(_) => JobState::Failed,
            Stage::Cancelled(_) => JobState::Cancelled,
        }
    }
}

/// How far a job got; each counter stays at its last value in later stages.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Progress {
    /// Distinct inputs embedded so far, and in all.
    pub embedded: u64,
    pub total_inputs: u64,
    /// The epoch just finished and the planned number.
    pub epoch: u32,
    pub total_epochs: u32,
    /// Fine-tuning: the optimiser step just taken (from 1), the planned
    /// number, and that step's training loss.
    pub step: u32,
    pub total_steps: u32,
    pub step_loss: Option<f32>,
    /// The latest epoch's metrics (the published head's, once it succeeded).
    pub metrics: Option<HeadMetrics>,
    /// Which run of the job this is, from 1 (0 in records of earlier
    /// versions: the first).
    pub attempt: u32,
    /// Why this run is not the first, for people.
    pub note: Option<String>,
}

/// A step in a job's life, as streamed to clients.
#[derive(Debug, Clone)]
pub struct JobEvent {
    pub job_id: Arc<str>,
    pub time: SystemTime,
    pub stage: Stage,
    pub progress: Progress,
}

impl JobEvent {
    pub fn state(&self) -> JobState {
        self.stage.state()
    }

    /// The published head, once the job succeeded.
    pub fn head(&self) -> Option<&Arc<StoredHead>> {
        match &self.stage {
            Stage::Succeeded(head) => Some(head),
            _ => None,
        }
    }

    /// Why the job failed or was cancelled.
    pub fn error(&self) -> Option<&str> {
        match &self.stage {
            Stage::Failed(reason) | Stage::Cancelled(reason) => Some(reason),
            _ => None,
        }
    }
}

/// A job and its latest event.
#[derive(Debug, Clone)]
pub struct JobInfo {
    pub id: Arc<str>,
    pub backbone: String,
    pub head_name: String,
    pub created_at: SystemTime,
    pub finished_at: Option<SystemTime>,
    pub last_event: JobEvent,
}

struct Job {
    id: Arc<str>,
    backbone: String,
    head_name: String,
    created_at: SystemTime,
    started: Instant,
    cancel: CancellationToken,
    status: Mutex<JobStatus>,
    events: broadcast::Sender<JobEvent>,
    /// The stored dataset with the job's examples.
    dataset: Option<String>,
    /// What it was asked to do; None for jobs listed from a record.
    spec: Option<JobSpec>,
    /// Which run of the job this is, from 1.
    attempt: u32,
    /// This replica no longer runs the job: it released it (drained) or
    /// another replica took it over. Its end is then not this replica's to
    /// record.
    handed_off: AtomicBool,
    /// The record was written once: later writes replace it, and find it
    /// gone only when the job ended elsewhere and was forgotten.
    recorded: AtomicBool,
    /// Events since the record was last written.
    unwritten: AtomicBool,
    /// When the record was last written (its lease renewed).
    written_at: Mutex<Instant>,
    /// Held while the record is read and written, so that writes land in
    /// the order of the states they record: a renewal taken before the end
    /// can never overwrite the end in the store.
    record_lock: tokio::sync::Mutex<()>,
}

struct JobStatus {
    last: JobEvent,
    finished_at: Option<SystemTime>,
}

impl Job {
    /// Run `run` of a job, created at `created_at`; `note` says why it is not
    /// the first.
    fn new(id: Arc<str>, request: &JobRequest, dataset: String, run: Run) -> Self {
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

    fn status(&self) -> MutexGuard<'_, JobStatus> {
        lock(&self.status)
    }

    fn state(&self) -> JobState {
        self.status().last.state()
    }

    fn info(&self) -> JobInfo {
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
    fn emit(&self, stage: Option<Stage>, update: impl FnOnce(&mut Progress)) {
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
    fn settle(&self, stage: Stage, update: impl FnOnce(&mut Progress)) -> Option<JobEvent> {
        Self::advance(&mut self.status(), Some(stage), update)
    }

    fn announce(&self, event: JobEvent) {
        let _ = self.events.send(event);
    }

    /// Takes `event`, of the run that took the job over, as the job's
    /// latest here and tells this replica's watchers: their streams go on
    /// with the new owner's events and end with its end.
    fn follow(&self, event: JobEvent) {
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

    fn check_cancelled(&self) -> Result<()> {
        if self.cancel.is_cancelled() {
            return Err(Error::Cancelled("the job was cancelled".into()));
        }
        Ok(())
    }

    /// What the journal keeps of the job.
    fn record(&self) -> JobRecord {
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
    fn ended(record: &JobRecord, store: &HeadStore) -> Self {
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
struct Run {
    attempt: u32,
    note: Option<String>,
    created_at: SystemTime,
}

impl Run {
    fn first() -> Self {
        Self {
            attempt: 1,
            note: None,
            created_at: SystemTime::now(),
        }
    }
}

/// Limits of the job system.
#[derive(Debug, Clone)]
pub struct JobLimits {
    pub max_concurrent_jobs: usize,
    pub max_queued_jobs: usize,
    /// Jobs of one namespace queued or running here at once
    /// (heads.max_queued_jobs_per_namespace).
    pub max_queued_jobs_per_namespace: usize,
    pub finished_jobs_kept: usize,
    /// Bytes of a fine-tuning job's frozen hidden states kept across epochs.
    pub fine_tune_cache_bytes: usize,
    /// Most runs of one job (heads.job_attempts).
    pub job_attempts: u32,
}

pub struct JobManager {
    registry: Arc<BackboneRegistry>,
    store: Arc<HeadStore>,
    datasets: Arc<DatasetStore>,
    limits: JobLimits,
    slots: Arc<Semaphore>,
    /// This replica's jobs in creation order.
    jobs: Mutex<VecDeque<Arc<Job>>>,
    /// Every job's record, in the shared store.
    journal: Arc<JobJournal>,
    /// Set when a drain starts: no new jobs, none taken over.
    closing: AtomicBool,
}

/// The reason recorded for jobs still running when the shutdown grace period ends.
pub const SHUT_DOWN: &str =
    "the server shut down before the job finished (grace period over); submit it again";

/// Inputs sent to the backbone queue per submission while embedding a data set:
/// big enough to batch well, small enough to report progress often.
const EMBED_CHUNK: usize = 64;

/// How often an owner writes its running jobs' records when they changed
/// and looks for cancel requests from other replicas.
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// A job's examples with identical inputs merged: each distinct input is
/// embedded once, and `rows` maps every example to its input.
struct DistinctInputs {
    inputs: Vec<Input>,
    rows: Vec<usize>,
    /// Each example's label, as its index in the head's label list.
    labels: Vec<u32>,
}

impl JobManager {
    /// A manager whose jobs are recorded in `journal`. The ended jobs
    /// recorded there are listed again; unended ones whose replica is gone
    /// are taken over by [`JobManager::spawn_sync`].
    pub async fn new(
        registry: Arc<BackboneRegistry>,
        store: Arc<HeadStore>,
        datasets: Arc<DatasetStore>,
        limits: JobLimits,
        journal: JobJournal,
    ) -> Result<Self> {
        let slots = Arc::new(Semaphore::new(limits.max_concurrent_jobs.max(1)));
        let manager = Self {
            registry,
            store,
            datasets,
            limits,
            slots,
            jobs: Mutex::new(VecDeque::new()),
            journal: Arc::new(journal),
            closing: AtomicBool::new(false),
        };
        let ended: Vec<Arc<Job>> = manager
            .journal
            .ended()
            .await?
            .iter()
            .map(|record| Arc::new(Job::ended(record, &manager.store)))
            .collect();
        let pruned = {
            let mut jobs = manager.jobs();
            jobs.extend(ended);
            manager.prune(&mut jobs)
        };
        manager.forget(pruned).await;
        manager.update_state_metrics();
        let final_states: Vec<&'static str> = JobState::ALL
            .into_iter()
            .filter(|s| s.is_final())
            .map(JobState::as_str)
            .collect();
        metrics::register_training_job_states(&final_states);
        Ok(manager)
    }

    /// Writes the job's record as it is now, if the record is still this
    /// run's; if another replica took the job over meanwhile, writes
    /// nothing and hands the job over ([`JobManager::hand_over`]).
    async fn write_record(&self, job: &Arc<Job>) {
        let written = {
            let _in_order = job.record_lock.lock().await;
            if job.handed_off.load(Ordering::Acquire) {
                // The record is another replica's now, or released.
                return;
            }
            job.unwritten.store(false, Ordering::Release);
            *lock(&job.written_at) = Instant::now();
            let first = !job.recorded.load(Ordering::Acquire);
            let written = self.journal.write(&job.record(), job.attempt, first).await;
            if written == Written::Done {
                job.recorded.store(true, Ordering::Release);
            }
            written
        };
        if let Written::Superseded(record) = written {
            self.hand_over(job, record.map(|record| *record));
        }
    }

    /// This replica no longer runs `job`: another replica took it over (this
    /// one was paused or cut off past its lease) or ended it. Stops the run
    /// here, takes the job out of this replica's table (its slot, its
    /// renewals; WatchJob, ListJobs and CancelJob here now read its record
    /// like any other replica's job), and lets the watchers it had here
    /// follow the new owner's record to its end. Once per job.
    fn hand_over(&self, job: &Arc<Job>, record: Option<JobRecord>) {
        if job.handed_off.swap(true, Ordering::AcqRel) {
            return;
        }
        job.cancel.cancel();
        self.jobs().retain(|other| !Arc::ptr_eq(other, job));
        self.update_state_metrics();
        metrics::record_takeover("lost");
        tracing::warn!(job = %job.id, attempt = job.attempt,
            owner = ?record.as_ref().and_then(|r| r.owner.clone()),
            "training job taken over by another replica while this one ran it (its lease ran \
             out here); stopped here, following its record");
        let journal = Arc::clone(&self.journal);
        let store = Arc::clone(&self.store);
        let job = Arc::clone(job);
        tokio::spawn(follow_new_owner(job, journal, store, record));
    }

    /// The jobs that have not ended.
    fn unended(&self) -> Vec<Arc<Job>> {
        self.jobs()
            .iter()
            .filter(|job| !job.state().is_final())
            .cloned()
            .collect()
    }

    /// While the manager lives, every [`SYNC_EVERY`]: writes the records of
    /// this replica's running jobs that changed, renews their leases (other
    /// replicas leave a job alone while its lease runs), honours cancel
    /// requests that other replicas recorded, and gives up a job another
    /// replica took over; every lease renewal period, takes over the jobs
    /// whose replica is gone.
    pub fn spawn_sync(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let renew_every = self.journal.renew_every();
        let manager = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(SYNC_EVERY.min(renew_every));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut scanned: Option<Instant> = None;
            loop {
                ticks.tick().await;
                let Some(manager) = manager.upgrade() else {
                    return;
                };
                for job in manager.unended() {
                    manager.sync(&job, renew_every).await;
                }
                if scanned.is_none_or(|at| at.elapsed() >= renew_every) {
                    scanned = Some(Instant::now());
                    manager.take_over().await;
                }
            }
        })
    }

    /// One running job's sync with the store.
    async fn sync(&self, job: &Arc<Job>, renew_every: Duration) {
        match self.journal.read(&job.id).await {
            Ok(Some(stored)) if !self.journal.may_write(&stored, job.attempt) => {
                // A replica took it over, or gave it up (this one's lease ran
                // out while it ran it): stop, and follow its record.
                return self.hand_over(job, Some(stored));
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(job = %job.id, error = %err, "cannot read the job's record"),
        }
        if !job.cancel.is_cancelled() && self.journal.cancel_requested(&job.id).await {
            tracing::info!(job = %job.id, "training job cancelled from another replica");
            job.cancel.cancel();
        }
        let due = lock(&job.written_at).elapsed() >= renew_every;
        if due || job.unwritten.load(Ordering::Acquire) {
            self.write_record(job).await;
        }
    }

    /// Takes no new jobs from now on (TrainHead gets UNAVAILABLE, and no job
    /// of another replica is taken over): the start of a drain.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
    }

    /// For a drain: takes no new jobs from now on, waits for running ones
    /// until `deadline`, then gives those still running up in the store
    /// (their lease over), for another replica, or this one after its
    /// restart, to run again.
    pub async fn finish_or_release_by(&self, deadline: Instant) {
        self.close();
        loop {
            let running = self.unended();
            if running.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                for job in running {
                    self.release(&job).await;
                }
                self.update_state_metrics();
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops running `job` here and records it released, unless another
    /// replica took it over meanwhile: its record is then left as the new
    /// owner wrote it, and the watchers here hear the job as it stands.
    async fn release(&self, job: &Job) {
        let written = {
            let _in_order = job.record_lock.lock().await;
            if job.state().is_final() {
                return;
            }
            job.handed_off.store(true, Ordering::Release);
            job.cancel.cancel();
            self.journal
                .release(&job.record(), job.attempt, SHUT_DOWN)
                .await
        };
        if let Written::Superseded(Some(record)) = written {
            tracing::warn!(job = %job.id, owner = ?record.owner,
                "training job taken over by another replica; its record is left to it");
            return job.follow(remote::event(&record, &self.store).await);
        }
        let end = job.settle(Stage::Failed(SHUT_DOWN.into()), |_| {});
        if let Some(event) = end {
            job.announce(event);
        }
        tracing::warn!(job = %job.id, "training job released by the shutdown, for another replica to run");
    }

    fn jobs(&self) -> MutexGuard<'_, VecDeque<Arc<Job>>> {
        lock(&self.jobs)
    }

    /// One of this replica's jobs.
    fn local(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs().iter().find(|job| &*job.id == id).cloned()
    }

    /// A job's record from the store, for a job this replica does not hold.
    async fn remote(&self, id: &str) -> Result<JobRecord> {
        let not_found = || Error::NotFound {
            kind: "job",
            id: id.to_owned(),
        };
        // Ids come from clients: only what a server could have handed out.
        if !crate::config::is_valid_name(id) {
            return Err(not_found());
        }
        self.journal.read(id).await?.ok_or_else(not_found)
    }

    /// Starts a job and returns its id with a subscription to its events (the
    /// QUEUED event is the first it receives).
    pub async fn submit(
        self: &Arc<Self>,
        request: JobRequest,
    ) -> Result<(Arc<str>, broadcast::Receiver<JobEvent>)> {
        if self.closing.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        // Fail fast on what can be known now; loading problems surface as FAILED.
        let loaded = self.registry.get(&request.backbone)?;
        let mut request = request;
        if let Some(params) = &mut request.fine_tune {
            fit_to_backbone(params, loaded.backbone.descriptor())?;
        }
        self.check_room(&request.head_name)?;
        // Refused now rather than after the training, at the publish.
        self.store.check_room(&request.head_name)?;
        // In the store before the job exists, so that it can be run again
        // from there.
        let dataset = match &request.dataset {
            Some(id) => id.clone(),
            None => self.datasets.keep_for_job(&request.examples).await?,
        };
        let id: Arc<str> = Arc::from(uuid::Uuid::new_v4().to_string());
        let job = Arc::new(Job::new(Arc::clone(&id), &request, dataset, Run::first()));
        let receiver = job.events.subscribe();
        let pruned = self.admit(&job);
        let pruned = match pruned {
            Ok(pruned) => pruned,
            Err(err) => {
                if request.dataset.is_none() {
                    self.datasets
                        .remove(job.dataset.as_deref().unwrap_or_default())
                        .await;
                }
                return Err(err);
            }
        };
        self.forget(pruned).await;
        tracing::info!(job = %id, backbone = %request.backbone, head = %request.head_name,
            examples = request.examples.len(), "training job queued");
        self.start(job, request).await;
        Ok((id, receiver))
    }

    /// Starts a job already in the table: its record first (before anyone
    /// learns of it: a crash from here on is recorded), then its QUEUED
    /// event, for subscribers and metrics, then its run.
    async fn start(self: &Arc<Self>, job: Arc<Job>, request: JobRequest) {
        self.write_record(&job).await;
        let _ = job.events.send(job.status().last.clone());
        self.update_state_metrics();
        let manager = Arc::clone(self);
        tokio::spawn(async move { manager.run(job, request).await });
    }

    /// LIMIT_EXCEEDED when this replica's queue is full for a job training
    /// `head_name`.
    fn check_room(&self, head_name: &str) -> Result<()> {
        self.room_in(&self.jobs(), head_name)
    }

    /// LIMIT_EXCEEDED when `jobs`, this replica's table, is full, or holds
    /// the share of the namespace of `head_name`.
    fn room_in(&self, jobs: &VecDeque<Arc<Job>>, head_name: &str) -> Result<()> {
        let waiting: Vec<&Arc<Job>> = jobs.iter().filter(|j| !j.state().is_final()).collect();
        if waiting.len() >= self.limits.max_concurrent_jobs + self.limits.max_queued_jobs {
            return Err(Error::LimitExceeded(format!(
                "{} training jobs are queued or running, the limit \
                 (heads.max_concurrent_jobs + heads.max_queued_jobs); retry later",
                waiting.len()
            )));
        }
        let namespace = namespace_of(head_name);
        let mine = waiting
            .iter()
            .filter(|j| namespace_of(&j.head_name) == namespace)
            .count();
        if at_share(namespace, mine, self.limits.max_queued_jobs_per_namespace) {
            return Err(Error::LimitExceeded(format!(
                "{} has {mine} training jobs queued or running here, its share \
                 (heads.max_queued_jobs_per_namespace); retry later",
                describe(namespace)
            )));
        }
        Ok(())
    }

    /// Adds a job to the table unless the queue is full; returns the ids of
    /// ended jobs beyond the retention limit, to forget.
    fn admit(&self, job: &Arc<Job>) -> Result<Vec<Arc<str>>> {
        let mut jobs = self.jobs();
        self.room_in(&jobs, &job.head_name)?;
        jobs.push_back(Arc::clone(job));
        Ok(self.prune(&mut jobs))
    }

    /// The job's current event and, unless it has ended, a subscription to the
    /// events after it. A job of another replica is followed through its
    /// record in the store.
    pub async fn watch(
        &self,
        id: &str,
    ) -> Result<(JobEvent, Option<broadcast::Receiver<JobEvent>>)> {
        if let Some(job) = self.local(id) {
            let status = job.status();
            let receiver = (!status.last.state().is_final()).then(|| job.events.subscribe());
            return Ok((status.last.clone(), receiver));
        }
        let record = self.remote(id).await?;
        Ok(remote::follow(Arc::clone(&self.journal), Arc::clone(&self.store), record).await)
    }

    /// A job and its latest event.
    pub async fn info(&self, id: &str) -> Result<JobInfo> {
        if let Some(job) = self.local(id) {
            return Ok(job.info());
        }
        let record = self.remote(id).await?;
        Ok(remote::info(&record, &self.store).await)
    }

    /// Asks a job to stop; it ends CANCELLED. A job of another replica gets
    /// the request through the store, and its owner stops it within about
    /// [`SYNC_EVERY`].
    pub async fn cancel(&self, id: &str) -> Result<JobInfo> {
        let ended =
            || Error::FailedPrecondition(format!("job {id} has already ended; nothing to cancel"));
        if let Some(job) = self.local(id) {
            if job.state().is_final() {
                return Err(ended());
            }
            job.cancel.cancel();
            tracing::info!(job = %id, "training job cancellation requested");
            return Ok(job.info());
        }
        let record = self.remote(id).await?;
        if record.state.is_final() {
            return Err(ended());
        }
        self.journal.request_cancel(id).await?;
        tracing::info!(job = %id, owner = ?record.owner,
            "training job cancellation requested of its replica");
        Ok(remote::info(&record, &self.store).await)
    }

    /// This replica's jobs and, from the store, those of the others (theirs
    /// as their last record says), in creation order.
    pub async fn list(&self, include_finished: bool) -> Result<Vec<JobInfo>> {
        let mut infos: Vec<JobInfo> = self.jobs().iter().map(|job| job.info()).collect();
        let mine: std::collections::HashSet<Arc<str>> =
            infos.iter().map(|info| Arc::clone(&info.id)).collect();
        for record in self.journal.all().await? {
            if !mine.contains(record.id.as_str()) {
                infos.push(remote::info(&record, &self.store).await);
            }
        }
        infos.retain(|info| include_finished || !info.last_event.state().is_final());
        infos.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(infos)
    }

    /// Drops the oldest finished jobs beyond the retention limit from the
    /// table and returns their ids, for [`JobManager::forget`].
    fn prune(&self, jobs: &mut VecDeque<Arc<Job>>) -> Vec<Arc<str>> {
        let finished = jobs.iter().filter(|j| j.state().is_final()).count();
        let mut excess = finished.saturating_sub(self.limits.finished_jobs_kept);
        let mut pruned = Vec::new();
        jobs.retain(|job| {
            if excess > 0 && job.state().is_final() {
                excess -= 1;
                pruned.push(Arc::clone(&job.id));
                false
            } else {
                true
            }
        });
        pruned
    }

    /// Removes pruned jobs' records from the store.
    async fn forget(&self, ids: Vec<Arc<str>>) {
        for id in ids {
            self.journal.remove(&id).await;
        }
    }

    fn update_state_metrics(&self) {
        let mut counts: HashMap<JobState, usize> = HashMap::new();
        for job in self.jobs().iter() {
            *counts.entry(job.state()).or_default() += 1;
        }
        for state in JobState::ALL {
            metrics::set_training_jobs(state.as_str(), counts.get(&state).copied().unwrap_or(0));
        }
    }

    async fn run(self: Arc<Self>, job: Arc<Job>, request: JobRequest) {
        let permit = tokio::select! {
            permit = Arc::clone(&self.slots).acquire_owned() => permit.ok(),
            () = job.cancel.cancelled() => None,
        };
        let outcome = match permit {
            Some(_permit) if !job.cancel.is_cancelled() => self.execute(&job, request).await,
            _ => Err(Error::Cancelled("cancelled while queued".into())),
        };
        let stage = match outcome {
            Ok(head) => Stage::Succeeded(head),
            Err(Error::Cancelled(reason)) => Stage::Cancelled(reason),
            Err(err) => Stage::Failed(client_reason(&job.id, &err)),
        };
        if job.handed_off.load(Ordering::Acquire) {
            // Another replica runs it now (or will): its end is not ours.
            tracing::info!(job = %job.id, "training job stopped here; it runs elsewhere");
            self.update_state_metrics();
            return;
        }
        let state = stage.state();
        let final_metrics = match &stage {
            Stage::Succeeded(head) => Some(head.meta.metrics.clone()),
            _ => None,
        };
        let error = stage_error(&stage);
        let end = job.settle(stage, |progress| {
            if let Some(metrics) = final_metrics {
                progress.metrics = Some(metrics);
            }
        });
        self.write_record(&job).await;
        if job.handed_off.load(Ordering::Acquire) {
            // Taken over while it ran: the end is the new owner's to tell,
            // and so is the dataset.
            return;
        }
        metrics::record_training_job(state.as_str(), job.started.elapsed());
        self.update_state_metrics();
        if let Some(event) = end {
            job.announce(event);
        }
        if let Some(dataset) = &job.dataset {
            self.datasets.remove(dataset).await;
        }
        match error {
            None => tracing::info!(job = %job.id, "training job succeeded"),
            Some(reason) => tracing::warn!(job = %job.id, state = state.as_str(), reason = %reason,
                "training job ended without a head"),
        }
    }

    /// Embeds the examples, trains the head and publishes it; or fine-tunes.
    async fn execute(&self, job: &Arc<Job>, request: JobRequest) -> Result<Arc<StoredHead>> {
        if let Some(params) = request.fine_tune {
            return self.fine_tune(job, request, params).await;
        }
        let loaded = self.registry.get(&request.backbone)?;
        let descriptor = loaded.backbone.descriptor().clone();
        let options = descriptor.default_options;
        let distinct = distinct_inputs(&request)?;
        let vectors = embed_distinct(job, &loaded, &distinct.inputs, options).await?;

        let dim = descriptor.dimension;
        let mut features = Vec::with_capacity(distinct.rows.len() * dim);
        for &row in &distinct.rows {
            features.extend_from_slice(&vectors[row]);
        }
        let set = TrainingSet {
            features,
            dim,
            labels: distinct.labels,
            classes: request.labels.len(),
        };
        let trained = train_on(job, set, &request, training_device(&descriptor.device)).await?;
        job.check_cancelled()?;
        let meta = HeadMetadata {
            name: request.head_name.clone(),
            version: 0,
            backbone: descriptor.name.clone(),
            backbone_fingerprint: descriptor.fingerprint.clone(),
            features: options.into(),
            input_dim: dim,
            labels: request.labels.clone(),
            kind: request.kind.clone(),
            training: trained.params,
            metrics: trained.metrics,
            train_examples: trained.train_examples as u64,
            validation_examples: trained.validation_examples as u64,
            created_at_ms: journal::millis(SystemTime::now()),
            fine_tuning: None,
        };
        self.publish(job, meta, trained.weights, None).await
    }

    /// Publishes the trained head, unless another replica took the job over
    /// meanwhile (this one was paused past its lease): the job's head is
    /// then the new owner's to publish.
    async fn publish(
        &self,
        job: &Job,
        meta: HeadMetadata,
        weights: HeadWeights,
        adapter: Option<Adapter>,
    ) -> Result<Arc<StoredHead>> {
        if let Ok(Some(stored)) = self.journal.read(&job.id).await {
            if !self.journal.may_write(&stored, job.attempt) {
                return Err(Error::Cancelled(
                    "another replica took the job over; its head is that replica's to publish"
                        .into(),
                ));
            }
        }
        self.store.publish(meta, weights, adapter).await
    }
}

/// Feeds the events of `job`'s record (written by the replica that took it
/// over) to the watchers this replica had, until the job ends or none is
/// left. A record that is gone ended the job elsewhere and was forgotten.
async fn follow_new_owner(
    job: Arc<Job>,
    journal: Arc<JobJournal>,
    store: Arc<HeadStore>,
    record: Option<JobRecord>,
) {
    let Some(record) = record else {
        let mut event = job.status().last.clone();
        event.time = SystemTime::now();
        event.stage = Stage::Failed(
            "another replica took the job over and its record is gone; list the jobs to \
             find its head"
                .into(),
        );
        return job.follow(event);
    };
    let (first, receiver) = remote::follow(journal, store, record).await;
    let ended = first.state().is_final();
    job.follow(first);
    let Some(mut receiver) = receiver.filter(|_| !ended) else {
        return;
    };
    while job.events.receiver_count() > 0 {
        match receiver.recv().await {
            Ok(event) => {
                let ended = event.state().is_final();
                job.follow(event);
                if ended {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Why a job failed, as its clients read it. A server fault's details (file
/// paths, library messages) go to the log under the job's id instead.
fn client_reason(job: &str, err: &Error) -> String {
    match err {
        Error::Storage(_) | Error::Internal(_) | Error::Inference(_) | Error::ModelLoad(_) => {
            tracing::error!(job, error = %err, "training job failed on a server fault");
            format!(
                "the server failed while running the job; its log has the details under job {job}"
            )
        }
        other => other.to_string(),
    }
}

fn stage_error(stage: &Stage) -> Option<String> {
    match stage {
        Stage::Failed(reason) | Stage::Cancelled(reason) => Some(reason.clone()),
        _ => None,
    }
}

/// Merges identical inputs and maps labels to their indices.
fn distinct_inputs(request: &JobRequest) -> Result<DistinctInputs> {
    let label_index: HashMap<&str, u32> = request
        .labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.as_str(), i as u32))
        .collect();
    let mut inputs: Vec<Input> = Vec::new();
    let mut index_of: HashMap<InputKey, usize> = HashMap::new();
    let mut rows = Vec::with_capacity(request.examples.len());
    let mut labels = Vec::with_capacity(request.examples.len());
    for example in &request.examples {
        let next = inputs.len();
        let row = *index_of
            .entry(InputKey::of(&example.input))
            .or_insert_with(|| {
                inputs.push(example.input.clone());
                next
            });
        rows.push(row);
        labels.push(*label_index.get(example.label.as_str()).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "label `{}` is not in the label list",
                example.label
            ))
        })?);
    }
    Ok(DistinctInputs {
        inputs,
        rows,
        labels,
    })
}

/// Embeds the distinct inputs in chunks through the backbone's queue at bulk
/// priority, reporting progress after each chunk.
async fn embed_distinct(
    job: &Job,
    loaded: &LoadedBackbone,
    distinct: &[Input],
    options: EmbedOptions,
) -> Result<Vec<Vec<f32>>> {
    let total = distinct.len() as u64;
    job.emit(Some(Stage::Embedding), |progress| {
        progress.total_inputs = total
    });
    let mut vectors: Vec<Vec<f32>> = Vec::with_capacity(distinct.len());
    for (chunk_index, chunk) in distinct.chunks(EMBED_CHUNK).enumerate() {
        job.check_cancelled()?;
        let prepared = loaded
            .prepare(chunk.to_vec(), true, chunk_index * EMBED_CHUNK, None)
            .await
            .map_err(example_error)?;
        vectors.extend(embed_patiently(&loaded.queue, prepared, &Want::features(options)).await?);
        let done = vectors.len() as u64;
        job.emit(None, |progress| progress.embedded = done);
    }
    Ok(vectors)
}

/// Completes fine-tuning settings for the backbone (layers 0: all of its
/// layers for LoRA, [`DEFAULT_TOP_LAYERS`] or all for top layers) and checks
/// them against it.
fn fit_to_backbone(params: &mut FineTuneParams, descriptor: &BackboneDescriptor) -> Result<()> {
    if descriptor.encoder_layers == 0 {
        return Err(Error::FailedPrecondition(format!(
            "backbone `{}` cannot be fine-tuned (only BERT text backbones can); train a \
             head on its frozen features instead",
            descriptor.name
        )));
    }
    if params.method.layers() == 0 {
        let layers = match params.method {
            Method::Lora(_) => descriptor.encoder_layers,
            Method::TopLayers(_) => DEFAULT_TOP_LAYERS.min(descriptor.encoder_layers),
        };
        params.method.set_layers(layers);
    }
    params.validate(descriptor.encoder_layers, descriptor.dimension)
}

/// An input that cannot be prepared fails the job as an invalid argument,
/// naming it among the job's distinct inputs.
fn example_error(err: Error) -> Error {
    match err {
        Error::InvalidInput { index, reason } => {
            Error::InvalidArgument(format!("distinct example input {index}: {reason}"))
        }
        other => other,
    }
}

/// Trains the head on a blocking thread, reporting each step (an epoch, or
/// a fit of the L-BFGS path) as an epoch.
async fn train_on(
    job: &Arc<Job>,
    set: TrainingSet,
    request: &JobRequest,
    device: candle_core::Device,
) -> Result<TrainedHead> {
    job.emit(Some(Stage::Training), |_| {});
    let training_job = Arc::clone(job);
    let kind = request.kind.clone();
    let params = request.params.clone();
    run_blocking("training a head", move || {
        train::train_on_device(
            &set,
            &kind,
            &params,
            &device,
            &training_job.cancel,
            &mut |metrics: &HeadMetrics, planned: usize| {
                training_job.emit(None, |progress| {
                    progress.epoch = metrics.epoch as u32;
                    progress.total_epochs = planned as u32;
                    progress.metrics = Some(metrics.clone());
                })
            },
        )
    })
    .await?
}

/// Where a head of a backbone on `device` (as its descriptor names it)
/// trains: that device, or the CPU when it cannot be opened here (the head
/// then trains more slowly, but trains).
fn training_device(device: &str) -> candle_core::Device {
    device
        .parse::<crate::config::DeviceSpec>()
        .ok()
        .and_then(|spec| crate::backbone::candle_device(spec).ok())
        .unwrap_or(candle_core::Device::Cpu)
}

/// Bulk work waits for room instead of failing when online traffic fills the
/// queue.
async fn embed_patiently(
    queue: &BackboneQueue,
    prepared: Vec<Prepared>,
    want: &Want,
) -> Result<Vec<Vec<f32>>> {
    let mut backoff = Duration::from_millis(20);
    loop {
        match queue
            .embed(prepared.clone(), want.clone(), Priority::Bulk, None)
            .await
        {
            Err(Error::QueueFull(_)) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// Identity of an input for de-duplication.
#[derive(PartialEq, Eq, Hash)]
enum InputKey {
    Text(String),
    Bytes(Vec<u8>),
    Tensor(Vec<usize>, Vec<u32>),
    TokenIds(Vec<u32>),
}

impl InputKey {
    fn of(input: &Input) -> Self {
        match input {
            Input::Text(text) => InputKey::Text(text.clone()),
            Input::Image(bytes) => InputKey::Bytes(bytes.clone()),
            Input::Tensor { shape, values } => {
                InputKey::Tensor(shape.clone(), values.iter().map(|v| v.to_bits()).collect())
            }
            Input::TokenIds(ids) => InputKey::TokenIds(ids.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::training_device;

    /// A head trains on its backbone's device, and on the CPU when that
    /// device cannot be opened (a GPU named in a build or on a machine
    /// without one).
    #[test]
    fn heads_train_on_the_backbones_device_or_the_cpu() {
        assert!(training_device("cpu").is_cpu());
        assert!(training_device("not a device").is_cpu());
        #[cfg(not(feature = "cuda"))]
        assert!(training_device("cuda:0").is_cpu(), "no CUDA in this build");
    }
}
