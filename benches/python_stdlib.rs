//! What shipping the standard library costs the Python isolate: a one-shot
//! evaluation in a fresh context (instantiate, evaluate `print(1+1)`, discard:
//! the price of a new context), and a fresh context importing a module served
//! from the bundle on first use (`asyncio`, `unittest`, `sqlite3`, `zoneinfo`)
//! or imported at build time (`json`), through the library, from a warm cache.
//!
//! Before timing, prints the resident memory each idle context adds (20
//! contexts that evaluated `1`), as benches/context_memory.rs measures it.
//!
//! Compares Python components side by side in one run: set
//! `AIRLOCK_BENCH_PYTHON_DIRS` to `label=dir,label=dir` (each dir holding a
//! `python.wasm`); by default, `guests/out` alone.
//!
//! Run: `scripts/build-guests.sh && cargo bench --bench python_stdlib`
//! (numbers and machine in docs/BENCHMARKS.md, "Python standard library in isolates").

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a bench may

use std::path::{Path, PathBuf};
use std::time::Duration;

use airlock::wasm::interpreter::Interpreters;
use airlock::wasm::{EngineConfig, IsolateEngine};
use airlock::{Language, Limits, Workspace};
use criterion::{Criterion, criterion_group, criterion_main};

/// The snippets timed in a fresh context: a name and the code.
const SNIPPETS: [(&str, &str); 6] = [
    ("print", "print(1+1)"),
    ("import-json", "import json\nprint(1+1)"),
    ("import-asyncio", "import asyncio\nprint(1+1)"),
    ("import-unittest", "import unittest\nprint(1+1)"),
    ("import-sqlite3", "import sqlite3\nprint(1+1)"),
    ("import-zoneinfo", "import zoneinfo\nzoneinfo.ZoneInfo('Europe/Paris')\nprint(1+1)"),
];

fn components() -> Vec<(String, PathBuf)> {
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("guests/out");
    match std::env::var("AIRLOCK_BENCH_PYTHON_DIRS") {
        Ok(list) if !list.is_empty() => list
            .split(',')
            .map(|pair| {
                let (label, dir) = pair.split_once('=').expect("label=dir");
                (label.to_string(), PathBuf::from(dir))
            })
            .collect(),
        _ => vec![("current".to_string(), default)],
    }
}

/// Idle contexts created to measure the memory each adds.
const MEMORY_CONTEXTS: usize = 20;

fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let workspace_dir = tempfile::tempdir().unwrap();
    let workspace = Workspace::open(workspace_dir.path()).unwrap();
    let config = || EngineConfig { cache_dir: Some(cache.path().to_path_buf()), ..EngineConfig::default() };
    let limits = Limits::default();
    let mut group = c.benchmark_group("python-stdlib");
    group.measurement_time(Duration::from_secs(6));
    for (label, dir) in components() {
        let size = std::fs::metadata(dir.join("python.wasm")).unwrap().len();
        println!("{label}: {} python.wasm, {size} bytes", dir.display());
        // Compile once into the cache, then load from it (a warm start).
        let cold = Interpreters::new(IsolateEngine::new(config()).unwrap(), &dir);
        runtime.block_on(cold.guest(Language::Python)).unwrap();
        let interpreters = Interpreters::new(IsolateEngine::new(config()).unwrap(), &dir);
        runtime.block_on(interpreters.guest(Language::Python)).unwrap();
        // One context first, so the batch measures contexts, not the guest's first use.
        let first = runtime.block_on(interpreters.create_context(Language::Python, workspace.clone(), limits)).unwrap();
        runtime.block_on(interpreters.eval(&first, "1")).unwrap();
        let before = resident_kib();
        let mut ids = Vec::new();
        for _ in 0..MEMORY_CONTEXTS {
            let id =
                runtime.block_on(interpreters.create_context(Language::Python, workspace.clone(), limits)).unwrap();
            runtime.block_on(interpreters.eval(&id, "1")).unwrap();
            ids.push(id);
        }
        let per_context = (resident_kib().saturating_sub(before)) / MEMORY_CONTEXTS as u64;
        println!("{label}: {per_context} KiB resident per idle context ({MEMORY_CONTEXTS} contexts)");
        for id in ids.into_iter().chain([first]) {
            interpreters.delete(&id).unwrap();
        }
        for (name, code) in SNIPPETS {
            // Skip what this component cannot import (a component before the bundle).
            let probe = runtime.block_on(interpreters.run(Language::Python, workspace.clone(), code, limits)).unwrap();
            if probe.stdout != b"2\n" {
                println!("{label}/{name}: skipped, this component cannot run it");
                continue;
            }
            group.bench_function(format!("{label}/{name}"), |b| {
                b.iter(|| {
                    let outcome =
                        runtime.block_on(interpreters.run(Language::Python, workspace.clone(), code, limits)).unwrap();
                    assert_eq!(outcome.stdout, b"2\n");
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
