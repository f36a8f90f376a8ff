//! Background processes: the table a sandbox keeps of them, each one's
//! bounded log, and followers. Starting and signalling them is in `exec.rs`,
//! with every other command.
//!
//! A process's output goes into a log that keeps the newest
//! [`PROCESS_LOG_BYTES`]; older output is dropped first and counted, so a
//! follower knows how much it missed. Every output byte has an offset: its
//! place in everything the process wrote (both streams, in the order they
//! arrived), so a reader can resume where it stopped
//! ([`ContainerSandbox::follow_process_from`](crate::ContainerSandbox::follow_process_from)). The table lives with the sandbox
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
    /// Each event with its offset (an output chunk's first byte; for the exit, the total).
    events: broadcast::Sender<(u64, ProcessEvent)>,
    exit: watch::Sender<Option<Option<i32>>>,
    /// Whether stdin is a pipe still open for writes (held while a write
    /// goes out, so two writers' bytes never interleave).
    pub(crate) stdin_open: tokio::sync::Mutex<bool>,
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
        let offset = log.dropped_bytes + log.bytes as u64;
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
        let _ = self.events.send((offset, event));
    }
}

/// Reads a background process's output: first what the log holds, then live.
#[derive(Debug)]
pub struct ProcessFollower {
    process: Arc<Process>,
    /// Kept output chunks with their offsets, then (once exited) the exit.
    backlog: VecDeque<(u64, ProcessEvent)>,
    live: Option<broadcast::Receiver<(u64, ProcessEvent)>>,
    /// Output bytes the log had already dropped when following began.
    pub dropped_bytes: u64,
    /// The offset of the next output byte this follower returns.
    position: u64,
    /// Output bytes at or past the starting offset that this follower never
    /// returned: they had left the log (before it began, or while it lagged).
    missed_bytes: u64,
}

impl ProcessFollower {
    /// The next event, or `None` after the exit event.
    pub async fn next(&mut self) -> Option<ProcessEvent> {
        loop {
            if let Some((offset, event)) = self.backlog.pop_front() {
                if let Some(event) = self.take(offset, event) {
                    return Some(event);
                }
                continue;
            }
            let live = self.live.as_mut()?;
            match live.recv().await {
                Ok((offset, event)) => {
                    if let Some(event) = self.take(offset, event) {
                        return Some(event);
                    }
                }
                // Fell behind: read again from the log, from where this follower is.
                Err(broadcast::error::RecvError::Lagged(_)) => self.refill(),
                Err(broadcast::error::RecvError::Closed) => {
                    self.live = None;
                    return None;
                }
            }
        }
    }

    /// The next event if one is there now, without waiting: `None` when
    /// nothing is ready (or after the exit).
    pub fn try_next(&mut self) -> Option<ProcessEvent> {
        loop {
            if let Some((offset, event)) = self.backlog.pop_front() {
                if let Some(event) = self.take(offset, event) {
                    return Some(event);
                }
                continue;
            }
            let live = self.live.as_mut()?;
            match live.try_recv() {
                Ok((offset, event)) => {
                    if let Some(event) = self.take(offset, event) {
                        return Some(event);
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => self.refill(),
                Err(broadcast::error::TryRecvError::Empty) => return None,
                Err(broadcast::error::TryRecvError::Closed) => {
                    self.live = None;
                    return None;
                }
            }
        }
    }

    /// The offset of the next output byte this follower returns: where a
    /// reader that stops now resumes.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Output bytes at or past the starting offset that were gone from the
    /// log before this follower could return them.
    pub fn missed_bytes(&self) -> u64 {
        self.missed_bytes
    }

    /// `event` at `offset`, cut to what lies at or past this follower's
    /// position; `None` for output it has already passed.
    fn take(&mut self, offset: u64, event: ProcessEvent) -> Option<ProcessEvent> {
        match event {
            ProcessEvent::Output(mut chunk) => {
                let end = offset + chunk.bytes.len() as u64;
                if end <= self.position {
                    return None;
                }
                if offset > self.position {
                    self.missed_bytes += offset - self.position;
                } else {
                    let skip = usize::try_from(self.position - offset).unwrap_or(usize::MAX);
                    chunk.bytes.drain(..skip.min(chunk.bytes.len()));
                }
                self.position = end;
                Some(ProcessEvent::Output(chunk))
            }
            exited @ ProcessEvent::Exited(_) => {
                self.live = None;
                self.backlog.clear();
                Some(exited)
            }
        }
    }

    /// Starts over from the log at this follower's position (after it lagged).
    fn refill(&mut self) {
        let Ok(log) = self.process.log.lock() else {
            self.live = None;
            return;
        };
        let (backlog, live) = self.process.snapshot(&log);
        self.backlog = backlog;
        self.live = live;
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
            stdin_open: tokio::sync::Mutex::new(false),
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
    /// A follower from output offset `offset` (0: the start) as far as the
    /// log still holds it, then live, to the exit.
    pub(crate) fn follow_from(self: &Arc<Self>, offset: u64) -> Result<ProcessFollower> {
        let log = self.log.lock().map_err(|_| Error::NoSuchProcess(self.id.clone()))?;
        let (backlog, live) = self.snapshot(&log);
        Ok(ProcessFollower {
            process: self.clone(),
            backlog,
            live,
            dropped_bytes: log.dropped_bytes,
            position: offset,
            missed_bytes: 0,
        })
    }

    /// What the log holds, with offsets, and (under the log's lock, so that
    /// nothing is missed or seen twice) a live subscription or the exit.
    #[allow(clippy::type_complexity)]
    fn snapshot(&self, log: &Log) -> (VecDeque<(u64, ProcessEvent)>, Option<broadcast::Receiver<(u64, ProcessEvent)>>) {
        let mut offset = log.dropped_bytes;
        let mut backlog: VecDeque<(u64, ProcessEvent)> = VecDeque::with_capacity(log.chunks.len() + 1);
        for chunk in &log.chunks {
            backlog.push_back((offset, ProcessEvent::Output(chunk.clone())));
            offset += chunk.bytes.len() as u64;
        }
        match log.exited {
            Some(code) => {
                backlog.push_back((offset, ProcessEvent::Exited(code)));
                (backlog, None)
            }
            None => (backlog, Some(self.events.subscribe())),
        }
    }

    /// Whether its exit has been seen.
    pub(crate) fn has_exited(&self) -> bool {
        self.exit.borrow().is_some()
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
        let follower = process.follow_from(0).unwrap();
        let kept: usize = follower
            .backlog
            .iter()
            .map(|(_, event)| match event {
                ProcessEvent::Output(chunk) => chunk.bytes.len(),
                ProcessEvent::Exited(_) => 0,
            })
            .sum();
        assert!(kept <= PROCESS_LOG_BYTES, "{kept}");
        assert_eq!(kept as u64 + follower.dropped_bytes, 40 * 64 * 1024 + 4, "every byte kept or counted");
        assert!(matches!(follower.backlog.back(), Some((_, ProcessEvent::Output(chunk))) if chunk.bytes == b"last"));
    }

    fn stdout(bytes: &[u8]) -> ProcessEvent {
        ProcessEvent::Output(OutputChunk { stream: OutputStream::Stdout, bytes: bytes.to_vec() })
    }

    /// Everything a follower returns now, as one byte string, and whether the exit came.
    fn drain(follower: &mut ProcessFollower) -> (Vec<u8>, Option<Option<i32>>) {
        let (mut bytes, mut exit) = (Vec::new(), None);
        while let Some(event) = follower.try_next() {
            match event {
                ProcessEvent::Output(chunk) => bytes.extend(chunk.bytes),
                ProcessEvent::Exited(code) => exit = Some(code),
            }
        }
        (bytes, exit)
    }

    #[test]
    fn a_follower_resumes_at_any_offset_logged_or_live() {
        let table = ProcessTable::default();
        let process = table.register("p".into(), vec!["sh".into()], 1);
        process.record(stdout(b"hello "));
        process.record(stdout(b"world"));
        // Inside the second chunk: cut to the offset.
        let mut middle = process.follow_from(8).unwrap();
        assert_eq!(drain(&mut middle), (b"rld".to_vec(), None));
        assert_eq!(middle.position(), 11);
        // Past what was written: waits for the output to get there.
        let mut ahead = process.follow_from(13).unwrap();
        assert_eq!(drain(&mut ahead).0, b"");
        process.record(stdout(b"!!!!"));
        process.record(ProcessEvent::Exited(Some(3)));
        assert_eq!(drain(&mut middle), (b"!!!!".to_vec(), Some(Some(3))));
        assert_eq!(drain(&mut ahead), (b"!!".to_vec(), Some(Some(3))));
        assert_eq!((ahead.position(), ahead.missed_bytes()), (15, 0));
        // After the exit, from the start: the whole log, then the exit.
        let mut all = process.follow_from(0).unwrap();
        assert_eq!(drain(&mut all), (b"hello world!!!!".to_vec(), Some(Some(3))));
    }

    #[test]
    fn a_follower_that_falls_behind_reads_on_from_the_log_without_gaps() {
        let table = ProcessTable::default();
        let process = table.register("p".into(), vec!["yes".into()], 1);
        let mut slow = process.follow_from(0).unwrap();
        let mut expected = Vec::new();
        for i in 0..FOLLOW_BUFFER * 3 {
            let line = format!("{i:09}\n");
            expected.extend_from_slice(line.as_bytes());
            process.record(stdout(line.as_bytes()));
        }
        process.record(ProcessEvent::Exited(Some(0)));
        let (bytes, exit) = drain(&mut slow);
        assert_eq!(bytes, expected, "every byte once, in order");
        assert_eq!((exit, slow.missed_bytes()), (Some(Some(0)), 0));
    }

    #[test]
    fn a_follower_says_how_much_of_its_range_the_log_had_dropped() {
        let table = ProcessTable::default();
        let process = table.register("p".into(), vec!["yes".into()], 1);
        let chunk = vec![b'x'; PROCESS_LOG_BYTES / 2];
        for _ in 0..4 {
            process.record(stdout(&chunk));
        }
        let dropped = 2 * chunk.len() as u64;
        let mut late = process.follow_from(10).unwrap();
        let (bytes, _) = drain(&mut late);
        assert_eq!(bytes.len(), 2 * chunk.len());
        assert_eq!(late.missed_bytes(), dropped - 10);
        assert_eq!(late.position(), 4 * chunk.len() as u64);
    }
}
