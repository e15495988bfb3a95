//! A Llama-architecture decoder as a graph of candle operations: the engine
//! of GPUs (and, on the CPU, a second implementation to test against).
//!
//! Texts are padded on the right to the longest of the batch. Under causal
//! attention a real token never attends to a later position, so padding
//! changes nothing before it and needs no mask beyond the causal one; the
//! padded rows are simply not pooled.
//!
//! Weights stay in the file's quantized blocks (`QMatMul`: candle's
//! quantized kernels on CPU and CUDA) with `precision = "quantized"`, or are
//! dequantized at load to the float type of the graph.

use candle_core::quantized::QMatMul;
use candle_core::quantized::{QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{ops, rotary_emb};

use super::native::LlamaSettings;
use crate::backbone::weights::gguf::GgufFile;
use crate::{config::Precision, Error, Result};

struct Block {
    attention_norm: Tensor,
    q: QMatMul,
    k: QMatMul,
    v: QMatMul,
    output: QMatMul,
    feed_forward_norm: Tensor,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

pub struct LlamaGraph {
    settings: LlamaSettings,
    device: Device,
    /// The float type activations travel in.
    dtype: DType,
    embeddings: Tensor,
    blocks: Vec<Block>,
    output_norm: Tensor,
    cos: Tensor,
    sin: Tensor,
}

/// The float type of the graph for `precision` (`quantized` computes in f32
/// between its quantized products).
pub fn dtype_of(precision: Precision) -> Option<DType> {
    match precision {
        Precision::F32 | Precision::Quantized => Some(DType::F32),
        Precision::F16 => Some(DType::F16),
        Precision::Bf16 => Some(DType::BF16),
        Precision::Auto | Precision::Int8 => None,
    }
}

fn model_error(err: candle_core::Error) -> Error {
    Error::ModelLoad(err.to_string())
}

impl LlamaGraph {
    /// Reads the weights onto `device`; `positions` bounds the RoPE tables.
    pub fn load(
        file: &GgufFile,
        settings: &LlamaSettings,
        (precision, device): (Precision, &Device),
        positions: usize,
    ) -> Result<Self> {
        let dtype = dtype_of(precision).ok_or_else(|| {
            Error::ModelLoad(format!(
                "the candle engine does not compute in precision = \"{}\"",
                precision.as_str()
            ))
        })?;
        let s = settings;
        let vector = |name: &str| -> Result<Tensor> {
            Tensor::from_vec(file.dequantized(name, &[s.hidden])?, s.hidden, device)
                .and_then(|t| t.to_dtype(dtype))
                .map_err(model_error)
        };
        let matrix = |name: &str, shape: (usize, usize)| -> Result<QMatMul> {
            if precision == Precision::Quantized {
                // The file's blocks, copied to the device as they are.
                let stored = file.quantized(name, &[shape.0, shape.1])?;
                let blocks = stored.data().map_err(model_error)?;
                return QStorage::from_data(blocks, device, stored.dtype())
                    .and_then(|storage| QTensor::new(storage, shape))
                    .and_then(QMatMul::from_qtensor)
                    .map_err(model_error);
            }
            let values = file.dequantized(name, &[shape.0, shape.1])?;
            Tensor::from_vec(values, shape, device)
                .and_then(|t| t.to_dtype(dtype))
                .map(QMatMul::Tensor)
                .map_err(model_error)
        };
        let (h, kv, ff) = (s.hidden, s.kv_width(), s.feed_forward);
        let mut blocks = Vec::with_capacity(s.layers);
        for index in 0..s.layers {
            let name = |part: &str| format!("blk.{index}.{part}.weight");
            blocks.push(Block {
                attention_norm: vector(&name("attn_norm"))?,
                q: matrix(&name("attn_q"), (h, h))?,
                k: matrix(&name("attn_k"), (kv, h))?,
                v: matrix(&name("attn_v"), (kv, h))?,
                output: matrix(&name("attn_output"), (h, h))?,
                feed_forward_norm: vector(&name("ffn_norm"))?,
                gate: matrix(&name("ffn_gate"), (ff, h))?,
                up: matrix(&name("ffn_up"), (ff, h))?,
                down: matrix(&name("ffn_down"), (h, ff))?,
            });
        }
        let embeddings = file.dequantized("token_embd.weight", &[s.vocabulary, h])?;
        let embeddings = Tensor::from_vec(embeddings, (s.vocabulary, h), device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(model_error)?;
        let (cos, sin) = rope_tables(s, positions, device, dtype).map_err(model_error)?;
        Ok(Self {
            settings: s.clone(),
            device: device.clone(),
            dtype,
            embeddings,
            blocks,
            output_norm: vector("output_norm.weight")?,
            cos,
            sin,
        })
    }

    /// The final hidden states of `texts` padded on the right,
    /// `[texts, longest, hidden]` in f32; rows past a text's length are padding.
    pub fn forward(&self, texts: &[&[u32]]) -> Result<Tensor> {
        self.forward_padded(texts)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|err| Error::Inference(format!("decoder forward pass: {err}")))
    }

    fn forward_padded(&self, texts: &[&[u32]]) -> candle_core::Result<Tensor> {
        let longest = texts.iter().map(|t| t.len()).max().unwrap_or(0);
        if longest > self.cos.dim(0)? {
            candle_core::bail!("a text of {longest} tokens exceeds the engine's positions");
        }
        let mut ids = Vec::with_capacity(texts.len() * longest);
        for text in texts {
            ids.extend_from_slice(text);
            // Any id will do: padding is never attended to nor pooled.
            ids.extend(std::iter::repeat_n(0, longest - text.len()));
        }
        let ids = Tensor::from_vec(ids, (texts.len(), longest), &self.device)?;
        let mut x = self.embeddings.embedding(&ids.flatten_all()?)?.reshape((
            texts.len(),
            longest,
            self.settings.hidden,
        ))?;
        let mask = causal_mask(longest, &self.device, self.dtype)?;
        for block in &self.blocks {
            x = self.block_forward(block, &x, &mask)?;
        }
        ops::rms_norm(&x, &self.output_norm, self.settings.rms_eps)
    }

    fn block_forward(
        &self,
        block: &Block,
        x: &Tensor,
        mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let s = &self.settings;
        let (batch, len, h) = x.dims3()?;
        let d = s.head_dim();
        let normed = ops::rms_norm(x, &block.attention_norm, s.rms_eps)?;
        let heads = |projection: &QMatMul, count: usize| -> candle_core::Result<Tensor> {
            projection
                .forward(&normed)?
                .reshape((batch, len, count, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let cos = self.cos.narrow(0, 0, len)?;
        let sin = self.sin.narrow(0, 0, len)?;
        // GGUF stores Q and K for rotation of adjacent pairs: rope_i.
        let q = rotary_emb::rope_i(&heads(&block.q, s.heads)?, &cos, &sin)?;
        let k = rotary_emb::rope_i(&heads(&block.k, s.kv_heads)?, &cos, &sin)?;
        let v = heads(&block.v, s.kv_heads)?;
        let group = s.heads / s.kv_heads;
        let k = candle_transformers::utils::repeat_kv(k, group)?.contiguous()?;
        let v = candle_transformers::utils::repeat_kv(v, group)?.contiguous()?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?;
        let weights = ops::softmax_last_dim(&scores.broadcast_add(mask)?)?;
        let context = weights
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch, len, h))?;
        let x = (x + block.output.forward(&context)?)?;
        let normed = ops::rms_norm(&x, &block.feed_forward_norm, s.rms_eps)?;
        let inner = (ops::silu(&block.gate.forward(&normed)?)? * block.up.forward(&normed)?)?;
        x + block.down.forward(&inner)?
    }
}

/// `[len, len]`: 0 on and below the diagonal, -inf above (later positions).
fn causal_mask(len: usize, device: &Device, dtype: DType) -> candle_core::Result<Tensor> {
    let values: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, (len, len), device)?.to_dtype(dtype)
}

/// cos and sin of every position's angles, `[positions, head_dim / 2]`.
fn rope_tables(
    s: &LlamaSettings,
    positions: usize,
    device: &Device,
    dtype: DType,
) -> candle_core::Result<(Tensor, Tensor)> {
    let d = s.head_dim();
    let mut cos = Vec::with_capacity(positions * d / 2);
    let mut sin = Vec::with_capacity(positions * d / 2);
    for position in 0..positions {
        for i in 0..d / 2 {
            let angle = position as f64 * f64::from(s.rope_base).powf(-2.0 * i as f64 / d as f64);
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    let table = |values| Tensor::from_vec(values, (positions, d / 2), device)?.to_dtype(dtype);
    Ok((table(cos)?, table(sin)?))
}

/// Rows `0..len` of text `row` of padded hidden states, as f32 values.
pub fn text_rows(hidden: &Tensor, row: usize, len: usize) -> Result<Vec<f32>> {
    hidden
        .get(row)
        .and_then(|t| t.narrow(0, 0, len))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .map_err(|err| Error::Inference(err.to_string()))
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::GgmlDType;

    use super::*;
    use crate::backbone::llama::native::tests::{
        ids, max_difference, reference, weights, write_gguf, SETTINGS,
    };

    fn graph(linear: GgmlDType, precision: Precision) -> LlamaGraph {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        write_gguf(&path, &weights(7), linear);
        let file = GgufFile::open(&path).unwrap();
        LlamaGraph::load(&file, &SETTINGS, (precision, &Device::Cpu), 200).unwrap()
    }

    /// Texts of different lengths padded together: each text's rows are the
    /// plain pass's, padding changes nothing before it.
    #[test]
    fn padded_texts_match_the_plain_forward_pass() {
        let model = graph(GgmlDType::F32, Precision::F32);
        let texts = [ids(3, 1), ids(20, 2), ids(9, 3)];
        let refs: Vec<&[u32]> = texts.iter().map(Vec::as_slice).collect();
        let padded = model.forward(&refs).unwrap();
        for (row, text) in texts.iter().enumerate() {
            let ours = text_rows(&padded, row, text.len()).unwrap();
            let worst = max_difference(&ours, &reference(&weights(7), text));
            assert!(worst < 1e-4, "text {row}: worst difference {worst:e}");
        }
    }

    /// The file's Q4_1 blocks, multiplied by candle's quantized kernels,
    /// compute what their dequantized values do, up to the 8-bit rounding
    /// of each product's inputs.
    #[test]
    fn quantized_blocks_compute_what_their_dequantized_values_do() {
        let text = ids(20, 6);
        let dequantized = graph(GgmlDType::Q4_1, Precision::F32)
            .forward(&[&text])
            .unwrap();
        let quantized = graph(GgmlDType::Q4_1, Precision::Quantized)
            .forward(&[&text])
            .unwrap();
        let a: Vec<f32> = dequantized.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = quantized.flatten_all().unwrap().to_vec1().unwrap();
        let (mut dot, mut a2, mut b2) = (0f64, 0f64, 0f64);
        for (a, b) in a.iter().zip(&b) {
            let (a, b) = (f64::from(*a), f64::from(*b));
            dot += a * b;
            a2 += a * a;
            b2 += b * b;
        }
        let cosine = dot / (a2 * b2).sqrt();
        assert!(cosine > 0.999, "cosine {cosine}");
    }
}
