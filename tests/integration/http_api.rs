//! The HTTP port and gRPC-Web against a real server on loopback: the official
//! `openai` Python package gets the vectors gRPC Embed gives; errors come in
//! OpenAI's shape with the matching status; tokens, limits, request ids and
//! metrics hold as on the gRPC port; gRPC-Web calls (binary and base64 text)
//! on both ports answer what gRPC does; the console's files are served.

use crate::common;

use std::{net::SocketAddr, process::Command};

use base64::Engine;
use common::{http_client::*, *};
use prost::Message;
use serde_json::{json, Value};
use tlserve::proto;

const SAMPLE: [&str; 2] = [
    "A cat sits on the mat.",
    "Stock markets fell sharply today.",
];
const INFER_TOKEN: &str = "infer-token-0123456789";
const TRAIN_TOKEN: &str = "train-token-0123456789";

fn post_json(addr: SocketAddr, path: &str, body: &Value, token: Option<&str>) -> Answer {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(bearer) = &bearer {
        headers.push(("authorization", bearer.as_str()));
    }
    request(addr, "POST", path, &headers, body.to_string().as_bytes())
}

/// Runs tests/clients/openai_embed.py (the `openai` package) with `args`.
fn openai_sdk(server: &TestServer, args: &[&str], token: Option<&str>) -> (i32, Value) {
    let mut command = Command::new(python());
    command
        .arg(repo_file("tests/clients/openai_embed.py"))
        .arg("--base-url")
        .arg(format!("http://{}/v1", server.http))
        .args(args);
    if let Some(token) = token {
        command.env("TLSERVE_TOKEN", token);
    }
    let output = command.output().expect("run the openai client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let parsed = serde_json::from_str(stdout.trim()).unwrap_or_else(|err| {
        panic!(
            "openai client printed no JSON ({err}): {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.code().unwrap_or(-1), parsed)
}

fn vectors(value: &Value) -> Vec<Vec<f32>> {
    serde_json::from_value(value.clone()).expect("a list of float lists")
}

fn max_difference(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

async fn grpc_embed(server: &TestServer) -> proto::EmbedResponse {
    server
        .embedder()
        .await
        .embed(embed_request(&SAMPLE))
        .await
        .expect("Embed")
        .into_inner()
}

fn token_ids(text: &str) -> String {
    let mut tokenizer =
        tokenizers::Tokenizer::from_file(minilm_dir().join("tokenizer.json")).expect("tokenizer");
    // tokenizer.json pads to 128: ids sent are all the model sees, so none.
    tokenizer.with_padding(None);
    let encoding = tokenizer.encode(text, true).expect("encode");
    let ids: Vec<String> = encoding.get_ids().iter().map(u32::to_string).collect();
    ids.join(",")
}

#[tokio::test]
async fn the_openai_sdk_gets_the_vectors_of_grpc_embed() {
    let server = TestServer::start_minilm().await;
    let expected = grpc_embed(&server).await;
    let expected_vectors: Vec<Vec<f32>> = expected
        .embeddings
        .iter()
        .map(|e| e.values.clone())
        .collect();
    let tokens: u64 = expected
        .embeddings
        .iter()
        .map(|e| u64::from(e.tokens))
        .sum();

    // The SDK's default (base64, decoded by the SDK) and plain JSON floats.
    for format in [None, Some("float")] {
        let mut args = vec!["--model", MINILM];
        if let Some(format) = format {
            args.extend(["--encoding-format", format]);
        }
        args.extend(SAMPLE);
        let (code, answer) = openai_sdk(&server, &args, None);
        assert_eq!(code, 0, "{answer}");
        assert_eq!(answer["model"], MINILM);
        assert_eq!(answer["usage"]["prompt_tokens"], tokens);
        // Same server, same forward pass: only float printing may differ.
        let difference = max_difference(&vectors(&answer["embeddings"]), &expected_vectors);
        assert!(difference < 1e-6, "{format:?}: differs by {difference}");
    }

    // Token ids of the backbone's own tokenizer are the text as the model sees it.
    let ids: Vec<String> = SAMPLE.iter().map(|t| token_ids(t)).collect();
    let mut args = vec!["--model", MINILM, "--token-ids"];
    args.extend(ids.iter().map(String::as_str));
    let (code, answer) = openai_sdk(&server, &args, None);
    assert_eq!(code, 0, "{answer}");
    let difference = max_difference(&vectors(&answer["embeddings"]), &expected_vectors);
    assert!(difference < 1e-6, "token ids: differs by {difference}");

    // Errors reach the SDK as its own exception types.
    let (code, answer) = openai_sdk(&server, &["--model", "text-embedding-3-small", "x"], None);
    assert_eq!(code, 2);
    assert_eq!(answer["error"], "NotFoundError", "{answer}");
    let (code, answer) = openai_sdk(
        &server,
        &["--model", MINILM, "--dimensions", "128", "x"],
        None,
    );
    assert_eq!(code, 2);
    assert_eq!(answer["error"], "BadRequestError", "{answer}");
}

#[tokio::test]
async fn http_errors_have_the_openai_shape_and_status() {
    let server =
        TestServer::start(&TestServer::minilm_config("max_message_bytes = 4096", "")).await;
    let embeddings = |body: Value| post_json(server.http, "/v1/embeddings", &body, None);
    let cases = [
        (
            json!({"model": "nope", "input": "x"}),
            404,
            Some("model_not_found"),
        ),
        (json!({"model": MINILM, "input": []}), 400, None),
        (json!({"model": MINILM, "input": ""}), 400, None),
        (json!({"model": MINILM, "input": [1, "mixed"]}), 400, None),
        (json!({"model": MINILM, "input": [[999999999]]}), 400, None),
        (
            json!({"model": MINILM, "input": "x", "dimensions": 7}),
            400,
            None,
        ),
        (
            json!({"model": MINILM, "input": "x", "encoding_format": "hex"}),
            400,
            None,
        ),
        (json!({"input": "x"}), 400, None),
        (
            json!({"model": MINILM, "input": "x".repeat(5000)}),
            413,
            None,
        ),
    ];
    for (body, status, code) in cases {
        let answer = embeddings(body.clone());
        assert_eq!(
            answer.status,
            status,
            "{body}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        let error = &answer.json()["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{error}"
        );
        assert!(error["type"].is_string(), "{error}");
        if let Some(code) = code {
            assert_eq!(error["code"], code);
        }
        assert!(answer.header("x-request-id").is_some());
    }
    let json_type = [("content-type", "application/json")];
    let malformed = request(
        server.http,
        "POST",
        "/v1/embeddings",
        &json_type,
        b"{not json",
    );
    assert_eq!(malformed.status, 400);
    let unknown = request(server.http, "GET", "/v2/anything", &[], b"");
    assert_eq!(unknown.status, 404);
    assert!(unknown.json()["error"]["message"].is_string());

    // A client's request id comes back; a good call answers in OpenAI's shape.
    let answer = request(
        server.http,
        "POST",
        "/v1/embeddings",
        &[
            ("x-request-id", "client-chosen-id-42"),
            ("content-type", "application/json"),
        ],
        json!({"model": MINILM, "input": SAMPLE[0]})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-request-id"), Some("client-chosen-id-42"));
    let body = answer.json();
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"][0]["object"], "embedding");
    assert_eq!(body["data"][0]["index"], 0);
    assert_eq!(
        body["data"][0]["embedding"].as_array().map(Vec::len),
        Some(384)
    );

    let models = request(server.http, "GET", "/v1/models", &[], b"").json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MINILM);
    assert_eq!(models["data"][0]["object"], "model");

    // Counted per route and status.
    let scrape = server.scrape();
    let ok = r#"tlserve_http_requests_total{route="/v1/embeddings",status="200"}"#;
    assert!(metric(&scrape, ok) >= 1.0, "{scrape}");
    let not_found = r#"tlserve_http_requests_total{route="/v1/embeddings",status="404"}"#;
    assert!(metric(&scrape, not_found) >= 1.0);
    assert!(
        metric(
            &scrape,
            r#"tlserve_http_requests_total{route="other",status="404"}"#
        ) >= 1.0
    );
}

async fn start_with_tokens() -> TestServer {
    let tail = format!(
        "{}\n[auth]\nenabled = true\n",
        TestServer::minilm_config("", "")
    );
    let tokens = format!("web infer {INFER_TOKEN}; trainer train {TRAIN_TOKEN}");
    let server = TestServer::spawn(&tail, &[("TLSERVE_AUTH_TOKENS", tokens.as_str())]);
    server
        .wait_until(tonic_health::pb::health_check_response::ServingStatus::Serving)
        .await;
    server
}

#[tokio::test]
async fn tokens_and_roles_guard_the_http_port() {
    let server = start_with_tokens().await;
    let body = json!({"model": MINILM, "input": SAMPLE[0]});
    let none = post_json(server.http, "/v1/embeddings", &body, None);
    assert_eq!(none.status, 401);
    assert_eq!(none.json()["error"]["code"], "invalid_api_key");
    let wrong = post_json(
        server.http,
        "/v1/embeddings",
        &body,
        Some("wrong-token-0123456789"),
    );
    assert_eq!(wrong.status, 401);
    let train_only = post_json(server.http, "/v1/embeddings", &body, Some(TRAIN_TOKEN));
    assert_eq!(train_only.status, 403);
    assert_eq!(train_only.json()["error"]["type"], "permission_error");
    let allowed = post_json(server.http, "/v1/embeddings", &body, Some(INFER_TOKEN));
    assert_eq!(allowed.status, 200);
    assert_eq!(
        request(server.http, "GET", "/v1/models", &[], b"").status,
        401
    );
    let (code, answer) = openai_sdk(&server, &["--model", MINILM, "x"], Some(INFER_TOKEN));
    assert_eq!(code, 0, "{answer}");
    let (code, answer) = openai_sdk(&server, &["--model", MINILM, "x"], None);
    assert_eq!(
        (code, answer["error"].as_str()),
        (2, Some("AuthenticationError"))
    );

    // The console's files hold no data: served without a token.
    let page = request(
        server.http,
        "GET",
        "/console/proto/tlserve/v1/trainer.proto",
        &[],
        b"",
    );
    assert_eq!(page.status, 200);
    assert!(String::from_utf8_lossy(&page.body).contains("service Trainer"));
    assert!(page.header("content-security-policy").is_some());
    let root = request(server.http, "GET", "/", &[], b"");
    assert_eq!(root.status, 308);
    assert_eq!(root.header("location"), Some("/console/"));

    // gRPC-Web is held to the same tokens as gRPC.
    for port in [server.grpc, server.http] {
        let refused = grpc_web_embed(port, "application/grpc-web+proto", None);
        assert_eq!(refused.status, Some(16), "UNAUTHENTICATED on {port}");
        let allowed = grpc_web_embed(port, "application/grpc-web+proto", Some(INFER_TOKEN));
        assert_eq!(allowed.status, Some(0), "{:?}", allowed.message);
    }
}

/// A gRPC-Web call's outcome.
struct WebCall {
    messages: Vec<Vec<u8>>,
    status: Option<i32>,
    message: Option<String>,
}

/// One request message in gRPC(-Web) framing: flag 0, length, message.
fn web_frame(message: &impl Message) -> Vec<u8> {
    let message = message.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    framed
}

/// Calls Embed with gRPC-Web (`+proto` binary or `-text` base64 framing).
fn grpc_web_embed(addr: SocketAddr, content_type: &str, token: Option<&str>) -> WebCall {
    let framed = web_frame(&embed_request(&SAMPLE));
    let text = content_type.contains("text");
    let body = if text {
        base64::engine::general_purpose::STANDARD
            .encode(&framed)
            .into_bytes()
    } else {
        framed
    };
    let bearer = token.map(|t| format!("Bearer {t}"));
    // Browsers' gRPC-Web libraries ask for the framing they sent.
    let mut headers = vec![
        ("content-type", content_type),
        ("accept", content_type),
        ("x-grpc-web", "1"),
    ];
    if let Some(bearer) = &bearer {
        headers.push(("authorization", bearer.as_str()));
    }
    let answer = request(addr, "POST", "/tlserve.v1.Embedder/Embed", &headers, &body);
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let payload = if text {
        decode_base64_frames(&answer.body)
    } else {
        answer.body.clone()
    };
    let mut call = WebCall {
        messages: Vec::new(),
        status: answer.header("grpc-status").and_then(|s| s.parse().ok()),
        message: answer.header("grpc-message").map(str::to_owned),
    };
    read_web_frames(&payload, &mut call);
    call
}

/// A `-text` body: each frame is base64 on its own, padding included, so
/// the body is decoded piece by piece, each piece ending after its padding.
fn decode_base64_frames(body: &[u8]) -> Vec<u8> {
    let mut decoded = Vec::new();
    let mut start = 0;
    for i in 0..body.len() {
        let piece_ends = body[i] == b'=' && body.get(i + 1).is_none_or(|&next| next != b'=');
        if piece_ends || i + 1 == body.len() {
            let piece = &body[start..=i];
            decoded.extend(
                base64::engine::general_purpose::STANDARD
                    .decode(piece)
                    .expect("base64 body"),
            );
            start = i + 1;
        }
    }
    decoded
}

/// Data frames are messages; the frame flagged 0x80 holds the trailers.
fn read_web_frames(mut payload: &[u8], call: &mut WebCall) {
    while payload.len() >= 5 {
        let flag = payload[0];
        let length = u32::from_be_bytes([payload[1], payload[2], payload[3], payload[4]]) as usize;
        let frame = &payload[5..5 + length];
        if flag & 0x80 == 0 {
            call.messages.push(frame.to_vec());
        } else {
            for line in String::from_utf8_lossy(frame).lines() {
                match line.split_once(':') {
                    Some(("grpc-status", v)) => call.status = v.trim().parse().ok(),
                    Some(("grpc-message", v)) => call.message = Some(v.trim().to_owned()),
                    _ => {}
                }
            }
        }
        payload = &payload[5 + length..];
    }
}

const APP_ORIGIN: &str = "https://app.example.com";

#[tokio::test]
async fn grpc_web_answers_like_grpc_on_both_ports() {
    let server = TestServer::start_minilm().await;
    let expected = grpc_embed(&server).await;
    let cases = [
        (server.grpc, "application/grpc-web+proto"),
        (server.grpc, "application/grpc-web-text"),
        (server.http, "application/grpc-web+proto"),
        (server.http, "application/grpc-web-text"),
    ];
    for (port, content_type) in cases {
        let call = grpc_web_embed(port, content_type, None);
        assert_eq!(
            call.status,
            Some(0),
            "{port} {content_type}: {:?}",
            call.message
        );
        assert_eq!(call.messages.len(), 1);
        let answer = proto::EmbedResponse::decode(call.messages[0].as_slice()).expect("decode");
        assert_eq!(answer, expected, "{port} {content_type}");
    }
    // A refusal keeps its gRPC code.
    let mut unknown = embed_request(&SAMPLE);
    unknown.backbone = "nope".into();
    let framed = web_frame(&unknown);
    let answer = request(
        server.http,
        "POST",
        "/tlserve.v1.Embedder/Embed",
        &[("content-type", "application/grpc-web+proto")],
        &framed,
    );
    assert_eq!(web_status(&answer), Some(5), "NOT_FOUND");

    // Counted with the gRPC calls, not as HTTP requests.
    let scrape = server.scrape();
    let series =
        r#"tlserve_grpc_requests_total{service="tlserve.v1.Embedder",method="Embed",code="OK"}"#;
    assert!(metric(&scrape, series) >= 5.0, "{scrape}");
    let other: f64 = scrape
        .lines()
        .filter(|l| l.starts_with("tlserve_http_requests_total{") && l.contains(r#"route="other""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(other, 0.0, "no HTTP request counted: {scrape}");
}

/// A browser's CORS preflight for a gRPC-Web call from `origin`.
fn preflight(addr: SocketAddr, origin: &str) -> Answer {
    request(
        addr,
        "OPTIONS",
        "/tlserve.v1.Embedder/Embed",
        &[
            ("origin", origin),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "content-type,x-grpc-web,authorization",
            ),
        ],
        b"",
    )
}

#[tokio::test]
async fn only_listed_origins_may_call_the_grpc_port_from_a_page() {
    let tail = format!(
        "cors_allowed_origins = [\"{APP_ORIGIN}\"]\n{}",
        TestServer::minilm_config("", "")
    );
    let server = TestServer::start(&tail).await;
    let allowed = preflight(server.grpc, APP_ORIGIN);
    assert!(allowed.status < 300, "{}", allowed.status);
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some(APP_ORIGIN)
    );
    let headers = allowed
        .header("access-control-allow-headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        headers.contains("authorization") && headers.contains("x-grpc-web"),
        "{headers}"
    );
    let other = preflight(server.grpc, "https://elsewhere.example.org");
    assert_eq!(other.header("access-control-allow-origin"), None);

    // The call itself: its status headers are readable by the page.
    let framed = web_frame(&embed_request(&SAMPLE));
    let answer = request(
        server.grpc,
        "POST",
        "/tlserve.v1.Embedder/Embed",
        &[
            ("content-type", "application/grpc-web+proto"),
            ("origin", APP_ORIGIN),
        ],
        &framed,
    );
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.header("access-control-allow-origin"),
        Some(APP_ORIGIN)
    );
    let exposed = answer
        .header("access-control-expose-headers")
        .unwrap_or_default();
    assert!(exposed.contains("grpc-status"), "{exposed}");
}

/// A gRPC-Web DeleteHead of a head that does not exist, addressed to `host`
/// from a page of `origin`; returns the gRPC status.
fn web_delete_head(
    addr: SocketAddr,
    host: &str,
    origin: Option<&str>,
    token: Option<&str>,
) -> Option<i32> {
    let framed = web_frame(&proto::DeleteHeadRequest {
        head: "reviews".into(),
    });
    let mut headers = vec![
        ("content-type", "application/grpc-web+proto"),
        ("x-grpc-web", "1"),
    ];
    if let Some(origin) = origin {
        headers.push(("origin", origin));
    }
    let bearer = token.map(|t| format!("Bearer {t}"));
    if let Some(bearer) = &bearer {
        headers.push(("authorization", bearer.as_str()));
    }
    let answer = request_to_host(
        addr,
        host,
        "POST",
        "/tlserve.v1.Models/DeleteHead",
        &headers,
        &framed,
    );
    web_status(&answer)
}

/// A gRPC-Web answer's status: from its headers, else its trailers frame.
fn web_status(answer: &Answer) -> Option<i32> {
    let mut call = WebCall {
        messages: Vec::new(),
        status: answer.header("grpc-status").and_then(|s| s.parse().ok()),
        message: None,
    };
    read_web_frames(&answer.body, &mut call);
    call.status
}

const EVIL: &str = "http://rebound.example.com";

#[tokio::test]
async fn pages_of_other_sites_cannot_call_a_server_without_tokens() {
    let server = TestServer::start_minilm().await;
    const NOT_FOUND: Option<i32> = Some(5);
    const PERMISSION_DENIED: Option<i32> = Some(7);
    for addr in [server.grpc, server.http] {
        let own = addr.to_string();
        // DNS rebinding: the page's own name, resolved to the server.
        let rebound = format!("rebound.example.com:{}", addr.port());
        let rebound_origin = format!("{EVIL}:{}", addr.port());
        assert_eq!(
            web_delete_head(addr, &rebound, Some(&rebound_origin), None),
            PERMISSION_DENIED,
            "{addr}: a foreign Host"
        );
        // A page of another site calling the loopback name.
        assert_eq!(
            web_delete_head(addr, &own, Some(EVIL), None),
            PERMISSION_DENIED,
            "{addr}: a foreign Origin"
        );
        // The server's own pages, and clients that are no pages, reach it.
        let own_origin = format!("http://{own}");
        assert_eq!(
            web_delete_head(addr, &own, Some(&own_origin), None),
            NOT_FOUND
        );
        assert_eq!(web_delete_head(addr, &own, None, None), NOT_FOUND);
        let localhost = format!("localhost:{}", addr.port());
        assert_eq!(web_delete_head(addr, &localhost, None, None), NOT_FOUND);
    }
    // Probes address pods by IP: Health answers whatever the name.
    let health = request_to_host(
        server.grpc,
        "10.1.2.3:50051",
        "POST",
        "/grpc.health.v1.Health/Check",
        &[("content-type", "application/grpc-web+proto")],
        &[0, 0, 0, 0, 0],
    );
    assert_eq!(
        health.header("grpc-status"),
        None,
        "OK travels in the trailers"
    );
    assert_eq!(health.status, 200);

    // The JSON API: a cross-site text/plain POST (no CORS preflight needed)
    // and a foreign Host are refused; JSON is required.
    let body = json!({"model": MINILM, "input": SAMPLE[0]}).to_string();
    let embed = |host: &str, headers: &[(&str, &str)]| {
        request_to_host(
            server.http,
            host,
            "POST",
            "/v1/embeddings",
            headers,
            body.as_bytes(),
        )
    };
    let own = server.http.to_string();
    let plain = [("content-type", "text/plain")];
    let cross_site = embed(&own, &[plain[0], ("origin", EVIL)]);
    assert_eq!(cross_site.status, 403);
    assert_eq!(cross_site.json()["error"]["type"], "permission_error");
    assert_eq!(embed(&own, &plain).status, 415);
    assert_eq!(embed(&own, &[]).status, 415);
    let json_type = ("content-type", "application/json");
    assert_eq!(embed(&own, &[json_type, ("origin", EVIL)]).status, 403);
    assert_eq!(embed("rebound.example.com", &[json_type]).status, 403);
    let rebound_models = request_to_host(
        server.http,
        "rebound.example.com",
        "GET",
        "/v1/models",
        &[],
        b"",
    );
    assert_eq!(rebound_models.status, 403);
    assert_eq!(embed(&own, &[json_type]).status, 200);
    let charset = ("content-type", "application/json; charset=utf-8");
    assert_eq!(embed(&own, &[charset]).status, 200);
}

#[tokio::test]
async fn with_tokens_any_host_name_may_be_used_but_foreign_pages_are_still_refused() {
    let server = start_with_tokens().await;
    let token = Some(TRAIN_TOKEN);
    // In a cluster, clients use the Service's name: served (NOT_FOUND).
    let service_name = "tlserve.ml.svc:8080";
    assert_eq!(
        web_delete_head(server.http, service_name, None, token),
        Some(5)
    );
    assert_eq!(
        web_delete_head(server.http, service_name, Some(EVIL), token),
        Some(7)
    );
}
