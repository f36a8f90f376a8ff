//! The seam the router routes across: each tier runs an [`ExecRequest`] against a
//! sandbox's [`Workspace`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::{ExecOutcome, ExecRequest, Result, Workspace};

/// A boxed, sendable future, so that tiers can sit behind `dyn Tier`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Which tier ran something.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum TierKind {
    /// A WebAssembly isolate.
    Isolate,
    /// A Linux container.
    Container,
}

impl fmt::Display for TierKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TierKind::Isolate => "isolate",
            TierKind::Container => "container",
        })
    }
}

/// A place code can run. Implementations hold their own engine or client; the
/// workspace and the request come with each call.
///
/// The returned future is the run: dropping it cancels the run and releases
/// everything it held.
pub trait Tier: Send + Sync {
    fn kind(&self) -> TierKind;

    /// Runs `request` with `workspace` as the guest's only filesystem.
    /// `Err` means the run could not be carried out; a guest that ran and failed
    /// is an `Ok` outcome whose termination says how.
    fn exec<'a>(&'a self, workspace: &'a Workspace, request: ExecRequest) -> BoxFuture<'a, Result<ExecOutcome>>;
}
