//! The command-line client: talks gRPC to a running server and prints JSON.

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tonic::transport::{Channel, Endpoint};

use crate::{
    proto::{self, embedder_client::EmbedderClient, models_client::ModelsClient},
    server::status::code_name,
};

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
    pub texts: Vec<String>,
    pub pooling: proto::Pooling,
    pub normalize: Option<bool>,
    pub truncate: Option<bool>,
}

pub async fn embed(channel: Channel, command: EmbedCommand) -> Result<Value> {
    let request = proto::EmbedRequest {
        backbone: command.backbone,
        inputs: command
            .texts
            .into_iter()
            .map(|text| proto::Input {
                kind: Some(proto::input::Kind::Text(text)),
            })
            .collect(),
        pooling: command.pooling as i32,
        normalize: command.normalize,
        truncate: command.truncate,
        priority: proto::Priority::Online as i32,
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
