//! The `[limits]` section: bounds on what one request may ask for and on the
//! bytes that requests and answers in flight may hold.

use serde::Deserialize;

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

/// Every request limit admits at least one (small) request.
pub(super) fn validate_limits(limits: &LimitsConfig) -> Result<(), String> {
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
