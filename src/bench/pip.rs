//! `pip-install`: the ai-sandbox-benchmark's package install, adapted to
//! stay on the host's loopback. A pure-Python wheel and its PEP 503 index are
//! built by tests/egress/make_packages.py (standard library only, run by the
//! host's python3) and served by the bench's loopback upstream; each
//! repetition gets a fresh container sandbox (created, started and given its
//! policy untimed), then `pip install --user --break-system-packages
//! --index-url http://<name>:<port>/simple/ --trusted-host <name>` runs
//! through its egress proxy, timed. The import is checked afterwards, untimed.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use airlock::ExecRequest;
use airlock::container::ContainerRuntime;
use anyhow::{Context, Result, bail};
use serde_json::{Map, json};

use super::egress::loopback_policy;
use super::report::CaseResult;
use super::suite::{Case, Kind, Suite, container_config, finish, run_command, skipped};
use super::upstream::Upstream;

/// The builder, the same file the egress tests use.
const MAKE_PACKAGES: &str = include_str!("../../tests/egress/make_packages.py");
/// The index's name in the sandbox's policy.
const INDEX_HOST: &str = "bench-pypi.test";
/// What the installed module says.
const PROBE_MESSAGE: &str = "installed through the airlock egress proxy";

/// Every file under `root`, by URL path.
fn files_under(root: &Path) -> Result<HashMap<String, Vec<u8>>> {
    let mut files = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let relative = path.strip_prefix(root)?.to_string_lossy().replace('\\', "/");
                files.insert(format!("/{relative}"), std::fs::read(&path)?);
            }
        }
    }
    Ok(files)
}

impl Suite {
    pub(super) async fn pip_install(&mut self, case: &Case) -> Vec<CaseResult> {
        let counts = self.plan.counts(Kind::Pip);
        let mut meta = Self::meta(case, "container/runc", "egress-proxy");
        meta.what = format!(
            "`pip install --user --break-system-packages --no-cache-dir --index-url http://{INDEX_HOST}:PORT/simple/ --trusted-host {INDEX_HOST} airlock-probe` in a fresh container sandbox (made untimed), through its egress proxy"
        );
        if run_command("python3", vec!["-c".into(), "pass".into()]).await.is_err() {
            return vec![skipped(meta, counts, "no python3 on the host to build the wheel".into())];
        }
        let samples = async {
            let scratch = tempfile::tempdir().context("a directory for the packages")?;
            let script = scratch.path().join("make_packages.py");
            std::fs::write(&script, MAKE_PACKAGES)?;
            let out = scratch.path().join("out");
            run_command(
                "python3",
                vec![
                    script.to_string_lossy().into_owned(),
                    out.to_string_lossy().into_owned(),
                    "http://unused.test".into(),
                ],
            )
            .await
            .context("building the wheel")?;
            let upstream = Upstream::start(files_under(&out.join("pypi"))?).await?;
            let port = upstream.port();
            let install = format!(
                "pip install --quiet --user --break-system-packages --no-cache-dir --index-url http://{INDEX_HOST}:{port}/simple/ --trusted-host {INDEX_HOST} airlock-probe"
            );
            let mut samples = Vec::with_capacity(counts.1);
            for repetition in 0..counts.0 + counts.1 {
                let sandbox = self.new_sandbox(container_config(ContainerRuntime::Runc)).await?;
                let timed = async {
                    sandbox.set_network_policy(loopback_policy(INDEX_HOST, port)?)?;
                    sandbox.exec(ExecRequest::new("true")).await.context("starting the container")?;
                    let started = Instant::now();
                    let answer = sandbox.exec(ExecRequest::new("bash").args(["-c", &install])).await?;
                    let elapsed = started.elapsed();
                    if answer.outcome.exit_code() != Some(0) {
                        bail!("pip exited {:?}: {}", answer.outcome.exit_code(), answer.outcome.stderr_text().trim());
                    }
                    let check = sandbox
                        .exec(ExecRequest::new("python3").args(["-c", "import airlock_probe; print(airlock_probe.MESSAGE)"]))
                        .await?;
                    if check.outcome.stdout_text().trim() != PROBE_MESSAGE {
                        bail!("the installed module is not there: {}", check.outcome.stderr_text().trim());
                    }
                    anyhow::Ok::<Duration>(elapsed)
                }
                .await;
                self.destroy(&sandbox).await;
                let elapsed = timed.with_context(|| format!("repetition {}", repetition + 1))?;
                if repetition >= counts.0 {
                    samples.push(elapsed.as_secs_f64() * 1000.0);
                }
            }
            anyhow::Ok(samples)
        }
        .await;
        let mut extra = Map::new();
        extra.insert("index".into(), json!("PEP 503 on the host's loopback (tests/egress/make_packages.py)"));
        extra.insert("package".into(), json!("airlock-probe 1.0 (pure-Python wheel)"));
        vec![finish(meta, counts, samples, extra)]
    }
}
