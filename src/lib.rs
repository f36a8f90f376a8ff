//! Airlock: run untrusted code in WebAssembly isolates first, containers when a
//! task needs a real Linux.
//!
//! This crate is the facade a host application depends on. Today it offers the
//! isolate tier and the container tier ([`container`]); the `Runtime`
//! (sandboxes by name, the router) arrives behind the same names.
//!
//! ```no_run
//! # async fn example() -> Result<(), airlock::Error> {
//! use airlock::{EngineConfig, ExecRequest, IsolateEngine, Limits, Workspace};
//! use std::time::Duration;
//!
//! let engine = IsolateEngine::new(EngineConfig::default())?;
//! let guest = engine.load_file("guests/out/hello.wasm")?;
//! let workspace = Workspace::create("/tmp/demo-workspace")?;
//! let request = ExecRequest::new("hello")
//!     .args(["from", "Rust"])
//!     .limits(Limits { deadline: Duration::from_secs(2), ..Limits::default() });
//! let outcome = engine.run(&guest, &workspace, &request).await?;
//! assert!(outcome.success());
//! print!("{}", outcome.stdout_text());
//! # Ok(()) }
//! ```

pub use airlock_core::{
    BoxFuture, CodeError, DisplayOutput, EscalationReason, EvalOutcome, EvalResult, EvalValue, Language, Error, ExecOutcome, ExecRequest, Limit, LimitExceeded, Limits, LimitsError, NameError, Needs, OutputChunk, SideEffect,
    OutputSender, OutputStream, Result, SandboxId, SandboxName, StdinSource, Termination, Tier, TierKind,
    WORKSPACE_GUEST_PATH, Workspace, limits,
};
pub use airlock_wasm::{EngineConfig, Guest, GuestOrigin, IsolateEngine, IsolateTier};

/// The isolate tier's full API.
pub mod wasm {
    pub use airlock_wasm::*;
}

/// The runtime: sandboxes by name, the router, lifecycle, persistence, metering.
pub mod runtime {
    pub use airlock_runtime::*;
}

pub use airlock_runtime::{CodeOutcome, Placement, RunOutcome, Runtime, RuntimeOptions, Sandbox, SandboxConfig};

/// The container tier's full API.
pub mod container {
    pub use airlock_container::*;
}
