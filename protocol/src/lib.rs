//! What crosses the wire between a source agent and a target agent, and nothing else.
//!
//! - [`pb`]: the prost messages (`proto/migrate.proto`): Hello, the control dialogue, file headers.
//! - [`frame`]: length-delimited frames on a stream, every length checked before it is used.
//! - [`chunk`]: the zstd chunk codec for file (and later page) data, with bounded decoding.
//! - [`file_stream`]: one image file on one QUIC stream: header, chunks, end marker, xxh3.
//! - [`pages`]: the pages stream: memory pages sent while the process runs and during the freeze.
//! - [`endpoint`]: QUIC endpoints on UDP sockets with buffers big enough for bulk pages.
//! - [`stall`]: a stream whose writes fail once the peer has taken no data for a limit (keep-alives
//!   hold a link up whose peer no longer reads).
//! - [`lane`]: the thread and runtime of the fault link, so fault answers never queue behind bulk pages.
//! - [`tls`]: mutual TLS against the fleet CA, as quinn client and server configurations.
//! - [`names`]: which file names a peer may ask us to write.
//! - [`hello`]: protocol version and host compatibility rules; [`host`]: this host's facts for its Hello.
//!
//! No CRIU and no process code lives here; both agents build on it.

pub mod chunk;
pub mod endpoint;
pub mod file_stream;
pub mod frame;
pub mod hello;
pub mod host;
pub mod lane;
pub mod names;
pub mod pages;
pub mod stall;
pub mod tls;

/// Helpers of this crate's unit tests.
#[cfg(test)]
pub(crate) mod test_util {
    /// `len` bytes that do not compress (xorshift64 from `seed`).
    pub fn incompressible(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }
}

/// Generated from `proto/migrate.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/migrate.v1.rs"));
}

/// ALPN protocol id of agent connections; a peer speaking anything else is refused during the handshake.
pub const ALPN: &[u8] = b"migrate/1";

/// Default UDP port of a target agent.
pub const DEFAULT_PORT: u16 = 7420;

/// Errors of this crate. Each names what was wrong with the input so the peer can be blamed precisely.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("peer sent a frame of {len} bytes, over the limit of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    #[error("peer closed the stream in the middle of a frame")]
    Truncated,
    #[error("peer sent a message that does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("malformed chunk: {0}")]
    BadChunk(String),
    #[error("file {name}: {what}")]
    BadFile { name: String, what: String },
    #[error("refused file name {name:?}: {why}")]
    BadName { name: String, why: &'static str },
    #[error("stream I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// Most characters of a peer's free text (a reason, a stage, a host name) kept for logs and errors.
pub const PEER_TEXT_MAX: usize = 512;

/// A peer's free text, made safe to log and to show: at most [`PEER_TEXT_MAX`] characters, control
/// characters (newlines, terminal escapes) escaped. A message may carry up to a frame's limit (1 MiB)
/// of anything; a hostile peer must not be able to flood a log or forge its lines.
pub fn peer_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(PEER_TEXT_MAX));
    for (i, c) in s.chars().enumerate() {
        if i == PEER_TEXT_MAX {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

impl ProtocolError {
    /// The reason the peer gave, when what ended this stream is the peer closing the whole connection on
    /// purpose (a QUIC application close: a target that refused a file, ran out of disk, ...). Its words
    /// say more than "connection lost".
    pub fn peer_reason(&self) -> Option<String> {
        let ProtocolError::Io(io) = self else { return None };
        let inner = io.get_ref()?;
        let lost = match (inner.downcast_ref::<quinn::ReadError>(), inner.downcast_ref::<quinn::WriteError>()) {
            (Some(quinn::ReadError::ConnectionLost(c)), _) | (_, Some(quinn::WriteError::ConnectionLost(c))) => c,
            _ => return None,
        };
        match lost {
            quinn::ConnectionError::ApplicationClosed(close) => {
                Some(peer_text(&String::from_utf8_lossy(&close.reason)))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_text_escapes_control_characters_and_caps_the_length() {
        assert_eq!(peer_text("disk full"), "disk full");
        assert_eq!(peer_text("a\nWARN forged\x1b[2J"), "a\\nWARN forged\\u{1b}[2J");
        assert_eq!(peer_text("é ü"), "é ü", "printable UTF-8 stays");
        let long = peer_text(&"x".repeat(1 << 20));
        assert_eq!(long.len(), PEER_TEXT_MAX + 3);
    }

    #[test]
    fn a_peer_closing_on_purpose_gives_its_reason() {
        let closed = quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
            error_code: 1u32.into(),
            reason: bytes::Bytes::from_static(b"file refused: no room"),
        });
        let read = ProtocolError::Io(quinn::ReadError::ConnectionLost(closed.clone()).into());
        assert_eq!(read.peer_reason().as_deref(), Some("file refused: no room"));
        let write = ProtocolError::Io(quinn::WriteError::ConnectionLost(closed).into());
        assert_eq!(write.peer_reason().as_deref(), Some("file refused: no room"));
        let timeout = ProtocolError::Io(quinn::ReadError::ConnectionLost(quinn::ConnectionError::TimedOut).into());
        assert_eq!(timeout.peer_reason(), None, "a link that went silent gave no reason");
        assert_eq!(ProtocolError::Truncated.peer_reason(), None);
    }
}
