//! Code interpreters end to end through the library, from a warm cache:
//! a one-shot evaluation (fresh context, evaluate, discard) and an evaluation
//! in an existing context, for Python and JavaScript. `one-shot-spare` is the
//! one-shot with `keep_spares`: a warmed fresh context made in the background
//! after the previous run for the same workspace; waiting for it to be ready
//! is not timed (an agent's next snippet comes after it reads the last answer).
//!
//! Run: `scripts/build-guests.sh && cargo bench --bench interpreters`
//! (numbers and machine in docs/BENCHMARKS.md).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a bench may

use std::path::Path;
use std::time::Duration;

use airlock::wasm::interpreter::Interpreters;
use airlock::wasm::{EngineConfig, IsolateEngine};
use airlock::{Language, Limits, Workspace};
use criterion::{Criterion, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let workspace_dir = tempfile::tempdir().unwrap();
    let workspace = Workspace::open(workspace_dir.path()).unwrap();
    let guests = Path::new(env!("CARGO_MANIFEST_DIR")).join("guests/out");
    let config = || EngineConfig { cache_dir: Some(cache.path().to_path_buf()), ..EngineConfig::default() };
    // Compile once into the cache, then use a second engine that loads from it (a warm start).
    let cold = Interpreters::new(IsolateEngine::new(config()).unwrap(), &guests);
    for language in Language::ALL {
        runtime.block_on(cold.guest(language)).unwrap();
    }
    let interpreters = Interpreters::new(IsolateEngine::new(config()).unwrap(), &guests);
    let limits = Limits::default();

    let mut one_shot = c.benchmark_group("one-shot");
    one_shot.measurement_time(Duration::from_secs(8));
    for (language, code) in [(Language::Python, "print(1+1)"), (Language::JavaScript, "console.log(1+1)")] {
        runtime.block_on(interpreters.guest(language)).unwrap();
        one_shot.bench_function(language.as_str(), |b| {
            b.iter(|| {
                let outcome = runtime.block_on(interpreters.run(language, workspace.clone(), code, limits)).unwrap();
                assert_eq!(outcome.stdout, b"2\n");
            })
        });
    }
    one_shot.finish();

    let with_spares = Interpreters::new(IsolateEngine::new(config()).unwrap(), &guests).keep_spares(4);
    let mut spare = c.benchmark_group("one-shot-spare");
    spare.measurement_time(Duration::from_secs(8));
    for (language, code) in [(Language::Python, "print(1+1)"), (Language::JavaScript, "console.log(1+1)")] {
        // A workspace's second one-shot is the first to leave a spare behind.
        for _ in 0..2 {
            runtime.block_on(with_spares.run(language, workspace.clone(), "0", limits)).unwrap();
        }
        spare.bench_function(language.as_str(), |b| {
            b.iter_custom(|iterations| {
                runtime.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iterations {
                        let give_up = std::time::Instant::now() + Duration::from_secs(30);
                        while with_spares.spares_ready() == 0 {
                            assert!(std::time::Instant::now() < give_up, "no spare context was made");
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        let started = std::time::Instant::now();
                        let outcome = with_spares.run(language, workspace.clone(), code, limits).await.unwrap();
                        total += started.elapsed();
                        assert_eq!(outcome.stdout, b"2\n");
                    }
                    total
                })
            })
        });
    }
    spare.finish();

    let mut in_context = c.benchmark_group("eval-in-context");
    for (language, code) in [(Language::Python, "x = 1 + 1"), (Language::JavaScript, "var x = 1 + 1")] {
        let id = runtime.block_on(interpreters.create_context(language, workspace.clone(), limits)).unwrap();
        in_context.bench_function(language.as_str(), |b| {
            b.iter(|| {
                let outcome = runtime.block_on(interpreters.eval(&id, code)).unwrap();
                assert!(outcome.is_ok());
            })
        });
    }
    in_context.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
