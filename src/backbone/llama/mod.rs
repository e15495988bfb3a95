//! Llama-architecture decoders (Llama, SmolLM2, ...) from one GGUF file, as
//! feature extractors: the final hidden states of a text, pooled.
//!
//! Every text gets the model's end-of-sequence token appended (the token
//! that last-token pooling takes; under causal attention the only one that
//! has seen the whole text), like the special tokens a BERT tokenizer adds.
//! The forward pass is the native CPU engine of [`native`]
//! (packed texts) or the candle graph of [`graph`] (padded
//! texts; the engine of GPUs).

pub mod graph;
pub mod native;

use graph::LlamaGraph;
use native::{LlamaSettings, NativeLlama};

use super::{
    candle_device,
    catalog::{self, Family},
    engine,
    text::{pooling::pooled, texts_of, TextEncoder},
    weights::{gguf::GgufFile, source::ModelFiles},
    Backbone, BackboneDescriptor, EmbedItem, EmbedOptions, Input, Modality, Prepared,
};
use crate::{
    config::{BackboneConfig, Engine},
    Error, Result,
};

/// The network that computes token vectors.
enum Network {
    Native(NativeLlama),
    Candle(LlamaGraph),
}

pub struct LlamaBackbone {
    network: Network,
    encoder: TextEncoder,
    descriptor: BackboneDescriptor,
}

impl LlamaBackbone {
    pub fn load(config: &BackboneConfig, files: &ModelFiles) -> Result<Self> {
        let device = candle_device(config.device)?;
        let (engine, precision) = engine::choose(config, Family::Llama, &device)?;
        let file = GgufFile::open(&files.weights)?;
        let settings = LlamaSettings::read(&file)?;
        let max_len = config.max_sequence_length.unwrap_or(settings.context);
        if max_len > settings.context {
            return Err(Error::ModelLoad(format!(
                "max_sequence_length {max_len} exceeds the model's context of {} tokens",
                settings.context
            )));
        }
        let encoder = TextEncoder::new(file.tokenizer(true)?, max_len)?;
        let network = match engine {
            Engine::Native => {
                Network::Native(NativeLlama::load(&file, &settings, precision, max_len)?)
            }
            Engine::Candle | Engine::Auto => Network::Candle(LlamaGraph::load(
                &file,
                &settings,
                (precision, &device),
                max_len,
            )?),
        };
        let descriptor = BackboneDescriptor {
            name: config.name.clone(),
            architecture: config.architecture,
            modality: Modality::Text,
            dimension: settings.hidden,
            device: config.device.to_string(),
            dtype: precision.as_str().to_owned(),
            max_sequence_length: max_len,
            image_size: 0,
            encoder_layers: 0,
            default_options: EmbedOptions {
                pooling: catalog::default_pooling(config),
                normalize: config.normalize,
            },
            default_truncate: config.truncate,
            fingerprint: super::weights::source::fingerprint(&files.weights)?,
            source: files.origin.clone(),
        };
        tracing::info!(
            backbone = %config.name,
            engine = engine.as_str(),
            precision = precision.as_str(),
            layers = settings.layers,
            hidden = settings.hidden,
            context = settings.context,
            "decoder engine"
        );
        Ok(Self {
            network,
            encoder,
            descriptor,
        })
    }
}

impl Backbone for LlamaBackbone {
    fn descriptor(&self) -> &BackboneDescriptor {
        &self.descriptor
    }

    fn pads_batches(&self) -> bool {
        matches!(self.network, Network::Candle(_))
    }

    fn prepare(&self, index: usize, input: Input, truncate: bool) -> Result<Prepared> {
        self.encoder
            .prepare(index, input, truncate, &self.descriptor.name)
    }

    fn embed(&self, items: &[EmbedItem<'_>]) -> Result<Vec<Vec<f32>>> {
        if items
            .iter()
            .any(|item| item.adapter.is_some() || item.capture.is_some())
        {
            return Err(Error::Inference(
                "llama backbones cannot be fine-tuned".into(),
            ));
        }
        let texts = texts_of(items)?;
        let ids: Vec<&[u32]> = texts.iter().map(|text| text.ids.as_slice()).collect();
        let hidden = self.descriptor.dimension;
        let finish = |rows: &[f32], item: &EmbedItem<'_>| pooled(rows, hidden, item.options);
        let mut out = Vec::with_capacity(items.len());
        match &self.network {
            Network::Native(native) => {
                let tokens = native.forward(&ids)?;
                let mut start = 0;
                for (item, text) in items.iter().zip(&ids) {
                    out.push(finish(
                        &tokens[start * hidden..(start + text.len()) * hidden],
                        item,
                    ));
                    start += text.len();
                }
            }
            Network::Candle(graph) => {
                let padded = graph.forward(&ids)?;
                for (row, (item, text)) in items.iter().zip(&ids).enumerate() {
                    out.push(finish(&graph::text_rows(&padded, row, text.len())?, item));
                }
            }
        }
        Ok(out)
    }
}
