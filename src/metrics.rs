//! Every metric tlserve exports, by name, and the Prometheus exporter.
//!
//! All names live here so that dashboards, alerts and code agree; a test compares
//! the deploy files against what a running server exports.

use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// gRPC calls finished, by `service`, `method` and `code` (e.g. `OK`, `NOT_FOUND`).
pub const GRPC_REQUESTS_TOTAL: &str = "tlserve_grpc_requests_total";
/// Time from a call's arrival to its final status, by `service`, `method`, `code`.
pub const GRPC_REQUEST_DURATION_SECONDS: &str = "tlserve_grpc_request_duration_seconds";
/// gRPC calls that failed because their request could not be read, by
/// `service`, `method` and `code`: a malformed body (bad gRPC-Web base64, a
/// frame cut short, a message flagged compressed without an encoding, bytes
/// that are no protobuf message) or one that did not arrive within
/// limits.message_timeout_seconds. Client mistakes: each is also counted in
/// [`GRPC_REQUESTS_TOTAL`] under the code the gRPC specification gives it
/// (INTERNAL, DEADLINE_EXCEEDED), and the error-ratio alert leaves them out.
pub const GRPC_REQUEST_READ_ERRORS_TOTAL: &str = "tlserve_grpc_request_read_errors_total";
/// The codes a request that cannot be read ends with.
pub const REQUEST_READ_ERROR_CODES: [&str; 2] = ["INTERNAL", "DEADLINE_EXCEEDED"];
/// HTTP requests answered on the HTTP port (OpenAI-compatible API, console),
/// by `route` (e.g. `/v1/embeddings`; `other` for unknown paths) and `status`.
/// gRPC-Web calls count as gRPC calls.
pub const HTTP_REQUESTS_TOTAL: &str = "tlserve_http_requests_total";
/// Time from an HTTP request's arrival to its response, by `route`, `status`.
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "tlserve_http_request_duration_seconds";
/// Duration of one forward pass, by `backbone`.
pub const INFERENCE_DURATION_SECONDS: &str = "tlserve_inference_duration_seconds";
/// Inputs computed by forward passes, by `backbone`.
pub const INFERENCE_ITEMS_TOTAL: &str = "tlserve_inference_items_total";
/// Forward passes run, by `backbone`.
pub const INFERENCE_BATCHES_TOTAL: &str = "tlserve_inference_batches_total";
/// Inputs per forward pass, by `backbone`.
pub const BATCH_ITEMS: &str = "tlserve_batch_items";
/// Distinct fine-tuned adapters per batch (0: frozen features only), by
/// `backbone`.
pub const BATCH_ADAPTERS: &str = "tlserve_batch_adapters";
/// Padded tokens per forward pass (inputs times the longest input), by `backbone`.
pub const BATCH_TOKENS: &str = "tlserve_batch_tokens";
/// Inputs waiting in a backbone's queue, by `backbone`.
pub const QUEUE_DEPTH: &str = "tlserve_queue_depth";
/// Time an input waited in the queue before its forward pass, by `backbone`.
pub const QUEUE_WAIT_SECONDS: &str = "tlserve_queue_wait_seconds";
/// Requests refused or dropped by a backbone queue, by `backbone` and `reason`
/// (`queue_full`, `deadline`, `cancelled`).
pub const QUEUE_REJECTIONS_TOTAL: &str = "tlserve_queue_rejections_total";
/// Seconds the last load of a backbone took (fetch, load, warm-up), by `backbone`.
pub const MODEL_LOAD_DURATION_SECONDS: &str = "tlserve_model_load_duration_seconds";
/// Training jobs known to the server, by `state` (queued, embedding, training,
/// succeeded, failed, cancelled).
pub const TRAINING_JOBS: &str = "tlserve_training_jobs";
/// Wall time of finished training jobs, by final `state`.
pub const TRAINING_JOB_DURATION_SECONDS: &str = "tlserve_training_job_duration_seconds";
/// Jobs of a stopped replica (killed, or drained past its grace period)
/// that this replica took over, by `outcome`: `rerun` (it runs them again)
/// or `failed` (no run was left, heads.job_attempts); and `lost`: jobs this
/// replica ran that another took over while this one was paused or cut off
/// past its lease (it stopped them and follows the new owner's record).
pub const TRAINING_JOB_TAKEOVERS_TOTAL: &str = "tlserve_training_job_takeovers_total";
/// Outcomes of a take-over (the `outcome` label of
/// [`TRAINING_JOB_TAKEOVERS_TOTAL`]).
pub const TAKEOVER_OUTCOMES: [&str; 3] = ["rerun", "failed", "lost"];
/// Head versions in the head store.
pub const HEADS: &str = "tlserve_heads";
/// Fine-tuned heads' adapters resident in memory (bounded by
/// heads.max_resident_adapters), and their bytes (bounded by
/// heads.max_resident_adapter_bytes; heads with their own top layers count
/// the serving engine's copy too).
pub const ADAPTERS_RESIDENT: &str = "tlserve_adapters_resident";
pub const ADAPTER_BYTES: &str = "tlserve_adapter_bytes";
/// Adapters read from the head store on demand (first use, or after being
/// dropped as the least recently used).
pub const ADAPTER_LOADS_TOTAL: &str = "tlserve_adapter_loads_total";
/// Resident memory of the process (Linux /proc), sampled every few seconds.
pub const PROCESS_RESIDENT_MEMORY_BYTES: &str = "tlserve_process_resident_memory_bytes";
/// CPU time the process has used, user plus system, in whole seconds.
pub const PROCESS_CPU_SECONDS_TOTAL: &str = "tlserve_process_cpu_seconds_total";
/// Panics anywhere in the process since start (each is also logged). Any
/// value above zero is a bug to report.
pub const PANICS_TOTAL: &str = "tlserve_panics_total";
/// 1 for each loaded backbone, with `backbone`, `architecture`, `device`, `dtype`
/// and `dimension` labels.
pub const BACKBONE_INFO: &str = "tlserve_backbone_info";
/// GPU memory a backbone took at load and warm-up (weights, pooled
/// activations, library workspace; not the CUDA context). Not set for CPU
/// backbones.
pub const BACKBONE_DEVICE_MEMORY_BYTES: &str = "tlserve_backbone_device_memory_bytes";
/// The metrics only a server with a GPU backbone exports.
pub const GPU_ONLY: &[&str] = &[BACKBONE_DEVICE_MEMORY_BYTES];

/// Latency buckets from 1 ms to 60 s: covers a cached single embedding as well as a
/// large batch on a slow CPU.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Powers of two up to the largest batches a backbone accepts.
const BATCH_ITEM_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
const BATCH_ADAPTER_BUCKETS: &[f64] = &[0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];
/// Training jobs take seconds to an hour.
const TRAINING_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];
const BATCH_TOKEN_BUCKETS: &[f64] = &[
    16.0, 64.0, 256.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0, 65536.0,
];

/// Installs the global recorder and returns the handle that renders it; the
/// transport serves it on the metrics port. Call once per process, inside a
/// tokio runtime (a task keeps the histograms' upkeep).
pub fn install_recorder() -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(BATCH_ITEMS.into()), BATCH_ITEM_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(BATCH_ADAPTERS.into()), BATCH_ADAPTER_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(BATCH_TOKENS.into()), BATCH_TOKEN_BUCKETS)?
        // Full matchers are tried before suffix ones.
        .set_buckets_for_metric(
            Matcher::Full(TRAINING_JOB_DURATION_SECONDS.into()),
            TRAINING_BUCKETS,
        )?
        .install_recorder()?;
    describe();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_secs(5));
        loop {
            ticks.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

fn describe() {
    describe_transport();
    describe_inference();
    describe_training();
    describe_process();
}

/// The calls of both ports.
fn describe_transport() {
    describe_counter!(GRPC_REQUESTS_TOTAL, "gRPC calls finished");
    describe_counter!(
        GRPC_REQUEST_READ_ERRORS_TOTAL,
        "gRPC calls whose request could not be read (client mistakes)"
    );
    describe_counter!(HTTP_REQUESTS_TOTAL, "HTTP requests answered");
    describe_histogram!(
        HTTP_REQUEST_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "HTTP request latency"
    );
    describe_histogram!(
        GRPC_REQUEST_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "gRPC call latency"
    );
}

/// Forward passes, their batches and queues, the backbones.
fn describe_inference() {
    describe_histogram!(
        INFERENCE_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Duration of one forward pass"
    );
    describe_counter!(INFERENCE_ITEMS_TOTAL, "Inputs computed by forward passes");
    describe_counter!(INFERENCE_BATCHES_TOTAL, "Forward passes run");
    describe_histogram!(BATCH_ITEMS, "Inputs per forward pass");
    describe_histogram!(BATCH_TOKENS, "Padded tokens per forward pass");
    describe_histogram!(BATCH_ADAPTERS, "Distinct fine-tuned adapters per batch");
    describe_gauge!(QUEUE_DEPTH, "Inputs waiting in a backbone queue");
    describe_histogram!(
        QUEUE_WAIT_SECONDS,
        metrics::Unit::Seconds,
        "Time an input waited before its forward pass"
    );
    describe_counter!(
        QUEUE_REJECTIONS_TOTAL,
        "Requests refused or dropped by a backbone queue"
    );
    describe_gauge!(
        MODEL_LOAD_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Seconds the last load of a backbone took"
    );
    describe_gauge!(BACKBONE_INFO, "Loaded backbones and their properties");
    describe_gauge!(
        BACKBONE_DEVICE_MEMORY_BYTES,
        metrics::Unit::Bytes,
        "GPU memory each backbone took at load"
    );
}

/// Training jobs, heads and the adapters of fine-tuned heads.
fn describe_training() {
    describe_gauge!(TRAINING_JOBS, "Training jobs by state");
    describe_histogram!(
        TRAINING_JOB_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Wall time of finished training jobs"
    );
    describe_counter!(
        TRAINING_JOB_TAKEOVERS_TOTAL,
        "Jobs of stopped replicas taken over, by outcome"
    );
    for outcome in TAKEOVER_OUTCOMES {
        counter!(TRAINING_JOB_TAKEOVERS_TOTAL, "outcome" => outcome).absolute(0);
    }
    describe_gauge!(HEADS, "Head versions in the head store");
    describe_gauge!(ADAPTERS_RESIDENT, "Fine-tuned adapters resident in memory");
    describe_gauge!(ADAPTER_BYTES, "Bytes of the resident fine-tuned adapters");
    describe_counter!(
        ADAPTER_LOADS_TOTAL,
        "Adapters read from the head store on demand"
    );
}

/// The process itself.
fn describe_process() {
    describe_gauge!(
        PROCESS_RESIDENT_MEMORY_BYTES,
        metrics::Unit::Bytes,
        "Resident memory of the process"
    );
    describe_counter!(PANICS_TOTAL, "Panics since the process started");
    counter!(PANICS_TOTAL).absolute(0);
    describe_counter!(
        PROCESS_CPU_SECONDS_TOTAL,
        metrics::Unit::Seconds,
        "CPU time used by the process"
    );
}

/// Reasons a backbone queue refuses or drops a request (the `reason` label of
/// [`QUEUE_REJECTIONS_TOTAL`]).
pub const REJECTION_REASONS: [&str; 3] = ["queue_full", "deadline", "cancelled"];

// Series exported from zero. A counter that first appears at 1 has no earlier
// sample, so `increase()` and `rate()` miss the first event of a fresh pod
// (the first failed job, the first refused request); every series the
// dashboard and the alerts count from is therefore registered at start.

/// `service/method`'s call counts for each of `codes` at zero, and its
/// latency histogram for `OK`.
pub fn register_grpc_method(service: &str, method: &str, codes: &[&'static str]) {
    for &code in codes {
        let labels = [
            ("service", service.to_owned()),
            ("method", method.to_owned()),
            ("code", code.to_owned()),
        ];
        counter!(GRPC_REQUESTS_TOTAL, &labels).increment(0);
        if code == "OK" {
            let _ = histogram!(GRPC_REQUEST_DURATION_SECONDS, &labels);
        }
        if REQUEST_READ_ERROR_CODES.contains(&code) {
            counter!(GRPC_REQUEST_READ_ERRORS_TOTAL, &labels).increment(0);
        }
    }
}

/// An HTTP route's series, at zero (`status` 200).
pub fn register_http_route(route: &'static str) {
    let labels = [("route", route.to_owned()), ("status", "200".to_owned())];
    counter!(HTTP_REQUESTS_TOTAL, &labels).increment(0);
    let _ = histogram!(HTTP_REQUEST_DURATION_SECONDS, &labels);
}

/// A backbone queue's series: passes, inputs and rejections for every reason
/// at zero, its histograms empty, its depth 0.
pub fn register_backbone(backbone: &str) {
    let labels = [("backbone", backbone.to_owned())];
    counter!(INFERENCE_ITEMS_TOTAL, &labels).increment(0);
    counter!(INFERENCE_BATCHES_TOTAL, &labels).increment(0);
    for name in [
        INFERENCE_DURATION_SECONDS,
        BATCH_ITEMS,
        BATCH_TOKENS,
        BATCH_ADAPTERS,
        QUEUE_WAIT_SECONDS,
    ] {
        let _ = histogram!(name, &labels);
    }
    for reason in REJECTION_REASONS {
        counter!(QUEUE_REJECTIONS_TOTAL, "backbone" => backbone.to_owned(), "reason" => reason)
            .increment(0);
    }
    set_queue_depth(backbone, 0);
}

/// The duration histograms of jobs ending in each of `states`, empty.
pub fn register_training_job_states(states: &[&'static str]) {
    for &state in states {
        let _ = histogram!(TRAINING_JOB_DURATION_SECONDS, "state" => state);
    }
}

pub fn record_grpc(service: &str, method: &str, code: &'static str, elapsed: Duration) {
    let labels = [
        ("service", service.to_owned()),
        ("method", method.to_owned()),
        ("code", code.to_owned()),
    ];
    counter!(GRPC_REQUESTS_TOTAL, &labels).increment(1);
    histogram!(GRPC_REQUEST_DURATION_SECONDS, &labels).record(elapsed.as_secs_f64());
}

/// A call that failed on a request that could not be read.
pub fn record_grpc_request_read_error(service: &str, method: &str, code: &'static str) {
    let labels = [
        ("service", service.to_owned()),
        ("method", method.to_owned()),
        ("code", code.to_owned()),
    ];
    counter!(GRPC_REQUEST_READ_ERRORS_TOTAL, &labels).increment(1);
}

pub fn record_http(route: &'static str, status: u16, elapsed: Duration) {
    let labels = [("route", route.to_owned()), ("status", status.to_string())];
    counter!(HTTP_REQUESTS_TOTAL, &labels).increment(1);
    histogram!(HTTP_REQUEST_DURATION_SECONDS, &labels).record(elapsed.as_secs_f64());
}

pub fn record_forward_pass(backbone: &str, items: usize, padded_tokens: usize, elapsed: Duration) {
    let labels = [("backbone", backbone.to_owned())];
    histogram!(INFERENCE_DURATION_SECONDS, &labels).record(elapsed.as_secs_f64());
    counter!(INFERENCE_ITEMS_TOTAL, &labels).increment(items as u64);
    counter!(INFERENCE_BATCHES_TOTAL, &labels).increment(1);
    histogram!(BATCH_ITEMS, &labels).record(items as f64);
    histogram!(BATCH_TOKENS, &labels).record(padded_tokens as f64);
}

pub fn record_batch_adapters(backbone: &str, adapters: usize) {
    histogram!(BATCH_ADAPTERS, "backbone" => backbone.to_owned()).record(adapters as f64);
}

pub fn set_queue_depth(backbone: &str, items: usize) {
    gauge!(QUEUE_DEPTH, "backbone" => backbone.to_owned()).set(items as f64);
}

pub fn record_queue_wait(backbone: &str, waited: Duration) {
    histogram!(QUEUE_WAIT_SECONDS, "backbone" => backbone.to_owned()).record(waited.as_secs_f64());
}

pub fn record_queue_rejection(backbone: &str, reason: &'static str) {
    counter!(QUEUE_REJECTIONS_TOTAL, "backbone" => backbone.to_owned(), "reason" => reason)
        .increment(1);
}

/// What `tlserve_backbone_info` says of a loaded backbone.
pub struct BackboneLabels<'a> {
    pub name: &'a str,
    pub architecture: &'static str,
    pub device: &'a str,
    pub dtype: &'a str,
    pub dimension: usize,
}

pub fn record_backbone_loaded(backbone: BackboneLabels<'_>, elapsed: Duration) {
    gauge!(MODEL_LOAD_DURATION_SECONDS, "backbone" => backbone.name.to_owned())
        .set(elapsed.as_secs_f64());
    gauge!(
        BACKBONE_INFO,
        "backbone" => backbone.name.to_owned(),
        "architecture" => backbone.architecture,
        "device" => backbone.device.to_owned(),
        "dtype" => backbone.dtype.to_owned(),
        "dimension" => backbone.dimension.to_string(),
    )
    .set(1.0);
}

pub fn record_backbone_device_memory(backbone: &str, device: &str, bytes: u64) {
    gauge!(
        BACKBONE_DEVICE_MEMORY_BYTES,
        "backbone" => backbone.to_owned(),
        "device" => device.to_owned(),
    )
    .set(bytes as f64);
}

pub fn set_training_jobs(state: &'static str, count: usize) {
    gauge!(TRAINING_JOBS, "state" => state).set(count as f64);
}

/// One job of a stopped replica taken over; `outcome` is one of
/// [`TAKEOVER_OUTCOMES`].
pub fn record_takeover(outcome: &'static str) {
    counter!(TRAINING_JOB_TAKEOVERS_TOTAL, "outcome" => outcome).increment(1);
}

pub fn record_training_job(state: &'static str, elapsed: Duration) {
    histogram!(TRAINING_JOB_DURATION_SECONDS, "state" => state).record(elapsed.as_secs_f64());
}

pub fn set_resident_adapters(count: usize, bytes: usize) {
    gauge!(ADAPTERS_RESIDENT).set(count as f64);
    gauge!(ADAPTER_BYTES).set(bytes as f64);
}

pub fn record_adapter_loads(loads: u64) {
    counter!(ADAPTER_LOADS_TOTAL).increment(loads);
}

pub fn set_heads(count: usize) {
    gauge!(HEADS).set(count as f64);
}

/// Samples process memory and CPU time every `every` while the runtime runs.
/// Linux only: elsewhere the task finds no /proc and exports nothing.
pub fn spawn_process_sampler(every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(every);
        loop {
            ticker.tick().await;
            if let Some(bytes) = resident_memory_bytes() {
                gauge!(PROCESS_RESIDENT_MEMORY_BYTES).set(bytes as f64);
            }
            if let Some(seconds) = cpu_seconds() {
                counter!(PROCESS_CPU_SECONDS_TOTAL).absolute(seconds);
            }
        }
    })
}

/// `VmRSS` of /proc/self/status, which states its unit (kB).
fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// utime + stime of /proc/self/stat (all threads), in clock ticks of 1/100 s:
/// USER_HZ is 100 on every mainstream Linux architecture.
fn cpu_seconds() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may contain spaces; fields are counted after its ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100)
}

/// Counts and logs every panic (then runs the previous hook, which prints it).
/// A panic inside a request or a forward pass fails that call, not the server;
/// this makes each one visible to operators and to the tests.
pub fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        counter!(PANICS_TOTAL).increment(1);
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(
            location,
            thread = std::thread::current().name().unwrap_or("?"),
            "panic"
        );
        previous(info);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_figures_are_read_from_proc() {
        let rss = resident_memory_bytes().expect("VmRSS");
        assert!(
            rss > 1024 * 1024,
            "a test process uses more than 1 MiB: {rss}"
        );
        // Burn a little CPU so the figure is not trivially zero-or-garbage.
        let mut x = 0u64;
        for i in 0..10_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_seconds().is_some());
    }
}
