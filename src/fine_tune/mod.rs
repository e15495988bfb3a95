//! Fine-tuning a BERT backbone's top layers, with LoRA adapters or in full,
//! together with a linear head. The head is first fitted on the frozen features by the
//! default solver (L-BFGS), then adapters and head train together with AdamW:
//! fine-tuning starts where feature extraction ends and only has to improve
//! on it ("linear probing, then fine-tuning", Kumar et al. 2022; a random head
//! would first distort the pretrained features to fit itself).
//!
//! The frozen bottom (embeddings and the layers below the trained ones) runs
//! once per text, with fused kernels, and its hidden states serve every epoch
//! ([`cache`]); the trained top runs with differentiable kernels ([`steps`]).
//! Every random choice comes from the seed.

mod cache;
mod steps;

use tokio_util::sync::CancellationToken;

use crate::backbone::bert::graph::{BertGraph, Kernels, Tuning};
use crate::backbone::Adapter;
use crate::head::{fine_tune::FineTuneParams, model::HeadWeights, HeadMetrics};
use crate::{Error, Result};

/// Labelled texts, as token ids of the backbone's tokenizer.
pub struct TextExamples {
    pub ids: Vec<Vec<u32>>,
    pub labels: Vec<u32>,
    pub classes: usize,
}

/// What a run reports as it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// One optimiser step: its number (from 1), the planned number, and the
    /// batch's training loss.
    Step {
        step: usize,
        steps: usize,
        loss: f32,
    },
    /// An epoch's end (epoch 0: the head fitted on frozen features, before
    /// any adapter trained).
    Epoch(HeadMetrics),
}

/// The result: the adapter of the top layers (LoRA matrices or the layers'
/// weights), the linear head on the adapted features, and the chosen epoch's
/// metrics.
pub struct FineTuned {
    pub adapter: Adapter,
    pub head: HeadWeights,
    pub metrics: HeadMetrics,
    /// The head fitted on frozen features, before fine-tuning, measured the
    /// same way: what fine-tuning improved on.
    pub frozen_metrics: HeadMetrics,
    /// Examples trained on, and held out to choose the epoch.
    pub train_examples: usize,
    pub validation_examples: usize,
}

/// Where the frozen bottom's hidden states come from.
pub enum BottomSource {
    /// Computed here by the graph, kept when they fit in `budget_bytes`,
    /// else computed again for every batch.
    Compute { budget_bytes: usize },
    /// Computed elsewhere: per example, its token vectors after the layers
    /// below the adapted ones, `[tokens * hidden]` f32.
    Given(Vec<Vec<f32>>),
}

/// Fine-tunes `graph`'s top layers and a head on `examples`, the frozen
/// bottom from `bottoms`; `cancel` stops at the next step with
/// [`Error::Cancelled`].
pub fn fine_tune(
    graph: &BertGraph,
    examples: &TextExamples,
    params: &FineTuneParams,
    bottoms: BottomSource,
    cancel: &CancellationToken,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<FineTuned> {
    params.validate(graph.num_layers(), graph.hidden_size())?;
    if examples.classes < 2 || examples.labels.len() < 4 {
        return Err(Error::InvalidArgument(
            "fine-tuning needs at least four examples and two labels".into(),
        ));
    }
    if examples.ids.len() != examples.labels.len()
        || examples
            .labels
            .iter()
            .any(|&y| y as usize >= examples.classes)
        || examples.ids.iter().any(Vec::is_empty)
    {
        return Err(Error::InvalidArgument(
            "every example needs tokens and one of the head's labels".into(),
        ));
    }
    let split = graph.num_layers() - params.method.layers();
    let bottoms = match bottoms {
        BottomSource::Compute { budget_bytes } => {
            cache::Bottoms::compute(graph, &examples.ids, split, budget_bytes, cancel)?
        }
        BottomSource::Given(rows) => cache::Bottoms::given(graph, &examples.ids, split, rows)?,
    };
    tracing::info!(
        texts = examples.ids.len(),
        bytes = cache::Bottoms::size_bytes(graph, &examples.ids),
        kept = bottoms.kept(),
        "frozen bottom of the fine-tuning set"
    );
    steps::Run::new(graph, examples, params, bottoms)?.execute(cancel, on_progress)
}

/// Pooled, unit-length features of `ids` through `graph` with `adapter` on
/// its top layers (none: the frozen features), row after row: what a
/// fine-tuned head classifies.
pub fn adapted_features(
    graph: &BertGraph,
    adapter: Option<&Adapter>,
    ids: &[Vec<u32>],
) -> Result<Vec<f32>> {
    let tuning = match adapter {
        Some(adapter) => adapter.to_graph(graph)?,
        None => Tuning::Frozen(0),
    };
    let mut features = Vec::with_capacity(ids.len() * graph.hidden_size());
    for chunk in ids.chunks(32) {
        let texts: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
        let (ids, mask) = graph.padded_batch(&texts)?;
        let out = graph.forward_adapted(&ids, &mask, &tuning, Kernels::Fused)?;
        features.extend(cache::to_f32(&cache::pooled(&out, &mask)?)?);
    }
    Ok(features)
}

#[cfg(test)]
mod tests;
