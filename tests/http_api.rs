//! The HTTP API (`airlock serve`, crates/server) on loopback, through a real
//! HTTP client: every route's happy path; bad input answered with the right
//! status and problem body and nothing changed on disk; files streamed both
//! ways with ranges; exec event streams that end with the real status, and a
//! client that goes away taking its command with it; shutdown on SIGTERM.
//!
//! One server per test binary (in process, on an ephemeral port, over a
//! temporary home, its guests compiled once) serves the tests; each uses its
//! own sandbox names. The shutdown test runs the `airlock serve` binary.
//! Tests that reach a container need the Docker engine and fail loudly without it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use airlock::runtime::{DiskOptions, QuotaMode, Runtime, RuntimeOptions};
use futures_util::StreamExt;
use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

mod common;

use common::Cleanup;

struct Shared {
    base: String,
    home: PathBuf,
    /// The admin token the server made in its home: every request carries it.
    token: String,
}

/// The test binary's server, started on first use.
fn server() -> &'static Shared {
    static SERVER: OnceLock<Shared> = OnceLock::new();
    SERVER.get_or_init(|| {
        // The guests must be there: a test never passes by skipping.
        common::guest("python.wasm");
        let parent = Path::new(env!("CARGO_TARGET_TMPDIR")).join("http-api-homes");
        // The homes of earlier runs (this server is never dropped, so each run leaves its own).
        let _ = std::fs::remove_dir_all(&parent);
        std::fs::create_dir_all(&parent).unwrap();
        let home = tempfile::Builder::new().prefix("home-").tempdir_in(&parent).unwrap().keep();
        let (sender, receiver) = std::sync::mpsc::channel::<SocketAddr>();
        let runtime_home = home.clone();
        std::thread::spawn(move || {
            let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
            tokio.block_on(async move {
                let mut options = RuntimeOptions::new(&runtime_home);
                options.isolates.cache_dir = Some(Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-cache"));
                // This server is never dropped (it lives as long as the test
                // binary), so it mounts nothing that would outlive it.
                options.disk = DiskOptions { quotas: QuotaMode::Off, ..DiskOptions::default() };
                let runtime = Runtime::open(options).await.unwrap();
                airlock_server::ensure_admin_token(&runtime).unwrap();
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                sender.send(listener.local_addr().unwrap()).unwrap();
                let state = airlock_server::AppState::new(runtime);
                airlock_server::serve(listener, state, std::future::pending()).await.unwrap();
            });
        });
        let address = receiver.recv_timeout(Duration::from_secs(120)).expect("the server starts");
        let token = std::fs::read_to_string(home.join(airlock_server::ADMIN_TOKEN_FILE)).unwrap().trim().to_string();
        Shared { base: format!("http://{address}/v1"), home, token }
    })
}

fn url(path: &str) -> String {
    format!("{}{path}", server().base)
}

/// A client whose every request carries the test server's admin token
/// (a request's own `Authorization` header, for another server, wins).
fn client() -> Client {
    let mut headers = reqwest::header::HeaderMap::new();
    let bearer = format!("Bearer {}", server().token);
    headers.insert(reqwest::header::AUTHORIZATION, bearer.parse().unwrap());
    Client::builder().no_proxy().default_headers(headers).build().unwrap()
}

fn require_docker() {
    let out = Command::new("docker").arg("info").output().expect("running docker info");
    assert!(out.status.success(), "the Docker engine must be running: {}", String::from_utf8_lossy(&out.stderr));
}

/// Creates a sandbox; returns its id.
async fn create(name: &str) -> String {
    let response = client().post(url("/sandboxes")).json(&json!({ "name": name })).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let info: Value = response.json().await.unwrap();
    assert_eq!(info["name"], name);
    info["id"].as_str().unwrap().to_string()
}

async fn destroy(name: &str) {
    let response = client().delete(url(&format!("/sandboxes/{name}"))).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
}

fn workspace(id: &str) -> PathBuf {
    server().home.join("sandboxes").join(id).join("workspace")
}

/// Every path under `dir` (recursively), with its size, to show nothing changed.
fn snapshot(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut entries = Vec::new();
    let Ok(read) = std::fs::read_dir(dir) else { return entries };
    for entry in read {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        entries.push((path.clone(), meta.len()));
        if meta.is_dir() {
            entries.extend(snapshot(&path));
        }
    }
    entries.sort();
    entries
}

/// Checks an answer is a problem with this status and code; returns its detail.
async fn problem(response: Response, status: StatusCode, code: &str) -> String {
    assert_eq!(response.status(), status, "status of {}", response.url());
    let content_type = response.headers()[reqwest::header::CONTENT_TYPE].to_str().unwrap().to_string();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status.as_u16());
    assert_eq!(body["type"], format!("urn:airlock:problem:{code}"));
    let detail = body["detail"].as_str().unwrap().to_string();
    let home = server().home.to_string_lossy().to_string();
    assert!(!detail.contains(&home) && !detail.contains("/sandboxes/"), "a host path leaked: {detail}");
    detail
}

async fn post(path: &str, body: Value) -> Response {
    client().post(url(path)).json(&body).send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_are_created_listed_shown_and_destroyed() {
    let id = create("http-life").await;
    assert!(workspace(&id).is_dir());

    let again = post("/sandboxes", json!({ "name": "http-life" })).await;
    problem(again, StatusCode::CONFLICT, "conflict").await;

    let listed: Value = client().get(url("/sandboxes")).send().await.unwrap().json().await.unwrap();
    assert!(listed.as_array().unwrap().iter().any(|s| s["id"] == id.as_str()), "{listed}");
    let shown = client().get(url("/sandboxes/http-life")).send().await.unwrap();
    assert_eq!(shown.status(), StatusCode::OK);
    assert_eq!(shown.json::<Value>().await.unwrap()["id"], id.as_str());

    // A configuration is taken, strictly.
    let configured =
        post("/sandboxes", json!({ "name": "http-configured", "config": { "keep_alive": true, "max_contexts": 2 } }))
            .await;
    assert_eq!(configured.status(), StatusCode::CREATED);
    let configured: Value = configured.json().await.unwrap();
    assert_eq!(configured["config"]["keep_alive"], true);
    assert_eq!(configured["config"]["max_contexts"], 2);
    destroy("http-configured").await;

    destroy("http-life").await;
    assert!(!workspace(&id).exists(), "the workspace goes with the sandbox");
    problem(client().get(url("/sandboxes/http-life")).send().await.unwrap(), StatusCode::NOT_FOUND, "not-found").await;
    problem(client().delete(url("/sandboxes/http-life")).send().await.unwrap(), StatusCode::NOT_FOUND, "not-found")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_problems_and_change_nothing() {
    let sandboxes = server().home.join("sandboxes");
    std::fs::create_dir_all(&sandboxes).unwrap();
    let before = snapshot(&sandboxes);

    let unknown = post("/sandboxes", json!({ "name": "http-bad", "colour": "red" })).await;
    assert!(problem(unknown, StatusCode::BAD_REQUEST, "invalid-request").await.contains("colour"));
    let nested = post("/sandboxes", json!({ "name": "http-bad", "config": { "keep_alive": true, "turbo": 1 } })).await;
    assert!(problem(nested, StatusCode::BAD_REQUEST, "invalid-request").await.contains("turbo"));
    let out_of_range = post("/sandboxes", json!({ "name": "http-bad", "config": { "idle_timeout": 0 } })).await;
    problem(out_of_range, StatusCode::BAD_REQUEST, "invalid-request").await;
    for name in ["../evil", "Bad Name", "", "a/b", &"x".repeat(300)] {
        let invalid = post("/sandboxes", json!({ "name": name })).await;
        problem(invalid, StatusCode::BAD_REQUEST, "invalid-name").await;
    }
    let invalid_get = client().get(url("/sandboxes/Bad%20Name")).send().await.unwrap();
    problem(invalid_get, StatusCode::BAD_REQUEST, "invalid-name").await;

    // Past the JSON body limit: refused before it is parsed.
    let huge = "x".repeat(airlock_server::MAX_JSON_BODY_BYTES + 1);
    let oversized = post("/sandboxes", json!({ "name": "http-bad", "config": { "image": huge } })).await;
    problem(oversized, StatusCode::PAYLOAD_TOO_LARGE, "too-large").await;
    let oversized_exec = post("/run", json!({ "language": "python", "code": huge })).await;
    problem(oversized_exec, StatusCode::PAYLOAD_TOO_LARGE, "too-large").await;

    let not_json = client().post(url("/sandboxes")).body("{\"name\":\"http-bad\"}").send().await.unwrap();
    problem(not_json, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type").await;
    let broken = client()
        .post(url("/sandboxes"))
        .header("content-type", "application/json")
        .body("{\"name\":")
        .send()
        .await
        .unwrap();
    problem(broken, StatusCode::BAD_REQUEST, "invalid-request").await;

    // Unknown sandbox: nothing is created by asking.
    let exec = post("/sandboxes/http-nobody/exec", json!({ "command": "true" })).await;
    problem(exec, StatusCode::NOT_FOUND, "not-found").await;
    let code = post("/sandboxes/http-nobody/code", json!({ "language": "python", "code": "1" })).await;
    problem(code, StatusCode::NOT_FOUND, "not-found").await;
    let put = client().put(url("/sandboxes/http-nobody/files/a.txt")).body("x").send().await.unwrap();
    problem(put, StatusCode::NOT_FOUND, "not-found").await;
    let get = client().get(url("/sandboxes/http-nobody/files/a.txt")).send().await.unwrap();
    problem(get, StatusCode::NOT_FOUND, "not-found").await;
    problem(client().get(url("/nothing-here")).send().await.unwrap(), StatusCode::NOT_FOUND, "not-found").await;
    let wrong_method = client().patch(url("/sandboxes")).send().await.unwrap();
    problem(wrong_method, StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed").await;

    let unknown_exec = post("/run", json!({ "language": "python", "code": "1", "sandbox": "x" })).await;
    problem(unknown_exec, StatusCode::BAD_REQUEST, "invalid-request").await;
    let unknown_language = post("/run", json!({ "language": "cobol", "code": "1" })).await;
    problem(unknown_language, StatusCode::BAD_REQUEST, "invalid-request").await;
    let bad_timeout = post("/run", json!({ "language": "python", "code": "1", "timeout": -1 })).await;
    problem(bad_timeout, StatusCode::BAD_REQUEST, "invalid-request").await;

    let listed: Value = client().get(url("/sandboxes")).send().await.unwrap().json().await.unwrap();
    assert!(
        !listed.as_array().unwrap().iter().any(|s| s["name"] == "http-bad" || s["name"] == "http-nobody"),
        "{listed}"
    );
    // Nothing made on disk: every sandbox directory there is one another test registered.
    assert_only_registered_dirs(&before).await;
}

/// Other tests make and remove their own sandboxes meanwhile: a directory not
/// there before must be a registered sandbox's (given a moment to register).
async fn assert_only_registered_dirs(before: &[(PathBuf, u64)]) {
    let sandboxes = server().home.join("sandboxes");
    for _attempt in 0..3 {
        let listed: Value = client().get(url("/sandboxes")).send().await.unwrap().json().await.unwrap();
        let ids: Vec<String> =
            listed.as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect();
        let strays: Vec<PathBuf> = std::fs::read_dir(&sandboxes)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|dir| !before.iter().any(|(path, _)| path == dir))
            .filter(|dir| !ids.iter().any(|id| dir.ends_with(id)))
            .collect();
        if strays.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("a sandbox directory appeared that no sandbox owns");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_runs_one_shot_in_sandboxes_and_in_contexts() {
    let run: Value = post("/run", json!({ "language": "python", "code": "print(6 * 7)" })).await.json().await.unwrap();
    assert_eq!(run["stdout"], "42\n", "{run}");
    assert_eq!(run["result"]["kind"], "ok");
    let js: Value =
        post("/run", json!({ "language": "js", "code": "console.log(40 + 2)" })).await.json().await.unwrap();
    assert_eq!(js["stdout"], "42\n", "{js}");
    // A one-shot run keeps nothing: a file it writes is gone by the next.
    let write = "open('/workspace/left.txt', 'w').write('x')";
    assert_eq!(post("/run", json!({ "language": "python", "code": write })).await.status(), StatusCode::OK);
    let read = "import os; print(os.listdir('/workspace'))";
    let listed: Value = post("/run", json!({ "language": "python", "code": read })).await.json().await.unwrap();
    assert_eq!(listed["stdout"], "[]\n", "{listed}");
    // A deadline is a result, not an error.
    let spin = json!({ "language": "python", "code": "while True: pass", "timeout": 0.5 });
    let spun: Value = post("/run", spin).await.json().await.unwrap();
    assert_eq!(spun["result"]["kind"], "limit-exceeded", "{spun}");

    create("http-code").await;
    let code: Value = post(
        "/sandboxes/http-code/code",
        json!({ "language": "python", "code": "import sys; sys.stdout.write('hi'); 1/0" }),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(code["stdout"], "hi");
    assert_eq!(code["result"]["kind"], "runtime-error", "{code}");
    assert_eq!(code["result"]["error"]["kind"], "ZeroDivisionError", "{code}");
    assert_eq!(code["placement"]["tier"], "isolate");
    let no_language = post("/sandboxes/http-code/code", json!({ "code": "1" })).await;
    problem(no_language, StatusCode::BAD_REQUEST, "invalid-request").await;

    let created = post("/sandboxes/http-code/contexts", json!({ "language": "python" })).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let context = created.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let set = post("/sandboxes/http-code/code", json!({ "context": context, "code": "x = 41" })).await;
    assert_eq!(set.status(), StatusCode::OK);
    let got: Value =
        post("/sandboxes/http-code/code", json!({ "context": context, "code": "x + 1" })).await.json().await.unwrap();
    assert_eq!(got["result"]["value"]["text"], "42", "{got}");
    let listed: Value = client().get(url("/sandboxes/http-code/contexts")).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed[0]["id"], context.as_str(), "{listed}");
    let deleted = client().delete(url(&format!("/sandboxes/http-code/contexts/{context}"))).send().await.unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let gone = post("/sandboxes/http-code/code", json!({ "context": context, "code": "x" })).await;
    problem(gone, StatusCode::NOT_FOUND, "not-found").await;
    let again = client().delete(url(&format!("/sandboxes/http-code/contexts/{context}"))).send().await.unwrap();
    problem(again, StatusCode::NOT_FOUND, "not-found").await;
    destroy("http-code").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_go_in_and_out_with_ranges_listing_stat_mkdir_rename_and_delete() {
    let id = create("http-files").await;
    let files = |path: &str| url(&format!("/sandboxes/http-files/files/{path}"));
    let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();

    let put = client().put(files("dir/data.bin")).body(data.clone()).send().await.unwrap();
    assert_eq!(put.status(), StatusCode::OK);
    assert_eq!(put.json::<Value>().await.unwrap()["size"], 1000);
    assert_eq!(std::fs::read(workspace(&id).join("dir/data.bin")).unwrap(), data);

    let whole = client().get(files("dir/data.bin")).send().await.unwrap();
    assert_eq!(whole.status(), StatusCode::OK);
    assert_eq!(whole.headers()["accept-ranges"], "bytes");
    assert_eq!(whole.bytes().await.unwrap().to_vec(), data);
    let also = client().get(files("/workspace/dir/data.bin")).send().await.unwrap();
    assert_eq!(also.bytes().await.unwrap().to_vec(), data, "a /workspace/ path names the same file");

    let ranged = |range: &'static str| client().get(files("dir/data.bin")).header("range", range).send();
    let part = ranged("bytes=10-19").await.unwrap();
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.headers()["content-range"], "bytes 10-19/1000");
    assert_eq!(part.bytes().await.unwrap().to_vec(), &data[10..20]);
    let tail = ranged("bytes=-5").await.unwrap();
    assert_eq!(tail.headers()["content-range"], "bytes 995-999/1000");
    assert_eq!(tail.bytes().await.unwrap().to_vec(), &data[995..]);
    let open = ranged("bytes=990-").await.unwrap();
    assert_eq!(open.bytes().await.unwrap().to_vec(), &data[990..]);
    let beyond = ranged("bytes=1000-").await.unwrap();
    assert_eq!(beyond.headers()["content-range"], "bytes */1000");
    problem(beyond, StatusCode::RANGE_NOT_SATISFIABLE, "range-not-satisfiable").await;
    let several = ranged("bytes=0-1,5-6").await.unwrap();
    assert_eq!(several.status(), StatusCode::OK, "several ranges: the whole file");
    assert_eq!(several.bytes().await.unwrap().len(), 1000);

    let listed: Value = client().get(files("dir?list")).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed[0]["name"], "data.bin", "{listed}");
    assert_eq!(listed[0]["kind"], "file");
    let root: Value = client().get(url("/sandboxes/http-files/files?list")).send().await.unwrap().json().await.unwrap();
    assert_eq!(root[0]["name"], "dir", "{root}");
    let stat: Value = client().get(files("dir/data.bin?stat")).send().await.unwrap().json().await.unwrap();
    assert_eq!(stat["size"], 1000);
    let bad_query = client().get(files("dir?recurse=1")).send().await.unwrap();
    problem(bad_query, StatusCode::BAD_REQUEST, "invalid-request").await;

    let made = post("/sandboxes/http-files/mkdir", json!({ "path": "a/b/c" })).await;
    assert_eq!(made.status(), StatusCode::CREATED);
    assert!(workspace(&id).join("a/b/c").is_dir());
    let moved = post("/sandboxes/http-files/rename", json!({ "from": "dir/data.bin", "to": "a/b/c/moved.bin" })).await;
    assert_eq!(moved.status(), StatusCode::OK);
    assert!(!workspace(&id).join("dir/data.bin").exists());
    assert_eq!(std::fs::read(workspace(&id).join("a/b/c/moved.bin")).unwrap(), data);

    let missing = client().get(files("dir/data.bin")).send().await.unwrap();
    problem(missing, StatusCode::NOT_FOUND, "not-found").await;
    let directory = client().get(files("a")).send().await.unwrap();
    problem(directory, StatusCode::CONFLICT, "conflict").await;

    assert_eq!(client().delete(files("a")).send().await.unwrap().status(), StatusCode::NO_CONTENT);
    assert!(!workspace(&id).join("a").exists());
    problem(client().delete(files("a")).send().await.unwrap(), StatusCode::NOT_FOUND, "not-found").await;
    destroy("http-files").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_that_leave_the_workspace_are_refused_and_change_nothing() {
    require_docker();
    let id = create("http-escape").await;
    let _cleanup = Cleanup(vec![id.clone()]);
    let files = |path: &str| url(&format!("/sandboxes/http-escape/files/{path}"));
    // Links planted from inside the container, pointing at the host's root and a host file.
    let planted = post(
        "/sandboxes/http-escape/exec",
        json!({ "command": "sh", "args": ["-c", "ln -s / /workspace/root && ln -s /etc/hostname /workspace/name && mkdir /workspace/d"] }),
    )
    .await;
    let planted: Value = planted.json().await.unwrap();
    assert_eq!(planted["exit_code"], 0, "{planted}");
    let sandbox_before = snapshot(&server().home.join("sandboxes").join(&id));

    let escaping = ["..%2Fx", "d%2F..%2F..%2Fx", "%2Fetc%2Fhostname", "root/etc/hostname", "root/tmp/planted"];
    for path in escaping.iter().chain(&["name"]) {
        problem(client().get(files(path)).send().await.unwrap(), StatusCode::BAD_REQUEST, "path-refused").await;
    }
    for path in escaping {
        let put = client().put(files(path)).body("overwritten").send().await.unwrap();
        problem(put, StatusCode::BAD_REQUEST, "path-refused").await;
        let stat = client().get(files(&format!("{path}?stat"))).send().await.unwrap();
        problem(stat, StatusCode::BAD_REQUEST, "path-refused").await;
        problem(client().delete(files(path)).send().await.unwrap(), StatusCode::BAD_REQUEST, "path-refused").await;
    }
    problem(client().delete(files("root/tmp")).send().await.unwrap(), StatusCode::BAD_REQUEST, "path-refused").await;
    let listing = client().get(files("root?list")).send().await.unwrap();
    problem(listing, StatusCode::BAD_REQUEST, "path-refused").await;
    let mkdir = post("/sandboxes/http-escape/mkdir", json!({ "path": "root/tmp/made" })).await;
    problem(mkdir, StatusCode::BAD_REQUEST, "path-refused").await;
    let rename = post("/sandboxes/http-escape/rename", json!({ "from": "d", "to": "../d" })).await;
    problem(rename, StatusCode::BAD_REQUEST, "path-refused").await;

    // A raw request with `..` in its path, which HTTP clients would normalise away.
    let address = server().base.trim_start_matches("http://").trim_end_matches("/v1").to_string();
    let raw = raw_request(&address, "GET /v1/sandboxes/http-escape/files/../../../etc/hostname HTTP/1.1").await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert!(raw.contains("path-refused"), "{raw}");

    assert_eq!(snapshot(&server().home.join("sandboxes").join(&id)), sandbox_before, "nothing changed in the sandbox");
    assert!(!Path::new("/tmp/planted").exists() && !Path::new("/tmp/made").exists(), "nothing made on the host");
    assert!(Path::new("/etc/hostname").exists());
    // The links are still there, as the container made them: refused, not removed.
    assert!(std::fs::symlink_metadata(workspace(&id).join("root")).unwrap().file_type().is_symlink());
    destroy("http-escape").await;
}

async fn raw_request(address: &str, line: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let token = &server().token;
    let request = format!("{line}\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// This process's resident memory (the server runs in it), from /proc.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Samples resident memory until stopped; returns the highest sample.
fn sample_rss() -> (std::sync::Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let sampler = std::thread::spawn(move || {
        let mut highest = 0;
        while !flag.load(std::sync::atomic::Ordering::SeqCst) {
            highest = highest.max(rss_kib());
            std::thread::sleep(Duration::from_millis(20));
        }
        highest
    });
    (stop, sampler)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_file_goes_up_and_comes_back_streamed() {
    const SIZE: u64 = 256 * 1024 * 1024;
    const CHUNK: usize = 1024 * 1024;
    let id = create("http-big").await;
    let resident_before = rss_kib();
    let (stop_sampling, sampler) = sample_rss();

    // Generated as it is sent, hashed as it goes: the test holds one chunk at a time.
    let (hash_sender, hash_receiver) = tokio::sync::oneshot::channel();
    let stream =
        futures_util::stream::unfold((0u64, Sha256::new(), Some(hash_sender)), |(sent, mut hash, done)| async move {
            if sent == SIZE {
                if let Some(done) = done {
                    done.send(hash.finalize().to_vec()).unwrap();
                }
                return None;
            }
            let chunk: Vec<u8> = (0..CHUNK).map(|i| ((sent as usize + i) * 7 % 253) as u8).collect();
            hash.update(&chunk);
            Some((Ok::<_, std::io::Error>(chunk), (sent + CHUNK as u64, hash, done)))
        });
    let put = client()
        .put(url("/sandboxes/http-big/files/big.bin"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::OK);
    assert_eq!(put.json::<Value>().await.unwrap()["size"], SIZE);
    let sent_hash = hash_receiver.await.unwrap();
    assert_eq!(std::fs::metadata(workspace(&id).join("big.bin")).unwrap().len(), SIZE);

    let got = client().get(url("/sandboxes/http-big/files/big.bin")).send().await.unwrap();
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(got.content_length(), Some(SIZE));
    let mut body = got.bytes_stream();
    let (mut hash, mut received) = (Sha256::new(), 0u64);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        received += chunk.len() as u64;
        hash.update(&chunk);
    }
    assert_eq!(received, SIZE);
    assert_eq!(hash.finalize().to_vec(), sent_hash, "the same bytes came back");

    // Neither way held the file in memory (server and client share this process).
    stop_sampling.store(true, std::sync::atomic::Ordering::SeqCst);
    let grew_mib = sampler.join().unwrap().saturating_sub(resident_before) / 1024;
    // Not asserted: the other tests run in this process at the same time
    // (interpreters, guests), so the number is only reported.
    eprintln!("resident memory grew by at most {grew_mib} MiB while 256 MiB went up and back");

    let last = client().get(url("/sandboxes/http-big/files/big.bin")).header("range", "bytes=-3").send().await.unwrap();
    assert_eq!(last.status(), StatusCode::PARTIAL_CONTENT);
    let expected: Vec<u8> = (SIZE - 3..SIZE).map(|i| ((i as usize) * 7 % 253) as u8).collect();
    assert_eq!(last.bytes().await.unwrap().to_vec(), expected);
    destroy("http-big").await;
}

/// Named events of a `text/event-stream` answer, comments skipped.
struct Events {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
    pub comments: usize,
}

impl Events {
    fn new(response: Response) -> Self {
        assert_eq!(response.status(), StatusCode::OK);
        let content_type = response.headers()[reqwest::header::CONTENT_TYPE].to_str().unwrap().to_string();
        assert!(content_type.starts_with("text/event-stream"), "{content_type}");
        Self { body: response.bytes_stream().boxed(), buffer: String::new(), comments: 0 }
    }

    /// The next event as (name, data), or `None` at the end of the stream.
    async fn next(&mut self) -> Option<(String, String)> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut name, mut data) = (None, Vec::new());
                for line in block.lines() {
                    if line.starts_with(':') {
                        self.comments += 1;
                    } else if let Some(value) = line.strip_prefix("event:") {
                        name = Some(value.trim().to_string());
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push(value.trim_start().to_string());
                    }
                }
                if let Some(name) = name {
                    return Some((name, data.join("\n")));
                }
                continue;
            }
            let chunk = self.body.next().await?.unwrap();
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// Every event to the end: output bytes per stream, and the last events.
    async fn collect(mut self) -> (Vec<u8>, Vec<u8>, Vec<(String, String)>) {
        use base64::Engine as _;
        let (mut stdout, mut stderr, mut last) = (Vec::new(), Vec::new(), Vec::new());
        while let Some((name, data)) = self.next().await {
            let bytes = || base64::engine::general_purpose::STANDARD.decode(&data).unwrap();
            match name.as_str() {
                "stdout" => stdout.extend(bytes()),
                "stderr" => stderr.extend(bytes()),
                _ => last.push((name, data)),
            }
        }
        (stdout, stderr, last)
    }
}

fn exec_stream(sandbox: &str, body: Value) -> reqwest::RequestBuilder {
    client().post(url(&format!("/sandboxes/{sandbox}/exec"))).header("accept", "text/event-stream").json(&body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_answers_with_the_real_status_as_json_and_as_an_event_stream() {
    require_docker();
    let id = create("http-exec").await;
    let _cleanup = Cleanup(vec![id]);

    let script = "echo out; echo err >&2; printf '\\377\\000'; cat; echo \"$GREETING\"; pwd; exit 3";
    let body = json!({ "command": "sh", "args": ["-c", script], "env": { "GREETING": "hello" }, "cwd": "/tmp", "stdin": "in\n" });
    let answer: Value = post("/sandboxes/http-exec/exec", body.clone()).await.json().await.unwrap();
    assert_eq!(answer["exit_code"], 3, "{answer}");
    assert_eq!(answer["termination"]["kind"], "exited");
    assert_eq!(answer["placement"]["tier"], "container");
    assert_eq!(answer["stderr"], "err\n");
    assert_eq!(answer["stderr_encoding"], "utf-8");
    // Not UTF-8: base64, and said so.
    assert_eq!(answer["stdout_encoding"], "base64");
    use base64::Engine as _;
    let stdout = base64::engine::general_purpose::STANDARD.decode(answer["stdout"].as_str().unwrap()).unwrap();
    assert_eq!(stdout, b"out\n\xff\x00in\nhello\n/tmp\n");

    let (out, err, last) = Events::new(exec_stream("http-exec", body).send().await.unwrap()).collect().await;
    assert_eq!(out, b"out\n\xff\x00in\nhello\n/tmp\n");
    assert_eq!(err, b"err\n");
    assert_eq!(last.len(), 1, "exactly one last event: {last:?}");
    assert_eq!(last[0].0, "exit");
    let exit: Value = serde_json::from_str(&last[0].1).unwrap();
    assert_eq!(exit["exit_code"], 3, "{exit}");

    // Killed at its deadline: the exit event says so, with no exit code.
    let started = Instant::now();
    let slow = json!({ "command": "sh", "args": ["-c", "echo started; sleep 60"], "timeout": 1.5 });
    let (out, _, last) = Events::new(exec_stream("http-exec", slow).send().await.unwrap()).collect().await;
    assert!(started.elapsed() < Duration::from_secs(20), "the deadline ended it: {:?}", started.elapsed());
    assert_eq!(out, b"started\n");
    assert_eq!(last.len(), 1, "{last:?}");
    assert_eq!(last[0].0, "exit");
    let exit: Value = serde_json::from_str(&last[0].1).unwrap();
    assert_eq!(exit["exit_code"], Value::Null, "{exit}");
    assert_eq!(exit["termination"]["kind"], "limit-exceeded", "{exit}");
    assert_eq!(exit["termination"]["limit"], "deadline", "{exit}");

    // A command that cannot run does not report success.
    let missing = json!({ "command": "/no/such/program" });
    let (_, _, last) = Events::new(exec_stream("http-exec", missing).send().await.unwrap()).collect().await;
    assert_eq!(last.len(), 1, "{last:?}");
    let ended: Value = serde_json::from_str(&last[0].1).unwrap();
    assert!(last[0].0 == "error" || ended["exit_code"] != 0, "{last:?}");

    let bad_stdin =
        post("/sandboxes/http-exec/exec", json!({ "command": "true", "stdin": "a", "stdin_base64": "YQ==" })).await;
    problem(bad_stdin, StatusCode::BAD_REQUEST, "invalid-request").await;
    let unknown = exec_stream("http-exec", json!({ "command": "true", "user": "root" })).send().await.unwrap();
    problem(unknown, StatusCode::BAD_REQUEST, "invalid-request").await;
    destroy("http-exec").await;
}

/// The sandbox's processes whose command line holds `marker`.
async fn processes_with(sandbox: &str, marker: &str) -> Vec<String> {
    let ps = post(&format!("/sandboxes/{sandbox}/exec"), json!({ "command": "ps", "args": ["-eo", "pid,args"] })).await;
    let ps: Value = ps.json().await.unwrap();
    assert_eq!(ps["exit_code"], 0, "{ps}");
    let listing = ps["stdout"].as_str().unwrap().to_string();
    listing.lines().filter(|line| line.contains(marker) && !line.contains("ps -eo")).map(String::from).collect()
}

async fn until_gone(sandbox: &str, marker: &str, within: Duration) {
    let started = Instant::now();
    loop {
        let left = processes_with(sandbox, marker).await;
        if left.is_empty() {
            return;
        }
        assert!(started.elapsed() < within, "still running {:?} after the client left: {left:?}", started.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_takes_its_command_tree_with_it() {
    require_docker();
    let id = create("http-drop").await;
    let _cleanup = Cleanup(vec![id]);

    // A command that keeps writing, with a child of its own.
    let script = "sleep 1234 & while :; do echo tick-5150; sleep 0.1; done";
    let response = exec_stream("http-drop", json!({ "command": "sh", "args": ["-c", script], "timeout": 600 }))
        .send()
        .await
        .unwrap();
    let mut events = Events::new(response);
    assert_eq!(events.next().await.unwrap().0, "stdout");
    assert!(!processes_with("http-drop", "sleep 1234").await.is_empty(), "the tree is running");
    drop(events);
    until_gone("http-drop", "tick-5150", Duration::from_secs(5)).await;
    until_gone("http-drop", "sleep 1234", Duration::from_secs(5)).await;

    // A silent command: the keep-alive comment finds the client gone.
    let response =
        exec_stream("http-drop", json!({ "command": "sleep", "args": ["4321"], "timeout": 600 })).send().await.unwrap();
    let events = Events::new(response);
    let started = Instant::now();
    while processes_with("http-drop", "sleep 4321").await.is_empty() {
        assert!(started.elapsed() < Duration::from_secs(10), "the command never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(events);
    until_gone("http-drop", "sleep 4321", airlock_server::SSE_KEEP_ALIVE * 3).await;
    destroy("http-drop").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_stops_on_sigterm_ending_open_streams_with_an_error_event() {
    require_docker();
    let home = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["serve", "--listen", "127.0.0.1:0", "--home"])
        .arg(home.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let first = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
        line
    })
    .await
    .unwrap();
    let base = first.trim().strip_prefix("airlock: listening on ").unwrap_or_else(|| panic!("{first:?}")).to_string();

    // This server's own admin token, which it wrote to its home on start.
    let token = std::fs::read_to_string(home.path().join(airlock_server::ADMIN_TOKEN_FILE)).unwrap();
    let token = token.trim();
    let created = client()
        .post(format!("{base}/sandboxes"))
        .bearer_auth(token)
        .json(&json!({ "name": "stopping" }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let id = created.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let _cleanup = Cleanup(vec![id.clone()]);
    let stream = client()
        .post(format!("{base}/sandboxes/stopping/exec"))
        .bearer_auth(token)
        .header("accept", "text/event-stream")
        .json(&json!({ "command": "sh", "args": ["-c", "echo up; sleep 999"], "timeout": 600 }))
        .send()
        .await
        .unwrap();
    let mut events = Events::new(stream);
    assert_eq!(events.next().await.unwrap().0, "stdout");

    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let (name, data) = events.next().await.expect("a last event");
    assert_eq!(name, "error", "{data}");
    let problem: Value = serde_json::from_str(&data).unwrap();
    assert_eq!(problem["code"], "shutting-down", "{problem}");
    assert!(events.next().await.is_none(), "nothing after the last event");

    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "serve did not stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "serve exits 0 on SIGTERM: {status:?}");
    // The command was killed with its stream: its container holds no `sleep 999`.
    let container =
        Command::new("docker").args(["ps", "-q", "--filter", &format!("label=airlock.sandbox={id}")]).output().unwrap();
    for container in String::from_utf8_lossy(&container.stdout).lines() {
        let ps = Command::new("docker").args(["exec", container, "ps", "-eo", "args"]).output().unwrap();
        assert!(!String::from_utf8_lossy(&ps.stdout).contains("sleep 999"), "the command outlived the server");
    }
}

/// An open stream keeps its sandbox awake past its idle timeout, and the
/// sandbox sleeps once the stream is over; `keep_alive` keeps one awake idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_stream_keeps_its_sandbox_awake_and_keep_alive_is_honoured() {
    require_docker();
    let created = post("/sandboxes", json!({ "name": "http-awake", "config": { "idle_timeout": 1 } })).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let kept = post("/sandboxes", json!({ "name": "http-kept", "config": { "idle_timeout": 1, "keep_alive": true } })).await;
    assert_eq!(kept.status(), StatusCode::CREATED);
    let ids: Vec<String> = ["http-awake", "http-kept"]
        .iter()
        .map(|name| async move { client().get(url(&format!("/sandboxes/{name}"))).send().await.unwrap() })
        .collect::<futures_util::stream::FuturesOrdered<_>>()
        .then(|response| async move { response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string() })
        .collect()
        .await;
    let _cleanup = Cleanup(ids);
    let state = |name: &'static str| async move {
        let info: Value = client().get(url(&format!("/sandboxes/{name}"))).send().await.unwrap().json().await.unwrap();
        info["state"].as_str().unwrap().to_string()
    };
    // Both get a container (a command), then one runs a silent command four idle timeouts long.
    assert_eq!(post("/sandboxes/http-kept/exec", json!({ "command": "true" })).await.status(), StatusCode::OK);
    let body = json!({ "command": "bash", "args": ["-c", "sleep 4; echo done"] });
    let stream = tokio::spawn(async move { Events::new(exec_stream("http-awake", body).send().await.unwrap()).collect().await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(state("http-awake").await, "active", "slept under an open stream");
    let (out, _, last) = stream.await.unwrap();
    assert_eq!(out, b"done\n");
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].0, "exit", "{last:?}");
    assert_eq!(serde_json::from_str::<Value>(&last[0].1).unwrap()["exit_code"], 0);
    // Over, the stream no longer holds it: it sleeps; the keep-alive one never does.
    let give_up = Instant::now() + Duration::from_secs(20);
    while state("http-awake").await != "sleeping" {
        assert!(Instant::now() < give_up, "never slept after its stream ended");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(state("http-kept").await, "active", "a keep_alive sandbox slept");
    destroy("http-awake").await;
    destroy("http-kept").await;
}
