//! The broker side: read a request, answer it. [`serve`] is a whole broker around a handler, for the
//! reference daemon and for applications that broker their own connections.

use std::io::{self, ErrorKind, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::{AnswerJson, MAX_FRAME, MAX_QUEUED, REQUEST_TIMEOUT, Reply, Request, RequestError, VERSION, sys};

/// Most requests [`serve`] works on at once; more are refused at once ("busy"). Each holds a thread
/// and up to [`MAX_FRAME`] + [`crate::MAX_QUEUED`] bytes, and a migration asks for its sockets one at a
/// time, so 64 is many migrations' worth.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a broker may block sending its answer. The answer is a few bytes and fits in any socket
/// buffer; only a peer that stopped reading with a full buffer makes this wait.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`serve`] pauses after `accept` failed for lack of fds or memory, so as not to spin while
/// running requests release theirs.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Reads one request: the frame, then its queued bytes. Every length is checked before anything is
/// allocated for it. A timeout set on the stream (`set_read_timeout`) ends as [`RequestError::Timeout`].
pub fn read_request(r: &mut impl Read) -> Result<Request, RequestError> {
    let mut len = [0u8; 4];
    read_full(r, &mut len, "the length", true)?;
    let len = u32::from_le_bytes(len);
    if len as usize > MAX_FRAME {
        return Err(RequestError::FrameTooLarge { len: len.into(), max: MAX_FRAME });
    }
    let mut body = vec![0u8; len as usize];
    read_full(r, &mut body, "the JSON frame", false)?;

    // The version first, so that a request of another version is told so rather than about a field
    // that changed.
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| RequestError::Json(e.to_string()))?;
    let obj = value.as_object().ok_or_else(|| RequestError::Json("the frame is not a JSON object".into()))?;
    let version = match obj.get("version") {
        Some(v) => v.as_u64().ok_or_else(|| RequestError::Json("version is not a number".into()))?,
        None => return Err(RequestError::Json("missing field `version`".into())),
    };
    if version != u64::from(VERSION) {
        return Err(RequestError::Version { got: version });
    }
    let queued_len = match obj.get("queued_len") {
        None => 0,
        Some(v) => v.as_u64().ok_or_else(|| RequestError::Json("queued_len is not a u64".into()))?,
    };
    if queued_len > MAX_QUEUED {
        return Err(RequestError::QueuedTooLarge { len: queued_len, max: MAX_QUEUED });
    }
    let mut req =
        <Request as serde::Deserialize>::deserialize(&value).map_err(|e| RequestError::Json(e.to_string()))?;
    req.queued = vec![0u8; queued_len as usize];
    read_full(r, &mut req.queued, "the queued bytes", false)?;
    req.check().map_err(RequestError::Invalid)?;
    Ok(req)
}

/// `read_exact` with the protocol's errors; `first`: an end of stream before any byte is
/// [`RequestError::Empty`] (a connection that only checked the broker is there).
fn read_full(r: &mut impl Read, buf: &mut [u8], what: &'static str, first: bool) -> Result<(), RequestError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if first && got == 0 => return Err(RequestError::Empty),
            Ok(0) => return Err(RequestError::Truncated { what }),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(RequestError::Timeout);
            }
            Err(e) => return Err(RequestError::Io(e)),
        }
    }
    Ok(())
}

/// Sends the answer frame for `reply`, with the socket attached to its first byte. The broker's copy of
/// the fd is closed on return: the one in flight is the process' now. Blocks as the stream's write
/// timeout allows.
pub fn write_answer(stream: &impl AsFd, reply: Reply) -> io::Result<()> {
    let (json, fd): (AnswerJson, Option<OwnedFd>) = match reply {
        Reply::Socket { fd, replayed } => {
            (AnswerJson { version: VERSION.into(), ok: true, replayed: Some(replayed), reason: None }, Some(fd))
        }
        Reply::Refuse(reason) => {
            // A reason that would not fit in a frame is cut (at a char boundary): it is for a human.
            let mut reason = reason;
            if reason.len() > MAX_FRAME / 2 {
                let mut cut = MAX_FRAME / 2;
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                reason.truncate(cut);
            }
            (AnswerJson { version: VERSION.into(), ok: false, replayed: None, reason: Some(reason) }, None)
        }
    };
    let body = serde_json::to_vec(&json).map_err(io::Error::other)?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    sys::send_all(stream.as_fd(), &frame, fd.as_ref().map(|f| f.as_fd()))
}

/// Serves requests on `listener` until `accept` fails for good, one thread per connection (at most
/// [`MAX_CONNECTIONS`] at a time), calling `handler` for each well-formed request. A malformed request
/// is answered with `ok:false` and what is wrong with it, and never reaches the handler; a handler
/// that panics is answered with a refusal too. Neither stops the broker.
///
/// The handler may block (to wait for a client, say); the agent's timeout bounds how long it is
/// worth waiting. Set the listener's file mode or check `SO_PEERCRED` in the handler to decide who may
/// ask: a broker hands out sockets connected to its peers.
pub fn serve(listener: UnixListener, handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> io::Result<()> {
    let handler = Arc::new(handler);
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::ConnectionAborted) => continue,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)) => {
                tracing::warn!("broker: accept failed, retrying: {e}");
                std::thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
            Err(e) => return Err(e),
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("broker: {MAX_CONNECTIONS} requests in progress, refusing one more");
            // The refusal fits in the socket buffer: this does not block the accept loop.
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let reason = format!("the broker is busy with {MAX_CONNECTIONS} requests; retry later");
            let _ = write_answer(&stream, Reply::Refuse(reason));
            continue;
        }
        let guard = ActiveGuard(active.clone());
        let handler = handler.clone();
        let spawned = std::thread::Builder::new().name("broker-conn".into()).spawn(move || {
            let _guard = guard;
            handle_connection(stream, &*handler);
        });
        if let Err(e) = spawned {
            // The closure, with the stream and the guard, was dropped: the client sees the connection
            // close without an answer, and the counter is back.
            tracing::warn!("broker: cannot start a thread for a request: {e}");
        }
    }
}

/// Gives back a [`serve`] connection slot when its thread ends, also by panic.
struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn handle_connection(mut stream: UnixStream, handler: &(dyn Fn(&Request) -> Reply + Send + Sync)) {
    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
    let reply = match read_request(&mut stream) {
        Ok(req) => match catch_unwind(AssertUnwindSafe(|| handler(&req))) {
            Ok(reply) => reply,
            Err(_) => {
                tracing::error!(
                    migration = %req.migration_id, socket_ino = req.socket_ino,
                    "broker: the request handler panicked"
                );
                Reply::Refuse(format!(
                    "the broker failed on this request (socket {}): its handler panicked; see the broker's log",
                    req.socket_ino
                ))
            }
        },
        Err(RequestError::Empty) => {
            tracing::debug!("broker: a connection closed without a request");
            return;
        }
        Err(e) => {
            tracing::warn!("broker: refused a malformed request: {e}");
            Reply::Refuse(e.to_string())
        }
    };
    let _ = stream.set_write_timeout(Some(ANSWER_TIMEOUT));
    if let Err(e) = write_answer(&stream, reply) {
        tracing::warn!("broker: could not send the answer: {e}");
    }
}
