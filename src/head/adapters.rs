//! Fine-tuned heads' adapters resident in memory, at most a configured
//! number and a configured size: the least recently used one is dropped when
//! another comes in, and read again from the store when it is next asked
//! for. A head's metadata and classifier stay in memory regardless; only
//! adapters are bounded (a MiniLM rank-8 LoRA adapter on query and value is
//! about 300 KB; two MiniLM layers trained in full about 14 MB, and the
//! serving engine's copy of them as much again).

use std::{collections::HashMap, sync::Arc};

use crate::{backbone::Adapter, metrics, sync::lock};

/// Head name and version.
type Key = (String, u32);

/// How many adapters, and how many bytes of them, may stay resident.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResidentAdapters {
    pub count: usize,
    pub bytes: usize,
}

impl ResidentAdapters {
    /// At most `count` adapters, of any size.
    pub fn count(count: usize) -> Self {
        Self {
            count,
            bytes: usize::MAX,
        }
    }
}

pub struct AdapterCache {
    bounds: ResidentAdapters,
    entries: std::sync::Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    /// Each adapter with the tick of its last use.
    map: HashMap<Key, (Arc<Adapter>, u64)>,
    tick: u64,
}

impl AdapterCache {
    /// A cache within `bounds` (at least one adapter, whatever its size).
    pub fn new(bounds: ResidentAdapters) -> Self {
        let cache = Self {
            bounds: ResidentAdapters {
                count: bounds.count.max(1),
                ..bounds
            },
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
    /// recently used ones until it fits the bounds (alone, it always does).
    pub fn insert(&self, name: &str, version: u32, adapter: Arc<Adapter>) {
        let mut entries = lock(&self.entries);
        entries.tick += 1;
        let tick = entries.tick;
        let key = (name.to_owned(), version);
        entries.map.remove(&key);
        let size = adapter.resident_bytes();
        while !entries.map.is_empty() && !self.has_room(&entries, size) {
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

    /// Whether an adapter of `size` bytes fits beside the resident ones.
    fn has_room(&self, entries: &Entries, size: usize) -> bool {
        entries.map.len() < self.bounds.count
            && resident_bytes(entries).saturating_add(size) <= self.bounds.bytes
    }

    /// [`Self::insert`] only when there is room: what loading a whole store
    /// does, so that a scan does not push out adapters in use.
    pub fn offer(&self, name: &str, version: u32, adapter: Arc<Adapter>) {
        let room = self.has_room(&lock(&self.entries), adapter.resident_bytes());
        if room {
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
        metrics::set_resident_adapters(entries.map.len(), resident_bytes(entries));
    }
}

fn resident_bytes(entries: &Entries) -> usize {
    entries.map.values().map(|(a, _)| a.resident_bytes()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter() -> Arc<Adapter> {
        Arc::new(Adapter::Lora(crate::backbone::bert::adapter::LoraAdapter {
            rank: 1,
            alpha: 1.0,
            first_layer: 0,
            layers: Vec::new(),
        }))
    }

    /// A LoRA adapter of `floats` values (A and B together).
    fn sized(floats: usize) -> Arc<Adapter> {
        use crate::backbone::bert::adapter::{LayerSlots, LowRankWeights};
        let mut slots: LayerSlots = Default::default();
        slots[0] = Some(LowRankWeights {
            a: vec![0.0; floats / 2],
            b: vec![0.0; floats - floats / 2],
            rank: 1,
            inputs: floats / 2,
            outputs: floats - floats / 2,
        });
        Arc::new(Adapter::Lora(crate::backbone::bert::adapter::LoraAdapter {
            rank: 1,
            alpha: 1.0,
            first_layer: 0,
            layers: vec![slots],
        }))
    }

    /// With a bound on bytes, the least recently used adapters go until the
    /// new one fits; one larger than the bound alone still comes in.
    #[test]
    fn the_byte_bound_drops_the_least_recently_used_first() {
        let cache = AdapterCache::new(ResidentAdapters {
            count: 10,
            bytes: 1000,
        });
        cache.insert("a", 1, sized(100)); // 400 bytes
        cache.insert("b", 1, sized(100));
        assert!(cache.get("a", 1).is_some());
        cache.insert("c", 1, sized(100));
        assert!(cache.get("b", 1).is_none(), "b was the least recently used");
        assert!(cache.get("a", 1).is_some() && cache.get("c", 1).is_some());
        cache.offer("d", 1, sized(100));
        assert!(
            cache.get("d", 1).is_none(),
            "no room: the offer is declined"
        );
        cache.insert("big", 1, sized(1000));
        assert!(
            cache.get("big", 1).is_some(),
            "alone it stays, over the bound"
        );
        assert!(cache.get("a", 1).is_none() && cache.get("c", 1).is_none());
    }

    /// The least recently used adapter goes first; a use counts as recent.
    #[test]
    fn the_least_recently_used_adapter_is_dropped() {
        let cache = AdapterCache::new(ResidentAdapters::count(2));
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
