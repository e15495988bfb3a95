//! Runs the grpcurl, CLI, Python, Node.js and OpenAI-API examples of README.md
//! against a real server, so the README stays true. Polyglot proof: grpcurl (Go,
//! via reflection with no proto files), a Python grpcio client, a Node.js
//! grpc-js client, curl and the `openai` SDK on the HTTP port get the same
//! vectors as the Rust client.
//!
//! README blocks marked `<!-- tested:NAME -->` hold one command per line (a
//! trailing `\` continues a line). Commands run with `sh -c`, with the server's
//! addresses put in place of `localhost:50051` (gRPC) and `localhost:8080` (HTTP).

use crate::common;

use std::process::Command;

use common::*;
use serde_json::Value;

/// The text of the fenced block after `<!-- tested:{name} -->`.
fn readme_block(name: &str) -> String {
    let readme = std::fs::read_to_string(repo_file("README.md")).expect("README.md");
    let marker = format!("<!-- tested:{name} -->");
    let after = readme
        .split_once(&marker)
        .unwrap_or_else(|| panic!("README.md has no {marker} block"))
        .1;
    after
        .split_once("```")
        .and_then(|(_, rest)| rest.split_once('\n'))
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("a fenced block after the marker")
        .0
        .to_owned()
}

/// The commands of the fenced block after `<!-- tested:{name} -->`.
fn readme_commands(name: &str) -> Vec<String> {
    let block = readme_block(name);
    let mut commands = Vec::new();
    let mut current = String::new();
    for line in block.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(part) = line.strip_suffix('\\') {
            current.push_str(part);
            continue;
        }
        current.push_str(line);
        commands.push(std::mem::take(&mut current));
    }
    assert!(!commands.is_empty(), "the {name} block has no commands");
    commands
}

/// Runs a README command in the repository; returns its standard output.
fn run(command: &str, server: &TestServer) -> String {
    run_in(command, server, &repo_root())
}

/// Runs a README command in `dir`; returns its standard output.
fn run_in(command: &str, server: &TestServer, dir: &std::path::Path) -> String {
    let command = command
        .replace("localhost:50051", &server.grpc.to_string())
        .replace("localhost:8080", &server.http.to_string());
    let venv_bin = python().parent().expect("bin").to_owned();
    let tlserve_bin = std::path::Path::new(env!("CARGO_BIN_EXE_tlserve"))
        .parent()
        .expect("target dir")
        .to_owned();
    let path = format!(
        "{}:{}:{}",
        tlserve_bin.display(),
        venv_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = Command::new("sh")
        .args(["-c", &command])
        .current_dir(dir)
        .env("PATH", path)
        .env("TLSERVE_ADDR", server.url())
        .output()
        .expect("run sh");
    assert!(
        output.status.success(),
        "`{command}` failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// The server's own answer for one text, through the Rust client.
async fn rust_vector(server: &TestServer, text: &str) -> Vec<f32> {
    server
        .embedder()
        .await
        .embed(embed_request(&[text]))
        .await
        .expect("Embed")
        .into_inner()
        .embeddings
        .remove(0)
        .values
}

fn assert_same_vector(label: &str, got: &Value, expected: &[f32]) {
    let got: Vec<f32> = serde_json::from_value(got.clone()).expect("a float array");
    assert_eq!(got.len(), expected.len(), "{label}: length");
    let max_diff = got
        .iter()
        .zip(expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    // Same server, same single-item forward pass: only float printing may differ.
    assert!(max_diff < 1e-6, "{label}: differs by {max_diff}");
}

const SAMPLE: &str = "A cat sits on the mat.";

#[tokio::test]
async fn grpcurl_examples_work_through_reflection() {
    assert!(grpcurl().is_file());
    let server = TestServer::start_minilm().await;
    let expected = rust_vector(&server, SAMPLE).await;
    let commands = readme_commands("grpcurl");
    let mut checked = 0;
    for command in &commands {
        let out = run(command, &server);
        if command.contains(" list") {
            for service in [
                "tlserve.v1.Embedder",
                "tlserve.v1.Models",
                "tlserve.v1.Predictor",
                "tlserve.v1.Trainer",
                "grpc.health.v1.Health",
            ] {
                assert!(out.contains(service), "list lacks {service}:\n{out}");
            }
        } else if command.contains(" describe ") {
            assert!(out.contains("rpc Embed"), "{out}");
        } else if command.contains("Embedder/Embed") {
            let json: Value = serde_json::from_str(&out).expect("grpcurl prints JSON");
            assert_eq!(json["dimension"], 384);
            assert!(command.contains(SAMPLE), "the example embeds {SAMPLE:?}");
            assert_same_vector("grpcurl", &json["embeddings"][0]["values"], &expected);
        } else if command.contains("Health/Check") {
            assert!(out.contains("SERVING"), "{out}");
        } else if command.contains("ListBackbones") {
            assert!(out.contains(MINILM), "{out}");
        } else if command.contains("Trainer/TrainHead") {
            assert!(out.contains("JOB_STATE_QUEUED"), "{out}");
            assert!(out.contains("JOB_STATE_TRAINING"), "{out}");
            assert!(out.contains("JOB_STATE_SUCCEEDED"), "{out}");
        } else if command.contains("Predictor/Predict") {
            let json: Value = serde_json::from_str(&out).expect("grpcurl prints JSON");
            let best = &json["predictions"][0]["labels"][0];
            assert_eq!(best["label"], "positive", "{out}");
            assert!(best["probability"].as_f64().unwrap() > 0.5, "{out}");
        } else {
            panic!("no check for README command `{command}`");
        }
        checked += 1;
    }
    assert!(checked >= 6);
}

#[tokio::test]
async fn cli_examples_print_json() {
    let server = TestServer::start_minilm().await;
    let expected = rust_vector(&server, SAMPLE).await;
    for command in readme_commands("cli") {
        let out = run(&command, &server);
        let json: Value = serde_json::from_str(&out).expect("the CLI prints JSON");
        if command.starts_with("tlserve embed") {
            let embeddings = json["embeddings"].as_array().expect("embeddings");
            assert!(!embeddings.is_empty());
            assert_same_vector("cli", &embeddings[0]["values"], &expected);
        } else if command.starts_with("tlserve backbones") {
            assert_eq!(json["backbones"][0]["name"], MINILM);
            assert_eq!(json["backbones"][0]["state"], "BACKBONE_STATE_READY");
        } else if command.contains("| tlserve embed") {
            let embeddings = json["embeddings"].as_array().expect("embeddings");
            assert_eq!(embeddings.len(), 2, "two lines in, two vectors out");
            assert_same_vector("cli stdin", &embeddings[0]["values"], &expected);
        } else {
            panic!("no check for README command `{command}`");
        }
    }
}

#[tokio::test]
async fn cli_training_examples_train_predict_and_list() {
    let server = TestServer::start_minilm().await;
    for command in readme_commands("cli-heads") {
        let out = run(&command, &server);
        let json: Value = serde_json::from_str(&out).expect("the CLI prints JSON");
        if command.starts_with("tlserve train") {
            assert_eq!(json["name"], "topics");
            assert_eq!(json["version"], 1);
            assert_eq!(json["labels"].as_array().map(Vec::len), Some(4));
        } else if command.starts_with("tlserve predict") {
            let predictions = json["predictions"].as_array().expect("predictions");
            assert_eq!(predictions[0][0]["label"], "weather", "{out}");
            assert_eq!(predictions[1][0]["label"], "sports", "{out}");
        } else if command.starts_with("tlserve heads") {
            assert_eq!(json["heads"][0]["name"], "topics");
        } else {
            panic!("no check for README command `{command}`");
        }
    }
}

#[tokio::test]
async fn python_client_gets_the_same_vectors() {
    let server = TestServer::start_minilm().await;
    let expected = rust_vector(&server, SAMPLE).await;
    let commands = readme_commands("python");
    assert_eq!(commands.len(), 1);
    let command = commands[0].replacen("python ", &format!("{} ", python().display()), 1);
    let out = run(&command, &server);
    let json: Value = serde_json::from_str(&out).expect("the Python client prints JSON");
    assert_eq!(json["dimension"], 384);
    assert_same_vector("python", &json["embeddings"][0], &expected);
}

#[tokio::test]
async fn openai_examples_get_the_grpc_vector() {
    let server = TestServer::start_minilm().await;
    let expected = rust_vector(&server, SAMPLE).await;
    let commands = readme_commands("openai");
    assert_eq!(commands.len(), 2);
    let curl: Value = serde_json::from_str(&run(&commands[0], &server)).expect("curl prints JSON");
    assert_eq!(curl["model"], MINILM);
    assert_same_vector("curl", &curl["data"][0]["embedding"], &expected);
    let command = commands[1].replacen("python ", &format!("{} ", python().display()), 1);
    let sdk: Value =
        serde_json::from_str(&run(&command, &server)).expect("the SDK client prints JSON");
    assert_same_vector("openai", &sdk["embeddings"][0], &expected);
}

/// Checks that Node.js and the client's packages are installed; panics with
/// the fix (scripts/setup-node.sh) when they are not.
fn assert_node_client_installed() {
    let version = Command::new("node")
        .arg("--version")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned());
    let Some(version) = version else {
        panic!("node is not on PATH: run scripts/setup-node.sh");
    };
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|major| major.parse().ok())
        .unwrap_or(0);
    assert!(
        major >= 18,
        "node {version} is too old for examples/node (18 or newer): run scripts/setup-node.sh"
    );
    for package in ["@grpc/grpc-js", "@grpc/proto-loader"] {
        let dir = repo_root().join("examples/node/node_modules").join(package);
        assert!(
            dir.join("package.json").is_file(),
            "{} is missing: run scripts/setup-node.sh",
            dir.display()
        );
    }
}

/// The distinct labels of a JSON Lines file of `{"text", "label"}` objects, sorted.
fn jsonl_labels(path: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo_file(path)).expect("examples file");
    let labels: std::collections::BTreeSet<String> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let row: Value = serde_json::from_str(line).expect("a JSON line");
            row["label"].as_str().expect("a label").to_owned()
        })
        .collect();
    labels.into_iter().collect()
}

#[tokio::test]
async fn node_client_embeds_trains_and_predicts() {
    assert_node_client_installed();
    let server = TestServer::start_minilm().await;
    let expected = rust_vector(&server, SAMPLE).await;
    let labels = jsonl_labels("examples/node/reviews.jsonl");
    assert_eq!(labels, ["negative", "positive"]);
    let commands = readme_commands("node");
    for command in &commands {
        if command.ends_with("npm ci") {
            // scripts/setup-node.sh has run this very `npm ci` (checked above);
            // running it again would need the registry and replace node_modules.
            continue;
        }
        let out = run(command, &server);
        let json: Value = serde_json::from_str(&out).expect("the Node.js client prints JSON");
        if command.contains(" embed ") {
            assert_eq!(json["dimension"], 384, "{out}");
            assert!(command.contains(SAMPLE), "the example embeds {SAMPLE:?}");
            assert_same_vector("node", &json["embeddings"][0], &expected);
        } else if command.contains(" train ") {
            assert_eq!(json["state"], "JOB_STATE_SUCCEEDED", "{out}");
            assert_eq!(json["head"], "reviews", "{out}");
            assert_eq!(json["version"], 1, "{out}");
            assert_eq!(json["labels"], serde_json::json!(labels), "{out}");
        } else if command.contains(" predict ") {
            assert_eq!(json["head"], "reviews", "{out}");
            assert_eq!(json["version"], 1, "{out}");
            let predictions = json["predictions"].as_array().expect("predictions");
            assert_eq!(predictions.len(), 2, "{out}");
            let best: Vec<&str> = predictions
                .iter()
                .map(|p| p["labels"][0]["label"].as_str().expect("a label"))
                .collect();
            assert!(
                best.iter().all(|label| labels.iter().any(|l| l == label)),
                "{out}"
            );
            assert_eq!(best, ["positive", "negative"], "{out}");
        } else {
            panic!("no check for README command `{command}`");
        }
    }
    assert_eq!(commands.len(), 4);

    // A failed call: the status code's name and message on stderr, exit 1.
    let failed = Command::new("node")
        .arg(repo_file("examples/node/client.js"))
        .args(["--addr", &server.grpc.to_string()])
        .args(["predict", "--head", "no-such-head", "text"])
        .output()
        .expect("run node");
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: NOT_FOUND: "), "{stderr}");
}

#[tokio::test]
async fn image_examples_classify_and_embed_real_photos() {
    let server = TestServer::start(&format!(
        "{}{}",
        TestServer::minilm_config("", ""),
        lite0_backbone_toml()
    ))
    .await;
    for name in ["chelsea.png", "coffee.png", "grace_hopper.jpg"] {
        test_image(name);
    }
    let indices = |labels: &Value| -> Vec<u64> {
        labels
            .as_array()
            .expect("labels")
            .iter()
            .map(|l| l["index"].as_u64().expect("index"))
            .collect()
    };
    let commands = readme_commands("images");
    for command in &commands {
        let out = run(command, &server);
        let json: Value = serde_json::from_str(&out).expect("JSON output");
        if command.starts_with("tlserve predict") {
            let predictions = json["predictions"].as_array().expect("predictions");
            let cat = indices(&predictions[0]);
            assert!(cat.iter().any(|i| (281..=285).contains(i)), "{out}");
            let coffee = indices(&predictions[1]);
            assert!(coffee.iter().any(|i| [967, 968, 504].contains(i)), "{out}");
        } else if command.starts_with("tlserve embed") {
            assert_eq!(json["dimension"], 1280, "{out}");
            let values = json["embeddings"][0]["values"].as_array().expect("values");
            assert_eq!(values.len(), 1280);
        } else if command.contains("Predictor/Predict") {
            assert_eq!(json["head"], "efficientnet-lite0/imagenet", "{out}");
            assert_eq!(
                json["predictions"][0]["labels"][0]["label"], "espresso",
                "{out}"
            );
        } else {
            panic!("no check for README command `{command}`");
        }
    }
    assert_eq!(commands.len(), 3);
}

#[tokio::test]
async fn cli_data_set_examples_train_evaluate_upload_and_watch() {
    let server = TestServer::start_minilm().await;
    let commands = readme_commands("cli-files");
    for command in &commands {
        let out = run(command, &server);
        if command.starts_with("tlserve evaluate") && !command.contains("--json") {
            assert!(out.starts_with("head topics-csv@1\naccuracy "), "{out}");
            assert!(out.contains("true \\ predicted"), "{out}");
            continue;
        }
        let json: Value = serde_json::from_str(&out).expect("the CLI prints JSON");
        if command.contains("--holdout 0.2") {
            assert_eq!(json["name"], "topics-csv");
            // 40 examples of each of 4 topics, a fifth of each held out.
            assert_eq!(json["train_examples"], 128, "{out}");
            assert_eq!(json["holdout"]["examples"], 32, "{out}");
        } else if command.starts_with("tlserve evaluate") {
            assert_eq!(json["examples"], 40, "{out}");
            let accuracy = json["accuracy"].as_f64().expect("accuracy");
            assert!(
                accuracy >= 0.8,
                "a topic head sorts held-out sentences: {out}"
            );
        } else if command.contains("--upload-threshold-bytes") {
            assert_eq!(json["name"], "topics-uploaded");
            assert_eq!(json["train_examples"], 160, "{out}");
        } else if command.starts_with("tlserve watch") {
            assert_eq!(json["name"], "topics-later", "{out}");
            assert_eq!(json["version"], 1, "{out}");
        } else {
            panic!("no check for README command `{command}`");
        }
    }
    assert_eq!(commands.len(), 5);
}

#[tokio::test]
async fn cli_fine_tuning_examples_train_lora_and_top_layers_and_embed() {
    let server = TestServer::start_minilm().await;
    let commands = readme_commands("cli-fine-tuning");
    for command in &commands {
        let out = run(command, &server);
        let json: Value = serde_json::from_str(&out).expect("the CLI prints JSON");
        if command.starts_with("tlserve train") {
            let method = &json["fine_tuning"]["method"];
            if command.contains("--method lora") {
                assert_eq!(json["name"], "topics-lora", "{out}");
                let lora = &method["lora"];
                assert_eq!(
                    (lora["layers"].as_u64(), lora["rank"].as_u64()),
                    (Some(2), Some(8)),
                    "{out}"
                );
            } else {
                assert_eq!(json["name"], "topics-top", "{out}");
                assert_eq!(method["top_layers"]["layers"].as_u64(), Some(1), "{out}");
            }
            let accuracy = json["holdout"]["accuracy"]
                .as_f64()
                .expect("hold-out accuracy");
            assert!(accuracy >= 0.8, "{out}");
        } else if command.starts_with("tlserve embed") {
            let text = command.rsplit('"').nth(1).expect("the quoted text");
            let frozen = rust_vector(&server, text).await;
            let adapted: Vec<f32> =
                serde_json::from_value(json["embeddings"][0]["values"].clone()).expect("a vector");
            assert_eq!(adapted.len(), frozen.len());
            assert_ne!(
                adapted, frozen,
                "the adapted features differ from the frozen ones"
            );
        } else {
            panic!("no check for README command `{command}`");
        }
    }
    assert_eq!(commands.len(), 3);
}

#[tokio::test]
async fn cli_image_folder_examples_train_and_evaluate() {
    let server = TestServer::start(&format!("[limits]\n{}", lite0_backbone_toml())).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let classes = [("cat", [200, 120, 40]), ("dog", [60, 60, 200])];
    colour_folder(&dir.path().join("photos"), &classes, 8, 64, 1);
    colour_folder(&dir.path().join("photos-test"), &classes, 3, 64, 2);
    let commands = readme_commands("cli-image-folders");
    for command in &commands {
        let out = run_in(command, &server, dir.path());
        let json: Value = serde_json::from_str(&out).expect("the CLI prints JSON");
        if command.starts_with("tlserve train") {
            assert_eq!(json["name"], "pets");
            assert_eq!(json["labels"], serde_json::json!(["cat", "dog"]));
            assert_eq!(json["train_examples"], 12, "{out}");
            assert_eq!(json["holdout"]["examples"], 4, "{out}");
        } else if command.starts_with("tlserve evaluate") {
            assert_eq!(json["examples"], 6, "{out}");
            assert_eq!(json["head"], "pets", "{out}");
        } else {
            panic!("no check for README command `{command}`");
        }
    }
    assert_eq!(commands.len(), 2);
}

/// The decoder section: its configuration serves SmolLM2 (the relative
/// model path made absolute, as the test server's config lives elsewhere)
/// and its grpcurl command gets the Rust client's last-token vector.
#[tokio::test]
async fn decoder_example_serves_smollm2() {
    smollm2_file();
    let models = repo_root().join("models");
    let config = readme_block("decoder-config").replace(
        "path = \"models/",
        &format!("path = \"{}/", models.display()),
    );
    let server = TestServer::start(&config).await;
    let mut request = embed_request(&[SAMPLE]);
    request.backbone = SMOLLM2.into();
    request.pooling = tlserve::proto::Pooling::LastToken as i32;
    let expected = server
        .embedder()
        .await
        .embed(request)
        .await
        .expect("Embed")
        .into_inner()
        .embeddings
        .remove(0)
        .values;
    let commands = readme_commands("decoder");
    assert_eq!(commands.len(), 1);
    assert!(
        commands[0].contains(SAMPLE),
        "the example embeds {SAMPLE:?}"
    );
    let out = run(&commands[0], &server);
    let json: Value = serde_json::from_str(&out).expect("grpcurl prints JSON");
    assert_eq!(json["dimension"], 576);
    assert_same_vector("grpcurl", &json["embeddings"][0]["values"], &expected);
}
