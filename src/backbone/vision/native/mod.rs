//! The native engine of the image backbones: convolutional networks computed
//! channels-last on the CPU by kernels of our own (see each module), instead
//! of candle's channels-first graph.
//!
//! A network is a sequence of blocks; a block is a sequence of layers whose
//! last convolution may add a shortcut (the block's input, or a projection of
//! it) before its activation, which covers ResNet's bottlenecks,
//! EfficientNet's inverted residuals and VGG's plain stacks alike. The
//! networks are built from the same folded layers as the candle ones
//! (`ImageNetwork::to_native` of each architecture), so both engines read the
//! weights through one path.

mod conv;
mod depthwise;
mod map;
mod pool;
#[cfg(test)]
mod tests;

pub use conv::Conv2d;
pub use depthwise::Depthwise;
pub use map::FeatureMap;

use crate::{
    backbone::{profile::Stopwatch, vision::layers::Activation},
    nn::{self, Dense},
};

/// One layer of a block.
pub enum Layer {
    Conv(Conv2d),
    Depthwise(Depthwise),
    /// PyTorch's `MaxPool2d(kernel, stride, padding)`.
    MaxPool {
        kernel: usize,
        stride: usize,
        padding: usize,
    },
    SqueezeExcitation(SqueezeExcitation),
}

/// What a block adds to its last convolution's output.
pub enum Shortcut {
    None,
    /// The block's input.
    Identity,
    /// A convolution of the block's input (ResNet's downsampling).
    Projection(Conv2d),
}

pub struct Block {
    pub layers: Vec<Layer>,
    pub shortcut: Shortcut,
}

impl Block {
    /// A block of one layer and no shortcut.
    pub fn single(layer: Layer) -> Self {
        Self {
            layers: vec![layer],
            shortcut: Shortcut::None,
        }
    }
}

/// EfficientNet-B0's channel attention: the pooled map through two small
/// dense layers gives each channel a weight in (0, 1).
pub struct SqueezeExcitation {
    pub reduce: Dense,
    pub expand: Dense,
    pub activation: Activation,
}

/// What follows the last block.
pub enum Tail {
    /// The global average of the last map.
    Average,
    /// VGG's fc6 and fc7 with ReLUs, on the last map flattened; fc6's inputs
    /// are in channels-last order (see `vgg::Vgg16::to_native`).
    Dense {
        fc6: Box<nn::Linear>,
        fc7: Box<nn::Linear>,
        side: usize,
    },
}

pub struct NativeNetwork {
    pub blocks: Vec<Block>,
    pub tail: Tail,
}

impl NativeNetwork {
    /// `pixels` is `[batch][3][side][side]` (PyTorch's order), the result
    /// `[batch][dimension]`.
    pub fn features(
        &self,
        pixels: &[f32],
        batch: usize,
        side: usize,
    ) -> candle_core::Result<Vec<f32>> {
        let mut stopwatch = Stopwatch::start();
        let mut x = FeatureMap::from_nchw(pixels, batch, 3, side, side);
        stopwatch.lap("channels_last");
        for block in &self.blocks {
            x = block.forward(x, &mut stopwatch)?;
        }
        let features = match &self.tail {
            Tail::Average => {
                let pooled = pool::global_average(&x);
                stopwatch.lap("pooling");
                pooled
            }
            Tail::Dense { fc6, fc7, side } => {
                if (x.height, x.width) != (*side, *side) {
                    candle_core::bail!(
                        "the dense layers need a {side}x{side} final map, got {}x{}",
                        x.height,
                        x.width
                    );
                }
                let threads = rayon::current_num_threads();
                let mut hidden = fc6.forward(&x.values, threads);
                map::activate(Activation::Relu, &mut hidden);
                let mut out = fc7.forward(&hidden, threads);
                map::activate(Activation::Relu, &mut out);
                stopwatch.lap("dense");
                out
            }
        };
        stopwatch.finish(batch);
        Ok(features)
    }
}

impl Block {
    fn forward(&self, x: FeatureMap, stopwatch: &mut Stopwatch) -> candle_core::Result<FeatureMap> {
        let Some((last, rest)) = self.layers.split_last() else {
            return Ok(x);
        };
        let projected = match &self.shortcut {
            Shortcut::Projection(conv) => {
                let projected = conv.forward(&x, None)?;
                stopwatch.lap("shortcut");
                Some(projected)
            }
            _ => None,
        };
        let mut y: Option<FeatureMap> = None;
        for layer in rest {
            let next = layer.forward(y.as_ref().unwrap_or(&x), None)?;
            stopwatch.lap(layer.kind());
            y = Some(next);
        }
        let residual = match &self.shortcut {
            Shortcut::None => None,
            Shortcut::Identity => Some(&x),
            Shortcut::Projection(_) => projected.as_ref(),
        };
        let out = last.forward(y.as_ref().unwrap_or(&x), residual)?;
        stopwatch.lap(last.kind());
        Ok(out)
    }
}

impl Layer {
    fn forward(
        &self,
        x: &FeatureMap,
        residual: Option<&FeatureMap>,
    ) -> candle_core::Result<FeatureMap> {
        match (self, residual) {
            (Layer::Conv(conv), residual) => conv.forward(x, residual),
            (Layer::Depthwise(layer), None) => layer.forward(x),
            (
                Layer::MaxPool {
                    kernel,
                    stride,
                    padding,
                },
                None,
            ) => pool::max_pool(x, *kernel, *stride, *padding),
            (Layer::SqueezeExcitation(layer), None) => Ok(layer.forward(x)),
            (_, Some(_)) => candle_core::bail!("only a convolution ends a block with a shortcut"),
        }
    }

    /// The kind of work, as profiles report it.
    fn kind(&self) -> &'static str {
        match self {
            Layer::Conv(conv) if conv.in_channels() == 3 => "stem",
            Layer::Conv(conv) if conv.kernel() == 1 => "conv_1x1",
            Layer::Conv(_) => "conv_kxk",
            Layer::Depthwise(_) => "depthwise",
            Layer::MaxPool { .. } => "pooling",
            Layer::SqueezeExcitation(_) => "squeeze_excitation",
        }
    }
}

impl SqueezeExcitation {
    fn forward(&self, x: &FeatureMap) -> FeatureMap {
        let pooled = pool::global_average(x);
        let mut out = FeatureMap::with_shape(x.batch, x.height, x.width, x.channels);
        out.values.copy_from_slice(&x.values);
        let pixels = x.height * x.width * x.channels;
        for (image, pooled) in pooled.chunks_exact(x.channels).enumerate() {
            let mut squeezed = self.reduce.apply(pooled);
            squeezed
                .iter_mut()
                .for_each(|v| *v = self.activation.apply_scalar(*v));
            let scale: Vec<f32> = self
                .expand
                .apply(&squeezed)
                .into_iter()
                .map(|v| 1.0 / (1.0 + (-v).exp()))
                .collect();
            for pixel in out.values[image * pixels..][..pixels].chunks_exact_mut(x.channels) {
                pixel.iter_mut().zip(&scale).for_each(|(v, s)| *v *= s);
            }
        }
        out
    }
}
