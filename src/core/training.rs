//! Training-job submission and dataset upload: every training parameter's
//! default and bound in one place, labels checked, examples bounded.

use std::{collections::BTreeSet, sync::Arc};

use tokio::sync::broadcast;

use super::{inputs::check_input, Scope};
use crate::{
    backbone::Input,
    config::{is_valid_name, HeadsConfig},
    datasets::{Dataset, DatasetStore, PendingUpload},
    head::{HeadKind, TrainingParams},
    jobs::{Example, JobEvent, JobInfo, JobManager, JobRequest},
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
    pub epochs: Option<usize>,
    pub learning_rate: Option<f64>,
    pub batch_size: Option<usize>,
    pub weight_decay: f64,
    pub validation_fraction: Option<f64>,
    /// Train on every example and report no validation metrics.
    pub no_validation: bool,
    /// 0: never stop early.
    pub early_stopping_patience: usize,
    pub balance_classes: bool,
    pub seed: u64,
    /// Fine-tuning: encoder layers to train with the head (0: frozen features).
    pub unfreeze_top_layers: usize,
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

/// The bounds of every training parameter, and the defaults this layer adds
/// to [`TrainingParams::default`].
pub mod bounds {
    /// Most epochs of one job.
    pub const MAX_EPOCHS: usize = 10_000;
    /// Learning rates are in (0, MAX_LEARNING_RATE].
    pub const MAX_LEARNING_RATE: f64 = 10.0;
    /// Largest mini-batch.
    pub const MAX_BATCH_SIZE: usize = 65_536;
    /// Weight decay is in [0, MAX_WEIGHT_DECAY].
    pub const MAX_WEIGHT_DECAY: f64 = 1.0;
    /// The validation share is in [0, MAX_VALIDATION_FRACTION].
    pub const MAX_VALIDATION_FRACTION: f64 = 0.5;
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
pub fn training_params(options: &TrainingOptions) -> Result<TrainingParams> {
    use bounds::*;
    let defaults = TrainingParams::default();
    let epochs = options.epochs.unwrap_or(defaults.epochs);
    if epochs > MAX_EPOCHS {
        return Err(invalid(format!("epochs must be at most {MAX_EPOCHS}")));
    }
    let learning_rate = options.learning_rate.unwrap_or(defaults.learning_rate);
    if !(learning_rate.is_finite() && learning_rate > 0.0 && learning_rate <= MAX_LEARNING_RATE) {
        return Err(invalid(format!(
            "learning_rate must be in (0, {MAX_LEARNING_RATE}]"
        )));
    }
    let batch_size = options.batch_size.unwrap_or(defaults.batch_size);
    if batch_size > MAX_BATCH_SIZE {
        return Err(invalid(format!(
            "batch_size must be at most {MAX_BATCH_SIZE}"
        )));
    }
    let weight_decay = options.weight_decay;
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
            .unwrap_or(defaults.validation_fraction)
    };
    if !(validation_fraction.is_finite()
        && (0.0..=MAX_VALIDATION_FRACTION).contains(&validation_fraction))
    {
        return Err(invalid(format!(
            "validation_fraction must be in [0, {MAX_VALIDATION_FRACTION}]"
        )));
    }
    Ok(TrainingParams {
        epochs,
        learning_rate,
        batch_size,
        weight_decay,
        validation_fraction,
        early_stopping_patience: options.early_stopping_patience,
        balance_classes: options.balance_classes,
        seed: options.seed,
    })
}

/// Starts training jobs and keeps uploaded datasets for them.
pub struct Trainer {
    jobs: Arc<JobManager>,
    datasets: Arc<DatasetStore>,
    limits: HeadsConfig,
    /// limits.max_text_chars, for the examples' texts.
    max_text_chars: usize,
}

/// A request's head and parameters, checked.
struct JobPlan {
    kind: HeadKind,
    params: TrainingParams,
}

/// A dataset upload in progress: examples are checked, counted and their
/// bytes reserved as they arrive.
pub struct Upload {
    pending: PendingUpload,
    examples: Vec<Example>,
}

impl Trainer {
    pub fn new(
        jobs: Arc<JobManager>,
        datasets: Arc<DatasetStore>,
        limits: HeadsConfig,
        max_text_chars: usize,
    ) -> Self {
        Self {
            jobs,
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
        let (examples, dataset) = self.resolve_data(request.data)?;
        let submitted = match self.labels(request.labels, &examples) {
            Ok(labels) => {
                let job = JobRequest {
                    backbone: request.backbone,
                    head_name: request.head_name,
                    kind: plan.kind,
                    params: plan.params,
                    examples,
                    labels,
                };
                self.jobs.submit(job).await
            }
            Err(err) => Err(err),
        };
        if submitted.is_err() {
            if let Some(dataset) = dataset {
                self.datasets.restore(dataset);
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
        if request.options.unfreeze_top_layers > 0 {
            return Err(Error::Unimplemented(
                "fine-tuning (unfreeze_top_layers > 0) is not available yet; \
                 train on frozen features with unfreeze_top_layers = 0"
                    .into(),
            ));
        }
        Ok(JobPlan {
            kind: head_kind(request.head.clone())?,
            params: training_params(&request.options)?,
        })
    }

    /// The job's examples, and the uploaded dataset they were taken from.
    fn resolve_data(
        &self,
        data: Option<TrainingData>,
    ) -> Result<(Vec<Example>, Option<Arc<Dataset>>)> {
        match data {
            None => Err(invalid("no training data: give examples or a dataset_id")),
            Some(TrainingData::Examples(raw)) => {
                self.check_example_count(raw.len())?;
                Ok((self.examples(raw, 0)?, None))
            }
            Some(TrainingData::Dataset(id)) => {
                let dataset = self.datasets.take(&id)?;
                Ok((dataset.examples.clone(), Some(dataset)))
            }
        }
    }

    /// Starts a dataset upload, if a slot is free.
    pub fn begin_upload(&self) -> Result<Upload> {
        Ok(Upload {
            pending: self.datasets.begin_upload()?,
            examples: Vec::new(),
        })
    }

    /// How long an upload may stay silent before it is ended.
    pub fn upload_idle_timeout(&self) -> std::time::Duration {
        self.limits.upload_idle_timeout()
    }

    /// Adds one chunk of an upload; `bytes` is its size on the wire.
    pub fn add_to_upload(
        &self,
        upload: &mut Upload,
        chunk: Vec<RawExample>,
        bytes: usize,
    ) -> Result<()> {
        upload.pending.reserve(bytes)?;
        self.check_example_count(upload.examples.len() + chunk.len())?;
        let converted = self.examples(chunk, upload.examples.len())?;
        upload.examples.extend(converted);
        Ok(())
    }

    /// Keeps a complete upload for a later TrainHead.
    pub fn finish_upload(&self, upload: Upload) -> Result<Arc<Dataset>> {
        if upload.examples.is_empty() {
            return Err(invalid("the upload holds no examples"));
        }
        Ok(self.datasets.finish(upload.pending, upload.examples))
    }

    /// The job's current event and, unless it has ended, a subscription to the
    /// events after it.
    pub fn watch(
        &self,
        id: &str,
        scope: &Scope,
    ) -> Result<(JobEvent, Option<broadcast::Receiver<JobEvent>>)> {
        self.check_job(id, scope)?;
        self.jobs.watch(id)
    }

    /// Asks a job to stop.
    pub fn cancel(&self, id: &str, scope: &Scope) -> Result<JobInfo> {
        self.check_job(id, scope)?;
        self.jobs.cancel(id)
    }

    /// Jobs known to this server, those in `scope`.
    pub fn list(&self, include_finished: bool, scope: &Scope) -> Vec<JobInfo> {
        let mut jobs = self.jobs.list(include_finished);
        jobs.retain(|job| scope.allows(&job.head_name));
        jobs
    }

    /// PERMISSION_DENIED for a job that trains a head outside `scope`.
    fn check_job(&self, id: &str, scope: &Scope) -> Result<()> {
        if *scope == Scope::All {
            return Ok(());
        }
        let info = self.jobs.info(id)?;
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
    fn labels(&self, requested: Vec<String>, examples: &[Example]) -> Result<Vec<String>> {
        let present: BTreeSet<&str> = examples.iter().map(|e| e.label.as_str()).collect();
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
        let params = training_params(&TrainingOptions::default()).unwrap();
        assert_eq!(params, TrainingParams::default());

        let no_validation = TrainingOptions {
            no_validation: true,
            ..Default::default()
        };
        assert_eq!(
            training_params(&no_validation).unwrap().validation_fraction,
            0.0
        );

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
                weight_decay: f64::INFINITY,
                ..Default::default()
            },
        ] {
            let err = training_params(&bad).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad:?}");
        }
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
