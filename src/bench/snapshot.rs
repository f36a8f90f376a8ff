//! Snapshots (issue 15), the seed's case offline: a sandbox holding a
//! "repository" ([`REPO_FILES`] files in nested directories, [`REPO_BYTES`]
//! in all, written in the container by a seeded Python script) and its
//! dependency installed with `pip install --user` (into the container's
//! writable layer, `/home/sandbox/.local`) from a PEP 503 index on the host's
//! loopback, through the sandbox's egress proxy (the `pip-install` case's
//! wheel). Timed in the same run, each answer checked (file count, a SHA-256
//! over every path and its bytes, the import) untimed:
//!
//! - `snapshot-create`: `Sandbox::snapshot` of that sandbox, its container running;
//! - `snapshot-restore`: `Sandbox::restore` after the repository and the
//!   install were changed, until a first command (`true`) has answered;
//! - `snapshot-rebuild`: the baseline, the same state from scratch: a new
//!   container sandbox made and started, the files written again, the pip
//!   install again;
//! - `snapshot-fork-4`: `Runtime::fork_snapshot` into 4 sandboxes, until each
//!   has answered `true`;
//! - `snapshot-rebuild-4`: 4 new sandboxes set up from scratch at once.
//!
//! The rebuild writes its files with a local script, faster than a clone over
//! a network: the baseline is the cheapest from-scratch set-up, not a slow one.
//!
//! Run: `airlock bench --only snapshot` (as root: snapshots need the home's
//! btrfs disk).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use airlock::container::ContainerRuntime;
use airlock::{ExecRequest, Sandbox};
use anyhow::{Context, Result, bail};
use serde_json::{Map, json};

use super::egress::loopback_policy;
use super::report::CaseResult;
use super::suite::{Case, Kind, Suite, container_config, finish, run_command, skipped};
use super::upstream::Upstream;

/// Files in the repository.
const REPO_FILES: usize = 3000;
/// Bytes in them all (sizes vary around the mean, random content).
const REPO_BYTES: usize = 30 * 1024 * 1024;
/// Sandboxes a fork makes (the case).
const FORKS: usize = 4;
/// The builder of the wheel and its index (the `pip-install` case's).
const MAKE_PACKAGES: &str = include_str!("../../tests/egress/make_packages.py");
/// The index's name in the sandbox's policy.
const INDEX_HOST: &str = "bench-pypi.test";

/// Writes the repository: the same files every time (seeded).
fn generate_script() -> String {
    format!(
        "import os, random\n\
         r = random.Random(15)\n\
         mean = {REPO_BYTES} // {REPO_FILES}\n\
         left = {REPO_BYTES}\n\
         for i in range({REPO_FILES}):\n\
         \x20   d = '/workspace/repo/pkg%02d/mod%d' % (i % 40, i % 7)\n\
         \x20   os.makedirs(d, exist_ok=True)\n\
         \x20   size = left if i == {REPO_FILES} - 1 else r.randint(mean // 2, mean + mean // 2)\n\
         \x20   size = max(0, min(size, left))\n\
         \x20   left -= size\n\
         \x20   with open('%s/file%05d.py' % (d, i), 'wb') as f:\n\
         \x20       f.write(r.randbytes(size))\n"
    )
}

/// Prints the file count, a SHA-256 over every path and its bytes, and the installed module's message.
const CHECK_SCRIPT: &str = "import hashlib, os\n\
    h = hashlib.sha256(); n = 0\n\
    for dp, dns, fns in os.walk('/workspace/repo'):\n\
    \x20   dns.sort()\n\
    \x20   for fn in sorted(fns):\n\
    \x20       p = os.path.join(dp, fn); n += 1\n\
    \x20       h.update(p.encode()); h.update(open(p, 'rb').read())\n\
    import airlock_probe\n\
    print(n, h.hexdigest(), airlock_probe.MESSAGE)\n";

/// Every file under `root`, by URL path (what the loopback index serves).
fn files_under(root: &Path) -> Result<HashMap<String, Vec<u8>>> {
    let mut files = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let relative = path.strip_prefix(root)?.to_string_lossy().into_owned();
                files.insert(format!("/{relative}"), std::fs::read(&path)?);
            }
        }
    }
    Ok(files)
}

/// Runs `script` with bash in the sandbox's container; its stdout.
async fn bash(sandbox: &Sandbox, script: &str) -> Result<String> {
    let answer = sandbox.exec(ExecRequest::new("bash").args(["-c", script])).await?;
    if answer.outcome.exit_code() != Some(0) {
        bail!("`{script}` exited {:?}: {}", answer.outcome.exit_code(), answer.outcome.stderr_text().trim());
    }
    Ok(answer.outcome.stdout_text())
}

async fn python(sandbox: &Sandbox, script: &str) -> Result<String> {
    let answer = sandbox.exec(ExecRequest::new("python3").args(["-c", script])).await?;
    if answer.outcome.exit_code() != Some(0) {
        bail!("python3 exited {:?}: {}", answer.outcome.exit_code(), answer.outcome.stderr_text().trim());
    }
    Ok(answer.outcome.stdout_text())
}

/// The index served on loopback, and the install command that reaches it.
struct Index {
    _upstream: Upstream,
    port: u16,
    install: String,
}

impl Index {
    async fn start() -> Result<Self> {
        let scratch = tempfile::tempdir().context("a directory for the packages")?;
        let script = scratch.path().join("make_packages.py");
        std::fs::write(&script, MAKE_PACKAGES)?;
        let out = scratch.path().join("out");
        run_command(
            "python3",
            vec![script.to_string_lossy().into_owned(), out.to_string_lossy().into_owned(), "http://unused.test".into()],
        )
        .await
        .context("building the wheel")?;
        let upstream = Upstream::start(files_under(&out.join("pypi"))?).await?;
        let port = upstream.port();
        let install = format!(
            "pip install --quiet --user --break-system-packages --no-cache-dir --index-url http://{INDEX_HOST}:{port}/simple/ --trusted-host {INDEX_HOST} airlock-probe"
        );
        Ok(Self { _upstream: upstream, port, install })
    }

    /// The whole set-up in a sandbox that exists: policy, container, files, install.
    async fn set_up(&self, sandbox: &Sandbox) -> Result<()> {
        sandbox.set_network_policy(loopback_policy(INDEX_HOST, self.port)?)?;
        python(sandbox, &generate_script()).await.context("writing the repository")?;
        bash(sandbox, &self.install).await.context("installing the package")?;
        Ok(())
    }
}

/// Samples of the five results, or one set-up error for all.
struct Measured {
    create: Result<Vec<f64>>,
    restore: Result<Vec<f64>>,
    rebuild: Result<Vec<f64>>,
    fork: Result<Vec<f64>>,
    rebuild_fork: Result<Vec<f64>>,
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

impl Suite {
    pub(super) async fn snapshots(&mut self, case: &Case) -> Vec<CaseResult> {
        let quick = self.plan.counts(Kind::ContainerCold);
        let slow = self.plan.counts(Kind::Pip);
        let named = |name: &str, what: String| {
            let mut meta = Self::meta(case, "container/runc", "library");
            meta.name = name.to_string();
            meta.what = what;
            meta
        };
        let state = format!(
            "{REPO_FILES} files, {} MiB, and a pip install in the container layer",
            REPO_BYTES / (1024 * 1024)
        );
        let metas = [
            (named("snapshot-create", format!("`Sandbox::snapshot` of a running sandbox holding {state}")), quick),
            (
                named("snapshot-restore", format!("`Sandbox::restore` of that snapshot, then a first `true` answered ({state})")),
                quick,
            ),
            (
                named(
                    "snapshot-rebuild",
                    format!("the same state from scratch: a new container sandbox started, {state} made again"),
                ),
                slow,
            ),
            (
                named("snapshot-fork-4", format!("`Runtime::fork_snapshot` into {FORKS} sandboxes, each then answering `true`")),
                quick,
            ),
            (named("snapshot-rebuild-4", format!("{FORKS} new sandboxes set up from scratch at once ({state})")), slow),
        ];
        if run_command("python3", vec!["-c".into(), "pass".into()]).await.is_err() {
            return metas.into_iter().map(|(meta, counts)| skipped(meta, counts, "no python3 on the host to build the wheel".into())).collect();
        }
        let mut extra = Map::new();
        let measured = self.measure_snapshots(quick, slow, &mut extra).await;
        let Measured { create, restore, rebuild, fork, rebuild_fork } = match measured {
            Ok(measured) => measured,
            Err(error) => {
                let text = format!("{error:#}");
                let failed = || Err(anyhow::anyhow!(text.clone()));
                Measured { create: failed(), restore: failed(), rebuild: failed(), fork: failed(), rebuild_fork: failed() }
            }
        };
        let results: Vec<CaseResult> = metas
            .into_iter()
            .zip([create, restore, rebuild, fork, rebuild_fork])
            .map(|((meta, counts), samples)| finish(meta, counts, samples, extra.clone()))
            .collect();
        for result in &results {
            if let Some(stats) = &result.stats {
                self.medians.push((result.name.clone(), stats.median_ms));
            }
        }
        self.compare("rebuilding from scratch over restoring a snapshot", "snapshot-restore", "snapshot-rebuild");
        self.compare(
            "4 sandboxes set up from scratch over a fork of 4 from a snapshot",
            "snapshot-fork-4",
            "snapshot-rebuild-4",
        );
        results
    }

    async fn measure_snapshots(
        &mut self,
        quick: (usize, usize),
        slow: (usize, usize),
        extra: &mut Map<String, serde_json::Value>,
    ) -> Result<Measured> {
        let index = Index::start().await?;
        let source = self.new_sandbox(container_config(ContainerRuntime::Runc)).await?;
        let result = async {
            index.set_up(&source).await?;
            let expected = python(&source, CHECK_SCRIPT).await?;
            let check = |sandbox: Sandbox, expected: String| async move {
                let found = python(&sandbox, CHECK_SCRIPT).await?;
                if found != expected {
                    bail!("{} holds {found:?}, not {expected:?}", sandbox.name());
                }
                anyhow::Ok(())
            };
            extra.insert("repository_files".into(), json!(REPO_FILES));
            extra.insert("repository_bytes".into(), json!(REPO_BYTES));
            extra.insert("package".into(), json!("airlock-probe 1.0 (pure-Python wheel), pip --user through the egress proxy"));

            // snapshot-create: one snapshot per repetition (the retention deletes the oldest).
            let mut create = Vec::new();
            let mut paused = Vec::new();
            let mut last = None;
            for repetition in 0..quick.0 + quick.1 {
                let started = Instant::now();
                let info = source.snapshot(Some("bench")).await?;
                let elapsed = started.elapsed();
                if repetition >= quick.0 {
                    create.push(ms(elapsed));
                    paused.push(info.paused_us as f64 / 1000.0);
                }
                last = Some(info);
            }
            let snapshot = last.context("no snapshot was taken")?;
            extra.insert("snapshot_files".into(), json!(snapshot.files));
            extra.insert("snapshot_bytes".into(), json!(snapshot.bytes));
            extra.insert("snapshot_paused_ms".into(), json!(paused));

            // snapshot-restore: changed, then put back.
            let mut restore = Vec::new();
            for repetition in 0..quick.0 + quick.1 {
                bash(&source, "rm -rf /workspace/repo/pkg0* ~/.local/lib && echo x > /workspace/repo/new").await?;
                let started = Instant::now();
                source.restore(&snapshot.id).await?;
                bash(&source, "true").await?;
                let elapsed = started.elapsed();
                check(source.clone(), expected.clone()).await.context("after a restore")?;
                if repetition >= quick.0 {
                    restore.push(ms(elapsed));
                }
            }

            // snapshot-fork-4.
            let mut fork = Vec::new();
            for repetition in 0..quick.0 + quick.1 {
                let names: Vec<String> = (0..FORKS).map(|_| self.fresh_name()).collect();
                let started = Instant::now();
                let forks = self.runtime.fork_snapshot(&snapshot.id, &names, None).await;
                let ready = match &forks {
                    Ok(forks) => {
                        let answers = futures_util::future::join_all(forks.iter().map(|f| bash(f, "true"))).await;
                        answers.into_iter().collect::<Result<Vec<_>>>().map(|_| started.elapsed())
                    }
                    Err(error) => Err(anyhow::anyhow!("forking: {error}")),
                };
                let checked = match &forks {
                    Ok(forks) => {
                        let checks = forks.iter().map(|f| check(f.clone(), expected.clone()));
                        futures_util::future::join_all(checks).await.into_iter().collect::<Result<Vec<_>>>().map(drop)
                    }
                    Err(_) => Ok(()),
                };
                if let Ok(forks) = forks {
                    for sandbox in &forks {
                        self.destroy(sandbox).await;
                    }
                }
                let elapsed = ready?;
                checked.context("in a fork")?;
                if repetition >= quick.0 {
                    fork.push(ms(elapsed));
                }
            }
            anyhow::Ok((create, restore, fork, expected))
        }
        .await;
        self.destroy(&source).await;
        let (create, restore, fork, expected) = result?;

        // The baselines: from scratch, in new sandboxes.
        let rebuild = self.rebuild(&index, slow, 1, &expected).await;
        let rebuild_fork = self.rebuild(&index, slow, FORKS, &expected).await;
        Ok(Measured { create: Ok(create), restore: Ok(restore), rebuild, fork: Ok(fork), rebuild_fork })
    }

    /// `at_once` new sandboxes made, started and set up from scratch together, per repetition.
    async fn rebuild(&mut self, index: &Index, counts: (usize, usize), at_once: usize, expected: &str) -> Result<Vec<f64>> {
        let mut samples = Vec::new();
        for repetition in 0..counts.0 + counts.1 {
            let names: Vec<String> = (0..at_once).map(|_| self.fresh_name()).collect();
            let started = Instant::now();
            let built = futures_util::future::join_all(names.iter().map(|name| {
                let runtime = self.runtime.clone();
                async move {
                    let sandbox = runtime
                        .create_sandbox(name, container_config(ContainerRuntime::Runc), None)
                        .await?
                        .with_context(|| format!("the name {name} is taken"))?;
                    let done = index.set_up(&sandbox).await.map(|()| started.elapsed());
                    anyhow::Ok((sandbox, done))
                }
            }))
            .await;
            let mut slowest = Duration::ZERO;
            let mut failure = None;
            for made in built {
                match made {
                    Ok((sandbox, done)) => {
                        match done {
                            Ok(elapsed) => {
                                slowest = slowest.max(elapsed);
                                let found = python(&sandbox, CHECK_SCRIPT).await;
                                if !matches!(&found, Ok(found) if found == expected) {
                                    failure.get_or_insert(anyhow::anyhow!("a rebuilt sandbox holds {found:?}"));
                                }
                            }
                            Err(error) => {
                                failure.get_or_insert(error);
                            }
                        }
                        self.destroy(&sandbox).await;
                    }
                    Err(error) => {
                        failure.get_or_insert(error);
                    }
                }
            }
            if let Some(error) = failure {
                return Err(error.context(format!("repetition {}", repetition + 1)));
            }
            if repetition >= counts.0 {
                samples.push(ms(slowest));
            }
        }
        Ok(samples)
    }
}
