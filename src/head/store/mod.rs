//! The head store: published versions of named heads, kept in the store that
//! replicas share ([`crate::storage`]: a volume or S3-compatible object
//! storage; the layout is in `layout.rs`), with an in-memory view that
//! serving reads without touching the store.
//!
//! Publishing is atomic and version numbers are gap-free and never reused,
//! across processes too: a version is claimed by creating its manifest only if
//! absent, after its weights are written. A crash at any moment leaves either
//! no version or a complete one. Other replicas' publishes and deletions reach
//! the view within [`REFRESH_INTERVAL`], and at once when a client asks for a
//! version the view lacks.

mod layout;
mod legacy;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use super::{
    adapters::{AdapterCache, ResidentAdapters},
    model::HeadWeights,
    namespace::{at_share, describe, namespace_of},
    HeadMetadata, HeadRef,
};
use crate::{
    backbone::Adapter,
    config::is_valid_name,
    storage::{Entry, Storage, LEFTOVER_AGE},
    sync::lock,
    task::run_blocking,
    Error, Result,
};
use layout::NameListing;

pub use legacy::migrate_volume;

/// A published head version, loaded in memory.
#[derive(Debug)]
pub struct StoredHead {
    pub meta: HeadMetadata,
    pub weights: HeadWeights,
}

/// A version in the view, with the key of its weights.
#[derive(Clone)]
struct Known {
    head: Arc<StoredHead>,
    blob: String,
}

type Versions = BTreeMap<u32, Known>;

pub struct HeadStore {
    storage: Storage,
    heads: RwLock<BTreeMap<String, Versions>>,
    /// When each name (and, under "", the whole store) was last read.
    scanned: Mutex<HashMap<String, Instant>>,
    /// When a request for a version not in memory last made each name be
    /// read; apart from `scanned`, so that the periodic re-reads never delay
    /// the read a miss asks for.
    missed: Mutex<HashMap<String, Instant>>,
    /// How stale the view may get before reads look at the store again.
    refresh_interval: Duration,
    /// Versions that failed to load, so each is reported once, not at every scan.
    broken: Mutex<HashSet<(String, u32)>>,
    /// Serialises this process's publishes, deletions and scans, so that a
    /// scan that began before one of its own changes cannot undo it in the
    /// view. Other processes are kept apart by the store's creates.
    writer: tokio::sync::Mutex<()>,
    max_heads: usize,
    /// Head versions of one namespace (heads.max_heads_per_namespace).
    max_heads_per_namespace: usize,
    /// When unnamed blobs were last looked for; None before the first time.
    swept: Mutex<Option<Instant>>,
    /// Fine-tuned heads' adapters, a bounded number resident.
    adapters: AdapterCache,
}

/// Adapters resident at once unless configured (heads.max_resident_adapters
/// and heads.max_resident_adapter_bytes).
pub const DEFAULT_RESIDENT_ADAPTERS: ResidentAdapters = ResidentAdapters {
    count: 128,
    bytes: 1 << 30,
};

/// How stale the in-memory view of a name may get before a read looks at the
/// store again, so heads published or deleted by other replicas appear and
/// disappear without a restart.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(2);

/// Most names whose last scan is remembered (see `mark_scanned`).
const MAX_SCAN_RECORDS: usize = 4096;

/// How often unnamed blobs are looked for. They are removed only once older
/// than [`LEFTOVER_AGE`], so looking more often gains nothing, and each look
/// at a name with candidates reads its manifests.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Tries at claiming a version number before giving up: each lost try means
/// another process claimed that number meanwhile.
const CLAIM_ATTEMPTS: usize = 64;

impl HeadStore {
    /// Opens the store and loads every head in it. A version that cannot be
    /// read is logged and skipped, never fatal: one bad head must not keep
    /// the server from serving the others.
    pub async fn open(
        storage: Storage,
        max_heads: usize,
        resident_adapters: ResidentAdapters,
    ) -> Result<Self> {
        let store = Self {
            storage,
            heads: RwLock::new(BTreeMap::new()),
            scanned: Mutex::new(HashMap::new()),
            missed: Mutex::new(HashMap::new()),
            broken: Mutex::new(HashSet::new()),
            refresh_interval: REFRESH_INTERVAL,
            writer: tokio::sync::Mutex::new(()),
            max_heads,
            max_heads_per_namespace: max_heads,
            swept: Mutex::new(None),
            adapters: AdapterCache::new(resident_adapters),
        };
        store.refresh_all().await?;
        // Exported from the start, also for an empty store.
        report_sizes(&store.read());
        tracing::info!(store = %store.storage.describe(), heads = store.count(),
            "head store opened");
        Ok(store)
    }

    /// The store with a share of its head versions per namespace
    /// (heads.max_heads_per_namespace); without it a namespace may hold all.
    pub fn with_namespace_share(mut self, max_heads_per_namespace: usize) -> Self {
        self.max_heads_per_namespace = max_heads_per_namespace;
        self
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Versions>> {
        crate::sync::read(&self.heads)
    }

    fn count(&self) -> usize {
        self.read().values().map(BTreeMap::len).sum()
    }

    /// Re-reads one name from the store, reusing versions already in memory;
    /// returns what the listing said.
    async fn refresh_name(&self, name: &str) -> Result<NameListing> {
        let _writer = self.writer.lock().await;
        self.refresh_name_locked(name).await
    }

    /// [`HeadStore::refresh_name`] for a caller that holds the writer lock.
    async fn refresh_name_locked(&self, name: &str) -> Result<NameListing> {
        let listing = self.listing(name).await?;
        self.apply(name, &listing).await;
        Ok(listing)
    }

    /// What the store holds of `name` now.
    async fn listing(&self, name: &str) -> Result<NameListing> {
        let entries = self.storage.list(&layout::name_prefix(name)).await?;
        Ok(layout::group(entries).remove(name).unwrap_or_default())
    }

    /// Re-reads every name in the store.
    async fn refresh_all(&self) -> Result<()> {
        let _writer = self.writer.lock().await;
        let mut grouped = layout::group(self.storage.list(layout::HEADS).await?);
        let known: Vec<String> = self.read().keys().cloned().collect();
        for name in known {
            grouped.entry(name).or_default();
        }
        let sweep = self.sweep_due();
        for (name, listing) in grouped {
            if is_valid_name(&name) {
                self.apply(&name, &listing).await;
                if sweep {
                    self.remove_unnamed_blobs(&name, &listing).await;
                }
            }
        }
        self.mark_scanned("");
        Ok(())
    }

    /// Makes the view of `name` what `listing` says: versions gone are
    /// dropped, new ones read.
    async fn apply(&self, name: &str, listing: &NameListing) {
        let known = self.read().get(name).cloned().unwrap_or_default();
        let mut versions = Versions::new();
        for &version in &listing.live {
            if let Some(found) = known.get(&version) {
                versions.insert(version, found.clone());
                continue;
            }
            match self.read_version(name, version).await {
                Ok((known, adapter)) => {
                    if let Some(adapter) = adapter {
                        self.adapters.offer(name, version, Arc::new(adapter));
                    }
                    versions.insert(version, known);
                }
                Err(err) => {
                    if lock(&self.broken).insert((name.to_owned(), version)) {
                        tracing::error!(head = %name, version, error = %err,
                            "skipping a head version that cannot be loaded");
                    }
                }
            }
        }
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

    /// Whether unnamed blobs are due to be looked for (at open, then every
    /// [`SWEEP_INTERVAL`]); if so, the time is taken.
    fn sweep_due(&self) -> bool {
        let mut swept = lock(&self.swept);
        let due = swept.is_none_or(|at| at.elapsed() >= SWEEP_INTERVAL);
        if due {
            *swept = Some(Instant::now());
        }
        due
    }

    /// Removes the blobs of `name` that no manifest in the store mentions and
    /// that are old enough to be a crashed publisher's rather than one in
    /// progress. Only what is provably unreferenced goes: a version this
    /// replica cannot load (a newer server's head kind during a rolling
    /// upgrade) still holds every blob its manifest mentions, and when a
    /// manifest cannot be read nothing of the name is removed. A version
    /// marked deleted holds nothing, so a deletion cut short is finished here.
    async fn remove_unnamed_blobs(&self, name: &str, listing: &NameListing) {
        let named: HashSet<String> = self
            .read()
            .get(name)
            .map(|versions| versions.values().map(|k| k.blob.clone()).collect())
            .unwrap_or_default();
        let unnamed: Vec<&Entry> = listing
            .blobs
            .iter()
            .filter(|blob| !named.contains(&blob.key))
            .collect();
        if unnamed.is_empty() {
            return;
        }
        // Aged by the store's clock, as the blobs' times are: a replica whose
        // clock runs ahead must not take another's publish in progress (its
        // weights written, its manifest not yet) for a crash's leftover.
        let now = match self.storage.now().await {
            Ok(now) => now,
            Err(err) => {
                tracing::warn!(head = %name, error = %err,
                    "cannot read the store's clock; none of the head's weights removed");
                return;
            }
        };
        let candidates: Vec<&Entry> = unnamed
            .into_iter()
            .filter(|blob| {
                now.duration_since(blob.modified)
                    .is_ok_and(|age| age >= LEFTOVER_AGE)
            })
            .collect();
        if candidates.is_empty() {
            return;
        }
        let manifests = match self.live_manifests(name, listing).await {
            Ok(manifests) => manifests,
            Err(err) => {
                tracing::warn!(head = %name, error = %err,
                    "cannot read the head's manifests; none of its weights removed");
                return;
            }
        };
        for blob in candidates {
            if manifests.iter().any(|m| layout::mentions(m, &blob.key)) {
                continue;
            }
            match self.storage.delete(&blob.key).await {
                Ok(()) => tracing::info!(key = %blob.key, "removed a crashed publish's weights"),
                Err(err) => tracing::warn!(error = %err, "cannot remove a leftover"),
            }
        }
    }

    /// The manifests of the versions `listing` has live, as stored, read or
    /// not by this replica.
    async fn live_manifests(&self, name: &str, listing: &NameListing) -> Result<Vec<bytes::Bytes>> {
        let mut manifests = Vec::with_capacity(listing.live.len());
        for &version in &listing.live {
            // One deleted meanwhile holds nothing any more.
            if let Some(bytes) = self
                .storage
                .get(&layout::manifest_key(name, version))
                .await?
            {
                manifests.push(bytes);
            }
        }
        Ok(manifests)
    }

    /// One version read from the store.
    async fn read_version(&self, name: &str, version: u32) -> Result<(Known, Option<Adapter>)> {
        read_version(&self.storage, name, version).await
    }

    /// Records that `key` (a name, or "" for the whole store) was just read.
    fn mark_scanned(&self, key: &str) {
        self.remember(&self.scanned, key);
    }

    /// Records `key` in `record` as of now. Names come from clients, so the
    /// record is bounded: entries older than the refresh interval carry no
    /// information and go first.
    fn remember(&self, record: &Mutex<HashMap<String, Instant>>, key: &str) {
        let mut record = lock(record);
        if record.len() >= MAX_SCAN_RECORDS {
            let interval = self.refresh_interval;
            record.retain(|_, at| at.elapsed() < interval);
            if record.len() >= MAX_SCAN_RECORDS {
                record.clear();
            }
        }
        record.insert(key.to_owned(), Instant::now());
    }

    /// Whether a miss on `name` may read it from the store now: once per
    /// refresh interval per name, so a client asking for `head@999` again
    /// and again costs one listing per interval, not one per request.
    fn may_read_on_miss(&self, name: &str) -> bool {
        let recent = lock(&self.missed)
            .get(name)
            .is_some_and(|at| at.elapsed() < self.refresh_interval);
        if !recent {
            self.remember(&self.missed, name);
        }
        !recent
    }

    /// Whether the view of `key` (a name, or "" for the whole store) is older than
    /// the refresh interval.
    fn stale(&self, key: &str) -> bool {
        lock(&self.scanned)
            .get(key)
            .is_none_or(|at| at.elapsed() >= self.refresh_interval)
    }

    /// The named version (or the latest) if it is in memory; never touches the
    /// store. The view is kept current by [`HeadStore::refresh_periodically`]
    /// and by every change made here.
    pub fn cached(&self, reference: &HeadRef) -> Option<Arc<StoredHead>> {
        let heads = self.read();
        let versions = heads.get(&reference.name)?;
        let known = match reference.version {
            Some(version) => versions.get(&version),
            None => versions.values().next_back(),
        };
        known.map(|k| Arc::clone(&k.head))
    }

    /// The named version, or the latest when the reference names none. A
    /// miss re-reads the name from the store at once (it may be a head
    /// another replica just published), unless a miss on the same name did
    /// within the refresh interval; then the periodic re-read brings it.
    pub async fn get(&self, reference: &HeadRef) -> Result<Arc<StoredHead>> {
        // "Latest" may have moved on another replica.
        if reference.version.is_none() && self.stale(&reference.name) {
            self.refresh_name(&reference.name).await?;
        }
        if let Some(found) = self.cached(reference) {
            return Ok(found);
        }
        if self.may_read_on_miss(&reference.name) {
            self.refresh_name(&reference.name).await?;
        }
        self.cached(reference)
            .ok_or_else(|| Error::HeadNotFound(reference.to_string()))
    }

    /// Re-reads the whole store every refresh interval, so that
    /// [`HeadStore::cached`] sees what other replicas publish and delete.
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
                if let Err(err) = store.refresh_all().await {
                    tracing::warn!(error = %err, "cannot re-read the head store");
                }
            }
        })
    }

    /// Heads by name then version; only each name's latest unless `all_versions`.
    pub async fn list(&self, backbone: Option<&str>, all_versions: bool) -> Vec<Arc<StoredHead>> {
        if self.stale("") {
            if let Err(err) = self.refresh_all().await {
                tracing::warn!(error = %err, "cannot re-read the head store; listing what is known");
            }
        }
        let heads = self.read();
        let mut out = Vec::new();
        for versions in heads.values() {
            let chosen: Vec<&Known> = if all_versions {
                versions.values().collect()
            } else {
                versions.values().next_back().into_iter().collect()
            };
            out.extend(
                chosen
                    .into_iter()
                    .filter(|k| backbone.is_none_or(|b| k.head.meta.backbone == b))
                    .map(|k| Arc::clone(&k.head)),
            );
        }
        out
    }

    /// Publishes a new version of `meta.name` (its `version` field is assigned
    /// here), with a fine-tuned head's adapter, and returns it.
    pub async fn publish(
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
        if !is_valid_name(&meta.name) {
            return Err(Error::InvalidArgument(format!(
                "`{}` is not a valid head name",
                meta.name
            )));
        }
        let _writer = self.writer.lock().await;
        self.check_room(&meta.name)?;
        let (weights, adapter, blob_bytes) = run_blocking("encoding a head", move || {
            let bytes = layout::encode_weights(&weights, adapter.as_ref());
            (weights, adapter, bytes)
        })
        .await?;
        let blob_bytes = blob_bytes?;
        let blob = layout::new_blob_key(&meta.name);
        self.storage.put(&blob, blob_bytes).await?;
        let claimed = self.claim_version(&mut meta, &blob).await;
        let version = match claimed {
            Ok(version) => version,
            Err(err) => {
                let _ = self.storage.delete(&blob).await;
                return Err(err);
            }
        };
        if let Some(adapter) = adapter {
            self.adapters.insert(&meta.name, version, Arc::new(adapter));
        }
        let head = Arc::new(StoredHead { meta, weights });
        let mut heads = crate::sync::write(&self.heads);
        heads.entry(head.meta.name.clone()).or_default().insert(
            version,
            Known {
                head: Arc::clone(&head),
                blob,
            },
        );
        report_sizes(&heads);
        drop(heads);
        tracing::info!(head = %head.meta.name, version, "head published");
        Ok(head)
    }

    /// RESOURCE_EXHAUSTED when a new version of `name` would pass the bound
    /// on head versions in the store, or its namespace's share of it; counted
    /// in this replica's view (the versions it has loaded).
    pub fn check_room(&self, name: &str) -> Result<()> {
        let heads = self.read();
        let total: usize = heads.values().map(BTreeMap::len).sum();
        if total >= self.max_heads {
            return Err(Error::LimitExceeded(format!(
                "the head store holds {total} head versions, its limit (heads.max_heads); \
                 delete some first"
            )));
        }
        let namespace = namespace_of(name);
        let held: usize = heads
            .iter()
            .filter(|(held_name, _)| namespace_of(held_name) == namespace)
            .map(|(_, versions)| versions.len())
            .sum();
        if at_share(namespace, held, self.max_heads_per_namespace) {
            return Err(Error::LimitExceeded(format!(
                "{} holds {held} head versions, its share of the store \
                 (heads.max_heads_per_namespace); delete some first",
                describe(namespace)
            )));
        }
        Ok(())
    }

    /// Claims the next free version number for `meta` by creating its
    /// manifest, naming `blob`; sets `meta.version`. Another process may
    /// claim a number first: then the next one is tried.
    async fn claim_version(&self, meta: &mut HeadMetadata, blob: &str) -> Result<u32> {
        for _ in 0..CLAIM_ATTEMPTS {
            let listing = self.refresh_name_locked(&meta.name).await?;
            let version = listing.highest.checked_add(1).ok_or_else(|| {
                Error::LimitExceeded(format!(
                    "head `{}` has used every version number; publish under another name",
                    meta.name
                ))
            })?;
            meta.version = version;
            let manifest = layout::encode_manifest(meta, blob)?;
            if self
                .storage
                .create(&layout::manifest_key(&meta.name, version), manifest)
                .await?
            {
                return Ok(version);
            }
            tracing::debug!(head = %meta.name, version, "version taken meanwhile; trying the next one");
        }
        Err(Error::Storage(format!(
            "head `{}`: {CLAIM_ATTEMPTS} version numbers in a row were taken by other \
             publishers; retry",
            meta.name
        )))
    }

    /// A fine-tuned head's adapter if it is resident; None otherwise (also
    /// for a head on frozen features).
    pub fn cached_adapter(&self, head: &StoredHead) -> Option<Arc<Adapter>> {
        self.adapters.get(&head.meta.name, head.meta.version)
    }

    /// A fine-tuned head's adapter, read from the store when it is not
    /// resident; None for a head on frozen features.
    pub async fn adapter(&self, head: &StoredHead) -> Result<Option<Arc<Adapter>>> {
        let meta = &head.meta;
        if meta.fine_tuning.is_none() {
            return Ok(None);
        }
        if let Some(adapter) = self.cached_adapter(head) {
            return Ok(Some(adapter));
        }
        let (_, adapter) = self.read_version(&meta.name, meta.version).await?;
        let adapter = Arc::new(adapter.ok_or_else(|| {
            Error::Storage(format!("{}@{} lost its adapter", meta.name, meta.version))
        })?);
        crate::metrics::record_adapter_loads(1);
        self.adapters
            .insert(&meta.name, meta.version, Arc::clone(&adapter));
        Ok(Some(adapter))
    }

    /// Deletes one version, or every version when the reference names none.
    /// The versions are read from the store under the deletion, not from the
    /// in-memory view, which may lag: a version another replica published a
    /// moment ago goes too, and so does one this replica cannot load.
    pub async fn delete(&self, reference: &HeadRef) -> Result<Vec<u32>> {
        let _writer = self.writer.lock().await;
        let name = &reference.name;
        let live = self.listing(name).await?.live;
        let versions: Vec<u32> = match reference.version {
            None => live.into_iter().collect(),
            Some(version) => live.get(&version).copied().into_iter().collect(),
        };
        if versions.is_empty() {
            return Err(Error::HeadNotFound(reference.to_string()));
        }
        for &version in &versions {
            self.delete_version(name, version).await?;
        }
        let mut heads = crate::sync::write(&self.heads);
        if let Some(existing) = heads.get_mut(name) {
            existing.retain(|v, _| !versions.contains(v));
            if existing.is_empty() {
                heads.remove(name);
            }
        }
        self.adapters.retain(name, |v| !versions.contains(&v));
        report_sizes(&heads);
        tracing::info!(head = %name, versions = ?versions, "head versions deleted");
        Ok(versions)
    }

    /// Deletes one version in the store: the marker first (from then on the
    /// version is gone for every reader, and its number stays taken), then
    /// the weights its manifest names, read whether or not this replica can
    /// load the version, then the manifest. Other blobs a newer server's
    /// manifest may name are left to [`HeadStore::remove_unnamed_blobs`].
    async fn delete_version(&self, name: &str, version: u32) -> Result<()> {
        let manifest_key = layout::manifest_key(name, version);
        let weights = self
            .storage
            .get(&manifest_key)
            .await?
            .and_then(|manifest| layout::manifest_weights(&manifest, name, version));
        self.storage
            .put(&layout::deleted_key(name, version), bytes::Bytes::new())
            .await?;
        if let Some(weights) = weights {
            self.storage.delete(&weights).await?;
        }
        self.storage.delete(&manifest_key).await
    }
}

/// Exports how many head versions are in memory.
fn report_sizes(heads: &BTreeMap<String, Versions>) {
    crate::metrics::set_heads(heads.values().map(BTreeMap::len).sum());
}

/// One version read from `storage`: its manifest, then the weights it names,
/// decoded off the runtime.
async fn read_version(
    storage: &Storage,
    name: &str,
    version: u32,
) -> Result<(Known, Option<Adapter>)> {
    let manifest_key = layout::manifest_key(name, version);
    let manifest = storage
        .get(&manifest_key)
        .await?
        .ok_or_else(|| Error::Storage(format!("{manifest_key} disappeared")))?;
    let (meta, blob) = layout::decode_manifest(&manifest, name, version)?;
    let bytes = storage.get(&blob).await?.ok_or_else(|| {
        Error::Storage(format!(
            "{blob}, the weights of {name}@{version}, is missing"
        ))
    })?;
    let (head, adapter) = run_blocking("decoding a head", move || {
        layout::decode_version(meta, &bytes)
    })
    .await??;
    let head = Arc::new(head);
    Ok((Known { head, blob }, adapter))
}

/// Reads one head version from `storage` without opening a store (nothing is
/// written or cleaned): the latest version that loads when the reference
/// names none. For tools that run beside a server.
pub async fn read_head(
    storage: &Storage,
    reference: &HeadRef,
) -> Result<(Arc<StoredHead>, Option<Adapter>)> {
    let name = &reference.name;
    let listing = layout::group(storage.list(&layout::name_prefix(name)).await?)
        .remove(name)
        .unwrap_or_default();
    let not_found = || Error::HeadNotFound(format!("{reference} in {}", storage.describe()));
    let candidates: Vec<u32> = match reference.version {
        Some(version) if listing.live.contains(&version) => vec![version],
        Some(_) => return Err(not_found()),
        // The newest version that loads, as the server's store would serve.
        None => listing.live.iter().rev().copied().collect(),
    };
    let mut last_error = None;
    for version in candidates {
        match read_version(storage, name, version).await {
            Ok((known, adapter)) => return Ok((known.head, adapter)),
            Err(err) => last_error = Some(err),
        }
    }
    Err(last_error.unwrap_or_else(not_found))
}

#[cfg(test)]
mod tests;
