//! Durable file writes: a crash at any moment leaves the old content or the
//! new, never half of either.

use std::{
    fs::{self, File},
    io::{self, Write},
    path::{Path, PathBuf},
    time::Duration,
};

/// Prefix of temporary files and folders: readers skip them, and start-up
/// cleanup knows them.
pub const TEMP_PREFIX: &str = ".tmp-";

/// Makes a rename or a new entry in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to a new file and syncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// `path`'s folder, and a new temporary file name in it.
fn temp_beside(path: &Path) -> io::Result<(&Path, PathBuf)> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other(format!("{} has no folder", path.display())))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!("{TEMP_PREFIX}{name}-{}", uuid::Uuid::new_v4()));
    Ok((dir, temp))
}

/// Replaces `path` with `bytes`: a temporary file beside it is written and
/// synced, renamed over it, and the folder synced.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let (dir, temp) = temp_beside(path)?;
    let written = write_synced(&temp, bytes).and_then(|()| fs::rename(&temp, path));
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written?;
    sync_dir(dir)
}

/// Creates `path` with `bytes` only if it does not exist: a synced temporary
/// file beside it is linked to it, which fails when `path` exists (on POSIX
/// file systems, NFS included, exactly one of concurrent creators succeeds).
/// True when this call created it; the temporary file goes either way.
pub fn create_atomically(path: &Path, bytes: &[u8]) -> io::Result<bool> {
    let (dir, temp) = temp_beside(path)?;
    let linked = write_synced(&temp, bytes).and_then(|()| fs::hard_link(&temp, path));
    let _ = fs::remove_file(&temp);
    match linked {
        Ok(()) => {
            sync_dir(dir)?;
            Ok(true)
        }
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(err) => Err(err),
    }
}

/// Whether `path` was last modified at least `age` ago; false when that
/// cannot be told (a leftover is only removed when surely old).
pub fn is_older_than(path: &Path, age: Duration) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|modified| modified.elapsed().ok())
        .is_some_and(|elapsed| elapsed >= age)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("record.json");
        write_atomically(&path, b"first").unwrap();
        write_atomically(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["record.json"]);
        assert!(write_atomically(&dir.path().join("missing/x"), b"x").is_err());
    }
}
