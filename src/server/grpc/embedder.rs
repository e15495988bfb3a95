//! The Embedder service: inputs in, feature vectors out.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{deadline, request_layer::scope_of};
use crate::{core::Embedder, proto, wire::convert};

pub struct EmbedderService {
    embedder: Arc<Embedder>,
}

impl EmbedderService {
    pub fn new(embedder: Arc<Embedder>) -> Self {
        Self { embedder }
    }
}

#[tonic::async_trait]
impl proto::embedder_server::Embedder for EmbedderService {
    async fn embed(
        &self,
        request: Request<proto::EmbedRequest>,
    ) -> Result<Response<proto::EmbedResponse>, Status> {
        let deadline = deadline::of(&request);
        let scope = scope_of(&request);
        let request = convert::embed_request(request.into_inner(), deadline)?;
        let response = self.embedder.embed(request, &scope).await?;
        Ok(Response::new(convert::embed_response(response)))
    }
}
