//! Feature maps in channels-last order and the geometry of a sliding window.

use crate::backbone::vision::layers::{Activation, Padding};

/// A batch of feature maps, channels last: `[batch][height][width][channels]`.
/// In this order the channels of one pixel are contiguous, so a 1x1
/// convolution is a matrix product over the pixels as rows, and a k x k one
/// over rows gathered from k x k pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureMap {
    pub values: Vec<f32>,
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
}

impl FeatureMap {
    /// A map of the given shape whose values are unspecified (a recycled
    /// buffer's, or zeros): for layers that write every value.
    pub fn with_shape(batch: usize, height: usize, width: usize, channels: usize) -> Self {
        Self {
            values: spare::take(batch * height * width * channels),
            batch,
            height,
            width,
            channels,
        }
    }

    /// Converts PyTorch's `[batch][channels][height][width]` order.
    pub fn from_nchw(
        values: &[f32],
        batch: usize,
        channels: usize,
        height: usize,
        width: usize,
    ) -> Self {
        let mut map = Self::with_shape(batch, height, width, channels);
        let plane = height * width;
        for (image, out) in map.values.chunks_exact_mut(plane * channels).enumerate() {
            let planes = &values[image * plane * channels..][..plane * channels];
            for (pixel, out) in out.chunks_exact_mut(channels).enumerate() {
                for (channel, value) in out.iter_mut().enumerate() {
                    *value = planes[channel * plane + pixel];
                }
            }
        }
        map
    }

    /// Pixels of the whole batch: the rows of a convolution's product.
    pub fn pixels(&self) -> usize {
        self.batch * self.height * self.width
    }

    /// Whether two maps have the same shape.
    pub fn same_shape(&self, other: &FeatureMap) -> bool {
        (self.batch, self.height, self.width, self.channels)
            == (other.batch, other.height, other.width, other.channels)
    }

    /// The channels of pixel (`image`, `y`, `x`).
    #[inline]
    pub fn pixel(&self, image: usize, y: usize, x: usize) -> &[f32] {
        let at = ((image * self.height + y) * self.width + x) * self.channels;
        &self.values[at..at + self.channels]
    }
}

impl Drop for FeatureMap {
    fn drop(&mut self) {
        spare::recycle(std::mem::take(&mut self.values));
    }
}

/// Buffers of maps that are no longer needed, for the next maps to reuse:
/// large maps (a batch of 32 at 112x112x32 is 51 MB) would otherwise come
/// from the OS as fresh pages in every pass, and page faults and zeroing took
/// 16-28% of batch-32 passes (docs/PERFORMANCE.md). Shared by every network
/// and worker of the process, and bounded.
mod spare {
    use std::sync::Mutex;

    /// Values of the smallest buffer kept: smaller ones come cheaply from the
    /// allocator's own free lists.
    const MIN_VALUES: usize = 1 << 16;
    /// Buffers kept at most, and their total size.
    const MAX_BUFFERS: usize = 8;
    const MAX_BYTES: usize = 512 << 20;

    static SPARE: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

    /// A buffer of `len` values, recycled (best fit) when one is big enough.
    pub fn take(len: usize) -> Vec<f32> {
        if len >= MIN_VALUES {
            let mut spare = crate::sync::lock(&SPARE);
            let best = spare
                .iter()
                .enumerate()
                .filter(|(_, buffer)| buffer.capacity() >= len)
                .min_by_key(|(_, buffer)| buffer.capacity())
                .map(|(index, _)| index);
            if let Some(index) = best {
                let mut buffer = spare.swap_remove(index);
                drop(spare);
                // Within the capacity: no new pages, and zeros only for values
                // past the buffer's previous length.
                buffer.resize(len, 0.0);
                return buffer;
            }
        }
        vec![0.0; len]
    }

    pub fn recycle(buffer: Vec<f32>) {
        if buffer.capacity() < MIN_VALUES || buffer.capacity() * 4 > MAX_BYTES {
            return;
        }
        let mut spare = crate::sync::lock(&SPARE);
        spare.push(buffer);
        // Over the bounds, the smallest buffers go first.
        while spare.len() > MAX_BUFFERS
            || spare.iter().map(|b| b.capacity() * 4).sum::<usize>() > MAX_BYTES
        {
            let smallest = spare
                .iter()
                .enumerate()
                .min_by_key(|(_, buffer)| buffer.capacity())
                .map(|(index, _)| index);
            match smallest {
                Some(index) => drop(spare.swap_remove(index)),
                None => break,
            }
        }
    }
}

/// Where a `kernel` x `kernel` window moving by `stride` reads its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub kernel: usize,
    pub stride: usize,
    /// Zeros before the first input row and column.
    pub top: usize,
    pub left: usize,
    pub in_height: usize,
    pub in_width: usize,
    pub out_height: usize,
    pub out_width: usize,
}

impl Window {
    pub fn new(
        kernel: usize,
        stride: usize,
        padding: Padding,
        in_height: usize,
        in_width: usize,
    ) -> candle_core::Result<Self> {
        let (top, bottom) = padding.pads(in_height, kernel, stride);
        let (left, right) = padding.pads(in_width, kernel, stride);
        let padded_height = in_height + top + bottom;
        let padded_width = in_width + left + right;
        if padded_height < kernel || padded_width < kernel || stride == 0 {
            candle_core::bail!(
                "input {in_height}x{in_width} is smaller than the {kernel}x{kernel} window"
            );
        }
        Ok(Self {
            kernel,
            stride,
            top,
            left,
            in_height,
            in_width,
            out_height: (padded_height - kernel) / stride + 1,
            out_width: (padded_width - kernel) / stride + 1,
        })
    }

    /// The input row that output row `out` reads for kernel row `k`, if it
    /// is not padding.
    #[inline]
    pub fn source_row(&self, out: usize, k: usize) -> Option<usize> {
        (out * self.stride + k)
            .checked_sub(self.top)
            .filter(|&row| row < self.in_height)
    }

    /// As [`Self::source_row`], for columns.
    #[inline]
    pub fn source_column(&self, out: usize, k: usize) -> Option<usize> {
        (out * self.stride + k)
            .checked_sub(self.left)
            .filter(|&column| column < self.in_width)
    }
}

/// Applies `activation` to every value, vectorized where the CPU allows (the
/// default x86-64 target assumes only SSE2, so the compiler needs the hint).
pub fn activate(activation: Activation, values: &mut [f32]) {
    if activation == Activation::None {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports the features the function is compiled for.
        unsafe { activate_avx512(activation, values) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: as above.
        unsafe { activate_avx2(activation, values) };
        return;
    }
    activate_plain(activation, values);
}

#[inline(always)]
pub(super) fn activate_plain(activation: Activation, values: &mut [f32]) {
    match activation {
        Activation::None => {}
        Activation::Relu => values.iter_mut().for_each(|v| *v = v.max(0.0)),
        Activation::Relu6 => values.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0)),
        Activation::Swish => values
            .iter_mut()
            .for_each(|v| *v = Activation::Swish.apply_scalar(*v)),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn activate_avx512(activation: Activation, values: &mut [f32]) {
    activate_plain(activation, values);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn activate_avx2(activation: Activation, values: &mut [f32]) {
    activate_plain(activation, values);
}
