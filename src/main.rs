//! The `airlock` command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use airlock::limits::{parse_duration, parse_size};
use airlock::{
    EngineConfig, ExecRequest, IsolateEngine, Limit, Limits, OutputChunk, OutputSender, OutputStream, StdinSource,
    Termination, Workspace,
};
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// Exit status when the guest ran past its deadline (as timeout(1) does).
const EXIT_DEADLINE: u8 = 124;
/// Exit status when the guest hit any other limit (memory, output, table, instances, stack).
const EXIT_LIMIT: u8 = 125;
/// Exit status when the guest crashed (a wasm trap).
const EXIT_CRASH: u8 = 134;
/// Exit status when Airlock itself could not do what was asked (bad input, missing file).
const EXIT_ERROR: u8 = 2;

#[derive(Debug, Parser)]
#[command(name = "airlock", version, about = "Run untrusted code in WebAssembly isolates and containers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a WebAssembly program (a WASI preview 2 component or preview 1 module, .wasm or .wat).
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The program to run.
    file: PathBuf,
    /// Host directory the program sees as /workspace (must exist).
    /// Default: a fresh empty directory, removed afterwards.
    #[arg(long, value_name = "DIR")]
    workspace: Option<PathBuf>,
    /// Wall-clock deadline, such as 500ms, 10s or 2m.
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    timeout: String,
    /// Memory cap, such as 64MiB or 1GiB.
    #[arg(long, value_name = "SIZE", default_value = "256MiB")]
    memory: String,
    /// Output cap per stream (stdout and stderr each), such as 1MiB.
    #[arg(long, value_name = "SIZE", default_value = "1MiB")]
    output_limit: String,
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
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("airlock: error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("airlock: error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::from(EXIT_ERROR)
        }
    }
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

async fn run(args: RunArgs) -> Result<ExitCode> {
    let limits = Limits {
        deadline: parse_duration(&args.timeout).context("--timeout")?,
        memory_bytes: parse_size(&args.memory).context("--memory")?,
        output_bytes: parse_size(&args.output_limit).context("--output-limit")?,
        ..Limits::default()
    };
    limits.validate()?;
    let env = parse_env(&args.env)?;

    // Without --workspace, the program gets an empty scratch directory that is removed afterwards.
    let scratch;
    let workspace = match &args.workspace {
        Some(dir) => Workspace::open(dir)?,
        None => {
            scratch = tempfile::Builder::new().prefix("airlock-workspace-").tempdir()?;
            Workspace::open(scratch.path())?
        }
    };

    let engine = IsolateEngine::new(EngineConfig::default())?;
    let file = args.file.clone();
    let loader = engine.clone();
    let guest = tokio::task::spawn_blocking(move || loader.load_file(file)).await??;

    // Output is shown as the program writes it, not after it ends.
    let echo: OutputSender = Arc::new(|chunk: OutputChunk| {
        let _ = match chunk.stream {
            OutputStream::Stdout => std::io::stdout().lock().write_all(&chunk.bytes).and_then(|()| std::io::stdout().flush()),
            OutputStream::Stderr => std::io::stderr().lock().write_all(&chunk.bytes),
        };
    });
    let program = args.file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let request = ExecRequest {
        program,
        args: args.args,
        env,
        stdin: StdinSource::Inherit,
        limits,
        output: Some(echo),
    };
    let outcome = engine.run(&guest, &workspace, &request).await?;
    Ok(match outcome.termination {
        Termination::Exited { code } => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Termination::LimitExceeded(hit) => {
            eprintln!("airlock: error: {hit}");
            ExitCode::from(if hit.limit == Limit::Deadline { EXIT_DEADLINE } else { EXIT_LIMIT })
        }
        Termination::Crashed { message } => {
            eprintln!("airlock: error: the program crashed: {}", message.replace('\n', " "));
            ExitCode::from(EXIT_CRASH)
        }
        other => {
            eprintln!("airlock: error: the program ended unexpectedly: {other}");
            ExitCode::from(EXIT_CRASH)
        }
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
