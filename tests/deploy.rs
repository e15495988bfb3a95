//! deploy/ against the code: the Kubernetes manifests, the Dockerfiles, the
//! Grafana dashboard and the Prometheus rules must agree with what the server
//! really reads, listens on, reports and exports.
//!
//! - Both kustomize overlays render, every built-in object passes strict schema
//!   validation (kubernetes-validate) for the oldest and newest Kubernetes we
//!   support, and the ServiceMonitor (a CRD, no built-in schema) is checked by
//!   hand. The rendered Deployment is then checked against the rendered server
//!   config: ports, probes, volumes, drain timing, security, the GPU settings.
//! - The real server boots from the rendered ConfigMap and drains on SIGTERM as
//!   the probes and terminationGracePeriodSeconds expect.
//! - Both Dockerfiles pass hadolint and have the documented shape (stages,
//!   dependency layer, non-root user, entrypoint, config, the models baked in
//!   by `with-models`); the binary links nothing the slim runtime image lacks.
//! - A real server, exercised until it exports every metric in src/metrics.rs,
//!   passes `promtool check metrics`; every `tlserve_*` name, label and label
//!   value that the dashboard, the rules, their unit tests and the
//!   prometheus-adapter rule use is one it exports, and the dashboard shows
//!   every declared metric. `promtool check rules` accepts the rules and
//!   `promtool test rules` fires every alert.
//!
//! Tools: kubectl and promtool (scripts/setup-tools.sh), hadolint and
//! kubernetes-validate (scripts/setup-python.sh). A missing tool fails the
//! test with the command that installs it; nothing is skipped.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;
use tlserve::{
    config::Config,
    proto::{self, trainer_client::TrainerClient},
};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const OVERLAYS: [&str; 2] = ["cpu", "gpu"];

/// Kubernetes versions the manifests must be valid for: 1.27 made native gRPC
/// probes GA; 1.37 is the newest schema kubernetes-validate ships.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.27.0", "1.37.0"];

/// API groups of custom resources: kubernetes-validate has no schema for them.
const CUSTOM_RESOURCE_GROUPS: [&str; 1] = ["monitoring.coreos.com/"];

/// Labels that Prometheus attaches to scraped series (target labels, from the
/// ServiceMonitor's Kubernetes discovery), usable on every tlserve metric.
const TARGET_LABELS: [&str; 6] = [
    "job",
    "instance",
    "namespace",
    "pod",
    "container",
    "endpoint",
];

/// Reasons of tlserve_queue_rejections_total (src/batching).
const REJECTION_REASONS: [&str; 3] = ["queue_full", "deadline", "cancelled"];

// ---------------------------------------------------------------------------
// Tools and processes

/// A tool installed in the test virtualenv by scripts/setup-python.sh.
fn venv_tool(name: &str) -> PathBuf {
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
fn system_tool(name: &str, from: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|path| path.is_file())
        })
        .unwrap_or_else(|| panic!("{name} is not on PATH: run scripts/setup-tools.sh ({from})"))
}

fn kubectl() -> PathBuf {
    system_tool("kubectl", "kubectl 1.27+, or Debian's kubernetes-client")
}

fn promtool() -> PathBuf {
    system_tool("promtool", "Debian's prometheus package")
}

/// Runs `command`, feeding it `stdin`, and returns what it did.
fn run(command: &mut Command, stdin: Option<&str>) -> Output {
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
fn run_ok(command: &mut Command, stdin: Option<&str>) -> String {
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

/// Every document of a YAML text as JSON, through the test venv's PyYAML.
fn yaml_documents(text: &str) -> Vec<Value> {
    const TO_JSON: &str = "import json, sys, yaml\n\
        json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)";
    let json = run_ok(Command::new(python()).args(["-c", TO_JSON]), Some(text));
    serde_json::from_str(&json).expect("PyYAML's JSON")
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_file(relative))
        .unwrap_or_else(|err| panic!("cannot read {relative}: {err}"))
}

fn yaml_file(relative: &str) -> Value {
    let mut documents = yaml_documents(&read(relative));
    assert_eq!(documents.len(), 1, "{relative} holds one YAML document");
    documents.remove(0)
}

// ---------------------------------------------------------------------------
// JSON access with useful failures

fn text<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {value}"))
}

fn list<'a>(value: &'a Value, what: &str) -> &'a Vec<Value> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("{what} is not a list: {value}"))
}

fn number(value: &Value, what: &str) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {value}"))
}

fn labels_of(value: &Value) -> BTreeMap<String, String> {
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
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn find_named<'a>(items: &'a Value, name: &str, what: &str) -> &'a Value {
    list(items, what)
        .iter()
        .find(|item| item["name"] == name)
        .unwrap_or_else(|| panic!("{what} has no entry named {name}: {items}"))
}

// ---------------------------------------------------------------------------
// Rendered Kubernetes objects

struct Rendered {
    overlay: &'static str,
    objects: Vec<Value>,
}

impl Rendered {
    /// `kubectl kustomize deploy/k8s/overlays/<overlay>`, parsed.
    fn render(overlay: &'static str) -> Self {
        let dir = repo_file(&format!("deploy/k8s/overlays/{overlay}"));
        let yaml = run_ok(Command::new(kubectl()).arg("kustomize").arg(&dir), None);
        let objects = yaml_documents(&yaml);
        assert!(!objects.is_empty(), "{overlay}: rendered nothing");
        Self { overlay, objects }
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    fn named(&self, kind: &str, name: &str) -> &Value {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{}: no {kind} named {name}", self.overlay))
    }

    /// A ConfigMap from a kustomize configMapGenerator: its name carries a hash.
    fn generated_config_map(&self, generator: &str) -> &Value {
        let matching: Vec<&Value> = self
            .all("ConfigMap")
            .into_iter()
            .filter(|o| {
                let name = o["metadata"]["name"].as_str().unwrap_or_default();
                name.strip_prefix(generator)
                    .and_then(|rest| rest.strip_prefix('-'))
                    .is_some_and(|hash| {
                        hash.len() == 10 && hash.chars().all(|c| c.is_ascii_alphanumeric())
                    })
            })
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "{}: one ConfigMap generated as {generator}",
            self.overlay
        );
        matching[0]
    }

    fn deployment(&self) -> &Value {
        self.named("Deployment", "tlserve")
    }

    fn pod_spec(&self) -> &Value {
        &self.deployment()["spec"]["template"]["spec"]
    }

    fn pod_labels(&self) -> BTreeMap<String, String> {
        labels_of(&self.deployment()["spec"]["template"]["metadata"]["labels"])
    }

    fn container(&self) -> &Value {
        find_named(
            &self.pod_spec()["containers"],
            "tlserve",
            "the pod's containers",
        )
    }

    fn init_container(&self, name: &str) -> &Value {
        find_named(
            &self.pod_spec()["initContainers"],
            name,
            "the pod's initContainers",
        )
    }

    fn volume(&self, name: &str) -> &Value {
        find_named(&self.pod_spec()["volumes"], name, "the pod's volumes")
    }

    /// The TLSERVE__* overrides in the server container's environment.
    fn server_env(&self) -> Vec<(String, String)> {
        self.container()["env"]
            .as_array()
            .map(|vars| {
                vars.iter()
                    .filter(|v| text(&v["name"], "env name").starts_with("TLSERVE__"))
                    .map(|v| {
                        (
                            text(&v["name"], "env name").to_owned(),
                            text(&v["value"], "a TLSERVE__ value (valueFrom is not used)")
                                .to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The `--config` argument of the server container.
    fn config_path(&self) -> PathBuf {
        let args: Vec<&str> = list(&self.container()["args"], "args")
            .iter()
            .map(|a| text(a, "arg"))
            .collect();
        let at = args
            .iter()
            .position(|a| *a == "--config")
            .expect("the server container passes --config");
        assert_eq!(args[0], "serve", "the container runs `tlserve serve`");
        PathBuf::from(args[at + 1])
    }

    /// The server config file as the pod sees it, from the generated ConfigMap.
    fn config_text(&self) -> String {
        let path = self.config_path();
        let file = path.file_name().unwrap().to_str().unwrap();
        let map = self.generated_config_map("tlserve-config");
        text(&map["data"][file], "the config file in the ConfigMap").to_owned()
    }

    /// The server's configuration in the pod: the ConfigMap's TOML with the
    /// container's TLSERVE__* environment, parsed and validated by the server's
    /// own code.
    fn server_config(&self) -> Config {
        let path = self.config_path();
        Config::from_toml(
            &self.config_text(),
            path.parent().unwrap(),
            self.server_env(),
        )
        .unwrap_or_else(|err| panic!("{}: the server rejects its config: {err}", self.overlay))
    }

    /// The mount of `container` whose mountPath is `path` or a parent of it.
    fn mount_holding<'a>(&self, container: &'a Value, path: &Path) -> &'a Value {
        list(&container["volumeMounts"], "volumeMounts")
            .iter()
            .filter(|m| path.starts_with(text(&m["mountPath"], "mountPath")))
            .max_by_key(|m| text(&m["mountPath"], "mountPath").len())
            .unwrap_or_else(|| {
                panic!(
                    "{}: {} is on no volume of container {}",
                    self.overlay,
                    path.display(),
                    container["name"]
                )
            })
    }

    /// The PersistentVolumeClaim behind volume `name`.
    fn claim_of(&self, volume: &str) -> &Value {
        let claim = text(
            &self.volume(volume)["persistentVolumeClaim"]["claimName"],
            "a persistentVolumeClaim volume",
        );
        self.named("PersistentVolumeClaim", claim)
    }

    fn container_port(&self, name: &str) -> u64 {
        find_named(&self.container()["ports"], name, "container ports")["containerPort"]
            .as_u64()
            .expect("containerPort")
    }
}

// ---------------------------------------------------------------------------
// Dockerfiles

struct Stage {
    base: String,
    name: String,
    /// (INSTRUCTION, arguments), continuation lines joined, comments dropped.
    instructions: Vec<(String, String)>,
}

struct Dockerfile {
    path: String,
    stages: Vec<Stage>,
}

impl Dockerfile {
    fn parse(relative: &str) -> Self {
        let source = read(relative);
        let mut logical = Vec::new();
        let mut current = String::new();
        for line in source.lines() {
            let line = line.trim();
            // Comments and parser directives, also between continuation lines.
            if line.starts_with('#') || (current.is_empty() && line.is_empty()) {
                continue;
            }
            match line.strip_suffix('\\') {
                Some(body) => {
                    current.push_str(body.trim());
                    current.push(' ');
                }
                None => {
                    current.push_str(line);
                    logical.push(std::mem::take(&mut current));
                }
            }
        }
        assert!(current.is_empty(), "{relative} ends in a continuation");

        let mut global_args: BTreeMap<String, String> = BTreeMap::new();
        let mut stages: Vec<Stage> = Vec::new();
        for line in logical {
            let (keyword, args) = line
                .split_once(char::is_whitespace)
                .unwrap_or((line.as_str(), ""));
            let (keyword, args) = (keyword.to_ascii_uppercase(), args.trim().to_owned());
            match keyword.as_str() {
                "ARG" if stages.is_empty() => {
                    let (name, default) = args.split_once('=').unwrap_or((&args, ""));
                    global_args.insert(name.to_owned(), default.to_owned());
                }
                "FROM" => {
                    let mut from = args.clone();
                    for (name, value) in &global_args {
                        from = from.replace(&format!("${{{name}}}"), value);
                    }
                    let words: Vec<&str> = from.split_whitespace().collect();
                    assert!(
                        words.len() == 3 && words[1].eq_ignore_ascii_case("AS"),
                        "{relative}: every stage is named (FROM image AS name): {from}"
                    );
                    assert!(!from.contains('$'), "{relative}: unresolved ARG in {from}");
                    stages.push(Stage {
                        base: words[0].to_owned(),
                        name: words[2].to_owned(),
                        instructions: Vec::new(),
                    });
                }
                _ => stages
                    .last_mut()
                    .unwrap_or_else(|| panic!("{relative}: {keyword} before the first FROM"))
                    .instructions
                    .push((keyword, args)),
            }
        }
        Self {
            path: relative.to_owned(),
            stages,
        }
    }

    fn stage(&self, name: &str) -> &Stage {
        self.stages
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{}: no stage {name}", self.path))
    }

    /// The stage and its ancestors within this file, nearest first.
    fn chain(&self, name: &str) -> Vec<&Stage> {
        let mut chain = vec![self.stage(name)];
        while let Some(parent) = self
            .stages
            .iter()
            .find(|s| s.name == chain.last().unwrap().base)
        {
            chain.push(parent);
        }
        chain
    }

    /// The last value of `keyword` that applies to stage `name` (inherited from
    /// the stages it is built FROM).
    fn effective(&self, name: &str, keyword: &str) -> Option<String> {
        self.chain(name).into_iter().find_map(|stage| {
            stage
                .instructions
                .iter()
                .rev()
                .find(|(k, _)| k == keyword)
                .map(|(_, args)| args.clone())
        })
    }

    /// The ENV settings that apply to stage `name`, as (name, value).
    fn env(&self, name: &str) -> Vec<(String, String)> {
        let mut env = Vec::new();
        for stage in self.chain(name).into_iter().rev() {
            for (_, args) in stage.instructions.iter().filter(|(k, _)| k == "ENV") {
                for pair in args.split_whitespace() {
                    let (key, value) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("{}: ENV uses KEY=value: {args}", self.path));
                    env.push((key.to_owned(), value.to_owned()));
                }
            }
        }
        env
    }
}

/// The uid of a USER instruction's value (`10001` or `10001:10001`).
fn uid_of(user: &str) -> u32 {
    user.split(':').next().unwrap().parse().unwrap_or_else(|_| {
        panic!("USER is a numeric uid, so Kubernetes can verify runAsNonRoot: {user}")
    })
}

/// The uid the CPU image runs as.
fn image_uid() -> u32 {
    let dockerfile = Dockerfile::parse("deploy/docker/Dockerfile");
    uid_of(&dockerfile.effective("runtime", "USER").expect("USER"))
}

/// Whether a .dockerignore pattern (as written in ours: plain paths, optional
/// trailing slash, `**/` prefixes) excludes `path` from the build context.
fn docker_ignored(patterns: &[String], path: &str) -> bool {
    patterns.iter().any(|pattern| {
        let pattern = pattern.trim_end_matches('/');
        match pattern.strip_prefix("**/") {
            Some(anywhere) => path.split('/').any(|part| part == anywhere),
            None => path == pattern || path.starts_with(&format!("{pattern}/")),
        }
    })
}

// ---------------------------------------------------------------------------
// Prometheus exposition and PromQL

#[derive(Default, Debug)]
struct Family {
    kind: String,
    /// label name -> values seen
    labels: BTreeMap<String, BTreeSet<String>>,
    samples: BTreeSet<String>,
}

/// `name{a="x",b="y"} value` -> (name, [(a, x), (b, y)])
fn parse_sample(line: &str) -> (String, Vec<(String, String)>) {
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = line[..name_end].to_owned();
    let mut labels = Vec::new();
    if line[name_end..].starts_with('{') {
        let mut rest = &line[name_end + 1..];
        loop {
            rest = rest.trim_start_matches([',', ' ']);
            if rest.starts_with('}') {
                break;
            }
            let (key, after) = rest.split_once("=\"").expect("label=\"value\"");
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next().expect("closing quote") {
                    (_, '\\') => value.push(chars.next().expect("escaped char").1),
                    (i, '"') => break i,
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.trim().to_owned(), value));
            rest = &after[end + 1..];
        }
    }
    (name, labels)
}

/// The metric families of a Prometheus text exposition.
fn parse_exposition(body: &str) -> BTreeMap<String, Family> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for line in body.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            families.entry(name.to_owned()).or_default().kind = kind.trim().to_owned();
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (sample, labels) = parse_sample(line);
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| sample.strip_suffix(suffix))
            .find(|base| {
                families
                    .get(*base)
                    .is_some_and(|f| f.kind == "histogram" || f.kind == "summary")
            })
            .unwrap_or(&sample)
            .to_owned();
        let entry = families.entry(family).or_default();
        entry.samples.insert(sample.clone());
        for (key, value) in labels {
            entry.labels.entry(key).or_default().insert(value);
        }
    }
    families
}

#[derive(Debug, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Punct(char),
}

/// PromQL tokens; numbers, durations and Grafana variables ($job,
/// $__rate_interval) are dropped.
fn promql_tokens(expr: &str) -> Vec<Token> {
    let chars: Vec<char> = expr.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '"' || c == '\'' || c == '`' {
            let mut value = String::new();
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' && c != '`' {
                    i += 1;
                }
                value.push(chars[i]);
                i += 1;
            }
            i += 1;
            tokens.push(Token::Str(value));
        } else if c == '$' {
            i += 1;
            while i < chars.len() && (word(chars[i]) || chars[i] == '{' || chars[i] == '}') {
                i += 1;
            }
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (word(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && word(chars[i]) {
                i += 1;
            }
            tokens.push(Token::Ident(chars[start..i].iter().collect()));
        } else {
            tokens.push(Token::Punct(c));
            i += 1;
        }
    }
    tokens
}

/// A metric selector in an expression: `name{label op "value", ...}`.
#[derive(Debug)]
struct Selector {
    metric: String,
    matchers: Vec<(String, String, String)>,
}

/// The metric selectors of a PromQL expression, and the label names it groups
/// or matches on (by, without, on, ignoring, group_left, group_right).
fn promql_references(expr: &str) -> (Vec<Selector>, BTreeSet<String>) {
    const GROUPING: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const KEYWORDS: [&str; 20] = [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        "limitk",
    ];
    let tokens = promql_tokens(expr);
    let mut selectors = Vec::new();
    let mut grouping = BTreeSet::new();
    let mut i = 0;
    while i < tokens.len() {
        let Token::Ident(name) = &tokens[i] else {
            i += 1;
            continue;
        };
        let next = tokens.get(i + 1);
        if GROUPING.contains(&name.as_str()) && next == Some(&Token::Punct('(')) {
            i += 2;
            while i < tokens.len() && tokens[i] != Token::Punct(')') {
                if let Token::Ident(label) = &tokens[i] {
                    grouping.insert(label.clone());
                }
                i += 1;
            }
        } else if next == Some(&Token::Punct('('))
            || KEYWORDS.contains(&name.as_str())
            || GROUPING.contains(&name.as_str())
        {
            i += 1;
        } else {
            let mut selector = Selector {
                metric: name.clone(),
                matchers: Vec::new(),
            };
            i += 1;
            if tokens.get(i) == Some(&Token::Punct('{')) {
                i += 1;
                while i < tokens.len() && tokens[i] != Token::Punct('}') {
                    let Token::Ident(label) = &tokens[i] else {
                        i += 1;
                        continue;
                    };
                    let mut op = String::new();
                    i += 1;
                    while let Some(Token::Punct(p)) = tokens.get(i) {
                        if !matches!(p, '=' | '!' | '~') {
                            break;
                        }
                        op.push(*p);
                        i += 1;
                    }
                    let Some(Token::Str(value)) = tokens.get(i) else {
                        panic!("matcher {label}{op} without a quoted value in {expr}");
                    };
                    selector.matchers.push((label.clone(), op, value.clone()));
                    i += 1;
                }
            }
            selectors.push(selector);
        }
    }
    (selectors, grouping)
}

/// Every string under the key `key`, anywhere in `value`.
fn strings_under(value: &Value, key: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if k == key {
                    if let Some(s) = v.as_str() {
                        out.push(s.to_owned());
                    }
                }
                strings_under(v, key, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| strings_under(v, key, out)),
        _ => {}
    }
}

/// Every `tlserve_*` word in a text (names, not parts of recording-rule names).
fn tlserve_words(text: &str) -> BTreeSet<String> {
    let mut words = BTreeSet::new();
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while i < bytes.len() {
        if word(bytes[i]) {
            let start = i;
            while i < bytes.len() && word(bytes[i]) {
                i += 1;
            }
            let w = &text[start..i];
            // `tlserve_*` (the prefix itself) names no metric.
            if w.len() > "tlserve_".len() && w.starts_with("tlserve_") && !w.contains(':') {
                words.insert(w.to_owned());
            }
        } else {
            i += 1;
        }
    }
    words
}

/// The metric names declared in src/metrics.rs (`pub const X: &str = "tlserve_..."`).
fn declared_metric_names() -> BTreeSet<String> {
    let source = read("src/metrics.rs");
    let names: BTreeSet<String> = source
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            line.starts_with("pub const ")
                .then(|| line.split('"').nth(1))
                .flatten()
                .filter(|name| name.starts_with("tlserve_"))
                .map(str::to_owned)
        })
        .collect();
    assert!(
        names.len() >= 15,
        "src/metrics.rs declares its names: {names:?}"
    );
    names
}

/// The RPC method names of the public contract (proto/).
fn rpc_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(repo_file("proto/tlserve/v1")).expect("proto dir") {
        let source = std::fs::read_to_string(entry.expect("entry").path()).expect("proto");
        for line in source.lines() {
            if let Some(rest) = line.trim().strip_prefix("rpc ") {
                names.insert(rest.split('(').next().unwrap().trim().to_owned());
            }
        }
    }
    names
}

/// The model folders a TLSERVE_MODELS value makes fetch-models.sh fetch.
fn fetched_models(value: &str) -> BTreeSet<String> {
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
fn served_models(config: &Config, models_dir: &Path) -> BTreeSet<String> {
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

// ---------------------------------------------------------------------------
// (a) (b) Kubernetes: render and validate

#[test]
fn overlays_render_to_schema_valid_objects() {
    let validator = venv_tool("kubernetes-validate");
    for overlay in OVERLAYS {
        let rendered = Rendered::render(overlay);
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for object in &rendered.objects {
            *kinds.entry(text(&object["kind"], "kind")).or_default() += 1;
        }
        let expected: BTreeMap<&str, usize> = [
            ("ConfigMap", 2),
            ("Deployment", 1),
            ("HorizontalPodAutoscaler", 1),
            ("PersistentVolumeClaim", 2),
            ("PodDisruptionBudget", 1),
            ("Service", 2),
            ("ServiceMonitor", 1),
        ]
        .into_iter()
        .collect();
        assert_eq!(kinds, expected, "{overlay}: the rendered objects");

        // kubernetes-validate knows only built-in kinds (it merely warns about
        // a CRD kind); those are validated strictly, custom ones by hand below.
        let (custom, builtin): (Vec<&Value>, Vec<&Value>) =
            rendered.objects.iter().partition(|o| {
                let api = text(&o["apiVersion"], "apiVersion");
                CUSTOM_RESOURCE_GROUPS.iter().any(|g| api.starts_with(g))
            });
        assert_eq!(
            custom
                .iter()
                .map(|o| text(&o["kind"], "kind"))
                .collect::<Vec<_>>(),
            ["ServiceMonitor"],
            "{overlay}: the only custom resource is checked by hand"
        );
        check_service_monitor(&rendered);

        let dir = tempfile::tempdir().expect("temp dir");
        let files: Vec<PathBuf> = builtin
            .iter()
            .enumerate()
            .map(|(i, object)| {
                // JSON is YAML; one object per file names it in any failure.
                let path = dir
                    .path()
                    .join(format!("{i:02}-{}.yaml", object["kind"].as_str().unwrap()));
                std::fs::write(&path, object.to_string()).expect("write object");
                path
            })
            .collect();
        for version in KUBERNETES_VERSIONS {
            let stdout = run_ok(
                Command::new(&validator)
                    .args(["--strict", "--kubernetes-version", version])
                    .args(&files),
                None,
            );
            let passed = stdout
                .lines()
                .filter(|l| l.contains(" passed for resource "))
                .count();
            assert_eq!(
                passed,
                builtin.len(),
                "{overlay}: every built-in object passes strict validation against Kubernetes {version}:\n{stdout}"
            );
        }
    }
}

/// The ServiceMonitor, a monitoring.coreos.com/v1 custom resource, by hand.
fn check_service_monitor(rendered: &Rendered) {
    let overlay = rendered.overlay;
    let monitor = rendered.named("ServiceMonitor", "tlserve");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    let spec = monitor["spec"].as_object().expect("spec");
    let known = [
        "selector",
        "endpoints",
        "namespaceSelector",
        "jobLabel",
        "targetLabels",
    ];
    for key in spec.keys() {
        assert!(
            known.contains(&key.as_str()),
            "{overlay}: unexpected ServiceMonitor spec.{key}"
        );
    }
    assert!(
        monitor["spec"]["selector"]["matchExpressions"].is_null(),
        "selected by matchLabels only"
    );
    let selector = labels_of(&monitor["spec"]["selector"]["matchLabels"]);
    let services: Vec<&Value> = rendered
        .all("Service")
        .into_iter()
        .filter(|s| selects(&selector, &labels_of(&s["metadata"]["labels"])))
        .collect();
    assert_eq!(
        services.len(),
        1,
        "{overlay}: the ServiceMonitor selects exactly one Service, or every pod is scraped more than once"
    );
    let service = services[0];
    let endpoints = list(&monitor["spec"]["endpoints"], "endpoints");
    assert_eq!(endpoints.len(), 1);
    let endpoint = &endpoints[0];
    let known = [
        "port",
        "path",
        "scheme",
        "interval",
        "scrapeTimeout",
        "honorLabels",
    ];
    for key in endpoint.as_object().expect("endpoint").keys() {
        assert!(
            known.contains(&key.as_str()),
            "{overlay}: unexpected endpoint field {key}"
        );
    }
    let port = find_named(
        &service["spec"]["ports"],
        text(&endpoint["port"], "endpoint port"),
        "the selected Service's ports",
    );
    let container_port = rendered.container_port(text(&port["targetPort"], "targetPort"));
    let metrics = rendered
        .server_config()
        .server
        .metrics_listen
        .expect("the Kubernetes config exports metrics");
    assert_eq!(
        container_port,
        u64::from(metrics.port()),
        "scraped port = metrics_listen"
    );
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(endpoint["scheme"], "http");
    // tlserve's `service` label (the gRPC service) collides with the target
    // label `service` (the Kubernetes Service); without honorLabels Prometheus
    // renames tlserve's to exported_service and every query by service breaks.
    assert_eq!(endpoint["honorLabels"], true, "{overlay}: honorLabels");
    let interval = text(&endpoint["interval"], "interval");
    assert!(
        interval.ends_with('s') && interval[..interval.len() - 1].parse::<u32>().is_ok(),
        "interval {interval}"
    );
}

#[test]
fn the_fetch_script_shipped_to_kubernetes_is_scripts_fetch_models() {
    assert_eq!(
        read("deploy/k8s/base/fetch-models.sh"),
        read("scripts/fetch-models.sh"),
        "deploy/k8s/base/fetch-models.sh must be an exact copy: cp scripts/fetch-models.sh deploy/k8s/base/"
    );
}

// ---------------------------------------------------------------------------
// The rendered Deployment against the server's config and the image

#[test]
fn the_deployment_agrees_with_the_server_config_and_the_image() {
    let uid = image_uid();
    for overlay in OVERLAYS {
        let rendered = Rendered::render(overlay);
        let config = rendered.server_config();
        let deployment = rendered.deployment();
        let pod = rendered.pod_spec();
        let container = rendered.container();
        let init = rendered.init_container("fetch-models");
        let pod_labels = rendered.pod_labels();
        let at = |what: &str| format!("{overlay}: {what}");

        // The image is the overlay's, not the base's placeholder.
        let image = text(&container["image"], "image");
        assert!(image.contains('/') && image.contains(':'), "{}", at(image));
        assert_eq!(image.contains("cuda"), overlay == "gpu", "{}", at(image));

        // Config: the values the issue and the docs promise.
        assert_eq!(config.logging.format, tlserve::config::LogFormat::Json);
        assert_eq!(config.server.drain_delay_seconds, 5.0);
        assert_eq!(config.server.shutdown_grace_seconds, 25.0);
        assert!(
            config.server.listen.ip().is_unspecified(),
            "listens on the pod IP"
        );
        let metrics = config.server.metrics_listen.expect("metrics_listen");
        assert!(metrics.ip().is_unspecified());
        assert_eq!(config.backbones.len(), 1);
        let backbone = &config.backbones[0];
        assert_eq!(backbone.name, MINILM);
        let model_path = backbone.source.path.clone().expect("a path source");
        assert_eq!(model_path, Path::new("/models/all-MiniLM-L6-v2"));
        assert_eq!(config.heads.store_dir, Path::new("/heads"));
        let expected_device = if overlay == "gpu" { "cuda:0" } else { "cpu" };
        assert_eq!(backbone.device, expected_device, "{}", at("device"));

        // Ports: the container's named ports are the config's, and the probes
        // use the gRPC one.
        let grpc_port = u64::from(config.server.listen.port());
        assert_eq!(rendered.container_port("grpc"), grpc_port);
        assert_eq!(
            rendered.container_port("metrics"),
            u64::from(metrics.port())
        );

        // Probes: Health "" for startup and readiness, "liveness" (SERVING from
        // start to exit, named by the server) for liveness.
        for (probe, service) in [
            ("startupProbe", ""),
            ("readinessProbe", ""),
            ("livenessProbe", tlserve::server::LIVENESS_SERVICE),
        ] {
            let grpc = &container[probe]["grpc"];
            assert_eq!(grpc["port"].as_u64(), Some(grpc_port), "{}", at(probe));
            assert_eq!(
                grpc["service"].as_str().unwrap_or(""),
                service,
                "{}",
                at(probe)
            );
        }
        let window = |probe: &str| {
            number(&container[probe]["periodSeconds"], probe)
                * number(&container[probe]["failureThreshold"], probe)
        };
        assert!(
            window("startupProbe") >= 120.0,
            "startup covers a slow model load"
        );
        assert!(
            window("livenessProbe") >= 60.0
                && number(&container["livenessProbe"]["timeoutSeconds"], "timeout") >= 5.0,
            "liveness is generous: a busy pod is never restarted"
        );
        // The pod must be seen unready within the drain delay, while it still serves.
        assert!(
            window("readinessProbe") <= config.server.drain_delay_seconds,
            "{}",
            at("readiness notices NOT_SERVING within drain_delay_seconds")
        );
        let grace = number(
            &pod["terminationGracePeriodSeconds"],
            "terminationGracePeriodSeconds",
        );
        assert!(
            grace > config.server.drain_delay_seconds + config.server.shutdown_grace_seconds,
            "{}",
            at("the kubelet waits longer than the server's own drain and grace")
        );

        // Security: non-root as the image's uid, read-only root, no privileges.
        let pod_security = &pod["securityContext"];
        assert_eq!(pod_security["runAsNonRoot"], true);
        assert_eq!(pod_security["runAsUser"].as_u64(), Some(u64::from(uid)));
        assert_eq!(pod_security["seccompProfile"]["type"], "RuntimeDefault");
        assert_eq!(pod["automountServiceAccountToken"], false);
        // Service links would put TLSERVE_* variables into the environment.
        assert_eq!(pod["enableServiceLinks"], false);
        for c in [container, init] {
            let name = c["name"].as_str().unwrap();
            let security = &c["securityContext"];
            assert_eq!(security["runAsNonRoot"], true, "{}", at(name));
            assert_eq!(
                security["runAsUser"].as_u64(),
                Some(u64::from(uid)),
                "{}",
                at(name)
            );
            assert_eq!(security["readOnlyRootFilesystem"], true, "{}", at(name));
            assert_eq!(security["allowPrivilegeEscalation"], false, "{}", at(name));
            assert_eq!(
                security["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{}",
                at(name)
            );
            assert_eq!(
                security["seccompProfile"]["type"],
                "RuntimeDefault",
                "{}",
                at(name)
            );
            // The root filesystem is read-only: /tmp is an emptyDir.
            let tmp = rendered.mount_holding(c, Path::new("/tmp"));
            assert_eq!(tmp["mountPath"], "/tmp", "{}", at(name));
            assert!(rendered.volume(text(&tmp["name"], "name"))["emptyDir"].is_object());
            let resources = &c["resources"];
            assert!(
                resources["requests"]["cpu"].is_string()
                    && resources["requests"]["memory"].is_string()
            );
            assert!(
                resources["limits"]["memory"].is_string(),
                "{}",
                at("memory limit")
            );
        }

        // The config file comes from the generated ConfigMap.
        let config_path = rendered.config_path();
        let mount = rendered.mount_holding(container, &config_path);
        assert_eq!(
            Path::new(text(&mount["mountPath"], "mountPath")),
            config_path.parent().unwrap()
        );
        assert_eq!(mount["readOnly"], true);
        let config_map = rendered.generated_config_map("tlserve-config");
        assert_eq!(
            rendered.volume(text(&mount["name"], "name"))["configMap"]["name"],
            config_map["metadata"]["name"]
        );

        // Weights: the init container fetches into the volume the server reads
        // the model from, read-only; the fetched folder is the configured path.
        let command: Vec<&str> = list(&init["command"], "init command")
            .iter()
            .map(|a| text(a, "arg"))
            .collect();
        let models_dir = Path::new(command.last().unwrap());
        let script = command
            .iter()
            .find(|a| a.ends_with("/fetch-models.sh"))
            .expect("the init container runs fetch-models.sh");
        assert!(model_path.starts_with(models_dir), "the model is fetched");
        let server_models = rendered.mount_holding(container, &model_path);
        let init_models = rendered.mount_holding(init, &model_path);
        assert_eq!(server_models["name"], init_models["name"]);
        assert_eq!(server_models["mountPath"], init_models["mountPath"]);
        assert_eq!(
            server_models["readOnly"], true,
            "the server only reads the weights"
        );
        assert_ne!(
            init_models["readOnly"], true,
            "the init container writes them"
        );
        rendered.claim_of(text(&server_models["name"], "name"));
        // The script it runs is the generated copy of scripts/fetch-models.sh.
        let script_mount = rendered.mount_holding(init, Path::new(script));
        let script_map = rendered.generated_config_map("tlserve-fetch-models");
        assert_eq!(
            rendered.volume(text(&script_mount["name"], "name"))["configMap"]["name"],
            script_map["metadata"]["name"]
        );
        let file = Path::new(script).file_name().unwrap().to_str().unwrap();
        assert_eq!(
            text(&script_map["data"][file], "the script"),
            read("scripts/fetch-models.sh")
        );

        // It fetches exactly the models the config serves (TLSERVE_MODELS).
        let fetched = list(&init["env"], "env")
            .iter()
            .find(|v| v["name"] == "TLSERVE_MODELS")
            .map(|v| text(&v["value"], "TLSERVE_MODELS"))
            .expect("fetch-models sets TLSERVE_MODELS");
        assert_eq!(
            fetched_models(fetched),
            served_models(&config, models_dir),
            "{}",
            at("TLSERVE_MODELS")
        );
        // The python image's Debian release is the runtime image's.
        let cpu_image = Dockerfile::parse("deploy/docker/Dockerfile");
        let release = cpu_image
            .stage("runtime-base")
            .base
            .replace("debian:", "")
            .replace("-slim", "");
        let python_image = text(&init["image"], "image");
        assert!(
            python_image.ends_with(&format!("-{release}")),
            "{python_image} on Debian {release}"
        );

        // Heads: a writable ReadWriteMany claim shared by every replica.
        let heads = rendered.mount_holding(container, &config.heads.store_dir);
        assert_eq!(
            Path::new(text(&heads["mountPath"], "mountPath")),
            config.heads.store_dir
        );
        assert_ne!(heads["readOnly"], true);
        let claim = rendered.claim_of(text(&heads["name"], "name"));
        assert_eq!(
            claim["spec"]["accessModes"],
            serde_json::json!(["ReadWriteMany"])
        );

        // Selectors: the Deployment, the Services and the PDB select the pods.
        assert!(selects(
            &labels_of(&deployment["spec"]["selector"]["matchLabels"]),
            &pod_labels
        ));
        assert!(
            deployment["spec"]["replicas"].is_null(),
            "the HPA owns the replica count"
        );
        for service in rendered.all("Service") {
            let name = service["metadata"]["name"].as_str().unwrap();
            assert!(
                selects(&labels_of(&service["spec"]["selector"]), &pod_labels),
                "{name}"
            );
            let grpc = find_named(&service["spec"]["ports"], "grpc", name);
            assert_eq!(
                rendered.container_port(text(&grpc["targetPort"], "targetPort")),
                grpc_port
            );
            for port in list(&service["spec"]["ports"], "ports") {
                rendered.container_port(text(&port["targetPort"], "a named targetPort"));
            }
        }
        assert_eq!(
            rendered.named("Service", "tlserve")["spec"]["type"],
            "ClusterIP"
        );
        assert_eq!(
            rendered.named("Service", "tlserve-headless")["spec"]["clusterIP"],
            "None"
        );
        let pdb = rendered.named("PodDisruptionBudget", "tlserve");
        assert!(selects(
            &labels_of(&pdb["spec"]["selector"]["matchLabels"]),
            &pod_labels
        ));

        // The HPA scales this Deployment on the per-pod queue depth.
        let hpa = rendered.named("HorizontalPodAutoscaler", "tlserve");
        assert_eq!(hpa["apiVersion"], "autoscaling/v2");
        assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
        assert_eq!(
            hpa["spec"]["scaleTargetRef"]["name"],
            deployment["metadata"]["name"]
        );
        let metric = &list(&hpa["spec"]["metrics"], "metrics")[0];
        assert_eq!(metric["type"], "Pods");
        assert_eq!(
            metric["pods"]["metric"]["name"],
            tlserve::metrics::QUEUE_DEPTH
        );
        let (min, max) = (
            number(&hpa["spec"]["minReplicas"], "min"),
            number(&hpa["spec"]["maxReplicas"], "max"),
        );
        assert!(2.0 <= min && min <= max, "{}", at("replicas"));
        let pdb_unavailable = number(&pdb["spec"]["maxUnavailable"], "maxUnavailable");
        assert!(
            pdb_unavailable < min,
            "a drain keeps at least one pod serving"
        );

        // GPU: one GPU, GPU nodes only, the device from the environment.
        let limits = &container["resources"]["limits"];
        if overlay == "gpu" {
            assert_eq!(limits["nvidia.com/gpu"].to_string().trim_matches('"'), "1");
            assert!(list(&pod["tolerations"], "tolerations")
                .iter()
                .any(|t| t["key"] == "nvidia.com/gpu" && t["effect"] == "NoSchedule"));
            assert!(!pod["nodeSelector"]
                .as_object()
                .expect("nodeSelector")
                .is_empty());
            assert_eq!(
                rendered.server_env(),
                [(
                    "TLSERVE__BACKBONES__0__DEVICE".to_owned(),
                    "cuda:0".to_owned()
                )]
            );
        } else {
            assert!(limits["nvidia.com/gpu"].is_null());
            assert!(pod["tolerations"].is_null() && pod["nodeSelector"].is_null());
            assert!(
                limits["cpu"].is_string(),
                "the CPU overlay sets a CPU limit"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// The real server from the rendered Kubernetes config

/// A `tlserve serve` child started by this file, killed when dropped.
struct Process {
    child: Child,
    log: tempfile::NamedTempFile,
}

impl Process {
    fn logs(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn the_kubernetes_config_boots_the_server_which_drains_within_the_grace_period() {
    let rendered = Rendered::render("cpu");
    let container = rendered.container();
    let config = rendered.server_config();
    let grace = Duration::from_secs_f64(number(
        &rendered.pod_spec()["terminationGracePeriodSeconds"],
        "terminationGracePeriodSeconds",
    ));
    let startup = &container["startupProbe"];
    let startup_budget = Duration::from_secs_f64(
        number(&startup["periodSeconds"], "period")
            * number(&startup["failureThreshold"], "threshold"),
    );

    // The ConfigMap's file as it is; only what a pod has and a test machine
    // has not is overridden: loopback ports, the model and head store folders.
    let dir = tempfile::tempdir().expect("temp dir");
    let config_file = dir.path().join("tlserve.toml");
    std::fs::write(&config_file, rendered.config_text()).expect("write config");
    let heads = dir.path().join("heads");
    let grpc = format!("127.0.0.1:{}", free_port());
    let overrides = [
        ("TLSERVE__SERVER__LISTEN", format!("\"{grpc}\"")),
        (
            "TLSERVE__SERVER__METRICS_LISTEN",
            format!("\"127.0.0.1:{}\"", free_port()),
        ),
        (
            "TLSERVE__BACKBONES__0__SOURCE",
            format!("{{ path = \"{}\" }}", minilm_dir().display()),
        ),
        (
            "TLSERVE__HEADS__STORE_DIR",
            format!("\"{}\"", heads.display()),
        ),
    ];
    let log = tempfile::NamedTempFile::new().expect("log file");
    let mut server = Process {
        child: Command::new(env!("CARGO_BIN_EXE_tlserve"))
            .args(["serve", "--config"])
            .arg(&config_file)
            .envs(rendered.server_env())
            .envs(overrides.iter().map(|(k, v)| (*k, v.as_str())))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("log handle"))
            .spawn()
            .expect("start tlserve"),
        log,
    };
    let url = format!("http://{grpc}");

    // Startup: "liveness" is SERVING whenever the server answers at all; ""
    // turns SERVING once the model is loaded, within the startup probe's budget.
    let started = Instant::now();
    loop {
        if let Some(status) = health_at(&url, tlserve::server::LIVENESS_SERVICE).await {
            assert_eq!(status, ServingStatus::Serving, "liveness while starting");
            if health_at(&url, "").await == Some(ServingStatus::Serving) {
                break;
            }
        }
        assert!(
            started.elapsed() < startup_budget.min(Duration::from_secs(180)),
            "not SERVING within the startup probe's budget:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut embedder = proto::embedder_client::EmbedderClient::connect(url.clone())
        .await
        .expect("connect");
    embedder
        .embed(embed_request(&["Deployed from the Kubernetes config."]))
        .await
        .expect("Embed");
    // logging.format = "json": one JSON object per line, for log collectors.
    let logs = server.logs();
    assert!(logs.lines().count() >= 2, "{logs}");
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let value: Value = serde_json::from_str(line)
            .unwrap_or_else(|err| panic!("a log line that is not JSON ({err}): {line}"));
        assert!(value.is_object(), "{line}");
    }

    // SIGTERM, as the kubelet sends it: readiness fails at once, liveness
    // does not, calls are still served during the drain delay, and the process
    // exits 0 well within terminationGracePeriodSeconds.
    let signalled = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    loop {
        if health_at(&url, "").await == Some(ServingStatus::NotServing) {
            break;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(2),
            "readiness did not fail after SIGTERM:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        health_at(&url, tlserve::server::LIVENESS_SERVICE).await,
        Some(ServingStatus::Serving),
        "liveness stays SERVING while draining"
    );
    let drain = Duration::from_secs_f64(config.server.drain_delay_seconds);
    assert!(signalled.elapsed() < drain, "still inside the drain delay");
    embedder
        .embed(embed_request(&["Still served while draining."]))
        .await
        .expect("a call during the drain delay is served");

    let code = loop {
        if let Some(status) = server.child.try_wait().expect("wait") {
            break status.code();
        }
        assert!(
            signalled.elapsed() < grace,
            "still running after terminationGracePeriodSeconds ({grace:?}): the kubelet would SIGKILL it\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took = signalled.elapsed();
    assert_eq!(code, Some(0), "exit code:\n{}", server.logs());
    assert!(
        took >= drain.saturating_sub(Duration::from_millis(500)),
        "exited after {took:?}, before the drain delay ({drain:?}) ended"
    );
}

// ---------------------------------------------------------------------------
// (c) Dockerfiles

#[test]
fn dockerfiles_pass_hadolint_and_build_the_documented_images() {
    let hadolint = venv_tool("hadolint");
    let ignore: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    for local_state in ["target", "models", ".venv", "heads", ".git"] {
        assert!(
            docker_ignored(&ignore, local_state),
            ".dockerignore keeps {local_state} out of the build context"
        );
    }

    // The runtime image adds only ca-certificates to debian:bookworm-slim, so the
    // binary (built here on the builder's Debian release) may link only what
    // every Debian system has: no libssl, no libstdc++.
    let ldd = run_ok(
        Command::new(system_tool("ldd", "Debian's libc-bin")).arg(env!("CARGO_BIN_EXE_tlserve")),
        None,
    );
    for line in ldd.lines().filter(|l| !l.trim().is_empty()) {
        let library = line.split_whitespace().next().unwrap_or_default();
        let base = [
            "linux-vdso.so.1",
            "libgcc_s.so.1",
            "libm.so.6",
            "libc.so.6",
            "libpthread.so.0",
            "libdl.so.2",
            "librt.so.1",
        ];
        assert!(
            base.contains(&library) || library.starts_with("/lib64/ld-linux"),
            "tlserve links {library}, which debian:bookworm-slim lacks: install it in the runtime stage\n{ldd}"
        );
    }

    for (path, cuda) in [
        ("deploy/docker/Dockerfile", false),
        ("deploy/docker/Dockerfile.cuda", true),
    ] {
        let lint = run(
            Command::new(&hadolint)
                .arg("--no-color")
                .arg(repo_file(path)),
            None,
        );
        assert!(
            lint.status.success() && lint.stdout.is_empty(),
            "hadolint {path}:\n{}{}",
            String::from_utf8_lossy(&lint.stdout),
            String::from_utf8_lossy(&lint.stderr)
        );

        let dockerfile = Dockerfile::parse(path);
        let names: Vec<&str> = dockerfile.stages.iter().map(|s| s.name.as_str()).collect();
        for stage in [
            "builder",
            "models",
            "runtime-base",
            "with-models",
            "runtime",
        ] {
            assert!(names.contains(&stage), "{path}: stage {stage} in {names:?}");
        }
        assert_eq!(
            names.last(),
            Some(&"runtime"),
            "{path}: the default target is the last stage"
        );

        // Builder: the official Rust image (CPU) or CUDA's devel image, with the
        // dependencies built in a layer of their own before the source arrives.
        let builder = dockerfile.stage("builder");
        if cuda {
            assert!(
                builder.base.starts_with("nvidia/cuda:") && builder.base.contains("-devel-"),
                "{}",
                builder.base
            );
        } else {
            assert!(
                builder.base.starts_with("rust:1.") && builder.base.ends_with("-bookworm"),
                "{}",
                builder.base
            );
        }
        let position = |pred: &dyn Fn(&(String, String)) -> bool, what: &str| {
            builder
                .instructions
                .iter()
                .position(pred)
                .unwrap_or_else(|| panic!("{path}: builder has no {what}"))
        };
        let first_build = position(
            &|(k, a)| k == "RUN" && a.contains("cargo build"),
            "cargo build",
        );
        let source = position(&|(k, a)| k == "COPY" && a.starts_with("src "), "COPY src");
        assert!(
            first_build < source,
            "{path}: dependencies are built before the source is copied"
        );
        // Files the source compiles in (include_str!/include_bytes!) must be in
        // the build context's copy too, or the image build fails.
        let copied: Vec<&str> = builder
            .instructions
            .iter()
            .filter(|(k, _)| k == "COPY")
            .flat_map(|(_, a)| a.split_whitespace())
            .collect();
        for top in included_top_dirs() {
            assert!(
                copied.contains(&top.as_str()),
                "{path}: the builder does not copy {top}/, which src/ compiles in"
            );
        }
        let copied_before: String = builder.instructions[..first_build]
            .iter()
            .filter(|(k, _)| k == "COPY")
            .map(|(_, a)| a.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        for needed in ["Cargo.toml", "Cargo.lock", "build.rs", "proto"] {
            assert!(
                copied_before.split_whitespace().any(|w| w == needed),
                "{path}: {needed} is copied before the dependency build (build.rs compiles proto/)"
            );
        }
        for (_, args) in builder
            .instructions
            .iter()
            .filter(|(k, a)| k == "RUN" && a.contains("cargo build"))
        {
            assert!(
                args.contains("cargo build --release --locked"),
                "{path}: {args}"
            );
            assert_eq!(args.contains("--features cuda"), cuda, "{path}: {args}");
        }

        // Runtime: slim base, nothing but ca-certificates, the binary, a fixed
        // non-root uid, the documented ports, entrypoint and config.
        let base = dockerfile.stage("runtime-base");
        if cuda {
            assert!(
                base.base.starts_with("nvidia/cuda:") && base.base.contains("-runtime-"),
                "{}",
                base.base
            );
        } else {
            assert_eq!(base.base, "debian:bookworm-slim");
        }
        for (_, args) in base
            .instructions
            .iter()
            .filter(|(k, a)| k == "RUN" && a.contains("apt-get install"))
        {
            let packages: Vec<&str> = args
                .split("apt-get install")
                .nth(1)
                .unwrap()
                .split("&&")
                .next()
                .unwrap()
                .split_whitespace()
                .filter(|w| !w.starts_with('-'))
                .collect();
            assert_eq!(packages, ["ca-certificates"], "{path}: runtime packages");
        }
        assert!(
            base.instructions.iter().any(|(k, a)| k == "COPY"
                && a.starts_with("--from=builder ")
                && a.ends_with(" /usr/local/bin/tlserve")),
            "{path}: the binary at /usr/local/bin/tlserve"
        );
        for target in ["runtime", "with-models"] {
            let user = dockerfile
                .effective(target, "USER")
                .unwrap_or_else(|| panic!("{path}: {target} has no USER"));
            assert_ne!(uid_of(&user), 0, "{path}: {target} runs as non-root");
            assert_eq!(
                uid_of(&user),
                10001,
                "{path}: the uid the Kubernetes manifests use"
            );
            let exposed: BTreeSet<String> = dockerfile
                .effective(target, "EXPOSE")
                .expect("EXPOSE")
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            assert_eq!(
                exposed,
                BTreeSet::from(["50051".to_owned(), "9090".to_owned()]),
                "{path}"
            );
            let entrypoint: Value = serde_json::from_str(
                &dockerfile
                    .effective(target, "ENTRYPOINT")
                    .expect("ENTRYPOINT"),
            )
            .expect("exec-form ENTRYPOINT");
            assert_eq!(entrypoint, serde_json::json!(["tlserve"]), "{path}");
            let cmd: Value =
                serde_json::from_str(&dockerfile.effective(target, "CMD").expect("CMD"))
                    .expect("exec-form CMD");
            assert_eq!(
                cmd,
                serde_json::json!(["serve", "--config", "/etc/tlserve/tlserve.toml"]),
                "{path}"
            );
        }
        let config_copy = base
            .instructions
            .iter()
            .find(|(k, a)| k == "COPY" && a.ends_with(" /etc/tlserve/tlserve.toml"))
            .unwrap_or_else(|| panic!("{path}: the config at /etc/tlserve/tlserve.toml"));
        let config_source = config_copy.1.split_whitespace().next().unwrap();
        // The image's config with the image's own TLSERVE__* environment, as the
        // server will read it.
        let env: Vec<(String, String)> = dockerfile
            .env("runtime")
            .into_iter()
            .filter(|(k, _)| k.starts_with("TLSERVE__"))
            .collect();
        let config = Config::from_toml(&read(config_source), Path::new("/etc/tlserve"), env)
            .unwrap_or_else(|err| panic!("{path}: the server rejects the image's config: {err}"));
        assert_eq!(config.server.listen.port(), 50051);
        assert_eq!(config.server.metrics_listen.map(|a| a.port()), Some(9090));
        assert!(
            config.server.listen.ip().is_unspecified(),
            "reachable from outside the container"
        );
        assert_eq!(
            config.backbones[0].device,
            if cuda { "cuda:0" } else { "cpu" }
        );
        assert_eq!(
            config.backbones[0].source.path.as_deref(),
            Some(Path::new("/models/all-MiniLM-L6-v2"))
        );
        assert_eq!(config.heads.store_dir, Path::new("/heads"));

        // with-models: the weights, fetched by scripts/fetch-models.sh, at /models.
        let models = dockerfile.stage("models");
        assert!(models.base.starts_with("python:3."), "{}", models.base);
        assert!(models
            .instructions
            .iter()
            .any(|(k, a)| k == "COPY" && a.starts_with("scripts/fetch-models.sh ")));
        assert!(models
            .instructions
            .iter()
            .any(|(k, a)| k == "RUN" && a.ends_with("fetch-models.sh /models")));
        // It fetches exactly the models the image's config serves.
        let fetched = dockerfile
            .env("models")
            .into_iter()
            .find(|(k, _)| k == "TLSERVE_MODELS")
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("{path}: the models stage sets TLSERVE_MODELS"));
        assert_eq!(
            fetched_models(&fetched),
            served_models(&config, Path::new("/models")),
            "{path}: TLSERVE_MODELS"
        );
        let with_models = dockerfile.stage("with-models");
        assert_eq!(with_models.base, "runtime-base");
        assert!(with_models.instructions.iter().any(|(k, a)| k == "COPY"
            && a.starts_with("--from=models ")
            && a.ends_with(" /models /models")));
        assert_eq!(dockerfile.stage("runtime").base, "runtime-base");

        // Every file copied from the build context exists and is not ignored.
        for stage in &dockerfile.stages {
            for (_, args) in stage
                .instructions
                .iter()
                .filter(|(k, _)| k == "COPY" || k == "ADD")
            {
                let words: Vec<&str> = args.split_whitespace().collect();
                if words.iter().any(|w| w.starts_with("--from=")) {
                    continue;
                }
                let sources: Vec<&str> = words
                    .iter()
                    .filter(|w| !w.starts_with("--"))
                    .copied()
                    .collect();
                for source in &sources[..sources.len() - 1] {
                    repo_file(source);
                    assert!(
                        !docker_ignored(&ignore, source),
                        "{path}: {source} is in .dockerignore"
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// (d) Metrics: what the deploy files use is what the server exports

/// A server exercised until every metric of src/metrics.rs is exported, and its scrape.
async fn exercised_server_scrape() -> String {
    // A 1 s batching delay lets a 200 ms deadline expire in the queue, which
    // produces a queue rejection; a 64-input batch takes the whole training set.
    let server = TestServer::start(&TestServer::minilm_config(
        "",
        "max_queue_delay_ms = 1000\nmax_batch_size = 64",
    ))
    .await;
    let mut embedder = server.embedder().await;
    embedder
        .embed(embed_request(&[
            "A cat sits on the mat.",
            "Deploy and observe.",
        ]))
        .await
        .expect("Embed");
    let mut unknown = embed_request(&["x"]);
    unknown.backbone = "no-such-backbone".into();
    let status = embedder.embed(unknown).await.expect_err("unknown backbone");
    assert_eq!(status.code(), Code::NotFound);
    let mut late = tonic::Request::new(embed_request(&["too late"]));
    late.set_timeout(Duration::from_millis(200));
    let status = embedder
        .embed(late)
        .await
        .expect_err("expired in the queue");
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );

    // A small TrainHead job, to SUCCEEDED.
    let rows = std::fs::read_to_string(repo_file("tests/data/topics_train.tsv")).expect("tsv");
    let examples = rows
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(40)
        .map(|line| {
            let (label, text) = line.split_once('\t').expect("LABEL<TAB>TEXT");
            proto::Example {
                input: Some(text_input(text)),
                label: label.to_owned(),
            }
        })
        .collect();
    let mut stream = TrainerClient::new(server.channel().await)
        .train_head(proto::TrainHeadRequest {
            backbone: MINILM.into(),
            head_name: "deploy-check".into(),
            spec: None,
            training: Some(proto::TrainingConfig {
                epochs: 5,
                learning_rate: 0.02,
                seed: 1,
                ..Default::default()
            }),
            data: Some(proto::train_head_request::Data::Examples(
                proto::ExampleSet { examples },
            )),
            labels: vec![],
        })
        .await
        .expect("TrainHead")
        .into_inner();
    let mut last = None;
    while let Some(event) = stream.message().await.expect("job events") {
        last = Some(event.state());
    }
    assert_eq!(last, Some(proto::JobState::Succeeded), "{}", server.logs());

    // Some series appear a moment later: the dropped queue item once the worker
    // reaches it, the process figures at the sampler's next tick.
    let declared = declared_metric_names();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let scrape = server.scrape();
        let body = scrape
            .split_once("\r\n\r\n")
            .expect("HTTP body")
            .1
            .to_owned();
        let families = parse_exposition(&body);
        let missing: Vec<&String> = declared
            .iter()
            .filter(|n| !families.contains_key(*n))
            .collect();
        if missing.is_empty() {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never exported: {missing:?}\n{body}\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn every_metric_the_dashboard_and_rules_use_is_exported() {
    let promtool = promtool();
    let body = exercised_server_scrape().await;
    let lint = run_ok(
        Command::new(&promtool).args(["check", "metrics"]),
        Some(body.as_str()),
    );
    assert!(lint.trim().is_empty(), "promtool check metrics:\n{lint}");
    let families = parse_exposition(&body);
    let samples: BTreeMap<String, &str> = families
        .iter()
        .flat_map(|(name, f)| f.samples.iter().map(move |s| (s.clone(), name.as_str())))
        .collect();
    let all_labels: BTreeSet<&str> = families
        .values()
        .flat_map(|f| f.labels.keys().map(String::as_str))
        .chain(TARGET_LABELS)
        .chain(["le"])
        .collect();
    // Methods of the public contract, and those of the standard services
    // (Health, reflection) that the scrape shows.
    let mut rpcs = rpc_names();
    rpcs.extend(
        families["tlserve_grpc_requests_total"].labels["method"]
            .iter()
            .cloned(),
    );
    let codes: BTreeSet<&str> = (0..=16)
        .map(|n| tlserve::server::status::code_name(Code::from_i32(n)))
        .collect();
    let states: BTreeSet<String> = families["tlserve_training_jobs"].labels["state"].clone();
    assert_eq!(states.len(), 6, "every job state is reported: {states:?}");

    let dashboard: Value =
        serde_json::from_str(&read("deploy/grafana/tlserve.json")).expect("dashboard JSON");
    let rules = yaml_file("deploy/prometheus/rules.yaml");
    let adapter = yaml_file("deploy/prometheus/adapter.yaml");

    // Every tlserve_* word anywhere in the files names a metric family or a
    // series of one (descriptions and titles included).
    for (file, source) in [
        (
            "deploy/grafana/tlserve.json",
            read("deploy/grafana/tlserve.json"),
        ),
        (
            "deploy/prometheus/rules.yaml",
            read("deploy/prometheus/rules.yaml"),
        ),
        (
            "deploy/prometheus/rules.test.yaml",
            read("deploy/prometheus/rules.test.yaml"),
        ),
        (
            "deploy/prometheus/adapter.yaml",
            read("deploy/prometheus/adapter.yaml"),
        ),
        ("deploy/k8s/base/hpa.yaml", read("deploy/k8s/base/hpa.yaml")),
        ("deploy/README.md", read("deploy/README.md")),
    ] {
        for word in tlserve_words(&source) {
            // Histograms are named by family; `_bucket`, `_sum` and `_count` are theirs.
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    word.strip_suffix(s)
                        .filter(|base| families.get(*base).is_some_and(|f| f.kind == "histogram"))
                })
                .unwrap_or(&word);
            assert!(
                families.contains_key(family),
                "{file} names {word}, which the server does not export"
            );
        }
    }

    // Expressions: metric names are real series, label names exist on them, and
    // label values are ones the server produces.
    let mut on_dashboard = BTreeSet::new();
    // `panel`: an expression of a dashboard panel, where the template variables
    // must apply.
    let check = |file: &str, expr: &str, panel: bool, on_dashboard: &mut BTreeSet<String>| {
        // label_values(selector, label) in Grafana variables: the selector part.
        let expr = expr.strip_prefix("label_values(").unwrap_or(expr);
        let (selectors, grouping) = promql_references(expr);
        for label in &grouping {
            assert!(
                all_labels.contains(label.as_str()),
                "{file}: groups by unknown label {label} in {expr}"
            );
        }
        for selector in &selectors {
            // Label values, also on recording rules built from tlserve series.
            for (label, op, value) in &selector.matchers {
                let allowed: Option<BTreeSet<&str>> = match label.as_str() {
                    "code" => Some(codes.clone()),
                    "state" => Some(states.iter().map(String::as_str).collect()),
                    "reason" => Some(BTreeSet::from(REJECTION_REASONS)),
                    "method" => Some(rpcs.iter().map(String::as_str).collect()),
                    _ => None,
                };
                // Exact values and plain alternations (A|B) are checked; other
                // regular expressions are left alone.
                let plain = !value.is_empty()
                    && value
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '|');
                if let (Some(allowed), true) = (allowed, plain) {
                    for alternative in value.split('|') {
                        assert!(
                            allowed.contains(&alternative),
                            "{file}: {label}{op}\"{value}\": {alternative} is not a value tlserve reports ({allowed:?})"
                        );
                    }
                }
            }
            if !selector.metric.starts_with("tlserve_") {
                continue;
            }
            let Some(family_name) = samples.get(&selector.metric) else {
                panic!(
                    "{file}: {} is not a series the server exports (a histogram needs _bucket, _sum or _count) in {expr}",
                    selector.metric
                );
            };
            if file.ends_with(".json") {
                on_dashboard.insert(family_name.to_string());
            }
            let family = &families[*family_name];
            for (label, _, _) in &selector.matchers {
                let known = family.labels.contains_key(label)
                    || TARGET_LABELS.contains(&label.as_str())
                    || (label == "le" && selector.metric.ends_with("_bucket"));
                assert!(
                    known,
                    "{file}: {} has no label {label} in {expr}",
                    selector.metric
                );
            }
            // The dashboard's template variables apply to every panel.
            if panel {
                let has = |label: &str, var: &str| {
                    selector
                        .matchers
                        .iter()
                        .any(|(l, op, v)| l == label && op == "=~" && v == var)
                };
                assert!(
                    has("job", "$job") && has("instance", "$instance"),
                    "{file}: {} ignores $job/$instance in {expr}",
                    selector.metric
                );
                if family.labels.contains_key("backbone") {
                    assert!(
                        has("backbone", "$backbone"),
                        "{file}: {} ignores $backbone in {expr}",
                        selector.metric
                    );
                }
            }
        }
    };
    let mut panel_exprs = Vec::new();
    strings_under(&dashboard["panels"], "expr", &mut panel_exprs);
    for expr in &panel_exprs {
        check("deploy/grafana/tlserve.json", expr, true, &mut on_dashboard);
    }
    for variable in list(&dashboard["templating"]["list"], "templating") {
        if variable["type"] == "query" {
            let query = text(&variable["query"], "variable query");
            check(
                "deploy/grafana/tlserve.json",
                query,
                false,
                &mut on_dashboard,
            );
        }
    }
    let mut rule_exprs = Vec::new();
    strings_under(&rules, "expr", &mut rule_exprs);
    for expr in &rule_exprs {
        check(
            "deploy/prometheus/rules.yaml",
            expr,
            false,
            &mut on_dashboard,
        );
    }
    // The unit tests' input series must look like what the server exports.
    let mut unit_series = Vec::new();
    strings_under(
        &yaml_file("deploy/prometheus/rules.test.yaml"),
        "series",
        &mut unit_series,
    );
    for series in &unit_series {
        check(
            "deploy/prometheus/rules.test.yaml",
            series,
            false,
            &mut on_dashboard,
        );
    }
    let adapter_query = text(&adapter["rules"]["custom"][0]["seriesQuery"], "seriesQuery");
    check(
        "deploy/prometheus/adapter.yaml",
        adapter_query,
        false,
        &mut on_dashboard,
    );

    // The dashboard shows every metric the server declares.
    let declared = declared_metric_names();
    let missing: Vec<&String> = declared.difference(&on_dashboard).collect();
    assert!(
        missing.is_empty(),
        "deploy/grafana/tlserve.json has no panel for {missing:?}"
    );

    // The HPA's metric is what prometheus-adapter serves, from a per-pod gauge.
    let rule = &adapter["rules"]["custom"][0];
    assert_eq!(rule["name"]["as"], tlserve::metrics::QUEUE_DEPTH);
    assert_eq!(families[tlserve::metrics::QUEUE_DEPTH].kind, "gauge");
    assert_eq!(rule["resources"]["overrides"]["pod"]["resource"], "pod");
    assert_eq!(
        rule["resources"]["overrides"]["namespace"]["resource"],
        "namespace"
    );
    let hpa = yaml_file("deploy/k8s/base/hpa.yaml");
    assert_eq!(
        hpa["spec"]["metrics"][0]["pods"]["metric"]["name"],
        rule["name"]["as"]
    );

    // The dashboard itself: a datasource variable used by every panel and
    // query, job and instance variables, unique panel ids.
    let variables: BTreeMap<&str, &Value> = list(&dashboard["templating"]["list"], "templating")
        .iter()
        .map(|v| (text(&v["name"], "variable name"), v))
        .collect();
    assert_eq!(variables["datasource"]["type"], "datasource");
    assert_eq!(variables["datasource"]["query"], "prometheus");
    for name in ["job", "instance", "backbone"] {
        assert_eq!(variables[name]["type"], "query", "variable {name}");
        assert_eq!(variables[name]["datasource"]["uid"], "${datasource}");
    }
    let mut ids = BTreeSet::new();
    for panel in list(&dashboard["panels"], "panels") {
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "duplicate panel id"
        );
        if panel["type"] != "row" {
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{}",
                panel["title"]
            );
            for target in list(&panel["targets"], "targets") {
                assert_eq!(
                    target["datasource"]["uid"], "${datasource}",
                    "{}",
                    panel["title"]
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// (e) Prometheus rules

#[test]
fn promtool_accepts_the_rules_and_every_alert_says_what_to_do() {
    let promtool = promtool();
    run_ok(
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(repo_file("deploy/prometheus/rules.yaml")),
        None,
    );

    let rules = yaml_file("deploy/prometheus/rules.yaml");
    let mut records = BTreeSet::new();
    let mut alerts = BTreeMap::new();
    for group in list(&rules["groups"], "groups") {
        for rule in list(&group["rules"], "rules") {
            if let Some(record) = rule["record"].as_str() {
                assert!(records.insert(record.to_owned()), "record {record} twice");
            } else {
                let name = text(&rule["alert"], "alert").to_owned();
                assert!(
                    alerts.insert(name.clone(), rule.clone()).is_none(),
                    "alert {name} twice"
                );
            }
        }
    }
    for expected in [
        "TlserveHighErrorRatio",
        "TlserveHighLatencyP99",
        "TlserveQueueNearlyFull",
        "TlserveQueueRejecting",
        "TlservePodNotReady",
        "TlserveTrainingJobsFailing",
    ] {
        assert!(alerts.contains_key(expected), "alert {expected}");
    }
    for (name, rule) in &alerts {
        let severity = text(&rule["labels"]["severity"], "severity");
        assert!(
            ["critical", "warning", "info"].contains(&severity),
            "{name}: severity {severity}"
        );
        for annotation in ["summary", "description", "runbook"] {
            let value = text(&rule["annotations"][annotation], annotation);
            assert!(!value.trim().is_empty(), "{name}: empty {annotation}");
        }
        assert!(
            !text(&rule["annotations"]["runbook"], "runbook").contains('\n'),
            "{name}: a runbook line"
        );
    }

    // rules.test.yaml: every alert fires in a unit test with realistic series
    // (and stays quiet on look-alikes, which the tests also feed it).
    run_ok(
        Command::new(&promtool)
            .args(["test", "rules"])
            .arg(repo_file("deploy/prometheus/rules.test.yaml")),
        None,
    );
    let unit_tests = yaml_file("deploy/prometheus/rules.test.yaml");
    let mut fired = BTreeSet::new();
    for test in list(&unit_tests["tests"], "tests") {
        for case in list(&test["alert_rule_test"], "alert_rule_test") {
            if case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()) {
                fired.insert(text(&case["alertname"], "alertname").to_owned());
            }
        }
    }
    let untested: Vec<&String> = alerts.keys().filter(|a| !fired.contains(*a)).collect();
    assert!(
        untested.is_empty(),
        "deploy/prometheus/rules.test.yaml never fires {untested:?}"
    );

    // Recording rules used by other rules are defined here.
    let mut exprs = Vec::new();
    strings_under(&rules, "expr", &mut exprs);
    for expr in &exprs {
        for selector in promql_references(expr).0 {
            if selector.metric.contains(':') {
                assert!(
                    records.contains(&selector.metric),
                    "{} is not recorded here: {expr}",
                    selector.metric
                );
            }
        }
    }

    // The queue alert fires at 80% of the queue the Kubernetes config sets.
    let config = Config::from_toml(
        &read("deploy/k8s/base/tlserve.toml"),
        Path::new("/etc/tlserve"),
        Vec::new(),
    )
    .expect("the Kubernetes config");
    let threshold: f64 = text(&alerts["TlserveQueueNearlyFull"]["expr"], "expr")
        .rsplit('>')
        .next()
        .unwrap()
        .trim()
        .parse()
        .expect("TlserveQueueNearlyFull compares with a number");
    let max_queue_items = config.backbones[0].max_queue_items as f64;
    assert_eq!(
        threshold,
        (0.8 * max_queue_items).floor(),
        "80% of max_queue_items ({max_queue_items})"
    );
    // Pods of the Deployment are named after it.
    assert!(text(&alerts["TlservePodNotReady"]["expr"], "expr").contains("pod=~\"tlserve-.+\""));
}

/// Top-level folders of the files that src/ compiles in with include_str! or
/// include_bytes! (paths relative to the including file).
fn included_top_dirs() -> std::collections::BTreeSet<String> {
    fn visit(dir: &std::path::Path, out: &mut std::collections::BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                visit(&path, out);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for macro_name in ["include_str!(\"", "include_bytes!(\""] {
                for piece in text.split(macro_name).skip(1) {
                    let relative = piece.split('"').next().expect("a path");
                    let target = path.parent().expect("parent").join(relative);
                    let target = target
                        .canonicalize()
                        .unwrap_or_else(|err| panic!("{}: {relative}: {err}", path.display()));
                    let root = repo_file("").canonicalize().expect("repo root");
                    let inside = target.strip_prefix(&root).expect("inside the repository");
                    let top = inside.components().next().expect("a top folder");
                    out.insert(top.as_os_str().to_string_lossy().into_owned());
                }
            }
        }
    }
    let mut out = std::collections::BTreeSet::new();
    visit(&repo_file("src"), &mut out);
    out
}
