//! The Models use cases: resident backbones and stored heads.

use std::sync::Arc;

use super::Scope;
use crate::{
    head::{
        store::{HeadStore, StoredHead},
        HeadRef,
    },
    registry::{BackboneRegistry, BackboneStatus},
    Error, Result,
};

/// Lists backbones, and lists, reads and deletes heads.
pub struct Catalog {
    registry: Arc<BackboneRegistry>,
    store: Arc<HeadStore>,
}

fn head_ref(text: &str) -> Result<HeadRef> {
    HeadRef::parse(text).map_err(Error::InvalidArgument)
}

impl Catalog {
    pub fn new(registry: Arc<BackboneRegistry>, store: Arc<HeadStore>) -> Self {
        Self { registry, store }
    }

    /// Every configured backbone and its state, in name order.
    pub fn backbones(&self) -> Vec<BackboneStatus> {
        self.registry.list()
    }

    /// Heads by name then version (only each name's latest unless
    /// `all_versions`), of one backbone or of all.
    pub async fn heads(
        &self,
        backbone: Option<String>,
        all_versions: bool,
        scope: &Scope,
    ) -> Result<Vec<Arc<StoredHead>>> {
        let mut heads = self.store.list(backbone.as_deref(), all_versions).await;
        heads.retain(|head| scope.allows(&head.meta.name));
        Ok(heads)
    }

    /// One head version (`name` or `name@version`).
    pub async fn head(&self, reference: &str, scope: &Scope) -> Result<Arc<StoredHead>> {
        let reference = head_ref(reference)?;
        scope.check(&reference.name)?;
        if let Some(head) = self.store.cached(&reference) {
            return Ok(head);
        }
        self.store.get(&reference).await
    }

    /// Deletes one version, or all versions of a name; returns the versions.
    pub async fn delete_head(&self, reference: &str, scope: &Scope) -> Result<Vec<u32>> {
        let reference = head_ref(reference)?;
        scope.check(&reference.name)?;
        self.store.delete(&reference).await
    }

    /// Heads trained on other weights than the loaded backbone's are refused
    /// by Predict; says so once, after the backbones load, where an operator
    /// looks.
    pub async fn warn_about_stale_heads(&self) {
        let heads = match self.heads(None, true, &Scope::All).await {
            Ok(heads) => heads,
            Err(err) => {
                tracing::warn!(error = %err, "cannot list heads to check their backbones");
                return;
            }
        };
        for head in heads {
            let meta = &head.meta;
            match self.registry.get(&meta.backbone) {
                Ok(loaded)
                    if loaded.backbone.descriptor().fingerprint != meta.backbone_fingerprint =>
                {
                    tracing::error!(head = %meta.name, version = meta.version,
                        backbone = %meta.backbone,
                        "head was trained on different backbone weights; Predict refuses it")
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(head = %meta.name, version = meta.version,
                    error = %err, "head's backbone is not available"),
            }
        }
    }
}
