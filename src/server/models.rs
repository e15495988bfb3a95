//! The Models service: what backbones are resident, and the stored heads.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{convert, head_convert};
use crate::{
    head::{store::HeadStore, HeadRef},
    proto,
    registry::{BackboneRegistry, BackboneState, BackboneStatus},
    Error,
};

pub struct ModelsService {
    registry: Arc<BackboneRegistry>,
    store: Arc<HeadStore>,
}

impl ModelsService {
    pub fn new(registry: Arc<BackboneRegistry>, store: Arc<HeadStore>) -> Self {
        Self { registry, store }
    }
}

fn head_ref(text: &str) -> Result<HeadRef, Status> {
    HeadRef::parse(text).map_err(|reason| Error::InvalidArgument(reason).into())
}

fn backbone_info(status: BackboneStatus) -> proto::BackboneInfo {
    let config = &status.config;
    let mut info = proto::BackboneInfo {
        name: config.name.clone(),
        architecture: config.architecture.as_str().to_owned(),
        device: config.device.to_string(),
        default_pooling: convert::pooling(config.pooling) as i32,
        default_normalize: config.normalize,
        ..Default::default()
    };
    match status.state {
        BackboneState::Loading => info.set_state(proto::BackboneState::Loading),
        BackboneState::Failed(reason) => {
            info.set_state(proto::BackboneState::Failed);
            info.error = reason;
        }
        BackboneState::Ready(loaded) => {
            let d = loaded.backbone.descriptor();
            info.set_state(proto::BackboneState::Ready);
            info.set_modality(convert::modality(d.modality));
            info.dimension = d.dimension as u32;
            info.dtype = d.dtype.clone();
            info.max_sequence_length = d.max_sequence_length as u32;
            info.fingerprint = d.fingerprint.clone();
            info.source = d.source.clone();
            info.image_size = d.image_size as u32;
            info.builtin_heads = loaded
                .backbone
                .classifiers()
                .iter()
                .map(|c| format!("{}/{}", d.name, c.name))
                .collect();
        }
    }
    info
}

#[tonic::async_trait]
impl proto::models_server::Models for ModelsService {
    async fn list_backbones(
        &self,
        _request: Request<proto::ListBackbonesRequest>,
    ) -> Result<Response<proto::ListBackbonesResponse>, Status> {
        let backbones = self
            .registry
            .list()
            .into_iter()
            .map(backbone_info)
            .collect();
        Ok(Response::new(proto::ListBackbonesResponse { backbones }))
    }

    async fn list_heads(
        &self,
        request: Request<proto::ListHeadsRequest>,
    ) -> Result<Response<proto::ListHeadsResponse>, Status> {
        let request = request.into_inner();
        let backbone = (!request.backbone.is_empty()).then_some(request.backbone.as_str());
        let heads = self
            .store
            .list(backbone, request.all_versions)
            .iter()
            .map(|head| head_convert::head_info(head))
            .collect();
        Ok(Response::new(proto::ListHeadsResponse { heads }))
    }

    async fn get_head(
        &self,
        request: Request<proto::GetHeadRequest>,
    ) -> Result<Response<proto::HeadInfo>, Status> {
        let reference = head_ref(&request.into_inner().head)?;
        let head = self.store.get(&reference)?;
        Ok(Response::new(head_convert::head_info(&head)))
    }

    async fn delete_head(
        &self,
        request: Request<proto::DeleteHeadRequest>,
    ) -> Result<Response<proto::DeleteHeadResponse>, Status> {
        let reference = head_ref(&request.into_inner().head)?;
        let store = Arc::clone(&self.store);
        let deleted_versions = tokio::task::spawn_blocking(move || store.delete(&reference))
            .await
            .map_err(|err| Status::internal(format!("delete failed: {err}")))??;
        Ok(Response::new(proto::DeleteHeadResponse {
            deleted_versions,
        }))
    }
}
