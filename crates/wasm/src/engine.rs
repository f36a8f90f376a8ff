//! The one Wasmtime engine of a process, and loading guests into it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use airlock_core::Error;
use airlock_core::limits::{
    GIB, MAX_INSTANCES, MAX_MEMORY_BYTES, MAX_TABLE_ELEMENTS, MIB, format_duration, format_size,
};
use wasmtime::component::{Component, Linker as ComponentLinker};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, Linker, Module, OptLevel, PoolingAllocationConfig, Precompiled,
};
use wasmtime_wasi::p2::bindings::CommandPre;

use crate::cache::{DiskCache, FileStamp, Hash32, Rejected, Sha256Hasher, sha256};
use crate::guest::{Guest, GuestKind, GuestOrigin};
use crate::host::{ComponentHost, ModuleHost};
use crate::interpreter::bindings::InterpreterPre;
use crate::lru::Lru;

/// How often the engine's epoch advances. Deadlines are checked at each tick,
/// so a guest overruns its deadline by at most about one tick.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Default number of runs that may execute at once; each takes a slot of the
/// engine's pooling allocator, whose memory is reserved up front.
pub const DEFAULT_MAX_CONCURRENT_RUNS: u32 = 256;
/// Guest call-stack budget. Deep recursion past it traps as the stack limit.
pub const WASM_STACK_BYTES: usize = 512 * 1024;
/// Native stack each running guest executes on; must exceed the guest budget
/// with room for host calls.
const ASYNC_STACK_BYTES: usize = 2 * 1024 * 1024;
/// Core instances reserved per concurrent run (a component instantiates several).
const CORE_INSTANCES_PER_RUN: u32 = 8;
/// Linear memories and tables reserved per concurrent run.
const MEMORIES_PER_RUN: u32 = 4;
const TABLES_PER_RUN: u32 = 4;
/// Memory of a finished run kept mapped in its pool slot, reset in place
/// (only the pages the run dirtied, found with PAGEMAP_SCAN where the kernel
/// has it) instead of being unmapped: the next run in the slot then takes no
/// page faults for it. An interpreter dirties a few MiB per context.
const KEEP_RESIDENT_BYTES: usize = 32 * 1024 * 1024;
/// Largest guest file [`IsolateEngine::load_file`] accepts: files the
/// operator installs (an interpreter component is about 20 MiB).
pub const MAX_GUEST_BYTES: u64 = 256 * MIB;
/// Default cap on a guest handed to [`IsolateEngine::load_bytes`], the entry
/// point for guests a sandbox supplies (a `.wasm` in its workspace), after
/// wasm text is parsed. Compile time and memory grow with a module's size, so
/// this bounds what one upload can make the host do; the interpreters fit.
pub const MAX_WORKSPACE_GUEST_BYTES: u64 = 64 * MIB;
/// Default time a load waits for a guest to compile (including waiting for a
/// compile slot). Cranelift cannot be interrupted, so past it the caller gets
/// an error while the compile finishes in the background, holding its slot.
/// The Python interpreter (20 MiB of wasm) compiles in under a minute on a
/// busy 2-core machine. Loads of the operator's files
/// ([`IsolateEngine::load_file`]) take as long as their compile takes.
pub const DEFAULT_COMPILE_TIMEOUT: Duration = Duration::from_secs(120);
/// Default cap on guests from [`IsolateEngine::load_bytes`] compiling at
/// once, counting compiles whose caller gave up waiting: each uses CPU and
/// memory, and without the cap guests that time out could pile up behind one
/// another. The operator's files ([`IsolateEngine::load_file`]) take no slot.
pub const DEFAULT_MAX_CONCURRENT_COMPILES: usize = 2;
/// Default cap on the distinct guests the engine keeps loaded in memory
/// (compiled code, mapped); the least recently used is dropped past it (a
/// caller holding a `Guest` keeps it alive). Loading it again takes it from
/// the disk cache.
pub const DEFAULT_MAX_LOADED_GUESTS: usize = 64;
/// Default cap on the on-disk guest cache's total size; the least recently
/// used artifacts are removed past it. The Python interpreter's artifact is
/// about 40 MB.
pub const DEFAULT_MAX_CACHE_BYTES: u64 = GIB;
/// Guest file paths whose content hash the engine remembers (so an unchanged
/// file is not hashed again); the least recently used is forgotten past it.
const MAX_KNOWN_FILES: usize = 1024;

/// How the engine is set up. Every field is documented with its default.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Where compiled guests are cached. Default: [`default_cache_dir`].
    /// `None` compiles every guest once per process and keeps it in memory only.
    pub cache_dir: Option<PathBuf>,
    /// Runs that may execute at once. Default: [`DEFAULT_MAX_CONCURRENT_RUNS`].
    /// A run that would pass it fails with a clear error rather than waiting.
    pub max_concurrent_runs: u32,
    /// Largest guest [`IsolateEngine::load_bytes`] accepts.
    /// Default: [`MAX_WORKSPACE_GUEST_BYTES`].
    pub max_guest_bytes: u64,
    /// How long a load waits for a compile. Default: [`DEFAULT_COMPILE_TIMEOUT`].
    pub compile_timeout: Duration,
    /// Guests compiling at once. Default: [`DEFAULT_MAX_CONCURRENT_COMPILES`].
    pub max_concurrent_compiles: usize,
    /// Distinct guests kept loaded in memory. Default: [`DEFAULT_MAX_LOADED_GUESTS`].
    pub max_loaded_guests: usize,
    /// Total size of the on-disk cache. Default: [`DEFAULT_MAX_CACHE_BYTES`].
    pub max_cache_bytes: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            cache_dir: default_cache_dir(),
            max_concurrent_runs: DEFAULT_MAX_CONCURRENT_RUNS,
            max_guest_bytes: MAX_WORKSPACE_GUEST_BYTES,
            compile_timeout: DEFAULT_COMPILE_TIMEOUT,
            max_concurrent_compiles: DEFAULT_MAX_CONCURRENT_COMPILES,
            max_loaded_guests: DEFAULT_MAX_LOADED_GUESTS,
            max_cache_bytes: DEFAULT_MAX_CACHE_BYTES,
        }
    }
}

/// `$AIRLOCK_HOME/cache/guests`, else `$XDG_CACHE_HOME/airlock/guests`, else
/// `$HOME/.cache/airlock/guests`; `None` if none of these is set.
pub fn default_cache_dir() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(home) = var("AIRLOCK_HOME") {
        return Some(home.join("cache").join("guests"));
    }
    if let Some(cache) = var("XDG_CACHE_HOME") {
        return Some(cache.join("airlock").join("guests"));
    }
    var("HOME").map(|home| home.join(".cache").join("airlock").join("guests"))
}

/// A file we loaded before: if its size and modification time are unchanged,
/// its content hash is reused instead of hashing the file again.
struct KnownFile {
    stamp: FileStamp,
    source: Hash32,
}

pub(crate) struct EngineInner {
    pub(crate) engine: Engine,
    component_linker: ComponentLinker<ComponentHost>,
    module_linker: Linker<ModuleHost>,
    disk: Option<DiskCache>,
    guests: Mutex<Lru<Hash32, Guest>>,
    files: Mutex<Lru<PathBuf, KnownFile>>,
    compiles: Arc<CompileSlots>,
    compile_timeout: Duration,
    max_guest_bytes: u64,
    stop_ticker: Arc<AtomicBool>,
    ticker: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
        if let Some(ticker) = lock(&self.ticker).take() {
            let _ = ticker.join();
        }
    }
}

/// The isolate tier's engine: Cranelift, the pooling allocator with
/// copy-on-write memory images, epoch interruption, async execution. Create
/// one per process and clone it freely (clones share everything).
#[derive(Clone)]
pub struct IsolateEngine {
    pub(crate) inner: Arc<EngineInner>,
}

impl std::fmt::Debug for IsolateEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IsolateEngine").field("cache_dir", &self.cache_dir()).finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps hold only finished entries, so a panic elsewhere cannot leave them half-written.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn engine_error(context: &str, error: impl std::fmt::Display) -> Error {
    Error::Engine(format!("{context}: {error}"))
}

impl IsolateEngine {
    pub fn new(config: EngineConfig) -> Result<Self, Error> {
        let runs = config.max_concurrent_runs.max(1);
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(runs)
            .total_core_instances(runs.saturating_mul(CORE_INSTANCES_PER_RUN))
            .total_memories(runs.saturating_mul(MEMORIES_PER_RUN))
            .total_tables(runs.saturating_mul(TABLES_PER_RUN))
            .total_stacks(runs)
            .max_core_instances_per_component(u32::try_from(MAX_INSTANCES).unwrap_or(u32::MAX))
            .max_memory_size(usize::try_from(MAX_MEMORY_BYTES).unwrap_or(usize::MAX))
            .table_elements(usize::try_from(MAX_TABLE_ELEMENTS).unwrap_or(usize::MAX))
            .linear_memory_keep_resident(KEEP_RESIDENT_BYTES)
            .table_keep_resident(KEEP_RESIDENT_BYTES / 32)
            .async_stack_keep_resident(ASYNC_STACK_BYTES)
            .pagemap_scan(wasmtime::Enabled::Auto);

        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            .epoch_interruption(true)
            .cranelift_opt_level(OptLevel::Speed)
            .max_wasm_stack(WASM_STACK_BYTES)
            .async_stack_size(ASYNC_STACK_BYTES)
            .memory_init_cow(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wasm).map_err(|e| engine_error("cannot create the wasm engine", e))?;

        let mut component_linker = ComponentLinker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut component_linker)
            .map_err(|e| engine_error("cannot link WASI preview 2", e))?;
        // Outbound HTTP goes only through the store's hook (crate::outbound).
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut component_linker)
            .map_err(|e| engine_error("cannot link wasi:http", e))?;
        crate::host::add_open_at_with_errno(&mut component_linker)
            .map_err(|e| engine_error("cannot link the handle-capped open-at", e))?;
        // What interpreters report while evaluating (crate::interpreter::record).
        crate::interpreter::bindings::airlock::sandbox::host::add_to_linker::<_, wasmtime::component::HasSelf<_>>(
            &mut component_linker,
            |host: &mut ComponentHost| host,
        )
        .map_err(|e| engine_error("cannot link the interpreter host interface", e))?;
        let mut module_linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut module_linker, |host: &mut ModuleHost| &mut host.wasi)
            .map_err(|e| engine_error("cannot link WASI preview 1", e))?;

        let disk = config.cache_dir.map(|dir| {
            let mut hasher = Sha256Hasher::default();
            std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
            DiskCache::new(dir, hasher.digest(), config.max_cache_bytes)
        });

        let stop_ticker = Arc::new(AtomicBool::new(false));
        let ticker = {
            let engine = engine.clone();
            let stop = stop_ticker.clone();
            std::thread::Builder::new()
                .name("airlock-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| engine_error("cannot start the epoch thread", e))?
        };

        Ok(Self {
            inner: Arc::new(EngineInner {
                engine,
                component_linker,
                module_linker,
                disk,
                guests: Mutex::new(Lru::new(config.max_loaded_guests)),
                files: Mutex::new(Lru::new(MAX_KNOWN_FILES)),
                compiles: Arc::new(CompileSlots::new(config.max_concurrent_compiles)),
                compile_timeout: config.compile_timeout,
                max_guest_bytes: config.max_guest_bytes,
                stop_ticker,
                ticker: Mutex::new(Some(ticker)),
            }),
        })
    }

    /// The directory of the on-disk guest cache, if there is one.
    pub fn cache_dir(&self) -> Option<&Path> {
        self.inner.disk.as_ref().map(DiskCache::dir)
    }

    /// The largest guest [`Self::load_bytes`] accepts: a caller reading a
    /// guest from a workspace need read no more than this (one byte more
    /// tells it the guest is too large).
    pub fn max_guest_bytes(&self) -> u64 {
        self.inner.max_guest_bytes
    }

    /// Distinct guests loaded in memory now (at most the configured maximum).
    pub fn loaded_guests(&self) -> usize {
        lock(&self.inner.guests).len()
    }

    /// Compiles running now, including those whose caller stopped waiting.
    pub fn compiles_in_flight(&self) -> usize {
        self.inner.compiles.in_flight()
    }

    /// The cache file a guest with these bytes is kept in.
    pub fn cache_path_for(&self, wasm: &[u8]) -> Option<PathBuf> {
        self.inner.disk.as_ref().map(|disk| disk.path_for(&sha256(wasm)))
    }

    /// Loads a guest from a `.wasm` (binary) or `.wat` (text) file: a WASI
    /// preview 2 component exporting `wasi:cli/run`, an Airlock interpreter
    /// component, or a preview 1 module exporting `_start`. Compiles it, or
    /// takes it from the cache. Blocking: compilation can take seconds for
    /// large guests.
    ///
    /// For files the operator installs (interpreters, a guest named on the
    /// command line): up to [`MAX_GUEST_BYTES`], compiled on the caller's
    /// thread with no timeout and outside the compile slots. Never give it a path inside a
    /// workspace: read the guest through the workspace's confined layer and
    /// hand the bytes to [`Self::load_bytes`], which is bounded for hostile input.
    pub fn load_file(&self, path: impl AsRef<Path>) -> Result<Guest, Error> {
        let path = path.as_ref();
        let guest_error = |reason: String| Error::Guest { path: path.to_path_buf(), reason };
        let meta = std::fs::metadata(path).map_err(|e| guest_error(e.to_string()))?;
        if !meta.is_file() {
            return Err(guest_error("not a file".into()));
        }
        if meta.len() > MAX_GUEST_BYTES {
            return Err(guest_error(format!(
                "is {} bytes; the guest size limit is {MAX_GUEST_BYTES} bytes",
                meta.len()
            )));
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let stamp = FileStamp::of(&meta);
        // Find the file's content hash without reading it when it is known unchanged,
        // first to this process, then to the disk cache's path index.
        let known = stamp.and_then(|stamp| {
            lock(&self.inner.files)
                .get(&path.to_path_buf())
                .filter(|f| f.stamp == stamp)
                .map(|f| f.source)
                .or_else(|| self.inner.disk.as_ref().and_then(|disk| disk.recall_source(path, stamp)))
        });
        let mut rejected = None;
        if let Some(source) = known {
            if let Some(guest) = lock(&self.inner.guests).get(&source).cloned() {
                return Ok(guest.again_from_memory());
            }
            match self.cached_or_rejection(&source, &name)? {
                Ok(guest) => {
                    // The hash came from this process or the disk index: both
                    // know it already, so only this process's map is updated
                    // (rewriting the index would cost a sync on every start).
                    if let Some(stamp) = stamp {
                        lock(&self.inner.files).insert(path.to_path_buf(), KnownFile { stamp, source });
                    }
                    return Ok(guest);
                }
                Err(reason) => rejected = reason,
            }
        }
        let bytes = std::fs::read(path).map_err(|e| guest_error(e.to_string()))?;
        let guest = self.load_bytes_after(&name, &bytes, rejected, LoadBounds::OPERATOR).map_err(|e| match e {
            Error::Guest { reason, .. } => guest_error(reason),
            other => other,
        })?;
        self.remember(path, stamp, &guest);
        Ok(guest)
    }

    fn remember(&self, path: &Path, stamp: Option<FileStamp>, guest: &Guest) {
        let Some(stamp) = stamp else { return };
        let source = guest.source_hash();
        lock(&self.inner.files).insert(path.to_path_buf(), KnownFile { stamp, source });
        if let Some(disk) = &self.inner.disk {
            disk.remember_source(path, stamp, &source);
        }
    }

    /// Loads a guest from bytes (binary or text); `name` is used in messages
    /// and as the guest's `argv[0]`. The entry point for guests a sandbox
    /// supplies: the caller reads them (from a workspace, through its
    /// confined layer) and hands over the bytes, which this treats as hostile.
    ///
    /// Bounded: bytes (or the binary parsed from wasm text) past
    /// [`EngineConfig::max_guest_bytes`] are refused before anything else; a
    /// compile runs on a thread of its own, at most
    /// [`EngineConfig::max_concurrent_compiles`] at once, and a load that
    /// waits longer than [`EngineConfig::compile_timeout`] (for a slot and
    /// the compile together) returns an error. Loads of bytes already
    /// compiled come from memory or the disk cache and compile nothing.
    ///
    /// Blocking, for up to the compile timeout: call it off the async
    /// workers (`tokio::task::spawn_blocking`).
    pub fn load_bytes(&self, name: &str, bytes: &[u8]) -> Result<Guest, Error> {
        let bounds =
            LoadBounds { max_bytes: self.inner.max_guest_bytes, compile_timeout: Some(self.inner.compile_timeout) };
        self.load_bytes_after(name, bytes, None, bounds)
    }

    /// [`Self::load_bytes`], told why a cache entry was already refused for
    /// these bytes, under `bounds`.
    fn load_bytes_after(
        &self,
        name: &str,
        bytes: &[u8],
        rejected_before: Option<String>,
        bounds: LoadBounds,
    ) -> Result<Guest, Error> {
        let max_bytes = bounds.max_bytes;
        let guest_error = |reason: String| Error::Guest { path: PathBuf::from(name), reason };
        let too_large = |len: usize| {
            guest_error(format!(
                "is {} bytes; the guest size limit is {max_bytes} bytes ({})",
                len,
                format_size(max_bytes)
            ))
        };
        if bytes.len() as u64 > max_bytes {
            return Err(too_large(bytes.len()));
        }
        let source = sha256(bytes);
        if let Some(guest) = lock(&self.inner.guests).get(&source).cloned() {
            return Ok(guest.again_from_memory());
        }
        if Engine::detect_precompiled(bytes).is_some() {
            return Err(guest_error("is precompiled native code; pass the .wasm it was built from".into()));
        }
        let rejected = match self.cached_or_rejection(&source, name)? {
            Ok(guest) => return Ok(guest),
            Err(rejected) => rejected.or(rejected_before),
        };
        let binary = if bytes.starts_with(b"\0asm") {
            std::borrow::Cow::Borrowed(bytes)
        } else {
            std::borrow::Cow::Owned(
                wat::parse_bytes(bytes)
                    .map_err(|e| guest_error(format!("is neither a wasm binary nor valid wasm text: {e}")))?
                    .into_owned(),
            )
        };
        // Text can expand: the cap holds for the binary that is compiled.
        if binary.len() as u64 > max_bytes {
            return Err(too_large(binary.len()));
        }
        let (compiled, serialized) = self.compile(name, binary.into_owned(), bounds.compile_timeout)?;
        let kind = match &compiled {
            Compiled::Component(component) => self.link_component(component, name)?,
            Compiled::Module(module) => self.link_module(module, name)?,
        };
        if let Some(disk) = &self.inner.disk
            && let Err(e) = disk.store(&source, &serialized)
        {
            // The guest still runs; it is only compiled again next process.
            tracing::warn!(dir = %disk.dir().display(), "cannot write the guest cache: {e}");
        }
        let guest =
            Guest::new(name.to_string(), source, kind, GuestOrigin::Compiled { rejected_cache_entry: rejected });
        lock(&self.inner.guests).insert(source, guest.clone());
        Ok(guest)
    }

    /// Compiles `binary`. With a `timeout` (a hostile guest), on a thread of
    /// its own once a compile slot is free, waiting for both at most
    /// `timeout`; a compile that outlives the wait runs on, holding its slot,
    /// and its result is dropped. Without one (the operator's file), here and
    /// now, taking no slot, so hostile compiles never hold up the operator's.
    fn compile(&self, name: &str, binary: Vec<u8>, timeout: Option<Duration>) -> Result<(Compiled, Vec<u8>), Error> {
        let guest_error = |reason: String| Error::Guest { path: PathBuf::from(name), reason };
        let compile_error = |e: wasmtime::Error| guest_error(format!("does not compile: {e:#}"));
        let Some(timeout) = timeout else {
            return compile_binary(&self.inner.engine, &binary).map_err(compile_error);
        };
        let deadline = Instant::now() + timeout;
        let Some(slot) = self.inner.compiles.acquire(deadline) else {
            return Err(guest_error(format!(
                "cannot be compiled now: all {} compile slots stayed busy for the compile timeout of {}; try \
                 again later",
                self.inner.compiles.max,
                format_duration(timeout)
            )));
        };
        let engine = self.inner.engine.clone();
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("airlock-compile".into())
            .spawn(move || {
                let _slot = slot;
                // The caller may have stopped waiting; then the result is dropped here.
                let _ = sender.send(compile_binary(&engine, &binary));
            })
            .map_err(|e| engine_error("cannot start a compile thread", e))?;
        match receiver.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(compiled) => compiled.map_err(compile_error),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                Err(guest_error(format!("did not compile within the compile timeout of {}", format_duration(timeout))))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err(guest_error("does not compile: the compiler stopped without a result".into()))
            }
        }
    }

    /// A guest from a verified disk-cache entry, or why none was used
    /// (`None`: there was no entry; `Some(reason)`: an entry was refused).
    fn cached_or_rejection(&self, source: &Hash32, name: &str) -> Result<Result<Guest, Option<String>>, Error> {
        let Some(disk) = &self.inner.disk else { return Ok(Err(None)) };
        let path = match disk.load(source) {
            Ok(path) => path,
            Err(Rejected::Missing) => return Ok(Err(None)),
            Err(reason) => {
                tracing::warn!(path = %disk.path_for(source).display(), ?reason, "guest cache entry rejected; recompiling");
                return Ok(Err(Some(format!("{reason:?}").to_lowercase())));
            }
        };
        let engine = &self.inner.engine;
        let loaded = match Engine::detect_precompiled_file(&path) {
            Ok(Some(Precompiled::Component)) => {
                load_component(engine, &path).and_then(|c| Ok(self.link_component(&c, name)?))
            }
            Ok(Some(Precompiled::Module)) => load_module(engine, &path).and_then(|m| Ok(self.link_module(&m, name)?)),
            Ok(None) => Err(wasmtime::format_err!("not a Wasmtime artifact")),
            Err(e) => Err(e),
        };
        match loaded {
            Ok(kind) => {
                let guest = Guest::new(name.to_string(), *source, kind, GuestOrigin::DiskCache);
                lock(&self.inner.guests).insert(*source, guest.clone());
                Ok(Ok(guest))
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), "guest cache entry refused by the engine: {e}");
                let _ = std::fs::remove_file(&path);
                Ok(Err(Some(format!("refused by the engine: {e}"))))
            }
        }
    }

    fn link_component(&self, component: &Component, name: &str) -> Result<GuestKind, Error> {
        let guest_error = |reason: String| Error::Guest { path: PathBuf::from(name), reason };
        let pre = self
            .inner
            .component_linker
            .instantiate_pre(component)
            .map_err(|e| guest_error(format!("cannot be linked: {e}")))?;
        match CommandPre::new(pre.clone()) {
            Ok(command) => Ok(GuestKind::Component(command)),
            Err(not_command) => match InterpreterPre::new(pre) {
                Ok(interpreter) => Ok(GuestKind::Interpreter(interpreter)),
                Err(_) => Err(guest_error(format!(
                    "is not a WASI command (no wasi:cli/run export) nor an Airlock interpreter: {not_command}"
                ))),
            },
        }
    }

    fn link_module(&self, module: &Module, name: &str) -> Result<GuestKind, Error> {
        let guest_error = |reason: String| Error::Guest { path: PathBuf::from(name), reason };
        if module.get_export("_start").is_none() {
            return Err(guest_error("is not a WASI command (no _start export)".into()));
        }
        let pre = self
            .inner
            .module_linker
            .instantiate_pre(module)
            .map_err(|e| guest_error(format!("cannot be linked: {e}")))?;
        Ok(GuestKind::Module(pre))
    }
}

/// What one load may make the engine do.
#[derive(Debug, Clone, Copy)]
struct LoadBounds {
    /// Largest guest, in bytes (of the file, and of the binary parsed from text).
    max_bytes: u64,
    /// How long the load waits for a compile slot and the compile together.
    compile_timeout: Option<Duration>,
}

impl LoadBounds {
    /// For files the operator installs ([`IsolateEngine::load_file`]): the
    /// interpreters must load however long a cold compile takes on a busy
    /// host, and never wait behind a sandbox's compiles, so there is no
    /// timeout and no slot.
    const OPERATOR: Self = Self { max_bytes: MAX_GUEST_BYTES, compile_timeout: None };
}

/// Compiles and serializes a component or core module.
fn compile_binary(engine: &Engine, binary: &[u8]) -> wasmtime::Result<(Compiled, Vec<u8>)> {
    // Bytes 4..8 are the version: 1 for core modules, a "layer" of 1 in bytes 6..8 for components.
    if binary.get(6..8) == Some(&[1, 0]) {
        let component = Component::new(engine, binary)?;
        let serialized = component.serialize()?;
        Ok((Compiled::Component(component), serialized))
    } else {
        let module = Module::new(engine, binary)?;
        let serialized = module.serialize()?;
        Ok((Compiled::Module(module), serialized))
    }
}

/// A compiled guest.
enum Compiled {
    Component(Component),
    Module(Module),
}

/// Counts compiles in flight against a cap. A slot is held by the compile
/// thread, not by the caller, so a compile whose caller gave up still counts.
struct CompileSlots {
    in_flight: Mutex<usize>,
    freed: Condvar,
    max: usize,
}

/// One compile's slot, given back when dropped.
struct CompileSlot(Arc<CompileSlots>);

impl CompileSlots {
    fn new(max: usize) -> Self {
        Self { in_flight: Mutex::new(0), freed: Condvar::new(), max: max.max(1) }
    }

    fn in_flight(&self) -> usize {
        *lock(&self.in_flight)
    }

    /// A slot, waiting for one to be freed until `deadline`.
    fn acquire(self: &Arc<Self>, deadline: Instant) -> Option<CompileSlot> {
        let mut in_flight = lock(&self.in_flight);
        while *in_flight >= self.max {
            let left = deadline.checked_duration_since(Instant::now()).filter(|left| !left.is_zero())?;
            in_flight = self.freed.wait_timeout(in_flight, left).map_or_else(|p| p.into_inner().0, |(guard, _)| guard);
        }
        *in_flight += 1;
        Some(CompileSlot(self.clone()))
    }
}

impl Drop for CompileSlot {
    fn drop(&mut self) {
        let mut in_flight = lock(&self.0.in_flight);
        *in_flight = in_flight.saturating_sub(1);
        self.0.freed.notify_one();
    }
}

#[allow(unsafe_code)]
fn load_component(engine: &Engine, artifact: &Path) -> wasmtime::Result<Component> {
    // SAFETY: `artifact` comes only from `DiskCache::load`, which returns a
    // file whose length and checksum match the check file written when an
    // engine with this engine's key serialized it; Wasmtime itself checks
    // that the artifact was produced by a compatible engine. Cache files are
    // replaced only by rename, never modified in place while mapped.
    unsafe { Component::deserialize_file(engine, artifact) }
}

#[allow(unsafe_code)]
fn load_module(engine: &Engine, artifact: &Path) -> wasmtime::Result<Module> {
    // SAFETY: as for `load_component`.
    unsafe { Module::deserialize_file(engine, artifact) }
}
