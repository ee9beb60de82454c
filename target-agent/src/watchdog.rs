//! A restored copy that still depends on this agent (its memory is being filled in through
//! userfaultfd) must not outlive the agent: without the daemon, the pages it has not received yet would
//! read as zeros. The watchdog is a process forked from the agent that holds the read end of a pipe
//! whose write end only the agent holds. When the agent releases it (every page is in place), it exits;
//! when the pipe closes without a release (the agent died, or gave the copy up), it SIGKILLs the copy.
//!
//! The child runs only async-signal-safe calls (close, dup2, read, kill, _exit) on memory prepared
//! before the fork, as POSIX requires of a child of a multi-threaded process.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::unistd::{ForkResult, Pid};

/// See the module doc.
pub struct Watchdog {
    write: Option<OwnedFd>,
    child: Pid,
}

impl Watchdog {
    /// Forks the watchdog for the processes `pids`.
    pub fn arm(pids: &[u32]) -> std::io::Result<Watchdog> {
        let targets: Vec<libc::pid_t> = pids.iter().map(|&p| p as libc::pid_t).collect();
        let (read, write) = nix::unistd::pipe()?;
        let (r, w) = (read.as_raw_fd(), write.as_raw_fd());
        // SAFETY: the child only makes async-signal-safe calls on `targets` and the two fds, all
        // prepared before the fork, and never returns (it ends with _exit).
        match unsafe { nix::unistd::fork() }? {
            ForkResult::Child => {
                // SAFETY: plain syscalls on fds and pids owned by this process; see above.
                unsafe {
                    libc::close(w);
                    // Keep only the pipe, as fd 3: the agent's other fds (its sockets, the uffds) must
                    // not stay open in here.
                    if r != 3 {
                        libc::dup2(r, 3);
                    }
                    libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
                    let mut b = 0u8;
                    loop {
                        let n = libc::read(3, (&mut b as *mut u8).cast(), 1);
                        if n == 1 {
                            libc::_exit(0);
                        }
                        if n < 0 && *libc::__errno_location() == libc::EINTR {
                            continue;
                        }
                        for &p in &targets {
                            libc::kill(p, libc::SIGKILL);
                        }
                        libc::_exit(0);
                    }
                }
            }
            ForkResult::Parent { child } => {
                drop(read);
                Ok(Watchdog { write: Some(write), child })
            }
        }
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
        let _ = nix::sys::wait::waitpid(self.child, None);
    }
}

impl Drop for Watchdog {
    /// Not released: the watchdog kills the copy.
    fn drop(&mut self) {
        self.reap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: u32) -> bool {
        criu::tree::is_alive(pid)
    }

    #[test]
    fn released_spares_and_dropped_kills() {
        let mut a = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let mut b = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        Watchdog::arm(&[a.id()]).unwrap().release();
        assert!(alive(a.id()), "a released watchdog killed the copy");
        drop(Watchdog::arm(&[b.id()]).unwrap());
        let status = b.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
        a.kill().unwrap();
        a.wait().unwrap();
    }

    /// The agent dying is the watchdog's reason to be: a child process arms it and is SIGKILLed.
    #[test]
    fn the_agent_dying_kills_the_copy() {
        let mut copy = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let target = copy.id();
        // SAFETY: the child only arms the watchdog and then waits to be killed; the test process is
        // multi-threaded, but the child runs no other thread's code and never returns.
        match unsafe { nix::unistd::fork() }.unwrap() {
            ForkResult::Child => {
                let w = Watchdog::arm(&[target]);
                std::mem::forget(w);
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
            ForkResult::Parent { child } => {
                std::thread::sleep(std::time::Duration::from_millis(300));
                assert!(alive(target));
                nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL).unwrap();
                nix::sys::wait::waitpid(child, None).unwrap();
                let status = copy.wait().unwrap();
                assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
            }
        }
    }
}
