//! The OpenAPI document (`GET /v1/openapi.json`) on loopback through a real
//! HTTP client: it is OpenAPI 3.1, it needs a token like every `/v1` route,
//! every route the router serves is in it, and every operation it names is
//! served.
//!
//! The routes the router serves are read from the server crate's source (its
//! `.route("...", get(..).post(..))` calls), so a route added without its
//! description fails here. Each documented operation is then sent, with
//! made-up path values and no body, to the real server: it must not get the
//! router's own "no such route" 404 or "method not allowed" 405.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use airlock::runtime::{DiskOptions, QuotaMode, Runtime, RuntimeOptions};
use reqwest::{Client, Method, StatusCode};
use serde_json::Value;

struct Shared {
    base: String,
    token: String,
}

/// The test binary's server (in process, ephemeral loopback port, temporary home).
fn server() -> &'static Shared {
    static SERVER: OnceLock<Shared> = OnceLock::new();
    SERVER.get_or_init(|| {
        let parent = Path::new(env!("CARGO_TARGET_TMPDIR")).join("http-openapi-homes");
        let _ = std::fs::remove_dir_all(&parent);
        std::fs::create_dir_all(&parent).unwrap();
        let home: PathBuf = tempfile::Builder::new().prefix("home-").tempdir_in(&parent).unwrap().keep();
        let (sender, receiver) = std::sync::mpsc::channel::<SocketAddr>();
        let runtime_home = home.clone();
        std::thread::spawn(move || {
            let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            tokio.block_on(async move {
                let mut options = RuntimeOptions::new(&runtime_home);
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
        Shared { base: format!("http://{address}"), token }
    })
}

fn client() -> Client {
    Client::builder().no_proxy().build().unwrap()
}

async fn document() -> Value {
    let response = client()
        .get(format!("{}/v1/openapi.json", server().base))
        .bearer_auth(&server().token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

/// `(METHOD, /path/{param})` of every operation in the document.
fn documented(document: &Value) -> BTreeSet<(String, String)> {
    let mut operations = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in ["get", "put", "post", "delete", "patch", "head", "options", "trace"] {
            if item.get(method).is_some() {
                operations.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    operations
}

/// The routes the router serves, read from the server crate's `.route(..)`
/// calls: `(METHOD, /path/{param})`, a `{*rest}` wildcard written `{rest}`.
/// Routes outside `/v1` are the ones `ops::root_routes` makes.
fn served() -> BTreeSet<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/server/src");
    let mut routes = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let source = std::fs::read_to_string(&path).unwrap();
        let root_section = source.find("fn root_routes").map(|start| {
            let end = source[start..].find("\n}").map_or(source.len(), |e| start + e);
            start..end
        });
        let mut rest = 0;
        while let Some(found) = source[rest..].find(".route(\"") {
            let start = rest + found;
            let route_start = start + ".route(\"".len();
            let route_end = route_start + source[route_start..].find('"').unwrap();
            let route = &source[route_start..route_end];
            // The method router: up to the `)` that closes `.route(`.
            let mut depth = 1;
            let mut end = route_end;
            for (offset, character) in source[route_end..].char_indices() {
                match character {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    end = route_end + offset;
                    break;
                }
            }
            let methods_text = &source[route_end..end];
            let at_root = root_section.as_ref().is_some_and(|section| section.contains(&start));
            let full = if at_root { route.to_string() } else { format!("/v1{route}") };
            let full = full.replace("{*", "{");
            for method in ["get", "post", "put", "delete", "patch", "any"] {
                let bare = format!("{method}(");
                let found = methods_text.match_indices(&bare).any(|(index, _)| {
                    index == 0 || !methods_text[..index].ends_with(|c: char| c.is_alphanumeric() || c == '_')
                });
                if found {
                    // `any` is documented as its GET (a proxied request of any method).
                    let method = if method == "any" { "GET" } else { method };
                    routes.insert((method.to_uppercase(), full.clone()));
                }
            }
            rest = end;
        }
    }
    assert!(routes.len() > 20, "the route reader found the routes: {routes:?}");
    routes
}

#[tokio::test(flavor = "multi_thread")]
async fn the_document_is_openapi_3_1_and_needs_a_token() {
    let document = document().await;
    let version = document["openapi"].as_str().unwrap();
    assert!(version.starts_with("3.1."), "OpenAPI 3.1, not {version}");
    assert_eq!(document["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    assert!(document["components"]["schemas"]["Problem"].is_object());
    // Strict request bodies say so.
    assert_eq!(document["components"]["schemas"]["ExecBody"]["additionalProperties"], false);

    let refused = client().get(format!("{}/v1/openapi.json", server().base)).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_the_router_serves_is_documented() {
    let documented = documented(&document().await);
    let served = served();
    let missing: Vec<_> = served.difference(&documented).collect();
    assert!(missing.is_empty(), "routes served but not in the document: {missing:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_documented_operation_is_served() {
    let document = document().await;
    for (method, path) in documented(&document) {
        // Made-up values: an unknown sandbox is a 404 of its own, not the router's.
        let concrete = path
            .replace("{name}", "no-such-sandbox")
            .replace("{sandbox}", "no-such-sandbox")
            .replace("{id}", "x1")
            .replace("{port}", "3000")
            .replace("{token}", "t0")
            .replace("{rest}", "r")
            .replace("{path}", "a.txt");
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let response = client()
            .request(method.clone(), format!("{}{concrete}", server().base))
            .bearer_auth(&server().token)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path} is documented, not served: {body}");
        let router_miss = status == StatusCode::NOT_FOUND && body["detail"] == "no such route";
        assert!(!router_miss, "{method} {path} is documented, not served");
    }
    // And the reader sees the router's fallback: a route that does not exist gets it.
    let response = client()
        .get(format!("{}/v1/no-such-route", server().base))
        .bearer_auth(&server().token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["detail"], "no such route");
}
