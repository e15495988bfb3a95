//! The Embed use case: inputs in, feature vectors out.

use std::{sync::Arc, time::Instant};

use super::{
    inputs::check_request_inputs,
    lookup::{adapter_of, stored_head},
    Scope,
};
use crate::{
    backbone::{Adapter, BackboneDescriptor, EmbedOptions, Input, Modality, Pooling, Want},
    batching::Priority,
    config::LimitsConfig,
    head::store::HeadStore,
    registry::BackboneRegistry,
    Error, Result,
};

/// What a client asks Embed for; `None` takes the backbone's default.
#[derive(Debug, Clone)]
pub struct EmbedRequest {
    pub backbone: String,
    pub inputs: Vec<Input>,
    pub pooling: Option<Pooling>,
    pub normalize: Option<bool>,
    pub truncate: Option<bool>,
    /// The length the client expects the vectors to have; only the backbone's
    /// own dimension is honoured (no backbone here is trained to be cut short).
    pub dimensions: Option<usize>,
    pub priority: Priority,
    pub deadline: Option<Instant>,
    /// A fine-tuned head (`name` or `name@version`) of this backbone whose
    /// adapted features are asked for; None: the frozen backbone's.
    pub head: Option<String>,
}

/// One input's vector and what the model saw of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    pub values: Vec<f32>,
    /// Tokens the model saw (0 for images).
    pub tokens: u32,
    pub truncated: bool,
}

/// Embed's answer.
#[derive(Debug, Clone)]
pub struct EmbedResponse {
    pub backbone: String,
    pub dimension: usize,
    pub embeddings: Vec<Embedding>,
}

/// Embeds inputs with the resident backbones, and fine-tuned heads' adapters.
pub struct Embedder {
    registry: Arc<BackboneRegistry>,
    store: Arc<HeadStore>,
    limits: LimitsConfig,
}

impl Embedder {
    pub fn new(
        registry: Arc<BackboneRegistry>,
        store: Arc<HeadStore>,
        limits: LimitsConfig,
    ) -> Self {
        Self {
            registry,
            store,
            limits,
        }
    }

    /// The features of `request.inputs`; a head must be in `scope`.
    pub async fn embed(&self, request: EmbedRequest, scope: &Scope) -> Result<EmbedResponse> {
        if request.backbone.is_empty() {
            return Err(Error::InvalidArgument(
                "backbone is empty: name one from Models.ListBackbones".into(),
            ));
        }
        let loaded = self.registry.get(&request.backbone)?;
        check_request_inputs(&request.inputs, &self.limits)?;
        let adapter = match &request.head {
            Some(head) => Some(self.adapter(&request.backbone, head, scope).await?),
            None => None,
        };
        let descriptor = loaded.backbone.descriptor();
        check_dimensions(request.dimensions, descriptor)?;
        let options = embed_options(request.pooling, request.normalize, descriptor)?;
        let truncate = request.truncate.unwrap_or(descriptor.default_truncate);
        let embedded = loaded
            .embed(
                request.inputs,
                Want::adapted(options, adapter),
                truncate,
                request.priority,
                request.deadline,
            )
            .await?;
        Ok(EmbedResponse {
            backbone: descriptor.name.clone(),
            dimension: descriptor.dimension,
            embeddings: embedded
                .vectors
                .into_iter()
                .zip(embedded.facts)
                .map(|(values, (tokens, truncated))| Embedding {
                    values,
                    tokens,
                    truncated,
                })
                .collect(),
        })
    }
}

impl Embedder {
    /// The adapter of fine-tuned head `head` of backbone `backbone`.
    async fn adapter(&self, backbone: &str, head: &str, scope: &Scope) -> Result<Arc<Adapter>> {
        let (_, stored) = stored_head(&self.store, &self.registry, head, scope).await?;
        let meta = &stored.meta;
        if meta.backbone != backbone {
            return Err(Error::InvalidArgument(format!(
                "head {}@{} runs on backbone `{}`, not `{backbone}`",
                meta.name, meta.version, meta.backbone
            )));
        }
        adapter_of(&self.store, &stored).await?.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "head {}@{} was trained on frozen features, which Embed gives without \
                 a head; name a fine-tuned head",
                meta.name, meta.version
            ))
        })
    }
}

fn check_dimensions(dimensions: Option<usize>, descriptor: &BackboneDescriptor) -> Result<()> {
    match dimensions {
        Some(asked) if asked != descriptor.dimension => Err(Error::InvalidArgument(format!(
            "dimensions: backbone `{}` gives vectors of {} dimensions and was not trained \
             to be shortened (Matryoshka); ask for {} or leave dimensions unset",
            descriptor.name, descriptor.dimension, descriptor.dimension
        ))),
        _ => Ok(()),
    }
}

/// The request's pooling and normalization, defaulting to the backbone's.
pub fn embed_options(
    pooling: Option<Pooling>,
    normalize: Option<bool>,
    descriptor: &BackboneDescriptor,
) -> Result<EmbedOptions> {
    let pooling = pooling.unwrap_or(descriptor.default_options.pooling);
    if pooling != Pooling::Mean && descriptor.modality == Modality::Image {
        return Err(Error::InvalidArgument(format!(
            "backbone `{}` takes images, which are pooled globally (POOLING_MEAN); \
             POOLING_{} is for text backbones",
            descriptor.name,
            pooling.as_str().to_uppercase()
        )));
    }
    Ok(EmbedOptions {
        pooling,
        normalize: normalize.unwrap_or(descriptor.default_options.normalize),
    })
}
