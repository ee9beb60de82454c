//! The process tree CRIU dumps and restores, seen through procfs: which processes belong to it, and the
//! two signals the agents send it (SIGCONT to resume a tree CRIU left stopped, SIGKILL to drop a copy),
//! and what /proc/PID/status says of a process ([`Status`]: one parser for the agents and the CLI).

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

/// The text of a /proc/PID/status, read once for the fields wanted from it (default: no fields).
#[derive(Default)]
pub struct Status(String);

impl Status {
    /// The status of `pid`, or why it cannot be read (no such process, no permission).
    pub fn read(pid: u32) -> io::Result<Status> {
        std::fs::read_to_string(format!("/proc/{pid}/status")).map(Status)
    }

    /// The status of the calling process (/proc/self: right also where /proc belongs to another pid
    /// namespace than the caller's).
    pub fn read_self() -> io::Result<Status> {
        std::fs::read_to_string("/proc/self/status").map(Status)
    }

    /// The value of field `name` (with its colon, e.g. "TracerPid:"), trimmed; empty when there is no
    /// such field.
    pub fn field(&self, name: &str) -> &str {
        self.0.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or("")
    }

    /// A size field ("VmRSS:", "RssAnon:", ...) in bytes; None when it is missing or not "N kB".
    pub fn bytes(&self, name: &str) -> Option<u64> {
        let kib = self.field(name).strip_suffix(" kB")?.trim().parse::<u64>().ok()?;
        kib.checked_mul(1024)
    }

    /// Real, effective, saved and filesystem uid, in that order (empty when the field is missing).
    pub fn uids(&self) -> Vec<u32> {
        self.field("Uid:").split_whitespace().filter_map(|u| u.parse().ok()).collect()
    }
}

impl From<String> for Status {
    fn from(text: String) -> Status {
        Status(text)
    }
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

/// When `pid` started, in clock ticks since boot (`starttime` of /proc/PID/stat), or None if there is no
/// such process: a process that started after another cannot be the older one.
pub fn started(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22; the fields after comm's ')' start at field 3 (the state).
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(19)?.parse().ok()
}

/// A pidfd for `pid` (`pidfd_open`), None when there is no such process: a signal sent through it
/// ([`pidfd_kill`]) never hits a process that took the pid over later.
pub fn pidfd(pid: u32) -> io::Result<Option<std::os::fd::OwnedFd>> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return match io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::ESRCH) => Ok(None),
            e => Err(io::Error::other(format!("pidfd_open {pid}: {e}"))),
        };
    }
    // SAFETY: the syscall returned a new fd that nothing else owns.
    Ok(Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }))
}

/// SIGKILL to the process of a pidfd; Ok(false) when it had exited already.
pub fn pidfd_kill(fd: &std::os::fd::OwnedFd) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
    let r =
        unsafe { libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), libc::SIGKILL, std::ptr::null::<u8>(), 0) };
    if r < 0 {
        return match io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
            e => Err(e),
        };
    }
    Ok(true)
}

/// Waits at most `within` for the process of a pidfd to exit (a zombie counts); true once it has.
pub fn pidfd_exited(fd: &std::os::fd::OwnedFd, within: std::time::Duration) -> bool {
    use std::os::fd::AsFd;
    let mut polled = [nix::poll::PollFd::new(fd.as_fd(), nix::poll::PollFlags::POLLIN)];
    let ms = within.as_millis().min(u16::MAX as u128) as u16;
    match nix::poll::poll(&mut polled, nix::poll::PollTimeout::from(ms)) {
        Ok(n) => n > 0,
        Err(_) => false,
    }
}

/// Kills every process of a tree and waits, at most `within`, until each has exited (a zombie or gone):
/// SIGKILL only queues the death, and a process with a lot of memory takes a while to release it. When
/// this returns Ok, none of them runs any more. Processes that are gone are skipped.
///
/// Signals go through pidfds ([`pidfd`], [`pidfd_kill`]), so a pid reused meanwhile is never hit.
pub fn kill_all(pids: &[u32], within: std::time::Duration) -> io::Result<()> {
    use std::os::fd::AsFd;
    let mut fds = Vec::new();
    for &p in pids {
        let Some(fd) = pidfd(p)? else { continue };
        match pidfd_kill(&fd) {
            Ok(true) => fds.push((p, fd)),
            Ok(false) => {}
            Err(e) => return Err(io::Error::other(format!("SIGKILL to {p}: {e}"))),
        }
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

/// What a [`StopWatch`] sees of its task at one look (None: gone, or a zombie).
enum Look {
    /// In a tracing stop (`t`): frozen by CRIU.
    Stopped,
    /// Any other state, a plain stop (`T`) included.
    Running,
}

impl Look {
    fn at(pid: u32) -> Option<Look> {
        match state(pid)? {
            't' => Some(Look::Stopped),
            'Z' | 'X' => None,
            _ => Some(Look::Running),
        }
    }
}

/// How often a [`StopWatch`] looks at its task.
const STOP_WATCH_EVERY: std::time::Duration = std::time::Duration::from_millis(1);

/// Notes, from a thread of its own, when a task first enters a tracing stop (state `t`): when a
/// `criu dump` started meanwhile froze it. CRIU's start before that (its kernel probe, about 40 ms when
/// `/run` is not a tmpfs, and its walk of the tree) is not part of the freeze. CRIU's own `stats-dump`
/// cannot tell: after a lazy dump its times are garbage (CRIU 4.2.1's page server re-initialises the
/// statistics before they are written).
pub struct StopWatch {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Option<std::time::Instant>>>,
}

impl StopWatch {
    /// Starts watching `pid`, which should be running (not stopped) now: a task found in a tracing stop
    /// at the first look was not seen stopping, and gives None.
    pub fn start(pid: u32) -> StopWatch {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        // The first look is taken here, not by the new thread: on busy cores that thread may first run
        // after CRIU has frozen the task, which would then look stopped from the start. A task not
        // running at that look gives None, and needs no thread.
        // The last look that saw the task not yet stopped (taken as the instant before it): it stopped
        // after that. Reporting that instant errs on the early side, so a downtime counted from it is
        // never too short.
        let mut running = std::time::Instant::now();
        let Some(Look::Running) = Look::at(pid) else { return StopWatch { done, thread: None } };
        let thread = std::thread::Builder::new()
            .name("stop-watch".into())
            .spawn(move || {
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    let now = std::time::Instant::now();
                    match Look::at(pid)? {
                        Look::Stopped => return Some(running),
                        Look::Running => running = now,
                    }
                    std::thread::sleep(STOP_WATCH_EVERY);
                }
                None
            })
            .ok();
        StopWatch { done, thread }
    }

    /// When the task was last seen running before it was first seen in a tracing stop (within about a
    /// millisecond of the stop); None if it was not seen stopped by now, or is gone. Blocks until the
    /// watching thread ended: at most about a millisecond (its next look).
    pub fn stopped_at(mut self) -> Option<std::time::Instant> {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take()?.join().ok().flatten()
    }
}

impl Drop for StopWatch {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_of_this_process() {
        let me = Status::read(std::process::id()).unwrap();
        assert_eq!(me.field("Pid:"), std::process::id().to_string());
        let uid = nix::unistd::getuid().as_raw();
        assert_eq!(me.uids().first(), Some(&uid), "real uid first");
        assert_eq!(me.uids().len(), 4, "real, effective, saved, filesystem");
        assert_eq!(me.field("NoSuchField:"), "");
        assert_eq!(Status::read_self().unwrap().field("Pid:"), me.field("Pid:"));
        assert!(Status::default().uids().is_empty());
        assert_eq!(Status::from("Uid:\t1\t2\t3\t4\nPPid:\t 7 \n".to_string()).field("PPid:"), "7");
        let sizes = Status::from("VmRSS:\t    2048 kB\nRssAnon:\t 12 kB\nVmFlags: 3\n".to_string());
        assert_eq!((sizes.bytes("VmRSS:"), sizes.bytes("RssAnon:")), (Some(2 << 20), Some(12 << 10)));
        assert_eq!((sizes.bytes("VmFlags:"), sizes.bytes("RssShmem:")), (None, None));
        assert!(me.bytes("VmRSS:").is_some_and(|b| b > 0), "this process is resident");
    }

    #[test]
    fn a_stop_watch_sees_a_tracing_stop_but_not_a_plain_one() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        // SIGSTOP is a plain stop (T): not a freeze by CRIU.
        let watch = StopWatch::start(child.id());
        kill(pid, Signal::SIGSTOP).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert_eq!(state(child.id()), Some('T'));
        assert_eq!(watch.stopped_at(), None);
        kill(pid, Signal::SIGCONT).unwrap();
        // PTRACE_SEIZE + PTRACE_INTERRUPT, as CRIU freezes a task: a tracing stop (t).
        let watch = StopWatch::start(child.id());
        std::thread::sleep(std::time::Duration::from_millis(200));
        let before = std::time::Instant::now();
        nix::sys::ptrace::seize(pid, nix::sys::ptrace::Options::empty()).unwrap();
        nix::sys::ptrace::interrupt(pid).unwrap();
        nix::sys::wait::waitpid(pid, None).unwrap();
        let after = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let seen = watch.stopped_at().expect("the tracing stop was seen");
        // The last look before the stop: never after it, and it kept looking until then (one look every
        // millisecond; the margin is for a busy machine), not just once at the start.
        assert!(seen <= after, "{seen:?} after {after:?}");
        assert!(seen + std::time::Duration::from_millis(150) >= before, "{seen:?} long before {before:?}");
        nix::sys::ptrace::detach(pid, None).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        // A task that is gone: nothing seen, and the watch ends on its own.
        let watch = StopWatch::start(child.id());
        std::thread::sleep(std::time::Duration::from_millis(10));
        assert_eq!(watch.stopped_at(), None);
    }

    #[test]
    fn own_process_and_children() {
        let me = std::process::id();
        assert!(is_alive(me));
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pids = processes(me).unwrap();
        assert_eq!(pids[0], me);
        assert!(pids.contains(&child.id()), "{pids:?}");
        // Until the child has exec'd, its comm is still this test thread's name.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while comm(child.id()) != "sleep" && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(comm(child.id()), "sleep");
        kill_all(&[child.id()], std::time::Duration::from_secs(5)).unwrap();
        // Exited before being reaped: a zombie, not alive.
        assert!(!is_alive(child.id()), "{:?}", state(child.id()));
        child.wait().unwrap();
        kill_all(&[child.id()], std::time::Duration::from_secs(5)).unwrap();
        assert!(processes(u32::MAX / 2).is_err());
    }
}
