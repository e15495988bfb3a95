//! Training jobs: QUEUED -> EMBEDDING -> TRAINING -> SUCCEEDED | FAILED | CANCELLED.
//!
//! A job runs on the server whether or not anyone watches it. Its examples are
//! embedded through the backbone's queue at bulk priority (so online Embed and
//! Predict traffic keeps its latency), identical inputs only once; the head is
//! trained on a blocking thread and published to the head store. At most
//! `max_concurrent_jobs` run at once; the others wait QUEUED.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::{broadcast, Notify, Semaphore};

use crate::{
    backbone::Input,
    batching::Priority,
    head::{
        store::{HeadStore, StoredHead},
        train::{self, TrainingSet},
        HeadKind, HeadMetadata, HeadMetrics, TrainingParams,
    },
    job_journal::{self, JobJournal, JobRecord},
    metrics,
    registry::BackboneRegistry,
    Error, Result,
};

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// A step in a job's life, as streamed to clients.
#[derive(Debug, Clone)]
pub struct JobEvent {
    pub job_id: Arc<str>,
    pub state: JobState,
    pub time: SystemTime,
    /// EMBEDDING: distinct inputs embedded so far, and in all.
    pub embedded: u64,
    pub total_inputs: u64,
    /// TRAINING: the epoch just finished and the planned number.
    pub epoch: u32,
    pub total_epochs: u32,
    pub metrics: Option<HeadMetrics>,
    /// SUCCEEDED: the published head.
    pub head: Option<Arc<StoredHead>>,
    /// FAILED or CANCELLED: why.
    pub error: Option<String>,
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
    cancelled: AtomicBool,
    cancel_signal: Notify,
    status: Mutex<JobStatus>,
    events: broadcast::Sender<JobEvent>,
}

struct JobStatus {
    last: JobEvent,
    finished_at: Option<SystemTime>,
}

impl Job {
    fn status(&self) -> MutexGuard<'_, JobStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
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

    /// Records and broadcasts the next event, built from the previous one.
    fn emit(&self, update: impl FnOnce(&mut JobEvent)) {
        let mut status = self.status();
        if status.last.state.is_final() {
            return;
        }
        let mut event = status.last.clone();
        event.time = SystemTime::now();
        update(&mut event);
        if event.state.is_final() {
            status.finished_at = Some(event.time);
        }
        status.last = event.clone();
        // Sent under the lock, so a watcher that subscribes under the same lock
        // sees every later event exactly once.
        let _ = self.events.send(event);
    }

    fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// What the journal keeps of the job.
    fn record(&self) -> JobRecord {
        let status = self.status();
        JobRecord {
            id: self.id.to_string(),
            backbone: self.backbone.clone(),
            head_name: self.head_name.clone(),
            // Only ends are worth telling apart after a restart.
            state: if status.last.state.is_final() {
                status.last.state.as_str()
            } else {
                JobState::Queued.as_str()
            }
            .to_owned(),
            created_at_ms: job_journal::millis(self.created_at),
            finished_at_ms: status.finished_at.map(job_journal::millis),
            error: status.last.error.clone(),
            head_version: status.last.head.as_ref().map(|h| h.meta.version),
            total_epochs: status.last.total_epochs,
        }
    }

    /// A job of an earlier run, from its record; ended, nothing to watch live.
    fn ended(record: &JobRecord, store: &HeadStore) -> Self {
        let id: Arc<str> = Arc::from(record.id.as_str());
        let state = match record.state.as_str() {
            "succeeded" => JobState::Succeeded,
            "cancelled" => JobState::Cancelled,
            _ => JobState::Failed,
        };
        let head = record.head_version.and_then(|version| {
            store
                .get(&crate::head::HeadRef {
                    name: record.head_name.clone(),
                    version: Some(version),
                })
                .ok()
        });
        let finished_at = record.finished_at_ms.map(job_journal::from_millis);
        let (events, _) = broadcast::channel(1);
        Self {
            id: Arc::clone(&id),
            backbone: record.backbone.clone(),
            head_name: record.head_name.clone(),
            created_at: job_journal::from_millis(record.created_at_ms),
            started: Instant::now(),
            cancelled: AtomicBool::new(false),
            cancel_signal: Notify::new(),
            status: Mutex::new(JobStatus {
                last: JobEvent {
                    job_id: id,
                    state,
                    time: finished_at.unwrap_or_else(SystemTime::now),
                    embedded: 0,
                    total_inputs: 0,
                    epoch: 0,
                    total_epochs: record.total_epochs,
                    metrics: head.as_ref().map(|h| h.meta.metrics.clone()),
                    head,
                    error: record.error.clone(),
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
}

pub struct JobManager {
    registry: Arc<BackboneRegistry>,
    store: Arc<HeadStore>,
    limits: JobLimits,
    slots: Arc<Semaphore>,
    /// Jobs in creation order.
    jobs: Mutex<VecDeque<Arc<Job>>>,
    /// Records of every job on disk; None only in tests of the manager itself.
    journal: Option<JobJournal>,
}

/// The reason recorded for jobs still running when the shutdown grace period ends.
pub const SHUT_DOWN: &str =
    "the server shut down before the job finished (grace period over); submit it again";

/// Inputs sent to the backbone queue per submission while embedding a data set:
/// big enough to batch well, small enough to report progress often.
const EMBED_CHUNK: usize = 64;

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
            journal,
        };
        if let Some(journal) = &manager.journal {
            let mut jobs = manager.jobs();
            for record in journal.recover() {
                jobs.push_back(Arc::new(Job::ended(&record, &manager.store)));
            }
            manager.prune(&mut jobs);
        }
        manager.update_state_metrics();
        manager
    }

    fn write_record(&self, job: &Job) {
        if let Some(journal) = &self.journal {
            journal.write(&job.record());
        }
    }

    /// Waits for running jobs until `deadline`, then records those still
    /// running as FAILED (`SHUT_DOWN`) and stops them. For the end of a
    /// graceful shutdown.
    pub async fn finish_or_fail_by(&self, deadline: Instant) {
        loop {
            let running: Vec<Arc<Job>> = self
                .jobs()
                .iter()
                .filter(|job| !job.status().last.state.is_final())
                .cloned()
                .collect();
            if running.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                for job in running {
                    job.cancelled.store(true, Ordering::Relaxed);
                    job.cancel_signal.notify_waiters();
                    job.emit(|event| {
                        event.state = JobState::Failed;
                        event.error = Some(SHUT_DOWN.into());
                    });
                    self.write_record(&job);
                    tracing::warn!(job = %job.id, "training job stopped by the shutdown; recorded as failed");
                }
                self.update_state_metrics();
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn jobs(&self) -> MutexGuard<'_, VecDeque<Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
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
    pub fn submit(
        self: &Arc<Self>,
        request: JobRequest,
    ) -> Result<(Arc<str>, broadcast::Receiver<JobEvent>)> {
        // Fail fast on what can be known now; loading problems surface as FAILED.
        self.registry.get(&request.backbone)?;
        let id: Arc<str> = Arc::from(uuid::Uuid::new_v4().to_string());
        let now = SystemTime::now();
        let (events, receiver) = broadcast::channel(256);
        let job = Arc::new(Job {
            id: Arc::clone(&id),
            backbone: request.backbone.clone(),
            head_name: request.head_name.clone(),
            created_at: now,
            started: Instant::now(),
            cancelled: AtomicBool::new(false),
            cancel_signal: Notify::new(),
            status: Mutex::new(JobStatus {
                last: JobEvent {
                    job_id: Arc::clone(&id),
                    state: JobState::Queued,
                    time: now,
                    embedded: 0,
                    total_inputs: 0,
                    epoch: 0,
                    total_epochs: request.params.epochs as u32,
                    metrics: None,
                    head: None,
                    error: None,
                },
                finished_at: None,
            }),
            events,
        });
        {
            let mut jobs = self.jobs();
            let waiting = jobs
                .iter()
                .filter(|j| !j.status().last.state.is_final())
                .count();
            if waiting >= self.limits.max_concurrent_jobs + self.limits.max_queued_jobs {
                return Err(Error::LimitExceeded(format!(
                    "{waiting} training jobs are queued or running, the limit \
                     (heads.max_concurrent_jobs + heads.max_queued_jobs); retry later"
                )));
            }
            jobs.push_back(Arc::clone(&job));
            self.prune(&mut jobs);
        }
        // On disk before anyone learns the id: a crash from here on is recorded.
        self.write_record(&job);
        // The QUEUED event, for subscribers and metrics.
        let _ = job.events.send(job.status().last.clone());
        self.update_state_metrics();
        tracing::info!(job = %id, backbone = %request.backbone, head = %request.head_name,
            examples = request.examples.len(), "training job queued");
        let manager = Arc::clone(self);
        tokio::spawn(async move { manager.run(job, request).await });
        Ok((id, receiver))
    }

    /// The job's current event and, unless it has ended, a subscription to the
    /// events after it.
    pub fn watch(&self, id: &str) -> Result<(JobEvent, Option<broadcast::Receiver<JobEvent>>)> {
        let job = self.find(id)?;
        let status = job.status();
        let receiver = (!status.last.state.is_final()).then(|| job.events.subscribe());
        Ok((status.last.clone(), receiver))
    }

    /// Asks a job to stop; it ends CANCELLED.
    pub fn cancel(&self, id: &str) -> Result<JobInfo> {
        let job = self.find(id)?;
        if job.status().last.state.is_final() {
            return Err(Error::FailedPrecondition(format!(
                "job {id} has already ended; nothing to cancel"
            )));
        }
        job.cancelled.store(true, Ordering::Relaxed);
        job.cancel_signal.notify_waiters();
        tracing::info!(job = %id, "training job cancellation requested");
        Ok(job.info())
    }

    pub fn list(&self, include_finished: bool) -> Vec<JobInfo> {
        self.jobs()
            .iter()
            .map(|job| job.info())
            .filter(|info| include_finished || !info.last_event.state.is_final())
            .collect()
    }

    /// Forgets the oldest finished jobs beyond the retention limit.
    fn prune(&self, jobs: &mut VecDeque<Arc<Job>>) {
        let finished = jobs
            .iter()
            .filter(|j| j.status().last.state.is_final())
            .count();
        let mut excess = finished.saturating_sub(self.limits.finished_jobs_kept);
        jobs.retain(|job| {
            if excess > 0 && job.status().last.state.is_final() {
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
            *counts.entry(job.status().last.state).or_default() += 1;
        }
        for state in JobState::ALL {
            metrics::set_training_jobs(state.as_str(), counts.get(&state).copied().unwrap_or(0));
        }
    }

    async fn run(self: Arc<Self>, job: Arc<Job>, request: JobRequest) {
        let permit = tokio::select! {
            permit = Arc::clone(&self.slots).acquire_owned() => permit.ok(),
            () = job.cancel_signal.notified() => None,
        };
        let outcome = match permit {
            Some(_permit) if !job.is_cancelled() => self.execute(&job, request).await,
            _ => Err(Error::Cancelled("cancelled while queued".into())),
        };
        let (state, error) = match &outcome {
            Ok(_) => (JobState::Succeeded, None),
            Err(Error::Cancelled(reason)) => (JobState::Cancelled, Some(reason.clone())),
            Err(err) => (JobState::Failed, Some(err.to_string())),
        };
        let head = outcome.ok();
        job.emit(|event| {
            event.state = state;
            event.error = error.clone();
            if let Some(head) = &head {
                event.metrics = Some(head.meta.metrics.clone());
                event.head = Some(Arc::clone(head));
            }
        });
        self.write_record(&job);
        metrics::record_training_job(state.as_str(), job.started.elapsed());
        self.update_state_metrics();
        match &error {
            None => tracing::info!(job = %job.id, "training job succeeded"),
            Some(reason) => tracing::warn!(job = %job.id, state = state.as_str(), reason = %reason,
                "training job ended without a head"),
        }
    }

    async fn execute(&self, job: &Arc<Job>, request: JobRequest) -> Result<Arc<StoredHead>> {
        let loaded = self.registry.get(&request.backbone)?;
        let descriptor = loaded.backbone.descriptor().clone();
        let options = descriptor.default_options;

        // Identical inputs are embedded once.
        let mut distinct: Vec<Input> = Vec::new();
        let mut index_of: HashMap<InputKey, usize> = HashMap::new();
        let mut rows = Vec::with_capacity(request.examples.len());
        let label_index: HashMap<&str, u32> = request
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.as_str(), i as u32))
            .collect();
        let mut labels = Vec::with_capacity(request.examples.len());
        for example in &request.examples {
            let key = InputKey::of(&example.input);
            let next = distinct.len();
            let row = *index_of.entry(key).or_insert_with(|| {
                distinct.push(example.input.clone());
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

        job.emit(|event| {
            event.state = JobState::Embedding;
            event.total_inputs = distinct.len() as u64;
        });
        let mut vectors: Vec<Vec<f32>> = Vec::with_capacity(distinct.len());
        for (chunk_index, chunk) in distinct.chunks(EMBED_CHUNK).enumerate() {
            if job.is_cancelled() {
                return Err(Error::Cancelled("the job was cancelled".into()));
            }
            let backbone = Arc::clone(&loaded.backbone);
            let inputs = chunk.to_vec();
            let offset = chunk_index * EMBED_CHUNK;
            let prepared = tokio::task::spawn_blocking(move || {
                inputs
                    .into_iter()
                    .enumerate()
                    .map(|(i, input)| backbone.prepare(offset + i, input, true))
                    .collect::<Result<Vec<_>>>()
            })
            .await
            .map_err(|err| Error::Inference(format!("preparing examples failed: {err}")))?
            .map_err(|err| match err {
                Error::InvalidInput { index, reason } => {
                    Error::InvalidArgument(format!("distinct example input {index}: {reason}"))
                }
                other => other,
            })?;
            vectors.extend(embed_patiently(&loaded.queue, prepared, options).await?);
            let done = vectors.len() as u64;
            job.emit(|event| event.embedded = done);
        }

        let dim = descriptor.dimension;
        let mut features = Vec::with_capacity(rows.len() * dim);
        for &row in &rows {
            features.extend_from_slice(&vectors[row]);
        }
        let set = TrainingSet {
            features,
            dim,
            labels,
            classes: request.labels.len(),
        };

        job.emit(|event| event.state = JobState::Training);
        let training_job = Arc::clone(job);
        let kind = request.kind.clone();
        let params = request.params.clone();
        let trained = tokio::task::spawn_blocking(move || {
            let total = params.epochs as u32;
            train::train(
                &set,
                &kind,
                &params,
                &training_job.cancelled,
                &mut |metrics: &HeadMetrics| {
                    training_job.emit(|event| {
                        event.epoch = metrics.epoch as u32;
                        event.total_epochs = total;
                        event.metrics = Some(metrics.clone());
                    })
                },
            )
        })
        .await
        .map_err(|err| Error::Inference(format!("training failed: {err}")))??;

        let meta = HeadMetadata {
            name: request.head_name.clone(),
            version: 0,
            backbone: descriptor.name.clone(),
            backbone_fingerprint: descriptor.fingerprint.clone(),
            features: options.into(),
            input_dim: dim,
            labels: request.labels.clone(),
            kind: request.kind.clone(),
            training: request.params.clone(),
            metrics: trained.metrics,
            train_examples: trained.train_examples as u64,
            validation_examples: trained.validation_examples as u64,
            created_at_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        };
        if job.is_cancelled() {
            return Err(Error::Cancelled("the job was cancelled".into()));
        }
        let store = Arc::clone(&self.store);
        let weights = trained.weights;
        tokio::task::spawn_blocking(move || store.publish(meta, weights))
            .await
            .map_err(|err| Error::Storage(format!("publishing failed: {err}")))?
    }
}

/// Bulk work waits for room instead of failing when online traffic fills the
/// queue.
async fn embed_patiently(
    queue: &crate::batching::BackboneQueue,
    prepared: Vec<crate::backbone::Prepared>,
    options: crate::backbone::EmbedOptions,
) -> Result<Vec<Vec<f32>>> {
    let mut backoff = Duration::from_millis(20);
    loop {
        match queue
            .embed(prepared.clone(), options, Priority::Bulk, None)
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
}

impl InputKey {
    fn of(input: &Input) -> Self {
        match input {
            Input::Text(text) => InputKey::Text(text.clone()),
            Input::Image(bytes) => InputKey::Bytes(bytes.clone()),
            Input::Tensor { shape, values } => {
                InputKey::Tensor(shape.clone(), values.iter().map(|v| v.to_bits()).collect())
            }
        }
    }
}
