//! Instantiate-and-run of the `hello` guest from a warm cache: the cost of one
//! isolate run end to end, from a loaded guest to its captured output.
//!
//! Compared in the same run with two raw-Wasmtime baselines that do the least
//! a host must (`CommandPre` → fresh `Store` with a WASI context → `run`), one
//! with Wasmtime's default allocator and one with the pooling allocator.
//!
//! Run: `scripts/build-guests.sh && cargo bench --bench isolate_startup`
//! (numbers and machine in docs/BENCHMARKS.md).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a bench may

use std::path::Path;
use std::time::Duration;

use airlock::wasm::{EngineConfig, IsolateEngine};
use airlock::{ExecRequest, Workspace};
use criterion::{Criterion, criterion_group, criterion_main};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

fn hello_path() -> std::path::PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("guests/out/hello.wasm");
    assert!(path.is_file(), "run scripts/build-guests.sh first");
    path
}

struct RawHost {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for RawHost {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

fn raw_wasmtime(pooling: bool) -> (Engine, CommandPre<RawHost>) {
    let mut config = Config::new();
    if pooling {
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(PoolingAllocationConfig::new()));
    }
    let engine = Engine::new(&config).unwrap();
    let mut linker = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
    let component = Component::from_file(&engine, hello_path()).unwrap();
    let pre = CommandPre::new(linker.instantiate_pre(&component).unwrap()).unwrap();
    (engine, pre)
}

async fn raw_run(engine: &Engine, pre: &CommandPre<RawHost>) -> usize {
    let stdout = MemoryOutputPipe::new(1 << 20);
    let wasi = WasiCtxBuilder::new().arg("hello").arg("bench").stdout(stdout.clone()).build();
    let mut store = Store::new(engine, RawHost { wasi, table: ResourceTable::new() });
    let command = pre.instantiate_async(&mut store).await.unwrap();
    command.wasi_cli_run().call_run(&mut store).await.unwrap().unwrap();
    drop(store);
    stdout.contents().len()
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let workspace_dir = tempfile::tempdir().unwrap();
    let workspace = Workspace::open(workspace_dir.path()).unwrap();

    let engine = IsolateEngine::new(EngineConfig { cache_dir: Some(cache.path().to_path_buf()), ..EngineConfig::default() }).unwrap();
    // Warm the cache: compile once, then load from disk as a new process would.
    engine.load_file(hello_path()).unwrap();
    let engine = IsolateEngine::new(EngineConfig { cache_dir: Some(cache.path().to_path_buf()), ..EngineConfig::default() }).unwrap();
    let guest = engine.load_file(hello_path()).unwrap();
    let request = ExecRequest::new("hello").args(["bench"]);

    let mut group = c.benchmark_group("hello-instantiate-and-run");
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("airlock", |b| {
        b.iter(|| {
            let outcome = runtime.block_on(engine.run(&guest, &workspace, &request)).unwrap();
            assert!(outcome.success());
        })
    });
    for (name, pooling) in [("wasmtime-pooling", true), ("wasmtime-default", false)] {
        let (raw_engine, pre) = raw_wasmtime(pooling);
        group.bench_function(name, |b| {
            b.iter(|| assert_eq!(runtime.block_on(raw_run(&raw_engine, &pre)), "hello, bench\n".len()))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
