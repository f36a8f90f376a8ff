//! One sandbox: its operations, whichever tier runs them, and its lifecycle.
//!
//! Every operation holds the sandbox's lifecycle lock shared; sleeping holds it
//! alone, so a sandbox never sleeps under a running operation. An operation on
//! a sleeping sandbox wakes it: its container is started again on the first
//! request that needs it, with its filesystem as it was.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Instant, SystemTime};

use airlock_container::{
    ContainerSandbox, ContainerState, HOME_LABEL, PortStream, ProcessEvent, ProcessFollower, ProcessInfo,
    ProcessStatus, PtySession, PtySize, SandboxSpec, Signal, container_name,
};
use airlock_core::{
    EscalationReason, EvalOutcome, ExecOutcome, ExecRequest, Limits, Needs, SandboxId,
    SandboxName, TierKind, Workspace, WorkspaceDir, confined::Owner,
};
use serde::Serialize;
use tokio::sync::broadcast;

use crate::config::SandboxConfig;
use crate::contexts::{ContextHandle, ContextMove, ContextReplay, History, Home};
use crate::error::{Error, Result};
use crate::events::{EVENT_BUFFER, EventStream, Lifecycle, SandboxEvent, WorkspaceWatch};
use crate::files::{self, FileEntry};
use crate::router::{Route, route};
use crate::runtime::{Runtime, SandboxInfo, lock};
use crate::store::{ExecutionKind, ExecutionRecord, SandboxRecord, SandboxState};

/// What ran a request, where, and why there.
#[derive(Debug, Clone, Serialize)]
pub struct Placement {
    pub tier: TierKind,
    pub reason: String,
    /// Set when an isolate answered needs-escalation and the request ran again
    /// in the container.
    pub escalated: Option<EscalationReason>,
    /// Set on the evaluation that moved a context from its isolate to a
    /// kernel in the container: what was replayed, and what that repeated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_moved: Option<ContextMove>,
    /// Set on the first evaluation of a context after its sandbox slept or
    /// its runtime was reopened: the context was rebuilt by replaying its
    /// history before this evaluation ran, and this says what that did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_restored: Option<ContextReplay>,
}

impl Placement {
    pub fn new(tier: TierKind, reason: &str) -> Self {
        Self { tier, reason: reason.to_string(), escalated: None, context_moved: None, context_restored: None }
    }
}

/// The outcome of a command, and where it ran.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub outcome: ExecOutcome,
    pub placement: Placement,
}

/// The outcome of code, and where it ran. Code that ran in the container is
/// reported as an evaluation too: its exit status becomes the result.
#[derive(Debug, Clone)]
pub struct CodeOutcome {
    pub outcome: EvalOutcome,
    pub placement: Placement,
}

#[derive(Debug)]
pub(crate) struct SandboxInner {
    pub id: SandboxId,
    pub name: SandboxName,
    pub config: SandboxConfig,
    pub(crate) workspace: Workspace,
    /// The workspace as a directory handle: every host-side file operation
    /// goes through it (DESIGN.md decision 1), never through a host path.
    pub(crate) dir: WorkspaceDir,
    record: Mutex<SandboxRecord>,
    pub(crate) container: tokio::sync::Mutex<Option<ContainerSandbox>>,
    /// Set when the container was stopped by sleep; the next use starts it.
    pub(crate) container_stopped: AtomicBool,
    /// Set when an isolate (or the host, before the container's owner was
    /// known) may have written to the workspace as the host's user since the
    /// workspace was last handed to the container's user.
    pub(crate) isolate_wrote: AtomicBool,
    /// This sandbox's contexts, by id.
    pub(crate) contexts: Mutex<HashMap<String, Arc<ContextHandle>>>,
    /// Contexts being made: they count against `max_contexts` (changed under
    /// the `contexts` lock).
    contexts_pending: AtomicUsize,
    /// Held while a background process is checked against `max_processes` and
    /// started, so two starts cannot both take the last slot.
    process_start: tokio::sync::Mutex<()>,
    /// Terminal sessions whose handles are alive (against `max_ptys`).
    open_ptys: AtomicUsize,
    /// Terminal sessions and port streams whose handles are alive: each keeps
    /// the sandbox awake.
    open_streams: AtomicUsize,
    pub(crate) lifecycle: tokio::sync::RwLock<()>,
    in_flight: AtomicUsize,
    last_active: Mutex<Instant>,
    events: broadcast::Sender<SandboxEvent>,
    /// The workspace's inotify watch, alive while a subscriber is.
    watch: Mutex<Weak<WorkspaceWatch>>,
    /// The network policy in force (the sandbox's own, with the runtime's
    /// denied hosts added), published to the egress proxy and the isolates'
    /// HTTP hook. The lock is held while a new policy is stored and sent, so
    /// two changes are published in the order they were stored.
    pub(crate) network: Mutex<tokio::sync::watch::Sender<Arc<airlock_core::NetworkPolicy>>>,
    /// The sandbox's egress proxy, bound before its container first starts
    /// in this process (`egress.rs`).
    pub(crate) proxy: Mutex<Option<airlock_egress::ProxyHandle>>,
}

impl SandboxInner {
    /// `network` is the policy in force at first (see [`crate::Runtime::network_policy_watch`]).
    pub fn new(
        record: SandboxRecord,
        workspace_dir: &Path,
        network: Arc<airlock_core::NetworkPolicy>,
    ) -> Result<Self> {
        let workspace = Workspace::create(workspace_dir)?;
        let dir = WorkspaceDir::open(workspace.host_path())?;
        Ok(Self {
            dir,
            id: record.id,
            name: record.name.clone(),
            config: record.config.clone(),
            workspace,
            container_stopped: AtomicBool::new(record.state == SandboxState::Sleeping),
            isolate_wrote: AtomicBool::new(false),
            record: Mutex::new(record),
            container: tokio::sync::Mutex::new(None),
            contexts: Mutex::default(),
            contexts_pending: AtomicUsize::new(0),
            process_start: tokio::sync::Mutex::new(()),
            open_ptys: AtomicUsize::new(0),
            open_streams: AtomicUsize::new(0),
            lifecycle: tokio::sync::RwLock::new(()),
            in_flight: AtomicUsize::new(0),
            last_active: Mutex::new(Instant::now()),
            events: broadcast::channel(EVENT_BUFFER).0,
            watch: Mutex::new(Weak::new()),
            network: Mutex::new(tokio::sync::watch::Sender::new(network)),
            proxy: Mutex::new(None),
        })
    }

    /// The sandbox's record as it is now (its current network policy included).
    pub(crate) fn record(&self) -> std::sync::MutexGuard<'_, SandboxRecord> {
        lock(&self.record)
    }

    /// Takes in the contexts the registry kept for this sandbox (when it is
    /// loaded): each dormant until its next evaluation, its history left in
    /// the registry until then. A stored
    /// context the table cannot hold any more (a changed limit) stays stored.
    pub(crate) fn adopt_stored_contexts(&self, stored: Vec<crate::store::StoredContext>) {
        let mut contexts = lock(&self.contexts);
        for context in stored {
            if contexts.len() >= self.config.max_contexts {
                tracing::warn!(sandbox = %self.name, context = %context.id, "a stored context is past max_contexts; not loaded");
                continue;
            }
            let handle = ContextHandle::new(
                context.language,
                context.options,
                context.tier,
                Home::Dormant,
                None,
                History::default(),
            );
            contexts.insert(context.id, handle);
        }
    }

    pub fn container_id(&self) -> Option<String> {
        lock(&self.record).container_id.clone()
    }

    pub fn set_container_id(&self, container_id: Option<String>) {
        lock(&self.record).container_id = container_id;
    }

    fn emit(&self, event: SandboxEvent) {
        // No subscriber is not an error.
        let _ = self.events.send(event);
    }

    fn state(&self) -> SandboxState {
        lock(&self.record).state
    }

    /// Idle past its timeout, awake, not kept alive, nothing running, no
    /// terminal or port stream open. (Running background processes are
    /// checked by [`Sandbox::sleep_if_idle`].)
    pub fn should_sleep(&self) -> bool {
        !self.config.keep_alive
            && self.state() == SandboxState::Active
            && self.in_flight.load(Ordering::SeqCst) == 0
            && self.open_streams.load(Ordering::SeqCst) == 0
            && lock(&self.last_active).elapsed() >= self.config.idle_timeout
    }
}

/// Keeps a sandbox awake while a terminal or port stream is open (the sweep
/// sees it under the lifecycle lock); a terminal also holds one of the
/// sandbox's `max_ptys` slots. Dropping it restarts the idle clock.
#[derive(Debug)]
struct OpenStream {
    inner: Arc<SandboxInner>,
    pty: bool,
}

impl OpenStream {
    fn port(inner: &Arc<SandboxInner>) -> Self {
        inner.open_streams.fetch_add(1, Ordering::SeqCst);
        Self { inner: inner.clone(), pty: false }
    }

    /// Takes a terminal slot, or says which limit is reached.
    fn pty(inner: &Arc<SandboxInner>) -> Result<Self> {
        let max = inner.config.max_ptys;
        inner
            .open_ptys
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| (held < max).then_some(held + 1))
            .map_err(|held| Error::SandboxLimit { limit: "max_ptys", what: "terminals", held, max })?;
        inner.open_streams.fetch_add(1, Ordering::SeqCst);
        Ok(Self { inner: inner.clone(), pty: true })
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        *lock(&self.inner.last_active) = Instant::now();
        if self.pty {
            self.inner.open_ptys.fetch_sub(1, Ordering::SeqCst);
        }
        self.inner.open_streams.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A terminal session in a sandbox's container ([`PtySession`]'s methods
/// through `Deref`). While it lives it holds one of the sandbox's `max_ptys`
/// slots and keeps the sandbox awake: drop it to close the session.
#[derive(Debug)]
pub struct SandboxPty {
    session: PtySession,
    _open: OpenStream,
}

impl SandboxPty {
    /// Reads to the end and returns the command's exit code.
    pub async fn wait(self) -> Result<Option<i32>> {
        let SandboxPty { session, _open } = self;
        Ok(session.wait().await?)
    }
}

impl std::ops::Deref for SandboxPty {
    type Target = PtySession;
    fn deref(&self) -> &PtySession {
        &self.session
    }
}

impl std::ops::DerefMut for SandboxPty {
    fn deref_mut(&mut self) -> &mut PtySession {
        &mut self.session
    }
}

/// A byte stream to a port inside a sandbox's container. While it lives the
/// sandbox stays awake (a preview being viewed is not idle).
#[derive(Debug)]
pub struct SandboxPortStream {
    stream: PortStream,
    _open: OpenStream,
}

impl SandboxPortStream {
    /// The stream underneath.
    pub fn get_ref(&self) -> &PortStream {
        &self.stream
    }
}

impl tokio::io::AsyncRead for SandboxPortStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SandboxPortStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A context being made, counted against `max_contexts` until it is in the
/// sandbox's table (or failed).
pub(crate) struct ContextSlot<'a> {
    inner: &'a SandboxInner,
    filled: bool,
}

impl<'a> ContextSlot<'a> {
    pub(crate) fn take(inner: &'a SandboxInner) -> Result<Self> {
        let contexts = lock(&inner.contexts);
        let held = contexts.len() + inner.contexts_pending.load(Ordering::SeqCst);
        let max = inner.config.max_contexts;
        if held >= max {
            return Err(Error::SandboxLimit { limit: "max_contexts", what: "contexts", held, max });
        }
        inner.contexts_pending.fetch_add(1, Ordering::SeqCst);
        Ok(Self { inner, filled: false })
    }

    /// Puts the new context in the table in place of the slot, in one step.
    pub(crate) fn fill(mut self, id: String, handle: Arc<ContextHandle>) {
        let mut contexts = lock(&self.inner.contexts);
        contexts.insert(id, handle);
        self.inner.contexts_pending.fetch_sub(1, Ordering::SeqCst);
        self.filled = true;
    }
}

impl Drop for ContextSlot<'_> {
    fn drop(&mut self) {
        if !self.filled {
            let _contexts = lock(&self.inner.contexts);
            self.inner.contexts_pending.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Marks a sandbox busy for as long as it lives.
pub(crate) struct Active<'a> {
    inner: &'a SandboxInner,
    _shared: tokio::sync::RwLockReadGuard<'a, ()>,
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        *lock(&self.inner.last_active) = Instant::now();
        self.inner.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A sandbox by name. Cheap to clone; every handle on one sandbox shares its
/// container, contexts and locks.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub(crate) runtime: Runtime,
    pub(crate) inner: Arc<SandboxInner>,
}

impl Sandbox {
    pub fn id(&self) -> SandboxId {
        self.inner.id
    }

    pub fn name(&self) -> &SandboxName {
        &self.inner.name
    }

    pub fn config(&self) -> &SandboxConfig {
        &self.inner.config
    }

    /// The workspace directory on the host.
    pub fn workspace(&self) -> &Workspace {
        &self.inner.workspace
    }

    pub fn info(&self) -> SandboxInfo {
        SandboxInfo::from(&*lock(&self.inner.record))
    }

    /// Starts an operation: waits out a sleep in progress, wakes the sandbox.
    pub(crate) async fn begin(&self) -> Result<Active<'_>> {
        let shared = self.inner.lifecycle.read().await;
        self.inner.in_flight.fetch_add(1, Ordering::SeqCst);
        let active = Active { inner: &self.inner, _shared: shared };
        if self.inner.state() == SandboxState::Sleeping {
            self.runtime.inner.store.set_state(self.inner.id, SandboxState::Active)?;
            lock(&self.inner.record).state = SandboxState::Active;
            self.inner.emit(SandboxEvent::Lifecycle { change: Lifecycle::Woke });
        }
        Ok(active)
    }

    pub(crate) fn record(
        &self,
        kind: ExecutionKind,
        tier: TierKind,
        started_at: SystemTime,
        wall: std::time::Duration,
        cpu: std::time::Duration,
    ) -> Result<()> {
        self.runtime.inner.store.record_execution(&ExecutionRecord {
            sandbox_id: self.inner.id,
            started_at,
            kind,
            tier,
            wall_time: wall,
            cpu_time: cpu,
        })
    }

    /// Subscribes to this sandbox's events: workspace file changes from every
    /// tier and from the host, background process output and exits, and
    /// lifecycle changes. The workspace is watched while any subscriber lives.
    pub fn watch(&self) -> Result<EventStream> {
        // Subscribed first, so what starting the watch reports is seen.
        let receiver = self.inner.events.subscribe();
        let mut slot = lock(&self.inner.watch);
        let watch = match slot.upgrade() {
            Some(watch) => watch,
            None => {
                let watch = Arc::new(WorkspaceWatch::start(&self.inner.dir, self.inner.events.clone())?);
                *slot = Arc::downgrade(&watch);
                watch
            }
        };
        Ok(EventStream::new(receiver, watch))
    }

    /// Remembers (once) that the sandbox moved to the container tier, and why.
    pub(crate) fn note_escalation(&self, reason: &str) -> Result<()> {
        if lock(&self.inner.record).escalated.is_some() {
            return Ok(());
        }
        self.runtime.inner.store.set_escalated(self.inner.id, reason)?;
        lock(&self.inner.record).escalated = Some(reason.to_string());
        Ok(())
    }

    fn with_default_limits(&self, mut request: ExecRequest) -> ExecRequest {
        if request.limits == Limits::default() {
            request.limits = self.inner.config.limits;
        }
        request
    }

    /// Runs a command on the tier the router picks: a WebAssembly guest in the
    /// workspace (`tool.wasm`, `/workspace/tool.wasm`) in an isolate, anything
    /// else in the sandbox's container.
    pub async fn exec(&self, request: ExecRequest) -> Result<RunOutcome> {
        let _active = self.begin().await?;
        let request = self.with_default_limits(request);
        let Route { tier, reason } = route(&Needs::of_exec(&request), self.inner.config.tier)?;
        let started_at = SystemTime::now();
        let outcome = match tier {
            TierKind::Container => {
                let container = self.container().await?;
                self.note_escalation(reason)?;
                container.exec(request).await?
            }
            _ => {
                // Read through the confined layer (no link followed, only a
                // regular file, bounded), then compiled from the bytes.
                let limit = self.runtime.inner.isolates.max_guest_bytes();
                let bytes = files::read_guest(&self.inner.dir, &request.program, limit).await?;
                let engine = self.runtime.inner.isolates.clone();
                let name = request.program.rsplit('/').next().unwrap_or_default().to_string();
                let guest = tokio::task::spawn_blocking(move || engine.load_bytes(&name, &bytes))
                    .await
                    .map_err(|e| airlock_core::Error::Engine(format!("loading the guest stopped: {e}")))??;
                self.inner.isolate_wrote.store(true, Ordering::SeqCst);
                let outbound = Some(self.outbound());
                self.runtime.inner.isolates.run_with_outbound(&guest, &self.inner.workspace, &request, outbound).await?
            }
        };
        self.record(ExecutionKind::Exec, outcome.tier, started_at, outcome.wall_time, outcome.cpu_time)?;
        Ok(RunOutcome { outcome, placement: Placement::new(tier, reason) })
    }

    /// Runs a command in the container as another user of its image (such as
    /// `root`, to install packages); the container's capabilities still apply.
    pub async fn exec_as(&self, user: &str, request: ExecRequest) -> Result<RunOutcome> {
        self.require_container_tier("a command as another user")?;
        let _active = self.begin().await?;
        let request = self.with_default_limits(request);
        let started_at = SystemTime::now();
        let container = self.container().await?;
        let reason = "a command as another user needs a full Linux";
        self.note_escalation(reason)?;
        let outcome = container.exec_as(user, request).await?;
        self.record(ExecutionKind::Exec, TierKind::Container, started_at, outcome.wall_time, outcome.cpu_time)?;
        Ok(RunOutcome {
            outcome,
            placement: Placement::new(TierKind::Container, reason),
        })
    }

    // Files, from the host, for both tiers, through the confined layer.

    /// A write that ran out of space ran into this sandbox's quota: say which.
    fn naming_the_quota(&self, error: Error) -> Error {
        match error {
            Error::Fs(airlock_core::FsError::NoSpace { path }) => {
                Error::DiskQuota { path, quota: airlock_core::limits::format_size(self.inner.config.disk) }
            }
            other => other,
        }
    }

    /// Reads a whole file (at most [`MAX_FILE_BYTES`](crate::MAX_FILE_BYTES)).
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let _active = self.begin().await?;
        files::read(&self.inner.dir, path).await
    }

    /// Opens a regular file as a stream, of any size, with its entry.
    pub async fn open_file(&self, path: &str) -> Result<(tokio::fs::File, FileEntry)> {
        let _active = self.begin().await?;
        files::open_read(&self.inner.dir, path).await
    }

    /// Writes a whole file (making missing directories); the sandbox's user owns it.
    pub async fn write_file(&self, path: &str, bytes: &[u8]) -> Result<()> {
        let _active = self.begin().await?;
        files::write(&self.inner.dir, path, bytes, self.sandbox_owner()).await.map_err(|e| self.naming_the_quota(e))
    }

    /// Writes a file from a stream, of any size within the disk quota; it
    /// replaces `path` only once every byte is written. Returns the size.
    pub async fn write_file_from<R: tokio::io::AsyncRead + Unpin>(&self, path: &str, source: &mut R) -> Result<u64> {
        let _active = self.begin().await?;
        files::write_from(&self.inner.dir, path, source, self.sandbox_owner()).await.map_err(|e| self.naming_the_quota(e))
    }

    pub async fn list_files(&self, path: &str) -> Result<Vec<FileEntry>> {
        let _active = self.begin().await?;
        files::list(&self.inner.dir, path).await
    }

    /// What is at `path` (a link is reported as one, not followed).
    pub async fn stat_file(&self, path: &str) -> Result<FileEntry> {
        let _active = self.begin().await?;
        files::stat(&self.inner.dir, path).await
    }

    pub async fn mkdir(&self, path: &str) -> Result<()> {
        let _active = self.begin().await?;
        files::mkdir(&self.inner.dir, path, self.sandbox_owner()).await.map_err(|e| self.naming_the_quota(e))
    }

    pub async fn remove_file(&self, path: &str) -> Result<()> {
        let _active = self.begin().await?;
        files::remove(&self.inner.dir, path).await
    }

    pub async fn rename_file(&self, from: &str, to: &str) -> Result<()> {
        let _active = self.begin().await?;
        files::rename(&self.inner.dir, from, to, self.sandbox_owner()).await.map_err(|e| self.naming_the_quota(e))
    }

    // Background processes and terminals: the container's.

    fn require_container_tier(&self, what: &str) -> Result<()> {
        match route(&Needs::of_process(), self.inner.config.tier) {
            Ok(_) => Ok(()),
            Err(_) => Err(Error::TierNotAllowed {
                what: what.into(),
                needed: TierKind::Container,
                allowed: TierKind::Isolate,
            }),
        }
    }

    /// Starts a background process in the container; returns its id. At most
    /// `max_processes` run at once: past it, [`Error::SandboxLimit`].
    pub async fn start_process(&self, request: ExecRequest) -> Result<String> {
        self.start_background(request, false).await
    }

    /// As [`start_process`](Self::start_process), with stdin a pipe that stays
    /// open: write with [`write_process_stdin`](Self::write_process_stdin),
    /// end with [`close_process_stdin`](Self::close_process_stdin).
    pub async fn start_process_with_stdin(&self, request: ExecRequest) -> Result<String> {
        self.start_background(request, true).await
    }

    async fn start_background(&self, request: ExecRequest, keep_stdin_open: bool) -> Result<String> {
        self.require_container_tier("a background process")?;
        let _active = self.begin().await?;
        let container = self.container().await?;
        let starting = self.inner.process_start.lock().await;
        let held = container.list_processes().iter().filter(|p| p.status == ProcessStatus::Running).count();
        let max = self.inner.config.max_processes;
        if held >= max {
            let what = "running background processes";
            return Err(Error::SandboxLimit { limit: "max_processes", what, held, max });
        }
        self.note_escalation("a process that outlives the request needs a full Linux")?;
        let id = if keep_stdin_open {
            container.start_process_with_stdin(request).await?
        } else {
            container.start_process(request).await?
        };
        drop(starting);
        // Its output and exit go to the sandbox's subscribers too.
        let mut follower = container.follow_process(&id)?;
        let (inner, process) = (self.inner.clone(), id.clone());
        tokio::spawn(async move {
            while let Some(event) = follower.next().await {
                inner.emit(match event {
                    ProcessEvent::Output(chunk) => SandboxEvent::ProcessOutput {
                        process: process.clone(),
                        stream: chunk.stream,
                        bytes: chunk.bytes,
                    },
                    ProcessEvent::Exited(code) => SandboxEvent::ProcessExited { process: process.clone(), code },
                });
            }
        });
        Ok(id)
    }

    pub async fn list_processes(&self) -> Result<Vec<ProcessInfo>> {
        Ok(self.existing_container().await.map(|c| c.list_processes()).unwrap_or_default())
    }

    pub async fn follow_process(&self, id: &str) -> Result<ProcessFollower> {
        let container =
            self.existing_container().await.ok_or_else(|| airlock_container::Error::NoSuchProcess(id.into()))?;
        Ok(container.follow_process(id)?)
    }

    /// Follows a process's output from byte `offset` of all it wrote (both
    /// streams in arrival order), as far back as its log holds, then live.
    pub async fn follow_process_from(&self, id: &str, offset: u64) -> Result<ProcessFollower> {
        Ok(self.process_container(id).await?.follow_process_from(id, offset)?)
    }

    /// Writes to the stdin of a process started with
    /// [`start_process_with_stdin`](Self::start_process_with_stdin).
    pub async fn write_process_stdin(&self, id: &str, bytes: &[u8]) -> Result<()> {
        Ok(self.process_container(id).await?.write_process_stdin(id, bytes).await?)
    }

    /// Closes a process's stdin: it reads end of file after what was written.
    pub async fn close_process_stdin(&self, id: &str) -> Result<()> {
        Ok(self.process_container(id).await?.close_process_stdin(id).await?)
    }

    /// Kills every running background process with all it started; returns
    /// their ids. No process can start while this runs.
    pub async fn kill_processes(&self) -> Result<Vec<String>> {
        let Some(container) = self.existing_container().await else { return Ok(Vec::new()) };
        let _starting = self.inner.process_start.lock().await;
        let running: Vec<String> = container
            .list_processes()
            .into_iter()
            .filter(|p| p.status == ProcessStatus::Running)
            .map(|p| p.id)
            .collect();
        for id in &running {
            container.signal_process(id, Signal::Kill).await?;
        }
        Ok(running)
    }

    /// The container that holds process `id`'s table.
    async fn process_container(&self, id: &str) -> Result<ContainerSandbox> {
        Ok(self.existing_container().await.ok_or_else(|| airlock_container::Error::NoSuchProcess(id.into()))?)
    }

    pub async fn signal_process(&self, id: &str, signal: Signal) -> Result<()> {
        let container =
            self.existing_container().await.ok_or_else(|| airlock_container::Error::NoSuchProcess(id.into()))?;
        Ok(container.signal_process(id, signal).await?)
    }

    pub async fn wait_process(&self, id: &str) -> Result<Option<i32>> {
        let container =
            self.existing_container().await.ok_or_else(|| airlock_container::Error::NoSuchProcess(id.into()))?;
        Ok(container.wait_process(id).await?)
    }

    /// Opens a terminal session in the container. At most `max_ptys` are open
    /// at once (past it, [`Error::SandboxLimit`]); an open one keeps the
    /// sandbox awake.
    pub async fn open_pty(&self, request: ExecRequest, size: PtySize) -> Result<SandboxPty> {
        self.require_container_tier("a terminal")?;
        let _active = self.begin().await?;
        let open = OpenStream::pty(&self.inner)?;
        let container = self.container().await?;
        let session = container.open_pty(request, size).await?;
        Ok(SandboxPty { session, _open: open })
    }

    /// Opens a TCP stream to `127.0.0.1:<port>` inside the sandbox's container,
    /// with no network in between (for preview URLs). An open stream keeps
    /// the sandbox awake.
    pub async fn connect_port(&self, port: u16) -> Result<SandboxPortStream> {
        let needs = Needs { ports: true, native: true, ..Needs::default() };
        route(&needs, self.inner.config.tier)?;
        let _active = self.begin().await?;
        let container = self.container().await?;
        let stream = container.connect_port(port).await?;
        Ok(SandboxPortStream { stream, _open: OpenStream::port(&self.inner) })
    }

    /// Who files the host makes in the workspace belong to: the container
    /// user's host ids (through the engine's uid remapping when it remaps, so
    /// nobody else on the host), when Airlock runs as root and can give them
    /// away. While the sandbox has no container handle (or it is being made)
    /// the files stay the host's user's, and the next container command
    /// hands the workspace over first, as after an isolate's run.
    fn sandbox_owner(&self) -> Option<Owner> {
        if !rustix::process::geteuid().is_root() {
            return None;
        }
        let owner = self.inner.container.try_lock().ok().and_then(|slot| slot.as_ref().map(|c| c.workspace_owner()));
        match owner {
            Some(Ok(Some(owner))) => Some(owner),
            _ => {
                self.inner.isolate_wrote.store(true, Ordering::SeqCst);
                None
            }
        }
    }

    /// Under runsc with uid remapping, the engine's remapped root must pass
    /// through the runtime's private directories above the workspace (runsc
    /// opens bind-mount sources as it): their group becomes its group, with
    /// search only (0710). Again before every start, since opening the runtime
    /// closes them to 0700.
    fn let_remapped_root_pass(&self, engine: &airlock_container::DockerEngine) -> Result<()> {
        if self.inner.config.container_runtime != airlock_container::ContainerRuntime::Runsc {
            return Ok(());
        }
        let home = self.runtime.home();
        let workspace = self.inner.workspace.host_path();
        for dir in workspace.ancestors().skip(1).take_while(|dir| dir.starts_with(home)) {
            engine.let_remapped_root_pass(dir)?;
        }
        Ok(())
    }

    async fn existing_container(&self) -> Option<ContainerSandbox> {
        self.inner.container.lock().await.clone()
    }

    /// The sandbox's container, running: adopted from the engine when the
    /// registry knows it, started when asleep, created when there is none.
    /// One at a time per sandbox, so there is never a second container.
    pub async fn container(&self) -> Result<ContainerSandbox> {
        let container = self.running_container().await?;
        // Files an isolate made belong to the host's user: the container's
        // user could read them but not change them. Hand them over first.
        // The walk goes through descriptors (links changed themselves, never
        // followed), so code racing it cannot steer it out of the workspace.
        if self.inner.isolate_wrote.swap(false, Ordering::SeqCst)
            && let Some(owner) = container.workspace_owner()?
        {
            files::hand_over(&self.inner.dir, owner).await?;
        }
        Ok(container)
    }

    async fn running_container(&self) -> Result<ContainerSandbox> {
        let mut slot = self.inner.container.lock().await;
        // Bound before the container starts, so its first request finds it.
        let egress_dir = self.ensure_proxy()?;
        if let Some(container) = slot.as_ref() {
            if self.inner.container_stopped.swap(false, Ordering::SeqCst) {
                self.let_remapped_root_pass(container.engine())?;
                container.start().await?;
                self.inner.emit(SandboxEvent::Lifecycle { change: Lifecycle::ContainerStarted });
            }
            return Ok(container.clone());
        }
        let containers = self.runtime.containers().await?;
        let engine = &containers.engine;
        self.let_remapped_root_pass(engine)?;
        let known = match self.inner.container_id() {
            Some(id) => adopt_running(engine, &id).await?,
            None => None,
        };
        let container = match known {
            Some(container) => container,
            None => {
                let image = self.inner.config.image.clone().unwrap_or_else(|| containers.base_image.clone());
                let mut spec = SandboxSpec::new(self.inner.id.to_string(), image, self.inner.workspace.host_path())
                    .runtime(self.inner.config.container_runtime)
                    .resources(self.inner.config.resources)
                    .egress(egress_dir);
                spec.labels.insert(HOME_LABEL.into(), self.runtime.inner.home_label.clone());
                // The same quota on the writable layer: by the engine where its
                // storage can hold one, else by keeping the layer on the
                // sandbox's own filesystem, in its quota group.
                if engine.supports_writable_layer_quota() {
                    spec = spec.disk_limit(self.inner.config.disk);
                } else if let Some(home) =
                    self.runtime.inner.disk.layer_home(&self.runtime.sandbox_dir(self.inner.id))?
                {
                    spec = spec.writable_layer_in(home);
                }
                match ContainerSandbox::create_started(engine, spec).await {
                    Ok(container) => container,
                    // The engine has one by this sandbox's name (made before a
                    // crash, never recorded): that one is ours.
                    Err(conflict) if conflict.is_conflict() => {
                        tracing::debug!(error = %conflict, "adopting the sandbox's existing container");
                        adopt_running(engine, &container_name(&self.inner.id.to_string())).await?.ok_or_else(|| {
                            airlock_container::Error::NotRunning(container_name(&self.inner.id.to_string()))
                        })?
                    }
                    Err(error) => return Err(error.into()),
                }
            }
        };
        self.runtime.inner.store.set_container(self.inner.id, Some(container.container_id()))?;
        self.inner.set_container_id(Some(container.container_id().to_string()));
        self.inner.container_stopped.store(false, Ordering::SeqCst);
        *slot = Some(container.clone());
        self.inner.emit(SandboxEvent::Lifecycle { change: Lifecycle::ContainerStarted });
        Ok(container)
    }

    /// What the idle sweep calls. Idleness is checked again under the
    /// lifecycle lock, held alone, so no operation can begin between the check
    /// and the sleep: one that began after the sweep looked has ended (and
    /// restarted the idle clock) by the time the lock is had. A running
    /// background process (a dev server is not idle) restarts the idle clock.
    pub(crate) async fn sleep_if_idle(&self) -> Result<()> {
        let alone = self.inner.lifecycle.write().await;
        if !self.inner.should_sleep() {
            return Ok(());
        }
        let busy = match self.existing_container().await {
            Some(container) => container.list_processes().iter().any(|p| p.status == ProcessStatus::Running),
            None => false,
        };
        if busy {
            *lock(&self.inner.last_active) = Instant::now();
            return Ok(());
        }
        self.sleep_alone(alone).await
    }

    /// Puts the sandbox to sleep now: its container stopped (filesystem kept),
    /// its contexts' instances and kernels let go (each context is kept, and
    /// rebuilt by replay on its next evaluation). Waits for running operations to end.
    pub async fn sleep(&self) -> Result<()> {
        let alone = self.inner.lifecycle.write().await;
        self.sleep_alone(alone).await
    }

    async fn sleep_alone(&self, _alone: tokio::sync::RwLockWriteGuard<'_, ()>) -> Result<()> {
        if self.inner.state() == SandboxState::Sleeping {
            return Ok(());
        }
        if let Some(container) = self.inner.container.lock().await.as_ref() {
            container.stop().await?;
            self.inner.container_stopped.store(true, Ordering::SeqCst);
        }
        self.suspend_contexts().await;
        self.runtime.inner.store.set_state(self.inner.id, SandboxState::Sleeping)?;
        lock(&self.inner.record).state = SandboxState::Sleeping;
        self.inner.emit(SandboxEvent::Lifecycle { change: Lifecycle::Slept });
        Ok(())
    }

    /// Lets go of every context's live state (isolate instances, kernels, the
    /// history in memory) and keeps the contexts: each is dormant until its
    /// next evaluation rebuilds it from its history in the registry, so a
    /// sleeping sandbox holds next to no host memory for its contexts.
    /// Called with the lifecycle lock held alone, so no evaluation holds a
    /// context's home.
    async fn suspend_contexts(&self) {
        let contexts: Vec<Arc<ContextHandle>> = lock(&self.inner.contexts).values().cloned().collect();
        for handle in contexts {
            let mut home = handle.home.lock().await;
            if let Some(isolate) = lock(&handle.isolate).take() {
                let _ = self.runtime.inner.interpreters.delete(&isolate);
            }
            // A kernel is dropped here (its process tree killed, if the
            // container still ran it).
            *home = Home::Dormant;
            *lock(&handle.history) = History::default();
        }
    }

    /// Forgets every context, in memory and in the registry: isolate
    /// instances go at once, kernels when an evaluation running on them ends
    /// (and with the container anyway).
    pub(crate) fn drop_contexts(&self) {
        let contexts: Vec<Arc<ContextHandle>> = lock(&self.inner.contexts).drain().map(|(_, handle)| handle).collect();
        for handle in contexts {
            if let Some(isolate) = lock(&handle.isolate).take() {
                let _ = self.runtime.inner.interpreters.delete(&isolate);
            }
        }
        if let Err(error) = self.runtime.inner.store.delete_contexts(self.inner.id) {
            tracing::warn!(%error, sandbox = %self.inner.name, "forgetting the sandbox's stored contexts failed");
        }
    }

    /// Wakes the sandbox now (any operation does this too), starting its container if it has one.
    pub async fn wake(&self) -> Result<()> {
        let _active = self.begin().await?;
        if self.inner.container_id().is_some() {
            self.container().await?;
        }
        Ok(())
    }

    pub(crate) async fn destroy(&self) -> Result<()> {
        let _alone = self.inner.lifecycle.write().await;
        let container = self.inner.container.lock().await.take();
        match container {
            Some(container) => container.remove().await?,
            None => {
                if let Some(id) = self.inner.container_id() {
                    let containers = self.runtime.containers().await?;
                    if let Ok(container) = ContainerSandbox::adopt(&containers.engine, &id).await {
                        container.remove().await?;
                    }
                }
            }
        }
        self.drop_contexts();
        self.stop_proxy();
        self.runtime.inner.store.delete(self.inner.id)?;
        self.runtime.forget(self.inner.id);
        self.inner.emit(SandboxEvent::Lifecycle { change: Lifecycle::Destroyed });
        // With disk quotas, a subvolume deleted at once, its quota with it.
        self.runtime.inner.disk.remove_sandbox_dir(&self.runtime.sandbox_dir(self.inner.id))
    }
}

/// The container `id` (or name), running; `None` when the engine no longer has it.
async fn adopt_running(engine: &airlock_container::DockerEngine, id: &str) -> Result<Option<ContainerSandbox>> {
    let container = match ContainerSandbox::adopt(engine, id).await {
        Ok(container) => container,
        Err(error) if error.is_not_found() => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    match container.state().await? {
        ContainerState::Running => {}
        ContainerState::Paused => container.unpause().await?,
        ContainerState::Gone | ContainerState::Removing | ContainerState::Dead => return Ok(None),
        _ => container.start().await?,
    }
    Ok(Some(container))
}



