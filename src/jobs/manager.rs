//! This replica's jobs: submission within the queue's bounds (in all and
//! per namespace), watching, listing and cancelling a job of any replica,
//! the sync of records and leases with the shared store, and the drain. At
//! most `max_concurrent_jobs` run at once; the others wait QUEUED.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::{broadcast, Semaphore};

use super::{
    job::{Job, Run},
    journal::{JobJournal, JobRecord, Written},
    remote, JobEvent, JobInfo, JobRequest, JobState, Stage,
};
use crate::{
    backbone::BackboneDescriptor,
    datasets::DatasetStore,
    head::{
        fine_tune::{FineTuneParams, Method, DEFAULT_TOP_LAYERS},
        namespace::{at_share, describe, namespace_of},
        store::HeadStore,
    },
    metrics,
    registry::BackboneRegistry,
    sync::lock,
    Error, Result,
};

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

/// This replica's jobs, and through the journal every other replica's.
pub struct JobManager {
    pub(super) registry: Arc<BackboneRegistry>,
    pub(super) store: Arc<HeadStore>,
    pub(super) datasets: Arc<DatasetStore>,
    pub(super) limits: JobLimits,
    pub(super) slots: Arc<Semaphore>,
    /// This replica's jobs in creation order.
    pub(super) jobs: Mutex<VecDeque<Arc<Job>>>,
    /// Every job's record, in the shared store.
    pub(super) journal: Arc<JobJournal>,
    /// Set when a drain starts: no new jobs, none taken over.
    pub(super) closing: AtomicBool,
}

/// The reason recorded for jobs still running when the shutdown grace period ends.
pub const SHUT_DOWN: &str =
    "the server shut down before the job finished (grace period over); submit it again";

/// How often an owner writes its running jobs' records when they changed
/// and looks for cancel requests from other replicas.
const SYNC_EVERY: Duration = Duration::from_secs(1);

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
    pub(super) async fn write_record(&self, job: &Arc<Job>) {
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

    pub(super) fn jobs(&self) -> MutexGuard<'_, VecDeque<Arc<Job>>> {
        lock(&self.jobs)
    }

    /// One of this replica's jobs.
    pub(super) fn local(&self, id: &str) -> Option<Arc<Job>> {
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
    pub(super) async fn start(self: &Arc<Self>, job: Arc<Job>, request: JobRequest) {
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
    pub(super) fn prune(&self, jobs: &mut VecDeque<Arc<Job>>) -> Vec<Arc<str>> {
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
    pub(super) async fn forget(&self, ids: Vec<Arc<str>>) {
        for id in ids {
            self.journal.remove(&id).await;
        }
    }

    /// Sets the gauges of jobs by state from this replica's table.
    pub(super) fn update_state_metrics(&self) {
        let mut counts: HashMap<JobState, usize> = HashMap::new();
        for job in self.jobs().iter() {
            *counts.entry(job.state()).or_default() += 1;
        }
        for state in JobState::ALL {
            metrics::set_training_jobs(state.as_str(), counts.get(&state).copied().unwrap_or(0));
        }
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
