//! The Models service: what backbones are resident, and the stored heads.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::request_layer::scope_of;
use crate::{core::Catalog, proto, wire::heads as wire};

pub struct ModelsService {
    catalog: Arc<Catalog>,
}

impl ModelsService {
    pub fn new(catalog: Arc<Catalog>) -> Self {
        Self { catalog }
    }
}

#[tonic::async_trait]
impl proto::models_server::Models for ModelsService {
    async fn list_backbones(
        &self,
        _request: Request<proto::ListBackbonesRequest>,
    ) -> Result<Response<proto::ListBackbonesResponse>, Status> {
        let backbones = self
            .catalog
            .backbones()
            .into_iter()
            .map(wire::backbone_info)
            .collect();
        Ok(Response::new(proto::ListBackbonesResponse { backbones }))
    }

    async fn list_heads(
        &self,
        request: Request<proto::ListHeadsRequest>,
    ) -> Result<Response<proto::ListHeadsResponse>, Status> {
        let scope = scope_of(&request);
        let request = request.into_inner();
        let backbone = (!request.backbone.is_empty()).then_some(request.backbone);
        let heads = self
            .catalog
            .heads(backbone, request.all_versions, &scope)
            .await?
            .iter()
            .map(|head| wire::head_info(head))
            .collect();
        Ok(Response::new(proto::ListHeadsResponse { heads }))
    }

    async fn get_head(
        &self,
        request: Request<proto::GetHeadRequest>,
    ) -> Result<Response<proto::HeadInfo>, Status> {
        let scope = scope_of(&request);
        let head = self
            .catalog
            .head(&request.into_inner().head, &scope)
            .await?;
        Ok(Response::new(wire::head_info(&head)))
    }

    async fn delete_head(
        &self,
        request: Request<proto::DeleteHeadRequest>,
    ) -> Result<Response<proto::DeleteHeadResponse>, Status> {
        let scope = scope_of(&request);
        let deleted_versions = self
            .catalog
            .delete_head(&request.into_inner().head, &scope)
            .await?;
        Ok(Response::new(proto::DeleteHeadResponse {
            deleted_versions,
        }))
    }
}
