//! The store on S3-compatible object storage: the `object_store` crate's S3
//! client, built from the configured location and handed to the generic
//! backend ([`Objects`]). A create is a PUT with `If-None-Match: *` and an
//! update a PUT with `If-Match: <etag>` of the version read, which S3 (since
//! 2024), MinIO, Cloudflare R2 and moto honour: of concurrent creators
//! exactly one succeeds, of concurrent updaters of one version at most one.
//! Credentials come from the environment (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, or a pod's web identity),
//! never from the config file.

use std::sync::Arc;

use object_store::aws::AmazonS3Builder;

use super::objects::Objects;
use crate::{Error, Result};

/// Where in S3 the store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// Every key is stored under this prefix (no leading or trailing `/`);
    /// empty for the bucket's root.
    pub prefix: String,
    pub region: String,
    /// Another S3-compatible service (`https://minio.example:9000`); None:
    /// AWS.
    pub endpoint: Option<String>,
    /// Allows a plain-HTTP endpoint (a test server on loopback).
    pub allow_http: bool,
    /// None: from the environment, as a server takes them. Given: for tools
    /// and tests that hold their own.
    pub credentials: Option<S3Credentials>,
}

/// An access key pair.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Credentials {
    pub key_id: String,
    pub secret: String,
}

impl std::fmt::Debug for S3Credentials {
    /// The key id only: a secret never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "S3Credentials {{ key_id: {:?}, secret: .. }}",
            self.key_id
        )
    }
}

/// The bucket at `location` as the store's objects. The builder keeps its
/// default conditional puts (`S3ConditionalPut::ETagMatch`), which
/// [`Objects`] relies on.
pub fn open(location: &S3Location) -> Result<Objects> {
    // reqwest's TLS takes the process-wide provider: ring, as the rest of
    // the build. Installing it twice is harmless (the first one stays).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(&location.bucket)
        .with_region(&location.region)
        .with_allow_http(location.allow_http);
    if let Some(endpoint) = &location.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(credentials) = &location.credentials {
        builder = builder
            .with_access_key_id(&credentials.key_id)
            .with_secret_access_key(&credentials.secret);
    }
    let store = builder.build().map_err(|err| {
        Error::Storage(format!(
            "cannot open S3 bucket `{}`: {err}",
            location.bucket
        ))
    })?;
    let endpoint = location.endpoint.as_deref().unwrap_or("aws");
    let description = format!("s3://{}/{} at {endpoint}", location.bucket, location.prefix);
    Ok(Objects::new(
        Arc::new(store),
        location.prefix.clone(),
        description,
    ))
}
