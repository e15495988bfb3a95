//! EfficientNet-B0 and EfficientNet-Lite0 (Tan & Le, 2019; the Lite variants
//! from TensorFlow's `efficientnet/lite`), in the weight layout of the PyTorch
//! ports by lukemelas (`efficientnet_pytorch`) and ml-illustrated
//! (`efficientnet_lite_pytorch`): `_conv_stem`, `_bn0`, `_blocks.N._expand_conv`,
//! `_blocks.N._bn0`, `_blocks.N._depthwise_conv`, `_blocks.N._bn1`,
//! `_blocks.N._se_reduce` / `_se_expand` (B0 only), `_blocks.N._project_conv`,
//! `_blocks.N._bn2`, `_conv_head`, `_bn1`, `_fc`.
//!
//! Both ports keep TensorFlow's arithmetic: "SAME" padding and batch-norm epsilon
//! 1e-3. Lite0 differs from B0 in three ways chosen for mobile accelerators:
//! ReLU6 instead of swish, no squeeze-and-excitation, and a stem and head that
//! are never rescaled (which at width 1.0, Lite0's, changes nothing).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::{
    layers::{global_average, Activation, ConvBn, ConvSpec, Linear, Padding},
    native,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    B0,
    Lite0,
}

/// One stage of MBConv blocks: TensorFlow's block strings
/// `r{repeats}_k{kernel}_s{stride}_e{expand}_i{in}_o{out}`.
struct Stage {
    repeats: usize,
    kernel: usize,
    stride: usize,
    expand: usize,
    input: usize,
    output: usize,
}

const fn stage(
    repeats: usize,
    kernel: usize,
    stride: usize,
    expand: usize,
    input: usize,
    output: usize,
) -> Stage {
    Stage {
        repeats,
        kernel,
        stride,
        expand,
        input,
        output,
    }
}

/// B0 and Lite0 share the stages (width and depth multipliers 1.0).
const STAGES: [Stage; 7] = [
    stage(1, 3, 1, 1, 32, 16),
    stage(2, 3, 2, 6, 16, 24),
    stage(2, 5, 2, 6, 24, 40),
    stage(3, 3, 2, 6, 40, 80),
    stage(3, 5, 1, 6, 80, 112),
    stage(4, 5, 2, 6, 112, 192),
    stage(1, 3, 1, 6, 192, 320),
];

const STEM_CHANNELS: usize = 32;
const HEAD_CHANNELS: usize = 1280;
const BN_EPS: f64 = 1e-3;
/// Squeeze-and-excitation width as a fraction of the block's input channels.
const SE_RATIO: f64 = 0.25;

struct SqueezeExcitation {
    reduce: Linear,
    expand: Linear,
}

struct MbConv {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    squeeze: Option<SqueezeExcitation>,
    project: ConvBn,
    residual: bool,
    activation: Activation,
}

impl MbConv {
    fn forward(&self, input: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = match &self.expand {
            Some(expand) => expand.forward(input)?,
            None => input.clone(),
        };
        x = self.depthwise.forward(&x)?;
        if let Some(se) = &self.squeeze {
            let squeezed = global_average(&x)?;
            let scale = self
                .activation
                .apply(&se.reduce.forward(&squeezed)?)
                .and_then(|s| se.expand.forward(&s))
                .and_then(|s| candle_nn::ops::sigmoid(&s))?;
            x = x.broadcast_mul(&scale.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        x = self.project.forward(&x)?;
        if self.residual {
            x = (x + input)?;
        }
        Ok(x)
    }
}

pub struct EfficientNet {
    stem: ConvBn,
    blocks: Vec<MbConv>,
    head: ConvBn,
    classifier: Option<Linear>,
}

impl EfficientNet {
    pub fn load(vb: VarBuilder, variant: Variant) -> candle_core::Result<Self> {
        let activation = match variant {
            Variant::B0 => Activation::Swish,
            Variant::Lite0 => Activation::Relu6,
        };
        let conv_bn = |conv: &str, bn: VarBuilder, spec: ConvSpec, activation| {
            ConvBn::load(vb.pp(conv), Some((bn, BN_EPS)), spec, activation)
        };
        let stem = conv_bn(
            "_conv_stem",
            vb.pp("_bn0"),
            ConvSpec::new(3, STEM_CHANNELS, 3, Padding::Same).stride(2),
            activation,
        )?;

        let mut blocks = Vec::new();
        for stage in &STAGES {
            for repeat in 0..stage.repeats {
                let b = vb.pp("_blocks").pp(blocks.len());
                blocks.push(MbConv::load(b, stage, repeat, variant, activation)?);
            }
        }

        let last = STAGES[STAGES.len() - 1].output;
        let head = conv_bn(
            "_conv_head",
            vb.pp("_bn1"),
            ConvSpec::new(last, HEAD_CHANNELS, 1, Padding::Same),
            activation,
        )?;
        // The ImageNet classifier is optional: feature-extraction exports drop it.
        let classifier = Linear::load_optional(vb.pp("_fc"), HEAD_CHANNELS)?;
        Ok(Self {
            stem,
            blocks,
            head,
            classifier,
        })
    }
}

impl MbConv {
    /// Block `repeat` of `stage`: the first changes the width and the
    /// resolution, the rest keep them and add their input back.
    fn load(
        b: VarBuilder,
        stage: &Stage,
        repeat: usize,
        variant: Variant,
        activation: Activation,
    ) -> candle_core::Result<Self> {
        let input = if repeat == 0 {
            stage.input
        } else {
            stage.output
        };
        let stride = if repeat == 0 { stage.stride } else { 1 };
        let hidden = input * stage.expand;
        let expand = (stage.expand != 1)
            .then(|| {
                ConvBn::load(
                    b.pp("_expand_conv"),
                    Some((b.pp("_bn0"), BN_EPS)),
                    ConvSpec::new(input, hidden, 1, Padding::Same),
                    activation,
                )
            })
            .transpose()?;
        let depthwise = ConvBn::load(
            b.pp("_depthwise_conv"),
            Some((b.pp("_bn1"), BN_EPS)),
            ConvSpec::new(hidden, hidden, stage.kernel, Padding::Same)
                .stride(stride)
                .depthwise(),
            activation,
        )?;
        let squeeze = (variant == Variant::B0)
            .then(|| -> candle_core::Result<SqueezeExcitation> {
                let squeezed = ((input as f64 * SE_RATIO) as usize).max(1);
                Ok(SqueezeExcitation {
                    reduce: Linear::load_pointwise(b.pp("_se_reduce"), hidden, squeezed)?,
                    expand: Linear::load_pointwise(b.pp("_se_expand"), squeezed, hidden)?,
                })
            })
            .transpose()?;
        let project = ConvBn::load(
            b.pp("_project_conv"),
            Some((b.pp("_bn2"), BN_EPS)),
            ConvSpec::new(hidden, stage.output, 1, Padding::Same),
            Activation::None,
        )?;
        Ok(Self {
            expand,
            depthwise,
            squeeze,
            project,
            residual: stride == 1 && input == stage.output,
            activation,
        })
    }
}

impl MbConv {
    fn to_native(&self) -> candle_core::Result<native::Block> {
        let mut layers = Vec::new();
        if let Some(expand) = &self.expand {
            layers.push(native::Layer::Conv(native::Conv2d::new(expand.folded()?)));
        }
        layers.push(native::Layer::Depthwise(native::Depthwise::new(
            self.depthwise.folded()?,
        )?));
        if let Some(se) = &self.squeeze {
            layers.push(native::Layer::SqueezeExcitation(
                native::SqueezeExcitation {
                    reduce: se.reduce.to_dense()?,
                    expand: se.expand.to_dense()?,
                    activation: self.activation,
                },
            ));
        }
        layers.push(native::Layer::Conv(native::Conv2d::new(
            self.project.folded()?,
        )));
        Ok(native::Block {
            layers,
            shortcut: if self.residual {
                native::Shortcut::Identity
            } else {
                native::Shortcut::None
            },
        })
    }
}

impl super::ImageNetwork for EfficientNet {
    fn to_native(&self) -> candle_core::Result<native::NativeNetwork> {
        let conv = |layer: &ConvBn| -> candle_core::Result<native::Block> {
            Ok(native::Block::single(native::Layer::Conv(
                native::Conv2d::new(layer.folded()?),
            )))
        };
        let mut blocks = vec![conv(&self.stem)?];
        for block in &self.blocks {
            blocks.push(block.to_native()?);
        }
        blocks.push(conv(&self.head)?);
        Ok(native::NativeNetwork {
            blocks,
            tail: native::Tail::Average,
        })
    }

    fn dimension(&self) -> usize {
        HEAD_CHANNELS
    }

    fn features(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.stem.forward(pixels)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        global_average(&self.head.forward(&x)?)
    }

    fn classifier(&self) -> Option<&Linear> {
        self.classifier.as_ref()
    }
}
