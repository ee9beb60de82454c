//! The process tree CRIU dumps and restores, seen through procfs: which processes belong to it, and the
//! two signals the agents send it (SIGCONT to resume a tree CRIU left stopped, SIGKILL to drop a copy).

use std::io;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// State letter of `pid` from /proc/PID/stat (R, S, D, T, t, Z, X, ...), or None if there is no such
/// process in this pid namespace.
pub fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm is in parentheses and may itself contain ") "; the state follows the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    after.trim_start().chars().next()
}

/// True when `pid` exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    matches!(state(pid), Some(s) if s != 'Z' && s != 'X')
}

/// Command name of `pid` (`/proc/PID/comm`), or "?".
pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).map(|s| s.trim().to_string()).unwrap_or_else(|_| "?".into())
}

/// `pid` and all its descendants (processes, not threads), parents before children.
pub fn processes(root: u32) -> io::Result<Vec<u32>> {
    if state(root).is_none() {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("no process {root}")));
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let pid = out[i];
        i += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(children) = std::fs::read_to_string(task.path().join("children")) else {
                continue;
            };
            for child in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
                if !out.contains(&child) {
                    out.push(child);
                }
            }
        }
    }
    Ok(out)
}

fn signal_all(pids: &[u32], sig: Signal) -> Vec<(u32, nix::Error)> {
    pids.iter()
        .filter_map(|&p| match kill(Pid::from_raw(p as i32), sig) {
            Ok(()) | Err(nix::Error::ESRCH) => None,
            Err(e) => Some((p, e)),
        })
        .collect()
}

/// Resumes a tree that CRIU left stopped (`--leave-stopped`). Processes that are gone are skipped.
pub fn resume(pids: &[u32]) -> io::Result<()> {
    match signal_all(pids, Signal::SIGCONT).first() {
        None => Ok(()),
        Some((p, e)) => Err(io::Error::other(format!("SIGCONT to {p}: {e}"))),
    }
}

/// Kills every process of a tree and waits, at most `within`, until each has exited (a zombie or gone):
/// SIGKILL only queues the death, and a process with a lot of memory takes a while to release it. When
/// this returns Ok, none of them runs any more. Processes that are gone are skipped.
///
/// Signals go through pidfds (`pidfd_open`, `pidfd_send_signal`), so a pid reused meanwhile is never hit.
pub fn kill_all(pids: &[u32], within: std::time::Duration) -> io::Result<()> {
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
    let mut fds = Vec::new();
    for &p in pids {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, p as libc::pid_t, 0) };
        if fd < 0 {
            match io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::ESRCH) => continue,
                e => return Err(io::Error::other(format!("pidfd_open {p}: {e}"))),
            }
        }
        // SAFETY: the syscall returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
        let r = unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), libc::SIGKILL, std::ptr::null::<u8>(), 0)
        };
        if r < 0 {
            match io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::ESRCH) => continue,
                e => return Err(io::Error::other(format!("SIGKILL to {p}: {e}"))),
            }
        }
        fds.push((p, fd));
    }
    // A pidfd polls readable once its process has exited.
    let deadline = std::time::Instant::now() + within;
    while !fds.is_empty() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            let still: Vec<u32> = fds.iter().map(|(p, _)| *p).collect();
            return Err(io::Error::other(format!(
                "SIGKILL sent, but {still:?} had not exited after {} ms (stuck in the kernel: look at /proc/PID/stack)",
                within.as_millis()
            )));
        }
        let mut polled: Vec<nix::poll::PollFd> =
            fds.iter().map(|(_, fd)| nix::poll::PollFd::new(fd.as_fd(), nix::poll::PollFlags::POLLIN)).collect();
        let ms = left.as_millis().clamp(1, u16::MAX as u128) as u16;
        match nix::poll::poll(&mut polled, nix::poll::PollTimeout::from(ms)) {
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(e) => return Err(io::Error::other(format!("poll on pidfds: {e}"))),
        }
        let exited: Vec<bool> = polled.iter().map(|f| f.revents().is_some_and(|r| !r.is_empty())).collect();
        drop(polled);
        // retain visits in order: each fd meets its own poll result.
        let mut exited = exited.into_iter();
        fds.retain(|_| !exited.next().unwrap_or(false));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_and_children() {
        let me = std::process::id();
        assert!(is_alive(me));
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pids = processes(me).unwrap();
        assert_eq!(pids[0], me);
        assert!(pids.contains(&child.id()), "{pids:?}");
        assert_eq!(comm(child.id()), "sleep");
        kill_all(&[child.id()], std::time::Duration::from_secs(5)).unwrap();
        // Exited before being reaped: a zombie, not alive.
        assert!(!is_alive(child.id()), "{:?}", state(child.id()));
        child.wait().unwrap();
        kill_all(&[child.id()], std::time::Duration::from_secs(5)).unwrap();
        assert!(processes(u32::MAX / 2).is_err());
    }
}
