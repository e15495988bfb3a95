//! The Predictor service: backbone features through a trained head, top-k labels
//! with probabilities. Requests for different heads on one backbone share its
//! batched forward passes; each head then runs per input.

use std::{sync::Arc, time::Instant};

use tonic::{Request, Response, Status};

use super::{convert, deadline, embedder::embed_inputs};
use crate::{
    config::LimitsConfig,
    head::{store::HeadStore, HeadRef},
    proto,
    registry::BackboneRegistry,
    Error, Result,
};

pub struct PredictorService {
    registry: Arc<BackboneRegistry>,
    store: Arc<HeadStore>,
    limits: LimitsConfig,
}

impl PredictorService {
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

    async fn predict(
        &self,
        request: proto::PredictRequest,
        deadline: Option<Instant>,
    ) -> Result<proto::PredictResponse> {
        let reference = HeadRef::parse(&request.head).map_err(Error::InvalidArgument)?;
        let head = self.store.get(&reference)?;
        let meta = &head.meta;
        let loaded = self.registry.get(&meta.backbone)?;
        let descriptor = loaded.backbone.descriptor();
        if descriptor.fingerprint != meta.backbone_fingerprint {
            return Err(Error::FailedPrecondition(format!(
                "head {}@{} was trained on other weights of backbone `{}` \
                 (fingerprint {}, the backbone now has {}); retrain it",
                meta.name,
                meta.version,
                meta.backbone,
                meta.backbone_fingerprint,
                descriptor.fingerprint
            )));
        }
        let priority = convert::priority(request.priority)?;
        let inputs = convert::inputs(request.inputs, self.limits.max_inputs_per_request)?;
        let truncate = request.truncate.unwrap_or(descriptor.default_truncate);
        let embedded = embed_inputs(
            &loaded,
            inputs,
            meta.features.into(),
            truncate,
            priority,
            deadline,
        )
        .await?;

        let labels = &meta.labels;
        let top_k = match request.top_k as usize {
            0 => labels.len(),
            k => k.min(labels.len()),
        };
        let mut predictions = Vec::with_capacity(embedded.vectors.len());
        for vector in &embedded.vectors {
            if vector.len() != head.weights.input_dim() {
                return Err(Error::FailedPrecondition(format!(
                    "head {}@{} takes {}-long features; the backbone gives {}",
                    meta.name,
                    meta.version,
                    head.weights.input_dim(),
                    vector.len()
                )));
            }
            let probabilities = head.weights.probabilities(vector);
            let mut order: Vec<usize> = (0..probabilities.len()).collect();
            order.sort_by(|&a, &b| probabilities[b].total_cmp(&probabilities[a]));
            predictions.push(proto::Prediction {
                labels: order
                    .into_iter()
                    .take(top_k)
                    .map(|i| proto::LabelScore {
                        label: labels[i].clone(),
                        index: i as u32,
                        probability: probabilities[i],
                    })
                    .collect(),
            });
        }
        Ok(proto::PredictResponse {
            head: meta.name.clone(),
            version: meta.version,
            predictions,
        })
    }
}

#[tonic::async_trait]
impl proto::predictor_server::Predictor for PredictorService {
    async fn predict(
        &self,
        request: Request<proto::PredictRequest>,
    ) -> Result<Response<proto::PredictResponse>, Status> {
        let deadline = deadline::of(&request);
        let response = PredictorService::predict(self, request.into_inner(), deadline).await?;
        Ok(Response::new(response))
    }
}
