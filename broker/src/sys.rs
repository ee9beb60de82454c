//! Passing fds over a unix stream socket (`SCM_RIGHTS`): the library's only unsafe code.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, send, sendmsg};

/// The kernel passes at most `SCM_MAX_FD` (253) fds in one message. A control buffer with room for
/// all of them is never truncated, so every fd the kernel installs reaches us and is closed by its
/// `OwnedFd`; with a smaller buffer, fds past its end would be installed but unreachable by nix
/// (`RecvMsg::cmsgs` refuses a truncated buffer).
const SCM_MAX_FD: usize = 253;

/// Writes all of `buf`, with `fd_to_pass` attached to the first `sendmsg` and so to the first byte.
/// `MSG_NOSIGNAL`: a peer that went away is an `EPIPE` error, not a SIGPIPE for the whole process.
/// Blocks as the socket's `SO_SNDTIMEO` allows (`WouldBlock` when it expires).
pub(crate) fn send_all(sock: BorrowedFd<'_>, buf: &[u8], fd_to_pass: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let mut sent = 0;
    if let Some(fd) = fd_to_pass {
        let fds = [fd.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        sent = loop {
            match sendmsg::<()>(sock.as_raw_fd(), &[IoSlice::new(buf)], &cmsg, MsgFlags::MSG_NOSIGNAL, None) {
                Ok(n) => break n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
    }
    while sent < buf.len() {
        match send(sock.as_raw_fd(), &buf[sent..], MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => sent += n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// One `recvmsg` into `buf`: returns the byte count (0 at end of stream) and appends the fds that came
/// with them to `fds`, close-on-exec (`MSG_CMSG_CLOEXEC`, so a command the caller starts meanwhile
/// does not inherit them). Blocks as the socket's `SO_RCVTIMEO` allows.
pub(crate) fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut cmsg_buf = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg_buf), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(m) => break m,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let cmsgs = msg.cmsgs().map_err(|_| io::Error::other("control message truncated"))?;
    for c in cmsgs {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for r in raw {
                // SAFETY: the kernel has just installed `r` in our fd table for this message; nothing
                // else in the process knows the number, so this OwnedFd is its only owner.
                fds.push(unsafe { OwnedFd::from_raw_fd(r) });
            }
        }
    }
    Ok(msg.bytes)
}
