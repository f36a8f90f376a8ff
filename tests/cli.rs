//! `airlock run` as a user meets it: output, exit status, limits, and errors
//! as one clear line on stderr.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Fixture, guest};

/// The `airlock` binary with its state kept under the test target directory.
fn airlock_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_airlock"));
    command
        .args(args)
        .env("AIRLOCK_HOME", concat!(env!("CARGO_TARGET_TMPDIR"), "/cli-home"))
        .env("AIRLOCK_INTERPRETERS", concat!(env!("CARGO_MANIFEST_DIR"), "/guests/out"));
    command
}

fn airlock(args: &[&str]) -> Output {
    airlock_command(args).stdin(Stdio::null()).output().unwrap()
}

/// Starts `airlock` with stdin, stdout and stderr piped.
fn spawn_with_input(args: &[&str]) -> std::process::Child {
    airlock_command(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

fn airlock_with_input(args: &[&str], input: &str) -> Output {
    let mut child = spawn_with_input(args);
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An error is exactly one line, says what is wrong, and is no panic or backtrace.
fn assert_one_line_error(output: &Output, expected: &str) {
    let stderr = text(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("airlock: error: "), "{stderr}");
    assert!(stderr.contains(expected), "expected {expected:?} in {stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
}

#[test]
fn runs_a_guest_and_exits_with_its_status() {
    let fixture = Fixture::new();
    let ws = fixture.workspace.host_path().to_str().unwrap().to_string();
    let hello = guest("hello.wasm");
    let output = airlock(&["run", hello.to_str().unwrap(), "--workspace", &ws, "-e", "GREETING=yo", "--", "a", "b"]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(text(&output.stdout), "hello, a b\ngreeting: yo\n");
    assert_eq!(text(&output.stderr), "hello on stderr\n");

    let p1 = guest("hello-p1.wasm");
    let output = airlock(&["run", p1.to_str().unwrap(), "-e", "EXIT_CODE=9"]);
    assert_eq!(output.status.code(), Some(9));
}

#[test]
fn the_workspace_flag_shares_a_directory_with_the_guest() {
    let fixture = Fixture::new();
    let ws = fixture.workspace.host_path().to_str().unwrap().to_string();
    let io = guest("workspace-io.wasm");
    let output = airlock(&["run", io.to_str().unwrap(), "--workspace", &ws, "--", "write", "out.txt", "from the cli"]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(std::fs::read_to_string(fixture.path("out.txt")).unwrap(), "from the cli");
}

#[test]
fn limits_end_the_run_with_one_line_naming_the_limit() {
    let spin = guest("spin.wasm");
    let output = airlock(&["run", spin.to_str().unwrap(), "--timeout", "300ms"]);
    assert_eq!(output.status.code(), Some(124));
    assert_one_line_error(&output, "wall-clock deadline of 300ms exceeded");

    let bomb = guest("memory-bomb.wasm");
    let output = airlock(&["run", bomb.to_str().unwrap(), "--memory", "16MiB"]);
    assert_eq!(output.status.code(), Some(125));
    let stderr = text(&output.stderr);
    assert!(stderr.ends_with("airlock: error: memory limit of 16 MiB exceeded\n"), "{stderr}");

    let flood = guest("output-flood.wasm");
    let output = airlock(&["run", flood.to_str().unwrap(), "--output-limit", "2KiB"]);
    assert_eq!(output.status.code(), Some(125));
    assert_eq!(output.stdout.len(), 2048);
    assert_one_line_error(&output, "output limit of 2 KiB exceeded");
}

#[test]
fn a_guest_blocked_reading_stdin_stops_at_the_deadline() {
    let blocker = guest("blocker.wasm");
    let started = Instant::now();
    let mut child = spawn_with_input(&["run", blocker.to_str().unwrap(), "--timeout", "1s", "--", "stdin"]);
    // Hold stdin open and silent: the guest waits in a host read.
    let stdin = child.stdin.take().unwrap();
    let output = child.wait_with_output().unwrap();
    let elapsed = started.elapsed();
    drop(stdin);
    assert_eq!(output.status.code(), Some(124), "{output:?}");
    assert_one_line_error(&output, "wall-clock deadline of 1s exceeded");
    // Twice the deadline, plus process start-up and a cold guest compile.
    assert!(elapsed < Duration::from_secs(2) + Duration::from_secs(3), "{elapsed:?}");
}

#[test]
fn stdin_reaches_the_guest() {
    let hello = guest("hello.wasm");
    let output = airlock_with_input(&["run", hello.to_str().unwrap(), "--", "--stdin"], "typed in");
    assert!(text(&output.stdout).contains("stdin: typed in\n"), "{output:?}");
}

#[test]
fn bad_input_is_one_clear_line() {
    let hello = guest("hello.wasm");
    let hello = hello.to_str().unwrap();
    let cases: [(&[&str], &str); 8] = [
        (&["run", "/no/such/file.wasm"], "/no/such/file.wasm"),
        (&["run", hello, "--memory", "lots"], "\"lots\" is not a size"),
        (&["run", hello, "--memory", "64GiB"], "memory limit may be at most 4 GiB"),
        (&["run", hello, "--timeout", "10"], "\"10\" is not a duration"),
        (&["run", hello, "--workspace", "/no/such/dir"], "workspace /no/such/dir"),
        (&["run", hello, "--env", "NOEQUALS"], "not KEY=VALUE"),
        (&["run"], "nothing to run"),
        (&["frobnicate"], "unrecognized subcommand"),
    ];
    for (args, expected) in cases {
        let output = airlock(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {output:?}");
        assert_one_line_error(&output, expected);
    }
}

#[test]
fn help_lists_the_run_options() {
    let output = airlock(&["run", "--help"]);
    assert!(output.status.success());
    let help = text(&output.stdout);
    for flag in ["--workspace", "--timeout", "--memory", "--output-limit", "--env"] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}

#[test]
fn runs_python_and_javascript_one_shot() {
    guest("python.wasm");
    guest("js.wasm");
    let output = airlock(&["run", "--lang", "python", "-c", "print(1+1)"]);
    assert_eq!((output.status.code(), text(&output.stdout)), (Some(0), "2\n".to_string()), "{output:?}");
    let output = airlock(&["run", "--lang", "js", "-c", "console.log(1+1)"]);
    assert_eq!((output.status.code(), text(&output.stdout)), (Some(0), "2\n".to_string()), "{output:?}");

    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), "import math\nprint(math.factorial(5))\n").unwrap();
    let output = airlock(&["run", "--lang", "python", script.path().to_str().unwrap()]);
    assert_eq!(text(&output.stdout), "120\n", "{output:?}");
    let output = airlock(&["run", "--lang", "python", "--file", script.path().to_str().unwrap()]);
    assert_eq!(text(&output.stdout), "120\n", "{output:?}");

    let output = airlock(&["run", "--lang", "python", "-c", "1/0"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("ZeroDivisionError: division by zero"), "{output:?}");

    let output = airlock(&["run", "--lang", "python", "-c", "import subprocess; subprocess.run(['ls'])"]);
    assert_eq!(output.status.code(), Some(3));
    assert_one_line_error(&output, "needs a container (subprocess)");

    let output = airlock(&["run", "--lang", "js", "-c", "while (true) {}", "--timeout", "500ms"]);
    assert_eq!(output.status.code(), Some(124));
    assert_one_line_error(&output, "wall-clock deadline of 500ms exceeded");

    let output = airlock(&["run", "--lang", "ruby", "-c", "1"]);
    assert_eq!(output.status.code(), Some(2));
    assert_one_line_error(&output, "unknown language \"ruby\"");
}

#[test]
fn the_repl_keeps_one_context() {
    guest("python.wasm");
    guest("js.wasm");
    let output = airlock_with_input(&["repl", "--lang", "python"], "x = 6\ndef times(a):\n    return a * x\n\ntimes(7)\nprint('done')\n");
    assert_eq!(text(&output.stdout), "42\ndone\n", "{output:?}");
    let output = airlock_with_input(&["repl", "--lang", "js"], "let items = [1, 2]\nitems.push(3)\nitems.map(i => i * 2)\n");
    assert_eq!(text(&output.stdout), "3\n[2,4,6]\n", "{output:?}");
}

/// `airlock files put` and `get` stream: a file larger than the whole-file
/// limit goes up from stdin and comes back byte for byte, and a FIFO in the
/// workspace (made by the container) is refused at once with one line, not a hang.
#[test]
fn files_stream_through_the_cli_and_a_fifo_is_refused_at_once() {
    let home = tempfile::tempdir().unwrap();
    let home_arg = home.path().to_str().unwrap();
    let created = airlock(&["sandbox", "create", "--home", home_arg, "streamed"]);
    assert!(created.status.success(), "{}", text(&created.stderr));
    // 80 MiB: over the 64 MiB limit of a whole-file write.
    let size = 80 * 1024 * 1024;
    let data: Vec<u8> = (0..size).map(|i: usize| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut put = spawn_with_input(&["files", "--home", home_arg, "streamed", "put", "big.bin"]);
    put.stdin.take().unwrap().write_all(&data).unwrap();
    let put = put.wait_with_output().unwrap();
    assert!(put.status.success(), "{}", text(&put.stderr));
    let got = airlock(&["files", "--home", home_arg, "streamed", "get", "big.bin"]);
    assert!(got.status.success(), "{}", text(&got.stderr));
    assert!(got.stdout == data, "the file came back different ({} bytes)", got.stdout.len());

    // The container makes the FIFO (the home's disk is mounted only while a runtime is open).
    let made = airlock(&["exec", "--home", home_arg, "streamed", "--", "mkfifo", "fifo"]);
    assert!(made.status.success(), "{}", text(&made.stderr));
    for action in [&["get", "fifo"][..], &["put", "fifo"][..]] {
        let started = Instant::now();
        let mut args = vec!["files", "--home", home_arg, "streamed"];
        args.extend_from_slice(action);
        let refused = airlock_with_input(&args, "x");
        assert!(!refused.status.success());
        assert_one_line_error(&refused, "only regular files");
        assert!(started.elapsed() < Duration::from_secs(5), "{action:?} took {:?}", started.elapsed());
    }
    let removed = airlock(&["sandbox", "rm", "--home", home_arg, "streamed"]);
    assert!(removed.status.success(), "{}", text(&removed.stderr));
}

/// Ctrl-c on `airlock exec` ends the command in the container too: the CLI
/// drops it and waits for the agent to confirm the kill before exiting (it
/// used to exit at once, leaving the kill queued and the command running).
#[test]
fn an_interrupted_exec_takes_its_command_with_it() {
    let home = tempfile::tempdir().unwrap();
    let home_arg = home.path().to_str().unwrap();
    let created = airlock(&["sandbox", "create", "--home", home_arg, "interrupted"]);
    assert!(created.status.success(), "{}", text(&created.stderr));
    let mut child = airlock_command(&["exec", "--home", home_arg, "interrupted", "--", "bash", "-c", "echo started; sleep 321"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut first).unwrap();
    assert_eq!(first, "started\n");
    let sent = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(sent.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "128 + SIGINT, as a shell reports it");

    let ps = || {
        let seen = airlock(&["exec", "--home", home_arg, "interrupted", "--", "ps", "-eo", "args"]);
        assert!(seen.status.success(), "{}", text(&seen.stderr));
        text(&seen.stdout)
    };
    let started = Instant::now();
    while ps().contains("sleep 321") {
        assert!(started.elapsed() < Duration::from_secs(5), "the interrupted command still runs: {}", ps());
        std::thread::sleep(Duration::from_millis(200));
    }
    let removed = airlock(&["sandbox", "rm", "--home", home_arg, "interrupted"]);
    assert!(removed.status.success(), "{}", text(&removed.stderr));
}
