//! `POST /v1/sandboxes/{name}/git/checkout` and `airlock git checkout`, end
//! to end: a real server in process on loopback (and on its home's API
//! socket, for the CLI), real sandbox containers, and a private repository
//! served over HTTP on the host's loopback that wants a token. The token is a
//! runtime secret that a header rule of the sandbox's network policy adds at
//! the egress proxy; the request never carries it.
//!
//! - cloned at the server's commit, the answer shaped like exec's; without
//!   the rule, git's own failure (a 401) is a 200 with its exit code and stderr;
//! - credentials in the URL (and other refused checkouts) are `422` and
//!   nothing is written to the workspace; unknown fields are `400`;
//! - an unknown sandbox, and another tenant's, are `404`;
//! - the CLI prints the commit, through the server that owns a home and in
//!   a home of its own.
//!
//! Needs the Docker engine and the base image, and fails without them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "egress/upstream.rs"]
mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use airlock::runtime::{API_SOCKET_FILE, DiskOptions, QuotaMode, Runtime, RuntimeOptions};
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use upstream::{Upstream, bare_repository, static_files};

/// The credential the repository's server wants; no request to Airlock carries it.
const TOKEN: &str = "tok-git-5a8b3c1d-only-at-the-proxy";

struct Shared {
    base: String,
    home: PathBuf,
    admin: String,
    alice: String,
    bob: String,
    runtime: Runtime,
}

/// The test binary's server (in process, ephemeral loopback port and the
/// home's API socket, temporary home).
fn server() -> &'static Shared {
    static SERVER: OnceLock<Shared> = OnceLock::new();
    SERVER.get_or_init(|| {
        require_docker();
        // Under /tmp, not the target directory: each sandbox's egress socket is
        // in the home, and a Unix socket's path must fit in SUN_LEN (108 bytes).
        let parent = std::env::temp_dir().join("airlock-http-git");
        let _ = std::fs::remove_dir_all(&parent);
        std::fs::create_dir_all(&parent).unwrap();
        let home: PathBuf = tempfile::Builder::new().prefix("home-").tempdir_in(&parent).unwrap().keep();
        let (sender, receiver) = std::sync::mpsc::channel::<(SocketAddr, Runtime)>();
        let runtime_home = home.clone();
        std::thread::spawn(move || {
            let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            tokio.block_on(async move {
                let mut options = RuntimeOptions::new(&runtime_home);
                // Never dropped (it lives as long as the test binary): no mounts to outlive it.
                options.disk = DiskOptions { quotas: QuotaMode::Off, ..DiskOptions::default() };
                let runtime = Runtime::open(options).await.unwrap();
                airlock_server::ensure_admin_token(&runtime).unwrap();
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let local = airlock_server::bind_local(&runtime_home.join(API_SOCKET_FILE)).unwrap();
                sender.send((listener.local_addr().unwrap(), runtime.clone())).unwrap();
                let state = airlock_server::AppState::new(runtime);
                tokio::spawn(airlock_server::serve_local(local, state.clone()));
                airlock_server::serve(listener, state, std::future::pending()).await.unwrap();
            });
        });
        let (address, runtime) = receiver.recv_timeout(Duration::from_secs(120)).expect("the server starts");
        let admin = std::fs::read_to_string(home.join(airlock_server::ADMIN_TOKEN_FILE)).unwrap().trim().to_string();
        let alice = runtime.tokens().create("alice", false).unwrap().secret().to_string();
        let bob = runtime.tokens().create("bob", false).unwrap().secret().to_string();
        Shared { base: format!("http://{address}"), home, admin, alice, bob, runtime }
    })
}

fn require_docker() {
    let out = Command::new("docker").arg("info").output().expect("running docker info");
    assert!(out.status.success(), "the Docker engine must be running: {}", String::from_utf8_lossy(&out.stderr));
}

/// Status and JSON body (`null` when empty).
async fn call(token: &str, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let mut builder = Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .request(method, format!("{}/v1{path}", server().base))
        .bearer_auth(token);
    if let Some(body) = body {
        builder = builder.json(&body);
    }
    let response = builder.send().await.unwrap();
    let status = response.status();
    let bytes = response.bytes().await.unwrap();
    let value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
    (status, value)
}

async fn create(token: &str, name: &str) {
    let body = json!({ "name": name, "config": { "tier": "container" } });
    let (status, answer) = call(token, Method::POST, "/sandboxes", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
}

fn checkout_path(name: &str) -> String {
    format!("/sandboxes/{name}/git/checkout")
}

/// Asserts a problem answer with `status` and `code`.
fn problem(answer: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(answer.0, status, "{}", answer.1);
    assert_eq!(answer.1["code"], code, "{}", answer.1);
}

/// Removes the sandbox (and its container) however the test ends.
struct Destroy(&'static str);

impl Drop for Destroy {
    fn drop(&mut self) {
        let runtime = server().runtime.clone();
        let name = self.0;
        let _ = std::thread::spawn(move || {
            let tokio = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let _ = tokio.block_on(runtime.destroy(name));
        })
        .join();
    }
}

/// A private repository on loopback: its commit, its server (kept alive by the caller) and its port.
async fn private_repository(dir: &Path) -> (String, Upstream, u16) {
    let commit = bare_repository(dir, "cloned over the HTTP API\n");
    let upstream = Upstream::http(static_files(&dir.join("site"), Some(format!("Bearer {TOKEN}")))).await;
    let port = upstream.port();
    (commit, upstream, port)
}

/// A policy that lets the sandbox reach `git.test` (the loopback server), with or without the token.
fn policy(port: u16, with_token: bool) -> Value {
    let mut rule = json!({ "host": "git.test", "ports": [port], "connect_to": format!("127.0.0.1:{port}") });
    if with_token {
        rule["headers"] = json!([{ "name": "Authorization", "secret": "git-token", "prefix": "Bearer " }]);
    }
    json!({ "allow": [rule] })
}

async fn set_policy(name: &str, policy: Value) {
    let shared = server();
    let answer = call(&shared.admin, Method::PUT, &format!("/sandboxes/{name}/network"), Some(policy)).await;
    assert_eq!(answer.0, StatusCode::OK, "{}", answer.1);
}

async fn store_token() {
    let shared = server();
    let answer = call(&shared.admin, Method::PUT, "/secrets/git-token", Some(json!({ "value": TOKEN }))).await;
    assert!(answer.0.is_success(), "{}", answer.1);
}

/// The workspace's root listing, as names.
async fn workspace_names(name: &str) -> Vec<String> {
    let (status, listing) = call(&server().admin, Method::GET, &format!("/sandboxes/{name}/files?list"), None).await;
    assert_eq!(status, StatusCode::OK, "{listing}");
    let entries = listing.as_array().unwrap_or_else(|| panic!("not a listing: {listing}"));
    entries.iter().map(|entry| entry["name"].as_str().unwrap_or_default().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_repository_is_cloned_with_the_token_from_a_host_rule() {
    let shared = server();
    let repos = tempfile::tempdir().unwrap();
    let (commit, upstream, port) = private_repository(repos.path()).await;
    store_token().await;
    create(&shared.admin, "git-private").await;
    let _destroy = Destroy("git-private");
    let url = format!("http://git.test:{port}/repo.git");

    // Allowed, but no header rule: the repository's server refuses, and git's
    // failure is the answer (200, its exit code and its words), like exec's.
    set_policy("git-private", policy(port, false)).await;
    let body = json!({ "url": url, "dir": "first", "timeout": 120 });
    let (status, refused) = call(&shared.admin, Method::POST, &checkout_path("git-private"), Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{refused}");
    assert_ne!(refused["exit_code"], json!(0), "{refused}");
    assert_eq!(refused["commit"], Value::Null, "{refused}");
    assert!(refused["stderr"].as_str().unwrap().contains("fatal"), "{refused}");
    assert!(!upstream.seen().is_empty(), "git reached the server");

    // With the host rule: cloned at the server's commit.
    set_policy("git-private", policy(port, true)).await;
    let body = json!({ "url": url, "dir": "src/repo" });
    let (status, cloned) = call(&shared.admin, Method::POST, &checkout_path("git-private"), Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{cloned}");
    assert_eq!(cloned["exit_code"], json!(0), "{cloned}");
    assert_eq!(cloned["commit"], json!(commit), "{cloned}");
    assert_eq!(cloned["dir"], "src/repo");
    assert_eq!(cloned["placement"]["tier"], "container", "{cloned}");
    for field in
        ["stdout", "stderr", "stdout_truncated", "stderr_truncated", "wall_time_ms", "cpu_time_ms", "termination"]
    {
        assert!(cloned.get(field).is_some(), "{field} missing: {cloned}");
    }
    let path = "/sandboxes/git-private/files/src/repo/README";
    let response = Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{}/v1{path}", shared.base))
        .bearer_auth(&shared.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap(), "cloned over the HTTP API\n");
    // The server saw the token; the sandbox's .git/config did not get it.
    let authorized = format!("Bearer {TOKEN}");
    assert!(upstream.seen().iter().any(|seen| seen.header("authorization") == Some(authorized.as_str())));
    let (status, config) = call(
        &shared.admin,
        Method::POST,
        "/sandboxes/git-private/exec",
        Some(json!({ "command": "cat", "args": ["/workspace/src/repo/.git/config"] })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{config}");
    let config = config["stdout"].as_str().unwrap();
    assert!(config.contains("url = http://git.test") && !config.contains(TOKEN), "{config}");

    // An unknown branch: git's failure again, with git's words.
    let body = json!({ "url": url, "branch": "no-such-branch", "dir": "other" });
    let (status, unknown) = call(&shared.admin, Method::POST, &checkout_path("git-private"), Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{unknown}");
    assert_ne!(unknown["exit_code"], json!(0), "{unknown}");
    assert!(unknown["stderr"].as_str().unwrap().contains("no-such-branch"), "{unknown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_checkouts_are_422_and_write_nothing() {
    let shared = server();
    create(&shared.admin, "git-refused").await;
    let _destroy = Destroy("git-refused");
    let path = checkout_path("git-refused");
    for body in [
        json!({ "url": format!("http://user:{TOKEN}@git.test:8080/repo.git") }),
        json!({ "url": format!("https://{TOKEN}@git.test/repo.git") }),
        json!({ "url": "ssh://git.test/repo.git" }),
        json!({ "url": "file:///etc" }),
        json!({ "url": "http://git.test/repo.git", "branch": "--upload-pack=touch /workspace/pwned" }),
        json!({ "url": "http://git.test/repo.git", "dir": "../outside" }),
        json!({ "url": "http://git.test/repo.git", "depth": 0 }),
        json!({ "url": "http://git.test/repo.git", "timeout": -1 }),
    ] {
        let answer = call(&shared.admin, Method::POST, &path, Some(body.clone())).await;
        problem(&answer, StatusCode::UNPROCESSABLE_ENTITY, "invalid-request");
        assert!(!answer.1["detail"].as_str().unwrap().contains(TOKEN), "the detail repeats the token: {}", answer.1);
    }
    // An unknown field, or no URL: malformed, as on every route.
    let unknown = json!({ "url": "http://git.test/repo.git", "token": TOKEN });
    problem(&call(&shared.admin, Method::POST, &path, Some(unknown)).await, StatusCode::BAD_REQUEST, "invalid-request");
    problem(
        &call(&shared.admin, Method::POST, &path, Some(json!({}))).await,
        StatusCode::BAD_REQUEST,
        "invalid-request",
    );
    // Nothing ran: the workspace is as it was made.
    assert_eq!(workspace_names("git-refused").await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_sandbox_and_another_tenants_are_404() {
    let shared = server();
    let body = json!({ "url": "http://git.test/repo.git" });
    let missing = call(&shared.admin, Method::POST, &checkout_path("git-nobody"), Some(body.clone())).await;
    problem(&missing, StatusCode::NOT_FOUND, "not-found");
    // The sandbox's 404, not the router's "no such route".
    assert!(missing.1["detail"].as_str().unwrap().contains("no sandbox named"), "{}", missing.1);

    create(&shared.alice, "git-alice").await;
    let _destroy = Destroy("git-alice");
    // Alice reaches her own sandbox (a refused URL, so nothing runs) ...
    let own = json!({ "url": "ssh://git.test/repo.git" });
    problem(
        &call(&shared.alice, Method::POST, &checkout_path("git-alice"), Some(own.clone())).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-request",
    );
    // ... Bob does not, even with the same body.
    problem(
        &call(&shared.bob, Method::POST, &checkout_path("git-alice"), Some(own)).await,
        StatusCode::NOT_FOUND,
        "not-found",
    );
    let theirs = call(&shared.bob, Method::POST, &checkout_path("git-alice"), Some(body.clone())).await;
    problem(&theirs, StatusCode::NOT_FOUND, "not-found");
    // Exactly as a sandbox that does not exist (the name aside).
    let nobody = call(&shared.bob, Method::POST, &checkout_path("git-nobody"), Some(body)).await;
    assert_eq!(
        theirs.1["detail"].as_str().unwrap().replace("git-alice", "X"),
        nobody.1["detail"].as_str().unwrap().replace("git-nobody", "X")
    );
    assert_eq!(workspace_names("git-alice").await, Vec::<String>::new());
}

/// Runs the CLI with `args` on `home`; its status, stdout and stderr.
async fn airlock(home: &Path, args: &[&str], stdin: &[u8]) -> (Option<i32>, String, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(args)
        .env("AIRLOCK_HOME", home)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    drop(input);
    let out = child.wait_with_output().await.unwrap();
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_clones_through_the_server_that_owns_the_home_and_prints_the_commit() {
    let shared = server();
    let repos = tempfile::tempdir().unwrap();
    let (commit, _upstream, port) = private_repository(repos.path()).await;
    store_token().await;
    create(&shared.admin, "git-cli").await;
    let _destroy = Destroy("git-cli");
    set_policy("git-cli", policy(port, true)).await;
    let url = format!("http://git.test:{port}/repo.git");

    // The home is the server's: the CLI goes through its socket.
    let (code, out, err) = airlock(&shared.home, &["git", "checkout", "git-cli", &url, "--dir", "cli"], b"").await;
    assert_eq!((code, out.as_str()), (Some(0), format!("{commit}\n").as_str()), "{err}");
    let readme = shared.runtime.get("git-cli").unwrap().unwrap().read_file("cli/README").await.unwrap();
    assert_eq!(readme, b"cloned over the HTTP API\n");

    // git's failure: its stderr, and its exit status.
    let (code, out, err) =
        airlock(&shared.home, &["git", "checkout", "git-cli", &url, "--branch", "nope", "--dir", "x"], b"").await;
    assert_eq!(code, Some(128), "{out} {err}");
    assert!(out.is_empty() && err.contains("nope"), "{out} {err}");
    // Refused before anything runs: credentials in the URL.
    let bad = format!("http://user:{TOKEN}@git.test:{port}/repo.git");
    let (code, _, err) = airlock(&shared.home, &["git", "checkout", "git-cli", &bad], b"").await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("credentials"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_clones_in_a_home_of_its_own() {
    require_docker();
    let home = tempfile::tempdir().unwrap();
    let repos = tempfile::tempdir().unwrap();
    let (commit, _upstream, port) = private_repository(repos.path()).await;
    let home = home.path();
    let ok = |(code, out, err): (Option<i32>, String, String)| {
        assert_eq!(code, Some(0), "{err}");
        out
    };
    ok(airlock(home, &["sandbox", "create", "git-local", "--tier", "container"], b"").await);
    ok(airlock(home, &["secret", "set", "git-token"], format!("{TOKEN}\n").as_bytes()).await);
    let connect_to = format!("127.0.0.1:{port}");
    let port_text = port.to_string();
    let allow = [
        "policy",
        "git-local",
        "allow",
        "git.test",
        "--port",
        &port_text,
        "--connect-to",
        &connect_to,
        "--header",
        "Authorization=git-token:Bearer ",
    ];
    ok(airlock(home, &allow, b"").await);
    let url = format!("http://git.test:{port}/repo.git");
    let cloned = airlock(home, &["git", "checkout", "git-local", &url], b"").await;
    let removed = airlock(home, &["sandbox", "rm", "git-local"], b"").await;
    assert_eq!((cloned.0, cloned.1.as_str()), (Some(0), format!("{commit}\n").as_str()), "{}", cloned.2);
    assert!(cloned.2.contains("/workspace/repo"), "{}", cloned.2);
    ok(removed);
    // No such sandbox: said so, nothing made.
    let (code, _, err) = airlock(home, &["git", "checkout", "git-nobody", &url], b"").await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no sandbox named \"git-nobody\""), "{err}");
}
