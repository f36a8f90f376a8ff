//! `airlock snapshot` as a user meets it (issue 15, point 6): the real
//! binary on a real home (btrfs image, Docker), in process and through
//! `airlock serve` (the CLI then speaks to the server over the home's
//! socket). Take, list, inspect, restore (files and a file outside the
//! workspace come back), fork (each fork has them and is its own), delete;
//! and the errors: an unknown or malformed id, a sandbox that is gone, a
//! damaged snapshot (one line naming the changed file, nothing changed).
//!
//! Needs root, btrfs-progs, the guests and the engine, and fails loudly without them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::Cleanup;
use serde_json::Value;

fn airlock_command(home: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_airlock"));
    command
        .args(args)
        .env("AIRLOCK_HOME", home)
        .env("AIRLOCK_INTERPRETERS", concat!(env!("CARGO_MANIFEST_DIR"), "/guests/out"))
        .stdin(Stdio::null());
    command
}

fn airlock(home: &Path, args: &[&str]) -> Output {
    airlock_command(home, args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn succeeded(home: &Path, args: &[&str]) -> String {
    let output = airlock(home, args);
    assert!(output.status.success(), "airlock {args:?}: {}\n{}", text(&output.stdout), text(&output.stderr));
    text(&output.stdout)
}

/// The command failed with exit status 2 and one `airlock: error:` line holding `expected`.
fn refused(home: &Path, args: &[&str], expected: &str) -> String {
    let output = airlock(home, args);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "airlock {args:?}: {}\n{stderr}", text(&output.stdout));
    let errors: Vec<&str> = stderr.lines().filter(|line| line.starts_with("airlock: error:")).collect();
    assert_eq!(errors.len(), 1, "airlock {args:?}: {stderr}");
    assert!(errors[0].contains(expected), "airlock {args:?}: {expected:?} not in {stderr}");
    stderr
}

fn sh(home: &Path, sandbox: &str, script: &str) -> String {
    succeeded(home, &["exec", sandbox, "--", "bash", "-c", script])
}

/// A fresh home under the target directory (a temporary directory's
/// filesystem may not allow the loop mount of the home's disk image).
fn fresh_home(what: &str) -> tempfile::TempDir {
    let parent = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-snapshots");
    std::fs::create_dir_all(&parent).unwrap();
    tempfile::Builder::new().prefix(&format!("{what}-")).tempdir_in(&parent).unwrap()
}

/// The sandbox's id, for the test's container cleanup.
fn sandbox_id(home: &Path, name: &str) -> String {
    let listed = succeeded(home, &["sandbox", "list"]);
    listed
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next() == Some(name)).then(|| fields.next().unwrap().to_string())
        })
        .unwrap_or_else(|| panic!("{name} not listed: {listed}"))
}

/// `airlock serve` on a home; stopped when dropped.
struct Served {
    child: Child,
    _home: tempfile::TempDir,
    home: PathBuf,
}

impl Served {
    fn start() -> Self {
        let dir = fresh_home("served");
        let home = dir.path().to_path_buf();
        let mut child = airlock_command(&home, &["serve", "--listen", "127.0.0.1:0", "--home"])
            .arg(&home)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.contains("http://127.0.0.1:"), "{line}");
        Self { child, _home: dir, home }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

/// The whole round, the same through either way in: returns the snapshot's id.
fn take_list_inspect_restore_fork(home: &Path, name: &str, cleanup: &mut Cleanup) -> String {
    succeeded(home, &["sandbox", "create", name, "--tier", "container"]);
    cleanup.0.push(sandbox_id(home, name));
    sh(home, name, "mkdir -p /workspace/src && echo one > /workspace/src/a.txt && echo outside > /var/tmp/installed");
    let before = sh(home, name, "sha256sum /workspace/src/a.txt /var/tmp/installed");

    let id = succeeded(home, &["snapshot", "create", name, "--label", "first one"]).trim().to_string();
    assert!(id.starts_with("snap-") && id.len() == 37, "{id:?}");

    let table = succeeded(home, &["snapshot", "ls"]);
    let row = table.lines().find(|line| line.starts_with(&id)).unwrap_or_else(|| panic!("{id} not in {table}"));
    assert!(row.contains(name) && row.ends_with("first one") && row.contains(" yes "), "{row}");
    let listed: Value = serde_json::from_str(&succeeded(home, &["snapshot", "ls", name, "--json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["id"], id.as_str());
    let inspected: Value = serde_json::from_str(&succeeded(home, &["snapshot", "inspect", &id])).unwrap();
    assert_eq!(inspected["sandbox_name"], name);
    assert_eq!(inspected["label"], "first one");
    assert_eq!(inspected["layer"], true);
    assert!(inspected["files"].as_u64().unwrap() >= 3, "{inspected}");
    assert_eq!(inspected["manifest_sha256"].as_str().unwrap().len(), 64);

    // Changed inside and outside the workspace, then restored.
    sh(home, name, "echo two > /workspace/src/a.txt && rm /var/tmp/installed && touch /workspace/later");
    let output = airlock(home, &["snapshot", "restore", &id]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains(&format!("sandbox {name} restored from {id}")), "{}", text(&output.stderr));
    assert_eq!(sh(home, name, "sha256sum /workspace/src/a.txt /var/tmp/installed"), before);
    sh(home, name, "test ! -e /workspace/later");

    // Two forks: each has the snapshot's files, and each is its own.
    let (a, b) = (format!("{name}-fork-a"), format!("{name}-fork-b"));
    let printed = succeeded(home, &["snapshot", "fork", &id, &a, &b]);
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 2, "{printed}");
    for (line, fork) in lines.iter().zip([&a, &b]) {
        let (printed_name, fork_id) = line.split_once(' ').unwrap();
        assert_eq!(printed_name, fork.as_str());
        cleanup.0.push(fork_id.to_string());
    }
    sh(home, &a, "echo mine > /workspace/src/a.txt");
    assert_eq!(sh(home, &b, "sha256sum /workspace/src/a.txt /var/tmp/installed"), before);
    assert_eq!(sh(home, name, "cat /workspace/src/a.txt"), "one\n");
    assert_eq!(sh(home, &a, "cat /workspace/src/a.txt"), "mine\n");
    // A name taken is refused, and nothing is made.
    refused(home, &["snapshot", "fork", &id, &a], &format!("a sandbox named {a} exists"));
    id
}

fn errors_are_one_clear_line(home: &Path, name: &str) {
    refused(home, &["snapshot", "inspect", "snap-00000000000000000000000000000000"], "no snapshot snap-0000");
    refused(home, &["snapshot", "restore", "snap-00000000000000000000000000000000"], "no snapshot");
    refused(home, &["snapshot", "rm", "../../etc"], "no snapshot");
    refused(home, &["snapshot", "fork", "not-an-id", "x"], "no snapshot");
    refused(home, &["snapshot", "create", "no-such-sandbox"], "no-such-sandbox");
    refused(home, &["snapshot", "create", name, "--label", "a\nb"], "label");
    let help = airlock(home, &["snapshot", "fork", "snap-00000000000000000000000000000000"]);
    assert_eq!(help.status.code(), Some(2), "fork without a new name: {}", text(&help.stderr));
}

fn delete(home: &Path, id: &str, name: &str) {
    succeeded(home, &["snapshot", "rm", id]);
    assert!(!succeeded(home, &["snapshot", "ls"]).contains(id));
    refused(home, &["snapshot", "inspect", id], "no snapshot");
    refused(home, &["snapshot", "rm", id], "no snapshot");
    for sandbox in [name.to_string(), format!("{name}-fork-a"), format!("{name}-fork-b")] {
        succeeded(home, &["sandbox", "rm", &sandbox]);
    }
}

#[test]
fn snapshots_in_process() {
    let home = fresh_home("local");
    let mut cleanup = Cleanup(Vec::new());
    let id = take_list_inspect_restore_fork(home.path(), "cli-snap", &mut cleanup);
    errors_are_one_clear_line(home.path(), "cli-snap");
    // A snapshot whose sandbox is gone is forked, not restored.
    succeeded(home.path(), &["sandbox", "rm", "cli-snap-fork-b"]);
    let other = succeeded(home.path(), &["snapshot", "create", "cli-snap-fork-a"]).trim().to_string();
    succeeded(home.path(), &["sandbox", "rm", "cli-snap-fork-a"]);
    refused(home.path(), &["snapshot", "restore", &other], "fork the snapshot instead");
    succeeded(home.path(), &["snapshot", "rm", &other]);
    succeeded(home.path(), &["snapshot", "rm", &id]);
    succeeded(home.path(), &["sandbox", "rm", "cli-snap"]);
}

fn set_readonly(path: &Path, readonly: bool) {
    let out = Command::new("btrfs")
        .args(["property", "set", "-ts"])
        .arg(path)
        .args(["ro", if readonly { "true" } else { "false" }])
        .output()
        .expect("running btrfs");
    assert!(out.status.success(), "btrfs property set: {}", text(&out.stderr));
}

#[test]
fn snapshots_through_the_server_and_a_damaged_one_is_refused() {
    let served = Served::start();
    let home = served.home.as_path();
    let mut cleanup = Cleanup(Vec::new());
    let id = take_list_inspect_restore_fork(home, "srv-snap", &mut cleanup);
    errors_are_one_clear_line(home, "srv-snap");

    // The server keeps the home's disk mounted: one byte of the stored
    // snapshot changes, and both restore and fork refuse it.
    sh(home, "srv-snap", "echo after > /workspace/src/a.txt");
    let stored = home.canonicalize().unwrap().join("sandboxes/.snapshots").join(&id).join("sandbox");
    set_readonly(&stored, false);
    std::fs::write(stored.join("workspace/src/a.txt"), b"onf\n").unwrap();
    set_readonly(&stored, true);
    let stderr = refused(home, &["snapshot", "restore", &id], "damaged");
    assert!(stderr.contains("workspace/src/a.txt was changed"), "{stderr}");
    refused(home, &["snapshot", "fork", &id, "from-damaged"], "workspace/src/a.txt was changed");
    assert!(!succeeded(home, &["sandbox", "list"]).contains("from-damaged"));
    assert_eq!(sh(home, "srv-snap", "cat /workspace/src/a.txt"), "after\n", "a refused restore changed the sandbox");
    delete(home, &id, "srv-snap");
}
