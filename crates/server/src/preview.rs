//! Preview URLs: a sandbox's exposed port, reachable over HTTP and WebSocket.
//!
//! `POST /v1/sandboxes/{name}/ports` exposes a port and answers with a
//! preview token (see [`airlock_runtime::PREVIEW_TOKEN_BYTES`]) and two URLs:
//! the host form `http://<port>-<sandbox>-<token>.<preview domain>:<server port>/`
//! and the path form `/preview/<sandbox>/<port>/<token>/`. The token is the
//! capability: preview requests carry no API token, and one that does has it
//! removed. An unknown sandbox, a port not exposed and a wrong token get one
//! and the same `404` ([`refused`]), so a guess learns nothing.
//!
//! Each preview request gets its own stream into the sandbox
//! ([`airlock_runtime::Sandbox::connect_port`]: no network in between; a
//! sleeping sandbox wakes) and one HTTP/1.1 exchange over it. Bodies stream
//! both ways; an `Upgrade` (WebSocket) answered `101` becomes a byte pipe.
//!
//! The sandbox is hostile. It never sees the request's `Authorization` or
//! `Proxy-Authorization`, nor (path form, which shares the API's origin) its
//! cookies; it cannot set cookies on the API's origin or, through a `Domain`
//! attribute, on other previews. Its answer's head is bounded
//! ([`MAX_UPSTREAM_HEAD_BYTES`], at most [`MAX_UPSTREAM_HEADERS`] headers,
//! within [`UPSTREAM_HEAD_TIMEOUT`]); hop-by-hop headers are dropped both ways.

use std::time::{Duration, UNIX_EPOCH};

use airlock_core::SandboxName;
use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::uri::Authority;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Version, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, post};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::auth::Scope;
use crate::{ApiError, AppState, Code, StrictJson};

/// Largest head (status line and headers) a sandbox's answer may have (and
/// of its chunked trailers), and the proxy's read buffer. Protects the
/// server's memory from a hostile upstream.
pub const MAX_UPSTREAM_HEAD_BYTES: usize = 64 * 1024;
/// Most headers a sandbox's answer may carry (hyper's parser refuses more).
pub const MAX_UPSTREAM_HEADERS: usize = 100;
/// Longest wait for the sandbox's port to accept and answer with a head
/// (waking the sandbox included): a dev server compiling on first request
/// may take a while, but a silent one does not hold a request forever. The
/// body that follows has no bound (a dev server may stream).
pub const UPSTREAM_HEAD_TIMEOUT: Duration = Duration::from_secs(120);
/// Where path-form previews live.
const PATH_PREFIX: &str = "/preview";

/// The one answer to a preview request that is not allowed: unknown sandbox,
/// port not exposed, wrong token, malformed URL alike.
fn refused() -> Response {
    ApiError::not_found("no such preview").into_response()
}

/// `POST /v1/sandboxes/{name}/ports`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExposePort {
    /// The port inside the sandbox (1 to 65535), on its loopback.
    port: u16,
}

/// A port just exposed: the only answer that carries its token.
#[derive(Debug, Serialize)]
pub(crate) struct Exposure {
    port: u16,
    /// Host form: `http://<port>-<sandbox>-<token>.<preview domain>[:<server port>]/`.
    url: String,
    /// Path form, for clients that cannot set a host.
    path_url: String,
    /// The preview token (the capability; exposing the port again replaces it).
    token: String,
}

/// An exposed port in a list (its token is not kept, so not shown).
#[derive(Debug, Serialize)]
pub(crate) struct ExposedPort {
    port: u16,
    /// When it was exposed, in milliseconds since the Unix epoch.
    created_at_ms: u64,
}

/// Routes under `/v1` (behind the bearer token).
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/sandboxes/{name}/ports", post(expose).get(list))
        .route("/sandboxes/{name}/ports/{port}", delete(unexpose))
}

/// The path form, at the root (no API token: the preview token is the capability).
pub(crate) fn root_routes() -> Router<AppState> {
    Router::new()
        .route("/preview/{sandbox}/{port}/{token}", any(by_path))
        // The URL as handed out (an empty rest, which the wildcard does not match).
        .route("/preview/{sandbox}/{port}/{token}/", any(by_path))
        .route("/preview/{sandbox}/{port}/{token}/{*rest}", any(by_path))
}

pub(crate) async fn expose(
    state: Scope,
    Path(name): Path<String>,
    headers: HeaderMap,
    StrictJson(request): StrictJson<ExposePort>,
) -> Result<(StatusCode, Json<Exposure>), ApiError> {
    let sandbox = state.sandbox(&name)?;
    let exposure = sandbox.expose_port(request.port)?;
    let (url, path_url) = urls(&headers, state.ops().preview_domain(), &name, exposure.port, &exposure.token);
    Ok((StatusCode::CREATED, Json(Exposure { port: exposure.port, url, path_url, token: exposure.token })))
}

pub(crate) async fn list(state: Scope, Path(name): Path<String>) -> Result<Json<Vec<ExposedPort>>, ApiError> {
    let ports = state.sandbox(&name)?.exposed_ports()?;
    Ok(Json(
        ports
            .into_iter()
            .map(|exposed| ExposedPort {
                port: exposed.port,
                created_at_ms: exposed
                    .created_at
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX)),
            })
            .collect(),
    ))
}

pub(crate) async fn unexpose(state: Scope, Path((name, port)): Path<(String, String)>) -> Result<StatusCode, ApiError> {
    let sandbox = state.sandbox(&name)?;
    // Parsed here, not by the extractor: a bad port is a problem answer too.
    let port: u16 = port.parse().map_err(|_| {
        ApiError::new(StatusCode::BAD_REQUEST, Code::InvalidRequest, "the port must be a number from 1 to 65535")
    })?;
    if sandbox.unexpose_port(port)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("port {port} is not exposed")))
    }
}

/// The two URLs of an exposure, on the server the API request reached (the
/// port of its `Host`).
fn urls(headers: &HeaderMap, domain: &str, name: &str, port: u16, token: &str) -> (String, String) {
    let authority =
        headers.get(header::HOST).and_then(|value| value.to_str().ok()).and_then(|host| host.parse::<Authority>().ok());
    let server_port = authority.as_ref().and_then(Authority::port_u16).map(|p| format!(":{p}")).unwrap_or_default();
    let url = format!("http://{port}-{name}-{token}.{domain}{server_port}/");
    let path = format!("{PATH_PREFIX}/{name}/{port}/{token}/");
    let path_url = match authority {
        Some(authority) => format!("http://{authority}{path}"),
        None => path,
    };
    (url, path_url)
}

/// Which form a preview request came in, for what its headers may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// Its own origin (a host of its own).
    Host,
    /// The API's origin: no cookies either way.
    Path,
}

/// The path form: `/preview/<sandbox>/<port>/<token>[/<rest>]`, forwarded as `/<rest>`.
async fn by_path(State(state): State<AppState>, request: Request) -> Response {
    // The raw path (not decoded), split by hand: the rest goes on as sent.
    let raw = request.uri().path().to_string();
    let mut segments = raw.splitn(6, '/');
    let (Some(""), Some("preview"), Some(name), Some(port), Some(token)) =
        (segments.next(), segments.next(), segments.next(), segments.next(), segments.next())
    else {
        return refused();
    };
    let mut target = format!("/{}", segments.next().unwrap_or(""));
    if let Some(query) = request.uri().query() {
        target.push('?');
        target.push_str(query);
    }
    proxy(&state, name, port, token, target, request, Form::Path).await
}

/// A layer over the whole app: a request whose host is
/// `<port>-<sandbox>-<token>.<preview domain>` is a preview, whatever its
/// path; any other goes on to the API.
pub(crate) async fn by_host(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some((port, name, token)) = preview_host(&request, state.ops().preview_domain()) else {
        return next.run(request).await;
    };
    let target = request.uri().path_and_query().map_or_else(|| "/".to_string(), |pq| pq.as_str().to_string());
    proxy(&state, &name, &port, &token, target, request, Form::Host).await
}

/// `(port, sandbox, token)` from a host `<port>-<sandbox>-<token>.<domain>[:<server port>]`.
fn preview_host(request: &Request, domain: &str) -> Option<(String, String, String)> {
    let host = match request.headers().get(header::HOST) {
        Some(value) => value.to_str().ok()?.to_string(),
        None => request.uri().host()?.to_string(),
    };
    let host = host.to_ascii_lowercase();
    let host = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name.to_string(),
        _ => host,
    };
    let domain = domain.trim_start_matches('.').to_ascii_lowercase();
    let label = host.strip_suffix(&domain)?.strip_suffix('.')?;
    if label.contains('.') {
        return None;
    }
    let (port, rest) = label.split_once('-')?;
    let (name, token) = rest.rsplit_once('-')?;
    Some((port.to_string(), name.to_string(), token.to_string()))
}

/// Checks the capability, then relays one exchange to the sandbox's port.
async fn proxy(
    state: &AppState,
    name: &str,
    port: &str,
    token: &str,
    target: String,
    request: Request,
    form: Form,
) -> Response {
    let span = tracing::info_span!("preview", sandbox = name, port, method = %request.method());
    async move {
        let Some(sandbox) = allowed(state, name, port, token) else { return refused() };
        let Ok(port) = port.parse::<u16>() else { return refused() };
        match relay(sandbox, port, target, request, form).await {
            Ok(response) => response,
            Err(error) => error.into_response(),
        }
    }
    .instrument(span)
    .await
}

/// The sandbox, when `token` is the live token of its exposed `port`.
fn allowed(state: &AppState, name: &str, port: &str, token: &str) -> Option<airlock_runtime::Sandbox> {
    // Canonical digits only: one port has one URL.
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) || port.starts_with('0') {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    SandboxName::new(name).ok()?;
    let sandbox = match state.runtime().get(name) {
        Ok(found) => found?,
        Err(error) => {
            tracing::warn!(%error, "preview lookup failed");
            return None;
        }
    };
    match sandbox.preview_allows(port, token) {
        Ok(true) => Some(sandbox),
        Ok(false) => None,
        Err(error) => {
            tracing::warn!(%error, "preview lookup failed");
            None
        }
    }
}

fn bad_gateway(detail: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, Code::Unavailable, detail)
}

async fn relay(
    sandbox: airlock_runtime::Sandbox,
    port: u16,
    target: String,
    mut request: Request,
    form: Form,
) -> Result<Response, ApiError> {
    let upgrade = wants_upgrade(request.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let (parts, body) = request.into_parts();
    let mut outgoing =
        axum::http::Request::builder().method(parts.method).uri(target).version(Version::HTTP_11).body(body).map_err(
            |_| ApiError::new(StatusCode::BAD_REQUEST, Code::InvalidRequest, "this request cannot be forwarded"),
        )?;
    *outgoing.headers_mut() = request_headers(&parts.headers, upgrade, form, port);

    let head = async {
        let stream = sandbox.connect_port(port).await.map_err(|error| {
            tracing::debug!(%error, "preview connect failed");
            bad_gateway(format!("nothing accepted a connection on port {port} in the sandbox"))
        })?;
        let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(MAX_UPSTREAM_HEAD_BYTES)
            .max_header_size(MAX_UPSTREAM_HEAD_BYTES)
            .max_headers(MAX_UPSTREAM_HEADERS)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|_| bad_gateway("the sandbox's port closed the connection"))?;
        tokio::spawn(
            async move {
                if let Err(error) = connection.with_upgrades().await {
                    tracing::debug!(%error, "preview connection ended");
                }
            }
            .in_current_span(),
        );
        sender.send_request(outgoing).await.map_err(|error| {
            tracing::debug!(%error, "preview exchange failed");
            bad_gateway("the sandbox's port did not answer with a valid HTTP response")
        })
    };
    let mut response = tokio::time::timeout(UPSTREAM_HEAD_TIMEOUT, head).await.map_err(|_| {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            Code::Timeout,
            format!("the sandbox's port did not answer within {} s", UPSTREAM_HEAD_TIMEOUT.as_secs()),
        )
    })??;

    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switching {
        let Some(client_upgrade) = client_upgrade else {
            return Err(bad_gateway("the sandbox's port switched protocols unasked"));
        };
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(
            async move {
                let (Ok(client), Ok(upstream)) = (client_upgrade.await, upstream_upgrade.await) else { return };
                let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
                if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                    tracing::debug!(%error, "preview upgrade pipe ended");
                }
            }
            .in_current_span(),
        );
    }
    let (parts, body) = response.into_parts();
    let mut answer = Response::new(if switching { Body::empty() } else { Body::new(body) });
    *answer.status_mut() = parts.status;
    *answer.headers_mut() = response_headers(&parts.headers, switching, form);
    Ok(answer)
}

/// Headers that belong to one hop and never pass a proxy (RFC 9110 7.6.1),
/// with the credentials a proxy must not forward.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// Whether the request asks to switch protocols (a WebSocket handshake).
fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_tokens(headers).iter().any(|token| token == "upgrade")
}

/// The header names the `Connection` header lists (lower-case).
fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|token| token.trim().to_ascii_lowercase())
        .filter(|token| !token.is_empty())
        .collect()
}

/// `headers` without the hop-by-hop ones (named in `HOP_BY_HOP` or listed in
/// `Connection`); with `upgrade`, `Connection: upgrade` and `Upgrade` kept.
fn end_to_end(headers: &HeaderMap, upgrade: bool) -> HeaderMap {
    let listed = connection_tokens(headers);
    let mut kept = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let lower = name.as_str();
        if HOP_BY_HOP.contains(&lower) || listed.iter().any(|token| token == lower) {
            continue;
        }
        kept.append(name.clone(), value.clone());
    }
    if upgrade {
        kept.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        for value in headers.get_all(header::UPGRADE) {
            kept.append(header::UPGRADE, value.clone());
        }
    }
    kept
}

/// What the sandbox sees of the client's headers: end-to-end ones, never the
/// API's credentials, never the API origin's cookies (path form), and a
/// `Host` of its own loopback port (the preview host names the token).
fn request_headers(headers: &HeaderMap, upgrade: bool, form: Form, port: u16) -> HeaderMap {
    let mut kept = end_to_end(headers, upgrade);
    kept.remove(header::AUTHORIZATION);
    if form == Form::Path {
        kept.remove(header::COOKIE);
    }
    kept.remove(header::HOST);
    if let Ok(host) = HeaderValue::from_str(&format!("localhost:{port}")) {
        kept.insert(header::HOST, host);
    }
    kept
}

/// What the client sees of the sandbox's headers: end-to-end ones; no cookie
/// set on the API's origin (path form) or, through `Domain`, beyond the
/// preview's own host.
fn response_headers(headers: &HeaderMap, switching: bool, form: Form) -> HeaderMap {
    let mut kept = end_to_end(headers, switching);
    let cookies: Vec<HeaderValue> = kept.get_all(header::SET_COOKIE).iter().cloned().collect();
    kept.remove(header::SET_COOKIE);
    if form == Form::Host {
        for cookie in cookies {
            let scoped = cookie
                .to_str()
                .map(|text| {
                    text.split(';').skip(1).any(|attribute| attribute.trim().to_ascii_lowercase().starts_with("domain"))
                })
                .unwrap_or(true);
            if !scoped {
                kept.append(header::SET_COOKIE, cookie);
            }
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_to(host: &str) -> Request {
        axum::http::Request::builder().uri("/x").header(header::HOST, host).body(Body::empty()).unwrap()
    }

    #[test]
    fn preview_hosts_are_recognised_and_others_left_to_the_api() {
        let found = preview_host(&request_to("8000-my-box-abcdef.localhost:7870"), "localhost").unwrap();
        assert_eq!(found, ("8000".into(), "my-box".into(), "abcdef".into()));
        assert!(preview_host(&request_to("localhost:7870"), "localhost").is_none());
        assert!(preview_host(&request_to("127.0.0.1:7870"), "localhost").is_none());
        assert!(preview_host(&request_to("a.8000-b-c.localhost"), "localhost").is_none());
        assert!(preview_host(&request_to("8000-b-c.evil-localhost"), "localhost").is_none());
    }

    #[test]
    fn credentials_and_hop_by_hop_headers_never_reach_the_sandbox() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer secret"));
        headers.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("Basic x"));
        headers.insert(header::COOKIE, HeaderValue::from_static("a=b"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert(header::ACCEPT, HeaderValue::from_static("text/html"));
        let sent = request_headers(&headers, false, Form::Path, 8000);
        assert!(sent.get(header::AUTHORIZATION).is_none());
        assert!(sent.get(header::PROXY_AUTHORIZATION).is_none());
        assert!(sent.get(header::COOKIE).is_none());
        assert!(sent.get("x-private").is_none());
        assert!(sent.get(header::CONNECTION).is_none());
        assert_eq!(sent[header::ACCEPT], "text/html");
        assert_eq!(sent[header::HOST], "localhost:8000");
        assert_eq!(request_headers(&headers, false, Form::Host, 8000)[header::COOKIE], "a=b");
    }

    #[test]
    fn a_sandbox_sets_no_cookie_beyond_its_own_host() {
        let mut headers = HeaderMap::new();
        headers.append(header::SET_COOKIE, HeaderValue::from_static("own=1; Path=/"));
        headers.append(header::SET_COOKIE, HeaderValue::from_static("wide=1; Domain=localhost"));
        let host: Vec<_> =
            response_headers(&headers, false, Form::Host).get_all(header::SET_COOKIE).iter().cloned().collect();
        assert_eq!(host, ["own=1; Path=/"]);
        assert!(response_headers(&headers, false, Form::Path).get(header::SET_COOKIE).is_none());
    }
}
