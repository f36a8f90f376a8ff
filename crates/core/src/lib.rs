//! Airlock's shared vocabulary.
//!
//! Every tier speaks these types: sandbox names and ids, the workspace a sandbox
//! owns, exec requests and their outcomes, the limits that bound a run, the typed
//! errors that cross crate boundaries, and the [`Tier`] trait the router routes
//! across.

pub mod confined;
mod error;
mod eval;
mod exec;
pub mod limits;
mod names;
mod needs;
pub mod network;
mod tier;
mod workspace;

pub use confined::{Entry, EntryKind, FileWriter, FsError, Owner, WorkspaceDir};
pub use error::{Error, Result};
pub use eval::{
    CodeError, DisplayOutput, EscalationReason, EvalOutcome, EvalResult, EvalValue, Language,
    MAX_DISPLAY_BYTES_PER_EVALUATION, MAX_DISPLAYS_PER_EVALUATION, MAX_SIDE_EFFECTS_PER_EVALUATION, SideEffect,
    UnknownLanguage,
};
pub use exec::{ExecOutcome, ExecRequest, OutputChunk, OutputSender, OutputStream, StdinSource, Termination};
pub use limits::{Limit, LimitExceeded, Limits, LimitsError};
pub use names::{MAX_NAME_LEN, NameError, SandboxId, SandboxName};
pub use needs::Needs;
pub use network::{DenyReason, HeaderRule, HostPattern, HostRule, NetworkPolicy, PolicyError, Verdict};
pub use tier::{BoxFuture, Tier, TierKind};
pub use workspace::{WORKSPACE_GUEST_PATH, Workspace};
