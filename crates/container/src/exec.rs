//! Every command in a running sandbox goes through here: `exec` (output
//! streamed and captured with caps, stdin, a deadline), background processes
//! and PTY sessions. All run through the in-container agent as one kind of
//! run (`agent.rs`), so there is one loop that drives a command and one way a
//! tree is killed: the agent kills every descendant of the command's shepherd
//! (`crates/agent/src/tree.rs`), which nothing in the tree can leave.
//!
//! Each command has an owner or a deadline: an exec has its deadline, and is
//! killed whole if its caller's future is dropped; a PTY session is killed
//! when its [`PtySession`] is dropped; a background process belongs to the
//! sandbox's process table and ends when signalled or when the sandbox stops.
//! When a command's main process exits, what it left running is killed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock_agent::protocol::{Reply, Request, Spawn, TtySize};
use airlock_core::{
    ExecOutcome, ExecRequest, Limit, LimitExceeded, OutputChunk, OutputSender, OutputStream, StdinSource, Termination,
    TierKind, WORKSPACE_GUEST_PATH,
};
use tokio::io::AsyncReadExt;

use crate::agent::{AgentLink, Run};
use crate::cgroup::ContainerCgroup;
use crate::engine::ContainerRuntime;
use crate::error::{Error, Result};
use crate::process::{Process, ProcessEvent, ProcessFollower, ProcessInfo};
use crate::pty::{PtySession, PtySize};
use crate::sandbox::ContainerSandbox;

/// Stdin goes to the agent in frames of at most this many bytes.
pub(crate) const STDIN_CHUNK_BYTES: usize = 64 * 1024;
/// How long output is drained after a kill before the run is given up on.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How long an exec that ended as if killed waits to see whether the whole
/// runsc sandbox went down with it.
const RUNSC_STOP_GRACE: Duration = Duration::from_secs(2);
/// How long a signal or kill waits for the agent's answer.
const SIGNAL_TIMEOUT: Duration = Duration::from_secs(10);

/// A signal to send to a process tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Signal {
    Hup,
    Int,
    Quit,
    Kill,
    Usr1,
    Usr2,
    Term,
    Cont,
    Stop,
    /// Any other standard Linux signal, by number (see [`Signal::from_number`]).
    Number(i32),
}

/// The standard Linux signals the agent can send, numbered from 1 (x86-64
/// and arm64 numbering; real-time signals are not among them), without `SIG`.
const SIGNAL_NAMES: [&str; 31] = [
    "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2", "PIPE", "ALRM", "TERM",
    "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG", "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO",
    "PWR", "SYS",
];

/// The signals with a variant of their own.
const NAMED: [Signal; 9] = [
    Signal::Hup,
    Signal::Int,
    Signal::Quit,
    Signal::Kill,
    Signal::Usr1,
    Signal::Usr2,
    Signal::Term,
    Signal::Cont,
    Signal::Stop,
];

impl Signal {
    /// The signal numbered `number`, if it is a standard Linux signal (1 to 31).
    pub fn from_number(number: i32) -> Option<Signal> {
        if let Some(signal) = NAMED.into_iter().find(|signal| signal.number() == number) {
            return Some(signal);
        }
        (1..=SIGNAL_NAMES.len()).contains(&usize::try_from(number).unwrap_or(0)).then_some(Signal::Number(number))
    }

    /// The signal named `name` (`TERM`, `SIGTERM`, any case), if it is a standard Linux signal.
    pub fn from_name(name: &str) -> Option<Signal> {
        let upper = name.trim().to_ascii_uppercase();
        let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
        let bare = match bare {
            "IOT" => "ABRT",
            "POLL" => "IO",
            "CLD" => "CHLD",
            other => other,
        };
        let index = SIGNAL_NAMES.iter().position(|&known| known == bare)?;
        Signal::from_number(i32::try_from(index + 1).ok()?)
    }

    /// The Linux signal number.
    pub fn number(self) -> i32 {
        match self {
            Signal::Number(number) => number,
            Signal::Hup => 1,
            Signal::Int => 2,
            Signal::Quit => 3,
            Signal::Kill => 9,
            Signal::Usr1 => 10,
            Signal::Usr2 => 12,
            Signal::Term => 15,
            Signal::Cont => 18,
            Signal::Stop => 19,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Signal::Number(number) => usize::try_from(number)
                .ok()
                .and_then(|number| SIGNAL_NAMES.get(number.wrapping_sub(1)))
                .copied()
                .unwrap_or("UNKNOWN"),
            Signal::Hup => "HUP",
            Signal::Int => "INT",
            Signal::Quit => "QUIT",
            Signal::Kill => "KILL",
            Signal::Usr1 => "USR1",
            Signal::Usr2 => "USR2",
            Signal::Term => "TERM",
            Signal::Cont => "CONT",
            Signal::Stop => "STOP",
        }
    }
}

/// A request's command line, environment and working directory, checked.
pub(crate) struct CommandParts {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
}

pub(crate) fn command_parts(request: &ExecRequest) -> Result<CommandParts> {
    if request.program.is_empty() {
        return Err(Error::Invalid { what: "command", reason: "the program is empty".into() });
    }
    let cwd = request.cwd.clone().unwrap_or_else(|| WORKSPACE_GUEST_PATH.to_string());
    if !cwd.starts_with('/') {
        return Err(Error::Invalid { what: "working directory", reason: format!("{cwd:?} is not absolute") });
    }
    let mut env: Vec<(String, String)> = Vec::with_capacity(request.env.len());
    for (key, value) in &request.env {
        if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
            return Err(Error::Invalid { what: "environment variable", reason: format!("{key:?}") });
        }
        env.push((key.clone(), value.clone()));
    }
    let mut argv = vec![request.program.clone()];
    argv.extend(request.args.iter().cloned());
    if argv.iter().any(|arg| arg.contains('\0')) || cwd.contains('\0') {
        return Err(Error::Invalid {
            what: "command",
            reason: "a NUL byte in the program, an argument or the cwd".into(),
        });
    }
    Ok(CommandParts { argv, env, cwd })
}

/// The agent's spawn request for `request`, checked.
fn spawn_request(request: &ExecRequest, user: &str, stdin: bool, tty: Option<PtySize>) -> Result<Spawn> {
    let CommandParts { argv, env, cwd } = command_parts(request)?;
    if user.is_empty() || user.contains('\0') {
        return Err(Error::Invalid { what: "user", reason: format!("{user:?}") });
    }
    let tty = tty.map(|size| TtySize { cols: size.cols, rows: size.rows });
    Ok(Spawn { argv, env, cwd, user: user.to_string(), stdin, tty })
}

/// Sends `signal` to run `target`'s whole tree through the agent; for
/// `Kill`, stops and kills until none is left.
pub(crate) async fn signal_run(link: &Arc<AgentLink>, target: u32, signal: Signal) -> Result<()> {
    let request = match signal {
        Signal::Kill => Request::KillTree { target },
        other => Request::Signal { target, signal: other.number() },
    };
    match link.signal_tree(request, SIGNAL_TIMEOUT).await? {
        0 => Ok(()),
        // The agent's answer to a signal number it does not know.
        u32::MAX => Err(Error::Invalid {
            what: "signal",
            reason: format!("signal {} is not one the sandbox can send", signal.number()),
        }),
        remaining => Err(Error::Invalid {
            what: "signal",
            reason: format!("{remaining} processes were still there after the agent's last round"),
        }),
    }
}

/// Captured output of one stream, up to a cap.
/// One stream's output kept under a cap, each kept chunk also sent live.
/// Shared by commands and kernel evaluations.
#[derive(Debug)]
pub(crate) struct Capture {
    pub(crate) stream: OutputStream,
    pub(crate) bytes: Vec<u8>,
    cap: usize,
    /// Something was cut: the output reached the cap.
    pub(crate) truncated: bool,
}

impl Capture {
    pub(crate) fn new(stream: OutputStream, cap: u64) -> Self {
        Self { stream, bytes: Vec::new(), cap: usize::try_from(cap).unwrap_or(usize::MAX), truncated: false }
    }

    /// Keeps what fits under the cap and sends it on; returns whether this
    /// chunk was cut.
    pub(crate) fn push(&mut self, chunk: &[u8], sender: Option<&OutputSender>) -> bool {
        let room = self.cap.saturating_sub(self.bytes.len());
        let taken = &chunk[..chunk.len().min(room)];
        self.bytes.extend_from_slice(taken);
        if !taken.is_empty()
            && let Some(sender) = sender
        {
            sender(OutputChunk { stream: self.stream, bytes: taken.to_vec() });
        }
        if taken.len() < chunk.len() {
            self.truncated = true;
        }
        taken.len() < chunk.len()
    }
}

/// How a run ended, for [`ContainerSandbox::outcome`].
#[derive(Debug)]
struct Ended {
    cut: Option<Cut>,
    /// The whole container went down during the run.
    stopped: bool,
    exit_code: Option<i32>,
    usage: Usage,
}

/// What the container's cgroup counted during a run.
#[derive(Debug)]
struct Usage {
    cpu_time: Duration,
    /// The OOM killer acted in the container.
    oom_killed_since: bool,
}

impl Usage {
    fn since(cgroup: &ContainerCgroup, cpu_before: Option<Duration>, oom_before: Option<u64>) -> Self {
        let cpu_time = match (cpu_before, cgroup.cpu_usage()) {
            (Some(before), Some(after)) => after.saturating_sub(before),
            _ => Duration::ZERO,
        };
        let oom_killed_since =
            matches!((oom_before, cgroup.oom_kills()), (Some(before), Some(after)) if after > before);
        Self { cpu_time, oom_killed_since }
    }
}

/// Why Airlock ended a run early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    Deadline,
    Output,
}

impl ContainerSandbox {
    /// Runs `request` as the sandbox's user and waits for it to end. Output is
    /// captured up to the request's cap per stream (a command that writes past
    /// it is killed with an output-limit error), the deadline kills the
    /// command's whole process tree, and an OOM kill inside the container is
    /// reported as the memory limit. Dropping the returned future kills the
    /// command's whole tree; so does its main process exiting, for anything it
    /// left running (use [`start_process`](Self::start_process) for that).
    pub async fn exec(&self, request: ExecRequest) -> Result<ExecOutcome> {
        let user = self.spec().user.clone();
        self.exec_as(&user, request).await
    }

    /// As [`exec`](Self::exec), as another user of the image (`root`, a name,
    /// or `uid[:gid]`), for example for a package install. Capabilities stay
    /// as the sandbox has them; root commands are trusted with the agent,
    /// which runs as root too (see SECURITY.md).
    pub async fn exec_as(&self, user: &str, request: ExecRequest) -> Result<ExecOutcome> {
        request.limits.validate()?;
        let link = self.require_agent().await?;
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + request.limits.deadline);
        let feeds_stdin = !matches!(request.stdin, StdinSource::Empty);
        let spawn = spawn_request(&request, user, feeds_stdin, None)?;
        let cgroup = self.cgroup();
        let cpu_before = cgroup.cpu_usage();
        let oom_before = cgroup.oom_kills();

        let mut run = link.open_run();
        run.spawn(spawn).await?;
        let stdin_task = feed_stdin(&link, run.id, &request.stdin);
        let mut stdout = Capture::new(OutputStream::Stdout, request.limits.output_bytes);
        let mut stderr = Capture::new(OutputStream::Stderr, request.limits.output_bytes);
        let sender = request.output.as_ref();
        let mut cut = None;
        let mut give_up_at = deadline;
        let mut exit_code = None;
        let mut link_ended = false;
        loop {
            tokio::select! {
                // The timer first: replies that are always ready (an output
                // flood) must never keep the deadline from being seen.
                biased;
                () = tokio::time::sleep_until(give_up_at) => {
                    if cut.is_some() {
                        // Killed, yet no exit past the grace period: give up on it.
                        break;
                    }
                    cut = Some(Cut::Deadline);
                    give_up_at = tokio::time::Instant::now() + KILL_GRACE;
                    run.kill_tree().await?;
                }
                reply = run.recv() => {
                    let over_cap = match reply {
                        Some(Reply::Stdout(bytes)) => stdout.push(&bytes, sender),
                        Some(Reply::Stderr(bytes)) => stderr.push(&bytes, sender),
                        Some(Reply::Exited { code }) => {
                            exit_code = Some(code);
                            break;
                        }
                        Some(Reply::SpawnFailed { code, message }) => {
                            stderr.push(format!("{message}\n").as_bytes(), sender);
                            exit_code = Some(code);
                            break;
                        }
                        Some(Reply::Started { .. } | Reply::Signalled { .. } | Reply::Pong { .. }) => false,
                        None => {
                            link_ended = true;
                            break;
                        }
                    };
                    if over_cap && cut.is_none() {
                        cut = Some(Cut::Output);
                        give_up_at = tokio::time::Instant::now() + KILL_GRACE;
                        run.kill_tree().await?;
                    }
                }
            }
        }
        if let Some(task) = stdin_task {
            task.abort();
        }
        drop(run);
        // Under runsc a sandbox going down for memory (or a fork bomb) may
        // first show as its command killed: give the link's end a moment to show.
        if self.spec().runtime == ContainerRuntime::Runsc
            && !link_ended
            && matches!(exit_code, Some(128 | 137))
            && tokio::time::timeout(RUNSC_STOP_GRACE, link.wait_closed()).await.is_ok()
        {
            link_ended = true;
        }
        // The link also ends when the container is merely stopped: only a
        // container that is no longer running went down under the command.
        let stopped = link_ended && self.is_gone().await;
        if stopped {
            exit_code = None;
        }
        let usage = Usage::since(&cgroup, cpu_before, oom_before);
        Ok(self.outcome(&request, started, Ended { cut, stopped, exit_code, usage }, stdout, stderr).await)
    }

    /// Starts `request` in the background, as the sandbox's user, and returns
    /// its id at once. No deadline applies: it belongs to this sandbox's
    /// process table and runs until it exits, is signalled, or the sandbox
    /// stops. Its output is kept in a log of at most
    /// [`PROCESS_LOG_BYTES`](crate::PROCESS_LOG_BYTES), oldest dropped first.
    /// Its stdin is the request's bytes, then end of file (empty by default).
    pub async fn start_process(&self, request: ExecRequest) -> Result<String> {
        self.start_background(request, false).await
    }

    /// As [`start_process`](Self::start_process), with stdin a pipe that stays
    /// open after the request's bytes: write to it with
    /// [`write_process_stdin`](Self::write_process_stdin), end it with
    /// [`close_process_stdin`](Self::close_process_stdin).
    pub async fn start_process_with_stdin(&self, request: ExecRequest) -> Result<String> {
        self.start_background(request, true).await
    }

    async fn start_background(&self, request: ExecRequest, keep_stdin_open: bool) -> Result<String> {
        let link = self.require_agent().await?;
        let initial = match &request.stdin {
            StdinSource::Bytes(bytes) => bytes.clone(),
            StdinSource::Empty => Vec::new(),
            _ => return Err(Error::Invalid { what: "stdin", reason: "a background process takes bytes only".into() }),
        };
        let piped = keep_stdin_open || !initial.is_empty();
        let spawn = spawn_request(&request, &self.spec().user, piped, None)?;
        let command = spawn.argv.clone();
        let mut run = link.open_run();
        run.spawn(spawn).await?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let process = self.processes_table().register(id.clone(), command, run.id);
        {
            // Held until the first bytes are queued, so a write cannot overtake them.
            let mut open = process.stdin_open.lock().await;
            *open = keep_stdin_open;
            tokio::spawn(drive_background(process.clone(), run));
            for chunk in initial.chunks(STDIN_CHUNK_BYTES) {
                link.send_to(process.run, &Request::Stdin(chunk.to_vec())).await?;
            }
            if piped && !keep_stdin_open {
                link.send_to(process.run, &Request::StdinEnd).await?;
            }
        }
        Ok(id)
    }

    /// Writes `bytes` to the stdin of a process started with
    /// [`start_process_with_stdin`](Self::start_process_with_stdin). One
    /// write's bytes arrive whole, never interleaved with another's.
    pub async fn write_process_stdin(&self, id: &str, bytes: &[u8]) -> Result<()> {
        let process = self.processes_table().get(id)?;
        let open = process.stdin_open.lock().await;
        if !*open || process.has_exited() {
            return Err(Error::StdinClosed(id.into()));
        }
        let link = self.require_agent().await?;
        for chunk in bytes.chunks(STDIN_CHUNK_BYTES) {
            link.send_to(process.run, &Request::Stdin(chunk.to_vec())).await?;
        }
        drop(open);
        Ok(())
    }

    /// Closes a process's stdin: it reads end of file after what was written.
    pub async fn close_process_stdin(&self, id: &str) -> Result<()> {
        let process = self.processes_table().get(id)?;
        let mut open = process.stdin_open.lock().await;
        if !*open {
            return Err(Error::StdinClosed(id.into()));
        }
        *open = false;
        if process.has_exited() {
            return Ok(());
        }
        let link = self.require_agent().await?;
        link.send_to(process.run, &Request::StdinEnd).await
    }

    /// Every background process started through this handle, running or not.
    pub fn list_processes(&self) -> Vec<ProcessInfo> {
        self.processes_table().list()
    }

    /// Follows a process's output from the start of its log, then live, to its exit.
    pub fn follow_process(&self, id: &str) -> Result<ProcessFollower> {
        self.follow_process_from(id, 0)
    }

    /// Follows a process's output from byte `offset` of everything it wrote
    /// (both streams, in arrival order), as far back as its log still holds,
    /// then live, to its exit.
    pub fn follow_process_from(&self, id: &str, offset: u64) -> Result<ProcessFollower> {
        self.processes_table().get(id)?.follow_from(offset)
    }

    /// Sends `signal` to the process and everything it started.
    pub async fn signal_process(&self, id: &str, signal: Signal) -> Result<()> {
        let process: Arc<Process> = self.processes_table().get(id)?;
        let link = self.require_agent().await?;
        signal_run(&link, process.run, signal).await
    }

    /// Waits for the process to end and returns its exit code.
    pub async fn wait_process(&self, id: &str) -> Result<Option<i32>> {
        self.processes_table().get(id)?.wait().await
    }

    /// Starts `request` on a new terminal of `size`, as the sandbox's user.
    /// `TERM` is `xterm-256color` unless the request sets it. The session
    /// owns the command: dropping it kills the command's whole tree.
    pub async fn open_pty(&self, mut request: ExecRequest, size: PtySize) -> Result<PtySession> {
        if !request.env.iter().any(|(key, _)| key == "TERM") {
            request.env.push(("TERM".into(), "xterm-256color".into()));
        }
        let link = self.require_agent().await?;
        let spawn = spawn_request(&request, &self.spec().user, true, Some(size))?;
        let mut run = link.open_run();
        run.spawn(spawn).await?;
        Ok(PtySession::new(link, run))
    }

    /// The link to the agent; an error for a container that does not run it.
    async fn require_agent(&self) -> Result<Arc<AgentLink>> {
        self.agent_link().await?.ok_or_else(|| {
            Error::Agent(format!(
                "container {} does not run Airlock's agent (made by an older build): recreate it",
                self.container_id()
            ))
        })
    }

    /// The outcome of a run that ended as `ended` says.
    async fn outcome(
        &self,
        request: &ExecRequest,
        started: Instant,
        ended: Ended,
        stdout: Capture,
        stderr: Capture,
    ) -> ExecOutcome {
        let Ended { cut, stopped, exit_code, usage } = ended;
        let container_oom = stopped && self.oom_killed().await;
        let oom_killed = container_oom || (usage.oom_killed_since && exit_code == Some(137));
        let termination = match cut {
            Some(Cut::Deadline) => Termination::LimitExceeded(LimitExceeded {
                limit: Limit::Deadline,
                value: u64::try_from(request.limits.deadline.as_millis()).unwrap_or(u64::MAX),
            }),
            Some(Cut::Output) => {
                Termination::LimitExceeded(LimitExceeded { limit: Limit::Output, value: request.limits.output_bytes })
            }
            // SIGKILL (128 + 9) while the OOM killer acted in the container,
            // or the whole container killed for memory (runsc).
            None if oom_killed => Termination::LimitExceeded(LimitExceeded {
                limit: Limit::Memory,
                value: self.spec().resources.memory_bytes,
            }),
            None if stopped => {
                Termination::Crashed { message: "the sandbox container stopped during the command".into() }
            }
            None => match exit_code {
                Some(code) => Termination::Exited { code },
                None => Termination::Crashed { message: "the engine reported no exit code".into() },
            },
        };
        ExecOutcome {
            termination,
            stdout_truncated: stdout.truncated,
            stderr_truncated: stderr.truncated,
            stdout: stdout.bytes,
            stderr: stderr.bytes,
            wall_time: started.elapsed(),
            cpu_time: usage.cpu_time,
            tier: TierKind::Container,
        }
    }

    /// The exit code of a finished exec; waits briefly for the engine to record
    /// it (the output ends a moment before the engine marks the exec done).
    pub(crate) async fn exit_code(&self, exec_id: &str) -> Result<Option<i32>> {
        let mut pause = Duration::from_millis(1);
        let give_up = Instant::now() + Duration::from_secs(2);
        loop {
            let inspected =
                self.engine().docker().inspect_exec(exec_id).await.map_err(Error::docker("inspect exec"))?;
            if inspected.running != Some(true) {
                return Ok(inspected.exit_code.and_then(|code| i32::try_from(code).ok()));
            }
            if Instant::now() >= give_up {
                return Ok(None);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Whether the engine recorded the container as killed for memory.
    async fn oom_killed(&self) -> bool {
        let inspected = self
            .engine()
            .docker()
            .inspect_container(self.container_id(), None::<bollard::query_parameters::InspectContainerOptions>)
            .await;
        inspected.ok().and_then(|c| c.state).and_then(|state| state.oom_killed).unwrap_or(false)
    }
}

/// Feeds the request's stdin to run `run` in frames, then closes it.
fn feed_stdin(link: &Arc<AgentLink>, run: u32, stdin: &StdinSource) -> Option<tokio::task::JoinHandle<()>> {
    let link = link.clone();
    match stdin.clone() {
        StdinSource::Bytes(bytes) => Some(tokio::spawn(async move {
            for chunk in bytes.chunks(STDIN_CHUNK_BYTES) {
                if link.send_to(run, &Request::Stdin(chunk.to_vec())).await.is_err() {
                    return;
                }
            }
            let _ = link.send_to(run, &Request::StdinEnd).await;
        })),
        StdinSource::Inherit => Some(tokio::spawn(async move {
            let mut host_stdin = tokio::io::stdin();
            let mut buffer = vec![0u8; STDIN_CHUNK_BYTES];
            while let Ok(count @ 1..) = host_stdin.read(&mut buffer).await {
                if link.send_to(run, &Request::Stdin(buffer[..count].to_vec())).await.is_err() {
                    return;
                }
            }
            let _ = link.send_to(run, &Request::StdinEnd).await;
        })),
        _ => None,
    }
}

/// Drives a background process's run: its replies go into its log until it
/// exits or the link ends (the container stopped under it).
pub(crate) async fn drive_background(process: Arc<Process>, mut run: Run) {
    while let Some(reply) = run.recv().await {
        match reply {
            Reply::Stdout(bytes) => {
                process.record(ProcessEvent::Output(OutputChunk { stream: OutputStream::Stdout, bytes }))
            }
            Reply::Stderr(bytes) => {
                process.record(ProcessEvent::Output(OutputChunk { stream: OutputStream::Stderr, bytes }))
            }
            Reply::SpawnFailed { code, message } => {
                let bytes = format!("{message}\n").into_bytes();
                process.record(ProcessEvent::Output(OutputChunk { stream: OutputStream::Stderr, bytes }));
                process.record(ProcessEvent::Exited(Some(code)));
                return;
            }
            Reply::Exited { code } => {
                process.record(ProcessEvent::Exited(Some(code)));
                return;
            }
            Reply::Started { .. } | Reply::Signalled { .. } | Reply::Pong { .. } => {}
        }
    }
    process.record(ProcessEvent::Exited(None));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_past_the_cap_is_cut_and_flagged() {
        let mut capture = Capture::new(OutputStream::Stdout, 4);
        assert!(!capture.push(b"abc", None));
        assert!(capture.push(b"defg", None));
        assert_eq!(capture.bytes, b"abcd");
        assert!(capture.truncated);
    }

    #[test]
    fn signals_are_found_by_name_or_number_and_others_refused() {
        assert_eq!(Signal::from_name("term"), Some(Signal::Term));
        assert_eq!(Signal::from_name("SIGKILL"), Some(Signal::Kill));
        assert_eq!(Signal::from_name("SIGWINCH"), Some(Signal::Number(28)));
        assert_eq!(Signal::from_number(15), Some(Signal::Term));
        assert_eq!(Signal::from_number(28).map(Signal::name), Some("WINCH"));
        assert_eq!(Signal::from_number(31).map(Signal::number), Some(31));
        for refused in [0, -1, 32, 34, 64, i32::MAX] {
            assert_eq!(Signal::from_number(refused), None, "{refused}");
        }
        assert_eq!(Signal::from_name("NOPE"), None);
        assert_eq!(Signal::from_name("SIG"), None);
        assert_eq!(Signal::from_name(""), None);
    }

    #[test]
    fn exactly_the_cap_is_not_truncated() {
        let mut capture = Capture::new(OutputStream::Stderr, 4);
        assert!(!capture.push(b"abcd", None));
        assert!(!capture.truncated);
    }

    #[test]
    fn spawns_carry_the_request_and_bad_requests_are_refused() {
        let spawn =
            spawn_request(&ExecRequest::new("ls").args(["-l"]).env("A", "b"), "1000:1000", false, None).unwrap();
        assert_eq!(spawn.argv, vec!["ls", "-l"]);
        assert_eq!(spawn.env, vec![("A".to_string(), "b".to_string())], "nothing added: no marker to erase");
        assert_eq!(spawn.cwd, "/workspace");
        assert_eq!(spawn.user, "1000:1000");
        let tty = spawn_request(&ExecRequest::new("bash"), "u", true, Some(PtySize { cols: 9, rows: 3 })).unwrap();
        assert_eq!(tty.tty, Some(TtySize { cols: 9, rows: 3 }));
        assert!(spawn_request(&ExecRequest::new(""), "u", false, None).is_err());
        assert!(spawn_request(&ExecRequest::new("ls").cwd("relative"), "u", false, None).is_err());
        assert!(spawn_request(&ExecRequest::new("ls").env("A=B", "c"), "u", false, None).is_err());
        assert!(spawn_request(&ExecRequest::new("ls"), "", false, None).is_err());
    }
}
