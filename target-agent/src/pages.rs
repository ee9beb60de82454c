//! The page store: the latest content of every page the source sent on the pages stream, by (pid on the
//! source, address), in memory. Pre-copy rounds and the final delta update it; after the restore the
//! lazy-pages daemon ([`crate::lazy`]) fills the restored tasks' memory from it.
//!
//! A page the store does not hold is a zero page (the source never sends zero pages, and sends "zero
//! now" for a page that became zero). Pages live in slabs of [`SLAB_PAGES`] pages allocated as needed;
//! slots of pages that became zero are reused. The store refuses to grow past its limit (the host's
//! available memory when the migration was prepared), so a peer cannot exhaust this host's memory.
//!
//! Which pages are *current*: pages sent before the freeze may have changed since. Batches read from
//! the frozen tree (`frozen`: the final delta, and answers to faults) are current, and so are the runs
//! of unchanged pages a lazy migration's final delta lists (`current`); once the stream's
//! `end` arrived ([`PageStore::set_complete`]) every page is. Until then the lazy-pages daemon treats a
//! page that is not current as pending: it asks for it ([`PageStore::request`], sent on the fault link)
//! and waits, and it pushes pages in the order they become current ([`PageStore::take_arrivals`]).
//!
//! **Released pages.** Once the daemon has copied a page into the only restored process that needs it,
//! it [releases](PageStore::release) it: the slot goes back to the free list and the next arriving page
//! reuses that (already touched) memory. So a post-copy holds a window of pages in flight rather than a
//! second copy of the whole tree, and the target does not pay for touching a GiB of fresh memory twice
//! (measured on this project's VM: zeroing cold memory for the store took most of a core during a
//! post-copy). Once the stream is complete nothing arrives any more, so memory goes back to the kernel
//! instead, each 64 KiB granule as soon as none of its pages is held, [`GIVE_BACK_GRANULES`] granules at
//! a time (pre-copy and hybrid end with a store of the whole tree): the restored process's pages reuse
//! it. A released page is never taken for a zero page: [`PageStore::lookup`] says Pending.
//!
//! **Slabs are left out of forks.** This agent starts CRIU with fork + exec, and a
//! fork copies the page tables of every mapping it has: with a store of GiBs (hybrid, pre-copy) that
//! took about 80 ms of the downtime before `criu restore` even ran (perf: `copy_page_range` in the
//! forking thread, `unmap_page_range` in the child's exec). Each slab is a mapping of its own with
//! MADV_DONTFORK, which no child sees.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, RwLock};

use protocol::pages::PAGE_SIZE;
use protocol::pb;

/// Pages per slab: 2 MiB.
pub const SLAB_PAGES: usize = 512;

/// Why a batch could not be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error(
        "the page store would grow past {limit} bytes (this host's available memory when the migration started); choose a target with more free memory"
    )]
    Full { limit: u64 },
    #[error("pages stream: a copy of page {pid}:{vaddr:#x}, which this host does not hold")]
    UnknownCopySource { pid: u32, vaddr: u64 },
    #[error("pages stream: {0}")]
    Malformed(String),
    #[error("cannot map memory for the page store ({0}); free memory on this host or choose another target")]
    NoMemory(String),
}

/// `SLAB_PAGES` pages of zero-filled anonymous memory in a mapping of their own, with MADV_DONTFORK
/// (see the module doc). Owned like a `Box<[u8]>`.
struct Slab(std::ptr::NonNull<u8>);

const SLAB_BYTES: usize = SLAB_PAGES * PAGE_SIZE;

/// Once the stream is complete, memory goes back to the kernel in granules of this many slots (64 KiB)
/// as soon as none of their pages is held any more (see [`Inner::free_slot`]). A whole slab is too
/// coarse: faults place pages all over the process's memory while the daemon's sweep goes on, so a slab
/// of 512 would empty late.
const GRANULE_PAGES: usize = 16;
const GRANULE_BYTES: usize = GRANULE_PAGES * PAGE_SIZE;
const GRANULES_PER_SLAB: usize = SLAB_PAGES / GRANULE_PAGES;

/// Once the stream is complete, emptied granules go back to the kernel this many at a time (2 MiB),
/// adjacent ones with one madvise (see [`Inner::give_back`]).
const GIVE_BACK_GRANULES: usize = 32;

impl Slab {
    fn new() -> nix::Result<Slab> {
        use nix::sys::mman::{MapFlags, MmapAdvise, ProtFlags, madvise, mmap_anonymous, munmap};
        let len = std::num::NonZeroUsize::new(SLAB_BYTES).expect("slabs are not empty");
        let prot = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
        // SAFETY: a new private anonymous mapping at an address of the kernel's choice: it overlaps
        // nothing else of this process.
        let ptr = unsafe { mmap_anonymous(None, len, prot, MapFlags::MAP_PRIVATE) }?;
        // SAFETY: advises the mapping just made, whole; a forked child (which only execs) never sees it.
        if let Err(e) = unsafe { madvise(ptr, SLAB_BYTES, MmapAdvise::MADV_DONTFORK) } {
            // SAFETY: the mapping just made, unused.
            let _ = unsafe { munmap(ptr, SLAB_BYTES) };
            return Err(e);
        }
        Ok(Slab(ptr.cast()))
    }

    /// Gives the `n` granules from `granule` on (all < GRANULES_PER_SLAB) of the slab's memory back to
    /// the kernel (MADV_DONTNEED): they read as zeros from now on, and are touched again only if a slot
    /// of them is used again.
    fn discard(&mut self, granule: usize, n: usize) {
        debug_assert!(n > 0 && granule + n <= GRANULES_PER_SLAB);
        // SAFETY: advises whole granules inside this slab's own mapping. Called (under the store's write
        // lock) only for granules with no slot in use, so no reference into them and no write by `apply`
        // is in flight.
        let _ = unsafe {
            nix::sys::mman::madvise(
                self.0.cast().byte_add(granule * GRANULE_BYTES),
                n * GRANULE_BYTES,
                nix::sys::mman::MmapAdvise::MADV_DONTNEED,
            )
        };
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; no reference into it outlives `self`.
        let _ = unsafe { nix::sys::mman::munmap(self.0.cast(), SLAB_BYTES) };
    }
}

// SAFETY: a Slab owns its memory exclusively, as a Box<[u8]> does.
unsafe impl Send for Slab {}
// SAFETY: `&Slab` gives out nothing but its address; every access to its bytes goes through the store
// (Inner::slot, Inner::slot_mut and PageStore::apply), which keeps a slot that is written from being
// read or written by anyone else at the same time.
unsafe impl Sync for Slab {}

/// The index's slot number of a page whose content was released (see the module doc).
const RELEASED: u32 = u32::MAX;
/// `Inner::free_at` of a slot that is not in `Inner::free`.
const NOT_FREE: u32 = u32::MAX;

/// Pages per block of the [`PageIndex`]: 2 MiB of address space.
const INDEX_BLOCK_PAGES: usize = 512;
/// An index slot of a page the store does not hold.
const ABSENT: u32 = u32::MAX - 1;
/// Memory of one index block, counted against the store's limit.
const INDEX_BLOCK_BYTES: usize = INDEX_BLOCK_PAGES * 4;

/// The slot of every page held, by (pid, address), in blocks of [`INDEX_BLOCK_PAGES`] consecutive
/// pages. The daemon looks pages up in address order, and the pages stream mostly arrives in it: with a
/// map entry per page, every lookup missed the cache (perf: `PageStore::lookup` about a sixth of the
/// lazy-pages thread in a 1 GiB hybrid migration); here consecutive pages share a block.
#[derive(Default)]
struct PageIndex {
    blocks: HashMap<(u32, u64), Box<[u32; INDEX_BLOCK_PAGES]>>,
    /// Entries that are not [`ABSENT`].
    len: usize,
}

impl PageIndex {
    fn at(key: (u32, u64)) -> ((u32, u64), usize) {
        protocol::pages::page_block(key, INDEX_BLOCK_PAGES)
    }

    /// The slot of `key` ([`RELEASED`] included), if it has one.
    fn get(&self, key: (u32, u64)) -> Option<u32> {
        let (block, i) = Self::at(key);
        self.blocks.get(&block).map(|b| b[i]).filter(|&s| s != ABSENT)
    }

    /// Sets the slot of `key`; returns the one it had.
    fn insert(&mut self, key: (u32, u64), slot: u32) -> Option<u32> {
        let (block, i) = Self::at(key);
        let b = self.blocks.entry(block).or_insert_with(|| Box::new([ABSENT; INDEX_BLOCK_PAGES]));
        let old = std::mem::replace(&mut b[i], slot);
        if old == ABSENT {
            self.len += 1;
            None
        } else {
            Some(old)
        }
    }

    /// Removes `key`; returns the slot it had.
    fn remove(&mut self, key: (u32, u64)) -> Option<u32> {
        let (block, i) = Self::at(key);
        let b = self.blocks.get_mut(&block)?;
        let old = std::mem::replace(&mut b[i], ABSENT);
        (old != ABSENT).then(|| {
            self.len -= 1;
            old
        })
    }

    /// Marks the `pages` pages of `pid` from `vaddr` released; `freed` gets each slot one of them held.
    /// Visits only blocks that exist: the run may name far more pages than the store ever held (a
    /// process's madvise, a peer's run), and the store's lock is held meanwhile.
    fn release(&mut self, pid: u32, vaddr: u64, pages: u64, mut freed: impl FnMut(u32)) {
        let first = vaddr / PAGE_SIZE as u64;
        let end = first.saturating_add(pages);
        let (lo, hi) = (first / INDEX_BLOCK_PAGES as u64, end.div_ceil(INDEX_BLOCK_PAGES as u64));
        let mut visit = |block: u64, b: &mut [u32; INDEX_BLOCK_PAGES]| {
            let base = block * INDEX_BLOCK_PAGES as u64;
            let from = first.max(base) - base;
            let to = end.min(base + INDEX_BLOCK_PAGES as u64) - base;
            for slot in &mut b[from as usize..to as usize] {
                if *slot != ABSENT && *slot != RELEASED {
                    freed(std::mem::replace(slot, RELEASED));
                }
            }
        };
        if hi - lo <= self.blocks.len() as u64 {
            for block in lo..hi {
                if let Some(b) = self.blocks.get_mut(&(pid, block)) {
                    visit(block, b);
                }
            }
        } else {
            for (&(p, block), b) in self.blocks.iter_mut() {
                if p == pid && (lo..hi).contains(&block) {
                    visit(block, b);
                }
            }
        }
    }

    fn bytes(&self) -> u64 {
        (self.blocks.len() * INDEX_BLOCK_BYTES) as u64
    }
}

/// Pages per block of [`Fresh`]: 16 MiB of address space.
const FRESH_BLOCK_PAGES: usize = 4096;

/// Pages known current before the stream is complete, as bitmaps by (pid, address): a lazy
/// migration's final delta names every page of the tree current, also the never-touched ones of a
/// large sparse mapping, so a bit per page (64 B per 2 MiB) rather than a set entry per page.
#[derive(Default)]
struct Fresh(HashMap<(u32, u64), Box<[u64; FRESH_BLOCK_PAGES / 64]>>);

impl Fresh {
    fn at(key: (u32, u64)) -> ((u32, u64), usize) {
        protocol::pages::page_block(key, FRESH_BLOCK_PAGES)
    }

    fn contains(&self, key: (u32, u64)) -> bool {
        let (block, i) = Self::at(key);
        self.0.get(&block).is_some_and(|b| b[i / 64] & (1 << (i % 64)) != 0)
    }

    fn insert(&mut self, key: (u32, u64)) {
        let (block, i) = Self::at(key);
        self.0.entry(block).or_insert_with(|| Box::new([0; FRESH_BLOCK_PAGES / 64]))[i / 64] |= 1 << (i % 64);
    }

    fn bytes(&self) -> u64 {
        (self.0.len() * FRESH_BLOCK_PAGES / 8) as u64
    }
}

/// Before the stream is complete, free slots kept for the pages still to arrive (64 MiB at most);
/// memory of granules freed beyond that goes back to the kernel as after the end (see
/// [`Inner::free_slot`]). Post-copy keeps a window of pages in flight, well below this, so its slots
/// are reused as before. A hybrid migration's store holds the whole tree when the restored process
/// starts to take it, and what still arrives mostly overwrites pages it holds, in their slots:
/// [`PageStore::expect_lazy`] lowers the reserve to the lazy pages it does not hold.
const FREE_RESERVE: usize = 16 << 10;

#[derive(Default)]
struct Inner {
    /// Slot of every page held ([`RELEASED`]: its content went to the restored process).
    index: PageIndex,
    slabs: Vec<Slab>,
    /// Slots in use per granule of [`GRANULE_PAGES`] slots (a granule with none after `complete` is
    /// discarded).
    live: Vec<u16>,
    /// Slots in use, all granules together.
    held: usize,
    /// Free slots whose memory the store still holds, reused first (last freed, first reused).
    free: Vec<u32>,
    /// Where each slot is in `free` ([`NOT_FREE`] if it is not), so that a granule can leave it.
    free_at: Vec<u32>,
    /// Granules given back to the kernel, every slot of them free: reused after `free`, before a new slab.
    discarded: Vec<u32>,
    /// Slots below this were handed out at least once; the rest of the last slab never were.
    next: u32,
    /// Free slots kept before `complete` ([`FREE_RESERVE`]; tests take fewer).
    reserve: usize,
    /// Pages known current before `complete` (emptied then).
    fresh: Fresh,
    complete: bool,
    /// Runs (pid, first page, pages) that became current, not yet taken by the daemon.
    arrivals: Vec<(u32, u64, u32)>,
    /// Granules discarded after `complete` whose memory has not gone back to the kernel yet.
    give_back: Vec<u32>,
}

impl Inner {
    /// The bytes of slot `slot` (only that page: a slice over the whole slab would alias slots that
    /// `apply` fills without the lock).
    fn slot(&self, slot: u32) -> &[u8] {
        // SAFETY: slot_ptr points at PAGE_SIZE bytes inside a live mapping; the caller holds the lock
        // and reached the slot through the index, so no one writes it meanwhile.
        unsafe { std::slice::from_raw_parts(self.slot_ptr(slot), PAGE_SIZE) }
    }

    fn slot_mut(&mut self, slot: u32) -> &mut [u8] {
        // SAFETY: as in `slot`, and `&mut self` (the write lock) keeps every other reader out.
        unsafe { std::slice::from_raw_parts_mut(self.slot_ptr(slot), PAGE_SIZE) }
    }

    /// Pages `vaddrs` of `pid`, whose content the store now holds, are current: the daemon may use
    /// them and pushes them as they arrived.
    /// A page named twice in one call is one arrival; the arrivals count against the limit
    /// ([`Inner::bytes`]), whatever a peer repeats.
    fn mark_current(&mut self, pid: u32, vaddrs: impl Iterator<Item = u64>) {
        let mut current: Vec<u64> = vaddrs.collect();
        current.sort_unstable();
        current.dedup();
        for &v in &current {
            self.fresh.insert((pid, v));
        }
        for v in current {
            match self.arrivals.last_mut() {
                Some((p, start, n))
                    if *p == pid && *n < u32::MAX && start.checked_add(*n as u64 * PAGE_SIZE as u64) == Some(v) =>
                {
                    *n += 1
                }
                _ => self.arrivals.push((pid, v, 1)),
            }
        }
    }

    /// The slot of `key`, allocated if new.
    fn slot_for(&mut self, key: (u32, u64), limit: u64) -> Result<u32, StoreError> {
        if let Some(s) = self.index.get(key)
            && s != RELEASED
        {
            return Ok(s);
        }
        let s = self.alloc_slot(limit)?;
        self.index.insert(key, s);
        Ok(s)
    }

    /// A slot for a page, in no one's use and in no index entry yet: a free one the store still holds
    /// memory for, else one of a discarded granule (whose other slots join the free ones), else a new one.
    fn alloc_slot(&mut self, limit: u64) -> Result<u32, StoreError> {
        // A granule is used again only once its memory went back (which would zero what was written).
        self.give_back();
        let s = if let Some(s) = self.free.pop() {
            self.free_at[s as usize] = NOT_FREE;
            s
        } else if let Some(g) = self.discarded.pop() {
            let first = g * GRANULE_PAGES as u32;
            for s in (first + 1..first + GRANULE_PAGES as u32).rev() {
                self.push_free(s);
            }
            first
        } else {
            if self.next as usize == self.slabs.len() * SLAB_PAGES {
                if self.bytes() + (SLAB_PAGES * PAGE_SIZE) as u64 > limit {
                    return Err(StoreError::Full { limit });
                }
                self.slabs.push(Slab::new().map_err(|e| StoreError::NoMemory(e.to_string()))?);
                self.live.extend([0; GRANULES_PER_SLAB]);
                self.free_at.extend([NOT_FREE; SLAB_PAGES]);
            }
            self.next += 1;
            self.next - 1
        };
        self.live[s as usize / GRANULE_PAGES] += 1;
        self.held += 1;
        Ok(s)
    }

    /// The store's memory: its slabs, and its index and fresh bits (which a peer's records scattered
    /// over the address space would otherwise grow without a slab).
    fn bytes(&self) -> u64 {
        let arrivals = (self.arrivals.len() * std::mem::size_of::<(u32, u64, u32)>()) as u64;
        (self.slabs.len() * SLAB_PAGES * PAGE_SIZE) as u64 + self.index.bytes() + self.fresh.bytes() + arrivals
    }

    /// Err when the store's memory grew past `limit`.
    fn within(&self, limit: u64) -> Result<(), StoreError> {
        if self.bytes() > limit { Err(StoreError::Full { limit }) } else { Ok(()) }
    }

    fn push_free(&mut self, s: u32) {
        self.free_at[s as usize] = self.free.len() as u32;
        self.free.push(s);
    }

    /// Where slot `slot` lives. The slab's mapping stays where it is until the store is dropped (slabs
    /// are never unmapped before), and is not discarded while the slot is in use.
    fn slot_ptr(&self, slot: u32) -> *mut u8 {
        let (s, o) = (slot as usize / SLAB_PAGES, slot as usize % SLAB_PAGES);
        // SAFETY: o < SLAB_PAGES, so the offset stays inside the slab's mapping.
        unsafe { self.slabs[s].0.as_ptr().add(o * PAGE_SIZE) }
    }

    /// Slot `s` holds nothing any more. Its granule goes back to the kernel once none of its slots is in
    /// use, if the store has enough free slots without it: always once the stream is complete (no page
    /// arrives any more), and beyond [`FREE_RESERVE`] before. So the target's memory peaks near the
    /// restored tree's size rather than twice it (a pre-copy or hybrid store holds the whole tree when
    /// the restored process starts taking it), and the restored process's next pages (the daemon
    /// allocates them with UFFDIO_COPY) reuse memory just freed, as long as the daemon places pages
    /// roughly in the order they arrived (its address-order sweep, `crate::lazy`). Granules, not slabs:
    /// faults place pages all over the process's memory, so a slab of 512 pages empties late.
    ///
    /// On a VM, reusing memory also saves time: a host that backs a guest page only on its first
    /// touch, and takes back what the guest freed a while ago, makes new memory several times slower
    /// to fill than memory just freed (README, "Not done yet").
    fn free_slot(&mut self, s: u32) {
        self.push_free(s);
        let g = s as usize / GRANULE_PAGES;
        self.live[g] -= 1;
        self.held -= 1;
        if self.live[g] == 0 && (self.complete || self.free.len() > self.reserve) {
            self.discard(g);
        }
    }

    /// Gives granule `g`, no slot of which is in use, back to the kernel: its slots leave `free`. The
    /// granule that holds `next` is handed out from its start again; any other becomes `discarded`.
    fn discard(&mut self, g: usize) {
        let first = g * GRANULE_PAGES;
        let end = (first + GRANULE_PAGES).min(self.next as usize);
        // Never handed out, or given back already (its slots are free but not in `free`).
        if first >= end || self.free_at[first] == NOT_FREE {
            return;
        }
        for s in first..end {
            let at = std::mem::replace(&mut self.free_at[s], NOT_FREE);
            self.free.swap_remove(at as usize);
            if let Some(&moved) = self.free.get(at as usize) {
                self.free_at[moved as usize] = at;
            }
        }
        if end == self.next as usize {
            self.next = first as u32;
        } else {
            self.discarded.push(g as u32);
        }
        if !self.complete {
            self.slabs[g / GRANULES_PER_SLAB].discard(g % GRANULES_PER_SLAB, 1);
            return;
        }
        self.give_back.push(g as u32);
        if self.give_back.len() >= GIVE_BACK_GRANULES || self.held == 0 {
            self.give_back();
        }
    }

    /// Gives the memory of the granules in `give_back` back to the kernel, adjacent ones of a slab with
    /// one madvise. Each madvise costs a TLB flush on every core that runs one of the agent's threads,
    /// whatever its length: after the stream's end that is the daemon's thread giving back what it just
    /// placed, in the sweep's order, so mostly adjacent granules. Measured in 2 GiB hybrid migrations on
    /// the test VM (3 alternated pairs): the daemon's releases took 172-204 ms instead of 227-234 ms.
    /// Until the stream is complete, a granule goes back on its own at once (arrivals may need its slots).
    fn give_back(&mut self) {
        if self.give_back.is_empty() {
            return;
        }
        let mut gs = std::mem::take(&mut self.give_back);
        gs.sort_unstable();
        let mut k = 0;
        while k < gs.len() {
            let first = gs[k] as usize;
            let slab = first / GRANULES_PER_SLAB;
            let n = gs[k..]
                .iter()
                .enumerate()
                .take_while(|&(j, &g)| g as usize == first + j && g as usize / GRANULES_PER_SLAB == slab)
                .count();
            self.slabs[slab].discard(first % GRANULES_PER_SLAB, n);
            k += n;
        }
        gs.clear();
        self.give_back = gs;
    }
}

/// Data pages applied under one hold of the store's lock.
const APPLY_GROUP: usize = 16;
/// Pages of current runs marked under one hold of the store's lock.
const CURRENT_GROUP: usize = 256;

/// Called when pages become current (the daemon's wake-up).
type Waker = Box<dyn Fn() + Send + Sync>;

/// See the module doc.
pub struct PageStore {
    inner: RwLock<Inner>,
    limit: u64,
    waker: Mutex<Option<Waker>>,
    /// Where requests for pending pages go (the fault link), and those already asked for.
    requests: Mutex<Requests>,
    /// The lazy-pages daemon's parked faults, which a fault answer fills at once.
    parked: Mutex<Option<crate::lazy::ParkedFaults>>,
}

/// The fault link's sender, and the pages (pid, vaddr) already asked for.
type Requests = (Option<tokio::sync::mpsc::UnboundedSender<(u32, u64)>>, HashSet<(u32, u64)>);

/// What the store knows of a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// Current; its bytes were copied out.
    Page,
    /// Current, and all zeros.
    Zero,
    /// Not known to be current yet.
    Pending,
}

impl PageStore {
    /// A store that holds at most `limit` bytes of pages.
    pub fn new(limit: u64) -> Self {
        PageStore {
            inner: RwLock::new(Inner { reserve: FREE_RESERVE, ..Inner::default() }),
            limit,
            waker: Mutex::new(None),
            requests: Default::default(),
            parked: Mutex::new(None),
        }
    }

    /// The restore is about to start, with `lazy_pages` pages of the tree's memory lazy. Only those the
    /// store does not hold can need a slot of their own before the end (a page it holds is overwritten
    /// in its slot), so it keeps at most that many free slots ([`FREE_RESERVE`]) and gives the memory of
    /// the others back to the kernel, now and as the daemon releases pages. In a hybrid migration that
    /// is almost none: the restored process's first pages then reuse memory the daemon has just freed,
    /// instead of memory nobody touched for a while (on a VM several times slower to fill; see
    /// [`Inner::free_slot`]). Seen with perf on the test VM (2 GiB hybrid, from the restore until the
    /// source's last pass was in): the daemon's thread spent 339 of its 683 samples in UFFDIO_COPY's
    /// `_copy_from_user` into such memory with the full reserve, 25 of 716 without it.
    pub fn expect_lazy(&self, lazy_pages: u64) {
        let mut inner = self.inner.write().expect("page store lock");
        let unheld = lazy_pages.saturating_sub(inner.index.len as u64);
        inner.reserve = inner.reserve.min(usize::try_from(unheld).unwrap_or(usize::MAX));
        let empty: Vec<usize> = (0..inner.live.len()).filter(|&g| inner.live[g] == 0).collect();
        for g in empty {
            if inner.free.len() <= inner.reserve {
                break;
            }
            inner.discard(g);
        }
        tracing::debug!(
            lazy_pages,
            held = inner.index.len,
            reserve = inner.reserve,
            free = inner.free.len(),
            "free slots kept for arrivals"
        );
    }

    /// Every page is current from now on: the pages stream ended.
    pub fn set_complete(&self) {
        {
            let mut inner = self.inner.write().expect("page store lock");
            inner.complete = true;
            inner.fresh = Fresh::default();
            let empty: Vec<usize> = (0..inner.live.len()).filter(|&g| inner.live[g] == 0).collect();
            for g in empty {
                inner.discard(g);
            }
            inner.give_back();
        }
        self.wake();
    }

    pub fn is_complete(&self) -> bool {
        self.inner.read().expect("page store lock").complete
    }

    /// Page `vaddr` of `pid`: copied into `out` when current and not zero.
    pub fn lookup(&self, pid: u32, vaddr: u64, out: &mut [u8]) -> Known {
        let inner = self.inner.read().expect("page store lock");
        if !inner.complete && !inner.fresh.contains((pid, vaddr)) {
            return Known::Pending;
        }
        match inner.index.get((pid, vaddr)) {
            Some(RELEASED) => Known::Pending,
            Some(s) => {
                out[..PAGE_SIZE].copy_from_slice(inner.slot(s));
                Known::Page
            }
            None => Known::Zero,
        }
    }

    /// The daemon copied `pages` pages of `pid` from `vaddr` into the only process that needed them: their
    /// slots are free for the next pages. Pages not held (zero) stay as they are.
    pub fn release(&self, pid: u32, vaddr: u64, pages: u64) {
        let mut inner = self.inner.write().expect("page store lock");
        // The index is set aside while the slots it gives up are freed (freeing does not read it), so
        // that the daemon's call, one per batch, collects nothing in between.
        let mut index = std::mem::take(&mut inner.index);
        index.release(pid, vaddr, pages, |slot| inner.free_slot(slot));
        inner.index = index;
    }

    /// The source answered the request for this page: it may be asked for again. A page the daemon
    /// released can be needed again (the module doc says when it is released; a case the daemon did not
    /// foresee must end in a request answered, not in a fault that waits forever).
    pub fn answered(&self, pid: u32, vaddr: u64) {
        self.requests.lock().expect("requests lock").1.remove(&(pid, vaddr));
    }

    /// Post-copy: pending pages are asked for on `requests` (see [`PageStore::request`]).
    pub fn set_requests(&self, requests: tokio::sync::mpsc::UnboundedSender<(u32, u64)>) {
        self.requests.lock().expect("requests lock").0 = Some(requests);
    }

    /// Asks the source for a pending page (once per page, until [`PageStore::answered`]).
    pub fn request(&self, pid: u32, vaddr: u64) {
        let mut r = self.requests.lock().expect("requests lock");
        if r.1.insert((pid, vaddr))
            && let Some(tx) = &r.0
        {
            let _ = tx.send((pid, vaddr));
        }
    }

    /// Runs of pages that became current since the last call, in the order they did.
    pub fn take_arrivals(&self) -> Vec<(u32, u64, u32)> {
        std::mem::take(&mut self.inner.write().expect("page store lock").arrivals)
    }

    /// `wake` is called whenever pages become current.
    pub fn set_waker(&self, wake: Waker) {
        *self.waker.lock().expect("waker lock") = Some(wake);
    }

    fn wake(&self) {
        if let Some(w) = &*self.waker.lock().expect("waker lock") {
            w();
        }
    }

    /// A fault answer (one page from the frozen tree, `page` its bytes or None for a zero page), after
    /// [`PageStore::apply`] took it: the faults parked on it get it right away, on the calling thread
    /// (the fault link's lane), without waiting for the daemon thread (see [`crate::lazy::ParkedFaults`]).
    pub fn fill_parked(&self, pid: u32, vaddr: u64, page: Option<&[u8]>) -> usize {
        let parked = self.parked.lock().expect("parked lock").clone();
        parked.map_or(0, |p| p.fill(pid, vaddr, page))
    }

    /// Applies one batch of the pages stream: `data` holds the bytes of `batch.data` pages in order.
    pub fn apply(&self, batch: &pb::PageBatch, data: &[u8]) -> Result<(), StoreError> {
        if data.len() != batch.data.len() * PAGE_SIZE {
            return Err(StoreError::Malformed(format!("{} bytes for {} data pages", data.len(), batch.data.len())));
        }
        let pid = batch.pid;
        // The data pages in groups. The bytes are copied without the lock, into fresh slots that nothing
        // else can see yet; only taking the slots and publishing them hold it. A thread that holds the
        // lock while it copies (or first touches a new slab) and is preempted would make the daemon's
        // lookups and the fault link's answers wait for it: measured, lookups of 1-5 ms.
        let mut slots: Vec<(usize, u32, *mut u8)> = Vec::with_capacity(APPLY_GROUP);
        for (g, group) in batch.data.chunks(APPLY_GROUP).enumerate() {
            slots.clear();
            {
                let mut inner = self.inner.write().expect("page store lock");
                for (i, &vaddr) in group.iter().enumerate() {
                    // A batch of the rounds still being applied when the copy runs must not overwrite a
                    // page a fault answer (read from the frozen tree) made current meanwhile.
                    if !batch.frozen && inner.fresh.contains((pid, vaddr)) {
                        continue;
                    }
                    let s = inner.alloc_slot(self.limit)?;
                    slots.push((i, s, inner.slot_ptr(s)));
                }
            }
            for &(i, _, ptr) in &slots {
                let at = (g * APPLY_GROUP + i) * PAGE_SIZE;
                // SAFETY: the slot was just taken from the free list (or a new slab) by this call and is
                // in no index entry: no other thread reads or writes it until it is published below; the
                // slab's mapping outlives `&self` and is not discarded while the slot is in use.
                unsafe { std::ptr::copy_nonoverlapping(data[at..at + PAGE_SIZE].as_ptr(), ptr, PAGE_SIZE) };
            }
            let mut inner = self.inner.write().expect("page store lock");
            for &(i, s, _) in &slots {
                let vaddr = group[i];
                if !batch.frozen && inner.fresh.contains((pid, vaddr)) {
                    // A fault answer came in meanwhile: it is newer.
                    inner.free_slot(s);
                    continue;
                }
                if let Some(old) = inner.index.insert((pid, vaddr), s)
                    && old != RELEASED
                {
                    inner.free_slot(old);
                }
            }
            if batch.frozen && !inner.complete {
                inner.mark_current(pid, group.iter().copied());
            }
            inner.within(self.limit)?;
        }
        let mut inner = self.inner.write().expect("page store lock");
        for c in &batch.copies {
            if !batch.frozen && inner.fresh.contains((pid, c.vaddr)) {
                continue;
            }
            let from = inner
                .index
                .get((c.from_pid, c.from_vaddr))
                .filter(|&s| s != RELEASED)
                .ok_or(StoreError::UnknownCopySource { pid: c.from_pid, vaddr: c.from_vaddr })?;
            let to = inner.slot_for((batch.pid, c.vaddr), self.limit)?;
            if to != from {
                let page: Vec<u8> = inner.slot(from).to_vec();
                inner.slot_mut(to).copy_from_slice(&page);
            }
        }
        for &vaddr in &batch.zero {
            if !batch.frozen && inner.fresh.contains((pid, vaddr)) {
                continue;
            }
            if let Some(s) = inner.index.remove((batch.pid, vaddr))
                && s != RELEASED
            {
                inner.free_slot(s);
            }
        }
        // Every record may have added an index block, without a slot (zeros, or slots freed meanwhile):
        // those count against the limit too.
        inner.within(self.limit)?;
        if !batch.frozen {
            return Ok(());
        }
        if !inner.complete {
            inner.mark_current(pid, batch.copies.iter().map(|c| c.vaddr));
            for &v in &batch.zero {
                inner.fresh.insert((pid, v));
            }
            inner.within(self.limit)?;
        }
        drop(inner);
        // Unchanged since the rounds: what the store holds of them (or their zeros) is current. In groups,
        // each under the lock on its own, as the data pages above (a batch may cover 64k pages).
        let mut runs = batch.current.iter().flat_map(|r| (0..r.pages).map(move |k| r.vaddr + k * PAGE_SIZE as u64));
        loop {
            let group: Vec<u64> = runs.by_ref().take(CURRENT_GROUP).collect();
            if group.is_empty() {
                break;
            }
            let mut inner = self.inner.write().expect("page store lock");
            if !inner.complete {
                inner.mark_current(pid, group.into_iter());
                inner.within(self.limit)?;
            }
        }
        self.wake();
        Ok(())
    }

    /// Copies page `vaddr` of `pid` into `out`; false when the store does not hold it (a zero page).
    /// Only for pre-restore use and tests: the daemon uses [`PageStore::lookup`], which knows released
    /// pages.
    pub fn read(&self, pid: u32, vaddr: u64, out: &mut [u8]) -> bool {
        let inner = self.inner.read().expect("page store lock");
        match inner.index.get((pid, vaddr)).filter(|&s| s != RELEASED) {
            Some(s) => {
                out[..PAGE_SIZE].copy_from_slice(inner.slot(s));
                true
            }
            None => false,
        }
    }

    /// Pages held or released (every non-zero page the store was given).
    pub fn len(&self) -> usize {
        self.inner.read().expect("page store lock").index.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl crate::lazy::PageSource for PageStore {
    fn read_page(&self, pid: u32, vaddr: u64, out: &mut [u8]) -> bool {
        self.read(pid, vaddr, out)
    }

    fn lookup(&self, pid: u32, vaddr: u64, out: &mut [u8]) -> crate::lazy::Lookup {
        match PageStore::lookup(self, pid, vaddr, out) {
            Known::Page => crate::lazy::Lookup::Page,
            Known::Zero => crate::lazy::Lookup::Zero,
            Known::Pending => crate::lazy::Lookup::Pending,
        }
    }

    fn request(&self, pid: u32, vaddr: u64) {
        PageStore::request(self, pid, vaddr)
    }

    fn complete(&self) -> bool {
        self.is_complete()
    }

    fn take_arrivals(&self) -> Vec<(u32, u64, u32)> {
        PageStore::take_arrivals(self)
    }

    fn release(&self, pid: u32, vaddr: u64, pages: u64) {
        PageStore::release(self, pid, vaddr, pages)
    }

    fn set_waker(&self, wake: Box<dyn Fn() + Send + Sync>) {
        PageStore::set_waker(self, wake)
    }

    fn set_parked(&self, parked: crate::lazy::ParkedFaults) {
        *self.parked.lock().expect("parked lock") = Some(parked);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(b: u8) -> Vec<u8> {
        vec![b; PAGE_SIZE]
    }

    #[test]
    fn data_copies_and_zeros() {
        let s = PageStore::new(1 << 30);
        let data = [page(1), page(2)].concat();
        s.apply(&pb::PageBatch { pid: 5, data: vec![0x1000, 0x2000], ..Default::default() }, &data).unwrap();
        let copy = pb::PageCopy { from_pid: 5, from_vaddr: 0x2000, vaddr: 0x8000 };
        s.apply(&pb::PageBatch { pid: 6, copies: vec![copy], zero: vec![0x9000], ..Default::default() }, &[]).unwrap();
        let mut out = vec![0u8; PAGE_SIZE];
        assert!(s.read(6, 0x8000, &mut out) && out == page(2));
        s.apply(&pb::PageBatch { pid: 5, data: vec![0x2000], zero: vec![0x1000], ..Default::default() }, &page(3))
            .unwrap();
        assert!(s.read(5, 0x2000, &mut out) && out == page(3));
        assert!(s.read(6, 0x8000, &mut out) && out == page(2), "a copy is a copy, not a reference");
        assert!(!s.read(5, 0x1000, &mut out), "zeroed pages are forgotten");
        assert_eq!(s.len(), 2);
        // The freed slots (the zeroed page's, and the one the rewritten page was in: an update fills a
        // new slot and frees the old) are reused.
        let taken = s.inner.read().unwrap().next;
        assert_eq!((taken, s.inner.read().unwrap().free.len()), (4, 2));
        s.apply(&pb::PageBatch { pid: 7, data: vec![0], ..Default::default() }, &page(4)).unwrap();
        assert_eq!(s.inner.read().unwrap().next, taken);
    }

    /// `apply` copies page bytes without the lock: a reader looking pages up while they are rewritten
    /// over and over sees each page whole, old or new, never a mix.
    /// A release naming far more pages than the store holds (2^32, 16 TiB) frees exactly the held pages
    /// in its range, of its process, and takes no longer than the blocks that exist (a loop over every
    /// page named took tens of seconds).
    #[test]
    fn a_release_of_a_huge_run_visits_only_what_is_held() {
        let s = PageStore::new(1 << 30);
        let data = [page(1), page(2), page(3)].concat();
        // Three blocks of the index: 0x1000 and 0x100_0000_0000 of pid 5, 0x1000 of pid 6.
        s.apply(
            &pb::PageBatch { pid: 5, data: vec![0x1000, 0x100_0000_0000], ..Default::default() },
            &data[..2 * PAGE_SIZE],
        )
        .unwrap();
        s.apply(&pb::PageBatch { pid: 6, data: vec![0x1000], ..Default::default() }, &data[2 * PAGE_SIZE..]).unwrap();
        assert_eq!(in_use(&s), 3);
        let started = std::time::Instant::now();
        s.release(5, 0x2000, 1 << 32);
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "{:?}", started.elapsed());
        assert_eq!(in_use(&s), 2, "only pid 5's page at 0x100_0000_0000 lies in the run");
        let mut out = vec![0u8; PAGE_SIZE];
        assert!(s.read(5, 0x1000, &mut out) && out == page(1), "before the run: kept");
        assert!(s.read(6, 0x1000, &mut out) && out == page(3), "another process: kept");
        // A short run steps through its own blocks.
        s.release(5, 0x1000, 1);
        assert_eq!(in_use(&s), 1);
    }

    #[test]
    fn pages_rewritten_while_read_are_never_torn() {
        const ROUNDS: u32 = 2000;
        let fill = |round: u32| (round % 255) as u8 + 1;
        let s = std::sync::Arc::new(PageStore::new(1 << 30));
        let vaddrs: Vec<u64> = (0..APPLY_GROUP as u64 * 2).map(|k| 0x10000 + k * PAGE_SIZE as u64).collect();
        let batch = pb::PageBatch { pid: 1, frozen: true, data: vaddrs.clone(), ..Default::default() };
        s.apply(&batch, &vec![0u8; vaddrs.len() * PAGE_SIZE]).unwrap();
        let writer = {
            let (s, batch) = (s.clone(), batch.clone());
            std::thread::spawn(move || {
                for round in 1..=ROUNDS {
                    s.apply(&batch, &vec![fill(round); batch.data.len() * PAGE_SIZE]).unwrap();
                }
            })
        };
        let mut out = vec![0u8; PAGE_SIZE];
        let mut looked = 0;
        while !writer.is_finished() || looked == 0 {
            for &v in &vaddrs {
                assert_eq!(s.lookup(1, v, &mut out), Known::Page);
                assert!(out.iter().all(|&b| b == out[0]), "page {v:#x} torn: starts with {}", out[0]);
                looked += 1;
            }
        }
        writer.join().unwrap();
        assert_eq!((s.lookup(1, vaddrs[0], &mut out), out[0]), (Known::Page, fill(ROUNDS)));
        let inner = s.inner.read().unwrap();
        assert_eq!(inner.next as usize - inner.free.len(), vaddrs.len(), "every rewrite freed the slot it replaced");
    }

    /// Slabs are mappings with MADV_DONTFORK (VmFlags `dc` in smaps): a fork does not copy them.
    #[test]
    fn slabs_are_left_out_of_forks() {
        let s = PageStore::new(1 << 30);
        let batch = pb::PageBatch { pid: 5, frozen: true, data: vec![0x1000], ..Default::default() };
        s.apply(&batch, &page(7)).unwrap();
        let addr = s.inner.read().unwrap().slabs[0].0.as_ptr() as u64;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut flags = None;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((a, b)) = range.split_once('-')
                && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
            {
                inside = a <= addr && addr < b;
            } else if inside && let Some(f) = line.strip_prefix("VmFlags:") {
                flags = Some(f.split_whitespace().map(str::to_string).collect::<Vec<_>>());
            }
        }
        let flags = flags.expect("the slab's mapping is in smaps");
        assert!(flags.iter().any(|f| f == "dc"), "slab mapping without MADV_DONTFORK: {flags:?}");
        let mut out = vec![0u8; PAGE_SIZE];
        assert_eq!(s.lookup(5, 0x1000, &mut out), Known::Page);
        assert_eq!(out, page(7));
    }

    /// Slots holding a page.
    fn in_use(s: &PageStore) -> usize {
        s.inner.read().unwrap().live.iter().map(|&n| usize::from(n)).sum()
    }

    /// Pages of `slab` resident in memory (mincore).
    fn resident(s: &PageStore, slab: usize) -> usize {
        resident_slots(s, slab * SLAB_PAGES, SLAB_PAGES)
    }

    /// Pages of the `n` slots from `first` resident in memory (mincore); they must lie in one slab.
    fn resident_slots(s: &PageStore, first: usize, n: usize) -> usize {
        assert!(first % SLAB_PAGES + n <= SLAB_PAGES);
        let ptr = s.inner.read().unwrap().slot_ptr(first as u32);
        let mut v = vec![0u8; n];
        // SAFETY: mincore reads the page table of `n` pages of one slab's own mapping and writes `n`
        // bytes into `v`, which has them.
        assert_eq!(unsafe { libc::mincore(ptr.cast(), n * PAGE_SIZE, v.as_mut_ptr()) }, 0);
        v.iter().filter(|&&b| b & 1 != 0).count()
    }

    /// Once the stream is complete, a granule of slots whose every page went to the restored process (or
    /// became zero) goes back to the kernel, while the rest of its slab stays; a granule with a page still
    /// held stays. Before that, nothing does.
    #[test]
    fn granules_emptied_after_the_end_go_back_to_the_kernel() {
        let s = PageStore::new(1 << 30);
        let n = SLAB_PAGES as u64 + 2;
        let vaddrs: Vec<u64> = (0..n).map(|k| 0x100000 + k * PAGE_SIZE as u64).collect();
        let fill = |k: u64| (k % 251) as u8 + 1;
        let data: Vec<u8> = (0..n).flat_map(|k| page(fill(k))).collect();
        s.apply(&pb::PageBatch { pid: 3, data: vaddrs.clone(), ..Default::default() }, &data).unwrap();
        assert_eq!((resident(&s, 0), resident(&s, 1)), (SLAB_PAGES, 2));
        // Before the end: the first granule emptied by releases (and a zero) stays, for the next arrivals.
        let g = GRANULE_PAGES;
        s.release(3, vaddrs[0], g as u64 - 1);
        let zero = pb::PageBatch { pid: 3, zero: vec![vaddrs[g - 1]], ..Default::default() };
        s.apply(&zero, &[]).unwrap();
        assert_eq!(resident(&s, 0), SLAB_PAGES, "discarded before the end");
        // At the end, the empty granule goes back at once, and the rest of its slab stays.
        s.set_complete();
        assert_eq!(resident(&s, 0), SLAB_PAGES - g);
        // After that, a granule is emptied when its last page goes, not before, and goes back with the
        // next ones (GIVE_BACK_GRANULES at a time; `granules_go_back_together_after_the_end`).
        s.release(3, vaddrs[g], g as u64 - 1);
        assert_eq!(resident(&s, 0), SLAB_PAGES - g, "a granule with a page still held stays");
        s.release(3, vaddrs[2 * g - 1], 1);
        assert_eq!(resident(&s, 0), SLAB_PAGES - g, "an emptied granule waits for the next ones");
        // Also the granule that holds the last slots taken: there, slots never taken count as empty.
        s.release(3, vaddrs[SLAB_PAGES], 1);
        let mut out = vec![0u8; PAGE_SIZE];
        assert_eq!((s.lookup(3, vaddrs[SLAB_PAGES + 1], &mut out), out[0]), (Known::Page, fill(n - 1)));
        s.release(3, vaddrs[SLAB_PAGES + 1], 1);
        assert_eq!(resident(&s, 1), 2, "an emptied granule waits for the next ones");
        // The pages of the other granules are still there.
        assert_eq!((s.lookup(3, vaddrs[2 * g], &mut out), out[0]), (Known::Page, fill(2 * g as u64)));
        // A slot of a discarded granule can be used again: the waiting granules go back first.
        let late = pb::PageBatch { pid: 3, frozen: true, data: vec![0x9000], ..Default::default() };
        s.apply(&late, &page(9)).unwrap();
        assert_eq!((resident(&s, 0), resident(&s, 1)), (SLAB_PAGES - 2 * g + 1, 0));
        assert_eq!((s.lookup(3, 0x9000, &mut out), out[0]), (Known::Page, 9));
        // Once the store holds no page, everything has gone back.
        s.release(3, vaddrs[2 * g], (SLAB_PAGES - 2 * g) as u64);
        const { assert!(GRANULES_PER_SLAB - 2 < GIVE_BACK_GRANULES) };
        assert_eq!(resident(&s, 0), SLAB_PAGES - 2 * g + 1, "fewer than GIVE_BACK_GRANULES wait, a page is held");
        s.release(3, 0x9000, 1);
        assert_eq!(resident(&s, 0), 0);
    }

    /// After the end, emptied granules go back to the kernel GIVE_BACK_GRANULES at a time, in as few
    /// madvise calls as they have runs of adjacent granules of one slab.
    #[test]
    fn granules_go_back_together_after_the_end() {
        let s = PageStore::new(1 << 30);
        let n = 3 * SLAB_PAGES as u64;
        let vaddrs: Vec<u64> = (0..n).map(|k| 0x100000 + k * PAGE_SIZE as u64).collect();
        s.apply(
            &pb::PageBatch { pid: 3, data: vaddrs.clone(), ..Default::default() },
            &vec![7u8; n as usize * PAGE_SIZE],
        )
        .unwrap();
        s.set_complete();
        let total = |s: &PageStore| (0..3).map(|k| resident(s, k)).sum::<usize>();
        assert_eq!(total(&s), 3 * SLAB_PAGES);
        // Granules emptied in an order that is not the slots' own: every second one first.
        let granules = 3 * GRANULES_PER_SLAB;
        let order: Vec<usize> = (0..granules).step_by(2).chain((1..granules).step_by(2)).collect();
        for (k, &gr) in order.iter().enumerate() {
            s.release(3, vaddrs[gr * GRANULE_PAGES], GRANULE_PAGES as u64);
            let emptied = k + 1;
            let back = if emptied == granules { granules } else { emptied / GIVE_BACK_GRANULES * GIVE_BACK_GRANULES };
            assert_eq!(total(&s), (granules - back) * GRANULE_PAGES, "after {emptied} granules emptied");
        }
    }

    /// A store that holds every lazy page (hybrid) keeps no free slot for arrivals: before the end too,
    /// a granule goes back to the kernel once its pages went to the restored process, and so do the
    /// empty granules it had when the restore started. One that lacks lazy pages keeps a free slot
    /// for each, up to the reserve.
    #[test]
    fn a_store_that_holds_every_lazy_page_keeps_no_free_slots() {
        let g = GRANULE_PAGES;
        let vaddrs: Vec<u64> = (0..4 * g as u64).map(|k| 0x100000 + k * PAGE_SIZE as u64).collect();
        let data: Vec<u8> = vaddrs.iter().flat_map(|_| page(7)).collect();
        let held = |s: &PageStore| {
            s.apply(&pb::PageBatch { pid: 3, data: vaddrs.clone(), ..Default::default() }, &data).unwrap();
            // The first granule's pages became zero during the rounds: its slots are free.
            let zero = pb::PageBatch { pid: 3, zero: vaddrs[..g].to_vec(), ..Default::default() };
            s.apply(&zero, &[]).unwrap();
            assert_eq!(resident_slots(s, 0, 4 * g), 4 * g);
        };
        let s = PageStore::new(1 << 30);
        held(&s);
        s.expect_lazy(3 * g as u64);
        assert_eq!(resident_slots(&s, 0, g), 0, "free slots nothing will arrive for are kept");
        s.release(3, vaddrs[g], g as u64);
        assert_eq!(resident_slots(&s, 0, 4 * g), 2 * g, "a granule the restored process took is kept");

        // Lacking g lazy pages (the zeros may come back): g free slots stay for them, and the next
        // granule emptied goes back.
        let s = PageStore::new(1 << 30);
        held(&s);
        s.expect_lazy(4 * g as u64);
        assert_eq!(resident_slots(&s, 0, g), g, "the free slots kept for the pages still to come");
        s.release(3, vaddrs[g], g as u64);
        assert_eq!(resident_slots(&s, 0, 4 * g), 3 * g);
    }

    /// A page asked for, answered and then released can be asked for again (and answered again): a
    /// page needed again after its release must not wait forever on a request deduplicated away.
    #[test]
    fn an_answered_page_can_be_asked_for_again() {
        let s = PageStore::new(1 << 30);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        s.set_requests(tx);
        s.request(7, 0x4000);
        assert_eq!(rx.try_recv().unwrap(), (7, 0x4000));
        let answer = pb::PageBatch { pid: 7, frozen: true, data: vec![0x4000], ..Default::default() };
        s.apply(&answer, &page(9)).unwrap();
        s.answered(7, 0x4000);
        s.set_complete();
        s.release(7, 0x4000, 1);
        let mut out = vec![0u8; PAGE_SIZE];
        assert_eq!(s.lookup(7, 0x4000, &mut out), Known::Pending);
        s.request(7, 0x4000);
        s.request(7, 0x4000);
        assert_eq!(rx.try_recv().unwrap(), (7, 0x4000), "asked for again after its answer");
        assert!(rx.try_recv().is_err(), "and still once per answer");
        s.apply(&answer, &page(9)).unwrap();
        assert_eq!((s.lookup(7, 0x4000, &mut out), out[0]), (Known::Page, 9));
    }

    /// A released page's slot is reused, and the page is Pending (never zero) from then on.
    #[test]
    fn released_pages_free_their_slots_and_are_never_zero() {
        let s = PageStore::new(1 << 30);
        s.set_complete();
        let batch = pb::PageBatch { pid: 5, frozen: true, data: vec![0x1000, 0x2000], ..Default::default() };
        s.apply(&batch, &[page(1), page(2)].concat()).unwrap();
        s.release(5, 0x1000, 2);
        s.release(5, 0x1000, 1); // twice: nothing more to free
        s.release(5, 0x9000, 1); // not held (a zero page): stays zero
        let mut out = vec![0u8; PAGE_SIZE];
        assert_eq!(s.lookup(5, 0x1000, &mut out), Known::Pending);
        assert_eq!(s.lookup(5, 0x9000, &mut out), Known::Zero);
        assert!(!s.read(5, 0x2000, &mut out));
        assert_eq!(in_use(&s), 0);
        // "Zero now" for a released page frees nothing more; a copy from it is refused.
        s.apply(&pb::PageBatch { pid: 5, frozen: true, zero: vec![0x2000], ..Default::default() }, &[]).unwrap();
        assert_eq!(in_use(&s), 0);
        let copy = pb::PageCopy { from_pid: 5, from_vaddr: 0x1000, vaddr: 0x5000 };
        let from_released = pb::PageBatch { pid: 5, frozen: true, copies: vec![copy], ..Default::default() };
        assert_eq!(s.apply(&from_released, &[]), Err(StoreError::UnknownCopySource { pid: 5, vaddr: 0x1000 }));
        // New pages (and a page sent again) reuse the slots without growing the store.
        let again = pb::PageBatch { pid: 5, frozen: true, data: vec![0x1000, 0x3000], ..Default::default() };
        s.apply(&again, &[page(3), page(4)].concat()).unwrap();
        assert_eq!((in_use(&s), s.inner.read().unwrap().next), (2, 2));
        assert_eq!(s.lookup(5, 0x1000, &mut out), Known::Page);
        assert_eq!(out, page(3));
        assert_eq!(s.lookup(5, 0x3000, &mut out), Known::Page);
        assert_eq!(out, page(4));
    }

    /// A round's batch applied after a fault answer for the same page (the applier lags behind the
    /// fault link) must not bring back stale content, nor zero or overwrite the page by a copy.
    #[test]
    fn a_late_round_does_not_overwrite_a_current_page() {
        let s = PageStore::new(1 << 30);
        s.apply(&pb::PageBatch { pid: 5, data: vec![0x1000], ..Default::default() }, &page(9)).unwrap();
        let answers = pb::PageBatch { pid: 5, frozen: true, data: vec![0x2000, 0x3000, 0x4000], ..Default::default() };
        s.apply(&answers, &[page(1), page(2), page(3)].concat()).unwrap();
        let copy = pb::PageCopy { from_pid: 5, from_vaddr: 0x1000, vaddr: 0x3000 };
        let late =
            pb::PageBatch { pid: 5, data: vec![0x2000], copies: vec![copy], zero: vec![0x4000], ..Default::default() };
        s.apply(&late, &page(7)).unwrap();
        let mut out = vec![0u8; PAGE_SIZE];
        for (vaddr, want) in [(0x2000, 1), (0x3000, 2), (0x4000, 3)] {
            assert_eq!(s.lookup(5, vaddr, &mut out), Known::Page);
            assert_eq!(out, page(want), "page {vaddr:#x}");
        }
    }

    /// The final delta of a lazy migration lists the pages it found unchanged: what the store holds of
    /// them is current at once, a page it lacks is a known zero, and the daemon gets them as arrivals.
    #[test]
    fn unchanged_runs_are_current_with_what_the_store_holds() {
        let s = PageStore::new(1 << 30);
        let round = pb::PageBatch { pid: 1, data: vec![0x1000, 0x2000, 0x8000], ..Default::default() };
        s.apply(&round, &[page(1), page(2), page(8)].concat()).unwrap();
        let run = |vaddr, pages| pb::PageRun { vaddr, pages };
        let frozen = pb::PageBatch {
            pid: 1,
            frozen: true,
            data: vec![0x4000],
            current: vec![run(0x1000, 3), run(0x6000, 1)],
            ..Default::default()
        };
        s.apply(&frozen, &page(4)).unwrap();
        let mut out = vec![0u8; PAGE_SIZE];
        for (vaddr, want) in
            [(0x1000, Known::Page), (0x2000, Known::Page), (0x3000, Known::Zero), (0x4000, Known::Page)]
        {
            assert_eq!(s.lookup(1, vaddr, &mut out), want, "page {vaddr:#x}");
        }
        assert_eq!((s.lookup(1, 0x2000, &mut out), out[0]), (Known::Page, 2));
        assert_eq!(s.lookup(1, 0x6000, &mut out), Known::Zero);
        assert_eq!(s.lookup(1, 0x8000, &mut out), Known::Pending, "held but not said to be unchanged");
        assert_eq!(s.take_arrivals(), vec![(1, 0x4000, 1), (1, 0x1000, 3), (1, 0x6000, 1)]);
    }

    #[test]
    fn pages_are_pending_until_current() {
        let s = PageStore::new(1 << 30);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        s.set_requests(tx);
        let woken = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let w = woken.clone();
        s.set_waker(Box::new(move || {
            w.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        let mut out = vec![0u8; PAGE_SIZE];
        // A round before the freeze: held, but maybe stale.
        s.apply(
            &pb::PageBatch { pid: 1, data: vec![0x1000, 0x2000], ..Default::default() },
            &[page(1), page(2)].concat(),
        )
        .unwrap();
        assert_eq!(s.lookup(1, 0x1000, &mut out), Known::Pending);
        assert_eq!(s.lookup(1, 0x5000, &mut out), Known::Pending, "not even a zero page is known yet");
        s.request(1, 0x1000);
        s.request(1, 0x1000);
        assert_eq!(rx.try_recv().unwrap(), (1, 0x1000));
        assert!(rx.try_recv().is_err(), "a page is asked for once");
        // From the frozen tree: current.
        let frozen = pb::PageBatch {
            pid: 1,
            frozen: true,
            data: vec![0x3000, 0x1000],
            zero: vec![0x5000],
            ..Default::default()
        };
        s.apply(&frozen, &[page(3), page(9)].concat()).unwrap();
        assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!((s.lookup(1, 0x1000, &mut out), out[0]), (Known::Page, 9));
        assert_eq!(s.lookup(1, 0x5000, &mut out), Known::Zero);
        assert_eq!(s.lookup(1, 0x2000, &mut out), Known::Pending);
        assert_eq!(s.take_arrivals(), vec![(1, 0x1000, 1), (1, 0x3000, 1)]);
        assert!(s.take_arrivals().is_empty());
        s.set_complete();
        assert_eq!((s.lookup(1, 0x2000, &mut out), out[0]), (Known::Page, 2));
        assert_eq!(s.lookup(1, 0x7000, &mut out), Known::Zero);
    }

    #[test]
    fn the_index_and_the_fresh_bits_keep_pages_of_each_process_and_block_apart() {
        let mut ix = PageIndex::default();
        let block = (INDEX_BLOCK_PAGES * PAGE_SIZE) as u64;
        let (a, b, c) = ((1, block - PAGE_SIZE as u64), (1, block), (2, block));
        assert_eq!((ix.insert(a, 7), ix.insert(b, 8), ix.insert(c, 9)), (None, None, None));
        assert_eq!((ix.get(a), ix.get(b), ix.get(c), ix.get((3, block))), (Some(7), Some(8), Some(9), None));
        assert_eq!(ix.insert(b, 10), Some(8));
        let released = |ix: &mut PageIndex, (pid, vaddr): (u32, u64)| {
            let mut freed = Vec::new();
            ix.release(pid, vaddr, 1, |s| freed.push(s));
            freed
        };
        assert_eq!((released(&mut ix, b), released(&mut ix, b), ix.get(b)), (vec![10], vec![], Some(RELEASED)));
        assert_eq!((ix.remove(b), ix.remove(b), ix.remove((3, 0))), (Some(RELEASED), None, None));
        assert_eq!((ix.len, ix.get(a), ix.get(c)), (2, Some(7), Some(9)));
        assert_eq!(ix.bytes(), 3 * INDEX_BLOCK_BYTES as u64);

        let mut fresh = Fresh::default();
        let edge = (FRESH_BLOCK_PAGES * PAGE_SIZE) as u64;
        for k in [(1, edge - PAGE_SIZE as u64), (1, edge + 63 * PAGE_SIZE as u64), (2, edge)] {
            fresh.insert(k);
        }
        assert!(fresh.contains((1, edge - PAGE_SIZE as u64)) && fresh.contains((1, edge + 63 * PAGE_SIZE as u64)));
        assert!(
            fresh.contains((2, edge)) && !fresh.contains((1, edge)) && !fresh.contains((2, edge - PAGE_SIZE as u64))
        );
        assert!(!fresh.contains((1, edge + 64 * PAGE_SIZE as u64)) && !fresh.contains((1, 0)));
    }

    /// Pages per process in the model-based test: more than a slab for the two together.
    const MODEL_PAGES: u64 = 600;

    /// One step of the model-based test below.
    #[derive(Debug, Clone)]
    enum Step {
        /// One batch of process `pid`: `data` (first page, pages) with new content, then `copies`
        /// (from pid, from page, to page), then `zero` (first page, pages), then, frozen only, `current`.
        Batch {
            pid: u32,
            frozen: bool,
            data: (u64, u64),
            copies: Vec<(u32, u64, u64)>,
            zero: (u64, u64),
            current: Option<(u64, u64)>,
        },
        /// The daemon placed (first page, pages) of `pid`.
        Release { pid: u32, first: u64, pages: u64 },
        /// The restore starts with this many lazy pages.
        ExpectLazy(u64),
        /// The stream's end.
        Complete,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        let run = |most: u64| (0..MODEL_PAGES, 0..=most);
        let batch =
            (1..=2u32, any::<bool>(), run(48), prop::collection::vec((1..=2u32, 0..MODEL_PAGES, 0..MODEL_PAGES), 0..4))
                .prop_flat_map(move |(pid, frozen, data, copies)| {
                    let current =
                        if frozen { prop::option::of((0..MODEL_PAGES, 1..=32u64)).boxed() } else { Just(None).boxed() };
                    (Just((pid, frozen, data, copies)), run(8), current)
                })
                .prop_map(|((pid, frozen, data, copies), zero, current)| Step::Batch {
                    pid,
                    frozen,
                    data,
                    copies,
                    zero,
                    current,
                });
        prop_oneof![
            6 => batch,
            3 => (1..=2u32, 0..MODEL_PAGES, 1..=40u64).prop_map(|(pid, first, pages)| Step::Release { pid, first, pages }),
            1 => (0..=64u64).prop_map(Step::ExpectLazy),
            1 => Just(Step::Complete),
        ]
    }

    /// What the model holds for a page: content (the step that sent it, and the page it was sent as), or
    /// released. No entry: a zero page.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Held {
        Page(u32, u32, u64),
        Released,
    }

    /// The bytes of a page the model holds as `Page(step, pid, page)`.
    fn model_bytes(step: u32, pid: u32, page: u64) -> Vec<u8> {
        let mut b = vec![step as u8; PAGE_SIZE];
        b[..4].copy_from_slice(&step.to_le_bytes());
        b[4..8].copy_from_slice(&pid.to_le_bytes());
        b[8..16].copy_from_slice(&page.to_le_bytes());
        b
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 48, ..Default::default() })]

        /// A peer's batches in any order (rounds, frozen batches, copies, zeros, runs said to be
        /// unchanged), the daemon's releases, the restore's start and the stream's end, against a
        /// model of what each page holds and whether it is current: every lookup of every page answers
        /// as the model says, with the model's bytes. And every slot handed out is in exactly one place
        /// (holding a page, free, or in a discarded granule); before the end, granules with no page held
        /// are kept only within the reserve of free slots; after it none are, and once all of them went
        /// back their memory is no longer resident.
        #[test]
        fn the_store_answers_as_a_model_of_the_peers_batches(steps in proptest::collection::vec(step(), 1..64)) {
            let s = PageStore::new(1 << 30);
            // A small reserve, so that granules go back before the end too.
            s.inner.write().unwrap().reserve = 40;
            let mut held: HashMap<(u32, u64), Held> = HashMap::new();
            let mut fresh: HashSet<(u32, u64)> = HashSet::new();
            let mut complete = false;
            let va = |k: u64| 0x10_0000 + k * PAGE_SIZE as u64;
            let mut out = vec![0u8; PAGE_SIZE];
            for (n, st) in steps.iter().enumerate() {
                let n = n as u32;
                match st.clone() {
                    Step::Batch { pid, frozen, data, copies, zero, current } => {
                        // A round's record never overwrites a page made current meanwhile (`apply`).
                        let skip = |k: u64, fresh: &HashSet<(u32, u64)>| !frozen && fresh.contains(&(pid, k));
                        let data: Vec<u64> = (data.0..(data.0 + data.1).min(MODEL_PAGES)).collect();
                        let bytes: Vec<u8> = data.iter().flat_map(|&k| model_bytes(n, pid, k)).collect();
                        let mut marked = Vec::new();
                        for &k in &data {
                            if !skip(k, &fresh) {
                                held.insert((pid, k), Held::Page(n, pid, k));
                            }
                            marked.push(k);
                        }
                        // A peer's copy of a page the store does not hold is refused (hostile_batches_are_refused):
                        // only copies from held pages here, as the model has them at that point of the batch.
                        let mut sent = Vec::new();
                        for (from_pid, from, to) in copies {
                            if skip(to, &fresh) {
                                sent.push(pb::PageCopy { from_pid, from_vaddr: va(from), vaddr: va(to) });
                                marked.push(to);
                                continue;
                            }
                            let Some(&Held::Page(a, b, c)) = held.get(&(from_pid, from)) else { continue };
                            held.insert((pid, to), Held::Page(a, b, c));
                            sent.push(pb::PageCopy { from_pid, from_vaddr: va(from), vaddr: va(to) });
                            marked.push(to);
                        }
                        let zero: Vec<u64> = (zero.0..(zero.0 + zero.1).min(MODEL_PAGES)).collect();
                        for &k in &zero {
                            if !skip(k, &fresh) {
                                held.remove(&(pid, k));
                            }
                            marked.push(k);
                        }
                        let current: Vec<u64> =
                            current.map(|(k, len)| (k..(k + len).min(MODEL_PAGES)).collect()).unwrap_or_default();
                        marked.extend(&current);
                        if frozen && !complete {
                            fresh.extend(marked.iter().map(|&k| (pid, k)));
                        }
                        let batch = pb::PageBatch {
                            pid,
                            frozen,
                            data: data.iter().map(|&k| va(k)).collect(),
                            copies: sent,
                            zero: zero.iter().map(|&k| va(k)).collect(),
                            current: current.first().map(|&k| pb::PageRun { vaddr: va(k), pages: current.len() as u64 }).into_iter().collect(),
                            ..Default::default()
                        };
                        s.apply(&batch, &bytes).unwrap();
                    }
                    Step::Release { pid, first, pages } => {
                        let pages = pages.min(MODEL_PAGES - first);
                        s.release(pid, va(first), pages);
                        for k in first..first + pages {
                            if let Some(h) = held.get_mut(&(pid, k)) {
                                *h = Held::Released;
                            }
                        }
                    }
                    Step::ExpectLazy(pages) => s.expect_lazy(pages),
                    Step::Complete => {
                        s.set_complete();
                        complete = true;
                        fresh.clear();
                    }
                }
                for pid in 1..=2 {
                    for k in 0..MODEL_PAGES {
                        let want = if !complete && !fresh.contains(&(pid, k)) {
                            Known::Pending
                        } else {
                            match held.get(&(pid, k)) {
                                Some(Held::Page(..)) => Known::Page,
                                Some(Held::Released) => Known::Pending,
                                None => Known::Zero,
                            }
                        };
                        proptest::prop_assert_eq!(s.lookup(pid, va(k), &mut out), want, "step {}: page {} of {}", n, k, pid);
                        if let (Known::Page, Some(&Held::Page(a, b, c))) = (want, held.get(&(pid, k))) {
                            proptest::prop_assert!(out == model_bytes(a, b, c), "step {}: page {} of {}: other bytes", n, k, pid);
                        }
                    }
                }
                let inner = s.inner.read().unwrap();
                let pages = held.values().filter(|h| matches!(h, Held::Page(..))).count();
                let live: usize = inner.live.iter().map(|&n| usize::from(n)).sum();
                proptest::prop_assert_eq!((live, inner.held), (pages, pages), "step {}", n);
                let in_granules = inner.discarded.len() * GRANULE_PAGES;
                proptest::prop_assert_eq!(live + inner.free.len() + in_granules, inner.next as usize, "step {}: a slot lost or twice", n);
                // Free slots of granules with no page held: a granule is kept only while the free slots, its
                // own included, are within the reserve; after the end, none is kept.
                let mut kept = 0;
                for (at, &f) in inner.free.iter().enumerate() {
                    proptest::prop_assert_eq!(inner.free_at[f as usize] as usize, at, "step {}", n);
                    if inner.live[f as usize / GRANULE_PAGES] == 0 {
                        kept += 1;
                    }
                }
                let most = if complete { 0 } else { inner.reserve };
                proptest::prop_assert!(kept <= most, "step {}: {} free slots kept in unused granules", n, kept);
            }
            if complete {
                let (live, waiting) = {
                    let inner = s.inner.read().unwrap();
                    proptest::prop_assert!(inner.give_back.len() < GIVE_BACK_GRANULES, "{} granules wait to go back", inner.give_back.len());
                    (inner.live.clone(), inner.give_back.clone())
                };
                for (g, _) in live.iter().enumerate().filter(|(g, n)| **n == 0 && !waiting.contains(&(*g as u32))) {
                    let resident = resident_slots(&s, g * GRANULE_PAGES, GRANULE_PAGES);
                    proptest::prop_assert_eq!(resident, 0, "granule {} unused but resident after the end", g);
                }
            }
        }
    }

    /// Records that leave no page held still count against the limit: rounds that each name pages in
    /// new 2 MiB blocks and zero them in the same batch grow the index, not the slabs, and are refused
    /// once it reaches the limit. Runs a peer repeats become arrivals once.
    #[test]
    fn a_peer_cannot_grow_the_index_or_the_arrivals_past_the_limit() {
        let limit = 16u64 << 20;
        let s = PageStore::new(limit);
        let block = (INDEX_BLOCK_PAGES * PAGE_SIZE) as u64;
        let mut refused = None;
        for round in 0..100u64 {
            let vaddrs: Vec<u64> = (0..256u64).map(|k| (round * 256 + k) * block).collect();
            let data = vec![1u8; vaddrs.len() * PAGE_SIZE];
            let b = pb::PageBatch { pid: 1, data: vaddrs.clone(), zero: vaddrs, ..Default::default() };
            if let Err(e) = s.apply(&b, &data) {
                refused = Some((round, e));
                break;
            }
        }
        let (round, e) = refused.expect("the index grew past the limit without an error");
        assert_eq!(e, StoreError::Full { limit });
        assert!(round < 40, "refused only after {round} rounds");
        assert!(s.inner.read().unwrap().bytes() <= limit + (256 * INDEX_BLOCK_BYTES) as u64);

        let run = pb::PageRun { vaddr: 0x1000, pages: 4 };
        let b = pb::PageBatch { pid: 1, frozen: true, current: vec![run; 1000], ..Default::default() };
        let s = PageStore::new(1 << 30);
        s.apply(&b, &[]).unwrap();
        // Marked CURRENT_GROUP pages at a time: one arrival per group at most, not one per naming.
        let a = s.take_arrivals();
        assert!(a.len() <= 4000 / CURRENT_GROUP + 1 && a.iter().all(|&r| r == (1, 0x1000, 4)), "{a:?}");
        // Batches repeated for ever, with nobody taking the arrivals (before the restore): refused once
        // the arrivals reach the limit.
        let s = PageStore::new(1 << 20);
        let refused = (0..100_000).find_map(|_| s.apply(&b, &[]).err());
        assert_eq!(refused, Some(StoreError::Full { limit: 1 << 20 }));
    }

    #[test]
    fn hostile_batches_are_refused() {
        let s = PageStore::new((SLAB_PAGES * PAGE_SIZE) as u64);
        let copy = pb::PageCopy { from_pid: 1, from_vaddr: 0, vaddr: 0x1000 };
        let e = s.apply(&pb::PageBatch { pid: 1, copies: vec![copy], ..Default::default() }, &[]).unwrap_err();
        assert_eq!(e, StoreError::UnknownCopySource { pid: 1, vaddr: 0 });
        let e = s.apply(&pb::PageBatch { pid: 1, data: vec![0], ..Default::default() }, &[]).unwrap_err();
        assert!(matches!(e, StoreError::Malformed(_)));
        let many: Vec<u64> = (0..SLAB_PAGES as u64 + 1).map(|i| i * PAGE_SIZE as u64).collect();
        let data = vec![1u8; many.len() * PAGE_SIZE];
        let e = s.apply(&pb::PageBatch { pid: 1, data: many, ..Default::default() }, &data).unwrap_err();
        assert!(e.to_string().contains("more free memory"), "{e}");
        // Zero records scattered one per 16 MiB hold no page, but each needs its fresh bits: they count
        // against the limit too (2 MiB here: 4096 such blocks), while dense ones cost next to nothing.
        let s = PageStore::new((SLAB_PAGES * PAGE_SIZE) as u64);
        let dense: Vec<u64> = (0..100_000u64).map(|i| i * PAGE_SIZE as u64).collect();
        s.apply(&pb::PageBatch { pid: 1, frozen: true, zero: dense, ..Default::default() }, &[]).unwrap();
        let scattered: Vec<u64> = (0..5000u64).map(|i| (i + 1) << 24).collect();
        let e = s.apply(&pb::PageBatch { pid: 1, frozen: true, zero: scattered, ..Default::default() }, &[]);
        assert_eq!(e, Err(StoreError::Full { limit: (SLAB_PAGES * PAGE_SIZE) as u64 }));
    }
}
