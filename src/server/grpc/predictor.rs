//! The Predictor service: backbone features through a head, top-k labels.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{deadline, request_layer::scope_of, response_budget::CallAnswers};
use crate::{
    core::{AnswerBudget, Predictor, Unbudgeted},
    proto,
    wire::convert,
};

pub struct PredictorService {
    predictor: Arc<Predictor>,
}

impl PredictorService {
    pub fn new(predictor: Arc<Predictor>) -> Self {
        Self { predictor }
    }
}

#[tonic::async_trait]
impl proto::predictor_server::Predictor for PredictorService {
    async fn predict(
        &self,
        request: Request<proto::PredictRequest>,
    ) -> Result<Response<proto::PredictResponse>, Status> {
        let deadline = deadline::of(&request);
        let scope = scope_of(&request);
        let answers = request.extensions().get::<CallAnswers>().cloned();
        let request = convert::predict_request(request.into_inner(), deadline)?;
        let budget: &dyn AnswerBudget = match &answers {
            Some(CallAnswers(budget)) => &**budget,
            None => &Unbudgeted,
        };
        let response = self.predictor.predict(request, &scope, budget).await?;
        Ok(Response::new(convert::predict_response(response)))
    }
}
