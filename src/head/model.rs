//! Head weights and inference. Heads are tiny (a few hundred thousand numbers at
//! most), so Predict applies them with plain loops on the request path (the
//! layers and softmax of [`crate::nn`]); training uses candle (see `train`).
//! Tensor names follow PyTorch (`[out, in]` weights).

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::HeadKind;
use crate::{
    nn::{relu, softmax, Dense},
    Error, Result,
};

/// Stores a dense layer as `{prefix}.weight` (`[outputs, inputs]`) and
/// `{prefix}.bias`.
fn dense_to_tensors(dense: &Dense, prefix: &str, out: &mut HashMap<String, Tensor>) -> Result<()> {
    out.insert(
        format!("{prefix}.weight"),
        Tensor::from_slice(&dense.weight, (dense.outputs, dense.inputs), &Device::Cpu)?,
    );
    out.insert(
        format!("{prefix}.bias"),
        Tensor::from_slice(&dense.bias, dense.outputs, &Device::Cpu)?,
    );
    Ok(())
}

/// Reads a dense layer stored by [`dense_to_tensors`].
fn dense_from_tensors(prefix: &str, tensors: &HashMap<String, Tensor>) -> Result<Dense> {
    let get = |name: String| {
        tensors
            .get(&name)
            .ok_or_else(|| Error::Storage(format!("head weights lack `{name}`")))
    };
    let weight = get(format!("{prefix}.weight"))?;
    let (outputs, inputs) = weight.dims2()?;
    let bias = get(format!("{prefix}.bias"))?;
    if bias.dims1()? != outputs {
        return Err(Error::Storage(format!(
            "`{prefix}.bias` has the wrong length"
        )));
    }
    Ok(Dense {
        weight: weight.flatten_all()?.to_vec1()?,
        bias: bias.to_vec1()?,
        inputs,
        outputs,
    })
}

/// A trained head, ready to classify feature vectors.
#[derive(Debug, Clone, PartialEq)]
pub enum HeadWeights {
    Linear { output: Dense },
    Mlp { hidden: Dense, output: Dense },
}

impl HeadWeights {
    pub fn input_dim(&self) -> usize {
        match self {
            HeadWeights::Linear { output } => output.inputs,
            HeadWeights::Mlp { hidden, .. } => hidden.inputs,
        }
    }

    pub fn classes(&self) -> usize {
        match self {
            HeadWeights::Linear { output } | HeadWeights::Mlp { output, .. } => output.outputs,
        }
    }

    /// Class scores (logits) of one feature vector.
    pub fn logits(&self, features: &[f32]) -> Vec<f32> {
        match self {
            HeadWeights::Linear { output } => output.apply(features),
            HeadWeights::Mlp { hidden, output } => {
                let h: Vec<f32> = hidden.apply(features).into_iter().map(relu).collect();
                output.apply(&h)
            }
        }
    }

    /// Class probabilities (softmax) of one feature vector.
    pub fn probabilities(&self, features: &[f32]) -> Vec<f32> {
        softmax(&self.logits(features))
    }

    /// Divides the logits by `temperature` (folded into the output layer).
    pub fn cool(&mut self, temperature: f32) {
        let (HeadWeights::Linear { output } | HeadWeights::Mlp { output, .. }) = self;
        output.weight.iter_mut().for_each(|w| *w /= temperature);
        output.bias.iter_mut().for_each(|b| *b /= temperature);
    }

    pub fn to_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        match self {
            HeadWeights::Linear { output } => dense_to_tensors(output, "output", &mut out)?,
            HeadWeights::Mlp { hidden, output } => {
                dense_to_tensors(hidden, "hidden", &mut out)?;
                dense_to_tensors(output, "output", &mut out)?;
            }
        }
        Ok(out)
    }

    pub fn from_tensors(kind: &HeadKind, tensors: &HashMap<String, Tensor>) -> Result<Self> {
        let output = dense_from_tensors("output", tensors)?;
        match kind {
            HeadKind::Linear => Ok(HeadWeights::Linear { output }),
            HeadKind::Mlp { .. } => {
                let hidden = dense_from_tensors("hidden", tensors)?;
                if hidden.outputs != output.inputs {
                    return Err(Error::Storage(
                        "hidden and output layers do not fit together".into(),
                    ));
                }
                Ok(HeadWeights::Mlp { hidden, output })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense(weight: Vec<f32>, bias: Vec<f32>, inputs: usize) -> Dense {
        let outputs = bias.len();
        Dense {
            weight,
            bias,
            inputs,
            outputs,
        }
    }

    #[test]
    fn linear_head_computes_softmax_of_wx_plus_b() {
        let head = HeadWeights::Linear {
            output: dense(vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0], vec![0.0, 0.5, -1.0], 2),
        };
        let p = head.probabilities(&[2.0, 1.0]);
        // logits: [2, 1.5, 2]
        let e = [2f32.exp(), 1.5f32.exp(), 2f32.exp()];
        let sum: f32 = e.iter().sum();
        for (got, want) in p.iter().zip(e.iter().map(|v| v / sum)) {
            assert!((got - want).abs() < 1e-6);
        }
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn mlp_applies_relu_between_layers() {
        let head = HeadWeights::Mlp {
            hidden: dense(vec![1.0, -1.0], vec![0.0, 0.0], 1),
            output: dense(vec![1.0, 1.0, 0.0, 0.0], vec![0.0, 0.0], 2),
        };
        // x = 3: hidden [3, -3] -> relu [3, 0]; logits [3, 0].
        let p = head.probabilities(&[3.0]);
        let want = 3f32.exp() / (3f32.exp() + 1.0);
        assert!((p[0] - want).abs() < 1e-6);
    }

    #[test]
    fn tensors_round_trip() {
        let head = HeadWeights::Mlp {
            hidden: dense(vec![0.5, -0.25, 1.0, 2.0], vec![0.1, 0.2], 2),
            output: dense(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], vec![0.0, 1.0, 2.0], 2),
        };
        let kind = HeadKind::Mlp {
            hidden_size: 2,
            dropout: 0.0,
        };
        let back = HeadWeights::from_tensors(&kind, &head.to_tensors().unwrap()).unwrap();
        assert_eq!(back, head);
        assert_eq!((back.input_dim(), back.classes()), (2, 3));
    }
}
