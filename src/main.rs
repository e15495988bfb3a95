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
    proto, server, telemetry,
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

#[derive(Subcommand)]
enum Command {
    /// Load the configured backbones and serve gRPC until SIGINT/SIGTERM.
    Serve {
        /// The TOML config file; TLSERVE__* variables override its settings.
        #[arg(long, env = "TLSERVE_CONFIG", default_value = "config/tlserve.toml")]
        config: PathBuf,
    },
    /// Embed texts with a running server and print the vectors as JSON. Without
    /// TEXT arguments, every non-empty line of standard input is one text.
    Embed {
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
        texts: Vec<String>,
    },
    /// List the backbones of a running server as JSON.
    Backbones {
        #[command(flatten)]
        server: ServerAddr,
    },
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
    },
}

#[derive(clap::Args)]
struct ServerAddr {
    /// The server's gRPC address.
    #[arg(long, env = "TLSERVE_ADDR", default_value = "http://127.0.0.1:50051")]
    addr: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum PoolingArg {
    Mean,
    Cls,
}

fn load_config(path: &Path) -> Result<Config> {
    Config::load(path).with_context(|| format!("configuration {}", path.display()))
}

fn print_json(value: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve { config } => {
            let config = load_config(&config)?;
            telemetry::init(config.logging.format, &config.logging.level);
            tracing::info!(version = env!("CARGO_PKG_VERSION"), "tlserve starting");
            server::run(config, server::shutdown_signal()).await?;
        }
        Command::Embed {
            server,
            backbone,
            pooling,
            normalize,
            truncate,
            mut texts,
        } => {
            telemetry::init(LogFormat::Human, "warn");
            if texts.is_empty() {
                for line in std::io::stdin().lock().lines() {
                    let line = line.context("cannot read standard input")?;
                    if !line.trim().is_empty() {
                        texts.push(line);
                    }
                }
            }
            let pooling = match pooling {
                None => proto::Pooling::Unspecified,
                Some(PoolingArg::Mean) => proto::Pooling::Mean,
                Some(PoolingArg::Cls) => proto::Pooling::Cls,
            };
            let channel = client::connect(&server.addr).await?;
            let command = client::EmbedCommand {
                backbone,
                texts,
                pooling,
                normalize,
                truncate,
            };
            print_json(&client::embed(channel, command).await?)?;
        }
        Command::Backbones { server } => {
            telemetry::init(LogFormat::Human, "warn");
            let channel = client::connect(&server.addr).await?;
            print_json(&client::backbones(channel).await?)?;
        }
        Command::BenchEmbed {
            config,
            backbone,
            corpus,
            batch_sizes,
            min_seconds,
        } => {
            telemetry::init(LogFormat::Human, "warn");
            let config = load_config(&config)?;
            let options = bench::BenchOptions {
                backbone: &backbone,
                corpus: &corpus,
                batch_sizes: &batch_sizes,
                min_seconds,
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
