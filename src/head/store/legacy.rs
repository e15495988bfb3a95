//! Heads published before the shared store had namespaces lived at
//! `<store_dir>/<name>/<version>/{head.json, weights.safetensors}`, with the
//! highest number handed out in `<store_dir>/<name>/LATEST`. At start a
//! replica on a volume moves them under `heads/`, where the store looks: each
//! version folder by one rename (atomic; of replicas migrating at once, one
//! moves each folder), and a LATEST above every version as a deleted marker,
//! so that a number is still never reused.

use std::{fs, io, path::Path};

use super::layout::HEADS;
use crate::{config::is_valid_name, fsutil};

/// Top-level folders that are the store's own, never heads.
const RESERVED: [&str; 3] = [HEADS, "jobs", "datasets"];

/// Moves heads of the old layout under `root` into the store's layout;
/// returns how many versions moved.
pub fn migrate_volume(root: &Path) -> io::Result<usize> {
    let mut moved = 0;
    let Ok(entries) = fs::read_dir(root) else {
        return Ok(0);
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !entry.path().is_dir() || !is_valid_name(&name) {
            continue;
        }
        if RESERVED.contains(&name.as_str()) {
            if has_versions(&entry.path()) {
                tracing::warn!(head = %name, "a head of this name from an earlier layout is \
                    not carried over: the name is the store's own; move it by hand");
            }
            continue;
        }
        moved += migrate_name(root, &name)?;
    }
    if moved > 0 {
        tracing::info!(
            versions = moved,
            "head versions moved into the store's layout"
        );
    }
    Ok(moved)
}

fn has_versions(dir: &Path) -> bool {
    version_folders(dir).any(|v| dir.join(v.to_string()).join("head.json").is_file())
}

fn version_folders(dir: &Path) -> impl Iterator<Item = u32> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|v| v.parse::<u32>().ok()))
}

fn migrate_name(root: &Path, name: &str) -> io::Result<usize> {
    let old = root.join(name);
    let new = root.join(HEADS).join(name);
    fs::create_dir_all(&new)?;
    let mut moved = 0;
    let mut highest = 0;
    for version in version_folders(&old).collect::<Vec<_>>() {
        highest = highest.max(version);
        let target = new.join(version.to_string());
        if target.exists() {
            continue;
        }
        match fs::rename(old.join(version.to_string()), &target) {
            Ok(()) => moved += 1,
            // Another replica moved it first.
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
    }
    let latest = old.join("LATEST");
    let remembered = fs::read_to_string(&latest)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(0);
    if remembered > highest {
        let marker = new.join(remembered.to_string());
        fs::create_dir_all(&marker)?;
        fsutil::write_atomically(&marker.join("deleted"), b"")?;
    }
    fsutil::sync_dir(&new)?;
    let _ = fs::remove_file(&latest);
    // Only once empty: anything else in it is left for its owner to see.
    let _ = fs::remove_dir(&old);
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_layout_versions_move_and_numbers_stay_taken() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for version in ["1", "3"] {
            let folder = root.join("old").join(version);
            fs::create_dir_all(&folder).unwrap();
            fs::write(folder.join("head.json"), b"{}").unwrap();
            fs::write(folder.join("weights.safetensors"), b"w").unwrap();
        }
        fs::write(root.join("old/LATEST"), b"5").unwrap();
        fs::create_dir_all(root.join("jobs/2")).unwrap();
        fs::write(root.join("jobs/2/head.json"), b"{}").unwrap();

        assert_eq!(migrate_volume(root).unwrap(), 2);
        assert!(root.join("heads/old/1/weights.safetensors").is_file());
        assert!(root.join("heads/old/3/head.json").is_file());
        assert!(root.join("heads/old/5/deleted").is_file());
        assert!(!root.join("old").exists());
        assert!(
            root.join("jobs/2/head.json").is_file(),
            "reserved: left alone"
        );
        assert_eq!(migrate_volume(root).unwrap(), 0, "once only");
    }
}
