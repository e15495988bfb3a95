use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::BertModel;

use super::{BertGraph, Kernels, TrainableLayers, Tuning};
use crate::backbone::bert::lora::{LayerAdapters, LowRank};
use crate::backbone::bert::top_layers::TopLayers;
use crate::nn::rng::Rng;

/// Two texts, the second padded: ids and mask `[2, 6]`.
fn batch() -> (Tensor, Tensor) {
    let ids = Tensor::new(&[[1u32, 7, 9, 3, 4, 2], [1, 11, 2, 0, 0, 0]], &Device::Cpu);
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], &Device::Cpu);
    (ids.expect("ids"), mask.expect("mask"))
}

fn graph(dtype: DType) -> BertGraph {
    super::testing::tiny(dtype)
}

fn rows(t: &Tensor) -> Vec<f32> {
    t.flatten_all().and_then(|t| t.to_vec1()).expect("values")
}

/// Against candle-transformers' BertModel (an independent implementation)
/// in f32: token vectors of real tokens agree to 1e-5 (padding rows are
/// never pooled).
#[test]
fn f32_graph_matches_candle_transformers() {
    let (config, tensors) = super::testing::tiny_weights();
    let reference = BertModel::load(
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
        &config,
    )
    .expect("reference");
    let (ids, mask) = batch();
    let expected = reference
        .forward(&ids, &ids.zeros_like().expect("types"), Some(&mask))
        .expect("reference forward");
    let ours = graph(DType::F32).forward(&ids, &mask).expect("forward");
    assert_eq!(ours.dims(), &[2, 6, 16]);
    let real = [(0, 6), (1, 3)];
    for (text, len) in real {
        let a = rows(&ours.get(text).unwrap().narrow(0, 0, len).unwrap());
        let b = rows(&expected.get(text).unwrap().narrow(0, 0, len).unwrap());
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "text {text}: largest difference {worst}");
    }
}

/// LoRA adapters on all six projections of the top `layers` layers, `A`
/// and `B` drawn from `seed` (a trained state; a new adapter's `B` is 0).
fn adapters(graph: &BertGraph, layers: usize, seed: u64) -> Vec<LayerAdapters> {
    let mut rng = Rng(seed);
    let (h, i) = (graph.hidden_size(), graph.intermediate_size());
    let spec = (graph.dtype(), &Device::Cpu);
    let mut lora = |inputs: usize, outputs: usize| {
        let adapter = LowRank::new((inputs, outputs), 2, 4.0, &mut rng, spec).expect("adapter");
        let b = Tensor::from_vec(
            rng.uniform(outputs * 2, -0.3, 0.3),
            (outputs, 2),
            &Device::Cpu,
        )
        .and_then(|b| b.to_dtype(spec.0))
        .expect("b");
        adapter.b.set(&b).expect("set b");
        Some(adapter)
    };
    (0..layers)
        .map(|_| LayerAdapters {
            query: lora(h, h),
            key: lora(h, h),
            value: lora(h, h),
            attention_output: lora(h, h),
            intermediate: lora(h, i),
            output: lora(i, h),
        })
        .collect()
}

/// The plain operations compute what the fused kernels do (f32, 1e-5).
#[test]
fn differentiable_kernels_match_the_fused_ones() {
    let (ids, mask) = batch();
    let model = graph(DType::F32);
    let fused = rows(&model.forward(&ids, &mask).expect("fused"));
    let plain = rows(
        &model
            .forward_adapted(&ids, &mask, &Tuning::Frozen(0), Kernels::Differentiable)
            .expect("plain"),
    );
    let worst = fused
        .iter()
        .zip(&plain)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "largest difference {worst}");
}

/// A new adapter (B = 0) leaves every output exactly as it was.
#[test]
fn new_adapters_reproduce_the_base_model_exactly() {
    let (ids, mask) = batch();
    let model = graph(DType::F32);
    let mut adapters = adapters(&model, 2, 7);
    for layer in &mut adapters {
        for adapter in [
            &mut layer.query,
            &mut layer.key,
            &mut layer.value,
            &mut layer.attention_output,
            &mut layer.intermediate,
            &mut layer.output,
        ]
        .into_iter()
        .flatten()
        {
            adapter
                .b
                .set(&adapter.b.zeros_like().expect("zeros"))
                .expect("set");
        }
    }
    let tunings = [
        Tuning::Lora(adapters),
        Tuning::Layers(model.trainable_top(2).expect("copies")),
    ];
    for kernels in [Kernels::Fused, Kernels::Differentiable] {
        let base = rows(
            &model
                .forward_adapted(&ids, &mask, &Tuning::Frozen(0), kernels)
                .expect("base"),
        );
        for tuning in &tunings {
            let adapted = rows(
                &model
                    .forward_adapted(&ids, &mask, tuning, kernels)
                    .expect("adapted"),
            );
            assert_eq!(base, adapted, "{kernels:?}");
        }
    }
}

/// Top layers copied to the host and back are the same layers: the same
/// outputs, bit for bit, after a change to their weights.
#[test]
fn top_layers_survive_the_trip_to_the_host() {
    let (ids, mask) = batch();
    let model = graph(DType::F32);
    let layers = trained_layers(&model, 2, 4);
    let host = layers.to_host(0).expect("host");
    assert_eq!(host.layers.len(), 2);
    assert!(host.layers.iter().all(|l| l.fits(16, 32)));
    let back = model.top_layers(&host).expect("back");
    let run = |tuning: Tuning| {
        rows(
            &model
                .forward_adapted(&ids, &mask, &tuning, Kernels::Fused)
                .expect("forward"),
        )
    };
    let before = run(Tuning::Frozen(0));
    let (a, b) = (run(Tuning::Layers(layers)), run(Tuning::Layers(back)));
    assert_eq!(a, b);
    assert_ne!(a, before, "the layers changed the outputs");
    let wrong = TopLayers::new(1, host.layers.clone());
    assert!(
        model.top_layers(&wrong).is_err(),
        "three layers from 1 of 2"
    );
}

/// A fixed random projection of the real tokens' vectors: a scalar loss
/// that every adapter influences.
fn loss(model: &BertGraph, tuning: &Tuning) -> Tensor {
    let (ids, mask) = batch();
    let out = model
        .forward_adapted(&ids, &mask, tuning, Kernels::Differentiable)
        .expect("forward")
        .to_dtype(DType::F64)
        .expect("f64");
    let mut rng = Rng(99);
    let weights = Tensor::from_vec(
        rng.uniform(2 * 6 * 16, -1.0, 1.0)
            .into_iter()
            .map(f64::from)
            .collect::<Vec<_>>(),
        (2, 6, 16),
        &Device::Cpu,
    )
    .expect("weights");
    let real = mask
        .to_dtype(DType::F64)
        .and_then(|m| m.unsqueeze(2))
        .expect("mask");
    (out * weights)
        .and_then(|x| x.broadcast_mul(&real))
        .and_then(|x| x.sum_all())
        .expect("loss")
}

/// Trainable copies of the top `layers` layers with their weights moved
/// by up to ±0.05 (drawn from `seed`): a trained state.
fn trained_layers(graph: &BertGraph, layers: usize, seed: u64) -> TrainableLayers {
    let mut rng = Rng(seed);
    let copies = graph.trainable_top(layers).expect("copies");
    for var in &copies.vars {
        let t = var.as_tensor();
        let noise = Tensor::from_vec(
            rng.uniform(t.elem_count(), -0.05, 0.05),
            t.shape(),
            &Device::Cpu,
        )
        .and_then(|n| n.to_dtype(t.dtype()))
        .expect("noise");
        var.set(&(t + noise).expect("moved")).expect("set");
    }
    copies
}

/// Every adapter matrix of every adapted layer, and every weight of the
/// top layers trained in full, gets a finite, non-zero gradient through
/// the differentiable graph; the frozen weights none.
#[test]
fn every_trained_tensor_gets_a_gradient() {
    let model = graph(DType::F32);
    let tunings = [
        (Tuning::Lora(adapters(&model, 2, 3)), 2 * 6 * 2),
        (Tuning::Layers(trained_layers(&model, 1, 3)), 12),
    ];
    for (tuning, count) in tunings {
        let grads = loss(&model, &tuning).backward().expect("backward");
        let vars = tuning.vars();
        assert_eq!(vars.len(), count);
        for (n, var) in vars.iter().enumerate() {
            let grad = grads.get(var.as_tensor()).expect("a gradient");
            let values = rows(grad);
            assert!(
                values.iter().all(|v| v.is_finite()),
                "tensor {n}: not finite"
            );
            assert!(values.iter().any(|v| *v != 0.0), "tensor {n}: all zero");
        }
        for frozen in [&model.layers[0].qkv.weight, &model.layers[1].qkv.weight] {
            assert!(
                grads.get(frozen).is_none(),
                "frozen weights take no gradient"
            );
        }
    }
}

/// With the frozen products on the packed kernels, the training pass and
/// the adapters' gradients are those of candle's own products (1e-5
/// relative): the packed backward (grad·W) is right.
#[test]
fn packed_frozen_products_give_the_same_loss_and_gradients() {
    let plain = graph(DType::F32);
    let mut packed = graph(DType::F32);
    packed.pack_frozen_products().expect("pack");
    let adapters = Tuning::Lora(adapters(&plain, 2, 5));
    let (loss_plain, loss_packed) = (loss(&plain, &adapters), loss(&packed, &adapters));
    let scalar = |t: &Tensor| t.to_scalar::<f64>().expect("scalar");
    let gap = (scalar(&loss_plain) - scalar(&loss_packed)).abs();
    assert!(gap <= 1e-5 * scalar(&loss_plain).abs(), "loss gap {gap}");
    let grads_plain = loss_plain.backward().expect("backward");
    let grads_packed = loss_packed.backward().expect("backward");
    for (n, var) in adapters.vars().iter().enumerate() {
        let a = rows(grads_plain.get(var.as_tensor()).expect("gradient"));
        let b = rows(grads_packed.get(var.as_tensor()).expect("gradient"));
        let diff: f32 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
        let norm: f32 = a.iter().map(|x| x * x).sum();
        assert!((diff / norm).sqrt() < 1e-5, "matrix {n}: {diff} / {norm}");
    }
}

/// The gradient candle's autograd computes equals central finite
/// differences of the loss, in f64 (step 1e-6): relative error under 1e-5
/// on three entries of each adapter matrix and of each weight of a layer
/// trained in full, relative to the larger of the two and 1e-3. Not
/// tighter: candle's GELU derivative rounds 1/sqrt(2π) to six digits
/// (relative error 7e-7), and errors of 1.4e-6 were seen.
#[test]
fn trained_tensor_gradients_match_finite_differences() {
    let model = graph(DType::F64);
    for tuning in [
        Tuning::Lora(adapters(&model, 2, 11)),
        Tuning::Layers(trained_layers(&model, 1, 11)),
    ] {
        gradients_match_finite_differences(&model, &tuning);
    }
}

fn gradients_match_finite_differences(model: &BertGraph, tuning: &Tuning) {
    let grads = loss(model, tuning).backward().expect("backward");
    let value = || loss(model, tuning).to_scalar::<f64>().expect("scalar");
    let step = 1e-6;
    for (n, var) in tuning.vars().iter().enumerate() {
        let original = var.as_tensor().copy().expect("copy");
        let shape = original.shape().clone();
        let flat: Vec<f64> = original
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("values");
        let analytic: Vec<f64> = grads
            .get(var.as_tensor())
            .expect("gradient")
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("gradient values");
        for entry in [0, flat.len() / 2, flat.len() - 1] {
            let at = |delta: f64| {
                let mut moved = flat.clone();
                moved[entry] += delta;
                var.set(&Tensor::from_vec(moved, &shape, &Device::Cpu).expect("moved"))
                    .expect("set");
                value()
            };
            let numeric = (at(step) - at(-step)) / (2.0 * step);
            var.set(&original).expect("restore");
            let scale = numeric.abs().max(analytic[entry].abs()).max(1e-3);
            let error = (numeric - analytic[entry]).abs() / scale;
            assert!(
                error < 1e-5,
                "tensor {n} entry {entry}: autograd {} vs finite differences {numeric}",
                analytic[entry]
            );
        }
    }
}

/// Half precision with padding stays finite (the mask bias is the type's
/// lowest finite value) and close to f32: relative error under 2% per
/// real token vector.
#[test]
fn half_precision_with_padding_is_finite_and_close_to_f32() {
    let (ids, mask) = batch();
    let full = graph(DType::F32).forward(&ids, &mask).expect("f32");
    for dtype in [DType::F16, DType::BF16] {
        let half = graph(dtype).forward(&ids, &mask).expect("half");
        assert_eq!(half.dtype(), DType::F32, "results come back as f32");
        for (text, len) in [(0, 6), (1, 3)] {
            let a = rows(&half.get(text).unwrap().narrow(0, 0, len).unwrap());
            let b = rows(&full.get(text).unwrap().narrow(0, 0, len).unwrap());
            assert!(a.iter().all(|v| v.is_finite()), "{dtype:?}: not finite");
            let diff: f32 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
            let size: f32 = b.iter().map(|y| y * y).sum();
            let relative = (diff / size).sqrt();
            assert!(
                relative < 0.02,
                "{dtype:?} text {text}: relative error {relative}"
            );
        }
    }
}
