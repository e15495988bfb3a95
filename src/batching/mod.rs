//! Dynamic batching: one bounded, deadline-aware queue per backbone, drained by a
//! dedicated worker thread that owns the model's compute.
//!
//! Requests are split into items on arrival. The worker closes a batch when it
//! holds `max_batch_size` items, or would exceed `max_batch_tokens` padded tokens,
//! or `max_queue_delay` has passed since its oldest item, whichever comes first;
//! then it sorts the batch by length and runs it as one or more forward passes of
//! similar lengths (see [`partition`]). Results travel back per request through a
//! oneshot channel once all of its items are done, in input order.
//!
//! Online items always go first; bulk items fill what room online traffic
//! leaves. The queue is bounded in items: a request that does not fit is refused
//! at once with [`Error::QueueFull`]. Items whose caller has gone away or whose
//! deadline has passed are dropped before they reach the model.

mod partition;
mod worker;

use std::{
    collections::VecDeque,
    sync::{Arc, Condvar, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

use crate::{
    backbone::{Backbone, Prepared, Want},
    config::BackboneConfig,
    metrics, Error, Result,
};

/// Scheduling class of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Priority {
    /// Interactive traffic: always served first.
    // The command line lists the values without these docs, as it always has.
    #[value(help = None::<&str>)]
    Online,
    /// Background work such as embedding a training set: fills leftover room.
    #[value(help = None::<&str>)]
    Bulk,
}

/// Batch formation limits of one backbone.
#[derive(Debug, Clone)]
pub struct BatchLimits {
    /// Worker threads taking batches from this queue: 1 runs one pass at a
    /// time with every core inside it; more run passes side by side.
    pub workers: usize,
    /// Threads inside each pass; None: candle's shared pool (all cores).
    pub threads_per_worker: Option<usize>,
    pub max_batch_size: usize,
    /// Items times the longest item's tokens, summed per batch.
    pub max_batch_tokens: usize,
    pub max_queue_delay: Duration,
    pub max_queue_items: usize,
    /// Distinct fine-tuned adapters in one batch.
    pub max_adapters_per_batch: usize,
}

impl BatchLimits {
    /// The limits a backbone's config sets; unset threads per worker divide the
    /// cores among several workers (one worker uses the shared pool).
    pub fn from_config(config: &BackboneConfig) -> Self {
        Self {
            workers: config.workers,
            threads_per_worker: config.threads_per_worker.or_else(|| {
                (config.workers > 1).then(|| {
                    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                    (cores / config.workers).max(1)
                })
            }),
            max_batch_size: config.max_batch_size,
            max_batch_tokens: config.max_batch_tokens,
            max_queue_delay: Duration::from_secs_f64(config.max_queue_delay_ms / 1e3),
            max_queue_items: config.max_queue_items,
            max_adapters_per_batch: config.max_adapters_per_batch,
        }
    }
}

/// Shared by every item of one request; answers the caller once.
struct RequestState {
    /// What every item of the request asks for.
    want: Want,
    priority: Priority,
    deadline: Option<Instant>,
    enqueued: Instant,
    collector: Mutex<Collector>,
}

struct Collector {
    results: Vec<Option<Vec<f32>>>,
    remaining: usize,
    /// None once the caller has been answered.
    reply: Option<oneshot::Sender<Result<Vec<Vec<f32>>>>>,
}

impl RequestState {
    fn collector(&self) -> MutexGuard<'_, Collector> {
        crate::sync::lock(&self.collector)
    }

    /// Whether this request's items should be skipped, and why: its caller went
    /// away, or its deadline passed (the caller is answered DEADLINE_EXCEEDED), or
    /// it was already answered with an error. The reason is given only the first
    /// time, so drops are counted once per request.
    fn drop_reason(&self, now: Instant) -> Option<Option<&'static str>> {
        let mut collector = self.collector();
        let reply = match &collector.reply {
            None => return Some(None),
            Some(reply) => reply,
        };
        if reply.is_closed() {
            collector.reply = None;
            return Some(Some("cancelled"));
        }
        if self.deadline.is_some_and(|deadline| deadline <= now) {
            if let Some(reply) = collector.reply.take() {
                let waited = now.saturating_duration_since(self.enqueued);
                let _ = reply.send(Err(Error::DeadlineExceeded(waited)));
            }
            return Some(Some("deadline"));
        }
        None
    }

    /// Answers the caller with an error; its remaining items will be skipped.
    fn fail(&self, err: Error) {
        if let Some(reply) = self.collector().reply.take() {
            let _ = reply.send(Err(err));
        }
    }

    fn deliver(&self, index: usize, vector: Vec<f32>) {
        let mut collector = self.collector();
        if collector.reply.is_none() {
            return;
        }
        collector.results[index] = Some(vector);
        collector.remaining -= 1;
        if collector.remaining == 0 {
            let results = std::mem::take(&mut collector.results)
                .into_iter()
                .map(|v| v.unwrap_or_default())
                .collect();
            if let Some(reply) = collector.reply.take() {
                let _ = reply.send(Ok(results));
            }
        }
    }
}

/// One input of a request, waiting in a lane.
struct Unit {
    request: Arc<RequestState>,
    index: usize,
    item: Prepared,
}

#[derive(Default)]
struct Lanes {
    online: VecDeque<Unit>,
    bulk: VecDeque<Unit>,
    closed: bool,
}

impl Lanes {
    fn len(&self) -> usize {
        self.online.len() + self.bulk.len()
    }

    /// Units in serving order: online first.
    fn iter(&self) -> impl Iterator<Item = &Unit> {
        self.online.iter().chain(self.bulk.iter())
    }

    fn pop(&mut self) -> Option<Unit> {
        self.online.pop_front().or_else(|| self.bulk.pop_front())
    }
}

struct Shared {
    name: String,
    limits: BatchLimits,
    lanes: Mutex<Lanes>,
    /// Signals the workers: new units, or the queue closed.
    wake: Condvar,
}

impl Shared {
    fn lanes(&self) -> MutexGuard<'_, Lanes> {
        crate::sync::lock(&self.lanes)
    }
}

/// Closes the queue when the last handle goes: the workers finish what was
/// admitted and exit, and the drop waits for them. The workers hold the
/// backbone, so it is released before the handle's owner goes on: at shutdown,
/// before the process exits. A GPU backbone released by a worker thread while
/// the main thread was already running the CUDA libraries' exit handlers
/// crashed the process (SIGSEGV after "server stopped").
struct CloseOnDrop {
    shared: Arc<Shared>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.shared.lanes().closed = true;
        self.shared.wake.notify_all();
        let current = std::thread::current().id();
        for worker in self.workers.drain(..) {
            // A worker never holds a handle, but joining oneself would hang.
            if worker.thread().id() != current && worker.join().is_err() {
                tracing::error!(backbone = %self.shared.name, "a queue worker panicked");
            }
        }
    }
}

/// Handle to a backbone's queue; cheap to clone, shared by all request handlers.
#[derive(Clone)]
pub struct BackboneQueue {
    shared: Arc<CloseOnDrop>,
}

impl BackboneQueue {
    /// Starts the backbone's worker thread.
    pub fn start(backbone: Arc<dyn Backbone>, limits: BatchLimits) -> std::io::Result<Self> {
        metrics::register_backbone(&backbone.descriptor().name);
        let shared = Arc::new(Shared {
            name: backbone.descriptor().name.clone(),
            limits,
            lanes: Mutex::new(Lanes::default()),
            wake: Condvar::new(),
        });
        let mut handle = CloseOnDrop {
            shared: Arc::clone(&shared),
            workers: Vec::new(),
        };
        for index in 0..shared.limits.workers.max(1) {
            let worker_shared = Arc::clone(&shared);
            let backbone = Arc::clone(&backbone);
            // On an error, dropping `handle` stops the workers already started.
            handle.workers.push(
                std::thread::Builder::new()
                    .name(format!("backbone-{}-{index}", shared.name))
                    .spawn(move || worker::run(backbone, worker_shared))?,
            );
        }
        Ok(Self {
            shared: Arc::new(handle),
        })
    }

    /// Queues the items of one request and waits for their vectors, in input order.
    pub async fn embed(
        &self,
        items: Vec<Prepared>,
        want: Want,
        priority: Priority,
        deadline: Option<Instant>,
    ) -> Result<Vec<Vec<f32>>> {
        let shared = &self.shared.shared;
        let now = Instant::now();
        if deadline.is_some_and(|d| d <= now) {
            metrics::record_queue_rejection(&shared.name, "deadline");
            return Err(Error::DeadlineExceeded(Duration::ZERO));
        }
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let count = items.len();
        let (reply, receiver) = oneshot::channel();
        let request = Arc::new(RequestState {
            want,
            priority,
            deadline,
            enqueued: now,
            collector: Mutex::new(Collector {
                results: vec![None; count],
                remaining: count,
                reply: Some(reply),
            }),
        });
        {
            let mut lanes = shared.lanes();
            if lanes.closed {
                return Err(Error::ShuttingDown);
            }
            if lanes.len() + count > shared.limits.max_queue_items {
                drop(lanes);
                metrics::record_queue_rejection(&shared.name, "queue_full");
                return Err(Error::QueueFull(shared.name.clone()));
            }
            let lane = match priority {
                Priority::Online => &mut lanes.online,
                Priority::Bulk => &mut lanes.bulk,
            };
            lane.extend(items.into_iter().enumerate().map(|(index, item)| Unit {
                request: Arc::clone(&request),
                index,
                item,
            }));
            metrics::set_queue_depth(&shared.name, lanes.len());
        }
        shared.wake.notify_one();
        receiver
            .await
            .map_err(|_| Error::Inference("the backbone worker stopped".into()))?
    }
}
