//! Training a head on feature vectors. [`train`] picks the solver: linear
//! heads by default go to [`super::logistic`] (softmax regression solved to
//! convergence by L-BFGS, the penalty chosen by cross-validation); MLP heads
//! and runs that ask for epochs train here with candle: AdamW on a
//! (class-weighted) cross-entropy, mini-batches, a cosine learning-rate
//! schedule, a held-out validation split, the best epoch's weights kept,
//! early stopping, and, when early stopping chose the number of epochs, a
//! refit on every example for that many. Every random choice is drawn from
//! the job's seed, so the same seed on the same data gives the same head.

use tokio_util::sync::CancellationToken;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{Optimizer, ParamsAdamW};

use super::{
    calibration::{Calibration, Scores},
    logistic,
    model::HeadWeights,
    HeadKind, HeadMetrics, Solver, TrainingParams,
};
use crate::{
    nn::{rng::Rng, Dense},
    Error, Result,
};

/// Labelled feature vectors.
pub struct TrainingSet {
    /// `len * dim` values, row-major.
    pub features: Vec<f32>,
    pub dim: usize,
    /// Class index of each row.
    pub labels: Vec<u32>,
    pub classes: usize,
}

impl TrainingSet {
    /// `labels.len()` rows of `dim` features each, labelled with classes
    /// below `classes`.
    pub fn new(features: Vec<f32>, dim: usize, labels: Vec<u32>, classes: usize) -> Self {
        Self {
            features,
            dim,
            labels,
            classes,
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// A trained head and how it was measured.
pub struct TrainedHead {
    pub weights: HeadWeights,
    /// The published weights' metrics: validation figures from the held-out
    /// rows or the cross-validation, training figures from the final fit.
    pub metrics: HeadMetrics,
    /// Examples the published weights were fitted on.
    pub train_examples: usize,
    /// Examples the validation metrics were measured on.
    pub validation_examples: usize,
    /// The parameters with what the run settled on (chosen penalty, folds).
    pub params: TrainingParams,
}

/// Sees each step's metrics and the planned number of steps.
pub type OnStep<'a> = dyn FnMut(&HeadMetrics, usize) + 'a;

/// A trainable dense layer.
struct Layer {
    weight: Var,
    bias: Var,
}

impl Layer {
    /// PyTorch's default initialisation: uniform in ±1/sqrt(fan_in).
    fn new(inputs: usize, outputs: usize, rng: &mut Rng, device: &Device) -> Result<Self> {
        let bound = 1.0 / (inputs as f32).sqrt();
        let mut draw = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| (rng.next_f32() * 2.0 - 1.0) * bound)
                .collect()
        };
        Ok(Self {
            weight: Var::from_vec(draw(inputs * outputs), (outputs, inputs), device)?,
            bias: Var::from_vec(draw(outputs), outputs, device)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?)
    }

    fn snapshot(&self) -> Result<Dense> {
        let (outputs, inputs) = self.weight.dims2()?;
        Ok(Dense {
            weight: self.weight.flatten_all()?.to_vec1()?,
            bias: self.bias.to_vec1()?,
            inputs,
            outputs,
        })
    }
}

struct Network {
    hidden: Option<(Layer, f32)>,
    output: Layer,
}

impl Network {
    fn new(kind: &HeadKind, set: &TrainingSet, rng: &mut Rng, device: &Device) -> Result<Self> {
        let (dim, classes) = (set.dim, set.classes);
        Ok(match kind {
            HeadKind::Linear => Self {
                hidden: None,
                output: Layer::new(dim, classes, rng, device)?,
            },
            HeadKind::Mlp {
                hidden_size,
                dropout,
            } => Self {
                hidden: Some((Layer::new(dim, *hidden_size, rng, device)?, *dropout)),
                output: Layer::new(*hidden_size, classes, rng, device)?,
            },
        })
    }

    fn vars(&self) -> Vec<Var> {
        let mut vars = vec![self.output.weight.clone(), self.output.bias.clone()];
        if let Some((hidden, _)) = &self.hidden {
            vars.extend([hidden.weight.clone(), hidden.bias.clone()]);
        }
        vars
    }

    /// Logits; `dropout_rng` is Some while training.
    fn forward(&self, x: &Tensor, dropout_rng: Option<&mut Rng>) -> Result<Tensor> {
        let x = match &self.hidden {
            None => x.clone(),
            Some((hidden, p)) => {
                let h = hidden.forward(x)?.relu()?;
                match dropout_rng {
                    Some(rng) if *p > 0.0 => {
                        let keep = 1.0 - p;
                        let mask: Vec<f32> = (0..h.elem_count())
                            .map(|_| {
                                if rng.next_f32() < keep {
                                    1.0 / keep
                                } else {
                                    0.0
                                }
                            })
                            .collect();
                        h.mul(&Tensor::from_vec(mask, h.shape(), h.device())?)?
                    }
                    _ => h,
                }
            }
        };
        self.output.forward(&x)
    }

    fn snapshot(&self) -> Result<HeadWeights> {
        let output = self.output.snapshot()?;
        Ok(match &self.hidden {
            None => HeadWeights::Linear { output },
            Some((hidden, _)) => HeadWeights::Mlp {
                hidden: hidden.snapshot()?,
                output,
            },
        })
    }
}

/// Rows of the set as tensors.
fn gather(set: &TrainingSet, rows: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
    let mut x = Vec::with_capacity(rows.len() * set.dim);
    let mut y = Vec::with_capacity(rows.len());
    for &r in rows {
        x.extend_from_slice(&set.features[r * set.dim..(r + 1) * set.dim]);
        y.push(set.labels[r]);
    }
    Ok((
        Tensor::from_vec(x, (rows.len(), set.dim), device)?,
        Tensor::from_vec(y, rows.len(), device)?,
    ))
}

/// Cross-entropy, each example weighted by its class weight.
fn weighted_cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    class_weights: &Tensor,
) -> Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = log_probs.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?;
    let weights = class_weights.index_select(labels, 0)?;
    let total = (picked * &weights)?.sum_all()?;
    Ok((total.neg()? / weights.sum_all()?.to_scalar::<f32>()? as f64)?)
}

/// Plain (unweighted) loss and accuracy of the network on some rows.
fn evaluate(network: &Network, x: &Tensor, y: &Tensor, uniform: &Tensor) -> Result<(f32, f32)> {
    let logits = network.forward(x, None)?;
    let loss = weighted_cross_entropy(&logits, y, uniform)?.to_scalar::<f32>()?;
    let predicted = logits.argmax(D::Minus1)?;
    let correct = predicted
        .eq(y)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok((loss, correct / y.dims1()? as f32))
}

/// The rows held out for validation and the rows trained on, shuffled.
fn split_rows(len: usize, params: &TrainingParams, rng: &mut Rng) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..len).collect();
    rng.shuffle(&mut order);
    let validation_len = if params.validation_fraction > 0.0 {
        ((len as f64 * params.validation_fraction).round() as usize).clamp(1, len - 1)
    } else {
        0
    };
    let train = order.split_off(validation_len);
    (order, train)
}

/// Per-class loss weights: inverse class frequency when `balance`, else 1.
fn class_weights(
    set: &TrainingSet,
    train_rows: &[usize],
    balance: bool,
    device: &Device,
) -> Result<Tensor> {
    let mut counts = vec![0usize; set.classes];
    for &r in train_rows {
        counts[set.labels[r] as usize] += 1;
    }
    let weights: Vec<f32> = counts
        .iter()
        .map(|&c| {
            if balance && c > 0 {
                train_rows.len() as f32 / (set.classes as f32 * c as f32)
            } else {
                1.0
            }
        })
        .collect();
    Ok(Tensor::from_vec(weights, set.classes, device)?)
}

/// Loss and accuracy after an epoch, on the training rows and, when there
/// are any, the validation rows.
fn epoch_metrics(
    epoch: usize,
    network: &Network,
    train: (&Tensor, &Tensor),
    validation: Option<&(Tensor, Tensor)>,
    uniform: &Tensor,
) -> Result<HeadMetrics> {
    let (train_loss, train_accuracy) = evaluate(network, train.0, train.1, uniform)?;
    let (validation_loss, validation_accuracy) = match validation {
        Some((x, y)) => {
            let (loss, accuracy) = evaluate(network, x, y, uniform)?;
            (Some(loss), Some(accuracy))
        }
        None => (None, None),
    };
    Ok(HeadMetrics {
        epoch,
        train_loss,
        train_accuracy,
        validation_loss,
        validation_accuracy,
        ..HeadMetrics::default()
    })
}

/// Trains a head on the CPU; `on_step` sees each step's metrics (an epoch,
/// or a fit of the L-BFGS path) with the planned number of steps; `cancel`
/// stops at the next mini-batch or L-BFGS iteration with
/// [`Error::Cancelled`].
pub fn train(
    set: &TrainingSet,
    kind: &HeadKind,
    params: &TrainingParams,
    cancel: &CancellationToken,
    on_step: &mut OnStep,
) -> Result<TrainedHead> {
    train_on_device(set, kind, params, &Device::Cpu, cancel, on_step)
}

/// [`train`], with the AdamW solver's tensors on `device` (the backbone's:
/// a GPU when it serves from one). The L-BFGS solver runs on the CPU in any
/// case: its features are already in host memory, it works in f64, and its
/// products are small enough that a device would spend more on the copies.
pub fn train_on_device(
    set: &TrainingSet,
    kind: &HeadKind,
    params: &TrainingParams,
    device: &Device,
    cancel: &CancellationToken,
    on_step: &mut OnStep,
) -> Result<TrainedHead> {
    if set.classes < 2 || set.len() < 2 {
        return Err(Error::InvalidArgument(
            "training needs at least two examples and two labels".into(),
        ));
    }
    if set.labels.iter().any(|&y| y as usize >= set.classes) {
        return Err(Error::InvalidArgument(
            "an example's label is not among the head's labels".into(),
        ));
    }
    match (params.solver, kind) {
        (Solver::Lbfgs, HeadKind::Linear) => logistic::train_linear(set, params, cancel, on_step),
        (Solver::Lbfgs, HeadKind::Mlp { .. }) => Err(Error::InvalidArgument(
            "the lbfgs solver trains linear heads; an MLP head trains with adamw".into(),
        )),
        (Solver::Adamw, _) => train_adamw(set, kind, params, device, cancel, on_step),
    }
}

/// Mini-batch AdamW: a run on the training rows, checked against the
/// held-out rows; then, when asked, a refit on every row for the best
/// epoch's number of epochs.
fn train_adamw(
    set: &TrainingSet,
    kind: &HeadKind,
    params: &TrainingParams,
    device: &Device,
    cancel: &CancellationToken,
    on_step: &mut OnStep,
) -> Result<TrainedHead> {
    let mut rng = Rng(params.seed);
    let (validation_rows, train_rows) = split_rows(set.len(), params, &mut rng);
    let validation = if validation_rows.is_empty() {
        None
    } else {
        Some(gather(set, &validation_rows, device)?)
    };
    let search = Run {
        device,
        rows: train_rows,
        validation: validation.as_ref(),
        epochs: params.epochs,
        offset: 0,
        planned: params.epochs,
    }
    .execute(set, kind, params, &mut rng, cancel, on_step)?;
    let calibration = calibrate(set, &validation_rows, &search.weights);
    if !params.refit || validation.is_none() {
        return Ok(calibrated(
            TrainedHead {
                weights: search.weights,
                metrics: search.metrics,
                train_examples: set.len() - validation_rows.len(),
                validation_examples: validation_rows.len(),
                params: params.clone(),
            },
            calibration,
        ));
    }
    // The held-out rows chose the number of epochs; now they train too.
    let best_epoch = search.metrics.epoch;
    let refit = Run {
        device,
        rows: (0..set.len()).collect(),
        validation: None,
        epochs: best_epoch,
        offset: search.epochs_run,
        planned: search.epochs_run + best_epoch,
    }
    .execute(set, kind, params, &mut rng, cancel, on_step)?;
    Ok(calibrated(
        TrainedHead {
            weights: refit.weights,
            metrics: HeadMetrics {
                validation_loss: search.metrics.validation_loss,
                validation_accuracy: search.metrics.validation_accuracy,
                ..refit.metrics
            },
            train_examples: set.len(),
            validation_examples: validation_rows.len(),
            params: params.clone(),
        },
        calibration,
    ))
}

/// Calibration of the kept weights on the held-out rows; None without any.
fn calibrate(set: &TrainingSet, rows: &[usize], weights: &HeadWeights) -> Option<Calibration> {
    if rows.is_empty() {
        return None;
    }
    let mut logits = Vec::with_capacity(rows.len() * set.classes);
    for &r in rows {
        logits.extend(weights.logits(&set.features[r * set.dim..(r + 1) * set.dim]));
    }
    let labels: Vec<u32> = rows.iter().map(|&r| set.labels[r]).collect();
    Some(
        Scores {
            logits: &logits,
            classes: set.classes,
            labels: &labels,
        }
        .calibrate(),
    )
}

/// The head with its logits cooled when that helped, and its calibration
/// error; the validation loss is the calibrated one.
fn calibrated(mut head: TrainedHead, calibration: Option<Calibration>) -> TrainedHead {
    if let Some(c) = calibration {
        if let Some(t) = c.temperature {
            head.weights.cool(t as f32);
            head.metrics.temperature = Some(t as f32);
            head.metrics.validation_loss = Some(c.loss as f32);
        }
        head.metrics.validation_ece = Some(c.ece as f32);
    }
    head
}

/// The learning rate of epoch `epoch` (from 1): a cosine from the peak down
/// towards 0 over the planned epochs. A refit replays the same rates.
fn scheduled_rate(params: &TrainingParams, epoch: usize) -> f64 {
    let progress = (epoch - 1) as f64 / params.epochs.max(1) as f64;
    params.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// One pass of training from fresh weights.
struct Run<'a> {
    /// Where the head trains: the backbone's device.
    device: &'a Device,
    rows: Vec<usize>,
    validation: Option<&'a (Tensor, Tensor)>,
    epochs: usize,
    /// Added to epoch numbers in reports (a refit continues the count).
    offset: usize,
    planned: usize,
}

/// The weights kept by a run, their metrics, and the epochs it ran.
struct RunResult {
    weights: HeadWeights,
    metrics: HeadMetrics,
    epochs_run: usize,
}

impl Run<'_> {
    fn execute(
        mut self,
        set: &TrainingSet,
        kind: &HeadKind,
        params: &TrainingParams,
        rng: &mut Rng,
        cancel: &CancellationToken,
        on_step: &mut OnStep,
    ) -> Result<RunResult> {
        let (x_train, y_train) = gather(set, &self.rows, self.device)?;
        let class_weights = class_weights(set, &self.rows, params.balance_classes, self.device)?;
        let uniform = Tensor::ones(set.classes, DType::F32, self.device)?;
        let network = Network::new(kind, set, rng, self.device)?;
        let mut optimizer = candle_nn::AdamW::new(
            network.vars(),
            ParamsAdamW {
                lr: params.learning_rate,
                weight_decay: params.weight_decay,
                ..Default::default()
            },
        )?;
        let mut best: Option<(f32, HeadMetrics, HeadWeights)> = None;
        let mut epochs_without_improvement = 0;
        let mut epochs_run = 0;
        for epoch in 1..=self.epochs {
            optimizer.set_learning_rate(scheduled_rate(params, epoch));
            rng.shuffle(&mut self.rows);
            for rows in self.rows.chunks(params.batch_size.max(1)) {
                if cancel.is_cancelled() {
                    return Err(Error::Cancelled("the job was cancelled".into()));
                }
                let (x, y) = gather(set, rows, self.device)?;
                let logits = network.forward(&x, Some(rng))?;
                let loss = weighted_cross_entropy(&logits, &y, &class_weights)?;
                optimizer.backward_step(&loss)?;
            }
            epochs_run = epoch;
            let metrics = epoch_metrics(
                self.offset + epoch,
                &network,
                (&x_train, &y_train),
                self.validation,
                &uniform,
            )?;
            let validation_loss = metrics.validation_loss;
            on_step(&metrics, self.planned);

            // Keep the weights of the best epoch: lowest validation loss, or the
            // last epoch when there is no validation set.
            let score = validation_loss.unwrap_or(f32::NEG_INFINITY);
            let improved = best
                .as_ref()
                .is_none_or(|(b, _, _)| score < *b || validation_loss.is_none());
            if improved {
                best = Some((score, metrics, network.snapshot()?));
                epochs_without_improvement = 0;
            } else {
                epochs_without_improvement += 1;
                if params.early_stopping_patience > 0
                    && epochs_without_improvement >= params.early_stopping_patience
                {
                    break;
                }
            }
        }
        let (_, metrics, weights) =
            best.ok_or_else(|| Error::InvalidArgument("training needs at least one epoch".into()))?;
        Ok(RunResult {
            weights,
            metrics,
            epochs_run,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two Gaussian-ish blobs in 4 dimensions, separable along the first axis.
    fn blobs(n: usize, seed: u64) -> TrainingSet {
        let mut rng = Rng(seed);
        let mut features = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let class = (i % 2) as u32;
            let centre = if class == 0 { -1.0 } else { 1.0 };
            features.push(centre + (rng.next_f32() - 0.5));
            for _ in 0..3 {
                features.push(rng.next_f32() - 0.5);
            }
            labels.push(class);
        }
        TrainingSet {
            features,
            dim: 4,
            labels,
            classes: 2,
        }
    }

    /// Mini-batch AdamW with a fixed number of epochs and no weight decay.
    fn params(seed: u64) -> TrainingParams {
        TrainingParams {
            solver: Solver::Adamw,
            epochs: 30,
            learning_rate: 0.05,
            batch_size: 16,
            validation_fraction: 0.1,
            seed,
            ..TrainingParams::default()
        }
    }

    fn run(
        set: &TrainingSet,
        kind: &HeadKind,
        params: &TrainingParams,
    ) -> (TrainedHead, Vec<HeadMetrics>) {
        let mut seen = Vec::new();
        let trained = train(set, kind, params, &CancellationToken::new(), &mut |m, _| {
            seen.push(m.clone())
        })
        .unwrap();
        (trained, seen)
    }

    #[test]
    fn a_linear_head_learns_a_separable_problem() {
        let set = blobs(200, 1);
        let (trained, epochs) = run(&set, &HeadKind::Linear, &params(7));
        assert_eq!(epochs.len(), 30);
        assert!(
            trained.metrics.validation_accuracy.unwrap() >= 0.95,
            "{:?}",
            trained.metrics
        );
        assert!(epochs.last().unwrap().train_loss < epochs[0].train_loss);
        assert_eq!(trained.validation_examples, 20);
        assert_eq!(trained.train_examples, 180);
    }

    #[test]
    fn an_mlp_with_dropout_learns_too() {
        let set = blobs(200, 2);
        let kind = HeadKind::Mlp {
            hidden_size: 16,
            dropout: 0.2,
        };
        let (trained, _) = run(&set, &kind, &params(3));
        assert!(
            trained.metrics.validation_accuracy.unwrap() >= 0.9,
            "{:?}",
            trained.metrics
        );
        assert!(matches!(trained.weights, HeadWeights::Mlp { .. }));
    }

    #[test]
    fn the_same_seed_gives_the_same_head_and_another_seed_does_not() {
        let set = blobs(100, 3);
        let kind = HeadKind::Mlp {
            hidden_size: 8,
            dropout: 0.1,
        };
        let (a, _) = run(&set, &kind, &params(11));
        let (b, _) = run(&set, &kind, &params(11));
        let (c, _) = run(&set, &kind, &params(12));
        assert_eq!(a.weights, b.weights);
        assert_eq!(a.metrics, b.metrics);
        assert_ne!(a.weights, c.weights);
    }

    #[test]
    fn early_stopping_ends_before_the_last_epoch() {
        // Random labels: nothing to learn, so validation loss soon stops improving.
        let mut set = blobs(60, 4);
        let mut rng = Rng(99);
        for label in &mut set.labels {
            *label = (rng.next_u64() % 2) as u32;
        }
        let mut p = params(5);
        p.epochs = 500;
        p.early_stopping_patience = 3;
        let (_, epochs) = run(&set, &HeadKind::Linear, &p);
        assert!(epochs.len() < 500, "ran {} epochs", epochs.len());
    }

    #[test]
    fn early_stopping_picks_the_epochs_then_a_refit_trains_on_every_example() {
        // A fifth of the labels flipped: validation loss soon stops improving.
        let mut set = blobs(200, 7);
        let mut rng = Rng(8);
        for label in &mut set.labels {
            if rng.next_f32() < 0.2 {
                *label = 1 - *label;
            }
        }
        let kind = HeadKind::Mlp {
            hidden_size: 16,
            dropout: 0.0,
        };
        let mut p = params(4);
        p.epochs = 200;
        p.learning_rate = 0.01;
        p.early_stopping_patience = 3;
        p.refit = true;
        let mut steps = Vec::new();
        let trained = train(
            &set,
            &kind,
            &p,
            &CancellationToken::new(),
            &mut |m, planned| steps.push((m.epoch, planned, m.validation_loss.is_some())),
        )
        .unwrap();
        // The search ran some epochs with validation, the refit as many as
        // the best epoch, without, its numbers continuing the count.
        let searched = steps.iter().filter(|s| s.2).count();
        assert!(searched < 200, "early stopping never stopped");
        let refit: Vec<_> = steps[searched..].to_vec();
        let best = searched - p.early_stopping_patience;
        assert_eq!(refit.len(), best, "{steps:?}");
        assert!(refit.iter().all(|s| !s.2 && s.1 == searched + best));
        let numbers: Vec<usize> = steps.iter().map(|s| s.0).collect();
        assert_eq!(numbers, (1..=steps.len()).collect::<Vec<_>>());
        assert_eq!(
            (trained.train_examples, trained.validation_examples),
            (200, 20)
        );
        let m = &trained.metrics;
        assert!(m.validation_accuracy.unwrap() >= 0.6, "{m:?}");
        assert!(m.validation_ece.is_some(), "{m:?}");
    }

    #[test]
    fn cancellation_stops_training() {
        let set = blobs(40, 5);
        let result = train(
            &set,
            &HeadKind::Linear,
            &params(1),
            &{
                let token = CancellationToken::new();
                token.cancel();
                token
            },
            &mut |_, _| {},
        );
        assert!(matches!(result, Err(Error::Cancelled(_))));
    }

    #[test]
    fn class_weights_favour_the_rare_class() {
        // 90% class 0, and the classes overlap: unweighted training leans to 0.
        let mut set = blobs(200, 6);
        for (i, label) in set.labels.iter_mut().enumerate() {
            *label = u32::from(i % 10 == 0);
        }
        let mut p = params(9);
        p.validation_fraction = 0.0;
        let recall_of_rare = |balance: bool| {
            let mut p = p.clone();
            p.balance_classes = balance;
            let (trained, _) = run(&set, &HeadKind::Linear, &p);
            let rare: Vec<usize> = (0..set.len()).filter(|&i| set.labels[i] == 1).collect();
            rare.iter()
                .filter(|&&i| {
                    let probs = trained
                        .weights
                        .probabilities(&set.features[i * 4..i * 4 + 4]);
                    probs[1] > probs[0]
                })
                .count()
        };
        assert!(recall_of_rare(true) > recall_of_rare(false));
    }
}
