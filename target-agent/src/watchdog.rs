//! A restored copy that still depends on this agent must not outlive the agent: one waiting, stopped,
//! for the source's commit would stay there holding its pids, and one whose memory is being filled in
//! through userfaultfd would, without the daemon, read zeros for the pages it has not received yet. The
//! watchdog is a small process that holds the read end of a pipe whose write end only the agent holds
//! (and, between its fork and its exec, the restore's CRIU). When the agent releases it (the copy may
//! live on its own), it exits; when the pipe closes without a release (the agent died, or gave the copy
//! up), it kills the copy.
//!
//! It starts before `criu restore`, so that an agent dying *during* the restore leaves nothing either.
//! What it is told, in order ([`message`]):
//! - the pids CRIU is to restore ([`EXPECT`], from `pstree.img`: CRIU gives each process its pid from
//!   there). Only a guess until CRIU has run: such a pid counts as the copy's only when the process
//!   holding it started no earlier than that CRIU;
//! - the restore's CRIU ([`RESTORER`]), which names itself between its fork and its exec
//!   ([`Watchdog::announce`]), so that an agent dying right after the spawn loses nothing;
//! - once CRIU has returned ([`Watchdog::settle`]): forget the guesses ([`SETTLED`]); the processes it
//!   restored ([`GUARD`]), each taken as a pidfd at once, so that a pid freed later and taken over by
//!   another process is never hit. After a failed restore that list is empty: CRIU kills what it made.
//!
//! Fired, it kills the guessed processes as they appear until that CRIU has exited (CRIU gives a
//! restore up when one of its tasks dies; after [`RESTORER_GRACE`] it is killed too), then every
//! process of the copy and their descendants (children the copy forked while it ran) until none is
//! left, or [`SWEEP_FOR`] has passed.
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

/// The argument that makes the agent's executable a watchdog ([`child_main`]).
pub const CHILD_ARG: &str = "--internal-watchdog";

/// How long a fired watchdog lets the restore's CRIU end on its own (it gives up once a task it restored
/// was killed) before it kills it too.
pub const RESTORER_GRACE: Duration = Duration::from_secs(10);
/// How long a fired watchdog goes on killing once CRIU is gone, until none of the copy is left.
pub const SWEEP_FOR: Duration = Duration::from_secs(5);
/// Between two sweeps.
const SWEEP_EVERY: Duration = Duration::from_millis(5);

/// The copy no longer depends on the agent (pid 0).
pub const RELEASE: u8 = b'R';
/// A pid CRIU is to restore.
pub const EXPECT: u8 = b'E';
/// The `criu restore` that makes the copy.
pub const RESTORER: u8 = b'C';
/// CRIU has returned: the pids expected are forgotten (pid 0).
pub const SETTLED: u8 = b'S';
/// A process of the copy, alive.
pub const GUARD: u8 = b'P';

/// One message to the watchdog: `tag`, then `pid` as a little-endian u32.
pub fn message(tag: u8, pid: u32) -> [u8; 5] {
    let p = pid.to_le_bytes();
    [tag, p[0], p[1], p[2], p[3]]
}

/// See the module doc.
pub struct Watchdog {
    write: Option<OwnedFd>,
    /// Until reaped.
    child: Option<Child>,
}

impl Watchdog {
    /// Starts a watchdog, told nothing yet: `program` (this agent's executable, `/proc/self/exe`) with
    /// [`CHILD_ARG`], the pipe as its stdin.
    pub fn arm(program: &Path) -> std::io::Result<Watchdog> {
        // Close-on-exec: no other child of this agent (a CRIU another migration starts) may hold the
        // write end, or the agent's death would not close the pipe.
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let child = Command::new(program)
            .arg(CHILD_ARG)
            .stdin(Stdio::from(read))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Watchdog { write: Some(write), child: Some(child) })
    }

    /// Names the pids a restore about to start is to give its processes ([`EXPECT`]).
    pub fn expect(&self, pids: &[u32]) -> std::io::Result<()> {
        pids.iter().try_for_each(|&p| self.send(EXPECT, p))
    }

    /// For [`criu::RestoreRequest::announce`]: the restore's CRIU names itself to this watchdog.
    pub fn announce(&self) -> Option<(std::os::fd::RawFd, u8)> {
        Some((self.write.as_ref()?.as_raw_fd(), RESTORER))
    }

    /// The restore's CRIU has returned, and `pids` are the processes it restored (none if it failed):
    /// they replace the pids expected.
    pub fn settle(&self, pids: &[u32]) -> std::io::Result<()> {
        self.send(SETTLED, 0)?;
        pids.iter().try_for_each(|&p| self.send(GUARD, p))
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

    /// Closes the pipe and waits for the watchdog: at once when released, else once it has killed the
    /// copy (at most [`RESTORER_GRACE`] and twice [`SWEEP_FOR`]; on a runtime's worker thread, that
    /// worker's other tasks move to another one meanwhile).
    fn reap(&mut self) {
        self.write = None;
        let Some(mut child) = self.child.take() else { return };
        let status = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| child.wait())
            }
            _ => child.wait(),
        };
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => tracing::error!(
                "the watchdog could not kill the whole copy ({s}): look for its processes with ps and kill them"
            ),
            Err(e) => tracing::error!("waiting for the watchdog: {e}"),
        }
    }
}

impl Drop for Watchdog {
    /// Not released: the watchdog kills the copy; this returns once it is done.
    fn drop(&mut self) {
        self.reap();
    }
}

/// What a watchdog was told.
#[derive(Default)]
struct Told {
    /// [`EXPECT`]ed pids, until [`SETTLED`].
    expected: Vec<u32>,
    /// The restore's CRIU and when it started (clock ticks since boot).
    restorer: Option<(OwnedFd, u64)>,
    /// Processes of the copy ([`GUARD`]), as pidfds taken when named.
    guarded: Vec<(u32, OwnedFd)>,
}

impl Told {
    fn guard(&mut self, pid: u32) {
        if let Ok(Some(fd)) = criu::tree::pidfd(pid) {
            self.guarded.push((pid, fd));
        }
    }
}

/// The watchdog's side, when `args` (the executable's arguments after its name) start with
/// [`CHILD_ARG`]: reads what the agent sends until a release (then exits 0) or the end of the pipe (or
/// any error), then kills the copy (see the module doc) and exits 0 once none of it is left, 1 if some
/// still was when it gave up. SIGTERM, SIGINT and SIGHUP are ignored. None for other arguments (the
/// agent itself).
pub fn child_main(args: &[OsString]) -> Option<std::convert::Infallible> {
    if args.first().map(OsString::as_os_str) != Some(OsStr::new(CHILD_ARG)) {
        return None;
    }
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
    let mut told = Told::default();
    let mut input = std::io::stdin().lock();
    let released = loop {
        let mut m = [0u8; 5];
        if input.read_exact(&mut m).is_err() {
            break false;
        }
        let pid = u32::from_le_bytes([m[1], m[2], m[3], m[4]]);
        match m[0] {
            RELEASE => break true,
            EXPECT if pid > 0 => told.expected.push(pid),
            // This comes right after CRIU's fork, and a CRIU runs for tens of ms at least; its pid could
            // be another process's only once CRIU was reaped and pids wrapped around. When it started
            // is read while the pidfd shows it alive, so that both are the same process's.
            RESTORER if pid > 0 => {
                told.restorer = criu::tree::pidfd(pid).ok().flatten().and_then(|fd| {
                    let started = criu::tree::started(pid)?;
                    (!criu::tree::pidfd_exited(&fd, Duration::ZERO)).then_some((fd, started))
                })
            }
            SETTLED => told.expected.clear(),
            GUARD if pid > 0 => told.guard(pid),
            _ => break false,
        }
    };
    if released {
        std::process::exit(0);
    }
    std::process::exit(if put_down(&told) { 0 } else { 1 })
}

/// SIGKILL to `pid` and its descendants, deepest first (so that none is reparented out of reach), each
/// through a pidfd and only if it started no earlier than `since` (clock ticks). How many were alive.
fn kill_tree(pid: u32, since: u64) -> usize {
    let tree = criu::tree::processes(pid).unwrap_or_else(|_| vec![pid]);
    let mut alive = 0;
    for &p in tree.iter().rev() {
        let Ok(Some(fd)) = criu::tree::pidfd(p) else { continue };
        if criu::tree::started(p).is_none_or(|t| t < since) || !criu::tree::is_alive(p) {
            continue;
        }
        if criu::tree::pidfd_kill(&fd).unwrap_or(false) {
            alive += 1;
        }
    }
    alive
}

/// Kills the copy (see the module doc); true once none of it is left.
fn put_down(told: &Told) -> bool {
    // How many of the copy's processes were alive at this look (each was sent SIGKILL).
    let sweep = || {
        let mut alive = 0;
        if let Some((_, since)) = &told.restorer {
            // Pids expected are the copy's only as CRIU's processes: younger than CRIU.
            alive += told.expected.iter().map(|&p| kill_tree(p, *since)).sum::<usize>();
        }
        for (p, fd) in &told.guarded {
            if !criu::tree::pidfd_exited(fd, Duration::ZERO) {
                // Its descendants first, then it (through the pidfd taken while it was the copy's).
                let since = criu::tree::started(*p).unwrap_or(u64::MAX);
                kill_tree(*p, since);
                let _ = criu::tree::pidfd_kill(fd);
                alive += 1;
            }
        }
        alive
    };
    if let Some((criu, _)) = &told.restorer {
        let give_up = Instant::now() + RESTORER_GRACE;
        loop {
            sweep();
            if criu::tree::pidfd_exited(criu, SWEEP_EVERY) {
                break;
            }
            let now = Instant::now();
            if now >= give_up + SWEEP_FOR {
                break; // Killed, and still not gone: stuck in the kernel. The last sweeps follow.
            }
            if now >= give_up {
                let _ = criu::tree::pidfd_kill(criu);
            }
        }
    }
    let deadline = Instant::now() + SWEEP_FOR;
    loop {
        if sweep() == 0 {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(SWEEP_EVERY);
    }
}
