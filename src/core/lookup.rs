//! Finding a stored head for a request: in the caller's scope, from memory or
//! the store, with the backbone it runs on, whose weights must be those the
//! head was trained on.

use std::sync::Arc;

use super::Scope;
use crate::{
    backbone::Adapter,
    head::{
        store::{HeadStore, StoredHead},
        HeadRef,
    },
    registry::{BackboneRegistry, LoadedBackbone},
    Error, Result,
};

/// The head `text` names (`name` or `name@version`) and its backbone. A head
/// in memory is served without touching the store; a miss reads the store.
pub async fn stored_head(
    store: &Arc<HeadStore>,
    registry: &BackboneRegistry,
    text: &str,
    scope: &Scope,
) -> Result<(Arc<LoadedBackbone>, Arc<StoredHead>)> {
    let reference = HeadRef::parse(text).map_err(Error::InvalidArgument)?;
    scope.check(&reference.name)?;
    let head = match store.cached(&reference) {
        Some(head) => head,
        None => store.get(&reference).await?,
    };
    let meta = &head.meta;
    let loaded = registry.get(&meta.backbone)?;
    let descriptor = loaded.backbone.descriptor();
    if descriptor.fingerprint != meta.backbone_fingerprint {
        return Err(Error::FailedPrecondition(format!(
            "head {}@{} was trained on other weights of backbone `{}` \
             (fingerprint {}, the backbone now has {}); retrain it",
            meta.name,
            meta.version,
            meta.backbone,
            meta.backbone_fingerprint,
            descriptor.fingerprint
        )));
    }
    Ok((loaded, head))
}

/// A fine-tuned head's adapter, from memory or read from the store; None for a head on frozen features.
pub async fn adapter_of(
    store: &Arc<HeadStore>,
    head: &Arc<StoredHead>,
) -> Result<Option<Arc<Adapter>>> {
    if head.meta.fine_tuning.is_none() {
        return Ok(None);
    }
    if let Some(adapter) = store.cached_adapter(head) {
        return Ok(Some(adapter));
    }
    store.adapter(head).await
}
