//! The host boundary, attacked as the code in a sandbox would: the workspace
//! belongs to that code, and every host-side operation on it goes through the
//! confined layer. Against the real container tier and the real isolates.
//!
//! Needs the guests built and the engine set up (`scripts/test.sh` does both);
//! a missing engine fails these tests, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use airlock::runtime::{Error, SandboxEvent};
use airlock::{ExecRequest, Language, TierKind};
use common::{Cleanup, bash, runtime_in};

/// Every entry under `dir` with its owner, mode and contents: what a host
/// directory looked like, to show that nothing in it changed.
fn snapshot(dir: &Path) -> Vec<(PathBuf, u32, u32, Option<Vec<u8>>)> {
    let mut entries = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let contents = meta.is_file().then(|| std::fs::read(&path).unwrap());
        if meta.is_dir() {
            pending.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
        entries.push((path, meta.uid(), meta.mode(), contents));
    }
    entries.sort();
    entries
}

/// A program for the container: exchanges the directory `d` with the link
/// `swap` (which points at a host directory) with renameat2(RENAME_EXCHANGE),
/// as fast as it can, until `stop` appears.
const SWAPPER: &str = r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
SYS_renameat2, AT_FDCWD, RENAME_EXCHANGE = 316, -100, 2
os.chdir('/workspace')
swaps = 0
while not os.path.exists('stop'):
    if libc.syscall(SYS_renameat2, AT_FDCWD, b'd', AT_FDCWD, b'swap', RENAME_EXCHANGE) == 0:
        swaps += 1
open('swaps', 'w').write(str(swaps))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_swapped_for_a_host_link_in_a_loop_never_leads_the_host_out() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let sandbox = runtime.sandbox("swapper").await.unwrap();
    let _cleanup = Cleanup(vec![sandbox.id().to_string()]);

    // The host directory the attacker aims at: a secret, a file to destroy, and
    // something that is not a guest where the workspace has one.
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("secret"), b"host secret").unwrap();
    std::fs::write(host.path().join("victim"), b"keep me").unwrap();
    std::fs::write(host.path().join("tool.wasm"), b"not a guest: the host never loads this").unwrap();
    std::fs::create_dir(host.path().join("sub")).unwrap();
    let before = snapshot(host.path());

    sandbox.write_file("d/secret", b"workspace secret").await.unwrap();
    sandbox.write_file("d/tool.wasm", &std::fs::read(common::guest("hello.wasm")).unwrap()).await.unwrap();
    let link = format!("ln -s {} /workspace/swap", host.path().display());
    assert!(sandbox.exec(bash(&link)).await.unwrap().outcome.success());
    sandbox.write_file("swapper.py", SWAPPER.as_bytes()).await.unwrap();
    let swapper = sandbox.start_process(ExecRequest::new("python3").args(["/workspace/swapper.py"])).await.unwrap();

    let (mut reads, mut guests) = (0, 0);
    let started = Instant::now();
    for round in 0..2000 {
        let _ = sandbox.write_file("d/x", b"from the host").await;
        match sandbox.read_file("d/secret").await {
            Ok(bytes) => {
                assert_eq!(bytes, b"workspace secret", "round {round}: a host file came back");
                reads += 1;
            }
            Err(Error::Path { .. } | Error::Fs(_)) => {}
            Err(other) => panic!("round {round}: {other}"),
        }
        let _ = sandbox.list_files("d").await;
        let _ = sandbox.stat_file("d/x").await;
        let _ = sandbox.mkdir("d/m/n").await;
        let _ = sandbox.rename_file("d/x", "d/y").await;
        let _ = sandbox.remove_file("d/y").await;
        let _ = sandbox.remove_file("d/m").await;
        let _ = sandbox.remove_file("d/victim").await;
        let _ = sandbox.write_file("d/victim", b"workspace").await;
        let _ = sandbox.remove_file("d/sub").await;
        if round % 20 == 0 {
            // Guest loading through the swapped path: hello, or a refusal.
            match sandbox.exec(ExecRequest::new("d/tool.wasm")).await {
                Ok(run) => {
                    assert_eq!(run.placement.tier, TierKind::Isolate);
                    assert!(run.outcome.stdout_text().contains("hello"), "{}", run.outcome.stdout_text());
                    guests += 1;
                }
                Err(Error::Path { .. } | Error::Fs(_)) => {}
                Err(other) => panic!("round {round}: loading the guest: {other}"),
            }
        }
        if round % 100 == 0 {
            // An isolate writes, so the next container command hands the
            // workspace over (the fd walk) while the swap goes on.
            let wrote = sandbox.code(Language::Python, "open('/workspace/iso.txt', 'w').write('i')").await.unwrap();
            assert!(wrote.outcome.is_ok(), "{:?}", wrote.outcome.result);
            assert!(sandbox.exec(bash("true")).await.unwrap().outcome.success());
        }
    }
    sandbox.write_file("stop", b"").await.unwrap();
    assert_eq!(sandbox.wait_process(&swapper).await.unwrap(), Some(0));
    let swaps: u64 = String::from_utf8(sandbox.read_file("swaps").await.unwrap()).unwrap().parse().unwrap();
    assert!(swaps > 1000, "the swap loop ran: {swaps} swaps");
    assert!(reads > 0 && guests > 0, "some operations landed in the directory: {reads} reads, {guests} guests");
    assert_eq!(snapshot(host.path()), before, "nothing outside was written, read into, chowned or removed");
    eprintln!("{swaps} swaps in {:?}; {reads} reads and {guests} guest runs went through", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifos_sockets_and_devices_are_refused_at_once() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let sandbox = runtime.sandbox("special").await.unwrap();
    let _cleanup = Cleanup(vec![sandbox.id().to_string()]);

    // The FIFO and the socket from inside the container; the device node by
    // the host (the container has no CAP_MKNOD), as the file a hostile image could carry.
    let made = sandbox
        .exec(bash(
            "mkfifo fifo fifo.wasm && python3 -c \"import socket; socket.socket(socket.AF_UNIX).bind('socket')\"",
        ))
        .await
        .unwrap();
    assert!(made.outcome.success(), "{}", made.outcome.stderr_text());
    let device = sandbox.workspace().host_path().join("device");
    let status = Command::new("mknod").arg(&device).args(["c", "1", "3"]).status().unwrap();
    assert!(status.success(), "mknod");

    for name in ["fifo", "socket", "device"] {
        let started = Instant::now();
        let read = sandbox.read_file(name).await.unwrap_err();
        assert!(read.to_string().contains("only regular files"), "{name}: {read}");
        assert!(sandbox.open_file(name).await.is_err(), "{name}");
        let write = sandbox.write_file(name, b"x").await.unwrap_err();
        assert!(write.to_string().contains("only regular files"), "{name}: {write}");
        let mut source: &[u8] = b"streamed";
        assert!(sandbox.write_file_from(name, &mut source).await.is_err(), "{name}");
        assert!(sandbox.mkdir(&format!("{name}/sub")).await.is_err(), "{name}");
        let stat = sandbox.stat_file(name).await.unwrap();
        assert_ne!(stat.kind, airlock::runtime::FileKind::File, "{name}");
        assert!(started.elapsed() < Duration::from_secs(1), "{name} took {:?}", started.elapsed());
    }
    let started = Instant::now();
    let guest = sandbox.exec(ExecRequest::new("fifo.wasm")).await.unwrap_err();
    assert!(guest.to_string().contains("only regular files"), "{guest}");
    assert!(started.elapsed() < Duration::from_secs(1));
    // The names themselves can be listed, moved and removed.
    assert_eq!(sandbox.list_files("").await.unwrap().len(), 4);
    sandbox.rename_file("fifo", "fifo2").await.unwrap();
    for name in ["fifo2", "fifo.wasm", "socket", "device"] {
        sandbox.remove_file(name).await.unwrap();
    }
    assert!(sandbox.list_files("").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolates_relative_link_leading_out_is_never_followed() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let sandbox = runtime.sandbox("linker").await.unwrap();
    let _cleanup = Cleanup(vec![sandbox.id().to_string()]);
    let mut events = sandbox.watch().unwrap();

    let made = sandbox.code(Language::Python, "import os\nos.symlink('../../..', '/workspace/up')").await.unwrap();
    assert!(made.outcome.is_ok(), "the isolate made its link: {:?}", made.outcome.result);
    assert_eq!(made.placement.tier, TierKind::Isolate);
    // WASI refuses absolute link targets to isolates; the container makes one.
    assert!(sandbox.exec(bash("ln -s / /workspace/slash")).await.unwrap().outcome.success());
    let workspace = sandbox.workspace().host_path().to_path_buf();
    let target = workspace.join("up").canonicalize().unwrap();
    assert!(!target.starts_with(&workspace), "the link leads out, to {}", target.display());

    // Every API refuses to go through it.
    let marker = format!("marker-{}", sandbox.id());
    std::fs::write(target.join(&marker), b"host").unwrap();
    let _remove_marker = RemoveOnDrop(target.join(&marker));
    for link in ["up", "slash"] {
        let inside = format!("{link}/{marker}");
        assert!(matches!(sandbox.read_file(&inside).await, Err(Error::Path { .. })), "{inside}");
        assert!(matches!(sandbox.list_files(link).await, Err(Error::Path { .. })), "{link}");
        assert!(matches!(sandbox.write_file(&format!("{link}/new"), b"x").await, Err(Error::Path { .. })));
        assert!(matches!(sandbox.mkdir(&format!("{link}/dir")).await, Err(Error::Path { .. })));
        assert!(matches!(sandbox.stat_file(&inside).await, Err(Error::Path { .. })));
        assert!(matches!(sandbox.rename_file(&inside, "stolen").await, Err(Error::Path { .. })));
        assert!(matches!(sandbox.remove_file(&inside).await, Err(Error::Path { .. })));
        assert!(matches!(sandbox.exec(ExecRequest::new(format!("{link}/x.wasm"))).await, Err(Error::Path { .. })));
    }
    assert!(target.join(&marker).exists() && !target.join("new").exists() && !target.join("stolen").exists());

    // The watcher does not follow it: a change out there is never reported,
    // while one in the workspace is.
    std::fs::write(target.join(&marker), b"changed on the host").unwrap();
    sandbox.write_file("inside.txt", b"in").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    loop {
        let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.next()).await else {
            panic!("no event for inside.txt; saw {seen:?}")
        };
        if let SandboxEvent::File { path, .. } = &event {
            assert!(
                !path.starts_with("up/") && !path.starts_with("slash/") && !path.contains(&marker),
                "followed the link: {event:?}"
            );
            if path == "inside.txt" {
                break;
            }
        }
        seen.push(event);
    }
    // Removing the link removes the link only.
    sandbox.remove_file("up").await.unwrap();
    sandbox.remove_file("slash").await.unwrap();
    assert!(target.join(&marker).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_covers_a_bounded_number_of_directories() {
    use airlock::runtime::MAX_WATCHED_DIRECTORIES;

    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let sandbox = runtime.sandbox("many-dirs").await.unwrap();
    let _cleanup = Cleanup(vec![sandbox.id().to_string()]);
    let dirs = MAX_WATCHED_DIRECTORIES + 100;
    let made = sandbox.exec(bash(&format!("mkdir -p many && cd many && seq 1 {dirs} | xargs mkdir"))).await.unwrap();
    assert!(made.outcome.success(), "{}", made.outcome.stderr_text());
    let mut events = sandbox.watch().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(SandboxEvent::WatchLimitReached { limit })) => {
                assert_eq!(limit, MAX_WATCHED_DIRECTORIES);
                break;
            }
            Ok(Some(_)) => {}
            other => panic!("the watch limit was not reported: {other:?}"),
        }
    }
    // Changes in watched directories still arrive.
    sandbox.write_file("after.txt", b"x").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(SandboxEvent::File { path, .. })) if path == "after.txt" => break,
            Ok(Some(_)) => {}
            other => panic!("no event after the limit: {other:?}"),
        }
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
