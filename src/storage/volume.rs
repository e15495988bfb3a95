//! The store on a folder: a shared volume's mount point (NFS and other
//! ReadWriteMany volumes) or a local disk. Every write goes to a temporary
//! file beside its target and is synced first; a replacing write renames it
//! into place, a create links it there, which fails if the target exists: on
//! POSIX file systems, NFS included, exactly one of concurrent creators
//! succeeds. Temporary files start with `.` and are never listed.

use std::{
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
};

use bytes::Bytes;

use super::{storage_error, Entry};
use crate::{fsutil, task::run_blocking, Error, Result};

#[derive(Clone)]
pub struct Volume {
    root: PathBuf,
}

impl Volume {
    pub fn open(root: &Path) -> Result<Self> {
        fs::create_dir_all(root).map_err(|err| {
            Error::Storage(format!(
                "cannot create the store at {}: {err}",
                root.display()
            ))
        })?;
        Ok(Self {
            root: root.to_owned(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub async fn remove_leftovers(
        &self,
        age: std::time::Duration,
        now: std::time::SystemTime,
    ) -> Result<usize> {
        let root = self.root.clone();
        run_blocking("removing leftovers", move || {
            remove_old_temporaries(&root, age, now)
        })
        .await?
        .map_err(|err| storage_error("clean", "the store", err))
    }

    pub fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        match tokio::fs::read(self.path(key)).await {
            Ok(bytes) => Ok(Some(Bytes::from(bytes))),
            Err(err) if err.kind() == ErrorKind::NotFound => Ok(None),
            Err(err) => Err(storage_error("read", key, err)),
        }
    }

    pub async fn modified(&self, key: &str) -> Result<Option<std::time::SystemTime>> {
        match tokio::fs::metadata(self.path(key)).await {
            Ok(meta) => meta
                .modified()
                .map(Some)
                .map_err(|err| storage_error("read the time of", key, err)),
            Err(err) if err.kind() == ErrorKind::NotFound => Ok(None),
            Err(err) => Err(storage_error("read the time of", key, err)),
        }
    }

    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<()> {
        let path = self.path(key);
        let owned = key.to_owned();
        run_blocking("a storage write", move || {
            create_parent(&path)?;
            fsutil::write_atomically(&path, &bytes)
        })
        .await?
        .map_err(|err| storage_error("write", &owned, err))
    }

    pub async fn create(&self, key: &str, bytes: Bytes) -> Result<bool> {
        let path = self.path(key);
        let owned = key.to_owned();
        run_blocking("a storage create", move || create_new(&path, &bytes))
            .await?
            .map_err(|err| storage_error("create", &owned, err))
    }

    pub async fn update(&self, key: &str, bytes: Bytes, expected: Bytes) -> Result<bool> {
        let path = self.path(key);
        let owned = key.to_owned();
        run_blocking("a storage update", move || {
            update_locked(&path, &bytes, &expected)
        })
        .await?
        .map_err(|err| storage_error("update", &owned, err))
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        let root = self.root.clone();
        let owned = prefix.to_owned();
        run_blocking("a storage listing", move || list_under(&root, &owned))
            .await?
            .map_err(|err| storage_error("list", prefix, err))
    }

    pub async fn delete(&self, key: &str) -> Result<()> {
        match tokio::fs::remove_file(self.path(key)).await {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == ErrorKind::NotFound => Ok(()),
            Err(err) => Err(storage_error("delete", key, err)),
        }
    }
}

fn create_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(parent) => fs::create_dir_all(parent),
        None => Ok(()),
    }
}

/// [`fsutil::create_atomically`] in a folder created when missing.
fn create_new(path: &Path, bytes: &[u8]) -> std::io::Result<bool> {
    create_parent(path)?;
    fsutil::create_atomically(path, bytes)
}

/// Prefix of the lock files beside objects that are updated conditionally.
/// Never removed: a lock file replaced while held would let two writers in.
const LOCK_PREFIX: &str = ".lock-";

/// Replaces `path` with `bytes` if it holds `expected`, under an exclusive
/// lock on `.lock-<name>` beside it, so that no other conditional write of
/// it runs between the comparison and the rename. A holder that dies
/// releases its lock; one stopped inside this short section holds the
/// others' updates of this object back until it resumes.
fn update_locked(path: &Path, bytes: &[u8], expected: &[u8]) -> std::io::Result<bool> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(false);
    };
    let lock_path = dir.join(format!("{LOCK_PREFIX}{}", name.to_string_lossy()));
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path)?;
    lock.lock()?;
    let current = match fs::read(path) {
        Ok(current) => current,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(false),
        Err(err) => return Err(err),
    };
    if current != expected {
        return Ok(false);
    }
    fsutil::write_atomically(path, bytes)?;
    Ok(true)
}

/// Removes the temporary files (names starting with [`fsutil::TEMP_PREFIX`])
/// under `start` that were last written at least `age` before `now`, the
/// store's time (the file server's, as the files' times are).
fn remove_old_temporaries(
    start: &Path,
    age: std::time::Duration,
    now: std::time::SystemTime,
) -> std::io::Result<usize> {
    let mut removed = 0;
    let mut pending = vec![start.to_owned()];
    while let Some(dir) = pending.pop() {
        let listing = match fs::read_dir(&dir) {
            Ok(listing) => listing,
            Err(err) if matches!(err.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
                continue
            }
            Err(err) => return Err(err),
        };
        for item in listing {
            let item = item?;
            let path = item.path();
            let temporary = item
                .file_name()
                .to_string_lossy()
                .starts_with(fsutil::TEMP_PREFIX);
            let old = || {
                fs::metadata(&path)
                    .and_then(|meta| meta.modified())
                    .is_ok_and(|written| now.duration_since(written).is_ok_and(|d| d >= age))
            };
            if temporary && old() {
                let gone = match item.file_type()?.is_dir() {
                    true => fs::remove_dir_all(&path),
                    false => fs::remove_file(&path),
                };
                if gone.is_ok() {
                    removed += 1;
                }
            } else if !temporary && item.file_type()?.is_dir() {
                pending.push(path);
            }
        }
    }
    Ok(removed)
}

/// Every file under `root/prefix` (or `root` for `""`), temporary ones left
/// out, keyed by its path from `root`.
fn list_under(root: &Path, prefix: &str) -> std::io::Result<Vec<Entry>> {
    let mut entries = Vec::new();
    let start = if prefix.is_empty() {
        root.to_owned()
    } else {
        root.join(prefix)
    };
    let mut pending = vec![start];
    while let Some(dir) = pending.pop() {
        let listing = match fs::read_dir(&dir) {
            Ok(listing) => listing,
            // A prefix naming a file: that one object.
            Err(err) if err.kind() == ErrorKind::NotADirectory => {
                push_file(root, &dir, &mut entries)?;
                continue;
            }
            Err(err) if err.kind() == ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        };
        for item in listing {
            let item = item?;
            if item.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let path = item.path();
            if item.file_type()?.is_dir() {
                pending.push(path);
            } else {
                push_file(root, &path, &mut entries)?;
            }
        }
    }
    Ok(entries)
}

fn push_file(root: &Path, path: &Path, entries: &mut Vec<Entry>) -> std::io::Result<()> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        // Deleted since the listing: not there.
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    let Ok(relative) = path.strip_prefix(root) else {
        return Ok(());
    };
    let key = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/");
    entries.push(Entry {
        key,
        size: meta.len(),
        modified: meta.modified()?,
    });
    Ok(())
}
