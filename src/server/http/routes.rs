//! The HTTP API port's routes, in one table. The router, the `route` label of
//! the request metrics (and the series registered at zero for them) and the
//! role each route needs all come from [`ROUTES`], so that a route is added,
//! labelled and guarded in one place.

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::IntoResponse,
    routing::{on, MethodFilter, MethodRouter},
    Router,
};
use http::HeaderMap;

use super::{console, errors::ApiError, openai, ApiState};
use crate::server::middleware::auth::{Requirement, Role};

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone: the console's files, whose page asks its user for a token and
    /// sends it with its own calls.
    Open,
    /// A token with this role, as the same use case needs on the gRPC port.
    Role(Role),
}

/// One route of the HTTP API port.
pub struct Route {
    pub method: MethodFilter,
    /// The path as axum matches it.
    pub path: &'static str,
    /// The `route` label of the request's metrics. Several paths may share
    /// one, so that the label's values stay few.
    pub label: &'static str,
    pub access: Access,
    /// The handler for `method`.
    handler: fn(MethodFilter) -> MethodRouter<ApiState>,
}

/// Every route of the HTTP API port. Anything else is gRPC-Web (by content
/// type) or a 404, labelled [`OTHER`].
pub const ROUTES: &[Route] = &[
    Route {
        method: MethodFilter::POST,
        path: "/v1/embeddings",
        label: "/v1/embeddings",
        access: Access::Role(Role::Infer),
        handler: |method| on(method, openai::embeddings),
    },
    Route {
        method: MethodFilter::GET,
        path: "/v1/models",
        label: "/v1/models",
        access: Access::Role(Role::Infer),
        handler: |method| on(method, openai::models),
    },
    Route {
        method: MethodFilter::GET,
        path: "/",
        label: "/console/",
        access: Access::Open,
        handler: |method| on(method, console::redirect_to_console),
    },
    Route {
        method: MethodFilter::GET,
        path: "/console",
        label: "/console/",
        access: Access::Open,
        handler: |method| on(method, console::redirect_to_console),
    },
    Route {
        method: MethodFilter::GET,
        path: "/console/",
        label: "/console/",
        access: Access::Open,
        handler: |method| on(method, console::index),
    },
    Route {
        method: MethodFilter::GET,
        path: "/console/{*path}",
        label: "/console/{path}",
        access: Access::Open,
        handler: |method| on(method, console::asset),
    },
];

/// The label of a request no route serves (gRPC-Web calls aside, which the
/// gRPC request layer counts).
pub const OTHER: &str = "other";

/// Every value of the `route` label, each once, in the table's order.
pub fn labels() -> Vec<&'static str> {
    let mut labels: Vec<&'static str> = Vec::new();
    for label in ROUTES.iter().map(|r| r.label).chain([OTHER]) {
        if !labels.contains(&label) {
            labels.push(label);
        }
    }
    labels
}

/// The route axum matched (its path as written in the table), if any.
pub fn find(matched_path: &str) -> Option<&'static Route> {
    ROUTES.iter().find(|r| r.path == matched_path)
}

/// The table's routes, each behind the check of its access. The check is a
/// route layer: a method the route does not serve gets its 405 unchecked,
/// as before any handler runs.
pub fn router(state: &ApiState) -> Router<ApiState> {
    ROUTES.iter().fold(Router::new(), |router, route| {
        let mut endpoint = (route.handler)(route.method);
        if let Access::Role(role) = route.access {
            endpoint = endpoint.route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                move |State(state): State<ApiState>, request: Request, next: Next| async move {
                    match authorize(&state, role, request.headers()) {
                        Ok(()) => next.run(request).await,
                        Err(err) => err.into_response(),
                    }
                },
            ));
        }
        router.route(route.path, endpoint)
    })
}

/// Checks the request's token for `role` (when authentication is on) and
/// names the token in the request's span.
fn authorize(state: &ApiState, role: Role, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(auth) = &state.auth else {
        return Ok(());
    };
    let token = auth
        .check_requirement(Requirement::Role(role), headers)
        .into_result()?;
    if let Some(token) = token {
        tracing::Span::current().record("token", token.as_str());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_is_routed_once_and_every_label_listed_once() {
        let mut paths: Vec<&str> = ROUTES.iter().map(|r| r.path).collect();
        paths.sort_unstable();
        paths.dedup();
        assert_eq!(paths.len(), ROUTES.len(), "a path appears twice in ROUTES");
        let labels = labels();
        assert_eq!(
            labels,
            [
                "/v1/embeddings",
                "/v1/models",
                "/console/",
                "/console/{path}",
                "other"
            ]
        );
        for route in ROUTES {
            assert_eq!(find(route.path).map(|r| r.label), Some(route.label));
        }
    }

    #[test]
    fn the_api_needs_the_infer_role_and_the_console_files_none() {
        for route in ROUTES {
            let expected = if route.path.starts_with("/v1/") {
                Access::Role(Role::Infer)
            } else {
                Access::Open
            };
            assert_eq!(route.access, expected, "{}", route.path);
        }
    }
}
