//! The code routes' rich results, live output and context options on
//! loopback, through a real HTTP client: `POST /v1/sandboxes/{name}/code`
//! and `POST /v1/run` answer with display outputs and side effects; with
//! `Accept: text/event-stream` `/code` streams `stdout`/`stderr` as the code
//! writes them, then one `display` event per display output, then exactly
//! one `result`; a client that leaves mid-stream leaves the server and the
//! context answering; contexts are made with `replay_on_escalation` and
//! listed with their tier and options.
//!
//! One server per test binary (in process, ephemeral loopback port,
//! temporary home). The container test needs the Docker engine and fails
//! loudly without it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use airlock::runtime::{DiskOptions, QuotaMode, Runtime, RuntimeOptions};
use base64::Engine as _;
use futures_util::StreamExt;
use reqwest::{Client, Method, Response, StatusCode};
use serde_json::{Value, json};

mod common;

use common::Cleanup;

struct Shared {
    base: String,
    token: String,
}

/// The test binary's server, started on first use.
fn server() -> &'static Shared {
    static SERVER: OnceLock<Shared> = OnceLock::new();
    SERVER.get_or_init(|| {
        let parent = Path::new(env!("CARGO_TARGET_TMPDIR")).join("http-code-rich-homes");
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
        Shared { base: format!("http://{address}/v1"), token }
    })
}

/// A client per request: each test has its own Tokio runtime.
fn request(method: Method, path: &str) -> reqwest::RequestBuilder {
    let client = Client::builder().no_proxy().build().unwrap();
    client.request(method, format!("{}{path}", server().base)).bearer_auth(&server().token)
}

async fn post(path: &str, body: Value) -> Response {
    request(Method::POST, path).json(&body).send().await.unwrap()
}

async fn post_json(path: &str, body: Value) -> Value {
    let response = post(path, body).await;
    let status = response.status();
    let answer: Value = response.json().await.unwrap();
    assert!(status.is_success(), "{path}: {status} {answer}");
    answer
}

/// Makes a sandbox with this config.
async fn create(name: &str, config: Value) {
    let response = post("/sandboxes", json!({ "name": name, "config": config })).await;
    assert_eq!(response.status(), StatusCode::CREATED, "{}", response.text().await.unwrap());
}

async fn destroy(name: &str) {
    let response = request(Method::DELETE, &format!("/sandboxes/{name}")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
}

/// Makes a context; returns its id.
async fn context(sandbox: &str, body: Value) -> String {
    let response = post(&format!("/sandboxes/{sandbox}/contexts"), body).await;
    assert_eq!(response.status(), StatusCode::CREATED, "{}", response.text().await.unwrap());
    response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string()
}

fn require_docker() {
    let out = Command::new("docker").arg("info").output().expect("running docker info");
    assert!(out.status.success(), "the Docker engine must be running: {}", String::from_utf8_lossy(&out.stderr));
}

/// One named event, and when it arrived.
#[derive(Debug, Clone)]
struct Sse {
    name: String,
    data: String,
    at: Instant,
}

impl Sse {
    fn bytes(&self) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD.decode(&self.data).unwrap()
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap()
    }
}

/// The named events of a `text/event-stream` answer.
struct Events {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

impl Events {
    fn new(response: Response) -> Self {
        assert_eq!(response.status(), StatusCode::OK, "{}", response.url());
        let content_type = response.headers()[reqwest::header::CONTENT_TYPE].to_str().unwrap().to_string();
        assert!(content_type.starts_with("text/event-stream"), "{content_type}");
        Self { body: response.bytes_stream().boxed(), buffer: String::new() }
    }

    async fn next(&mut self) -> Option<Sse> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut name, mut data) = (None, Vec::new());
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("event:") {
                        name = Some(value.trim().to_string());
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push(value.trim_start().to_string());
                    }
                }
                if let Some(name) = name {
                    return Some(Sse { name, data: data.join("\n"), at: Instant::now() });
                }
                continue; // a keep-alive comment
            }
            let chunk = tokio::time::timeout(Duration::from_secs(60), self.body.next())
                .await
                .expect("the stream went silent for a minute")?
                .unwrap();
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    async fn all(mut self) -> Vec<Sse> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }
}

/// `/code` as an event stream.
async fn stream(sandbox: &str, body: Value) -> Events {
    let response = request(Method::POST, &format!("/sandboxes/{sandbox}/code"))
        .header("accept", "text/event-stream")
        .json(&body)
        .send()
        .await
        .unwrap();
    Events::new(response)
}

/// Checks the shape of a stream: output events, then display events, then
/// exactly one `result` as the last event. Returns (stdout, displays, result).
fn output_displays_result(events: &[Sse]) -> (String, Vec<Value>, Value) {
    let (last, before) = events.split_last().expect("at least one event");
    assert_eq!(last.name, "result", "the last event: {last:?}");
    let mut stdout = Vec::new();
    let mut displays = Vec::new();
    for event in before {
        match event.name.as_str() {
            "stdout" => {
                assert!(displays.is_empty(), "output after a display: {events:?}");
                stdout.extend(event.bytes());
            }
            "stderr" => assert!(displays.is_empty(), "output after a display: {events:?}"),
            "display" => displays.push(event.json()),
            other => panic!("an event {other:?} before the result: {events:?}"),
        }
    }
    (String::from_utf8(stdout).unwrap(), displays, last.json())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_answers_carry_displays_and_side_effects() {
    create("rich-json", json!({ "tier": "isolate" })).await;
    let id = context("rich-json", json!({ "language": "python" })).await;
    let code = "class Bold:\n    def _repr_html_(self):\n        return '<b>bold</b>'\n\
                print('before')\ndisplay(Bold())\nopen('written.txt', 'w').write('x')\n";
    let answer = post_json("/sandboxes/rich-json/code", json!({ "context": id, "code": code })).await;
    assert_eq!(answer["result"]["kind"], "ok", "{answer}");
    assert_eq!(answer["stdout"], "before\n");
    let displays = answer["displays"].as_array().unwrap();
    assert_eq!(displays.len(), 1, "{answer}");
    assert_eq!(displays[0]["data"]["text/html"], "<b>bold</b>", "{answer}");
    assert_eq!(answer["displays_truncated"], false);
    let effects = answer["side_effects"].as_array().unwrap();
    assert!(
        effects.iter().any(|e| e["kind"] == "file" && e["path"].as_str().unwrap().ends_with("written.txt")),
        "{answer}"
    );
    assert_eq!(answer["side_effects_truncated"], false);
    assert_eq!(answer["placement"]["tier"], "isolate");

    // A one-shot run carries them too; a raw bundle keeps every type it names.
    let run = post_json(
        "/run",
        json!({ "language": "python", "code": "display({'text/html': '<i>i</i>', 'text/plain': 'i'}, raw=True)" }),
    )
    .await;
    assert_eq!(run["displays"], json!([{ "data": { "text/html": "<i>i</i>", "text/plain": "i" } }]), "{run}");
    assert_eq!(run["side_effects"], json!([]));
    destroy("rich-json").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_code_answers_with_empty_rich_fields_and_no_context_move() {
    let run = post_json("/run", json!({ "language": "python", "code": "print(1)" })).await;
    assert_eq!(run["displays"], json!([]), "{run}");
    assert_eq!(run["displays_truncated"], false);
    assert_eq!(run["side_effects"], json!([]));
    assert_eq!(run["side_effects_truncated"], false);
    assert!(run["placement"]["context_moved"].is_null(), "{run}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_sends_output_then_displays_then_one_result() {
    create("rich-order", json!({ "tier": "isolate" })).await;
    let code = "print('one')\ndisplay({'text/markdown': '# title'}, raw=True)\nprint('two')\n\
                display({'text/plain': 'p'}, raw=True)\n7 * 6";
    let events = stream("rich-order", json!({ "language": "python", "code": code })).await.all().await;
    let (stdout, displays, result) = output_displays_result(&events);
    assert_eq!(stdout, "one\ntwo\n");
    assert_eq!(displays, vec![json!({ "data": { "text/markdown": "# title" } }), json!({ "data": { "text/plain": "p" } })]);
    assert_eq!(result["result"]["kind"], "ok", "{result}");
    assert_eq!(result["result"]["value"]["text"], "42");
    // The result carries no output or displays: they went out as events.
    assert!(result.get("stdout").is_none() && result.get("stderr").is_none(), "{result}");
    assert_eq!(result["displays"], json!([]));
    assert_eq!(result["displays_truncated"], false);
    assert_eq!(events.iter().filter(|e| e.name == "result").count(), 1);
    destroy("rich-order").await;
}

/// Output written before a pause arrives before the pause ends.
async fn first_output_arrives_before_the_result(sandbox: &str) {
    let code = "import sys, time\nprint('first', flush=True)\ntime.sleep(1.5)\nprint('second')\n";
    let started = Instant::now();
    let events = stream(sandbox, json!({ "language": "python", "code": code })).await.all().await;
    let (stdout, _, result) = output_displays_result(&events);
    assert_eq!(stdout, "first\nsecond\n", "{events:?}");
    assert_eq!(result["result"]["kind"], "ok", "{result}");
    let first = events.iter().find(|e| e.name == "stdout").unwrap();
    let last = events.last().unwrap();
    assert!(String::from_utf8(first.bytes()).unwrap().starts_with("first"), "{events:?}");
    // Generous: the pause is 1.5 s; the first output must come at least 1 s
    // before the result, not with it.
    let gap = last.at.duration_since(first.at);
    assert!(gap >= Duration::from_millis(1000), "first output {:?} after the start, result {gap:?} later", first.at - started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_arrives_live_from_an_isolate() {
    create("rich-live", json!({ "tier": "isolate" })).await;
    first_output_arrives_before_the_result("rich-live").await;
    destroy("rich-live").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_arrives_live_from_the_container() {
    require_docker();
    let _cleanup = Cleanup(vec!["rich-live-container".into()]);
    create("rich-live-container", json!({ "tier": "container" })).await;
    first_output_arrives_before_the_result("rich-live-container").await;
    destroy("rich-live-container").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_stream_leaves_the_server_and_the_context_answering() {
    // A 2 s deadline for every evaluation in this sandbox.
    create("rich-leave", json!({ "tier": "isolate", "limits": { "deadline": 2000 } })).await;
    let id = context("rich-leave", json!({ "language": "python" })).await;
    let set = post_json("/sandboxes/rich-leave/code", json!({ "context": id, "code": "print('ready', flush=True)" })).await;
    assert_eq!(set["result"]["kind"], "ok", "{set}");

    let left_at = {
        let mut events =
            stream("rich-leave", json!({ "context": id, "code": "print('spinning', flush=True)\nwhile True: pass" }))
                .await;
        // The evaluation is running once its output arrives (or, at least,
        // the stream is open); then the client goes away.
        let _ = tokio::time::timeout(Duration::from_millis(1500), events.next()).await;
        Instant::now()
    };

    // The server is healthy, and the same context answers the next request,
    // once the abandoned evaluation has met its deadline (its spin was
    // stopped there: the context was reset by the limit, so its state is new).
    let health = Client::builder().no_proxy().build().unwrap();
    let healthz = health.get(server().base.replace("/v1", "/healthz")).send().await.unwrap();
    assert_eq!(healthz.status(), StatusCode::OK);
    let next = post_json("/sandboxes/rich-leave/code", json!({ "context": id, "code": "40 + 2" })).await;
    assert_eq!(next["result"]["kind"], "ok", "{next}");
    assert_eq!(next["result"]["value"]["text"], "42");
    // Not forever: the spin ended at its 2 s deadline, not later.
    assert!(left_at.elapsed() < Duration::from_secs(10), "the next answer took {:?}", left_at.elapsed());
    let listed: Value = request(Method::GET, "/sandboxes/rich-leave/contexts").send().await.unwrap().json().await.unwrap();
    let ours = listed.as_array().unwrap().iter().find(|c| c["id"] == id.as_str()).unwrap().clone();
    assert!(ours["resets"].as_u64().unwrap() >= 1, "the spin was stopped by its deadline: {ours}");
    destroy("rich-leave").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_an_unknown_context_is_refused_before_it_starts() {
    create("rich-unknown", json!({ "tier": "isolate" })).await;
    let response = request(Method::POST, "/sandboxes/rich-unknown/code")
        .header("accept", "text/event-stream")
        .json(&json!({ "context": "no-such-context", "code": "1" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let problem: Value = response.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("no-such-context"), "{problem}");
    destroy("rich-unknown").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contexts_take_replay_on_escalation_and_list_their_tier_and_options() {
    create("rich-contexts", json!({ "tier": "isolate" })).await;
    let replaying = context("rich-contexts", json!({ "language": "python" })).await;
    let fresh = context("rich-contexts", json!({ "language": "python", "replay_on_escalation": false })).await;
    let listed: Value =
        request(Method::GET, "/sandboxes/rich-contexts/contexts").send().await.unwrap().json().await.unwrap();
    let find = |id: &str| listed.as_array().unwrap().iter().find(|c| c["id"] == id).cloned().unwrap();
    assert_eq!(find(&replaying)["tier"], "isolate", "{listed}");
    assert_eq!(find(&replaying)["options"]["replay_on_escalation"], true, "{listed}");
    assert_eq!(find(&fresh)["options"]["replay_on_escalation"], false, "{listed}");
    assert_eq!(find(&fresh)["language"], "python");

    // Bad bodies are refused with a problem that says what is wrong, and make nothing.
    let unknown = post("/sandboxes/rich-contexts/contexts", json!({ "language": "python", "replay": false })).await;
    assert_eq!(unknown.status(), StatusCode::BAD_REQUEST);
    let problem: Value = unknown.json().await.unwrap();
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("unknown field") && detail.contains("replay"), "{problem}");
    let mistyped =
        post("/sandboxes/rich-contexts/contexts", json!({ "language": "python", "replay_on_escalation": "no" })).await;
    assert!(mistyped.status().is_client_error(), "{}", mistyped.status());
    let problem: Value = mistyped.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("replay_on_escalation"), "{problem}");
    let after: Value =
        request(Method::GET, "/sandboxes/rich-contexts/contexts").send().await.unwrap().json().await.unwrap();
    assert_eq!(after.as_array().unwrap().len(), 2, "{after}");
    destroy("rich-contexts").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_evaluation_cannot_run_ends_with_one_error_event() {
    require_docker();
    let _cleanup = Cleanup(vec!["rich-no-image".into()]);
    // A container sandbox whose image does not exist: its code cannot run.
    create("rich-no-image", json!({ "tier": "container", "image": "airlock-test-no-such-image:0" })).await;
    let events = stream("rich-no-image", json!({ "language": "python", "code": "print(1)" })).await.all().await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].name, "error", "{events:?}");
    let problem = events[0].json();
    assert_eq!(problem["status"], 503, "{problem}");
    assert_eq!(problem["code"], "unavailable", "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("container"), "{problem}");
    // The JSON answer says the same with its status.
    let json = post("/sandboxes/rich-no-image/code", json!({ "language": "python", "code": "print(1)" })).await;
    assert_eq!(json.status(), StatusCode::SERVICE_UNAVAILABLE);
    destroy("rich-no-image").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_destroyed_mid_stream_still_ends_its_stream_with_one_last_event() {
    create("rich-destroyed", json!({ "tier": "isolate", "limits": { "deadline": 3000 } })).await;
    let code = "import time\nprint('started', flush=True)\ntime.sleep(30)\nprint('never')";
    let mut events = stream("rich-destroyed", json!({ "language": "python", "code": code })).await;
    let first = events.next().await.unwrap();
    assert_eq!(first.name, "stdout", "{first:?}");
    let destroyed_at = Instant::now();
    // The destroy waits for the running evaluation (at most its deadline).
    destroy("rich-destroyed").await;
    let mut rest = Vec::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(20), events.next()).await.expect("the stream ends") {
        rest.push(event);
    }
    assert!(destroyed_at.elapsed() < Duration::from_secs(15), "{:?}", destroyed_at.elapsed());
    let last = rest.last().expect("a last event");
    assert!(last.name == "result" || last.name == "error", "{rest:?}");
    assert_eq!(rest.iter().filter(|e| e.name == "result" || e.name == "error").count(), 1, "{rest:?}");
    if last.name == "result" {
        assert_eq!(last.json()["result"]["kind"], "limit-exceeded", "{rest:?}");
    }
    let output: Vec<u8> = rest.iter().filter(|e| e.name == "stdout").flat_map(Sse::bytes).collect();
    assert!(!String::from_utf8_lossy(&output).contains("never"), "{rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_evaluation_that_moves_a_context_says_so_in_its_placement() {
    require_docker();
    let _cleanup = Cleanup(vec!["rich-move".into()]);
    create("rich-move", json!({})).await;
    let replaying = context("rich-move", json!({ "language": "python" })).await;
    let fresh = context("rich-move", json!({ "language": "python", "replay_on_escalation": false })).await;
    let escalate = "import subprocess\nsubprocess.run(['true'])\n'x' in globals()";
    for id in [&replaying, &fresh] {
        let set = post_json("/sandboxes/rich-move/code", json!({ "context": id, "code": "x = 41" })).await;
        assert_eq!(set["placement"]["tier"], "isolate", "{set}");
        assert!(set["placement"].get("context_moved").is_none(), "only a move says it moved: {set}");
    }

    let moved = post_json("/sandboxes/rich-move/code", json!({ "context": replaying, "code": escalate })).await;
    assert_eq!(moved["placement"]["tier"], "container", "{moved}");
    let context_moved = &moved["placement"]["context_moved"];
    assert_eq!(context_moved["replayed"], true, "{moved}");
    assert_eq!(context_moved["replayed_evaluations"], 1, "{moved}");
    assert_eq!(moved["result"]["value"]["text"], "True", "{moved}");
    let next = post_json("/sandboxes/rich-move/code", json!({ "context": replaying, "code": "x + 1" })).await;
    assert_eq!(next["result"]["value"]["text"], "42", "{next}");
    assert!(next["placement"].get("context_moved").is_none(), "{next}");

    // As an event stream, the move is in the result event.
    let events = stream("rich-move", json!({ "context": fresh, "code": escalate })).await.all().await;
    let (_, _, result) = output_displays_result(&events);
    assert_eq!(result["placement"]["context_moved"]["replayed"], false, "{result}");
    assert_eq!(result["result"]["value"]["text"], "False", "the fresh context lost x: {result}");

    let listed: Value = request(Method::GET, "/sandboxes/rich-move/contexts").send().await.unwrap().json().await.unwrap();
    for context in listed.as_array().unwrap() {
        assert_eq!(context["tier"], "container", "{listed}");
    }
    destroy("rich-move").await;
}
