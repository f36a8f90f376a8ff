//! What each store holds: the guest's WASI context and the limiter that
//! enforces a run's [`Limits`].

use std::time::Instant;

use airlock_core::{Limit, LimitExceeded, Limits};
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

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

/// Store data for WASI preview 2 components.
pub(crate) struct ComponentHost {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limiter: Limiter,
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
