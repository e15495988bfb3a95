//! deploy/k8s against the code: the kustomize overlays render, every built-in
//! object passes strict schema validation (kubernetes-validate) for the oldest
//! and newest Kubernetes we support, and the ServiceMonitor (a CRD, no
//! built-in schema) is checked by hand. The rendered Deployment is then
//! checked against the rendered server config (ports, probes, volumes, drain
//! timing, security, the GPU settings), and the real server boots from the
//! rendered ConfigMap and drains on SIGTERM as the probes and
//! terminationGracePeriodSeconds expect.
//!
//! Tools: kubectl (scripts/setup-tools.sh) and kubernetes-validate
//! (scripts/setup-python.sh); helpers in tests/deploy/support/.

use crate::common;
use crate::support;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;
use support::{
    dockerfile::{image_uid, Dockerfile},
    kubernetes::{Rendered, CUSTOM_RESOURCE_GROUPS, KUBERNETES_VERSIONS, OVERLAYS},
    *,
};
use tlserve::proto;
use tonic_health::pb::health_check_response::ServingStatus;

// ---------------------------------------------------------------------------
// Render and validate

#[test]
fn overlays_render_to_schema_valid_objects() {
    let validator = venv_tool("kubernetes-validate");
    for overlay in OVERLAYS {
        let rendered = Rendered::render(overlay);
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for object in &rendered.objects {
            *kinds.entry(text(&object["kind"], "kind")).or_default() += 1;
        }
        // Object storage: its settings' ConfigMap instead of the heads' claim.
        let object_storage = usize::from(overlay == "object-storage");
        let expected: BTreeMap<&str, usize> = [
            ("ConfigMap", 2 + object_storage),
            ("Deployment", 1),
            ("HorizontalPodAutoscaler", 1),
            ("NetworkPolicy", 1),
            ("PersistentVolumeClaim", 2 - object_storage),
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
        check_network_policy(&rendered);

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

/// The NetworkPolicy selects the server's pods and names only their ports:
/// gRPC and HTTP open to every peer, the metrics port only to the
/// monitoring namespace, nothing else.
fn check_network_policy(rendered: &Rendered) {
    let overlay = rendered.overlay;
    let policy = rendered.named("NetworkPolicy", "tlserve");
    let deployment = rendered.named("Deployment", "tlserve");
    let pod_labels = labels_of(&deployment["spec"]["template"]["metadata"]["labels"]);
    let selector = labels_of(&policy["spec"]["podSelector"]["matchLabels"]);
    assert!(
        selects(&selector, &pod_labels),
        "{overlay}: the NetworkPolicy selects the server's pods"
    );
    assert_eq!(
        policy["spec"]["policyTypes"],
        serde_json::json!(["Ingress"])
    );
    let mut open = BTreeSet::new();
    let mut monitoring_only = BTreeSet::new();
    for rule in list(&policy["spec"]["ingress"], "ingress") {
        let ports: Vec<&str> = list(&rule["ports"], "ports")
            .iter()
            .map(|p| text(&p["port"], "port"))
            .collect();
        for port in &ports {
            rendered.container_port(port);
        }
        if rule["from"].is_null() {
            open.extend(ports);
        } else {
            let peers = list(&rule["from"], "from");
            assert_eq!(peers.len(), 1, "{overlay}: one peer for the metrics port");
            assert_eq!(
                peers[0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
                "monitoring"
            );
            assert!(peers[0]["podSelector"].is_null());
            monitoring_only.extend(ports);
        }
    }
    assert_eq!(open, BTreeSet::from(["grpc", "http"]), "{overlay}");
    assert_eq!(monitoring_only, BTreeSet::from(["metrics"]), "{overlay}");
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

        check_shared_store(&rendered, &config, container);

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

        // GPU: one GPU (which alone keeps the pod on GPU nodes: a node label
        // is an optional component), the device and GPU batching from the
        // environment, a writable kernel cache.
        let limits = &container["resources"]["limits"];
        if overlay == "gpu" {
            assert_eq!(limits["nvidia.com/gpu"].to_string().trim_matches('"'), "1");
            assert!(list(&pod["tolerations"], "tolerations")
                .iter()
                .any(|t| t["key"] == "nvidia.com/gpu" && t["effect"] == "NoSchedule"));
            assert!(pod["nodeSelector"].is_null() && pod["runtimeClassName"].is_null());
            let backbone = &config.backbones[0];
            assert!(backbone.max_batch_size > 32, "{}", at("GPU batch size"));
            assert_writable_cuda_cache(&rendered);
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
            "TLSERVE__SERVER__HTTP_LISTEN",
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

/// CUDA_CACHE_PATH names a mounted, writable volume: the root filesystem is
/// read-only, and a lost cache means compiling the kernels at every start.
fn assert_writable_cuda_cache(rendered: &Rendered) {
    let container = rendered.container();
    let env = list(&container["env"], "env");
    let path = env
        .iter()
        .find(|v| v["name"] == "CUDA_CACHE_PATH")
        .map(|v| text(&v["value"], "CUDA_CACHE_PATH"))
        .expect("CUDA_CACHE_PATH in the GPU container");
    let mount = list(&container["volumeMounts"], "volumeMounts")
        .iter()
        .find(|m| m["mountPath"] == path)
        .unwrap_or_else(|| panic!("no volume mounted at CUDA_CACHE_PATH {path}"));
    assert_ne!(mount["readOnly"], true, "the CUDA cache must be writable");
    let volume = rendered.volume(text(&mount["name"], "mount name"));
    assert!(volume["emptyDir"].is_object(), "{volume}");
}

/// Where replicas share heads, datasets and jobs: a writable ReadWriteMany
/// claim mounted at the store's folder, or (object-storage overlay) a bucket
/// named in the config, credentials from the Secret, and no claim for heads.
fn check_shared_store(rendered: &Rendered, config: &tlserve::config::Config, container: &Value) {
    let heads = rendered.mount_holding(container, &config.heads.store_dir);
    let volume = rendered.volume(text(&heads["name"], "name"));
    if config.storage.backend == tlserve::config::StorageBackend::S3 {
        assert_eq!(rendered.overlay, "object-storage");
        assert!(!config.storage.s3.bucket.is_empty(), "a bucket");
        assert!(volume["emptyDir"].is_object(), "{volume}");
        assert!(
            rendered
                .all("PersistentVolumeClaim")
                .iter()
                .all(|c| c["metadata"]["name"] != "tlserve-heads"),
            "no claim for heads"
        );
        let secret = list(&container["envFrom"], "envFrom")
            .iter()
            .find_map(|from| from["secretRef"]["name"].as_str())
            .expect("credentials from a Secret");
        assert_eq!(secret, "tlserve-s3-credentials");
        return;
    }
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
}

/// The path from `from` to `to`, both absolute: kustomize takes only
/// relative paths to other kustomizations.
fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from.components().collect();
    let to: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut path = PathBuf::new();
    for _ in common..from.len() {
        path.push("..");
    }
    to[common..].iter().for_each(|c| path.push(c));
    path
}

/// The Deployment of `overlay` (under deploy/k8s) with `components` added,
/// as `kubectl kustomize` renders it.
fn deployment_with_components(overlay: &str, components: &[&str]) -> Value {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let k8s = repo_file("deploy/k8s");
    let to = |path: &str| {
        relative_path(dir.path(), &k8s.join(path))
            .display()
            .to_string()
    };
    let mut kustomization = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
         resources:\n  - {}\ncomponents:\n",
        to(overlay)
    );
    for component in components {
        kustomization.push_str(&format!("  - {}\n", to(component)));
    }
    std::fs::write(dir.path().join("kustomization.yaml"), kustomization).expect("write");
    let yaml = run_ok(
        Command::new(kubectl()).arg("kustomize").arg(dir.path()),
        None,
    );
    yaml_documents(&yaml)
        .into_iter()
        .find(|o| o["kind"] == "Deployment")
        .expect("a Deployment")
}

#[test]
fn the_optional_gpu_components_add_a_node_label_and_a_runtime_class() {
    let deployment = deployment_with_components(
        "overlays/gpu",
        &[
            "components/gpu-node-label",
            "components/nvidia-runtime-class",
        ],
    );
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["nodeSelector"]["nvidia.com/gpu.present"], "true");
    assert_eq!(pod["runtimeClassName"], "nvidia");
    // The rest of the GPU overlay is still there.
    assert!(list(&pod["tolerations"], "tolerations")
        .iter()
        .any(|t| t["key"] == "nvidia.com/gpu"));
}

/// The optional volume-permissions component puts a first init container
/// that hands the shared volumes' top folders to the image's user, root with
/// only CHOWN and FOWNER, on volumes the pod has, before the model fetch;
/// the result still passes strict schema validation.
#[test]
fn the_volume_permissions_component_chowns_the_shared_volumes_first() {
    let deployment =
        deployment_with_components("overlays/cpu", &["components/rwx-volume-permissions"]);
    let pod = &deployment["spec"]["template"]["spec"];
    let inits = list(&pod["initContainers"], "initContainers");
    let names: Vec<&str> = inits.iter().map(|c| text(&c["name"], "name")).collect();
    assert_eq!(names, ["volume-permissions", "fetch-models"]);
    let init = &inits[0];
    let security = &init["securityContext"];
    assert_eq!(security["runAsUser"], 0);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(
        security["capabilities"]["add"],
        serde_json::json!(["CHOWN", "FOWNER"])
    );
    let volumes: BTreeSet<&str> = list(&pod["volumes"], "volumes")
        .iter()
        .map(|v| text(&v["name"], "volume name"))
        .collect();
    let mounts: BTreeMap<&str, &str> = list(&init["volumeMounts"], "volumeMounts")
        .iter()
        .map(|m| (text(&m["mountPath"], "mountPath"), text(&m["name"], "name")))
        .collect();
    assert_eq!(
        mounts.keys().copied().collect::<Vec<_>>(),
        ["/heads", "/models"]
    );
    assert!(mounts.values().all(|v| volumes.contains(v)), "{mounts:?}");
    let user = pod["securityContext"]["runAsUser"]
        .as_u64()
        .expect("pod user");
    let command = list(&init["command"], "command")
        .iter()
        .map(|c| text(c, "command"))
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        command.contains(&format!("chown {user}:{user} /heads /models")),
        "{command}"
    );

    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let file = dir.path().join("deployment.json");
    std::fs::write(&file, deployment.to_string()).expect("write");
    let validator = venv_tool("kubernetes-validate");
    for version in KUBERNETES_VERSIONS {
        run_ok(
            Command::new(&validator)
                .args(["--strict", "--kubernetes-version", version])
                .arg(&file),
            None,
        );
    }
}
