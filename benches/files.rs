//! The files API of a sandbox, from the host: latency of a 4 KiB write, read,
//! list and stat, and throughput of a 16 MiB write and read, all through
//! `Sandbox` (the confined layer, the blocking pool, the timeout), with the
//! home's disk quotas on (the workspace on the btrfs image) and off (a plain
//! directory on the home's filesystem). Only the isolate side is touched: no
//! container is made.
//!
//! Run: `cargo bench --bench files` (numbers and machine in docs/BENCHMARKS.md;
//! the same file builds against the code before the confined layer, whose
//! `read_file`/`write_file`/`list_files` have the same signatures).

#![allow(clippy::unwrap_used)] // a bench may

use std::path::Path;

use airlock::runtime::{QuotaMode, Runtime, RuntimeOptions};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    for (label, quotas) in [("quota-on", QuotaMode::Required), ("quota-off", QuotaMode::Off)] {
        bench_files(c, label, quotas);
    }
}

fn bench_files(c: &mut Criterion, label: &str, quotas: QuotaMode) {
    let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let home = tempfile::tempdir().unwrap();
    let (runtime, sandbox) = tokio.block_on(async {
        let mut options = RuntimeOptions::new(home.path());
        options.isolates.cache_dir = Some(Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-cache"));
        options.disk.quotas = quotas;
        let runtime = Runtime::open(options).await.unwrap();
        let sandbox = runtime.sandbox("files-bench").await.unwrap();
        (runtime, sandbox)
    });
    let small = vec![7u8; 4096];
    let large = vec![9u8; 16 * 1024 * 1024];
    tokio.block_on(async {
        sandbox.write_file("dir/small.bin", &small).await.unwrap();
        sandbox.write_file("dir/large.bin", &large).await.unwrap();
    });

    let mut group = c.benchmark_group(format!("files/{label}"));
    group.bench_function("write/4KiB", |b| {
        b.iter(|| tokio.block_on(sandbox.write_file("dir/small-w.bin", &small)).unwrap())
    });
    group.bench_function("read/4KiB", |b| b.iter(|| tokio.block_on(sandbox.read_file("dir/small.bin")).unwrap()));
    group.bench_function("list/2-entries", |b| b.iter(|| tokio.block_on(sandbox.list_files("dir")).unwrap()));
    group.throughput(Throughput::Bytes(large.len() as u64));
    group.sample_size(20);
    group.bench_function("write/16MiB", |b| {
        b.iter(|| tokio.block_on(sandbox.write_file("dir/large-w.bin", &large)).unwrap())
    });
    group.bench_function("read/16MiB", |b| b.iter(|| tokio.block_on(sandbox.read_file("dir/large.bin")).unwrap()));
    group.finish();
    drop(sandbox);
    drop(runtime);
}

criterion_group!(benches, bench);
criterion_main!(benches);
