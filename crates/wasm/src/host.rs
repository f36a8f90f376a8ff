//! What each store holds: the guest's WASI context and the limiter that
//! enforces a run's [`Limits`].

use std::time::Instant;

use airlock_core::{Limit, LimitExceeded, Limits};
use wasmtime::component::{Linker as ComponentLinker, Resource, ResourceTable, ResourceTableError};
use wasmtime::{ResourceLimiter, StoreContextMut};
use wasmtime_wasi::filesystem::WasiFilesystemView;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::FsResult;
use wasmtime_wasi::p2::bindings::filesystem::types::{
    Descriptor, DescriptorFlags, ErrorCode, HostDescriptor, OpenFlags, PathFlags,
};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::interpreter::record::EvalRecord;
use crate::outbound::{IsolateHttp, Outbound};

/// Tables and memories per store are bounded by the engine's pool; the
/// limiter itself does not count them.
const UNCOUNTED: usize = 10_000;

/// Enforces memory, table and instance caps, and remembers which one a guest
/// hit so the run can be reported as that limit rather than a bare trap.
#[derive(Debug)]
pub(crate) struct Limiter {
    memory_cap: u64,
    table_cap: u64,
    instance_cap: u64,
    /// All linear memories of the store together: the cap is per run, not per memory.
    memory_in_use: u64,
    /// The largest table size granted so far.
    table_peak: u64,
    /// When the current run or evaluation must end, and the deadline it came from.
    pub(crate) deadline: Instant,
    pub(crate) deadline_ms: u64,
    pub(crate) hit: Option<LimitExceeded>,
}

impl Limiter {
    pub(crate) fn new(limits: &Limits) -> Self {
        Self {
            memory_cap: limits.memory_bytes,
            table_cap: limits.table_elements,
            instance_cap: limits.instances,
            memory_in_use: 0,
            table_peak: 0,
            deadline: Instant::now() + limits.deadline,
            deadline_ms: u64::try_from(limits.deadline.as_millis()).unwrap_or(u64::MAX),
            hit: None,
        }
    }

    /// Starts a new deadline (for each evaluation in a long-lived context).
    pub(crate) fn restart_deadline(&mut self, limits: &Limits) {
        self.deadline = Instant::now() + limits.deadline;
        self.deadline_ms = u64::try_from(limits.deadline.as_millis()).unwrap_or(u64::MAX);
    }

    /// This limiter under other `limits`, keeping what the store already
    /// uses: for a context made ahead under one set of limits and then given
    /// to a caller with another. `None` if the store could not have been made
    /// under `limits`: it uses more memory or a larger table than they allow,
    /// or they allow fewer instances than it was made under (instances are
    /// not counted, so only a cap at least as large is known to fit).
    pub(crate) fn rebound(&self, limits: &Limits) -> Option<Self> {
        let fits = self.memory_in_use <= limits.memory_bytes
            && self.table_peak <= limits.table_elements
            && self.instance_cap <= limits.instances;
        fits.then(|| Self { memory_in_use: self.memory_in_use, table_peak: self.table_peak, ..Self::new(limits) })
    }

    fn exceeded(&mut self, limit: Limit, value: u64) -> wasmtime::Error {
        let hit = LimitExceeded { limit, value };
        self.hit = Some(hit);
        wasmtime::Error::new(hit)
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let grown = (desired as u64).saturating_sub(current as u64);
        let total = self.memory_in_use.saturating_add(grown);
        if total > self.memory_cap {
            // Trap rather than fail the grow: the run ends as "memory limit
            // exceeded" instead of as whatever the guest does on allocation failure.
            return Err(self.exceeded(Limit::Memory, self.memory_cap));
        }
        self.memory_in_use = total;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        Err(error.context("linear memory could not grow"))
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired as u64 > self.table_cap {
            return Err(self.exceeded(Limit::TableElements, self.table_cap));
        }
        self.table_peak = self.table_peak.max(desired as u64);
        Ok(true)
    }

    fn instances(&self) -> usize {
        usize::try_from(self.instance_cap).unwrap_or(usize::MAX)
    }

    fn tables(&self) -> usize {
        UNCOUNTED
    }

    fn memories(&self) -> usize {
        UNCOUNTED
    }
}

/// A resource table holding at most `limits.handles` entries at once (open
/// files and directories, streams, pollables), so a guest opening handles in
/// a loop is refused long before the host runs out of file descriptors.
pub(crate) fn handle_table(limits: &Limits) -> ResourceTable {
    let mut table = ResourceTable::new();
    set_handle_cap(&mut table, limits);
    table
}

pub(crate) fn set_handle_cap(table: &mut ResourceTable, limits: &Limits) {
    table.set_max_capacity(usize::try_from(limits.handles).unwrap_or(usize::MAX));
}

/// A preview 1 context whose resource table holds at most `limits.handles`
/// entries (see [`handle_table`]).
pub(crate) fn p1_context(wasi: &mut WasiCtxBuilder, limits: &Limits) -> WasiP1Ctx {
    let mut p1 = wasi.build_p1();
    set_handle_cap(p1.ctx().table, limits);
    p1
}

/// The WASI filesystem interface as Wasmtime's WASI defines it; guests
/// importing an older 0.2 version are matched to it by semver.
const FILESYSTEM_TYPES: &str = "wasi:filesystem/types@0.2.12";

/// What a preview 2 guest sees when opening a file would pass its handle cap.
/// WASI has no "too many open files" code; `insufficient-memory` (ENOMEM in
/// wasi-libc) is the nearest "the system is out of a resource" answer.
pub(crate) const HANDLES_EXHAUSTED: ErrorCode = ErrorCode::InsufficientMemory;

/// Replaces `descriptor.open-at` with the same call that answers a full
/// handle table with [`HANDLES_EXHAUSTED`]: Wasmtime's WASI would trap, and
/// the guest should see an error it can handle, as with EMFILE on Linux. Any
/// other handle created past the cap (a stream, a pollable) still traps, and
/// the run is reported as having hit the handle limit.
pub(crate) fn add_open_at_with_errno(linker: &mut ComponentLinker<ComponentHost>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut types = linker.instance(FILESYSTEM_TYPES)?;
    types.func_wrap_async(
        "[method]descriptor.open-at",
        |mut store: StoreContextMut<'_, ComponentHost>,
         (fd, path_flags, path, open_flags, flags): (
            Resource<Descriptor>,
            PathFlags,
            String,
            OpenFlags,
            DescriptorFlags,
        )| {
            Box::new(async move {
                let opened = store.data_mut().filesystem().open_at(fd, path_flags, path, open_flags, flags).await;
                Ok((errno_when_full(opened)?,))
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

fn errno_when_full(
    opened: FsResult<Resource<Descriptor>>,
) -> wasmtime::Result<Result<Resource<Descriptor>, ErrorCode>> {
    match opened {
        Ok(fd) => Ok(Ok(fd)),
        Err(error) => match error.downcast() {
            Ok(code) => Ok(Err(code)),
            // The file was opened and closed again when its handle found no room.
            Err(trap) if is_table_full(&trap) => Ok(Err(HANDLES_EXHAUSTED)),
            Err(trap) => Err(trap),
        },
    }
}

/// Whether a trap is a resource table refusing a handle past its cap.
pub(crate) fn is_table_full(error: &wasmtime::Error) -> bool {
    error.chain().any(|cause| matches!(cause.downcast_ref::<ResourceTableError>(), Some(ResourceTableError::Full)))
}

/// Store data for WASI preview 2 components.
pub(crate) struct ComponentHost {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limiter: Limiter,
    pub(crate) http: WasiHttpCtx,
    /// Where the guest's `wasi:http` requests go (nowhere without a hook).
    pub(crate) outbound: IsolateHttp,
    /// What an interpreter reported during the evaluation under way
    /// (displays, side effects; the hook records its requests here too).
    pub(crate) record: EvalRecord,
}

impl ComponentHost {
    pub(crate) fn new(wasi: WasiCtx, limits: &Limits, outbound: Option<Outbound>) -> Self {
        let record = EvalRecord::default();
        Self {
            wasi,
            table: handle_table(limits),
            limiter: Limiter::new(limits),
            http: WasiHttpCtx::new(),
            outbound: IsolateHttp::new(outbound, record.effects.clone()),
            record,
        }
    }
}

impl WasiHttpView for ComponentHost {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.outbound }
    }
}

impl WasiView for ComponentHost {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// Store data for WASI preview 1 modules.
pub(crate) struct ModuleHost {
    pub(crate) wasi: WasiP1Ctx,
    pub(crate) limiter: Limiter,
}

/// Gives the run loop one way to reach the limiter whichever host it has.
pub(crate) trait HasLimiter {
    fn limiter(&mut self) -> &mut Limiter;
}

impl HasLimiter for ComponentHost {
    fn limiter(&mut self) -> &mut Limiter {
        &mut self.limiter
    }
}

impl HasLimiter for ModuleHost {
    fn limiter(&mut self) -> &mut Limiter {
        &mut self.limiter
    }
}
