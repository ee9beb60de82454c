//! Helpers shared by the integration tests. Each test file uses a different subset of them.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Every blocking step of a test is bounded by this: a broken broker fails the test, never hangs it.
pub const STEP: Duration = Duration::from_secs(10);

/// A stream view of a socket fd for reading and writing in tests (works for seqpacket too: read and
/// write are recv and send).
pub fn stream(fd: OwnedFd) -> UnixStream {
    let s = UnixStream::from(fd);
    s.set_read_timeout(Some(STEP)).unwrap();
    s.set_write_timeout(Some(STEP)).unwrap();
    s
}

/// Reads exactly `n` bytes, failing the test after [`STEP`].
pub fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(STEP)).unwrap();
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
    buf
}

/// Sends `msg` from `a` to `b` and another one back, so the pair is shown to work both ways.
pub fn assert_both_ways(a: &mut UnixStream, b: &mut UnixStream) {
    a.write_all(b"from the restored side").unwrap();
    assert_eq!(read_n(b, 22), b"from the restored side");
    b.write_all(b"from the peer").unwrap();
    assert_eq!(read_n(a, 13), b"from the peer");
}

/// Polls `f` until it returns `Some`, for at most [`STEP`].
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether the fd has FD_CLOEXEC.
pub fn is_cloexec(fd: &OwnedFd) -> bool {
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
    nix::fcntl::FdFlag::from_bits_truncate(flags).contains(nix::fcntl::FdFlag::FD_CLOEXEC)
}
