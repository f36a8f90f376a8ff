//! A loaded guest: compiled, linked against WASI, ready to instantiate.

use std::sync::Arc;

use wasmtime::InstancePre;
use wasmtime_wasi::p2::bindings::CommandPre;

use crate::cache::Hash32;
use crate::host::{ComponentHost, ModuleHost};
use crate::interpreter::bindings::InterpreterPre;

/// Where a guest's compiled code came from when it was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GuestOrigin {
    /// This engine had already loaded the same bytes.
    Memory,
    /// A verified entry of the on-disk cache.
    DiskCache,
    /// Compiled now; if a cache entry existed but failed verification, why.
    Compiled { rejected_cache_entry: Option<String> },
}

pub(crate) enum GuestKind {
    /// A component exporting `wasi:cli/run`.
    Component(CommandPre<ComponentHost>),
    /// A component of the `airlock:sandbox/interpreter` world.
    Interpreter(InterpreterPre<ComponentHost>),
    /// A core module exporting `_start`.
    Module(InstancePre<ModuleHost>),
}

struct GuestInner {
    name: String,
    source: Hash32,
    kind: GuestKind,
}

/// A guest program, pre-instantiated. Cheap to clone; every run of it gets a
/// fresh instance in a fresh store.
#[derive(Clone)]
pub struct Guest {
    inner: Arc<GuestInner>,
    origin: GuestOrigin,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest")
            .field("name", &self.inner.name)
            .field("component", &self.is_component())
            .field("origin", &self.origin)
            .finish()
    }
}

impl Guest {
    pub(crate) fn new(name: String, source: Hash32, kind: GuestKind, origin: GuestOrigin) -> Self {
        Self { inner: Arc::new(GuestInner { name, source, kind }), origin }
    }

    /// The same guest, as handed out again from the engine's memory.
    pub(crate) fn again_from_memory(&self) -> Self {
        Self { inner: self.inner.clone(), origin: GuestOrigin::Memory }
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Whether this is a WASI preview 2 component (else a preview 1 module).
    pub fn is_component(&self) -> bool {
        !matches!(self.inner.kind, GuestKind::Module(_))
    }

    /// Whether this is a code interpreter (run through contexts, not as a command).
    pub fn is_interpreter(&self) -> bool {
        matches!(self.inner.kind, GuestKind::Interpreter(_))
    }

    /// Where this handle's compiled code came from.
    pub fn origin(&self) -> &GuestOrigin {
        &self.origin
    }

    pub(crate) fn source_hash(&self) -> Hash32 {
        self.inner.source
    }

    pub(crate) fn kind(&self) -> &GuestKind {
        &self.inner.kind
    }
}
