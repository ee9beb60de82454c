//! Reading the CRIU image files the agents need: `pagemap-<pid>.img` (which private pages a task has,
//! and whether their bytes are in `pages-<id>.img` or left lazy in the frozen task).
//!
//! Framing (criu/image.c, criu/protobuf.c): `u32 IMG_COMMON_MAGIC`, `u32` per-type magic, then entries,
//! each a `u32` length and one protobuf message, to EOF; all little-endian on x86-64. A pagemap starts
//! with `pagemap_head{pages_id=1}` and continues with `pagemap_entry{vaddr=1, nr_pages=2, in_parent=3,
//! flags=4}`. Every length is checked against [`MAX_ENTRY`] before it is used: images come from a peer
//! on the target side.

use std::path::{Path, PathBuf};

/// Page size of every image this crate reads (x86-64; the Hello refuses a peer with another).
pub const PAGE_SIZE: u64 = 4096;
/// `IMG_COMMON_MAGIC` (criu/include/magic.h).
pub const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
/// `PAGEMAP_MAGIC`.
pub const PAGEMAP_MAGIC: u32 = 0x5608_4025;
/// Pages whose data is in the parent images (no bytes here).
pub const PE_PARENT: u32 = 1;
/// Pages that may be restored lazily (through userfaultfd).
pub const PE_LAZY: u32 = 2;
/// Pages whose bytes are in this directory's `pages-<id>.img`.
pub const PE_PRESENT: u32 = 4;
/// Largest entry accepted. A pagemap entry is about 20 bytes; CRIU's largest images (core, mm) stay far
/// below this.
pub const MAX_ENTRY: usize = 16 << 20;

/// Errors reading an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("reading {path}: {source}", path = .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a CRIU image of the expected kind: {what}", path = .path.display())]
    Malformed { path: PathBuf, what: String },
}

#[derive(Clone, PartialEq, prost::Message)]
struct PagemapHead {
    #[prost(uint32, required, tag = "1")]
    pages_id: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PagemapEntryPb {
    #[prost(uint64, required, tag = "1")]
    vaddr: u64,
    #[prost(uint32, required, tag = "2")]
    nr_pages: u32,
    #[prost(bool, optional, tag = "3")]
    in_parent: Option<bool>,
    #[prost(uint32, optional, tag = "4")]
    flags: Option<u32>,
    /// CRIU >= 4.2 (its PR #2750) writes the page count here as uint64 and 0 in `nr_pages`.
    #[prost(uint64, optional, tag = "5")]
    nr_pages_u64: Option<u64>,
}

/// One run of pages of a task, at its dump-time address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagemapEntry {
    pub vaddr: u64,
    pub nr_pages: u32,
    /// PE_* bits (legacy entries without flags are converted: in_parent → PE_PARENT, else PE_PRESENT).
    pub flags: u32,
}

impl PagemapEntry {
    pub fn end(&self) -> u64 {
        self.vaddr + self.nr_pages as u64 * PAGE_SIZE
    }
    pub fn is_lazy(&self) -> bool {
        self.flags & PE_LAZY != 0
    }
    pub fn is_present(&self) -> bool {
        self.flags & PE_PRESENT != 0
    }
}

/// A task's `pagemap-<pid>.img`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pagemap {
    /// The pages file: `pages-<pages_id>.img`.
    pub pages_id: u32,
    pub entries: Vec<PagemapEntry>,
}

impl Pagemap {
    /// The ranges `[start, end)` whose pages are lazy: not in the pages file, to be filled through
    /// userfaultfd. Adjacent entries are merged.
    pub fn lazy_ranges(&self) -> Vec<std::ops::Range<u64>> {
        let mut out: Vec<std::ops::Range<u64>> = Vec::new();
        for e in self.entries.iter().filter(|e| e.is_lazy() && !e.is_present()) {
            match out.last_mut() {
                Some(last) if last.end == e.vaddr => last.end = e.end(),
                _ => out.push(e.vaddr..e.end()),
            }
        }
        out
    }

    /// Pages of lazy ranges.
    pub fn lazy_pages(&self) -> u64 {
        self.lazy_ranges().iter().map(|r| (r.end - r.start) / PAGE_SIZE).sum()
    }
}

/// Reads `path` as a pagemap image.
pub fn read_pagemap(path: &Path) -> Result<Pagemap, ImageError> {
    let data = std::fs::read(path).map_err(|source| ImageError::Io { path: path.into(), source })?;
    parse_pagemap(&data).map_err(|what| ImageError::Malformed { path: path.into(), what })
}

/// Parses the bytes of a pagemap image.
pub fn parse_pagemap(data: &[u8]) -> Result<Pagemap, String> {
    let mut entries = Entries::new(data, PAGEMAP_MAGIC)?;
    let head: PagemapHead = entries.next_msg()?.ok_or("no pagemap_head entry")?;
    let mut out = Pagemap { pages_id: head.pages_id, entries: Vec::new() };
    let mut last_end = 0u64;
    while let Some(e) = entries.next_msg::<PagemapEntryPb>()? {
        let flags = e.flags.unwrap_or(if e.in_parent == Some(true) { PE_PARENT } else { PE_PRESENT });
        let nr_pages = match e.nr_pages_u64 {
            Some(n) => u32::try_from(n).map_err(|_| format!("entry at {:#x} with {n} pages", e.vaddr))?,
            None => e.nr_pages,
        };
        let entry = PagemapEntry { vaddr: e.vaddr, nr_pages, flags };
        if e.vaddr % PAGE_SIZE != 0 || nr_pages == 0 {
            return Err(format!("entry at {:#x} with {nr_pages} pages is not page-aligned or empty", e.vaddr));
        }
        let end = e.vaddr.checked_add(nr_pages as u64 * PAGE_SIZE).ok_or("entry wraps around")?;
        if e.vaddr < last_end {
            return Err(format!("entry at {:#x} overlaps or precedes the previous one", e.vaddr));
        }
        last_end = end;
        out.entries.push(entry);
    }
    Ok(out)
}

/// The pids that have a `pagemap-<pid>.img` in `dir`, sorted.
pub fn pagemap_pids(dir: &Path) -> Result<Vec<u32>, ImageError> {
    let rd = std::fs::read_dir(dir).map_err(|source| ImageError::Io { path: dir.into(), source })?;
    let mut pids: Vec<u32> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let name = name.to_str()?;
            name.strip_prefix("pagemap-")?.strip_suffix(".img")?.parse().ok()
        })
        .collect();
    pids.sort_unstable();
    Ok(pids)
}

/// Lazy ranges `[start, end)` per image pid, at dump-time addresses.
pub type LazyRanges = Vec<(u32, Vec<std::ops::Range<u64>>)>;

/// Every task's lazy ranges in an images dir.
pub fn lazy_ranges(dir: &Path) -> Result<LazyRanges, ImageError> {
    pagemap_pids(dir)?
        .into_iter()
        .map(|pid| Ok((pid, read_pagemap(&dir.join(format!("pagemap-{pid}.img")))?.lazy_ranges())))
        .collect()
}

/// The entries of one image: magic checked, then length-prefixed protobuf messages.
struct Entries<'a> {
    rest: &'a [u8],
}

impl<'a> Entries<'a> {
    fn new(data: &'a [u8], magic: u32) -> Result<Self, String> {
        let word = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
        if data.len() < 8 {
            return Err("shorter than its header".into());
        }
        if word(&data[0..4]) != IMG_COMMON_MAGIC || word(&data[4..8]) != magic {
            return Err(format!(
                "magic {:#x} {:#x}, expected {IMG_COMMON_MAGIC:#x} {magic:#x}",
                word(&data[0..4]),
                word(&data[4..8])
            ));
        }
        Ok(Entries { rest: &data[8..] })
    }

    fn next_msg<M: prost::Message + Default>(&mut self) -> Result<Option<M>, String> {
        if self.rest.is_empty() {
            return Ok(None);
        }
        if self.rest.len() < 4 {
            return Err("truncated entry length".into());
        }
        let len = u32::from_le_bytes(self.rest[0..4].try_into().expect("4 bytes")) as usize;
        if len > MAX_ENTRY || len > self.rest.len() - 4 {
            return Err(format!("entry of {len} bytes, beyond the image or the limit of {MAX_ENTRY}"));
        }
        let msg = M::decode(&self.rest[4..4 + len]).map_err(|e| format!("entry does not decode: {e}"))?;
        self.rest = &self.rest[4 + len..];
        Ok(Some(msg))
    }
}

/// Encodes a pagemap image as CRIU 4.2 does (page counts in field 5), for tests and fakes of CRIU.
pub fn encode_pagemap(p: &Pagemap) -> Vec<u8> {
    use prost::Message;
    let mut out = Vec::new();
    out.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
    out.extend_from_slice(&PAGEMAP_MAGIC.to_le_bytes());
    let mut push = |m: &dyn Fn(&mut Vec<u8>)| {
        let mut buf = Vec::new();
        m(&mut buf);
        out.extend_from_slice(&(buf.len() as u32).to_le_bytes());
        out.extend_from_slice(&buf);
    };
    push(&|b| PagemapHead { pages_id: p.pages_id }.encode(b).expect("vec"));
    for e in &p.entries {
        let pb = PagemapEntryPb {
            vaddr: e.vaddr,
            nr_pages: 0,
            in_parent: None,
            flags: Some(e.flags),
            nr_pages_u64: Some(e.nr_pages.into()),
        };
        push(&|b| pb.encode(b).expect("vec"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_lazy_ranges() {
        let p = Pagemap {
            pages_id: 1,
            entries: vec![
                PagemapEntry { vaddr: 0x1000, nr_pages: 2, flags: PE_PRESENT },
                PagemapEntry { vaddr: 0x10000, nr_pages: 4, flags: PE_LAZY },
                PagemapEntry { vaddr: 0x14000, nr_pages: 1, flags: PE_LAZY },
                PagemapEntry { vaddr: 0x20000, nr_pages: 1, flags: PE_LAZY | PE_PRESENT },
                PagemapEntry { vaddr: 0x30000, nr_pages: 3, flags: PE_LAZY },
            ],
        };
        let back = parse_pagemap(&encode_pagemap(&p)).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.lazy_ranges(), vec![0x10000..0x15000, 0x30000..0x33000]);
        assert_eq!(back.lazy_pages(), 8);
    }

    #[test]
    fn criu_4_1_page_counts_are_read_too() {
        use prost::Message;
        let mut img = encode_pagemap(&Pagemap { pages_id: 3, entries: vec![] });
        let old =
            PagemapEntryPb { vaddr: 0x5000, nr_pages: 7, in_parent: None, flags: Some(PE_LAZY), nr_pages_u64: None };
        img.extend_from_slice(&(old.encoded_len() as u32).to_le_bytes());
        img.extend_from_slice(&old.encode_to_vec());
        let p = parse_pagemap(&img).unwrap();
        assert_eq!(p.entries, vec![PagemapEntry { vaddr: 0x5000, nr_pages: 7, flags: PE_LAZY }]);
    }

    #[test]
    fn hostile_images_are_errors() {
        assert!(parse_pagemap(&[]).is_err());
        assert!(parse_pagemap(&[0u8; 8]).is_err(), "bad magic");
        let good = encode_pagemap(&Pagemap {
            pages_id: 1,
            entries: vec![PagemapEntry { vaddr: 0x1000, nr_pages: 1, flags: PE_LAZY }],
        });
        for cut in 9..good.len() {
            // Every strict prefix is either a shorter valid image or an error, never a panic.
            let _ = parse_pagemap(&good[..cut]);
        }
        let mut huge = good[..8].to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_pagemap(&huge).unwrap_err().contains("beyond"));
        let overlapping = encode_pagemap(&Pagemap {
            pages_id: 1,
            entries: vec![
                PagemapEntry { vaddr: 0x2000, nr_pages: 2, flags: PE_LAZY },
                PagemapEntry { vaddr: 0x3000, nr_pages: 1, flags: PE_LAZY },
            ],
        });
        assert!(parse_pagemap(&overlapping).unwrap_err().contains("overlaps"));
    }
}
