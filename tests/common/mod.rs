//! Shared helpers for the integration tests: start the real `tlserve` binary on
//! loopback ports, talk gRPC to it, find the model and the Python tools.
//!
//! Tests that need the real model or Python fail (never skip) when those are
//! missing: `scripts/test.sh` installs them.

#![allow(dead_code)]

pub mod http_client;
pub mod moto;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tlserve::proto::{
    self, embedder_client::EmbedderClient, input::Kind, models_client::ModelsClient,
};
use tonic::transport::Channel;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

pub const MINILM: &str = "all-MiniLM-L6-v2";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The real all-MiniLM-L6-v2 folder; panics with the fix when it is missing.
pub fn minilm_dir() -> PathBuf {
    let dir = std::env::var_os("TLSERVE_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models").join(MINILM));
    assert!(
        dir.join("model.safetensors").is_file(),
        "the real model is missing at {}: run scripts/fetch-models.sh",
        dir.display()
    );
    dir
}

/// The test virtualenv's Python (numpy, grpcio); panics with the fix when missing.
pub fn python() -> PathBuf {
    let path = std::env::var_os("TLSERVE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"));
    assert!(
        path.is_file(),
        "the test Python is missing at {}: run scripts/setup-python.sh",
        path.display()
    );
    path
}

/// The grpcurl binary installed by scripts/setup-python.sh.
pub fn grpcurl() -> PathBuf {
    let path = python()
        .parent()
        .expect("python lives in a bin folder")
        .join("grpcurl");
    assert!(
        path.is_file(),
        "grpcurl is missing at {}: run scripts/setup-python.sh",
        path.display()
    );
    path
}

/// A loopback port free now. The kernel may hand a just-released port out
/// again, so ports this process already gave out are skipped: servers started
/// side by side never get the same one.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Held by the tests whose assertions bound a wall time (a refusal "at
/// once", a connection closed "within seconds", a p99 under load): all the
/// integration tests share one binary and run two at a time, and two such
/// tests side by side would each measure the other's load.
pub async fn timing_sensitive() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// A `tlserve serve` child process on loopback ports.
pub struct TestServer {
    child: Child,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    /// The HTTP port: OpenAI-compatible API, console, gRPC-Web.
    pub http: SocketAddr,
    log: tempfile::NamedTempFile,
    _config_dir: tempfile::TempDir,
}

impl TestServer {
    /// Config for the real MiniLM plus `extra` TOML appended to the `[server]`-less
    /// tail (top-level tables such as `[limits]`).
    pub fn minilm_config(extra_limits: &str, extra_backbone: &str) -> String {
        format!(
            r#"
[limits]
{extra_limits}

[[backbones]]
name = "{MINILM}"
architecture = "bert"
source = {{ path = "{path}" }}
{extra_backbone}
"#,
            path = minilm_dir().display()
        )
    }

    /// Starts a server with MiniLM and waits until it reports SERVING.
    pub async fn start_minilm() -> Self {
        Self::start(&Self::minilm_config("", "")).await
    }

    pub async fn start(config_tail: &str) -> Self {
        let server = Self::spawn(config_tail, &[]);
        server.wait_until(ServingStatus::Serving).await;
        server
    }

    /// Starts a server without waiting for it; `env` adds environment variables.
    pub fn spawn(config_tail: &str, env: &[(&str, &str)]) -> Self {
        let grpc: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let http: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("tlserve.toml");
        let config = format!(
            "[server]\nlisten = \"{grpc}\"\nmetrics_listen = \"{metrics}\"\n\
             http_listen = \"{http}\"\n\
             shutdown_grace_seconds = 60\n{config_tail}"
        );
        std::fs::write(&config_path, config).expect("write config");
        let log = tempfile::NamedTempFile::new().expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_tlserve"))
            .args(["serve", "--config"])
            .arg(&config_path)
            .envs(env.iter().copied())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("log handle"))
            .spawn()
            .expect("start tlserve");
        Self {
            child,
            grpc,
            metrics,
            http,
            log,
            _config_dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Whether the process has ended (a zombie until it is waited for).
    pub fn has_exited(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).map_or(true, |stat| {
            // The state follows the parenthesised command name.
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'))
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .expect("valid url")
            .connect()
            .await
            .unwrap_or_else(|err| panic!("connect to {}: {err}\n{}", self.url(), self.logs()))
    }

    pub async fn embedder(&self) -> EmbedderClient<Channel> {
        EmbedderClient::new(self.channel().await).max_decoding_message_size(usize::MAX)
    }

    pub async fn models(&self) -> ModelsClient<Channel> {
        ModelsClient::new(self.channel().await)
    }

    /// The Health status of `service` ("" for the server), None while unreachable.
    pub async fn health(&self, service: &str) -> Option<ServingStatus> {
        health_at(&self.url(), service).await
    }

    /// Polls Health until `status`, failing with the server's logs after 3 minutes.
    pub async fn wait_until(&self, status: ServingStatus) {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if self.health("").await == Some(status) {
                return;
            }
            assert!(!self.has_exited(), "the server exited:\n{}", self.logs());
            assert!(
                Instant::now() < deadline,
                "server did not reach {status:?}:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The Prometheus text of the metrics port.
    pub fn scrape(&self) -> String {
        let mut stream = TcpStream::connect(self.metrics).expect("connect to metrics port");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.metrics
        )
        .expect("send request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read metrics");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        response
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Health status of `service` at `url`, None while unreachable.
pub async fn health_at(url: &str, service: &str) -> Option<ServingStatus> {
    let channel = Channel::from_shared(url.to_owned())
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .ok()?;
    Some(response.into_inner().status())
}

pub fn text_input(text: &str) -> proto::Input {
    proto::Input {
        kind: Some(Kind::Text(text.to_owned())),
    }
}

pub fn embed_request(texts: &[&str]) -> proto::EmbedRequest {
    proto::EmbedRequest {
        backbone: MINILM.to_owned(),
        inputs: texts.iter().map(|t| text_input(t)).collect(),
        ..Default::default()
    }
}

/// The varied test sentences in tests/data/sentences.txt.
pub fn sentences() -> Vec<String> {
    let text = std::fs::read_to_string(repo_root().join("tests/data/sentences.txt"))
        .expect("tests/data/sentences.txt");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// Embeddings from the independent numpy implementation in tests/reference/.
pub struct Reference {
    pub token_ids: Vec<Vec<u32>>,
    pub embeddings: Vec<Vec<f64>>,
}

pub fn reference(
    sentences: &[String],
    pooling: &str,
    normalize: bool,
    max_len: usize,
) -> Reference {
    let request = serde_json::json!({
        "model_dir": minilm_dir(),
        "sentences": sentences,
        "max_seq_length": max_len,
        "pooling": pooling,
        "normalize": normalize,
    });
    let value = run_reference("minilm_reference.py", &request);
    Reference {
        token_ids: serde_json::from_value(value["token_ids"].clone()).expect("token_ids"),
        embeddings: serde_json::from_value(value["embeddings"].clone()).expect("embeddings"),
    }
}

pub fn cosine(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "vector lengths differ");
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * y).sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    dot / (na * nb)
}

pub fn norm(a: &[f32]) -> f64 {
    a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt()
}

/// Path of a file in the repository, for scripts the tests run.
pub fn repo_file(relative: &str) -> PathBuf {
    let path = repo_root().join(relative);
    assert!(Path::new(&path).exists(), "{} is missing", path.display());
    path
}

/// The real MiniLM loaded in process, as the server would load it.
pub fn load_minilm() -> std::sync::Arc<dyn tlserve::backbone::Backbone> {
    load_minilm_on("auto")
}

/// MiniLM in process on one engine: `native`, `candle` or `auto`.
pub fn load_minilm_on(engine: &str) -> std::sync::Arc<dyn tlserve::backbone::Backbone> {
    load_minilm_with(&format!("engine = \"{engine}\""))
}

/// MiniLM in process with `settings` (lines of its `[[backbones]]` table).
pub fn load_minilm_with(settings: &str) -> std::sync::Arc<dyn tlserve::backbone::Backbone> {
    let config = tlserve::config::Config::from_toml(
        &TestServer::minilm_config("", settings),
        Path::new("."),
        std::iter::empty(),
    )
    .expect("config");
    tlserve::backbone::load(
        &config.backbones[0],
        None,
        tlserve::backbone::image::ImageLimits::from_config(&config.limits),
    )
    .expect("load MiniLM")
}

/// The value of the series `name{labels}` in a Prometheus scrape, 0 when absent.
pub fn metric(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

pub const LITE0: &str = "efficientnet-lite0";

/// The real EfficientNet-Lite0 folder (converted safetensors); panics with the fix
/// when it is missing.
pub fn lite0_dir() -> PathBuf {
    let dir = repo_root().join("models").join(LITE0);
    assert!(
        dir.join("model.safetensors").is_file(),
        "EfficientNet-Lite0 is missing at {}: run scripts/fetch-models.sh",
        dir.display()
    );
    dir
}

/// The `[[backbones]]` entry of the real EfficientNet-Lite0.
pub fn lite0_backbone_toml() -> String {
    format!(
        "\n[[backbones]]\nname = \"{LITE0}\"\narchitecture = \"efficientnet-lite0\"\n\
         source = {{ path = \"{}\" }}\n",
        lite0_dir().display()
    )
}

/// A photo with known ImageNet classes from scripts/fetch-test-images.sh.
pub fn test_image(name: &str) -> PathBuf {
    let path = repo_root().join("models/test-images").join(name);
    assert!(
        path.is_file(),
        "test photo {} is missing: run scripts/fetch-test-images.sh",
        path.display()
    );
    path
}

pub fn image_input(bytes: Vec<u8>) -> proto::Input {
    proto::Input {
        kind: Some(Kind::Image(bytes)),
    }
}

/// The Python of scripts/setup-peft.sh's virtualenv (torch, transformers,
/// peft); panics with the fix when missing.
pub fn peft_python() -> PathBuf {
    let venv = std::env::var_os("TLSERVE_PEFT_VENV")
        .map(PathBuf::from)
        .or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
            Some(cache.join("tlserve-peft-venv"))
        })
        .expect("HOME or TLSERVE_PEFT_VENV");
    let path = venv.join("bin/python");
    assert!(
        path.is_file(),
        "the peft virtualenv is missing at {}: run scripts/setup-peft.sh",
        venv.display()
    );
    path
}

/// Runs a script of tests/reference/ with a JSON request; returns its JSON answer.
pub fn run_reference(script: &str, request: &serde_json::Value) -> serde_json::Value {
    run_reference_with(&python(), script, request)
}

/// [`run_reference`] with the interpreter `python`.
pub fn run_reference_with(
    python: &Path,
    script: &str,
    request: &serde_json::Value,
) -> serde_json::Value {
    let mut child = Command::new(python)
        .arg(repo_root().join("tests/reference").join(script))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the reference script");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(request.to_string().as_bytes())
        .expect("write request");
    let output = child.wait_with_output().expect("reference output");
    assert!(
        output.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("reference JSON")
}

/// Runs the load generator (`tlserve bench --addr <server> ARGS...`), bounded by
/// its arguments, and returns its JSON report.
pub fn load_report(server: &TestServer, args: &[&str]) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_tlserve"))
        .args(["bench", "--addr", &server.url()])
        .args(args)
        .output()
        .expect("run tlserve bench");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON report")
}

/// A valid 8-bit grayscale PNG of `width` x `height` black pixels: a few KB
/// on the wire however large it decodes.
pub fn gray_png(width: u32, height: u32) -> Vec<u8> {
    use image::{
        codecs::png::{CompressionType, FilterType, PngEncoder},
        ImageEncoder,
    };
    let mut bytes = Vec::new();
    let pixels = vec![0u8; width as usize * height as usize];
    PngEncoder::new_with_quality(&mut bytes, CompressionType::Best, FilterType::NoFilter)
        .write_image(&pixels, width, height, image::ExtendedColorType::L8)
        .expect("encode");
    bytes
}

/// Four labelled sentences, two per label: the smallest set a job accepts.
pub fn four_reviews() -> Vec<proto::Example> {
    ["good film", "great acting", "awful plot", "dull scenes"]
        .iter()
        .enumerate()
        .map(|(i, text)| proto::Example {
            input: Some(text_input(text)),
            label: if i < 2 { "pos" } else { "neg" }.into(),
        })
        .collect()
}

/// Every job the server knows, those that have ended included.
pub async fn all_jobs(server: &TestServer) -> Vec<proto::JobInfo> {
    proto::trainer_client::TrainerClient::new(server.channel().await)
        .list_jobs(proto::ListJobsRequest {
            include_finished: true,
        })
        .await
        .expect("ListJobs")
        .into_inner()
        .jobs
}

/// One image file of an image-folder test set.
pub struct LabelledImage {
    pub label: String,
    pub path: PathBuf,
}

/// Writes `per_class` noisy `side` x `side` images of each (label, colour)
/// under `root/<label>/`, cycling through PNG, JPEG and WebP, and returns
/// them in the order written. Noise makes each image distinct and keeps PNG
/// and WebP files large (about 3 bytes a pixel).
pub fn colour_folder(
    root: &Path,
    classes: &[(&str, [u8; 3])],
    per_class: usize,
    side: u32,
    seed: u64,
) -> Vec<LabelledImage> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut noise = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) % 81) as i16 - 40
    };
    let mut written = Vec::new();
    for (label, colour) in classes {
        std::fs::create_dir_all(root.join(label)).expect("class folder");
        for i in 0..per_class {
            let image = image::RgbImage::from_fn(side, side, |_, _| {
                image::Rgb(colour.map(|c| (i16::from(c) + noise()).clamp(0, 255) as u8))
            });
            let extension = ["png", "jpg", "webp"][i % 3];
            let path = root.join(label).join(format!("{i}.{extension}"));
            image.save(&path).expect("write image");
            written.push(LabelledImage {
                label: label.to_string(),
                path,
            });
        }
    }
    written
}

/// `tests/data/NAME`: lines of LABEL<TAB>TEXT.
pub fn read_tsv(name: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_file(&format!("tests/data/{name}"))).expect("tsv");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let (label, sentence) = line.split_once('\t').expect("LABEL<TAB>TEXT");
            (label.to_owned(), sentence.to_owned())
        })
        .collect()
}

/// Labelled text examples of (label, text) rows.
pub fn examples(rows: &[(String, String)]) -> Vec<proto::Example> {
    rows.iter()
        .map(|(label, text)| proto::Example {
            input: Some(text_input(text)),
            label: label.clone(),
        })
        .collect()
}

/// An example program (examples/NAME.rs), built by `cargo test` next to the
/// test binaries.
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    let path = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("examples")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: cargo test builds it",
        path.display()
    );
    path
}

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct";

/// The real SmolLM2-135M-Instruct GGUF file; panics with the fix when missing.
pub fn smollm2_file() -> PathBuf {
    let path = repo_root()
        .join("models")
        .join(SMOLLM2)
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "SmolLM2-135M-Instruct is missing at {}: run scripts/fetch-models.sh \
         (TLSERVE_MODELS=SmolLM2-135M-Instruct)",
        path.display()
    );
    path
}

/// The `[[backbones]]` entry of the real SmolLM2-135M-Instruct, with `extra`
/// settings.
pub fn smollm2_backbone_toml(extra: &str) -> String {
    let file = smollm2_file();
    format!(
        "\n[[backbones]]\nname = \"{SMOLLM2}\"\narchitecture = \"llama\"\n\
         source = {{ path = \"{}\" }}\n{extra}\n",
        file.parent().expect("a folder").display()
    )
}
