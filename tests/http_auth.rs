//! Auth and tenants on the HTTP API, end to end: the real `airlock serve`
//! binary on loopback, a real HTTP client, and tokens made and revoked with
//! the `airlock token` CLI against the same home while the server runs.
//!
//! - no token, a wrong token, a revoked token: `401` with `WWW-Authenticate:
//!   Bearer`, the same body whether the sandbox named exists or not;
//! - a tenant cannot see, list, exec in, run code in, read or write files of,
//!   or delete another tenant's sandbox: every answer is the one a sandbox
//!   that does not exist gets (the bodies are compared), and nothing changes;
//! - an admin token sees every sandbox;
//! - the admin token file is mode 0600, and a second start keeps it as it is.
//!
//! Nothing here needs the Docker engine: every refused request is refused
//! before anything would run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::{Client, Method, RequestBuilder, StatusCode};
use serde_json::{Value, json};

const AIRLOCK: &str = env!("CARGO_BIN_EXE_airlock");

/// `airlock serve` on a home, stopped with SIGTERM when dropped.
struct Server {
    child: Child,
    base: String,
    home: PathBuf,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    fn start(home: &Path) -> Self {
        let mut child = Command::new(AIRLOCK)
            .args(["serve", "--listen", "127.0.0.1:0", "--home"])
            .arg(home)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(read) = pipe.read(&mut buffer) {
                if read == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buffer[..read]));
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = std::io::BufReader::new(stdout);
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            sender.send(line).unwrap();
            // Keep reading so the server never blocks on a full pipe.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let first = receiver.recv_timeout(Duration::from_secs(120)).expect("the server starts");
        let base = first
            .trim()
            .strip_prefix("airlock: listening on ")
            .unwrap_or_else(|| panic!("{first:?}; stderr: {}", stderr.lock().unwrap()))
            .to_string();
        Self { child, base, home: home.to_path_buf(), stderr }
    }

    /// What the server wrote to stderr, once it holds `text` (within 10 s, else a failure).
    fn said(&self, text: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let said = self.stderr.lock().unwrap().clone();
            if said.contains(text) {
                return said;
            }
            assert!(std::time::Instant::now() < deadline, "serve did not say {text:?}: {said}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn admin_token(&self) -> String {
        std::fs::read_to_string(self.home.join("admin.token")).unwrap().trim().to_string()
    }

    fn request(&self, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
        let request = client().request(method, format!("{}{path}", self.base));
        match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Stops the server (SIGTERM) and waits for it to exit.
    fn stop(&mut self) {
        if self.child.try_wait().unwrap().is_none() {
            let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
            let status = self.child.wait().unwrap();
            assert!(status.success(), "serve exits 0 on SIGTERM: {status}");
        }
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

/// A fresh home under the target directory (removed at the end of the test).
fn home() -> tempfile::TempDir {
    let parent = Path::new(env!("CARGO_TARGET_TMPDIR")).join("http-auth-homes");
    std::fs::create_dir_all(&parent).unwrap();
    tempfile::Builder::new().prefix("home-").tempdir_in(&parent).unwrap()
}

/// Runs `airlock token ARGS --home HOME`; returns its stdout, failing on a non-zero exit.
fn token_cli(home: &Path, args: &[&str]) -> String {
    let output = Command::new(AIRLOCK).arg("token").args(args).arg("--home").arg(home).output().unwrap();
    assert!(
        output.status.success(),
        "airlock token {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Makes a token with the CLI; returns the token (its one line of output).
fn make_token(home: &Path, name: &str) -> String {
    let out = token_cli(home, &["create", name]);
    let token = out.trim().to_string();
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(token.starts_with("airlock_"), "{token}");
    token
}

/// An answer as status, content type, `WWW-Authenticate` and body text.
#[derive(Debug, PartialEq)]
struct Answer {
    status: StatusCode,
    content_type: Option<String>,
    challenge: Option<String>,
    body: String,
}

async fn answer(request: RequestBuilder) -> Answer {
    let response = request.send().await.unwrap();
    let header = |name: reqwest::header::HeaderName| {
        response.headers().get(name).map(|value| value.to_str().unwrap().to_string())
    };
    let content_type = header(reqwest::header::CONTENT_TYPE);
    let challenge = header(reqwest::header::WWW_AUTHENTICATE);
    Answer { status: response.status(), content_type, challenge, body: response.text().await.unwrap() }
}

/// Every route that names a sandbox, as (method, path after the name, JSON
/// body). Each would change or reveal something if it reached the sandbox.
fn sandbox_routes() -> Vec<(Method, &'static str, Option<Value>)> {
    vec![
        (Method::GET, "", None),
        (Method::POST, "/exec", Some(json!({ "command": "sh", "args": ["-c", "touch /workspace/pwned"] }))),
        (Method::POST, "/code", Some(json!({ "language": "python", "code": "open('/workspace/pwned', 'w')" }))),
        (Method::POST, "/contexts", Some(json!({ "language": "python" }))),
        (Method::GET, "/contexts", None),
        (Method::DELETE, "/contexts/some-context", None),
        (Method::GET, "/files", None),
        (Method::GET, "/files/secret.txt", None),
        (Method::PUT, "/files/pwned", None),
        (Method::DELETE, "/files/secret.txt", None),
        (Method::POST, "/mkdir", Some(json!({ "path": "pwned-dir" }))),
        (Method::POST, "/rename", Some(json!({ "from": "secret.txt", "to": "moved.txt" }))),
        (Method::GET, "/processes", None),
        (Method::POST, "/processes", Some(json!({ "command": "sh", "args": ["-c", "touch /workspace/pwned"] }))),
        (Method::DELETE, "/processes", None),
        (Method::GET, "/events", None),
        (Method::GET, "/pty", None),
        // Last: if it went through, the sandbox would be gone.
        (Method::DELETE, "", None),
    ]
}

fn with_body(request: RequestBuilder, body: &Option<Value>, method: &Method) -> RequestBuilder {
    match body {
        Some(body) => request.json(body),
        None if *method == Method::PUT => request.body("pwned"),
        None => request,
    }
}

/// The workspace of the sandbox `name`, through the admin's view of it.
async fn workspace(server: &Server, admin: &str, name: &str) -> PathBuf {
    let info: Value = server
        .request(Method::GET, &format!("/sandboxes/{name}"), Some(admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    server.home.join("sandboxes").join(info["id"].as_str().unwrap()).join("workspace")
}

async fn create(server: &Server, token: &str, name: &str) -> Answer {
    answer(server.request(Method::POST, "/sandboxes", Some(token)).json(&json!({ "name": name }))).await
}

async fn names(server: &Server, token: &str) -> Vec<String> {
    let listed: Value =
        server.request(Method::GET, "/sandboxes", Some(token)).send().await.unwrap().json().await.unwrap();
    let mut names: Vec<String> =
        listed.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap().to_string()).collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_valid_token_get_401_and_learn_nothing() {
    let home = home();
    let server = Server::start(home.path());
    let admin = server.admin_token();
    assert_eq!(create(&server, &admin, "auth-real").await.status, StatusCode::CREATED);
    let revoked = make_token(home.path(), "soon-revoked");
    token_cli(home.path(), &["revoke", "soon-revoked"]);
    // The right shape, a made-up id and secret.
    let forged = format!("airlock_{}_{}", "0".repeat(16), "0".repeat(64));
    let admin_without_last = admin[..admin.len() - 1].to_string();

    let credentials: Vec<(&str, Option<String>)> = vec![
        ("none", None),
        ("empty bearer", Some("Bearer ".to_string())),
        ("wrong", Some("Bearer not-a-token".to_string())),
        ("forged", Some(format!("Bearer {forged}"))),
        ("cut short", Some(format!("Bearer {admin_without_last}"))),
        ("revoked", Some(format!("Bearer {revoked}"))),
        ("basic scheme", Some(format!("Basic {admin}"))),
    ];
    for (what, authorization) in &credentials {
        let send = |method: Method, path: String, body: Option<Value>| {
            let mut request = client().request(method.clone(), format!("{}{path}", server.base));
            if let Some(value) = authorization {
                request = request.header(reqwest::header::AUTHORIZATION, value);
            }
            with_body(request, &body, &method)
        };
        for (method, suffix, body) in sandbox_routes() {
            let real = answer(send(method.clone(), format!("/sandboxes/auth-real{suffix}"), body.clone())).await;
            let ghost = answer(send(method.clone(), format!("/sandboxes/auth-nope{suffix}"), body.clone())).await;
            assert_eq!(real.status, StatusCode::UNAUTHORIZED, "{what}: {method} {suffix}: {real:?}");
            assert_eq!(real, ghost, "{what}: {method} {suffix}: an existing sandbox is told apart");
            assert_eq!(real.content_type.as_deref(), Some("application/problem+json"));
            assert!(real.challenge.as_deref().is_some_and(|c| c.starts_with("Bearer ")), "{real:?}");
            assert!(!real.body.contains("auth-real") && !real.body.contains("auth-nope"), "{}", real.body);
            let problem: Value = serde_json::from_str(&real.body).unwrap();
            assert_eq!(problem["code"], "unauthorized");
        }
        let list = answer(send(Method::GET, "/sandboxes".into(), None)).await;
        assert_eq!(list.status, StatusCode::UNAUTHORIZED, "{what}: list");
        assert!(!list.body.contains("auth-real"));
        let make = answer(send(Method::POST, "/sandboxes".into(), Some(json!({ "name": "auth-real" })))).await;
        let make_new = answer(send(Method::POST, "/sandboxes".into(), Some(json!({ "name": "auth-nope" })))).await;
        assert_eq!(make.status, StatusCode::UNAUTHORIZED, "{what}: create");
        assert_eq!(make, make_new, "{what}: create tells a taken name apart");
        let run = answer(send(Method::POST, "/run".into(), Some(json!({ "language": "python", "code": "1" })))).await;
        assert_eq!(run.status, StatusCode::UNAUTHORIZED, "{what}: run");
    }
    // Nothing happened: the sandbox is there, nothing was made.
    assert_eq!(names(&server, &admin).await, ["auth-real"]);
    let workspace = workspace(&server, &admin, "auth-real").await;
    assert_eq!(std::fs::read_dir(&workspace).unwrap().count(), 0, "something was written");
    // The health endpoint stays open.
    let health = client().get(server.base.replace("/v1", "/healthz")).send().await.unwrap();
    assert_ne!(health.status(), StatusCode::UNAUTHORIZED);
    // The token never appears in what the server prints.
    let printed = server.stderr.lock().unwrap().clone();
    assert!(!printed.contains(&admin) && !printed.contains(&revoked), "a token was printed: {printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_sees_only_its_own_sandboxes_and_another_tenants_is_answered_as_none() {
    let home = home();
    let server = Server::start(home.path());
    let admin = server.admin_token();
    let alice = make_token(home.path(), "alice");
    let bob = make_token(home.path(), "bob");
    assert_eq!(create(&server, &alice, "auth-alice").await.status, StatusCode::CREATED);
    assert_eq!(create(&server, &bob, "auth-bob").await.status, StatusCode::CREATED);
    let alice_workspace = workspace(&server, &admin, "auth-alice").await;
    std::fs::write(alice_workspace.join("secret.txt"), "alice's").unwrap();
    let own = server.request(Method::GET, "/sandboxes/auth-alice/files/secret.txt", Some(&alice)).send().await.unwrap();
    assert_eq!(own.status(), StatusCode::OK, "alice reads her own file");
    assert_eq!(own.text().await.unwrap(), "alice's");

    // Bob on alice's sandbox, and on one that does not exist (a name of the
    // same length): the same answers, but for the name itself.
    for (method, suffix, body) in sandbox_routes() {
        let send = |name: &str| {
            with_body(server.request(method.clone(), &format!("/sandboxes/{name}{suffix}"), Some(&bob)), &body, &method)
        };
        let mut foreign = answer(send("auth-alice")).await;
        let mut ghost = answer(send("auth-ghost")).await;
        foreign.body = foreign.body.replace("auth-alice", "NAME");
        ghost.body = ghost.body.replace("auth-ghost", "NAME");
        assert_eq!(foreign, ghost, "{method} {suffix}: another tenant's sandbox is told apart from none");
        if suffix != "/pty" {
            let problem: Value = serde_json::from_str(&ghost.body).unwrap();
            assert_eq!(ghost.status, StatusCode::NOT_FOUND, "{method} {suffix}: {ghost:?}");
            assert_eq!(problem["code"], "not-found", "{method} {suffix}");
        }
    }
    // Nothing of alice's changed; nothing ran there.
    let entries: Vec<String> = std::fs::read_dir(&alice_workspace)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries, ["secret.txt"]);
    assert_eq!(std::fs::read_to_string(alice_workspace.join("secret.txt")).unwrap(), "alice's");
    assert_eq!(
        server.request(Method::GET, "/sandboxes/auth-alice", Some(&alice)).send().await.unwrap().status(),
        StatusCode::OK,
        "alice's sandbox is still there"
    );

    // Lists: each tenant its own; the admin all.
    assert_eq!(names(&server, &alice).await, ["auth-alice"]);
    assert_eq!(names(&server, &bob).await, ["auth-bob"]);
    assert_eq!(names(&server, &admin).await, ["auth-alice", "auth-bob"]);
    for name in ["auth-alice", "auth-bob"] {
        let seen = server.request(Method::GET, &format!("/sandboxes/{name}"), Some(&admin)).send().await.unwrap();
        assert_eq!(seen.status(), StatusCode::OK, "the admin sees {name}");
    }

    // A taken name: one generic conflict, the same for one's own sandbox and
    // another tenant's, naming no owner.
    let theirs = create(&server, &bob, "auth-alice").await;
    let mine = create(&server, &alice, "auth-alice").await;
    assert_eq!(theirs.status, StatusCode::CONFLICT);
    assert_eq!(theirs, mine, "a conflict says whose the name is");
    let alice_id = &alice["airlock_".len()..][..16];
    assert!(!theirs.body.contains(alice_id) && !theirs.body.contains("owner"), "{}", theirs.body);

    // Tenants use their own sandboxes fully; the admin may delete anyone's.
    let put = server
        .request(Method::PUT, "/sandboxes/auth-bob/files/note.txt", Some(&bob))
        .body("bob's")
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.status());
    let removed = server.request(Method::DELETE, "/sandboxes/auth-bob", Some(&admin)).send().await.unwrap();
    assert_eq!(removed.status(), StatusCode::NO_CONTENT);
    let removed = server.request(Method::DELETE, "/sandboxes/auth-alice", Some(&alice)).send().await.unwrap();
    assert_eq!(removed.status(), StatusCode::NO_CONTENT);
    assert!(names(&server, &admin).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_made_listed_and_revoked_with_the_cli_hold_on_a_running_server() {
    let home = home();
    let server = Server::start(home.path());
    let token = make_token(home.path(), "ci-bot");
    let listed = token_cli(home.path(), &["list"]);
    let line = listed.lines().find(|line| line.contains("ci-bot")).unwrap_or_else(|| panic!("{listed}"));
    assert!(line.contains("tenant") && line.contains("live"), "{line}");
    assert!(listed.lines().any(|line| line.contains("admin") && line.contains("live")), "{listed}");
    assert!(!listed.contains(&token) && !listed.contains(&server.admin_token()), "list shows a secret");
    let id = line.split_whitespace().next().unwrap().to_string();
    assert!(token.contains(&id), "the listed id is the token's");

    let run = || {
        server
            .request(Method::POST, "/run", Some(&token))
            .json(&json!({ "language": "python", "code": "print(6 * 7)" }))
    };
    let ran = run().send().await.unwrap();
    assert_eq!(ran.status(), StatusCode::OK);
    assert_eq!(ran.json::<Value>().await.unwrap()["stdout"], "42\n");
    assert_eq!(create(&server, &token, "auth-ci").await.status, StatusCode::CREATED);

    // Revoked by its id while the server runs: refused from the next request on.
    token_cli(home.path(), &["revoke", &id]);
    let refused = answer(run()).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{refused:?}");
    assert!(refused.challenge.unwrap().contains("invalid_token"));
    let listed = token_cli(home.path(), &["list"]);
    assert!(listed.lines().any(|line| line.contains("ci-bot") && line.contains("revoked")), "{listed}");
    // Its sandbox stays, for the admin only.
    assert_eq!(names(&server, &server.admin_token()).await, ["auth-ci"]);
    let again = Command::new(AIRLOCK).args(["token", "revoke", &id, "--home"]).arg(home.path()).output().unwrap();
    assert!(!again.status.success(), "revoking twice succeeds");
    // A bad name is refused, and makes nothing.
    let bad = Command::new(AIRLOCK).args(["token", "create", "no spaces", "--home"]).arg(home.path()).output().unwrap();
    assert!(!bad.status.success() && bad.stdout.is_empty());
    // A new tenant sees none of it; a token made with --admin sees it all.
    let fresh = make_token(home.path(), "fresh-tenant");
    assert!(names(&server, &fresh).await.is_empty(), "a tenant token sees a sandbox it did not make");
    let output = token_cli(home.path(), &["create", "ops", "--admin"]);
    assert_eq!(names(&server, output.trim()).await, ["auth-ci"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_file_is_private_and_kept_across_starts() {
    let home = home();
    let mut first = Server::start(home.path());
    let file = home.path().join("admin.token");
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "the admin token file is not 0600");
    let token = first.admin_token();
    assert!(token.starts_with("airlock_"));
    let said = first.said(&file.display().to_string());
    assert!(!said.contains(&token), "serve printed the token");
    first.stop();

    let second = Server::start(home.path());
    let again = std::fs::metadata(&file).unwrap();
    assert_eq!(second.admin_token(), token, "the admin token changed on the second start");
    assert_eq!((again.ino(), again.mtime(), again.mtime_nsec()), (meta.ino(), meta.mtime(), meta.mtime_nsec()));
    assert_eq!(again.permissions().mode() & 0o777, 0o600);
    let listed = second.request(Method::GET, "/sandboxes", Some(&token)).send().await.unwrap();
    assert_eq!(listed.status(), StatusCode::OK);
    let admins = token_cli(home.path(), &["list"]).lines().filter(|line| line.contains(" admin ")).count();
    assert_eq!(admins, 1, "a second admin token was made");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_made_by_the_cli_belong_to_no_tenant() {
    let home = home();
    let sandbox_cli = |name: &str| {
        let output =
            Command::new(AIRLOCK).args(["sandbox", "create", name, "--home"]).arg(home.path()).output().unwrap();
        assert!(output.status.success(), "sandbox create {name}: {}", String::from_utf8_lossy(&output.stderr));
    };
    // In process, before any server: the CLI opens the home itself.
    sandbox_cli("auth-early");
    let server = Server::start(home.path());
    // While the server owns the home: through its socket, as the home's owner.
    sandbox_cli("auth-late");
    let admin = server.admin_token();
    let tenant = make_token(home.path(), "tenant");
    assert_eq!(names(&server, &admin).await, ["auth-early", "auth-late"]);
    assert!(names(&server, &tenant).await.is_empty(), "a tenant sees sandboxes the CLI made");
    for name in ["auth-early", "auth-late"] {
        let info: Value = server
            .request(Method::GET, &format!("/sandboxes/{name}"), Some(&admin))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(info["owner"], Value::Null, "{info}");
        let hidden = answer(server.request(Method::GET, &format!("/sandboxes/{name}"), Some(&tenant))).await;
        assert_eq!(hidden.status, StatusCode::NOT_FOUND);
    }
    // What a tenant makes carries its token's id as its owner.
    assert_eq!(create(&server, &tenant, "auth-tenant").await.status, StatusCode::CREATED);
    let info: Value = server
        .request(Method::GET, "/sandboxes/auth-tenant", Some(&tenant))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(tenant.contains(info["owner"].as_str().unwrap()), "{info}");
}
