//! Airlock's runtime: the product as an embedded library.
//!
//! One [`Runtime`] per host application. Sandboxes are addressed by name,
//! created on first use with a stable id, kept in embedded SQLite, and run
//! each request on the cheapest tier that can do it: WebAssembly isolates
//! first, the sandbox's container when the request needs a full Linux or an
//! isolate answers needs-escalation. Idle sandboxes sleep (containers
//! stopped, contexts kept and rebuilt by replay when next used) and wake on
//! the next request; every execution's active CPU is metered.
//!
//! ```no_run
//! # async fn example() -> Result<(), airlock_runtime::Error> {
//! use airlock_core::{ExecRequest, Language};
//! use airlock_runtime::{Runtime, RuntimeOptions};
//!
//! let runtime = Runtime::open(RuntimeOptions::new("/var/lib/airlock-demo")).await?;
//! let sandbox = runtime.sandbox("demo").await?;
//! let answer = sandbox.code(Language::Python, "print(6 * 7)").await?;
//! assert_eq!(answer.outcome.stdout_text(), "42\n"); // in an isolate
//! let log = sandbox.exec(ExecRequest::new("git").args(["--version"])).await?;
//! println!("{} ({})", log.outcome.stdout_text(), log.placement.reason); // in the container
//! # Ok(()) }
//! ```

mod code;
mod config;
mod contexts;
mod disk;
mod egress;
mod error;
mod events;
pub mod files;
mod git;
mod home_lock;
mod outbound;
mod policy;
mod preview;
mod router;
mod runtime;
mod sandbox;
mod secrets;
mod snapshot;
mod store;

pub use config::{
    DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONTEXTS, DEFAULT_MAX_PROCESSES, DEFAULT_MAX_PTYS, MAX_CONTEXTS_LIMIT,
    MAX_PROCESSES_LIMIT, MAX_PTYS_LIMIT, MIN_IDLE_TIMEOUT, NetworkPolicy, Policy, SandboxConfig, TierPreference,
};
/// The network policy's vocabulary (from `airlock-core`).
pub use airlock_core::network::{
    DEFAULT_PORTS, DenyReason, HeaderRule, HostPattern, HostRule, MAX_ALLOW_RULES, MAX_DENY_RULES, MAX_HEADER_RULES,
    PolicyError, Verdict, validate_secret_name,
};
pub use secrets::{MAX_SECRET_BYTES, MAX_SECRETS, SecretInfo, Secrets};
pub use disk::{
    DEFAULT_DISK_BYTES, DEFAULT_IMAGE_SHARE_PERCENT, DISK_IMAGE_FILE, DiskOptions, DiskStatus, IMAGE_MOUNT_OPTIONS,
    MAX_DEFAULT_IMAGE_BYTES, MAX_DISK_BYTES, MIN_DISK_BYTES, MIN_IMAGE_BYTES, QuotaMode, install_disk_tools,
};
pub use airlock_egress::EgressConfig;
pub use egress::{EGRESS_CA_DIR, SANDBOX_EGRESS_DIR};
pub use contexts::{
    ContextFork, ContextInfo, ContextMove, ContextOptions, ContextReplay, MAX_REPLAY_BYTES, MAX_REPLAY_EVALUATIONS,
};
pub use error::{Error, Result};
pub use events::{
    COALESCE_WINDOW, EVENT_BUFFER, EventStream, FileChange, Lifecycle, MAX_WATCHED_DIRECTORIES, SandboxEvent,
};
pub use git::{
    DEFAULT_GIT_CHECKOUT_DEADLINE, GitCheckout, GitCheckoutOutcome, MAX_GIT_BRANCH_LEN, MAX_GIT_DEPTH, MAX_GIT_DIR_LEN, MAX_GIT_URL_LEN,
};
pub use home_lock::{API_SOCKET_FILE, LOCK_FILE};
pub use files::{FILE_OP_TIMEOUT, FileEntry, FileKind, MAX_CONCURRENT_FILE_OPS, MAX_FILE_BYTES, MAX_LIST_ENTRIES};
pub use preview::{ExposedPort, NewExposure, PREVIEW_TOKEN_BYTES};
pub use router::{Route, route};
pub use runtime::{
    DATABASE_FILE, DEFAULT_PRICE_PER_VCPU_SECOND, IDLE_SWEEP_INTERVAL, PRIVATE_DIR_MODE, RUNTIME_WARM_CONTEXTS,
    Runtime, RuntimeOptions, SandboxInfo, Usage, UsageQuery, default_home,
};
pub use snapshot::{
    DEFAULT_MAX_SNAPSHOTS_PER_SANDBOX, MAX_FORKS, MAX_SNAPSHOT_DEPTH, MAX_SNAPSHOT_ENTRIES, MAX_SNAPSHOT_LABEL_BYTES, SnapshotInfo,
};
pub use sandbox::{CodeOutcome, Placement, RunOutcome, Sandbox, SandboxPortStream, SandboxPty};
pub use store::{
    EgressTotals, ExecutionKind, MAX_TOKEN_BYTES, MAX_TOKEN_NAME, NewToken, SandboxState, TOKEN_PREFIX, TokenInfo, TokenStore,
    UsageTotals,
};
