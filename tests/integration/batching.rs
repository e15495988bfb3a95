//! Dynamic batching against the real server: concurrent requests share forward
//! passes and each still gets its own, correct vectors in input order; a full
//! queue refuses at once; expired deadlines never reach the model. Also the load
//! generator, bounded, on loopback.

use crate::common;

use std::time::Duration;

use common::*;
use tlserve::backbone::{Backbone, EmbedItem, Input};
use tonic::Code;

/// Vectors of the same model and inputs computed alone, batched or not, agree
/// this closely (float32 sums in a different order over padded shapes).
const MAX_ABS_DIFF: f32 = 1e-5;

/// Each text embedded alone, in a forward pass of its own.
fn unbatched(model: &dyn Backbone, texts: &[String]) -> Vec<Vec<f32>> {
    let options = model.descriptor().default_options;
    texts
        .iter()
        .map(|text| {
            let prepared = model
                .prepare(0, Input::Text(text.clone()), true)
                .expect("prepare");
            model
                .embed(&[EmbedItem::frozen(&prepared, options)])
                .expect("embed")
                .remove(0)
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

const BATCHES: &str = r#"tlserve_inference_batches_total{backbone="all-MiniLM-L6-v2"}"#;

#[tokio::test]
async fn concurrent_requests_share_forward_passes_and_get_their_own_vectors() {
    concurrent_requests("max_batch_size = 16\nmax_queue_delay_ms = 20").await;
}

/// Two workers, each with a one-thread pool, taking batches from one queue.
#[tokio::test]
async fn several_workers_share_one_queue() {
    let scrape = concurrent_requests(
        "max_batch_size = 4\nmax_queue_delay_ms = 20\nworkers = 2\nthreads_per_worker = 1",
    )
    .await;
    // 24 single-text requests in batches of at most 4.
    assert!(metric(&scrape, BATCHES) >= 6.0);
}

/// 24 concurrent one-text requests: each gets its own vector, and they share
/// passes. Returns the server's metrics afterwards.
async fn concurrent_requests(backbone_settings: &str) -> String {
    const REQUESTS: usize = 24;
    let server = TestServer::start(&TestServer::minilm_config("", backbone_settings)).await;
    let texts: Vec<String> = sentences().into_iter().take(REQUESTS).collect();
    assert_eq!(texts.len(), REQUESTS);
    let expected = unbatched(load_minilm().as_ref(), &texts);

    let mut calls = Vec::new();
    for text in texts.clone() {
        let mut client = server.embedder().await;
        calls.push(tokio::spawn(async move {
            client.embed(embed_request(&[&text])).await
        }));
    }
    for (i, call) in calls.into_iter().enumerate() {
        let response = call.await.expect("join").expect("Embed").into_inner();
        let got = &response.embeddings[0].values;
        let diff = max_abs_diff(got, &expected[i]);
        assert!(diff < MAX_ABS_DIFF, "request {i} differs by {diff}");
    }

    let scrape = server.scrape();
    let passes = metric(&scrape, BATCHES);
    assert!(
        passes >= 1.0 && passes < REQUESTS as f64,
        "{REQUESTS} requests took {passes} forward passes"
    );
    let items = metric(
        &scrape,
        r#"tlserve_inference_items_total{backbone="all-MiniLM-L6-v2"}"#,
    );
    assert_eq!(items, REQUESTS as f64);
    scrape
}

/// On both engines: the candle engine pads a pass to its longest text, so the
/// batcher splits by length; the native engine packs texts, so it does not.
#[tokio::test]
async fn a_request_mixing_long_and_short_texts_keeps_input_order() {
    for (engine, split) in [("candle", true), ("native", false)] {
        mixed_lengths_keep_input_order(engine, split).await;
    }
}

async fn mixed_lengths_keep_input_order(engine: &str, split: bool) {
    let server = TestServer::start(&TestServer::minilm_config(
        "",
        &format!("engine = \"{engine}\""),
    ))
    .await;
    let corpus = sentences();
    let long: Vec<String> = corpus
        .iter()
        .filter(|s| s.split_whitespace().count() > 100)
        .cloned()
        .collect();
    let short: Vec<String> = corpus
        .iter()
        .filter(|s| s.split_whitespace().count() < 10)
        .cloned()
        .collect();
    assert!(long.len() >= 2 && short.len() >= 3);
    // short, long, short, long, short ...: sorting by length inside the batch must
    // not leak into the response order.
    let texts = vec![
        short[0].clone(),
        long[0].clone(),
        short[1].clone(),
        long[1].clone(),
        short[2].clone(),
    ];
    let expected = unbatched(load_minilm_on(engine).as_ref(), &texts);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let response = server
        .embedder()
        .await
        .embed(embed_request(&refs))
        .await
        .expect("Embed")
        .into_inner();
    assert_eq!(response.embeddings.len(), texts.len());
    for (i, embedding) in response.embeddings.iter().enumerate() {
        let diff = max_abs_diff(&embedding.values, &expected[i]);
        assert!(diff < MAX_ABS_DIFF, "{engine}: input {i} differs by {diff}");
    }
    let passes = metric(&server.scrape(), BATCHES);
    if split {
        // The long texts went through separate, longer passes than the short ones.
        assert!(
            passes >= 2.0,
            "{engine}: expected a split by length, got {passes} pass"
        );
    } else {
        assert_eq!(passes, 1.0, "{engine}: packed texts need no split");
    }
}

#[tokio::test]
async fn a_full_queue_refuses_at_once_and_the_server_keeps_serving() {
    let _timing = common::timing_sensitive().await;
    // Four queued inputs fill the queue; the long delay holds them there.
    let server = TestServer::start(&TestServer::minilm_config(
        "max_inputs_per_request = 4",
        "max_queue_items = 4\nmax_batch_size = 8\nmax_queue_delay_ms = 1500",
    ))
    .await;
    let mut first_client = server.embedder().await;
    let first = tokio::spawn(async move {
        first_client
            .embed(embed_request(&["one", "two", "three", "four"]))
            .await
    });
    // Let the first request reach the queue.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = std::time::Instant::now();
    let status = server
        .embedder()
        .await
        .embed(embed_request(&["five"]))
        .await
        .expect_err("the queue is full");
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{}",
        status.message()
    );
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "refused at once, not after waiting for room"
    );

    let response = first
        .await
        .expect("join")
        .expect("the queued request is served");
    assert_eq!(response.into_inner().embeddings.len(), 4);
    let response = server
        .embedder()
        .await
        .embed(embed_request(&["after the overload"]))
        .await
        .expect("serving again");
    assert_eq!(response.into_inner().embeddings.len(), 1);
    let scrape = server.scrape();
    assert_eq!(
        metric(
            &scrape,
            r#"tlserve_queue_rejections_total{backbone="all-MiniLM-L6-v2",reason="queue_full"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn expired_deadlines_never_reach_the_model() {
    let server = TestServer::start(&TestServer::minilm_config(
        "",
        "max_queue_delay_ms = 1000\nmax_batch_size = 64",
    ))
    .await;
    let mut client = server.embedder().await;
    // tonic's client enforces a deadline itself and reports CANCELLED ("Timeout
    // expired") when it fires first; grpc-go, grpc-java and grpcio report
    // DEADLINE_EXCEEDED. What the server answered is in its metrics below.
    let deadline_codes = [Code::DeadlineExceeded, Code::Cancelled];

    // Already expired on arrival.
    let mut request = tonic::Request::new(embed_request(&["too late"]));
    request.set_timeout(Duration::from_nanos(1));
    let status = client.embed(request).await.expect_err("expired");
    assert!(deadline_codes.contains(&status.code()), "{status:?}");

    // Expires while waiting in the queue (held by the 1 s batching delay).
    let mut request = tonic::Request::new(embed_request(&["also too late"]));
    request.set_timeout(Duration::from_millis(200));
    let status = client
        .embed(request)
        .await
        .expect_err("expired in the queue");
    assert!(deadline_codes.contains(&status.code()), "{status:?}");

    // Give the worker time to reach the abandoned item and drop it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let scrape = server.scrape();
    assert_eq!(metric(&scrape, BATCHES), 0.0, "no forward pass ran");
    assert_eq!(
        metric(
            &scrape,
            r#"tlserve_grpc_requests_total{service="tlserve.v1.Embedder",method="Embed",code="DEADLINE_EXCEEDED"}"#
        ),
        2.0,
        "the server answered DEADLINE_EXCEEDED both times"
    );
    assert_eq!(
        metric(
            &scrape,
            r#"tlserve_queue_rejections_total{backbone="all-MiniLM-L6-v2",reason="cancelled"}"#
        ),
        1.0,
        "the queued item was dropped unseen by the model"
    );

    // A request with time to spare is served.
    let mut request = tonic::Request::new(embed_request(&["in time"]));
    request.set_timeout(Duration::from_secs(30));
    client
        .embed(request)
        .await
        .expect("served within its deadline");
}

#[tokio::test]
async fn the_load_generator_reports_throughput_latency_and_codes() {
    let server = TestServer::start_minilm().await;
    let run = |backbone: &str| {
        load_report(
            &server,
            &[
                "--backbone",
                backbone,
                "--concurrency",
                "4",
                "--requests",
                "24",
                "--inputs-per-request",
                "2",
                "--duration-seconds",
                "60",
            ],
        )
    };

    let report = run(MINILM);
    assert_eq!(report["requests"], 24);
    assert_eq!(report["ok"], 24);
    assert_eq!(report["errors"], serde_json::json!({}));
    let latency = &report["latency_ms"];
    let (p50, p99) = (
        latency["p50"].as_f64().unwrap(),
        latency["p99"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p50 <= p99, "{latency}");
    assert!(report["inputs_per_sec"].as_f64().unwrap() > 0.0);

    let report = run("no-such-backbone");
    assert_eq!(report["ok"], 0);
    assert_eq!(report["errors"]["NOT_FOUND"], 24);
}
