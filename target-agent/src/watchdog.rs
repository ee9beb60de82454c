//! A restored copy that still depends on this agent must not outlive the agent: one waiting, stopped,
//! for the source's commit would stay there holding its pids, and one whose memory is being filled in
//! through userfaultfd would, without the daemon, read zeros for the pages it has not received yet. The watchdog is a small process that holds the read end of a pipe whose write end
//! only the agent holds. When the agent releases it (every page is in place), it exits; when the pipe
//! closes without a release (the agent died, or gave the copy up), it SIGKILLs the copy.
//!
//! It is the agent's own executable run again ([`CHILD_ARG`], handled by [`child_main`] before anything
//! else in `main`), spawned without a fork of the agent's memory. A forked child that stays, as this one
//! did before, shares every page of the agent's heap copy-on-write for as long as it lives: during a
//! post-copy each first write of the agent to one of them then copied the page and flushed the other
//! core's TLB (perf, 2 GiB hybrid migration on the 2-core test VM: `do_wp_page` in the agent's runtime
//! threads while the copy was taking its memory), and the fork itself copied the page tables of the
//! agent's heap while the copy waited for Commit.

use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use nix::sys::signal::Signal;

/// The first argument that makes the agent's executable a watchdog ([`child_main`]); the pids of the
/// copy follow it.
pub const CHILD_ARG: &str = "--internal-watchdog";

/// See the module doc.
pub struct Watchdog {
    write: Option<OwnedFd>,
    child: Child,
}

impl Watchdog {
    /// Starts the watchdog for the processes `pids`: `program` (this agent's executable,
    /// `/proc/self/exe`) with [`CHILD_ARG`], the pipe as its stdin.
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

    /// The copy no longer depends on this agent: the watchdog exits without touching it.
    pub fn release(mut self) {
        if let Some(w) = self.write.take() {
            let _ = nix::unistd::write(&w, &[1]);
        }
        self.reap();
    }

    fn reap(&mut self) {
        self.write = None;
        let _ = self.child.wait();
    }
}

impl Drop for Watchdog {
    /// Not released: the watchdog kills the copy.
    fn drop(&mut self) {
        self.reap();
    }
}

/// The watchdog's side, when `args` (the executable's arguments after its name) start with
/// [`CHILD_ARG`]: waits for one byte on stdin and exits; at end of file (or any error) SIGKILLs every
/// pid given first. SIGTERM, SIGINT and SIGHUP are ignored. None for other arguments (the agent itself).
pub fn child_main(args: &[OsString]) -> Option<std::convert::Infallible> {
    if args.first().map(OsString::as_os_str) != Some(OsStr::new(CHILD_ARG)) {
        return None;
    }
    let pids: Vec<nix::unistd::Pid> = args[1..]
        .iter()
        .filter_map(|a| a.to_str()?.parse::<i32>().ok())
        .filter(|&p| p > 0)
        .map(nix::unistd::Pid::from_raw)
        .collect();
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
    let mut b = [0u8; 1];
    let released = loop {
        match nix::unistd::read(std::io::stdin(), &mut b) {
            Ok(1) => break true,
            Err(nix::errno::Errno::EINTR) => continue,
            _ => break false,
        }
    };
    if !released {
        for &p in &pids {
            let _ = nix::sys::signal::kill(p, Signal::SIGKILL);
        }
    }
    std::process::exit(0)
}
