//! What the egress proxy costs, against a direct request to the same loopback
//! upstream in the same run: latency of one small GET on a kept-alive
//! connection and on a new connection, and throughput of a 100 MiB download.
//! Plain HTTP, so the difference is the proxy itself (Unix socket, policy
//! decision, header rewriting, a second hop on loopback), not TLS.
//!
//! Run: `cargo bench -p airlock-egress --bench proxy`
//! (shorter: append `-- --measurement-time 3 --warm-up-time 1`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a bench may

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use airlock_core::network::{HostPattern, HostRule, NetworkPolicy};
use airlock_egress::{Egress, EgressCa, EgressConfig, NoSink, SecretSource};
use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::runtime::Runtime;

/// The large download's size.
const BIG: usize = 100 * 1024 * 1024;
/// The small response's body.
const SMALL: &[u8] = b"hello from upstream";

struct NoSecrets;

impl SecretSource for NoSecrets {
    fn secret(&self, _name: &str) -> Option<String> {
        None
    }
}

struct Setup {
    runtime: Runtime,
    port: u16,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
    _handle: airlock_egress::ProxyHandle,
    _policy: tokio::sync::watch::Sender<Arc<NetworkPolicy>>,
}

fn setup() -> Setup {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let big = Bytes::from(vec![b'x'; BIG]);
    let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    runtime.spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let _ = tcp.set_nodelay(true);
            let big = big.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let body = if request.uri().path() == "/big" { big.clone() } else { Bytes::from_static(SMALL) };
                    async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let ca = EgressCa::load_or_create(&dir.path().join("ca")).unwrap();
    let mut config = EgressConfig::default();
    config.system_ca_bundle = None;
    let egress = Egress::new(config, ca, Arc::new(NoSecrets), Arc::new(NoSink)).unwrap();
    let rule = HostRule { ports: vec![port], ..HostRule::allow(HostPattern::new("127.0.0.1").unwrap()) };
    let (policy, receiver) = tokio::sync::watch::channel(Arc::new(NetworkPolicy { allow: vec![rule], deny: vec![] }));
    let handle = {
        let _guard = runtime.enter();
        egress.bind_sandbox("bench".to_owned(), &dir.path().join("egress"), receiver).unwrap()
    };
    let socket = handle.socket_path().to_owned();
    Setup { runtime, port, socket, _dir: dir, _handle: handle, _policy: policy }
}

async fn sender<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(stream: S) -> SendRequest<Empty<Bytes>> {
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    sender
}

async fn direct(port: u16) -> SendRequest<Empty<Bytes>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    sender(tcp).await
}

async fn proxied(setup_socket: &std::path::Path) -> SendRequest<Empty<Bytes>> {
    sender(UnixStream::connect(setup_socket).await.unwrap()).await
}

/// GETs `path` (absolute form when `proxied`) and returns the body's length.
async fn fetch(sender: &mut SendRequest<Empty<Bytes>>, port: u16, path: &str, proxied: bool) -> usize {
    let uri = if proxied { format!("http://127.0.0.1:{port}{path}") } else { path.to_owned() };
    let request = Request::get(uri).header("host", format!("127.0.0.1:{port}")).body(Empty::new()).unwrap();
    sender.ready().await.unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut length = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            length += data.len();
        }
    }
    length
}

fn latency(c: &mut Criterion) {
    let setup = setup();
    let port = setup.port;
    let mut group = c.benchmark_group("egress_request_latency");
    let mut kept = setup.runtime.block_on(direct(port));
    group.bench_function("direct_kept_alive", |b| {
        b.iter(|| black_box(setup.runtime.block_on(fetch(&mut kept, port, "/small", false))))
    });
    let mut kept = setup.runtime.block_on(proxied(&setup.socket));
    group.bench_function("proxy_kept_alive", |b| {
        b.iter(|| black_box(setup.runtime.block_on(fetch(&mut kept, port, "/small", true))))
    });
    group.bench_function("direct_new_connection", |b| {
        b.iter(|| {
            setup.runtime.block_on(async {
                let mut sender = direct(port).await;
                black_box(fetch(&mut sender, port, "/small", false).await)
            })
        })
    });
    group.bench_function("proxy_new_connection", |b| {
        b.iter(|| {
            setup.runtime.block_on(async {
                let mut sender = proxied(&setup.socket).await;
                black_box(fetch(&mut sender, port, "/small", true).await)
            })
        })
    });
    group.finish();
}

fn throughput(c: &mut Criterion) {
    let setup = setup();
    let port = setup.port;
    let mut group = c.benchmark_group("egress_download_100MiB");
    group.sample_size(10).throughput(Throughput::Bytes(BIG as u64));
    let mut kept = setup.runtime.block_on(direct(port));
    group.bench_function("direct", |b| {
        b.iter(|| assert_eq!(setup.runtime.block_on(fetch(&mut kept, port, "/big", false)), BIG))
    });
    let mut kept = setup.runtime.block_on(proxied(&setup.socket));
    group.bench_function("proxy", |b| {
        b.iter(|| assert_eq!(setup.runtime.block_on(fetch(&mut kept, port, "/big", true)), BIG))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    targets = latency, throughput
}
criterion_main!(benches);
