//! The frozen bottom's hidden states, computed once per text and kept for
//! every epoch, and the padded batches built from them.

use candle_core::{DType, Tensor};
use tokio_util::sync::CancellationToken;

use crate::backbone::bert_graph::{BertGraph, Kernels};
use crate::{Error, Result};

/// Texts per forward pass of the bottom; sorted by length first, so that a
/// pass pads little.
const PASS: usize = 32;

/// One `[tokens, hidden]` tensor per text, in the model's float type.
pub struct Bottoms {
    rows: Vec<Tensor>,
    hidden: usize,
}

impl Bottoms {
    /// The bottom `layers` layers of `graph` over every text of `ids`.
    pub fn compute(
        graph: &BertGraph,
        ids: &[Vec<u32>],
        layers: usize,
        cancel: &CancellationToken,
    ) -> Result<Self> {
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut rows: Vec<Option<Tensor>> = vec![None; ids.len()];
        for chunk in order.chunks(PASS) {
            if cancel.is_cancelled() {
                return Err(Error::Cancelled("fine-tuning was cancelled".into()));
            }
            let texts: Vec<&[u32]> = chunk.iter().map(|&i| ids[i].as_slice()).collect();
            let (ids, mask) = graph.padded_batch(&texts)?;
            let hidden = graph.forward_bottom(&ids, &mask, layers, Kernels::Fused)?;
            for (row, (&index, text)) in chunk.iter().zip(&texts).enumerate() {
                // A copy: a view would keep the whole padded pass alive.
                rows[index] = Some(hidden.get(row)?.narrow(0, 0, text.len())?.copy()?);
            }
        }
        Ok(Self {
            rows: rows.into_iter().flatten().collect(),
            hidden: graph.hidden_size(),
        })
    }

    /// The hidden states of `examples`, padded with zeros to the longest:
    /// `[batch, len, hidden]`, and the mask `[batch, len]` (u32, 1 on real
    /// tokens).
    pub fn batch(&self, examples: &[usize]) -> Result<(Tensor, Tensor)> {
        let len = examples
            .iter()
            .map(|&i| self.rows[i].dim(0))
            .collect::<candle_core::Result<Vec<_>>>()?
            .into_iter()
            .max()
            .unwrap_or(0);
        let mut padded = Vec::with_capacity(examples.len());
        let mut mask = Vec::with_capacity(examples.len() * len);
        for &i in examples {
            let row = &self.rows[i];
            let tokens = row.dim(0)?;
            padded.push(if tokens < len {
                let zeros = Tensor::zeros((len - tokens, self.hidden), row.dtype(), row.device())?;
                Tensor::cat(&[row, &zeros], 0)?
            } else {
                row.clone()
            });
            mask.extend((0..len).map(|t| u32::from(t < tokens)));
        }
        let device = self.rows.first().map(Tensor::device).cloned();
        let device = device.ok_or_else(|| Error::InvalidArgument("no examples".into()))?;
        Ok((
            Tensor::stack(&padded, 0)?,
            Tensor::from_vec(mask, (examples.len(), len), &device)?,
        ))
    }
}

/// Mean of the real tokens' vectors, scaled to unit length (the backbone's
/// default features): `hidden` `[batch, len, h]`, `mask` `[batch, len]` u32.
/// Differentiable.
pub fn pooled(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
    let mean = hidden
        .broadcast_mul(&mask)?
        .sum(1)?
        .broadcast_div(&mask.sum(1)?)?;
    let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
    Ok(mean.broadcast_div(&(norm + 1e-12)?)?)
}

/// A tensor's values as f32, row after row.
pub fn to_f32(tensor: &Tensor) -> Result<Vec<f32>> {
    Ok(tensor.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}
