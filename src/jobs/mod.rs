//! Training jobs: QUEUED -> EMBEDDING -> TRAINING -> SUCCEEDED | FAILED | CANCELLED.
//!
//! A job runs on the server whether or not anyone watches it. Its examples are
//! embedded through the backbone's queue at bulk priority (so online Embed and
//! Predict traffic keeps its latency), identical inputs only once; the head is
//! trained on a blocking thread and published to the head store. At most
//! `max_concurrent_jobs` run at once; the others wait QUEUED.
//!
//! `model` holds what a job is (request, spec, state, progress, events),
//! `job` one job's status and transitions, `manager` this replica's jobs
//! (submission, queue, watch, list, cancel, sync, drain), `run` one run of a
//! job and `fine_tune` a fine-tuning run; `journal` keeps the records in the
//! shared store, `remote` answers for other replicas' jobs from them,
//! `takeover` runs again the jobs of replicas that are gone, and `replica`
//! holds this process's name among replicas.

mod fine_tune;
mod job;
pub mod journal;
mod manager;
mod model;
mod remote;
pub mod replica;
mod run;
mod takeover;

pub use crate::datasets::Example;
pub use manager::{JobLimits, JobManager, SHUT_DOWN};
pub use model::{JobEvent, JobInfo, JobRequest, JobSpec, JobState, Progress, Stage};
