//! Test workloads that can prove their state survived a migration. Each answers on the abstract unix
//! socket `migrate-workload-NAME` (per network namespace, so per testbed host) with one JSON line.
//!
//!   workload mem  --name N --mib M [--seed S] [--compressible] [--dirty-pct P [--writers T]] [--fork-every-ms T]
//!                 [--lock] [--protected-mib P] [--aligned-stack] [--hold-open PATH] --pidfile F
//!       M MiB of known content (splitmix64 of S; with --compressible, mostly zeros with one random word
//!       per 64 bytes) and a counter bumped every millisecond by a thread. With --dirty-pct, T threads
//!       (default 1) together rewrite P percent of the pages per second, as a busy program would, in a
//!       way that can be checked: writer t owns the pages p with p % T == t, and its step k rewrites a
//!       whole page of its own chosen from (S, t, k) with content derived from (S, t, k) (in the same
//!       style as the fill), then publishes k. So the step counters alone say what every page must hold.
//!       Answers {kind, pid, counter, stalls, checksum, expected, mib, verified}: checksum is the xxh3 of
//!       the memory now, expected the one of the content it was filled with; stalls the 16 longest
//!       times the counter's thread did not tick for over 5 ms, longest first, as [ended at (Unix ms),
//!       length (ms)], by CLOCK_REALTIME (a migration's freeze is the longest of them). A dirtying
//!       workload also answers {steps: [k per writer], writes, mismatched_pages, first_mismatch,
//!       pause_ms, verify_ms}: it stops every writer at a step boundary, replays their sequences up to
//!       their counters, compares every page word for word with what they say (verified: no page
//!       differs; first_mismatch: the lowest page that does, or null), takes the checksum, and lets the
//!       writers go on; pause_ms is how long they were stopped, verify_ms the part of it until the
//!       comparison was done.
//!       With --fork-every-ms T, a thread forks a child every T ms (writers paused for the fork) that
//!       checks its copy of the memory the same way and exits 0 or 1; answers count forks_ok and
//!       forks_failed. With --lock, the memory is locked (mlock(2)) once filled: CRIU leaves locked
//!       memory out of a lazy dump's lazy ranges and writes it into the images. With --protected-mib,
//!       P MiB more of known content (seed S + 1) are made PROT_NONE once filled, as a program protects
//!       memory it wrote (CRIU dumps it, lazily too, but the process itself cannot read it); each
//!       answer makes it readable for the check and protects it again: {protected_verified}.
//!       With --aligned-stack (x86_64), a thread waits in pause(2) for ever with its stack pointer on a
//!       page boundary, as any thread's may be by chance when a migration freezes it (CRIU 4.2.1 as
//!       released then left no memory lazy: deploy/criu-patches/0001); answers {aligned_stack: that
//!       stack pointer, "0x..."}, and /proc/PID/task/*/syscall shows it.
//!   workload tree --name N --pidfile F
//!       A parent with two children: a writer sends a counter into a pipe every 5 ms, a reader reads it.
//!       The reader answers {kind, pid, parent, writer, last, reads}.
//!   workload hold --name N [--flock P] [--open P] [--unix-bind-relative DIR/NAME] [--unix-connect P]
//!                 [--sysv-shm] [--udp-cork] [--o-direct-pipe] [--tcp-established] [--raw-socket] --pidfile F
//!       Holds the resources named (each one something a migration must refuse) and a counter.
//!       Answers {kind, pid, counter}.
//!   workload listen --path P --pidfile F
//!       A unix stream server at P that accepts and keeps every connection (an external peer).
//!   workload trace --pid P --pidfile F
//!       Attaches to P with ptrace (PTRACE_SEIZE) and stays attached (a debugger).
//!   workload echo-server --path P --name N [--push-unread TEXT] --pidfile F
//!       A unix stream server at P (a stale file there is removed first) that serves any number of
//!       connections, a thread each: for every line it reads it answers `HOST echo LINE\n`, HOST being
//!       $TESTBED_HOST when it started ("?" if unset). With --push-unread, it first writes TEXT (no
//!       newline added) to every connection it accepts. Answers {kind, pid, host, connections (accepted
//!       so far), lines (read so far), last_line (or null)}.
//!   workload client --connect P --name N [--every-ms T] [--read-when FILE] --pidfile F
//!       Connects a unix stream socket to P once (retrying for up to 5 s), then sends `N seq K\n` every
//!       T ms (default 100; K = 1, 2, …) and reads the answers, one thread polling both; it reads
//!       before the first send, so what a peer pushed at once comes alone. With --read-when, it neither
//!       reads nor sends until FILE exists (checked every 20 ms, looked up anew each time: after a
//!       migration, on the new host). At EOF or an error it stops both and records it, and keeps
//!       answering. Answers {kind, pid, reading (started), sent (lines written whole), answers (lines
//!       read), last_answer, last_host (its first word), first_read (the result of its first read()
//!       with bytes, up to 256 of them, lossy; "" if that was EOF; null before), eof, error}.
//!   workload logger --dgram P --name N [--every-ms T] --pidfile F
//!       A unix datagram socket connect()ed to P (retrying for up to 5 s) sends `N log K` every T ms
//!       (default 50; K = 1, 2, … per attempt), never blocking; a failed send (ECONNREFUSED once the
//!       peer is gone, then ENOTCONN: it does not reconnect) is counted and the next one tried.
//!       Answers {kind, pid, seq (last K tried), sent, errors, last_error}.
//!   workload log-daemon --path P --name N --pidfile F
//!       A unix datagram socket bound at P (a stale file there is removed first) that receives
//!       datagrams. Answers {kind, pid, host ($TESTBED_HOST when it started), received, last (or null),
//!       max_seq: {NAME: largest K of a `NAME log K` received}} (up to 1024 names).
//!   workload pty-client --name N --pidfile F -- CMD ARGS...
//!       Opens a pty pair (80x24) and runs CMD in a new session with the slave as its controlling
//!       terminal and stdin/out/err (TERM=xterm unless set), as a user at a terminal would (e.g.
//!       `tmux attach`), and keeps reading the master so CMD never blocks on output, keeping the last
//!       4 KiB. Answers {kind, pid, child, child_alive, exit (its wait status once gone, else null),
//!       tail (the last 4 KiB, lossy)}.
//!   workload query --name N
//!       Prints the answer of the workload NAME in this network namespace.
//!
//! The pidfile (root pid) is written once the workload is ready. SIGPIPE is ignored: a peer going away
//! is an error to record, never the end of a workload.

use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn socket_addr(name: &str) -> SocketAddr {
    SocketAddr::from_abstract_name(format!("migrate-workload-{name}").as_bytes()).expect("abstract name")
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e3779b97f4a7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    x ^ (x >> 31)
}

/// Words per 4 KiB page.
const PAGE_WORDS: usize = 512;

/// Word `i` of the initial content.
fn fill_word(seed: u64, i: u64, compressible: bool) -> u64 {
    if compressible && !i.is_multiple_of(8) { 0 } else { splitmix(seed ^ i) }
}

fn fill(mib: usize, seed: u64, compressible: bool) -> Vec<u64> {
    let words = mib << 17; // 1 MiB = 131072 u64
    (0..words as u64).map(|i| fill_word(seed, i, compressible)).collect()
}

/// What the dirtying writers do, as pure functions of the seed, so that their step counters alone say
/// what every page must hold. Writer t of T owns the pages p with p % T == t.
#[derive(Clone, Copy)]
struct Dirtying {
    seed: u64,
    writers: usize,
    pages: usize,
    compressible: bool,
}

impl Dirtying {
    /// The key of step k of writer t: the page it picks and the words it writes derive from it.
    fn key(&self, t: usize, k: u64) -> u64 {
        splitmix(splitmix(splitmix(self.seed ^ 0x6469_7274_7969_6e67) ^ t as u64) ^ k)
    }

    /// The page that step k of writer t rewrites, and the step's key.
    fn step(&self, t: usize, k: u64) -> (usize, u64) {
        let key = self.key(t, k);
        let owned = (self.pages - t).div_ceil(self.writers); // pages p < pages with p % writers == t
        (t + (splitmix(key) % owned as u64) as usize * self.writers, key)
    }

    /// Word `i` (0..512) of a page written by the step with this key, in the style of the fill.
    fn word(&self, key: u64, i: usize) -> u64 {
        if self.compressible && !i.is_multiple_of(8) { 0 } else { splitmix(key ^ i as u64) }
    }

    /// Performs step k of writer t: rewrites its page whole, through volatile writes.
    ///
    /// # Safety
    /// `base` must point to `pages * 512` writable u64s, and nothing may access the page that step
    /// picks meanwhile (only writer t writes its pages, and readers wait until the writers are parked).
    unsafe fn write_step(&self, base: *mut u64, t: usize, k: u64) {
        let (page, key) = self.step(t, k);
        for i in 0..PAGE_WORDS {
            // SAFETY: page < pages, so the word is inside the buffer; the caller guarantees exclusivity.
            unsafe { base.add(page * PAGE_WORDS + i).write_volatile(self.word(key, i)) };
        }
    }

    /// For each page, the step of its writer that wrote it last (0: none, it holds the initial
    /// content), replaying every writer's sequence up to `steps[t]`.
    fn replay(&self, steps: &[u64]) -> Vec<u64> {
        let mut last = vec![0u64; self.pages];
        for (t, &n) in steps.iter().enumerate() {
            for k in 1..=n {
                last[self.step(t, k).0] = k;
            }
        }
        last
    }
}

/// What comparing the memory with what the step counters say found.
#[derive(Debug, PartialEq, Eq)]
struct Verdict {
    mismatched_pages: usize,
    first_mismatch: Option<usize>,
}

/// Compares `mem` word for word with the initial fill of `seed` overwritten by steps `1..=steps[t]` of
/// every writer t (so `steps.len()` writers), on all available cores.
fn verify(mem: &[u64], seed: u64, compressible: bool, steps: &[u64]) -> Verdict {
    let pages = mem.len() / PAGE_WORDS;
    let d = Dirtying { seed, writers: steps.len().max(1), pages, compressible };
    let last = if steps.is_empty() { vec![0; pages] } else { d.replay(steps) };
    // One page's verdict: does it hold what its last step (or the fill) put there?
    let page_ok = |p: usize, words: &[u64]| match last[p] {
        0 => {
            let first = (p * PAGE_WORDS) as u64;
            words.iter().zip(first..).all(|(&w, i)| w == fill_word(seed, i, compressible))
        }
        k => {
            let key = d.step(p % d.writers, k).1;
            words.iter().enumerate().all(|(i, &w)| w == d.word(key, i))
        }
    };
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(pages.max(1));
    let chunk = pages.div_ceil(threads).max(1);
    let parts: Vec<Verdict> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..pages)
            .step_by(chunk)
            .map(|from| {
                let page_ok = &page_ok;
                s.spawn(move || {
                    let mut v = Verdict { mismatched_pages: 0, first_mismatch: None };
                    for p in from..(from + chunk).min(pages) {
                        if !page_ok(p, &mem[p * PAGE_WORDS..(p + 1) * PAGE_WORDS]) {
                            v.mismatched_pages += 1;
                            v.first_mismatch.get_or_insert(p);
                        }
                    }
                    v
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("verify thread")).collect()
    });
    Verdict {
        mismatched_pages: parts.iter().map(|v| v.mismatched_pages).sum(),
        first_mismatch: parts.iter().find_map(|v| v.first_mismatch),
    }
}

/// Stops the writers at step boundaries for the answering thread, and lets them go on.
struct Pause {
    /// (a pause is requested, how many writers are parked)
    state: Mutex<(bool, usize)>,
    changed: Condvar,
    /// The request, for writers to check between steps without locking.
    requested: AtomicBool,
}

impl Pause {
    fn new() -> Self {
        Pause { state: Mutex::new((false, 0)), changed: Condvar::new(), requested: AtomicBool::new(false) }
    }

    fn lock(&self) -> MutexGuard<'_, (bool, usize)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A writer at a step boundary: parks while a pause is requested.
    fn checkpoint(&self) {
        if self.requested.load(Ordering::Acquire) {
            drop(self.park(self.lock()));
        }
    }

    fn park<'a>(&self, mut s: MutexGuard<'a, (bool, usize)>) -> MutexGuard<'a, (bool, usize)> {
        if s.0 {
            s.1 += 1;
            self.changed.notify_all();
            while s.0 {
                s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            s.1 -= 1;
        }
        s
    }

    /// A writer between ticks (a step boundary): sleeps until `deadline`, parking if asked meanwhile.
    fn sleep_until(&self, deadline: Instant) {
        let mut s = self.lock();
        loop {
            s = self.park(s);
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            s = self.changed.wait_timeout(s, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Asks every writer to stop at its next step boundary and waits until all `writers` have.
    fn stop(&self, writers: usize) {
        let mut s = self.lock();
        s.0 = true;
        self.requested.store(true, Ordering::Release);
        while s.1 < writers {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn resume(&self) {
        let mut s = self.lock();
        s.0 = false;
        self.requested.store(false, Ordering::Release);
        self.changed.notify_all();
    }
}

/// The memory of `workload mem`, leaked so that it lives as long as the process and only ever reached
/// through this pointer: the writers write the pages of their own partitions, the answering thread
/// reads it only while no writer runs.
#[derive(Clone, Copy)]
struct Memory {
    base: *mut u64,
    words: usize,
}

// SAFETY: a plain pointer to leaked memory; who may touch what when is the Pause protocol's business.
unsafe impl Send for Memory {}
// SAFETY: as above.
unsafe impl Sync for Memory {}

impl Memory {
    /// (A method, so that closures capture the whole Memory, which is Send, not its pointer field.)
    fn base(&self) -> *mut u64 {
        self.base
    }
}

fn checksum(mem: &[u64]) -> u64 {
    // SAFETY: reinterpreting initialised u64s as bytes; u8 has no alignment or validity requirements.
    let bytes = unsafe { std::slice::from_raw_parts(mem.as_ptr() as *const u8, std::mem::size_of_val(mem)) };
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// A counter bumped every millisecond by its own thread, which also notes when it was held up: every
/// gap between two of its ticks longer than [`Counter::STALL`], by the wall clock (CLOCK_REALTIME, which
/// a restored task's new time namespace leaves alone), so that a migration's freeze shows as the time
/// the program itself did not run.
struct Counter {
    value: AtomicU64,
    /// The [`Counter::KEPT`] longest stalls so far, longest first: (its length, µs; when it ended, Unix µs).
    stalls: std::sync::Mutex<Vec<(u64, u64)>>,
}

impl Counter {
    const STALL: Duration = Duration::from_millis(5);
    const KEPT: usize = 16;

    fn value(&self) -> u64 {
        self.value.load(Ordering::SeqCst)
    }

    /// `[ended at (Unix ms), length (ms)]` for each stall kept, longest first.
    fn stalls(&self) -> serde_json::Value {
        let stalls = self.stalls.lock().expect("stalls");
        stalls.iter().map(|&(len, end)| serde_json::json!([end as f64 / 1e3, len as f64 / 1e3])).collect()
    }

    fn note_stall(&self, len: u64, end: u64) {
        let mut stalls = self.stalls.lock().expect("stalls");
        let at = stalls.partition_point(|&(l, _)| l >= len);
        if at < Self::KEPT {
            stalls.insert(at, (len, end));
            stalls.truncate(Self::KEPT);
        }
    }
}

fn unix_micros() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

fn start_counter() -> Arc<Counter> {
    let counter = Arc::new(Counter { value: AtomicU64::new(0), stalls: Default::default() });
    let c = counter.clone();
    std::thread::spawn(move || {
        let mut last = unix_micros();
        loop {
            c.value.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(1));
            let now = unix_micros();
            let gap = now.saturating_sub(last);
            if gap > Counter::STALL.as_micros() as u64 {
                c.note_stall(gap, now);
            }
            last = now;
        }
    });
    counter
}

fn write_pidfile(path: &str, pid: u32) {
    let tmp = format!("{path}.tmp");
    std::fs::write(&tmp, format!("{pid}\n")).expect("write pidfile");
    std::fs::rename(&tmp, path).expect("rename pidfile");
}

fn serve(listener: UnixListener, answer: impl Fn() -> serde_json::Value) -> ! {
    loop {
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.write_all(format!("{}\n", answer()).as_bytes());
        }
    }
}

/// Memory of known content kept PROT_NONE (`workload mem --protected-mib`).
struct Protected {
    base: usize,
    words: usize,
    expected: u64,
}

impl Protected {
    fn new(mib: usize, seed: u64) -> Protected {
        let len = mib << 20;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: a new private anonymous mapping of the kernel's choice, owned by the value made here.
        let base =
            unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        assert_ne!(base, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        let words = len / 8;
        // SAFETY: the mapping just made, readable and writable, `words` words long.
        let mem = unsafe { std::slice::from_raw_parts_mut(base.cast::<u64>(), words) };
        for (i, w) in mem.iter_mut().enumerate() {
            *w = fill_word(seed, i as u64, false);
        }
        let expected = checksum(mem);
        let p = Protected { base: base as usize, words, expected };
        p.protect(libc::PROT_NONE);
        p
    }

    fn protect(&self, prot: libc::c_int) {
        // SAFETY: changes the protection of this value's own mapping, whole.
        let r = unsafe { libc::mprotect(self.base as *mut libc::c_void, self.words * 8, prot) };
        assert_eq!(r, 0, "mprotect: {}", std::io::Error::last_os_error());
    }

    /// Whether it still holds what it was filled with (readable for the check only).
    fn verified(&self) -> bool {
        self.protect(libc::PROT_READ);
        // SAFETY: the mapping, readable now; nothing writes it.
        let sum = checksum(unsafe { std::slice::from_raw_parts(self.base as *const u64, self.words) });
        self.protect(libc::PROT_NONE);
        sum == self.expected
    }
}

/// Starts a thread that waits in pause(2) for ever with its stack pointer on a page boundary, on a stack
/// of its own, and returns that stack pointer once the thread is there. The thread blocks every signal
/// it can (glibc keeps its internal SIGCANCEL and SIGSETXID open, which this program never raises), so
/// nothing but the system call runs on that stack; a handler would still have 32 KiB below it.
#[cfg(target_arch = "x86_64")]
fn park_on_aligned_stack() -> usize {
    const STACK: usize = 64 << 10;
    let prot = nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE;
    let len = std::num::NonZeroUsize::new(STACK).expect("non-zero");
    // SAFETY: a new private anonymous mapping of the kernel's choice; never unmapped, the parked thread
    // lives on it for ever.
    let stack = unsafe { nix::sys::mman::mmap_anonymous(None, len, prot, nix::sys::mman::MapFlags::MAP_PRIVATE) }
        .expect("mmap a stack");
    // Page aligned, with 32 KiB of room on either side.
    let top = stack.as_ptr() as usize + STACK / 2;
    let parked = Arc::new(AtomicBool::new(false));
    let flag = parked.clone();
    std::thread::spawn(move || {
        nix::sys::signal::SigSet::all().thread_block().expect("block the signals");
        let flag = flag.as_ptr();
        // SAFETY: switches to the stack made above (nothing of Rust's runs on it: the thread never
        // returns), says so through the flag (an AtomicBool the Arc moved here keeps alive for ever; a
        // plain byte store is a release store on x86_64), then loops on pause(2) (34). rcx and r11,
        // which `syscall` clobbers, are only read before the loop.
        unsafe {
            std::arch::asm!(
                "mov rsp, {top}",
                "mov byte ptr [{flag}], 1",
                "2:",
                "mov eax, 34",
                "syscall",
                "jmp 2b",
                top = in(reg) top,
                flag = in(reg) flag,
                options(noreturn),
            )
        }
    });
    while !parked.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(1));
    }
    top
}

#[cfg(not(target_arch = "x86_64"))]
fn park_on_aligned_stack() -> usize {
    panic!("--aligned-stack is written for x86_64 only")
}

fn mem(args: &[String]) {
    let name = arg(args, "--name").expect("--name");
    let mib: usize = arg(args, "--mib").map(|m| m.parse().expect("--mib")).unwrap_or(64);
    let seed: u64 = arg(args, "--seed").map(|s| s.parse().expect("--seed")).unwrap_or(1);
    let pidfile = arg(args, "--pidfile").expect("--pidfile");
    let held = arg(args, "--hold-open").map(|p| std::fs::File::open(&p).unwrap_or_else(|e| panic!("{p}: {e}")));
    let compressible = has(args, "--compressible");
    let dirty_pct: f64 = arg(args, "--dirty-pct").map(|p| p.parse().expect("--dirty-pct")).unwrap_or(0.0);
    let writers: usize = arg(args, "--writers").map(|w| w.parse().expect("--writers")).unwrap_or(1);
    let fork_every: Option<u64> = arg(args, "--fork-every-ms").map(|m| m.parse().expect("--fork-every-ms"));
    let filled: &'static mut [u64] = fill(mib, seed, compressible).leak();
    if has(args, "--lock") {
        // SAFETY: mlock(2) only reads the range, a live buffer of this length.
        let r = unsafe { libc::mlock(filled.as_ptr().cast(), std::mem::size_of_val(filled)) };
        assert_eq!(r, 0, "mlock: {}", std::io::Error::last_os_error());
    }
    let expected = checksum(filled);
    let protected = arg(args, "--protected-mib").map(|p| Protected::new(p.parse().expect("--protected-mib"), seed + 1));
    let aligned_stack = has(args, "--aligned-stack").then(park_on_aligned_stack);
    let memory = Memory { base: filled.as_mut_ptr(), words: filled.len() };
    let pages = memory.words / PAGE_WORDS;
    let counter = start_counter();
    let dirtying = dirty_pct > 0.0;
    let pause = Arc::new(Pause::new());
    let steps: Arc<Vec<AtomicU64>> =
        Arc::new((0..if dirtying { writers } else { 0 }).map(|_| AtomicU64::new(0)).collect());
    if dirtying {
        assert!((1..=pages).contains(&writers), "--writers must be between 1 and the number of pages ({pages})");
        let d = Dirtying { seed, writers, pages, compressible };
        // Together dirty_pct % of the pages per second, in 10 ms ticks; the fraction of a step a tick
        // cannot do is carried to the next. A tick late by more than one (a freeze, a pause) is not caught up.
        let per_tick = pages as f64 * dirty_pct / 100.0 / writers as f64 / 100.0;
        for t in 0..writers {
            let (pause, steps) = (pause.clone(), steps.clone());
            std::thread::spawn(move || {
                let (mut k, mut carry) = (0u64, 0.0f64);
                let tick = Duration::from_millis(10);
                let mut next = Instant::now();
                loop {
                    carry += per_tick;
                    while carry >= 1.0 {
                        carry -= 1.0;
                        pause.checkpoint();
                        k += 1;
                        // SAFETY: the buffer has pages * 512 words and lives forever; the pages of
                        // partition t are written only here, and read only while this thread is parked.
                        unsafe { d.write_step(memory.base(), t, k) };
                        steps[t].store(k, Ordering::Release);
                    }
                    next += tick;
                    let now = Instant::now();
                    if now > next + tick {
                        next = now;
                    }
                    pause.sleep_until(next);
                }
            });
        }
    }
    // One pause at a time: the answering thread and the forking thread both stop the writers.
    let pauser = Arc::new(std::sync::Mutex::new(()));
    let forks = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    if let Some(every) = fork_every {
        let (pause, steps, pauser, forks) = (pause.clone(), steps.clone(), pauser.clone(), forks.clone());
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(every));
                let guard = pauser.lock().expect("pauser");
                pause.stop(steps.len());
                let done: Vec<u64> = steps.iter().map(|s| s.load(Ordering::Acquire)).collect();
                // SAFETY: the child only checks its copy of the memory (the writers are parked, so the
                // copy is consistent) and leaves with _exit; glibc makes malloc usable after fork.
                match unsafe { nix::unistd::fork() }.expect("fork") {
                    nix::unistd::ForkResult::Child => {
                        // SAFETY: the buffer lives forever; nothing else runs in this child.
                        let mem = unsafe { std::slice::from_raw_parts(memory.base(), memory.words) };
                        let ok = if done.is_empty() {
                            checksum(mem) == expected
                        } else {
                            verify(mem, seed, compressible, &done).mismatched_pages == 0
                        };
                        // SAFETY: ends the child without running the parent's exit handlers.
                        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
                    }
                    nix::unistd::ForkResult::Parent { child } => {
                        pause.resume();
                        drop(guard);
                        let ok = matches!(
                            nix::sys::wait::waitpid(child, None),
                            Ok(nix::sys::wait::WaitStatus::Exited(_, 0))
                        );
                        let counter = if ok { &forks.0 } else { &forks.1 };
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        });
    }
    let listener = UnixListener::bind_addr(&socket_addr(&name)).expect("bind");
    write_pidfile(&pidfile, std::process::id());
    serve(listener, move || {
        let _ = &held;
        let _one_pause = pauser.lock().expect("pauser");
        let mut answer = serde_json::json!({
            "kind": "mem",
            "pid": std::process::id(),
            "counter": counter.value(),
            "stalls": counter.stalls(),
            "expected": format!("{expected:016x}"),
            "mib": mib,
            "forks_ok": forks.0.load(Ordering::SeqCst),
            "forks_failed": forks.1.load(Ordering::SeqCst),
        });
        if let Some(p) = &protected {
            answer["protected_verified"] = p.verified().into();
        }
        if let Some(sp) = aligned_stack {
            answer["aligned_stack"] = format!("{sp:#x}").into();
        }
        if !dirtying {
            // SAFETY: nothing writes the memory of a workload that does not dirty it.
            let mem = unsafe { std::slice::from_raw_parts(memory.base(), memory.words) };
            let sum = checksum(mem);
            answer["checksum"] = format!("{sum:016x}").into();
            answer["verified"] = (sum == expected).into();
            return answer;
        }
        let paused = Instant::now();
        pause.stop(steps.len());
        let done: Vec<u64> = steps.iter().map(|s| s.load(Ordering::Acquire)).collect();
        // SAFETY: every writer is parked (they resume only below), so nothing writes the memory while
        // this shared view of it lives.
        let mem = unsafe { std::slice::from_raw_parts(memory.base(), memory.words) };
        let verdict = verify(mem, seed, compressible, &done);
        let verify_ms = paused.elapsed().as_secs_f64() * 1000.0;
        let sum = checksum(mem);
        pause.resume();
        let pause_ms = paused.elapsed().as_secs_f64() * 1000.0;
        answer["checksum"] = format!("{sum:016x}").into();
        answer["steps"] = done.clone().into();
        answer["writes"] = done.iter().sum::<u64>().into();
        answer["verified"] = (verdict.mismatched_pages == 0).into();
        answer["mismatched_pages"] = verdict.mismatched_pages.into();
        answer["first_mismatch"] = verdict.first_mismatch.into();
        answer["pause_ms"] = ((pause_ms * 10.0).round() / 10.0).into();
        answer["verify_ms"] = ((verify_ms * 10.0).round() / 10.0).into();
        answer
    })
}

fn tree(args: &[String]) {
    let name = arg(args, "--name").expect("--name");
    let pidfile = arg(args, "--pidfile").expect("--pidfile");
    let (data_r, data_w) = nix::unistd::pipe().expect("pipe");
    let (ready_r, ready_w) = nix::unistd::pipe().expect("pipe");
    // SAFETY: the process is single-threaded here; the child only runs plain Rust until it loops forever.
    let writer = match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            drop((data_r, ready_r, ready_w));
            let mut w = std::fs::File::from(data_w);
            let mut i: u64 = 0;
            loop {
                i += 1;
                if w.write_all(&i.to_le_bytes()).is_err() {
                    std::process::exit(1);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        nix::unistd::ForkResult::Parent { child } => child.as_raw() as u32,
    };
    drop(data_w);
    // SAFETY: as above, still single-threaded.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            drop(ready_r);
            let last = Arc::new(AtomicU64::new(0));
            let reads = Arc::new(AtomicU64::new(0));
            let (l, n) = (last.clone(), reads.clone());
            let listener = UnixListener::bind_addr(&socket_addr(&name)).expect("bind");
            std::fs::File::from(ready_w).write_all(b"r").expect("ready");
            std::thread::spawn(move || {
                let mut r = std::fs::File::from(data_r);
                let mut buf = [0u8; 8];
                while r.read_exact(&mut buf).is_ok() {
                    l.store(u64::from_le_bytes(buf), Ordering::SeqCst);
                    n.fetch_add(1, Ordering::SeqCst);
                }
                std::process::exit(2);
            });
            serve(listener, move || {
                serde_json::json!({
                    "kind": "tree",
                    "pid": std::process::id(),
                    "parent": nix::unistd::getppid().as_raw(),
                    "writer": writer,
                    "last": last.load(Ordering::SeqCst),
                    "reads": reads.load(Ordering::SeqCst),
                })
            })
        }
        nix::unistd::ForkResult::Parent { .. } => {
            drop((data_r, ready_w));
            let mut b = [0u8; 1];
            std::fs::File::from(ready_r).read_exact(&mut b).expect("reader ready");
            write_pidfile(&pidfile, std::process::id());
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
}

fn has(args: &[String], flag: &str) -> bool {
    args.iter().any(|a| a == flag)
}

fn check(r: libc::c_int, what: &str) -> libc::c_int {
    if r < 0 {
        panic!("{what}: {}", std::io::Error::last_os_error());
    }
    r
}

fn hold(args: &[String]) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let name = arg(args, "--name").expect("--name");
    let pidfile = arg(args, "--pidfile").expect("--pidfile");
    let mut held: Vec<OwnedFd> = Vec::new();
    let mut streams: Vec<Box<dyn std::any::Any>> = Vec::new();
    if let Some(p) = arg(args, "--flock") {
        let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&p).expect("flock file");
        // SAFETY: flock on an fd we own.
        check(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, "flock");
        held.push(f.into());
    }
    if let Some(p) = arg(args, "--open") {
        held.push(std::fs::File::open(&p).unwrap_or_else(|e| panic!("{p}: {e}")).into());
    }
    if let Some(p) = arg(args, "--unix-bind-relative") {
        let path = std::path::Path::new(&p);
        std::env::set_current_dir(path.parent().expect("dir")).expect("chdir");
        let l = UnixListener::bind(path.file_name().expect("name")).expect("bind relative");
        streams.push(Box::new(l));
    }
    if let Some(p) = arg(args, "--unix-connect") {
        streams.push(Box::new(UnixStream::connect(&p).unwrap_or_else(|e| panic!("connect {p}: {e}"))));
    }
    if has(args, "--sysv-shm") {
        // SAFETY: plain SysV calls; the segment is marked for removal once attached, so it goes away
        // with the process.
        unsafe {
            let id = check(libc::shmget(libc::IPC_PRIVATE, 4096, libc::IPC_CREAT | 0o600), "shmget");
            let addr = libc::shmat(id, std::ptr::null(), 0);
            assert!(addr as isize != -1, "shmat: {}", std::io::Error::last_os_error());
            (addr as *mut u8).write_volatile(1);
            libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
        }
    }
    if has(args, "--udp-cork") {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with a valid int on a socket we own.
        check(
            unsafe {
                libc::setsockopt(s.as_raw_fd(), libc::SOL_UDP, libc::UDP_CORK, (&one as *const libc::c_int).cast(), 4)
            },
            "UDP_CORK",
        );
        streams.push(Box::new(s));
    }
    if has(args, "--o-direct-pipe") {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_DIRECT | libc::O_CLOEXEC) }, "pipe2");
        // SAFETY: both fds were just created and are owned here.
        held.extend(fds.iter().map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) }));
    }
    if has(args, "--tcp-established") {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp listen");
        let c = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("tcp connect");
        let (a, _) = l.accept().expect("accept");
        streams.push(Box::new((l, c, a)));
    }
    if has(args, "--raw-socket") {
        // SAFETY: socket(2) returns a new fd or -1.
        let fd = check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) }, "raw socket");
        // SAFETY: fd was just created and is owned here.
        held.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let counter = start_counter();
    let listener = UnixListener::bind_addr(&socket_addr(&name)).expect("bind");
    write_pidfile(&pidfile, std::process::id());
    serve(listener, move || {
        let _ = (&held, &streams);
        serde_json::json!({ "kind": "hold", "pid": std::process::id(), "counter": counter.value() })
    })
}

fn listen(args: &[String]) {
    let path = arg(args, "--path").expect("--path");
    let pidfile = arg(args, "--pidfile").expect("--pidfile");
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).unwrap_or_else(|e| panic!("bind {path}: {e}"));
    write_pidfile(&pidfile, std::process::id());
    let mut kept = Vec::new();
    for s in l.incoming().flatten() {
        kept.push(s);
    }
}

fn trace(args: &[String]) {
    let pid: i32 = arg(args, "--pid").expect("--pid").parse().expect("pid");
    let pidfile = arg(args, "--pidfile").expect("--pidfile");
    nix::sys::ptrace::seize(nix::unistd::Pid::from_raw(pid), nix::sys::ptrace::Options::empty()).expect("PTRACE_SEIZE");
    write_pidfile(&pidfile, std::process::id());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Locks a mutex, also one a panicked thread held (the state it guards stays meaningful).
fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The testbed host this process was started on, or "?".
fn testbed_host() -> String {
    std::env::var("TESTBED_HOST").unwrap_or_else(|_| "?".into())
}

/// At most `max` bytes of `bytes` as a (lossy) string.
fn lossy(bytes: &[u8], max: usize) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(max)]).into_owned()
}

/// A line longer than this is cut into pieces of this size: what a peer sends never grows memory.
const MAX_LINE: usize = 64 * 1024;

/// Splits a byte stream into lines (without their `\n`).
#[derive(Default)]
struct Lines {
    buf: Vec<u8>,
}

impl Lines {
    fn feed(&mut self, data: &[u8], mut each: impl FnMut(String)) {
        self.buf.extend_from_slice(data);
        let mut from = 0;
        while let Some(i) = self.buf[from..].iter().position(|&b| b == b'\n') {
            each(lossy(&self.buf[from..from + i], MAX_LINE));
            from += i + 1;
        }
        self.buf.drain(..from);
        while self.buf.len() >= MAX_LINE {
            each(lossy(&self.buf, MAX_LINE));
            self.buf.drain(..MAX_LINE);
        }
    }
}

/// Calls `connect` until it succeeds, for up to 5 s; exits with a message if it never does.
fn connect_retrying<T>(what: &str, mut connect: impl FnMut() -> std::io::Result<T>) -> T {
    let start = Instant::now();
    loop {
        match connect() {
            Ok(t) => return t,
            Err(e) if start.elapsed() >= Duration::from_secs(5) => {
                eprintln!("workload: connect {what}: {e}");
                std::process::exit(1);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// send(2) without SIGPIPE and without blocking.
fn send_nosignal(fd: std::os::fd::RawFd, data: &[u8]) -> std::io::Result<usize> {
    // SAFETY: the buffer is valid for data.len() bytes; fd is a socket the caller owns.
    let n = unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// An error that says "not now" (EAGAIN, EINTR), not that the connection is over.
fn transient(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted)
}

fn millis_arg(args: &[String], name: &str, default: u64) -> Duration {
    Duration::from_millis(arg(args, name).map(|m| m.parse().expect(name)).unwrap_or(default).max(1))
}

fn echo_server(args: &[String]) {
    let path = arg(args, "--path").expect("--path");
    let name = arg(args, "--name").expect("--name");
    let pidfile = arg(args, "--pidfile").expect("--pidfile");
    let push = arg(args, "--push-unread");
    let host = testbed_host();
    #[derive(Default)]
    struct Echo {
        connections: u64,
        lines: u64,
        last_line: Option<String>,
    }
    let state = Arc::new(Mutex::new(Echo::default()));
    let _ = std::fs::remove_file(&path);
    let server = UnixListener::bind(&path).unwrap_or_else(|e| panic!("bind {path}: {e}"));
    let listener = UnixListener::bind_addr(&socket_addr(&name)).expect("bind");
    {
        let (state, host) = (state.clone(), host.clone());
        std::thread::spawn(move || {
            loop {
                let mut conn = match server.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        // EMFILE and the like: wait rather than spin
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                locked(&state).connections += 1;
                let (state, host, push) = (state.clone(), host.clone(), push.clone());
                std::thread::spawn(move || {
                    if let Some(p) = push
                        && conn.write_all(p.as_bytes()).is_err()
                    {
                        return;
                    }
                    let (mut lines, mut buf) = (Lines::default(), [0u8; 4096]);
                    while let Ok(n @ 1..) = conn.read(&mut buf) {
                        let mut answers = String::new();
                        lines.feed(&buf[..n], |line| {
                            answers.push_str(&format!("{host} echo {line}\n"));
                            let mut s = locked(&state);
                            s.lines += 1;
                            s.last_line = Some(line);
                        });
                        if conn.write_all(answers.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }
    write_pidfile(&pidfile, std::process::id());
    serve(listener, move || {
        let s = locked(&state);
        serde_json::json!({
            "kind": "echo-server",
            "pid": std::process::id(),
            "host": host,
            "connections": s.connections,
            "lines": s.lines,
            "last_line": s.last_line,
        })
    })
}

fn client(args: &[String]) {
    use std::os::fd::AsRawFd;
    let path = arg(args, "--connect").expect("--connect");
    let name = arg(args, "--name").expect("--name");
    let pidfile = arg(args, "--pidfile").expect("--pidfile");
    let every = millis_arg(args, "--every-ms", 100);
    let read_when = arg(args, "--read-when");
    #[derive(Default)]
    struct Client {
        reading: bool,
        sent: u64,
        answers: u64,
        last_answer: Option<String>,
        last_host: Option<String>,
        first_read: Option<String>,
        eof: bool,
        error: Option<String>,
    }
    let state = Arc::new(Mutex::new(Client::default()));
    let conn = connect_retrying(&path, || UnixStream::connect(&path));
    let listener = UnixListener::bind_addr(&socket_addr(&name)).expect("bind");
    {
        let state = state.clone();
        std::thread::spawn(move || {
            if let Some(f) = read_when {
                while !std::path::Path::new(&f).exists() {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            locked(&state).reading = true;
            conn.set_nonblocking(true).expect("nonblocking");
            let fd = conn.as_raw_fd();
            let (mut lines, mut buf) = (Lines::default(), [0u8; 4096]);
            // The line being written (a full send buffer holds the next one back) and its K.
            let (mut pending, mut k) = (Vec::<u8>::new(), 0u64);
            // The first send is one period away: what is already there is read alone first.
            let mut next = Instant::now() + every;
            // Records the end (None: EOF) and stops for good; the connection stays open as it is.
            fn fail(state: &Mutex<Client>, e: Option<std::io::Error>) -> ! {
                let mut s = locked(state);
                match e {
                    None => s.eof = true,
                    Some(e) => s.error = Some(e.to_string()),
                }
                drop(s);
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            loop {
                let now = Instant::now();
                if now >= next {
                    if pending.is_empty() {
                        k += 1;
                        pending = format!("{name} seq {k}\n").into_bytes();
                    }
                    next += every;
                    if next <= now {
                        next = now + every;
                    }
                }
                if !pending.is_empty() {
                    match send_nosignal(fd, &pending) {
                        Ok(n) => {
                            pending.drain(..n);
                            if pending.is_empty() {
                                locked(&state).sent = k;
                            }
                        }
                        Err(e) if transient(&e) => {}
                        Err(e) => fail(&state, Some(e)),
                    }
                }
                let events = libc::POLLIN | if pending.is_empty() { 0 } else { libc::POLLOUT };
                let mut pfd = libc::pollfd { fd, events, revents: 0 };
                let wait = next.saturating_duration_since(Instant::now()).as_micros().div_ceil(1000).min(1000) as i32;
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut pfd, 1, wait) } <= 0
                    || pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) == 0
                {
                    continue;
                }
                match (&conn).read(&mut buf) {
                    Ok(n) => {
                        let mut s = locked(&state);
                        s.first_read.get_or_insert_with(|| lossy(&buf[..n], 256));
                        if n == 0 {
                            drop(s);
                            fail(&state, None);
                        }
                        lines.feed(&buf[..n], |line| {
                            s.answers += 1;
                            s.last_host = line.split(' ').next().map(str::to_owned);
                            s.last_answer = Some(line);
                        });
                    }
                    Err(e) if transient(&e) => {}
                    Err(e) => fail(&state, Some(e)),
                }
            }
        });
    }
    write_pidfile(&pidfile, std::process::id());
    serve(listener, move || {
        let s = locked(&state);
        serde_json::json!({
            "kind": "client",
            "pid": std::process::id(),
            "reading": s.reading,
            "sent": s.sent,
            "answers": s.answers,
            "last_answer": s.last_answer,
            "last_host": s.last_host,
            "first_read": s.first_read,
            "eof": s.eof,
            "error": s.error,
        })
    })
}

fn logger(args: &[String]) {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixDatagram;
    let path = arg(args, "--dgram").expect("--dgram");
    let name = arg(args, "--name").expect("--name");
    let pidfile = arg(args, "--pidfile").expect("--pidfile");
    let every = millis_arg(args, "--every-ms", 50);
    #[derive(Default)]
    struct Logger {
        seq: u64,
        sent: u64,
        errors: u64,
        last_error: Option<String>,
    }
    let state = Arc::new(Mutex::new(Logger::default()));
    let sock = UnixDatagram::unbound().expect("datagram socket");
    connect_retrying(&path, || sock.connect(&path));
    let listener = UnixListener::bind_addr(&socket_addr(&name)).expect("bind");
    {
        let state = state.clone();
        std::thread::spawn(move || {
            let mut next = Instant::now();
            for k in 1u64.. {
                let result = send_nosignal(sock.as_raw_fd(), format!("{name} log {k}").as_bytes());
                let mut s = locked(&state);
                s.seq = k;
                match result {
                    Ok(_) => s.sent += 1,
                    Err(e) => {
                        s.errors += 1;
                        s.last_error = Some(e.to_string());
                    }
                }
                drop(s);
                next += every;
                let now = Instant::now();
                if next <= now {
                    next = now + every;
                }
                std::thread::sleep(next - now);
            }
        });
    }
    write_pidfile(&pidfile, std::process::id());
    serve(listener, move || {
        let s = locked(&state);
        serde_json::json!({
            "kind": "logger",
            "pid": std::process::id(),
            "seq": s.seq,
            "sent": s.sent,
            "errors": s.errors,
            "last_error": s.last_error,
        })
    })
}

fn log_daemon(args: &[String]) {
    use std::os::unix::net::UnixDatagram;
    let path = arg(args, "--path").expect("--path");
    let name = arg(args, "--name").expect("--name");
    let pidfile = arg(args, "--pidfile").expect("--pidfile");
    let host = testbed_host();
    #[derive(Default)]
    struct Daemon {
        received: u64,
        last: Option<String>,
        max_seq: std::collections::BTreeMap<String, u64>,
    }
    let state = Arc::new(Mutex::new(Daemon::default()));
    let _ = std::fs::remove_file(&path);
    let sock = UnixDatagram::bind(&path).unwrap_or_else(|e| panic!("bind {path}: {e}"));
    let listener = UnixListener::bind_addr(&socket_addr(&name)).expect("bind");
    {
        let state = state.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let Ok(n) = sock.recv(&mut buf) else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let text = lossy(&buf[..n], 4096);
                let mut s = locked(&state);
                s.received += 1;
                if let Some((sender, k)) = text.rsplit_once(" log ")
                    && let Ok(k) = k.parse::<u64>()
                    && (s.max_seq.len() < 1024 || s.max_seq.contains_key(sender))
                {
                    let max = s.max_seq.entry(sender.to_owned()).or_insert(0);
                    *max = (*max).max(k);
                }
                s.last = Some(text);
            }
        });
    }
    write_pidfile(&pidfile, std::process::id());
    serve(listener, move || {
        let s = locked(&state);
        serde_json::json!({
            "kind": "log-daemon",
            "pid": std::process::id(),
            "host": host,
            "received": s.received,
            "last": s.last,
            "max_seq": s.max_seq,
        })
    })
}

fn pty_client(args: &[String]) {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let dashes = args.iter().position(|a| a == "--").expect("-- CMD ARGS...");
    let (flags, cmd) = (&args[..dashes], &args[dashes + 1..]);
    let name = arg(flags, "--name").expect("--name");
    let pidfile = arg(flags, "--pidfile").expect("--pidfile");
    assert!(!cmd.is_empty(), "no command after --");
    // SAFETY: posix_openpt returns a new fd or -1.
    let fd = check(unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) }, "posix_openpt");
    // SAFETY: fd was just created and is owned here.
    let master = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut slave_name = [0 as libc::c_char; 128];
    // SAFETY: plain calls on the master we own; ptsname_r writes at most the buffer's length.
    unsafe {
        check(libc::grantpt(fd), "grantpt");
        check(libc::unlockpt(fd), "unlockpt");
        assert_eq!(libc::ptsname_r(fd, slave_name.as_mut_ptr(), slave_name.len()), 0, "ptsname_r");
    }
    // SAFETY: ptsname_r succeeded, so the buffer holds a NUL-terminated path.
    let slave_path = unsafe { std::ffi::CStr::from_ptr(slave_name.as_ptr()) }.to_string_lossy().into_owned();
    let size = libc::winsize { ws_row: 24, ws_col: 80, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize.
    check(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &size) }, "TIOCSWINSZ");
    let mut child = {
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&slave_path)
            .unwrap_or_else(|e| panic!("{slave_path}: {e}"));
        let mut command = std::process::Command::new(&cmd[0]);
        command
            .args(&cmd[1..])
            .stdin(slave.try_clone().expect("dup slave"))
            .stdout(slave.try_clone().expect("dup slave"))
            .stderr(slave);
        if std::env::var_os("TERM").is_none() {
            command.env("TERM", "xterm");
        }
        // SAFETY: only async-signal-safe calls between fork and exec; stdin is the slave by now.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        command.spawn().unwrap_or_else(|e| panic!("{}: {e}", cmd[0]))
        // (the command, and with it the parent's copies of the slave, go here: the master sees the
        // end once the child's session is gone)
    };
    let child_pid = child.id();
    let tail = Arc::new(Mutex::new(Vec::<u8>::with_capacity(8192)));
    let exit: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    {
        let tail = tail.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match (&master).read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let mut t = locked(&tail);
                        t.extend_from_slice(&buf[..n]);
                        let excess = t.len().saturating_sub(4096);
                        t.drain(..excess);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    // EIO: every slave is closed (the child's session is gone)
                    Err(_) => break,
                }
            }
            // keep the master (and so the pty) as long as the process lives
            std::mem::forget(master);
        });
    }
    {
        let exit = exit.clone();
        std::thread::spawn(move || {
            let status = match child.wait() {
                Ok(s) => match (s.code(), s.signal()) {
                    (Some(c), _) => format!("exit {c}"),
                    (_, Some(sig)) => format!("signal {sig}"),
                    _ => format!("{s}"),
                },
                Err(e) => format!("wait: {e}"),
            };
            *locked(&exit) = Some(status);
        });
    }
    let listener = UnixListener::bind_addr(&socket_addr(&name)).expect("bind");
    write_pidfile(&pidfile, std::process::id());
    serve(listener, move || {
        let exit = locked(&exit).clone();
        serde_json::json!({
            "kind": "pty-client",
            "pid": std::process::id(),
            "child": child_pid,
            "child_alive": exit.is_none(),
            "exit": exit,
            "tail": String::from_utf8_lossy(&locked(&tail)),
        })
    })
}

fn query(args: &[String]) {
    let name = arg(args, "--name").expect("--name");
    let mut s = match UnixStream::connect_addr(&socket_addr(&name)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("workload {name} does not answer here: {e}");
            std::process::exit(3);
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read answer");
    print!("{out}");
}

fn main() {
    // (Rust's runtime does this too; a workload must never rely on it)
    // SAFETY: setting a signal disposition, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("echo-server") => echo_server(&args),
        Some("client") => client(&args),
        Some("logger") => logger(&args),
        Some("log-daemon") => log_daemon(&args),
        Some("pty-client") => pty_client(&args),
        Some("mem") => mem(&args),
        Some("tree") => tree(&args),
        Some("query") => query(&args),
        Some("hold") => hold(&args),
        Some("listen") => listen(&args),
        Some("trace") => trace(&args),
        _ => {
            eprintln!(
                "usage: workload mem|tree|hold|listen|trace|echo-server|client|logger|log-daemon|pty-client|query ..."
            );
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: u64 = 42;
    const PAGES: usize = 16;

    /// A small buffer filled as `workload mem` fills it, then dirtied by `steps[t]` steps of each writer
    /// t, interleaved as real writers would be, with the writers' own step code.
    fn dirtied(compressible: bool, steps: &[u64]) -> Vec<u64> {
        let mut mem: Vec<u64> = (0..(PAGES * PAGE_WORDS) as u64).map(|i| fill_word(SEED, i, compressible)).collect();
        let d = Dirtying { seed: SEED, writers: steps.len(), pages: PAGES, compressible };
        for k in 1..=steps.iter().copied().max().unwrap_or(0) {
            for (t, &n) in steps.iter().enumerate() {
                if k <= n {
                    // SAFETY: the vector has PAGES * 512 words and nothing else touches it.
                    unsafe { d.write_step(mem.as_mut_ptr(), t, k) };
                }
            }
        }
        mem
    }

    const OK: Verdict = Verdict { mismatched_pages: 0, first_mismatch: None };

    #[test]
    fn untouched_and_dirtied_memory_verifies() {
        for compressible in [false, true] {
            let fresh = dirtied(compressible, &[]);
            assert_eq!(verify(&fresh, SEED, compressible, &[]), OK);
            assert_eq!(verify(&fresh, SEED, compressible, &[0, 0, 0]), OK);
            let steps = [40, 7, 25];
            let mem = dirtied(compressible, &steps);
            assert_ne!(mem, fresh, "the steps changed nothing");
            assert_eq!(verify(&mem, SEED, compressible, &steps), OK);
        }
    }

    #[test]
    fn steps_stay_in_their_writers_partition_and_reach_all_of_it() {
        let d = Dirtying { seed: SEED, writers: 3, pages: PAGES, compressible: false };
        for t in 0..3 {
            let hit: std::collections::BTreeSet<usize> = (1..=500).map(|k| d.step(t, k).0).collect();
            let owned: std::collections::BTreeSet<usize> = (t..PAGES).step_by(3).collect();
            assert_eq!(hit, owned, "writer {t}");
        }
    }

    #[test]
    fn compressible_steps_write_mostly_zeros() {
        let mem = dirtied(true, &[200]);
        assert!(mem.iter().enumerate().all(|(i, &w)| i % 8 == 0 || w == 0));
        assert!(mem.iter().step_by(8).all(|&w| w != 0));
    }

    #[test]
    fn a_corrupted_word_is_found() {
        let steps = [40, 7, 25];
        for page in [0, 5, PAGES - 1] {
            let mut mem = dirtied(false, &steps);
            mem[page * PAGE_WORDS + 300] ^= 1;
            assert_eq!(verify(&mem, SEED, false, &steps), Verdict { mismatched_pages: 1, first_mismatch: Some(page) });
        }
    }

    #[test]
    fn a_lost_write_is_found() {
        // What a migration that misses a dirty page leaves: the page as it was before its last step.
        let steps = [40, 7, 25];
        let before = dirtied(false, &[40, 7, 24]);
        let after = dirtied(false, &steps);
        let d = Dirtying { seed: SEED, writers: 3, pages: PAGES, compressible: false };
        let page = d.step(2, 25).0;
        let mut mem = after.clone();
        mem[page * PAGE_WORDS..(page + 1) * PAGE_WORDS]
            .copy_from_slice(&before[page * PAGE_WORDS..(page + 1) * PAGE_WORDS]);
        assert_eq!(verify(&mem, SEED, false, &steps), Verdict { mismatched_pages: 1, first_mismatch: Some(page) });
        // and counters behind the memory (a step done but not counted) do not pass either
        assert_ne!(verify(&after, SEED, false, &[40, 7, 24]), OK);
    }

    #[test]
    fn a_half_written_page_is_found() {
        // A step interrupted midway and counted as done: its page mixes old and new words.
        let steps = [40, 7, 25];
        let before = dirtied(true, &[40, 6, 25]);
        let mut mem = dirtied(true, &steps);
        let d = Dirtying { seed: SEED, writers: 3, pages: PAGES, compressible: true };
        let page = d.step(1, 7).0;
        let half = page * PAGE_WORDS + PAGE_WORDS / 2;
        mem[half..(page + 1) * PAGE_WORDS].copy_from_slice(&before[half..(page + 1) * PAGE_WORDS]);
        let v = verify(&mem, SEED, true, &steps);
        assert_eq!(v.first_mismatch, Some(page));
        assert_eq!(v.mismatched_pages, 1);
    }

    #[test]
    fn the_counter_keeps_its_longest_stalls_longest_first() {
        let c = Counter { value: AtomicU64::new(0), stalls: Default::default() };
        // 40 stalls of 1..=40 ms, in a scrambled order, each ending at its own time.
        for i in 0..40u64 {
            let len = (i * 17) % 40 + 1;
            c.note_stall(len * 1000, 1_000_000 + i);
        }
        let kept = c.stalls.lock().unwrap().clone();
        let lengths: Vec<u64> = kept.iter().map(|&(len, _)| len / 1000).collect();
        assert_eq!(lengths, (25..=40).rev().collect::<Vec<_>>());
        // Each kept with the time it ended; the JSON as [ended at (ms), length (ms)].
        let (len, end) = kept[0];
        assert_eq!(end, 1_000_000 + (0..40).find(|i| (i * 17) % 40 + 1 == 40).unwrap());
        assert_eq!(c.stalls()[0], serde_json::json!([end as f64 / 1e3, len as f64 / 1e3]));
        // A stall shorter than every kept one changes nothing.
        c.note_stall(1000, 7);
        assert_eq!(c.stalls.lock().unwrap().clone(), kept);
    }
}
