//! The target agent as CRIU's lazy-pages daemon: post-copy memory through userfaultfd.
//!
//! `criu restore --lazy-pages` restores a tree without its lazy private memory (every pagemap entry
//! flagged PE_LAZY) and hands each restored task's userfaultfd to the daemon listening on
//! `<work dir>/lazy-pages.socket` (docs/criu-interfaces.md §1). [`LazyPages::listen`] binds that
//! socket before restore starts; [`LazyPages::start`] serves it on one thread of its own:
//!
//! ```text
//!   criu restore ── int32 pid, then 1 byte + SCM_RIGHTS uffd (per process; a zombie sends -pid) ──┐
//!                ── u32 "RSTF" once every task is restored and its ranges registered ────────────┤ socket
//!   restored tasks ── PAGEFAULT / FORK / REMAP / REMOVE / UNMAP messages ────────────────────────┤ uffds
//!   page source ── waker: pages became known, or the source became complete ─────────────────────┤ wake
//!                                                                                       poll ◄───┘
//!   loop: read every message that is there (a fault is answered at once: UFFDIO_COPY or
//!         UFFDIO_ZEROPAGE, or parked while its page is not known yet), answer the parked faults whose
//!         page became known, then, after RSTF, push one batch of at most PUSH_BATCH_PAGES (64) contiguous pages of one
//!         process.
//! ```
//!
//! One thread does everything, so a fault never waits behind more than one batch (256 KiB of
//! copying), and the bookkeeping needs no lock. Nothing is pushed before RSTF: ranges are registered
//! only at the end of restore and a COPY into an unregistered range fails (ENOENT). One exception: a
//! fault parked on a page that is not known yet is filled by the thread that receives its page (the
//! fault link's real-time lane, [`ParkedFaults`]), which the daemon accounts for afterwards.
//!
//! **Three states of a page.** The [`PageSource`] may still be filling while the restored tree runs
//! (post-copy: the source streams the pages in the background and answers page requests on a priority
//! stream). [`PageSource::lookup`] says of each page whether it is *known* ([`Lookup::Page`]: copied
//! with UFFDIO_COPY), *known zero* ([`Lookup::Zero`]: UFFDIO_ZEROPAGE), or *not known yet*
//! ([`Lookup::Pending`]). A pending page is never zero-filled, neither on a fault nor by the push (that
//! would be silent corruption): a fault on it calls [`PageSource::request`] once for that page and is
//! parked, with the time its message was read; parked faults are tried again whenever the daemon wakes.
//! The source wakes it through the callback it got with [`PageSource::set_waker`] (a byte on the same
//! socket pair that [`LazyHandle::cancel`] writes to) whenever pages become known; the idle poll
//! timeout is only a safety net. A waited fault's latency in the stats includes the wait. A source that
//! is complete from the start (the trait's defaults, e.g. pre-copy's page store or [`ImagePageSource`])
//! never returns Pending: everything below then behaves as the complete phase.
//!
//! **Two push phases**, both after RSTF only, in batches of at most [`PUSH_BATCH_PAGES`] contiguous
//! pages with the uffds read between batches:
//! - while the source is not [complete](PageSource::complete): the pages that
//!   [arrived](PageSource::take_arrivals), in arrival order, into every process with that image pid (a
//!   forked child shares its parent's) where they are still missing and not moved by mremap (run-time
//!   address = image address; moved ones wait for the complete phase). Arrivals taken before RSTF are
//!   kept until it. Pages that did not arrive are not pushed; with nothing to do the daemon sleeps in
//!   poll until the waker, an event or a fault wakes it. An arrived page no process misses any more (a
//!   fault took it first) is [released](PageSource::release) at once, unless a process of that pid ever
//!   moved memory; so is a page copied into the only process of its pid.
//! - once the source is complete: everything still missing, from the source, with zeros where it has
//!   nothing, as one sweep in address order (from where the process last faulted before that, round
//!   to the start), in batches that do not cross a [`PUSH_BATCH_PAGES`] boundary of the image address.
//!   A fault does not move the sweep (every page is local by then, so following faults gains little):
//!   with a page store that holds the whole tree (pre-copy, hybrid), the sweep empties the store's
//!   memory granule by granule and the process's next pages reuse it. A sweep that jumped to each
//!   fault placed pages all over the store, emptied almost no granule until the end, and so filled the
//!   process with memory nobody had touched for a while, which on this project's VM is 2-3 x slower
//!   to fill (README, "Not done yet").
//!
//! Each process has a set of *missing* runs: run-time addresses still to be filled, each with the
//! dump-time (image) address its content is looked up under, so that an `mremap` (REMAP) moves the
//! run and keeps the image address; a forked child gets a copy of its parent's runs (and of its arrivals
//! still to push) and keeps looking pages up under the parent's image pid. MADV_DONTNEED/REMOVE (REMOVE)
//! unregisters the range and drops it; munmap (UNMAP) drops it. Errors of UFFDIO_COPY/ZEROPAGE follow
//! CRIU's daemon (criu/uffd.c) and firecracker's handlers: EEXIST is done, EAGAIN (an mm change whose
//! event is not read yet) is retried after the events are read, ESRCH/ENOSPC mean the process is gone,
//! a partial copy counts what was copied. Once RSTF came and nothing is missing any more the uffds are
//! closed and the tree runs on without a daemon.
//!
//! **A stall is logged.** After RSTF, when no page was filled, no fault answered and no process came or
//! went for [`STALL_REPORT`], the daemon logs what each unfinished process waits for (its first missing
//! run and what the source says of it, parked and retried faults, its push backoff), and again every
//! so long while it lasts.
//!
//! The userfaultfd ioctls and messages are the `uffd` crate's; every `unsafe` left here (taking ownership
//! of the fds CRIU sends, and the tests' stand-in for `criu restore`) is in the private module `sys` below.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::os::fd::AsFd;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use criu::images::{PAGE_SIZE, PE_LAZY, PE_PARENT, PE_PRESENT};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};

/// What a [`PageSource`] knows of one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Known: its content was copied into `out`.
    Page,
    /// Known to be a zero page (or the source has nothing for it, which is the same).
    Zero,
    /// Not known yet (still on its way from the source): it must not be filled until it is.
    Pending,
}

/// Where page content comes from (the target's page store): image pid + dump-time address.
///
/// Only [`read_page`](Self::read_page) is required: the defaults describe a source that is complete
/// from the start (every page known, no arrivals, no requests), which is how pre-copy and image sources
/// behave. A source filled while the restored tree runs implements the others too.
pub trait PageSource: Send + Sync + 'static {
    /// Copies the page at `vaddr` of image pid `pid` into `out` (PAGE_SIZE bytes); false if the store has
    /// nothing for it (the daemon then fills it with zeros via UFFDIO_ZEROPAGE).
    fn read_page(&self, pid: u32, vaddr: u64, out: &mut [u8]) -> bool;

    /// Like `read_page`, but can also say that the page is not known yet. Default: Page if `read_page`
    /// copied it, Zero otherwise.
    fn lookup(&self, pid: u32, vaddr: u64, out: &mut [u8]) -> Lookup {
        if self.read_page(pid, vaddr, out) { Lookup::Page } else { Lookup::Zero }
    }

    /// A fault waits for this page (for which `lookup` said Pending): fetch it with priority. Called
    /// once per page. Default: nothing.
    fn request(&self, pid: u32, vaddr: u64) {
        let _ = (pid, vaddr);
    }

    /// Every page is known from now on (`lookup` never returns Pending again). Default: true.
    fn complete(&self) -> bool {
        true
    }

    /// Pages that became known since the last call, as runs (image pid, first vaddr, pages), in arrival
    /// order. Default: none.
    fn take_arrivals(&self) -> Vec<(u32, u64, u32)> {
        Vec::new()
    }

    /// The daemon copied these pages (image pid, first vaddr, pages) into the only process that needs
    /// them: the source may drop their content. `lookup` must then say Pending for them, never Zero.
    /// Default: ignored.
    fn release(&self, pid: u32, vaddr: u64, pages: u64) {
        let _ = (pid, vaddr, pages);
    }

    /// The daemon gives a callback to call whenever pages become known (or `complete` becomes true), so
    /// it wakes up at once rather than polling. Cheap, non-blocking, callable from any thread, and
    /// harmless after the daemon ended. Default: ignored.
    fn set_waker(&self, wake: Box<dyn Fn() + Send + Sync>) {
        drop(wake);
    }

    /// The daemon gives the faults it parks on Pending pages, for the thread that receives those pages
    /// to [fill](ParkedFaults::fill) at once. Default: ignored (the daemon fills them itself once
    /// `lookup` knows the page).
    fn set_parked(&self, parked: ParkedFaults) {
        drop(parked);
    }
}

/// Faults parked on pages the source did not know yet, shared with the thread that receives those
/// pages (the fault link's lane): [`ParkedFaults::fill`] puts an arriving page in place for every
/// fault waiting for it, right there, so that the answer does not wait for the daemon thread's turn on
/// a busy CPU (measured on the 2-core testbed, 2 GiB post-copy: p99 0.67-0.70 ms from "answer in the
/// store" to "page in place", about as much as the fault link's whole round trip).
///
/// The daemon stays in charge: `fill` tries each waiting fault once and records what it filled; the
/// daemon accounts for those on its next wake-up (which `fill` causes), and answers itself whatever
/// `fill` could not (EAGAIN while an mm change is not read yet, a range that went away: the page is in
/// the source by then). It reads each uffd message under the same lock and, before letting go of it,
/// forgets the waiters in a range an event changed: otherwise a fill after an mremap onto a parked
/// fault's address would put that fault's page into the memory moved there.
#[derive(Clone)]
pub struct ParkedFaults {
    inner: Arc<Mutex<Parked>>,
    daemon: std::sync::Weak<Shared>,
}

#[derive(Default)]
struct Parked {
    /// (image pid, image page) -> the faults waiting for it.
    waiting: HashMap<(u32, u64), Vec<Waiter>>,
    /// Faults `fill` answered, for the daemon to account for.
    filled: Vec<Filled>,
    /// The daemon ended: nothing is filled any more.
    closed: bool,
}

/// A parked fault: its process (serial), uffd and run-time page.
struct Waiter {
    proc: u64,
    uffd: Arc<OwnedFd>,
    at: u64,
}

/// A fault `fill` answered: its process and run-time page, when, and how.
struct Filled {
    proc: u64,
    at: u64,
    when: Instant,
    how: Fill,
}

#[derive(Clone, Copy)]
enum Fill {
    Copied,
    Zeroed,
    /// In place already: another waiter's fill (two threads on one page) woke this one too.
    Present,
}

impl ParkedFaults {
    fn new(daemon: std::sync::Weak<Shared>) -> ParkedFaults {
        ParkedFaults { inner: Arc::default(), daemon }
    }

    fn lock(&self) -> MutexGuard<'_, Parked> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Page `vaddr` of image pid `pid` arrived from the frozen tree (`page`: its PAGE_SIZE bytes; None: a
    /// zero page): fills it in for every fault waiting for it, and wakes the daemon to account for them.
    /// Returns how many faults it answered; cheap when none waits.
    pub fn fill(&self, pid: u32, vaddr: u64, page: Option<&[u8]>) -> usize {
        if page.is_some_and(|b| b.len() != PAGE) {
            return 0;
        }
        let mut g = self.lock();
        let Some(waiters) = g.waiting.remove(&(pid, vaddr)) else { return 0 };
        let mut n = 0;
        for w in waiters {
            let (done, err) = match page {
                Some(b) => uffd::copy(w.uffd.as_fd(), w.at, b),
                None => uffd::zeropage(w.uffd.as_fd(), w.at, PAGE_SIZE),
            };
            let how = match (err, page) {
                (None, Some(_)) => Some(Fill::Copied),
                (None, None) => Some(Fill::Zeroed),
                (Some(Errno::EEXIST), _) if done == 0 => Some(Fill::Present),
                (Some(_), Some(_)) if done > 0 => Some(Fill::Copied),
                // EAGAIN (an mm change not read yet), ENOENT, a process gone...: the daemon tries
                // again and handles what it meets.
                _ => None,
            };
            if let Some(how) = how {
                n += 1;
                g.filled.push(Filled { proc: w.proc, at: w.at, when: Instant::now(), how });
            }
        }
        drop(g);
        if n > 0
            && let Some(d) = self.daemon.upgrade()
        {
            d.wake();
        }
        n
    }
}

impl Parked {
    fn park(&mut self, key: (u32, u64), w: Waiter) {
        if !self.closed {
            self.waiting.entry(key).or_default().push(w);
        }
    }

    /// Forgets the waiters of process `proc` at run-time page `at` (the daemon answered them).
    fn unpark(&mut self, key: (u32, u64), proc: u64, at: u64) {
        if let Some(ws) = self.waiting.get_mut(&key) {
            ws.retain(|w| w.proc != proc || w.at != at);
            if ws.is_empty() {
                self.waiting.remove(&key);
            }
        }
    }

    /// Forgets the waiters of process `proc` in `[start, end)` (an event changed that range), or all of
    /// them (`..`: the process is gone).
    fn forget(&mut self, proc: u64, range: impl std::ops::RangeBounds<u64>) {
        self.waiting.retain(|_, ws| {
            ws.retain(|w| w.proc != proc || !range.contains(&w.at));
            !ws.is_empty()
        });
    }

    fn close(&mut self) {
        self.closed = true;
        self.waiting.clear();
        self.filled.clear();
    }
}

/// Lazy ranges per image pid (see criu::images::lazy_ranges).
pub use criu::images::LazyRanges;

/// The socket's name inside the restore's work dir (`LAZY_PAGES_SOCK_NAME`, criu/include/uffd.h).
pub const SOCKET_NAME: &str = "lazy-pages.socket";
/// Sent by restore once every task is restored and registered (`LAZY_PAGES_RESTORE_FINISHED`). As an
/// int32 it is positive, but far above any pid (PID_MAX_LIMIT is 2^22), so it cannot be taken for one.
pub const RESTORE_FINISHED: u32 = 0x5253_5446;
/// Most pages one background UFFDIO_COPY moves: a fault waits behind at most this much copying.
///
/// Measured on the 2-core testbed (`/tmp/one.sh`-style runs: a fresh testbed, `workload mem --dirty-pct
/// 10 --writers 2`, `migrate --mode hybrid`, complete_ms and the target's fault p99):
/// - 2 GiB hybrid: 16 pages completed in 1675-2737 ms (5 runs, mean 2128), 64 pages in 1418-1799 ms (6
///   runs, mean 1614), 128 pages in 1447-1581 ms (3 runs); fault p99 105-235 us for all three. Bigger
///   batches also take fewer faults (16: 48-75k, 64: 25-33k): the writers find more pages in place.
/// - 1 GiB hybrid: 16 pages 755-763 ms, 64 pages 652-767 ms; 256 MiB: no difference; 1 GiB post-copy
///   (bound by the network): no difference; fault p99 at most 0.63 ms in every run.
///
/// Earlier, before faults on pages still to come were filled by the fault link's lane and the page
/// store reused touched memory, 64 pages gave fault p99 3.0-5.5 ms in 1 GiB post-copy, and 16 was
/// chosen. 64 now: most of the gain of 128, half its wait behind a batch (256 KiB of copying).
pub const PUSH_BATCH_PAGES: u64 = 64;

const PAGE: usize = PAGE_SIZE as usize;
/// Poll timeout while there is nothing to push: only the "nobody waits" check needs it, and it is the
/// safety net for parked faults and arrivals of a source whose waker did not fire; every real event
/// (restore socket, uffds, the waker, cancel) wakes poll.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// After the restore, when no page was filled and no process settled for this long, the daemon logs
/// what each unsettled process waits for (again every so long while it lasts): a stall is then
/// diagnosable from the agent's log rather than only seen as a migration that never completes.
const STALL_REPORT: Duration = Duration::from_secs(10);
/// Wait before pushing again into a process whose next page a complete source still calls Pending (a
/// source that breaks its promise: the page is requested and waited for, never zero-filled).
const PENDING_BACKOFF: Duration = Duration::from_millis(10);
/// Arrived runs with nothing left to push that one push step skips before it returns to the uffds.
const READY_SCAN_MAX: usize = 4096;
/// Wait before pushing again into a process whose COPY met EAGAIN (an mm change in flight).
const AGAIN_BACKOFF: Duration = Duration::from_micros(200);
/// Messages read from one uffd before looking at the others.
const DRAIN_MAX: usize = 256;

/// Why serving lazy pages failed. Each message names the cause and what to do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LazyError {
    #[error(
        "cannot listen for `criu restore --lazy-pages` on {path}: {source}; the work directory must exist and be writable, and the socket path must be shorter than 108 bytes (use a shorter work dir)",
        path = .path.display()
    )]
    Bind { path: PathBuf, source: Arc<std::io::Error> },
    #[error(
        "criu restore did not connect to {path} within {after:?}: run it with --lazy-pages and this directory as its work dir (-W, or -D without -W), after LazyPages::listen; its log says whether it started",
        path = .path.display()
    )]
    NotConnected { path: PathBuf, after: Duration },
    #[error(
        "criu restore did not finish within {after:?} ({processes} processes handed over so far): see where its log stops, and kill the partly restored tree"
    )]
    NotRestored { after: Duration, processes: u64 },
    #[error(
        "criu restore closed the lazy-pages socket before it finished ({processes} processes handed over, no RSTF): the restore failed and CRIU removed the tree; its log (-o, in the work dir) says why"
    )]
    RestoreFailed { processes: u64 },
    #[error(
        "criu restore sent {what} on the lazy-pages socket, which is not CRIU's lazy-pages handoff (int32 pid, 1 byte + SCM_RIGHTS uffd, RSTF); check that CRIU on this host is 4.x"
    )]
    Protocol { what: String },
    #[error("lazy-pages daemon: {what} failed: {source}; the restored tree cannot get its memory, kill it")]
    Serve { what: &'static str, source: Arc<std::io::Error> },
    #[error(
        "{op} at {addr:#x} for image pid {pid} failed: {source}; that process cannot get its lazy memory and stays blocked on it, kill the restored tree (a daemon bug or a mapping it does not support)"
    )]
    Uffd { op: &'static str, pid: u32, addr: u64, source: Arc<std::io::Error> },
    #[error("lazy-pages serving was cancelled before every page was in place (the restored tree is being killed)")]
    Cancelled,
    #[error("the lazy-pages daemon thread panicked ({what}); kill the restored tree, its memory is incomplete")]
    Panicked { what: String },
    #[error("reading the page images: {source}")]
    Images { source: Arc<criu::images::ImageError> },
    #[error(
        "pagemap-{pid}.img in {dir} has lazy pages at {vaddr:#x} without data (an image of `criu dump --lazy-pages`): those pages are still in the source's memory, these files cannot serve them",
        dir = .dir.display()
    )]
    LazyWithoutData { dir: PathBuf, pid: u32, vaddr: u64 },
    #[error(
        "{path} holds {have} bytes but its pagemap needs {need}: the images are truncated, copy them again",
        path = .path.display()
    )]
    ShortPages { path: PathBuf, have: u64, need: u64 },
}

impl LazyError {
    fn io(what: &'static str, e: impl Into<std::io::Error>) -> LazyError {
        LazyError::Serve { what, source: Arc::new(e.into()) }
    }
}

/// Counters so far, for progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LazyProgress {
    /// Page faults answered (UFFDIO_COPY or UFFDIO_ZEROPAGE).
    pub faults: u64,
    /// Of those, faults that had to wait for a page the source did not know yet.
    pub waited_faults: u64,
    /// Pages copied by the background push (not counting faults).
    pub pushed_pages: u64,
    /// Pages filled with UFFDIO_ZEROPAGE (faults outside the lazy ranges, pages the source lacks).
    pub zero_pages: u64,
    /// Lazy pages not in place yet (including those of processes not handed over yet).
    pub pages_left: u64,
    /// RSTF arrived: the restore finished.
    pub restored: bool,
}

/// The final account of one lazy restore.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LazyStats {
    /// Userfaultfds served: one per restored process, plus one per fork seen while serving.
    pub processes: u64,
    /// FORK events (children that got a copy of their parent's missing ranges).
    pub forks: u64,
    /// Page faults answered.
    pub faults: u64,
    /// Of those, faults that had to wait for a page the source did not know yet (Pending).
    pub waited_faults: u64,
    /// Of those, pages copied from the source on a fault.
    pub fault_pages: u64,
    /// Of the waited faults, those the thread that received their page answered ([`ParkedFaults::fill`]).
    pub link_fills: u64,
    /// Pages copied by the background push.
    pub pushed_pages: u64,
    /// Pages filled with UFFDIO_ZEROPAGE (on faults or in the push).
    pub zero_pages: u64,
    /// Lazy pages never filled: their process exited, they were unmapped or MADV_DONTNEED'd, or their
    /// range was not registered by the restorer.
    pub dropped_pages: u64,
    /// Fault-service latency, from reading the fault message to the completed COPY/ZEROPAGE (for a
    /// waited fault: to the fill of its page once the source had it, so the wait is included).
    pub fault_p50: Duration,
    pub fault_p99: Duration,
    pub fault_max: Duration,
    /// From `start` to the last page in place.
    pub elapsed: Duration,
    /// From RSTF to the last page in place: the background push's duration.
    pub push_elapsed: Duration,
}

impl LazyStats {
    /// Pages filled per second from RSTF to the end (pushed, faulted and zero-filled; the few faults
    /// before RSTF included).
    pub fn pages_per_sec(&self) -> f64 {
        let secs = self.push_elapsed.as_secs_f64();
        if secs > 0.0 { (self.pushed_pages + self.fault_pages + self.zero_pages) as f64 / secs } else { 0.0 }
    }
}

/// The bound, listening socket.
pub struct LazyPages {
    listener: UnixListener,
    path: PathBuf,
}

impl LazyPages {
    /// Binds <work_dir>/lazy-pages.socket (unlink first). Must be called before criu restore starts.
    pub fn listen(work_dir: &Path) -> Result<LazyPages, LazyError> {
        let path = work_dir.join(SOCKET_NAME);
        let bind_err = |e: std::io::Error| LazyError::Bind { path: path.clone(), source: Arc::new(e) };
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(bind_err(e)),
            _ => {}
        }
        let listener = UnixListener::bind(&path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(LazyPages { listener, path })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts serving on its own thread(s): accepts CRIU's one connection, takes the uffds, serves faults
    /// at once, and after RSTF pushes every remaining lazy page in the background. Returns at once.
    ///
    /// Dropping every [`LazyHandle`] does not stop a daemon that CRIU connected to (the tree would hang
    /// on its missing pages): it serves until done. One nobody connected to ends then.
    pub fn start(self, ranges: LazyRanges, source: Arc<dyn PageSource>) -> LazyHandle {
        let (waker, wake_rx) = match UnixStream::pair() {
            Ok(p) => p,
            Err(e) => return LazyHandle::failed(self.path, LazyError::io("creating the wake-up socket pair", e)),
        };
        let _ = wake_rx.set_nonblocking(true);
        let _ = waker.set_nonblocking(true);
        let shared = Shared::new(self.path.clone(), Some(waker));
        // Weak: the source may outlive the daemon, and a strong reference would keep "every handle is
        // gone" from ever being seen.
        let weak = Arc::downgrade(&shared);
        source.set_waker(Box::new(move || {
            if let Some(s) = weak.upgrade() {
                s.wake();
            }
        }));
        let parked = ParkedFaults::new(Arc::downgrade(&shared));
        source.set_parked(parked.clone());
        let mut unattached: HashMap<u32, Vec<Range<u64>>> = HashMap::new();
        for (pid, r) in ranges {
            unattached.entry(pid).or_default().extend(r);
        }
        let server = Server {
            shared: shared.clone(),
            source,
            started: Instant::now(),
            unattached,
            listener: Some(self.listener),
            conn: None,
            rx: Rx::Pid { buf: [0; 4], got: 0 },
            wake: wake_rx,
            procs: Vec::new(),
            rstf_at: None,
            complete: false,
            arrivals: Vec::new(),
            requested: HashSet::new(),
            parked,
            serials: 0,
            next: 0,
            page: vec![0; PAGE],
            batch: vec![0; PAGE * PUSH_BATCH_PAGES as usize],
            latencies: Vec::new(),
            immediate: Vec::new(),
            stats: LazyStats::default(),
            error: None,
            progress: (0, Instant::now(), None),
        };
        server.publish();
        let s = Arc::downgrade(&shared);
        let spawned = std::thread::Builder::new().name("lazy-pages".into()).spawn(move || {
            // A fault answer that arrived on the fault link must not wait for this thread's turn.
            protocol::lane::raise_priority();
            let guard = EndGuard(s);
            let result = server.run();
            guard.end(result);
        });
        if let Err(e) = spawned {
            shared.end(Err(LazyError::io("starting the daemon thread", e)));
        }
        LazyHandle { shared }
    }
}

/// A running daemon. Clones share it (one may `cancel` while another waits).
#[derive(Clone)]
pub struct LazyHandle {
    shared: Arc<Shared>,
}

impl LazyHandle {
    fn failed(path: PathBuf, e: LazyError) -> LazyHandle {
        let shared = Shared::new(path, None);
        shared.end(Err(e));
        LazyHandle { shared }
    }

    /// Blocks until RSTF arrived (Ok) or restore closed the socket / failed first (Err). Bounded by `timeout`.
    pub fn wait_restored(&self, timeout: Duration) -> Result<(), LazyError> {
        let deadline = Instant::now() + timeout;
        let mut g = self.shared.lock();
        loop {
            if g.restored {
                return Ok(());
            }
            if let Some(end) = &g.end {
                return end.clone().map(|_| ());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(if self.shared.connected.load(Ordering::Relaxed) {
                    LazyError::NotRestored { after: timeout, processes: self.shared.processes.load(Ordering::Relaxed) }
                } else {
                    LazyError::NotConnected { path: self.shared.path.clone(), after: timeout }
                });
            }
            g = self.shared.cond.wait_timeout(g, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Counters so far (cheap; for progress): faults served, pages pushed, zero pages, pages left.
    pub fn progress(&self) -> LazyProgress {
        let s = &self.shared;
        LazyProgress {
            faults: s.faults.load(Ordering::Acquire),
            waited_faults: s.waited.load(Ordering::Acquire),
            pushed_pages: s.pushed.load(Ordering::Acquire),
            zero_pages: s.zero.load(Ordering::Acquire),
            pages_left: s.left.load(Ordering::Acquire),
            restored: s.lock().restored,
        }
    }

    /// Blocks until every lazy page of every process is in place (or its process is gone); returns the
    /// final stats including fault-service latency percentiles p50/p99 (from reading the fault message to
    /// the completed UFFDIO_COPY/ZEROPAGE), pushed pages, faults, elapsed.
    ///
    /// Not bounded in time by itself: call [`Self::wait_restored`] first (a restore that never connects
    /// or never finishes is reported there), and [`Self::cancel`] from a clone to give up.
    pub fn wait_done(self) -> Result<LazyStats, LazyError> {
        let mut g = self.shared.lock();
        loop {
            if let Some(end) = &g.end {
                return end.clone();
            }
            g = self.shared.cond.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Stops serving (the restored tree is being killed).
    pub fn cancel(&self) {
        self.shared.cancel.store(true, Ordering::SeqCst);
        self.shared.wake();
    }
}

/// What the daemon thread and the handles share.
struct Shared {
    phase: Mutex<Phase>,
    cond: Condvar,
    cancel: AtomicBool,
    /// Write end of the pair whose other end is in the poll set: wakes the thread on cancel and when the
    /// page source calls its waker.
    waker: Option<UnixStream>,
    path: PathBuf,
    connected: AtomicBool,
    processes: AtomicU64,
    faults: AtomicU64,
    waited: AtomicU64,
    pushed: AtomicU64,
    zero: AtomicU64,
    left: AtomicU64,
}

#[derive(Default)]
struct Phase {
    restored: bool,
    end: Option<Result<LazyStats, LazyError>>,
}

impl Shared {
    fn new(path: PathBuf, waker: Option<UnixStream>) -> Arc<Shared> {
        Arc::new(Shared {
            phase: Mutex::new(Phase::default()),
            cond: Condvar::new(),
            cancel: AtomicBool::new(false),
            waker,
            path,
            connected: AtomicBool::new(false),
            processes: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            waited: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            zero: AtomicU64::new(0),
            left: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the daemon's poll. Never blocks (a full buffer means it is woken already) and raises no
    /// SIGPIPE (the daemon may have ended and closed the other end).
    fn wake(&self) {
        use std::os::fd::AsRawFd;
        if let Some(w) = &self.waker {
            let flags = nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL;
            let _ = nix::sys::socket::send(w.as_raw_fd(), b"x", flags);
        }
    }

    fn set_restored(&self) {
        self.lock().restored = true;
        self.cond.notify_all();
    }

    fn end(&self, r: Result<LazyStats, LazyError>) {
        let mut g = self.lock();
        if g.end.is_none() {
            g.end = Some(r);
        }
        drop(g);
        self.cond.notify_all();
    }
}

/// Ends the daemon's phase even when its thread panics, so no waiter blocks forever. Weak: the daemon
/// notices when nobody holds a handle any more.
struct EndGuard(std::sync::Weak<Shared>);

impl EndGuard {
    fn end(self, r: Result<LazyStats, LazyError>) {
        if let Some(s) = self.0.upgrade() {
            s.end(r);
        }
    }
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        if let Some(s) = self.0.upgrade() {
            s.end(Err(LazyError::Panicked { what: "see the log for the panic message".into() }));
        }
    }
}

/// The still-missing pages of one process: run-time start → (run-time end, image address of the start).
/// Runs are disjoint and page-aligned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Missing {
    runs: BTreeMap<u64, (u64, u64)>,
    pages: u64,
    /// Some run was ever moved by mremap: run-time and image addresses may differ.
    moved: bool,
}

impl Missing {
    fn new(ranges: &[Range<u64>]) -> Missing {
        let mut m = Missing::default();
        for r in ranges {
            let (s, e) = (r.start & !(PAGE_SIZE - 1), r.end.next_multiple_of(PAGE_SIZE));
            if s < e {
                m.remove(s, e);
                m.insert(s, e, s);
            }
        }
        m
    }

    fn insert(&mut self, start: u64, end: u64, image: u64) {
        self.pages += (end - start) / PAGE_SIZE;
        self.runs.insert(start, (end, image));
    }

    /// The image address of run-time page `addr`, if it is missing.
    fn lookup(&self, addr: u64) -> Option<u64> {
        let (&s, &(e, img)) = self.runs.range(..=addr).next_back()?;
        (addr < e).then(|| img + (addr - s))
    }

    /// Takes `[start, end)` out; returns the pieces taken as (start, end, image start).
    fn take(&mut self, start: u64, end: u64) -> Vec<(u64, u64, u64)> {
        let hit: Vec<(u64, u64, u64)> = self
            .runs
            .range(..end)
            .rev()
            .take_while(|(_, (e, _))| *e > start)
            .map(|(&s, &(e, img))| (s, e, img))
            .collect();
        let mut out = Vec::with_capacity(hit.len());
        for (s, e, img) in hit {
            self.runs.remove(&s);
            self.pages -= (e - s) / PAGE_SIZE;
            if s < start {
                self.insert(s, start, img);
            }
            if e > end {
                self.insert(end, e, img + (end - s));
            }
            let (cs, ce) = (s.max(start), e.min(end));
            out.push((cs, ce, img + (cs - s)));
        }
        out
    }

    /// Drops `[start, end)`; returns how many missing pages it held.
    fn remove(&mut self, start: u64, end: u64) -> u64 {
        self.take(start, end).iter().map(|(s, e, _)| (e - s) / PAGE_SIZE).sum()
    }

    /// `[from, from + len)` moved to `to` (mremap): its missing pages move, keeping their image address;
    /// whatever was missing at the destination is gone (mremap unmapped it).
    fn remap(&mut self, from: u64, to: u64, len: u64) {
        self.moved = true;
        let moved = self.take(from, from.saturating_add(len));
        self.remove(to, to.saturating_add(len));
        for (s, e, img) in moved {
            self.insert(s - from + to, e - from + to, img);
        }
    }

    /// Where to push next: from `hint` if it is missing, else the first run after it, else the first.
    fn next_from(&self, hint: u64) -> Option<(u64, u64, u64)> {
        if let Some(img) = self.lookup(hint) {
            let (_, &(e, _)) = self.runs.range(..=hint).next_back()?;
            return Some((hint, e, img));
        }
        let (&s, &(e, img)) = self.runs.range(hint..).next().or_else(|| self.runs.iter().next())?;
        Some((s, e, img))
    }

    /// The first missing piece in `[start, end)` that is where its image address says (not moved by
    /// mremap): (start, end) of that piece.
    fn first_in_place(&self, start: u64, end: u64) -> Option<(u64, u64)> {
        if start >= end {
            return None;
        }
        let holding = self.runs.range(..=start).next_back().filter(|(_, (e, _))| *e > start);
        // A piece of a run is in place exactly when the run is (image - start is the same offset).
        holding
            .into_iter()
            .chain(self.runs.range(start + 1..end))
            .find(|(s, (_, img))| **s == *img)
            .map(|(&s, &(e, _))| (s.max(start), e.min(end)))
    }

    fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// The missing runs that overlap `[start, end)`, each cut to it, as (start, end), last first.
    fn pieces(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs
            .range(..end)
            .rev()
            .take_while(move |(_, (e, _))| *e > start)
            .map(move |(&s, &(e, _))| (s.max(start), e.min(end)))
    }
}

/// The parts of `[start, end)` that none of `pieces` (sorted by start, possibly overlapping) covers.
fn gaps(start: u64, end: u64, pieces: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let (mut out, mut at) = (Vec::new(), start);
    for (s, e) in pieces {
        if s > at {
            out.push((at, s.min(end)));
        }
        at = at.max(e);
    }
    if at < end {
        out.push((at, end));
    }
    out
}

/// One served userfaultfd: a restored process, or a child one forked while being served.
struct Proc {
    /// Image pid its pages are looked up under (a forked child keeps its parent's).
    pid: u32,
    /// Names it in [`ParkedFaults`] (unique for the daemon's life, unlike its index or its fd number).
    serial: u64,
    /// Shared with [`ParkedFaults`] while a fault of this process is parked there.
    uffd: Arc<OwnedFd>,
    missing: Missing,
    /// Faults (page, when read, whether it waited for a Pending page) whose answer met EAGAIN:
    /// answered again once the events are read.
    retry: Vec<(u64, Instant, bool)>,
    /// Faults (page, when read) on pages the source does not know yet: answered once it does.
    parked: Vec<(u64, Instant)>,
    /// Arrived runs `[start, end)` (run-time = image address) to push while the source is not complete,
    /// in arrival order; pages in them that are no longer missing (or were moved) are skipped.
    ready: VecDeque<(u64, u64)>,
    /// No push before this (a COPY met EAGAIN).
    push_after: Option<Instant>,
    /// Below `cap_until`, push batches of at most `cap` pages (a batch crossed the end of a VMA: ENOENT;
    /// each further ENOENT there halves the cap).
    cap_until: u64,
    cap: u64,
    /// Where the push goes on: just after the last push, or the last fault before the source was complete.
    hint: u64,
    gone: bool,
    /// A fatal error: its uffd is kept open (the process stays blocked rather than read zeros) and the
    /// error ends the daemon.
    broken: bool,
    warned_dropped: bool,
    warned_pending: bool,
}

impl Proc {
    fn settled(&self) -> bool {
        self.gone || self.broken || (self.missing.is_empty() && self.retry.is_empty() && self.parked.is_empty())
    }

    /// Whether the push has something to do here (after RSTF).
    fn has_push(&self, complete: bool) -> bool {
        !self.gone && !self.broken && if complete { !self.missing.is_empty() } else { !self.ready.is_empty() }
    }
}

enum Rx {
    /// Reading an int32 pid (or RSTF).
    Pid { buf: [u8; 4], got: usize },
    /// Reading the 1 byte + SCM_RIGHTS uffd of `pid`.
    Fd { pid: u32 },
    /// RSTF came; only EOF is expected.
    Finished,
}

/// How one fill (COPY or ZEROPAGE) ended beyond the bytes it did.
enum Class {
    Exists,
    Again,
    NoEnt,
    Gone,
    Fatal(Errno),
}

fn classify(e: Errno) -> Class {
    match e {
        Errno::EEXIST => Class::Exists,
        Errno::EAGAIN => Class::Again,
        Errno::ENOENT => Class::NoEnt,
        Errno::ESRCH | Errno::ENOSPC => Class::Gone,
        e => Class::Fatal(e),
    }
}

/// Whether process `i` of `procs` ((image pid, gone) each), whose image pid is `pid`, is the only one
/// that could still need pages of that pid: no *other* live process looks pages up under it. Process
/// `i` itself may be gone (see [`Server::release`]).
fn sole_user(procs: impl Iterator<Item = (u32, bool)>, i: usize, pid: u32) -> bool {
    !procs.enumerate().any(|(j, (p, gone))| j != i && p == pid && !gone)
}

/// The daemon's state, owned by its thread.
struct Server {
    shared: Arc<Shared>,
    source: Arc<dyn PageSource>,
    started: Instant,
    /// Lazy ranges of image pids not handed over yet.
    unattached: HashMap<u32, Vec<Range<u64>>>,
    listener: Option<UnixListener>,
    conn: Option<UnixStream>,
    rx: Rx,
    wake: UnixStream,
    procs: Vec<Proc>,
    rstf_at: Option<Instant>,
    /// The source said every page is known (it stays so): the complete push phase.
    complete: bool,
    /// Arrivals taken from the source before RSTF, handed to the processes at RSTF.
    arrivals: Vec<(u32, u64, u32)>,
    /// Pages (image pid, image address) requested from the source for a fault.
    requested: HashSet<(u32, u64)>,
    /// The parked faults, as the thread that receives their pages sees them.
    parked: ParkedFaults,
    /// Serial number of the last process added.
    serials: u64,
    /// Round-robin position of the push.
    next: usize,
    page: Vec<u8>,
    batch: Vec<u8>,
    /// Fault-service latencies, ns; and those of faults answered without waiting for the source.
    latencies: Vec<u64>,
    immediate: Vec<u64>,
    stats: LazyStats,
    error: Option<LazyError>,
    /// What [`Server::progress_mark`] said last, when it last changed, and when a stall was last reported.
    progress: (u64, Instant, Option<Instant>),
}

impl Server {
    fn run(mut self) -> Result<LazyStats, LazyError> {
        let r = self.serve();
        self.parked.lock().close();
        // Broken processes keep their uffd open: they stay blocked on their missing pages instead of
        // reading zeros when the kernel drops the registration; the caller kills the tree.
        for p in self.procs.drain(..) {
            if p.broken && r.is_err() {
                std::mem::forget(p.uffd);
            }
        }
        if self.listener.take().is_some() {
            let _ = std::fs::remove_file(&self.shared.path);
        }
        r
    }

    fn serve(&mut self) -> Result<LazyStats, LazyError> {
        let mut polled: Vec<usize> = Vec::new();
        loop {
            if self.shared.cancel.load(Ordering::SeqCst) {
                return Err(LazyError::Cancelled);
            }
            if self.listener.is_some() && Arc::strong_count(&self.shared) == 1 {
                // Every handle is gone and CRIU never connected: nobody can use this daemon.
                return Err(LazyError::Cancelled);
            }
            if self.procs.iter().any(|p| p.gone) {
                let mut parked = self.parked.lock();
                for p in self.procs.iter().filter(|p| p.gone) {
                    parked.forget(p.serial, ..);
                }
                drop(parked);
                self.procs.retain(|p| !p.gone);
            }
            self.check_complete();
            self.publish();
            self.report_stall();
            if self.rstf_at.is_some() && self.procs.iter().all(Proc::settled) {
                if let Some(e) = self.error.take() {
                    return Err(e);
                }
                return Ok(self.finish());
            }
            let timeout = self.poll_timeout();
            let ready = {
                let mut fds = Vec::with_capacity(2 + self.procs.len());
                fds.push(PollFd::new(self.wake.as_fd(), PollFlags::POLLIN));
                if let Some(l) = &self.listener {
                    fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
                } else if let Some(c) = &self.conn {
                    fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN));
                } else {
                    fds.push(PollFd::new(self.wake.as_fd(), PollFlags::empty()));
                }
                // Processes gone or broken are not polled (`polled` maps poll slots to processes).
                polled.clear();
                for (i, p) in self.procs.iter().enumerate() {
                    if !p.gone && !p.broken {
                        fds.push(PollFd::new(p.uffd.as_fd(), PollFlags::POLLIN));
                        polled.push(i);
                    }
                }
                match nix::poll::poll(&mut fds, timeout) {
                    Ok(_) => {}
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(LazyError::io("poll", e)),
                }
                fds.iter().map(|f| f.revents().is_some_and(|r| !r.is_empty())).collect::<Vec<bool>>()
            };
            if ready[0] {
                let mut b = [0u8; 64];
                while matches!((&self.wake).read(&mut b), Ok(n) if n > 0) {}
            }
            if ready[1] {
                if self.listener.is_some() {
                    self.accept()?;
                } else if self.conn.is_some() {
                    self.read_socket()?;
                }
            }
            for (k, &i) in polled.iter().enumerate() {
                if ready[k + 2] {
                    self.drain(i);
                }
            }
            self.retry_faults();
            self.retry_parked();
            self.collect_arrivals();
            if self.rstf_at.is_some() {
                self.push_one();
            }
        }
    }

    fn poll_timeout(&self) -> PollTimeout {
        let now = Instant::now();
        let mut t = IDLE_POLL;
        for p in &self.procs {
            if p.gone || p.broken {
                continue;
            }
            if !p.retry.is_empty() {
                t = t.min(Duration::from_millis(1));
            }
            // Parked faults need no timer: the source's waker wakes poll when pages become known.
            if self.rstf_at.is_some() && p.has_push(self.complete) {
                match p.push_after {
                    Some(at) if at > now => t = t.min(at - now),
                    _ => return PollTimeout::ZERO,
                }
            }
        }
        // Round up to whole milliseconds: a sub-millisecond backoff must not become a busy loop of 0.
        let ms = t.as_micros().div_ceil(1000).clamp(1, u16::MAX as u128) as u16;
        PollTimeout::from(ms)
    }

    fn accept(&mut self) -> Result<(), LazyError> {
        let Some(l) = &self.listener else { return Ok(()) };
        match l.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(true)
                    .map_err(|e| LazyError::io("setting the restore connection non-blocking", e))?;
                self.conn = Some(conn);
                self.listener = None;
                // CRIU connects exactly once; the name is of no further use.
                let _ = std::fs::remove_file(&self.shared.path);
                self.shared.connected.store(true, Ordering::Relaxed);
                tracing::debug!(path = %self.shared.path.display(), "criu restore connected to the lazy-pages socket");
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(LazyError::io("accepting criu restore's connection", e)),
        }
    }

    /// Reads what restore sent: pids, uffds, RSTF, EOF.
    fn read_socket(&mut self) -> Result<(), LazyError> {
        loop {
            let Some(conn) = &self.conn else { return Ok(()) };
            match &mut self.rx {
                Rx::Pid { buf, got } => match (&*conn).read(&mut buf[*got..]) {
                    Ok(0) => return self.eof(),
                    Ok(n) => {
                        *got += n;
                        if *got < 4 {
                            continue;
                        }
                        let v = i32::from_ne_bytes(*buf);
                        self.rx = Rx::Pid { buf: [0; 4], got: 0 };
                        self.on_pid(v)?;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(LazyError::io("reading from criu restore", e)),
                },
                Rx::Fd { pid } => {
                    let pid = *pid;
                    match sys::recv_fds(conn.as_fd()) {
                        Ok(None) => return Ok(()),
                        Ok(Some((0, _))) => return self.eof(),
                        Ok(Some((_, fds))) => {
                            let mut fds = fds.into_iter();
                            let Some(uffd) = fds.next() else {
                                return Err(LazyError::Protocol {
                                    what: format!("no userfaultfd with the byte after pid {pid}"),
                                });
                            };
                            if fds.next().is_some() {
                                return Err(LazyError::Protocol { what: format!("several fds for pid {pid}") });
                            }
                            self.rx = Rx::Pid { buf: [0; 4], got: 0 };
                            self.attach(pid, uffd)?;
                        }
                        Err(Errno::ENOBUFS) => {
                            return Err(LazyError::Protocol { what: format!("a truncated fd message for pid {pid}") });
                        }
                        Err(Errno::EINTR) => continue,
                        Err(e) => return Err(LazyError::io("receiving a userfaultfd from criu restore", e)),
                    }
                }
                Rx::Finished => {
                    let mut b = [0u8; 64];
                    match (&*conn).read(&mut b) {
                        Ok(0) => {
                            self.conn = None;
                            return Ok(());
                        }
                        Ok(n) => {
                            tracing::warn!(bytes = n, "criu restore sent data after RSTF; ignored");
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => {
                            self.conn = None;
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    fn eof(&mut self) -> Result<(), LazyError> {
        self.conn = None;
        if self.rstf_at.is_none() {
            return Err(LazyError::RestoreFailed { processes: self.shared.processes.load(Ordering::Relaxed) });
        }
        Ok(())
    }

    fn on_pid(&mut self, v: i32) -> Result<(), LazyError> {
        if v as u32 == RESTORE_FINISHED {
            self.rstf_at = Some(Instant::now());
            self.rx = Rx::Finished;
            if !self.unattached.is_empty() {
                let mut pids: Vec<u32> = self.unattached.keys().copied().collect();
                pids.sort_unstable();
                tracing::warn!(
                    ?pids,
                    "restore finished without handing over these image pids; their lazy ranges are ignored"
                );
                self.unattached.clear();
            }
            self.shared.set_restored();
            tracing::debug!(processes = self.procs.len(), "criu restore finished (RSTF)");
            return Ok(());
        }
        match v {
            v if v > 0 => self.rx = Rx::Fd { pid: v as u32 },
            v if v < 0 => {
                // A zombie: no memory, no uffd.
                self.unattached.remove(&v.unsigned_abs());
                tracing::debug!(pid = v.unsigned_abs(), "criu restore: zombie, no userfaultfd");
            }
            _ => return Err(LazyError::Protocol { what: "pid 0".into() }),
        }
        Ok(())
    }

    fn attach(&mut self, pid: u32, uffd: OwnedFd) -> Result<(), LazyError> {
        set_nonblocking(&uffd)?;
        let ranges = self.unattached.remove(&pid).unwrap_or_default();
        let missing = Missing::new(&ranges);
        tracing::debug!(pid, pages = missing.pages, "userfaultfd received");
        self.add_proc(pid, uffd, missing, VecDeque::new());
        Ok(())
    }

    fn add_proc(&mut self, pid: u32, uffd: OwnedFd, missing: Missing, ready: VecDeque<(u64, u64)>) {
        let hint = missing.runs.keys().next().copied().unwrap_or(0);
        self.serials += 1;
        self.procs.push(Proc {
            pid,
            serial: self.serials,
            uffd: Arc::new(uffd),
            missing,
            retry: Vec::new(),
            parked: Vec::new(),
            ready,
            push_after: None,
            cap_until: 0,
            cap: PUSH_BATCH_PAGES,
            hint,
            gone: false,
            broken: false,
            warned_dropped: false,
            warned_pending: false,
        });
        self.stats.processes += 1;
        self.shared.processes.store(self.stats.processes, Ordering::Relaxed);
    }

    /// Reads and handles what process `i`'s uffd holds.
    fn drain(&mut self, i: usize) {
        for _ in 0..DRAIN_MAX {
            let p = &mut self.procs[i];
            if p.gone || p.broken {
                return;
            }
            let (read, filled) = {
                // Under ParkedFaults' lock: a range event's waiters are forgotten before anyone can fill
                // there again (reading the event is what lets UFFDIO_COPY in after an mm change), and
                // the fills done before it are accounted for before the event changes the picture.
                let mut parked = self.parked.lock();
                let read = uffd::read_msg(p.uffd.as_fd());
                let filled = std::mem::take(&mut parked.filled);
                match &read {
                    Ok(Some(uffd::Msg::Remap { from, to, len })) => {
                        parked.forget(p.serial, *from..from.saturating_add(*len));
                        parked.forget(p.serial, *to..to.saturating_add(*len));
                    }
                    Ok(Some(uffd::Msg::Remove { start, end } | uffd::Msg::Unmap { start, end })) => {
                        parked.forget(p.serial, *start..*end)
                    }
                    _ => {}
                }
                (read, filled)
            };
            self.settle_filled(filled);
            let msg = match read {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    self.fatal(i, "reading the userfaultfd", 0, e);
                    return;
                }
            };
            let p = &mut self.procs[i];
            match msg {
                uffd::Msg::Fault { addr } => {
                    let t0 = Instant::now();
                    self.answer_fault(i, addr & !(PAGE_SIZE - 1), t0, false);
                }
                uffd::Msg::Fork(child) => {
                    // The child's faulting threads are its own: its parked faults start empty.
                    let (pid, missing, ready) = (p.pid, p.missing.clone(), p.ready.clone());
                    let nonblocking = set_nonblocking(&child);
                    self.stats.forks += 1;
                    tracing::debug!(pid, pages = missing.pages, "fork: the child gets its parent's missing pages");
                    self.add_proc(pid, child, missing, ready);
                    if let Err(e) = nonblocking {
                        // A blocking uffd would block the daemon in read: never served, it ends the daemon.
                        tracing::error!("{e}");
                        self.procs.last_mut().expect("just added").broken = true;
                        self.error.get_or_insert(e);
                    }
                }
                uffd::Msg::Remap { from, to, len } => p.missing.remap(from, to, len),
                uffd::Msg::Remove { start, end } => {
                    match uffd::unregister(p.uffd.as_fd(), start, end - start) {
                        Ok(()) => {}
                        // ENOMEM: the mm is gone (the process exited).
                        Err(Errno::ENOMEM) | Err(Errno::ESRCH) => p.gone = true,
                        Err(e) => {
                            self.fatal(i, "UFFDIO_UNREGISTER", start, e);
                            return;
                        }
                    }
                    let p = &mut self.procs[i];
                    let n = p.missing.remove(start, end);
                    self.stats.dropped_pages += n;
                }
                uffd::Msg::Unmap { start, end } => {
                    let n = p.missing.remove(start, end);
                    self.stats.dropped_pages += n;
                }
                uffd::Msg::Other(event) => tracing::debug!(event, "userfaultfd: unknown event ignored"),
            }
        }
    }

    fn fatal(&mut self, i: usize, op: &'static str, addr: u64, e: Errno) {
        let p = &mut self.procs[i];
        p.broken = true;
        let err = LazyError::Uffd { op, pid: p.pid, addr, source: Arc::new(e.into()) };
        tracing::error!("{err}");
        self.error.get_or_insert(err);
    }

    fn drop_pages(&mut self, i: usize, start: u64, end: u64, why: &str) {
        let p = &mut self.procs[i];
        let n = p.missing.remove(start, end);
        self.stats.dropped_pages += n;
        if n > 0 && !p.warned_dropped {
            p.warned_dropped = true;
            tracing::warn!(
                pid = p.pid,
                addr = start,
                "lazy pages {why}; left as the kernel has them (further ones of this process not logged)"
            );
        }
    }

    /// Answers a fault on page `page` of process `i`, read at `t0`; `waited`: it was parked before. A
    /// page the source does not know yet is requested (once) and the fault parked.
    fn answer_fault(&mut self, i: usize, page: u64, t0: Instant, waited: bool) {
        let p = &mut self.procs[i];
        let img = p.missing.lookup(page);
        // Not missing (outside the lazy ranges, or filled meanwhile): ZEROPAGE fills a hole and finds a
        // filled page (EEXIST); there is nothing to wait for.
        let known = match img {
            Some(img) => self.source.lookup(p.pid, img, &mut self.page),
            None => Lookup::Zero,
        };
        if waited
            && known != Lookup::Pending
            && let Some(img) = img
        {
            // Answered here: the thread that receives the page has nothing to fill.
            self.parked.lock().unpark((p.pid, img), p.serial, page);
        }
        let (op, copied, (done, err)) = match (known, img) {
            (Lookup::Pending, Some(img)) => {
                // Parked the first time only: a parked fault tried again stays registered as it was.
                if !waited {
                    let w = Waiter { proc: p.serial, uffd: p.uffd.clone(), at: page };
                    self.parked.lock().park((p.pid, img), w);
                }
                if self.requested.insert((p.pid, img)) {
                    self.source.request(p.pid, img);
                }
                p.parked.push((page, t0));
                return;
            }
            (Lookup::Page, _) => ("UFFDIO_COPY", true, uffd::copy(p.uffd.as_fd(), page, &self.page)),
            _ => ("UFFDIO_ZEROPAGE", false, uffd::zeropage(p.uffd.as_fd(), page, PAGE_SIZE)),
        };
        let class = err.map(classify);
        match class {
            None | Some(Class::Exists) => {
                let filled = done > 0 || class.is_none();
                p.missing.remove(page, page + PAGE_SIZE);
                // Before completion the push follows faults (what they need next is likely near); after
                // it the sweep goes on where it was (module doc).
                if !self.complete {
                    p.hint = page + PAGE_SIZE;
                }
                self.stats.faults += 1;
                self.stats.waited_faults += u64::from(waited);
                if filled && copied {
                    self.stats.fault_pages += 1;
                    if class.is_none()
                        && let Some(img) = img
                    {
                        self.release(i, img, 1);
                    }
                } else if filled {
                    self.stats.zero_pages += 1;
                }
                let ns = t0.elapsed().as_nanos() as u64;
                self.latencies.push(ns);
                if !waited {
                    self.immediate.push(ns);
                }
            }
            Some(Class::Again) => p.retry.push((page, t0, waited)),
            // The range went away (unmapped or unregistered) while the fault waited: nothing to fill.
            Some(Class::NoEnt) => {
                self.stats.faults += 1;
                self.stats.waited_faults += u64::from(waited);
                self.drop_pages(i, page, page + PAGE_SIZE, "of a range that is no longer registered");
            }
            Some(Class::Gone) => p.gone = true,
            Some(Class::Fatal(e)) => self.fatal(i, op, page, e),
        }
    }

    /// Pages from image address `img` on were just copied into process `i`: if no other live process
    /// looks pages up under its image pid, nothing needs their content again (a fork since the copy would
    /// have made it fail with EAGAIN until its event was read and the child added), and the source may
    /// reuse their memory. Process `i` itself may be gone by now (a fill by the fault link's lane is
    /// settled later, and a child that was filled may have exited meanwhile): that does not make another
    /// process's need go away, so the others are counted, not the live ones.
    fn release(&self, i: usize, img: u64, pages: u64) {
        let pid = self.procs[i].pid;
        if pages > 0 && sole_user(self.procs.iter().map(|p| (p.pid, p.gone)), i, pid) {
            self.source.release(pid, img, pages);
        }
    }

    fn retry_faults(&mut self) {
        for i in 0..self.procs.len() {
            if self.procs[i].retry.is_empty() || self.procs[i].gone || self.procs[i].broken {
                continue;
            }
            let retry = std::mem::take(&mut self.procs[i].retry);
            for (page, t0, waited) in retry {
                self.answer_fault(i, page, t0, waited);
            }
        }
    }

    /// Tries every parked fault again: those whose page the source knows now are answered, the others
    /// stay parked (without a new request).
    fn retry_parked(&mut self) {
        let filled = std::mem::take(&mut self.parked.lock().filled);
        self.settle_filled(filled);
        for i in 0..self.procs.len() {
            if self.procs[i].parked.is_empty() || self.procs[i].gone || self.procs[i].broken {
                continue;
            }
            let parked = std::mem::take(&mut self.procs[i].parked);
            for (page, t0) in parked {
                self.answer_fault(i, page, t0, true);
            }
        }
    }

    /// Accounts for the parked faults [`ParkedFaults::fill`] answered: they are no longer parked, their
    /// page no longer missing, and their latency ends when the fill did. A fault the daemon answered
    /// meanwhile (it found the page in place) is not counted twice, but the page is counted. Called with every uffd message read
    /// (the fills taken under the same hold of the lock), so that a fill is accounted for before an event
    /// read after it moves or drops its page.
    fn settle_filled(&mut self, filled: Vec<Filled>) {
        for f in filled {
            let Some(i) = self.procs.iter().position(|p| p.serial == f.proc) else { continue };
            let p = &mut self.procs[i];
            let mut n = 0u64;
            let latencies = &mut self.latencies;
            p.parked.retain(|&(page, t0)| {
                if page != f.at {
                    return true;
                }
                latencies.push(f.when.saturating_duration_since(t0).as_nanos() as u64);
                n += 1;
                false
            });
            let img = p.missing.lookup(f.at);
            if n > 0 {
                p.missing.remove(f.at, f.at + PAGE_SIZE);
                // As for the daemon's own fault answers: the sweep does not follow faults (module doc).
                if !self.complete {
                    p.hint = f.at + PAGE_SIZE;
                }
                self.stats.faults += n;
                self.stats.waited_faults += n;
                self.stats.link_fills += n;
            }
            // The page counts where it was placed, also when the daemon answered its faults meanwhile
            // (its own fill found the page in place: EEXIST, which it counts as no page).
            match f.how {
                Fill::Copied => {
                    self.stats.fault_pages += 1;
                    if let Some(img) = img {
                        self.release(i, img, 1);
                    }
                }
                Fill::Zeroed => self.stats.zero_pages += 1,
                Fill::Present => {}
            }
        }
    }

    /// Parked faults of process `i` on pages in `[start, end)` (image address `img` at `start`), which
    /// the push just filled: answered (the fill woke their threads).
    fn resolve_parked(&mut self, i: usize, start: u64, img: u64, end: u64) {
        let p = &mut self.procs[i];
        if p.parked.is_empty() || start >= end {
            return;
        }
        let (latencies, mut n) = (&mut self.latencies, 0u64);
        let mut parked = self.parked.lock();
        p.parked.retain(|&(page, t0)| {
            let filled = (start..end).contains(&page);
            if filled {
                parked.unpark((p.pid, img + (page - start)), p.serial, page);
                latencies.push(t0.elapsed().as_nanos() as u64);
                n += 1;
            }
            !filled
        });
        drop(parked);
        self.stats.faults += n;
        self.stats.waited_faults += n;
    }

    /// Once the source says it is complete: the complete push phase from now on.
    fn check_complete(&mut self) {
        if self.complete || !self.source.complete() {
            return;
        }
        self.complete = true;
        self.arrivals = Vec::new();
        self.requested = HashSet::new();
        for p in &mut self.procs {
            p.ready = VecDeque::new();
        }
        tracing::debug!(
            restored = self.rstf_at.is_some(),
            pushed = self.stats.pushed_pages,
            faults = self.stats.faults,
            "the page source is complete: every missing page is pushed"
        );
    }

    /// Takes the source's arrivals; from RSTF on hands them to every process with their image pid that
    /// still misses a page of them in place (before RSTF they are kept). The pages no such process
    /// misses (a fault took them first: the source's bulk stream sends them again) are released at once,
    /// so the store does not keep them to the end; not when a process of that pid ever moved memory
    /// with mremap (a page may then be missing at another run-time address).
    fn collect_arrivals(&mut self) {
        if self.complete {
            return;
        }
        self.arrivals.extend(self.source.take_arrivals());
        if self.rstf_at.is_none() || self.arrivals.is_empty() {
            return;
        }
        for (pid, vaddr, pages) in std::mem::take(&mut self.arrivals) {
            let start = vaddr & !(PAGE_SIZE - 1);
            let end = start.saturating_add(u64::from(pages) * PAGE_SIZE);
            let (mut needed, mut exact) = (false, true);
            for p in self.procs.iter_mut().filter(|p| p.pid == pid && !p.gone && !p.broken) {
                exact &= !p.missing.moved;
                if p.missing.first_in_place(start, end).is_some() {
                    p.ready.push_back((start, end));
                    needed = true;
                }
            }
            if !exact {
                continue;
            }
            if !needed {
                self.source.release(pid, start, u64::from(pages));
                continue;
            }
            let live = |p: &&Proc| p.pid == pid && !p.gone && !p.broken;
            let mut missing: Vec<(u64, u64)> =
                self.procs.iter().filter(live).flat_map(|p| p.missing.pieces(start, end)).collect();
            missing.sort_unstable();
            for (from, to) in gaps(start, end, missing) {
                self.source.release(pid, from, (to - from) / PAGE_SIZE);
            }
        }
    }

    /// Pushes one batch of the next process that has something to push and is not backing off.
    fn push_one(&mut self) {
        let now = Instant::now();
        let n = self.procs.len();
        for k in 0..n {
            let i = (self.next + k) % n;
            let p = &self.procs[i];
            if !p.has_push(self.complete) || p.push_after.is_some_and(|t| t > now) {
                continue;
            }
            self.next = i + 1;
            if self.complete {
                self.push_missing(i);
            } else {
                self.push_arrived(i);
            }
            return;
        }
    }

    /// Complete phase: the next missing pages of process `i` after its last push (the sweep, see the
    /// module doc), up to the next PUSH_BATCH_PAGES boundary of the image address.
    fn push_missing(&mut self, i: usize) {
        let p = &mut self.procs[i];
        let Some((start, end, img)) = p.missing.next_from(p.hint) else { return };
        let mut want = ((end - start) / PAGE_SIZE).min(PUSH_BATCH_PAGES - (img / PAGE_SIZE) % PUSH_BATCH_PAGES);
        if start < p.cap_until {
            want = want.min(p.cap);
        }
        if !self.fill(i, start, img, want) {
            // A complete source must know every page. Never zero-fill it: ask for it and wait.
            let p = &mut self.procs[i];
            p.push_after = Some(Instant::now() + PENDING_BACKOFF);
            if !p.warned_pending {
                p.warned_pending = true;
                tracing::warn!(
                    pid = p.pid,
                    vaddr = img,
                    "the page source is complete but does not know this page yet; waiting for it"
                );
            }
            if self.requested.insert((p.pid, img)) {
                self.source.request(p.pid, img);
            }
        }
    }

    /// Before the source is complete: the next arrived pages of process `i` that it still misses in place.
    fn push_arrived(&mut self, i: usize) {
        for _ in 0..READY_SCAN_MAX {
            let p = &mut self.procs[i];
            let Some(&(s, e)) = p.ready.front() else { return };
            let Some((start, end)) = p.missing.first_in_place(s, e) else {
                p.ready.pop_front();
                continue;
            };
            let mut want = ((end - start) / PAGE_SIZE).min(PUSH_BATCH_PAGES);
            if start < p.cap_until {
                want = want.min(p.cap);
            }
            let filled = self.fill(i, start, start, want);
            let p = &mut self.procs[i];
            if let Some(front) = p.ready.front_mut() {
                // Said to have arrived but Pending again: skip it (a fault or the complete phase gets it).
                front.0 = if filled { start } else { start + PAGE_SIZE };
            }
            return;
        }
    }

    /// Fills at most `want` pages of process `i` from run-time `start` (image address `img`) with one
    /// ioctl: UFFDIO_COPY of the known pages from `start` on, or, if the first is a known zero page,
    /// UFFDIO_ZEROPAGE of the known zero pages from there. Stops before a page the source does not know
    /// yet; false (nothing done) if the first is such a page.
    fn fill(&mut self, i: usize, start: u64, img: u64, want: u64) -> bool {
        let p = &mut self.procs[i];
        p.push_after = None;
        let first = self.source.lookup(p.pid, img, &mut self.batch[..PAGE]);
        let mut n = 1u64;
        match first {
            Lookup::Pending => return false,
            Lookup::Page => {
                while n < want {
                    let o = n as usize * PAGE;
                    if self.source.lookup(p.pid, img + n * PAGE_SIZE, &mut self.batch[o..o + PAGE]) != Lookup::Page {
                        break;
                    }
                    n += 1;
                }
            }
            Lookup::Zero => {
                while n < want && self.source.lookup(p.pid, img + n * PAGE_SIZE, &mut self.page) == Lookup::Zero {
                    n += 1;
                }
            }
        }
        let copy = first == Lookup::Page;
        let (op, (done, err)) = if copy {
            ("UFFDIO_COPY", uffd::copy(p.uffd.as_fd(), start, &self.batch[..n as usize * PAGE]))
        } else {
            ("UFFDIO_ZEROPAGE", uffd::zeropage(p.uffd.as_fd(), start, n * PAGE_SIZE))
        };
        let done_pages = done / PAGE_SIZE;
        p.missing.remove(start, start + done_pages * PAGE_SIZE);
        p.hint = start + done_pages * PAGE_SIZE;
        if copy {
            self.stats.pushed_pages += done_pages;
            self.release(i, img, done_pages);
        } else {
            self.stats.zero_pages += done_pages;
        }
        let p = &mut self.procs[i];
        let mut filled_end = start + done_pages * PAGE_SIZE;
        if let Some(e) = err {
            let at = filled_end;
            match classify(e) {
                // Filled meanwhile (a fault answered it): done.
                Class::Exists => {
                    p.missing.remove(at, at + PAGE_SIZE);
                    p.hint = at + PAGE_SIZE;
                    filled_end = at + PAGE_SIZE;
                }
                // A partial copy reports EAGAIN: go on at once from where it stopped. A real EAGAIN (an mm
                // change whose event is not read yet): read the events first, try again a little later.
                Class::Again => {
                    if done_pages == 0 {
                        p.push_after = Some(Instant::now() + AGAIN_BACKOFF);
                    }
                }
                // Not (or no longer) a registered range. A batch may just have crossed the end of a VMA
                // (lazy ranges merge adjacent VMAs): halve the batches over that stretch until they fit; a
                // single page that fails is unfillable.
                Class::NoEnt => {
                    if n > 1 && done_pages == 0 {
                        if start >= p.cap_until {
                            p.cap_until = start + n * PAGE_SIZE;
                        }
                        p.cap = n / 2;
                    } else if done_pages == 0 {
                        self.drop_pages(i, at, at + PAGE_SIZE, "in a range the restorer did not register");
                    }
                }
                Class::Gone => p.gone = true,
                Class::Fatal(e) => self.fatal(i, op, at, e),
            }
        }
        self.resolve_parked(i, start, img, filled_end);
        true
    }

    fn publish(&self) {
        // Release, and Acquire in `progress`: a reader that sees pages pushed also sees `restored`.
        let s = &self.shared;
        s.faults.store(self.stats.faults, Ordering::Release);
        s.waited.store(self.stats.waited_faults, Ordering::Release);
        s.pushed.store(self.stats.pushed_pages, Ordering::Release);
        s.zero.store(self.stats.zero_pages, Ordering::Release);
        let left: u64 = self.procs.iter().filter(|p| !p.gone).map(|p| p.missing.pages).sum::<u64>()
            + self.unattached.values().map(|r| Missing::new(r).pages).sum::<u64>();
        s.left.store(left, Ordering::Release);
    }

    /// Changes whenever a page is filled or dropped, a fault answered, or a process ends or is added.
    fn progress_mark(&self) -> u64 {
        let s = &self.stats;
        s.faults
            + s.pushed_pages
            + s.zero_pages
            + s.fault_pages
            + s.dropped_pages
            + s.processes
            + self.procs.len() as u64
    }

    /// Logs what the unsettled processes wait for when nothing moved for [`STALL_REPORT`] after RSTF.
    fn report_stall(&mut self) {
        let now = Instant::now();
        let mark = self.progress_mark();
        if mark != self.progress.0 || self.rstf_at.is_none() {
            self.progress = (mark, now, None);
            return;
        }
        let since = self.progress.2.unwrap_or(self.progress.1);
        if now.duration_since(since) < STALL_REPORT {
            return;
        }
        self.progress.2 = Some(now);
        let stalled = now.duration_since(self.progress.1);
        let parked = self.parked.lock().waiting.len();
        tracing::warn!(
            secs = stalled.as_secs(),
            complete = self.complete,
            parked_pages = parked,
            "lazy pages: nothing filled for a while; what each unfinished process waits for follows"
        );
        for p in self.procs.iter().filter(|p| !p.settled()) {
            let first = p.missing.runs.iter().next().map(|(&s, &(e, img))| (s, e, img));
            let first_known = first.map(|(_, _, img)| self.source.lookup(p.pid, img, &mut vec![0u8; PAGE]));
            tracing::warn!(
                pid = p.pid,
                serial = p.serial,
                missing = p.missing.pages,
                first_missing = ?first.map(|(s, e, img)| format!("{s:#x}-{e:#x} (image {img:#x})")),
                first_known = ?first_known,
                parked = ?p.parked.iter().take(4).map(|(a, t)| format!("{a:#x} for {:?}", t.elapsed())).collect::<Vec<_>>(),
                retry = p.retry.len(),
                ready = p.ready.len(),
                push_after = ?p.push_after.map(|t| t.saturating_duration_since(now)),
                has_push = p.has_push(self.complete),
                "lazy pages: unfinished process"
            );
        }
    }

    fn finish(&mut self) -> LazyStats {
        self.latencies.sort_unstable();
        self.immediate.sort_unstable();
        let mut st = self.stats.clone();
        st.fault_p50 = percentile(&self.latencies, 50.0);
        st.fault_p99 = percentile(&self.latencies, 99.0);
        st.fault_max = self.latencies.last().map_or(Duration::ZERO, |&n| Duration::from_nanos(n));
        st.elapsed = self.started.elapsed();
        st.push_elapsed = self.rstf_at.map_or(Duration::ZERO, |t| t.elapsed());
        tracing::info!(
            processes = st.processes,
            faults = st.faults,
            waited = st.waited_faults,
            link_fills = st.link_fills,
            pushed = st.pushed_pages,
            zero = st.zero_pages,
            dropped = st.dropped_pages,
            p50_us = st.fault_p50.as_micros() as u64,
            p99_us = st.fault_p99.as_micros() as u64,
            max_us = st.fault_max.as_micros() as u64,
            immediate_p99_us = percentile(&self.immediate, 99.0).as_micros() as u64,
            push_ms = st.push_elapsed.as_millis() as u64,
            "every lazy page is in place; userfaultfds closed"
        );
        // Closing the uffds (dropping the procs, and whatever ParkedFaults still held) lets the tree run
        // on without a daemon.
        self.parked.lock().close();
        self.procs.clear();
        st
    }
}

fn set_nonblocking(fd: &OwnedFd) -> Result<(), LazyError> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    // poll on a userfaultfd without O_NONBLOCK always reports POLLERR (fs/userfaultfd.c).
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(|e| LazyError::io("reading a userfaultfd's flags", e))?;
    fcntl(fd, FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK))
        .map_err(|e| LazyError::io("making a userfaultfd non-blocking", e))?;
    Ok(())
}

/// Nearest-rank percentile of sorted nanoseconds.
fn percentile(sorted: &[u64], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Duration::from_nanos(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Pages read from an images directory (`pagemap-<pid>.img` + `pages-<id>.img`, following `parent/`
/// for PE_PARENT entries): the page source when the images of a normal dump arrived whole.
pub struct ImagePageSource {
    procs: HashMap<u32, Vec<Layer>>,
}

/// One directory's pagemap of one pid, with the pages file offset of every entry that has data.
struct Layer {
    pages: Option<File>,
    /// (vaddr, end, flags, offset in the pages file)
    entries: Vec<(u64, u64, u32, u64)>,
}

/// `parent/` links followed at most.
const MAX_PARENT_DEPTH: usize = 64;

impl ImagePageSource {
    /// Indexes every pagemap in `dir`. Refuses images whose lazy pages have no data here or in a parent.
    pub fn open(dir: &Path) -> Result<ImagePageSource, LazyError> {
        let images = |e| LazyError::Images { source: Arc::new(e) };
        let mut procs = HashMap::new();
        for pid in criu::images::pagemap_pids(dir).map_err(images)? {
            let mut layers = Vec::new();
            let mut d = dir.to_path_buf();
            loop {
                let pm = criu::images::read_pagemap(&d.join(format!("pagemap-{pid}.img"))).map_err(images)?;
                let mut off = 0u64;
                let mut entries = Vec::with_capacity(pm.entries.len());
                let mut wants_parent = false;
                for e in &pm.entries {
                    if e.flags & PE_LAZY != 0 && e.flags & (PE_PRESENT | PE_PARENT) == 0 {
                        return Err(LazyError::LazyWithoutData { dir: d, pid, vaddr: e.vaddr });
                    }
                    wants_parent |= e.flags & PE_PARENT != 0;
                    entries.push((e.vaddr, e.end(), e.flags, off));
                    if e.flags & PE_PRESENT != 0 {
                        off += e.nr_pages as u64 * PAGE_SIZE;
                    }
                }
                let pages = if off > 0 {
                    let path = d.join(format!("pages-{}.img", pm.pages_id));
                    let f = File::open(&path)
                        .map_err(|source| images(criu::images::ImageError::Io { path: path.clone(), source }))?;
                    let have = f
                        .metadata()
                        .map_err(|source| images(criu::images::ImageError::Io { path: path.clone(), source }))?
                        .len();
                    if have < off {
                        return Err(LazyError::ShortPages { path, have, need: off });
                    }
                    Some(f)
                } else {
                    None
                };
                layers.push(Layer { pages, entries });
                let parent = d.join("parent");
                if !wants_parent
                    || layers.len() >= MAX_PARENT_DEPTH
                    || !parent.join(format!("pagemap-{pid}.img")).exists()
                {
                    break;
                }
                d = parent;
            }
            procs.insert(pid, layers);
        }
        Ok(ImagePageSource { procs })
    }
}

impl PageSource for ImagePageSource {
    fn read_page(&self, pid: u32, vaddr: u64, out: &mut [u8]) -> bool {
        let Some(layers) = self.procs.get(&pid) else { return false };
        for layer in layers {
            let i = layer.entries.partition_point(|e| e.1 <= vaddr);
            let Some(&(start, _, flags, off)) = layer.entries.get(i).filter(|e| e.0 <= vaddr) else { return false };
            if flags & PE_PRESENT != 0 {
                let Some(f) = &layer.pages else { return false };
                return match f.read_exact_at(&mut out[..PAGE], off + (vaddr - start)) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::error!(pid, vaddr, "reading a page from the images failed: {e}; it is zero-filled");
                        false
                    }
                };
            }
            if flags & PE_PARENT == 0 {
                return false;
            }
        }
        false
    }
}

/// Every unsafe operation of this module: taking ownership of the file descriptors CRIU sends
/// (SCM_RIGHTS), and the tests' stand-in for `criu restore` (the `uffd` crate has the ioctls).
mod sys {
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

    use nix::errno::Errno;

    /// `recvmsg` of the 1-byte message that carries a uffd: None when nothing is there yet, else the
    /// bytes read (0 = EOF) and the fds received. Err(ENOBUFS) when the control data was truncated.
    pub(super) fn recv_fds(sock: BorrowedFd<'_>) -> Result<Option<(usize, Vec<OwnedFd>)>, Errno> {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        let mut byte = [0u8; 1];
        let mut iov = [std::io::IoSliceMut::new(&mut byte)];
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let msg = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(Errno::EAGAIN) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for r in raw {
                    // SAFETY: SCM_RIGHTS just installed this fd in our table for this message; nothing
                    // else has its number, so this OwnedFd is its only owner.
                    fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                }
            }
        }
        Ok(Some((msg.bytes, fds)))
    }

    /// What the tests need to play `criu restore` in-process: a userfaultfd of their own, anonymous
    /// mappings, mremap/madvise/munmap to cause events, and a forked child.
    #[cfg(test)]
    pub(super) mod testing {
        use std::os::fd::AsFd;

        use super::*;

        /// A userfaultfd of this process, O_CLOEXEC|O_NONBLOCK, after UFFDIO_API with `features`.
        pub fn userfaultfd(features: u64) -> std::io::Result<OwnedFd> {
            let fd = uffd::create(libc::O_CLOEXEC | libc::O_NONBLOCK)?;
            uffd::api(fd.as_fd(), features)?;
            Ok(fd)
        }

        /// UFFDIO_REGISTER_MODE_MISSING over `[start, start + len)`, a mapping made with [`mmap_anon`].
        pub fn register_missing(fd: &OwnedFd, start: u64, len: u64) -> std::io::Result<()> {
            // SAFETY: the tests register only their mmap_anon mappings, which they access through raw
            // pointers (read_mem) and never hold a Rust value in.
            Ok(unsafe { uffd::register(fd.as_fd(), start, len, uffd::REGISTER_MODE_MISSING) }?)
        }

        /// A new private anonymous read-write mapping of `len` bytes; its address.
        pub fn mmap_anon(len: usize) -> u64 {
            // SAFETY: a fresh mapping at an address of the kernel's choice touches no existing memory.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
            p as u64
        }

        /// munmap; the test owns the range and holds no reference into it.
        pub fn munmap(addr: u64, len: usize) {
            // SAFETY: the range is a mapping the test made with mmap_anon and only reads via read_mem.
            assert_eq!(unsafe { libc::munmap(addr as *mut libc::c_void, len) }, 0);
        }

        /// mremap(MAYMOVE|FIXED) of `[old, old + len)` onto `new` (a mapping of the test's it replaces).
        pub fn mremap_fixed(old: u64, len: usize, new: u64) {
            // SAFETY: both ranges are mappings the test made with mmap_anon and holds no references into.
            let p = unsafe {
                libc::mremap(
                    old as *mut libc::c_void,
                    len,
                    len,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    new as *mut libc::c_void,
                )
            };
            assert_eq!(p as u64, new, "mremap: {}", std::io::Error::last_os_error());
        }

        /// mprotect to read-only (splits the VMA).
        pub fn mprotect_read_only(addr: u64, len: usize) {
            // SAFETY: as munmap: the test's own mapping, no references into it.
            assert_eq!(unsafe { libc::mprotect(addr as *mut libc::c_void, len, libc::PROT_READ) }, 0);
        }

        /// madvise(MADV_DONTNEED).
        pub fn madvise_dontneed(addr: u64, len: usize) {
            // SAFETY: as munmap: the test's own mapping, no references into it.
            assert_eq!(unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) }, 0);
        }

        /// Copies `out.len()` bytes at `addr` (faults there are served by the daemon under test).
        pub fn read_mem(addr: u64, out: &mut [u8]) {
            // SAFETY: `addr..addr+len` lies in a live mapping of the test's (mmap_anon), readable, and
            // disjoint from `out`.
            unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, out.as_mut_ptr(), out.len()) }
        }

        /// Forks; the child runs `f` (which must not allocate or lock: only read memory and compare)
        /// and exits with its result; returns the child's exit code.
        ///
        /// A raw fork (clone with only SIGCHLD), not glibc's fork(): that one holds every malloc arena
        /// lock until the kernel is done, and with EVENT_FORK the kernel waits for the daemon (a thread
        /// of this process) to read the FORK event, which may need one of those locks.
        pub fn in_child(f: impl FnOnce() -> i32) -> i32 {
            let (flags, none) = (libc::SIGCHLD as libc::c_long, 0 as libc::c_long);
            // SAFETY: clone(SIGCHLD, no new stack, ...) is fork without glibc's handlers. The child only
            // runs `f`, which reads memory and compares bytes (no allocation, no lock, nothing of glibc's
            // per-thread state), then _exit(2)s: nothing another thread held at fork time is needed.
            match unsafe { libc::syscall(libc::SYS_clone, flags, none, none, none, none) } {
                0 => {
                    let code = f();
                    // SAFETY: ends the child without running any parent state's destructors.
                    unsafe { libc::_exit(code) }
                }
                -1 => panic!("fork: {}", std::io::Error::last_os_error()),
                pid => {
                    let pid = nix::unistd::Pid::from_raw(pid as i32);
                    let status = nix::sys::wait::waitpid(pid, None).expect("waitpid");
                    match status {
                        nix::sys::wait::WaitStatus::Exited(_, c) => c,
                        s => panic!("child ended with {s:?}"),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::sys::testing::*;
    use super::*;
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::io::Write;
    use std::os::fd::AsRawFd;

    /// Names, in a re-executed test binary, the one test it runs (see `in_own_process`).
    const OWN_PROCESS_ENV: &str = "MIGRATE_LAZY_TEST_IN_OWN_PROCESS";

    /// The uffd tests register ranges of this process's own mm with EVENT_FORK, as CRIU's restorer
    /// does. Then every fork of the whole process (another test's: a fork in one uffd test handing the
    /// others' ranges to its child) waits inside clone() until the daemon reads
    /// the FORK event, and glibc's fork() holds every malloc arena lock meanwhile: a daemon that needs
    /// one never reads it (seen here under load: a deadlock). So each uffd test runs alone in a fresh
    /// process of this test binary, bounded by 60 s; the parent only spawns it (posix_spawn, no
    /// FORK event, and the parent has no uffd anyway). The restored tree of a real restore is another
    /// process: its forks hold its own malloc locks, not the daemon's.
    ///
    /// True in the parent: the test ran (and passed) in its own process, return. False in that
    /// process: run the test's body.
    fn in_own_process(test: &str) -> bool {
        let module = module_path!().split_once("::").map_or(module_path!(), |(_, m)| m);
        let name = format!("{module}::{test}");
        if std::env::var(OWN_PROCESS_ENV).is_ok_and(|v| v == name) {
            return false;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("output");
        let out = File::create(&log).expect("output file");
        let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([name.as_str(), "--exact", "--nocapture", "--test-threads=1"])
            .env(OWN_PROCESS_ENV, &name)
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("re-running the test binary");
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(st) = child.try_wait().expect("waiting for the test process") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("{name} did not end within 60 s in its own process:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        eprint!("{text}");
        assert!(status.success() && text.contains("1 passed"), "{name} in its own process: {status}\n{text}");
        true
    }

    const P: u64 = PAGE_SIZE;

    fn word(pid: u32, vaddr: u64, i: u64) -> u64 {
        let mut x = vaddr ^ ((pid as u64) << 48) ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x ^ (x >> 31)
    }

    /// The content the fake store holds for a page.
    fn content(pid: u32, vaddr: u64) -> Vec<u8> {
        (0..P / 8).flat_map(|i| word(pid, vaddr, i).to_ne_bytes()).collect()
    }

    /// A page store with every page of `pid` except `holes`, counting reads.
    struct FakeSource {
        pid: u32,
        holes: Vec<u64>,
        reads: AtomicU64,
    }

    impl PageSource for FakeSource {
        fn read_page(&self, pid: u32, vaddr: u64, out: &mut [u8]) -> bool {
            self.reads.fetch_add(1, Ordering::Relaxed);
            if pid != self.pid || self.holes.contains(&vaddr) {
                return false;
            }
            out[..PAGE].copy_from_slice(&content(pid, vaddr));
            true
        }
    }

    fn source(pid: u32, holes: Vec<u64>) -> Arc<FakeSource> {
        Arc::new(FakeSource { pid, holes, reads: AtomicU64::new(0) })
    }

    /// One range of one pid.
    fn one(pid: u32, r: Range<u64>) -> LazyRanges {
        vec![(pid, vec![r])]
    }

    /// Plays `criu restore`'s side of the socket.
    struct FakeRestore(UnixStream);

    impl FakeRestore {
        fn connect(dir: &Path) -> FakeRestore {
            FakeRestore(UnixStream::connect(dir.join(SOCKET_NAME)).expect("connect to the daemon"))
        }

        /// int32 pid alone, then (pid > 0) 1 dummy byte + SCM_RIGHTS uffd, as criu/uffd.c sends them.
        fn send_task(&mut self, pid: i32, uffd: Option<&OwnedFd>) {
            self.0.write_all(&pid.to_ne_bytes()).expect("send pid");
            if let Some(fd) = uffd {
                let raw = [fd.as_raw_fd()];
                let n = sendmsg::<()>(
                    self.0.as_raw_fd(),
                    &[std::io::IoSlice::new(&[0])],
                    &[ControlMessage::ScmRights(&raw)],
                    MsgFlags::empty(),
                    None,
                )
                .expect("sendmsg uffd");
                assert_eq!(n, 1);
            }
        }

        fn finish(&mut self) {
            self.0.write_all(&RESTORE_FINISHED.to_ne_bytes()).expect("send RSTF");
        }
    }

    /// The daemon on `lazy` of `pid` with `src`, and a fake restore that handed it `uffd` (CRIU's copy of
    /// it closed, as after sending), RSTF not sent yet.
    fn restoring(
        dir: &Path,
        pid: u32,
        lazy: Range<u64>,
        src: Arc<dyn PageSource>,
        uffd: OwnedFd,
    ) -> (LazyHandle, FakeRestore) {
        let h = LazyPages::listen(dir).unwrap().start(one(pid, lazy), src);
        let mut criu = FakeRestore::connect(dir);
        criu.send_task(pid as i32, Some(&uffd));
        drop(uffd);
        (h, criu)
    }

    /// A uffd with CRIU's features (FORK|REMAP|REMOVE|UNMAP = 0x4e) over a new mapping of `pages` pages.
    fn registered(pages: u64) -> (OwnedFd, u64) {
        let uffd = userfaultfd(0x4e).unwrap_or_else(|e| {
            panic!(
                "userfaultfd with non-cooperative events: {e}; run the tests as root (EVENT_FORK needs CAP_SYS_PTRACE)"
            )
        });
        let addr = mmap_anon((pages * P) as usize);
        register_missing(&uffd, addr, pages * P).expect("UFFDIO_REGISTER");
        (uffd, addr)
    }

    /// Runs `f` on another thread (its faults are served by the daemon); panics if it takes over 10 s,
    /// which means a fault was never answered.
    fn touching<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(10)).expect("memory access not answered within 10 s: a fault was lost")
    }

    fn page_at(addr: u64) -> Vec<u8> {
        touching(move || {
            let mut b = vec![0u8; PAGE];
            read_mem(addr, &mut b);
            b
        })
    }

    /// wait_done bounded: cancelled after 20 s.
    fn done_within(h: LazyHandle) -> Result<LazyStats, LazyError> {
        let c = h.clone();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if rx.recv_timeout(Duration::from_secs(20)).is_err() {
                c.cancel();
            }
        });
        let r = h.wait_done();
        let _ = tx.send(());
        r
    }

    /// A store filled while the tree runs (post-copy): a page is Pending until it is published (with its
    /// content, or as a known zero page), or until `finish`, after which the store is complete and every
    /// page never published is a zero page. Publishing records an arrival and calls the daemon's waker.
    /// With `serve_after`, a requested page is published that long after the request (the priority
    /// stream).
    struct LateSource {
        pid: u32,
        serve_after: Option<Duration>,
        me: std::sync::Weak<LateSource>,
        state: Mutex<Late>,
        waker: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
        parked: Mutex<Option<ParkedFaults>>,
        /// A requested page is only handed to `ParkedFaults::fill` (as the fault link does), never
        /// published: the daemon itself cannot answer its fault.
        link_only: AtomicBool,
        /// Faults `ParkedFaults::fill` answered.
        link_filled: AtomicU64,
    }

    #[derive(Default)]
    struct Late {
        /// Published pages: true = content, false = a zero page.
        known: HashMap<u64, bool>,
        arrivals: Vec<(u32, u64, u32)>,
        complete: bool,
        requests: Vec<(u32, u64)>,
        /// Lookups answered Pending.
        pending_lookups: u64,
        /// Pages the daemon released (their content is gone: Pending from then on, until published
        /// again, as the store holds a page again when the bulk stream brings it after a fault did).
        released: HashSet<u64>,
        /// How often each page's content was released (held, then released).
        releases: HashMap<u64, u32>,
        /// Every release call (vaddr, pages), in order.
        release_calls: Vec<(u64, u64)>,
    }

    impl LateSource {
        fn new(pid: u32, serve_after: Option<Duration>) -> Arc<LateSource> {
            Arc::new_cyclic(|me| LateSource {
                pid,
                serve_after,
                me: me.clone(),
                state: Mutex::new(Late::default()),
                waker: Mutex::new(None),
                parked: Mutex::new(None),
                link_only: AtomicBool::new(false),
                link_filled: AtomicU64::new(0),
            })
        }

        fn state(&self) -> MutexGuard<'_, Late> {
            self.state.lock().unwrap_or_else(|e| e.into_inner())
        }

        fn publish(&self, vaddr: u64, pages: u32, data: bool) {
            {
                let mut st = self.state();
                for k in 0..u64::from(pages) {
                    st.known.insert(vaddr + k * P, data);
                    st.released.remove(&(vaddr + k * P));
                }
                st.arrivals.push((self.pid, vaddr, pages));
            }
            self.wake();
        }

        fn finish(&self) {
            self.state().complete = true;
            self.wake();
        }

        fn wake(&self) {
            if let Some(w) = &*self.waker.lock().unwrap_or_else(|e| e.into_inner()) {
                w();
            }
        }

        fn requests(&self) -> Vec<(u32, u64)> {
            self.state().requests.clone()
        }
    }

    impl PageSource for LateSource {
        fn read_page(&self, pid: u32, vaddr: u64, out: &mut [u8]) -> bool {
            self.lookup(pid, vaddr, out) == Lookup::Page
        }

        fn lookup(&self, pid: u32, vaddr: u64, out: &mut [u8]) -> Lookup {
            let mut st = self.state();
            if st.released.contains(&vaddr) {
                return Lookup::Pending;
            }
            match st.known.get(&vaddr).filter(|_| pid == self.pid) {
                Some(true) => {
                    out[..PAGE].copy_from_slice(&content(pid, vaddr));
                    Lookup::Page
                }
                Some(false) => Lookup::Zero,
                None if st.complete => Lookup::Zero,
                None => {
                    st.pending_lookups += 1;
                    Lookup::Pending
                }
            }
        }

        fn request(&self, pid: u32, vaddr: u64) {
            self.state().requests.push((pid, vaddr));
            if let Some(d) = self.serve_after {
                let me = self.me.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(d);
                    let Some(s) = me.upgrade() else { return };
                    if !s.link_only.load(Ordering::SeqCst) {
                        s.publish(vaddr, 1, true);
                    }
                    let parked = s.parked.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    if let Some(parked) = parked {
                        let n = parked.fill(pid, vaddr, Some(&content(pid, vaddr)));
                        s.link_filled.fetch_add(n as u64, Ordering::SeqCst);
                    }
                });
            }
        }

        fn complete(&self) -> bool {
            self.state().complete
        }

        fn take_arrivals(&self) -> Vec<(u32, u64, u32)> {
            std::mem::take(&mut self.state().arrivals)
        }

        fn release(&self, pid: u32, vaddr: u64, pages: u64) {
            assert_eq!(pid, self.pid);
            let mut st = self.state();
            st.release_calls.push((vaddr, pages));
            // As the store: releasing a page whose content is gone already does nothing.
            for k in 0..pages {
                if st.released.insert(vaddr + k * P) {
                    *st.releases.entry(vaddr + k * P).or_default() += 1;
                }
            }
        }

        fn set_waker(&self, wake: Box<dyn Fn() + Send + Sync>) {
            *self.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(wake);
        }

        fn set_parked(&self, parked: ParkedFaults) {
            *self.parked.lock().unwrap_or_else(|e| e.into_inner()) = Some(parked);
        }
    }

    /// Reads page `addr` on another thread (bounded as `touching`): its content and how long the read
    /// took (the fault's service time as the faulting thread sees it).
    fn timed_page_at(addr: u64) -> (Vec<u8>, Duration) {
        touching(move || {
            let mut b = vec![0u8; PAGE];
            let t = Instant::now();
            read_mem(addr, &mut b);
            (b, t.elapsed())
        })
    }

    /// Polls `what` until it holds, at most 5 s; whether it did.
    fn until(what: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !what() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Polls `progress` until `what` holds; panics after 5 s.
    fn progress_until(h: &LazyHandle, what: impl Fn(&LazyProgress) -> bool) -> LazyProgress {
        let last = std::cell::Cell::new(None);
        let held = until(|| {
            let p = h.progress();
            let ok = what(&p);
            last.set(Some(p));
            ok
        });
        let p = last.take().expect("polled at least once");
        assert!(held, "progress stuck at {p:?}");
        p
    }

    /// CPU time (user + system, in clock ticks) of this process's threads named "lazy-pages".
    fn daemon_cpu_ticks() -> u64 {
        let mut ticks = 0;
        for t in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
            let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else { continue };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
            if &stat[open + 1..close] != "lazy-pages" {
                continue;
            }
            // After "(comm) ": state is field 3, utime 14, stime 15.
            let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
            ticks += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
        ticks
    }

    fn micros(d: &[Duration]) -> Vec<u128> {
        d.iter().map(|d| d.as_micros()).collect()
    }

    #[test]
    fn a_page_is_released_only_when_no_other_live_process_of_its_pid_needs_it() {
        // (image pid, gone): a parent, its child forked during post-copy, another tree's process.
        let procs = |child_gone| vec![(7317, false), (7317, child_gone), (9000, false)].into_iter();
        assert!(!sole_user(procs(false), 0, 7317), "the live child may still miss it");
        assert!(!sole_user(procs(false), 1, 7317), "the parent may still miss it");
        // The lane filled the child, which exited before the daemon settled that fill: the parent may
        // still miss the page (counting the live ones instead would find exactly one, and release).
        assert!(!sole_user(procs(true), 1, 7317));
        assert!(sole_user(procs(true), 0, 7317), "filled into the parent, the only live one of its pid");
        assert!(sole_user(procs(false), 2, 9000), "another pid does not count");
    }

    #[test]
    fn missing_runs_split_remap_and_look_up() {
        let mut m = Missing::new(&[0x10000..0x20000, 0x30000..0x31000]);
        assert_eq!(m.pages, 17);
        assert_eq!(m.lookup(0x10000), Some(0x10000));
        assert_eq!(m.lookup(0x1f000), Some(0x1f000));
        assert_eq!(m.lookup(0x20000), None);
        assert_eq!(m.remove(0x12000, 0x14000), 2);
        assert_eq!(m.lookup(0x12000), None);
        assert_eq!(m.lookup(0x14000), Some(0x14000));
        // Move [0x14000, 0x18000) to 0x80000: run-time address moves, image address stays.
        m.remap(0x14000, 0x80000, 0x4000);
        assert_eq!(m.lookup(0x14000), None);
        assert_eq!(m.lookup(0x81000), Some(0x15000));
        assert_eq!(m.pages, 15);
        // A remap onto missing pages drops those (mremap unmapped them).
        m.remap(0x30000, 0x18000, 0x1000);
        assert_eq!(m.lookup(0x18000), Some(0x30000));
        assert_eq!(m.pages, 14);
        // Push order: from the hint, else the next run, else the first.
        assert_eq!(m.next_from(0x81000), Some((0x81000, 0x84000, 0x15000)));
        assert_eq!(m.next_from(0x17000), Some((0x18000, 0x19000, 0x30000)));
        assert_eq!(m.next_from(0x90000), Some((0x10000, 0x12000, 0x10000)));
        assert_eq!(m.remove(0, u64::MAX), 14);
        assert!(m.is_empty() && m.runs.is_empty());
    }

    /// An arrived run's pages that no process misses (released at once) are the gaps between the missing
    /// pieces of every process within the run.
    #[test]
    fn pages_no_process_misses_are_the_gaps_between_missing_pieces() {
        let a = Missing::new(&[0x10000..0x14000, 0x18000..0x20000]);
        let b = Missing::new(&[0x13000..0x16000, 0x16000..0x19000]);
        assert_eq!(a.pieces(0x11000, 0x1a000).collect::<Vec<_>>(), vec![(0x18000, 0x1a000), (0x11000, 0x14000)]);
        assert_eq!(a.pieces(0x14000, 0x18000).count(), 0);
        let mut both: Vec<(u64, u64)> = a.pieces(0xf000, 0x22000).chain(b.pieces(0xf000, 0x22000)).collect();
        both.sort_unstable();
        assert_eq!(gaps(0xf000, 0x22000, both), vec![(0xf000, 0x10000), (0x20000, 0x22000)]);
        let only_a: Vec<(u64, u64)> = a.pieces(0x12000, 0x1c000).collect::<Vec<_>>().into_iter().rev().collect();
        assert_eq!(gaps(0x12000, 0x1c000, only_a), vec![(0x14000, 0x18000)]);
        assert_eq!(gaps(0x12000, 0x1c000, Vec::new()), vec![(0x12000, 0x1c000)]);
        assert_eq!(gaps(0x12000, 0x1c000, vec![(0x12000, 0x1c000)]), Vec::new());
    }

    /// Faults before RSTF are answered from the source (holes and pages outside the lazy ranges as
    /// zeros) and nothing is pushed before RSTF; after it every remaining page is pushed and the uffd
    /// closed.
    #[test]
    fn faults_are_served_and_the_rest_pushed_after_rstf() {
        if in_own_process("faults_are_served_and_the_rest_pushed_after_rstf") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let pages = 300u64;
        let (uffd, addr) = registered(pages);
        // Lazy: the first 256 pages, in two ranges; the store lacks pages 10 and 200.
        let lazy_end = addr + 256 * P;
        let ranges = vec![(777, Vec::from([addr..addr + 100 * P, addr + 100 * P..lazy_end]))];
        let src = source(777, vec![addr + 10 * P, addr + 200 * P]);
        let lazy = LazyPages::listen(dir.path()).unwrap();
        let h = lazy.start(ranges, src.clone());
        let mut criu = FakeRestore::connect(dir.path());
        criu.send_task(777, Some(&uffd));
        drop(uffd); // as the restorer does: the daemon holds the only reference

        // Before RSTF: faults only.
        assert_eq!(page_at(addr + 5 * P), content(777, addr + 5 * P));
        assert_eq!(page_at(addr + 10 * P), vec![0u8; PAGE], "a page the store lacks reads as zeros");
        assert_eq!(page_at(addr + 280 * P), vec![0u8; PAGE], "a page outside the lazy ranges reads as zeros");
        std::thread::sleep(Duration::from_millis(50));
        let p = h.progress();
        assert_eq!((p.faults, p.pushed_pages, p.restored), (3, 0, false), "{p:?}");
        assert_eq!(p.pages_left, 254);
        assert!(h.wait_restored(Duration::from_millis(20)).is_err(), "restored before RSTF");

        criu.finish();
        h.wait_restored(Duration::from_secs(5)).expect("RSTF seen");
        let stats = done_within(h).expect("every page in place");
        assert_eq!(stats.processes, 1);
        assert_eq!(stats.faults, 3);
        assert_eq!(stats.fault_pages, 1);
        assert_eq!(stats.pushed_pages, 256 - 2 - 1, "{stats:?}");
        assert_eq!(stats.zero_pages, 2 + 1, "{stats:?}");
        assert_eq!(stats.dropped_pages, 0);
        assert!(stats.fault_p50 <= stats.fault_p99 && stats.fault_p99 <= stats.fault_max);

        // The uffd is closed: these reads fault no more, and show what was pushed.
        let mut b = vec![0u8; PAGE];
        for i in 0..pages {
            let a = addr + i * P;
            read_mem(a, &mut b);
            let want = if a < lazy_end && i != 10 && i != 200 { content(777, a) } else { vec![0u8; PAGE] };
            assert!(b == want, "page {i}");
        }
        munmap(addr, (pages * P) as usize);
    }

    /// REMAP moves missing pages (looked up at their image address), REMOVE and UNMAP drop them, and a
    /// fault while the push runs is served ahead of it.
    #[test]
    fn remap_remove_and_unmap_events() {
        if in_own_process("remap_remove_and_unmap_events") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (uffd, addr) = registered(64);
        let ranges = one(5, addr..addr + 64 * P);
        let lazy = LazyPages::listen(dir.path()).unwrap();
        let h = lazy.start(ranges, source(5, vec![]));
        let mut criu = FakeRestore::connect(dir.path());
        criu.send_task(5, Some(&uffd));
        drop(uffd);

        // Pages 8..16 move to a new place (it blocks until the daemon read REMAP).
        let dest = mmap_anon(8 * P as usize);
        touching(move || mremap_fixed(addr + 8 * P, 8 * P as usize, dest));
        assert_eq!(page_at(dest + 3 * P), content(5, addr + 11 * P), "moved page served from its image address");
        // Pages 16..24 are MADV_DONTNEED'd: unregistered and dropped, they read as zeros.
        touching(move || madvise_dontneed(addr + 16 * P, 8 * P as usize));
        assert_eq!(page_at(addr + 17 * P), vec![0u8; PAGE]);
        // Pages 24..32 are unmapped.
        touching(move || munmap(addr + 24 * P, 8 * P as usize));
        std::thread::sleep(Duration::from_millis(50));
        let p = h.progress();
        assert_eq!(p.pages_left, 64 - 1 - 8 - 8, "{p:?}");

        criu.finish();
        let stats = done_within(h).expect("done");
        assert_eq!(stats.faults, 1, "{stats:?}");
        assert_eq!(stats.dropped_pages, 16);
        assert_eq!(stats.pushed_pages, 64 - 1 - 16, "{stats:?}");
        let mut b = vec![0u8; PAGE];
        for i in (0..8).chain(32..64) {
            read_mem(addr + i * P, &mut b);
            assert!(b == content(5, addr + i * P), "page {i}");
        }
        for i in 0..8 {
            read_mem(dest + i * P, &mut b);
            assert!(b == content(5, addr + (8 + i) * P), "moved page {i}");
        }
        munmap(addr, 8 * P as usize);
        munmap(addr + 16 * P, 8 * P as usize);
        munmap(addr + 32 * P, 32 * P as usize);
        munmap(dest, 8 * P as usize);
    }

    /// A FORK gives the child a uffd of its own with a copy of the parent's missing pages, looked up
    /// under the parent's image pid.
    #[test]
    fn forked_child_gets_the_parents_missing_pages() {
        if in_own_process("forked_child_gets_the_parents_missing_pages") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (uffd, addr) = registered(16);
        let lazy = LazyPages::listen(dir.path()).unwrap();
        let h = lazy.start(one(9, addr..addr + 16 * P), source(9, vec![]));
        let mut criu = FakeRestore::connect(dir.path());
        criu.send_task(9, Some(&uffd));
        drop(uffd);
        assert_eq!(page_at(addr), content(9, addr));
        let want = content(9, addr + 7 * P);
        let code = touching(move || {
            in_child(move || {
                let mut got = [0u8; PAGE];
                read_mem(addr + 7 * P, &mut got);
                if got[..] == want[..] { 0 } else { 1 }
            })
        });
        assert_eq!(code, 0, "the child read other content than the parent's image page");
        // The child is gone; the parent's pages are still all pushed.
        criu.finish();
        let stats = done_within(h).expect("done");
        assert_eq!(stats.forks, 1, "{stats:?}");
        assert_eq!(stats.processes, 2);
        assert!(stats.faults >= 2, "{stats:?}");
        let mut b = vec![0u8; PAGE];
        for i in 0..16 {
            read_mem(addr + i * P, &mut b);
            assert!(b == content(9, addr + i * P), "page {i}");
        }
        munmap(addr, 16 * P as usize);
    }

    /// Post-copy: a fault on a page the source does not know yet is never zero-filled. The page is
    /// requested once (also when two threads wait for it), the fault waits until it arrives (the
    /// source's waker wakes the daemon) and then reads its content; the wait is in the fault latency.
    #[test]
    fn a_fault_on_a_pending_page_waits_for_it() {
        if in_own_process("a_fault_on_a_pending_page_waits_for_it") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let pid = 21u32;
        let (uffd, addr) = registered(64);
        let pg = move |k: u64| addr + k * P;
        let delay = Duration::from_millis(150);
        let src = LateSource::new(pid, Some(delay));
        src.publish(pg(0), 8, true); // known before the restore
        let (h, mut criu) = restoring(dir.path(), pid, addr..pg(64), src.clone(), uffd);

        // Known pages: answered at once.
        let mut immediate = Vec::new();
        for k in 0..8 {
            let (b, t) = timed_page_at(pg(k));
            assert!(b == content(pid, pg(k)), "page {k}");
            immediate.push(t);
        }
        // Pending pages: requested, and waited for.
        let mut waited = Vec::new();
        for k in [20u64, 30, 40] {
            let (b, t) = timed_page_at(pg(k));
            assert!(b == content(pid, pg(k)), "page {k} is not its content (zero-filled while pending?)");
            assert!(t >= delay, "page {k} read after {t:?}, before it arrived");
            waited.push(t);
        }
        // Two threads on one pending page: one request, both read it.
        let both: Vec<_> = (0..2).map(|_| std::thread::spawn(move || timed_page_at(pg(50)))).collect();
        for t in both {
            let (b, t) = t.join().expect("reader");
            assert!(b == content(pid, pg(50)), "page 50");
            assert!(t >= delay / 2, "page 50 read after {t:?}");
        }
        let asked: Vec<(u32, u64)> = [20u64, 30, 40, 50].iter().map(|&k| (pid, pg(k))).collect();
        assert_eq!(src.requests(), asked, "each pending page requested once, and only those");
        assert!(src.state().pending_lookups >= 4);
        let p = progress_until(&h, |p| p.waited_faults >= 4 && p.faults >= 12);
        assert_eq!((p.pushed_pages, p.zero_pages, p.restored), (0, 0, false), "{p:?}");
        assert_eq!(p.pages_left, 64 - 12, "{p:?}");

        // The source completes: the pages never sent are zero pages, pushed after RSTF.
        src.finish();
        criu.finish();
        let stats = done_within(h).expect("every page in place");
        assert_eq!((stats.fault_pages, stats.pushed_pages, stats.zero_pages), (12, 0, 52), "{stats:?}");
        assert!(stats.waited_faults >= 4 && stats.waited_faults == stats.faults - 8, "{stats:?}");
        assert!(stats.fault_max >= delay, "the wait is not in the fault latency: {stats:?}");
        assert!(stats.fault_p50 < delay, "{stats:?}");
        eprintln!(
            "fault latency seen by the faulting thread: known pages {:?} us, pending pages {:?} us (source \
             delay {delay:?}); daemon stats over {} faults ({} waited): p50 {:?} p99 {:?} max {:?}",
            micros(&immediate),
            micros(&waited),
            stats.faults,
            stats.waited_faults,
            stats.fault_p50,
            stats.fault_p99,
            stats.fault_max
        );
        let mut b = vec![0u8; PAGE];
        for k in 0..64 {
            read_mem(pg(k), &mut b);
            let want = if k < 8 || [20, 30, 40, 50].contains(&k) { content(pid, pg(k)) } else { vec![0u8; PAGE] };
            assert!(b == want, "page {k}");
        }
        munmap(addr, (64 * P) as usize);
    }

    /// The thread that receives a parked fault's page fills it in itself (ParkedFaults::fill): the
    /// source here never publishes the page, so the daemon could not have answered; it accounts for
    /// the fill afterwards (one fault, a waited one, a link fill, latency including the wait).
    #[test]
    fn a_parked_fault_is_filled_by_the_thread_that_receives_its_page() {
        if in_own_process("a_parked_fault_is_filled_by_the_thread_that_receives_its_page") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let pid = 23u32;
        let (uffd, addr) = registered(16);
        let pg = move |k: u64| addr + k * P;
        let delay = Duration::from_millis(100);
        let src = LateSource::new(pid, Some(delay));
        src.link_only.store(true, Ordering::SeqCst);
        let (h, mut criu) = restoring(dir.path(), pid, addr..pg(16), src.clone(), uffd);

        let (b, t) = timed_page_at(pg(5));
        assert!(b == content(pid, pg(5)), "page 5 is not its content");
        assert!(t >= delay, "read after {t:?}, before the page arrived");
        // The reader may run before the filling thread counted its fill.
        let filled = |n: u64| until(|| src.link_filled.load(Ordering::SeqCst) == n);
        assert!(filled(1), "not filled by the receiving thread: {}", src.link_filled.load(Ordering::SeqCst));
        assert_eq!(src.requests(), vec![(pid, pg(5))]);
        let p = progress_until(&h, |p| p.faults == 1);
        assert_eq!((p.waited_faults, p.pages_left), (1, 15), "{p:?}");

        // Two threads on one page: one fill answers both.
        let both: Vec<_> = (0..2).map(|_| std::thread::spawn(move || timed_page_at(pg(9)))).collect();
        for t in both {
            let (b, _) = t.join().expect("reader");
            assert!(b == content(pid, pg(9)), "page 9");
        }
        assert!(filled(3), "{} fills", src.link_filled.load(Ordering::SeqCst));
        src.publish(pg(5), 1, true);
        src.publish(pg(9), 1, true);
        src.finish();
        criu.finish();
        let stats = done_within(h).expect("every page in place");
        assert_eq!((stats.faults, stats.waited_faults, stats.link_fills), (3, 3, 3), "{stats:?}");
        assert_eq!((stats.fault_pages, stats.zero_pages), (2, 14), "{stats:?}");
        assert!(stats.fault_max >= delay, "the wait is not in the fault latency: {stats:?}");
        munmap(addr, (16 * P) as usize);
    }

    /// A parked fault's range is replaced by an mremap before its page arrives: the receiving thread
    /// must not fill the old page into the memory moved there (the daemon forgot that waiter when it
    /// read the events: UNMAP of the destination, REMAP); the moved memory gets its own page, and the
    /// parked thread reads that. Checked: without the forgetting, this fails.
    #[test]
    fn a_parked_fault_under_a_moved_range_is_not_filled_with_the_old_page() {
        if in_own_process("a_parked_fault_under_a_moved_range_is_not_filled_with_the_old_page") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let pid = 24u32;
        let (uffd, addr) = registered(64);
        let pg = move |k: u64| addr + k * P;
        let delay = Duration::from_millis(300);
        let src = LateSource::new(pid, Some(delay));
        src.link_only.store(true, Ordering::SeqCst);
        let (h, mut criu) = restoring(dir.path(), pid, addr..pg(64), src.clone(), uffd);
        criu.finish();

        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut b = vec![0u8; PAGE];
            read_mem(pg(10), &mut b);
            let _ = tx.send(b);
        });
        assert!(until(|| src.requests() == vec![(pid, pg(10))]), "page 10 requested: {:?}", src.requests());
        // Pages 32..36 move onto 8..12 while the fault on page 10 is parked (blocks until REMAP is read).
        touching(move || mremap_fixed(pg(32), 4 * P as usize, pg(8)));
        // The request's answer comes (300 ms after it) while nothing but the receiving thread could fill
        // page 10: the page moved there is not published yet.
        std::thread::sleep(delay + Duration::from_millis(100));
        assert_eq!(src.link_filled.load(Ordering::SeqCst), 0, "the old page was filled into moved memory");
        src.publish(pg(34), 1, true);
        src.finish();
        let b = rx.recv_timeout(Duration::from_secs(10)).expect("the parked reader was never woken");
        assert!(b == content(pid, pg(34)), "the parked reader did not read the page moved there");
        let stats = done_within(h).expect("every page in place");
        assert_eq!(stats.link_fills, 0, "{stats:?}");
        let mut m = vec![0u8; PAGE];
        read_mem(pg(10), &mut m);
        assert!(m == content(pid, pg(34)), "page 10 after the move");
        munmap(addr, (64 * P) as usize);
    }

    /// Post-copy push: arrivals are kept until RSTF, then pushed while the source is not complete (only
    /// pages in place: moved ones wait), known zero pages with ZEROPAGE; with nothing arrived the daemon
    /// sleeps (no busy loop) and is not done; once the source is complete the rest is pushed (zeros for
    /// what it never sent) and `wait_done` returns.
    #[test]
    fn arrivals_are_pushed_before_completion_and_the_rest_after() {
        if in_own_process("arrivals_are_pushed_before_completion_and_the_rest_after") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let pid = 31u32;
        let pages = 128u64;
        let (uffd, addr) = registered(pages);
        let pg = move |k: u64| addr + k * P;
        let src = LateSource::new(pid, None);
        src.publish(pg(0), 16, true); // before the daemon starts
        let (h, mut criu) = restoring(dir.path(), pid, addr..pg(pages), src.clone(), uffd);
        src.publish(pg(16), 8, true); // before RSTF
        // Pages 100..108 move: their run-time address is no longer their image address.
        let dest = mmap_anon(8 * P as usize);
        touching(move || mremap_fixed(pg(100), 8 * P as usize, dest));
        std::thread::sleep(Duration::from_millis(100));
        let p = h.progress();
        assert_eq!((p.pushed_pages, p.zero_pages, p.restored), (0, 0, false), "pushed before RSTF: {p:?}");

        criu.finish();
        h.wait_restored(Duration::from_secs(5)).expect("RSTF");
        let p = progress_until(&h, |p| p.pushed_pages >= 24);
        assert_eq!((p.pushed_pages, p.pages_left), (24, pages - 24), "the arrivals kept until RSTF: {p:?}");
        // More arrive while the tree runs: data in runs of 4, known zero pages, the moved pages.
        let publisher = {
            let src = src.clone();
            std::thread::spawn(move || {
                for k in (24..40).step_by(4) {
                    src.publish(pg(k), 4, true);
                    std::thread::sleep(Duration::from_millis(20));
                }
                src.publish(pg(40), 8, false);
                src.publish(pg(100), 8, true);
            })
        };
        publisher.join().expect("publisher");
        progress_until(&h, |p| p.pushed_pages >= 40 && p.zero_pages >= 8);

        // Nothing else arrives: the daemon idles in poll and is not done.
        let done = {
            let h = h.clone();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(done_within(h));
            });
            rx
        };
        let cpu = daemon_cpu_ticks();
        assert!(done.recv_timeout(Duration::from_millis(500)).is_err(), "done before the source was complete");
        let cpu = daemon_cpu_ticks().saturating_sub(cpu);
        assert!(cpu <= 10, "the idle daemon used {cpu} clock ticks in 0.5 s: a busy loop");
        let p = h.progress();
        assert_eq!((p.faults, p.pushed_pages, p.zero_pages), (0, 40, 8), "{p:?}");
        assert_eq!(p.pages_left, pages - 48, "the moved pages are not pushed before completion: {p:?}");
        let pushed = touching(move || {
            let mut b = vec![0u8; PAGE];
            (0..48).all(|k| {
                read_mem(pg(k), &mut b);
                b == if k < 40 { content(pid, pg(k)) } else { vec![0u8; PAGE] }
            })
        });
        assert!(pushed, "a pushed page has other content than its arrival");
        assert_eq!(h.progress().faults, 0, "reading pushed pages faulted");

        src.finish();
        let stats =
            done.recv_timeout(Duration::from_secs(25)).expect("wait_done returns").expect("every page in place");
        assert_eq!((stats.faults, stats.waited_faults, stats.dropped_pages), (0, 0, 0), "{stats:?}");
        assert_eq!(stats.pushed_pages, 48, "{stats:?}");
        assert_eq!(stats.zero_pages, 8 + (100 - 48) + (pages - 108), "{stats:?}");
        // Every page copied into the only process is released; zero pages have nothing to release.
        let released = src.state().released.clone();
        let copied: HashSet<u64> = (0..40).chain(100..108).map(pg).collect();
        assert_eq!(released, copied, "released pages differ from the copied ones");
        let mut b = vec![0u8; PAGE];
        for k in (0..100).chain(108..pages) {
            read_mem(pg(k), &mut b);
            assert!(b == if k < 40 { content(pid, pg(k)) } else { vec![0u8; PAGE] }, "page {k}");
        }
        for k in 0..8 {
            read_mem(dest + k * P, &mut b);
            assert!(b == content(pid, pg(100 + k)), "moved page {k}");
        }
        munmap(addr, (100 * P) as usize);
        munmap(pg(108), ((pages - 108) * P) as usize);
        munmap(dest, 8 * P as usize);
    }

    /// The source's bulk stream sends every page, also those a fault took first: the store then holds
    /// such a page again, and the daemon releases it as it arrives (no process misses it), instead of
    /// leaving it in the store until the end.
    #[test]
    fn a_page_a_fault_took_is_released_when_it_comes_again() {
        if in_own_process("a_page_a_fault_took_is_released_when_it_comes_again") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let pid = 12u32;
        let (uffd, addr) = registered(8);
        let pg = move |k: u64| addr + k * P;
        let src = LateSource::new(pid, Some(Duration::from_millis(20)));
        let (h, mut criu) = restoring(dir.path(), pid, addr..pg(8), src.clone(), uffd);
        criu.finish();
        h.wait_restored(Duration::from_secs(5)).expect("RSTF");
        let releases = |k: u64| src.state().releases.get(&pg(k)).copied().unwrap_or(0);
        for k in [3, 6] {
            assert_eq!(page_at(pg(k)), content(pid, pg(k)), "the fault's page {k}");
            // The daemon accounts for a fault the receiving thread filled after the reader woke up.
            until(|| releases(k) == 1);
            assert_eq!(releases(k), 1, "copied into the only process on the fault: released");
        }
        // The bulk stream brings page 3 again, alone: nothing to push, released.
        src.publish(pg(3), 1, true);
        until(|| releases(3) == 2);
        assert_eq!(releases(3), 2, "page 3 kept after it came again");
        // Then pages 5..8, page 6 again: 5 and 7 are pushed (and released), 6 released.
        src.publish(pg(5), 3, true);
        progress_until(&h, |p| p.pushed_pages >= 2);
        assert_eq!((releases(5), releases(6), releases(7)), (1, 2, 1), "page 6 kept after it came again");
        src.finish();
        let stats = done_within(h).expect("every page in place");
        assert_eq!((stats.faults, stats.pushed_pages), (2, 2), "{stats:?}");
        for k in [3, 5, 6, 7] {
            assert_eq!(page_at(pg(k)), content(pid, pg(k)), "page {k}");
        }
        munmap(addr, (8 * P) as usize);
    }

    /// Once the source is complete the push sweeps the missing pages in address order, in batches that
    /// do not cross a PUSH_BATCH_PAGES boundary, and a fault does not move it: the pages it places then
    /// free the store's memory granule by granule for the next ones (see the module doc).
    #[test]
    fn the_complete_push_sweeps_in_address_order_whatever_the_faults() {
        if in_own_process("the_complete_push_sweeps_in_address_order_whatever_the_faults") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let pid = 13u32;
        let pages = 512u64;
        let (uffd, addr) = registered(pages);
        let pg = move |k: u64| addr + k * P;
        let src = LateSource::new(pid, None);
        // 3 pages in: the sweep's first batch ends at the next 16-page boundary of the image address.
        let lazy = pg(3)..pg(pages);
        src.publish(lazy.start, (pages - 3) as u32, true);
        src.finish();
        let (h, mut criu) = restoring(dir.path(), pid, lazy.clone(), src.clone(), uffd);
        // Faults before RSTF, high to low: nothing is pushed yet, so each would have been the push's start.
        let faulted = [pg(400), pg(200), pg(450)];
        for &a in &faulted {
            assert_eq!(page_at(a), content(pid, a));
        }
        criu.finish();
        let stats = done_within(h).expect("every page in place");
        assert_eq!((stats.faults, stats.pushed_pages), (3, pages - 3 - 3), "{stats:?}");
        let pushed: Vec<(u64, u64)> =
            src.state().release_calls.iter().copied().filter(|&(a, n)| !(n == 1 && faulted.contains(&a))).collect();
        assert!(pushed.windows(2).all(|w| w[0].0 < w[1].0), "the push went back: {pushed:x?}");
        let first = PUSH_BATCH_PAGES - (pg(3) / P) % PUSH_BATCH_PAGES;
        assert_eq!(pushed.first(), Some(&(pg(3), first)), "the first batch ends at the boundary: {pushed:x?}");
        let batch = PUSH_BATCH_PAGES * P;
        for &(a, n) in &pushed {
            assert!(a / batch == (a + n * P - 1) / batch, "a batch crosses a boundary: {a:#x} +{n}");
        }
        for k in 3..pages {
            assert_eq!(page_at(pg(k)), content(pid, pg(k)), "page {k}");
        }
        munmap(addr, (pages * P) as usize);
    }

    /// Post-copy and fork: a child faulting on a page the source does not know yet waits for it under its
    /// parent's image pid and reads its content; the parent gets every page too.
    #[test]
    fn a_forked_child_waiting_for_a_pending_page_gets_it() {
        if in_own_process("a_forked_child_waiting_for_a_pending_page_gets_it") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let pid = 9u32;
        let (uffd, addr) = registered(16);
        let pg = move |k: u64| addr + k * P;
        let delay = Duration::from_millis(200);
        let src = LateSource::new(pid, Some(delay));
        src.publish(pg(0), 1, true);
        let (h, mut criu) = restoring(dir.path(), pid, addr..pg(16), src.clone(), uffd);
        assert_eq!(page_at(pg(0)), content(pid, pg(0)));
        let want = content(pid, pg(7));
        let t = Instant::now();
        let code = touching(move || {
            in_child(move || {
                let mut got = [0u8; PAGE];
                read_mem(pg(7), &mut got);
                if got[..] == want[..] { 0 } else { 1 }
            })
        });
        let took = t.elapsed();
        assert_eq!(code, 0, "the child read other content than the page that arrived (zero-filled?)");
        assert!(took >= delay, "the child was done after {took:?}, before its page arrived");
        assert_eq!(src.requests(), vec![(pid, pg(7))]);
        let p = progress_until(&h, |p| p.waited_faults >= 1);
        assert_eq!((p.faults, p.waited_faults, p.zero_pages, p.pushed_pages), (2, 1, 0, 0), "{p:?}");

        // The rest arrives, the source completes: every page of the parent is pushed.
        src.publish(pg(1), 6, true);
        src.publish(pg(8), 8, true);
        src.finish();
        criu.finish();
        let stats = done_within(h).expect("done");
        assert_eq!((stats.forks, stats.processes, stats.waited_faults, stats.zero_pages), (1, 2, 1, 0), "{stats:?}");
        // Page 0 went into the parent alone and was released. Page 7 went into the child while both
        // lived: had it been released then, this source would say Pending for it forever, the parent
        // could never get it and done_within above would have failed; the parent has every page below.
        assert!(src.state().released.contains(&pg(0)), "a page copied into the only process was not released");
        let mut b = vec![0u8; PAGE];
        for k in 0..16 {
            read_mem(pg(k), &mut b);
            assert!(b == content(pid, pg(k)), "page {k}");
        }
        munmap(addr, 16 * P as usize);
    }

    /// Lazy ranges merge adjacent VMAs; a push batch across the end of one fails with ENOENT and goes on
    /// page by page until past it.
    #[test]
    fn a_push_batch_across_two_vmas_goes_page_by_page() {
        if in_own_process("a_push_batch_across_two_vmas_goes_page_by_page") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (uffd, addr) = registered(96);
        mprotect_read_only(addr + 40 * P, 56 * P as usize);
        let lazy = LazyPages::listen(dir.path()).unwrap();
        let h = lazy.start(one(3, addr..addr + 96 * P), source(3, vec![]));
        let mut criu = FakeRestore::connect(dir.path());
        criu.send_task(3, Some(&uffd));
        drop(uffd);
        criu.finish();
        let stats = done_within(h).expect("done");
        assert_eq!((stats.pushed_pages, stats.dropped_pages), (96, 0), "{stats:?}");
        let mut b = vec![0u8; PAGE];
        for i in 0..96 {
            read_mem(addr + i * P, &mut b);
            assert!(b == content(3, addr + i * P), "page {i}");
        }
        munmap(addr, 96 * P as usize);
    }

    /// EOF before RSTF is a failed restore; a zombie (-pid) sends no fd; a restore of only zombies is
    /// done at RSTF.
    #[test]
    fn eof_before_rstf_fails_and_zombies_send_no_fd() {
        let dir = tempfile::tempdir().unwrap();
        let h = LazyPages::listen(dir.path()).unwrap().start(one(1, 0x1000..0x2000), source(1, vec![]));
        let mut criu = FakeRestore::connect(dir.path());
        criu.send_task(-1, None);
        drop(criu);
        match h.wait_restored(Duration::from_secs(5)) {
            Err(LazyError::RestoreFailed { processes: 0 }) => {}
            r => panic!("expected RestoreFailed, got {r:?}"),
        }
        assert!(matches!(h.wait_done(), Err(LazyError::RestoreFailed { .. })));

        let h = LazyPages::listen(dir.path()).unwrap().start(one(1, 0x1000..0x2000), source(1, vec![]));
        let mut criu = FakeRestore::connect(dir.path());
        criu.send_task(-1, None);
        criu.finish();
        h.wait_restored(Duration::from_secs(5)).unwrap();
        let stats = done_within(h).unwrap();
        assert_eq!((stats.processes, stats.faults, stats.pushed_pages), (0, 0, 0));
    }

    #[test]
    fn no_connection_times_out_and_cancel_ends_it() {
        let dir = tempfile::tempdir().unwrap();
        let h = LazyPages::listen(dir.path()).unwrap().start(vec![], source(1, vec![]));
        let e = h.wait_restored(Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, LazyError::NotConnected { .. }), "{e}");
        assert!(e.to_string().contains("--lazy-pages"), "{e}");
        h.cancel();
        assert!(matches!(h.wait_done(), Err(LazyError::Cancelled)));
        assert!(!dir.path().join(SOCKET_NAME).exists(), "socket left behind");
    }

    #[test]
    fn garbage_on_the_socket_is_a_protocol_error() {
        let dir = tempfile::tempdir().unwrap();
        let h = LazyPages::listen(dir.path()).unwrap().start(vec![], source(1, vec![]));
        let mut criu = FakeRestore::connect(dir.path());
        criu.0.write_all(&0i32.to_ne_bytes()).unwrap();
        let e = h.wait_restored(Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, LazyError::Protocol { .. }), "{e}");
    }

    #[test]
    fn bind_error_names_the_fix() {
        let e = LazyPages::listen(Path::new("/nonexistent/dir")).err().expect("bind fails");
        assert!(e.to_string().contains("must exist"), "{e}");
    }

    /// Offsets in pages-N.img: the sum of the PE_PRESENT entries before (§1.6); parent layers for
    /// PE_PARENT; images of a lazy dump are refused.
    #[test]
    fn image_page_source_reads_pages_by_offset() {
        use criu::images::{Pagemap, PagemapEntry, encode_pagemap};
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let parent = d.join("p0");
        std::fs::create_dir(&parent).unwrap();
        std::os::unix::fs::symlink("p0", d.join("parent")).unwrap();
        let e = |vaddr, nr_pages, flags| PagemapEntry { vaddr, nr_pages, flags };
        // Child: 2 present pages at 0x10000, 1 parent page at 0x20000, 3 lazy+present at 0x30000.
        let pm = Pagemap {
            pages_id: 3,
            entries: vec![e(0x10000, 2, PE_PRESENT), e(0x20000, 1, PE_PARENT), e(0x30000, 3, PE_LAZY | PE_PRESENT)],
        };
        std::fs::write(d.join("pagemap-42.img"), encode_pagemap(&pm)).unwrap();
        let data: Vec<u8> =
            [0x10000u64, 0x11000, 0x30000, 0x31000, 0x32000].iter().flat_map(|&v| content(42, v)).collect();
        std::fs::write(d.join("pages-3.img"), &data).unwrap();
        let ppm = Pagemap { pages_id: 1, entries: vec![e(0x1f000, 2, PE_PRESENT)] };
        std::fs::write(parent.join("pagemap-42.img"), encode_pagemap(&ppm)).unwrap();
        let pdata: Vec<u8> = [0x1f000u64, 0x20000].iter().flat_map(|&v| content(42, v)).collect();
        std::fs::write(parent.join("pages-1.img"), &pdata).unwrap();

        let src = ImagePageSource::open(d).unwrap();
        let mut b = vec![0u8; PAGE];
        for v in [0x10000u64, 0x11000, 0x20000, 0x30000, 0x31000, 0x32000] {
            assert!(src.read_page(42, v, &mut b), "{v:#x}");
            assert!(b == content(42, v), "{v:#x}");
        }
        for v in [0x12000u64, 0x1f000, 0x33000, 0x0] {
            assert!(!src.read_page(42, v, &mut b), "{v:#x} is not in the child's pagemap");
        }
        assert!(!src.read_page(43, 0x10000, &mut b));

        let lazy_only = Pagemap { pages_id: 3, entries: vec![e(0x10000, 2, PE_LAZY)] };
        std::fs::write(d.join("pagemap-42.img"), encode_pagemap(&lazy_only)).unwrap();
        let err = ImagePageSource::open(d).err().expect("lazy-only images refused");
        assert!(matches!(err, LazyError::LazyWithoutData { pid: 42, vaddr: 0x10000, .. }), "{err}");
        std::fs::write(d.join("pagemap-42.img"), encode_pagemap(&pm)).unwrap();
        std::fs::write(d.join("pages-3.img"), &data[..PAGE]).unwrap();
        assert!(matches!(ImagePageSource::open(d), Err(LazyError::ShortPages { .. })));
    }
}
