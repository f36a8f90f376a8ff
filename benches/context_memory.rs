//! Memory added per idle interpreter context: creates contexts in batches and
//! reports the growth of the process's resident set per context, per language.
//! Prints the median of the batches and their range.
//!
//! Run: `scripts/build-guests.sh && cargo bench --bench context_memory`
//! (numbers and machine in docs/BENCHMARKS.md).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a bench may

use std::path::Path;

use airlock::wasm::interpreter::Interpreters;
use airlock::wasm::{EngineConfig, IsolateEngine};
use airlock::{Language, Limits, Workspace};

/// Contexts per batch, and batches per language.
const BATCH: usize = 20;
const BATCHES: usize = 5;

fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn main() {
    // `cargo test --benches` runs bench targets once without `--bench`: keep that quick.
    let measuring = std::env::args().any(|a| a == "--bench");
    let batches = if measuring { BATCHES } else { 1 };
    let batch = if measuring { BATCH } else { 2 };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let workspace_dir = tempfile::tempdir().unwrap();
    let workspace = Workspace::open(workspace_dir.path()).unwrap();
    let guests = Path::new(env!("CARGO_MANIFEST_DIR")).join("guests/out");
    let engine = IsolateEngine::new(EngineConfig { cache_dir: Some(cache.path().to_path_buf()), ..EngineConfig::default() })
        .unwrap();
    let interpreters = Interpreters::new(engine, &guests);
    for language in Language::ALL {
        runtime.block_on(interpreters.guest(language)).unwrap();
        // One context first, so one-time costs (code pages, caches) are not counted.
        let warm = runtime.block_on(interpreters.create_context(language, workspace.clone(), Limits::default())).unwrap();
        runtime.block_on(interpreters.eval(&warm, "1")).unwrap();
        let mut per_context = Vec::new();
        let mut ids = Vec::new();
        for _ in 0..batches {
            let before = resident_kib();
            for _ in 0..batch {
                let id = runtime.block_on(interpreters.create_context(language, workspace.clone(), Limits::default())).unwrap();
                // An idle context that has evaluated something, as a notebook cell leaves it.
                assert!(runtime.block_on(interpreters.eval(&id, "1")).unwrap().is_ok());
                ids.push(id);
            }
            per_context.push((resident_kib() as f64 - before as f64) / batch as f64);
        }
        per_context.sort_by(f64::total_cmp);
        let median = per_context[per_context.len() / 2];
        println!(
            "context-memory/{language}: median {median:.0} KiB per idle context (batches of {batch}: min {:.0}, max {:.0} KiB)",
            per_context[0],
            per_context[per_context.len() - 1]
        );
        for id in ids {
            interpreters.delete(&id).unwrap();
        }
        interpreters.delete(&warm).unwrap();
    }
}
