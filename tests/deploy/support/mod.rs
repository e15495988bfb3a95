//! Helpers shared by the deploy checks (tests/deploy/kubernetes.rs,
//! tests/deploy/docker.rs, tests/deploy/monitoring.rs): the tools they run,
//! deploy/'s YAML as JSON values, and JSON access with useful failures.
//!
//! The deploy binary's root (tests/deploy/main.rs) declares `common` beside it.
//!
//! Tools: kubectl and promtool (scripts/setup-tools.sh), hadolint and
//! kubernetes-validate (scripts/setup-python.sh). A missing tool fails the
//! test with the command that installs it; nothing is skipped.

#![allow(dead_code)]

pub mod dockerfile;
pub mod dockerignore;
pub mod exposition;
pub mod kubernetes;
pub mod monitoring;
pub mod promql;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use serde::Deserialize;
use serde_json::Value;
use tlserve::config::Config;

use crate::common::{python, repo_file};

// ---------------------------------------------------------------------------
// Tools and processes

/// A tool installed in the test virtualenv by scripts/setup-python.sh.
pub fn venv_tool(name: &str) -> PathBuf {
    let path = python()
        .parent()
        .expect("the venv's python lives in bin/")
        .join(name);
    assert!(
        path.is_file(),
        "{name} is missing at {}: run scripts/setup-python.sh (pinned in scripts/requirements-test.txt)",
        path.display()
    );
    path
}

/// A system tool on PATH, installed by scripts/setup-tools.sh.
pub fn system_tool(name: &str, from: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|path| path.is_file())
        })
        .unwrap_or_else(|| panic!("{name} is not on PATH: run scripts/setup-tools.sh ({from})"))
}

pub fn kubectl() -> PathBuf {
    system_tool("kubectl", "kubectl 1.27+, or Debian's kubernetes-client")
}

pub fn promtool() -> PathBuf {
    system_tool("promtool", "Debian's prometheus package")
}

/// Runs `command`, feeding it `stdin`, and returns what it did.
pub fn run(command: &mut Command, stdin: Option<&str>) -> Output {
    let described = format!("{command:?}");
    let mut child = command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {described}: {err}"));
    // Written from another thread so that a child filling its stdout pipe
    // before reading all of stdin cannot deadlock the test.
    let writer = stdin.map(|input| {
        let mut pipe = child.stdin.take().expect("stdin pipe");
        let input = input.to_owned();
        std::thread::spawn(move || pipe.write_all(input.as_bytes()))
    });
    let output = child
        .wait_with_output()
        .unwrap_or_else(|err| panic!("{described}: {err}"));
    if let Some(writer) = writer {
        writer
            .join()
            .expect("stdin writer")
            .unwrap_or_else(|err| panic!("writing the input of {described}: {err}"));
    }
    output
}

/// Runs `command` and returns its stdout; fails with its output unless it succeeded.
pub fn run_ok(command: &mut Command, stdin: Option<&str>) -> String {
    let described = format!("{command:?}");
    let output = run(command, stdin);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{described} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

// ---------------------------------------------------------------------------
// Files

pub fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_file(relative))
        .unwrap_or_else(|err| panic!("cannot read {relative}: {err}"))
}

/// Every non-empty document of a YAML text, as JSON values.
pub fn yaml_documents(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|document| {
            Value::deserialize(document).unwrap_or_else(|err| panic!("invalid YAML: {err}"))
        })
        .filter(|document| !document.is_null())
        .collect()
}

pub fn yaml_file(relative: &str) -> Value {
    let mut documents = yaml_documents(&read(relative));
    assert_eq!(documents.len(), 1, "{relative} holds one YAML document");
    documents.remove(0)
}

// ---------------------------------------------------------------------------
// JSON access with useful failures

pub fn text<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {value}"))
}

pub fn list<'a>(value: &'a Value, what: &str) -> &'a Vec<Value> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("{what} is not a list: {value}"))
}

pub fn number(value: &Value, what: &str) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {value}"))
}

pub fn labels_of(value: &Value) -> BTreeMap<String, String> {
    value
        .as_object()
        .map(|map| {
            map.iter()
                .map(|(k, v)| (k.clone(), text(v, k).to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `selector` (matchLabels) selects objects labelled `labels`.
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

pub fn find_named<'a>(items: &'a Value, name: &str, what: &str) -> &'a Value {
    list(items, what)
        .iter()
        .find(|item| item["name"] == name)
        .unwrap_or_else(|| panic!("{what} has no entry named {name}: {items}"))
}

// ---------------------------------------------------------------------------
// Models: what the images and the init container fetch, what the config serves

/// The model folders a TLSERVE_MODELS value makes fetch-models.sh fetch.
pub fn fetched_models(value: &str) -> BTreeSet<String> {
    let script = read("scripts/fetch-models.sh");
    assert!(
        script.contains("${TLSERVE_MODELS:-"),
        "scripts/fetch-models.sh selects models with TLSERVE_MODELS"
    );
    let models: BTreeSet<String> = value.split_whitespace().map(str::to_owned).collect();
    for model in &models {
        assert!(
            script.contains(&format!("dest=\"$models_dir/{model}\"")),
            "fetch-models.sh does not fetch {model} into MODELS_DIR/{model}"
        );
    }
    models
}

/// The folders under `models_dir` that the configured backbones load.
pub fn served_models(config: &Config, models_dir: &Path) -> BTreeSet<String> {
    config
        .backbones
        .iter()
        .filter_map(|b| b.source.path.as_deref())
        .map(|path| {
            let folder = path.strip_prefix(models_dir).unwrap_or_else(|_| {
                panic!("{} is outside {}", path.display(), models_dir.display())
            });
            folder.to_str().unwrap().to_owned()
        })
        .collect()
}
