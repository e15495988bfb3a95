//! The store that replicas share: a volume every replica mounts (a
//! ReadWriteMany volume, or a local folder for one process) or S3-compatible
//! object storage. One small API over both: whole objects read, written
//! (replacing atomically), created only if absent (the one primitive that
//! lets processes agree without a lock: version numbers, job ownership),
//! replaced only if unchanged since read (compare-and-set: job records,
//! which a replica paused past its lease must not overwrite), listed and
//! deleted.
//!
//! Keys are `/`-separated relative paths of plain segments (letters, digits,
//! `.`, `_`, `-`; none starting with `.`, which the volume keeps for its
//! temporary files), so that a key means the same on both backends and can
//! never leave the store's root.

mod objects;
mod s3;
mod volume;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;

pub use s3::{S3Credentials, S3Location};

use crate::{
    config::{StorageBackend, StorageConfig},
    Error, Result,
};

/// Writes younger than this may be another replica's in progress; older
/// ones that nothing names, or temporary files, are a crash's leftovers.
pub const LEFTOVER_AGE: Duration = Duration::from_secs(3600);

/// Where the clock probes live ([`Storage::now`]).
const CLOCK_PREFIX: &str = "clock";

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub size: u64,
    /// When the object was last written, by the store's clock.
    pub modified: SystemTime,
}

/// Which write of an object a read saw, for [`Storage::update`]: object
/// storage's entity tag (and version), or on a volume the content itself
/// (records are small).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version(VersionTag);

#[derive(Debug, Clone, PartialEq, Eq)]
enum VersionTag {
    ETag(Option<String>, Option<String>),
    Content(Bytes),
}

/// An object and the version of it that was read.
#[derive(Debug, Clone)]
pub struct Versioned {
    pub bytes: Bytes,
    pub version: Version,
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
    /// The object this handle writes to read the store's clock.
    probe: Arc<str>,
}

#[derive(Clone)]
enum Backend {
    Volume(volume::Volume),
    /// Object storage of any `object_store` backend: another one (GCS,
    /// Azure) is a builder beside [`s3::open`] and a [`Location`] of its own.
    Objects(objects::Objects),
}

impl Storage {
    /// Opens the store at `location` (a volume's folder is created when
    /// missing). Nothing is read yet.
    pub fn open(location: &Location) -> Result<Self> {
        let backend = match location {
            Location::Volume(root) => Backend::Volume(volume::Volume::open(root)?),
            Location::S3(s3) => Backend::Objects(s3::open(s3)?),
        };
        let probe = Arc::from(format!("{CLOCK_PREFIX}/{}", uuid::Uuid::new_v4()));
        Ok(Self { backend, probe })
    }

    /// The store's own time: the modification time it gives an object
    /// written now (the file server's clock on a volume, the service's on
    /// S3). Ages of shared objects are measured on it, never on one
    /// replica's wall clock against another's.
    pub async fn now(&self) -> Result<SystemTime> {
        self.put(&self.probe, Bytes::new()).await?;
        self.modified(&self.probe)
            .await?
            .ok_or_else(|| Error::Storage(format!("the clock probe `{}` vanished", self.probe)))
    }

    /// When the object at `key` was last written, by the store's clock; None
    /// when there is none.
    pub async fn modified(&self, key: &str) -> Result<Option<SystemTime>> {
        check_key(key)?;
        match &self.backend {
            Backend::Volume(volume) => volume.modified(key).await,
            Backend::Objects(objects) => objects.modified(key).await,
        }
    }

    /// What the store is, for logs: a folder or an S3 URL.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Volume(volume) => volume.describe(),
            Backend::Objects(objects) => objects.describe(),
        }
    }

    /// The volume's folder; None on object storage.
    pub fn volume_root(&self) -> Option<&std::path::Path> {
        match &self.backend {
            Backend::Volume(volume) => Some(volume.root()),
            Backend::Objects(_) => None,
        }
    }

    /// Removes temporary files and folders older than [`LEFTOVER_AGE`]
    /// anywhere in the store: writes that a crash cut short. Younger ones may
    /// be another replica's write in progress. Object storage has none (an
    /// upload appears whole or not at all).
    pub async fn remove_leftovers(&self) -> Result<usize> {
        // Ages by the store's clock: a replica whose clock runs ahead must
        // not take another's write in progress for a crash's leftover.
        let now = self.now().await?;
        let probes = self.remove_old_probes(now).await?;
        let temporaries = match &self.backend {
            Backend::Volume(volume) => volume.remove_leftovers(LEFTOVER_AGE, now).await?,
            Backend::Objects(_) => 0,
        };
        Ok(probes + temporaries)
    }

    /// Removes clock probes of earlier processes (one per start) older than
    /// [`LEFTOVER_AGE`] at the store's time `now`.
    async fn remove_old_probes(&self, now: SystemTime) -> Result<usize> {
        let mut removed = 0;
        for entry in self.list(CLOCK_PREFIX).await? {
            let old = now
                .duration_since(entry.modified)
                .is_ok_and(|age| age >= LEFTOVER_AGE);
            if old && *entry.key != *self.probe {
                self.delete(&entry.key).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The object at `key`; None when there is none.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        check_key(key)?;
        match &self.backend {
            Backend::Volume(volume) => volume.get(key).await,
            Backend::Objects(objects) => objects.get(key).await,
        }
    }

    /// Writes `bytes` at `key`, replacing what was there: a reader sees the
    /// old object or the new one, never part of either.
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<()> {
        check_key(key)?;
        match &self.backend {
            Backend::Volume(volume) => volume.put(key, bytes).await,
            Backend::Objects(objects) => objects.put(key, bytes).await,
        }
    }

    /// The object at `key` with its version, for a later
    /// [`Storage::update`]; None when there is none.
    pub async fn get_versioned(&self, key: &str) -> Result<Option<Versioned>> {
        check_key(key)?;
        match &self.backend {
            Backend::Volume(volume) => Ok(volume.get(key).await?.map(|bytes| Versioned {
                version: Version(VersionTag::Content(bytes.clone())),
                bytes,
            })),
            Backend::Objects(objects) => objects.get_versioned(key).await,
        }
    }

    /// Replaces the object at `key` with `bytes` only if it is still the
    /// `expected` version: true when this call replaced it, false when
    /// another write (or a delete) came first. Of concurrent updates of one
    /// version, in any processes, at most one succeeds. On object storage an
    /// `If-Match` PUT; on a volume the comparison and the rename run under an exclusive
    /// lock on a file beside the object (`flock`, which NFS carries as a
    /// POSIX lock).
    pub async fn update(&self, key: &str, bytes: Bytes, expected: &Version) -> Result<bool> {
        check_key(key)?;
        match (&self.backend, &expected.0) {
            (Backend::Volume(volume), VersionTag::Content(content)) => {
                volume.update(key, bytes, content.clone()).await
            }
            (Backend::Objects(objects), VersionTag::ETag(e_tag, version)) => {
                objects
                    .update(key, bytes, e_tag.clone(), version.clone())
                    .await
            }
            _ => Err(Error::Internal(format!(
                "a version of `{key}` from another store"
            ))),
        }
    }

    /// Writes `bytes` at `key` only if no object is there: true when this
    /// call created it, false when one existed. Of concurrent creators of one
    /// key, in any processes, exactly one gets true.
    pub async fn create(&self, key: &str, bytes: Bytes) -> Result<bool> {
        check_key(key)?;
        match &self.backend {
            Backend::Volume(volume) => volume.create(key, bytes).await,
            Backend::Objects(objects) => objects.create(key, bytes).await,
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
            Backend::Objects(objects) => objects.list(prefix).await?,
        };
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(entries)
    }

    /// Removes the object at `key`; removing a missing one is not an error.
    pub async fn delete(&self, key: &str) -> Result<()> {
        check_key(key)?;
        match &self.backend {
            Backend::Volume(volume) => volume.delete(key).await,
            Backend::Objects(objects) => objects.delete(key).await,
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
    use super::*;

    /// Of two updates of one version one wins; an update of a version
    /// another write replaced is refused, as is one of a deleted object.
    #[tokio::test]
    async fn updates_replace_only_the_version_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Storage::open(&Location::Volume(dir.path().to_owned())).unwrap();
        let other = Storage::open(&Location::Volume(dir.path().to_owned())).unwrap();
        assert!(store.create("r/x", Bytes::from_static(b"1")).await.unwrap());
        let read = store.get_versioned("r/x").await.unwrap().unwrap();
        let (a, b) = tokio::join!(
            store.update("r/x", Bytes::from_static(b"2"), &read.version),
            other.update("r/x", Bytes::from_static(b"3"), &read.version),
        );
        assert!(a.unwrap() != b.unwrap(), "one of two updates wins");
        let stale = store.update("r/x", Bytes::from_static(b"4"), &read.version);
        assert!(!stale.await.unwrap());
        let now = store.get_versioned("r/x").await.unwrap().unwrap();
        assert_ne!(now.bytes, Bytes::from_static(b"4"));
        assert!(
            store.list("r").await.unwrap().len() == 1,
            "no lock file listed"
        );
        store.delete("r/x").await.unwrap();
        let gone = store.update("r/x", Bytes::from_static(b"5"), &now.version);
        assert!(!gone.await.unwrap());
    }

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
