//! `GET /v1/sandboxes/{name}/pty`: a terminal in the sandbox's container, on
//! a WebSocket.
//!
//! The query names the command and the terminal (`?command=bash&cols=80&rows=24&cwd=/workspace`,
//! all optional, nothing else taken). The terminal is opened before the
//! upgrade, so a refusal (unknown sandbox, terminal limit, tier) is an
//! ordinary problem answer. Then binary frames carry the terminal's bytes both
//! ways; text frames carry JSON: `{"type":"resize","cols":C,"rows":R}` from the
//! client; `{"type":"ready",...}` first, then exactly one of
//! `{"type":"exit","exit_code":N}` (the command's real status) or
//! `{"type":"error",...}` at the end from the server. A bad text frame gets an
//! `error` frame and the session goes on.
//!
//! The socket owns the session: when it closes (or stops answering pings),
//! the command's whole process tree is killed.

use airlock_container::PtySize;
use airlock_core::ExecRequest;
use airlock_runtime::SandboxPty;
use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::auth::Scope;
use crate::{ApiError, AppState, Code, SSE_KEEP_ALIVE};

/// The command a terminal runs when the query names none.
const DEFAULT_PTY_COMMAND: &str = "bash";
/// Largest WebSocket message taken from a client: bounds the memory one
/// frame of typed input can take before it reaches the terminal.
pub const MAX_PTY_MESSAGE_BYTES: usize = 1024 * 1024;
/// How long a client may stay silent (not even answering the server's pings,
/// sent every [`SSE_KEEP_ALIVE`]) before its session is taken as gone and its
/// command's tree killed: a peer that vanished without closing the connection
/// would otherwise hold the terminal until TCP gave up on it.
pub const PTY_SILENCE_LIMIT: std::time::Duration = SSE_KEEP_ALIVE.saturating_mul(3);
/// Largest terminal side, in cells: a size past it is refused, not passed to
/// the kernel (which would allocate for it).
const MAX_PTY_CELLS: u16 = 4096;

/// This module's routes, merged under `/v1` by [`crate::app`].
pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/sandboxes/{name}/pty", get(open))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PtyQuery {
    /// The program (found on `PATH`); default `bash`.
    command: Option<String>,
    /// Absolute, inside the sandbox; default `/workspace`.
    cwd: Option<String>,
    cols: Option<u16>,
    rows: Option<u16>,
}

fn checked_size(cols: u16, rows: u16) -> Result<PtySize, String> {
    if cols == 0 || rows == 0 || cols > MAX_PTY_CELLS || rows > MAX_PTY_CELLS {
        return Err(format!("cols and rows must be 1 to {MAX_PTY_CELLS}"));
    }
    Ok(PtySize { cols, rows })
}

/// What the client sends in text frames.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
enum ClientMessage {
    Resize { cols: u16, rows: u16 },
}

/// What the server sends in text frames.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
enum ServerMessage {
    Ready { cols: u16, rows: u16 },
    Exit { exit_code: i32 },
    Error { code: &'static str, detail: String },
}

impl ServerMessage {
    fn error(error: &ApiError) -> Self {
        ServerMessage::Error { code: error.code.as_str(), detail: error.detail.clone() }
    }
}

async fn open(
    state: Scope,
    Path(name): Path<String>,
    query: Result<Query<PtyQuery>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let upgrade = upgrade.map_err(|rejection| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            Code::InvalidRequest,
            format!("this route is a WebSocket: {}", rejection.body_text()),
        )
    })?;
    let size = checked_size(query.cols.unwrap_or(80), query.rows.unwrap_or(24)).map_err(ApiError::invalid)?;
    let sandbox = state.sandbox(&name)?;
    let mut request = ExecRequest::new(query.command.unwrap_or_else(|| DEFAULT_PTY_COMMAND.into()));
    request.cwd = query.cwd;
    let pty = sandbox.open_pty(request, size).await?;
    let shutdown = state.shutdown().clone();
    // Until the upgrade completes the session is held by this closure: a
    // client that never completes it drops the terminal, and its command with it.
    Ok(upgrade
        .max_message_size(MAX_PTY_MESSAGE_BYTES)
        .max_frame_size(MAX_PTY_MESSAGE_BYTES)
        .on_upgrade(move |socket| session(socket, pty, size, shutdown)))
}

async fn send_json(socket: &mut WebSocket, message: &ServerMessage) -> Result<(), axum::Error> {
    let text = serde_json::to_string(message).unwrap_or_default();
    socket.send(Message::Text(Utf8Bytes::from(text))).await
}

async fn close(socket: &mut WebSocket, code: u16) {
    let _ = socket.send(Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::default() }))).await;
}

/// Runs the session until the command ends, the client goes away, or the
/// server stops. Every way out but the command's end drops `pty`, which kills
/// the command's whole tree.
async fn session(mut socket: WebSocket, mut pty: SandboxPty, size: PtySize, shutdown: CancellationToken) {
    if send_json(&mut socket, &ServerMessage::Ready { cols: size.cols, rows: size.rows }).await.is_err() {
        return;
    }
    let mut ping = tokio::time::interval(SSE_KEEP_ALIVE);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let mut heard = tokio::time::Instant::now();
    loop {
        tokio::select! {
            output = pty.read() => match output {
                Some(Ok(bytes)) => {
                    if socket.send(Message::Binary(bytes)).await.is_err() {
                        return;
                    }
                }
                Some(Err(error)) => {
                    let _ = send_json(&mut socket, &ServerMessage::error(&ApiError::from(airlock_runtime::Error::from(error)))).await;
                    close(&mut socket, close_code::ERROR).await;
                    return;
                }
                None => break,
            },
            message = socket.recv() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    heard = tokio::time::Instant::now();
                    if let Err(error) = pty.write(&bytes).await {
                        let _ = send_json(&mut socket, &ServerMessage::error(&ApiError::from(airlock_runtime::Error::from(error)))).await;
                        close(&mut socket, close_code::ERROR).await;
                        return;
                    }
                }
                Some(Ok(Message::Text(text))) => {
                    heard = tokio::time::Instant::now();
                    if let Err(error) = control(&pty, text.as_str()).await
                        && send_json(&mut socket, &ServerMessage::error(&error)).await.is_err()
                    {
                        return;
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => heard = tokio::time::Instant::now(),
                // Closed, or broken: the session ends, and its tree with it.
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
            },
            _ = ping.tick() => {
                if heard.elapsed() > PTY_SILENCE_LIMIT {
                    let error = ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        Code::Timeout,
                        "the client answered no ping; the terminal's command was killed",
                    );
                    let _ = send_json(&mut socket, &ServerMessage::error(&error)).await;
                    close(&mut socket, close_code::POLICY).await;
                    return;
                }
                if socket.send(Message::Ping(Bytes::new())).await.is_err() {
                    return;
                }
            }
            () = shutdown.cancelled() => {
                let error = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Code::ShuttingDown,
                    "the server is shutting down; the terminal's command was killed",
                );
                let _ = send_json(&mut socket, &ServerMessage::error(&error)).await;
                close(&mut socket, close_code::AWAY).await;
                return;
            }
        }
    }
    let last = match pty.wait().await {
        Ok(Some(exit_code)) => ServerMessage::Exit { exit_code },
        Ok(None) => ServerMessage::error(&ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::Unavailable,
            "the sandbox's container stopped under the terminal; its exit status is unknown",
        )),
        Err(error) => ServerMessage::error(&ApiError::from(error)),
    };
    let _ = send_json(&mut socket, &last).await;
    close(&mut socket, close_code::NORMAL).await;
}

/// A text frame from the client: a resize, or an error to tell it.
async fn control(pty: &SandboxPty, text: &str) -> Result<(), ApiError> {
    let message: ClientMessage = serde_json::from_str(text).map_err(|e| {
        ApiError::invalid(format!("a text frame must be {{\"type\":\"resize\",\"cols\":C,\"rows\":R}}: {e}"))
    })?;
    match message {
        ClientMessage::Resize { cols, rows } => {
            let size = checked_size(cols, rows).map_err(ApiError::invalid)?;
            pty.resize(size).await.map_err(|e| ApiError::from(airlock_runtime::Error::from(e)))
        }
    }
}
