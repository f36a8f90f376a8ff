//! The CLI commands over the runtime: sandboxes by name in a home directory.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use airlock::container::ContainerRuntime;
use airlock::limits::{parse_duration, parse_size};
use airlock::runtime::{
    DiskStatus, Runtime, RuntimeOptions, SandboxConfig, TierPreference, UsageQuery, default_home,
};
use airlock::{ExecRequest, Language, OutputChunk, OutputSender, OutputStream, StdinSource, Termination};
use anyhow::{Context, Result, bail};

/// Where the runtime keeps its registry and workspaces.
#[derive(Debug, clap::Args)]
pub struct HomeArgs {
    /// The runtime's home directory. Default: $AIRLOCK_HOME, else the per-user data directory.
    #[arg(long, value_name = "DIR")]
    home: Option<PathBuf>,
}

impl HomeArgs {
    async fn open(&self) -> Result<Runtime> {
        let home = self.home.clone().unwrap_or_else(default_home);
        let runtime = Runtime::open(RuntimeOptions::new(&home))
            .await
            .with_context(|| format!("opening the runtime at {}", home.display()))?;
        if let DiskStatus::NotEnforced { reason } = runtime.disk_status() {
            eprintln!("airlock: warning: sandbox disk quotas are not enforced: {reason}");
        }
        Ok(runtime)
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum SandboxCommand {
    /// Create a sandbox (a no-op when it exists) and print its id.
    Create(CreateArgs),
    /// List the sandboxes.
    List(HomeOnly),
    /// Destroy a sandbox: its container, its workspace and its registry entry.
    Rm(NameArgs),
}

#[derive(Debug, clap::Args)]
pub struct HomeOnly {
    #[command(flatten)]
    home: HomeArgs,
}

#[derive(Debug, clap::Args)]
pub struct NameArgs {
    name: String,
    #[command(flatten)]
    home: HomeArgs,
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    name: String,
    /// Which tier its work may run on: auto (isolates first), isolate, or container.
    #[arg(long, default_value = "auto", value_parser = parse_tier)]
    tier: TierPreference,
    /// The container runtime: runc, or runsc (gVisor).
    #[arg(long, default_value = "runc")]
    runtime: ContainerRuntime,
    /// Sleep after this long without a request, such as 30s or 10m.
    #[arg(long, value_name = "DURATION", default_value = "10m")]
    idle_timeout: String,
    /// Never sleep.
    #[arg(long)]
    keep_alive: bool,
    /// A local image for its container (default: Airlock's base image).
    #[arg(long)]
    image: Option<String>,
    /// Disk quota over its workspace (and the container's writable layer where
    /// the engine can limit it), such as 512MiB or 20GiB. Enforced as root.
    #[arg(long, value_name = "SIZE", default_value = "10GiB")]
    disk: String,
    /// Interpreter contexts it may hold at once.
    #[arg(long, value_name = "N", default_value_t = airlock::runtime::DEFAULT_MAX_CONTEXTS)]
    max_contexts: usize,
    /// Background processes it may have running at once.
    #[arg(long, value_name = "N", default_value_t = airlock::runtime::DEFAULT_MAX_PROCESSES)]
    max_processes: usize,
    /// Terminal sessions it may have open at once.
    #[arg(long, value_name = "N", default_value_t = airlock::runtime::DEFAULT_MAX_PTYS)]
    max_ptys: usize,
    #[command(flatten)]
    home: HomeArgs,
}

fn parse_tier(text: &str) -> Result<TierPreference, String> {
    match text {
        "auto" => Ok(TierPreference::Auto),
        "isolate" => Ok(TierPreference::Isolate),
        "container" => Ok(TierPreference::Container),
        other => Err(format!("unknown tier {other:?}; use auto, isolate or container")),
    }
}

#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// The sandbox (created when missing).
    name: String,
    /// Wall-clock deadline, such as 500ms, 10s or 2m.
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    timeout: String,
    /// Say on stderr which tier ran it and why.
    #[arg(short, long)]
    verbose: bool,
    #[command(flatten)]
    home: HomeArgs,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct CodeArgs {
    /// The sandbox (created when missing).
    name: String,
    #[arg(long, value_name = "LANG")]
    lang: Language,
    /// The code.
    #[arg(short = 'c', long = "code", value_name = "CODE")]
    code: String,
    /// Evaluate in this context (contexts live as long as the process that made them).
    #[arg(long, value_name = "ID")]
    context: Option<String>,
    #[arg(short, long)]
    verbose: bool,
    #[command(flatten)]
    home: HomeArgs,
}

#[derive(Debug, clap::Args)]
pub struct FilesArgs {
    name: String,
    #[command(subcommand)]
    action: FilesAction,
    #[command(flatten)]
    home: HomeArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum FilesAction {
    /// List a directory of the workspace.
    Ls {
        #[arg(default_value = "")]
        path: String,
    },
    /// Print a file to stdout.
    Get { path: String },
    /// Write a file from --from, else from stdin.
    Put {
        path: String,
        #[arg(long, value_name = "FILE")]
        from: Option<PathBuf>,
    },
    /// Remove a file or a directory with everything in it.
    Rm { path: String },
}

#[derive(Debug, clap::Args)]
pub struct UsageArgs {
    /// One sandbox; all when omitted.
    name: Option<String>,
    /// Only the last DURATION, such as 1h.
    #[arg(long, value_name = "DURATION")]
    since: Option<String>,
    #[command(flatten)]
    home: HomeArgs,
}

pub async fn sandbox(command: SandboxCommand) -> Result<ExitCode> {
    match command {
        SandboxCommand::Create(args) => {
            let runtime = args.home.open().await?;
            let config = SandboxConfig {
                tier: args.tier,
                container_runtime: args.runtime,
                idle_timeout: parse_duration(&args.idle_timeout)?,
                keep_alive: args.keep_alive,
                image: args.image,
                disk: parse_size(&args.disk)?,
                max_contexts: args.max_contexts,
                max_processes: args.max_processes,
                max_ptys: args.max_ptys,
                ..SandboxConfig::default()
            };
            let sandbox = runtime.sandbox_with(&args.name, config).await?;
            println!("{}", sandbox.id());
        }
        SandboxCommand::List(args) => {
            let runtime = args.home.open().await?;
            println!("{:<24} {:<40} {:<9} ESCALATED", "NAME", "ID", "STATE");
            for info in runtime.list()? {
                let state = serde_plain(&info.state);
                println!("{:<24} {:<40} {:<9} {}", info.name, info.id, state, info.escalated.unwrap_or_default());
            }
        }
        SandboxCommand::Rm(args) => {
            let runtime = args.home.open().await?;
            runtime.destroy(&args.name).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn serde_plain<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

/// How long an interrupted command waits for the container's agent to confirm
/// the kill of what it was running before the CLI exits.
const INTERRUPT_SETTLE: Duration = Duration::from_secs(5);

enum Interruptible<T> {
    Done(T),
    /// Interrupted by a signal; the exit status a shell would report (128 + the signal).
    Interrupted(ExitCode),
}

/// Runs `work` unless ctrl-c, SIGTERM or SIGHUP comes first. Then the work is
/// dropped, which kills a running command's whole tree, and the kill is seen
/// through before returning: exiting at once would leave it queued, and the
/// command running in the container until its deadline.
async fn interruptible<T>(work: impl std::future::Future<Output = T>) -> Interruptible<T> {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate), Ok(mut hangup)) =
        (signal(SignalKind::interrupt()), signal(SignalKind::terminate()), signal(SignalKind::hangup()))
    else {
        return Interruptible::Done(work.await);
    };
    let signalled = tokio::select! {
        done = work => return Interruptible::Done(done),
        _ = interrupt.recv() => 2,
        _ = terminate.recv() => 15,
        _ = hangup.recv() => 1,
    };
    if !airlock::container::settle_agent_links(INTERRUPT_SETTLE).await {
        eprintln!("airlock: warning: the container did not confirm the kill within {}s", INTERRUPT_SETTLE.as_secs());
    }
    Interruptible::Interrupted(ExitCode::from(128 + signalled))
}

pub async fn exec(args: ExecArgs) -> Result<ExitCode> {
    let runtime = args.home.open().await?;
    let sandbox = runtime.sandbox(&args.name).await?;
    let Some((program, rest)) = args.command.split_first() else { bail!("no command given after --") };
    let echo: OutputSender = Arc::new(|chunk: OutputChunk| {
        let _ = match chunk.stream {
            OutputStream::Stdout => {
                std::io::stdout().lock().write_all(&chunk.bytes).and_then(|()| std::io::stdout().flush())
            }
            OutputStream::Stderr => std::io::stderr().lock().write_all(&chunk.bytes),
        };
    });
    let mut request = ExecRequest::new(program).args(rest.iter().cloned()).output(echo).stdin(StdinSource::Empty);
    request.limits.deadline = parse_duration(&args.timeout)?;
    let ran = match interruptible(sandbox.exec(request)).await {
        Interruptible::Done(ran) => ran?,
        Interruptible::Interrupted(status) => return Ok(status),
    };
    if args.verbose {
        eprintln!("airlock: ran in the {} tier: {}", ran.placement.tier, ran.placement.reason);
    }
    Ok(match ran.outcome.termination {
        Termination::Exited { code } => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Termination::LimitExceeded(hit) => crate::limit_hit(hit),
        Termination::Crashed { message } => crate::crashed("the command crashed", &message),
        other => crate::crashed("the command ended unexpectedly", &other.to_string()),
    })
}

pub async fn code(args: CodeArgs) -> Result<ExitCode> {
    let runtime = args.home.open().await?;
    let sandbox = runtime.sandbox(&args.name).await?;
    let evaluation = async {
        match &args.context {
            Some(context) => sandbox.code_in(context, &args.code).await,
            None => sandbox.code(args.lang, &args.code).await,
        }
    };
    let ran = match interruptible(evaluation).await {
        Interruptible::Done(ran) => ran?,
        Interruptible::Interrupted(status) => return Ok(status),
    };
    if args.verbose {
        eprintln!("airlock: ran in the {} tier: {}", ran.placement.tier, ran.placement.reason);
    }
    Ok(crate::report(&ran.outcome, false))
}

pub async fn files(args: FilesArgs) -> Result<ExitCode> {
    let runtime = args.home.open().await?;
    let sandbox = runtime.get(&args.name)?.with_context(|| format!("no sandbox named {}", args.name))?;
    match args.action {
        FilesAction::Ls { path } => {
            for entry in sandbox.list_files(&path).await? {
                println!("{:<9} {:>12} {}", serde_plain(&entry.kind), entry.size, entry.name);
            }
        }
        // Streamed both ways: a file of any size within the quota, never held in memory.
        FilesAction::Get { path } => {
            let (mut file, _) = sandbox.open_file(&path).await?;
            let mut stdout = tokio::io::stdout();
            tokio::io::copy(&mut file, &mut stdout).await?;
            tokio::io::AsyncWriteExt::flush(&mut stdout).await?;
        }
        FilesAction::Put { path, from } => {
            match from {
                Some(file) => {
                    let mut source = tokio::fs::File::open(&file)
                        .await
                        .with_context(|| format!("cannot read {}", file.display()))?;
                    sandbox.write_file_from(&path, &mut source).await?
                }
                None => sandbox.write_file_from(&path, &mut tokio::io::stdin()).await?,
            };
        }
        FilesAction::Rm { path } => sandbox.remove_file(&path).await?,
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn usage(args: UsageArgs) -> Result<ExitCode> {
    let runtime = args.home.open().await?;
    let since = match &args.since {
        Some(text) => Some(SystemTime::now() - parse_duration(text)?),
        None => None,
    };
    let usage = runtime.usage(&UsageQuery { sandbox: args.name.clone(), since, until: None })?;
    let seconds = |d: Duration| d.as_secs_f64();
    println!("executions       {}", usage.total.executions);
    println!(
        "cpu seconds      {:.6} (isolate {:.6}, container {:.6})",
        usage.cpu_seconds,
        seconds(usage.isolate.cpu_time),
        seconds(usage.container.cpu_time)
    );
    println!("wall seconds     {:.6}", seconds(usage.total.wall_time));
    println!("cost             ${:.8} at ${} per vCPU-second", usage.cost_usd, usage.price_per_vcpu_second);
    Ok(ExitCode::SUCCESS)
}
