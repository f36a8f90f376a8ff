//! PTY sessions: a command on a terminal the agent opens inside the sandbox,
//! with input, output and resize. The HTTP layer puts this on a WebSocket;
//! here it is a library handle, started by
//! [`ContainerSandbox::open_pty`](crate::ContainerSandbox::open_pty).
//!
//! The session owns its command: dropping it kills the command's whole tree.

use std::sync::Arc;

use airlock_agent::protocol::{Reply, Request, TtySize};
use bytes::Bytes;

use crate::agent::{AgentLink, Run};
use crate::error::Result;
use crate::exec::{STDIN_CHUNK_BYTES, Signal, signal_run};

/// Terminal size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

impl Default for PtySize {
    fn default() -> Self {
        Self { cols: 80, rows: 24 }
    }
}

/// A command on a terminal inside the sandbox.
#[derive(Debug)]
pub struct PtySession {
    link: Arc<AgentLink>,
    run: Run,
    /// The command's exit code, once seen.
    exit: Option<i32>,
    /// No more output will come.
    ended: bool,
}

impl PtySession {
    pub(crate) fn new(link: Arc<AgentLink>, run: Run) -> Self {
        Self { link, run, exit: None, ended: false }
    }

    /// Types `bytes` into the terminal.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        for chunk in bytes.chunks(STDIN_CHUNK_BYTES) {
            self.run.send(&Request::Stdin(chunk.to_vec())).await?;
        }
        Ok(())
    }

    /// The next piece of terminal output; `None` once the command has ended.
    pub async fn read(&mut self) -> Option<Result<Bytes>> {
        while !self.ended {
            match self.run.recv().await {
                Some(Reply::Stdout(bytes) | Reply::Stderr(bytes)) => return Some(Ok(Bytes::from(bytes))),
                Some(Reply::Exited { code }) => {
                    self.exit = Some(code);
                    self.ended = true;
                }
                Some(Reply::SpawnFailed { code, message }) => {
                    self.exit = Some(code);
                    self.ended = true;
                    return Some(Ok(Bytes::from(format!("{message}\r\n"))));
                }
                Some(Reply::Started { .. } | Reply::Signalled { .. } | Reply::Pong { .. }) => {}
                // The link ended: the container stopped under the session.
                None => self.ended = true,
            }
        }
        None
    }

    /// Changes the terminal's size; the command gets SIGWINCH.
    pub async fn resize(&self, size: PtySize) -> Result<()> {
        self.run.send(&Request::Resize(TtySize { cols: size.cols, rows: size.rows })).await
    }

    /// Sends `signal` to the command and everything it started.
    pub async fn signal(&self, signal: Signal) -> Result<()> {
        signal_run(&self.link, self.run.id, signal).await
    }

    /// Reads to the end and returns the command's exit code (`None` when the
    /// container stopped under it).
    pub async fn wait(mut self) -> Result<Option<i32>> {
        while self.read().await.is_some() {}
        Ok(self.exit)
    }
}
