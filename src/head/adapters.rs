//! Fine-tuned heads' adapters resident in memory, at most a configured
//! number: the least recently used one is dropped when another comes in, and
//! read again from the store when it is next asked for. A head's metadata
//! and classifier stay in memory regardless; only adapters (a MiniLM rank-8
//! adapter on query and value is about 300 KB, a larger model's or rank's
//! much more) are bounded.

use std::{collections::HashMap, sync::Arc};

use crate::{backbone::adapter::Adapter, metrics, sync::lock};

/// Head name and version.
type Key = (String, u32);

pub struct AdapterCache {
    capacity: usize,
    entries: std::sync::Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    /// Each adapter with the tick of its last use.
    map: HashMap<Key, (Arc<Adapter>, u64)>,
    tick: u64,
}

impl AdapterCache {
    /// A cache of at most `capacity` adapters (at least one).
    pub fn new(capacity: usize) -> Self {
        let cache = Self {
            capacity: capacity.max(1),
            entries: Default::default(),
        };
        cache.report(&lock(&cache.entries));
        metrics::record_adapter_loads(0);
        cache
    }

    /// The adapter of `name@version` if resident, marked as just used.
    pub fn get(&self, name: &str, version: u32) -> Option<Arc<Adapter>> {
        let mut entries = lock(&self.entries);
        entries.tick += 1;
        let tick = entries.tick;
        let (adapter, used) = entries.map.get_mut(&(name.to_owned(), version))?;
        *used = tick;
        Some(Arc::clone(adapter))
    }

    /// Makes `adapter` resident as `name@version`, dropping the least
    /// recently used one when full.
    pub fn insert(&self, name: &str, version: u32, adapter: Arc<Adapter>) {
        let mut entries = lock(&self.entries);
        entries.tick += 1;
        let tick = entries.tick;
        let key = (name.to_owned(), version);
        if !entries.map.contains_key(&key) && entries.map.len() >= self.capacity {
            let oldest = entries
                .map
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(key, _)| key.clone());
            if let Some(oldest) = oldest {
                entries.map.remove(&oldest);
            }
        }
        entries.map.insert(key, (adapter, tick));
        self.report(&entries);
    }

    /// [`Self::insert`] only when there is room: what loading a whole store
    /// does, so that a scan does not push out adapters in use.
    pub fn offer(&self, name: &str, version: u32, adapter: Arc<Adapter>) {
        let full = lock(&self.entries).map.len() >= self.capacity;
        if !full {
            self.insert(name, version, adapter);
        }
    }

    /// Drops the adapters of versions of `name` not in `keep`.
    pub fn retain(&self, name: &str, keep: impl Fn(u32) -> bool) {
        let mut entries = lock(&self.entries);
        entries
            .map
            .retain(|(head, version), _| head != name || keep(*version));
        self.report(&entries);
    }

    fn report(&self, entries: &Entries) {
        let bytes = entries.map.values().map(|(a, _)| a.size_bytes()).sum();
        metrics::set_resident_adapters(entries.map.len(), bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter() -> Arc<Adapter> {
        Arc::new(Adapter::Lora(crate::backbone::adapter::LoraAdapter {
            rank: 1,
            alpha: 1.0,
            first_layer: 0,
            layers: Vec::new(),
        }))
    }

    /// The least recently used adapter goes first; a use counts as recent.
    #[test]
    fn the_least_recently_used_adapter_is_dropped() {
        let cache = AdapterCache::new(2);
        cache.insert("a", 1, adapter());
        cache.insert("b", 1, adapter());
        assert!(cache.get("a", 1).is_some());
        cache.insert("c", 1, adapter());
        assert!(cache.get("b", 1).is_none(), "b was the least recently used");
        assert!(cache.get("a", 1).is_some() && cache.get("c", 1).is_some());
        cache.offer("d", 1, adapter());
        assert!(cache.get("d", 1).is_none(), "a full cache takes no offers");
        cache.retain("a", |_| false);
        assert!(cache.get("a", 1).is_none());
        cache.offer("d", 1, adapter());
        assert!(cache.get("d", 1).is_some());
    }
}
