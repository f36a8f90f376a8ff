//! What a run produces: the results (JSON schema below), the machine they
//! were measured on, and the three renderings (terminal table, JSON file,
//! Markdown report with SVG charts).
//!
//! JSON schema, version [`SCHEMA_VERSION`] (fields are only ever added within
//! a version):
//!
//! ```text
//! { "schema_version": 1, "airlock_version", "commit", "started_at_unix_ms",
//!   "duration_s", "quick", "command",
//!   "machine": { "cores", "memory_mib", "kernel", "cpu_model", "docker_version",
//!                "runsc_registered", "disk_quotas", "load_average_start", "load_average_end" },
//!   "results": [ { "case", "name", "group", "tier", "path", "what",
//!                  "status": "ok"|"skipped"|"failed", "reason"?,
//!                  "warmup", "repetitions",
//!                  "stats"?: { "samples", "median_ms", "p90_ms", "p95_ms", "p99_ms",
//!                              "min_ms", "max_ms", "mean_ms", "iqr_ms", "mad_ms" },
//!                  "samples_ms"?: [ every timed sample, in order ],
//!                  "extra": { ... per group ... } } ],
//!   "comparisons": [ { "what", "a", "b", "ratio_median", "difference_median_ms" } ] }
//! ```

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{Map, Value};

use super::stats::Stats;
use super::svg::{Bar, bar_chart};

/// The JSON report's schema version.
pub const SCHEMA_VERSION: u32 = 1;

/// A whole run.
#[derive(Debug, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub airlock_version: String,
    pub commit: String,
    pub started_at_unix_ms: u128,
    pub duration_s: f64,
    pub quick: bool,
    /// The command line, as typed.
    pub command: String,
    pub machine: Machine,
    pub results: Vec<CaseResult>,
    pub comparisons: Vec<Comparison>,
}

/// Whether a result was measured.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Not measured, for a stated reason (runsc not registered, a module missing).
    Skipped,
    /// Measured, and something went wrong (wrong output, an error): the run fails.
    Failed,
}

/// One measured (or skipped) result. A case may yield several.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// The case, as `--only` names it.
    pub case: String,
    /// This result's name within the report (unique).
    pub name: String,
    /// cold-start, warm, tti, throughput, http-overhead, workload, peer.
    pub group: String,
    /// isolate, container/runc, container/runsc, host (peers).
    pub tier: String,
    /// library (in process), http (loopback), cli (a peer's command).
    pub path: String,
    /// What one timed repetition covers.
    pub what: String,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Untimed repetitions run first.
    pub warmup: usize,
    /// Timed repetitions asked for.
    pub repetitions: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<Stats>,
    /// Every timed sample, in the order taken (what `airlock bench compare`
    /// tests for significance); empty when nothing was measured.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub samples_ms: Vec<f64>,
    /// Group-specific figures (throughput per second, concurrency, trimmed
    /// statistics and published medians for TTI).
    pub extra: Map<String, Value>,
}

/// A pair measured in the same run: b against a.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub what: String,
    pub a: String,
    pub b: String,
    /// b's median over a's.
    pub ratio_median: f64,
    /// b's median minus a's, in milliseconds.
    pub difference_median_ms: f64,
}

/// The machine a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_mib: u64,
    pub kernel: String,
    pub cpu_model: String,
    pub docker_version: String,
    pub runsc_registered: bool,
    /// Whether the bench home's per-sandbox disk quotas were enforced (they
    /// add to sandbox creation), and why not when they were not.
    pub disk_quotas: String,
    pub load_average_start: String,
    pub load_average_end: String,
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

impl Machine {
    /// This machine, as /proc describes it (the engine's fields are filled in after the run).
    pub fn describe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|line| {
                line.strip_prefix("model name").and_then(|rest| rest.split_once(':')).map(|(_, v)| v.trim())
            })
            .unwrap_or("unknown")
            .to_string();
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|line| line.strip_prefix("MemTotal:"))
                    .and_then(|rest| rest.split_whitespace().next().and_then(|kib| kib.parse::<u64>().ok()))
            })
            .map_or(0, |kib| kib / 1024);
        let kernel =
            std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|k| k.trim().to_string()).unwrap_or_default();
        Self {
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            memory_mib,
            kernel,
            cpu_model,
            docker_version: String::new(),
            runsc_registered: false,
            disk_quotas: String::new(),
            load_average_start: load_average(),
            load_average_end: String::new(),
        }
    }
}

/// The Docker engine's version (`docker version`), or "unavailable".
pub fn docker_version() -> String {
    std::process::Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .unwrap_or_else(|| "unavailable".into())
}

/// The commit this binary was built from when it runs in its build tree
/// (`git rev-parse`, "+dirty" when the tree has uncommitted changes), else "unknown".
pub fn commit() -> String {
    let tree = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(tree)
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(commit) => match git(&["status", "--porcelain", "--untracked-files=no"]) {
            Some(changes) if !changes.is_empty() => format!("{commit}+dirty"),
            _ => commit,
        },
        None => "unknown".into(),
    }
}

fn cell(stats: Option<&Stats>, pick: fn(&Stats) -> f64) -> String {
    stats.map_or_else(|| "-".into(), |s| format_ms(pick(s)))
}

/// Milliseconds with sensible digits.
pub fn format_ms(ms: f64) -> String {
    if ms >= 100.0 {
        format!("{ms:.0}")
    } else if ms >= 10.0 {
        format!("{ms:.1}")
    } else if ms >= 1.0 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.3}")
    }
}

/// One line for a result's notes: throughput, TTI context, skip reasons.
fn note(result: &CaseResult) -> String {
    let mut parts = Vec::new();
    if let Some(reason) = &result.reason {
        parts.push(reason.clone());
    }
    // A case's own one-line summary (egress, density).
    if let Some(note) = result.extra.get("note").and_then(Value::as_str) {
        parts.push(note.to_string());
    }
    if let Some(rate) = result.extra.get("per_second").and_then(Value::as_f64) {
        parts.push(format!("{rate:.1}/s"));
    }
    if let Some(trimmed) = result.extra.get("trimmed_median_ms").and_then(Value::as_f64) {
        parts.push(format!("trimmed median {} ms", format_ms(trimmed)));
    }
    if let Some(published) = result.extra.get("published_medians_s").and_then(Value::as_object) {
        let peers: Vec<String> =
            published.iter().map(|(name, value)| format!("{name} {}", value.as_f64().unwrap_or(0.0))).collect();
        parts.push(format!("published (s): {}", peers.join(", ")));
    }
    if let Some(rate) = result.extra.get("success_rate").and_then(Value::as_f64)
        && rate < 1.0
    {
        parts.push(format!("success {:.0}%", rate * 100.0));
    }
    parts.join("; ")
}

impl Report {
    /// The terminal table (milliseconds).
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<34} {:<16} {:>4} {:>4} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}  notes",
            "result", "tier", "wu", "reps", "median", "p90", "p99", "min", "max", "IQR"
        );
        for result in &self.results {
            let stats = result.stats.as_ref();
            let name = match result.status {
                Status::Ok => result.name.clone(),
                Status::Skipped => format!("{} (skipped)", result.name),
                Status::Failed => format!("{} (FAILED)", result.name),
            };
            let _ = writeln!(
                out,
                "{:<34} {:<16} {:>4} {:>4} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}  {}",
                name,
                result.tier,
                result.warmup,
                result.repetitions,
                cell(stats, |s| s.median_ms),
                cell(stats, |s| s.p90_ms),
                cell(stats, |s| s.p99_ms),
                cell(stats, |s| s.min_ms),
                cell(stats, |s| s.max_ms),
                cell(stats, |s| s.iqr_ms),
                note(result)
            );
        }
        for comparison in &self.comparisons {
            let _ = writeln!(
                out,
                "{}: {} / {} = {:.2}x at the median ({:+.3} ms)",
                comparison.what, comparison.b, comparison.a, comparison.ratio_median, comparison.difference_median_ms
            );
        }
        let m = &self.machine;
        let _ = writeln!(
            out,
            "machine: {} cores, {} MiB, {}, kernel {}, docker {}, runsc {}, disk quotas {}; load {} -> {}; airlock {} ({}); {:.1} s",
            m.cores,
            m.memory_mib,
            m.cpu_model,
            m.kernel,
            m.docker_version,
            if m.runsc_registered { "registered" } else { "not registered" },
            m.disk_quotas,
            m.load_average_start,
            m.load_average_end,
            self.airlock_version,
            self.commit,
            self.duration_s
        );
        out
    }

    /// Writes the JSON report to `path`.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
    }

    /// Writes `report.md` and one SVG chart per group into `dir` (made if missing).
    pub fn write_markdown(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("making {}", dir.display()))?;
        let mut md = String::new();
        let _ = writeln!(md, "# airlock bench report\n");
        let m = &self.machine;
        let _ = writeln!(
            md,
            "`{}` — airlock {} ({}), {}, {:.1} s.\n",
            self.command,
            self.airlock_version,
            self.commit,
            if self.quick { "quick" } else { "full suite" },
            self.duration_s
        );
        let _ = writeln!(
            md,
            "Machine: {} cores, {} MiB memory, {}, kernel {}, Docker {}, runsc {}, disk quotas {}. \
             Load average (1, 5, 15 min) {} at the start, {} at the end.\n",
            m.cores,
            m.memory_mib,
            m.cpu_model,
            m.kernel,
            m.docker_version,
            if m.runsc_registered { "registered" } else { "not registered" },
            m.disk_quotas,
            m.load_average_start,
            m.load_average_end
        );
        let mut groups: Vec<&str> = Vec::new();
        for result in &self.results {
            if !groups.contains(&result.group.as_str()) {
                groups.push(&result.group);
            }
        }
        for group in groups {
            let _ = writeln!(md, "## {group}\n");
            let members: Vec<&CaseResult> = self.results.iter().filter(|r| r.group == group).collect();
            let bars: Vec<Bar> = members
                .iter()
                .filter_map(|r| {
                    r.stats.as_ref().map(|s| Bar { label: r.name.clone(), value: s.median_ms, p90: s.p90_ms })
                })
                .collect();
            if !bars.is_empty() {
                let file = format!("{group}.svg");
                // Published TTI medians are drawn as reference lines on the TTI chart.
                let references: Vec<(String, f64)> = if group == "tti" {
                    super::suite::PUBLISHED_TTI_MEDIANS_S
                        .iter()
                        .map(|(name, seconds)| (format!("{name} (published)"), seconds * 1000.0))
                        .collect()
                } else {
                    Vec::new()
                };
                std::fs::write(dir.join(&file), bar_chart(group, "ms", &bars, &references))
                    .with_context(|| format!("writing {}", dir.join(&file).display()))?;
                let _ = writeln!(md, "![{group}]({file})\n");
            }
            let _ = writeln!(
                md,
                "| result | tier | path | warm-up | reps | median ms | p90 | p99 | min | max | IQR | MAD | notes |"
            );
            let _ = writeln!(md, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
            for r in &members {
                let s = r.stats.as_ref();
                let status = match r.status {
                    Status::Ok => String::new(),
                    Status::Skipped => " (skipped)".into(),
                    Status::Failed => " (**failed**)".into(),
                };
                let _ = writeln!(
                    md,
                    "| {}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    r.name,
                    status,
                    r.tier,
                    r.path,
                    r.warmup,
                    r.repetitions,
                    cell(s, |s| s.median_ms),
                    cell(s, |s| s.p90_ms),
                    cell(s, |s| s.p99_ms),
                    cell(s, |s| s.min_ms),
                    cell(s, |s| s.max_ms),
                    cell(s, |s| s.iqr_ms),
                    cell(s, |s| s.mad_ms),
                    note(r).replace('|', "\\|")
                );
            }
            md.push('\n');
            for r in &members {
                let _ = writeln!(md, "- `{}`: {}", r.name, r.what);
            }
            md.push('\n');
        }
        if !self.comparisons.is_empty() {
            let _ = writeln!(md, "## Pairs\n");
            let _ = writeln!(md, "| pair | a | b | b/a at the median | b − a (ms) |");
            let _ = writeln!(md, "|---|---|---|---:|---:|");
            for c in &self.comparisons {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {:.2} | {:+.3} |",
                    c.what, c.a, c.b, c.ratio_median, c.difference_median_ms
                );
            }
            md.push('\n');
        }
        let path = dir.join("report.md");
        std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))
    }
}
