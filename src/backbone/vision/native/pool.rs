//! Pooling on channels-last maps: max over a window, the global average.

use rayon::prelude::*;

use super::map::{FeatureMap, Window};
use crate::backbone::vision::layers::Padding;

/// The largest value in each `kernel` x `kernel` window, PyTorch's
/// `MaxPool2d(kernel, stride, padding)`: padding never wins (as if it were
/// minus infinity), and windows that would start past the end are dropped.
pub fn max_pool(
    x: &FeatureMap,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> candle_core::Result<FeatureMap> {
    let window = Window::new(
        kernel,
        stride,
        Padding::Symmetric(padding),
        x.height,
        x.width,
    )?;
    let mut out = FeatureMap::with_shape(x.batch, window.out_height, window.out_width, x.channels);
    out.values
        .par_chunks_mut(window.out_width * x.channels)
        .enumerate()
        .for_each(|(index, row)| {
            let (image, oy) = (index / window.out_height, index % window.out_height);
            for (ox, out) in row.chunks_exact_mut(x.channels).enumerate() {
                out.fill(f32::NEG_INFINITY);
                for ky in 0..kernel {
                    let Some(iy) = window.source_row(oy, ky) else {
                        continue;
                    };
                    for kx in 0..kernel {
                        if let Some(ix) = window.source_column(ox, kx) {
                            for (o, v) in out.iter_mut().zip(x.pixel(image, iy, ix)) {
                                *o = o.max(*v);
                            }
                        }
                    }
                }
            }
        });
    Ok(out)
}

/// `[batch][channels]`: each channel's mean over its image's pixels.
pub fn global_average(x: &FeatureMap) -> Vec<f32> {
    let pixels = x.height * x.width;
    let mut out = vec![0f32; x.batch * x.channels];
    for (image, out) in out.chunks_exact_mut(x.channels).enumerate() {
        let values = &x.values[image * pixels * x.channels..][..pixels * x.channels];
        for pixel in values.chunks_exact(x.channels) {
            out.iter_mut().zip(pixel).for_each(|(o, v)| *o += v);
        }
        let scale = 1.0 / pixels as f32;
        out.iter_mut().for_each(|o| *o *= scale);
    }
    out
}
