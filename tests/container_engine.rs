//! The engine set-up and the base image, against the real Docker engine.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "container/mod.rs"]
mod container;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use airlock::container::{
    ContainerRuntime, ContainerSandbox, DockerEngine, EngineOptions, ImageRecipe, RECIPE_LABEL, SandboxSpec,
    ensure_base_image, image_exists,
};
use airlock::{ExecRequest, Limits, SandboxId};
use container::{TestSandbox, bash, engine_and_image};

#[tokio::test]
async fn setting_up_again_changes_nothing() {
    let (first, _) = engine_and_image().await;
    let pid = std::fs::read_to_string("/var/run/docker.pid").unwrap();
    let config = std::fs::read_to_string("/etc/docker/daemon.json").unwrap();
    let again = DockerEngine::connect_or_setup(&EngineOptions::default()).await.unwrap();
    assert!(first.has_runtime(ContainerRuntime::Runsc) && again.has_runtime(ContainerRuntime::Runsc));
    assert_eq!(std::fs::read_to_string("/var/run/docker.pid").unwrap(), pid, "dockerd was restarted");
    assert_eq!(std::fs::read_to_string("/etc/docker/daemon.json").unwrap(), config, "daemon.json was rewritten");
    // Connecting without set-up to a socket with nothing behind it names what is missing.
    let nowhere = EngineOptions {
        socket: std::env::temp_dir().join("no-docker-here.sock"),
        set_up: false,
        ..EngineOptions::default()
    };
    let missing = DockerEngine::connect_or_setup(&nowhere).await.unwrap_err().to_string();
    assert!(missing.contains("no-docker-here.sock") && missing.contains("--bridge=none"), "{missing}");
}

#[tokio::test]
async fn the_base_image_is_found_again_not_rebuilt() {
    let (engine, image) = engine_and_image().await;
    assert_eq!(image, ImageRecipe::default().tag());
    let lines = Arc::new(AtomicUsize::new(0));
    let counter = lines.clone();
    let found =
        ensure_base_image(&engine, &ImageRecipe::default(), Arc::new(move |_: &str| {
            counter.fetch_add(1, Ordering::SeqCst);
        }))
        .await
        .unwrap();
    assert_eq!(found, image);
    assert_eq!(lines.load(Ordering::SeqCst), 0, "an existing image reported build progress");
    let inspected = engine.docker().inspect_image(&image).await.unwrap();
    let labels = inspected.config.unwrap().labels.unwrap();
    assert_eq!(labels.get(RECIPE_LABEL), Some(&ImageRecipe::default().hash()));
    let mut changed = ImageRecipe::default();
    changed.packages.push("make".into());
    assert!(!image_exists(&engine, &changed.tag()).await.unwrap(), "a changed recipe must name a new image");
}

#[tokio::test]
async fn the_base_image_has_the_tools_and_an_unprivileged_user() {
    let test = TestSandbox::new(ContainerRuntime::Runc).await;
    let tools = "set -e; bash --version | head -1; git --version; python3 --version; node --version; \
                 npm --version; curl --version | head -1; ps --version; id -un; id -u; \
                 test -f /etc/ssl/certs/ca-certificates.crt && echo certificates";
    let limits = Limits { deadline: std::time::Duration::from_secs(60), ..Limits::default() };
    let outcome = test.sandbox.exec(bash(tools).limits(limits)).await.unwrap();
    assert!(outcome.success(), "{}", outcome.stderr_text());
    let text = outcome.stdout_text();
    for expected in ["GNU bash", "git version", "Python 3", "v18", "curl", "procps", "sandbox\n1000\n", "certificates"] {
        assert!(text.contains(expected), "{expected:?} missing from:\n{text}");
    }
    // A git commit and an npm project work as the unprivileged user in /workspace.
    let work = "git init -q && git -c user.email=a@b -c user.name=a commit -q --allow-empty -m first && git log --oneline | wc -l && npm init -y >/dev/null && test -f package.json && echo npm-ok";
    let outcome = test.sandbox.exec(ExecRequest::new("bash").args(["-c", work]).limits(limits)).await.unwrap();
    assert_eq!(outcome.stdout_text(), "1\nnpm-ok\n", "{}", outcome.stderr_text());
    assert!(test.path("package.json").is_file());
}

#[tokio::test]
async fn a_sandbox_may_name_another_local_image() {
    let (engine, image) = engine_and_image().await;
    let (repo, tag) = ("airlock/test-another-image", "1");
    let options = bollard::query_parameters::TagImageOptionsBuilder::new().repo(repo).tag(tag).build();
    engine.docker().tag_image(&image, Some(options)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = SandboxSpec::new(SandboxId::new().to_string(), format!("{repo}:{tag}"), dir.path());
    let sandbox = ContainerSandbox::create_started(&engine, spec).await.unwrap();
    let outcome = sandbox.exec(ExecRequest::new("true")).await;
    sandbox.remove().await.unwrap();
    assert!(outcome.unwrap().success());
}
