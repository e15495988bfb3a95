//! The Predict use case: backbone features through a head, top-k labels with
//! probabilities. Requests for different heads on one backbone share its
//! batched forward passes; each head then runs on its own request's vectors.

use std::{sync::Arc, time::Instant};

use crate::{
    backbone::{BuiltinClassifier, EmbedOptions, Input, Want},
    batching::Priority,
    config::{is_valid_name, LimitsConfig},
    head::{
        model::HeadWeights,
        store::{HeadStore, StoredHead},
    },
    nn::Dense,
    registry::{BackboneRegistry, LoadedBackbone},
    task::run_blocking,
    Error, Result,
};

use super::{
    answer_budget::AnswerBudget,
    inputs::check_request_inputs,
    lookup::{adapter_of, stored_head},
    Scope,
};

/// What a client asks Predict for.
#[derive(Debug, Clone)]
pub struct PredictRequest {
    /// `name`, `name@version`, or a built-in `<backbone>/<classifier>`.
    pub head: String,
    pub inputs: Vec<Input>,
    /// None: the backbone's default.
    pub truncate: Option<bool>,
    /// 0: every label.
    pub top_k: usize,
    pub priority: Priority,
    pub deadline: Option<Instant>,
}

/// One label of a prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelScore {
    pub label: String,
    /// Its position in the head's label list.
    pub index: u32,
    pub probability: f32,
}

/// Predict's answer: per input, labels by falling probability.
#[derive(Debug, Clone)]
pub struct PredictResponse {
    pub head: String,
    /// 0 for built-in classifiers, which have no versions.
    pub version: u32,
    pub predictions: Vec<Vec<LabelScore>>,
}

/// Below this many multiply-adds a head runs on the calling task: handing it
/// to a blocking thread would cost more than it saves.
const INLINE_HEAD_WORK: u64 = 1_000_000;

/// Bytes an answer spends on one label besides its text when sent: its
/// index, probability and framing (protobuf: at most 20).
const ANSWER_BYTES_PER_LABEL: usize = 20;

/// Bytes an answer spends on one input besides its labels (framing).
const ANSWER_BYTES_PER_INPUT: usize = 8;

/// Bytes of an answer of `inputs` predictions of `top_k` of `labels` (0:
/// all) at most, whichever labels come out on top: the longest `top_k`.
fn answer_bytes(labels: &[String], top_k: usize, inputs: usize) -> usize {
    let mut lengths: Vec<usize> = labels.iter().map(String::len).collect();
    let returned = match top_k {
        0 => lengths.len(),
        k => k.min(lengths.len()),
    };
    // Only which lengths are the longest matters, not their order: a
    // partition, not a sort, on every call.
    if returned > 0 && returned < lengths.len() {
        lengths.select_nth_unstable_by(returned - 1, |a, b| b.cmp(a));
    }
    let per_input = lengths[..returned]
        .iter()
        .fold(ANSWER_BYTES_PER_INPUT, |sum, &len| {
            sum.saturating_add(len.saturating_add(ANSWER_BYTES_PER_LABEL))
        });
    per_input.saturating_mul(inputs)
}

/// Applies trained and built-in heads to backbone features.
pub struct Predictor {
    registry: Arc<BackboneRegistry>,
    store: Arc<HeadStore>,
    limits: LimitsConfig,
}

impl Predictor {
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

    /// Predicts with a built-in head, or a stored one in `scope`; the
    /// answer's size is reserved in `budget` before any work.
    pub async fn predict(
        &self,
        request: PredictRequest,
        scope: &Scope,
        budget: &dyn AnswerBudget,
    ) -> Result<PredictResponse> {
        let (loaded, head) = match request.head.split_once('/') {
            Some((backbone, classifier)) => self.builtin(backbone, classifier)?,
            None => self.stored(&request.head, scope).await?,
        };
        check_request_inputs(&request.inputs, &self.limits)?;
        let work = head
            .multiply_adds()
            .saturating_mul(request.inputs.len() as u64);
        if work > self.limits.max_head_multiply_adds {
            return Err(Error::LimitExceeded(format!(
                "applying head {} to {} inputs takes {work} multiply-adds; a request may \
                 take at most {} (limits.max_head_multiply_adds): send fewer inputs per request",
                head.name(),
                request.inputs.len(),
                self.limits.max_head_multiply_adds
            )));
        }
        self.reserve_answer(&head, &request, budget)?;
        let adapter = match &head {
            Head::Stored(stored) => adapter_of(&self.store, stored).await?,
            Head::Builtin { .. } => None,
        };
        let descriptor = loaded.backbone.descriptor();
        let truncate = request.truncate.unwrap_or(descriptor.default_truncate);
        let embedded = loaded
            .embed(
                request.inputs,
                Want::adapted(head.options(), adapter),
                truncate,
                request.priority,
                request.deadline,
            )
            .await?;
        let (name, version) = (head.name(), head.version());
        let top_k = request.top_k;
        let predictions = if work <= INLINE_HEAD_WORK {
            head.apply(&embedded.vectors, top_k)?
        } else {
            run_blocking("applying a head", move || {
                head.apply(&embedded.vectors, top_k)
            })
            .await??
        };
        Ok(PredictResponse {
            head: name,
            version,
            predictions,
        })
    }

    /// Refuses an answer larger than limits.max_response_bytes, then reserves
    /// its size in `budget`.
    fn reserve_answer(
        &self,
        head: &Head,
        request: &PredictRequest,
        budget: &dyn AnswerBudget,
    ) -> Result<()> {
        let name = head.name();
        // The head's name and version come once.
        let bytes = answer_bytes(head.labels(), request.top_k, request.inputs.len())
            .saturating_add(name.len() + ANSWER_BYTES_PER_INPUT);
        let max = self.limits.max_response_bytes;
        if bytes > max {
            return Err(Error::LimitExceeded(format!(
                "the answer of head {} for {} inputs with top_k {} takes up to {bytes} bytes; \
                 an answer may take at most {max} (limits.max_response_bytes): ask for fewer \
                 labels (top_k) or send fewer inputs per request",
                name,
                request.inputs.len(),
                request.top_k
            )));
        }
        budget.reserve(bytes)
    }

    /// A trained head from the store, with its backbone.
    async fn stored(&self, text: &str, scope: &Scope) -> Result<(Arc<LoadedBackbone>, Head)> {
        let (loaded, head) = stored_head(&self.store, &self.registry, text, scope).await?;
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

/// Multiply-adds of one feature vector through a dense layer.
fn dense_work(layer: &Dense) -> u64 {
    (layer.inputs as u64).saturating_mul(layer.outputs as u64)
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

    /// Multiply-adds of applying the head to one feature vector.
    fn multiply_adds(&self) -> u64 {
        match self {
            Head::Stored(head) => match &head.weights {
                HeadWeights::Linear { output } => dense_work(output),
                HeadWeights::Mlp { hidden, output } => {
                    dense_work(hidden).saturating_add(dense_work(output))
                }
            },
            Head::Builtin { classifier, .. } => dense_work(&classifier.weights),
        }
    }

    /// The `top_k` most probable labels (0: all) of each feature vector.
    fn apply(&self, vectors: &[Vec<f32>], top_k: usize) -> Result<Vec<Vec<LabelScore>>> {
        let labels = self.labels();
        let top_k = match top_k {
            0 => labels.len(),
            k => k.min(labels.len()),
        };
        vectors
            .iter()
            .map(|vector| {
                if vector.len() != self.input_dim() {
                    return Err(Error::FailedPrecondition(format!(
                        "head {} takes {}-long features; the backbone gives {}",
                        self.name(),
                        self.input_dim(),
                        vector.len()
                    )));
                }
                let probabilities = self.probabilities(vector);
                let mut order: Vec<usize> = (0..probabilities.len()).collect();
                order.sort_by(|&a, &b| probabilities[b].total_cmp(&probabilities[a]));
                Ok(order
                    .into_iter()
                    .take(top_k)
                    .map(|i| LabelScore {
                        label: labels[i].clone(),
                        index: i as u32,
                        probability: probabilities[i],
                    })
                    .collect())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_sized_by_the_longest_labels_returned() {
        let labels: Vec<String> = ["a", "bbbb", "cc"].map(String::from).to_vec();
        let per_label = ANSWER_BYTES_PER_LABEL;
        let per_input = ANSWER_BYTES_PER_INPUT;
        assert_eq!(answer_bytes(&labels, 1, 1), per_input + 4 + per_label);
        assert_eq!(
            answer_bytes(&labels, 2, 3),
            3 * (per_input + 6 + 2 * per_label)
        );
        // 0 and more than there are: every label.
        let all = per_input + 7 + 3 * per_label;
        assert_eq!(answer_bytes(&labels, 0, 2), 2 * all);
        assert_eq!(answer_bytes(&labels, 9, 2), 2 * all);
    }
}
