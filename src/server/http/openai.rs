//! The OpenAI-compatible embeddings API: `POST /v1/embeddings` and
//! `GET /v1/models`, so that the `openai` SDKs and the tools built on them
//! (LangChain, LlamaIndex, vector databases' ingestion) can use a tlserve
//! backbone by its name as the `model`.
//!
//! Below the transport it is the gRPC Embed call: the same use case
//! (core::Embedder), queue, batching, limits and tokens (the `infer` role).

use std::{sync::Arc, time::Duration};

use axum::{
    extract::{Request, State},
    response::{IntoResponse, Response},
};
use base64::Engine;
use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body_util::BodyExt;
use serde::Serialize;

use super::{
    embeddings_request::{parse, Bounds, EmbeddingsRequest, EncodingFormat},
    errors::{json, ApiError},
    ApiState,
};
use crate::{
    batching::Priority,
    config::Modality,
    core,
    server::middleware::{listener::ConnectionInfo, message_limit::Held},
    task::run_blocking,
    Error,
};

#[derive(Serialize)]
#[serde(untagged)]
enum Vector {
    Float(Vec<f32>),
    /// Little-endian f32 bytes, base64: what OpenAI sends for `base64`.
    Base64(String),
}

#[derive(Serialize)]
struct EmbeddingObject {
    object: &'static str,
    index: usize,
    embedding: Vector,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u64,
    total_tokens: u64,
}

#[derive(Serialize)]
struct EmbeddingsResponse {
    object: &'static str,
    data: Vec<EmbeddingObject>,
    model: String,
    usage: Usage,
}

pub async fn embeddings(State(state): State<ApiState>, request: Request) -> Response {
    match embed(&state, request).await {
        Ok(response) => json(&response),
        Err(err) => err.into_response(),
    }
}

/// The token was checked before (the route's access, see super::routes).
async fn embed(state: &ApiState, request: Request) -> Result<EmbeddingsResponse, ApiError> {
    require_json(request.headers())?;
    let (body, held) = read_body(state, request).await?;
    let parsed = parse_body(state, body).await?;
    // Parsed: the body's bytes are gone.
    drop(held);
    let format = parsed.encoding_format;
    let inputs = parsed.inputs;
    if inputs.is_empty() {
        return Err(ApiError::invalid(
            "input",
            "input is empty: send at least one",
        ));
    }
    let answer = state
        .embedder
        .embed(
            core::EmbedRequest {
                backbone: parsed.model,
                inputs,
                pooling: None,
                normalize: None,
                truncate: None,
                dimensions: parsed.dimensions,
                priority: Priority::Online,
                deadline: None,
                head: None,
            },
            // No head is named, so no head's scope applies.
            &core::Scope::All,
        )
        .await?;
    let tokens: u64 = answer.embeddings.iter().map(|e| u64::from(e.tokens)).sum();
    Ok(EmbeddingsResponse {
        object: "list",
        data: answer
            .embeddings
            .into_iter()
            .enumerate()
            .map(|(index, e)| EmbeddingObject {
                object: "embedding",
                index,
                embedding: encode(e.values, format),
            })
            .collect(),
        model: answer.backbone,
        usage: Usage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    })
}

/// Bodies larger than this are parsed on a blocking thread, not on the
/// async workers that serve every other connection.
const INLINE_PARSE_BYTES: usize = 64 * 1024;

/// The request in `body`, its input count bounded while it is parsed.
async fn parse_body(state: &ApiState, body: Bytes) -> Result<EmbeddingsRequest, ApiError> {
    let bounds = Bounds {
        inputs: state.limits.max_inputs_per_request,
        token_ids: state.limits.max_text_chars,
    };
    let parsed = if body.len() <= INLINE_PARSE_BYTES {
        parse(&body, bounds)
    } else {
        run_blocking("parsing an embeddings request", move || {
            parse(&body, bounds)
        })
        .await?
    };
    parsed.map_err(|err| {
        ApiError::invalid(
            "input",
            format!(
                "the body is not an embeddings request ({err}): send JSON with `model` \
                 and `input` (a string, a list of strings, token ids or lists of token ids)"
            ),
        )
    })
}

fn encode(values: Vec<f32>, format: EncodingFormat) -> Vector {
    match format {
        EncodingFormat::Float => Vector::Float(values),
        EncodingFormat::Base64 => {
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            Vector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
    }
}

#[derive(Serialize)]
struct ModelObject {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

#[derive(Serialize)]
struct ModelList {
    object: &'static str,
    data: Vec<ModelObject>,
}

/// The text backbones, the ones `/v1/embeddings` can use, loaded or not.
pub async fn models(State(state): State<ApiState>) -> Response {
    let data = state
        .catalog
        .backbones()
        .into_iter()
        .filter(|b| b.config.architecture.modality() == Modality::Text)
        .map(|b| ModelObject {
            id: b.config.name,
            object: "model",
            created: state.started_unix,
            owned_by: "tlserve",
        })
        .collect();
    json(&ModelList {
        object: "list",
        data,
    })
}

/// `Content-Type: application/json`, as OpenAI's clients send: a page of
/// another site can make a browser POST `text/plain` (or a form) without
/// asking CORS first, but not JSON.
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    if essence.eq_ignore_ascii_case("application/json") {
        return Ok(());
    }
    Err(ApiError::new(
        http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "invalid_request_error",
        "send the request as JSON with `Content-Type: application/json`",
    ))
}

/// The request body, within `limits.max_message_bytes` and
/// `limits.message_timeout_seconds`, and its share of the budgets of
/// unfinished request bytes (per connection and in all, as gRPC messages):
/// the share lasts until it is dropped, after the body is parsed.
async fn read_body(state: &ApiState, request: Request) -> Result<(Bytes, Held), ApiError> {
    let connection = ConnectionInfo::of(request.extensions()).map(|c| Arc::clone(&c.buffered));
    let mut held = state.body_limits.hold(connection);
    let timeout = Duration::from_secs_f64(state.limits.message_timeout_seconds);
    let read = collect_counted(
        request.into_body(),
        state.limits.max_message_bytes,
        &mut held,
    );
    match tokio::time::timeout(timeout, read).await {
        Err(_elapsed) => Err(Error::TimedOut(format!(
            "the request body did not arrive within {timeout:?} (limits.message_timeout_seconds)"
        ))
        .into()),
        Ok(Err(err)) => Err(err),
        Ok(Ok(body)) => Ok((body, held)),
    }
}

/// Reads `body` whole, at most `max` bytes, counting what it holds in `held`.
async fn collect_counted(
    mut body: axum::body::Body,
    max: usize,
    held: &mut Held,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            http::StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!(
                "the request body is larger than {max} bytes (limits.max_message_bytes), \
                 or was cut off: split the input"
            ),
        )
    };
    let mut collected = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_broken| too_large())?.into_data() else {
            continue;
        };
        let total = collected.len().saturating_add(data.len());
        if total > max {
            return Err(too_large());
        }
        // Over a budget: the server is busy with other bodies, not this one
        // too large; the client may retry.
        held.set(total).map_err(|err| {
            ApiError::new(
                http::StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                err.to_string(),
            )
        })?;
        collected.extend_from_slice(&data);
    }
    Ok(collected.freeze())
}
