//! The server's life cycle and what operators see: Health per service, graceful
//! shutdown on SIGTERM, the metrics port and request ids.

use crate::common;

use std::time::Duration;

use common::*;
use tlserve::proto;
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test]
async fn health_reports_every_service_and_listing_describes_the_backbone() {
    let server = TestServer::start_minilm().await;
    for service in [
        "",
        "tlserve.v1.Embedder",
        "tlserve.v1.Models",
        "tlserve.v1.Trainer",
        "tlserve.v1.Predictor",
    ] {
        assert_eq!(
            server.health(service).await,
            Some(ServingStatus::Serving),
            "{service}"
        );
    }

    let list = server
        .models()
        .await
        .list_backbones(proto::ListBackbonesRequest {})
        .await
        .expect("ListBackbones")
        .into_inner();
    assert_eq!(list.backbones.len(), 1);
    let info = &list.backbones[0];
    assert_eq!(info.name, MINILM);
    assert_eq!(info.architecture, "bert");
    assert_eq!(info.state(), proto::BackboneState::Ready);
    assert_eq!(info.modality(), proto::Modality::Text);
    assert_eq!(info.dimension, 384);
    assert_eq!(info.max_sequence_length, 256);
    assert_eq!(info.device, "cpu");
    // `precision = "auto"`: bf16 where the CPU has AMX-BF16, f32 elsewhere.
    assert_eq!(info.dtype, default_text_dtype());
    assert_eq!(info.default_pooling(), proto::Pooling::Mean);
    assert!(info.default_normalize);
    // sha256 of the real model.safetensors, as pinned by scripts/fetch-models.sh.
    assert_eq!(
        info.fingerprint,
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    );
}

#[tokio::test]
async fn sigterm_drains_finishes_in_flight_calls_and_exits_cleanly() {
    let mut server = TestServer::spawn(
        &TestServer::minilm_config("", ""),
        &[("TLSERVE__SERVER__DRAIN_DELAY_SECONDS", "1.5")],
    );
    server.wait_until(ServingStatus::Serving).await;

    // A request that takes a while: many long texts in one forward pass.
    let long = "a fairly long sentence about transfer learning and serving ".repeat(20);
    let texts: Vec<&str> = std::iter::repeat_n(long.as_str(), 32).collect();
    let request = embed_request(&texts);
    let mut client = server.embedder().await;
    let in_flight = tokio::spawn(async move { client.embed(request).await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    server.terminate();
    // During the drain delay the server still answers Health, with NOT_SERVING.
    let mut saw_not_serving = false;
    for _ in 0..20 {
        if server.health("").await == Some(ServingStatus::NotServing) {
            saw_not_serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        saw_not_serving,
        "Health did not turn NOT_SERVING:\n{}",
        server.logs()
    );
    // Liveness stays SERVING while draining: nothing should restart the pod now.
    assert_eq!(
        server.health("liveness").await,
        Some(ServingStatus::Serving)
    );

    let response = match in_flight.await.expect("join") {
        Ok(response) => response.into_inner(),
        Err(status) => panic!(
            "the in-flight call failed during shutdown: {status:?}\n{}",
            server.logs()
        ),
    };
    assert_eq!(response.embeddings.len(), 32);

    let code = tokio::task::spawn_blocking(move || {
        let code = server.wait_exit(Duration::from_secs(60));
        (code, server.logs())
    })
    .await
    .expect("join");
    assert_eq!(code.0, Some(0), "exit code; logs:\n{}", code.1);
    assert!(code.1.contains("server stopped"), "{}", code.1);
}

#[tokio::test]
async fn metrics_count_calls_by_code_and_describe_backbones() {
    let server = TestServer::start_minilm().await;
    let mut client = server.embedder().await;
    client
        .embed(embed_request(&["one", "two"]))
        .await
        .expect("Embed");
    let mut unknown = embed_request(&["x"]);
    unknown.backbone = "nope".into();
    client.embed(unknown).await.expect_err("NOT_FOUND");

    let text = server.scrape();
    for expected in [
        r#"tlserve_grpc_requests_total{service="tlserve.v1.Embedder",method="Embed",code="OK"} 1"#,
        r#"tlserve_grpc_requests_total{service="tlserve.v1.Embedder",method="Embed",code="NOT_FOUND"} 1"#,
        r#"tlserve_grpc_request_duration_seconds_bucket{service="tlserve.v1.Embedder",method="Embed",code="OK",le="+Inf"} 1"#,
        r#"tlserve_inference_duration_seconds_count{backbone="all-MiniLM-L6-v2"}"#,
        r#"tlserve_inference_items_total{backbone="all-MiniLM-L6-v2"} 2"#,
        r#"tlserve_inference_batches_total{backbone="all-MiniLM-L6-v2"} 1"#,
        r#"tlserve_model_load_duration_seconds{backbone="all-MiniLM-L6-v2"}"#,
        format!(
            r#"tlserve_backbone_info{{backbone="all-MiniLM-L6-v2",architecture="bert",device="cpu",dtype="{}",dimension="384"}} 1"#,
            default_text_dtype()
        )
        .as_str(),
        "tlserve_process_resident_memory_bytes ",
        "tlserve_process_cpu_seconds_total ",
    ] {
        assert!(text.contains(expected), "missing {expected} in:\n{text}");
    }
}

#[tokio::test]
async fn the_request_id_is_echoed_or_generated() {
    let server = TestServer::start_minilm().await;
    let mut client = server.embedder().await;

    let mut request = tonic::Request::new(embed_request(&["hello"]));
    request
        .metadata_mut()
        .insert("x-request-id", "test-req-42".parse().expect("ascii"));
    let response = client.embed(request).await.expect("Embed");
    assert_eq!(
        response
            .metadata()
            .get("x-request-id")
            .map(|v| v.to_str().ok()),
        Some(Some("test-req-42"))
    );

    let response = client
        .embed(embed_request(&["hello"]))
        .await
        .expect("Embed");
    let generated = response
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("a generated request id");
    assert_eq!(generated.len(), 36, "a uuid: {generated}");
    assert!(server.logs().contains("test-req-42"));
}

/// What the default precision of a BERT backbone resolves to on this CPU.
fn default_text_dtype() -> &'static str {
    tlserve::nn::resolve_precision(tlserve::config::Precision::Auto).as_str()
}
