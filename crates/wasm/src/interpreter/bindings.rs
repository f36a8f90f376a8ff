//! Host bindings of the `airlock:sandbox/interpreter` world (`wit/`). This is
//! the one place they are generated.

wasmtime::component::bindgen!({
    path: "../../wit",
    world: "interpreter",
    exports: { default: async },
});
