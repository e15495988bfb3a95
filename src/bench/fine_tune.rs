//! `tlserve bench-finetune`: what fine-tuning (LoRA, or the top layers in
//! full) gains over the default frozen-feature head, on the same labelled texts and the same split. Both
//! heads are fitted on the training file and measured on the test file;
//! prints one JSON object with both accuracies and times.

use std::{path::Path, time::Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{
    backbone::bert::TrainableBert,
    client::{examples::ExampleInput, text_files::parse_tsv},
    config::Config,
    fine_tune::{self, Progress, TextExamples},
    head::{
        fine_tune::FineTuneParams,
        model::HeadWeights,
        train::{self, TrainingSet},
        HeadKind, TrainingParams,
    },
};

pub struct FineTuneBenchOptions<'a> {
    pub backbone: &'a str,
    /// `LABEL<TAB>TEXT` lines, as `tlserve train` reads them.
    pub train: &'a Path,
    pub test: &'a Path,
    /// Train the top layers in full instead of LoRA adapters.
    pub top_layers: bool,
    /// Applied to the method's defaults ([`FineTuneParams::defaults`],
    /// [`FineTuneParams::top_layers`]) for the backbone.
    pub adjust: &'a dyn Fn(&mut FineTuneParams),
    /// Where to write the adapters in peft's layout, with the adapted
    /// features of the test texts (features.jsonl) to compare against peft.
    pub export_peft: Option<&'a Path>,
}

pub fn run(config: &Config, options: &FineTuneBenchOptions<'_>) -> Result<()> {
    let backbone = super::backbone_config(config, options.backbone)?;
    let model = TrainableBert::load(backbone, config.server.model_cache_dir.as_deref())?;
    let (train_texts, train_labels) = read_tsv(options.train)?;
    let (test_texts, test_labels) = read_tsv(options.test)?;
    let mut classes: Vec<String> = train_labels.clone();
    classes.sort();
    classes.dedup();
    let index = |labels: &[String]| class_indices(&classes, labels);
    let train = TextExamples {
        ids: tokenize(&model, &train_texts)?,
        labels: index(&train_labels)?,
        classes: classes.len(),
    };
    let test_ids = tokenize(&model, &test_texts)?;
    let test_labels = index(&test_labels)?;
    let layers = model.graph.num_layers();
    let mut params = match options.top_layers {
        true => FineTuneParams::top_layers(crate::head::fine_tune::DEFAULT_TOP_LAYERS.min(layers)),
        false => FineTuneParams::defaults(layers),
    };
    (options.adjust)(&mut params);

    let started = Instant::now();
    let frozen_head = frozen_head(&model, &train, params.seed)?;
    let frozen_features = fine_tune::adapted_features(&model.graph, None, &test_ids)?;
    let frozen_accuracy = accuracy(&frozen_head, &frozen_features, &test_labels);
    let frozen_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let tuned = fine_tune::fine_tune(
        &model.graph,
        &train,
        &params,
        fine_tune::BottomSource::Compute {
            budget_bytes: config.heads.fine_tune_cache_bytes,
        },
        &CancellationToken::new(),
        &mut report,
    )?;
    let tuned_features =
        fine_tune::adapted_features(&model.graph, Some(&tuned.adapter), &test_ids)?;
    let tuned_accuracy = accuracy(&tuned.head, &tuned_features, &test_labels);
    if let Some(dir) = options.export_peft {
        export(
            dir,
            &tuned.adapter,
            model.graph.hidden_size(),
            &tuned_features,
        )?;
    }
    println!(
        "{}",
        json!({
            "backbone": options.backbone,
            "train_examples": train.labels.len(),
            "test_examples": test_labels.len(),
            "classes": classes.len(),
            "frozen_test_accuracy": frozen_accuracy,
            "frozen_seconds": frozen_seconds,
            "tuned_test_accuracy": tuned_accuracy,
            "tuned_seconds": started.elapsed().as_secs_f64(),
            "tuned_kept_epoch": tuned.metrics.epoch,
            "settings": {
                "method": params.method,
                "epochs": params.epochs, "batch_size": params.batch_size,
                "learning_rate": params.learning_rate, "head_learning_rate": params.head_learning_rate,
                "seed": params.seed,
            },
            "threads": candle_core::utils::get_num_threads(),
        })
    );
    Ok(())
}

/// Each label's index among `classes` (sorted): the training labels.
fn class_indices(classes: &[String], labels: &[String]) -> Result<Vec<u32>> {
    labels
        .iter()
        .map(|l| {
            classes
                .binary_search(l)
                .map(|i| i as u32)
                .map_err(|_| anyhow::anyhow!("test label `{l}` is not among the training labels"))
        })
        .collect()
}

/// The adapters in peft's layout, and the test texts' adapted features, one
/// JSON array per line.
fn export(
    dir: &Path,
    adapter: &crate::backbone::Adapter,
    hidden: usize,
    features: &[f32],
) -> Result<()> {
    let Some(lora) = adapter.lora() else {
        bail!("--export-peft exports LoRA adapters; the top layers have no peft layout");
    };
    lora.export_peft(dir)?;
    let mut lines = String::new();
    for row in features.chunks_exact(hidden) {
        lines.push_str(&serde_json::to_string(row)?);
        lines.push('\n');
    }
    let path = dir.join("features.jsonl");
    std::fs::write(&path, lines).with_context(|| format!("cannot write {}", path.display()))
}

/// Progress on stderr: every epoch, and every 25th step.
fn report(progress: &Progress) {
    match progress {
        Progress::Step { step, steps, loss } if step % 25 == 0 || step == steps => {
            eprintln!("step {step}/{steps}: loss {loss:.4}");
        }
        Progress::Step { .. } => {}
        Progress::Epoch(m) => eprintln!(
            "epoch {}: train loss {:.4}, accuracy {:.4}; held out loss {:?}, accuracy {:?}",
            m.epoch, m.train_loss, m.train_accuracy, m.validation_loss, m.validation_accuracy
        ),
    }
}

/// The default TrainHead head (linear, L-BFGS, penalty by cross-validation)
/// on every training example's frozen features.
fn frozen_head(model: &TrainableBert, train: &TextExamples, seed: u64) -> Result<HeadWeights> {
    let set = TrainingSet {
        features: fine_tune::adapted_features(&model.graph, None, &train.ids)?,
        dim: model.graph.hidden_size(),
        labels: train.labels.clone(),
        classes: train.classes,
    };
    let params = TrainingParams {
        seed,
        ..TrainingParams::default()
    };
    let trained = train::train(
        &set,
        &HeadKind::Linear,
        &params,
        &CancellationToken::new(),
        &mut |_, _| {},
    )?;
    Ok(trained.weights)
}

fn accuracy(head: &HeadWeights, features: &[f32], labels: &[u32]) -> f64 {
    let dim = head.input_dim();
    let right = features
        .chunks_exact(dim)
        .zip(labels)
        .filter(|(row, &label)| {
            let logits = head.logits(row);
            let best = logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i as u32);
            best == Some(label)
        })
        .count();
    right as f64 / labels.len().max(1) as f64
}

fn tokenize(model: &TrainableBert, texts: &[String]) -> Result<Vec<Vec<u32>>> {
    texts
        .iter()
        .enumerate()
        .map(|(i, text)| Ok(model.encoder.encode(i, text, true)?.ids))
        .collect()
}

/// Texts and labels of a `LABEL<TAB>TEXT` file, as `tlserve train` reads it.
fn read_tsv(path: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut texts = Vec::new();
    let mut labels = Vec::new();
    for example in parse_tsv(&text, &path.display().to_string())? {
        let ExampleInput::Text(text) = example.input else {
            bail!(
                "{}: only texts can fine-tune a text backbone",
                path.display()
            );
        };
        texts.push(text);
        labels.push(example.label);
    }
    Ok((texts, labels))
}
