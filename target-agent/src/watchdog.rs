//! A restored copy that still depends on this agent must not outlive the agent: one waiting, stopped,
//! for the source's commit would stay there holding its pids, and one whose memory is being filled in
//! through userfaultfd would, without the daemon, read zeros for the pages it has not received yet. The
//! watchdog is a small process that holds the read end of a pipe whose write end only the agent holds.
//! When the agent releases it (every page is in place), it exits; when the pipe closes without a release
//! (the agent died, or gave the copy up), it SIGKILLs the copy.
//!
//! It is armed before `criu restore` starts, so that an agent dying *during* the restore leaves nothing
//! either: the agent names the processes CRIU is to restore (`pstree.img`: CRIU gives each its pid from
//! there), and CRIU's own process names itself down the pipe between its fork and its exec
//! ([`Watchdog::announce`]). Fired, the watchdog kills those processes as they appear until that CRIU
//! has exited (CRIU gives a restore up when one of its tasks dies; after [`RESTORER_GRACE`] it is
//! killed too), then until none is left. It kills only processes that started after itself: a pid of
//! the list held by an older process (which makes CRIU's restore fail) is not the copy's.
//!
//! It is the agent's own executable run again ([`CHILD_ARG`], handled by [`child_main`] before anything
//! else in `main`), spawned without a fork of the agent's memory. A forked child that stays, as this one
//! did before, shares every page of the agent's heap copy-on-write for as long as it lives: during a
//! post-copy each first write of the agent to one of them then copied the page and flushed the other
//! core's TLB (perf, 2 GiB hybrid migration on the 2-core test VM: `do_wp_page` in the agent's runtime
//! threads while the copy was taking its memory), and the fork itself copied the page tables of the
//! agent's heap while the copy waited for Commit.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

/// The first argument that makes the agent's executable a watchdog ([`child_main`]); the pids of the
/// copy follow it.
pub const CHILD_ARG: &str = "--internal-watchdog";

/// How long a fired watchdog lets the restore's CRIU end on its own (it gives up once a task it restored
/// was killed) before it kills it too.
pub const RESTORER_GRACE: Duration = Duration::from_secs(10);
/// How long a fired watchdog goes on killing once CRIU is gone, until none of the copy is left.
const SWEEP_FOR: Duration = Duration::from_secs(5);
/// Between two sweeps.
const SWEEP_EVERY: Duration = Duration::from_millis(5);

/// What goes down the pipe ([`message`]), a tag then a pid: the copy no longer depends on the agent
/// (pid 0).
pub const RELEASE: u8 = b'R';
/// A process of the copy (to be restored, or restored).
pub const GUARD: u8 = b'P';
/// The `criu restore` that makes the copy.
pub const RESTORER: u8 = b'C';

/// One message to the watchdog: `tag`, then `pid` as a little-endian u32.
pub fn message(tag: u8, pid: u32) -> [u8; 5] {
    let p = pid.to_le_bytes();
    [tag, p[0], p[1], p[2], p[3]]
}

/// See the module doc.
pub struct Watchdog {
    write: Option<OwnedFd>,
    child: Child,
}

impl Watchdog {
    /// Starts the watchdog for the processes `pids` (more may be named later, [`Watchdog::guard`]):
    /// `program` (this agent's executable, `/proc/self/exe`) with [`CHILD_ARG`], the pipe as its stdin.
    pub fn arm(program: &Path, pids: &[u32]) -> std::io::Result<Watchdog> {
        // Close-on-exec: no other child of this agent (a CRIU another migration starts) may hold the
        // write end, or the agent's death would not close the pipe.
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let child = Command::new(program)
            .arg(CHILD_ARG)
            .args(pids.iter().map(|p| p.to_string()))
            .stdin(Stdio::from(read))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Watchdog { write: Some(write), child })
    }

    /// Names more processes of the copy.
    pub fn guard(&self, pids: &[u32]) -> std::io::Result<()> {
        pids.iter().try_for_each(|&p| self.send(GUARD, p))
    }

    /// For [`criu::RestoreRequest::announce`]: the restore's CRIU names itself to this watchdog.
    pub fn announce(&self) -> Option<(std::os::fd::RawFd, u8)> {
        Some((self.write.as_ref()?.as_raw_fd(), RESTORER))
    }

    fn send(&self, tag: u8, pid: u32) -> std::io::Result<()> {
        let w = self.write.as_ref().ok_or_else(|| std::io::Error::other("the watchdog was released"))?;
        let m = message(tag, pid);
        // Under PIPE_BUF: one write, whole; the watchdog reads as they come, so the pipe never fills.
        match nix::unistd::write(w, &m) {
            Ok(5) => Ok(()),
            Ok(n) => Err(std::io::Error::other(format!("short write to the watchdog ({n} of 5 bytes)"))),
            Err(e) => Err(std::io::Error::other(format!("the watchdog is gone: {e}"))),
        }
    }

    /// The copy no longer depends on this agent: the watchdog exits without touching it.
    pub fn release(mut self) {
        let _ = self.send(RELEASE, 0);
        self.reap();
    }

    fn reap(&mut self) {
        self.write = None;
        let _ = self.child.wait();
    }
}

impl Drop for Watchdog {
    /// Not released: the watchdog kills the copy; this returns once it is done.
    fn drop(&mut self) {
        self.reap();
    }
}

/// The watchdog's side, when `args` (the executable's arguments after its name) start with
/// [`CHILD_ARG`]: reads what the agent sends until a release (then exits) or the end of the pipe (or any
/// error), then kills the copy (see the module doc): the pids given first and those named since. SIGTERM,
/// SIGINT and SIGHUP are ignored. None for other arguments (the agent itself).
pub fn child_main(args: &[OsString]) -> Option<std::convert::Infallible> {
    if args.first().map(OsString::as_os_str) != Some(OsStr::new(CHILD_ARG)) {
        return None;
    }
    let mut pids: Vec<u32> =
        args[1..].iter().filter_map(|a| a.to_str()?.parse::<u32>().ok()).filter(|&p| p > 0).collect();
    // A stop of the agent's whole service (systemd signals every process of its cgroup) must not take
    // the watchdog first: it waits for the pipe to close, and kills the copy then.
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: ignoring a signal installs no handler; nothing else in this process handles these.
        let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigIgn) };
    }
    // Nothing of the agent's but the pipe stays open in here (an inherited uffd or socket would outlive
    // the agent in this process).
    // SAFETY: closes fds this process owns and nothing in it uses (it has only just started, and
    // reads nothing but stdin from here on).
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    let born = criu::tree::started(std::process::id()).unwrap_or(0);
    let mut restorer: Option<OwnedFd> = None;
    let mut input = std::io::stdin().lock();
    let released = loop {
        let mut m = [0u8; 5];
        if input.read_exact(&mut m).is_err() {
            break false;
        }
        let pid = u32::from_le_bytes([m[1], m[2], m[3], m[4]]);
        match m[0] {
            RELEASE => break true,
            GUARD if pid > 0 => pids.push(pid),
            // Opened while CRIU cannot have been reaped yet (the agent waits for it only after it wrote
            // this), so the pidfd is that CRIU's even if the pid is taken over later.
            RESTORER if pid > 0 => restorer = criu::tree::pidfd(pid).ok().flatten(),
            _ => break false,
        }
    };
    if !released {
        put_down(&pids, born, restorer);
    }
    std::process::exit(0)
}

/// Kills the copy: every process of `pids` that started at or after `born`, again and again while the
/// restore's CRIU runs (it may still be making them), then until none is left.
fn put_down(pids: &[u32], born: u64, restorer: Option<OwnedFd>) {
    // How many of the copy's processes were alive at this look (each was sent SIGKILL).
    let sweep = || {
        let mut alive = 0;
        for &p in pids {
            let Ok(Some(fd)) = criu::tree::pidfd(p) else { continue };
            // An older process holds the pid: not one of the copy.
            if criu::tree::started(p).is_none_or(|t| t < born) || !criu::tree::is_alive(p) {
                continue;
            }
            if criu::tree::pidfd_kill(&fd).unwrap_or(false) {
                alive += 1;
            }
        }
        alive
    };
    if let Some(criu) = restorer {
        let give_up = Instant::now() + RESTORER_GRACE;
        loop {
            sweep();
            if criu::tree::pidfd_exited(&criu, SWEEP_EVERY) {
                break;
            }
            let now = Instant::now();
            if now >= give_up + SWEEP_FOR {
                break; // Killed, and still not gone: stuck in the kernel. The last sweeps follow.
            }
            if now >= give_up {
                let _ = criu::tree::pidfd_kill(&criu);
            }
        }
    }
    let deadline = Instant::now() + SWEEP_FOR;
    while sweep() > 0 && Instant::now() < deadline {
        std::thread::sleep(SWEEP_EVERY);
    }
}
