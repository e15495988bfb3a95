//! `tlserve bench-embed`: forward-pass throughput of a backbone, in process, on a
//! corpus, for several batch sizes. Prints one JSON object per batch size, in the
//! same format as the sentence-transformers peer script (scripts/bench/), so the two
//! can be compared in one run. For an image backbone the corpus lists image files
//! (paths relative to the corpus file), and decoding and preprocessing count, as
//! tokenization does for text. [`fine_tune`]: `tlserve bench-finetune`.

pub mod fine_tune;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde_json::json;

use crate::{
    backbone::{self, image::ImageLimits, profile, Backbone, EmbedItem, Input, Modality},
    config::Config,
};

pub struct BenchOptions<'a> {
    pub backbone: &'a str,
    pub corpus: &'a Path,
    pub batch_sizes: &'a [usize],
    pub min_seconds: f64,
    /// Untimed passes over the corpus at each batch size before it is timed
    /// (0: one untimed batch).
    pub warm_passes: usize,
    /// Also print where the native BERT engine spent its time.
    pub profile: bool,
    /// Before timing, write the embedding of every corpus line here, in order,
    /// one JSON array per line (accuracy comparisons between engines).
    pub embeddings_out: Option<&'a Path>,
}

/// Stops a measurement after this many passes over the corpus even when
/// `min_seconds` has not passed, to keep the run bounded.
const MAX_PASSES: usize = 50;

/// The configuration of the backbone named `name`.
fn backbone_config<'a>(
    config: &'a Config,
    name: &str,
) -> Result<&'a crate::config::BackboneConfig> {
    config
        .backbones
        .iter()
        .find(|b| b.name == name)
        .with_context(|| format!("backbone `{name}` is not in the config"))
}

/// Loads the backbone, then for each batch size warms it up, times it on the
/// corpus and prints the throughput (and the native engine's profile when
/// asked).
pub fn run(config: &Config, options: &BenchOptions<'_>) -> Result<()> {
    let backbone_config = backbone_config(config, options.backbone)?;
    let modality = backbone_config.architecture.modality();
    let corpus = read_corpus(options.corpus, modality)?;
    let model = backbone::load(
        backbone_config,
        config.server.model_cache_dir.as_deref(),
        ImageLimits::from_config(&config.limits),
    )?;
    let threads = candle_core::utils::get_num_threads();
    if let Some(path) = options.embeddings_out {
        write_embeddings(model.as_ref(), &corpus, path)?;
    }
    for &batch_size in options.batch_sizes {
        if batch_size == 0 {
            bail!("batch sizes must be at least 1");
        }
        let measured = measure(model.as_ref(), &corpus, batch_size, options)?;
        let unit = match modality {
            Modality::Text => "sentences",
            Modality::Image => "images",
        };
        println!(
            "{}",
            json!({
                "engine": "tlserve",
                "backbone": options.backbone,
                "batch_size": batch_size,
                unit: measured.count,
                "seconds": measured.seconds,
                (format!("{unit}_per_sec")): measured.count as f64 / measured.seconds,
                "threads": threads,
                "precision": model.descriptor().dtype,
            })
        );
        if let Some(profile) = profile::take().filter(|p| p.passes > 0) {
            // The native engines count tokens and images.
            let counted = match modality {
                Modality::Text => "tokens",
                Modality::Image => "images",
            };
            print_profile(batch_size, measured.seconds, counted, &profile);
        }
    }
    Ok(())
}

/// The corpus's non-empty lines: texts, or for an image backbone the images
/// at those paths (relative to the corpus file).
fn read_corpus(corpus: &Path, modality: Modality) -> Result<Vec<Input>> {
    let lines: Vec<String> = std::fs::read_to_string(corpus)
        .with_context(|| format!("cannot read corpus {}", corpus.display()))?
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect();
    if lines.is_empty() {
        bail!("corpus {} has no lines", corpus.display());
    }
    Ok(match modality {
        Modality::Text => lines.into_iter().map(Input::Text).collect(),
        Modality::Image => {
            let base = corpus.parent().unwrap_or(Path::new("."));
            lines
                .iter()
                .map(|line| {
                    let path = base.join(line);
                    std::fs::read(&path)
                        .map(Input::Image)
                        .with_context(|| format!("cannot read image {}", path.display()))
                })
                .collect::<Result<_>>()?
        }
    })
}

/// Inputs embedded in a timed run, and its wall time.
struct Measured {
    count: usize,
    seconds: f64,
}

/// One batch size's run: untimed work first, then batches cycling through
/// the corpus for at least `min_seconds` and one whole pass, at most
/// [`MAX_PASSES`] passes.
fn measure(
    model: &dyn Backbone,
    corpus: &[Input],
    batch_size: usize,
    options: &BenchOptions<'_>,
) -> Result<Measured> {
    // Untimed work first: one batch lets allocations and the thread pool
    // settle; whole passes also let per-shape tuning finish.
    let warm_up = (options.warm_passes * corpus.len()).max(1);
    let mut start = 0;
    while start < warm_up {
        embed_batch(model, corpus, start, batch_size)?;
        start += batch_size;
    }
    let min = Duration::from_secs_f64(options.min_seconds);
    if options.profile {
        profile::start();
    }
    let started = Instant::now();
    let mut count = 0usize;
    while (started.elapsed() < min || count < corpus.len()) && count < MAX_PASSES * corpus.len() {
        embed_batch(model, corpus, count, batch_size)?;
        count += batch_size;
    }
    Ok(Measured {
        count,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The share of each phase of the native engine in the timed passes, as one
/// JSON line; what is outside the forward passes is tokenization, or decoding
/// and resizing, and the hand-offs between batches.
fn print_profile(batch_size: usize, seconds: f64, counted: &str, profile: &profile::Profile) {
    let forward: f64 = profile.phases.values().map(Duration::as_secs_f64).sum();
    let shares: serde_json::Map<String, serde_json::Value> = profile
        .phases
        .iter()
        .map(|(name, d)| ((*name).to_owned(), json!(d.as_secs_f64() / seconds)))
        .collect();
    println!(
        "{}",
        json!({
            "profile": "native",
            "batch_size": batch_size,
            "passes": profile.passes,
            (counted): profile.inputs,
            "share_of_wall_time": shares,
            "outside_forward": 1.0 - forward / seconds,
        })
    );
}

fn write_embeddings(model: &dyn Backbone, corpus: &[Input], path: &Path) -> Result<()> {
    let mut lines = String::new();
    for start in (0..corpus.len()).step_by(32) {
        let batch = embed_batch(model, corpus, start, 32.min(corpus.len() - start))?;
        for vector in batch {
            lines.push_str(&serde_json::to_string(&vector)?);
            lines.push('\n');
        }
    }
    std::fs::write(path, lines).with_context(|| format!("cannot write {}", path.display()))
}

/// Prepares (tokenizes or decodes) and embeds `batch_size` inputs starting at
/// `offset`, cycling through the corpus; preparing counts, as it does for the peer.
fn embed_batch(
    model: &dyn Backbone,
    corpus: &[Input],
    offset: usize,
    batch_size: usize,
) -> Result<Vec<Vec<f32>>> {
    let options = model.descriptor().default_options;
    // In parallel, as the server prepares a request's inputs.
    let prepared = backbone::on_thread_pool(|| {
        (0..batch_size)
            .into_par_iter()
            .map(|i| {
                let input = &corpus[(offset + i) % corpus.len()];
                model.prepare(i, input.clone(), true)
            })
            .collect::<crate::Result<Vec<_>>>()
    })?;
    let items: Vec<EmbedItem<'_>> = prepared
        .iter()
        .map(|input| EmbedItem::frozen(input, options))
        .collect();
    Ok(model.embed(&items)?)
}
