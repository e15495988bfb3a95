//! The verbs of the `tlserve` command, one file per group: running the server
//! and preparing its model files ([`serve`]), embedding and prediction
//! ([`inference`]), training and evaluating heads ([`training`]), what a
//! server holds ([`catalog`]), and benchmarks ([`bench`]). The flags and
//! helpers several groups share live here.

pub mod bench;
pub mod catalog;
pub mod inference;
pub mod serve;
pub mod training;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use tlserve::config::Config;

/// The running server a client verb talks to; one flag, read the same way by
/// every verb.
#[derive(clap::Args)]
pub struct ServerAddr {
    /// The server's gRPC address.
    #[arg(long, env = "TLSERVE_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
}

/// The config file of the verbs that read it (the server, and tools that
/// work on its backbones or head store without a server): the same flag,
/// variable and default everywhere.
#[derive(clap::Args)]
pub struct ConfigFile {
    #[arg(long, env = "TLSERVE_CONFIG", default_value = "config/tlserve.toml")]
    pub config: PathBuf,
}

/// Loads and validates the config, naming its file in any error.
pub fn load_config(path: &Path) -> Result<Config> {
    Config::load(path).with_context(|| format!("configuration {}", path.display()))
}

/// Prints a verb's answer on standard output, as indented JSON.
pub fn print_json(value: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
