//! The `Runtime`: one per host application. Opens the registry, holds the
//! isolate engine and (once a sandbox needs it) the container engine, hands
//! out sandboxes by name, puts idle ones to sleep, and reconciles the registry
//! with the container engine when it opens.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use airlock_container::{
    DockerEngine, EngineOptions, HOME_LABEL, ImageRecipe, ensure_base_image, list_labelled, remove_container,
};
use airlock_core::{SandboxId, SandboxName, TierKind};
use airlock_wasm::interpreter::{Interpreters, default_interpreter_dir};
use airlock_wasm::{EngineConfig, IsolateEngine};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::SandboxConfig;
use crate::disk::{DiskOptions, DiskStatus, HomeDisk};
use crate::egress::LateRuntime;
use crate::error::{Error, Result};
use crate::home_lock::HomeLock;
use crate::sandbox::{Sandbox, SandboxInner};
use crate::store::{EgressTotals, SandboxRecord, SandboxState, Store, TokenStore, UsageTotals};

/// What one vCPU-second of active CPU costs by default, in US dollars (the
/// figure in Cloudflare's announcement of active-CPU pricing).
pub const DEFAULT_PRICE_PER_VCPU_SECOND: f64 = 0.000_02;
/// Interpreter contexts the runtime keeps made ahead per language, for any
/// sandbox's one-shot code or new context (each about 8 MiB for Python): a
/// run finds an instance ready instead of waiting for one.
pub const RUNTIME_WARM_CONTEXTS: usize = 4;
/// How often idle sandboxes are looked for.
pub const IDLE_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// The registry's file in the home directory.
pub const DATABASE_FILE: &str = "airlock.db";
/// Mode of the home, its `sandboxes/` directory and each sandbox's directory:
/// the runtime's user alone may list, read or pass through them, so no other
/// host user reaches a workspace, the registry or the guest cache.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// How a runtime is opened. Every field has a default ([`RuntimeOptions::new`]).
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Where the registry and the sandboxes' workspaces live.
    pub home: PathBuf,
    /// The isolate engine's configuration (guest cache, concurrency).
    pub isolates: EngineConfig,
    /// Where the interpreter components are.
    pub interpreters: PathBuf,
    /// How the container engine is reached (and set up, when allowed), on the
    /// first request that needs a container.
    pub docker: EngineOptions,
    /// The base image's recipe, built on first use when missing.
    pub image: ImageRecipe,
    pub price_per_vcpu_second: f64,
    /// Reconcile with the container engine on open when it answers (it is not
    /// set up for this; an engine that is down is left alone).
    pub reconcile: bool,
    /// Per-sandbox disk quotas: the home's filesystem image and whether quotas
    /// must hold (see [`crate::DiskStatus`]).
    pub disk: DiskOptions,
    /// How long [`Runtime::open`] waits for another process that owns the
    /// home to let it go before it fails with [`Error::HomeInUse`].
    pub home_lock_wait: Duration,
    /// What a process refused the home is told owns it (such as "airlock serve").
    pub home_role: String,
    /// Hosts no sandbox may reach, whatever its own network policy allows
    /// (such as a cloud metadata name): added to the deny list of every
    /// sandbox's policy in force ([`Runtime::network_policy_watch`]). Empty by
    /// default. There is no runtime-wide allow ceiling: a sandbox's allow
    /// list is bounded only by this list and the proxy's own refusals.
    pub network_deny: Vec<airlock_core::HostPattern>,
    /// The egress proxy's limits and the extra roots it trusts when it dials
    /// HTTPS itself (defaults: [`airlock_egress::EgressConfig`]).
    pub egress: airlock_egress::EgressConfig,
    /// Snapshots kept per sandbox: taking one more deletes the oldest
    /// (default [`crate::DEFAULT_MAX_SNAPSHOTS_PER_SANDBOX`]; at least 1).
    pub max_snapshots_per_sandbox: usize,
}

impl RuntimeOptions {
    /// Defaults, with the guest cache under `home`.
    pub fn new(home: impl Into<PathBuf>) -> Self {
        let home = home.into();
        let isolates = EngineConfig { cache_dir: Some(home.join("cache").join("guests")), ..EngineConfig::default() };
        Self {
            home,
            isolates,
            interpreters: default_interpreter_dir(),
            docker: EngineOptions::default(),
            image: ImageRecipe::default(),
            price_per_vcpu_second: DEFAULT_PRICE_PER_VCPU_SECOND,
            reconcile: true,
            disk: DiskOptions::default(),
            home_lock_wait: Duration::ZERO,
            home_role: "an embedding program".to_string(),
            network_deny: Vec::new(),
            egress: airlock_egress::EgressConfig::default(),
            max_snapshots_per_sandbox: crate::snapshot::DEFAULT_MAX_SNAPSHOTS_PER_SANDBOX,
        }
    }
}

/// `$AIRLOCK_HOME`, else `$XDG_DATA_HOME/airlock`, else `$HOME/.local/share/airlock`,
/// else `./.airlock`.
pub fn default_home() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(home) = var("AIRLOCK_HOME") {
        return home;
    }
    if let Some(data) = var("XDG_DATA_HOME") {
        return data.join("airlock");
    }
    var("HOME").map_or_else(|| PathBuf::from(".airlock"), |home| home.join(".local").join("share").join("airlock"))
}

/// One sandbox as listed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SandboxInfo {
    pub id: String,
    pub name: String,
    pub state: SandboxState,
    pub created_at_ms: u128,
    /// Why the sandbox first moved to the container tier, if it has.
    pub escalated: Option<String>,
    pub container_id: Option<String>,
    pub config: SandboxConfig,
    /// The id of the API token it was created with (`airlock token list`);
    /// `None` when it was made in process, by the CLI or an embedding program.
    pub owner: Option<String>,
}

impl From<&SandboxRecord> for SandboxInfo {
    fn from(record: &SandboxRecord) -> Self {
        Self {
            id: record.id.to_string(),
            name: record.name.to_string(),
            state: record.state,
            created_at_ms: record.created_at.duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0),
            escalated: record.escalated.clone(),
            container_id: record.container_id.clone(),
            config: record.config.clone(),
            owner: record.owner.clone(),
        }
    }
}

/// Which executions a usage report covers.
#[derive(Debug, Clone, Default)]
pub struct UsageQuery {
    /// One sandbox by name; `None` is all of them.
    pub sandbox: Option<String>,
    /// From this time (inclusive); `None` is the beginning.
    pub since: Option<SystemTime>,
    /// Until this time (exclusive); `None` is now.
    pub until: Option<SystemTime>,
}

/// Active-CPU usage and what it costs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Usage {
    pub total: UsageTotals,
    pub isolate: UsageTotals,
    pub container: UsageTotals,
    pub cpu_seconds: f64,
    pub price_per_vcpu_second: f64,
    pub cost_usd: f64,
    /// What the egress proxy allowed and refused, and the bytes it moved.
    pub egress: EgressTotals,
}

/// The container engine and the base image, once a sandbox has needed them.
#[derive(Debug, Clone)]
pub(crate) struct Containers {
    pub engine: DockerEngine,
    pub base_image: String,
}

/// The embedded runtime. Cheap to clone; clones share everything.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub(crate) inner: Arc<RuntimeInner>,
}

#[derive(Debug)]
pub(crate) struct RuntimeInner {
    pub options: RuntimeOptions,
    pub store: Store,
    /// The API's bearer tokens, on a connection of their own.
    tokens: TokenStore,
    pub isolates: IsolateEngine,
    pub interpreters: Interpreters,
    containers: tokio::sync::OnceCell<Containers>,
    sandboxes: Mutex<HashMap<SandboxId, Arc<SandboxInner>>>,
    /// The value of every container's [`HOME_LABEL`] made by this runtime.
    pub home_label: String,
    reaper: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// After everything that may hold a directory in it, so that it is
    /// dropped (and the image unmounted) late.
    pub disk: HomeDisk,
    /// The egress proxy factory: one CA, one configuration, every sandbox's proxy.
    pub egress: airlock_egress::Egress,
    /// Last: the home is let go only when all of the above is.
    _home_lock: Arc<HomeLock>,
}

impl Drop for RuntimeInner {
    fn drop(&mut self) {
        if let Some(reaper) = lock(&self.reaper).take() {
            reaper.abort();
        }
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Runtime {
    /// Opens the runtime at [`default_home`].
    pub async fn open_default() -> Result<Self> {
        Self::open(RuntimeOptions::new(default_home())).await
    }

    /// Opens (creating where missing) the home, its registry and the engines,
    /// reconciles with the container engine, and starts putting idle
    /// sandboxes to sleep. Call it inside a Tokio runtime.
    pub async fn open(options: RuntimeOptions) -> Result<Self> {
        std::fs::create_dir_all(options.home.join("sandboxes")).map_err(|source| Error::File {
            operation: "create home",
            path: options.home.display().to_string(),
            source,
        })?;
        let home = options.home.canonicalize().map_err(|source| Error::File {
            operation: "open home",
            path: options.home.display().to_string(),
            source,
        })?;
        // Owned before anything in it is touched: one process per home.
        let home_lock = {
            let (home, role, wait) = (home.clone(), options.home_role.clone(), options.home_lock_wait);
            tokio::task::spawn_blocking(move || crate::home_lock::claim(&home, &role, wait))
                .await
                .map_err(|e| Error::Disk(format!("locking the home stopped: {e}")))??
        };
        // Mounted before any sandbox directory is looked at.
        let disk = {
            let (home, disk) = (home.clone(), options.disk.clone());
            tokio::task::spawn_blocking(move || HomeDisk::open(&home, &disk))
                .await
                .map_err(|e| Error::Disk(format!("setting up the home's disk stopped: {e}")))??
        };
        // After the mount: `sandboxes/` may be the mounted image's root.
        make_private(&home)?;
        make_private(&home.join("sandboxes"))?;
        let store = Store::open(&home.join(DATABASE_FILE))?;
        let tokens = TokenStore::open(&home)?;
        let isolates = IsolateEngine::new(options.isolates.clone())?;
        let interpreters =
            Interpreters::new(isolates.clone(), options.interpreters.clone()).keep_warm(RUNTIME_WARM_CONTEXTS);
        let home_label: String =
            Sha256::digest(home.as_os_str().as_encoded_bytes()).iter().take(8).map(|b| format!("{b:02x}")).collect();
        let late = LateRuntime::default();
        let egress = crate::egress::open(&home, options.egress.clone(), &late)?;
        let options = RuntimeOptions { home, ..options };
        let runtime = Self {
            inner: Arc::new(RuntimeInner {
                options,
                store,
                tokens,
                isolates,
                interpreters,
                containers: tokio::sync::OnceCell::new(),
                sandboxes: Mutex::default(),
                home_label,
                reaper: Mutex::new(None),
                disk,
                egress,
                _home_lock: home_lock,
            }),
        };
        late.set(&runtime.inner);
        for record in runtime.inner.store.list()? {
            // Directories made before they were closed are closed now.
            match make_private(&runtime.sandbox_dir(record.id)) {
                Err(Error::File { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
                other => other?,
            }
            runtime.load(record)?;
        }
        if runtime.inner.options.reconcile {
            runtime.reconcile().await?;
        }
        let reaper = tokio::spawn(sweep_idle(Arc::downgrade(&runtime.inner)));
        *lock(&runtime.inner.reaper) = Some(reaper);
        Ok(runtime)
    }

    pub fn home(&self) -> &Path {
        &self.inner.options.home
    }

    /// The value of the `airlock.home` label on this runtime's containers:
    /// reconciliation touches only containers that carry it.
    pub fn home_label(&self) -> &str {
        &self.inner.home_label
    }

    /// Whether each sandbox's disk quota is enforced, and if not, why.
    pub fn disk_status(&self) -> &DiskStatus {
        self.inner.disk.status()
    }

    /// The API's bearer tokens (in this home's registry).
    pub fn tokens(&self) -> &TokenStore {
        &self.inner.tokens
    }

    /// The isolate engine, shared by every sandbox.
    pub fn isolate_engine(&self) -> &IsolateEngine {
        &self.inner.isolates
    }

    /// The sandbox named `name`, created with the default configuration when
    /// there is none.
    pub async fn sandbox(&self, name: &str) -> Result<Sandbox> {
        self.sandbox_with(name, SandboxConfig::default()).await
    }

    /// The sandbox named `name`, created with `config` when there is none (an
    /// existing sandbox keeps its own configuration).
    pub async fn sandbox_with(&self, name: &str, config: SandboxConfig) -> Result<Sandbox> {
        let name = SandboxName::new(name)?;
        if let Some(found) = self.find(&name)? {
            return Ok(found);
        }
        match self.insert_new(&name, config, None)? {
            Some(sandbox) => Ok(sandbox),
            // Another caller created it first: theirs stands.
            None => self.find(&name)?.ok_or_else(|| Error::NoSuchSandbox(name.to_string())),
        }
    }

    /// Creates the sandbox named `name` with `config`, recording `owner` (an
    /// API token's id; `None` for no tenant). `Ok(None)` when the name is
    /// taken, by anyone: nothing is made and the existing sandbox is untouched.
    pub async fn create_sandbox(
        &self,
        name: &str,
        config: SandboxConfig,
        owner: Option<&str>,
    ) -> Result<Option<Sandbox>> {
        let name = SandboxName::new(name)?;
        if self.inner.store.by_name(&name)?.is_some() {
            return Ok(None);
        }
        self.insert_new(&name, config, owner.map(str::to_string))
    }

    /// Makes a new sandbox's directories and record; `Ok(None)` (and nothing
    /// left behind) when another caller took the name first.
    fn insert_new(&self, name: &SandboxName, config: SandboxConfig, owner: Option<String>) -> Result<Option<Sandbox>> {
        config.validate()?;
        let record = SandboxRecord {
            id: SandboxId::new(),
            name: name.clone(),
            created_at: SystemTime::now(),
            config,
            state: SandboxState::Active,
            escalated: None,
            container_id: None,
            owner,
        };
        self.inner.disk.create_sandbox_dir(&self.sandbox_dir(record.id), record.config.disk)?;
        make_private(&self.sandbox_dir(record.id))?;
        let workspace = self.workspace_dir(record.id);
        std::fs::create_dir_all(&workspace).map_err(|source| Error::File {
            operation: "create workspace",
            path: workspace.display().to_string(),
            source,
        })?;
        // Not inserted (the name is taken, or its policy names a missing
        // secret): nothing is left behind.
        match self.inner.store.insert(&record) {
            Ok(true) => {}
            other => {
                let _ = self.inner.disk.remove_sandbox_dir(&self.sandbox_dir(record.id));
                other?;
                return Ok(None);
            }
        }
        self.load(record).map(Some)
    }

    /// The sandbox named `name`, if there is one.
    pub fn get(&self, name: &str) -> Result<Option<Sandbox>> {
        self.find(&SandboxName::new(name)?)
    }

    fn find(&self, name: &SandboxName) -> Result<Option<Sandbox>> {
        let loaded = lock(&self.inner.sandboxes).values().find(|inner| inner.name == *name).cloned();
        if let Some(inner) = loaded {
            return Ok(Some(Sandbox { runtime: self.clone(), inner }));
        }
        // Another process on the same home may have made it since.
        match self.inner.store.by_name(name)? {
            Some(record) => self.load(record).map(Some),
            None => Ok(None),
        }
    }

    pub(crate) fn load(&self, record: SandboxRecord) -> Result<Sandbox> {
        let mut sandboxes = lock(&self.inner.sandboxes);
        let inner = match sandboxes.get(&record.id) {
            Some(inner) => inner.clone(),
            None => {
                let workspace = self.workspace_dir(record.id);
                let network = Arc::new(self.effective_policy(&record.config.policy.network));
                let inner = Arc::new(SandboxInner::new(record, &workspace, network)?);
                // Its contexts, dormant: rebuilt by replay when next used.
                inner.adopt_stored_contexts(self.inner.store.contexts(inner.id)?);
                sandboxes.insert(inner.id, inner.clone());
                inner
            }
        };
        Ok(Sandbox { runtime: self.clone(), inner })
    }

    pub(crate) fn forget(&self, id: SandboxId) {
        lock(&self.inner.sandboxes).remove(&id);
    }

    pub(crate) fn sandbox_dir(&self, id: SandboxId) -> PathBuf {
        self.inner.options.home.join("sandboxes").join(id.to_string())
    }

    fn workspace_dir(&self, id: SandboxId) -> PathBuf {
        self.sandbox_dir(id).join("workspace")
    }

    /// Every sandbox, by name.
    pub fn list(&self) -> Result<Vec<SandboxInfo>> {
        Ok(self.inner.store.list()?.iter().map(SandboxInfo::from).collect())
    }

    /// Destroys the sandbox named `name`: its container, contexts, workspace
    /// and registry entry. Its usage records stay.
    pub async fn destroy(&self, name: &str) -> Result<()> {
        let sandbox = self.get(name)?.ok_or_else(|| Error::NoSuchSandbox(name.to_string()))?;
        sandbox.destroy().await
    }

    /// Destroys `sandbox`, this very one (by its id): not whatever sandbox
    /// holds its name by the time this runs.
    pub async fn destroy_sandbox(&self, sandbox: &Sandbox) -> Result<()> {
        sandbox.destroy().await
    }

    /// Active-CPU usage and its cost.
    pub fn usage(&self, query: &UsageQuery) -> Result<Usage> {
        let sandbox = match &query.sandbox {
            Some(name) => Some(self.get(name)?.ok_or_else(|| Error::NoSuchSandbox(name.clone()))?.inner.id),
            None => None,
        };
        let since = query.since.unwrap_or(UNIX_EPOCH);
        // A millisecond ahead: what was recorded this very millisecond counts.
        let until = query.until.unwrap_or_else(|| SystemTime::now() + Duration::from_millis(1));
        let store = &self.inner.store;
        let total = store.usage(sandbox, since, until, None)?;
        let isolate = store.usage(sandbox, since, until, Some(TierKind::Isolate))?;
        let container = store.usage(sandbox, since, until, Some(TierKind::Container))?;
        let cpu_seconds = total.cpu_time.as_secs_f64();
        let price = self.inner.options.price_per_vcpu_second;
        Ok(Usage {
            total,
            isolate,
            container,
            cpu_seconds,
            price_per_vcpu_second: price,
            cost_usd: cpu_seconds * price,
            egress: store.egress_usage(sandbox, since, until)?,
        })
    }

    /// The container engine and base image, connected (and set up where the
    /// options allow) on first use.
    pub(crate) async fn containers(&self) -> Result<&Containers> {
        let options = &self.inner.options;
        self.inner
            .containers
            .get_or_try_init(|| async {
                let engine = DockerEngine::connect_or_setup(&options.docker).await?;
                let progress = Arc::new(|line: &str| tracing::info!("{line}"));
                let base_image = ensure_base_image(&engine, &options.image, progress).await?;
                Ok::<_, Error>(Containers { engine, base_image })
            })
            .await
    }

    /// Matches the engine's Airlock containers of this home against the
    /// registry: a container of a known sandbox is recorded as its container;
    /// any other is removed (an orphan of a crash between create and record,
    /// or of a destroyed sandbox). Skipped when the engine does not answer.
    async fn reconcile(&self) -> Result<()> {
        let Ok(engine) = DockerEngine::connect(&self.inner.options.docker.socket).await else {
            tracing::debug!("no container engine to reconcile with");
            return Ok(());
        };
        let containers = list_labelled(&engine).await?;
        let known: HashMap<String, Arc<SandboxInner>> =
            lock(&self.inner.sandboxes).values().map(|inner| (inner.id.to_string(), inner.clone())).collect();
        let mut seen = std::collections::HashSet::new();
        for container in containers {
            if container.labels.get(HOME_LABEL) != Some(&self.inner.home_label) {
                continue;
            }
            match known.get(&container.sandbox_id) {
                Some(inner) if seen.insert(inner.id) => {
                    if inner.container_id().as_deref() != Some(container.container_id.as_str()) {
                        self.inner.store.set_container(inner.id, Some(&container.container_id))?;
                        inner.set_container_id(Some(container.container_id.clone()));
                    }
                }
                _ => {
                    tracing::info!(container = %container.container_id, sandbox = %container.sandbox_id, "removing an orphaned container");
                    if let Err(error) = remove_container(&engine, &container.container_id).await {
                        // Left for the next open; it cannot harm a sandbox.
                        tracing::warn!(%error, container = %container.container_id, "removing an orphan failed");
                    }
                }
            }
        }
        for inner in known.values() {
            if !seen.contains(&inner.id) && inner.container_id().is_some() {
                self.inner.store.set_container(inner.id, None)?;
                inner.set_container_id(None);
            }
        }
        Ok(())
    }
}

/// Closes a directory the runtime made to every other host user ([`PRIVATE_DIR_MODE`]).
pub(crate) fn make_private(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(PRIVATE_DIR_MODE)).map_err(|source| Error::File {
        operation: "close to other users",
        path: dir.display().to_string(),
        source,
    })
}

/// Puts sandboxes that have been idle past their timeout to sleep, until the
/// runtime is dropped.
async fn sweep_idle(runtime: Weak<RuntimeInner>) {
    loop {
        tokio::time::sleep(IDLE_SWEEP_INTERVAL).await;
        let Some(inner) = runtime.upgrade() else { return };
        let sleepy: Vec<Arc<SandboxInner>> =
            lock(&inner.sandboxes).values().filter(|sandbox| sandbox.should_sleep()).cloned().collect();
        let runtime = Runtime { inner };
        for inner in sleepy {
            let sandbox = Sandbox { runtime: runtime.clone(), inner };
            if let Err(error) = sandbox.sleep_if_idle().await {
                tracing::warn!(%error, sandbox = %sandbox.name(), "putting an idle sandbox to sleep failed");
            }
        }
    }
}
