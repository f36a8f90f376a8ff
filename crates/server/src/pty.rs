//! (Being built.) The `pty` routes.

use axum::Router;

use crate::AppState;

/// This module's routes, merged under `/v1` by [`crate::app`].
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
}
