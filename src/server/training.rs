//! Trainer and Predictor: part of the contract, not yet served by this version.
//! Every call answers UNIMPLEMENTED so clients can tell "not here yet" from errors.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::proto;

const NO_TRAINING: &str = "training heads is not available in this version of tlserve";
const NO_PREDICT: &str = "Predict needs trained heads, which this version of tlserve lacks";

pub struct TrainerService;

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::TrainEvent, Status>> + Send>>;

#[tonic::async_trait]
impl proto::trainer_server::Trainer for TrainerService {
    type TrainHeadStream = EventStream;
    type WatchJobStream = EventStream;

    async fn train_head(
        &self,
        _request: Request<proto::TrainHeadRequest>,
    ) -> Result<Response<Self::TrainHeadStream>, Status> {
        Err(Status::unimplemented(NO_TRAINING))
    }

    async fn upload_dataset(
        &self,
        _request: Request<Streaming<proto::UploadDatasetRequest>>,
    ) -> Result<Response<proto::Dataset>, Status> {
        Err(Status::unimplemented(NO_TRAINING))
    }

    async fn watch_job(
        &self,
        _request: Request<proto::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        Err(Status::unimplemented(NO_TRAINING))
    }

    async fn cancel_job(
        &self,
        _request: Request<proto::CancelJobRequest>,
    ) -> Result<Response<proto::JobInfo>, Status> {
        Err(Status::unimplemented(NO_TRAINING))
    }

    async fn list_jobs(
        &self,
        _request: Request<proto::ListJobsRequest>,
    ) -> Result<Response<proto::ListJobsResponse>, Status> {
        Err(Status::unimplemented(NO_TRAINING))
    }
}

pub struct PredictorService;

#[tonic::async_trait]
impl proto::predictor_server::Predictor for PredictorService {
    async fn predict(
        &self,
        _request: Request<proto::PredictRequest>,
    ) -> Result<Response<proto::PredictResponse>, Status> {
        Err(Status::unimplemented(NO_PREDICT))
    }
}
