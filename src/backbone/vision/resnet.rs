//! ResNet-50 (He et al., 2015) in torchvision's layout (`conv1`, `bn1`,
//! `layer1.0.conv1`, ..., `layer4.2.bn3`, `layerN.0.downsample.{0,1}`, `fc`),
//! which timm's `resnet50` exports share: torchvision's "v1.5", with the
//! stride on each stage's first 3x3 convolution. Batch norm (epsilon 1e-5) is
//! folded into the convolutions; the classifier `fc` is loaded on its own so
//! that the pooled features and the ImageNet head are both available.

use candle_core::{Tensor, D};
use candle_nn::VarBuilder;

use super::{
    layers::{global_average, Activation, ConvBn, ConvSpec, Linear, Padding},
    native,
};

const FEATURES: usize = 2048;
const BN_EPS: f64 = 1e-5;
/// Bottleneck blocks per stage and their inner widths (the output is 4x).
const STAGES: [(usize, usize); 4] = [(3, 64), (4, 128), (6, 256), (3, 512)];
const EXPANSION: usize = 4;

/// 1x1 reduce, 3x3, 1x1 expand; the shortcut is added before the last ReLU.
struct Bottleneck {
    reduce: ConvBn,
    spatial: ConvBn,
    /// Without its activation: the ReLU follows the shortcut's addition.
    expand: ConvBn,
    downsample: Option<ConvBn>,
}

pub struct ResNet50 {
    stem: ConvBn,
    blocks: Vec<Bottleneck>,
    classifier: Option<Linear>,
}

/// A convolution `name` and batch norm `bn` of `vb`, folded.
fn conv_bn(
    vb: &VarBuilder,
    name: &str,
    bn: &str,
    spec: ConvSpec,
    activation: Activation,
) -> candle_core::Result<ConvBn> {
    ConvBn::load(vb.pp(name), Some((vb.pp(bn), BN_EPS)), spec, activation)
}

impl ResNet50 {
    pub fn load(vb: VarBuilder<'static>) -> candle_core::Result<Self> {
        let stem = conv_bn(
            &vb,
            "conv1",
            "bn1",
            ConvSpec::new(3, 64, 7, Padding::Symmetric(3)).stride(2),
            Activation::Relu,
        )?;
        let mut blocks = Vec::new();
        let mut channels = 64;
        for (stage, &(repeats, width)) in STAGES.iter().enumerate() {
            for index in 0..repeats {
                let stride = if stage > 0 && index == 0 { 2 } else { 1 };
                let b = vb.pp(format!("layer{}", stage + 1)).pp(index);
                blocks.push(Bottleneck::load(&b, channels, width, stride)?);
                channels = width * EXPANSION;
            }
        }
        let classifier = Linear::load_optional(vb.pp("fc"), FEATURES)?;
        Ok(Self {
            stem,
            blocks,
            classifier,
        })
    }
}

impl Bottleneck {
    fn load(
        b: &VarBuilder,
        input: usize,
        width: usize,
        stride: usize,
    ) -> candle_core::Result<Self> {
        let output = width * EXPANSION;
        let downsample = (stride != 1 || input != output)
            .then(|| {
                let d = b.pp("downsample");
                ConvBn::load(
                    d.pp(0),
                    Some((d.pp(1), BN_EPS)),
                    ConvSpec::new(input, output, 1, Padding::Symmetric(0)).stride(stride),
                    Activation::None,
                )
            })
            .transpose()?;
        Ok(Self {
            reduce: conv_bn(
                b,
                "conv1",
                "bn1",
                ConvSpec::new(input, width, 1, Padding::Symmetric(0)),
                Activation::Relu,
            )?,
            spatial: conv_bn(
                b,
                "conv2",
                "bn2",
                ConvSpec::new(width, width, 3, Padding::Symmetric(1)).stride(stride),
                Activation::Relu,
            )?,
            expand: conv_bn(
                b,
                "conv3",
                "bn3",
                ConvSpec::new(width, output, 1, Padding::Symmetric(0)),
                Activation::None,
            )?,
            downsample,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self
            .expand
            .forward(&self.spatial.forward(&self.reduce.forward(x)?)?)?;
        let shortcut = match &self.downsample {
            Some(downsample) => downsample.forward(x)?,
            None => x.clone(),
        };
        (y + shortcut)?.relu()
    }

    fn to_native(&self) -> candle_core::Result<native::Block> {
        let mut expand = self.expand.folded()?;
        expand.activation = Activation::Relu;
        Ok(native::Block {
            layers: vec![
                native::Layer::Conv(native::Conv2d::new(self.reduce.folded()?)),
                native::Layer::Conv(native::Conv2d::new(self.spatial.folded()?)),
                native::Layer::Conv(native::Conv2d::new(expand)),
            ],
            shortcut: match &self.downsample {
                Some(downsample) => {
                    native::Shortcut::Projection(native::Conv2d::new(downsample.folded()?))
                }
                None => native::Shortcut::Identity,
            },
        })
    }
}

impl super::ImageNetwork for ResNet50 {
    fn dimension(&self) -> usize {
        FEATURES
    }

    fn features(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.stem.forward(pixels)?;
        // Max pooling 3x3, stride 2, padding 1: padding with copies of the
        // edge never changes a maximum, as padding with minus infinity.
        let mut x = x
            .pad_with_same(D::Minus1, 1, 1)?
            .pad_with_same(D::Minus2, 1, 1)?
            .max_pool2d_with_stride(3, 2)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        global_average(&x)
    }

    fn to_native(&self) -> candle_core::Result<native::NativeNetwork> {
        let mut blocks = vec![
            native::Block::single(native::Layer::Conv(native::Conv2d::new(
                self.stem.folded()?,
            ))),
            native::Block::single(native::Layer::MaxPool {
                kernel: 3,
                stride: 2,
                padding: 1,
            }),
        ];
        for block in &self.blocks {
            blocks.push(block.to_native()?);
        }
        Ok(native::NativeNetwork {
            blocks,
            tail: native::Tail::Average,
        })
    }

    fn classifier(&self) -> Option<&Linear> {
        self.classifier.as_ref()
    }
}
