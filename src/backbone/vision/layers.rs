//! Building blocks of the convolutional backbones, for inference only.
//!
//! - Batch norm is folded into the convolution before it when the weights are
//!   loaded (`w * gamma / sqrt(var + eps)`, `beta - mean * gamma / sqrt(var +
//!   eps)`), so a conv + BN + activation is one convolution and one bias add.
//! - TensorFlow's "SAME" padding (more padding after than before when the total is
//!   odd) for weights ported from TensorFlow, next to PyTorch's symmetric padding.
//! - Depthwise convolutions run on a kernel of our own on CPU: candle computes a
//!   grouped convolution as one convolution per group, which for a depthwise
//!   layer of 672 channels means 672 tiny convolutions and a concatenation.

use candle_core::{DType, Device, Storage, Tensor, D};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::nn::{self, Dense};

/// How a convolution pads its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// The same number of zeros on every side (PyTorch's `padding=p`).
    Symmetric(usize),
    /// TensorFlow's "SAME": output size `ceil(input / stride)`, the odd zero after.
    Same,
}

impl Padding {
    /// Zeros before and after, along a spatial dimension of `size`, for a
    /// `kernel`-wide window moving by `stride`.
    pub fn pads(self, size: usize, kernel: usize, stride: usize) -> (usize, usize) {
        match self {
            Padding::Symmetric(p) => (p, p),
            Padding::Same => {
                let out = size.div_ceil(stride);
                let total = ((out - 1) * stride + kernel).saturating_sub(size);
                (total / 2, total - total / 2)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    Relu,
    /// `min(max(x, 0), 6)`: the EfficientNet-Lite activation.
    Relu6,
    /// `x * sigmoid(x)` (SiLU): the EfficientNet activation.
    Swish,
}

impl Activation {
    pub fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::None => Ok(x.clone()),
            Activation::Relu => x.relu(),
            Activation::Relu6 => x.clamp(0f32, 6f32),
            Activation::Swish => x.silu(),
        }
    }

    pub fn apply_scalar(self, x: f32) -> f32 {
        match self {
            Activation::None => x,
            Activation::Relu => nn::relu(x),
            Activation::Relu6 => x.clamp(0.0, 6.0),
            Activation::Swish => x / (1.0 + (-x).exp()),
        }
    }
}

/// The shape of a convolution, as in `torch.nn.Conv2d`.
#[derive(Debug, Clone, Copy)]
pub struct ConvSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub groups: usize,
    pub padding: Padding,
    /// Whether the convolution itself has a bias (usually not when BN follows).
    pub bias: bool,
}

impl ConvSpec {
    pub fn new(in_channels: usize, out_channels: usize, kernel: usize, padding: Padding) -> Self {
        Self {
            in_channels,
            out_channels,
            kernel,
            stride: 1,
            groups: 1,
            padding,
            bias: false,
        }
    }

    pub fn stride(mut self, stride: usize) -> Self {
        self.stride = stride;
        self
    }

    pub fn depthwise(mut self) -> Self {
        self.groups = self.in_channels;
        self
    }

    pub fn with_bias(mut self) -> Self {
        self.bias = true;
        self
    }
}

/// A convolution with its batch norm folded in and its activation.
pub struct ConvBn {
    /// `[out, in / groups, k, k]`
    weight: Tensor,
    /// `[1, out, 1, 1]`, for broadcasting.
    bias: Tensor,
    spec: ConvSpec,
    activation: Activation,
    /// Depthwise layers on CPU: the weights as plain numbers for our kernel.
    depthwise: Option<DepthwiseWeights>,
}

struct DepthwiseWeights {
    /// `[channels, k * k]`
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl ConvBn {
    /// Loads `conv.weight` (and `conv.bias` when the spec says so) and, when
    /// `bn` is given, folds `bn.{weight,bias,running_mean,running_var}` in.
    pub fn load(
        conv: VarBuilder,
        bn: Option<(VarBuilder, f64)>,
        spec: ConvSpec,
        activation: Activation,
    ) -> candle_core::Result<Self> {
        let ConvSpec {
            in_channels,
            out_channels,
            kernel,
            groups,
            ..
        } = spec;
        let device = conv.device().clone();
        let mut weight = conv.get(
            (out_channels, in_channels / groups, kernel, kernel),
            "weight",
        )?;
        let mut bias = if spec.bias {
            conv.get(out_channels, "bias")?
        } else {
            Tensor::zeros(out_channels, DType::F32, &device)?
        };
        if let Some((bn, eps)) = bn {
            let gamma = bn.get(out_channels, "weight")?;
            let beta = bn.get(out_channels, "bias")?;
            let mean = bn.get(out_channels, "running_mean")?;
            let var = bn.get(out_channels, "running_var")?;
            let scale = gamma.broadcast_div(&(var + eps)?.sqrt()?)?;
            weight = weight.broadcast_mul(&scale.reshape((out_channels, 1, 1, 1))?)?;
            bias = ((bias - mean)? * &scale)?.broadcast_add(&beta)?;
        }
        let depthwise = (groups == in_channels && groups == out_channels && device.is_cpu())
            .then(|| -> candle_core::Result<DepthwiseWeights> {
                Ok(DepthwiseWeights {
                    weight: weight.flatten_all()?.to_vec1()?,
                    bias: bias.to_vec1()?,
                })
            })
            .transpose()?;
        Ok(Self {
            weight,
            bias: bias.reshape((1, out_channels, 1, 1))?,
            spec,
            activation,
            depthwise,
        })
    }

    /// Zeros before and after, per spatial dimension of size `size`.
    fn pads(&self, size: usize) -> (usize, usize) {
        self.spec
            .padding
            .pads(size, self.spec.kernel, self.spec.stride)
    }

    /// The folded weights (`[out, in / groups, k, k]`, row-major) and bias as
    /// plain numbers, with the layer's shape and activation: what the native
    /// engine builds its own layers from.
    pub fn folded(&self) -> candle_core::Result<FoldedConv> {
        Ok(FoldedConv {
            weight: self.weight.flatten_all()?.to_vec1()?,
            bias: self.bias.flatten_all()?.to_vec1()?,
            spec: self.spec,
            activation: self.activation,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, height, width) = x.dims4()?;
        let (top, bottom) = self.pads(height);
        let (left, right) = self.pads(width);
        if let Some(weights) = &self.depthwise {
            return depthwise(
                x,
                weights,
                self.spec,
                [top, bottom, left, right],
                self.activation,
            );
        }
        let symmetric = top == bottom && left == right && top == left;
        let (input, padding) = if symmetric {
            (x.clone(), top)
        } else {
            let padded =
                x.pad_with_zeros(D::Minus2, top, bottom)?
                    .pad_with_zeros(D::Minus1, left, right)?;
            (padded, 0)
        };
        let y = input.conv2d(&self.weight, padding, self.spec.stride, 1, self.spec.groups)?;
        self.activation.apply(&y.broadcast_add(&self.bias)?)
    }
}

/// A convolution with batch norm folded in, as plain numbers.
pub struct FoldedConv {
    /// `[out, in / groups, k, k]`, row-major (PyTorch's order).
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub spec: ConvSpec,
    pub activation: Activation,
}

/// A dense layer with PyTorch's `[out, in]` weight.
pub struct Linear {
    weight_t: Tensor,
    bias: Tensor,
}

impl Linear {
    pub fn load(vb: VarBuilder, inputs: usize, outputs: usize) -> candle_core::Result<Self> {
        Self::from_weights(
            vb.get((outputs, inputs), "weight")?,
            vb.get(outputs, "bias")?,
        )
    }

    /// A classifier that exports may leave out: `None` when `vb` has no
    /// `weight`; the number of classes is read from the bias.
    pub fn load_optional(vb: VarBuilder, inputs: usize) -> candle_core::Result<Option<Self>> {
        if !vb.contains_tensor("weight") {
            return Ok(None);
        }
        let classes = vb.get_unchecked("bias")?.dims1()?;
        Self::load(vb, inputs, classes).map(Some)
    }

    /// A 1x1 convolution with bias over a pooled `[batch, in]` input is a dense
    /// layer; its weight is `[out, in, 1, 1]`.
    pub fn load_pointwise(
        vb: VarBuilder,
        inputs: usize,
        outputs: usize,
    ) -> candle_core::Result<Self> {
        Self::from_weights(
            vb.get((outputs, inputs, 1, 1), "weight")?
                .reshape((outputs, inputs))?,
            vb.get(outputs, "bias")?,
        )
    }

    fn from_weights(weight: Tensor, bias: Tensor) -> candle_core::Result<Self> {
        Ok(Self {
            weight_t: weight.t()?.contiguous()?,
            bias,
        })
    }

    /// `[batch, in]` to `[batch, out]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.weight_t)?.broadcast_add(&self.bias)
    }

    /// The weights as plain numbers (`[out, in]` row-major) and the bias.
    pub fn to_dense(&self) -> candle_core::Result<Dense> {
        let (inputs, outputs) = self.weight_t.dims2()?;
        Ok(Dense {
            weight: self.weight_t.t()?.flatten_all()?.to_vec1()?,
            bias: self.bias.to_vec1()?,
            inputs,
            outputs,
        })
    }
}

/// Global average pooling: `[batch, channels, h, w]` to `[batch, channels]`.
pub fn global_average(x: &Tensor) -> candle_core::Result<Tensor> {
    x.mean(D::Minus1)?.mean(D::Minus1)
}

/// Sizes of one plane of a depthwise convolution: kernel, stride, the zeros
/// before the first row and column, the input and the output.
struct PlaneGeometry {
    kernel: usize,
    stride: usize,
    top: usize,
    left: usize,
    height: usize,
    width: usize,
    out_h: usize,
    out_w: usize,
}

/// Adds one channel's filter, applied to its input plane `src`, to `out`.
fn depthwise_plane(src: &[f32], filter: &[f32], out: &mut [f32], g: &PlaneGeometry) {
    let PlaneGeometry {
        kernel,
        stride,
        top,
        left,
        height,
        width,
        out_h,
        out_w,
    } = *g;
    for oy in 0..out_h {
        let out_row = &mut out[oy * out_w..(oy + 1) * out_w];
        for ky in 0..kernel {
            // Input row for this output row and kernel row, if inside.
            let Some(iy) = (oy * stride + ky).checked_sub(top) else {
                continue;
            };
            if iy >= height {
                continue;
            }
            let row = &src[iy * width..(iy + 1) * width];
            for kx in 0..kernel {
                let w = filter[ky * kernel + kx];
                // Output columns whose input column `ox * stride + kx - left`
                // lies inside the row.
                let first = left.saturating_sub(kx).div_ceil(stride);
                let end = ((width + left).saturating_sub(kx))
                    .div_ceil(stride)
                    .min(out_w);
                if stride == 1 {
                    let start = first + kx - left;
                    for (o, i) in out_row[first..end]
                        .iter_mut()
                        .zip(&row[start..start + (end - first)])
                    {
                        *o += w * i;
                    }
                } else {
                    for (ox, o) in out_row.iter_mut().enumerate().take(end).skip(first) {
                        *o += w * row[ox * stride + kx - left];
                    }
                }
            }
        }
    }
}

/// A depthwise convolution (one k x k filter per channel) with the bias added and
/// the activation applied, on CPU, one thread per (image, channel) plane.
fn depthwise(
    x: &Tensor,
    weights: &DepthwiseWeights,
    spec: ConvSpec,
    [top, bottom, left, right]: [usize; 4],
    activation: Activation,
) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let (batch, channels, height, width) = x.dims4()?;
    let ConvSpec { kernel, stride, .. } = spec;
    if channels != weights.bias.len() {
        candle_core::bail!(
            "depthwise convolution over {channels} channels has {} filters",
            weights.bias.len()
        );
    }
    let padded_h = height + top + bottom;
    let padded_w = width + left + right;
    if padded_h < kernel || padded_w < kernel {
        candle_core::bail!("input {height}x{width} is smaller than the {kernel}x{kernel} kernel");
    }
    let out_h = (padded_h - kernel) / stride + 1;
    let out_w = (padded_w - kernel) / stride + 1;

    let (storage, layout) = x.storage_and_layout();
    let input = match &*storage {
        Storage::Cpu(cpu) => &cpu.as_slice::<f32>()?[layout.start_offset()..],
        _ => candle_core::bail!("the depthwise kernel runs on CPU tensors only"),
    };
    let plane_in = height * width;
    let plane_out = out_h * out_w;
    let geometry = PlaneGeometry {
        kernel,
        stride,
        top,
        left,
        height,
        width,
        out_h,
        out_w,
    };
    let mut output = vec![0f32; batch * channels * plane_out];
    crate::backbone::on_thread_pool(|| {
        output
            .par_chunks_mut(plane_out)
            .enumerate()
            .for_each(|(plane, out)| {
                let channel = plane % channels;
                let src = &input[plane * plane_in..(plane + 1) * plane_in];
                let filter = &weights.weight[channel * kernel * kernel..][..kernel * kernel];
                out.fill(weights.bias[channel]);
                depthwise_plane(src, filter, out, &geometry);
                if activation != Activation::None {
                    out.iter_mut()
                        .for_each(|v| *v = activation.apply_scalar(*v));
                }
            });
    });
    drop(storage);
    Tensor::from_vec(output, (batch, channels, out_h, out_w), &Device::Cpu)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Values in [-0.5, 0.5), varied, the same for the same seed.
    pub(crate) fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    fn vars(tensors: HashMap<String, Tensor>) -> VarBuilder<'static> {
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// The depthwise kernel against candle's grouped convolution (one conv per
    /// channel), on explicitly padded inputs, for every stride / kernel /
    /// odd-padding combination EfficientNet uses.
    #[test]
    fn depthwise_kernel_matches_grouped_convolution() {
        let channels = 5;
        for (kernel, stride, size) in [(3, 1, 9), (3, 2, 10), (5, 1, 8), (5, 2, 11), (3, 2, 7)] {
            for padding in [Padding::Same, Padding::Symmetric(kernel / 2)] {
                let spec = ConvSpec::new(channels, channels, kernel, padding)
                    .stride(stride)
                    .depthwise()
                    .with_bias();
                let weight = Tensor::from_vec(
                    pseudo_random(channels * kernel * kernel, 1),
                    (channels, 1, kernel, kernel),
                    &Device::Cpu,
                )
                .unwrap();
                let bias =
                    Tensor::from_vec(pseudo_random(channels, 2), channels, &Device::Cpu).unwrap();
                let conv = ConvBn::load(
                    vars(HashMap::from([
                        ("weight".to_owned(), weight.clone()),
                        ("bias".to_owned(), bias.clone()),
                    ])),
                    None,
                    spec,
                    Activation::Relu6,
                )
                .unwrap();
                assert!(conv.depthwise.is_some());
                let x = Tensor::from_vec(
                    pseudo_random(2 * channels * size * size, 3)
                        .into_iter()
                        .map(|v| v * 8.0)
                        .collect(),
                    (2, channels, size, size),
                    &Device::Cpu,
                )
                .unwrap();
                let ours = conv.forward(&x).unwrap();

                let (before, after) = conv.pads(size);
                let expected = x
                    .pad_with_zeros(2, before, after)
                    .unwrap()
                    .pad_with_zeros(3, before, after)
                    .unwrap()
                    .conv2d(&weight, 0, stride, 1, channels)
                    .unwrap()
                    .broadcast_add(&bias.reshape((1, channels, 1, 1)).unwrap())
                    .unwrap()
                    .clamp(0f32, 6f32)
                    .unwrap();
                assert_eq!(
                    ours.dims(),
                    expected.dims(),
                    "k{kernel} s{stride} {padding:?}"
                );
                let diff = max_abs_diff(&ours, &expected);
                assert!(diff < 1e-5, "k{kernel} s{stride} {padding:?}: {diff}");
            }
        }
    }

    #[test]
    fn same_padding_puts_the_odd_zero_after() {
        let conv = |kernel, stride| ConvBn {
            weight: Tensor::zeros((1, 1, kernel, kernel), DType::F32, &Device::Cpu).unwrap(),
            bias: Tensor::zeros((1, 1, 1, 1), DType::F32, &Device::Cpu).unwrap(),
            spec: ConvSpec::new(1, 1, kernel, Padding::Same).stride(stride),
            activation: Activation::None,
            depthwise: None,
        };
        // As TensorFlow: 224 -> 112 with a 3x3 stride 2 needs one zero, after.
        assert_eq!(conv(3, 2).pads(224), (0, 1));
        assert_eq!(conv(3, 1).pads(224), (1, 1));
        assert_eq!(conv(5, 2).pads(28), (1, 2));
        assert_eq!(conv(5, 1).pads(14), (2, 2));
        assert_eq!(conv(1, 1).pads(7), (0, 0));
    }

    /// Folding batch norm into the convolution equals applying it after.
    #[test]
    fn folded_batch_norm_equals_batch_norm_after_the_convolution() {
        let (cin, cout, k) = (3, 4, 3);
        let weight = Tensor::from_vec(
            pseudo_random(cout * cin * k * k, 4),
            (cout, cin, k, k),
            &Device::Cpu,
        )
        .unwrap();
        let vector = |seed, shift: f32| {
            Tensor::from_vec(
                pseudo_random(cout, seed)
                    .into_iter()
                    .map(|v| v + shift)
                    .collect(),
                cout,
                &Device::Cpu,
            )
            .unwrap()
        };
        let (gamma, beta, mean, var) = (
            vector(5, 1.0),
            vector(6, 0.0),
            vector(7, 0.0),
            vector(8, 1.0),
        );
        let conv = ConvBn::load(
            vars(HashMap::from([("weight".to_owned(), weight.clone())])),
            Some((
                vars(HashMap::from([
                    ("weight".to_owned(), gamma.clone()),
                    ("bias".to_owned(), beta.clone()),
                    ("running_mean".to_owned(), mean.clone()),
                    ("running_var".to_owned(), var.clone()),
                ])),
                1e-3,
            )),
            ConvSpec::new(cin, cout, k, Padding::Symmetric(1)),
            Activation::None,
        )
        .unwrap();
        let x = Tensor::from_vec(
            pseudo_random(2 * cin * 6 * 6, 9),
            (2, cin, 6, 6),
            &Device::Cpu,
        )
        .unwrap();
        let shape = (1, cout, 1, 1);
        let expected = x
            .conv2d(&weight, 1, 1, 1, 1)
            .unwrap()
            .broadcast_sub(&mean.reshape(shape).unwrap())
            .unwrap()
            .broadcast_div(
                &(var + 1e-3)
                    .unwrap()
                    .sqrt()
                    .unwrap()
                    .reshape(shape)
                    .unwrap(),
            )
            .unwrap()
            .broadcast_mul(&gamma.reshape(shape).unwrap())
            .unwrap()
            .broadcast_add(&beta.reshape(shape).unwrap())
            .unwrap();
        let diff = max_abs_diff(&conv.forward(&x).unwrap(), &expected);
        assert!(diff < 1e-5, "{diff}");
    }
}
