//! Attacks on the real server, each answered with a bounded outcome: silent
//! sockets are closed, uploads are bounded in bytes and time, log lines cannot
//! be forged or flooded. Every test ends by showing the server still serves.

mod common;

use std::{
    io::Read,
    net::TcpStream,
    time::{Duration, Instant},
};

use common::*;
use tlserve::proto::{self, trainer_client::TrainerClient};
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
    let examples = four_reviews();
    let mut events = TrainerClient::new(server.channel().await)
        .train_head(proto::TrainHeadRequest {
            backbone: MINILM.into(),
            head_name: "full".into(),
            data: Some(proto::train_head_request::Data::Examples(
                proto::ExampleSet { examples },
            )),
            ..Default::default()
        })
        .await
        .expect("TrainHead")
        .into_inner();
    let mut last = None;
    while let Some(event) = events.message().await.expect("events") {
        last = Some(event);
    }
    let last = last.expect("a final event");
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
