//! Background processes: the table a sandbox keeps of them, each one's
//! bounded log, and followers. Starting and signalling them is in `exec.rs`,
//! with every other command.
//!
//! A process's output goes into a log that keeps the newest
//! [`PROCESS_LOG_BYTES`]; older output is dropped first and counted, so a
//! follower knows how much it missed. The table lives with the sandbox
//! handle: a process outlives the call that started it, not the host process
//! that holds the handle.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use airlock_core::OutputChunk;
use tokio::sync::{broadcast, watch};

use crate::error::{Error, Result};

/// Output kept per background process: bounds the host memory a process
/// that writes for ever can take. Older output is dropped first and counted
/// in [`ProcessFollower::dropped_bytes`].
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
pub(crate) struct Process {
    id: String,
    command: Vec<String>,
    /// Its run on the agent link, which names its tree to the agent.
    pub(crate) run: u32,
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
    pub(crate) fn record(&self, event: ProcessEvent) {
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

impl ProcessTable {
    pub(crate) fn register(&self, id: String, command: Vec<String>, run: u32) -> Arc<Process> {
        let (events, _) = broadcast::channel(FOLLOW_BUFFER);
        let (exit, _) = watch::channel(None);
        let process = Arc::new(Process {
            id: id.clone(),
            command,
            run,
            started_at: SystemTime::now(),
            log: Mutex::new(Log::default()),
            events,
            exit,
        });
        if let Ok(mut table) = self.processes.lock() {
            table.insert(id, process.clone());
        }
        process
    }

    pub(crate) fn list(&self) -> Vec<ProcessInfo> {
        let Ok(table) = self.processes.lock() else { return Vec::new() };
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

    pub(crate) fn get(&self, id: &str) -> Result<Arc<Process>> {
        self.processes
            .lock()
            .ok()
            .and_then(|table| table.get(id).cloned())
            .ok_or_else(|| Error::NoSuchProcess(id.into()))
    }
}

impl Process {
    /// A follower from the start of the log, then live, to the exit.
    pub(crate) fn follow(&self) -> Result<ProcessFollower> {
        let log = self.log.lock().map_err(|_| Error::NoSuchProcess(self.id.clone()))?;
        let mut backlog: VecDeque<ProcessEvent> = log.chunks.iter().cloned().map(ProcessEvent::Output).collect();
        let live = match log.exited {
            Some(code) => {
                backlog.push_back(ProcessEvent::Exited(code));
                None
            }
            None => Some(self.events.subscribe()),
        };
        Ok(ProcessFollower { backlog, live, dropped_bytes: log.dropped_bytes })
    }

    /// Waits for the process to end; its exit code.
    pub(crate) async fn wait(&self) -> Result<Option<i32>> {
        let mut exit = self.exit.subscribe();
        loop {
            if let Some(code) = *exit.borrow_and_update() {
                return Ok(code);
            }
            if exit.changed().await.is_err() {
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_core::OutputStream;

    #[test]
    fn the_log_keeps_the_newest_output_and_counts_what_it_dropped() {
        let table = ProcessTable::default();
        let process = table.register("p".into(), vec!["yes".into()], 1);
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..40 {
            process.record(ProcessEvent::Output(OutputChunk { stream: OutputStream::Stdout, bytes: chunk.clone() }));
        }
        process.record(ProcessEvent::Output(OutputChunk { stream: OutputStream::Stdout, bytes: b"last".to_vec() }));
        let follower = process.follow().unwrap();
        let kept: usize = follower
            .backlog
            .iter()
            .map(|event| match event {
                ProcessEvent::Output(chunk) => chunk.bytes.len(),
                ProcessEvent::Exited(_) => 0,
            })
            .sum();
        assert!(kept <= PROCESS_LOG_BYTES, "{kept}");
        assert_eq!(kept as u64 + follower.dropped_bytes, 40 * 64 * 1024 + 4, "every byte kept or counted");
        assert!(matches!(follower.backlog.back(), Some(ProcessEvent::Output(chunk)) if chunk.bytes == b"last"));
    }
}
