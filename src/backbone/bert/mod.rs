//! BERT-family text encoders (BERT, MiniLM, sentence-transformers models), on
//! one of two engines: our packed CPU forward pass (`native`, the default
//! on CPU) or a graph of candle tensor operations (`graph`: any device and
//! float type, the engine of GPUs).

use candle_core::{DType, Device, IndexOp};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::Config as BertConfig;
use serde::Deserialize;

pub mod adapter;
pub mod frozen_product;
pub mod graph;
pub mod lora;
pub mod native;
pub mod top_layers;

use adapter::Adapter;
use graph::BertGraph;
use native::NativeBert;

use super::{
    candle_device,
    catalog::{self, Family},
    engine,
    text::{texts_of, TextEncoder},
    weights::source::{self, ModelFiles},
    Backbone, BackboneDescriptor, EmbedItem, EmbedOptions, Input, Modality, Pooling, Prepared,
    TokenizedText,
};
use crate::{
    config::{BackboneConfig, Engine},
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
    /// sha256 of the weights file, as a serving backbone's descriptor has it.
    pub fingerprint: String,
}

impl TrainableBert {
    pub fn load(config: &BackboneConfig, cache_dir: Option<&std::path::Path>) -> Result<Self> {
        let files = source::resolve(&config.source, cache_dir, source::Layout::Text)?;
        let device = candle_device(config.device)?;
        let opened = Opened::read(config, &files)?;
        let mut graph = BertGraph::load(opened.weights(DType::F32, &device)?, &opened.model)
            .map_err(|err| opened.mismatch(err))?;
        graph.pack_frozen_products()?;
        Ok(Self {
            graph,
            encoder: opened.encoder()?,
            fingerprint: source::fingerprint(&files.weights)?,
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
        let (engine, precision) = engine::choose(config, Family::Bert, &device)?;
        // The native engine converts f32 weights itself; candle's graph runs in
        // the float type its weights are loaded as.
        let dtype = match engine {
            Engine::Native => DType::F32,
            Engine::Candle | Engine::Auto => graph::dtype_of(precision).unwrap_or(DType::F32),
        };
        let vars = opened.weights(dtype, &device)?;
        let model_config = &opened.model;
        let loaded = match engine {
            Engine::Native => NativeBert::load(vars, model_config, precision).map(Network::Native),
            Engine::Candle | Engine::Auto => {
                BertGraph::load(vars, model_config).map(Network::Candle)
            }
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
            encoder_layers: model_config.num_hidden_layers,
            default_options: EmbedOptions {
                pooling: catalog::default_pooling(config),
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
            kernel = engine::kernel_name(engine, precision),
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
        self.encoder
            .prepare(index, input, truncate, &self.descriptor.name)
    }

    fn takes_adapters(&self) -> bool {
        true
    }

    fn embed(&self, items: &[EmbedItem<'_>]) -> Result<Vec<Vec<f32>>> {
        let texts = texts_of(items)?;
        // Items with the same adapter (and capture) run as neighbours, the
        // frozen ones first; the answers go back in the items' order.
        let mut order: Vec<usize> = (0..items.len()).collect();
        // Heads with their own top layers come last, so that the texts
        // running the base layers stay one run in every layer.
        order.sort_by_key(|&i| {
            let adapter = items[i].adapter;
            let own_layers = adapter.is_some_and(|a| a.top_layers().is_some());
            let address = adapter.map_or(0, |a| a as *const Adapter as usize);
            (own_layers, address, items[i].capture)
        });
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); items.len()];
        match &self.network {
            Network::Native(native) => {
                native_embed(native, &texts, items, &order, &mut out, self.hidden())?
            }
            Network::Candle(model) => {
                let alike = |&a: &usize, &b: &usize| {
                    same_adapter(items[a], items[b]) && items[a].capture == items[b].capture
                };
                for group in order.chunk_by(alike) {
                    let vectors = candle_group(model, &texts, items, group)?;
                    for (&i, vector) in group.iter().zip(vectors) {
                        out[i] = finish(vector, items[i]);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// One packed pass of the native engine over `items` in `order`, each
/// answer (pooled vector or captured token vectors) into `out`.
fn native_embed(
    native: &NativeBert,
    texts: &[&TokenizedText],
    items: &[EmbedItem<'_>],
    order: &[usize],
    out: &mut [Vec<f32>],
    hidden: usize,
) -> Result<()> {
    let ids: Vec<&[u32]> = order.iter().map(|&i| texts[i].ids.as_slice()).collect();
    let adapters: Vec<Option<&Adapter>> = order.iter().map(|&i| items[i].adapter).collect();
    let captures: Vec<Option<usize>> = order.iter().map(|&i| items[i].capture).collect();
    let (tokens, mut captured) = native.forward_captured(&ids, &adapters, &captures)?;
    let mut start = 0;
    for (position, &i) in order.iter().enumerate() {
        let len = texts[i].ids.len();
        out[i] = match captured[position].take() {
            Some(rows) => rows,
            None => {
                let rows = &tokens[start * hidden..(start + len) * hidden];
                finish(
                    crate::backbone::text::pooling::pool_rows(
                        rows,
                        hidden,
                        items[i].options.pooling,
                    ),
                    items[i],
                )
            }
        };
        start += len;
    }
    Ok(())
}

fn same_adapter(a: EmbedItem<'_>, b: EmbedItem<'_>) -> bool {
    match (a.adapter, b.adapter) {
        (None, None) => true,
        (Some(a), Some(b)) => std::ptr::eq(a, b),
        _ => false,
    }
}

/// Pooled vectors of `group` (indices into `items`: one adapter or none,
/// and one capture or none; a capture gives token vectors instead),
/// through candle's graph padded to the group's longest text.
fn candle_group(
    model: &BertGraph,
    texts: &[&TokenizedText],
    items: &[EmbedItem<'_>],
    group: &[usize],
) -> Result<Vec<Vec<f32>>> {
    let ids: Vec<&[u32]> = group.iter().map(|&i| texts[i].ids.as_slice()).collect();
    let (ids, mask) = model.padded_batch(&ids)?;
    if let Some(layers) = group.first().and_then(|&i| items[i].capture) {
        let hidden = model.forward_bottom(&ids, &mask, layers, graph::Kernels::Fused)?;
        return group
            .iter()
            .enumerate()
            .map(|(row, &i)| {
                let rows = hidden.get(row)?.narrow(0, 0, texts[i].ids.len())?;
                Ok(rows.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
            })
            .collect();
    }
    let tuning = match group.first().and_then(|&i| items[i].adapter) {
        Some(adapter) => adapter.to_graph(model)?,
        None => graph::Tuning::Frozen(0),
    };
    let hidden = model.forward_adapted(&ids, &mask, &tuning, graph::Kernels::Fused)?;
    let mask = mask.to_dtype(DType::F32)?;
    // Pool once per kind the group needs; items of one group may differ.
    let wants = |pooling| group.iter().any(|&i| items[i].options.pooling == pooling);
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
    group
        .iter()
        .enumerate()
        .map(|(row, &i)| {
            let pooled = match items[i].options.pooling {
                Pooling::Mean => mean.as_mut(),
                Pooling::Cls => cls.as_mut(),
                // Rare for an encoder: pooled on the host from the text's rows.
                other => {
                    let rows = hidden.get(row)?.narrow(0, 0, texts[i].ids.len())?;
                    let rows: Vec<f32> = rows.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                    let width = hidden.dim(2)?;
                    return Ok(crate::backbone::text::pooling::pool_rows(
                        &rows, width, other,
                    ));
                }
            };
            // Each row belongs to exactly one item: move it out instead of copying.
            pooled
                .map(|rows| std::mem::take(&mut rows[row]))
                .ok_or_else(|| Error::Inference("pooling was not computed".into()))
        })
        .collect()
}

/// Normalizes a pooled vector when its item asks for it (captured token
/// vectors stay as they are).
fn finish(pooled: Vec<f32>, item: EmbedItem<'_>) -> Vec<f32> {
    if item.options.normalize && item.capture.is_none() {
        crate::nn::l2_normalize(pooled)
    } else {
        pooled
    }
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
