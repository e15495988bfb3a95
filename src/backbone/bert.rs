//! BERT-family text encoders (BERT, MiniLM, sentence-transformers models), on
//! one of two engines: our packed CPU forward pass (`bert_native`, the default
//! on CPU) or a graph of candle tensor operations (`bert_graph`: any device and
//! float type, the engine of GPUs).

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::Config as BertConfig;
use serde::Deserialize;

use super::bert_graph::{self, BertGraph};
use super::bert_native::NativeBert;
use super::{
    candle_device,
    source::{self, ModelFiles},
    text::TextEncoder,
    Backbone, BackboneDescriptor, EmbedItem, EmbedOptions, Input, Modality, Pooling, Prepared,
    TokenizedText,
};
use crate::{
    config::{BackboneConfig, Engine, Precision},
    Error, Result,
};

/// The network that computes token vectors.
enum Network {
    Candle(BertGraph),
    Native(NativeBert),
}

pub struct BertBackbone {
    network: Network,
    encoder: TextEncoder,
    descriptor: BackboneDescriptor,
}

/// A BERT backbone's weights as a trainable graph (f32, on the configured
/// device) with its tokenizer: what fine-tuning starts from.
pub struct TrainableBert {
    pub graph: BertGraph,
    pub encoder: TextEncoder,
}

impl TrainableBert {
    pub fn load(config: &BackboneConfig, cache_dir: Option<&std::path::Path>) -> Result<Self> {
        let files = source::resolve(&config.source, cache_dir, Modality::Text)?;
        let device = candle_device(config.device)?;
        let opened = Opened::read(config, &files)?;
        let graph = BertGraph::load(opened.weights(DType::F32, &device)?, &opened.model)
            .map_err(|err| opened.mismatch(err))?;
        Ok(Self {
            graph,
            encoder: opened.encoder()?,
        })
    }
}

/// A BERT model folder's configuration, read and checked: what both loaders
/// need before the weights.
struct Opened<'a> {
    files: &'a ModelFiles,
    text: &'a source::TextFiles,
    model: BertConfig,
    max_len: usize,
}

impl<'a> Opened<'a> {
    fn read(config: &BackboneConfig, files: &'a ModelFiles) -> Result<Self> {
        let text = files.text.as_ref().ok_or_else(|| {
            Error::ModelLoad("a BERT backbone needs config.json and tokenizer.json".into())
        })?;
        let model: BertConfig = read_json(&text.config)?;
        let max_len = max_sequence_length(config, files, &model)?;
        Ok(Self {
            files,
            text,
            model,
            max_len,
        })
    }

    /// The weights, memory-mapped, as `dtype` on `device`.
    fn weights(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        let path = &self.files.weights;
        // SAFETY: the weights file is memory-mapped; it must not be modified while
        // the server runs, which holds for model folders that are only ever
        // replaced as a whole (scripts/fetch-models.sh) or read-only volumes.
        unsafe { VarBuilder::from_mmaped_safetensors(&[path], dtype, device) }
            .map_err(|err| Error::ModelLoad(format!("cannot map {}: {err}", path.display())))
    }

    /// The error for weights that do not fit the configuration.
    fn mismatch(&self, err: candle_core::Error) -> Error {
        Error::ModelLoad(format!(
            "{} does not hold BERT weights matching {}: {err}",
            self.files.weights.display(),
            self.text.config.display()
        ))
    }

    fn encoder(&self) -> Result<TextEncoder> {
        TextEncoder::from_file(&self.text.tokenizer, self.max_len)
    }
}

/// The part of sentence-transformers' sentence_bert_config.json we use.
#[derive(Deserialize)]
struct SentenceConfig {
    max_seq_length: Option<usize>,
}

impl BertBackbone {
    pub fn load(config: &BackboneConfig, files: &ModelFiles) -> Result<Self> {
        let device = candle_device(config.device)?;
        let opened = Opened::read(config, files)?;
        let (engine, precision) = engine_and_precision(config, &device)?;
        // The native engine converts f32 weights itself; candle's graph runs in
        // the float type its weights are loaded as.
        let dtype = match engine {
            Engine::Native => DType::F32,
            _ => bert_graph::dtype_of(precision).unwrap_or(DType::F32),
        };
        let vars = opened.weights(dtype, &device)?;
        let model_config = &opened.model;
        let loaded = match engine {
            Engine::Native => NativeBert::load(vars, model_config, precision).map(Network::Native),
            _ => BertGraph::load(vars, model_config).map(Network::Candle),
        };
        let network = loaded.map_err(|err| opened.mismatch(err))?;
        let encoder = opened.encoder()?;
        let max_len = opened.max_len;

        let descriptor = BackboneDescriptor {
            name: config.name.clone(),
            architecture: config.architecture,
            modality: Modality::Text,
            dimension: model_config.hidden_size,
            device: config.device.to_string(),
            dtype: precision.as_str().to_owned(),
            max_sequence_length: max_len,
            image_size: 0,
            default_options: EmbedOptions {
                pooling: config.pooling,
                normalize: config.normalize,
            },
            default_truncate: config.truncate,
            fingerprint: source::fingerprint(&files.weights)?,
            source: files.origin.clone(),
        };
        tracing::info!(
            backbone = %config.name,
            engine = engine.as_str(),
            precision = precision.as_str(),
            kernel = kernel_name(engine, precision),
            "BERT engine"
        );
        Ok(Self {
            network,
            encoder,
            descriptor,
        })
    }

    fn hidden(&self) -> usize {
        self.descriptor.dimension
    }

    /// Token vectors of a batch, padded to its longest text: `[batch, len, hidden]`,
    /// and the attention mask `[batch, len]` (1 for real tokens) as f32.
    fn forward(&self, model: &BertGraph, texts: &[&TokenizedText]) -> Result<(Tensor, Tensor)> {
        let ids: Vec<&[u32]> = texts.iter().map(|t| t.ids.as_slice()).collect();
        let (ids, mask) = model.padded_batch(&ids)?;
        let hidden = model.forward(&ids, &mask)?;
        Ok((hidden, mask.to_dtype(DType::F32)?))
    }
}

impl Backbone for BertBackbone {
    fn descriptor(&self) -> &BackboneDescriptor {
        &self.descriptor
    }

    fn pads_batches(&self) -> bool {
        // The native engine packs texts end to end; candle's pads to the longest.
        matches!(self.network, Network::Candle(_))
    }

    fn prepare(&self, index: usize, input: Input, truncate: bool) -> Result<Prepared> {
        match input {
            Input::Text(text) => Ok(Prepared::Text(self.encoder.encode(index, &text, truncate)?)),
            Input::TokenIds(ids) => {
                Ok(Prepared::Text(self.encoder.from_ids(index, ids, truncate)?))
            }
            other => Err(Error::InvalidInput {
                index,
                reason: format!(
                    "backbone `{}` takes text, not {}",
                    self.descriptor.name,
                    other.kind()
                ),
            }),
        }
    }

    fn embed(&self, items: &[EmbedItem<'_>]) -> Result<Vec<Vec<f32>>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let texts: Vec<&TokenizedText> = items
            .iter()
            .map(|item| match item.input {
                Prepared::Text(text) => Ok(text),
                Prepared::Image(_) => Err(Error::Inference("image item in a text batch".into())),
            })
            .collect::<Result<_>>()?;
        let model = match &self.network {
            Network::Candle(model) => model,
            Network::Native(native) => return native_embed(native, &texts, items, self.hidden()),
        };
        let (hidden, mask) = self.forward(model, &texts)?;

        // Pool once per kind the batch needs; items of one batch may differ.
        let wants = |pooling| items.iter().any(|item| item.options.pooling == pooling);
        let mut mean = if wants(Pooling::Mean) {
            let mask = mask.unsqueeze(2)?;
            let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
            Some(summed.broadcast_div(&mask.sum(1)?)?.to_vec2::<f32>()?)
        } else {
            None
        };
        let mut cls = if wants(Pooling::Cls) {
            Some(hidden.i((.., 0))?.to_vec2::<f32>()?)
        } else {
            None
        };

        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let pooled = match item.options.pooling {
                Pooling::Mean => mean.as_mut(),
                Pooling::Cls => cls.as_mut(),
            }
            // Each row belongs to exactly one item: move it out instead of copying.
            .map(|rows| std::mem::take(&mut rows[i]))
            .ok_or_else(|| Error::Inference("pooling was not computed".into()))?;
            out.push(if item.options.normalize {
                l2_normalize(pooled)
            } else {
                pooled
            });
        }
        Ok(out)
    }
}

/// Pools and normalizes the packed token vectors of the native engine.
fn native_embed(
    native: &NativeBert,
    texts: &[&TokenizedText],
    items: &[EmbedItem<'_>],
    hidden: usize,
) -> Result<Vec<Vec<f32>>> {
    let ids: Vec<&[u32]> = texts.iter().map(|t| t.ids.as_slice()).collect();
    let tokens = native.forward(&ids)?;
    let mut start = 0;
    let mut out = Vec::with_capacity(items.len());
    for (text, item) in texts.iter().zip(items) {
        let rows = &tokens[start * hidden..(start + text.ids.len()) * hidden];
        start += text.ids.len();
        let pooled = match item.options.pooling {
            Pooling::Cls => rows[..hidden].to_vec(),
            Pooling::Mean => {
                let mut sum = vec![0f32; hidden];
                for row in rows.chunks_exact(hidden) {
                    sum.iter_mut().zip(row).for_each(|(s, v)| *s += v);
                }
                let n = text.ids.len() as f32;
                sum.iter_mut().for_each(|s| *s /= n);
                sum
            }
        };
        out.push(if item.options.normalize {
            l2_normalize(pooled)
        } else {
            pooled
        });
    }
    Ok(out)
}

/// Scales to unit length; a zero vector stays zero (as torch's normalize with eps).
pub fn l2_normalize(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 1e-12 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| Error::ModelLoad(format!("cannot read {}: {err}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|err| Error::ModelLoad(format!("{} is not valid: {err}", path.display())))
}

/// The configured maximum, else the model's sentence-transformers setting, else its
/// position-embedding limit; never above that limit.
fn max_sequence_length(
    config: &BackboneConfig,
    files: &ModelFiles,
    model: &BertConfig,
) -> Result<usize> {
    let limit = model.max_position_embeddings;
    let from_model = match &files.sentence_config {
        Some(path) => read_json::<SentenceConfig>(path)?.max_seq_length,
        None => None,
    };
    let chosen = config.max_sequence_length.or(from_model).unwrap_or(limit);
    if chosen > limit {
        return Err(Error::ModelLoad(format!(
            "max_sequence_length {chosen} exceeds the model's {limit} positions"
        )));
    }
    Ok(chosen)
}

/// The engine `config.engine` resolves to on `device`, and the number format
/// `config.precision` resolves to on that engine (`auto`: bf16 on CPUs with
/// AMX-BF16, else f32, for the native engine; f16 on a GPU, else f32, for
/// candle's, as sentence-transformers and text-embeddings-inference serve GPUs).
fn engine_and_precision(config: &BackboneConfig, device: &Device) -> Result<(Engine, Precision)> {
    let engine = config.resolved_engine();
    if engine == Engine::Native && !device.is_cpu() {
        return Err(Error::ModelLoad(
            "the native engine runs on CPU; use engine = \"candle\" on a GPU".into(),
        ));
    }
    let runs = match engine {
        Engine::Native => config.precision.native_engine_runs(),
        _ => config.precision.candle_engine_runs(),
    };
    if !runs {
        return Err(Error::ModelLoad(format!(
            "the {} engine does not compute in precision = \"{}\"",
            engine.as_str(),
            config.precision.as_str()
        )));
    }
    let precision = match (engine, config.precision) {
        (Engine::Native, chosen) => crate::nn::resolve_precision(chosen),
        (_, Precision::Auto) if device.is_cpu() => Precision::F32,
        (_, Precision::Auto) => Precision::F16,
        (_, chosen) => chosen,
    };
    Ok((engine, precision))
}

/// What computes the dense layers: candle's kernels for its device, or the
/// instructions the native engine uses for `precision` on this CPU.
fn kernel_name(engine: Engine, precision: Precision) -> &'static str {
    if engine != Engine::Native {
        return "candle";
    }
    match precision {
        Precision::Auto | Precision::F32 => crate::nn::packed::F32Kernel::detect()
            .map_or("gemm (f32)", crate::nn::packed::F32Kernel::as_str),
        Precision::Int8 => crate::nn::int8::Int8Kernel::detect().as_str(),
        Precision::Bf16 => crate::nn::bf16::Bf16Kernel::detect().as_str(),
        Precision::F16 => "none (f16 runs on the candle engine)",
    }
}

#[cfg(test)]
mod tests {
    use super::l2_normalize;

    #[test]
    fn normalize_gives_unit_length_and_keeps_zero() {
        let v = l2_normalize(vec![3.0, 4.0]);
        assert!((v[0] - 0.6).abs() < 1e-7 && (v[1] - 0.8).abs() < 1e-7);
        assert_eq!(l2_normalize(vec![0.0, 0.0]), vec![0.0, 0.0]);
    }
}
