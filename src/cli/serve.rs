//! Running the server, and preparing model files for it.

use std::path::PathBuf;

use anyhow::Result;

use tlserve::{server, telemetry};

use super::{load_config, ConfigFile};

/// `tlserve convert`: the file to read and the file to write.
#[derive(clap::Args)]
pub struct ConvertArgs {
    /// The legacy .pth file.
    #[arg(long)]
    legacy_pth: PathBuf,
    /// The safetensors file to write.
    #[arg(long)]
    out: PathBuf,
}

/// Loads the config, starts logging as it says, and serves until a shutdown
/// signal.
pub async fn serve(file: ConfigFile) -> Result<()> {
    let config = load_config(&file.config)?;
    telemetry::init(config.logging.format, &config.logging.level);
    // The binary's root target, which log filters and collectors have always
    // seen this line under.
    tracing::info!(target: "tlserve", version = env!("CARGO_PKG_VERSION"), "tlserve starting");
    server::run(config, server::shutdown_signal()).await?;
    Ok(())
}

/// Converts a legacy PyTorch state dict to safetensors.
pub fn convert(args: ConvertArgs) -> Result<()> {
    let count = tlserve::backbone::weights::pytorch_legacy::convert_to_safetensors(
        &args.legacy_pth,
        &args.out,
    )?;
    eprintln!("wrote {count} tensors to {}", args.out.display());
    Ok(())
}
