//! Dense (not grouped) convolutions on channels-last maps as matrix products
//! on the packed f32 kernels of [`crate::nn::packed`].
//!
//! The rows of the product are output pixels. A 1x1 convolution with stride 1
//! multiplies the input map itself; any other gathers, for a block of output
//! pixels at a time, the k x k input pixels each one reads into a row
//! (`[ky][kx][in]`, im2col) in a buffer that stays in cache while the
//! product consumes it. The bias comes out of the product; adding a residual
//! and the activation follow on the same block while it is still in cache.
//!
//! Work is split into tasks of up to 64 rows; when that gives too few tasks
//! to keep every thread busy (small maps: late layers, batch 1), the output
//! columns are split too.

use std::ops::Range;

use rayon::prelude::*;

use super::map::{activate, FeatureMap, Window};
use crate::{
    backbone::vision::layers::{Activation, FoldedConv, Padding},
    nn::{
        packed::{F32Kernel, PackedDense},
        shared_out::SharedOut,
        Dense,
    },
};

/// Rows (output pixels) of one task at most: their gathered inputs stay in
/// the core's cache while every weight panel passes over them.
const MAX_ROWS_PER_TASK: usize = 64;
/// Rows per kernel call of the packed kernels; tasks are whole multiples.
const ROW_MULTIPLE: usize = 4;
/// Panels (16 columns each) per task at least when the columns are split.
const MIN_PANELS_PER_TASK: usize = 4;

/// The product of gathered rows and the weights.
enum Product {
    /// The packed kernels (CPUs with AVX2 + FMA or AVX-512).
    Packed(PackedDense),
    /// The `gemm` crate, elsewhere.
    Plain(Dense),
}

impl Product {
    fn panels(&self) -> usize {
        match self {
            Product::Packed(packed) => packed.panels(),
            // The plain path computes every column at once: one group.
            Product::Plain(_) => 1,
        }
    }

    /// Columns of `panels` for the rows of `x`, into `out` (`outputs` apart).
    ///
    /// # Safety
    /// As [`PackedDense::forward_panels`].
    unsafe fn compute(&self, x: &[f32], out: *mut f32, panels: Range<usize>) {
        match self {
            // SAFETY: the caller's contract, passed on.
            Product::Packed(packed) => unsafe { packed.forward_panels(x, out, panels) },
            Product::Plain(dense) => {
                let result = dense.forward(x, 1);
                // SAFETY: `out` holds every row of the result (the caller's
                // contract), which computes every column at once.
                unsafe { std::ptr::copy_nonoverlapping(result.as_ptr(), out, result.len()) };
            }
        }
    }

    /// Output columns that `panels` cover.
    fn columns(&self, panels: &Range<usize>, outputs: usize) -> Range<usize> {
        match self {
            Product::Packed(_) => panels.start * 16..(panels.end * 16).min(outputs),
            Product::Plain(_) => 0..outputs,
        }
    }
}

/// A convolution with its bias and activation (batch norm already folded in).
pub struct Conv2d {
    product: Product,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: Padding,
    activation: Activation,
}

impl Conv2d {
    pub fn new(folded: FoldedConv) -> Self {
        let spec = folded.spec;
        debug_assert_eq!(spec.groups, 1, "grouped convolutions are not products");
        let taps = spec.kernel * spec.kernel;
        let inputs = taps * spec.in_channels;
        // PyTorch's [out][in][ky][kx] to the gathered rows' [out][ky][kx][in].
        let mut weight = vec![0f32; spec.out_channels * inputs];
        for (out, row) in weight.chunks_exact_mut(inputs).enumerate() {
            let filters = &folded.weight[out * inputs..][..inputs];
            for channel in 0..spec.in_channels {
                for tap in 0..taps {
                    row[tap * spec.in_channels + channel] = filters[channel * taps + tap];
                }
            }
        }
        let dense = Dense {
            weight,
            bias: folded.bias,
            inputs,
            outputs: spec.out_channels,
        };
        let product = match F32Kernel::detect() {
            Some(kernel) => Product::Packed(PackedDense::with_kernel(&dense, kernel)),
            None => Product::Plain(dense),
        };
        Self {
            product,
            in_channels: spec.in_channels,
            out_channels: spec.out_channels,
            kernel: spec.kernel,
            stride: spec.stride,
            padding: spec.padding,
            activation: folded.activation,
        }
    }

    pub fn kernel(&self) -> usize {
        self.kernel
    }

    pub fn in_channels(&self) -> usize {
        self.in_channels
    }

    /// `activation(conv(x) + bias + residual)`; the residual, when given, has
    /// the output's shape.
    pub fn forward(
        &self,
        x: &FeatureMap,
        residual: Option<&FeatureMap>,
    ) -> candle_core::Result<FeatureMap> {
        if x.channels != self.in_channels {
            candle_core::bail!(
                "convolution over {} channels got {}",
                self.in_channels,
                x.channels
            );
        }
        let window = Window::new(self.kernel, self.stride, self.padding, x.height, x.width)?;
        let mut out = FeatureMap::with_shape(
            x.batch,
            window.out_height,
            window.out_width,
            self.out_channels,
        );
        if let Some(residual) = residual.filter(|r| !r.same_shape(&out)) {
            candle_core::bail!(
                "residual of {}x{}x{} does not match the output's {}x{}x{}",
                residual.height,
                residual.width,
                residual.channels,
                out.height,
                out.width,
                out.channels
            );
        }
        let tasks = plan(
            out.pixels(),
            self.product.panels(),
            rayon::current_num_threads(),
        );
        let output = SharedOut::new(&mut out.values);
        tasks
            .par_iter()
            .for_each_init(Vec::new, |gathered, (rows, panels)| {
                let input = self.input_rows(x, &window, rows.clone(), gathered);
                let first = rows.start * self.out_channels;
                // SAFETY: the tasks of `plan` cover disjoint rows, or disjoint
                // panels of the same rows, of `out`, which holds every row.
                unsafe {
                    self.product
                        .compute(input, output.at(first), panels.clone())
                };
                let columns = self.product.columns(panels, self.out_channels);
                for row in rows.clone() {
                    let at = row * self.out_channels + columns.start;
                    // SAFETY: as above; this task alone writes these columns of
                    // this row.
                    let values =
                        unsafe { std::slice::from_raw_parts_mut(output.at(at), columns.len()) };
                    if let Some(residual) = residual {
                        let add = &residual.values[at..at + columns.len()];
                        values.iter_mut().zip(add).for_each(|(v, r)| *v += r);
                    }
                    activate(self.activation, values);
                }
            });
        Ok(out)
    }

    /// The product's input rows for output pixels `rows`: the input map's
    /// own rows for a 1x1 convolution with stride 1, else gathered into
    /// `gathered`.
    fn input_rows<'a>(
        &self,
        x: &'a FeatureMap,
        window: &Window,
        rows: Range<usize>,
        gathered: &'a mut Vec<f32>,
    ) -> &'a [f32] {
        if self.kernel == 1 && self.stride == 1 {
            return &x.values[rows.start * x.channels..rows.end * x.channels];
        }
        let width = self.kernel * self.kernel * x.channels;
        gathered.clear();
        gathered.resize(rows.len() * width, 0.0);
        let per_image = window.out_height * window.out_width;
        for (row, out) in rows.zip(gathered.chunks_exact_mut(width)) {
            let image = row / per_image;
            let (oy, ox) = ((row % per_image) / window.out_width, row % window.out_width);
            for ky in 0..self.kernel {
                let Some(iy) = window.source_row(oy, ky) else {
                    continue;
                };
                for kx in 0..self.kernel {
                    if let Some(ix) = window.source_column(ox, kx) {
                        out[(ky * self.kernel + kx) * x.channels..][..x.channels]
                            .copy_from_slice(x.pixel(image, iy, ix));
                    }
                }
            }
        }
        gathered
    }
}

/// Splits `rows` x `panels` of output into tasks for `threads` threads: row
/// blocks of at most [`MAX_ROWS_PER_TASK`], and where that gives fewer than
/// two tasks per thread, panel ranges too (each task then gathers its rows
/// itself, which costs less than threads left idle).
fn plan(rows: usize, panels: usize, threads: usize) -> Vec<(Range<usize>, Range<usize>)> {
    let wanted = 2 * threads.max(1);
    let row_blocks = rows.div_ceil(MAX_ROWS_PER_TASK).max(1);
    let panel_groups = if row_blocks >= wanted || threads <= 1 {
        1
    } else {
        wanted
            .div_ceil(row_blocks)
            .min((panels / MIN_PANELS_PER_TASK).max(1))
    };
    let rows_per_task = rows
        .div_ceil(row_blocks)
        .next_multiple_of(ROW_MULTIPLE)
        .max(ROW_MULTIPLE);
    let panels_per_task = panels.div_ceil(panel_groups).max(1);
    let mut tasks = Vec::new();
    for first_row in (0..rows).step_by(rows_per_task) {
        for first_panel in (0..panels).step_by(panels_per_task) {
            tasks.push((
                first_row..(first_row + rows_per_task).min(rows),
                first_panel..(first_panel + panels_per_task).min(panels),
            ));
        }
    }
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_cover_every_row_and_panel_once() {
        for (rows, panels, threads) in [
            (12544, 2, 2),
            (49, 128, 2),
            (49, 32, 8),
            (1, 1, 2),
            (3, 80, 2),
            (200, 5, 1),
        ] {
            let mut seen = vec![0u8; rows * panels];
            let tasks = plan(rows, panels, threads);
            for (r, p) in &tasks {
                assert!(r.len() <= MAX_ROWS_PER_TASK);
                for row in r.clone() {
                    for panel in p.clone() {
                        seen[row * panels + panel] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{rows} x {panels}");
            if rows >= 64 * 4 || panels >= 8 * threads {
                assert!(tasks.len() >= 2 * threads, "{rows} x {panels}: {tasks:?}");
            }
        }
    }
}
