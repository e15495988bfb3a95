//! A tiny random BERT for the tests of the layers that use this graph.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::Config as BertConfig;

use super::BertGraph;

/// A two-layer BERT of width 16 with seeded random weights under
/// PyTorch's names, built by candle-transformers' loader's own list.
pub fn tiny_weights() -> (BertConfig, HashMap<String, Tensor>) {
    let config = BertConfig {
        vocab_size: 50,
        hidden_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 32,
        max_position_embeddings: 24,
        type_vocab_size: 2,
        ..BertConfig::default()
    };
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        (
            "embeddings.word_embeddings.weight".into(),
            vec![config.vocab_size, h],
        ),
        ("embeddings.position_embeddings.weight".into(), vec![24, h]),
        ("embeddings.token_type_embeddings.weight".into(), vec![2, h]),
        ("embeddings.LayerNorm.weight".into(), vec![h]),
        ("embeddings.LayerNorm.bias".into(), vec![h]),
    ];
    for layer in 0..config.num_hidden_layers {
        let p = format!("encoder.layer.{layer}");
        for (name, shape) in [
            ("attention.self.query", vec![h, h]),
            ("attention.self.key", vec![h, h]),
            ("attention.self.value", vec![h, h]),
            ("attention.output.dense", vec![h, h]),
            ("intermediate.dense", vec![i, h]),
            ("output.dense", vec![h, i]),
        ] {
            shapes.push((format!("{p}.{name}.bias"), vec![shape[0]]));
            shapes.push((format!("{p}.{name}.weight"), shape));
        }
        for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
            shapes.push((format!("{p}.{norm}.weight"), vec![h]));
            shapes.push((format!("{p}.{norm}.bias"), vec![h]));
        }
    }
    // A fixed linear congruential sequence: the same weights on every run.
    let mut state = 12345u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.4
    };
    let tensors = shapes
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let mut values: Vec<f32> = (0..n).map(|_| next()).collect();
            if name.ends_with("LayerNorm.weight") {
                values.iter_mut().for_each(|v| *v += 1.0);
            }
            let tensor = Tensor::from_vec(values, shape, &Device::Cpu).expect("tensor");
            (name, tensor)
        })
        .collect();
    (config, tensors)
}

/// [`tiny_weights`] as a graph computing in `dtype`.
pub fn tiny(dtype: DType) -> BertGraph {
    let (config, tensors) = tiny_weights();
    BertGraph::load(
        VarBuilder::from_tensors(tensors, dtype, &Device::Cpu),
        &config,
    )
    .expect("load")
}
