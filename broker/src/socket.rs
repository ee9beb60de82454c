//! Sockets a process is handed in place of one it had: a new connection to a path ([`connect`]), and
//! the bytes that were unread in its old socket, written into the other end of the new one
//! ([`put_queued`]). Used by the reference broker and by the target agent.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, connect as connect_fd, send, setsockopt, socket, sockopt};
use nix::sys::time::TimeVal;

use crate::{SockType, unix_addr};

/// How long [`connect`] waits while the target's listen backlog is full (a unix `connect` blocks
/// then, as long as `SO_SNDTIMEO` allows). A healthy server drains its backlog in milliseconds.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A new socket of type `ty` connected to `target` (a path, or `@name` for an abstract name), waiting
/// at most [`CONNECT_TIMEOUT`] for room in its listen backlog, and handed back without a send timeout.
pub fn connect(target: &str, ty: SockType) -> Result<OwnedFd, String> {
    let addr = unix_addr(Path::new(target)).map_err(|e| format!("bad socket name: {e}"))?;
    let fd =
        socket(AddressFamily::Unix, ty.to_nix(), SockFlag::SOCK_CLOEXEC, None).map_err(|e| format!("socket: {e}"))?;
    let timeout = TimeVal::new(CONNECT_TIMEOUT.as_secs() as _, 0);
    setsockopt(&fd, sockopt::SendTimeout, &timeout).map_err(|e| format!("SO_SNDTIMEO: {e}"))?;
    loop {
        match connect_fd(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr) {
            Ok(()) => break,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => {
                return Err(format!(
                    "{target} did not take the connection within {CONNECT_TIMEOUT:?} (its listen backlog is full)"
                ));
            }
            Err(e @ (Errno::ENOENT | Errno::ECONNREFUSED)) => {
                return Err(format!("nothing listens at {target} ({e}); start the service that should"));
            }
            Err(e) => return Err(format!("cannot connect to {target}: {e}")),
        }
    }
    // The process gets the socket as it would be after its own connect: no send timeout.
    setsockopt(&fd, sockopt::SendTimeout, &TimeVal::new(0, 0)).map_err(|e| format!("SO_SNDTIMEO: {e}"))?;
    Ok(fd)
}

/// Writes `msgs` (for a stream socket: its bytes, in pieces) into `end` without blocking: nobody reads the other end yet, so a write that
/// would block would block for ever. The socket's send buffer is first raised to hold them
/// (`SO_SNDBUFFORCE` as root, else `SO_SNDBUF` up to `net.core.wmem_max`).
pub fn put_queued(end: &OwnedFd, msgs: &[&[u8]], ty: SockType) -> Result<(), String> {
    if msgs.is_empty() {
        return Ok(());
    }
    let total: usize = msgs.iter().map(|m| m.len()).sum();
    // The kernel doubles the value for its bookkeeping; a few KiB more cover the per-message overhead
    // of many small datagrams.
    let want = total.saturating_add(msgs.len().saturating_mul(1024)).min(i32::MAX as usize);
    if setsockopt(end, sockopt::SndBufForce, &want).is_err() {
        let _ = setsockopt(end, sockopt::SndBuf, &want);
    }
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    let raw = std::os::fd::AsRawFd::as_raw_fd(end);
    let full = |done: usize| {
        format!(
            "the {} queued bytes do not fit in a socket buffer ({done} written; raise net.core.wmem_max{})",
            total,
            if ty == SockType::Dgram { " or net.unix.max_dgram_qlen" } else { "" }
        )
    };
    let mut done = 0;
    for msg in msgs {
        if ty == SockType::Stream {
            let mut off = 0;
            while off < msg.len() {
                match send(raw, &msg[off..], flags) {
                    Ok(n) => off += n,
                    Err(Errno::EINTR) => continue,
                    Err(Errno::EAGAIN) => return Err(full(done + off)),
                    Err(e) => return Err(format!("writing the queued bytes: {e}")),
                }
            }
        } else {
            loop {
                match send(raw, msg, flags) {
                    Ok(_) => break,
                    Err(Errno::EINTR) => continue,
                    Err(Errno::EAGAIN) => return Err(full(done)),
                    Err(e) => return Err(format!("writing a queued message of {} bytes: {e}", msg.len())),
                }
            }
        }
        done += msg.len();
    }
    Ok(())
}
