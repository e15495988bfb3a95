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
//!
//! This file is the inference half (layers, forward passes); [`tuning`] the
//! half fine-tuning adds (what runs as the top layers, trainable copies of
//! them, packed frozen products).

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, VarBuilder};
use candle_transformers::models::bert::{Config as BertConfig, HiddenAct};

use std::sync::Arc;

use candle_core::CustomOp1;

pub mod tuning;

pub use tuning::{TrainableLayers, Tuning};

use super::frozen_product::FrozenProduct;
use super::lora::{adapted, LayerAdapters};

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
pub(crate) mod testing;
#[cfg(test)]
mod tests;
