//! The half of the graph that fine-tuning adds: what runs as the top
//! layers (the base weights, LoRA adapters on them, or copies of them that
//! train in full), trainable copies of the top layers, and the dense
//! products on packed CPU kernels that make a training step fast.
//!
//! Serving a fine-tuned head on the candle engine runs the same [`Tuning`],
//! frozen.

use candle_core::{DType, Device, Tensor, Var};

use super::{BertGraph, Dense, Layer, Norm};
use crate::backbone::bert::lora::LayerAdapters;
use crate::backbone::bert::top_layers::{LayerWeights, NormWeights, TopLayers};

/// What runs as a model's top layers.
pub enum Tuning {
    /// The base weights of the top `n` layers, unchanged.
    Frozen(usize),
    /// Adapters on the base weights of the top layers, the last on the last.
    Lora(Vec<LayerAdapters>),
    /// Copies of the top layers' weights that train (or were trained) in
    /// full.
    Layers(TrainableLayers),
}

impl Tuning {
    /// How many top layers it concerns.
    pub fn num_layers(&self) -> usize {
        match self {
            Self::Frozen(layers) => *layers,
            Self::Lora(adapters) => adapters.len(),
            Self::Layers(layers) => layers.layers.len(),
        }
    }

    /// Every trained tensor.
    pub fn vars(&self) -> Vec<Var> {
        match self {
            Self::Frozen(_) => Vec::new(),
            Self::Lora(adapters) => adapters.iter().flat_map(|a| a.vars()).cloned().collect(),
            Self::Layers(layers) => layers.vars.clone(),
        }
    }
}

/// Top encoder layers whose every weight is a variable: trained in full.
pub struct TrainableLayers {
    pub(super) layers: Vec<Layer>,
    pub(super) vars: Vec<Var>,
}

impl TrainableLayers {
    /// Layers of `weights` (each `[qkv weight, qkv bias, attention output
    /// weight, bias, attention norm scale, shift, intermediate weight, bias,
    /// output weight, bias, output norm scale, shift]`), as variables.
    fn from_tensors(weights: Vec<[Tensor; 12]>, eps: f64) -> candle_core::Result<Self> {
        let mut vars = Vec::with_capacity(weights.len() * 12);
        let mut layers = Vec::with_capacity(weights.len());
        for tensors in weights {
            let start = vars.len();
            for tensor in &tensors {
                vars.push(Var::from_tensor(tensor)?);
            }
            let t = |i: usize| vars[start + i].as_tensor().clone();
            let dense = |i: usize| Dense {
                weight: t(i),
                bias: t(i + 1),
                packed: None,
            };
            let norm = |i: usize| Norm {
                weight: t(i),
                bias: t(i + 1),
                eps,
            };
            layers.push(Layer {
                qkv: dense(0),
                attention_output: dense(2),
                attention_norm: norm(4),
                intermediate: dense(6),
                output: dense(8),
                output_norm: norm(10),
            });
        }
        Ok(Self { layers, vars })
    }

    /// `weights` on `device` in `dtype`, as layers of a model whose layer
    /// norms add `eps`.
    fn from_host(
        weights: &TopLayers,
        eps: f64,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let tensor = |values: &[f32], shape: &[usize]| {
            Tensor::from_slice(values, shape, device)?.to_dtype(dtype)
        };
        let layers = weights
            .layers
            .iter()
            .map(|layer| -> candle_core::Result<[Tensor; 12]> {
                let [q, k, v, o, i, out] = &layer.dense;
                let weight = |d: &crate::nn::Dense| tensor(&d.weight, &[d.outputs, d.inputs]);
                let bias = |d: &crate::nn::Dense| tensor(&d.bias, &[d.outputs]);
                let norm = |n: &NormWeights| -> candle_core::Result<[Tensor; 2]> {
                    Ok([
                        tensor(&n.weight, &[n.weight.len()])?,
                        tensor(&n.bias, &[n.bias.len()])?,
                    ])
                };
                let [attention_scale, attention_shift] = norm(&layer.norms[0])?;
                let [output_scale, output_shift] = norm(&layer.norms[1])?;
                Ok([
                    Tensor::cat(&[weight(q)?, weight(k)?, weight(v)?], 0)?,
                    Tensor::cat(&[bias(q)?, bias(k)?, bias(v)?], 0)?,
                    weight(o)?,
                    bias(o)?,
                    attention_scale,
                    attention_shift,
                    weight(i)?,
                    bias(i)?,
                    weight(out)?,
                    bias(out)?,
                    output_scale,
                    output_shift,
                ])
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Self::from_tensors(layers, eps)
    }

    /// The layers' current weights on the host in f32, the first of them
    /// standing for encoder layer `first_layer`.
    pub fn to_host(&self, first_layer: usize) -> candle_core::Result<TopLayers> {
        let host = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
            t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
        };
        let dense = |weight: &Tensor, bias: &Tensor| -> candle_core::Result<crate::nn::Dense> {
            let (outputs, inputs) = weight.dims2()?;
            Ok(crate::nn::Dense {
                weight: host(weight)?,
                bias: host(bias)?,
                inputs,
                outputs,
            })
        };
        let norm = |n: &Norm| -> candle_core::Result<NormWeights> {
            Ok(NormWeights {
                weight: host(&n.weight)?,
                bias: host(&n.bias)?,
            })
        };
        let layers = self
            .layers
            .iter()
            .map(|layer| -> candle_core::Result<LayerWeights> {
                let h = layer.qkv.weight.dim(0)? / 3;
                let part = |i: usize| {
                    dense(
                        &layer.qkv.weight.narrow(0, i * h, h)?,
                        &layer.qkv.bias.narrow(0, i * h, h)?,
                    )
                };
                Ok(LayerWeights {
                    dense: [
                        part(0)?,
                        part(1)?,
                        part(2)?,
                        dense(&layer.attention_output.weight, &layer.attention_output.bias)?,
                        dense(&layer.intermediate.weight, &layer.intermediate.bias)?,
                        dense(&layer.output.weight, &layer.output.bias)?,
                    ],
                    norms: [norm(&layer.attention_norm)?, norm(&layer.output_norm)?],
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(TopLayers::new(first_layer, layers))
    }
}

impl BertGraph {
    /// Runs the dense layers' products on the serving engine's packed CPU
    /// kernels from now on, for a graph that trains adapters beside frozen
    /// weights: several times faster than candle's generic products on this
    /// kind of CPU. Only for f32 graphs on the CPU; others are left as they
    /// are.
    pub fn pack_frozen_products(&mut self) -> candle_core::Result<()> {
        if self.dtype != DType::F32 || !self.device().is_cpu() {
            return Ok(());
        }
        for layer in &mut self.layers {
            for dense in [
                &mut layer.qkv,
                &mut layer.attention_output,
                &mut layer.intermediate,
                &mut layer.output,
            ] {
                dense.pack()?;
            }
        }
        Ok(())
    }

    /// Trainable copies of the top `layers` layers' weights, starting from
    /// the base ones.
    pub fn trainable_top(&self, layers: usize) -> candle_core::Result<TrainableLayers> {
        let split = self.first_tuned(&Tuning::Frozen(layers))?;
        let weights = self.layers[split..]
            .iter()
            .map(|layer| {
                [
                    &layer.qkv.weight,
                    &layer.qkv.bias,
                    &layer.attention_output.weight,
                    &layer.attention_output.bias,
                    &layer.attention_norm.weight,
                    &layer.attention_norm.bias,
                    &layer.intermediate.weight,
                    &layer.intermediate.bias,
                    &layer.output.weight,
                    &layer.output.bias,
                    &layer.output_norm.weight,
                    &layer.output_norm.bias,
                ]
                .map(Tensor::clone)
            })
            .collect();
        TrainableLayers::from_tensors(weights, self.embedding_norm.eps)
    }

    /// Stored top layers as this model runs them.
    pub fn top_layers(&self, weights: &TopLayers) -> candle_core::Result<TrainableLayers> {
        if !weights.fits(self.layers.len(), self.hidden, self.intermediate) {
            candle_core::bail!("the stored layers do not fit this model's top layers");
        }
        TrainableLayers::from_host(weights, self.embedding_norm.eps, self.dtype, &self.device())
    }
}
