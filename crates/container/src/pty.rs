//! PTY sessions: an exec on a terminal, with stdin, output and resize.
//! The HTTP layer puts this on a WebSocket; here it is a library handle.

use std::pin::Pin;

use airlock_core::ExecRequest;
use bollard::container::LogOutput;
use bollard::exec::{ResizeExecOptions, StartExecOptions, StartExecResults};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::error::{Error, Result};
use crate::exec::{Signal, exec_options, new_marker};
use crate::sandbox::ContainerSandbox;

type BoxedOutput = Pin<Box<dyn futures_util::Stream<Item = std::result::Result<LogOutput, bollard::errors::Error>> + Send>>;

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
pub struct PtySession {
    sandbox: ContainerSandbox,
    exec_id: String,
    marker: String,
    user: String,
    input: Pin<Box<dyn AsyncWrite + Send>>,
    output: BoxedOutput,
}

impl std::fmt::Debug for PtySession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PtySession").field("exec_id", &self.exec_id).finish_non_exhaustive()
    }
}

impl ContainerSandbox {
    /// Starts `request` on a new terminal of `size`. `TERM` is
    /// `xterm-256color` unless the request sets it.
    pub async fn open_pty(&self, mut request: ExecRequest, size: PtySize) -> Result<PtySession> {
        if !request.env.iter().any(|(key, _)| key == "TERM") {
            request.env.push(("TERM".into(), "xterm-256color".into()));
        }
        let user = self.spec().user.clone();
        let marker = new_marker();
        let options = exec_options(&request, &user, &marker, true, true)?;
        let docker = self.engine().docker();
        let exec = docker.create_exec(self.container_id(), options).await.map_err(Error::docker("exec"))?;
        let start = StartExecOptions { tty: true, ..StartExecOptions::default() };
        let StartExecResults::Attached { output, input } =
            docker.start_exec(&exec.id, Some(start)).await.map_err(Error::docker("exec"))?
        else {
            return Err(Error::Invalid { what: "exec", reason: "the engine started it detached".into() });
        };
        let session =
            PtySession { sandbox: self.clone(), exec_id: exec.id, marker, user, input, output };
        session.resize(size).await?;
        Ok(session)
    }
}

impl PtySession {
    /// Types `bytes` into the terminal.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.input.write_all(bytes).await.map_err(Error::io("writing to the terminal"))?;
        self.input.flush().await.map_err(Error::io("writing to the terminal"))
    }

    /// The next piece of terminal output; `None` once the command has ended.
    pub async fn read(&mut self) -> Option<Result<Bytes>> {
        loop {
            return match self.output.next().await? {
                Ok(LogOutput::Console { message } | LogOutput::StdOut { message } | LogOutput::StdErr { message }) => {
                    Some(Ok(message))
                }
                Ok(LogOutput::StdIn { .. }) => continue,
                Err(source) => Some(Err(Error::Docker { operation: "terminal output", source })),
            };
        }
    }

    /// Changes the terminal's size; the command gets SIGWINCH.
    pub async fn resize(&self, size: PtySize) -> Result<()> {
        let options = ResizeExecOptions { width: size.cols, height: size.rows };
        self.sandbox.engine().docker().resize_exec(&self.exec_id, options).await.map_err(Error::docker("resize"))
    }

    /// Sends `signal` to the command and everything it started. Keep reading
    /// output meanwhile when the command writes a lot: the engine completes a
    /// command's exit only once its output has been read.
    pub async fn signal(&self, signal: Signal) -> Result<()> {
        self.sandbox.signal_tree(&self.user, &self.marker, signal).await
    }

    /// Reads to the end and returns the command's exit code.
    pub async fn wait(mut self) -> Result<Option<i32>> {
        while self.read().await.is_some() {}
        self.sandbox.exit_code(&self.exec_id).await
    }
}
