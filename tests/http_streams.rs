//! The HTTP API's long-lived routes on loopback, through real clients
//! (reqwest, and tokio-tungstenite for the terminal's WebSocket): background
//! processes (start, list, get, logs as JSON and followed from an offset,
//! stdin written and closed, any signal to the whole tree, kill one and all),
//! the terminal (bytes both ways, resize, the real exit status, a closed socket
//! taking its tree with it) and the sandbox's event stream. Bad input gets a
//! problem answer: unknown fields, unknown processes, bad signals, bad sizes.
//!
//! One server per test binary (in process, on an ephemeral port, over a
//! temporary home) serves the tests; each uses its own sandbox names. Every
//! request is built by [`request`] (or [`websocket`], which starts from it).
//! Tests that reach a container need the Docker engine and fail loudly without it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use airlock::runtime::{DiskOptions, QuotaMode, Runtime, RuntimeOptions};
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use reqwest::{Client, Method, Response, StatusCode};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

mod common;

use common::Cleanup;

struct Shared {
    base: String,
    home: PathBuf,
    /// The admin token the server made in its home.
    token: String,
}

/// The test binary's server, started on first use.
fn server() -> &'static Shared {
    static SERVER: OnceLock<Shared> = OnceLock::new();
    SERVER.get_or_init(|| {
        let parent = Path::new(env!("CARGO_TARGET_TMPDIR")).join("http-streams-homes");
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
                // Never dropped (it lives as long as the test binary): it mounts nothing.
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

/// Every request of this file starts here. A client per request: each test
/// has its own Tokio runtime, and a pooled connection dies with the runtime
/// that opened it.
fn request(method: Method, path: &str) -> reqwest::RequestBuilder {
    let client = Client::builder().no_proxy().build().unwrap();
    client.request(method, format!("{}{path}", server().base)).bearer_auth(&server().token)
}

fn get(path: &str) -> reqwest::RequestBuilder {
    request(Method::GET, path)
}

async fn post(path: &str, body: Value) -> Response {
    request(Method::POST, path).json(&body).send().await.unwrap()
}

async fn delete(path: &str) -> Response {
    request(Method::DELETE, path).send().await.unwrap()
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the WebSocket at `path`: the handshake is [`request`]'s, headers and all.
async fn websocket(path: &str) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
    let built = request(Method::GET, path).build().unwrap();
    let url = built.url().as_str().replacen("http://", "ws://", 1);
    let mut handshake = url.into_client_request().unwrap();
    for (name, value) in built.headers() {
        handshake.headers_mut().insert(name, value.clone());
    }
    Ok(tokio_tungstenite::connect_async(handshake).await?.0)
}

fn require_docker() {
    let out = Command::new("docker").arg("info").output().expect("running docker info");
    assert!(out.status.success(), "the Docker engine must be running: {}", String::from_utf8_lossy(&out.stderr));
}

/// Creates a sandbox; returns its id.
async fn create(name: &str) -> String {
    let response = post("/sandboxes", json!({ "name": name })).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string()
}

async fn destroy(name: &str) {
    assert_eq!(delete(&format!("/sandboxes/{name}")).await.status(), StatusCode::NO_CONTENT);
}

/// Checks an answer is a problem with this status and code; returns its detail.
async fn problem(response: Response, status: StatusCode, code: &str) -> String {
    assert_eq!(response.status(), status, "status of {}", response.url());
    let content_type = response.headers()[reqwest::header::CONTENT_TYPE].to_str().unwrap().to_string();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status.as_u16());
    let detail = body["detail"].as_str().unwrap().to_string();
    let home = server().home.to_string_lossy().to_string();
    assert!(!detail.contains(&home), "a host path leaked: {detail}");
    detail
}

/// Named events of a `text/event-stream` answer, with their ids; comments counted.
struct Events {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
    comments: usize,
}

#[derive(Debug, Clone)]
struct Sse {
    name: String,
    id: Option<String>,
    data: String,
}

impl Sse {
    fn bytes(&self) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD.decode(&self.data).unwrap()
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap()
    }
}

impl Events {
    fn new(response: Response) -> Self {
        assert_eq!(response.status(), StatusCode::OK, "{}", response.url());
        let content_type = response.headers()[reqwest::header::CONTENT_TYPE].to_str().unwrap().to_string();
        assert!(content_type.starts_with("text/event-stream"), "{content_type}");
        Self { body: response.bytes_stream().boxed(), buffer: String::new(), comments: 0 }
    }

    /// The next event, or `None` at the end of the stream.
    async fn next(&mut self) -> Option<Sse> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut name, mut id, mut data) = (None, None, Vec::new());
                for line in block.lines() {
                    if line.starts_with(':') {
                        self.comments += 1;
                    } else if let Some(value) = line.strip_prefix("event:") {
                        name = Some(value.trim().to_string());
                    } else if let Some(value) = line.strip_prefix("id:") {
                        id = Some(value.trim().to_string());
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push(value.trim_start().to_string());
                    }
                }
                if let Some(name) = name {
                    return Some(Sse { name, id, data: data.join("\n") });
                }
                continue;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(60), self.body.next())
                .await
                .expect("the stream went silent for a minute")?
                .unwrap();
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// Every event to the end.
    async fn all(mut self) -> Vec<Sse> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }
}

/// A process's output as one byte string (both streams, in order), and the last event.
fn output_and_end(events: &[Sse]) -> (Vec<u8>, Sse) {
    let (last, output) = events.split_last().expect("at least a last event");
    let mut bytes = Vec::new();
    for event in output {
        assert!(event.name == "stdout" || event.name == "stderr", "{event:?} before the end");
        bytes.extend(event.bytes());
    }
    assert!(last.name == "exit" || last.name == "error", "{last:?}");
    (bytes, last.clone())
}

fn follow(sandbox: &str, id: &str, query: &str) -> reqwest::RequestBuilder {
    get(&format!("/sandboxes/{sandbox}/processes/{id}/logs{query}")).header("accept", "text/event-stream")
}

async fn start(sandbox: &str, body: Value) -> Value {
    let response = post(&format!("/sandboxes/{sandbox}/processes"), body).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    response.json().await.unwrap()
}

async fn process(sandbox: &str, id: &str) -> Value {
    let response = get(&format!("/sandboxes/{sandbox}/processes/{id}")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
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
        assert!(started.elapsed() < within, "still running after {:?}: {left:?}", started.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn until_running(sandbox: &str, marker: &str) {
    let started = Instant::now();
    while processes_with(sandbox, marker).await.is_empty() {
        assert!(started.elapsed() < Duration::from_secs(20), "{marker} never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_is_listed_shown_and_its_logs_end_with_the_real_status() {
    require_docker();
    let id = create("streams-proc").await;
    let _cleanup = Cleanup(vec![id]);

    let script = "echo one; sleep 0.2; echo two >&2; sleep 0.2; printf '\\377'; echo three; sleep 0.5; exit 3";
    let started = start("streams-proc", json!({ "command": "sh", "args": ["-c", script], "env": { "A": "b" } })).await;
    let pid = started["id"].as_str().unwrap().to_string();
    assert_eq!(started["command"], json!(["sh", "-c", script]));
    assert!(started["started_at_ms"].as_u64().unwrap() > 0);

    let listed: Value = get("/sandboxes/streams-proc/processes").send().await.unwrap().json().await.unwrap();
    assert!(listed.as_array().unwrap().iter().any(|p| p["id"] == pid.as_str()), "{listed}");
    assert_eq!(process("streams-proc", &pid).await["id"], pid.as_str());

    // Followed to its end: every byte, in order, then its real exit status.
    let events = Events::new(follow("streams-proc", &pid, "").send().await.unwrap()).all().await;
    let (all, last) = output_and_end(&events);
    assert_eq!(all, b"one\ntwo\n\xffthree\n");
    assert_eq!(last.name, "exit", "{last:?}");
    assert_eq!(last.json()["exit_code"], 3);
    assert_eq!(last.json()["next_offset"], all.len());
    // Each output event's id is the offset just past it.
    let mut offset = 0;
    for event in &events[..events.len() - 1] {
        offset += event.bytes().len();
        assert_eq!(event.id.as_deref(), Some(offset.to_string().as_str()), "{event:?}");
    }
    let shown = process("streams-proc", &pid).await;
    assert_eq!((shown["state"].clone(), shown["exit_code"].clone()), (json!("exited"), json!(3)), "{shown}");

    // Resumed: from an offset, or from the last event id a client saw.
    let from_five = Events::new(follow("streams-proc", &pid, "?offset=5").send().await.unwrap()).all().await;
    assert_eq!(output_and_end(&from_five).0, &all[5..]);
    let first_id = events[0].id.clone().unwrap();
    let resumed =
        Events::new(follow("streams-proc", &pid, "").header("last-event-id", &first_id).send().await.unwrap())
            .all()
            .await;
    assert_eq!(output_and_end(&resumed).0, &all[first_id.parse::<usize>().unwrap()..]);

    // As JSON: each stream, where to resume, and how it ended.
    let logs: Value =
        get(&format!("/sandboxes/streams-proc/processes/{pid}/logs")).send().await.unwrap().json().await.unwrap();
    assert_eq!(logs["stdout_encoding"], "base64", "{logs}");
    assert_eq!(
        base64::engine::general_purpose::STANDARD.decode(logs["stdout"].as_str().unwrap()).unwrap(),
        b"one\n\xffthree\n"
    );
    assert_eq!(logs["stderr"], "two\n");
    assert_eq!((logs["next_offset"].clone(), logs["missed_bytes"].clone()), (json!(all.len()), json!(0)));
    assert_eq!((logs["state"].clone(), logs["exit_code"].clone()), (json!("exited"), json!(3)));
    let tail: Value = get(&format!("/sandboxes/streams-proc/processes/{pid}/logs?offset=9"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (tail["offset"].clone(), tail["stdout"].clone(), tail["stderr"].clone()),
        (json!(9), json!("three\n"), json!(""))
    );

    // A program that is not there: the stream does not report success.
    let missing = start("streams-proc", json!({ "command": "/no/such/program" })).await;
    let events =
        Events::new(follow("streams-proc", missing["id"].as_str().unwrap(), "").send().await.unwrap()).all().await;
    let (_, last) = output_and_end(&events);
    assert!(last.name == "error" || last.json()["exit_code"] != 0, "{last:?}");
    destroy("streams-proc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_leaves_does_not_stop_the_process_and_stdin_signals_and_kills_work() {
    require_docker();
    let id = create("streams-bg").await;
    let _cleanup = Cleanup(vec![id]);

    // A client that drops its follow stream mid-way: the process goes on.
    let ticker =
        start("streams-bg", json!({ "command": "sh", "args": ["-c", "while :; do echo tick-6161; sleep 0.1; done"] }))
            .await;
    let ticker = ticker["id"].as_str().unwrap().to_string();
    let mut events = Events::new(follow("streams-bg", &ticker, "").send().await.unwrap());
    assert_eq!(events.next().await.unwrap().name, "stdout");
    assert_eq!(events.next().await.unwrap().name, "stdout");
    drop(events);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(process("streams-bg", &ticker).await["state"], "running");
    let logs_path = format!("/sandboxes/streams-bg/processes/{ticker}/logs");
    let before: Value = get(&logs_path).send().await.unwrap().json().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after: Value = get(&logs_path).send().await.unwrap().json().await.unwrap();
    assert!(after["next_offset"].as_u64() > before["next_offset"].as_u64(), "still writing: {before} {after}");
    assert!(!processes_with("streams-bg", "tick-6161").await.is_empty());

    // Stdin kept open: written, then closed; the process sees its end.
    let cat = start("streams-bg", json!({ "command": "cat", "stdin": "first\n", "stdin_open": true })).await;
    let cat = cat["id"].as_str().unwrap().to_string();
    let stdin = format!("/sandboxes/streams-bg/processes/{cat}/stdin");
    let wrote = request(Method::POST, &stdin).body(b"\x00second\n".to_vec()).send().await.unwrap();
    assert_eq!(wrote.status(), StatusCode::NO_CONTENT);
    assert_eq!(delete(&stdin).await.status(), StatusCode::NO_CONTENT);
    let (bytes, last) = output_and_end(&Events::new(follow("streams-bg", &cat, "").send().await.unwrap()).all().await);
    assert_eq!((bytes.as_slice(), last.json()["exit_code"].clone()), (b"first\n\x00second\n".as_slice(), json!(0)));
    let late = request(Method::POST, &stdin).body("late").send().await.unwrap();
    problem(late, StatusCode::CONFLICT, "conflict").await;
    problem(delete(&stdin).await, StatusCode::CONFLICT, "conflict").await;
    // Without stdin_open there is no stdin to write to.
    let closed = start("streams-bg", json!({ "command": "sleep", "args": ["300"] })).await;
    let closed_stdin = format!("/sandboxes/streams-bg/processes/{}/stdin", closed["id"].as_str().unwrap());
    problem(request(Method::POST, &closed_stdin).body("x").send().await.unwrap(), StatusCode::CONFLICT, "conflict")
        .await;

    // Any signal, by name or by number, reaches the whole tree.
    let trap = "trap 'echo got-winch; exit 4' WINCH; echo ready; while :; do sleep 0.1; done";
    let trapper = start("streams-bg", json!({ "command": "bash", "args": ["-c", trap] })).await;
    let trapper = trapper["id"].as_str().unwrap().to_string();
    let mut events = Events::new(follow("streams-bg", &trapper, "").send().await.unwrap());
    assert_eq!(events.next().await.unwrap().bytes(), b"ready\n");
    let signalled = post(&format!("/sandboxes/streams-bg/processes/{trapper}/signal"), json!({ "signal": 28 })).await;
    assert_eq!(signalled.status(), StatusCode::NO_CONTENT);
    let (bytes, last) = output_and_end(&events.all().await);
    assert_eq!((bytes.as_slice(), last.json()["exit_code"].clone()), (b"got-winch\n".as_slice(), json!(4)));

    let tree =
        start("streams-bg", json!({ "command": "sh", "args": ["-c", "sleep 2345 & setsid sleep 2346 & wait"] })).await;
    let tree = tree["id"].as_str().unwrap().to_string();
    until_running("streams-bg", "sleep 2346").await;
    let signal = format!("/sandboxes/streams-bg/processes/{tree}/signal");
    assert_eq!(post(&signal, json!({ "signal": "SIGTERM" })).await.status(), StatusCode::NO_CONTENT);
    until_gone("streams-bg", "sleep 234", Duration::from_secs(5)).await;
    let (_, last) = output_and_end(&Events::new(follow("streams-bg", &tree, "").send().await.unwrap()).all().await);
    assert_eq!(last.json()["exit_code"], 128 + 15, "{last:?}");

    // Bad signals, and signals to what is not there or has ended.
    for bad in [
        json!({ "signal": "NOPE" }),
        json!({ "signal": 0 }),
        json!({ "signal": 34 }),
        json!({ "signal": -9 }),
        json!({ "signal": 1e12 }),
        json!({ "signal": "TERM", "to": "all" }),
        json!({}),
    ] {
        problem(post(&signal, bad.clone()).await, StatusCode::BAD_REQUEST, "invalid-request").await;
    }
    problem(post(&signal, json!({ "signal": "KILL" })).await, StatusCode::CONFLICT, "conflict").await;
    let nobody = post("/sandboxes/streams-bg/processes/0123abcd/signal", json!({ "signal": "KILL" })).await;
    problem(nobody, StatusCode::NOT_FOUND, "not-found").await;

    // Kill one: its tree goes, and the answer shows how it ended.
    let killed = delete(&format!("/sandboxes/streams-bg/processes/{ticker}")).await;
    assert_eq!(killed.status(), StatusCode::OK);
    let killed: Value = killed.json().await.unwrap();
    assert_eq!((killed["state"].clone(), killed["exit_code"].clone()), (json!("exited"), json!(128 + 9)), "{killed}");
    until_gone("streams-bg", "tick-6161", Duration::from_secs(5)).await;

    // Kill all: every running process, none that had ended.
    let other = start("streams-bg", json!({ "command": "sh", "args": ["-c", "sleep 3456 & sleep 3457"] })).await;
    let all: Value = delete("/sandboxes/streams-bg/processes").await.json().await.unwrap();
    let mut killed: Vec<&str> = all["killed"].as_array().unwrap().iter().map(|id| id.as_str().unwrap()).collect();
    killed.sort_unstable();
    let mut expected = vec![closed["id"].as_str().unwrap(), other["id"].as_str().unwrap()];
    expected.sort_unstable();
    assert_eq!(killed, expected);
    until_gone("streams-bg", "sleep 345", Duration::from_secs(5)).await;
    let listed: Value = get("/sandboxes/streams-bg/processes").send().await.unwrap().json().await.unwrap();
    assert!(listed.as_array().unwrap().iter().all(|p| p["state"] == "exited"), "{listed}");
    destroy("streams-bg").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_process_requests_are_problems() {
    create("streams-bad").await;
    let unknown = post("/sandboxes/streams-bad/processes", json!({ "command": "true", "timeout": 5 })).await;
    problem(unknown, StatusCode::BAD_REQUEST, "invalid-request").await;
    let both =
        post("/sandboxes/streams-bad/processes", json!({ "command": "cat", "stdin": "a", "stdin_base64": "YQ==" }))
            .await;
    problem(both, StatusCode::BAD_REQUEST, "invalid-request").await;
    let listed: Value = get("/sandboxes/streams-bad/processes").send().await.unwrap().json().await.unwrap();
    assert_eq!(listed, json!([]), "nothing was started");

    let base = "/sandboxes/streams-bad/processes/feedface";
    problem(get(base).send().await.unwrap(), StatusCode::NOT_FOUND, "not-found").await;
    problem(get(&format!("{base}/logs")).send().await.unwrap(), StatusCode::NOT_FOUND, "not-found").await;
    problem(follow("streams-bad", "feedface", "").send().await.unwrap(), StatusCode::NOT_FOUND, "not-found").await;
    problem(
        request(Method::POST, &format!("{base}/stdin")).body("x").send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "not-found",
    )
    .await;
    problem(delete(&format!("{base}/stdin")).await, StatusCode::NOT_FOUND, "not-found").await;
    problem(delete(base).await, StatusCode::NOT_FOUND, "not-found").await;
    problem(post(&format!("{base}/signal"), json!({ "signal": "TERM" })).await, StatusCode::NOT_FOUND, "not-found")
        .await;
    let killed: Value = delete("/sandboxes/streams-bad/processes").await.json().await.unwrap();
    assert_eq!(killed, json!({ "killed": [] }));

    let bad_offset = get(&format!("{base}/logs?offset=minus-one")).send().await.unwrap();
    problem(bad_offset, StatusCode::BAD_REQUEST, "invalid-request").await;
    let bad_query = get(&format!("{base}/logs?follow=yes")).send().await.unwrap();
    problem(bad_query, StatusCode::BAD_REQUEST, "invalid-request").await;
    let bad_resume = follow("streams-bad", "feedface", "").header("last-event-id", "x").send().await.unwrap();
    problem(bad_resume, StatusCode::BAD_REQUEST, "invalid-request").await;

    let nowhere = post("/sandboxes/streams-none/processes", json!({ "command": "true" })).await;
    problem(nowhere, StatusCode::NOT_FOUND, "not-found").await;
    problem(get("/sandboxes/streams-none/events").send().await.unwrap(), StatusCode::NOT_FOUND, "not-found").await;
    problem(get("/sandboxes/streams-none/pty").send().await.unwrap(), StatusCode::BAD_REQUEST, "invalid-request").await;
    destroy("streams-bad").await;
}

/// Terminal output until `wanted` shows; control frames seen on the way are kept.
async fn read_until(socket: &mut Socket, wanted: &str, controls: &mut Vec<Value>) -> String {
    let mut seen = String::new();
    while !seen.contains(wanted) {
        let message = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .unwrap_or_else(|_| panic!("no {wanted:?} in {seen:?}"))
            .unwrap_or_else(|| panic!("the socket closed before {wanted:?}: {seen:?}"))
            .unwrap();
        match message {
            Message::Binary(bytes) => seen.push_str(&String::from_utf8_lossy(&bytes)),
            Message::Text(text) => controls.push(serde_json::from_str(text.as_str()).unwrap()),
            _ => {}
        }
    }
    seen
}

/// The next text frame, as JSON (terminal bytes on the way are skipped).
async fn next_control(socket: &mut Socket) -> Option<Value> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), socket.next()).await.expect("a frame within 30 s");
        match message? {
            Ok(Message::Text(text)) => return Some(serde_json::from_str(text.as_str()).unwrap()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_carries_bytes_and_resizes_and_ends_with_the_real_status() {
    require_docker();
    let id = create("streams-pty").await;
    let _cleanup = Cleanup(vec![id]);

    let mut socket = websocket("/sandboxes/streams-pty/pty?cols=100&rows=30").await.unwrap();
    let ready = next_control(&mut socket).await.unwrap();
    assert_eq!(ready, json!({ "type": "ready", "cols": 100, "rows": 30 }));
    let mut controls = Vec::new();
    socket.send(Message::binary(b"stty size; [ -t 0 ] && echo on-a-terminal\n".to_vec())).await.unwrap();
    let seen = read_until(&mut socket, "\non-a-terminal", &mut controls).await;
    assert!(seen.contains("30 100"), "{seen}");
    socket.send(Message::text(json!({ "type": "resize", "cols": 132, "rows": 40 }).to_string())).await.unwrap();
    socket.send(Message::binary(b"stty size\n".to_vec())).await.unwrap();
    read_until(&mut socket, "40 132", &mut controls).await;

    // Bad control frames are told, and the session goes on.
    for bad in [
        "nope".to_string(),
        json!({ "type": "resize", "cols": 0, "rows": 10 }).to_string(),
        json!({ "type": "resize", "cols": 10, "rows": 10, "extra": 1 }).to_string(),
        json!({ "type": "exit" }).to_string(),
    ] {
        socket.send(Message::text(bad)).await.unwrap();
    }
    socket.send(Message::binary(b"echo still-$((6*7))\n".to_vec())).await.unwrap();
    read_until(&mut socket, "still-42", &mut controls).await;
    while controls.len() < 4 {
        controls.push(next_control(&mut socket).await.unwrap());
    }
    assert!(controls.iter().all(|c| c["type"] == "error" && c["code"] == "invalid-request"), "{controls:?}");

    // The exit frame carries the command's real status, then the socket closes.
    socket.send(Message::binary(b"exit 7\n".to_vec())).await.unwrap();
    let exit = next_control(&mut socket).await.unwrap();
    assert_eq!(exit, json!({ "type": "exit", "exit_code": 7 }));
    assert!(next_control(&mut socket).await.is_none(), "nothing after the exit frame");

    // Refused before any upgrade, as problems.
    let bad_size = get("/sandboxes/streams-pty/pty?cols=0").send().await.unwrap();
    problem(bad_size, StatusCode::BAD_REQUEST, "invalid-request").await;
    let unknown = get("/sandboxes/streams-pty/pty?shell=zsh").send().await.unwrap();
    problem(unknown, StatusCode::BAD_REQUEST, "invalid-request").await;
    let not_a_socket = get("/sandboxes/streams-pty/pty").send().await.unwrap();
    problem(not_a_socket, StatusCode::BAD_REQUEST, "invalid-request").await;
    match websocket("/sandboxes/streams-none/pty").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 404),
        other => panic!("a terminal in no sandbox: {:?}", other.map(|_| ())),
    }
    destroy("streams-pty").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_or_abandoning_the_terminal_socket_ends_its_whole_tree() {
    require_docker();
    let id = create("streams-pty-drop").await;
    let _cleanup = Cleanup(vec![id]);
    let mut socket = websocket("/sandboxes/streams-pty-drop/pty?command=bash").await.unwrap();
    assert_eq!(next_control(&mut socket).await.unwrap()["type"], "ready");
    socket.send(Message::binary(b"sleep 4567 & setsid sleep 4568 & echo went-background\n".to_vec())).await.unwrap();
    read_until(&mut socket, "\nwent-background", &mut Vec::new()).await;
    until_running("streams-pty-drop", "sleep 4568").await;
    socket.close(None).await.unwrap();
    drop(socket);
    until_gone("streams-pty-drop", "sleep 456", Duration::from_secs(5)).await;

    // A socket that just goes away (no close frame) takes its tree too.
    let mut socket = websocket("/sandboxes/streams-pty-drop/pty").await.unwrap();
    assert_eq!(next_control(&mut socket).await.unwrap()["type"], "ready");
    socket.send(Message::binary(b"sleep 5678 & echo went-background\n".to_vec())).await.unwrap();
    read_until(&mut socket, "\nwent-background", &mut Vec::new()).await;
    until_running("streams-pty-drop", "sleep 5678").await;
    drop(socket);
    until_gone("streams-pty-drop", "sleep 5678", Duration::from_secs(5)).await;

    // A client that stays connected but silent (it answers no ping): taken as gone.
    let mut socket = websocket("/sandboxes/streams-pty-drop/pty").await.unwrap();
    assert_eq!(next_control(&mut socket).await.unwrap()["type"], "ready");
    socket.send(Message::binary(b"sleep 6789 & echo went-background\n".to_vec())).await.unwrap();
    read_until(&mut socket, "\nwent-background", &mut Vec::new()).await;
    until_running("streams-pty-drop", "sleep 6789").await;
    // Not read from here on, so not a pong goes back.
    let limit = airlock_server::SSE_KEEP_ALIVE * 3;
    until_gone("streams-pty-drop", "sleep 6789", limit + airlock_server::SSE_KEEP_ALIVE * 3).await;
    drop(socket);
    destroy("streams-pty-drop").await;
}

/// Reads sandbox events (each named by its type) until one is `wanted`; all are kept in `seen`.
async fn until(events: &mut Events, wanted: &dyn Fn(&Value) -> bool, seen: &mut Vec<Value>) {
    loop {
        let event = events.next().await.unwrap_or_else(|| panic!("the stream ended early: {seen:?}"));
        let data = event.json();
        assert_eq!(data["type"], event.name.as_str(), "{event:?}");
        seen.push(data.clone());
        if wanted(&data) {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_tells_file_process_and_lifecycle_changes() {
    require_docker();
    let id = create("streams-events").await;
    let _cleanup = Cleanup(vec![id]);
    let mut events = Events::new(get("/sandboxes/streams-events/events").send().await.unwrap());

    let put = request(Method::PUT, "/sandboxes/streams-events/files/notes/a.txt").body("hello").send().await.unwrap();
    assert_eq!(put.status(), StatusCode::OK);
    let mut seen = Vec::new();
    until(&mut events, &|e| e["type"] == "file" && e["path"] == "notes/a.txt" && e["change"] == "created", &mut seen)
        .await;

    // A process: the container starts, its output and exit are told, and so is the file it writes.
    start("streams-events", json!({ "command": "sh", "args": ["-c", "echo from-proc; echo x > made.txt; exit 5"] }))
        .await;
    until(&mut events, &|e| e["type"] == "process-exited" && e["code"] == 5, &mut seen).await;
    until(&mut events, &|e| e["type"] == "file" && e["path"] == "made.txt", &mut seen).await;
    assert!(seen.iter().any(|e| e["type"] == "lifecycle" && e["change"] == "container-started"), "{seen:?}");
    let output = seen.iter().find(|e| e["type"] == "process-output").expect("process output");
    assert_eq!(
        base64::engine::general_purpose::STANDARD.decode(output["data"].as_str().unwrap()).unwrap(),
        b"from-proc\n"
    );

    // Quiet for longer than the keep-alive interval: a comment keeps the stream open.
    let comments = events.comments;
    let quiet = tokio::time::timeout(airlock_server::SSE_KEEP_ALIVE * 2, events.next()).await;
    assert!(quiet.is_err(), "no event while nothing happens: {quiet:?}");
    assert!(events.comments > comments, "a keep-alive comment came");

    // The sandbox destroyed: that is the last event.
    destroy("streams-events").await;
    until(&mut events, &|e| e["type"] == "lifecycle" && e["change"] == "destroyed", &mut seen).await;
    assert!(events.next().await.is_none(), "the stream ends with its sandbox");
}
