//! Several server processes sharing one store, on both backends: a shared
//! volume (a folder) and S3-compatible object storage (moto's server on
//! loopback). Any replica answers for any job, dataset and head: upload on A,
//! TrainHead on B, WatchJob, ListJobs, Predict and CancelJob on C; a replica
//! restarted while another trains changes nothing of the running job. Jobs
//! survive their replica: one whose replica is killed (SIGKILL), and one
//! whose replica is drained past its grace period (SIGTERM), are run again
//! by another and succeed. Leases are 2 s here, so a dead replica's job is
//! taken over within about 2.5 s.

mod common;

use std::time::{Duration, Instant};

use common::{moto::Moto, *};
use tlserve::proto::{self, trainer_client::TrainerClient, JobState};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// Where the replicas keep what they share.
enum Shared {
    Volume(tempfile::TempDir),
    S3 { moto: Moto, prefix: String },
}

impl Shared {
    /// The config of a replica of this store.
    fn config(&self) -> String {
        let storage = match self {
            Shared::Volume(dir) => format!(
                "[heads]\nstore_dir = \"{}\"\njob_lease_seconds = 2\n",
                dir.path().display()
            ),
            Shared::S3 { moto, prefix } => format!(
                "[heads]\njob_lease_seconds = 2\n[storage]\nbackend = \"s3\"\n\
                 [storage.s3]\nbucket = \"tlserve\"\nprefix = \"{prefix}\"\n\
                 endpoint = \"http://{}\"\nallow_http = true\n",
                moto.addr
            ),
        };
        format!("{storage}{}", TestServer::minilm_config("", ""))
    }

    async fn replica(&self, name: &str) -> TestServer {
        let env = [
            ("TLSERVE__SERVER__REPLICA_ID", name),
            // A drain gives jobs one second, then releases them.
            ("TLSERVE__SERVER__SHUTDOWN_GRACE_SECONDS", "1"),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
        ];
        let server = TestServer::spawn(&self.config(), &env);
        server.wait_until(ServingStatus::Serving).await;
        server
    }
}

async fn trainer(server: &TestServer) -> TrainerClient<tonic::transport::Channel> {
    TrainerClient::new(server.channel().await)
}

async fn upload(server: &TestServer, rows: &[(String, String)]) -> proto::Dataset {
    let chunks: Vec<proto::UploadDatasetRequest> = rows
        .chunks(40)
        .map(|chunk| proto::UploadDatasetRequest {
            examples: examples(chunk),
        })
        .collect();
    trainer(server)
        .await
        .upload_dataset(tokio_stream::iter(chunks))
        .await
        .expect("UploadDataset")
        .into_inner()
}

/// Submits a job on `server` training `head` from `data`; returns its id
/// once queued (the client goes away, the job runs on).
async fn submit(
    server: &TestServer,
    head: &str,
    data: proto::train_head_request::Data,
    epochs: u32,
) -> Result<String, tonic::Status> {
    let request = proto::TrainHeadRequest {
        backbone: MINILM.into(),
        head_name: head.into(),
        training: Some(proto::TrainingConfig {
            epochs,
            learning_rate: 0.02,
            no_validation: true,
            ..Default::default()
        }),
        data: Some(data),
        ..Default::default()
    };
    let mut stream = trainer(server)
        .await
        .train_head(request)
        .await?
        .into_inner();
    let first = stream.message().await?.expect("the QUEUED event");
    Ok(first.job_id)
}

/// Every event WatchJob on `server` streams for the job, to its end.
async fn watch(server: &TestServer, job_id: &str) -> Vec<proto::TrainEvent> {
    let mut stream = trainer(server)
        .await
        .watch_job(proto::WatchJobRequest {
            job_id: job_id.into(),
        })
        .await
        .expect("WatchJob")
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(120), stream.message())
        .await
        .expect("an event within two minutes")
        .expect("event stream")
    {
        events.push(event);
    }
    events
}

/// The job as ListJobs on `server` shows it.
async fn listed(server: &TestServer, job_id: &str) -> proto::TrainEvent {
    let jobs = all_jobs(server).await;
    let job = jobs
        .into_iter()
        .find(|j| j.job_id == job_id)
        .unwrap_or_else(|| panic!("job {job_id} is not listed"));
    job.last_event.expect("an event")
}

/// Waits until the job, seen from `server`, is TRAINING.
async fn wait_training(server: &TestServer, job_id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while listed(server, job_id).await.state() != JobState::Training {
        assert!(Instant::now() < deadline, "the job never trained");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn three_replicas_share_one_store(store: Shared) {
    let (a, b, c) = tokio::join!(store.replica("a"), store.replica("b"), store.replica("c"));
    let train_rows = read_tsv("topics_train.tsv");

    // Upload on A, train on B, follow on C.
    let dataset = upload(&a, &train_rows).await;
    assert_eq!(dataset.example_count, train_rows.len() as u64);
    let by_id = proto::train_head_request::Data::DatasetId(dataset.dataset_id.clone());
    let job = submit(&b, "topics", by_id.clone(), 30)
        .await
        .expect("TrainHead on B");
    let events = watch(&c, &job).await;
    let last = events.last().expect("events");
    assert_eq!(last.state(), JobState::Succeeded, "{:?}", last.error);
    assert!(events.len() >= 2, "C followed the job: {events:?}");
    assert_eq!(last.head.as_ref().expect("the head").version, 1);
    // Used once, on whichever replica asks.
    let again = submit(&c, "topics", by_id, 30).await.expect_err("used up");
    assert_eq!(again.code(), Code::NotFound);

    // The head B published is served by C and A.
    let test_rows = read_tsv("topics_test.tsv");
    let texts: Vec<&str> = test_rows.iter().map(|(_, t)| t.as_str()).collect();
    for server in [&c, &a] {
        let response = predict_texts(server, "topics", &texts).await;
        let correct = response
            .predictions
            .iter()
            .zip(&test_rows)
            .filter(|(p, (label, _))| &p.labels[0].label == label)
            .count();
        assert!(
            correct * 10 >= test_rows.len() * 8,
            "{correct} of {}",
            test_rows.len()
        );
    }
    assert_eq!(listed(&a, &job).await.state(), JobState::Succeeded);

    // A long job on B, cancelled from C.
    let inline = proto::train_head_request::Data::Examples(proto::ExampleSet {
        examples: examples(&train_rows),
    });
    let long = submit(&b, "long", inline.clone(), 10_000)
        .await
        .expect("long job");
    wait_training(&c, &long).await;
    // A restart of A meanwhile changes nothing of B's job.
    drop(a);
    let a = store.replica("a").await;
    assert_eq!(listed(&b, &long).await.state(), JobState::Training);
    assert_eq!(listed(&a, &long).await.state(), JobState::Training);
    let asked = Instant::now();
    trainer(&c)
        .await
        .cancel_job(proto::CancelJobRequest {
            job_id: long.clone(),
        })
        .await
        .expect("CancelJob on C");
    let ended = watch(&c, &long).await;
    let waited = asked.elapsed();
    let end = ended.last().expect("events");
    if end.state() != JobState::Cancelled {
        eprintln!("A:\n{}\nB:\n{}\nC:\n{}", a.logs(), b.logs(), c.logs());
    }
    assert_eq!(end.state(), JobState::Cancelled, "{}", end.error);
    eprintln!("cancelled from another replica, seen ended there after {waited:?}");
    assert_eq!(listed(&b, &long).await.state(), JobState::Cancelled);

    jobs_survive_their_replica(a, b, c, inline).await;
}

/// Follows the job on `server` to its end: it succeeded on a second run,
/// whose note names `why`.
async fn second_run_succeeds(server: &TestServer, job: &str, why: &str) {
    let events = watch(server, job).await;
    let last = events.last().expect("events");
    assert_eq!(last.state(), JobState::Succeeded, "{}", last.error);
    let rerun = events
        .iter()
        .find(|e| e.attempt == 2)
        .expect("a second run");
    assert!(rerun.note.contains(why), "{}", rerun.note);
    assert_eq!(last.attempt, 2);
}

/// B is killed while it trains a job, then C is drained while it trains
/// another: they run again on A (or C) and succeed, each head published
/// once.
async fn jobs_survive_their_replica(
    a: TestServer,
    b: TestServer,
    c: TestServer,
    inline: proto::train_head_request::Data,
) {
    // A few seconds of training.
    let killed = submit(&b, "survivor", inline.clone(), 1500)
        .await
        .expect("job on B");
    wait_training(&a, &killed).await;
    drop(b); // SIGKILL
    second_run_succeeds(&a, &killed, "replica b").await;

    let drained = submit(&c, "drained", inline, 3000).await.expect("job on C");
    wait_training(&a, &drained).await;
    c.terminate();
    let mut c = c;
    assert_eq!(
        c.wait_exit(Duration::from_secs(30)),
        Some(0),
        "C drains and exits"
    );
    second_run_succeeds(&a, &drained, "shut down").await;
    let takeovers = metric(
        &a.scrape(),
        "tlserve_training_job_takeovers_total{outcome=\"rerun\"}",
    );
    assert!(takeovers >= 1.0, "A ran the drained job again: {takeovers}");

    // One version each: the interrupted runs published nothing.
    let heads = a
        .models()
        .await
        .list_heads(proto::ListHeadsRequest {
            all_versions: true,
            ..Default::default()
        })
        .await
        .expect("ListHeads")
        .into_inner()
        .heads;
    for name in ["survivor", "drained"] {
        let versions: Vec<u32> = heads
            .iter()
            .filter(|h| h.name == name)
            .map(|h| h.version)
            .collect();
        assert_eq!(versions, [1], "{name}");
    }
}

async fn predict_texts(server: &TestServer, head: &str, texts: &[&str]) -> proto::PredictResponse {
    tlserve::proto::predictor_client::PredictorClient::new(server.channel().await)
        .predict(proto::PredictRequest {
            head: head.into(),
            inputs: texts.iter().map(|t| text_input(t)).collect(),
            top_k: 1,
            ..Default::default()
        })
        .await
        .expect("Predict")
        .into_inner()
}

#[tokio::test]
async fn three_replicas_share_one_volume() {
    three_replicas_share_one_store(Shared::Volume(tempfile::tempdir().expect("store"))).await;
}

#[tokio::test]
async fn three_replicas_share_one_bucket() {
    let moto = Moto::start("tlserve");
    three_replicas_share_one_store(Shared::S3 {
        moto,
        prefix: "replicas".into(),
    })
    .await;
}
