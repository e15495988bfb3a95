//! Each kernel against candle's channels-first operations on the same
//! numbers, for every shape the served networks use (kernels 1, 3, 5 and 7,
//! strides 1 and 2, both paddings), on maps that need the columns split and
//! on maps that do not.

use candle_core::{Device, Tensor};

use super::{map::FeatureMap, pool, Conv2d, Depthwise};
use crate::backbone::vision::layers::{
    tests::pseudo_random, Activation, ConvSpec, FoldedConv, Padding,
};

/// `[batch, channels, h, w]` random values, as a tensor and as a map.
fn input(batch: usize, channels: usize, side: usize, seed: u64) -> (Tensor, FeatureMap) {
    let values: Vec<f32> = pseudo_random(batch * channels * side * side, seed)
        .into_iter()
        .map(|v| v * 4.0)
        .collect();
    let map = FeatureMap::from_nchw(&values, batch, channels, side, side);
    let tensor = Tensor::from_vec(values, (batch, channels, side, side), &Device::Cpu).unwrap();
    (tensor, map)
}

/// The map in channels-first order.
fn to_nchw(map: &FeatureMap) -> Vec<f32> {
    let plane = map.height * map.width;
    let mut out = vec![0f32; map.values.len()];
    for image in 0..map.batch {
        for pixel in 0..plane {
            for channel in 0..map.channels {
                out[(image * map.channels + channel) * plane + pixel] =
                    map.values[(image * plane + pixel) * map.channels + channel];
            }
        }
    }
    out
}

/// What candle computes: explicit zero padding, a (grouped) convolution, the
/// bias, an optional residual, the activation.
fn reference(x: &Tensor, folded: &FoldedConv, residual: Option<&Tensor>) -> (Vec<usize>, Vec<f32>) {
    let spec = folded.spec;
    let (_, _, height, width) = x.dims4().unwrap();
    let (top, bottom) = spec.padding.pads(height, spec.kernel, spec.stride);
    let (left, right) = spec.padding.pads(width, spec.kernel, spec.stride);
    let weight = Tensor::from_vec(
        folded.weight.clone(),
        (
            spec.out_channels,
            spec.in_channels / spec.groups,
            spec.kernel,
            spec.kernel,
        ),
        &Device::Cpu,
    )
    .unwrap();
    let bias = Tensor::from_vec(
        folded.bias.clone(),
        (1, spec.out_channels, 1, 1),
        &Device::Cpu,
    )
    .unwrap();
    let mut y = x
        .pad_with_zeros(2, top, bottom)
        .unwrap()
        .pad_with_zeros(3, left, right)
        .unwrap()
        .conv2d(&weight, 0, spec.stride, 1, spec.groups)
        .unwrap()
        .broadcast_add(&bias)
        .unwrap();
    if let Some(residual) = residual {
        y = (y + residual).unwrap();
    }
    let y = folded.activation.apply(&y).unwrap();
    (
        y.dims().to_vec(),
        y.flatten_all().unwrap().to_vec1().unwrap(),
    )
}

fn folded(spec: ConvSpec, activation: Activation, seed: u64) -> FoldedConv {
    let fan_in = spec.in_channels / spec.groups * spec.kernel * spec.kernel;
    FoldedConv {
        weight: pseudo_random(spec.out_channels * fan_in, seed)
            .into_iter()
            .map(|v| v * (6.0 / fan_in as f32).sqrt())
            .collect(),
        bias: pseudo_random(spec.out_channels, seed + 1),
        spec,
        activation,
    }
}

/// Largest difference, against a tolerance relative to the values' scale
/// (the same products summed in another order).
fn assert_close(ours: &FeatureMap, dims: &[usize], expected: &[f32], what: &str) {
    assert_eq!(
        [ours.batch, ours.channels, ours.height, ours.width].as_slice(),
        dims,
        "{what}: shape"
    );
    let ours = to_nchw(ours);
    let scale = expected.iter().map(|v| v.abs()).fold(1e-3f32, f32::max);
    let diff = ours
        .iter()
        .zip(expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        diff <= 2e-6 * scale * 8.0,
        "{what}: differs by {diff} (scale {scale})"
    );
}

#[test]
fn convolutions_match_candle() {
    // (in, out, kernel, stride, padding, batch, side): the stem shapes, 1x1
    // with and without stride, 3x3 of both paddings, a map small enough
    // that columns are split, and odd channel counts.
    let cases = [
        (3, 32, 3, 2, Padding::Same, 2, 17),
        (3, 64, 7, 2, Padding::Symmetric(3), 1, 20),
        (24, 144, 1, 1, Padding::Same, 2, 9),
        (64, 256, 1, 2, Padding::Symmetric(0), 1, 8),
        (32, 48, 3, 1, Padding::Symmetric(1), 2, 10),
        (16, 40, 3, 2, Padding::Same, 1, 11),
        (72, 512, 3, 1, Padding::Symmetric(1), 1, 3),
        (5, 7, 3, 1, Padding::Symmetric(1), 3, 4),
    ];
    for (seed, (cin, cout, kernel, stride, padding, batch, side)) in cases.into_iter().enumerate() {
        for activation in [Activation::None, Activation::Relu6] {
            let spec = ConvSpec::new(cin, cout, kernel, padding).stride(stride);
            let layer = folded(spec, activation, seed as u64);
            let (tensor, map) = input(batch, cin, side, 100 + seed as u64);
            let (dims, expected) = reference(&tensor, &layer, None);
            let ours = Conv2d::new(layer).forward(&map, None).unwrap();
            assert_close(&ours, &dims, &expected, &format!("{spec:?} {activation:?}"));
        }
    }
}

#[test]
fn a_residual_is_added_before_the_activation() {
    let spec = ConvSpec::new(64, 256, 1, Padding::Symmetric(0));
    let layer = folded(spec, Activation::Relu, 7);
    let (tensor, map) = input(2, 64, 6, 8);
    let (residual_tensor, residual) = input(2, 256, 6, 9);
    let (dims, expected) = reference(&tensor, &layer, Some(&residual_tensor));
    let ours = Conv2d::new(layer).forward(&map, Some(&residual)).unwrap();
    assert_close(&ours, &dims, &expected, "residual");
    // A residual of another shape is refused, not read out of bounds.
    let (_, wrong) = input(2, 256, 5, 9);
    let layer = folded(spec, Activation::Relu, 7);
    assert!(Conv2d::new(layer).forward(&map, Some(&wrong)).is_err());
}

#[test]
fn depthwise_convolutions_match_candle() {
    // EfficientNet's shapes: 3x3 and 5x5, strides 1 and 2, TensorFlow's
    // padding; channel counts below, at and above the 64-channel chunk.
    for (seed, (channels, kernel, stride, side)) in [
        (32, 3, 1, 9),
        (144, 3, 2, 10),
        (240, 5, 1, 7),
        (40, 5, 2, 11),
        (96, 3, 2, 8),
    ]
    .into_iter()
    .enumerate()
    {
        for padding in [Padding::Same, Padding::Symmetric(kernel / 2)] {
            let spec = ConvSpec::new(channels, channels, kernel, padding)
                .stride(stride)
                .depthwise();
            let layer = folded(spec, Activation::Relu6, 20 + seed as u64);
            let (tensor, map) = input(2, channels, side, 30 + seed as u64);
            let (dims, expected) = reference(&tensor, &layer, None);
            let ours = Depthwise::new(layer).unwrap().forward(&map).unwrap();
            assert_close(&ours, &dims, &expected, &format!("{spec:?}"));
        }
    }
}

#[test]
fn pooling_matches_candle() {
    let (tensor, map) = input(2, 20, 12, 40);
    // ResNet's 3x3 stride 2 with padding 1: edge copies never win a maximum.
    let expected = tensor
        .pad_with_same(3, 1, 1)
        .unwrap()
        .pad_with_same(2, 1, 1)
        .unwrap()
        .max_pool2d_with_stride(3, 2)
        .unwrap();
    let ours = pool::max_pool(&map, 3, 2, 1).unwrap();
    let values: Vec<f32> = expected.flatten_all().unwrap().to_vec1().unwrap();
    assert_close(&ours, expected.dims(), &values, "max pool 3x3/2");
    // VGG's 2x2 stride 2.
    let expected = tensor.max_pool2d(2).unwrap();
    let ours = pool::max_pool(&map, 2, 2, 0).unwrap();
    let values: Vec<f32> = expected.flatten_all().unwrap().to_vec1().unwrap();
    assert_close(&ours, expected.dims(), &values, "max pool 2x2/2");

    let expected: Vec<f32> = tensor
        .mean((2, 3))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let ours = pool::global_average(&map);
    for (a, b) in ours.iter().zip(&expected) {
        assert!((a - b).abs() < 1e-5, "global average {a} vs {b}");
    }
}

#[test]
fn bad_shapes_are_errors() {
    let spec = ConvSpec::new(8, 8, 3, Padding::Symmetric(0));
    let (_, map) = input(1, 4, 6, 1);
    assert!(Conv2d::new(folded(spec, Activation::None, 1))
        .forward(&map, None)
        .is_err());
    let (_, tiny) = input(1, 8, 2, 1);
    assert!(Conv2d::new(folded(spec, Activation::None, 1))
        .forward(&tiny, None)
        .is_err());
    let depthwise = ConvSpec::new(8, 8, 3, Padding::Same).depthwise();
    assert!(Depthwise::new(folded(depthwise, Activation::None, 1))
        .unwrap()
        .forward(&map)
        .is_err());
}
