//! Predict's latency on another replica right after a head version is
//! published (a miss: the replica reads the version from the shared store)
//! and again (a hit: from memory). Two servers share one store; each round
//! trains a small head on A (a new version) and predicts with that version
//! on B, twice. Prints one JSON line per figure. scripts/bench-store.sh
//! starts the servers, on a folder and on moto's S3 server.
//!
//! ```sh
//! cargo run --release --example bench_store_predict -- http://A:PORT http://B:PORT [ROUNDS]
//! ```

// A benchmark stops at its first failure, with the message saying which.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use tlserve::proto::{
    self, predictor_client::PredictorClient, trainer_client::TrainerClient, JobState,
};

const TEXTS: [(&str, &str); 8] = [
    ("sports", "The striker scored twice in the second half."),
    ("sports", "She won the marathon by a minute."),
    ("cooking", "Simmer the onions until they turn golden."),
    ("cooking", "Knead the dough and let it rise overnight."),
    (
        "weather",
        "Heavy rain is expected across the coast tonight.",
    ),
    ("weather", "A cold front brings snow to the hills."),
    ("technology", "The new chip doubles battery life."),
    ("technology", "The update patches a flaw in the browser."),
];

fn input(text: &str) -> proto::Input {
    proto::Input {
        kind: Some(proto::input::Kind::Text(text.into())),
    }
}

/// Trains a new version of `head` on `server` and returns its number.
async fn publish(trainer: &mut TrainerClient<tonic::transport::Channel>, head: &str) -> u32 {
    let request = proto::TrainHeadRequest {
        backbone: "all-MiniLM-L6-v2".into(),
        head_name: head.into(),
        training: Some(proto::TrainingConfig {
            epochs: 5,
            no_validation: true,
            ..Default::default()
        }),
        data: Some(proto::train_head_request::Data::Examples(
            proto::ExampleSet {
                examples: TEXTS
                    .iter()
                    .map(|(label, text)| proto::Example {
                        input: Some(input(text)),
                        label: (*label).into(),
                    })
                    .collect(),
            },
        )),
        ..Default::default()
    };
    let mut events = trainer
        .train_head(request)
        .await
        .expect("TrainHead")
        .into_inner();
    let mut last = None;
    while let Some(event) = events.message().await.expect("events") {
        last = Some(event);
    }
    let last = last.expect("a final event");
    assert_eq!(last.state(), JobState::Succeeded, "{}", last.error);
    last.head.expect("the head").version
}

async fn predict_ms(predictor: &mut PredictorClient<tonic::transport::Channel>, head: &str) -> f64 {
    let request = proto::PredictRequest {
        head: head.into(),
        inputs: vec![input("Thunderstorms will reach the city by noon.")],
        top_k: 1,
        ..Default::default()
    };
    let started = Instant::now();
    predictor.predict(request).await.expect("Predict");
    started.elapsed().as_secs_f64() * 1e3
}

fn report(what: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({
            "what": what,
            "rounds": ms.len(),
            "p50_ms": ms[ms.len() / 2],
            "p90_ms": ms[ms.len() * 9 / 10],
            "mean_ms": ms.iter().sum::<f64>() / ms.len() as f64,
        })
    );
}

/// A channel to the server at `url`, once it accepts connections.
async fn connect(url: &str) -> tonic::transport::Channel {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned()).expect("a URL");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match endpoint.connect().await {
            Ok(channel) => return channel,
            Err(err) if Instant::now() > deadline => panic!("{url}: {err}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Waits until the server's backbones are loaded (a Health check SERVING).
async fn wait_serving(url: &str) {
    use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient};
    let mut health = HealthClient::new(connect(url).await);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .map(|r| r.into_inner().status());
        if status.is_ok_and(|s| s == ServingStatus::Serving) {
            return;
        }
        assert!(Instant::now() < deadline, "{url} never became SERVING");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: bench_store_predict URL_A URL_B [ROUNDS]";
    let (a, b) = (args.first().expect(usage), args.get(1).expect(usage));
    let rounds: usize = args.get(2).map_or(20, |r| r.parse().expect(usage));
    wait_serving(a).await;
    wait_serving(b).await;
    let mut trainer = TrainerClient::new(connect(a).await);
    let mut predictor = PredictorClient::new(connect(b).await);
    // The connection and the backbone warmed up.
    let first = publish(&mut trainer, "bench").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    predict_ms(&mut predictor, &format!("bench@{first}")).await;
    let (mut misses, mut hits) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let version = publish(&mut trainer, "bench").await;
        let head = format!("bench@{version}");
        misses.push(predict_ms(&mut predictor, &head).await);
        hits.push(predict_ms(&mut predictor, &head).await);
        // Past B's per-name limit on reads of unknown versions.
        tokio::time::sleep(Duration::from_millis(2100)).await;
    }
    report("predict_miss", misses);
    report("predict_hit", hits);
}
