//! Code interpreters end to end through the library, from a warm cache:
//! a one-shot evaluation (fresh context, evaluate, discard) and an evaluation
//! in an existing context, for Python and JavaScript. `one-shot` starts each
//! context cold; `one-shot-warm` is the one-shot with `keep_warm`: a context
//! made ahead in the background, for no workspace in particular, bound to the
//! run's workspace (alternating between two) when it takes it. Waiting for
//! the pool to refill is not timed: it is the pool's work between requests
//! (on a blocking thread), and `one-shot-warm-back-to-back` shows what a
//! caller sees when requests come faster than the pool refills.
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

/// Contexts the warm pool keeps per language in this bench.
const WARM_CONTEXTS: usize = 2;

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

    let other_dir = tempfile::tempdir().unwrap();
    let other = Workspace::open(other_dir.path()).unwrap();
    let warm = Interpreters::new(IsolateEngine::new(config()).unwrap(), &guests).keep_warm(WARM_CONTEXTS);
    let mut warm_group = c.benchmark_group("one-shot-warm");
    warm_group.measurement_time(Duration::from_secs(8));
    for (language, code) in [(Language::Python, "print(1+1)"), (Language::JavaScript, "console.log(1+1)")] {
        runtime.block_on(warm.prewarm(language)).unwrap();
        warm_group.bench_function(language.as_str(), |b| {
            b.iter_custom(|iterations| {
                runtime.block_on(async {
                    let mut total = Duration::ZERO;
                    for i in 0..iterations {
                        let give_up = std::time::Instant::now() + Duration::from_secs(30);
                        // The pool full again: the request arrives at an idle process.
                        while warm.warm_ready(language) < WARM_CONTEXTS {
                            assert!(std::time::Instant::now() < give_up, "no warm context was made");
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        let into = if i % 2 == 0 { workspace.clone() } else { other.clone() };
                        let started = std::time::Instant::now();
                        let outcome = warm.run(language, into, code, limits).await.unwrap();
                        total += started.elapsed();
                        assert_eq!(outcome.stdout, b"2\n");
                    }
                    total
                })
            })
        });
    }
    warm_group.finish();

    let mut back_to_back = c.benchmark_group("one-shot-warm-back-to-back");
    back_to_back.measurement_time(Duration::from_secs(8));
    for (language, code) in [(Language::Python, "print(1+1)"), (Language::JavaScript, "console.log(1+1)")] {
        back_to_back.bench_function(language.as_str(), |b| {
            b.iter(|| {
                let outcome = runtime.block_on(warm.run(language, workspace.clone(), code, limits)).unwrap();
                assert_eq!(outcome.stdout, b"2\n");
            })
        });
    }
    back_to_back.finish();

    // A statement, and an expression whose value comes back.
    let mut in_context = c.benchmark_group("eval-in-context");
    for (language, name, code) in [
        (Language::Python, "python", "x = 1 + 1"),
        (Language::Python, "python-value", "x + 1"),
        // The same statement, made to take the exact path (a `;` always does):
        // the syntax tree, then compiling twice. The baseline for the fast path.
        (Language::Python, "python-exact-path", "x = 1 + 1;"),
        (Language::JavaScript, "js", "var x = 1 + 1"),
        (Language::JavaScript, "js-value", "x + 1"),
    ] {
        let id = runtime.block_on(interpreters.create_context(language, workspace.clone(), limits)).unwrap();
        runtime.block_on(interpreters.eval(&id, "x = 1 + 1")).unwrap();
        in_context.bench_function(name, |b| {
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
