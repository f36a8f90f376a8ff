//! Snapshots over the HTTP API (issue 15, point 6): a tenant takes, lists,
//! restores and forks its snapshots; another tenant can neither see nor use
//! them (answered as none); a damaged snapshot is `409`, naming the changed
//! file, and changes nothing.
//!
//! The server runs in process over a btrfs home (as in `snapshots.rs`); needs
//! root, btrfs-progs, the guests and the engine, and fails loudly without them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

use airlock::runtime::{DiskOptions, QuotaMode, Runtime, RuntimeOptions};
use common::Cleanup;
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};

struct Server {
    base: String,
    client: Client,
    runtime: Runtime,
}

async fn serve(home: &Path) -> Server {
    serve_with(home, QuotaMode::Required).await
}

async fn serve_with(home: &Path, quotas: QuotaMode) -> Server {
    let mut options = RuntimeOptions::new(home);
    options.isolates.cache_dir = Some(Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-cache"));
    options.disk = DiskOptions { quotas, image_bytes: Some(1024 * 1024 * 1024) };
    let runtime = Runtime::open(options).await.expect("opening the runtime with its btrfs home");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let state = airlock_server::AppState::new(runtime.clone());
    tokio::spawn(airlock_server::serve(listener, state, std::future::pending()));
    Server { base: format!("http://{address}/v1"), client: Client::builder().no_proxy().build().unwrap(), runtime }
}

impl Server {
    async fn call(&self, token: &str, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = self.client.request(method, format!("{}{path}", self.base)).bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn exec(&self, token: &str, sandbox: &str, script: &str) -> String {
        let body = json!({ "command": "bash", "args": ["-c", script] });
        let (status, answer) = self.call(token, Method::POST, &format!("/sandboxes/{sandbox}/exec"), Some(body)).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["exit_code"], 0, "{answer}");
        answer["stdout"].as_str().unwrap().to_string()
    }
}

fn set_readonly(path: &Path, readonly: bool) {
    let out = std::process::Command::new("btrfs")
        .args(["property", "set", "-ts"])
        .arg(path)
        .args(["ro", if readonly { "true" } else { "false" }])
        .output()
        .expect("running btrfs");
    assert!(out.status.success(), "btrfs property set: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_snapshots_restores_and_forks_and_another_tenant_sees_none_of_it() {
    let home = tempfile::tempdir().unwrap();
    let server = serve(home.path()).await;
    let alice = server.runtime.tokens().create("alice", false).unwrap().secret().to_string();
    let bob = server.runtime.tokens().create("bob", false).unwrap().secret().to_string();

    let (status, made) = server.call(&alice, Method::POST, "/sandboxes", Some(json!({ "name": "http-snap" }))).await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    let mut cleanup = Cleanup(vec![made["id"].as_str().unwrap().to_string()]);
    server.exec(&alice, "http-snap", "echo kept > /workspace/f.txt").await;

    let (status, snapshot) =
        server.call(&alice, Method::POST, "/sandboxes/http-snap/snapshots", Some(json!({ "label": "one" }))).await;
    assert_eq!(status, StatusCode::CREATED, "{snapshot}");
    let id = snapshot["id"].as_str().unwrap().to_string();
    assert_eq!(snapshot["label"], "one");
    assert_eq!(snapshot["layer"], true);

    let (status, listed) = server.call(&alice, Method::GET, "/sandboxes/http-snap/snapshots", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());

    // Bob sees none of it, and cannot use it.
    let (status, all) = server.call(&bob, Method::GET, "/snapshots", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(all, json!([]));
    for (method, path, body) in [
        (Method::GET, format!("/snapshots/{id}"), None),
        (Method::DELETE, format!("/snapshots/{id}"), None),
        (Method::POST, format!("/snapshots/{id}/restore"), None),
        (Method::POST, format!("/snapshots/{id}/fork"), Some(json!({ "names": ["bobs-fork"] }))),
        (Method::GET, "/sandboxes/http-snap/snapshots".to_string(), None),
        (Method::POST, "/sandboxes/http-snap/snapshots".to_string(), Some(json!({}))),
    ] {
        let (status, answer) = server.call(&bob, method.clone(), &path, body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {answer}");
    }
    assert!(server.runtime.get("bobs-fork").unwrap().is_none());

    // Alice changes the file, restores, and has it back.
    server.exec(&alice, "http-snap", "echo changed > /workspace/f.txt").await;
    let (status, restored) = server.call(&alice, Method::POST, &format!("/snapshots/{id}/restore"), None).await;
    assert_eq!(status, StatusCode::OK, "{restored}");
    assert_eq!(server.exec(&alice, "http-snap", "cat /workspace/f.txt").await, "kept\n");

    // Forks are hers.
    let body = json!({ "names": ["http-fork-a", "http-fork-b"] });
    let (status, forks) = server.call(&alice, Method::POST, &format!("/snapshots/{id}/fork"), Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{forks}");
    cleanup.0.extend(forks.as_array().unwrap().iter().map(|f| f["id"].as_str().unwrap().to_string()));
    assert_eq!(forks[0]["owner"], made["owner"]);
    assert_eq!(server.exec(&alice, "http-fork-b", "cat /workspace/f.txt").await, "kept\n");
    let (status, _) = server.call(&bob, Method::GET, "/sandboxes/http-fork-a", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A damaged snapshot is 409, naming the changed file; nothing is changed or made.
    server.exec(&alice, "http-snap", "echo later > /workspace/f.txt").await;
    let stored = home.path().canonicalize().unwrap().join("sandboxes/.snapshots").join(&id).join("sandbox");
    set_readonly(&stored, false);
    std::fs::write(stored.join("workspace/f.txt"), b"kepT\n").unwrap();
    set_readonly(&stored, true);
    let (status, answer) = server.call(&alice, Method::POST, &format!("/snapshots/{id}/restore"), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert!(answer["detail"].as_str().unwrap().contains("workspace/f.txt was changed"), "{answer}");
    let body = json!({ "names": ["http-fork-damaged"] });
    let (status, answer) = server.call(&alice, Method::POST, &format!("/snapshots/{id}/fork"), Some(body)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert!(server.runtime.get("http-fork-damaged").unwrap().is_none());
    assert_eq!(server.exec(&alice, "http-snap", "cat /workspace/f.txt").await, "later\n");

    // An unknown id, and a malformed one, are 404; a strict body refuses unknown fields.
    let (status, _) = server.call(&alice, Method::GET, "/snapshots/snap-00000000000000000000000000000000", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = server.call(&alice, Method::GET, "/snapshots/..", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) =
        server.call(&alice, Method::POST, "/sandboxes/http-snap/snapshots", Some(json!({ "labl": "x" }))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Deleted: gone from the list.
    let (status, _) = server.call(&alice, Method::DELETE, &format!("/snapshots/{id}"), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, listed) = server.call(&alice, Method::GET, "/snapshots", None).await;
    assert_eq!(listed, json!([]));
    for name in ["http-snap", "http-fork-a", "http-fork-b"] {
        server.runtime.destroy(name).await.unwrap();
    }
}

/// A home without the btrfs disk: taking a snapshot is `503` saying why, with no host path in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_btrfs_disk_a_snapshot_is_503() {
    let home = tempfile::tempdir().unwrap();
    let server = serve_with(home.path(), QuotaMode::Off).await;
    let alice = server.runtime.tokens().create("alice", false).unwrap().secret().to_string();
    let (status, made) = server.call(&alice, Method::POST, "/sandboxes", Some(json!({ "name": "plain" }))).await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    let (status, answer) = server.call(&alice, Method::POST, "/sandboxes/plain/snapshots", Some(json!({}))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    let detail = answer["detail"].as_str().unwrap();
    assert!(detail.contains("btrfs disk"), "{answer}");
    assert!(!detail.contains(home.path().to_str().unwrap()), "a host path in {answer}");
    let (status, listed) = server.call(&alice, Method::GET, "/snapshots", None).await;
    assert_eq!((status, listed), (StatusCode::OK, json!([])));
}
