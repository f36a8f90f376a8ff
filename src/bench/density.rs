//! The density cases: how many idle sandboxes of a kind fit before a limit,
//! and what each costs in memory.
//!
//! - `density-js`, `density-python`: idle interpreter contexts made one after
//!   another in one isolate sandbox (its `max_contexts` raised to the
//!   runtime's ceiling), up to a cap ([`CONTEXT_CAP`], [`CONTEXT_CAP_QUICK`])
//!   or the first refusal; each evaluates `1` once (untimed) and is left idle. Cost: this process's resident memory (VmRSS)
//!   before and after, divided by the contexts made. Samples: the time each
//!   `create_context` took.
//! - `density-containers`: idle container sandboxes (runc) started one after
//!   another up to [`CONTAINER_CAP`] ([`CONTAINER_CAP_QUICK`]) or the first
//!   refusal. Cost: each container's cgroup memory use as `docker stats`
//!   reports it, and the host's MemAvailable before and after. Samples: the
//!   time each took to be created and answer its first `true`.
//!
//! Both also stop when the host's MemAvailable falls below
//! [`HOST_MEMORY_FLOOR_MIB`]. Everything made is removed before the case ends.

use std::time::{Duration, Instant};

use airlock::container::ContainerRuntime;
use airlock::runtime::{MAX_CONTEXTS_LIMIT, SandboxConfig, TierPreference};
use airlock::{ExecRequest, Language, Sandbox};
use anyhow::{Context, Result, bail};
use serde_json::{Map, json};

use super::report::CaseResult;
use super::suite::{Case, Suite, container_config, finish, run_command};

/// Contexts made by a full run (a named cap, so a run ends on a machine with room for more).
pub const CONTEXT_CAP: usize = 500;
/// Contexts made by `--quick`.
pub const CONTEXT_CAP_QUICK: usize = 50;
/// Idle containers started by a full run.
pub const CONTAINER_CAP: usize = 20;
/// Idle containers started by `--quick`.
pub const CONTAINER_CAP_QUICK: usize = 3;
/// Below this much available host memory the density cases stop, whatever
/// their cap: they measure density, they must not push the machine into the
/// kernel's out-of-memory killer.
pub const HOST_MEMORY_FLOOR_MIB: u64 = 1024;
/// How long the containers idle before their memory is read (their start-up settles).
const CONTAINER_SETTLE: Duration = Duration::from_secs(2);

/// A field of /proc/meminfo or /proc/self/status, in KiB.
fn proc_kib(file: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

fn rss_mib() -> Option<f64> {
    proc_kib("/proc/self/status", "VmRSS").map(|kib| kib as f64 / 1024.0)
}

fn available_mib() -> Option<f64> {
    proc_kib("/proc/meminfo", "MemAvailable").map(|kib| kib as f64 / 1024.0)
}

/// Why a run stops before making another one, if it must.
fn below_floor() -> Option<String> {
    match available_mib() {
        Some(mib) if mib < HOST_MEMORY_FLOOR_MIB as f64 => {
            Some(format!("host memory floor: {mib:.0} MiB available, below {HOST_MEMORY_FLOOR_MIB} MiB"))
        }
        _ => None,
    }
}

/// `docker stats`' memory figure ("12.3MiB / 1GiB") in MiB.
fn parse_mem_usage(text: &str) -> Option<f64> {
    let used = text.split('/').next()?.trim();
    let split = used.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = used.split_at(split);
    let value: f64 = number.trim().parse().ok()?;
    let scale = match unit {
        "B" => 1.0 / (1024.0 * 1024.0),
        "KiB" | "kB" => 1.0 / 1024.0,
        "MiB" | "MB" => 1.0,
        "GiB" | "GB" => 1024.0,
        _ => return None,
    };
    Some(value * scale)
}

/// A container's cgroup memory use with page cache, from the cgroup's own
/// file (v1 `memory.usage_in_bytes`, v2 `memory.current`), in MiB; `None`
/// when this host lays its cgroups out otherwise.
fn cgroup_usage_mib(full_id: &str) -> Option<f64> {
    [
        format!("/sys/fs/cgroup/memory/docker/{full_id}/memory.usage_in_bytes"),
        format!("/sys/fs/cgroup/system.slice/docker-{full_id}.scope/memory.current"),
        format!("/sys/fs/cgroup/docker/{full_id}/memory.current"),
    ]
    .iter()
    .find_map(|path| std::fs::read_to_string(path).ok()?.trim().parse::<u64>().ok())
    .map(|bytes| bytes as f64 / (1024.0 * 1024.0))
}

/// The memory use of each sandbox's container, in MiB: `docker stats`' figure
/// (one call; page cache not counted) and the cgroup file's (cache counted), when readable.
async fn container_memory_mib(sandboxes: &[Sandbox]) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut ids = Vec::new();
    for sandbox in sandboxes {
        let filter = format!("label={}={}", airlock::container::SANDBOX_LABEL, sandbox.id());
        let id = run_command("docker", vec!["ps".into(), "-q".into(), "--no-trunc".into(), "--filter".into(), filter])
            .await?;
        let id = id.trim().to_string();
        if id.is_empty() {
            bail!("no running container for sandbox {}", sandbox.name());
        }
        ids.push(id);
    }
    let with_cache: Vec<f64> = ids.iter().filter_map(|id| cgroup_usage_mib(id)).collect();
    let mut args = vec!["stats".to_string(), "--no-stream".into(), "--format".into(), "{{.MemUsage}}".into()];
    args.extend(ids);
    let out = run_command("docker", args).await?;
    let stats = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| parse_mem_usage(l).with_context(|| format!("docker stats said {l:?}")))
        .collect::<Result<Vec<f64>>>()?;
    Ok((stats, with_cache))
}

fn median(values: &[f64]) -> Option<f64> {
    super::stats::Stats::of(values).map(|s| s.median_ms)
}

impl Suite {
    /// The cap of a density case: --repetitions when given, else the named cap.
    fn density_cap(&self, full: usize, quick: usize) -> usize {
        self.plan.repetitions.unwrap_or(if self.plan.quick { quick } else { full }).max(1)
    }

    pub(super) async fn density(&mut self, case: &Case) -> Vec<CaseResult> {
        match case.name {
            "density-js" => vec![self.density_contexts(case, Language::JavaScript).await],
            "density-python" => vec![self.density_contexts(case, Language::Python).await],
            _ => vec![self.density_containers(case).await],
        }
    }

    async fn density_contexts(&mut self, case: &Case, language: Language) -> CaseResult {
        let cap = self.density_cap(CONTEXT_CAP, CONTEXT_CAP_QUICK);
        let counts = (0, cap);
        let mut meta = Self::meta(case, "isolate", "library");
        meta.what =
            format!("`create_context` of an idle {language:?} context in one sandbox, up to {cap} held at once");
        let config = SandboxConfig {
            tier: TierPreference::Isolate,
            max_contexts: MAX_CONTEXTS_LIMIT,
            ..SandboxConfig::default()
        };
        let mut extra = Map::new();
        let sandbox = match self.new_sandbox(config).await {
            Ok(sandbox) => sandbox,
            Err(e) => return finish(meta, counts, Err(e), extra),
        };
        let samples = async {
            // One context made and removed first, untimed: what the first
            // context of a language loads once is not a context's cost.
            let first = sandbox.create_context(language).await?;
            sandbox.delete_context(&first)?;
            let (rss_before, available_before) = (rss_mib(), available_mib());
            let mut samples = Vec::with_capacity(cap);
            let mut ids = Vec::with_capacity(cap);
            let mut stopped_by = format!("cap of {cap} reached");
            for _ in 0..cap {
                if let Some(reason) = below_floor() {
                    stopped_by = reason;
                    break;
                }
                let started = Instant::now();
                match sandbox.create_context(language).await {
                    Ok(id) => {
                        samples.push(started.elapsed().as_secs_f64() * 1000.0);
                        // Used once, untimed, then left idle: a context that ran code.
                        let answer = sandbox.code_in(&id, "1").await?;
                        if !matches!(answer.outcome.result, airlock::EvalResult::Ok { .. }) {
                            bail!("a new context did not evaluate: {:?}", answer.outcome.result);
                        }
                        ids.push(id);
                    }
                    Err(e) => {
                        stopped_by = format!("refused: {e}");
                        break;
                    }
                }
            }
            let (rss_after, available_after) = (rss_mib(), available_mib());
            // The contexts are alive: the first and last still evaluate.
            for id in [ids.first(), ids.last()].into_iter().flatten() {
                let answer = sandbox.code_in(id, "40 + 2").await?;
                if !matches!(answer.outcome.result, airlock::EvalResult::Ok { .. }) {
                    bail!("context {id} no longer evaluates: {:?}", answer.outcome.result);
                }
            }
            let made = ids.len();
            if made == 0 {
                bail!("no context was made: {stopped_by}");
            }
            extra.insert("contexts".into(), json!(made));
            extra.insert("cap".into(), json!(cap));
            extra.insert("stopped_by".into(), json!(stopped_by));
            extra.insert("max_contexts_per_sandbox".into(), json!(MAX_CONTEXTS_LIMIT));
            if let (Some(before), Some(after)) = (rss_before, rss_after) {
                let per = (after - before) / made as f64;
                extra.insert("rss_before_mib".into(), json!(before));
                extra.insert("rss_after_mib".into(), json!(after));
                extra.insert("rss_per_context_mib".into(), json!(per));
                extra.insert(
                    "note".into(),
                    json!(format!("{made} contexts, {per:.2} MiB RSS each; stopped by {stopped_by}")),
                );
            }
            if let (Some(before), Some(after)) = (available_before, available_after) {
                extra.insert("host_available_drop_per_context_mib".into(), json!((before - after) / made as f64));
            }
            anyhow::Ok(samples)
        }
        .await;
        self.destroy(&sandbox).await;
        // Repetitions: the contexts made (the cap is in `extra`).
        let counts = (0, samples.as_ref().map_or(cap, Vec::len));
        finish(meta, counts, samples, extra)
    }

    async fn density_containers(&mut self, case: &Case) -> CaseResult {
        let cap = self.density_cap(CONTAINER_CAP, CONTAINER_CAP_QUICK);
        let mut meta = Self::meta(case, "container/runc", "library");
        meta.what =
            format!("a new idle container sandbox (runc): created, started, first `true`; up to {cap} running at once");
        let mut extra = Map::new();
        let mut sandboxes = Vec::with_capacity(cap);
        let samples = async {
            let available_before = available_mib();
            let mut samples = Vec::with_capacity(cap);
            let mut stopped_by = format!("cap of {cap} reached");
            for _ in 0..cap {
                if let Some(reason) = below_floor() {
                    stopped_by = reason;
                    break;
                }
                let started = Instant::now();
                let sandbox = match self.new_sandbox(container_config(ContainerRuntime::Runc)).await {
                    Ok(sandbox) => sandbox,
                    Err(e) => {
                        stopped_by = format!("refused: {e:#}");
                        break;
                    }
                };
                let answer = sandbox.exec(ExecRequest::new("true")).await;
                let elapsed = started.elapsed();
                sandboxes.push(sandbox);
                match answer {
                    Ok(answer) if answer.outcome.exit_code() == Some(0) => {
                        samples.push(elapsed.as_secs_f64() * 1000.0);
                    }
                    Ok(answer) => {
                        stopped_by = format!("refused: `true` exited {:?}", answer.outcome.exit_code());
                        break;
                    }
                    Err(e) => {
                        stopped_by = format!("refused: {e}");
                        break;
                    }
                }
            }
            let made = samples.len();
            if made == 0 {
                bail!("no container started: {stopped_by}");
            }
            tokio::time::sleep(CONTAINER_SETTLE).await;
            let running: Vec<Sandbox> = sandboxes.iter().take(made).cloned().collect();
            let (memory, with_cache) =
                container_memory_mib(&running).await.context("reading the containers' memory")?;
            let available_after = available_mib();
            extra.insert("containers".into(), json!(made));
            extra.insert("cap".into(), json!(cap));
            extra.insert("stopped_by".into(), json!(stopped_by));
            extra.insert("memory_source".into(), json!("docker stats (the container's cgroup memory use)"));
            extra.insert("container_memory_mib".into(), json!(memory));
            if with_cache.len() == memory.len()
                && let Some(per) = median(&with_cache)
            {
                extra.insert("cgroup_usage_with_cache_mib".into(), json!(with_cache));
                extra.insert("cgroup_usage_with_cache_median_mib".into(), json!(per));
            }
            if let Some(per) = median(&memory) {
                extra.insert("container_memory_median_mib".into(), json!(per));
                extra.insert(
                    "note".into(),
                    json!(format!(
                        "{made} containers, {per:.1} MiB each (docker stats, median); stopped by {stopped_by}"
                    )),
                );
            }
            if let (Some(before), Some(after)) = (available_before, available_after) {
                extra.insert("host_available_drop_per_container_mib".into(), json!((before - after) / made as f64));
            }
            anyhow::Ok(samples)
        }
        .await;
        for sandbox in &sandboxes {
            self.destroy(sandbox).await;
        }
        let counts = (0, samples.as_ref().map_or(cap, Vec::len));
        finish(meta, counts, samples, extra)
    }
}
