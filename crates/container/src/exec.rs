//! One command in a running sandbox: streamed output with caps, stdin, a
//! deadline at which the command's whole process tree is killed.
//!
//! Docker has no API to kill an exec, so every exec carries a marker in its
//! environment (`AIRLOCK_EXEC=<id>`), which its children inherit. Killing runs
//! a second exec, as the same user, of a bash script made only of builtins
//! (it must not fork: the pids limit may be exhausted by the very fork bomb it
//! stops). It stops every marked process, then kills them, round after round,
//! until none is left. This works the same under runc and runsc, where the
//! host cannot see the sandbox's processes. A process that both leaves the
//! tree and wipes its environment escapes it; it still lives inside the
//! sandbox's pids, memory and CPU limits and ends when the sandbox stops.

use std::time::{Duration, Instant};

use airlock_core::{
    ExecOutcome, ExecRequest, Limit, LimitExceeded, OutputChunk, OutputSender, OutputStream, StdinSource, Termination,
    TierKind, WORKSPACE_GUEST_PATH,
};
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::query_parameters::WaitContainerOptions;
use futures_util::StreamExt;
use std::sync::Arc;

use airlock_agent::protocol::{Reply, Request, Spawn};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::agent::AgentLink;
use crate::cgroup::ContainerCgroup;

use crate::engine::ContainerRuntime;
use crate::error::{Error, Result};
use crate::sandbox::ContainerSandbox;

pub use airlock_agent::protocol::EXEC_MARKER_VAR;
/// Stdin goes to the agent in frames of at most this many bytes.
const STDIN_CHUNK_BYTES: usize = 64 * 1024;
/// How long output is drained after a kill before the run is given up on.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// Attempts at starting the kill script: under a fork bomb, exec itself can
/// fail for want of a free pid until a slot frees up.
const KILL_ATTEMPTS: u32 = 50;
/// How long an exec that ended as if killed waits to see whether the whole
/// runsc sandbox went down with it.
const RUNSC_STOP_GRACE: Duration = Duration::from_secs(2);
/// Rounds of stop-then-kill before the kill script gives up.
const KILL_ROUNDS: u32 = 200;

const KILL_SCRIPT: &str = r#"
target="AIRLOCK_EXEC=$AIRLOCK_KILL_TARGET"
for ((round = 0; round < AIRLOCK_KILL_ROUNDS; round++)); do
  pids=()
  for dir in /proc/[0-9]*; do
    pid=${dir#/proc/}
    [[ $pid == "$$" ]] && continue
    while IFS= read -r -d '' entry; do
      if [[ $entry == "$target" ]]; then pids+=("$pid"); break; fi
    done 2>/dev/null < "$dir/environ"
  done
  ((${#pids[@]} == 0)) && exit 0
  if [[ $AIRLOCK_KILL_SIGNAL == KILL ]]; then
    kill -STOP "${pids[@]}" 2>/dev/null
    kill -KILL "${pids[@]}" 2>/dev/null
  else
    kill -"$AIRLOCK_KILL_SIGNAL" "${pids[@]}" 2>/dev/null
    exit 0
  fi
done
exit 3
"#;

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
}

impl Signal {
    /// The Linux signal number.
    pub fn number(self) -> i32 {
        match self {
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

/// A new marker for one exec's process tree.
pub(crate) fn new_marker() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A request's command line, environment (`KEY=value`, the marker last) and
/// working directory, checked.
pub(crate) struct CommandParts {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
}

pub(crate) fn command_parts(request: &ExecRequest, marker: &str) -> Result<CommandParts> {
    if request.program.is_empty() {
        return Err(Error::Invalid { what: "command", reason: "the program is empty".into() });
    }
    let cwd = request.cwd.clone().unwrap_or_else(|| WORKSPACE_GUEST_PATH.to_string());
    if !cwd.starts_with('/') {
        return Err(Error::Invalid { what: "working directory", reason: format!("{cwd:?} is not absolute") });
    }
    let mut env: Vec<(String, String)> = Vec::with_capacity(request.env.len() + 1);
    for (key, value) in &request.env {
        if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
            return Err(Error::Invalid { what: "environment variable", reason: format!("{key:?}") });
        }
        if key == EXEC_MARKER_VAR {
            return Err(Error::Invalid { what: "environment variable", reason: format!("{key} is Airlock's") });
        }
        env.push((key.clone(), value.clone()));
    }
    env.push((EXEC_MARKER_VAR.to_string(), marker.to_string()));
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

/// The engine's exec request for `request`, checked.
pub(crate) fn exec_options(
    request: &ExecRequest,
    user: &str,
    marker: &str,
    attach_stdin: bool,
    tty: bool,
) -> Result<CreateExecOptions<String>> {
    let CommandParts { argv: cmd, env, cwd } = command_parts(request, marker)?;
    let env = env.into_iter().map(|(key, value)| format!("{key}={value}")).collect();
    Ok(CreateExecOptions {
        attach_stdin: Some(attach_stdin),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        tty: Some(tty),
        env: Some(env),
        cmd: Some(cmd),
        user: Some(user.to_string()),
        working_dir: Some(cwd),
        ..CreateExecOptions::default()
    })
}

/// Captured output of one stream, up to a cap.
#[derive(Debug)]
struct Capture {
    stream: OutputStream,
    bytes: Vec<u8>,
    cap: usize,
    truncated: bool,
}

impl Capture {
    fn new(stream: OutputStream, cap: u64) -> Self {
        Self { stream, bytes: Vec::new(), cap: usize::try_from(cap).unwrap_or(usize::MAX), truncated: false }
    }

    /// Keeps what fits under the cap; returns whether anything was cut.
    fn push(&mut self, chunk: &[u8], sender: Option<&OutputSender>) -> bool {
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
        self.truncated
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
    /// reported as the memory limit.
    pub async fn exec(&self, request: ExecRequest) -> Result<ExecOutcome> {
        let user = self.spec().user.clone();
        self.exec_as(&user, request).await
    }

    /// As [`exec`](Self::exec), as another user of the image (such as `root`
    /// for a package install; capabilities stay as the sandbox has them).
    ///
    /// As the sandbox's own user the command goes through the in-container
    /// agent (a frame on a stream already open); as another user, or in a
    /// container without the agent, through an engine exec.
    pub async fn exec_as(&self, user: &str, request: ExecRequest) -> Result<ExecOutcome> {
        request.limits.validate()?;
        if user == self.spec().user
            && let Some(link) = self.agent_link().await?
        {
            return self.exec_through_agent(&link, request).await;
        }
        self.exec_through_engine(user, request).await
    }

    async fn exec_through_agent(&self, link: &Arc<AgentLink>, request: ExecRequest) -> Result<ExecOutcome> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + request.limits.deadline);
        let marker = new_marker();
        let CommandParts { argv, env, cwd } = command_parts(&request, &marker)?;
        // The agent adds the marker itself.
        let env = env.into_iter().filter(|(key, _)| key != EXEC_MARKER_VAR).collect();
        let cgroup = self.cgroup();
        let cpu_before = cgroup.cpu_usage();
        let oom_before = cgroup.oom_kills();
        let feeds_stdin = !matches!(request.stdin, StdinSource::Empty);

        let mut run = link.open_run();
        run.send(&Request::Spawn(Spawn { argv, env, cwd, marker: marker.clone(), stdin: feeds_stdin })).await?;
        let run_id = run.id;
        let stdin_task = match request.stdin.clone() {
            StdinSource::Bytes(bytes) => {
                let link = link.clone();
                Some(tokio::spawn(async move {
                    for chunk in bytes.chunks(STDIN_CHUNK_BYTES) {
                        if link.send_to(run_id, &Request::Stdin(chunk.to_vec())).await.is_err() {
                            return;
                        }
                    }
                    let _ = link.send_to(run_id, &Request::StdinEnd).await;
                }))
            }
            StdinSource::Inherit => {
                let link = link.clone();
                Some(tokio::spawn(async move {
                    let mut host_stdin = tokio::io::stdin();
                    let mut buffer = vec![0u8; STDIN_CHUNK_BYTES];
                    while let Ok(count @ 1..) = host_stdin.read(&mut buffer).await {
                        if link.send_to(run_id, &Request::Stdin(buffer[..count].to_vec())).await.is_err() {
                            return;
                        }
                    }
                    let _ = link.send_to(run_id, &Request::StdinEnd).await;
                }))
            }
            _ => None,
        };

        let mut stdout = Capture::new(OutputStream::Stdout, request.limits.output_bytes);
        let mut stderr = Capture::new(OutputStream::Stderr, request.limits.output_bytes);
        let sender = request.output.as_ref();
        let mut cut = None;
        let mut give_up_at = deadline;
        let mut exit_code = None;
        let mut link_ended = false;
        loop {
            tokio::select! {
                biased;
                reply = run.replies.recv() => {
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
                        Some(Reply::Started { .. } | Reply::Signalled { .. } | Reply::Pong) => false,
                        None => {
                            link_ended = true;
                            break;
                        }
                    };
                    if over_cap && cut.is_none() {
                        cut = Some(Cut::Output);
                        give_up_at = tokio::time::Instant::now() + KILL_GRACE;
                        run.send(&Request::KillTree { marker: marker.clone() }).await?;
                    }
                }
                () = tokio::time::sleep_until(give_up_at) => {
                    if cut.is_some() {
                        // Killed, yet no exit past the grace period: give up on it.
                        break;
                    }
                    cut = Some(Cut::Deadline);
                    give_up_at = tokio::time::Instant::now() + KILL_GRACE;
                    run.send(&Request::KillTree { marker: marker.clone() }).await?;
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

    async fn exec_through_engine(&self, user: &str, request: ExecRequest) -> Result<ExecOutcome> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + request.limits.deadline);
        let marker = new_marker();
        let attach_stdin = !matches!(request.stdin, StdinSource::Empty);
        let options = exec_options(&request, user, &marker, attach_stdin, false)?;
        let docker = self.engine().docker();
        let cgroup = self.cgroup();
        let cpu_before = cgroup.cpu_usage();
        let oom_before = cgroup.oom_kills();

        let exec = docker.create_exec(self.container_id(), options).await.map_err(|e| self.exec_error(e))?;
        let started_exec =
            docker.start_exec(&exec.id, None::<StartExecOptions>).await.map_err(|e| self.exec_error(e))?;
        let StartExecResults::Attached { mut output, mut input } = started_exec else {
            return Err(Error::Invalid { what: "exec", reason: "the engine started it detached".into() });
        };
        let stdin_task = match request.stdin.clone() {
            StdinSource::Bytes(bytes) => Some(tokio::spawn(async move {
                let _ = input.write_all(&bytes).await;
                let _ = input.shutdown().await;
            })),
            StdinSource::Inherit => Some(tokio::spawn(async move {
                let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut input).await;
                let _ = input.shutdown().await;
            })),
            _ => {
                drop(input);
                None
            }
        };

        let mut stdout = Capture::new(OutputStream::Stdout, request.limits.output_bytes);
        let mut stderr = Capture::new(OutputStream::Stderr, request.limits.output_bytes);
        let sender = request.output.as_ref();
        // Resolves if the whole container stops meanwhile: under runsc an OOM
        // kill takes the sandbox down, and the exec's stream may then never end.
        // Under runc the stream ends with the container, so the watch (a request
        // to the engine, sent on first poll) is left unpolled.
        let watch_container = self.spec().runtime == ContainerRuntime::Runsc;
        let mut container_stopped = docker.wait_container(self.container_id(), None::<WaitContainerOptions>);
        let mut stopped = false;
        let mut cut = None;
        let mut give_up_at = deadline;
        // The kill runs beside the drain: the engine handles one container's
        // exec exits in order, and the killed command's exit waits for its
        // output to be read, so a kill awaited here would wait on itself.
        let mut kill: Option<tokio::task::JoinHandle<Result<()>>> = None;
        loop {
            tokio::select! {
                biased;
                frame = output.next() => {
                    let over_cap = match frame {
                        Some(Ok(LogOutput::StdOut { message } | LogOutput::Console { message })) => stdout.push(&message, sender),
                        Some(Ok(LogOutput::StdErr { message })) => stderr.push(&message, sender),
                        Some(Ok(LogOutput::StdIn { .. })) => false,
                        Some(Err(error)) => return Err(Error::Docker { operation: "exec output", source: error }),
                        None => break,
                    };
                    if over_cap && cut.is_none() {
                        cut = Some(Cut::Output);
                        give_up_at = tokio::time::Instant::now() + KILL_GRACE;
                        kill = Some(self.spawn_kill(user, &marker));
                    }
                }
                _ = container_stopped.next(), if watch_container && !stopped => {
                    stopped = true;
                    break;
                }
                () = tokio::time::sleep_until(give_up_at) => {
                    if cut.is_some() {
                        // Killed, yet the stream stays open past the grace period: give up on it.
                        break;
                    }
                    cut = Some(Cut::Deadline);
                    give_up_at = tokio::time::Instant::now() + KILL_GRACE;
                    kill = Some(self.spawn_kill(user, &marker));
                }
            }
        }
        if let Some(task) = stdin_task {
            task.abort();
        }
        if let Some(kill) = kill {
            kill.await.map_err(|e| Error::Invalid { what: "kill", reason: e.to_string() })??;
        }
        let mut exit_code = if stopped { None } else { self.exit_code(&exec.id).await? };
        // Under runsc a sandbox going down may end the exec's stream first, with
        // the engine's 128 or a 137: give the container's stop a moment to show.
        if watch_container
            && !stopped
            && matches!(exit_code, Some(128 | 137))
            && tokio::time::timeout(RUNSC_STOP_GRACE, container_stopped.next()).await.is_ok()
        {
            stopped = true;
            exit_code = None;
        }
        let usage = Usage::since(&cgroup, cpu_before, oom_before);
        Ok(self.outcome(&request, started, Ended { cut, stopped, exit_code, usage }, stdout, stderr).await)
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

    fn spawn_kill(&self, user: &str, marker: &str) -> tokio::task::JoinHandle<Result<()>> {
        let (sandbox, user, marker) = (self.clone(), user.to_string(), marker.to_string());
        tokio::spawn(async move { sandbox.signal_tree(&user, &marker, Signal::Kill).await })
    }

    /// Sends `signal` to every process carrying `marker`; for `Kill`, stops
    /// and kills them until none is left.
    pub(crate) async fn signal_tree(&self, user: &str, marker: &str, signal: Signal) -> Result<()> {
        let docker = self.engine().docker();
        let options = CreateExecOptions {
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            cmd: Some(vec!["bash".to_string(), "-c".to_string(), KILL_SCRIPT.to_string()]),
            env: Some(vec![
                format!("AIRLOCK_KILL_TARGET={marker}"),
                format!("AIRLOCK_KILL_SIGNAL={}", signal.name()),
                format!("AIRLOCK_KILL_ROUNDS={KILL_ROUNDS}"),
            ]),
            user: Some(user.to_string()),
            working_dir: Some("/".to_string()),
            ..CreateExecOptions::default()
        };
        let mut last_failure = String::new();
        for _ in 0..KILL_ATTEMPTS {
            let attempt = async {
                let exec = docker.create_exec(self.container_id(), options.clone()).await?;
                if let StartExecResults::Attached { mut output, .. } =
                    docker.start_exec(&exec.id, None::<StartExecOptions>).await?
                {
                    while output.next().await.is_some() {}
                }
                Ok::<_, bollard::errors::Error>(exec.id)
            };
            match attempt.await {
                Ok(exec_id) => match self.exit_code(&exec_id).await? {
                    Some(0) => return Ok(()),
                    other => last_failure = format!("the kill script ended with {other:?}"),
                },
                Err(error) => {
                    if self.is_gone().await {
                        return Ok(());
                    }
                    last_failure = error.to_string();
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(Error::Invalid { what: "kill", reason: format!("could not signal the process tree: {last_failure}") })
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

    fn exec_error(&self, source: bollard::errors::Error) -> Error {
        match &source {
            bollard::errors::Error::DockerResponseServerError { status_code: 409, .. } => {
                Error::NotRunning(self.container_id().to_string())
            }
            _ => Error::Docker { operation: "exec", source },
        }
    }
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
    fn exactly_the_cap_is_not_truncated() {
        let mut capture = Capture::new(OutputStream::Stderr, 4);
        assert!(!capture.push(b"abcd", None));
        assert!(!capture.truncated);
    }

    #[test]
    fn the_marker_is_airlocks_and_bad_requests_are_refused() {
        let options = exec_options(&ExecRequest::new("ls").args(["-l"]), "1000:1000", "m1", false, false).unwrap();
        assert_eq!(options.cmd.unwrap(), vec!["ls", "-l"]);
        assert!(options.env.unwrap().contains(&"AIRLOCK_EXEC=m1".to_string()));
        assert_eq!(options.working_dir.as_deref(), Some("/workspace"));
        let spoofed = ExecRequest::new("ls").env(EXEC_MARKER_VAR, "x");
        assert!(exec_options(&spoofed, "u", "m", false, false).is_err());
        assert!(exec_options(&ExecRequest::new(""), "u", "m", false, false).is_err());
        assert!(exec_options(&ExecRequest::new("ls").cwd("relative"), "u", "m", false, false).is_err());
        assert!(exec_options(&ExecRequest::new("ls").env("A=B", "c"), "u", "m", false, false).is_err());
    }
}
