//! The server configuration: a TOML file, typed and validated at start-up, with
//! environment overrides.
//!
//! Any setting can be overridden by an environment variable named after its path
//! in the file, upper-cased, with `__` between the parts and a `TLSERVE__` prefix;
//! array items are addressed by index:
//!
//! ```text
//! TLSERVE__SERVER__LISTEN=127.0.0.1:50051
//! TLSERVE__LOGGING__FORMAT=json
//! TLSERVE__BACKBONES__0__DEVICE=cuda:0
//! ```
//!
//! A value is read as a TOML literal when it parses as one (numbers, booleans,
//! quoted strings, arrays) and as a plain string otherwise.
//!
//! One file per section: `server.rs` (with `[auth]` and `[logging]`),
//! `limits.rs`, `heads.rs`, `storage.rs`, `backbones.rs`; `env.rs` applies the
//! overrides. Every type is re-exported here, so `config::X` names each of them.

mod backbones;
mod env;
mod heads;
mod limits;
mod server;
mod storage;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use backbones::{
    Architecture, BackboneConfig, DeviceSpec, Engine, ImageConfig, Modality, Pooling, Precision,
    Resample, SourceConfig, VggFeatures,
};
pub use env::ENV_PREFIX;
pub use heads::HeadsConfig;
pub use limits::LimitsConfig;
pub use server::{AuthConfig, LogFormat, LoggingConfig, ServerConfig, TlsConfig};
pub use storage::{S3Config, StorageBackend, StorageConfig};

use backbones::validate_backbones;
use env::apply_override;
use heads::validate_heads;
use limits::validate_limits;
use server::validate_server;
use storage::validate_storage;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {source}")]
    Syntax {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("environment override {var}: {reason}")]
    Env { var: String, reason: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub logging: LoggingConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub heads: HeadsConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    /// The backbones this server loads at start-up and keeps resident.
    #[serde(default)]
    pub backbones: Vec<BackboneConfig>,
}

impl Config {
    /// Reads, overrides from the process environment, and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base_dir = path.parent().unwrap_or_else(|| Path::new("."));
        Self::from_toml(&text, base_dir, std::env::vars()).map_err(|err| match err {
            ConfigError::Syntax { source, .. } => ConfigError::Syntax {
                path: path.to_owned(),
                source,
            },
            other => other,
        })
    }

    /// Parses `text`, applies the `TLSERVE__` overrides found in `env`, resolves
    /// relative paths against `base_dir` and validates the result.
    pub fn from_toml(
        text: &str,
        base_dir: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut value: toml::Value =
            toml::from_str(text).map_err(|source| ConfigError::Syntax {
                path: PathBuf::new(),
                source,
            })?;
        let mut overrides: Vec<(String, String)> = env
            .into_iter()
            .filter(|(key, _)| key.starts_with(ENV_PREFIX))
            .collect();
        // Sorted so that the result does not depend on the environment's order.
        overrides.sort();
        for (var, raw) in overrides {
            apply_override(&mut value, &var, &raw)?;
        }
        let mut config: Config = value
            .try_into()
            .map_err(|err: toml::de::Error| ConfigError::Invalid(err.message().to_owned()))?;
        config.resolve_paths(base_dir);
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base_dir: &Path) {
        for backbone in &mut self.backbones {
            if let Some(path) = &backbone.source.path {
                if path.is_relative() {
                    backbone.source.path = Some(base_dir.join(path));
                }
            }
        }
        if self.heads.store_dir.is_relative() {
            self.heads.store_dir = base_dir.join(&self.heads.store_dir);
        }
        let resolve = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = base_dir.join(&*path);
            }
        };
        if let Some(tls) = &mut self.server.tls {
            resolve(&mut tls.cert_file);
            resolve(&mut tls.key_file);
            if let Some(ca) = &mut tls.client_ca_file {
                resolve(ca);
            }
        }
        if let Some(file) = &mut self.auth.tokens_file {
            resolve(file);
        }
        if let Some(dir) = &self.server.model_cache_dir {
            if dir.is_relative() {
                self.server.model_cache_dir = Some(base_dir.join(dir));
            }
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        validate_server(&self.server)
            .and_then(|()| validate_limits(&self.limits))
            .and_then(|()| validate_heads(&self.heads))
            .and_then(|()| validate_storage(&self.storage))
            .and_then(|()| validate_backbones(&self.backbones, &self.limits))
            .map_err(ConfigError::Invalid)
    }
}

/// Names of backbones (and later heads): safe as a path component and in metrics.
pub fn is_valid_name(name: &str) -> bool {
    // No leading dot: names become folder names, and dot-folders of the head
    // store are the server's own (temporary writes, the job journal).
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const MINIMAL: &str = r#"
        [[backbones]]
        name = "minilm"
        architecture = "bert"
        source = { path = "models/minilm" }
    "#;

    pub(super) fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_and_relative_paths() {
        let config = Config::from_toml(MINIMAL, Path::new("/etc/tlserve"), env(&[])).unwrap();
        assert_eq!(config.server.listen, "0.0.0.0:50051".parse().unwrap());
        assert_eq!(
            config.server.metrics_listen,
            Some("0.0.0.0:9090".parse().unwrap())
        );
        let backbone = &config.backbones[0];
        assert_eq!(
            backbone.source.path.as_deref(),
            Some(Path::new("/etc/tlserve/models/minilm"))
        );
        assert_eq!(backbone.device, "cpu");
        assert!(backbone.normalize && backbone.truncate);
        assert_eq!(backbone.pooling, None);
    }

    #[test]
    fn names() {
        assert!(is_valid_name("all-MiniLM-L6-v2"));
        assert!(is_valid_name("a.b_c"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name(".."));
        assert!(!is_valid_name("a/b"));
        assert!(!is_valid_name(&"x".repeat(65)));
    }
}
