//! Heads: small task models trained on a backbone's features, stored on disk and
//! served next to the backbone. Many heads share one resident backbone.
//!
//! `model` holds the weights and applies them (with the building blocks of
//! [`crate::nn`]); `train` trains them: linear heads by default with
//! `logistic` (softmax regression solved to convergence by `lbfgs`, its
//! penalty chosen by cross-validation), MLP heads and explicit mini-batch
//! runs with AdamW; `calibration` measures and corrects their confidence;
//! `store` is the crash-safe on-disk store.

pub mod adapters;
pub mod calibration;
pub mod fine_tune;
pub mod lbfgs;
pub mod logistic;
pub mod model;
pub mod namespace;
pub mod store;
pub mod train;

use serde::{Deserialize, Serialize};

use crate::backbone::{EmbedOptions, Pooling};

/// The architecture of a head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum HeadKind {
    /// One linear layer and softmax.
    Linear,
    /// A hidden layer (ReLU, dropout while training), then linear and softmax.
    Mlp { hidden_size: usize, dropout: f32 },
}

/// How a head's weights are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Solver {
    /// Full-batch L-BFGS on the L2-penalised cross-entropy of a linear head,
    /// to convergence; the penalty chosen by cross-validation, then a refit
    /// on every example.
    // The command line lists the values without these docs, as it always has.
    #[value(help = None::<&str>)]
    Lbfgs,
    /// Mini-batch AdamW with a cosine learning-rate schedule.
    #[value(help = None::<&str>)]
    Adamw,
}

impl Solver {
    /// What heads stored before solvers could be chosen were trained with.
    fn stored_before_choice() -> Self {
        Solver::Adamw
    }
}

/// Hyper-parameters of a training run, every default applied. A stored head
/// keeps the values its run settled on (the chosen `l2`, the folds used).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingParams {
    #[serde(default = "Solver::stored_before_choice")]
    pub solver: Solver,
    /// AdamW: passes over the training examples (the most, with early stopping).
    pub epochs: usize,
    /// AdamW: the peak learning rate, decayed to 0 by a cosine over `epochs`.
    pub learning_rate: f64,
    pub batch_size: usize,
    /// AdamW: decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW: share held out for validation; 0 when the run trained without.
    pub validation_fraction: f64,
    /// AdamW: 0 means never stop early.
    pub early_stopping_patience: usize,
    /// AdamW: after early stopping found the best epoch, train again on every
    /// example (held-out ones included) for that many epochs.
    #[serde(default)]
    pub refit: bool,
    /// L-BFGS: strength of the L2 penalty on the weights, `mean loss +
    /// l2 / 2 * |W|^2` on all examples; 0 in a request: chosen by
    /// cross-validation.
    #[serde(default)]
    pub l2: f64,
    /// L-BFGS: folds of the cross-validation that chooses `l2` and measures
    /// the head; 0 without validation.
    #[serde(default)]
    pub cv_folds: usize,
    pub balance_classes: bool,
    pub seed: u64,
}

impl Default for TrainingParams {
    /// A linear head with no options: L-BFGS, penalty by 5-fold cross-validation.
    fn default() -> Self {
        Self {
            solver: Solver::Lbfgs,
            epochs: 0,
            learning_rate: 0.0,
            batch_size: 0,
            weight_decay: 0.0,
            validation_fraction: 0.0,
            early_stopping_patience: 0,
            refit: false,
            l2: 0.0,
            cv_folds: 5,
            balance_classes: false,
            seed: 0,
        }
    }
}

impl TrainingParams {
    /// The planned number of progress steps: epochs for AdamW (a refit adds
    /// its own), fits along the penalty path plus the refit for L-BFGS.
    pub fn planned_steps(&self) -> usize {
        match self.solver {
            Solver::Adamw => self.epochs,
            Solver::Lbfgs => logistic::planned_steps(self),
        }
    }
}

/// Loss and accuracy of a head at one step of training (an epoch, or a fit).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HeadMetrics {
    pub epoch: usize,
    pub train_loss: f32,
    pub train_accuracy: f32,
    pub validation_loss: Option<f32>,
    pub validation_accuracy: Option<f32>,
    /// Expected calibration error of the validation predictions (15 bins).
    #[serde(default)]
    pub validation_ece: Option<f32>,
    /// The temperature the head's logits were divided by; None when
    /// temperature scaling did not help.
    #[serde(default)]
    pub temperature: Option<f32>,
}

/// How the backbone's features were computed for the head; Predict must use the
/// same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureSettings {
    pub pooling: Pooling,
    pub normalize: bool,
}

impl From<EmbedOptions> for FeatureSettings {
    fn from(options: EmbedOptions) -> Self {
        Self {
            pooling: options.pooling,
            normalize: options.normalize,
        }
    }
}

impl From<FeatureSettings> for EmbedOptions {
    fn from(settings: FeatureSettings) -> Self {
        Self {
            pooling: settings.pooling,
            normalize: settings.normalize,
        }
    }
}

/// Everything known about a published head version, stored as `head.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadMetadata {
    pub name: String,
    pub version: u32,
    pub backbone: String,
    /// sha256 of the backbone weights the head was trained on.
    pub backbone_fingerprint: String,
    pub features: FeatureSettings,
    /// Length of the feature vectors the head takes.
    pub input_dim: usize,
    pub labels: Vec<String>,
    pub kind: HeadKind,
    pub training: TrainingParams,
    pub metrics: HeadMetrics,
    pub train_examples: u64,
    pub validation_examples: u64,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// How the backbone's part of a fine-tuned head was trained; None for a
    /// head on frozen features. A fine-tuned head's file holds its adapter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fine_tuning: Option<fine_tune::FineTuning>,
}

/// The backbone a head's features come from: its configured name and the
/// fingerprint of its weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackboneRef {
    pub name: String,
    pub fingerprint: String,
}

impl HeadMetadata {
    /// Version 0 of head `name`, of `kind`, on `backbone`'s features taken
    /// with `features`: `input_dim` wide, answering one of `labels`. Training
    /// settings, metrics and counts start at their defaults and creation at
    /// the epoch; who trains it sets what it knows (`..HeadMetadata::new(..)`),
    /// so that a field added here reaches no caller that does not need it.
    pub fn new(
        name: impl Into<String>,
        kind: HeadKind,
        backbone: BackboneRef,
        features: FeatureSettings,
        input_dim: usize,
        labels: Vec<String>,
    ) -> Self {
        Self {
            name: name.into(),
            version: 0,
            backbone: backbone.name,
            backbone_fingerprint: backbone.fingerprint,
            features,
            input_dim,
            labels,
            kind,
            training: TrainingParams::default(),
            metrics: HeadMetrics::default(),
            train_examples: 0,
            validation_examples: 0,
            created_at_ms: 0,
            fine_tuning: None,
        }
    }
}

/// A head name with an optional version: `name` or `name@version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadRef {
    pub name: String,
    pub version: Option<u32>,
}

impl HeadRef {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (name, version) = match text.split_once('@') {
            Some((name, version)) => {
                let version = version
                    .parse::<u32>()
                    .ok()
                    .filter(|v| *v > 0)
                    .ok_or_else(|| format!("`{version}` is not a head version (1, 2, ...)"))?;
                (name, Some(version))
            }
            None => (text, None),
        };
        if !crate::config::is_valid_name(name) {
            return Err(format!(
                "`{name}` is not a valid head name: 1-64 letters, digits, '-', '_' or '.'"
            ));
        }
        Ok(Self {
            name: name.to_owned(),
            version,
        })
    }
}

impl std::fmt::Display for HeadRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.version {
            Some(version) => write!(f, "{}@{version}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_references() {
        assert_eq!(
            HeadRef::parse("sentiment").unwrap(),
            HeadRef {
                name: "sentiment".into(),
                version: None
            }
        );
        assert_eq!(HeadRef::parse("sentiment@3").unwrap().version, Some(3));
        for bad in ["", "a/b", "../x", "x@", "x@0", "x@-1", "x@two", "@1"] {
            assert!(HeadRef::parse(bad).is_err(), "{bad}");
        }
    }
}
