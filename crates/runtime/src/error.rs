//! The runtime's typed errors.

use std::path::PathBuf;

use airlock_core::{NameError, TierKind};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why the runtime could not do what was asked. Code or a command that ran and
/// failed is not an error: it is an outcome.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid sandbox name: {0}")]
    InvalidName(#[from] NameError),
    #[error("no sandbox named {0}")]
    NoSuchSandbox(String),
    /// The registry (SQLite) failed.
    #[error("registry {path}: {reason}")]
    Store { path: PathBuf, reason: String },
    /// The isolate tier failed (or a core-level check).
    #[error(transparent)]
    Core(#[from] airlock_core::Error),
    /// The container tier failed.
    #[error(transparent)]
    Container(#[from] airlock_container::Error),
    /// The request needs a tier the sandbox's preference rules out.
    #[error("{what} needs the {needed} tier, and this sandbox is limited to the {allowed} tier")]
    TierNotAllowed { what: String, needed: TierKind, allowed: TierKind },
    /// A path given to a file operation leaves the workspace or is malformed.
    #[error("path {path:?}: {reason}")]
    Path { path: String, reason: String },
    /// A file operation failed on the host.
    #[error("{operation} {path:?}: {source}")]
    File {
        operation: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A confined file operation was refused or failed (see the variant).
    #[error(transparent)]
    Fs(airlock_core::FsError),
    /// A write from the host needed more space than the sandbox's disk quota left.
    #[error("writing {path:?} needs more space than the sandbox's disk quota of {quota} leaves")]
    DiskQuota { path: String, quota: String },
    /// A file operation ran past its time limit.
    #[error("{operation} {path:?} took longer than {after:?} (the file operation time limit)")]
    FileTimeout { operation: &'static str, path: String, after: std::time::Duration },
    /// The bytes of an upload could not be read from their source; the old
    /// file, if any, is unchanged.
    #[error("upload of {path:?} stopped: {source}")]
    Upload {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A value is out of range; the message names the limit.
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    /// The home's disk (its image, mount or quotas) could not be set up or used.
    #[error("disk: {0}")]
    Disk(String),
    /// A per-sandbox limit is reached (`limit` is its `SandboxConfig` field):
    /// nothing was started, and what the sandbox already has is untouched.
    #[error("sandbox limit {limit} reached: {held} of {max} {what} in use")]
    SandboxLimit { limit: &'static str, what: &'static str, held: usize, max: usize },
    /// A network policy was refused (nothing was applied); the message names
    /// the rule and the reason.
    #[error("invalid network policy: {0}")]
    Policy(#[from] airlock_core::PolicyError),
    /// A secret was named (by a policy, or to remove it) that the runtime's
    /// secret store does not hold.
    #[error("no secret named {0:?}")]
    NoSuchSecret(String),
    /// A secret cannot be removed while a sandbox's network policy refers to it.
    #[error("secret {name:?} is used by the network policy of {}; change those policies first", .sandboxes.join(", "))]
    SecretInUse { name: String, sandboxes: Vec<String> },
    /// The egress proxy could not be set up (its CA, its configuration, a
    /// sandbox's socket).
    #[error("egress: {0}")]
    Egress(String),
    /// No snapshot has this id (or the caller may not see it).
    #[error("no snapshot {0}")]
    NoSuchSnapshot(String),
    /// Snapshots cannot be taken or used in this runtime (its home's
    /// sandboxes are not on the btrfs disk); the reason may name host paths.
    #[error("snapshots are not available: {0}")]
    SnapshotsUnavailable(String),
    /// A snapshot failed its verification: nothing was restored or forked.
    #[error("snapshot {id} is damaged and was not used: {reason}")]
    SnapshotDamaged { id: String, reason: String },
    /// Another process owns the home (`holder` says which, from its lock file).
    #[error("the home {home} is in use by {holder}; one process owns a home at a time (use its API, or wait)")]
    HomeInUse { home: PathBuf, holder: String },
}

/// Paths that leave the workspace, are malformed, or go through a link are
/// [`Error::Path`]; everything else the confined layer says is [`Error::Fs`].
impl From<airlock_core::FsError> for Error {
    fn from(error: airlock_core::FsError) -> Self {
        use airlock_core::FsError;
        match error {
            FsError::InvalidPath { path, reason } => Error::Path { path, reason: reason.to_string() },
            FsError::Symlink { ref path } | FsError::Escape { ref path } => {
                Error::Path { path: path.clone(), reason: error.to_string() }
            }
            other => Error::Fs(other),
        }
    }
}

impl Error {
    pub(crate) fn store(path: &std::path::Path) -> impl FnOnce(rusqlite::Error) -> Error + '_ {
        move |error| Error::Store { path: path.to_path_buf(), reason: error.to_string() }
    }
}
