//! `tlserve bench-embed`: forward-pass throughput of a backbone, in process, on a
//! corpus, for several batch sizes. Prints one JSON object per batch size, in the
//! same format as the sentence-transformers peer script (scripts/bench/), so the two
//! can be compared in one run.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::{
    backbone::{self, Backbone, EmbedItem, Input},
    config::Config,
};

pub struct BenchOptions<'a> {
    pub backbone: &'a str,
    pub corpus: &'a Path,
    pub batch_sizes: &'a [usize],
    pub min_seconds: f64,
}

/// Stops a measurement after this many passes over the corpus even when
/// `min_seconds` has not passed, to keep the run bounded.
const MAX_PASSES: usize = 50;

pub fn run(config: &Config, options: &BenchOptions<'_>) -> Result<()> {
    let backbone_config = config
        .backbones
        .iter()
        .find(|b| b.name == options.backbone)
        .with_context(|| format!("backbone `{}` is not in the config", options.backbone))?;
    let corpus: Vec<String> = std::fs::read_to_string(options.corpus)
        .with_context(|| format!("cannot read corpus {}", options.corpus.display()))?
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect();
    if corpus.is_empty() {
        bail!("corpus {} has no lines", options.corpus.display());
    }
    let model = backbone::load(backbone_config, config.server.model_cache_dir.as_deref())?;
    let threads = candle_core::utils::get_num_threads();

    for &batch_size in options.batch_sizes {
        if batch_size == 0 {
            bail!("batch sizes must be at least 1");
        }
        // One untimed batch first: lets allocations and the thread pool settle.
        embed_batch(model.as_ref(), &corpus, 0, batch_size)?;
        let min = Duration::from_secs_f64(options.min_seconds);
        let started = Instant::now();
        let mut sentences = 0usize;
        while (started.elapsed() < min || sentences < corpus.len())
            && sentences < MAX_PASSES * corpus.len()
        {
            embed_batch(model.as_ref(), &corpus, sentences, batch_size)?;
            sentences += batch_size;
        }
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "{}",
            json!({
                "engine": "tlserve",
                "batch_size": batch_size,
                "sentences": sentences,
                "seconds": seconds,
                "sentences_per_sec": sentences as f64 / seconds,
                "threads": threads,
            })
        );
    }
    Ok(())
}

/// Tokenizes and embeds `batch_size` sentences starting at `offset`, cycling
/// through the corpus; tokenization counts, as it does for the peer.
fn embed_batch(
    model: &dyn Backbone,
    corpus: &[String],
    offset: usize,
    batch_size: usize,
) -> Result<()> {
    let options = model.descriptor().default_options;
    let prepared = (0..batch_size)
        .map(|i| {
            let text = &corpus[(offset + i) % corpus.len()];
            model.prepare(i, Input::Text(text.clone()), true)
        })
        .collect::<crate::Result<Vec<_>>>()?;
    let items: Vec<EmbedItem<'_>> = prepared
        .iter()
        .map(|input| EmbedItem { input, options })
        .collect();
    model.embed(&items)?;
    Ok(())
}
