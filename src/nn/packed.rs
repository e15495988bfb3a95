//! f32 dense layers on weights packed once, at load time.
//!
//! A general matrix-product library packs its right-hand side in every call;
//! for the short passes a server sees most (one text is ~26 rows), packing the
//! weights costs as much as multiplying by them. Here the weights are packed
//! into panels of 16 output columns (`[depth][16]`, see [`super::tiling`]) when
//! the layer is built, and a small kernel multiplies rows by panels with FMA
//! instructions: AVX-512F (4 rows x 4 panels, 16 accumulators) or AVX2 + FMA
//! (6 rows x 1 panel, 12 accumulators), chosen at run time. Without either, layers keep the
//! `gemm` path ([`super::Dense::forward`]).

use super::{
    tiling::{lane_mask, padded, split_rows, Panels, TileAt, LANES, ROW_BLOCK},
    Dense,
};

/// Which FMA width the kernel uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum F32Kernel {
    Avx512,
    Avx2,
}

impl F32Kernel {
    /// The widest kernel this CPU runs, if any.
    pub fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Some(Self::Avx512);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Some(Self::Avx2);
            }
        }
        None
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Avx512 => "avx512 (f32, packed)",
            Self::Avx2 => "avx2+fma (f32, packed)",
        }
    }

    /// Rows and panels of one kernel call.
    fn tile_shape(self) -> (usize, usize) {
        match self {
            Self::Avx512 => (6, 4),
            Self::Avx2 => (6, 1),
        }
    }
}

/// `y = x W^T + b` with W packed in panels.
#[derive(Debug, Clone)]
pub struct PackedDense {
    inputs: usize,
    outputs: usize,
    weights: Panels<f32>,
    /// Per column, padded to whole panels.
    bias: Vec<f32>,
    kernel: F32Kernel,
}

/// One kernel call's share of the output.
struct Tile<'a> {
    /// The layer's input, `[rows][inputs]`.
    x: &'a [f32],
    at: TileAt,
    out: *mut f32,
    out_stride: usize,
    columns: usize,
    /// The inputs this call sums over; after the first slice of the depth,
    /// the sums continue from what `out` holds (and the bias is in it).
    depth: std::ops::Range<usize>,
}

/// Inputs per slice of the depth: the 4 panels a tile reads (16 KiB per 64
/// inputs) stay in the core's L1 cache while every row tile of a block passes
/// over them, instead of being read again from L2 by each.
const DEPTH_SLICE: usize = 128;

impl PackedDense {
    pub fn with_kernel(dense: &Dense, kernel: F32Kernel) -> Self {
        Self {
            inputs: dense.inputs,
            outputs: dense.outputs,
            weights: Panels::pack(&dense.weight, dense.inputs, 1, 1, |_, row| row.to_vec()),
            bias: padded(&dense.bias),
            kernel,
        }
    }

    pub fn kernel(&self) -> F32Kernel {
        self.kernel
    }

    /// `x` is `[rows, inputs]`, the result `[rows, outputs]`.
    pub fn forward(&self, x: &[f32], threads: usize) -> Vec<f32> {
        let (rows_per_tile, _) = self.kernel.tile_shape();
        split_rows(
            x,
            self.inputs,
            self.outputs,
            threads,
            rows_per_tile,
            |x, out| self.forward_rows(x, out),
        )
    }

    fn forward_rows(&self, x: &[f32], out: &mut [f32]) {
        assert!(out.len() >= x.len() / self.inputs * self.outputs);
        // SAFETY: `out` holds every row of the result (checked above).
        unsafe { self.forward_panels(x, out.as_mut_ptr(), 0..self.panels()) };
    }

    /// Panels of 16 output columns; the last may be partly padding.
    pub fn panels(&self) -> usize {
        self.outputs.div_ceil(LANES)
    }

    pub fn inputs(&self) -> usize {
        self.inputs
    }

    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// The columns of `panels` (16 each) of `x W^T + b` for the rows of `x`
    /// (`[rows, inputs]`), on this thread, written into the rows of `out`
    /// (`outputs` apart); other columns are left as they are, so that threads
    /// may compute different panels of the same rows.
    ///
    /// # Safety
    /// `out` is valid for writes of `rows * outputs` values, and no other
    /// thread writes the same columns of those rows meanwhile.
    pub unsafe fn forward_panels(&self, x: &[f32], out: *mut f32, panels: std::ops::Range<usize>) {
        let rows = x.len() / self.inputs;
        let (rows_per_tile, panels_per_tile) = self.kernel.tile_shape();
        // As `tiling::for_each_tile`, with the depth sliced between the panel
        // group and the row tiles.
        for block in (0..rows).step_by(ROW_BLOCK) {
            let block_end = (block + ROW_BLOCK).min(rows);
            for first_panel in panels.clone().step_by(panels_per_tile) {
                for start in (0..self.inputs).step_by(DEPTH_SLICE) {
                    let depth = start..(start + DEPTH_SLICE).min(self.inputs);
                    for first_row in (block..block_end).step_by(rows_per_tile) {
                        let at = TileAt {
                            first_row,
                            rows: (block_end - first_row).min(rows_per_tile),
                            first_panel,
                            panels: (panels.end - first_panel).min(panels_per_tile),
                        };
                        // SAFETY: the tile's rows are rows of `x` and `out`,
                        // its panels among `panels` (the caller's contract).
                        unsafe { self.tile(x, out, at, depth.clone()) };
                    }
                }
            }
        }
    }

    /// # Safety
    /// As [`Self::forward_panels`], for the tile `at`.
    unsafe fn tile(&self, x: &[f32], out: *mut f32, at: TileAt, depth: std::ops::Range<usize>) {
        // SAFETY: the tile's first row and column lie inside `out`.
        let out = unsafe { out.add(at.first_row * self.outputs + at.first_panel * LANES) };
        let tile = Tile {
            x,
            at,
            out,
            out_stride: self.outputs,
            columns: (self.outputs - at.first_panel * LANES).min(at.panels * LANES),
            depth,
        };
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the kernel was chosen by detecting its CPU features; the
        // tile lies inside `x`, the panels and `out`.
        unsafe {
            match self.kernel {
                F32Kernel::Avx512 => x86::avx512_tile(self, &tile),
                F32Kernel::Avx2 => x86::avx2_tile(self, &tile),
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{lane_mask, PackedDense, Tile, LANES};

    /// # Safety
    /// The CPU has AVX-512F; the tile lies inside its buffers.
    pub(super) unsafe fn avx512_tile(layer: &PackedDense, tile: &Tile) {
        // Up to 6 rows x 4 panels: 24 accumulators, 4 weight registers and a
        // broadcast in the 32 registers.
        macro_rules! rows {
            ($p:literal) => {
                match tile.at.rows.min(6) {
                    6 => avx512::<6, $p>(layer, tile),
                    5 => avx512::<5, $p>(layer, tile),
                    4 => avx512::<4, $p>(layer, tile),
                    3 => avx512::<3, $p>(layer, tile),
                    2 => avx512::<2, $p>(layer, tile),
                    _ => avx512::<1, $p>(layer, tile),
                }
            };
        }
        // SAFETY: the caller's contract, passed on: the CPU has AVX-512F and
        // the tile lies inside its buffers.
        unsafe {
            match tile.at.panels.min(4) {
                4 => rows!(4),
                3 => rows!(3),
                2 => rows!(2),
                _ => rows!(1),
            }
        }
    }

    /// # Safety
    /// The tile lies inside `tile.x`, `tile.out` and the layer's panels.
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512<const R: usize, const P: usize>(layer: &PackedDense, tile: &Tile) {
        let depth = layer.weights.depth;
        // SAFETY: the tile's first row is a row of `x`.
        let x = unsafe { tile.x.as_ptr().add(tile.at.first_row * layer.inputs) };
        let w = layer.weights.panel(tile.at.first_panel);
        let first_slice = tile.depth.start == 0;
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        if !first_slice {
            for (r, acc) in acc.iter_mut().enumerate() {
                for (p, acc) in acc.iter_mut().enumerate() {
                    let c = p * LANES;
                    // SAFETY: row `r` of the tile lies inside `out`; the mask
                    // reads only the tile's columns of panel `p`.
                    *acc = unsafe {
                        let out = tile.out.add(r * tile.out_stride + c);
                        _mm512_maskz_loadu_ps(lane_mask(tile.columns - c), out)
                    };
                }
            }
        }
        for k in tile.depth.clone() {
            let mut weights = [_mm512_setzero_ps(); P];
            for (p, weight) in weights.iter_mut().enumerate() {
                // SAFETY: panel `p` of the tile holds `depth` rows of 16 weights,
                // and `k` is below the depth.
                *weight = unsafe { _mm512_loadu_ps(w.add((p * depth + k) * LANES)) };
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row `r` of the tile is a row of `x`, `k` one of its inputs.
                let input = _mm512_set1_ps(unsafe { *x.add(r * layer.inputs + k) });
                for (acc, weight) in acc.iter_mut().zip(&weights) {
                    *acc = _mm512_fmadd_ps(input, *weight, *acc);
                }
            }
        }
        let first_column = tile.at.first_panel * LANES;
        for (r, acc) in acc.iter().enumerate() {
            for (p, acc) in acc.iter().enumerate() {
                let c = p * LANES;
                let sum = if first_slice {
                    // SAFETY: the bias is padded to whole panels.
                    let bias =
                        unsafe { _mm512_loadu_ps(layer.bias.as_ptr().add(first_column + c)) };
                    _mm512_add_ps(*acc, bias)
                } else {
                    *acc
                };
                // SAFETY: row `r` of the tile lies inside `out`; the mask writes
                // only the tile's columns of panel `p`.
                unsafe {
                    let out = tile.out.add(r * tile.out_stride + c);
                    _mm512_mask_storeu_ps(out, lane_mask(tile.columns - c), sum);
                }
            }
        }
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; the tile lies inside its buffers.
    pub(super) unsafe fn avx2_tile(layer: &PackedDense, tile: &Tile) {
        // SAFETY: the caller's contract, passed on: the CPU has AVX2 and FMA,
        // and the tile lies inside its buffers.
        unsafe {
            match tile.at.rows {
                6 => avx2::<6, 1>(layer, tile),
                5 => avx2::<5, 1>(layer, tile),
                4 => avx2::<4, 1>(layer, tile),
                3 => avx2::<3, 1>(layer, tile),
                2 => avx2::<2, 1>(layer, tile),
                _ => avx2::<1, 1>(layer, tile),
            }
        }
    }

    /// A panel is two 8-wide halves; R rows x P panels x 2 accumulators (6 x 1
    /// x 2: 12 of the 16 registers, the shape of the usual AVX2 kernels).
    ///
    /// # Safety
    /// The tile lies inside `tile.x`, `tile.out` and the layer's panels.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2<const R: usize, const P: usize>(layer: &PackedDense, tile: &Tile) {
        let depth = layer.weights.depth;
        // SAFETY: the tile's first row is a row of `x`.
        let x = unsafe { tile.x.as_ptr().add(tile.at.first_row * layer.inputs) };
        let w = layer.weights.panel(tile.at.first_panel);
        let first_slice = tile.depth.start == 0;
        let mut acc = [[[_mm256_setzero_ps(); 2]; P]; R];
        if !first_slice {
            for (r, acc) in acc.iter_mut().enumerate() {
                for (p, halves) in acc.iter_mut().enumerate() {
                    let c = p * LANES;
                    let mut sums = [0f32; LANES];
                    let valid = (tile.columns - c).min(LANES);
                    // SAFETY: row `r` of the tile lies inside `out` and has
                    // `valid` columns in panel `p`; `sums` holds 16 values.
                    *halves = unsafe {
                        let out = tile.out.add(r * tile.out_stride + c);
                        std::ptr::copy_nonoverlapping(out, sums.as_mut_ptr(), valid);
                        [
                            _mm256_loadu_ps(sums.as_ptr()),
                            _mm256_loadu_ps(sums.as_ptr().add(8)),
                        ]
                    };
                }
            }
        }
        for k in tile.depth.clone() {
            let mut weights = [[_mm256_setzero_ps(); 2]; P];
            for (p, halves) in weights.iter_mut().enumerate() {
                // SAFETY: panel `p` of the tile holds `depth` rows of 16 weights,
                // and `k` is below the depth.
                *halves = unsafe {
                    let at = w.add((p * depth + k) * LANES);
                    [_mm256_loadu_ps(at), _mm256_loadu_ps(at.add(8))]
                };
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row `r` of the tile is a row of `x`, `k` one of its inputs.
                let input = _mm256_set1_ps(unsafe { *x.add(r * layer.inputs + k) });
                for (acc, halves) in acc.iter_mut().zip(&weights) {
                    acc[0] = _mm256_fmadd_ps(input, halves[0], acc[0]);
                    acc[1] = _mm256_fmadd_ps(input, halves[1], acc[1]);
                }
            }
        }
        let first_column = tile.at.first_panel * LANES;
        for (r, acc) in acc.iter().enumerate() {
            for (p, halves) in acc.iter().enumerate() {
                let mut sums = [0f32; LANES];
                // SAFETY: `sums` holds two halves of 8 values.
                unsafe {
                    _mm256_storeu_ps(sums.as_mut_ptr(), halves[0]);
                    _mm256_storeu_ps(sums.as_mut_ptr().add(8), halves[1]);
                }
                let c = p * LANES;
                for (i, sum) in sums.iter().enumerate().take((tile.columns - c).min(LANES)) {
                    let bias = if first_slice {
                        layer.bias[first_column + c + i]
                    } else {
                        0.0
                    };
                    // SAFETY: row `r` of the tile lies inside `out`, and `i`
                    // is one of the tile's columns of panel `p`.
                    unsafe { *tile.out.add(r * tile.out_stride + c + i) = sum + bias };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{super::tiling::fixtures, *};

    #[test]
    fn every_kernel_matches_the_gemm_path() {
        let mut kernels = vec![];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                kernels.push(F32Kernel::Avx512);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                kernels.push(F32Kernel::Avx2);
            }
        }
        // Same products summed in another order: 1e-5 of the sum of magnitudes.
        for (inputs, outputs, rows) in [(384, 1152, 26), (37, 50, 9), (1536, 384, 3), (8, 16, 70)] {
            let dense = fixtures::layer(inputs, outputs);
            let x = fixtures::inputs(rows, inputs);
            let reference = dense.forward(&x, 1);
            for &kernel in &kernels {
                for threads in [1, 2] {
                    let ours = PackedDense::with_kernel(&dense, kernel).forward(&x, threads);
                    assert_eq!(ours.len(), reference.len());
                    for (a, b) in ours.iter().zip(&reference) {
                        assert!(
                            (a - b).abs() <= 1e-5 * 0.3 * inputs as f32,
                            "{kernel:?} {inputs}x{outputs}, {rows} rows: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}
