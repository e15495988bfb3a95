//! Fine-tuning on a tiny random BERT (two layers, width 16): a task its
//! frozen features do not solve, where adapters must learn.

use candle_core::DType;
use tokio_util::sync::CancellationToken;

use super::{fine_tune, BottomSource, Progress, TextExamples};
use crate::backbone::bert::graph::testing::tiny;
use crate::head::fine_tune::{self as records, FineTuneParams};
use crate::nn::rng::Rng;
use crate::Error;

/// 120 texts of 4-9 tokens from a vocabulary of 3-49; label 1 when token 7
/// occurs in the text. One token among many barely moves a mean-pooled
/// random encoder's output, so the frozen head leaves much to learn.
fn examples() -> TextExamples {
    let mut rng = Rng(42);
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    for n in 0..120 {
        let len = 4 + (rng.next_u64() % 6) as usize;
        let mut text: Vec<u32> = (0..len)
            .map(|_| 3 + (rng.next_u64() % 47) as u32)
            .filter(|&t| t != 7)
            .collect();
        let positive = n % 2 == 0;
        if positive {
            let at = (rng.next_u64() as usize) % text.len().max(1);
            text.insert(at, 7);
        }
        ids.push(text);
        labels.push(u32::from(positive));
    }
    TextExamples {
        ids,
        labels,
        classes: 2,
    }
}

fn params() -> FineTuneParams {
    let mut params = FineTuneParams::defaults(2);
    params.epochs = 8;
    params.batch_size = 8;
    params.learning_rate = 1e-2;
    params.head_learning_rate = 1e-2;
    params.validation_fraction = 0.2;
    params.patience = 0;
    if let Some(lora) = params.lora_mut() {
        lora.targets.key = true;
        lora.targets.intermediate = true;
        lora.targets.output = true;
    }
    params
}

/// [`params`] with the top layer trained in full instead of adapters.
fn top_layer_params() -> FineTuneParams {
    FineTuneParams {
        method: records::Method::TopLayers(records::TopLayerSettings { layers: 1 }),
        ..params()
    }
}

/// Keeps every hidden state of the bottom.
const UNLIMITED: usize = usize::MAX;

fn run(params: &FineTuneParams) -> (super::FineTuned, Vec<Progress>) {
    run_with_budget(params, UNLIMITED)
}

fn run_with_budget(params: &FineTuneParams, budget: usize) -> (super::FineTuned, Vec<Progress>) {
    let mut events = Vec::new();
    let tuned = fine_tune(
        &tiny(DType::F32),
        &examples(),
        params,
        BottomSource::Compute {
            budget_bytes: budget,
        },
        &CancellationToken::new(),
        &mut |p| events.push(p.clone()),
    )
    .expect("fine-tune");
    (tuned, events)
}

/// Training lowers the loss well below the frozen head's, and the kept
/// epoch is at least as good on held-out examples as the frozen head: with
/// adapters, and with the top layer trained in full.
#[test]
fn adapters_learn_what_the_frozen_features_miss() {
    learns_what_the_frozen_features_miss(&params());
}

#[test]
fn top_layers_learn_what_the_frozen_features_miss() {
    let (tuned, _) = learns_what_the_frozen_features_miss(&top_layer_params());
    let layers = tuned.adapter.top_layers().expect("top layers");
    assert_eq!((layers.first_layer, layers.layers.len()), (1, 1));
}

fn learns_what_the_frozen_features_miss(
    params: &FineTuneParams,
) -> (super::FineTuned, Vec<Progress>) {
    let (tuned, events) = run(params);
    let frozen = &tuned.frozen_metrics;
    let epochs: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Progress::Epoch(m) => Some(m.clone()),
            Progress::Step { .. } => None,
        })
        .collect();
    assert_eq!(epochs.first(), Some(frozen), "epoch 0 is the frozen head");
    assert_eq!(epochs.len(), 9);
    let last = epochs.last().expect("epochs");
    eprintln!("frozen {frozen:?}\nlast {last:?}\nkept {:?}", tuned.metrics);
    assert!(
        last.train_loss < 0.5 * frozen.train_loss,
        "training loss {} against the frozen head's {}",
        last.train_loss,
        frozen.train_loss
    );
    let (kept, before) = (
        tuned.metrics.validation_loss.expect("validation"),
        frozen.validation_loss.expect("validation"),
    );
    assert!(
        kept <= before,
        "kept validation loss {kept} above the frozen {before}"
    );
    let steps = events
        .iter()
        .filter(|e| matches!(e, Progress::Step { .. }))
        .count();
    assert_eq!(steps, 8 * 96_usize.div_ceil(8));
    (tuned, events)
}

/// The same seed gives the same adapters (or top layers) and head, bit for
/// bit; another seed another result.
#[test]
fn the_same_seed_gives_the_same_result() {
    for mut params in [params(), top_layer_params()] {
        params.epochs = 2;
        let (first, _) = run(&params);
        let (second, _) = run(&params);
        assert!(first.adapter == second.adapter && first.head == second.head);
        params.seed = 1;
        let (other, _) = run(&params);
        assert!(first.adapter != other.adapter && first.head != other.head);
    }
}

/// Over the memory budget the bottom is computed again for every batch; the
/// run comes out the same (to rounding: the passes pad differently).
#[test]
fn a_bottom_over_the_budget_is_recomputed_with_the_same_result() {
    let mut params = params();
    params.epochs = 2;
    let (kept, _) = run(&params);
    let (recomputed, _) = run_with_budget(&params, 0);
    let (
        crate::head::model::HeadWeights::Linear { output: a },
        crate::head::model::HeadWeights::Linear { output: b },
    ) = (&kept.head, &recomputed.head)
    else {
        panic!("linear heads");
    };
    let gap = a
        .weight
        .iter()
        .zip(&b.weight)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(gap < 1e-4, "head weights differ by {gap}");
    let loss = |t: &super::FineTuned| t.metrics.validation_loss.expect("validation");
    assert!((loss(&kept) - loss(&recomputed)).abs() < 1e-4);
}

/// Adapter dropout is drawn from the seed too: a run repeats exactly, and
/// differs from one without dropout.
#[test]
fn dropout_repeats_with_its_seed() {
    let mut params = params();
    params.epochs = 1;
    params.lora_mut().expect("LoRA").dropout = 0.2;
    let weights = |tuned: &super::FineTuned| match &tuned.head {
        crate::head::model::HeadWeights::Linear { output } => output.weight.clone(),
        _ => panic!("a linear head"),
    };
    let (first, _) = run(&params);
    let (second, _) = run(&params);
    assert_eq!(weights(&first), weights(&second));
    params.lora_mut().expect("LoRA").dropout = 0.0;
    let (without, _) = run(&params);
    assert_ne!(weights(&first), weights(&without));
}

/// A cancel during an epoch stops the run at the next step.
#[test]
fn cancel_stops_within_an_epoch() {
    let cancel = CancellationToken::new();
    let mut steps = 0;
    let outcome = fine_tune(
        &tiny(DType::F32),
        &examples(),
        &params(),
        BottomSource::Compute {
            budget_bytes: UNLIMITED,
        },
        &cancel,
        &mut |p| {
            if matches!(p, Progress::Step { .. }) {
                steps += 1;
                if steps == 3 {
                    cancel.cancel();
                }
            }
        },
    );
    assert!(matches!(outcome, Err(Error::Cancelled(_))));
    assert_eq!(steps, 3);
}

/// Targets by name, and back.
#[test]
fn targets_are_named() {
    let targets = records::LoraTargets::from_names(&["query", "output"]).expect("names");
    assert!(targets.query && targets.output && !targets.value);
    assert_eq!(targets.names(), vec!["query", "output"]);
    assert_eq!(
        records::LoraTargets::default().names(),
        vec!["query", "value"]
    );
    let err = records::LoraTargets::from_names(&["dense"]).expect_err("refused");
    assert!(err.to_string().contains("lora.targets"), "{err}");
}

/// Bounds are checked before any work, naming the field.
#[test]
fn bad_settings_are_refused_by_name() {
    let graph = tiny(DType::F32);
    type Spoil = fn(&mut FineTuneParams);
    fn lora(p: &mut FineTuneParams) -> &mut records::LoraSettings {
        p.lora_mut().expect("LoRA")
    }
    let cases: [(&str, Spoil); 7] = [
        ("lora.layers", |p| lora(p).layers = 3),
        ("lora.rank", |p| lora(p).rank = 0),
        ("lora.alpha", |p| lora(p).alpha = f64::NAN),
        ("lora.targets", |p| {
            lora(p).targets.query = false;
            lora(p).targets.value = false;
        }),
        ("top_layers.layers", |p| {
            p.method = records::Method::TopLayers(records::TopLayerSettings { layers: 3 })
        }),
        ("learning_rate", |p| p.learning_rate = 0.0),
        ("batch_size", |p| p.batch_size = 0),
    ];
    for (field, spoil) in cases {
        let mut params = FineTuneParams::defaults(2);
        spoil(&mut params);
        let err = fine_tune(
            &graph,
            &examples(),
            &params,
            BottomSource::Compute {
                budget_bytes: UNLIMITED,
            },
            &CancellationToken::new(),
            &mut |_| {},
        )
        .err()
        .expect("refused");
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.starts_with(field)),
            "{field}: {err}"
        );
    }
}
