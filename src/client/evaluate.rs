//! Measuring a head on labelled examples: Predict in batches, then the
//! metrics of the predicted labels against the true ones.

use anyhow::{bail, Result};
use prost::Message;
use serde_json::{json, Value};
use tonic::transport::Channel;

use super::{chunks, describe, examples::Example, metrics::Evaluation, progress::StatusLine};
use crate::proto::{self, predictor_client::PredictorClient};

/// Bytes of inputs per Predict request: a quarter of the server's default
/// message limit.
const BATCH_BYTES: usize = 4 * 1024 * 1024;

/// A head's metrics on a set of examples, and the version that answered.
pub struct HeadEvaluation {
    pub head: String,
    pub version: u32,
    pub evaluation: Evaluation,
}

impl HeadEvaluation {
    pub fn to_json(&self) -> Value {
        json!({
            "head": self.head,
            "version": self.version,
            "examples": self.evaluation.examples,
            "accuracy": self.evaluation.accuracy,
            "macro_avg": {
                "precision": self.evaluation.macro_precision,
                "recall": self.evaluation.macro_recall,
                "f1": self.evaluation.macro_f1,
            },
            "per_label": self.evaluation.per_label,
            "confusion_matrix": {
                "labels": self.evaluation.labels,
                "rows_true_columns_predicted": self.evaluation.confusion,
            },
        })
    }

    /// The head and its metrics as tables for a terminal.
    pub fn table(&self) -> String {
        // A built-in head has no versions (0).
        let head = match self.version {
            0 => self.head.clone(),
            version => format!("{}@{version}", self.head),
        };
        format!("head {head}\n{}", self.evaluation.table())
    }
}

/// Predicts the most probable label of each example with `head`, in batches
/// of at most `batch_size`, and measures the answers. Every batch asks the
/// same version: the one that answered the first.
pub async fn evaluate(
    channel: Channel,
    head: &str,
    examples: Vec<Example>,
    batch_size: usize,
) -> Result<HeadEvaluation> {
    if examples.is_empty() {
        bail!("no examples to evaluate on");
    }
    let (labels, inputs): (Vec<String>, Vec<proto::Input>) = examples
        .into_iter()
        .map(|e| (e.label, e.input.into_proto()))
        .unzip();
    let sizes: Vec<usize> = inputs.iter().map(Message::encoded_len).collect();
    let mut client = PredictorClient::new(channel).max_decoding_message_size(usize::MAX);
    let mut inputs = inputs.into_iter();
    let mut pinned = head.to_owned();
    let mut answered = (head.to_owned(), 0);
    let mut pairs = Vec::with_capacity(labels.len());
    let mut status = StatusLine::stderr();
    for range in chunks::plan(&sizes, batch_size, BATCH_BYTES) {
        let request = proto::PredictRequest {
            head: pinned.clone(),
            inputs: inputs.by_ref().take(range.len()).collect(),
            top_k: 1,
            // Evaluation is bulk work: it must not delay interactive calls.
            priority: proto::Priority::Bulk as i32,
            truncate: None,
        };
        let response = client
            .predict(request)
            .await
            .map_err(describe)?
            .into_inner();
        if response.predictions.len() != range.len() {
            bail!(
                "the server answered {} predictions for {} inputs",
                response.predictions.len(),
                range.len()
            );
        }
        for (truth, prediction) in labels[range.clone()].iter().zip(response.predictions) {
            let predicted = prediction.labels.into_iter().next().map(|l| l.label);
            pairs.push((truth.clone(), predicted.unwrap_or_default()));
        }
        // A built-in head has no versions (0) and is asked by name.
        if response.version > 0 && !pinned.contains('@') {
            pinned = format!("{}@{}", response.head, response.version);
        }
        answered = (response.head, response.version);
        status.update(&format!(
            "evaluated {}/{} examples",
            range.end,
            labels.len()
        ));
    }
    status.end();
    Ok(HeadEvaluation {
        head: answered.0,
        version: answered.1,
        evaluation: Evaluation::of(&pairs),
    })
}
