//! Egress end to end (issue 13): a real sandbox container, its only way out
//! the runtime's proxy, and upstream servers on the host's loopback named
//! explicitly in each test's policy (`connect_to`), never anything beyond.
//!
//! - allowed, denied and injected requests: the upstream sees the credential,
//!   and the sandbox's environment, files and processes never contain it;
//!   HTTPS terminated where a rule injects, tunnelled untouched otherwise;
//! - a policy narrowed while a process keeps requesting applies at once;
//! - `git_checkout` of a private repository over HTTP that needs a token;
//! - `pip install` and `npm install` from indexes on loopback;
//! - bypass attempts refused: direct IPs, `--noproxy`, raw sockets, DNS, a
//!   name that resolves to loopback, the metadata address, a denied port;
//! - decisions are counted in `usage`.
//!
//! Needs the Docker engine, root and the base image (`scripts/test.sh`
//! provides them), and fails without them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "egress/upstream.rs"]
mod upstream;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock::ExecRequest;
use airlock::container::ContainerRuntime;
use airlock::runtime::{
    GitCheckout, NetworkPolicy, Runtime, RuntimeOptions, Sandbox, SandboxConfig, TierPreference, UsageQuery,
};
use serde_json::json;
use upstream::{Answer, Seen, TestCa, Upstream, bare_repository, static_files};

/// The credential the upstream wants; it must never be visible inside a sandbox.
const TOKEN: &str = "tok-7c1d2e9f-never-inside-the-sandbox";

async fn runtime_in(home: &Path, extra_roots: Vec<String>) -> Runtime {
    let mut options = RuntimeOptions::new(home);
    options.isolates.cache_dir = Some(Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-cache"));
    options.egress.extra_upstream_roots_pem = extra_roots;
    Runtime::open(options).await.expect("opening the runtime")
}

async fn sandbox(runtime: &Runtime, name: &str, container_runtime: ContainerRuntime) -> Sandbox {
    let config = SandboxConfig { tier: TierPreference::Container, container_runtime, ..SandboxConfig::default() };
    runtime.sandbox_with(name, config).await.unwrap()
}

fn policy(value: serde_json::Value) -> NetworkPolicy {
    serde_json::from_value(value).unwrap()
}

async fn sh(sandbox: &Sandbox, script: &str) -> (Option<i32>, String, String) {
    let run = sandbox.exec(ExecRequest::new("bash").args(["-c", script])).await.unwrap();
    let out = &run.outcome;
    (out.exit_code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn hello_routes() -> upstream::Routes {
    Arc::new(|seen: &Seen| match seen.path.as_str() {
        "/hello" => Answer::ok("hello from upstream\n"),
        _ => Answer::status(404, "not found"),
    })
}

/// Removes the sandbox (and its container) however the test ends.
struct Destroy(Runtime, &'static str);

impl Drop for Destroy {
    fn drop(&mut self) {
        let runtime = self.0.clone();
        let name = self.1;
        let _ = std::thread::spawn(move || {
            let tokio = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let _ = tokio.block_on(runtime.destroy(name));
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_denied_and_injected_requests_from_a_container() {
    let home = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&["secure.test", "tunnel.test"]);
    let runtime = runtime_in(home.path(), vec![ca.ca_pem.clone()]).await;
    let plain = Upstream::http(hello_routes()).await;
    let secure = Upstream::https(hello_routes(), ca.acceptor.clone()).await;
    runtime.set_secret("upstream-token", TOKEN).unwrap();
    let sandbox = sandbox(&runtime, "egress-basic", ContainerRuntime::Runc).await;
    let _destroy = Destroy(runtime.clone(), "egress-basic");
    let (p, s) = (plain.port(), secure.port());
    sandbox
        .set_network_policy(policy(json!({ "allow": [
            { "host": "upstream.test", "ports": [p], "connect_to": format!("127.0.0.1:{p}"),
              "headers": [{ "name": "Authorization", "secret": "upstream-token", "prefix": "Bearer " }] },
            { "host": "secure.test", "ports": [s], "connect_to": format!("127.0.0.1:{s}"),
              "headers": [{ "name": "Authorization", "secret": "upstream-token", "prefix": "Bearer " }] },
            { "host": "tunnel.test", "ports": [s], "connect_to": format!("127.0.0.1:{s}") },
        ]})))
        .unwrap();

    // Plain HTTP, allowed: the proxy replaces the header the sandbox forged.
    let (code, out, err) = sh(&sandbox, &format!("curl -sS -H 'Authorization: Bearer forged' http://upstream.test:{p}/hello")).await;
    assert_eq!((code, out.as_str()), (Some(0), "hello from upstream\n"), "{err}");
    let seen = plain.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].header("authorization"), Some(format!("Bearer {TOKEN}").as_str()));
    assert_eq!(seen[0].header("host"), Some(format!("upstream.test:{p}").as_str()));

    // Denied: 403 naming the host and the policy, and the upstream sees nothing.
    let (_, out, _) = sh(&sandbox, &format!("curl -sS -w '\\n%{{http_code}}' http://other.test:{p}/hello")).await;
    assert!(out.ends_with("\n403"), "{out}");
    assert!(out.contains("other.test") && out.contains("network policy"), "{out}");
    assert_eq!(plain.seen().len(), 1);

    // HTTPS with a header rule: terminated with the runtime's CA (which the
    // sandbox trusts through SSL_CERT_FILE and kin), injected, re-encrypted.
    let (code, out, err) = sh(&sandbox, &format!("curl -sS https://secure.test:{s}/hello")).await;
    assert_eq!((code, out.as_str()), (Some(0), "hello from upstream\n"), "{err}");
    assert_eq!(secure.seen()[0].header("authorization"), Some(format!("Bearer {TOKEN}").as_str()));
    // The runtime's CA is in the system trust store too: a tool that reads
    // none of the variables (here with them unset) trusts the terminated TLS.
    let unset = "env -u SSL_CERT_FILE -u CURL_CA_BUNDLE -u REQUESTS_CA_BUNDLE -u NODE_EXTRA_CA_CERTS";
    let (code, out, err) = sh(&sandbox, &format!("{unset} curl -sS https://secure.test:{s}/hello")).await;
    assert_eq!((code, out.as_str()), (Some(0), "hello from upstream\n"), "{err}");
    let python = format!(
        "{unset} python3 -c \"import urllib.request; print(urllib.request.urlopen('https://secure.test:{s}/hello').read().decode(), end='')\""
    );
    let (code, out, err) = sh(&sandbox, &python).await;
    assert_eq!((code, out.as_str()), (Some(0), "hello from upstream\n"), "{err}");

    // HTTPS without one: tunnelled untouched, so the sandbox sees the
    // upstream's own certificate (and must trust its CA itself).
    sandbox.write_file("upstream-ca.pem", ca.ca_pem.as_bytes()).await.unwrap();
    let (code, out, err) =
        sh(&sandbox, &format!("curl -sS -v --cacert /workspace/upstream-ca.pem https://tunnel.test:{s}/hello")).await;
    assert_eq!((code, out.as_str()), (Some(0), "hello from upstream\n"), "{err}");
    assert!(err.contains("airlock egress test upstream CA"), "the upstream's certificate, not a proxy's: {err}");
    assert_eq!(secure.seen().len(), 4);
    assert_eq!(secure.seen()[3].header("authorization"), None, "nothing is injected into a tunnel");

    // The credential is nowhere the sandbox can look. (The script names it
    // in two halves, so its own command line does not hold it.)
    let (head, tail) = TOKEN.split_at(TOKEN.len() / 2);
    let (_, out, _) = sh(
        &sandbox,
        &format!(
            "env; ps -eo args; cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'; \
             a='{head}'; b='{tail}'; grep -rsl \"$a$b\" /workspace /etc /run /tmp /home /root /var 2>/dev/null; echo done"
        ),
    )
    .await;
    assert!(out.ends_with("done\n"), "{out}");
    assert!(!out.contains(TOKEN), "the sandbox can see the credential:\n{out}");

    // Counted: allowed and denied requests, with bytes. (A decision is
    // recorded when its connection ends, which may be just after curl exits.)
    let query = UsageQuery { sandbox: Some("egress-basic".into()), ..UsageQuery::default() };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut usage = runtime.usage(&query).unwrap();
    while usage.egress.allowed + usage.egress.denied < 6 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        usage = runtime.usage(&query).unwrap();
    }
    assert_eq!(usage.egress.allowed, 5, "{:?}", usage.egress);
    assert_eq!(usage.egress.denied, 1, "{:?}", usage.egress);
    assert!(usage.egress.bytes_down > 0, "{:?}", usage.egress);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_narrowed_mid_task_applies_to_the_next_request() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path(), Vec::new()).await;
    let plain = Upstream::http(hello_routes()).await;
    let sandbox = sandbox(&runtime, "egress-narrow", ContainerRuntime::Runc).await;
    let _destroy = Destroy(runtime.clone(), "egress-narrow");
    let p = plain.port();
    let allow = json!({ "host": "upstream.test", "ports": [p], "connect_to": format!("127.0.0.1:{p}") });
    sandbox.set_network_policy(policy(json!({ "allow": [allow] }))).unwrap();
    // One process, requesting in a loop, one status per line.
    let script = format!(
        "while true; do curl -s -o /dev/null -w '%{{http_code}}\\n' http://upstream.test:{p}/hello >> /workspace/codes; sleep 0.1; done"
    );
    sandbox.start_process(ExecRequest::new("bash").args(["-c", &script])).await.unwrap();
    let codes = |sandbox: Sandbox| async move {
        String::from_utf8(sandbox.read_file("codes").await.unwrap_or_default()).unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !codes(sandbox.clone()).await.contains("200") {
        assert!(Instant::now() < deadline, "the loop never got through: {:?}", codes(sandbox.clone()).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Narrowed: a deny rule for the same host, while the loop runs.
    sandbox.set_network_policy(policy(json!({ "allow": [allow], "deny": ["upstream.test"] }))).unwrap();
    let served_before = plain.seen().len();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = codes(sandbox.clone()).await;
        let after_change = text.lines().skip_while(|line| *line == "200").collect::<Vec<_>>();
        if after_change.len() >= 3 {
            assert!(after_change.iter().all(|code| *code == "403"), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "no request after the change: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // At most the request in flight when the policy changed reached upstream.
    assert!(plain.seen().len() <= served_before + 1);
    sandbox.kill_processes().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_checkout_of_a_private_repository_takes_its_token_from_a_host_rule() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path(), Vec::new()).await;
    let repos = tempfile::tempdir().unwrap();
    let commit = bare_repository(repos.path(), "cloned through the egress proxy\n");
    let server = Upstream::http(static_files(&repos.path().join("site"), Some(format!("Bearer {TOKEN}")))).await;
    let p = server.port();
    runtime.set_secret("git-token", TOKEN).unwrap();
    let sandbox = sandbox(&runtime, "egress-git", ContainerRuntime::Runc).await;
    let _destroy = Destroy(runtime.clone(), "egress-git");
    let url = format!("http://git.test:{p}/repo.git");

    // Allowed, but without the token: the server refuses, and git says so.
    let reach = json!({ "host": "git.test", "ports": [p], "connect_to": format!("127.0.0.1:{p}") });
    sandbox.set_network_policy(policy(json!({ "allow": [reach] }))).unwrap();
    let refused = sandbox.git_checkout(&GitCheckout { url: url.clone(), dir: Some("first".into()), ..Default::default() }).await.unwrap();
    assert_ne!(refused.run.outcome.exit_code(), Some(0));
    assert_eq!(refused.commit, None);

    // With the host rule: cloned, at the server's commit.
    let mut with_token = reach.clone();
    with_token["headers"] = json!([{ "name": "Authorization", "secret": "git-token", "prefix": "Bearer " }]);
    sandbox.set_network_policy(policy(json!({ "allow": [with_token] }))).unwrap();
    let cloned = sandbox.git_checkout(&GitCheckout { url, dir: Some("src/repo".into()), depth: None, ..Default::default() }).await.unwrap();
    assert_eq!(cloned.run.outcome.exit_code(), Some(0), "{}", String::from_utf8_lossy(&cloned.run.outcome.stderr));
    assert_eq!(cloned.commit.as_deref(), Some(commit.as_str()));
    assert_eq!(sandbox.read_file("src/repo/README").await.unwrap(), b"cloned through the egress proxy\n");
    // The token is in no file of the workspace (.git/config included) and no process.
    let (head, tail) = TOKEN.split_at(TOKEN.len() / 2);
    let (_, out, _) = sh(
        &sandbox,
        &format!("cat /workspace/src/repo/.git/config; a='{head}'; b='{tail}'; grep -rsl \"$a$b\" /workspace; ps -eo args; echo done"),
    )
    .await;
    assert!(out.contains("url = http://git.test") && out.ends_with("done\n"), "{out}");
    assert!(!out.contains(TOKEN), "{out}");
    // Refused before git runs: credentials in the URL.
    let bad = GitCheckout { url: format!("http://user:{TOKEN}@git.test:{p}/repo.git"), ..Default::default() };
    assert!(sandbox.git_checkout(&bad).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pip_and_npm_install_from_indexes_on_loopback() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path(), Vec::new()).await;
    let packages = tempfile::tempdir().unwrap();
    // The npm registry's document names its tarball by the address the
    // sandbox uses, so its server starts first (reading files as asked) and
    // the packages are built once its port is known.
    let npm_root = packages.path().join("npm");
    let npm_routes: upstream::Routes = {
        let root = npm_root.clone();
        Arc::new(move |seen: &Seen| {
            let path = seen.path.split('?').next().unwrap_or_default().to_string();
            let file = if path == "/airlock-probe" { root.join("doc.json") } else { root.join(path.trim_start_matches('/')) };
            match std::fs::read(&file) {
                Ok(bytes) if !path.contains("..") => Answer::ok(bytes),
                _ => Answer::status(404, "not found"),
            }
        })
    };
    let npm = Upstream::http(npm_routes).await;
    let (n, built) = (npm.port(), packages.path());
    let status = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/egress/make_packages.py"))
        .arg(built)
        .arg(format!("http://registry.test:{n}"))
        .status()
        .expect("python3 on the host");
    assert!(status.success());
    let pypi = Upstream::http(static_files(&built.join("pypi"), None)).await;
    let p = pypi.port();
    let sandbox = sandbox(&runtime, "egress-packages", ContainerRuntime::Runc).await;
    let _destroy = Destroy(runtime.clone(), "egress-packages");
    sandbox
        .set_network_policy(policy(json!({ "allow": [
            { "host": "pypi.test", "ports": [p], "connect_to": format!("127.0.0.1:{p}") },
            { "host": "registry.test", "ports": [n], "connect_to": format!("127.0.0.1:{n}") },
        ]})))
        .unwrap();

    let (code, out, err) = sh(
        &sandbox,
        &format!(
            "pip install --quiet --user --break-system-packages --no-cache-dir \
               --index-url http://pypi.test:{p}/simple/ --trusted-host pypi.test airlock-probe \
             && python3 -c 'import airlock_probe; print(airlock_probe.MESSAGE)'"
        ),
    )
    .await;
    assert_eq!((code, out.as_str()), (Some(0), "installed through the airlock egress proxy\n"), "{err}");
    assert!(pypi.seen().iter().any(|seen| seen.path.ends_with(".whl")));

    let (code, out, err) = sh(
        &sandbox,
        &format!(
            "mkdir -p /workspace/app && cd /workspace/app && echo '{{}}' > package.json \
             && npm install --silent --no-audit --no-fund --registry http://registry.test:{n}/ airlock-probe \
             && node -e \"console.log(require('airlock-probe'))\""
        ),
    )
    .await;
    assert_eq!((code, out.as_str()), (Some(0), "installed through the airlock egress proxy\n"), "{err}");
    assert!(npm.seen().iter().any(|seen| seen.path.ends_with(".tgz")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_way_around_the_proxy_is_refused() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path(), Vec::new()).await;
    let plain = Upstream::http(hello_routes()).await;
    let p = plain.port();
    let sandbox = sandbox(&runtime, "egress-bypass", ContainerRuntime::Runc).await;
    let _destroy = Destroy(runtime.clone(), "egress-bypass");
    sandbox
        .set_network_policy(policy(json!({ "allow": [
            { "host": "upstream.test", "ports": [p], "connect_to": format!("127.0.0.1:{p}") },
            // Allowed by name, but the name is the host's loopback, which no rule names.
            { "host": "localhost", "ports": [p] },
            // Everything on port 80, which does not name the metadata address.
            { "host": "*", "ports": [80] },
        ]})))
        .unwrap();
    // The way that works, so the refusals below are not a broken sandbox.
    let (code, out, err) = sh(&sandbox, &format!("curl -sS http://upstream.test:{p}/hello")).await;
    assert_eq!((code, out.as_str()), (Some(0), "hello from upstream\n"), "{err}");
    let served = plain.seen().len();

    let attempts = [
        // Straight to the upstream's address, around the proxy.
        format!("curl -sS -m 5 --noproxy '*' http://127.0.0.1:{p}/hello"),
        format!("curl -sS -m 5 --noproxy '*' http://upstream.test:{p}/hello"),
        "curl -sS -m 5 --noproxy '*' http://1.1.1.1/".to_string(),
        // Raw and datagram sockets, and DNS.
        "python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)'".to_string(),
        "python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b\"x\", (\"8.8.8.8\", 53))'".to_string(),
        "getent hosts example.com".to_string(),
        // Through the proxy: an allowed name that resolves to loopback.
        format!("curl -sS -f -m 5 -x http://127.0.0.1:3128 --noproxy '' http://localhost:{p}/hello"),
        // The metadata address, though `*` is allowed on its port.
        "curl -sS -f -m 5 http://169.254.169.254/latest/meta-data/".to_string(),
        // A CONNECT to a port no rule allows.
        format!("curl -sS -m 5 https://upstream.test:{}/", p.wrapping_add(1)),
        "curl -sS -m 5 https://upstream.test:22/".to_string(),
    ];
    for attempt in &attempts {
        let (code, out, err) = sh(&sandbox, attempt).await;
        assert_ne!(code, Some(0), "{attempt} got through: {out} {err}");
    }
    assert_eq!(plain.seen().len(), served, "a bypass reached the upstream");
    // The loopback and metadata refusals are the proxy's, and say why.
    let (_, out, _) = sh(&sandbox, &format!("curl -sS -m 5 -x http://127.0.0.1:3128 --noproxy '' http://localhost:{p}/hello")).await;
    assert!(out.contains("internal address"), "{out}");
    let (_, out, _) = sh(&sandbox, "curl -sS -m 5 -w '\\n%{http_code}' http://169.254.169.254/latest/meta-data/").await;
    assert!(out.ends_with("\n403") && out.contains("169.254.169.254"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_runsc_the_proxy_is_the_way_out_too() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path(), Vec::new()).await;
    let plain = Upstream::http(hello_routes()).await;
    let p = plain.port();
    let sandbox = sandbox(&runtime, "egress-runsc", ContainerRuntime::Runsc).await;
    let _destroy = Destroy(runtime.clone(), "egress-runsc");
    sandbox
        .set_network_policy(policy(json!({ "allow": [
            { "host": "upstream.test", "ports": [p], "connect_to": format!("127.0.0.1:{p}") },
        ]})))
        .unwrap();
    let (code, out, err) = sh(&sandbox, &format!("curl -sS http://upstream.test:{p}/hello")).await;
    assert_eq!((code, out.as_str()), (Some(0), "hello from upstream\n"), "{err}");
    let (_, out, _) = sh(&sandbox, &format!("curl -sS -w '\\n%{{http_code}}' http://other.test:{p}/hello")).await;
    assert!(out.ends_with("\n403"), "{out}");
    let (code, _, _) = sh(&sandbox, &format!("curl -sS -m 5 --noproxy '*' http://127.0.0.1:{p}/hello")).await;
    assert_ne!(code, Some(0));
    assert_eq!(plain.seen().len(), 1);
}
