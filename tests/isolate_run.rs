//! The isolate tier runs real guests: args, env, stdin, output, exit codes,
//! preview 1 and 2, the workspace, streaming, and the `Tier` seam.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

mod common;

use std::sync::{Arc, Mutex};

use airlock::{ExecRequest, OutputChunk, OutputSender, OutputStream, StdinSource, Termination, Tier, TierKind};
use common::{Fixture, engine, guest};

#[tokio::test]
async fn hello_gets_args_env_and_reports_output_and_exit_code() {
    let fixture = Fixture::new();
    let hello = engine().load_file(guest("hello.wasm")).unwrap();
    assert!(hello.is_component());
    let request = ExecRequest::new("hello").args(["big", "world"]).env("GREETING", "hi there");
    let outcome = engine().run(&hello, &fixture.workspace, &request).await.unwrap();
    assert_eq!(outcome.termination, Termination::Exited { code: 0 });
    assert_eq!(outcome.stdout_text(), "hello, big world\ngreeting: hi there\n");
    assert_eq!(outcome.stderr_text(), "hello on stderr\n");
    assert!(!outcome.stdout_truncated && !outcome.stderr_truncated);
    assert_eq!(outcome.tier, TierKind::Isolate);
    assert!(outcome.wall_time > std::time::Duration::ZERO);

    // Rust's std for wasm32-wasip2 exits through wasi:cli/exit@0.2.0, which
    // carries only success or failure: a component's non-zero exit is 1.
    // Preview 1 modules carry the full code (see preview1_modules_run_too).
    let request = ExecRequest::new("hello").env("EXIT_CODE", "42");
    let outcome = engine().run(&hello, &fixture.workspace, &request).await.unwrap();
    assert_eq!(outcome.exit_code(), Some(1));
    assert!(!outcome.success());
}

#[tokio::test]
async fn host_environment_is_not_inherited() {
    let fixture = Fixture::new();
    // A variable the test process surely has (cargo sets it).
    assert!(std::env::var("CARGO_PKG_NAME").is_ok());
    let hello = engine().load_file(guest("hello.wasm")).unwrap();
    let outcome = engine().run(&hello, &fixture.workspace, &ExecRequest::new("hello")).await.unwrap();
    assert!(!outcome.stdout_text().contains("greeting"), "{}", outcome.stdout_text());
}

#[tokio::test]
async fn stdin_is_passed_explicitly() {
    let fixture = Fixture::new();
    let hello = engine().load_file(guest("hello.wasm")).unwrap();
    let request = ExecRequest::new("hello").args(["--stdin"]).stdin(StdinSource::Bytes(b"piped in".to_vec()));
    let outcome = engine().run(&hello, &fixture.workspace, &request).await.unwrap();
    assert!(outcome.stdout_text().contains("stdin: piped in\n"), "{}", outcome.stdout_text());

    // The default is an empty stdin, never the host's.
    let request = ExecRequest::new("hello").args(["--stdin"]);
    let outcome = engine().run(&hello, &fixture.workspace, &request).await.unwrap();
    assert!(outcome.stdout_text().ends_with("stdin: \n"), "{}", outcome.stdout_text());
}

#[tokio::test]
async fn preview1_modules_run_too() {
    let fixture = Fixture::new();
    let hello = engine().load_file(guest("hello-p1.wasm")).unwrap();
    assert!(!hello.is_component());
    let request = ExecRequest::new("hello").args(["p1"]).env("EXIT_CODE", "3");
    let outcome = engine().run(&hello, &fixture.workspace, &request).await.unwrap();
    assert_eq!(outcome.stdout_text(), "hello, p1\n");
    assert_eq!(outcome.exit_code(), Some(3));
}

#[tokio::test]
async fn guests_read_write_and_list_the_workspace() {
    let fixture = Fixture::new();
    let io = engine().load_file(guest("workspace-io.wasm")).unwrap();
    let run = |args: &[&str]| {
        let request = ExecRequest::new("workspace-io").args(args.iter().copied());
        let io = io.clone();
        let workspace = fixture.workspace.clone();
        async move { engine().run(&io, &workspace, &request).await.unwrap() }
    };

    let wrote = run(&["write", "notes/today.txt", "written by a guest"]).await;
    assert!(wrote.success(), "{wrote:?}");
    assert_eq!(std::fs::read_to_string(fixture.path("notes/today.txt")).unwrap(), "written by a guest");

    std::fs::write(fixture.path("notes/from-host.txt"), "written by the host").unwrap();
    let read = run(&["read", "notes/from-host.txt"]).await;
    assert_eq!(read.stdout_text(), "written by the host");

    let listed = run(&["list", "notes"]).await;
    assert_eq!(listed.stdout_text(), "from-host.txt\ntoday.txt\n");

    let removed = run(&["remove", "notes/today.txt"]).await;
    assert!(removed.success());
    assert!(!fixture.path("notes/today.txt").exists());

    let missing = run(&["read", "nope.txt"]).await;
    assert!(!missing.success());
    assert!(matches!(missing.termination, Termination::Crashed { .. } | Termination::Exited { .. }));
}

#[tokio::test]
async fn output_streams_to_a_sender_as_it_is_written() {
    let fixture = Fixture::new();
    let seen: Arc<Mutex<Vec<OutputChunk>>> = Arc::default();
    let sink = seen.clone();
    let sender: OutputSender = Arc::new(move |chunk| sink.lock().unwrap().push(chunk));
    let hello = engine().load_file(guest("hello.wasm")).unwrap();
    let request = ExecRequest::new("hello").args(["streamed"]).output(sender);
    let outcome = engine().run(&hello, &fixture.workspace, &request).await.unwrap();

    let chunks = seen.lock().unwrap();
    let joined = |stream| chunks.iter().filter(|c| c.stream == stream).flat_map(|c| c.bytes.clone()).collect::<Vec<u8>>();
    assert_eq!(joined(OutputStream::Stdout), outcome.stdout);
    assert_eq!(joined(OutputStream::Stderr), outcome.stderr);
    assert_eq!(outcome.stdout_text(), "hello, streamed\n");
}

#[tokio::test]
async fn the_tier_seam_runs_a_guest_by_path() {
    let fixture = Fixture::new();
    let tier = airlock::IsolateTier::new(engine().clone());
    assert_eq!(tier.kind(), TierKind::Isolate);
    let tier: &dyn Tier = &tier;
    let request = ExecRequest::new(guest("hello.wasm").to_string_lossy()).args(["via", "tier"]);
    let outcome = tier.exec(&fixture.workspace, request).await.unwrap();
    assert_eq!(outcome.stdout_text(), "hello, via tier\n");
}

#[tokio::test]
async fn cpu_time_is_measured() {
    let fixture = Fixture::new();
    let spin = engine().load_file(guest("spin.wasm")).unwrap();
    let limits = airlock::Limits { deadline: std::time::Duration::from_millis(300), ..Default::default() };
    let outcome = engine().run(&spin, &fixture.workspace, &ExecRequest::new("spin").limits(limits)).await.unwrap();
    // A busy loop for 300 ms of wall time uses CPU for most of it; hello uses almost none.
    assert!(outcome.cpu_time > std::time::Duration::from_millis(50), "{:?}", outcome.cpu_time);
    assert!(outcome.cpu_time <= outcome.wall_time + std::time::Duration::from_millis(20));
}

#[test]
fn bad_guests_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = engine().load_file(dir.path().join("missing.wasm")).unwrap_err().to_string();
    assert!(missing.contains("missing.wasm") && missing.contains("No such file"), "{missing}");

    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, "this is not wasm (").unwrap();
    let err = engine().load_file(&junk).unwrap_err().to_string();
    assert!(err.contains("neither a wasm binary nor valid wasm text"), "{err}");

    let library = dir.path().join("library.wat");
    std::fs::write(&library, "(module (func (export \"add\") (param i32 i32) (result i32) local.get 0 local.get 1 i32.add))").unwrap();
    let err = engine().load_file(&library).unwrap_err().to_string();
    assert!(err.contains("not a WASI command"), "{err}");

    let importer = dir.path().join("importer.wat");
    std::fs::write(&importer, "(module (import \"host\" \"secret\" (func)) (func (export \"_start\")))").unwrap();
    let err = engine().load_file(&importer).unwrap_err().to_string();
    assert!(err.contains("cannot be linked"), "{err}");

    let wasm = std::fs::read(guest("hello.wasm")).unwrap();
    let native = wasmtime::Engine::default().precompile_component(&wasm).unwrap();
    let err = engine().load_bytes("native.cwasm", &native).unwrap_err().to_string();
    assert!(err.contains("precompiled native code"), "{err}");

    let err = engine().load_file(dir.path()).unwrap_err().to_string();
    assert!(err.contains("not a file"), "{err}");
}
