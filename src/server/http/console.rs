//! The web console's static files, compiled into the binary (build.rs lists
//! assets/console/ and proto/), served under `/console/`. The page is a client
//! like any other: it calls the gRPC services with gRPC-Web on this same port,
//! with the token its user types, so serving the files needs no token.

use axum::{
    extract::Path,
    response::{IntoResponse, Redirect, Response},
};
use http::{header, HeaderValue};

use super::errors::ApiError;

include!(concat!(env!("OUT_DIR"), "/console_assets.rs"));

/// Scripts only from this origin (no inline script); `unsafe-eval` because
/// protobuf.js compiles its message codecs with `Function`. Pictures the user
/// drops are shown from `blob:` and `data:` URLs.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self' 'unsafe-eval'; \
     style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; \
     frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

pub async fn redirect_to_console() -> Redirect {
    Redirect::permanent("/console/")
}

pub async fn index() -> Response {
    serve("index.html")
}

pub async fn asset(Path(path): Path<String>) -> Response {
    serve(&path)
}

fn serve(path: &str) -> Response {
    let Some((_, bytes)) = CONSOLE_ASSETS.iter().find(|(name, _)| *name == path) else {
        return ApiError::not_found(format!("the console has no file `{path}`")).into_response();
    };
    let mut response = (*bytes).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(path)),
    );
    // The files change with the binary: revalidate rather than trust a cache.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    response
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("json") => "application/json",
        Some("proto" | "txt" | "md") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_travels_with_the_console() {
        for proto in ["trainer.proto", "embedder.proto", "models.proto"] {
            let path = format!("proto/tlserve/v1/{proto}");
            assert!(
                CONSOLE_ASSETS.iter().any(|(name, _)| *name == path),
                "{path} missing"
            );
        }
        assert_eq!(
            content_type("vendor/protobuf.min.js"),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(content_type("../etc/passwd"), "application/octet-stream");
    }
}
