//! The per-backbone work queue: a bounded channel in front of a dedicated worker
//! thread that owns the model's compute, so forward passes never run on the async
//! runtime's threads.
//!
//! Callers wait on a oneshot reply. A full queue refuses at once (never an
//! unbounded wait); work whose caller has gone away or whose deadline has passed
//! is dropped before it reaches the model.

use std::{
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot};

use crate::{
    backbone::{Backbone, EmbedItem, EmbedOptions, Prepared},
    metrics, Error, Result,
};

/// One request's worth of work.
struct Job {
    items: Vec<Prepared>,
    options: EmbedOptions,
    deadline: Option<Instant>,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>>>,
}

/// Handle to a backbone's queue; cheap to clone, shared by all request handlers.
#[derive(Clone)]
pub struct BackboneQueue {
    name: Arc<str>,
    sender: mpsc::Sender<Job>,
}

impl BackboneQueue {
    /// Starts the worker thread. The thread ends when every handle is dropped.
    pub fn start(backbone: Arc<dyn Backbone>, capacity: usize) -> std::io::Result<Self> {
        let name: Arc<str> = backbone.descriptor().name.as_str().into();
        let (sender, receiver) = mpsc::channel(capacity);
        std::thread::Builder::new()
            .name(format!("backbone-{name}"))
            .spawn(move || run_worker(backbone, receiver))?;
        Ok(Self { name, sender })
    }

    /// Queues `items` for one forward pass and waits for their vectors.
    pub async fn embed(
        &self,
        items: Vec<Prepared>,
        options: EmbedOptions,
        deadline: Option<Instant>,
    ) -> Result<Vec<Vec<f32>>> {
        if deadline.is_some_and(|d| d <= Instant::now()) {
            return Err(Error::DeadlineExceeded(Duration::ZERO));
        }
        let (reply, receiver) = oneshot::channel();
        let job = Job {
            items,
            options,
            deadline,
            enqueued: Instant::now(),
            reply,
        };
        self.sender.try_send(job).map_err(|err| match err {
            mpsc::error::TrySendError::Full(_) => {
                metrics::record_queue_rejection(&self.name, "queue_full");
                Error::QueueFull(self.name.to_string())
            }
            mpsc::error::TrySendError::Closed(_) => Error::ShuttingDown,
        })?;
        receiver
            .await
            .map_err(|_| Error::Inference("the backbone worker stopped".into()))?
    }
}

fn run_worker(backbone: Arc<dyn Backbone>, mut receiver: mpsc::Receiver<Job>) {
    let name = backbone.descriptor().name.clone();
    tracing::debug!(backbone = %name, "worker started");
    while let Some(job) = receiver.blocking_recv() {
        if job.reply.is_closed() {
            // The caller went away (cancelled or timed out): skip the compute.
            metrics::record_queue_rejection(&name, "cancelled");
            continue;
        }
        let waited = job.enqueued.elapsed();
        if job.deadline.is_some_and(|d| d <= Instant::now()) {
            metrics::record_queue_rejection(&name, "deadline");
            let _ = job.reply.send(Err(Error::DeadlineExceeded(waited)));
            continue;
        }
        let items: Vec<EmbedItem<'_>> = job
            .items
            .iter()
            .map(|input| EmbedItem {
                input,
                options: job.options,
            })
            .collect();
        let started = Instant::now();
        // A panic inside the model must fail this request, not kill the worker and
        // with it every later request for this backbone.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| backbone.embed(&items)))
            .unwrap_or_else(|_| Err(Error::Inference("the model panicked".into())));
        metrics::record_inference(&name, items.len(), started.elapsed());
        if let Err(err) = &result {
            tracing::error!(backbone = %name, error = %err, "forward pass failed");
        }
        let _ = job.reply.send(result);
    }
    tracing::debug!(backbone = %name, "worker stopped");
}
