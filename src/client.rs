//! The command-line client: talks gRPC to a running server and prints JSON.
//!
//! The verbs that move data sets live in small modules: reading examples
//! (`text_files`, `image_folder`, `data`), the hold-out `split`, `upload`,
//! following a job (`watch`), and `evaluate` with its `metrics`.

pub mod chunks;
pub mod data;
pub mod evaluate;
pub mod examples;
pub mod image_folder;
pub mod metrics;
pub mod progress;
pub mod split;
pub mod text_files;
pub mod train;
pub mod upload;
pub mod watch;

pub use data::DataSource;
pub use train::{train, training_config, FineTuningFlags, TrainCommand, Trained, TrainingFlags};
pub use watch::{watch, Detached};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tonic::transport::{Channel, Endpoint};

use crate::proto::{self, code_name, embedder_client::EmbedderClient, models_client::ModelsClient};

/// Connects to `addr` (`http://host:port`).
pub async fn connect(addr: &str) -> Result<Channel> {
    Endpoint::from_shared(addr.to_owned())
        .with_context(|| format!("`{addr}` is not a valid server address"))?
        .connect()
        .await
        .with_context(|| format!("cannot connect to {addr}"))
}

/// Makes a gRPC status readable: `NOT_FOUND: backbone ... is not configured`.
fn describe(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", code_name(status.code()), status.message())
}

/// What `tlserve embed` asks for.
pub struct EmbedCommand {
    pub backbone: String,
    pub inputs: Vec<proto::Input>,
    pub pooling: proto::Pooling,
    pub normalize: Option<bool>,
    pub truncate: Option<bool>,
    /// A fine-tuned head whose adapted features are asked for.
    pub head: Option<String>,
}

pub async fn embed(channel: Channel, command: EmbedCommand) -> Result<Value> {
    let request = proto::EmbedRequest {
        backbone: command.backbone,
        inputs: command.inputs,
        pooling: command.pooling as i32,
        normalize: command.normalize,
        truncate: command.truncate,
        priority: proto::Priority::Online as i32,
        head: command.head.unwrap_or_default(),
    };
    let response = EmbedderClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .embed(request)
        .await
        .map_err(describe)?
        .into_inner();
    let embeddings: Vec<Value> = response
        .embeddings
        .into_iter()
        .enumerate()
        .map(|(index, e)| {
            json!({
                "index": index,
                "tokens": e.tokens,
                "truncated": e.truncated,
                "values": e.values,
            })
        })
        .collect();
    Ok(json!({
        "backbone": response.backbone,
        "dimension": response.dimension,
        "embeddings": embeddings,
    }))
}

pub async fn backbones(channel: Channel) -> Result<Value> {
    let response = ModelsClient::new(channel)
        .list_backbones(proto::ListBackbonesRequest {})
        .await
        .map_err(describe)?
        .into_inner();
    let list: Vec<Value> = response
        .backbones
        .into_iter()
        .map(|b| {
            json!({
                "name": b.name,
                "architecture": b.architecture,
                "modality": b.modality().as_str_name(),
                "state": b.state().as_str_name(),
                "dimension": b.dimension,
                "device": b.device,
                "dtype": b.dtype,
                "max_sequence_length": b.max_sequence_length,
                "default_pooling": b.default_pooling().as_str_name(),
                "default_normalize": b.default_normalize,
                "fingerprint": b.fingerprint,
                "source": b.source,
                "error": b.error,
            })
        })
        .collect();
    Ok(json!({ "backbones": list }))
}

/// A head as JSON for the command line.
pub fn head_json(head: &proto::HeadInfo) -> Value {
    let metrics = head.metrics.unwrap_or_default();
    json!({
        "name": head.name,
        "version": head.version,
        "backbone": head.backbone,
        "labels": head.labels,
        "train_examples": head.train_examples,
        "validation_examples": head.validation_examples,
        "metrics": {
            "epoch": metrics.epoch,
            "train_loss": metrics.train_loss,
            "train_accuracy": metrics.train_accuracy,
            "validation_loss": metrics.validation_loss,
            "validation_accuracy": metrics.validation_accuracy,
        },
        "fine_tuning": head.fine_tuning.as_ref().map(fine_tuning_json),
    })
}

/// A fine-tuned head's record; null for a head on frozen features.
fn fine_tuning_json(tuning: &proto::FineTuning) -> Value {
    let method = match &tuning.method {
        Some(proto::fine_tuning::Method::Lora(lora)) => json!({
            "lora": {
                "layers": lora.layers,
                "rank": lora.rank,
                "alpha": lora.alpha,
                "dropout": lora.dropout,
                "targets": lora.targets,
            }
        }),
        Some(proto::fine_tuning::Method::TopLayers(top)) => json!({
            "top_layers": { "layers": top.layers }
        }),
        None => Value::Null,
    };
    json!({
        "method": method,
        "backbone_learning_rate": tuning.backbone_learning_rate,
        "warmup_fraction": tuning.warmup_fraction,
    })
}

pub async fn predict(
    channel: Channel,
    head: String,
    inputs: Vec<proto::Input>,
    top_k: u32,
) -> Result<Value> {
    let response = proto::predictor_client::PredictorClient::new(channel)
        .predict(proto::PredictRequest {
            head,
            inputs,
            top_k,
            ..Default::default()
        })
        .await
        .map_err(describe)?
        .into_inner();
    let predictions: Vec<Value> = response
        .predictions
        .into_iter()
        .map(|p| {
            Value::Array(
                p.labels
                    .into_iter()
                    .map(|l| json!({"label": l.label, "index": l.index, "probability": l.probability}))
                    .collect(),
            )
        })
        .collect();
    Ok(json!({
        "head": response.head,
        "version": response.version,
        "predictions": predictions,
    }))
}

pub async fn heads(channel: Channel) -> Result<Value> {
    let response = ModelsClient::new(channel)
        .list_heads(proto::ListHeadsRequest {
            backbone: String::new(),
            all_versions: true,
        })
        .await
        .map_err(describe)?
        .into_inner();
    Ok(json!({ "heads": response.heads.iter().map(head_json).collect::<Vec<_>>() }))
}
