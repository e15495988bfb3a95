//! Benchmarks: a load generator against a running server, and in-process
//! measurements of a backbone's forward pass and of fine-tuning.

use std::path::PathBuf;

use anyhow::{Context, Result};

use tlserve::{bench, loadgen, proto};

use super::{load_config, print_json, ConfigFile, ServerAddr};

/// `tlserve bench`: the server, the backbone, and the shape of the load.
#[derive(clap::Args)]
pub struct LoadArgs {
    #[command(flatten)]
    server: ServerAddr,
    #[arg(long, default_value = "all-MiniLM-L6-v2")]
    backbone: String,
    /// Concurrent clients, each on its own connection.
    #[arg(long, short = 'c', default_value_t = 8)]
    concurrency: usize,
    /// Stop after this many seconds.
    #[arg(long)]
    duration_seconds: Option<f64>,
    /// Stop after this many requests.
    #[arg(long)]
    requests: Option<usize>,
    /// Inputs (texts or images) per request.
    #[arg(long, short = 'k', default_value_t = 1)]
    inputs_per_request: usize,
    /// A file with one text per line; default: a few built-in sentences.
    #[arg(long, conflicts_with = "images")]
    corpus: Option<PathBuf>,
    /// A file with one image path per line (relative to the file): requests
    /// carry these encoded images instead of texts.
    #[arg(long)]
    images: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "online")]
    priority: tlserve::batching::Priority,
    /// Deadline of each request, in milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Ask for the adapted features of this fine-tuned head (Embed's `head`).
    #[arg(long)]
    head: Option<String>,
}

/// Sentences `tlserve bench` sends when no corpus is given.
const SAMPLE_TEXTS: &[&str] = &[
    "A cat sits on the mat.",
    "The weather is lovely today.",
    "How do I reset my password?",
    "Transfer learning reuses what a pretrained model already knows.",
    "The stock market fell sharply after the announcement.",
    "She plays the violin in a small orchestra.",
    "Where is the nearest train station?",
    "This movie was a complete waste of time.",
    "Fresh bread smells wonderful in the morning.",
    "The server answered every request within a few milliseconds.",
    "Please send me the report by Friday.",
    "Mountains covered in snow glowed at sunset.",
    "I would like to cancel my subscription.",
    "The committee approved the new budget on Tuesday.",
    "Children were playing football in the park.",
    "Quantum computers may one day break today's encryption.",
];

/// The load run's corpus: the file's non-blank lines, or built-in sentences.
fn corpus_texts(path: Option<&std::path::Path>) -> Result<Vec<String>> {
    Ok(match path {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read corpus {}", path.display()))?
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(str::to_owned)
            .collect(),
        None => SAMPLE_TEXTS.iter().map(|s| s.to_string()).collect(),
    })
}

/// The images a list file names, one path per line, relative to the list.
fn corpus_images(list: &std::path::Path) -> Result<Vec<proto::input::Kind>> {
    let base = list.parent().unwrap_or(std::path::Path::new("."));
    std::fs::read_to_string(list)
        .with_context(|| format!("cannot read image list {}", list.display()))?
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(|line| {
            let path = base.join(line);
            std::fs::read(&path)
                .map(proto::input::Kind::Image)
                .with_context(|| format!("cannot read image {}", path.display()))
        })
        .collect()
}

/// How long a load run lasts: as asked, or 10 s when neither a duration nor a
/// request count is given.
fn load_duration(
    seconds: Option<f64>,
    requests: Option<usize>,
) -> Result<Option<std::time::Duration>> {
    match (seconds, requests) {
        (None, None) => Ok(Some(std::time::Duration::from_secs(10))),
        (seconds, _) => seconds
            .map(std::time::Duration::try_from_secs_f64)
            .transpose()
            .context("--duration-seconds must be a positive number"),
    }
}

fn print_load_report(report: &loadgen::LoadReport) -> Result<()> {
    eprintln!(
        "{} requests in {:.1}s ({:.1} req/s, {:.1} inputs/s), p50 {:.1} ms, p95 {:.1} ms, \
         p99 {:.1} ms, errors {:?}",
        report.requests,
        report.seconds,
        report.requests_per_sec,
        report.inputs_per_sec,
        report.latency_ms.p50,
        report.latency_ms.p95,
        report.latency_ms.p99,
        report.errors
    );
    print_json(&serde_json::to_value(report)?)
}

/// Runs the load and prints its report.
pub async fn load_test(args: LoadArgs) -> Result<()> {
    let options = loadgen::LoadOptions {
        addr: args.server.addr,
        backbone: args.backbone,
        concurrency: args.concurrency,
        duration: load_duration(args.duration_seconds, args.requests)?,
        requests: args.requests,
        inputs_per_request: args.inputs_per_request,
        corpus: match &args.images {
            Some(list) => corpus_images(list)?,
            None => corpus_texts(args.corpus.as_deref())?
                .into_iter()
                .map(proto::input::Kind::Text)
                .collect(),
        },
        priority: tlserve::wire::convert::priority(args.priority),
        timeout: args.timeout_ms.map(std::time::Duration::from_millis),
        head: args.head,
    };
    print_load_report(&loadgen::run(options).await?)
}

/// `tlserve bench-embed`: the backbone, the corpus, and how to measure.
#[derive(clap::Args)]
pub struct BenchEmbedArgs {
    #[command(flatten)]
    config: ConfigFile,
    #[arg(long)]
    backbone: String,
    #[arg(long)]
    corpus: PathBuf,
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128")]
    batch_sizes: Vec<usize>,
    /// Measure each batch size for at least this long (and one corpus pass).
    #[arg(long, default_value_t = 5.0)]
    min_seconds: f64,
    /// Untimed passes over the corpus at each batch size before timing it
    /// (0: one untimed batch). GPU libraries that tune per shape (PyTorch's
    /// half precision) need one to measure a service's steady state.
    #[arg(long, default_value_t = 0)]
    warm_passes: usize,
    /// Also print, per batch size, where the native BERT engine's time went.
    #[arg(long)]
    profile: bool,
    /// Write every corpus line's embedding here first (JSON lines).
    #[arg(long)]
    embeddings_out: Option<PathBuf>,
}

/// Measures the backbone at each batch size and prints one line per size.
pub fn bench_embed(args: BenchEmbedArgs) -> Result<()> {
    let config = load_config(&args.config.config)?;
    let options = bench::BenchOptions {
        backbone: &args.backbone,
        corpus: &args.corpus,
        batch_sizes: &args.batch_sizes,
        min_seconds: args.min_seconds,
        warm_passes: args.warm_passes,
        profile: args.profile,
        embeddings_out: args.embeddings_out.as_deref(),
    };
    bench::run(&config, &options)?;
    Ok(())
}

/// `tlserve bench-finetune`: the backbone, the labelled sets, and the
/// fine-tuning's parameters.
#[derive(clap::Args)]
pub struct FineTuneBenchArgs {
    #[command(flatten)]
    config: ConfigFile,
    #[arg(long)]
    backbone: String,
    #[arg(long)]
    train: PathBuf,
    #[arg(long)]
    test: PathBuf,
    /// What trains: `lora` adapters or the `top_layers` in full.
    #[arg(long, default_value = "lora", value_parser = ["lora", "top_layers"])]
    method: String,
    /// Trained encoder layers, from the top; default: all (LoRA), 2 (top
    /// layers).
    #[arg(long)]
    layers: Option<usize>,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// Adapted projections: any of query, key, value, attention_output,
    /// intermediate, output.
    #[arg(long, value_delimiter = ',', default_value = "query,value")]
    targets: Vec<String>,
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// The backbone's peak learning rate; default: 5e-4 (LoRA), 5e-5 (top
    /// layers).
    #[arg(long)]
    learning_rate: Option<f64>,
    #[arg(long, default_value_t = 1e-3)]
    head_learning_rate: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the adapters in the Python peft package's layout, and the
    /// test texts' adapted features (features.jsonl), into this folder.
    #[arg(long)]
    export_peft: Option<PathBuf>,
}

impl FineTuneBenchArgs {
    /// Fine-tunes and measures, and prints the comparison.
    pub fn run(self) -> anyhow::Result<()> {
        let config = load_config(&self.config.config)?;
        let targets = tlserve::head::fine_tune::LoraTargets::from_names(&self.targets)?;
        let adjust = |params: &mut tlserve::head::fine_tune::FineTuneParams| {
            if let Some(layers) = self.layers {
                params.method.set_layers(layers);
            }
            if let Some(lora) = params.lora_mut() {
                lora.rank = self.rank;
                lora.alpha = self.alpha;
                lora.targets = targets;
            }
            params.epochs = self.epochs;
            params.batch_size = self.batch_size;
            params.learning_rate = self.learning_rate.unwrap_or(params.learning_rate);
            params.head_learning_rate = self.head_learning_rate;
            params.seed = self.seed;
        };
        let options = bench::fine_tune::FineTuneBenchOptions {
            backbone: &self.backbone,
            train: &self.train,
            test: &self.test,
            top_layers: self.method == "top_layers",
            adjust: &adjust,
            export_peft: self.export_peft.as_deref(),
        };
        bench::fine_tune::run(&config, &options)
    }
}
