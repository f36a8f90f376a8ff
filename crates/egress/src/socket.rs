//! A sandbox's proxy endpoint: its directory, socket and trust bundle, and
//! the accept loop.

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use airlock_core::network::{EGRESS_CA_BUNDLE_FILE, EGRESS_SOCKET_FILE, NetworkPolicy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::proxy::{self, Sandbox};
use crate::{Egress, EgressError};

/// Connections beyond the per-sandbox limit that are being answered `503` at
/// once: bounds the tasks a flood of connections can make the proxy hold.
/// Beyond it a connection is closed without an answer.
pub const MAX_PENDING_REFUSALS: usize = 16;
/// How long a refused connection is kept open after its `503`, so the client
/// can finish writing its request and read the answer.
pub const REFUSAL_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// A sandbox's running proxy. Dropping it (or [`ProxyHandle::shutdown`])
/// stops accepting and ends every open connection and tunnel. The socket
/// file is left in place (the next bind replaces it).
#[derive(Debug)]
pub struct ProxyHandle {
    task: JoinHandle<()>,
    socket: PathBuf,
    bundle: PathBuf,
}

impl ProxyHandle {
    /// The socket the sandbox connects to (`dir/proxy.sock`).
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The trust bundle written for the sandbox (`dir/ca-bundle.pem`).
    pub fn ca_bundle_path(&self) -> &Path {
        &self.bundle
    }

    /// Stops accepting and ends open connections and tunnels now.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        // The accept task owns every connection task (a JoinSet): aborting it
        // drops the set, which aborts them all.
        self.task.abort();
    }
}

impl Egress {
    /// Starts sandbox `sandbox`'s proxy (the id is used in logs and
    /// decisions). Creates `dir` (0755) if missing; binds `dir/proxy.sock`
    /// (mode 0666, so a container's remapped uid can connect), replacing a
    /// stale socket or a symlink there without following it (any other file
    /// there is an error); writes `dir/ca-bundle.pem` (the host's bundle plus
    /// the runtime CA) atomically; and spawns the accept loop on the current
    /// tokio runtime. `policy` is read for every request.
    ///
    /// `dir` should be owned by the runtime and writable by nobody else (it is
    /// mounted read-only into the container).
    pub fn bind_sandbox(
        &self,
        sandbox: String,
        dir: &Path,
        policy: watch::Receiver<Arc<NetworkPolicy>>,
    ) -> Result<ProxyHandle, EgressError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| EgressError::NoRuntime)?;
        let io_error = |what: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| EgressError::Io { what, path, source }
        };
        match fs::symlink_metadata(dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(EgressError::NotADirectory { path: dir.to_owned() }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir_all(dir).map_err(io_error("creating the egress directory", dir))?;
            }
            Err(source) => return Err(EgressError::Io { what: "inspecting", path: dir.to_owned(), source }),
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(io_error("setting the mode of", dir))?;

        let mut bundle_text = self.inner.system_bundle.clone().unwrap_or_default();
        if !bundle_text.is_empty() && !bundle_text.ends_with('\n') {
            bundle_text.push('\n');
        }
        bundle_text.push_str(self.inner.ca.cert_pem());
        let bundle = dir.join(EGRESS_CA_BUNDLE_FILE);
        crate::ca::write_atomically(dir, &bundle, bundle_text.as_bytes(), 0o644)?;

        let socket = dir.join(EGRESS_SOCKET_FILE);
        match fs::symlink_metadata(&socket) {
            Ok(meta) if meta.file_type().is_socket() || meta.file_type().is_symlink() => {
                // unlink removes the entry itself, never a symlink's target.
                fs::remove_file(&socket).map_err(io_error("removing the stale socket", &socket))?;
            }
            Ok(meta) => {
                let kind = if meta.is_dir() {
                    "a directory"
                } else if meta.is_file() {
                    "a regular file"
                } else {
                    "a special file"
                };
                return Err(EgressError::SocketPathOccupied { path: socket, kind });
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(EgressError::Io { what: "inspecting", path: socket, source }),
        }
        // bind(2) creates the socket and fails if anything appeared meanwhile; it never follows a symlink.
        // Through the directory's descriptor (`/proc/self/fd/N/proxy.sock`):
        // a socket's path is limited to 108 bytes (SUN_LEN), which a deep
        // home's sandbox directory exceeds, and this path is short whatever the home.
        let handle = fs::File::open(dir).map_err(io_error("opening the egress directory", dir))?;
        let short = Path::new("/proc/self/fd").join(handle.as_raw_fd().to_string()).join(EGRESS_SOCKET_FILE);
        let std_listener = std::os::unix::net::UnixListener::bind(&short).map_err(io_error("binding", &socket))?;
        fs::set_permissions(&short, fs::Permissions::from_mode(0o666))
            .map_err(io_error("setting the mode of", &socket))?;
        drop(handle);
        std_listener.set_nonblocking(true).map_err(io_error("configuring", &socket))?;
        let listener = {
            let _guard = runtime.enter();
            UnixListener::from_std(std_listener).map_err(io_error("registering", &socket))?
        };

        let limit = self.inner.config.max_connections_per_sandbox;
        let sandbox = Arc::new(Sandbox { id: sandbox, egress: self.inner.clone(), policy });
        let task = runtime.spawn(accept_loop(listener, sandbox, Arc::new(Semaphore::new(limit)), limit));
        Ok(ProxyHandle { task, socket, bundle })
    }
}

async fn accept_loop(listener: UnixListener, sandbox: Arc<Sandbox>, slots: Arc<Semaphore>, limit: usize) {
    let mut connections = JoinSet::new();
    let refusals = Arc::new(Semaphore::new(MAX_PENDING_REFUSALS));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match slots.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let sandbox = sandbox.clone();
                        connections.spawn(async move {
                            proxy::serve_connection(sandbox, stream).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        tracing::warn!(sandbox = %sandbox.id, limit, "egress connection refused: too many open connections");
                        // Beyond the refusals in flight the connection is just closed.
                        if let Ok(permit) = refusals.clone().try_acquire_owned() {
                            connections.spawn(refuse_busy(stream, limit, permit));
                        }
                    }
                },
                Err(error) => {
                    tracing::warn!(sandbox = %sandbox.id, %error, "egress accept failed");
                    // Out of file descriptors and the like: back off rather than spin.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            // Reap finished connection tasks so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Answers `503` on a connection beyond the limit, then keeps the socket open
/// for a moment, discarding what the client sends, so that writing its
/// request does not fail before it reads the answer. Bounded in time
/// ([`REFUSAL_LINGER`]) and in number ([`MAX_PENDING_REFUSALS`]).
async fn refuse_busy(mut stream: UnixStream, limit: usize, _permit: OwnedSemaphorePermit) {
    let body = format!(
        "the sandbox already has {limit} connections open through its egress proxy (the limit); close some and retry\n"
    );
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}
