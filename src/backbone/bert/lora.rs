//! Low-rank adapters (LoRA, Hu et al. 2021): a frozen dense layer `W` is used as
//! `W + scale · B·A`, with `A` `[rank, inputs]` and `B` `[outputs, rank]` the
//! only trained matrices and `scale = alpha / rank`, as the Python `peft`
//! package defines it. `B` starts at zero, so a new adapter changes nothing
//! until it is trained.

use candle_core::{DType, Device, Tensor, Var};

use crate::nn::rng::Rng;

/// The update of one dense layer: `x·Aᵀ·Bᵀ·scale` is added to its output.
pub struct LowRank {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    /// Dropout on `x` in training passes, as `peft`'s `lora_dropout`.
    pub dropout: Option<Dropout>,
}

/// Inverted dropout with its own seeded generator, so that a seed gives the
/// same run (candle's own dropout draws from an unseeded generator).
pub struct Dropout {
    rate: f64,
    rng: std::sync::Mutex<Rng>,
}

impl Dropout {
    /// `x` with each value zeroed at `rate`, the others scaled by
    /// `1 / (1 - rate)`.
    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let keep = 1.0 - self.rate;
        let draws = crate::sync::lock(&self.rng).uniform(x.elem_count(), 0.0, 1.0);
        let scale = (1.0 / keep) as f32;
        let mask: Vec<f32> = draws
            .into_iter()
            .map(|u| if f64::from(u) < keep { scale } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * mask
    }
}

impl LowRank {
    /// A new adapter as `peft` initialises one: `A` from Kaiming-uniform
    /// bounds (`±sqrt(1 / inputs)` for its a = sqrt(5)), `B` zero; `A` drawn
    /// from `rng`, so a seed gives the same adapter everywhere.
    pub fn new(
        shape: (usize, usize),
        rank: usize,
        alpha: f64,
        rng: &mut Rng,
        (dtype, device): (DType, &Device),
    ) -> candle_core::Result<Self> {
        let (inputs, outputs) = shape;
        let bound = (1.0 / inputs as f64).sqrt() as f32;
        let a = Tensor::from_vec(
            rng.uniform(rank * inputs, -bound, bound),
            (rank, inputs),
            device,
        )?
        .to_dtype(dtype)?;
        Ok(Self {
            a: Var::from_tensor(&a)?,
            b: Var::zeros((outputs, rank), dtype, device)?,
            scale: alpha / rank as f64,
            dropout: None,
        })
    }

    /// The adapter with dropout at `rate` on its input in training passes,
    /// drawn from `seed`; a rate of 0 is none.
    pub fn with_dropout(mut self, rate: f64, seed: u64) -> Self {
        self.dropout = (rate > 0.0).then(|| Dropout {
            rate,
            rng: std::sync::Mutex::new(Rng(seed)),
        });
        self
    }

    /// An adapter with the given matrices (`a` `[rank, inputs]`, `b`
    /// `[outputs, rank]`), trainable again.
    pub fn from_tensors(a: &Tensor, b: &Tensor, scale: f64) -> candle_core::Result<Self> {
        Ok(Self {
            a: Var::from_tensor(a)?,
            b: Var::from_tensor(b)?,
            scale,
            dropout: None,
        })
    }

    /// `x`: `[tokens, inputs]` → the update `[tokens, outputs]`; a training
    /// pass drops inputs out first, if the adapter has dropout.
    pub fn delta(&self, x: &Tensor, training: bool) -> candle_core::Result<Tensor> {
        let dropped;
        let x = match (&self.dropout, training) {
            (Some(dropout), true) => {
                dropped = dropout.apply(x)?;
                &dropped
            }
            _ => x,
        };
        x.matmul(&self.a.as_tensor().t()?)?
            .matmul(&self.b.as_tensor().t()?)?
            * self.scale
    }

    /// `base` (the frozen layer's output for `x`) with this update added.
    pub fn apply(&self, x: &Tensor, base: Tensor, training: bool) -> candle_core::Result<Tensor> {
        base + self.delta(x, training)?
    }

    pub fn vars(&self) -> [&Var; 2] {
        [&self.a, &self.b]
    }
}

/// The adapters of one encoder layer; `None` leaves a projection as it is.
#[derive(Default)]
pub struct LayerAdapters {
    pub query: Option<LowRank>,
    pub key: Option<LowRank>,
    pub value: Option<LowRank>,
    pub attention_output: Option<LowRank>,
    /// The feed-forward input (`intermediate.dense`).
    pub intermediate: Option<LowRank>,
    /// The feed-forward output (`output.dense`).
    pub output: Option<LowRank>,
}

impl LayerAdapters {
    /// The six slots, in the order of [`super::adapter::MODULES`].
    pub fn slots(&self) -> [&Option<LowRank>; 6] {
        [
            &self.query,
            &self.key,
            &self.value,
            &self.attention_output,
            &self.intermediate,
            &self.output,
        ]
    }

    /// The adapters of the six slots, in the order of
    /// [`super::adapter::MODULES`].
    pub fn from_slots(slots: [Option<LowRank>; 6]) -> Self {
        let [query, key, value, attention_output, intermediate, output] = slots;
        Self {
            query,
            key,
            value,
            attention_output,
            intermediate,
            output,
        }
    }

    /// Every trained matrix of the layer.
    pub fn vars(&self) -> Vec<&Var> {
        self.slots()
            .into_iter()
            .flatten()
            .flat_map(LowRank::vars)
            .collect()
    }

    /// Whether any of query, key or value is adapted.
    pub fn adapts_attention_inputs(&self) -> bool {
        self.query.is_some() || self.key.is_some() || self.value.is_some()
    }
}

/// `base` plus `adapter`'s update for `x`, or `base` itself.
pub fn adapted(
    adapter: Option<&LowRank>,
    x: &Tensor,
    base: Tensor,
    training: bool,
) -> candle_core::Result<Tensor> {
    match adapter {
        Some(adapter) => adapter.apply(x, base, training),
        None => Ok(base),
    }
}
