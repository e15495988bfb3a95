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
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::{
    backbone::{adapter::Adapter, BackboneDescriptor, EmbedOptions, Input, Prepared, Want},
    batching::{BackboneQueue, Priority},
    head::{
        finetune::{FineTuneParams, Method, DEFAULT_TOP_LAYERS},
        model::HeadWeights,
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
use journal::{JobJournal, JobRecord};

/// One labelled example.
#[derive(Debug, Clone)]
pub struct Example {
    pub input: Input,
    pub label: String,
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
#[derive(Debug, Clone, Default)]
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
}

struct JobStatus {
    last: JobEvent,
    finished_at: Option<SystemTime>,
}

impl Job {
    fn new(id: Arc<str>, request: &JobRequest) -> Self {
        let now = SystemTime::now();
        let (events, _) = broadcast::channel(256);
        let first = JobEvent {
            job_id: Arc::clone(&id),
            time: now,
            stage: Stage::Queued,
            progress: Progress {
                total_epochs: request.params.planned_steps() as u32,
                ..Progress::default()
            },
        };
        Self {
            id,
            backbone: request.backbone.clone(),
            head_name: request.head_name.clone(),
            created_at: now,
            started: Instant::now(),
            cancel: CancellationToken::new(),
            status: Mutex::new(JobStatus {
                last: first,
                finished_at: None,
            }),
            events,
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
            // Only ends are worth telling apart after a restart.
            state: if last.state().is_final() {
                last.state()
            } else {
                JobState::Queued
            },
            created_at_ms: journal::millis(self.created_at),
            finished_at_ms: status.finished_at.map(journal::millis),
            error: last.error().map(str::to_owned),
            head_version: last.head().map(|h| h.meta.version),
            total_epochs: last.progress.total_epochs,
            // The journal writes its own name and lease.
            owner: None,
            lease_until_ms: None,
        }
    }

    /// A job of an earlier run, from its record; ended, nothing to watch live.
    fn ended(record: &JobRecord, store: &HeadStore) -> Self {
        let id: Arc<str> = Arc::from(record.id.as_str());
        let head = record.head_version.and_then(|version| {
            store
                .get(&crate::head::HeadRef {
                    name: record.head_name.clone(),
                    version: Some(version),
                })
                .ok()
        });
        let error = record.error.clone().unwrap_or_default();
        let stage = match (record.state, &head) {
            (JobState::Succeeded, Some(head)) => Stage::Succeeded(Arc::clone(head)),
            (JobState::Cancelled, _) => Stage::Cancelled(error),
            // A success whose head is gone cannot show it; anything else that
            // did not end was recorded FAILED by the journal's recovery.
            _ => Stage::Failed(error),
        };
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
                        ..Progress::default()
                    },
                },
                finished_at,
            }),
            events,
        }
    }
}

/// Limits of the job system.
#[derive(Debug, Clone)]
pub struct JobLimits {
    pub max_concurrent_jobs: usize,
    pub max_queued_jobs: usize,
    pub finished_jobs_kept: usize,
    /// Bytes of a fine-tuning job's frozen hidden states kept across epochs.
    pub fine_tune_cache_bytes: usize,
}

pub struct JobManager {
    registry: Arc<BackboneRegistry>,
    store: Arc<HeadStore>,
    limits: JobLimits,
    slots: Arc<Semaphore>,
    /// Jobs in creation order.
    jobs: Mutex<VecDeque<Arc<Job>>>,
    /// Records of every job on disk; None only in tests of the manager itself.
    journal: Option<Arc<JobJournal>>,
}

/// The reason recorded for jobs still running when the shutdown grace period ends.
pub const SHUT_DOWN: &str =
    "the server shut down before the job finished (grace period over); submit it again";

/// Inputs sent to the backbone queue per submission while embedding a data set:
/// big enough to batch well, small enough to report progress often.
const EMBED_CHUNK: usize = 64;

/// A job's examples with identical inputs merged: each distinct input is
/// embedded once, and `rows` maps every example to its input.
struct DistinctInputs {
    inputs: Vec<Input>,
    rows: Vec<usize>,
    /// Each example's label, as its index in the head's label list.
    labels: Vec<u32>,
}

impl JobManager {
    /// A manager whose jobs are recorded in `journal`; the jobs recorded there
    /// by earlier runs are listed again (those that never ended as FAILED).
    pub fn new(
        registry: Arc<BackboneRegistry>,
        store: Arc<HeadStore>,
        limits: JobLimits,
        journal: Option<JobJournal>,
    ) -> Self {
        let slots = Arc::new(Semaphore::new(limits.max_concurrent_jobs.max(1)));
        let manager = Self {
            registry,
            store,
            limits,
            slots,
            jobs: Mutex::new(VecDeque::new()),
            journal: journal.map(Arc::new),
        };
        if let Some(journal) = &manager.journal {
            let mut jobs = manager.jobs();
            for record in journal.recover() {
                jobs.push_back(Arc::new(Job::ended(&record, &manager.store)));
            }
            manager.prune(&mut jobs);
        }
        manager.update_state_metrics();
        let final_states: Vec<&'static str> = JobState::ALL
            .into_iter()
            .filter(|s| s.is_final())
            .map(JobState::as_str)
            .collect();
        metrics::register_training_job_states(&final_states);
        manager
    }

    /// Writes the job's record, off the async runtime (it fsyncs).
    async fn write_record(&self, job: &Job) {
        if let Some(journal) = &self.journal {
            let journal = Arc::clone(journal);
            let record = job.record();
            if let Err(err) =
                run_blocking("writing a job record", move || journal.write(&record)).await
            {
                tracing::error!(job = %job.id, error = %err, "cannot write the job's record");
            }
        }
    }

    /// The jobs that have not ended.
    fn unended(&self) -> Vec<Arc<Job>> {
        self.jobs()
            .iter()
            .filter(|job| !job.state().is_final())
            .cloned()
            .collect()
    }

    /// Renews the leases of this replica's unended jobs for as long as the
    /// manager lives: other replicas leave a job alone while its lease runs.
    pub fn spawn_lease_renewal(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let every = self.journal.as_ref()?.renew_every();
        let manager = Arc::downgrade(self);
        Some(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(manager) = manager.upgrade() else {
                    return;
                };
                for job in manager.unended() {
                    manager.write_record(&job).await;
                }
            }
        }))
    }

    /// Waits for running jobs until `deadline`, then records those still
    /// running as FAILED (`SHUT_DOWN`) and stops them. For the end of a
    /// graceful shutdown.
    pub async fn finish_or_fail_by(&self, deadline: Instant) {
        loop {
            let running = self.unended();
            if running.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                for job in running {
                    job.cancel.cancel();
                    let end = job.settle(Stage::Failed(SHUT_DOWN.into()), |_| {});
                    self.write_record(&job).await;
                    if let Some(event) = end {
                        job.announce(event);
                    }
                    tracing::warn!(job = %job.id, "training job stopped by the shutdown; recorded as failed");
                }
                self.update_state_metrics();
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn jobs(&self) -> MutexGuard<'_, VecDeque<Arc<Job>>> {
        lock(&self.jobs)
    }

    fn find(&self, id: &str) -> Result<Arc<Job>> {
        self.jobs()
            .iter()
            .find(|job| &*job.id == id)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                kind: "job",
                id: id.to_owned(),
            })
    }

    /// Starts a job and returns its id with a subscription to its events (the
    /// QUEUED event is the first it receives).
    pub async fn submit(
        self: &Arc<Self>,
        request: JobRequest,
    ) -> Result<(Arc<str>, broadcast::Receiver<JobEvent>)> {
        // Fail fast on what can be known now; loading problems surface as FAILED.
        let loaded = self.registry.get(&request.backbone)?;
        let mut request = request;
        if let Some(params) = &mut request.fine_tune {
            fit_to_backbone(params, loaded.backbone.descriptor())?;
        }
        let id: Arc<str> = Arc::from(uuid::Uuid::new_v4().to_string());
        let job = Arc::new(Job::new(Arc::clone(&id), &request));
        let receiver = job.events.subscribe();
        self.admit(&job)?;
        // On disk before anyone learns the id: a crash from here on is recorded.
        self.write_record(&job).await;
        // The QUEUED event, for subscribers and metrics.
        let _ = job.events.send(job.status().last.clone());
        self.update_state_metrics();
        tracing::info!(job = %id, backbone = %request.backbone, head = %request.head_name,
            examples = request.examples.len(), "training job queued");
        let manager = Arc::clone(self);
        tokio::spawn(async move { manager.run(job, request).await });
        Ok((id, receiver))
    }

    /// Adds a job to the table unless the queue is full.
    fn admit(&self, job: &Arc<Job>) -> Result<()> {
        let mut jobs = self.jobs();
        let waiting = jobs.iter().filter(|j| !j.state().is_final()).count();
        if waiting >= self.limits.max_concurrent_jobs + self.limits.max_queued_jobs {
            return Err(Error::LimitExceeded(format!(
                "{waiting} training jobs are queued or running, the limit \
                 (heads.max_concurrent_jobs + heads.max_queued_jobs); retry later"
            )));
        }
        jobs.push_back(Arc::clone(job));
        self.prune(&mut jobs);
        Ok(())
    }

    /// The job's current event and, unless it has ended, a subscription to the
    /// events after it.
    pub fn watch(&self, id: &str) -> Result<(JobEvent, Option<broadcast::Receiver<JobEvent>>)> {
        let job = self.find(id)?;
        let status = job.status();
        let receiver = (!status.last.state().is_final()).then(|| job.events.subscribe());
        Ok((status.last.clone(), receiver))
    }

    /// A job and its latest event.
    pub fn info(&self, id: &str) -> Result<JobInfo> {
        Ok(self.find(id)?.info())
    }

    /// Asks a job to stop; it ends CANCELLED.
    pub fn cancel(&self, id: &str) -> Result<JobInfo> {
        let job = self.find(id)?;
        if job.state().is_final() {
            return Err(Error::FailedPrecondition(format!(
                "job {id} has already ended; nothing to cancel"
            )));
        }
        job.cancel.cancel();
        tracing::info!(job = %id, "training job cancellation requested");
        Ok(job.info())
    }

    pub fn list(&self, include_finished: bool) -> Vec<JobInfo> {
        self.jobs()
            .iter()
            .map(|job| job.info())
            .filter(|info| include_finished || !info.last_event.state().is_final())
            .collect()
    }

    /// Forgets the oldest finished jobs beyond the retention limit.
    fn prune(&self, jobs: &mut VecDeque<Arc<Job>>) {
        let finished = jobs.iter().filter(|j| j.state().is_final()).count();
        let mut excess = finished.saturating_sub(self.limits.finished_jobs_kept);
        jobs.retain(|job| {
            if excess > 0 && job.state().is_final() {
                excess -= 1;
                if let Some(journal) = &self.journal {
                    journal.remove(&job.id);
                }
                false
            } else {
                true
            }
        });
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
        metrics::record_training_job(state.as_str(), job.started.elapsed());
        self.update_state_metrics();
        if let Some(event) = end {
            job.announce(event);
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
        self.publish(meta, trained.weights, None).await
    }

    async fn publish(
        &self,
        meta: HeadMetadata,
        weights: HeadWeights,
        adapter: Option<Adapter>,
    ) -> Result<Arc<StoredHead>> {
        let store = Arc::clone(&self.store);
        run_blocking("publishing a head", move || {
            store.publish(meta, weights, adapter)
        })
        .await?
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
