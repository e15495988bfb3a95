use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::NativeBert;
use crate::backbone::bert::graph::{testing, Kernels};

fn tiny_native() -> NativeBert {
    let (config, tensors) = testing::tiny_weights();
    NativeBert::load(
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
        &config,
        crate::config::Precision::F32,
    )
    .expect("native model")
}

/// Captured token vectors after k layers are those of candle's graph after
/// its first k layers (1e-5 relative); a pass where every text captures
/// stops early and returns no final vectors, and a mixed pass returns both.
#[test]
fn captured_hidden_states_match_the_graphs_bottom() {
    let native = tiny_native();
    let graph = testing::tiny(DType::F32);
    let texts: [&[u32]; 3] = [&[1, 5, 9, 2], &[1, 7, 3, 11, 2], &[1, 4, 2]];
    let none = [None, None, None];
    for layers in 0..=2 {
        let captures = [Some(layers); 3];
        let (rest, captured) = native
            .forward_captured(&texts, &none, &captures)
            .expect("pass");
        assert_eq!(rest.is_empty(), layers < 2, "stops early below the top");
        for (text, rows) in texts.iter().zip(&captured) {
            let rows = rows.as_ref().expect("captured");
            let (ids, mask) = graph.padded_batch(&[text]).expect("batch");
            let expected: Vec<f32> = graph
                .forward_bottom(&ids, &mask, layers, Kernels::Fused)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .expect("graph bottom");
            let diff: f32 = rows
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).powi(2))
                .sum();
            let norm: f32 = expected.iter().map(|b| b * b).sum();
            assert!(
                (diff / norm).sqrt() < 1e-5,
                "layer {layers}: {diff} / {norm}"
            );
        }
    }
    let (full, captured) = native
        .forward_captured(&texts, &none, &[Some(1), None, None])
        .expect("mixed pass");
    assert_eq!(full, native.forward(&texts).expect("plain pass"));
    assert!(captured[0].is_some() && captured[1].is_none());
    assert!(native
        .forward_captured(&texts, &none, &[Some(3), None, None])
        .is_err());
}
