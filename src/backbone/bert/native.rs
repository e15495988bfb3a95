//! A BERT encoder forward pass written for CPU inference.
//!
//! What it does differently from a general tensor library (see
//! docs/PERFORMANCE.md for the measurements behind each choice):
//! - **Packed sequences**: the texts of a batch are concatenated, not padded.
//!   Every dense layer runs on the real tokens only, and attention runs per text
//!   on its own length, so there is no padding to compute and no mask to apply.
//! - **Fused QKV**: the query, key and value projections are one matrix
//!   product with a `[3h, h]` weight, read once per layer.
//! - **No layout changes**: attention reads Q, K and V where the QKV product
//!   left them (strided matrix products), and writes each head's context
//!   straight into its columns of the output; nothing is transposed or copied.
//! - **Fused element-wise passes**: bias is the product's initial value,
//!   residual add + layer norm is one pass per row, softmax is one pass per row.
//! - Matrix products go to the `gemm` crate (the kernels candle itself uses)
//!   on candle's thread pool; attention is parallel over (text, head) pairs.
//!
//! The dense layer, layer norm, softmax and GELU kernels are the shared ones of
//! [`crate::nn`].
//!
//! Weights follow Hugging Face's BERT names (`embeddings.word_embeddings`,
//! `encoder.layer.N.attention.self.query`, ...), the same file the candle path
//! loads.

use candle_nn::VarBuilder;
use candle_transformers::models::bert::Config as BertConfig;
use rayon::prelude::*;

use super::adapter::{Adapter, LoraAdapter, MODULES};
use super::top_layers::{LayerWeights, TopLayers, NORMS};
use crate::backbone::profile::Stopwatch;
use crate::{
    config::Precision,
    nn::{
        attend_head, flat, gelu_in_place, shared_out::SharedOut, Dense, LayerNorm, Linear, Strided,
    },
};

#[derive(Clone)]
struct Layer {
    /// Query, key and value stacked: `[3h, h]`.
    qkv: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

pub struct NativeBert {
    hidden: usize,
    intermediate: usize,
    heads: usize,
    max_positions: usize,
    word: Vec<f32>,
    position: Vec<f32>,
    /// Token type 0: single-segment inputs.
    token_type: Vec<f32>,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
    /// The number format of the dense layers, which a head's own top layers
    /// are converted to as well.
    precision: Precision,
}

impl Layer {
    /// A layer of `dense` (in the order of [`MODULES`]) and `norms` (of
    /// [`NORMS`]), its dense layers in `precision`.
    fn new(dense: [Dense; 6], norms: [LayerNorm; 2], precision: Precision) -> Self {
        let [query, key, value, attention_output, intermediate, output] = dense;
        let [attention_norm, output_norm] = norms;
        Self {
            qkv: Linear::new(Dense::concat(vec![query, key, value]), precision),
            attention_output: Linear::new(attention_output, precision),
            attention_norm,
            intermediate: Linear::new(intermediate, precision),
            output: Linear::new(output, precision),
            output_norm,
        }
    }

    /// Reads encoder layer `vb` of width `h` and feed-forward width `inner`.
    fn load(
        vb: &VarBuilder,
        (h, inner, eps): (usize, usize, f64),
        precision: Precision,
    ) -> candle_core::Result<Self> {
        let shapes = super::adapter::slot_shapes(h, inner);
        let mut dense = Vec::with_capacity(6);
        for (module, (inputs, outputs)) in MODULES.iter().zip(shapes) {
            dense.push(Dense::load(&vb.pp(module), inputs, outputs)?);
        }
        let dense: [Dense; 6] = dense
            .try_into()
            .map_err(|_| candle_core::Error::Msg("six dense layers".into()))?;
        let [attention_norm, output_norm] = NORMS;
        let norms = [
            LayerNorm::load(&vb.pp(attention_norm), h, eps)?,
            LayerNorm::load(&vb.pp(output_norm), h, eps)?,
        ];
        Ok(Self::new(dense, norms, precision))
    }

    /// A head's trained layer, with layer norms adding `eps`.
    fn from_weights(weights: &LayerWeights, eps: f32, precision: Precision) -> Self {
        let norms = weights.norms.clone().map(|n| LayerNorm {
            gamma: n.weight,
            beta: n.bias,
            eps,
        });
        Self::new(weights.dense.clone(), norms, precision)
    }
}

/// A head's top layers as this engine runs them, and the number format they
/// were converted to.
#[derive(Clone)]
struct NativeLayers {
    layers: Vec<Layer>,
    precision: Precision,
}

/// A pass's packed token vectors (empty when the pass stopped early for its
/// captures), and each text's captured vectors.
pub type Captured = (Vec<f32>, Vec<Option<Vec<f32>>>);

/// The token rows of a pass that one LoRA adapter adapts.
#[derive(Clone)]
struct AdapterRows<'a> {
    adapter: &'a LoraAdapter,
    rows: std::ops::Range<usize>,
}

/// The texts of a pass that run a head's own top layers.
struct LayerGroup<'a> {
    layers: &'a [Layer],
    first_layer: usize,
    texts: std::ops::Range<usize>,
}

/// How the texts of a pass are adapted.
#[derive(Default)]
struct Groups<'a> {
    lora: Vec<AdapterRows<'a>>,
    layers: Vec<LayerGroup<'a>>,
}

/// Neighbouring texts that run one layer's weights: `texts` of the pass.
struct Segment<'a> {
    layer: &'a Layer,
    texts: std::ops::Range<usize>,
}

impl<'a> Groups<'a> {
    /// Who runs layer `index` for each of `texts` texts: the base layer
    /// except for texts whose head has its own, merged into runs.
    fn segments(&self, base: &'a Layer, index: usize, texts: usize) -> Vec<Segment<'a>> {
        if self.layers.is_empty() {
            // The common pass: no head has layers of its own.
            return vec![Segment {
                layer: base,
                texts: 0..texts,
            }];
        }
        let mut segments: Vec<Segment<'a>> = Vec::new();
        for text in 0..texts {
            let layer = self
                .layers
                .iter()
                .find(|g| g.texts.contains(&text) && index >= g.first_layer)
                .map_or(base, |g| &g.layers[index - g.first_layer]);
            match segments.last_mut() {
                Some(last) if std::ptr::eq(last.layer, layer) => last.texts.end = text + 1,
                _ => segments.push(Segment {
                    layer,
                    texts: text..text + 1,
                }),
            }
        }
        segments
    }
}

/// The LoRA groups inside token rows `rows`, their rows counted from its
/// start.
fn lora_within<'a>(
    groups: &[AdapterRows<'a>],
    rows: &std::ops::Range<usize>,
) -> Vec<AdapterRows<'a>> {
    groups
        .iter()
        .filter(|g| g.rows.start >= rows.start && g.rows.end <= rows.end)
        .map(|g| AdapterRows {
            adapter: g.adapter,
            rows: g.rows.start - rows.start..g.rows.end - rows.start,
        })
        .collect()
}

/// Adds the update of slot `slot` of layer `layer` of every group's adapter
/// on the group's rows: `input` is the dense layer's input (`[tokens,
/// inputs]`), the destination its output (row stride, first column).
fn add_updates(
    groups: &[AdapterRows<'_>],
    layer: usize,
    slot: usize,
    input: &[f32],
    (out, stride, column): (&mut [f32], usize, usize),
) {
    for group in groups {
        let Some(weights) = group.adapter.layer(layer).and_then(|s| s[slot].as_ref()) else {
            continue;
        };
        let rows = group.rows.len();
        weights.add_update(
            &input[group.rows.start * weights.inputs..],
            rows,
            group.adapter.scale(),
            (&mut out[group.rows.start * stride..], stride, column),
        );
    }
}

/// Where one layer's pass stands: the layer's index in the encoder, the
/// text boundaries of its rows, and the LoRA updates on them.
#[derive(Clone, Copy)]
struct LayerStep<'a, 'b> {
    index: usize,
    offsets: &'b [usize],
    lora: &'b [AdapterRows<'a>],
}

impl NativeBert {
    /// Loads the weights; the dense layers of the encoder are converted to
    /// `precision` (embeddings, layer norms and attention stay f32).
    pub fn load(
        vb: VarBuilder,
        config: &BertConfig,
        precision: Precision,
    ) -> candle_core::Result<Self> {
        let h = config.hidden_size;
        if !h.is_multiple_of(config.num_attention_heads) {
            candle_core::bail!(
                "hidden size {h} is not a multiple of {} heads",
                config.num_attention_heads
            );
        }
        let eps = config.layer_norm_eps;
        let embeddings = vb.pp("embeddings");
        let token_types = embeddings
            .pp("token_type_embeddings")
            .get((config.type_vocab_size, h), "weight")?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let shape = (h, config.intermediate_size, eps);
                Layer::load(&vb.pp("encoder.layer").pp(i), shape, precision)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            hidden: h,
            intermediate: config.intermediate_size,
            heads: config.num_attention_heads,
            max_positions: config.max_position_embeddings,
            word: flat(
                embeddings
                    .pp("word_embeddings")
                    .get((config.vocab_size, h), "weight")?,
            )?,
            position: flat(
                embeddings
                    .pp("position_embeddings")
                    .get((config.max_position_embeddings, h), "weight")?,
            )?,
            token_type: flat(token_types.get(0)?)?,
            embedding_norm: LayerNorm::load(&embeddings.pp("LayerNorm"), h, eps)?,
            layers,
            precision,
        })
    }

    /// Token vectors of the texts, packed: `[sum of lengths, hidden]`, text
    /// after text. Runs on the current rayon pool, else candle's.
    pub fn forward(&self, texts: &[&[u32]]) -> candle_core::Result<Vec<f32>> {
        self.forward_adapted(texts, &vec![None; texts.len()])
    }

    /// [`Self::forward`] with each text's LoRA adapter (or none) on the top
    /// layers. Every base product still runs once over all the tokens of the
    /// pass; each adapter adds its low-rank update on its own texts' rows
    /// (the S-LoRA / Punica way of serving many adapters on one base).
    /// Texts that share an adapter should be neighbours: each run of them is
    /// one update.
    pub fn forward_adapted(
        &self,
        texts: &[&[u32]],
        adapters: &[Option<&Adapter>],
    ) -> candle_core::Result<Vec<f32>> {
        let captures = vec![None; texts.len()];
        Ok(self.forward_captured(texts, adapters, &captures)?.0)
    }

    /// [`Self::forward_adapted`], also capturing the token vectors of each
    /// text whose `captures` entry is `Some(k)`: those after its first `k`
    /// layers (0: the embeddings), `[len, hidden]`. When every text asks for
    /// a capture the pass stops at the highest, and the packed output is
    /// empty: what a fine-tuning job's frozen bottom needs.
    pub fn forward_captured(
        &self,
        texts: &[&[u32]],
        adapters: &[Option<&Adapter>],
        captures: &[Option<usize>],
    ) -> candle_core::Result<Captured> {
        let vocab = self.word.len() / self.hidden;
        if adapters.len() != texts.len() || captures.len() != texts.len() {
            candle_core::bail!(
                "{} adapters and {} captures for {} texts",
                adapters.len(),
                captures.len(),
                texts.len()
            );
        }
        if let Some(k) = captures.iter().flatten().find(|&&k| k > self.layers.len()) {
            candle_core::bail!("no layer {k} to capture in {} layers", self.layers.len());
        }
        for text in texts {
            if text.len() > self.max_positions {
                candle_core::bail!(
                    "a text of {} tokens exceeds the model's {} positions",
                    text.len(),
                    self.max_positions
                );
            }
            if let Some(&id) = text.iter().find(|&&id| id as usize >= vocab) {
                candle_core::bail!("token id {id} is outside the vocabulary");
            }
        }
        let converted = self.converted_layers(adapters)?;
        let groups = self.adapter_groups(texts, adapters, &converted)?;
        Ok(crate::backbone::on_thread_pool(|| {
            self.forward_on_pool(texts, &groups, captures)
        }))
    }

    /// The top layers of each head in `adapters` that has its own, in this
    /// engine's form: made once per head and kept with it, converted for
    /// this pass only if it was kept in another form.
    fn converted_layers<'a>(
        &self,
        adapters: &[Option<&'a Adapter>],
    ) -> candle_core::Result<Vec<(&'a TopLayers, std::borrow::Cow<'a, NativeLayers>)>> {
        let mut converted: Vec<(&'a TopLayers, std::borrow::Cow<'a, NativeLayers>)> = Vec::new();
        for top in adapters.iter().flatten().filter_map(|a| a.top_layers()) {
            if converted.iter().any(|(seen, _)| std::ptr::eq(*seen, top)) {
                continue;
            }
            if !top.fits(self.layers.len(), self.hidden, self.intermediate) {
                candle_core::bail!("the head's layers do not fit this model's top layers");
            }
            let make = |top: &TopLayers| NativeLayers {
                layers: top
                    .layers
                    .iter()
                    .map(|w| Layer::from_weights(w, self.embedding_norm.eps, self.precision))
                    .collect(),
                precision: self.precision,
            };
            let layers = match top.prepared(make) {
                Some(kept) if kept.precision == self.precision => std::borrow::Cow::Borrowed(kept),
                _ => std::borrow::Cow::Owned(make(top)),
            };
            converted.push((top, layers));
        }
        Ok(converted)
    }

    /// Runs of neighbouring texts with the same adapter: LoRA ones as token
    /// ranges, heads with their own layers as text ranges.
    fn adapter_groups<'a>(
        &self,
        texts: &[&[u32]],
        adapters: &[Option<&'a Adapter>],
        converted: &'a [(&'a TopLayers, std::borrow::Cow<'a, NativeLayers>)],
    ) -> candle_core::Result<Groups<'a>> {
        let mut groups = Groups::default();
        let mut start = 0;
        for (index, (text, adapter)) in texts.iter().zip(adapters).enumerate() {
            let end = start + text.len();
            match adapter {
                Some(Adapter::Lora(adapter)) => {
                    self.check_adapter(adapter)?;
                    match groups.lora.last_mut() {
                        Some(last)
                            if std::ptr::eq(last.adapter, adapter) && last.rows.end == start =>
                        {
                            last.rows.end = end
                        }
                        _ => groups.lora.push(AdapterRows {
                            adapter,
                            rows: start..end,
                        }),
                    }
                }
                Some(Adapter::Layers(top)) => {
                    let (_, layers) = converted
                        .iter()
                        .find(|(seen, _)| std::ptr::eq(*seen, top))
                        .ok_or_else(|| candle_core::Error::Msg("unconverted layers".into()))?;
                    match groups.layers.last_mut() {
                        Some(last)
                            if std::ptr::eq(last.layers, layers.layers.as_slice())
                                && last.texts.end == index =>
                        {
                            last.texts.end = index + 1
                        }
                        _ => groups.layers.push(LayerGroup {
                            layers: &layers.layers,
                            first_layer: top.first_layer,
                            texts: index..index + 1,
                        }),
                    }
                }
                None => {}
            }
            start = end;
        }
        Ok(groups)
    }

    /// Whether `adapter`'s matrices fit this model's layers.
    fn check_adapter(&self, adapter: &LoraAdapter) -> candle_core::Result<()> {
        let shapes = super::adapter::slot_shapes(self.hidden, self.intermediate);
        let fits = adapter.first_layer + adapter.layers.len() <= self.layers.len()
            && adapter.layers.iter().all(|slots| {
                slots.iter().zip(shapes).all(|(slot, (inputs, outputs))| {
                    slot.as_ref().is_none_or(|w| {
                        w.inputs == inputs
                            && w.outputs == outputs
                            && w.a.len() == w.rank * inputs
                            && w.b.len() == outputs * w.rank
                    })
                })
            });
        if !fits {
            candle_core::bail!("the adapter does not fit this model's layers");
        }
        Ok(())
    }

    fn forward_on_pool(
        &self,
        texts: &[&[u32]],
        groups: &Groups<'_>,
        captures: &[Option<usize>],
    ) -> Captured {
        let h = self.hidden;
        let mut offsets = Vec::with_capacity(texts.len() + 1);
        offsets.push(0);
        for text in texts {
            offsets.push(offsets.last().copied().unwrap_or(0) + text.len());
        }
        let tokens = offsets[texts.len()];
        let mut watch = Stopwatch::start();
        let mut x = self.embed_tokens(texts, tokens);
        watch.lap("embeddings");
        let mut captured: Vec<Option<Vec<f32>>> = vec![None; texts.len()];
        let take = |at: usize, x: &[f32], captured: &mut Vec<Option<Vec<f32>>>| {
            for (text, capture) in captures.iter().enumerate() {
                if *capture == Some(at) {
                    captured[text] = Some(x[offsets[text] * h..offsets[text + 1] * h].to_vec());
                }
            }
        };
        let last = match captures.iter().all(Option::is_some) && !captures.is_empty() {
            true => captures.iter().flatten().copied().max().unwrap_or(0),
            false => self.layers.len(),
        };
        for (index, base) in self.layers.iter().enumerate().take(last) {
            take(index, &x, &mut captured);
            let segments = groups.segments(base, index, texts.len());
            x = match segments.as_slice() {
                [only] => {
                    let step = LayerStep {
                        index,
                        offsets: &offsets,
                        lora: &groups.lora,
                    };
                    self.layer_forward(only.layer, &x, step, &mut watch)
                }
                _ => {
                    let mut next = Vec::with_capacity(x.len());
                    for segment in &segments {
                        let rows = offsets[segment.texts.start]..offsets[segment.texts.end];
                        let local: Vec<usize> = offsets[segment.texts.start..=segment.texts.end]
                            .iter()
                            .map(|o| o - rows.start)
                            .collect();
                        let step = LayerStep {
                            index,
                            offsets: &local,
                            lora: &lora_within(&groups.lora, &rows),
                        };
                        let input = &x[rows.start * h..rows.end * h];
                        next.extend(self.layer_forward(segment.layer, input, step, &mut watch));
                    }
                    next
                }
            };
        }
        take(last, &x, &mut captured);
        watch.finish(tokens);
        if last < self.layers.len() {
            x.clear();
        }
        (x, captured)
    }

    /// Encoder layer `step.index` with `layer`'s weights over the texts of
    /// `x` (`[tokens, hidden]`, text boundaries at `step.offsets`), with the
    /// LoRA updates of `step.lora` on their rows.
    fn layer_forward(
        &self,
        layer: &Layer,
        x: &[f32],
        step: LayerStep<'_, '_>,
        watch: &mut Stopwatch,
    ) -> Vec<f32> {
        let threads = rayon::current_num_threads();
        let h = self.hidden;
        let update = |slot: usize, input: &[f32], out: &mut [f32], stride: usize, column| {
            add_updates(step.lora, step.index, slot, input, (out, stride, column));
        };
        let mut qkv = layer.qkv.forward(x, threads);
        for slot in 0..3 {
            update(slot, x, &mut qkv, 3 * h, slot * h);
        }
        watch.lap("qkv_projection");
        let context = self.attention(&qkv, step.offsets);
        watch.lap("attention");
        let mut attended = layer.attention_output.forward(&context, threads);
        update(3, &context, &mut attended, h, 0);
        watch.lap("attention_output");
        attended
            .par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .for_each(|(row, residual)| layer.attention_norm.apply(row, Some(residual)));
        watch.lap("layer_norms");
        let mut inner = layer.intermediate.forward(&attended, threads);
        update(4, &attended, &mut inner, self.intermediate, 0);
        watch.lap("feed_forward_in");
        inner.par_chunks_mut(4096).for_each(gelu_in_place);
        watch.lap("gelu");
        let mut out = layer.output.forward(&inner, threads);
        update(5, &inner, &mut out, h, 0);
        watch.lap("feed_forward_out");
        out.par_chunks_mut(h)
            .zip(attended.par_chunks(h))
            .for_each(|(row, residual)| layer.output_norm.apply(row, Some(residual)));
        watch.lap("layer_norms");
        out
    }

    /// Word + position + token type 0 embeddings of every token, then layer
    /// norm: `[tokens, hidden]`.
    fn embed_tokens(&self, texts: &[&[u32]], tokens: usize) -> Vec<f32> {
        let h = self.hidden;
        let positions: Vec<(u32, usize)> = texts
            .iter()
            .flat_map(|text| text.iter().enumerate().map(|(p, &id)| (id, p)))
            .collect();
        let mut x = vec![0f32; tokens * h];
        x.par_chunks_mut(h)
            .zip(positions.par_iter())
            .for_each(|(row, &(id, position))| {
                let word = &self.word[id as usize * h..][..h];
                let pos = &self.position[position * h..][..h];
                for (((out, w), p), t) in row.iter_mut().zip(word).zip(pos).zip(&self.token_type) {
                    *out = w + p + t;
                }
                self.embedding_norm.apply(row, None);
            });
        x
    }

    /// Scaled dot-product attention of every head of every text; `qkv` is
    /// `[tokens, 3h]` (Q, K, V side by side), the result `[tokens, h]`.
    fn attention(&self, qkv: &[f32], offsets: &[usize]) -> Vec<f32> {
        let h = self.hidden;
        let d = h / self.heads;
        let stride = 3 * h;
        let tokens = offsets[offsets.len() - 1];
        let mut context = vec![0f32; tokens * h];
        let out = SharedOut::new(&mut context);
        let scale = 1.0 / (d as f32).sqrt();
        let tasks: Vec<(usize, usize)> = (0..offsets.len() - 1)
            .flat_map(|text| (0..self.heads).map(move |head| (text, head)))
            .collect();
        tasks.par_iter().for_each(|&(text, head)| {
            let start = offsets[text];
            let len = offsets[text + 1] - start;
            if len == 0 {
                return;
            }
            let q = qkv[start * stride + head * d..].as_ptr();
            let k = qkv[start * stride + h + head * d..].as_ptr();
            let v = qkv[start * stride + 2 * h + head * d..].as_ptr();
            let views = (
                Strided::rows(q, stride),
                Strided::rows(k, stride),
                Strided::rows(v, stride),
            );
            // SAFETY: Q, K and V are `len` rows of `d` values with row stride
            // 3h inside `qkv`. Each (text, head) task writes only rows
            // start..start+len and columns head*d..(head+1)*d of `context`,
            // which no other task touches; `context` outlives the parallel loop.
            unsafe {
                attend_head(
                    views,
                    (len, len, d),
                    (out.at(start * h + head * d), h),
                    scale,
                    None,
                );
            }
        });
        context
    }
}

#[cfg(test)]
mod tests;
