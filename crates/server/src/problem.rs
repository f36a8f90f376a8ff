//! Errors as `application/problem+json` (RFC 9457), with stable codes.
//!
//! Every error a handler returns is an [`ApiError`]: a status, a code from
//! the fixed list in [`Code`] that clients can match on, and a human detail.
//! The runtime's typed errors are mapped here, and only here. What reaches
//! the client never carries a host path or an internal message: errors that
//! are the server's own fault are logged and answered with a fixed text.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// A problem's stable, machine-readable code (the `code` member; the `type`
/// member is `urn:airlock:problem:<code>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Code {
    /// The request is malformed: bad JSON, an unknown field, a value out of range.
    InvalidRequest,
    /// A sandbox name that is not a valid name.
    InvalidName,
    /// No valid bearer token: none, or one that is malformed, unknown or
    /// revoked (`401`, with `WWW-Authenticate: Bearer`).
    Unauthorized,
    /// A valid token without the rights the route needs (an admin route).
    Forbidden,
    /// No such sandbox, context, file or route.
    NotFound,
    /// The route exists, not with this method.
    MethodNotAllowed,
    /// The target exists already, or is of the wrong kind (a directory, not a file).
    Conflict,
    /// A workspace path that leaves the workspace, goes through a link, or
    /// names something other than a file or directory.
    PathRefused,
    /// A per-sandbox limit (contexts, processes, terminals) is reached; the
    /// `limit` member names it (the `SandboxConfig` field).
    Limit,
    /// The server is at capacity (its evaluation queue is full, a request
    /// waited in it too long, or the isolate engine's slots are taken); the
    /// `limit` member names which, and `Retry-After` says when to try again.
    Capacity,
    /// The sandbox's disk quota is used up.
    DiskQuota,
    /// A request body, or a file, is larger than its limit.
    TooLarge,
    /// A body of a media type the route does not take.
    UnsupportedMediaType,
    /// A `Range` that the file cannot satisfy.
    RangeNotSatisfiable,
    /// The request needs a tier the sandbox is not allowed to use.
    TierNotAllowed,
    /// Something the request needs (the container engine, an interpreter) is not available now.
    Unavailable,
    /// An operation ran past its time limit.
    Timeout,
    /// The server is shutting down; the operation was cancelled.
    ShuttingDown,
    /// A network policy that is refused (`422`): not a valid policy, or it
    /// names a secret the runtime does not hold. Nothing was changed.
    InvalidPolicy,
    /// The server's own fault; details are in its log, not in the answer.
    Internal,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::InvalidRequest => "invalid-request",
            Code::InvalidName => "invalid-name",
            Code::Unauthorized => "unauthorized",
            Code::Forbidden => "forbidden",
            Code::NotFound => "not-found",
            Code::MethodNotAllowed => "method-not-allowed",
            Code::Conflict => "conflict",
            Code::PathRefused => "path-refused",
            Code::Limit => "limit",
            Code::Capacity => "capacity",
            Code::DiskQuota => "disk-quota",
            Code::TooLarge => "too-large",
            Code::UnsupportedMediaType => "unsupported-media-type",
            Code::RangeNotSatisfiable => "range-not-satisfiable",
            Code::TierNotAllowed => "tier-not-allowed",
            Code::Unavailable => "unavailable",
            Code::Timeout => "timeout",
            Code::ShuttingDown => "shutting-down",
            Code::InvalidPolicy => "invalid-policy",
            Code::Internal => "internal",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Code::InvalidRequest => "invalid request",
            Code::InvalidName => "invalid sandbox name",
            Code::Unauthorized => "unauthorized",
            Code::Forbidden => "forbidden",
            Code::NotFound => "not found",
            Code::MethodNotAllowed => "method not allowed",
            Code::Conflict => "conflict",
            Code::PathRefused => "path refused",
            Code::Limit => "limit reached",
            Code::Capacity => "at capacity",
            Code::DiskQuota => "disk quota exceeded",
            Code::TooLarge => "too large",
            Code::UnsupportedMediaType => "unsupported media type",
            Code::RangeNotSatisfiable => "range not satisfiable",
            Code::TierNotAllowed => "tier not allowed",
            Code::Unavailable => "unavailable",
            Code::Timeout => "timed out",
            Code::ShuttingDown => "shutting down",
            Code::InvalidPolicy => "invalid network policy",
            Code::Internal => "internal error",
        }
    }
}

/// What the body of an error says.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: &'static str,
    pub status: u16,
    pub code: &'static str,
    pub detail: String,
    /// For `limit`, `capacity` and `timeout` problems: the name of the limit
    /// that was reached (a configuration field or constant), stable for clients.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<&'static str>,
}

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: Code,
    pub detail: String,
    /// Extra header for 416 answers: `Content-Range: bytes */<size>`.
    pub content_range: Option<String>,
    /// The limit reached, for the body's `limit` member.
    pub limit: Option<&'static str>,
    /// Extra header for capacity answers: `Retry-After: <seconds>`.
    pub retry_after: Option<u64>,
}

/// The isolate engine's limit a pool-exhaustion answer names: the
/// `EngineConfig` field that sizes the engine's pool of instance slots.
pub const ENGINE_CAPACITY_LIMIT: &str = "max_concurrent_runs";
/// `Retry-After` of an answer refused because the engine's pool was full:
/// slots free as runs end, and most runs take well under a second.
pub const ENGINE_CAPACITY_RETRY_AFTER_SECS: u64 = 1;

/// Whether an engine error's text says its pool of instance slots (instances,
/// memories, tables, fiber stacks) was full. Wasmtime reports this only as
/// text ("maximum concurrent limit of N for K reached"), through the
/// interpreter's or the guest's error, so the text is matched here, once.
pub(crate) fn is_engine_capacity(text: &str) -> bool {
    text.contains("maximum concurrent limit of")
}

/// The text an answer carries for errors that are the server's own.
const INTERNAL_DETAIL: &str = "the server could not complete the request; its log says why";

impl ApiError {
    pub fn new(status: StatusCode, code: Code, detail: impl Into<String>) -> Self {
        Self { status, code, detail: detail.into(), content_range: None, limit: None, retry_after: None }
    }

    /// The same error, naming the limit that was reached.
    pub fn with_limit(mut self, limit: &'static str) -> Self {
        self.limit = Some(limit);
        self
    }

    /// `503` with `Retry-After`: the server is at capacity for now.
    pub fn capacity(limit: &'static str, retry_after_secs: u64, detail: impl Into<String>) -> Self {
        let refusal = Self::new(StatusCode::SERVICE_UNAVAILABLE, Code::Capacity, detail);
        Self { retry_after: Some(retry_after_secs), ..refusal }.with_limit(limit)
    }

    /// The isolate engine's pool had no free slot: `503` naming the engine's limit.
    fn engine_capacity() -> Self {
        Self::capacity(
            ENGINE_CAPACITY_LIMIT,
            ENGINE_CAPACITY_RETRY_AFTER_SECS,
            "every slot of the isolate engine is in use; try again shortly",
        )
    }

    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, Code::InvalidRequest, detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, Code::NotFound, detail)
    }

    pub fn no_sandbox(name: &str) -> Self {
        Self::not_found(format!("no sandbox named {name:?}"))
    }

    /// The server's own fault: logged here, answered with a fixed text.
    pub fn internal(error: &dyn std::fmt::Display) -> Self {
        tracing::error!(%error, "request failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, Code::Internal, INTERNAL_DETAIL)
    }

    pub fn problem(&self) -> Problem {
        Problem {
            kind: format!("urn:airlock:problem:{}", self.code.as_str()),
            title: self.code.title(),
            status: self.status.as_u16(),
            code: self.code.as_str(),
            detail: self.detail.clone(),
            limit: self.limit,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(range) = self.content_range.and_then(|r| HeaderValue::from_str(&r).ok()) {
            headers.insert(header::CONTENT_RANGE, range);
        }
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let code = match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => Code::TooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Code::UnsupportedMediaType,
            _ => Code::InvalidRequest,
        };
        // serde's messages name fields and positions in the body, nothing of the host.
        let status = if code == Code::InvalidRequest { StatusCode::BAD_REQUEST } else { rejection.status() };
        Self::new(status, code, rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::invalid(rejection.body_text())
    }
}

impl From<airlock_runtime::Error> for ApiError {
    fn from(error: airlock_runtime::Error) -> Self {
        use airlock_runtime::Error as E;
        match error {
            E::InvalidName(name) => Self::new(StatusCode::BAD_REQUEST, Code::InvalidName, name.to_string()),
            E::NoSuchSandbox(name) => Self::no_sandbox(&name),
            E::TierNotAllowed { .. } => Self::new(StatusCode::CONFLICT, Code::TierNotAllowed, error.to_string()),
            // The path is the client's own, relative to the workspace.
            E::Path { .. } => Self::new(StatusCode::BAD_REQUEST, Code::PathRefused, error.to_string()),
            E::Fs(fs) => from_fs(fs),
            E::DiskQuota { .. } => Self::new(StatusCode::INSUFFICIENT_STORAGE, Code::DiskQuota, error.to_string()),
            E::FileTimeout { operation, .. } => Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                Code::Timeout,
                format!("the {operation} took longer than the file operation time limit"),
            ),
            E::Upload { .. } => Self::invalid("the request body could not be read to its end; nothing was written"),
            E::Invalid { .. } => Self::invalid(error.to_string()),
            E::SandboxLimit { limit, .. } => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, Code::Limit, error.to_string()).with_limit(limit)
            }
            // Neither names a host path: the rule, or the secret's name.
            E::Policy(_) | E::NoSuchSecret(_) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, Code::InvalidPolicy, error.to_string())
            }
            E::SecretInUse { .. } => Self::new(StatusCode::CONFLICT, Code::Conflict, error.to_string()),
            E::Core(core) => from_core(core),
            E::Container(container) => from_container(container),
            // The registry, the home's disk, host file errors: they name host paths.
            other => Self::internal(&other),
        }
    }
}

fn from_fs(error: airlock_core::FsError) -> ApiError {
    use airlock_core::FsError as F;
    match error {
        F::NotFound { .. } => ApiError::not_found(error.to_string()),
        F::NotADirectory { .. } | F::IsADirectory { .. } | F::Exists { .. } => {
            ApiError::new(StatusCode::CONFLICT, Code::Conflict, error.to_string())
        }
        F::InvalidPath { .. } | F::Symlink { .. } | F::Escape { .. } | F::SpecialFile { .. } => {
            ApiError::new(StatusCode::BAD_REQUEST, Code::PathRefused, error.to_string())
        }
        F::NoSpace { .. } => ApiError::new(StatusCode::INSUFFICIENT_STORAGE, Code::DiskQuota, error.to_string()),
        F::TooLarge { .. } | F::Limit { .. } => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, Code::TooLarge, error.to_string())
        }
        other => ApiError::internal(&other),
    }
}

fn from_core(error: airlock_core::Error) -> ApiError {
    use airlock_core::Error as C;
    match error {
        C::InvalidName(name) => ApiError::new(StatusCode::BAD_REQUEST, Code::InvalidName, name.to_string()),
        C::InvalidLimits(limits) => ApiError::invalid(format!("invalid limits: {limits}")),
        C::NoSuchContext(id) => ApiError::not_found(format!("no context {id:?} in this sandbox")),
        C::Engine(ref text) if is_engine_capacity(text) => ApiError::engine_capacity(),
        C::InterpreterUnavailable { ref reason, .. } if is_engine_capacity(reason) => ApiError::engine_capacity(),
        C::InterpreterUnavailable { language, .. } => {
            tracing::error!(error = %error, "interpreter unavailable");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
                format!("the {language} interpreter is not available on this server"),
            )
        }
        C::Unsupported { .. } => ApiError::invalid(error.to_string()),
        other => ApiError::internal(&other),
    }
}

fn from_container(error: airlock_container::Error) -> ApiError {
    use airlock_container::Error as C;
    match error {
        C::EngineUnavailable(_) | C::RuntimeUnavailable(_) | C::NoSuchImage(_) | C::NotRunning(_) => {
            tracing::error!(%error, "container tier unavailable");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
                "the container tier is not available on this server now",
            )
        }
        C::NoSuchProcess(id) => ApiError::not_found(format!("no process {id:?} in this sandbox")),
        C::StdinClosed(id) => {
            ApiError::new(StatusCode::CONFLICT, Code::Conflict, format!("the stdin of process {id:?} is not open"))
        }
        C::Invalid { .. } | C::Limits(_) => ApiError::invalid(error.to_string()),
        other => ApiError::internal(&other),
    }
}

impl From<airlock_core::Error> for ApiError {
    fn from(error: airlock_core::Error) -> Self {
        from_core(error)
    }
}
