//! The worker threads of one backbone: each forms batches from the shared queue
//! and runs them, on its own thread pool when one is configured.

use std::{panic::AssertUnwindSafe, sync::Arc, time::Instant};

use super::{partition, BatchLimits, Lanes, Priority, Shared, Unit};
use crate::{
    backbone::{Adapter, Backbone, EmbedItem},
    metrics, Error,
};

pub(super) fn run(backbone: Arc<dyn Backbone>, shared: Arc<Shared>) {
    tracing::debug!(backbone = %shared.name, "worker started");
    // A pool of the worker's own: passes computed inside it use its threads
    // (rayon's current pool), so workers do not contend for one shared pool.
    let pool = shared.limits.threads_per_worker.and_then(|threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name({
                let name = shared.name.clone();
                move |i| format!("{name}-pass-{i}")
            })
            .build()
            .inspect_err(|err| {
                tracing::error!(backbone = %shared.name, error = %err,
                    "cannot start the worker's thread pool; using the shared one");
            })
            .ok()
    });
    while let Some(batch) = next_batch(&shared) {
        if batch.is_empty() {
            continue;
        }
        match &pool {
            Some(pool) => pool.install(|| compute(backbone.as_ref(), &shared, batch)),
            None => compute(backbone.as_ref(), &shared, batch),
        }
    }
    tracing::debug!(backbone = %shared.name, "worker stopped");
}

/// Waits for work, lets a batch fill up to its limits or its delay, and takes it.
/// None once the queue is closed and drained.
fn next_batch(shared: &Shared) -> Option<Vec<Unit>> {
    let limits = &shared.limits;
    let mut lanes = shared.lanes();
    while lanes.len() == 0 {
        if lanes.closed {
            return None;
        }
        lanes = crate::sync::wait(&shared.wake, lanes);
    }

    // The oldest unit is at the front of one of the lanes.
    let oldest = [lanes.online.front(), lanes.bulk.front()]
        .into_iter()
        .flatten()
        .map(|unit| unit.request.enqueued)
        .min()
        .unwrap_or_else(Instant::now);
    let close_at = oldest + limits.max_queue_delay;
    while !lanes.closed && !is_full(&lanes, limits) {
        let now = Instant::now();
        if now >= close_at {
            break;
        }
        lanes = crate::sync::wait_timeout(&shared.wake, lanes, close_at - now);
    }

    let now = Instant::now();
    let mut batch: Vec<Unit> = Vec::new();
    let mut longest = 0;
    let mut adapters: Vec<*const Adapter> = Vec::new();
    while let Some(front) = lanes.online.front().or_else(|| lanes.bulk.front()) {
        if let Some(reason) = front.request.drop_reason(now) {
            if let Some(reason) = reason {
                metrics::record_queue_rejection(&shared.name, reason);
            }
            lanes.pop();
            continue;
        }
        let tokens = front.item.tokens();
        let grown = longest.max(tokens);
        let over_tokens = !batch.is_empty() && (batch.len() + 1) * grown > limits.max_batch_tokens;
        let adapter = front.request.want.adapter.as_ref().map(Arc::as_ptr);
        let new_adapter = adapter.filter(|a| !adapters.contains(a));
        let over_adapters =
            new_adapter.is_some() && adapters.len() == limits.max_adapters_per_batch;
        if batch.len() == limits.max_batch_size || over_tokens || over_adapters {
            break;
        }
        longest = grown;
        adapters.extend(new_adapter);
        batch.extend(lanes.pop());
    }
    metrics::set_queue_depth(&shared.name, lanes.len());
    metrics::record_batch_adapters(&shared.name, adapters.len());
    Some(batch)
}

/// Whether the waiting units already fill a batch.
fn is_full(lanes: &Lanes, limits: &BatchLimits) -> bool {
    let mut count = 0;
    let mut longest = 0;
    for unit in lanes.iter() {
        if count == limits.max_batch_size {
            return true;
        }
        longest = longest.max(unit.item.tokens());
        if count > 0 && (count + 1) * longest > limits.max_batch_tokens {
            return true;
        }
        count += 1;
    }
    count == limits.max_batch_size
}

/// Runs a batch as forward passes of similar lengths and delivers the vectors.
///
/// Passes with online items go first. Between passes, when online work is
/// waiting and only bulk passes are left, those go back to the front of the bulk
/// lane: online requests wait for at most one pass, never a whole bulk batch.
fn compute(backbone: &dyn Backbone, shared: &Shared, batch: Vec<Unit>) {
    let lengths: Vec<usize> = batch.iter().map(|unit| unit.item.tokens()).collect();
    let is_online = |i: &usize| batch[*i].request.priority == Priority::Online;
    // A backbone that computes every item at its own length gains nothing from
    // splitting a batch by length; one pass saves the per-pass overhead.
    let mut groups = if backbone.pads_batches() {
        partition::by_length(&lengths)
    } else {
        vec![(0..batch.len()).collect()]
    };
    // Stable: within each class, shorter passes first as before.
    groups.sort_by_key(|group| !group.iter().any(is_online));

    let mut done = vec![false; batch.len()];
    for (position, group) in groups.iter().enumerate() {
        let bulk_only_from_here = groups[position..].iter().all(|g| !g.iter().any(is_online));
        if position > 0 && bulk_only_from_here && !shared.lanes().online.is_empty() {
            requeue_bulk(shared, batch, &done);
            return;
        }
        run_pass(backbone, shared, &batch, group, &lengths);
        for &i in group {
            done[i] = true;
        }
    }
}

/// Puts the units not yet computed back at the front of the bulk lane, in order.
fn requeue_bulk(shared: &Shared, batch: Vec<Unit>, done: &[bool]) {
    let mut lanes = shared.lanes();
    let pending: Vec<Unit> = batch
        .into_iter()
        .zip(done)
        .filter(|(_, &done)| !done)
        .map(|(unit, _)| unit)
        .collect();
    for unit in pending.into_iter().rev() {
        lanes.bulk.push_front(unit);
    }
    metrics::set_queue_depth(&shared.name, lanes.len());
}

fn run_pass(
    backbone: &dyn Backbone,
    shared: &Shared,
    batch: &[Unit],
    group: &[usize],
    lengths: &[usize],
) {
    let started = Instant::now();
    for &i in group {
        metrics::record_queue_wait(
            &shared.name,
            started.saturating_duration_since(batch[i].request.enqueued),
        );
    }
    let items: Vec<EmbedItem<'_>> = group
        .iter()
        .map(|&i| EmbedItem {
            input: &batch[i].item,
            options: batch[i].request.want.options,
            adapter: batch[i].request.want.adapter.as_deref(),
            capture: batch[i].request.want.capture,
        })
        .collect();
    let padded_tokens = items.len() * group.iter().map(|&i| lengths[i]).max().unwrap_or(0);
    // A panic inside the model must fail these requests, not kill the worker
    // and with it every later request for this backbone.
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| backbone.embed(&items)))
        .unwrap_or_else(|_| Err(Error::Inference("the model panicked".into())));
    metrics::record_forward_pass(&shared.name, items.len(), padded_tokens, started.elapsed());
    match result {
        Ok(vectors) if vectors.len() == group.len() => {
            for (&i, vector) in group.iter().zip(vectors) {
                batch[i].request.deliver(batch[i].index, vector);
            }
        }
        Ok(vectors) => fail_group(
            shared,
            batch,
            group,
            &format!(
                "the model returned {} vectors for {} items",
                vectors.len(),
                group.len()
            ),
        ),
        Err(Error::Inference(reason)) => fail_group(shared, batch, group, &reason),
        Err(other) => fail_group(shared, batch, group, &other.to_string()),
    }
}

fn fail_group(shared: &Shared, batch: &[Unit], group: &[usize], reason: &str) {
    tracing::error!(backbone = %shared.name, error = %reason, "forward pass failed");
    for &i in group {
        batch[i].request.fail(Error::Inference(reason.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Condvar, Mutex},
        time::Duration,
    };

    use tokio::sync::oneshot;

    use super::*;
    use crate::{
        backbone::{EmbedOptions, Pooling, Prepared, TokenizedText, Want},
        batching::{Collector, RequestState},
        Result,
    };

    type Reply = oneshot::Receiver<Result<Vec<Vec<f32>>>>;

    fn shared(max_batch_size: usize, max_batch_tokens: usize) -> Shared {
        Shared {
            name: "test".into(),
            limits: BatchLimits {
                workers: 1,
                threads_per_worker: None,
                max_batch_size,
                max_batch_tokens,
                max_queue_delay: Duration::ZERO,
                max_queue_items: 1000,
                max_adapters_per_batch: 2,
            },
            lanes: Mutex::new(Lanes::default()),
            wake: Condvar::new(),
        }
    }

    /// Adds a request whose items have the given token counts; returns its reply.
    fn push(shared: &Shared, bulk: bool, lengths: &[usize], deadline: Option<Instant>) -> Reply {
        push_adapted(shared, bulk, lengths, deadline, None)
    }

    /// [`push`] for the features of `adapter`.
    fn push_adapted(
        shared: &Shared,
        bulk: bool,
        lengths: &[usize],
        deadline: Option<Instant>,
        adapter: Option<Arc<Adapter>>,
    ) -> Reply {
        let (reply, receiver) = oneshot::channel();
        let request = Arc::new(RequestState {
            want: Want::adapted(
                EmbedOptions {
                    pooling: Pooling::Mean,
                    normalize: true,
                },
                adapter,
            ),
            priority: if bulk {
                Priority::Bulk
            } else {
                Priority::Online
            },
            deadline,
            enqueued: Instant::now(),
            collector: Mutex::new(Collector {
                results: vec![None; lengths.len()],
                remaining: lengths.len(),
                reply: Some(reply),
            }),
        });
        let mut lanes = shared.lanes();
        for (index, &len) in lengths.iter().enumerate() {
            let unit = Unit {
                request: Arc::clone(&request),
                index,
                item: Prepared::Text(TokenizedText {
                    ids: vec![1; len],
                    truncated: false,
                }),
            };
            if bulk {
                lanes.bulk.push_back(unit);
            } else {
                lanes.online.push_back(unit);
            }
        }
        receiver
    }

    fn lengths(batch: &[Unit]) -> Vec<usize> {
        batch.iter().map(|u| u.item.tokens()).collect()
    }

    #[test]
    fn online_items_go_before_bulk_items() {
        let shared = shared(4, 10_000);
        let _bulk = push(&shared, true, &[10, 10, 10], None);
        let _online = push(&shared, false, &[20, 20], None);
        let batch = next_batch(&shared).expect("a batch");
        assert_eq!(lengths(&batch), vec![20, 20, 10, 10]);
        assert_eq!(shared.lanes().len(), 1);
    }

    #[test]
    fn a_batch_closes_at_its_item_and_token_limits() {
        let shared = shared(3, 10_000);
        let _r = push(&shared, false, &[5, 5, 5, 5, 5], None);
        assert_eq!(next_batch(&shared).expect("batch").len(), 3);

        // 3 items of 40 would be 120 padded tokens, over the 100 allowed.
        let shared = super::tests::shared(10, 100);
        let _r = push(&shared, false, &[10, 40, 40, 10], None);
        assert_eq!(lengths(&next_batch(&shared).expect("batch")), vec![10, 40]);
        // A single item over the token limit still runs, alone.
        let shared = super::tests::shared(10, 100);
        let _r = push(&shared, false, &[300, 5], None);
        assert_eq!(lengths(&next_batch(&shared).expect("batch")), vec![300]);
    }

    /// Inputs of a third adapter wait for the next batch when two are the
    /// limit; more inputs of adapters already in the batch and frozen inputs
    /// still join it.
    #[test]
    fn a_batch_closes_at_its_adapter_limit() {
        let adapter = || {
            Some(Arc::new(Adapter::Lora(
                crate::backbone::bert::adapter::LoraAdapter {
                    rank: 1,
                    alpha: 1.0,
                    first_layer: 0,
                    layers: Vec::new(),
                },
            )))
        };
        let (first, second, third) = (adapter(), adapter(), adapter());
        let shared = shared(10, 10_000);
        let _a = push_adapted(&shared, false, &[1, 1], None, first.clone());
        let _b = push_adapted(&shared, false, &[2], None, second);
        let _f = push(&shared, false, &[3], None);
        let _c = push_adapted(&shared, false, &[4], None, third);
        let _d = push_adapted(&shared, false, &[5], None, first);
        assert_eq!(
            lengths(&next_batch(&shared).expect("batch")),
            vec![1, 1, 2, 3]
        );
        assert_eq!(lengths(&next_batch(&shared).expect("batch")), vec![4, 5]);
    }

    #[test]
    fn expired_and_abandoned_requests_are_dropped_before_compute() {
        let shared = shared(8, 10_000);
        let mut expired = push(
            &shared,
            false,
            &[7, 7],
            Some(Instant::now() - Duration::from_millis(1)),
        );
        let abandoned = push(&shared, false, &[8], None);
        drop(abandoned);
        let _alive = push(&shared, false, &[9], None);
        let batch = next_batch(&shared).expect("a batch");
        assert_eq!(lengths(&batch), vec![9]);
        assert!(matches!(
            expired.try_recv(),
            Ok(Err(crate::Error::DeadlineExceeded(_)))
        ));
    }

    fn test_descriptor() -> crate::backbone::BackboneDescriptor {
        crate::backbone::BackboneDescriptor {
            max_sequence_length: 512,
            ..crate::backbone::BackboneDescriptor::new("test", crate::config::Architecture::Bert, 1)
        }
    }

    /// The queue's last handle returns only once its workers have exited and
    /// released the backbone: at shutdown a GPU model is freed before the
    /// process runs the CUDA libraries' exit handlers.
    #[test]
    fn dropping_the_last_queue_handle_waits_for_the_backbone_to_be_released() {
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let backbone: Arc<dyn Backbone> = Arc::new(Fake {
            arriving: None,
            passes: Mutex::new(Vec::new()),
            released: Some(Arc::clone(&released)),
            descriptor: test_descriptor(),
        });
        let limits = shared(8, 10_000).limits;
        let queue = crate::batching::BackboneQueue::start(backbone, limits).expect("start");
        let second_handle = queue.clone();
        drop(queue);
        assert!(!released.load(std::sync::atomic::Ordering::SeqCst));
        drop(second_handle);
        assert!(released.load(std::sync::atomic::Ordering::SeqCst));
    }

    /// Returns zero vectors and records each pass's size; with `arriving`,
    /// an online request "arrives" on its first pass; with `released`, it
    /// records its release, slowly, as a GPU model's is.
    struct Fake {
        arriving: Option<Arc<Shared>>,
        passes: Mutex<Vec<usize>>,
        released: Option<Arc<std::sync::atomic::AtomicBool>>,
        descriptor: crate::backbone::BackboneDescriptor,
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            if let Some(released) = &self.released {
                // A drop that did not wait would return long before this.
                std::thread::sleep(std::time::Duration::from_millis(200));
                released.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }

    impl Backbone for Fake {
        fn descriptor(&self) -> &crate::backbone::BackboneDescriptor {
            &self.descriptor
        }

        fn prepare(
            &self,
            _index: usize,
            _input: crate::backbone::Input,
            _truncate: bool,
        ) -> Result<Prepared> {
            unreachable!("the worker never prepares")
        }

        fn pads_batches(&self) -> bool {
            true
        }

        fn embed(&self, items: &[EmbedItem<'_>]) -> Result<Vec<Vec<f32>>> {
            let mut passes = self.passes.lock().unwrap();
            if let (true, Some(shared)) = (passes.is_empty(), &self.arriving) {
                // Dropped receiver: the arriving request only needs to be waiting.
                drop(push(shared, false, &[6], None));
            }
            passes.push(items.len());
            Ok(vec![vec![0.0]; items.len()])
        }
    }

    #[test]
    fn bulk_passes_yield_to_online_work_that_arrives_meanwhile() {
        let shared = Arc::new(shared(8, 10_000));
        let mut bulk = push(&shared, true, &[5, 5, 300, 300], None);
        let batch = next_batch(&shared).expect("a batch");
        assert_eq!(batch.len(), 4);
        let backbone = Fake {
            arriving: Some(Arc::clone(&shared)),
            passes: Mutex::new(Vec::new()),
            released: None,
            descriptor: test_descriptor(),
        };
        compute(&backbone, &shared, batch);
        // One pass (the two short items), then the long ones went back in line
        // behind nothing but the online request that arrived.
        assert_eq!(*backbone.passes.lock().unwrap(), vec![2]);
        let lanes = shared.lanes();
        assert_eq!(lanes.online.len(), 1);
        assert_eq!(
            lanes
                .bulk
                .iter()
                .map(|u| u.item.tokens())
                .collect::<Vec<_>>(),
            vec![300, 300]
        );
        drop(lanes);
        assert!(
            bulk.try_recv().is_err(),
            "the bulk request is not answered yet"
        );
    }

    #[test]
    fn a_closed_and_drained_queue_ends_the_worker() {
        let shared = shared(8, 10_000);
        shared.lanes().closed = true;
        assert!(next_batch(&shared).is_none());
    }
}
