//! End to end with real CRIU: the target agent's lazy-pages daemon serves `criu restore --lazy-pages`.
//!
//! A workload with known memory is dumped normally (`criu dump --leave-stopped`: its pagemap marks the
//! lazy-capable pages PE_LAZY|PE_PRESENT, their bytes in pages-N.img), its pages are served from those
//! images ([`ImagePageSource`]), the stopped original is killed and reaped (it holds its pid), and the
//! images are restored with `--lazy-pages` while the daemon listens on `<images>/lazy-pages.socket`.
//!
//! - `workload mem` (256 MiB): a restore while the original still holds its pid fails after connecting
//!   (the daemon reports EOF before RSTF); then the lazy restore: faults served while the push runs,
//!   every page in place, the copy's checksum equal to its content's, its counter advancing.
//! - `workload tree` (3 processes, a pipe between two): one uffd per process on one connection; the
//!   reader keeps reading the writer's counter.
//! - post-copy (`workload mem`, 64 MiB): the pages are not known when the copy starts running: a
//!   stream releases them after RSTF (runs of 64 pages, one per millisecond) and a fault's request
//!   releases its page after a simulated round trip. The copy's checksum (read while most pages are
//!   still on their way) equals its content's: no page was zero-filled while pending.
//!
//! Needs root and CRIU (>= 4.1), and `target/<profile>/workload` (`cargo build --release --workspace`);
//! it fails, naming what is missing, rather than pass without them. Images go under /dev/shm.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use target_agent::lazy::{
    ImagePageSource, LazyError, LazyHandle, LazyPages, LazyProgress, LazyRanges, LazyStats, Lookup, PageSource,
};

/// Size of the `mem` workload: large enough that the push lasts a while (about 0.2 s here) and the
/// query's faults meet it.
const MIB: u64 = 256;

/// One workload, its images dir under /dev/shm, and what to clean up: the processes (by pid, only
/// while their command line still names this case) and the directory, also when the test fails.
struct Case {
    criu: PathBuf,
    workload: PathBuf,
    name: String,
    base: PathBuf,
    dir: PathBuf,
    pids: Vec<u32>,
}

impl Case {
    fn new(kind: &str) -> Case {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (CRIU dumps and restores processes; userfaultfd with fork events): run it as root"
        );
        let criu = criu::Criu::find().unwrap_or_else(|e| panic!("this test needs CRIU: {e}"));
        // Else a dump now and then marks no page lazy and the cases here fail at random.
        assert_eq!(criu.stack_bug(), None, "these tests need CRIU with the fixes of deploy/install.sh");
        let criu = criu.bin;
        // target/<profile>/deps/lazy_restore-HASH → target/<profile>/workload
        let exe = std::env::current_exe().expect("current exe");
        let workload = exe.parent().and_then(Path::parent).expect("target dir").join("workload");
        assert!(
            workload.exists(),
            "{} is missing: build it first (cargo build --release --workspace)",
            workload.display()
        );
        // Orphans (a workload after `setsid -f`, a restored copy after `criu restore -d`, the children of
        // a killed root) are reparented to this process, which reaps them: init here may not.
        nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let tag = format!("{kind}-{}-{}", std::process::id(), nanos % 1_000_000_000);
        let base = PathBuf::from(format!("/dev/shm/migrate-lazy-test-{tag}"));
        let dir = base.join("images");
        std::fs::create_dir_all(&dir).expect("images dir under /dev/shm");
        Case { criu, workload, name: format!("lazy-{tag}"), base, dir, pids: Vec::new() }
    }

    /// Starts `workload KIND --name NAME ARGS` in its own session (stdio on /dev/null); its root pid.
    fn start(&mut self, kind: &str, args: &[&str]) -> u32 {
        let pidfile = self.base.join("workload.pid");
        let st = Command::new("setsid")
            .arg("-f")
            .arg(&self.workload)
            .args([kind, "--name", &self.name])
            .args(args)
            .arg("--pidfile")
            .arg(&pidfile)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("setsid -f workload");
        assert!(st.success(), "setsid -f workload: {st}");
        let deadline = Instant::now() + Duration::from_secs(20);
        let pid: u32 = loop {
            if let Ok(s) = std::fs::read_to_string(&pidfile) {
                break s.trim().parse().expect("pid in pidfile");
            }
            assert!(Instant::now() < deadline, "workload {kind} not ready within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        };
        self.pids.push(pid);
        pid
    }

    /// The workload's JSON answer, within 20 s (a copy whose faults are never answered hangs).
    fn query(&self) -> serde_json::Value {
        query(&self.workload, &self.name, &self.base)
    }

    /// A normal `criu dump --leave-stopped` of the tree at `pid`; its duration.
    fn dump(&self, pid: u32) -> Duration {
        let t = Instant::now();
        let mut cmd = Command::new(&self.criu);
        cmd.args(["dump", "--tree", &pid.to_string(), "-D"]).arg(&self.dir).args([
            "--leave-stopped",
            "-v2",
            "-o",
            "dump.log",
        ]);
        let st = run(&mut cmd, &self.base.join("dump.out"), Duration::from_secs(30));
        assert!(st.success(), "criu dump: {st}\n{}", log_tail(&self.dir.join("dump.log")));
        t.elapsed()
    }

    /// What `restore --lazy-pages` leaves out: every PE_LAZY entry, with data or not (criu/mem.c
    /// restore_priv_vma_content). (criu::images::lazy_ranges keeps only those without data, a lazy
    /// dump's, which a normal dump has none of.) And the source of their pages.
    fn lazy_ranges(&self) -> (LazyRanges, Arc<ImagePageSource>, u64) {
        let ranges: LazyRanges = criu::images::pagemap_pids(&self.dir)
            .expect("pagemap pids")
            .into_iter()
            .map(|p| {
                let pm = criu::images::read_pagemap(&self.dir.join(format!("pagemap-{p}.img")))
                    .unwrap_or_else(|e| panic!("{e}"));
                (p, pm.entries.iter().filter(|e| e.is_lazy()).map(|e| e.vaddr..e.end()).collect())
            })
            .collect();
        let pages = ranges.iter().flat_map(|(_, r)| r).map(|r| (r.end - r.start) / 4096).sum();
        (ranges, Arc::new(ImagePageSource::open(&self.dir).expect("page images")), pages)
    }

    /// SIGKILLs the stopped originals and waits until they are reaped: they hold the pids.
    fn kill_originals(&self) {
        for &pid in &self.pids {
            kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill an original");
        }
        for &pid in &self.pids {
            assert!(reap(pid, Duration::from_secs(10)), "the original {pid} did not go away within 10 s");
        }
    }

    fn restore_cmd(&self, log: &str) -> Command {
        let mut c = Command::new(&self.criu);
        c.arg("restore").arg("-D").arg(&self.dir).args(["--lazy-pages", "--restore-detached", "-v2", "-o", log]);
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        c
    }

    /// Starts the daemon and `criu restore --lazy-pages`, and waits for RSTF (30 s), checking every 2 ms
    /// meanwhile that nothing is pushed before it; returns the daemon, its last progress before RSTF,
    /// the running criu and the time to RSTF.
    fn restore_lazily(
        &self,
        ranges: LazyRanges,
        source: Arc<dyn PageSource>,
    ) -> (LazyHandle, LazyProgress, Child, Duration) {
        let t = Instant::now();
        let h = LazyPages::listen(&self.dir).expect("listen").start(ranges, source);
        let mut criu = self.restore_cmd("restore.log").spawn().expect("spawn criu restore");
        let mut before = h.progress();
        loop {
            let p = h.progress();
            assert!(p.restored || p.pushed_pages == 0, "pushed before RSTF: {p:?}");
            if !p.restored {
                before = p;
            }
            match h.wait_restored(Duration::from_millis(2)) {
                Ok(()) => break,
                Err(LazyError::NotConnected { .. } | LazyError::NotRestored { .. })
                    if t.elapsed() < Duration::from_secs(30) => {}
                Err(e) => {
                    let _ = criu.kill();
                    let _ = criu.wait();
                    panic!("{e}\n{}", log_tail(&self.dir.join("restore.log")));
                }
            }
        }
        (h, before, criu, t.elapsed())
    }

    /// Waits for `criu restore -d` to exit (30 s) and checks it succeeded.
    fn criu_exits(&self, mut criu: Child) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let st = loop {
            if let Some(st) = criu.try_wait().expect("wait criu") {
                break st;
            }
            assert!(Instant::now() < deadline, "criu restore did not exit within 30 s");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(st.success(), "criu restore: {st}\n{}", log_tail(&self.dir.join("restore.log")));
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        for &pid in &self.pids {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&self.name) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        for &pid in &self.pids {
            reap(pid, Duration::from_secs(5));
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// Runs `cmd` to its end, at most `limit`; stdout and stderr go to `out`.
fn run(cmd: &mut Command, out: &Path, limit: Duration) -> ExitStatus {
    let f = std::fs::File::create(out).expect("output file");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(f.try_clone().expect("dup"))
        .stderr(f)
        .spawn()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not end within {limit:?}; output in {}", out.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn query(workload: &Path, name: &str, scratch: &Path) -> serde_json::Value {
    std::fs::create_dir_all(scratch).expect("scratch dir");
    let out = scratch.join("query.out");
    let st = run(Command::new(workload).args(["query", "--name", name]), &out, Duration::from_secs(20));
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(st.success(), "workload query {name}: {st}: {text}");
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("workload answer {text:?}: {e}"))
}

/// Waits until `pid` is gone, reaping it if it is a child (this test is a child subreaper).
fn reap(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let _ = nix::sys::wait::waitpid(Pid::from_raw(pid as i32), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// `wait_done`, cancelled from a clone after 30 s.
fn done_within_30s(h: LazyHandle) -> Result<LazyStats, LazyError> {
    let watchdog = h.clone();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            watchdog.cancel();
        }
    });
    let r = h.wait_done();
    let _ = tx.send(());
    r
}

#[test]
fn lazy_restore_of_a_real_dump_serves_faults_and_pushes_the_rest() {
    let started = Instant::now();
    let mut case = Case::new("mem");
    let pid = case.start("mem", &["--mib", &MIB.to_string(), "--seed", "3"]);
    let before = case.query();
    assert_eq!(before["checksum"], before["expected"], "workload before the dump: {before}");
    let dump_time = case.dump(pid);
    let (ranges, source, lazy_pages) = case.lazy_ranges();
    assert!(lazy_pages >= (MIB << 20) / 4096, "only {lazy_pages} lazy pages for {MIB} MiB of memory: {ranges:?}");

    // 1. The stopped original still holds its pid: restore connects, then fails to fork it.
    let h = LazyPages::listen(&case.dir).expect("listen").start(ranges.clone(), source.clone());
    let st = run(&mut case.restore_cmd("restore-clash.log"), &case.base.join("clash.out"), Duration::from_secs(30));
    assert!(!st.success(), "restore succeeded while the original held the pid");
    match h.wait_restored(Duration::from_secs(10)) {
        Err(LazyError::RestoreFailed { .. }) => {}
        r => panic!(
            "expected RestoreFailed (EOF before RSTF), got {r:?}\n{}",
            log_tail(&case.dir.join("restore-clash.log"))
        ),
    }
    assert!(matches!(h.wait_done(), Err(LazyError::RestoreFailed { .. })));

    // 2. Originals gone: the lazy restore proper.
    case.kill_originals();
    let (h, before_rstf, criu, restore_time) = case.restore_lazily(ranges, source);
    // Asked at once, the copy reads all its memory for the checksum while the push runs: its faults
    // are served between push batches.
    let during = {
        let (workload, name, scratch) = (case.workload.clone(), case.name.clone(), case.base.join("during"));
        std::thread::spawn(move || query(&workload, &name, &scratch))
    };
    case.criu_exits(criu);
    let mid = h.progress();
    let observer = h.clone();
    let stats = done_within_30s(h).expect("every lazy page in place");
    let end = observer.progress();
    let during = during.join().expect("query during the push");

    assert_eq!(during["pid"].as_u64(), Some(pid as u64), "the copy has the original's pid");
    assert_eq!(during["checksum"], during["expected"], "memory of the copy differs from its content: {during}");
    std::thread::sleep(Duration::from_millis(300));
    let after = case.query();
    assert_eq!(after["checksum"], after["expected"], "after the push: {after}");
    let (c0, c1) = (during["counter"].as_u64().unwrap_or(0), after["counter"].as_u64().unwrap_or(0));
    assert!(c1 > c0, "the copy's counter does not advance: {c0} then {c1}");

    assert_eq!(stats.processes, 1, "{stats:?}");
    assert!(stats.pushed_pages > 0, "nothing pushed: {stats:?}");
    assert!(stats.faults > 0, "no fault served: {stats:?}");
    assert_eq!(end.pages_left, 0, "{end:?}");
    assert!(
        stats.pushed_pages + stats.fault_pages + stats.zero_pages + stats.dropped_pages >= lazy_pages,
        "{lazy_pages} lazy pages, not all accounted for: {stats:?}"
    );
    eprintln!(
        "lazy restore of {MIB} MiB ({lazy_pages} lazy pages): dump {dump_time:?}, restore to RSTF {restore_time:?}; \
         after RSTF {:.0} pages/s ({:.0} MiB/s) over {:?}; faults {} ({} copied, {} before RSTF), pushed {}, \
         zero {}, dropped {}; fault latency p50 {:?} p99 {:?} max {:?}; when criu exited: {mid:?}",
        stats.pages_per_sec(),
        stats.pages_per_sec() * 4096.0 / (1 << 20) as f64,
        stats.push_elapsed,
        stats.faults,
        stats.fault_pages,
        before_rstf.faults,
        stats.pushed_pages,
        stats.zero_pages,
        stats.dropped_pages,
        stats.fault_p50,
        stats.fault_p99,
        stats.fault_max,
    );
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
}

#[test]
fn lazy_restore_of_a_process_tree_serves_every_process() {
    let started = Instant::now();
    let mut case = Case::new("tree");
    let root = case.start("tree", &[]);
    let a = case.query();
    let (reader, writer) =
        (a["pid"].as_u64().expect("reader pid") as u32, a["writer"].as_u64().expect("writer") as u32);
    assert_eq!(a["parent"].as_u64(), Some(root as u64), "{a}");
    case.pids.extend([reader, writer]);
    case.dump(root);
    let (ranges, source, lazy_pages) = case.lazy_ranges();
    assert_eq!(ranges.len(), 3, "one pagemap per process: {ranges:?}");
    case.kill_originals();

    let (h, _, criu, _) = case.restore_lazily(ranges, source);
    case.criu_exits(criu);
    let stats = done_within_30s(h).expect("every lazy page in place");
    assert_eq!(stats.processes, 3, "{stats:?}");
    assert!(
        stats.pushed_pages + stats.fault_pages + stats.zero_pages + stats.dropped_pages >= lazy_pages,
        "{lazy_pages} lazy pages, not all accounted for: {stats:?}"
    );
    let b = case.query();
    std::thread::sleep(Duration::from_millis(200));
    let c = case.query();
    assert_eq!(b["pid"].as_u64(), Some(reader as u64), "{b}");
    assert!(b["last"].as_u64() > a["last"].as_u64(), "the writer's counter went back: {a} then {b}");
    assert!(c["reads"].as_u64() > b["reads"].as_u64(), "the reader no longer reads: {b} then {c}");
    eprintln!(
        "lazy restore of a 3-process tree ({lazy_pages} lazy pages): faults {}, pushed {}, zero {}, p99 {:?}",
        stats.faults, stats.pushed_pages, stats.zero_pages, stats.fault_p99
    );
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
}

/// A post-copy page source over the images: a page is Pending until it is released, by the background
/// stream ([`Trickle::stream`]) or on request (a priority thread releases it after `rtt`); complete
/// once the stream released everything.
struct Trickle {
    images: Arc<ImagePageSource>,
    state: Mutex<TrickleState>,
    waker: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    requests: Mutex<std::sync::mpsc::Sender<(u32, u64)>>,
}

#[derive(Default)]
struct TrickleState {
    released: HashSet<(u32, u64)>,
    arrivals: Vec<(u32, u64, u32)>,
    complete: bool,
    requested: HashSet<(u32, u64)>,
    /// Requests for a page already asked for (the daemon must ask once).
    repeated: u64,
}

impl Trickle {
    fn new(images: Arc<ImagePageSource>, rtt: Duration) -> Arc<Trickle> {
        let (tx, rx) = std::sync::mpsc::channel::<(u32, u64)>();
        let t = Arc::new(Trickle {
            images,
            state: Mutex::new(TrickleState::default()),
            waker: Mutex::new(None),
            requests: Mutex::new(tx),
        });
        let me: Weak<Trickle> = Arc::downgrade(&t);
        // The priority stream: one request at a time, each answered after a round trip. Ends when the
        // source is dropped (the sender with it).
        std::thread::spawn(move || {
            while let Ok((pid, vaddr)) = rx.recv() {
                std::thread::sleep(rtt);
                match me.upgrade() {
                    Some(t) => t.release(pid, vaddr, 1),
                    None => return,
                }
            }
        });
        t
    }

    fn state(&self) -> MutexGuard<'_, TrickleState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self) {
        if let Some(w) = &*self.waker.lock().unwrap_or_else(|e| e.into_inner()) {
            w();
        }
    }

    fn release(&self, pid: u32, vaddr: u64, pages: u32) {
        {
            let mut st = self.state();
            for k in 0..u64::from(pages) {
                st.released.insert((pid, vaddr + k * 4096));
            }
            st.arrivals.push((pid, vaddr, pages));
        }
        self.wake();
    }

    /// The background stream: every lazy page, in runs of 64 in address order, one run per `every`;
    /// then complete.
    fn stream(self: &Arc<Self>, ranges: LazyRanges, every: Duration) -> std::thread::JoinHandle<()> {
        let me = self.clone();
        std::thread::spawn(move || {
            for (pid, rs) in ranges {
                for r in rs {
                    let mut a = r.start;
                    while a < r.end {
                        let n = ((r.end - a) / 4096).min(64) as u32;
                        me.release(pid, a, n);
                        a += u64::from(n) * 4096;
                        std::thread::sleep(every);
                    }
                }
            }
            me.state().complete = true;
            me.wake();
        })
    }
}

impl PageSource for Trickle {
    fn read_page(&self, pid: u32, vaddr: u64, out: &mut [u8]) -> bool {
        self.lookup(pid, vaddr, out) == Lookup::Page
    }

    fn lookup(&self, pid: u32, vaddr: u64, out: &mut [u8]) -> Lookup {
        {
            let st = self.state();
            if !st.complete && !st.released.contains(&(pid, vaddr)) {
                return Lookup::Pending;
            }
        }
        self.images.lookup(pid, vaddr, out)
    }

    fn request(&self, pid: u32, vaddr: u64) {
        let mut st = self.state();
        if !st.requested.insert((pid, vaddr)) {
            st.repeated += 1;
        }
        drop(st);
        let _ = self.requests.lock().unwrap_or_else(|e| e.into_inner()).send((pid, vaddr));
    }

    fn complete(&self) -> bool {
        self.state().complete
    }

    fn take_arrivals(&self) -> Vec<(u32, u64, u32)> {
        std::mem::take(&mut self.state().arrivals)
    }

    fn set_waker(&self, wake: Box<dyn Fn() + Send + Sync>) {
        *self.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(wake);
    }
}

#[test]
fn post_copy_restore_waits_for_pages_still_on_their_way() {
    const POST_MIB: u64 = 64;
    let started = Instant::now();
    let mut case = Case::new("post");
    let pid = case.start("mem", &["--mib", &POST_MIB.to_string(), "--seed", "5"]);
    let before = case.query();
    assert_eq!(before["checksum"], before["expected"], "workload before the dump: {before}");
    case.dump(pid);
    let (ranges, images, lazy_pages) = case.lazy_ranges();
    assert!(
        lazy_pages >= POST_MIB * 256,
        "CRIU marked {lazy_pages} pages lazy, fewer than the workload's {POST_MIB} MiB"
    );
    case.kill_originals();

    // Nothing is known when the restore starts; the stream begins at RSTF.
    let source = Trickle::new(images, Duration::from_micros(200));
    let (h, _, criu, _) = case.restore_lazily(ranges.clone(), source.clone());
    let stream = source.stream(ranges, Duration::from_millis(1));
    // The copy reads all its memory at once, far ahead of the stream: its faults wait for requests.
    let during = {
        let (workload, name, scratch) = (case.workload.clone(), case.name.clone(), case.base.join("during"));
        std::thread::spawn(move || query(&workload, &name, &scratch))
    };
    case.criu_exits(criu);
    let during = during.join().expect("query during the stream");
    let mid = h.progress();
    stream.join().expect("stream");
    let stats = done_within_30s(h).expect("every lazy page in place");

    assert_eq!(during["pid"].as_u64(), Some(pid as u64), "the copy has the original's pid");
    assert_eq!(during["checksum"], during["expected"], "the copy read wrong memory while pages were pending: {during}");
    std::thread::sleep(Duration::from_millis(200));
    let after = case.query();
    assert_eq!(after["checksum"], after["expected"], "after the stream: {after}");
    assert!(after["counter"].as_u64() > during["counter"].as_u64(), "the copy's counter does not advance");

    let st = source.state();
    assert!(stats.waited_faults > 0, "no fault waited for a pending page: {stats:?}");
    assert_eq!(st.repeated, 0, "a page was requested twice");
    assert!(st.requested.len() as u64 <= stats.waited_faults, "{} requests, {stats:?}", st.requested.len());
    assert!(stats.pushed_pages > 0, "nothing pushed: {stats:?}");
    assert!(
        stats.pushed_pages + stats.fault_pages + stats.zero_pages + stats.dropped_pages >= lazy_pages,
        "{lazy_pages} lazy pages, not all accounted for: {stats:?}"
    );
    eprintln!(
        "post-copy restore of {POST_MIB} MiB ({lazy_pages} lazy pages, streamed 64 pages/ms from RSTF, requests \
         answered after 200 us): faults {} ({} waited for a pending page, {} requests), pushed {}, zero {}; fault \
         latency p50 {:?} p99 {:?} max {:?}; push {:?}; when the query was done: {mid:?}",
        stats.faults,
        stats.waited_faults,
        st.requested.len(),
        stats.pushed_pages,
        stats.zero_pages,
        stats.fault_p50,
        stats.fault_p99,
        stats.fault_max,
        stats.push_elapsed,
    );
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
}
