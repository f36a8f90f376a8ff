//! Sandbox snapshots against the real container tier and the real btrfs home
//! (issue 15, points 1, 2 and 6): restore brings back files and an installed
//! program exactly, forks diverge independently, a damaged snapshot is
//! refused and changes nothing, a snapshot of a sandbox writing in a loop is
//! consistent, an open stream (a process's output, a streaming exec) goes on
//! across a snapshot, retention deletes the oldest, a home without the btrfs
//! disk refuses clearly.
//!
//! Each test's home gets its own small btrfs image (as in `disk_quota.rs`).
//! Needs root, btrfs-progs, the guests and the engine; a missing one fails
//! these tests, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use airlock::runtime::{DiskOptions, Error, QuotaMode, Runtime, RuntimeOptions, Sandbox};
use common::{Cleanup, bash};

const MIB: u64 = 1024 * 1024;

async fn runtime_with(home: &Path, keep: usize) -> Runtime {
    let mut options = RuntimeOptions::new(home);
    options.isolates.cache_dir = Some(Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-cache"));
    options.disk = DiskOptions { quotas: QuotaMode::Required, image_bytes: Some(1024 * MIB) };
    options.max_snapshots_per_sandbox = keep;
    Runtime::open(options).await.expect("opening the runtime with its btrfs home (root and btrfs-progs)")
}

async fn runtime_in(home: &Path) -> Runtime {
    runtime_with(home, 10).await
}

/// Runs `script` in the sandbox's container and returns its stdout; fails the test if it fails.
async fn sh(sandbox: &Sandbox, script: &str) -> String {
    let ran = sandbox.exec(bash(script)).await.unwrap();
    assert!(ran.outcome.success(), "{script}: {}{}", ran.outcome.stdout_text(), ran.outcome.stderr_text());
    ran.outcome.stdout_text()
}

async fn sh_root(sandbox: &Sandbox, script: &str) -> String {
    let ran = sandbox.exec_as("root", bash(script)).await.unwrap();
    assert!(ran.outcome.success(), "{script}: {}{}", ran.outcome.stdout_text(), ran.outcome.stderr_text());
    ran.outcome.stdout_text()
}

/// A sandbox with a 2 MiB random file in the workspace and a program
/// installed as root in /usr/local/bin; returns both checksums.
async fn prepared(sandbox: &Sandbox) -> String {
    sh(sandbox, "head -c 2097152 /dev/urandom > /workspace/data.bin && mkdir -p /workspace/src && echo one > /workspace/src/a.txt").await;
    sh_root(
        sandbox,
        "printf '#!/bin/sh\\necho hello from the package\\n' > /usr/local/bin/hello && chmod 755 /usr/local/bin/hello",
    )
    .await;
    checksums(sandbox).await
}

async fn checksums(sandbox: &Sandbox) -> String {
    sh(sandbox, "sha256sum /workspace/data.bin /workspace/src/a.txt /usr/local/bin/hello && hello").await
}

fn snapshot_path(home: &Path, id: &str) -> PathBuf {
    home.canonicalize().unwrap().join("sandboxes/.snapshots").join(id)
}

fn set_readonly(path: &Path, readonly: bool) {
    let out = Command::new("btrfs")
        .args(["property", "set", "-ts"])
        .arg(path)
        .args(["ro", if readonly { "true" } else { "false" }])
        .output()
        .expect("running btrfs");
    assert!(out.status.success(), "btrfs property set: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_brings_back_files_and_an_installed_program_exactly() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let sandbox = runtime.sandbox("restored").await.unwrap();
    let _cleanup = Cleanup(vec![sandbox.id().to_string()]);
    let before = prepared(&sandbox).await;
    assert!(before.contains("hello from the package"));

    let snapshot = sandbox.snapshot(Some("before the damage")).await.unwrap();
    assert!(snapshot.layer, "the container's writable layer is in the snapshot");
    assert!(snapshot.bytes >= 2 * MIB, "{snapshot:?}");
    assert_eq!(snapshot.label.as_deref(), Some("before the damage"));

    // Changed, deleted and added after the snapshot, in the workspace and outside it.
    sh(&sandbox, "head -c 1000 /dev/urandom > /workspace/data.bin && rm -r /workspace/src && touch /workspace/new")
        .await;
    sh_root(&sandbox, "rm /usr/local/bin/hello && touch /etc/added-later").await;
    sandbox.write_file("host-written.txt", b"from the host").await.unwrap();
    assert_ne!(sandbox.exec(bash("sha256sum /workspace/data.bin; hello")).await.unwrap().outcome.stdout_text(), before);

    sandbox.restore(&snapshot.id).await.unwrap();
    assert_eq!(checksums(&sandbox).await, before);
    sh(&sandbox, "test ! -e /workspace/new && test ! -e /etc/added-later && test ! -e /workspace/host-written.txt")
        .await;
    // The host's view (the confined file API) is the restored workspace too.
    assert_eq!(sandbox.read_file("src/a.txt").await.unwrap(), b"one\n");
    assert!(sandbox.read_file("host-written.txt").await.is_err());
    // And it keeps working: a write after the restore lands in the restored workspace.
    sandbox.write_file("after.txt", b"after").await.unwrap();
    assert_eq!(sh(&sandbox, "cat /workspace/after.txt").await, "after");

    // A snapshot of another sandbox is not restored here.
    let other = runtime.sandbox("other").await.unwrap();
    let refused = other.restore(&snapshot.id).await.unwrap_err();
    assert!(matches!(refused, Error::Invalid { .. }), "{refused}");
    runtime.destroy("restored").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_of_four_is_ready_and_each_diverges_on_its_own() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let source = runtime.sandbox("source").await.unwrap();
    let mut cleanup = Cleanup(vec![source.id().to_string()]);
    let before = prepared(&source).await;
    let snapshot = source.snapshot(None).await.unwrap();

    let names: Vec<String> = (0..4).map(|i| format!("fork-{i}")).collect();
    let forks = runtime.fork_snapshot(&snapshot.id, &names, None).await.unwrap();
    cleanup.0.extend(forks.iter().map(|f| f.id().to_string()));
    assert_eq!(forks.len(), 4);
    for fork in &forks {
        // Ready: its container runs already.
        assert!(fork.info().container_id.is_some(), "{} has no container after the fork", fork.name());
        assert_eq!(checksums(fork).await, before, "{} differs from its snapshot", fork.name());
        assert_eq!(fork.config(), source.config());
    }
    // A write in one fork shows nowhere else.
    sh(&forks[0], "echo mine > /workspace/src/a.txt && echo x > /workspace/only-here").await;
    sh_root(&forks[0], "rm /usr/local/bin/hello").await;
    for other in forks[1..].iter().chain([&source]) {
        assert_eq!(checksums(other).await, before, "{} saw another fork's write", other.name());
        sh(other, "test ! -e /workspace/only-here").await;
    }
    // The fork names its snapshot as the parent of its own next snapshot.
    let child = forks[1].snapshot(None).await.unwrap();
    assert_eq!(child.parent.as_deref(), Some(snapshot.id.as_str()));
    // Names already taken are refused before anything is made.
    let taken = runtime.fork_snapshot(&snapshot.id, &["fork-0".to_string()], None).await.unwrap_err();
    assert!(matches!(taken, Error::Invalid { .. }), "{taken}");
    for name in &names {
        runtime.destroy(name).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_is_refused_and_the_sandbox_is_left_as_it_was() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let sandbox = runtime.sandbox("damaged").await.unwrap();
    let _cleanup = Cleanup(vec![sandbox.id().to_string()]);
    prepared(&sandbox).await;
    let changed = sandbox.snapshot(Some("a file will change")).await.unwrap();
    let removed = sandbox.snapshot(Some("a file will go")).await.unwrap();
    sh(&sandbox, "echo after > /workspace/src/a.txt").await;
    let now = checksums(&sandbox).await;

    // One byte of a workspace file in the stored snapshot changes.
    let stored = snapshot_path(home.path(), &changed.id).join("sandbox");
    set_readonly(&stored, false);
    std::fs::write(stored.join("workspace/src/a.txt"), b"twp\n").unwrap();
    set_readonly(&stored, true);
    let refused = sandbox.restore(&changed.id).await.unwrap_err();
    match &refused {
        Error::SnapshotDamaged { reason, .. } => assert_eq!(reason, "workspace/src/a.txt was changed"),
        other => panic!("not refused as damaged: {other}"),
    }
    assert!(refused.to_string().contains("damaged"), "{refused}");

    // The installed program disappears from the stored layer.
    let layer = snapshot_path(home.path(), &removed.id).join("layer");
    set_readonly(&layer, false);
    std::fs::remove_file(layer.join("diff/usr/local/bin/hello")).unwrap();
    set_readonly(&layer, true);
    match runtime.fork_snapshot(&removed.id, &["from-damaged".to_string()], None).await.unwrap_err() {
        Error::SnapshotDamaged { reason, .. } => assert_eq!(reason, "layer/usr/local/bin/hello is missing"),
        other => panic!("not refused as damaged: {other}"),
    }
    assert!(runtime.get("from-damaged").unwrap().is_none(), "a refused fork left a sandbox");
    match sandbox.restore(&removed.id).await.unwrap_err() {
        Error::SnapshotDamaged { .. } => {}
        other => panic!("not refused as damaged: {other}"),
    }
    // Nothing changed: same files, same container, still running.
    assert_eq!(checksums(&sandbox).await, now);
    assert_eq!(sh(&sandbox, "cat /workspace/src/a.txt").await, "after\n");
}

/// A process appends 1, 2, 3... to two files, first to `/workspace/first`
/// (the sandbox's subvolume), then to `/var/tmp/second` (the container's
/// layer, another subvolume, snapshotted after the first). With the container
/// frozen for both snapshots, each file's lines are exactly 1..n with no torn
/// line, and `first` is ahead of `second` by at most the one line written
/// between the two appends. Without the freeze the second snapshot, taken
/// later, would be ahead of the first, and a line could be cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_a_sandbox_writing_in_a_loop_is_consistent() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let sandbox = runtime.sandbox("writer").await.unwrap();
    let _cleanup = Cleanup(vec![sandbox.id().to_string()]);
    let writer = "i=0; while true; do i=$((i+1)); echo $i >> /workspace/first; echo $i >> /var/tmp/second; done";
    sandbox.start_process(bash(writer)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for round in 0..3 {
        let snapshot = sandbox.snapshot(None).await.unwrap();
        let dir = snapshot_path(home.path(), &snapshot.id);
        let first = std::fs::read_to_string(dir.join("sandbox/workspace/first")).unwrap();
        let second = std::fs::read_to_string(dir.join("layer/diff/var/tmp/second")).unwrap();
        let lines = |text: &str, what: &str| -> u64 {
            assert!(text.ends_with('\n'), "round {round}: {what} ends in a torn line");
            for (i, line) in text.lines().enumerate() {
                assert_eq!(line, (i + 1).to_string(), "round {round}: line {} of {what}", i + 1);
            }
            text.lines().count() as u64
        };
        let (n, m) = (lines(&first, "first"), lines(&second, "second"));
        assert!(n > 0, "round {round}: the writer had not written");
        assert!(n == m || n == m + 1, "round {round}: first has {n} lines and second {m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The writer is still running after the snapshots.
    let a = sh(&sandbox, "wc -l < /workspace/first").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = sh(&sandbox, "wc -l < /workspace/first").await;
    assert!(b.trim().parse::<u64>().unwrap() > a.trim().parse::<u64>().unwrap(), "the writer stopped");
    sandbox.kill_processes().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_output_stream_goes_on_across_a_snapshot() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let sandbox = runtime.sandbox("streaming").await.unwrap();
    let _cleanup = Cleanup(vec![sandbox.id().to_string()]);
    let id = sandbox.start_process(bash("for i in $(seq 1 30); do echo line $i; sleep 0.05; done")).await.unwrap();
    let mut follower = sandbox.follow_process(&id).await.unwrap();
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        let mut code = None;
        while let Some(event) = follower.next().await {
            match event {
                airlock::container::ProcessEvent::Output(chunk) => out.extend_from_slice(&chunk.bytes),
                airlock::container::ProcessEvent::Exited(exit) => code = exit,
            }
        }
        (String::from_utf8(out).unwrap(), code)
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let snapshot = sandbox.snapshot(None).await.unwrap();
    assert!(snapshot.layer);
    let (out, code) = tokio::time::timeout(Duration::from_secs(20), reader).await.unwrap().unwrap();
    let expected: String = (1..=30).map(|i| format!("line {i}\n")).collect();
    assert_eq!(out, expected);
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_the_oldest_and_delete_removes_a_snapshot() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_with(home.path(), 2).await;
    // Files only: no container is needed for a snapshot of the workspace.
    let sandbox = runtime.sandbox("kept").await.unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        sandbox.write_file("n.txt", format!("{i}").as_bytes()).await.unwrap();
        let snapshot = sandbox.snapshot(Some(&format!("number {i}"))).await.unwrap();
        assert!(!snapshot.layer);
        ids.push(snapshot.id);
    }
    let listed: Vec<String> = sandbox.snapshots().unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(listed, vec![ids[2].clone(), ids[1].clone()], "newest first, the oldest deleted");
    assert!(!snapshot_path(home.path(), &ids[0]).exists(), "the oldest snapshot's files stay");
    assert!(matches!(runtime.snapshot_info(&ids[0]), Err(Error::NoSuchSnapshot(_))));

    // Restore without a container: the workspace comes back.
    sandbox.restore(&ids[1]).await.unwrap();
    assert_eq!(sandbox.read_file("n.txt").await.unwrap(), b"1");
    assert_eq!(runtime.snapshot_info(&ids[2]).unwrap().parent.as_deref(), Some(ids[1].as_str()));

    runtime.delete_snapshot(&ids[1]).await.unwrap();
    assert!(!snapshot_path(home.path(), &ids[1]).exists());
    assert_eq!(runtime.snapshots(Some("kept")).unwrap().len(), 1);
    assert!(matches!(runtime.delete_snapshot("snap-../../etc").await, Err(Error::NoSuchSnapshot(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_btrfs_disk_a_snapshot_is_refused_clearly_and_leaves_nothing() {
    let home = tempfile::tempdir().unwrap();
    let mut options = RuntimeOptions::new(home.path());
    options.isolates.cache_dir = Some(Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-cache"));
    options.disk = DiskOptions { quotas: QuotaMode::Off, image_bytes: None };
    let runtime = Runtime::open(options).await.unwrap();
    let sandbox = runtime.sandbox("plain").await.unwrap();
    sandbox.write_file("a.txt", b"a").await.unwrap();
    let refused = sandbox.snapshot(None).await.unwrap_err();
    assert!(matches!(refused, Error::SnapshotsUnavailable(_)), "{refused}");
    assert!(refused.to_string().contains("btrfs disk"), "{refused}");
    assert!(sandbox.snapshots().unwrap().is_empty());
    assert!(!home.path().join("sandboxes/.snapshots").exists());
    assert_eq!(sandbox.read_file("a.txt").await.unwrap(), b"a");
}

/// An `exec` whose output streams to its caller as it runs (what the HTTP
/// API's event stream carries) goes on across a snapshot: every line arrives,
/// in order, some of them after the snapshot, and the command exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_exec_goes_on_across_a_snapshot() {
    use std::sync::{Arc, Mutex};
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let sandbox = runtime.sandbox("exec-stream").await.unwrap();
    let _cleanup = Cleanup(vec![sandbox.id().to_string()]);
    sh(&sandbox, "true").await;
    let received: Arc<Mutex<Vec<u8>>> = Arc::default();
    let sink = received.clone();
    let request = bash("for i in $(seq 1 40); do echo line $i; sleep 0.05; done").output(Arc::new(
        move |chunk: airlock::OutputChunk| sink.lock().unwrap().extend_from_slice(&chunk.bytes),
    ));
    let running = {
        let sandbox = sandbox.clone();
        tokio::spawn(async move { sandbox.exec(request).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = received.lock().unwrap().len();
    assert!(before > 0, "nothing streamed before the snapshot");
    let snapshot = sandbox.snapshot(None).await.unwrap();
    assert!(snapshot.layer);
    let ran = tokio::time::timeout(Duration::from_secs(30), running).await.unwrap().unwrap().unwrap();
    assert_eq!(ran.outcome.exit_code(), Some(0), "{}", ran.outcome.stderr_text());
    let expected: String = (1..=40).map(|i| format!("line {i}\n")).collect();
    let streamed = String::from_utf8(received.lock().unwrap().clone()).unwrap();
    assert_eq!(streamed, expected);
    assert!(streamed.len() > before, "nothing streamed after the snapshot");
}

/// Hostile or careless input is refused before anything is made or read:
/// names that are no names, a name twice, too many forks, no name, an id
/// that would name a path, a label past its limit or with control characters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_fork_and_snapshot_input_is_refused_before_anything_is_made() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let sandbox = runtime.sandbox("hostile").await.unwrap();
    sandbox.write_file("a.txt", b"a").await.unwrap();
    let snapshot = sandbox.snapshot(None).await.unwrap();
    let many: Vec<String> = (0..=airlock::runtime::MAX_FORKS).map(|i| format!("many-{i}")).collect();
    let cases: Vec<Vec<String>> = vec![
        vec!["../escape".into()],
        vec!["a/b".into()],
        vec!["twice".into(), "twice".into()],
        vec!["hostile".into()],
        Vec::new(),
        many,
    ];
    for names in cases {
        let refused = runtime.fork_snapshot(&snapshot.id, &names, None).await.unwrap_err();
        assert!(matches!(refused, Error::Invalid { .. } | Error::InvalidName(_)), "{names:?}: {refused}");
    }
    for id in ["../../etc", "snap-", &format!("{}/..", snapshot.id), &snapshot.id.to_uppercase()] {
        let refused = runtime.fork_snapshot(id, &["from-bad-id".to_string()], None).await.unwrap_err();
        assert!(matches!(refused, Error::NoSuchSnapshot(_)), "{id}: {refused}");
        assert!(matches!(sandbox.restore(id).await.unwrap_err(), Error::NoSuchSnapshot(_)), "{id}");
    }
    for label in ["x".repeat(airlock::runtime::MAX_SNAPSHOT_LABEL_BYTES + 1), "a\nb".to_string(), "\u{1b}[2J".to_string()] {
        assert!(matches!(sandbox.snapshot(Some(&label)).await.unwrap_err(), Error::Invalid { .. }), "{label:?}");
    }
    let names: Vec<String> = runtime.list().unwrap().into_iter().map(|info| info.name.to_string()).collect();
    assert_eq!(names, vec!["hostile".to_string()], "a refused fork left a sandbox");
    assert_eq!(sandbox.snapshots().unwrap().len(), 1, "a refused snapshot was recorded");
}

/// A snapshot that prunes (retention 1) and a restore of the same sandbox,
/// at once, again and again: both finish (the restore may find its snapshot
/// pruned: then it is no such snapshot, never a damaged one), nothing hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pruning_snapshot_and_a_restore_at_once_never_deadlock() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_with(home.path(), 1).await;
    let sandbox = runtime.sandbox("racing").await.unwrap();
    sandbox.write_file("n.txt", b"0").await.unwrap();
    let mut latest = sandbox.snapshot(None).await.unwrap().id;
    for round in 1..=8 {
        sandbox.write_file("n.txt", format!("{round}").as_bytes()).await.unwrap();
        let (taken, restored) = tokio::time::timeout(
            Duration::from_secs(30),
            futures_util::future::join(sandbox.snapshot(None), sandbox.restore(&latest)),
        )
        .await
        .unwrap_or_else(|_| panic!("round {round}: a snapshot and a restore at once hung"));
        match restored {
            Ok(()) | Err(Error::NoSuchSnapshot(_)) => {}
            Err(other) => panic!("round {round}: {other}"),
        }
        latest = taken.unwrap().id;
        assert_eq!(sandbox.snapshots().unwrap().len(), 1, "round {round}: retention kept more");
    }
}
