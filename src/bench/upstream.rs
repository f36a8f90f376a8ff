//! A small HTTP/1.1 server on the host's loopback for the egress and pip
//! cases: it answers `GET /hello` with a few bytes, `GET /blob` with
//! [`BLOB_BYTES`] bytes generated as they are sent, and any other path from a
//! map of files (a PEP 503 index). One request per connection
//! (`connection: close`). It binds 127.0.0.1 only and stops when dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The body of `GET /hello`.
pub const HELLO: &[u8] = b"hello\n";
/// The size of `GET /blob`: the download the throughput case times (100 MiB).
pub const BLOB_BYTES: u64 = 100 * 1024 * 1024;
/// How much of the blob is written at once.
const BLOB_CHUNK: usize = 256 * 1024;
/// The most request-head bytes read; a longer head is dropped (this server
/// only ever talks to the bench's own clients, but it still bounds what it buffers).
const MAX_HEAD: usize = 16 * 1024;

/// A running upstream; its accept loop ends when this is dropped.
#[derive(Debug)]
pub struct Upstream {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    /// Starts on 127.0.0.1, a free port; `files` maps URL paths to bodies.
    pub async fn start(files: HashMap<String, Vec<u8>>) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding a loopback upstream")?;
        let addr = listener.local_addr().context("the upstream's address")?;
        let files = Arc::new(files);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let files = files.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, &files).await;
                });
            }
        });
        Ok(Self { addr, task })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

async fn serve(mut stream: TcpStream, files: &HashMap<String, Vec<u8>>) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut head = Vec::with_capacity(1024);
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let read = stream.read(&mut buffer).await?;
        if read == 0 || head.len() > MAX_HEAD {
            return Ok(());
        }
        head.extend_from_slice(&buffer[..read]);
    }
    let text = String::from_utf8_lossy(&head);
    let mut request_line = text.split("\r\n").next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default();
    // Through a proxy the target may be absolute (`http://host:port/path`).
    let target = request_line.next().unwrap_or_default();
    let path = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("/", |at| &rest[at..]),
        None => target,
    };
    let path = path.split('?').next().unwrap_or_default();
    let path = if path.ends_with('/') { format!("{path}index.html") } else { path.to_string() };
    let respond = |status: &str, length: u64, kind: &str| {
        format!("HTTP/1.1 {status}\r\ncontent-length: {length}\r\ncontent-type: {kind}\r\nconnection: close\r\n\r\n")
    };
    if method != "GET" {
        stream.write_all(respond("405 Method Not Allowed", 0, "text/plain").as_bytes()).await?;
    } else if path == "/hello" {
        stream.write_all(respond("200 OK", HELLO.len() as u64, "text/plain").as_bytes()).await?;
        stream.write_all(HELLO).await?;
    } else if path == "/blob" {
        stream.write_all(respond("200 OK", BLOB_BYTES, "application/octet-stream").as_bytes()).await?;
        let chunk = vec![b'a'; BLOB_CHUNK];
        let mut left = BLOB_BYTES;
        while left > 0 {
            let take = left.min(BLOB_CHUNK as u64) as usize;
            stream.write_all(&chunk[..take]).await?;
            left -= take as u64;
        }
    } else if let Some(body) = files.get(&path) {
        let kind = if path.ends_with(".html") { "text/html" } else { "application/octet-stream" };
        stream.write_all(respond("200 OK", body.len() as u64, kind).as_bytes()).await?;
        stream.write_all(body).await?;
    } else {
        stream.write_all(respond("404 Not Found", 0, "text/plain").as_bytes()).await?;
    }
    stream.shutdown().await
}
