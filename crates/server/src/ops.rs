//! Operations: backpressure on evaluations, per-route timeouts, a `tracing`
//! span and metrics per request, `/metrics`, `/healthz`, `/readyz` and
//! `/v1/usage`.
//!
//! **Backpressure.** Code evaluations and isolate commands pass through one
//! [`Admission`] gate: at most [`ServerOptions::max_concurrent_evaluations`]
//! run at once; past that, a request waits in a queue of at most
//! [`ServerOptions::max_queued_evaluations`] for at most
//! [`ServerOptions::max_queue_wait`], and is then answered `503` with
//! `Retry-After` and a `capacity` problem naming the limit. The isolate
//! engine's own pool is the last line: a run it cannot place is answered the
//! same way (see [`crate::problem`]), never with a `500`.
//!
//! **Timeouts.** Every route's handler is bounded by a named limit, up to the
//! head of its answer: plain requests by [`ServerOptions::request_timeout`],
//! exec, code and one-shot runs answered as JSON by
//! [`ServerOptions::execution_timeout`]. Event streams, WebSockets, file
//! transfers and process logs and stdin are not: they have their own bounds
//! (the run's deadline, the file operation limit, the client's connection).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use airlock_container::{DockerEngine, EngineOptions};
use airlock_core::limits::MAX_DEADLINE;
use airlock_core::{Language, TierKind};
use airlock_runtime::{SandboxState, UsageQuery, UsageTotals};
use axum::Json;
use axum::Router;
use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{MatchedPath, Query, RawPathParams, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument as _;

use crate::auth::{RequireAdmin, Scope};
use crate::{ApiError, AppState, Code};

/// Default cap on evaluations (code, one-shot runs, isolate commands) running
/// at once. Half the isolate engine's default pool: the other half stays for
/// what holds a slot between requests (sandboxes' contexts, the warm pools).
/// Protects the engine's pool and the CPU.
pub const DEFAULT_MAX_CONCURRENT_EVALUATIONS: usize = airlock_wasm::DEFAULT_MAX_CONCURRENT_RUNS as usize / 2;
/// Default cap on evaluations waiting for a slot. Each holds its request body
/// (at most [`crate::MAX_JSON_BODY_BYTES`], code is usually far smaller) and a
/// connection while it waits; past it, requests are refused at once.
pub const DEFAULT_MAX_QUEUED_EVALUATIONS: usize = 512;
/// Default longest wait for a slot, after which the request is refused: a
/// client learns soon that the server is saturated instead of hanging.
pub const DEFAULT_MAX_QUEUE_WAIT: Duration = Duration::from_secs(10);
/// `Retry-After` of an answer refused for capacity, in seconds.
pub const RETRY_AFTER_SECS: u64 = 1;
/// Default bound on a plain request's handler (sandboxes, contexts, files'
/// metadata, usage, metrics): it protects the server from requests stuck on a
/// registry or engine that no longer answers.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Default bound on an exec, code or one-shot run answered as JSON: past the
/// longest deadline a run may ask for, with room for queueing, waking the
/// sandbox and building the base image on first use. A backstop: each run is
/// bounded by its own deadline first.
pub const DEFAULT_EXECUTION_TIMEOUT: Duration = MAX_DEADLINE.saturating_add(Duration::from_secs(30 * 60));
/// How long `/readyz` waits for each check (an interpreter loading, the
/// Docker engine answering) before it reports the check as not ready.
pub const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bounds (seconds) of the request latency histogram's buckets.
const LATENCY_BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0];
/// The `route` label of a request that matched no route: one label, so that
/// scanners cannot grow the metrics without bound.
const UNMATCHED_ROUTE: &str = "unmatched";
/// The media type of `/metrics`: Prometheus' text exposition format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The server's own limits. Every field has a default ([`Default`]).
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Evaluations running at once. Default: [`DEFAULT_MAX_CONCURRENT_EVALUATIONS`].
    pub max_concurrent_evaluations: usize,
    /// Evaluations waiting for a slot. Default: [`DEFAULT_MAX_QUEUED_EVALUATIONS`].
    pub max_queued_evaluations: usize,
    /// Longest wait for a slot. Default: [`DEFAULT_MAX_QUEUE_WAIT`].
    pub max_queue_wait: Duration,
    /// Bound on a plain request. Default: [`DEFAULT_REQUEST_TIMEOUT`].
    pub request_timeout: Duration,
    /// Bound on an exec, code or run answered as JSON. Default: [`DEFAULT_EXECUTION_TIMEOUT`].
    pub execution_timeout: Duration,
    /// The Docker engine `/readyz` asks. Default: the runtime's default
    /// (`$AIRLOCK_DOCKER_SOCKET`, else `/var/run/docker.sock`).
    pub docker_socket: PathBuf,
    /// The domain of host-form preview URLs (`<port>-<sandbox>-<token>.<domain>`).
    /// Default: [`DEFAULT_PREVIEW_DOMAIN`].
    pub preview_domain: String,
}

/// The default preview domain: `*.localhost` resolves to loopback in browsers.
pub const DEFAULT_PREVIEW_DOMAIN: &str = "localhost";

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_concurrent_evaluations: DEFAULT_MAX_CONCURRENT_EVALUATIONS,
            max_queued_evaluations: DEFAULT_MAX_QUEUED_EVALUATIONS,
            max_queue_wait: DEFAULT_MAX_QUEUE_WAIT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            execution_timeout: DEFAULT_EXECUTION_TIMEOUT,
            docker_socket: EngineOptions::default().socket,
            preview_domain: DEFAULT_PREVIEW_DOMAIN.to_string(),
        }
    }
}

/// What the operations side of the server keeps.
#[derive(Debug)]
pub(crate) struct Ops {
    options: ServerOptions,
    admission: Admission,
    metrics: Metrics,
}

impl Ops {
    /// The domain of host-form preview URLs.
    pub(crate) fn preview_domain(&self) -> &str {
        &self.options.preview_domain
    }

    pub(crate) fn new(options: ServerOptions) -> Self {
        let admission =
            Admission::new(options.max_concurrent_evaluations, options.max_queued_evaluations, options.max_queue_wait);
        Self { options, admission, metrics: Metrics::default() }
    }

    /// A slot for one evaluation, waiting in the queue if none is free.
    pub(crate) async fn admit(&self) -> Result<Admitted, ApiError> {
        self.admission.admit().await
    }

    /// Counts a one-shot run (`POST /v1/run`), which the usage ledger does not
    /// see (it belongs to no sandbox).
    pub(crate) fn count_run(&self, cpu_time: Duration) {
        self.metrics.runs.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(cpu_time.as_micros()).unwrap_or(u64::MAX);
        self.metrics.run_cpu_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Counts an answer that escalated from an isolate to the container.
    pub(crate) fn count_escalation(&self) {
        self.metrics.escalations.fetch_add(1, Ordering::Relaxed);
    }

    /// The bound on a request's handler, and its name; `None` for streams,
    /// WebSockets and transfers, which have their own.
    fn timeout_for(&self, route: &str, headers: &HeaderMap) -> Option<(&'static str, Duration)> {
        let upgrade = headers.contains_key(header::UPGRADE);
        let streaming = crate::exec::wants_events(headers);
        let transfer = route.split('/').any(|segment| matches!(segment, "files" | "events" | "pty" | "logs" | "stdin"));
        // Health and readiness bound each of their checks themselves.
        let probe = matches!(route, "/healthz" | "/readyz");
        // A proxied dev server may stream; previews bound their own wait for a head.
        let preview = route.starts_with("/preview/");
        if upgrade || streaming || transfer || probe || preview {
            return None;
        }
        if matches!(route, "/v1/run" | "/v1/sandboxes/{name}/exec" | "/v1/sandboxes/{name}/code") {
            return Some(("execution_timeout", self.options.execution_timeout));
        }
        Some(("request_timeout", self.options.request_timeout))
    }
}

/// The gate evaluations pass: a fixed number of slots, and a bounded queue
/// with a bounded wait in front of them.
#[derive(Debug)]
struct Admission {
    slots: std::sync::Arc<Semaphore>,
    capacity: usize,
    waiting: AtomicUsize,
    max_waiting: usize,
    max_wait: Duration,
    refused_full: AtomicU64,
    refused_wait: AtomicU64,
}

/// A slot held by one evaluation; given back when dropped.
#[derive(Debug)]
pub(crate) struct Admitted {
    _permit: OwnedSemaphorePermit,
}

/// Counts a waiter while it waits.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Admission {
    fn new(capacity: usize, max_waiting: usize, max_wait: Duration) -> Self {
        let capacity = capacity.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            slots: std::sync::Arc::new(Semaphore::new(capacity)),
            capacity,
            waiting: AtomicUsize::new(0),
            max_waiting,
            max_wait,
            refused_full: AtomicU64::new(0),
            refused_wait: AtomicU64::new(0),
        }
    }

    async fn admit(&self) -> Result<Admitted, ApiError> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(Admitted { _permit: permit });
        }
        let ahead = self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        if ahead >= self.max_waiting {
            self.refused_full.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::capacity(
                "max_queued_evaluations",
                RETRY_AFTER_SECS,
                format!(
                    "the server is at capacity: {} evaluations are running and {} are waiting (max_queued_evaluations)",
                    self.capacity, self.max_waiting
                ),
            ));
        }
        match tokio::time::timeout(self.max_wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Admitted { _permit: permit }),
            // The semaphore is never closed; treated as a full wait all the same.
            Ok(Err(_)) | Err(_) => {
                self.refused_wait.fetch_add(1, Ordering::Relaxed);
                Err(ApiError::capacity(
                    "max_queue_wait",
                    RETRY_AFTER_SECS,
                    format!(
                        "the server is at capacity: no evaluation slot came free within {} ms (max_queue_wait)",
                        self.max_wait.as_millis()
                    ),
                ))
            }
        }
    }

    fn in_use(&self) -> usize {
        self.capacity.saturating_sub(self.slots.available_permits())
    }
}

/// Request counts and latencies of one (method, route, status).
#[derive(Debug, Clone, Default)]
struct RouteStats {
    count: u64,
    seconds: f64,
    /// Cumulative per bucket of [`LATENCY_BUCKETS`], as Prometheus wants them.
    buckets: [u64; LATENCY_BUCKETS.len()],
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct RouteKey {
    method: &'static str,
    route: String,
    status: u16,
}

/// What the server counts itself; the rest of `/metrics` is read from the
/// runtime when scraped.
#[derive(Debug, Default)]
struct Metrics {
    requests: Mutex<BTreeMap<RouteKey, RouteStats>>,
    runs: AtomicU64,
    run_cpu_micros: AtomicU64,
    escalations: AtomicU64,
}

impl Metrics {
    fn record(&self, key: RouteKey, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let mut requests = self.requests.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let stats = requests.entry(key).or_default();
        stats.count += 1;
        stats.seconds += seconds;
        for (bucket, bound) in stats.buckets.iter_mut().zip(LATENCY_BUCKETS) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
    }

    fn snapshot(&self) -> BTreeMap<RouteKey, RouteStats> {
        self.requests.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

/// A method as a label: the standard ones by name, anything else as `OTHER`
/// (a client cannot grow the metrics by inventing methods).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// Wraps every route (and the fallback) in [`observe`].
pub(crate) fn instrument(router: Router<AppState>, state: &AppState) -> Router<AppState> {
    router.layer(axum::middleware::from_fn_with_state(state.clone(), observe))
}

/// One request: its span (method, matched route, sandbox), its timeout, and
/// its count and latency by route and status. Latency is to the head of the
/// answer (a stream's body is not waited for).
async fn observe(
    State(state): State<AppState>,
    matched: Option<MatchedPath>,
    params: Result<RawPathParams, RawPathParamsRejection>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let route = matched.as_ref().map_or(UNMATCHED_ROUTE, MatchedPath::as_str).to_string();
    let method = method_label(request.method());
    let sandbox = params.ok().and_then(|params| {
        route
            .starts_with("/v1/sandboxes/{name}")
            .then(|| params.iter().find(|(key, _)| *key == "name").map(|(_, v)| v.to_string()))?
    });
    let span = tracing::info_span!("request", method, route = %route, sandbox = tracing::field::Empty);
    if let Some(name) = &sandbox {
        span.record("sandbox", name.as_str());
    }
    let limit = state.ops().timeout_for(&route, request.headers());
    let response = async move {
        let Some((name, after)) = limit else { return next.run(request).await };
        match tokio::time::timeout(after, next.run(request)).await {
            Ok(response) => response,
            Err(_) => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                Code::Timeout,
                format!("the request took longer than the server's {name} of {} ms", after.as_millis()),
            )
            .with_limit(name)
            .into_response(),
        }
    }
    .instrument(span.clone())
    .await;
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    span.in_scope(|| tracing::debug!(status, elapsed_ms = elapsed.as_millis() as u64, "answered"));
    state.ops().metrics.record(RouteKey { method, route, status }, elapsed);
    response
}

/// Routes under `/v1`.
pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/usage", get(usage))
}

/// Routes at the root: health, readiness and metrics, where probes and
/// scrapers look for them.
pub(crate) fn root_routes() -> Router<AppState> {
    Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz)).route("/metrics", get(metrics))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Health {
    status: &'static str,
}

/// `GET /healthz`: the process is alive and answering. Open without a token.
async fn healthz() -> Json<Health> {
    Json(Health { status: "alive" })
}

/// One readiness check.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Check {
    ready: bool,
    detail: String,
}

impl Check {
    fn ok(detail: impl Into<String>) -> Self {
        Self { ready: true, detail: detail.into() }
    }
    fn failed(detail: impl Into<String>) -> Self {
        Self { ready: false, detail: detail.into() }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Readiness {
    ready: bool,
    /// The registry can be read.
    store: Check,
    /// The isolate engine has both interpreters loaded.
    isolates: Check,
    /// The Docker engine answers.
    containers: Check,
}

/// `GET /readyz`: `200` when the runtime can serve, else `503`; the body says
/// which check failed. Open without a token; says nothing about sandboxes.
async fn readyz(State(state): State<AppState>) -> Response {
    let store = match state.runtime().list() {
        Ok(_) => Check::ok("the registry answers"),
        Err(error) => {
            tracing::error!(%error, "readiness: the registry cannot be read");
            Check::failed("the registry cannot be read; the server's log says why")
        }
    };
    let isolates = async {
        for language in [Language::JavaScript, Language::Python] {
            match tokio::time::timeout(READY_CHECK_TIMEOUT, state.interpreters().guest(language)).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::error!(%error, "readiness: an interpreter is not available");
                    return Check::failed(format!("the {language} interpreter is not available"));
                }
                // The load goes on in the background; a later probe finds it done.
                Err(_) => return Check::failed(format!("the {language} interpreter is still loading")),
            }
        }
        Check::ok("the isolate engine has its interpreters loaded")
    };
    let containers = async {
        match tokio::time::timeout(READY_CHECK_TIMEOUT, DockerEngine::connect(&state.ops().options.docker_socket)).await
        {
            Ok(Ok(_)) => Check::ok("the docker engine answers"),
            Ok(Err(error)) => {
                tracing::warn!(%error, "readiness: the docker engine does not answer");
                Check::failed("the docker engine does not answer")
            }
            Err(_) => {
                Check::failed(format!("the docker engine did not answer within {} ms", READY_CHECK_TIMEOUT.as_millis()))
            }
        }
    };
    let (isolates, containers) = tokio::join!(isolates, containers);
    let mut ready = store.ready && isolates.ready && containers.ready;
    let mut store = store;
    if state.shutdown().is_cancelled() {
        ready = false;
        store.detail.push_str("; the server is shutting down");
    }
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(Readiness { ready, store, isolates, containers })).into_response()
}

/// `GET /v1/usage` query: which executions the report covers.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageParams {
    /// One sandbox by name; all when absent.
    sandbox: Option<String>,
    /// From this time (inclusive), Unix milliseconds.
    since_ms: Option<u64>,
    /// Until this time (exclusive), Unix milliseconds; now when absent.
    until_ms: Option<u64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct TotalsView {
    executions: u64,
    cpu_seconds: f64,
    wall_seconds: f64,
}

impl From<UsageTotals> for TotalsView {
    fn from(totals: UsageTotals) -> Self {
        Self {
            executions: totals.executions,
            cpu_seconds: totals.cpu_time.as_secs_f64(),
            wall_seconds: totals.wall_time.as_secs_f64(),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct UsageView {
    sandbox: Option<String>,
    since_ms: Option<u64>,
    until_ms: Option<u64>,
    total: TotalsView,
    isolate: TotalsView,
    container: TotalsView,
    cpu_seconds: f64,
    price_per_vcpu_second: f64,
    cost_usd: f64,
    egress: EgressView,
}

/// What the egress proxy allowed and refused in the window, and the bytes it moved.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct EgressView {
    allowed: u64,
    denied: u64,
    bytes_up: u64,
    bytes_down: u64,
}

impl From<airlock_runtime::EgressTotals> for EgressView {
    fn from(totals: airlock_runtime::EgressTotals) -> Self {
        Self { allowed: totals.allowed, denied: totals.denied, bytes_up: totals.bytes_up, bytes_down: totals.bytes_down }
    }
}

fn unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// `GET /v1/usage[?sandbox=&since_ms=&until_ms=]`: active-CPU usage of the
/// executions that started in the window, by tier, and its cost. A sandbox
/// the caller may not see is not found; without `sandbox`, an admin token
/// gets the whole ledger and a tenant's token the sum over its own sandboxes.
async fn usage(
    state: Scope,
    query: Result<Query<UsageParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<UsageView>, ApiError> {
    let Query(params) = query?;
    if let (Some(since), Some(until)) = (params.since_ms, params.until_ms)
        && since > until
    {
        return Err(ApiError::invalid("since_ms must not be after until_ms"));
    }
    let query = UsageQuery {
        sandbox: params.sandbox.clone(),
        since: params.since_ms.map(unix_ms),
        until: params.until_ms.map(unix_ms),
    };
    let runtime = state.runtime();
    let usage = match &params.sandbox {
        Some(name) => {
            // Another tenant's sandbox is answered as one that does not exist.
            state.sandbox(name)?;
            runtime.usage(&query)?
        }
        None if state.caller().is_admin() => runtime.usage(&query)?,
        None => {
            // Zero totals with the runtime's price: an empty window.
            let nothing = UsageQuery { sandbox: None, since: Some(UNIX_EPOCH), until: Some(UNIX_EPOCH) };
            let mut sum = runtime.usage(&nothing)?;
            for info in runtime.list()?.iter().filter(|info| state.sees(info)) {
                let one = runtime.usage(&UsageQuery { sandbox: Some(info.name.clone()), ..query.clone() })?;
                for (total, add) in
                    [(&mut sum.total, one.total), (&mut sum.isolate, one.isolate), (&mut sum.container, one.container)]
                {
                    total.executions += add.executions;
                    total.cpu_time += add.cpu_time;
                    total.wall_time += add.wall_time;
                }
                sum.egress.allowed += one.egress.allowed;
                sum.egress.denied += one.egress.denied;
                sum.egress.bytes_up += one.egress.bytes_up;
                sum.egress.bytes_down += one.egress.bytes_down;
            }
            sum.cpu_seconds = sum.total.cpu_time.as_secs_f64();
            sum.cost_usd = sum.cpu_seconds * sum.price_per_vcpu_second;
            sum
        }
    };
    Ok(Json(UsageView {
        sandbox: params.sandbox,
        since_ms: params.since_ms,
        until_ms: params.until_ms,
        total: usage.total.into(),
        isolate: usage.isolate.into(),
        container: usage.container.into(),
        cpu_seconds: usage.cpu_seconds,
        price_per_vcpu_second: usage.price_per_vcpu_second,
        cost_usd: usage.cost_usd,
        egress: usage.egress.into(),
    }))
}

/// Escapes a label value for the text format.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn tier_label(tier: TierKind) -> &'static str {
    match tier {
        TierKind::Container => "container",
        _ => "isolate",
    }
}

/// `GET /metrics`: Prometheus text. Requests and latency by route and
/// status; sandboxes by state and tier; executions and CPU-seconds by tier
/// (the usage ledger, over the home's life); one-shot runs; escalations; the
/// evaluation gate.
/// Admin-only: `401` without a live token, `403` with a tenant's.
async fn metrics(_admin: RequireAdmin, State(state): State<AppState>) -> Result<Response, ApiError> {
    let runtime = state.runtime();
    let sandboxes = runtime.list()?;
    let usage = runtime.usage(&UsageQuery::default())?;
    let ops = state.ops();
    let mut out = String::new();

    family(&mut out, "airlock_http_requests_total", "counter", "HTTP requests answered, by method, route and status.");
    let requests = ops.metrics.snapshot();
    for (key, stats) in &requests {
        let _ = writeln!(
            out,
            "airlock_http_requests_total{{method=\"{}\",route=\"{}\",status=\"{}\"}} {}",
            key.method,
            label(&key.route),
            key.status,
            stats.count
        );
    }
    family(
        &mut out,
        "airlock_http_request_duration_seconds",
        "histogram",
        "Time to the head of the answer, by method, route and status.",
    );
    for (key, stats) in &requests {
        let labels = format!("method=\"{}\",route=\"{}\",status=\"{}\"", key.method, label(&key.route), key.status);
        for (bound, count) in LATENCY_BUCKETS.iter().zip(stats.buckets) {
            let _ = writeln!(out, "airlock_http_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "airlock_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}", stats.count);
        let _ = writeln!(out, "airlock_http_request_duration_seconds_sum{{{labels}}} {}", stats.seconds);
        let _ = writeln!(out, "airlock_http_request_duration_seconds_count{{{labels}}} {}", stats.count);
    }

    family(
        &mut out,
        "airlock_sandboxes",
        "gauge",
        "Sandboxes by state and tier (container once a sandbox has escalated or has a container).",
    );
    let mut by_state_tier: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for state in ["active", "sleeping"] {
        for tier in ["isolate", "container"] {
            by_state_tier.insert((state, tier), 0);
        }
    }
    for sandbox in &sandboxes {
        let state = match sandbox.state {
            SandboxState::Sleeping => "sleeping",
            _ => "active",
        };
        let tier = if sandbox.escalated.is_some() || sandbox.container_id.is_some() { "container" } else { "isolate" };
        *by_state_tier.entry((state, tier)).or_default() += 1;
    }
    for ((state, tier), count) in by_state_tier {
        let _ = writeln!(out, "airlock_sandboxes{{state=\"{state}\",tier=\"{tier}\"}} {count}");
    }

    family(&mut out, "airlock_executions_total", "counter", "Executions in the usage ledger, by tier.");
    let tiers = [(TierKind::Isolate, usage.isolate), (TierKind::Container, usage.container)];
    for (tier, totals) in tiers {
        let _ = writeln!(out, "airlock_executions_total{{tier=\"{}\"}} {}", tier_label(tier), totals.executions);
    }
    family(&mut out, "airlock_cpu_seconds_total", "counter", "Active CPU-seconds in the usage ledger, by tier.");
    for (tier, totals) in tiers {
        let _ = writeln!(
            out,
            "airlock_cpu_seconds_total{{tier=\"{}\"}} {}",
            tier_label(tier),
            totals.cpu_time.as_secs_f64()
        );
    }
    family(
        &mut out,
        "airlock_egress_requests_total",
        "counter",
        "Requests and tunnels the egress proxy decided, by verdict (the ledger's).",
    );
    let _ = writeln!(out, "airlock_egress_requests_total{{verdict=\"allowed\"}} {}", usage.egress.allowed);
    let _ = writeln!(out, "airlock_egress_requests_total{{verdict=\"denied\"}} {}", usage.egress.denied);
    family(&mut out, "airlock_egress_bytes_total", "counter", "Bytes the egress proxy moved, by direction.");
    let _ = writeln!(out, "airlock_egress_bytes_total{{direction=\"up\"}} {}", usage.egress.bytes_up);
    let _ = writeln!(out, "airlock_egress_bytes_total{{direction=\"down\"}} {}", usage.egress.bytes_down);
    family(&mut out, "airlock_runs_total", "counter", "One-shot runs (POST /v1/run) since the server started.");
    let _ = writeln!(out, "airlock_runs_total {}", ops.metrics.runs.load(Ordering::Relaxed));
    family(
        &mut out,
        "airlock_run_cpu_seconds_total",
        "counter",
        "Active CPU-seconds of one-shot runs since the server started.",
    );
    let run_cpu = Duration::from_micros(ops.metrics.run_cpu_micros.load(Ordering::Relaxed));
    let _ = writeln!(out, "airlock_run_cpu_seconds_total {}", run_cpu.as_secs_f64());

    family(
        &mut out,
        "airlock_escalations_total",
        "counter",
        "Code answers that escalated from an isolate to the container since the server started.",
    );
    let _ = writeln!(out, "airlock_escalations_total {}", ops.metrics.escalations.load(Ordering::Relaxed));
    family(&mut out, "airlock_sandboxes_escalated", "gauge", "Sandboxes that have moved to the container tier.");
    let escalated = sandboxes.iter().filter(|s| s.escalated.is_some()).count();
    let _ = writeln!(out, "airlock_sandboxes_escalated {escalated}");

    let admission = &ops.admission;
    family(&mut out, "airlock_evaluation_slots", "gauge", "Evaluation slots (max_concurrent_evaluations).");
    let _ = writeln!(out, "airlock_evaluation_slots {}", admission.capacity);
    family(&mut out, "airlock_evaluations_running", "gauge", "Evaluations holding a slot now.");
    let _ = writeln!(out, "airlock_evaluations_running {}", admission.in_use());
    family(&mut out, "airlock_evaluations_waiting", "gauge", "Evaluations waiting for a slot now.");
    let _ = writeln!(out, "airlock_evaluations_waiting {}", admission.waiting.load(Ordering::SeqCst));
    family(
        &mut out,
        "airlock_evaluations_refused_total",
        "counter",
        "Evaluations refused for capacity, by the limit reached.",
    );
    let refused = [("max_queued_evaluations", &admission.refused_full), ("max_queue_wait", &admission.refused_wait)];
    for (limit, count) in refused {
        let _ =
            writeln!(out, "airlock_evaluations_refused_total{{limit=\"{limit}\"}} {}", count.load(Ordering::Relaxed));
    }

    let mut response = out.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(PROMETHEUS_TEXT));
    Ok(response)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn limit_of(error: &ApiError) -> &'static str {
        assert_eq!(error.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(error.code, Code::Capacity);
        assert_eq!(error.retry_after, Some(RETRY_AFTER_SECS));
        error.limit.unwrap()
    }

    #[tokio::test]
    async fn past_the_slots_requests_queue_then_are_refused_naming_the_limit() {
        let admission = std::sync::Arc::new(Admission::new(1, 1, Duration::from_millis(200)));
        let held = admission.admit().await.unwrap();
        assert_eq!(admission.in_use(), 1);

        // One waits in the queue; the next finds the queue full at once.
        let waiter = tokio::spawn({
            let admission = admission.clone();
            async move { admission.admit().await.map(drop) }
        });
        while admission.waiting.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let full = admission.admit().await.unwrap_err();
        assert_eq!(limit_of(&full), "max_queued_evaluations");

        // The waiter gives up after max_wait, the slot still held.
        let waited = waiter.await.unwrap().unwrap_err();
        assert_eq!(limit_of(&waited), "max_queue_wait");
        assert_eq!(admission.waiting.load(Ordering::SeqCst), 0);

        // A freed slot is taken by the next waiter.
        let next = tokio::spawn({
            let admission = admission.clone();
            async move { admission.admit().await.map(drop) }
        });
        while admission.waiting.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        drop(held);
        next.await.unwrap().unwrap();
        assert_eq!(admission.in_use(), 0);
    }

    #[test]
    fn timeouts_skip_streams_websockets_and_transfers() {
        let ops = Ops::new(ServerOptions::default());
        let plain = HeaderMap::new();
        let mut events = HeaderMap::new();
        events.insert(header::ACCEPT, HeaderValue::from_static("text/event-stream"));
        let mut upgrade = HeaderMap::new();
        upgrade.insert(header::UPGRADE, HeaderValue::from_static("websocket"));

        assert_eq!(ops.timeout_for("/v1/run", &plain).unwrap().0, "execution_timeout");
        assert_eq!(ops.timeout_for("/v1/sandboxes/{name}/exec", &plain).unwrap().0, "execution_timeout");
        assert_eq!(ops.timeout_for("/v1/sandboxes/{name}", &plain).unwrap().0, "request_timeout");
        assert_eq!(ops.timeout_for("/v1/usage", &plain).unwrap().0, "request_timeout");
        assert!(ops.timeout_for("/v1/sandboxes/{name}/exec", &events).is_none());
        assert!(ops.timeout_for("/v1/sandboxes/{name}/pty", &upgrade).is_none());
        assert!(ops.timeout_for("/v1/sandboxes/{name}/files/{*path}", &plain).is_none());
        assert!(ops.timeout_for("/v1/sandboxes/{name}/events", &plain).is_none());
        assert!(ops.timeout_for("/v1/sandboxes/{name}/processes/{id}/logs", &plain).is_none());
        assert!(ops.timeout_for("/readyz", &plain).is_none());
        assert!(ops.timeout_for("/preview/{sandbox}/{port}/{token}/{*rest}", &plain).is_none());
        assert_eq!(ops.timeout_for("/metrics", &plain).unwrap().0, "request_timeout");
    }

    /// Collects the fields of every `request` span.
    #[derive(Default, Clone)]
    struct Spans(std::sync::Arc<Mutex<Vec<BTreeMap<String, String>>>>);

    struct Fields<'a>(&'a mut BTreeMap<String, String>);

    impl tracing::field::Visit for Fields<'_> {
        fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
            self.0.insert(field.name().to_string(), value.to_string());
        }
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            self.0.insert(field.name().to_string(), format!("{value:?}"));
        }
    }

    impl tracing::Subscriber for Spans {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, attributes: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            let mut spans = self.0.lock().unwrap();
            let mut fields = BTreeMap::from([("span".to_string(), attributes.metadata().name().to_string())]);
            attributes.record(&mut Fields(&mut fields));
            spans.push(fields);
            tracing::span::Id::from_u64(spans.len() as u64)
        }
        fn record(&self, span: &tracing::span::Id, values: &tracing::span::Record<'_>) {
            let mut spans = self.0.lock().unwrap();
            let index = usize::try_from(span.into_u64()).unwrap() - 1;
            values.record(&mut Fields(&mut spans[index]));
        }
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, _: &tracing::Event<'_>) {}
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    #[tokio::test]
    async fn each_request_runs_in_a_span_with_its_method_route_and_sandbox() {
        use tower::ServiceExt as _;
        let home = tempfile::tempdir().unwrap();
        let mut options = airlock_runtime::RuntimeOptions::new(home.path());
        options.disk = airlock_runtime::DiskOptions { quotas: airlock_runtime::QuotaMode::Off, ..Default::default() };
        options.reconcile = false;
        let runtime = airlock_runtime::Runtime::open(options).await.unwrap();
        runtime.sandbox("spanned").await.unwrap();
        let token = runtime.tokens().create("spans", true).unwrap();
        let app = crate::app(AppState::new(runtime));

        let spans = Spans::default();
        // This test's runtime polls on this thread only, where the subscriber is.
        let _default = tracing::subscriber::set_default(spans.clone());
        let request = axum::http::Request::get("/v1/sandboxes/spanned")
            .header("authorization", format!("Bearer {}", token.secret()))
            .body(axum::body::Body::empty())
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let request = axum::http::Request::get("/healthz").body(axum::body::Body::empty()).unwrap();
        assert_eq!(app.oneshot(request).await.unwrap().status(), StatusCode::OK);

        let spans = spans.0.lock().unwrap();
        let requests: Vec<_> = spans.iter().filter(|fields| fields["span"] == "request").collect();
        assert_eq!(requests.len(), 2, "{spans:?}");
        assert_eq!(requests[0]["method"], "GET");
        assert_eq!(requests[0]["route"], "/v1/sandboxes/{name}");
        assert_eq!(requests[0]["sandbox"], "spanned");
        assert_eq!(requests[1]["route"], "/healthz");
        assert!(!requests[1].contains_key("sandbox"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
