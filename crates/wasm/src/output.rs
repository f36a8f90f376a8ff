//! Captured guest output with a byte cap.
//!
//! The guest's stdout and stderr go into a buffer of at most the output cap.
//! A write that would pass the cap keeps the bytes that fit, marks the stream
//! truncated and traps the guest with [`OutputCapHit`]: an output flood is a
//! limit hit, stopped at once rather than left to spin until its deadline.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use airlock_core::{OutputChunk, OutputSender, OutputStream as StreamName};
use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

/// Largest write permit handed to the guest at once. Bounds one host-side copy.
const WRITE_PERMIT: usize = 64 * 1024;

/// The error a guest traps with when it writes past the output cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{stream} passed the output cap")]
pub(crate) struct OutputCapHit {
    pub(crate) stream: StreamName,
}

#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    truncated: bool,
    /// Shared with every clone, so a pipe the guest already writes to can be
    /// given another cap (a context made ahead, then bound to a caller's limits).
    cap: usize,
    /// Where accepted bytes also go as they are written; shared like the cap,
    /// so a context's pipes stream to each evaluation's own caller.
    sender: Option<OutputSender>,
}

impl std::fmt::Debug for CapturePipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CapturePipe").field("stream", &self.stream).finish_non_exhaustive()
    }
}

/// One captured stream. Clones share the buffer, so the host keeps a handle
/// while the guest's WASI context owns another.
#[derive(Clone)]
pub(crate) struct CapturePipe {
    stream: StreamName,
    captured: Arc<Mutex<Captured>>,
}

impl CapturePipe {
    pub(crate) fn new(stream: StreamName, cap: u64, sender: Option<OutputSender>) -> Self {
        let cap = usize::try_from(cap).unwrap_or(usize::MAX);
        Self { stream, captured: Arc::new(Mutex::new(Captured { cap, sender, ..Captured::default() })) }
    }

    /// Sets where what is written from now on is streamed (none: only captured).
    pub(crate) fn set_sender(&self, sender: Option<OutputSender>) {
        self.lock().sender = sender;
    }

    /// Sets the cap for what is written from now on.
    pub(crate) fn set_cap(&self, cap: u64) {
        self.lock().cap = usize::try_from(cap).unwrap_or(usize::MAX);
    }

    fn lock(&self) -> MutexGuard<'_, Captured> {
        // A poisoned lock only means a writer panicked mid-append; the bytes are still valid.
        self.captured.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends what fits; reports whether everything did.
    fn append(&self, bytes: &[u8]) -> Result<(), OutputCapHit> {
        let mut captured = self.lock();
        let room = captured.cap.saturating_sub(captured.bytes.len());
        let taken = &bytes[..bytes.len().min(room)];
        captured.bytes.extend_from_slice(taken);
        if taken.len() < bytes.len() {
            captured.truncated = true;
        }
        let sender = if taken.is_empty() { None } else { captured.sender.clone() };
        drop(captured);
        if let Some(sender) = sender {
            sender(OutputChunk { stream: self.stream, bytes: taken.to_vec() });
        }
        if taken.len() < bytes.len() { Err(OutputCapHit { stream: self.stream }) } else { Ok(()) }
    }

    /// The captured bytes and whether any were dropped, leaving the pipe empty
    /// (a context's next evaluation gets the whole cap again).
    pub(crate) fn take(&self) -> (Vec<u8>, bool) {
        let mut captured = self.lock();
        (std::mem::take(&mut captured.bytes), std::mem::take(&mut captured.truncated))
    }
}

impl IsTerminal for CapturePipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturePipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CapturePipe {
    async fn ready(&mut self) {}
}

impl OutputStream for CapturePipe {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes).map_err(|hit| StreamError::Trap(wasmtime::Error::new(hit)))
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Always grant a permit: a write past the cap must reach `write` to be
        // reported, rather than leave the guest waiting for room forever.
        Ok(WRITE_PERMIT)
    }
}

impl tokio::io::AsyncWrite for CapturePipe {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Poll::Ready(match self.append(buf) {
            Ok(()) => Ok(buf.len()),
            Err(hit) => Err(std::io::Error::other(hit)),
        })
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_fits_and_flags_the_rest() {
        let pipe = CapturePipe::new(StreamName::Stdout, 5, None);
        assert_eq!(pipe.append(b"abc"), Ok(()));
        assert_eq!(pipe.append(b"defg"), Err(OutputCapHit { stream: StreamName::Stdout }));
        assert_eq!(pipe.take(), (b"abcde".to_vec(), true));
    }

    #[test]
    fn exactly_the_cap_is_not_truncated() {
        let pipe = CapturePipe::new(StreamName::Stderr, 3, None);
        assert_eq!(pipe.append(b"abc"), Ok(()));
        assert_eq!(pipe.take(), (b"abc".to_vec(), false));
    }

    #[test]
    fn streams_accepted_bytes_to_the_sender() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let sender: OutputSender = Arc::new(move |chunk: OutputChunk| sink.lock().unwrap().push(chunk));
        let pipe = CapturePipe::new(StreamName::Stdout, 4, Some(sender));
        pipe.append(b"ab").unwrap();
        let _ = pipe.append(b"cdef");
        let chunks: Vec<Vec<u8>> = seen.lock().unwrap().iter().map(|c| c.bytes.clone()).collect();
        assert_eq!(chunks, vec![b"ab".to_vec(), b"cd".to_vec()]);
    }

    #[test]
    fn a_sender_set_later_reaches_every_clone_and_can_be_removed() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let sender: OutputSender = Arc::new(move |chunk: OutputChunk| sink.lock().unwrap().push(chunk.bytes));
        let pipe = CapturePipe::new(StreamName::Stdout, 100, None);
        let guest_side = pipe.clone();
        guest_side.append(b"before").unwrap();
        pipe.set_sender(Some(sender));
        guest_side.append(b"during").unwrap();
        pipe.set_sender(None);
        guest_side.append(b"after").unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![b"during".to_vec()]);
        assert_eq!(pipe.take().0, b"beforeduringafter".to_vec());
    }
}
