//! TrainHead and Predict against the real server and the real MiniLM: a head
//! learned from labelled sentences classifies held-out sentences; jobs stream
//! their progress, survive their client, can be cancelled; heads persist across
//! restarts, are versioned and deterministic for a seed; bad requests get precise
//! codes.
//!
//! Data: tests/data/topics_{train,test}.tsv, four topics (sports, cooking,
//! technology, weather), 40 training and 10 held-out sentences each.

use crate::common;

use std::{path::Path, time::Duration};

use common::*;
use tlserve::proto::{
    self, predictor_client::PredictorClient, trainer_client::TrainerClient, JobState,
};
use tonic::{transport::Channel, Code, Streaming};

fn train_request(head: &str, rows: &[(String, String)], seed: u64) -> proto::TrainHeadRequest {
    proto::TrainHeadRequest {
        backbone: MINILM.into(),
        head_name: head.into(),
        spec: None,
        training: Some(proto::TrainingConfig {
            epochs: 40,
            learning_rate: 0.02,
            seed,
            ..Default::default()
        }),
        data: Some(proto::train_head_request::Data::Examples(
            proto::ExampleSet {
                examples: examples(rows),
            },
        )),
        labels: vec![],
    }
}

async fn collect(mut stream: Streaming<proto::TrainEvent>) -> Vec<proto::TrainEvent> {
    let mut events = Vec::new();
    while let Some(event) = stream.message().await.expect("event stream") {
        events.push(event);
    }
    events
}

async fn trainer(server: &TestServer) -> TrainerClient<Channel> {
    TrainerClient::new(server.channel().await)
}

async fn predictor(server: &TestServer) -> PredictorClient<Channel> {
    PredictorClient::new(server.channel().await)
}

/// Trains `head` to completion and returns its events.
async fn train(server: &TestServer, request: proto::TrainHeadRequest) -> Vec<proto::TrainEvent> {
    let stream = trainer(server)
        .await
        .train_head(request)
        .await
        .expect("TrainHead")
        .into_inner();
    collect(stream).await
}

async fn predict(
    server: &TestServer,
    head: &str,
    texts: &[&str],
    top_k: u32,
) -> proto::PredictResponse {
    predictor(server)
        .await
        .predict(proto::PredictRequest {
            head: head.into(),
            inputs: texts.iter().map(|t| text_input(t)).collect(),
            top_k,
            ..Default::default()
        })
        .await
        .expect("Predict")
        .into_inner()
}

/// Predicts the top label of `text` with `head` on a connection of its own,
/// in the background.
async fn spawn_predict(
    server: &TestServer,
    head: &str,
    text: &str,
) -> tokio::task::JoinHandle<Result<tonic::Response<proto::PredictResponse>, tonic::Status>> {
    let mut client = predictor(server).await;
    let request = proto::PredictRequest {
        head: head.into(),
        inputs: vec![text_input(text)],
        top_k: 1,
        ..Default::default()
    };
    tokio::spawn(async move { client.predict(request).await })
}

/// Share of `rows` whose label is the top prediction in `response`.
fn accuracy(response: &proto::PredictResponse, rows: &[(String, String)]) -> f64 {
    let correct = response
        .predictions
        .iter()
        .zip(rows)
        .filter(|(p, (label, _))| &p.labels[0].label == label)
        .count();
    correct as f64 / rows.len() as f64
}

/// The server config with the head store in `store`.
fn config_with_store(store: &Path, extra_heads: &str) -> String {
    config_with_store_and_backbone(store, extra_heads, "")
}

fn config_with_store_and_backbone(store: &Path, extra_heads: &str, extra_backbone: &str) -> String {
    format!(
        "[heads]\nstore_dir = \"{}\"\n{extra_heads}\n{}",
        store.display(),
        TestServer::minilm_config("", extra_backbone)
    )
}

#[tokio::test]
async fn predictions_for_different_heads_share_forward_passes() {
    let store = tempfile::tempdir().expect("store dir");
    let server = TestServer::start(&config_with_store_and_backbone(
        store.path(),
        "",
        "max_queue_delay_ms = 50",
    ))
    .await;
    let rows: Vec<_> = read_tsv("topics_train.tsv").into_iter().take(40).collect();
    for head in ["first", "second"] {
        let events = train(&server, train_request(head, &rows, 1)).await;
        assert_eq!(events.last().unwrap().state(), JobState::Succeeded);
    }
    let series = r#"tlserve_inference_batches_total{backbone="all-MiniLM-L6-v2"}"#;
    let before = metric(&server.scrape(), series);
    let texts = read_tsv("topics_test.tsv");
    let mut calls = Vec::new();
    for (i, (_, text)) in texts.iter().take(8).enumerate() {
        let head = if i % 2 == 0 { "first" } else { "second" };
        calls.push(spawn_predict(&server, head, text).await);
    }
    for call in calls {
        let response = call.await.expect("join").expect("Predict").into_inner();
        assert_eq!(response.predictions[0].labels.len(), 1);
    }
    let passes = metric(&server.scrape(), series) - before;
    assert!(
        passes < 8.0,
        "8 predictions over two heads took {passes} forward passes"
    );
}

#[tokio::test]
async fn a_trained_head_classifies_held_out_sentences_and_persists() {
    let store = tempfile::tempdir().expect("store dir");
    let server = TestServer::start(&config_with_store(store.path(), "")).await;
    let train_rows = read_tsv("topics_train.tsv");
    let test_rows = read_tsv("topics_test.tsv");

    let events = train(&server, train_request("topics", &train_rows, 7)).await;
    let states: Vec<JobState> = events.iter().map(|e| e.state()).collect();
    assert_eq!(states.first(), Some(&JobState::Queued), "{states:?}");
    assert_eq!(states.last(), Some(&JobState::Succeeded), "{events:?}");
    let embedding: Vec<_> = events
        .iter()
        .filter(|e| e.state() == JobState::Embedding)
        .collect();
    assert!(!embedding.is_empty());
    let last_embedding = embedding.last().unwrap();
    assert_eq!(last_embedding.embedded, last_embedding.total_inputs);
    assert_eq!(
        last_embedding.total_inputs, 160,
        "every training sentence is distinct"
    );
    let epochs: Vec<u32> = events
        .iter()
        .filter(|e| e.state() == JobState::Training && e.epoch > 0)
        .map(|e| e.epoch)
        .collect();
    assert_eq!(epochs, (1..=40).collect::<Vec<_>>());

    let done = events.last().unwrap();
    let head = done.head.as_ref().expect("the published head");
    assert_eq!((head.name.as_str(), head.version), ("topics", 1));
    assert_eq!(
        head.labels,
        vec!["cooking", "sports", "technology", "weather"]
    );
    assert_eq!(head.train_examples + head.validation_examples, 160);
    assert_eq!(head.validation_examples, 16);
    assert_eq!(head.backbone_fingerprint.len(), 64);

    // Held-out accuracy: sentence embeddings separate these topics easily.
    let texts: Vec<&str> = test_rows.iter().map(|(_, t)| t.as_str()).collect();
    let response = predict(&server, "topics", &texts, 0).await;
    assert_eq!((response.head.as_str(), response.version), ("topics", 1));
    let mut correct = 0;
    for (prediction, (label, _)) in response.predictions.iter().zip(&test_rows) {
        assert_eq!(prediction.labels.len(), 4, "top_k 0 gives every label");
        let total: f32 = prediction.labels.iter().map(|l| l.probability).sum();
        assert!((total - 1.0).abs() < 1e-4, "probabilities sum to {total}");
        assert!(prediction
            .labels
            .windows(2)
            .all(|w| w[0].probability >= w[1].probability));
        correct += usize::from(&prediction.labels[0].label == label);
    }
    let accuracy = correct as f64 / test_rows.len() as f64;
    eprintln!("held-out accuracy of the topics head: {accuracy:.3}");
    assert!(accuracy >= 0.85, "held-out accuracy {accuracy}");

    let top2 = predict(&server, "topics@1", &texts[..1], 2).await;
    assert_eq!(top2.predictions[0].labels.len(), 2);

    // Restart on the same store: the head is still there and answers the same.
    drop(server);
    let server = TestServer::start(&config_with_store(store.path(), "")).await;
    let again = predict(&server, "topics", &texts, 0).await;
    assert_eq!(again.predictions, response.predictions);
    let listed = server
        .models()
        .await
        .list_heads(proto::ListHeadsRequest::default())
        .await
        .expect("ListHeads")
        .into_inner();
    assert_eq!(listed.heads.len(), 1);
    assert_eq!(listed.heads[0].metrics, head.metrics);
}

/// With no training options, a linear head is solved to convergence: the
/// penalty chosen by 5-fold cross-validation (one TRAINING step per strength
/// tried, then the refit on every example), out-of-fold validation metrics
/// with their calibration error. A label seen once cannot be cross-validated
/// and is refused at once.
#[tokio::test]
async fn a_head_without_options_is_cross_validated_and_refit_on_every_example() {
    let store = tempfile::tempdir().expect("store dir");
    let server = TestServer::start(&config_with_store(store.path(), "")).await;
    let train_rows = read_tsv("topics_train.tsv");
    let test_rows = read_tsv("topics_test.tsv");
    let mut request = train_request("default", &train_rows, 3);
    request.training = None;

    let events = train(&server, request.clone()).await;
    let done = events.last().unwrap();
    assert_eq!(done.state(), JobState::Succeeded, "{done:?}");
    let steps: Vec<&proto::TrainEvent> = events
        .iter()
        .filter(|e| e.state() == JobState::Training && e.epoch > 0)
        .collect();
    let numbers: Vec<u32> = steps.iter().map(|e| e.epoch).collect();
    assert_eq!(numbers, (1..=steps.len() as u32).collect::<Vec<_>>());
    assert!(steps.iter().all(|e| e.total_epochs == 16), "{steps:?}");

    let head = done.head.as_ref().expect("the published head");
    let training = head.training.as_ref().expect("training config");
    assert_eq!(training.solver(), proto::Solver::Lbfgs);
    assert_eq!(training.cv_folds, 5);
    assert!(training.l2 > 0.0, "{training:?}");
    assert_eq!((head.train_examples, head.validation_examples), (160, 160));
    let metrics = head.metrics.as_ref().expect("metrics");
    assert!(metrics.validation_accuracy.unwrap() >= 0.85, "{metrics:?}");
    let ece = metrics.validation_ece.expect("calibration error");
    assert!((0.0..0.2).contains(&ece), "{metrics:?}");

    let texts: Vec<&str> = test_rows.iter().map(|(_, t)| t.as_str()).collect();
    let response = predict(&server, "default", &texts, 1).await;
    let accuracy = accuracy(&response, &test_rows);
    eprintln!("held-out accuracy of the default head: {accuracy:.3}");
    assert!(accuracy >= 0.85, "held-out accuracy {accuracy}");

    let mut once = train_rows[..8].to_vec();
    once.push(("rare".into(), "A label seen only once.".into()));
    let mut request = train_request("once", &once, 0);
    request.training = None;
    let status = trainer(&server)
        .await
        .train_head(request)
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("`rare` has a single example"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn the_same_seed_gives_the_same_head_and_versions_increase() {
    let store = tempfile::tempdir().expect("store dir");
    let server = TestServer::start(&config_with_store(store.path(), "")).await;
    let rows: Vec<_> = read_tsv("topics_train.tsv").into_iter().take(60).collect();
    let mut request = train_request("seeded", &rows, 42);
    request.spec = Some(proto::HeadSpec {
        kind: Some(proto::head_spec::Kind::Mlp(proto::MlpHead {
            hidden_size: 32,
            dropout: 0.2,
        })),
    });
    if let Some(training) = request.training.as_mut() {
        training.epochs = 15;
    }
    let first = train(&server, request.clone()).await;
    let second = train(&server, request.clone()).await;
    let head = |events: &[proto::TrainEvent]| events.last().unwrap().head.clone().expect("head");
    let (a, b) = (head(&first), head(&second));
    assert_eq!((a.version, b.version), (1, 2));
    assert_eq!(a.metrics, b.metrics, "same seed, same training");

    let probe = ["The referee blew the final whistle."];
    let p1 = predict(&server, "seeded@1", &probe, 0).await;
    let p2 = predict(&server, "seeded@2", &probe, 0).await;
    assert_eq!(p1.predictions, p2.predictions);

    let mut models = server.models().await;
    let all = models
        .list_heads(proto::ListHeadsRequest {
            backbone: MINILM.into(),
            all_versions: true,
        })
        .await
        .expect("ListHeads")
        .into_inner();
    assert_eq!(all.heads.len(), 2);
    let got = models
        .get_head(proto::GetHeadRequest {
            head: "seeded@1".into(),
        })
        .await
        .expect("GetHead")
        .into_inner();
    assert_eq!(got.version, 1);
    let deleted = models
        .delete_head(proto::DeleteHeadRequest {
            head: "seeded@2".into(),
        })
        .await
        .expect("DeleteHead")
        .into_inner();
    assert_eq!(deleted.deleted_versions, vec![2]);
    let latest = predict(&server, "seeded", &probe, 1).await;
    assert_eq!(latest.version, 1);
    let third = train(&server, request).await;
    assert_eq!(head(&third).version, 3, "versions never go back");
}

#[tokio::test]
async fn jobs_outlive_their_clients_can_be_watched_listed_and_cancelled() {
    let store = tempfile::tempdir().expect("store dir");
    let server =
        TestServer::start(&config_with_store(store.path(), "max_concurrent_jobs = 1")).await;
    let rows: Vec<_> = read_tsv("topics_train.tsv").into_iter().take(40).collect();
    let mut client = trainer(&server).await;

    // A long job: many epochs. Read its first event, then hang up.
    let mut long = train_request("long", &rows, 1);
    if let Some(training) = long.training.as_mut() {
        training.epochs = 10_000;
    }
    let mut stream = client
        .train_head(long)
        .await
        .expect("TrainHead")
        .into_inner();
    let first = stream.message().await.expect("stream").expect("an event");
    let long_id = first.job_id.clone();
    drop(stream);

    // A second job waits for the only training slot.
    let mut short = client
        .train_head(train_request("short", &rows, 2))
        .await
        .expect("TrainHead")
        .into_inner();
    let short_first = short.message().await.expect("stream").expect("an event");
    assert_eq!(short_first.state(), JobState::Queued);

    let jobs = client
        .list_jobs(proto::ListJobsRequest::default())
        .await
        .expect("ListJobs")
        .into_inner()
        .jobs;
    let long_job = jobs.iter().find(|j| j.job_id == long_id).expect("listed");
    assert!(matches!(
        long_job.state(),
        JobState::Queued | JobState::Embedding | JobState::Training
    ));
    assert_eq!(long_job.head_name, "long");

    // Re-attach to the long job, see it train, cancel it.
    let mut watch = client
        .watch_job(proto::WatchJobRequest {
            job_id: long_id.clone(),
        })
        .await
        .expect("WatchJob")
        .into_inner();
    loop {
        let event = watch.message().await.expect("watch").expect("an event");
        if event.state() == JobState::Training && event.epoch >= 1 {
            break;
        }
    }
    let cancelled = client
        .cancel_job(proto::CancelJobRequest {
            job_id: long_id.clone(),
        })
        .await
        .expect("CancelJob")
        .into_inner();
    assert_eq!(cancelled.job_id, long_id);
    let rest = collect(watch).await;
    let last = rest.last().expect("a final event");
    assert_eq!(last.state(), JobState::Cancelled, "{last:?}");
    assert!(!last.error.is_empty());

    // The queued job then runs to the end.
    let short_events = collect(short).await;
    assert_eq!(short_events.last().unwrap().state(), JobState::Succeeded);

    // Cancelling an ended job is refused; unknown jobs are NOT_FOUND.
    let status = client
        .cancel_job(proto::CancelJobRequest { job_id: long_id })
        .await
        .expect_err("already ended");
    assert_eq!(status.code(), Code::FailedPrecondition);
    let status = client
        .watch_job(proto::WatchJobRequest {
            job_id: "no-such-job".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(status.code(), Code::NotFound);
    let finished = client
        .list_jobs(proto::ListJobsRequest {
            include_finished: true,
        })
        .await
        .expect("ListJobs")
        .into_inner();
    assert_eq!(finished.jobs.len(), 2);
}

#[tokio::test]
async fn identical_inputs_are_embedded_once() {
    let store = tempfile::tempdir().expect("store dir");
    let server = TestServer::start(&config_with_store(store.path(), "")).await;
    let rows: Vec<_> = read_tsv("topics_train.tsv").into_iter().take(20).collect();
    let doubled: Vec<_> = rows.iter().chain(rows.iter()).cloned().collect();
    let events = train(&server, train_request("doubled", &doubled, 4)).await;
    let last = events.last().unwrap();
    assert_eq!(last.state(), JobState::Succeeded, "{last:?}");
    let embedding = events
        .iter()
        .rfind(|e| e.state() == JobState::Embedding)
        .expect("an EMBEDDING event");
    assert_eq!(
        embedding.total_inputs, 20,
        "40 examples, 20 distinct inputs"
    );
    let head = last.head.as_ref().unwrap();
    assert_eq!(head.train_examples + head.validation_examples, 40);
    let scrape = server.scrape();
    assert_eq!(metric(&scrape, "tlserve_heads "), 1.0);
    assert_eq!(
        metric(&scrape, r#"tlserve_training_jobs{state="succeeded"}"#),
        1.0
    );
    let items = metric(
        &scrape,
        r#"tlserve_inference_items_total{backbone="all-MiniLM-L6-v2"}"#,
    );
    assert_eq!(
        items, 20.0,
        "the backbone computed each distinct input once"
    );
}

#[tokio::test]
async fn large_sets_arrive_by_upload() {
    let store = tempfile::tempdir().expect("store dir");
    let server = TestServer::start(&config_with_store(store.path(), "")).await;
    let rows = read_tsv("topics_train.tsv");
    let mut client = trainer(&server).await;
    let chunks: Vec<proto::UploadDatasetRequest> = rows
        .chunks(25)
        .map(|chunk| proto::UploadDatasetRequest {
            examples: examples(chunk),
        })
        .collect();
    let dataset = client
        .upload_dataset(tokio_stream::iter(chunks))
        .await
        .expect("UploadDataset")
        .into_inner();
    assert_eq!(dataset.example_count, 160);
    assert_eq!(dataset.label_counts.get("sports"), Some(&40));

    let mut request = train_request("uploaded", &[], 3);
    request.data = Some(proto::train_head_request::Data::DatasetId(
        dataset.dataset_id.clone(),
    ));
    let events = train(&server, request.clone()).await;
    assert_eq!(events.last().unwrap().state(), JobState::Succeeded);
    // An upload trains one job.
    let status = client.train_head(request).await.expect_err("used up");
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn bad_training_and_prediction_requests_get_precise_codes() {
    let store = tempfile::tempdir().expect("store dir");
    let server = TestServer::start(&config_with_store(
        store.path(),
        "max_examples_per_job = 50",
    ))
    .await;
    let rows: Vec<_> = read_tsv("topics_train.tsv").into_iter().take(8).collect();
    let mut client = trainer(&server).await;

    let mut cases: Vec<(proto::TrainHeadRequest, Code, &str)> = Vec::new();
    let mut unknown_backbone = train_request("x", &rows, 0);
    unknown_backbone.backbone = "nope".into();
    cases.push((unknown_backbone, Code::NotFound, "nope"));
    cases.push((
        train_request("../etc", &rows, 0),
        Code::InvalidArgument,
        "head_name",
    ));
    let one_label: Vec<_> = rows
        .iter()
        .map(|(_, t)| ("same".to_string(), t.clone()))
        .collect();
    cases.push((
        train_request("x", &one_label, 0),
        Code::InvalidArgument,
        "two different labels",
    ));
    let mut empty_label = rows.clone();
    empty_label[3].0 = String::new();
    cases.push((
        train_request("x", &empty_label, 0),
        Code::InvalidArgument,
        "example 3: label is empty",
    ));
    let mut empty_text = rows.clone();
    empty_text[2].1 = String::new();
    let mut no_data = train_request("x", &rows, 0);
    no_data.data = None;
    cases.push((no_data, Code::InvalidArgument, "no training data"));
    let too_many: Vec<_> = read_tsv("topics_train.tsv").into_iter().take(51).collect();
    cases.push((
        train_request("x", &too_many, 0),
        Code::ResourceExhausted,
        "at most 50",
    ));
    let mut bad_lr = train_request("x", &rows, 0);
    bad_lr.training.as_mut().unwrap().learning_rate = f32::NAN;
    cases.push((bad_lr, Code::InvalidArgument, "learning_rate"));
    let mut missing_label = train_request("x", &rows, 0);
    missing_label.labels = vec!["sports".into(), "cooking".into()];
    cases.push((missing_label, Code::InvalidArgument, "is not in labels"));
    // `unfreeze_top_layers` is `fine_tuning.top_layers.layers`, bounds and all.
    let mut too_deep = train_request("x", &rows, 0);
    too_deep.training.as_mut().unwrap().unfreeze_top_layers = 7;
    cases.push((
        too_deep,
        Code::InvalidArgument,
        "top_layers.layers must be in [1, 6]",
    ));
    let mut both = lora_request("x", &rows);
    both.training.as_mut().unwrap().unfreeze_top_layers = 2;
    cases.push((
        both,
        Code::InvalidArgument,
        "unfreeze_top_layers is a shorthand",
    ));
    for (change, field) in [
        (
            (|l: &mut proto::LoraFineTuning| l.rank = 999) as fn(&mut _),
            "lora.rank",
        ),
        (|l| l.layers = 7, "lora.layers"),
        (|l| l.alpha = -1.0, "lora.alpha"),
        (|l| l.dropout = 1.5, "lora.dropout"),
        (|l| l.targets = vec!["queries".into()], "lora.targets"),
    ] {
        let mut request = lora_request("x", &rows);
        let training = request.training.as_mut().unwrap();
        if let Some(proto::fine_tuning::Method::Lora(lora)) = training
            .fine_tuning
            .as_mut()
            .and_then(|t| t.method.as_mut())
        {
            change(lora);
        }
        cases.push((request, Code::InvalidArgument, field));
    }
    let mut missing_dataset = train_request("x", &rows, 0);
    missing_dataset.data = Some(proto::train_head_request::Data::DatasetId("gone".into()));
    cases.push((missing_dataset, Code::NotFound, "dataset"));

    for (request, code, fragment) in cases {
        let status = client.train_head(request).await.expect_err("refused");
        assert_eq!(status.code(), code, "{}", status.message());
        assert!(
            status.message().contains(fragment),
            "{:?} lacks {fragment:?}",
            status.message()
        );
    }

    // An empty text is only found while embedding: the job fails with a reason.
    let events = train(&server, train_request("x", &empty_text, 0)).await;
    let last = events.last().unwrap();
    assert_eq!(last.state(), JobState::Failed);
    assert!(last.error.contains("text is empty"), "{}", last.error);

    let mut predictor = predictor(&server).await;
    for (head, code) in [
        ("missing", Code::NotFound),
        ("missing@2", Code::NotFound),
        ("a/b", Code::NotFound),
        ("a/b/c", Code::InvalidArgument),
        ("../b", Code::InvalidArgument),
        ("x@zero", Code::InvalidArgument),
    ] {
        let status = predictor
            .predict(proto::PredictRequest {
                head: head.into(),
                inputs: vec![text_input("hello")],
                ..Default::default()
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), code, "{head}: {}", status.message());
    }
    // The server is still healthy.
    assert_eq!(
        server.health("").await,
        Some(tonic_health::pb::health_check_response::ServingStatus::Serving)
    );
}

#[tokio::test]
async fn a_head_trained_on_other_backbone_weights_is_refused() {
    let store = tempfile::tempdir().expect("store dir");
    let server = TestServer::start(&config_with_store(store.path(), "")).await;
    let rows: Vec<_> = read_tsv("topics_train.tsv").into_iter().take(40).collect();
    let events = train(&server, train_request("stale", &rows, 5)).await;
    assert_eq!(events.last().unwrap().state(), JobState::Succeeded);
    drop(server);

    // Pretend the backbone's weights changed since the head was trained.
    let meta_path = store.path().join("heads/stale/1/head.json");
    let text = std::fs::read_to_string(&meta_path).expect("head.json");
    let mut meta: serde_json::Value = serde_json::from_str(&text).expect("json");
    meta["backbone_fingerprint"] = serde_json::json!("0".repeat(64));
    std::fs::write(&meta_path, meta.to_string()).expect("rewrite");

    let server = TestServer::start(&config_with_store(store.path(), "")).await;
    let status = predictor(&server)
        .await
        .predict(proto::PredictRequest {
            head: "stale".into(),
            inputs: vec![text_input("It will rain all week.")],
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("retrain"), "{}", status.message());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(server.logs().contains("different backbone weights"));
}

/// Waits until the job reports `state` (or ends), returning its last event.
async fn wait_for_state(server: &TestServer, job_id: &str, state: JobState) -> proto::TrainEvent {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let jobs = all_jobs(server).await;
        let job = jobs.iter().find(|j| j.job_id == job_id).expect("listed");
        let last = job.last_event.clone().expect("an event");
        let ended = matches!(
            last.state(),
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        );
        if last.state() == state || ended {
            return last;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "job never reached {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts a job long enough to outlive a shutdown; returns its id once TRAINING.
async fn start_long_job(server: &TestServer, head: &str) -> String {
    let rows: Vec<_> = read_tsv("topics_train.tsv");
    let mut request = train_request(head, &rows, 0);
    request.training = Some(proto::TrainingConfig {
        epochs: 10_000,
        learning_rate: 0.001,
        no_validation: true,
        ..Default::default()
    });
    let mut stream = trainer(server)
        .await
        .train_head(request)
        .await
        .expect("TrainHead")
        .into_inner();
    let first = stream.message().await.expect("event").expect("QUEUED");
    let id = first.job_id.clone();
    // The client goes away; the job runs on.
    drop(stream);
    wait_for_state(server, &id, JobState::Training).await;
    id
}

async fn finished_job(server: &TestServer, id: &str) -> proto::TrainEvent {
    let mut stream = trainer(server)
        .await
        .watch_job(proto::WatchJobRequest {
            job_id: id.to_owned(),
        })
        .await
        .expect("WatchJob after the restart")
        .into_inner();
    let event = stream
        .message()
        .await
        .expect("event")
        .expect("the last event");
    assert!(
        stream.message().await.expect("end").is_none(),
        "an ended job streams one event"
    );
    event
}

/// Two replicas on one store. B starting while A trains a job leaves the job
/// alone: its record stays A's and unended, B lists it as A's, and A goes on
/// training it. Once A is killed and its lease (2 s here) has run out, B's
/// next start takes it over; with one run allowed (`job_attempts = 1`), it
/// records the job FAILED, naming A. (tests/integration/replicas.rs runs taken-over jobs
/// again.)
#[tokio::test]
async fn replicas_sharing_a_store_leave_each_others_jobs_alone() {
    let store = tempfile::tempdir().expect("store dir");
    let config = config_with_store(store.path(), "job_lease_seconds = 2\njob_attempts = 1");
    let replica = |name: &'static str| {
        let server = TestServer::spawn(&config, &[("TLSERVE__SERVER__REPLICA_ID", name)]);
        async move {
            server
                .wait_until(tonic_health::pb::health_check_response::ServingStatus::Serving)
                .await;
            server
        }
    };
    let a = replica("a").await;
    let long = start_long_job(&a, "long").await;
    let record_path = store.path().join(format!("jobs/{long}/record.json"));
    let record = || -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(&record_path).expect("record")).expect("JSON")
    };
    let unended = |record: &serde_json::Value| {
        ["queued", "embedding", "training"].contains(&record["state"].as_str().unwrap_or(""))
    };
    assert_eq!(record()["owner"], "a");
    assert!(unended(&record()), "{}", record());

    let b = replica("b").await;
    let listed = all_jobs(&b).await;
    let seen = listed
        .iter()
        .find(|j| j.job_id == long)
        .expect("B lists A's job");
    assert_ne!(
        seen.last_event.as_ref().expect("an event").state(),
        JobState::Failed,
        "B does not take A's job for dead"
    );
    assert_eq!(record()["owner"], "a");
    assert!(unended(&record()), "B's start left the job alone");
    assert_eq!(
        wait_for_state(&a, &long, JobState::Training).await.state(),
        JobState::Training,
        "A trains on"
    );
    drop(b);

    drop(a); // SIGKILL: the lease is no longer renewed.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let b = replica("b").await;
    wait_for_state(&b, &long, JobState::Failed).await;
    let ended = finished_job(&b, &long).await;
    assert_eq!(ended.state(), JobState::Failed);
    assert!(ended.error.contains("replica a"), "{}", ended.error);
}

/// What a server could not finish is told after its restart: after a
/// graceful shutdown whose grace period a job outlasts, and after a SIGKILL,
/// the restarted server takes those jobs over; with one run allowed
/// (`job_attempts = 1`) it reports them FAILED with the reason, and keeps
/// reporting the jobs that did end. (tests/integration/replicas.rs runs them again.)
#[tokio::test]
async fn jobs_the_server_could_not_finish_are_failed_after_restart() {
    let store = tempfile::tempdir().expect("store dir");
    let config = config_with_store(store.path(), "max_concurrent_jobs = 2\njob_attempts = 1");
    let grace = [("TLSERVE__SERVER__SHUTDOWN_GRACE_SECONDS", "1")];

    // A job that succeeds, and one still training at SIGTERM.
    let server = TestServer::spawn(&config, &grace);
    server
        .wait_until(tonic_health::pb::health_check_response::ServingStatus::Serving)
        .await;
    let rows: Vec<_> = read_tsv("topics_train.tsv").into_iter().take(40).collect();
    let done = train(&server, train_request("done", &rows, 0)).await;
    let done_id = done.last().expect("events").job_id.clone();
    let long = start_long_job(&server, "too-long").await;
    server.terminate();
    let mut server = server;
    assert_eq!(server.wait_exit(Duration::from_secs(30)), Some(0));

    // One more, killed outright.
    let server = TestServer::spawn(&config, &grace);
    server
        .wait_until(tonic_health::pb::health_check_response::ServingStatus::Serving)
        .await;
    let killed = start_long_job(&server, "killed").await;
    drop(server); // SIGKILL

    let server = TestServer::spawn(&config, &grace);
    server
        .wait_until(tonic_health::pb::health_check_response::ServingStatus::Serving)
        .await;
    wait_for_state(&server, &long, JobState::Failed).await;
    wait_for_state(&server, &killed, JobState::Failed).await;
    let ended = finished_job(&server, &done_id).await;
    assert_eq!(ended.state(), JobState::Succeeded);
    assert_eq!(ended.head.as_ref().map(|h| h.version), Some(1));
    let shut_down = finished_job(&server, &long).await;
    assert_eq!(shut_down.state(), JobState::Failed);
    assert!(shut_down.error.contains("shut down"), "{}", shut_down.error);
    let crashed = finished_job(&server, &killed).await;
    assert_eq!(crashed.state(), JobState::Failed);
    assert!(
        crashed.error.contains("stopped before the job finished"),
        "{}",
        crashed.error
    );
    // Neither left a head behind.
    let heads = server
        .models()
        .await
        .list_heads(proto::ListHeadsRequest::default())
        .await
        .expect("ListHeads")
        .into_inner()
        .heads;
    let names: Vec<&str> = heads.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, vec!["done"]);
}

/// A TrainHead that is refused, for bad labels or for a full job queue, gives
/// its uploaded dataset back: the client was told to retry, and retries with
/// the same id.
#[tokio::test]
async fn a_refused_train_head_leaves_its_dataset_usable() {
    let store = tempfile::tempdir().expect("store dir");
    let server = TestServer::start(&config_with_store(
        store.path(),
        "max_concurrent_jobs = 1\nmax_queued_jobs = 0",
    ))
    .await;
    let rows: Vec<_> = read_tsv("topics_train.tsv");
    let mut client = trainer(&server).await;
    let dataset = client
        .upload_dataset(tokio_stream::iter([proto::UploadDatasetRequest {
            examples: examples(&rows),
        }]))
        .await
        .expect("UploadDataset")
        .into_inner();
    let mut request = train_request("retried", &[], 3);
    request.data = Some(proto::train_head_request::Data::DatasetId(
        dataset.dataset_id.clone(),
    ));

    let mut bad_labels = request.clone();
    bad_labels.labels = vec!["sports".into()];
    let status = client.train_head(bad_labels).await.expect_err("bad labels");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    let long = start_long_job(&server, "occupant").await;
    let status = client
        .train_head(request.clone())
        .await
        .expect_err("the only job slot is taken");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    client
        .cancel_job(proto::CancelJobRequest {
            job_id: long.clone(),
        })
        .await
        .expect("CancelJob");
    assert_eq!(
        wait_for_state(&server, &long, JobState::Cancelled)
            .await
            .state(),
        JobState::Cancelled
    );

    let events = train(&server, request).await;
    assert_eq!(events.last().unwrap().state(), JobState::Succeeded);
}

/// A LoRA fine-tuning request on the top two layers, two epochs on every
/// example (the last epoch kept: with a held-out share this small, the frozen
/// head could win and leave the adapters at zero).
fn lora_request(head: &str, rows: &[(String, String)]) -> proto::TrainHeadRequest {
    let mut request = train_request(head, rows, 3);
    request.training = Some(proto::TrainingConfig {
        epochs: 2,
        batch_size: 8,
        seed: 3,
        no_validation: true,
        fine_tuning: Some(proto::FineTuning {
            method: Some(proto::fine_tuning::Method::Lora(proto::LoraFineTuning {
                layers: 2,
                ..Default::default()
            })),
            backbone_learning_rate: 2e-3,
            ..Default::default()
        }),
        ..Default::default()
    });
    request
}

async fn embed_with(server: &TestServer, texts: &[&str], head: &str) -> Vec<Vec<f32>> {
    server
        .embedder()
        .await
        .embed(proto::EmbedRequest {
            head: head.into(),
            ..embed_request(texts)
        })
        .await
        .expect("Embed")
        .into_inner()
        .embeddings
        .into_iter()
        .map(|e| e.values)
        .collect()
}

fn cosine32(a: &[f32], b: &[f32]) -> f64 {
    let b: Vec<f64> = b.iter().map(|&v| f64::from(v)).collect();
    cosine(a, &b)
}

/// The adapted features of `texts` as the training code computes them (the
/// candle graph with the stored adapter): the reference for the server's.
async fn training_features(store: &Path, head: &str, texts: &[&str]) -> Vec<Vec<f32>> {
    let reference = tlserve::head::HeadRef::parse(head).expect("reference");
    let storage =
        tlserve::storage::Storage::open(&tlserve::storage::Location::Volume(store.to_owned()))
            .expect("storage");
    let (_, adapter) = tlserve::head::store::read_head(&storage, &reference)
        .await
        .expect("stored head");
    let adapter = adapter.as_ref().expect("an adapter");
    let config = tlserve::config::Config::from_toml(
        &TestServer::minilm_config("", ""),
        Path::new("."),
        std::iter::empty(),
    )
    .expect("config");
    let model =
        tlserve::backbone::bert::TrainableBert::load(&config.backbones[0], None).expect("model");
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| model.encoder.encode(0, t, true).expect("tokens").ids)
        .collect();
    let flat =
        tlserve::fine_tune::adapted_features(&model.graph, Some(adapter), &ids).expect("features");
    flat.chunks(384).map(<[f32]>::to_vec).collect()
}

/// A server on a store of its own, in f32 (so that its features can be held
/// to the training code's closely), batching for 50 ms.
async fn fine_tuning_server() -> (tempfile::TempDir, String, TestServer) {
    let store = tempfile::tempdir().expect("store dir");
    let config = config_with_store_and_backbone(
        store.path(),
        "",
        "precision = \"f32\"\nmax_queue_delay_ms = 50",
    );
    let server = TestServer::start(&config).await;
    (store, config, server)
}

/// LoRA fine-tuning over the API: the job reports every step's loss and every
/// epoch's metrics (epoch 0: the frozen head it starts from), publishes a head
/// whose record names the method; Predict classifies with the adapted
/// backbone, Embed with the head's name returns the adapted features (those
/// the training code computes, to cosine 0.99999 with the serving engine in
/// f32), frozen and fine-tuned heads share forward passes, and the head and
/// its adapter survive a restart.
#[tokio::test]
async fn lora_fine_tuning_trains_serves_and_persists() {
    let (store, config, server) = fine_tuning_server().await;
    let rows: Vec<_> = read_tsv("topics_train.tsv")
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % 3 == 0)
        .map(|(_, row)| row)
        .take(40)
        .collect();
    let items = r#"tlserve_inference_items_total{backbone="all-MiniLM-L6-v2"}"#;
    let items_before = metric(&server.scrape(), items);
    let events = train(&server, lora_request("tuned", &rows)).await;
    assert_eq!(
        events.last().unwrap().state(),
        JobState::Succeeded,
        "{events:?}"
    );
    // The frozen bottom of every distinct text came through the backbone's
    // queue, reported as the embedding stage.
    let embedded = events
        .iter()
        .rfind(|e| e.state() == JobState::Embedding)
        .expect("an embedding stage");
    assert_eq!((embedded.embedded, embedded.total_inputs), (40, 40));
    assert!(metric(&server.scrape(), items) - items_before >= 40.0);
    let steps: Vec<u32> = events
        .iter()
        .filter(|e| e.step_loss.is_some())
        .map(|e| e.step)
        .collect();
    let planned = events.iter().map(|e| e.total_steps).max().unwrap_or(0);
    assert!(
        planned > 0 && steps == (1..=planned).collect::<Vec<_>>(),
        "{steps:?}"
    );
    assert!(events
        .iter()
        .filter_map(|e| e.step_loss)
        .all(|loss| loss.is_finite() && loss > 0.0));
    let epochs: Vec<u32> = events
        .iter()
        .filter(|e| e.step_loss.is_none() && e.metrics.is_some())
        .filter(|e| e.state() == JobState::Training)
        .map(|e| e.epoch)
        .collect();
    assert_eq!(epochs, [0, 1, 2]);
    let head = events.last().unwrap().head.clone().expect("the head");
    let tuning = head.fine_tuning.as_ref().expect("the fine-tuning record");
    let Some(proto::fine_tuning::Method::Lora(lora)) = &tuning.method else {
        panic!("a LoRA record: {tuning:?}");
    };
    assert_eq!((lora.layers, lora.rank, lora.alpha), (2, 8, 16.0));
    assert_eq!(lora.targets, ["query", "value"]);
    assert_eq!((head.train_examples, head.validation_examples), (40, 0));

    let frozen = train(&server, train_request("frozen", &rows, 3)).await;
    assert_eq!(frozen.last().unwrap().state(), JobState::Succeeded);

    let test_rows = read_tsv("topics_test.tsv");
    let texts: Vec<&str> = test_rows.iter().map(|(_, t)| t.as_str()).collect();
    let response = predict(&server, "tuned", &texts, 1).await;
    let tuned_accuracy = accuracy(&response, &test_rows);
    assert!(tuned_accuracy >= 0.85, "held-out accuracy {tuned_accuracy}");

    let adapted = embed_with(&server, &texts[..6], "tuned").await;
    let base = embed_with(&server, &texts[..6], "").await;
    let reference = training_features(store.path(), "tuned", &texts[..6]).await;
    for ((served, trained), plain) in adapted.iter().zip(&reference).zip(&base) {
        let agreement = cosine32(served, trained);
        assert!(
            agreement >= 0.99999,
            "serving vs training cosine {agreement}"
        );
        assert!(
            cosine32(served, plain) < 0.9999,
            "the adapter changes the features"
        );
    }
    let refused = server
        .embedder()
        .await
        .embed(proto::EmbedRequest {
            head: "frozen".into(),
            ..embed_request(&texts[..1])
        })
        .await
        .expect_err("a frozen head has no adapted features");
    assert_eq!(refused.code(), Code::InvalidArgument);

    // Frozen and fine-tuned heads, asked at once, share forward passes and
    // answer as they do alone.
    shared_passes_answer_as_alone(&server, &texts[..4], ("tuned", &response)).await;

    drop(server);
    let server = TestServer::start(&config).await;
    let again = predict(&server, "tuned", &texts, 1).await;
    assert_eq!(again.predictions, response.predictions);
}

/// Runs `tlserve export-adapter` for `head` of the store of `config`; the
/// folder it wrote.
fn export_adapter(store: &Path, config: &str, head: &str) -> std::path::PathBuf {
    let config_file = store.join("export.toml");
    std::fs::write(&config_file, config).expect("config file");
    let out = store.join(format!("export-{head}"));
    let exported = std::process::Command::new(env!("CARGO_BIN_EXE_tlserve"))
        .args(["export-adapter", "--head", head, "--config"])
        .arg(&config_file)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run tlserve export-adapter");
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    out
}

/// The lowest cosine of `served` against the reference's features with the
/// export, and against its features without it.
fn lowest_cosines(served: &[Vec<f32>], reference: &serde_json::Value) -> (f64, f64) {
    let vectors = |key: &str| -> Vec<Vec<f32>> {
        serde_json::from_value(reference[key].clone()).expect("vectors")
    };
    let (adapted, base) = (vectors("adapted"), vectors("base"));
    let (mut lowest, mut lowest_base) = (1.0f64, 1.0f64);
    for ((ours, theirs), plain) in served.iter().zip(&adapted).zip(&base) {
        lowest = lowest.min(cosine32(ours, theirs));
        lowest_base = lowest_base.min(cosine32(ours, plain));
    }
    (lowest, lowest_base)
}

/// A fine-tuned head's adapter, exported by `tlserve export-adapter`, loads
/// in the Python `peft` package on the same base model, and peft's adapted
/// features match the server's Embed with the head to cosine >= 0.9999 (the
/// server in f32); with the adapter disabled peft gives the base features,
/// which are further away, so the match is the adapter's.
#[tokio::test]
async fn a_lora_export_loads_in_peft_with_the_same_features() {
    let store = tempfile::tempdir().expect("store dir");
    let config = config_with_store_and_backbone(store.path(), "", "precision = \"f32\"");
    let server = TestServer::start(&config).await;
    let rows: Vec<_> = read_tsv("topics_train.tsv").into_iter().take(40).collect();
    let mut request = lora_request("exported", &rows);
    if let Some(proto::fine_tuning::Method::Lora(lora)) = request
        .training
        .as_mut()
        .and_then(|t| t.fine_tuning.as_mut())
        .and_then(|f| f.method.as_mut())
    {
        lora.targets = tlserve::head::fine_tune::LoraTargets::NAMES
            .map(String::from)
            .to_vec();
    }
    let events = train(&server, request).await;
    assert_eq!(events.last().unwrap().state(), JobState::Succeeded);

    let out = export_adapter(store.path(), &config, "exported");

    let test_rows = read_tsv("topics_test.tsv");
    let texts: Vec<&str> = test_rows.iter().take(8).map(|(_, t)| t.as_str()).collect();
    let peft = run_reference_with(
        &peft_python(),
        "peft_features.py",
        &serde_json::json!({
            "model_dir": minilm_dir(),
            "adapter_dir": out,
            "texts": texts,
        }),
    );
    assert_eq!(peft["adapted_modules"], 12, "six projections of two layers");
    let served = embed_with(&server, &texts, "exported").await;
    let (lowest, lowest_base) = lowest_cosines(&served, &peft);
    eprintln!("peft vs tlserve: lowest cosine {lowest:.7}; without the adapter {lowest_base:.5}");
    assert!(lowest >= 0.9999, "peft vs tlserve cosine {lowest}");
    assert!(
        lowest_base < 0.9999,
        "the adapter moved the features ({lowest_base})"
    );
}

/// Fine-tuning of the top layer in full over the API: the record names the
/// method; Predict classifies with the head's own top layer, Embed with the
/// head's name returns its features (those the training code computes, to
/// cosine 0.99999 with the serving engine in f32); the head's texts and a
/// frozen head's share forward passes and answer as they do alone; the head
/// survives a restart; and `tlserve export-adapter` writes the layer under a
/// `BertModel`'s names, which PyTorch loads into the base model to give the
/// same features (cosine >= 0.9999).
#[tokio::test]
async fn top_layer_fine_tuning_trains_serves_persists_and_exports() {
    let (store, config, server) = fine_tuning_server().await;
    let rows: Vec<_> = read_tsv("topics_train.tsv").into_iter().take(40).collect();
    let mut request = lora_request("full", &rows);
    if let Some(tuning) = request
        .training
        .as_mut()
        .and_then(|t| t.fine_tuning.as_mut())
    {
        tuning.method = Some(proto::fine_tuning::Method::TopLayers(
            proto::TopLayersFineTuning { layers: 1 },
        ));
        tuning.backbone_learning_rate = 1e-3;
    }
    let events = train(&server, request).await;
    assert_eq!(
        events.last().unwrap().state(),
        JobState::Succeeded,
        "{events:?}"
    );
    assert!(events.iter().filter_map(|e| e.step_loss).count() >= 10);
    let head = events.last().unwrap().head.clone().expect("the head");
    let method = head.fine_tuning.as_ref().and_then(|t| t.method.clone());
    assert_eq!(
        method,
        Some(proto::fine_tuning::Method::TopLayers(
            proto::TopLayersFineTuning { layers: 1 }
        ))
    );
    let frozen = train(&server, train_request("frozen", &rows, 3)).await;
    assert_eq!(frozen.last().unwrap().state(), JobState::Succeeded);

    let test_rows = read_tsv("topics_test.tsv");
    let texts: Vec<&str> = test_rows.iter().map(|(_, t)| t.as_str()).collect();
    let response = predict(&server, "full", &texts, 1).await;
    let tuned_accuracy = accuracy(&response, &test_rows);
    assert!(tuned_accuracy >= 0.85, "held-out accuracy {tuned_accuracy}");
    let served = embed_with(&server, &texts[..8], "full").await;
    let reference = training_features(store.path(), "full", &texts[..8]).await;
    for (ours, trained) in served.iter().zip(&reference) {
        let agreement = cosine32(ours, trained);
        assert!(
            agreement >= 0.99999,
            "serving vs training cosine {agreement}"
        );
    }
    shared_passes_answer_as_alone(&server, &texts[..4], ("full", &response)).await;

    let out = export_adapter(store.path(), &config, "full");
    let torch = run_reference_with(
        &peft_python(),
        "peft_features.py",
        &serde_json::json!({
            "model_dir": minilm_dir(),
            "layers_file": out.join("top_layers.safetensors"),
            "texts": &texts[..8],
        }),
    );
    assert_eq!(torch["replaced_tensors"], 16, "one layer's 16 tensors");
    let (lowest, lowest_base) = lowest_cosines(&served, &torch);
    eprintln!("PyTorch vs tlserve: lowest cosine {lowest:.7}; base model {lowest_base:.5}");
    assert!(lowest >= 0.9999, "PyTorch vs tlserve cosine {lowest}");
    assert!(
        lowest_base < 0.9999,
        "the layer moved the features ({lowest_base})"
    );

    drop(server);
    let server = TestServer::start(&config).await;
    let again = predict(&server, "full", &texts, 1).await;
    assert_eq!(again.predictions, response.predictions);
}

/// Predictions of `texts` by the head "frozen" and a fine-tuned head, asked
/// at once, share forward passes and answer as each head does alone (the
/// fine-tuned head's answers alone are given).
async fn shared_passes_answer_as_alone(
    server: &TestServer,
    texts: &[&str],
    (tuned, tuned_alone): (&str, &proto::PredictResponse),
) {
    let alone = predict(server, "frozen", texts, 1).await;
    let series = r#"tlserve_inference_batches_total{backbone="all-MiniLM-L6-v2"}"#;
    let before = metric(&server.scrape(), series);
    let mut calls = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        for head in ["frozen", tuned] {
            calls.push((i, head, spawn_predict(server, head, text).await));
        }
    }
    for (i, head, call) in calls {
        let got = call.await.expect("join").expect("Predict").into_inner();
        let expected = if head == "frozen" {
            &alone
        } else {
            tuned_alone
        };
        assert_eq!(
            got.predictions[0].labels[0].label,
            expected.predictions[i].labels[0].label
        );
        let (p, q) = (
            got.predictions[0].labels[0].probability,
            expected.predictions[i].labels[0].probability,
        );
        assert!((p - q).abs() < 1e-4, "{head} on text {i}: {p} alone {q}");
    }
    let passes = metric(&server.scrape(), series) - before;
    let calls = 2.0 * texts.len() as f64;
    assert!(
        passes < calls,
        "{calls} predictions over two heads took {passes} passes"
    );
}

/// With room for one resident adapter, serving two fine-tuned heads in turn
/// drops and reloads adapters from the store (counted in the metrics), and
/// the answers stay what they were.
#[tokio::test]
async fn adapters_beyond_the_resident_bound_are_reloaded_from_the_store() {
    let store = tempfile::tempdir().expect("store dir");
    let config = config_with_store(store.path(), "max_resident_adapters = 1");
    let server = TestServer::start(&config).await;
    let rows: Vec<_> = read_tsv("topics_train.tsv").into_iter().take(40).collect();
    for (seed, head) in [(1, "first"), (2, "second")] {
        let mut request = lora_request(head, &rows);
        request.training.as_mut().expect("training").seed = seed;
        let events = train(&server, request).await;
        assert_eq!(events.last().unwrap().state(), JobState::Succeeded);
    }
    let scrape = server.scrape();
    assert_eq!(metric(&scrape, "tlserve_adapters_resident"), 1.0);
    let loads = || metric(&server.scrape(), "tlserve_adapter_loads_total");
    let before = loads();
    let texts = [
        "The goalkeeper saved a penalty.",
        "Whisk the eggs with sugar.",
    ];
    let first = predict(&server, "first", &texts, 0).await;
    let second = predict(&server, "second", &texts, 0).await;
    let again = predict(&server, "first", &texts, 0).await;
    assert_eq!(again.predictions, first.predictions);
    assert_ne!(first.predictions, second.predictions, "two different heads");
    assert!(
        loads() - before >= 2.0,
        "each switch reads an adapter again"
    );
}
