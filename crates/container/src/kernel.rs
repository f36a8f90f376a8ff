//! Code kernels: a persistent interpreter process per code context, inside a
//! sandbox container, with the contract of the isolate tier's contexts.
//!
//! A kernel is `python3 -u -c <kernel/python_kernel.py>` or
//! `node -e <kernel/node_kernel.js>`, started through the in-container agent
//! as the sandbox's user in `/workspace`, with a pipe on stdin. It lives
//! until it dies or its [`Kernel`] is dropped; every evaluation runs in it, so
//! state persists and no process starts per evaluation.
//!
//! The host talks to it in lines and frames:
//! - stdin: a hello line carrying a random per-kernel nonce, then one JSON
//!   line per evaluation (`{"id": n, "code": ...}`).
//! - stdout and stderr: the user's output, forwarded live, with the kernel's
//!   frames in band. A frame is [`MARK_PREFIX`], the nonce, `\x1f`, a JSON
//!   object, `\n`. The kernel writes a `display` frame per rich output and,
//!   when an evaluation is done, an `end` frame carrying its result on
//!   stdout and another on stderr: once both are seen, both pipes hold
//!   everything of that evaluation. [`FrameParser`] takes frames out of the
//!   byte stream, holding back only a possible start of a marker at a
//!   chunk's end.
//!
//! The nonce keeps output that merely looks like a frame (a test printing a
//! marker, a child process) from being taken for one. It is no security
//! boundary: the user's code runs in the kernel process and can write real
//! frames, but they only change its own evaluation's answer. The host takes
//! every frame as untrusted: frames are capped at [`MAX_FRAME_BYTES`],
//! displays by [`EvalOutcome::push_display`], malformed frames are ignored.
//!
//! Limits, per evaluation: the deadline (from when the code is sent) kills
//! the kernel's whole process tree; output past the cap (per stream) kills
//! it too, as an isolate traps at it; memory is the container's, and a
//! kernel the OOM killer ends gives [`Limit::Memory`]. A kernel that died or
//! was killed is started again by the next evaluation, with fresh state.
//! Between evaluations a task drains what the kernel's leftovers (a thread,
//! a background child) still write, keeping at most [`IDLE_OUTPUT_BYTES`] for
//! the next evaluation, so the agent link never stalls on an idle kernel.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use airlock_agent::protocol::{Reply, Request, Spawn};
use airlock_core::{
    CodeError, DisplayOutput, EvalOutcome, EvalResult, EvalValue, Language, Limit, LimitExceeded, Limits, OutputChunk,
    OutputSender, OutputStream, WORKSPACE_GUEST_PATH,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::agent::Run;
use crate::error::{Error, Result};
use crate::exec::{Capture, STDIN_CHUNK_BYTES};
use crate::sandbox::ContainerSandbox;

/// The Python kernel's source, run with `python3 -u -c`.
const PYTHON_KERNEL: &str = include_str!("kernel/python_kernel.py");
/// The Node.js kernel's source, run with `node -e`.
const NODE_KERNEL: &str = include_str!("kernel/node_kernel.js");

/// What every frame starts with, before the kernel's nonce and `\x1f`.
pub const MARK_PREFIX: &str = "\x1eairlock:";
/// How long a kernel may take to start and say it is ready. Bounds a
/// `start_kernel` (and the restart before an evaluation) on a slow or
/// overloaded sandbox.
pub const KERNEL_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Kernel::stop`] waits for the agent to confirm the kill.
pub const KERNEL_STOP_WAIT: Duration = Duration::from_secs(5);
/// Largest frame the host reads from a kernel, in bytes; a longer one is
/// dropped. Bounds host memory per kernel pipe while a frame arrives; room
/// for one display bundle of the per-evaluation display budget, escaped.
pub const MAX_FRAME_BYTES: usize = 48 * 1024 * 1024;
/// Output a kernel writes between evaluations (a background thread or child)
/// kept for the next evaluation, in bytes (both streams together); the rest
/// is dropped. Bounds host memory for an idle kernel.
pub const IDLE_OUTPUT_BYTES: usize = 64 * 1024;
/// Largest snippet one evaluation takes, in bytes: the kernel reads it as
/// one line into memory.
pub const MAX_CODE_BYTES: usize = 16 * 1024 * 1024;
/// How long the host waits for a killed kernel's exit before it gives up on it.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// The matplotlib backend for the kernel and its children: never a display.
/// (The Python kernel itself switches to its own inline backend, see its source.)
const MATPLOTLIB_BACKEND: &str = "Agg";

/// A persistent interpreter process in a sandbox container, for one code
/// context. Dropping it kills the kernel's whole process tree.
#[derive(Debug)]
pub struct Kernel {
    language: Language,
    container_id: String,
    state: State,
    pid: Option<u32>,
    /// Kernel processes started so far (the first one included).
    launches: u64,
    /// The last evaluation's id.
    last_id: u64,
    /// The container's OOM kill count when the kernel went idle.
    oom_at_idle: Option<u64>,
}

#[derive(Debug)]
enum State {
    /// No kernel process: the next evaluation starts one.
    Dead,
    /// Between evaluations: a task drains the kernel's pipes until `stop`.
    Idle { stop: oneshot::Sender<()>, task: JoinHandle<Reclaimed> },
}

/// A running kernel's run on the agent link, and its two pipes' parsers.
#[derive(Debug)]
struct Pipes {
    run: Run,
    stdout: FrameParser,
    stderr: FrameParser,
}

impl Pipes {
    fn parser(&mut self, stream: OutputStream) -> &mut FrameParser {
        match stream {
            OutputStream::Stdout => &mut self.stdout,
            OutputStream::Stderr => &mut self.stderr,
        }
    }
}

/// What an idle kernel's drain task hands back.
#[derive(Debug)]
struct Reclaimed {
    pipes: Pipes,
    held: HeldOutput,
    /// How the kernel ended while idle, if it did.
    ended: Option<Ended>,
}

/// How a kernel process ended.
#[derive(Debug, Clone, Copy)]
enum Ended {
    Exited(i32),
    /// The agent link ended (the container stopped).
    LinkEnded,
}

/// Output kept while no evaluation listens, up to [`IDLE_OUTPUT_BYTES`].
#[derive(Debug, Default)]
struct HeldOutput {
    chunks: Vec<OutputChunk>,
    bytes: usize,
    /// Bytes of stdout, of stderr, were dropped.
    dropped: [bool; 2],
}

impl HeldOutput {
    fn push(&mut self, stream: OutputStream, bytes: Vec<u8>) {
        let room = IDLE_OUTPUT_BYTES.saturating_sub(self.bytes);
        if bytes.len() > room {
            self.dropped[usize::from(stream == OutputStream::Stderr)] = true;
        }
        let kept = &bytes[..bytes.len().min(room)];
        if !kept.is_empty() {
            self.bytes += kept.len();
            self.chunks.push(OutputChunk { stream, bytes: kept.to_vec() });
        }
    }
}

/// One kernel process just started.
struct Launched {
    pipes: Pipes,
    pid: u32,
    early: HeldOutput,
}

impl ContainerSandbox {
    /// Starts a kernel for `language` as the sandbox's user, in /workspace.
    pub async fn start_kernel(&self, language: Language) -> Result<Kernel> {
        let launched = launch(self, language).await?;
        let mut kernel = Kernel {
            language,
            container_id: self.container_id().to_string(),
            state: State::Dead,
            pid: Some(launched.pid),
            launches: 1,
            last_id: 0,
            oom_at_idle: None,
        };
        kernel.go_idle(self, launched.pipes, launched.early);
        Ok(kernel)
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        // The drain task owns the run: ending it drops the run, which kills the tree.
        if let State::Idle { task, .. } = &self.state {
            task.abort();
        }
    }
}

impl Kernel {
    pub fn language(&self) -> Language {
        self.language
    }

    /// The kernel process's pid inside the container (new after a restart);
    /// `None` while no kernel process runs (it died, and the next evaluation starts one).
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Ends the kernel's process tree and waits (at most [`KERNEL_STOP_WAIT`])
    /// until the agent reports the kernel exited. Dropping a kernel also ends it, but only
    /// queues the kill: a process that exits right after (each CLI command)
    /// would leave its kernel running in the container.
    pub async fn stop(mut self) {
        let State::Idle { stop, task } = std::mem::replace(&mut self.state, State::Dead) else { return };
        let _ = stop.send(());
        let Ok(Reclaimed { mut pipes, ended, .. }) = task.await else { return };
        if ended.is_some() || pipes.run.kill_tree().await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(KERNEL_STOP_WAIT, async {
            while let Some(reply) = pipes.run.recv().await {
                // Not on `Signalled`: the kill is sent then, the tree not yet reaped.
                if matches!(reply, Reply::Exited { .. }) {
                    break;
                }
            }
        })
        .await;
    }

    /// How many times the kernel was started again after dying or hitting a limit.
    pub fn restarts(&self) -> u64 {
        self.launches.saturating_sub(1)
    }

    /// Evaluates `code`. `limits.deadline` and `limits.output_bytes` apply to
    /// this evaluation; memory is the container's. Output chunks go to
    /// `output` as they are written (live). A kernel that dies (OOM kill,
    /// crash, `os._exit`), passes the deadline (its whole tree is killed),
    /// or writes past the output cap (killed, as an isolate is trapped) gives
    /// [`EvalResult::LimitExceeded`] or [`EvalResult::Crashed`]: its state is
    /// gone, and the next evaluation starts a fresh kernel. A kernel found
    /// dead before the code was sent (it died between evaluations) gives
    /// `Crashed` without running the code. `Err` only for infrastructure
    /// failures (the agent link gone, a container that is not this kernel's).
    pub async fn eval(
        &mut self,
        container: &ContainerSandbox,
        code: &str,
        limits: &Limits,
        output: Option<&OutputSender>,
    ) -> Result<EvalOutcome> {
        limits.validate()?;
        if container.container_id() != self.container_id {
            return Err(Error::Invalid {
                what: "kernel",
                reason: format!("the kernel runs in container {}, not {}", self.container_id, container.container_id()),
            });
        }
        if code.len() > MAX_CODE_BYTES {
            return Err(Error::Invalid {
                what: "code",
                reason: format!("{} bytes is more than the {MAX_CODE_BYTES} one evaluation takes", code.len()),
            });
        }
        let started = Instant::now();
        let mut evaluation = Evaluation::new(limits, output);
        let mut pipes = match self.reclaim(container, &mut evaluation).await {
            Reclaim::Pipes(pipes) => pipes,
            Reclaim::EndedIdle(result) => return Ok(evaluation.finish(result, started, Duration::ZERO)),
            Reclaim::Start => match launch(container, self.language).await {
                Ok(launched) => {
                    self.launches += 1;
                    self.pid = Some(launched.pid);
                    evaluation.take_held(launched.early);
                    launched.pipes
                }
                Err(Error::Kernel(reason)) => {
                    let message = format!("the {} kernel could not be started again: {reason}", self.language);
                    return Ok(evaluation.finish(EvalResult::Crashed { message }, started, Duration::ZERO));
                }
                Err(other) => return Err(other),
            },
        };

        let cgroup = container.cgroup();
        let cpu_before = cgroup.cpu_usage();
        let oom_before = cgroup.oom_kills();
        self.last_id += 1;
        let id = self.last_id;
        let mut request = serde_json::json!({ "id": id, "code": code }).to_string();
        request.push('\n');
        for chunk in request.as_bytes().chunks(STDIN_CHUNK_BYTES) {
            // On failure the pipes drop here (killing what is left); the kernel is dead.
            pipes.run.send(&Request::Stdin(chunk.to_vec())).await?;
        }

        let deadline = tokio::time::Instant::now() + limits.deadline;
        let mut give_up_at = deadline;
        let mut cut: Option<Limit> = None;
        let mut ended: Option<Ended> = None;
        loop {
            tokio::select! {
                // The timer first: replies that are always ready (an output
                // flood) must never keep the deadline from being seen.
                biased;
                () = tokio::time::sleep_until(give_up_at) => {
                    if cut.is_some() {
                        // Killed, yet no exit within the grace period: give up on it.
                        break;
                    }
                    cut = Some(Limit::Deadline);
                    give_up_at = tokio::time::Instant::now() + KILL_GRACE;
                    pipes.run.kill_tree().await?;
                }
                reply = pipes.run.recv() => match reply {
                    Some(Reply::Stdout(bytes)) => evaluation.take(&mut pipes, OutputStream::Stdout, &bytes, id),
                    Some(Reply::Stderr(bytes)) => evaluation.take(&mut pipes, OutputStream::Stderr, &bytes, id),
                    Some(Reply::Exited { code } | Reply::SpawnFailed { code, .. }) => {
                        ended = Some(Ended::Exited(code));
                        break;
                    }
                    Some(Reply::Started { .. } | Reply::Signalled { .. } | Reply::Pong { .. }) => {}
                    None => {
                        ended = Some(Ended::LinkEnded);
                        break;
                    }
                },
            }
            if cut.is_none() && evaluation.over_cap() {
                cut = Some(Limit::Output);
                give_up_at = tokio::time::Instant::now() + KILL_GRACE;
                pipes.run.kill_tree().await?;
            }
            if cut.is_none() && evaluation.is_complete() {
                break;
            }
        }
        let cpu_time = match (cpu_before, cgroup.cpu_usage()) {
            (Some(before), Some(after)) => after.saturating_sub(before),
            _ => Duration::ZERO,
        };
        let oom_after = cgroup.oom_kills();
        let oom_rose = matches!((oom_before, oom_after), (Some(before), Some(after)) if after > before);

        let result = match (cut, ended) {
            (None, None) => {
                let result = evaluation.result.take().unwrap_or_else(|| EvalResult::Crashed {
                    message: "the kernel ended the evaluation without a result".into(),
                });
                self.go_idle(container, pipes, HeldOutput::default());
                return Ok(evaluation.finish(result, started, cpu_time));
            }
            (Some(Limit::Deadline), _) => EvalResult::LimitExceeded(LimitExceeded {
                limit: Limit::Deadline,
                value: u64::try_from(limits.deadline.as_millis()).unwrap_or(u64::MAX),
            }),
            (Some(limit), _) => EvalResult::LimitExceeded(LimitExceeded { limit, value: limits.output_bytes }),
            (None, Some(Ended::Exited(_))) if oom_rose => EvalResult::LimitExceeded(LimitExceeded {
                limit: Limit::Memory,
                value: container.spec().resources.memory_bytes,
            }),
            (None, Some(Ended::Exited(code))) => EvalResult::Crashed {
                message: format!(
                    "the {} kernel {} during the evaluation; its state is gone, and the next evaluation starts a fresh kernel",
                    self.language,
                    exit_text(code)
                ),
            },
            (None, Some(Ended::LinkEnded)) => {
                self.die();
                if container.is_gone().await {
                    EvalResult::Crashed {
                        message: "the sandbox container stopped during the evaluation; the kernel's state is gone"
                            .into(),
                    }
                } else {
                    return Err(Error::Agent("the link to the agent ended during the evaluation".into()));
                }
            }
        };
        // What the kernel wrote up to its end, a marker's possible start included.
        for stream in [OutputStream::Stdout, OutputStream::Stderr] {
            let rest = pipes.parser(stream).finish();
            evaluation.output(stream, &rest);
        }
        drop(pipes);
        self.die();
        Ok(evaluation.finish(result, started, cpu_time))
    }

    fn die(&mut self) {
        self.state = State::Dead;
        self.pid = None;
    }

    /// Takes the pipes back from the idle kernel's drain task.
    async fn reclaim(&mut self, container: &ContainerSandbox, evaluation: &mut Evaluation<'_>) -> Reclaim {
        let state = std::mem::replace(&mut self.state, State::Dead);
        let State::Idle { stop, task } = state else { return Reclaim::Start };
        let _ = stop.send(());
        let Ok(reclaimed) = task.await else { return Reclaim::Start };
        evaluation.take_held(reclaimed.held);
        let Some(ended) = reclaimed.ended else { return Reclaim::Pipes(reclaimed.pipes) };
        self.pid = None;
        let oom =
            matches!((self.oom_at_idle, container.cgroup().oom_kills()), (Some(before), Some(now)) if now > before);
        let how = match ended {
            Ended::Exited(_) if oom => "was killed for memory (the container's limit)".to_string(),
            Ended::Exited(code) => exit_text(code),
            Ended::LinkEnded => "ended with the sandbox's agent link".to_string(),
        };
        Reclaim::EndedIdle(EvalResult::Crashed {
            message: format!(
                "the {} kernel {how} after the previous evaluation; its state is gone and this code did not run. \
                 The next evaluation starts a fresh kernel",
                self.language
            ),
        })
    }

    /// Hands the pipes to a task that drains them until the next evaluation.
    fn go_idle(&mut self, container: &ContainerSandbox, pipes: Pipes, held: HeldOutput) {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(drain_idle(pipes, held, stopped));
        self.oom_at_idle = container.cgroup().oom_kills();
        self.state = State::Idle { stop, task };
    }
}

enum Reclaim {
    Pipes(Pipes),
    /// The kernel ended while idle: this evaluation's answer.
    EndedIdle(EvalResult),
    /// No kernel: start one.
    Start,
}

/// "exited with code 1", or "was killed by signal 9 (SIGKILL)".
fn exit_text(code: i32) -> String {
    match code {
        129..=159 => {
            let signal = code - 128;
            let name = crate::exec::Signal::from_number(signal).map(|s| s.name()).unwrap_or("?");
            format!("was killed by signal {signal} (SIG{name})")
        }
        code => format!("exited with code {code}"),
    }
}

/// Keeps reading an idle kernel's pipes, so its leftovers never stall the
/// agent link; hands the pipes back when `stop` fires (or its sender drops).
async fn drain_idle(mut pipes: Pipes, mut held: HeldOutput, mut stop: oneshot::Receiver<()>) -> Reclaimed {
    let ended = loop {
        tokio::select! {
            biased;
            _ = &mut stop => break None,
            reply = pipes.run.recv() => match reply {
                Some(Reply::Stdout(bytes)) => hold(&mut pipes.stdout, OutputStream::Stdout, &bytes, &mut held),
                Some(Reply::Stderr(bytes)) => hold(&mut pipes.stderr, OutputStream::Stderr, &bytes, &mut held),
                Some(Reply::Exited { code } | Reply::SpawnFailed { code, .. }) => break Some(Ended::Exited(code)),
                Some(Reply::Started { .. } | Reply::Signalled { .. } | Reply::Pong { .. }) => {}
                None => break Some(Ended::LinkEnded),
            },
        }
    };
    Reclaimed { pipes, held, ended }
}

/// Keeps an idle kernel's output; frames (which no evaluation waits for) are dropped.
fn hold(parser: &mut FrameParser, stream: OutputStream, bytes: &[u8], held: &mut HeldOutput) {
    for parsed in parser.push(bytes) {
        if let Parsed::Output(bytes) = parsed {
            held.push(stream, bytes);
        }
    }
}

/// Starts a kernel process and waits for its ready frame.
async fn launch(container: &ContainerSandbox, language: Language) -> Result<Launched> {
    let link = container.agent_link().await?.ok_or_else(|| {
        Error::Agent(format!(
            "container {} does not run Airlock's agent (made by an older build): recreate it",
            container.container_id()
        ))
    })?;
    let user = container.spec().user.clone();
    if user.is_empty() || user.contains('\0') {
        return Err(Error::Invalid { what: "user", reason: format!("{user:?}") });
    }
    let (argv, env) = match language {
        Language::Python => (
            vec!["python3".to_string(), "-u".into(), "-c".into(), PYTHON_KERNEL.into()],
            vec![("MPLBACKEND".to_string(), MATPLOTLIB_BACKEND.to_string()), ("PYTHONUNBUFFERED".into(), "1".into())],
        ),
        Language::JavaScript => (vec!["node".to_string(), "-e".into(), NODE_KERNEL.into()], Vec::new()),
    };
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let spawn = Spawn { argv, env, cwd: WORKSPACE_GUEST_PATH.to_string(), user, stdin: true, tty: None };
    let mut run = link.open_run();
    run.spawn(spawn).await?;
    let mut hello = serde_json::json!({ "nonce": nonce }).to_string();
    hello.push('\n');
    run.send(&Request::Stdin(hello.into_bytes())).await?;
    let marker = format!("{MARK_PREFIX}{nonce}\x1f").into_bytes();
    let mut pipes = Pipes { run, stdout: FrameParser::new(marker.clone()), stderr: FrameParser::new(marker) };
    let mut early = HeldOutput::default();
    let waited = tokio::time::timeout(KERNEL_START_TIMEOUT, async {
        loop {
            let (stream, bytes) = match pipes.run.recv().await {
                Some(Reply::Stdout(bytes)) => (OutputStream::Stdout, bytes),
                Some(Reply::Stderr(bytes)) => (OutputStream::Stderr, bytes),
                Some(Reply::SpawnFailed { message, .. }) => {
                    return Err(Error::Kernel(format!("{language} kernel: {message}")));
                }
                Some(Reply::Exited { code }) => {
                    let said: Vec<u8> = early.chunks.iter().flat_map(|chunk| chunk.bytes.iter().copied()).collect();
                    return Err(Error::Kernel(format!(
                        "the {language} kernel {} while starting: {}",
                        exit_text(code),
                        String::from_utf8_lossy(&said).trim()
                    )));
                }
                Some(Reply::Started { .. } | Reply::Signalled { .. } | Reply::Pong { .. }) => continue,
                None => return Err(Error::Agent("the link to the agent ended while a kernel started".into())),
            };
            for parsed in pipes.parser(stream).push(&bytes) {
                match parsed {
                    Parsed::Output(bytes) => early.push(stream, bytes),
                    Parsed::Frame(body) => {
                        let frame: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                        if frame["t"] == "ready"
                            && let Some(pid) = frame["pid"].as_u64().and_then(|pid| u32::try_from(pid).ok())
                        {
                            return Ok(pid);
                        }
                    }
                    Parsed::Oversized => {}
                }
            }
        }
    })
    .await;
    match waited {
        Ok(Ok(pid)) => Ok(Launched { pipes, pid, early }),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(Error::Kernel(format!(
            "the {language} kernel did not start within {}s",
            KERNEL_START_TIMEOUT.as_secs()
        ))),
    }
}

/// Captured output of one stream, up to the evaluation's cap.
/// One evaluation's state on the host: output, displays, and the end frames seen.
struct Evaluation<'a> {
    stdout: Capture,
    stderr: Capture,
    sender: Option<&'a OutputSender>,
    /// Output the code wrote past the cap (the kernel is killed for it).
    over_cap: bool,
    /// Where displays collect under their caps (its result is set at the end).
    collected: EvalOutcome,
    result: Option<EvalResult>,
    end_seen: [bool; 2],
}

impl<'a> Evaluation<'a> {
    fn new(limits: &Limits, sender: Option<&'a OutputSender>) -> Self {
        Self {
            stdout: Capture::new(OutputStream::Stdout, limits.output_bytes),
            stderr: Capture::new(OutputStream::Stderr, limits.output_bytes),
            sender,
            over_cap: false,
            collected: EvalOutcome {
                result: EvalResult::Ok { value: None },
                stdout: Vec::new(),
                stderr: Vec::new(),
                stdout_truncated: false,
                stderr_truncated: false,
                wall_time: Duration::ZERO,
                cpu_time: Duration::ZERO,
                displays: Vec::new(),
                displays_truncated: false,
                side_effects: Vec::new(),
                side_effects_truncated: false,
            },
            result: None,
            end_seen: [false; 2],
        }
    }

    fn capture(&mut self, stream: OutputStream) -> &mut Capture {
        match stream {
            OutputStream::Stdout => &mut self.stdout,
            OutputStream::Stderr => &mut self.stderr,
        }
    }

    /// Output the code wrote: captured, sent on, and checked against the cap.
    fn output(&mut self, stream: OutputStream, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let sender = self.sender;
        if self.capture(stream).push(bytes, sender) {
            self.over_cap = true;
        }
    }

    /// Output held from before the code was sent: counted against the cap,
    /// but never a reason to kill the kernel.
    fn take_held(&mut self, held: HeldOutput) {
        for chunk in held.chunks {
            let sender = self.sender;
            self.capture(chunk.stream).push(&chunk.bytes, sender);
        }
        self.stdout.truncated |= held.dropped[0];
        self.stderr.truncated |= held.dropped[1];
    }

    fn over_cap(&self) -> bool {
        self.over_cap
    }

    fn is_complete(&self) -> bool {
        self.result.is_some() && self.end_seen == [true, true]
    }

    /// A chunk of one of the kernel's pipes, during evaluation `id`.
    fn take(&mut self, pipes: &mut Pipes, stream: OutputStream, bytes: &[u8], id: u64) {
        for parsed in pipes.parser(stream).push(bytes) {
            match parsed {
                Parsed::Output(bytes) => self.output(stream, &bytes),
                Parsed::Frame(body) => self.frame(stream, &body, id),
                Parsed::Oversized => {
                    tracing::debug!(%stream, "dropped a kernel frame past {MAX_FRAME_BYTES} bytes");
                }
            }
        }
    }

    fn frame(&mut self, stream: OutputStream, body: &[u8], id: u64) {
        let Ok(frame) = serde_json::from_slice::<serde_json::Value>(body) else {
            tracing::debug!(%stream, "ignored a malformed kernel frame");
            return;
        };
        match (frame["t"].as_str(), stream) {
            (Some("display"), OutputStream::Stdout) => {
                if let Some(display) = display_of(&frame["data"]) {
                    self.collected.push_display(display);
                }
            }
            (Some("end"), _) if frame["id"].as_u64() == Some(id) => match stream {
                OutputStream::Stdout => {
                    self.end_seen[0] = true;
                    self.result = Some(result_of(&frame["result"]));
                }
                OutputStream::Stderr => self.end_seen[1] = true,
            },
            _ => tracing::debug!(%stream, "ignored an unexpected kernel frame"),
        }
    }

    fn finish(self, result: EvalResult, started: Instant, cpu_time: Duration) -> EvalOutcome {
        EvalOutcome {
            result,
            stdout_truncated: self.stdout.truncated,
            stderr_truncated: self.stderr.truncated,
            stdout: self.stdout.bytes,
            stderr: self.stderr.bytes,
            wall_time: started.elapsed(),
            cpu_time,
            ..self.collected
        }
    }
}

/// Longest MIME type name a display may use; longer keys are dropped.
const MAX_MIME_LEN: usize = 255;

/// A display frame's bundle: MIME type to text (base64 for binary types).
fn display_of(data: &serde_json::Value) -> Option<DisplayOutput> {
    let map = data.as_object()?;
    let data: BTreeMap<String, String> = map
        .iter()
        .filter(|(mime, _)| !mime.is_empty() && mime.len() <= MAX_MIME_LEN && mime.contains('/'))
        .filter_map(|(mime, value)| Some((mime.clone(), value.as_str()?.to_string())))
        .collect();
    (!data.is_empty()).then_some(DisplayOutput { data })
}

/// The result an end frame carries, taken leniently: anything malformed is
/// reported as such, never a stalled evaluation.
fn result_of(result: &serde_json::Value) -> EvalResult {
    let text = |value: &serde_json::Value| value.as_str().unwrap_or_default().to_string();
    let error = |error: &serde_json::Value| CodeError {
        kind: text(&error["kind"]),
        message: text(&error["message"]),
        traceback: text(&error["traceback"]),
        line: error["line"].as_u64().and_then(|line| u32::try_from(line).ok()),
    };
    match result["status"].as_str() {
        Some("ok") => {
            let value = &result["value"];
            let value = value
                .is_object()
                .then(|| EvalValue { text: text(&value["text"]), json: value["json"].as_str().map(str::to_string) });
            EvalResult::Ok { value }
        }
        Some("syntax") => EvalResult::SyntaxError(error(&result["error"])),
        Some("runtime") => EvalResult::RuntimeError(error(&result["error"])),
        _ => EvalResult::RuntimeError(CodeError {
            kind: "KernelError".into(),
            message: "the kernel's answer could not be read".into(),
            traceback: String::new(),
            line: None,
        }),
    }
}

/// A piece of a kernel pipe, as [`FrameParser`] takes it apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// The user's output.
    Output(Vec<u8>),
    /// A frame's body (the JSON between the marker and the newline).
    Frame(Vec<u8>),
    /// A frame longer than [`MAX_FRAME_BYTES`] was dropped.
    Oversized,
}

#[derive(Debug)]
enum FrameState {
    /// In the user's output.
    Outside,
    /// In a frame: its body so far.
    Inside(Vec<u8>),
    /// In a frame past the cap: skipping to its newline.
    Skipping,
}

/// Takes a kernel pipe's frames out of its byte stream, whatever the chunk
/// boundaries. Holds back only bytes that could begin the marker at a
/// chunk's end (and a frame not yet complete), so output flows on at once.
#[derive(Debug)]
pub(crate) struct FrameParser {
    marker: Vec<u8>,
    max_frame: usize,
    /// The end of the last chunk: a possible start of the marker.
    held: Vec<u8>,
    state: FrameState,
}

impl FrameParser {
    pub(crate) fn new(marker: Vec<u8>) -> Self {
        Self::with_cap(marker, MAX_FRAME_BYTES)
    }

    fn with_cap(marker: Vec<u8>, max_frame: usize) -> Self {
        Self { marker, max_frame, held: Vec::new(), state: FrameState::Outside }
    }

    /// Takes the next chunk; returns what it completes, in order.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Vec<Parsed> {
        let mut parsed = Vec::new();
        let joined;
        let mut rest: &[u8] = if self.held.is_empty() {
            chunk
        } else {
            let mut held = std::mem::take(&mut self.held);
            held.extend_from_slice(chunk);
            joined = held;
            &joined
        };
        while !rest.is_empty() {
            match &mut self.state {
                FrameState::Inside(body) => match rest.iter().position(|&b| b == b'\n') {
                    Some(end) => {
                        if body.len() + end > self.max_frame {
                            parsed.push(Parsed::Oversized);
                        } else {
                            body.extend_from_slice(&rest[..end]);
                            parsed.push(Parsed::Frame(std::mem::take(body)));
                        }
                        self.state = FrameState::Outside;
                        rest = &rest[end + 1..];
                    }
                    None => {
                        if body.len() + rest.len() > self.max_frame {
                            parsed.push(Parsed::Oversized);
                            self.state = FrameState::Skipping;
                        } else {
                            body.extend_from_slice(rest);
                        }
                        rest = &[];
                    }
                },
                FrameState::Skipping => match rest.iter().position(|&b| b == b'\n') {
                    Some(end) => {
                        self.state = FrameState::Outside;
                        rest = &rest[end + 1..];
                    }
                    None => rest = &[],
                },
                FrameState::Outside => match find(rest, &self.marker) {
                    Some(at) => {
                        if at > 0 {
                            parsed.push(Parsed::Output(rest[..at].to_vec()));
                        }
                        self.state = FrameState::Inside(Vec::new());
                        rest = &rest[at + self.marker.len()..];
                    }
                    None => {
                        let keep = partial_marker(rest, &self.marker);
                        let out = rest.len() - keep;
                        if out > 0 {
                            parsed.push(Parsed::Output(rest[..out].to_vec()));
                        }
                        self.held = rest[out..].to_vec();
                        rest = &[];
                    }
                },
            }
        }
        parsed
    }

    /// The pipe ended: what was held back is output after all (a frame cut
    /// short is dropped).
    pub(crate) fn finish(&mut self) -> Vec<u8> {
        self.state = FrameState::Outside;
        std::mem::take(&mut self.held)
    }
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let first = *needle.first()?;
    let mut from = 0;
    while let Some(offset) = haystack.get(from..)?.iter().position(|&b| b == first) {
        let at = from + offset;
        let candidate = haystack.get(at..)?;
        if candidate.len() < needle.len() {
            return None;
        }
        if candidate.starts_with(needle) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// How many bytes at the end of `data` could begin `marker` (less than all of it).
fn partial_marker(data: &[u8], marker: &[u8]) -> usize {
    let longest = data.len().min(marker.len().saturating_sub(1));
    (1..=longest).rev().find(|&len| data.ends_with(&marker[..len])).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARKER: &[u8] = b"\x1eairlock:n0nce\x1f";

    fn parse_all(parser: &mut FrameParser, chunks: &[&[u8]]) -> (Vec<u8>, Vec<Vec<u8>>, usize) {
        let mut output = Vec::new();
        let mut frames = Vec::new();
        let mut oversized = 0;
        for chunk in chunks {
            for parsed in parser.push(chunk) {
                match parsed {
                    Parsed::Output(bytes) => output.extend(bytes),
                    Parsed::Frame(body) => frames.push(body),
                    Parsed::Oversized => oversized += 1,
                }
            }
        }
        output.extend(parser.finish());
        (output, frames, oversized)
    }

    fn stream_with_frames() -> Vec<u8> {
        let mut stream = b"hello ".to_vec();
        stream.extend(MARKER);
        stream.extend(br#"{"t":"display"}"#);
        stream.push(b'\n');
        stream.extend(b"between\n");
        stream.extend(MARKER);
        stream.extend(br#"{"t":"end","id":1}"#);
        stream.push(b'\n');
        stream.extend(b"after");
        stream
    }

    #[test]
    fn frames_are_found_whatever_the_chunk_boundaries() {
        let stream = stream_with_frames();
        for size in 1..=stream.len() {
            let chunks: Vec<&[u8]> = stream.chunks(size).collect();
            let mut parser = FrameParser::new(MARKER.to_vec());
            let (output, frames, oversized) = parse_all(&mut parser, &chunks);
            assert_eq!(String::from_utf8_lossy(&output), "hello between\nafter", "chunks of {size}");
            assert_eq!(frames, vec![br#"{"t":"display"}"#.to_vec(), br#"{"t":"end","id":1}"#.to_vec()]);
            assert_eq!(oversized, 0);
        }
    }

    #[test]
    fn every_split_point_of_a_marker_is_handled() {
        let stream = stream_with_frames();
        for at in 0..=stream.len() {
            let mut parser = FrameParser::new(MARKER.to_vec());
            let (output, frames, _) = parse_all(&mut parser, &[&stream[..at], &stream[at..]]);
            assert_eq!(String::from_utf8_lossy(&output), "hello between\nafter", "split at {at}");
            assert_eq!(frames.len(), 2, "split at {at}");
        }
    }

    #[test]
    fn only_a_possible_marker_start_is_held_back() {
        let mut parser = FrameParser::new(MARKER.to_vec());
        assert_eq!(parser.push(b"abc\x1eair"), vec![Parsed::Output(b"abc".to_vec())]);
        // The rest does not continue the marker: all of it is output.
        assert_eq!(parser.push(b"plane\n"), vec![Parsed::Output(b"\x1eairplane\n".to_vec())]);
        assert_eq!(parser.push(b"plain"), vec![Parsed::Output(b"plain".to_vec())]);
    }

    #[test]
    fn a_marker_without_the_nonce_is_output() {
        let mut parser = FrameParser::new(MARKER.to_vec());
        let forged = b"\x1eairlock:\x1f{\"t\":\"end\",\"id\":1}\n\x1eairlock:other\x1f{}\n";
        let (output, frames, _) = parse_all(&mut parser, &[forged]);
        assert_eq!(output, forged.to_vec());
        assert!(frames.is_empty());
    }

    #[test]
    fn a_frame_past_the_cap_is_dropped_and_the_stream_goes_on() {
        let mut parser = FrameParser::with_cap(MARKER.to_vec(), 8);
        let mut stream = b"a".to_vec();
        stream.extend(MARKER);
        stream.extend(b"0123456789abcdef\nb");
        stream.extend(MARKER);
        stream.extend(b"{}\nc");
        let chunks: Vec<&[u8]> = stream.chunks(3).collect();
        let (output, frames, oversized) = parse_all(&mut parser, &chunks);
        assert_eq!(output, b"abc");
        assert_eq!(frames, vec![b"{}".to_vec()]);
        assert_eq!(oversized, 1);
    }

    #[test]
    fn held_bytes_come_out_at_the_end() {
        let mut parser = FrameParser::new(MARKER.to_vec());
        assert!(parser.push(b"\x1eairlock:n0").is_empty());
        assert_eq!(parser.finish(), b"\x1eairlock:n0");
    }

    #[test]
    fn results_are_read_leniently() {
        let ok = serde_json::json!({"status": "ok", "value": {"text": "42", "json": "42"}});
        assert_eq!(
            result_of(&ok),
            EvalResult::Ok { value: Some(EvalValue { text: "42".into(), json: Some("42".into()) }) }
        );
        assert_eq!(result_of(&serde_json::json!({"status": "ok", "value": null})), EvalResult::Ok { value: None });
        let runtime = serde_json::json!({"status": "runtime", "error": {"kind": "ZeroDivisionError", "message": "m", "traceback": "t", "line": 2}});
        let EvalResult::RuntimeError(error) = result_of(&runtime) else { panic!("not a runtime error") };
        assert_eq!((error.kind.as_str(), error.line), ("ZeroDivisionError", Some(2)));
        assert!(matches!(result_of(&serde_json::json!("nonsense")), EvalResult::RuntimeError(_)));
    }

    #[test]
    fn displays_keep_text_values_under_mime_keys() {
        let data = serde_json::json!({"text/html": "<b>x</b>", "image/png": "iVBOR", "bad": "x", "text/plain": 5});
        let display = display_of(&data).unwrap();
        assert_eq!(display.data.keys().collect::<Vec<_>>(), vec!["image/png", "text/html"]);
        assert!(display_of(&serde_json::json!({})).is_none());
    }

    #[test]
    fn exit_codes_read_as_signals_above_128() {
        assert_eq!(exit_text(1), "exited with code 1");
        assert_eq!(exit_text(137), "was killed by signal 9 (SIGKILL)");
    }
}
