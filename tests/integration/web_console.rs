//! The web console in a real browser: headless Chromium (Debian's chromium and
//! chromium-driver, driven by selenium from tests/clients/console_browser.py) opens
//! `/console/` on the HTTP port of a server with bearer tokens on and works it as a
//! person would, all over gRPC-Web: it sees the listing refused as UNAUTHENTICATED,
//! pastes a token, finds the backbone, trains a small head to SUCCEEDED with a point
//! on the loss and accuracy curves for every epoch, gets the confusion matrix of the
//! examples it held out, and predicts. Once with MiniLM from
//! tests/data/console_reviews.csv and a typed text, once with EfficientNet-Lite0
//! from a folder of images and a chosen image.
//!
//! Test artifact: a PNG screenshot of every step is written to
//! `target/test-artifacts/web-console/<head>/` (in the cargo target directory), for
//! people to look at; where a run fails, `failure.png` there shows the page at that
//! moment.
//!
//! A missing browser, driver or selenium fails the test with a message naming
//! scripts/setup-browser.sh, which installs them; it never skips.

use crate::common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{colour_folder, lite0_backbone_toml, python, repo_file, TestServer, LITE0, MINILM};

/// A token with both roles the console needs: infer (listings, Predict) and train.
const TOKEN: &str = "console-test-token-5b1f0c2e9a7d4c3b";

/// `target/test-artifacts/web-console/RUN/`, next to the target directory's `tmp/`.
fn artifacts_dir(run: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory")
        .join("test-artifacts")
        .join("web-console")
        .join(run)
}

/// Panics with the fix when the browser, its driver or selenium is missing.
fn require_browser() {
    for (path, package) in [
        ("/usr/bin/chromium", "chromium"),
        ("/usr/bin/chromedriver", "chromium-driver"),
    ] {
        assert!(
            Path::new(path).is_file(),
            "{path} is missing (Debian's {package} package): run scripts/setup-browser.sh"
        );
    }
    let selenium = Command::new(python())
        .args(["-c", "import selenium"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run the test Python");
    assert!(
        selenium.success(),
        "selenium is missing from {}: run scripts/setup-browser.sh",
        python().display()
    );
}

/// Runs the browser script, killing it after `limit`; returns (success, stdout, stderr).
fn run_browser(args: &[&str], limit: Duration) -> (bool, String, String) {
    let out = tempfile::NamedTempFile::new().expect("stdout file");
    let err = tempfile::NamedTempFile::new().expect("stderr file");
    let mut child = Command::new(python())
        .arg(repo_file("tests/clients/console_browser.py"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.reopen().expect("stdout handle"))
        .stderr(err.reopen().expect("stderr handle"))
        .spawn()
        .expect("start tests/clients/console_browser.py");
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the browser script") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let read =
        |file: &tempfile::NamedTempFile| std::fs::read_to_string(file.path()).unwrap_or_default();
    let mut stderr = read(&err);
    if status.is_none() {
        stderr.push_str(&format!("\n(killed after {}s)", limit.as_secs()));
    }
    (status.is_some_and(|s| s.success()), read(&out), stderr)
}

/// Every run trains a linear head with AdamW for this many epochs (learning
/// rate 0.05, batches of 8), after holding out 0.2 of each label's examples.
const EPOCHS: u64 = 10;

/// One trip through the console: what to train on, and what to predict.
struct Run<'a> {
    /// `--examples FILE` or `--images DIR`.
    data: [&'a str; 2],
    backbone: &'a str,
    /// The head's name, also the folder of the run's screenshots below
    /// `target/test-artifacts/web-console/`.
    head: &'a str,
    /// `--predict-text TEXT` or `--predict-image FILE`.
    predict: [&'a str; 2],
    expect: Expect<'a>,
}

/// What the page should show: the examples read (as many of each label), the
/// labels (sorted), the label predicted first.
struct Expect<'a> {
    examples: u64,
    labels: [&'a str; 2],
    predicted: &'a str,
}

/// Runs the browser script on the console of `server` (which wants [`TOKEN`])
/// and returns its report; panics with the script's reasons and the server's
/// log when it fails.
fn browse(server: &TestServer, run: &Run) -> serde_json::Value {
    let url = format!("http://{}/console/", server.http);
    let artifacts = artifacts_dir(run.head);
    let epochs = EPOCHS.to_string();
    let mut args = vec![
        "--url",
        &url,
        "--artifacts",
        artifacts.to_str().expect("UTF-8 path"),
        "--backbone",
        run.backbone,
        "--head",
        run.head,
        "--epochs",
        &epochs,
        "--learning-rate",
        "0.05",
        "--batch-size",
        "8",
    ];
    args.extend(run.data);
    args.extend(run.predict);
    args.extend(["--token", TOKEN]);
    let started = Instant::now();
    let (ok, stdout, stderr) = run_browser(&args, Duration::from_secs(420));
    assert!(
        ok,
        "the console failed in the browser (screenshots in {}):\n{stderr}\n--- server log ---\n{}",
        artifacts.display(),
        server.logs()
    );
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|err| panic!("the browser script's report is not JSON ({err}): {stdout}"));
    eprintln!(
        "web console ({}): trained in {}s, whole run {:.1}s in chromium {}; screenshots in {}",
        run.head,
        report["train_seconds"],
        started.elapsed().as_secs_f64(),
        report["chromium"],
        artifacts.display()
    );
    report
}

/// What every run must have shown: the listing refused without a token (with
/// the status code and the server's words), the backbone ready, a point for
/// every epoch on both training curves and a row in the figures table, a
/// confusion matrix over the labels covering the held-out examples, more
/// right than wrong, the new head listed, and the expected label predicted first.
fn check_run(report: &serde_json::Value, run: &Run) {
    let refused = report["without_token"].as_str().expect("without_token");
    assert!(refused.starts_with("UNAUTHENTICATED: "), "{refused}");
    assert_eq!(report["backbone_state"], "ready");
    let expect = &run.expect;
    assert_eq!(report["examples"], expect.examples, "{report:#}");
    let curves = &report["curves"];
    for curve in ["curve-train-loss", "curve-train-accuracy"] {
        assert_eq!(curves[curve]["points"], EPOCHS, "{curve}: {curves:#}");
        assert_eq!(curves[curve]["dots"], EPOCHS, "{curve}: {curves:#}");
    }
    assert_eq!(curves["rows"], EPOCHS, "{curves:#}");

    let matrix = &report["confusion"];
    assert_eq!(
        matrix["columns"],
        serde_json::json!(expect.labels),
        "{matrix:#}"
    );
    let counted: u64 = matrix["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .flat_map(|row| row["counts"].as_array().expect("counts").iter())
        .map(|count| count.as_u64().expect("a count"))
        .sum();
    // 0.2 of each label's examples, rounded.
    let labels = expect.labels.len() as u64;
    let held_out = labels * (expect.examples as f64 / labels as f64 * 0.2).round() as u64;
    assert_eq!(counted, held_out, "{matrix:#}");
    // The matrix is the point, not the head's quality: it only has to beat a coin.
    let accuracy = matrix["accuracy"].as_f64().expect("accuracy");
    assert!(accuracy > 0.5, "held-out accuracy {accuracy}: {matrix:#}");

    let heads: Vec<&str> = report["heads"]
        .as_array()
        .expect("heads")
        .iter()
        .filter_map(|h| h.as_str())
        .collect();
    assert!(
        heads
            .iter()
            .any(|h| h.starts_with(&format!("{}@", run.head))),
        "the heads table lists {heads:?}"
    );
    let prediction = report["prediction"].as_array().expect("prediction");
    assert_eq!(prediction[0]["label"], expect.predicted, "{prediction:?}");
}

#[tokio::test]
async fn console_trains_heads_from_a_text_file_and_an_image_folder() {
    let _timing = common::timing_sensitive().await;
    require_browser();
    let dir = tempfile::tempdir().expect("temp dir");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("console infer,train {TOKEN}\n")).expect("write tokens");
    let server = TestServer::start(&format!(
        "{}{}\n[auth]\nenabled = true\ntokens_file = \"{}\"\n",
        TestServer::minilm_config("", ""),
        lite0_backbone_toml(),
        tokens.display()
    ))
    .await;

    let examples = repo_file("tests/data/console_reviews.csv");
    let classes = [("blue", [40, 70, 200]), ("red", [200, 50, 40])];
    let photos = dir.path().join("photos");
    colour_folder(&photos, &classes, 8, 64, 1);
    // Not an image: the console skips it.
    std::fs::write(photos.join("red").join("notes.txt"), "not an image").expect("notes");
    let probe = colour_folder(&dir.path().join("probe"), &classes[1..], 1, 64, 9);

    let text = Run {
        data: ["--examples", examples.to_str().expect("UTF-8 path")],
        backbone: MINILM,
        head: "console-reviews",
        predict: [
            "--predict-text",
            "The soup was cold and the waiter ignored us all evening.",
        ],
        expect: Expect {
            examples: 40,
            labels: ["negative", "positive"],
            predicted: "negative",
        },
    };
    check_run(&browse(&server, &text), &text);

    let images = Run {
        data: ["--images", photos.to_str().expect("UTF-8 path")],
        backbone: LITE0,
        head: "console-colours",
        predict: [
            "--predict-image",
            probe[0].path.to_str().expect("UTF-8 path"),
        ],
        expect: Expect {
            examples: 16,
            labels: ["blue", "red"],
            predicted: "red",
        },
    };
    check_run(&browse(&server, &images), &images);

    assert!(
        !server.logs().contains(TOKEN),
        "the server logged the console's token"
    );
}
