//! The HTTP side of the suite: `airlock serve`'s router on loopback in this
//! process, over the same runtime, and a minimal client (one kept-alive
//! HTTP/1.1 connection per caller, bearer token, JSON in and out).

use std::net::SocketAddr;

use airlock::runtime::Runtime;
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// How long the in-process server may take to stop at the end of a run.
const SERVER_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// The server, running on a spawned task until [`Server::stop`].
#[derive(Debug)]
pub struct Server {
    address: SocketAddr,
    token: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Serves `runtime` on 127.0.0.1 (a free port), with an admin token as
    /// `airlock serve` makes on its first start.
    pub async fn start(runtime: &Runtime) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("listening on loopback")?;
        let address = listener.local_addr().context("reading the listening address")?;
        let token_file = match airlock_server::ensure_admin_token(runtime).context("making the admin token")? {
            airlock_server::AdminToken::FileGone(path) => {
                bail!("the home's admin token file {} is gone: bench with a fresh --home", path.display())
            }
            other => other.path().to_path_buf(),
        };
        let token = std::fs::read_to_string(&token_file)
            .with_context(|| format!("reading {}", token_file.display()))?
            .trim()
            .to_string();
        let state = airlock_server::AppState::new(runtime.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(airlock_server::serve(listener, state, async move {
            let _ = stopped.await;
        }));
        Ok(Self { address, token, stop: Some(stop), task })
    }

    /// A new connection to the server.
    pub async fn connect(&self) -> Result<Connection> {
        let stream = tokio::net::TcpStream::connect(self.address).await.context("connecting to the server")?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.context("talking to the server")?;
        tokio::spawn(connection);
        Ok(Connection { sender, token: self.token.clone() })
    }

    /// Stops the server and waits (bounded) for it to finish.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(SERVER_STOP_WAIT, &mut self.task).await;
    }
}

/// One kept-alive connection.
#[derive(Debug)]
pub struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    token: String,
}

impl Connection {
    /// Sends `method path` (under /v1) with `body` as JSON; the status and the
    /// answer (JSON, or `null` when empty).
    pub async fn call(&mut self, method: Method, path: &str, body: Option<&Value>) -> Result<(StatusCode, Value)> {
        let mut request = Request::builder()
            .method(method.clone())
            .uri(format!("/v1{path}"))
            .header("host", "127.0.0.1")
            .header("authorization", format!("Bearer {}", self.token));
        let payload = match body {
            Some(body) => {
                request = request.header("content-type", "application/json");
                Bytes::from(serde_json::to_vec(body)?)
            }
            None => Bytes::new(),
        };
        self.sender.ready().await.context("the connection to the server closed")?;
        let response =
            self.sender.send_request(request.body(Full::new(payload))?).await.context("sending a request")?;
        let status = response.status();
        let bytes = response.into_body().collect().await.context("reading the answer")?.to_bytes();
        let answer = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).with_context(|| format!("{method} {path}: the answer is not JSON"))?
        };
        Ok((status, answer))
    }

    /// As [`call`](Self::call), failing unless the status is a success.
    pub async fn ok(&mut self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let (status, answer) = self.call(method.clone(), path, body).await?;
        if !status.is_success() {
            bail!("{method} /v1{path} answered {status}: {answer}");
        }
        Ok(answer)
    }
}
