//! The OpenAI-compatible embeddings API: `POST /v1/embeddings` and
//! `GET /v1/models`, so that the `openai` SDKs and the tools built on them
//! (LangChain, LlamaIndex, vector databases' ingestion) can use a tlserve
//! backbone by its name as the `model`.
//!
//! Below the transport it is the gRPC Embed call: the same use case
//! (core::Embedder), queue, batching, limits and tokens (the `infer` role).

use std::time::Duration;

use axum::{
    extract::{Request, State},
    response::{IntoResponse, Response},
};
use base64::Engine;
use http::HeaderMap;
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};

use super::{
    errors::{json, ApiError},
    ApiState,
};
use crate::{
    backbone::Input,
    batching::Priority,
    config::Modality,
    core,
    server::auth::{Requirement, Role},
    Error,
};

/// OpenAI's `input`: one text, texts, one text's token ids, or several.
#[derive(Deserialize)]
#[serde(untagged)]
enum EmbeddingInput {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Deserialize, Clone, Copy, Default, PartialEq)]
#[serde(rename_all = "lowercase")]
enum EncodingFormat {
    #[default]
    Float,
    Base64,
}

#[derive(Deserialize)]
struct EmbeddingsRequest {
    model: String,
    input: EmbeddingInput,
    #[serde(default)]
    encoding_format: EncodingFormat,
    dimensions: Option<usize>,
    /// An end-user id, for the caller's own abuse tracking; not used here.
    #[serde(default, rename = "user")]
    _user: Option<String>,
}

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

async fn embed(state: &ApiState, request: Request) -> Result<EmbeddingsResponse, ApiError> {
    authorize(state, request.headers())?;
    let body = read_body(state, request).await?;
    let parsed: EmbeddingsRequest = serde_json::from_slice(&body).map_err(|err| {
        ApiError::invalid(
            "input",
            format!(
                "the body is not an embeddings request ({err}): send JSON with `model` \
                 and `input` (a string, a list of strings, token ids or lists of token ids)"
            ),
        )
    })?;
    let format = parsed.encoding_format;
    let inputs = inputs(parsed.input)?;
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

fn inputs(input: EmbeddingInput) -> Result<Vec<Input>, ApiError> {
    let inputs: Vec<Input> = match input {
        EmbeddingInput::Text(text) => vec![Input::Text(text)],
        EmbeddingInput::Texts(texts) => texts.into_iter().map(Input::Text).collect(),
        EmbeddingInput::Ids(ids) => vec![Input::TokenIds(ids)],
        EmbeddingInput::IdLists(lists) => lists.into_iter().map(Input::TokenIds).collect(),
    };
    if inputs.is_empty() {
        return Err(ApiError::invalid(
            "input",
            "input is empty: send at least one",
        ));
    }
    Ok(inputs)
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
pub async fn models(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if let Err(err) = authorize(&state, &headers) {
        return err.into_response();
    }
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

/// The `infer` role, as Embed needs on the gRPC port.
fn authorize(state: &ApiState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(auth) = &state.auth else {
        return Ok(());
    };
    let token = auth
        .check_requirement(Requirement::Role(Role::Infer), headers)
        .into_result()?;
    if let Some(token) = token {
        tracing::Span::current().record("token", token.as_str());
    }
    Ok(())
}

/// The request body, within `limits.max_message_bytes` and
/// `limits.message_timeout_seconds`.
async fn read_body(state: &ApiState, request: Request) -> Result<bytes::Bytes, ApiError> {
    let max = state.limits.max_message_bytes;
    let timeout = Duration::from_secs_f64(state.limits.message_timeout_seconds);
    let limited = http_body_util::Limited::new(request.into_body(), max);
    match tokio::time::timeout(timeout, limited.collect()).await {
        Err(_elapsed) => Err(Error::TimedOut(format!(
            "the request body did not arrive within {timeout:?} (limits.message_timeout_seconds)"
        ))
        .into()),
        Ok(Err(_too_large_or_broken)) => Err(ApiError::new(
            http::StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!(
                "the request body is larger than {max} bytes (limits.max_message_bytes), \
                 or was cut off: split the input"
            ),
        )),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}
