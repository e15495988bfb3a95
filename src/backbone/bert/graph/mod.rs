//! BERT's forward pass as a graph of candle tensor operations: any device
//! (CPU, CUDA) and any float type (f32, f16, bf16). The engine behind
//! `engine = "candle"` and every GPU backbone.
//!
//! Why not candle-transformers' `BertModel`: it builds the attention mask as
//! `(1 - mask) * f32::MIN` in the model's float type, and f32::MIN rounds to
//! minus infinity in f16 and bf16, so every real token's bias becomes
//! `0 * -inf = NaN` as soon as a batch holds padding. Here the bias is the
//! float type's own most negative finite value. The query, key and value
//! projections are also one matrix product (one GEMM launch instead of three),
//! and every product runs on `[tokens, features]` matrices rather than a
//! broadcast batch of them.
//!
//! Fine-tuning runs the same graph with [`Kernels::Differentiable`] (candle's
//! fused layer norm and softmax have no backward pass: gradients silently stop
//! at them) and low-rank adapters ([`super::lora`]) on the top layers.
//!
//! Weight names follow PyTorch's (Hugging Face `BertModel`), with or without the
//! `bert.` prefix of checkpoints saved from a task model.

use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{Embedding, VarBuilder};
use candle_transformers::models::bert::{Config as BertConfig, HiddenAct};

use std::sync::Arc;

use candle_core::CustomOp1;

use super::frozen_product::FrozenProduct;
use super::lora::{adapted, LayerAdapters};
use super::top_layers::{LayerWeights, NormWeights, TopLayers};

/// How layer norms and softmax are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// candle's fused kernels: the fastest, but without a backward pass.
    Fused,
    /// Plain tensor operations that candle's autograd differentiates: the
    /// training pass, in which adapters also apply their dropout.
    Differentiable,
}

/// `x · wᵀ + b` on the last dimension, computed as one 2-D product.
struct Dense {
    weight: Tensor,
    bias: Tensor,
    /// The same product on packed CPU kernels, for training (see
    /// [`BertGraph::pack_frozen_products`]).
    packed: Option<Arc<Box<dyn CustomOp1 + Send + Sync>>>,
}

impl Dense {
    fn load(vb: &VarBuilder, inputs: usize, outputs: usize) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get((outputs, inputs), "weight")?,
            bias: vb.get(outputs, "bias")?,
            packed: None,
        })
    }

    /// One layer whose outputs are those of `parts`, in order.
    fn concat(parts: &[Dense]) -> candle_core::Result<Self> {
        let weights: Vec<&Tensor> = parts.iter().map(|p| &p.weight).collect();
        let biases: Vec<&Tensor> = parts.iter().map(|p| &p.bias).collect();
        Ok(Self {
            weight: Tensor::cat(&weights, 0)?,
            bias: Tensor::cat(&biases, 0)?,
            packed: None,
        })
    }

    /// `x`: `[tokens, inputs]` → `[tokens, outputs]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.packed {
            Some(packed) => x.contiguous()?.apply_op1_arc(Arc::clone(packed)),
            None => x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias),
        }
    }

    fn pack(&mut self) -> candle_core::Result<()> {
        let product = FrozenProduct::new(&self.weight, &self.bias)?;
        self.packed = Some(Arc::new(Box::new(product)));
        Ok(())
    }
}

/// Layer normalisation over the last dimension, with a learned scale and shift.
struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Norm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
        match kernels {
            Kernels::Fused => candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &self.weight,
                &self.bias,
                self.eps as f32,
            ),
            Kernels::Differentiable => {
                let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
                let variance = centered.sqr()?.mean_keepdim(D::Minus1)?;
                centered
                    .broadcast_div(&(variance + self.eps)?.sqrt()?)?
                    .broadcast_mul(&self.weight)?
                    .broadcast_add(&self.bias)
            }
        }
    }
}

struct Layer {
    qkv: Dense,
    attention_output: Dense,
    attention_norm: Norm,
    intermediate: Dense,
    output: Dense,
    output_norm: Norm,
}

impl Layer {
    fn load(vb: VarBuilder, config: &BertConfig) -> candle_core::Result<Self> {
        let (h, eps) = (config.hidden_size, config.layer_norm_eps);
        let attention = vb.pp("attention");
        let own = attention.pp("self");
        Ok(Self {
            qkv: Dense::concat(&[
                Dense::load(&own.pp("query"), h, h)?,
                Dense::load(&own.pp("key"), h, h)?,
                Dense::load(&own.pp("value"), h, h)?,
            ])?,
            attention_output: Dense::load(&attention.pp("output.dense"), h, h)?,
            attention_norm: Norm::load(attention.pp("output.LayerNorm"), h, eps)?,
            intermediate: Dense::load(&vb.pp("intermediate.dense"), h, config.intermediate_size)?,
            output: Dense::load(&vb.pp("output.dense"), config.intermediate_size, h)?,
            output_norm: Norm::load(vb.pp("output.LayerNorm"), h, eps)?,
        })
    }
}

/// The shape of one batch: `batch` texts padded to `len` tokens.
#[derive(Clone, Copy)]
struct Shape {
    batch: usize,
    len: usize,
}

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
    layers: Vec<Layer>,
    vars: Vec<Var>,
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

pub struct BertGraph {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    embedding_norm: Norm,
    layers: Vec<Layer>,
    activation: HiddenAct,
    hidden: usize,
    intermediate: usize,
    heads: usize,
    pad_id: u32,
    dtype: DType,
}

impl BertGraph {
    /// Loads the weights from `vb`, whose float type and device the forward
    /// pass then runs in.
    pub fn load(vb: VarBuilder, config: &BertConfig) -> candle_core::Result<Self> {
        let h = config.hidden_size;
        if config.num_attention_heads == 0 || !h.is_multiple_of(config.num_attention_heads) {
            candle_core::bail!(
                "hidden size {h} is not a multiple of {} heads",
                config.num_attention_heads
            );
        }
        let dtype = vb.dtype();
        // Checkpoints saved from a task model (BertForSequenceClassification, ...)
        // nest the encoder under the model type.
        let vb = match &config.model_type {
            Some(prefix) if !vb.contains_tensor("embeddings.word_embeddings.weight") => {
                vb.pp(prefix)
            }
            _ => vb,
        };
        let embeddings = vb.pp("embeddings");
        let table = |name: &str, rows: usize| -> candle_core::Result<Embedding> {
            Ok(Embedding::new(
                embeddings.pp(name).get((rows, h), "weight")?,
                h,
            ))
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| Layer::load(vb.pp("encoder.layer").pp(i), config))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            word: table("word_embeddings", config.vocab_size)?,
            position: table("position_embeddings", config.max_position_embeddings)?,
            token_type: table("token_type_embeddings", config.type_vocab_size)?,
            embedding_norm: Norm::load(embeddings.pp("LayerNorm"), h, config.layer_norm_eps)?,
            layers,
            activation: config.hidden_act,
            hidden: h,
            intermediate: config.intermediate_size,
            pad_id: u32::try_from(config.pad_token_id).unwrap_or(0),
            heads: config.num_attention_heads,
            dtype,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Where the weights live, and the forward pass runs.
    pub fn device(&self) -> Device {
        self.word.embeddings().device().clone()
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    pub fn intermediate_size(&self) -> usize {
        self.intermediate
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

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

    /// Token vectors, in f32 (f64 for an f64 model): `ids` and `mask` are
    /// `[batch, len]` u32 (mask 1 for real tokens, 0 for padding); the result
    /// is `[batch, len, hidden]`.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_adapted(ids, mask, &Tuning::Frozen(0), Kernels::Fused)
    }

    /// Token ids of `texts` padded with the model's pad id to the longest, and
    /// their mask (1 on real tokens): `[texts, longest]` u32 each, on the
    /// model's device: the inputs of [`Self::forward`].
    pub fn padded_batch(&self, texts: &[&[u32]]) -> candle_core::Result<(Tensor, Tensor)> {
        let len = texts.iter().map(|t| t.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(texts.len() * len);
        let mut mask = Vec::with_capacity(texts.len() * len);
        for text in texts {
            let pad = len - text.len();
            ids.extend_from_slice(text);
            ids.extend(std::iter::repeat_n(self.pad_id, pad));
            mask.extend(std::iter::repeat_n(1u32, text.len()));
            mask.extend(std::iter::repeat_n(0u32, pad));
        }
        let device = self.device();
        Ok((
            Tensor::from_vec(ids, (texts.len(), len), &device)?,
            Tensor::from_vec(mask, (texts.len(), len), &device)?,
        ))
    }

    /// The first layer that `tuning` (of the top layers) concerns.
    fn first_tuned(&self, tuning: &Tuning) -> candle_core::Result<usize> {
        self.layers
            .len()
            .checked_sub(tuning.num_layers())
            .ok_or_else(|| candle_core::Error::Msg("more tuned layers than layers".into()))
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

    /// [`Self::forward`] with the top layers as `tuning` makes them and the
    /// layer norms and softmax of `kernels`.
    pub fn forward_adapted(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        tuning: &Tuning,
        kernels: Kernels,
    ) -> candle_core::Result<Tensor> {
        let bottom = self.forward_bottom(ids, mask, self.first_tuned(tuning)?, kernels)?;
        self.forward_top(&bottom, mask, tuning, kernels)
    }

    /// The embeddings and the first `layers` encoder layers, unadapted: the
    /// part of a fine-tuned model that stays frozen, computed once per text.
    /// `[batch, len, hidden]` in the model's float type.
    pub fn forward_bottom(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        layers: usize,
        kernels: Kernels,
    ) -> candle_core::Result<Tensor> {
        let (batch, len) = ids.dims2()?;
        let shape = Shape { batch, len };
        let device = ids.device();
        let positions = Tensor::arange(0u32, len as u32, device)?;
        let embedded = self
            .word
            .forward(ids)?
            .broadcast_add(&self.position.forward(&positions)?)?
            .broadcast_add(
                &self
                    .token_type
                    .forward(&Tensor::zeros(1, DType::U32, device)?)?,
            )?;
        let mut x = self
            .embedding_norm
            .forward(&embedded, kernels)?
            .reshape((batch * len, self.hidden))?;
        let bias = self.attention_bias(mask, device)?;
        for layer in self.layers.iter().take(layers) {
            x = self.layer_forward(layer, None, &x, &bias, shape, kernels)?;
        }
        x.reshape((batch, len, self.hidden))
    }

    /// The last `tuning.num_layers()` layers as `tuning` makes them, from
    /// `hidden` (what [`Self::forward_bottom`] gave for the same `mask`):
    /// token vectors in f32 (f64 for an f64 model), `[batch, len, hidden]`.
    pub fn forward_top(
        &self,
        hidden: &Tensor,
        mask: &Tensor,
        tuning: &Tuning,
        kernels: Kernels,
    ) -> candle_core::Result<Tensor> {
        let (batch, len, _) = hidden.dims3()?;
        let shape = Shape { batch, len };
        let split = self.first_tuned(tuning)?;
        let bias = self.attention_bias(mask, hidden.device())?;
        let mut x = hidden.reshape((batch * len, self.hidden))?;
        let base = &self.layers[split..];
        let layers: Vec<(&Layer, Option<&LayerAdapters>)> = match tuning {
            Tuning::Frozen(_) => base.iter().map(|layer| (layer, None)).collect(),
            Tuning::Lora(adapters) => base.iter().zip(adapters.iter().map(Some)).collect(),
            Tuning::Layers(own) => own.layers.iter().map(|layer| (layer, None)).collect(),
        };
        for (layer, adapter) in layers {
            x = self.layer_forward(layer, adapter, &x, &bias, shape, kernels)?;
        }
        // Half types come back as f32; f64 (gradient checks) stays f64.
        let out = match self.dtype {
            DType::F64 => DType::F64,
            _ => DType::F32,
        };
        x.reshape((batch, len, self.hidden))?.to_dtype(out)
    }

    /// `[batch, 1, 1, len]`: 0 on real tokens, the float type's most negative
    /// finite value on padding (never -inf: `0 * -inf` would be NaN).
    fn attention_bias(&self, mask: &Tensor, device: &Device) -> candle_core::Result<Tensor> {
        let lowest = match self.dtype {
            DType::F16 => -65504.0,                     // half::f16::MIN
            DType::BF16 => -3.389_531_389_251_535_5e38, // half::bf16::MIN
            _ => f64::from(f32::MIN),
        };
        let (batch, len) = mask.dims2()?;
        let padding = (1.0 - mask.to_dtype(DType::F32)?)?;
        (padding * lowest)?
            .to_dtype(self.dtype)?
            .to_device(device)?
            .reshape((batch, 1, 1, len))
    }

    fn layer_forward(
        &self,
        layer: &Layer,
        adapters: Option<&LayerAdapters>,
        x: &Tensor,
        bias: &Tensor,
        shape: Shape,
        kernels: Kernels,
    ) -> candle_core::Result<Tensor> {
        let training = kernels == Kernels::Differentiable;
        let qkv = self.qkv(layer, adapters, x, training)?;
        let context = self.attention(&qkv, bias, shape, kernels)?;
        let attention_output = adapted(
            adapters.and_then(|a| a.attention_output.as_ref()),
            &context,
            layer.attention_output.forward(&context)?,
            training,
        )?;
        let attended = layer
            .attention_norm
            .forward(&(attention_output + x)?, kernels)?;
        let inner = adapted(
            adapters.and_then(|a| a.intermediate.as_ref()),
            &attended,
            layer.intermediate.forward(&attended)?,
            training,
        )?;
        let inner = match self.activation {
            HiddenAct::Gelu => crate::nn::gelu_op::gelu_erf(&inner)?,
            HiddenAct::GeluApproximate => inner.gelu()?,
            HiddenAct::Relu => inner.relu()?,
        };
        let output = adapted(
            adapters.and_then(|a| a.output.as_ref()),
            &inner,
            layer.output.forward(&inner)?,
            training,
        )?;
        layer.output_norm.forward(&(output + attended)?, kernels)
    }

    /// The fused query/key/value product, `[tokens, 3 * hidden]`, with the
    /// adapters' updates of its three parts added.
    fn qkv(
        &self,
        layer: &Layer,
        adapters: Option<&LayerAdapters>,
        x: &Tensor,
        training: bool,
    ) -> candle_core::Result<Tensor> {
        let base = layer.qkv.forward(x)?;
        let Some(adapters) = adapters.filter(|a| a.adapts_attention_inputs()) else {
            return Ok(base);
        };
        let zeros = || Tensor::zeros((x.dim(0)?, self.hidden), base.dtype(), base.device());
        let update = |adapter: &Option<super::lora::LowRank>| match adapter {
            Some(adapter) => adapter.delta(x, training),
            None => zeros(),
        };
        let updates = [
            update(&adapters.query)?,
            update(&adapters.key)?,
            update(&adapters.value)?,
        ];
        base + Tensor::cat(&updates, 1)?
    }

    /// Scaled dot-product attention of `qkv` (`[tokens, 3 * hidden]`), per head.
    fn attention(
        &self,
        qkv: &Tensor,
        bias: &Tensor,
        shape: Shape,
        kernels: Kernels,
    ) -> candle_core::Result<Tensor> {
        let Shape { batch, len } = shape;
        let head_size = self.hidden / self.heads;
        let qkv = qkv.reshape((batch, len, 3, self.heads, head_size))?;
        // [batch, heads, len, head_size] each.
        let part = |i: usize| {
            qkv.narrow(2, i, 1)?
                .squeeze(2)?
                .transpose(1, 2)?
                .contiguous()
        };
        let (query, key, value) = (part(0)?, part(1)?, part(2)?);
        let scale = 1.0 / (head_size as f64).sqrt();
        let scores = (query.matmul(&key.t()?)? * scale)?.broadcast_add(bias)?;
        let weights = match kernels {
            Kernels::Fused => candle_nn::ops::softmax_last_dim(&scores)?,
            Kernels::Differentiable => candle_nn::ops::softmax(&scores, D::Minus1)?,
        };
        weights
            .matmul(&value)?
            .transpose(1, 2)?
            .reshape((batch * len, self.hidden))
    }
}

/// The float type a `precision` setting asks candle for.
pub fn dtype_of(precision: crate::config::Precision) -> Option<DType> {
    use crate::config::Precision;
    match precision {
        Precision::F32 => Some(DType::F32),
        Precision::F16 => Some(DType::F16),
        Precision::Bf16 => Some(DType::BF16),
        Precision::Auto | Precision::Int8 | Precision::Quantized => None,
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A tiny random BERT for the tests of the layers that use this graph.

    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;
    use candle_transformers::models::bert::Config as BertConfig;

    use super::BertGraph;

    /// A two-layer BERT of width 16 with seeded random weights under
    /// PyTorch's names, built by candle-transformers' loader's own list.
    pub fn tiny_weights() -> (BertConfig, HashMap<String, Tensor>) {
        let config = BertConfig {
            vocab_size: 50,
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 32,
            max_position_embeddings: 24,
            type_vocab_size: 2,
            ..BertConfig::default()
        };
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            (
                "embeddings.word_embeddings.weight".into(),
                vec![config.vocab_size, h],
            ),
            ("embeddings.position_embeddings.weight".into(), vec![24, h]),
            ("embeddings.token_type_embeddings.weight".into(), vec![2, h]),
            ("embeddings.LayerNorm.weight".into(), vec![h]),
            ("embeddings.LayerNorm.bias".into(), vec![h]),
        ];
        for layer in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{layer}");
            for (name, shape) in [
                ("attention.self.query", vec![h, h]),
                ("attention.self.key", vec![h, h]),
                ("attention.self.value", vec![h, h]),
                ("attention.output.dense", vec![h, h]),
                ("intermediate.dense", vec![i, h]),
                ("output.dense", vec![h, i]),
            ] {
                shapes.push((format!("{p}.{name}.bias"), vec![shape[0]]));
                shapes.push((format!("{p}.{name}.weight"), shape));
            }
            for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
                shapes.push((format!("{p}.{norm}.weight"), vec![h]));
                shapes.push((format!("{p}.{norm}.bias"), vec![h]));
            }
        }
        // A fixed linear congruential sequence: the same weights on every run.
        let mut state = 12345u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.4
        };
        let tensors = shapes
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let mut values: Vec<f32> = (0..n).map(|_| next()).collect();
                if name.ends_with("LayerNorm.weight") {
                    values.iter_mut().for_each(|v| *v += 1.0);
                }
                let tensor = Tensor::from_vec(values, shape, &Device::Cpu).expect("tensor");
                (name, tensor)
            })
            .collect();
        (config, tensors)
    }

    /// [`tiny_weights`] as a graph computing in `dtype`.
    pub fn tiny(dtype: DType) -> BertGraph {
        let (config, tensors) = tiny_weights();
        BertGraph::load(
            VarBuilder::from_tensors(tensors, dtype, &Device::Cpu),
            &config,
        )
        .expect("load")
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;
    use candle_transformers::models::bert::BertModel;

    use super::{BertGraph, Kernels, TopLayers, TrainableLayers, Tuning};
    use crate::backbone::bert::lora::{LayerAdapters, LowRank};
    use crate::nn::rng::Rng;

    /// Two texts, the second padded: ids and mask `[2, 6]`.
    fn batch() -> (Tensor, Tensor) {
        let ids = Tensor::new(&[[1u32, 7, 9, 3, 4, 2], [1, 11, 2, 0, 0, 0]], &Device::Cpu);
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], &Device::Cpu);
        (ids.expect("ids"), mask.expect("mask"))
    }

    fn graph(dtype: DType) -> BertGraph {
        super::testing::tiny(dtype)
    }

    fn rows(t: &Tensor) -> Vec<f32> {
        t.flatten_all().and_then(|t| t.to_vec1()).expect("values")
    }

    /// Against candle-transformers' BertModel (an independent implementation)
    /// in f32: token vectors of real tokens agree to 1e-5 (padding rows are
    /// never pooled).
    #[test]
    fn f32_graph_matches_candle_transformers() {
        let (config, tensors) = super::testing::tiny_weights();
        let reference = BertModel::load(
            VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
            &config,
        )
        .expect("reference");
        let (ids, mask) = batch();
        let expected = reference
            .forward(&ids, &ids.zeros_like().expect("types"), Some(&mask))
            .expect("reference forward");
        let ours = graph(DType::F32).forward(&ids, &mask).expect("forward");
        assert_eq!(ours.dims(), &[2, 6, 16]);
        let real = [(0, 6), (1, 3)];
        for (text, len) in real {
            let a = rows(&ours.get(text).unwrap().narrow(0, 0, len).unwrap());
            let b = rows(&expected.get(text).unwrap().narrow(0, 0, len).unwrap());
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "text {text}: largest difference {worst}");
        }
    }

    /// LoRA adapters on all six projections of the top `layers` layers, `A`
    /// and `B` drawn from `seed` (a trained state; a new adapter's `B` is 0).
    fn adapters(graph: &BertGraph, layers: usize, seed: u64) -> Vec<LayerAdapters> {
        let mut rng = Rng(seed);
        let (h, i) = (graph.hidden_size(), graph.intermediate_size());
        let spec = (graph.dtype(), &Device::Cpu);
        let mut lora = |inputs: usize, outputs: usize| {
            let adapter = LowRank::new((inputs, outputs), 2, 4.0, &mut rng, spec).expect("adapter");
            let b = Tensor::from_vec(
                rng.uniform(outputs * 2, -0.3, 0.3),
                (outputs, 2),
                &Device::Cpu,
            )
            .and_then(|b| b.to_dtype(spec.0))
            .expect("b");
            adapter.b.set(&b).expect("set b");
            Some(adapter)
        };
        (0..layers)
            .map(|_| LayerAdapters {
                query: lora(h, h),
                key: lora(h, h),
                value: lora(h, h),
                attention_output: lora(h, h),
                intermediate: lora(h, i),
                output: lora(i, h),
            })
            .collect()
    }

    /// The plain operations compute what the fused kernels do (f32, 1e-5).
    #[test]
    fn differentiable_kernels_match_the_fused_ones() {
        let (ids, mask) = batch();
        let model = graph(DType::F32);
        let fused = rows(&model.forward(&ids, &mask).expect("fused"));
        let plain = rows(
            &model
                .forward_adapted(&ids, &mask, &Tuning::Frozen(0), Kernels::Differentiable)
                .expect("plain"),
        );
        let worst = fused
            .iter()
            .zip(&plain)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "largest difference {worst}");
    }

    /// A new adapter (B = 0) leaves every output exactly as it was.
    #[test]
    fn new_adapters_reproduce_the_base_model_exactly() {
        let (ids, mask) = batch();
        let model = graph(DType::F32);
        let mut adapters = adapters(&model, 2, 7);
        for layer in &mut adapters {
            for adapter in [
                &mut layer.query,
                &mut layer.key,
                &mut layer.value,
                &mut layer.attention_output,
                &mut layer.intermediate,
                &mut layer.output,
            ]
            .into_iter()
            .flatten()
            {
                adapter
                    .b
                    .set(&adapter.b.zeros_like().expect("zeros"))
                    .expect("set");
            }
        }
        let tunings = [
            Tuning::Lora(adapters),
            Tuning::Layers(model.trainable_top(2).expect("copies")),
        ];
        for kernels in [Kernels::Fused, Kernels::Differentiable] {
            let base = rows(
                &model
                    .forward_adapted(&ids, &mask, &Tuning::Frozen(0), kernels)
                    .expect("base"),
            );
            for tuning in &tunings {
                let adapted = rows(
                    &model
                        .forward_adapted(&ids, &mask, tuning, kernels)
                        .expect("adapted"),
                );
                assert_eq!(base, adapted, "{kernels:?}");
            }
        }
    }

    /// Top layers copied to the host and back are the same layers: the same
    /// outputs, bit for bit, after a change to their weights.
    #[test]
    fn top_layers_survive_the_trip_to_the_host() {
        let (ids, mask) = batch();
        let model = graph(DType::F32);
        let layers = trained_layers(&model, 2, 4);
        let host = layers.to_host(0).expect("host");
        assert_eq!(host.layers.len(), 2);
        assert!(host.layers.iter().all(|l| l.fits(16, 32)));
        let back = model.top_layers(&host).expect("back");
        let run = |tuning: Tuning| {
            rows(
                &model
                    .forward_adapted(&ids, &mask, &tuning, Kernels::Fused)
                    .expect("forward"),
            )
        };
        let before = run(Tuning::Frozen(0));
        let (a, b) = (run(Tuning::Layers(layers)), run(Tuning::Layers(back)));
        assert_eq!(a, b);
        assert_ne!(a, before, "the layers changed the outputs");
        let wrong = TopLayers::new(1, host.layers.clone());
        assert!(
            model.top_layers(&wrong).is_err(),
            "three layers from 1 of 2"
        );
    }

    /// A fixed random projection of the real tokens' vectors: a scalar loss
    /// that every adapter influences.
    fn loss(model: &BertGraph, tuning: &Tuning) -> Tensor {
        let (ids, mask) = batch();
        let out = model
            .forward_adapted(&ids, &mask, tuning, Kernels::Differentiable)
            .expect("forward")
            .to_dtype(DType::F64)
            .expect("f64");
        let mut rng = Rng(99);
        let weights = Tensor::from_vec(
            rng.uniform(2 * 6 * 16, -1.0, 1.0)
                .into_iter()
                .map(f64::from)
                .collect::<Vec<_>>(),
            (2, 6, 16),
            &Device::Cpu,
        )
        .expect("weights");
        let real = mask
            .to_dtype(DType::F64)
            .and_then(|m| m.unsqueeze(2))
            .expect("mask");
        (out * weights)
            .and_then(|x| x.broadcast_mul(&real))
            .and_then(|x| x.sum_all())
            .expect("loss")
    }

    /// Trainable copies of the top `layers` layers with their weights moved
    /// by up to ±0.05 (drawn from `seed`): a trained state.
    fn trained_layers(graph: &BertGraph, layers: usize, seed: u64) -> TrainableLayers {
        let mut rng = Rng(seed);
        let copies = graph.trainable_top(layers).expect("copies");
        for var in &copies.vars {
            let t = var.as_tensor();
            let noise = Tensor::from_vec(
                rng.uniform(t.elem_count(), -0.05, 0.05),
                t.shape(),
                &Device::Cpu,
            )
            .and_then(|n| n.to_dtype(t.dtype()))
            .expect("noise");
            var.set(&(t + noise).expect("moved")).expect("set");
        }
        copies
    }

    /// Every adapter matrix of every adapted layer, and every weight of the
    /// top layers trained in full, gets a finite, non-zero gradient through
    /// the differentiable graph; the frozen weights none.
    #[test]
    fn every_trained_tensor_gets_a_gradient() {
        let model = graph(DType::F32);
        let tunings = [
            (Tuning::Lora(adapters(&model, 2, 3)), 2 * 6 * 2),
            (Tuning::Layers(trained_layers(&model, 1, 3)), 12),
        ];
        for (tuning, count) in tunings {
            let grads = loss(&model, &tuning).backward().expect("backward");
            let vars = tuning.vars();
            assert_eq!(vars.len(), count);
            for (n, var) in vars.iter().enumerate() {
                let grad = grads.get(var.as_tensor()).expect("a gradient");
                let values = rows(grad);
                assert!(
                    values.iter().all(|v| v.is_finite()),
                    "tensor {n}: not finite"
                );
                assert!(values.iter().any(|v| *v != 0.0), "tensor {n}: all zero");
            }
            for frozen in [&model.layers[0].qkv.weight, &model.layers[1].qkv.weight] {
                assert!(
                    grads.get(frozen).is_none(),
                    "frozen weights take no gradient"
                );
            }
        }
    }

    /// With the frozen products on the packed kernels, the training pass and
    /// the adapters' gradients are those of candle's own products (1e-5
    /// relative): the packed backward (grad·W) is right.
    #[test]
    fn packed_frozen_products_give_the_same_loss_and_gradients() {
        let plain = graph(DType::F32);
        let mut packed = graph(DType::F32);
        packed.pack_frozen_products().expect("pack");
        let adapters = Tuning::Lora(adapters(&plain, 2, 5));
        let (loss_plain, loss_packed) = (loss(&plain, &adapters), loss(&packed, &adapters));
        let scalar = |t: &Tensor| t.to_scalar::<f64>().expect("scalar");
        let gap = (scalar(&loss_plain) - scalar(&loss_packed)).abs();
        assert!(gap <= 1e-5 * scalar(&loss_plain).abs(), "loss gap {gap}");
        let grads_plain = loss_plain.backward().expect("backward");
        let grads_packed = loss_packed.backward().expect("backward");
        for (n, var) in adapters.vars().iter().enumerate() {
            let a = rows(grads_plain.get(var.as_tensor()).expect("gradient"));
            let b = rows(grads_packed.get(var.as_tensor()).expect("gradient"));
            let diff: f32 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
            let norm: f32 = a.iter().map(|x| x * x).sum();
            assert!((diff / norm).sqrt() < 1e-5, "matrix {n}: {diff} / {norm}");
        }
    }

    /// The gradient candle's autograd computes equals central finite
    /// differences of the loss, in f64 (step 1e-6): relative error under 1e-5
    /// on three entries of each adapter matrix and of each weight of a layer
    /// trained in full, relative to the larger of the two and 1e-3. Not
    /// tighter: candle's GELU derivative rounds 1/sqrt(2π) to six digits
    /// (relative error 7e-7), and errors of 1.4e-6 were seen.
    #[test]
    fn trained_tensor_gradients_match_finite_differences() {
        let model = graph(DType::F64);
        for tuning in [
            Tuning::Lora(adapters(&model, 2, 11)),
            Tuning::Layers(trained_layers(&model, 1, 11)),
        ] {
            gradients_match_finite_differences(&model, &tuning);
        }
    }

    fn gradients_match_finite_differences(model: &BertGraph, tuning: &Tuning) {
        let grads = loss(model, tuning).backward().expect("backward");
        let value = || loss(model, tuning).to_scalar::<f64>().expect("scalar");
        let step = 1e-6;
        for (n, var) in tuning.vars().iter().enumerate() {
            let original = var.as_tensor().copy().expect("copy");
            let shape = original.shape().clone();
            let flat: Vec<f64> = original
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .expect("values");
            let analytic: Vec<f64> = grads
                .get(var.as_tensor())
                .expect("gradient")
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .expect("gradient values");
            for entry in [0, flat.len() / 2, flat.len() - 1] {
                let at = |delta: f64| {
                    let mut moved = flat.clone();
                    moved[entry] += delta;
                    var.set(&Tensor::from_vec(moved, &shape, &Device::Cpu).expect("moved"))
                        .expect("set");
                    value()
                };
                let numeric = (at(step) - at(-step)) / (2.0 * step);
                var.set(&original).expect("restore");
                let scale = numeric.abs().max(analytic[entry].abs()).max(1e-3);
                let error = (numeric - analytic[entry]).abs() / scale;
                assert!(
                    error < 1e-5,
                    "tensor {n} entry {entry}: autograd {} vs finite differences {numeric}",
                    analytic[entry]
                );
            }
        }
    }

    /// Half precision with padding stays finite (the mask bias is the type's
    /// lowest finite value) and close to f32: relative error under 2% per
    /// real token vector.
    #[test]
    fn half_precision_with_padding_is_finite_and_close_to_f32() {
        let (ids, mask) = batch();
        let full = graph(DType::F32).forward(&ids, &mask).expect("f32");
        for dtype in [DType::F16, DType::BF16] {
            let half = graph(dtype).forward(&ids, &mask).expect("half");
            assert_eq!(half.dtype(), DType::F32, "results come back as f32");
            for (text, len) in [(0, 6), (1, 3)] {
                let a = rows(&half.get(text).unwrap().narrow(0, 0, len).unwrap());
                let b = rows(&full.get(text).unwrap().narrow(0, 0, len).unwrap());
                assert!(a.iter().all(|v| v.is_finite()), "{dtype:?}: not finite");
                let diff: f32 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
                let size: f32 = b.iter().map(|y| y * y).sum();
                let relative = (diff / size).sqrt();
                assert!(
                    relative < 0.02,
                    "{dtype:?} text {text}: relative error {relative}"
                );
            }
        }
    }
}
