//! Code interpreters in isolates: Python and JavaScript components of the
//! `airlock:sandbox/interpreter` world, evaluated in persistent contexts.

pub(crate) mod bindings;
mod context;
pub(crate) mod record;
mod registry;

pub use context::InterpreterContext;
pub use registry::{
    ContextInfo, INTERPRETER_FILES, Interpreters, build_tree_interpreter_dir, default_interpreter_dir,
    set_fallback_interpreter_dir,
};
