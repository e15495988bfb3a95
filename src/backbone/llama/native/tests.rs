//! The native decoder against a plain loop-by-loop forward pass (f64) on a
//! small generated model; packing, causality, grouped-query heads and query
//! blocks. The model and the plain pass serve the candle graph's tests too. The real model is checked against an
//! independent numpy reference in tests/integration/decoder.rs.

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::*;
use crate::nn::rng::Rng;

pub(crate) const SETTINGS: LlamaSettings = LlamaSettings {
    layers: 2,
    hidden: 32,
    feed_forward: 64,
    heads: 4,
    kv_heads: 2,
    vocabulary: 50,
    context: 400,
    rms_eps: 1e-5,
    rope_base: 10_000.0,
};

/// Weights of a small model: name, shape (`[outputs, inputs]`), values.
pub(crate) fn weights(seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let s = &SETTINGS;
    let mut rng = Rng(seed);
    let mut random = |shape: Vec<usize>, scale: f32| {
        let n = shape.iter().product();
        let values = rng.uniform(n, -scale, scale);
        (shape, values)
    };
    let (h, kv, ff) = (s.hidden, s.kv_heads * (s.hidden / s.heads), s.feed_forward);
    let mut out = Vec::new();
    let mut add =
        |name: String, (shape, values): (Vec<usize>, Vec<f32>)| out.push((name, shape, values));
    add(
        "token_embd.weight".into(),
        random(vec![s.vocabulary, h], 1.0),
    );
    add("output_norm.weight".into(), random(vec![h], 1.0));
    for b in 0..s.layers {
        let name = |part: &str| format!("blk.{b}.{part}.weight");
        add(name("attn_norm"), random(vec![h], 1.0));
        add(name("ffn_norm"), random(vec![h], 1.0));
        add(name("attn_q"), random(vec![h, h], 0.3));
        add(name("attn_k"), random(vec![kv, h], 0.3));
        add(name("attn_v"), random(vec![kv, h], 0.3));
        add(name("attn_output"), random(vec![h, h], 0.2));
        add(name("ffn_gate"), random(vec![ff, h], 0.2));
        add(name("ffn_up"), random(vec![ff, h], 0.2));
        add(name("ffn_down"), random(vec![h, ff], 0.2));
    }
    out
}

/// Writes a GGUF file of `weights`, the linear ones stored as `linear`.
pub(crate) fn write_gguf(
    path: &std::path::Path,
    weights: &[(String, Vec<usize>, Vec<f32>)],
    linear: GgmlDType,
) {
    let s = &SETTINGS;
    let tensors: Vec<(String, QTensor)> = weights
        .iter()
        .map(|(name, shape, values)| {
            let tensor = Tensor::from_slice(values, shape.as_slice(), &Device::Cpu).unwrap();
            let dtype = if shape.len() == 2 && !name.starts_with("token_embd") {
                linear
            } else {
                GgmlDType::F32
            };
            (name.clone(), QTensor::quantize(&tensor, dtype).unwrap())
        })
        .collect();
    let u32_value = |v: usize| gguf_file::Value::U32(v as u32);
    let metadata = [
        (
            "general.architecture",
            gguf_file::Value::String("llama".into()),
        ),
        ("llama.block_count", u32_value(s.layers)),
        ("llama.embedding_length", u32_value(s.hidden)),
        ("llama.feed_forward_length", u32_value(s.feed_forward)),
        ("llama.attention.head_count", u32_value(s.heads)),
        ("llama.attention.head_count_kv", u32_value(s.kv_heads)),
        ("llama.context_length", u32_value(s.context)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            gguf_file::Value::F32(s.rms_eps),
        ),
        ("llama.rope.freq_base", gguf_file::Value::F32(s.rope_base)),
    ];
    let metadata: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
}

fn model(linear: GgmlDType, precision: Precision) -> (NativeLlama, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    write_gguf(&path, &weights(7), linear);
    let file = GgufFile::open(&path).unwrap();
    let settings = LlamaSettings::read(&file).unwrap();
    assert_eq!(settings, SETTINGS);
    (
        NativeLlama::load(&file, &settings, precision, SETTINGS.context).unwrap(),
        dir,
    )
}

/// The decoder written out plainly in f64: one text, every loop explicit.
pub(crate) fn reference(weights: &[(String, Vec<usize>, Vec<f32>)], ids: &[u32]) -> Vec<Vec<f64>> {
    let s = &SETTINGS;
    let get = |name: &str| plain_weight(weights, name);
    let h = s.hidden;
    let embeddings = get("token_embd.weight");
    let mut x: Vec<Vec<f64>> = ids
        .iter()
        .map(|&id| embeddings[id as usize * h..][..h].to_vec())
        .collect();
    for b in 0..s.layers {
        let w = |part: &str| get(&format!("blk.{b}.{part}.weight"));
        plain_attention(&mut x, &w);
        plain_feed_forward(&mut x, &w);
    }
    x.iter()
        .map(|row| plain_norm(row, &get("output_norm.weight")))
        .collect()
}

/// The weight called `name`, in f64.
fn plain_weight(weights: &[(String, Vec<usize>, Vec<f32>)], name: &str) -> Vec<f64> {
    let (_, _, values) = weights.iter().find(|(n, _, _)| n == name).unwrap();
    values.iter().map(|&v| f64::from(v)).collect()
}

/// `w x` for `w` of `[outputs, x.len()]`.
fn plain_linear(w: &[f64], x: &[f64], outputs: usize) -> Vec<f64> {
    (0..outputs)
        .map(|o| (0..x.len()).map(|i| w[o * x.len() + i] * x[i]).sum())
        .collect()
}

/// RMS normalization with the learned scale `w`.
fn plain_norm(x: &[f64], w: &[f64]) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + f64::from(SETTINGS.rms_eps)).sqrt();
    x.iter().zip(w).map(|(v, w)| v * r * w).collect()
}

/// Rotates each head of `v` (pairs of adjacent values) for `position`.
fn plain_rope(v: &mut [f64], position: usize) {
    let d = SETTINGS.hidden / SETTINGS.heads;
    for head in v.chunks_exact_mut(d) {
        for i in 0..d / 2 {
            let angle =
                position as f64 * f64::from(SETTINGS.rope_base).powf(-((2 * i) as f64) / d as f64);
            let (a, b) = (head[2 * i], head[2 * i + 1]);
            head[2 * i] = a * angle.cos() - b * angle.sin();
            head[2 * i + 1] = a * angle.sin() + b * angle.cos();
        }
    }
}

/// One block's causal self-attention, added to `x`; `w` gives the block's
/// weights by part name.
fn plain_attention(x: &mut [Vec<f64>], w: &impl Fn(&str) -> Vec<f64>) {
    let s = &SETTINGS;
    let (h, d) = (s.hidden, s.hidden / s.heads);
    let kv = s.kv_heads * d;
    let (q_w, k_w, v_w) = (w("attn_q"), w("attn_k"), w("attn_v"));
    let mut q = Vec::new();
    let mut k = Vec::new();
    let mut v = Vec::new();
    for (position, row) in x.iter().enumerate() {
        let n = plain_norm(row, &w("attn_norm"));
        let mut qi = plain_linear(&q_w, &n, h);
        let mut ki = plain_linear(&k_w, &n, kv);
        plain_rope(&mut qi, position);
        plain_rope(&mut ki, position);
        q.push(qi);
        k.push(ki);
        v.push(plain_linear(&v_w, &n, kv));
    }
    for t in 0..x.len() {
        let mut context = vec![0f64; h];
        for head in 0..s.heads {
            let g = head / (s.heads / s.kv_heads);
            let scores: Vec<f64> = (0..=t)
                .map(|j| {
                    (0..d)
                        .map(|c| q[t][head * d + c] * k[j][g * d + c])
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let top = scores.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - top).exp()).collect();
            let total: f64 = e.iter().sum();
            for (j, weight) in e.iter().enumerate() {
                for c in 0..d {
                    context[head * d + c] += weight / total * v[j][g * d + c];
                }
            }
        }
        let out = plain_linear(&w("attn_output"), &context, h);
        x[t].iter_mut().zip(out).for_each(|(x, o)| *x += o);
    }
}

/// One block's gated feed-forward layer (SiLU gate), added to `x`.
fn plain_feed_forward(x: &mut [Vec<f64>], w: &impl Fn(&str) -> Vec<f64>) {
    let s = &SETTINGS;
    for row in x.iter_mut() {
        let n = plain_norm(row, &w("ffn_norm"));
        let gate = plain_linear(&w("ffn_gate"), &n, s.feed_forward);
        let up = plain_linear(&w("ffn_up"), &n, s.feed_forward);
        let inner: Vec<f64> = gate
            .iter()
            .zip(&up)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        let down = plain_linear(&w("ffn_down"), &inner, s.hidden);
        row.iter_mut().zip(down).for_each(|(x, o)| *x += o);
    }
}

pub(crate) fn ids(len: usize, seed: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 7 + seed * 13) % SETTINGS.vocabulary as u32)
        .collect()
}

pub(crate) fn max_difference(ours: &[f32], reference: &[Vec<f64>]) -> f64 {
    ours.chunks_exact(SETTINGS.hidden)
        .zip(reference)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(a, b)| (f64::from(*a) - b).abs()))
        .fold(0.0, f64::max)
}

#[test]
fn packed_texts_match_the_plain_forward_pass_one_by_one() {
    let (model, _dir) = model(GgmlDType::F32, Precision::F32);
    let weights = weights(7);
    // Lengths around the query block, and one token.
    let texts = [ids(5, 1), ids(1, 2), ids(QUERY_BLOCK + 9, 3), ids(17, 4)];
    let refs: Vec<&[u32]> = texts.iter().map(Vec::as_slice).collect();
    let ours = model.forward(&refs).unwrap();
    let mut start = 0;
    for text in &texts {
        let expected = reference(&weights, text);
        let rows = &ours[start * SETTINGS.hidden..(start + text.len()) * SETTINGS.hidden];
        let worst = max_difference(rows, &expected);
        assert!(
            worst < 1e-4,
            "text of {} tokens: worst difference {worst:e}",
            text.len()
        );
        start += text.len();
    }
}

#[test]
fn a_token_sees_only_the_tokens_before_it() {
    let (model, _dir) = model(GgmlDType::F32, Precision::F32);
    let text = ids(30, 5);
    let whole = model.forward(&[&text]).unwrap();
    let prefix = model.forward(&[&text[..12]]).unwrap();
    // Equal up to rounding: the products split 30 rows differently from 12.
    let worst = whole
        .iter()
        .zip(&prefix)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "the first 12 tokens changed by {worst:e}");
}

#[test]
fn a_text_beyond_the_positions_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    write_gguf(&path, &weights(3), GgmlDType::F32);
    let file = GgufFile::open(&path).unwrap();
    let model = NativeLlama::load(&file, &SETTINGS, Precision::F32, 8).unwrap();
    let err = model.forward(&[&ids(9, 1)]).unwrap_err().to_string();
    assert!(err.contains("longer than"), "{err}");
    assert!(model.forward(&[&ids(8, 1)]).is_ok());
}

#[test]
fn rms_norm_and_swiglu() {
    let mut row = [3.0f32, 4.0];
    rms_norm(&mut row, &[1.0, 2.0], 0.0);
    // rms = sqrt(12.5)
    let r = 12.5f32.sqrt();
    assert!((row[0] - 3.0 / r).abs() < 1e-6 && (row[1] - 8.0 / r).abs() < 1e-6);
    let mut out = [0.0f32; 2];
    swiglu(&mut out, &[0.0, 2.0], &[5.0, 3.0]);
    assert_eq!(out[0], 0.0);
    assert!((out[1] - 2.0 / (1.0 + (-2.0f32).exp()) * 3.0).abs() < 1e-6);
}
