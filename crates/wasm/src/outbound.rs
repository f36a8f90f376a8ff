//! Outbound HTTP from isolates: `wasi:http/outgoing-handler`, with every
//! request handed to an [`OutboundHttp`] hook that the embedder supplies
//! (the runtime's sends it through its egress policy, credential injection
//! and internal-address refusal). This crate never dials anything itself:
//! with no hook, every request fails with an error naming the host and the
//! deny-all policy.
//!
//! The hook's response is bounded here, whatever the hook does: at most
//! [`OutboundLimits::max_response_bytes`] of body, at most
//! [`OutboundLimits::request_time`] from sending to the body's last byte, and
//! at most [`OutboundLimits::max_in_flight`] requests of one store open at once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime_wasi_http::{RequestOptions, WasiBody, WasiHttpHooks};

use crate::interpreter::record::SideEffectLog;

/// An error of a request or response body crossing the hook.
pub type OutboundBodyError = Box<dyn std::error::Error + Send + Sync>;

/// A body crossing the hook, in either direction.
pub type OutboundBody = UnsyncBoxBody<Bytes, OutboundBodyError>;

/// The future a hook returns.
pub type OutboundFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<OutboundBody>, OutboundRefused>> + Send + 'static>>;

/// Why a hook sent nothing or got no answer. Its text is shown to the guest
/// as is, so it must name the host and the policy and hold no secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OutboundRefused(pub String);

/// Sends an isolate's outbound HTTP request. The request's URI is absolute
/// (`http://` or `https://`); its `Host` header agrees with it.
pub trait OutboundHttp: Send + Sync + std::fmt::Debug + 'static {
    /// Sends `request` and answers its response, streamed, or a refusal.
    fn send(&self, request: http::Request<OutboundBody>) -> OutboundFuture;
}

/// Largest response body an isolate receives from one request (16 MiB):
/// bounds what one request can make the host hold or relay for a guest.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 16 * 1024 * 1024;

/// Longest one outbound request may take from sending to its body's last
/// byte (30 s): bounds the host connection a guest keeps open by not reading.
/// The run's own deadline still ends the run first when it is shorter.
pub const DEFAULT_REQUEST_TIME: Duration = Duration::from_secs(30);

/// Requests one isolate (one store) may have open at once (8): bounds the
/// connections and host tasks a guest opening requests in a loop can hold.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 8;

/// The bounds on an isolate's outbound HTTP. Defaults: the constants above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutboundLimits {
    /// Default [`DEFAULT_MAX_RESPONSE_BYTES`].
    pub max_response_bytes: u64,
    /// Default [`DEFAULT_REQUEST_TIME`].
    pub request_time: Duration,
    /// Default [`DEFAULT_MAX_IN_FLIGHT`].
    pub max_in_flight: usize,
}

impl Default for OutboundLimits {
    fn default() -> Self {
        Self {
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            request_time: DEFAULT_REQUEST_TIME,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

/// A hook with the limits it runs under: what a run or context is given to
/// let its guest make outbound HTTP requests.
#[derive(Debug, Clone)]
pub struct Outbound {
    sender: Arc<dyn OutboundHttp>,
    limits: OutboundLimits,
}

impl Outbound {
    pub fn new(sender: Arc<dyn OutboundHttp>) -> Self {
        Self { sender, limits: OutboundLimits::default() }
    }

    pub fn with_limits(mut self, limits: OutboundLimits) -> Self {
        self.limits = limits;
        self
    }

    pub fn limits(&self) -> OutboundLimits {
        self.limits
    }
}

/// The `wasi:http` hooks of one store: its hook (or none), the permits
/// for its requests in flight, and where the requests it hands to the hook
/// are recorded as side effects of the evaluation under way.
pub(crate) struct IsolateHttp {
    outbound: Option<Outbound>,
    in_flight: Arc<Semaphore>,
    effects: SideEffectLog,
}

impl std::fmt::Debug for IsolateHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IsolateHttp").field("hooked", &self.outbound.is_some()).finish_non_exhaustive()
    }
}

impl IsolateHttp {
    pub(crate) fn new(outbound: Option<Outbound>, effects: SideEffectLog) -> Self {
        let limits = outbound.as_ref().map(Outbound::limits).unwrap_or_default();
        Self { outbound, in_flight: Arc::new(Semaphore::new(limits.max_in_flight)), effects }
    }
}

type SendResult = wasmtime_wasi_http::Result<(
    http::Response<WasiBody>,
    Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
)>;

/// An error the guest reads as text (`internal-error(some(text))`).
fn guest_error(text: String) -> wasmtime_wasi_http::Error {
    wasmtime_wasi_http::Error::InternalError(Some(text))
}

/// The host a request names, for messages.
fn host_of(request: &http::Request<WasiBody>) -> String {
    request.uri().authority().map_or_else(|| "(no host)".to_string(), |a| a.as_str().to_string())
}

impl WasiHttpHooks for IsolateHttp {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        _options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        let host = host_of(&request);
        let Some(outbound) = self.outbound.clone() else {
            return Box::new(async move {
                Err(guest_error(format!(
                    "egress to {host} refused: no network policy applies to this isolate (deny-all); \
                     run it in a sandbox whose network policy allows {host}"
                )))
            });
        };
        let limits = outbound.limits;
        let permit = match self.in_flight.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                return Box::new(async move {
                    Err(guest_error(format!(
                        "egress to {host} refused: this isolate already has {} requests open (the limit); \
                         read or drop a response first",
                        limits.max_in_flight
                    )))
                });
            }
        };
        // Recorded as it is handed to the hook, whatever the hook answers: a
        // refusal or a failure may come after the request went out, and a
        // request counted that was not sent costs less than one sent twice.
        // Refused above, it went nowhere and is not recorded.
        self.effects.request(request.method().as_str(), &request.uri().to_string());
        Box::new(async move {
            let deadline = tokio::time::Instant::now() + limits.request_time;
            let request = request.map(|body| body.map_err(|e| Box::new(e) as OutboundBodyError).boxed_unsync());
            let sent = tokio::time::timeout_at(deadline, outbound.sender.send(request)).await;
            let response = match sent {
                Ok(Ok(response)) => response,
                Ok(Err(refused)) => return Err(guest_error(refused.0)),
                Err(_) => {
                    return Err(guest_error(format!(
                        "egress to {host} timed out: no response within the isolate's limit of {:?}",
                        limits.request_time
                    )));
                }
            };
            let response = response.map(|body| {
                Capped {
                    inner: body,
                    seen: 0,
                    max: limits.max_response_bytes,
                    deadline: Box::pin(tokio::time::sleep_until(deadline)),
                    request_time: limits.request_time,
                    host,
                    done: false,
                    _permit: permit,
                }
                .boxed_unsync()
            });
            let io: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send> = Box::new(async { Ok(()) });
            Ok((response, io))
        })
    }
}

/// A response body cut off at the size cap or the request's deadline, holding
/// its request's in-flight permit until it ends or is dropped.
struct Capped {
    inner: OutboundBody,
    seen: u64,
    max: u64,
    deadline: Pin<Box<tokio::time::Sleep>>,
    request_time: Duration,
    host: String,
    done: bool,
    _permit: OwnedSemaphorePermit,
}

impl Body for Capped {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            this.done = true;
            return Poll::Ready(Some(Err(guest_error(format!(
                "egress to {} timed out: the response did not end within the isolate's limit of {:?}",
                this.host, this.request_time
            )))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen = this.seen.saturating_add(data.len() as u64);
                    if this.seen > this.max {
                        this.done = true;
                        return Poll::Ready(Some(Err(guest_error(format!(
                            "response from {} is larger than the isolate's limit of {} bytes \
                             (max response body size)",
                            this.host, this.max
                        )))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                this.done = true;
                Poll::Ready(Some(Err(guest_error(format!("response from {} failed: {error}", this.host)))))
            }
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Empty, Full};

    use super::*;

    /// A hook answering every request with `size` bytes, counting what it was asked.
    #[derive(Debug, Default)]
    struct Answering {
        size: usize,
        asked: AtomicUsize,
    }

    impl OutboundHttp for Answering {
        fn send(&self, _request: http::Request<OutboundBody>) -> OutboundFuture {
            self.asked.fetch_add(1, Ordering::SeqCst);
            let body = Full::new(Bytes::from(vec![b'x'; self.size])).map_err(|never| match never {}).boxed_unsync();
            Box::pin(async move { Ok(http::Response::new(body)) })
        }
    }

    fn request() -> http::Request<WasiBody> {
        let body = Empty::<Bytes>::new().map_err(|never| match never {}).boxed_unsync();
        http::Request::builder().uri("http://api.test:8080/x").body(body).unwrap()
    }

    async fn send(hooks: &mut IsolateHttp) -> wasmtime_wasi_http::Result<http::Response<WasiBody>> {
        let sent = Pin::from(hooks.send_request(request(), None, Box::new(async { Ok(()) }))).await;
        sent.map(|(response, _io)| response)
    }

    fn text(error: wasmtime_wasi_http::Error) -> String {
        match error {
            wasmtime_wasi_http::Error::InternalError(Some(text)) => text,
            other => panic!("not a message for the guest: {other:?}"),
        }
    }

    #[tokio::test]
    async fn without_a_hook_every_request_is_refused_naming_the_host() {
        let message = text(send(&mut IsolateHttp::new(None, SideEffectLog::default())).await.err().unwrap());
        assert!(message.contains("api.test:8080") && message.contains("deny-all"), "{message}");
    }

    #[tokio::test]
    async fn requests_handed_to_the_hook_are_recorded_and_refused_ones_are_not() {
        let effects = SideEffectLog::default();
        let _ = send(&mut IsolateHttp::new(None, effects.clone())).await;
        let mut outcome = airlock_core::EvalOutcome {
            result: airlock_core::EvalResult::Ok { value: None },
            stdout: Vec::new(),
            stderr: Vec::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            wall_time: Duration::ZERO,
            cpu_time: Duration::ZERO,
            displays: Vec::new(),
            displays_truncated: false,
            side_effects: Vec::new(),
            side_effects_truncated: false,
        };
        let mut record = crate::interpreter::record::EvalRecord::default();
        record.effects = effects.clone();
        record.drain_into(&mut outcome);
        assert!(outcome.side_effects.is_empty(), "a request refused without a hook went nowhere");
        let hook = Arc::new(Answering { size: 1, ..Answering::default() });
        let mut hooks = IsolateHttp::new(Some(Outbound::new(hook)), effects.clone());
        let _ = send(&mut hooks).await.unwrap();
        record.drain_into(&mut outcome);
        assert_eq!(
            outcome.side_effects,
            vec![airlock_core::SideEffect::Request { method: "GET".into(), url: "http://api.test:8080/x".into() }]
        );
    }

    #[tokio::test]
    async fn a_body_past_the_cap_ends_in_an_error_naming_the_limit() {
        let hook = Arc::new(Answering { size: 1025, ..Answering::default() });
        let limits = OutboundLimits { max_response_bytes: 1024, ..OutboundLimits::default() };
        let mut hooks =
            IsolateHttp::new(Some(Outbound::new(hook.clone()).with_limits(limits)), SideEffectLog::default());
        let body = send(&mut hooks).await.unwrap().into_body();
        let message = text(body.collect().await.err().unwrap());
        assert!(message.contains("limit of 1024 bytes") && message.contains("api.test:8080"), "{message}");
        // One at the cap passes whole.
        let limits = OutboundLimits { max_response_bytes: 1025, ..OutboundLimits::default() };
        let mut hooks = IsolateHttp::new(Some(Outbound::new(hook).with_limits(limits)), SideEffectLog::default());
        let body = send(&mut hooks).await.unwrap().into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), 1025);
    }

    #[tokio::test]
    async fn requests_past_the_in_flight_cap_are_refused_until_a_body_is_dropped() {
        let hook = Arc::new(Answering { size: 10, ..Answering::default() });
        let limits = OutboundLimits { max_in_flight: 2, ..OutboundLimits::default() };
        let mut hooks =
            IsolateHttp::new(Some(Outbound::new(hook.clone()).with_limits(limits)), SideEffectLog::default());
        let first = send(&mut hooks).await.unwrap();
        let _second = send(&mut hooks).await.unwrap();
        let message = text(send(&mut hooks).await.err().unwrap());
        assert!(message.contains("2 requests open"), "{message}");
        assert_eq!(hook.asked.load(Ordering::SeqCst), 2, "the refused request never reached the hook");
        drop(first);
        assert!(send(&mut hooks).await.is_ok());
    }

    #[tokio::test]
    async fn a_response_that_does_not_end_in_time_is_cut_off() {
        #[derive(Debug)]
        struct Stalling;
        impl OutboundHttp for Stalling {
            fn send(&self, _request: http::Request<OutboundBody>) -> OutboundFuture {
                let body = http_body_util::StreamBody::new(futures_util::stream::pending::<
                    Result<Frame<Bytes>, OutboundBodyError>,
                >())
                .boxed_unsync();
                Box::pin(async move { Ok(http::Response::new(body)) })
            }
        }
        let limits = OutboundLimits { request_time: Duration::from_millis(200), ..OutboundLimits::default() };
        let mut hooks =
            IsolateHttp::new(Some(Outbound::new(Arc::new(Stalling)).with_limits(limits)), SideEffectLog::default());
        let body = send(&mut hooks).await.unwrap().into_body();
        // Ends at the request's time, not never (a generous bound).
        let ended = tokio::time::timeout(Duration::from_secs(5), body.collect()).await.expect("cut off");
        let message = text(ended.err().unwrap());
        assert!(message.contains("timed out") && message.contains("200ms"), "{message}");
    }
}
