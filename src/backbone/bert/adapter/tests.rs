use candle_core::{DType, Device, Tensor};

use super::{Adapter, LayerSlots, LoraAdapter, LowRankWeights};
use crate::backbone::bert::lora::{LayerAdapters, LowRank};
use crate::nn::rng::Rng;

fn low_rank(rng: &mut Rng, rank: usize, inputs: usize, outputs: usize) -> LowRankWeights {
    LowRankWeights {
        a: rng.uniform(rank * inputs, -1.0, 1.0),
        b: rng.uniform(outputs * rank, -1.0, 1.0),
        rank,
        inputs,
        outputs,
    }
}

/// An adapter on layer 5 (of 6) with query and feed-forward output slots.
fn sample() -> LoraAdapter {
    let mut rng = Rng(1);
    let mut slots: LayerSlots = Default::default();
    slots[0] = Some(low_rank(&mut rng, 4, 16, 16));
    slots[5] = Some(low_rank(&mut rng, 4, 32, 16));
    LoraAdapter {
        rank: 4,
        alpha: 8.0,
        first_layer: 5,
        layers: vec![slots],
    }
}

/// The update lands in its columns of a wider output, scaled, added to what
/// was there: checked against a plain triple loop in f64.
#[test]
fn updates_add_scaled_low_rank_products_into_their_columns() {
    let mut rng = Rng(3);
    let w = low_rank(&mut rng, 3, 5, 4);
    let rows = 7;
    let x = rng.uniform(rows * 5, -1.0, 1.0);
    let (stride, column) = (10, 6);
    let before = rng.uniform(rows * stride, -1.0, 1.0);
    let mut out = before.clone();
    w.add_update(&x, rows, 0.5, (&mut out, stride, column));
    for i in 0..rows {
        for j in 0..stride {
            let mut expected = f64::from(before[i * stride + j]);
            if (column..column + 4).contains(&j) {
                let o = j - column;
                for r in 0..3 {
                    let low: f64 = (0..5)
                        .map(|k| f64::from(x[i * 5 + k]) * f64::from(w.a[r * 5 + k]))
                        .sum();
                    expected += 0.5 * low * f64::from(w.b[o * 3 + r]);
                }
            }
            let got = f64::from(out[i * stride + j]);
            assert!(
                (got - expected).abs() < 1e-5,
                "({i}, {j}): {got} vs {expected}"
            );
        }
    }
}

/// Stored and read back under peft's names, the adapter is the same.
#[test]
fn tensors_round_trip() {
    let adapter = sample();
    let tensors = adapter.to_tensors().expect("tensors");
    assert_eq!(tensors.len(), 4);
    let back = LoraAdapter::from_tensors(&tensors, 4, 8.0)
        .expect("read")
        .expect("an adapter");
    assert_eq!(back, adapter);
    assert!(LoraAdapter::from_tensors(&Default::default(), 4, 8.0)
        .expect("read")
        .is_none());
    assert!(
        LoraAdapter::from_tensors(&tensors, 2, 8.0).is_err(),
        "wrong rank"
    );
    let mut lacking = tensors.clone();
    lacking.retain(|name, _| !name.ends_with("query.lora_B.weight"));
    assert!(
        LoraAdapter::from_tensors(&lacking, 4, 8.0).is_err(),
        "half a pair"
    );
}

/// Trained graph adapters copied to the host and back compute the same update.
#[test]
fn graph_and_host_adapters_agree() {
    let mut rng = Rng(5);
    let spec = (DType::F32, &Device::Cpu);
    let mut trained = LowRank::new((8, 6), 2, 4.0, &mut rng, spec).expect("adapter");
    let b = Tensor::from_vec(rng.uniform(12, -1.0, 1.0), (6, 2), &Device::Cpu).expect("b");
    trained.b = candle_core::Var::from_tensor(&b).expect("var");
    let layers = vec![LayerAdapters {
        value: Some(trained),
        ..LayerAdapters::default()
    }];
    let host = LoraAdapter::from_trained(&layers, 2, 4.0, 3).expect("host");
    assert_eq!(
        host.layer(3).and_then(|s| s[2].as_ref()).map(|w| w.outputs),
        Some(6)
    );
    assert!(host.layer(2).is_none() && host.layer(4).is_none());
    let x = Tensor::from_vec(rng.uniform(3 * 8, -1.0, 1.0), (3, 8), &Device::Cpu).expect("x");
    let graph = host.to_graph(DType::F32, &Device::Cpu).expect("graph");
    let expected = layers[0]
        .value
        .as_ref()
        .expect("v")
        .delta(&x, false)
        .expect("delta");
    let again = graph[0]
        .value
        .as_ref()
        .expect("v")
        .delta(&x, false)
        .expect("delta");
    let diff = (expected - again)
        .expect("diff")
        .abs()
        .expect("abs")
        .max_all()
        .expect("max")
        .to_scalar::<f32>()
        .expect("scalar");
    assert_eq!(diff, 0.0);
}

/// The export holds peft's tensor names and shapes, and a config whose target
/// expression names exactly the adapted modules.
#[test]
fn peft_export_uses_peft_names_shapes_and_targets() {
    let dir = tempfile::tempdir().expect("temp dir");
    sample().export_peft(dir.path()).expect("export");
    let tensors =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .expect("safetensors");
    let shape = |name: &str| tensors[name].dims().to_vec();
    let q = "base_model.model.encoder.layer.5.attention.self.query";
    let o = "base_model.model.encoder.layer.5.output.dense";
    assert_eq!(shape(&format!("{q}.lora_A.weight")), [4, 16]);
    assert_eq!(shape(&format!("{q}.lora_B.weight")), [16, 4]);
    assert_eq!(shape(&format!("{o}.lora_A.weight")), [4, 32]);
    assert_eq!(shape(&format!("{o}.lora_B.weight")), [16, 4]);
    assert_eq!(tensors.len(), 4);
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).expect("config"),
    )
    .expect("JSON");
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
    assert_eq!(config["lora_alpha"], 8.0);
    let targets = regex_lite(config["target_modules"].as_str().expect("targets"));
    assert!(targets("encoder.layer.5.attention.self.query"));
    assert!(targets("encoder.layer.5.output.dense"));
    assert!(!targets("encoder.layer.5.attention.output.dense"));
    assert!(!targets("encoder.layer.4.attention.self.query"));
}

/// Whether a module name ends with one of the alternatives of `.*(a|b)` (the
/// only shape the export writes), as peft's full match of the expression on
/// the module's name decides: the name ends with an alternative at a dot or at
/// its start.
fn regex_lite(expression: &str) -> impl Fn(&str) -> bool {
    let inner = expression
        .strip_prefix(".*(")
        .and_then(|e| e.strip_suffix(')'))
        .expect("the shape export_peft writes");
    let alternatives: Vec<String> = inner.split('|').map(|a| a.replace("\\.", ".")).collect();
    move |name: &str| {
        alternatives
            .iter()
            .any(|a| name == a || name.ends_with(&format!(".{a}")))
    }
}

/// An adapter with random non-zero matrices on every projection of the top
/// `layers` layers of the tiny test model (width 16, feed-forward 32).
fn tiny_adapter(layers: usize, seed: u64) -> Adapter {
    let mut rng = Rng(seed);
    let (h, i) = (16, 32);
    let shapes = [(h, h), (h, h), (h, h), (h, h), (h, i), (i, h)];
    let layers = (0..layers)
        .map(|_| shapes.map(|(inputs, outputs)| Some(low_rank(&mut rng, 2, inputs, outputs))))
        .collect::<Vec<_>>();
    Adapter::Lora(LoraAdapter {
        rank: 2,
        alpha: 3.0,
        first_layer: 2 - layers.len(),
        layers,
    })
}

/// The top `layers` layers of the tiny test model trained in full: random
/// weights drawn from `seed`.
fn tiny_layers(layers: usize, seed: u64) -> Adapter {
    use crate::backbone::bert::top_layers::{LayerWeights, NormWeights, TopLayers};
    let mut rng = Rng(seed);
    let (h, i) = (16, 32);
    let shapes = [(h, h), (h, h), (h, h), (h, h), (h, i), (i, h)];
    let mut dense = |(inputs, outputs): (usize, usize)| crate::nn::Dense {
        weight: rng.uniform(inputs * outputs, -0.3, 0.3),
        bias: rng.uniform(outputs, -0.1, 0.1),
        inputs,
        outputs,
    };
    let mut weights = Vec::new();
    for _ in 0..layers {
        let dense = shapes.map(&mut dense);
        let norm = NormWeights {
            weight: vec![1.1; h],
            bias: vec![0.05; h],
        };
        weights.push(LayerWeights {
            dense,
            norms: [norm.clone(), norm],
        });
    }
    Adapter::Layers(TopLayers::new(2 - layers, weights))
}

/// Relative distance of two vectors: |a - b| / |b|.
fn relative_gap(a: &[f32], b: &[f32]) -> f64 {
    let diff: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum();
    let norm: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (diff / norm).sqrt()
}

/// The serving pass (the native engine, adapters added per text on its rows
/// of a shared packed pass, heads with their own top layers running them on
/// theirs) and the training pass (candle's graph with differentiable kernels)
/// agree to 1e-5 relative on every token vector, for texts with either of two
/// LoRA adapters, either of two sets of own top layers, or none, mixed in one
/// pass.
#[test]
fn serving_and_training_passes_agree() {
    use crate::backbone::bert::graph::{testing, Kernels, Tuning};
    use crate::backbone::bert::native::NativeBert;
    use candle_nn::VarBuilder;

    let (config, tensors) = testing::tiny_weights();
    let native = NativeBert::load(
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
        &config,
        crate::config::Precision::F32,
    )
    .expect("native model");
    let graph = testing::tiny(DType::F32);
    let top = tiny_adapter(1, 7);
    let both = tiny_adapter(2, 8);
    let own_top = tiny_layers(1, 9);
    let own_both = tiny_layers(2, 10);
    let texts: [&[u32]; 7] = [
        &[1, 5, 9, 2],
        &[1, 7, 7, 3, 11, 2],
        &[1, 4, 2],
        &[1, 30, 2],
        &[1, 12, 13, 2],
        &[1, 8, 2],
        &[1, 6, 6, 6, 2],
    ];
    let adapters = [
        Some(&top),
        None,
        Some(&own_top),
        Some(&both),
        Some(&own_both),
        Some(&top),
        Some(&own_top),
    ];
    let packed = native
        .forward_adapted(&texts, &adapters)
        .expect("serving pass");
    let mut start = 0;
    for (text, adapter) in texts.iter().zip(adapters) {
        let served = &packed[start * 16..(start + text.len()) * 16];
        start += text.len();
        let graph_adapters = match adapter {
            Some(adapter) => adapter.to_graph(&graph).expect("graph"),
            None => Tuning::Frozen(0),
        };
        let (ids, mask) = graph.padded_batch(&[text]).expect("batch");
        let trained: Vec<f32> = graph
            .forward_adapted(&ids, &mask, &graph_adapters, Kernels::Differentiable)
            .expect("training pass")
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("values");
        let gap = relative_gap(served, &trained);
        assert!(gap <= 1e-5, "text {text:?}: relative gap {gap:e}");
    }
    // The adapters change the features: the agreement is not that of two
    // unadapted passes.
    let plain = native.forward(&texts).expect("frozen pass");
    for (text, range) in [(0, 0..4), (2, 10..13)] {
        let gap = relative_gap(
            &plain[range.start * 16..range.end * 16],
            &packed[range.start * 16..range.end * 16],
        );
        assert!(gap > 1e-3, "text {text} unchanged by its adapter");
    }
}
