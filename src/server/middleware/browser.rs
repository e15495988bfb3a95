//! What a web page may make a browser send: checked on the gRPC port and the
//! HTTP port before anything else.
//!
//! A page of another site can make its visitor's browser send requests to a
//! server the visitor reaches (a loopback server on a developer's machine, a
//! server on an internal network). Two checks refuse what such a page can do:
//!
//! - **Host**: under DNS rebinding the page's own name resolves to the server,
//!   so its requests carry a foreign `Host` (the page's name) and count as the
//!   page's own origin, which no CORS rule stops. The name a request is
//!   addressed to must be one of `server.allowed_hosts`; by default, with
//!   authentication off, the loopback names and the listen addresses' own; with
//!   authentication on, any (tokens guard the server, and probes and clients
//!   inside a cluster use names the server cannot know). Health is exempt:
//!   probes address pods by IP, and it discloses nothing.
//! - **Origin**: a cross-site form or `fetch` can send a "simple" request (a
//!   POST of `text/plain`) without asking CORS first. A state-changing request
//!   (any method but GET, HEAD and OPTIONS) that carries an `Origin` other than
//!   the server's own and not listed in `server.cors_allowed_origins` is
//!   refused.
//!
//! Refusals are 403 (PERMISSION_DENIED for gRPC and gRPC-Web calls).

use std::{
    collections::HashSet,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use tower::{Layer, Service};

use crate::config::ServerConfig;

/// Paths exempt from the Host check: what probes call.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// The names a request may be addressed to; None: any.
#[derive(Debug, Clone)]
pub struct BrowserPolicy {
    hosts: Option<HashSet<String>>,
    /// Origins listed for CORS; `*` allows any.
    origins: HashSet<String>,
}

impl BrowserPolicy {
    /// From `server.allowed_hosts` and `server.cors_allowed_origins`; the
    /// default host list depends on whether tokens guard the server.
    pub fn from_config(server: &ServerConfig, auth_enabled: bool) -> Self {
        let hosts = match &server.allowed_hosts {
            Some(list) if list.iter().any(|h| h == "*") => None,
            Some(list) => Some(list.iter().map(|h| normalized(h)).collect()),
            None if auth_enabled => None,
            None => Some(default_hosts(server)),
        };
        Self {
            hosts,
            origins: server.cors_allowed_origins.iter().cloned().collect(),
        }
    }

    /// The accepted host names, sorted, for the start-up log; None: any.
    pub fn hosts(&self) -> Option<Vec<&str>> {
        let mut hosts: Vec<&str> = self.hosts.as_ref()?.iter().map(String::as_str).collect();
        hosts.sort_unstable();
        Some(hosts)
    }

    /// Why the request must be refused, if it must.
    fn refusal<B>(&self, request: &Request<B>) -> Option<String> {
        let host = request_host(request);
        if let (Some(allowed), Some(host)) = (&self.hosts, &host) {
            let exempt = request.uri().path().starts_with(HEALTH_PREFIX);
            if !exempt && !allowed.contains(&normalized(host)) {
                return Some(format!(
                    "requests addressed to host {:?} are not served here: add it to \
                     server.allowed_hosts",
                    printable(host)
                ));
            }
        }
        let state_changing = !matches!(
            *request.method(),
            Method::GET | Method::HEAD | Method::OPTIONS
        );
        let origin = request.headers().get(header::ORIGIN)?;
        let origin = origin.to_str().unwrap_or("null");
        let same_origin = host.is_some_and(|host| {
            origin
                .split_once("://")
                .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host))
        });
        let listed = self.origins.contains("*") || self.origins.contains(origin);
        (state_changing && !same_origin && !listed).then(|| {
            format!(
                "a page of origin {:?} may not call this server: list the origin in \
                 server.cors_allowed_origins",
                printable(origin)
            )
        })
    }
}

/// The loopback names and the listen addresses' own, when they name one host.
fn default_hosts(server: &ServerConfig) -> HashSet<String> {
    let mut hosts: HashSet<String> = ["localhost", "127.0.0.1", "::1"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    let listens = [
        Some(server.listen),
        server.http_listen,
        server.metrics_listen,
        server.health_listen,
    ];
    for addr in listens.into_iter().flatten() {
        if !addr.ip().is_unspecified() {
            hosts.insert(addr.ip().to_string());
        }
    }
    hosts
}

/// The host a request is addressed to, port included: the HTTP/2
/// `:authority`, else the `Host` header.
fn request_host<B>(request: &Request<B>) -> Option<&str> {
    match request.uri().authority() {
        Some(authority) => Some(authority.as_str()),
        None => request.headers().get(header::HOST)?.to_str().ok(),
    }
}

/// A host name without its port and IPv6 brackets, in lower case.
fn normalized(host: &str) -> String {
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        // A bare IPv6 address has colons but no port.
        None if host.parse::<std::net::Ipv6Addr>().is_ok() => host,
        None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// A client's string for a log line or a message: bounded and escaped.
fn printable(text: &str) -> String {
    text.chars()
        .take(200)
        .flat_map(char::escape_debug)
        .collect()
}

/// The refusal: PERMISSION_DENIED for gRPC(-Web) calls, else 403 with a JSON
/// error in the shape of the OpenAI API's.
fn refused(headers: &HeaderMap, message: &str) -> Response<Full<Bytes>> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.starts_with("application/grpc"));
    if let Some(content_type) = content_type {
        let mut response = tonic::Status::permission_denied(message).into_http::<Full<Bytes>>();
        if let Ok(value) = HeaderValue::from_str(content_type) {
            response.headers_mut().insert(header::CONTENT_TYPE, value);
        }
        return response;
    }
    let body = serde_json::json!({"error": {
        "message": message, "type": "permission_error", "param": null, "code": null}});
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = StatusCode::FORBIDDEN;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Applies a [`BrowserPolicy`] to every request of a port.
#[derive(Debug, Clone)]
pub struct BrowserGuard(Arc<BrowserPolicy>);

impl BrowserGuard {
    pub fn new(policy: Arc<BrowserPolicy>) -> Self {
        Self(policy)
    }
}

impl<S> Layer<S> for BrowserGuard {
    type Service = Guarded<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Guarded {
            inner,
            policy: Arc::clone(&self.0),
        }
    }
}

/// A service behind a [`BrowserGuard`].
#[derive(Debug, Clone)]
pub struct Guarded<S> {
    inner: S,
    policy: Arc<BrowserPolicy>,
}

type GuardedFuture<T, E> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Guarded<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: 'static,
    ResBody: Send + 'static,
{
    type Response = Response<Either<ResBody, Full<Bytes>>>;
    type Error = S::Error;
    type Future = GuardedFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        if let Some(message) = self.policy.refusal(&request) {
            tracing::info!(method = %request.method(), path = %printable(request.uri().path()),
                message, "request refused: browser checks");
            let response = refused(request.headers(), &message).map(Either::Right);
            return Box::pin(async move { Ok(response) });
        }
        let response = self.inner.call(request);
        Box::pin(async move { Ok(response.await?.map(Either::Left)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> ServerConfig {
        ServerConfig {
            cors_allowed_origins: vec!["https://app.example.com".into()],
            ..ServerConfig::default()
        }
    }

    fn request(method: Method, host: &str, origin: Option<&str>) -> Request<()> {
        let mut builder = Request::builder()
            .method(method)
            .uri("/tlserve.v1.Models/DeleteHead")
            .header(header::HOST, host);
        if let Some(origin) = origin {
            builder = builder.header(header::ORIGIN, origin);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn hosts_are_loopback_names_by_default_without_tokens_and_any_with_them() {
        let open = BrowserPolicy::from_config(&server(), false);
        for host in [
            "127.0.0.1:8080",
            "localhost:1",
            "LOCALHOST",
            "[::1]:50051",
            "::1",
        ] {
            assert_eq!(
                open.refusal(&request(Method::GET, host, None)),
                None,
                "{host}"
            );
        }
        let foreign = request(Method::GET, "rebound.example.com:8080", None);
        assert!(open.refusal(&foreign).is_some());
        let health = Request::get("/grpc.health.v1.Health/Check")
            .header(header::HOST, "10.0.0.7:50051")
            .body(())
            .unwrap();
        assert_eq!(open.refusal(&health), None, "probes use the pod's IP");
        let guarded = BrowserPolicy::from_config(&server(), true);
        assert_eq!(guarded.refusal(&foreign), None);
        let listed = ServerConfig {
            allowed_hosts: Some(vec!["tlserve.internal".into()]),
            ..server()
        };
        let listed = BrowserPolicy::from_config(&listed, true);
        assert!(listed.refusal(&foreign).is_some());
        let named = request(Method::GET, "TLServe.internal.:443", None);
        assert_eq!(listed.refusal(&named), None);
    }

    #[test]
    fn state_changing_calls_from_other_origins_need_cors_approval() {
        let policy = BrowserPolicy::from_config(&server(), false);
        let host = "127.0.0.1:8080";
        let cases = [
            (Method::POST, Some("http://127.0.0.1:8080"), true),
            (Method::POST, None, true),
            (Method::POST, Some("https://app.example.com"), true),
            (Method::POST, Some("https://evil.example"), false),
            (Method::POST, Some("null"), false),
            (Method::DELETE, Some("http://127.0.0.1:9999"), false),
            (Method::GET, Some("https://evil.example"), true),
            (Method::OPTIONS, Some("https://evil.example"), true),
        ];
        for (method, origin, allowed) in cases {
            let refusal = policy.refusal(&request(method.clone(), host, origin));
            assert_eq!(
                refusal.is_none(),
                allowed,
                "{method} {origin:?}: {refusal:?}"
            );
        }
    }
}
