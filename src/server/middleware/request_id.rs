//! Every call's request id, on both transports: the client's `x-request-id`
//! when it is sane, else a new one. It names the call's span and log line and
//! comes back on the response, so that a client can quote it to the operator.

use std::sync::Arc;

use http::HeaderMap;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The client's request id when it sent a sane one, else a new one.
pub fn request_id(headers: &HeaderMap) -> Arc<str> {
    headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(Arc::from)
        .unwrap_or_else(|| Arc::from(uuid::Uuid::new_v4().to_string()))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn request_ids_are_kept_when_sane_and_replaced_otherwise() {
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID_HEADER, HeaderValue::from_static("abc-123"));
        assert_eq!(&*request_id(&headers), "abc-123");

        headers.insert(REQUEST_ID_HEADER, HeaderValue::from_static("has space"));
        let generated = request_id(&headers);
        assert_ne!(&*generated, "has space");
        assert!(uuid::Uuid::parse_str(&generated).is_ok());
    }
}
