//! The Trainer service: training jobs as server-streamed events, dataset upload,
//! and job control.

use std::{pin::Pin, sync::Arc};

use futures_util::Stream;
use prost::Message;
use tokio::sync::broadcast;
use tonic::{Request, Response, Status, Streaming};

use super::request_layer::scope_of;
use crate::{
    core::Trainer,
    jobs::JobEvent,
    proto,
    wire::{convert, heads as wire},
    Error,
};

pub struct TrainerService {
    trainer: Arc<Trainer>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::TrainEvent, Status>> + Send>>;

impl TrainerService {
    pub fn new(trainer: Arc<Trainer>) -> Self {
        Self { trainer }
    }
}

/// Streams `first` (if any), then the subscription's events, ending after the
/// first final state.
fn event_stream(
    first: Option<JobEvent>,
    receiver: Option<broadcast::Receiver<JobEvent>>,
) -> EventStream {
    let stream = futures_util::stream::unfold(
        (first, receiver, false),
        |(first, receiver, done)| async move {
            if done {
                return None;
            }
            if let Some(event) = first {
                let finished = event.state().is_final();
                return Some((Ok(wire::train_event(&event)), (None, receiver, finished)));
            }
            let mut receiver = receiver?;
            loop {
                match receiver.recv().await {
                    Ok(event) => {
                        let finished = event.state().is_final();
                        return Some((
                            Ok(wire::train_event(&event)),
                            (None, Some(receiver), finished),
                        ));
                    }
                    // A slow watcher skips ahead; the state is in the next event.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    );
    Box::pin(stream)
}

#[tonic::async_trait]
impl proto::trainer_server::Trainer for TrainerService {
    type TrainHeadStream = EventStream;
    type WatchJobStream = EventStream;

    async fn train_head(
        &self,
        request: Request<proto::TrainHeadRequest>,
    ) -> Result<Response<Self::TrainHeadStream>, Status> {
        let scope = scope_of(&request);
        let request = convert::train_request(request.into_inner())?;
        let (_id, receiver) = self.trainer.train(request, &scope).await?;
        Ok(Response::new(event_stream(None, Some(receiver))))
    }

    async fn upload_dataset(
        &self,
        request: Request<Streaming<proto::UploadDatasetRequest>>,
    ) -> Result<Response<proto::Dataset>, Status> {
        let scope = scope_of(&request);
        let mut stream = request.into_inner();
        let mut upload = self.trainer.begin_upload(&scope).await?;
        let idle = self.trainer.upload_idle_timeout();
        loop {
            let next = tokio::time::timeout(idle, stream.message())
                .await
                .map_err(|_| {
                    Error::TimedOut(format!(
                        "the upload sent nothing for {} s (heads.upload_idle_timeout_seconds)",
                        idle.as_secs_f64()
                    ))
                })??;
            let Some(chunk) = next else { break };
            let bytes = chunk.encoded_len();
            self.trainer.add_to_upload(
                &mut upload,
                convert::raw_examples(chunk.examples),
                bytes,
            )?;
        }
        let dataset = self.trainer.finish_upload(upload).await?;
        Ok(Response::new(proto::Dataset {
            expires_at: Some(wire::timestamp(dataset.expires_at())),
            dataset_id: dataset.id,
            example_count: dataset.example_count,
            label_counts: dataset.label_counts.into_iter().collect(),
        }))
    }

    async fn watch_job(
        &self,
        request: Request<proto::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let scope = scope_of(&request);
        let (current, receiver) = self
            .trainer
            .watch(&request.into_inner().job_id, &scope)
            .await?;
        Ok(Response::new(event_stream(Some(current), receiver)))
    }

    async fn cancel_job(
        &self,
        request: Request<proto::CancelJobRequest>,
    ) -> Result<Response<proto::JobInfo>, Status> {
        let scope = scope_of(&request);
        let info = self
            .trainer
            .cancel(&request.into_inner().job_id, &scope)
            .await?;
        Ok(Response::new(wire::job_info(&info)))
    }

    async fn list_jobs(
        &self,
        request: Request<proto::ListJobsRequest>,
    ) -> Result<Response<proto::ListJobsResponse>, Status> {
        let scope = scope_of(&request);
        let jobs = self
            .trainer
            .list(request.into_inner().include_finished, &scope)
            .await?
            .iter()
            .map(wire::job_info)
            .collect();
        Ok(Response::new(proto::ListJobsResponse { jobs }))
    }
}
