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

use crate::error::{Error, Result};
use crate::exec::{Signal, exec_options, new_marker};
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
        let (events, _) = broadcast::channel(FOLLOW_BUFFER);
        let (exit, _) = watch::channel(None);
        let process = Arc::new(Process {
            id: marker.clone(),
            command,
            user,
            started_at: SystemTime::now(),
            log: Mutex::new(Log::default()),
            events,
            exit,
        });
        if let Ok(mut table) = self.processes_table().processes.lock() {
            table.insert(marker.clone(), process.clone());
        }
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
