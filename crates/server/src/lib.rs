//! Airlock's HTTP API: the runtime behind axum routes under `/v1`.
//!
//! Handlers are thin: a strict request struct (unknown fields refused), one
//! runtime call, a response. Every error is `application/problem+json` with a
//! stable code ([`problem::Code`]); the runtime's typed errors are mapped in
//! one place ([`problem`]) and never leak host paths.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use airlock_runtime::{Runtime, RuntimeOptions};
//! let runtime = Runtime::open(RuntimeOptions::new("/var/lib/airlock")).await?;
//! let state = airlock_server::AppState::new(runtime);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7870").await?;
//! airlock_server::serve(listener, state, airlock_server::shutdown_signal()).await?;
//! # Ok(()) }
//! ```

use std::future::{Future, IntoFuture};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use airlock_runtime::{RUNTIME_WARM_CONTEXTS, Runtime, Sandbox};
use airlock_wasm::interpreter::{Interpreters, default_interpreter_dir};
use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest, Request};
use axum::http::StatusCode;
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;

pub mod auth;
mod events;
mod exec;
mod files;
mod git;
mod local;
mod network;
pub mod openapi;
mod ops;
mod processes;
mod preview;
mod pty;
pub mod problem;
mod sandboxes;
mod snapshots;

pub use auth::{ADMIN_TOKEN_FILE, AdminToken, Caller, RequireAdmin, Scope, ensure_admin_token};
pub use ops::{DEFAULT_PREVIEW_DOMAIN, ServerOptions};
pub use local::{LocalCaller, bind_local, serve_local};
pub use problem::{ApiError, Code, PROBLEM_JSON, Problem};

/// The address `airlock serve` listens on by default: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7870";
/// Largest JSON request body (exec and code requests, with their stdin and
/// source inline). Protects the server's memory; file uploads are streamed and
/// bounded by the sandbox's disk quota instead.
pub const MAX_JSON_BODY_BYTES: usize = 8 * 1024 * 1024;
/// How often an idle event stream sends a comment, so proxies keep it open and
/// a client that went away is noticed (the write fails) while its command is silent.
pub const SSE_KEEP_ALIVE: Duration = Duration::from_secs(5);
/// After a shutdown signal, how long running requests may go on before they
/// are cancelled (their commands killed with them).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What every handler shares. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    inner: Arc<StateInner>,
}

#[derive(Debug)]
struct StateInner {
    runtime: Runtime,
    /// The interpreters of `POST /v1/run`: one-shot runs that belong to no sandbox.
    interpreters: Interpreters,
    /// Cancelled when the server begins to shut down: open event streams end
    /// with an `error` event and drop what they run.
    shutdown: CancellationToken,
    /// Admission (backpressure), metrics and the server's own limits.
    ops: ops::Ops,
}

impl AppState {
    /// State over `runtime`, with the interpreters in their default place.
    pub fn new(runtime: Runtime) -> Self {
        Self::with_interpreters(runtime, default_interpreter_dir())
    }

    /// State over `runtime`, with the interpreter components in `dir`.
    pub fn with_interpreters(runtime: Runtime, dir: impl Into<PathBuf>) -> Self {
        Self::with_options(runtime, dir, ServerOptions::default())
    }

    /// State over `runtime`, with the interpreter components in `dir` and the
    /// server's own limits (admission queue, timeouts) from `options`.
    pub fn with_options(runtime: Runtime, dir: impl Into<PathBuf>, options: ServerOptions) -> Self {
        let interpreters =
            Interpreters::new(runtime.isolate_engine().clone(), dir.into()).keep_warm(RUNTIME_WARM_CONTEXTS);
        let ops = ops::Ops::new(options);
        Self { inner: Arc::new(StateInner { runtime, interpreters, shutdown: CancellationToken::new(), ops }) }
    }

    pub fn runtime(&self) -> &Runtime {
        &self.inner.runtime
    }

    fn interpreters(&self) -> &Interpreters {
        &self.inner.interpreters
    }

    fn shutdown(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    fn ops(&self) -> &ops::Ops {
        &self.inner.ops
    }

    /// The sandbox named `name` as `caller` may see it; never creates one.
    /// Another tenant's sandbox is answered exactly as one that does not
    /// exist. The one sandbox lookup: handlers reach it through the
    /// [`Scope`] extractor (`state: Scope` in place of
    /// `State(state): State<AppState>`, then `state.sandbox(&name)`).
    fn sandbox(&self, caller: &Caller, name: &str) -> Result<Sandbox, ApiError> {
        let sandbox = self.inner.runtime.get(name)?.ok_or_else(|| ApiError::no_sandbox(name))?;
        if caller.may_see(sandbox.info().owner.as_deref()) { Ok(sandbox) } else { Err(ApiError::no_sandbox(name)) }
    }
}

/// A JSON body, strictly: a rejection becomes a problem answer (400 for
/// malformed JSON or unknown fields, 413 past [`MAX_JSON_BODY_BYTES`], 415
/// without a JSON content type).
#[derive(Debug)]
pub struct StrictJson<T>(pub T);

impl<T, S> FromRequest<S> for StrictJson<T>
where
    axum::Json<T>: FromRequest<S, Rejection = axum::extract::rejection::JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let axum::Json(value) = axum::Json::<T>::from_request(request, state).await?;
        Ok(Self(value))
    }
}

/// After the server stops, how long it waits at most for the containers'
/// agents to confirm the kills of the commands it dropped: a `Drop` only
/// queues its kill, and a process that exited at once would lose it.
pub const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);

/// The API's routes, all under `/v1` (each needs a bearer token, see
/// [`auth`]), and the operations routes at the root.
pub fn app(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/sandboxes", post(sandboxes::create).get(sandboxes::list))
        .route("/sandboxes/{name}", get(sandboxes::info).delete(sandboxes::destroy))
        .route("/sandboxes/{name}/exec", post(exec::exec))
        .route("/sandboxes/{name}/code", post(exec::code))
        .route("/sandboxes/{name}/contexts", post(exec::create_context).get(exec::list_contexts))
        .route("/sandboxes/{name}/contexts/{id}", axum::routing::delete(exec::delete_context))
        .route("/sandboxes/{name}/contexts/{id}/fork", post(exec::fork_context))
        .route("/sandboxes/{name}/files", get(files::get_root))
        .route("/sandboxes/{name}/files/{*path}", get(files::get).put(files::put).delete(files::delete))
        .route("/sandboxes/{name}/mkdir", post(files::mkdir))
        .route("/sandboxes/{name}/rename", post(files::rename))
        .route("/sandboxes/{name}/git/checkout", post(git::checkout))
        .route("/run", post(exec::run))
        .route("/openapi.json", get(openapi::document))
        .merge(processes::routes())
        .merge(pty::routes())
        .merge(events::routes())
        .merge(preview::routes())
        .merge(network::routes())
        .merge(ops::routes())
        .merge(snapshots::routes())
        // Every `/v1` route, and only those: a request without a live token
        // is refused here, before any handler (health and metrics are outside).
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_token));
    let router = Router::new()
        .nest("/v1", v1)
        .merge(ops::root_routes())
        .merge(preview::root_routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY_BYTES));
    // A preview host (`<port>-<sandbox>-<token>.<domain>`) goes to its sandbox before any route.
    ops::instrument(router, &state)
        .layer(axum::middleware::from_fn_with_state(state.clone(), preview::by_host))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, Code::MethodNotAllowed, "this route does not take this method")
}

/// Serves [`app`] on `listener` until `shutdown` completes; then stops taking
/// connections, tells open event streams to end, lets running requests finish
/// for up to [`SHUTDOWN_GRACE`], and cancels what is left (dropping a running
/// command's future kills its process tree).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let token = state.shutdown().clone();
    let router = app(state);
    let signalled = token.clone();
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("shutting down: finishing running requests");
        signalled.cancel();
    });
    let mut server = Box::pin(server.into_future());
    let result = tokio::select! {
        result = &mut server => result,
        () = async { token.cancelled().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
            tracing::warn!("shutdown grace over: cancelling running requests");
            Ok(())
        }
    };
    // Dropped here: whatever still runs is cancelled, then its kills get out.
    drop(server);
    if !airlock_container::settle_agent_links(SHUTDOWN_FLUSH).await {
        tracing::warn!("a container did not confirm the kill of a dropped command within {SHUTDOWN_FLUSH:?}");
    }
    result
}

/// Completes on ctrl-c (SIGINT) or SIGTERM. The handlers are installed when
/// this is called, not when the future is first polled: call it before
/// telling anyone the server is up, so a signal sent at once is not taken by
/// the default action (which ends the process without a clean stop). Call it
/// inside a Tokio runtime; a handler that cannot be installed never completes.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).ok();
    let mut terminate = signal(SignalKind::terminate()).ok();
    async move {
        let interrupted = async {
            match interrupt.as_mut() {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let terminated = async {
            match terminate.as_mut() {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = interrupted => {}
            () = terminated => {}
        }
    }
}
