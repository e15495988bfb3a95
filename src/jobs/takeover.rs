//! Jobs outlive their replica: a job whose replica stopped (its lease ran
//! out, or it released the job when drained), or that this replica ran
//! before a restart, is claimed by one replica (a create in the store decides
//! which) and run again from the start on its stored dataset, up to
//! `heads.job_attempts` runs; then it is recorded FAILED with the reason.
//! Each run's first event says why it is not the first.

use std::sync::{atomic::Ordering, Arc};

use super::{
    job::{Job, Run},
    journal::{self, Interruption, JobRecord, Written},
    JobManager, JobSpec,
};
use crate::metrics;

impl JobManager {
    /// Takes over every job that is this replica's to take over; a job whose
    /// backbone is not ready here is left for the next scan (or another
    /// replica).
    pub(super) async fn take_over(self: &Arc<Self>) {
        if self.closing.load(Ordering::Acquire) {
            return;
        }
        let records = match self.journal.all().await {
            Ok(records) => records,
            Err(err) => {
                tracing::warn!(error = %err, "cannot list jobs to take over");
                return;
            }
        };
        for record in records {
            let local = self.local(&record.id).is_some();
            let Some(interruption) = self.journal.interruption(&record, local) else {
                continue;
            };
            if self.registry.get(&record.backbone).is_err() {
                continue;
            }
            let attempt = record.progress.attempt.max(1) + 1;
            match self.journal.claim(&record.id, attempt).await {
                Ok(true) => self.take(record, interruption, attempt).await,
                Ok(false) => {}
                Err(err) => tracing::warn!(job = %record.id, error = %err, "cannot claim a job"),
            }
        }
    }

    /// Runs a claimed job again, or ends it when no run is left.
    async fn take(self: &Arc<Self>, record: JobRecord, why: Interruption, attempt: u32) {
        let max = self.limits.job_attempts;
        let (Some(spec), Some(dataset)) = (record.spec.clone(), record.dataset.clone()) else {
            return self.give_up(record, why.reason, attempt).await;
        };
        if attempt > max {
            let reason = match max {
                1 => why.reason,
                _ => format!(
                    "{} (it ran {max} times, as heads.job_attempts allows)",
                    why.reason
                ),
            };
            return self.give_up(record, reason, attempt).await;
        }
        let examples = match self.datasets.examples(&dataset).await {
            Ok(examples) => examples,
            Err(err) => {
                tracing::error!(job = %record.id, error = %err, "a taken-over job's examples are unreadable");
                let reason = format!("{}; its examples could not be read again", why.reason);
                return self.give_up(record, reason, attempt).await;
            }
        };
        let note = format!(
            "{}; run {attempt} of {max} on replica {}",
            why.what,
            self.journal.owner()
        );
        tracing::warn!(job = %record.id, attempt, note = %note, "training job taken over");
        metrics::record_takeover("rerun");
        let run = Run {
            attempt,
            note: Some(note),
            created_at: journal::from_millis(record.created_at_ms),
        };
        self.resume(&record, spec, examples, dataset, run).await;
    }

    /// Starts run `run` of the job of `record` here.
    async fn resume(
        self: &Arc<Self>,
        record: &JobRecord,
        spec: JobSpec,
        examples: Vec<super::Example>,
        dataset: String,
        run: Run,
    ) {
        let request = spec.into_request(examples, dataset.clone());
        let job = Arc::new(Job::new(
            Arc::from(record.id.as_str()),
            &request,
            dataset,
            run,
        ));
        self.jobs().push_back(Arc::clone(&job));
        self.start(job, request).await;
    }

    /// Records a job FAILED for `reason` as run `attempt` (claimed, never
    /// run), lists it here, and frees its examples. A replica still running
    /// it (its lease ran out while it was alive) sees the end in the store
    /// and stops.
    async fn give_up(&self, mut record: JobRecord, reason: String, attempt: u32) {
        record.state = super::JobState::Failed;
        record.error = Some(reason.clone());
        record.finished_at_ms = Some(journal::millis(std::time::SystemTime::now()));
        if let Written::Superseded(_) = self.journal.write(&record, attempt, false).await {
            // It ended meanwhile, on the replica that ran it.
            return;
        }
        tracing::warn!(job = %record.id, head = %record.head_name, error = %reason,
            "training job did not finish; recorded as failed");
        if let Some(dataset) = &record.dataset {
            self.datasets.remove(dataset).await;
        }
        let pruned = {
            let mut jobs = self.jobs();
            jobs.push_back(Arc::new(Job::ended(&record, &self.store)));
            self.prune(&mut jobs)
        };
        self.forget(pruned).await;
        let lifetime = std::time::SystemTime::now()
            .duration_since(journal::from_millis(record.created_at_ms))
            .unwrap_or_default();
        metrics::record_training_job("failed", lifetime);
        metrics::record_takeover("failed");
        self.update_state_metrics();
    }
}
