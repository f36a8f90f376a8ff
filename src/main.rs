//! The `airlock` command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use airlock::limits::{parse_duration, parse_size};
use airlock::wasm::interpreter::{Interpreters, default_interpreter_dir};
use airlock::{
    EngineConfig, EvalOutcome, EvalResult, ExecRequest, IsolateEngine, Language, Limit, LimitExceeded, Limits,
    OutputChunk, OutputSender, OutputStream, StdinSource, Termination, Workspace,
};
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod bench;
mod carried;
mod context_cli;
mod git_cli;
mod policy_cli;
mod remote;
mod sandbox_cli;
mod serve_cli;
mod setup_progress;
mod snapshot_cli;
mod token_cli;

/// The CLI runs one thing at a time: a small pool is quicker to set up.
const CLI_CONCURRENT_RUNS: u32 = 4;

fn cli_engine() -> Result<IsolateEngine> {
    Ok(IsolateEngine::new(EngineConfig { max_concurrent_runs: CLI_CONCURRENT_RUNS, ..EngineConfig::default() })?)
}

/// Exit status when the guest ran past its deadline (as timeout(1) does).
const EXIT_DEADLINE: u8 = 124;
/// Exit status when the guest hit any other limit (memory, output, table, instances, stack).
const EXIT_LIMIT: u8 = 125;
/// Exit status when the guest crashed (a wasm trap).
const EXIT_CRASH: u8 = 134;
/// Exit status when Airlock itself could not do what was asked (bad input, missing file).
const EXIT_ERROR: u8 = 2;
/// Exit status when code needs the container tier (a subprocess, a missing module, the network).
const EXIT_ESCALATION: u8 = 3;

#[derive(Debug, Parser)]
#[command(name = "airlock", version, about = "Run untrusted code in WebAssembly isolates and containers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a WebAssembly program (a WASI preview 2 component or preview 1 module, .wasm or .wat),
    /// or, with --lang, Python or JavaScript code in a fresh interpreter context.
    Run(RunArgs),
    /// Evaluate Python or JavaScript line by line in one context that keeps its state.
    Repl(ReplArgs),
    /// Make the host ready: install btrfs-progs (sandbox disk quotas) and the Docker engine
    /// (started with no default bridge and no iptables rules) and runsc where missing, then build
    /// the base image from Debian packages if its recipe changed. Needs root on Debian; a no-op
    /// when all is there. The build shows its stages (bars on a terminal, one line per stage
    /// otherwise) and keeps the tools' full output in /var/log/airlock/base-image-<hash>.log.
    Setup(SetupArgs),
    /// Create, list and destroy sandboxes by name (kept in the runtime's home).
    #[command(subcommand)]
    Sandbox(sandbox_cli::SandboxCommand),
    /// Take, list, inspect, delete, restore and fork sandbox snapshots (files, installed
    /// packages and configuration; not running processes).
    #[command(subcommand)]
    Snapshot(snapshot_cli::SnapshotCommand),
    /// Run a command in a sandbox, on the tier that can run it (created when missing).
    Exec(sandbox_cli::ExecArgs),
    /// Run Python or JavaScript in a sandbox: in an isolate, or in its container when the code needs it.
    Code(sandbox_cli::CodeArgs),
    /// Make, list, fork and remove a sandbox's interpreter contexts (kept in the home: a
    /// context outlives sleep and restarts, rebuilt by replaying its history).
    #[command(subcommand)]
    Context(context_cli::ContextCommand),
    /// Read and write a sandbox's workspace files.
    Files(sandbox_cli::FilesArgs),
    /// Clone a repository into a sandbox's workspace, through its egress proxy (`git checkout NAME URL`).
    #[command(subcommand)]
    Git(git_cli::GitCommand),
    /// Active CPU used, and what it costs, per sandbox or for all.
    Usage(sandbox_cli::UsageArgs),
    /// Serve the runtime as an HTTP API under /v1 (docs/API.md, "HTTP API").
    Serve(serve_cli::ServeArgs),
    /// Show and change a sandbox's outbound network policy (deny-all by default).
    Policy(policy_cli::PolicyArgs),
    /// Store, list and remove the secrets network policies add to requests (values never shown).
    #[command(subcommand)]
    Secret(policy_cli::SecretCommand),
    /// Make, list and revoke the HTTP API's bearer tokens (kept hashed in the runtime's home).
    #[command(subcommand)]
    Token(token_cli::TokenCommand),
    /// Time the tiers, time to interactive, throughput and the HTTP API's overhead, and
    /// write a table, JSON and a Markdown report (docs/BENCHMARKS.md, "airlock bench").
    Bench(bench::BenchArgs),
}

#[derive(Debug, clap::Args)]
struct SetupArgs {
    /// Skip installing and registering gVisor (runsc).
    #[arg(long)]
    no_runsc: bool,
    /// Skip building the base image.
    #[arg(long)]
    no_image: bool,
}

#[derive(Debug, clap::Args)]
struct ReplArgs {
    /// The language: python or js.
    #[arg(long, value_name = "LANG")]
    lang: Language,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

/// Where code runs and what bounds it; shared by `run` and `repl`.
#[derive(Debug, clap::Args)]
struct SandboxArgs {
    /// Host directory the code sees as /workspace (must exist).
    /// Default: a fresh empty directory, removed afterwards.
    #[arg(long, value_name = "DIR")]
    workspace: Option<PathBuf>,
    /// Wall-clock deadline (per evaluation with --lang), such as 500ms, 10s or 2m.
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    timeout: String,
    /// Memory cap, such as 64MiB or 1GiB.
    #[arg(long, value_name = "SIZE", default_value = "256MiB")]
    memory: String,
    /// Output cap per stream (stdout and stderr each), such as 1MiB.
    #[arg(long, value_name = "SIZE", default_value = "1MiB")]
    output_limit: String,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The program to run: a .wasm or .wat file; with --lang, a source file.
    file: Option<PathBuf>,
    /// Run code in this language (python or js) instead of a WebAssembly program.
    #[arg(long, value_name = "LANG")]
    lang: Option<Language>,
    /// The code to run (with --lang), instead of a file.
    #[arg(short = 'c', long = "code", value_name = "CODE", requires = "lang", conflicts_with_all = ["file", "source_file"])]
    code: Option<String>,
    /// A source file to run (with --lang); the same as naming it as FILE.
    #[arg(long = "file", value_name = "PATH", requires = "lang", conflicts_with = "file")]
    source_file: Option<PathBuf>,
    #[command(flatten)]
    sandbox: SandboxArgs,
    /// Environment variable for the program, as KEY=VALUE (repeatable). Nothing is inherited.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Arguments passed to the program.
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
}

fn main() -> ExitCode {
    // Errors are one line on stderr, never a backtrace, even if something panics.
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        eprintln!("airlock: internal error: {message}");
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version go to stdout as usual.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let rendered = e.to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
            eprintln!("airlock: error: {first} (see airlock --help)");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    // Before anything asks where the interpreters are.
    if let Err(e) = carried::install() {
        eprintln!("airlock: warning: the interpreters this binary carries are not available: {e:#}");
    }
    let command = match cli.command {
        // The server builds its own multi-threaded async runtime.
        Command::Serve(args) => return finish(serve_cli::serve(args)),
        // Only the registry, no async runtime: works beside a running server.
        Command::Token(command) => return finish(token_cli::token(command)),
        // Its own multi-threaded async runtime: the in-process server and concurrent callers.
        Command::Bench(args) => return finish(bench::bench(args)),
        other => other,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("airlock: error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let result = runtime.block_on(async {
        match command {
            Command::Run(args) if args.lang.is_some() => run_code(args).await,
            Command::Run(args) => run(args).await,
            Command::Repl(args) => repl(args).await,
            Command::Setup(args) => setup(args).await,
            Command::Sandbox(command) => sandbox_cli::sandbox(command).await,
            Command::Snapshot(command) => snapshot_cli::snapshot(command).await,
            Command::Exec(args) => sandbox_cli::exec(args).await,
            Command::Code(args) => sandbox_cli::code(args).await,
            Command::Context(command) => context_cli::context(command).await,
            Command::Files(args) => sandbox_cli::files(args).await,
            Command::Git(command) => git_cli::git(command).await,
            Command::Usage(args) => sandbox_cli::usage(args).await,
            Command::Policy(args) => policy_cli::policy(args).await,
            Command::Secret(command) => policy_cli::secret(command).await,
            Command::Serve(_) => bail!("serve runs on its own async runtime"),
            Command::Token(_) => bail!("token runs without an async runtime"),
            Command::Bench(_) => bail!("bench runs on its own async runtime"),
        }
    });
    finish(result)
}

/// The exit status of a command's result; an error is one line on stderr.
fn finish(result: Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("airlock: error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::from(EXIT_ERROR)
        }
    }
}

async fn setup(args: SetupArgs) -> Result<ExitCode> {
    use airlock::container::{
        DEFAULT_BUILD_LOG_DIR, DockerEngine, EngineOptions, Error as ContainerError, ImageRecipe, ensure_base_image_with,
        image_exists,
    };
    // Each sandbox's disk quota lives on a btrfs image the runtime makes with mkfs.btrfs.
    airlock::runtime::install_disk_tools()?;
    eprintln!("airlock: btrfs-progs ready (sandbox disk quotas)");
    let options = EngineOptions { with_runsc: !args.no_runsc, ..EngineOptions::default() };
    let engine = DockerEngine::connect_or_setup(&options).await?;
    eprintln!("airlock: docker engine ready at {}", options.socket.display());
    match engine.user_mapping() {
        Some(mapping) => eprintln!(
            "airlock: container uids are remapped: uid 0 in a sandbox is host uid {}, uid 1000 is {}",
            mapping.first_uid,
            mapping.first_uid.saturating_add(1000)
        ),
        None => eprintln!("airlock: warning: {}", airlock::container::NO_REMAP_ADVICE),
    }
    if !args.no_image {
        let recipe = ImageRecipe::default();
        if image_exists(&engine, &recipe.tag()).await? {
            eprintln!("airlock: base image {} is already built (its recipe is unchanged)", recipe.tag());
        }
        let log_dir = std::path::Path::new(DEFAULT_BUILD_LOG_DIR);
        let image = match ensure_base_image_with(&engine, &recipe, log_dir, setup_progress::build_reporter()).await {
            Ok(image) => image,
            Err(ContainerError::ImageBuildStage { image, stage, reason, log, tail }) => {
                setup_progress::print_stage_failure(&image, stage, &reason, &log, &tail);
                return Ok(ExitCode::from(EXIT_ERROR));
            }
            Err(other) => return Err(other.into()),
        };
        eprintln!("airlock: base image {image} ready");
        println!("{image}");
    }
    Ok(ExitCode::SUCCESS)
}

fn limit_hit(hit: LimitExceeded) -> ExitCode {
    eprintln!("airlock: error: {hit}");
    ExitCode::from(if hit.limit == Limit::Deadline { EXIT_DEADLINE } else { EXIT_LIMIT })
}

/// Reports a crash as one line and returns the crash exit status.
fn crashed(what: &str, message: &str) -> ExitCode {
    eprintln!("airlock: error: {what}: {}", message.replace('\n', " "));
    ExitCode::from(EXIT_CRASH)
}

fn interpreters(engine: IsolateEngine) -> Interpreters {
    Interpreters::new(engine, default_interpreter_dir())
}

/// Prints an evaluation's output and result; returns the exit status it stands for.
fn report(outcome: &EvalOutcome, show_value: bool) -> ExitCode {
    let _ = std::io::stdout().write_all(&outcome.stdout);
    let _ = std::io::stderr().write_all(&outcome.stderr);
    match &outcome.result {
        EvalResult::Ok { value } => {
            if let (true, Some(value)) = (show_value, value) {
                println!("{}", value.text);
            }
            ExitCode::SUCCESS
        }
        EvalResult::SyntaxError(error) | EvalResult::RuntimeError(error) => {
            let text = if error.traceback.is_empty() { format!("{}: {}", error.kind, error.message) } else { error.traceback.clone() };
            eprintln!("{}", text.trim_end());
            ExitCode::FAILURE
        }
        EvalResult::NeedsEscalation { reason } => {
            eprintln!("airlock: error: this code needs a container ({reason}); the isolate tier cannot run it");
            ExitCode::from(EXIT_ESCALATION)
        }
        EvalResult::LimitExceeded(hit) => limit_hit(*hit),
        EvalResult::Crashed { message } => crashed("the interpreter crashed", message),
        other => crashed("evaluation ended unexpectedly", &format!("{other:?}")),
    }
}

async fn run_code(args: RunArgs) -> Result<ExitCode> {
    let language = args.lang.context("--lang is required to run code")?;
    let code = match (&args.code, args.source_file.as_ref().or(args.file.as_ref())) {
        (Some(code), _) => code.clone(),
        (None, Some(file)) => std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?,
        (None, None) => bail!("nothing to run: give -c CODE or --file PATH"),
    };
    if !args.env.is_empty() || !args.args.is_empty() {
        bail!("--env and program arguments apply to WebAssembly programs, not to --lang code");
    }
    let limits = args.sandbox.limits()?;
    let (workspace, _scratch) = args.sandbox.workspace()?;
    let interpreters = interpreters(cli_engine()?);
    let outcome = interpreters.run(language, workspace, &code, limits).await?;
    Ok(report(&outcome, false))
}

async fn repl(args: ReplArgs) -> Result<ExitCode> {
    use std::io::BufRead;

    let limits = args.sandbox.limits()?;
    let (workspace, _scratch) = args.sandbox.workspace()?;
    let interpreters = interpreters(cli_engine()?);
    let context = interpreters.create_context(args.lang, workspace, limits).await?;
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    let prompt = |text: &str| {
        if interactive {
            print!("{text}");
            let _ = std::io::stdout().flush();
        }
    };
    let mut block = String::new();
    prompt(">>> ");
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        // A line ending in ':' or '{' opens a block, which an empty line closes.
        let opens = matches!(line.trim_end().chars().last(), Some(':' | '{' | '\\'));
        if !block.is_empty() || opens {
            if line.trim().is_empty() {
                let code = std::mem::take(&mut block);
                report(&interpreters.eval(&context, &code).await?, true);
                prompt(">>> ");
            } else {
                block.push_str(&line);
                block.push('\n');
                prompt("... ");
            }
            continue;
        }
        if !line.trim().is_empty() {
            report(&interpreters.eval(&context, &line).await?, true);
        }
        prompt(">>> ");
    }
    if !block.is_empty() {
        report(&interpreters.eval(&context, &block).await?, true);
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_env(pairs: &[String]) -> Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
            _ => bail!("--env {pair:?} is not KEY=VALUE"),
        })
        .collect()
}

impl SandboxArgs {
    fn limits(&self) -> Result<Limits> {
        let limits = Limits {
            deadline: parse_duration(&self.timeout).context("--timeout")?,
            memory_bytes: parse_size(&self.memory).context("--memory")?,
            output_bytes: parse_size(&self.output_limit).context("--output-limit")?,
            ..Limits::default()
        };
        limits.validate()?;
        Ok(limits)
    }

    /// The workspace, and the scratch directory to remove afterwards when none was named.
    fn workspace(&self) -> Result<(Workspace, Option<tempfile::TempDir>)> {
        Ok(match &self.workspace {
            Some(dir) => (Workspace::open(dir)?, None),
            None => {
                let scratch = tempfile::Builder::new().prefix("airlock-workspace-").tempdir()?;
                (Workspace::open(scratch.path())?, Some(scratch))
            }
        })
    }
}

async fn run(args: RunArgs) -> Result<ExitCode> {
    let Some(file) = args.file.clone() else {
        bail!("nothing to run: name a .wasm file, or use --lang with -c CODE or a source file");
    };
    let limits = args.sandbox.limits()?;
    let env = parse_env(&args.env)?;
    let (workspace, _scratch) = args.sandbox.workspace()?;

    let engine = cli_engine()?;
    let args_file = file.clone();
    let loader = engine.clone();
    let guest = tokio::task::spawn_blocking(move || loader.load_file(args_file)).await??;

    // Output is shown as the program writes it, not after it ends.
    let echo: OutputSender = Arc::new(|chunk: OutputChunk| {
        let _ = match chunk.stream {
            OutputStream::Stdout => std::io::stdout().lock().write_all(&chunk.bytes).and_then(|()| std::io::stdout().flush()),
            OutputStream::Stderr => std::io::stderr().lock().write_all(&chunk.bytes),
        };
    });
    let program = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let request = ExecRequest {
        program,
        args: args.args,
        env,
        stdin: StdinSource::Inherit,
        cwd: None,
        limits,
        output: Some(echo),
    };
    let outcome = engine.run(&guest, &workspace, &request).await?;
    Ok(match outcome.termination {
        Termination::Exited { code } => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Termination::LimitExceeded(hit) => limit_hit(hit),
        Termination::Crashed { message } => crashed("the program crashed", &message),
        other => crashed("the program ended unexpectedly", &other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_pairs_parse_and_reject_garbage() {
        assert_eq!(parse_env(&["A=1".into(), "B=x=y".into()]).unwrap(), vec![
            ("A".into(), "1".into()),
            ("B".into(), "x=y".into())
        ]);
        assert!(parse_env(&["NOVALUE".into()]).is_err());
        assert!(parse_env(&["=1".into()]).is_err());
    }
}
