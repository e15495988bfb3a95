//! Dense layers with bfloat16 weights and inputs, f32 sums, for CPU inference.
//!
//! bf16 keeps f32's exponent and 8 bits of its mantissa: weights are rounded
//! once when the layer is built, each row of inputs just before the product.
//! The products of two bf16 values are exact in f32 and are summed in f32, so
//! the error is that of the two roundings (relative 2^-9 per value).
//!
//! Kernels, chosen at run time:
//! - **AMX-BF16** (`tdpbf16ps`, see [`super::amx`]): 8,192 multiply-adds per
//!   instruction; where it exists, bf16 runs several times faster than f32.
//! - **AVX-512 BF16** (`vdpbf16ps`): 32 bf16 multiply-adds per instruction,
//!   but on the CPUs that have it at half the issue rate of f32 FMAs, so
//!   about as fast as f32.
//! - Plain loops elsewhere: correct, and slower than f32 (the server says so
//!   at start-up).

use super::{
    amx,
    tiling::{for_each_tile, lane_mask, padded, split_rows, Panels, TileAt, LANES},
    Dense,
};

/// bf16 values per 32-bit lane.
const GROUP: usize = 2;
/// The depth is padded to whole AMX tile rows (64 bytes).
const TILE_DEPTH: usize = 32;
const ROWS_PER_TILE: usize = 4;
const PANELS_PER_TILE: usize = 4;

/// f32 to bf16, rounding to nearest even (what hardware conversions do).
#[inline]
pub fn to_bf16(value: f32) -> u16 {
    let bits = value.to_bits();
    if value.is_nan() {
        return ((bits >> 16) as u16) | 0x40;
    }
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    (rounded >> 16) as u16
}

#[inline]
pub fn from_bf16(value: u16) -> f32 {
    f32::from_bits(u32::from(value) << 16)
}

/// Which bf16 instructions the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Kernel {
    Amx,
    Avx512,
    Portable,
}

impl Bf16Kernel {
    pub fn detect() -> Self {
        if amx::usable(amx::Product::Bf16) {
            Self::Amx
        } else if has_bf16_instructions() {
            Self::Avx512
        } else {
            Self::Portable
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Amx => "amx-bf16",
            Self::Avx512 => "avx512-bf16",
            Self::Portable => "portable (no AVX-512 BF16: slower than f32)",
        }
    }
}

/// Whether this CPU has the AVX-512 bf16 dot-product instruction.
fn has_bf16_instructions() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `y = x W^T + b` with W and x rounded to bf16.
#[derive(Debug, Clone)]
pub struct Bf16Dense {
    inputs: usize,
    outputs: usize,
    weights: Panels<u16>,
    /// Per column, padded to whole panels.
    bias: Vec<f32>,
    kernel: Bf16Kernel,
}

/// One kernel call's share of the output.
struct Tile<'a> {
    /// The converted inputs, `[rows][depth]`.
    rows: &'a [u16],
    at: TileAt,
    out: *mut f32,
    out_stride: usize,
    columns: usize,
}

impl Bf16Dense {
    pub fn from_dense(dense: &Dense) -> Self {
        Self::with_kernel(dense, Bf16Kernel::detect())
    }

    /// Converts `dense` for `kernel` (tests compare kernels with each other).
    pub fn with_kernel(dense: &Dense, kernel: Bf16Kernel) -> Self {
        let weights = Panels::pack(&dense.weight, dense.inputs, GROUP, TILE_DEPTH, |_, row| {
            row.iter().copied().map(to_bf16).collect()
        });
        Self {
            inputs: dense.inputs,
            outputs: dense.outputs,
            weights,
            bias: padded(&dense.bias),
            kernel,
        }
    }

    pub fn kernel(&self) -> Bf16Kernel {
        self.kernel
    }

    /// `x` is `[rows, inputs]`, the result `[rows, outputs]`.
    pub fn forward(&self, x: &[f32], threads: usize) -> Vec<f32> {
        split_rows(
            x,
            self.inputs,
            self.outputs,
            threads,
            self.tile_shape().0,
            |x, out| self.forward_rows(x, out),
        )
    }

    /// Rows and panels of one kernel call.
    fn tile_shape(&self) -> (usize, usize) {
        match self.kernel {
            Bf16Kernel::Amx => (amx::ROWS, amx::PANELS),
            _ => (ROWS_PER_TILE, PANELS_PER_TILE),
        }
    }

    fn forward_rows(&self, x: &[f32], out: &mut [f32]) {
        let depth = self.weights.depth;
        let rows = x.len() / self.inputs;
        let converted = convert_rows(self.kernel, x, self.inputs, depth);
        let panels = self.outputs.div_ceil(LANES);
        let (rows_per_tile, panels_per_tile) = self.tile_shape();
        #[cfg(target_arch = "x86_64")]
        let _tiles = (self.kernel == Bf16Kernel::Amx).then(amx::TileConfig::load);
        for_each_tile(rows, panels, rows_per_tile, panels_per_tile, |at| {
            let tile = Tile {
                rows: &converted,
                at,
                out: out[at.first_row * self.outputs + at.first_panel * LANES..].as_mut_ptr(),
                out_stride: self.outputs,
                columns: (self.outputs - at.first_panel * LANES).min(at.panels * LANES),
            };
            match self.kernel {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AMX-BF16 was detected and lent to this process, its
                // tile configuration is loaded on this thread, the converted
                // rows are padded to whole tiles, the tile lies inside `out`.
                Bf16Kernel::Amx => unsafe { x86::amx_tile(self, &tile) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU has AVX-512 BF16; the tile lies inside `out`
                // and `converted`.
                Bf16Kernel::Avx512 => unsafe { x86::tile(self, &tile) },
                _ => self.portable_tile(&tile),
            }
        });
    }

    fn portable_tile(&self, tile: &Tile) {
        let depth = self.weights.depth;
        for r in 0..tile.at.rows {
            let a = &tile.rows[(tile.at.first_row + r) * depth..][..depth];
            for c in 0..tile.columns {
                let column = tile.at.first_panel * LANES + c;
                let sum: f32 = a
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| from_bf16(v) * from_bf16(self.weights.get(column, i)))
                    .sum();
                // SAFETY: row `r` and column `c` of the tile are inside `out`.
                unsafe { *tile.out.add(r * tile.out_stride + c) = sum + self.bias[column] };
            }
        }
    }
}

/// Each row to bf16, padded with zeros to `depth` and to whole AMX tiles of rows.
fn convert_rows(kernel: Bf16Kernel, x: &[f32], inputs: usize, depth: usize) -> Vec<u16> {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: these kernels are only chosen on CPUs with AVX-512 F/BW.
        Bf16Kernel::Amx | Bf16Kernel::Avx512 => unsafe {
            x86::convert_rows_avx512(x, inputs, depth)
        },
        _ => convert_rows_portable(x, inputs, depth),
    }
}

#[inline(always)]
fn convert_rows_portable(x: &[f32], inputs: usize, depth: usize) -> Vec<u16> {
    let rows = x.len() / inputs;
    let mut converted = vec![0u16; rows.next_multiple_of(amx::ROWS) * depth];
    for (row, dst) in x
        .chunks_exact(inputs)
        .zip(converted.chunks_exact_mut(depth))
    {
        for (d, &v) in dst.iter_mut().zip(row) {
            *d = to_bf16(v);
        }
    }
    converted
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{amx, convert_rows_portable, lane_mask, Bf16Dense, Tile, GROUP, LANES};

    /// The portable conversion, vectorized by the compiler for AVX-512.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) fn convert_rows_avx512(x: &[f32], inputs: usize, depth: usize) -> Vec<u16> {
        convert_rows_portable(x, inputs, depth)
    }

    /// # Safety
    /// AMX-BF16 is usable and configured on this thread; the converted rows are
    /// padded to whole tiles; the tile lies inside the output.
    pub(super) unsafe fn amx_tile(layer: &Bf16Dense, tile: &Tile) {
        let operands = amx::Operands::of(
            tile.rows,
            tile.at.first_row,
            &layer.weights,
            tile.at.first_panel,
        );
        // SAFETY: the caller's contract: AMX-BF16 is configured on this
        // thread, and the operands cover whole tiles of padded rows.
        let sums =
            unsafe { amx::multiply(amx::Product::Bf16, &operands, tile.at.rows, tile.at.panels) };
        // SAFETY: AMX-BF16 is only usable where AVX-512F is; the tile lies
        // inside the output (the caller's contract).
        unsafe { add_bias(layer, tile, &sums) };
    }

    /// Writes the tile's valid rows and columns: the f32 sums plus the bias.
    ///
    /// # Safety
    /// The tile lies inside `tile.out`.
    #[target_feature(enable = "avx512f")]
    unsafe fn add_bias(layer: &Bf16Dense, tile: &Tile, sums: &amx::Sums) {
        let first_column = tile.at.first_panel * LANES;
        for r in 0..tile.at.rows {
            for p in 0..tile.at.panels {
                let panel = &sums[2 * (r / amx::TILE_ROWS) + p];
                let c = p * LANES;
                // SAFETY: an accumulator tile row holds 16 sums, and the bias
                // is padded to whole panels.
                let (acc, bias) = unsafe {
                    (
                        _mm512_loadu_ps(panel[(r % amx::TILE_ROWS) * LANES..].as_ptr().cast()),
                        _mm512_loadu_ps(layer.bias.as_ptr().add(first_column + c)),
                    )
                };
                let mask = lane_mask(tile.columns - c);
                // SAFETY: row `r` of the tile lies inside `out`; the mask writes
                // only the tile's columns of panel `p`.
                unsafe {
                    _mm512_mask_storeu_ps(
                        tile.out.add(r * tile.out_stride + c),
                        mask,
                        _mm512_add_ps(acc, bias),
                    );
                }
            }
        }
    }

    /// # Safety
    /// The CPU has AVX-512 F/BF16; the tile lies inside its buffers.
    pub(super) unsafe fn tile(layer: &Bf16Dense, tile: &Tile) {
        // SAFETY: the caller's contract, passed on to the kernel.
        unsafe { crate::nn::tiling::with_tile_shape!(kernel, layer, tile) }
    }

    /// # Safety
    /// The tile lies inside `tile.rows`, `tile.out` and the layer's panels.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn kernel<const R: usize, const P: usize>(layer: &Bf16Dense, tile: &Tile) {
        let depth = layer.weights.depth;
        // SAFETY: the tile's first row is a row of the converted inputs.
        let a = unsafe { tile.rows.as_ptr().add(tile.at.first_row * depth) };
        let w = layer.weights.panel(tile.at.first_panel);
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        for step in 0..depth / GROUP {
            let mut weights = [_mm512_setzero_si512(); P];
            for (p, weight) in weights.iter_mut().enumerate() {
                // SAFETY: panel `p` of the tile holds `depth / GROUP` steps of
                // 16 pairs.
                *weight =
                    unsafe { _mm512_loadu_si512(w.add((p * depth + step * GROUP) * LANES).cast()) };
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row `r` of the tile has `depth` values, the pair at
                // `step` among them.
                let pair = unsafe {
                    a.add(r * depth + step * GROUP)
                        .cast::<i32>()
                        .read_unaligned()
                };
                // SAFETY: both are 512 bits, and every bit pattern is a valid
                // vector of bf16 pairs.
                let inputs: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(pair)) };
                for (acc, weight) in acc.iter_mut().zip(&weights) {
                    // SAFETY: as above.
                    let weight = unsafe { std::mem::transmute::<__m512i, __m512bh>(*weight) };
                    *acc = _mm512_dpbf16_ps(*acc, inputs, weight);
                }
            }
        }
        let first_column = tile.at.first_panel * LANES;
        for (r, acc) in acc.iter().enumerate() {
            for (p, acc) in acc.iter().enumerate() {
                let c = p * LANES;
                // SAFETY: the bias is padded to whole panels.
                let bias = unsafe { _mm512_loadu_ps(layer.bias.as_ptr().add(first_column + c)) };
                let mask = lane_mask(tile.columns - c);
                // SAFETY: row `r` of the tile lies inside `out`; the mask writes
                // only the tile's columns of panel `p`.
                unsafe {
                    _mm512_mask_storeu_ps(
                        tile.out.add(r * tile.out_stride + c),
                        mask,
                        _mm512_add_ps(*acc, bias),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::nn::tiling::fixtures::{inputs, layer};

    #[test]
    fn conversion_rounds_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to even (1.0).
        assert_eq!(to_bf16(1.0 + 2f32.powi(-8)), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
    }

    fn kernels() -> Vec<Bf16Kernel> {
        let mut kernels = vec![];
        if has_bf16_instructions() {
            kernels.push(Bf16Kernel::Avx512);
        }
        if amx::usable(amx::Product::Bf16) {
            kernels.push(Bf16Kernel::Amx);
        }
        if kernels.is_empty() {
            eprintln!("no AVX-512 BF16 on this CPU: only the portable loops run");
        }
        kernels
    }

    #[test]
    fn every_kernel_gives_the_portable_result() {
        // Same bf16 products, summed in a different order: 1e-5 of the sum of
        // magnitudes.
        for (n_in, n_out, rows) in [(384, 1152, 70), (37, 50, 9), (1536, 384, 3)] {
            let dense = layer(n_in, n_out);
            let x = inputs(rows, n_in);
            let reference = Bf16Dense::with_kernel(&dense, Bf16Kernel::Portable).forward(&x, 1);
            for kernel in kernels() {
                let ours = Bf16Dense::with_kernel(&dense, kernel).forward(&x, 2);
                for (a, b) in ours.iter().zip(&reference) {
                    assert!(
                        (a - b).abs() <= 1e-5 * n_in as f32,
                        "{kernel:?} {n_in}x{n_out}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn bf16_products_are_close_to_float_products() {
        // Two roundings of relative 2^-9 each: every term is off by < 0.4%, so
        // the sum by < 0.4% of the sum of magnitudes.
        let dense = layer(384, 64);
        let x = inputs(5, 384);
        let exact = dense.forward(&x, 1);
        let ours = Bf16Dense::from_dense(&dense).forward(&x, 1);
        for (row, (a, b)) in ours.iter().zip(&exact).enumerate() {
            let bound: f32 = 0.004 * 0.3 * 384.0;
            assert!((a - b).abs() <= bound, "{row}: {a} vs {b}");
        }
    }
}
