//! What a job is, as clients and records see it: the request, the spec a
//! record keeps to run the job again, its state and stage, its progress, its
//! events and the summary that ListJobs shows. The serialized ones (spec,
//! state, progress) are parts of a job's record in the shared store
//! (`journal`), which every replica reads.

use std::{sync::Arc, time::SystemTime};

use serde::{Deserialize, Serialize};

use super::{journal::JobRecord, Example};
use crate::head::{
    fine_tune::FineTuneParams, store::StoredHead, HeadKind, HeadMetrics, TrainingParams,
};

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
    pub(super) fn of(request: &JobRequest) -> Self {
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
    pub(super) fn into_request(self, examples: Vec<Example>, dataset: String) -> JobRequest {
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

    pub(super) const ALL: [JobState; 6] = [
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
    pub(super) fn of_record(record: &JobRecord, head: Option<Arc<StoredHead>>) -> Self {
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
