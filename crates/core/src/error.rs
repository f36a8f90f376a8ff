//! The typed errors that cross Airlock's crate boundaries.
//!
//! These are host-side failures: the request could not be carried out. A guest
//! that ran and then failed, trapped or hit a limit is not an error: it is an
//! [`ExecOutcome`](crate::ExecOutcome) whose [`Termination`](crate::Termination) says so.

use std::path::PathBuf;

use crate::{LimitsError, NameError};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid sandbox name: {0}")]
    InvalidName(#[from] NameError),
    #[error("invalid limits: {0}")]
    InvalidLimits(#[from] LimitsError),
    #[error("workspace {path}: {reason}")]
    Workspace { path: PathBuf, reason: String },
    #[error("guest {path}: {reason}")]
    Guest { path: PathBuf, reason: String },
    #[error("guest cache {path}: {reason}")]
    Cache { path: PathBuf, reason: String },
    #[error("engine: {0}")]
    Engine(String),
    #[error("no context {0} (it was deleted, or never created)")]
    NoSuchContext(String),
    #[error("the {language} interpreter is not available: {reason}")]
    InterpreterUnavailable { language: crate::Language, reason: String },
    #[error("{what} is not supported by the {tier} tier")]
    Unsupported { tier: crate::TierKind, what: String },
}
