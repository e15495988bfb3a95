//! A tower layer around every gRPC call: assigns a request id, enforces the message
//! size limit and the budget of unsent answers (response_budget), logs the call's
//! outcome and records its metrics.
//!
//! It also answers DEADLINE_EXCEEDED when the client's deadline passes: an already
//! expired deadline before any work, a later one just before tonic's own timer
//! would answer CANCELLED.
//!
//! The final gRPC status is in the response headers (errors returned before any
//! message) or in the trailers at the end of the body; the layer watches both, and
//! counts a call whose body is dropped before its trailers as CANCELLED.

use std::{
    collections::HashSet,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Body as HttpBody, Frame, SizeHint};
use prost::Message;
use tonic::{body::Body, Code};
use tower::{Layer, Service};
use tracing::Instrument;

use super::{
    deadline::{self, Deadline},
    response_budget::{CallAnswers, CallBudget, ResponseLimits},
    status::{code_name, DETAIL_HEADER},
};
use crate::{
    core::Scope,
    metrics,
    server::middleware::{
        auth::Authenticator,
        listener::ConnectionInfo,
        message_limit::{Arrival, BodyLimits, CallShape, ClientFault, LimitedBody},
        request_id::{request_id, REQUEST_ID_HEADER},
    },
    telemetry, Error,
};

/// How much earlier than the deadline the layer answers, so that its
/// DEADLINE_EXCEEDED reaches the client before tonic's timer (same deadline,
/// started a moment earlier) cuts the call off as CANCELLED.
const DEADLINE_MARGIN: std::time::Duration = std::time::Duration::from_millis(2);

/// The heads and jobs the current call may act on, from its token.
pub fn scope_of<T>(request: &tonic::Request<T>) -> Scope {
    request
        .extensions()
        .get::<Scope>()
        .cloned()
        .unwrap_or_default()
}

/// The id of the current call, in the request extensions for handlers.
#[derive(Debug, Clone)]
pub struct RequestId(pub Arc<str>);

#[derive(Clone)]
pub struct RequestLayer {
    body_limits: Arc<BodyLimits>,
    response_limits: Arc<ResponseLimits>,
    known_methods: Arc<HashSet<String>>,
    /// The methods whose requests are client streams.
    streaming_requests: Arc<HashSet<String>>,
    /// None: authentication off.
    auth: Option<Arc<Authenticator>>,
}

impl RequestLayer {
    pub fn new(
        body_limits: Arc<BodyLimits>,
        response_limits: Arc<ResponseLimits>,
        auth: Option<Arc<Authenticator>>,
    ) -> Self {
        let (known, streaming) = known_methods();
        Self {
            body_limits,
            response_limits,
            known_methods: Arc::new(register_methods(known)),
            streaming_requests: Arc::new(streaming),
            auth,
        }
    }
}

impl<S> Layer<S> for RequestLayer {
    type Service = RequestService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RequestService<S> {
    inner: S,
    layer: RequestLayer,
}

type BoxFuture<T, E> = Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

impl<S, ResBody> Service<http::Request<Body>> for RequestService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The ready service is the one to call; leave a fresh clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);

        let (service, method) = self.layer.labels(request.uri().path());
        let request_id = request_id(request.headers());
        let span = tracing::info_span!("rpc", request_id = %request_id, service, method,
            token = tracing::field::Empty);
        let fault = Arc::new(ClientFault::default());
        let mut call = CallRecord {
            service,
            method,
            started: Instant::now(),
            finished: false,
            span: span.clone(),
            fault: Arc::clone(&fault),
        };

        let connection = ConnectionInfo::of(request.extensions());
        let answers = self
            .layer
            .response_limits
            .call(connection.map(|c| Arc::clone(&c.unsent)));
        let buffered = connection.map(|c| Arc::clone(&c.buffered));
        // Authentication first: a refused call does no other work.
        let admitted = self
            .layer
            .admit(&request, &span)
            .and_then(|scope| answers.admit().map(|()| scope));
        let scope = match admitted {
            Ok(scope) => scope,
            Err(status) => {
                let response = refused(&mut call, status, &request_id);
                return Box::pin(async move { Ok(response) });
            }
        };

        let deadline = deadline::from_headers(request.headers());
        let shape = self.layer.shape_of(&request, fault);
        let limits = Arc::clone(&self.layer.body_limits);
        let path = request.uri().path().to_owned();
        let mut request =
            request.map(|body| Body::new(LimitedBody::new(body, &path, limits, buffered, shape)));
        let extensions = request.extensions_mut();
        extensions.insert(RequestId(request_id.clone()));
        extensions.insert(scope);
        extensions.insert(CallAnswers(Arc::clone(&answers)));
        if let Some(at) = deadline {
            extensions.insert(Deadline(at));
        }

        let started = call.started;
        Box::pin(
            async move {
                let response = match deadline {
                    Some(at) if at <= Instant::now() => deadline_exceeded(started),
                    Some(at) => {
                        let answer_by = at.checked_sub(DEADLINE_MARGIN).unwrap_or(at);
                        let call = inner.call(request);
                        match tokio::time::timeout_at(answer_by.into(), call).await {
                            Ok(response) => response?.map(Body::new),
                            Err(_elapsed) => deadline_exceeded(started),
                        }
                    }
                    None => inner.call(request).await?.map(Body::new),
                };
                Ok(observed(response, &request_id, call, answers))
            }
            .instrument(span),
        )
    }
}

/// The call's answer, with its request id, logged when its status is in the
/// headers, and observed to its end (the call's record, the answer budget).
fn observed(
    response: http::Response<Body>,
    request_id: &str,
    mut call: CallRecord,
    answers: Arc<CallBudget>,
) -> http::Response<Body> {
    let (mut parts, body) = response.into_parts();
    if let Ok(value) = HeaderValue::from_str(request_id) {
        parts.headers.insert(REQUEST_ID_HEADER, value);
    }
    if let Some(code) = grpc_status(&parts.headers) {
        let message = logged_message(&mut parts.headers);
        call.finish(code, message.as_deref());
    }
    let body = ObservedBody {
        inner: body,
        call,
        answers,
    };
    http::Response::from_parts(parts, Body::new(body))
}

/// The answer to a call refused before it began, logged with its code in the
/// call's span.
fn refused(call: &mut CallRecord, status: tonic::Status, request_id: &str) -> http::Response<Body> {
    call.finish(status.code(), Some(status.message()));
    let mut response = status.into_http::<Body>();
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

impl RequestLayer {
    /// How the call's request messages arrive and may be framed, for its
    /// body's limits; `fault` learns whether the body failed on the client's
    /// side.
    fn shape_of<B>(&self, request: &http::Request<B>, fault: Arc<ClientFault>) -> CallShape {
        CallShape {
            arrival: match self.streaming_requests.contains(request.uri().path()) {
                true => Arrival::Stream,
                false => Arrival::Single,
            },
            encoded: request.headers().contains_key("grpc-encoding"),
            fault,
        }
    }

    /// The heads and jobs the call may act on, or why it may not go on at
    /// all; records the token's name in the span.
    fn admit<B>(
        &self,
        request: &http::Request<B>,
        span: &tracing::Span,
    ) -> Result<Scope, tonic::Status> {
        let Some(auth) = self.auth.as_ref() else {
            return Ok(Scope::All);
        };
        match auth
            .check(request.uri().path(), request.headers())
            .into_result()?
        {
            None => Ok(Scope::All),
            Some(token) => {
                span.record("token", token.as_str());
                Ok(auth.scope(&token))
            }
        }
    }

    /// Metric labels for a request path. Paths are client-chosen, so only methods
    /// the server really has become labels; anything else is "unknown", which keeps
    /// the label set bounded.
    fn labels(&self, path: &str) -> (&'static str, &'static str) {
        match path.strip_prefix('/').and_then(|p| p.split_once('/')) {
            Some((service, method)) if self.known_methods.contains(path) => {
                (intern(service), intern(method))
            }
            _ => ("unknown", "unknown"),
        }
    }
}

/// Turns one of the finitely many known service/method names into a `'static`
/// label without allocating per call.
fn intern(name: &str) -> &'static str {
    use std::sync::{Mutex, OnceLock};
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut names = crate::sync::lock(NAMES.get_or_init(Default::default));
    if let Some(existing) = names.get(name) {
        return existing;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.insert(leaked);
    leaked
}

/// Registers the metric series of our own methods (not health's and
/// reflection's) at zero, for every status code; returns `paths`.
fn register_methods(paths: HashSet<String>) -> HashSet<String> {
    let codes: Vec<&'static str> = (0..=16)
        .map(|n| super::status::code_name(Code::from_i32(n)))
        .collect();
    for path in &paths {
        if let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) {
            if !service.starts_with("grpc.") {
                metrics::register_grpc_method(service, method, &codes);
            }
        }
    }
    paths
}

/// Every `/package.Service/Method` path served (ours, health and
/// reflection), and those of them whose requests are client streams.
fn known_methods() -> (HashSet<String>, HashSet<String>) {
    let sets = [
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let (mut paths, mut streaming) = (HashSet::new(), HashSet::new());
    for encoded in sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(encoded) else {
            continue;
        };
        for file in set.file {
            let package = file.package();
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/{package}.{}/{}", service.name(), method.name());
                    if method.client_streaming() {
                        streaming.insert(path.clone());
                    }
                    paths.insert(path);
                }
            }
        }
    }
    (paths, streaming)
}

fn deadline_exceeded(started: Instant) -> http::Response<Body> {
    tonic::Status::from(Error::DeadlineExceeded(started.elapsed())).into_http()
}

fn grpc_status(headers: &HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    value.parse::<i32>().ok().map(Code::from_i32)
}

/// What the log says of a call's outcome: a server fault's details (taken
/// out of the response, see status::DETAIL_HEADER), else the status message.
fn logged_message(headers: &mut HeaderMap) -> Option<String> {
    match headers.remove(DETAIL_HEADER) {
        Some(detail) => Some(percent_decoded(detail.as_bytes())),
        None => grpc_message(headers),
    }
}

/// The status message, percent-decoded as the gRPC spec encodes it.
fn grpc_message(headers: &HeaderMap) -> Option<String> {
    Some(percent_decoded(headers.get("grpc-message")?.as_bytes()))
}

fn percent_decoded(raw: &[u8]) -> String {
    let mut bytes = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match raw[i..] {
            [b'%', high, low, ..] if hex(high).is_some() && hex(low).is_some() => {
                let value = hex(high).unwrap_or(0) * 16 + hex(low).unwrap_or(0);
                bytes.push(value as u8);
                i += 3;
            }
            _ => {
                bytes.push(raw[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The facts of one call, recorded once when its status is known.
struct CallRecord {
    service: &'static str,
    method: &'static str,
    started: Instant,
    finished: bool,
    span: tracing::Span,
    /// Set by the request body when the client's bytes are what failed.
    fault: Arc<ClientFault>,
}

/// How tonic's protobuf decoder words a message that is no protobuf
/// (tonic-prost's `from_decode_error`, prost's `DecodeError`).
const PROTOBUF_DECODE_FAILURE: &str = "failed to decode Protobuf message";

impl CallRecord {
    /// Whether the call failed on what its client sent: a body the request
    /// layer saw fail, or bytes that are no protobuf message.
    fn client_fault(&self, code: Code, message: Option<&str>) -> bool {
        code != Code::Ok
            && (self.fault.is_set()
                || code == Code::Internal
                    && message.is_some_and(|m| m.starts_with(PROTOBUF_DECODE_FAILURE)))
    }

    /// Records the call's metrics and logs it once, with its request id (the
    /// span), code and, for a failure, the message: escaped and cut, since
    /// it may echo what the client sent.
    fn finish(&mut self, code: Code, message: Option<&str>) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let elapsed = self.started.elapsed();
        let name = code_name(code);
        metrics::record_grpc(self.service, self.method, name, elapsed);
        let client_fault = self.client_fault(code, message);
        if client_fault {
            metrics::record_grpc_request_read_error(self.service, self.method, name);
        }
        let _entered = self.span.enter();
        let millis = (elapsed.as_secs_f64() * 1e6).round() / 1e3;
        let error = message
            .filter(|_| code != Code::Ok)
            .map(telemetry::printable);
        // Probes and reflection are frequent and uninteresting: keep them at debug.
        // The span carries the request id, service and method.
        match (code, error) {
            // The client's mistake, whatever its code: no page for operators.
            (_, error) if client_fault => tracing::info!(
                code = name,
                millis,
                error = error.as_deref(),
                "rpc failed: the request could not be read"
            ),
            (Code::Internal | Code::Unknown | Code::DataLoss, error) => {
                tracing::error!(code = name, millis, error = error.as_deref(), "rpc failed")
            }
            _ if self.service.starts_with("grpc.") => {
                tracing::debug!(code = name, millis, "rpc finished")
            }
            (_, Some(error)) => tracing::info!(code = name, millis, error, "rpc finished"),
            (_, None) => tracing::info!(code = name, millis, "rpc finished"),
        }
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        // No status reached the client: it went away or the stream broke.
        self.finish(Code::Cancelled, None);
    }
}

pin_project_lite::pin_project! {
    /// A response body that records the call when its trailers pass by, and
    /// counts its bytes as unsent until they are written.
    struct ObservedBody<B> {
        #[pin]
        inner: B,
        call: CallRecord,
        answers: Arc<CallBudget>,
    }
}

impl<B> HttpBody for ObservedBody<B>
where
    B: HttpBody<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let answers = &*this.answers;
        let mut polled = this
            .inner
            .poll_frame(cx)
            .map_ok(|frame| frame.map_data(|data| answers.hold(data)));
        match &mut polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_mut() {
                    if let Some(code) = grpc_status(trailers) {
                        let message = logged_message(trailers);
                        this.call.finish(code, message.as_deref());
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => this.call.finish(Code::Internal, None),
            Poll::Ready(None) => this.call.finish(Code::Unknown, None),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded_to_served_methods() {
        let layer = RequestLayer::new(
            Arc::new(BodyLimits::new(
                1024,
                std::time::Duration::from_secs(1),
                2048,
                4096,
            )),
            Arc::new(ResponseLimits::new(2048, 4096)),
            None,
        );
        assert_eq!(
            layer.labels("/tlserve.v1.Embedder/Embed"),
            ("tlserve.v1.Embedder", "Embed")
        );
        assert_eq!(
            layer.labels("/grpc.health.v1.Health/Check"),
            ("grpc.health.v1.Health", "Check")
        );
        assert_eq!(
            layer.labels("/tlserve.v1.Embedder/Nope"),
            ("unknown", "unknown")
        );
        assert_eq!(layer.labels("/garbage"), ("unknown", "unknown"));
    }

    #[test]
    fn status_messages_are_percent_decoded() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "grpc-message",
            HeaderValue::from_static("input 0: caf%C3%A9%0Aforged %ZZ"),
        );
        assert_eq!(
            grpc_message(&headers).as_deref(),
            Some("input 0: café\nforged %ZZ")
        );
        assert_eq!(grpc_message(&HeaderMap::new()), None);
    }
}
