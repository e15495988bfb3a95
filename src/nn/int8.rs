//! Dense layers with 8-bit integer weights, for CPU inference.
//!
//! Weights are quantized once, when the layer is built, per output channel
//! (symmetric, i8: scale = max |w| / 127). Activations are quantized per row
//! just before each product, asymmetrically (u8 over the row's [min, max]):
//! rows after GELU are mostly positive, and a symmetric code would waste half
//! of its 256 levels on them. With `x = s q + m` and `w = t v`,
//! `x . w = s t (q . v) + m t (sum of v)`: the integer dot product is exact in
//! i32, and the second term uses each column's weight sum, computed once. The
//! only error is the rounding of the two quantizations.
//!
//! Kernels, chosen at run time from what the CPU has:
//! - **AMX** (Intel's tile unit, `tdpbusd`): a 16 x 64 block of u8 inputs
//!   times a 64 x 16 block of i8 weights per instruction, accumulated in a
//!   16 x 16 tile of i32. Linux lends the tile registers to a process that asks
//!   (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), once.
//! - **AVX-512 VNNI** (`vpdpbusd`): 64 multiply-adds of u8 x i8 per
//!   instruction, exactly the unsigned-times-signed product above.
//! - **AVX2**: bytes widened to i16 and multiplied pairwise (`vpmaddwd`), exact
//!   as well (`vpmaddubsw` would saturate at the full 8-bit range, which is why
//!   some int8 engines quantize to 7 bits on such CPUs).
//! - Plain loops elsewhere.
//!
//! Layout: the weights are cut into panels of 16 output columns (one 512-bit
//! register of i32 results); a panel is `[depth / 4][16][4]`, four consecutive
//! inputs of one column side by side, the unit `vpdpbusd` works on. Sixteen
//! such rows (64 inputs) are exactly an AMX weight tile, so every kernel reads
//! the same packing; the depth is padded to a multiple of 64 for that.

use super::{
    amx,
    tiling::{for_each_tile, lane_mask, padded, split_rows, Panels, TileAt, LANES},
    Dense,
};

/// Inputs per 32-bit group.
const GROUP: usize = 4;
/// Inputs per AMX tile row (64 bytes), and the multiple the depth is padded to.
const TILE_DEPTH: usize = 64;
/// Quantized inputs are padded to a multiple of this many rows: what one AMX
/// kernel call reads.
const PADDED_ROWS: usize = amx::ROWS;
/// Rows of activations one SIMD kernel call computes.
const ROWS_PER_TILE: usize = 4;
/// Panels one kernel call computes (64 columns).
const PANELS_PER_TILE: usize = 4;

/// Which integer dot-product instructions the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Kernel {
    Amx,
    Vnni,
    Avx2,
    Portable,
}

impl Int8Kernel {
    /// The fastest kernel this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if amx::usable(amx::Product::Int8) {
                return Self::Amx;
            }
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
            {
                return Self::Vnni;
            }
            if is_x86_feature_detected!("avx2") {
                return Self::Avx2;
            }
        }
        Self::Portable
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Amx => "amx-int8",
            Self::Vnni => "avx512-vnni",
            Self::Avx2 => "avx2",
            Self::Portable => "portable",
        }
    }
}

/// `y = x W^T + b` with W quantized to int8 per output channel.
#[derive(Debug, Clone)]
pub struct Int8Dense {
    inputs: usize,
    outputs: usize,
    weights: Panels<i8>,
    /// Per column (padded to whole panels): the weight scale.
    scales: Vec<f32>,
    /// Per column: the sum of its quantized weights times its scale, which
    /// multiplies each row's offset.
    offset_weights: Vec<f32>,
    /// Per column, padded.
    bias: Vec<f32>,
    kernel: Int8Kernel,
}

/// The quantized rows of one product's left-hand side.
struct QuantizedRows {
    /// `[rows][depth]`; the padding multiplies zero weights.
    values: Vec<u8>,
    /// Per row: the step between codes.
    scales: Vec<f32>,
    /// Per row: the value of code 0 (the row's minimum).
    offsets: Vec<f32>,
}

/// One kernel call's share of the output.
struct Tile<'a> {
    rows: &'a QuantizedRows,
    at: TileAt,
    /// Where `at.first_row`'s output row starts, at the first panel's column.
    out: *mut f32,
    out_stride: usize,
    /// Valid output columns from the first panel's first column on.
    columns: usize,
}

impl Int8Dense {
    /// Quantizes `dense` with the kernel this CPU runs best.
    pub fn from_dense(dense: &Dense) -> Self {
        Self::with_kernel(dense, Int8Kernel::detect())
    }

    /// Quantizes `dense` for `kernel` (tests compare kernels with each other).
    pub fn with_kernel(dense: &Dense, kernel: Int8Kernel) -> Self {
        let mut scales = vec![0f32; dense.outputs];
        let mut offset_weights = vec![0f32; dense.outputs];
        let weights = Panels::pack(
            &dense.weight,
            dense.inputs,
            GROUP,
            TILE_DEPTH,
            |column, row| {
                let scale = symmetric_scale(row);
                let quantized: Vec<i8> = row.iter().map(|&w| quantize(w, 1.0 / scale)).collect();
                scales[column] = scale;
                offset_weights[column] = scale * quantized.iter().map(|&q| q as f32).sum::<f32>();
                quantized
            },
        );
        Self {
            inputs: dense.inputs,
            outputs: dense.outputs,
            weights,
            scales: padded(&scales),
            offset_weights: padded(&offset_weights),
            bias: padded(&dense.bias),
            kernel,
        }
    }

    pub fn kernel(&self) -> Int8Kernel {
        self.kernel
    }

    /// `x` is `[rows, inputs]`, the result `[rows, outputs]`; rows are split
    /// among `threads` threads of the current rayon pool.
    pub fn forward(&self, x: &[f32], threads: usize) -> Vec<f32> {
        split_rows(
            x,
            self.inputs,
            self.outputs,
            threads,
            self.rows_per_tile(),
            |x, out| self.forward_rows(x, out),
        )
    }

    fn rows_per_tile(&self) -> usize {
        match self.kernel {
            Int8Kernel::Amx => amx::ROWS,
            _ => ROWS_PER_TILE,
        }
    }

    fn panels_per_tile(&self) -> usize {
        match self.kernel {
            Int8Kernel::Amx => amx::PANELS,
            _ => PANELS_PER_TILE,
        }
    }

    fn forward_rows(&self, x: &[f32], out: &mut [f32]) {
        let quantized = quantize_rows_for(self.kernel, x, self.inputs, self.weights.depth);
        let rows = quantized.scales.len();
        let panels = self.outputs.div_ceil(LANES);
        #[cfg(target_arch = "x86_64")]
        let _tiles = (self.kernel == Int8Kernel::Amx).then(amx::TileConfig::load);
        for_each_tile(
            rows,
            panels,
            self.rows_per_tile(),
            self.panels_per_tile(),
            |at| {
                let tile = Tile {
                    rows: &quantized,
                    at,
                    out: out[at.first_row * self.outputs + at.first_panel * LANES..].as_mut_ptr(),
                    out_stride: self.outputs,
                    columns: (self.outputs - at.first_panel * LANES).min(at.panels * LANES),
                };
                self.compute(&tile);
            },
        );
    }

    fn compute(&self, tile: &Tile) {
        match self.kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AMX was detected and lent to this process, the tile
            // configuration is loaded on this thread (`forward_rows`), and the
            // quantized rows are padded to whole tiles.
            Int8Kernel::Amx => unsafe { x86::amx_tile(self, tile) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the kernel was chosen by detecting its CPU features; the
            // tile lies inside `out` and the quantized rows (built above).
            Int8Kernel::Vnni => unsafe { x86::vnni_tile(self, tile) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Int8Kernel::Avx2 => unsafe { x86::avx2_tile(self, tile) },
            _ => self.portable_tile(tile),
        }
    }

    /// Reference kernel: the same sums with plain loops.
    fn portable_tile(&self, tile: &Tile) {
        let depth = self.weights.depth;
        for r in 0..tile.at.rows {
            let row = tile.at.first_row + r;
            let a = &tile.rows.values[row * depth..][..depth];
            for c in 0..tile.columns {
                let column = tile.at.first_panel * LANES + c;
                let sum: i32 = a
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| i32::from(v) * i32::from(self.weights.get(column, i)))
                    .sum();
                let value = self.rescale(sum, tile.rows, row, column);
                // SAFETY: row `r` and column `c` of the tile are inside `out`.
                unsafe { *tile.out.add(r * tile.out_stride + c) = value };
            }
        }
    }

    #[inline]
    fn rescale(&self, sum: i32, rows: &QuantizedRows, row: usize, column: usize) -> f32 {
        sum as f32 * (rows.scales[row] * self.scales[column])
            + rows.offsets[row] * self.offset_weights[column]
            + self.bias[column]
    }
}

/// max |v| / 127, or 1 for an all-zero vector (any scale gives zeros then).
fn symmetric_scale(values: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = values.chunks_exact(16);
    for chunk in &mut chunks {
        for (m, v) in lanes.iter_mut().zip(chunk) {
            *m = m.max(v.abs());
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .fold(lanes.into_iter().fold(0f32, f32::max), |m, v| {
            m.max(v.abs())
        });
    if max > 0.0 && max.is_finite() {
        max / 127.0
    } else {
        1.0
    }
}

/// Round to nearest, in [-127, 127]. Written without `f32::round` so that it
/// vectorizes on the x86-64 baseline (which has no rounding instruction).
#[inline]
fn quantize(value: f32, inverse_scale: f32) -> i8 {
    let scaled = value * inverse_scale;
    (scaled + 0.5f32.copysign(scaled)).clamp(-127.0, 127.0) as i8
}

/// [`quantize_rows`] compiled for the vector width of `kernel`'s CPU.
fn quantize_rows_for(kernel: Int8Kernel, x: &[f32], inputs: usize, depth: usize) -> QuantizedRows {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: these kernels are only chosen on CPUs with AVX-512 F/BW.
        Int8Kernel::Amx | Int8Kernel::Vnni => unsafe {
            x86::quantize_rows_avx512(x, inputs, depth)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: this kernel is only chosen on CPUs with AVX2.
        Int8Kernel::Avx2 => unsafe { x86::quantize_rows_avx2(x, inputs, depth) },
        _ => quantize_rows(x, inputs, depth),
    }
}

/// Each row to u8 codes over its own [min, max]; the codes are padded with
/// zero rows to whole AMX tiles.
#[inline(always)]
fn quantize_rows(x: &[f32], inputs: usize, depth: usize) -> QuantizedRows {
    quantize_rows_with(x, inputs, depth, |row, out| {
        let (min, max) = range(row);
        let (scale, offset) = row_code(min, max);
        let inverse = 1.0 / scale;
        for (q, &v) in out.iter_mut().zip(row) {
            // Non-negative, so adding one half and truncating rounds to nearest.
            *q = ((v - offset) * inverse + 0.5).clamp(0.0, 255.0) as u8;
        }
        (scale, offset)
    })
}

/// Codes every row with `code_row(row, codes) -> (scale, offset)`, into a
/// buffer padded with zero rows to whole AMX tiles.
#[inline(always)]
fn quantize_rows_with(
    x: &[f32],
    inputs: usize,
    depth: usize,
    mut code_row: impl FnMut(&[f32], &mut [u8]) -> (f32, f32),
) -> QuantizedRows {
    let rows = x.len() / inputs;
    let mut values = vec![0u8; rows.next_multiple_of(PADDED_ROWS) * depth];
    let mut scales = Vec::with_capacity(rows);
    let mut offsets = Vec::with_capacity(rows);
    for (row, out) in x.chunks_exact(inputs).zip(values.chunks_exact_mut(depth)) {
        let (scale, offset) = code_row(row, out);
        scales.push(scale);
        offsets.push(offset);
    }
    QuantizedRows {
        values,
        scales,
        offsets,
    }
}

/// The step and offset of a row's codes from its range: 255 steps from the
/// minimum (code 0) to the maximum.
fn row_code(min: f32, max: f32) -> (f32, f32) {
    let scale = if max > min && (max - min).is_finite() {
        (max - min) / 255.0
    } else {
        1.0
    };
    (scale, if min.is_finite() { min } else { 0.0 })
}

/// Smallest and largest value, with lanes the compiler can vectorize.
#[inline(always)]
fn range(values: &[f32]) -> (f32, f32) {
    let (mut low, mut high) = ([f32::INFINITY; 16], [f32::NEG_INFINITY; 16]);
    let mut chunks = values.chunks_exact(16);
    for chunk in &mut chunks {
        // Comparisons rather than f32::min/max, whose NaN rules keep the
        // compiler from using vector min/max instructions.
        for ((l, h), &v) in low.iter_mut().zip(high.iter_mut()).zip(chunk) {
            *l = if v < *l { v } else { *l };
            *h = if v > *h { v } else { *h };
        }
    }
    let tail = chunks.remainder().iter();
    let min = tail
        .clone()
        .fold(low.into_iter().fold(f32::INFINITY, f32::min), |m, &v| {
            m.min(v)
        });
    let max = tail.fold(
        high.into_iter().fold(f32::NEG_INFINITY, f32::max),
        |m, &v| m.max(v),
    );
    (min, max)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The SIMD kernels. Const generics give the compiler fixed register
    //! counts for each tile shape.

    use std::arch::x86_64::*;

    use super::{
        super::amx, lane_mask, quantize_rows, Int8Dense, QuantizedRows, Tile, TileAt, GROUP, LANES,
    };

    /// [`quantize_rows`] with AVX-512: the same arithmetic (so the same codes),
    /// 16 values at a time.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) fn quantize_rows_avx512(x: &[f32], inputs: usize, depth: usize) -> QuantizedRows {
        // The closure has this function's target features, so it calls the
        // AVX-512 helpers directly.
        super::quantize_rows_with(x, inputs, depth, |row, out| {
            let (min, max) = range_avx512(row);
            let (scale, offset) = super::row_code(min, max);
            codes_avx512(row, offset, 1.0 / scale, out);
            (scale, offset)
        })
    }

    #[target_feature(enable = "avx512f")]
    fn range_avx512(row: &[f32]) -> (f32, f32) {
        let mut low = _mm512_set1_ps(f32::INFINITY);
        let mut high = _mm512_set1_ps(f32::NEG_INFINITY);
        for start in (0..row.len()).step_by(LANES) {
            let mask = lane_mask(row.len() - start);
            // SAFETY: the mask reads only the values of `row` from `start`.
            let v = unsafe { _mm512_maskz_loadu_ps(mask, row.as_ptr().add(start)) };
            low = _mm512_mask_min_ps(low, mask, low, v);
            high = _mm512_mask_max_ps(high, mask, high, v);
        }
        (_mm512_reduce_min_ps(low), _mm512_reduce_max_ps(high))
    }

    /// Writes the codes of `row` into the first `row.len()` bytes of `out`.
    #[target_feature(enable = "avx512f,avx512bw")]
    fn codes_avx512(row: &[f32], offset: f32, inverse: f32, out: &mut [u8]) {
        let out = &mut out[..row.len()];
        let (offset, inverse, half) = (
            _mm512_set1_ps(offset),
            _mm512_set1_ps(inverse),
            _mm512_set1_ps(0.5),
        );
        let (zero, top) = (_mm512_setzero_ps(), _mm512_set1_ps(255.0));
        for start in (0..row.len()).step_by(LANES) {
            let mask = lane_mask(row.len() - start);
            // SAFETY: the mask reads only the values of `row` from `start`.
            let v = unsafe { _mm512_maskz_loadu_ps(mask, row.as_ptr().add(start)) };
            let scaled = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(v, offset), inverse), half);
            let clamped = _mm512_min_ps(_mm512_max_ps(scaled, zero), top);
            let codes = _mm512_cvttps_epi32(clamped);
            // SAFETY: `out` is as long as `row`; the mask writes only its bytes
            // from `start`.
            unsafe {
                _mm512_mask_cvtusepi32_storeu_epi8(out.as_mut_ptr().add(start).cast(), mask, codes);
            }
        }
    }

    /// The same for AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) fn quantize_rows_avx2(x: &[f32], inputs: usize, depth: usize) -> QuantizedRows {
        quantize_rows(x, inputs, depth)
    }

    /// # Safety
    /// AMX is usable and its configuration loaded on this thread; the input
    /// rows are padded to whole tiles; the tile lies inside the output.
    pub(super) unsafe fn amx_tile(layer: &Int8Dense, tile: &Tile) {
        let operands = amx::Operands::of(
            &tile.rows.values,
            tile.at.first_row,
            &layer.weights,
            tile.at.first_panel,
        );
        // SAFETY: the caller's contract: AMX is configured on this thread,
        // and the operands cover whole tiles of padded rows.
        let sums =
            unsafe { amx::multiply(amx::Product::Int8, &operands, tile.at.rows, tile.at.panels) };
        // SAFETY: AMX is only usable where AVX-512F is; the tile lies inside
        // the output (the caller's contract).
        unsafe { rescale_rows(layer, tile, &sums, tile.at.panels) };
    }

    /// Writes the tile's valid rows and columns from the i32 sums of each panel.
    /// `sums[2 * row_tile + panel]` holds a 16 x 16 accumulator tile.
    ///
    /// # Safety
    /// The tile lies inside `tile.out`.
    #[target_feature(enable = "avx512f")]
    unsafe fn rescale_rows(layer: &Int8Dense, tile: &Tile, sums: &amx::Sums, panels: usize) {
        for r in 0..tile.at.rows {
            for p in 0..panels {
                let panel = &sums[2 * (r / amx::TILE_ROWS) + p];
                // SAFETY: an accumulator tile row holds 16 sums.
                let acc = unsafe {
                    _mm512_loadu_si512(panel[(r % amx::TILE_ROWS) * LANES..].as_ptr().cast())
                };
                // SAFETY: row `r` of the tile lies inside `out` (the caller's
                // contract).
                unsafe { store_rescaled(layer, tile, r, p, acc) };
            }
        }
    }

    /// Writes one row's 16 columns of panel `p` from their i32 sums: the row's
    /// and the columns' scales, the zero-point correction and the bias, masked
    /// to the valid columns. Shared by the AMX and VNNI kernels.
    ///
    /// # Safety
    /// Row `r` of the tile lies inside `tile.out`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store_rescaled(layer: &Int8Dense, tile: &Tile, r: usize, p: usize, acc: __m512i) {
        let row = tile.at.first_row + r;
        let c = p * LANES;
        let column = tile.at.first_panel * LANES + c;
        // SAFETY: the per-column values are padded to whole panels.
        let (scales, offset_weights, bias) = unsafe {
            (
                _mm512_loadu_ps(layer.scales.as_ptr().add(column)),
                _mm512_loadu_ps(layer.offset_weights.as_ptr().add(column)),
                _mm512_loadu_ps(layer.bias.as_ptr().add(column)),
            )
        };
        let scale = _mm512_mul_ps(_mm512_set1_ps(tile.rows.scales[row]), scales);
        let shifted = _mm512_fmadd_ps(_mm512_set1_ps(tile.rows.offsets[row]), offset_weights, bias);
        let value = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), scale, shifted);
        let mask = lane_mask(tile.columns - c);
        // SAFETY: row `r` of the tile lies inside `out` (the caller's
        // contract); the mask writes only the tile's columns of panel `p`.
        unsafe { _mm512_mask_storeu_ps(tile.out.add(r * tile.out_stride + c), mask, value) };
    }

    /// # Safety
    /// The CPU has AVX-512 F/BW/VNNI; the tile lies inside its buffers.
    pub(super) unsafe fn vnni_tile(layer: &Int8Dense, tile: &Tile) {
        // SAFETY: the caller's contract, passed on to the kernel.
        unsafe { crate::nn::tiling::with_tile_shape!(vnni, layer, tile) }
    }

    /// # Safety
    /// The tile lies inside `tile.rows`, `tile.out` and the layer's panels.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn vnni<const R: usize, const P: usize>(layer: &Int8Dense, tile: &Tile) {
        let depth = layer.weights.depth;
        // SAFETY: the tile's first row is a row of the quantized inputs.
        let a = unsafe { tile.rows.values.as_ptr().add(tile.at.first_row * depth) };
        let w = layer.weights.panel(tile.at.first_panel);
        let mut acc = [[_mm512_setzero_si512(); P]; R];
        for step in 0..depth / GROUP {
            let mut weights = [_mm512_setzero_si512(); P];
            for (p, weight) in weights.iter_mut().enumerate() {
                // SAFETY: panel `p` of the tile holds `depth / GROUP` steps of
                // 16 groups of 4 weights.
                *weight =
                    unsafe { _mm512_loadu_si512(w.add((p * depth + step * GROUP) * LANES).cast()) };
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row `r` of the tile has `depth` codes, the group at
                // `step` among them.
                let bytes = unsafe {
                    a.add(r * depth + step * GROUP)
                        .cast::<i32>()
                        .read_unaligned()
                };
                let inputs = _mm512_set1_epi32(bytes);
                for (acc, weight) in acc.iter_mut().zip(&weights) {
                    *acc = _mm512_dpbusd_epi32(*acc, inputs, *weight);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (p, acc) in acc.iter().enumerate() {
                // SAFETY: row `r` of the tile lies inside `out` (the caller's
                // contract).
                unsafe { store_rescaled(layer, tile, r, p, *acc) };
            }
        }
    }

    /// # Safety
    /// The CPU has AVX2; the tile lies inside its buffers.
    pub(super) unsafe fn avx2_tile(layer: &Int8Dense, tile: &Tile) {
        for p in 0..tile.at.panels {
            for r in (0..tile.at.rows).step_by(2) {
                let part = Tile {
                    rows: tile.rows,
                    at: TileAt {
                        first_row: tile.at.first_row + r,
                        rows: (tile.at.rows - r).min(2),
                        first_panel: tile.at.first_panel + p,
                        panels: 1,
                    },
                    // SAFETY: row `r` and panel `p` of the tile lie inside `out`.
                    out: unsafe { tile.out.add(r * tile.out_stride + p * LANES) },
                    out_stride: tile.out_stride,
                    columns: (tile.columns - p * LANES).min(LANES),
                };
                // SAFETY: the caller's contract: the CPU has AVX2, and the
                // part lies inside the tile.
                unsafe {
                    match part.at.rows {
                        2 => avx2::<2>(layer, &part),
                        _ => avx2::<1>(layer, &part),
                    }
                }
            }
        }
    }

    /// One panel, R rows. Each 16-byte load holds 4 columns x 4 inputs;
    /// widened to i16 and multiplied with the row's 4 inputs repeated, vpmaddwd
    /// leaves 2 partial sums per column, added at the end.
    ///
    /// # Safety
    /// The tile (one panel) lies inside `tile.rows`, `tile.out` and the
    /// layer's panels.
    #[target_feature(enable = "avx2")]
    unsafe fn avx2<const R: usize>(layer: &Int8Dense, tile: &Tile) {
        let depth = layer.weights.depth;
        // SAFETY: the tile's first row is a row of the quantized inputs.
        let a = unsafe { tile.rows.values.as_ptr().add(tile.at.first_row * depth) };
        let w = layer.weights.panel(tile.at.first_panel);
        let mut acc = [[_mm256_setzero_si256(); 4]; R];
        for step in 0..depth / GROUP {
            let mut inputs = [_mm256_setzero_si256(); R];
            for (r, input) in inputs.iter_mut().enumerate() {
                // SAFETY: row `r` of the tile has `depth` codes, the group at
                // `step` among them.
                let bytes = unsafe {
                    a.add(r * depth + step * GROUP)
                        .cast::<i32>()
                        .read_unaligned()
                };
                *input = _mm256_cvtepu8_epi16(_mm_set1_epi32(bytes));
            }
            for quad in 0..4 {
                // SAFETY: the panel holds `depth / GROUP` steps of 64 weights.
                let bytes =
                    unsafe { _mm_loadu_si128(w.add(step * GROUP * LANES + quad * 16).cast()) };
                let weight = _mm256_cvtepi8_epi16(bytes);
                for (acc, input) in acc.iter_mut().zip(&inputs) {
                    acc[quad] = _mm256_add_epi32(acc[quad], _mm256_madd_epi16(weight, *input));
                }
            }
        }
        let first_column = tile.at.first_panel * LANES;
        for (r, acc) in acc.iter().enumerate() {
            let mut partial = [0i32; 2 * LANES];
            for (quad, value) in acc.iter().enumerate() {
                // SAFETY: `partial` holds 4 quads of 8 sums.
                unsafe { _mm256_storeu_si256(partial[quad * 8..].as_mut_ptr().cast(), *value) };
            }
            let row = tile.at.first_row + r;
            for c in 0..tile.columns {
                let sum = partial[2 * c] + partial[2 * c + 1];
                let value = layer.rescale(sum, tile.rows, row, first_column + c);
                // SAFETY: row `r` and column `c` of the tile lie inside `out`.
                unsafe { *tile.out.add(r * tile.out_stride + c) = value };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer with varied weights, including an all-zero output channel and
    /// sizes that are not multiples of the panel or group widths.
    fn layer(inputs: usize, outputs: usize) -> Dense {
        let weight = (0..inputs * outputs)
            .map(|i| {
                if i / inputs == 3 {
                    0.0
                } else {
                    ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 13) as f32)
                }
            })
            .collect();
        let bias = (0..outputs).map(|o| o as f32 * 0.01 - 0.2).collect();
        Dense {
            weight,
            bias,
            inputs,
            outputs,
        }
    }

    fn activations(rows: usize, inputs: usize) -> Vec<f32> {
        (0..rows * inputs)
            .map(|i| {
                ((i * 104_729 % 997) as f32 / 498.5 - 1.0) * if i % 31 == 0 { 8.0 } else { 1.0 }
            })
            .collect()
    }

    fn kernels() -> Vec<Int8Kernel> {
        let mut kernels = vec![Int8Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") {
                kernels.push(Int8Kernel::Avx2);
            }
            if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512bw") {
                kernels.push(Int8Kernel::Vnni);
            }
            if Int8Kernel::detect() == Int8Kernel::Amx {
                kernels.push(Int8Kernel::Amx);
            }
        }
        kernels
    }

    #[test]
    fn every_kernel_gives_the_portable_result() {
        // Integer sums are exact, so kernels differ only in how the f32
        // rescaling is rounded (fused multiply-adds or not): 1e-5 of the
        // layer's largest output.
        for (inputs, outputs, rows) in [(384, 1152, 26), (37, 50, 9), (1536, 384, 3), (8, 16, 1)] {
            let dense = layer(inputs, outputs);
            let x = activations(rows, inputs);
            let reference = Int8Dense::with_kernel(&dense, Int8Kernel::Portable).forward(&x, 1);
            let largest = reference.iter().fold(1f32, |m, v| m.max(v.abs()));
            for kernel in kernels() {
                for threads in [1, 2] {
                    let ours = Int8Dense::with_kernel(&dense, kernel).forward(&x, threads);
                    assert_eq!(ours.len(), reference.len());
                    for (i, (a, b)) in ours.iter().zip(&reference).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-5 * largest,
                            "{kernel:?} {inputs}x{outputs} rows {rows} threads {threads} at {i}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn quantized_products_stay_within_the_rounding_bound() {
        // With steps s (a row's inputs) and t (a column's weights), each term
        // x w is off by at most |x| t/2 + (|w| + t/2) s/2.
        let (inputs, outputs, rows) = (384, 64, 5);
        let dense = layer(inputs, outputs);
        let x = activations(rows, inputs);
        let exact = dense.forward(&x, 1);
        let quantized = Int8Dense::from_dense(&dense).forward(&x, 1);
        for (r, row) in x.chunks_exact(inputs).enumerate() {
            let (min, max) = range(row);
            let s = (max - min) / 255.0;
            for (o, w) in dense.weight.chunks_exact(inputs).enumerate() {
                let t = symmetric_scale(w);
                let bound: f32 = row
                    .iter()
                    .zip(w)
                    .map(|(x, w)| x.abs() * t / 2.0 + (w.abs() + t / 2.0) * s / 2.0)
                    .sum();
                let (a, b) = (quantized[r * outputs + o], exact[r * outputs + o]);
                assert!(
                    (a - b).abs() <= bound * 1.001 + 1e-4,
                    "{a} vs {b}, bound {bound}"
                );
            }
        }
    }

    #[test]
    fn zero_rows_give_the_bias() {
        let dense = layer(20, 17);
        let out = Int8Dense::from_dense(&dense).forward(&[0.0; 2 * 20], 2);
        assert_eq!(&out[..17], &dense.bias[..]);
        assert_eq!(&out[17..], &dense.bias[..]);
    }

    #[test]
    fn quantize_rounds_to_nearest_and_saturates() {
        assert_eq!(quantize(0.49, 1.0), 0);
        assert_eq!(quantize(0.5, 1.0), 1);
        assert_eq!(quantize(-0.5, 1.0), -1);
        assert_eq!(quantize(-2.6, 1.0), -3);
        assert_eq!(quantize(500.0, 1.0), 127);
        assert_eq!(quantize(-500.0, 1.0), -127);
        assert_eq!(symmetric_scale(&[0.0; 5]), 1.0);
        assert_eq!(symmetric_scale(&[1.0, -254.0, 3.0]), 2.0);
        let row: Vec<f32> = (0..40).map(|i| i as f32 - 7.0).collect();
        assert_eq!(range(&row), (-7.0, 32.0));
        let codes = quantize_rows(&row, 40, 40);
        assert_eq!((codes.values[0], codes.values[39]), (0, 255));
        assert_eq!(codes.offsets[0], -7.0);
    }
}
