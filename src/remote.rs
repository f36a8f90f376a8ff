//! The CLI's way in when `airlock serve` owns the home: the same HTTP API, over
//! the server's Unix socket in the home (as `docker` talks to `dockerd`).
//!
//! One connection per request; the socket is as private as the home. Answers
//! that are problems become one-line errors carrying the server's detail.

use std::path::{Path, PathBuf};

use airlock::runtime::API_SOCKET_FILE;
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// A client of the server that owns a home.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
}

type Body = BoxBody<Bytes, std::io::Error>;

impl ApiClient {
    /// The client of the server that answers on `home`'s socket, if one does.
    pub fn if_served(home: &Path) -> Option<Self> {
        let socket = home.join(API_SOCKET_FILE);
        // A socket left by a server that died refuses the connection.
        std::os::unix::net::UnixStream::connect(&socket).ok().map(|_| Self { socket })
    }

    /// Sends one request; the answer's body is the caller's to read.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Body,
    ) -> Result<Response<Incoming>> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .with_context(|| format!("connecting to the server at {}", self.socket.display()))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.context("talking to the server")?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut request = Request::builder().method(method).uri(format!("/v1{path}")).header("host", "airlock");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(body).context("building the request")?;
        let response = sender.send_request(request).await.context("the server did not answer")?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(problem(response).await)
        }
    }

    /// A JSON request (or none) and its JSON answer (`null` for an empty one).
    pub async fn json(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let response = match body {
            Some(value) => {
                let bytes = Bytes::from(serde_json::to_vec(value)?);
                self.send(method, path, &[("content-type", "application/json")], full(bytes)).await?
            }
            None => self.send(method, path, &[], full(Bytes::new())).await?,
        };
        let bytes = response.into_body().collect().await.context("reading the answer")?.to_bytes();
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).context("the server's answer is not JSON")
    }
}

/// A whole body.
pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// A body streamed from `reader`, never held whole.
pub fn streamed(reader: impl tokio::io::AsyncRead + Send + Sync + 'static) -> Body {
    let frames = tokio_util::io::ReaderStream::new(reader).map_ok(Frame::data);
    BodyExt::boxed(StreamBody::new(frames))
}

/// An error answer: its status, and the problem's detail.
#[derive(Debug)]
pub struct Refused {
    pub status: StatusCode,
    pub detail: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

impl std::error::Error for Refused {}

async fn problem(response: Response<Incoming>) -> anyhow::Error {
    let status = response.status();
    let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let detail = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|problem| problem.get("detail").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| format!("the server answered {status}"));
    anyhow::Error::new(Refused { status, detail })
}

/// `path` for a URL: each segment percent-encoded, the slashes kept.
pub fn encode_path(path: &str) -> String {
    let mut encoded = String::with_capacity(path.len());
    for byte in path.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => encoded.push(byte as char),
            other => encoded.push_str(&format!("%{other:02X}")),
        }
    }
    encoded
}

/// Reads a server-sent event stream: each call gives the next (event, data).
pub struct Events {
    body: Incoming,
    buffer: Vec<u8>,
}

impl Events {
    pub fn new(response: Response<Incoming>) -> Self {
        Self { body: response.into_body(), buffer: Vec::new() }
    }

    /// The next event; `None` when the stream ends.
    pub async fn next(&mut self) -> Result<Option<(String, String)>> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|pair| pair == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&block);
                let (mut name, mut data) = (String::new(), Vec::new());
                for line in text.lines() {
                    if let Some(value) = line.strip_prefix("event:") {
                        name = value.trim_start().to_string();
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push(value.strip_prefix(' ').unwrap_or(value).to_string());
                    }
                }
                if name.is_empty() && data.is_empty() {
                    continue; // a keep-alive comment
                }
                return Ok(Some((name, data.join("\n"))));
            }
            match self.body.frame().await {
                Some(frame) => {
                    if let Ok(data) = frame.context("reading the event stream")?.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
                None if self.buffer.iter().all(u8::is_ascii_whitespace) => return Ok(None),
                None => bail!("the event stream ended in the middle of an event"),
            }
        }
    }
}

/// Whether `result` is a `409 Conflict` (such as a sandbox that exists already).
pub fn is_conflict<T>(result: &Result<T>) -> bool {
    result.as_ref().err().and_then(|e| e.downcast_ref::<Refused>()).is_some_and(|r| r.status == StatusCode::CONFLICT)
}

