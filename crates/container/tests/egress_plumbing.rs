//! The container side of egress (issue 13) against the real Docker engine,
//! under runc and runsc: a fake proxy listens on a Unix socket in a host
//! directory, the sandbox is created with that directory as its egress
//! directory, and commands inside reach the proxy at 127.0.0.1:3128 through
//! the agent's relay, with the proxy and CA variables set. A sandbox without
//! an egress directory has none of it. The engine must be set up (`airlock
//! setup`); without it every test here fails, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use airlock_container::{
    ContainerResources, ContainerRuntime, ContainerSandbox, DockerEngine, EngineOptions, ImageRecipe, ProcessEvent,
    PtySize, SandboxSpec, ensure_base_image,
};
use airlock_core::{ExecOutcome, ExecRequest, SandboxId};
use bollard::query_parameters::InspectContainerOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

/// What a fake proxy's answer starts with.
const FAKE_ANSWER: &str = "fake-proxy";
/// The trust bundle the fake egress directory holds.
const BUNDLE: &str = "-----BEGIN CERTIFICATE-----\nfake egress bundle for tests\n-----END CERTIFICATE-----\n";

/// Connects to the engine (setting it up where needed) and makes sure the
/// base image exists; one build at a time per test binary.
async fn engine_and_image() -> (DockerEngine, String) {
    static BUILD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one_at_a_time = BUILD.lock().await;
    let engine = DockerEngine::connect_or_setup(&EngineOptions::default())
        .await
        .expect("the docker engine is required for container tests: run `airlock setup` as root");
    let image = ensure_base_image(&engine, &ImageRecipe::default(), Arc::new(|line: &str| eprintln!("{line}")))
        .await
        .expect("building the base image");
    (engine, image)
}

/// A stand-in for the host's egress proxy: answers every request on its
/// Unix socket with a fixed HTTP response that echoes the request line and
/// names this instance, and records the request lines it saw.
struct FakeProxy {
    task: JoinHandle<()>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl FakeProxy {
    /// Listens at `<dir>/proxy.sock` (mode 0666, like the real one), replacing
    /// any socket left there.
    fn start(dir: &Path, instance: &'static str) -> Self {
        let socket = dir.join("proxy.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).unwrap();
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { return };
                let record = record.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buffer = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buffer[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&head);
                    let line = text.lines().next().unwrap_or_default().to_string();
                    record.lock().unwrap().push(line.clone());
                    let body = format!("{FAKE_ANSWER} {instance}: {line}\n");
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Self { task, seen }
    }

    /// Like [`FakeProxy::start`], but every answer's body is `bytes` bytes of
    /// [`pattern`], whatever was asked.
    fn start_large(dir: &Path, bytes: usize) -> Self {
        let socket = dir.join("proxy.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).unwrap();
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        let body: Arc<[u8]> = pattern(bytes).into();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { return };
                let body = body.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buffer = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buffer[..n]),
                        }
                    }
                    let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {bytes}\r\nconnection: close\r\n\r\n");
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                    let _ = stream.write_all(&body).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Self { task, seen: Arc::default() }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for FakeProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The body a large fake proxy answers with.
fn pattern(bytes: usize) -> Vec<u8> {
    (0..bytes).map(|i| (i % 251) as u8).collect()
}

/// A sandbox for one test (with or without egress), removed when the test
/// ends, even by a panic.
struct TestSandbox {
    sandbox: ContainerSandbox,
    /// The egress directory on the host, when the sandbox has egress.
    egress: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl TestSandbox {
    async fn new(runtime: ContainerRuntime, with_egress: bool) -> Self {
        Self::with_resources(runtime, with_egress, ContainerResources::default()).await
    }

    async fn with_resources(runtime: ContainerRuntime, with_egress: bool, resources: ContainerResources) -> Self {
        let (engine, image) = engine_and_image().await;
        let dir = tempfile::tempdir().unwrap();
        // runsc opens bind-mount sources as the engine's remapped root.
        engine.let_remapped_root_pass(dir.path()).unwrap();
        let workspace = dir.path().join("workspace");
        std::fs::create_dir(&workspace).unwrap();
        let mut spec =
            SandboxSpec::new(SandboxId::new().to_string(), image, &workspace).runtime(runtime).resources(resources);
        let egress = with_egress.then(|| {
            let egress = dir.path().join("egress");
            std::fs::create_dir(&egress).unwrap();
            std::fs::set_permissions(&egress, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::write(egress.join("ca-bundle.pem"), BUNDLE).unwrap();
            std::fs::set_permissions(egress.join("ca-bundle.pem"), std::fs::Permissions::from_mode(0o644)).unwrap();
            egress
        });
        if let Some(egress) = &egress {
            spec = spec.egress(egress);
        }
        let sandbox = ContainerSandbox::create_started(&engine, spec).await.unwrap();
        Self { sandbox, egress, _dir: dir }
    }

    fn egress(&self) -> &Path {
        self.egress.as_deref().unwrap()
    }

    async fn bash(&self, script: &str) -> ExecOutcome {
        self.sandbox.exec(bash(script)).await.unwrap()
    }

    async fn bash_as_root(&self, script: &str) -> ExecOutcome {
        self.sandbox.exec_as("root", bash(script)).await.unwrap()
    }
}

impl Drop for TestSandbox {
    fn drop(&mut self) {
        let sandbox = self.sandbox.clone();
        // Drop cannot await; a thread with its own runtime removes the container.
        let _ = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                let _ = runtime.block_on(sandbox.remove());
            }
        })
        .join();
    }
}

fn bash(script: &str) -> ExecRequest {
    ExecRequest::new("bash").args(["-c", script])
}

fn show(outcome: &ExecOutcome) -> String {
    format!("{:?}\nstdout: {}\nstderr: {}", outcome.termination, outcome.stdout_text(), outcome.stderr_text())
}

/// The egress variables and their values, as `NAME=value` lines.
fn expected_variables() -> Vec<String> {
    let proxy = "http://127.0.0.1:3128";
    let bundle = "/run/airlock/egress/ca-bundle.pem";
    let mut lines: Vec<String> =
        ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"].iter().map(|n| format!("{n}={proxy}")).collect();
    lines.extend(["NO_PROXY", "no_proxy"].iter().map(|n| format!("{n}=localhost,127.0.0.1,::1")));
    lines.extend(
        ["SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS", "REQUESTS_CA_BUNDLE", "PIP_CERT", "GIT_SSL_CAINFO", "CURL_CA_BUNDLE"]
            .iter()
            .map(|n| format!("{n}={bundle}")),
    );
    lines
}

fn assert_has_every_variable(env: &str, what: &str) {
    for line in expected_variables() {
        assert!(env.lines().any(|l| l.trim_end_matches('\r') == line), "{what}: {line} missing from:\n{env}");
    }
}

/// Expands to one `#[tokio::test]` per case and runtime.
macro_rules! egress_cases {
    ($($case:ident),* $(,)?) => {
        mod runc {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(airlock_container::ContainerRuntime::Runc).await
                }
            )*
        }
        mod runsc {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(airlock_container::ContainerRuntime::Runsc).await
                }
            )*
        }
    };
}

egress_cases!(
    requests_reach_the_host_proxy_through_the_relay,
    many_connections_are_relayed_at_once,
    a_large_download_arrives_whole,
    the_variables_reach_exec_processes_and_terminals_and_an_exec_can_override_them,
    the_egress_directory_is_read_only_and_holds_the_bundle,
    egress_gives_no_network,
    a_restarted_proxy_is_reached_by_the_next_connection,
    without_egress_nothing_listens_and_no_variable_is_set,
);

async fn requests_reach_the_host_proxy_through_the_relay(runtime: ContainerRuntime) {
    let test = TestSandbox::new(runtime, true).await;
    let proxy = FakeProxy::start(test.egress(), "one");

    // Through the variables alone.
    let out = test.bash("curl -sS --max-time 20 http://example.test/x").await;
    assert_eq!(out.stdout_text(), "fake-proxy one: GET http://example.test/x HTTP/1.1\n", "{}", show(&out));
    // Naming the proxy, as the unprivileged user and as root.
    let out = test.bash("curl -sS --max-time 20 -x http://127.0.0.1:3128 http://other.test/y?z=1").await;
    assert_eq!(out.stdout_text(), "fake-proxy one: GET http://other.test/y?z=1 HTTP/1.1\n", "{}", show(&out));
    let out = test.bash_as_root("curl -sS --max-time 20 http://root.test/").await;
    assert_eq!(out.stdout_text(), "fake-proxy one: GET http://root.test/ HTTP/1.1\n", "{}", show(&out));
    // HTTPS goes to the proxy as a CONNECT (the fake one then answers
    // nonsense where TLS should be, so curl fails after it).
    let out = test.bash("curl -sS --max-time 20 https://secure.test/ ; true").await;
    assert!(
        proxy.seen().iter().any(|line| line == "CONNECT secure.test:443 HTTP/1.1"),
        "{:?}\n{}",
        proxy.seen(),
        show(&out)
    );
    // Python's standard library finds the proxy through the variables too.
    let out = test.bash("python3 -c 'import urllib.request; print(urllib.request.urlopen(\"http://py.test/p\", timeout=20).read().decode(), end=\"\")'").await;
    assert_eq!(out.stdout_text(), "fake-proxy one: GET http://py.test/p HTTP/1.1\n", "{}", show(&out));
}

async fn many_connections_are_relayed_at_once(runtime: ContainerRuntime) {
    // Room for many processes: under runsc on the ptrace platform every
    // thread the sandbox ever ran keeps a host stub counted against the pids
    // limit, and a sandbox with the default limit dies after a few dozen
    // short processes, relay or not (seen with 24 `sleep`s and 8 `curl`s).
    let resources = ContainerResources { pids: 4096, ..ContainerResources::default() };
    let test = TestSandbox::with_resources(runtime, true, resources).await;
    let _proxy = FakeProxy::start(test.egress(), "one");
    let out = test.bash("for i in $(seq 1 24); do curl -sS --max-time 30 http://many.test/$i & done; wait").await;
    let mut answers: Vec<String> = out.stdout_text().lines().map(str::to_string).collect();
    answers.sort();
    let mut wanted: Vec<String> =
        (1..=24).map(|i| format!("fake-proxy one: GET http://many.test/{i} HTTP/1.1")).collect();
    wanted.sort();
    assert_eq!(answers, wanted, "{}", show(&out));
}

async fn a_large_download_arrives_whole(runtime: ContainerRuntime) {
    const SIZE: usize = 64 << 20;
    let test = TestSandbox::new(runtime, true).await;
    let _proxy = FakeProxy::start_large(test.egress(), SIZE);
    let wanted = {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(pattern(SIZE));
        digest.iter().map(|byte| format!("{byte:02x}")).collect::<String>()
    };
    // Whole and in order: the relay's buffers fill and drain many times over.
    let out = test.bash("curl -sS --max-time 120 http://big.test/ | sha256sum | cut -d' ' -f1").await;
    assert_eq!(out.stdout_text().trim(), wanted, "{}", show(&out));
    let out = test.bash("curl -sS --max-time 120 -o /dev/null -w '%{speed_download}' http://big.test/").await;
    eprintln!("{runtime}: 64 MiB through the relay at {} bytes/s (a debug-built fake proxy)", out.stdout_text());
}

async fn the_variables_reach_exec_processes_and_terminals_and_an_exec_can_override_them(runtime: ContainerRuntime) {
    let test = TestSandbox::new(runtime, true).await;

    let out = test.sandbox.exec(ExecRequest::new("env")).await.unwrap();
    assert_has_every_variable(&out.stdout_text(), "exec");
    let out = test.sandbox.exec_as("root", ExecRequest::new("env")).await.unwrap();
    assert_has_every_variable(&out.stdout_text(), "exec as root");

    // A command's own environment wins over the sandbox's.
    let out = test
        .sandbox
        .exec(ExecRequest::new("env").env("HTTP_PROXY", "http://elsewhere:1").env("NO_PROXY", "*"))
        .await
        .unwrap();
    let env = out.stdout_text();
    assert!(env.lines().any(|l| l == "HTTP_PROXY=http://elsewhere:1"), "{env}");
    assert!(env.lines().any(|l| l == "NO_PROXY=*"), "{env}");
    assert!(env.lines().any(|l| l == "https_proxy=http://127.0.0.1:3128"), "the others stay: {env}");

    // A background process.
    let id = test.sandbox.start_process(ExecRequest::new("env")).await.unwrap();
    let mut follower = test.sandbox.follow_process(&id).unwrap();
    let mut env = String::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(30), follower.next()).await.unwrap() {
            Some(ProcessEvent::Output(chunk)) => env.push_str(&String::from_utf8_lossy(&chunk.bytes)),
            Some(ProcessEvent::Exited(code)) => {
                assert_eq!(code, Some(0));
                break;
            }
            None => panic!("the follower ended without an exit"),
        }
    }
    assert_has_every_variable(&env, "background process");

    // A terminal.
    let mut pty =
        test.sandbox.open_pty(ExecRequest::new("bash").args(["--norc", "-i"]), PtySize::default()).await.unwrap();
    // The marker is computed, so the echoed command line does not match it.
    pty.write(b"echo; env; echo env-$((40+2))-done\n").await.unwrap();
    let mut seen = String::new();
    while !seen.contains("env-42-done") {
        let chunk = tokio::time::timeout(Duration::from_secs(30), pty.read())
            .await
            .unwrap_or_else(|_| panic!("no end of env in {seen:?}"))
            .unwrap_or_else(|| panic!("the terminal closed: {seen:?}"))
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert_has_every_variable(&seen, "terminal");
}

async fn the_egress_directory_is_read_only_and_holds_the_bundle(runtime: ContainerRuntime) {
    let test = TestSandbox::new(runtime, true).await;
    let _proxy = FakeProxy::start(test.egress(), "one");

    let out = test.bash("cat \"$SSL_CERT_FILE\"").await;
    assert_eq!(out.stdout_text(), BUNDLE, "{}", show(&out));
    let out = test.bash("cat \"$NODE_EXTRA_CA_CERTS\" \"$REQUESTS_CA_BUNDLE\" \"$PIP_CERT\" \"$GIT_SSL_CAINFO\" \"$CURL_CA_BUNDLE\"").await;
    assert_eq!(out.stdout_text(), BUNDLE.repeat(5), "{}", show(&out));

    // Neither the sandbox user nor root inside can change anything there.
    for (who, out) in [
        ("user", test.bash("touch /run/airlock/egress/new").await),
        ("root", test.bash_as_root("touch /run/airlock/egress/new").await),
        ("root", test.bash_as_root("echo evil > /run/airlock/egress/ca-bundle.pem").await),
        ("root", test.bash_as_root("rm -f /run/airlock/egress/proxy.sock").await),
        ("root", test.bash_as_root("mv /run/airlock/egress/proxy.sock /run/airlock/egress/moved").await),
    ] {
        assert_ne!(out.exit_code(), Some(0), "{who} changed the egress directory: {}", show(&out));
    }
    let out = test.bash_as_root("grep ' /run/airlock/egress ' /proc/self/mounts").await;
    let options = out.stdout_text();
    assert!(options.split_whitespace().nth(3).is_some_and(|o| o.split(',').any(|o| o == "ro")), "{options}");
    // Unchanged on the host, and the proxy still answers.
    assert_eq!(std::fs::read_to_string(test.egress().join("ca-bundle.pem")).unwrap(), BUNDLE);
    assert!(!test.egress().join("new").exists());
    let out = test.bash("curl -sS --max-time 20 http://still.test/").await;
    assert_eq!(out.stdout_text(), "fake-proxy one: GET http://still.test/ HTTP/1.1\n", "{}", show(&out));
}

async fn egress_gives_no_network(runtime: ContainerRuntime) {
    let test = TestSandbox::new(runtime, true).await;
    let proxy = FakeProxy::start(test.egress(), "one");

    // Around the proxy there is nothing: no route, no name service.
    for script in [
        "curl -sS --max-time 10 --noproxy '*' http://1.1.1.1/",
        "curl -sS --max-time 10 --noproxy '*' http://example.com/",
        "env -u http_proxy -u HTTP_PROXY curl -sS --max-time 10 http://1.1.1.1/",
        "python3 -c 'import socket; socket.create_connection((\"1.1.1.1\", 80), timeout=10)'",
        "getent hosts example.com",
    ] {
        let out = test.bash(script).await;
        assert_ne!(out.exit_code(), Some(0), "{script} got out: {}", show(&out));
        assert!(!out.stdout_text().contains(FAKE_ANSWER), "{script} went through the proxy: {}", show(&out));
    }
    assert!(proxy.seen().is_empty(), "the proxy saw {:?}", proxy.seen());
    let inspected = test
        .sandbox
        .engine()
        .docker()
        .inspect_container(test.sandbox.container_id(), None::<InspectContainerOptions>)
        .await
        .unwrap();
    let host = inspected.host_config.unwrap();
    assert_eq!(host.network_mode.as_deref(), Some("none"));
    let networks = inspected.network_settings.and_then(|n| n.networks).unwrap_or_default();
    assert!(networks.keys().all(|name| name == "none"), "{networks:?}");
}

async fn a_restarted_proxy_is_reached_by_the_next_connection(runtime: ContainerRuntime) {
    let test = TestSandbox::new(runtime, true).await;

    // No proxy yet (no socket): the connection is closed, promptly.
    let out = test.bash("curl -sS --max-time 20 http://early.test/").await;
    assert_ne!(out.exit_code(), Some(0), "{}", show(&out));
    assert_ne!(out.exit_code(), Some(28), "timed out rather than being closed: {}", show(&out));

    let first = FakeProxy::start(test.egress(), "first");
    let out = test.bash("curl -sS --max-time 20 http://a.test/").await;
    assert_eq!(out.stdout_text(), "fake-proxy first: GET http://a.test/ HTTP/1.1\n", "{}", show(&out));

    // The proxy goes down, its socket file left behind: refused.
    drop(first);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let out = test.bash("curl -sS --max-time 20 http://down.test/").await;
    assert_ne!(out.exit_code(), Some(0), "{}", show(&out));
    assert!(!out.stdout_text().contains(FAKE_ANSWER), "{}", show(&out));

    // It comes back on a new socket at the same path.
    let second = FakeProxy::start(test.egress(), "second");
    let out = test.bash("curl -sS --max-time 20 http://b.test/").await;
    assert_eq!(out.stdout_text(), "fake-proxy second: GET http://b.test/ HTTP/1.1\n", "{}", show(&out));
    assert_eq!(second.seen(), vec!["GET http://b.test/ HTTP/1.1".to_string()]);
}

async fn without_egress_nothing_listens_and_no_variable_is_set(runtime: ContainerRuntime) {
    let test = TestSandbox::new(runtime, false).await;
    let out = test.bash("env").await;
    let env = out.stdout_text();
    for name in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "NO_PROXY",
        "no_proxy",
        "SSL_CERT_FILE",
        "NODE_EXTRA_CA_CERTS",
        "REQUESTS_CA_BUNDLE",
        "PIP_CERT",
        "GIT_SSL_CAINFO",
        "CURL_CA_BUNDLE",
    ] {
        assert!(!env.lines().any(|line| line.starts_with(&format!("{name}="))), "{name} is set without egress:\n{env}");
    }
    let out = test.bash("test -e /run/airlock/egress").await;
    assert_eq!(out.exit_code(), Some(1), "the egress directory exists without egress: {}", show(&out));
    // Nothing on 3128: curl's "couldn't connect" (7).
    let out = test.bash("curl -sS --max-time 10 -x http://127.0.0.1:3128 http://example.test/").await;
    assert_eq!(out.exit_code(), Some(7), "{}", show(&out));
    let inspected = test
        .sandbox
        .engine()
        .docker()
        .inspect_container(test.sandbox.container_id(), None::<InspectContainerOptions>)
        .await
        .unwrap();
    let binds = inspected.host_config.unwrap().binds.unwrap_or_default();
    assert!(!binds.iter().any(|bind| bind.contains("/run/airlock")), "{binds:?}");
}

/// Adopting a container with egress finds its egress directory again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_container_keeps_its_egress_directory() {
    let test = TestSandbox::new(ContainerRuntime::Runc, true).await;
    let adopted = ContainerSandbox::adopt(test.sandbox.engine(), test.sandbox.container_id()).await.unwrap();
    assert_eq!(adopted.spec().egress_dir.as_deref(), Some(test.egress()));
    let plain = TestSandbox::new(ContainerRuntime::Runc, false).await;
    let adopted = ContainerSandbox::adopt(plain.sandbox.engine(), plain.sandbox.container_id()).await.unwrap();
    assert_eq!(adopted.spec().egress_dir, None);
}

/// The agent does not depend on core, so it keeps its own copies of the
/// egress layout; they must agree with core's, which the host side uses.
#[test]
fn the_agent_and_core_agree_on_the_egress_layout() {
    assert_eq!(airlock_agent::egress::EGRESS_PROXY_PORT, airlock_core::network::EGRESS_PROXY_PORT);
    assert_eq!(airlock_agent::egress::EGRESS_GUEST_DIR, airlock_core::network::EGRESS_GUEST_DIR);
    assert_eq!(airlock_agent::egress::EGRESS_SOCKET_FILE, airlock_core::network::EGRESS_SOCKET_FILE);
}

/// The base image has what installs need (pip, venv) and the data stack,
/// and pip goes through the proxy by the variables alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_has_pip_venv_and_the_data_stack_and_pip_uses_the_proxy() {
    let test = TestSandbox::new(ContainerRuntime::Runc, true).await;
    let proxy = FakeProxy::start(test.egress(), "one");
    let out = test
        .bash(
            "set -e; python3 -m venv /tmp/venv && /tmp/venv/bin/pip --version >/dev/null && \
             python3 -c 'import numpy, pandas, matplotlib, scipy, PIL; print(\"stack-ok\")'",
        )
        .await;
    assert_eq!(out.stdout_text(), "stack-ok\n", "{}", show(&out));
    let out = test
        .bash(
            "/tmp/venv/bin/pip download --disable-pip-version-check --no-deps --retries 0 --timeout 20 \
             -d /tmp/dl http://pypi.test/packages/demo-1.0.tar.gz",
        )
        .await;
    assert_ne!(out.exit_code(), Some(0), "the fake proxy serves no package: {}", show(&out));
    assert!(
        proxy.seen().iter().any(|line| line == "GET http://pypi.test/packages/demo-1.0.tar.gz HTTP/1.1"),
        "pip did not go through the proxy: {:?}\n{}",
        proxy.seen(),
        show(&out)
    );
}
