//! Egress from isolates (issue 13, point 3): JavaScript's `fetch` and a raw
//! wasi:http guest in a sandbox go out through the runtime's hook, under the
//! sandbox's network policy, to upstream servers on the host's loopback named
//! explicitly in each test's policy (`connect_to`), never anything beyond.
//!
//! - an allowed GET returns the body; a header rule's credential reaches the
//!   upstream and the guest cannot see it (it replaces the guest's own);
//! - a denied host is a clear error in the guest naming the host and the
//!   policy, not an escalation (the sandbox never starts a container);
//! - a policy narrowed between two evaluations in one context applies to the second;
//! - the response-size cap gives an error naming the limit;
//! - an internal address no rule names is refused;
//! - a guest holding many responses open unread is refused past the in-flight cap.
//!
//! Needs the interpreters built (`scripts/build-guests.sh`); no Docker.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "egress/upstream.rs"]
mod upstream;

use std::path::Path;
use std::sync::Arc;

use airlock::ExecRequest;
use airlock::runtime::{CodeOutcome, NetworkPolicy, Runtime, RuntimeOptions, Sandbox, SandboxConfig};
use airlock_core::{EvalResult, Language, TierKind};
use serde_json::json;
use upstream::{Answer, Seen, Upstream};

/// The credential the upstream wants; it must never be visible to the guest.
const TOKEN: &str = "tok-3b8e51a0-never-inside-the-isolate";

/// One more byte than the isolates' response cap.
const TOO_BIG: usize = airlock_wasm::DEFAULT_MAX_RESPONSE_BYTES as usize + 1;

async fn runtime_in(home: &Path) -> Runtime {
    let mut options = RuntimeOptions::new(home);
    options.isolates.cache_dir = Some(Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-cache"));
    Runtime::open(options).await.expect("opening the runtime")
}

fn policy(value: serde_json::Value) -> NetworkPolicy {
    serde_json::from_value(value).unwrap()
}

fn routes() -> upstream::Routes {
    Arc::new(|seen: &Seen| match seen.path.as_str() {
        "/hello" => Answer::ok("hello from upstream").with_header("x-upstream", "yes"),
        "/json" => Answer::ok(r#"{"answer":42}"#).with_header("content-type", "application/json"),
        "/big" => Answer::ok(vec![b'x'; TOO_BIG]),
        "/small" => Answer::ok(vec![b'y'; 64 * 1024]),
        _ => Answer::status(404, "not found"),
    })
}

/// The sandbox's one allowed host, `upstream.test`, reaching `upstream`,
/// with a rule injecting the token.
fn allow_upstream(upstream: &Upstream) -> NetworkPolicy {
    let p = upstream.port();
    policy(json!({ "allow": [
        { "host": "upstream.test", "ports": [p], "connect_to": format!("127.0.0.1:{p}"),
          "headers": [{ "name": "Authorization", "secret": "upstream-token", "prefix": "Bearer " }] },
    ]}))
}

async fn sandbox_allowing(runtime: &Runtime, name: &str, upstream: &Upstream) -> Sandbox {
    runtime.set_secret("upstream-token", TOKEN).unwrap();
    // Auto: a needs-escalation answer would start a container, which these
    // tests must never see (and which would fail here without Docker).
    let sandbox = runtime.sandbox_with(name, SandboxConfig::default()).await.unwrap();
    sandbox.set_network_policy(allow_upstream(upstream)).unwrap();
    sandbox
}

fn value_text(outcome: &CodeOutcome) -> String {
    match &outcome.outcome.result {
        EvalResult::Ok { value: Some(value) } => value.text.clone(),
        other => {
            panic!("expected a value, got {other:?} (stderr {})", String::from_utf8_lossy(&outcome.outcome.stderr))
        }
    }
}

fn runtime_error(outcome: &CodeOutcome) -> String {
    assert_eq!(outcome.placement.tier, TierKind::Isolate, "{:?}", outcome.placement);
    assert!(outcome.placement.escalated.is_none(), "{:?}", outcome.placement);
    match &outcome.outcome.result {
        EvalResult::RuntimeError(error) => error.message.clone(),
        other => panic!("expected a runtime error, got {other:?}"),
    }
}

/// Everything the guest could have seen of one evaluation.
fn all_visible(outcome: &CodeOutcome) -> String {
    format!(
        "{:?}{}{}",
        outcome.outcome.result,
        String::from_utf8_lossy(&outcome.outcome.stdout),
        String::from_utf8_lossy(&outcome.outcome.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_fetch_allowed_injected_denied_and_capped() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let up = Upstream::http(routes()).await;
    let sandbox = sandbox_allowing(&runtime, "js-fetch", &up).await;
    let p = up.port();

    // Allowed: the body comes back, and the rule replaced the guest's own Authorization.
    let code = format!(
        r#"fetch("http://upstream.test:{p}/hello", {{ headers: {{ Authorization: "Bearer forged" }} }})
             .then(r => r.text().then(t => [r.status, r.ok, r.headers.get("X-Upstream"), t].join("|")))"#
    );
    let outcome = sandbox.code(Language::JavaScript, &code).await.unwrap();
    assert_eq!(value_text(&outcome), "\"200|true|yes|hello from upstream\"");
    let seen = up.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].header("authorization"), Some(format!("Bearer {TOKEN}").as_str()));
    assert!(!all_visible(&outcome).contains(TOKEN));

    // A POST with a body.
    let code = format!(r#"fetch("http://upstream.test:{p}/hello", {{ method: "POST", body: "x=1" }}).then(r => r.status)"#);
    assert_eq!(value_text(&sandbox.code(Language::JavaScript, &code).await.unwrap()), "200");
    assert_eq!(up.seen()[1].method, "POST");

    // The guest cannot read the credential from the response, its headers or anything global.
    let code = format!(
        r#"fetch("http://upstream.test:{p}/json").then(async r => {{
             const headers = []; r.headers.forEach((v, k) => headers.push(k + "=" + v));
             const body = await r.json();
             return JSON.stringify({{ headers, body, globals: Object.getOwnPropertyNames(globalThis) }});
           }})"#
    );
    let outcome = sandbox.code(Language::JavaScript, &code).await.unwrap();
    let text = value_text(&outcome);
    assert!(text.contains("answer") && text.contains("42"), "{text}");
    assert!(!all_visible(&outcome).contains(TOKEN), "{text}");
    assert!(!all_visible(&outcome).contains("upstream-token"), "{text}");

    // Denied host: the promise rejects with an Error naming the host and the policy.
    let code = format!(r#"fetch("http://denied.test:{p}/hello").then(r => r.text())"#);
    let outcome = sandbox.code(Language::JavaScript, &code).await.unwrap();
    let message = runtime_error(&outcome);
    assert!(message.contains("denied.test") && message.contains("network policy"), "{message}");
    // ... and catchable as an ordinary error.
    let code = format!(r#"fetch("http://denied.test:{p}/").then(() => "sent", e => "caught: " + e.message)"#);
    let text = value_text(&sandbox.code(Language::JavaScript, &code).await.unwrap());
    assert!(text.contains("caught: ") && text.contains("denied.test"), "{text}");
    assert_eq!(up.seen().len(), 3, "nothing denied reached the upstream");
    // Decisions of the isolate's hook are counted with the proxy's, in usage.
    let query = airlock::runtime::UsageQuery { sandbox: Some("js-fetch".into()), ..Default::default() };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut egress = runtime.usage(&query).unwrap().egress;
    while egress.allowed + egress.denied < 5 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        egress = runtime.usage(&query).unwrap().egress;
    }
    assert_eq!((egress.allowed, egress.denied), (3, 2), "{egress:?}");
    assert!(egress.bytes_down > 0, "{egress:?}");

    // The response-size cap: a clear error naming the limit.
    let code = format!(r#"fetch("http://upstream.test:{p}/big").then(r => r.text()).then(t => t.length)"#);
    let message = runtime_error(&sandbox.code(Language::JavaScript, &code).await.unwrap());
    let limit = airlock_wasm::DEFAULT_MAX_RESPONSE_BYTES.to_string();
    assert!(message.contains(&limit) && message.contains("limit"), "{message}");

    // No container was ever started for this sandbox.
    assert!(sandbox.info().container_id.is_none(), "an isolate's fetch started a container");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_narrowed_between_evaluations_applies_to_the_next() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let up = Upstream::http(routes()).await;
    let sandbox = sandbox_allowing(&runtime, "js-narrowed", &up).await;
    let p = up.port();
    let context = sandbox.create_context(Language::JavaScript).await.unwrap();
    let code = format!(r#"fetch("http://upstream.test:{p}/hello").then(r => r.text())"#);

    let first = sandbox.code_in(&context, &code).await.unwrap();
    assert_eq!(value_text(&first), "\"hello from upstream\"");
    sandbox.set_network_policy(NetworkPolicy::deny_all()).unwrap();
    let second = sandbox.code_in(&context, &code).await.unwrap();
    let message = runtime_error(&second);
    assert!(message.contains("upstream.test") && message.contains("network policy"), "{message}");
    assert_eq!(up.seen().len(), 1);

    // Widened again: the same context reaches it once more.
    sandbox.set_network_policy(allow_upstream(&up)).unwrap();
    let third = sandbox.code_in(&context, &code).await.unwrap();
    assert_eq!(value_text(&third), "\"hello from upstream\"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_internal_address_no_rule_names_is_refused() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let up = Upstream::http(routes()).await;
    let sandbox = runtime.sandbox_with("js-internal", SandboxConfig::default()).await.unwrap();
    let p = up.port();
    // `localhost` is allowed by name, but it resolves to loopback, which no rule names.
    sandbox.set_network_policy(policy(json!({ "allow": [{ "host": "localhost", "ports": [p] }] }))).unwrap();
    let code = format!(r#"fetch("http://localhost:{p}/hello").then(r => r.text())"#);
    let message = runtime_error(&sandbox.code(Language::JavaScript, &code).await.unwrap());
    assert!(message.contains("localhost") && message.contains("internal address"), "{message}");
    assert!(up.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_sandbox_every_request_is_refused() {
    let home = tempfile::tempdir().unwrap();
    let up = Upstream::http(routes()).await;
    let workspace = airlock_core::Workspace::create(home.path().join("bare")).unwrap();
    let config = airlock_wasm::EngineConfig {
        cache_dir: Some(Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-cache")),
        ..Default::default()
    };
    let engine = airlock_wasm::IsolateEngine::new(config).unwrap();
    let interpreters =
        airlock_wasm::interpreter::Interpreters::new(engine, Path::new(env!("CARGO_MANIFEST_DIR")).join("guests/out"));
    let p = up.port();
    let code = format!(r#"fetch("http://127.0.0.1:{p}/hello").then(r => r.text())"#);
    let outcome = interpreters.run(Language::JavaScript, workspace, &code, Default::default()).await.unwrap();
    let EvalResult::RuntimeError(error) = &outcome.result else { panic!("{:?}", outcome.result) };
    assert!(error.message.contains("127.0.0.1") && error.message.contains("deny-all"), "{}", error.message);
    assert!(up.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_holding_responses_unread_is_bounded() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let up = Upstream::http(routes()).await;
    let sandbox = sandbox_allowing(&runtime, "http-hog", &up).await;
    let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("guests/out/http-hog.wasm");
    let bytes = std::fs::read(&guest).expect("guests/out/http-hog.wasm (run scripts/build-guests.sh)");
    sandbox.write_file("http-hog.wasm", &bytes).await.unwrap();
    let authority = format!("upstream.test:{}", up.port());
    let run = sandbox.exec(ExecRequest::new("http-hog.wasm").args([authority.as_str(), "/small", "20"])).await.unwrap();
    assert_eq!(run.placement.tier, TierKind::Isolate);
    let out = run.outcome.stdout_text();
    let lines: Vec<&str> = out.lines().collect();
    let max = airlock_wasm::DEFAULT_MAX_IN_FLIGHT;
    assert_eq!(lines.len(), 20, "{out}");
    assert!(lines[..max].iter().all(|line| *line == "ok 200"), "{out}");
    assert!(
        lines[max..].iter().all(|line| line.starts_with("error") && line.contains(&format!("{max} requests open"))),
        "{out}"
    );
    assert_eq!(up.seen().len(), max, "refused requests never left the host");

    // Bodies past the size cap, held unread: the same bound, and the run ends normally.
    let run = sandbox.exec(ExecRequest::new("http-hog.wasm").args([authority.as_str(), "/big", "10"])).await.unwrap();
    assert_eq!(run.outcome.exit_code(), Some(0), "{:?}", run.outcome.termination);
    let out = run.outcome.stdout_text();
    assert_eq!(out.lines().filter(|line| *line == "ok 200").count(), max, "{out}");
    assert_eq!(out.lines().filter(|line| line.contains(&format!("{max} requests open"))).count(), 10 - max, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_fetch_urllib_and_http_client() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let up = Upstream::http(routes()).await;
    let sandbox = sandbox_allowing(&runtime, "py-fetch", &up).await;
    let p = up.port();
    let context = sandbox.create_context(Language::Python).await.unwrap();
    let py = |code: String| {
        let (sandbox, context) = (sandbox.clone(), context.clone());
        async move { sandbox.code_in(&context, &code).await.unwrap() }
    };

    // airlock.fetch: the body, the status, the upstream's header; the rule replaced the guest's Authorization.
    let outcome = py(format!(
        "import airlock\nr = airlock.fetch('http://upstream.test:{p}/hello', headers={{'Authorization': 'Bearer forged'}})\n\
         (r.status, r.ok, r.header('X-Upstream'), r.text())"
    ))
    .await;
    assert_eq!(value_text(&outcome), "(200, True, 'yes', 'hello from upstream')");
    assert_eq!(up.seen()[0].header("authorization"), Some(format!("Bearer {TOKEN}").as_str()));
    assert!(!all_visible(&outcome).contains(TOKEN));

    // urllib.request.urlopen and http.client, through the same hook.
    let outcome = py(format!(
        "import urllib.request\nwith urllib.request.urlopen('http://upstream.test:{p}/json') as r:\n    got = (r.status, r.read())\ngot"
    ))
    .await;
    assert_eq!(value_text(&outcome), "(200, b'{\"answer\":42}')");
    let outcome = py(format!(
        "import http.client\nc = http.client.HTTPConnection('upstream.test', {p})\nc.request('POST', '/hello', body=b'x')\n\
         r = c.getresponse()\n(r.status, r.getheader('x-upstream'), r.read())"
    ))
    .await;
    assert_eq!(value_text(&outcome), "(200, 'yes', b'hello from upstream')");
    let seen = up.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.iter().all(|s| s.header("authorization") == Some(format!("Bearer {TOKEN}").as_str())));
    // Nothing the guest can reach holds the credential.
    let outcome = py("import os\nrepr(dict(os.environ)) + repr(globals().keys())".into()).await;
    assert!(!all_visible(&outcome).contains(TOKEN));

    // Denied: an error naming the host and the policy, from each way in; not an escalation.
    for code in [
        format!("import airlock\nairlock.fetch('http://denied.test:{p}/')"),
        format!("import urllib.request\nurllib.request.urlopen('http://denied.test:{p}/')"),
        format!("import http.client\nc = http.client.HTTPConnection('denied.test', {p})\nc.request('GET', '/')"),
    ] {
        let message = runtime_error(&py(code.clone()).await);
        assert!(message.contains("denied.test") && message.contains("network policy"), "{code}: {message}");
    }

    // The response-size cap names the limit.
    let message = runtime_error(&py(format!("import airlock\nairlock.fetch('http://upstream.test:{p}/big')")).await);
    assert!(message.contains(&airlock_wasm::DEFAULT_MAX_RESPONSE_BYTES.to_string()) && message.contains("limit"), "{message}");

    // Narrowed between two evaluations of the same context.
    sandbox.set_network_policy(NetworkPolicy::deny_all()).unwrap();
    let message = runtime_error(&py(format!("import airlock\nairlock.fetch('http://upstream.test:{p}/hello')")).await);
    assert!(message.contains("upstream.test") && message.contains("network policy"), "{message}");
    assert_eq!(up.seen().len(), 4, "only the capped request went out since");
    assert!(sandbox.info().container_id.is_none());
}
