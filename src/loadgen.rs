//! `tlserve bench`: a bounded load generator for a running server. C concurrent
//! clients send Embed requests of k inputs each for T seconds or N requests
//! (whichever ends first) and the run reports throughput, latency percentiles and
//! errors by gRPC code.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::{
    client,
    proto::{self, code_name, embedder_client::EmbedderClient},
};

/// Hard bounds, whatever the options say: a load run always ends by itself.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
pub const MAX_REQUESTS: usize = 10_000_000;

pub struct LoadOptions {
    pub addr: String,
    pub backbone: String,
    pub concurrency: usize,
    pub duration: Option<Duration>,
    pub requests: Option<usize>,
    pub inputs_per_request: usize,
    /// What requests carry, cycled: texts or encoded images.
    pub corpus: Vec<proto::input::Kind>,
    pub priority: proto::Priority,
    /// A fine-tuned head whose adapted features every request asks for.
    pub head: Option<String>,
    /// Per-request deadline sent to the server.
    pub timeout: Option<Duration>,
}

#[derive(Debug, Serialize)]
pub struct LoadReport {
    pub requests: usize,
    pub ok: usize,
    pub errors: BTreeMap<String, usize>,
    pub seconds: f64,
    pub requests_per_sec: f64,
    pub inputs_per_sec: f64,
    pub concurrency: usize,
    pub inputs_per_request: usize,
    /// Latency of successful requests, milliseconds.
    pub latency_ms: Percentiles,
}

#[derive(Debug, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(mut samples: Vec<Duration>) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let rank = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1].as_secs_f64() * 1e3
        };
        Self {
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

#[derive(Default)]
struct WorkerResult {
    latencies: Vec<Duration>,
    errors: BTreeMap<String, usize>,
}

pub async fn run(options: LoadOptions) -> Result<LoadReport> {
    if options.concurrency == 0 || options.inputs_per_request == 0 {
        bail!("concurrency and inputs per request must be at least 1");
    }
    if options.corpus.is_empty() {
        bail!("no inputs to send");
    }
    if options.duration.is_none() && options.requests.is_none() {
        bail!("give a duration, a request count, or both");
    }
    let duration = options.duration.unwrap_or(MAX_DURATION).min(MAX_DURATION);
    let limit = options.requests.unwrap_or(MAX_REQUESTS).min(MAX_REQUESTS);

    let options = Arc::new(options);
    let issued = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let end = started + duration;
    let mut workers = Vec::with_capacity(options.concurrency);
    for _ in 0..options.concurrency {
        // One connection per client, as independent callers would have.
        let channel = client::connect(&options.addr).await?;
        let options = Arc::clone(&options);
        let issued = Arc::clone(&issued);
        workers.push(tokio::spawn(async move {
            let mut client = EmbedderClient::new(channel).max_decoding_message_size(usize::MAX);
            let mut result = WorkerResult::default();
            loop {
                let n = issued.fetch_add(1, Ordering::Relaxed);
                if n >= limit || Instant::now() >= end {
                    break;
                }
                let mut request = tonic::Request::new(request_for(&options, n));
                if let Some(timeout) = options.timeout {
                    request.set_timeout(timeout);
                }
                let sent = Instant::now();
                match client.embed(request).await {
                    Ok(_) => result.latencies.push(sent.elapsed()),
                    Err(status) => {
                        *result
                            .errors
                            .entry(code_name(status.code()).to_owned())
                            .or_default() += 1
                    }
                }
            }
            result
        }));
    }

    let mut latencies = Vec::new();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for worker in workers {
        let result = worker.await?;
        latencies.extend(result.latencies);
        for (code, count) in result.errors {
            *errors.entry(code).or_default() += count;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let ok = latencies.len();
    let requests = ok + errors.values().sum::<usize>();
    Ok(LoadReport {
        requests,
        ok,
        errors,
        seconds,
        requests_per_sec: requests as f64 / seconds,
        inputs_per_sec: (ok * options.inputs_per_request) as f64 / seconds,
        concurrency: options.concurrency,
        inputs_per_request: options.inputs_per_request,
        latency_ms: Percentiles::of(latencies),
    })
}

/// Request `n` takes the next k inputs of the corpus, so requests differ.
fn request_for(options: &LoadOptions, n: usize) -> proto::EmbedRequest {
    let k = options.inputs_per_request;
    let inputs = (0..k)
        .map(|i| proto::Input {
            kind: Some(options.corpus[(n * k + i) % options.corpus.len()].clone()),
        })
        .collect();
    proto::EmbedRequest {
        backbone: options.backbone.clone(),
        inputs,
        priority: options.priority as i32,
        head: options.head.clone().unwrap_or_default(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let p = Percentiles::of(samples);
        assert_eq!((p.p50, p.p95, p.p99, p.max), (50.0, 95.0, 99.0, 100.0));
        assert_eq!(Percentiles::of(vec![]).max, 0.0);
    }
}
