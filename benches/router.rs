//! The router's decision: reading a request's needs and picking a tier, for a
//! guest, a git command, a shell script and code (target ≤ 5 µs).
//!
//! Run: `cargo bench --bench router` (numbers and machine in docs/BENCHMARKS.md).

#![allow(clippy::unwrap_used)] // a bench may

use std::hint::black_box;

use airlock::runtime::{TierPreference, route};
use airlock::{ExecRequest, Language, Needs};
use criterion::{Criterion, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("router");
    let requests = [
        ("guest", ExecRequest::new("/workspace/bin/tool.wasm").args(["--flag"])),
        ("git", ExecRequest::new("git").args(["log", "--oneline", "-n", "20"])),
        ("shell-script", ExecRequest::new("bash").args(["-c", "cd app && npm install && npm test | tee out.log"])),
    ];
    for (name, request) in &requests {
        group.bench_function(format!("decide/{name}"), |b| {
            b.iter(|| route(&Needs::of_exec(black_box(request)), TierPreference::Auto).unwrap())
        });
    }
    group.bench_function("decide/code", |b| {
        b.iter(|| route(&Needs::of_code(black_box(Language::Python)), TierPreference::Auto).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
