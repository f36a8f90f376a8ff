//! Interpreter contexts outlive their instances: kept in the registry as
//! evaluations succeed, they come back (rebuilt by replaying their history)
//! after their sandbox slept, after the runtime was dropped and reopened on
//! the same home, and after a real `airlock serve` was killed with -9 and
//! started again; a forked context holds the source's variables, functions
//! and imports and the two diverge; a context that had moved to the container
//! comes back there; a deleted context leaves nothing behind; a hostile
//! context cannot grow what is kept past the history's caps.
//!
//! Real isolates (the guests must be built) and, where a test says so, the
//! real Docker engine (a missing engine fails those tests, loudly).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use airlock::runtime::{
    ContextOptions, Error, MAX_REPLAY_BYTES, MAX_REPLAY_EVALUATIONS, Runtime, RuntimeOptions, SandboxState,
};
use airlock::{EvalResult, Language, SideEffect, TierKind};
use common::Cleanup;

fn value_text(outcome: &airlock::EvalOutcome) -> String {
    match &outcome.result {
        EvalResult::Ok { value: Some(value) } => value.text.clone(),
        other => panic!("expected a value, got {other:?}; stderr: {}", outcome.stderr_text()),
    }
}

fn options(home: &Path) -> RuntimeOptions {
    let mut options = RuntimeOptions::new(home);
    options.isolates.cache_dir = Some(Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-cache"));
    // A runtime just dropped lets the home go once its last handle is gone.
    options.home_lock_wait = Duration::from_secs(20);
    options
}

async fn open(home: &Path) -> Runtime {
    Runtime::open(options(home)).await.expect("opening the runtime")
}

/// The registry's files (database and write-ahead log) as bytes.
fn registry_bytes(home: &Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    for name in ["airlock.db", "airlock.db-wal"] {
        if let Ok(mut read) = std::fs::read(home.join(name)) {
            bytes.append(&mut read);
        }
    }
    bytes
}

fn registry_size(home: &Path) -> u64 {
    ["airlock.db", "airlock.db-wal"]
        .iter()
        .filter_map(|name| std::fs::metadata(home.join(name)).ok())
        .map(|m| m.len())
        .sum()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle.as_bytes())
}

const PYTHON_STATE: &str = "import json\nimport math as m\nx = [41]\ndef area(r):\n    return round(m.pi * r * r, 3)";
const JS_STATE: &str = "let x = [41];\nfunction twice(n) { return 2 * n; }\nconst label = JSON.stringify({k: 'v'});";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_javascript_contexts_keep_their_state_across_sleep() {
    let home = tempfile::tempdir().unwrap();
    let runtime = open(home.path()).await;
    let sandbox = runtime.sandbox("sleeper").await.unwrap();
    let python = sandbox.create_context(Language::Python).await.unwrap();
    let js = sandbox.create_context(Language::JavaScript).await.unwrap();
    assert!(sandbox.code_in(&python, PYTHON_STATE).await.unwrap().outcome.is_ok());
    // A failure is not kept (it is not replayed).
    let failed = sandbox.code_in(&python, "undefined_name").await.unwrap();
    assert!(matches!(failed.outcome.result, EvalResult::RuntimeError(_)));
    assert!(sandbox.code_in(&python, "x.append(1)").await.unwrap().outcome.is_ok());
    assert!(sandbox.code_in(&js, JS_STATE).await.unwrap().outcome.is_ok());

    sandbox.sleep().await.unwrap();
    assert_eq!(sandbox.info().state, SandboxState::Sleeping);
    let listed = sandbox.contexts();
    assert_eq!(listed.len(), 2, "contexts are kept by a sleep: {listed:?}");

    let back = sandbox.code_in(&python, "json.dumps([x, area(1)])").await.unwrap();
    assert_eq!(value_text(&back.outcome), "'[[41, 1], 3.142]'");
    assert_eq!(back.placement.tier, TierKind::Isolate);
    let restored = back.placement.context_restored.clone().expect("the restore is reported");
    assert!(restored.replayed);
    assert_eq!(restored.tier, TierKind::Isolate);
    assert_eq!(restored.replayed_evaluations, 2, "{restored:?}");
    assert!(restored.replay_failures.is_empty(), "{restored:?}");
    assert!(!restored.history_truncated);
    // Only the first evaluation after the sleep reports it.
    let next = sandbox.code_in(&python, "len(x)").await.unwrap();
    assert_eq!(value_text(&next.outcome), "2");
    assert!(next.placement.context_restored.is_none());

    let back = sandbox.code_in(&js, "twice(x[0]) * 100 + label.length").await.unwrap();
    assert_eq!(value_text(&back.outcome), "8209");
    assert_eq!(back.placement.context_restored.as_ref().unwrap().replayed_evaluations, 1);
    assert_eq!(sandbox.info().state, SandboxState::Active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contexts_and_forks_come_back_after_the_runtime_is_reopened() {
    let home = tempfile::tempdir().unwrap();
    let (python, js, fork) = {
        let runtime = open(home.path()).await;
        let sandbox = runtime.sandbox("restarted").await.unwrap();
        let python = sandbox.create_context(Language::Python).await.unwrap();
        let js = sandbox.create_context(Language::JavaScript).await.unwrap();
        sandbox.code_in(&python, PYTHON_STATE).await.unwrap();
        sandbox.code_in(&js, JS_STATE).await.unwrap();
        let fork = sandbox.fork_context(&python).await.unwrap();
        sandbox.code_in(&fork.id, "x.append('fork')").await.unwrap();
        (python, js, fork.id)
    };
    // Every handle dropped: the runtime lets the home go, and another opens it.
    let runtime = open(home.path()).await;
    let sandbox = runtime.get("restarted").unwrap().expect("the sandbox is kept");
    let mut ids: Vec<String> = sandbox.contexts().into_iter().map(|info| info.id).collect();
    ids.sort();
    let mut expected = vec![python.clone(), js.clone(), fork.clone()];
    expected.sort();
    assert_eq!(ids, expected);

    let back = sandbox.code_in(&python, "[x, area(2), json.dumps(1)]").await.unwrap();
    assert_eq!(value_text(&back.outcome), "[[41], 12.566, '1']");
    assert_eq!(back.placement.context_restored.as_ref().unwrap().replayed_evaluations, 1);
    let back = sandbox.code_in(&fork, "x").await.unwrap();
    assert_eq!(value_text(&back.outcome), "[41, 'fork']");
    let back = sandbox.code_in(&js, "twice(x[0])").await.unwrap();
    assert_eq!(value_text(&back.outcome), "82");
    // New contexts made now do not collide with the kept ones.
    let fresh = sandbox.create_context(Language::Python).await.unwrap();
    assert!(!expected.contains(&fresh));
    let empty = sandbox.code_in(&fresh, "x").await.unwrap();
    assert!(matches!(empty.outcome.result, EvalResult::RuntimeError(_)), "{:?}", empty.outcome.result);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forked_context_holds_the_state_and_the_two_diverge() {
    let home = tempfile::tempdir().unwrap();
    let runtime = open(home.path()).await;
    let sandbox = runtime.sandbox("forks").await.unwrap();

    let source = sandbox.create_context(Language::Python).await.unwrap();
    sandbox.code_in(&source, PYTHON_STATE).await.unwrap();
    let fork = sandbox.fork_context(&source).await.unwrap();
    assert_ne!(fork.id, source);
    assert_eq!(fork.source, source);
    assert_eq!(fork.replay.tier, TierKind::Isolate);
    assert_eq!(fork.replay.replayed_evaluations, 1);
    assert!(fork.replay.replay_failures.is_empty(), "{:?}", fork.replay);
    // Variables, functions and imported modules are in the fork.
    let there = sandbox.code_in(&fork.id, "[x, area(1), m.sqrt(16), json.dumps({'a': 1})]").await.unwrap();
    assert_eq!(value_text(&there.outcome), "[[41], 3.142, 4.0, '{\"a\": 1}']");
    // Mutate one, check the other, both ways.
    sandbox.code_in(&fork.id, "x.append('fork')\ndef area(r):\n    return -1").await.unwrap();
    assert_eq!(value_text(&sandbox.code_in(&source, "[x, area(1)]").await.unwrap().outcome), "[[41], 3.142]");
    sandbox.code_in(&source, "x.append('source')").await.unwrap();
    assert_eq!(value_text(&sandbox.code_in(&fork.id, "[x, area(1)]").await.unwrap().outcome), "[[41, 'fork'], -1]");
    assert_eq!(sandbox.contexts().len(), 3 - 1);

    let js = sandbox.create_context(Language::JavaScript).await.unwrap();
    sandbox.code_in(&js, JS_STATE).await.unwrap();
    let js_fork = sandbox.fork_context(&js).await.unwrap();
    assert_eq!(
        value_text(
            &sandbox.code_in(&js_fork.id, "x.push(7); twice(x.length) * 100 + label.length").await.unwrap().outcome
        ),
        "409"
    );
    assert_eq!(value_text(&sandbox.code_in(&js, "x.length").await.unwrap().outcome), "1");

    // A fork repeats the side effects of what it replays, and says so.
    let writer = sandbox.create_context(Language::Python).await.unwrap();
    let wrote = sandbox.code_in(&writer, "open('/workspace/count.txt', 'a').write('x')\nn = 1").await.unwrap();
    assert!(wrote.outcome.is_ok(), "{:?}", wrote.outcome.result);
    let forked = sandbox.fork_context(&writer).await.unwrap();
    assert!(
        forked
            .replay
            .repeated_side_effects
            .iter()
            .any(|e| matches!(e, SideEffect::File { path, .. } if path.contains("count.txt"))),
        "{:?}",
        forked.replay
    );
    assert_eq!(sandbox.read_file("count.txt").await.unwrap(), b"xx", "the replay wrote again");

    // Forks count against max_contexts; an unknown source is refused.
    assert!(matches!(
        sandbox.fork_context("no-such-context").await,
        Err(Error::Core(airlock::Error::NoSuchContext(_)))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forks_respect_max_contexts() {
    let home = tempfile::tempdir().unwrap();
    let runtime = open(home.path()).await;
    let config = airlock::runtime::SandboxConfig { max_contexts: 2, ..Default::default() };
    let sandbox = runtime.sandbox_with("full", config).await.unwrap();
    let source = sandbox.create_context(Language::JavaScript).await.unwrap();
    sandbox.fork_context(&source).await.unwrap();
    match sandbox.fork_context(&source).await {
        Err(Error::SandboxLimit { limit: "max_contexts", .. }) => {}
        other => panic!("expected the contexts limit, got {other:?}"),
    }
    // Kept contexts count after a reopen too.
    drop(sandbox);
    drop(runtime);
    let runtime = open(home.path()).await;
    let sandbox = runtime.get("full").unwrap().unwrap();
    assert_eq!(sandbox.contexts().len(), 2);
    assert!(matches!(sandbox.create_context(Language::Python).await, Err(Error::SandboxLimit { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_context_and_a_destroyed_sandbox_leave_nothing_kept() {
    let home = tempfile::tempdir().unwrap();
    let marker = "kept_marker_5ce1e2 = 1";
    {
        let runtime = open(home.path()).await;
        let sandbox = runtime.sandbox("forgetful").await.unwrap();
        let gone = sandbox.create_context(Language::Python).await.unwrap();
        sandbox.code_in(&gone, marker).await.unwrap();
        let kept = sandbox.create_context(Language::Python).await.unwrap();
        sandbox.code_in(&kept, "y = 2").await.unwrap();
        sandbox.delete_context(&gone).unwrap();
        assert!(matches!(sandbox.code_in(&gone, "1").await, Err(Error::Core(airlock::Error::NoSuchContext(_)))));
        let doomed = runtime.sandbox("doomed").await.unwrap();
        let context = doomed.create_context(Language::Python).await.unwrap();
        doomed.code_in(&context, "doomed_marker_77ab = 1").await.unwrap();
        runtime.destroy("doomed").await.unwrap();
    }
    // Closed, the registry holds neither snippet (deleted rows are overwritten).
    let bytes = registry_bytes(home.path());
    assert!(!contains(&bytes, "kept_marker_5ce1e2"), "a deleted context's code is still in the registry");
    assert!(!contains(&bytes, "doomed_marker_77ab"), "a destroyed sandbox's context is still in the registry");
    assert!(contains(&bytes, "y = 2"), "the check can fail: a kept context's code is there");
    let runtime = open(home.path()).await;
    let sandbox = runtime.get("forgetful").unwrap().unwrap();
    assert_eq!(sandbox.contexts().len(), 1);
    assert!(runtime.get("doomed").unwrap().is_none());
}

/// A context fed more evaluations and bytes than the caps: what is kept (in
/// memory and in the registry) stays within them, and the restore says the
/// state may be partial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_context_cannot_grow_what_is_kept_past_the_caps() {
    let home = tempfile::tempdir().unwrap();
    let runtime = open(home.path()).await;
    let sandbox = runtime.sandbox("hostile").await.unwrap();
    let counter = sandbox.create_context(Language::JavaScript).await.unwrap();
    sandbox.code_in(&counter, "var first = 'kept?'").await.unwrap();
    for n in 0..=MAX_REPLAY_EVALUATIONS {
        sandbox.code_in(&counter, &format!("var v = {n}")).await.unwrap();
    }
    // Megabytes of code, several times the byte cap in all.
    let bulky = sandbox.create_context(Language::Python).await.unwrap();
    let padding = "#".repeat(MAX_REPLAY_BYTES / 3);
    for n in 0..12 {
        let fed = sandbox.code_in(&bulky, &format!("{padding}\nb = {n}")).await.unwrap();
        assert!(fed.outcome.is_ok(), "{:?}", fed.outcome.result);
    }
    let size = registry_size(home.path());
    assert!(size < 4 * MAX_REPLAY_BYTES as u64, "the registry grew to {size} bytes");

    sandbox.sleep().await.unwrap();
    let back = sandbox.code_in(&counter, "v").await.unwrap();
    assert_eq!(value_text(&back.outcome), format!("{MAX_REPLAY_EVALUATIONS}"));
    let restored = back.placement.context_restored.unwrap();
    assert_eq!(restored.replayed_evaluations, MAX_REPLAY_EVALUATIONS);
    assert!(restored.history_truncated);
    // The oldest were dropped: the first variable is gone.
    let first = sandbox.code_in(&counter, "typeof first === 'undefined'").await.unwrap();
    assert_eq!(value_text(&first.outcome), "true");
    let back = sandbox.code_in(&bulky, "b").await.unwrap();
    assert_eq!(value_text(&back.outcome), "11");
    let restored = back.placement.context_restored.unwrap();
    assert_eq!(restored.replayed_evaluations, 2, "{restored:?}");
    assert!(restored.history_truncated);
}

/// A context with replay off comes back empty after a sleep, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_with_replay_off_comes_back_empty_and_says_so() {
    let home = tempfile::tempdir().unwrap();
    let runtime = open(home.path()).await;
    let sandbox = runtime.sandbox("no-replay").await.unwrap();
    let context =
        sandbox.create_context_with(Language::Python, ContextOptions { replay_on_escalation: false }).await.unwrap();
    sandbox.code_in(&context, "x = 1").await.unwrap();
    sandbox.sleep().await.unwrap();
    let back = sandbox.code_in(&context, "x").await.unwrap();
    assert!(matches!(back.outcome.result, EvalResult::RuntimeError(_)), "{:?}", back.outcome.result);
    let restored = back.placement.context_restored.unwrap();
    assert!(!restored.replayed);
    assert_eq!(restored.replayed_evaluations, 0);
}

/// Needs Docker: a context that moved to the container comes back there
/// after a sleep (its container stopped) and after a reopen, with its state;
/// its fork lives there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_that_moved_to_the_container_comes_back_there() {
    let home = tempfile::tempdir().unwrap();
    let (context, id) = {
        let runtime = open(home.path()).await;
        let sandbox = runtime.sandbox("moved").await.unwrap();
        let context = sandbox.create_context(Language::Python).await.unwrap();
        sandbox.code_in(&context, "x = 41").await.unwrap();
        let moved = sandbox.code_in(&context, "import numpy as np\ny = int(np.int64(1))").await.unwrap();
        assert_eq!(moved.placement.tier, TierKind::Container, "{:?}", moved.placement);
        assert!(moved.outcome.is_ok(), "{:?}", moved.outcome.result);
        sandbox.code_in(&context, "z = int(np.array([x, y]).sum())").await.unwrap();

        sandbox.sleep().await.unwrap();
        let back = sandbox.code_in(&context, "z").await.unwrap();
        assert_eq!(back.placement.tier, TierKind::Container);
        assert_eq!(value_text(&back.outcome), "42");
        let restored = back.placement.context_restored.unwrap();
        assert_eq!(restored.tier, TierKind::Container);
        assert_eq!(restored.replayed_evaluations, 3, "{restored:?}");
        assert!(restored.replay_failures.is_empty(), "{restored:?}");

        let fork = sandbox.fork_context(&context).await.unwrap();
        assert_eq!(fork.replay.tier, TierKind::Container);
        sandbox.code_in(&fork.id, "z = -1").await.unwrap();
        assert_eq!(value_text(&sandbox.code_in(&context, "z").await.unwrap().outcome), "42");
        let fork_z = sandbox.code_in(&fork.id, "[z, int(np.int64(x))]").await.unwrap();
        assert_eq!(fork_z.placement.tier, TierKind::Container);
        assert_eq!(value_text(&fork_z.outcome), "[-1, 41]");
        (context, sandbox.id().to_string())
    };
    let _cleanup = Cleanup(vec![id]);
    let runtime = open(home.path()).await;
    let sandbox = runtime.get("moved").unwrap().unwrap();
    let info = sandbox.contexts().into_iter().find(|info| info.id == context).unwrap();
    assert_eq!(info.tier, TierKind::Container);
    let back = sandbox.code_in(&context, "z + np.int64(0)").await.unwrap();
    assert_eq!(back.placement.tier, TierKind::Container);
    assert_eq!(value_text(&back.outcome), "42");
    assert_eq!(back.placement.context_restored.unwrap().tier, TierKind::Container);
    runtime.destroy("moved").await.unwrap();
}

// ---- A real server, killed with -9 ----

const AIRLOCK: &str = env!("CARGO_BIN_EXE_airlock");

struct Server {
    child: std::process::Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(home: &Path) -> Server {
    use std::io::BufRead;
    let mut child = std::process::Command::new(AIRLOCK)
        .args(["serve", "--listen", "127.0.0.1:0", "--home"])
        .arg(home)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = sender.send(line);
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    let first = receiver.recv_timeout(Duration::from_secs(180)).expect("the server starts");
    let base = first.trim().strip_prefix("airlock: listening on ").unwrap_or_else(|| panic!("{first:?}")).to_string();
    Server { child, base }
}

/// The server's guest cache is the test binaries' one (compiled once).
fn server_home() -> (tempfile::TempDir, PathBuf) {
    let home = tempfile::tempdir().unwrap();
    let cache = home.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    std::os::unix::fs::symlink(Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-cache"), cache.join("guests"))
        .unwrap();
    let path = home.path().to_path_buf();
    (home, path)
}

async fn post(
    client: &reqwest::Client,
    server: &Server,
    token: &str,
    path: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let response = client.post(format!("{}{path}", server.base)).bearer_auth(token).json(&body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(serde_json::Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contexts_come_back_after_the_server_is_killed_with_sigkill() {
    let (_dir, home) = server_home();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let server = serve(&home);
    let token = std::fs::read_to_string(home.join(airlock_server::ADMIN_TOKEN_FILE)).unwrap().trim().to_string();
    let (status, _) = post(&client, &server, &token, "/sandboxes", serde_json::json!({ "name": "killed" })).await;
    assert_eq!(status, 201);
    let (status, made) =
        post(&client, &server, &token, "/sandboxes/killed/contexts", serde_json::json!({ "language": "python" })).await;
    assert_eq!(status, 201, "{made}");
    let context = made["id"].as_str().unwrap().to_string();
    let (status, answer) = post(
        &client,
        &server,
        &token,
        "/sandboxes/killed/code",
        serde_json::json!({ "context": context, "code": PYTHON_STATE }),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let (status, fork) =
        post(&client, &server, &token, &format!("/sandboxes/killed/contexts/{context}/fork"), serde_json::json!(null))
            .await;
    assert_eq!(status, 201, "{fork}");
    assert_eq!(fork["source"], context.as_str());
    assert_eq!(fork["replayed_evaluations"], 1, "{fork}");
    let forked = fork["id"].as_str().unwrap().to_string();
    post(
        &client,
        &server,
        &token,
        "/sandboxes/killed/code",
        serde_json::json!({ "context": forked, "code": "x.append(2)" }),
    )
    .await;

    // SIGKILL: nothing is flushed or closed by the server itself.
    let killed = std::process::Command::new("kill").args(["-KILL", &server.child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    drop(server);

    let server = serve(&home);
    let (status, answer) = post(
        &client,
        &server,
        &token,
        "/sandboxes/killed/code",
        serde_json::json!({ "context": context, "code": "[x, area(1), json.dumps(0)]" }),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["result"]["value"]["text"], "[[41], 3.142, '0']", "{answer}");
    assert_eq!(answer["placement"]["context_restored"]["replayed_evaluations"], 1, "{answer}");
    let (status, answer) =
        post(&client, &server, &token, "/sandboxes/killed/code", serde_json::json!({ "context": forked, "code": "x" }))
            .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["result"]["value"]["text"], "[41, 2]", "{answer}");
    // An unknown context to fork is a 404.
    let (status, _) =
        post(&client, &server, &token, "/sandboxes/killed/contexts/nope/fork", serde_json::json!(null)).await;
    assert_eq!(status, 404);
}

/// Races: evaluations sent at once to a context that slept rebuild it once
/// (one answer reports the restore, none is lost), and forks taken while the
/// source is evaluating copy it between two evaluations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_evaluations_rebuild_a_slept_context_once() {
    let home = tempfile::tempdir().unwrap();
    let runtime = open(home.path()).await;
    let sandbox = runtime.sandbox("racing").await.unwrap();
    let context = sandbox.create_context(Language::Python).await.unwrap();
    sandbox.code_in(&context, "total = 0").await.unwrap();
    sandbox.sleep().await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (sandbox, context) = (sandbox.clone(), context.clone());
        tasks.push(tokio::spawn(async move { sandbox.code_in(&context, "total += 1").await.unwrap() }));
    }
    let forker = {
        let (sandbox, context) = (sandbox.clone(), context.clone());
        tokio::spawn(async move { sandbox.fork_context(&context).await.unwrap() })
    };
    let mut restores = 0;
    for task in tasks {
        let answer = task.await.unwrap();
        assert!(answer.outcome.is_ok(), "{:?}", answer.outcome.result);
        restores += usize::from(answer.placement.context_restored.is_some());
    }
    assert_eq!(restores, 1, "the context was rebuilt more than once, or never");
    assert_eq!(value_text(&sandbox.code_in(&context, "total").await.unwrap().outcome), "6");
    let fork = forker.await.unwrap();
    let forked: u64 = value_text(&sandbox.code_in(&fork.id, "total").await.unwrap().outcome).parse().unwrap();
    assert!(forked <= 6, "the fork saw {forked}");
    // The fork's count is its own from then on.
    sandbox.code_in(&fork.id, "total = 100").await.unwrap();
    assert_eq!(value_text(&sandbox.code_in(&context, "total").await.unwrap().outcome), "6");
}
