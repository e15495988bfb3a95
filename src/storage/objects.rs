//! The store on S3-compatible object storage, through the `object_store`
//! crate. A create is a PUT with `If-None-Match: *`, which S3 (since 2024),
//! MinIO, Cloudflare R2 and moto honour: of concurrent creators exactly one
//! succeeds. An update is a PUT with `If-Match: <etag>` of the version
//! read (S3 since 2024, MinIO, R2 and moto honour it): of concurrent
//! updaters of one version at most one succeeds. Credentials come from the environment (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, or a pod's web identity),
//! never from the config file.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::{
    aws::AmazonS3Builder, path::Path, ObjectStore, ObjectStoreExt, PutMode, PutPayload,
    UpdateVersion,
};

use super::{storage_error, Entry, Version, VersionTag, Versioned};
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

#[derive(Clone)]
pub struct S3 {
    store: Arc<dyn ObjectStore>,
    location: S3Location,
}

impl S3 {
    pub fn open(location: &S3Location) -> Result<Self> {
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
        Ok(Self {
            store: Arc::new(store),
            location: location.clone(),
        })
    }

    pub fn describe(&self) -> String {
        let endpoint = self.location.endpoint.as_deref().unwrap_or("aws");
        format!(
            "s3://{}/{} at {endpoint}",
            self.location.bucket, self.location.prefix
        )
    }

    fn path(&self, key: &str) -> Path {
        if self.location.prefix.is_empty() {
            Path::from(key)
        } else {
            Path::from(format!("{}/{key}", self.location.prefix))
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let found = match self.store.get(&self.path(key)).await {
            Ok(found) => found,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(err) => return Err(storage_error("read", key, err)),
        };
        let bytes = found
            .bytes()
            .await
            .map_err(|err| storage_error("read", key, err))?;
        Ok(Some(bytes))
    }

    pub async fn get_versioned(&self, key: &str) -> Result<Option<Versioned>> {
        let found = match self.store.get(&self.path(key)).await {
            Ok(found) => found,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(err) => return Err(storage_error("read", key, err)),
        };
        let tag = VersionTag::ETag(found.meta.e_tag.clone(), found.meta.version.clone());
        let bytes = found
            .bytes()
            .await
            .map_err(|err| storage_error("read", key, err))?;
        Ok(Some(Versioned {
            bytes,
            version: Version(tag),
        }))
    }

    pub async fn update(
        &self,
        key: &str,
        bytes: Bytes,
        e_tag: Option<String>,
        version: Option<String>,
    ) -> Result<bool> {
        let mode = PutMode::Update(UpdateVersion { e_tag, version });
        let updated = self
            .store
            .put_opts(&self.path(key), PutPayload::from(bytes), mode.into())
            .await;
        match updated {
            Ok(_) => Ok(true),
            Err(
                object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. },
            ) => Ok(false),
            Err(err) => Err(storage_error("update", key, err)),
        }
    }

    pub async fn modified(&self, key: &str) -> Result<Option<std::time::SystemTime>> {
        match self.store.head(&self.path(key)).await {
            Ok(meta) => Ok(Some(meta.last_modified.into())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(err) => Err(storage_error("read the time of", key, err)),
        }
    }

    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<()> {
        self.store
            .put(&self.path(key), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|err| storage_error("write", key, err))
    }

    pub async fn create(&self, key: &str, bytes: Bytes) -> Result<bool> {
        let created = self
            .store
            .put_opts(
                &self.path(key),
                PutPayload::from(bytes),
                PutMode::Create.into(),
            )
            .await;
        match created {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(err) => Err(storage_error("create", key, err)),
        }
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        let under =
            (!prefix.is_empty() || !self.location.prefix.is_empty()).then(|| self.path(prefix));
        let strip = match self.location.prefix.is_empty() {
            true => String::new(),
            false => format!("{}/", self.location.prefix),
        };
        let objects: Vec<object_store::ObjectMeta> = self
            .store
            .list(under.as_ref())
            .try_collect()
            .await
            .map_err(|err| storage_error("list", prefix, err))?;
        Ok(objects
            .into_iter()
            .filter_map(|meta| {
                let key = meta.location.as_ref().strip_prefix(&strip)?.to_owned();
                Some(Entry {
                    key,
                    size: meta.size,
                    modified: meta.last_modified.into(),
                })
            })
            .collect())
    }

    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(err) => Err(storage_error("delete", key, err)),
        }
    }
}
