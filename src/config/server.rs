//! The `[server]`, `[auth]` and `[logging]` sections: where the ports listen,
//! how connections are bounded and closed, TLS, bearer tokens and log lines.

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;

use super::is_valid_name;

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

/// Bearer tokens with roles (src/server/middleware/auth.rs).
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

/// Shutdown timings are non-negative numbers; a connection may open a stream.
pub(super) fn validate_server(server: &ServerConfig) -> Result<(), String> {
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
