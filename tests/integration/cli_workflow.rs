//! The transfer-learning workflow through the `tlserve` binary against a real
//! server on loopback: training from image folders, CSV and JSON Lines files,
//! uploads of large sets, server defaults, Ctrl-C and `watch`, and
//! `evaluate`'s figures checked against Predict answers computed here.

use crate::common;

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    fmt::Debug,
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

use common::*;
use serde_json::Value;
use tlserve::proto::{self, predictor_client::PredictorClient, trainer_client::TrainerClient};

const COLOURS: [(&str, [u8; 3]); 3] = [
    ("red", [200, 40, 40]),
    ("green", [40, 200, 40]),
    ("blue", [40, 40, 200]),
];

/// Runs `tlserve ARGS --addr <server>` to its end.
fn tlserve<S: AsRef<OsStr> + Debug>(server: &TestServer, args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tlserve"))
        .args(args)
        .args(["--addr", &server.url()])
        .stdin(Stdio::null())
        .output()
        .expect("run tlserve")
}

/// Runs `tlserve` and returns its JSON output, failing with its stderr.
fn tlserve_json<S: AsRef<OsStr> + Debug>(server: &TestServer, args: &[S]) -> (Value, String) {
    let output = tlserve(server, args);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "tlserve {args:?} failed:\n{stderr}\n{}",
        server.logs()
    );
    let json = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|err| panic!("tlserve {args:?} printed no JSON ({err}):\n{stderr}"));
    (json, stderr)
}

/// `train` of a MiniLM head from a text file, then `extra` split on spaces.
fn train_text(head: &str, file: &Path, extra: &str) -> Vec<String> {
    let mut args: Vec<String> = ["train", "--backbone", MINILM, "--head", head, "--examples"]
        .map(String::from)
        .into();
    args.push(path_str(file).to_owned());
    args.extend(extra.split_whitespace().map(String::from));
    args
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

/// (label, text) pairs of a `LABEL<TAB>TEXT` file of tests/data.
fn topics(file: &str) -> Vec<(String, String)> {
    std::fs::read_to_string(repo_file(&format!("tests/data/{file}")))
        .expect("topics file")
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .map(|(label, text)| (label.to_owned(), text.to_owned()))
        .collect()
}

/// The top label Predict gives each input, in input order.
async fn predicted_labels(
    server: &TestServer,
    head: &str,
    inputs: Vec<proto::Input>,
) -> Vec<String> {
    PredictorClient::new(server.channel().await)
        .predict(proto::PredictRequest {
            head: head.to_owned(),
            inputs,
            top_k: 1,
            ..Default::default()
        })
        .await
        .expect("Predict")
        .into_inner()
        .predictions
        .into_iter()
        .map(|p| p.labels[0].label.clone())
        .collect()
}

/// Checks `evaluate --json` output against (true, predicted) pairs, with the
/// metrics computed here from their definitions.
fn assert_evaluation_matches(json: &Value, truth: &[String], predicted: &[String]) {
    assert_eq!(truth.len(), predicted.len());
    let mut counts: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for (t, p) in truth.iter().zip(predicted) {
        *counts.entry((t.as_str(), p.as_str())).or_default() += 1;
    }
    let count = |t: &str, p: &str| counts.get(&(t, p)).copied().unwrap_or(0);
    let correct = truth.iter().zip(predicted).filter(|(t, p)| t == p).count();
    let close = |got: &Value, want: f64, what: &str| {
        let got = got
            .as_f64()
            .unwrap_or_else(|| panic!("{what} is not a number: {json}"));
        assert!((got - want).abs() < 1e-9, "{what}: {got} != {want}\n{json}");
    };
    assert_eq!(json["examples"], truth.len());
    close(
        &json["accuracy"],
        correct as f64 / truth.len() as f64,
        "accuracy",
    );

    let labels: Vec<String> =
        serde_json::from_value(json["confusion_matrix"]["labels"].clone()).expect("labels");
    let matrix = &json["confusion_matrix"]["rows_true_columns_predicted"];
    for (row, t) in labels.iter().enumerate() {
        for (column, p) in labels.iter().enumerate() {
            assert_eq!(
                matrix[row][column],
                count(t, p),
                "confusion {t} -> {p}\n{json}"
            );
        }
    }
    for entry in json["per_label"].as_array().expect("per_label") {
        let label = entry["label"].as_str().expect("label");
        let tp = count(label, label) as f64;
        let support = truth.iter().filter(|t| *t == label).count() as f64;
        let predicted_as = predicted.iter().filter(|p| *p == label).count() as f64;
        let precision = if predicted_as > 0.0 {
            tp / predicted_as
        } else {
            0.0
        };
        let recall = if support > 0.0 { tp / support } else { 0.0 };
        let f1 = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        close(&entry["precision"], precision, "precision");
        close(&entry["recall"], recall, "recall");
        close(&entry["f1"], f1, "f1");
        assert_eq!(entry["support"], support as u64);
    }
}

/// Two heads' metrics agree to float rounding.
fn assert_same_fit(a: &Value, b: &Value) {
    for key in [
        "train_loss",
        "train_accuracy",
        "validation_loss",
        "validation_accuracy",
    ] {
        let (x, y) = (a[key].as_f64(), b[key].as_f64());
        let close = match (x, y) {
            (Some(x), Some(y)) => (x - y).abs() < 1e-3,
            (x, y) => x == y,
        };
        assert!(close, "{key}: {a} vs {b}");
    }
}

fn image_server_config() -> String {
    format!("[limits]\n{}", lite0_backbone_toml())
}

#[tokio::test]
async fn image_folders_upload_in_chunks_and_evaluate_as_predict_answers() {
    let server = TestServer::start(&image_server_config()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let train_dir = dir.path().join("train");
    // Noisy 320 x 320 images: each PNG and WebP is about 300 KB, so the set
    // passes the 1 MiB upload chunk several times.
    let written = colour_folder(&train_dir, &COLOURS, 6, 320, 1);
    std::fs::write(train_dir.join("red").join("notes.txt"), "not an image").expect("notes");
    std::fs::write(
        train_dir.join("blue").join("broken.jpg"),
        b"\xFF\xD8\xFFcut",
    )
    .expect("bad");
    let train = path_str(&train_dir);
    let base = [
        "train",
        "--backbone",
        LITE0,
        "--head",
        "colours",
        "--images",
        train,
    ];

    let refused = tlserve(&server, &base);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a bad image must stop the job");
    assert!(
        stderr.contains("broken.jpg"),
        "the bad image is named:\n{stderr}"
    );
    assert!(stderr.contains("--skip-bad"), "{stderr}");
    assert!(stderr.contains("skipped 1 files"), "{stderr}");

    let mut args = base.to_vec();
    args.extend(["--skip-bad", "--upload-threshold-bytes", "1"]);
    let (head, stderr) = tlserve_json(&server, &args);
    let uploaded = format!("uploaded {} examples", written.len());
    assert!(stderr.contains(&uploaded), "{stderr}");
    assert_eq!(head["train_examples"], written.len(), "{head}");
    assert_eq!(head["labels"], serde_json::json!(["blue", "green", "red"]));

    // Held-out images, some of them of blended colours, so that the head has
    // errors to count.
    let test_dir = dir.path().join("test");
    let mut test = colour_folder(&test_dir, &COLOURS, 3, 64, 2);
    let blends = [("red", [150, 40, 150]), ("blue", [40, 150, 150])];
    let blend_dir = dir.path().join("blends");
    for mut image in colour_folder(&blend_dir, &blends, 2, 64, 3) {
        let name = image
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name");
        let moved = test_dir.join(&image.label).join(format!("blend-{name}"));
        std::fs::rename(&image.path, &moved).expect("move");
        image.path = moved;
        test.push(image);
    }
    let test_folder = path_str(&test_dir);
    let evaluate = ["evaluate", "--head", "colours", "--images", test_folder];
    let mut as_json = evaluate.to_vec();
    as_json.extend(["--json", "--batch-size", "4"]);
    let (json, _) = tlserve_json(&server, &as_json);
    // The folder reader visits classes and files in name order.
    test.sort_by(|a, b| a.path.cmp(&b.path));
    let inputs = test
        .iter()
        .map(|image| image_input(std::fs::read(&image.path).expect("image")))
        .collect();
    let predicted = predicted_labels(&server, "colours", inputs).await;
    let truth: Vec<String> = test.iter().map(|image| image.label.clone()).collect();
    assert_evaluation_matches(&json, &truth, &predicted);
    assert_eq!(json["head"], "colours");
    assert_eq!(json["version"], 1);
}

#[tokio::test]
async fn csv_and_json_lines_train_the_same_head_as_tab_separated_lines() {
    let server = TestServer::start_minilm().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let rows = topics("topics_train.tsv");
    let csv_path = dir.path().join("train.csv");
    let mut writer = csv::Writer::from_path(&csv_path).expect("csv");
    writer
        .write_record(["id", "sentence", "topic"])
        .expect("header");
    for (i, (label, text)) in rows.iter().enumerate() {
        writer
            .write_record([&i.to_string(), text, label])
            .expect("row");
    }
    writer.flush().expect("flush");
    let jsonl_path = dir.path().join("train.data");
    let lines: Vec<String> = rows
        .iter()
        .map(|(label, text)| serde_json::json!({"body": text, "topic": label}).to_string())
        .collect();
    std::fs::write(&jsonl_path, lines.join("\n")).expect("jsonl");

    let tsv = repo_file("tests/data/topics_train.tsv");
    let from_tsv = tlserve_json(&server, &train_text("from-tsv", &tsv, "")).0;
    let columns = "--text-column sentence --label-column topic";
    let from_csv = tlserve_json(&server, &train_text("from-csv", &csv_path, columns)).0;
    let columns = "--format jsonl --text-column body --label-column topic";
    let from_jsonl = tlserve_json(&server, &train_text("from-jsonl", &jsonl_path, columns)).0;
    for head in [&from_csv, &from_jsonl] {
        assert_eq!(head["train_examples"], rows.len());
        assert_eq!(head["labels"], from_tsv["labels"]);
        // The same examples in the same order with the same seed: the same fit
        // (up to the rounding of batches the server may form differently).
        assert_same_fit(&head["metrics"], &from_tsv["metrics"]);
    }
}

#[tokio::test]
async fn options_not_given_take_the_servers_defaults() {
    let server = TestServer::start_minilm().await;
    let tsv = repo_file("tests/data/topics_train.tsv");
    tlserve_json(&server, &train_text("defaults", &tsv, ""));
    let head = server
        .models()
        .await
        .get_head(proto::GetHeadRequest {
            head: "defaults".into(),
        })
        .await
        .expect("GetHead")
        .into_inner();
    let training = head.training.expect("training config");
    // With nothing set the server trains a linear head with cross-validated
    // L-BFGS; an epoch count or learning rate sent by the client would have
    // made it AdamW.
    assert_eq!(training.solver(), proto::Solver::Lbfgs, "{training:?}");
    assert_eq!(training.epochs, 0, "{training:?}");
    assert_eq!(training.cv_folds, 5, "{training:?}");

    let refused = tlserve(&server, &train_text("zero", &tsv, "--epochs 0"));
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--epochs 0"));
}

#[tokio::test]
async fn holdout_is_a_seeded_stratified_share_evaluated_at_the_end() {
    let server = TestServer::start_minilm().await;
    let csv = repo_file("tests/data/topics_train.csv");
    let options = "--text-column sentence --label-column topic --holdout 0.25 --seed 3";
    let train = |head: &str| tlserve_json(&server, &train_text(head, &csv, options));
    let (first, stderr) = train("held");
    assert!(
        stderr.contains("true \\ predicted"),
        "the tables on stderr:\n{stderr}"
    );
    let holdout = &first["holdout"];
    // 40 examples of each of 4 topics: 10 of each held out, 30 trained on.
    assert_eq!(first["train_examples"], 120, "{first}");
    assert_eq!(holdout["examples"], 40, "{holdout}");
    for entry in holdout["per_label"].as_array().expect("per_label") {
        assert_eq!(entry["support"], 10, "{holdout}");
    }
    assert_eq!(holdout["head"], "held");
    assert_eq!(holdout["version"], 1);

    let (again, _) = train("held-again");
    assert_eq!(
        again["holdout"]["confusion_matrix"],
        holdout["confusion_matrix"]
    );
    assert_same_fit(&again["metrics"], &first["metrics"]);
}

#[tokio::test]
async fn evaluate_on_text_reports_what_predict_answers() {
    let server = TestServer::start_minilm().await;
    let tsv = repo_file("tests/data/topics_train.tsv");
    // A few epochs of AdamW leave a head that still makes mistakes to count.
    let rough = "--epochs 2 --learning-rate 0.002";
    tlserve_json(&server, &train_text("rough", &tsv, rough));
    let jsonl = repo_file("tests/data/topics_test.jsonl");
    let evaluate = [
        "evaluate",
        "--head",
        "rough",
        "--examples",
        path_str(&jsonl),
    ];
    let mut as_json = evaluate.to_vec();
    as_json.extend(["--json", "--batch-size", "7"]);
    let (json, _) = tlserve_json(&server, &as_json);
    let test = topics("topics_test.tsv");
    let inputs = test.iter().map(|(_, text)| text_input(text)).collect();
    let predicted = predicted_labels(&server, "rough", inputs).await;
    let truth: Vec<String> = test.into_iter().map(|(label, _)| label).collect();
    assert_evaluation_matches(&json, &truth, &predicted);

    let table = tlserve(&server, &evaluate);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("precision  recall"), "{table}");
    assert!(table.contains("true \\ predicted"), "{table}");
}

/// Spawns `tlserve ARGS`; returns the child and its stderr lines as they come.
fn spawn_cli<S: AsRef<OsStr>>(
    server: &TestServer,
    args: &[S],
) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tlserve"))
        .args(args)
        .args(["--addr", &server.url()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tlserve");
    let stderr = child.stderr.take().expect("stderr");
    let (lines, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    (child, receiver)
}

/// The job id of the `job ID ...` line, waiting for it.
fn job_line(lines: &mpsc::Receiver<String>) -> String {
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(120))
            .expect("a `job ID` line on stderr");
        if let Some(rest) = line.strip_prefix("job ") {
            return rest.split_whitespace().next().expect("an id").to_owned();
        }
    }
}

fn rest_of(lines: &mpsc::Receiver<String>) -> String {
    lines.iter().collect::<Vec<_>>().join("\n")
}

async fn job_state(server: &TestServer, id: &str) -> proto::JobState {
    all_jobs(server)
        .await
        .iter()
        .find(|job| job.job_id == id)
        .expect("the job is listed")
        .state()
}

#[tokio::test]
async fn ctrl_c_leaves_the_job_running_and_watch_re_attaches() {
    let server = TestServer::start_minilm().await;
    let tsv = repo_file("tests/data/topics_train.tsv");
    // Far more steps than the test needs: the job is still running when it
    // is interrupted, and it ends by CancelJob.
    let long = "--mlp-hidden 1024 --epochs 10000 --batch-size 1 --no-validation";
    let (mut train, lines) = spawn_cli(&server, &train_text("long", &tsv, long));
    let id = job_line(&lines);
    let interrupt = Command::new("kill")
        .args(["-INT", &train.id().to_string()])
        .status()
        .expect("kill");
    assert!(interrupt.success());
    let status = train.wait().expect("wait");
    let stderr = rest_of(&lines);
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains(&format!("tlserve watch {id}")), "{stderr}");
    assert!(!is_final(job_state(&server, &id).await), "the job runs on");

    let (mut watch, lines) = spawn_cli(&server, &["watch", &id]);
    assert_eq!(job_line(&lines), id);
    TrainerClient::new(server.channel().await)
        .cancel_job(proto::CancelJobRequest { job_id: id.clone() })
        .await
        .expect("CancelJob");
    let status = watch.wait().expect("wait");
    let stderr = rest_of(&lines);
    assert!(!status.success());
    assert!(
        stderr.contains(&format!("job {id} was cancelled")),
        "{stderr}"
    );
    assert_eq!(job_state(&server, &id).await, proto::JobState::Cancelled);
}

fn is_final(state: proto::JobState) -> bool {
    matches!(
        state,
        proto::JobState::Succeeded | proto::JobState::Failed | proto::JobState::Cancelled
    )
}

/// `tlserve bench-finetune` fits the default frozen head and a LoRA
/// fine-tuned one on the same training file and measures both on the test
/// file, with real MiniLM weights: one JSON line with both accuracies. The
/// topics are easy, so both must classify most of the held-out texts.
#[test]
fn bench_finetune_measures_lora_against_the_frozen_head() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("tlserve.toml");
    std::fs::write(&config, TestServer::minilm_config("", "")).expect("config");
    let output = Command::new(env!("CARGO_BIN_EXE_tlserve"))
        .args([
            "bench-finetune",
            "--config",
            path_str(&config),
            "--backbone",
            MINILM,
        ])
        .args([
            "--train",
            path_str(&repo_file("tests/data/topics_train.tsv")),
        ])
        .args(["--test", path_str(&repo_file("tests/data/topics_test.tsv"))])
        .args(["--layers", "1", "--epochs", "2", "--learning-rate", "2e-3"])
        .output()
        .expect("run tlserve bench-finetune");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("epoch 0:"), "progress is shown: {stderr}");
    let result: Value = serde_json::from_slice(&output.stdout).expect("one JSON object");
    assert_eq!(result["train_examples"], 160);
    assert_eq!(result["test_examples"], 40);
    assert_eq!(result["classes"], 4);
    let method = &result["settings"]["method"];
    assert_eq!(method["type"], "lora");
    assert_eq!(method["layers"], 1);
    for key in ["frozen_test_accuracy", "tuned_test_accuracy"] {
        let accuracy = result[key].as_f64().expect(key);
        assert!(accuracy >= 0.85, "{key} {accuracy}: {result}");
    }
}
