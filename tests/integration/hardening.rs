//! Attacks on the real server, each answered with a bounded outcome: silent
//! sockets are closed, uploads are bounded in bytes and time, log lines cannot
//! be forged or flooded. Every test ends by showing the server still serves.

use crate::common;

use std::{
    io::Read,
    net::TcpStream,
    time::{Duration, Instant},
};

use common::*;
use tlserve::proto::{self, predictor_client::PredictorClient, trainer_client::TrainerClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

fn upload_chunk(texts: usize, text_len: usize) -> proto::UploadDatasetRequest {
    proto::UploadDatasetRequest {
        examples: (0..texts)
            .map(|i| proto::Example {
                input: Some(text_input(&format!("{i} {}", "x".repeat(text_len)))),
                label: if i % 2 == 0 { "a" } else { "b" }.into(),
            })
            .collect(),
    }
}

async fn still_serves(server: &TestServer) {
    assert_eq!(server.health("").await, Some(ServingStatus::Serving));
    server
        .embedder()
        .await
        .embed(embed_request(&["still here"]))
        .await
        .expect("a normal Embed afterwards");
}

#[tokio::test]
async fn silent_connections_are_closed_and_bounded() {
    let _timing = common::timing_sensitive().await;
    let server = TestServer::start(&format!(
        "max_connections = 8\nconnection_first_byte_timeout_seconds = 0.5\n{}",
        TestServer::minilm_config("", "")
    ))
    .await;
    // Twice the connection limit on the gRPC port and on the metrics port,
    // none of which ever sends a byte.
    let mut silent: Vec<TcpStream> = (0..32)
        .map(|i| {
            let port = if i % 2 == 0 {
                server.grpc
            } else {
                server.metrics
            };
            TcpStream::connect(port).expect("connect")
        })
        .collect();
    let started = Instant::now();
    for socket in &mut silent {
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        // The server may greet with its HTTP/2 settings; then it closes the
        // socket (end of stream or reset) instead of leaving it open.
        let mut greeting = Vec::new();
        match socket.read_to_end(&mut greeting) {
            Ok(_) => {}
            Err(err) => assert!(
                !matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "a silent socket was left open: {err}"
            ),
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "silent sockets were held for {:?}",
        started.elapsed()
    );
    still_serves(&server).await;
    assert!(server.scrape().contains("tlserve_panics_total 0"));
}

#[tokio::test]
async fn uploads_are_bounded_in_bytes_and_in_silence() {
    let _timing = common::timing_sensitive().await;
    let store = tempfile::tempdir().expect("store dir");
    let server = TestServer::start(&format!(
        "{}\n[heads]\nstore_dir = \"{}\"\nmax_datasets = 1\nmax_upload_bytes = 20000\n\
         max_dataset_bytes = 40000\nupload_idle_timeout_seconds = 0.5\n",
        TestServer::minilm_config("", ""),
        store.path().display()
    ))
    .await;
    let mut client = TrainerClient::new(server.channel().await);

    // Over the per-upload bound: refused while the stream arrives.
    let too_big = vec![
        upload_chunk(10, 1000),
        upload_chunk(10, 1000),
        upload_chunk(10, 1000),
    ];
    let status = client
        .upload_dataset(tokio_stream::iter(too_big))
        .await
        .expect_err("over max_upload_bytes");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("max_upload_bytes"), "{status:?}");

    // A stream that starts and then says nothing is ended, and its slot freed.
    let (sender, receiver) = mpsc::channel(4);
    sender.send(upload_chunk(4, 10)).await.expect("send");
    let started = Instant::now();
    let status = client
        .upload_dataset(ReceiverStream::new(receiver))
        .await
        .expect_err("idle upload");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(sender);

    // The one slot is free again, and the byte budget was given back.
    let dataset = client
        .upload_dataset(tokio_stream::iter(vec![upload_chunk(10, 10)]))
        .await
        .expect("a small upload after the refused ones")
        .into_inner();
    assert_eq!(dataset.example_count, 10);
    // ... and now it is taken: a second upload waits for a slot in vain.
    let status = client
        .upload_dataset(tokio_stream::iter(vec![upload_chunk(2, 10)]))
        .await
        .expect_err("max_datasets = 1");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    still_serves(&server).await;
}

#[tokio::test]
async fn client_strings_cannot_forge_or_flood_log_lines() {
    let server = TestServer::start_minilm().await;
    let mut embedder = server.embedder().await;
    for name in [
        "nope\n2026-01-01T00:00:00Z INFO forged: admin logged in\u{1b}[31m\0".to_owned(),
        "y".repeat(2_000_000),
    ] {
        let request = proto::EmbedRequest {
            backbone: name,
            inputs: vec![text_input("x")],
            ..Default::default()
        };
        let status = embedder.embed(request).await.expect_err("unknown backbone");
        assert_eq!(status.code(), Code::NotFound);
    }
    still_serves(&server).await;
    let logs = server.logs();
    assert!(
        !logs
            .lines()
            .any(|line| line.contains("INFO forged") && !line.contains("\\n")),
        "a client string started a log line of its own:\n{logs}"
    );
    assert!(
        !logs.contains('\u{1b}') && !logs.contains('\0'),
        "raw control characters in the log"
    );
    assert!(
        logs.contains("\\u{1b}"),
        "the escape is shown escaped:\n{logs}"
    );
    let longest = logs.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 4_000, "a log line of {longest} bytes");
}

/// CPU seconds (user + system) the process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc stat");
    // Fields after the command name (which may hold spaces) start after ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat format")
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

#[tokio::test]
async fn image_work_stops_when_its_client_gives_up() {
    let _timing = common::timing_sensitive().await;
    let server = TestServer::start(&format!(
        "{}{}",
        TestServer::minilm_config("", ""),
        lite0_backbone_toml()
    ))
    .await;
    // 64 of the largest images allowed, a few KB each on the wire: over a
    // minute of decoding and resizing on two cores.
    let big = gray_png(5000, 5000);
    let mut request = tonic::Request::new(proto::EmbedRequest {
        backbone: LITE0.into(),
        inputs: vec![image_input(big); 64],
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(2));
    let status = server
        .embedder()
        .await
        .embed(request)
        .await
        .expect_err("the deadline passes first");
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    // The image being decoded when the deadline passed finishes; after that
    // the server is idle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = cpu_seconds(server.pid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_seconds(server.pid()) - before;
    assert!(
        used < 0.5,
        "the server used {used:.2} CPU seconds after its client left"
    );
    still_serves(&server).await;
}

/// Resident memory of a process, from /proc.
fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// Opens an HTTP/2 stream to Health/Check that declares a 3.9 MB message,
/// sends 1 MB of it and stops; returns the gRPC status the server answers
/// with, and the stream's sender (dropping it would end the stream).
async fn stalled_message(
    client: &mut h2::client::SendRequest<bytes::Bytes>,
    url: &str,
) -> (
    tokio::task::JoinHandle<Option<i32>>,
    h2::SendStream<bytes::Bytes>,
) {
    let request = http::Request::post(format!("{url}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let ready = client.clone().ready().await.expect("stream slot");
    *client = ready;
    let (response, mut send) = client.send_request(request, false).expect("send");
    let mut data = vec![0u8];
    data.extend_from_slice(&3_900_000u32.to_be_bytes());
    data.extend(std::iter::repeat_n(0u8, 1_000_000));
    send.send_data(bytes::Bytes::from(data), false)
        .expect("data");
    let status = tokio::spawn(async move {
        let response = response.await.ok()?;
        let (parts, mut body) = response.into_parts();
        let from_headers = grpc_status(&parts.headers);
        if from_headers.is_some() {
            return from_headers;
        }
        while body.data().await.is_some() {}
        body.trailers()
            .await
            .ok()
            .flatten()
            .and_then(|t| grpc_status(&t))
    });
    (status, send)
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

#[tokio::test]
async fn stalled_half_sent_messages_are_bounded_and_timed_out() {
    let _timing = common::timing_sensitive().await;
    let server = TestServer::start(&TestServer::minilm_config(
        "max_message_bytes = 4194304\nmax_buffered_bytes_per_connection = 8388608\n\
         max_buffered_request_bytes = 16777216\nmessage_timeout_seconds = 2",
        "",
    ))
    .await;
    let before = resident_bytes(server.pid());
    let url = server.url();
    let mut answers = Vec::new();
    let mut senders = Vec::new();
    // 4 connections x 10 streams x 1 MB sent of 3.9 MB declared: 40 MB that
    // would stay pinned for as long as the connections live.
    for _ in 0..4 {
        let tcp = tokio::net::TcpStream::connect(server.grpc)
            .await
            .expect("tcp");
        let (mut client, connection) = h2::client::handshake(tcp).await.expect("h2");
        tokio::spawn(connection);
        for _ in 0..10 {
            let (answer, sender) = stalled_message(&mut client, &url).await;
            answers.push(answer);
            senders.push(sender);
        }
    }
    let started = Instant::now();
    let mut codes = Vec::new();
    for answer in answers {
        let code = tokio::time::timeout(Duration::from_secs(20), answer)
            .await
            .expect("every stalled stream is answered")
            .expect("task");
        codes.push(code);
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    let exhausted = codes
        .iter()
        .filter(|c| **c == Some(Code::ResourceExhausted as i32))
        .count();
    let timed_out = codes
        .iter()
        .filter(|c| **c == Some(Code::DeadlineExceeded as i32))
        .count();
    assert_eq!(exhausted + timed_out, codes.len(), "{codes:?}");
    assert!(exhausted > 0 && timed_out > 0, "{codes:?}");
    let grown = resident_bytes(server.pid()).saturating_sub(before);
    assert!(
        grown < 200 * 1024 * 1024,
        "the server grew by {grown} bytes"
    );
    drop(senders);
    still_serves(&server).await;
}

#[tokio::test]
async fn a_version_folder_at_the_top_of_the_range_fails_publishing_plainly() {
    let store = tempfile::tempdir().expect("store dir");
    // The highest number taken (by a version deleted since).
    let top = store.path().join("heads/full").join(u32::MAX.to_string());
    std::fs::create_dir_all(&top).expect("version folder");
    std::fs::write(top.join("deleted"), b"").expect("marker");
    let server = TestServer::start(&format!(
        "{}\n[heads]\nstore_dir = \"{}\"\n",
        TestServer::minilm_config("", ""),
        store.path().display()
    ))
    .await;
    let last = final_event(
        &server,
        proto::TrainHeadRequest {
            backbone: MINILM.into(),
            head_name: "full".into(),
            data: Some(proto::train_head_request::Data::Examples(
                proto::ExampleSet {
                    examples: four_reviews(),
                },
            )),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(last.state(), proto::JobState::Failed, "{last:?}");
    assert!(
        last.error.contains("every version number"),
        "{}",
        last.error
    );
    assert!(
        !last.error.contains(&*store.path().to_string_lossy()),
        "the store's path reached the client: {}",
        last.error
    );
    still_serves(&server).await;
}

/// Trains `name` on one example per label: `count` labels of 128 characters,
/// nearly all of four bytes (503 bytes each).
async fn train_long_label_head(server: &TestServer, name: &str, count: usize) {
    let examples = (0..count)
        .map(|i| proto::Example {
            input: Some(text_input(&format!("example number {i}"))),
            label: format!("{i:03}{}", "\u{1D11E}".repeat(125)),
        })
        .collect();
    let last = final_event(
        server,
        proto::TrainHeadRequest {
            backbone: MINILM.into(),
            head_name: name.into(),
            training: Some(proto::TrainingConfig {
                no_validation: true,
                ..Default::default()
            }),
            data: Some(proto::train_head_request::Data::Examples(
                proto::ExampleSet { examples },
            )),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(last.state(), proto::JobState::Succeeded, "{last:?}");
}

/// Runs a TrainHead to its end; returns its last event.
async fn final_event(server: &TestServer, request: proto::TrainHeadRequest) -> proto::TrainEvent {
    let mut events = TrainerClient::new(server.channel().await)
        .train_head(request)
        .await
        .expect("TrainHead")
        .into_inner();
    let mut last = None;
    while let Some(event) = events.message().await.expect("events") {
        last = Some(event);
    }
    last.expect("a final event")
}

/// `message` in gRPC's length-prefixed framing.
fn grpc_frame(message: &impl prost::Message) -> bytes::Bytes {
    let encoded = message.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
    framed.extend_from_slice(&encoded);
    framed.into()
}

/// Sends one whole unary call and returns its response once its headers
/// arrive, its body unread.
async fn unread_call(
    client: &mut h2::client::SendRequest<bytes::Bytes>,
    uri: &str,
    message: bytes::Bytes,
) -> http::Response<h2::RecvStream> {
    let request = http::Request::post(uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let ready = client.clone().ready().await.expect("stream slot");
    *client = ready;
    let (response, mut send) = client.send_request(request, false).expect("send");
    send.send_data(message, true).expect("data");
    tokio::time::timeout(Duration::from_secs(30), response)
        .await
        .expect("answered within 30 s")
        .expect("response")
}

#[tokio::test]
async fn predict_answers_are_bounded_before_the_work_and_unread_ones_per_connection() {
    let store = tempfile::tempdir().expect("store dir");
    let server = TestServer::start(&format!(
        "{}\n[heads]\nstore_dir = \"{}\"\n",
        TestServer::minilm_config(
            "max_response_bytes = 8388608\n\
             max_unsent_response_bytes_per_connection = 16777216\n\
             max_unsent_response_bytes = 67108864",
            ""
        ),
        store.path().display()
    ))
    .await;
    train_long_label_head(&server, "wide", 200).await;
    // Every label of 200 for each input: about 105 KB an input.
    let predict = |inputs: usize, top_k: u32| proto::PredictRequest {
        head: "wide".into(),
        inputs: (0..inputs)
            .map(|i| text_input(&format!("text {i}")))
            .collect(),
        top_k,
        ..Default::default()
    };

    // 128 inputs: a 13 MB answer from a 2 KB request, refused before the work.
    let mut predictor =
        PredictorClient::new(server.channel().await).max_decoding_message_size(usize::MAX);
    let status = predictor
        .predict(predict(128, 0))
        .await
        .expect_err("over max_response_bytes");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("max_response_bytes"),
        "{status:?}"
    );

    // 40 calls of 6.7 MB answers on one connection that never reads them:
    // 270 MB if each were built and held.
    let before = resident_bytes(server.pid());
    let tcp = tokio::net::TcpStream::connect(server.grpc)
        .await
        .expect("tcp");
    let (mut client, connection) = h2::client::handshake(tcp).await.expect("h2");
    tokio::spawn(connection);
    let uri = format!("{}/tlserve.v1.Predictor/Predict", server.url());
    let message = grpc_frame(&predict(64, 0));
    let mut unread = Vec::new();
    let mut refused = 0;
    for _ in 0..40 {
        let response = unread_call(&mut client, &uri, message.clone()).await;
        match grpc_status(response.headers()) {
            None => unread.push(response),
            Some(code) => {
                assert_eq!(code, Code::ResourceExhausted as i32, "{response:?}");
                refused += 1;
            }
        }
    }
    let grown = resident_bytes(server.pid()).saturating_sub(before);
    eprintln!(
        "unread answers: {} answered, {refused} refused, the server grew by {grown} bytes",
        unread.len()
    );
    assert!(
        (1..=2).contains(&unread.len()) && refused == 40 - unread.len(),
        "{} answered, {refused} refused",
        unread.len()
    );
    assert!(
        grown < 100 * 1024 * 1024,
        "the server grew by {grown} bytes"
    );

    // Once that client goes, its share comes back: a large answer again.
    drop(unread);
    drop(client);
    let answer = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match predictor.predict(predict(64, 0)).await {
                Ok(answer) => return answer.into_inner(),
                Err(status) => assert_eq!(status.code(), Code::ResourceExhausted),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the budget is given back");
    assert_eq!(answer.predictions.len(), 64);
    assert_eq!(answer.predictions[0].labels.len(), 200);
    still_serves(&server).await;
}

/// Opens an HTTP/1.1 connection to `/v1/embeddings` that declares a body of
/// `declared` bytes, sends `sent` of them and stalls. Returns the status the
/// server answers with (None: no answer within 15 s) and the writer, which
/// holds the connection open until aborted.
async fn stalled_json_body(
    addr: std::net::SocketAddr,
    declared: usize,
    sent: usize,
) -> (
    tokio::task::JoinHandle<Option<u16>>,
    tokio::task::JoinHandle<()>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let (mut reader, mut writer) = tcp.into_split();
    let mut data = format!(
        "POST /v1/embeddings HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {declared}\r\n\r\n{{\"model\": \"{MINILM}\", \"input\": \""
    )
    .into_bytes();
    data.resize(data.len() + sent, b'x');
    let writer = tokio::spawn(async move {
        // A refused body may be cut off: the server stops reading.
        let _ = writer.write_all(&data).await;
        std::future::pending::<()>().await;
    });
    let answer = tokio::spawn(async move {
        let mut head = Vec::new();
        let mut buf = [0u8; 256];
        let read = async {
            while !head.windows(2).any(|w| w == b"\r\n") {
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(15), read)
            .await
            .ok()?;
        let line = String::from_utf8_lossy(&head).into_owned();
        line.split_whitespace().nth(1)?.parse().ok()
    });
    (answer, writer)
}

/// POSTs `body` to `/v1/embeddings` as JSON, off the async runtime.
async fn post_embeddings(addr: std::net::SocketAddr, body: String) -> common::http_client::Answer {
    tokio::task::spawn_blocking(move || {
        common::http_client::request(
            addr,
            "POST",
            "/v1/embeddings",
            &[("content-type", "application/json")],
            body.as_bytes(),
        )
    })
    .await
    .expect("task")
}

#[tokio::test]
async fn stalled_json_bodies_share_the_budget_of_unfinished_messages() {
    let server = TestServer::start(&TestServer::minilm_config(
        "max_message_bytes = 4194304\nmax_buffered_bytes_per_connection = 4194304\n\
         max_buffered_request_bytes = 16777216\nmessage_timeout_seconds = 60",
        "",
    ))
    .await;
    let before = resident_bytes(server.pid());
    // 32 bodies of 3.9 MB sent and never finished: 125 MB if all were held
    // for the minute of the message timeout; the budget holds 16 MB.
    let mut answers = Vec::new();
    let mut writers = Vec::new();
    for _ in 0..32 {
        let (answer, writer) = stalled_json_body(server.http, 4_000_000, 3_900_000).await;
        answers.push(answer);
        writers.push(writer);
    }
    let mut statuses = Vec::new();
    for answer in answers {
        statuses.push(answer.await.expect("task"));
    }
    let refused = statuses.iter().filter(|s| **s == Some(429)).count();
    let held = statuses.iter().filter(|s| s.is_none()).count();
    assert_eq!(refused + held, statuses.len(), "{statuses:?}");
    assert!(held <= 4 && refused >= 28, "{statuses:?}");
    let grown = resident_bytes(server.pid()).saturating_sub(before);
    eprintln!("stalled JSON bodies: {refused} refused, {held} held, grown by {grown} bytes");
    assert!(grown < 64 * 1024 * 1024, "the server grew by {grown} bytes");

    // The held ones give their share back when their clients go.
    for writer in writers {
        writer.abort();
    }
    let body = serde_json::json!({"model": MINILM, "input": "still here"});
    let answered = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let answer = post_embeddings(server.http, body.to_string()).await;
            if answer.status == 200 {
                return answer;
            }
            assert_eq!(answer.status, 429);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the budget is given back");
    assert_eq!(
        answered.json()["data"][0]["embedding"]
            .as_array()
            .map(Vec::len),
        Some(384)
    );
    still_serves(&server).await;
}

/// Starts measuring the peak resident memory of a process afresh.
fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset the peak RSS");
}

/// Peak resident memory of a process since the last [`reset_peak`], from /proc.
fn peak_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kib * 1024
}

#[tokio::test]
async fn millions_of_empty_inputs_are_refused_by_count_before_they_inflate() {
    let server = TestServer::start_minilm().await;
    let most = 100 * 1024 * 1024;

    // gRPC: 8,000,000 empty inputs, two bytes each, in a 16 MB Embed.
    let mut embed = vec![0x0a, MINILM.len() as u8];
    embed.extend_from_slice(MINILM.as_bytes());
    for _ in 0..8_000_000 {
        embed.extend_from_slice(&[0x12, 0x00]);
    }
    let mut message = vec![0u8];
    message.extend_from_slice(&(embed.len() as u32).to_be_bytes());
    message.extend_from_slice(&embed);
    drop(embed);
    let tcp = tokio::net::TcpStream::connect(server.grpc)
        .await
        .expect("tcp");
    let (mut client, connection) = h2::client::handshake(tcp).await.expect("h2");
    tokio::spawn(connection);
    let start = resident_bytes(server.pid());
    reset_peak(server.pid());
    let uri = format!("{}/tlserve.v1.Embedder/Embed", server.url());
    let response = unread_call(&mut client, &uri, message.into()).await;
    assert_eq!(
        grpc_status(response.headers()),
        Some(Code::InvalidArgument as i32),
        "{response:?}"
    );
    let message = response
        .headers()
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(message.contains("max_inputs_per_request"), "{message}");
    let grown = peak_bytes(server.pid()).saturating_sub(start);
    eprintln!("gRPC, empty inputs: the server's peak grew by {grown} bytes");
    assert!(
        grown < most,
        "gRPC: the server's peak grew by {grown} bytes"
    );
    drop(client);

    // JSON: 5,500,000 empty strings in a 16 MB body.
    let body = format!(
        "{{\"model\": \"{MINILM}\", \"input\": [{}\"\"]}}",
        "\"\",".repeat(5_500_000)
    );
    let start = resident_bytes(server.pid());
    reset_peak(server.pid());
    let answer = post_embeddings(server.http, body).await;
    assert_eq!(answer.status, 400);
    let message = answer.json()["error"]["message"].to_string();
    assert!(message.contains("max_inputs_per_request"), "{message}");
    let grown = peak_bytes(server.pid()).saturating_sub(start);
    eprintln!("JSON, empty inputs: the server's peak grew by {grown} bytes");
    assert!(
        grown < most,
        "JSON: the server's peak grew by {grown} bytes"
    );
    still_serves(&server).await;
}

fn tensor_example(shape: Vec<u32>, values: Vec<f32>, label: &str) -> proto::Example {
    proto::Example {
        input: Some(proto::Input {
            kind: Some(proto::input::Kind::Tensor(proto::Tensor { shape, values })),
        }),
        label: label.into(),
    }
}

#[tokio::test]
async fn uploads_are_counted_as_decoded_and_refused_when_no_backbone_takes_them() {
    let store = tempfile::tempdir().expect("store dir");
    let server = TestServer::start(&format!(
        "{}\n[heads]\nstore_dir = \"{}\"\nmax_upload_bytes = 100000\n",
        TestServer::minilm_config("max_message_bytes = 4194304", ""),
        store.path().display()
    ))
    .await;
    let mut client = TrainerClient::new(server.channel().await);

    // A tensor whose shape lists 4 million 1s, one wire byte each, in 8
    // messages: 256 MB once widened and held if it passed.
    let start = resident_bytes(server.pid());
    reset_peak(server.pid());
    let chunks = (0..8).map(|_| proto::UploadDatasetRequest {
        examples: vec![tensor_example(vec![1; 4_000_000], vec![0.5], "a")],
    });
    let status = client
        .upload_dataset(tokio_stream::iter(chunks))
        .await
        .expect_err("a shape of 4 million dimensions");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("dimensions"), "{status:?}");
    let grown = peak_bytes(server.pid()).saturating_sub(start);
    eprintln!("a shape of 4 million dimensions: the peak grew by {grown} bytes");
    assert!(
        grown < 100 * 1024 * 1024,
        "the server's peak grew by {grown} bytes"
    );

    // 3000 empty texts: 21 KB on the wire, over 200 KB in memory.
    let tiny = proto::UploadDatasetRequest {
        examples: (0..3000)
            .map(|i| proto::Example {
                input: Some(text_input("")),
                label: if i % 2 == 0 { "a" } else { "b" }.into(),
            })
            .collect(),
    };
    let status = client
        .upload_dataset(tokio_stream::iter(vec![tiny]))
        .await
        .expect_err("over max_upload_bytes once decoded");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("max_upload_bytes"), "{status:?}");

    // Texts and tensors together: no backbone takes both.
    let mixed = proto::UploadDatasetRequest {
        examples: vec![
            proto::Example {
                input: Some(text_input("a text")),
                label: "a".into(),
            },
            tensor_example(vec![3, 2, 2], vec![0.5; 12], "b"),
        ],
    };
    let status = client
        .upload_dataset(tokio_stream::iter(vec![mixed]))
        .await
        .expect_err("texts and tensors");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // Tensors, uploaded, then named for a text backbone: refused from the
    // dataset's meta, before its examples are read, as often as asked; the
    // dataset stays for a backbone that takes it.
    let tensors = proto::UploadDatasetRequest {
        examples: (0..4)
            .map(|i| tensor_example(vec![3, 4, 4], vec![i as f32; 48], ["a", "b"][i % 2]))
            .collect(),
    };
    let dataset = client
        .upload_dataset(tokio_stream::iter(vec![tensors]))
        .await
        .expect("a dataset of tensors")
        .into_inner();
    for _ in 0..2 {
        let status = client
            .train_head(proto::TrainHeadRequest {
                backbone: MINILM.into(),
                head_name: "tensors".into(),
                data: Some(proto::train_head_request::Data::DatasetId(
                    dataset.dataset_id.clone(),
                )),
                ..Default::default()
            })
            .await
            .expect_err("a text backbone");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("cannot take"), "{status:?}");
    }
    still_serves(&server).await;
}

/// The HTTP/2 connection preface and an empty SETTINGS frame: all a client
/// needs to send to hold a connection past the first-byte timeout.
const H2_PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Opens `count` connections to `addr` that each send `bytes` and then
/// nothing, never reading.
fn holders(addr: std::net::SocketAddr, count: usize, bytes: &[u8]) -> Vec<TcpStream> {
    use std::io::Write;
    (0..count)
        .map(|_| {
            let mut socket = TcpStream::connect(addr).expect("connect");
            socket.write_all(bytes).expect("first bytes");
            socket
        })
        .collect()
}

/// Whether the server has closed `socket` (end of stream or a reset) within
/// a short wait; whatever it sent before is skipped.
fn closed_by_server(socket: &mut TcpStream) -> bool {
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut sink = Vec::new();
    match socket.read_to_end(&mut sink) {
        Ok(_) => true,
        Err(err) => !matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[tokio::test]
async fn connections_idle_after_their_first_bytes_give_way_to_new_callers() {
    let _timing = common::timing_sensitive().await;
    let server = TestServer::start(&format!(
        "max_connections = 8\n{}",
        TestServer::minilm_config("", "")
    ))
    .await;
    // Every place on every port taken by a client that spoke once and then
    // went quiet: a preface on the gRPC port, one request on the HTTP ports.
    let mut grpc = holders(server.grpc, 8, H2_PREFACE_AND_SETTINGS);
    let get = |port: std::net::SocketAddr, path: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: {port}\r\n\r\n").into_bytes()
    };
    let _http = holders(server.http, 8, &get(server.http, "/v1/models"));
    let _metrics = holders(server.metrics, 8, &get(server.metrics, "/metrics"));

    // A new caller gets in within seconds (the holders have been idle for
    // a moment by then), on each port.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(10);
    while server.health("").await != Some(ServingStatus::Serving) {
        assert!(
            Instant::now() < deadline,
            "no new caller got through:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (port, path) in [(server.http, "/v1/models"), (server.metrics, "/metrics")] {
        while answered_status(port, path) != Some(200) {
            assert!(
                Instant::now() < deadline,
                "no new caller got through on {port}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let admitted_after = started.elapsed();
    eprintln!("full ports admitted new callers on all three after {admitted_after:?}");
    assert!(
        admitted_after < Duration::from_secs(5),
        "{admitted_after:?}"
    );
    assert!(server.scrape().contains("tlserve_panics_total 0"));
    // The newcomers took the places of holders, which the server closed.
    assert!(
        grpc.iter_mut().any(closed_by_server),
        "no idle gRPC connection was closed"
    );
    still_serves(&server).await;
}

#[tokio::test]
async fn connections_without_calls_are_closed_after_the_idle_timeout() {
    let _timing = common::timing_sensitive().await;
    let server = TestServer::start(&format!(
        "connection_idle_timeout_seconds = 1\n{}",
        TestServer::minilm_config("", "")
    ))
    .await;
    let get = format!("GET /v1/models HTTP/1.1\r\nHost: {}\r\n\r\n", server.http);
    let mut held = holders(server.grpc, 4, H2_PREFACE_AND_SETTINGS);
    held.extend(holders(server.http, 4, get.as_bytes()));
    let started = Instant::now();
    for socket in &mut held {
        while !closed_by_server(socket) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "an idle connection was held for {:?}",
                started.elapsed()
            );
        }
    }
    // The timeout, then a second that confirms no call began meanwhile.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    still_serves(&server).await;
}

/// The status of a GET on a fresh connection; None when the connection is
/// closed without an answer.
fn answered_status(addr: std::net::SocketAddr, path: &str) -> Option<u16> {
    use std::io::Write;
    let mut socket = TcpStream::connect(addr).ok()?;
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    socket.write_all(head.as_bytes()).ok()?;
    let mut answer = Vec::new();
    let _ = socket.read_to_end(&mut answer);
    let status_line = String::from_utf8_lossy(&answer);
    status_line.split_whitespace().nth(1)?.parse().ok()
}

/// Sends `head` (and `body`) on a fresh connection and reads until the
/// server closes it; returns what came back and how long that took.
fn held_request(addr: std::net::SocketAddr, head: String, body: &[u8]) -> (String, Duration) {
    use std::io::Write;
    let mut socket = TcpStream::connect(addr).expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    socket.write_all(head.as_bytes()).expect("head");
    socket.write_all(body).expect("body");
    let started = Instant::now();
    let mut answer = Vec::new();
    if let Err(err) = socket.read_to_end(&mut answer) {
        assert!(
            !matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the server held the request for {:?}: {err}",
            started.elapsed()
        );
    }
    (
        String::from_utf8_lossy(&answer).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test]
async fn request_bodies_that_never_arrive_are_timed_out_on_both_ports() {
    let _timing = common::timing_sensitive().await;
    let server = TestServer::start(&TestServer::minilm_config(
        "message_timeout_seconds = 1",
        "",
    ))
    .await;
    // gRPC-Web over HTTP/1.1: the public Health service on the gRPC port,
    // a read-only call on the HTTP port; no token is needed for either.
    let calls = [
        (server.grpc, "/grpc.health.v1.Health/Check"),
        (server.http, "/tlserve.v1.Models/ListBackbones"),
    ];
    let mut attempts = Vec::new();
    for (addr, path) in calls {
        let head = |framing: &str| {
            format!(
                "POST {path} HTTP/1.1\r\nHost: {addr}\r\n\
                 content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\n{framing}\r\n"
            )
        };
        // A declared body that never comes, and a chunked body whose one
        // message arrives but whose end never does.
        for _ in 0..2 {
            attempts.push(std::thread::spawn({
                let head = head("content-length: 100\r\n");
                move || held_request(addr, head, b"")
            }));
            attempts.push(std::thread::spawn({
                let head = head("transfer-encoding: chunked\r\n");
                move || held_request(addr, head, b"5\r\n\x00\x00\x00\x00\x00\r\n")
            }));
        }
    }
    for attempt in attempts {
        let (answer, took) = attempt.join().expect("client thread");
        assert!(
            took < Duration::from_secs(8),
            "held for {took:?}:\n{answer}"
        );
        let lower = answer.to_ascii_lowercase();
        assert!(
            lower.contains("grpc-status: 4"),
            "DEADLINE_EXCEEDED expected:\n{answer}"
        );
    }
    let scrape = server.scrape();
    let timed_out = r#"tlserve_grpc_request_read_errors_total{service="tlserve.v1.Models",method="ListBackbones",code="DEADLINE_EXCEEDED"}"#;
    assert_eq!(metric(&scrape, timed_out), 4.0, "{scrape}");
    let models = http_client::request(server.http, "GET", "/v1/models", &[], b"");
    assert_eq!(models.status, 200);
    still_serves(&server).await;
}

/// A gRPC-Web answer's status: from its headers, or from the trailers frame
/// at the end of its (binary) body.
fn grpc_web_status(answer: &http_client::Answer) -> Option<i32> {
    if let Some(status) = answer.header("grpc-status") {
        return status.trim().parse().ok();
    }
    let body = String::from_utf8_lossy(&answer.body).to_ascii_lowercase();
    let (_, after) = body.split_once("grpc-status:")?;
    let digits: String = after
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// One gRPC(-Web) frame: flag, the length it declares, the bytes it holds.
fn frame(flag: u8, declared: u32, payload: &[u8]) -> Vec<u8> {
    let mut framed = vec![flag];
    framed.extend_from_slice(&declared.to_be_bytes());
    framed.extend_from_slice(payload);
    framed
}

#[tokio::test]
async fn malformed_grpc_web_bodies_are_counted_as_client_mistakes_not_server_faults() {
    let server = TestServer::start_minilm().await;
    let malformed: [(&str, Vec<u8>); 4] = [
        ("application/grpc-web-text", b"!!! not base64 !!!".to_vec()),
        ("application/grpc-web+proto", frame(0, 10, b"cut")),
        ("application/grpc-web+proto", frame(1, 0, b"")),
        ("application/grpc-web+proto", frame(0, 3, b"\xff\xff\xff")),
    ];
    // Anyone can reach the public Health service; Embed on the HTTP port.
    let targets = [
        (
            server.grpc,
            "/grpc.health.v1.Health/Check",
            "grpc.health.v1.Health",
            "Check",
        ),
        (
            server.http,
            "/tlserve.v1.Embedder/Embed",
            "tlserve.v1.Embedder",
            "Embed",
        ),
    ];
    for (addr, path, _, _) in targets {
        for (content_type, body) in &malformed {
            let headers = [("content-type", *content_type), ("x-grpc-web", "1")];
            let answer = http_client::request(addr, "POST", path, &headers, body);
            // The code the gRPC specification gives a message that cannot be
            // decoded.
            assert_eq!(
                grpc_web_status(&answer),
                Some(Code::Internal as i32),
                "{path} {content_type} {body:?}: {}",
                String::from_utf8_lossy(&answer.body)
            );
        }
    }
    let scrape = server.scrape();
    for (_, _, service, method) in targets {
        let series = format!(
            r#"tlserve_grpc_request_read_errors_total{{service="{service}",method="{method}",code="INTERNAL"}}"#
        );
        assert_eq!(metric(&scrape, &series), 4.0, "{series}\n{scrape}");
    }
    still_serves(&server).await;
    let logs = server.logs();
    assert!(
        !logs.lines().any(|line| line.contains("ERROR")),
        "client mistakes were logged as errors:\n{logs}"
    );
    assert!(logs.contains("the request could not be read"), "{logs}");
}
