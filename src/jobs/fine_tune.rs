//! Fine-tuning jobs: the examples tokenized by the serving backbone, the
//! backbone's weights read again as a trainable graph, adapters and head
//! trained on a blocking thread, and the head published with its adapter.

use std::{sync::Arc, time::SystemTime};

use super::{distinct_inputs, journal, Job, JobManager, JobRequest, Stage, EMBED_CHUNK};
use crate::{
    backbone::{EmbedOptions, Pooling, Prepared},
    head::{
        finetune::{self, FineTuneParams, FineTuned, Progress, TextExamples},
        store::StoredHead,
        HeadMetadata,
    },
    registry::LoadedBackbone,
    task::run_blocking,
    Error, Result,
};

/// The features a fine-tuned head is trained on and served with: the mean of
/// the adapted token vectors, at unit length.
pub const FEATURES: EmbedOptions = EmbedOptions {
    pooling: Pooling::Mean,
    normalize: true,
};

impl JobManager {
    /// Fine-tunes the backbone's top layers and a head, and publishes both.
    pub(super) async fn fine_tune(
        &self,
        job: &Arc<Job>,
        request: JobRequest,
        params: FineTuneParams,
    ) -> Result<Arc<StoredHead>> {
        let loaded = self.registry.get(&request.backbone)?;
        let descriptor = loaded.backbone.descriptor().clone();
        let distinct = distinct_inputs(&request)?;
        let tokens = tokenize(job, &loaded, &distinct.inputs).await?;
        let examples = TextExamples {
            ids: distinct
                .rows
                .iter()
                .map(|&row| tokens[row].clone())
                .collect(),
            labels: distinct.labels,
            classes: request.labels.len(),
        };
        job.emit(Some(Stage::Training), |progress| {
            progress.total_epochs = params.epochs as u32;
        });
        let tuned = self.train(job, &request.backbone, examples, params).await?;
        job.check_cancelled()?;
        let (training, tuning) = params.record();
        let meta = HeadMetadata {
            name: request.head_name.clone(),
            version: 0,
            backbone: descriptor.name.clone(),
            backbone_fingerprint: descriptor.fingerprint.clone(),
            features: FEATURES.into(),
            input_dim: descriptor.dimension,
            labels: request.labels.clone(),
            kind: request.kind.clone(),
            training,
            metrics: tuned.metrics,
            train_examples: tuned.train_examples as u64,
            validation_examples: tuned.validation_examples as u64,
            created_at_ms: journal::millis(SystemTime::now()),
            fine_tuning: Some(tuning),
        };
        self.publish(meta, tuned.head, Some(tuned.adapter)).await
    }

    /// Runs the training on a blocking thread, reporting every step's loss
    /// and every epoch's metrics.
    async fn train(
        &self,
        job: &Arc<Job>,
        backbone: &str,
        examples: TextExamples,
        params: FineTuneParams,
    ) -> Result<FineTuned> {
        let registry = Arc::clone(&self.registry);
        let backbone = backbone.to_owned();
        let budget = self.limits.fine_tune_cache_bytes;
        let job = Arc::clone(job);
        run_blocking("fine-tuning a backbone", move || {
            let model = registry.trainable(&backbone)?;
            finetune::fine_tune(
                &model.graph,
                &examples,
                &params,
                budget,
                &job.cancel,
                &mut |progress| report(&job, progress),
            )
        })
        .await?
    }
}

fn report(job: &Job, progress: &Progress) {
    match progress {
        Progress::Step { step, steps, loss } => job.emit(None, |p| {
            p.step = *step as u32;
            p.total_steps = *steps as u32;
            p.step_loss = Some(*loss);
        }),
        Progress::Epoch(metrics) => job.emit(None, |p| {
            // An epoch's event is not a step's.
            p.step_loss = None;
            p.epoch = metrics.epoch as u32;
            p.metrics = Some(metrics.clone());
        }),
    }
}

/// The distinct inputs as token ids of the backbone's tokenizer, in chunks
/// off the runtime, reporting progress as the embedding stage does.
async fn tokenize(
    job: &Job,
    loaded: &LoadedBackbone,
    inputs: &[crate::backbone::Input],
) -> Result<Vec<Vec<u32>>> {
    job.emit(Some(Stage::Embedding), |progress| {
        progress.total_inputs = inputs.len() as u64
    });
    let mut tokens = Vec::with_capacity(inputs.len());
    for (chunk_index, chunk) in inputs.chunks(EMBED_CHUNK).enumerate() {
        job.check_cancelled()?;
        let prepared = loaded
            .prepare(chunk.to_vec(), true, chunk_index * EMBED_CHUNK, None)
            .await
            .map_err(super::example_error)?;
        for item in prepared {
            match item {
                Prepared::Text(text) => tokens.push(text.ids),
                Prepared::Image(_) => {
                    return Err(Error::FailedPrecondition(
                        "only text backbones can be fine-tuned".into(),
                    ))
                }
            }
        }
        let done = tokens.len() as u64;
        job.emit(None, |progress| progress.embedded = done);
    }
    Ok(tokens)
}
