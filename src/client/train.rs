//! `tlserve train`: a head from labelled examples, sent inline or uploaded
//! when large, the job followed to its end, and optionally evaluated on a
//! stratified hold-out share.

use anyhow::{bail, Context, Result};
use prost::Message;
use serde_json::Value;
use tonic::transport::Channel;

use super::{
    describe, evaluate,
    examples::Example,
    head_json, split, upload,
    watch::{self},
};
use crate::proto::{self, train_head_request::Data, trainer_client::TrainerClient};

/// Training options as the command line gives them; None is not sent, so
/// the server's default applies.
#[derive(Debug, Clone, Default)]
pub struct TrainingFlags {
    pub solver: Option<proto::Solver>,
    pub epochs: Option<u32>,
    pub learning_rate: Option<f32>,
    pub batch_size: Option<u32>,
    pub weight_decay: Option<f32>,
    pub validation_fraction: Option<f32>,
    pub no_validation: bool,
    pub early_stopping_patience: Option<u32>,
    pub l2: Option<f32>,
    pub cv_folds: Option<u32>,
    pub balance_classes: bool,
    pub seed: Option<u64>,
    /// Fine-tune the backbone with the head; None: frozen features.
    pub fine_tuning: Option<FineTuningFlags>,
}

/// Fine-tuning options as the command line gives them.
#[derive(Debug, Clone, Default)]
pub struct FineTuningFlags {
    /// The top layers in full; else LoRA adapters (the rank, alpha, dropout
    /// and targets apply only to them).
    pub top_layers: bool,
    pub layers: Option<u32>,
    pub rank: Option<u32>,
    pub alpha: Option<f32>,
    pub dropout: Option<f32>,
    /// Empty: the server's default (query and value).
    pub targets: Vec<String>,
    pub backbone_learning_rate: Option<f32>,
    pub warmup_fraction: Option<f32>,
}

/// The FineTuning message of `flags`.
fn fine_tuning(flags: &FineTuningFlags) -> Result<proto::FineTuning> {
    use proto::fine_tuning::Method;
    let layers = wire_value("layers", flags.layers)?;
    let method = match flags.top_layers {
        true => Method::TopLayers(proto::TopLayersFineTuning { layers }),
        false => Method::Lora(proto::LoraFineTuning {
            layers,
            rank: wire_value("rank", flags.rank)?,
            alpha: wire_value("alpha", flags.alpha)?,
            // 0 is both the default and what it says: no dropout.
            dropout: flags.dropout.unwrap_or_default(),
            targets: flags.targets.clone(),
        }),
    };
    Ok(proto::FineTuning {
        method: Some(method),
        backbone_learning_rate: wire_value("backbone-learning-rate", flags.backbone_learning_rate)?,
        warmup_fraction: flags.warmup_fraction,
    })
}

/// A flag's value for the wire, where 0 means "the server's default": a
/// given 0 would silently mean something else, so it is refused.
fn wire_value<T: Default + PartialEq + std::fmt::Display>(
    flag: &str,
    value: Option<T>,
) -> Result<T> {
    match value {
        Some(v) if v == T::default() => bail!(
            "--{flag} {v} cannot be sent: the protocol reads 0 as \"the server's default\"; \
             leave the flag out for the default"
        ),
        Some(v) => Ok(v),
        None => Ok(T::default()),
    }
}

/// The TrainingConfig of `flags`: fields of flags not given stay 0 (unset).
pub fn training_config(flags: &TrainingFlags) -> Result<proto::TrainingConfig> {
    Ok(proto::TrainingConfig {
        epochs: wire_value("epochs", flags.epochs)?,
        learning_rate: wire_value("learning-rate", flags.learning_rate)?,
        batch_size: wire_value("batch-size", flags.batch_size)?,
        weight_decay: wire_value("weight-decay", flags.weight_decay)?,
        validation_fraction: wire_value("validation-fraction", flags.validation_fraction)?,
        no_validation: flags.no_validation,
        early_stopping_patience: wire_value(
            "early-stopping-patience",
            flags.early_stopping_patience,
        )?,
        balance_classes: flags.balance_classes,
        // 0 is both the server's default and a seed like any other.
        seed: flags.seed.unwrap_or_default(),
        unfreeze_top_layers: 0,
        solver: flags.solver.unwrap_or(proto::Solver::Unspecified) as i32,
        l2: wire_value("l2", flags.l2)?,
        cv_folds: wire_value("cv-folds", flags.cv_folds)?,
        fine_tuning: flags.fine_tuning.as_ref().map(fine_tuning).transpose()?,
    })
}

/// What `tlserve train` asks for.
pub struct TrainCommand {
    pub backbone: String,
    pub head: String,
    pub examples: Vec<Example>,
    /// None: the server's default head (linear).
    pub spec: Option<proto::HeadSpec>,
    pub training: proto::TrainingConfig,
    /// Share of each label held out and evaluated on at the end.
    pub holdout: Option<f64>,
    /// Sets whose encoded examples pass this many bytes are uploaded.
    pub upload_threshold_bytes: usize,
    /// Predict batch size for the hold-out evaluation.
    pub evaluate_batch_size: usize,
    /// Return once the job has started, with its id, instead of following it.
    pub detach: bool,
}

/// How `tlserve train` ended.
pub enum Trained {
    /// The published head as JSON (with its hold-out evaluation under `holdout`).
    Head(Value),
    /// The job runs on without a watcher.
    Started { job_id: String },
}

/// The job's data: inline, or uploaded first when larger than `threshold`.
async fn training_data(
    channel: &Channel,
    examples: Vec<Example>,
    threshold: usize,
) -> Result<Data> {
    let examples: Vec<proto::Example> = examples.into_iter().map(Into::into).collect();
    let bytes: usize = examples.iter().map(Message::encoded_len).sum();
    if bytes <= threshold {
        return Ok(Data::Examples(proto::ExampleSet { examples }));
    }
    let dataset = upload::upload(channel.clone(), examples).await?;
    Ok(Data::DatasetId(dataset.dataset_id))
}

/// Runs a training job, showing its progress on stderr, and returns the
/// published head, or with `detach` the started job's id.
pub async fn train(channel: Channel, command: TrainCommand) -> Result<Trained> {
    if command.detach && command.holdout.is_some() {
        bail!(
            "--holdout evaluates the head at the end of the job: it needs a watcher, not --detach"
        );
    }
    let (examples, holdout) = match command.holdout {
        Some(share) => {
            let split = split::stratified(command.examples, share, command.training.seed)?;
            eprintln!(
                "training on {} examples, holding out {}",
                split.train.len(),
                split.holdout.len()
            );
            (split.train, split.holdout)
        }
        None => (command.examples, Vec::new()),
    };
    let data = training_data(&channel, examples, command.upload_threshold_bytes).await?;
    let request = proto::TrainHeadRequest {
        backbone: command.backbone,
        head_name: command.head,
        spec: command.spec,
        training: Some(command.training),
        data: Some(data),
        labels: vec![],
    };
    let mut events = TrainerClient::new(channel.clone())
        .train_head(request)
        .await
        .map_err(describe)?
        .into_inner();
    if command.detach {
        // The job runs on the server whether or not anyone follows its events.
        let first = events.message().await.map_err(describe)?;
        let Some(first) = first else {
            bail!("the server started no job");
        };
        return Ok(Trained::Started {
            job_id: first.job_id,
        });
    }
    let head = watch::follow(channel.clone(), events).await?;
    let mut json = head_json(&head);
    if !holdout.is_empty() {
        let version = format!("{}@{}", head.name, head.version);
        let evaluation =
            evaluate::evaluate(channel, &version, holdout, command.evaluate_batch_size)
                .await
                .with_context(|| {
                    format!(
                        "{version} is published, but evaluating it on the held-out examples failed"
                    )
                })?;
        eprint!("{}", evaluation.table());
        json["holdout"] = evaluation.to_json();
    }
    Ok(Trained::Head(json))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_not_given_leave_the_config_unset() {
        let config = training_config(&TrainingFlags::default()).unwrap();
        assert_eq!(config, proto::TrainingConfig::default());
    }

    #[test]
    fn flags_given_are_sent() {
        let flags = TrainingFlags {
            solver: Some(proto::Solver::Adamw),
            epochs: Some(40),
            learning_rate: Some(0.02),
            no_validation: true,
            seed: Some(7),
            ..Default::default()
        };
        let config = training_config(&flags).unwrap();
        assert_eq!(config.solver(), proto::Solver::Adamw);
        assert_eq!((config.epochs, config.learning_rate), (40, 0.02));
        assert!(config.no_validation);
        assert_eq!((config.seed, config.batch_size, config.l2), (7, 0, 0.0));
    }

    #[test]
    fn a_given_zero_is_refused_rather_than_read_as_the_default() {
        let flags = TrainingFlags {
            weight_decay: Some(0.0),
            ..Default::default()
        };
        let err = training_config(&flags).unwrap_err().to_string();
        assert!(err.contains("--weight-decay 0"), "{err}");
        let flags = TrainingFlags {
            epochs: Some(0),
            ..Default::default()
        };
        assert!(training_config(&flags).is_err());
    }
}
