//! The Embedder service: inputs in, feature vectors out.

use std::{sync::Arc, time::Instant};

use tonic::{Request, Response, Status};

use super::{convert, deadline};
use crate::{
    backbone::{EmbedOptions, Input, Prepared},
    batching::Priority,
    config::LimitsConfig,
    proto,
    registry::{BackboneRegistry, LoadedBackbone},
    Error, Result,
};

pub struct EmbedderService {
    registry: Arc<BackboneRegistry>,
    limits: LimitsConfig,
}

/// Vectors of a request's inputs with, per input, the tokens seen and whether
/// it was truncated.
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    pub facts: Vec<(u32, bool)>,
}

/// Prepares inputs off the async runtime (tokenizing a few hundred texts takes
/// milliseconds) and embeds them through the backbone's queue.
pub async fn embed_inputs(
    loaded: &LoadedBackbone,
    inputs: Vec<Input>,
    options: EmbedOptions,
    truncate: bool,
    priority: Priority,
    deadline: Option<Instant>,
) -> Result<Embedded> {
    let backbone = Arc::clone(&loaded.backbone);
    let prepared: Vec<Prepared> = tokio::task::spawn_blocking(move || {
        inputs
            .into_iter()
            .enumerate()
            .map(|(index, input)| backbone.prepare(index, input, truncate))
            .collect::<Result<Vec<_>>>()
    })
    .await
    .map_err(|err| Error::Inference(format!("preparing inputs failed: {err}")))??;
    let facts = prepared
        .iter()
        .map(|p| (p.tokens() as u32, p.truncated()))
        .collect();
    let vectors = loaded
        .queue
        .embed(prepared, options, priority, deadline)
        .await?;
    Ok(Embedded { vectors, facts })
}

impl EmbedderService {
    pub fn new(registry: Arc<BackboneRegistry>, limits: LimitsConfig) -> Self {
        Self { registry, limits }
    }

    async fn embed(
        &self,
        request: proto::EmbedRequest,
        deadline: Option<Instant>,
    ) -> Result<proto::EmbedResponse> {
        if request.backbone.is_empty() {
            return Err(Error::InvalidArgument(
                "backbone is empty: name one from Models.ListBackbones".into(),
            ));
        }
        let loaded = self.registry.get(&request.backbone)?;
        let priority = convert::priority(request.priority)?;
        let inputs = convert::inputs(request.inputs, &self.limits)?;
        let descriptor = loaded.backbone.descriptor();
        let options = convert::embed_options(request.pooling, request.normalize, descriptor)?;
        let truncate = request.truncate.unwrap_or(descriptor.default_truncate);
        let embedded = embed_inputs(&loaded, inputs, options, truncate, priority, deadline).await?;
        Ok(proto::EmbedResponse {
            backbone: descriptor.name.clone(),
            dimension: descriptor.dimension as u32,
            embeddings: embedded
                .vectors
                .into_iter()
                .zip(embedded.facts)
                .map(|(values, (tokens, truncated))| proto::Embedding {
                    values,
                    tokens,
                    truncated,
                })
                .collect(),
        })
    }
}

#[tonic::async_trait]
impl proto::embedder_server::Embedder for EmbedderService {
    async fn embed(
        &self,
        request: Request<proto::EmbedRequest>,
    ) -> Result<Response<proto::EmbedResponse>, Status> {
        let deadline = deadline::of(&request);
        let response = EmbedderService::embed(self, request.into_inner(), deadline).await?;
        Ok(Response::new(response))
    }
}
