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
use airlock::{DisplayOutput, ExecRequest, Language, OutputChunk, OutputSender, OutputStream, StdinSource, Termination};
use anyhow::{Context, Result, bail};
use hyper::Method;
use serde_json::{Value, json};

use crate::remote::{ApiClient, Events, encode_path, is_conflict, streamed};

/// Where the runtime keeps its registry and workspaces.
#[derive(Debug, clap::Args)]
pub struct HomeArgs {
    /// The runtime's home directory. Default: $AIRLOCK_HOME, else the per-user data directory.
    #[arg(long, value_name = "DIR")]
    home: Option<PathBuf>,
}

/// How long a CLI command waits for another CLI process to let the home go
/// (a server that owns it is reached through its socket instead).
const CLI_HOME_LOCK_WAIT: Duration = Duration::from_secs(30);
/// Between looks for a server's socket while the home is owned by another process.
const HOME_LOOK_INTERVAL: Duration = Duration::from_secs(1);

/// A home as the CLI reaches it: opened in this process, or through the
/// server that owns it.
pub(crate) enum Home {
    Local(Runtime),
    Served(ApiClient),
}

impl HomeArgs {
    fn path(&self) -> PathBuf {
        self.home.clone().unwrap_or_else(default_home)
    }

    /// Through the server that owns the home if one answers on its socket;
    /// else opened here, once another CLI process that holds it is done.
    pub(crate) async fn reach(&self, command: &str) -> Result<Home> {
        let home = self.path();
        let started = std::time::Instant::now();
        loop {
            if let Some(client) = ApiClient::if_served(&home) {
                return Ok(Home::Served(client));
            }
            let mut options = RuntimeOptions::new(&home);
            options.home_role = format!("airlock {command}");
            options.home_lock_wait = HOME_LOOK_INTERVAL;
            match Runtime::open(options).await {
                Ok(runtime) => {
                    if let DiskStatus::NotEnforced { reason } = runtime.disk_status() {
                        eprintln!("airlock: warning: sandbox disk quotas are not enforced: {reason}");
                    }
                    return Ok(Home::Local(runtime));
                }
                Err(airlock::runtime::Error::HomeInUse { .. }) if started.elapsed() < CLI_HOME_LOCK_WAIT => {}
                Err(error) => {
                    return Err(error).with_context(|| format!("opening the runtime at {}", home.display()));
                }
            }
        }
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
    /// Evaluate in this context (`airlock context new` makes one; it is kept in the home).
    #[arg(long, value_name = "ID")]
    context: Option<String>,
    /// Write each display output (charts, HTML tables, ...) to files in DIR,
    /// one per MIME type of each (`display-1.png`, `display-1.txt`, ...), and
    /// print their paths; without it, one summary line per display output.
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
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
            match args.home.reach("sandbox create").await? {
                Home::Local(runtime) => println!("{}", runtime.sandbox_with(&args.name, config).await?.id()),
                Home::Served(api) => println!("{}", create_remote(&api, &args.name, Some(&config)).await?),
            }
        }
        SandboxCommand::List(args) => {
            let infos: Vec<Value> = match args.home.reach("sandbox list").await? {
                Home::Local(runtime) => runtime.list()?.iter().map(serde_json::to_value).collect::<Result<_, _>>()?,
                Home::Served(api) => match api.json(Method::GET, "/sandboxes", None).await? {
                    Value::Array(infos) => infos,
                    other => bail!("the server listed sandboxes as {other}"),
                },
            };
            println!("{:<24} {:<40} {:<9} ESCALATED", "NAME", "ID", "STATE");
            for info in infos {
                let text = |key: &str| info[key].as_str().unwrap_or_default().to_string();
                println!("{:<24} {:<40} {:<9} {}", text("name"), text("id"), text("state"), text("escalated"));
            }
        }
        SandboxCommand::Rm(args) => match args.home.reach("sandbox rm").await? {
            Home::Local(runtime) => runtime.destroy(&args.name).await?,
            Home::Served(api) => {
                api.json(Method::DELETE, &format!("/sandboxes/{}", encode_path(&args.name)), None).await?;
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}

/// Creates the sandbox through the server unless it exists (as the runtime's
/// `sandbox_with` does); its id.
pub(crate) async fn create_remote(api: &ApiClient, name: &str, config: Option<&SandboxConfig>) -> Result<String> {
    let mut body = json!({ "name": name });
    if let Some(config) = config {
        body["config"] = serde_json::to_value(config)?;
    }
    let created = api.json(Method::POST, "/sandboxes", Some(&body)).await;
    let info = if is_conflict(&created) {
        api.json(Method::GET, &format!("/sandboxes/{}", encode_path(name)), None).await?
    } else {
        created?
    };
    Ok(info["id"].as_str().unwrap_or_default().to_string())
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
    let Some((program, rest)) = args.command.split_first() else { bail!("no command given after --") };
    let deadline = parse_duration(&args.timeout)?;
    let runtime = match args.home.reach("exec").await? {
        Home::Local(runtime) => runtime,
        Home::Served(api) => return exec_remote(&api, &args, deadline).await,
    };
    let sandbox = runtime.sandbox(&args.name).await?;
    let mut request = ExecRequest::new(program).args(rest.iter().cloned()).output(echo_output()).stdin(StdinSource::Empty);
    request.limits.deadline = deadline;
    let ran = match interruptible(sandbox.exec(request)).await {
        Interruptible::Done(ran) => ran?,
        Interruptible::Interrupted(status) => return Ok(status),
    };
    if args.verbose {
        eprintln!("airlock: ran in the {} tier: {}", ran.placement.tier, ran.placement.reason);
    }
    Ok(exit_status(&ran.outcome.termination))
}

fn exit_status(termination: &Termination) -> ExitCode {
    match termination {
        Termination::Exited { code } => ExitCode::from(u8::try_from(*code).unwrap_or(1)),
        Termination::LimitExceeded(hit) => crate::limit_hit(*hit),
        Termination::Crashed { message } => crate::crashed("the command crashed", message),
        other => crate::crashed("the command ended unexpectedly", &other.to_string()),
    }
}

/// `exec` through the server: the command's output streamed as events as it
/// comes, then its real status. An interrupt closes the stream, and the
/// server kills what the stream started.
async fn exec_remote(api: &ApiClient, args: &ExecArgs, deadline: Duration) -> Result<ExitCode> {
    use base64::Engine as _;
    let Some((program, rest)) = args.command.split_first() else { bail!("no command given after --") };
    create_remote(api, &args.name, None).await?;
    let body = json!({ "command": program, "args": rest, "timeout": deadline.as_secs_f64() });
    let path = format!("/sandboxes/{}/exec", encode_path(&args.name));
    let streaming = async {
        let headers = [("content-type", "application/json"), ("accept", "text/event-stream")];
        let bytes = serde_json::to_vec(&body)?.into();
        let response = api.send(Method::POST, &path, &headers, crate::remote::full(bytes)).await?;
        let mut events = Events::new(response);
        while let Some((name, data)) = events.next().await? {
            match name.as_str() {
                "stdout" | "stderr" => {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(data.trim())
                        .context("the server sent output that is not base64")?;
                    let _ = if name == "stdout" {
                        std::io::stdout().lock().write_all(&bytes).and_then(|()| std::io::stdout().flush())
                    } else {
                        std::io::stderr().lock().write_all(&bytes)
                    };
                }
                "exit" => {
                    let answer: Value = serde_json::from_str(&data).context("the exit event")?;
                    if args.verbose {
                        let placement = &answer["placement"];
                        eprintln!(
                            "airlock: ran in the {} tier: {}",
                            placement["tier"].as_str().unwrap_or("?"),
                            placement["reason"].as_str().unwrap_or("")
                        );
                    }
                    let termination: Termination = serde_json::from_value(answer["termination"].clone())
                        .context("the exit event's termination")?;
                    return Ok(exit_status(&termination));
                }
                "error" => {
                    let problem: Value = serde_json::from_str(&data).unwrap_or_default();
                    bail!("{}", problem["detail"].as_str().unwrap_or("the server reported an error"));
                }
                _ => {}
            }
        }
        bail!("the server's stream ended without the command's exit")
    };
    match interruptible(streaming).await {
        Interruptible::Done(done) => done,
        Interruptible::Interrupted(status) => Ok(status),
    }
}

/// Prints output chunks as the code writes them.
fn echo_output() -> OutputSender {
    Arc::new(|chunk: OutputChunk| {
        let _ = match chunk.stream {
            OutputStream::Stdout => {
                std::io::stdout().lock().write_all(&chunk.bytes).and_then(|()| std::io::stdout().flush())
            }
            OutputStream::Stderr => std::io::stderr().lock().write_all(&chunk.bytes),
        };
    })
}

pub async fn code(args: CodeArgs) -> Result<ExitCode> {
    let runtime = match args.home.reach("code").await? {
        Home::Local(runtime) => runtime,
        Home::Served(api) => return code_remote(&api, &args).await,
    };
    let sandbox = runtime.sandbox(&args.name).await?;
    // Output is printed live, as the code writes it (both tiers).
    let evaluation = async {
        match &args.context {
            Some(context) => sandbox.code_in_streaming(context, &args.code, echo_output()).await,
            None => sandbox.code_streaming(args.lang, &args.code, echo_output()).await,
        }
    };
    let ran = match interruptible(evaluation).await {
        Interruptible::Done(ran) => ran?,
        Interruptible::Interrupted(status) => return Ok(status),
    };
    if args.verbose {
        eprintln!("airlock: ran in the {} tier: {}", ran.placement.tier, ran.placement.reason);
    }
    finish(ran.outcome, args.out_dir.as_deref())
}

/// After the live output: the result (as `report` does, without the output
/// already printed), then the display outputs, written or summarised.
fn finish(mut outcome: airlock::EvalOutcome, out_dir: Option<&std::path::Path>) -> Result<ExitCode> {
    outcome.stdout.clear();
    outcome.stderr.clear();
    let status = crate::report(&outcome, false);
    show_displays(&outcome.displays, outcome.displays_truncated, out_dir)?;
    Ok(status)
}

/// Writes each display to files under `out_dir` and prints their paths, or
/// prints one summary line per display.
fn show_displays(displays: &[DisplayOutput], truncated: bool, out_dir: Option<&std::path::Path>) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    match out_dir {
        Some(dir) => {
            for path in write_displays(displays, dir)? {
                writeln!(stdout, "{}", path.display())?;
            }
        }
        None => {
            for (index, display) in displays.iter().enumerate() {
                writeln!(stdout, "{}", display_summary(index + 1, display))?;
            }
        }
    }
    if truncated {
        eprintln!("airlock: warning: more display outputs were made than an evaluation keeps; the rest were dropped");
    }
    Ok(())
}

/// The file extension for a MIME type: the common ones by name, `+json` and
/// `+xml` types as `json` and `xml`, any other from its subtype (letters and
/// digits only), else `bin`.
fn extension(mime: &str) -> String {
    let known = match mime {
        "image/png" => "png",
        "image/jpeg" => "jpg",
        "image/gif" => "gif",
        "image/webp" => "webp",
        "image/svg+xml" => "svg",
        "text/html" => "html",
        "text/markdown" => "md",
        "text/plain" => "txt",
        "text/latex" => "tex",
        "text/css" => "css",
        "text/csv" => "csv",
        "application/json" => "json",
        "application/javascript" | "text/javascript" => "js",
        "application/pdf" => "pdf",
        _ => "",
    };
    if !known.is_empty() {
        return known.to_string();
    }
    let essence = mime.split(';').next().unwrap_or_default().trim();
    if essence.ends_with("+json") {
        return "json".to_string();
    }
    if essence.ends_with("+xml") {
        return "xml".to_string();
    }
    let subtype = essence.rsplit('/').next().unwrap_or_default();
    let cleaned: String = subtype.chars().filter(char::is_ascii_alphanumeric).take(16).collect();
    if cleaned.is_empty() { "bin".to_string() } else { cleaned.to_ascii_lowercase() }
}

/// A representation's bytes: base64-decoded for binary types (as bundles
/// keep them), the text's bytes for the rest.
fn display_bytes(mime: &str, value: &str) -> Result<Vec<u8>> {
    use base64::Engine as _;
    if DisplayOutput::is_binary(mime) {
        let compact: String = value.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        base64::engine::general_purpose::STANDARD
            .decode(compact)
            .with_context(|| format!("a display's {mime} is not base64"))
    } else {
        Ok(value.as_bytes().to_vec())
    }
}

/// Writes every representation of every display to `dir` (made if missing):
/// `display-<n>.<ext>`, n counting from 1 in the order they were made; two
/// types of one display with the same extension get `-2`, `-3`, ... Returns
/// the paths, in order.
fn write_displays(displays: &[DisplayOutput], dir: &std::path::Path) -> Result<Vec<PathBuf>> {
    if displays.is_empty() {
        return Ok(Vec::new());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot make {}", dir.display()))?;
    let mut written = Vec::new();
    for (index, display) in displays.iter().enumerate() {
        let mut used = std::collections::BTreeSet::new();
        for (mime, value) in &display.data {
            let ext = extension(mime);
            let mut name = format!("display-{}.{ext}", index + 1);
            let mut again = 1;
            while !used.insert(name.clone()) {
                again += 1;
                name = format!("display-{}-{again}.{ext}", index + 1);
            }
            let path = dir.join(name);
            std::fs::write(&path, display_bytes(mime, value)?)
                .with_context(|| format!("cannot write {}", path.display()))?;
            written.push(path);
        }
    }
    Ok(written)
}

/// `[display 1: image/png 640x480 (23.4 KiB), text/plain (12 bytes)]`.
fn display_summary(number: usize, display: &DisplayOutput) -> String {
    let parts: Vec<String> = display
        .data
        .iter()
        .map(|(mime, value)| {
            let Ok(bytes) = display_bytes(mime, value) else { return format!("{mime} (not base64)") };
            let size = airlock::limits::format_size(u64::try_from(bytes.len()).unwrap_or(u64::MAX));
            match png_dimensions(&bytes) {
                Some((width, height)) if mime == "image/png" => format!("{mime} {width}x{height} ({size})"),
                _ => format!("{mime} ({size})"),
            }
        })
        .collect();
    if parts.is_empty() {
        format!("[display {number}: empty]")
    } else {
        format!("[display {number}: {}]", parts.join(", "))
    }
}

/// A PNG's width and height, from its header (`IHDR` is always first).
fn png_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    if bytes.len() < 24 || !bytes.starts_with(SIGNATURE) || &bytes[12..16] != b"IHDR" {
        return None;
    }
    let width = u32::from_be_bytes(bytes[16..20].try_into().ok()?);
    let height = u32::from_be_bytes(bytes[20..24].try_into().ok()?);
    Some((width, height))
}

/// `code` through the server: output printed as the code writes it (the
/// event stream), then the result and display outputs as a local one is
/// reported. An interrupt closes the stream; the evaluation then runs to its
/// end (bounded by its deadline) in the server.
async fn code_remote(api: &ApiClient, args: &CodeArgs) -> Result<ExitCode> {
    use base64::Engine as _;
    create_remote(api, &args.name, None).await?;
    let mut body = json!({ "code": args.code });
    match &args.context {
        Some(context) => body["context"] = json!(context),
        None => body["language"] = serde_json::to_value(args.lang)?,
    }
    let path = format!("/sandboxes/{}/code", encode_path(&args.name));
    let streaming = async {
        let headers = [("content-type", "application/json"), ("accept", "text/event-stream")];
        let bytes = serde_json::to_vec(&body)?.into();
        let response = api.send(Method::POST, &path, &headers, crate::remote::full(bytes)).await?;
        let mut events = Events::new(response);
        let mut displays = Vec::new();
        while let Some((name, data)) = events.next().await? {
            match name.as_str() {
                "stdout" | "stderr" => {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(data.trim())
                        .context("the server sent output that is not base64")?;
                    let _ = if name == "stdout" {
                        std::io::stdout().lock().write_all(&bytes).and_then(|()| std::io::stdout().flush())
                    } else {
                        std::io::stderr().lock().write_all(&bytes)
                    };
                }
                "display" => {
                    displays.push(serde_json::from_str::<DisplayOutput>(&data).context("a display event")?);
                }
                "result" => {
                    let answer: Value = serde_json::from_str(&data).context("the result event")?;
                    return Ok((answer, displays));
                }
                "error" => {
                    let problem: Value = serde_json::from_str(&data).unwrap_or_default();
                    bail!("{}", problem["detail"].as_str().unwrap_or("the server reported an error"));
                }
                _ => {}
            }
        }
        bail!("the server's stream ended without the evaluation's result")
    };
    let (answer, displays) = match interruptible(streaming).await {
        Interruptible::Done(done) => done?,
        Interruptible::Interrupted(status) => return Ok(status),
    };
    if args.verbose {
        let placement = &answer["placement"];
        eprintln!(
            "airlock: ran in the {} tier: {}",
            placement["tier"].as_str().unwrap_or("?"),
            placement["reason"].as_str().unwrap_or("")
        );
    }
    let mut outcome = eval_outcome(&answer)?;
    outcome.displays = displays;
    finish(outcome, args.out_dir.as_deref())
}

/// The server's answer to code, as the runtime's outcome.
fn eval_outcome(answer: &Value) -> Result<airlock::EvalOutcome> {
    use airlock::EvalResult;
    use base64::Engine as _;
    let bytes = |field: &str| -> Result<Vec<u8>> {
        let text = answer[field].as_str().unwrap_or_default();
        Ok(match answer[format!("{field}_encoding")].as_str() {
            Some("base64") => base64::engine::general_purpose::STANDARD.decode(text)?,
            _ => text.as_bytes().to_vec(),
        })
    };
    let result = &answer["result"];
    fn part<T: serde::de::DeserializeOwned>(result: &Value, key: &str) -> Result<T> {
        serde_json::from_value(result[key].clone()).with_context(|| format!("the result's {key}"))
    }
    let result = match result["kind"].as_str().unwrap_or_default() {
        "ok" => EvalResult::Ok { value: serde_json::from_value(result["value"].clone()).unwrap_or(None) },
        "syntax-error" => EvalResult::SyntaxError(part(result, "error")?),
        "runtime-error" => EvalResult::RuntimeError(part(result, "error")?),
        "needs-escalation" => EvalResult::NeedsEscalation { reason: part(result, "escalation")? },
        "limit-exceeded" => EvalResult::LimitExceeded(part(result, "limit")?),
        "crashed" => EvalResult::Crashed { message: result["message"].as_str().unwrap_or_default().to_string() },
        other => bail!("the server gave a result of kind {other:?}"),
    };
    let millis = |field: &str| Duration::from_millis(answer[field].as_u64().unwrap_or_default());
    Ok(airlock::EvalOutcome {
        result,
        stdout: bytes("stdout")?,
        stderr: bytes("stderr")?,
        stdout_truncated: answer["stdout_truncated"].as_bool().unwrap_or_default(),
        stderr_truncated: answer["stderr_truncated"].as_bool().unwrap_or_default(),
        wall_time: millis("wall_time_ms"),
        cpu_time: millis("cpu_time_ms"),
        displays: serde_json::from_value(answer["displays"].clone()).unwrap_or_default(),
        displays_truncated: answer["displays_truncated"].as_bool().unwrap_or_default(),
        side_effects: serde_json::from_value(answer["side_effects"].clone()).unwrap_or_default(),
        side_effects_truncated: answer["side_effects_truncated"].as_bool().unwrap_or_default(),
    })
}

pub async fn files(args: FilesArgs) -> Result<ExitCode> {
    let runtime = match args.home.reach("files").await? {
        Home::Local(runtime) => runtime,
        Home::Served(api) => return files_remote(&api, args).await,
    };
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

/// `files` through the server, streamed both ways as locally.
async fn files_remote(api: &ApiClient, args: FilesArgs) -> Result<ExitCode> {
    use http_body_util::BodyExt;
    let at = |path: &str| format!("/sandboxes/{}/files/{}", encode_path(&args.name), encode_path(path));
    match args.action {
        FilesAction::Ls { path } => {
            let listing = api.json(Method::GET, &format!("{}?list", at(&path)), None).await?;
            for entry in listing.as_array().into_iter().flatten() {
                let text = |key: &str| entry[key].as_str().unwrap_or_default().to_string();
                println!("{:<9} {:>12} {}", text("kind"), entry["size"].as_u64().unwrap_or_default(), text("name"));
            }
        }
        FilesAction::Get { path } => {
            let response = api.send(Method::GET, &at(&path), &[], crate::remote::full(Default::default())).await?;
            let mut body = response.into_body();
            let mut stdout = tokio::io::stdout();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.context("reading the file from the server")?.into_data() {
                    tokio::io::AsyncWriteExt::write_all(&mut stdout, &data).await?;
                }
            }
            tokio::io::AsyncWriteExt::flush(&mut stdout).await?;
        }
        FilesAction::Put { path, from } => {
            let body = match from {
                Some(file) => streamed(
                    tokio::fs::File::open(&file).await.with_context(|| format!("cannot read {}", file.display()))?,
                ),
                None => streamed(tokio::io::stdin()),
            };
            let response = api.send(Method::PUT, &at(&path), &[("content-type", "application/octet-stream")], body).await?;
            response.into_body().collect().await.context("reading the server's answer")?;
        }
        FilesAction::Rm { path } => {
            api.json(Method::DELETE, &at(&path), None).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn usage(args: UsageArgs) -> Result<ExitCode> {
    let since = match &args.since {
        Some(text) => Some(SystemTime::now() - parse_duration(text)?),
        None => None,
    };
    // (executions, cpu seconds, isolate cpu, container cpu, wall seconds, cost, price)
    let figures = match args.home.reach("usage").await? {
        Home::Local(runtime) => {
            let usage = runtime.usage(&UsageQuery { sandbox: args.name.clone(), since, until: None })?;
            let seconds = |d: Duration| d.as_secs_f64();
            (
                usage.total.executions,
                usage.cpu_seconds,
                seconds(usage.isolate.cpu_time),
                seconds(usage.container.cpu_time),
                seconds(usage.total.wall_time),
                usage.cost_usd,
                usage.price_per_vcpu_second,
            )
        }
        Home::Served(api) => {
            let mut query = Vec::new();
            if let Some(name) = &args.name {
                query.push(format!("sandbox={}", encode_path(name).replace('/', "%2F")));
            }
            if let Some(since) = since {
                let millis = since.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
                query.push(format!("since_ms={millis}"));
            }
            let path = if query.is_empty() { "/usage".to_string() } else { format!("/usage?{}", query.join("&")) };
            let usage = api.json(Method::GET, &path, None).await?;
            let number = |value: &Value| value.as_f64().unwrap_or_default();
            (
                usage["total"]["executions"].as_u64().unwrap_or_default(),
                number(&usage["cpu_seconds"]),
                number(&usage["isolate"]["cpu_seconds"]),
                number(&usage["container"]["cpu_seconds"]),
                number(&usage["total"]["wall_seconds"]),
                number(&usage["cost_usd"]),
                number(&usage["price_per_vcpu_second"]),
            )
        }
    };
    let (executions, cpu, isolate, container, wall, cost, price) = figures;
    println!("executions       {executions}");
    println!("cpu seconds      {cpu:.6} (isolate {isolate:.6}, container {container:.6})");
    println!("wall seconds     {wall:.6}");
    println!("cost             ${cost:.8} at ${price} per vCPU-second");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const PNG_1X1: &str =
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";

    fn bundle(entries: &[(&str, &str)]) -> DisplayOutput {
        DisplayOutput { data: entries.iter().map(|(mime, value)| (mime.to_string(), value.to_string())).collect() }
    }

    #[test]
    fn every_type_of_every_display_goes_to_its_own_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("new");
        let displays = [
            bundle(&[("image/png", PNG_1X1), ("text/plain", "<Figure>")]),
            bundle(&[("text/html", "<table/>"), ("image/svg+xml", "<svg/>"), ("application/json", "{\"a\":1}")]),
            bundle(&[("text/markdown", "# t"), ("application/vnd.custom+json", "{}"), ("application/x-custom", "z")]),
        ];
        let written = write_displays(&displays, &out).unwrap();
        let names: Vec<String> =
            written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(
            names,
            [
                "display-1.png",
                "display-1.txt",
                "display-2.json",
                "display-2.svg",
                "display-2.html",
                "display-3.json",
                "display-3.xcustom",
                "display-3.md"
            ]
        );
        let png = std::fs::read(out.join("display-1.png")).unwrap();
        assert!(png.starts_with(b"\x89PNG") && png.len() == 70, "decoded from base64");
        assert_eq!(std::fs::read_to_string(out.join("display-2.svg")).unwrap(), "<svg/>");
        assert_eq!(std::fs::read_to_string(out.join("display-3.md")).unwrap(), "# t");
        assert!(write_displays(&[], &dir.path().join("never")).unwrap().is_empty());
        assert!(!dir.path().join("never").exists(), "no directory is made for no displays");
    }

    #[test]
    fn two_types_with_one_extension_get_distinct_files() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_displays(&[bundle(&[("text/x-a", "1"), ("text/x-a;v=2", "2")])], dir.path()).unwrap();
        let names: Vec<_> = written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["display-1.xa", "display-1-2.xa"]);
    }

    #[test]
    fn binary_data_that_is_not_base64_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let error = write_displays(&[bundle(&[("image/png", "not base64!")])], dir.path()).unwrap_err();
        assert!(error.to_string().contains("image/png"), "{error}");
    }

    #[test]
    fn a_summary_names_each_type_with_its_size_and_a_png_its_dimensions() {
        let summary = display_summary(3, &bundle(&[("image/png", PNG_1X1), ("text/plain", "a dot")]));
        assert_eq!(summary, "[display 3: image/png 1x1 (70 bytes), text/plain (5 bytes)]");
        let big = "x".repeat(23 * 1024);
        assert_eq!(display_summary(1, &bundle(&[("text/html", &big)])), "[display 1: text/html (23 KiB)]");
        assert_eq!(display_summary(2, &DisplayOutput::default()), "[display 2: empty]");
    }
}
