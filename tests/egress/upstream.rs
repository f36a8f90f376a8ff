//! Upstream servers on the host's loopback for the egress tests: a small
//! HTTP/1.1 server (one request per connection) that records every request it
//! sees and answers from a route function, optionally behind TLS.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// The most header bytes the fixture reads; a request beyond it is dropped.
const MAX_HEAD: usize = 64 * 1024;

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }
}

/// What the upstream answers.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn ok(body: impl Into<Vec<u8>>) -> Self {
        Self { status: 200, headers: Vec::new(), body: body.into() }
    }

    pub fn status(status: u16, body: &str) -> Self {
        Self { status, headers: Vec::new(), body: body.as_bytes().to_vec() }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

pub type Routes = Arc<dyn Fn(&Seen) -> Answer + Send + Sync>;

/// A running upstream; stops when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    /// Plain HTTP on 127.0.0.1, a free port.
    pub async fn http(routes: Routes) -> Self {
        Self::start(routes, None).await
    }

    /// HTTPS on 127.0.0.1 with `acceptor`'s certificate.
    pub async fn https(routes: Routes, acceptor: tokio_rustls::TlsAcceptor) -> Self {
        Self::start(routes, Some(acceptor)).await
    }

    async fn start(routes: Routes, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let (routes, recorded, tls) = (routes.clone(), recorded.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                serve_one(stream, &routes, &recorded).await;
                            }
                        }
                        None => serve_one(stream, &routes, &recorded).await,
                    }
                });
            }
        });
        Self { addr, seen, task }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve_one<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, routes: &Routes, recorded: &Mutex<Vec<Seen>>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > MAX_HEAD || stream.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default().to_owned();
    let path = request_line.next().unwrap_or_default().to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    // A body is read and dropped (the routes answer on the head alone).
    let length: usize = headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
    let mut body = vec![0u8; length.min(1 << 20)];
    let _ = stream.read_exact(&mut body).await;
    let seen = Seen { method, path, headers };
    recorded.lock().unwrap().push(seen.clone());
    let answer = routes(&seen);
    let mut out = format!("HTTP/1.1 {} X\r\ncontent-length: {}\r\nconnection: close\r\n", answer.status, answer.body.len());
    for (name, value) in &answer.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    let _ = stream.write_all(out.as_bytes()).await;
    let _ = stream.write_all(&answer.body).await;
    let _ = stream.shutdown().await;
}

/// Routes that serve the files under `root` by path (GET only), behind an
/// optional required `authorization` value (else 401).
pub fn static_files(root: &Path, required_authorization: Option<String>) -> Routes {
    let mut files = HashMap::new();
    for entry in walk(root) {
        let relative = entry.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
        files.insert(format!("/{relative}"), std::fs::read(&entry).unwrap());
    }
    let files = Arc::new(files);
    Arc::new(move |seen: &Seen| {
        if let Some(required) = &required_authorization
            && seen.header("authorization") != Some(required.as_str())
        {
            return Answer::status(401, "unauthorized").with_header("www-authenticate", "Basic realm=\"test\"");
        }
        let path = seen.path.split('?').next().unwrap_or_default();
        // A directory's URL serves its index.html, as static servers do.
        let path = if path.ends_with('/') { format!("{path}index.html") } else { path.to_owned() };
        match files.get(&path) {
            Some(bytes) if seen.method == "GET" && path.ends_with(".html") => {
                Answer::ok(bytes.clone()).with_header("content-type", "text/html")
            }
            Some(bytes) if seen.method == "GET" => Answer::ok(bytes.clone()),
            _ => Answer::status(404, "not found"),
        }
    })
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { out.extend(walk(&path)) } else { out.push(path) }
    }
    out
}

/// A bare repository with one commit holding `README` (`readme`), prepared
/// for git's "dumb" HTTP protocol (static files under `dir/site`, the
/// repository at `/repo.git`), and that commit's id. Needs git on the host.
pub fn bare_repository(dir: &Path, readme: &str) -> String {
    let git = |args: &[&str], cwd: &Path| {
        let out = std::process::Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"])
            .args(args)
            .current_dir(cwd)
            .output()
            .expect("git on the host");
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(&["init", "-q"], &work);
    std::fs::write(work.join("README"), readme).unwrap();
    git(&["add", "README"], &work);
    git(&["commit", "-q", "-m", "first"], &work);
    let commit = git(&["rev-parse", "HEAD"], &work);
    git(&["clone", "-q", "--bare", work.to_str().unwrap(), dir.join("site/repo.git").to_str().unwrap()], dir);
    git(&["update-server-info"], &dir.join("site/repo.git"));
    commit
}

/// A test certificate authority and a server certificate for `names`, signed by it.
pub struct TestCa {
    pub ca_pem: String,
    pub acceptor: tokio_rustls::TlsAcceptor,
}

impl TestCa {
    pub fn new(names: &[&str]) -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "airlock egress test upstream CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let chain = vec![cert.der().clone()];
        let private = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .unwrap();
        Self { ca_pem: ca.pem(), acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)) }
    }
}
