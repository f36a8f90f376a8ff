//! Limits hold against hostile guests, each hit reported as the limit it is,
//! and a run that traps leaves every other run untouched.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

mod common;

use std::time::Duration;

use airlock::limits::{KIB, MIB};
use airlock::{ExecRequest, Limit, LimitExceeded, Limits, Termination};
use common::{Fixture, engine, guest};

fn limits(adjust: impl FnOnce(&mut Limits)) -> Limits {
    let mut limits = Limits::default();
    adjust(&mut limits);
    limits
}

async fn run(name: &str, args: &[&str], limits: Limits) -> airlock::ExecOutcome {
    let fixture = Fixture::new();
    let guest = engine().load_file(guest(name)).unwrap();
    let request = ExecRequest::new(name).args(args.iter().copied()).limits(limits);
    engine().run(&guest, &fixture.workspace, &request).await.unwrap()
}

fn assert_limit(outcome: &airlock::ExecOutcome, limit: Limit, value: u64) {
    assert_eq!(outcome.termination, Termination::LimitExceeded(LimitExceeded { limit, value }), "{outcome:?}");
}

#[tokio::test]
async fn an_infinite_loop_stops_within_twice_the_deadline() {
    let deadline = Duration::from_secs(1);
    let outcome = run("spin.wasm", &[], limits(|l| l.deadline = deadline)).await;
    assert_limit(&outcome, Limit::Deadline, 1000);
    assert!(outcome.wall_time >= deadline, "{:?}", outcome.wall_time);
    assert!(outcome.wall_time < 2 * deadline, "{:?}", outcome.wall_time);
    assert_eq!(outcome.termination.to_string(), "wall-clock deadline of 1s exceeded");
}

#[tokio::test]
async fn a_guest_sleeping_in_a_host_call_stops_within_twice_the_deadline() {
    let deadline = Duration::from_secs(1);
    let outcome = run("blocker.wasm", &["sleep"], limits(|l| l.deadline = deadline)).await;
    assert_limit(&outcome, Limit::Deadline, 1000);
    assert!(outcome.wall_time < 2 * deadline, "{:?}", outcome.wall_time);
}

#[tokio::test]
async fn a_memory_bomb_hits_the_memory_limit() {
    let outcome = run("memory-bomb.wasm", &[], limits(|l| l.memory_bytes = 32 * MIB)).await;
    assert_limit(&outcome, Limit::Memory, 32 * MIB);
    assert_eq!(outcome.termination.to_string(), "memory limit of 32 MiB exceeded");
}

#[tokio::test]
async fn an_output_flood_is_cut_at_the_cap_and_flagged() {
    let outcome = run("output-flood.wasm", &[], limits(|l| l.output_bytes = 10 * KIB)).await;
    assert_limit(&outcome, Limit::Output, 10 * KIB);
    assert_eq!(outcome.stdout.len() as u64, 10 * KIB);
    assert!(outcome.stdout_truncated);
    assert!(!outcome.stderr_truncated);
    assert!(outcome.stdout_text().starts_with("flooding the host"));

    let outcome = run("output-flood.wasm", &["stderr"], limits(|l| l.output_bytes = 4 * KIB)).await;
    assert_limit(&outcome, Limit::Output, 4 * KIB);
    assert_eq!(outcome.stderr.len() as u64, 4 * KIB);
    assert!(outcome.stderr_truncated && !outcome.stdout_truncated);
}

#[tokio::test]
async fn deep_recursion_hits_the_stack_limit() {
    let outcome = run("deep-recursion.wasm", &[], Limits::default()).await;
    assert_limit(&outcome, Limit::Stack, airlock::wasm::WASM_STACK_BYTES as u64);
    // Bounded recursion of the same guest is fine.
    let outcome = run("deep-recursion.wasm", &["1000"], Limits::default()).await;
    assert!(outcome.success(), "{outcome:?}");
}

#[tokio::test]
async fn a_table_bomb_hits_the_table_limit() {
    let outcome = run("table-bomb.wat", &[], Limits::default()).await;
    assert_limit(&outcome, Limit::TableElements, Limits::default().table_elements);
    // With room for it, the same growth succeeds.
    let outcome = run("table-bomb.wat", &[], limits(|l| l.table_elements = 300_000)).await;
    assert!(outcome.success(), "{outcome:?}");
}

#[tokio::test]
async fn an_instance_bomb_hits_the_instance_limit() {
    let outcome = run("instance-bomb.wat", &[], limits(|l| l.instances = 50)).await;
    assert_limit(&outcome, Limit::Instances, 50);
    // 200 core instances fit under a cap of 250.
    let outcome = run("instance-bomb.wat", &[], limits(|l| l.instances = 250)).await;
    assert!(outcome.success(), "{outcome:?}");
}

#[tokio::test]
async fn invalid_limits_are_refused_before_running() {
    let fixture = Fixture::new();
    let hello = engine().load_file(guest("hello.wasm")).unwrap();
    let request = ExecRequest::new("hello").limits(limits(|l| l.memory_bytes = 64 * 1024 * MIB));
    let err = engine().run(&hello, &fixture.workspace, &request).await.unwrap_err().to_string();
    assert_eq!(err, "invalid limits: memory limit may be at most 4 GiB, got 64 GiB");
}

#[tokio::test]
async fn a_trap_never_affects_another_run() {
    let fixture = Fixture::new();
    let hello = engine().load_file(guest("hello.wasm")).unwrap();
    let hello_once = || {
        let hello = hello.clone();
        let workspace = fixture.workspace.clone();
        async move { engine().run(&hello, &workspace, &ExecRequest::new("hello").args(["again"])).await.unwrap() }
    };
    let before = hello_once().await;
    assert_eq!(before.stdout_text(), "hello, again\n");

    // Hostile runs of every kind, while hello keeps running beside them.
    let hostile = async {
        let small = limits(|l| {
            l.memory_bytes = 16 * MIB;
            l.output_bytes = KIB;
            l.deadline = Duration::from_millis(500);
        });
        let mut stops = Vec::new();
        for name in ["memory-bomb.wasm", "deep-recursion.wasm", "output-flood.wasm", "spin.wasm", "table-bomb.wat"] {
            stops.push(run(name, &[], small).await.termination);
        }
        stops
    };
    let beside = async {
        let mut outputs = Vec::new();
        for _ in 0..20 {
            outputs.push(hello_once().await.stdout_text());
        }
        outputs
    };
    let (stops, outputs) = tokio::join!(hostile, beside);
    assert!(stops.iter().all(|t| matches!(t, Termination::LimitExceeded(_))), "{stops:?}");
    assert!(outputs.iter().all(|o| o == "hello, again\n"), "{outputs:?}");

    let after = hello_once().await;
    assert_eq!(after, airlock::ExecOutcome { wall_time: after.wall_time, cpu_time: after.cpu_time, ..before });
}

/// Host file descriptors this process holds.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test]
async fn opening_files_in_a_loop_is_refused_inside_the_guest_at_the_handle_cap() {
    let cap = 64;
    let outcome = run("handle-hog.wasm", &[], limits(|l| l.handles = cap)).await;
    assert!(outcome.success(), "{outcome:?}");
    let text = outcome.stdout_text();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("hogging"), "{text}");
    let opened: u64 = lines.next().unwrap().strip_prefix("opened ").unwrap().parse().unwrap();
    // Stdio and the workspace preopen hold a few handles of the cap.
    assert!(opened > cap - 16 && opened < cap, "{text}");
    // An error the guest handles (ENOMEM from wasi-libc), not a trap.
    assert!(lines.next().unwrap().starts_with("refused: "), "{text}");
    assert_eq!(lines.next(), Some("reopened after closing"), "{text}");

    // The cap is what stopped it: a larger cap lets the same guest open more.
    let outcome = run("handle-hog.wasm", &[], limits(|l| l.handles = 4 * cap)).await;
    let more: u64 = outcome.stdout_text().lines().nth(1).unwrap().strip_prefix("opened ").unwrap().parse().unwrap();
    assert!(more > 3 * cap, "{outcome:?}");
}

#[tokio::test]
async fn a_preview1_module_past_the_handle_cap_stops_at_the_handle_limit() {
    // Preview 1 offers no hook to answer with an errno: the run ends, reported as the limit.
    let outcome = run("handle-hog-p1.wasm", &[], limits(|l| l.handles = 32)).await;
    assert_limit(&outcome, Limit::Handles, 32);
    let outcome = run("handle-hog-p1.wasm", &["10"], limits(|l| l.handles = 32)).await;
    assert!(outcome.success(), "{outcome:?}");
    assert_eq!(outcome.stdout_text(), "hogging\nopened 10\nnever refused\nreopened after closing\n");
}

#[tokio::test]
async fn handle_exhaustion_in_one_isolate_leaves_the_others_and_the_host_fine() {
    let fixture = Fixture::new();
    let hello = engine().load_file(guest("hello.wasm")).unwrap();
    let hog = engine().load_file(guest("handle-hog.wasm")).unwrap();
    let fds_before = open_fds();
    let hogs = (0..4).map(|_| {
        let hog = hog.clone();
        async move {
            let fixture = Fixture::new();
            let request = ExecRequest::new("handle-hog").limits(limits(|l| l.handles = 200));
            engine().run(&hog, &fixture.workspace, &request).await.unwrap()
        }
    });
    let beside = async {
        let mut outputs = Vec::new();
        for _ in 0..20 {
            let request = ExecRequest::new("hello").args(["beside"]);
            outputs.push(engine().run(&hello, &fixture.workspace, &request).await.unwrap().stdout_text());
        }
        outputs
    };
    let (hogged, outputs) = tokio::join!(futures_util::future::join_all(hogs), beside);
    for outcome in &hogged {
        assert!(outcome.success(), "{outcome:?}");
        assert!(outcome.stdout_text().contains("\nrefused: "), "{outcome:?}");
    }
    assert!(outputs.iter().all(|o| o == "hello, beside\n"), "{outputs:?}");
    // Every descriptor the hogs held was closed with their runs.
    assert!(open_fds() <= fds_before + 8, "{} fds after, {fds_before} before", open_fds());
}

#[test]
fn limits_saved_before_the_handle_cap_existed_take_its_default() {
    let old: Limits = serde_json::from_str(r#"{"deadline": 1000, "memory_bytes": 1048576}"#).unwrap();
    assert_eq!(old.handles, airlock::limits::DEFAULT_HANDLES);
    assert_eq!(old.deadline, Duration::from_secs(1));
}
