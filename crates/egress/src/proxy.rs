//! One client connection on a sandbox's socket: plain HTTP proxying,
//! CONNECT tunnels (untouched or terminated), dialling, reporting.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use airlock_core::network::{self as policy_net, HostRule, NetworkPolicy};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::watch;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::io::{AbortOnDrop, Activity, BoxError, CountedBody, Metered, Prefixed};
use crate::{Decision, DecisionSink, Denial, Inner, MAX_CLIENT_HELLO_BYTES, Verdict};

pub(crate) type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;
type PendingTunnel = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A sandbox's proxy state shared by its connections.
pub(crate) struct Sandbox {
    pub(crate) id: String,
    pub(crate) egress: Arc<Inner>,
    pub(crate) policy: watch::Receiver<Arc<NetworkPolicy>>,
}

impl Sandbox {
    fn policy(&self) -> Arc<NetworkPolicy> {
        self.policy.borrow().clone()
    }
}

/// Serves one client connection until it closes, goes idle, or the proxy
/// shuts down (the task is aborted).
pub(crate) async fn serve_connection(sandbox: Arc<Sandbox>, stream: UnixStream) {
    let activity = Activity::new();
    let idle = sandbox.egress.config.idle_timeout;
    let conn = Arc::new(Conn {
        sandbox,
        activity: activity.clone(),
        upstream: tokio::sync::Mutex::new(None),
        tunnel: Mutex::new(None),
    });
    let work = async {
        let io = TokioIo::new(Metered::new(stream, activity.clone()));
        let service = {
            let conn = conn.clone();
            service_fn(move |request| {
                let conn = conn.clone();
                async move { Ok::<_, Infallible>(conn.handle(request).await) }
            })
        };
        if let Err(error) = conn.http_builder().serve_connection(io, service).with_upgrades().await {
            tracing::debug!(sandbox = %conn.sandbox.id, %error, "egress connection ended");
        }
        let pending = conn.tunnel.lock().ok().and_then(|mut slot| slot.take());
        if let Some(tunnel) = pending {
            tunnel.await;
        }
    };
    tokio::select! {
        () = work => {}
        () = activity.idle(idle) => {
            tracing::debug!(sandbox = %conn.sandbox.id, "egress connection closed after {idle:?} idle");
        }
    }
}

/// Where a request goes.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// Normalised host (lower case, IPv6 without brackets).
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) tls: bool,
}

impl Target {
    /// The `Host` header value for this target.
    pub(crate) fn host_header(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        if self.port == default { host } else { format!("{host}:{}", self.port) }
    }

    fn server_name(&self) -> Option<ServerName<'static>> {
        match self.host.parse::<IpAddr>() {
            Ok(address) => Some(ServerName::IpAddress(address.into())),
            Err(_) => ServerName::try_from(self.host.clone()).ok(),
        }
    }
}

/// Which upstream a kept connection reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
struct UpstreamKey {
    host: String,
    port: u16,
    tls: bool,
    connect_to: Option<SocketAddr>,
}

struct UpstreamConn {
    key: UpstreamKey,
    sender: SendRequest<ProxyBody>,
    _driver: AbortOnDrop,
}

/// Why a request could not be forwarded.
pub(crate) enum Failure {
    Denied(Denial),
    BadGateway(String),
    Timeout(String),
}

struct Conn {
    sandbox: Arc<Sandbox>,
    activity: Activity,
    /// The upstream connection kept for the next request (HTTP/1.1 is
    /// sequential per connection, so one is enough).
    upstream: tokio::sync::Mutex<Option<UpstreamConn>>,
    /// A CONNECT accepted on this connection, run once hyper hands the
    /// connection over.
    tunnel: Mutex<Option<PendingTunnel>>,
}

/// Reports a decision once, when dropped, with the bytes counted by then.
pub(crate) struct Report {
    pub(crate) sink: Arc<dyn DecisionSink>,
    pub(crate) decision: Option<Decision>,
    pub(crate) up: Arc<AtomicU64>,
    pub(crate) down: Arc<AtomicU64>,
}

impl Drop for Report {
    fn drop(&mut self) {
        if let Some(mut decision) = self.decision.take() {
            decision.bytes_up = self.up.load(Ordering::Relaxed);
            decision.bytes_down = self.down.load(Ordering::Relaxed);
            log_decision(&decision);
            self.sink.record(decision);
        }
    }
}

pub(crate) fn log_decision(decision: &Decision) {
    match &decision.verdict {
        Verdict::Allowed => tracing::debug!(
            sandbox = %decision.sandbox, host = %decision.host, port = decision.port, method = ?decision.method,
            status = ?decision.status, bytes_up = decision.bytes_up, bytes_down = decision.bytes_down,
            terminated_tls = decision.terminated_tls, "egress allowed"
        ),
        Verdict::Denied(denial) => tracing::info!(
            sandbox = %decision.sandbox, host = %decision.host, port = decision.port, method = ?decision.method,
            status = ?decision.status, reason = denial.label(), "egress denied"
        ),
    }
}

fn text_response(status: StatusCode, text: String) -> Response<ProxyBody> {
    let mut response = Response::new(Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// Headers that concern one hop only, never forwarded (RFC 9110 7.6.1),
/// plus everything addressed to the proxy (`Proxy-*`).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // The body was decoded from chunked framing; a Content-Length beside
        // it is meaningless (and a smuggling vector). Hyper re-frames.
        headers.remove(header::CONTENT_LENGTH);
    }
    for name in [header::CONNECTION, header::TE, header::TRAILER, header::TRANSFER_ENCODING, header::UPGRADE] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    let proxy_headers: Vec<HeaderName> =
        headers.keys().filter(|name| name.as_str().starts_with("proxy-")).cloned().collect();
    for name in proxy_headers {
        headers.remove(name);
    }
}

/// Does a `Host` header (or inner authority) name `target`?
pub(crate) fn authority_matches(value: &str, target: &Target) -> bool {
    let Ok(authority) = value.parse::<Authority>() else {
        return false;
    };
    let default = if target.tls { 443 } else { 80 };
    policy_net::normalize_host(authority.host()).as_deref() == Some(target.host.as_str())
        && authority.port_u16().unwrap_or(default) == target.port
}

impl Conn {
    fn http_builder(&self) -> hyper::server::conn::http1::Builder {
        let config = &self.sandbox.egress.config;
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_timeout)
            .max_header_size(config.max_header_bytes)
            .keep_alive(true);
        builder
    }

    fn decision(&self, target: &Target, method: Option<&str>, verdict: Verdict, terminated_tls: bool) -> Decision {
        Decision {
            sandbox: self.sandbox.id.clone(),
            host: target.host.clone(),
            port: target.port,
            method: method.map(str::to_owned),
            verdict,
            status: None,
            bytes_up: 0,
            bytes_down: 0,
            terminated_tls,
        }
    }

    /// Reports a refusal at once and builds the answer to the client.
    fn refuse(
        &self,
        target: &Target,
        method: Option<&str>,
        failure: Failure,
        terminated_tls: bool,
    ) -> Response<ProxyBody> {
        let (status, verdict, text) = match failure {
            Failure::Denied(denial) => {
                let status = match denial {
                    Denial::BadRequest => StatusCode::BAD_REQUEST,
                    Denial::MissingSecret(_) => StatusCode::BAD_GATEWAY,
                    _ => StatusCode::FORBIDDEN,
                };
                let text = format!("airlock egress: {}:{} refused: {denial}\n", target.host, target.port);
                (status, Verdict::Denied(denial), text)
            }
            Failure::BadGateway(reason) => (
                StatusCode::BAD_GATEWAY,
                Verdict::Allowed,
                format!("airlock egress: {}:{} failed: {reason}\n", target.host, target.port),
            ),
            Failure::Timeout(reason) => (
                StatusCode::GATEWAY_TIMEOUT,
                Verdict::Allowed,
                format!("airlock egress: {}:{} timed out: {reason}\n", target.host, target.port),
            ),
        };
        let mut decision = self.decision(target, method, verdict, terminated_tls);
        decision.status = Some(status.as_u16());
        log_decision(&decision);
        self.sandbox.egress.sink.record(decision);
        text_response(status, text)
    }

    fn bad_request(&self, text: &str) -> Response<ProxyBody> {
        text_response(StatusCode::BAD_REQUEST, format!("airlock egress: {text}\n"))
    }

    async fn handle(self: &Arc<Self>, request: Request<Incoming>) -> Response<ProxyBody> {
        if request.method() == Method::CONNECT { self.connect(request).await } else { self.plain(request).await }
    }

    /// A plain HTTP request in absolute form.
    async fn plain(self: &Arc<Self>, request: Request<Incoming>) -> Response<ProxyBody> {
        let uri = request.uri();
        let authority = match (uri.scheme_str(), uri.authority()) {
            (Some(scheme), Some(authority)) if scheme.eq_ignore_ascii_case("http") => authority.clone(),
            (Some(_), Some(_)) => {
                return self.bad_request("only http:// URLs are proxied this way; use CONNECT for https");
            }
            _ => return self.bad_request("the proxy expects an absolute URL (GET http://host/path)"),
        };
        let raw_host = authority.host();
        let target = Target {
            host: policy_net::normalize_host(raw_host).unwrap_or_else(|| raw_host.to_ascii_lowercase()),
            port: authority.port_u16().unwrap_or(80),
            tls: false,
        };
        let method = request.method().as_str().to_owned();
        let mut hosts = request.headers().get_all(header::HOST).iter();
        let agrees = match (hosts.next(), hosts.next()) {
            (None, _) => true,
            (Some(value), None) => value.to_str().is_ok_and(|value| authority_matches(value, &target)),
            (Some(_), Some(_)) => false,
        };
        if !agrees {
            return self.refuse(&target, Some(&method), Failure::Denied(Denial::BadRequest), false);
        }
        self.forward(target, request, false).await
    }

    /// Decides one request, sets the rule's headers and forwards it.
    async fn forward(
        self: &Arc<Self>,
        target: Target,
        request: Request<Incoming>,
        terminated: bool,
    ) -> Response<ProxyBody> {
        let method = request.method().as_str().to_owned();
        let policy = self.sandbox.policy();
        let rule = match policy.decide(&target.host, target.port, Some(&method)) {
            policy_net::Verdict::Allow(rule) => rule.clone(),
            policy_net::Verdict::Deny(reason) => {
                return self.refuse(&target, Some(&method), Failure::Denied(Denial::Policy(reason)), terminated);
            }
        };
        drop(policy);

        let (mut parts, body) = request.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if let Err(failure) = set_rule_headers(&mut parts.headers, &rule, self.sandbox.egress.secrets.as_ref()) {
            return self.refuse(&target, Some(&method), failure, terminated);
        }
        match HeaderValue::from_str(&target.host_header()) {
            Ok(host) => {
                parts.headers.insert(header::HOST, host);
            }
            Err(_) => return self.refuse(&target, Some(&method), Failure::Denied(Denial::BadRequest), terminated),
        }
        let path = parts.uri.path_and_query().map_or("/", |path| path.as_str());
        parts.uri = match path.parse::<Uri>() {
            Ok(uri) => uri,
            Err(_) => return self.refuse(&target, Some(&method), Failure::Denied(Denial::BadRequest), terminated),
        };
        parts.version = Version::HTTP_11;

        let up = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicU64::new(0));
        let request = Request::from_parts(parts, CountedBody::new(body, up.clone()).boxed_unsync());
        let response = match self.send(&target, &rule, request).await {
            Ok(response) => response,
            Err(failure) => return self.refuse(&target, Some(&method), failure, terminated),
        };
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let mut decision = self.decision(&target, Some(&method), Verdict::Allowed, terminated);
        decision.status = Some(parts.status.as_u16());
        let report =
            Report { sink: self.sandbox.egress.sink.clone(), decision: Some(decision), up, down: down.clone() };
        Response::from_parts(parts, CountedBody::with_guard(body, down, Box::new(report)).boxed_unsync())
    }

    /// Sends `request` upstream on the kept connection if it reaches the same
    /// place, else on a new one.
    async fn send(
        &self,
        target: &Target,
        rule: &HostRule,
        request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, Failure> {
        let config = &self.sandbox.egress.config;
        let key =
            UpstreamKey { host: target.host.clone(), port: target.port, tls: target.tls, connect_to: rule.connect_to };
        let mut slot = self.upstream.lock().await;
        let reusable = match slot.as_mut() {
            Some(kept) if kept.key == key && !kept.sender.is_closed() => kept.sender.ready().await.is_ok(),
            _ => false,
        };
        if !reusable {
            *slot = None;
            let stream = dial(&self.sandbox.egress, target, rule).await?;
            *slot = Some(self.handshake(key, target, stream).await?);
        }
        let Some(kept) = slot.as_mut() else {
            return Err(Failure::BadGateway("no upstream connection".to_owned()));
        };
        match tokio::time::timeout(config.response_timeout, kept.sender.send_request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => {
                *slot = None;
                Err(Failure::BadGateway(format!("upstream request failed: {error}")))
            }
            Err(_) => {
                *slot = None;
                Err(Failure::Timeout(format!("no response within {:?}", config.response_timeout)))
            }
        }
    }

    /// Starts HTTP/1.1 (over TLS when the target needs it) on a dialled stream.
    async fn handshake(&self, key: UpstreamKey, target: &Target, stream: TcpStream) -> Result<UpstreamConn, Failure> {
        let (sender, driver) =
            upstream_http(&self.sandbox.egress, target, Metered::new(stream, self.activity.clone())).await?;
        Ok(UpstreamConn { key, sender, _driver: AbortOnDrop(driver) })
    }

    /// CONNECT host:port: decide, dial, answer 200, then run the tunnel once
    /// hyper hands the connection over.
    async fn connect(self: &Arc<Self>, request: Request<Incoming>) -> Response<ProxyBody> {
        let Some(authority) = request.uri().authority().cloned() else {
            return self.bad_request("CONNECT needs host:port");
        };
        let Some(port) = authority.port_u16() else {
            return self.bad_request("CONNECT needs host:port");
        };
        let raw_host = authority.host();
        let target = Target {
            host: policy_net::normalize_host(raw_host).unwrap_or_else(|| raw_host.to_ascii_lowercase()),
            port,
            tls: true,
        };
        let policy = self.sandbox.policy();
        let rule = match policy.decide(&target.host, port, None) {
            policy_net::Verdict::Allow(rule) => rule.clone(),
            policy_net::Verdict::Deny(reason) => {
                return self.refuse(&target, None, Failure::Denied(Denial::Policy(reason)), false);
            }
        };
        drop(policy);
        let stream = match dial(&self.sandbox.egress, &target, &rule).await {
            Ok(stream) => stream,
            Err(failure) => return self.refuse(&target, None, failure, false),
        };
        // The stored future holds the connection weakly: while it waits in
        // `self.tunnel` it must not keep `self` alive (a cycle would leak the
        // connection and its upstream socket if the task were aborted then).
        let weak = Arc::downgrade(self);
        let tunnel = async move {
            let Some(conn) = weak.upgrade() else { return };
            match hyper::upgrade::on(request).await {
                Ok(upgraded) => conn.tunnel(TokioIo::new(upgraded), stream, target, rule).await,
                Err(error) => tracing::debug!(sandbox = %conn.sandbox.id, %error, "egress CONNECT upgrade failed"),
            }
        };
        if let Ok(mut slot) = self.tunnel.lock() {
            *slot = Some(Box::pin(tunnel));
        }
        Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync())
    }

    /// Runs an accepted tunnel: checks the ClientHello's SNI, then either
    /// terminates TLS or passes the bytes through.
    async fn tunnel<C>(self: Arc<Self>, mut client: C, upstream: TcpStream, target: Target, rule: HostRule)
    where
        C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let config = &self.sandbox.egress.config;
        let refused = |denial: Denial| {
            let decision = self.decision(&target, None, Verdict::Denied(denial), false);
            log_decision(&decision);
            self.sandbox.egress.sink.record(decision);
        };
        let hello = match tokio::time::timeout(config.handshake_timeout, read_client_hello(&mut client)).await {
            Ok(Ok(hello)) => hello,
            Ok(Err(HelloError::NotTls)) => return refused(Denial::NotTls),
            Ok(Err(HelloError::Closed)) | Err(_) => return,
        };
        let ip_literal = target.host.parse::<IpAddr>().is_ok();
        match &hello.server_name {
            None if ip_literal => {}
            None => return refused(Denial::MissingSni),
            Some(name) if policy_net::normalize_host(name).as_deref() == Some(target.host.as_str()) => {}
            Some(_) => return refused(Denial::SniMismatch),
        }
        if rule.needs_termination() {
            self.terminate(client, hello.bytes, upstream, target, rule).await;
        } else {
            let up = Arc::new(AtomicU64::new(0));
            let down = Arc::new(AtomicU64::new(0));
            let _report = Report {
                sink: self.sandbox.egress.sink.clone(),
                decision: Some(self.decision(&target, None, Verdict::Allowed, false)),
                up: up.clone(),
                down: down.clone(),
            };
            let mut upstream = Metered::counted(upstream, self.activity.clone(), down, up);
            if upstream.write_all(&hello.bytes).await.is_err() {
                return;
            }
            // Ends when both directions are done, or on error; the idle
            // watchdog and shutdown drop it otherwise.
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        }
    }

    /// Terminates the client's TLS with a leaf for the host and serves
    /// HTTP/1.1 inside, forwarding each request over TLS to the upstream.
    async fn terminate<C>(
        self: Arc<Self>,
        client: C,
        hello: Vec<u8>,
        upstream: TcpStream,
        target: Target,
        rule: HostRule,
    ) where
        C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let config = &self.sandbox.egress.config;
        let server_config = match self.sandbox.egress.ca.server_config(&target.host) {
            Ok(server_config) => server_config,
            Err(error) => {
                tracing::warn!(sandbox = %self.sandbox.id, host = %target.host, %error, "egress could not issue a leaf certificate");
                return;
            }
        };
        let accepted = tokio::time::timeout(
            config.handshake_timeout,
            TlsAcceptor::from(server_config).accept(Prefixed::new(hello, client)),
        )
        .await;
        let Ok(Ok(tls)) = accepted else {
            tracing::debug!(sandbox = %self.sandbox.id, host = %target.host, "egress TLS handshake with the sandbox failed");
            return;
        };
        // The connection dialled for CONNECT serves the first request.
        let key = UpstreamKey { host: target.host.clone(), port: target.port, tls: true, connect_to: rule.connect_to };
        match self.handshake(key, &target, upstream).await {
            Ok(kept) => {
                *self.upstream.lock().await = Some(kept);
            }
            Err(_) => {
                // Requests will dial again and answer 502/504 if that fails too.
            }
        }
        let service = {
            let conn = self.clone();
            service_fn(move |request: Request<Incoming>| {
                let conn = conn.clone();
                let target = target.clone();
                async move { Ok::<_, Infallible>(conn.inner_request(target, request).await) }
            })
        };
        if let Err(error) = self.http_builder().serve_connection(TokioIo::new(tls), service).await {
            tracing::debug!(sandbox = %self.sandbox.id, %error, "egress terminated connection ended");
        }
    }

    /// A request inside a terminated tunnel: it must address the CONNECT host.
    async fn inner_request(self: Arc<Self>, target: Target, request: Request<Incoming>) -> Response<ProxyBody> {
        let method = request.method().as_str().to_owned();
        let mut hosts = request.headers().get_all(header::HOST).iter();
        let host_agrees = match (hosts.next(), hosts.next()) {
            (None, _) => true,
            (Some(value), None) => value.to_str().is_ok_and(|value| authority_matches(value, &target)),
            (Some(_), Some(_)) => false,
        };
        let uri_agrees =
            request.uri().authority().is_none_or(|authority| authority_matches(authority.as_str(), &target));
        if request.method() == Method::CONNECT || !host_agrees || !uri_agrees {
            return self.refuse(&target, Some(&method), Failure::Denied(Denial::BadRequest), true);
        }
        self.forward(target, request, true).await
    }
}

/// Sets the rule's headers on `headers` from their secrets, replacing any of
/// the same name. A secret that is not set refuses the request.
pub(crate) fn set_rule_headers(
    headers: &mut HeaderMap,
    rule: &HostRule,
    secrets: &dyn crate::SecretSource,
) -> Result<(), Failure> {
    for header_rule in &rule.headers {
        let Some(secret) = secrets.secret(&header_rule.secret) else {
            return Err(Failure::Denied(Denial::MissingSecret(header_rule.secret.clone())));
        };
        let name = HeaderName::from_bytes(header_rule.name.as_bytes());
        let value = HeaderValue::from_str(&format!("{}{secret}", header_rule.prefix));
        let (Ok(name), Ok(mut value)) = (name, value) else {
            let reason =
                format!("the header rule {:?} does not make a valid header (value withheld)", header_rule.name);
            return Err(Failure::BadGateway(reason));
        };
        value.set_sensitive(true);
        headers.remove(&name);
        headers.insert(name, value);
    }
    Ok(())
}

/// Starts an HTTP/1.1 client connection on a dialled stream, over verified
/// TLS (SNI = the host) when the target is HTTPS. Returns the sender and the
/// task driving the connection.
pub(crate) async fn upstream_http<S>(
    egress: &Inner,
    target: &Target,
    stream: S,
) -> Result<(SendRequest<ProxyBody>, tokio::task::JoinHandle<()>), Failure>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = &egress.config;
    let bad = |what: &str, error: &dyn std::fmt::Display| Failure::BadGateway(format!("{what}: {error}"));
    if target.tls {
        let Some(name) = target.server_name() else {
            return Err(Failure::Denied(Denial::BadRequest));
        };
        let connector = TlsConnector::from(egress.upstream_tls.clone());
        let tls = match tokio::time::timeout(config.connect_timeout, connector.connect(name, stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => return Err(bad("TLS with upstream failed", &error)),
            Err(_) => return Err(Failure::Timeout("TLS handshake with upstream".to_owned())),
        };
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|error| bad("upstream HTTP", &error))?;
        Ok((sender, tokio::spawn(async move { drop(connection.await) })))
    } else {
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|error| bad("upstream HTTP", &error))?;
        Ok((sender, tokio::spawn(async move { drop(connection.await) })))
    }
}

/// Resolves (or takes the rule's `connect_to`) and dials, refusing internal
/// addresses the rule does not name. Never dials an address the sandbox chose
/// except an IP literal its policy allows.
pub(crate) async fn dial(egress: &Inner, target: &Target, rule: &HostRule) -> Result<TcpStream, Failure> {
    let timeout = egress.config.connect_timeout;
    let candidates: Vec<SocketAddr> = if let Some(address) = rule.connect_to {
        vec![address]
    } else if let Ok(address) = target.host.parse::<IpAddr>() {
        vec![SocketAddr::new(address, target.port)]
    } else {
        match tokio::time::timeout(timeout, tokio::net::lookup_host((target.host.as_str(), target.port))).await {
            Ok(Ok(addresses)) => addresses.collect(),
            Ok(Err(error)) => return Err(Failure::BadGateway(format!("cannot resolve the host: {error}"))),
            Err(_) => return Err(Failure::Timeout("resolving the host".to_owned())),
        }
    };
    let allowed: Vec<SocketAddr> = candidates
        .iter()
        .copied()
        .filter(|address| !crate::is_forbidden(address.ip()) || rule.names_address(address.ip()))
        .collect();
    if allowed.is_empty() {
        return Err(match candidates.first() {
            Some(address) => Failure::Denied(Denial::ForbiddenAddress(address.ip())),
            None => Failure::BadGateway("the host resolves to no address".to_owned()),
        });
    }
    let mut last = Failure::BadGateway("no address to dial".to_owned());
    for address in allowed {
        match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(error)) => last = Failure::BadGateway(format!("cannot connect: {error}")),
            Err(_) => last = Failure::Timeout(format!("connecting within {timeout:?}")),
        }
    }
    Err(last)
}

struct ClientHello {
    /// Every byte read from the client so far (replayed to the upstream or the TLS acceptor).
    bytes: Vec<u8>,
    server_name: Option<String>,
}

enum HelloError {
    NotTls,
    Closed,
}

/// Reads from `client` until a whole TLS ClientHello has arrived (at most
/// [`MAX_CLIENT_HELLO_BYTES`]), parsed by rustls, and returns the bytes read
/// and the SNI.
async fn read_client_hello<C: AsyncRead + Unpin>(client: &mut C) -> Result<ClientHello, HelloError> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let count = client.read(&mut chunk).await.map_err(|_| HelloError::Closed)?;
        if count == 0 {
            return Err(HelloError::Closed);
        }
        bytes.extend_from_slice(&chunk[..count]);
        if bytes.len() > MAX_CLIENT_HELLO_BYTES {
            return Err(HelloError::NotTls);
        }
        let mut fresh = &chunk[..count];
        while !fresh.is_empty() {
            match acceptor.read_tls(&mut fresh) {
                Ok(0) | Err(_) => return Err(HelloError::NotTls),
                Ok(_) => {}
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let server_name = accepted.client_hello().server_name().map(str::to_owned);
                return Ok(ClientHello { bytes, server_name });
            }
            Ok(None) => {}
            Err(_) => return Err(HelloError::NotTls),
        }
    }
}
