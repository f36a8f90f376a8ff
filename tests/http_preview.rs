//! Preview URLs, end to end: the real `airlock serve` binary on loopback, a
//! dev server started inside a sandbox (tests/preview/dev_server.py: Python
//! stdlib in the base image), a real HTTP client and a real WebSocket client.
//!
//! - exposing a port answers with a token and both URL forms; both serve the
//!   dev server (a 1 MiB body goes up and comes back);
//! - a WebSocket echoes through the preview;
//! - the dev server never sees the Authorization header, nor (path form) the
//!   API origin's cookies, and cannot set a cookie beyond its own host;
//! - a hostile answer (a huge head, too many headers, a body cut short) is
//!   refused or cut, and the server goes on;
//! - an unexposed port, a wrong token and an unknown sandbox get the same 404 body;
//! - another tenant cannot expose, list or revoke (`404`);
//! - the exposure survives a restart of the server; revoking it ends it at once.
//!
//! Needs the Docker engine, and fails without it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const AIRLOCK: &str = env!("CARGO_BIN_EXE_airlock");
const SANDBOX: &str = "preview-web";
const PORT: u16 = 8000;

/// `airlock serve` on a home, stopped with SIGTERM when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(home: &Path) -> Self {
        Self::start_with(home, &[])
    }

    fn start_with(home: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(AIRLOCK)
            .args(["serve", "--listen", "127.0.0.1:0", "--home"])
            .arg(home)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = stderr.read_to_end(&mut sink);
        });
        let stdout = child.stdout.take().unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = std::io::BufReader::new(stdout);
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            sender.send(line).unwrap();
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let first = receiver.recv_timeout(Duration::from_secs(120)).expect("the server starts");
        let base =
            first.trim().strip_prefix("airlock: listening on ").unwrap_or_else(|| panic!("{first:?}")).to_string();
        // Printed as `http://ADDRESS/v1`; kept here as the server's root.
        let base = base.trim_end_matches('/').trim_end_matches("/v1").to_string();
        Self { child, base }
    }

    fn authority(&self) -> String {
        self.base.trim_start_matches("http://").trim_end_matches('/').to_string()
    }

    fn port(&self) -> u16 {
        self.authority().rsplit_once(':').unwrap().1.parse().unwrap()
    }

    fn stop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "serve exits 0 on SIGTERM: {status}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
            let _ = self.child.wait();
        }
    }
}

fn client() -> Client {
    Client::builder().no_proxy().build().unwrap()
}

fn require_docker() {
    let out = Command::new("docker").arg("info").output().expect("running docker info");
    assert!(out.status.success(), "the Docker engine must be running: {}", String::from_utf8_lossy(&out.stderr));
}

fn home() -> tempfile::TempDir {
    let parent = Path::new(env!("CARGO_TARGET_TMPDIR")).join("http-preview-homes");
    std::fs::create_dir_all(&parent).unwrap();
    tempfile::Builder::new().prefix("home-").tempdir_in(&parent).unwrap()
}

fn admin_token(home: &Path) -> String {
    std::fs::read_to_string(home.join("admin.token")).unwrap().trim().to_string()
}

/// GETs `url` until the dev server answers through it (not a 502: nothing
/// listening yet), within 60 s.
async fn until_served(url: &str) -> reqwest::Response {
    let started = Instant::now();
    loop {
        let response = client().get(url).send().await.unwrap();
        if response.status() != StatusCode::BAD_GATEWAY {
            return response;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the dev server never answered at {url}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The header values the dev server saw, from its `/headers` answer.
fn seen(answer: &Value, name: &str) -> Vec<String> {
    answer["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|pair| pair[0] == name)
        .map(|pair| pair[1].as_str().unwrap().to_string())
        .collect()
}

async fn echo_over_websocket(request: tokio_tungstenite::tungstenite::handshake::client::Request) {
    let (mut socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    socket.send(Message::text("hello through the preview")).await.unwrap();
    let payload: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    socket.send(Message::binary(payload.clone())).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), socket.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(first, Message::text("hello through the preview"));
    let second = tokio::time::timeout(Duration::from_secs(10), socket.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(second.into_data().to_vec(), payload);
    socket.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dev_server_in_a_sandbox_is_served_through_both_url_forms_and_survives_a_restart() {
    require_docker();
    let home = home();
    let mut server = Server::start(home.path());
    let admin = admin_token(home.path());
    let api = |server: &Server, path: &str| format!("{}/v1{path}", server.base);
    let http = client();

    let created = http
        .post(api(&server, "/sandboxes"))
        .bearer_auth(&admin)
        .json(&json!({ "name": SANDBOX }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let script = std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/preview/dev_server.py")).unwrap();
    let put = http
        .put(api(&server, &format!("/sandboxes/{SANDBOX}/files/dev_server.py")))
        .bearer_auth(&admin)
        .body(script)
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.status());
    let started = http
        .post(api(&server, &format!("/sandboxes/{SANDBOX}/processes")))
        .bearer_auth(&admin)
        .json(&json!({ "command": "python3", "args": ["/workspace/dev_server.py", PORT.to_string()] }))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), StatusCode::CREATED, "{}", started.text().await.unwrap());

    // Before exposure, the path form refuses.
    let early =
        http.get(format!("{}/preview/{SANDBOX}/{PORT}/{}/headers", server.base, "0".repeat(32))).send().await.unwrap();
    assert_eq!(early.status(), StatusCode::NOT_FOUND);

    let exposed = http
        .post(api(&server, &format!("/sandboxes/{SANDBOX}/ports")))
        .bearer_auth(&admin)
        .json(&json!({ "port": PORT }))
        .send()
        .await
        .unwrap();
    assert_eq!(exposed.status(), StatusCode::CREATED);
    let exposure: Value = exposed.json().await.unwrap();
    let token = exposure["token"].as_str().unwrap().to_string();
    assert_eq!(token.len(), 32);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(exposure["port"], PORT);
    let host = format!("{PORT}-{SANDBOX}-{token}.localhost:{}", server.port());
    assert_eq!(exposure["url"], format!("http://{host}/"));
    assert_eq!(exposure["path_url"], format!("http://{}/preview/{SANDBOX}/{PORT}/{token}/", server.authority()));

    // The URL exactly as handed out reaches the dev server (its own 404 for `/`).
    let path_url = exposure["path_url"].as_str().unwrap().to_string();
    let root = until_served(&path_url).await;
    assert_eq!(root.status(), StatusCode::NOT_FOUND);
    assert_eq!(root.text().await.unwrap(), "{}", "the dev server's own answer");
    // Path form, with the API's token and a cookie: the sandbox sees neither.
    let response = http
        .get(format!("{path_url}headers?q=1"))
        .bearer_auth(&admin)
        .header("cookie", "session=api-secret")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().get("set-cookie").is_none(), "no cookie on the API's origin");
    let text = response.text().await.unwrap();
    assert!(!text.contains(&admin), "the sandbox saw the API token: {text}");
    assert!(!text.contains("api-secret"), "the sandbox saw the API origin's cookie: {text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["path"], "/headers?q=1");
    assert!(seen(&answer, "authorization").is_empty());
    assert!(seen(&answer, "proxy-authorization").is_empty());
    assert_eq!(seen(&answer, "host"), [format!("localhost:{PORT}")]);

    // Host form: the preview host on a request to the server's address.
    let response =
        http.get(format!("{}/headers", server.base)).header("host", &host).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().get("set-cookie").is_none(), "no cookie with a Domain beyond the preview's host");
    let text = response.text().await.unwrap();
    assert!(!text.contains(&admin), "the sandbox saw the API token: {text}");
    // Any path on a preview host is the dev server's, /v1 included.
    let response = http.get(format!("{}/v1/headers", server.base)).header("host", &host).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(response.text().await.unwrap(), "{}", "the dev server's own 404");

    // A body streams up and back.
    let body: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 7 % 256) as u8).collect();
    let response =
        http.post(format!("{}/echo", server.base)).header("host", &host).body(body.clone()).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.bytes().await.unwrap().to_vec(), body);

    // A hostile answer: a head too large or with too many headers is a 502;
    // a body cut short ends the client's answer in an error; the server goes on.
    for hostile in ["huge-head", "many-headers"] {
        let response = http.get(format!("{path_url}{hostile}")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY, "{hostile}");
    }
    let cut = http.get(format!("{path_url}cut")).send().await.unwrap();
    assert_eq!(cut.status(), StatusCode::OK);
    assert!(cut.bytes().await.is_err(), "a body cut short is not passed off as whole");
    let after = http.get(format!("{path_url}headers")).send().await.unwrap();
    assert_eq!(after.status(), StatusCode::OK);

    // WebSocket echo, path form and host form.
    let ws_path = format!("ws://{}/preview/{SANDBOX}/{PORT}/{token}/ws", server.authority());
    echo_over_websocket(ws_path.as_str().into_client_request().unwrap()).await;
    let mut by_host = format!("ws://{}/ws", server.authority()).into_client_request().unwrap();
    by_host.headers_mut().insert("host", host.parse().unwrap());
    echo_over_websocket(by_host).await;

    // One 404 body for an unexposed port, a wrong token, an unknown sandbox.
    let refusal = |url: String, host: Option<String>| {
        let http = http.clone();
        async move {
            let mut request = http.get(url);
            if let Some(host) = host {
                request = request.header("host", host);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), StatusCode::NOT_FOUND);
            assert_eq!(response.headers()["content-type"], "application/problem+json");
            response.text().await.unwrap()
        }
    };
    let wrong = match token.strip_prefix('a') {
        Some(rest) => format!("b{rest}"),
        None => format!("a{}", &token[1..]),
    };
    let unexposed = refusal(format!("{}/preview/{SANDBOX}/8001/{token}/headers", server.base), None).await;
    let bad_token = refusal(format!("{}/preview/{SANDBOX}/{PORT}/{wrong}/headers", server.base), None).await;
    let no_sandbox = refusal(format!("{}/preview/no-such-box/{PORT}/{token}/headers", server.base), None).await;
    let bad_host =
        refusal(format!("{}/headers", server.base), Some(format!("{PORT}-{SANDBOX}-{wrong}.localhost"))).await;
    assert_eq!(unexposed, bad_token);
    assert_eq!(unexposed, no_sandbox);
    assert_eq!(unexposed, bad_host);

    // Listed (without the token), only with an API token.
    let listed: Value = http
        .get(api(&server, &format!("/sandboxes/{SANDBOX}/ports")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["port"], PORT);
    assert!(!listed.to_string().contains(&token));
    let anonymous = http.get(api(&server, &format!("/sandboxes/{SANDBOX}/ports"))).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);

    // Another tenant's token cannot expose, list or revoke: the sandbox is not there for it.
    let made =
        Command::new(AIRLOCK).args(["token", "create", "preview-tenant", "--home"]).arg(home.path()).output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let tenant = String::from_utf8(made.stdout).unwrap().trim().to_string();
    let ports = api(&server, &format!("/sandboxes/{SANDBOX}/ports"));
    let exposing = http.post(&ports).bearer_auth(&tenant).json(&json!({ "port": 8001 })).send().await.unwrap();
    assert_eq!(exposing.status(), StatusCode::NOT_FOUND);
    assert_eq!(http.get(&ports).bearer_auth(&tenant).send().await.unwrap().status(), StatusCode::NOT_FOUND);
    let revoking = http.delete(format!("{ports}/{PORT}")).bearer_auth(&tenant).send().await.unwrap();
    assert_eq!(revoking.status(), StatusCode::NOT_FOUND);
    let still = http.get(format!("{path_url}headers")).send().await.unwrap();
    assert_eq!(still.status(), StatusCode::OK, "the tenant revoked nothing");

    // A port that is not a port is a problem answer.
    let bad = http.delete(format!("{ports}/http")).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    assert_eq!(bad.headers()["content-type"], "application/problem+json");
    let bad = http.post(&ports).bearer_auth(&admin).json(&json!({ "port": 0 })).send().await.unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let bad = http.post(&ports).bearer_auth(&admin).json(&json!({ "port": 8000, "host": "x" })).send().await.unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST, "unknown fields are refused");

    // A restart of the server keeps the exposure.
    server.stop();
    let server = Server::start(home.path());
    let response = until_served(&format!("{}/preview/{SANDBOX}/{PORT}/{token}/headers", server.base)).await;
    assert_eq!(response.status(), StatusCode::OK, "the exposure survives a restart");
    let host = format!("{PORT}-{SANDBOX}-{token}.localhost:{}", server.port());
    let response = http.get(format!("{}/headers", server.base)).header("host", &host).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // Revoked: both forms refuse at once, with the same body as ever.
    let revoked = http
        .delete(api(&server, &format!("/sandboxes/{SANDBOX}/ports/{PORT}")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::NO_CONTENT);
    let after = refusal(format!("{}/preview/{SANDBOX}/{PORT}/{token}/headers", server.base), None).await;
    assert_eq!(after, unexposed);
    let after = refusal(format!("{}/headers", server.base), Some(host)).await;
    assert_eq!(after, unexposed);
    let again = http
        .delete(api(&server, &format!("/sandboxes/{SANDBOX}/ports/{PORT}")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_FOUND);

    let destroyed =
        http.delete(api(&server, &format!("/sandboxes/{SANDBOX}"))).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(destroyed.status(), StatusCode::NO_CONTENT);
}

/// An exposure survives the sandbox's sleep, and a preview request wakes it:
/// the answer is the sandbox's (`502` while nothing listens, since sleeping
/// stopped the dev server), never the refusal, and the same URL serves the
/// dev server once it runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_request_wakes_a_sleeping_sandbox_and_its_exposure_is_kept() {
    require_docker();
    let home = home();
    let server = Server::start_with(home.path(), &["--preview-domain", "preview.test"]);
    let admin = admin_token(home.path());
    let http = client();
    let api = |path: &str| format!("{}/v1{path}", server.base);
    let name = "preview-sleepy";
    let created = http
        .post(api("/sandboxes"))
        .bearer_auth(&admin)
        .json(&json!({ "name": name, "config": { "idle_timeout": 2 } }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED, "{}", created.text().await.unwrap());
    let ran = http
        .post(api(&format!("/sandboxes/{name}/exec")))
        .bearer_auth(&admin)
        .json(&json!({ "command": "sh", "args": ["-c", "true"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(ran.status(), StatusCode::OK);
    let exposed: Value = http
        .post(api(&format!("/sandboxes/{name}/ports")))
        .bearer_auth(&admin)
        .json(&json!({ "port": PORT }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let path_url = exposed["path_url"].as_str().unwrap().to_string();
    let state = || async {
        let info: Value = http
            .get(api(&format!("/sandboxes/{name}")))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        info["state"].as_str().unwrap().to_string()
    };
    let started = Instant::now();
    while state().await != "sleeping" {
        assert!(started.elapsed() < Duration::from_secs(60), "the sandbox never slept");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let woken = http.get(format!("{path_url}headers")).send().await.unwrap();
    assert_eq!(woken.status(), StatusCode::BAD_GATEWAY, "the exposure is kept; nothing listens yet");
    assert_eq!(state().await, "active", "a preview request wakes the sandbox");

    let script = std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/preview/dev_server.py")).unwrap();
    let put = http
        .put(api(&format!("/sandboxes/{name}/files/dev_server.py")))
        .bearer_auth(&admin)
        .body(script)
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success());
    let started = http
        .post(api(&format!("/sandboxes/{name}/processes")))
        .bearer_auth(&admin)
        .json(&json!({ "command": "python3", "args": ["/workspace/dev_server.py", PORT.to_string()] }))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), StatusCode::CREATED);
    let served = until_served(&format!("{path_url}headers")).await;
    assert_eq!(served.status(), StatusCode::OK);
    // The host form on the server's own preview domain (`--preview-domain`).
    let token = exposed["token"].as_str().unwrap();
    let host = format!("{PORT}-{name}-{token}.preview.test:{}", server.port());
    assert_eq!(exposed["url"], format!("http://{host}/"));
    let served = http.get(format!("{}/headers", server.base)).header("host", &host).send().await.unwrap();
    assert_eq!(served.status(), StatusCode::OK);
    let other_domain = format!("{PORT}-{name}-{token}.localhost:{}", server.port());
    let refused = http.get(format!("{}/headers", server.base)).header("host", other_domain).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::NOT_FOUND, "only the configured domain is a preview");

    // Destroying the sandbox ends the exposure.
    let destroyed = http.delete(api(&format!("/sandboxes/{name}"))).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(destroyed.status(), StatusCode::NO_CONTENT);
    let gone = http.get(format!("{path_url}headers")).send().await.unwrap();
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
}
