//! The container tier: hardened Docker sandboxes through bollard.
//!
//! ```no_run
//! # async fn example() -> Result<(), airlock_container::Error> {
//! use airlock_container::{ContainerSandbox, DockerEngine, EngineOptions, ImageRecipe, SandboxSpec, ensure_base_image};
//! use airlock_core::ExecRequest;
//! use std::sync::Arc;
//!
//! let engine = DockerEngine::connect_or_setup(&EngineOptions::default()).await?;
//! let image = ensure_base_image(&engine, &ImageRecipe::default(), Arc::new(|line: &str| eprintln!("{line}"))).await?;
//! let spec = SandboxSpec::new("sbx-example", image, "/tmp/example-workspace");
//! let sandbox = ContainerSandbox::create_started(&engine, spec).await?;
//! let outcome = sandbox.exec(ExecRequest::new("git").args(["--version"])).await?;
//! println!("{}", outcome.stdout_text());
//! sandbox.remove().await?;
//! # Ok(()) }
//! ```

mod agent;
mod build_progress;
mod cgroup;
mod engine;
mod error;
mod exec;
mod forward;
mod image;
mod kernel;
mod layer;
mod process;
mod pty;
mod sandbox;
mod spec;
mod tier;

pub use agent::{AGENT_GUEST_PATH, AGENT_HANDSHAKE_TIMEOUT, settle_agent_links};
pub use engine::{
    ContainerRuntime, DEFAULT_DOCKER_SOCKET, DEFAULT_REMAP_RANGE, DOCKER_SOCKET_ENV, DOCKERD_FLAGS, DockerEngine,
    ENGINE_REQUEST_TIMEOUT, ENGINE_START_TIMEOUT, EngineOptions, NO_REMAP_ADVICE, RUNSC_RUNTIME_ARGS, USERNS_REMAP,
    UserMapping,
};
pub use error::{Error, Result};
pub use exec::Signal;
pub use forward::PortStream;
pub use build_progress::{BuildEvent, BuildReporter, BuildStage, ProgressUnit, human_duration};
pub use image::{
    BASE_IMAGE_REPOSITORY, BUILD_LOG_TAIL_LINES, DATA_STACK_PACKAGES, DEFAULT_BUILD_LOG_DIR, ImageRecipe, Progress,
    RECIPE_LABEL, SANDBOX_UID, SANDBOX_USER, build_log_path, build_stages, ensure_base_image, ensure_base_image_with,
    image_exists,
};
pub use kernel::{IDLE_OUTPUT_BYTES, KERNEL_START_TIMEOUT, KERNEL_STOP_WAIT, Kernel, MARK_PREFIX, MAX_CODE_BYTES, MAX_FRAME_BYTES};
pub use layer::{LAYER_LABEL, LAYER_UNMOUNT_WAIT};
pub use process::{PROCESS_LOG_BYTES, ProcessEvent, ProcessFollower, ProcessInfo, ProcessStatus};
pub use pty::{PtySession, PtySize};
pub use sandbox::{ContainerSandbox, ContainerState, LabelledContainer, STOP_GRACE, container_name, list_labelled, remove_container};
pub use spec::{
    ContainerResources, DEFAULT_CONTAINER_CPU_MILLIS, DEFAULT_CONTAINER_MEMORY_BYTES, DEFAULT_CONTAINER_PIDS,
    EGRESS_CA_VARIABLES, EGRESS_NO_PROXY, EGRESS_NO_PROXY_VARIABLES, EGRESS_PROXY_VARIABLES, HOME_LABEL,
    KEPT_CAPABILITIES, MAX_CONTAINER_CPU_MILLIS, MAX_CONTAINER_MEMORY_BYTES, MAX_CONTAINER_PIDS,
    RUNSC_PIDS_HEADROOM, SANDBOX_LABEL, SandboxSpec, USER_LABEL, egress_environment,
};
pub use tier::{ContainerTemplate, ContainerTier};
