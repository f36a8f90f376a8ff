//! Commands and code: `exec`, `code`, contexts, and the one-shot `run`.
//!
//! Output in a JSON answer is UTF-8 text when the bytes are valid UTF-8, else
//! base64; each stream says which in `stdout_encoding` / `stderr_encoding`.
//! In an event stream (`Accept: text/event-stream`) every `stdout`/`stderr`
//! event's data is base64 (binary-safe, one line), and the stream ends with
//! exactly one `exit` or `error` event.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use airlock_core::{
    DisplayOutput, EvalOutcome, EvalResult, ExecOutcome, ExecRequest, Language, OutputChunk, OutputSender,
    OutputStream, SideEffect, StdinSource, Termination, TierKind, Workspace, limits::MAX_DEADLINE,
};
use airlock_runtime::{CodeOutcome, ContextFork, ContextInfo, ContextOptions, Placement, RunOutcome, Sandbox};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::Scope;
use crate::{ApiError, AppState, Code, SSE_KEEP_ALIVE, StrictJson};

/// `POST /v1/sandboxes/{name}/exec`: the runtime's `ExecRequest`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExecBody {
    command: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Absolute, inside the sandbox; default `/workspace`.
    cwd: Option<String>,
    /// Standard input as UTF-8 text; `stdin_base64` for bytes. At most one.
    stdin: Option<String>,
    stdin_base64: Option<String>,
    /// Deadline in seconds (fractions allowed); default the sandbox's.
    timeout: Option<f64>,
}

/// How a stream's bytes are written in a JSON answer.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub(crate) enum Encoding {
    #[serde(rename = "utf-8")]
    Utf8,
    #[serde(rename = "base64")]
    Base64,
}

pub(crate) fn encode(bytes: Vec<u8>) -> (String, Encoding) {
    match String::from_utf8(bytes) {
        Ok(text) => (text, Encoding::Utf8),
        Err(error) => (BASE64.encode(error.as_bytes()), Encoding::Base64),
    }
}

/// The answer to an exec, as JSON or as the `exit` event's data (which
/// carries no output: that went out as events).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ExecAnswer {
    /// The command's own exit status; `null` when it did not exit by itself.
    exit_code: Option<i32>,
    /// How it ended: `{"kind":"exited","code":N}`, `{"kind":"limit-exceeded","limit":..,"value":..}`
    /// (a deadline is `"limit":"deadline"`), or `{"kind":"crashed","message":..}`.
    #[schema(value_type = Object)]
    termination: Termination,
    #[serde(skip_serializing_if = "Option::is_none")]
    stdout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stdout_encoding: Option<Encoding>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stderr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stderr_encoding: Option<Encoding>,
    stdout_truncated: bool,
    stderr_truncated: bool,
    wall_time_ms: u64,
    cpu_time_ms: u64,
    #[schema(value_type = Object)]
    placement: Placement,
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl ExecAnswer {
    pub(crate) fn new(run: RunOutcome, with_output: bool) -> Self {
        let RunOutcome { outcome, placement } = run;
        let ExecOutcome {
            termination, stdout, stderr, stdout_truncated, stderr_truncated, wall_time, cpu_time, ..
        } = outcome;
        let exit_code = match termination {
            Termination::Exited { code } => Some(code),
            _ => None,
        };
        let (stdout, stdout_encoding) = if with_output { split(encode(stdout)) } else { (None, None) };
        let (stderr, stderr_encoding) = if with_output { split(encode(stderr)) } else { (None, None) };
        Self {
            exit_code,
            termination,
            stdout,
            stdout_encoding,
            stderr,
            stderr_encoding,
            stdout_truncated,
            stderr_truncated,
            wall_time_ms: millis(wall_time),
            cpu_time_ms: millis(cpu_time),
            placement,
        }
    }
}

fn split((text, encoding): (String, Encoding)) -> (Option<String>, Option<Encoding>) {
    (Some(text), Some(encoding))
}

fn deadline(timeout: Option<f64>) -> Result<Option<Duration>, ApiError> {
    let Some(seconds) = timeout else { return Ok(None) };
    let deadline =
        Duration::try_from_secs_f64(seconds).ok().filter(|d| !d.is_zero() && *d <= MAX_DEADLINE).ok_or_else(|| {
            ApiError::invalid(format!("timeout must be over 0 and at most {} seconds", MAX_DEADLINE.as_secs()))
        })?;
    Ok(Some(deadline))
}

impl ExecBody {
    fn into_request(self, sandbox: &Sandbox) -> Result<ExecRequest, ApiError> {
        let stdin = match (self.stdin, self.stdin_base64) {
            (Some(_), Some(_)) => return Err(ApiError::invalid("give stdin or stdin_base64, not both")),
            (Some(text), None) => StdinSource::Bytes(text.into_bytes()),
            (None, Some(encoded)) => {
                StdinSource::Bytes(BASE64.decode(encoded).map_err(|e| ApiError::invalid(format!("stdin_base64: {e}")))?)
            }
            (None, None) => StdinSource::Empty,
        };
        let mut limits = sandbox.config().limits;
        if let Some(deadline) = deadline(self.timeout)? {
            limits.deadline = deadline;
        }
        let mut request = ExecRequest::new(self.command).args(self.args).stdin(stdin).limits(limits);
        request.env = self.env.into_iter().collect();
        request.cwd = self.cwd;
        Ok(request)
    }
}

/// Whether the client asked for an event stream.
pub(crate) fn wants_events(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| item.split(';').next().is_some_and(|media| media.trim().eq_ignore_ascii_case("text/event-stream")))
}

pub(crate) async fn exec(
    state: Scope,
    Path(name): Path<String>,
    headers: HeaderMap,
    StrictJson(body): StrictJson<ExecBody>,
) -> Result<Response, ApiError> {
    let sandbox = state.sandbox(&name)?;
    let request = body.into_request(&sandbox)?;
    // A command the router gives to an isolate takes an evaluation slot, as
    // code does; the container's commands do not (they use no engine slot).
    let route = airlock_runtime::route(&airlock_core::Needs::of_exec(&request), sandbox.config().tier)?;
    let admitted = match route.tier {
        TierKind::Container => None,
        _ => Some(state.ops().admit().await?),
    };
    if !wants_events(&headers) {
        let run = sandbox.exec(request).await?;
        drop(admitted);
        return Ok(Json(ExecAnswer::new(run, true)).into_response());
    }
    let (sender, chunks) = mpsc::unbounded_channel();
    // Called from the thread running the command, so it must not wait: the
    // channel is unbounded, and what goes through it is bounded by the run's
    // output cap (the sender is called up to the cap only).
    let request = request.output(Arc::new(move |chunk: OutputChunk| {
        let _ = sender.send(chunk);
    }));
    let run: RunFuture = Box::pin(async move {
        let result = sandbox.exec(request).await.map_err(ApiError::from);
        drop(admitted);
        result
    });
    Ok(event_stream(run, chunks, state.shutdown().clone()).into_response())
}

type RunFuture = Pin<Box<dyn std::future::Future<Output = Result<RunOutcome, ApiError>> + Send>>;

/// Where an event stream is.
enum Phase {
    Running {
        run: RunFuture,
        chunks: mpsc::UnboundedReceiver<OutputChunk>,
        shutdown: CancellationToken,
    },
    /// The run is over: the output still queued goes out, then the last event.
    Draining {
        chunks: mpsc::UnboundedReceiver<OutputChunk>,
        last: Event,
    },
    Done,
}

fn chunk_event(chunk: OutputChunk) -> Event {
    let name = match chunk.stream {
        OutputStream::Stdout => "stdout",
        OutputStream::Stderr => "stderr",
    };
    Event::default().event(name).data(BASE64.encode(chunk.bytes))
}

fn last_event(result: Result<RunOutcome, ApiError>) -> Event {
    let (name, data) = match result {
        Ok(run) => ("exit", serde_json::to_string(&ExecAnswer::new(run, false))),
        Err(error) => ("error", serde_json::to_string(&error.problem())),
    };
    Event::default().event(name).data(data.unwrap_or_default())
}

/// Output events as the command writes them, then exactly one `exit` (its
/// real status) or `error` event. The command runs inside the stream: when
/// the client goes away the server drops the stream, and with it the run,
/// whose process tree the container tier kills.
fn event_stream(
    run: RunFuture,
    chunks: mpsc::UnboundedReceiver<OutputChunk>,
    shutdown: CancellationToken,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = futures_util::stream::unfold(Phase::Running { run, chunks, shutdown }, |phase| async move {
        match phase {
            Phase::Running { mut run, mut chunks, shutdown } => {
                tokio::select! {
                    biased;
                    Some(chunk) = chunks.recv() => {
                        Some((Ok(chunk_event(chunk)), Phase::Running { run, chunks, shutdown }))
                    }
                    result = &mut run => {
                        drop(run);
                        Some(next_drained(chunks, last_event(result)))
                    }
                    () = shutdown.cancelled() => {
                        drop(run);
                        let error = ApiError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            Code::ShuttingDown,
                            "the server is shutting down; the command was killed",
                        );
                        Some((Ok(Event::default().event("error").data(
                            serde_json::to_string(&error.problem()).unwrap_or_default(),
                        )), Phase::Done))
                    }
                }
            }
            Phase::Draining { chunks, last } => Some(next_drained(chunks, last)),
            Phase::Done => None,
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(SSE_KEEP_ALIVE))
}

fn next_drained(mut chunks: mpsc::UnboundedReceiver<OutputChunk>, last: Event) -> (Result<Event, Infallible>, Phase) {
    match chunks.try_recv() {
        Ok(chunk) => (Ok(chunk_event(chunk)), Phase::Draining { chunks, last }),
        Err(_) => (Ok(last), Phase::Done),
    }
}

/// `POST /v1/sandboxes/{name}/code`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CodeBody {
    /// `python` or `javascript` (`js`); optional with a context (it has its own).
    #[schema(value_type = Option<String>)]
    language: Option<Language>,
    code: String,
    /// A context made by `POST /contexts`: state is kept between calls.
    context: Option<String>,
}

/// One rich output of an evaluation, in Jupyter's MIME-bundle convention:
/// the same object in one or more representations, keyed by MIME type
/// (`text/plain`, `text/html`, `text/markdown`, `application/json`,
/// `image/svg+xml` as text; `image/png` and other binary images as base64).
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = DisplayOutput)]
pub(crate) struct DisplayView {
    /// MIME type to representation.
    data: BTreeMap<String, String>,
}

impl DisplayView {
    fn of(display: DisplayOutput) -> Self {
        Self { data: display.data }
    }
}

/// The answer to code, as JSON or as the `result` event's data (which
/// carries no output: that went out as events).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct CodeAnswer {
    result: ResultView,
    #[serde(skip_serializing_if = "Option::is_none")]
    stdout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stdout_encoding: Option<Encoding>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stderr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stderr_encoding: Option<Encoding>,
    stdout_truncated: bool,
    stderr_truncated: bool,
    /// Rich outputs in the order they were made: `display()` calls, figures
    /// shown, a rich last value. In an event stream they went out as
    /// `display` events and this list is empty.
    displays: Vec<DisplayView>,
    /// Whether displays past the per-evaluation caps were dropped.
    displays_truncated: bool,
    /// What the evaluation did that outlives it, as far as the interpreter saw.
    #[schema(value_type = Vec<crate::openapi::SideEffectDoc>)]
    side_effects: Vec<SideEffect>,
    side_effects_truncated: bool,
    wall_time_ms: u64,
    cpu_time_ms: u64,
    #[schema(value_type = crate::openapi::PlacementDoc)]
    placement: Placement,
}

impl CodeAnswer {
    /// The answer; with `with_output` false its stdout and stderr (sent as
    /// events) are left out, and its displays are returned apart.
    fn new(outcome: EvalOutcome, placement: Placement, with_output: bool) -> (Self, Vec<DisplayView>) {
        let EvalOutcome {
            result,
            stdout,
            stderr,
            stdout_truncated,
            stderr_truncated,
            wall_time,
            cpu_time,
            displays,
            displays_truncated,
            side_effects,
            side_effects_truncated,
            ..
        } = outcome;
        let (stdout, stdout_encoding) = if with_output { split(encode(stdout)) } else { (None, None) };
        let (stderr, stderr_encoding) = if with_output { split(encode(stderr)) } else { (None, None) };
        let displays: Vec<DisplayView> = displays.into_iter().map(DisplayView::of).collect();
        let (kept, apart) = if with_output { (displays, Vec::new()) } else { (Vec::new(), displays) };
        let answer = Self {
            result: ResultView::of(result),
            stdout,
            stdout_encoding,
            stderr,
            stderr_encoding,
            stdout_truncated,
            stderr_truncated,
            displays: kept,
            displays_truncated,
            side_effects,
            side_effects_truncated,
            wall_time_ms: millis(wall_time),
            cpu_time_ms: millis(cpu_time),
            placement,
        };
        (answer, apart)
    }

    fn whole(outcome: EvalOutcome, placement: Placement) -> Self {
        Self::new(outcome, placement, true).0
    }
}

/// How an evaluation ended. `kind` is `ok` (with `value` when the last
/// expression had one), `syntax-error` or `runtime-error` (with `error`),
/// `needs-escalation` (with `escalation`), `limit-exceeded` (with `limit`) or
/// `crashed` (with `message`). Its own shape, so an error's own `kind` (the
/// exception type) never collides with the result's.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub(crate) struct ResultView {
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Value>)]
    value: Option<airlock_core::EvalValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    error: Option<airlock_core::CodeError>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    escalation: Option<airlock_core::EscalationReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    limit: Option<airlock_core::LimitExceeded>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

impl ResultView {
    fn of(result: EvalResult) -> Self {
        match result {
            EvalResult::Ok { value } => Self { kind: "ok", value, ..Self::default() },
            EvalResult::SyntaxError(error) => Self { kind: "syntax-error", error: Some(error), ..Self::default() },
            EvalResult::RuntimeError(error) => Self { kind: "runtime-error", error: Some(error), ..Self::default() },
            EvalResult::NeedsEscalation { reason } => {
                Self { kind: "needs-escalation", escalation: Some(reason), ..Self::default() }
            }
            EvalResult::LimitExceeded(limit) => Self { kind: "limit-exceeded", limit: Some(limit), ..Self::default() },
            EvalResult::Crashed { message } => Self { kind: "crashed", message: Some(message), ..Self::default() },
            other => Self { kind: "crashed", message: Some(format!("{other:?}")), ..Self::default() },
        }
    }
}

/// Where an evaluation runs: a fresh interpreter of a language, or a context.
enum Target {
    Fresh(Language),
    Context(String),
}

/// Evaluates `code`, calling `output` with each stdout and stderr chunk as
/// the code writes it (both tiers).
async fn evaluate(sandbox: &Sandbox, target: &Target, code: &str, output: OutputSender) -> Result<CodeOutcome, ApiError> {
    let ran = match target {
        Target::Fresh(language) => sandbox.code_streaming(*language, code, output).await?,
        Target::Context(context) => sandbox.code_in_streaming(context, code, output).await?,
    };
    Ok(ran)
}

/// An evaluation's answer, checked: a full engine pool is the server's
/// capacity (an error), an escalation is counted.
fn checked(state: &AppState, ran: CodeOutcome) -> Result<CodeOutcome, ApiError> {
    refuse_engine_capacity(&ran.outcome.result)?;
    if ran.placement.escalated.is_some() {
        state.ops().count_escalation();
    }
    Ok(ran)
}

pub(crate) async fn code(
    state: Scope,
    Path(name): Path<String>,
    headers: HeaderMap,
    StrictJson(body): StrictJson<CodeBody>,
) -> Result<Response, ApiError> {
    let sandbox = state.sandbox(&name)?;
    let target = match (body.context, body.language) {
        (Some(context), _) => Target::Context(context),
        (None, Some(language)) => Target::Fresh(language),
        (None, None) => return Err(ApiError::invalid("give a language, or a context")),
    };
    let admitted = state.ops().admit().await?;
    if !wants_events(&headers) {
        let answer = match &target {
            Target::Context(context) => sandbox.code_in(context, &body.code).await?,
            Target::Fresh(language) => sandbox.code(*language, &body.code).await?,
        };
        drop(admitted);
        let ran = checked(&state, answer)?;
        return Ok(Json(CodeAnswer::whole(ran.outcome, ran.placement)).into_response());
    }
    // Refused before the stream starts, with its status, rather than as an
    // `error` event: a context this sandbox does not have.
    if let Target::Context(context) = &target
        && !sandbox.contexts().iter().any(|info| info.id == *context)
    {
        return Err(airlock_runtime::Error::from(airlock_core::Error::NoSuchContext(context.clone())).into());
    }
    let (sender, chunks) = mpsc::unbounded_channel();
    // Called from the thread running the code, so it must not wait: the
    // channel is unbounded, and what goes through it is bounded by the
    // evaluation's output cap.
    let output: OutputSender = Arc::new(move |chunk: OutputChunk| {
        let _ = sender.send(chunk);
    });
    let app: AppState = (*state).clone();
    // The evaluation runs in a task of its own, not inside the stream: a
    // client that goes away drops the stream, and the evaluation finishes by
    // itself, bounded by its deadline, so its context is left consistent
    // (never cut off halfway through an evaluation) and answers the next call.
    let task = tokio::spawn(async move {
        let result = evaluate(&sandbox, &target, &body.code, output).await;
        drop(admitted);
        result.and_then(|ran| checked(&app, ran))
    });
    Ok(code_event_stream(task, chunks, state.shutdown().clone()).into_response())
}

type EvalTask = tokio::task::JoinHandle<Result<CodeOutcome, ApiError>>;

/// Where a code event stream is.
enum CodePhase {
    Running { task: EvalTask, chunks: mpsc::UnboundedReceiver<OutputChunk>, shutdown: CancellationToken },
    /// The evaluation is over: these events go out, the last one last.
    Ending(std::collections::VecDeque<Event>),
}

fn problem_event(error: &ApiError) -> Event {
    Event::default().event("error").data(serde_json::to_string(&error.problem()).unwrap_or_default())
}

/// The events that end a code stream: the output still queued, one
/// `display` event per display output, then the `result` (or one `error`).
fn ending(
    mut chunks: mpsc::UnboundedReceiver<OutputChunk>,
    result: Result<CodeOutcome, ApiError>,
) -> std::collections::VecDeque<Event> {
    let mut events = std::collections::VecDeque::new();
    while let Ok(chunk) = chunks.try_recv() {
        events.push_back(chunk_event(chunk));
    }
    match result {
        Ok(ran) => {
            let (answer, displays) = CodeAnswer::new(ran.outcome, ran.placement, false);
            for display in displays {
                events.push_back(Event::default().event("display").data(serde_json::to_string(&display).unwrap_or_default()));
            }
            events.push_back(Event::default().event("result").data(serde_json::to_string(&answer).unwrap_or_default()));
        }
        Err(error) => events.push_back(problem_event(&error)),
    }
    events
}

/// Output events as the code writes them, then a `display` event per rich
/// output, then exactly one `result` (the answer without its output) or
/// `error` event.
fn code_event_stream(
    task: EvalTask,
    chunks: mpsc::UnboundedReceiver<OutputChunk>,
    shutdown: CancellationToken,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = futures_util::stream::unfold(Some(CodePhase::Running { task, chunks, shutdown }), |phase| async move {
        match phase? {
            CodePhase::Running { mut task, mut chunks, shutdown } => {
                tokio::select! {
                    biased;
                    Some(chunk) = chunks.recv() => {
                        Some((Ok(chunk_event(chunk)), Some(CodePhase::Running { task, chunks, shutdown })))
                    }
                    joined = &mut task => {
                        let result = joined.unwrap_or_else(|error| Err(ApiError::internal(&error)));
                        let mut events = ending(chunks, result);
                        let first = events.pop_front()?;
                        Some((Ok(first), Some(CodePhase::Ending(events))))
                    }
                    () = shutdown.cancelled() => {
                        // Shutting down: the evaluation is cancelled with
                        // everything else the server runs.
                        task.abort();
                        let error = ApiError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            Code::ShuttingDown,
                            "the server is shutting down; the evaluation was cancelled",
                        );
                        Some((Ok(problem_event(&error)), None))
                    }
                }
            }
            CodePhase::Ending(mut events) => {
                let next = events.pop_front()?;
                Some((Ok(next), Some(CodePhase::Ending(events))))
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(SSE_KEEP_ALIVE))
}

/// An evaluation the isolate engine could not place (its pool was full, as
/// when a context must start again) is the server's capacity, not the code's
/// crash: answered `503` with `Retry-After`, like a run refused at the gate.
fn refuse_engine_capacity(result: &EvalResult) -> Result<(), ApiError> {
    match result {
        EvalResult::Crashed { message } if crate::problem::is_engine_capacity(message) => {
            Err(airlock_runtime::Error::Core(airlock_core::Error::Engine(message.clone())).into())
        }
        _ => Ok(()),
    }
}

/// `POST /v1/run`: code in a fresh interpreter, with a fresh empty workspace
/// that is removed afterwards; no sandbox is made or kept.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RunBody {
    #[schema(value_type = String)]
    language: Language,
    code: String,
    /// Deadline in seconds (fractions allowed); default 30.
    timeout: Option<f64>,
}

pub(crate) async fn run(
    State(state): State<AppState>,
    StrictJson(body): StrictJson<RunBody>,
) -> Result<Json<CodeAnswer>, ApiError> {
    let mut limits = airlock_core::Limits::default();
    if let Some(deadline) = deadline(body.timeout)? {
        limits.deadline = deadline;
    }
    let admitted = state.ops().admit().await?;
    let scratch = tempfile::Builder::new().prefix("airlock-run-").tempdir().map_err(|e| ApiError::internal(&e))?;
    let workspace = Workspace::open(scratch.path())?;
    let outcome = state.interpreters().run(body.language, workspace, &body.code, limits).await;
    drop(admitted);
    // Removed on a blocking thread: the guest may have left many files.
    tokio::task::spawn_blocking(move || drop(scratch));
    let outcome = outcome.map_err(airlock_runtime::Error::from)?;
    refuse_engine_capacity(&outcome.result)?;
    state.ops().count_run(outcome.cpu_time);
    let placement = Placement::new(TierKind::Isolate, "a one-shot run is an isolate's");
    Ok(Json(CodeAnswer::whole(outcome, placement)))
}

/// `POST /v1/sandboxes/{name}/contexts`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ContextBody {
    #[schema(value_type = String)]
    language: Language,
    /// When an evaluation needs the container, replay the context's earlier
    /// successful evaluations there first (their side effects happen again);
    /// with `false` the context starts fresh in the container. Default `true`.
    replay_on_escalation: Option<bool>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ContextCreated {
    id: String,
    #[schema(value_type = String)]
    language: Language,
}

pub(crate) async fn create_context(
    state: Scope,
    Path(name): Path<String>,
    StrictJson(body): StrictJson<ContextBody>,
) -> Result<(StatusCode, Json<ContextCreated>), ApiError> {
    let sandbox = state.sandbox(&name)?;
    let mut options = ContextOptions::default();
    if let Some(replay) = body.replay_on_escalation {
        options.replay_on_escalation = replay;
    }
    let id = sandbox.create_context_with(body.language, options).await?;
    Ok((StatusCode::CREATED, Json(ContextCreated { id, language: body.language })))
}

pub(crate) async fn list_contexts(state: Scope, Path(name): Path<String>) -> Result<Json<Vec<ContextInfo>>, ApiError> {
    Ok(Json(state.sandbox(&name)?.contexts()))
}

/// `POST /v1/sandboxes/{name}/contexts/{id}/fork`: a new context in the same
/// sandbox holding the source's variables, functions and imports, made by
/// replaying its history (the source is unchanged); 201 with the new id and
/// what the replay did.
pub(crate) async fn fork_context(
    state: Scope,
    Path((name, id)): Path<(String, String)>,
) -> Result<(StatusCode, Json<ContextFork>), ApiError> {
    let fork = state.sandbox(&name)?.fork_context(&id).await?;
    Ok((StatusCode::CREATED, Json(fork)))
}

pub(crate) async fn delete_context(
    state: Scope,
    Path((name, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.sandbox(&name)?.delete_context(&id)?;
    Ok(StatusCode::NO_CONTENT)
}
