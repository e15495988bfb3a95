//! The `tlserve` command: the server and a command-line client in one binary.

use std::{
    io::BufRead,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use tlserve::{
    bench, client,
    config::{Config, LogFormat},
    loadgen, proto, server, telemetry,
};

#[derive(Parser)]
#[command(
    name = "tlserve",
    version,
    about = "A gRPC server for transfer learning"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct EmbedArgs {
    #[command(flatten)]
    server: ServerAddr,
    /// The backbone to use (see `tlserve backbones`).
    #[arg(long, short)]
    backbone: String,
    /// Pooling; default: the backbone's.
    #[arg(long, value_enum)]
    pooling: Option<PoolingArg>,
    /// L2-normalize the vectors (true/false); default: the backbone's.
    #[arg(long)]
    normalize: Option<bool>,
    /// Cut texts longer than the backbone's maximum (true/false); default: the
    /// backbone's.
    #[arg(long)]
    truncate: Option<bool>,
    /// An image file (PNG, JPEG, WebP) for an image backbone; repeatable.
    #[arg(long = "image", value_name = "FILE")]
    images: Vec<PathBuf>,
    /// A fine-tuned head (`name` or `name@version`): the features of its
    /// adapted backbone instead of the frozen backbone's.
    #[arg(long)]
    head: Option<String>,
    texts: Vec<String>,
}

/// Where labelled examples come from (`train`, `evaluate`).
#[derive(clap::Args)]
#[group(skip)]
#[command(group(clap::ArgGroup::new("data").required(true).args(["images", "examples"])))]
struct DataArgs {
    /// A folder with one subfolder per class, named as its label, holding
    /// PNG, JPEG or WebP images (the layout of Keras' image_dataset_from_directory
    /// and torchvision's ImageFolder).
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
    /// A text file: `LABEL<TAB>TEXT` lines (.tsv, .txt), CSV (.csv) or JSON
    /// Lines (.jsonl, .ndjson).
    #[arg(long, value_name = "FILE")]
    examples: Option<PathBuf>,
    /// The text file's format, when its extension does not say it.
    #[arg(long, value_enum, requires = "examples")]
    format: Option<FormatArg>,
    /// CSV column (header name, or number from 1) or JSON field holding the
    /// text; default: `text` (CSV without a header: column 2).
    #[arg(long, value_name = "COLUMN", requires = "examples")]
    text_column: Option<client::text_files::Column>,
    /// CSV column or JSON field holding the label; default: `label` (CSV
    /// without a header: column 1).
    #[arg(long, value_name = "COLUMN", requires = "examples")]
    label_column: Option<client::text_files::Column>,
    /// Go on without images that cannot be read (each is reported) instead of
    /// stopping.
    #[arg(long, requires = "images")]
    skip_bad: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Tsv,
    Csv,
    Jsonl,
}

#[derive(Clone, Copy, ValueEnum)]
enum SolverArg {
    Lbfgs,
    Adamw,
}

/// Training options; each one left out is not sent and takes the server's
/// default (see the README's "Training heads").
#[derive(clap::Args)]
struct TrainingArgs {
    /// The solver; default: L-BFGS for a linear head unless an AdamW option
    /// is given, AdamW otherwise.
    #[arg(long, value_enum)]
    solver: Option<SolverArg>,
    /// AdamW: passes over the examples; default: chosen by early stopping.
    #[arg(long)]
    epochs: Option<u32>,
    /// AdamW: the peak learning rate.
    #[arg(long)]
    learning_rate: Option<f32>,
    /// AdamW: examples per step.
    #[arg(long)]
    batch_size: Option<u32>,
    /// AdamW: decoupled weight decay.
    #[arg(long)]
    weight_decay: Option<f32>,
    /// AdamW: share of the examples held out for validation, in (0, 0.5].
    #[arg(long)]
    validation_fraction: Option<f32>,
    /// Train on every example and report no validation metrics.
    #[arg(long)]
    no_validation: bool,
    /// AdamW: epochs without a better validation loss before stopping.
    #[arg(long)]
    early_stopping_patience: Option<u32>,
    /// L-BFGS: the L2 penalty; default: chosen by cross-validation.
    #[arg(long)]
    l2: Option<f32>,
    /// L-BFGS: folds of the cross-validation.
    #[arg(long)]
    cv_folds: Option<u32>,
    /// Weight each label by the inverse of its frequency.
    #[arg(long)]
    balance_classes: bool,
    /// Seed of every random choice of the job (and of --holdout's split).
    #[arg(long)]
    seed: Option<u64>,
    #[command(flatten)]
    fine_tuning: FineTuningArgs,
}

/// What of the backbone trains with the head.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum MethodArg {
    /// The backbone stays frozen; the head trains on its features.
    Frozen,
    /// LoRA adapters on the backbone's top layers train with the head.
    Lora,
    /// The backbone's top layers train in full with the head.
    #[value(name = "top-layers", alias = "top_layers")]
    TopLayers,
}

/// Fine-tuning options of `tlserve train`; the LoRA ones need `--method lora`,
/// the others `--method lora` or `--method top-layers`.
#[derive(clap::Args)]
struct FineTuningArgs {
    /// frozen: train on the backbone's features (default); lora: fine-tune
    /// low-rank adapters of its top layers together with a linear head;
    /// top-layers: fine-tune its top layers in full with a linear head.
    #[arg(long, value_enum, default_value = "frozen")]
    method: MethodArg,
    /// LoRA and top layers: top encoder layers trained; default: all (LoRA),
    /// 2 (top layers).
    #[arg(long)]
    layers: Option<u32>,
    /// LoRA: rank of each adapter; default: 8.
    #[arg(long)]
    rank: Option<u32>,
    /// LoRA: updates are scaled by alpha / rank; default: twice the rank.
    #[arg(long)]
    alpha: Option<f32>,
    /// LoRA: dropout on each adapter's input while training; default: 0.
    #[arg(long)]
    lora_dropout: Option<f32>,
    /// LoRA: adapted projections, comma-separated (query, key, value,
    /// attention_output, intermediate, output); default: query,value.
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// LoRA and top layers: peak learning rate of the backbone's trained
    /// weights; default: 0.0005 (LoRA), 0.00005 (top layers)
    /// (--learning-rate is the head's).
    #[arg(long)]
    backbone_learning_rate: Option<f32>,
    /// LoRA and top layers: share of the steps spent warming up; default: 0.1.
    #[arg(long)]
    warmup_fraction: Option<f32>,
}

impl FineTuningArgs {
    fn flags(self) -> Result<Option<client::FineTuningFlags>> {
        let flags = client::FineTuningFlags {
            top_layers: self.method == MethodArg::TopLayers,
            layers: self.layers,
            rank: self.rank,
            alpha: self.alpha,
            dropout: self.lora_dropout,
            targets: self.targets,
            backbone_learning_rate: self.backbone_learning_rate,
            warmup_fraction: self.warmup_fraction,
        };
        let lora_only_given = flags.rank.is_some()
            || flags.alpha.is_some()
            || flags.dropout.is_some()
            || !flags.targets.is_empty();
        let tuning_given = flags.layers.is_some()
            || flags.backbone_learning_rate.is_some()
            || flags.warmup_fraction.is_some();
        match self.method {
            MethodArg::Lora => Ok(Some(flags)),
            MethodArg::TopLayers if lora_only_given => anyhow::bail!(
                "--rank, --alpha, --lora-dropout and --targets are LoRA options; they need \
                 --method lora"
            ),
            MethodArg::TopLayers => Ok(Some(flags)),
            MethodArg::Frozen if lora_only_given || tuning_given => {
                anyhow::bail!("the fine-tuning options need --method lora or top-layers")
            }
            MethodArg::Frozen => Ok(None),
        }
    }
}

#[derive(clap::Args)]
struct TrainArgs {
    #[command(flatten)]
    server: ServerAddr,
    #[arg(long, short)]
    backbone: String,
    /// Name to publish the head under.
    #[arg(long)]
    head: String,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    training: TrainingArgs,
    /// Train an MLP head with this hidden size (dropout 0.1) instead of a
    /// linear head.
    #[arg(long)]
    mlp_hidden: Option<u32>,
    /// Hold out this share of each label's examples (a seeded, stratified
    /// split) and evaluate the published head on them at the end.
    #[arg(long, value_name = "SHARE")]
    holdout: Option<f64>,
    /// Sets whose encoded examples pass this many bytes are uploaded in
    /// chunks (UploadDataset) instead of sent in the TrainHead request.
    #[arg(long, value_name = "BYTES", default_value_t = 4 * 1024 * 1024)]
    upload_threshold_bytes: usize,
    /// Print the job's id once it has started and leave it running, instead
    /// of following it (`tlserve watch JOB` follows it later).
    #[arg(long, conflicts_with = "holdout")]
    detach: bool,
}

#[derive(clap::Args)]
struct EvaluateArgs {
    #[command(flatten)]
    server: ServerAddr,
    /// The head: `name`, `name@version`, or a built-in one.
    #[arg(long)]
    head: String,
    #[command(flatten)]
    data: DataArgs,
    /// Inputs per Predict request.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    batch_size: u32,
    /// Print the metrics as JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct LoadArgs {
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
    priority: PriorityArg,
    /// Deadline of each request, in milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Ask for the adapted features of this fine-tuned head (Embed's `head`).
    #[arg(long)]
    head: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Load the configured backbones and serve gRPC until SIGINT/SIGTERM.
    Serve {
        /// The TOML config file; TLSERVE__* variables override its settings.
        #[arg(long, env = "TLSERVE_CONFIG", default_value = "config/tlserve.toml")]
        config: PathBuf,
    },
    /// Embed texts or images with a running server and print the vectors as
    /// JSON. Without TEXT or --image arguments, every non-empty line of standard
    /// input is one text.
    Embed(EmbedArgs),
    /// Train a head on a running server from an image folder or a text file;
    /// large sets are uploaded in chunks. Shows the upload's and the job's
    /// progress on stderr and prints the published head as JSON. Ctrl-C asks
    /// whether to cancel the job or leave it running.
    Train(TrainArgs),
    /// Follow a training job to its end (re-attach after Ctrl-C) and print
    /// the published head as JSON.
    Watch {
        #[command(flatten)]
        server: ServerAddr,
        /// The job's id, as `tlserve train` printed it.
        job: String,
    },
    /// Measure a head on labelled examples: accuracy, per-label precision,
    /// recall and F1, and the confusion matrix.
    Evaluate(EvaluateArgs),
    /// Predict labels with a trained head (`name` or `name@version`) or a
    /// backbone's built-in one (`efficientnet-lite0/imagenet`). Without TEXT or
    /// --image arguments, every non-empty line of standard input is one text.
    Predict {
        #[command(flatten)]
        server: ServerAddr,
        #[arg(long)]
        head: String,
        /// Labels per input, most probable first; 0 means all.
        #[arg(long, default_value_t = 1)]
        top_k: u32,
        /// An image file (PNG, JPEG, WebP) for a head on an image backbone; repeatable.
        #[arg(long = "image", value_name = "FILE")]
        images: Vec<PathBuf>,
        texts: Vec<String>,
    },
    /// List the stored heads (every version) as JSON.
    Heads {
        #[command(flatten)]
        server: ServerAddr,
    },
    /// Write a fine-tuned head's backbone part, read from the head store of
    /// the config: a LoRA adapter in the layout of the Python `peft` package
    /// (adapter_config.json, adapter_model.safetensors; `PeftModel.
    /// from_pretrained(base, DIR)` loads it on the backbone's Hugging Face
    /// model), or top layers trained in full as top_layers.safetensors under
    /// a `BertModel`'s names (`model.load_state_dict(tensors, strict=False)`).
    ExportAdapter {
        #[arg(long, env = "TLSERVE_CONFIG", default_value = "config/tlserve.toml")]
        config: PathBuf,
        /// `name` (the latest version) or `name@version`.
        #[arg(long)]
        head: String,
        /// The folder to write (created if needed).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Convert a legacy (non-zip) PyTorch .pth state dict into safetensors.
    Convert {
        /// The legacy .pth file.
        #[arg(long)]
        legacy_pth: PathBuf,
        /// The safetensors file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// List the backbones of a running server as JSON.
    Backbones {
        #[command(flatten)]
        server: ServerAddr,
    },
    /// Load a running server: C concurrent clients send Embed requests of k texts (or images)
    /// for a time or a number of requests; prints throughput, latency percentiles
    /// and errors by code as JSON. Without either bound it runs for 10 seconds.
    Bench(LoadArgs),
    /// Measure a backbone's forward-pass throughput in process (no server) on a
    /// corpus with one text per line; prints one JSON line per batch size.
    BenchEmbed {
        #[arg(long, env = "TLSERVE_CONFIG", default_value = "config/tlserve.toml")]
        config: PathBuf,
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
    },
    /// Measure fine-tuning (LoRA, or the top layers in full) against the
    /// default frozen-feature head, in process, on labelled texts (`LABEL<TAB>TEXT` lines): both fitted on
    /// --train, measured on --test; prints one JSON line.
    BenchFinetune(FineTuneBenchArgs),
}

#[derive(clap::Args)]
struct FineTuneBenchArgs {
    #[arg(long, env = "TLSERVE_CONFIG", default_value = "config/tlserve.toml")]
    config: PathBuf,
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
    fn run(self) -> anyhow::Result<()> {
        let config = load_config(&self.config)?;
        let targets = tlserve::head::finetune::LoraTargets::from_names(&self.targets)?;
        let adjust = |params: &mut tlserve::head::finetune::FineTuneParams| {
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
        let options = bench::finetune::FineTuneBenchOptions {
            backbone: &self.backbone,
            train: &self.train,
            test: &self.test,
            top_layers: self.method == "top_layers",
            adjust: &adjust,
            export_peft: self.export_peft.as_deref(),
        };
        bench::finetune::run(&config, &options)
    }
}

#[derive(clap::Args)]
struct ServerAddr {
    /// The server's gRPC address.
    #[arg(long, env = "TLSERVE_ADDR", default_value = "http://127.0.0.1:50051")]
    addr: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum PriorityArg {
    Online,
    Bulk,
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

#[derive(Clone, Copy, ValueEnum)]
enum PoolingArg {
    Mean,
    Cls,
    LastToken,
    WeightedMean,
}

fn load_config(path: &Path) -> Result<Config> {
    Config::load(path).with_context(|| format!("configuration {}", path.display()))
}

/// The texts and image files given as arguments, or else the non-empty lines of
/// standard input as texts.
fn inputs_of(texts: Vec<String>, images: Vec<PathBuf>) -> Result<Vec<proto::Input>> {
    use proto::input::Kind;
    if images.is_empty() {
        return Ok(texts_or_stdin(texts)?
            .into_iter()
            .map(|text| proto::Input {
                kind: Some(Kind::Text(text)),
            })
            .collect());
    }
    let mut inputs: Vec<proto::Input> = texts
        .into_iter()
        .map(|text| proto::Input {
            kind: Some(Kind::Text(text)),
        })
        .collect();
    for path in images {
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        inputs.push(proto::Input {
            kind: Some(Kind::Image(bytes)),
        });
    }
    Ok(inputs)
}

/// The texts given as arguments, or else the non-empty lines of standard input.
fn texts_or_stdin(texts: Vec<String>) -> Result<Vec<String>> {
    if !texts.is_empty() {
        return Ok(texts);
    }
    let mut lines = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line.context("cannot read standard input")?;
        if !line.trim().is_empty() {
            lines.push(line);
        }
    }
    Ok(lines)
}

fn print_json(value: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

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

async fn embed(args: EmbedArgs) -> Result<()> {
    let command = client::EmbedCommand {
        backbone: args.backbone,
        inputs: inputs_of(args.texts, args.images)?,
        pooling: match args.pooling {
            None => proto::Pooling::Unspecified,
            Some(PoolingArg::Mean) => proto::Pooling::Mean,
            Some(PoolingArg::Cls) => proto::Pooling::Cls,
            Some(PoolingArg::LastToken) => proto::Pooling::LastToken,
            Some(PoolingArg::WeightedMean) => proto::Pooling::WeightedMean,
        },
        normalize: args.normalize,
        truncate: args.truncate,
        head: args.head,
    };
    let channel = client::connect(&args.server.addr).await?;
    print_json(&client::embed(channel, command).await?)
}

impl DataArgs {
    fn source(self) -> client::DataSource {
        use client::text_files::{Columns, TextFormat};
        match (self.images, self.examples) {
            (Some(dir), _) => client::DataSource::Images {
                dir,
                skip_bad: self.skip_bad,
            },
            // clap requires one of the two.
            (None, path) => client::DataSource::Text {
                path: path.unwrap_or_default(),
                format: self.format.map(|format| match format {
                    FormatArg::Tsv => TextFormat::Tsv,
                    FormatArg::Csv => TextFormat::Csv,
                    FormatArg::Jsonl => TextFormat::Jsonl,
                }),
                columns: Columns {
                    text: self.text_column,
                    label: self.label_column,
                },
            },
        }
    }
}

impl TrainingArgs {
    fn flags(self) -> Result<client::TrainingFlags> {
        Ok(client::TrainingFlags {
            solver: self.solver.map(|solver| match solver {
                SolverArg::Lbfgs => proto::Solver::Lbfgs,
                SolverArg::Adamw => proto::Solver::Adamw,
            }),
            epochs: self.epochs,
            learning_rate: self.learning_rate,
            batch_size: self.batch_size,
            weight_decay: self.weight_decay,
            validation_fraction: self.validation_fraction,
            no_validation: self.no_validation,
            early_stopping_patience: self.early_stopping_patience,
            l2: self.l2,
            cv_folds: self.cv_folds,
            balance_classes: self.balance_classes,
            seed: self.seed,
            fine_tuning: self.fine_tuning.flags()?,
        })
    }
}

/// Exports a stored fine-tuned head's adapter for `peft`, or its top layers
/// for a PyTorch `BertModel`; reads the store without opening it, so it may
/// run beside a server.
async fn export_adapter(config: &Path, head: &str, out: &Path) -> Result<serde_json::Value> {
    let config = tlserve::config::Config::load(config)?;
    let reference = tlserve::head::HeadRef::parse(head).map_err(anyhow::Error::msg)?;
    let location =
        tlserve::storage::Location::from_config(&config.storage, &config.heads.store_dir);
    let storage = tlserve::storage::Storage::open(&location)?;
    let (stored, adapter) = tlserve::head::store::read_head(&storage, &reference).await?;
    let meta = &stored.meta;
    let adapter = adapter.with_context(|| {
        format!(
            "head {}@{} was trained on frozen features: it has no adapter",
            meta.name, meta.version
        )
    })?;
    let written = match &adapter {
        tlserve::backbone::bert::adapter::Adapter::Lora(lora) => {
            lora.export_peft(out)?;
            "adapter_model.safetensors"
        }
        tlserve::backbone::bert::adapter::Adapter::Layers(layers) => layers.export(out)?,
    };
    Ok(serde_json::json!({
        "file": out.join(written),
        "head": meta.name,
        "version": meta.version,
        "backbone": meta.backbone,
        "backbone_fingerprint": meta.backbone_fingerprint,
        "out": out,
    }))
}

async fn train(args: TrainArgs) -> Result<()> {
    let training = client::training_config(&args.training.flags()?)?;
    let spec = args.mlp_hidden.map(|hidden_size| proto::HeadSpec {
        kind: Some(proto::head_spec::Kind::Mlp(proto::MlpHead {
            hidden_size,
            dropout: 0.1,
        })),
    });
    let command = client::TrainCommand {
        backbone: args.backbone,
        head: args.head,
        examples: client::data::load(&args.data.source())?,
        spec,
        training,
        holdout: args.holdout,
        upload_threshold_bytes: args.upload_threshold_bytes,
        evaluate_batch_size: 64,
        detach: args.detach,
    };
    let channel = client::connect(&args.server.addr).await?;
    match client::train(channel, command).await? {
        client::Trained::Head(head) => print_json(&head),
        client::Trained::Started { job_id } => {
            println!("{job_id}");
            Ok(())
        }
    }
}

async fn evaluate(args: EvaluateArgs) -> Result<()> {
    let examples = client::data::load(&args.data.source())?;
    let channel = client::connect(&args.server.addr).await?;
    let result =
        client::evaluate::evaluate(channel, &args.head, examples, args.batch_size as usize).await?;
    if args.json {
        print_json(&result.to_json())
    } else {
        print!("{}", result.table());
        Ok(())
    }
}

async fn load_test(args: LoadArgs) -> Result<()> {
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
        priority: match args.priority {
            PriorityArg::Online => proto::Priority::Online,
            PriorityArg::Bulk => proto::Priority::Bulk,
        },
        timeout: args.timeout_ms.map(std::time::Duration::from_millis),
        head: args.head,
    };
    print_load_report(&loadgen::run(options).await?)
}

async fn run(cli: Cli) -> Result<()> {
    // The server logs as its config says; client verbs only what goes wrong.
    if !matches!(cli.command, Command::Serve { .. }) {
        telemetry::init(LogFormat::Human, "warn");
    }
    match cli.command {
        Command::Serve { config } => {
            let config = load_config(&config)?;
            telemetry::init(config.logging.format, &config.logging.level);
            tracing::info!(version = env!("CARGO_PKG_VERSION"), "tlserve starting");
            server::run(config, server::shutdown_signal()).await?;
        }
        Command::Embed(args) => embed(args).await?,
        Command::Train(args) => train(args).await?,
        Command::Watch { server, job } => {
            let channel = client::connect(&server.addr).await?;
            let head = client::watch(channel, job).await?;
            print_json(&client::head_json(&head))?;
        }
        Command::Evaluate(args) => evaluate(args).await?,
        Command::Predict {
            server,
            head,
            top_k,
            images,
            texts,
        } => {
            let inputs = inputs_of(texts, images)?;
            let channel = client::connect(&server.addr).await?;
            print_json(&client::predict(channel, head, inputs, top_k).await?)?;
        }
        Command::Heads { server } => {
            let channel = client::connect(&server.addr).await?;
            print_json(&client::heads(channel).await?)?;
        }
        Command::ExportAdapter { config, head, out } => {
            print_json(&export_adapter(&config, &head, &out).await?)?;
        }
        Command::Convert { legacy_pth, out } => {
            let count = tlserve::backbone::weights::pytorch_legacy::convert_to_safetensors(
                &legacy_pth,
                &out,
            )?;
            eprintln!("wrote {count} tensors to {}", out.display());
        }
        Command::Backbones { server } => {
            let channel = client::connect(&server.addr).await?;
            print_json(&client::backbones(channel).await?)?;
        }
        Command::Bench(args) => load_test(args).await?,
        Command::BenchEmbed {
            config,
            backbone,
            corpus,
            batch_sizes,
            min_seconds,
            warm_passes,
            profile,
            embeddings_out,
        } => {
            let config = load_config(&config)?;
            let options = bench::BenchOptions {
                backbone: &backbone,
                corpus: &corpus,
                batch_sizes: &batch_sizes,
                min_seconds,
                warm_passes,
                profile,
                embeddings_out: embeddings_out.as_deref(),
            };
            bench::run(&config, &options)?;
        }
        Command::BenchFinetune(args) => tokio::task::block_in_place(|| args.run())?,
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => match err.downcast_ref::<client::Detached>() {
            // Not a failure of the job: the user chose to stop watching it.
            Some(detached) => {
                eprintln!("{detached}");
                ExitCode::from(130)
            }
            None => {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        },
    }
}
