//! VGG16 (Simonyan & Zisserman, 2014) in torchvision's layout: `features.N` for
//! the thirteen 3x3 convolutions (N = 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26,
//! 28; the indices in between are ReLUs and max-pools) and `classifier.{0,3,6}`
//! for the three dense layers. Batched, unlike candle-transformers' VGG, which
//! takes one image at a time.
//!
//! Two feature layers, chosen in the backbone's configuration:
//! - `pool5`: the global average of the last convolutional block, 512 values
//!   (Keras' `VGG16(include_top=False, pooling="avg")`);
//! - `fc7`: the second dense layer after its ReLU, 4096 values, the classic
//!   transfer-learning feature; the ImageNet classifier (`classifier.6`) applies
//!   to it.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::{
    layers::{global_average, Activation, ConvBn, ConvSpec, Linear, Padding},
    native,
};
use crate::{
    config::{Precision, VggFeatures},
    nn,
};

/// Output channels of each convolution; 0 marks a 2x2 max-pool.
const LAYOUT: [usize; 18] = [
    64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0,
];
/// torchvision's classifier sees the last block's map pooled to 7x7.
const POOLED_SIDE: usize = 7;
const HIDDEN: usize = 4096;

enum Layer {
    Conv(ConvBn),
    MaxPool,
}

pub struct Vgg16 {
    layers: Vec<Layer>,
    /// `classifier.0` and `classifier.3`, when the features are fc7.
    dense: Option<(Linear, Linear)>,
    classifier: Option<Linear>,
    features: VggFeatures,
}

impl Vgg16 {
    pub fn load(vb: VarBuilder, features: VggFeatures) -> candle_core::Result<Self> {
        let mut layers = Vec::new();
        // torchvision numbers every module of `features`: conv, ReLU, ..., pool.
        let mut index = 0;
        let mut channels = 3;
        for &out in &LAYOUT {
            if out == 0 {
                layers.push(Layer::MaxPool);
                index += 1;
            } else {
                layers.push(Layer::Conv(ConvBn::load(
                    vb.pp("features").pp(index),
                    None,
                    ConvSpec::new(channels, out, 3, Padding::Symmetric(1)).with_bias(),
                    Activation::Relu,
                )?));
                channels = out;
                index += 2;
            }
        }
        let (dense, classifier) = match features {
            VggFeatures::Pool5 => (None, None),
            VggFeatures::Fc7 => {
                let c = vb.pp("classifier");
                let fc6 = Linear::load(c.pp(0), channels * POOLED_SIDE * POOLED_SIDE, HIDDEN)?;
                let fc7 = Linear::load(c.pp(3), HIDDEN, HIDDEN)?;
                let classifier = Linear::load_optional(c.pp(6), HIDDEN)?;
                (Some((fc6, fc7)), classifier)
            }
        };
        Ok(Self {
            layers,
            dense,
            classifier,
            features,
        })
    }
}

impl super::ImageNetwork for Vgg16 {
    fn dimension(&self) -> usize {
        match self.features {
            VggFeatures::Pool5 => 512,
            VggFeatures::Fc7 => HIDDEN,
        }
    }

    fn features(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = pixels.clone();
        for layer in &self.layers {
            x = match layer {
                Layer::Conv(conv) => conv.forward(&x)?,
                Layer::MaxPool => x.max_pool2d(2)?,
            };
        }
        match &self.dense {
            None => global_average(&x),
            Some((fc6, fc7)) => {
                let (_, _, height, width) = x.dims4()?;
                if (height, width) != (POOLED_SIDE, POOLED_SIDE) {
                    candle_core::bail!(
                        "VGG16 fc7 features need a 224x224 input (a 7x7 final map), got {height}x{width}"
                    );
                }
                let flat = x.flatten_from(1)?;
                fc7.forward(&fc6.forward(&flat)?.relu()?)?.relu()
            }
        }
    }

    fn to_native(&self) -> candle_core::Result<native::NativeNetwork> {
        let mut blocks = Vec::new();
        for layer in &self.layers {
            blocks.push(native::Block::single(match layer {
                Layer::Conv(conv) => native::Layer::Conv(native::Conv2d::new(conv.folded()?)),
                Layer::MaxPool => native::Layer::MaxPool {
                    kernel: 2,
                    stride: 2,
                    padding: 0,
                },
            }));
        }
        let tail = match &self.dense {
            None => native::Tail::Average,
            Some((fc6, fc7)) => native::Tail::Dense {
                fc6: Box::new(nn::Linear::new(
                    channels_last_inputs(fc6.to_dense()?),
                    Precision::F32,
                )),
                fc7: Box::new(nn::Linear::new(fc7.to_dense()?, Precision::F32)),
                side: POOLED_SIDE,
            },
        };
        Ok(native::NativeNetwork { blocks, tail })
    }

    fn classifier(&self) -> Option<&Linear> {
        self.classifier.as_ref()
    }
}

/// fc6 reads the last map flattened channels-first (`[channel][y][x]`, as
/// torchvision flattens); the native engine's map is channels-last, so the
/// weights' columns are reordered to `[y][x][channel]` once.
fn channels_last_inputs(mut fc6: nn::Dense) -> nn::Dense {
    let pixels = POOLED_SIDE * POOLED_SIDE;
    let channels = fc6.inputs / pixels;
    let mut reordered = vec![0f32; fc6.inputs];
    for row in fc6.weight.chunks_exact_mut(fc6.inputs) {
        for channel in 0..channels {
            for pixel in 0..pixels {
                reordered[pixel * channels + channel] = row[channel * pixels + pixel];
            }
        }
        row.copy_from_slice(&reordered);
    }
    fc6
}
