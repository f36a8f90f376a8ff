//! `airlock serve`: the runtime behind the HTTP API (crates/server).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use airlock::runtime::{DiskStatus, Runtime, RuntimeOptions, default_home};
use airlock_server::AdminToken;
use anyhow::{Context, Result};
use clap::builder::TypedValueParser as _;

/// Worker threads of the server's async runtime (the isolate engine and the
/// file operations have their own bounded pools).
const SERVE_WORKER_THREADS: usize = 4;
/// After the server has stopped, how long blocking work (an interpreter still
/// compiling, a file operation) may go on before the process exits anyway.
const BLOCKING_WORK_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
/// How long `serve` waits for a CLI command that holds the home to finish.
const SERVE_HOME_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on. Default: loopback only. Port 0 picks a free port
    /// (the address is printed on the first line of standard output).
    #[arg(long, value_name = "ADDR", default_value = airlock_server::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// The runtime's home directory. Default: $AIRLOCK_HOME, else the per-user data directory.
    #[arg(long, value_name = "DIR")]
    home: Option<PathBuf>,
    /// The domain of host-form preview URLs (`<port>-<sandbox>-<token>.<DOMAIN>`):
    /// a wildcard DNS name that reaches this server. `*.localhost` is loopback in browsers.
    #[arg(long, value_name = "DOMAIN", default_value = airlock_server::DEFAULT_PREVIEW_DOMAIN)]
    preview_domain: String,
    /// Evaluations (code, runs) running at once; more wait in the queue.
    #[arg(long, value_name = "N", default_value_t = airlock_server::ServerOptions::default().max_concurrent_evaluations,
          value_parser = clap::value_parser!(u32).range(1..=MAX_SLOTS_FLAG).map(|n| n as usize))]
    max_concurrent_evaluations: usize,
    /// Evaluations waiting for a slot; beyond it a request gets 503 with Retry-After.
    #[arg(long, value_name = "N", default_value_t = airlock_server::ServerOptions::default().max_queued_evaluations,
          value_parser = clap::value_parser!(u32).range(0..=MAX_QUEUE_FLAG).map(|n| n as usize))]
    max_queued_evaluations: usize,
    /// Longest wait for a slot, in seconds (fractions allowed), before 503.
    #[arg(long, value_name = "SECS", value_parser = seconds)]
    max_queue_wait: Option<std::time::Duration>,
    /// Bound on a plain request, in seconds, before 504.
    #[arg(long, value_name = "SECS", value_parser = seconds)]
    request_timeout: Option<std::time::Duration>,
    /// Bound on an exec, code or run answered as JSON, in seconds, before 504.
    #[arg(long, value_name = "SECS", value_parser = seconds)]
    execution_timeout: Option<std::time::Duration>,
    /// A host no sandbox may reach, whatever its own policy allows (exact name,
    /// `*.suffix` or an IP address); repeat for more. Added to every sandbox's
    /// deny list.
    #[arg(long = "network-deny", value_name = "HOST", value_parser = host_pattern)]
    network_deny: Vec<airlock::runtime::HostPattern>,
}

/// The most evaluation slots the flag accepts: the isolate engine's pool (more
/// would let runs fail on the pool instead of waiting in the queue).
const MAX_SLOTS_FLAG: i64 = airlock::wasm::DEFAULT_MAX_CONCURRENT_RUNS as i64;
/// The longest queue the flag accepts.
const MAX_QUEUE_FLAG: i64 = 1_000_000;
/// The longest duration a `serve` flag accepts (a day).
const MAX_FLAG_SECONDS: f64 = 86_400.0;

fn seconds(text: &str) -> std::result::Result<std::time::Duration, String> {
    let value: f64 = text.parse().map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(value > 0.0 && value <= MAX_FLAG_SECONDS) {
        return Err(format!("{text} seconds: give more than 0 and at most {MAX_FLAG_SECONDS}"));
    }
    Ok(std::time::Duration::from_secs_f64(value))
}

fn host_pattern(text: &str) -> std::result::Result<airlock::runtime::HostPattern, String> {
    airlock::runtime::HostPattern::new(text).map_err(|error| error.to_string())
}

/// Runs the server on its own multi-threaded async runtime until SIGTERM or ctrl-c.
pub fn serve(args: ServeArgs) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(SERVE_WORKER_THREADS)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let domain = &args.preview_domain;
    let valid = |label: &str| {
        !label.is_empty() && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if !domain.split('.').all(valid) {
        anyhow::bail!("--preview-domain {domain:?}: use lower-case DNS labels (letters, digits, '-') joined by '.'");
    }
    let served = runtime.block_on(async {
        let home = args.home.clone().unwrap_or_else(default_home);
        let mut options = RuntimeOptions::new(&home);
        options.home_role = "airlock serve".to_string();
        options.home_lock_wait = SERVE_HOME_LOCK_WAIT;
        options.network_deny = args.network_deny.clone();
        let runtime =
            Runtime::open(options).await.with_context(|| format!("opening the runtime at {}", home.display()))?;
        if let DiskStatus::NotEnforced { reason } = runtime.disk_status() {
            eprintln!("airlock: warning: sandbox disk quotas are not enforced: {reason}");
        }
        // Every /v1 route needs a bearer token: the first start makes the admin's.
        // Where it is goes to stderr; the token itself is never printed or logged.
        match airlock_server::ensure_admin_token(&runtime).context("setting up the admin token")? {
            AdminToken::Created(path) => {
                eprintln!("airlock: made the admin token: it is in {} (mode 0600)", path.display());
            }
            AdminToken::FileGone(path) => eprintln!(
                "airlock: an admin token exists but {} is gone; `airlock token create NAME --admin` makes another",
                path.display()
            ),
            other => eprintln!("airlock: the admin token is in {}", other.path().display()),
        }
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let address = listener.local_addr().context("reading the listening address")?;
        // The home's other users (the CLI) come in through its socket while this server owns it.
        let socket = runtime.home().join(airlock::runtime::API_SOCKET_FILE);
        let local = airlock_server::bind_local(&socket)
            .with_context(|| format!("listening on {}", socket.display()))?;
        // Printed once both listen: a client that reads it may use either.
        // Before saying so: a SIGTERM sent as soon as it is read stops the server cleanly.
        let shutdown = airlock_server::shutdown_signal();
        println!("airlock: listening on http://{address}/v1");
        let defaults = airlock_server::ServerOptions::default();
        let options = airlock_server::ServerOptions {
            preview_domain: args.preview_domain.clone(),
            max_concurrent_evaluations: args.max_concurrent_evaluations,
            max_queued_evaluations: args.max_queued_evaluations,
            max_queue_wait: args.max_queue_wait.unwrap_or(defaults.max_queue_wait),
            request_timeout: args.request_timeout.unwrap_or(defaults.request_timeout),
            execution_timeout: args.execution_timeout.unwrap_or(defaults.execution_timeout),
            ..defaults
        };
        let state = airlock_server::AppState::with_options(
            runtime,
            airlock::wasm::interpreter::default_interpreter_dir(),
            options,
        );
        tokio::spawn(airlock_server::serve_local(local, state.clone()));
        let served = airlock_server::serve(listener, state, shutdown).await;
        let _ = std::fs::remove_file(&socket);
        served.context("serving")?;
        eprintln!("airlock: stopped");
        Ok(ExitCode::SUCCESS)
    });
    // Work still on the blocking pool (an interpreter compiling, a file
    // operation) is not waited for past this: a stopped server exits.
    runtime.shutdown_timeout(BLOCKING_WORK_GRACE);
    served
}
