//! Several server processes sharing one store, on both backends: a shared
//! volume (a folder) and S3-compatible object storage (moto's server on
//! loopback). Any replica answers for any job, dataset and head: upload on A,
//! TrainHead on B, WatchJob, ListJobs, Predict and CancelJob on C; a replica
//! restarted while another trains changes nothing of the running job. Jobs
//! survive their replica: one whose replica is killed (SIGKILL), and one
//! whose replica is drained past its grace period (SIGTERM), are run again
//! by another and succeed. Leases are 2 s here, so a dead replica's job is
//! taken over within about 2.5 s. A replica paused past its lease (SIGSTOP)
//! comes back to a job another replica took over: it stops, follows the new
//! owner's record, and never writes over it.

use crate::common;

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
        let server = self.spawn(name, &[]);
        server.wait_until(ServingStatus::Serving).await;
        server
    }

    /// A replica named `name`, started without waiting, with `extra`
    /// environment variables.
    fn spawn(&self, name: &str, extra: &[(&str, &str)]) -> TestServer {
        let mut env = vec![
            ("TLSERVE__SERVER__REPLICA_ID", name),
            // A drain gives jobs one second, then releases them.
            ("TLSERVE__SERVER__SHUTDOWN_GRACE_SECONDS", "1"),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
        ];
        env.extend_from_slice(extra);
        TestServer::spawn(&self.config(), &env)
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

/// Submits a job on `server` training `head` for `epochs` on every topics
/// example; returns its id once it trains.
async fn start_training(server: &TestServer, head: &str, epochs: u32) -> String {
    let rows = read_tsv("topics_train.tsv");
    let inline = proto::train_head_request::Data::Examples(proto::ExampleSet {
        examples: examples(&rows),
    });
    let job = submit(server, head, inline, epochs)
        .await
        .expect("TrainHead");
    wait_training(server, &job).await;
    job
}

/// Sends `signal` (STOP, CONT) to the server's process.
fn signal(server: &TestServer, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &server.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} failed");
}

/// The last event of a stream, read to its end within `limit`.
async fn last_event(
    mut stream: tonic::Streaming<proto::TrainEvent>,
    limit: Duration,
) -> proto::TrainEvent {
    let mut last = None;
    loop {
        let next = tokio::time::timeout(limit, stream.message())
            .await
            .expect("the stream ends")
            .expect("event stream");
        match next {
            Some(event) => last = Some(event),
            None => return last.expect("events"),
        }
    }
}

/// A replica paused past its lease (SIGSTOP: a GC or VM pause, an NFS
/// stall) while it trains a job comes back to find it taken over and
/// finished by another. It stops its run and settles its copy as the new
/// owner's record says: the WatchJob stream opened there before the pause
/// ends with the new owner's SUCCEEDED, ListJobs there says SUCCEEDED,
/// CancelJob there answers that the job ended, its only job slot runs the
/// next job, it warns once, and its shutdown leaves the new owner's record
/// as it is.
async fn paused_replica_yields_to_the_new_owner(store: Shared) {
    let (a, b) = tokio::join!(store.replica("a"), store.replica("b"));
    let job = start_training(&a, "paused", 1500).await;
    let watching_on_a = trainer(&a)
        .await
        .watch_job(proto::WatchJobRequest {
            job_id: job.clone(),
        })
        .await
        .expect("WatchJob on A")
        .into_inner();
    wait_training(&b, &job).await;
    signal(&a, "STOP");
    second_run_succeeds(&b, &job, "replica a").await;
    signal(&a, "CONT");

    let end = last_event(watching_on_a, Duration::from_secs(30)).await;
    assert_eq!(
        end.state(),
        JobState::Succeeded,
        "{}\n{}",
        end.error,
        a.logs()
    );
    assert_eq!(end.attempt, 2, "the new owner's run");
    assert_eq!(listed(&a, &job).await.state(), JobState::Succeeded);
    let cancel = trainer(&a)
        .await
        .cancel_job(proto::CancelJobRequest {
            job_id: job.clone(),
        })
        .await
        .expect_err("the job ended");
    assert_eq!(cancel.code(), Code::FailedPrecondition, "{cancel:?}");
    // A's one job slot (heads.max_concurrent_jobs = 1) is free again.
    let rows = read_tsv("topics_train.tsv");
    let short = proto::train_head_request::Data::Examples(proto::ExampleSet {
        examples: examples(&rows[..40]),
    });
    let next = submit(&a, "after", short, 5).await.expect("next job on A");
    let events = watch(&a, &next).await;
    assert_eq!(events.last().expect("events").state(), JobState::Succeeded);
    let warnings = a.logs().matches("taken over by another replica").count();
    assert_eq!(warnings, 1, "{}", a.logs());
    let lost = "tlserve_training_job_takeovers_total{outcome=\"lost\"}";
    assert_eq!(metric(&a.scrape(), lost), 1.0);

    a.terminate();
    let mut a = a;
    assert_eq!(a.wait_exit(Duration::from_secs(30)), Some(0));
    let after = listed(&b, &job).await;
    assert_eq!(after.state(), JobState::Succeeded, "{}", after.error);
    assert_eq!((after.attempt, after.head.expect("head").version), (2, 1));
    let record = trainer(&b)
        .await
        .watch_job(proto::WatchJobRequest { job_id: job })
        .await
        .expect("WatchJob on B")
        .into_inner();
    let record = last_event(record, Duration::from_secs(10)).await;
    assert_eq!(record.state(), JobState::Succeeded);
    // B still serves.
    assert_eq!(
        predict_texts(&b, "paused", &["rain"])
            .await
            .predictions
            .len(),
        1
    );
}

#[tokio::test]
async fn a_paused_replica_yields_its_job_on_a_volume() {
    paused_replica_yields_to_the_new_owner(Shared::Volume(tempfile::tempdir().expect("store")))
        .await;
}

#[tokio::test]
async fn a_paused_replica_yields_its_job_on_a_bucket() {
    let moto = Moto::start("tlserve");
    paused_replica_yields_to_the_new_owner(Shared::S3 {
        moto,
        prefix: "paused".into(),
    })
    .await;
}

/// Two servers given one replica name on one store (two processes on one
/// host, both named after `HOSTNAME`): the second refuses to start, naming
/// the clash, and takes nothing over: the first's job runs on as its first
/// run and succeeds, and the first still serves.
#[tokio::test]
async fn a_second_process_with_a_live_replicas_name_refuses_to_start() {
    let store = Shared::Volume(tempfile::tempdir().expect("store"));
    let first = store.replica("twin").await;
    let job = start_training(&first, "twin", 1500).await;

    let mut second = store.spawn("twin", &[]);
    let code = second.wait_exit(Duration::from_secs(60));
    assert!(code.is_some_and(|code| code != 0), "{code:?}");
    let logs = second.logs();
    assert!(
        logs.contains("another live process") && logs.contains("replica name `twin`"),
        "{logs}"
    );
    assert!(!logs.contains("training job taken over"), "{logs}");

    let events = watch(&first, &job).await;
    let last = events.last().expect("events");
    assert_eq!(last.state(), JobState::Succeeded, "{}", last.error);
    assert!(events.iter().all(|e| e.attempt <= 1), "one run: {events:?}");
    assert_eq!(
        predict_texts(&first, "twin", &["rain"])
            .await
            .predictions
            .len(),
        1
    );
}

/// The test override of a replica's wall clock (src/clock.rs).
const CLOCK_SKEW: &str = "TLSERVE_TEST_CLOCK_SKEW_SECONDS";

/// A replica whose wall clock runs 45 s ahead (far past a 2 s lease) takes
/// no live job for abandoned: a lease runs out only when the record stays
/// unchanged for a lease as the observer watches it, on its own monotonic
/// clock. Watched over three leases the job stays its owner's first run;
/// then it is cancelled on its owner as usual.
#[tokio::test]
async fn a_replica_whose_clock_runs_ahead_leaves_live_jobs_alone() {
    let store = Shared::Volume(tempfile::tempdir().expect("store"));
    let a = store.replica("a").await;
    let job = start_training(&a, "timely", 10_000).await;
    let ahead = store.spawn("ahead", &[(CLOCK_SKEW, "45")]);
    ahead.wait_until(ServingStatus::Serving).await;

    // A negative: watched for three leases (each a dozen scans of B's).
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let seen = listed(&ahead, &job).await;
        assert_eq!(seen.state(), JobState::Training, "{}", seen.error);
        assert!(seen.attempt <= 1, "taken over: {}", seen.note);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rerun = "tlserve_training_job_takeovers_total{outcome=\"rerun\"}";
    assert_eq!(metric(&ahead.scrape(), rerun), 0.0, "{}", ahead.logs());
    trainer(&a)
        .await
        .cancel_job(proto::CancelJobRequest {
            job_id: job.clone(),
        })
        .await
        .expect("CancelJob on A");
    let events = watch(&ahead, &job).await;
    let last = events.last().expect("events");
    assert_eq!(last.state(), JobState::Cancelled, "{}", last.error);
    assert!(events.iter().all(|e| e.attempt <= 1), "{events:?}");
}

/// A replica whose wall clock runs 2 h ahead (past the 1 h dataset TTL and
/// the 1 h age of a crashed write's leftovers) neither sweeps away nor
/// refuses another replica's fresh upload, nor removes a fresh temporary
/// file at its start: ages are the store's time now less the store's time
/// of the write. The upload trains a head there.
#[tokio::test]
async fn a_replica_whose_clock_runs_ahead_keeps_fresh_uploads() {
    let store = Shared::Volume(tempfile::tempdir().expect("store"));
    let a = store.replica("a").await;
    let rows = read_tsv("topics_train.tsv");
    let dataset = upload(&a, &rows[..40]).await;
    // Another replica's write in progress, as a volume holds it.
    let Shared::Volume(dir) = &store else {
        unreachable!("a volume")
    };
    let in_progress = dir.path().join("datasets/.tmp-examples.json-in-progress");
    std::fs::write(&in_progress, b"[").expect("a temporary file");
    // And a publish in progress: its weights written, its manifest not yet.
    let publishing = dir
        .path()
        .join("heads/publishing/blobs/1-fresh.safetensors");
    std::fs::create_dir_all(publishing.parent().expect("a folder")).expect("blobs folder");
    std::fs::write(&publishing, b"weights").expect("fresh weights");
    let ahead = store.spawn("ahead", &[(CLOCK_SKEW, "7200")]);
    ahead.wait_until(ServingStatus::Serving).await;
    assert!(in_progress.exists(), "a fresh temporary file is left alone");
    assert!(
        publishing.exists(),
        "fresh weights without a manifest are left alone"
    );
    assert!(
        ahead.logs().contains(CLOCK_SKEW),
        "the skew is logged: {}",
        ahead.logs()
    );
    let by_id = proto::train_head_request::Data::DatasetId(dataset.dataset_id);
    let job = submit(&ahead, "fresh", by_id, 5)
        .await
        .expect("the upload is fresh on the replica ahead");
    let events = watch(&ahead, &job).await;
    let last = events.last().expect("events");
    assert_eq!(last.state(), JobState::Succeeded, "{}", last.error);
    assert_eq!(
        predict_texts(&a, "fresh", &["rain"])
            .await
            .predictions
            .len(),
        1
    );
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

/// Trains `head` on `server` from a few rows and waits for its end; the
/// version it published.
async fn train_quickly(server: &TestServer, head: &str) -> u32 {
    let rows = read_tsv("topics_train.tsv");
    let data = proto::train_head_request::Data::Examples(proto::ExampleSet {
        examples: examples(&rows[..24]),
    });
    let job = submit(server, head, data, 20).await.expect("TrainHead");
    let last = watch(server, &job).await.pop().expect("events");
    assert_eq!(last.state(), JobState::Succeeded, "{}", last.error);
    last.head.expect("the head").version
}

/// The head's Predict code on `server`.
async fn predict_code(server: &TestServer, head: &str) -> Code {
    let answer = tlserve::proto::predictor_client::PredictorClient::new(server.channel().await)
        .predict(proto::PredictRequest {
            head: head.into(),
            inputs: vec![text_input("a match report")],
            top_k: 1,
            ..Default::default()
        })
        .await;
    answer.map_or_else(|status| status.code(), |_| Code::Ok)
}

/// DeleteHead of every version of `head` on `server`; the versions deleted.
async fn delete_every_version(server: &TestServer, head: &str) -> Vec<u32> {
    server
        .models()
        .await
        .delete_head(proto::DeleteHeadRequest { head: head.into() })
        .await
        .expect("DeleteHead")
        .into_inner()
        .deleted_versions
}

/// DeleteHead of every version on B, right after A published one that B's
/// view has not caught up with: the versions are read from the store, so
/// the fresh one goes too and neither replica serves the name afterwards.
#[tokio::test]
async fn deleting_every_version_takes_one_another_replica_just_published() {
    let store = Shared::Volume(tempfile::tempdir().expect("store"));
    let (a, b) = tokio::join!(store.replica("a"), store.replica("b"));
    assert_eq!(train_quickly(&a, "fresh").await, 1);
    assert_eq!(predict_code(&b, "fresh").await, Code::Ok, "B serves v1");
    assert_eq!(train_quickly(&a, "fresh").await, 2);

    let deleted = delete_every_version(&b, "fresh").await;
    assert_eq!(deleted, [1, 2], "every version in the store");
    // A's view follows within its refresh interval (2 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    for server in [&b, &a] {
        while predict_code(server, "fresh").await != Code::NotFound {
            assert!(Instant::now() < deadline, "a deleted head is still served");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(train_quickly(&b, "after").await, 1);
    assert_eq!(predict_code(&a, "after").await, Code::Ok);
}

/// A head version written by a newer server (a head kind this one cannot
/// load, a second blob under a field it does not know), whose weights are
/// older than the leftover age: a replica that cannot load it keeps every
/// blob its manifest names, while a crashed publish's weights beside them
/// are removed; DeleteHead still deletes the version, weights included.
#[tokio::test]
async fn a_replica_keeps_the_weights_of_a_head_it_cannot_load() {
    let dir = tempfile::tempdir().expect("store");
    let root = dir.path().join("heads/future");
    let blob = |id: &str| root.join(format!("blobs/{id}.safetensors"));
    let key = |id: &str| format!("heads/future/blobs/{id}.safetensors");
    let manifest = serde_json::json!({
        "name": "future", "version": 1, "backbone": MINILM,
        "backbone_fingerprint": "0123", "input_dim": 384, "labels": ["a", "b"],
        "kind": {"type": "mixture-of-experts", "experts": 4},
        "created_at_ms": 1, "weights": key("7d1e-experts"),
        "router_weights": key("9a0c-router"),
    });
    std::fs::create_dir_all(root.join("1")).expect("version folder");
    std::fs::create_dir_all(root.join("blobs")).expect("blobs folder");
    std::fs::write(root.join("1/head.json"), manifest.to_string()).expect("manifest");
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    for id in ["7d1e-experts", "9a0c-router", "crashed"] {
        std::fs::write(blob(id), b"weights").expect("blob");
        std::fs::File::options()
            .write(true)
            .open(blob(id))
            .and_then(|f| f.set_modified(two_hours_ago))
            .expect("age the blob");
    }

    // The store is swept as the replica opens it, before it serves.
    let store = Shared::Volume(dir);
    let server = store.replica("old").await;
    assert!(!blob("crashed").exists(), "a crashed publish's weights go");
    assert!(blob("7d1e-experts").exists(), "the version's weights stay");
    assert!(blob("9a0c-router").exists(), "and what else it names");
    assert_eq!(predict_code(&server, "future").await, Code::NotFound);
    assert!(
        server.logs().contains("cannot be loaded"),
        "{}",
        server.logs()
    );

    let deleted = delete_every_version(&server, "future").await;
    assert_eq!(deleted, [1], "a version this replica cannot load");
    assert!(!blob("7d1e-experts").exists() && !root.join("1/head.json").exists());
    assert_eq!(
        server.health("").await,
        Some(ServingStatus::Serving),
        "still serving"
    );
}
