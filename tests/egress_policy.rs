//! A sandbox's network policy and the runtime's secret store, through the
//! runtime and the `airlock` CLI (issue 13, the policy part):
//!
//! - a policy set on a live sandbox is stored, read back, and still there
//!   after the runtime is reopened; it may also be given at creation;
//! - an invalid policy, or one naming a secret that does not exist, is a
//!   typed error and changes nothing (neither the stored policy nor the one
//!   published to the proxy);
//! - a watch receiver sees a change at once, with the runtime's denied hosts
//!   always added;
//! - a secret's value never appears in a listing, a policy, a sandbox's info
//!   or anywhere under the sandboxes' directories, and a secret a policy
//!   names cannot be removed;
//! - the CLI shows and changes policies and stores secrets from stdin only,
//!   in process and through the server that owns the home.
//!
//! Nothing here runs a sandbox's code: no Docker engine is needed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use airlock::runtime::{
    DiskOptions, Error, HostPattern, NetworkPolicy, Policy, PolicyError, QuotaMode, Runtime, RuntimeOptions,
    SandboxConfig,
};
use serde_json::{Value, json};

const SECRET_VALUE: &str = "ghp_NeverShowThisValue_0123456789";

fn policy(value: Value) -> NetworkPolicy {
    serde_json::from_value(value).unwrap()
}

/// A policy that adds the secret `gh-token` to requests to api.github.com.
fn with_credentials() -> NetworkPolicy {
    policy(json!({
        "allow": [
            { "host": "api.github.com", "ports": [443], "methods": ["GET"],
              "headers": [{ "name": "Authorization", "secret": "gh-token", "prefix": "Bearer " }] },
            { "host": "*.pypi.org" },
        ],
        "deny": ["evil.pypi.org"],
    }))
}

async fn open(home: &Path) -> Runtime {
    let mut options = RuntimeOptions::new(home);
    options.isolates.cache_dir = Some(Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-cache"));
    options.disk = DiskOptions { quotas: QuotaMode::Off, ..DiskOptions::default() };
    options.reconcile = false;
    options.network_deny = vec![HostPattern::new("metadata.google.internal").unwrap()];
    Runtime::open(options).await.unwrap()
}

#[tokio::test]
async fn a_policy_round_trips_through_the_runtime_and_survives_reopening() {
    let home = tempfile::tempdir().unwrap();
    let runtime = open(home.path()).await;
    let sandbox = runtime.sandbox("web").await.unwrap();
    assert_eq!(runtime.network_policy("web").unwrap(), NetworkPolicy::deny_all(), "deny-all by default");
    runtime.set_secret("gh-token", SECRET_VALUE).unwrap();
    runtime.set_network_policy("web", with_credentials()).unwrap();
    assert_eq!(runtime.network_policy("web").unwrap(), with_credentials());
    assert_eq!(sandbox.network_policy(), with_credentials(), "another handle on the sandbox sees it");
    assert_eq!(sandbox.info().config.policy.network, with_credentials());
    assert!(matches!(runtime.network_policy("nobody"), Err(Error::NoSuchSandbox(_))));
    assert!(matches!(runtime.set_network_policy("nobody", with_credentials()), Err(Error::NoSuchSandbox(_))));
    drop((sandbox, runtime));

    let runtime = open(home.path()).await;
    assert_eq!(runtime.network_policy("web").unwrap(), with_credentials(), "lost on reopening");
    let listed = runtime.list().unwrap();
    assert_eq!(listed[0].config.policy.network, with_credentials());
    // Another sandbox kept its own (deny-all) policy.
    runtime.sandbox("other").await.unwrap();
    assert_eq!(runtime.network_policy("other").unwrap(), NetworkPolicy::deny_all());
}

#[tokio::test]
async fn an_invalid_policy_is_refused_and_nothing_changes() {
    let home = tempfile::tempdir().unwrap();
    let runtime = open(home.path()).await;
    runtime.sandbox("strict").await.unwrap();
    let first = policy(json!({ "allow": [{ "host": "pypi.org" }] }));
    runtime.set_network_policy("strict", first.clone()).unwrap();
    let mut watch = runtime.network_policy_watch("strict").unwrap();
    watch.borrow_and_update();

    let port_zero = policy(json!({ "allow": [{ "host": "a.test", "ports": [0] }] }));
    assert!(matches!(runtime.set_network_policy("strict", port_zero), Err(Error::Policy(PolicyError::Port))));
    let lower_case_method = policy(json!({ "allow": [{ "host": "a.test", "methods": ["get"] }] }));
    assert!(matches!(
        runtime.set_network_policy("strict", lower_case_method),
        Err(Error::Policy(PolicyError::Method { .. }))
    ));
    let host_header =
        policy(json!({ "allow": [{ "host": "a.test", "headers": [{ "name": "Host", "secret": "s" }] }] }));
    assert!(matches!(
        runtime.set_network_policy("strict", host_header),
        Err(Error::Policy(PolicyError::Header { .. }))
    ));
    let too_many =
        NetworkPolicy { allow: vec![first.allow[0].clone(); airlock::runtime::MAX_ALLOW_RULES + 1], deny: Vec::new() };
    assert!(matches!(runtime.set_network_policy("strict", too_many), Err(Error::Policy(PolicyError::TooMany { .. }))));
    // A secret that does not exist: the error names it.
    let error = runtime.set_network_policy("strict", with_credentials()).unwrap_err();
    assert!(matches!(&error, Error::NoSuchSecret(name) if name == "gh-token"), "{error}");
    assert!(error.to_string().contains("gh-token"), "{error}");

    assert_eq!(runtime.network_policy("strict").unwrap(), first, "a refused policy changed the stored one");
    assert!(!watch.has_changed().unwrap(), "a refused policy was published");
    drop(runtime);
    assert_eq!(open(home.path()).await.network_policy("strict").unwrap(), first);
}

#[tokio::test]
async fn a_watch_receiver_sees_a_change_at_once_with_the_runtime_deny_list() {
    let home = tempfile::tempdir().unwrap();
    let runtime = open(home.path()).await;
    runtime.sandbox("live").await.unwrap();
    let mut watch = runtime.network_policy_watch("live").unwrap();
    {
        let current = watch.borrow_and_update();
        assert!(current.allow.is_empty());
        assert_eq!(current.deny, [HostPattern::new("metadata.google.internal").unwrap()]);
    }
    let widened = policy(json!({ "allow": [{ "host": "*" }] }));
    runtime.set_network_policy("live", widened).unwrap();
    // Already there: no waiting, no restart.
    assert!(watch.has_changed().unwrap());
    let seen = watch.borrow_and_update().clone();
    assert!(matches!(seen.decide("pypi.org", 443, None), airlock::runtime::Verdict::Allow(_)));
    assert!(
        matches!(seen.decide("metadata.google.internal", 80, None), airlock::runtime::Verdict::Deny(_)),
        "the runtime's denied host is allowed by a sandbox's policy"
    );
    // The sandbox's own policy does not carry the runtime's list.
    assert!(runtime.network_policy("live").unwrap().deny.is_empty());

    // Narrowed mid-task: a receiver waiting for the change wakes.
    let waiter = tokio::spawn(async move {
        watch.changed().await.unwrap();
        watch.borrow_and_update().clone()
    });
    runtime.set_network_policy("live", NetworkPolicy::deny_all()).unwrap();
    let narrowed = tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
    assert!(matches!(narrowed.decide("pypi.org", 443, None), airlock::runtime::Verdict::Deny(_)));

    // Destroying the sandbox closes the channel.
    let mut watch = runtime.network_policy_watch("live").unwrap();
    runtime.destroy("live").await.unwrap();
    assert!(tokio::time::timeout(Duration::from_secs(5), watch.changed()).await.unwrap().is_err());
}

#[tokio::test]
async fn a_policy_given_at_creation_must_name_existing_secrets() {
    let home = tempfile::tempdir().unwrap();
    let runtime = open(home.path()).await;
    let config = SandboxConfig { policy: Policy { network: with_credentials() }, ..SandboxConfig::default() };
    let error = runtime.sandbox_with("born", config.clone()).await.unwrap_err();
    assert!(matches!(&error, Error::NoSuchSecret(name) if name == "gh-token"), "{error}");
    assert!(runtime.get("born").unwrap().is_none(), "a sandbox was made");
    let left: Vec<_> = std::fs::read_dir(home.path().join("sandboxes")).unwrap().collect();
    assert!(left.is_empty(), "a refused sandbox left its directory: {left:?}");
    let bad = SandboxConfig {
        policy: Policy { network: policy(json!({ "allow": [{ "host": "a.test", "ports": [0] }] })) },
        ..SandboxConfig::default()
    };
    assert!(matches!(runtime.sandbox_with("bad", bad).await, Err(Error::Policy(_))));

    runtime.set_secret("gh-token", SECRET_VALUE).unwrap();
    let sandbox = runtime.sandbox_with("born", config).await.unwrap();
    assert_eq!(sandbox.network_policy(), with_credentials());
    assert_eq!(sandbox.network_policy_watch().borrow().allow, with_credentials().allow);
}

/// Every regular file under `dir`, recursively (links not followed).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                found.push(entry.path());
            }
        }
    }
    found
}

#[tokio::test]
async fn secret_values_never_appear_in_lists_policies_or_the_sandbox() {
    let home = tempfile::tempdir().unwrap();
    let runtime = open(home.path()).await;
    let sandbox = runtime.sandbox("holder").await.unwrap();
    sandbox.write_file("notes.txt", b"the sandbox's own file").await.unwrap();
    runtime.set_secret("gh-token", SECRET_VALUE).unwrap();
    runtime.set_network_policy("holder", with_credentials()).unwrap();

    let listed = runtime.list_secrets().unwrap();
    assert_eq!(listed.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["gh-token"]);
    assert_eq!(runtime.secret_names().unwrap(), ["gh-token"]);
    let shown = [
        format!("{listed:?}"),
        serde_json::to_string(&runtime.network_policy("holder").unwrap()).unwrap(),
        serde_json::to_string(&sandbox.info()).unwrap(),
        serde_json::to_string(&runtime.list().unwrap()).unwrap(),
        format!("{:?}", runtime.network_policy_watch("holder").unwrap().borrow()),
        format!("{:?}", runtime.secrets()),
    ];
    for text in shown {
        assert!(!text.contains(SECRET_VALUE), "the value is shown: {text}");
    }
    for file in files_under(&home.path().join("sandboxes")) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !bytes.windows(SECRET_VALUE.len()).any(|window| window == SECRET_VALUE.as_bytes()),
            "{} holds the value",
            file.display()
        );
    }

    // The proxy's accessor reads it, and a new value applies at once.
    let secrets = runtime.secrets();
    assert_eq!(secrets.secret("gh-token").as_deref(), Some(SECRET_VALUE));
    assert_eq!(secrets.secret("missing"), None);
    runtime.set_secret("gh-token", "rotated-value").unwrap();
    assert_eq!(secrets.secret("gh-token").as_deref(), Some("rotated-value"));
    // Values that could break a header, and bad names, are refused.
    assert!(matches!(runtime.set_secret("gh-token", "a\r\nX-Evil: 1"), Err(Error::Invalid { .. })));
    assert!(matches!(runtime.set_secret("Bad Name", "v"), Err(Error::Invalid { .. })));
    assert_eq!(secrets.secret("gh-token").as_deref(), Some("rotated-value"));

    // A secret a policy names cannot be removed; once no policy names it, it can.
    match runtime.remove_secret("gh-token") {
        Err(Error::SecretInUse { name, sandboxes }) => {
            assert_eq!((name.as_str(), sandboxes), ("gh-token", vec!["holder".to_string()]))
        }
        other => panic!("expected secret-in-use, got {other:?}"),
    }
    runtime.set_network_policy("holder", NetworkPolicy::deny_all()).unwrap();
    assert!(runtime.remove_secret("gh-token").unwrap());
    assert!(!runtime.remove_secret("gh-token").unwrap());
    assert_eq!(secrets.secret("gh-token"), None);
    // The accessor does not keep the runtime alive.
    runtime.set_secret("kept", "v").unwrap();
    drop((sandbox, runtime));
    assert_eq!(secrets.secret("kept"), None);
}

// The CLI.

fn airlock(home: &Path, args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(args)
        .env("AIRLOCK_HOME", home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn succeeded(output: &Output) -> String {
    assert!(output.status.success(), "{}", text(&output.stderr));
    text(&output.stdout)
}

fn failed(output: &Output, expected: &str) {
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "succeeded: {}", text(&output.stdout));
    assert!(stderr.contains(expected), "expected {expected:?} in {stderr}");
}

fn shown(output: &Output) -> NetworkPolicy {
    serde_json::from_str(&succeeded(output)).unwrap()
}

/// The policy and secret commands, against `home` (opened by each command,
/// or reached through the server that owns it).
fn exercise_the_cli(home: &Path) {
    assert_eq!(shown(&airlock(home, &["policy", "cli", "show"], b"")), NetworkPolicy::deny_all());
    // A secret's value comes from stdin only.
    failed(&airlock(home, &["secret", "set", "gh-token", SECRET_VALUE], b""), "unexpected argument");
    let stored = airlock(home, &["secret", "set", "gh-token"], format!("{SECRET_VALUE}\n").as_bytes());
    assert!(!text(&stored.stdout).contains(SECRET_VALUE) && !text(&stored.stderr).contains(SECRET_VALUE));
    succeeded(&stored);
    failed(&airlock(home, &["secret", "set", "empty"], b"\n"), "no secret on stdin");

    let allowed = shown(&airlock(
        home,
        &[
            "policy",
            "cli",
            "allow",
            "api.github.com",
            "--port",
            "443",
            "--method",
            "get",
            "--header",
            "Authorization=gh-token:Bearer ",
        ],
        b"",
    ));
    assert_eq!(allowed.allow.len(), 1);
    assert_eq!(allowed.allow[0].methods, ["GET"]);
    assert_eq!(allowed.allow[0].headers[0].prefix, "Bearer ");
    let more = shown(&airlock(home, &["policy", "cli", "allow", "*.pypi.org"], b""));
    assert_eq!(more.allow.len(), 2);
    let denied = shown(&airlock(home, &["policy", "cli", "deny", "evil.pypi.org"], b""));
    assert_eq!(denied, with_credentials());
    // Allowing a host again replaces its rule.
    let again = shown(&airlock(home, &["policy", "cli", "allow", "*.pypi.org", "--port", "8443"], b""));
    assert_eq!((again.allow.len(), again.allow[1].ports.as_slice()), (2, [8443].as_slice()));
    // Refused, with nothing changed: a missing secret, a bad host, a bad file.
    failed(&airlock(home, &["policy", "cli", "allow", "x.test", "--header", "A=nope"], b""), "nope");
    failed(&airlock(home, &["policy", "cli", "allow", "bad host"], b""), "bad host");
    let port_zero = br#"{"allow":[{"host":"a.test","ports":[0]}]}"#;
    failed(&airlock(home, &["policy", "cli", "set", "--file", "-"], port_zero), "port 0");
    failed(&airlock(home, &["policy", "cli", "set", "--file", "-"], br#"{"allow":[],"extra":1}"#), "extra");
    assert_eq!(shown(&airlock(home, &["policy", "cli", "show"], b"")), again);
    // Secrets in use are kept; the list shows names only.
    failed(&airlock(home, &["secret", "rm", "gh-token"], b""), "cli");
    let listed = succeeded(&airlock(home, &["secret", "list"], b""));
    assert!(listed.contains("gh-token") && !listed.contains(SECRET_VALUE), "{listed}");
    let show = succeeded(&airlock(home, &["policy", "cli", "show"], b""));
    assert!(!show.contains(SECRET_VALUE), "{show}");
    // set from a file, then clear.
    let file = home.join("policy.json");
    std::fs::write(&file, serde_json::to_vec(&with_credentials()).unwrap()).unwrap();
    assert_eq!(
        shown(&airlock(home, &["policy", "cli", "set", "--file", file.to_str().unwrap()], b"")),
        with_credentials()
    );
    assert_eq!(shown(&airlock(home, &["policy", "cli", "clear"], b"")), NetworkPolicy::deny_all());
    succeeded(&airlock(home, &["secret", "rm", "gh-token"], b""));
    failed(&airlock(home, &["secret", "rm", "gh-token"], b""), "no secret");
    assert!(!succeeded(&airlock(home, &["secret", "list"], b"")).contains("gh-token"));
    failed(&airlock(home, &["policy", "nobody", "show"], b""), "nobody");
}

#[test]
fn the_cli_shows_and_changes_policies_and_keeps_secrets_off_the_command_line() {
    let home = tempfile::tempdir().unwrap();
    succeeded(&airlock(home.path(), &["sandbox", "create", "cli"], b""));
    exercise_the_cli(home.path());
}

/// `airlock serve` on a home, stopped with SIGTERM when dropped.
struct Served {
    child: Child,
    base: String,
}

impl Served {
    fn start(home: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
            .args(["serve", "--listen", "127.0.0.1:0", "--home"])
            .arg(home)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let base = line.trim().rsplit(' ').next().unwrap().to_string();
        assert!(base.starts_with("http://127.0.0.1:"), "{line}");
        Self { child, base }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_goes_through_the_server_that_owns_the_home() {
    let home = tempfile::tempdir().unwrap();
    let served = Served::start(home.path());
    let token = std::fs::read_to_string(home.path().join("admin.token")).unwrap().trim().to_string();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    succeeded(&airlock(home.path(), &["sandbox", "create", "cli"], b""));
    let home_path = home.path().to_path_buf();
    tokio::task::spawn_blocking(move || exercise_the_cli(&home_path)).await.unwrap();
    // What the CLI did went through the server: it sees the last policy and secrets.
    let policy: Value = client
        .get(format!("{}/sandboxes/cli/network", served.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(policy, json!({}));
    let piped = airlock(home.path(), &["secret", "set", "through-server"], b"value-via-socket");
    succeeded(&piped);
    let secrets: Value = client
        .get(format!("{}/secrets", served.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(secrets.as_array().unwrap().len(), 1);
    assert_eq!(secrets[0]["name"], "through-server");
    assert!(!secrets.to_string().contains("value-via-socket"));
}
