//! `/v1/sandboxes/{name}/processes`: background processes in the sandbox's
//! container, which outlive the request (and the client) that started them.
//!
//! Start (`POST`), list (`GET`), kill all (`DELETE`) on the collection; get
//! and kill (`DELETE`: `SIGKILL` to the whole tree) one; its logs as JSON or,
//! with `Accept: text/event-stream`, followed live to its exit, from any byte
//! offset (`?offset=`, or `Last-Event-ID`); its stdin written (`POST`, raw
//! bytes) and closed (`DELETE`); any standard signal sent to its whole tree.
//!
//! Offsets count every byte the process wrote, both streams in the order they
//! arrived. Each output event's `id` is the offset just past it, so a client
//! that reconnects with `Last-Event-ID` resumes exactly where it stopped.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::{Duration, UNIX_EPOCH};

use airlock_container::{PROCESS_LOG_BYTES, ProcessEvent, ProcessFollower, ProcessInfo, ProcessStatus, Signal};
use airlock_core::{ExecRequest, OutputStream, StdinSource};
use airlock_runtime::Sandbox;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::auth::Scope;
use crate::exec::{Encoding, encode, wants_events};
use crate::{ApiError, AppState, Code, SSE_KEEP_ALIVE, StrictJson};

/// How long killing one process waits for its exit to be seen before it
/// answers with the process as it is (the kill itself is confirmed by the agent).
const KILL_WAIT: Duration = Duration::from_secs(10);

/// This module's routes, merged under `/v1` by [`crate::app`].
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/sandboxes/{name}/processes", post(start).get(list).delete(kill_all))
        .route("/sandboxes/{name}/processes/{id}", get(show).delete(kill))
        .route("/sandboxes/{name}/processes/{id}/logs", get(logs))
        .route("/sandboxes/{name}/processes/{id}/stdin", post(write_stdin).delete(close_stdin))
        .route("/sandboxes/{name}/processes/{id}/signal", post(signal))
}

/// `POST /v1/sandboxes/{name}/processes`: exec's request, without a
/// deadline (a background process runs until it exits or is killed).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct StartBody {
    command: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Absolute, inside the sandbox; default `/workspace`.
    cwd: Option<String>,
    /// First bytes of standard input as UTF-8 text; `stdin_base64` for bytes. At most one.
    stdin: Option<String>,
    stdin_base64: Option<String>,
    /// Keep stdin open after those bytes, for `POST .../stdin`; else it ends after them.
    #[serde(default)]
    stdin_open: bool,
}

impl StartBody {
    fn into_request(self) -> Result<ExecRequest, ApiError> {
        let stdin = match (self.stdin, self.stdin_base64) {
            (Some(_), Some(_)) => return Err(ApiError::invalid("give stdin or stdin_base64, not both")),
            (Some(text), None) => StdinSource::Bytes(text.into_bytes()),
            (None, Some(encoded)) => {
                StdinSource::Bytes(BASE64.decode(encoded).map_err(|e| ApiError::invalid(format!("stdin_base64: {e}")))?)
            }
            (None, None) => StdinSource::Empty,
        };
        let mut request = ExecRequest::new(self.command).args(self.args).stdin(stdin);
        request.env = self.env.into_iter().collect();
        request.cwd = self.cwd;
        Ok(request)
    }
}

/// A process as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ProcessView {
    id: String,
    command: Vec<String>,
    started_at_ms: u128,
    /// `running` or `exited`.
    state: &'static str,
    /// Its exit status once exited (128 + the signal when a signal ended it);
    /// `null` while running, or when the container stopped under it.
    exit_code: Option<i32>,
}

impl From<ProcessInfo> for ProcessView {
    fn from(info: ProcessInfo) -> Self {
        let (state, exit_code) = match info.status {
            ProcessStatus::Running => ("running", None),
            ProcessStatus::Exited { code } => ("exited", code),
        };
        Self {
            id: info.id,
            command: info.command,
            started_at_ms: info.started_at.duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0),
            state,
            exit_code,
        }
    }
}

fn no_process(id: &str) -> ApiError {
    ApiError::not_found(format!("no process {id:?} in this sandbox"))
}

async fn find(sandbox: &Sandbox, id: &str) -> Result<ProcessInfo, ApiError> {
    sandbox.list_processes().await?.into_iter().find(|p| p.id == id).ok_or_else(|| no_process(id))
}

async fn start(
    state: Scope,
    Path(name): Path<String>,
    StrictJson(body): StrictJson<StartBody>,
) -> Result<(StatusCode, Json<ProcessView>), ApiError> {
    let sandbox = state.sandbox(&name)?;
    let keep_open = body.stdin_open;
    let request = body.into_request()?;
    let id = if keep_open {
        sandbox.start_process_with_stdin(request).await?
    } else {
        sandbox.start_process(request).await?
    };
    Ok((StatusCode::CREATED, Json(find(&sandbox, &id).await?.into())))
}

async fn list(state: Scope, Path(name): Path<String>) -> Result<Json<Vec<ProcessView>>, ApiError> {
    let processes = state.sandbox(&name)?.list_processes().await?;
    Ok(Json(processes.into_iter().map(ProcessView::from).collect()))
}

async fn show(state: Scope, Path((name, id)): Path<(String, String)>) -> Result<Json<ProcessView>, ApiError> {
    Ok(Json(find(&state.sandbox(&name)?, &id).await?.into()))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Killed {
    /// The processes that were running and were killed, with all they started.
    killed: Vec<String>,
}

async fn kill_all(state: Scope, Path(name): Path<String>) -> Result<Json<Killed>, ApiError> {
    let killed = state.sandbox(&name)?.kill_processes().await?;
    Ok(Json(Killed { killed }))
}

/// `SIGKILL` to the process's whole tree; answers with the process once its
/// exit is seen (at once for one that had exited already).
async fn kill(state: Scope, Path((name, id)): Path<(String, String)>) -> Result<Json<ProcessView>, ApiError> {
    let sandbox = state.sandbox(&name)?;
    if find(&sandbox, &id).await?.status == ProcessStatus::Running {
        sandbox.signal_process(&id, Signal::Kill).await?;
        let _ = tokio::time::timeout(KILL_WAIT, sandbox.wait_process(&id)).await;
    }
    Ok(Json(find(&sandbox, &id).await?.into()))
}

/// `POST .../signal`: `{"signal": "TERM"}`, `"SIGTERM"` or `15`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SignalBody {
    signal: SignalSpec,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub(crate) enum SignalSpec {
    Number(i64),
    Name(String),
}

impl SignalSpec {
    fn resolve(&self) -> Result<Signal, ApiError> {
        let signal = match self {
            SignalSpec::Number(number) => i32::try_from(*number).ok().and_then(Signal::from_number),
            SignalSpec::Name(name) => Signal::from_name(name),
        };
        signal.ok_or_else(|| {
            ApiError::invalid("signal must be a standard Linux signal: a name such as TERM or SIGTERM, or 1 to 31")
        })
    }
}

async fn signal(
    state: Scope,
    Path((name, id)): Path<(String, String)>,
    StrictJson(body): StrictJson<SignalBody>,
) -> Result<StatusCode, ApiError> {
    let signal = body.signal.resolve()?;
    let sandbox = state.sandbox(&name)?;
    if let ProcessStatus::Exited { .. } = find(&sandbox, &id).await?.status {
        return Err(ApiError::new(StatusCode::CONFLICT, Code::Conflict, format!("process {id:?} has exited")));
    }
    sandbox.signal_process(&id, signal).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST .../stdin`: the body's bytes, as they are, to the process's stdin
/// (for a process started with `stdin_open`). At most the JSON body limit per request.
async fn write_stdin(
    state: Scope,
    Path((name, id)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let sandbox = state.sandbox(&name)?;
    let bytes = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::TooLarge,
            format!("at most {} bytes of stdin per request", crate::MAX_JSON_BODY_BYTES),
        ),
        _ => ApiError::invalid("the request body could not be read to its end; nothing was written"),
    })?;
    sandbox.write_process_stdin(&id, &bytes).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn close_stdin(state: Scope, Path((name, id)): Path<(String, String)>) -> Result<StatusCode, ApiError> {
    state.sandbox(&name)?.close_process_stdin(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET .../logs?offset=N`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    /// The first output byte wanted (default 0, or the `Last-Event-ID` of a resumed stream).
    offset: Option<u64>,
}

/// The output of a process from an offset, as far as it is now (at most
/// [`PROCESS_LOG_BYTES`] and a chunk: `next_offset` says where to go on).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct LogsAnswer {
    /// Where the output asked for begins.
    offset: u64,
    /// Where to resume: the offset just past the output returned.
    next_offset: u64,
    /// Bytes from `offset` on that the log no longer holds (it keeps the newest output only).
    missed_bytes: u64,
    stdout: String,
    stdout_encoding: Encoding,
    stderr: String,
    stderr_encoding: Encoding,
    state: &'static str,
    exit_code: Option<i32>,
}

async fn logs(
    state: Scope,
    Path((name, id)): Path<(String, String)>,
    query: Result<Query<LogsQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let resumed = match headers.get("last-event-id") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::invalid("Last-Event-ID must be an output offset"))?,
        ),
    };
    let offset = query.offset.or(resumed).unwrap_or(0);
    let sandbox = state.sandbox(&name)?;
    let mut follower = sandbox.follow_process_from(&id, offset).await?;
    if wants_events(&headers) {
        return Ok(follow(follower, state.shutdown().clone()).into_response());
    }
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    // What the log holds, and what arrives meanwhile up to a bound: a process
    // writing faster than this loop reads must not grow the answer for ever.
    while stdout.len() + stderr.len() < PROCESS_LOG_BYTES {
        match follower.try_next() {
            Some(ProcessEvent::Output(chunk)) if chunk.stream == OutputStream::Stdout => stdout.extend(chunk.bytes),
            Some(ProcessEvent::Output(chunk)) => stderr.extend(chunk.bytes),
            Some(ProcessEvent::Exited(_)) | None => break,
        }
    }
    // The state after the output was read: an exit the reading saw is in it.
    let view = ProcessView::from(find(&sandbox, &id).await?);
    let (stdout, stdout_encoding) = encode(stdout);
    let (stderr, stderr_encoding) = encode(stderr);
    Ok(Json(LogsAnswer {
        offset,
        next_offset: follower.position(),
        missed_bytes: follower.missed_bytes(),
        stdout,
        stdout_encoding,
        stderr,
        stderr_encoding,
        state: view.state,
        exit_code: view.exit_code,
    })
    .into_response())
}

/// Where a log stream is.
enum Phase {
    Following {
        follower: Box<ProcessFollower>,
        /// Missed bytes already told to the client.
        told: u64,
        /// An event to send before reading on.
        pending: Option<Event>,
        shutdown: CancellationToken,
    },
    Done,
}

fn problem_event(error: &ApiError) -> Event {
    Event::default().event("error").data(serde_json::to_string(&error.problem()).unwrap_or_default())
}

/// The process's output from the offset on, then exactly one `exit` (its real
/// status) or `error` event. Output the log no longer held is announced by a
/// `missed` event before what follows it. Dropping the stream (the client
/// left) only stops the reading: the process goes on.
fn follow(
    follower: ProcessFollower,
    shutdown: CancellationToken,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let first = Phase::Following { follower: Box::new(follower), told: 0, pending: None, shutdown };
    let stream = futures_util::stream::unfold(first, |phase| async move {
        let Phase::Following { mut follower, told, pending, shutdown } = phase else { return None };
        if let Some(event) = pending {
            return Some((Ok(event), Phase::Following { follower, told, pending: None, shutdown }));
        }
        let next = tokio::select! {
            next = follower.next() => next,
            () = shutdown.cancelled() => {
                let error = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Code::ShuttingDown,
                    "the server is shutting down; the process goes on",
                );
                return Some((Ok(problem_event(&error)), Phase::Done));
            }
        };
        match next {
            Some(ProcessEvent::Output(chunk)) => {
                let output = Event::default()
                    .event(stream_name(chunk.stream))
                    .id(follower.position().to_string())
                    .data(BASE64.encode(chunk.bytes));
                let missed = follower.missed_bytes();
                if missed > told {
                    let data = serde_json::json!({ "missed_bytes": missed - told });
                    let event = Event::default().event("missed").data(data.to_string());
                    return Some((
                        Ok(event),
                        Phase::Following { follower, told: missed, pending: Some(output), shutdown },
                    ));
                }
                Some((Ok(output), Phase::Following { follower, told, pending: None, shutdown }))
            }
            Some(ProcessEvent::Exited(Some(code))) => {
                let data =
                    serde_json::json!({ "exit_code": code, "state": "exited", "next_offset": follower.position() });
                Some((Ok(Event::default().event("exit").data(data.to_string())), Phase::Done))
            }
            Some(ProcessEvent::Exited(None)) | None => {
                let error = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Code::Unavailable,
                    "the sandbox's container stopped under the process; its exit status is unknown",
                );
                Some((Ok(problem_event(&error)), Phase::Done))
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(SSE_KEEP_ALIVE))
}

fn stream_name(stream: OutputStream) -> &'static str {
    match stream {
        OutputStream::Stdout => "stdout",
        OutputStream::Stderr => "stderr",
    }
}
