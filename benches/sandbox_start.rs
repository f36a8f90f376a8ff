//! A new sandbox's first container command through the runtime, cold (the
//! sandbox, its disk and its container are made for it), and a command in a
//! sandbox whose container runs, each with per-sandbox disk quotas on (a btrfs
//! subvolume in its own quota group) and off (a plain directory), in the same
//! run. Teardown is not timed.
//!
//! Run: `cargo bench --bench sandbox_start` (as root, with the engine set up by
//! `airlock setup`; numbers and machine in docs/BENCHMARKS.md).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench may

use std::path::Path;
use std::time::{Duration, Instant};

use airlock::runtime::{QuotaMode, Runtime, RuntimeOptions};
use airlock::ExecRequest;
use criterion::{Criterion, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut group = c.benchmark_group("sandbox-start");
    group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(20));
    for (label, quotas) in [("quota-on", QuotaMode::Required), ("quota-off", QuotaMode::Off)] {
        let home = tempfile::tempdir().unwrap();
        let runtime = tokio.block_on(async {
            let mut options = RuntimeOptions::new(home.path());
            options.isolates.cache_dir = Some(Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-cache"));
            options.disk.quotas = quotas;
            Runtime::open(options).await.unwrap()
        });
        let mut made = 0u64;
        group.bench_function(format!("cold-first-command/{label}"), |b| {
            b.iter_custom(|iterations| {
                let mut timed = Duration::ZERO;
                for _ in 0..iterations {
                    made += 1;
                    let name = format!("start-{made}");
                    tokio.block_on(async {
                        let started = Instant::now();
                        let sandbox = runtime.sandbox(&name).await.unwrap();
                        let run = sandbox.exec(ExecRequest::new("true")).await.unwrap();
                        timed += started.elapsed();
                        assert!(run.outcome.success());
                        runtime.destroy(&name).await.unwrap();
                    });
                }
                timed
            })
        });
        let sandbox = tokio.block_on(runtime.sandbox("warm")).unwrap();
        tokio.block_on(sandbox.exec(ExecRequest::new("true"))).unwrap();
        group.bench_function(format!("warm-command/{label}"), |b| {
            b.iter(|| tokio.block_on(sandbox.exec(ExecRequest::new("true"))).unwrap())
        });
        tokio.block_on(runtime.destroy("warm")).unwrap();
        drop(runtime);
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
