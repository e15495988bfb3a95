//! The head store: `<root>/<name>/<version>/{head.json, weights.safetensors}`.
//!
//! A version is written into a temporary folder, every file and the folder are
//! fsynced, and only then is the folder renamed into place, so a crash at any
//! moment leaves either no version or a complete one; temporary leftovers are
//! removed on start-up. Versions of a name only ever increase, even across
//! deletions (`<name>/LATEST` remembers the highest one handed out).

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
};

use super::{model::HeadWeights, HeadMetadata, HeadRef};
use crate::{config::is_valid_name, Error, Result};

const METADATA_FILE: &str = "head.json";
const WEIGHTS_FILE: &str = "weights.safetensors";
const LATEST_FILE: &str = "LATEST";
const TEMP_PREFIX: &str = ".tmp-";

/// A published head version, loaded in memory.
#[derive(Debug)]
pub struct StoredHead {
    pub meta: HeadMetadata,
    pub weights: HeadWeights,
}

pub struct HeadStore {
    root: PathBuf,
    heads: RwLock<BTreeMap<String, BTreeMap<u32, Arc<StoredHead>>>>,
    /// Serialises publishing and deleting, which allocate versions and move folders.
    writer: Mutex<()>,
    max_heads: usize,
}

fn io_err(what: &str, path: &Path, err: std::io::Error) -> Error {
    Error::Storage(format!("{what} {}: {err}", path.display()))
}

/// Makes a rename or a new entry in `dir` durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|err| io_err("cannot sync folder", dir, err))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = File::create(path).map_err(|err| io_err("cannot create", path, err))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|err| io_err("cannot write", path, err))
}

impl HeadStore {
    /// Opens (creating) the store and loads every head in it. A version that cannot
    /// be read is logged and skipped, never fatal: one bad head must not keep the
    /// server from serving the others.
    pub fn open(root: &Path, max_heads: usize) -> Result<Self> {
        fs::create_dir_all(root).map_err(|err| io_err("cannot create", root, err))?;
        let mut heads: BTreeMap<String, BTreeMap<u32, Arc<StoredHead>>> = BTreeMap::new();
        let entries = fs::read_dir(root).map_err(|err| io_err("cannot list", root, err))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TEMP_PREFIX) {
                // An interrupted publish: never visible, safe to remove.
                if let Err(err) = fs::remove_dir_all(&path) {
                    tracing::warn!(path = %path.display(), error = %err, "cannot remove leftover");
                }
                continue;
            }
            if !path.is_dir() || !is_valid_name(&name) {
                continue;
            }
            for version_entry in fs::read_dir(&path).into_iter().flatten().flatten() {
                let Some(version) = version_entry
                    .file_name()
                    .to_str()
                    .and_then(|v| v.parse::<u32>().ok())
                else {
                    continue;
                };
                match read_version(&version_entry.path(), &name, version) {
                    Ok(head) => {
                        heads
                            .entry(name.clone())
                            .or_default()
                            .insert(version, Arc::new(head));
                    }
                    Err(err) => tracing::error!(head = %name, version, error = %err,
                        "skipping a head version that cannot be loaded"),
                }
            }
        }
        let count: usize = heads.values().map(BTreeMap::len).sum();
        crate::metrics::set_heads(count);
        tracing::info!(root = %root.display(), heads = count, "head store opened");
        Ok(Self {
            root: root.to_owned(),
            heads: RwLock::new(heads),
            writer: Mutex::new(()),
            max_heads,
        })
    }

    fn read(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, BTreeMap<u32, Arc<StoredHead>>>> {
        self.heads.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The named version, or the latest when the reference names none.
    pub fn get(&self, reference: &HeadRef) -> Result<Arc<StoredHead>> {
        let heads = self.read();
        let versions = heads
            .get(&reference.name)
            .ok_or_else(|| Error::HeadNotFound(reference.to_string()))?;
        let found = match reference.version {
            Some(version) => versions.get(&version),
            None => versions.values().next_back(),
        };
        found
            .cloned()
            .ok_or_else(|| Error::HeadNotFound(reference.to_string()))
    }

    /// Heads by name then version; only each name's latest unless `all_versions`.
    pub fn list(&self, backbone: Option<&str>, all_versions: bool) -> Vec<Arc<StoredHead>> {
        let heads = self.read();
        let mut out = Vec::new();
        for versions in heads.values() {
            let chosen: Vec<&Arc<StoredHead>> = if all_versions {
                versions.values().collect()
            } else {
                versions.values().next_back().into_iter().collect()
            };
            out.extend(
                chosen
                    .into_iter()
                    .filter(|h| backbone.is_none_or(|b| h.meta.backbone == b))
                    .cloned(),
            );
        }
        out
    }

    /// Publishes a new version of `meta.name` (its `version` field is assigned
    /// here) and returns it.
    pub fn publish(&self, mut meta: HeadMetadata, weights: HeadWeights) -> Result<Arc<StoredHead>> {
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if !is_valid_name(&meta.name) {
            return Err(Error::InvalidArgument(format!(
                "`{}` is not a valid head name",
                meta.name
            )));
        }
        let total: usize = self.read().values().map(BTreeMap::len).sum();
        if total >= self.max_heads {
            return Err(Error::LimitExceeded(format!(
                "the head store holds {total} head versions, its limit (heads.max_heads); \
                 delete some first"
            )));
        }
        let name_dir = self.root.join(&meta.name);
        let version = self.next_version(&meta.name, &name_dir);
        meta.version = version;

        let temp = self
            .root
            .join(format!("{TEMP_PREFIX}{}", uuid::Uuid::new_v4()));
        fs::create_dir(&temp).map_err(|err| io_err("cannot create", &temp, err))?;
        let written = (|| {
            let json = serde_json::to_vec_pretty(&meta)
                .map_err(|err| Error::Storage(format!("cannot encode metadata: {err}")))?;
            write_synced(&temp.join(METADATA_FILE), &json)?;
            let weights_path = temp.join(WEIGHTS_FILE);
            candle_core::safetensors::save(&weights.to_tensors()?, &weights_path)
                .map_err(|err| Error::Storage(format!("cannot write weights: {err}")))?;
            File::open(&weights_path)
                .and_then(|f| f.sync_all())
                .map_err(|err| io_err("cannot sync", &weights_path, err))?;
            sync_dir(&temp)?;
            if !name_dir.exists() {
                fs::create_dir(&name_dir).map_err(|err| io_err("cannot create", &name_dir, err))?;
                sync_dir(&self.root)?;
            }
            let target = name_dir.join(version.to_string());
            fs::rename(&temp, &target).map_err(|err| io_err("cannot publish", &target, err))?;
            sync_dir(&name_dir)?;
            sync_dir(&self.root)?;
            self.write_latest(&name_dir, version)
        })();
        if let Err(err) = written {
            let _ = fs::remove_dir_all(&temp);
            return Err(err);
        }

        let head = Arc::new(StoredHead { meta, weights });
        let mut heads = self.heads.write().unwrap_or_else(|p| p.into_inner());
        heads
            .entry(head.meta.name.clone())
            .or_default()
            .insert(version, Arc::clone(&head));
        crate::metrics::set_heads(heads.values().map(BTreeMap::len).sum());
        drop(heads);
        tracing::info!(head = %head.meta.name, version, "head published");
        Ok(head)
    }

    /// Deletes one version, or every version when the reference names none.
    pub fn delete(&self, reference: &HeadRef) -> Result<Vec<u32>> {
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let versions: Vec<u32> = {
            let heads = self.read();
            let existing = heads
                .get(&reference.name)
                .ok_or_else(|| Error::HeadNotFound(reference.to_string()))?;
            match reference.version {
                Some(v) if existing.contains_key(&v) => vec![v],
                Some(_) => return Err(Error::HeadNotFound(reference.to_string())),
                None => existing.keys().copied().collect(),
            }
        };
        let name_dir = self.root.join(&reference.name);
        for version in &versions {
            // Rename first so a crash never leaves a half-deleted version that
            // would be loaded again; the renamed folder is a temporary leftover.
            let dir = name_dir.join(version.to_string());
            let doomed = self
                .root
                .join(format!("{TEMP_PREFIX}{}", uuid::Uuid::new_v4()));
            fs::rename(&dir, &doomed).map_err(|err| io_err("cannot delete", &dir, err))?;
            sync_dir(&name_dir)?;
            let _ = fs::remove_dir_all(&doomed);
        }
        let mut heads = self.heads.write().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = heads.get_mut(&reference.name) {
            for version in &versions {
                existing.remove(version);
            }
            if existing.is_empty() {
                heads.remove(&reference.name);
            }
        }
        crate::metrics::set_heads(heads.values().map(BTreeMap::len).sum());
        tracing::info!(head = %reference.name, versions = ?versions, "head versions deleted");
        Ok(versions)
    }

    fn next_version(&self, name: &str, name_dir: &Path) -> u32 {
        let loaded = self
            .read()
            .get(name)
            .and_then(|v| v.keys().next_back().copied())
            .unwrap_or(0);
        let remembered = fs::read_to_string(name_dir.join(LATEST_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(0);
        loaded.max(remembered) + 1
    }

    fn write_latest(&self, name_dir: &Path, version: u32) -> Result<()> {
        let temp = name_dir.join(format!("{TEMP_PREFIX}{LATEST_FILE}"));
        write_synced(&temp, version.to_string().as_bytes())?;
        let latest = name_dir.join(LATEST_FILE);
        fs::rename(&temp, &latest).map_err(|err| io_err("cannot write", &latest, err))?;
        sync_dir(name_dir)
    }
}

fn read_version(dir: &Path, name: &str, version: u32) -> Result<StoredHead> {
    let meta_path = dir.join(METADATA_FILE);
    let text =
        fs::read_to_string(&meta_path).map_err(|err| io_err("cannot read", &meta_path, err))?;
    let meta: HeadMetadata = serde_json::from_str(&text)
        .map_err(|err| Error::Storage(format!("{} is invalid: {err}", meta_path.display())))?;
    if meta.name != name || meta.version != version {
        return Err(Error::Storage(format!(
            "{} describes {}@{}, not {name}@{version}",
            meta_path.display(),
            meta.name,
            meta.version
        )));
    }
    let tensors = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &candle_core::Device::Cpu)
        .map_err(|err| {
            Error::Storage(format!("cannot read weights in {}: {err}", dir.display()))
        })?;
    let weights = HeadWeights::from_tensors(&meta.kind, &tensors)?;
    if weights.input_dim() != meta.input_dim || weights.classes() != meta.labels.len() {
        return Err(Error::Storage(format!(
            "weights in {} do not match its metadata",
            dir.display()
        )));
    }
    Ok(StoredHead { meta, weights })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::head::{
        model::Dense, FeatureSettings, HeadKind, HeadMetrics, PoolingName, TrainingParams,
    };

    fn head(name: &str) -> (HeadMetadata, HeadWeights) {
        let meta = HeadMetadata {
            name: name.into(),
            version: 0,
            backbone: "bb".into(),
            backbone_fingerprint: "fp".into(),
            features: FeatureSettings {
                pooling: PoolingName::Mean,
                normalize: true,
            },
            input_dim: 2,
            labels: vec!["a".into(), "b".into()],
            kind: HeadKind::Linear,
            training: TrainingParams::default(),
            metrics: HeadMetrics::default(),
            train_examples: 10,
            validation_examples: 2,
            created_at_ms: 1,
        };
        let weights = HeadWeights::Linear {
            output: Dense {
                weight: vec![1.0, 2.0, 3.0, 4.0],
                bias: vec![0.5, -0.5],
                inputs: 2,
                outputs: 2,
            },
        };
        (meta, weights)
    }

    fn reference(text: &str) -> HeadRef {
        HeadRef::parse(text).unwrap()
    }

    #[test]
    fn publish_reload_list_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = HeadStore::open(dir.path(), 100).unwrap();
        let (meta, weights) = head("sentiment");
        assert_eq!(
            store
                .publish(meta.clone(), weights.clone())
                .unwrap()
                .meta
                .version,
            1
        );
        assert_eq!(
            store
                .publish(meta.clone(), weights.clone())
                .unwrap()
                .meta
                .version,
            2
        );
        store.publish(head("topic").0, weights.clone()).unwrap();

        let reopened = HeadStore::open(dir.path(), 100).unwrap();
        assert_eq!(
            reopened.get(&reference("sentiment")).unwrap().meta.version,
            2
        );
        let first = reopened.get(&reference("sentiment@1")).unwrap();
        assert_eq!(first.weights, weights);
        assert_eq!(reopened.list(None, false).len(), 2);
        assert_eq!(reopened.list(None, true).len(), 3);
        assert_eq!(reopened.list(Some("other"), true).len(), 0);

        assert_eq!(reopened.delete(&reference("sentiment@2")).unwrap(), vec![2]);
        // Versions never go back, even after the latest was deleted.
        assert_eq!(reopened.publish(meta, weights).unwrap().meta.version, 3);
        assert_eq!(
            reopened.delete(&reference("sentiment")).unwrap(),
            vec![1, 3]
        );
        assert!(matches!(
            reopened.get(&reference("sentiment")),
            Err(Error::HeadNotFound(_))
        ));
        assert!(HeadStore::open(dir.path(), 100)
            .unwrap()
            .get(&reference("sentiment"))
            .is_err());
    }

    #[test]
    fn leftovers_and_broken_versions_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = HeadStore::open(dir.path(), 100).unwrap();
        let (meta, weights) = head("good");
        store.publish(meta, weights).unwrap();
        // An interrupted publish and a version with corrupt metadata.
        fs::create_dir_all(dir.path().join(".tmp-crashed")).unwrap();
        fs::create_dir_all(dir.path().join("good/7")).unwrap();
        fs::write(dir.path().join("good/7/head.json"), b"{not json").unwrap();

        let reopened = HeadStore::open(dir.path(), 100).unwrap();
        assert_eq!(reopened.list(None, true).len(), 1);
        assert!(!dir.path().join(".tmp-crashed").exists());
    }

    #[test]
    fn the_head_limit_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let store = HeadStore::open(dir.path(), 1).unwrap();
        let (meta, weights) = head("one");
        store.publish(meta.clone(), weights.clone()).unwrap();
        assert!(matches!(
            store.publish(meta, weights),
            Err(Error::LimitExceeded(_))
        ));
    }
}
