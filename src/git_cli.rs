//! `airlock git checkout NAME URL ...`: a repository cloned into a sandbox's
//! workspace by git in its container, through its egress proxy (the
//! sandbox's network policy must allow the host; a private repository's
//! token comes from a header rule of that policy, never from the command
//! line). In process, or through the server that owns the home.
//!
//! Prints the commit on success; on git's failure prints git's stderr. The
//! exit status is git's own.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use airlock::Termination;
use airlock::limits::parse_duration;
use airlock::runtime::GitCheckout;
use anyhow::{Context, Result, bail};
use hyper::Method;
use serde_json::json;

use crate::remote::{ApiClient, encode_path};
use crate::sandbox_cli::{Home, HomeArgs};

#[derive(Debug, clap::Subcommand)]
pub enum GitCommand {
    /// Clone URL (http or https, no credentials in it) into the sandbox's
    /// workspace and print the commit. The sandbox must exist and its network
    /// policy must allow the host (`airlock policy NAME allow HOST`); a private
    /// repository's token comes from a header rule of that policy.
    Checkout(CheckoutArgs),
}

#[derive(Debug, clap::Args)]
pub struct CheckoutArgs {
    /// The sandbox (it must exist: its network policy decides what git may reach).
    name: String,
    /// The repository: an http:// or https:// URL without credentials.
    url: String,
    /// A branch or tag (default: the remote's default branch).
    #[arg(long, value_name = "BRANCH")]
    branch: Option<String>,
    /// A shallow clone of this many commits.
    #[arg(long, value_name = "N")]
    depth: Option<u32>,
    /// The directory under /workspace (default: the repository's name).
    #[arg(long, value_name = "DIR")]
    dir: Option<String>,
    /// Deadline for the clone, such as 90s or 5m (default 5m).
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
    #[command(flatten)]
    home: HomeArgs,
}

/// What a checkout printed and how git ended, however it was reached.
struct Finished {
    dir: String,
    commit: Option<String>,
    termination: Termination,
    stderr: Vec<u8>,
}

pub async fn git(command: GitCommand) -> Result<ExitCode> {
    match command {
        GitCommand::Checkout(args) => checkout(args).await,
    }
}

async fn checkout(args: CheckoutArgs) -> Result<ExitCode> {
    let timeout = args.timeout.as_deref().map(parse_duration).transpose().context("--timeout")?;
    let request = GitCheckout {
        url: args.url.clone(),
        branch: args.branch.clone(),
        depth: args.depth,
        dir: args.dir.clone(),
        timeout,
    };
    // Refused here before the home is even opened, with the runtime's words.
    request.validate()?;
    let home = args.home.reach("git checkout").await?;
    let work = run(home, &args, &request, timeout);
    // Ctrl-c drops the checkout: in process that kills git's tree (waited for,
    // as `exec` does); through a server it closes the request's connection.
    let finished = tokio::select! {
        finished = work => finished?,
        _ = tokio::signal::ctrl_c() => {
            if !airlock::container::settle_agent_links(INTERRUPT_SETTLE).await {
                eprintln!("airlock: warning: the container did not confirm the kill of git");
            }
            return Ok(ExitCode::from(EXIT_INTERRUPTED));
        }
    };
    Ok(report(finished))
}

/// How long an interrupted checkout waits for the container's agent to confirm git's kill.
const INTERRUPT_SETTLE: Duration = Duration::from_secs(5);
/// The status after ctrl-c, as a shell reports it (128 + SIGINT).
const EXIT_INTERRUPTED: u8 = 130;

async fn run(home: Home, args: &CheckoutArgs, request: &GitCheckout, timeout: Option<Duration>) -> Result<Finished> {
    Ok(match home {
        Home::Local(runtime) => {
            let Some(sandbox) = runtime.get(&args.name)? else {
                bail!("no sandbox named {:?} (create it, and allow the repository's host in its policy)", args.name);
            };
            let outcome = sandbox.git_checkout(request).await?;
            Finished {
                dir: outcome.dir,
                commit: outcome.commit,
                termination: outcome.run.outcome.termination,
                stderr: outcome.run.outcome.stderr,
            }
        }
        Home::Served(api) => checkout_remote(&api, &args.name, request, timeout).await?,
    })
}

async fn checkout_remote(
    api: &ApiClient,
    name: &str,
    request: &GitCheckout,
    timeout: Option<Duration>,
) -> Result<Finished> {
    let mut body = json!({ "url": request.url });
    if let Some(branch) = &request.branch {
        body["branch"] = json!(branch);
    }
    if let Some(depth) = request.depth {
        body["depth"] = json!(depth);
    }
    if let Some(dir) = &request.dir {
        body["dir"] = json!(dir);
    }
    if let Some(timeout) = timeout {
        body["timeout"] = json!(timeout.as_secs_f64());
    }
    let path = format!("/sandboxes/{}/git/checkout", encode_path(name));
    let answer = api.json(Method::POST, &path, Some(&body)).await?;
    let termination: Termination =
        serde_json::from_value(answer["termination"].clone()).context("the answer's termination")?;
    let stderr = match (answer["stderr"].as_str(), answer["stderr_encoding"].as_str()) {
        (Some(text), Some("base64")) => {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.decode(text).context("git's stderr is not base64")?
        }
        (Some(text), _) => text.as_bytes().to_vec(),
        (None, _) => Vec::new(),
    };
    Ok(Finished {
        dir: answer["dir"].as_str().unwrap_or_default().to_string(),
        commit: answer["commit"].as_str().map(str::to_string),
        termination,
        stderr,
    })
}

/// The commit on stdout when git succeeded; git's stderr otherwise. The
/// status is git's (or a limit's or crash's, as `exec` reports them).
fn report(finished: Finished) -> ExitCode {
    match (&finished.termination, &finished.commit) {
        (Termination::Exited { code: 0 }, Some(commit)) => {
            println!("{commit}");
            eprintln!("airlock: cloned into /workspace/{}", finished.dir);
            ExitCode::SUCCESS
        }
        (Termination::Exited { code: 0 }, None) => {
            let _ = std::io::stderr().write_all(&finished.stderr);
            eprintln!("airlock: error: git cloned into /workspace/{} but its commit could not be read", finished.dir);
            ExitCode::FAILURE
        }
        (Termination::Exited { code }, _) => {
            let _ = std::io::stderr().write_all(&finished.stderr);
            ExitCode::from(u8::try_from(*code).ok().filter(|code| *code != 0).unwrap_or(1))
        }
        (Termination::LimitExceeded(hit), _) => {
            let _ = std::io::stderr().write_all(&finished.stderr);
            crate::limit_hit(*hit)
        }
        (Termination::Crashed { message }, _) => crate::crashed("git crashed", message),
        (other, _) => crate::crashed("git ended unexpectedly", &other.to_string()),
    }
}
