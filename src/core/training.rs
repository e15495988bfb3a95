//! Training-job submission and dataset upload: every training parameter's
//! default and bound in one place, labels checked, examples bounded.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use tokio::sync::broadcast;

use super::{
    fine_tune::{fine_tune_params, FineTuningOptions},
    inputs::check_input,
    Scope,
};
use crate::{
    backbone::{BackboneDescriptor, Input, Modality},
    config::{is_valid_name, HeadsConfig},
    datasets::{Dataset, DatasetStore, InputKinds, PendingUpload},
    head::{fine_tune::FineTuneParams, HeadKind, Solver, TrainingParams},
    jobs::{Example, JobEvent, JobInfo, JobManager, JobRequest},
    registry::BackboneRegistry,
    Error, Result,
};

/// The head a client asks for; `None` takes the default.
#[derive(Debug, Clone, PartialEq)]
pub enum HeadSpec {
    Linear,
    Mlp {
        hidden_size: Option<usize>,
        dropout: f32,
    },
}

/// Training options as a client gives them; `None` takes the default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainingOptions {
    /// None: L-BFGS for a linear head unless a mini-batch option (epochs,
    /// learning rate, batch size, weight decay, validation fraction, early
    /// stopping) is given; AdamW otherwise.
    pub solver: Option<Solver>,
    pub epochs: Option<usize>,
    pub learning_rate: Option<f64>,
    pub batch_size: Option<usize>,
    pub weight_decay: Option<f64>,
    pub validation_fraction: Option<f64>,
    /// Train on every example and report no validation metrics.
    pub no_validation: bool,
    /// None: 10 when early stopping chooses the epochs, else never.
    pub early_stopping_patience: Option<usize>,
    /// L-BFGS: the L2 penalty; None: chosen by cross-validation.
    pub l2: Option<f64>,
    /// L-BFGS: folds of the cross-validation.
    pub cv_folds: Option<usize>,
    pub balance_classes: bool,
    pub seed: u64,
    /// Fine-tuning: encoder layers to train in full with the head (0: none).
    pub unfreeze_top_layers: usize,
    /// Fine-tune LoRA adapters of the backbone with the head; None: train on
    /// frozen features.
    pub fine_tuning: Option<FineTuningOptions>,
}

/// Where a job's examples come from.
#[derive(Debug, Clone)]
pub enum TrainingData {
    Examples(Vec<RawExample>),
    /// An id from a finished upload.
    Dataset(String),
}

/// An example as it arrived: its input, or why the transport could not
/// decode one.
#[derive(Debug, Clone)]
pub struct RawExample {
    pub input: Result<Input, String>,
    pub label: String,
}

/// What a client asks TrainHead for.
#[derive(Debug, Clone)]
pub struct TrainRequest {
    pub backbone: String,
    pub head_name: String,
    pub head: Option<HeadSpec>,
    pub options: TrainingOptions,
    pub data: Option<TrainingData>,
    /// The head's label order; empty: the sorted distinct labels.
    pub labels: Vec<String>,
}

/// The bounds and defaults of every training parameter.
pub mod bounds {
    /// Most epochs of one job.
    pub const MAX_EPOCHS: usize = 10_000;
    /// AdamW without given epochs: at most this many, early stopping picks.
    pub const DEFAULT_MAX_EPOCHS: usize = 200;
    /// AdamW without given epochs: epochs without a better validation loss
    /// before the run stops.
    pub const DEFAULT_EARLY_STOPPING_PATIENCE: usize = 10;
    /// Learning rates are in (0, MAX_LEARNING_RATE].
    pub const MAX_LEARNING_RATE: f64 = 10.0;
    /// AdamW's peak learning rate.
    pub const DEFAULT_LEARNING_RATE: f64 = 1e-3;
    /// Largest mini-batch.
    pub const MAX_BATCH_SIZE: usize = 65_536;
    pub const DEFAULT_BATCH_SIZE: usize = 32;
    /// Weight decay is in [0, MAX_WEIGHT_DECAY].
    pub const MAX_WEIGHT_DECAY: f64 = 1.0;
    /// AdamW's decoupled weight decay for MLP heads when none is given
    /// (linear heads get none: their penalty is L-BFGS's `l2`).
    pub const DEFAULT_MLP_WEIGHT_DECAY: f64 = 1e-2;
    /// The validation share is in [0, MAX_VALIDATION_FRACTION].
    pub const MAX_VALIDATION_FRACTION: f64 = 0.5;
    pub const DEFAULT_VALIDATION_FRACTION: f64 = 0.1;
    /// L-BFGS penalties are in (0, MAX_L2].
    pub const MAX_L2: f64 = 1e4;
    /// Cross-validation folds are in [2, MAX_CV_FOLDS].
    pub const MAX_CV_FOLDS: usize = 20;
    pub const DEFAULT_CV_FOLDS: usize = 5;
    /// Hidden width of an MLP head when none is given.
    pub const DEFAULT_MLP_HIDDEN: usize = 256;
    /// Widest MLP hidden layer.
    pub const MAX_MLP_HIDDEN: usize = 8192;
}

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidArgument(message.into())
}

/// The head's architecture with defaults applied and bounds checked.
pub fn head_kind(spec: Option<HeadSpec>) -> Result<HeadKind> {
    match spec {
        None | Some(HeadSpec::Linear) => Ok(HeadKind::Linear),
        Some(HeadSpec::Mlp {
            hidden_size,
            dropout,
        }) => {
            let hidden_size = hidden_size.unwrap_or(bounds::DEFAULT_MLP_HIDDEN);
            if hidden_size > bounds::MAX_MLP_HIDDEN {
                return Err(invalid(format!(
                    "mlp.hidden_size must be at most {}",
                    bounds::MAX_MLP_HIDDEN
                )));
            }
            if !(dropout.is_finite() && (0.0..1.0).contains(&dropout)) {
                return Err(invalid("mlp.dropout must be in [0, 1)"));
            }
            Ok(HeadKind::Mlp {
                hidden_size,
                dropout,
            })
        }
    }
}

/// Training parameters with the documented defaults applied and the ranges
/// checked.
pub fn training_params(options: &TrainingOptions, kind: &HeadKind) -> Result<TrainingParams> {
    let base = TrainingParams {
        solver: solver(options, kind)?,
        balance_classes: options.balance_classes,
        seed: options.seed,
        cv_folds: 0,
        ..TrainingParams::default()
    };
    match base.solver {
        Solver::Lbfgs => lbfgs_params(options, base),
        Solver::Adamw => adamw_params(options, kind, base),
    }
}

/// The names of the AdamW options a client set.
fn minibatch_options(options: &TrainingOptions) -> Vec<&'static str> {
    [
        ("epochs", options.epochs.is_some()),
        ("learning_rate", options.learning_rate.is_some()),
        ("batch_size", options.batch_size.is_some()),
        ("weight_decay", options.weight_decay.is_some()),
        ("validation_fraction", options.validation_fraction.is_some()),
        (
            "early_stopping_patience",
            options.early_stopping_patience.is_some(),
        ),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect()
}

/// The solver asked for, or the one the head and options call for.
fn solver(options: &TrainingOptions, kind: &HeadKind) -> Result<Solver> {
    let minibatch = minibatch_options(options);
    match (options.solver, kind) {
        (Some(Solver::Lbfgs), HeadKind::Mlp { .. }) => Err(invalid(
            "solver lbfgs trains linear heads; an MLP head trains with adamw",
        )),
        (Some(Solver::Lbfgs), _) if !minibatch.is_empty() => Err(invalid(format!(
            "{} belong to solver adamw, not lbfgs",
            minibatch.join(", ")
        ))),
        (Some(solver), _) => Ok(solver),
        (None, HeadKind::Linear) if minibatch.is_empty() => Ok(Solver::Lbfgs),
        (None, _) => Ok(Solver::Adamw),
    }
}

fn lbfgs_params(options: &TrainingOptions, base: TrainingParams) -> Result<TrainingParams> {
    use bounds::*;
    let l2 = options.l2.unwrap_or(0.0);
    if options.l2.is_some() && !(l2.is_finite() && l2 > 0.0 && l2 <= MAX_L2) {
        return Err(invalid(format!("l2 must be in (0, {MAX_L2}]")));
    }
    let cv_folds = match (options.no_validation, options.cv_folds) {
        (true, Some(_)) => return Err(invalid("cv_folds and no_validation contradict each other")),
        (true, None) => 0,
        (false, folds) => folds.unwrap_or(DEFAULT_CV_FOLDS),
    };
    if !options.no_validation && !(2..=MAX_CV_FOLDS).contains(&cv_folds) {
        return Err(invalid(format!("cv_folds must be in [2, {MAX_CV_FOLDS}]")));
    }
    Ok(TrainingParams {
        l2,
        cv_folds,
        ..base
    })
}

fn adamw_params(
    options: &TrainingOptions,
    kind: &HeadKind,
    base: TrainingParams,
) -> Result<TrainingParams> {
    use bounds::*;
    if options.l2.is_some() || options.cv_folds.is_some() {
        return Err(invalid("l2 and cv_folds belong to solver lbfgs, not adamw"));
    }
    let epochs = options.epochs.unwrap_or(DEFAULT_MAX_EPOCHS);
    if epochs > MAX_EPOCHS {
        return Err(invalid(format!("epochs must be at most {MAX_EPOCHS}")));
    }
    let learning_rate = options.learning_rate.unwrap_or(DEFAULT_LEARNING_RATE);
    if !(learning_rate.is_finite() && learning_rate > 0.0 && learning_rate <= MAX_LEARNING_RATE) {
        return Err(invalid(format!(
            "learning_rate must be in (0, {MAX_LEARNING_RATE}]"
        )));
    }
    let batch_size = options.batch_size.unwrap_or(DEFAULT_BATCH_SIZE);
    if batch_size > MAX_BATCH_SIZE {
        return Err(invalid(format!(
            "batch_size must be at most {MAX_BATCH_SIZE}"
        )));
    }
    let weight_decay = options.weight_decay.unwrap_or(match kind {
        HeadKind::Linear => 0.0,
        HeadKind::Mlp { .. } => DEFAULT_MLP_WEIGHT_DECAY,
    });
    if !(weight_decay.is_finite() && (0.0..=MAX_WEIGHT_DECAY).contains(&weight_decay)) {
        return Err(invalid(format!(
            "weight_decay must be in [0, {MAX_WEIGHT_DECAY}]"
        )));
    }
    let validation_fraction = if options.no_validation {
        0.0
    } else {
        options
            .validation_fraction
            .unwrap_or(DEFAULT_VALIDATION_FRACTION)
    };
    if !(validation_fraction.is_finite()
        && (0.0..=MAX_VALIDATION_FRACTION).contains(&validation_fraction))
    {
        return Err(invalid(format!(
            "validation_fraction must be in [0, {MAX_VALIDATION_FRACTION}]"
        )));
    }
    // Without given epochs, early stopping on the held-out rows picks them
    // and a refit then trains on every row; given epochs are run as asked.
    let chosen_epochs = options.epochs.is_none() && validation_fraction > 0.0;
    let default_patience = if chosen_epochs {
        DEFAULT_EARLY_STOPPING_PATIENCE
    } else {
        0
    };
    Ok(TrainingParams {
        epochs,
        learning_rate,
        batch_size,
        weight_decay,
        validation_fraction,
        early_stopping_patience: options.early_stopping_patience.unwrap_or(default_patience),
        refit: chosen_epochs,
        ..base
    })
}

/// How many examples each label has.
fn label_counts(examples: &[Example]) -> BTreeMap<&str, u64> {
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    for example in examples {
        *counts.entry(example.label.as_str()).or_default() += 1;
    }
    counts
}

/// Refuses a set that cross-validation cannot split: a label with a single
/// example would be missing from the data of the fold that validates it.
fn check_label_counts(counts: &BTreeMap<&str, u64>, params: &TrainingParams) -> Result<()> {
    if params.solver != Solver::Lbfgs || params.cv_folds == 0 {
        return Ok(());
    }
    match counts.iter().find(|(_, &count)| count == 1) {
        Some((label, _)) => Err(invalid(format!(
            "label `{label}` has a single example: the default training \
             cross-validates, which needs at least two examples of each label; \
             add examples, or set no_validation to train on every example with \
             a fixed penalty"
        ))),
        None => Ok(()),
    }
}

/// Bytes an example holds in memory once decoded.
fn decoded_bytes(example: &Example) -> usize {
    use std::mem::size_of;
    let input = match &example.input {
        Input::Text(text) => text.len(),
        Input::Image(bytes) => bytes.len(),
        Input::Tensor { shape, values } => {
            shape.len() * size_of::<usize>() + values.len() * size_of::<f32>()
        }
        Input::TokenIds(ids) => ids.len() * size_of::<u32>(),
    };
    size_of::<Example>() + example.label.len() + input
}

/// Refuses a backbone that cannot take inputs of `kinds`.
fn check_backbone_takes(backbone: &BackboneDescriptor, kinds: &InputKinds) -> Result<()> {
    let side = backbone.image_size;
    let takes = match (backbone.modality, kinds) {
        (Modality::Text, InputKinds::Text) => true,
        (Modality::Image, InputKinds::Images { tensor_shape }) => tensor_shape
            .as_ref()
            .is_none_or(|shape| shape[..] == [3, side, side]),
        _ => false,
    };
    if takes {
        return Ok(());
    }
    let what = match kinds {
        InputKinds::Text => "texts".to_owned(),
        InputKinds::Images { tensor_shape: None } => "images".to_owned(),
        InputKinds::Images {
            tensor_shape: Some(shape),
        } => format!("tensors of shape {shape:?}"),
    };
    Err(invalid(format!(
        "the dataset holds {what}, which backbone `{}` cannot take",
        backbone.name
    )))
}

/// Starts training jobs and keeps uploaded datasets for them.
pub struct Trainer {
    jobs: Arc<JobManager>,
    /// For the backbone a dataset is meant for, before its examples are read.
    registry: Arc<BackboneRegistry>,
    datasets: Arc<DatasetStore>,
    limits: HeadsConfig,
    /// limits.max_text_chars, for the examples' texts.
    max_text_chars: usize,
}

/// A request's head and parameters, checked.
struct JobPlan {
    kind: HeadKind,
    params: TrainingParams,
    fine_tune: Option<FineTuneParams>,
}

/// A dataset upload in progress: examples are checked, counted and their
/// bytes reserved as they arrive.
pub struct Upload {
    pending: PendingUpload,
    examples: Vec<Example>,
    /// What the examples so far are; a backbone takes one kind.
    inputs: Option<InputKinds>,
}

impl Trainer {
    pub fn new(
        jobs: Arc<JobManager>,
        registry: Arc<BackboneRegistry>,
        datasets: Arc<DatasetStore>,
        limits: HeadsConfig,
        max_text_chars: usize,
    ) -> Self {
        Self {
            jobs,
            registry,
            datasets,
            limits,
            max_text_chars,
        }
    }

    /// Submits a job; returns its id and a subscription to its events. A
    /// refused request leaves an uploaded dataset it named usable for the next.
    pub async fn train(
        &self,
        request: TrainRequest,
        scope: &Scope,
    ) -> Result<(Arc<str>, broadcast::Receiver<JobEvent>)> {
        let plan = self.plan(&request)?;
        scope.check(&request.head_name)?;
        let mut request = request;
        let data = request.data.take();
        let (examples, dataset) = self.resolve_data(data, &request, &plan.params).await?;
        let checked = {
            let counts = label_counts(&examples);
            check_label_counts(&counts, &plan.params)
                .and_then(|()| self.labels(request.labels, &counts))
        };
        let submitted = match checked {
            Ok(labels) => {
                let job = JobRequest {
                    backbone: request.backbone,
                    head_name: request.head_name,
                    kind: plan.kind,
                    params: plan.params,
                    examples,
                    labels,
                    fine_tune: plan.fine_tune,
                    dataset: dataset.clone(),
                };
                self.jobs.submit(job).await
            }
            Err(err) => Err(err),
        };
        if submitted.is_err() {
            if let Some(dataset) = dataset {
                self.datasets.restore(&dataset).await;
            }
        }
        submitted
    }

    /// Everything about a request that can be checked without its data.
    fn plan(&self, request: &TrainRequest) -> Result<JobPlan> {
        if request.backbone.is_empty() {
            return Err(invalid("backbone is empty"));
        }
        if !is_valid_name(&request.head_name) {
            return Err(invalid(format!(
                "head_name `{}` is not valid: 1-64 letters, digits, '-', '_' or '.'",
                request.head_name
            )));
        }
        let kind = head_kind(request.head.clone())?;
        let mut options = request.options.clone();
        // `unfreeze_top_layers: N` alone is `fine_tuning.top_layers.layers: N`.
        if options.fine_tuning.is_none() && options.unfreeze_top_layers > 0 {
            let layers = std::mem::take(&mut options.unfreeze_top_layers);
            options.fine_tuning = Some(FineTuningOptions::top_layers(layers));
        }
        if let Some(tuning) = &options.fine_tuning {
            let fine_tune = fine_tune_params(tuning, &options, &kind)?;
            let (params, _) = fine_tune.record();
            return Ok(JobPlan {
                kind,
                params,
                fine_tune: Some(fine_tune),
            });
        }
        let params = training_params(&request.options, &kind)?;
        Ok(JobPlan {
            kind,
            params,
            fine_tune: None,
        })
    }

    /// The job's examples, and the id of the uploaded dataset they were
    /// taken from.
    async fn resolve_data(
        &self,
        data: Option<TrainingData>,
        request: &TrainRequest,
        params: &TrainingParams,
    ) -> Result<(Vec<Example>, Option<String>)> {
        match data {
            None => Err(invalid("no training data: give examples or a dataset_id")),
            Some(TrainingData::Examples(raw)) => {
                self.check_example_count(raw.len())?;
                Ok((self.examples(raw, 0)?, None))
            }
            Some(TrainingData::Dataset(id)) => {
                self.check_waiting_dataset(&id, request, params).await?;
                let examples = self.datasets.take(&id).await?;
                Ok((examples, Some(id)))
            }
        }
    }

    /// What a dataset's meta decides, checked before its examples are read:
    /// a client that retries a refused request does not make the server
    /// read them again each time.
    async fn check_waiting_dataset(
        &self,
        id: &str,
        request: &TrainRequest,
        params: &TrainingParams,
    ) -> Result<()> {
        let waiting = self.datasets.waiting(id).await?;
        if let Some(inputs) = &waiting.inputs {
            let loaded = self.registry.get(&request.backbone)?;
            check_backbone_takes(loaded.backbone.descriptor(), inputs)?;
        }
        let counts: BTreeMap<&str, u64> = waiting
            .label_counts
            .iter()
            .map(|(label, &count)| (label.as_str(), count))
            .collect();
        check_label_counts(&counts, params)?;
        self.labels(request.labels.clone(), &counts).map(|_| ())
    }

    /// Starts a dataset upload, if a slot is free in the store and in the
    /// caller's namespace's share.
    pub async fn begin_upload(&self, scope: &Scope) -> Result<Upload> {
        Ok(Upload {
            pending: self.datasets.begin_upload(scope.quota_namespace()).await?,
            examples: Vec::new(),
            inputs: None,
        })
    }

    /// How long an upload may stay silent before it is ended.
    pub fn upload_idle_timeout(&self) -> std::time::Duration {
        self.limits.upload_idle_timeout()
    }

    /// Adds one chunk of an upload; `bytes` is its size on the wire. The
    /// upload holds what the examples take in memory, which for small ones is
    /// many times their wire size; examples of inputs no one backbone could
    /// take together are refused.
    pub fn add_to_upload(
        &self,
        upload: &mut Upload,
        chunk: Vec<RawExample>,
        bytes: usize,
    ) -> Result<()> {
        self.check_example_count(upload.examples.len() + chunk.len())?;
        let offset = upload.examples.len();
        // The chunk is decoded already; converting moves it (tensor shapes
        // are bounded in rank on the way).
        let converted = self.examples(chunk, offset)?;
        let decoded: usize = converted.iter().map(decoded_bytes).sum();
        upload.pending.reserve(decoded.max(bytes))?;
        for (i, example) in converted.iter().enumerate() {
            let this = InputKinds::of(&example.input);
            let merged = match upload.inputs.take() {
                None => Ok(this),
                Some(kinds) => kinds.and(&this),
            };
            upload.inputs = Some(merged.map_err(|reason| {
                invalid(format!(
                    "example {}: {reason}; no backbone could train on this dataset",
                    offset + i
                ))
            })?);
        }
        upload.examples.extend(converted);
        Ok(())
    }

    /// Keeps a complete upload in the shared store for a later TrainHead, on
    /// any replica.
    pub async fn finish_upload(&self, upload: Upload) -> Result<Dataset> {
        if upload.examples.is_empty() {
            return Err(invalid("the upload holds no examples"));
        }
        self.datasets.finish(upload.pending, upload.examples).await
    }

    /// The job's current event and, unless it has ended, a subscription to the
    /// events after it.
    pub async fn watch(
        &self,
        id: &str,
        scope: &Scope,
    ) -> Result<(JobEvent, Option<broadcast::Receiver<JobEvent>>)> {
        self.check_job(id, scope).await?;
        self.jobs.watch(id).await
    }

    /// Asks a job to stop, on whichever replica runs it.
    pub async fn cancel(&self, id: &str, scope: &Scope) -> Result<JobInfo> {
        self.check_job(id, scope).await?;
        self.jobs.cancel(id).await
    }

    /// The jobs of every replica, those in `scope`.
    pub async fn list(&self, include_finished: bool, scope: &Scope) -> Result<Vec<JobInfo>> {
        let mut jobs = self.jobs.list(include_finished).await?;
        jobs.retain(|job| scope.allows(&job.head_name));
        Ok(jobs)
    }

    /// PERMISSION_DENIED for a job that trains a head outside `scope`.
    async fn check_job(&self, id: &str, scope: &Scope) -> Result<()> {
        if *scope == Scope::All {
            return Ok(());
        }
        let info = self.jobs.info(id).await?;
        scope.check(&info.head_name)
    }

    /// Checks and converts examples; `offset` is the index of the first in
    /// the whole set, for errors.
    fn examples(&self, raw: Vec<RawExample>, offset: usize) -> Result<Vec<Example>> {
        raw.into_iter()
            .enumerate()
            .map(|(i, example)| {
                let index = offset + i;
                let at = |reason: String| invalid(format!("example {index}: {reason}"));
                let input = example.input.map_err(at)?;
                check_input(index, &input, self.max_text_chars).map_err(|err| match err {
                    Error::InvalidInput { reason, .. } => at(reason),
                    other => other,
                })?;
                self.check_label(&example.label).map_err(at)?;
                Ok(Example {
                    input,
                    label: example.label,
                })
            })
            .collect()
    }

    fn check_label(&self, label: &str) -> std::result::Result<(), String> {
        if label.trim().is_empty() {
            return Err("label is empty".into());
        }
        if label.chars().count() > self.limits.max_label_chars {
            return Err(format!(
                "label is longer than {} characters (heads.max_label_chars)",
                self.limits.max_label_chars
            ));
        }
        Ok(())
    }

    fn check_example_count(&self, count: usize) -> Result<()> {
        if count > self.limits.max_examples_per_job {
            return Err(Error::LimitExceeded(format!(
                "{count} examples; a job takes at most {} (heads.max_examples_per_job)",
                self.limits.max_examples_per_job
            )));
        }
        Ok(())
    }

    /// The head's label order: the client's list, or the sorted distinct labels.
    fn labels(&self, requested: Vec<String>, counts: &BTreeMap<&str, u64>) -> Result<Vec<String>> {
        let present: BTreeSet<&str> = counts.keys().copied().collect();
        if present.len() < 2 {
            return Err(invalid("the examples need at least two different labels"));
        }
        let labels: Vec<String> = if requested.is_empty() {
            present.iter().map(|l| l.to_string()).collect()
        } else {
            self.check_requested_labels(&requested, &present)?;
            requested
        };
        if labels.len() > self.limits.max_labels {
            return Err(Error::LimitExceeded(format!(
                "{} labels; a head has at most {} (heads.max_labels)",
                labels.len(),
                self.limits.max_labels
            )));
        }
        Ok(labels)
    }

    /// A client's label list: each label valid and once, every present label in it.
    fn check_requested_labels(&self, requested: &[String], present: &BTreeSet<&str>) -> Result<()> {
        let mut seen = BTreeSet::new();
        for label in requested {
            self.check_label(label)
                .map_err(|reason| invalid(format!("labels: {reason}")))?;
            if !seen.insert(label.as_str()) {
                return Err(invalid(format!("labels: `{label}` appears twice")));
            }
        }
        if let Some(missing) = present.iter().find(|l| !seen.contains(*l)) {
            return Err(invalid(format!(
                "label `{missing}` of the examples is not in labels"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_defaults_and_ranges() {
        let linear = HeadKind::Linear;
        let params = training_params(&TrainingOptions::default(), &linear).unwrap();
        assert_eq!(params, TrainingParams::default());
        assert_eq!((params.solver, params.cv_folds), (Solver::Lbfgs, 5));

        let no_validation = TrainingOptions {
            no_validation: true,
            ..Default::default()
        };
        let params = training_params(&no_validation, &linear).unwrap();
        assert_eq!((params.solver, params.cv_folds), (Solver::Lbfgs, 0));

        for bad in [
            TrainingOptions {
                learning_rate: Some(f64::NAN),
                ..Default::default()
            },
            TrainingOptions {
                learning_rate: Some(-1.0),
                ..Default::default()
            },
            TrainingOptions {
                epochs: Some(1_000_000),
                ..Default::default()
            },
            TrainingOptions {
                validation_fraction: Some(0.9),
                ..Default::default()
            },
            TrainingOptions {
                weight_decay: Some(f64::INFINITY),
                ..Default::default()
            },
            TrainingOptions {
                l2: Some(-1.0),
                ..Default::default()
            },
            TrainingOptions {
                cv_folds: Some(1),
                ..Default::default()
            },
            TrainingOptions {
                solver: Some(Solver::Lbfgs),
                epochs: Some(5),
                ..Default::default()
            },
            TrainingOptions {
                solver: Some(Solver::Adamw),
                l2: Some(0.1),
                ..Default::default()
            },
        ] {
            let err = training_params(&bad, &linear).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad:?}");
        }
    }

    #[test]
    fn asking_for_epochs_or_an_mlp_trains_with_adamw() {
        let given = TrainingOptions {
            epochs: Some(40),
            ..Default::default()
        };
        let params = training_params(&given, &HeadKind::Linear).unwrap();
        assert_eq!(params.solver, Solver::Adamw);
        assert_eq!((params.epochs, params.early_stopping_patience), (40, 0));
        assert!(!params.refit);
        assert_eq!(params.validation_fraction, 0.1);

        let mlp = HeadKind::Mlp {
            hidden_size: 64,
            dropout: 0.1,
        };
        let params = training_params(&TrainingOptions::default(), &mlp).unwrap();
        assert_eq!(params.solver, Solver::Adamw);
        assert_eq!(params.epochs, bounds::DEFAULT_MAX_EPOCHS);
        assert_eq!(
            params.early_stopping_patience,
            bounds::DEFAULT_EARLY_STOPPING_PATIENCE
        );
        assert!(params.refit);
        assert_eq!(params.weight_decay, bounds::DEFAULT_MLP_WEIGHT_DECAY);

        let lbfgs_mlp = TrainingOptions {
            solver: Some(Solver::Lbfgs),
            ..Default::default()
        };
        assert!(training_params(&lbfgs_mlp, &mlp).is_err());
    }

    #[test]
    fn a_label_seen_once_is_refused_when_cross_validating() {
        let examples: Vec<Example> = ["a", "a", "b"]
            .iter()
            .map(|label| Example {
                input: Input::Text("x".into()),
                label: (*label).into(),
            })
            .collect();
        let counts = label_counts(&examples);
        let err = check_label_counts(&counts, &TrainingParams::default()).unwrap_err();
        assert!(
            err.to_string().contains("label `b` has a single example"),
            "{err}"
        );
        let without = TrainingParams {
            cv_folds: 0,
            ..TrainingParams::default()
        };
        assert!(check_label_counts(&counts, &without).is_ok());
    }

    #[test]
    fn head_specs() {
        assert_eq!(head_kind(None).unwrap(), HeadKind::Linear);
        let mlp = HeadSpec::Mlp {
            hidden_size: None,
            dropout: 0.1,
        };
        assert_eq!(
            head_kind(Some(mlp)).unwrap(),
            HeadKind::Mlp {
                hidden_size: 256,
                dropout: 0.1
            }
        );
        let bad = HeadSpec::Mlp {
            hidden_size: Some(8),
            dropout: 1.0,
        };
        assert!(head_kind(Some(bad)).is_err());
    }
}
