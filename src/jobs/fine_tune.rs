//! Fine-tuning jobs: the examples tokenized by the serving backbone, the
//! backbone's weights read again as a trainable graph, adapters and head
//! trained on a blocking thread, and the head published with its adapter.

use std::{sync::Arc, time::SystemTime};

use super::{
    job::Job,
    journal,
    run::{distinct_inputs, embed_patiently, example_error, EMBED_CHUNK},
    JobManager, JobRequest, Stage,
};
use crate::{
    backbone::{EmbedOptions, Pooling, Prepared, Want},
    fine_tune::{self, BottomSource, FineTuned, Progress, TextExamples},
    head::{fine_tune::FineTuneParams, store::StoredHead, HeadMetadata},
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
        let prepared = prepare(job, &loaded, &distinct.inputs).await?;
        let tokens: Vec<Vec<u32>> = prepared.iter().map(token_ids).collect();
        let ids: Vec<Vec<u32>> = distinct
            .rows
            .iter()
            .map(|&row| tokens[row].clone())
            .collect();
        // Kept bottoms cost f32 token vectors; beyond the budget the
        // training computes them again for every batch instead.
        let kept_bytes: usize = ids.iter().map(Vec::len).sum::<usize>()
            * descriptor.dimension
            * std::mem::size_of::<f32>();
        let bottoms = if kept_bytes <= self.limits.fine_tune_cache_bytes {
            let split = descriptor.encoder_layers - params.method.layers();
            let rows = hidden_states(job, &loaded, prepared, split).await?;
            BottomSource::Given(distinct.rows.iter().map(|&row| rows[row].clone()).collect())
        } else {
            BottomSource::Compute { budget_bytes: 0 }
        };
        let examples = TextExamples {
            ids,
            labels: distinct.labels,
            classes: request.labels.len(),
        };
        job.emit(Some(Stage::Training), |progress| {
            progress.total_epochs = params.epochs as u32;
        });
        let tuned = self
            .train(job, &request.backbone, (examples, bottoms), params)
            .await?;
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
        self.publish(job, meta, tuned.head, Some(tuned.adapter))
            .await
    }

    /// Runs the training on a blocking thread, reporting every step's loss
    /// and every epoch's metrics.
    async fn train(
        &self,
        job: &Arc<Job>,
        backbone: &str,
        (examples, bottoms): (TextExamples, BottomSource),
        params: FineTuneParams,
    ) -> Result<FineTuned> {
        let registry = Arc::clone(&self.registry);
        let backbone = backbone.to_owned();
        let job = Arc::clone(job);
        run_blocking("fine-tuning a backbone", move || {
            let model = registry.trainable(&backbone)?;
            fine_tune::fine_tune(
                &model.graph,
                &examples,
                &params,
                bottoms,
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

/// The distinct inputs prepared (tokenized) by the backbone, off the runtime.
async fn prepare(
    job: &Job,
    loaded: &LoadedBackbone,
    inputs: &[crate::backbone::Input],
) -> Result<Vec<Prepared>> {
    let mut prepared = Vec::with_capacity(inputs.len());
    for (chunk_index, chunk) in inputs.chunks(EMBED_CHUNK).enumerate() {
        job.check_cancelled()?;
        let items = loaded
            .prepare(chunk.to_vec(), true, chunk_index * EMBED_CHUNK, None)
            .await
            .map_err(example_error)?;
        if items.iter().any(|item| matches!(item, Prepared::Image(_))) {
            return Err(Error::FailedPrecondition(
                "only text backbones can be fine-tuned".into(),
            ));
        }
        prepared.extend(items);
    }
    Ok(prepared)
}

fn token_ids(prepared: &Prepared) -> Vec<u32> {
    match prepared {
        Prepared::Text(text) => text.ids.clone(),
        Prepared::Image(_) => Vec::new(),
    }
}

/// The frozen bottom's token vectors of every prepared input, computed by
/// the serving engine through the backbone's queue at bulk priority (as a
/// frozen-feature job embeds), in chunks, reporting progress.
async fn hidden_states(
    job: &Job,
    loaded: &LoadedBackbone,
    prepared: Vec<Prepared>,
    layers: usize,
) -> Result<Vec<Vec<f32>>> {
    let total = prepared.len() as u64;
    job.emit(Some(Stage::Embedding), |progress| {
        progress.total_inputs = total
    });
    let want = Want::hidden_states(FEATURES, layers);
    let mut rows = Vec::with_capacity(prepared.len());
    for chunk in prepared.chunks(EMBED_CHUNK) {
        job.check_cancelled()?;
        rows.extend(embed_patiently(&loaded.queue, chunk.to_vec(), &want).await?);
        let done = rows.len() as u64;
        job.emit(None, |progress| progress.embedded = done);
    }
    Ok(rows)
}
