//! The isolate tier: guests run in Wasmtime, one engine per process.
//!
//! ```no_run
//! # async fn example() -> Result<(), airlock_core::Error> {
//! use airlock_core::{ExecRequest, Workspace};
//! use airlock_wasm::{EngineConfig, IsolateEngine};
//!
//! let engine = IsolateEngine::new(EngineConfig::default())?;
//! let guest = engine.load_file("hello.wasm")?;
//! let workspace = Workspace::create("/tmp/my-sandbox")?;
//! let outcome = engine.run(&guest, &workspace, &ExecRequest::new("hello").args(["world"])).await?;
//! println!("{}", outcome.stdout_text());
//! # Ok(()) }
//! ```

mod cache;
mod engine;
mod guest;
mod host;
pub mod interpreter;
mod lru;
mod metering;
mod outbound;
mod output;
mod run;
mod tier;

pub use engine::{
    DEFAULT_COMPILE_TIMEOUT, DEFAULT_MAX_CACHE_BYTES, DEFAULT_MAX_CONCURRENT_COMPILES, DEFAULT_MAX_CONCURRENT_RUNS,
    DEFAULT_MAX_LOADED_GUESTS, EPOCH_TICK, EngineConfig, IsolateEngine, MAX_GUEST_BYTES, MAX_WORKSPACE_GUEST_BYTES,
    WASM_STACK_BYTES, default_cache_dir,
};
pub use guest::{Guest, GuestOrigin};
pub use outbound::{
    DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_REQUEST_TIME, Outbound, OutboundBody, OutboundBodyError,
    OutboundFuture, OutboundHttp, OutboundLimits, OutboundRefused,
};
pub use tier::IsolateTier;
