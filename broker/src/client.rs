//! The agent side: one blocking request to a broker.

use std::io::{self, ErrorKind};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, SockFlag, SockaddrLike, SockaddrStorage, UnixAddr, connect, getpeername, getsockname, getsockopt,
    socket, sockopt,
};

use crate::{Answer, AnswerJson, BrokerError, MAX_FRAME, Request, RequestJsonOut, VERSION, sys, unix_addr};

/// Asks the broker at `path` for a socket replacing `req.socket_ino`, waiting at most `timeout` for the
/// whole exchange. A refusal is `Ok(Answer::Refused)`: the broker worked and said no. The socket of
/// `Answer::Socket` has been checked to be a connected `AF_UNIX` socket of `req.sock_type`, and is
/// close-on-exec.
///
/// Blocks the calling thread (use `spawn_blocking` from async code).
pub fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Answer, BrokerError> {
    let invalid = |what: String| BrokerError::InvalidRequest { ino: req.socket_ino, what };
    req.check().map_err(invalid)?;
    let out = RequestJsonOut { version: VERSION, req, queued_len: req.queued.len() as u64 };
    let body = serde_json::to_vec(&out).map_err(|e| invalid(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(invalid(format!("its request frame is {} bytes, over the limit of {MAX_FRAME}", body.len())));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);

    let c = Conn { path, deadline: Instant::now() + timeout, timeout };
    let stream = c.connect()?;
    match c.send(&stream, &frame).and_then(|()| c.send(&stream, &req.queued)) {
        Ok(()) => {}
        // The broker may refuse before reading everything (a frame over its limit) and close; its
        // refusal is then waiting to be read, and says more than EPIPE.
        Err(BrokerError::Io { source, .. })
            if matches!(source.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {}
        Err(e) => return Err(e),
    }
    c.read_answer(&stream, req)
}

/// One exchange with a broker: where, and until when.
struct Conn<'a> {
    path: &'a Path,
    deadline: Instant,
    timeout: Duration,
}

impl Conn<'_> {
    fn timed_out(&self, during: &'static str) -> BrokerError {
        BrokerError::Timeout { path: self.path.to_owned(), during, timeout: self.timeout }
    }

    /// Time left, or the timeout error naming the step.
    fn remaining(&self, during: &'static str) -> Result<Duration, BrokerError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() { Err(self.timed_out(during)) } else { Ok(left) }
    }

    fn io(&self, during: &'static str, source: io::Error) -> BrokerError {
        if matches!(source.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
            return self.timed_out(during);
        }
        BrokerError::Io { path: self.path.to_owned(), during, source }
    }

    /// `connect(2)` to a unix stream listener only blocks while its backlog is full, and then as long as
    /// `SO_SNDTIMEO` allows (`unix_stream_connect` waits with the send timeout, then fails with EAGAIN):
    /// that bounds it without making the socket non-blocking.
    fn connect(&self) -> Result<UnixStream, BrokerError> {
        const DURING: &str = "accept the connection";
        let connect_err = |source: io::Error| BrokerError::Connect { path: self.path.to_owned(), source };
        let addr: UnixAddr = unix_addr(self.path).map_err(connect_err)?;
        let fd = socket(AddressFamily::Unix, nix::sys::socket::SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
            .map_err(|e| connect_err(e.into()))?;
        let stream = UnixStream::from(fd);
        loop {
            let left = self.remaining(DURING)?;
            stream.set_write_timeout(Some(left)).map_err(|e| self.io(DURING, e))?;
            match connect(stream.as_raw_fd(), &addr) {
                Ok(()) => return Ok(stream),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Err(self.timed_out(DURING)),
                Err(e) => return Err(connect_err(e.into())),
            }
        }
    }

    fn send(&self, stream: &UnixStream, buf: &[u8]) -> Result<(), BrokerError> {
        const DURING: &str = "take the request";
        if buf.is_empty() {
            return Ok(());
        }
        stream.set_write_timeout(Some(self.remaining(DURING)?)).map_err(|e| self.io(DURING, e))?;
        sys::send_all(stream.as_fd(), buf, None).map_err(|e| self.io(DURING, e))
    }

    /// Fills `buf`, gathering any fds that come along into `fds`. Returns how many bytes came before
    /// the end of the stream (less than `buf.len()` only when it ended).
    fn recv(&self, stream: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<usize, BrokerError> {
        const DURING: &str = "answer";
        let mut got = 0;
        while got < buf.len() {
            stream.set_read_timeout(Some(self.remaining(DURING)?)).map_err(|e| self.io(DURING, e))?;
            match sys::recv_with_fds(stream.as_fd(), &mut buf[got..], fds) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => return Err(self.io(DURING, e)),
            }
        }
        Ok(got)
    }

    fn read_answer(&self, stream: &UnixStream, req: &Request) -> Result<Answer, BrokerError> {
        let malformed = |what: String| BrokerError::Malformed { path: self.path.to_owned(), what };
        // Every fd received is owned here from the start, so any error return closes them all.
        let mut fds = Vec::new();
        let mut len = [0u8; 4];
        match self.recv(stream, &mut len, &mut fds)? {
            0 => return Err(BrokerError::NoAnswer { path: self.path.to_owned() }),
            4 => {}
            n => return Err(malformed(format!("the connection closed after {n} bytes of the frame length"))),
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(malformed(format!("a frame of {len} bytes, over the limit of {MAX_FRAME}")));
        }
        let mut body = vec![0u8; len];
        let got = self.recv(stream, &mut body, &mut fds)?;
        if got < len {
            return Err(malformed(format!("the connection closed after {got} of the frame's {len} bytes")));
        }
        // The version first: another version's answer may not parse as ours.
        let value: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| malformed(format!("not JSON: {e}")))?;
        let version = value.get("version").and_then(|v| v.as_u64());
        match version {
            Some(v) if v == u64::from(VERSION) => {}
            Some(got) => return Err(BrokerError::Version { path: self.path.to_owned(), got }),
            None => return Err(malformed("no version number".into())),
        }
        let json: AnswerJson =
            serde::Deserialize::deserialize(&value).map_err(|e| malformed(format!("bad fields: {e}")))?;
        if !json.ok {
            let reason = json.reason.ok_or_else(|| malformed("ok:false without a reason".into()))?;
            if !fds.is_empty() {
                // The refusal is what matters to the operator; the stray fds are closed here.
                tracing::warn!(broker = %self.path.display(), count = fds.len(), "the broker's refusal came with fds; closed them");
            }
            return Ok(Answer::Refused { reason });
        }
        let replayed = json.replayed.ok_or_else(|| malformed("ok:true without replayed".into()))?;
        if fds.len() > 1 {
            return Err(BrokerError::TooManyFds { path: self.path.to_owned(), count: fds.len() });
        }
        let fd = fds.pop().ok_or_else(|| BrokerError::NoFd { path: self.path.to_owned() })?;
        check_socket(&fd, req).map_err(|what| BrokerError::WrongSocket { path: self.path.to_owned(), what })?;
        Ok(Answer::Socket { fd, replayed })
    }
}

/// The restored process will use the fd as the socket it had: it must be a connected `AF_UNIX` socket
/// of the same type, or the process fails later and far from the cause.
fn check_socket(fd: &OwnedFd, req: &Request) -> Result<(), String> {
    let local: SockaddrStorage = getsockname(fd.as_raw_fd()).map_err(|e| format!("the fd is not a socket ({e})"))?;
    if local.family() != Some(AddressFamily::Unix) {
        return Err(format!("the socket is of family {:?}, not AF_UNIX", local.family()));
    }
    let ty = getsockopt(fd, sockopt::SockType).map_err(|e| format!("SO_TYPE: {e}"))?;
    if ty != req.sock_type.to_nix() {
        return Err(format!("the socket is of type {ty:?}, the connection is {}", req.sock_type));
    }
    getpeername::<UnixAddr>(fd.as_raw_fd()).map_err(|e| format!("the socket is not connected ({e})"))?;
    Ok(())
}
