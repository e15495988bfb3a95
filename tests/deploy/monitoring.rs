//! deploy/grafana and deploy/prometheus against the code: a real server,
//! exercised until it exports every metric in src/metrics.rs, passes
//! `promtool check metrics`; every `tlserve_*` name, label and label value
//! that the dashboard, the rules, their unit tests and the prometheus-adapter
//! rule use is one it exports, and the dashboard shows every declared metric.
//! `promtool check rules` accepts the rules and `promtool test rules` fires
//! every alert.
//!
//! Tools: promtool (scripts/setup-tools.sh); helpers in tests/deploy/support/.

use crate::common;
use crate::support;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;
use support::{
    exposition::parse_exposition,
    monitoring::{
        declared_metric_names, rpc_names, strings_under, tlserve_words, REJECTION_REASONS,
        TARGET_LABELS,
    },
    promql::promql_references,
    *,
};
use tlserve::{
    config::Config,
    proto::{self, trainer_client::TrainerClient},
};
use tonic::Code;

// ---------------------------------------------------------------------------
// Metrics: what the deploy files use is what the server exports

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

    // One request on the HTTP port (OpenAI-compatible API).
    let answer = common::http_client::request(server.http, "GET", "/v1/models", &[], b"");
    assert_eq!(answer.status, 200);

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
            .filter(|n| {
                !families.contains_key(*n) && !tlserve::metrics::GPU_ONLY.contains(&n.as_str())
            })
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

/// The scrape as a server with a GPU backbone gives it: the GPU-only gauges
/// (src/metrics.rs GPU_ONLY) with their labels, which no CI machine can export.
fn with_gpu_series(mut body: String) -> String {
    for name in tlserve::metrics::GPU_ONLY {
        assert!(!body.contains(name), "{name} is exported without a GPU");
        body.push_str(&format!(
            "# HELP {name} GPU memory each backbone took at load\n# TYPE {name} gauge\n\
             {name}{{backbone=\"minilm\",device=\"cuda:0\"}} 123456789\n"
        ));
    }
    body
}

#[tokio::test]
async fn every_metric_the_dashboard_and_rules_use_is_exported() {
    let promtool = promtool();
    let body = with_gpu_series(exercised_server_scrape().await);
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
        .map(|n| tlserve::server::grpc::status::code_name(Code::from_i32(n)))
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
                    has("namespace", "$namespace")
                        && has("job", "$job")
                        && has("instance", "$instance"),
                    "{file}: {} ignores $namespace/$job/$instance in {expr}",
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
    // query, namespace, job and instance variables, unique panel ids.
    let variables: BTreeMap<&str, &Value> = list(&dashboard["templating"]["list"], "templating")
        .iter()
        .map(|v| (text(&v["name"], "variable name"), v))
        .collect();
    assert_eq!(variables["datasource"]["type"], "datasource");
    assert_eq!(variables["datasource"]["query"], "prometheus");
    for name in ["namespace", "job", "instance", "backbone"] {
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

/// A server that has done nothing already exports every series the
/// dashboard and the rules count from: each family they name, each `state`
/// and `reason` they match on, and each `code` they match on for every one of
/// our methods. A counter that first appears at 1 has no earlier sample, so
/// without this `increase()` and `rate()` would miss the first failure of a
/// fresh pod.
#[tokio::test]
async fn every_series_the_dashboard_and_rules_count_from_exists_from_start() {
    let server = TestServer::start(&TestServer::minilm_config("", "")).await;
    let scrape = server.scrape();
    let body = scrape.split_once("\r\n\r\n").expect("HTTP body").1;
    let families = parse_exposition(body);
    let series_lines: Vec<&str> = body.lines().filter(|l| !l.starts_with('#')).collect();
    let has_series = |metric: &str, labels: &[(&str, &str)]| {
        series_lines.iter().any(|line| {
            line.starts_with(&format!("{metric}{{"))
                && labels
                    .iter()
                    .all(|(label, value)| line.contains(&format!("{label}=\"{value}\"")))
        })
    };
    let mut exprs = Vec::new();
    let dashboard: Value =
        serde_json::from_str(&read("deploy/grafana/tlserve.json")).expect("dashboard JSON");
    strings_under(&dashboard["panels"], "expr", &mut exprs);
    strings_under(
        &yaml_file("deploy/prometheus/rules.yaml"),
        "expr",
        &mut exprs,
    );
    let rpcs = rpc_names();
    let mut checked = 0;
    for expr in &exprs {
        for selector in promql_references(expr).0 {
            let metric = selector.metric.as_str();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| metric.strip_suffix(suffix))
                .filter(|base| families.get(*base).is_some_and(|f| f.kind == "histogram"))
                .unwrap_or(metric);
            let ours = metric.starts_with("tlserve_");
            if ours && !tlserve::metrics::GPU_ONLY.contains(&family) {
                assert!(
                    families.contains_key(family),
                    "{family} is not exported before anything happened ({expr})\n{body}"
                );
            }
            // Recording rules carry the labels of the series they sum:
            // codes those of the calls, reasons those of the rejections.
            let counted = |label: &str| match label {
                "code" => Some(tlserve::metrics::GRPC_REQUESTS_TOTAL),
                "reason" => Some(tlserve::metrics::QUEUE_REJECTIONS_TOTAL),
                "state" if ours => Some(metric),
                _ => None,
            };
            for (label, op, value) in &selector.matchers {
                let Some(metric) = counted(label) else {
                    continue;
                };
                let plain = value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '|');
                if !(op == "=" || (op == "=~" && plain)) {
                    continue;
                }
                for alternative in value.split('|') {
                    if label == "code" {
                        for rpc in &rpcs {
                            assert!(
                                has_series(metric, &[("method", rpc), ("code", alternative)]),
                                "{metric} for {rpc} with code {alternative} is not exported from start"
                            );
                        }
                    } else {
                        assert!(
                            has_series(metric, &[(label, alternative)]),
                            "{metric} with {label}={alternative} is not exported from start ({expr})"
                        );
                    }
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 8, "the label values were checked ({checked})");
    // The first failed job counts: its series is there at zero.
    assert!(has_series(
        "tlserve_training_job_duration_seconds_count",
        &[("state", "failed")]
    ));
    assert!(has_series(
        "tlserve_queue_rejections_total",
        &[("backbone", MINILM), ("reason", "queue_full")]
    ));
}

// ---------------------------------------------------------------------------
// Prometheus rules

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
        "TlservePanicked",
        "TlserveTargetDown",
        "TlserveTargetsMissing",
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
