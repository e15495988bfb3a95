//! Backbones, heads and jobs between their domain types and protobuf.

use std::time::{Duration, SystemTime};

use super::convert;
use crate::{
    head::{
        fine_tune::{FineTuning, Method},
        store::StoredHead,
        HeadKind, HeadMetrics, Solver, TrainingParams,
    },
    jobs::{JobEvent, JobInfo, JobState},
    proto,
    registry::{BackboneState, BackboneStatus},
};

pub fn timestamp(time: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(time)
}

pub fn head_spec(kind: &HeadKind) -> proto::HeadSpec {
    use proto::head_spec::Kind;
    proto::HeadSpec {
        kind: Some(match kind {
            HeadKind::Linear => Kind::Linear(proto::LinearHead {}),
            HeadKind::Mlp {
                hidden_size,
                dropout,
            } => Kind::Mlp(proto::MlpHead {
                hidden_size: *hidden_size as u32,
                dropout: *dropout,
            }),
        }),
    }
}

pub fn training_config(params: &TrainingParams) -> proto::TrainingConfig {
    proto::TrainingConfig {
        epochs: params.epochs as u32,
        learning_rate: params.learning_rate as f32,
        batch_size: params.batch_size as u32,
        weight_decay: params.weight_decay as f32,
        validation_fraction: params.validation_fraction as f32,
        no_validation: params.validation_fraction == 0.0 && params.cv_folds == 0,
        early_stopping_patience: params.early_stopping_patience as u32,
        balance_classes: params.balance_classes,
        seed: params.seed,
        unfreeze_top_layers: 0,
        solver: match params.solver {
            Solver::Lbfgs => proto::Solver::Lbfgs,
            Solver::Adamw => proto::Solver::Adamw,
        } as i32,
        l2: params.l2 as f32,
        cv_folds: params.cv_folds as u32,
        fine_tuning: None,
    }
}

/// A fine-tuned head's record, defaults filled in.
pub fn fine_tuning(tuning: &FineTuning) -> proto::FineTuning {
    let method = match tuning.method {
        Method::Lora(lora) => proto::fine_tuning::Method::Lora(proto::LoraFineTuning {
            layers: lora.layers as u32,
            rank: lora.rank as u32,
            alpha: lora.alpha as f32,
            dropout: lora.dropout as f32,
            targets: lora
                .targets
                .names()
                .into_iter()
                .map(str::to_owned)
                .collect(),
        }),
        Method::TopLayers(top) => {
            proto::fine_tuning::Method::TopLayers(proto::TopLayersFineTuning {
                layers: top.layers as u32,
            })
        }
    };
    proto::FineTuning {
        method: Some(method),
        backbone_learning_rate: tuning.backbone_learning_rate as f32,
        warmup_fraction: Some(tuning.warmup_fraction as f32),
    }
}

pub fn head_metrics(metrics: &HeadMetrics) -> proto::HeadMetrics {
    proto::HeadMetrics {
        train_loss: metrics.train_loss,
        train_accuracy: metrics.train_accuracy,
        validation_loss: metrics.validation_loss,
        validation_accuracy: metrics.validation_accuracy,
        epoch: metrics.epoch as u32,
        validation_ece: metrics.validation_ece,
        temperature: metrics.temperature,
    }
}

pub fn head_info(head: &StoredHead) -> proto::HeadInfo {
    let meta = &head.meta;
    proto::HeadInfo {
        name: meta.name.clone(),
        version: meta.version,
        backbone: meta.backbone.clone(),
        backbone_fingerprint: meta.backbone_fingerprint.clone(),
        labels: meta.labels.clone(),
        spec: Some(head_spec(&meta.kind)),
        training: Some(proto::TrainingConfig {
            fine_tuning: meta.fine_tuning.as_ref().map(fine_tuning),
            ..training_config(&meta.training)
        }),
        metrics: Some(head_metrics(&meta.metrics)),
        train_examples: meta.train_examples,
        validation_examples: meta.validation_examples,
        created_at: Some(timestamp(
            SystemTime::UNIX_EPOCH + Duration::from_millis(meta.created_at_ms),
        )),
        fine_tuning: meta.fine_tuning.as_ref().map(fine_tuning),
    }
}

pub fn job_state(state: JobState) -> proto::JobState {
    match state {
        JobState::Queued => proto::JobState::Queued,
        JobState::Embedding => proto::JobState::Embedding,
        JobState::Training => proto::JobState::Training,
        JobState::Succeeded => proto::JobState::Succeeded,
        JobState::Failed => proto::JobState::Failed,
        JobState::Cancelled => proto::JobState::Cancelled,
    }
}

pub fn train_event(event: &JobEvent) -> proto::TrainEvent {
    let progress = &event.progress;
    proto::TrainEvent {
        job_id: event.job_id.to_string(),
        state: job_state(event.state()) as i32,
        time: Some(timestamp(event.time)),
        embedded: progress.embedded,
        total_inputs: progress.total_inputs,
        epoch: progress.epoch,
        total_epochs: progress.total_epochs,
        metrics: progress.metrics.as_ref().map(head_metrics),
        head: event.head().map(|head| head_info(head)),
        error: event.error().unwrap_or_default().to_owned(),
        step: progress.step,
        total_steps: progress.total_steps,
        step_loss: progress.step_loss,
        attempt: progress.attempt.max(1),
        note: progress.note.clone().unwrap_or_default(),
    }
}

pub fn job_info(info: &JobInfo) -> proto::JobInfo {
    proto::JobInfo {
        job_id: info.id.to_string(),
        backbone: info.backbone.clone(),
        head_name: info.head_name.clone(),
        state: job_state(info.last_event.state()) as i32,
        created_at: Some(timestamp(info.created_at)),
        finished_at: info.finished_at.map(timestamp),
        last_event: Some(train_event(&info.last_event)),
    }
}

pub fn backbone_info(status: BackboneStatus) -> proto::BackboneInfo {
    let config = &status.config;
    let mut info = proto::BackboneInfo {
        name: config.name.clone(),
        architecture: config.architecture.as_str().to_owned(),
        device: config.device.to_string(),
        default_pooling: convert::pooling(crate::backbone::catalog::default_pooling(config)) as i32,
        default_normalize: config.normalize,
        ..Default::default()
    };
    match status.state {
        BackboneState::Loading => info.set_state(proto::BackboneState::Loading),
        BackboneState::Failed(reason) => {
            info.set_state(proto::BackboneState::Failed);
            info.error = reason;
        }
        BackboneState::Ready(loaded) => {
            let d = loaded.backbone.descriptor();
            info.set_state(proto::BackboneState::Ready);
            info.set_modality(convert::modality(d.modality));
            info.dimension = d.dimension as u32;
            info.dtype = d.dtype.clone();
            info.max_sequence_length = d.max_sequence_length as u32;
            info.fingerprint = d.fingerprint.clone();
            info.source = d.source.clone();
            info.image_size = d.image_size as u32;
            info.builtin_heads = loaded
                .backbone
                .classifiers()
                .iter()
                .map(|c| format!("{}/{}", d.name, c.name))
                .collect();
        }
    }
    info
}
