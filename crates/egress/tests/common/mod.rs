//! Shared test fixtures: loopback upstreams (HTTP and HTTPS with a test CA),
//! a sandbox proxy in a temporary directory, and clients that speak to its
//! Unix socket the way a sandbox does.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use airlock_core::network::{HeaderRule, HostPattern, HostRule, NetworkPolicy};
use airlock_egress::{Decision, DecisionSink, Egress, EgressCa, EgressConfig, ProxyHandle, SecretSource};
use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};
use tokio::sync::watch;

pub const SECRET_VALUE: &str = "s3cret-value-never-seen-by-the-sandbox";
pub const UPSTREAM_BODY: &str = "hello from upstream";

/// What an upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: HeaderMap,
    pub body_len: usize,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub accepts: Arc<AtomicUsize>,
}

impl Upstream {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

/// A test PKI: a CA and a server configuration with a leaf for `names`.
pub struct TestPki {
    pub ca_pem: String,
    pub leaf_der: CertificateDer<'static>,
    pub server: Arc<rustls::ServerConfig>,
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn test_pki(names: &[&str]) -> TestPki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "test upstream CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_params = CertificateParams::new(names.iter().map(|name| name.to_string()).collect::<Vec<_>>()).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone(), ca_cert.der().clone()], key)
        .unwrap();
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    TestPki { ca_pem: ca_cert.pem(), leaf_der: leaf.der().clone(), server: Arc::new(server) }
}

/// An upstream on 127.0.0.1 that records requests and answers
/// [`UPSTREAM_BODY`], or `n` bytes for `/bytes/n`; HTTPS if `tls` is given.
pub async fn upstream(tls: Option<Arc<rustls::ServerConfig>>) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let accepts = Arc::new(AtomicUsize::new(0));
    let (seen_task, accepts_task) = (seen.clone(), accepts.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            accepts_task.fetch_add(1, Ordering::SeqCst);
            let seen = seen_task.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let (parts, body) = request.into_parts();
                        let body = body.collect().await.map(|body| body.to_bytes()).unwrap_or_default();
                        seen.lock().unwrap().push(Seen {
                            method: parts.method.to_string(),
                            uri: parts.uri.to_string(),
                            headers: parts.headers.clone(),
                            body_len: body.len(),
                        });
                        let reply = match parts.uri.path().strip_prefix("/bytes/") {
                            Some(count) => Bytes::from(vec![b'x'; count.parse().unwrap_or(0)]),
                            None => Bytes::from_static(UPSTREAM_BODY.as_bytes()),
                        };
                        let mut response = Response::new(Full::new(reply));
                        response.headers_mut().insert("x-upstream", "yes".parse().unwrap());
                        Ok::<_, Infallible>(response)
                    }
                });
                match tls {
                    Some(config) => {
                        if let Ok(stream) = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                    None => {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tcp), service)
                            .await;
                    }
                }
            });
        }
    });
    Upstream { addr, seen, accepts }
}

pub struct Secrets(pub HashMap<String, String>);

impl SecretSource for Secrets {
    fn secret(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

#[derive(Default)]
pub struct Recorder(pub Mutex<Vec<Decision>>);

impl DecisionSink for Recorder {
    fn record(&self, decision: Decision) {
        self.0.lock().unwrap().push(decision);
    }
}

impl Recorder {
    pub fn all(&self) -> Vec<Decision> {
        self.0.lock().unwrap().clone()
    }

    /// Waits (at most 5 s) for a decision matching `matches`.
    pub async fn wait_for(&self, matches: impl Fn(&Decision) -> bool) -> Decision {
        for _ in 0..100 {
            if let Some(found) = self.all().into_iter().find(&matches) {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no matching decision within 5 s; got {:?}", self.all());
    }
}

pub struct Proxy {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub bundle: PathBuf,
    pub policy: watch::Sender<Arc<NetworkPolicy>>,
    pub sink: Arc<Recorder>,
    pub handle: Option<ProxyHandle>,
    pub egress: Egress,
}

pub fn config(extra_roots: Option<&str>) -> EgressConfig {
    let mut config = EgressConfig::default();
    config.system_ca_bundle = None;
    config.extra_upstream_roots_pem = extra_roots.map(str::to_owned).into_iter().collect();
    config
}

pub async fn proxy(policy: NetworkPolicy, extra_roots: Option<&str>) -> Proxy {
    proxy_with(policy, config(extra_roots)).await
}

pub async fn proxy_with(policy: NetworkPolicy, config: EgressConfig) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let ca = EgressCa::load_or_create(&dir.path().join("ca")).unwrap();
    let secrets = Arc::new(Secrets(HashMap::from([("api-token".to_owned(), SECRET_VALUE.to_owned())])));
    let sink = Arc::new(Recorder::default());
    let egress = Egress::new(config, ca, secrets, sink.clone()).unwrap();
    let (policy, receiver) = watch::channel(Arc::new(policy));
    let sandbox_dir = dir.path().join("egress");
    let handle = egress.bind_sandbox("sbx-test".to_owned(), &sandbox_dir, receiver).unwrap();
    Proxy {
        socket: handle.socket_path().to_owned(),
        bundle: handle.ca_bundle_path().to_owned(),
        dir,
        policy,
        sink,
        handle: Some(handle),
        egress,
    }
}

pub fn pattern(text: &str) -> HostPattern {
    HostPattern::new(text).unwrap()
}

pub fn allow(host: &str, ports: &[u16]) -> HostRule {
    HostRule { ports: ports.to_vec(), ..HostRule::allow(pattern(host)) }
}

pub fn with_token(mut rule: HostRule, header: &str) -> HostRule {
    rule.headers =
        vec![HeaderRule { name: header.to_owned(), secret: "api-token".to_owned(), prefix: "Bearer ".to_owned() }];
    rule
}

pub fn policy(rules: Vec<HostRule>) -> NetworkPolicy {
    NetworkPolicy { allow: rules, deny: Vec::new() }
}

/// An HTTP/1.1 client connection to the proxy socket (requests in absolute form).
pub async fn client(socket: &Path) -> SendRequest<Full<Bytes>> {
    let stream = UnixStream::connect(socket).await.unwrap();
    over(stream).await
}

/// An HTTP/1.1 client connection over any stream.
pub async fn over<S>(stream: S) -> SendRequest<Full<Bytes>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    sender
}

pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

pub async fn send(sender: &mut SendRequest<Full<Bytes>>, request: Request<Full<Bytes>>) -> Answer {
    let response = tokio::time::timeout(Duration::from_secs(20), sender.send_request(request)).await.unwrap().unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Answer { status, headers, body: String::from_utf8_lossy(&body).into_owned() }
}

pub fn get(url: &str) -> Request<Full<Bytes>> {
    let uri: http::Uri = url.parse().unwrap();
    let host = uri.authority().unwrap().as_str().to_owned();
    Request::get(uri).header("host", host).body(Full::new(Bytes::new())).unwrap()
}

/// Sends `CONNECT authority` on a new connection; returns the status, the
/// body of a refusal, and the stream (a tunnel when the status is 200).
pub async fn connect(socket: &Path, authority: &str) -> (u16, String, UnixStream) {
    let mut stream = UnixStream::connect(socket).await.unwrap();
    stream.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let count = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut byte)).await.unwrap().unwrap();
        assert_eq!(count, 1, "proxy closed during the response head: {:?}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let length = head
        .lines()
        .find_map(|line| {
            line.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|value| value.trim().parse::<usize>().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    if status != 200 {
        stream.read_exact(&mut body).await.unwrap();
    }
    (status, String::from_utf8(body).unwrap(), stream)
}

/// A TLS client configuration trusting the certificates in `pem`.
pub fn tls_client(pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

pub async fn tls_over(
    stream: UnixStream,
    trust_pem: &str,
    server_name: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<UnixStream>> {
    // An IP address as the name: rustls then sends no SNI.
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    tokio::time::timeout(
        Duration::from_secs(20),
        tokio_rustls::TlsConnector::from(tls_client(trust_pem)).connect(name, stream),
    )
    .await
    .unwrap()
}
