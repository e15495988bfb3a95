//! What a head fine-tuned with its backbone records about its training: the
//! method (LoRA adapters or top layers trained in full), their settings and
//! the parameters of a run, as the head store keeps them and a job submits
//! them. The loop that trains with them is [`crate::fine_tune`], a layer
//! above; these types stay here so that the head store reads them without
//! depending on it.

use serde::{Deserialize, Serialize};

use super::{Solver, TrainingParams};
use crate::{Error, Result};

/// Which projections of each adapted layer get an adapter; recorded as the
/// list of their names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "Vec<String>", try_from = "Vec<String>")]
pub struct LoraTargets {
    pub query: bool,
    pub key: bool,
    pub value: bool,
    pub attention_output: bool,
    /// The feed-forward input (`intermediate.dense`).
    pub intermediate: bool,
    /// The feed-forward output (`output.dense`).
    pub output: bool,
}

impl Default for LoraTargets {
    /// Query and value, as in the LoRA paper and `peft`'s default for BERT.
    fn default() -> Self {
        Self {
            query: true,
            key: false,
            value: true,
            attention_output: false,
            intermediate: false,
            output: false,
        }
    }
}

impl LoraTargets {
    /// The projections' names, as the CLI and the JSON reports spell them.
    pub const NAMES: [&'static str; 6] = [
        "query",
        "key",
        "value",
        "attention_output",
        "intermediate",
        "output",
    ];

    pub(crate) fn flags(&self) -> [bool; 6] {
        [
            self.query,
            self.key,
            self.value,
            self.attention_output,
            self.intermediate,
            self.output,
        ]
    }

    /// The targets named in `names` (each of [`Self::NAMES`]), none else.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Result<Self> {
        let mut flags = [false; 6];
        for name in names {
            let index = Self::NAMES
                .iter()
                .position(|n| *n == name.as_ref())
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "lora.targets: unknown projection `{}` (one of {})",
                        name.as_ref(),
                        Self::NAMES.join(", ")
                    ))
                })?;
            flags[index] = true;
        }
        let [query, key, value, attention_output, intermediate, output] = flags;
        Ok(Self {
            query,
            key,
            value,
            attention_output,
            intermediate,
            output,
        })
    }

    /// The names of the chosen projections.
    pub fn names(&self) -> Vec<&'static str> {
        Self::NAMES
            .iter()
            .zip(self.flags())
            .filter_map(|(name, on)| on.then_some(*name))
            .collect()
    }

    pub fn any(&self) -> bool {
        self.flags().iter().any(|&on| on)
    }
}

impl From<LoraTargets> for Vec<String> {
    fn from(targets: LoraTargets) -> Self {
        targets.names().into_iter().map(str::to_owned).collect()
    }
}

impl TryFrom<Vec<String>> for LoraTargets {
    type Error = Error;

    fn try_from(names: Vec<String>) -> Result<Self> {
        Self::from_names(&names)
    }
}

/// The adapters: on the top `layers` encoder layers, of rank `rank`, their
/// updates scaled by `alpha / rank`; while training, each adapter's input is
/// dropped out at the rate `dropout` (as `peft`'s `lora_dropout`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoraSettings {
    pub layers: usize,
    pub rank: usize,
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    pub targets: LoraTargets,
}

/// How a fine-tuned head's backbone part was trained: what its record keeps
/// beside the head's own training settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FineTuning {
    pub method: Method,
    /// Peak learning rate of the backbone's trained part.
    pub backbone_learning_rate: f64,
    /// Share of the steps over which the learning rates rise to their peak.
    pub warmup_fraction: f64,
}

/// What of the backbone trains.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Method {
    /// Low-rank adapters on the top layers.
    Lora(LoraSettings),
    /// The top layers, every weight of them.
    TopLayers(TopLayerSettings),
}

/// How many top layers train in full when a request does not say.
pub const DEFAULT_TOP_LAYERS: usize = 2;

/// The top `layers` encoder layers train in full.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TopLayerSettings {
    pub layers: usize,
}

impl Method {
    /// How many top encoder layers train.
    pub fn layers(&self) -> usize {
        match self {
            Self::Lora(lora) => lora.layers,
            Self::TopLayers(top) => top.layers,
        }
    }

    pub fn set_layers(&mut self, layers: usize) {
        match self {
            Self::Lora(lora) => lora.layers = layers,
            Self::TopLayers(top) => top.layers = layers,
        }
    }

    /// The method's name, as the API and the CLI spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Lora(_) => "lora",
            Self::TopLayers(_) => "top_layers",
        }
    }
}

/// Hyper-parameters of a fine-tuning run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FineTuneParams {
    pub method: Method,
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate of the backbone's trained weights.
    pub learning_rate: f64,
    /// Peak learning rate of the head (already fitted on frozen features).
    pub head_learning_rate: f64,
    pub weight_decay: f64,
    /// Share of the steps over which the learning rates rise from 0 to their
    /// peak; they then fall linearly to 0 at the last step.
    pub warmup_fraction: f64,
    /// Share of the examples held out to choose the best epoch.
    pub validation_fraction: f64,
    /// Epochs without a better validation loss before stopping; 0: never.
    pub patience: usize,
    pub seed: u64,
}

impl FineTuneParams {
    /// Defaults for a backbone of `layers` encoder layers: rank 8 (alpha 16)
    /// on query and value of every layer, 3 epochs of batches of 16, learning
    /// rates 5e-4 (adapters) and 1e-3 (head), weight decay 0.01, 10% warm-up,
    /// 10% held out, patience 2 (the frozen head is the first candidate, and
    /// an epoch under warm-up seldom beats it).
    pub fn defaults(layers: usize) -> Self {
        Self {
            method: Method::Lora(LoraSettings {
                layers,
                rank: 8,
                alpha: 16.0,
                dropout: 0.0,
                targets: LoraTargets::default(),
            }),
            epochs: 3,
            batch_size: 16,
            learning_rate: 5e-4,
            head_learning_rate: 1e-3,
            weight_decay: 0.01,
            warmup_fraction: 0.1,
            validation_fraction: 0.1,
            patience: 2,
            seed: 0,
        }
    }

    /// Defaults for training the top `layers` layers in full: those of
    /// [`Self::defaults`] but a backbone learning rate of 5e-5 (the usual
    /// peak for fine-tuning BERT's own weights, Hugging Face Trainer's
    /// default; LoRA's 5e-4 would move pretrained weights too far).
    pub fn top_layers(layers: usize) -> Self {
        Self {
            method: Method::TopLayers(TopLayerSettings { layers }),
            learning_rate: 5e-5,
            ..Self::defaults(layers)
        }
    }

    /// The LoRA settings, if the method is LoRA.
    pub fn lora_mut(&mut self) -> Option<&mut LoraSettings> {
        match &mut self.method {
            Method::Lora(lora) => Some(lora),
            Method::TopLayers(_) => None,
        }
    }

    /// The run's settings as a head's record keeps them: the head's own
    /// (AdamW) and the backbone's part.
    pub fn record(&self) -> (TrainingParams, FineTuning) {
        let training = TrainingParams {
            solver: Solver::Adamw,
            epochs: self.epochs,
            learning_rate: self.head_learning_rate,
            batch_size: self.batch_size,
            weight_decay: self.weight_decay,
            validation_fraction: self.validation_fraction,
            early_stopping_patience: self.patience,
            refit: false,
            l2: 0.0,
            cv_folds: 0,
            balance_classes: false,
            seed: self.seed,
        };
        let tuning = FineTuning {
            method: self.method,
            backbone_learning_rate: self.learning_rate,
            warmup_fraction: self.warmup_fraction,
        };
        (training, tuning)
    }

    /// The run's settings from a record made by [`Self::record`].
    pub fn from_record(training: &TrainingParams, tuning: &FineTuning) -> Self {
        Self {
            method: tuning.method,
            epochs: training.epochs,
            batch_size: training.batch_size,
            learning_rate: tuning.backbone_learning_rate,
            head_learning_rate: training.learning_rate,
            weight_decay: training.weight_decay,
            warmup_fraction: tuning.warmup_fraction,
            validation_fraction: training.validation_fraction,
            patience: training.early_stopping_patience,
            seed: training.seed,
        }
    }

    /// Each bound, naming the field it concerns, for a backbone of `layers`
    /// encoder layers of width `hidden`.
    pub fn validate(&self, layers: usize, hidden: usize) -> Result<()> {
        let invalid = |message: String| Err(Error::InvalidArgument(message));
        let trained = self.method.layers();
        if trained == 0 || trained > layers {
            return invalid(format!(
                "{}.layers must be in [1, {layers}] (the backbone's encoder layers), got \
                 {trained}",
                self.method.name()
            ));
        }
        let Method::Lora(lora) = &self.method else {
            return self.validate_schedule();
        };
        if lora.rank == 0 || lora.rank > hidden {
            return invalid(format!(
                "lora.rank must be in [1, {hidden}], got {}",
                lora.rank
            ));
        }
        if !(lora.alpha.is_finite() && lora.alpha > 0.0) {
            return invalid(format!("lora.alpha must be positive, got {}", lora.alpha));
        }
        if !(0.0..1.0).contains(&lora.dropout) {
            return invalid(format!(
                "lora.dropout must be in [0, 1), got {}",
                lora.dropout
            ));
        }
        if !lora.targets.any() {
            return invalid("lora.targets must name at least one projection".into());
        }
        self.validate_schedule()
    }

    fn validate_schedule(&self) -> Result<()> {
        let invalid = |message: String| Err(Error::InvalidArgument(message));
        if !(1..=100).contains(&self.epochs) {
            return invalid(format!("epochs must be in [1, 100], got {}", self.epochs));
        }
        if !(1..=1024).contains(&self.batch_size) {
            return invalid(format!(
                "batch_size must be in [1, 1024], got {}",
                self.batch_size
            ));
        }
        for (name, rate) in [
            ("learning_rate", self.learning_rate),
            ("head_learning_rate", self.head_learning_rate),
        ] {
            if !(rate.is_finite() && rate > 0.0 && rate <= 1.0) {
                return invalid(format!("{name} must be in (0, 1], got {rate}"));
            }
        }
        if !(self.weight_decay.is_finite() && (0.0..=1.0).contains(&self.weight_decay)) {
            return invalid(format!(
                "weight_decay must be in [0, 1], got {}",
                self.weight_decay
            ));
        }
        if !(0.0..1.0).contains(&self.warmup_fraction) {
            return invalid(format!(
                "warmup_fraction must be in [0, 1), got {}",
                self.warmup_fraction
            ));
        }
        if !(0.0..0.5).contains(&self.validation_fraction) {
            return invalid(format!(
                "validation_fraction must be in [0, 0.5), got {}",
                self.validation_fraction
            ));
        }
        Ok(())
    }
}
