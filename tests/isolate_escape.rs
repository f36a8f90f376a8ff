//! Every way out of /workspace is denied: `..`, absolute paths, /proc,
//! /etc/passwd, symlinks (made by the host or by the guest) and hard links.
//! After each attempt the workspace is intact and the host outside is untouched.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

mod common;

use airlock::{ExecRequest, Termination};
use common::{Fixture, SECRET, engine, guest};

async fn attempt(mode: &str, prepare: impl FnOnce(&Fixture)) {
    let fixture = Fixture::new();
    std::fs::write(fixture.path("keep.txt"), "workspace file").unwrap();
    prepare(&fixture);
    let outside_before = fixture.outside_snapshot();

    let escape = engine().load_file(guest("escape.wasm")).unwrap();
    let outcome = engine().run(&escape, &fixture.workspace, &ExecRequest::new("escape").args([mode])).await.unwrap();
    let report = outcome.stdout_text();

    let attempts: Vec<&str> = report.lines().filter(|l| l.starts_with("DENIED") || l.starts_with("ESCAPED")).collect();
    assert!(attempts.len() >= 3, "{mode}: too few attempts reported:\n{report}{}", outcome.stderr_text());
    assert!(attempts.iter().all(|l| l.starts_with("DENIED")), "{mode}: an attempt got through:\n{report}");
    assert_eq!(outcome.termination, Termination::Exited { code: 0 }, "{mode}:\n{report}");
    assert!(!report.contains(SECRET.trim()), "{mode}: the secret leaked:\n{report}");

    assert_eq!(fixture.outside_snapshot(), outside_before, "{mode}: something outside the workspace changed");
    assert_eq!(std::fs::read_to_string(fixture.parent.path().join("secret.txt")).unwrap(), SECRET);
    assert_eq!(std::fs::read_to_string(fixture.path("keep.txt")).unwrap(), "workspace file");
}

#[tokio::test]
async fn dot_dot_paths_are_denied() {
    attempt("dotdot", |_| {}).await;
}

#[tokio::test]
async fn absolute_paths_and_etc_passwd_are_denied() {
    attempt("absolute", |_| {}).await;
}

#[tokio::test]
async fn proc_is_not_there() {
    attempt("proc", |_| {}).await;
}

#[tokio::test]
async fn host_made_symlinks_pointing_out_are_not_followed() {
    attempt("symlink-follow", |fixture| {
        std::os::unix::fs::symlink("../secret.txt", fixture.path("link-out")).unwrap();
        std::os::unix::fs::symlink("..", fixture.path("dir-out")).unwrap();
    })
    .await;
}

#[tokio::test]
async fn guest_made_symlinks_pointing_out_are_not_followed() {
    attempt("symlink-create", |_| {}).await;
}

#[tokio::test]
async fn hard_links_across_the_boundary_are_denied() {
    attempt("hardlink", |_| {}).await;
}
