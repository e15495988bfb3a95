//! What the reduced-precision dense layers ([`super::int8`], [`super::bf16`])
//! share: weights packed in panels of 16 output columns, rows split among
//! threads, and the order in which tiles of the output are computed.

use rayon::prelude::*;

/// Output columns per panel: one 512-bit register of 32-bit results.
pub(super) const LANES: usize = 16;
/// Rows of the left-hand side handed to one thread at least: below this,
/// threads cost more than they save.
const MIN_ROWS_PER_TASK: usize = 8;
/// Rows whose converted inputs stay in cache while every panel passes over them.
pub(super) const ROW_BLOCK: usize = 64;

/// Weights in panels of [`LANES`] columns, each `[depth / group][LANES][group]`:
/// `group` consecutive inputs of one column side by side, the unit that one
/// 32-bit lane of a dot-product instruction consumes (4 bytes, or 2 bf16).
#[derive(Debug, Clone)]
pub(super) struct Panels<T> {
    pub values: Vec<T>,
    /// Inputs rounded up to a multiple of `group`; the padding is zero.
    pub depth: usize,
    pub group: usize,
}

impl<T: Copy + Default> Panels<T> {
    /// Packs `outputs` rows of `inputs` weights, converting each row with
    /// `convert` (which returns the converted row). The depth is padded to a
    /// multiple of `depth_multiple` (itself a multiple of `group`).
    pub fn pack(
        weight: &[f32],
        inputs: usize,
        group: usize,
        depth_multiple: usize,
        mut convert: impl FnMut(usize, &[f32]) -> Vec<T>,
    ) -> Self {
        debug_assert_eq!(depth_multiple % group, 0);
        let depth = inputs.div_ceil(depth_multiple) * depth_multiple;
        let outputs = weight.len() / inputs;
        let mut values = vec![T::default(); outputs.div_ceil(LANES) * LANES * depth];
        for (column, row) in weight.chunks_exact(inputs).enumerate() {
            let panel = &mut values[(column / LANES) * LANES * depth..][..LANES * depth];
            let lane = column % LANES;
            for (i, value) in convert(column, row).into_iter().enumerate() {
                panel[(i / group) * LANES * group + lane * group + i % group] = value;
            }
        }
        Self {
            values,
            depth,
            group,
        }
    }

    /// Where panel `first` starts (a kernel reads panels from there on).
    pub fn panel(&self, first: usize) -> *const T {
        self.values[first * LANES * self.depth..].as_ptr()
    }

    /// The weight of `column` for input `i`.
    pub fn get(&self, column: usize, i: usize) -> T {
        let panel = (column / LANES) * LANES * self.depth;
        self.values[panel
            + (i / self.group) * LANES * self.group
            + (column % LANES) * self.group
            + i % self.group]
    }
}

/// A block of the output: `rows` rows from `first_row`, `panels` panels from
/// `first_panel`.
#[derive(Debug, Clone, Copy)]
pub(super) struct TileAt {
    pub first_row: usize,
    pub rows: usize,
    pub first_panel: usize,
    pub panels: usize,
}

/// Computes `[rows, outputs]` from `x` (`[rows, inputs]`) on `threads` threads
/// of the current rayon pool, each taking a contiguous share of the rows;
/// `compute(x_rows, out_rows)` does one share.
pub(super) fn split_rows(
    x: &[f32],
    inputs: usize,
    outputs: usize,
    threads: usize,
    rows_per_tile: usize,
    compute: impl Fn(&[f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    let rows = x.len() / inputs;
    let mut out = vec![0f32; rows * outputs];
    let per_task = rows
        .div_ceil(threads.max(1))
        .next_multiple_of(rows_per_tile)
        .max(MIN_ROWS_PER_TASK);
    if threads <= 1 || rows <= per_task {
        compute(x, &mut out);
    } else {
        out.par_chunks_mut(per_task * outputs)
            .zip(x.par_chunks(per_task * inputs))
            .for_each(|(out, x)| compute(x, out));
    }
    out
}

/// Visits the tiles covering `rows` x `panels`: blocks of rows, and within a
/// block each group of panels over every tile of rows, so that the block's
/// inputs and the group's weights are reused from cache.
pub(super) fn for_each_tile(
    rows: usize,
    panels: usize,
    rows_per_tile: usize,
    panels_per_tile: usize,
    mut visit: impl FnMut(TileAt),
) {
    for block in (0..rows).step_by(ROW_BLOCK) {
        let block_end = (block + ROW_BLOCK).min(rows);
        for first_panel in (0..panels).step_by(panels_per_tile) {
            for first_row in (block..block_end).step_by(rows_per_tile) {
                visit(TileAt {
                    first_row,
                    rows: (block_end - first_row).min(rows_per_tile),
                    first_panel,
                    panels: (panels - first_panel).min(panels_per_tile),
                });
            }
        }
    }
}

/// Calls `$kernel::<R, P>($layer, $tile)` with the tile's rows and panels
/// (1 to 4 each) as constants, so that each shape gets its own code with
/// fixed register counts.
macro_rules! with_tile_shape {
    ($kernel:ident, $layer:expr, $tile:expr) => {
        match ($tile.at.rows.min(4), $tile.at.panels.min(4)) {
            (4, 4) => $kernel::<4, 4>($layer, $tile),
            (3, 4) => $kernel::<3, 4>($layer, $tile),
            (2, 4) => $kernel::<2, 4>($layer, $tile),
            (1, 4) => $kernel::<1, 4>($layer, $tile),
            (4, 3) => $kernel::<4, 3>($layer, $tile),
            (3, 3) => $kernel::<3, 3>($layer, $tile),
            (2, 3) => $kernel::<2, 3>($layer, $tile),
            (1, 3) => $kernel::<1, 3>($layer, $tile),
            (4, 2) => $kernel::<4, 2>($layer, $tile),
            (3, 2) => $kernel::<3, 2>($layer, $tile),
            (2, 2) => $kernel::<2, 2>($layer, $tile),
            (1, 2) => $kernel::<1, 2>($layer, $tile),
            (4, _) => $kernel::<4, 1>($layer, $tile),
            (3, _) => $kernel::<3, 1>($layer, $tile),
            (2, _) => $kernel::<2, 1>($layer, $tile),
            (_, _) => $kernel::<1, 1>($layer, $tile),
        }
    };
}
pub(super) use with_tile_shape;

/// A vector padded with zeros to whole panels, so that kernels load whole
/// registers of per-column values.
pub(super) fn padded<T: Copy + Default>(values: &[T]) -> Vec<T> {
    let mut out = values.to_vec();
    out.resize(values.len().div_ceil(LANES) * LANES, T::default());
    out
}

/// The mask of the first `valid` of [`LANES`] lanes.
pub(super) fn lane_mask(valid: usize) -> u16 {
    if valid >= LANES {
        u16::MAX
    } else {
        (1u16 << valid) - 1
    }
}

/// Layers and inputs the kernels' tests share.
#[cfg(test)]
pub(super) mod fixtures {
    use crate::nn::Dense;

    /// Weights in [-0.3, 0.3], varied; small increasing biases.
    pub fn layer(inputs: usize, outputs: usize) -> Dense {
        Dense {
            weight: (0..inputs * outputs)
                .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3)
                .collect(),
            bias: (0..outputs).map(|o| o as f32 * 0.01).collect(),
            inputs,
            outputs,
        }
    }

    /// Values in [-1, 1], varied.
    pub fn inputs(rows: usize, inputs: usize) -> Vec<f32> {
        (0..rows * inputs)
            .map(|i| (i * 104_729 % 997) as f32 / 498.5 - 1.0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_every_cell_once() {
        for (rows, panels) in [(1, 1), (70, 9), (129, 24), (5, 3)] {
            let mut seen = vec![0u8; rows * panels];
            for_each_tile(rows, panels, 4, 4, |t| {
                for r in t.first_row..t.first_row + t.rows {
                    for p in t.first_panel..t.first_panel + t.panels {
                        seen[r * panels + p] += 1;
                    }
                }
            });
            assert!(seen.iter().all(|&n| n == 1), "{rows} x {panels}");
        }
    }

    #[test]
    fn packing_keeps_every_weight_reachable() {
        let (inputs, outputs) = (7, 19);
        let weight: Vec<f32> = (0..inputs * outputs).map(|i| i as f32).collect();
        let panels = Panels::pack(&weight, inputs, 4, 4, |_, row| row.to_vec());
        assert_eq!(panels.depth, 8);
        for column in 0..outputs {
            for i in 0..inputs {
                assert_eq!(panels.get(column, i), weight[column * inputs + i]);
            }
            assert_eq!(panels.get(column, 7), 0.0, "padding");
        }
    }

    #[test]
    fn split_rows_hands_every_row_to_one_share() {
        let x: Vec<f32> = (0..37 * 3).map(|i| i as f32).collect();
        for threads in [1, 2, 3] {
            let out = split_rows(&x, 3, 2, threads, 4, |x, out| {
                for (row, out) in x.chunks_exact(3).zip(out.chunks_exact_mut(2)) {
                    out[0] = row[0];
                    out[1] = row.iter().sum();
                }
            });
            for (r, out) in out.chunks_exact(2).enumerate() {
                assert_eq!(out[0], (3 * r) as f32);
                assert_eq!(out[1], (9 * r + 3) as f32);
            }
        }
    }
}
