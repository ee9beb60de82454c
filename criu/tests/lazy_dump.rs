//! `criu dump --lazy-pages` through [`criu::Criu::dump_lazy`], on real processes holding 64 MiB of known
//! memory. These need root and CRIU (>= 4.1) and fail, never skip, without them. Each test starts its own
//! helper (a `python3` in its own session, stdio on /dev/null) and kills it at the end, also on failure.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criu::images::{PAGE_SIZE, read_pagemap};
use criu::{CriuError, DumpRequest, LazyMemory, PS_IOV_ADD_F, PsIov};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 64;
mod common;
use common::{require_criu, wait_for};

/// Bound on every CRIU call here (each takes well under a second on this VM).
const STEP: Duration = Duration::from_secs(60);

/// Fills 64 MiB with a seeded pattern, then writes its sha256 to DIR/sum at start and on each SIGUSR1
/// (so the answer proves that the process runs and reads its whole memory), and its pid to DIR/pid.
const HELPER: &str = r#"
import hashlib, os, random, signal, sys
d = sys.argv[1]
buf = bytearray(random.Random(42).randbytes(int(sys.argv[2]) << 20))
def put(name, text):
    with open(os.path.join(d, name + ".tmp"), "w") as f:
        f.write(text)
    os.rename(os.path.join(d, name + ".tmp"), os.path.join(d, name))
def report():
    put("sum", hashlib.sha256(buf).hexdigest())
# SIGUSR1 stays blocked and is taken with sigwait: a handler + pause() loop loses a signal that lands
# between two pause() calls, which is where a process resumed after a dump often is.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
report()
put("pid", str(os.getpid()))
while True:
    signal.sigwait({signal.SIGUSR1})
    report()
"#;

fn python() -> PathBuf {
    ["/usr/bin/python3", "/usr/local/bin/python3"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| {
            std::env::var_os("PATH")
                .and_then(|path| std::env::split_paths(&path).map(|d| d.join("python3")).find(|p| p.is_file()))
        })
        .expect("these tests need python3 for their helper process (deploy/install.sh installs it)")
}

/// A helper process: session leader, no tty, 64 MiB of known memory. Killed on drop.
struct Helper {
    pid: u32,
    dir: tempfile::TempDir,
    child: std::process::Child,
}

impl Helper {
    fn start() -> Helper {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("helper.py"), HELPER).expect("write helper");
        let mut cmd = std::process::Command::new(python());
        cmd.arg(dir.path().join("helper.py"))
            .arg(dir.path())
            .arg(MIB.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: setsid is async-signal-safe; CRIU dumps only trees whose root leads its own session
        // (without --shell-job).
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn the python helper");
        let mut helper = Helper { pid: child.id(), dir, child };
        let pid: u32 = wait_for(Duration::from_secs(30), "the helper's pid file", || {
            std::fs::read_to_string(helper.dir.path().join("pid")).ok()?.trim().parse().ok()
        });
        assert_eq!(pid, helper.pid, "the helper is the spawned process itself");
        helper.pid = pid;
        helper
    }

    fn images(&self) -> PathBuf {
        let d = self.dir.path().join("images");
        std::fs::create_dir_all(&d).expect("images dir");
        d
    }

    /// The sha256 of its 64 MiB, computed by the helper itself now (it must be running).
    fn checksum(&self) -> String {
        let sum = self.dir.path().join("sum");
        let _ = std::fs::remove_file(&sum);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), nix::sys::signal::Signal::SIGUSR1)
            .expect("SIGUSR1 to the helper");
        wait_for(Duration::from_secs(10), "the helper's checksum", || std::fs::read_to_string(&sum).ok())
    }

    fn initial_checksum(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sum")).expect("the helper wrote its checksum at start")
    }

    fn state(&self) -> Option<char> {
        criu::tree::state(self.pid)
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = criu::tree::kill_all(&[self.pid], std::time::Duration::from_secs(10));
        let _ = self.child.wait();
    }
}

fn request(helper: &Helper) -> DumpRequest {
    DumpRequest { pid: helper.pid, images_dir: helper.images(), externals: vec![] }
}

fn pages_files_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("images dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("pages-"))
        .map(|e| e.metadata().expect("metadata").len())
        .sum()
}

/// Waits until the helper is stopped (`T`). CRIU leaves a SIGSTOP pending and detaches, so right after
/// it the state may read `R` for a moment while the task takes that signal (no user code runs then); a
/// tree CRIU resumed instead never gets there, and the failure shows CRIU's log.
fn wait_stopped(helper: &Helper, log: &Path) {
    let until = Instant::now() + Duration::from_secs(10);
    while helper.state() != Some('T') {
        assert!(
            Instant::now() < until,
            "the helper is {:?}, not stopped; dump.log errors: {}",
            helper.state(),
            criu::log_errors(log)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Resumes the helper and checks that it runs and that its memory is what it was.
fn resume_and_check(helper: &Helper) {
    criu::tree::resume(&[helper.pid]).expect("SIGCONT");
    wait_for(Duration::from_secs(10), "the helper to run again", || match helper.state() {
        Some('T' | 't') => None,
        s => Some(s),
    });
    assert!(criu::tree::is_alive(helper.pid), "the helper died");
    assert_eq!(helper.checksum(), helper.initial_checksum(), "the helper's memory changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_dump_keeps_private_memory_in_the_frozen_tree_and_finish_leaves_it_stopped() {
    let criu = require_criu();
    let helper = Helper::start();
    let req = request(&helper);
    let before = std::time::Instant::now();
    let watch = criu::tree::StopWatch::start(helper.pid);
    let mut lazy = tokio::time::timeout(STEP, criu.dump_lazy(&req, LazyMemory::Served))
        .await
        .expect("dump_lazy timed out")
        .expect("dump_lazy");
    let ready = std::time::Instant::now();
    assert_eq!(lazy.pid(), helper.pid);
    // The freeze began while CRIU ran, before its images were ready.
    let froze = watch.stopped_at().expect("the freeze was seen");
    assert!(before <= froze && froze <= ready, "froze {froze:?}, dump from {before:?} to {ready:?}");
    // Frozen by CRIU (ptrace stop) while its page server holds the memory.
    assert_eq!(helper.state(), Some('t'), "frozen during the lazy session");

    // The images are written, and the 64 MiB are lazy: in the pagemap, not in the pages file.
    let pagemap = read_pagemap(&req.images_dir.join(format!("pagemap-{}.img", helper.pid))).expect("pagemap");
    let lazy_bytes = pagemap.lazy_pages() * PAGE_SIZE;
    assert!(lazy_bytes >= (MIB - 1) << 20, "only {lazy_bytes} bytes are lazy");
    let pages_bytes = pages_files_bytes(&req.images_dir);
    assert!(pages_bytes < 16 << 20, "pages-*.img hold {pages_bytes} bytes: the memory was dumped, not left lazy");
    for name in ["inventory.img", "pstree.img", "core-{}.img", "mm-{}.img"] {
        let name = name.replace("{}", &helper.pid.to_string());
        assert!(req.images_dir.join(&name).is_file(), "{name} is missing");
    }

    // CRIU serves those pages on the session we hold: one GET, checked against the frozen memory.
    let start = pagemap.lazy_ranges().into_iter().max_by_key(|r| r.end - r.start).expect("a lazy range").start;
    let layout = lazy.layout();
    let session = lazy.page_server();
    session.write_all(&PsIov::get(helper.pid, start, 16).encode(layout)).await.expect("send GET");
    let mut head = vec![0u8; layout.size()];
    tokio::time::timeout(STEP, session.read_exact(&mut head)).await.expect("GET reply timed out").expect("GET reply");
    let reply = PsIov::decode(layout, &head).expect("a header");
    assert_eq!(
        (reply.command(), reply.flags(), reply.vaddr, reply.dst_id),
        (PS_IOV_ADD_F, 4, start, helper.pid as u64)
    );
    assert!((1..=16).contains(&reply.nr_pages), "{reply:?}");
    let mut pages = vec![0u8; (reply.nr_pages * PAGE_SIZE) as usize];
    session.read_exact(&mut pages).await.expect("GET data");
    let mut mem = vec![0u8; pages.len()];
    std::fs::File::open(format!("/proc/{}/mem", helper.pid))
        .and_then(|f| f.read_exact_at(&mut mem, start))
        .expect("read /proc/PID/mem");
    assert!(pages == mem, "the served pages differ from the frozen memory");

    let dumped_in = lazy.dumped_in();
    let ran = tokio::time::timeout(STEP, lazy.finish()).await.expect("finish timed out").expect("finish");
    assert!(ran.elapsed >= dumped_in);
    // --leave-stopped: stopped (T), not running, not killed.
    wait_stopped(&helper, &req.images_dir.join("dump.log"));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(helper.state(), Some('T'), "still stopped");
    assert_eq!(criu::log_errors(&req.images_dir.join("dump.log")), "", "CRIU logged errors");
    resume_and_check(&helper);
}

/// Bytes held in the pipes of the `criu dump` working on `images` (each pipe once), read with FIONREAD
/// on a reader of each pipe opened through /proc/CRIU/fd.
fn criu_pipe_bytes(images: &Path) -> u64 {
    let dir = images.to_string_lossy().into_owned();
    let criu = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            args.get(1) == Some(&b"dump".as_slice()) && args.contains(&dir.as_bytes())
        })
        .expect("the criu dump of these images");
    let mut seen = std::collections::HashSet::new();
    let mut bytes = 0u64;
    for fd in std::fs::read_dir(format!("/proc/{criu}/fd")).expect("CRIU's fds").flatten() {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        if !target.to_string_lossy().starts_with("pipe:") || !seen.insert(target) {
            continue;
        }
        let pipe = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fd.path())
            .expect("a reader on CRIU's pipe");
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int into `n`, which outlives the call.
        let r = unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &mut n) };
        assert_eq!(r, 0, "FIONREAD: {}", std::io::Error::last_os_error());
        bytes += n as u64;
    }
    bytes
}

/// With the patched CRIU, `LazyMemory::InPlace` leaves the lazy pages in the stopped tree instead of
/// collecting them into CRIU's page pipes during the freeze (deploy/criu-patches/0002); `Served`
/// collects them for the page server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_place_lazy_dump_leaves_the_lazy_pages_out_of_criu_s_pipes() {
    let criu = require_criu();
    let helper = Helper::start();
    let mut held = Vec::new();
    for memory in [LazyMemory::Served, LazyMemory::InPlace] {
        let req = request(&helper);
        let lazy = tokio::time::timeout(STEP, criu.dump_lazy(&req, memory))
            .await
            .expect("dump_lazy timed out")
            .expect("dump_lazy");
        assert_eq!(lazy.in_place(), memory == LazyMemory::InPlace, "{memory:?} with {criu:?}");
        let pagemap = read_pagemap(&req.images_dir.join(format!("pagemap-{}.img", helper.pid))).expect("pagemap");
        assert!(pagemap.lazy_pages() * PAGE_SIZE >= (MIB - 1) << 20, "{memory:?}: the memory is not lazy");
        held.push((memory, criu_pipe_bytes(&req.images_dir)));
        tokio::time::timeout(STEP, lazy.finish()).await.expect("finish timed out").expect("finish");
        wait_stopped(&helper, &req.images_dir.join("dump.log"));
        resume_and_check(&helper);
        std::fs::remove_dir_all(&req.images_dir).expect("clear the images");
    }
    assert!(held[0].1 >= (MIB - 1) << 20, "CRIU's pipes: {held:?}");
    assert!(held[1].1 < 1 << 20, "CRIU's pipes: {held:?}");
}

/// CRIU's page server has nothing to serve after an in-place dump: a GET fails the transfer (CRIU then
/// resumes the tree) instead of waiting forever on an empty pipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_from_an_in_place_lazy_dump_fails_and_criu_resumes_the_tree() {
    let criu = require_criu();
    let helper = Helper::start();
    let req = request(&helper);
    let mut lazy = tokio::time::timeout(STEP, criu.dump_lazy(&req, LazyMemory::InPlace))
        .await
        .expect("dump_lazy timed out")
        .expect("dump_lazy");
    assert!(lazy.in_place());
    let pagemap = read_pagemap(&req.images_dir.join(format!("pagemap-{}.img", helper.pid))).expect("pagemap");
    let start = pagemap.lazy_ranges().into_iter().max_by_key(|r| r.end - r.start).expect("a lazy range").start;
    let layout = lazy.layout();
    let session = lazy.page_server();
    session.write_all(&PsIov::get(helper.pid, start, 16).encode(layout)).await.expect("send GET");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(STEP, session.read_to_end(&mut rest)).await.expect("CRIU kept the session open");
    assert!(read.is_err() || rest.is_empty(), "CRIU answered {} bytes", rest.len());
    let log = req.images_dir.join("dump.log");
    let errors = wait_for(Duration::from_secs(30), "CRIU to fail the transfer", || {
        let e = criu::log_errors(&log);
        e.contains("Dumping FAILED").then_some(e)
    });
    assert!(errors.contains("--lazy-pages-in-place"), "{errors}");
    drop(lazy);
    assert_let_go(&helper, "a GET from an in-place dump");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_lazy_dump_closes_the_session_and_leaves_the_tree_stopped() {
    let criu = require_criu();
    let helper = Helper::start();
    let req = request(&helper);
    let lazy = tokio::time::timeout(STEP, criu.dump_lazy(&req, LazyMemory::InPlace))
        .await
        .expect("dump_lazy timed out")
        .expect("dump_lazy");
    drop(lazy);
    // CRIU exits on its own after the CLOSE; the tree goes from `t` (CRIU's) to `T` (stopped).
    wait_stopped(&helper, &req.images_dir.join("dump.log"));
    assert_eq!(criu::log_errors(&req.images_dir.join("dump.log")), "", "CRIU logged errors");
    resume_and_check(&helper);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_lazy_dump_makes_criu_resume_the_tree() {
    let criu = require_criu();
    let helper = Helper::start();
    let req = request(&helper);
    // The future is dropped while it waits for CRIU to get ready (CRIU was spawned on its first poll).
    let cancelled = tokio::time::timeout(Duration::from_millis(1), criu.dump_lazy(&req, LazyMemory::InPlace)).await;
    assert!(cancelled.is_err(), "a lazy dump of 64 MiB cannot be ready within 1 ms");
    let log = req.images_dir.join("dump.log");
    let errors = wait_for(Duration::from_secs(30), "CRIU to fail the abandoned transfer", || {
        let e = criu::log_errors(&log);
        e.contains("Dumping FAILED").then_some(e)
    });
    assert!(errors.contains("Lazy pages transfer FAILED"), "{errors}");
    assert_let_go(&helper, "an abandoned dump");
}

/// CRIU resumed the helper (running or sleeping, never stopped), with its memory unchanged.
fn assert_let_go(helper: &Helper, after: &str) {
    let state = wait_for(Duration::from_secs(10), "CRIU to let the tree go", || match helper.state() {
        Some('t') => None,
        s => Some(s),
    });
    assert!(matches!(state, Some('S' | 'R')), "state {state:?} after {after}");
    assert_eq!(helper.checksum(), helper.initial_checksum(), "the helper's memory changed");
}

#[tokio::test]
async fn a_lazy_dump_that_fails_before_ready_carries_the_log_errors() {
    let criu = require_criu();
    let dir = tempfile::tempdir().expect("tempdir");
    // A pid that was just freed: CRIU fails before anything is frozen.
    let mut gone = std::process::Command::new("true").spawn().expect("spawn true");
    gone.wait().expect("wait true");
    let req = DumpRequest { pid: gone.id(), images_dir: dir.path().to_owned(), externals: vec![] };
    let started = Instant::now();
    let err = tokio::time::timeout(STEP, criu.dump_lazy(&req, LazyMemory::InPlace)).await.expect("dump_lazy timed out");
    match err {
        Err(CriuError::Failed { op, status, errors, command, .. }) => {
            assert_eq!(op, "dump");
            assert!(status.starts_with("exit status"), "{status}");
            assert!(!errors.is_empty(), "no error lines from dump.log");
            assert!(command.contains("--lazy-pages") && command.contains("--status-fd"), "{command}");
        }
        other => panic!("expected CriuError::Failed, got {other:?}"),
    }
    assert!(started.elapsed() < criu::LAZY_READY_TIMEOUT, "it waited for the timeout instead of noticing CRIU's exit");
}

/// The agent that started a lazy dump died after CRIU got ready and before it connected: CRIU waits in
/// accept() with the tree frozen. `release_orphaned_lazy_dump`, given that CRIU's command line (as a
/// restarted agent reads it from /proc), resets its session: CRIU fails the transfer and resumes the tree.
#[tokio::test]
async fn an_orphaned_ready_lazy_dump_is_released_by_its_command_line() {
    let criu = require_criu();
    let helper = Helper::start();
    let images = helper.images();
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    // The status pipe: CRIU writes one byte once its page server listens (as in Criu::dump_lazy).
    let (rx, tx) = nix::unistd::pipe().expect("pipe");
    let status_fd = std::os::fd::AsRawFd::as_raw_fd(&tx);
    let mut cmd = std::process::Command::new(&criu.bin);
    cmd.args(["dump", "--tree", &helper.pid.to_string(), "--images-dir"])
        .arg(&images)
        .args(["--leave-stopped", "--log-file", "dump.log", "-v2", "--lazy-pages", "--address", "127.0.0.1"])
        .args(["--port", &port.to_string(), "--status-fd", &status_fd.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: fcntl is async-signal-safe; it clears close-on-exec on the status pipe's write end in the
    // child only.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(status_fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("criu dump --lazy-pages");
    drop(tx);
    let mut byte = [0u8; 1];
    let read = tokio::task::spawn_blocking(move || std::io::Read::read(&mut std::fs::File::from(rx), &mut byte))
        .await
        .expect("reader");
    assert!(matches!(read, Ok(1)), "CRIU never got ready: {read:?}; {}", criu::log_errors(&images.join("dump.log")));
    // Ready, nobody connected: frozen, and it stays so.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(helper.state(), Some('t'), "the tree is not held by CRIU");
    assert!(child.try_wait().expect("criu").is_none(), "CRIU ended without a page-server session");

    let cmdline = std::fs::read(format!("/proc/{}/cmdline", child.id())).expect("CRIU's command line");
    assert!(!criu::release_orphaned_lazy_dump(b"sleep\x00300\x00"), "another command line");
    assert!(criu::release_orphaned_lazy_dump(&cmdline), "could not reach the orphaned dump's page server");
    let status = wait_for(Duration::from_secs(30), "CRIU to end", || child.try_wait().expect("criu"));
    assert!(!status.success(), "CRIU took the reset for a clean end");
    let errors = criu::log_errors(&images.join("dump.log"));
    assert!(errors.contains("Lazy pages transfer FAILED"), "{errors}");
    assert_let_go(&helper, "the release");
}
