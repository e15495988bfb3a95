//! Exact GELU as a candle operation on CPU f32 tensors, with its derivative:
//! the rational erf of [`super::gelu`] vectorizes, where candle's own
//! `gelu_erf` calls libm's erf once per value, forward and backward (10% of
//! a fine-tuning step: docs/PERFORMANCE.md, "Fine-tuning").

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

/// `x · Φ(x)`, Φ the standard normal CDF.
pub struct Gelu;

/// `d/dx x·Φ(x) = Φ(x) + x·φ(x)`.
struct GeluDerivative;

/// 1 / sqrt(2π).
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// The values of a contiguous f32 tensor on the CPU.
fn values<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(values) = storage else {
        candle_core::bail!("GELU takes f32 here");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("GELU takes a contiguous tensor here");
    };
    Ok(&values[start..end])
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut out = values(storage, layout)?.to_vec();
        super::gelu_in_place(&mut out);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let slope = x.contiguous()?.apply_op1_no_bwd(&GeluDerivative)?;
        Ok(Some(grad.mul(&slope)?))
    }
}

impl CustomOp1 for GeluDerivative {
    fn name(&self) -> &'static str {
        "gelu-erf-derivative"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = values(storage, layout)?;
        let mut cdf = x.to_vec();
        // Φ(x) = gelu(x) / x, except at 0; computed as its own erf instead.
        cdf.iter_mut()
            .for_each(|v| *v = 0.5 * (1.0 + super::erf(*v * std::f32::consts::FRAC_1_SQRT_2)));
        let out = x
            .iter()
            .zip(cdf)
            .map(|(&x, cdf)| cdf + x * (-0.5 * x * x).exp() * INV_SQRT_2PI)
            .collect();
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// GELU (erf) of `x`: this operation for f32 on the CPU, candle's elsewhere.
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.dtype() == DType::F32 && x.device().is_cpu() {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        x.gelu_erf()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    /// Forward values and gradients agree with candle's gelu_erf (in f64, an
    /// independent erf) to 2e-6 over [-6, 6].
    #[test]
    fn values_and_gradients_match_candles_gelu() {
        let points: Vec<f32> = (-600..=600).map(|i| i as f32 / 100.0).collect();
        let x = Var::from_vec(points.clone(), points.len(), &Device::Cpu).expect("x");
        let ours = super::gelu_erf(x.as_tensor()).expect("gelu");
        let grad = ours.sum_all().and_then(|s| s.backward()).expect("backward");
        let ours_grad: Vec<f32> = grad.get(x.as_tensor()).expect("grad").to_vec1().expect("v");
        let x64 = Var::from_vec(
            points.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
            points.len(),
            &Device::Cpu,
        )
        .expect("x64");
        let reference = x64.as_tensor().gelu_erf().expect("gelu");
        let grads = reference
            .sum_all()
            .and_then(|s| s.backward())
            .expect("backward");
        let ref_values: Vec<f64> = reference.to_vec1().expect("v");
        let ref_grad: Vec<f64> = grads.get(x64.as_tensor()).expect("g").to_vec1().expect("v");
        let ours_values: Vec<f32> = ours.to_vec1().expect("v");
        for i in 0..points.len() {
            let (v, g) = (f64::from(ours_values[i]), f64::from(ours_grad[i]));
            assert!(
                (v - ref_values[i]).abs() < 2e-6,
                "gelu({}) {v} vs {}",
                points[i],
                ref_values[i]
            );
            assert!(
                (g - ref_grad[i]).abs() < 2e-6,
                "gelu'({}) {g} vs {}",
                points[i],
                ref_grad[i]
            );
        }
    }
}
