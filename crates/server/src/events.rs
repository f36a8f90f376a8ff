//! `GET /v1/sandboxes/{name}/events`: what happens in a sandbox, as an event
//! stream (`text/event-stream`), with keep-alive comments.
//!
//! The workspace is watched from the moment the answer's headers are sent
//! (inotify on the host, so both tiers' changes are seen). Each event is named
//! by its `type` and carries it in its JSON data too: `file` (`change`:
//! created, modified or removed; `path` relative to `/workspace`), `renamed`
//! (`from`, `to`), `process-output` (`process`, `stream`, `data` in base64),
//! `process-exited` (`process`, `code`), `lifecycle` (`change`:
//! container-started, slept, woke, destroyed), `watch-limit-reached`
//! (`limit`). A subscriber that falls behind gets a `missed` event saying how
//! many it lost. The stream ends after `destroyed`, or with an `error` event
//! when the server shuts down.

use std::convert::Infallible;

use airlock_runtime::{EventStream, Lifecycle, SandboxEvent};
use axum::Router;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures_util::Stream;
use tokio_util::sync::CancellationToken;

use crate::auth::Scope;
use crate::{ApiError, AppState, Code, SSE_KEEP_ALIVE};

/// This module's routes, merged under `/v1` by [`crate::app`].
pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/sandboxes/{name}/events", get(events))
}

async fn events(
    state: Scope,
    Path(name): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let watch = state.sandbox(&name)?.watch()?;
    Ok(stream(watch, state.shutdown().clone()))
}

/// Where an event stream is.
enum Phase {
    Watching {
        watch: Box<EventStream>,
        /// Missed events already told to the client.
        told: u64,
        /// An event to send before reading on, and whether it is the last.
        pending: Option<(Event, bool)>,
        shutdown: CancellationToken,
    },
    Done,
}

/// One sandbox event as a named event with JSON data.
fn event_of(event: &SandboxEvent) -> Event {
    let data = match event {
        // Bytes as base64 rather than an array of numbers.
        SandboxEvent::ProcessOutput { process, stream, bytes } => serde_json::json!({
            "type": "process-output", "process": process, "stream": stream, "data": BASE64.encode(bytes),
        }),
        other => serde_json::to_value(other).unwrap_or_default(),
    };
    let name = data.get("type").and_then(|kind| kind.as_str()).unwrap_or("event").to_string();
    Event::default().event(name).data(data.to_string())
}

fn stream(watch: EventStream, shutdown: CancellationToken) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let first = Phase::Watching { watch: Box::new(watch), told: 0, pending: None, shutdown };
    let stream = futures_util::stream::unfold(first, |phase| async move {
        let Phase::Watching { mut watch, told, pending, shutdown } = phase else { return None };
        if let Some((event, last)) = pending {
            let next = if last { Phase::Done } else { Phase::Watching { watch, told, pending: None, shutdown } };
            return Some((Ok(event), next));
        }
        let next = tokio::select! {
            next = watch.next() => next,
            () = shutdown.cancelled() => {
                let error = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, Code::ShuttingDown, "the server is shutting down");
                let data = serde_json::to_string(&error.problem()).unwrap_or_default();
                return Some((Ok(Event::default().event("error").data(data)), Phase::Done));
            }
        };
        // `None`: the sandbox is gone, and its events with it.
        let next = next?;
        let event = event_of(&next);
        let last = matches!(next, SandboxEvent::Lifecycle { change: Lifecycle::Destroyed });
        if watch.missed > told {
            let missed = watch.missed;
            let data = serde_json::json!({ "type": "missed", "events": missed - told });
            let notice = Event::default().event("missed").data(data.to_string());
            return Some((Ok(notice), Phase::Watching { watch, told: missed, pending: Some((event, last)), shutdown }));
        }
        let next = if last { Phase::Done } else { Phase::Watching { watch, told, pending: None, shutdown } };
        Some((Ok(event), next))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(SSE_KEEP_ALIVE))
}
