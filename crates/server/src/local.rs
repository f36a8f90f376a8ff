//! The API on a Unix socket in the home, for the home's own user: while this
//! server owns the home, the CLI goes through it rather than opening the home
//! itself (airlock_runtime::API_SOCKET_FILE).

use std::path::Path;

use axum::Extension;
use tokio::net::UnixListener;

use crate::AppState;

/// Marks a request that came through the home's socket. Only the home's
/// owner can reach that socket (the home is private, mode 0700), so such a
/// request acts with the owner's full rights.
#[derive(Debug, Clone, Copy)]
pub struct LocalCaller;

/// Binds the API socket at `path`, replacing a stale one. The caller must own
/// the home (an open runtime on it), so no live server can be listening there.
pub fn bind_local(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(listener)
}

/// Serves [`crate::app`] on `listener` until the server begins to shut down
/// (the same moment [`crate::serve`] stops taking connections).
pub async fn serve_local(listener: UnixListener, state: AppState) -> std::io::Result<()> {
    let shutdown = state.shutdown().clone();
    let router = crate::app(state).layer(Extension(LocalCaller));
    axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await
}
