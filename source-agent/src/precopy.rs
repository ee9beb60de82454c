//! Pre-copy: the tree's memory crosses the network while it runs, round after round, and only what
//! changed since is sent during the freeze.
//!
//! What is tracked is *what the target holds*: a content hash (xxh3-128) per page it received, keyed
//! by (pid, address); a page it does not hold is a zero page. A round reads every private anonymous page
//! of every process of the tree (`/proc/PID/maps`, `process_vm_readv`), and sends a page only when its
//! hash differs from the one the target holds: as bytes, as "zero now", or as "a copy of that page you
//! hold" when another page with the same content was sent already. So zero pages never cross, identical
//! pages cross once, and a round after the first sends only what the process changed (content
//! tracking: it works on kernels without soft-dirty, like the ones this was built on, where CRIU's own
//! `pre-dump` aborts and leaves its parasite mapped in the process). Where [`crate::dirty`] knows which
//! pages were written since the previous pass (write-protect tracking, or soft-dirty), a pass reads and
//! compares only those ([`Pass::only`]); with write-protect tracking that holds for the pass over the
//! frozen tree too.
//!
//! Only private anonymous memory is pre-copied: it is what `criu dump --lazy-pages` leaves in the frozen
//! tree (PE_LAZY in its pagemap) instead of writing it out. At the freeze the final delta reads exactly
//! those lazy ranges from the stopped tree and sends what differs; everything else CRIU wrote into the
//! images, which cross as files.
//!
//! The reader runs on a blocking thread and hands batches to compression on the blocking pool, several
//! at once, whose output is written to the pages stream in order: reading, zstd and the network overlap,
//! and chunks that zstd cannot shrink are stored raw ([`protocol::chunk::AdaptiveLevel`]).

use std::collections::HashMap;
use std::io::{IoSliceMut, Read, Seek, SeekFrom};
use std::time::{Duration, Instant};

use futures::StreamExt;
use nix::sys::uio::{RemoteIoVec, process_vm_readv};
use protocol::chunk::AdaptiveLevel;
use protocol::pages::{self, MAX_DATA_PAGES, PAGE_SIZE};
use protocol::pb;

/// Pages read at once from a process.
const READ_PAGES: usize = 256;
/// Batches compressed at once (the blocking pool spreads them over the cores).
const COMPRESS_PARALLEL: usize = 4;
/// Zero and copy records in one batch before it is sent even without data pages.
const MAX_BATCH_RECORDS: usize = 4096;
/// The content hash [`Held`] records for a page the last pass sent without hashing it: it matches no real
/// page's hash but by chance (odds 2^-128), so a pass after it would send the page again.
const UNKNOWN: u128 = 1;

/// Whether a page holds only zeros: 64 bytes at a time (the inner fold vectorizes), so a page with
/// content usually says so in its first line.
fn is_zero(page: &[u8]) -> bool {
    page.chunks(64).all(|line| line.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Hash of a page of zeros.
fn zero_hash() -> u128 {
    static Z: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    *Z.get_or_init(|| xxhash_rust::xxh3::xxh3_128(&[0u8; PAGE_SIZE]))
}

/// A page: (pid, address).
pub type Key = (u32, u64);

/// A range of one process's memory to read: `[start, end)`, page-aligned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub pid: u32,
    pub start: u64,
    pub end: u64,
}

/// Pages per block of [`Held`]: 2 MiB of address space.
const HELD_BLOCK_PAGES: usize = 512;

/// What the target holds, as far as this side knows.
#[derive(Default)]
pub struct Held {
    /// Content hash of every non-zero page the target holds, by (pid, address / 2 MiB), a slot per page
    /// of the block; 0 = not held (a page whose hash is 0, odds 2^-128, is merely sent again). A scan
    /// reads memory in address order, so it walks each block's slots in order instead of missing the
    /// cache on one map entry per page (perf: a map per page was a sixth of the reader's time).
    blocks: HashMap<(u32, u64), Box<[u128; HELD_BLOCK_PAGES]>>,
    /// Pages held (non-zero slots).
    held: usize,
    /// A page the target holds with this content (checked against `blocks` before use). Keyed by the
    /// xxh3 hash itself, not hashed again ([`ByContent`]).
    by_hash: HashMap<u128, Key, std::hash::BuildHasherDefault<ByContent>>,
    /// Records sent on the pages stream so far (the target checks the total).
    pub records: u64,
    /// Pages a pass should have read but could not (unmapped since the pass read /proc/PID/maps): the
    /// next pass reads them whatever dirty tracking says, as the writes it reported are not reported
    /// again.
    unread: std::collections::HashSet<Key>,
}

/// The hasher of [`Held::by_hash`], whose keys are xxh3-128 hashes of page contents already: it takes
/// their low 64 bits as they are instead of running SipHash over them again (perf of a 2 GiB
/// post-copy: SipHash took about 5 % of the reader's thread). Only the tree's own content decides these
/// keys, so a tree that made many of them collide would only slow down its own migration.
#[derive(Default)]
struct ByContent(u64);

impl std::hash::Hasher for ByContent {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Not used by u128 keys (write_u128); kept correct for any other caller.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, h: u128) {
        self.0 = h as u64;
    }
}

/// What one page needs, given its content hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Unchanged,
    Zero,
    Copy(Key),
    Data,
}

impl Held {
    /// The block of `key` and its slot there.
    fn at(key: Key) -> ((u32, u64), usize) {
        pages::page_block(key, HELD_BLOCK_PAGES)
    }

    /// Content hash of page `key` if the target holds it.
    fn get(&self, key: Key) -> Option<u128> {
        let (block, i) = Self::at(key);
        self.blocks.get(&block).map(|b| b[i]).filter(|&h| h != 0)
    }

    /// Whether the target holds page `key`.
    pub fn contains(&self, key: Key) -> bool {
        self.get(key).is_some()
    }

    /// Records `hash` (0: not held) for page `key`.
    fn set(&mut self, key: Key, hash: u128) {
        let (block, i) = Self::at(key);
        let slot = match self.blocks.get_mut(&block) {
            Some(b) => &mut b[i],
            None if hash == 0 => return,
            None => &mut self.blocks.entry(block).or_insert_with(|| Box::new([0; HELD_BLOCK_PAGES]))[i],
        };
        match (*slot != 0, hash != 0) {
            (false, true) => self.held += 1,
            (true, false) => self.held -= 1,
            _ => {}
        }
        *slot = hash;
    }

    /// Decides what page `key` with content hash `hash` needs, and records that the target will hold it.
    pub fn update(&mut self, key: Key, hash: u128) -> Action {
        self.update_with(key, hash, true)
    }

    /// [`Held::update`]; `copies`: whether later pages may be sent as copies of this one (else it is not
    /// indexed by content).
    fn update_with(&mut self, key: Key, hash: u128, copies: bool) -> Action {
        let now = self.get(key);
        if hash == zero_hash() {
            if now.is_none() {
                return Action::Unchanged;
            }
            self.set(key, 0);
            return Action::Zero;
        }
        if now == Some(hash) {
            return Action::Unchanged;
        }
        if !copies {
            self.set(key, hash);
            return Action::Data;
        }
        let action = match self.by_hash.get(&hash) {
            Some(&src) if src != key && self.get(src) == Some(hash) => Action::Copy(src),
            _ => Action::Data,
        };
        // The newest holder is the likeliest to still hold this content later.
        self.by_hash.insert(hash, key);
        self.set(key, hash);
        action
    }

    /// The last pass's decision for page `key` that it read as `page`, without hashing it where it need
    /// not: a page the target does not hold needs only to be told zero from not, and with no pass after
    /// this one nothing will compare against its hash. It is recorded as held with [`UNKNOWN`] content.
    /// Copy records are not sent ([`Pass::no_copies`]).
    fn update_last(&mut self, key: Key, page: &[u8]) -> Action {
        if self.contains(key) {
            return self.update_with(key, xxhash_rust::xxh3::xxh3_128(page), false);
        }
        if is_zero(page) {
            return Action::Unchanged;
        }
        self.set(key, UNKNOWN);
        Action::Data
    }

    /// Pages the target holds.
    pub fn len(&self) -> usize {
        self.held
    }

    pub fn is_empty(&self) -> bool {
        self.held == 0
    }
}

/// Private anonymous memory of `pid` worth pre-copying: private, readable, not backed by a file, and
/// not one of the kernel's special mappings (vdso, vvar, vsyscall), which CRIU never restores lazily.
pub fn regions(pid: u32) -> std::io::Result<Vec<Region>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    Ok(parse_maps(pid, &maps))
}

fn parse_maps(pid: u32, maps: &str) -> Vec<Region> {
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms), Some(_off), Some(_dev), Some(inode)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let path = f.next().unwrap_or("");
        let anonymous = inode == "0"
            && (path.is_empty() || path == "[heap]" || path.starts_with("[stack") || path.starts_with("[anon:"));
        if !anonymous || !perms.starts_with('r') || perms.as_bytes().get(3) != Some(&b'p') {
            continue;
        }
        let Some((s, e)) = range.split_once('-') else { continue };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) else { continue };
        out.push(Region { pid, start, end });
    }
    out
}

/// Regions of every process of the tree rooted at `root` (processes that vanish are skipped).
pub fn tree_regions(root: u32) -> Vec<Region> {
    let pids = criu::tree::processes(root).unwrap_or_default();
    pids.into_iter().flat_map(|p| regions(p).unwrap_or_default()).collect()
}

/// The lazy ranges of a dump's images: what the final delta must bring up to date.
pub fn lazy_regions(images_dir: &std::path::Path) -> Result<Vec<Region>, String> {
    let lazy = criu::images::lazy_ranges(images_dir).map_err(|e| e.to_string())?;
    Ok(lazy
        .into_iter()
        .flat_map(|(pid, ranges)| ranges.into_iter().map(move |r| Region { pid, start: r.start, end: r.end }))
        .collect())
}

/// A lazy dump that wrote more memory than this into its pages files (`pages-*.img`) did not leave
/// some large area in the stopped tree; see [`written_ranges`]. A lazy dump writes only what CRIU
/// cannot leave lazy (file-backed and shared pages, the page under each thread's stack pointer): a few
/// hundred KiB for the test workloads.
pub const NOT_LAZY_BYTES: u64 = 16 << 20;

/// Why a lazy dump wrote memory into its pages files: every range of 1 MiB or more of each process
/// that is there, with the VmFlags of the frozen tree's mapping at its start (CRIU leaves only private
/// anonymous memory lazy, and not when locked, `lo`, or hugetlb, `ht`; CRIU as released none at
/// all when a thread's stack pointer was page aligned, see [`criu::Criu::stack_bug`]). Read
/// while the tree is frozen.
pub fn written_ranges(images_dir: &std::path::Path) -> String {
    let mut out = Vec::new();
    for pid in criu::images::pagemap_pids(images_dir).unwrap_or_default() {
        let path = images_dir.join(format!("pagemap-{pid}.img"));
        let ranges = match criu::images::read_pagemap(&path) {
            Ok(p) => p.present_ranges(),
            Err(e) => {
                out.push(e.to_string());
                continue;
            }
        };
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
        for r in ranges.into_iter().filter(|r| r.end - r.start >= 1 << 20) {
            let flags = vm_flags(&smaps, r.start).unwrap_or("? (no such mapping now)");
            out.push(format!(
                "pid {pid} {:#x}-{:#x}, {} MiB, VmFlags {flags}",
                r.start,
                r.end,
                (r.end - r.start) >> 20
            ));
        }
    }
    if out.is_empty() { "no range of 1 MiB or more".into() } else { out.join("; ") }
}

/// The VmFlags of the mapping that holds `addr`, from the text of a /proc/PID/smaps.
fn vm_flags(smaps: &str, addr: u64) -> Option<&str> {
    let mut inside = false;
    for line in smaps.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if inside {
                return Some(flags.trim());
            }
        } else if let Some((s, e)) = line.split_once(' ').and_then(|(range, _)| range.split_once('-')) {
            // A mapping's first line: "start-end perms offset dev inode [path]".
            if let (Ok(s), Ok(e)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) {
                inside = (s..e).contains(&addr);
            }
        }
    }
    None
}

/// Counters of one round.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RoundStats {
    pub round: u32,
    /// Pages looked at.
    pub scanned: u64,
    /// Records sent: data + zero + copy pages.
    pub sent: u64,
    /// Data pages among them.
    pub data: u64,
    /// Bytes written to the pages stream.
    pub wire: u64,
    /// Wall time of the round.
    pub secs: f64,
    /// Time the reader spent reading and hashing (not waiting for the network).
    pub read_secs: f64,
}

/// Bits of a /proc/PID/pagemap entry.
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;

/// How one pass over the memory runs.
#[derive(Default)]
pub struct Pass {
    pub round: u32,
    /// With dirty tracking: only these pages may have changed since the previous pass ([`crate::dirty`]);
    /// the others are taken as unchanged without being read.
    pub only: Option<crate::dirty::Changed>,
    /// The tree is frozen: what this pass sends is current (PageBatch.frozen).
    pub frozen: bool,
    /// Post-copy: pages the target faulted on; the pass reads the memory around them next, so the
    /// background stream goes where the tree is working.
    pub hints: Option<std::sync::mpsc::Receiver<Key>>,
    /// Post-copy: send no copy records (the fault answers change what the target holds behind the
    /// back of [`Held`], so a copy source could be out of date).
    pub no_copies: bool,
    /// Post-copy's frozen pass: the pages found unchanged are sent too, as runs (PageBatch.current), so
    /// the target may place what it holds of them while the rest is still being read. With dirty
    /// tracking (`only`), those it vouches for are all listed first, before anything is read.
    pub current: bool,
}

/// Reads `regions`, compares every page with what the target holds, and writes what differs to the
/// pages stream.
///
/// # Cancel safety
/// Not cancel safe: a cancelled round leaves the stream in the middle of a batch.
pub async fn send_round<W: pages::BatchSink>(
    held: &mut Held,
    stream: &mut W,
    regions: Vec<Region>,
    pass: Pass,
    level: &AdaptiveLevel,
) -> Result<RoundStats, String> {
    let started = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(pb::PageBatch, Vec<u8>)>(COMPRESS_PARALLEL * 2);
    let mut owned = std::mem::take(held);
    let reader = tokio::task::spawn_blocking(move || {
        let r = scan(&mut owned, &regions, pass, &tx);
        (owned, r)
    });
    let mut encoded = futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
        .map(|(batch, data)| {
            let level = level.clone();
            let tried = level.next();
            tokio::task::spawn_blocking(move || {
                let (parts, compressed) = pages::encode_batch_parts(&batch, data, tried);
                level.record(tried, compressed);
                parts
            })
        })
        .buffered(COMPRESS_PARALLEL);
    let mut wire = 0u64;
    let mut write_error = None;
    while let Some(out) = encoded.next().await {
        let parts = out.map_err(|e| format!("compression task: {e}"))?;
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if let Err(e) = stream.put(parts).await {
            write_error = Some(format!("sending pages: {e}"));
            break;
        }
        wire += len as u64;
    }
    drop(encoded); // a reader still sending learns that nobody listens and stops
    let (back, scanned) = reader.await.map_err(|e| format!("memory reader: {e}"))?;
    *held = back;
    if let Some(e) = write_error {
        return Err(e);
    }
    let mut stats = scanned?;
    stats.wire = wire;
    stats.secs = started.elapsed().as_secs_f64();
    held.records += stats.sent;
    Ok(stats)
}

/// Pages read ahead of a fault's address, in chunks of [`READ_PAGES`].
const HINT_AHEAD_CHUNKS: usize = 8;

/// One read of the scan: up to READ_PAGES pages of one process.
struct Chunk {
    pid: u32,
    addr: u64,
    pages: usize,
}

fn chunks(regions: &[Region]) -> Vec<Chunk> {
    let mut out = Vec::new();
    for r in regions {
        let mut addr = r.start;
        while addr < r.end {
            let pages = (((r.end - addr) as usize) / PAGE_SIZE).min(READ_PAGES);
            out.push(Chunk { pid: r.pid, addr, pages });
            addr += (pages * PAGE_SIZE) as u64;
        }
    }
    out
}

/// The order of the chunks: in address order, except that a hint (a page the target faulted on)
/// puts its chunk and the next few of that process first.
struct Order {
    done: Vec<bool>,
    next: usize,
    urgent: std::collections::VecDeque<usize>,
}

impl Order {
    fn new(n: usize) -> Self {
        Order { done: vec![false; n], next: 0, urgent: Default::default() }
    }

    fn hint(&mut self, chunks: &[Chunk], (pid, addr): Key) {
        let Some(i) =
            chunks.iter().position(|c| c.pid == pid && c.addr <= addr && addr < c.addr + (c.pages * PAGE_SIZE) as u64)
        else {
            return;
        };
        for (j, c) in chunks.iter().enumerate().skip(i).take(HINT_AHEAD_CHUNKS) {
            if c.pid == pid && !self.done[j] {
                self.urgent.push_back(j);
            }
        }
    }

    fn pop(&mut self) -> Option<usize> {
        while let Some(i) = self.urgent.pop_front() {
            if !self.done[i] {
                self.done[i] = true;
                return Some(i);
            }
        }
        while self.next < self.done.len() && self.done[self.next] {
            self.next += 1;
        }
        let i = self.next;
        (i < self.done.len()).then(|| {
            self.done[i] = true;
            i
        })
    }
}

/// Sets `may[i]` to whether page `addr + i * PAGE_SIZE` of `pid` may have changed since the previous
/// pass: with dirty tracking, what it says ([`crate::dirty::Changed::mark`]) and the pages a pass could
/// not read (`unread`); without it, all.
fn may_have_changed(
    only: Option<&crate::dirty::Changed>,
    unread: &std::collections::HashSet<Key>,
    pid: u32,
    addr: u64,
    may: &mut [bool],
) {
    match only {
        Some(o) => o.mark(pid, addr, may),
        None => may.fill(true),
    }
    if !unread.is_empty() {
        for (i, m) in may.iter_mut().enumerate() {
            *m |= unread.contains(&(pid, addr + (i * PAGE_SIZE) as u64));
        }
    }
}

/// Adds page `vaddr` to the batch's runs of current pages (extending the last run if it ends there).
fn add_current(batch: &mut pb::PageBatch, vaddr: u64) {
    match batch.current.last_mut() {
        Some(r) if r.vaddr + r.pages * PAGE_SIZE as u64 == vaddr => r.pages += 1,
        _ => batch.current.push(pb::PageRun { vaddr, pages: 1 }),
    }
}

/// The blocking reader of [`send_round`].
fn scan(
    held: &mut Held,
    regions: &[Region],
    pass: Pass,
    tx: &tokio::sync::mpsc::Sender<(pb::PageBatch, Vec<u8>)>,
) -> Result<RoundStats, String> {
    let Pass { round, only, frozen, hints, no_copies, current } = pass;
    // The pass over the frozen tree is the last: no pass after it compares against what it records, so
    // pages the target does not hold are not hashed ([`Held::update_last`]).
    let last = frozen && no_copies;
    let mut stats = RoundStats { round, ..Default::default() };
    let started = Instant::now();
    // Time spent waiting for the network, which is not the reader's own cost.
    let mut blocked = Duration::ZERO;
    let mut buf = vec![0u8; READ_PAGES * PAGE_SIZE];
    let empty = |pid| pb::PageBatch { pid, round, frozen, ..Default::default() };
    let mut batch = empty(0);
    let mut data: Vec<u8> = Vec::with_capacity(MAX_DATA_PAGES * PAGE_SIZE);
    let mut pagemap: Option<(u32, std::fs::File)> = None;
    let mut entries = vec![0u64; READ_PAGES];
    // Per page of a chunk: it may have changed; it is to be read; it was read.
    let (mut may, mut want, mut got) = ([false; READ_PAGES], [false; READ_PAGES], [false; READ_PAGES]);
    // Pages the batch's current runs cover.
    let mut run_pages = 0u64;
    // Sends the batch; false when the stream side has gone (the round is over).
    let flush = |batch: &mut pb::PageBatch, data: &mut Vec<u8>, pid: u32, blocked: &mut Duration| -> bool {
        if pages::records(batch) == 0 && batch.current.is_empty() {
            batch.pid = pid;
            return true;
        }
        let full = std::mem::replace(batch, empty(pid));
        let bytes = std::mem::replace(data, Vec::with_capacity(MAX_DATA_PAGES * PAGE_SIZE));
        let t = Instant::now();
        let ok = tx.blocking_send((full, bytes)).is_ok();
        *blocked += t.elapsed();
        ok
    };
    let chunks = chunks(regions);
    // Post-copy's frozen pass with dirty tracking: the pages it vouches for (not written since the last
    // round) are current as the target holds them. Say so for all of them first, before reading
    // anything: the target can then place them at once instead of as the reader gets there, and its
    // faults on them need not go over the fault link. The loop below then reads the rest only.
    let vouched = current && only.is_some();
    if vouched {
        for c in &chunks {
            if batch.pid != c.pid {
                run_pages = 0;
                if !flush(&mut batch, &mut data, c.pid, &mut blocked) {
                    return Ok(stats);
                }
            }
            may_have_changed(only.as_ref(), &held.unread, c.pid, c.addr, &mut may[..c.pages]);
            for (i, _) in may[..c.pages].iter().enumerate().filter(|(_, m)| !**m) {
                let key = (c.pid, c.addr + (i * PAGE_SIZE) as u64);
                add_current(&mut batch, key.1);
                run_pages += 1;
                if batch.current.len() >= MAX_BATCH_RECORDS || run_pages >= pages::MAX_CURRENT_PAGES {
                    run_pages = 0;
                    if !flush(&mut batch, &mut data, c.pid, &mut blocked) {
                        return Ok(stats);
                    }
                }
            }
        }
        // Not held back until the reader fills the batch.
        run_pages = 0;
        let pid = batch.pid;
        if !flush(&mut batch, &mut data, pid, &mut blocked) {
            return Ok(stats);
        }
    }
    let mut order = Order::new(chunks.len());
    loop {
        if let Some(h) = &hints {
            while let Ok(k) = h.try_recv() {
                order.hint(&chunks, k);
            }
        }
        let Some(c) = order.pop().map(|i| &chunks[i]) else { break };
        let (pid, addr, n) = (c.pid, c.addr, c.pages);
        if batch.pid != pid {
            run_pages = 0;
            if !flush(&mut batch, &mut data, pid, &mut blocked) {
                return Ok(stats);
            }
        }
        // Which pages may have changed since the previous pass (all of them without dirty tracking).
        may_have_changed(only.as_ref(), &held.unread, pid, addr, &mut may[..n]);
        let looked = may[..n].iter().any(|&m| m);
        if vouched && !looked {
            stats.scanned += n as u64;
            continue;
        }
        // Which pages exist (present or swapped).
        if looked && pagemap.as_ref().map(|(p, _)| *p) != Some(pid) {
            pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).ok().map(|f| (pid, f));
        }
        let have_map = looked
            && match &mut pagemap {
                Some((_, f)) => read_pagemap(f, addr, &mut entries[..n]).is_ok(),
                None => false,
            };
        // Reading pages that were never touched would map the zero page into them: runs of absent
        // pages are not read (they hash as zero below), nor are pages that did not change.
        for i in 0..n {
            let exists = !have_map || entries[i] & (PM_PRESENT | PM_SWAPPED) != 0;
            want[i] = may[i] && exists;
        }
        read_pages(pid, addr, &want[..n], &mut buf, &mut got[..n]);
        for i in 0..n {
            let key = (pid, addr + (i * PAGE_SIZE) as u64);
            stats.scanned += 1;
            let page = &buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            let action = if !may[i] {
                if vouched {
                    continue; // said above
                }
                Action::Unchanged
            } else if !want[i] {
                held.update_with(key, zero_hash(), !no_copies)
            } else if got[i] {
                if !held.unread.is_empty() {
                    held.unread.remove(&key);
                }
                if last {
                    held.update_last(key, page)
                } else {
                    held.update_with(key, xxhash_rust::xxh3::xxh3_128(page), !no_copies)
                }
            } else if frozen {
                // The tree's memory cannot change any more and CRIU listed this page: sending
                // nothing for it would leave the target a stale or zero page.
                return Err(format!(
                    "cannot read page {:#x} of pid {pid} in the frozen tree (neither process_vm_readv nor \
                     /proc/{pid}/mem can)",
                    key.1
                ));
            } else {
                // Unmapped since /proc/PID/maps was read: the next pass (at the latest the final delta,
                // on the frozen tree) reads it again.
                held.unread.insert(key);
                continue;
            };
            match action {
                Action::Unchanged if current => {
                    add_current(&mut batch, key.1);
                    run_pages += 1;
                }
                Action::Unchanged => continue,
                Action::Zero => batch.zero.push(key.1),
                Action::Copy(src) if !no_copies => {
                    batch.copies.push(pb::PageCopy { from_pid: src.0, from_vaddr: src.1, vaddr: key.1 })
                }
                Action::Copy(_) | Action::Data => {
                    batch.data.push(key.1);
                    data.extend_from_slice(page);
                    stats.data += 1;
                }
            }
            if action != Action::Unchanged {
                stats.sent += 1;
            }
            let full = batch.data.len() == MAX_DATA_PAGES
                || batch.zero.len() + batch.copies.len() >= MAX_BATCH_RECORDS
                || batch.current.len() >= MAX_BATCH_RECORDS
                || run_pages >= pages::MAX_CURRENT_PAGES;
            if full {
                run_pages = 0;
                if !flush(&mut batch, &mut data, pid, &mut blocked) {
                    return Ok(stats);
                }
            }
        }
    }
    flush(&mut batch, &mut data, 0, &mut blocked);
    stats.read_secs = started.elapsed().saturating_sub(blocked).as_secs_f64();
    Ok(stats)
}

/// The last batch of the pages stream: `total` records were sent (see PageBatch.end).
pub async fn send_end<W: pages::BatchSink>(stream: &mut W, total: u64) -> Result<u64, String> {
    let mut out = Vec::new();
    pages::encode_batch(&pb::PageBatch { end: true, total, frozen: true, ..Default::default() }, &[], None, &mut out);
    let len = out.len() as u64;
    stream.put(vec![out.into()]).await.map_err(|e| format!("sending pages: {e}"))?;
    Ok(len)
}

/// One page of a stopped tree, encoded as the answer to a fault (a frozen batch with one record).
/// None when the page cannot be read: answering it as zeros would hand the copy a wrong page.
pub fn fault_answer(pid: u32, vaddr: u64) -> Option<Vec<u8>> {
    let mut page = vec![0u8; PAGE_SIZE];
    let mut got = [false];
    read_pages(pid, vaddr, &[true], &mut page, &mut got);
    if !got[0] {
        return None;
    }
    let mut batch = pb::PageBatch { pid, frozen: true, ..Default::default() };
    let mut out = Vec::with_capacity(PAGE_SIZE + 64);
    if is_zero(&page) {
        batch.zero.push(vaddr);
        pages::encode_batch(&batch, &[], None, &mut out);
    } else {
        batch.data.push(vaddr);
        pages::encode_batch(&batch, &page, None, &mut out);
    }
    Some(out)
}

/// Reads pagemap entries for the pages from `addr`.
pub(crate) fn read_pagemap(f: &mut std::fs::File, addr: u64, out: &mut [u64]) -> std::io::Result<()> {
    let mut raw = vec![0u8; out.len() * 8];
    f.seek(SeekFrom::Start(addr / PAGE_SIZE as u64 * 8))?;
    f.read_exact(&mut raw)?;
    for (o, c) in out.iter_mut().zip(raw.chunks_exact(8)) {
        *o = u64::from_le_bytes(c.try_into().expect("8 bytes"));
    }
    Ok(())
}

/// Reads the pages `want`s of the `want.len()` pages at `addr` of `pid` into their places in `buf`
/// (page i at `i * PAGE_SIZE`), in one call, and says in `got` which were read.
///
/// process_vm_readv stops at the first page it cannot read: one in a range unmapped in the meantime,
/// or one the process cannot read itself (PROT_NONE: memory a program protected after writing it,
/// which CRIU still dumps, and lazily). The pages after that are read through /proc/PID/mem, which
/// reads protected pages as a debugger does; what it cannot read either is not there.
fn read_pages(pid: u32, addr: u64, want: &[bool], buf: &mut [u8], got: &mut [bool]) {
    got.fill(false);
    // Runs of wanted pages: (first page, pages).
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, _) in want.iter().enumerate().filter(|(_, w)| **w) {
        match runs.last_mut() {
            Some((s, n)) if *s + *n == i => *n += 1,
            _ => runs.push((i, 1)),
        }
    }
    if runs.is_empty() {
        return;
    }
    let remote: Vec<RemoteIoVec> = runs
        .iter()
        .map(|&(s, n)| RemoteIoVec { base: (addr + (s * PAGE_SIZE) as u64) as usize, len: n * PAGE_SIZE })
        .collect();
    let mut local: Vec<IoSliceMut> = Vec::with_capacity(runs.len());
    let mut rest = &mut buf[..want.len() * PAGE_SIZE];
    let mut at = 0;
    for &(s, n) in &runs {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut((s - at) * PAGE_SIZE);
        let (run, tail) = tail.split_at_mut(n * PAGE_SIZE);
        local.push(IoSliceMut::new(run));
        rest = tail;
        at = s + n;
    }
    let read = process_vm_readv(nix::unistd::Pid::from_raw(pid as i32), &mut local, &remote).unwrap_or_default();
    drop(local);
    // The bytes read fill the runs in order.
    let mut left = read / PAGE_SIZE;
    // The parts of runs that process_vm_readv did not read: (first page, pages).
    let mut missed = Vec::new();
    for &(s, n) in &runs {
        let k = n.min(left);
        got[s..s + k].fill(true);
        left -= k;
        if k < n {
            missed.push((s + k, n - k));
        }
    }
    if missed.is_empty() {
        return;
    }
    let Ok(mem) = std::fs::File::open(format!("/proc/{pid}/mem")) else { return };
    for (s, n) in missed {
        let run = &mut buf[s * PAGE_SIZE..(s + n) * PAGE_SIZE];
        if std::os::unix::fs::FileExt::read_exact_at(&mem, run, addr + (s * PAGE_SIZE) as u64).is_ok() {
            got[s..s + n].fill(true);
            continue;
        }
        for i in s..s + n {
            let page = &mut buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            got[i] = std::os::unix::fs::FileExt::read_exact_at(&mem, page, addr + (i * PAGE_SIZE) as u64).is_ok();
        }
    }
}

/// When to stop the rounds and freeze.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Freeze once the estimated downtime is at most this.
    pub max_downtime: Duration,
    /// Rounds at most (round 0 included).
    pub max_rounds: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { max_downtime: Duration::from_millis(100), max_rounds: 8 }
    }
}

/// The decision after a round.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Why to freeze now, or None for another round.
    pub freeze: Option<&'static str>,
    /// Estimated downtime if frozen now: reading the memory once more and sending what the process
    /// dirtied during the last round, at the measured bandwidth.
    pub est_downtime: Duration,
    /// Bytes per second the pages stream carried in the best round so far.
    pub bandwidth: f64,
    /// Pages per second the process dirtied during the last round.
    pub dirty_rate: f64,
}

/// Decides after each round: freeze when the estimate fits the target, when the dirty set stops
/// shrinking (another round would not make the freeze shorter), or when the round limit is reached.
pub fn decide(policy: &Policy, rounds: &[RoundStats]) -> Decision {
    let last = rounds.last().expect("at least one round");
    // Rounds that moved at least 4 MiB measure the link; smaller ones mostly measure latency.
    let bandwidth =
        rounds.iter().filter(|r| r.wire >= 4 << 20 && r.secs > 0.0).map(|r| r.wire as f64 / r.secs).fold(0.0, f64::max);
    let bandwidth = if bandwidth > 0.0 { bandwidth } else { 100e6 };
    let dirty_rate = if last.secs > 0.0 { last.sent as f64 / last.secs } else { 0.0 };
    let bytes_at_freeze = last.sent as f64 * PAGE_SIZE as f64;
    let est = Duration::from_secs_f64(last.read_secs + bytes_at_freeze / bandwidth);
    let freeze = if rounds.len() >= 2 && est <= policy.max_downtime {
        Some("the estimated downtime fits the target")
    } else if rounds.len() as u32 >= policy.max_rounds {
        Some("round limit reached")
    } else if rounds.len() < 2 {
        // Round 0 sends everything; the first round after it shows the dirty rate.
        None
    } else if rounds.len() >= 3 && last.sent as f64 >= rounds[rounds.len() - 2].sent as f64 * 0.9 {
        Some("the dirty set stopped shrinking")
    } else if rounds.len() == 2 && last.sent == 0 {
        Some("nothing changed during the last round")
    } else {
        None
    };
    Decision { freeze, est_downtime: est, bandwidth, dirty_rate }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fault on a page that cannot be read gets no answer (zeros would be a wrong page); a readable one
    /// gets its bytes, and a page of zeros a zero record.
    #[test]
    fn a_fault_on_an_unreadable_page_is_not_answered_with_zeros() {
        let pid = std::process::id();
        let data: Vec<u8> = (0..2 * PAGE_SIZE).map(|i| (i / PAGE_SIZE) as u8 * 7 + 3).collect();
        let page = (data.as_ptr() as u64).next_multiple_of(PAGE_SIZE as u64);
        let answer = fault_answer(pid, page).expect("a mapped page");
        let (batch, bytes, _) = futures::executor::block_on(pages::read_batch(&mut answer.as_slice()))
            .expect("decodes")
            .expect("one batch");
        let off = (page - data.as_ptr() as u64) as usize;
        assert_eq!((batch.data, &bytes[..]), (vec![page], &data[off..off + PAGE_SIZE]));
        let zeros = vec![0u8; 2 * PAGE_SIZE];
        let zero = (zeros.as_ptr() as u64).next_multiple_of(PAGE_SIZE as u64);
        let answer = fault_answer(pid, zero).expect("a mapped page");
        let (batch, _, _) = futures::executor::block_on(pages::read_batch(&mut answer.as_slice())).unwrap().unwrap();
        assert_eq!(batch.zero, vec![zero]);
        assert!(fault_answer(pid, 0x1000).is_none(), "page 0x1000 is never mapped");
    }

    #[test]
    fn held_pages_decide_what_crosses() {
        let mut h = Held::default();
        let (a, b, c) = ((1, 0x1000), (1, 0x2000), (2, 0x1000));
        assert_eq!(h.update(a, zero_hash()), Action::Unchanged, "a zero page the target lacks is not sent");
        assert_eq!(h.update(a, 5), Action::Data);
        assert_eq!(h.update(a, 5), Action::Unchanged);
        assert_eq!(h.update(b, 5), Action::Copy(a), "identical content crosses once");
        assert_eq!(h.update(a, 6), Action::Data);
        assert_eq!(h.update(c, 5), Action::Copy(b), "the copy source must still hold that content");
        assert_eq!(h.update(b, zero_hash()), Action::Zero, "a page zeroed since must be zeroed there");
        assert_eq!(h.update(b, zero_hash()), Action::Unchanged);
        assert_eq!(h.len(), 2);
        // The same slot of the next 2 MiB block, and of another process, are other pages.
        let d = (1, 0x1000 + (HELD_BLOCK_PAGES * PAGE_SIZE) as u64);
        assert_eq!(h.update(d, 6), Action::Copy(a));
        assert_eq!(
            (h.update(a, 6), h.update(c, 5), h.update(d, 6)),
            (Action::Unchanged, Action::Unchanged, Action::Unchanged)
        );
        assert_eq!(h.update(a, zero_hash()), Action::Zero);
        assert!(!h.contains(a) && h.contains(c) && h.contains(d));
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn the_last_pass_hashes_only_pages_the_target_holds() {
        let mut h = Held::default();
        let (a, b, c) = ((1, 0x1000), (1, 0x2000), (1, 0x3000));
        let zero = [0u8; PAGE_SIZE];
        let mut page = [0u8; PAGE_SIZE];
        page[PAGE_SIZE - 1] = 7; // content only in the last line
        assert!(is_zero(&zero) && !is_zero(&page));
        h.update(a, xxhash_rust::xxh3::xxh3_128(&page));
        assert_eq!(h.update_last(a, &page), Action::Unchanged, "held with this content");
        assert_eq!(h.update_last(a, &zero), Action::Zero, "held, zeroed since");
        assert_eq!(h.update_last(b, &zero), Action::Unchanged, "not held and zero: nothing to send");
        assert_eq!(h.update_last(c, &page), Action::Data, "not held: sent, and never as a copy of a");
        assert!(h.contains(c) && !h.contains(a) && !h.contains(b));
        assert_eq!(h.len(), 1);
        // Recorded with unknown content: a later comparison sends it again rather than trusting it.
        assert_eq!(h.update(c, xxhash_rust::xxh3::xxh3_128(&page)), Action::Data);
    }

    #[test]
    fn content_hashes_index_pages_by_their_low_bits() {
        use std::hash::BuildHasher;
        let by = std::hash::BuildHasherDefault::<ByContent>::default();
        assert_eq!(by.hash_one(0xdead_beef_0000_0000_0123_4567_89ab_cdefu128), 0x0123_4567_89ab_cdef);
    }

    #[test]
    fn maps_keep_private_anonymous_memory_only() {
        let maps = "\
55d0c0000000-55d0c0021000 r--p 00000000 fe:01 1234  /usr/bin/prog
55d0c1000000-55d0c1042000 rw-p 00000000 00:00 0     [heap]
7f0000000000-7f0040000000 rw-p 00000000 00:00 0
7f0040000000-7f0040001000 ---p 00000000 00:00 0
7f0050000000-7f0050100000 rw-s 00000000 00:01 77    /dev/zero (deleted)
7f0060000000-7f0060010000 rw-p 00000000 00:00 0     [anon:glibc]
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0     [stack]
7ffd10000000-7ffd10002000 r--p 00000000 00:00 0     [vvar]
7ffd10002000-7ffd10004000 r-xp 00000000 00:00 0     [vdso]
";
        let r = parse_maps(9, maps);
        let starts: Vec<u64> = r.iter().map(|r| r.start).collect();
        assert_eq!(starts, vec![0x55d0c1000000, 0x7f0000000000, 0x7f0060000000, 0x7ffd00000000]);
        assert!(r.iter().all(|r| r.pid == 9));
    }

    #[test]
    fn vm_flags_come_from_the_mapping_that_holds_the_address() {
        let smaps = "\
7f0000000000-7f0000200000 rw-p 00000000 00:00 0
Size:               2048 kB
Anon-Huge-Pages:       0 kB
VmFlags: rd wr mr mw me ac
7f0000200000-7f0000400000 rw-p 00000000 00:00 0
Size:               2048 kB
VmFlags: rd wr mr mw me lo ac
";
        assert_eq!(vm_flags(smaps, 0x7f0000000000), Some("rd wr mr mw me ac"));
        assert_eq!(vm_flags(smaps, 0x7f00003ff000), Some("rd wr mr mw me lo ac"));
        assert_eq!(vm_flags(smaps, 0x7f0000400000), None);
    }

    /// A real locked mapping of this process, written into a dump's pagemap as CRIU does with memory
    /// it will not leave lazy: the report names its range and the kernel's `lo` flag.
    #[test]
    fn written_ranges_name_the_kernels_flags() {
        let len = 4 << 20;
        // SAFETY: a new private mapping at an address of the kernel's choice; unmapped below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        // SAFETY: locks the mapping made above, whole.
        let locked = unsafe { libc::mlock(map, len) };
        assert_eq!(locked, 0, "mlock (the unit tests run as root): {}", std::io::Error::last_os_error());
        let start = map as u64;
        let dir = tempfile::tempdir().unwrap();
        let entry = |vaddr, nr_pages, flags| criu::images::PagemapEntry { vaddr, nr_pages, flags };
        let pm = criu::images::Pagemap {
            pages_id: 1,
            entries: vec![
                entry(0x1000, 1, criu::images::PE_PRESENT),
                entry(start, 1024, criu::images::PE_PRESENT),
                entry(start + (4 << 20), 64, criu::images::PE_LAZY),
            ],
        };
        let pid = std::process::id();
        std::fs::write(dir.path().join(format!("pagemap-{pid}.img")), criu::images::encode_pagemap(&pm)).unwrap();
        let report = written_ranges(dir.path());
        let want = format!("pid {pid} {start:#x}-{:#x}, 4 MiB, VmFlags ", start + (4 << 20));
        assert!(report.starts_with(&want), "{report}");
        assert!(report.split("VmFlags ").nth(1).unwrap().split(' ').any(|f| f == "lo"), "{report}");
        assert_eq!(report.matches("pid ").count(), 1, "only ranges of 1 MiB or more: {report}");
        // SAFETY: the mapping made above, no longer referenced.
        assert_eq!(unsafe { libc::munmap(map, len) }, 0);
    }

    fn round(round: u32, sent: u64, secs: f64, read_secs: f64) -> RoundStats {
        RoundStats { round, scanned: 262144, sent, data: sent, wire: sent * 4096, secs, read_secs }
    }

    #[test]
    fn policy_freezes_when_it_fits_stops_shrinking_or_hits_the_limit() {
        let p = Policy::default();
        let r0 = round(0, 262144, 2.5, 0.3);
        assert_eq!(decide(&p, &[r0]).freeze, None, "round 0 alone says nothing about the dirty rate");
        let fits = round(1, 100, 0.05, 0.02);
        let d = decide(&p, &[r0, fits]);
        assert_eq!(d.freeze, Some("the estimated downtime fits the target"), "{d:?}");
        assert!((d.bandwidth - 262144.0 * 4096.0 / 2.5).abs() < 1.0);
        // A big memory: reading it all again costs more than the target, and nothing gets better.
        let slow = [r0, round(1, 2000, 0.5, 0.3), round(2, 1900, 0.45, 0.3)];
        assert_eq!(decide(&p, &slow).freeze, Some("the dirty set stopped shrinking"));
        let shrinking = [r0, round(1, 20000, 0.6, 0.3), round(2, 5000, 0.4, 0.3)];
        assert_eq!(decide(&p, &shrinking).freeze, None);
        let limit = Policy { max_rounds: 3, ..p };
        assert_eq!(decide(&limit, &shrinking).freeze, Some("round limit reached"));
        let one = Policy { max_rounds: 1, ..p };
        assert_eq!(decide(&one, &[r0]).freeze, Some("round limit reached"));
    }

    /// Rounds over this process's own memory: a changed page crosses, an unchanged one does not, and the
    /// stream decodes to exactly the records counted.
    #[tokio::test]
    async fn rounds_over_real_memory_send_only_changes() {
        let mut mem = vec![0u8; 64 * PAGE_SIZE + PAGE_SIZE];
        let base = (mem.as_mut_ptr() as usize).next_multiple_of(PAGE_SIZE);
        let off = base - mem.as_ptr() as usize;
        for (i, b) in mem[off..off + 64 * PAGE_SIZE].iter_mut().enumerate() {
            *b = if (i / PAGE_SIZE).is_multiple_of(4) { 0 } else { (i / PAGE_SIZE) as u8 * 2 + 1 };
        }
        // Two pages with the same content.
        mem.copy_within(off + PAGE_SIZE..off + 2 * PAGE_SIZE, off + 2 * PAGE_SIZE);
        let region = Region { pid: std::process::id(), start: base as u64, end: (base + 64 * PAGE_SIZE) as u64 };
        let level = AdaptiveLevel::new(1);
        let mut held = Held::default();
        let mut wire = Vec::new();
        let s0 = send_round(&mut held, &mut wire, vec![region.clone()], Pass::default(), &level).await.unwrap();
        assert_eq!(s0.scanned, 64);
        assert_eq!(s0.sent, 48, "zero pages do not cross: {s0:?}");
        assert_eq!(s0.data, 47, "the duplicate crosses as a copy: {s0:?}");
        mem[off + 5 * PAGE_SIZE] ^= 0xff;
        mem[off + 9 * PAGE_SIZE..off + 10 * PAGE_SIZE].fill(0);
        std::hint::black_box(&mem);
        let s1 =
            send_round(&mut held, &mut wire, vec![region.clone()], Pass { round: 1, ..Default::default() }, &level)
                .await
                .unwrap();
        assert_eq!((s1.sent, s1.data), (2, 1), "{s1:?}");
        let mut r = wire.as_slice();
        let mut records = 0;
        while let Some((b, data, _)) = pages::read_batch(&mut r).await.unwrap() {
            assert_eq!(b.pid, std::process::id());
            records += pages::records(&b) as u64;
            assert_eq!(data.len(), b.data.len() * PAGE_SIZE);
        }
        assert_eq!(records, held.records);
        assert_eq!(records, 50);

        // Post-copy's frozen pass also lists the unchanged pages, as runs around the changed one.
        mem[off + 13 * PAGE_SIZE] ^= 0xff;
        std::hint::black_box(&mem);
        let mut wire = Vec::new();
        let frozen = Pass { round: 2, frozen: true, current: true, no_copies: true, ..Default::default() };
        let s2 = send_round(&mut held, &mut wire, vec![region], frozen, &level).await.unwrap();
        assert_eq!((s2.sent, s2.data), (1, 1), "runs are not records: {s2:?}");
        let (b, _, _) = pages::read_batch(&mut wire.as_slice()).await.unwrap().unwrap();
        let run = |page: u64, pages| pb::PageRun { vaddr: base as u64 + page * PAGE_SIZE as u64, pages };
        assert_eq!(b.data, vec![base as u64 + 13 * PAGE_SIZE as u64]);
        assert_eq!(b.current, vec![run(0, 13), run(14, 50)]);
        assert!(b.frozen);
    }

    /// A chunk's pages that may have changed: those tracking reports for that process and chunk only,
    /// every page of an untracked process, and pages a pass could not read; without tracking, all.
    #[test]
    fn written_pages_are_found_per_chunk() {
        let p = PAGE_SIZE as u64;
        let pages = [(7, 0x10000 + 3 * p), (7, 0x10000), (7, 0x10000 + 4 * p), (8, 0x10000 + p), (6, 0x10000 + p)];
        let c = crate::dirty::Changed::new(pages, [9]);
        let none = std::collections::HashSet::new();
        let mut may = [false; 4];
        may_have_changed(Some(&c), &none, 7, 0x10000, &mut may);
        assert_eq!(may, [true, false, false, true], "page 4 is the next chunk's; pid 6 and 8 are others");
        may_have_changed(Some(&c), &none, 7, 0x10000 + 4 * p, &mut may);
        assert_eq!(may, [true, false, false, false]);
        may_have_changed(Some(&c), &none, 9, 0x10000, &mut may);
        assert_eq!(may, [true; 4], "untracked");
        let unread = std::collections::HashSet::from([(8, 0x10000 + 2 * p)]);
        may_have_changed(Some(&c), &unread, 8, 0x10000, &mut may);
        assert_eq!(may, [false, true, true, false]);
        may_have_changed(None, &none, 7, 0x10000, &mut may);
        assert_eq!(may, [true; 4], "no tracking");
        assert!(c.may_have((7, 0x10000 + 3 * p)) && c.may_have((9, 0)) && !c.may_have((7, 0x10000 + p)));
    }

    /// With dirty tracking, post-copy's frozen pass first lists every page tracking vouches for as
    /// current, before it reads anything: the target may place all of them at once.
    #[tokio::test]
    async fn with_dirty_tracking_the_frozen_pass_lists_the_current_pages_first() {
        let mut mem = vec![7u8; 33 * PAGE_SIZE];
        let base = (mem.as_mut_ptr() as usize).next_multiple_of(PAGE_SIZE);
        let off = base - mem.as_ptr() as usize;
        let region = Region { pid: std::process::id(), start: base as u64, end: (base + 32 * PAGE_SIZE) as u64 };
        let page = |i: u64| (std::process::id(), base as u64 + i * PAGE_SIZE as u64);
        let level = AdaptiveLevel::new(1);
        let mut held = Held::default();
        send_round(&mut held, &mut Vec::new(), vec![region.clone()], Pass::default(), &level).await.unwrap();
        // Tracking reports pages 4 and 20 written; only 4 changed (20 was written with what it held).
        mem[off + 4 * PAGE_SIZE] = 9;
        std::hint::black_box(&mem);
        let only = crate::dirty::Changed::new([page(4), page(20)], []);
        let frozen =
            Pass { round: 1, frozen: true, current: true, no_copies: true, only: Some(only), ..Default::default() };
        let mut wire = Vec::new();
        let s = send_round(&mut held, &mut wire, vec![region], frozen, &level).await.unwrap();
        assert_eq!((s.scanned, s.sent, s.data), (32, 1, 1), "{s:?}");
        let run = |first: u64, pages| pb::PageRun { vaddr: page(first).1, pages };
        let mut r = wire.as_slice();
        let (first, _, _) = pages::read_batch(&mut r).await.unwrap().unwrap();
        assert!(first.data.is_empty(), "nothing read before the vouched pages are listed: {first:?}");
        assert_eq!(first.current, vec![run(0, 4), run(5, 15), run(21, 11)]);
        let (second, data, _) = pages::read_batch(&mut r).await.unwrap().unwrap();
        assert_eq!(second.data, vec![page(4).1]);
        assert_eq!(data[0], 9);
        assert_eq!(second.current, vec![run(20, 1)], "read, unchanged, so current too");
        assert!(first.frozen && second.frozen);
        assert!(pages::read_batch(&mut r).await.unwrap().is_none());
    }

    #[test]
    fn a_read_goes_past_a_range_unmapped_meanwhile_and_reads_protected_pages() {
        // SAFETY: a fresh anonymous mapping of 3 pages, only touched through this pointer, then unmapped.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                3 * PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as *mut u8;
        // SAFETY: within the mapping; then the middle page is unmapped and the last one made PROT_NONE
        // (as a program protects memory it wrote: CRIU dumps it all the same).
        unsafe {
            std::ptr::write_bytes(base, 7, 3 * PAGE_SIZE);
            libc::munmap(base.add(PAGE_SIZE).cast(), PAGE_SIZE);
            libc::mprotect(base.add(2 * PAGE_SIZE).cast(), PAGE_SIZE, libc::PROT_NONE);
        }
        let mut buf = vec![0u8; 3 * PAGE_SIZE];
        let mut got = [false; 3];
        read_pages(std::process::id(), base as u64, &[true, true, true], &mut buf, &mut got);
        assert_eq!(got, [true, false, true], "the hole is not read, the pages around it are");
        assert!(buf[..PAGE_SIZE].iter().chain(&buf[2 * PAGE_SIZE..]).all(|&b| b == 7));
        buf.fill(0);
        read_pages(std::process::id(), base as u64, &[false, false, true], &mut buf, &mut got);
        assert_eq!(got, [false, false, true], "a PROT_NONE page alone");
        assert!(buf[2 * PAGE_SIZE..].iter().all(|&b| b == 7));
        // SAFETY: the two pages still mapped.
        unsafe {
            libc::munmap(base.cast(), PAGE_SIZE);
            libc::munmap(base.add(2 * PAGE_SIZE).cast(), PAGE_SIZE);
        }
    }

    #[tokio::test]
    async fn a_page_a_pass_could_not_read_is_read_by_the_next_whatever_dirty_tracking_says() {
        let mut mem = vec![3u8; 9 * PAGE_SIZE];
        let base = (mem.as_mut_ptr() as usize).next_multiple_of(PAGE_SIZE);
        let region = Region { pid: std::process::id(), start: base as u64, end: (base + 8 * PAGE_SIZE) as u64 };
        let page = |i: usize| (std::process::id(), (base + i * PAGE_SIZE) as u64);
        let level = AdaptiveLevel::new(1);
        let mut held = Held::default();
        let mut wire = Vec::new();
        send_round(&mut held, &mut wire, vec![region.clone()], Pass::default(), &level).await.unwrap();
        // Page 5 changed, but its read failed in the last pass (see the test above): tracking will not
        // report the write again.
        let off = base - mem.as_ptr() as usize;
        mem[off + 5 * PAGE_SIZE] = 9;
        std::hint::black_box(&mem);
        held.unread.insert(page(5));
        let nothing_written = || Pass { round: 1, only: Some(crate::dirty::Changed::default()), ..Default::default() };
        let mut wire = Vec::new();
        let s = send_round(&mut held, &mut wire, vec![region.clone()], nothing_written(), &level).await.unwrap();
        assert_eq!((s.sent, s.data), (1, 1), "{s:?}");
        let (b, _, _) = pages::read_batch(&mut wire.as_slice()).await.unwrap().unwrap();
        assert_eq!(b.data, vec![page(5).1]);
        assert!(held.unread.is_empty());
        let s = send_round(&mut held, &mut Vec::new(), vec![region], nothing_written(), &level).await.unwrap();
        assert_eq!(s.sent, 0, "{s:?}");
    }
}
