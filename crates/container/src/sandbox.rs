//! One sandbox container: create, start, stop, pause, remove, adopt.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use airlock_core::WORKSPACE_GUEST_PATH;
use airlock_core::network::EGRESS_GUEST_DIR;
use bollard::models::ContainerStateStatusEnum;
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};

use crate::agent::{AgentLink, AgentLinks, agent_host_path, runs_agent};
use crate::cgroup::ContainerCgroup;
use crate::engine::{ContainerRuntime, DockerEngine};
use crate::error::{Error, Result};
use crate::image::image_exists;
use crate::layer::{self, MovedLayer};
use crate::process::ProcessTable;
use crate::spec::{ContainerResources, HOME_LABEL, RUNSC_PIDS_HEADROOM, SANDBOX_LABEL, SandboxSpec, USER_LABEL};

/// How long `stop` lets processes end on SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// The state the engine reports for a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ContainerState {
    Created,
    Running,
    Paused,
    Restarting,
    Exited,
    Removing,
    Dead,
    /// The engine no longer has it.
    Gone,
}

impl From<Option<ContainerStateStatusEnum>> for ContainerState {
    fn from(status: Option<ContainerStateStatusEnum>) -> Self {
        match status {
            Some(ContainerStateStatusEnum::CREATED) => ContainerState::Created,
            Some(ContainerStateStatusEnum::RUNNING) => ContainerState::Running,
            Some(ContainerStateStatusEnum::PAUSED) => ContainerState::Paused,
            Some(ContainerStateStatusEnum::RESTARTING) => ContainerState::Restarting,
            Some(ContainerStateStatusEnum::REMOVING) => ContainerState::Removing,
            Some(ContainerStateStatusEnum::DEAD) => ContainerState::Dead,
            _ => ContainerState::Exited,
        }
    }
}

/// A handle on one sandbox container. Cheap to clone; clones share the
/// background-process table.
#[derive(Debug, Clone)]
pub struct ContainerSandbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    engine: DockerEngine,
    container_id: String,
    spec: SandboxSpec,
    cgroup: OnceLock<ContainerCgroup>,
    processes: ProcessTable,
    /// Whether the container's main process is the agent (see `agent.rs`).
    runs_agent: bool,
    /// Set while this handle has the container paused: commands are refused
    /// at once rather than left to hang on a frozen agent.
    paused: AtomicBool,
    /// The writable layer, when it was moved onto the spec's `layer_home`.
    layer: Option<MovedLayer>,
}

impl ContainerSandbox {
    /// Creates the container (not started). Refuses an image the engine does
    /// not have and a runtime it does not know, naming them. The container's
    /// name is `airlock-<sandbox id>`, so the engine itself refuses a second
    /// container for one sandbox.
    pub async fn create(engine: &DockerEngine, spec: SandboxSpec) -> Result<Self> {
        spec.validate()?;
        engine.require_runtime(spec.runtime)?;
        if !image_exists(engine, &spec.image).await? {
            return Err(Error::NoSuchImage(spec.image.clone()));
        }
        if spec.runtime == ContainerRuntime::Runsc {
            // runsc's gofer opens the workspace (and the egress directory) as the remapped root.
            engine.check_remapped_root_can_reach(&spec.workspace)?;
            if let Some(dir) = &spec.egress_dir {
                engine.check_remapped_root_can_reach(dir)?;
                if !engine.reaches_host_sockets(spec.runtime) {
                    return Err(Error::Setup(
                        "the engine runs runsc without --host-uds=open, so a sandbox cannot reach its egress \
                         proxy under gVisor: run `airlock setup` as root (it updates the registration and reloads dockerd)"
                            .into(),
                    ));
                }
            }
        }
        hand_workspace_to_user(engine, &spec)?;
        let agent = agent_host_path()?;
        let options = CreateContainerOptionsBuilder::new().name(&container_name(&spec.sandbox_id)).build();
        let created = engine
            .docker()
            .create_container(Some(options), spec.container_config(&agent))
            .await
            .map_err(Error::docker("create container"))?;
        let moved = match prepare_layer(engine, &created.id, &spec).await {
            Ok(moved) => moved,
            Err(error) => {
                let _ = remove_container(engine, &created.id).await;
                return Err(error);
            }
        };
        Ok(Self::from_parts(engine.clone(), created.id, spec, true, false, moved))
    }

    /// Creates and starts.
    pub async fn create_started(engine: &DockerEngine, spec: SandboxSpec) -> Result<Self> {
        let sandbox = Self::create(engine, spec).await?;
        if let Err(error) = sandbox.start().await {
            let _ = sandbox.remove().await;
            return Err(error);
        }
        Ok(sandbox)
    }

    /// Takes over an existing Airlock container (after a restart), rebuilding
    /// its spec from what the engine reports.
    pub async fn adopt(engine: &DockerEngine, container_id: &str) -> Result<Self> {
        let inspected = engine
            .docker()
            .inspect_container(container_id, None::<InspectContainerOptions>)
            .await
            .map_err(Error::docker("inspect container"))?;
        let moved = layer::moved_layer_of(&inspected);
        let config = inspected.config.unwrap_or_default();
        let host = inspected.host_config.unwrap_or_default();
        let runs_agent = runs_agent(config.cmd.as_deref().unwrap_or_default());
        let paused = inspected.state.as_ref().and_then(|state| state.paused).unwrap_or(false);
        let labels = config.labels.unwrap_or_default();
        let sandbox_id = labels.get(SANDBOX_LABEL).cloned().ok_or_else(|| Error::Invalid {
            what: "container",
            reason: format!("{container_id} has no {SANDBOX_LABEL} label: not Airlock's"),
        })?;
        let binds = host.binds.unwrap_or_default();
        let bind_source = |target: &str| {
            binds.iter().find_map(|bind| {
                let mut parts = bind.split(':');
                let source = parts.next()?;
                (parts.next()? == target).then(|| PathBuf::from(source))
            })
        };
        let workspace = bind_source(WORKSPACE_GUEST_PATH)
            .ok_or_else(|| Error::Invalid { what: "container", reason: format!("{container_id} has no workspace") })?;
        let egress_dir = bind_source(EGRESS_GUEST_DIR);
        let runtime = host.runtime.as_deref().unwrap_or("runc").parse().unwrap_or(ContainerRuntime::Runc);
        let defaults = ContainerResources::default();
        let resources = ContainerResources {
            memory_bytes: host.memory.and_then(|m| u64::try_from(m).ok()).unwrap_or(defaults.memory_bytes),
            pids: host
                .pids_limit
                .and_then(|p| u32::try_from(p).ok())
                .map(|p| if runtime == ContainerRuntime::Runsc { p.saturating_sub(RUNSC_PIDS_HEADROOM) } else { p })
                .unwrap_or(defaults.pids),
            cpu_millis: host.nano_cpus.and_then(|n| u32::try_from(n / 1_000_000).ok()).unwrap_or(defaults.cpu_millis),
        };
        // The sandbox's user is labelled (the container runs as root, for the
        // agent); containers from before the label ran as it.
        let user = labels.get(USER_LABEL).cloned().or(config.user).unwrap_or_default();
        // Only Airlock's own container labels; the image's labels show up here too.
        let extra_labels: HashMap<String, String> = labels.into_iter().filter(|(key, _)| key == HOME_LABEL).collect();
        let spec = SandboxSpec {
            sandbox_id,
            image: config.image.unwrap_or_default(),
            runtime,
            resources,
            user,
            workspace,
            labels: extra_labels,
            disk_bytes: host.storage_opt.as_ref().and_then(|opts| opts.get("size")).and_then(|size| size.parse().ok()),
            layer_home: moved.as_ref().map(|moved| moved.home.clone()),
            egress_dir,
        };
        let container_id = inspected.id.unwrap_or_else(|| container_id.to_string());
        Ok(Self::from_parts(engine.clone(), container_id, spec, runs_agent, paused, moved))
    }

    fn from_parts(
        engine: DockerEngine,
        container_id: String,
        spec: SandboxSpec,
        runs_agent: bool,
        paused: bool,
        layer: Option<MovedLayer>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                engine,
                container_id,
                spec,
                cgroup: OnceLock::new(),
                processes: ProcessTable::default(),
                runs_agent,
                paused: AtomicBool::new(paused),
                layer,
            }),
        }
    }

    /// The link to the container's agent, attaching when there is none (after
    /// a start); `None` for a container that does not run the agent.
    pub(crate) async fn agent_link(&self) -> Result<Option<Arc<AgentLink>>> {
        if !self.inner.runs_agent {
            return Ok(None);
        }
        if self.inner.paused.load(Ordering::SeqCst) {
            return Err(Error::NotRunning(self.container_id().to_string()));
        }
        let slot = AgentLinks::global().slot(self.container_id());
        let mut current = slot.lock().await;
        if let Some(link) = current.as_ref()
            && link.is_open()
        {
            return Ok(Some(link.clone()));
        }
        // The engine lets a stream attach to a stopped container and then
        // sends nothing: ask first.
        if self.state().await? != ContainerState::Running {
            return Err(Error::NotRunning(self.container_id().to_string()));
        }
        let link = AgentLink::connect(&self.inner.engine, self.container_id()).await?;
        *current = Some(link.clone());
        Ok(Some(link))
    }

    pub fn container_id(&self) -> &str {
        &self.inner.container_id
    }

    pub fn sandbox_id(&self) -> &str {
        &self.inner.spec.sandbox_id
    }

    pub fn spec(&self) -> &SandboxSpec {
        &self.inner.spec
    }

    pub fn engine(&self) -> &DockerEngine {
        &self.inner.engine
    }

    pub(crate) fn processes_table(&self) -> &ProcessTable {
        &self.inner.processes
    }

    /// The container's cgroup on the host, found once it has run.
    pub(crate) fn cgroup(&self) -> ContainerCgroup {
        if let Some(found) = self.inner.cgroup.get() {
            return found.clone();
        }
        let found = ContainerCgroup::find(self.container_id());
        if found.cpu_usage().is_some() {
            let _ = self.inner.cgroup.set(found.clone());
        }
        found
    }

    /// CPU time the whole container has used since it was created, from its cgroup.
    pub fn cpu_usage(&self) -> Option<Duration> {
        self.cgroup().cpu_usage()
    }

    /// Starts the container and links to its agent, so that the first
    /// command pays no attach.
    pub async fn start(&self) -> Result<()> {
        if let Some(moved) = &self.inner.layer {
            layer::ensure_mounted(moved)?;
        }
        self.inner
            .engine
            .docker()
            .start_container(self.container_id(), None::<bollard::query_parameters::StartContainerOptions>)
            .await
            .map_err(Error::docker("start container"))?;
        self.inner.paused.store(false, Ordering::SeqCst);
        self.agent_link().await.map(|_| ())
    }

    /// Stops every process (SIGTERM, then SIGKILL after [`STOP_GRACE`]). The
    /// container's filesystem and the workspace stay; `start` resumes it.
    pub async fn stop(&self) -> Result<()> {
        let grace = i32::try_from(STOP_GRACE.as_secs()).unwrap_or(2);
        let options = StopContainerOptionsBuilder::new().t(grace).build();
        match self.inner.engine.docker().stop_container(self.container_id(), Some(options)).await {
            Ok(()) => Ok(()),
            // 304: already stopped.
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 304, .. }) => Ok(()),
            Err(source) => Err(Error::Docker { operation: "stop container", source }),
        }
    }

    /// Freezes every process in the container (the cgroup freezer).
    pub async fn pause(&self) -> Result<()> {
        self.inner
            .engine
            .docker()
            .pause_container(self.container_id())
            .await
            .map_err(Error::docker("pause container"))?;
        self.inner.paused.store(true, Ordering::SeqCst);
        Ok(())
    }

    pub async fn unpause(&self) -> Result<()> {
        self.inner
            .engine
            .docker()
            .unpause_container(self.container_id())
            .await
            .map_err(Error::docker("unpause container"))?;
        self.inner.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Removes the container and everything written outside `/workspace`.
    /// The workspace directory on the host is kept.
    pub async fn remove(&self) -> Result<()> {
        remove_container(&self.inner.engine, self.container_id()).await
    }

    pub async fn state(&self) -> Result<ContainerState> {
        match self.inner.engine.docker().inspect_container(self.container_id(), None::<InspectContainerOptions>).await {
            Ok(inspected) => Ok(inspected.state.and_then(|s| s.status).into()),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(ContainerState::Gone),
            Err(source) => Err(Error::Docker { operation: "inspect container", source }),
        }
    }

    /// The container's main process as the host sees it (for entering its namespaces).
    pub(crate) async fn host_pid(&self) -> Result<i32> {
        let inspected = self
            .inner
            .engine
            .docker()
            .inspect_container(self.container_id(), None::<InspectContainerOptions>)
            .await
            .map_err(Error::docker("inspect container"))?;
        let state = inspected.state.unwrap_or_default();
        match (state.running, state.paused, state.pid) {
            (Some(true), Some(false) | None, Some(pid)) if pid > 0 => {
                i32::try_from(pid).map_err(|_| Error::NotRunning(self.container_id().into()))
            }
            _ => Err(Error::NotRunning(self.container_id().into())),
        }
    }

    /// Gives what is in the workspace to the sandbox's user again (when Airlock
    /// runs as root): for files made since the container was created by the
    /// host or the isolate tier, which write as the host's user.
    pub fn hand_workspace_to_user(&self) -> Result<()> {
        hand_workspace_to_user(self.engine(), self.spec())
    }

    /// Who the sandbox's user is on the host: the spec's `uid:gid` through the
    /// engine's remapping (the same ids without it). Files the host makes in
    /// the workspace for the sandbox belong to this owner. `None` for a user
    /// that is not numeric.
    pub fn workspace_owner(&self) -> Result<Option<airlock_core::Owner>> {
        workspace_owner(self.engine(), self.spec())
    }

    pub(crate) async fn is_gone(&self) -> bool {
        !matches!(self.state().await, Ok(ContainerState::Running))
    }
}

/// Gives the workspace and what is in it to the sandbox's user, so that
/// commands can write there: the host side (and the isolate tier) create files
/// as the host's user. Only when Airlock runs as root, which can. The owner is
/// the sandbox user's host ids: through the engine's uid remapping when it
/// remaps, so that the files belong to nobody else on the host. The walk goes
/// through the confined layer's descriptors: links are changed themselves,
/// never followed, and code racing it cannot steer it out of the workspace.
fn hand_workspace_to_user(engine: &DockerEngine, spec: &SandboxSpec) -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        return Ok(());
    }
    let Some(owner) = workspace_owner(engine, spec)? else {
        return Ok(());
    };
    let workspace = format!("the workspace {}", spec.workspace.display());
    let dir = airlock_core::WorkspaceDir::open(&spec.workspace)
        .map_err(|e| Error::io(format!("opening {workspace}"))(std::io::Error::other(e)))?;
    dir.chown_tree(owner)
        .map_err(|e| Error::io(format!("giving {workspace} to the sandbox user"))(std::io::Error::other(e)))?;
    Ok(())
}

/// The host owner of the spec's numeric `uid[:gid]` (gid defaults to uid).
fn workspace_owner(engine: &DockerEngine, spec: &SandboxSpec) -> Result<Option<airlock_core::Owner>> {
    let mut ids = spec.user.split(':').map(str::parse::<u32>);
    let (Some(Ok(uid)), gid) = (ids.next(), ids.next()) else {
        return Ok(None);
    };
    let gid = match gid {
        Some(Ok(gid)) => gid,
        _ => uid,
    };
    engine.host_owner(uid, gid).map(Some)
}

/// Removes a container by id (thawing it first if frozen), whatever made it:
/// for reconciliation, which also meets containers no handle can be rebuilt for.
pub async fn remove_container(engine: &DockerEngine, container_id: &str) -> Result<()> {
    let docker = engine.docker();
    let inspected = docker.inspect_container(container_id, None::<InspectContainerOptions>).await.ok();
    // A frozen gVisor sandbox cannot be killed; thaw it first.
    if inspected.as_ref().and_then(|i| i.state.as_ref()).and_then(|state| state.paused) == Some(true) {
        let _ = docker.unpause_container(container_id).await;
    }
    AgentLinks::global().forget(container_id);
    // A moved writable layer comes off first, the container stopped (Docker
    // then takes its overlay off the layer): removal then deletes Docker's own
    // directory, and the sandbox's filesystem keeps no mount.
    if let Some(moved) = inspected.as_ref().and_then(layer::moved_layer_of)
        && layer::is_mounted(&moved)
    {
        let options = StopContainerOptionsBuilder::new().t(0).build();
        let _ = docker.stop_container(container_id, Some(options)).await;
        layer::release(&moved).await?;
    }
    let options = RemoveContainerOptionsBuilder::new().force(true).v(true).build();
    match docker.remove_container(container_id, Some(options)).await {
        Ok(()) => Ok(()),
        Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
        Err(source) => Err(Error::Docker { operation: "remove container", source }),
    }
}

/// Moves the just-made container's writable layer onto the spec's
/// `layer_home` (see `layer.rs`); `None` when the spec has none, or the
/// engine's storage is not overlay2 (the layer then stays where it is, unlimited).
async fn prepare_layer(engine: &DockerEngine, container_id: &str, spec: &SandboxSpec) -> Result<Option<MovedLayer>> {
    let Some(home) = &spec.layer_home else {
        return Ok(None);
    };
    let inspected = engine
        .docker()
        .inspect_container(container_id, None::<InspectContainerOptions>)
        .await
        .map_err(Error::docker("inspect container"))?;
    let Some(dir) = layer::layer_dir_of(&inspected) else {
        tracing::warn!(
            container = container_id,
            "the engine's storage is not overlay2: the writable layer stays unlimited"
        );
        return Ok(None);
    };
    let moved = MovedLayer { layer: dir, home: home.clone() };
    layer::move_layer(&moved)?;
    Ok(Some(moved))
}

/// The engine-level name of a sandbox's container.
pub fn container_name(sandbox_id: &str) -> String {
    format!("airlock-{sandbox_id}")
}

/// One container that carries Airlock's label, as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelledContainer {
    pub container_id: String,
    pub sandbox_id: String,
    pub state: ContainerState,
    pub image: String,
    /// Every label the container carries (a runtime finds its own by them).
    pub labels: HashMap<String, String>,
}

/// Every container carrying Airlock's label, running or not, so that a runtime
/// can adopt or remove them after a restart.
pub async fn list_labelled(engine: &DockerEngine) -> Result<Vec<LabelledContainer>> {
    let filters = HashMap::from([("label".to_string(), vec![SANDBOX_LABEL.to_string()])]);
    let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
    let listed = engine.docker().list_containers(Some(options)).await.map_err(Error::docker("list containers"))?;
    Ok(listed
        .into_iter()
        .filter_map(|summary| {
            let labels = summary.labels.unwrap_or_default();
            Some(LabelledContainer {
                container_id: summary.id?,
                sandbox_id: labels.get(SANDBOX_LABEL)?.clone(),
                state: match summary.state.as_ref().map(|s| s.to_string()).as_deref() {
                    Some("running") => ContainerState::Running,
                    Some("paused") => ContainerState::Paused,
                    Some("created") => ContainerState::Created,
                    Some("restarting") => ContainerState::Restarting,
                    Some("removing") => ContainerState::Removing,
                    Some("dead") => ContainerState::Dead,
                    _ => ContainerState::Exited,
                },
                image: summary.image.unwrap_or_default(),
                labels,
            })
        })
        .collect())
}
