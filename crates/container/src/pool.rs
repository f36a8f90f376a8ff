//! The warm pool: sandboxes created, started and frozen ahead of demand, so
//! that a claim costs an unpause instead of a create and start.
//!
//! A pooled sandbox is a whole new sandbox: its id and its workspace directory
//! (`<workspace root>/<id>/workspace`) are chosen when it is made, because the
//! workspace is bind-mounted at create time and cannot be swapped into a
//! running container. A claim therefore serves a new sandbox; a sandbox whose
//! workspace already exists (one escalating from the isolate tier) is created
//! cold. The pool refills in the background after each claim.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use airlock_core::SandboxId;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::engine::{ContainerRuntime, DockerEngine};
use crate::error::{Error, Result};
use crate::sandbox::ContainerSandbox;
use crate::spec::{ContainerResources, POOL_LABEL, SandboxSpec};

/// Largest pool a template may have: each idle sandbox holds a container.
pub const MAX_POOL_SIZE: usize = 256;
/// Pause between attempts when filling the pool fails (engine busy or down).
const REFILL_BACKOFF: Duration = Duration::from_secs(1);

/// What every sandbox in one pool (or one [`ContainerTier`](crate::ContainerTier)) is made of.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolTemplate {
    pub image: String,
    pub runtime: ContainerRuntime,
    pub resources: ContainerResources,
}

impl PoolTemplate {
    /// A short hash naming the pool; the value of its containers' pool label.
    pub fn key(&self) -> String {
        let text = format!(
            "{}|{}|{}|{}|{}",
            self.image, self.runtime, self.resources.memory_bytes, self.resources.pids, self.resources.cpu_millis
        );
        Sha256::digest(text.as_bytes()).iter().take(6).map(|byte| format!("{byte:02x}")).collect()
    }
}

/// N sandboxes of one template, running but frozen until claimed.
#[derive(Debug)]
pub struct WarmPool {
    inner: Arc<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    engine: DockerEngine,
    template: PoolTemplate,
    size: usize,
    workspace_root: PathBuf,
    idle: Mutex<VecDeque<ContainerSandbox>>,
    creating: AtomicUsize,
    wake: Notify,
    closed: AtomicBool,
}

impl WarmPool {
    /// Starts filling a pool of `size` (0 disables it: every claim misses).
    /// Workspaces of pooled sandboxes are made under `workspace_root`. Call it
    /// inside a Tokio runtime: the refill is a task on it.
    pub fn start(engine: &DockerEngine, template: PoolTemplate, size: usize, workspace_root: PathBuf) -> Result<Self> {
        if size > MAX_POOL_SIZE {
            return Err(Error::Invalid { what: "warm pool size", reason: format!("{size} is over {MAX_POOL_SIZE}") });
        }
        template.resources.validate()?;
        engine.require_runtime(template.runtime)?;
        let inner = Arc::new(PoolInner {
            engine: engine.clone(),
            template,
            size,
            workspace_root,
            idle: Mutex::new(VecDeque::new()),
            creating: AtomicUsize::new(0),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
        });
        if size > 0 {
            tokio::spawn(refill(inner.clone()));
        }
        Ok(Self { inner })
    }

    pub fn template(&self) -> &PoolTemplate {
        &self.inner.template
    }

    /// Sandboxes ready to be claimed now.
    pub fn idle(&self) -> usize {
        self.inner.idle.lock().map(|idle| idle.len()).unwrap_or(0)
    }

    /// Takes a ready sandbox, running, or `None` when the pool is empty.
    pub async fn claim(&self) -> Result<Option<ContainerSandbox>> {
        let taken = self.inner.idle.lock().ok().and_then(|mut idle| idle.pop_front());
        self.inner.wake.notify_one();
        let Some(sandbox) = taken else { return Ok(None) };
        match sandbox.unpause().await {
            Ok(()) => Ok(Some(sandbox)),
            Err(error) => {
                let _ = sandbox.remove().await;
                Err(error)
            }
        }
    }

    /// A claim, or a cold create and start of the same template when the pool is empty.
    pub async fn claim_or_create(&self) -> Result<ContainerSandbox> {
        if let Some(sandbox) = self.claim().await? {
            return Ok(sandbox);
        }
        self.inner.make(false).await
    }

    /// Waits until the pool holds `size` idle sandboxes, or `timeout` passes.
    pub async fn wait_until_full(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.idle() < self.inner.size {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Stops refilling and removes the idle sandboxes and their workspaces.
    pub async fn shutdown(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
        // Wait for creates in flight to land, so none is left behind.
        while self.inner.creating.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let idle: Vec<ContainerSandbox> =
            self.inner.idle.lock().map(|mut idle| idle.drain(..).collect()).unwrap_or_default();
        for sandbox in idle {
            sandbox.remove().await?;
            if let Some(sandbox_dir) = sandbox.spec().workspace.parent() {
                let _ = std::fs::remove_dir_all(sandbox_dir);
            }
        }
        Ok(())
    }
}

impl Drop for WarmPool {
    fn drop(&mut self) {
        // The refill task ends; idle containers keep their pool label, so a
        // runtime's reconciliation finds and removes them.
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
    }
}

impl PoolInner {
    /// One new sandbox of the template, started; frozen when `paused`.
    async fn make(&self, paused: bool) -> Result<ContainerSandbox> {
        let sandbox_id = SandboxId::new().to_string();
        let workspace = self.workspace_root.join(&sandbox_id).join("workspace");
        std::fs::create_dir_all(&workspace).map_err(Error::io(format!("creating {}", workspace.display())))?;
        let mut spec = SandboxSpec::new(&sandbox_id, &self.template.image, &workspace)
            .runtime(self.template.runtime)
            .resources(self.template.resources);
        spec.labels.insert(POOL_LABEL.into(), self.template.key());
        let made = async {
            let sandbox = ContainerSandbox::create_started(&self.engine, spec).await?;
            if paused && let Err(error) = sandbox.pause().await {
                let _ = sandbox.remove().await;
                return Err(error);
            }
            Ok(sandbox)
        }
        .await;
        if made.is_err() {
            let _ = std::fs::remove_dir_all(workspace.parent().unwrap_or(&workspace));
        }
        made
    }
}

async fn refill(pool: Arc<PoolInner>) {
    while !pool.closed.load(Ordering::SeqCst) {
        let idle = pool.idle.lock().map(|idle| idle.len()).unwrap_or(pool.size);
        if idle >= pool.size {
            pool.wake.notified().await;
            continue;
        }
        pool.creating.fetch_add(1, Ordering::SeqCst);
        let made = pool.make(true).await;
        match made {
            Ok(sandbox) if !pool.closed.load(Ordering::SeqCst) => {
                if let Ok(mut idle) = pool.idle.lock() {
                    idle.push_back(sandbox);
                }
            }
            Ok(sandbox) => {
                let _ = sandbox.remove().await;
                if let Some(dir) = sandbox.spec().workspace.parent() {
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
            Err(error) => {
                tracing::warn!(%error, pool = %pool.template.key(), "filling the warm pool failed");
                tokio::time::sleep(REFILL_BACKOFF).await;
            }
        }
        pool.creating.fetch_sub(1, Ordering::SeqCst);
    }
}
