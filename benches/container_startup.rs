//! The container tier's start-up and round-trip costs, under runc and runsc,
//! beside the Docker CLI doing the same in the same run:
//!
//! - `cold-create-to-first-command`: create, start, run `true` — what a
//!   sandbox's first container command costs;
//! - `warm-start-to-first-command`: start a stopped sandbox container (as a
//!   sleeping sandbox wakes), run `true`;
//! - `exec-round-trip`: `true` in a running sandbox, as its user (through the
//!   in-container agent, on the stream already open);
//! - `engine-exec-round-trip`: the same as root, which goes through an engine
//!   exec (the path every command took before the agent);
//! - `docker-run-rm`: `docker run --rm --network none <image> true`;
//! - `docker-exec`: `docker exec <container> true`.
//!
//! Containers made in a timed section are removed outside it.
//!
//! Groups are named `container/<runtime>`, with `/userns` added when the
//! engine remaps container uids (`dockerd --userns-remap`), so that runs
//! against a remapping engine and one without are kept apart.
//!
//! Run (as root, after `airlock setup`): `cargo bench --bench container_startup`
//! (numbers and machine in docs/BENCHMARKS.md). Another engine:
//! `AIRLOCK_DOCKER_SOCKET=/path/docker.sock DOCKER_HOST=unix:///path/docker.sock cargo bench ...`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a bench may

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock::ExecRequest;
use airlock::container::{
    ContainerRuntime, ContainerSandbox, DockerEngine, EngineOptions, ImageRecipe, SandboxSpec, ensure_base_image,
};
use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};

fn docker_cli(args: &[&str]) {
    let status = Command::new("docker").args(args).stdout(std::process::Stdio::null()).status().unwrap();
    assert!(status.success(), "docker {args:?} failed");
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (engine, image) = runtime.block_on(async {
        let engine = DockerEngine::connect_or_setup(&EngineOptions::default()).await.unwrap();
        let image = ensure_base_image(&engine, &ImageRecipe::default(), Arc::new(|line: &str| eprintln!("{line}")))
            .await
            .unwrap();
        (engine, image)
    });
    let root = tempfile::tempdir().unwrap();
    // runsc opens workspaces as the engine's remapped root, when it remaps.
    engine.let_remapped_root_pass(root.path()).unwrap();
    let remap = if engine.user_mapping().is_some() { "/userns" } else { "" };
    eprintln!("engine user mapping: {:?}", engine.user_mapping());

    for container_runtime in [ContainerRuntime::Runc, ContainerRuntime::Runsc] {
        let mut group = c.benchmark_group(format!("container/{container_runtime}{remap}"));
        // Each iteration makes a container: flat sampling keeps the count of them bounded.
        group
            .sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(5));
        let true_request = || ExecRequest::new("true");

        group.bench_function("cold-create-to-first-command", |b| {
            b.iter_custom(|iterations| {
                runtime.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iterations {
                        let workspace = root.path().join(airlock::SandboxId::new().to_string());
                        std::fs::create_dir_all(&workspace).unwrap();
                        let spec = SandboxSpec::new(airlock::SandboxId::new().to_string(), &image, &workspace)
                            .runtime(container_runtime);
                        let started = Instant::now();
                        let sandbox = ContainerSandbox::create_started(&engine, spec).await.unwrap();
                        let outcome = sandbox.exec(true_request()).await.unwrap();
                        total += started.elapsed();
                        assert!(outcome.success());
                        sandbox.remove().await.unwrap();
                    }
                    total
                })
            })
        });

        let workspace = root.path().join(format!("exec-{container_runtime}"));
        std::fs::create_dir_all(&workspace).unwrap();
        let spec =
            SandboxSpec::new(airlock::SandboxId::new().to_string(), &image, &workspace).runtime(container_runtime);
        let sandbox = runtime.block_on(ContainerSandbox::create_started(&engine, spec)).unwrap();
        group.bench_function("warm-start-to-first-command", |b| {
            b.iter_custom(|iterations| {
                runtime.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iterations {
                        sandbox.stop().await.unwrap();
                        let started = Instant::now();
                        sandbox.start().await.unwrap();
                        let outcome = sandbox.exec(true_request()).await.unwrap();
                        total += started.elapsed();
                        assert!(outcome.success());
                    }
                    total
                })
            })
        });
        group.bench_function("exec-round-trip", |b| {
            b.iter(|| runtime.block_on(async { assert!(sandbox.exec(true_request()).await.unwrap().success()) }))
        });
        group.bench_function("engine-exec-round-trip", |b| {
            b.iter(|| {
                runtime.block_on(async { assert!(sandbox.exec_as("root", true_request()).await.unwrap().success()) })
            })
        });

        let runtime_flag = format!("--runtime={container_runtime}");
        group.bench_function("docker-run-rm", |b| {
            b.iter(|| docker_cli(&["run", "--rm", "--network", "none", &runtime_flag, &image, "true"]))
        });
        group.bench_function("docker-exec", |b| b.iter(|| docker_cli(&["exec", sandbox.container_id(), "true"])));
        runtime.block_on(sandbox.remove()).unwrap();
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
