//! The `[storage]` section: the store that replicas share, a volume or an
//! S3-compatible bucket.

use serde::Deserialize;

use super::is_valid_name;

/// Where replicas keep what they share: head versions, uploaded datasets and
/// job records.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub backend: StorageBackend,
    /// For `backend = "s3"`.
    pub s3: S3Config,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// The folder `heads.store_dir`: a local disk for one replica, a
    /// ReadWriteMany volume mounted by every replica.
    #[default]
    Volume,
    /// S3-compatible object storage (AWS S3, MinIO, Ceph RGW, R2, ...).
    S3,
}

/// An S3 bucket. Credentials never come from here: they are read from the
/// environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_SESSION_TOKEN`) or a pod's web identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    pub bucket: String,
    /// Every key goes under this prefix (`tlserve/prod`); empty: the bucket's root.
    pub prefix: String,
    pub region: String,
    /// Another S3-compatible service (`https://minio.example:9000`); unset: AWS.
    pub endpoint: Option<String>,
    /// Allows a plain-HTTP endpoint; for a server on the same host only.
    pub allow_http: bool,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            bucket: String::new(),
            prefix: String::new(),
            region: "us-east-1".into(),
            endpoint: None,
            allow_http: false,
        }
    }
}

/// An S3 backend names its bucket, a prefix of plain segments, and an http(s)
/// endpoint.
pub(super) fn validate_storage(storage: &StorageConfig) -> Result<(), String> {
    if storage.backend != StorageBackend::S3 {
        return Ok(());
    }
    let s3 = &storage.s3;
    let bucket_ok = (3..=63).contains(&s3.bucket.len())
        && s3
            .bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'));
    if !bucket_ok {
        return Err(format!(
            "storage.s3.bucket `{}` is not a bucket name (3-63 lowercase letters, digits, '-', '.')",
            s3.bucket
        ));
    }
    if !s3.prefix.is_empty() && !s3.prefix.split('/').all(is_valid_name) {
        return Err(format!(
            "storage.s3.prefix `{}` must be `/`-separated names of letters, digits, '-', '_', '.' \
             (no leading or trailing `/`)",
            s3.prefix
        ));
    }
    if let Some(endpoint) = &s3.endpoint {
        if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
            return Err(format!(
                "storage.s3.endpoint `{endpoint}` must start with https:// (or http://)"
            ));
        }
        if endpoint.starts_with("http://") && !s3.allow_http {
            return Err(format!(
                "storage.s3.endpoint `{endpoint}` is plain HTTP: set storage.s3.allow_http = true \
                 if that is meant (credentials and data travel unencrypted)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{
        tests::{env, MINIMAL},
        Config,
    };

    /// The S3 backend comes from the environment like any setting, and a
    /// bucket name, prefix or endpoint that could not work is refused at
    /// start-up.
    #[test]
    fn the_storage_backend_is_set_and_checked() {
        let s3 = |extra: &[(&str, &str)]| {
            let mut vars = vec![("TLSERVE__STORAGE__BACKEND", "s3")];
            if !extra.iter().any(|(var, _)| var.ends_with("BUCKET")) {
                vars.push(("TLSERVE__STORAGE__S3__BUCKET", "team-heads"));
            }
            vars.extend_from_slice(extra);
            Config::from_toml(MINIMAL, Path::new("."), env(&vars))
        };
        let config = s3(&[("TLSERVE__STORAGE__S3__PREFIX", "tlserve/prod")]).unwrap();
        assert_eq!(config.storage.backend, StorageBackend::S3);
        assert_eq!(
            (
                config.storage.s3.bucket.as_str(),
                config.storage.s3.prefix.as_str()
            ),
            ("team-heads", "tlserve/prod")
        );
        let default = Config::from_toml(MINIMAL, Path::new("."), env(&[])).unwrap();
        assert_eq!(default.storage.backend, StorageBackend::Volume);
        for (var, value, named) in [
            (
                "TLSERVE__STORAGE__S3__BUCKET",
                "Team_Heads",
                "storage.s3.bucket",
            ),
            ("TLSERVE__STORAGE__S3__PREFIX", "/lead", "storage.s3.prefix"),
            (
                "TLSERVE__STORAGE__S3__ENDPOINT",
                "minio:9000",
                "storage.s3.endpoint",
            ),
            (
                "TLSERVE__STORAGE__S3__ENDPOINT",
                "http://minio:9000",
                "allow_http",
            ),
        ] {
            let err = s3(&[(var, value)]).unwrap_err().to_string();
            assert!(err.contains(named), "{var}={value}: {err}");
        }
        let plain = s3(&[
            ("TLSERVE__STORAGE__S3__ENDPOINT", "http://127.0.0.1:9000"),
            ("TLSERVE__STORAGE__S3__ALLOW_HTTP", "true"),
        ]);
        assert!(plain.is_ok());
    }
}
