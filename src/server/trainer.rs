//! The Trainer service: training jobs as server-streamed events, dataset upload,
//! and job control.

use std::{collections::BTreeSet, pin::Pin, sync::Arc};

use futures_util::Stream;
use tokio::sync::broadcast;
use tonic::{Request, Response, Status, Streaming};

use super::{convert, head_convert};
use crate::{
    config::{is_valid_name, HeadsConfig},
    datasets::DatasetStore,
    head::{HeadKind, TrainingParams},
    jobs::{Example, JobEvent, JobManager, JobRequest},
    proto, Error, Result,
};

pub struct TrainerService {
    jobs: Arc<JobManager>,
    datasets: Arc<DatasetStore>,
    limits: HeadsConfig,
    /// limits.max_text_chars, for the examples' texts.
    max_text_chars: usize,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::TrainEvent, Status>> + Send>>;

impl TrainerService {
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

    fn examples(&self, examples: Vec<proto::Example>, offset: usize) -> Result<Vec<Example>> {
        examples
            .into_iter()
            .enumerate()
            .map(|(i, example)| {
                let index = offset + i;
                let input = example.input.unwrap_or_default();
                let input = convert::input_of(index, input, self.max_text_chars).map_err(
                    |err| match err {
                        Error::InvalidInput { reason, .. } => {
                            Error::InvalidArgument(format!("example {index}: {reason}"))
                        }
                        other => other,
                    },
                )?;
                self.check_label(&example.label).map_err(|reason| {
                    Error::InvalidArgument(format!("example {index}: {reason}"))
                })?;
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
            return Err(Error::InvalidArgument(
                "the examples need at least two different labels".into(),
            ));
        }
        let labels: Vec<String> = if requested.is_empty() {
            present.iter().map(|l| l.to_string()).collect()
        } else {
            let mut seen = BTreeSet::new();
            for label in &requested {
                self.check_label(label)
                    .map_err(|reason| Error::InvalidArgument(format!("labels: {reason}")))?;
                if !seen.insert(label.as_str()) {
                    return Err(Error::InvalidArgument(format!(
                        "labels: `{label}` appears twice"
                    )));
                }
            }
            if let Some(missing) = present.iter().find(|l| !seen.contains(*l)) {
                return Err(Error::InvalidArgument(format!(
                    "label `{missing}` of the examples is not in labels"
                )));
            }
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

    fn job_request(&self, request: proto::TrainHeadRequest) -> Result<JobRequest, Status> {
        if request.backbone.is_empty() {
            return Err(Error::InvalidArgument("backbone is empty".into()).into());
        }
        if !is_valid_name(&request.head_name) {
            return Err(Error::InvalidArgument(format!(
                "head_name `{}` is not valid: 1-64 letters, digits, '-', '_' or '.'",
                request.head_name
            ))
            .into());
        }
        let training = request.training.unwrap_or_default();
        if training.unfreeze_top_layers > 0 {
            return Err(Status::unimplemented(
                "fine-tuning (unfreeze_top_layers > 0) is not available yet; \
                 train on frozen features with unfreeze_top_layers = 0",
            ));
        }
        let kind = head_kind(request.spec)?;
        let params = training_params(&training)?;
        let examples = match request.data {
            None => {
                return Err(Error::InvalidArgument(
                    "no training data: give examples or a dataset_id".into(),
                )
                .into())
            }
            Some(proto::train_head_request::Data::Examples(set)) => {
                self.check_example_count(set.examples.len())?;
                self.examples(set.examples, 0)?
            }
            Some(proto::train_head_request::Data::DatasetId(id)) => {
                let dataset = self.datasets.take(&id)?;
                dataset.examples.clone()
            }
        };
        let labels = self.labels(request.labels, &examples)?;
        Ok(JobRequest {
            backbone: request.backbone,
            head_name: request.head_name,
            kind,
            params,
            examples,
            labels,
        })
    }
}

fn invalid(message: String) -> Status {
    Error::InvalidArgument(message).into()
}

fn head_kind(spec: Option<proto::HeadSpec>) -> Result<HeadKind, Status> {
    use proto::head_spec::Kind;
    match spec.and_then(|s| s.kind) {
        None | Some(Kind::Linear(_)) => Ok(HeadKind::Linear),
        Some(Kind::Mlp(mlp)) => {
            let hidden_size = if mlp.hidden_size == 0 {
                256
            } else {
                mlp.hidden_size as usize
            };
            if hidden_size > 8192 {
                return Err(invalid("mlp.hidden_size must be at most 8192".into()));
            }
            if !(mlp.dropout.is_finite() && (0.0..1.0).contains(&mlp.dropout)) {
                return Err(invalid("mlp.dropout must be in [0, 1)".into()));
            }
            Ok(HeadKind::Mlp {
                hidden_size,
                dropout: mlp.dropout,
            })
        }
    }
}

/// Applies the documented defaults and checks the ranges.
fn training_params(config: &proto::TrainingConfig) -> Result<TrainingParams, Status> {
    let defaults = TrainingParams::default();
    let or = |value: u32, default: usize| if value == 0 { default } else { value as usize };
    let epochs = or(config.epochs, defaults.epochs);
    if epochs > 10_000 {
        return Err(invalid("epochs must be at most 10000".into()));
    }
    let learning_rate = if config.learning_rate == 0.0 {
        defaults.learning_rate
    } else {
        f64::from(config.learning_rate)
    };
    if !(learning_rate.is_finite() && learning_rate > 0.0 && learning_rate <= 10.0) {
        return Err(invalid("learning_rate must be in (0, 10]".into()));
    }
    let batch_size = or(config.batch_size, defaults.batch_size);
    if batch_size > 65_536 {
        return Err(invalid("batch_size must be at most 65536".into()));
    }
    let weight_decay = f64::from(config.weight_decay);
    if !(weight_decay.is_finite() && (0.0..=1.0).contains(&weight_decay)) {
        return Err(invalid("weight_decay must be in [0, 1]".into()));
    }
    let validation_fraction = if config.no_validation {
        0.0
    } else if config.validation_fraction == 0.0 {
        defaults.validation_fraction
    } else {
        f64::from(config.validation_fraction)
    };
    if !(validation_fraction.is_finite() && (0.0..=0.5).contains(&validation_fraction)) {
        return Err(invalid("validation_fraction must be in [0, 0.5]".into()));
    }
    Ok(TrainingParams {
        epochs,
        learning_rate,
        batch_size,
        weight_decay,
        validation_fraction,
        early_stopping_patience: config.early_stopping_patience as usize,
        balance_classes: config.balance_classes,
        seed: config.seed,
    })
}

/// Streams `first` (if any), then the subscription's events, ending after the
/// first final state.
fn event_stream(
    first: Option<JobEvent>,
    receiver: Option<broadcast::Receiver<JobEvent>>,
) -> EventStream {
    let stream = futures_util::stream::unfold(
        (first, receiver, false),
        |(first, receiver, done)| async move {
            if done {
                return None;
            }
            if let Some(event) = first {
                let finished = event.state.is_final();
                return Some((
                    Ok(head_convert::train_event(&event)),
                    (None, receiver, finished),
                ));
            }
            let mut receiver = receiver?;
            loop {
                match receiver.recv().await {
                    Ok(event) => {
                        let finished = event.state.is_final();
                        return Some((
                            Ok(head_convert::train_event(&event)),
                            (None, Some(receiver), finished),
                        ));
                    }
                    // A slow watcher skips ahead; the state is in the next event.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    );
    Box::pin(stream)
}

#[tonic::async_trait]
impl proto::trainer_server::Trainer for TrainerService {
    type TrainHeadStream = EventStream;
    type WatchJobStream = EventStream;

    async fn train_head(
        &self,
        request: Request<proto::TrainHeadRequest>,
    ) -> Result<Response<Self::TrainHeadStream>, Status> {
        let job = self.job_request(request.into_inner())?;
        let (_id, receiver) = self.jobs.submit(job)?;
        Ok(Response::new(event_stream(None, Some(receiver))))
    }

    async fn upload_dataset(
        &self,
        request: Request<Streaming<proto::UploadDatasetRequest>>,
    ) -> Result<Response<proto::Dataset>, Status> {
        let mut stream = request.into_inner();
        let mut examples = Vec::new();
        while let Some(chunk) = stream.message().await? {
            self.check_example_count(examples.len() + chunk.examples.len())?;
            let converted = self.examples(chunk.examples, examples.len())?;
            examples.extend(converted);
        }
        if examples.is_empty() {
            return Err(invalid("the upload holds no examples".into()));
        }
        let dataset = self.datasets.insert(examples)?;
        Ok(Response::new(proto::Dataset {
            dataset_id: dataset.id.clone(),
            example_count: dataset.examples.len() as u64,
            label_counts: dataset.label_counts.clone().into_iter().collect(),
            expires_at: Some(head_convert::timestamp(dataset.expires_at)),
        }))
    }

    async fn watch_job(
        &self,
        request: Request<proto::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let (current, receiver) = self.jobs.watch(&request.into_inner().job_id)?;
        Ok(Response::new(event_stream(Some(current), receiver)))
    }

    async fn cancel_job(
        &self,
        request: Request<proto::CancelJobRequest>,
    ) -> Result<Response<proto::JobInfo>, Status> {
        let info = self.jobs.cancel(&request.into_inner().job_id)?;
        Ok(Response::new(head_convert::job_info(&info)))
    }

    async fn list_jobs(
        &self,
        request: Request<proto::ListJobsRequest>,
    ) -> Result<Response<proto::ListJobsResponse>, Status> {
        let jobs = self
            .jobs
            .list(request.into_inner().include_finished)
            .iter()
            .map(head_convert::job_info)
            .collect();
        Ok(Response::new(proto::ListJobsResponse { jobs }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_defaults_and_ranges() {
        let params = training_params(&proto::TrainingConfig::default()).unwrap();
        assert_eq!(params, TrainingParams::default());

        let no_validation = proto::TrainingConfig {
            no_validation: true,
            ..Default::default()
        };
        assert_eq!(
            training_params(&no_validation).unwrap().validation_fraction,
            0.0
        );

        for bad in [
            proto::TrainingConfig {
                learning_rate: f32::NAN,
                ..Default::default()
            },
            proto::TrainingConfig {
                learning_rate: -1.0,
                ..Default::default()
            },
            proto::TrainingConfig {
                epochs: 1_000_000,
                ..Default::default()
            },
            proto::TrainingConfig {
                validation_fraction: 0.9,
                ..Default::default()
            },
            proto::TrainingConfig {
                weight_decay: f32::INFINITY,
                ..Default::default()
            },
        ] {
            let status = training_params(&bad).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }

    #[test]
    fn head_specs() {
        assert_eq!(head_kind(None).unwrap(), HeadKind::Linear);
        let mlp = proto::HeadSpec {
            kind: Some(proto::head_spec::Kind::Mlp(proto::MlpHead {
                hidden_size: 0,
                dropout: 0.1,
            })),
        };
        assert_eq!(
            head_kind(Some(mlp)).unwrap(),
            HeadKind::Mlp {
                hidden_size: 256,
                dropout: 0.1
            }
        );
        let bad = proto::HeadSpec {
            kind: Some(proto::head_spec::Kind::Mlp(proto::MlpHead {
                hidden_size: 8,
                dropout: 1.0,
            })),
        };
        assert!(head_kind(Some(bad)).is_err());
    }
}
