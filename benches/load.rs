//! A bounded load test through the library: N sandboxes created and used
//! concurrently, mixed tiers, zero errors allowed. Every sandbox evaluates
//! Python in an isolate and writes a file through the files API; every
//! `--container-every`-th one also runs a command in its container that reads
//! that file. At most `--concurrency` operations are in flight (the isolate
//! engine refuses runs past its slot count rather than queueing them).
//! Reports wall time, per-operation latency percentiles, and the process's
//! peak resident memory (containers' own memory is not included).
//!
//! Run (as root, after `airlock setup`):
//! `cargo bench --bench load -- --sandboxes 1000 --container-every 20 --concurrency 64`
//! Under `cargo test` it runs a small pass (20 sandboxes, 2 containers).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a bench may

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock::runtime::{Runtime, RuntimeOptions};
use airlock::{ExecRequest, Language, TierKind};

struct Settings {
    sandboxes: usize,
    container_every: usize,
    concurrency: usize,
}

fn settings() -> Settings {
    let args: Vec<String> = std::env::args().collect();
    let benching = args.iter().any(|arg| arg == "--bench");
    let value = |name: &str, default: usize| {
        args.iter()
            .position(|arg| arg == name)
            .and_then(|at| args.get(at + 1))
            .map(|text| text.parse().unwrap_or_else(|_| panic!("{name} takes a number")))
            .unwrap_or(default)
    };
    if benching {
        Settings {
            sandboxes: value("--sandboxes", 1000),
            container_every: value("--container-every", 20),
            concurrency: value("--concurrency", 64),
        }
    } else {
        Settings { sandboxes: 20, container_every: 10, concurrency: 8 }
    }
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn report(name: &str, mut times: Vec<Duration>) {
    times.sort_unstable();
    println!(
        "  {name:<28} n={:<5} p50 {:>8.2} ms  p90 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms",
        times.len(),
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.9).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
        times.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}

#[derive(Default)]
struct Timings {
    create: Vec<Duration>,
    code: Vec<Duration>,
    write: Vec<Duration>,
    container: Vec<Duration>,
}

fn main() {
    let settings = settings();
    let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let home = tempfile::tempdir().unwrap();
    tokio.block_on(async {
        let mut options = RuntimeOptions::new(home.path());
        // The integration tests' cache (CARGO_TARGET_TMPDIR), so a test pass compiles nothing again.
        options.isolates.cache_dir = Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tmp/guest-cache"));
        let runtime = Runtime::open(options).await.unwrap();
        // Warm: the interpreter compiled (or read from the cache) and the
        // container engine and image ready, so the run measures use, not set-up.
        let warm = runtime.sandbox("warm-up").await.unwrap();
        warm.code(Language::Python, "1").await.unwrap();
        warm.exec(ExecRequest::new("true")).await.unwrap();
        runtime.destroy("warm-up").await.unwrap();

        let limit = Arc::new(tokio::sync::Semaphore::new(settings.concurrency));
        let timings = Arc::new(std::sync::Mutex::new(Timings::default()));
        let started = Instant::now();
        let mut tasks = Vec::with_capacity(settings.sandboxes);
        for index in 0..settings.sandboxes {
            let (runtime, limit, timings) = (runtime.clone(), limit.clone(), timings.clone());
            let uses_container = index % settings.container_every == 0;
            tasks.push(tokio::spawn(async move {
                let _slot = limit.acquire().await.unwrap();
                let name = format!("load-{index}");
                let at = Instant::now();
                let sandbox = runtime.sandbox(&name).await?;
                let create = at.elapsed();
                let at = Instant::now();
                let code = sandbox.code(Language::Python, &format!("print({index} * 2)")).await?;
                let code_time = at.elapsed();
                if code.outcome.stdout_text() != format!("{}\n", index * 2) || code.placement.tier != TierKind::Isolate
                {
                    return Err(format!(
                        "{name}: code gave {:?} in {}",
                        code.outcome.stdout_text(),
                        code.placement.tier
                    )
                    .into());
                }
                let at = Instant::now();
                sandbox.write_file("note.txt", name.as_bytes()).await?;
                let write = at.elapsed();
                let mut container = None;
                if uses_container {
                    let at = Instant::now();
                    let ran = sandbox.exec(ExecRequest::new("cat").args(["note.txt"])).await?;
                    container = Some(at.elapsed());
                    if ran.outcome.stdout_text() != name || ran.placement.tier != TierKind::Container {
                        return Err(format!("{name}: the container read {:?}", ran.outcome.stdout_text()).into());
                    }
                }
                let mut timings = timings.lock().unwrap();
                timings.create.push(create);
                timings.code.push(code_time);
                timings.write.push(write);
                timings.container.extend(container);
                Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
            }));
        }
        let mut errors = Vec::new();
        for task in tasks {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => errors.push(error.to_string()),
                Err(error) => errors.push(error.to_string()),
            }
        }
        let elapsed = started.elapsed();
        let containers = settings.sandboxes.div_ceil(settings.container_every);
        println!(
            "load: {} sandboxes ({} with a container), concurrency {}: {:.2} s, {} errors, peak RSS {:.1} MiB",
            settings.sandboxes,
            containers,
            settings.concurrency,
            elapsed.as_secs_f64(),
            errors.len(),
            peak_rss_kib() as f64 / 1024.0
        );
        let timings = std::mem::take(&mut *timings.lock().unwrap());
        report("get-or-create sandbox", timings.create);
        report("python in an isolate", timings.code);
        report("write a file", timings.write);
        report("first command in container", timings.container);
        let usage = runtime.usage(&Default::default()).unwrap();
        println!(
            "  usage: {} executions, {:.3} vCPU-s, ${:.6}",
            usage.total.executions, usage.cpu_seconds, usage.cost_usd
        );

        let teardown = Instant::now();
        for index in (0..settings.sandboxes).step_by(settings.container_every) {
            runtime.destroy(&format!("load-{index}")).await.unwrap();
        }
        println!("  removing the {containers} containers took {:.2} s", teardown.elapsed().as_secs_f64());
        assert!(errors.is_empty(), "{} errors, the first: {}", errors.len(), errors[0]);
        assert_eq!(runtime.list().unwrap().len(), settings.sandboxes - containers);
    });
}
