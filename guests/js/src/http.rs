//! One blocking HTTP request over wasi:http (the `wasip2` crate's bindings).
//! The host decides whether it goes anywhere: it sends it under the
//! sandbox's network policy, or refuses it with a message naming the host
//! and the policy, which is what the caller gets back as the error.

use wasip2::http::outgoing_handler;
use wasip2::http::types::{ErrorCode, Fields, Method, OutgoingBody, OutgoingRequest, Scheme};
use wasip2::io::streams::StreamError;

/// Bytes read from the response stream per call.
const READ_CHUNK: u64 = 64 * 1024;
/// Bytes written to the request stream per call (wasi:http's `blocking-write-and-flush` takes at most 4096).
const WRITE_CHUNK: usize = 4096;

pub struct Fetched {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The text of a wasi:http error: the host's own message when it gave one.
pub fn error_text(code: &ErrorCode) -> String {
    match code {
        ErrorCode::InternalError(Some(message)) => message.clone(),
        other => format!("{other:?}"),
    }
}

fn method_of(method: &str) -> Method {
    match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "OPTIONS" => Method::Options,
        "PATCH" => Method::Patch,
        "TRACE" => Method::Trace,
        "CONNECT" => Method::Connect,
        other => Method::Other(other.to_string()),
    }
}

/// Splits an absolute URL into scheme, authority and path-with-query.
fn split_url(url: &str) -> Result<(Scheme, &str, String), String> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| format!("{url:?} is not an absolute http(s) URL"))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => return Err(format!("unsupported URL scheme {other:?} (http and https only)")),
    };
    let rest = rest.split('#').next().unwrap_or_default();
    let (authority, path) = match rest.find(['/', '?']) {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("{url:?} names no host"));
    }
    let path = if path.starts_with('?') { format!("/{path}") } else { path.to_string() };
    Ok((scheme, authority, path))
}

/// Sends one request and reads its whole response.
pub fn fetch(url: &str, method: &str, headers: &[(String, String)], body: Option<&[u8]>) -> Result<Fetched, String> {
    let (scheme, authority, path) = split_url(url)?;
    let fields = Fields::new();
    for (name, value) in headers {
        fields.append(name, value.as_bytes()).map_err(|e| format!("header {name:?}: {e:?}"))?;
    }
    if let Some(body) = body
        && !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("content-length"))
    {
        // A known length, so the request is not sent chunked.
        fields
            .append("content-length", body.len().to_string().as_bytes())
            .map_err(|e| format!("content-length: {e:?}"))?;
    }
    let request = OutgoingRequest::new(fields);
    request.set_method(&method_of(method)).map_err(|()| format!("invalid method {method:?}"))?;
    request.set_scheme(Some(&scheme)).map_err(|()| "invalid scheme".to_string())?;
    request.set_authority(Some(authority)).map_err(|()| format!("invalid host {authority:?}"))?;
    request.set_path_with_query(Some(&path)).map_err(|()| format!("invalid path {path:?}"))?;
    let outgoing = request.body().map_err(|()| "the request body is unavailable".to_string())?;
    let pending = outgoing_handler::handle(request, None).map_err(|e| error_text(&e))?;
    if let Some(body) = body {
        let stream = outgoing.write().map_err(|()| "the request body is unavailable".to_string())?;
        for chunk in body.chunks(WRITE_CHUNK) {
            stream.blocking_write_and_flush(chunk).map_err(|e| stream_text(&e))?;
        }
        drop(stream);
    }
    OutgoingBody::finish(outgoing, None).map_err(|e| error_text(&e))?;
    let response = loop {
        match pending.get() {
            Some(answer) => break answer,
            None => pending.subscribe().block(),
        }
    };
    let response = response.map_err(|()| "the response was already taken".to_string())?.map_err(|e| error_text(&e))?;
    let status = response.status();
    let headers = response
        .headers()
        .entries()
        .into_iter()
        .map(|(name, value)| (name, String::from_utf8_lossy(&value).into_owned()))
        .collect();
    let incoming = response.consume().map_err(|()| "the response body is unavailable".to_string())?;
    let stream = incoming.stream().map_err(|()| "the response body is unavailable".to_string())?;
    let mut body = Vec::new();
    loop {
        match stream.blocking_read(READ_CHUNK) {
            Ok(chunk) => body.extend_from_slice(&chunk),
            Err(StreamError::Closed) => break,
            Err(error) => return Err(stream_text(&error)),
        }
    }
    Ok(Fetched { status, headers, body })
}

fn stream_text(error: &StreamError) -> String {
    match error {
        StreamError::Closed => "the stream closed".to_string(),
        StreamError::LastOperationFailed(error) => match wasip2::http::types::http_error_code(error) {
            Some(code) => error_text(&code),
            None => error.to_debug_string(),
        },
    }
}
