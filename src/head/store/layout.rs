//! Where head versions live in the shared store, and how one is encoded.
//!
//! ```text
//! heads/<name>/blobs/<id>.safetensors   weights (and a fine-tuned head's adapter)
//! heads/<name>/<version>/head.json      the version's manifest: its metadata
//!                                       and the blob it names
//! heads/<name>/<version>/deleted        the version was deleted; its number stays taken
//! ```
//!
//! A publisher writes the blob first, under a name nobody else uses, then
//! creates the manifest only if absent: the create is what claims a version
//! number, so of concurrent publishers (in any processes) exactly one gets
//! each number, and a number is only ever claimed by a complete version. The
//! loser tries the next number with the same blob. A crash leaves at most an
//! unnamed blob, which the store removes once it is old and no manifest
//! mentions it, read or not by this server: a newer server's manifest may
//! hold a head kind, or name blobs under fields, this one does not know.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::super::{fine_tune::Method, model::HeadWeights, HeadMetadata};
use super::StoredHead;
use crate::{
    backbone::bert::adapter::{Adapter, AdapterKind},
    storage::Entry,
    Error, Result,
};

/// The store's prefix for heads.
pub const HEADS: &str = "heads";
const MANIFEST: &str = "head.json";
const DELETED: &str = "deleted";
/// The weights of versions published before blobs: beside the manifest.
const LEGACY_WEIGHTS: &str = "weights.safetensors";
const BLOBS: &str = "blobs";

pub fn name_prefix(name: &str) -> String {
    format!("{HEADS}/{name}")
}

pub fn manifest_key(name: &str, version: u32) -> String {
    format!("{HEADS}/{name}/{version}/{MANIFEST}")
}

pub fn deleted_key(name: &str, version: u32) -> String {
    format!("{HEADS}/{name}/{version}/{DELETED}")
}

/// A new blob's key, unique to this publish.
pub fn new_blob_key(name: &str) -> String {
    format!(
        "{HEADS}/{name}/{BLOBS}/{}.safetensors",
        uuid::Uuid::new_v4()
    )
}

/// The manifest: the head's metadata and where its weights are.
#[derive(Serialize, Deserialize)]
struct Manifest {
    #[serde(flatten)]
    meta: HeadMetadata,
    /// The blob's key; absent for versions published before blobs, whose
    /// weights are beside the manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weights: Option<String>,
}

pub fn encode_manifest(meta: &HeadMetadata, blob_key: &str) -> Result<Bytes> {
    let manifest = Manifest {
        meta: meta.clone(),
        weights: Some(blob_key.to_owned()),
    };
    serde_json::to_vec_pretty(&manifest)
        .map(Bytes::from)
        .map_err(|err| Error::Storage(format!("cannot encode a head's metadata: {err}")))
}

/// A manifest read back: the metadata, checked against the key it was found
/// at, and the key of its weights.
pub fn decode_manifest(bytes: &[u8], name: &str, version: u32) -> Result<(HeadMetadata, String)> {
    let key = manifest_key(name, version);
    let manifest: Manifest = serde_json::from_slice(bytes)
        .map_err(|err| Error::Storage(format!("{key} is invalid: {err}")))?;
    let meta = manifest.meta;
    if meta.name != name || meta.version != version {
        return Err(Error::Storage(format!(
            "{key} describes {}@{}, not {name}@{version}",
            meta.name, meta.version
        )));
    }
    let weights = weights_key(manifest.weights, name, version)?;
    Ok((meta, weights))
}

/// The key of a version's weights: as its manifest names them, or beside the
/// manifest for versions published before blobs. A manifest only ever names
/// its own head's objects.
fn weights_key(named: Option<String>, name: &str, version: u32) -> Result<String> {
    let weights = named.unwrap_or_else(|| format!("{HEADS}/{name}/{version}/{LEGACY_WEIGHTS}"));
    if !weights.starts_with(&format!("{HEADS}/{name}/")) {
        return Err(Error::Storage(format!(
            "{} names weights outside its head: {weights}",
            manifest_key(name, version)
        )));
    }
    Ok(weights)
}

/// The key of the weights a manifest names, read without understanding the
/// rest of it (a newer server's head kind, fields this one does not know), so
/// that deleting a version this replica cannot load still removes them. None
/// when the manifest is not a JSON object with a string `weights` (or none),
/// or names weights outside its head.
pub fn manifest_weights(bytes: &[u8], name: &str, version: u32) -> Option<String> {
    #[derive(Deserialize)]
    struct Named {
        #[serde(default)]
        weights: Option<String>,
    }
    let named: Named = serde_json::from_slice(bytes).ok()?;
    weights_key(named.weights, name, version).ok()
}

/// Whether a manifest mentions the blob at `blob_key`: its id (the file name
/// up to the first `.`) appears anywhere in the manifest's bytes. Read this
/// way, whatever the manifest's format, a blob that any version may name is
/// never taken for a crashed publish's leftover; a false match only keeps a
/// blob longer.
pub fn mentions(manifest: &[u8], blob_key: &str) -> bool {
    let file = blob_key.rsplit('/').next().unwrap_or(blob_key);
    let id = file.split('.').next().unwrap_or(file).as_bytes();
    !id.is_empty() && manifest.windows(id.len()).any(|window| window == id)
}

/// A version's weights and adapter as one safetensors blob.
pub fn encode_weights(weights: &HeadWeights, adapter: Option<&Adapter>) -> Result<Bytes> {
    let mut tensors: HashMap<String, Tensor> = weights.to_tensors()?;
    if let Some(adapter) = adapter {
        tensors.extend(adapter.to_tensors()?);
    }
    let mut sorted: Vec<(String, Tensor)> = tensors.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    safetensors::serialize(sorted, None)
        .map(Bytes::from)
        .map_err(|err| Error::Storage(format!("cannot encode a head's weights: {err}")))
}

/// A version from its metadata and blob, checked against each other.
pub fn decode_version(meta: HeadMetadata, blob: &[u8]) -> Result<(StoredHead, Option<Adapter>)> {
    let what = format!("{}@{}", meta.name, meta.version);
    let tensors = candle_core::safetensors::load_buffer(blob, &candle_core::Device::Cpu)
        .map_err(|err| Error::Storage(format!("cannot read the weights of {what}: {err}")))?;
    let weights = HeadWeights::from_tensors(&meta.kind, &tensors)?;
    if weights.input_dim() != meta.input_dim || weights.classes() != meta.labels.len() {
        return Err(Error::Storage(format!(
            "the weights of {what} do not match its metadata"
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
                    "the adapter of {what} does not match its metadata"
                )));
            }
            adapter
        }
    };
    Ok((StoredHead { meta, weights }, adapter))
}

/// What a listing says about one head name.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct NameListing {
    /// Versions with a manifest and not deleted.
    pub live: BTreeSet<u32>,
    /// The highest number ever taken (published, deleted, or a folder of any
    /// content): the next version is above it.
    pub highest: u32,
    /// Blobs, with their age, for removing those no version names.
    pub blobs: Vec<Entry>,
}

/// Groups a listing of [`HEADS`] (or of one name's prefix) by head name.
pub fn group(entries: Vec<Entry>) -> BTreeMap<String, NameListing> {
    let mut names: BTreeMap<String, NameListing> = BTreeMap::new();
    let mut deleted: BTreeSet<(String, u32)> = BTreeSet::new();
    for entry in entries {
        let mut parts = entry.key.splitn(4, '/');
        let (Some(HEADS), Some(name), Some(second), Some(file)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let listing = names.entry(name.to_owned()).or_default();
        if second == BLOBS {
            listing.blobs.push(entry.clone());
            continue;
        }
        let Ok(version) = second.parse::<u32>() else {
            continue;
        };
        listing.highest = listing.highest.max(version);
        match file {
            MANIFEST => {
                listing.live.insert(version);
            }
            DELETED => {
                deleted.insert((name.to_owned(), version));
            }
            _ => {}
        }
    }
    for (name, version) in deleted {
        if let Some(listing) = names.get_mut(&name) {
            listing.live.remove(&version);
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn entry(key: &str) -> Entry {
        Entry {
            key: key.into(),
            size: 1,
            modified: SystemTime::now(),
        }
    }

    /// A newer server's manifest: a head kind this one does not know, and a
    /// second blob under a field it has never heard of.
    const NEWER: &str = r#"{"name": "n", "version": 3, "kind": {"type": "mixture"},
        "weights": "heads/n/blobs/1111-aa.safetensors",
        "router": "heads/n/blobs/2222-bb.safetensors"}"#;

    #[test]
    fn manifests_a_replica_cannot_load_still_name_their_blobs() {
        assert!(decode_manifest(NEWER.as_bytes(), "n", 3).is_err());
        assert_eq!(
            manifest_weights(NEWER.as_bytes(), "n", 3).as_deref(),
            Some("heads/n/blobs/1111-aa.safetensors")
        );
        assert_eq!(
            manifest_weights(b"{}", "n", 3).as_deref(),
            Some("heads/n/3/weights.safetensors"),
            "the layout before blobs"
        );
        assert!(manifest_weights(br#"{"weights": "heads/m/x"}"#, "n", 3).is_none());
        assert!(manifest_weights(b"{not json", "n", 3).is_none());
        for blob in ["1111-aa", "2222-bb"] {
            let key = format!("heads/n/blobs/{blob}.safetensors");
            assert!(mentions(NEWER.as_bytes(), &key), "{key}");
        }
        assert!(!mentions(
            NEWER.as_bytes(),
            "heads/n/blobs/3333-cc.safetensors"
        ));
    }

    #[test]
    fn a_listing_tells_live_versions_taken_numbers_and_blobs_apart() {
        let grouped = group(
            [
                "heads/a/1/head.json",
                "heads/a/2/head.json",
                "heads/a/2/deleted",
                "heads/a/5/deleted",
                "heads/a/blobs/x.safetensors",
                "heads/b/3/weights.safetensors",
                "heads/b/3/head.json",
                "heads/b/9/stray",
                "other/x",
            ]
            .into_iter()
            .map(entry)
            .collect(),
        );
        assert_eq!(grouped.len(), 2);
        let a = &grouped["a"];
        assert_eq!(a.live.iter().copied().collect::<Vec<_>>(), [1]);
        assert_eq!(a.highest, 5);
        assert_eq!(a.blobs.len(), 1);
        let b = &grouped["b"];
        assert_eq!(b.live.iter().copied().collect::<Vec<_>>(), [3]);
        assert_eq!(b.highest, 9, "a folder of any content takes its number");
    }
}
