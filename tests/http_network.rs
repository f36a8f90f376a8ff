//! A sandbox's network policy and the runtime's secrets over the HTTP API
//! (in process, on loopback, through a real client):
//!
//! - `GET|PUT /v1/sandboxes/{name}/network` round trip, and a change reaches
//!   the sandbox's policy watch (what the egress proxy reads) at once;
//! - JSON that is not a valid policy is `422 invalid-policy`, and nothing changes;
//! - another tenant's sandbox is `404`, exactly like one that does not exist,
//!   for reading and for changing its policy; a tenant may not name secrets;
//! - `/v1/secrets` is for admin tokens only (`403` for a tenant's), lists
//!   names and never values, and no answer ever carries a value.
//!
//! Nothing here runs a sandbox's code: no Docker engine is needed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use airlock::runtime::{DiskOptions, QuotaMode, Runtime, RuntimeOptions};
use reqwest::{Client, Method, RequestBuilder, StatusCode};
use serde_json::{Value, json};

struct Shared {
    base: String,
    home: PathBuf,
    admin: String,
    alice: String,
    bob: String,
    runtime: Runtime,
}

/// The test binary's server (in process, ephemeral loopback port, temporary home).
fn server() -> &'static Shared {
    static SERVER: OnceLock<Shared> = OnceLock::new();
    SERVER.get_or_init(|| {
        let parent = Path::new(env!("CARGO_TARGET_TMPDIR")).join("http-network-homes");
        let _ = std::fs::remove_dir_all(&parent);
        std::fs::create_dir_all(&parent).unwrap();
        let home: PathBuf = tempfile::Builder::new().prefix("home-").tempdir_in(&parent).unwrap().keep();
        let (sender, receiver) = std::sync::mpsc::channel::<(SocketAddr, Runtime)>();
        let runtime_home = home.clone();
        std::thread::spawn(move || {
            let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            tokio.block_on(async move {
                let mut options = RuntimeOptions::new(&runtime_home);
                options.disk = DiskOptions { quotas: QuotaMode::Off, ..DiskOptions::default() };
                options.reconcile = false;
                let runtime = Runtime::open(options).await.unwrap();
                airlock_server::ensure_admin_token(&runtime).unwrap();
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                sender.send((listener.local_addr().unwrap(), runtime.clone())).unwrap();
                let state = airlock_server::AppState::new(runtime);
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

fn request(token: &str, method: Method, path: &str) -> RequestBuilder {
    Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .request(method, format!("{}/v1{path}", server().base))
        .bearer_auth(token)
}

/// Status and JSON body (`null` when empty).
async fn call(token: &str, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let mut builder = request(token, method, path);
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
    let (status, body) = call(token, Method::POST, "/sandboxes", Some(json!({ "name": name }))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

fn network(name: &str) -> String {
    format!("/sandboxes/{name}/network")
}

/// Asserts a problem answer with `status` and `code`; returns its detail.
fn problem(answer: &(StatusCode, Value), status: StatusCode, code: &str) -> String {
    assert_eq!(answer.0, status, "{}", answer.1);
    assert_eq!(answer.1["code"], code, "{}", answer.1);
    answer.1["detail"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_round_trips_over_http_and_reaches_the_watch_at_once() {
    let shared = server();
    create(&shared.admin, "net-round").await;
    assert_eq!(call(&shared.admin, Method::GET, &network("net-round"), None).await, (StatusCode::OK, json!({})));
    let mut watch = shared.runtime.network_policy_watch("net-round").unwrap();
    watch.borrow_and_update();

    let policy = json!({
        "allow": [
            { "host": "*.PyPI.org", "ports": [443, 8443], "methods": ["GET"] },
            { "host": "registry.test", "connect_to": "127.0.0.1:4873" },
        ],
        "deny": ["evil.pypi.org"],
    });
    let (status, stored) = call(&shared.admin, Method::PUT, &network("net-round"), Some(policy)).await;
    assert_eq!(status, StatusCode::OK, "{stored}");
    assert_eq!(stored["allow"][0]["host"], "*.pypi.org", "patterns are normalised");
    assert_eq!(call(&shared.admin, Method::GET, &network("net-round"), None).await, (StatusCode::OK, stored.clone()));
    let (_, info) = call(&shared.admin, Method::GET, "/sandboxes/net-round", None).await;
    assert_eq!(info["config"]["policy"]["network"], stored);
    // What the proxy reads has it already.
    assert!(watch.has_changed().unwrap(), "the watch did not see the change");
    let seen = watch.borrow_and_update().clone();
    assert!(matches!(seen.decide("files.pypi.org", 8443, Some("GET")), airlock::runtime::Verdict::Allow(_)));
    assert!(matches!(seen.decide("evil.pypi.org", 443, Some("GET")), airlock::runtime::Verdict::Deny(_)));

    // Back to deny-all with `{}`.
    assert_eq!(
        call(&shared.admin, Method::PUT, &network("net-round"), Some(json!({}))).await,
        (StatusCode::OK, json!({}))
    );
    assert!(watch.borrow_and_update().allow.is_empty());
    // An unknown sandbox.
    let missing = call(&shared.admin, Method::GET, &network("net-nobody"), None).await;
    problem(&missing, StatusCode::NOT_FOUND, "not-found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_is_422_and_changes_nothing() {
    let shared = server();
    create(&shared.admin, "net-strict").await;
    let first = json!({ "allow": [{ "host": "pypi.org" }] });
    assert_eq!(call(&shared.admin, Method::PUT, &network("net-strict"), Some(first.clone())).await.0, StatusCode::OK);
    let mut watch = shared.runtime.network_policy_watch("net-strict").unwrap();
    watch.borrow_and_update();

    let too_many: Vec<Value> = (0..=airlock::runtime::MAX_ALLOW_RULES).map(|_| json!({ "host": "a.test" })).collect();
    let refused = [
        (json!({ "allow": [{ "host": "a.test", "ports": [0] }] }), "port 0"),
        (json!({ "allow": [{ "host": "a.test" }], "bogus": true }), "bogus"),
        (json!({ "allow": [{ "host": "a.test", "extra": 1 }] }), "extra"),
        (json!({ "allow": [{ "host": "not a host" }] }), "not a host"),
        (json!({ "allow": [{ "host": "a.test", "methods": ["get"] }] }), "get"),
        (json!({ "allow": [{ "host": "a.test", "headers": [{ "name": "Host", "secret": "x" }] }] }), "Host"),
        (json!({ "allow": too_many }), "allow rules"),
        (
            json!({ "allow": [{ "host": "a.test", "headers": [{ "name": "Authorization", "secret": "net-none" }] }] }),
            "net-none",
        ),
        (json!("deny-all"), "invalid type"),
    ];
    for (body, expected) in refused {
        let answer = call(&shared.admin, Method::PUT, &network("net-strict"), Some(body.clone())).await;
        let detail = problem(&answer, StatusCode::UNPROCESSABLE_ENTITY, "invalid-policy");
        assert!(detail.contains(expected), "{body}: {detail}");
    }
    // Not JSON at all: the usual 400 / 415.
    let malformed = request(&shared.admin, Method::PUT, &network("net-strict"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    let text = request(&shared.admin, Method::PUT, &network("net-strict")).body("{}").send().await.unwrap();
    assert_eq!(text.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    assert_eq!(call(&shared.admin, Method::GET, &network("net-strict"), None).await, (StatusCode::OK, first));
    assert!(!watch.has_changed().unwrap(), "a refused policy was published");
    // At creation too: a config whose policy is invalid or names a missing
    // secret is 422, and no sandbox is made.
    for network in [
        json!({ "allow": [{ "host": "a.test", "ports": [0] }] }),
        json!({ "allow": [{ "host": "a.test", "headers": [{ "name": "X-Key", "secret": "net-none" }] }] }),
    ] {
        let body = json!({ "name": "net-born", "config": { "policy": { "network": network } } });
        let answer = call(&shared.admin, Method::POST, "/sandboxes", Some(body)).await;
        problem(&answer, StatusCode::UNPROCESSABLE_ENTITY, "invalid-policy");
        assert_eq!(call(&shared.admin, Method::GET, "/sandboxes/net-born", None).await.0, StatusCode::NOT_FOUND);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_read_or_change_another_tenants_policy_nor_name_secrets() {
    let shared = server();
    create(&shared.alice, "net-alice").await;
    let own = json!({ "allow": [{ "host": "api.alice.test" }] });
    assert_eq!(
        call(&shared.alice, Method::PUT, &network("net-alice"), Some(own.clone())).await,
        (StatusCode::OK, own.clone())
    );
    assert_eq!(call(&shared.alice, Method::GET, &network("net-alice"), None).await, (StatusCode::OK, own.clone()));

    // Bob gets what a sandbox that does not exist gets, word for word.
    let ghost = call(&shared.bob, Method::GET, &network("net-ghost"), None).await;
    let expected = serde_json::from_str::<Value>(&ghost.1.to_string().replace("net-ghost", "net-alice")).unwrap();
    let widened = json!({ "allow": [{ "host": "*" }] });
    for (method, body) in [(Method::GET, None), (Method::PUT, Some(widened.clone()))] {
        let answer = call(&shared.bob, method.clone(), &network("net-alice"), body).await;
        assert_eq!(answer, (StatusCode::NOT_FOUND, expected.clone()), "{method}");
    }
    // Even an invalid body is answered 404: the sandbox is looked up first.
    let answer = call(&shared.bob, Method::PUT, &network("net-alice"), Some(json!({ "bogus": 1 }))).await;
    assert_eq!(answer, (StatusCode::NOT_FOUND, expected));
    assert_eq!(call(&shared.alice, Method::GET, &network("net-alice"), None).await, (StatusCode::OK, own.clone()));
    // An admin sees it.
    assert_eq!(call(&shared.admin, Method::GET, &network("net-alice"), None).await, (StatusCode::OK, own.clone()));

    // A tenant may not name a secret: its value would go to a host the tenant chose.
    let (status, _) =
        call(&shared.admin, Method::PUT, "/secrets/net-tenant-secret", Some(json!({ "value": "admins-only" }))).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let stealing = json!({ "allow": [{ "host": "attacker.test",
        "headers": [{ "name": "Authorization", "secret": "net-tenant-secret" }] }] });
    let answer = call(&shared.alice, Method::PUT, &network("net-alice"), Some(stealing.clone())).await;
    problem(&answer, StatusCode::FORBIDDEN, "forbidden");
    let at_creation = json!({ "name": "net-alice-2", "config": { "policy": { "network": stealing } } });
    let answer = call(&shared.alice, Method::POST, "/sandboxes", Some(at_creation)).await;
    problem(&answer, StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(call(&shared.alice, Method::GET, "/sandboxes/net-alice-2", None).await.0, StatusCode::NOT_FOUND);
    // Nor name an address, which is what lets the proxy reach loopback, the
    // host's networks or the metadata service.
    for reaching in [
        json!({ "allow": [{ "host": "169.254.169.254" }] }),
        json!({ "allow": [{ "host": "[::1]", "ports": [7870] }] }),
        json!({ "allow": [{ "host": "db.test", "connect_to": "127.0.0.1:5432" }] }),
    ] {
        let answer = call(&shared.alice, Method::PUT, &network("net-alice"), Some(reaching.clone())).await;
        problem(&answer, StatusCode::FORBIDDEN, "forbidden");
        // An admin may.
        assert_eq!(call(&shared.admin, Method::PUT, &network("net-alice"), Some(reaching)).await.0, StatusCode::OK);
    }
    call(&shared.admin, Method::PUT, &network("net-alice"), Some(own.clone())).await;
    assert_eq!(call(&shared.alice, Method::GET, &network("net-alice"), None).await, (StatusCode::OK, own));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admin_tokens_manage_secrets_and_no_answer_carries_a_value() {
    let shared = server();
    const VALUE: &str = "net-secret-value-never-shown-42";
    // A tenant's token: 403 on every secret route, whatever exists.
    for (method, path, body) in [
        (Method::PUT, "/secrets/net-gh", Some(json!({ "value": VALUE }))),
        (Method::GET, "/secrets", None),
        (Method::DELETE, "/secrets/net-gh", None),
    ] {
        let answer = call(&shared.alice, method.clone(), path, body).await;
        problem(&answer, StatusCode::FORBIDDEN, "forbidden");
    }
    assert_eq!(shared.runtime.secrets().secret("net-gh"), None, "a tenant stored a secret");

    assert_eq!(
        call(&shared.admin, Method::PUT, "/secrets/net-gh", Some(json!({ "value": VALUE }))).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(shared.runtime.secrets().secret("net-gh").as_deref(), Some(VALUE));
    // Refused: a value that would break a header, a bad name, unknown fields.
    let answer = call(&shared.admin, Method::PUT, "/secrets/net-gh", Some(json!({ "value": "a\r\nX-Evil: 1" }))).await;
    problem(&answer, StatusCode::BAD_REQUEST, "invalid-request");
    let answer = call(&shared.admin, Method::PUT, "/secrets/Net%20Bad", Some(json!({ "value": "v" }))).await;
    problem(&answer, StatusCode::BAD_REQUEST, "invalid-request");
    let answer = call(&shared.admin, Method::PUT, "/secrets/net-gh", Some(json!({ "value": "v", "x": 1 }))).await;
    problem(&answer, StatusCode::BAD_REQUEST, "invalid-request");
    assert_eq!(shared.runtime.secrets().secret("net-gh").as_deref(), Some(VALUE), "a refused value was stored");

    // An admin may give a tenant's sandbox a policy that uses it.
    create(&shared.bob, "net-bob").await;
    let policy = json!({ "allow": [{ "host": "api.github.com",
        "headers": [{ "name": "Authorization", "secret": "net-gh", "prefix": "token " }] }] });
    let (status, stored) = call(&shared.admin, Method::PUT, &network("net-bob"), Some(policy.clone())).await;
    assert_eq!((status, stored), (StatusCode::OK, policy));

    let mut answers = vec![
        call(&shared.admin, Method::GET, "/secrets", None).await,
        call(&shared.bob, Method::GET, &network("net-bob"), None).await,
        call(&shared.bob, Method::GET, "/sandboxes/net-bob", None).await,
        call(&shared.admin, Method::GET, "/sandboxes", None).await,
    ];
    let listed = &answers[0].1;
    let entry = listed.as_array().unwrap().iter().find(|s| s["name"] == "net-gh").unwrap();
    assert_eq!(entry.as_object().unwrap().keys().collect::<Vec<_>>(), ["created_at_ms", "name", "updated_at_ms"]);
    // Removing it while a policy uses it: 409 naming the sandbox; unknown: 404.
    let in_use = call(&shared.admin, Method::DELETE, "/secrets/net-gh", None).await;
    assert!(problem(&in_use, StatusCode::CONFLICT, "conflict").contains("net-bob"));
    answers.push(in_use);
    for (status, body) in &answers {
        assert!(status.is_success() || status.is_client_error());
        assert!(!body.to_string().contains(VALUE), "an answer carries the value: {body}");
    }
    let missing = call(&shared.admin, Method::DELETE, "/secrets/net-never", None).await;
    problem(&missing, StatusCode::NOT_FOUND, "not-found");
    // Nothing under the sandboxes' directories holds it.
    let mut pending = vec![shared.home.join("sandboxes")];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                pending.push(entry.path());
            } else if entry.file_type().unwrap().is_file() {
                let bytes = std::fs::read(entry.path()).unwrap();
                assert!(!bytes.windows(VALUE.len()).any(|w| w == VALUE.as_bytes()), "{}", entry.path().display());
            }
        }
    }

    // Once no policy names it, it can go.
    assert_eq!(call(&shared.admin, Method::PUT, &network("net-bob"), Some(json!({}))).await.0, StatusCode::OK);
    assert_eq!(call(&shared.admin, Method::DELETE, "/secrets/net-gh", None).await.0, StatusCode::NO_CONTENT);
    assert_eq!(shared.runtime.secrets().secret("net-gh"), None);
    let (_, listed) = call(&shared.admin, Method::GET, "/secrets", None).await;
    assert!(!listed.as_array().unwrap().iter().any(|s| s["name"] == "net-gh"));
}
