//! CPU time actually used by a run.
//!
//! An isolate runs as a future that may move between worker threads, so CPU
//! time is measured per poll, as the calling thread's CPU clock before and
//! after, and summed. Work WASI hands to blocking threads (file I/O) is not
//! counted; it is small next to guest compute.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use rustix::time::{ClockId, clock_gettime};

fn thread_cpu_now() -> Duration {
    let ts = clock_gettime(ClockId::ThreadCPUTime);
    Duration::new(u64::try_from(ts.tv_sec).unwrap_or(0), u32::try_from(ts.tv_nsec).unwrap_or(0))
}

/// Wraps a future and adds up the thread CPU time spent inside its polls.
pub(crate) struct Metered<F> {
    inner: Pin<Box<F>>,
    cpu: Duration,
}

impl<F: Future> Metered<F> {
    pub(crate) fn new(inner: F) -> Self {
        Self { inner: Box::pin(inner), cpu: Duration::ZERO }
    }
}

impl<F> Metered<F> {
    /// CPU time used so far (for a run cut off before it finished).
    pub(crate) fn cpu(&self) -> Duration {
        self.cpu
    }
}

impl<F: Future> Future for Metered<F> {
    type Output = (F::Output, Duration);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let start = thread_cpu_now();
        let polled = self.inner.as_mut().poll(cx);
        let used = thread_cpu_now().saturating_sub(start);
        self.cpu += used;
        polled.map(|output| (output, self.cpu))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_busy_polls_and_not_sleeps() {
        let ((), busy) = Metered::new(async {
            // Spin until this thread has used 50 ms of CPU, however busy the machine is.
            let start = thread_cpu_now();
            let mut x = 0u64;
            while thread_cpu_now() - start < Duration::from_millis(50) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        })
        .await;
        assert!(busy >= Duration::from_millis(50), "busy loop billed {busy:?}");

        let ((), idle) = Metered::new(tokio::time::sleep(Duration::from_millis(50))).await;
        assert!(idle < Duration::from_millis(10), "sleep billed {idle:?}");
    }
}
