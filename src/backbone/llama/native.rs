//! A Llama-architecture decoder's forward pass written for CPU inference,
//! giving the final hidden state of every token.
//!
//! As in the native BERT engine ([`crate::backbone::bert::native`]), the texts of a
//! batch are packed end to end: every dense layer runs on the real tokens
//! only, and attention runs per text (causal, each token seeing itself and
//! the tokens before it), so there is neither padding nor a mask. Query,
//! key and value are one product, as are the feed-forward gate and up
//! projections; rotary position embeddings are applied in place where the
//! product left Q and K; grouped-query heads read their shared key and
//! value columns directly.
//!
//! The weights are dequantized at load and converted to the configured
//! number format (the f32 or bf16 kernels of [`crate::nn`]): candle's
//! products on the file's Q4_1 blocks ran 35 times slower on this kind of
//! CPU (docs/PERFORMANCE.md, "Decoder backbones"), so the quantized blocks
//! are kept only by the candle graph, for GPUs.

use rayon::prelude::*;

use crate::backbone::profile::Stopwatch;
use crate::backbone::weights::gguf::GgufFile;
use crate::{
    config::Precision,
    nn::{attend_head, shared_out::SharedOut, Dense, Linear, Strided},
    Error, Result,
};

/// A decoder's shape, from the GGUF metadata (`llama.*`).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaSettings {
    pub layers: usize,
    pub hidden: usize,
    pub feed_forward: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocabulary: usize,
    /// Positions the model was trained on.
    pub context: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
}

impl LlamaSettings {
    pub fn read(file: &GgufFile) -> Result<Self> {
        let architecture = file.string("general.architecture")?;
        if architecture != "llama" {
            return Err(Error::ModelLoad(format!(
                "the GGUF file holds a `{architecture}` model; the `llama` architecture reads `llama` files"
            )));
        }
        let key = |name: &str| format!("llama.{name}");
        let heads = file.count(&key("attention.head_count"))?;
        let settings = Self {
            layers: file.count(&key("block_count"))?,
            hidden: file.count(&key("embedding_length"))?,
            feed_forward: file.count(&key("feed_forward_length"))?,
            heads,
            kv_heads: file.count(&key("attention.head_count_kv")).unwrap_or(heads),
            vocabulary: file.tensor_shape("token_embd.weight")?.0[0],
            context: file.count(&key("context_length"))?,
            rms_eps: file.float_or(&key("attention.layer_norm_rms_epsilon"), 1e-5)? as f32,
            rope_base: file.float_or(&key("rope.freq_base"), 10_000.0)? as f32,
        };
        settings.check()?;
        Ok(settings)
    }

    fn check(&self) -> Result<()> {
        let fits = self.heads > 0
            && self.kv_heads > 0
            && self.hidden.is_multiple_of(self.heads)
            && self.heads.is_multiple_of(self.kv_heads)
            && (self.hidden / self.heads).is_multiple_of(2)
            && self.layers > 0
            && self.context > 0;
        if fits {
            Ok(())
        } else {
            Err(Error::ModelLoad(format!(
                "the GGUF settings do not describe a Llama decoder: {self:?}"
            )))
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Width of the key (and of the value) columns: one head per KV head.
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim()
    }
}

/// A dense layer without bias, converted to one of our kernels' formats.
struct Projection(Linear);

impl Projection {
    /// The weights of `names` (same input width) stacked along the outputs.
    fn load(
        file: &GgufFile,
        names: &[String],
        shapes: &[(usize, usize)],
        precision: Precision,
    ) -> Result<Self> {
        let mut parts = Vec::with_capacity(names.len());
        for (name, &(outputs, inputs)) in names.iter().zip(shapes) {
            parts.push(Dense {
                weight: file.dequantized(name, &[outputs, inputs])?,
                bias: vec![0.0; outputs],
                inputs,
                outputs,
            });
        }
        Ok(Self(Linear::new(Dense::concat(parts), precision)))
    }

    /// `x` is `[rows, inputs]`, the result `[rows, outputs]`.
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        self.0.forward(x, rayon::current_num_threads())
    }
}

struct Block {
    attention_norm: Vec<f32>,
    /// Query, key and value stacked: `[hidden + 2 kv_width, hidden]`.
    qkv: Projection,
    attention_output: Projection,
    feed_forward_norm: Vec<f32>,
    /// Gate and up stacked: `[2 feed_forward, hidden]`.
    gate_up: Projection,
    down: Projection,
}

impl Block {
    fn load(
        file: &GgufFile,
        index: usize,
        s: &LlamaSettings,
        precision: Precision,
    ) -> Result<Self> {
        let name = |part: &str| format!("blk.{index}.{part}.weight");
        let (h, kv, ff) = (s.hidden, s.kv_width(), s.feed_forward);
        let projection = |parts: &[&str], shapes: &[(usize, usize)]| {
            let names: Vec<String> = parts.iter().map(|part| name(part)).collect();
            Projection::load(file, &names, shapes, precision)
        };
        Ok(Self {
            attention_norm: file.dequantized(&name("attn_norm"), &[h])?,
            qkv: projection(&["attn_q", "attn_k", "attn_v"], &[(h, h), (kv, h), (kv, h)])?,
            attention_output: projection(&["attn_output"], &[(h, h)])?,
            feed_forward_norm: file.dequantized(&name("ffn_norm"), &[h])?,
            gate_up: projection(&["ffn_gate", "ffn_up"], &[(ff, h), (ff, h)])?,
            down: projection(&["ffn_down"], &[(h, ff)])?,
        })
    }
}

pub struct NativeLlama {
    settings: LlamaSettings,
    /// `[vocabulary, hidden]`, f32.
    embeddings: Vec<f32>,
    blocks: Vec<Block>,
    output_norm: Vec<f32>,
    /// cos and sin of every position's rotation angles, `[context][head_dim / 2]`.
    rope: RopeTable,
}

/// Rotary position embedding angles, computed once.
struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
    pairs: usize,
}

impl RopeTable {
    fn new(positions: usize, head_dim: usize, base: f32) -> Self {
        let pairs = head_dim / 2;
        let mut cos = Vec::with_capacity(positions * pairs);
        let mut sin = Vec::with_capacity(positions * pairs);
        for position in 0..positions {
            for i in 0..pairs {
                // In f64: the angle of a late position loses digits in f32.
                let frequency = f64::from(base).powf(-2.0 * i as f64 / head_dim as f64);
                let angle = position as f64 * frequency;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Self { cos, sin, pairs }
    }

    /// Rotates each adjacent pair `(x[2i], x[2i+1])` of one head's vector by
    /// the angles of `position`: the layout GGUF files store Q and K weights
    /// for (llama.cpp's "normal" RoPE).
    fn rotate(&self, head: &mut [f32], position: usize) {
        let cos = &self.cos[position * self.pairs..][..self.pairs];
        let sin = &self.sin[position * self.pairs..][..self.pairs];
        for ((pair, c), s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
            let (x0, x1) = (pair[0], pair[1]);
            pair[0] = x0 * c - x1 * s;
            pair[1] = x0 * s + x1 * c;
        }
    }
}

/// Query rows attended at once: bounds a task's scores to
/// `QUERY_BLOCK x length` however long the text.
const QUERY_BLOCK: usize = 128;

impl NativeLlama {
    /// Reads and converts every weight; `positions` bounds the RoPE table
    /// (the longest sequence the backbone accepts).
    pub fn load(
        file: &GgufFile,
        settings: &LlamaSettings,
        precision: Precision,
        positions: usize,
    ) -> Result<Self> {
        let s = settings;
        let blocks = (0..s.layers)
            .map(|index| Block::load(file, index, s, precision))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            settings: s.clone(),
            embeddings: file.dequantized("token_embd.weight", &[s.vocabulary, s.hidden])?,
            blocks,
            output_norm: file.dequantized("output_norm.weight", &[s.hidden])?,
            rope: RopeTable::new(positions, s.head_dim(), s.rope_base),
        })
    }

    /// The final (normalized) hidden state of every token of `texts`, packed
    /// `[tokens, hidden]` in the texts' order.
    pub fn forward(&self, texts: &[&[u32]]) -> Result<Vec<f32>> {
        let mut watch = Stopwatch::start();
        let x = crate::backbone::on_thread_pool(|| self.forward_on_pool(texts, &mut watch))?;
        watch.finish(x.len() / self.settings.hidden);
        Ok(x)
    }

    fn forward_on_pool(&self, texts: &[&[u32]], watch: &mut Stopwatch) -> Result<Vec<f32>> {
        let mut offsets = vec![0usize];
        for text in texts {
            if text.len() > self.rope.cos.len() / self.rope.pairs {
                return Err(Error::Inference(format!(
                    "a text of {} tokens is longer than the engine's {} positions",
                    text.len(),
                    self.rope.cos.len() / self.rope.pairs
                )));
            }
            offsets.push(offsets[offsets.len() - 1] + text.len());
        }
        let mut x = self.embed_tokens(texts)?;
        watch.lap("embeddings");
        for block in &self.blocks {
            self.block_forward(block, &mut x, &offsets, watch);
        }
        let h = self.settings.hidden;
        x.par_chunks_mut(h)
            .for_each(|row| rms_norm(row, &self.output_norm, self.settings.rms_eps));
        watch.lap("norms");
        Ok(x)
    }

    fn embed_tokens(&self, texts: &[&[u32]]) -> Result<Vec<f32>> {
        let h = self.settings.hidden;
        let mut x = Vec::with_capacity(texts.iter().map(|t| t.len()).sum::<usize>() * h);
        for &id in texts.iter().flat_map(|t| t.iter()) {
            let row = self
                .embeddings
                .get(id as usize * h..(id as usize + 1) * h)
                .ok_or_else(|| {
                    Error::Inference(format!("token id {id} is outside the vocabulary"))
                })?;
            x.extend_from_slice(row);
        }
        Ok(x)
    }

    /// One decoder block over the packed tokens `x`, in place.
    fn block_forward(
        &self,
        block: &Block,
        x: &mut [f32],
        offsets: &[usize],
        watch: &mut Stopwatch,
    ) {
        let s = &self.settings;
        let (h, ff) = (s.hidden, s.feed_forward);
        let mut normed = x.to_vec();
        normed
            .par_chunks_mut(h)
            .for_each(|row| rms_norm(row, &block.attention_norm, s.rms_eps));
        watch.lap("norms");
        let mut qkv = block.qkv.forward(&normed);
        watch.lap("qkv_projection");
        self.rotate_queries_and_keys(&mut qkv, offsets);
        watch.lap("rope");
        let context = self.attention(&qkv, offsets);
        watch.lap("attention");
        let attended = block.attention_output.forward(&context);
        watch.lap("attention_output");
        x.par_iter_mut().zip(&attended).for_each(|(x, a)| *x += a);
        let mut normed = x.to_vec();
        normed
            .par_chunks_mut(h)
            .for_each(|row| rms_norm(row, &block.feed_forward_norm, s.rms_eps));
        watch.lap("norms");
        let gate_up = block.gate_up.forward(&normed);
        watch.lap("feed_forward_in");
        let mut inner = vec![0f32; gate_up.len() / 2];
        inner
            .par_chunks_mut(ff)
            .zip(gate_up.par_chunks(2 * ff))
            .for_each(|(out, row)| swiglu(out, &row[..ff], &row[ff..]));
        watch.lap("swiglu");
        let down = block.down.forward(&inner);
        watch.lap("feed_forward_out");
        x.par_iter_mut().zip(&down).for_each(|(x, d)| *x += d);
    }

    /// RoPE on every query and key head of every token, by its position in
    /// its own text.
    fn rotate_queries_and_keys(&self, qkv: &mut [f32], offsets: &[usize]) {
        let s = &self.settings;
        let d = s.head_dim();
        let rotated = s.hidden + s.kv_width();
        let stride = rotated + s.kv_width();
        let positions: Vec<usize> = offsets.windows(2).flat_map(|w| 0..w[1] - w[0]).collect();
        qkv.par_chunks_mut(stride)
            .zip(positions.par_iter())
            .for_each(|(row, &position)| {
                for head in row[..rotated].chunks_exact_mut(d) {
                    self.rope.rotate(head, position);
                }
            });
    }

    /// Causal attention of every query head of every text; `qkv` is
    /// `[tokens, hidden + 2 kv_width]`, the result `[tokens, hidden]`.
    fn attention(&self, qkv: &[f32], offsets: &[usize]) -> Vec<f32> {
        let s = &self.settings;
        let (h, d) = (s.hidden, s.head_dim());
        let stride = h + 2 * s.kv_width();
        let group = s.heads / s.kv_heads;
        let tokens = offsets[offsets.len() - 1];
        let mut context = vec![0f32; tokens * h];
        let out = SharedOut::new(&mut context);
        let scale = 1.0 / (d as f32).sqrt();
        let tasks: Vec<(usize, usize, usize)> = (0..offsets.len() - 1)
            .flat_map(|text| {
                let len = offsets[text + 1] - offsets[text];
                (0..s.heads).flat_map(move |head| {
                    (0..len)
                        .step_by(QUERY_BLOCK)
                        .map(move |first| (text, head, first))
                })
            })
            .collect();
        tasks.par_iter().for_each(|&(text, head, first)| {
            let start = offsets[text];
            let len = offsets[text + 1] - start;
            let rows = QUERY_BLOCK.min(len - first);
            // Causal: the block's last query sees keys 0..=first + rows - 1.
            let keys = first + rows;
            let kv_head = head / group;
            let q = qkv[(start + first) * stride + head * d..].as_ptr();
            let k = qkv[start * stride + h + kv_head * d..].as_ptr();
            let v = qkv[start * stride + h + s.kv_width() + kv_head * d..].as_ptr();
            let views = (
                Strided::rows(q, stride),
                Strided::rows(k, stride),
                Strided::rows(v, stride),
            );
            let at = out.at((start + first) * h + head * d);
            // SAFETY: Q is `rows` rows and K and V `keys` rows of `d` values
            // with row stride `stride` inside `qkv`. Each task writes only its
            // own query rows of text `text` and columns head*d..(head+1)*d of
            // `context`, which no other task touches; `context` outlives the
            // parallel loop.
            unsafe { attend_head(views, (rows, keys, d), (at, h), scale, Some(first)) };
        });
        context
    }
}

/// `row * rsqrt(mean(row^2) + eps) * weight`, in place.
fn rms_norm(row: &mut [f32], weight: &[f32], eps: f32) {
    let mean_square = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    let scale = 1.0 / (mean_square + eps).sqrt();
    row.iter_mut()
        .zip(weight)
        .for_each(|(v, w)| *v *= scale * w);
}

/// SwiGLU: `silu(gate) * up`.
fn swiglu(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

#[cfg(test)]
pub(crate) mod tests;
