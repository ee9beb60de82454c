//! The socket broker: how a restored process gets a new socket for a unix connection whose peer is not
//! part of the migrated tree.
//!
//! CRIU restores both ends of a unix connection only when both ends are in the dumped tree. A
//! connection to a peer outside the tree (a local daemon, a logger, a client of a server in the tree)
//! has no counterpart on the target host. With the policy `broker[:SOCKET]` the target agent asks a
//! broker for a replacement: whatever listens at SOCKET, either the reference daemon `migrate-broker`
//! (`src/main.rs`, rules as in `deploy/broker.toml`) or the application itself through [`serve`].
//!
//! This crate owns the wire format below, the client ([`request`]) and the server side ([`serve`],
//! [`read_request`], [`write_answer`]). It does not decide which sockets go to a broker (the agents'
//! policy does) and it restores nothing.
//!
//! # Protocol, version 1
//!
//! **Transport.** `AF_UNIX`, `SOCK_STREAM`, at the broker's path: [`DEFAULT_SOCKET`] unless the policy
//! names one. A path starting with `@` is an abstract name ([`unix_addr`]). One request and one answer
//! per connection; both sides close after the answer.
//!
//! **Frame.** A u32 little-endian length, then that many bytes holding one JSON object (UTF-8). A
//! receiver checks the length against [`MAX_FRAME`] (1 MiB) before it allocates, and refuses a longer
//! frame.
//!
//! **Request** (agent to broker): one frame, then exactly `queued_len` raw bytes, not encoded.
//!
//! | field | JSON type | required | meaning |
//! | --- | --- | --- | --- |
//! | `version` | number | yes | [`VERSION`], 1. A broker refuses any other value. |
//! | `migration_id` | string | yes | The migration asking, for the broker's log. |
//! | `socket_ino` | number (u64) | yes | Inode of the socket on the source host (as in `ss -xp`). |
//! | `sock_type` | `"stream"`, `"seqpacket"`, `"dgram"` | yes | Type the new socket must have. |
//! | `name` | string | no, `""` | The socket's own bound name; abstract names as `"@name"`; `""`: unbound. |
//! | `peer_name` | string | no, `""` | The peer's bound name. For a connection the process accepted, the listener's path. `""`: unbound or unknown. |
//! | `peer_pid` | number (u32) | no, 0 | Pid of the peer on the source host; 0: unknown. |
//! | `peer_comm` | string | no, `""` | That process' `comm`. |
//! | `tag` | string | no, `""` | Free text from the operator's policy, to select a broker rule. |
//! | `queued_len` | number (u64) | no, 0 | Number of raw bytes after the frame; at most [`MAX_QUEUED`]. |
//! | `queued_msgs` | array of numbers | no, `[]` | For `seqpacket` and `dgram`: the lengths of the messages the queued bytes consist of, in order; their sum is `queued_len`. `[]` with `queued_len > 0`: one message. Always `[]` for `stream`. At most [`MAX_QUEUED_MSGS`] entries. |
//!
//! The queued bytes are what sat unread in the process' receive queue when it was frozen. The restored
//! process must read them before anything the new peer sends. Fields a receiver does not know are
//! ignored, so version 1 may gain optional fields; a change that a version-1 peer would misread gets a
//! new version.
//!
//! **Answer** (broker to agent): one frame, either
//!
//! - `{"version":1,"ok":true,"replayed":BOOL}` with exactly one fd passed by `SCM_RIGHTS` in the
//!   `sendmsg` that carries the frame's first byte. The fd is the socket the restored process will own:
//!   `AF_UNIX`, of the requested `sock_type`, connected. `replayed: true` means the broker wrote the
//!   queued bytes (message by message) into the other end, so they wait in this socket's receive queue
//!   ahead of anything else. `replayed: false` means they are not there: the caller must deliver them
//!   first, or fail the migration if it cannot. A broker that hands over an end of a connection it
//!   does not own (it connected to, or accepted from, someone else) cannot put bytes in front, so it
//!   answers `false`.
//! - `{"version":1,"ok":false,"reason":STRING}` without fd: the broker refuses. The migration reports
//!   the reason to the operator, so it should say what was asked and what to change.
//!
//! A broker answers a malformed request (frame over the limit, truncated frame, bad JSON, other
//! version, `queued_len` over the limit) with `ok:false` and its own `version`, so an agent of another
//! version learns from the reason what is wrong.
//!
//! **Time.** A broker reads the request within [`REQUEST_TIMEOUT`] of the connection. The answer may
//! take as long as the broker needs to get the socket (the reference daemon's `accept` rules wait for a
//! client, 30 s by default); the caller's timeout ([`DEFAULT_TIMEOUT`] is a suitable one) bounds the
//! whole exchange.
//!
//! **Trust.** Whoever can connect to a broker gets sockets connected to the broker's peers, so the
//! reference daemon's socket is mode 0600 (root's target agent only). The new socket's peer sees the
//! credentials (`SO_PEERCRED`) of whoever created the new socket, not those of the restored process.

mod client;
mod server;
pub mod socket;
mod sys;

use std::fmt;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use client::request;
pub use server::{MAX_CONNECTIONS, read_request, serve, write_answer};

/// Protocol version spoken by this crate, in every request and answer.
pub const VERSION: u32 = 1;

/// Where the reference broker listens unless told otherwise; the target agent's `broker` policy
/// without a path asks here.
pub const DEFAULT_SOCKET: &str = "/run/migrate/broker.sock";

/// Largest JSON frame, in bytes. A request is a few hundred bytes plus `queued_msgs` (at most
/// [`MAX_QUEUED_MSGS`] numbers, under 1 MiB); anything longer is a broken or hostile peer.
pub const MAX_FRAME: usize = 1 << 20;

/// Largest `queued_len`. A unix socket's receive queue is bounded by the sender's `SO_SNDBUF`, at most
/// `net.core.wmem_max` (208 KiB by default) unless a privileged sender forced more; 8 MiB leaves room
/// for tuned hosts while bounding what a broker buffers per request.
pub const MAX_QUEUED: u64 = 8 << 20;

/// Most entries in `queued_msgs`. A datagram queue holds at most `net.unix.max_dgram_qlen` messages
/// (512 by default); 65536 covers tuned hosts and keeps the request frame under [`MAX_FRAME`].
pub const MAX_QUEUED_MSGS: usize = 65536;

/// How long a broker waits for the whole request after accepting the connection. The agent sends it
/// at once; a slower client is stuck and should not hold a broker thread.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A timeout for [`request`] that outlasts the reference daemon's default accept wait (30 s) plus
/// the time to start a command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(45);

/// Type of the socket to replace, and so of the new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SockType {
    Stream,
    Seqpacket,
    Dgram,
}

impl SockType {
    /// The name on the wire and in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            SockType::Stream => "stream",
            SockType::Seqpacket => "seqpacket",
            SockType::Dgram => "dgram",
        }
    }

    /// The type for `socket(2)` and `socketpair(2)`.
    pub fn to_nix(self) -> nix::sys::socket::SockType {
        match self {
            SockType::Stream => nix::sys::socket::SockType::Stream,
            SockType::Seqpacket => nix::sys::socket::SockType::SeqPacket,
            SockType::Dgram => nix::sys::socket::SockType::Datagram,
        }
    }

    /// Whether messages keep their boundaries (and so `queued_msgs` applies).
    pub fn is_message_based(self) -> bool {
        self != SockType::Stream
    }
}

impl fmt::Display for SockType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the agent asks a broker for: a new socket replacing socket `socket_ino` of the restored
/// process. The fields are those of the request frame (see the crate doc); `queued` travels after it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub migration_id: String,
    pub socket_ino: u64,
    pub sock_type: SockType,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub peer_name: String,
    #[serde(default)]
    pub peer_pid: u32,
    #[serde(default)]
    pub peer_comm: String,
    #[serde(default)]
    pub tag: String,
    /// Message lengths in `queued`, for `seqpacket` and `dgram`; empty: `queued` is one message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queued_msgs: Vec<u64>,
    /// Bytes unread in the process' receive queue at the freeze (sent raw after the frame).
    #[serde(skip)]
    pub queued: Vec<u8>,
}

impl Request {
    /// A request with every optional field empty.
    pub fn new(migration_id: impl Into<String>, socket_ino: u64, sock_type: SockType) -> Request {
        Request {
            migration_id: migration_id.into(),
            socket_ino,
            sock_type,
            name: String::new(),
            peer_name: String::new(),
            peer_pid: 0,
            peer_comm: String::new(),
            tag: String::new(),
            queued_msgs: Vec::new(),
            queued: Vec::new(),
        }
    }

    /// The queued bytes split into messages: one slice per `queued_msgs` entry, or all of `queued` as
    /// one message (none when empty). Only meaningful after [`Request::check`] passed.
    pub fn queued_messages(&self) -> Vec<&[u8]> {
        if self.queued_msgs.is_empty() {
            return if self.queued.is_empty() { Vec::new() } else { vec![&self.queued[..]] };
        }
        let mut rest = &self.queued[..];
        let mut out = Vec::with_capacity(self.queued_msgs.len());
        for &len in &self.queued_msgs {
            let (msg, tail) = rest.split_at((len as usize).min(rest.len()));
            out.push(msg);
            rest = tail;
        }
        out
    }

    /// Checks the limits and the consistency of `queued` and `queued_msgs`; the error says which.
    pub fn check(&self) -> Result<(), String> {
        if self.queued.len() as u64 > MAX_QUEUED {
            return Err(format!("{} queued bytes, over the limit of {MAX_QUEUED}", self.queued.len()));
        }
        if self.queued_msgs.is_empty() {
            return Ok(());
        }
        if !self.sock_type.is_message_based() {
            return Err("queued_msgs is given for a stream socket, whose queue has no message boundaries".into());
        }
        if self.queued_msgs.len() > MAX_QUEUED_MSGS {
            return Err(format!("{} queued messages, over the limit of {MAX_QUEUED_MSGS}", self.queued_msgs.len()));
        }
        let sum = self.queued_msgs.iter().try_fold(0u64, |acc, &l| acc.checked_add(l));
        if sum != Some(self.queued.len() as u64) {
            return Err(format!("the lengths in queued_msgs do not add up to the {} queued bytes", self.queued.len()));
        }
        Ok(())
    }
}

/// `queued` can be megabytes: show its length only.
impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("migration_id", &self.migration_id)
            .field("socket_ino", &self.socket_ino)
            .field("sock_type", &self.sock_type)
            .field("name", &self.name)
            .field("peer_name", &self.peer_name)
            .field("peer_pid", &self.peer_pid)
            .field("peer_comm", &self.peer_comm)
            .field("tag", &self.tag)
            .field("queued_msgs", &self.queued_msgs.len())
            .field("queued", &self.queued.len())
            .finish()
    }
}

/// The broker's answer, as the agent receives it.
#[derive(Debug)]
pub enum Answer {
    /// The socket for the restored process (close-on-exec); see the crate doc for `replayed`.
    Socket { fd: OwnedFd, replayed: bool },
    /// The broker will not provide a socket, and says why.
    Refused { reason: String },
}

/// What a broker's handler decides for one request ([`serve`]).
#[derive(Debug)]
pub enum Reply {
    /// Hand over this socket. The broker's copy is closed once it is sent.
    Socket { fd: OwnedFd, replayed: bool },
    /// Refuse, with a reason for the operator.
    Refuse(String),
}

/// The answer frame's JSON.
#[derive(Debug, Serialize, Deserialize)]
struct AnswerJson {
    version: u64,
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    replayed: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// The request frame's JSON as sent: `version` and `queued_len` around the request's own fields.
#[derive(Serialize)]
struct RequestJsonOut<'a> {
    version: u32,
    #[serde(flatten)]
    req: &'a Request,
    queued_len: u64,
}

/// Reads a socket name the way the protocol and the reference daemon do: `@name` is the abstract name
/// `name`, anything else a filesystem path.
pub fn unix_addr(name: &Path) -> std::io::Result<nix::sys::socket::UnixAddr> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = name.as_os_str().as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(abs) => nix::sys::socket::UnixAddr::new_abstract(abs),
        None => nix::sys::socket::UnixAddr::new(name),
    };
    addr.map_err(std::io::Error::from)
}

/// Errors of [`request`], as the migration reports them.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "cannot connect to the socket broker at {path}: {source}; start migrate-broker on this host or choose another policy for this socket",
        path = .path.display()
    )]
    Connect { path: PathBuf, source: std::io::Error },
    #[error(
        "the socket broker at {path} did not {during} within {timeout:?}; see the broker's log (a rule waiting for a client to connect takes up to its accept_timeout_s)",
        path = .path.display()
    )]
    Timeout { path: PathBuf, during: &'static str, timeout: Duration },
    #[error("talking to the socket broker at {path} failed while trying to {during}: {source}", path = .path.display())]
    Io { path: PathBuf, during: &'static str, source: std::io::Error },
    #[error("the socket broker at {path} closed the connection without answering; see the broker's log", path = .path.display())]
    NoAnswer { path: PathBuf },
    #[error("the socket broker at {path} sent a malformed answer: {what}; fix the broker", path = .path.display())]
    Malformed { path: PathBuf, what: String },
    #[error(
        "the socket broker at {path} speaks protocol version {got}, this agent version {VERSION}; use the same migrate version for the agent and the broker",
        path = .path.display()
    )]
    Version { path: PathBuf, got: u64 },
    #[error(
        "the socket broker at {path} answered ok but passed no socket (one fd must come with the answer, by SCM_RIGHTS); fix the broker",
        path = .path.display()
    )]
    NoFd { path: PathBuf },
    #[error(
        "the socket broker at {path} passed {count} fds where exactly one was expected (all closed); fix the broker",
        path = .path.display()
    )]
    TooManyFds { path: PathBuf, count: usize },
    #[error("the socket broker at {path} passed a socket this connection cannot use: {what}; fix the broker", path = .path.display())]
    WrongSocket { path: PathBuf, what: String },
    #[error("socket {ino} cannot be brokered: {what}; choose another policy for it")]
    InvalidRequest { ino: u64, what: String },
}

/// Why a broker could not read a request. The text is sent back as the refusal's reason, so it is
/// written for the operator of the migration.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("the connection closed before a request was sent")]
    Empty,
    #[error("the request frame is {len} bytes, over the limit of {max}")]
    FrameTooLarge { len: u64, max: usize },
    #[error("the request announces {len} queued bytes, over the limit of {max}; this socket cannot be brokered")]
    QueuedTooLarge { len: u64, max: u64 },
    #[error("the request ended in the middle of {what}")]
    Truncated { what: &'static str },
    #[error("the request is not valid protocol-version-{VERSION} JSON: {0}")]
    Json(String),
    #[error(
        "this broker speaks protocol version {VERSION}, the request is version {got}; use the same migrate version for the agent and the broker"
    )]
    Version { got: u64 },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("the request did not arrive within {REQUEST_TIMEOUT:?}")]
    Timeout,
    #[error("reading the request failed: {0}")]
    Io(std::io::Error),
}
