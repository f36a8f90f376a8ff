//! The runtime against the real isolate tier and the real Docker engine:
//! routing and escalation, lifecycle, persistence across a kill -9,
//! metering, files across tiers, and one container per sandbox.
//!
//! Needs the guests built and the engine set up (`scripts/test.sh` does both);
//! a missing engine fails these tests, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use airlock::runtime::{Error, SandboxConfig, SandboxState, TierPreference, UsageQuery};
use airlock::{EscalationReason, EvalResult, ExecRequest, Language, Limits, Termination, TierKind};
use common::{Cleanup, bash, runtime_in};

/// Containers the engine has for one sandbox, running or not.
fn containers_of(sandbox_id: &str) -> usize {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=airlock.sandbox={sandbox_id}")])
        .output()
        .expect("running docker ps");
    assert!(out.status.success(), "docker ps: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().count()
}

fn container_status(container_id: &str) -> String {
    let out = Command::new("docker").args(["inspect", "--format", "{{.State.Status}}", container_id]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_that_spawns_a_subprocess_escalates_and_succeeds_in_the_container() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let sandbox = runtime.sandbox("escalating").await.unwrap();
    let _cleanup = Cleanup(vec![sandbox.id().to_string()]);

    // What an isolate can do stays there.
    let plain = sandbox.code(Language::Python, "print(6 * 7)").await.unwrap();
    assert_eq!(plain.placement.tier, TierKind::Isolate);
    assert_eq!(plain.outcome.stdout_text(), "42\n");
    assert_eq!(sandbox.info().escalated, None);
    assert_eq!(containers_of(&sandbox.id().to_string()), 0, "no container for isolate work");

    let code =
        "import subprocess\nprint(subprocess.run(['uname', '-s'], capture_output=True, text=True).stdout.strip())";
    let ran = sandbox.code(Language::Python, code).await.unwrap();
    assert_eq!(ran.placement.tier, TierKind::Container);
    assert_eq!(ran.placement.escalated, Some(EscalationReason::Subprocess));
    assert!(ran.outcome.is_ok(), "{:?} {}", ran.outcome.result, ran.outcome.stderr_text());
    assert_eq!(ran.outcome.stdout_text(), "Linux\n");
    // JavaScript that the isolate cannot run escalates the same way, to node in the container.
    let script = "const { execSync } = require('child_process');\nconsole.log(execSync('uname -s').toString().trim())";
    let node = sandbox.code(Language::JavaScript, script).await.unwrap();
    assert_eq!(node.placement.tier, TierKind::Container);
    assert_eq!(node.placement.escalated, Some(EscalationReason::Subprocess));
    assert!(node.outcome.is_ok(), "{:?} {}", node.outcome.result, node.outcome.stderr_text());
    assert_eq!(node.outcome.stdout_text(), "Linux\n");
    // JavaScript the isolate can run stays there.
    let plain_js = sandbox.code(Language::JavaScript, "console.log(6 * 7)").await.unwrap();
    assert_eq!(plain_js.placement.tier, TierKind::Isolate);
    assert_eq!(plain_js.outcome.stdout_text(), "42\n");
    // Errors keep their kind.
    let failing = sandbox.code(Language::Python, "import subprocess\nraise ValueError('bad')").await.unwrap();
    match &failing.outcome.result {
        EvalResult::RuntimeError(error) => {
            assert_eq!((error.kind.as_str(), error.message.as_str()), ("ValueError", "bad"))
        }
        other => panic!("expected a runtime error, got {other:?}"),
    }

    // The sandbox remembers, across a reopen.
    let reason = sandbox.info().escalated.expect("the escalation is remembered");
    assert!(reason.contains("subprocess"), "{reason}");
    drop(sandbox);
    drop(runtime);
    let runtime = runtime_in(home.path()).await;
    let again = runtime.get("escalating").unwrap().unwrap();
    assert_eq!(again.info().escalated, Some(reason));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_goes_straight_to_the_container_and_isolates_take_guests() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let sandbox = runtime.sandbox("repo").await.unwrap();
    let _cleanup = Cleanup(vec![sandbox.id().to_string()]);

    let setup = "git init -q . && git -c user.email=a@b -c user.name=A commit -q --allow-empty -m first";
    assert!(sandbox.exec(bash(setup)).await.unwrap().outcome.success());
    let log = sandbox.exec(ExecRequest::new("git").args(["log", "--format=%s"])).await.unwrap();
    assert_eq!(log.placement.tier, TierKind::Container);
    assert_eq!(log.placement.reason, "git needs a full Linux");
    assert_eq!(log.outcome.stdout_text(), "first\n");

    // A WebAssembly guest in the workspace runs in an isolate, with the same files.
    let guest = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("guests/out/hello.wasm")).unwrap();
    sandbox.write_file("bin/hello.wasm", &guest).await.unwrap();
    let hello =
        sandbox.exec(ExecRequest::new("/workspace/bin/hello.wasm").args(["from", "the", "router"])).await.unwrap();
    assert_eq!(hello.placement.tier, TierKind::Isolate);
    assert!(hello.outcome.success(), "{:?}", hello.outcome.termination);
    assert!(hello.outcome.stdout_text().contains("from the router"), "{}", hello.outcome.stdout_text());

    // A sandbox may run its container under gVisor.
    let gvisor =
        SandboxConfig { container_runtime: airlock::container::ContainerRuntime::Runsc, ..SandboxConfig::default() };
    let guarded = runtime.sandbox_with("guarded", gvisor).await.unwrap();
    let _cleanup_guarded = Cleanup(vec![guarded.id().to_string()]);
    let version = guarded.exec(ExecRequest::new("git").args(["--version"])).await.unwrap();
    assert!(version.outcome.stdout_text().starts_with("git version"), "{}", version.outcome.stderr_text());
    let container_id = guarded.info().container_id.unwrap();
    let out = Command::new("docker")
        .args(["inspect", "--format", "{{.HostConfig.Runtime}}", &container_id])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "runsc");

    // A sandbox pinned to isolates refuses what needs a container, naming why.
    let pinned = runtime
        .sandbox_with("pinned", SandboxConfig { tier: TierPreference::Isolate, ..SandboxConfig::default() })
        .await
        .unwrap();
    let refused = pinned.exec(ExecRequest::new("git").args(["log"])).await.unwrap_err();
    assert!(matches!(refused, Error::TierNotAllowed { .. }), "{refused}");
    assert_eq!(refused.to_string(), "git needs the container tier, and this sandbox is limited to the isolate tier");
    let no_port = pinned.connect_port(8000).await.unwrap_err();
    assert!(matches!(no_port, Error::TierNotAllowed { .. }), "{no_port}");
    assert!(matches!(pinned.start_process(bash("sleep 1")).await, Err(Error::TierNotAllowed { .. })));
    // A port inside the container is reached with no network in between.
    let server = ExecRequest::new("python3").args(["-m", "http.server", "8000", "--bind", "127.0.0.1"]);
    sandbox.write_file("index.html", b"preview").await.unwrap();
    sandbox.start_process(server).await.unwrap();
    let mut body = String::new();
    for _ in 0..100 {
        if let Ok(mut stream) = sandbox.connect_port(8000).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            stream.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").await.unwrap();
            let _ = stream.read_to_string(&mut body).await;
            if body.ends_with("preview") {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(body.starts_with("HTTP/1.0 200") && body.ends_with("preview"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleep_and_wake_keep_files_and_installed_packages() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let config = SandboxConfig { idle_timeout: Duration::from_secs(1), ..SandboxConfig::default() };
    let sandbox = runtime.sandbox_with("sleepy", config).await.unwrap();
    let _cleanup = Cleanup(vec![sandbox.id().to_string()]);

    assert!(sandbox.exec(bash("echo kept > /workspace/kept.txt")).await.unwrap().outcome.success());
    // A "package" installed as root outside the workspace, in the container's own filesystem.
    let install = "printf '#!/bin/sh\\necho installed\\n' > /usr/local/bin/greet && chmod 755 /usr/local/bin/greet";
    assert!(sandbox.exec_as("root", bash(install)).await.unwrap().outcome.success());
    let context = sandbox.create_context(Language::Python).await.unwrap();
    let container_id = sandbox.info().container_id.unwrap();

    // Idle past its timeout: asleep, container stopped, contexts kept (rebuilt when next used).
    let give_up = Instant::now() + Duration::from_secs(20);
    while sandbox.info().state != SandboxState::Sleeping {
        assert!(Instant::now() < give_up, "the sandbox never slept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(container_status(&container_id), "exited");
    assert_eq!(sandbox.contexts().len(), 1, "the context is kept by a sleep");
    assert_eq!(runtime.list().unwrap()[0].state, SandboxState::Sleeping, "the registry says asleep");
    let restored = sandbox.code_in(&context, "1").await.unwrap();
    assert!(restored.outcome.is_ok(), "{:?}", restored.outcome.result);
    assert!(restored.placement.context_restored.is_some(), "the context was rebuilt, and said so");

    // The next request wakes it, with files and the installed program intact.
    let woke = sandbox.exec(bash("cat /workspace/kept.txt; greet")).await.unwrap();
    assert_eq!(woke.outcome.stdout_text(), "kept\ninstalled\n", "{}", woke.outcome.stderr_text());
    assert_eq!(sandbox.info().state, SandboxState::Active);
    assert_eq!(sandbox.info().container_id.as_deref(), Some(container_id.as_str()), "the same container woke");

    // keep_alive opts out of sleeping.
    let awake = SandboxConfig { idle_timeout: Duration::from_secs(1), keep_alive: true, ..SandboxConfig::default() };
    let kept = runtime.sandbox_with("awake", awake).await.unwrap();
    kept.code(Language::Python, "1").await.unwrap();
    // A running background process (a dev server) keeps a sandbox awake too.
    let serving = runtime
        .sandbox_with("serving", SandboxConfig { idle_timeout: Duration::from_secs(1), ..SandboxConfig::default() })
        .await
        .unwrap();
    let _cleanup_serving = Cleanup(vec![serving.id().to_string()]);
    let server = serving.start_process(ExecRequest::new("sleep").args(["300"])).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(kept.info().state, SandboxState::Active);
    assert_eq!(serving.info().state, SandboxState::Active, "slept under a running process");
    serving.signal_process(&server, airlock::container::Signal::Kill).await.unwrap();
    serving.wait_process(&server).await.unwrap();
    let give_up = Instant::now() + Duration::from_secs(20);
    while serving.info().state != SandboxState::Sleeping {
        assert!(Instant::now() < give_up, "never slept after its process ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_killed_mid_operation_loses_nothing_acknowledged() {
    let home = tempfile::tempdir().unwrap();
    let home_arg = home.path().to_str().unwrap().to_string();
    // `--home` goes after the subcommand, before any `--`.
    let cli = |command: &[&str], rest: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
            .args(command)
            .args(["--home", &home_arg])
            .args(rest)
            .output()
            .unwrap();
        assert!(out.status.success(), "airlock {command:?} {rest:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let kept_id = cli(&["sandbox", "create", "kept"], &[]).trim().to_string();
    let _cleanup = Cleanup(vec![kept_id.clone()]);
    cli(&["sandbox", "create", "other"], &[]);
    cli(&["exec", "kept"], &["--", "bash", "-c", "echo durable > /workspace/f"]);

    // A runtime process killed in the middle of a command.
    let mut doomed = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["exec", "kept", "--home", &home_arg, "--", "sleep", "60"])
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    doomed.kill().unwrap();
    doomed.wait().unwrap();

    // An orphan: a container with this home's label for a sandbox the registry never knew.
    let label = {
        let runtime = runtime_in(home.path()).await;
        runtime.home_label().to_string()
    };
    let setup = Command::new(env!("CARGO_BIN_EXE_airlock")).args(["setup", "--no-runsc"]).output().unwrap();
    assert!(setup.status.success(), "airlock setup: {}", String::from_utf8_lossy(&setup.stderr));
    let image = String::from_utf8_lossy(&setup.stdout).trim().to_string();
    let orphan = Command::new("docker")
        .args(["create", "--network", "none", "--label", "airlock.sandbox=sbx-00000000000000000000000000000000"])
        .args(["--label", &format!("airlock.home={label}"), &image, "true"])
        .output()
        .unwrap();
    assert!(orphan.status.success(), "{}", String::from_utf8_lossy(&orphan.stderr));
    let orphan_id = String::from_utf8_lossy(&orphan.stdout).trim().to_string();

    let runtime = runtime_in(home.path()).await;
    let names: Vec<String> = runtime.list().unwrap().into_iter().map(|info| info.name).collect();
    assert_eq!(names, vec!["kept", "other"]);
    let usage = runtime.usage(&UsageQuery { sandbox: Some("kept".into()), ..UsageQuery::default() }).unwrap();
    assert!(usage.total.executions >= 1, "the acknowledged exec's record is gone");
    assert_eq!(container_status(&orphan_id), "", "the orphan was not removed");
    // The sandbox's container is adopted, not duplicated, and has the file.
    let kept = runtime.get("kept").unwrap().unwrap();
    let read = kept.exec(ExecRequest::new("cat").args(["/workspace/f"])).await.unwrap();
    assert_eq!(read.outcome.stdout_text(), "durable\n");
    assert_eq!(containers_of(&kept_id), 1, "a second container for one sandbox");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_is_billed_for_work_not_for_waiting() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let busy = runtime.sandbox("busy").await.unwrap();
    let idle = runtime.sandbox("idle").await.unwrap();
    let _cleanup = Cleanup(vec![busy.id().to_string(), idle.id().to_string()]);

    let spin = "import time\nend = time.process_time() + 1.0\nwhile time.process_time() < end:\n    pass";
    let spun = busy.exec(ExecRequest::new("python3").args(["-c", spin])).await.unwrap();
    assert!(spun.outcome.success());
    let slept = idle.exec(ExecRequest::new("sleep").args(["1"])).await.unwrap();
    assert!(slept.outcome.success());

    let billed =
        |name: &str| runtime.usage(&UsageQuery { sandbox: Some(name.into()), ..UsageQuery::default() }).unwrap();
    let busy_usage = billed("busy");
    let idle_usage = billed("idle");
    assert!((0.8..=1.2).contains(&busy_usage.cpu_seconds), "a 1 s loop billed {} vCPU-s", busy_usage.cpu_seconds);
    assert!(idle_usage.cpu_seconds < 0.1, "sleep 1 billed {} vCPU-s", idle_usage.cpu_seconds);
    assert!(idle_usage.total.wall_time >= Duration::from_secs(1));
    assert!((busy_usage.cost_usd - busy_usage.cpu_seconds * 0.000_02).abs() < 1e-12);
    let all = runtime.usage(&UsageQuery::default()).unwrap();
    assert_eq!(all.total.executions, 2);
    assert_eq!(all.container.executions, 2);

    // The isolate tier bills the thread CPU time of the run.
    let thinker = runtime.sandbox("thinker").await.unwrap();
    let loop_for_a_second = "import time\nend = time.monotonic() + 1.0\nwhile time.monotonic() < end:\n    pass";
    let thought = thinker.code(Language::Python, loop_for_a_second).await.unwrap();
    assert_eq!(thought.placement.tier, TierKind::Isolate);
    assert!(thought.outcome.is_ok(), "{:?}", thought.outcome.result);
    let isolate = billed("thinker");
    assert_eq!(isolate.isolate.executions, 1);
    // The loop runs for a second of wall time; on a loaded two-core machine
    // (the other tests of this file, or other test binaries, run beside it) it
    // gets part of a CPU, at times well under half, never more than one, and
    // the bill is what it got.
    assert!(
        (0.1..=1.2).contains(&isolate.cpu_seconds),
        "a 1 s loop in an isolate billed {} vCPU-s",
        isolate.cpu_seconds
    );
    assert!(isolate.cpu_seconds <= thought.outcome.wall_time.as_secs_f64() * 1.05);
    // A sleeping sandbox costs nothing: no execution, no CPU, while it sleeps.
    thinker.sleep().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(billed("thinker").total, isolate.total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_shared_by_both_tiers_and_confined() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let sandbox = runtime.sandbox("files").await.unwrap();
    let _cleanup = Cleanup(vec![sandbox.id().to_string()]);

    sandbox.write_file("data/in.txt", b"from the host").await.unwrap();
    // The container reads it and may change it (the host's files go to the sandbox user).
    let edited = sandbox.exec(bash("cat data/in.txt; echo ' and the container' >> data/in.txt")).await.unwrap();
    assert_eq!(edited.outcome.stdout_text(), "from the host");
    // An isolate reads what the container wrote.
    let read = sandbox.code(Language::Python, "print(open('/workspace/data/in.txt').read().strip())").await.unwrap();
    assert_eq!(read.placement.tier, TierKind::Isolate);
    assert_eq!(read.outcome.stdout_text(), "from the host and the container\n");
    // What an isolate writes, the container's user may change (and vice versa).
    let made = sandbox.code(Language::Python, "import os\nos.makedirs('/workspace/made/deep', exist_ok=True)\nopen('/workspace/made/deep/by-isolate.txt', 'w').write('isolate')").await.unwrap();
    assert!(made.outcome.is_ok(), "{:?}", made.outcome.result);
    let changed = sandbox.exec(bash("echo ' then container' >> made/deep/by-isolate.txt && touch made/deep/next && cat made/deep/by-isolate.txt")).await.unwrap();
    assert!(changed.outcome.success(), "{}", changed.outcome.stderr_text());
    assert_eq!(changed.outcome.stdout_text(), "isolate then container\n");
    sandbox.rename_file("data/in.txt", "data/out.txt").await.unwrap();
    let names: Vec<String> = sandbox.list_files("data").await.unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(names, vec!["out.txt"]);

    // A link made inside the container that leads out is not followed.
    assert!(sandbox.exec(bash("ln -s /etc /workspace/etc-link")).await.unwrap().outcome.success());
    let refused = sandbox.read_file("etc-link/passwd").await.unwrap_err();
    assert!(refused.to_string().contains("symbolic link"), "{refused}");
    for escape in ["../airlock.db", "/etc/passwd"] {
        assert!(matches!(sandbox.read_file(escape).await, Err(Error::Path { .. })), "{escape}");
    }
    sandbox.remove_file("data").await.unwrap();
    assert!(sandbox.list_files("data").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sandbox_never_gets_two_containers_and_sandboxes_run_in_parallel() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let first = runtime.sandbox("crowded").await.unwrap();
    let second = runtime.sandbox("neighbour").await.unwrap();
    let _cleanup = Cleanup(vec![first.id().to_string(), second.id().to_string()]);

    // Many requests at once on a sandbox with no container yet, through separate handles.
    let mut runs = Vec::new();
    for index in 0..8 {
        let runtime = runtime.clone();
        let name = if index % 2 == 0 { "crowded" } else { "neighbour" };
        runs.push(tokio::spawn(async move {
            let sandbox = runtime.sandbox(name).await.unwrap();
            let script = format!("echo {index} >> /workspace/log; echo {index}");
            sandbox.exec(bash(&script)).await.unwrap()
        }));
    }
    for (index, run) in futures_util::future::join_all(runs).await.into_iter().enumerate() {
        let ran = run.unwrap();
        assert_eq!(ran.outcome.termination, Termination::Exited { code: 0 });
        assert_eq!(ran.outcome.stdout_text(), format!("{index}\n"));
    }
    assert_eq!(containers_of(&first.id().to_string()), 1);
    assert_eq!(containers_of(&second.id().to_string()), 1);
    // No lost writes: every line made it.
    let mut lines: Vec<u32> = String::from_utf8(first.read_file("log").await.unwrap())
        .unwrap()
        .lines()
        .map(|line| line.parse().unwrap())
        .collect();
    lines.sort_unstable();
    assert_eq!(lines, vec![0, 2, 4, 6]);

    // Limits are checked before anything runs; a bad name is refused.
    let mut request = bash("true");
    request.limits = Limits { deadline: Duration::ZERO, ..Limits::default() };
    assert!(first.exec(request).await.is_err());
    assert!(matches!(runtime.sandbox("Not A Name").await, Err(Error::InvalidName(_))));
    // Destroy removes the container and the workspace, and frees the name.
    let workspace = first.workspace().host_path().to_path_buf();
    runtime.destroy("crowded").await.unwrap();
    assert_eq!(containers_of(&first.id().to_string()), 0);
    assert!(!workspace.exists());
    assert!(runtime.get("crowded").unwrap().is_none());
    let reborn = runtime.sandbox("crowded").await.unwrap();
    assert_ne!(reborn.id(), first.id(), "ids are never reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_events_arrive_for_files_written_by_each_tier() {
    use airlock::runtime::{FileChange, Lifecycle, SandboxEvent};

    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let sandbox = runtime.sandbox("watched").await.unwrap();
    let _cleanup = Cleanup(vec![sandbox.id().to_string()]);
    let mut events = sandbox.watch().unwrap();

    sandbox.write_file("host.txt", b"from the host").await.unwrap();
    let isolate =
        sandbox.code(Language::Python, "open('/workspace/isolate.txt', 'w').write('from an isolate')").await.unwrap();
    assert_eq!(isolate.placement.tier, TierKind::Isolate);
    let container = sandbox
        .exec(bash("mkdir -p sub && echo hi > sub/container.txt && mv sub/container.txt moved.txt && rm host.txt"))
        .await
        .unwrap();
    assert!(container.outcome.success(), "{}", container.outcome.stderr_text());
    let process = sandbox.start_process(bash("echo out; exit 3")).await.unwrap();
    assert_eq!(sandbox.wait_process(&process).await.unwrap(), Some(3));
    sandbox.sleep().await.unwrap();

    let file = |change, path: &str| SandboxEvent::File { change, path: path.to_string() };
    let mut expected = vec![
        file(FileChange::Created, "host.txt"),
        file(FileChange::Created, "isolate.txt"),
        file(FileChange::Created, "sub"),
        file(FileChange::Removed, "host.txt"),
        SandboxEvent::Renamed { from: "sub/container.txt".into(), to: "moved.txt".into() },
        SandboxEvent::ProcessOutput {
            process: process.clone(),
            stream: airlock::OutputStream::Stdout,
            bytes: b"out\n".to_vec(),
        },
        SandboxEvent::ProcessExited { process, code: Some(3) },
        SandboxEvent::Lifecycle { change: Lifecycle::ContainerStarted },
        SandboxEvent::Lifecycle { change: Lifecycle::Slept },
    ];
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !expected.is_empty() {
        let next = tokio::time::timeout_at(deadline, events.next()).await;
        let Ok(Some(event)) = next else { panic!("missing {expected:?}; saw {seen:?}") };
        expected.retain(|wanted| *wanted != event);
        seen.push(event);
    }
    // Coalesced: the host's write is one event, not a create and a modify.
    let host_events =
        seen.iter().filter(|e| matches!(e, SandboxEvent::File { path, .. } if path == "host.txt")).count();
    assert_eq!(host_events, 2, "created once, removed once: {seen:?}");
    let moved = seen.iter().filter(|e| matches!(e, SandboxEvent::File { path, .. } if path == "moved.txt")).count();
    assert_eq!(moved, 0, "a rename is one event: {seen:?}");
    assert_eq!(events.missed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contexts_keep_state_belong_to_their_sandbox_and_take_turns() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let notebook = runtime.sandbox("notebook").await.unwrap();
    let stranger = runtime.sandbox("stranger").await.unwrap();
    let context = notebook.create_context(Language::Python).await.unwrap();
    assert!(notebook.code_in(&context, "total = 0").await.unwrap().outcome.is_ok());
    // Evaluations on one context at once take turns; none is lost or refused.
    let adds = (0..6).map(|_| {
        let (notebook, context) = (notebook.clone(), context.clone());
        tokio::spawn(async move { notebook.code_in(&context, "total += 1").await.unwrap() })
    });
    for added in futures_util::future::join_all(adds).await {
        assert!(added.unwrap().outcome.is_ok());
    }
    let total = notebook.code_in(&context, "total").await.unwrap();
    assert_eq!(total.outcome.value().map(|v| v.text.as_str()), Some("6"));
    assert_eq!(notebook.contexts().len(), 1);
    // Another sandbox cannot reach it.
    assert!(matches!(stranger.code_in(&context, "total").await, Err(Error::Core(airlock::Error::NoSuchContext(_)))));
    notebook.delete_context(&context).unwrap();
    assert!(notebook.code_in(&context, "total").await.is_err());
}

/// Waits (up to 20 s) for the sandbox to fall asleep.
async fn until_asleep(sandbox: &airlock::Sandbox, what: &str) {
    let give_up = Instant::now() + Duration::from_secs(20);
    while sandbox.info().state != SandboxState::Sleeping {
        assert!(Instant::now() < give_up, "never slept {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_terminal_or_port_stream_keeps_a_sandbox_awake() {
    use tokio::io::AsyncReadExt;
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let config = SandboxConfig { idle_timeout: Duration::from_secs(1), ..SandboxConfig::default() };
    let sandbox = runtime.sandbox_with("watched", config).await.unwrap();
    let _cleanup = Cleanup(vec![sandbox.id().to_string()]);

    // A terminal left open with nothing typed: three idle timeouts pass, awake.
    let mut pty = sandbox
        .open_pty(ExecRequest::new("bash").args(["--norc", "-i"]), airlock::container::PtySize::default())
        .await
        .unwrap();
    pty.write(b"echo ready\n").await.unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("ready\r\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), pty.read()).await.unwrap().unwrap().unwrap();
        seen.extend_from_slice(&chunk);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sandbox.info().state, SandboxState::Active, "slept with a terminal open");
    drop(pty);
    until_asleep(&sandbox, "after its terminal closed").await;

    // A port stream left open, its server gone: awake until the stream is dropped.
    let server = "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                  s.bind(('127.0.0.1', 8000))\ns.listen(1)\nc, _ = s.accept()\nc.sendall(b'hi')";
    let process = sandbox.start_process(ExecRequest::new("python3").args(["-c", server])).await.unwrap();
    let give_up = Instant::now() + Duration::from_secs(30);
    let mut stream = loop {
        match sandbox.connect_port(8000).await {
            Ok(stream) => break stream,
            Err(error) => assert!(Instant::now() < give_up, "the server never listened: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut greeting = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut greeting)).await.unwrap().unwrap();
    assert_eq!(&greeting, b"hi");
    // The process that served it has ended: only the stream is left.
    sandbox.wait_process(&process).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sandbox.info().state, SandboxState::Active, "slept with a port stream open");
    drop(stream);
    until_asleep(&sandbox, "after its port stream closed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_holds_at_most_its_limit_of_contexts() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let config = SandboxConfig { max_contexts: 2, ..SandboxConfig::default() };
    let notebook = runtime.sandbox_with("small-notebook", config).await.unwrap();
    let first = notebook.create_context(Language::Python).await.unwrap();
    let second = notebook.create_context(Language::JavaScript).await.unwrap();
    match notebook.create_context(Language::Python).await {
        Err(error @ Error::SandboxLimit { limit: "max_contexts", held: 2, max: 2, .. }) => {
            assert!(error.to_string().contains("max_contexts"), "{error}")
        }
        other => panic!("expected the contexts limit, got {other:?}"),
    }
    // Nothing else broke: the contexts it has work, one-shot code runs, a neighbour is unaffected.
    assert!(notebook.code_in(&first, "x = 1").await.unwrap().outcome.is_ok());
    assert!(notebook.code_in(&second, "1 + 1").await.unwrap().outcome.is_ok());
    assert!(notebook.code(Language::Python, "print(1)").await.unwrap().outcome.is_ok());
    let neighbour = runtime.sandbox("neighbour").await.unwrap();
    for _ in 0..3 {
        neighbour.create_context(Language::Python).await.unwrap();
    }
    assert_eq!(notebook.contexts().len(), 2);
    // A slot freed is a slot to use again; concurrent creates never pass the limit.
    notebook.delete_context(&first).unwrap();
    let racing = (0..4).map(|_| {
        let notebook = notebook.clone();
        tokio::spawn(async move { notebook.create_context(Language::Python).await })
    });
    let made = futures_util::future::join_all(racing).await.into_iter().filter(|r| r.as_ref().unwrap().is_ok()).count();
    assert_eq!(made, 1, "one slot was free");
    assert_eq!(notebook.contexts().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_runs_at_most_its_limits_of_processes_and_terminals() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let config = SandboxConfig { max_processes: 1, max_ptys: 1, ..SandboxConfig::default() };
    let sandbox = runtime.sandbox_with("bounded", config).await.unwrap();
    let _cleanup = Cleanup(vec![sandbox.id().to_string()]);

    let server = sandbox.start_process(ExecRequest::new("sleep").args(["300"])).await.unwrap();
    match sandbox.start_process(ExecRequest::new("sleep").args(["300"])).await {
        Err(error @ Error::SandboxLimit { limit: "max_processes", held: 1, max: 1, .. }) => {
            assert!(error.to_string().contains("max_processes"), "{error}")
        }
        other => panic!("expected the processes limit, got {other:?}"),
    }
    // The running one is untouched and commands still run.
    let listed = sandbox.list_processes().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].status, airlock::container::ProcessStatus::Running);
    assert!(sandbox.exec(bash("true")).await.unwrap().outcome.success());
    // Exited processes do not count.
    sandbox.signal_process(&server, airlock::container::Signal::Kill).await.unwrap();
    sandbox.wait_process(&server).await.unwrap();
    let next = sandbox.start_process(bash("echo again")).await.unwrap();
    assert_eq!(sandbox.wait_process(&next).await.unwrap(), Some(0));

    let size = airlock::container::PtySize::default();
    let mut terminal = sandbox.open_pty(ExecRequest::new("bash").args(["--norc", "-i"]), size).await.unwrap();
    match sandbox.open_pty(ExecRequest::new("bash"), size).await {
        Err(error @ Error::SandboxLimit { limit: "max_ptys", held: 1, max: 1, .. }) => {
            assert!(error.to_string().contains("max_ptys"), "{error}")
        }
        other => panic!("expected the terminals limit, got {other:?}"),
    }
    // The open terminal still works.
    terminal.write(b"echo still-here\n").await.unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("still-here\r\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), terminal.read()).await.unwrap().unwrap().unwrap();
        seen.extend_from_slice(&chunk);
    }
    // Closing it frees the slot.
    drop(terminal);
    let again = sandbox.open_pty(bash("exit 4"), size).await.unwrap();
    assert_eq!(again.wait().await.unwrap(), Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_home_and_sandbox_directories_are_closed_to_other_users() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().unwrap();
    // Open the way down to the home, and the home itself, as an older home might be.
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = parent.path().join("home");
    std::fs::create_dir_all(home.join("sandboxes")).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;

    let runtime = runtime_in(&home).await;
    let sandbox = runtime.sandbox("private").await.unwrap();
    sandbox.write_file("secret.txt", b"for the sandbox only").await.unwrap();
    let sandbox_dir = home.join("sandboxes").join(sandbox.id().to_string());
    for dir in [home.clone(), home.join("sandboxes"), sandbox_dir.clone()] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    // Another host user (nobody) can neither list nor read.
    let secret = sandbox_dir.join("workspace").join("secret.txt");
    for (program, target) in [("ls", &sandbox_dir), ("ls", &home), ("cat", &secret)] {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", program])
            .arg(target)
            .output()
            .unwrap();
        assert!(!out.status.success(), "nobody ran {program} {}", target.display());
        assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "{out:?}");
    }

    // A sandbox directory left open (made by an older runtime) is closed on the next open.
    std::fs::set_permissions(&sandbox_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    drop(sandbox);
    drop(runtime);
    let _runtime = runtime_in(&home).await;
    assert_eq!(mode(&sandbox_dir), 0o700);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_processes_ends_every_running_tree_and_stdin_and_offsets_pass_through() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let sandbox = runtime.sandbox("killall").await.unwrap();
    let _cleanup = Cleanup(vec![sandbox.id().to_string()]);
    // Before any container: nothing to kill, and no process to write to.
    assert!(sandbox.kill_processes().await.unwrap().is_empty());
    assert!(sandbox.write_process_stdin("nope", b"x").await.is_err());

    let done = sandbox.start_process(bash("echo finished")).await.unwrap();
    assert_eq!(sandbox.wait_process(&done).await.unwrap(), Some(0));
    let cat = sandbox.start_process_with_stdin(ExecRequest::new("cat")).await.unwrap();
    sandbox.write_process_stdin(&cat, b"through-the-runtime\n").await.unwrap();
    let tree = sandbox.start_process(bash("sleep 6789 & setsid sleep 6790 & wait")).await.unwrap();
    // Resumed at an offset, through the runtime.
    let mut follower = sandbox.follow_process_from(&cat, 8).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(30), follower.next()).await.unwrap() {
        Some(airlock::container::ProcessEvent::Output(chunk)) => assert_eq!(chunk.bytes, b"the-runtime\n"),
        other => panic!("expected output, got {other:?}"),
    }

    let mut killed = sandbox.kill_processes().await.unwrap();
    killed.sort();
    let mut expected = vec![cat.clone(), tree.clone()];
    expected.sort();
    assert_eq!(killed, expected, "the running ones, not the one that had finished");
    assert_eq!(sandbox.wait_process(&tree).await.unwrap(), Some(128 + 9));
    assert_eq!(sandbox.wait_process(&cat).await.unwrap(), Some(128 + 9));
    let ps = sandbox.exec(bash("ps -eo args | grep -c '^sleep 67' || true")).await.unwrap();
    assert_eq!(ps.outcome.stdout_text().trim(), "0", "the whole trees went");
    assert!(sandbox.kill_processes().await.unwrap().is_empty());
}
