//! Numeric building blocks shared by backbones and heads, on plain `f32`
//! slices: a dense layer, layer normalization, softmax and activations.
//!
//! Backbones use them inside their forward passes (the native BERT engine), heads
//! to classify feature vectors; neither imports the other for them. Tensor
//! names and layouts follow PyTorch (`[out, in]` weights, row-major).

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use gemm::Parallelism;

use crate::config::Precision;

mod amx;
pub mod bf16;
pub mod gelu_op;
pub mod int8;
pub mod packed;
pub mod rng;
pub mod shared_out;
mod tiling;

/// A dense layer: `y = x W^T + b` with `weight` `[outputs, inputs]`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Dense {
    /// `[outputs, inputs]`, row-major.
    pub weight: Vec<f32>,
    /// One value per output.
    pub bias: Vec<f32>,
    /// Length of an input vector.
    pub inputs: usize,
    /// Length of an output vector.
    pub outputs: usize,
}

impl Dense {
    /// Reads `weight` (`[outputs, inputs]`) and `bias` under `vb`'s prefix.
    pub fn load(vb: &VarBuilder, inputs: usize, outputs: usize) -> candle_core::Result<Self> {
        Ok(Self {
            weight: flat(vb.get((outputs, inputs), "weight")?)?,
            bias: flat(vb.get(outputs, "bias")?)?,
            inputs,
            outputs,
        })
    }

    /// Stacks layers with the same input along the output dimension: one
    /// product computes all of them.
    pub fn concat(parts: Vec<Dense>) -> Self {
        let inputs = parts[0].inputs;
        let outputs = parts.iter().map(|p| p.outputs).sum();
        let mut weight = Vec::with_capacity(inputs * outputs);
        let mut bias = Vec::with_capacity(outputs);
        for part in parts {
            debug_assert_eq!(part.inputs, inputs);
            weight.extend(part.weight);
            bias.extend(part.bias);
        }
        Self {
            weight,
            bias,
            inputs,
            outputs,
        }
    }

    /// One vector through the layer, with plain loops (a head on one input).
    #[inline]
    pub fn apply(&self, x: &[f32]) -> Vec<f32> {
        self.weight
            .chunks_exact(self.inputs)
            .zip(&self.bias)
            .map(|(row, b)| row.iter().zip(x).map(|(w, v)| w * v).sum::<f32>() + b)
            .collect()
    }

    /// Many vectors through the layer as one matrix product on `threads`
    /// threads: `x` is `[tokens, inputs]`, the result `[tokens, outputs]`.
    pub fn forward(&self, x: &[f32], threads: usize) -> Vec<f32> {
        let tokens = x.len() / self.inputs;
        let mut out = Vec::with_capacity(tokens * self.outputs);
        for _ in 0..tokens {
            out.extend_from_slice(&self.bias);
        }
        // SAFETY: the pointers cover exactly the matrices described by the
        // sizes and strides: `x` is [tokens, inputs] row-major, the weight
        // [outputs, inputs] row-major read as its transpose [inputs, outputs]
        // (row stride 1, column stride `inputs`), `out` [tokens, outputs].
        unsafe {
            gemm::gemm(
                tokens,
                self.outputs,
                self.inputs,
                out.as_mut_ptr(),
                1,
                self.outputs as isize,
                true,
                x.as_ptr(),
                1,
                self.inputs as isize,
                self.weight.as_ptr(),
                self.inputs as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism(threads),
            );
        }
        out
    }
}

/// A dense layer in the number format its backbone is configured for.
#[derive(Debug, Clone)]
pub enum Linear {
    F32(Dense),
    /// f32 on weights packed at load (CPUs with AVX2 + FMA or AVX-512).
    F32Packed(packed::PackedDense),
    Bf16(bf16::Bf16Dense),
    Int8(int8::Int8Dense),
}

/// What `auto` means on this CPU: bf16 where AMX-BF16 runs it, else f32.
pub fn resolve_precision(precision: Precision) -> Precision {
    match precision {
        Precision::Auto if bf16::Bf16Kernel::detect() == bf16::Bf16Kernel::Amx => Precision::Bf16,
        Precision::Auto => Precision::F32,
        other => other,
    }
}

impl Linear {
    /// Converts `dense` to `precision` (once, at load time).
    pub fn new(dense: Dense, precision: Precision) -> Self {
        match resolve_precision(precision) {
            // f16 is refused before the native engine loads (it is the candle
            // engine's format), and quantized weights are kept by the decoder
            // engine itself, never given here; f32 is the nearest this has.
            Precision::Auto | Precision::F32 | Precision::F16 | Precision::Quantized => {
                match packed::F32Kernel::detect() {
                    Some(kernel) => {
                        Self::F32Packed(packed::PackedDense::with_kernel(&dense, kernel))
                    }
                    None => Self::F32(dense),
                }
            }
            Precision::Bf16 => Self::Bf16(bf16::Bf16Dense::from_dense(&dense)),
            Precision::Int8 => Self::Int8(int8::Int8Dense::from_dense(&dense)),
        }
    }

    /// `x` is `[rows, inputs]`, the result `[rows, outputs]`.
    pub fn forward(&self, x: &[f32], threads: usize) -> Vec<f32> {
        match self {
            Self::F32(dense) => dense.forward(x, threads),
            Self::F32Packed(dense) => dense.forward(x, threads),
            Self::Bf16(dense) => dense.forward(x, threads),
            Self::Int8(dense) => dense.forward(x, threads),
        }
    }
}

/// A matrix read in place inside a larger buffer: element `(i, j)` is at
/// `ptr + i * row + j * column` (a transpose swaps the two strides).
#[derive(Debug, Clone, Copy)]
pub struct Strided {
    pub ptr: *const f32,
    pub row: isize,
    pub column: isize,
}

impl Strided {
    /// Rows of `stride` values starting at `ptr`, read as they lie.
    pub fn rows(ptr: *const f32, stride: usize) -> Self {
        Self {
            ptr,
            row: stride as isize,
            column: 1,
        }
    }

    /// The same rows read as the transposed matrix.
    pub fn transposed(self) -> Self {
        Self {
            row: self.column,
            column: self.row,
            ..self
        }
    }
}

/// `out = scale * lhs rhs` on the calling thread (attention's per-head
/// products): `lhs` is `[m, k]`, `rhs` `[k, n]`, `out` `[m, n]` with rows
/// `out_stride` apart; what `out` held is overwritten.
///
/// # Safety
/// The three views must lie inside live buffers for the shapes given, and
/// no other thread may write the part of `out` they cover.
pub unsafe fn product_into(
    (m, n, k): (usize, usize, usize),
    (out, out_stride): (*mut f32, usize),
    lhs: Strided,
    rhs: Strided,
    scale: f32,
) {
    // SAFETY: the caller's guarantee, passed on.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
            1,
            out_stride as isize,
            false,
            lhs.ptr,
            lhs.column,
            lhs.row,
            rhs.ptr,
            rhs.column,
            rhs.row,
            0.0,
            scale,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// One attention head: `out = softmax(scale * Q K^T) V` for `rows` queries
/// against `keys` keys of width `d`, on the calling thread. `causal_from`:
/// the first query's position among the keys; query `i` then sees keys
/// `0..=causal_from + i` only (decoders). `None`: every query sees every key.
///
/// # Safety
/// As [`product_into`]: Q is `rows` rows, K and V `keys` rows of `d` values,
/// `out` `rows` rows of `d` values `out.1` apart, all inside live buffers, and
/// no other thread writes that part of `out`.
pub unsafe fn attend_head(
    (q, k, v): (Strided, Strided, Strided),
    (rows, keys, d): (usize, usize, usize),
    out: (*mut f32, usize),
    scale: f32,
    causal_from: Option<usize>,
) {
    let mut scores = vec![0f32; rows * keys];
    // SAFETY: the caller's guarantee; `scores` is [rows, keys] row-major and
    // K is read as its transpose [d, keys].
    unsafe {
        product_into(
            (rows, keys, d),
            (scores.as_mut_ptr(), keys),
            q,
            k.transposed(),
            scale,
        )
    };
    for (i, row) in scores.chunks_exact_mut(keys).enumerate() {
        let seen = causal_from.map_or(keys, |first| first + i + 1);
        softmax_in_place(&mut row[..seen]);
        row[seen..].fill(0.0);
    }
    // SAFETY: the caller's guarantee for V and `out`.
    unsafe {
        product_into(
            (rows, d, keys),
            out,
            Strided::rows(scores.as_ptr(), keys),
            v,
            1.0,
        )
    };
}

fn parallelism(threads: usize) -> Parallelism {
    if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// Layer normalization over one vector, with a learned scale and shift.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerNorm {
    /// Scale, one value per element.
    pub gamma: Vec<f32>,
    /// Shift, one value per element.
    pub beta: Vec<f32>,
    /// Added to the variance.
    pub eps: f32,
}

impl LayerNorm {
    /// Reads `weight` (gamma) and `bias` (beta) of `size` under `vb`'s prefix.
    pub fn load(vb: &VarBuilder, size: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            gamma: flat(vb.get(size, "weight")?)?,
            beta: flat(vb.get(size, "bias")?)?,
            eps: eps as f32,
        })
    }

    /// `row = norm(row + residual)`, in place; statistics in f64 as the rows
    /// are short and this keeps the result independent of summation order.
    #[inline]
    pub fn apply(&self, row: &mut [f32], residual: Option<&[f32]>) {
        if let Some(residual) = residual {
            row.iter_mut().zip(residual).for_each(|(x, r)| *x += r);
        }
        let n = row.len() as f64;
        let mean = row.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = row
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        let inv = 1.0 / (var + f64::from(self.eps)).sqrt();
        for ((x, g), b) in row.iter_mut().zip(&self.gamma).zip(&self.beta) {
            *x = ((f64::from(*x) - mean) * inv) as f32 * g + b;
        }
    }
}

/// A tensor's values as f32, flattened (row-major).
pub fn flat(tensor: Tensor) -> candle_core::Result<Vec<f32>> {
    tensor.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

/// Scales to unit length; a zero vector stays zero (as torch's normalize
/// with eps). What `normalize = true` does to every backbone's features.
pub fn l2_normalize(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 1e-12 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// Numerically stable softmax into a new vector; each value is divided by the
/// sum (what heads report as probabilities).
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Numerically stable softmax in place, in one pass plus a scaling by the
/// sum's reciprocal (attention rows; may differ from [`softmax`] in the last
/// bit).
#[inline]
pub fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// `max(x, 0)`.
#[inline(always)]
pub fn relu(x: f32) -> f32 {
    x.max(0.0)
}

/// GELU with the error function, as BERT's `gelu` activation (not the tanh
/// approximation): `x * (1 + erf(x / sqrt(2))) / 2`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// erf as a rational function, accurate to a few float32 ulps: the
/// approximation Eigen and XLA use for float. Unlike a libm call it is plain
/// arithmetic without branches, so loops over it vectorize. Beyond |x| = 4,
/// erf(x) is +-1 in float32.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_6e-3;
    p = x2 * p + -1.609_603_3e-2;
    p *= x;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329e-3;
    q = x2 * q + -1.426_474e-2;
    p / q
}

/// [`gelu`] over a slice, in place; with AVX2 and FMA where the CPU has them
/// (the default x86-64 target only assumes SSE2, so the compiler needs the hint).
pub fn gelu_in_place(values: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function is compiled for.
        unsafe { gelu_avx2(values) };
        return;
    }
    values.iter_mut().for_each(|v| *v = gelu(*v));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gelu_avx2(values: &mut [f32]) {
    values.iter_mut().for_each(|v| *v = gelu(*v));
}

#[cfg(test)]
mod tests {
    #[test]
    fn normalize_gives_unit_length_and_keeps_zero() {
        let v = super::l2_normalize(vec![3.0, 4.0]);
        assert!((v[0] - 0.6).abs() < 1e-7 && (v[1] - 0.8).abs() < 1e-7);
        assert_eq!(super::l2_normalize(vec![0.0, 0.0]), vec![0.0, 0.0]);
    }

    use super::*;

    #[test]
    fn softmax_survives_large_logits() {
        let p = softmax(&[1000.0, 1000.0]);
        assert_eq!(p, vec![0.5, 0.5]);
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut row = vec![1.0, 3.0, 2.0, -1e9];
        softmax_in_place(&mut row);
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(row[1] > row[2] && row[2] > row[0] && row[3] == 0.0);
    }

    #[test]
    fn gelu_matches_known_values() {
        // GELU(x) = x * Phi(x): Phi(1) = 0.841345, Phi(-1) = 0.158655.
        assert!((gelu(1.0) - 0.841_345).abs() < 1e-6);
        assert!((gelu(-1.0) + 0.158_655).abs() < 1e-6);
        assert_eq!(gelu(0.0), 0.0);
    }

    /// Against candle's erf (a float64 evaluation) on a fine grid, and the
    /// slice version (vectorized) against the scalar one.
    #[test]
    fn erf_approximation_is_accurate() {
        let mut worst = 0f32;
        let grid: Vec<f32> = (-8000..=8000).map(|i| i as f32 * 1e-3).collect();
        for &x in &grid {
            let exact = candle_core::cpu::erf::erf_f64(f64::from(x)) as f32;
            worst = worst.max((erf(x) - exact).abs());
        }
        // A few float32 ulps (3.6e-7 measured; the ulp below 1 is 6e-8).
        assert!(worst < 5e-7, "largest error {worst}");
        let mut values = grid.clone();
        gelu_in_place(&mut values);
        for (x, v) in grid.iter().zip(&values) {
            assert!((gelu(*x) - v).abs() <= 1e-6 * v.abs().max(1.0));
        }
    }

    #[test]
    fn dense_matches_a_plain_loop() {
        let (inputs, outputs, tokens) = (5, 3, 4);
        let dense = Dense {
            weight: (0..inputs * outputs)
                .map(|i| (i as f32 * 0.37).sin())
                .collect(),
            bias: vec![0.5, -0.25, 1.0],
            inputs,
            outputs,
        };
        let x: Vec<f32> = (0..tokens * inputs)
            .map(|i| (i as f32 * 0.11).cos())
            .collect();
        for threads in [1, 2] {
            let y = dense.forward(&x, threads);
            for t in 0..tokens {
                for o in 0..outputs {
                    let expected = dense.bias[o]
                        + (0..inputs)
                            .map(|i| x[t * inputs + i] * dense.weight[o * inputs + i])
                            .sum::<f32>();
                    assert!((y[t * outputs + o] - expected).abs() < 1e-5);
                }
            }
        }
    }
}
