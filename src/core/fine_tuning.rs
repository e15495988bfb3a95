//! The fine-tuning part of a training request: its defaults, and what it may
//! not be combined with. Bounds that depend on the backbone (its layers and
//! width) are checked when the job is submitted.

use super::training::TrainingOptions;
use crate::{
    head::{
        finetune::{FineTuneParams, LoraTargets},
        HeadKind, Solver,
    },
    Error, Result,
};

/// Fine-tuning as a client asks for it; `None` takes the default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FineTuningOptions {
    pub lora: LoraOptions,
    /// Peak learning rate of the adapters; None: 5e-4.
    pub backbone_learning_rate: Option<f64>,
    /// Share of the steps spent warming up; None: 0.1.
    pub warmup_fraction: Option<f64>,
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
/// `lora.layers` stays 0 for "all", which the job manager resolves against
/// the backbone.
pub fn fine_tune_params(
    tuning: &FineTuningOptions,
    options: &TrainingOptions,
    kind: &HeadKind,
) -> Result<FineTuneParams> {
    check_combination(options, kind)?;
    let mut params = FineTuneParams::defaults(0);
    let lora = &tuning.lora;
    params.lora.layers = lora.layers.unwrap_or(0);
    params.lora.rank = lora.rank.unwrap_or(params.lora.rank);
    params.lora.alpha = lora.alpha.unwrap_or(2.0 * params.lora.rank as f64);
    params.lora.dropout = lora.dropout.unwrap_or(0.0);
    if !lora.targets.is_empty() {
        params.lora.targets = LoraTargets::from_names(&lora.targets)?;
    }
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
            "unfreeze_top_layers and fine_tuning.lora are two methods; choose one",
        ));
    }
    Ok(())
}
