//! (Being built.) Operations: backpressure, timeouts, metrics, health and usage.

use axum::Router;

use crate::AppState;

/// The server's own limits (admission queue, timeouts). Every field has a default.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ServerOptions {}

/// What the operations side of the server keeps: admission, metrics.
#[derive(Debug)]
pub(crate) struct Ops {
    #[allow(dead_code)]
    options: ServerOptions,
}

impl Ops {
    pub(crate) fn new(options: ServerOptions) -> Self {
        Self { options }
    }
}

/// This module's routes, merged under `/v1` by [`crate::app`].
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
}

/// Routes at the root, outside `/v1`.
pub(crate) fn root_routes() -> Router<AppState> {
    Router::new()
}

/// Wraps every route in the request span, metrics and timeouts.
pub(crate) fn instrument(router: Router<AppState>, _state: &AppState) -> Router<AppState> {
    router
}
