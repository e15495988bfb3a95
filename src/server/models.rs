//! The Models service: what backbones are resident; heads once the head store
//! exists.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use crate::{
    proto,
    registry::{BackboneRegistry, BackboneState, BackboneStatus},
};

pub struct ModelsService {
    registry: Arc<BackboneRegistry>,
}

impl ModelsService {
    pub fn new(registry: Arc<BackboneRegistry>) -> Self {
        Self { registry }
    }
}

fn backbone_info(status: BackboneStatus) -> proto::BackboneInfo {
    let config = &status.config;
    let mut info = proto::BackboneInfo {
        name: config.name.clone(),
        architecture: config.architecture.as_str().to_owned(),
        device: config.device.clone(),
        default_pooling: convert::pooling(config.pooling.into()) as i32,
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
        }
    }
    info
}

const NO_HEADS: &str = "heads are not available in this version of tlserve";

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
        _request: Request<proto::ListHeadsRequest>,
    ) -> Result<Response<proto::ListHeadsResponse>, Status> {
        Err(Status::unimplemented(NO_HEADS))
    }

    async fn get_head(
        &self,
        _request: Request<proto::GetHeadRequest>,
    ) -> Result<Response<proto::HeadInfo>, Status> {
        Err(Status::unimplemented(NO_HEADS))
    }

    async fn delete_head(
        &self,
        _request: Request<proto::DeleteHeadRequest>,
    ) -> Result<Response<proto::DeleteHeadResponse>, Status> {
        Err(Status::unimplemented(NO_HEADS))
    }
}
