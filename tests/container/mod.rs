//! The container tier's suite, run once per runtime (`container_runc.rs`,
//! `container_runsc.rs`) against the real Docker engine. The engine and the
//! base image are set up by `airlock setup`, which `scripts/test.sh` runs
//! first; a missing engine fails every test here, loudly.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use airlock::container::{
    ContainerResources, ContainerRuntime, ContainerSandbox, DockerEngine, EngineOptions, ImageRecipe, SandboxSpec,
    ensure_base_image,
};
use airlock::{ExecOutcome, ExecRequest, Limits, OutputChunk, OutputSender, SandboxId};

/// Connects to the engine (setting it up where needed) and makes sure the
/// base image exists; one build at a time per test binary.
pub async fn engine_and_image() -> (DockerEngine, String) {
    static BUILD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one_at_a_time = BUILD.lock().await;
    let engine = DockerEngine::connect_or_setup(&EngineOptions::default())
        .await
        .expect("the docker engine is required for container tests: run `airlock setup` as root");
    let image = ensure_base_image(&engine, &ImageRecipe::default(), Arc::new(|line: &str| eprintln!("{line}")))
        .await
        .expect("building the base image");
    (engine, image)
}

/// A sandbox for one test, removed when the test ends, even by a panic.
pub struct TestSandbox {
    pub sandbox: ContainerSandbox,
    pub workspace: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestSandbox {
    pub async fn new(runtime: ContainerRuntime) -> Self {
        Self::with_resources(runtime, ContainerResources::default()).await
    }

    pub async fn with_resources(runtime: ContainerRuntime, resources: ContainerResources) -> Self {
        let (engine, image) = engine_and_image().await;
        let dir = tempfile::tempdir().unwrap();
        // runsc opens the workspace as the engine's remapped root (when it remaps).
        engine.let_remapped_root_pass(dir.path()).unwrap();
        let workspace = dir.path().join("workspace");
        std::fs::create_dir(&workspace).unwrap();
        let spec =
            SandboxSpec::new(SandboxId::new().to_string(), image, &workspace).runtime(runtime).resources(resources);
        let sandbox = ContainerSandbox::create_started(&engine, spec).await.unwrap();
        Self { sandbox, workspace, _dir: dir }
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.workspace.join(relative)
    }

    /// Runs `script` with bash and a deadline of `seconds`.
    pub async fn bash(&self, script: &str) -> ExecOutcome {
        self.sandbox.exec(bash(script)).await.unwrap()
    }

    pub async fn bash_as_root(&self, script: &str) -> ExecOutcome {
        self.sandbox.exec_as("root", bash(script)).await.unwrap()
    }
}

impl Drop for TestSandbox {
    fn drop(&mut self) {
        let sandbox = self.sandbox.clone();
        // Drop cannot await; a thread with its own runtime removes the container.
        let _ = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                let _ = runtime.block_on(sandbox.remove());
            }
        })
        .join();
    }
}

pub fn bash(script: &str) -> ExecRequest {
    ExecRequest::new("bash").args(["-c", script])
}

pub fn deadline(seconds: u64) -> Limits {
    Limits { deadline: Duration::from_secs(seconds), ..Limits::default() }
}

/// An output sender that records every chunk.
pub fn recorder() -> (OutputSender, Arc<Mutex<Vec<OutputChunk>>>) {
    let chunks = Arc::new(Mutex::new(Vec::new()));
    let sink = chunks.clone();
    (Arc::new(move |chunk: OutputChunk| sink.lock().unwrap().push(chunk)), chunks)
}

pub fn exists(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}

/// Expands to one `#[tokio::test]` per case of the suite in `cases.rs`, run under `$runtime`.
#[macro_export]
macro_rules! container_suite {
    ($runtime:expr) => {
        container_suite!(
            $runtime,
            [
                lifecycle_keeps_the_workspace_and_drops_the_rest,
                exec_streams_output_and_takes_env_cwd_and_stdin,
                the_deadline_kills_the_whole_process_tree,
                an_output_flood_is_cut_at_the_cap,
                a_fork_bomb_is_contained_by_the_pids_limit,
                a_memory_bomb_is_reported_as_out_of_memory,
                privileged_operations_are_denied,
                background_processes_are_listed_followed_signalled_and_awaited,
                a_pty_session_takes_input_and_resizes,
                a_port_inside_is_reachable_without_a_network,
                labelled_containers_are_listed_and_adopted,
                the_tier_seam_runs_in_the_workspace,
                bad_requests_get_clear_errors,
                cpu_time_comes_from_the_cgroup,
                commands_go_through_the_agent_on_one_stream,
                a_dropped_exec_kills_its_whole_tree,
                a_command_leaves_nothing_running_when_it_ends,
                the_agent_cannot_be_signalled_traced_or_read,
                a_deadline_holds_under_an_output_flood,
                the_process_log_keeps_the_newest_output_within_its_bound,
                background_stdin_is_written_and_closed_and_logs_resume_at_an_offset,
            ]
        );
    };
    ($runtime:expr, [$($case:ident),* $(,)?]) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                cases::$case($runtime).await
            }
        )*
    };
}
