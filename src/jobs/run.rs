//! Running one job once it is admitted: it waits for a slot, embeds its
//! distinct inputs through the backbone's queue at bulk priority, trains
//! the head on a blocking thread (or fine-tunes, `fine_tune`), publishes it,
//! and records its end in the store and the metrics before announcing it.

use std::{
    collections::HashMap,
    sync::{atomic::Ordering, Arc},
    time::{Duration, SystemTime},
};

use super::{job::Job, journal, JobManager, JobRequest, Stage};
use crate::{
    backbone::{Adapter, EmbedOptions, Input, Prepared, Want},
    batching::{BackboneQueue, Priority},
    head::{
        model::HeadWeights,
        store::StoredHead,
        train::{self, TrainedHead, TrainingSet},
        HeadMetadata, HeadMetrics,
    },
    metrics,
    registry::LoadedBackbone,
    task::run_blocking,
    Error, Result,
};

/// Inputs sent to the backbone queue per submission while embedding a data set:
/// big enough to batch well, small enough to report progress often.
pub(super) const EMBED_CHUNK: usize = 64;

/// A job's examples with identical inputs merged: each distinct input is
/// embedded once, and `rows` maps every example to its input.
pub(super) struct DistinctInputs {
    pub(super) inputs: Vec<Input>,
    pub(super) rows: Vec<usize>,
    /// Each example's label, as its index in the head's label list.
    pub(super) labels: Vec<u32>,
}

impl JobManager {
    /// Runs an admitted job to its end: waits for a slot (or its cancel),
    /// executes it, then records the end in the store and the metrics before
    /// announcing it, unless another replica took the job over meanwhile.
    pub(super) async fn run(self: Arc<Self>, job: Arc<Job>, request: JobRequest) {
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
    pub(super) async fn publish(
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
pub(super) fn distinct_inputs(request: &JobRequest) -> Result<DistinctInputs> {
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

/// An input that cannot be prepared fails the job as an invalid argument,
/// naming it among the job's distinct inputs.
pub(super) fn example_error(err: Error) -> Error {
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
pub(super) async fn embed_patiently(
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
