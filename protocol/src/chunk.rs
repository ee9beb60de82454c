//! The chunk codec: data cut into chunks of at most [`MAX_CHUNK`] bytes, each zstd-compressed when that
//! makes it smaller and stored raw otherwise (random or already-compressed memory does not shrink, and
//! compressing it again only costs CPU).
//!
//! Layout of one chunk: `u32 raw_len`, `u32 enc_len | COMPRESSED`, then `enc_len` bytes (all
//! little-endian). `raw_len == 0` marks the end of a sequence. Decoding checks both lengths against the
//! limits before reading the payload and decompresses into a buffer of exactly `raw_len` bytes, so a
//! peer cannot make us allocate or inflate more than [`MAX_CHUNK`] per chunk.

use crate::ProtocolError;

/// Largest raw chunk. 1 MiB keeps zstd fast (it fits in L2 with the window) and gives the sender
/// enough chunks to pipeline reading, compressing and sending.
pub const MAX_CHUNK: usize = 1 << 20;
/// zstd's worst-case expansion of MAX_CHUNK is well under this; stored chunks are never larger than raw.
pub const MAX_ENCODED: usize = MAX_CHUNK + (MAX_CHUNK >> 7) + 1024;
/// Bytes of a chunk header.
pub const HEADER_LEN: usize = 8;
/// zstd level for image data: level 1 keeps compression near 500 MB/s per core on this kind of data.
pub const DEFAULT_LEVEL: i32 = 1;

const COMPRESSED: u32 = 1 << 31;

/// Whether to try zstd on the next chunk: after a chunk that zstd could not shrink (random or already
/// compressed memory), the next [`AdaptiveLevel::SKIP_AFTER_STORED`] chunks are stored raw before zstd is
/// tried again, so incompressible data costs no CPU. Shared by the tasks that compress in parallel.
#[derive(Debug, Clone)]
pub struct AdaptiveLevel {
    level: i32,
    skip: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl AdaptiveLevel {
    pub const SKIP_AFTER_STORED: u32 = 16;

    pub fn new(level: i32) -> Self {
        AdaptiveLevel { level, skip: Default::default() }
    }

    /// The level to use for the next chunk, or None to store it raw.
    pub fn next(&self) -> Option<i32> {
        use std::sync::atomic::Ordering::Relaxed;
        let skipping = self.skip.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1)).is_ok();
        (!skipping).then_some(self.level)
    }

    /// Reports how a chunk encoded with the level [`AdaptiveLevel::next`] gave went.
    pub fn record(&self, tried: Option<i32>, compressed: bool) {
        if tried.is_some() && !compressed {
            self.skip.store(Self::SKIP_AFTER_STORED, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// A parsed chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub raw_len: usize,
    pub enc_len: usize,
    pub compressed: bool,
}

/// Appends one encoded chunk for `raw` (at most MAX_CHUNK bytes, not empty) to `out`, compressed at
/// `level` when that makes it smaller. Returns whether it was compressed.
pub fn encode(raw: &[u8], level: i32, out: &mut Vec<u8>) -> bool {
    encode_with(raw, Some(level), out)
}

/// Like [`encode`]; `None` stores the chunk raw without trying (for data known not to compress).
pub fn encode_with(raw: &[u8], level: Option<i32>, out: &mut Vec<u8>) -> bool {
    assert!(!raw.is_empty() && raw.len() <= MAX_CHUNK, "chunk of {} bytes", raw.len());
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    let compressed = match level.map(|l| zstd::bulk::compress(raw, l)) {
        Some(Ok(c)) if c.len() < raw.len() => {
            out.extend_from_slice(&c);
            true
        }
        _ => {
            out.extend_from_slice(raw);
            false
        }
    };
    let enc_len = (out.len() - start - HEADER_LEN) as u32;
    out[start..start + 4].copy_from_slice(&(raw.len() as u32).to_le_bytes());
    let flagged = if compressed { enc_len | COMPRESSED } else { enc_len };
    out[start + 4..start + 8].copy_from_slice(&flagged.to_le_bytes());
    compressed
}

/// The header of a chunk of `raw_len` bytes stored raw (the bytes follow it as they are).
pub fn stored_header(raw_len: usize) -> [u8; HEADER_LEN] {
    assert!(raw_len > 0 && raw_len <= MAX_CHUNK, "chunk of {raw_len} bytes");
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&(raw_len as u32).to_le_bytes());
    h[4..8].copy_from_slice(&(raw_len as u32).to_le_bytes());
    h
}

/// The end-of-sequence marker.
pub fn end_marker() -> [u8; HEADER_LEN] {
    [0u8; HEADER_LEN]
}

/// Parses a header. `Ok(None)` is the end marker.
pub fn parse_header(h: [u8; HEADER_LEN]) -> Result<Option<ChunkHeader>, ProtocolError> {
    let raw_len = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes")) as usize;
    let word = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
    let compressed = word & COMPRESSED != 0;
    let enc_len = (word & !COMPRESSED) as usize;
    if raw_len == 0 {
        return if word == 0 {
            Ok(None)
        } else {
            Err(ProtocolError::BadChunk("end marker with a payload length".into()))
        };
    }
    if raw_len > MAX_CHUNK {
        return Err(ProtocolError::BadChunk(format!("raw length {raw_len} over the limit {MAX_CHUNK}")));
    }
    if enc_len == 0 || enc_len > MAX_ENCODED {
        return Err(ProtocolError::BadChunk(format!("encoded length {enc_len} out of range")));
    }
    if !compressed && enc_len != raw_len {
        return Err(ProtocolError::BadChunk(format!(
            "stored chunk with encoded length {enc_len} != raw length {raw_len}"
        )));
    }
    Ok(Some(ChunkHeader { raw_len, enc_len, compressed }))
}

/// Decodes a payload of `h.enc_len` bytes into exactly `h.raw_len` bytes.
pub fn decode(h: &ChunkHeader, payload: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    if payload.len() != h.enc_len {
        return Err(ProtocolError::BadChunk("payload length differs from header".into()));
    }
    if !h.compressed {
        return Ok(payload.to_vec());
    }
    // The capacity bounds the output: zstd fails instead of growing past raw_len.
    let out = zstd::bulk::decompress(payload, h.raw_len).map_err(|e| ProtocolError::BadChunk(format!("zstd: {e}")))?;
    if out.len() != h.raw_len {
        return Err(ProtocolError::BadChunk(format!("decompressed to {} bytes, header said {}", out.len(), h.raw_len)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(raw: &[u8]) -> bool {
        let mut out = Vec::new();
        let compressed = encode(raw, DEFAULT_LEVEL, &mut out);
        let h = parse_header(out[..HEADER_LEN].try_into().unwrap()).unwrap().unwrap();
        assert_eq!(decode(&h, &out[HEADER_LEN..]).unwrap(), raw);
        compressed
    }

    #[test]
    fn zeros_compress_and_random_is_stored() {
        assert!(round_trip(&vec![0u8; MAX_CHUNK]));
        let random = crate::test_util::incompressible(0x9e3779b97f4a7c15, MAX_CHUNK);
        assert!(!round_trip(&random));
    }

    #[test]
    fn hostile_headers_are_refused() {
        let mut h = [0u8; 8];
        h[0..4].copy_from_slice(&((MAX_CHUNK as u32) + 1).to_le_bytes());
        h[4..8].copy_from_slice(&(10 | COMPRESSED).to_le_bytes());
        assert!(parse_header(h).is_err());
        h[0..4].copy_from_slice(&100u32.to_le_bytes());
        h[4..8].copy_from_slice(&200u32.to_le_bytes());
        assert!(parse_header(h).is_err(), "stored chunk must have enc == raw");
        h[4..8].copy_from_slice(&(u32::MAX).to_le_bytes());
        assert!(parse_header(h).is_err());
        h[0..4].copy_from_slice(&0u32.to_le_bytes());
        h[4..8].copy_from_slice(&5u32.to_le_bytes());
        assert!(parse_header(h).is_err(), "end marker must be all zero");
        assert_eq!(parse_header(end_marker()).unwrap(), None);
    }

    #[test]
    fn zip_bomb_is_bounded_by_raw_len() {
        // A chunk that claims 10 raw bytes but inflates to 1 MiB.
        let bomb = zstd::bulk::compress(&vec![0u8; MAX_CHUNK], 1).unwrap();
        let h = ChunkHeader { raw_len: 10, enc_len: bomb.len(), compressed: true };
        assert!(decode(&h, &bomb).is_err());
    }
}
