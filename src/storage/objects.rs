//! The store on any object storage that the `object_store` crate reaches,
//! over an `Arc<dyn ObjectStore>`: get, put, create-if-absent,
//! compare-and-set update, list and delete, every key under a prefix, and
//! the crate's errors mapped to the store's. A backend (S3 in `s3.rs`; GCS,
//! Azure or another alike) is only the builder of its `ObjectStore`.
//!
//! What the store must honour, and a new builder must check before it is
//! added: a create is a put with `PutMode::Create` (S3 `If-None-Match: *`),
//! of whose concurrent callers on one key exactly one succeeds and the
//! others get `AlreadyExists`; an update is a put with `PutMode::Update`
//! naming the e-tag (and version) that the read returned (S3 `If-Match`),
//! which gets `Precondition` (or `NotFound`, once deleted) when another
//! write came first; and a read returns that e-tag. Version numbers of heads,
//! claims of jobs and replica names, and job records that a replica paused
//! past its lease must not overwrite all rest on them. A store that answers
//! `NotImplemented` (object_store's `LocalFileSystem` does for updates; a
//! folder is the volume backend's) fails every such write loudly; one that
//! ignored a precondition would let two replicas both win, silently.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::{path::Path, ObjectStore, ObjectStoreExt, PutMode, PutPayload, UpdateVersion};

use super::{storage_error, Entry, Version, VersionTag, Versioned};
use crate::Result;

/// The objects of one store under one prefix; cheap to clone.
#[derive(Clone)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    /// Every key is stored under this prefix (no leading or trailing `/`);
    /// empty for the store's root.
    prefix: String,
    /// What the store is, for logs (`s3://bucket/prefix at endpoint`).
    description: String,
}

impl Objects {
    /// The store's objects under `prefix`. `store` must honour the
    /// conditional puts this module's doc lists.
    pub fn new(store: Arc<dyn ObjectStore>, prefix: String, description: String) -> Self {
        Self {
            store,
            prefix,
            description,
        }
    }
    pub fn describe(&self) -> String {
        self.description.clone()
    }

    fn path(&self, key: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(key)
        } else {
            Path::from(format!("{}/{key}", self.prefix))
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
        let under = (!prefix.is_empty() || !self.prefix.is_empty()).then(|| self.path(prefix));
        let strip = match self.prefix.is_empty() {
            true => String::new(),
            false => format!("{}/", self.prefix),
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
