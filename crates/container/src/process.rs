//! Background processes: started, listed, followed, signalled, waited for.
//!
//! Each is an exec whose output a host task reads into a bounded log (the
//! oldest output goes first when it is full) and fans out to followers. The
//! table lives with the sandbox handle: a process outlives the call that
//! started it, not the host process that holds the handle.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use airlock_core::{ExecRequest, OutputChunk, OutputStream};
use bollard::container::LogOutput;
use bollard::exec::{StartExecOptions, StartExecResults};
use futures_util::StreamExt;
use tokio::sync::{broadcast, watch};

use airlock_agent::protocol::{Reply, Request, Spawn};

use crate::agent::AgentLink;
use crate::error::{Error, Result};
use crate::exec::{CommandParts, EXEC_MARKER_VAR, Signal, command_parts, exec_options, new_marker};

/// How long a signal waits for the agent's answer.
const SIGNAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Signals every process carrying `marker` through the agent; for `Kill`,
/// stops and kills them until none is left.
async fn signal_through_agent(link: &Arc<AgentLink>, marker: &str, signal: Signal) -> Result<()> {
    let mut run = link.open_run();
    let request = match signal {
        Signal::Kill => Request::KillTree { marker: marker.to_string() },
        other => Request::Signal { marker: marker.to_string(), signal: other.number() },
    };
    run.send(&request).await?;
    match tokio::time::timeout(SIGNAL_TIMEOUT, run.replies.recv()).await {
        Ok(Some(Reply::Signalled { remaining: 0 })) => Ok(()),
        Ok(Some(Reply::Signalled { remaining })) => Err(Error::Invalid {
            what: "signal",
            reason: format!("{remaining} processes were still there after the agent's last round"),
        }),
        Ok(_) => Err(Error::Agent("the agent did not answer the signal (the sandbox stopped?)".into())),
        Err(_) => Err(Error::Agent(format!("no answer to the signal within {}s", SIGNAL_TIMEOUT.as_secs()))),
    }
}
use crate::sandbox::ContainerSandbox;

/// Output kept per background process; older output is dropped first.
pub const PROCESS_LOG_BYTES: usize = 1024 * 1024;
/// Events a slow follower may fall behind by before it misses some.
const FOLLOW_BUFFER: usize = 1024;

/// What happened in a background process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessEvent {
    Output(OutputChunk),
    /// The process ended; `None` when the engine gave no code.
    Exited(Option<i32>),
}

/// Whether a background process still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", tag = "state")]
pub enum ProcessStatus {
    Running,
    Exited { code: Option<i32> },
}

/// One row of [`ContainerSandbox::list_processes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    pub id: String,
    pub command: Vec<String>,
    pub started_at: SystemTime,
    pub status: ProcessStatus,
}

#[derive(Debug, Default)]
pub(crate) struct ProcessTable {
    processes: Mutex<HashMap<String, Arc<Process>>>,
}

#[derive(Debug)]
struct Process {
    id: String,
    command: Vec<String>,
    user: String,
    started_at: SystemTime,
    log: Mutex<Log>,
    events: broadcast::Sender<ProcessEvent>,
    exit: watch::Sender<Option<Option<i32>>>,
}

#[derive(Debug, Default)]
struct Log {
    chunks: VecDeque<OutputChunk>,
    bytes: usize,
    /// Output dropped from the front to stay within the cap.
    dropped_bytes: u64,
    exited: Option<Option<i32>>,
}

impl Process {
    /// Appends output and tells followers, under one lock so that a follower
    /// that subscribes misses nothing and sees nothing twice.
    fn record(&self, event: ProcessEvent) {
        let Ok(mut log) = self.log.lock() else { return };
        match &event {
            ProcessEvent::Output(chunk) => {
                log.bytes += chunk.bytes.len();
                log.chunks.push_back(chunk.clone());
                while log.bytes > PROCESS_LOG_BYTES {
                    let Some(old) = log.chunks.pop_front() else { break };
                    log.bytes -= old.bytes.len();
                    log.dropped_bytes += old.bytes.len() as u64;
                }
            }
            ProcessEvent::Exited(code) => {
                log.exited = Some(*code);
                self.exit.send_replace(Some(*code));
            }
        }
        let _ = self.events.send(event);
    }
}

/// Reads a background process's output: first what the log holds, then live.
#[derive(Debug)]
pub struct ProcessFollower {
    backlog: VecDeque<ProcessEvent>,
    live: Option<broadcast::Receiver<ProcessEvent>>,
    /// Output bytes the log had already dropped when following began.
    pub dropped_bytes: u64,
}

impl ProcessFollower {
    /// The next event, or `None` after the exit event.
    pub async fn next(&mut self) -> Option<ProcessEvent> {
        if let Some(event) = self.backlog.pop_front() {
            if matches!(event, ProcessEvent::Exited(_)) {
                self.live = None;
            }
            return Some(event);
        }
        let live = self.live.as_mut()?;
        loop {
            match live.recv().await {
                Ok(event) => {
                    if matches!(event, ProcessEvent::Exited(_)) {
                        self.live = None;
                    }
                    return Some(event);
                }
                // Fell behind: the skipped output is gone for this follower, the rest continues.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => {
                    self.live = None;
                    return None;
                }
            }
        }
    }
}

impl ContainerSandbox {
    /// Starts `request` in the background and returns its id at once. No
    /// deadline applies (it runs until it exits, is signalled, or the sandbox
    /// stops); its output is kept in a log of [`PROCESS_LOG_BYTES`].
    pub async fn start_process(&self, request: ExecRequest) -> Result<String> {
        if let Some(link) = self.agent_link().await? {
            return self.start_process_through_agent(&link, &request).await;
        }
        let user = self.spec().user.clone();
        let marker = new_marker();
        let options = exec_options(&request, &user, &marker, false, false)?;
        let command = options.cmd.clone().unwrap_or_default();
        let docker = self.engine().docker();
        let exec = docker.create_exec(self.container_id(), options).await.map_err(Error::docker("exec"))?;
        let StartExecResults::Attached { mut output, input } =
            docker.start_exec(&exec.id, None::<StartExecOptions>).await.map_err(Error::docker("exec"))?
        else {
            return Err(Error::Invalid { what: "exec", reason: "the engine started it detached".into() });
        };
        drop(input);
        let process = self.register_process(marker.clone(), command, user);
        let sandbox = self.clone();
        let exec_id = exec.id;
        tokio::spawn(async move {
            while let Some(Ok(frame)) = output.next().await {
                let (stream, bytes) = match frame {
                    LogOutput::StdOut { message } | LogOutput::Console { message } => (OutputStream::Stdout, message),
                    LogOutput::StdErr { message } => (OutputStream::Stderr, message),
                    LogOutput::StdIn { .. } => continue,
                };
                process.record(ProcessEvent::Output(OutputChunk { stream, bytes: bytes.to_vec() }));
            }
            let code = sandbox.exit_code(&exec_id).await.ok().flatten();
            process.record(ProcessEvent::Exited(code));
        });
        Ok(marker)
    }

    /// As the sandbox's user, through the agent: a run whose replies a task
    /// writes into the process's log until it exits or the container stops.
    async fn start_process_through_agent(&self, link: &Arc<AgentLink>, request: &ExecRequest) -> Result<String> {
        let marker = new_marker();
        let CommandParts { argv, env, cwd } = command_parts(request, &marker)?;
        let env = env.into_iter().filter(|(key, _)| key != EXEC_MARKER_VAR).collect();
        let mut run = link.open_run();
        run.send(&Request::Spawn(Spawn { argv: argv.clone(), env, cwd, marker: marker.clone(), stdin: false })).await?;
        let process = self.register_process(marker.clone(), argv, self.spec().user.clone());
        tokio::spawn(async move {
            while let Some(reply) = run.replies.recv().await {
                match reply {
                    Reply::Stdout(bytes) => {
                        process.record(ProcessEvent::Output(OutputChunk { stream: OutputStream::Stdout, bytes }));
                    }
                    Reply::Stderr(bytes) => {
                        process.record(ProcessEvent::Output(OutputChunk { stream: OutputStream::Stderr, bytes }));
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
                    Reply::Started { .. } | Reply::Signalled { .. } | Reply::Pong => {}
                }
            }
            // The link ended: the container stopped under the process.
            process.record(ProcessEvent::Exited(None));
        });
        Ok(marker)
    }

    fn register_process(&self, id: String, command: Vec<String>, user: String) -> Arc<Process> {
        let (events, _) = broadcast::channel(FOLLOW_BUFFER);
        let (exit, _) = watch::channel(None);
        let process = Arc::new(Process {
            id: id.clone(),
            command,
            user,
            started_at: SystemTime::now(),
            log: Mutex::new(Log::default()),
            events,
            exit,
        });
        if let Ok(mut table) = self.processes_table().processes.lock() {
            table.insert(id, process.clone());
        }
        process
    }

    /// Every background process started through this handle, running or not.
    pub fn list_processes(&self) -> Vec<ProcessInfo> {
        let Ok(table) = self.processes_table().processes.lock() else { return Vec::new() };
        let mut rows: Vec<ProcessInfo> = table
            .values()
            .map(|process| ProcessInfo {
                id: process.id.clone(),
                command: process.command.clone(),
                started_at: process.started_at,
                status: match *process.exit.borrow() {
                    Some(code) => ProcessStatus::Exited { code },
                    None => ProcessStatus::Running,
                },
            })
            .collect();
        rows.sort_by_key(|row| row.started_at);
        rows
    }

    /// Follows a process's output from the start of its log, then live, to its exit.
    pub fn follow_process(&self, id: &str) -> Result<ProcessFollower> {
        let process = self.process(id)?;
        let log = process.log.lock().map_err(|_| Error::NoSuchProcess(id.into()))?;
        let mut backlog: VecDeque<ProcessEvent> = log.chunks.iter().cloned().map(ProcessEvent::Output).collect();
        let live = match log.exited {
            Some(code) => {
                backlog.push_back(ProcessEvent::Exited(code));
                None
            }
            None => Some(process.events.subscribe()),
        };
        Ok(ProcessFollower { backlog, live, dropped_bytes: log.dropped_bytes })
    }

    /// Sends `signal` to the process and everything it started.
    pub async fn signal_process(&self, id: &str, signal: Signal) -> Result<()> {
        let process = self.process(id)?;
        if process.user == self.spec().user
            && let Some(link) = self.agent_link().await?
        {
            return signal_through_agent(&link, &process.id, signal).await;
        }
        self.signal_tree(&process.user, &process.id, signal).await
    }

    /// Waits for the process to end and returns its exit code.
    pub async fn wait_process(&self, id: &str) -> Result<Option<i32>> {
        let mut exit = self.process(id)?.exit.subscribe();
        loop {
            if let Some(code) = *exit.borrow_and_update() {
                return Ok(code);
            }
            if exit.changed().await.is_err() {
                return Ok(None);
            }
        }
    }

    fn process(&self, id: &str) -> Result<Arc<Process>> {
        self.processes_table()
            .processes
            .lock()
            .ok()
            .and_then(|table| table.get(id).cloned())
            .ok_or_else(|| Error::NoSuchProcess(id.into()))
    }
}
