//! `airlock serve`'s limits come from its flags: the evaluation gate's slots
//! and queue show in `/metrics`, a runtime-wide denied host lands in every
//! sandbox's policy in force, and a value out of range is refused at once
//! with the flag named and nothing started.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const AIRLOCK: &str = env!("CARGO_BIN_EXE_airlock");

/// Starts `airlock serve` with `flags`; returns the child and its base URL.
fn serve(home: &Path, flags: &[&str]) -> (std::process::Child, String) {
    let mut child = Command::new(AIRLOCK)
        .args(["serve", "--listen", "127.0.0.1:0", "--home"])
        .arg(home)
        .args(flags)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
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
    let base = first.trim().strip_prefix("airlock: listening on ").unwrap().trim_end_matches("/v1").to_string();
    (child, base)
}

fn stop(mut child: std::process::Child) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
}

#[tokio::test]
async fn the_gate_comes_from_the_flags() {
    let home = tempfile::tempdir().unwrap();
    let (child, base) = serve(home.path(), &["--max-concurrent-evaluations", "3", "--max-queued-evaluations", "7"]);
    let token = std::fs::read_to_string(home.path().join("admin.token")).unwrap();
    let metrics = reqwest::Client::new()
        .get(format!("{base}/metrics"))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    stop(child);
    assert!(metrics.lines().any(|line| line == "airlock_evaluation_slots 3"), "{metrics}");
}

/// A sandbox whose own policy allows a host (reached on a loopback listener
/// named by `connect_to`) is refused it when `--network-deny` names it: the
/// proxy answers 403 "denies this host" instead of connecting. Needs Docker.
#[tokio::test]
async fn a_deny_flag_is_in_force_whatever_a_sandbox_allows() {
    let home = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (child, base) = serve(home.path(), &["--network-deny", "*.Blocked.test"]);
    let token = std::fs::read_to_string(home.path().join("admin.token")).unwrap();
    let client = reqwest::Client::new();
    let created = client
        .post(format!("{base}/v1/sandboxes"))
        .bearer_auth(token.trim())
        .json(&serde_json::json!({ "name": "deny-flag", "config": { "tier": "container" } }))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{}", created.text().await.unwrap());
    let rule =
        serde_json::json!({ "host": "x.blocked.test", "ports": [port], "connect_to": format!("127.0.0.1:{port}") });
    let answer = client
        .put(format!("{base}/v1/sandboxes/deny-flag/network"))
        .bearer_auth(token.trim())
        .json(&serde_json::json!({ "allow": [rule] }))
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success(), "{}", answer.text().await.unwrap());
    let script = format!("curl -sS -w '\\n%{{http_code}}' http://x.blocked.test:{port}/");
    let exec = client
        .post(format!("{base}/v1/sandboxes/deny-flag/exec"))
        .bearer_auth(token.trim())
        .json(&serde_json::json!({ "command": "bash", "args": ["-c", script] }))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = exec.json().await.unwrap();
    // The refusal is counted in /metrics (recorded just after the answer).
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics =
            client.get(format!("{base}/metrics")).bearer_auth(token.trim()).send().await.unwrap().text().await.unwrap();
        if metrics.contains("airlock_egress_requests_total{verdict=\"denied\"} 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = client.delete(format!("{base}/v1/sandboxes/deny-flag")).bearer_auth(token.trim()).send().await;
    stop(child);
    let stdout = body["stdout"].as_str().unwrap_or_default().to_string();
    assert!(stdout.ends_with("\n403") && stdout.contains("denies this host"), "{body}");
    assert!(metrics.contains("airlock_egress_requests_total{verdict=\"denied\"} 1"), "{metrics}");
    assert!(metrics.contains("airlock_egress_requests_total{verdict=\"allowed\"} 0"), "{metrics}");
}

#[test]
fn out_of_range_values_are_refused_naming_the_flag() {
    let home = tempfile::tempdir().unwrap();
    for (flag, value) in [
        ("--max-concurrent-evaluations", "0"),
        ("--max-concurrent-evaluations", "100000"),
        ("--max-queue-wait", "0"),
        ("--request-timeout", "soon"),
        ("--network-deny", "not a host"),
    ] {
        let mut child = Command::new(AIRLOCK)
            .args(["serve", "--listen", "127.0.0.1:0", "--home"])
            .arg(home.path())
            .args([flag, value])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = String::new();
        child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success(), "{flag} {value} was accepted");
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
        // Nothing was started: no admin token, no registry.
        assert!(!home.path().join("admin.token").exists());
    }
}
