//! The HTTP API's operations side, on loopback through a real HTTP client:
//! backpressure (a burst of 1,000 one-shot runs is answered with 200s and
//! 503s carrying `Retry-After`, never a 500 and never a hang; a full isolate
//! engine is a 503 naming its limit), per-route timeouts (and the routes they
//! spare), `/healthz`, `/readyz` (saying which check fails), `/metrics` in
//! Prometheus text, and `/v1/usage`.
//!
//! Each server runs in process, on an ephemeral port, over a temporary home,
//! with its own `ServerOptions`. `/readyz` asks the Docker engine, so this
//! file needs it and fails loudly without it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use airlock::runtime::{DiskOptions, QuotaMode, Runtime, RuntimeOptions};
use airlock_server::ServerOptions;
use reqwest::{Client, Method, RequestBuilder, Response, StatusCode};
use serde_json::{Value, json};

mod common;

type Setup = Box<dyn FnOnce(Runtime) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// A server: its root URL (`http://addr`, the API under `/v1`).
struct Server {
    root: String,
    /// The admin token the server made in its home.
    token: String,
}

/// Starts a server in its own thread and Tokio runtime; `setup` runs on the
/// runtime before the server answers. `engine_runs` sizes the isolate engine's pool.
fn start(name: &str, options: ServerOptions, engine_runs: Option<u32>, setup: Setup) -> Server {
    common::guest("js.wasm");
    let parent = Path::new(env!("CARGO_TARGET_TMPDIR")).join("http-ops-homes").join(name);
    // The homes of earlier runs (these servers are never dropped).
    let _ = std::fs::remove_dir_all(&parent);
    std::fs::create_dir_all(&parent).unwrap();
    let home = tempfile::Builder::new().prefix("home-").tempdir_in(&parent).unwrap().keep();
    let token_file = home.join(airlock_server::ADMIN_TOKEN_FILE);
    let (sender, receiver) = std::sync::mpsc::channel::<SocketAddr>();
    std::thread::spawn(move || {
        let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
        tokio.block_on(async move {
            let mut runtime_options = RuntimeOptions::new(&home);
            runtime_options.isolates.cache_dir = Some(Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-cache"));
            if let Some(runs) = engine_runs {
                runtime_options.isolates.max_concurrent_runs = runs;
            }
            // Never dropped, so it mounts nothing that would outlive it.
            runtime_options.disk = DiskOptions { quotas: QuotaMode::Off, ..DiskOptions::default() };
            let runtime = Runtime::open(runtime_options).await.unwrap();
            setup(runtime.clone()).await;
            airlock_server::ensure_admin_token(&runtime).unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            sender.send(listener.local_addr().unwrap()).unwrap();
            let dir = airlock::wasm::interpreter::default_interpreter_dir();
            let state = airlock_server::AppState::with_options(runtime, dir, options);
            airlock_server::serve(listener, state, std::future::pending()).await.unwrap();
        });
    });
    let address = receiver.recv_timeout(Duration::from_secs(180)).expect("the server starts");
    let token = std::fs::read_to_string(token_file).unwrap().trim().to_string();
    Server { root: format!("http://{address}"), token }
}

fn no_setup() -> Setup {
    Box::new(|_| Box::pin(async {}))
}

/// A tenant's token on [`server`] (not an admin).
static TENANT: OnceLock<String> = OnceLock::new();

/// The server of most tests, with the default options and a tenant's token.
fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let setup: Setup = Box::new(|runtime| {
            Box::pin(async move {
                let token = runtime.tokens().create("ops-tenant", false).unwrap();
                TENANT.set(token.secret().to_string()).unwrap();
            })
        });
        start("main", ServerOptions::default(), None, setup)
    })
}

/// The burst's own server (the other tests' requests would share its queue):
/// a small evaluation gate, so that a burst overflows it.
fn burst_server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let options = ServerOptions {
            max_concurrent_evaluations: 8,
            max_queued_evaluations: 32,
            max_queue_wait: Duration::from_secs(2),
            ..ServerOptions::default()
        };
        start("burst", options, None, no_setup())
    })
}

/// A server whose execution timeout is tiny and whose plain-request timeout is
/// zero (any handler that waits at all is cut), with a sandbox holding a file,
/// and a Docker socket that does not exist.
fn tight_server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let options = ServerOptions {
            request_timeout: Duration::ZERO,
            execution_timeout: Duration::from_millis(300),
            docker_socket: PathBuf::from("/nonexistent/airlock-test/docker.sock"),
            ..ServerOptions::default()
        };
        let setup: Setup = Box::new(|runtime| {
            Box::pin(async move {
                let sandbox = runtime.sandbox("ops-tight").await.unwrap();
                sandbox.write_file("data.txt", &vec![b'x'; 1 << 20]).await.unwrap();
            })
        });
        start("tight", options, None, setup)
    })
}

/// Every request of this file is built here (the one place to add
/// credentials), with the server's admin token.
fn request(server: &Server, method: Method, path: &str) -> RequestBuilder {
    request_as(server, &server.token, method, path)
}

fn request_as(server: &Server, token: &str, method: Method, path: &str) -> RequestBuilder {
    // A client per request: a pooled connection belongs to the Tokio runtime
    // (the test) that opened it, and dies with it.
    let client = Client::builder().no_proxy().build().unwrap();
    client.request(method, format!("{}{path}", server.root)).bearer_auth(token).timeout(Duration::from_secs(120))
}

/// Checks an answer is a problem with this status and code; returns its body.
async fn problem(response: Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(response.status(), status, "status of {}", response.url());
    let content_type = response.headers()[reqwest::header::CONTENT_TYPE].to_str().unwrap().to_string();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status.as_u16());
    assert_eq!(body["type"], format!("urn:airlock:problem:{code}"));
    body
}

fn require_docker() {
    let out = std::process::Command::new("docker").arg("info").output().expect("running docker info");
    assert!(out.status.success(), "the Docker engine must be running: {}", String::from_utf8_lossy(&out.stderr));
}

/// A JavaScript one-shot that keeps a CPU busy for a few milliseconds.
const BUSY_JS: &str = "let x = 0; for (let i = 0; i < 300000; i++) { x += i % 7; } x";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_1000_runs_gets_200s_and_503s_with_retry_after_never_a_500_or_a_hang() {
    let server = burst_server();
    // Warm: the interpreter is loaded before the burst.
    let first = request(server, Method::POST, "/v1/run").json(&json!({"language": "javascript", "code": "1"})).send();
    assert_eq!(first.await.unwrap().status(), StatusCode::OK);

    let started = Instant::now();
    let mut burst = Vec::new();
    for _ in 0..1000 {
        let sent =
            request(server, Method::POST, "/v1/run").json(&json!({"language": "javascript", "code": BUSY_JS})).send();
        burst.push(tokio::spawn(async move {
            let response = sent.await.expect("an answer, not a hang or a dropped connection");
            let status = response.status();
            if status == StatusCode::OK {
                let body: Value = response.json().await.unwrap();
                assert_eq!(body["result"]["kind"], "ok", "{body}");
                return status;
            }
            let retry_after =
                response.headers().get(reqwest::header::RETRY_AFTER).map(|v| v.to_str().unwrap().to_string());
            let body = problem(response, StatusCode::SERVICE_UNAVAILABLE, "capacity").await;
            let seconds: u64 = retry_after.expect("a 503 carries Retry-After").parse().unwrap();
            assert!(seconds >= 1);
            let limit = body["limit"].as_str().unwrap();
            assert!(["max_queued_evaluations", "max_queue_wait", "max_concurrent_runs"].contains(&limit), "{body}");
            status
        }));
    }
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    for answer in burst {
        *statuses.entry(answer.await.unwrap().as_u16()).or_default() += 1;
    }
    eprintln!("1000 runs answered in {:?}: {statuses:?}", started.elapsed());
    assert_eq!(statuses.keys().copied().collect::<Vec<_>>(), vec![200, 503], "only 200s and 503s: {statuses:?}");

    // The server is itself again, and counted what it refused.
    let after = request(server, Method::POST, "/v1/run").json(&json!({"language": "javascript", "code": "6*7"})).send();
    let body: Value = after.await.unwrap().json().await.unwrap();
    assert_eq!(body["result"]["value"]["text"], "42", "{body}");
    let samples = scrape(server).await;
    let refused: f64 = samples.iter().filter(|s| s.name == "airlock_evaluations_refused_total").map(|s| s.value).sum();
    assert!(refused >= statuses[&503] as f64, "refusals counted: {refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_isolate_engine_is_a_503_naming_its_limit_not_an_error() {
    // An engine with one slot, taken by a context before the server answers.
    let setup: Setup = Box::new(|runtime| {
        Box::pin(async move {
            let sandbox = runtime.sandbox("ops-holder").await.unwrap();
            sandbox.create_context(airlock::Language::JavaScript).await.unwrap();
        })
    });
    let server = start("full-engine", ServerOptions::default(), Some(1), setup);
    let response = request(&server, Method::POST, "/v1/run")
        .json(&json!({"language": "javascript", "code": "1"}))
        .send()
        .await
        .unwrap();
    let retry_after = response.headers().get(reqwest::header::RETRY_AFTER).cloned();
    let body = problem(response, StatusCode::SERVICE_UNAVAILABLE, "capacity").await;
    assert_eq!(body["limit"], "max_concurrent_runs", "{body}");
    assert!(retry_after.is_some(), "a 503 carries Retry-After");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_open_and_readiness_says_which_check_fails() {
    require_docker();
    let server = server();
    let health = request(server, Method::GET, "/healthz").send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.json::<Value>().await.unwrap()["status"], "alive");

    // Ready once the interpreters are loaded (they may still be compiling).
    let deadline = Instant::now() + Duration::from_secs(300);
    let ready = loop {
        let response = request(server, Method::GET, "/readyz").send().await.unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        if status == StatusCode::OK {
            break body;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(Instant::now() < deadline, "never ready: {body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(ready["ready"], true);
    for check in ["store", "isolates", "containers"] {
        assert_eq!(ready[check]["ready"], true, "{ready}");
    }

    // No Docker engine behind the configured socket: not ready, and it says so.
    let tight = tight_server();
    let response = request(tight, Method::GET, "/readyz").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["ready"], false);
    assert_eq!(body["containers"]["ready"], false, "{body}");
    assert!(body["containers"]["detail"].as_str().unwrap().contains("docker"), "{body}");
    assert_eq!(body["store"]["ready"], true, "{body}");
}

/// One sample of the text format.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses Prometheus' text format strictly enough to catch a malformed line:
/// `# HELP`/`# TYPE` comments, and samples of declared families only.
fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    let valid_name = |name: &str| {
        !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let (keyword, name, rest) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap_or(""));
            assert!(valid_name(name), "bad name in {line:?}");
            if keyword == "TYPE" {
                assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&rest), "{line:?}");
                assert!(types.insert(name.to_string(), rest.to_string()).is_none(), "TYPE twice: {line:?}");
            } else {
                assert_eq!(keyword, "HELP", "{line:?}");
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other.parse().unwrap_or_else(|_| panic!("bad value: {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels: {line:?}"));
                (name, parse_labels(body, line))
            }
        };
        assert!(valid_name(name), "bad name: {line:?}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix).filter(|base| types.get(*base).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample before its TYPE: {line:?}");
        samples.push(Sample { name: name.to_string(), labels, value });
    }
    samples
}

fn parse_labels(body: &str, line: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = body.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        assert_eq!(chars.next(), Some('"'), "label value unquoted: {line:?}");
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c @ ('\\' | '"')) => value.push(c),
                    other => panic!("bad escape {other:?}: {line:?}"),
                },
                Some('"') => break,
                Some(c) => value.push(c),
                None => panic!("unterminated label value: {line:?}"),
            }
        }
        assert!(labels.insert(key, value).is_none(), "label twice: {line:?}");
        match chars.next() {
            Some(',') | None => {}
            other => panic!("unexpected {other:?} after a label: {line:?}"),
        }
    }
    labels
}

async fn scrape(server: &Server) -> Vec<Sample> {
    let response = request(server, Method::GET, "/metrics").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()[reqwest::header::CONTENT_TYPE].to_str().unwrap().to_string();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    parse_prometheus(&response.text().await.unwrap())
}

fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    samples
        .iter()
        .find(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_count_requests_by_route_and_status() {
    let server = server();
    let create = request(server, Method::POST, "/v1/sandboxes").json(&json!({"name": "ops-metrics"})).send();
    assert_eq!(create.await.unwrap().status(), StatusCode::CREATED);
    let missing = request(server, Method::GET, "/v1/sandboxes/ops-metrics-none/contexts").send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);

    let samples = scrape(server).await;
    let route = [("method", "GET"), ("route", "/v1/sandboxes/{name}/contexts"), ("status", "404")];
    let counted = find(&samples, "airlock_http_requests_total", &route).expect("the 404 is counted by its route");
    assert!(counted.value >= 1.0);
    let created = [("method", "POST"), ("route", "/v1/sandboxes"), ("status", "201")];
    assert!(find(&samples, "airlock_http_requests_total", &created).unwrap().value >= 1.0);
    let histogram = find(&samples, "airlock_http_request_duration_seconds_count", &created).unwrap();
    assert!(histogram.value >= 1.0);
    let inf = [("method", "POST"), ("route", "/v1/sandboxes"), ("status", "201"), ("le", "+Inf")];
    assert_eq!(find(&samples, "airlock_http_request_duration_seconds_bucket", &inf).unwrap().value, histogram.value);
    let sandboxes = find(&samples, "airlock_sandboxes", &[("state", "active"), ("tier", "isolate")]).unwrap();
    assert!(sandboxes.value >= 1.0, "the sandbox made above is counted");
    for tier in ["isolate", "container"] {
        assert!(find(&samples, "airlock_executions_total", &[("tier", tier)]).is_some());
        assert!(find(&samples, "airlock_cpu_seconds_total", &[("tier", tier)]).is_some());
    }
    assert!(find(&samples, "airlock_escalations_total", &[]).is_some());
    // A path no route has is one label, whatever the path.
    request(server, Method::GET, "/no/such/route/ops").send().await.unwrap();
    let samples = scrape(server).await;
    assert!(find(&samples, "airlock_http_requests_total", &[("route", "unmatched"), ("status", "404")]).is_some());
    assert!(!samples.iter().any(|s| s.labels.values().any(|v| v.contains("/no/such"))));

    // Admin-only: no token is 401, a tenant's token 403.
    let response = Client::builder().no_proxy().build().unwrap().get(format!("{}/metrics", server.root));
    problem(response.send().await.unwrap(), StatusCode::UNAUTHORIZED, "unauthorized").await;
    let tenant = TENANT.get().unwrap();
    let response = request_as(server, tenant, Method::GET, "/metrics").send().await.unwrap();
    problem(response, StatusCode::FORBIDDEN, "forbidden").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reflects_a_run_and_refuses_bad_parameters() {
    let server = server();
    let create = request(server, Method::POST, "/v1/sandboxes").json(&json!({"name": "ops-usage"})).send();
    assert_eq!(create.await.unwrap().status(), StatusCode::CREATED);
    let usage = |query: &'static str| async move {
        let response = request(server, Method::GET, &format!("/v1/usage{query}")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{query}");
        response.json::<Value>().await.unwrap()
    };
    let before = usage("?sandbox=ops-usage").await;
    assert_eq!(before["total"]["executions"], 0, "{before}");

    let code = request(server, Method::POST, "/v1/sandboxes/ops-usage/code")
        .json(&json!({"language": "javascript", "code": BUSY_JS}))
        .send()
        .await
        .unwrap();
    assert_eq!(code.status(), StatusCode::OK);

    let after = usage("?sandbox=ops-usage").await;
    assert_eq!(after["sandbox"], "ops-usage");
    assert_eq!(after["total"]["executions"], 1, "{after}");
    assert_eq!(after["isolate"]["executions"], 1, "{after}");
    assert_eq!(after["container"]["executions"], 0, "{after}");
    assert!(after["isolate"]["cpu_seconds"].as_f64().unwrap() > 0.0, "{after}");
    assert!(after["cost_usd"].as_f64().unwrap() >= 0.0);
    let all = usage("").await;
    assert!(all["total"]["executions"].as_u64().unwrap() >= 1, "{all}");
    // A window that ends before the run does not count it.
    let window = usage("?sandbox=ops-usage&since_ms=0&until_ms=1000").await;
    assert_eq!(window["total"]["executions"], 0, "{window}");

    for bad in ["?since_ms=yesterday", "?until_ms=-1", "?window=1", "?since_ms=2000&until_ms=1000"] {
        let response = request(server, Method::GET, &format!("/v1/usage{bad}")).send().await.unwrap();
        problem(response, StatusCode::BAD_REQUEST, "invalid-request").await;
    }
    let response = request(server, Method::GET, "/v1/usage?sandbox=ops-no-such").send().await.unwrap();
    problem(response, StatusCode::NOT_FOUND, "not-found").await;
    let response = request(server, Method::GET, "/v1/usage?sandbox=Not%20A%20Name").send().await.unwrap();
    problem(response, StatusCode::BAD_REQUEST, "invalid-name").await;

    // A tenant sees neither the admin's sandbox nor its usage in the totals.
    let tenant = TENANT.get().unwrap();
    let response = request_as(server, tenant, Method::GET, "/v1/usage?sandbox=ops-usage").send().await.unwrap();
    problem(response, StatusCode::NOT_FOUND, "not-found").await;
    let response = request_as(server, tenant, Method::GET, "/v1/usage").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let own: Value = response.json().await.unwrap();
    assert_eq!(own["total"]["executions"], 0, "{own}");
    // Its own sandbox's run is in its totals, and only that.
    let create = request_as(server, tenant, Method::POST, "/v1/sandboxes").json(&json!({"name": "ops-usage-tenant"}));
    assert_eq!(create.send().await.unwrap().status(), StatusCode::CREATED);
    let code = request_as(server, tenant, Method::POST, "/v1/sandboxes/ops-usage-tenant/code")
        .json(&json!({"language": "javascript", "code": "1"}));
    assert_eq!(code.send().await.unwrap().status(), StatusCode::OK);
    let own: Value = request_as(server, tenant, Method::GET, "/v1/usage").send().await.unwrap().json().await.unwrap();
    assert_eq!(own["total"]["executions"], 1, "{own}");
    assert_eq!(own["isolate"]["executions"], 1, "{own}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_past_the_execution_timeout_is_a_504_and_file_transfers_are_not_cut() {
    let server = tight_server();
    // The run's own deadline (30 s by default) is far off: the server's limit ends it.
    let started = Instant::now();
    let response = request(server, Method::POST, "/v1/run")
        .json(&json!({"language": "javascript", "code": "while (true) {}"}))
        .send()
        .await
        .unwrap();
    let body = problem(response, StatusCode::GATEWAY_TIMEOUT, "timeout").await;
    assert_eq!(body["limit"], "execution_timeout", "{body}");
    assert!(started.elapsed() < Duration::from_secs(20), "cut by the server, not by the run's deadline");

    // A plain request's limit is zero here, yet a file download is not subject to it.
    let response = request(server, Method::GET, "/v1/sandboxes/ops-tight/files/data.txt").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.bytes().await.unwrap().len(), 1 << 20);
    // Nor is health.
    assert_eq!(request(server, Method::GET, "/healthz").send().await.unwrap().status(), StatusCode::OK);
}
