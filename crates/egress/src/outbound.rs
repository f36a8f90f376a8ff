//! Outbound HTTP decided by the same policy, for callers that are not a
//! container on a proxy socket: the isolate tier's outbound HTTP hook hands
//! one request in and gets one response (or a typed refusal) out.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use airlock_core::network::{self as policy_net, NetworkPolicy};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;

use crate::io::{AbortOnDrop, BoxError, CountedBody};
use crate::proxy::{Failure, Report, Target, dial, set_rule_headers, strip_hop_by_hop, upstream_http};
use crate::{Decision, Denial, Egress, Verdict};

/// A response body from [`Egress::send_request`], streamed from upstream.
pub type OutboundBody = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Why [`Egress::send_request`] sent nothing or got no answer. Never holds a
/// secret value. The `Display` text is fit for the guest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboundError {
    #[error("egress to {host}:{port} refused: {denial}")]
    Denied { host: String, port: u16, denial: Denial },
    #[error("bad outbound request: {0}")]
    BadRequest(&'static str),
    #[error("egress to {host}:{port} failed: {reason}")]
    Upstream { host: String, port: u16, reason: String },
    #[error("egress to {host}:{port} timed out: {reason}")]
    Timeout { host: String, port: u16, reason: String },
}

impl Egress {
    /// Sends one request for sandbox `sandbox` under `policy`, exactly as the
    /// proxy would: `request`'s URI must be absolute (`http://` or
    /// `https://`); it is decided on host, port and method; hop-by-hop
    /// headers are removed and the rule's headers set from their secrets;
    /// the proxy resolves and dials (internal addresses refused unless the
    /// rule names them), over verified TLS for `https://`. The decision goes
    /// to the sink (an allowed one when the response body ends or is
    /// dropped). Bounding the response's size and total time is the caller's
    /// business; the wait for its head is bounded by the response timeout.
    pub async fn send_request<B>(
        &self,
        sandbox: &str,
        policy: &NetworkPolicy,
        request: Request<B>,
    ) -> Result<Response<OutboundBody>, OutboundError>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let uri = request.uri();
        let (tls, authority) = match (uri.scheme_str(), uri.authority()) {
            (Some(scheme), Some(authority)) if scheme.eq_ignore_ascii_case("http") => (false, authority.clone()),
            (Some(scheme), Some(authority)) if scheme.eq_ignore_ascii_case("https") => (true, authority.clone()),
            _ => return Err(OutboundError::BadRequest("the URL must be absolute, http:// or https://")),
        };
        let raw_host = authority.host();
        let target = Target {
            host: policy_net::normalize_host(raw_host).unwrap_or_else(|| raw_host.to_ascii_lowercase()),
            port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            tls,
        };
        let method = request.method().as_str().to_owned();
        let decision = |verdict: Verdict| Decision {
            sandbox: sandbox.to_owned(),
            host: target.host.clone(),
            port: target.port,
            method: Some(method.clone()),
            verdict,
            status: None,
            bytes_up: 0,
            bytes_down: 0,
            terminated_tls: false,
        };
        let fail = |failure: Failure| {
            let (verdict, error) = match failure {
                Failure::Denied(denial) => (
                    Verdict::Denied(denial.clone()),
                    OutboundError::Denied { host: target.host.clone(), port: target.port, denial },
                ),
                Failure::BadGateway(reason) => {
                    (Verdict::Allowed, OutboundError::Upstream { host: target.host.clone(), port: target.port, reason })
                }
                Failure::Timeout(reason) => {
                    (Verdict::Allowed, OutboundError::Timeout { host: target.host.clone(), port: target.port, reason })
                }
            };
            let decision = decision(verdict);
            crate::proxy::log_decision(&decision);
            self.inner.sink.record(decision);
            error
        };
        let rule = match policy.decide(&target.host, target.port, Some(&method)) {
            policy_net::Verdict::Allow(rule) => rule.clone(),
            policy_net::Verdict::Deny(reason) => return Err(fail(Failure::Denied(Denial::Policy(reason)))),
        };

        let (mut parts, body) = request.into_parts();
        if let Some(host) = parts.headers.get(header::HOST) {
            let agrees = host.to_str().is_ok_and(|value| crate::proxy::authority_matches(value, &target));
            if !agrees {
                return Err(fail(Failure::Denied(Denial::BadRequest)));
            }
        }
        strip_hop_by_hop(&mut parts.headers);
        set_rule_headers(&mut parts.headers, &rule, self.inner.secrets.as_ref()).map_err(&fail)?;
        let host =
            HeaderValue::from_str(&target.host_header()).map_err(|_| fail(Failure::Denied(Denial::BadRequest)))?;
        parts.headers.insert(header::HOST, host);
        let path = parts.uri.path_and_query().map_or("/", |path| path.as_str());
        parts.uri = path.parse::<Uri>().map_err(|_| fail(Failure::Denied(Denial::BadRequest)))?;
        parts.version = Version::HTTP_11;

        let stream = dial(&self.inner, &target, &rule).await.map_err(&fail)?;
        let (mut sender, driver) = upstream_http(&self.inner, &target, stream).await.map_err(&fail)?;
        let driver = AbortOnDrop(driver);
        let up = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicU64::new(0));
        let request = Request::from_parts(parts, CountedBody::new(body, up.clone()).boxed_unsync());
        let timeout = self.inner.config.response_timeout;
        let response = match tokio::time::timeout(timeout, sender.send_request(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => return Err(fail(Failure::BadGateway(format!("upstream request failed: {error}")))),
            Err(_) => return Err(fail(Failure::Timeout(format!("no response within {timeout:?}")))),
        };
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let mut allowed = decision(Verdict::Allowed);
        allowed.status = Some(parts.status.as_u16());
        let report = Report { sink: self.inner.sink.clone(), decision: Some(allowed), up, down: down.clone() };
        // The connection's task lives as long as the body; the report fires first.
        let guard: Box<dyn Send + Sync> = Box::new((report, driver));
        Ok(Response::from_parts(parts, CountedBody::with_guard(body, down, guard).boxed_unsync()))
    }
}
