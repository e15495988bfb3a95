//! The top encoder layers of a BERT model trained in full, frozen, on the host
//! in f32: what a head fine-tuned with the `top_layers` method stores in place
//! of an adapter, and what serving runs instead of the base model's layers for
//! that head's texts.
//!
//! Tensors are named as in a Hugging Face `BertModel`'s state dict
//! (`encoder.layer.{i}.attention.self.query.weight`, ...), so that the stored
//! layers are a part of one: `model.load_state_dict(tensors, strict=False)`
//! puts them in a PyTorch model.

use std::any::Any;
use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};

use super::adapter::{slot_shapes, MODULES};
use crate::nn::Dense;
use crate::{Error, Result};

/// The two layer norms of an encoder layer, by their path under the layer.
pub const NORMS: [&str; 2] = ["attention.output.LayerNorm", "output.LayerNorm"];

/// The highest layer index stored layers may name (a bound on what a damaged
/// file can make us allocate).
const MAX_LAYER: usize = 1024;

/// Scale and shift of one layer norm.
#[derive(Debug, Clone, PartialEq)]
pub struct NormWeights {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// Every weight of one encoder layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerWeights {
    /// The dense layers in the order of [`MODULES`].
    pub dense: [Dense; 6],
    /// The layer norms in the order of [`NORMS`].
    pub norms: [NormWeights; 2],
}

impl LayerWeights {
    fn floats(&self) -> usize {
        let dense: usize = self
            .dense
            .iter()
            .map(|d| d.weight.len() + d.bias.len())
            .sum();
        let norms: usize = self
            .norms
            .iter()
            .map(|n| n.weight.len() + n.bias.len())
            .sum();
        dense + norms
    }

    /// Whether the weights have the shapes of an encoder layer of width
    /// `hidden` and feed-forward width `intermediate`.
    pub fn fits(&self, hidden: usize, intermediate: usize) -> bool {
        let dense = self
            .dense
            .iter()
            .zip(slot_shapes(hidden, intermediate))
            .all(|(d, (inputs, outputs))| {
                d.inputs == inputs
                    && d.outputs == outputs
                    && d.weight.len() == inputs * outputs
                    && d.bias.len() == outputs
            });
        let norms = self
            .norms
            .iter()
            .all(|n| n.weight.len() == hidden && n.bias.len() == hidden);
        dense && norms
    }
}

/// The trained top layers of one head.
#[derive(Debug, Default)]
pub struct TopLayers {
    /// The encoder layer the first entry of `layers` replaces.
    pub first_layer: usize,
    /// From `first_layer` up to the last encoder layer.
    pub layers: Vec<LayerWeights>,
    /// The layers in the serving engine's own form (packed or converted to
    /// its number format), made on first use: converting them for every pass
    /// would cost more than running them.
    prepared: OnceLock<Box<dyn Any + Send + Sync>>,
}

impl Clone for TopLayers {
    fn clone(&self) -> Self {
        Self::new(self.first_layer, self.layers.clone())
    }
}

impl PartialEq for TopLayers {
    fn eq(&self, other: &Self) -> bool {
        self.first_layer == other.first_layer && self.layers == other.layers
    }
}

impl TopLayers {
    pub fn new(first_layer: usize, layers: Vec<LayerWeights>) -> Self {
        Self {
            first_layer,
            layers,
            prepared: OnceLock::new(),
        }
    }

    /// Whether these are the top layers of an encoder of `layers` layers of
    /// width `hidden` and feed-forward width `intermediate`.
    pub fn fits(&self, layers: usize, hidden: usize, intermediate: usize) -> bool {
        self.first_layer + self.layers.len() == layers
            && self.layers.iter().all(|l| l.fits(hidden, intermediate))
    }

    /// The weights of encoder layer `index`, if these layers replace it.
    pub fn layer(&self, index: usize) -> Option<&LayerWeights> {
        index
            .checked_sub(self.first_layer)
            .and_then(|offset| self.layers.get(offset))
    }

    /// Bytes of the weights (an engine's prepared copy comes on top).
    pub fn size_bytes(&self) -> usize {
        let floats: usize = self.layers.iter().map(LayerWeights::floats).sum();
        floats * std::mem::size_of::<f32>()
    }

    /// The layers as engine `T` keeps them, made by `make` on first use; None
    /// when another engine's form was made first (then the caller makes its
    /// own for the pass).
    pub fn prepared<T: Any + Send + Sync>(&self, make: impl FnOnce(&Self) -> T) -> Option<&T> {
        self.prepared
            .get_or_init(|| Box::new(make(self)))
            .downcast_ref::<T>()
    }

    /// The layers' tensors under a `BertModel`'s names, on the CPU in f32.
    pub fn to_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut tensors = HashMap::new();
        for (offset, layer) in self.layers.iter().enumerate() {
            let prefix = format!("encoder.layer.{}", self.first_layer + offset);
            for (module, dense) in MODULES.iter().zip(&layer.dense) {
                let weight =
                    Tensor::from_slice(&dense.weight, (dense.outputs, dense.inputs), &Device::Cpu)?;
                let bias = Tensor::from_slice(&dense.bias, dense.outputs, &Device::Cpu)?;
                tensors.insert(format!("{prefix}.{module}.weight"), weight);
                tensors.insert(format!("{prefix}.{module}.bias"), bias);
            }
            for (norm, weights) in NORMS.iter().zip(&layer.norms) {
                let size = weights.weight.len();
                let weight = Tensor::from_slice(&weights.weight, size, &Device::Cpu)?;
                let bias = Tensor::from_slice(&weights.bias, size, &Device::Cpu)?;
                tensors.insert(format!("{prefix}.{norm}.weight"), weight);
                tensors.insert(format!("{prefix}.{norm}.bias"), bias);
            }
        }
        Ok(tensors)
    }

    /// Writes the layers into `dir` as top_layers.safetensors, under a
    /// `BertModel`'s names; returns the file's name.
    pub fn export(&self, dir: &std::path::Path) -> Result<&'static str> {
        const FILE: &str = "top_layers.safetensors";
        std::fs::create_dir_all(dir).map_err(|err| {
            Error::Storage(format!(
                "cannot write the layers to {}: {err}",
                dir.display()
            ))
        })?;
        candle_core::safetensors::save(&self.to_tensors()?, dir.join(FILE))?;
        Ok(FILE)
    }

    /// The layers among `tensors` (other names are ignored), from the lowest
    /// layer they name to the highest; `None` when they hold no layer.
    pub fn from_tensors(tensors: &HashMap<String, Tensor>) -> Result<Option<Self>> {
        let indices: Vec<usize> = tensors
            .keys()
            .filter_map(|name| name.strip_prefix("encoder.layer."))
            .map(|rest| {
                rest.split_once('.')
                    .and_then(|(index, _)| index.parse::<usize>().ok())
                    .filter(|&index| index <= MAX_LAYER)
                    .ok_or_else(|| Error::Storage(format!("`encoder.layer.{rest}` names no layer")))
            })
            .collect::<Result<_>>()?;
        let (Some(&first), Some(&last)) = (indices.iter().min(), indices.iter().max()) else {
            return Ok(None);
        };
        let layers = (first..=last)
            .map(|index| read_layer(tensors, index))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Self::new(first, layers)))
    }
}

/// Layer `index`'s weights among `tensors`; every one must be there.
fn read_layer(tensors: &HashMap<String, Tensor>, index: usize) -> Result<LayerWeights> {
    let get = |name: String| -> Result<&Tensor> {
        tensors
            .get(&name)
            .ok_or_else(|| Error::Storage(format!("the stored layers lack `{name}`")))
    };
    let host =
        |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?) };
    let prefix = format!("encoder.layer.{index}");
    let dense = MODULES.map(|module| -> Result<Dense> {
        let weight = get(format!("{prefix}.{module}.weight"))?;
        let (outputs, inputs) = weight.dims2()?;
        let bias = host(get(format!("{prefix}.{module}.bias"))?)?;
        if bias.len() != outputs {
            return Err(Error::Storage(format!(
                "{prefix}.{module}.bias has {} values for {outputs} outputs",
                bias.len()
            )));
        }
        Ok(Dense {
            weight: host(weight)?,
            bias,
            inputs,
            outputs,
        })
    });
    let norms = NORMS.map(|norm| -> Result<NormWeights> {
        Ok(NormWeights {
            weight: host(get(format!("{prefix}.{norm}.weight"))?)?,
            bias: host(get(format!("{prefix}.{norm}.bias"))?)?,
        })
    });
    let [q, k, v, o, i, out] = dense;
    let [attention_norm, output_norm] = norms;
    Ok(LayerWeights {
        dense: [q?, k?, v?, o?, i?, out?],
        norms: [attention_norm?, output_norm?],
    })
}
