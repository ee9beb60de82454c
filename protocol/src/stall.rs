//! A peer that keeps the link up but takes no data.
//!
//! QUIC's keep-alives hold a connection open as long as the peer's stack answers, so its idle timeout
//! never fires for a peer that acknowledges packets but stops reading a stream (a hung target agent, a
//! hostile one): flow control then blocks every write for ever. [`Watched`] wraps a stream and fails a
//! write that stays blocked for longer than a limit, so that a migration waiting on such a peer ends (and
//! rolls back) instead of keeping a frozen tree waiting.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWrite;

use crate::pages::BatchSink;

/// A stream whose writes fail once one of them has been blocked for `limit`.
pub struct Watched<'a, W> {
    inner: &'a mut W,
    limit: Duration,
    /// Since when the current write has been blocked.
    blocked: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<'a, W> Watched<'a, W> {
    pub fn new(inner: &'a mut W, limit: Duration) -> Self {
        Watched { inner, limit, blocked: None }
    }

    fn stalled(&self) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "the peer took no data for {} s although the link is up (is its agent hung or overloaded?)",
                self.limit.as_secs_f64()
            ),
        )
    }

    /// What the inner stream answered, watched: `Pending` starts the clock, or fails once it ran out;
    /// anything else stops it.
    fn watch<T>(&mut self, cx: &mut Context<'_>, inner: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if inner.is_ready() {
            self.blocked = None;
            return inner;
        }
        let limit = self.limit;
        let sleep = self.blocked.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(self.stalled())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Watched<'_, W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let inner = Pin::new(&mut *self.inner).poll_write(cx, buf);
        self.watch(cx, inner)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let inner = Pin::new(&mut *self.inner).poll_flush(cx);
        self.watch(cx, inner)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

impl<W: BatchSink + Send> BatchSink for Watched<'_, W> {
    async fn put(&mut self, parts: Vec<bytes::Bytes>) -> std::io::Result<()> {
        match tokio::time::timeout(self.limit, self.inner.put(parts)).await {
            Ok(r) => r,
            Err(_) => Err(self.stalled()),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_write_blocked_longer_than_the_limit_fails_and_one_that_moves_does_not() {
        // A pipe of 64 bytes nobody reads: the first 64 bytes go, the next write blocks.
        let (mut w, r) = tokio::io::duplex(64);
        let mut watched = Watched::new(&mut w, Duration::from_secs(3));
        watched.write_all(&[1; 64]).await.expect("fits in the pipe");
        let started = tokio::time::Instant::now();
        let e = watched.write_all(&[2; 10]).await.expect_err("nobody reads");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("took no data for 3 s"), "{e}");
        assert_eq!(started.elapsed(), Duration::from_secs(3));

        // A reader that takes 64 bytes every 2 s: each write waits, never 3 s, so 640 bytes go through.
        let (mut w, mut r2) = tokio::io::duplex(64);
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 64];
            while got < 640 {
                tokio::time::sleep(Duration::from_secs(2)).await;
                got += r2.read(&mut buf).await.expect("read");
            }
            got
        });
        let mut watched = Watched::new(&mut w, Duration::from_secs(3));
        watched.write_all(&[3; 640]).await.expect("a slow reader is no stall");
        assert_eq!(reader.await.expect("reader"), 640);
        drop(r);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_the_peer_does_not_take_fails_after_the_limit() {
        struct Stuck;
        impl BatchSink for Stuck {
            async fn put(&mut self, _: Vec<bytes::Bytes>) -> std::io::Result<()> {
                std::future::pending().await
            }
        }
        let mut stuck = Stuck;
        let e = Watched::new(&mut stuck, Duration::from_secs(5)).put(vec![]).await.expect_err("stuck");
        assert!(e.to_string().contains("took no data for 5 s"), "{e}");
        let mut v = Vec::new();
        Watched::new(&mut v, Duration::from_secs(5)).put(vec![bytes::Bytes::from_static(b"ok")]).await.expect("taken");
        assert_eq!(v, b"ok");
    }
}
