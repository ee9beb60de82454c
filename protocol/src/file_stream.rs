//! One file on one stream: a [`StreamHeader`](crate::pb::StreamHeader) frame holding the
//! [`FileHeader`](crate::pb::FileHeader), chunks (see [`crate::chunk`]),
//! the end marker, then the xxh3-64 of the file's raw bytes (u64 little-endian).
//!
//! The sender reads and compresses on a blocking thread while the async side writes the previous chunk,
//! so disk, zstd and the network overlap. The receiver checks the name before creating anything, the
//! running total against the announced size, and the checksum at the end; a file that fails any check is
//! removed.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use xxhash_rust::xxh3::Xxh3;

use crate::chunk::{self, HEADER_LEN, MAX_CHUNK};
use crate::frame::{read_frame, write_frame};
use crate::{ProtocolError, names, pb};

/// Chunks compressed at once (the blocking pool spreads them over the cores).
const COMPRESS_PARALLEL: usize = 4;

pub(crate) fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Bytes counted while sending or receiving one file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// File bytes.
    pub raw: u64,
    /// Bytes on the stream (headers, chunk headers, compressed payloads, checksum).
    pub wire: u64,
}

/// Sends the file at `path` as `name`. `progress` is called after each chunk with the running totals.
pub async fn send_file<W: AsyncWrite + Unpin>(
    w: &mut W,
    migration_id: &str,
    name: &str,
    path: &Path,
    level: i32,
    mut progress: impl FnMut(Transferred),
) -> Result<(pb::FileSummary, Transferred), ProtocolError> {
    let size = std::fs::metadata(path)?.len();
    let header = pb::FileHeader { migration_id: migration_id.into(), name: name.into(), size };
    let framed = pb::StreamHeader { kind: Some(pb::stream_header::Kind::File(header)) };
    write_frame(w, &framed).await?;
    let mut t = Transferred { raw: 0, wire: 4 + prost::Message::encoded_len(&framed) as u64 };

    // A reader thread (read + xxh3, in order) feeds raw chunks to compression on the blocking pool,
    // COMPRESS_PARALLEL chunks at a time, whose results are written in order. One core of zstd is slower
    // than a fast link, hence the parallelism; data that does not shrink (random or already compressed
    // memory) is sent raw for the next SKIP_AFTER_STORED chunks before zstd is tried again.
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(COMPRESS_PARALLEL * 2);
    let owned: PathBuf = path.to_owned();
    let reader = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
        use std::io::Read;
        let mut f = std::fs::File::open(&owned)?;
        let mut hasher = Xxh3::new();
        loop {
            let mut buf = vec![0u8; MAX_CHUNK];
            let mut filled = 0;
            while filled < MAX_CHUNK {
                let n = f.read(&mut buf[filled..])?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                return Ok(hasher.digest());
            }
            buf.truncate(filled);
            hasher.update(&buf);
            if tx.blocking_send(buf).is_err() {
                return Err(std::io::Error::other("sender went away"));
            }
        }
    });
    let adaptive = chunk::AdaptiveLevel::new(level);
    let mut encoded = tokio_stream_from(rx)
        .map(|raw| {
            let adaptive = adaptive.clone();
            let tried = adaptive.next();
            tokio::task::spawn_blocking(move || {
                let mut out = Vec::with_capacity(raw.len() + HEADER_LEN);
                adaptive.record(tried, chunk::encode_with(&raw, tried, &mut out));
                (raw.len(), out)
            })
        })
        .buffered(COMPRESS_PARALLEL);
    while let Some(item) = encoded.next().await {
        let (raw, enc) = item.map_err(|e| std::io::Error::other(format!("compression task: {e}")))?;
        w.write_all(&enc).await?;
        t.raw += raw as u64;
        t.wire += enc.len() as u64;
        progress(t);
    }
    let digest = reader.await.map_err(|e| std::io::Error::other(format!("reader thread: {e}")))??;
    if t.raw != size {
        return Err(ProtocolError::BadFile {
            name: name.into(),
            what: format!("changed size while being sent ({size} -> {} bytes)", t.raw),
        });
    }
    w.write_all(&chunk::end_marker()).await?;
    w.write_all(&digest.to_le_bytes()).await?;
    t.wire += (HEADER_LEN + 8) as u64;
    progress(t);
    Ok((pb::FileSummary { name: name.into(), size, xxh3: digest }, t))
}

/// What a unidirectional stream carries, from its first frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// An image file, whose name was checked.
    File(pb::FileHeader),
    /// The pages stream (see [`crate::pages`]).
    Pages(pb::PagesHeader),
}

/// Reads the first frame of a unidirectional stream; a file's name is checked.
pub async fn read_stream_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<Incoming, ProtocolError> {
    let h: pb::StreamHeader = read_frame(r).await?.ok_or(ProtocolError::Truncated)?;
    match h.kind {
        Some(pb::stream_header::Kind::File(f)) => {
            names::check_image_name(&f.name)?;
            Ok(Incoming::File(f))
        }
        Some(pb::stream_header::Kind::Pages(p)) => Ok(Incoming::Pages(p)),
        None => Err(ProtocolError::BadChunk("stream header of no known kind".into())),
    }
}

/// Reads the header of a stream that must carry a file, checking the name.
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<pb::FileHeader, ProtocolError> {
    match read_stream_header(r).await? {
        Incoming::File(h) => Ok(h),
        Incoming::Pages(_) => Err(ProtocolError::BadChunk("expected a file stream, got the pages stream".into())),
    }
}

/// Receives the body of a file whose header was read, into `dir/header.name`, refusing more than
/// `max_size` bytes. On any error the partial file is removed.
pub async fn receive_body<R: AsyncRead + Unpin>(
    r: &mut R,
    header: &pb::FileHeader,
    dir: &Path,
    max_size: u64,
    mut progress: impl FnMut(Transferred),
) -> Result<(pb::FileSummary, Transferred), ProtocolError> {
    names::check_image_name(&header.name)?;
    let bad = |what: String| ProtocolError::BadFile { name: header.name.clone(), what };
    if header.size > max_size {
        return Err(bad(format!("announced {} bytes, over the limit of {max_size}", header.size)));
    }
    let path = dir.join(&header.name);
    let result = async {
        // create_new: a name that already exists (a second stream for the same file) is refused.
        let mut f = tokio::fs::OpenOptions::new().write(true).create_new(true).open(&path).await?;
        let mut hasher = Xxh3::new();
        let mut t = Transferred::default();
        let mut payload = Vec::with_capacity(chunk::MAX_ENCODED);
        loop {
            let mut h = [0u8; HEADER_LEN];
            read_exact(r, &mut h).await?;
            t.wire += HEADER_LEN as u64;
            let Some(ch) = chunk::parse_header(h)? else {
                break;
            };
            if t.raw + ch.raw_len as u64 > header.size {
                return Err(bad(format!("more data than the announced {} bytes", header.size)));
            }
            payload.resize(ch.enc_len, 0);
            read_exact(r, &mut payload).await?;
            let raw = chunk::decode(&ch, &payload)?;
            hasher.update(&raw);
            f.write_all(&raw).await?;
            t.raw += raw.len() as u64;
            t.wire += ch.enc_len as u64;
            progress(t);
        }
        let mut digest = [0u8; 8];
        read_exact(r, &mut digest).await?;
        t.wire += 8;
        if t.raw != header.size {
            return Err(bad(format!("got {} bytes, header announced {}", t.raw, header.size)));
        }
        let digest = u64::from_le_bytes(digest);
        if digest != hasher.digest() {
            return Err(bad(format!(
                "checksum mismatch: sender xxh3 {digest:016x}, received data {:016x}",
                hasher.digest()
            )));
        }
        // No fsync: images are transient. If this host crashes before the commit, the source still
        // holds the original; syncing a GiB to a disk would only add downtime.
        f.flush().await?;
        Ok((pb::FileSummary { name: header.name.clone(), size: t.raw, xxh3: digest }, t))
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&path).await;
    }
    result
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), ProtocolError> {
    r.read_exact(buf).await.map(|_| ()).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProtocolError::Truncated,
        _ => ProtocolError::Io(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn send_to_vec(content: &[u8], name: &str) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("src");
        std::fs::write(&p, content).unwrap();
        let mut wire = Vec::new();
        let (sum, t) = send_file(&mut wire, "m", name, &p, 1, |_| {}).await.unwrap();
        assert_eq!(sum.size, content.len() as u64);
        assert_eq!(t.wire, wire.len() as u64);
        wire
    }

    #[tokio::test]
    async fn file_round_trip() {
        let content: Vec<u8> = (0..3 * MAX_CHUNK + 123).map(|i| (i / 4096) as u8).collect();
        let wire = send_to_vec(&content, "pages-1.img").await;
        assert!(wire.len() < content.len() / 10, "compressible data shrinks");
        let out = tempfile::tempdir().unwrap();
        let mut r = wire.as_slice();
        let h = read_header(&mut r).await.unwrap();
        let (sum, _) = receive_body(&mut r, &h, out.path(), u64::MAX, |_| {}).await.unwrap();
        assert_eq!(sum.name, "pages-1.img");
        assert_eq!(std::fs::read(out.path().join("pages-1.img")).unwrap(), content);
    }

    #[tokio::test]
    async fn incompressible_stretch_then_compressible_stretch() {
        let mut content = crate::test_util::incompressible(0x2545f4914f6cdd1d, 20 * MAX_CHUNK);
        content.extend(std::iter::repeat_n(0u8, 40 * MAX_CHUNK));
        let wire = send_to_vec(&content, "pages-2.img").await;
        // The random part travels raw, the zeros (after the skip window) compress. Up to COMPRESS_PARALLEL
        // chunks are in flight, so a late "did not shrink" from the random stretch can restart the skip
        // window a few zero chunks in: at most SKIP_AFTER_STORED + COMPRESS_PARALLEL of them go raw.
        let most_raw = 20 + chunk::AdaptiveLevel::SKIP_AFTER_STORED as usize + COMPRESS_PARALLEL;
        assert!(
            wire.len() > 20 * MAX_CHUNK && wire.len() < (most_raw + 1) * MAX_CHUNK,
            "{} bytes on the wire: the zeros did not compress",
            wire.len()
        );
        let out = tempfile::tempdir().unwrap();
        let mut r = wire.as_slice();
        let h = read_header(&mut r).await.unwrap();
        receive_body(&mut r, &h, out.path(), u64::MAX, |_| {}).await.unwrap();
        assert_eq!(std::fs::read(out.path().join("pages-2.img")).unwrap(), content);
    }

    #[tokio::test]
    async fn empty_file_round_trip() {
        let wire = send_to_vec(&[], "empty.img").await;
        let out = tempfile::tempdir().unwrap();
        let mut r = wire.as_slice();
        let h = read_header(&mut r).await.unwrap();
        receive_body(&mut r, &h, out.path(), u64::MAX, |_| {}).await.unwrap();
        assert_eq!(std::fs::metadata(out.path().join("empty.img")).unwrap().len(), 0);
    }

    #[tokio::test]
    async fn corrupted_data_fails_the_checksum_and_leaves_no_file() {
        let content = vec![7u8; 5000];
        let mut wire = send_to_vec(&content, "x.img").await;
        let n = wire.len();
        wire[n - 1] ^= 1; // flip a bit of the checksum
        let out = tempfile::tempdir().unwrap();
        let mut r = wire.as_slice();
        let h = read_header(&mut r).await.unwrap();
        let err = receive_body(&mut r, &h, out.path(), u64::MAX, |_| {}).await.unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        assert!(!out.path().join("x.img").exists());
    }

    #[tokio::test]
    async fn size_limit_and_truncation() {
        let content = vec![1u8; 10_000];
        let wire = send_to_vec(&content, "x.img").await;
        let out = tempfile::tempdir().unwrap();
        let mut r = wire.as_slice();
        let h = read_header(&mut r).await.unwrap();
        let err = receive_body(&mut r, &h, out.path(), 5000, |_| {}).await.unwrap_err();
        assert!(err.to_string().contains("over the limit"), "{err}");

        let mut r = &wire[..wire.len() - 5];
        let h = read_header(&mut r).await.unwrap();
        let err = receive_body(&mut r, &h, out.path(), u64::MAX, |_| {}).await.unwrap_err();
        assert!(matches!(err, ProtocolError::Truncated), "{err}");
        assert!(!out.path().join("x.img").exists());
    }

    #[tokio::test]
    async fn hostile_names_are_refused_before_writing() {
        for name in ["../escape", "/etc/passwd", "a/b", "..", ""] {
            let h = pb::StreamHeader {
                kind: Some(pb::stream_header::Kind::File(pb::FileHeader {
                    migration_id: "m".into(),
                    name: name.into(),
                    size: 0,
                })),
            };
            let mut wire = Vec::new();
            write_frame(&mut wire, &h).await.unwrap();
            let err = read_header(&mut wire.as_slice()).await.unwrap_err();
            assert!(matches!(err, ProtocolError::BadName { .. }), "{name}: {err}");
        }
    }
}
