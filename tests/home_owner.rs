//! One owner per home: a process that opens a home holds it until it closes
//! it; while `airlock serve` owns a home, the CLI works on it through the
//! server's socket, at the same time as the server's own clients, and nothing
//! one does is undone by the other. Needs the Docker engine (fails without it).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use airlock::runtime::{API_SOCKET_FILE, Runtime, RuntimeOptions};
use serde_json::{Value, json};

fn airlock(home: &Path, args: &[&str]) -> Output {
    airlock_with_input(home, args, b"")
}

fn airlock_with_input(home: &Path, args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(args)
        .env("AIRLOCK_HOME", home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn succeeded(output: &Output) -> String {
    assert!(output.status.success(), "{}", text(&output.stderr));
    text(&output.stdout)
}

/// As the CLI opens a home (the same disk set-up, so the image it mounts is shared).
fn options(home: &Path) -> RuntimeOptions {
    RuntimeOptions::new(home)
}

/// `airlock serve` on a home; its base URL once it listens.
struct Served {
    child: Child,
    base: String,
    home: PathBuf,
}

impl Served {
    fn start(home: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
            .args(["serve", "--listen", "127.0.0.1:0", "--home"])
            .arg(home)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let base = line.trim().rsplit(' ').next().unwrap().to_string();
        assert!(base.starts_with("http://127.0.0.1:"), "{line}");
        Self { child, base, home: home.to_path_buf() }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = reqwest::Client::new().request(method, format!("{}{path}", self.base));
        match std::fs::read_to_string(self.home.join("admin.token")) {
            Ok(token) => request.bearer_auth(token.trim()),
            Err(_) => request,
        }
    }

    fn stop(mut self) {
        let sent = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(sent.success());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "serve stopped with {status}");
    }
}

/// A failed test does not leave its server running.
impl Drop for Served {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
            let _ = self.child.wait();
        }
    }
}

fn docker_running() {
    let out = Command::new("docker").arg("info").output().expect("running docker info");
    assert!(out.status.success(), "the Docker engine must be running: {}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_open_in_one_process_is_refused_to_another_naming_the_holder() {
    docker_running();
    let home = tempfile::tempdir().unwrap();
    succeeded(&airlock(home.path(), &["sandbox", "create", "held"]));
    // A CLI command holds the home while its command runs.
    let mut holder = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["exec", "held", "--", "bash", "-c", "echo started; sleep 3"])
        .env("AIRLOCK_HOME", home.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(holder.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line, "started\n");

    let error = Runtime::open(options(home.path())).await.unwrap_err();
    assert!(matches!(error, airlock::runtime::Error::HomeInUse { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains(&format!("pid {} (airlock exec)", holder.id())), "{message}");

    // Within the process, runtimes share the claim; once the holder is done the home opens.
    assert!(holder.wait().unwrap().success());
    let first = Runtime::open(options(home.path())).await.unwrap();
    let second = Runtime::open(options(home.path())).await.unwrap();
    assert_eq!(second.list().unwrap().len(), 1);
    first.destroy("held").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_works_through_the_server_that_owns_the_home() {
    docker_running();
    let home = tempfile::tempdir().unwrap();
    let served = Served::start(home.path());
    assert!(home.path().join(API_SOCKET_FILE).exists());

    // The server's own client runs a command that outlives the CLI's work below.
    let busy = served
        .request(reqwest::Method::POST, "/sandboxes")
        .json(&json!({ "name": "busy", "config": { "tier": "container" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(busy.status(), 201, "{}", busy.text().await.unwrap());
    let long_run = served
        .request(reqwest::Method::POST, "/sandboxes/busy/exec")
        .json(&json!({ "command": "bash", "args": ["-c", "sleep 4; echo still-here"] }))
        .send();
    let long_run = tokio::spawn(long_run);

    // Meanwhile the CLI, on the same home, through the socket.
    let home = home.path();
    let id = succeeded(&airlock(home, &["sandbox", "create", "from-cli"])).trim().to_string();
    assert_eq!(succeeded(&airlock(home, &["sandbox", "create", "from-cli"])).trim(), id, "create is a no-op when it exists");
    let ran = airlock(home, &["exec", "from-cli", "--", "bash", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!((text(&ran.stdout).as_str(), text(&ran.stderr).as_str(), ran.status.code()), ("out\n", "err\n", Some(3)));
    let code = airlock(home, &["code", "from-cli", "--lang", "python", "-c", "print(6 * 7)"]);
    assert_eq!(succeeded(&code), "42\n");
    let failing = airlock(home, &["code", "from-cli", "--lang", "python", "-c", "1/0"]);
    assert!(!failing.status.success());
    assert!(text(&failing.stderr).contains("ZeroDivisionError"), "{}", text(&failing.stderr));
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    succeeded(&airlock_with_input(home, &["files", "from-cli", "put", "dir name/data.bin"], &data));
    let got = airlock(home, &["files", "from-cli", "get", "dir name/data.bin"]);
    assert!(got.status.success() && got.stdout == data, "the file came back different: {}", text(&got.stderr));
    assert!(succeeded(&airlock(home, &["files", "from-cli", "ls", "dir name"])).contains("data.bin"));
    let escaping = airlock(home, &["files", "from-cli", "get", "../../airlock.db"]);
    assert!(!escaping.status.success());
    let listed = succeeded(&airlock(home, &["sandbox", "list"]));
    assert!(listed.contains("from-cli") && listed.contains("busy"), "{listed}");

    // The server sees what the CLI made, and its own command was not disturbed.
    let info: Value =
        served.request(reqwest::Method::GET, "/sandboxes/from-cli").send().await.unwrap().json().await.unwrap();
    assert_eq!(info["id"], id.as_str());
    let long: Value = long_run.await.unwrap().unwrap().json().await.unwrap();
    assert_eq!(long["stdout"], "still-here\n", "{long}");

    let usage = succeeded(&airlock(home, &["usage", "from-cli"]));
    let executions: u64 = usage.lines().next().unwrap().split_whitespace().last().unwrap().parse().unwrap();
    assert!(executions >= 3, "the exec and two evaluations: {usage}");
    succeeded(&airlock(home, &["sandbox", "rm", "from-cli"]));
    succeeded(&airlock(home, &["sandbox", "rm", "busy"]));
    served.stop();
    // The server let the home go: the CLI opens it itself again.
    assert!(!home.join(API_SOCKET_FILE).exists(), "the socket outlived the server");
    let started = Instant::now();
    let listed = succeeded(&airlock(home, &["sandbox", "list"]));
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(!listed.contains("from-cli"), "{listed}");
}
