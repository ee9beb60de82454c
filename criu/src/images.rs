//! Reading the CRIU image files the agents need: `pagemap-<pid>.img` (which private pages a task has,
//! and whether their bytes are in `pages-<id>.img` or left lazy in the frozen task).
//!
//! Framing (criu/image.c, criu/protobuf.c): `u32 IMG_COMMON_MAGIC`, `u32` per-type magic, then entries,
//! each a `u32` length and one protobuf message, to EOF; all little-endian on x86-64. A pagemap starts
//! with `pagemap_head{pages_id=1}` and continues with `pagemap_entry{vaddr=1, nr_pages=2, in_parent=3,
//! flags=4}`. Every length is checked against [`MAX_ENTRY`] before it is used: images come from a peer
//! on the target side.
//!
//! Unix sockets ([`unix_sockets`], [`queued_bytes`]): CRIU 4.x writes them to `files.img` (FILES_MAGIC)
//! as `file_entry{type=1 (fd_types UNIXSK = 5), id=2, usk=16 unix_sk_entry}`, older CRIU to `unixsk.img`
//! (UNIXSK_MAGIC) as bare `unix_sk_entry{id=1, ino=2, type=3, state=4, flags=5, uflags=6, backlog=7,
//! peer=8, fown=9, opts=10, name=11, ...}` (images/fdinfo.proto, images/sk-unix.proto). The unread bytes
//! of sockets are in `sk-queues.img` (SK_QUEUES_MAGIC, after the common magic like every image):
//! `sk_packet_entry{id_for=1, length=2, scm=4, ...}` (images/sk-packet.proto), each entry followed by
//! `length` raw bytes; `id_for` is the socket's `unix_sk_entry.id` (= its `file_entry.id`).

use std::path::{Path, PathBuf};

/// Bytes free for image files on the file system of `dir` (what an unprivileged writer may still use);
/// 0 when it cannot be told. Both agents check it before CRIU or a peer writes images there.
pub fn free_bytes(dir: &Path) -> u64 {
    match nix::sys::statvfs::statvfs(dir) {
        Ok(s) => s.blocks_available() * s.fragment_size(),
        Err(_) => 0,
    }
}

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
        self.ranges(|e| e.is_lazy() && !e.is_present())
    }

    /// The ranges `[start, end)` whose pages are in the pages file. Adjacent entries are merged.
    pub fn present_ranges(&self) -> Vec<std::ops::Range<u64>> {
        self.ranges(PagemapEntry::is_present)
    }

    fn ranges(&self, which: impl Fn(&PagemapEntry) -> bool) -> Vec<std::ops::Range<u64>> {
        let mut out: Vec<std::ops::Range<u64>> = Vec::new();
        for e in self.entries.iter().filter(|e| which(e)) {
            match out.last_mut() {
                Some(last) if last.end == e.vaddr => last.end = e.end(),
                _ => out.push(e.vaddr..e.end()),
            }
        }
        out
    }

    /// Pages of lazy ranges.
    pub fn lazy_pages(&self) -> u64 {
        pages_in(&self.lazy_ranges())
    }
}

/// Pages in `ranges` (page-aligned `[start, end)` address ranges, as [`Pagemap`] gives them).
pub fn pages_in(ranges: &[std::ops::Range<u64>]) -> u64 {
    ranges.iter().map(|r| (r.end - r.start) / PAGE_SIZE).sum()
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

/// `PSTREE_MAGIC`: `pstree.img`, one `pstree_entry` per task of the dump.
pub const PSTREE_MAGIC: u32 = 0x5027_3030;

/// One task of a dump (`pstree_entry{pid=1, ppid=2, pgid=3, sid=4, threads=5}`, images/pstree.proto).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PstreeEntry {
    #[prost(uint32, required, tag = "1")]
    pub pid: u32,
    #[prost(uint32, required, tag = "2")]
    pub ppid: u32,
    #[prost(uint32, required, tag = "3")]
    pub pgid: u32,
    #[prost(uint32, required, tag = "4")]
    pub sid: u32,
    #[prost(uint32, repeated, packed = "false", tag = "5")]
    pub threads: Vec<u32>,
}

/// The tasks CRIU dumped (`pstree.img`), root first: the tree as it was frozen, which may differ from
/// what was seen before the freeze (a child forked or exited meanwhile).
pub fn read_pstree(dir: &Path) -> Result<Vec<PstreeEntry>, ImageError> {
    let path = dir.join("pstree.img");
    let data = std::fs::read(&path).map_err(|source| ImageError::Io { path: path.clone(), source })?;
    parse_pstree(&data).map_err(|what| ImageError::Malformed { path, what })
}

/// Parses the bytes of a pstree image.
pub fn parse_pstree(data: &[u8]) -> Result<Vec<PstreeEntry>, String> {
    let mut entries = Entries::new(data, PSTREE_MAGIC)?;
    let mut out = Vec::new();
    while let Some(e) = entries.next_msg::<PstreeEntry>()? {
        if e.pid == 0 {
            return Err("a task with pid 0".into());
        }
        out.push(e);
    }
    if out.is_empty() {
        return Err("no task".into());
    }
    Ok(out)
}

/// `FILES_MAGIC`: `files.img`, one `file_entry` per open file of the dump (CRIU >= 3.x).
pub const FILES_MAGIC: u32 = 0x5630_3138;
/// `UNIXSK_MAGIC`: the legacy `unixsk.img`, one bare `unix_sk_entry` per socket.
pub const UNIXSK_MAGIC: u32 = 0x5437_3943;
/// `SK_QUEUES_MAGIC`: `sk-queues.img`, the unread bytes of sockets.
pub const SK_QUEUES_MAGIC: u32 = 0x5626_4026;
/// `fd_types.UNIXSK` (images/fdinfo.proto): the `file_entry.type` of a unix socket.
pub const FD_TYPE_UNIXSK: i32 = 5;
/// `unix_sk_entry.uflags` bit of the synthetic entry CRIU writes for a peer outside the dumped tree
/// (`USK_EXTERN` in criu/sk-unix.c). Such an entry has type SOCK_DGRAM, state TCP_LISTEN and
/// `peer` 0 whatever the real peer is; its `name` is the peer's name.
pub const USK_EXTERN: u32 = 1;

#[derive(Clone, PartialEq, prost::Message)]
struct UnixSkEntryPb {
    #[prost(uint32, required, tag = "1")]
    id: u32,
    #[prost(uint32, required, tag = "2")]
    ino: u32,
    #[prost(uint32, required, tag = "3")]
    sock_type: u32,
    #[prost(uint32, required, tag = "4")]
    state: u32,
    #[prost(uint32, required, tag = "5")]
    flags: u32,
    #[prost(uint32, required, tag = "6")]
    uflags: u32,
    #[prost(uint32, required, tag = "7")]
    backlog: u32,
    #[prost(uint32, required, tag = "8")]
    peer: u32,
    // fown = 9 and opts = 10 (messages) are not needed and skipped as unknown fields.
    #[prost(bytes = "vec", required, tag = "11")]
    name: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct FileEntryPb {
    /// An `fd_types` enum value; declared as int32 (same wire form) so unknown types still decode.
    #[prost(int32, required, tag = "1")]
    file_type: i32,
    #[prost(uint32, required, tag = "2")]
    id: u32,
    // reg = 3 ... ext = 15 and fifo = 17 ... are skipped as unknown fields.
    #[prost(message, optional, tag = "16")]
    usk: Option<UnixSkEntryPb>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SkPacketEntryPb {
    #[prost(uint32, required, tag = "1")]
    id_for: u32,
    #[prost(uint32, required, tag = "2")]
    length: u32,
    // addr = 3 (reserved), scm = 4, ucred = 128, ... are skipped as unknown fields.
}

/// One `unix_sk_entry` of a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixSocketImage {
    /// The entry's id: the `file_entry.id` that `fdinfo` entries and `sk_packet_entry.id_for` refer to.
    pub id: u32,
    /// The socket's inode at dump time (`/proc/PID/fd/N` → `socket:[ino]`).
    pub ino: u64,
    /// `SOCK_STREAM` (1), `SOCK_DGRAM` (2) or `SOCK_SEQPACKET` (5).
    pub sock_type: u32,
    /// A TCP state: `TCP_ESTABLISHED` (1), `TCP_CLOSE` (7) or `TCP_LISTEN` (10).
    pub state: u32,
    /// The peer's inode, 0 when none. An external peer has its own entry, with [`USK_EXTERN`].
    pub peer: u64,
    /// The bound name as the kernel reports it: a path name ends with its terminating NUL (the kernel
    /// counts it), an abstract name starts with NUL and is kept byte for byte; empty when unnamed.
    pub name: Vec<u8>,
    /// CRIU's `USK_*` bits, e.g. [`USK_EXTERN`].
    pub uflags: u32,
}

impl UnixSocketImage {
    /// Whether this is CRIU's synthetic entry for a peer outside the dumped tree.
    pub fn is_extern(&self) -> bool {
        self.uflags & USK_EXTERN != 0
    }

    fn from_pb(u: UnixSkEntryPb) -> Self {
        UnixSocketImage {
            id: u.id,
            ino: u.ino.into(),
            sock_type: u.sock_type,
            state: u.state,
            peer: u.peer.into(),
            name: u.name,
            uflags: u.uflags,
        }
    }
}

/// Every unix socket in the dump directory: those of `files.img` (CRIU 4.x) and, when it exists, of the
/// legacy `unixsk.img`, in image order. A missing `files.img` is an error.
pub fn unix_sockets(images_dir: &Path) -> Result<Vec<UnixSocketImage>, ImageError> {
    let files = images_dir.join("files.img");
    let data = std::fs::read(&files).map_err(|source| ImageError::Io { path: files.clone(), source })?;
    let mut out = parse_files_unix_sockets(&data).map_err(|what| ImageError::Malformed { path: files, what })?;
    let legacy = images_dir.join("unixsk.img");
    match std::fs::read(&legacy) {
        Ok(data) => out.extend(parse_unixsk(&data).map_err(|what| ImageError::Malformed { path: legacy, what })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(ImageError::Io { path: legacy, source }),
    }
    Ok(out)
}

/// The unix sockets among the bytes of a `files.img`.
pub fn parse_files_unix_sockets(data: &[u8]) -> Result<Vec<UnixSocketImage>, String> {
    let mut entries = Entries::new(data, FILES_MAGIC)?;
    let mut out = Vec::new();
    while let Some(fe) = entries.next_msg::<FileEntryPb>()? {
        if fe.file_type != FD_TYPE_UNIXSK {
            continue;
        }
        let usk = fe.usk.ok_or_else(|| format!("unix socket file {:#x} without its unix_sk_entry", fe.id))?;
        if usk.id != fe.id {
            return Err(format!("unix socket file {:#x} holds a unix_sk_entry of id {:#x}", fe.id, usk.id));
        }
        out.push(UnixSocketImage::from_pb(usk));
    }
    Ok(out)
}

/// The sockets of a legacy `unixsk.img`.
pub fn parse_unixsk(data: &[u8]) -> Result<Vec<UnixSocketImage>, String> {
    let mut entries = Entries::new(data, UNIXSK_MAGIC)?;
    let mut out = Vec::new();
    while let Some(u) = entries.next_msg::<UnixSkEntryPb>()? {
        out.push(UnixSocketImage::from_pb(u));
    }
    Ok(out)
}

/// The unread bytes of the socket whose dumped inode is `ino`, in queue order: the payloads of its
/// `sk-queues.img` entries concatenated (for a datagram socket the message boundaries are lost; SCM
/// rights and credentials are not returned). Empty when nothing was queued or there is no
/// `sk-queues.img`. A socket of that inode must be in the dump ([`unix_sockets`]; [`USK_EXTERN`] entries
/// are not sockets of the dump), else Malformed. More than `limit` bytes in total is refused (Malformed)
/// before they are read. The image is streamed: memory stays within `limit` plus one entry.
pub fn queued_bytes(images_dir: &Path, ino: u64, limit: usize) -> Result<Vec<u8>, ImageError> {
    let ids: Vec<u32> =
        unix_sockets(images_dir)?.into_iter().filter(|s| s.ino == ino && !s.is_extern()).map(|s| s.id).collect();
    if ids.is_empty() {
        return Err(ImageError::Malformed {
            path: images_dir.into(),
            what: format!("no unix socket of inode {ino} in the dump"),
        });
    }
    let path = images_dir.join("sk-queues.img");
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ImageError::Io { path, source }),
    };
    read_queues(file, &ids, limit).map_err(|e| match e {
        QueueError::Io(source) => ImageError::Io { path: path.clone(), source },
        QueueError::Malformed(what) => ImageError::Malformed { path: path.clone(), what },
    })
}

enum QueueError {
    Io(std::io::Error),
    Malformed(String),
}

impl From<std::io::Error> for QueueError {
    fn from(e: std::io::Error) -> Self {
        QueueError::Io(e)
    }
}

/// A file read front to back, never past the size it had when opened.
struct Bounded {
    r: std::io::BufReader<std::fs::File>,
    /// Bytes not consumed yet (a file growing meanwhile is not read beyond its size at open; one
    /// shrinking gives a truncation error).
    left: u64,
}

impl Bounded {
    fn take(&mut self, buf: &mut [u8], what: &str) -> Result<(), QueueError> {
        use std::io::Read;
        if buf.len() as u64 > self.left {
            return Err(QueueError::Malformed(format!(
                "truncated {what}: {} bytes needed, {} left",
                buf.len(),
                self.left
            )));
        }
        self.r.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                QueueError::Malformed(format!("truncated {what}: the file shrank while read"))
            }
            _ => QueueError::Io(e),
        })?;
        self.left -= buf.len() as u64;
        Ok(())
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<(), QueueError> {
        if n > self.left {
            return Err(QueueError::Malformed(format!("truncated {what}: {n} bytes needed, {} left", self.left)));
        }
        let n_i64 = i64::try_from(n).map_err(|_| QueueError::Malformed(format!("{what} of {n} bytes")))?;
        self.r.seek_relative(n_i64)?;
        self.left -= n;
        Ok(())
    }
}

/// Reads `sk-queues.img` from `file`, keeping the payloads of entries whose `id_for` is in `ids`.
fn read_queues(file: std::fs::File, ids: &[u32], limit: usize) -> Result<Vec<u8>, QueueError> {
    use prost::Message;
    let bad = QueueError::Malformed;
    let left = file.metadata()?.len();
    let mut f = Bounded { r: std::io::BufReader::new(file), left };
    let mut head = [0u8; 8];
    f.take(&mut head, "image header")?;
    let (common, magic) = (
        u32::from_le_bytes(head[0..4].try_into().expect("4 bytes")),
        u32::from_le_bytes(head[4..8].try_into().expect("4 bytes")),
    );
    if common != IMG_COMMON_MAGIC || magic != SK_QUEUES_MAGIC {
        return Err(bad(format!("magic {common:#x} {magic:#x}, expected {IMG_COMMON_MAGIC:#x} {SK_QUEUES_MAGIC:#x}")));
    }
    let mut out = Vec::new();
    let mut entry = Vec::new();
    while f.left > 0 {
        let mut len = [0u8; 4];
        f.take(&mut len, "entry length")?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_ENTRY || len as u64 > f.left {
            return Err(bad(format!(
                "entry of {len} bytes, beyond the image ({} left) or the limit of {MAX_ENTRY}",
                f.left
            )));
        }
        entry.resize(len, 0);
        f.take(&mut entry, "sk_packet_entry")?;
        let pe = SkPacketEntryPb::decode(entry.as_slice())
            .map_err(|e| bad(format!("sk_packet_entry does not decode: {e}")))?;
        let length = u64::from(pe.length);
        if length > f.left {
            return Err(bad(format!(
                "truncated queued data of socket id {:#x}: {length} bytes announced, {} left in the image",
                pe.id_for, f.left
            )));
        }
        if ids.contains(&pe.id_for) {
            let total = out.len() as u64 + length;
            if total > limit as u64 {
                return Err(bad(format!(
                    "queued data of socket id {:#x}: at least {total} bytes, beyond the limit of {limit}",
                    pe.id_for
                )));
            }
            let start = out.len();
            out.resize(start + pe.length as usize, 0);
            f.take(&mut out[start..], "queued data")?;
        } else {
            f.skip(length, "queued data")?;
        }
    }
    Ok(out)
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

    /// Bytes of a `pstree.img` that CRIU 4.2.1 wrote for tmux (server, shell, `sleep`): the shell's
    /// `sleep` child was forked after the tree was first looked at.
    #[test]
    fn pstree_of_a_real_dump() {
        let img = [
            0x19, 0x43, 0x56, 0x54, 0x30, 0x30, 0x27, 0x50, 0x12, 0, 0, 0, 0x08, 0xff, 0xcf, 0x01, 0x10, 0x00, 0x18,
            0xff, 0xcf, 0x01, 0x20, 0xff, 0xcf, 0x01, 0x28, 0xff, 0xcf, 0x01, 0x14, 0, 0, 0, 0x08, 0x81, 0xd0, 0x01,
            0x10, 0xff, 0xcf, 0x01, 0x18, 0x81, 0xd0, 0x01, 0x20, 0x81, 0xd0, 0x01, 0x28, 0x81, 0xd0, 0x01, 0x14, 0, 0,
            0, 0x08, 0xb2, 0xd0, 0x01, 0x10, 0x81, 0xd0, 0x01, 0x18, 0x81, 0xd0, 0x01, 0x20, 0x81, 0xd0, 0x01, 0x28,
            0xb2, 0xd0, 0x01,
        ];
        let tree = parse_pstree(&img).unwrap();
        let pids: Vec<(u32, u32, Vec<u32>)> = tree.into_iter().map(|e| (e.pid, e.ppid, e.threads)).collect();
        assert_eq!(pids, vec![(26623, 0, vec![26623]), (26625, 26623, vec![26625]), (26674, 26625, vec![26674])]);
        assert!(parse_pstree(&img[..img.len() - 1]).is_err(), "a truncated entry is refused");
        assert!(parse_pstree(&img[..8]).is_err(), "an image without tasks is refused");
        assert!(parse_pstree(&encode_pagemap(&Pagemap { pages_id: 1, entries: vec![] })).is_err(), "wrong magic");
    }

    #[test]
    fn round_trip_and_lazy_and_present_ranges() {
        let p = Pagemap {
            pages_id: 1,
            entries: vec![
                PagemapEntry { vaddr: 0x1000, nr_pages: 2, flags: PE_PRESENT },
                PagemapEntry { vaddr: 0x3000, nr_pages: 1, flags: PE_PRESENT },
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
        assert_eq!(back.present_ranges(), vec![0x1000..0x4000, 0x20000..0x21000]);
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
