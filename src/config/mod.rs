//! The server configuration: a TOML file, typed and validated at start-up, with
//! environment overrides.
//!
//! Any setting can be overridden by an environment variable named after its path
//! in the file, upper-cased, with `__` between the parts and a `TLSERVE__` prefix;
//! array items are addressed by index:
//!
//! ```text
//! TLSERVE__SERVER__LISTEN=127.0.0.1:50051
//! TLSERVE__LOGGING__FORMAT=json
//! TLSERVE__BACKBONES__0__DEVICE=cuda:0
//! ```
//!
//! A value is read as a TOML literal when it parses as one (numbers, booleans,
//! quoted strings, arrays) and as a plain string otherwise.

use std::{
    collections::HashSet,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
};

use serde::{Deserialize, Deserializer, Serialize};

/// Prefix of environment variables that override file settings.
pub const ENV_PREFIX: &str = "TLSERVE__";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {source}")]
    Syntax {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("environment override {var}: {reason}")]
    Env { var: String, reason: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub logging: LoggingConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub heads: HeadsConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    /// The backbones this server loads at start-up and keeps resident.
    #[serde(default)]
    pub backbones: Vec<BackboneConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the gRPC port.
    pub listen: SocketAddr,
    /// Address of the Prometheus `/metrics` HTTP port; unset disables it.
    pub metrics_listen: Option<SocketAddr>,
    /// Address of the HTTP port: the OpenAI-compatible embeddings API
    /// (`POST /v1/embeddings`, `GET /v1/models`), the web console (`/console/`)
    /// and gRPC-Web for it, behind the same tokens and limits as the gRPC port;
    /// unset disables it.
    pub http_listen: Option<SocketAddr>,
    /// Origins (`https://app.example.com`) whose pages may call the gRPC port
    /// with gRPC-Web from a browser (CORS); `*` allows any. Empty: none, and
    /// pages use the console's own origin, the HTTP port. On both ports, a
    /// request other than GET, HEAD and OPTIONS from a page of an origin
    /// neither listed here nor the server's own is refused (403).
    pub cors_allowed_origins: Vec<String>,
    /// Host names (no port) that requests to the gRPC and HTTP ports may be
    /// addressed to, against DNS rebinding; `*` allows any. Unset: with
    /// authentication off, `localhost`, `127.0.0.1`, `::1` and the listen
    /// addresses that name one host; with authentication on, any. Health is
    /// served whatever the name (probes address pods by IP).
    pub allowed_hosts: Option<Vec<String>>,
    /// After a shutdown signal, Health reports NOT_SERVING for this long before the
    /// server stops accepting calls, so load balancers can take it out of rotation.
    pub drain_delay_seconds: f64,
    /// The longest the server waits for in-flight calls after it stops accepting new
    /// ones; calls still running then are cut off.
    pub shutdown_grace_seconds: f64,
    /// Where weights downloaded from a model hub are cached; unset means the hub
    /// client's default (`$HF_HOME/hub`).
    pub model_cache_dir: Option<PathBuf>,
    /// TLS for the gRPC port; unset serves plaintext.
    pub tls: Option<TlsConfig>,
    /// A second, plaintext port serving only Health, for probes that cannot
    /// speak TLS (Kubernetes' gRPC probes) when the main port has it; unset: none.
    pub health_listen: Option<SocketAddr>,
    /// Most concurrent calls (HTTP/2 streams) one client connection may have open.
    pub max_concurrent_streams_per_connection: u32,
    /// Most connections open at once on each port (gRPC, Health, HTTP,
    /// metrics). When a port is full, the connection without a call in
    /// flight that has been idle the longest is closed to admit a newcomer;
    /// when every one has a call in flight, the newcomer is closed.
    pub max_connections: usize,
    /// A connection that sends nothing this long after it was accepted is closed.
    pub connection_first_byte_timeout_seconds: f64,
    /// A connection with no call in flight for this long is closed (every
    /// port); clients reconnect when they next call.
    pub connection_idle_timeout_seconds: f64,
    /// On HTTP/2 connections the server pings a client that has been silent
    /// this long, and closes the connection when the ping is not answered
    /// within 20 seconds (a peer that is gone or stopped reading).
    pub http2_keepalive_interval_seconds: f64,
    /// This process's name among the replicas that share a head store: the
    /// owner named in its training jobs' records. Unset: the `HOSTNAME`
    /// environment variable (a pod's name, which a restarted container
    /// keeps), else the machine's host name. Two processes sharing a store
    /// need different names: a process claims its name in the store at
    /// start, and a start under the name of a live process fails with an
    /// error naming the clash (src/jobs/replica.rs).
    pub replica_id: Option<String>,
}

/// Certificates from files (a Kubernetes Secret mounted as a volume).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the server.
    pub cert_file: PathBuf,
    /// PEM private key of the server.
    pub key_file: PathBuf,
    /// PEM CA certificates; when set, clients must present a certificate signed
    /// by one of them (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
}

/// Bearer tokens with roles (src/server/auth.rs).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Off by default; a server that listens beyond loopback without it logs a
    /// warning at start-up.
    pub enabled: bool,
    /// Lines of `NAME ROLES TOKEN` (ROLES: infer, train or infer,train). Tokens
    /// may also come from the TLSERVE_AUTH_TOKENS variable, same format, `;`
    /// between entries.
    pub tokens_file: Option<PathBuf>,
    /// Health reachable without a token (for probes).
    pub public_health: bool,
    /// Server reflection reachable without a token (for grpcurl).
    pub public_reflection: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            tokens_file: None,
            public_health: true,
            public_reflection: true,
        }
    }
}

impl ServerConfig {
    /// The first-byte timeout as a Duration (validated to be finite and positive).
    pub fn connection_first_byte_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.connection_first_byte_timeout_seconds)
    }

    /// The idle timeout as a Duration (validated to be finite and positive).
    pub fn connection_idle_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.connection_idle_timeout_seconds)
    }

    /// The HTTP/2 keepalive interval as a Duration (validated).
    pub fn http2_keepalive_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.http2_keepalive_interval_seconds)
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 50051)),
            metrics_listen: Some(SocketAddr::from(([0, 0, 0, 0], 9090))),
            http_listen: Some(SocketAddr::from(([0, 0, 0, 0], 8080))),
            cors_allowed_origins: Vec::new(),
            allowed_hosts: None,
            drain_delay_seconds: 0.0,
            shutdown_grace_seconds: 30.0,
            model_cache_dir: None,
            tls: None,
            health_listen: None,
            max_concurrent_streams_per_connection: 100,
            max_connections: 1024,
            connection_first_byte_timeout_seconds: 10.0,
            // Long enough for clients that call every few minutes to keep
            // their connection; idle connections also give way to newcomers
            // when the port is full, whatever this is.
            connection_idle_timeout_seconds: 300.0,
            http2_keepalive_interval_seconds: 60.0,
            replica_id: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines for a terminal.
    #[default]
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    pub format: LogFormat,
    /// A `tracing` filter directive such as `info` or `tlserve=debug,info`.
    /// `RUST_LOG`, when set, takes precedence.
    pub level: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: "info".to_owned(),
        }
    }
}

/// Bounds on what one request may ask for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest accepted request message, in bytes; larger ones get
    /// RESOURCE_EXHAUSTED.
    pub max_message_bytes: usize,
    /// A request message must arrive whole this long after its first byte.
    pub message_timeout_seconds: f64,
    /// Most bytes of unfinished request messages one connection may hold;
    /// unset: twice `max_message_bytes`.
    pub max_buffered_bytes_per_connection: Option<usize>,
    /// Most bytes of unfinished request messages all connections may hold;
    /// unset: 32 times `max_message_bytes`.
    pub max_buffered_request_bytes: Option<usize>,
    /// Largest answer one call may produce, in bytes, estimated before the
    /// work (Predict: inputs x labels returned x their length); beyond it the
    /// call is refused with RESOURCE_EXHAUSTED.
    pub max_response_bytes: usize,
    /// Most bytes of answers not yet sent (the client has not read them) one
    /// connection may hold; unset: twice `max_response_bytes`.
    pub max_unsent_response_bytes_per_connection: Option<usize>,
    /// Most bytes of answers not yet sent all connections may hold; unset:
    /// 8 times `max_response_bytes`.
    pub max_unsent_response_bytes: Option<usize>,
    /// Most inputs in one Embed or Predict request.
    pub max_inputs_per_request: usize,
    /// Longest text input, in characters (Unicode scalar values).
    pub max_text_chars: usize,
    /// Largest encoded image, in bytes.
    pub max_image_bytes: usize,
    /// Most pixels (width times height) of an image, checked from its header
    /// before it is decoded: a decompression bomb is refused, not decoded.
    pub max_image_pixels: u64,
    /// Most times the longer side of an image may be its shorter side, checked
    /// from the header before decoding.
    pub max_image_aspect_ratio: u32,
    /// Most bytes that images being decoded may hold at once, over all
    /// requests; an image beyond it is refused with RESOURCE_EXHAUSTED.
    pub max_decoding_bytes: usize,
    /// Most multiply-adds one Predict may spend applying its head (inputs times
    /// the head's weights); beyond it the request is refused before any work.
    pub max_head_multiply_adds: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 16 * 1024 * 1024,
            message_timeout_seconds: 60.0,
            max_buffered_bytes_per_connection: None,
            max_buffered_request_bytes: None,
            // 512 inputs x 1000 labels of 100 bytes, with room to spare.
            max_response_bytes: 64 * 1024 * 1024,
            max_unsent_response_bytes_per_connection: None,
            max_unsent_response_bytes: None,
            max_inputs_per_request: 512,
            // Far beyond any model's context (MiniLM sees 256 tokens), small
            // enough that tokenizing one never takes long.
            max_text_chars: 100_000,
            max_image_bytes: 10 * 1024 * 1024,
            // 5000 x 5000: any camera photo; 100 MB while decoding.
            max_image_pixels: 25_000_000,
            // Panoramas reach about 10:1; slivers beyond this are refused.
            max_image_aspect_ratio: 32,
            // Five of the largest images at once, many more photos.
            max_decoding_bytes: 512 * 1024 * 1024,
            // 512 inputs through a 4096 x 1000 classifier, with room to spare:
            // about a second of one core.
            max_head_multiply_adds: 4_000_000_000,
        }
    }
}

impl LimitsConfig {
    /// Bytes of unfinished messages one connection may hold: as set, or two of
    /// the largest messages.
    pub fn buffered_bytes_per_connection(&self) -> usize {
        self.max_buffered_bytes_per_connection
            .unwrap_or(self.max_message_bytes.saturating_mul(2))
    }

    /// Bytes of unfinished messages all connections may hold: as set, or 32 of
    /// the largest messages.
    pub fn buffered_request_bytes(&self) -> usize {
        self.max_buffered_request_bytes
            .unwrap_or(self.max_message_bytes.saturating_mul(32))
    }

    /// Bytes of unsent answers one connection may hold: as set, or two of the
    /// largest answers.
    pub fn unsent_response_bytes_per_connection(&self) -> usize {
        self.max_unsent_response_bytes_per_connection
            .unwrap_or(self.max_response_bytes.saturating_mul(2))
    }

    /// Bytes of unsent answers all connections may hold: as set, or 8 of the
    /// largest answers.
    pub fn unsent_response_bytes(&self) -> usize {
        self.max_unsent_response_bytes
            .unwrap_or(self.max_response_bytes.saturating_mul(8))
    }
}

/// Where replicas keep what they share: head versions, uploaded datasets and
/// job records.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub backend: StorageBackend,
    /// For `backend = "s3"`.
    pub s3: S3Config,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// The folder `heads.store_dir`: a local disk for one replica, a
    /// ReadWriteMany volume mounted by every replica.
    #[default]
    Volume,
    /// S3-compatible object storage (AWS S3, MinIO, Ceph RGW, R2, ...).
    S3,
}

/// An S3 bucket. Credentials never come from here: they are read from the
/// environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_SESSION_TOKEN`) or a pod's web identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    pub bucket: String,
    /// Every key goes under this prefix (`tlserve/prod`); empty: the bucket's root.
    pub prefix: String,
    pub region: String,
    /// Another S3-compatible service (`https://minio.example:9000`); unset: AWS.
    pub endpoint: Option<String>,
    /// Allows a plain-HTTP endpoint; for a server on the same host only.
    pub allow_http: bool,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            bucket: String::new(),
            prefix: String::new(),
            region: "us-east-1".into(),
            endpoint: None,
            allow_http: false,
        }
    }
}

/// An S3 backend names its bucket, a prefix of plain segments, and an http(s)
/// endpoint.
fn validate_storage(storage: &StorageConfig) -> Result<(), String> {
    if storage.backend != StorageBackend::S3 {
        return Ok(());
    }
    let s3 = &storage.s3;
    let bucket_ok = (3..=63).contains(&s3.bucket.len())
        && s3
            .bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'));
    if !bucket_ok {
        return Err(format!(
            "storage.s3.bucket `{}` is not a bucket name (3-63 lowercase letters, digits, '-', '.')",
            s3.bucket
        ));
    }
    if !s3.prefix.is_empty() && !s3.prefix.split('/').all(is_valid_name) {
        return Err(format!(
            "storage.s3.prefix `{}` must be `/`-separated names of letters, digits, '-', '_', '.' \
             (no leading or trailing `/`)",
            s3.prefix
        ));
    }
    if let Some(endpoint) = &s3.endpoint {
        if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
            return Err(format!(
                "storage.s3.endpoint `{endpoint}` must start with https:// (or http://)"
            ));
        }
        if endpoint.starts_with("http://") && !s3.allow_http {
            return Err(format!(
                "storage.s3.endpoint `{endpoint}` is plain HTTP: set storage.s3.allow_http = true \
                 if that is meant (credentials and data travel unencrypted)"
            ));
        }
    }
    Ok(())
}

/// The head store and training jobs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeadsConfig {
    /// The shared store's folder when `storage.backend` is `volume`:
    /// heads, uploaded datasets and job records; relative to the config
    /// file. Share it between replicas (a ReadWriteMany volume).
    pub store_dir: PathBuf,
    /// Most head versions in the store.
    pub max_heads: usize,
    /// Most head versions of one namespace (the heads named
    /// `<namespace>.<name>`; names without a namespace are held to
    /// `max_heads` only); unset: half of `max_heads`, rounded up.
    pub max_heads_per_namespace: Option<usize>,
    /// Training jobs running at once; more wait QUEUED.
    pub max_concurrent_jobs: usize,
    /// Jobs waiting beyond the running ones; more are refused.
    pub max_queued_jobs: usize,
    /// Most jobs of one namespace (of the heads they train) queued or running
    /// on a replica; unset: half of `max_concurrent_jobs + max_queued_jobs`,
    /// rounded up.
    pub max_queued_jobs_per_namespace: Option<usize>,
    /// Finished jobs remembered for WatchJob and ListJobs; a replica removes
    /// the oldest records beyond this many that it knows of.
    pub finished_jobs_kept: usize,
    /// Most examples in one job or uploaded dataset.
    pub max_examples_per_job: usize,
    /// Most distinct labels of a head.
    pub max_labels: usize,
    /// Longest label, in characters.
    pub max_label_chars: usize,
    /// Uploads in progress on a replica and datasets waiting for a job in
    /// the store, together.
    pub max_datasets: usize,
    /// Most of those of one namespace: the first namespace of the uploading
    /// token (uploads of tokens without namespaces: `max_datasets` only);
    /// unset: half of `max_datasets`, rounded up.
    pub max_datasets_per_namespace: Option<usize>,
    /// How long an uploaded dataset waits for a job before it is dropped.
    pub dataset_ttl_seconds: u64,
    /// Most bytes (encoded examples) of one upload.
    pub max_upload_bytes: usize,
    /// Most bytes held in memory by a replica's uploads in progress, all
    /// together.
    pub max_dataset_bytes: usize,
    /// An upload that sends nothing for this long is ended.
    pub upload_idle_timeout_seconds: f64,
    /// Fine-tuning: most bytes of the frozen bottom's hidden states kept for
    /// every epoch of one job; beyond it they are computed again per batch
    /// (slower, in constant memory). 0 always recomputes.
    pub fine_tune_cache_bytes: usize,
    /// Fine-tuned heads' adapters kept in memory at once; the least recently
    /// used is dropped and read again from the store when next asked for.
    pub max_resident_adapters: usize,
    /// Bytes of fine-tuned heads' adapters kept in memory at once, counting
    /// for heads with their own top layers the serving engine's copy too; the
    /// least recently used go first. One adapter larger than this still stays
    /// while it is the only one.
    pub max_resident_adapter_bytes: usize,
    /// How long a running job's record stays its replica's after the replica
    /// last renewed it (every sixth of this). Another replica treats a job
    /// whose lease ran out as one whose replica died; until then it leaves
    /// the job alone.
    pub job_lease_seconds: f64,
    /// Most runs of one job: a job whose replica stops (killed, or drained
    /// past its grace period) is run again from the start by another
    /// replica until it has run this many times, then recorded FAILED.
    pub job_attempts: u32,
}

impl HeadsConfig {
    /// Head versions one namespace may hold: as set, or half the store's.
    pub fn heads_per_namespace(&self) -> usize {
        self.max_heads_per_namespace
            .unwrap_or_else(|| half(self.max_heads))
    }

    /// Jobs of one namespace queued or running on a replica: as set, or half
    /// of what the replica takes.
    pub fn queued_jobs_per_namespace(&self) -> usize {
        self.max_queued_jobs_per_namespace.unwrap_or_else(|| {
            half(
                self.max_concurrent_jobs
                    .saturating_add(self.max_queued_jobs),
            )
        })
    }

    /// Datasets one namespace may hold: as set, or half the store's.
    pub fn datasets_per_namespace(&self) -> usize {
        self.max_datasets_per_namespace
            .unwrap_or_else(|| half(self.max_datasets))
    }

    /// The upload idle timeout as a Duration (validated to be finite and positive).
    pub fn upload_idle_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.upload_idle_timeout_seconds)
    }
}

/// Half of `bound`, rounded up: a namespace's share unless configured, so
/// that one namespace alone never fills a bound of two or more.
fn half(bound: usize) -> usize {
    bound.div_ceil(2)
}

impl Default for HeadsConfig {
    fn default() -> Self {
        Self {
            store_dir: PathBuf::from("heads"),
            max_heads: 1000,
            max_heads_per_namespace: None,
            max_concurrent_jobs: 1,
            max_queued_jobs: 16,
            max_queued_jobs_per_namespace: None,
            finished_jobs_kept: 100,
            max_examples_per_job: 100_000,
            max_labels: 1000,
            max_label_chars: 128,
            max_datasets: 8,
            max_datasets_per_namespace: None,
            dataset_ttl_seconds: 3600,
            max_upload_bytes: 256 * 1024 * 1024,
            max_dataset_bytes: 1024 * 1024 * 1024,
            upload_idle_timeout_seconds: 30.0,
            fine_tune_cache_bytes: 2 * 1024 * 1024 * 1024,
            max_resident_adapters: 128,
            max_resident_adapter_bytes: 1 << 30,
            job_lease_seconds: 30.0,
            job_attempts: 3,
        }
    }
}

/// Model families tlserve can load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// BERT-family encoders (BERT, MiniLM, sentence-transformers models).
    Bert,
    /// EfficientNet-Lite0 in the layout of `efficientnet_lite_pytorch`.
    #[serde(rename = "efficientnet-lite0")]
    EfficientNetLite0,
    /// EfficientNet-B0 in the layout of `efficientnet_pytorch`.
    #[serde(rename = "efficientnet-b0")]
    EfficientNetB0,
    /// ResNet-50 in torchvision's (and timm's) layout.
    Resnet50,
    /// VGG16 in torchvision's layout.
    Vgg16,
    /// Llama-architecture decoders (Llama, SmolLM2, ...) in one GGUF file,
    /// tokenizer included.
    Llama,
}

impl Architecture {
    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::Bert => "bert",
            Architecture::EfficientNetLite0 => "efficientnet-lite0",
            Architecture::EfficientNetB0 => "efficientnet-b0",
            Architecture::Resnet50 => "resnet50",
            Architecture::Vgg16 => "vgg16",
            Architecture::Llama => "llama",
        }
    }

    /// The kind of input the architecture takes.
    pub fn modality(self) -> Modality {
        match self {
            Architecture::Bert | Architecture::Llama => Modality::Text,
            Architecture::EfficientNetLite0
            | Architecture::EfficientNetB0
            | Architecture::Resnet50
            | Architecture::Vgg16 => Modality::Image,
        }
    }
}

/// The kind of input a backbone accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Modality {
    /// Texts, tokenized by the backbone.
    Text,
    /// Encoded images (or preprocessed pixel tensors).
    Image,
}

/// Which implementation computes a backbone on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Native on CPU, candle elsewhere.
    #[default]
    Auto,
    /// Our forward passes written for the CPU (src/backbone/bert_native.rs,
    /// src/backbone/vision_native/).
    Native,
    /// Graphs of candle operations (src/backbone/bert_graph.rs and the
    /// architectures' own files): any device; for BERT f32, f16 or bf16.
    Candle,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Auto => "auto",
            Engine::Native => "native",
            Engine::Candle => "candle",
        }
    }
}

/// Number format of a BERT backbone's forward pass: of the dense layers on the
/// native (CPU) engine, of the whole graph on the candle engine (GPUs);
/// docs/PERFORMANCE.md has the speed and accuracy of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Native engine: bf16 where the CPU has AMX-BF16 (as accurate as f32 for
    /// retrieval and heads, and several times faster there:
    /// docs/PERFORMANCE.md), f32 elsewhere. Candle engine: f16 on a GPU, f32
    /// on the CPU.
    #[default]
    Auto,
    /// Single precision throughout.
    F32,
    /// Candle engine only (meant for GPUs): weights and activations in IEEE
    /// half precision; layer norms and softmax accumulate in f32.
    F16,
    /// Native engine: weights and inputs of the dense layers rounded to
    /// bfloat16, sums in f32: fast with AVX-512 BF16, emulated (slower than
    /// f32) without. Candle engine: weights and activations in bfloat16.
    Bf16,
    /// Weights quantized to int8 per output channel at load time, inputs per
    /// row before each product, exact integer sums (AVX-512 VNNI, AVX2).
    Int8,
    /// GGUF backbones: the weights kept in the file's quantized blocks and
    /// multiplied by candle's quantized kernels (the least memory).
    Quantized,
}

impl Precision {
    /// Anything but f32 or auto: settings only text backbones honour.
    pub fn is_reduced(self) -> bool {
        self != Precision::Auto && self != Precision::F32
    }

    /// Whether the native (CPU) engine computes in this format.
    pub fn native_engine_runs(self) -> bool {
        self != Precision::F16
    }

    /// Whether the candle engine computes in this format.
    pub fn candle_engine_runs(self) -> bool {
        self != Precision::Int8
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Auto => "auto",
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
            Precision::Quantized => "quantized",
        }
    }
}

/// Which VGG16 layer gives the features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VggFeatures {
    /// The second dense layer, 4096 values; the ImageNet classifier applies to it.
    #[default]
    Fc7,
    /// The global average of the last convolutional block, 512 values.
    Pool5,
}

/// Resampling used when an image is resized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resample {
    /// Bilinear (a triangle filter), as torchvision.
    Bilinear,
    /// Bicubic (Catmull-Rom), as the EfficientNet evaluations.
    Bicubic,
}

/// Preprocessing of an image backbone; every unset value takes the default of
/// its architecture (what the pretrained weights were evaluated with; the
/// per-architecture values live in `backbone::vision`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// The shorter side is resized to this first.
    pub resize_shorter: Option<u32>,
    /// Then the centered square of this side is the network's input.
    pub crop: Option<u32>,
    pub resample: Option<Resample>,
    /// Per channel (R, G, B), on pixels scaled to [0, 1].
    pub mean: Option<[f32; 3]>,
    pub std: Option<[f32; 3]>,
}

impl ImageConfig {
    /// `resize_shorter` when unset: every architecture tlserve loads is
    /// evaluated on the central 87.5% of the image, 224 of 256.
    pub const DEFAULT_RESIZE_SHORTER: u32 = 256;
    /// `crop` when unset.
    pub const DEFAULT_CROP: u32 = 224;

    /// `resize_shorter`, or its default when unset.
    pub fn resize_shorter_or_default(&self) -> u32 {
        self.resize_shorter.unwrap_or(Self::DEFAULT_RESIZE_SHORTER)
    }

    /// `crop`, or its default when unset.
    pub fn crop_or_default(&self) -> u32 {
        self.crop.unwrap_or(Self::DEFAULT_CROP)
    }
}

/// How the token vectors of a text become one vector. Also stored with each
/// head (head.json), in the same lower-case names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Mean of the token vectors, padding excluded.
    #[default]
    Mean,
    /// The first ([CLS]) token's vector.
    Cls,
    /// The last token's vector: for decoders, the end-of-sequence token
    /// appended to every text, the one token that has seen all of it.
    LastToken,
    /// Mean weighted by position (1, 2, ..., n): under causal attention
    /// later tokens have seen more of the text (SGPT).
    WeightedMean,
}

impl Pooling {
    pub fn as_str(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::LastToken => "last_token",
            Pooling::WeightedMean => "weighted_mean",
        }
    }
}

/// The device a backbone computes on, as the config names it: `cpu`, or
/// `cuda:N` (`cuda` alone is `cuda:0`). Whether the device exists is known only
/// when a backbone loads onto it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU.
    #[default]
    Cpu,
    /// The CUDA GPU of this ordinal (a build with the `cuda` feature).
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        if name == "cpu" {
            return Ok(DeviceSpec::Cpu);
        }
        name.strip_prefix("cuda:")
            .or_else(|| (name == "cuda").then_some("0"))
            .and_then(|n| n.parse::<usize>().ok())
            .map(DeviceSpec::Cuda)
            .ok_or_else(|| format!("unknown device `{name}` (use `cpu` or `cuda:N`)"))
    }
}

impl fmt::Display for DeviceSpec {
    /// The canonical name: `cpu` or `cuda:N`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// A device equals every name that names it: `cuda` and `cuda:0` alike.
impl PartialEq<str> for DeviceSpec {
    fn eq(&self, name: &str) -> bool {
        name.parse::<DeviceSpec>().is_ok_and(|spec| spec == *self)
    }
}

/// As `PartialEq<str>`.
impl PartialEq<&str> for DeviceSpec {
    fn eq(&self, name: &&str) -> bool {
        *self == **name
    }
}

/// Where a backbone's weights come from: exactly one of `path` and `hub`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// A local folder in Hugging Face layout (config.json, model.safetensors,
    /// tokenizer.json). Relative paths are relative to the config file.
    pub path: Option<PathBuf>,
    /// A Hugging Face hub repository id, e.g. `sentence-transformers/all-MiniLM-L6-v2`,
    /// fetched once at start-up into the model cache.
    pub hub: Option<String>,
    /// Hub revision (branch, tag or commit); default `main`.
    pub revision: Option<String>,
    /// The weights file in `path` or the hub repository, for GGUF
    /// (`llama`) backbones, whose repositories hold one file per
    /// quantization. Unset with `path`: the folder's only `.gguf` file.
    pub file: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneConfig {
    /// The name clients use; letters, digits, `-`, `_` and `.`.
    pub name: String,
    pub architecture: Architecture,
    pub source: SourceConfig,
    /// `cpu`, or `cuda:N` in a build with the `cuda` feature.
    #[serde(default)]
    pub device: DeviceSpec,
    /// Most tokens per text input, special tokens included. Unset means the
    /// model's own setting (sentence_bert_config.json), else its position limit.
    #[serde(default)]
    pub max_sequence_length: Option<usize>,
    /// Pooling for requests that leave it unspecified; unset: the
    /// architecture's ([`BackboneConfig::default_pooling`]).
    #[serde(default)]
    pub pooling: Option<Pooling>,
    /// L2 normalization for requests that leave it unset.
    #[serde(default = "default_true")]
    pub normalize: bool,
    /// Whether over-long texts are truncated for requests that leave it unset.
    #[serde(default = "default_true")]
    pub truncate: bool,
    /// Most inputs in one batch.
    #[serde(default = "default_max_batch_size")]
    pub max_batch_size: usize,
    /// Most padded tokens in one batch: inputs times the longest input's tokens.
    #[serde(default = "default_max_batch_tokens")]
    pub max_batch_tokens: usize,
    /// Longest time the oldest waiting input is held back for a batch to fill.
    #[serde(default = "default_max_queue_delay_ms")]
    pub max_queue_delay_ms: f64,
    /// Most inputs waiting for this backbone; a request that does not fit gets
    /// RESOURCE_EXHAUSTED at once.
    #[serde(default = "default_max_queue_items")]
    pub max_queue_items: usize,
    /// Most distinct fine-tuned adapters in one batch: each adds its low-rank
    /// updates to its own rows, so many small groups cost more per input
    /// than few large ones. Inputs of further adapters wait for the next batch.
    #[serde(default = "default_max_adapters_per_batch")]
    pub max_adapters_per_batch: usize,
    /// Image backbones: preprocessing, defaulting to the architecture's.
    #[serde(default)]
    pub image: ImageConfig,
    /// VGG16: which layer gives the features.
    #[serde(default)]
    pub vgg_features: VggFeatures,
    /// Which implementation computes it: `auto` is native on the CPU, candle
    /// on a GPU.
    #[serde(default)]
    pub engine: Engine,
    /// BERT: the number format of the forward pass (f32, f16 and bf16 on the
    /// candle engine, f32, bf16 and int8 on the native one).
    #[serde(default)]
    pub precision: Precision,
    /// Worker threads computing passes side by side (docs/PERFORMANCE.md): 1
    /// gives each pass every core (lowest latency); one per core gives the
    /// most throughput under load.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Threads inside each pass; unset: all cores with one worker, else the
    /// cores divided among the workers.
    #[serde(default)]
    pub threads_per_worker: Option<usize>,
}

impl BackboneConfig {
    /// The engine a backbone runs on: `auto` is native on the CPU and candle
    /// elsewhere.
    pub fn resolved_engine(&self) -> Engine {
        match (self.engine, self.device) {
            (Engine::Auto, DeviceSpec::Cpu) => Engine::Native,
            (Engine::Auto, _) => Engine::Candle,
            (chosen, _) => chosen,
        }
    }

    /// The pooling of requests that leave it unspecified: the configured one,
    /// else the architecture's. Decoders: the position-weighted mean, whose
    /// heads were the best or within a point of it on both sets of
    /// docs/BENCHMARKS.md ("Decoder features"), where the last token won one
    /// set and lost the other by 7 points. Everything else: the mean.
    pub fn default_pooling(&self) -> Pooling {
        self.pooling.unwrap_or(match self.architecture {
            Architecture::Llama => Pooling::WeightedMean,
            Architecture::Bert
            | Architecture::EfficientNetLite0
            | Architecture::EfficientNetB0
            | Architecture::Resnet50
            | Architecture::Vgg16 => Pooling::Mean,
        })
    }

    /// Everything about one backbone that can be checked without the others;
    /// `limits` are the request limits its queue must accommodate.
    fn validate(&self, limits: &LimitsConfig) -> Result<(), String> {
        self.validate_source()?;
        if matches!(self.max_sequence_length, Some(n) if n < 3) {
            return Err("max_sequence_length must be at least 3".into());
        }
        self.validate_modality()?;
        self.validate_batching(limits)
    }

    /// Exactly one of `path` and `hub`, and a revision only for the hub.
    fn validate_source(&self) -> Result<(), String> {
        match (&self.source.path, &self.source.hub) {
            (Some(_), None) | (None, Some(_)) => {}
            _ => return Err("source needs exactly one of `path` and `hub`".into()),
        }
        if self.source.revision.is_some() && self.source.hub.is_none() {
            return Err("source.revision only applies to `hub`".into());
        }
        if self.source.file.is_some() && self.architecture != Architecture::Llama {
            return Err("source.file applies to GGUF (llama) backbones only".into());
        }
        if let Some(file) = &self.source.file {
            if file.is_empty() || file.contains("..") || file.starts_with('/') {
                return Err(format!(
                    "source.file `{file}` must be a file name inside the source"
                ));
            }
        }
        Ok(())
    }

    /// Settings that only one kind of backbone understands must not be given to
    /// the other, where they would silently do nothing.
    fn validate_modality(&self) -> Result<(), String> {
        match self.architecture.modality() {
            Modality::Text => self.validate_text_settings()?,
            Modality::Image => self.validate_image_settings()?,
        }
        if self.architecture != Architecture::Vgg16 && self.vgg_features != VggFeatures::default() {
            return Err("vgg_features applies to the vgg16 architecture only".into());
        }
        Ok(())
    }

    /// A text backbone has no `image` settings.
    fn validate_text_settings(&self) -> Result<(), String> {
        let image = &self.image;
        if image.resize_shorter.is_some()
            || image.crop.is_some()
            || image.resample.is_some()
            || image.mean.is_some()
            || image.std.is_some()
        {
            return Err("`image` settings apply to image backbones only".into());
        }
        if self.precision == Precision::Quantized && self.architecture != Architecture::Llama {
            return Err("precision = \"quantized\" applies to GGUF (llama) backbones only".into());
        }
        let candle = self.resolved_engine() == Engine::Candle;
        if candle && !self.precision.candle_engine_runs() {
            return Err(format!(
                "precision = \"{}\" runs on the native engine (CPU); the candle engine \
                 computes in f32, f16 or bf16",
                self.precision.as_str()
            ));
        }
        if !candle && !self.precision.native_engine_runs() {
            return Err(format!(
                "precision = \"{}\" runs on the candle engine (GPUs); the native engine \
                 computes in f32, bf16 or int8",
                self.precision.as_str()
            ));
        }
        Ok(())
    }

    /// An image backbone has no text settings, and its preprocessing is sound.
    fn validate_image_settings(&self) -> Result<(), String> {
        if self.precision.is_reduced() {
            return Err("`precision` applies to text backbones only".into());
        }
        if self.max_sequence_length.is_some() {
            return Err("max_sequence_length applies to text backbones only".into());
        }
        if let Some(pooling) = self.pooling.filter(|&p| p != Pooling::Mean) {
            return Err(format!(
                "image backbones pool globally (mean); `pooling = \"{}\"` is for text",
                pooling.as_str()
            ));
        }
        let crop = self.image.crop_or_default();
        let resize_shorter = self.image.resize_shorter_or_default();
        if !(16..=1024).contains(&crop) || resize_shorter < crop {
            return Err(format!(
                "image.crop must be in [16, 1024] and image.resize_shorter at least crop \
                 (got crop {crop}, resize_shorter {resize_shorter})"
            ));
        }
        // Unset values take the architecture's defaults, which are sound.
        let bad_std = |std: &[f32; 3]| std.iter().any(|s| !(s.is_finite() && *s > 0.0));
        let bad_mean = |mean: &[f32; 3]| mean.iter().any(|m| !m.is_finite());
        if self.image.std.as_ref().is_some_and(bad_std)
            || self.image.mean.as_ref().is_some_and(bad_mean)
        {
            return Err("image.mean must be finite and image.std positive".into());
        }
        if self.architecture == Architecture::Vgg16
            && self.vgg_features == VggFeatures::Fc7
            && crop != 224
        {
            return Err("VGG16 fc7 features need image.crop = 224".into());
        }
        Ok(())
    }

    /// Worker, batch and queue bounds; the queue must hold a full-size request.
    fn validate_batching(&self, limits: &LimitsConfig) -> Result<(), String> {
        if !(1..=256).contains(&self.workers)
            || matches!(self.threads_per_worker, Some(t) if !(1..=1024).contains(&t))
        {
            return Err("workers must be in [1, 256] and threads_per_worker in [1, 1024]".into());
        }
        if self.max_batch_size == 0
            || self.max_batch_tokens == 0
            || self.max_adapters_per_batch == 0
        {
            return Err(
                "max_batch_size, max_batch_tokens and max_adapters_per_batch must be at least 1"
                    .into(),
            );
        }
        if !(self.max_queue_delay_ms.is_finite()
            && (0.0..=10_000.0).contains(&self.max_queue_delay_ms))
        {
            return Err("max_queue_delay_ms must be in [0, 10000]".into());
        }
        if self.max_queue_items < limits.max_inputs_per_request {
            return Err(format!(
                "max_queue_items ({}) must be at least limits.max_inputs_per_request ({}), \
                 or a full-size request could never be queued",
                self.max_queue_items, limits.max_inputs_per_request
            ));
        }
        Ok(())
    }
}

fn default_true() -> bool {
    true
}

// Batching defaults; docs/BENCHMARKS.md has the measurements behind them.
fn default_workers() -> usize {
    1
}

fn default_max_batch_size() -> usize {
    32
}

fn default_max_batch_tokens() -> usize {
    8192
}

/// 0: a free worker takes whatever is queued at once. A lone request no longer
/// waits for company that is not coming, and under load batches still form
/// while the previous pass runs (docs/BENCHMARKS.md, "One client's latency").
fn default_max_queue_delay_ms() -> f64 {
    0.0
}

fn default_max_queue_items() -> usize {
    2048
}

fn default_max_adapters_per_batch() -> usize {
    8
}

impl Config {
    /// Reads, overrides from the process environment, and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base_dir = path.parent().unwrap_or_else(|| Path::new("."));
        Self::from_toml(&text, base_dir, std::env::vars()).map_err(|err| match err {
            ConfigError::Syntax { source, .. } => ConfigError::Syntax {
                path: path.to_owned(),
                source,
            },
            other => other,
        })
    }

    /// Parses `text`, applies the `TLSERVE__` overrides found in `env`, resolves
    /// relative paths against `base_dir` and validates the result.
    pub fn from_toml(
        text: &str,
        base_dir: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut value: toml::Value =
            toml::from_str(text).map_err(|source| ConfigError::Syntax {
                path: PathBuf::new(),
                source,
            })?;
        let mut overrides: Vec<(String, String)> = env
            .into_iter()
            .filter(|(key, _)| key.starts_with(ENV_PREFIX))
            .collect();
        // Sorted so that the result does not depend on the environment's order.
        overrides.sort();
        for (var, raw) in overrides {
            apply_override(&mut value, &var, &raw)?;
        }
        let mut config: Config = value
            .try_into()
            .map_err(|err: toml::de::Error| ConfigError::Invalid(err.message().to_owned()))?;
        config.resolve_paths(base_dir);
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base_dir: &Path) {
        for backbone in &mut self.backbones {
            if let Some(path) = &backbone.source.path {
                if path.is_relative() {
                    backbone.source.path = Some(base_dir.join(path));
                }
            }
        }
        if self.heads.store_dir.is_relative() {
            self.heads.store_dir = base_dir.join(&self.heads.store_dir);
        }
        let resolve = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = base_dir.join(&*path);
            }
        };
        if let Some(tls) = &mut self.server.tls {
            resolve(&mut tls.cert_file);
            resolve(&mut tls.key_file);
            if let Some(ca) = &mut tls.client_ca_file {
                resolve(ca);
            }
        }
        if let Some(file) = &mut self.auth.tokens_file {
            resolve(file);
        }
        if let Some(dir) = &self.server.model_cache_dir {
            if dir.is_relative() {
                self.server.model_cache_dir = Some(base_dir.join(dir));
            }
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        validate_server(&self.server)
            .and_then(|()| validate_limits(&self.limits))
            .and_then(|()| validate_heads(&self.heads))
            .and_then(|()| validate_storage(&self.storage))
            .and_then(|()| self.validate_backbones())
            .map_err(ConfigError::Invalid)
    }

    /// Each backbone on its own, and names unique among them.
    fn validate_backbones(&self) -> Result<(), String> {
        let mut names = HashSet::new();
        for (i, backbone) in self.backbones.iter().enumerate() {
            let at = format!("backbones[{i}] ({})", backbone.name);
            if !is_valid_name(&backbone.name) {
                return Err(format!(
                    "{at}: name must be 1-64 characters of letters, digits, '-', '_' and '.'"
                ));
            }
            if !names.insert(backbone.name.as_str()) {
                return Err(format!("{at}: the name is used twice"));
            }
            backbone
                .validate(&self.limits)
                .map_err(|reason| format!("{at}: {reason}"))?;
        }
        Ok(())
    }
}

/// Shutdown timings are non-negative numbers; a connection may open a stream.
fn validate_server(server: &ServerConfig) -> Result<(), String> {
    if !(server.shutdown_grace_seconds.is_finite() && server.shutdown_grace_seconds >= 0.0) {
        return Err("server.shutdown_grace_seconds must be a number >= 0".into());
    }
    if !(server.drain_delay_seconds.is_finite() && server.drain_delay_seconds >= 0.0) {
        return Err("server.drain_delay_seconds must be a number >= 0".into());
    }
    if server.max_connections == 0 {
        return Err("server.max_connections must be at least 1".into());
    }
    let first_byte = server.connection_first_byte_timeout_seconds;
    if !(first_byte.is_finite() && first_byte > 0.0 && first_byte <= 3600.0) {
        return Err("server.connection_first_byte_timeout_seconds must be in (0, 3600]".into());
    }
    for (name, value) in [
        (
            "connection_idle_timeout_seconds",
            server.connection_idle_timeout_seconds,
        ),
        (
            "http2_keepalive_interval_seconds",
            server.http2_keepalive_interval_seconds,
        ),
    ] {
        if !(value.is_finite() && value > 0.0 && value <= 86_400.0) {
            return Err(format!("server.{name} must be in (0, 86400]"));
        }
    }
    if server.max_concurrent_streams_per_connection == 0 {
        return Err("server.max_concurrent_streams_per_connection must be at least 1".into());
    }
    if let Some(id) = &server.replica_id {
        if !is_valid_name(id) {
            return Err(format!(
                "server.replica_id `{id}` is not valid: 1-64 letters, digits, '-', '_' or '.'"
            ));
        }
    }
    for host in server.allowed_hosts.iter().flatten() {
        let well_formed = host == "*"
            || host.parse::<std::net::IpAddr>().is_ok()
            || !host.is_empty()
                && host.len() <= 253
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'));
        if !well_formed {
            return Err(format!(
                "server.allowed_hosts: `{host}` is not a host name: write a name or an \
                 address without port or scheme, e.g. tlserve.example.com, or *"
            ));
        }
    }
    for origin in &server.cors_allowed_origins {
        let well_formed = origin == "*"
            || (origin.starts_with("http://") || origin.starts_with("https://"))
                && !origin.ends_with('/')
                && origin.bytes().all(|b| b.is_ascii_graphic());
        if !well_formed {
            return Err(format!(
                "server.cors_allowed_origins: `{origin}` is not an origin: write \
                 scheme://host[:port] with no path, e.g. https://app.example.com, or *"
            ));
        }
    }
    Ok(())
}

/// Every request limit admits at least one (small) request.
fn validate_limits(limits: &LimitsConfig) -> Result<(), String> {
    if limits.max_message_bytes < 1024 {
        return Err("limits.max_message_bytes must be at least 1024".into());
    }
    if limits.buffered_bytes_per_connection() < limits.max_message_bytes
        || limits.buffered_request_bytes() < limits.buffered_bytes_per_connection()
    {
        return Err(
            "limits: max_message_bytes <= max_buffered_bytes_per_connection <= \
                    max_buffered_request_bytes must hold"
                .into(),
        );
    }
    if limits.max_response_bytes < 1024
        || limits.unsent_response_bytes_per_connection() < limits.max_response_bytes
        || limits.unsent_response_bytes() < limits.unsent_response_bytes_per_connection()
    {
        return Err(
            "limits: 1024 <= max_response_bytes <= max_unsent_response_bytes_per_connection \
             <= max_unsent_response_bytes must hold"
                .into(),
        );
    }
    let timeout = limits.message_timeout_seconds;
    if !(timeout.is_finite() && timeout > 0.0 && timeout <= 3600.0) {
        return Err("limits.message_timeout_seconds must be in (0, 3600]".into());
    }
    if limits.max_inputs_per_request == 0 {
        return Err("limits.max_inputs_per_request must be at least 1".into());
    }
    if limits.max_text_chars == 0 {
        return Err("limits.max_text_chars must be at least 1".into());
    }
    if limits.max_image_bytes == 0
        || limits.max_image_pixels == 0
        || limits.max_image_aspect_ratio == 0
    {
        return Err("limits.max_image_bytes, limits.max_image_pixels and \
                    limits.max_image_aspect_ratio must be at least 1"
            .into());
    }
    if (limits.max_decoding_bytes as u64) < limits.max_image_pixels.saturating_mul(4) {
        return Err("limits.max_decoding_bytes must hold at least one image of \
             limits.max_image_pixels (4 bytes a pixel while decoding)"
            .into());
    }
    Ok(())
}

/// The head store and jobs can hold at least one head trained on two examples
/// of two labels.
fn validate_heads(heads: &HeadsConfig) -> Result<(), String> {
    if heads.max_upload_bytes == 0 || heads.max_dataset_bytes < heads.max_upload_bytes {
        return Err(
            "heads.max_upload_bytes must be at least 1 and at most heads.max_dataset_bytes".into(),
        );
    }
    let idle = heads.upload_idle_timeout_seconds;
    if !(idle.is_finite() && idle > 0.0 && idle <= 3600.0) {
        return Err("heads.upload_idle_timeout_seconds must be in (0, 3600]".into());
    }
    let lease = heads.job_lease_seconds;
    if !(lease.is_finite() && (1.0..=3600.0).contains(&lease)) {
        return Err("heads.job_lease_seconds must be in [1, 3600]".into());
    }
    let shares = [
        heads.max_heads_per_namespace,
        heads.max_queued_jobs_per_namespace,
        heads.max_datasets_per_namespace,
    ];
    if shares.contains(&Some(0)) {
        return Err(
            "heads: max_heads_per_namespace, max_queued_jobs_per_namespace and \
             max_datasets_per_namespace must be at least 1 when set"
                .into(),
        );
    }
    if !(1..=100).contains(&heads.job_attempts) {
        return Err("heads.job_attempts must be in [1, 100]".into());
    }
    if heads.max_concurrent_jobs == 0
        || heads.max_resident_adapters == 0
        || heads.max_resident_adapter_bytes == 0
        || heads.max_examples_per_job < 2
        || heads.max_labels < 2
        || heads.max_label_chars == 0
        || heads.max_heads == 0
    {
        return Err(
            "heads: max_concurrent_jobs, max_heads, max_label_chars, max_resident_adapters and \
             max_resident_adapter_bytes must be at least 1, \
             max_examples_per_job and max_labels at least 2"
                .into(),
        );
    }
    Ok(())
}

/// Names of backbones (and later heads): safe as a path component and in metrics.
pub fn is_valid_name(name: &str) -> bool {
    // No leading dot: names become folder names, and dot-folders of the head
    // store are the server's own (temporary writes, the job journal).
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Sets the value at the path that `var` names, creating tables on the way.
fn apply_override(root: &mut toml::Value, var: &str, raw: &str) -> Result<(), ConfigError> {
    let env_err = |reason: String| ConfigError::Env {
        var: var.to_owned(),
        reason,
    };
    let path: Vec<String> = var[ENV_PREFIX.len()..]
        .split("__")
        .map(str::to_ascii_lowercase)
        .collect();
    if path.iter().any(String::is_empty) {
        return Err(env_err("empty path segment".into()));
    }
    let value = parse_env_value(raw);
    let mut node = root;
    for (depth, key) in path.iter().enumerate() {
        let last = depth + 1 == path.len();
        node = match node {
            toml::Value::Table(table) => {
                if last {
                    table.insert(key.clone(), value);
                    return Ok(());
                }
                table
                    .entry(key.clone())
                    .or_insert_with(|| toml::Value::Table(Default::default()))
            }
            toml::Value::Array(items) => {
                let index: usize = key
                    .parse()
                    .map_err(|_| env_err(format!("`{key}` is not an array index")))?;
                let len = items.len();
                let slot = items.get_mut(index).ok_or_else(|| {
                    env_err(format!("index {index} is out of range (array has {len})"))
                })?;
                if last {
                    *slot = value;
                    return Ok(());
                }
                slot
            }
            _ => return Err(env_err(format!("`{key}` is below a plain value"))),
        };
    }
    Ok(())
}

fn parse_env_value(raw: &str) -> toml::Value {
    // Parse as the right-hand side of a TOML assignment to reuse TOML's literals.
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut table| table.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [[backbones]]
        name = "minilm"
        architecture = "bert"
        source = { path = "models/minilm" }
    "#;

    /// Decoder settings: the poolings by name, the GGUF file of a source,
    /// and neither where it cannot apply.
    #[test]
    fn decoder_settings_are_read_and_refused_where_they_do_not_apply() {
        let with = |pairs: &[(&str, &str)]| Config::from_toml(MINIMAL, Path::new("."), env(pairs));
        let architecture = ("TLSERVE__BACKBONES__0__ARCHITECTURE", "llama");
        let file = ("TLSERVE__BACKBONES__0__SOURCE__FILE", "model.Q4_1.gguf");
        let config = with(&[
            architecture,
            file,
            ("TLSERVE__BACKBONES__0__POOLING", "last_token"),
            ("TLSERVE__BACKBONES__0__PRECISION", "quantized"),
        ])
        .unwrap();
        let backbone = &config.backbones[0];
        assert_eq!(backbone.default_pooling(), Pooling::LastToken);
        assert_eq!(backbone.source.file.as_deref(), Some("model.Q4_1.gguf"));
        assert_eq!(backbone.architecture.modality(), Modality::Text);
        let pooling = with(&[("TLSERVE__BACKBONES__0__POOLING", "weighted_mean")]).unwrap();
        assert_eq!(
            pooling.backbones[0].default_pooling(),
            Pooling::WeightedMean
        );
        for (pairs, message) in [
            (&[file][..], "GGUF (llama) backbones only"),
            (
                &[
                    architecture,
                    ("TLSERVE__BACKBONES__0__SOURCE__FILE", "../x.gguf"),
                ],
                "file name",
            ),
            (
                &[
                    ("TLSERVE__BACKBONES__0__ARCHITECTURE", "resnet50"),
                    ("TLSERVE__BACKBONES__0__POOLING", "last_token"),
                ],
                "pool globally",
            ),
        ] {
            let err = with(pairs).unwrap_err();
            assert!(err.to_string().contains(message), "{pairs:?}: {err}");
        }
    }

    /// Each namespace gets half of a store-wide bound unless configured; a
    /// share of 0 would refuse everyone and is refused at start-up.
    #[test]
    fn namespace_shares_default_to_half_a_bound() {
        let with = |pairs: &[(&str, &str)]| Config::from_toml(MINIMAL, Path::new("."), env(pairs));
        let heads = with(&[]).unwrap().heads;
        assert_eq!(
            (
                heads.heads_per_namespace(),
                heads.queued_jobs_per_namespace(),
                heads.datasets_per_namespace()
            ),
            (500, 9, 4)
        );
        let set = with(&[
            ("TLSERVE__HEADS__MAX_DATASETS", "1"),
            ("TLSERVE__HEADS__MAX_HEADS_PER_NAMESPACE", "7"),
        ])
        .unwrap()
        .heads;
        assert_eq!(
            (set.datasets_per_namespace(), set.heads_per_namespace()),
            (1, 7)
        );
        let err = with(&[("TLSERVE__HEADS__MAX_DATASETS_PER_NAMESPACE", "0")]).unwrap_err();
        assert!(err.to_string().contains("at least 1"), "{err}");
    }

    /// The S3 backend comes from the environment like any setting, and a
    /// bucket name, prefix or endpoint that could not work is refused at
    /// start-up.
    #[test]
    fn the_storage_backend_is_set_and_checked() {
        let s3 = |extra: &[(&str, &str)]| {
            let mut vars = vec![("TLSERVE__STORAGE__BACKEND", "s3")];
            if !extra.iter().any(|(var, _)| var.ends_with("BUCKET")) {
                vars.push(("TLSERVE__STORAGE__S3__BUCKET", "team-heads"));
            }
            vars.extend_from_slice(extra);
            Config::from_toml(MINIMAL, Path::new("."), env(&vars))
        };
        let config = s3(&[("TLSERVE__STORAGE__S3__PREFIX", "tlserve/prod")]).unwrap();
        assert_eq!(config.storage.backend, StorageBackend::S3);
        assert_eq!(
            (
                config.storage.s3.bucket.as_str(),
                config.storage.s3.prefix.as_str()
            ),
            ("team-heads", "tlserve/prod")
        );
        let default = Config::from_toml(MINIMAL, Path::new("."), env(&[])).unwrap();
        assert_eq!(default.storage.backend, StorageBackend::Volume);
        for (var, value, named) in [
            (
                "TLSERVE__STORAGE__S3__BUCKET",
                "Team_Heads",
                "storage.s3.bucket",
            ),
            ("TLSERVE__STORAGE__S3__PREFIX", "/lead", "storage.s3.prefix"),
            (
                "TLSERVE__STORAGE__S3__ENDPOINT",
                "minio:9000",
                "storage.s3.endpoint",
            ),
            (
                "TLSERVE__STORAGE__S3__ENDPOINT",
                "http://minio:9000",
                "allow_http",
            ),
        ] {
            let err = s3(&[(var, value)]).unwrap_err().to_string();
            assert!(err.contains(named), "{var}={value}: {err}");
        }
        let plain = s3(&[
            ("TLSERVE__STORAGE__S3__ENDPOINT", "http://127.0.0.1:9000"),
            ("TLSERVE__STORAGE__S3__ALLOW_HTTP", "true"),
        ]);
        assert!(plain.is_ok());
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_and_relative_paths() {
        let config = Config::from_toml(MINIMAL, Path::new("/etc/tlserve"), env(&[])).unwrap();
        assert_eq!(config.server.listen, "0.0.0.0:50051".parse().unwrap());
        assert_eq!(
            config.server.metrics_listen,
            Some("0.0.0.0:9090".parse().unwrap())
        );
        let backbone = &config.backbones[0];
        assert_eq!(
            backbone.source.path.as_deref(),
            Some(Path::new("/etc/tlserve/models/minilm"))
        );
        assert_eq!(backbone.device, "cpu");
        assert!(backbone.normalize && backbone.truncate);
        assert_eq!(backbone.default_pooling(), Pooling::Mean);
    }

    #[test]
    fn environment_overrides_nested_and_indexed_values() {
        let config = Config::from_toml(
            MINIMAL,
            Path::new("."),
            env(&[
                ("TLSERVE__SERVER__LISTEN", "127.0.0.1:7000"),
                ("TLSERVE__LOGGING__FORMAT", "json"),
                ("TLSERVE__LIMITS__MAX_INPUTS_PER_REQUEST", "8"),
                ("TLSERVE__BACKBONES__0__NORMALIZE", "false"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(config.server.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(config.logging.format, LogFormat::Json);
        assert_eq!(config.limits.max_inputs_per_request, 8);
        assert!(!config.backbones[0].normalize);
    }

    #[test]
    fn precision_is_read_and_refused_where_it_does_not_apply() {
        let config = Config::from_toml(
            MINIMAL,
            Path::new("."),
            env(&[("TLSERVE__BACKBONES__0__PRECISION", "int8")]),
        )
        .unwrap();
        assert_eq!(config.backbones[0].precision, Precision::Int8);
        assert_eq!(
            Config::from_toml(MINIMAL, Path::new("."), env(&[]))
                .unwrap()
                .backbones[0]
                .precision,
            Precision::Auto
        );
        // Each engine takes the formats it computes in; `auto` is candle on a GPU.
        let with = |pairs: &[(&str, &str)]| Config::from_toml(MINIMAL, Path::new("."), env(pairs));
        let precision = "TLSERVE__BACKBONES__0__PRECISION";
        let engine = "TLSERVE__BACKBONES__0__ENGINE";
        let device = "TLSERVE__BACKBONES__0__DEVICE";
        for accepted in [
            &[(precision, "bf16"), (engine, "candle")][..],
            &[(precision, "f16"), (engine, "candle")],
            &[(precision, "f16"), (device, "cuda:0")],
            &[(precision, "bf16"), (device, "cuda")],
            &[(precision, "bf16")],
        ] {
            assert!(with(accepted).is_ok(), "{accepted:?}");
        }
        let refused = [
            (
                &[(precision, "int8"), (engine, "candle")][..],
                "runs on the native engine",
            ),
            (
                &[(precision, "int8"), (device, "cuda:0")],
                "runs on the native engine",
            ),
            (&[(precision, "f16")], "runs on the candle engine"),
            (
                &[(precision, "f16"), (engine, "native")],
                "runs on the candle engine",
            ),
            (
                &[
                    (precision, "bf16"),
                    ("TLSERVE__BACKBONES__0__ARCHITECTURE", "resnet50"),
                ],
                "text backbones",
            ),
            (&[(precision, "quantized")], "GGUF (llama) backbones only"),
        ];
        for (pairs, message) in refused {
            let err = with(pairs).unwrap_err();
            assert!(err.to_string().contains(message), "{pairs:?}: {err}");
        }
        let err = Config::from_toml(
            MINIMAL,
            Path::new("."),
            env(&[("TLSERVE__BACKBONES__0__PRECISION", "fp8")]),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("`auto`, `f32`, `f16`, `bf16`, `int8`"),
            "{err}"
        );
    }

    #[test]
    fn bad_overrides_and_values_are_reported() {
        let err = Config::from_toml(
            MINIMAL,
            Path::new("."),
            env(&[("TLSERVE__BACKBONES__3__DEVICE", "cpu")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");

        let err = Config::from_toml(
            MINIMAL,
            Path::new("."),
            env(&[("TLSERVE__SERVER__LISTEN", "not-an-address")]),
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)), "{err}");
    }

    #[test]
    fn validation_rejects_unsafe_names_and_ambiguous_sources() {
        let bad_name = MINIMAL.replace("\"minilm\"", "\"../etc\"");
        assert!(Config::from_toml(&bad_name, Path::new("."), env(&[])).is_err());

        let two_sources = MINIMAL.replace(
            "{ path = \"models/minilm\" }",
            "{ path = \"a\", hub = \"org/model\" }",
        );
        let err = Config::from_toml(&two_sources, Path::new("."), env(&[])).unwrap_err();
        assert!(err.to_string().contains("exactly one"), "{err}");

        let unknown_field = format!("{MINIMAL}\nunknown = 1\n");
        assert!(Config::from_toml(&unknown_field, Path::new("."), env(&[])).is_err());
    }

    #[test]
    fn devices_are_parsed_with_the_config() {
        let config = Config::from_toml(
            MINIMAL,
            Path::new("."),
            env(&[("TLSERVE__BACKBONES__0__DEVICE", "cuda:1")]),
        )
        .unwrap();
        assert_eq!(config.backbones[0].device, DeviceSpec::Cuda(1));
        let gpu = MINIMAL.replace("source =", "device = \"cuda\"\nsource =");
        let config = Config::from_toml(&gpu, Path::new("."), env(&[])).unwrap();
        assert_eq!(config.backbones[0].device, DeviceSpec::Cuda(0));
        assert_eq!(config.backbones[0].device.to_string(), "cuda:0");
        assert_eq!(config.backbones[0].device, "cuda");

        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", "metal"] {
            let err = Config::from_toml(
                MINIMAL,
                Path::new("."),
                env(&[("TLSERVE__BACKBONES__0__DEVICE", bad)]),
            )
            .unwrap_err();
            assert!(matches!(err, ConfigError::Invalid(_)), "{bad}: {err}");
            assert!(
                err.to_string().contains(&format!("unknown device `{bad}`")),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn names() {
        assert!(is_valid_name("all-MiniLM-L6-v2"));
        assert!(is_valid_name("a.b_c"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name(".."));
        assert!(!is_valid_name("a/b"));
        assert!(!is_valid_name(&"x".repeat(65)));
    }
}
