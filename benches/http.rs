//! What the HTTP API (`airlock serve`) adds over the library doing the same
//! work in the same process, measured in one run so both sides see the same
//! machine:
//!
//! 1. JavaScript one-shot `POST /v1/run` under load from `wrk` (50 connections
//!    on loopback) against the library's back-to-back rate (`Interpreters::run`
//!    with a fresh scratch workspace, as the route does);
//! 2. an evaluation in an existing context: `POST /v1/sandboxes/{name}/code`
//!    with `context` against `Sandbox::code_in`, one request at a time over a
//!    kept-alive connection, in alternating blocks;
//! 3. an exec round trip to a running container: `POST /v1/sandboxes/{name}/exec`
//!    (`true`) against `Sandbox::exec`, the same way.
//!
//! Run (as root, after `airlock setup`; `apt-get install wrk`):
//! `cargo bench --bench http` (add `-- --seconds 20 --samples 4000` to change
//! the load time and the paired sample count).
//! Under `cargo test` it runs a short pass of parts 2 and 3 and a short load
//! from an in-process client instead of wrk, checking that every answer was right.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a bench may

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use airlock::runtime::{DiskOptions, QuotaMode, Runtime, RuntimeOptions, SandboxConfig, TierPreference};
use airlock::wasm::interpreter::{Interpreters, default_interpreter_dir};
use airlock::{ExecRequest, Language, Limits, Workspace};
use serde_json::{Value, json};

/// Connections `wrk` keeps open for the one-shot load (the figure).
const LOAD_CONNECTIONS: usize = 50;
/// Requests alternate with library calls in blocks this long, so drift on a
/// shared machine touches both sides alike.
const PAIR_BLOCK: usize = 50;

struct Settings {
    benching: bool,
    load_seconds: u64,
    samples: usize,
}

fn settings() -> Settings {
    let args: Vec<String> = std::env::args().collect();
    let benching = args.iter().any(|arg| arg == "--bench");
    let value = |name: &str, default: u64| {
        args.iter()
            .position(|arg| arg == name)
            .and_then(|at| args.get(at + 1))
            .map(|text| text.parse().unwrap_or_else(|_| panic!("{name} takes a number")))
            .unwrap_or(default)
    };
    if benching {
        Settings { benching, load_seconds: value("--seconds", 10), samples: value("--samples", 2000) as usize }
    } else {
        Settings { benching, load_seconds: 2, samples: 40 }
    }
}

/// Percentiles and spread of a set of durations.
struct Summary {
    count: usize,
    p50: Duration,
    p90: Duration,
    p99: Duration,
    /// Interquartile range: the spread reported beside each median.
    iqr: Duration,
}

impl Summary {
    fn of(mut samples: Vec<Duration>) -> Self {
        assert!(!samples.is_empty(), "no samples");
        samples.sort();
        let at = |fraction: f64| samples[((samples.len() - 1) as f64 * fraction).round() as usize];
        Self { count: samples.len(), p50: at(0.5), p90: at(0.9), p99: at(0.99), iqr: at(0.75) - at(0.25) }
    }

    fn row(&self, what: &str) -> String {
        format!(
            "{what:<44} n={:<6} p50 {:>9.3} ms  p90 {:>9.3} ms  p99 {:>9.3} ms  IQR {:>8.3} ms",
            self.count,
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.iqr)
        )
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The server on loopback over `runtime`'s home, in this process.
struct Server {
    base: String,
    token: Option<String>,
}

async fn start_server(runtime: Runtime) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let home = runtime.home().to_path_buf();
    // As `airlock serve` does on start: every /v1 route needs a token.
    airlock_server::ensure_admin_token(&runtime).unwrap();
    let state = airlock_server::AppState::new(runtime);
    tokio::spawn(airlock_server::serve(listener, state, std::future::pending()));
    Server { base: format!("http://{address}/v1"), token: admin_token(&home) }
}

/// The admin token `serve` keeps in the home, once auth is on.
fn admin_token(home: &Path) -> Option<String> {
    std::fs::read_to_string(home.join("admin.token")).ok().map(|token| token.trim().to_string())
}

impl Server {
    async fn post(&self, client: &reqwest::Client, path: &str, body: &Value) -> Value {
        let mut request = client.post(format!("{}{path}", self.base)).json(body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let answer: Value = response.json().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {answer}");
        answer
    }
}

/// Library one-shot runs back to back for `seconds`: runs per second.
async fn library_one_shot_rate(interpreters: &Interpreters, seconds: u64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut runs = 0u64;
    while Instant::now() < deadline {
        let scratch = tempfile::Builder::new().prefix("airlock-run-").tempdir().unwrap();
        let workspace = Workspace::open(scratch.path()).unwrap();
        let outcome = interpreters.run(Language::JavaScript, workspace, "40 + 2", Limits::default()).await.unwrap();
        assert!(matches!(outcome.result, airlock::EvalResult::Ok { .. }), "{:?}", outcome.result);
        tokio::task::spawn_blocking(move || drop(scratch));
        runs += 1;
    }
    runs as f64 / started.elapsed().as_secs_f64()
}

/// What `wrk` reported for the one-shot load.
struct WrkReport {
    requests_per_second: f64,
    p50: String,
    p99: String,
    non_2xx: u64,
    raw: String,
}

fn wrk_one_shot(server: &Server, seconds: u64) -> WrkReport {
    let script = tempfile::Builder::new().suffix(".lua").tempfile().unwrap();
    let auth = server.token.as_ref().map(|t| format!("wrk.headers[\"Authorization\"] = \"Bearer {t}\"\n")).unwrap_or_default();
    std::fs::write(
        script.path(),
        format!(
            "wrk.method = \"POST\"\nwrk.body = '{{\"language\":\"javascript\",\"code\":\"40 + 2\"}}'\n\
             wrk.headers[\"Content-Type\"] = \"application/json\"\n{auth}"
        ),
    )
    .unwrap();
    let output = Command::new("wrk")
        .args(["-t2", &format!("-c{LOAD_CONNECTIONS}"), &format!("-d{seconds}s"), "--latency", "-s"])
        .arg(script.path())
        .arg(format!("{}/run", server.base))
        .output()
        .unwrap_or_else(|e| panic!("running wrk (apt-get install wrk): {e}"));
    let raw = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "wrk: {raw} {}", String::from_utf8_lossy(&output.stderr));
    let field = |prefix: &str| {
        raw.lines()
            .map(str::trim)
            .find_map(|line| line.strip_prefix(prefix))
            .map(|rest| rest.split_whitespace().next().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    WrkReport {
        requests_per_second: field("Requests/sec:").parse().unwrap_or(0.0),
        p50: field("50%"),
        p99: field("99%"),
        non_2xx: field("Non-2xx or 3xx responses:").parse().unwrap_or(0),
        raw,
    }
}

/// The same load from an in-process client (test mode, where wrk may be
/// absent): requests per second and how many answers were not 200.
async fn client_one_shot(server: &Arc<Server>, seconds: u64) -> (f64, u64) {
    let client = reqwest::Client::new();
    let done = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..LOAD_CONNECTIONS {
        let (client, server, done, refused) = (client.clone(), server.clone(), done.clone(), refused.clone());
        workers.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let mut request = client
                    .post(format!("{}/run", server.base))
                    .json(&json!({ "language": "javascript", "code": "40 + 2" }));
                if let Some(token) = &server.token {
                    request = request.bearer_auth(token);
                }
                let response = request.send().await.unwrap();
                let status = response.status();
                assert!(status.is_success() || status == 503, "a one-shot under load answered {status}");
                if status.is_success() {
                    let answer: Value = response.json().await.unwrap();
                    assert_eq!(answer["result"]["kind"], "ok", "{answer}");
                } else {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    (done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64(), refused.load(Ordering::Relaxed))
}

fn main() {
    let settings = settings();
    let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
    tokio.block_on(run(settings));
}

async fn run(settings: Settings) {
    let home = tempfile::Builder::new().prefix("airlock-bench-http-").tempdir().unwrap();
    let mut options = RuntimeOptions::new(home.path());
    options.isolates.cache_dir = Some(Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-cache"));
    // Quotas mount an image per home; this bench measures the API, not the disk.
    options.disk = DiskOptions { quotas: QuotaMode::Off, ..DiskOptions::default() };
    let runtime = Runtime::open(options).await.expect("opening the runtime (Docker running? run `airlock setup`)");
    let library = runtime.clone();
    let interpreters = Interpreters::new(runtime.isolate_engine().clone(), default_interpreter_dir());
    let server = Arc::new(start_server(runtime).await);
    let client = reqwest::Client::new();
    println!("# HTTP API against the library, same process, loopback");

    // 1. One-shot JavaScript: library back to back, then the server under load.
    library_one_shot_rate(&interpreters, 1).await; // warm-up: compiled and cached
    let library_rate = library_one_shot_rate(&interpreters, settings.load_seconds).await;
    println!("library one-shot JavaScript, back to back: {library_rate:.0} runs/s");
    if settings.benching {
        let report = wrk_one_shot(&server, settings.load_seconds);
        println!(
            "POST /v1/run (wrk, {LOAD_CONNECTIONS} connections): {:.0} req/s = {:.0}% of the library; p50 {} p99 {}; non-2xx {}",
            report.requests_per_second,
            100.0 * report.requests_per_second / library_rate,
            report.p50,
            report.p99,
            report.non_2xx
        );
        println!("{}", report.raw.trim_end());
    } else {
        let (rate, refused) = client_one_shot(&server, settings.load_seconds).await;
        println!("POST /v1/run (in-process client, {LOAD_CONNECTIONS} connections): {rate:.0} req/s, {refused} refused");
    }

    // 2. An evaluation in an existing context, paired.
    let name = "bench-http-context";
    let sandbox = library.sandbox(name).await.unwrap();
    let library_context = sandbox.create_context(Language::Python).await.unwrap();
    let created = server.post(&client, &format!("/sandboxes/{name}/contexts"), &json!({ "language": "python" })).await;
    let http_context = created["id"].as_str().unwrap().to_string();
    let code = "x = 1 + 1";
    let (mut via_library, mut via_http) = (Vec::new(), Vec::new());
    let body = json!({ "context": http_context, "code": code });
    for _ in 0..PAIR_BLOCK {
        sandbox.code_in(&library_context, code).await.unwrap();
        server.post(&client, &format!("/sandboxes/{name}/code"), &body).await;
    }
    while via_library.len() < settings.samples {
        for _ in 0..PAIR_BLOCK.min(settings.samples) {
            let started = Instant::now();
            let outcome = sandbox.code_in(&library_context, code).await.unwrap();
            via_library.push(started.elapsed());
            assert!(matches!(outcome.outcome.result, airlock::EvalResult::Ok { .. }), "{:?}", outcome.outcome.result);
        }
        for _ in 0..PAIR_BLOCK.min(settings.samples) {
            let started = Instant::now();
            let answer = server.post(&client, &format!("/sandboxes/{name}/code"), &body).await;
            via_http.push(started.elapsed());
            assert_eq!(answer["result"]["kind"], "ok", "{answer}");
        }
    }
    let (library_eval, http_eval) = (Summary::of(via_library), Summary::of(via_http));
    println!("{}", library_eval.row("eval in a context: library"));
    println!("{}", http_eval.row("eval in a context: POST .../code"));
    println!("eval: added at p50 {:.0} µs", (http_eval.p50.as_secs_f64() - library_eval.p50.as_secs_f64()) * 1e6);

    // 3. An exec round trip to a running container, paired.
    let name = "bench-http-exec";
    let config = SandboxConfig { tier: TierPreference::Container, ..SandboxConfig::default() };
    let sandbox = library.sandbox_with(name, config).await.unwrap();
    let request = || ExecRequest::new("true");
    let body = json!({ "command": "true" });
    let samples = settings.samples / 4; // a container round trip is slower; fewer suffice
    let (mut via_library, mut via_http) = (Vec::new(), Vec::new());
    for _ in 0..PAIR_BLOCK.min(samples) {
        sandbox.exec(request()).await.unwrap();
        server.post(&client, &format!("/sandboxes/{name}/exec"), &body).await;
    }
    while via_library.len() < samples.max(1) {
        for _ in 0..PAIR_BLOCK.min(samples.max(1)) {
            let started = Instant::now();
            let ran = sandbox.exec(request()).await.unwrap();
            via_library.push(started.elapsed());
            assert_eq!(ran.outcome.exit_code(), Some(0));
        }
        for _ in 0..PAIR_BLOCK.min(samples.max(1)) {
            let started = Instant::now();
            let answer = server.post(&client, &format!("/sandboxes/{name}/exec"), &body).await;
            via_http.push(started.elapsed());
            assert_eq!(answer["exit_code"], 0, "{answer}");
            assert_eq!(answer["placement"]["tier"], "container", "{answer}");
        }
    }
    let (library_exec, http_exec) = (Summary::of(via_library), Summary::of(via_http));
    println!("{}", library_exec.row("exec `true` in a container: library"));
    println!("{}", http_exec.row("exec `true` in a container: POST .../exec"));
    println!("exec: added at p50 {:.0} µs", (http_exec.p50.as_secs_f64() - library_exec.p50.as_secs_f64()) * 1e6);

    library.destroy("bench-http-context").await.unwrap();
    library.destroy("bench-http-exec").await.unwrap();
}
