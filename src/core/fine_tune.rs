//! The fine-tuning part of a training request: its defaults, and what it may
//! not be combined with. Bounds that depend on the backbone (its layers and
//! width) are checked when the job is submitted.

use super::training::TrainingOptions;
use crate::{
    head::{
        fine_tune::{FineTuneParams, LoraTargets},
        HeadKind, Solver,
    },
    Error, Result,
};

/// Fine-tuning as a client asks for it; `None` takes the default.
#[derive(Debug, Clone, PartialEq)]
pub struct FineTuningOptions {
    pub method: MethodOptions,
    /// Peak learning rate of the backbone's trained weights; None: 5e-4 for
    /// LoRA, 5e-5 for top layers.
    pub backbone_learning_rate: Option<f64>,
    /// Share of the steps spent warming up; None: 0.1.
    pub warmup_fraction: Option<f64>,
}

/// What of the backbone trains, as a client asks for it.
#[derive(Debug, Clone, PartialEq)]
pub enum MethodOptions {
    Lora(LoraOptions),
    /// The top `layers` encoder layers in full; None: 2 (all of them on a
    /// backbone with fewer).
    TopLayers {
        layers: Option<usize>,
    },
}

impl FineTuningOptions {
    /// The top `layers` layers in full, everything else at its default.
    pub fn top_layers(layers: usize) -> Self {
        Self {
            method: MethodOptions::TopLayers {
                layers: Some(layers),
            },
            backbone_learning_rate: None,
            warmup_fraction: None,
        }
    }
}

/// LoRA settings as a client gives them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoraOptions {
    /// Top encoder layers adapted; None: all of them.
    pub layers: Option<usize>,
    /// None: 8.
    pub rank: Option<usize>,
    /// None: twice the rank.
    pub alpha: Option<f64>,
    /// None: 0.
    pub dropout: Option<f64>,
    /// Empty: query and value.
    pub targets: Vec<String>,
}

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidArgument(message.into())
}

/// The run's settings: the documented defaults where the request is silent.
/// The method's layers stay 0 for "the default", which the job manager
/// resolves against the backbone.
pub fn fine_tune_params(
    tuning: &FineTuningOptions,
    options: &TrainingOptions,
    kind: &HeadKind,
) -> Result<FineTuneParams> {
    check_combination(options, kind)?;
    let mut params = match &tuning.method {
        MethodOptions::Lora(lora) => {
            let mut params = FineTuneParams::defaults(lora.layers.unwrap_or(0));
            if let Some(settings) = params.lora_mut() {
                settings.rank = lora.rank.unwrap_or(settings.rank);
                settings.alpha = lora.alpha.unwrap_or(2.0 * settings.rank as f64);
                settings.dropout = lora.dropout.unwrap_or(settings.dropout);
                if !lora.targets.is_empty() {
                    settings.targets = LoraTargets::from_names(&lora.targets)?;
                }
            }
            params
        }
        MethodOptions::TopLayers { layers } => FineTuneParams::top_layers(layers.unwrap_or(0)),
    };
    params.learning_rate = tuning
        .backbone_learning_rate
        .unwrap_or(params.learning_rate);
    params.warmup_fraction = tuning.warmup_fraction.unwrap_or(params.warmup_fraction);
    params.epochs = options.epochs.unwrap_or(params.epochs);
    params.head_learning_rate = options.learning_rate.unwrap_or(params.head_learning_rate);
    params.batch_size = options.batch_size.unwrap_or(params.batch_size);
    params.weight_decay = options.weight_decay.unwrap_or(params.weight_decay);
    params.validation_fraction = if options.no_validation {
        0.0
    } else {
        options
            .validation_fraction
            .unwrap_or(params.validation_fraction)
    };
    params.patience = options.early_stopping_patience.unwrap_or(params.patience);
    params.seed = options.seed;
    Ok(params)
}

/// Fine-tuning trains a linear head with AdamW next to the adapters; the
/// options of the other ways of training are refused by name.
fn check_combination(options: &TrainingOptions, kind: &HeadKind) -> Result<()> {
    if *kind != HeadKind::Linear {
        return Err(invalid(
            "fine_tuning trains a linear head on the adapted features; leave head unset \
             or linear",
        ));
    }
    if options.solver == Some(Solver::Lbfgs) || options.l2.is_some() || options.cv_folds.is_some() {
        return Err(invalid(
            "solver lbfgs, l2 and cv_folds train heads on frozen features; fine_tuning \
             trains the head with AdamW (the frozen-feature head it starts from is fitted \
             by L-BFGS with defaults)",
        ));
    }
    if options.balance_classes {
        return Err(invalid("balance_classes is not available with fine_tuning"));
    }
    if options.unfreeze_top_layers > 0 {
        return Err(invalid(
            "unfreeze_top_layers is a shorthand for fine_tuning.top_layers; set one of them",
        ));
    }
    Ok(())
}
