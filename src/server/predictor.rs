//! The Predictor service: backbone features through a trained head, top-k labels
//! with probabilities. Requests for different heads on one backbone share its
//! batched forward passes; each head then runs per input.

use std::{sync::Arc, time::Instant};

use tonic::{Request, Response, Status};

use super::{convert, deadline, embedder::embed_inputs};
use crate::{
    backbone::{BuiltinClassifier, EmbedOptions},
    config::{is_valid_name, LimitsConfig},
    head::{
        store::{HeadStore, StoredHead},
        HeadRef,
    },
    proto,
    registry::{BackboneRegistry, LoadedBackbone},
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
        let (loaded, head) = match request.head.split_once('/') {
            Some((backbone, classifier)) => self.builtin(backbone, classifier)?,
            None => self.stored(&request.head)?,
        };
        let descriptor = loaded.backbone.descriptor();
        let priority = convert::priority(request.priority)?;
        let inputs = convert::inputs(request.inputs, &self.limits)?;
        let truncate = request.truncate.unwrap_or(descriptor.default_truncate);
        let embedded = embed_inputs(
            &loaded,
            inputs,
            head.options(),
            truncate,
            priority,
            deadline,
        )
        .await?;

        let labels = head.labels();
        let top_k = match request.top_k as usize {
            0 => labels.len(),
            k => k.min(labels.len()),
        };
        let mut predictions = Vec::with_capacity(embedded.vectors.len());
        for vector in &embedded.vectors {
            if vector.len() != head.input_dim() {
                return Err(Error::FailedPrecondition(format!(
                    "head {} takes {}-long features; the backbone gives {}",
                    head.name(),
                    head.input_dim(),
                    vector.len()
                )));
            }
            let probabilities = head.probabilities(vector);
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
            head: head.name(),
            version: head.version(),
            predictions,
        })
    }

    /// A trained head from the store, with its backbone.
    fn stored(&self, text: &str) -> Result<(Arc<LoadedBackbone>, Head)> {
        let reference = HeadRef::parse(text).map_err(Error::InvalidArgument)?;
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
        Ok((loaded, Head::Stored(head)))
    }

    /// A classifier that came with a backbone's weights: `<backbone>/<classifier>`.
    fn builtin(&self, backbone: &str, classifier: &str) -> Result<(Arc<LoadedBackbone>, Head)> {
        if !is_valid_name(backbone) || !is_valid_name(classifier) {
            return Err(Error::InvalidArgument(format!(
                "`{backbone}/{classifier}` is not a built-in head: `<backbone>/<classifier>`, \
                 each 1-64 letters, digits, '-', '_' or '.'"
            )));
        }
        let loaded = self.registry.get(backbone)?;
        let found = loaded.backbone.classifier(classifier).ok_or_else(|| {
            Error::HeadNotFound(format!(
                "{backbone}/{classifier} (backbone `{backbone}` has no built-in classifier \
                 `{classifier}`; ListBackbones shows its builtin_heads)"
            ))
        })?;
        Ok((
            loaded,
            Head::Builtin {
                backbone: backbone.to_owned(),
                classifier: found,
            },
        ))
    }
}

/// A head Predict can apply: trained and stored, or built into a backbone.
enum Head {
    Stored(Arc<StoredHead>),
    Builtin {
        backbone: String,
        classifier: Arc<BuiltinClassifier>,
    },
}

impl Head {
    fn name(&self) -> String {
        match self {
            Head::Stored(head) => head.meta.name.clone(),
            Head::Builtin {
                backbone,
                classifier,
            } => format!("{backbone}/{}", classifier.name),
        }
    }

    /// Built-in classifiers have no versions: 0.
    fn version(&self) -> u32 {
        match self {
            Head::Stored(head) => head.meta.version,
            Head::Builtin { .. } => 0,
        }
    }

    /// The features the head was trained on.
    fn options(&self) -> EmbedOptions {
        match self {
            Head::Stored(head) => head.meta.features.into(),
            Head::Builtin { classifier, .. } => classifier.options,
        }
    }

    fn labels(&self) -> &[String] {
        match self {
            Head::Stored(head) => &head.meta.labels,
            Head::Builtin { classifier, .. } => &classifier.labels,
        }
    }

    /// Length of the feature vectors the head takes.
    fn input_dim(&self) -> usize {
        match self {
            Head::Stored(head) => head.weights.input_dim(),
            Head::Builtin { classifier, .. } => classifier.input_dim(),
        }
    }

    /// Class probabilities of one feature vector.
    fn probabilities(&self, features: &[f32]) -> Vec<f32> {
        match self {
            Head::Stored(head) => head.weights.probabilities(features),
            Head::Builtin { classifier, .. } => classifier.probabilities(features),
        }
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
