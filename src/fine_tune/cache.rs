//! The frozen bottom's hidden states, computed once per text and kept for
//! every epoch within a memory budget (beyond it, computed again per batch),
//! and the padded batches built from them.

use candle_core::{DType, Tensor};
use tokio_util::sync::CancellationToken;

use crate::backbone::bert::graph::{BertGraph, Kernels};
use crate::{Error, Result};

/// Texts per forward pass of the bottom; sorted by length first, so that a
/// pass pads little.
const PASS: usize = 32;

/// The frozen bottom's hidden states of every text: one `[tokens, hidden]`
/// tensor per text in the model's float type, kept when they fit the memory
/// budget, else computed again for each batch that needs them.
pub struct Bottoms<'a> {
    graph: &'a BertGraph,
    ids: &'a [Vec<u32>],
    layers: usize,
    /// None: over the budget, recomputed per batch.
    rows: Option<Vec<Tensor>>,
}

impl<'a> Bottoms<'a> {
    /// Bytes the bottoms of `ids` would take, kept.
    pub fn size_bytes(graph: &BertGraph, ids: &[Vec<u32>]) -> usize {
        let tokens: usize = ids.iter().map(Vec::len).sum();
        tokens * graph.hidden_size() * graph.dtype().size_in_bytes()
    }

    /// The bottom `layers` layers of `graph` over every text of `ids`,
    /// computed now when they fit in `budget_bytes`.
    pub fn compute(
        graph: &'a BertGraph,
        ids: &'a [Vec<u32>],
        layers: usize,
        budget_bytes: usize,
        cancel: &CancellationToken,
    ) -> Result<Self> {
        let mut bottoms = Self {
            graph,
            ids,
            layers,
            rows: None,
        };
        if Self::size_bytes(graph, ids) > budget_bytes {
            return Ok(bottoms);
        }
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut rows: Vec<Option<Tensor>> = vec![None; ids.len()];
        for chunk in order.chunks(PASS) {
            if cancel.is_cancelled() {
                return Err(Error::Cancelled("fine-tuning was cancelled".into()));
            }
            let (hidden, _) = bottoms.computed(chunk)?;
            for (row, &index) in chunk.iter().enumerate() {
                // A copy: a view would keep the whole padded pass alive.
                rows[index] = Some(hidden.get(row)?.narrow(0, 0, ids[index].len())?.copy()?);
            }
        }
        bottoms.rows = Some(rows.into_iter().flatten().collect());
        Ok(bottoms)
    }

    /// Hidden states computed elsewhere (the serving engine, through the
    /// backbone's queue): one `[tokens * hidden]` vector per text of `ids`,
    /// after the bottom `layers` layers.
    pub fn given(
        graph: &'a BertGraph,
        ids: &'a [Vec<u32>],
        layers: usize,
        given: Vec<Vec<f32>>,
    ) -> Result<Self> {
        let hidden = graph.hidden_size();
        if given.len() != ids.len()
            || given
                .iter()
                .zip(ids)
                .any(|(row, text)| row.len() != text.len() * hidden)
        {
            return Err(Error::Internal(
                "the given hidden states do not match the texts".into(),
            ));
        }
        let device = graph.device();
        let rows = given
            .into_iter()
            .zip(ids)
            .map(|(row, text)| {
                Tensor::from_vec(row, (text.len(), hidden), &device)?.to_dtype(graph.dtype())
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            graph,
            ids,
            layers,
            rows: Some(rows),
        })
    }

    /// Whether the hidden states are kept (else recomputed per batch).
    pub fn kept(&self) -> bool {
        self.rows.is_some()
    }

    /// The hidden states of `examples`, padded to the longest: `[batch, len,
    /// hidden]`, and the mask `[batch, len]` (u32, 1 on real tokens).
    pub fn batch(&self, examples: &[usize]) -> Result<(Tensor, Tensor)> {
        match &self.rows {
            Some(rows) => padded(rows, examples, self.graph.hidden_size()),
            None => self.computed(examples),
        }
    }

    /// One forward pass of the bottom over `examples`.
    fn computed(&self, examples: &[usize]) -> Result<(Tensor, Tensor)> {
        let texts: Vec<&[u32]> = examples.iter().map(|&i| self.ids[i].as_slice()).collect();
        let (ids, mask) = self.graph.padded_batch(&texts)?;
        let hidden = self
            .graph
            .forward_bottom(&ids, &mask, self.layers, Kernels::Fused)?;
        Ok((hidden, mask))
    }
}

/// Kept rows of `examples`, padded with zeros to the longest (what the
/// padding holds does not matter: the mask hides it from attention and
/// pooling).
fn padded(rows: &[Tensor], examples: &[usize], hidden: usize) -> Result<(Tensor, Tensor)> {
    let len = examples
        .iter()
        .map(|&i| rows[i].dim(0))
        .collect::<candle_core::Result<Vec<_>>>()?
        .into_iter()
        .max()
        .unwrap_or(0);
    let mut batch = Vec::with_capacity(examples.len());
    let mut mask = Vec::with_capacity(examples.len() * len);
    for &i in examples {
        let row = &rows[i];
        let tokens = row.dim(0)?;
        batch.push(if tokens < len {
            let zeros = Tensor::zeros((len - tokens, hidden), row.dtype(), row.device())?;
            Tensor::cat(&[row, &zeros], 0)?
        } else {
            row.clone()
        });
        mask.extend((0..len).map(|t| u32::from(t < tokens)));
    }
    let device = rows.first().map(Tensor::device).cloned();
    let device = device.ok_or_else(|| Error::InvalidArgument("no examples".into()))?;
    Ok((
        Tensor::stack(&batch, 0)?,
        Tensor::from_vec(mask, (examples.len(), len), &device)?,
    ))
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
