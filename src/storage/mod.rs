//! The store that replicas share: a volume every replica mounts (a
//! ReadWriteMany volume, or a local folder for one process) or S3-compatible
//! object storage. One small API over both: whole objects read, written
//! (replacing atomically), created only if absent (the one primitive that
//! lets processes agree without a lock: version numbers, job ownership),
//! listed and deleted.
//!
//! Keys are `/`-separated relative paths of plain segments (letters, digits,
//! `.`, `_`, `-`; none starting with `.`, which the volume keeps for its
//! temporary files), so that a key means the same on both backends and can
//! never leave the store's root.

mod s3;
mod volume;

use std::time::{Duration, SystemTime};

use bytes::Bytes;

pub use s3::{S3Credentials, S3Location};

use crate::{
    config::{StorageBackend, StorageConfig},
    Error, Result,
};

/// Writes younger than this may be another replica's in progress; older
/// ones that nothing names, or temporary files, are a crash's leftovers.
pub const LEFTOVER_AGE: Duration = Duration::from_secs(3600);

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub size: u64,
    /// When the object was last written, by the store's clock.
    pub modified: SystemTime,
}

/// Where the shared objects live.
#[derive(Debug, Clone)]
pub enum Location {
    /// A folder (a shared volume's mount point).
    Volume(std::path::PathBuf),
    S3(S3Location),
}

impl Location {
    /// The configured store: `storage.backend`, with `store_dir` (the
    /// volume's folder, `heads.store_dir`) for a volume. S3 credentials come
    /// from the environment.
    pub fn from_config(storage: &StorageConfig, store_dir: &std::path::Path) -> Self {
        match storage.backend {
            StorageBackend::Volume => Location::Volume(store_dir.to_owned()),
            StorageBackend::S3 => {
                let s3 = &storage.s3;
                Location::S3(S3Location {
                    bucket: s3.bucket.clone(),
                    prefix: s3.prefix.clone(),
                    region: s3.region.clone(),
                    endpoint: s3.endpoint.clone(),
                    allow_http: s3.allow_http,
                    credentials: None,
                })
            }
        }
    }
}

/// A handle on the shared store; cheap to clone.
#[derive(Clone)]
pub struct Storage {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Volume(volume::Volume),
    S3(s3::S3),
}

impl Storage {
    /// Opens the store at `location` (a volume's folder is created when
    /// missing). Nothing is read yet.
    pub fn open(location: &Location) -> Result<Self> {
        let backend = match location {
            Location::Volume(root) => Backend::Volume(volume::Volume::open(root)?),
            Location::S3(s3) => Backend::S3(s3::S3::open(s3)?),
        };
        Ok(Self { backend })
    }

    /// What the store is, for logs: a folder or an S3 URL.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Volume(volume) => volume.describe(),
            Backend::S3(s3) => s3.describe(),
        }
    }

    /// The volume's folder; None on object storage.
    pub fn volume_root(&self) -> Option<&std::path::Path> {
        match &self.backend {
            Backend::Volume(volume) => Some(volume.root()),
            Backend::S3(_) => None,
        }
    }

    /// Removes temporary files and folders older than [`LEFTOVER_AGE`]
    /// anywhere in the store: writes that a crash cut short. Younger ones may
    /// be another replica's write in progress. Object storage has none (an
    /// upload appears whole or not at all).
    pub async fn remove_leftovers(&self) -> Result<usize> {
        match &self.backend {
            Backend::Volume(volume) => volume.remove_leftovers(LEFTOVER_AGE).await,
            Backend::S3(_) => Ok(0),
        }
    }

    /// The object at `key`; None when there is none.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        check_key(key)?;
        match &self.backend {
            Backend::Volume(volume) => volume.get(key).await,
            Backend::S3(s3) => s3.get(key).await,
        }
    }

    /// Writes `bytes` at `key`, replacing what was there: a reader sees the
    /// old object or the new one, never part of either.
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<()> {
        check_key(key)?;
        match &self.backend {
            Backend::Volume(volume) => volume.put(key, bytes).await,
            Backend::S3(s3) => s3.put(key, bytes).await,
        }
    }

    /// Writes `bytes` at `key` only if no object is there: true when this
    /// call created it, false when one existed. Of concurrent creators of one
    /// key, in any processes, exactly one gets true.
    pub async fn create(&self, key: &str, bytes: Bytes) -> Result<bool> {
        check_key(key)?;
        match &self.backend {
            Backend::Volume(volume) => volume.create(key, bytes).await,
            Backend::S3(s3) => s3.create(key, bytes).await,
        }
    }

    /// Every object whose key starts with the segments of `prefix` (`""`:
    /// all), in key order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        if !prefix.is_empty() {
            check_key(prefix)?;
        }
        let mut entries = match &self.backend {
            Backend::Volume(volume) => volume.list(prefix).await?,
            Backend::S3(s3) => s3.list(prefix).await?,
        };
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(entries)
    }

    /// Removes the object at `key`; removing a missing one is not an error.
    pub async fn delete(&self, key: &str) -> Result<()> {
        check_key(key)?;
        match &self.backend {
            Backend::Volume(volume) => volume.delete(key).await,
            Backend::S3(s3) => s3.delete(key).await,
        }
    }
}

/// Refuses keys that are not plain relative paths.
fn check_key(key: &str) -> Result<()> {
    let plain_segment = |segment: &str| {
        !segment.is_empty()
            && !segment.starts_with('.')
            && segment.len() <= 255
            && segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    if key.len() > 1024 || !key.split('/').all(plain_segment) {
        return Err(Error::Internal(format!("`{key}` is not a storage key")));
    }
    Ok(())
}

/// A storage failure, naming what was being done.
fn storage_error(doing: &str, key: &str, err: impl std::fmt::Display) -> Error {
    Error::Storage(format!("cannot {doing} `{key}`: {err}"))
}

#[cfg(test)]
mod tests {
    use super::check_key;

    #[test]
    fn keys_are_plain_relative_paths() {
        for good in ["heads/a/1/head.json", "jobs/x-1_y.json", "a"] {
            assert!(check_key(good).is_ok(), "{good}");
        }
        for bad in [
            "", "/abs", "a//b", "a/../b", "../a", "a/.tmp-x", ".hidden", "a b", "a\\b", "é",
        ] {
            assert!(check_key(bad).is_err(), "{bad}");
        }
    }
}
