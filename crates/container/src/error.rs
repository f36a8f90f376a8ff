//! The container tier's typed errors.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why the container tier could not do what was asked. A command that ran and
/// failed is not an error: it is an [`ExecOutcome`](airlock_core::ExecOutcome).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The Docker engine is not there and cannot be set up from here; the
    /// message names exactly what is missing.
    #[error("the docker engine is not available: {0}")]
    EngineUnavailable(String),
    /// Installing or starting what the engine needs failed.
    #[error("setting up the docker engine failed: {0}")]
    Setup(String),
    /// The engine refused or failed a request.
    #[error("docker {operation}: {source}")]
    Docker {
        operation: &'static str,
        #[source]
        source: bollard::errors::Error,
    },
    /// Building the base image failed.
    #[error("building image {image}: {reason}")]
    ImageBuild { image: String, reason: String },
    /// A stage of the base image build failed. The build's full log is kept
    /// in `log`; `tail` holds its last lines.
    #[error("building image {image} failed in stage \"{stage}\": {reason}; full log: {}; its last lines:\n{tail}", .log.display())]
    ImageBuildStage { image: String, stage: crate::BuildStage, reason: String, log: PathBuf, tail: String },
    /// A sandbox asked for an image that is not in the local engine (there is no registry).
    #[error("image {0} is not in the local docker engine (Airlock never pulls; build or load it first)")]
    NoSuchImage(String),
    /// The runtime (`runc` or `runsc`) is not registered with the engine.
    #[error("container runtime {0} is not registered with the docker engine")]
    RuntimeUnavailable(String),
    /// A value given to the tier is out of range or malformed.
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    /// A resource limit value is out of its range.
    #[error(transparent)]
    Limits(#[from] airlock_core::LimitsError),
    /// The workspace directory cannot be used.
    #[error("workspace {path}: {reason}")]
    Workspace { path: PathBuf, reason: String },
    /// The container is not running (stopped, paused, or removed).
    #[error("container {0} is not running")]
    NotRunning(String),
    /// No background process or exec with this id.
    #[error("no process {0} in this sandbox")]
    NoSuchProcess(String),
    /// Stdin of a background process that was started without an open stdin,
    /// was closed, or whose process has ended.
    #[error("the stdin of process {0} is not open")]
    StdinClosed(String),
    /// Opening a stream to a port inside the container failed.
    #[error("port {port}: {reason}")]
    Port { port: u16, reason: String },
    /// The in-container agent could not be reached or broke the protocol.
    #[error("sandbox agent: {0}")]
    Agent(String),
    /// A code kernel (a persistent interpreter in the container) could not start.
    #[error("code kernel: {0}")]
    Kernel(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn docker(operation: &'static str) -> impl FnOnce(bollard::errors::Error) -> Error {
        move |source| Error::Docker { operation, source }
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    /// Whether the engine refused because of a conflict (such as a container
    /// name already taken).
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            Error::Docker { source: bollard::errors::Error::DockerResponseServerError { status_code: 409, .. }, .. }
        )
    }

    /// Whether the engine said the container or exec does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Error::Docker { source: bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }, .. }
        )
    }
}

impl From<Error> for airlock_core::Error {
    fn from(error: Error) -> Self {
        match error {
            Error::Limits(limits) => airlock_core::Error::InvalidLimits(limits),
            Error::Workspace { path, reason } => airlock_core::Error::Workspace { path, reason },
            other => airlock_core::Error::Engine(other.to_string()),
        }
    }
}
