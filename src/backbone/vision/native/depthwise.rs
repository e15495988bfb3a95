//! Depthwise convolutions (one k x k filter per channel) on channels-last
//! maps.
//!
//! For each output pixel and each run of 64 channels, the sums of all k x k
//! taps stay in registers (four 16-wide vectors with AVX-512) from the bias to
//! the activation: each tap costs two loads per multiply-add, the input
//! pixel's channels and the tap's weights, both contiguous. Rows of output
//! pixels are split among threads.

use rayon::prelude::*;

use super::map::{activate_plain, FeatureMap, Window};
use crate::backbone::vision::layers::{Activation, FoldedConv, Padding};

/// Channels whose sums one pass over the taps keeps in registers.
const CHUNK: usize = 64;
/// The largest kernel of the networks served (EfficientNet's 5x5).
const MAX_TAPS: usize = 49;

pub struct Depthwise {
    /// `[ky][kx][channel]`: the weights of one tap are contiguous.
    weight: Vec<f32>,
    bias: Vec<f32>,
    channels: usize,
    kernel: usize,
    stride: usize,
    padding: Padding,
    activation: Activation,
}

/// One output row's share of the work.
struct Row<'a> {
    layer: &'a Depthwise,
    x: &'a FeatureMap,
    window: &'a Window,
    image: usize,
    y: usize,
}

impl Depthwise {
    /// From PyTorch's `[channels, 1, k, k]` weights (batch norm folded).
    pub fn new(folded: FoldedConv) -> candle_core::Result<Self> {
        let spec = folded.spec;
        let taps = spec.kernel * spec.kernel;
        if taps > MAX_TAPS
            || spec.groups != spec.in_channels
            || spec.in_channels != spec.out_channels
        {
            candle_core::bail!("not a depthwise convolution of at most 7x7: {spec:?}");
        }
        let channels = spec.out_channels;
        let mut weight = vec![0f32; taps * channels];
        for channel in 0..channels {
            for tap in 0..taps {
                weight[tap * channels + channel] = folded.weight[channel * taps + tap];
            }
        }
        Ok(Self {
            weight,
            bias: folded.bias,
            channels,
            kernel: spec.kernel,
            stride: spec.stride,
            padding: spec.padding,
            activation: folded.activation,
        })
    }

    pub fn forward(&self, x: &FeatureMap) -> candle_core::Result<FeatureMap> {
        if x.channels != self.channels {
            candle_core::bail!(
                "depthwise convolution over {} channels got {}",
                self.channels,
                x.channels
            );
        }
        let window = Window::new(self.kernel, self.stride, self.padding, x.height, x.width)?;
        let mut out =
            FeatureMap::with_shape(x.batch, window.out_height, window.out_width, self.channels);
        let row_length = window.out_width * self.channels;
        out.values
            .par_chunks_mut(row_length)
            .enumerate()
            .for_each(|(index, out)| {
                let row = Row {
                    layer: self,
                    x,
                    window: &window,
                    image: index / window.out_height,
                    y: index % window.out_height,
                };
                row.compute(out);
            });
        Ok(out)
    }
}

impl Row<'_> {
    fn compute(&self, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { self.compute_avx512(out) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            unsafe { self.compute_avx2(out) };
            return;
        }
        self.compute_plain(out);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn compute_avx512(&self, out: &mut [f32]) {
        self.compute_plain(out);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn compute_avx2(&self, out: &mut [f32]) {
        self.compute_plain(out);
    }

    /// Written so that the compiler keeps a chunk's sums in registers and
    /// vectorizes over channels (with the features of the caller).
    #[inline(always)]
    fn compute_plain(&self, out: &mut [f32]) {
        let layer = self.layer;
        let channels = layer.channels;
        let mut taps = [(0usize, 0usize); MAX_TAPS];
        for (ox, out) in out.chunks_exact_mut(channels).enumerate() {
            // The taps inside the input: (input offset, weight offset).
            let mut count = 0;
            for ky in 0..layer.kernel {
                let Some(iy) = self.window.source_row(self.y, ky) else {
                    continue;
                };
                for kx in 0..layer.kernel {
                    if let Some(ix) = self.window.source_column(ox, kx) {
                        let input =
                            ((self.image * self.x.height + iy) * self.x.width + ix) * channels;
                        taps[count] = (input, (ky * layer.kernel + kx) * channels);
                        count += 1;
                    }
                }
            }
            let taps = &taps[..count];
            let mut chunks = out.chunks_exact_mut(CHUNK);
            for (index, out) in chunks.by_ref().enumerate() {
                let first = index * CHUNK;
                let mut sums = [0f32; CHUNK];
                sums.copy_from_slice(&layer.bias[first..first + CHUNK]);
                for &(input, weight) in taps {
                    let x = &self.x.values[input + first..][..CHUNK];
                    let w = &layer.weight[weight + first..][..CHUNK];
                    for ((s, x), w) in sums.iter_mut().zip(x).zip(w) {
                        *s += x * w;
                    }
                }
                out.copy_from_slice(&sums);
            }
            let rest = chunks.into_remainder();
            let first = channels - rest.len();
            rest.copy_from_slice(&layer.bias[first..]);
            for &(input, weight) in taps {
                let x = &self.x.values[input + first..input + channels];
                let w = &layer.weight[weight + first..weight + channels];
                for ((s, x), w) in rest.iter_mut().zip(x).zip(w) {
                    *s += x * w;
                }
            }
            activate_plain(layer.activation, out);
        }
    }
}
