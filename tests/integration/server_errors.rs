//! Bad requests get a precise gRPC code and a message naming the problem, and the
//! server keeps serving afterwards.

use crate::common;

use common::*;
use tlserve::proto::{self, input::Kind};
use tonic::Code;

fn image_input() -> proto::Input {
    proto::Input {
        kind: Some(Kind::Image(vec![0x89, b'P', b'N', b'G'])),
    }
}

async fn expect_error(server: &TestServer, request: proto::EmbedRequest) -> tonic::Status {
    server
        .embedder()
        .await
        .embed(request)
        .await
        .expect_err("the request must fail")
}

#[tokio::test]
async fn bad_embed_requests_get_precise_codes_and_the_server_keeps_serving() {
    let server = TestServer::start(&TestServer::minilm_config(
        "max_inputs_per_request = 4\nmax_message_bytes = 65536",
        "max_sequence_length = 16",
    ))
    .await;

    // (request, expected code, text the message must contain)
    let mut cases: Vec<(proto::EmbedRequest, Code, &str)> = Vec::new();

    let mut unknown = embed_request(&["hello"]);
    unknown.backbone = "no-such-backbone".into();
    cases.push((unknown, Code::NotFound, "no-such-backbone"));

    let mut unnamed = embed_request(&["hello"]);
    unnamed.backbone.clear();
    cases.push((unnamed, Code::InvalidArgument, "backbone is empty"));

    cases.push((embed_request(&[]), Code::InvalidArgument, "inputs is empty"));
    cases.push((
        embed_request(&["one", "two", "three", "four", "five"]),
        Code::InvalidArgument,
        "at most 4",
    ));
    cases.push((
        embed_request(&["fine", ""]),
        Code::InvalidArgument,
        "input 1: text is empty",
    ));
    cases.push((
        embed_request(&["fine", "fine", "   "]),
        Code::InvalidArgument,
        "input 2: text is empty",
    ));

    let mut with_image = embed_request(&["fine"]);
    with_image.inputs.push(image_input());
    cases.push((with_image, Code::InvalidArgument, "input 1: backbone"));

    let mut unset = embed_request(&["fine"]);
    unset.inputs.insert(0, proto::Input { kind: None });
    cases.push((unset, Code::InvalidArgument, "input 0: no input"));

    let long = "word ".repeat(40);
    let mut refuse_long = embed_request(&["short", &long]);
    refuse_long.truncate = Some(false);
    cases.push((
        refuse_long,
        Code::InvalidArgument,
        "input 1: text is longer",
    ));

    let mut bad_pooling = embed_request(&["fine"]);
    bad_pooling.pooling = 99;
    cases.push((bad_pooling, Code::InvalidArgument, "pooling 99"));

    let huge = "x".repeat(70_000);
    cases.push((
        embed_request(&[&huge]),
        Code::ResourceExhausted,
        "max_message_bytes",
    ));

    for (request, code, fragment) in cases {
        let status = expect_error(&server, request).await;
        assert_eq!(status.code(), code, "{}", status.message());
        assert!(
            status.message().contains(fragment),
            "message {:?} lacks {fragment:?}",
            status.message()
        );
    }

    // Still serving: a normal request works, truncation by default included.
    let response = server
        .embedder()
        .await
        .embed(embed_request(&["still here", &long]))
        .await
        .expect("a valid request after the bad ones")
        .into_inner();
    assert_eq!(response.embeddings.len(), 2);
    assert!(!response.embeddings[0].truncated);
    assert!(response.embeddings[1].truncated);
    assert_eq!(response.embeddings[1].tokens, 16);
    assert_eq!(
        server.health("").await,
        Some(tonic_health::pb::health_check_response::ServingStatus::Serving)
    );
}

#[tokio::test]
async fn a_backbone_that_fails_to_load_is_reported_and_health_stays_not_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;

    let missing = tempfile::tempdir().expect("temp dir");
    let config = format!(
        "[[backbones]]\nname = \"broken\"\narchitecture = \"bert\"\n\
         source = {{ path = \"{}\" }}\n",
        missing.path().display()
    );
    let server = TestServer::spawn(&config, &[]);
    let mut models = loop {
        // The port opens before loading starts; wait until it answers.
        if server.health("").await.is_some() {
            break server.models().await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let failed = loop {
        let list = models
            .list_backbones(proto::ListBackbonesRequest {})
            .await
            .expect("ListBackbones")
            .into_inner();
        let broken = list.backbones.into_iter().next().expect("one backbone");
        if broken.state() != proto::BackboneState::Loading {
            break broken;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(failed.state(), proto::BackboneState::Failed);
    assert!(
        failed.error.contains("model.safetensors"),
        "{}",
        failed.error
    );
    assert_eq!(server.health("").await, Some(ServingStatus::NotServing));
    // The process itself is fine: liveness must not restart it in a loop.
    assert_eq!(
        server.health("liveness").await,
        Some(ServingStatus::Serving)
    );
    assert_eq!(
        server.health("tlserve.v1.Embedder").await,
        Some(ServingStatus::NotServing)
    );

    let mut request = embed_request(&["hello"]);
    request.backbone = "broken".into();
    let status = server
        .embedder()
        .await
        .embed(request)
        .await
        .expect_err("a failed backbone cannot embed");
    assert_eq!(status.code(), Code::Unavailable);
}
