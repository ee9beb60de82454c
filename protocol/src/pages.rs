//! The pages stream: memory pages of the migrating tree, sent while it runs (pre-copy rounds) and during
//! the freeze (the final delta).
//!
//! After its [`PagesHeader`](crate::pb::PagesHeader), the stream is a sequence of batches, each a
//! [`PageBatch`](crate::pb::PageBatch) frame followed, when it lists `data` pages, by exactly one chunk
//! ([`crate::chunk`]) of `data.len() * PAGE_SIZE` raw bytes. A batch holds at most [`MAX_DATA_PAGES`] data
//! pages (one chunk) and [`MAX_RECORDS`] records in all; every address is page-aligned. A frozen batch
//! of a lazy migration may also list runs of unchanged pages (`current`, not records): at most
//! [`MAX_RECORDS`] runs covering at most [`MAX_CURRENT_PAGES`] pages. The stream's FIN
//! ends it; the source states in ImagesDone how many records it sent, so a cut stream cannot pass for a
//! complete one.

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::chunk::{self, HEADER_LEN, MAX_CHUNK};
use crate::frame::read_frame;
use crate::{ProtocolError, pb};

/// Page size of the pages stream (the Hello refuses peers with another).
pub const PAGE_SIZE: usize = 4096;
/// Data pages in one batch: one chunk.
pub const MAX_DATA_PAGES: usize = MAX_CHUNK / PAGE_SIZE;
/// Records (data, zero and copy pages) in one batch.
pub const MAX_RECORDS: usize = 16 * 1024;

/// Where page `vaddr` of process `pid` lies when each process's address space is cut into blocks of
/// `block_pages` consecutive pages (how both agents keep per-page state, so that consecutive pages share
/// a block): the block's key (pid, block number) and the page's index in it.
pub fn page_block((pid, vaddr): (u32, u64), block_pages: usize) -> ((u32, u64), usize) {
    let page = vaddr / PAGE_SIZE as u64;
    ((pid, page / block_pages as u64), (page % block_pages as u64) as usize)
}

/// No page of a process lies at or above this address (x86-64 with 5-level page tables: 2^56; arm64:
/// 2^52): a peer's page address or run past it is refused, and sums of addresses and page counts
/// below it cannot overflow.
pub const USER_SPACE_END: u64 = 1 << 57;

/// Pages the `current` runs of one batch may cover (256 MiB of memory).
pub const MAX_CURRENT_PAGES: u64 = 64 * 1024;

/// Pages the `current` runs of a batch cover.
pub fn current_pages(b: &pb::PageBatch) -> u64 {
    b.current.iter().map(|r| r.pages).fold(0, u64::saturating_add)
}

/// Records in a batch.
pub fn records(b: &pb::PageBatch) -> usize {
    b.data.len() + b.zero.len() + b.copies.len()
}

/// Appends the frame of `batch` and, when it has data pages, their chunk (`data` holds them in order,
/// `level` None stores it raw) to `out`. Returns whether the chunk was compressed.
pub fn encode_batch(batch: &pb::PageBatch, data: &[u8], level: Option<i32>, out: &mut Vec<u8>) -> bool {
    encode_frame(batch, data.len(), out);
    if data.is_empty() { false } else { chunk::encode_with(data, level, out) }
}

/// The batch's frame (u32 length, then the message), after checking the limits.
fn encode_frame(batch: &pb::PageBatch, data_len: usize, out: &mut Vec<u8>) {
    assert_eq!(data_len, batch.data.len() * PAGE_SIZE, "data pages and their bytes");
    assert!(
        batch.data.len() <= MAX_DATA_PAGES
            && records(batch) <= MAX_RECORDS
            && batch.current.len() <= MAX_RECORDS
            && current_pages(batch) <= MAX_CURRENT_PAGES,
        "batch over the limits"
    );
    let len = prost::Message::encoded_len(batch);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    prost::Message::encode(batch, out).expect("Vec grows");
}

/// [`encode_batch`] in pieces for a [`BatchSink`]: when the data is stored raw (it did not shrink, or
/// `level` is None) the page bytes travel in the Vec they were read into instead of being copied behind
/// the frame. The same bytes on the wire. Returns the pieces and whether the data was compressed.
pub fn encode_batch_parts(batch: &pb::PageBatch, data: Vec<u8>, level: Option<i32>) -> (Vec<bytes::Bytes>, bool) {
    let mut head = Vec::with_capacity(64 + HEADER_LEN);
    encode_frame(batch, data.len(), &mut head);
    if !data.is_empty() && level.is_some() {
        let frame = head.len();
        if chunk::encode_with(&data, level, &mut head) {
            return (vec![head.into()], true);
        }
        // Did not shrink: drop the stored copy, keep the frame.
        head.truncate(frame);
    }
    if data.is_empty() {
        return (vec![head.into()], false);
    }
    head.extend_from_slice(&chunk::stored_header(data.len()));
    (vec![head.into(), data.into()], false)
}

/// Where encoded batches go, piece by piece: a QUIC stream takes the buffers over without copying them.
pub trait BatchSink {
    fn put(&mut self, parts: Vec<bytes::Bytes>) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
}

impl BatchSink for quinn::SendStream {
    async fn put(&mut self, mut parts: Vec<bytes::Bytes>) -> std::io::Result<()> {
        self.write_all_chunks(&mut parts).await.map_err(std::io::Error::other)
    }
}

/// For tests: the stream's bytes in memory.
impl BatchSink for Vec<u8> {
    async fn put(&mut self, parts: Vec<bytes::Bytes>) -> std::io::Result<()> {
        for p in parts {
            self.extend_from_slice(&p);
        }
        Ok(())
    }
}

/// One batch as read: the message, the bytes of its data pages, and the bytes it took on the stream.
pub type ReadBatch = (pb::PageBatch, Vec<u8>, u64);

/// Reads one batch and the bytes of its data pages. `Ok(None)`: the stream ended cleanly.
///
/// # Cancel safety
/// Not cancel safe.
pub async fn read_batch<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<ReadBatch>, ProtocolError> {
    let Some(batch) = read_frame::<_, pb::PageBatch>(r).await? else {
        return Ok(None);
    };
    check_batch(&batch)?;
    let frame = 4 + prost::Message::encoded_len(&batch) as u64;
    if batch.data.is_empty() {
        return Ok(Some((batch, Vec::new(), frame)));
    }
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).await.map_err(eof_is_truncation)?;
    let header = chunk::parse_header(h)?.ok_or_else(|| bad("a batch with data pages but no chunk"))?;
    if header.raw_len != batch.data.len() * PAGE_SIZE {
        return Err(bad(format!("chunk of {} bytes for {} data pages", header.raw_len, batch.data.len())));
    }
    let mut payload = vec![0u8; header.enc_len];
    r.read_exact(&mut payload).await.map_err(eof_is_truncation)?;
    // A stored chunk is its own data (parse_header checked enc_len == raw_len): no copy.
    let data = if header.compressed { chunk::decode(&header, &payload)? } else { payload };
    Ok(Some((batch, data, frame + (HEADER_LEN + header.enc_len) as u64)))
}

/// The limits every batch from a peer must keep.
pub fn check_batch(b: &pb::PageBatch) -> Result<(), ProtocolError> {
    if b.data.len() > MAX_DATA_PAGES {
        return Err(bad(format!("{} data pages in one batch, over the limit of {MAX_DATA_PAGES}", b.data.len())));
    }
    if records(b) > MAX_RECORDS {
        return Err(bad(format!("{} records in one batch, over the limit of {MAX_RECORDS}", records(b))));
    }
    if b.end && (records(b) > 0 || !b.current.is_empty()) {
        return Err(bad("the end batch lists pages"));
    }
    let aligned = |a: u64| a.is_multiple_of(PAGE_SIZE as u64);
    let all = b.data.iter().chain(&b.zero).chain(b.copies.iter().flat_map(|c| [&c.vaddr, &c.from_vaddr]));
    let mut all = all.copied().chain(b.current.iter().map(|r| r.vaddr));
    if let Some(a) = all.find(|&a| !aligned(a) || a >= USER_SPACE_END) {
        let what = if aligned(a) { "is above user space" } else { "is not page-aligned" };
        return Err(bad(format!("page address {a:#x} {what}")));
    }
    if b.current.is_empty() {
        return Ok(());
    }
    if !b.frozen {
        return Err(bad("current runs in a batch not read from the frozen tree"));
    }
    if b.current.len() > MAX_RECORDS || current_pages(b) > MAX_CURRENT_PAGES {
        return Err(bad(format!(
            "{} current runs of {} pages in one batch, over the limit of {MAX_RECORDS} runs or {MAX_CURRENT_PAGES} pages",
            b.current.len(),
            current_pages(b)
        )));
    }
    if let Some(r) = b.current.iter().find(|r| r.pages == 0 || r.vaddr + r.pages * PAGE_SIZE as u64 > USER_SPACE_END) {
        return Err(bad(format!("current run of {} pages at {:#x}", r.pages, r.vaddr)));
    }
    Ok(())
}

fn bad(what: impl Into<String>) -> ProtocolError {
    ProtocolError::BadChunk(format!("pages stream: {}", what.into()))
}

fn eof_is_truncation(e: std::io::Error) -> ProtocolError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProtocolError::Truncated,
        _ => ProtocolError::Io(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(data: Vec<u64>) -> pb::PageBatch {
        pb::PageBatch {
            pid: 7,
            round: 1,
            data,
            zero: vec![0x9000],
            copies: vec![pb::PageCopy { from_pid: 7, from_vaddr: 0x1000, vaddr: 0xa000 }],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn round_trip_with_and_without_data() {
        let b = batch(vec![0x1000, 0x3000]);
        let mut data = vec![1u8; PAGE_SIZE];
        data.extend(vec![2u8; PAGE_SIZE]);
        let mut wire = Vec::new();
        assert!(encode_batch(&b, &data, Some(1), &mut wire), "uniform pages compress");
        let empty = pb::PageBatch { data: vec![], ..batch(vec![]) };
        encode_batch(&empty, &[], Some(1), &mut wire);
        let mut r = wire.as_slice();
        let (got, bytes, n1) = read_batch(&mut r).await.unwrap().unwrap();
        assert_eq!((got, bytes), (b, data));
        let (got, bytes, n2) = read_batch(&mut r).await.unwrap().unwrap();
        assert_eq!((got, bytes.len()), (empty, 0));
        assert_eq!(n1 + n2, wire.len() as u64, "the wire sizes add up to the stream");
        assert!(read_batch(&mut r).await.unwrap().is_none());
    }

    /// The pieces are the same bytes as the single buffer, whatever happens to the data.
    #[tokio::test]
    async fn parts_are_the_same_bytes() {
        let random = crate::test_util::incompressible(0x9e3779b97f4a7c15, 2 * PAGE_SIZE);
        let uniform = vec![3u8; 2 * PAGE_SIZE];
        let b = batch(vec![0x1000, 0x3000]);
        let empty = pb::PageBatch { data: vec![], ..batch(vec![]) };
        for (batch, data, level, compressed) in [
            (&b, &random, Some(1), false),
            (&b, &random, None, false),
            (&b, &uniform, Some(1), true),
            (&b, &uniform, None, false),
            (&empty, &Vec::new(), Some(1), false),
        ] {
            let mut one = Vec::new();
            assert_eq!(encode_batch(batch, data, level, &mut one), compressed);
            let (parts, c) = encode_batch_parts(batch, data.clone(), level);
            assert_eq!(c, compressed);
            let mut sink = Vec::new();
            sink.put(parts).await.unwrap();
            assert_eq!(sink, one, "level {level:?}, compressed {compressed}");
            let (got, bytes, _) = read_batch(&mut sink.as_slice()).await.unwrap().unwrap();
            assert_eq!((&got, &bytes), (batch, data));
        }
    }

    #[tokio::test]
    async fn hostile_batches_are_refused() {
        for (b, says) in [
            (pb::PageBatch { zero: vec![0x1001], ..Default::default() }, "not page-aligned"),
            (pb::PageBatch { data: vec![0xffff_ffff_ffff_f000], ..Default::default() }, "above user space"),
            (
                pb::PageBatch {
                    copies: vec![pb::PageCopy { from_pid: 1, from_vaddr: USER_SPACE_END, vaddr: 0 }],
                    ..Default::default()
                },
                "above user space",
            ),
            (pb::PageBatch { end: true, zero: vec![0x1000], ..Default::default() }, "the end batch lists pages"),
        ] {
            let mut wire = Vec::new();
            crate::frame::write_frame(&mut wire, &b).await.unwrap();
            let e = read_batch(&mut wire.as_slice()).await.unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }

        let too_many = pb::PageBatch { data: vec![0; MAX_DATA_PAGES + 1], ..Default::default() };
        let mut wire = Vec::new();
        crate::frame::write_frame(&mut wire, &too_many).await.unwrap();
        assert!(read_batch(&mut wire.as_slice()).await.unwrap_err().to_string().contains("over the limit"));

        // A chunk whose size does not match the data pages announced.
        let b = pb::PageBatch { data: vec![0x1000, 0x2000], ..Default::default() };
        let mut wire = Vec::new();
        crate::frame::write_frame(&mut wire, &b).await.unwrap();
        chunk::encode_with(&[0u8; PAGE_SIZE], None, &mut wire);
        assert!(read_batch(&mut wire.as_slice()).await.unwrap_err().to_string().contains("for 2 data pages"));

        // Current runs: only from the frozen tree, aligned, not empty, not past the end of memory, within
        // the limit.
        let run = |vaddr, pages| pb::PageRun { vaddr, pages };
        for (current, frozen, says) in [
            (vec![run(0x1000, 1)], false, "not read from the frozen tree"),
            (vec![run(0x1800, 1)], true, "not page-aligned"),
            (vec![run(0x1000, 0)], true, "current run of 0 pages"),
            (vec![run(!0xfff, 2)], true, "above user space"),
            (vec![run(USER_SPACE_END - 0x1000, 2)], true, "current run of 2 pages"),
            (vec![run(0x1000, MAX_CURRENT_PAGES), run(0x1000, 1)], true, "over the limit"),
        ] {
            let b = pb::PageBatch { current, frozen, ..Default::default() };
            let mut wire = Vec::new();
            crate::frame::write_frame(&mut wire, &b).await.unwrap();
            let e = read_batch(&mut wire.as_slice()).await.unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
        let b = pb::PageBatch { current: vec![run(0x1000, MAX_CURRENT_PAGES)], frozen: true, ..Default::default() };
        let mut wire = Vec::new();
        encode_batch(&b, &[], None, &mut wire);
        assert_eq!(read_batch(&mut wire.as_slice()).await.unwrap().unwrap().0, b);

        // Cut in the middle of the chunk.
        let mut wire = Vec::new();
        encode_batch(&batch(vec![0x1000]), &[3u8; PAGE_SIZE], None, &mut wire);
        wire.truncate(wire.len() - 10);
        assert!(matches!(read_batch(&mut wire.as_slice()).await.unwrap_err(), ProtocolError::Truncated));
    }
}
