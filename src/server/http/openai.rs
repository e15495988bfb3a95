//! The OpenAI-compatible embeddings API: `POST /v1/embeddings` and
//! `GET /v1/models`, so that the `openai` SDKs and the tools built on them
//! (LangChain, LlamaIndex, vector databases' ingestion) can use a tlserve
//! backbone by its name as the `model`.
//!
//! Below the transport it is the gRPC Embed call: the same use case
//! (core::Embedder), queue, batching, limits and tokens (the `infer` role).

use axum::{
    extract::State,
    response::{IntoResponse, Response},
};
use base64::Engine;
use bytes::Bytes;
use serde::Serialize;

use super::{
    body::JsonBody,
    embeddings_request::{parse, Bounds, EmbeddingsRequest, EncodingFormat},
    errors::{json, ApiError},
    ApiState,
};
use crate::{batching::Priority, config::Modality, core, task::run_blocking};

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

/// The token was checked before (the route's access, see super::routes),
/// and the body read within its limits ([`JsonBody`]).
pub async fn embeddings(State(state): State<ApiState>, body: JsonBody) -> Response {
    match embed(&state, body).await {
        Ok(response) => json(&response),
        Err(err) => err.into_response(),
    }
}

async fn embed(state: &ApiState, body: JsonBody) -> Result<EmbeddingsResponse, ApiError> {
    let JsonBody { bytes, held } = body;
    let parsed = parse_body(state, bytes).await?;
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
