//! What a server holds: its backbones and stored heads, and a stored head's
//! fine-tuned part exported for other tools.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use tlserve::client;

use super::{print_json, ConfigFile, ServerAddr};

/// `tlserve export-adapter`: the head store's config, the head, the folder.
#[derive(clap::Args)]
pub struct ExportAdapterArgs {
    #[command(flatten)]
    config: ConfigFile,
    /// `name` (the latest version) or `name@version`.
    #[arg(long)]
    head: String,
    /// The folder to write (created if needed).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// Prints the stored heads, every version.
pub async fn heads(server: ServerAddr) -> Result<()> {
    let channel = client::connect(&server.addr).await?;
    print_json(&client::heads(channel).await?)
}

/// Prints the server's backbones.
pub async fn backbones(server: ServerAddr) -> Result<()> {
    let channel = client::connect(&server.addr).await?;
    print_json(&client::backbones(channel).await?)
}

/// Exports the head's fine-tuned part and prints what was written.
pub async fn export(args: ExportAdapterArgs) -> Result<()> {
    print_json(&export_adapter(&args.config.config, &args.head, &args.out).await?)
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
        tlserve::backbone::Adapter::Lora(lora) => {
            lora.export_peft(out)?;
            "adapter_model.safetensors"
        }
        tlserve::backbone::Adapter::Layers(layers) => layers.export(out)?,
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
