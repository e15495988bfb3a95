//! Embedding and prediction with a running server.

use std::{io::BufRead, path::PathBuf};

use anyhow::{Context, Result};

use tlserve::{client, config::Pooling, proto, wire};

use super::{print_json, ServerAddr};

/// `tlserve embed`: the backbone, the request's options, and the inputs.
#[derive(clap::Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    server: ServerAddr,
    /// The backbone to use (see `tlserve backbones`).
    #[arg(long, short)]
    backbone: String,
    /// Pooling; default: the backbone's.
    #[arg(long, value_enum)]
    pooling: Option<Pooling>,
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

/// `tlserve predict`: the head, how many labels, and the inputs.
#[derive(clap::Args)]
pub struct PredictArgs {
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

/// Embeds the inputs and prints the vectors.
pub async fn embed(args: EmbedArgs) -> Result<()> {
    let command = client::EmbedCommand {
        backbone: args.backbone,
        inputs: inputs_of(args.texts, args.images)?,
        pooling: args
            .pooling
            .map_or(proto::Pooling::Unspecified, wire::convert::pooling),
        normalize: args.normalize,
        truncate: args.truncate,
        head: args.head,
    };
    let channel = client::connect(&args.server.addr).await?;
    print_json(&client::embed(channel, command).await?)
}

/// Predicts labels for the inputs and prints them.
pub async fn predict(args: PredictArgs) -> Result<()> {
    let inputs = inputs_of(args.texts, args.images)?;
    let channel = client::connect(&args.server.addr).await?;
    print_json(&client::predict(channel, args.head, inputs, args.top_k).await?)
}
