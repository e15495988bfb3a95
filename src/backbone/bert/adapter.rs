//! What a fine-tuned head changes in its BERT backbone, frozen, on the host in
//! f32: a LoRA adapter of the top layers (what serving adds to the shared
//! forward pass, and what is exported in the Python `peft` package's layout)
//! or the top layers trained in full ([`super::top_layers`]).
//!
//! Tensors are named as `peft` names them under a Hugging Face `BertModel`
//! (`base_model.model.encoder.layer.{i}.{module}.lora_A.weight`, `[rank,
//! inputs]`, and `lora_B.weight`, `[outputs, rank]`), in the head's file and in
//! an export alike, so that one naming serves both.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use gemm::Parallelism;

use super::graph::{BertGraph, Tuning};
use super::lora::{LayerAdapters, LowRank};
use super::top_layers::TopLayers;
use crate::{Error, Result};

/// The adapted modules of one encoder layer, by their path under the layer;
/// a layer's slots follow this order.
pub const MODULES: [&str; 6] = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];

/// `(inputs, outputs)` of each slot's dense layer in an encoder layer of
/// width `hidden` and feed-forward width `intermediate`.
pub fn slot_shapes(hidden: usize, intermediate: usize) -> [(usize, usize); 6] {
    let (h, i) = (hidden, intermediate);
    [(h, h), (h, h), (h, h), (h, h), (h, i), (i, h)]
}

/// Where each layer's tensors are named from.
const PREFIX: &str = "base_model.model.encoder.layer.";

/// The highest layer index a stored adapter may name (a bound on what a
/// damaged file can make us allocate).
const MAX_LAYER: usize = 1024;

/// The two matrices of one adapted dense layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LowRankWeights {
    /// `[rank, inputs]`, row-major.
    pub a: Vec<f32>,
    /// `[outputs, rank]`, row-major.
    pub b: Vec<f32>,
    pub rank: usize,
    pub inputs: usize,
    pub outputs: usize,
}

impl LowRankWeights {
    /// Adds `scale · x·Aᵀ·Bᵀ` into `out`: `x` holds `rows` rows of `inputs`
    /// values; the update of row `i` goes to `out[i * out_stride + column..]`
    /// (`outputs` values), so that it can land in part of a wider product
    /// (the query, key or value columns of the fused QKV one).
    pub fn add_update(
        &self,
        x: &[f32],
        rows: usize,
        scale: f32,
        (out, out_stride, column): (&mut [f32], usize, usize),
    ) {
        let (rank, inputs, outputs) = (self.rank, self.inputs, self.outputs);
        assert!(x.len() >= rows * inputs, "adapter input too short");
        assert!(
            rows == 0 || out.len() >= (rows - 1) * out_stride + column + outputs,
            "adapter output too short"
        );
        if rows == 0 {
            return;
        }
        let parallelism = match rayon::current_num_threads() {
            1 => Parallelism::None,
            n => Parallelism::Rayon(n),
        };
        let mut low = vec![0f32; rows * rank];
        // SAFETY: `x` is [rows, inputs] row-major (checked above); `a` is
        // [rank, inputs], read as its transpose [inputs, rank] (column stride
        // `inputs`, row stride 1); `low` is [rows, rank].
        unsafe {
            gemm::gemm(
                rows,
                rank,
                inputs,
                low.as_mut_ptr(),
                1,
                rank as isize,
                false,
                x.as_ptr(),
                1,
                inputs as isize,
                self.a.as_ptr(),
                inputs as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
        // SAFETY: `low` is [rows, rank]; `b` is [outputs, rank], read as its
        // transpose; the destination is `rows` rows of `outputs` values at
        // `column`, row stride `out_stride`, inside `out` (checked above).
        // dst = 1 · dst + scale · low·Bᵀ.
        unsafe {
            gemm::gemm(
                rows,
                outputs,
                rank,
                out.as_mut_ptr().add(column),
                1,
                out_stride as isize,
                true,
                low.as_ptr(),
                1,
                rank as isize,
                self.b.as_ptr(),
                rank as isize,
                1,
                1.0,
                scale,
                false,
                false,
                false,
                parallelism,
            );
        }
    }
}

/// The slots of one adapted layer, in the order of [`MODULES`].
pub type LayerSlots = [Option<LowRankWeights>; 6];

/// A LoRA adapter of the top layers of a BERT encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdapter {
    pub rank: usize,
    pub alpha: f64,
    /// The encoder layer the first entry of `layers` adapts.
    pub first_layer: usize,
    /// From `first_layer` up to the last encoder layer.
    pub layers: Vec<LayerSlots>,
}

impl LoraAdapter {
    /// `alpha / rank`, the factor of every update (as `peft` defines it).
    pub fn scale(&self) -> f32 {
        (self.alpha / self.rank as f64) as f32
    }

    /// The slots of encoder layer `index`, if the adapter reaches it.
    pub fn layer(&self, index: usize) -> Option<&LayerSlots> {
        index
            .checked_sub(self.first_layer)
            .and_then(|offset| self.layers.get(offset))
    }

    /// Bytes of the adapter's matrices.
    pub fn size_bytes(&self) -> usize {
        let floats: usize = self
            .layers
            .iter()
            .flatten()
            .flatten()
            .map(|w| w.a.len() + w.b.len())
            .sum();
        floats * std::mem::size_of::<f32>()
    }

    /// The trained adapters of a fine-tuning run (`layers[0]` on encoder layer
    /// `first_layer`), copied to the host in f32.
    pub fn from_trained(
        layers: &[LayerAdapters],
        rank: usize,
        alpha: f64,
        first_layer: usize,
    ) -> Result<Self> {
        let copy = |low: &LowRank| -> Result<LowRankWeights> {
            let host = |t: &Tensor| -> candle_core::Result<Tensor> {
                t.to_dtype(DType::F32)?.to_device(&Device::Cpu)
            };
            let a = host(low.a.as_tensor())?;
            let b = host(low.b.as_tensor())?;
            let (rank, inputs) = a.dims2()?;
            let (outputs, _) = b.dims2()?;
            Ok(LowRankWeights {
                a: a.flatten_all()?.to_vec1()?,
                b: b.flatten_all()?.to_vec1()?,
                rank,
                inputs,
                outputs,
            })
        };
        let layers = layers
            .iter()
            .map(|layer| {
                let slots = layer.slots();
                let mut out: LayerSlots = Default::default();
                for (slot, trained) in out.iter_mut().zip(slots) {
                    *slot = trained.as_ref().map(copy).transpose()?;
                }
                Ok(out)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            rank,
            alpha,
            first_layer,
            layers,
        })
    }

    /// The adapter as trainable graph adapters in `dtype` on `device`, for the
    /// candle engine.
    pub fn to_graph(
        &self,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Vec<LayerAdapters>> {
        let scale = self.alpha / self.rank as f64;
        let graph = |w: &LowRankWeights| -> candle_core::Result<LowRank> {
            let a = Tensor::from_slice(&w.a, (w.rank, w.inputs), device)?.to_dtype(dtype)?;
            let b = Tensor::from_slice(&w.b, (w.outputs, w.rank), device)?.to_dtype(dtype)?;
            LowRank::from_tensors(&a, &b, scale)
        };
        self.layers
            .iter()
            .map(|slots| {
                let [query, key, value, attention_output, intermediate, output] = slots
                    .each_ref()
                    .map(|slot| slot.as_ref().map(graph).transpose());
                Ok(LayerAdapters::from_slots([
                    query?,
                    key?,
                    value?,
                    attention_output?,
                    intermediate?,
                    output?,
                ]))
            })
            .collect()
    }

    /// The adapter's tensors under `peft`'s names, on the CPU in f32.
    pub fn to_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut tensors = HashMap::new();
        for (offset, slots) in self.layers.iter().enumerate() {
            let index = self.first_layer + offset;
            for (module, slot) in MODULES.iter().zip(slots) {
                let Some(w) = slot else { continue };
                let prefix = format!("{PREFIX}{index}.{module}");
                let a = Tensor::from_slice(&w.a, (w.rank, w.inputs), &Device::Cpu)?;
                let b = Tensor::from_slice(&w.b, (w.outputs, w.rank), &Device::Cpu)?;
                tensors.insert(format!("{prefix}.lora_A.weight"), a);
                tensors.insert(format!("{prefix}.lora_B.weight"), b);
            }
        }
        Ok(tensors)
    }

    /// The adapter among `tensors` (other names are ignored): from the lowest
    /// layer they name to the highest; `None` when they hold no adapter
    /// tensor.
    pub fn from_tensors(
        tensors: &HashMap<String, Tensor>,
        rank: usize,
        alpha: f64,
    ) -> Result<Option<Self>> {
        let mut found: HashMap<(usize, usize), Pair<'_>> = HashMap::new();
        for (name, tensor) in tensors {
            let Some(rest) = name.strip_prefix(PREFIX) else {
                continue;
            };
            let (layer, slot, matrix) = parse_name(rest)
                .ok_or_else(|| Error::Storage(format!("`{name}` is not an adapter tensor name")))?;
            if layer > MAX_LAYER {
                return Err(Error::Storage(format!("`{name}` names layer {layer}")));
            }
            let entry = found.entry((layer, slot)).or_default();
            if matrix == 'A' {
                entry.0 = Some(tensor);
            } else {
                entry.1 = Some(tensor);
            }
        }
        let (Some(first_layer), Some(last_layer)) = (
            found.keys().map(|&(layer, _)| layer).min(),
            found.keys().map(|&(layer, _)| layer).max(),
        ) else {
            return Ok(None);
        };
        let mut layers: Vec<LayerSlots> = vec![Default::default(); last_layer + 1 - first_layer];
        for ((layer, slot), pair) in found {
            layers[layer - first_layer][slot] = Some(read_pair(pair, rank, layer, slot)?);
        }
        Ok(Some(Self {
            rank,
            alpha,
            first_layer,
            layers,
        }))
    }

    /// Writes the adapter into `dir` as `peft` saves a LoRA adapter of a
    /// `BertModel`: adapter_config.json and adapter_model.safetensors. The
    /// targets are one regular expression over the adapted modules' full
    /// names, since peft's suffix matching cannot tell
    /// `attention.output.dense` from `output.dense`.
    pub fn export_peft(&self, dir: &std::path::Path) -> Result<()> {
        let mut modules = Vec::new();
        for (offset, slots) in self.layers.iter().enumerate() {
            let index = self.first_layer + offset;
            for (module, slot) in MODULES.iter().zip(slots) {
                if slot.is_some() {
                    modules.push(format!(
                        "encoder\\.layer\\.{index}\\.{}",
                        module.replace('.', "\\.")
                    ));
                }
            }
        }
        let storage = |err: std::io::Error| {
            Error::Storage(format!(
                "cannot write the adapter to {}: {err}",
                dir.display()
            ))
        };
        std::fs::create_dir_all(dir).map_err(storage)?;
        candle_core::safetensors::save(&self.to_tensors()?, dir.join("adapter_model.safetensors"))?;
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": null,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": false,
            "target_modules": format!(".*({})", modules.join("|")),
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": false,
            "modules_to_save": null,
        });
        let text = serde_json::to_string_pretty(&config)
            .map_err(|err| Error::Internal(format!("adapter_config.json: {err}")))?;
        std::fs::write(dir.join("adapter_config.json"), text).map_err(storage)?;
        Ok(())
    }
}

/// What a fine-tuned head changes in the backbone's top layers.
#[derive(Debug, Clone, PartialEq)]
pub enum Adapter {
    /// Low-rank updates of the base weights.
    Lora(LoraAdapter),
    /// The layers' weights, trained in full, in place of the base ones.
    Layers(TopLayers),
}

/// Which kind of adapter a stored head holds, and what its file does not say.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AdapterKind {
    Lora { rank: usize, alpha: f64 },
    Layers,
}

impl Adapter {
    /// The lowest encoder layer it changes.
    pub fn first_layer(&self) -> usize {
        match self {
            Self::Lora(lora) => lora.first_layer,
            Self::Layers(layers) => layers.first_layer,
        }
    }

    /// The encoder layers it changes, from [`Self::first_layer`] to the top.
    pub fn num_layers(&self) -> usize {
        match self {
            Self::Lora(lora) => lora.layers.len(),
            Self::Layers(layers) => layers.layers.len(),
        }
    }

    pub fn lora(&self) -> Option<&LoraAdapter> {
        match self {
            Self::Lora(lora) => Some(lora),
            Self::Layers(_) => None,
        }
    }

    pub fn top_layers(&self) -> Option<&TopLayers> {
        match self {
            Self::Layers(layers) => Some(layers),
            Self::Lora(_) => None,
        }
    }

    /// Bytes of its weights.
    pub fn size_bytes(&self) -> usize {
        match self {
            Self::Lora(lora) => lora.size_bytes(),
            Self::Layers(layers) => layers.size_bytes(),
        }
    }

    /// Bytes it takes in memory while served, at most: its weights, and for
    /// top layers the serving engine's copy of them too (as large in f32,
    /// smaller in bf16 or int8).
    pub fn resident_bytes(&self) -> usize {
        match self {
            Self::Lora(lora) => lora.size_bytes(),
            Self::Layers(layers) => 2 * layers.size_bytes(),
        }
    }

    /// Its tensors as a head's file keeps them: `peft`'s names for LoRA, a
    /// `BertModel`'s for layers.
    pub fn to_tensors(&self) -> Result<HashMap<String, Tensor>> {
        match self {
            Self::Lora(lora) => lora.to_tensors(),
            Self::Layers(layers) => layers.to_tensors(),
        }
    }

    /// The adapter of `kind` among `tensors`; None when they hold none.
    pub fn from_tensors(
        tensors: &HashMap<String, Tensor>,
        kind: AdapterKind,
    ) -> Result<Option<Self>> {
        Ok(match kind {
            AdapterKind::Lora { rank, alpha } => {
                LoraAdapter::from_tensors(tensors, rank, alpha)?.map(Self::Lora)
            }
            AdapterKind::Layers => TopLayers::from_tensors(tensors)?.map(Self::Layers),
        })
    }

    /// The adapter as `graph` runs it, in its float type on its device.
    pub fn to_graph(&self, graph: &BertGraph) -> candle_core::Result<Tuning> {
        Ok(match self {
            Self::Lora(lora) => Tuning::Lora(lora.to_graph(graph.dtype(), &graph.device())?),
            Self::Layers(layers) => Tuning::Layers(graph.top_layers(layers)?),
        })
    }
}

/// The A and B matrices found for one slot.
type Pair<'a> = (Option<&'a Tensor>, Option<&'a Tensor>);

/// `{layer}.{module}.lora_{A|B}.weight` → (layer, slot, 'A' or 'B').
fn parse_name(rest: &str) -> Option<(usize, usize, char)> {
    let (layer, rest) = rest.split_once('.')?;
    let (module, matrix) = rest
        .strip_suffix(".lora_A.weight")
        .map(|m| (m, 'A'))
        .or_else(|| rest.strip_suffix(".lora_B.weight").map(|m| (m, 'B')))?;
    let slot = MODULES.iter().position(|m| *m == module)?;
    Some((layer.parse().ok()?, slot, matrix))
}

/// Both matrices of one slot, checked against each other and `rank`.
fn read_pair((a, b): Pair<'_>, rank: usize, layer: usize, slot: usize) -> Result<LowRankWeights> {
    let what = || format!("the adapter of layer {layer} {}", MODULES[slot]);
    let (Some(a), Some(b)) = (a, b) else {
        return Err(Error::Storage(format!("{} lacks a matrix", what())));
    };
    let (a_rank, inputs) = a.dims2()?;
    let (outputs, b_rank) = b.dims2()?;
    if a_rank != rank || b_rank != rank {
        return Err(Error::Storage(format!(
            "{} has rank {a_rank}/{b_rank}, not {rank}",
            what()
        )));
    }
    let host = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
        t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
    };
    Ok(LowRankWeights {
        a: host(a)?,
        b: host(b)?,
        rank,
        inputs,
        outputs,
    })
}

#[cfg(test)]
mod tests;
