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
    texts: Vec<String>,
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
    /// The examples: one `LABEL<TAB>TEXT` per line.
    #[arg(long)]
    examples: PathBuf,
    #[arg(long, default_value_t = 20)]
    epochs: u32,
    #[arg(long, default_value_t = 0.001)]
    learning_rate: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Train an MLP head with this hidden size instead of a linear head.
    #[arg(long)]
    mlp_hidden: Option<u32>,
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
    /// Texts per request.
    #[arg(long, short = 'k', default_value_t = 1)]
    inputs_per_request: usize,
    /// A file with one text per line; default: a few built-in sentences.
    #[arg(long)]
    corpus: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "online")]
    priority: PriorityArg,
    /// Deadline of each request, in milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
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
    /// Train a head on a running server from a file of `LABEL<TAB>TEXT` lines;
    /// shows progress on stderr and prints the published head as JSON.
    Train(TrainArgs),
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
    /// Load a running server: C concurrent clients send Embed requests of k texts
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
        /// Also print, per batch size, where the native BERT engine's time went.
        #[arg(long)]
        profile: bool,
    },
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

/// `LABEL<TAB>TEXT` lines, blank lines skipped.
fn read_labelled_lines(path: &std::path::Path) -> Result<Vec<(String, String)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut rows = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (label, sentence) = line.split_once('\t').with_context(|| {
            format!(
                "{} line {}: expected LABEL<TAB>TEXT",
                path.display(),
                number + 1
            )
        })?;
        rows.push((label.to_owned(), sentence.to_owned()));
    }
    Ok(rows)
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
        },
        normalize: args.normalize,
        truncate: args.truncate,
    };
    let channel = client::connect(&args.server.addr).await?;
    print_json(&client::embed(channel, command).await?)
}

async fn train(args: TrainArgs) -> Result<()> {
    let command = client::TrainCommand {
        backbone: args.backbone,
        head: args.head,
        examples: read_labelled_lines(&args.examples)?,
        epochs: args.epochs,
        learning_rate: args.learning_rate,
        seed: args.seed,
        mlp_hidden: args.mlp_hidden,
    };
    let channel = client::connect(&args.server.addr).await?;
    print_json(&client::train(channel, command).await?)
}

async fn load_test(args: LoadArgs) -> Result<()> {
    let options = loadgen::LoadOptions {
        addr: args.server.addr,
        backbone: args.backbone,
        concurrency: args.concurrency,
        duration: load_duration(args.duration_seconds, args.requests)?,
        requests: args.requests,
        inputs_per_request: args.inputs_per_request,
        texts: corpus_texts(args.corpus.as_deref())?,
        priority: match args.priority {
            PriorityArg::Online => proto::Priority::Online,
            PriorityArg::Bulk => proto::Priority::Bulk,
        },
        timeout: args.timeout_ms.map(std::time::Duration::from_millis),
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
        Command::Convert { legacy_pth, out } => {
            let count =
                tlserve::backbone::pytorch_legacy::convert_to_safetensors(&legacy_pth, &out)?;
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
            profile,
        } => {
            let config = load_config(&config)?;
            let options = bench::BenchOptions {
                backbone: &backbone,
                corpus: &corpus,
                batch_sizes: &batch_sizes,
                min_seconds,
                profile,
            };
            bench::run(&config, &options)?;
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
