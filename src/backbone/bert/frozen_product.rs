//! A frozen dense layer's product `x·Wᵀ + b` on the serving engine's packed
//! CPU kernels, as a candle operation whose backward pass gives the input's
//! gradient (`grad·W`, on a second packing of W). Fine-tuning trains adapters
//! beside frozen weights, so the weights never need a gradient; the packed
//! kernels (AVX-512 where the CPU has it) run these products several times
//! faster than candle's generic ones, which on stable Rust stop at AVX2
//! (docs/PERFORMANCE.md, "Fine-tuning").

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::{
    config::Precision,
    nn::{Dense, Linear},
};

/// `x·Wᵀ + b` for `x` `[tokens, inputs]`, f32 on the CPU.
pub struct FrozenProduct {
    forward: Linear,
    /// `Wᵀ` without bias: the input's gradient is `grad·W`.
    backward: Arc<Linear>,
    inputs: usize,
    outputs: usize,
}

impl FrozenProduct {
    /// Packs `weight` (`[outputs, inputs]`) and `bias` (`[outputs]`).
    pub fn new(weight: &Tensor, bias: &Tensor) -> candle_core::Result<Self> {
        let (outputs, inputs) = weight.dims2()?;
        let values: Vec<f32> = weight.flatten_all()?.to_vec1()?;
        let mut transposed = vec![0f32; values.len()];
        for (o, row) in values.chunks_exact(inputs).enumerate() {
            for (i, &w) in row.iter().enumerate() {
                transposed[i * outputs + o] = w;
            }
        }
        let dense = |weight, bias, inputs, outputs| Dense {
            weight,
            bias,
            inputs,
            outputs,
        };
        Ok(Self {
            forward: Linear::new(
                dense(values, bias.to_vec1()?, inputs, outputs),
                Precision::F32,
            ),
            backward: Arc::new(Linear::new(
                dense(transposed, vec![0.0; inputs], outputs, inputs),
                Precision::F32,
            )),
            inputs,
            outputs,
        })
    }
}

/// Runs `linear` over the rows of a contiguous f32 `[tokens, inputs]`.
fn product(
    linear: &Linear,
    (inputs, outputs): (usize, usize),
    storage: &CpuStorage,
    layout: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let CpuStorage::F32(values) = storage else {
        candle_core::bail!("a frozen product takes f32");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("a frozen product takes a contiguous input");
    };
    let (tokens, width) = layout.shape().dims2()?;
    if width != inputs {
        candle_core::bail!("a frozen product of {inputs} inputs got {width}");
    }
    let x = &values[start..end];
    let out = crate::backbone::on_thread_pool(|| linear.forward(x, rayon::current_num_threads()));
    Ok((CpuStorage::F32(out), Shape::from((tokens, outputs))))
}

impl CustomOp1 for FrozenProduct {
    fn name(&self) -> &'static str {
        "frozen-product"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        product(&self.forward, (self.inputs, self.outputs), storage, layout)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let op = InputGradient {
            backward: Arc::clone(&self.backward),
            inputs: self.outputs,
            outputs: self.inputs,
        };
        grad.contiguous()?.apply_op1_no_bwd(&op).map(Some)
    }
}

/// `grad·W`: the backward product, itself never differentiated.
struct InputGradient {
    backward: Arc<Linear>,
    inputs: usize,
    outputs: usize,
}

impl CustomOp1 for InputGradient {
    fn name(&self) -> &'static str {
        "frozen-product-gradient"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        product(&self.backward, (self.inputs, self.outputs), storage, layout)
    }
}
