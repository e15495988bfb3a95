//! The head store: `<root>/<name>/<version>/{head.json, weights.safetensors}`.
//!
//! A version is written into a temporary folder, every file and the folder are
//! fsynced, and only then is the folder renamed into place, so a crash at any
//! moment leaves either no version or a complete one; temporary leftovers are
//! removed on start-up. Versions of a name only ever increase, even across
//! deletions (`<name>/LATEST` remembers the highest one handed out).

use std::{
    collections::{BTreeMap, HashMap},
    fs::{self, File},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use super::{
    adapters::{AdapterCache, ResidentAdapters},
    finetune::Method,
    model::HeadWeights,
    HeadMetadata, HeadRef,
};
use crate::backbone::adapter::{Adapter, AdapterKind};
use crate::{config::is_valid_name, fsutil, sync::lock, Error, Result};

const METADATA_FILE: &str = "head.json";
const WEIGHTS_FILE: &str = "weights.safetensors";
const LATEST_FILE: &str = "LATEST";
use crate::fsutil::TEMP_PREFIX;

/// A published head version, loaded in memory.
#[derive(Debug)]
pub struct StoredHead {
    pub meta: HeadMetadata,
    pub weights: HeadWeights,
}

pub struct HeadStore {
    root: PathBuf,
    heads: RwLock<BTreeMap<String, Versions>>,
    /// When each name (and, under "", the whole store) was last read from disk.
    scanned: Mutex<HashMap<String, Instant>>,
    /// How stale the view may get before reads look at the disk again.
    refresh_interval: Duration,
    /// Versions that failed to load, so each is reported once, not at every scan.
    broken: Mutex<std::collections::HashSet<(String, u32)>>,
    /// Serialises publishing and deleting, which allocate versions and move folders.
    writer: Mutex<()>,
    max_heads: usize,
    /// Fine-tuned heads' adapters, a bounded number resident.
    adapters: AdapterCache,
}

/// Adapters resident at once unless configured (heads.max_resident_adapters
/// and heads.max_resident_adapter_bytes).
pub const DEFAULT_RESIDENT_ADAPTERS: ResidentAdapters = ResidentAdapters {
    count: 128,
    bytes: 1 << 30,
};

fn io_err(what: &str, path: &Path, err: std::io::Error) -> Error {
    Error::Storage(format!("{what} {}: {err}", path.display()))
}

/// Makes a rename or a new entry in `dir` durable.
fn sync_dir(dir: &Path) -> Result<()> {
    fsutil::sync_dir(dir).map_err(|err| io_err("cannot sync folder", dir, err))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    fsutil::write_synced(path, bytes).map_err(|err| io_err("cannot write", path, err))
}

type Versions = BTreeMap<u32, Arc<StoredHead>>;

/// Temporary folders younger than this may belong to a publish in progress on
/// another replica sharing the store; older ones are leftovers of a crash.
const LEFTOVER_AGE: Duration = Duration::from_secs(3600);

/// How stale the in-memory view of a name may get before a read looks at the
/// disk again, so heads published or deleted by other replicas sharing the store
/// appear and disappear without a restart.
const REFRESH_INTERVAL: Duration = Duration::from_secs(2);

/// Most names whose last scan is remembered (see `mark_scanned`).
const MAX_SCAN_RECORDS: usize = 4096;

impl HeadStore {
    /// Opens (creating) the store and loads every head in it. A version that cannot
    /// be read is logged and skipped, never fatal: one bad head must not keep the
    /// server from serving the others.
    pub fn open(root: &Path, max_heads: usize) -> Result<Self> {
        Self::open_with_adapters(root, max_heads, DEFAULT_RESIDENT_ADAPTERS)
    }

    /// [`HeadStore::open`] keeping fine-tuned adapters in memory within
    /// `resident_adapters`.
    pub fn open_with_adapters(
        root: &Path,
        max_heads: usize,
        resident_adapters: ResidentAdapters,
    ) -> Result<Self> {
        fs::create_dir_all(root).map_err(|err| io_err("cannot create", root, err))?;
        remove_leftovers(root);
        let store = Self {
            root: root.to_owned(),
            heads: RwLock::new(BTreeMap::new()),
            scanned: Mutex::new(HashMap::new()),
            broken: Mutex::new(Default::default()),
            refresh_interval: REFRESH_INTERVAL,
            writer: Mutex::new(()),
            max_heads,
            adapters: AdapterCache::new(resident_adapters),
        };
        store.refresh_all()?;
        // Exported from the start, also for an empty store.
        report_sizes(&store.read());
        let count = store.count();
        tracing::info!(root = %root.display(), heads = count, "head store opened");
        Ok(store)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Versions>> {
        crate::sync::read(&self.heads)
    }

    fn count(&self) -> usize {
        self.read().values().map(BTreeMap::len).sum()
    }

    /// Re-reads one name from disk, reusing versions already in memory. Holds
    /// the writer lock, so a scan that began before one of this store's own
    /// publishes or deletions cannot undo it in memory.
    fn refresh_name(&self, name: &str) {
        let _writer = lock(&self.writer);
        self.refresh_name_locked(name);
    }

    /// [`HeadStore::refresh_name`] for a caller that holds the writer lock.
    fn refresh_name_locked(&self, name: &str) {
        let known = self.read().get(name).cloned().unwrap_or_default();
        let (versions, failures) = scan_name(&self.root.join(name), name, &known, &self.adapters);
        let mut broken = crate::sync::lock(&self.broken);
        for (version, err) in failures {
            if broken.insert((name.to_owned(), version)) {
                tracing::error!(head = %name, version, error = %err,
                    "skipping a head version that cannot be loaded");
            }
        }
        drop(broken);
        {
            let mut heads = crate::sync::write(&self.heads);
            self.adapters.retain(name, |v| versions.contains_key(&v));
            if versions.is_empty() {
                heads.remove(name);
            } else {
                heads.insert(name.to_owned(), versions);
            }
            report_sizes(&heads);
        }
        self.mark_scanned(name);
    }

    /// Re-reads every name on disk.
    fn refresh_all(&self) -> Result<()> {
        let entries =
            fs::read_dir(&self.root).map_err(|err| io_err("cannot list", &self.root, err))?;
        let mut names: Vec<String> = entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| is_valid_name(name))
            .collect();
        names.extend(self.read().keys().cloned());
        names.sort();
        names.dedup();
        for name in names {
            self.refresh_name(&name);
        }
        self.mark_scanned("");
        Ok(())
    }

    /// Records that `key` (a name, or "" for the whole store) was just read.
    /// Names come from clients, so the record is bounded: entries older than
    /// the refresh interval carry no information and go first.
    fn mark_scanned(&self, key: &str) {
        let mut scanned = lock(&self.scanned);
        if scanned.len() >= MAX_SCAN_RECORDS {
            let interval = self.refresh_interval;
            scanned.retain(|_, at| at.elapsed() < interval);
            if scanned.len() >= MAX_SCAN_RECORDS {
                scanned.clear();
            }
        }
        scanned.insert(key.to_owned(), Instant::now());
    }

    /// Whether the view of `key` (a name, or "" for the whole store) is older than
    /// the refresh interval.
    fn stale(&self, key: &str) -> bool {
        lock(&self.scanned)
            .get(key)
            .is_none_or(|at| at.elapsed() >= self.refresh_interval)
    }

    /// The named version (or the latest) if it is in memory; never touches the
    /// disk, so async handlers may call it. The view is kept current by
    /// [`HeadStore::refresh_periodically`] and by every change made here.
    pub fn cached(&self, reference: &HeadRef) -> Option<Arc<StoredHead>> {
        let heads = self.read();
        let versions = heads.get(&reference.name)?;
        match reference.version {
            Some(version) => versions.get(&version).cloned(),
            None => versions.values().next_back().cloned(),
        }
    }

    /// The named version, or the latest when the reference names none. Blocks:
    /// a miss re-reads the name from disk (it may be a head another replica
    /// just published), at most once per refresh interval per name, so a
    /// client asking for `head@999` again and again costs one scan, not many.
    pub fn get(&self, reference: &HeadRef) -> Result<Arc<StoredHead>> {
        // "Latest" may have moved on another replica.
        if reference.version.is_none() && self.stale(&reference.name) {
            self.refresh_name(&reference.name);
        }
        if let Some(found) = self.cached(reference) {
            return Ok(found);
        }
        if self.stale(&reference.name) {
            self.refresh_name(&reference.name);
        }
        self.cached(reference)
            .ok_or_else(|| Error::HeadNotFound(reference.to_string()))
    }

    /// Re-reads the whole store every refresh interval on a blocking thread, so
    /// that [`HeadStore::cached`] sees what other replicas publish and delete.
    /// Ends when the store is dropped elsewhere.
    pub fn refresh_periodically(store: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(store);
        let interval = store.refresh_interval;
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(store) = weak.upgrade() else { return };
                let refreshed = crate::task::run_blocking("refreshing the head store", move || {
                    store.refresh_all()
                })
                .await;
                match refreshed {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) | Err(err) => {
                        tracing::warn!(error = %err, "cannot re-read the head store")
                    }
                }
            }
        })
    }

    /// Heads by name then version; only each name's latest unless `all_versions`.
    pub fn list(&self, backbone: Option<&str>, all_versions: bool) -> Vec<Arc<StoredHead>> {
        if self.stale("") {
            if let Err(err) = self.refresh_all() {
                tracing::warn!(error = %err, "cannot re-read the head store; listing what is known");
            }
        }
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
    /// here), with a fine-tuned head's adapter, and returns it.
    pub fn publish(
        &self,
        mut meta: HeadMetadata,
        weights: HeadWeights,
        adapter: Option<Adapter>,
    ) -> Result<Arc<StoredHead>> {
        if meta.fine_tuning.is_some() != adapter.is_some() {
            return Err(Error::Internal(
                "a head has an adapter exactly when it was fine-tuned".into(),
            ));
        }
        let _writer = crate::sync::lock(&self.writer);
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
        // Replicas sharing the store may race for a version number: the loser's
        // rename fails (the target exists and is not empty) and it takes the next.
        let mut attempts = 0;
        let version = loop {
            attempts += 1;
            self.refresh_name_locked(&meta.name);
            let version = self.next_version(&meta.name, &name_dir)?;
            meta.version = version;
            match self.write_version(&name_dir, &meta, &weights, adapter.as_ref()) {
                Ok(()) => break version,
                Err(err) if attempts < 8 && name_dir.join(version.to_string()).exists() => {
                    tracing::debug!(head = %meta.name, version, error = %err,
                        "version taken meanwhile; trying the next one");
                }
                Err(err) => return Err(err),
            }
        };

        if let Some(adapter) = adapter {
            self.adapters.insert(&meta.name, version, Arc::new(adapter));
        }
        let head = Arc::new(StoredHead { meta, weights });
        let mut heads = crate::sync::write(&self.heads);
        heads
            .entry(head.meta.name.clone())
            .or_default()
            .insert(version, Arc::clone(&head));
        report_sizes(&heads);
        drop(heads);
        tracing::info!(head = %head.meta.name, version, "head published");
        Ok(head)
    }

    /// Writes one version into a temporary folder, syncs it and renames it into
    /// place; on failure nothing is left behind.
    fn write_version(
        &self,
        name_dir: &Path,
        meta: &HeadMetadata,
        weights: &HeadWeights,
        adapter: Option<&Adapter>,
    ) -> Result<()> {
        let temp = self
            .root
            .join(format!("{TEMP_PREFIX}{}", uuid::Uuid::new_v4()));
        fs::create_dir(&temp).map_err(|err| io_err("cannot create", &temp, err))?;
        let written = (|| {
            let json = serde_json::to_vec_pretty(meta)
                .map_err(|err| Error::Storage(format!("cannot encode metadata: {err}")))?;
            write_synced(&temp.join(METADATA_FILE), &json)?;
            let weights_path = temp.join(WEIGHTS_FILE);
            let mut tensors = weights.to_tensors()?;
            if let Some(adapter) = adapter {
                tensors.extend(adapter.to_tensors()?);
            }
            candle_core::safetensors::save(&tensors, &weights_path)
                .map_err(|err| Error::Storage(format!("cannot write weights: {err}")))?;
            File::open(&weights_path)
                .and_then(|f| f.sync_all())
                .map_err(|err| io_err("cannot sync", &weights_path, err))?;
            sync_dir(&temp)?;
            if !name_dir.exists() {
                // Another replica may create it at the same moment: that is fine.
                match fs::create_dir(name_dir) {
                    Ok(()) => sync_dir(&self.root)?,
                    Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(err) => return Err(io_err("cannot create", name_dir, err)),
                }
            }
            let target = name_dir.join(meta.version.to_string());
            fs::rename(&temp, &target).map_err(|err| io_err("cannot publish", &target, err))?;
            sync_dir(name_dir)?;
            sync_dir(&self.root)?;
            self.write_latest(name_dir, meta.version)
        })();
        if written.is_err() {
            let _ = fs::remove_dir_all(&temp);
        }
        written
    }

    /// A fine-tuned head's adapter if it is resident; None otherwise (also
    /// for a head on frozen features).
    pub fn cached_adapter(&self, head: &StoredHead) -> Option<Arc<Adapter>> {
        self.adapters.get(&head.meta.name, head.meta.version)
    }

    /// A fine-tuned head's adapter, read from the store when it is not
    /// resident (blocking); None for a head on frozen features.
    pub fn adapter(&self, head: &StoredHead) -> Result<Option<Arc<Adapter>>> {
        let meta = &head.meta;
        if meta.fine_tuning.is_none() {
            return Ok(None);
        }
        if let Some(adapter) = self.cached_adapter(head) {
            return Ok(Some(adapter));
        }
        let dir = self.root.join(&meta.name).join(meta.version.to_string());
        let (_, adapter) = read_version(&dir, &meta.name, meta.version)?;
        let adapter = Arc::new(
            adapter.ok_or_else(|| Error::Storage(format!("{} lost its adapter", dir.display())))?,
        );
        crate::metrics::record_adapter_loads(1);
        self.adapters
            .insert(&meta.name, meta.version, Arc::clone(&adapter));
        Ok(Some(adapter))
    }

    /// Deletes one version, or every version when the reference names none.
    pub fn delete(&self, reference: &HeadRef) -> Result<Vec<u32>> {
        let _writer = crate::sync::lock(&self.writer);
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
        let mut heads = crate::sync::write(&self.heads);
        if let Some(existing) = heads.get_mut(&reference.name) {
            for version in &versions {
                existing.remove(version);
            }
            if existing.is_empty() {
                heads.remove(&reference.name);
            }
        }
        self.adapters
            .retain(&reference.name, |v| !versions.contains(&v));
        report_sizes(&heads);
        tracing::info!(head = %reference.name, versions = ?versions, "head versions deleted");
        Ok(versions)
    }

    /// The number after every version the name ever had; an error (naming no
    /// path) once they are used up, never a wrap to 0.
    fn next_version(&self, name: &str, name_dir: &Path) -> Result<u32> {
        let loaded = self
            .read()
            .get(name)
            .and_then(|v| v.keys().next_back().copied())
            .unwrap_or(0);
        let remembered = fs::read_to_string(name_dir.join(LATEST_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(0);
        // Folders count too, loadable or not: a version number is never reused.
        let on_disk = version_folders(name_dir).into_iter().max().unwrap_or(0);
        loaded
            .max(remembered)
            .max(on_disk)
            .checked_add(1)
            .ok_or_else(|| {
                Error::LimitExceeded(format!(
                    "head `{name}` has used every version number; publish under another name"
                ))
            })
    }

    fn write_latest(&self, name_dir: &Path, version: u32) -> Result<()> {
        let latest = name_dir.join(LATEST_FILE);
        fsutil::write_atomically(&latest, version.to_string().as_bytes())
            .map_err(|err| io_err("cannot write", &latest, err))
    }
}

/// Exports how many head versions are in memory.
fn report_sizes(heads: &BTreeMap<String, Versions>) {
    crate::metrics::set_heads(heads.values().map(BTreeMap::len).sum());
}

/// Removes temporary folders old enough to be crash leftovers.
fn remove_leftovers(root: &Path) {
    for entry in fs::read_dir(root).into_iter().flatten().flatten() {
        if !entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            continue;
        }
        let path = entry.path();
        if !fsutil::is_older_than(&path, LEFTOVER_AGE) {
            continue;
        }
        if let Err(err) = fs::remove_dir_all(&path) {
            tracing::warn!(path = %path.display(), error = %err, "cannot remove leftover");
        }
    }
}

/// The loadable versions of one name on disk, and the versions that failed to
/// load with why; versions in `known` are reused rather than read again.
fn scan_name(
    dir: &Path,
    name: &str,
    known: &Versions,
    adapters: &AdapterCache,
) -> (Versions, Vec<(u32, Error)>) {
    let mut versions = Versions::new();
    let mut failures = Vec::new();
    for version in version_folders(dir) {
        if let Some(head) = known.get(&version) {
            versions.insert(version, Arc::clone(head));
            continue;
        }
        match read_version(&dir.join(version.to_string()), name, version) {
            Ok((head, adapter)) => {
                if let Some(adapter) = adapter {
                    adapters.offer(name, version, Arc::new(adapter));
                }
                versions.insert(version, Arc::new(head));
            }
            Err(err) => failures.push((version, err)),
        }
    }
    (versions, failures)
}

/// Reads one head version from the store at `root` without opening the
/// store (nothing is written or cleaned): the latest version when the
/// reference names none. For tools that run beside a server.
pub fn read_head(root: &Path, reference: &HeadRef) -> Result<(StoredHead, Option<Adapter>)> {
    let name_dir = root.join(&reference.name);
    let read = |version: u32| {
        read_version(
            &name_dir.join(version.to_string()),
            &reference.name,
            version,
        )
    };
    if let Some(version) = reference.version {
        if !name_dir.join(version.to_string()).is_dir() {
            return Err(Error::HeadNotFound(format!(
                "{reference} in {}",
                root.display()
            )));
        }
        return read(version);
    }
    // The newest version that loads, as the server's store would serve.
    let mut versions = version_folders(&name_dir);
    versions.sort_unstable_by(|a, b| b.cmp(a));
    versions
        .into_iter()
        .find_map(|version| read(version).ok())
        .ok_or_else(|| Error::HeadNotFound(format!("{} in {}", reference.name, root.display())))
}

/// The version numbers of a name's folder: its numbered subfolders.
fn version_folders(name_dir: &Path) -> Vec<u32> {
    fs::read_dir(name_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|v| v.parse::<u32>().ok()))
        .collect()
}

/// One version's head, and its adapter if it was fine-tuned.
fn read_version(dir: &Path, name: &str, version: u32) -> Result<(StoredHead, Option<Adapter>)> {
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
    let adapter = match &meta.fine_tuning {
        None => None,
        Some(tuning) => {
            let kind = match tuning.method {
                Method::Lora(lora) => AdapterKind::Lora {
                    rank: lora.rank,
                    alpha: lora.alpha,
                },
                Method::TopLayers(_) => AdapterKind::Layers,
            };
            let adapter = Adapter::from_tensors(&tensors, kind)?;
            let fits = adapter
                .as_ref()
                .is_some_and(|a| a.num_layers() == tuning.method.layers());
            if !fits {
                return Err(Error::Storage(format!(
                    "the adapter in {} does not match its metadata",
                    dir.display()
                )));
            }
            adapter
        }
    };
    Ok((StoredHead { meta, weights }, adapter))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        head::{FeatureSettings, HeadKind, HeadMetrics, TrainingParams},
        nn::Dense,
    };

    fn head(name: &str) -> (HeadMetadata, HeadWeights) {
        let meta = HeadMetadata {
            name: name.into(),
            version: 0,
            backbone: "bb".into(),
            backbone_fingerprint: "fp".into(),
            features: FeatureSettings {
                pooling: crate::backbone::Pooling::Mean,
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
            fine_tuning: None,
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

    /// A fine-tuned head: its record and a one-layer adapter whose values
    /// start at `seed`.
    fn tuned(name: &str, seed: f32) -> (HeadMetadata, HeadWeights, Adapter) {
        use crate::backbone::adapter::{LoraAdapter, LowRankWeights};
        use crate::head::finetune::{FineTuneParams, LoraSettings, LoraTargets};
        let (mut meta, weights) = head(name);
        let mut params = FineTuneParams::defaults(1);
        params.method = Method::Lora(LoraSettings {
            layers: 1,
            rank: 1,
            alpha: 2.0,
            dropout: 0.0,
            targets: LoraTargets::default(),
        });
        let (training, tuning) = params.record();
        (meta.training, meta.fine_tuning) = (training, Some(tuning));
        let mut slots: crate::backbone::adapter::LayerSlots = Default::default();
        slots[0] = Some(LowRankWeights {
            a: vec![seed, seed + 1.0],
            b: vec![seed + 2.0, seed + 3.0],
            rank: 1,
            inputs: 2,
            outputs: 2,
        });
        let adapter = Adapter::Lora(LoraAdapter {
            rank: 1,
            alpha: 2.0,
            first_layer: 5,
            layers: vec![slots],
        });
        (meta, weights, adapter)
    }

    /// A head fine-tuned with its top layer trained in full (width 2,
    /// feed-forward 3), the layer's values starting at `seed`.
    fn tuned_layers(name: &str, seed: f32) -> (HeadMetadata, HeadWeights, Adapter) {
        use crate::backbone::top_layers::{LayerWeights, NormWeights, TopLayers};
        use crate::head::finetune::FineTuneParams;
        let (mut meta, weights) = head(name);
        let (training, tuning) = FineTuneParams::top_layers(1).record();
        (meta.training, meta.fine_tuning) = (training, Some(tuning));
        let dense = |inputs: usize, outputs: usize, at: f32| Dense {
            weight: (0..inputs * outputs).map(|i| at + i as f32).collect(),
            bias: vec![at; outputs],
            inputs,
            outputs,
        };
        let norm = NormWeights {
            weight: vec![seed, seed],
            bias: vec![-seed, seed],
        };
        let layer = LayerWeights {
            dense: [
                dense(2, 2, seed),
                dense(2, 2, seed + 1.0),
                dense(2, 2, seed + 2.0),
                dense(2, 2, seed + 3.0),
                dense(2, 3, seed + 4.0),
                dense(3, 2, seed + 5.0),
            ],
            norms: [norm.clone(), norm],
        };
        (
            meta,
            weights,
            Adapter::Layers(TopLayers::new(5, vec![layer])),
        )
    }

    /// A head with its own top layers is published and read back, after a
    /// reopen too, with the same weights.
    #[test]
    fn top_layers_are_stored_with_their_head() {
        let dir = tempfile::tempdir().unwrap();
        let (meta, weights, adapter) = tuned_layers("layers", 0.5);
        let stored = {
            let store =
                HeadStore::open_with_adapters(dir.path(), 10, ResidentAdapters::count(4)).unwrap();
            store.publish(meta, weights, Some(adapter.clone())).unwrap()
        };
        let reopened =
            HeadStore::open_with_adapters(dir.path(), 10, ResidentAdapters::count(4)).unwrap();
        let read = reopened.adapter(&stored).unwrap().expect("an adapter");
        assert_eq!(*read, adapter);
        let (_, direct) = read_head(dir.path(), &reference("layers")).unwrap();
        assert_eq!(direct, Some(adapter));
    }

    /// Beyond the resident bound the least recently used adapter is dropped
    /// and read back from disk, the same; a reopened store reads them too.
    #[test]
    fn adapters_beyond_the_bound_are_read_back_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            HeadStore::open_with_adapters(dir.path(), 10, ResidentAdapters::count(1)).unwrap();
        let (meta, weights, first_adapter) = tuned("first", 1.0);
        let first = store
            .publish(meta, weights, Some(first_adapter.clone()))
            .unwrap();
        let (meta, weights, second_adapter) = tuned("second", 5.0);
        let second = store
            .publish(meta, weights, Some(second_adapter.clone()))
            .unwrap();
        assert!(
            store.cached_adapter(&first).is_none(),
            "dropped for the second"
        );
        let read = store.adapter(&first).unwrap().expect("an adapter");
        assert_eq!(*read, first_adapter);
        assert!(
            store.cached_adapter(&second).is_none(),
            "dropped for the first"
        );
        assert_eq!(*store.adapter(&second).unwrap().unwrap(), second_adapter);
        let (meta, weights) = head("frozen");
        let frozen = store.publish(meta, weights, None).unwrap();
        assert!(store.adapter(&frozen).unwrap().is_none());
        let (meta, weights, _) = tuned("lost", 0.0);
        assert!(
            store.publish(meta, weights, None).is_err(),
            "a record without its adapter"
        );

        let reopened =
            HeadStore::open_with_adapters(dir.path(), 10, ResidentAdapters::count(4)).unwrap();
        let head = reopened.get(&reference("first")).unwrap();
        assert_eq!(
            *reopened.cached_adapter(&head).expect("loaded"),
            first_adapter
        );
    }

    #[test]
    fn publish_reload_list_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = HeadStore::open(dir.path(), 100).unwrap();
        let (meta, weights) = head("sentiment");
        assert_eq!(
            store
                .publish(meta.clone(), weights.clone(), None)
                .unwrap()
                .meta
                .version,
            1
        );
        assert_eq!(
            store
                .publish(meta.clone(), weights.clone(), None)
                .unwrap()
                .meta
                .version,
            2
        );
        store
            .publish(head("topic").0, weights.clone(), None)
            .unwrap();

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
        assert_eq!(
            reopened.publish(meta, weights, None).unwrap().meta.version,
            3
        );
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
        store.publish(meta, weights, None).unwrap();
        // An old interrupted publish, one that may still be running on another
        // replica, and a version with corrupt metadata.
        let crashed = dir.path().join(".tmp-crashed");
        fs::create_dir_all(&crashed).unwrap();
        File::open(&crashed)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - 2 * LEFTOVER_AGE)
            .unwrap();
        fs::create_dir_all(dir.path().join(".tmp-in-flight")).unwrap();
        fs::create_dir_all(dir.path().join("good/7")).unwrap();
        fs::write(dir.path().join("good/7/head.json"), b"{not json").unwrap();

        let reopened = HeadStore::open(dir.path(), 100).unwrap();
        assert_eq!(reopened.list(None, true).len(), 1);
        assert!(!dir.path().join(".tmp-crashed").exists());
        assert!(dir.path().join(".tmp-in-flight").exists());
        // The broken version's number is not reused.
        let (meta, weights) = head("good");
        assert_eq!(
            reopened.publish(meta, weights, None).unwrap().meta.version,
            8
        );
    }

    #[test]
    fn replicas_sharing_a_store_see_each_others_changes() {
        let dir = tempfile::tempdir().unwrap();
        let a = HeadStore::open(dir.path(), 100).unwrap();
        let mut b = HeadStore::open(dir.path(), 100).unwrap();
        b.refresh_interval = Duration::ZERO;
        let (meta, weights) = head("shared");

        a.publish(meta.clone(), weights.clone(), None).unwrap();
        assert_eq!(b.get(&reference("shared")).unwrap().meta.version, 1);
        a.publish(meta.clone(), weights.clone(), None).unwrap();
        assert_eq!(b.get(&reference("shared")).unwrap().meta.version, 2);
        assert_eq!(b.list(None, true).len(), 2);
        a.delete(&reference("shared@2")).unwrap();
        assert_eq!(b.get(&reference("shared")).unwrap().meta.version, 1);
        assert!(b.get(&reference("shared@2")).is_err());

        // Both publish at once: each gets its own version.
        let (va, vb) = std::thread::scope(|scope| {
            let ta = scope.spawn(|| {
                a.publish(meta.clone(), weights.clone(), None)
                    .unwrap()
                    .meta
                    .version
            });
            let tb = scope.spawn(|| {
                b.publish(meta.clone(), weights.clone(), None)
                    .unwrap()
                    .meta
                    .version
            });
            (ta.join().unwrap(), tb.join().unwrap())
        });
        assert_ne!(va, vb);
        assert_eq!(b.list(None, true).len(), 3);
    }

    #[test]
    fn the_head_limit_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let store = HeadStore::open(dir.path(), 1).unwrap();
        let (meta, weights) = head("one");
        store.publish(meta.clone(), weights.clone(), None).unwrap();
        assert!(matches!(
            store.publish(meta, weights, None),
            Err(Error::LimitExceeded(_))
        ));
    }

    #[test]
    fn a_version_folder_at_the_top_of_the_range_does_not_wrap_the_counter() {
        let dir = tempfile::tempdir().unwrap();
        let store = HeadStore::open(dir.path(), 100).unwrap();
        fs::create_dir_all(dir.path().join("full").join(u32::MAX.to_string())).unwrap();
        let (meta, weights) = head("full");
        let err = store.publish(meta, weights, None).unwrap_err();
        assert!(
            matches!(&err, Error::LimitExceeded(m) if m.contains("every version")),
            "{err}"
        );
        assert!(
            !err.to_string().contains(&*dir.path().to_string_lossy()),
            "{err}"
        );
    }

    #[test]
    fn lookups_of_unknown_names_keep_a_bounded_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = HeadStore::open(dir.path(), 100).unwrap();
        for i in 0..MAX_SCAN_RECORDS + 500 {
            assert!(store.get(&reference(&format!("missing-{i}"))).is_err());
        }
        assert!(lock(&store.scanned).len() <= MAX_SCAN_RECORDS);
    }

    #[test]
    fn the_in_memory_view_changes_only_by_refresh_or_own_writes() {
        let dir = tempfile::tempdir().unwrap();
        let a = HeadStore::open(dir.path(), 100).unwrap();
        let b = HeadStore::open(dir.path(), 100).unwrap();
        let (meta, weights) = head("seen");
        a.publish(meta, weights, None).unwrap();
        assert_eq!(a.cached(&reference("seen")).unwrap().meta.version, 1);
        // b has not looked at the disk since it opened.
        assert!(b.cached(&reference("seen")).is_none());
        b.refresh_all().unwrap();
        assert_eq!(b.cached(&reference("seen")).unwrap().meta.version, 1);
    }
}
