//! The training run: the head fitted on frozen features, then the backbone's
//! trained part (adapters or top layers) and head trained together with AdamW on a warm-up-then-linear-decay schedule,
//! the epoch with the best validation loss kept.

use candle_core::{Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use tokio_util::sync::CancellationToken;

use super::cache::{pooled, to_f32, Bottoms};
use super::{FineTuned, Progress, TextExamples};
use crate::backbone::bert::adapter::{slot_shapes, Adapter, LoraAdapter};
use crate::backbone::bert::graph::{BertGraph, Kernels, Tuning};
use crate::backbone::bert::lora::{LayerAdapters, LowRank};
use crate::head::fine_tune::{FineTuneParams, LoraSettings, Method};
use crate::head::{model::HeadWeights, train, HeadKind, HeadMetrics, TrainingParams};
use crate::nn::{rng::Rng, Dense};
use crate::{Error, Result};

/// Examples per forward pass when measuring (no gradients kept).
const EVAL_BATCH: usize = 64;

pub struct Run<'a> {
    graph: &'a BertGraph,
    examples: &'a TextExamples,
    params: &'a FineTuneParams,
    bottoms: Bottoms<'a>,
    train_rows: Vec<usize>,
    validation_rows: Vec<usize>,
    rng: Rng,
}

/// The head as trainable variables: `[classes, hidden]` and `[classes]`.
struct Head {
    weight: Var,
    bias: Var,
}

impl Head {
    fn logits(&self, features: &Tensor) -> Result<Tensor> {
        Ok(features
            .matmul(&self.weight.as_tensor().t()?)?
            .broadcast_add(self.bias.as_tensor())?)
    }
}

impl<'a> Run<'a> {
    pub fn new(
        graph: &'a BertGraph,
        examples: &'a TextExamples,
        params: &'a FineTuneParams,
        bottoms: Bottoms<'a>,
    ) -> Result<Self> {
        let mut rng = Rng(params.seed);
        let mut order: Vec<usize> = (0..examples.labels.len()).collect();
        rng.shuffle(&mut order);
        let held_out = if params.validation_fraction > 0.0 {
            ((order.len() as f64 * params.validation_fraction).round() as usize)
                .clamp(1, order.len() - 2)
        } else {
            0
        };
        let train_rows = order.split_off(held_out);
        Ok(Self {
            graph,
            examples,
            params,
            bottoms,
            train_rows,
            validation_rows: order,
            rng,
        })
    }

    pub fn execute(
        mut self,
        cancel: &CancellationToken,
        on_progress: &mut dyn FnMut(&Progress),
    ) -> Result<FineTuned> {
        let unadapted = Tuning::Frozen(self.params.method.layers());
        let head = self.frozen_head(&unadapted, cancel)?;
        let frozen_metrics = self.measure(0, &unadapted, &head, None)?;
        on_progress(&Progress::Epoch(frozen_metrics.clone()));
        let tuning = self.new_tuning()?;
        let metrics = self.train(&tuning, &head, &frozen_metrics, cancel, on_progress)?;
        let first_layer = self.graph.num_layers() - self.params.method.layers();
        let adapter = match (&tuning, &self.params.method) {
            (Tuning::Lora(adapters), Method::Lora(lora)) => Adapter::Lora(
                LoraAdapter::from_trained(adapters, lora.rank, lora.alpha, first_layer)?,
            ),
            (Tuning::Layers(layers), _) => Adapter::Layers(layers.to_host(first_layer)?),
            _ => {
                return Err(Error::Internal(
                    "the trained part is not the method's".into(),
                ))
            }
        };
        Ok(FineTuned {
            head: head_weights(&head)?,
            adapter,
            metrics,
            frozen_metrics,
            train_examples: self.train_rows.len(),
            validation_examples: self.validation_rows.len(),
        })
    }

    /// The linear head the default solver fits on the training rows' frozen
    /// features.
    fn frozen_head(&self, unadapted: &Tuning, cancel: &CancellationToken) -> Result<Head> {
        let set = train::TrainingSet {
            features: self.features(&self.train_rows, unadapted)?,
            dim: self.graph.hidden_size(),
            labels: self
                .train_rows
                .iter()
                .map(|&r| self.examples.labels[r])
                .collect(),
            classes: self.examples.classes,
        };
        let params = TrainingParams {
            seed: self.params.seed,
            ..TrainingParams::default()
        };
        let device = self.graph.device();
        let trained = train::train_on_device(
            &set,
            &HeadKind::Linear,
            &params,
            &device,
            cancel,
            &mut |_, _| {},
        )?;
        let HeadWeights::Linear { output } = trained.weights else {
            return Err(Error::Internal("the frozen head is not linear".into()));
        };
        let dtype = self.graph.dtype();
        let weight = Tensor::from_vec(output.weight, (output.outputs, output.inputs), &device)?;
        let bias = Tensor::from_vec(output.bias, output.outputs, &device)?;
        Ok(Head {
            weight: Var::from_tensor(&weight.to_dtype(dtype)?)?,
            bias: Var::from_tensor(&bias.to_dtype(dtype)?)?,
        })
    }

    /// What trains, as it starts: the base model's top layers either way.
    fn new_tuning(&mut self) -> Result<Tuning> {
        Ok(match self.params.method {
            Method::Lora(lora) => Tuning::Lora(self.new_adapters(lora)?),
            Method::TopLayers(top) => Tuning::Layers(self.graph.trainable_top(top.layers)?),
        })
    }

    /// New adapters (B = 0) on the targets of the top layers.
    fn new_adapters(&mut self, lora: LoraSettings) -> Result<Vec<LayerAdapters>> {
        let shapes = slot_shapes(self.graph.hidden_size(), self.graph.intermediate_size());
        let wanted = lora.targets.flags();
        let spec = (self.graph.dtype(), &self.graph.device());
        let rng = &mut self.rng;
        let mut layer = || -> Result<LayerAdapters> {
            let mut slots: [Option<LowRank>; 6] = Default::default();
            for ((slot, &wanted), &shape) in slots.iter_mut().zip(&wanted).zip(&shapes) {
                if wanted {
                    let adapter = LowRank::new(shape, lora.rank, lora.alpha, rng, spec)?;
                    *slot = Some(adapter.with_dropout(lora.dropout, rng.next_u64()));
                }
            }
            Ok(LayerAdapters::from_slots(slots))
        };
        (0..lora.layers).map(|_| layer()).collect()
    }

    /// The epochs of AdamW; returns the kept epoch's metrics, its weights set.
    fn train(
        &mut self,
        tuning: &Tuning,
        head: &Head,
        frozen: &HeadMetrics,
        cancel: &CancellationToken,
        on_progress: &mut dyn FnMut(&Progress),
    ) -> Result<HeadMetrics> {
        let params = self.params;
        let mut vars: Vec<Var> = tuning.vars();
        let optimiser = |vars: Vec<Var>, lr: f64| {
            AdamW::new(
                vars,
                ParamsAdamW {
                    lr,
                    weight_decay: params.weight_decay,
                    ..ParamsAdamW::default()
                },
            )
        };
        let mut adapter_opt = optimiser(vars.clone(), params.learning_rate)?;
        let mut head_opt = optimiser(
            vec![head.weight.clone(), head.bias.clone()],
            params.head_learning_rate,
        )?;
        vars.extend([head.weight.clone(), head.bias.clone()]);
        let batches = self.train_rows.len().div_ceil(params.batch_size);
        let schedule = Schedule {
            steps: batches * params.epochs,
            warmup: params.warmup_fraction,
        };
        // The frozen head is the first candidate: fine-tuning must beat it.
        let mut best = (frozen.clone(), snapshot(&vars)?);
        let mut stale = 0;
        for epoch in 1..=params.epochs {
            let mut rows = self.train_rows.clone();
            self.rng.shuffle(&mut rows);
            let (mut loss_sum, mut correct) = (0.0, 0usize);
            for (index, batch) in rows.chunks(params.batch_size).enumerate() {
                if cancel.is_cancelled() {
                    return Err(Error::Cancelled("fine-tuning was cancelled".into()));
                }
                let step = (epoch - 1) * batches + index + 1;
                let factor = schedule.factor(step);
                adapter_opt.set_learning_rate(params.learning_rate * factor);
                head_opt.set_learning_rate(params.head_learning_rate * factor);
                let (loss, right) =
                    self.step(batch, tuning, head, &mut [&mut adapter_opt, &mut head_opt])?;
                loss_sum += f64::from(loss) * batch.len() as f64;
                correct += right;
                on_progress(&Progress::Step {
                    step,
                    steps: schedule.steps,
                    loss,
                });
            }
            let n = self.train_rows.len() as f64;
            let trained = ((loss_sum / n) as f32, (correct as f64 / n) as f32);
            let metrics = self.measure(epoch, tuning, head, Some(trained))?;
            on_progress(&Progress::Epoch(metrics.clone()));
            if better(&metrics, &best.0) {
                best = (metrics, snapshot(&vars)?);
                stale = 0;
            } else {
                stale += 1;
                if params.patience > 0 && stale >= params.patience {
                    break;
                }
            }
        }
        restore(&vars, &best.1)?;
        Ok(best.0)
    }

    /// One optimiser step on `batch`: its loss and how many it got right.
    fn step(
        &self,
        batch: &[usize],
        tuning: &Tuning,
        head: &Head,
        optimisers: &mut [&mut AdamW],
    ) -> Result<(f32, usize)> {
        let (hidden, mask) = self.bottoms.batch(batch)?;
        let out = self
            .graph
            .forward_top(&hidden, &mask, tuning, Kernels::Differentiable)?;
        let logits = head.logits(&pooled(&out.to_dtype(self.graph.dtype())?, &mask)?)?;
        let labels = self.labels(batch)?;
        let loss =
            candle_nn::loss::cross_entropy(&logits.to_dtype(candle_core::DType::F32)?, &labels)?;
        let grads = loss.backward()?;
        for optimiser in optimisers.iter_mut() {
            optimiser.step(&grads)?;
        }
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(Error::Internal("the training loss is not finite".into()));
        }
        Ok((value, correct(&logits, batch, self.examples)?))
    }

    fn labels(&self, rows: &[usize]) -> Result<Tensor> {
        let labels: Vec<u32> = rows.iter().map(|&r| self.examples.labels[r]).collect();
        Ok(Tensor::from_vec(labels, rows.len(), &self.graph.device())?)
    }

    /// Pooled features of `rows` through the adapted top, fused kernels.
    fn features(&self, rows: &[usize], tuning: &Tuning) -> Result<Vec<f32>> {
        let mut features = Vec::with_capacity(rows.len() * self.graph.hidden_size());
        for chunk in rows.chunks(EVAL_BATCH) {
            let (hidden, mask) = self.bottoms.batch(chunk)?;
            let out = self
                .graph
                .forward_top(&hidden, &mask, tuning, Kernels::Fused)?;
            features.extend(to_f32(&pooled(&out, &mask)?.detach())?);
        }
        Ok(features)
    }

    /// Loss and accuracy on the held-out rows (and the given training
    /// figures, or those of the training rows when measuring the frozen head).
    fn measure(
        &self,
        epoch: usize,
        tuning: &Tuning,
        head: &Head,
        trained: Option<(f32, f32)>,
    ) -> Result<HeadMetrics> {
        let (train_loss, train_accuracy) = match trained {
            Some(figures) => figures,
            None => self.loss_and_accuracy(&self.train_rows, tuning, head)?,
        };
        let validation = if self.validation_rows.is_empty() {
            None
        } else {
            Some(self.loss_and_accuracy(&self.validation_rows, tuning, head)?)
        };
        Ok(HeadMetrics {
            epoch,
            train_loss,
            train_accuracy,
            validation_loss: validation.map(|v| v.0),
            validation_accuracy: validation.map(|v| v.1),
            ..HeadMetrics::default()
        })
    }

    fn loss_and_accuracy(
        &self,
        rows: &[usize],
        tuning: &Tuning,
        head: &Head,
    ) -> Result<(f32, f32)> {
        let features = self.features(rows, tuning)?;
        let dim = self.graph.hidden_size();
        let features = Tensor::from_vec(features, (rows.len(), dim), &self.graph.device())?
            .to_dtype(self.graph.dtype())?;
        let logits = head.logits(&features)?.detach();
        let labels = self.labels(rows)?;
        let loss =
            candle_nn::loss::cross_entropy(&logits.to_dtype(candle_core::DType::F32)?, &labels)?;
        let right = correct(&logits, rows, self.examples)?;
        Ok((loss.to_scalar::<f32>()?, right as f32 / rows.len() as f32))
    }
}

/// How many rows the logits classify as labelled.
fn correct(logits: &Tensor, rows: &[usize], examples: &TextExamples) -> Result<usize> {
    let predicted: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
    Ok(predicted
        .iter()
        .zip(rows)
        .filter(|(p, &r)| **p == examples.labels[r])
        .count())
}

/// Lower validation loss wins; without validation, the later epoch does.
fn better(candidate: &HeadMetrics, best: &HeadMetrics) -> bool {
    match (candidate.validation_loss, best.validation_loss) {
        (Some(new), Some(old)) => new < old,
        _ => true,
    }
}

/// Linear warm-up to the peak, then linear decay to 0 at the last step.
struct Schedule {
    steps: usize,
    warmup: f64,
}

impl Schedule {
    fn factor(&self, step: usize) -> f64 {
        let warmup = (self.steps as f64 * self.warmup).ceil().max(1.0);
        let step = step as f64;
        if step <= warmup {
            step / warmup
        } else {
            ((self.steps as f64 - step + 1.0) / (self.steps as f64 - warmup + 1.0)).max(0.0)
        }
    }
}

fn snapshot(vars: &[Var]) -> Result<Vec<Tensor>> {
    Ok(vars
        .iter()
        .map(|v| v.as_tensor().copy())
        .collect::<candle_core::Result<_>>()?)
}

fn restore(vars: &[Var], values: &[Tensor]) -> Result<()> {
    for (var, value) in vars.iter().zip(values) {
        var.set(value)?;
    }
    Ok(())
}

fn head_weights(head: &Head) -> Result<HeadWeights> {
    let (outputs, inputs) = head.weight.as_tensor().dims2()?;
    Ok(HeadWeights::Linear {
        output: Dense {
            weight: to_f32(head.weight.as_tensor())?,
            bias: to_f32(head.bias.as_tensor())?,
            inputs,
            outputs,
        },
    })
}
