//! Streams to a port inside a sandbox, for preview URLs, with no bridge
//! network and no published port.
//!
//! Under runc the container's network namespace is a kernel object the host
//! can enter: a dedicated thread moves into it (`setns`), connects to
//! `127.0.0.1:<port>`, and hands the socket back. The socket stays in the
//! container's namespace; the thread ends. Under runsc the sandbox's loopback
//! lives inside gVisor's own network stack, which no host namespace holds, so
//! the stream is relayed by an exec instead: bash inside the sandbox opens
//! `/dev/tcp/127.0.0.1/<port>` and pipes it to the exec's stdin and stdout.

use std::fs::File;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use futures_util::StreamExt;
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::net::TcpStream;

use crate::engine::ContainerRuntime;
use crate::error::{Error, Result};
use crate::sandbox::ContainerSandbox;

/// Buffer between the caller and an exec relay, each way.
const RELAY_BUFFER: usize = 64 * 1024;

/// A byte stream to a port inside a sandbox.
#[derive(Debug)]
pub enum PortStream {
    /// A TCP socket in the container's network namespace (runc).
    Direct(TcpStream),
    /// A relay through an exec inside the sandbox (runsc).
    Relayed(DuplexStream),
}

impl ContainerSandbox {
    /// Opens a stream to `127.0.0.1:<port>` inside the sandbox.
    pub async fn connect_port(&self, port: u16) -> Result<PortStream> {
        if port == 0 {
            return Err(Error::Port { port, reason: "port 0 is not a port to connect to".into() });
        }
        match self.spec().runtime {
            ContainerRuntime::Runc => self.connect_in_namespace(port).await.map(PortStream::Direct),
            ContainerRuntime::Runsc => self.connect_by_relay(port).await.map(PortStream::Relayed),
        }
    }

    async fn connect_in_namespace(&self, port: u16) -> Result<TcpStream> {
        let pid = self.host_pid().await?;
        let namespace = format!("/proc/{pid}/ns/net");
        let (sender, receiver) = tokio::sync::oneshot::channel();
        // A thread of its own: setns changes the calling thread's namespace,
        // which must never happen to a runtime worker.
        std::thread::Builder::new()
            .name(format!("airlock-port-{port}"))
            .spawn(move || {
                let connected = (|| -> io::Result<std::net::TcpStream> {
                    let handle = File::open(&namespace)?;
                    move_into_link_name_space(std::os::fd::AsFd::as_fd(&handle), Some(LinkNameSpaceType::Network)).map_err(io::Error::from)?;
                    let stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
                    stream.set_nonblocking(true)?;
                    Ok(stream)
                })();
                let _ = sender.send(connected);
            })
            .map_err(|e| Error::Port { port, reason: format!("starting the connect thread: {e}") })?;
        let stream = receiver
            .await
            .map_err(|_| Error::Port { port, reason: "the connect thread died".into() })?
            .map_err(|e| Error::Port { port, reason: e.to_string() })?;
        TcpStream::from_std(stream).map_err(|e| Error::Port { port, reason: e.to_string() })
    }

    async fn connect_by_relay(&self, port: u16) -> Result<DuplexStream> {
        let docker = self.engine().docker();
        // Once connected the relay writes one byte on stderr; a refused port ends it at once.
        // Socket to stdout in the foreground: when the server closes, the relay
        // ends. Stdin is duplicated first: bash gives background jobs /dev/null.
        let script = "exec 3<>\"/dev/tcp/127.0.0.1/$AIRLOCK_PORT\" || exit 7; exec 4<&0; echo -n R >&2; \
                      cat <&4 >&3 & cat <&3; kill $! 2>/dev/null; exit 0";
        let options = CreateExecOptions {
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            cmd: Some(vec!["bash".to_string(), "-c".to_string(), script.to_string()]),
            env: Some(vec![format!("AIRLOCK_PORT={port}")]),
            user: Some(self.spec().user.clone()),
            ..CreateExecOptions::default()
        };
        let exec = docker.create_exec(self.container_id(), options).await.map_err(Error::docker("exec"))?;
        let StartExecResults::Attached { mut output, mut input } =
            docker.start_exec(&exec.id, None::<StartExecOptions>).await.map_err(Error::docker("exec"))?
        else {
            return Err(Error::Port { port, reason: "the relay started detached".into() });
        };
        // Wait for the relay to say it connected (one byte on stderr) before handing the stream out.
        loop {
            match output.next().await {
                Some(Ok(LogOutput::StdErr { message })) if message.as_ref() == b"R" => break,
                Some(Ok(_)) => continue,
                Some(Err(source)) => return Err(Error::Docker { operation: "port relay", source }),
                None => {
                    let code = self.exit_code(&exec.id).await?;
                    return Err(Error::Port { port, reason: format!("nothing listens there (relay exit {code:?})") });
                }
            }
        }
        let (ours, theirs) = tokio::io::duplex(RELAY_BUFFER);
        let (mut from_caller, mut to_caller) = tokio::io::split(theirs);
        tokio::spawn(async move {
            let upstream = async {
                let _ = tokio::io::copy(&mut from_caller, &mut input).await;
                let _ = input.shutdown().await;
            };
            let downstream = async {
                while let Some(Ok(frame)) = output.next().await {
                    if let LogOutput::StdOut { message } = frame
                        && to_caller.write_all(&message).await.is_err()
                    {
                        break;
                    }
                }
                let _ = to_caller.shutdown().await;
            };
            tokio::join!(upstream, downstream);
        });
        Ok(ours)
    }
}

impl AsyncRead for PortStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PortStream::Direct(stream) => Pin::new(stream).poll_read(cx, buf),
            PortStream::Relayed(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PortStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PortStream::Direct(stream) => Pin::new(stream).poll_write(cx, buf),
            PortStream::Relayed(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PortStream::Direct(stream) => Pin::new(stream).poll_flush(cx),
            PortStream::Relayed(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PortStream::Direct(stream) => Pin::new(stream).poll_shutdown(cx),
            PortStream::Relayed(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}
