//! The `tlserve` command: the server and a command-line client in one binary.
//! This file parses the command line and hands each verb to its group in
//! src/cli/.

mod cli;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use tlserve::{client, config::LogFormat, telemetry};

use cli::{
    bench::{BenchEmbedArgs, FineTuneBenchArgs, LoadArgs},
    catalog::ExportAdapterArgs,
    inference::{EmbedArgs, PredictArgs},
    serve::ConvertArgs,
    training::{EvaluateArgs, TrainArgs, WatchArgs},
    ConfigFile, ServerAddr,
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
    // The other verbs that read the config share its flag without this help.
    #[command(mut_arg("config", |arg| arg.help(
        "The TOML config file; TLSERVE__* variables override its settings"
    )))]
    Serve(ConfigFile),
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
    Watch(WatchArgs),
    /// Measure a head on labelled examples: accuracy, per-label precision,
    /// recall and F1, and the confusion matrix.
    Evaluate(EvaluateArgs),
    /// Predict labels with a trained head (`name` or `name@version`) or a
    /// backbone's built-in one (`efficientnet-lite0/imagenet`). Without TEXT or
    /// --image arguments, every non-empty line of standard input is one text.
    Predict(PredictArgs),
    /// List the stored heads (every version) as JSON.
    Heads(ServerAddr),
    /// Write a fine-tuned head's backbone part, read from the head store of
    /// the config: a LoRA adapter in the layout of the Python `peft` package
    /// (adapter_config.json, adapter_model.safetensors; `PeftModel.
    /// from_pretrained(base, DIR)` loads it on the backbone's Hugging Face
    /// model), or top layers trained in full as top_layers.safetensors under
    /// a `BertModel`'s names (`model.load_state_dict(tensors, strict=False)`).
    ExportAdapter(ExportAdapterArgs),
    /// Convert a legacy (non-zip) PyTorch .pth state dict into safetensors.
    Convert(ConvertArgs),
    /// List the backbones of a running server as JSON.
    Backbones(ServerAddr),
    /// Load a running server: C concurrent clients send Embed requests of k texts (or images)
    /// for a time or a number of requests; prints throughput, latency percentiles
    /// and errors by code as JSON. Without either bound it runs for 10 seconds.
    Bench(LoadArgs),
    /// Measure a backbone's forward-pass throughput in process (no server) on a
    /// corpus with one text per line; prints one JSON line per batch size.
    BenchEmbed(BenchEmbedArgs),
    /// Measure fine-tuning (LoRA, or the top layers in full) against the
    /// default frozen-feature head, in process, on labelled texts (`LABEL<TAB>TEXT` lines): both fitted on
    /// --train, measured on --test; prints one JSON line.
    BenchFinetune(FineTuneBenchArgs),
}

async fn run(Cli { command }: Cli) -> Result<()> {
    // The server logs as its config says; client verbs only what goes wrong.
    if !matches!(command, Command::Serve(_)) {
        telemetry::init(LogFormat::Human, "warn");
    }
    match command {
        Command::Serve(file) => cli::serve::serve(file).await,
        Command::Embed(args) => cli::inference::embed(args).await,
        Command::Train(args) => cli::training::train(args).await,
        Command::Watch(args) => cli::training::watch(args).await,
        Command::Evaluate(args) => cli::training::evaluate(args).await,
        Command::Predict(args) => cli::inference::predict(args).await,
        Command::Heads(server) => cli::catalog::heads(server).await,
        Command::ExportAdapter(args) => cli::catalog::export(args).await,
        Command::Convert(args) => cli::serve::convert(args),
        Command::Backbones(server) => cli::catalog::backbones(server).await,
        Command::Bench(args) => cli::bench::load_test(args).await,
        Command::BenchEmbed(args) => cli::bench::bench_embed(args),
        Command::BenchFinetune(args) => tokio::task::block_in_place(|| args.run()),
    }
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
