//! Dirty tracking: which pages of the running tree may have changed since the last look, so that a
//! pre-copy round, and the final pass over the frozen tree, read and compare only those.
//!
//! Two kernel mechanisms, whichever this host has; without either, every page is read and its content
//! hash compared ([`crate::precopy`]), which is always right but reads all the memory every time.
//! - **Write-protect tracking** ([`Trackers`], kernel 6.7 or later): a userfaultfd in asynchronous
//!   write-protect mode (`UFFD_FEATURE_WP_ASYNC`) registered over the process's private memory, and
//!   the `PAGEMAP_SCAN` ioctl of `/proc/PID/pagemap`, which lists the pages written since they were
//!   last protected and protects them again, atomically per page. It works on kernels built without
//!   soft-dirty (like the ones this was built on), and because nothing is lost between the look and
//!   the re-arm it also serves the final pass at the freeze. A write to a protected page costs the
//!   process one minor fault, resolved by the kernel alone (nobody reads the userfaultfd).
//! - **Soft-dirty** ([`soft_dirty_pages`]), where the kernel has it (the Hello says so): bit 55 of
//!   `/proc/PID/pagemap`, cleared through `/proc/PID/clear_refs`. A write between the read of a bit and
//!   the clear is missed, so it serves the rounds but not the final pass.
//!
//! A userfaultfd belongs to the address space of the process that created it, so userfaultfd(2) must
//! be called *by the process*. [`inject`] does that with ptrace, the way CRIU's compel runs its
//! parasite, but for one system call and without mapping anything: the main thread is stopped
//! (PTRACE_SEIZE, PTRACE_INTERRUPT), made to run a `syscall` instruction of its own vDSO, and given
//! back exactly its registers, an interrupted system call restarting as the kernel would restart it.
//! The new fd is duplicated here (pidfd_getfd(2)) and closed in the process by a second injected call.
//! The whole attach took 0.5-2 ms in the unit tests; the process is stopped for part of it. Closing the duplicate here (dropping the
//! [`Trackers`]) unregisters everything again.
//!
//! Not attempted, so those processes are compared in full: a process under a seccomp filter (a
//! filter may kill it for a system call it did not expect), one that is stopped, traced or whose main
//! thread has exited, and any architecture but x86-64. A range that cannot be registered (another
//! userfaultfd holds it, or it changed under the look) counts as wholly changed.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use protocol::pages::PAGE_SIZE;

use crate::precopy::{Key, Region};

/// What may have changed since the last look; every other page of the regions looked at is as it
/// was then.
#[derive(Debug, Default, Clone)]
pub struct Changed {
    /// Pages written, sorted by (pid, address), no page twice: the passes ask by chunk (see
    /// [`Changed::mark`]), with one search each. A hash lookup per page took about 0.1 s of a pass over
    /// 2 GiB here, twice in post-copy's frozen pass, on the cores the restored copy needs.
    pages: Vec<Key>,
    /// Processes whose every page counts as changed (not tracked).
    pub all_of: HashSet<u32>,
}

impl Changed {
    /// These pages written, and every page of the processes `all_of`.
    pub fn new(pages: impl IntoIterator<Item = Key>, all_of: impl IntoIterator<Item = u32>) -> Changed {
        let mut c = Changed { pages: pages.into_iter().collect(), all_of: all_of.into_iter().collect() };
        c.sort();
        c
    }

    /// Whether page `key` may differ from when it was last looked at.
    pub fn may_have(&self, key: Key) -> bool {
        self.all_of.contains(&key.0) || self.pages.binary_search(&key).is_ok()
    }

    /// Sets `may[i]` to whether page `addr + i * PAGE_SIZE` of `pid` may have changed.
    pub fn mark(&self, pid: u32, addr: u64, may: &mut [bool]) {
        if self.all_of.contains(&pid) {
            return may.fill(true);
        }
        may.fill(false);
        let end = addr + (may.len() * PAGE_SIZE) as u64;
        let from = self.pages.partition_point(|&k| k < (pid, addr));
        for &(_, a) in self.pages[from..].iter().take_while(|&&(p, a)| p == pid && a < end) {
            may[((a - addr) as usize) / PAGE_SIZE] = true;
        }
    }

    /// The pages written (not those of `all_of`), in order.
    pub fn written(&self) -> &[Key] {
        &self.pages
    }

    fn add_range(&mut self, pid: u32, start: u64, end: u64) {
        self.pages.extend((start..end).step_by(PAGE_SIZE).map(|a| (pid, a)));
    }

    /// Restores the order of `pages` after additions.
    fn sort(&mut self) {
        self.pages.sort_unstable();
        self.pages.dedup();
    }
}

/// Write-protect trackers of a tree's processes, attached as processes are first looked at.
#[derive(Default)]
pub struct Trackers {
    /// By pid; None: it could not be tracked (not tried again).
    by_pid: HashMap<u32, Option<Tracker>>,
}

impl Trackers {
    /// Pages of `regions` that may have changed since the previous call. A process seen for the first
    /// time is attached now and all its pages count as changed, as do those of a process that cannot
    /// be tracked.
    pub fn changed(&mut self, regions: &[Region]) -> Changed {
        let mut out = Changed::default();
        let mut pids: Vec<u32> = regions.iter().map(|r| r.pid).collect();
        pids.sort_unstable();
        pids.dedup();
        for pid in pids {
            let first = !self.by_pid.contains_key(&pid);
            let tracker = self.by_pid.entry(pid).or_insert_with(|| match Tracker::attach(pid) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::info!(pid, "dirty tracking: {e}; its memory is compared in full every round");
                    None
                }
            });
            match tracker {
                Some(t) => {
                    for r in regions.iter().filter(|r| r.pid == pid) {
                        // The first look only arms the tracking: every page counts as changed anyway.
                        t.written(r, (!first).then_some(&mut out));
                    }
                    if first {
                        out.all_of.insert(pid);
                    }
                }
                None => {
                    out.all_of.insert(pid);
                }
            }
        }
        out.sort();
        out
    }

    /// Processes tracked.
    pub fn tracked(&self) -> usize {
        self.by_pid.values().filter(|t| t.is_some()).count()
    }
}

/// One process's userfaultfd in asynchronous write-protect mode (a duplicate of the one it created).
pub struct Tracker {
    pid: u32,
    uffd: OwnedFd,
}

// PAGEMAP_SCAN: include/uapi/linux/fs.h of Linux 6.7 (Debian bookworm's headers, which the libc crate
// follows, are older). The userfaultfd side is the `uffd` crate's.
const PAGE_IS_WRITTEN: u64 = 1 << 1;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

nix::ioctl_readwrite!(pagemap_scan, b'f', 16, PmScanArg);

/// Written ranges fetched per PAGEMAP_SCAN call.
const SCAN_VEC: usize = 1024;

impl Tracker {
    /// Gives process `pid` a userfaultfd, keeps a duplicate of it in write-protect-async mode.
    pub fn attach(pid: u32) -> Result<Tracker, String> {
        let status = criu::tree::Status::read(pid).map_err(|e| format!("pid {pid}: {e}"))?;
        let field = |name: &str| status.field(name);
        if field("Seccomp:") != "0" {
            return Err(format!("pid {pid} runs under a seccomp filter, which may refuse or punish userfaultfd(2)"));
        }
        if field("TracerPid:") != "0" {
            return Err(format!("pid {pid} is traced already"));
        }
        let state = field("State:");
        if !state.starts_with('S') && !state.starts_with('R') && !state.starts_with('D') {
            return Err(format!("pid {pid} is in state {state:?}, not running or sleeping"));
        }
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK | uffd::USER_MODE_ONLY) as u64;
        let uffd = inject::userfaultfd(pid, flags)?;
        uffd::api(uffd.as_fd(), uffd::FEATURE_WP_ASYNC | uffd::FEATURE_WP_UNPOPULATED)
            .map_err(|e| format!("this kernel has no asynchronous write-protect userfaultfd (UFFDIO_API: {e})"))?;
        Ok(Tracker { pid, uffd })
    }

    /// Adds to `out` the pages of `r` written since the previous call (all of them the first time, or
    /// when `r` cannot be tracked) and protects them again; with no `out`, only protects them.
    fn written(&self, r: &Region, mut out: Option<&mut Changed>) {
        let all_from = |at: u64, out: Option<&mut Changed>| {
            if let Some(o) = out {
                o.add_range(r.pid, at, r.end);
            }
        };
        // Registering a range again with the same userfaultfd changes nothing.
        // SAFETY: the uffd is the tracked process's (injected into it), not this agent's, and this mode
        // only write-protects.
        if let Err(e) = unsafe { uffd::register(self.uffd.as_fd(), r.start, r.end - r.start, uffd::REGISTER_MODE_WP) } {
            tracing::debug!(pid = self.pid, start = r.start, end = r.end, "dirty tracking: register: {e}");
            return all_from(r.start, out);
        }
        // Opened afresh: the file stands for the address space it was opened on (one that exec(2)
        // replaced would not be this one, and its ranges are not registered: EPERM below).
        let pagemap = match std::fs::File::open(format!("/proc/{}/pagemap", self.pid)) {
            Ok(f) => f,
            Err(_) => return all_from(r.start, out),
        };
        let mut vec = vec![PageRegion::default(); SCAN_VEC];
        let mut at = r.start;
        while at < r.end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start: at,
                end: r.end,
                vec: vec.as_mut_ptr() as u64,
                vec_len: SCAN_VEC as u64,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..Default::default()
            };
            // SAFETY: `arg` points at `vec`, SCAN_VEC entries the kernel may fill; it writes nothing else.
            match unsafe { pagemap_scan(pagemap.as_raw_fd(), &mut arg) } {
                Ok(n) => {
                    if let Some(o) = out.as_deref_mut() {
                        for p in &vec[..(n as usize).min(SCAN_VEC)] {
                            o.add_range(r.pid, p.start.max(r.start), p.end.min(r.end));
                        }
                    }
                    if arg.walk_end <= at {
                        // No progress: should not happen; count the rest as changed rather than loop.
                        return all_from(at, out);
                    }
                    at = arg.walk_end;
                }
                Err(e) => {
                    // EPERM: part of the range is not registered (it changed since the registration).
                    tracing::debug!(pid = self.pid, at, end = r.end, "dirty tracking: PAGEMAP_SCAN: {e}");
                    return all_from(at, out);
                }
            }
        }
    }
}

/// Running system calls as another process (x86-64 only).
mod inject {
    use std::os::fd::OwnedFd;

    /// Has the main thread of `pid` call userfaultfd(`flags`), takes a duplicate of the new fd
    /// (pidfd_getfd) and has it closed there again, all in one stop. The tracing lives in a thread of
    /// its own: a tracer that ends detaches its tracees, so no path, not even a panic, leaves the
    /// process stopped.
    pub fn userfaultfd(pid: u32, flags: u64) -> Result<OwnedFd, String> {
        std::thread::Builder::new()
            .name("dirty-inject".into())
            .spawn(move || imp::userfaultfd(pid, flags))
            .map_err(|e| format!("thread: {e}"))?
            .join()
            .map_err(|_| "the injecting thread panicked".to_string())?
    }

    #[cfg(not(target_arch = "x86_64"))]
    mod imp {
        pub fn userfaultfd(_pid: u32, _flags: u64) -> Result<std::os::fd::OwnedFd, String> {
            Err("system call injection is implemented for x86-64 only".into())
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod imp {
        use std::os::fd::OwnedFd;
        use std::time::{Duration, Instant};

        use nix::sys::ptrace;
        use nix::sys::signal::Signal;
        use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
        use nix::unistd::Pid;

        /// How long the main thread may take to stop (a task in uninterruptible sleep does not).
        const STOP_WITHIN: Duration = Duration::from_secs(1);
        /// How long an injected call may take (neither blocks).
        const CALL_WITHIN: Duration = Duration::from_secs(10);

        // Kernel-internal return values of an interrupted system call (include/linux/errno.h).
        const ERESTARTSYS: i64 = 512;
        const ERESTARTNOINTR: i64 = 513;
        const ERESTARTNOHAND: i64 = 514;
        const ERESTART_RESTARTBLOCK: i64 = 516;

        pub fn userfaultfd(pid: u32, flags: u64) -> Result<OwnedFd, String> {
            let tid = Pid::from_raw(pid as i32);
            let gadget = vdso_syscall(pid)?;
            ptrace::seize(tid, ptrace::Options::PTRACE_O_TRACESYSGOOD).map_err(|e| format!("ptrace seize: {e}"))?;
            let mut s = Stopped { tid, gadget, saved: None, signals: Vec::new() };
            let out = s.stop().and_then(|()| {
                let fd = match s.call(libc::SYS_userfaultfd, flags)? {
                    fd @ 0..=0x7fff_ffff => fd as i32,
                    e => return Err(format!("userfaultfd(2): {}", std::io::Error::from_raw_os_error(-e as i32))),
                };
                let dup = sockdiag::dup_from(pid, fd).map_err(|e| format!("pidfd_getfd of its userfaultfd: {e}"));
                match s.call(libc::SYS_close, fd as u64) {
                    Ok(0) => dup,
                    // Left open there, CRIU would refuse to dump the fd: say so loudly.
                    r => Err(format!("could not close the userfaultfd {fd} it was given ({r:?}); a dump may fail")),
                }
            });
            let back = s.give_back();
            // Signals that arrived while it was stopped are sent again (their siginfo is not kept).
            for sig in s.signals {
                // SAFETY: tgkill takes a tgid, a tid and a signal number.
                unsafe { libc::syscall(libc::SYS_tgkill, pid as libc::pid_t, pid as libc::pid_t, sig as i32) };
            }
            let out = out?;
            back?;
            Ok(out)
        }

        /// A seized thread.
        struct Stopped {
            tid: Pid,
            /// A `syscall` instruction of its vDSO.
            gadget: u64,
            /// Its registers at the first stop.
            saved: Option<libc::user_regs_struct>,
            /// Signals it received meanwhile, taken from it.
            signals: Vec<Signal>,
        }

        impl Stopped {
            /// Interrupts it; the stop is PTRACE_EVENT_STOP (a signal arriving first is taken now).
            fn stop(&mut self) -> Result<(), String> {
                ptrace::interrupt(self.tid).map_err(|e| format!("ptrace interrupt: {e}"))?;
                loop {
                    match wait(self.tid, STOP_WITHIN)? {
                        WaitStatus::PtraceEvent(_, _, libc::PTRACE_EVENT_STOP) => break,
                        WaitStatus::Stopped(_, sig) => {
                            self.signals.push(sig);
                            ptrace::cont(self.tid, None).map_err(|e| format!("ptrace cont: {e}"))?;
                        }
                        other => return Err(format!("unexpected stop {other:?} before the injection")),
                    }
                }
                self.saved = Some(ptrace::getregs(self.tid).map_err(|e| format!("ptrace getregs: {e}"))?);
                Ok(())
            }

            /// Runs system call `nr` with one argument; its result (a negative errno on failure).
            fn call(&mut self, nr: i64, arg: u64) -> Result<i64, String> {
                let mut regs = self.saved.ok_or("not stopped")?;
                regs.rip = self.gadget;
                regs.rax = nr as u64;
                // Not a system call being restarted: the kernel leaves rax and rip alone on resume.
                regs.orig_rax = u64::MAX;
                regs.rdi = arg;
                ptrace::setregs(self.tid, regs).map_err(|e| format!("ptrace setregs: {e}"))?;
                // To the call's entry, then to its exit.
                for _ in 0..2 {
                    ptrace::syscall(self.tid, None).map_err(|e| format!("ptrace syscall: {e}"))?;
                    loop {
                        match wait(self.tid, CALL_WITHIN)? {
                            WaitStatus::PtraceSyscall(_) => break,
                            WaitStatus::Stopped(_, sig) => {
                                self.signals.push(sig);
                                ptrace::syscall(self.tid, None).map_err(|e| format!("ptrace syscall: {e}"))?;
                            }
                            other => return Err(format!("unexpected stop {other:?} during the injected call")),
                        }
                    }
                }
                Ok(ptrace::getregs(self.tid).map_err(|e| format!("ptrace getregs: {e}"))?.rax as i64)
            }

            /// Its registers back as they were, and the detach. A system call it was interrupted in is
            /// restarted as the kernel does it (arch/x86/kernel/signal.c): back onto its `syscall`
            /// instruction with the call's number. (The kernel would do it too on the way out, as the
            /// detach wakes it with TIF_SIGPENDING; done here so as not to depend on that. Both cannot
            /// add up: the kernel's check then finds a call number in rax, not an -ERESTART code.)
            fn give_back(&mut self) -> Result<(), String> {
                if let Some(saved) = self.saved {
                    let mut back = saved;
                    if (saved.orig_rax as i64) >= 0 {
                        match -(saved.rax as i64) {
                            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
                                back.rax = saved.orig_rax;
                                back.rip -= 2;
                            }
                            ERESTART_RESTARTBLOCK => {
                                back.rax = libc::SYS_restart_syscall as u64;
                                back.rip -= 2;
                            }
                            _ => {}
                        }
                    }
                    ptrace::setregs(self.tid, back).map_err(|e| format!("ptrace setregs (restoring): {e}"))?;
                }
                ptrace::detach(self.tid, None).map_err(|e| format!("ptrace detach: {e}"))
            }
        }

        /// The next stop of `tid`, within `within`.
        fn wait(tid: Pid, within: Duration) -> Result<WaitStatus, String> {
            let deadline = Instant::now() + within;
            loop {
                match waitpid(tid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_micros(200))
                    }
                    Ok(WaitStatus::StillAlive) => return Err(format!("pid {tid} did not stop within {within:?}")),
                    Ok(s @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                        return Err(format!("pid {tid} ended: {s:?}"));
                    }
                    Ok(s) => return Ok(s),
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(format!("waitpid: {e}")),
                }
            }
        }

        /// The address of a `syscall` instruction (0f 05) in the vDSO of `pid`.
        fn vdso_syscall(pid: u32) -> Result<u64, String> {
            let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| format!("maps: {e}"))?;
            let (start, end) = maps
                .lines()
                .filter(|l| l.ends_with("[vdso]"))
                .find_map(|l| {
                    let (s, e) = l.split_whitespace().next()?.split_once('-')?;
                    Some((u64::from_str_radix(s, 16).ok()?, u64::from_str_radix(e, 16).ok()?))
                })
                .ok_or("the process has no vDSO")?;
            let mut code = vec![0u8; (end - start) as usize];
            let remote = [nix::sys::uio::RemoteIoVec { base: start as usize, len: code.len() }];
            let n = nix::sys::uio::process_vm_readv(
                Pid::from_raw(pid as i32),
                &mut [std::io::IoSliceMut::new(&mut code)],
                &remote,
            )
            .map_err(|e| format!("reading its vDSO: {e}"))?;
            code[..n]
                .windows(2)
                .position(|w| w == [0x0f, 0x05])
                .map(|i| start + i as u64)
                .ok_or_else(|| "no syscall instruction in its vDSO".into())
        }
    }
}

/// Where the kernel has soft-dirty: the pages of `regions` written since the last call (their
/// soft-dirty bit is set), after which every bit is cleared again (`4 > /proc/PID/clear_refs`). The
/// first call, with no bits cleared before, returns every page. A page written between the read of its
/// bit and the clear is missed by the next round, so the final pass at the freeze must not use it.
pub fn soft_dirty_pages(regions: &[Region]) -> Changed {
    let mut out = Changed::default();
    let mut pids: Vec<u32> = regions.iter().map(|r| r.pid).collect();
    pids.dedup();
    for pid in &pids {
        let Ok(mut f) = std::fs::File::open(format!("/proc/{pid}/pagemap")) else { continue };
        for r in regions.iter().filter(|r| r.pid == *pid) {
            let n = ((r.end - r.start) / PAGE_SIZE as u64) as usize;
            let mut entries = vec![0u64; n];
            if crate::precopy::read_pagemap(&mut f, r.start, &mut entries).is_err() {
                out.add_range(r.pid, r.start, r.end);
                continue;
            }
            for (i, e) in entries.iter().enumerate() {
                if e & PM_SOFT_DIRTY != 0 {
                    out.pages.push((*pid, r.start + (i * PAGE_SIZE) as u64));
                }
            }
        }
        if let Err(e) = std::fs::write(format!("/proc/{pid}/clear_refs"), "4") {
            tracing::debug!(pid, "clear_refs: {e}");
        }
    }
    out.sort();
    out
}

/// Bit 55 of a /proc/PID/pagemap entry.
const PM_SOFT_DIRTY: u64 = 1 << 55;

#[cfg(test)]
mod tests {
    //! These run real processes under real tracking: they need root (ptrace of a child works without,
    //! but CI is root) and a kernel with PAGEMAP_SCAN (6.7 or later), and fail loudly without.
    use super::*;
    use std::time::{Duration, Instant};

    const PAGES: usize = 1024;

    /// A forked child that holds PAGES pages of its own memory (every byte 1) and, blocked in read(2)
    /// between commands, writes (index) or discards (index | 1 << 63, MADV_DONTNEED) the page it is
    /// told, acknowledging each; u64::MAX ends it. It exits 2 if a read returned anything but a whole
    /// command (an interrupted call that was not restarted would).
    struct Child {
        pid: u32,
        addr: u64,
        cmd: OwnedFd,
        ack: OwnedFd,
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        nix::unistd::pipe().expect("pipe")
    }

    impl Child {
        fn start(strict_seccomp: bool) -> Child {
            let (cmd_r, cmd_w) = pipe();
            let (ack_r, ack_w) = pipe();
            // SAFETY: the child only makes system calls (no allocation, no locks) until _exit.
            match unsafe { nix::unistd::fork() }.expect("fork") {
                // SAFETY: system calls on memory the child maps itself and on fds it holds.
                nix::unistd::ForkResult::Child => unsafe {
                    let len = PAGES * PAGE_SIZE;
                    let a = libc::mmap(
                        std::ptr::null_mut(),
                        len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    ) as *mut u8;
                    std::ptr::write_bytes(a, 1, len);
                    let addr = a as u64;
                    libc::write(ack_w.as_raw_fd(), (&addr as *const u64).cast(), 8);
                    if strict_seccomp {
                        libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_STRICT);
                    }
                    loop {
                        let mut c = 0u64;
                        // exit(2), not exit_group(2): the one strict seccomp allows (the child has one thread).
                        if libc::read(cmd_r.as_raw_fd(), (&mut c as *mut u64).cast(), 8) != 8 {
                            libc::syscall(libc::SYS_exit, 2);
                        }
                        if c == u64::MAX {
                            libc::syscall(libc::SYS_exit, 0);
                        }
                        let page = a.add((c & !(1 << 63)) as usize * PAGE_SIZE);
                        if c & (1 << 63) != 0 {
                            libc::madvise(page.cast(), PAGE_SIZE, libc::MADV_DONTNEED);
                        } else {
                            *page = 7;
                        }
                        libc::write(ack_w.as_raw_fd(), (&c as *const u64).cast(), 1);
                    }
                },
                nix::unistd::ForkResult::Parent { child } => {
                    let mut addr = [0u8; 8];
                    nix::unistd::read(&ack_r, &mut addr).expect("the child's address");
                    // Let it block in read(2), the case the injection must restart.
                    std::thread::sleep(Duration::from_millis(50));
                    Child { pid: child.as_raw() as u32, addr: u64::from_ne_bytes(addr), cmd: cmd_w, ack: ack_r }
                }
            }
        }

        fn region(&self) -> Region {
            Region { pid: self.pid, start: self.addr, end: self.addr + (PAGES * PAGE_SIZE) as u64 }
        }

        fn page(&self, i: usize) -> Key {
            (self.pid, self.addr + (i * PAGE_SIZE) as u64)
        }

        fn tell(&self, c: u64) {
            nix::unistd::write(&self.cmd, &c.to_ne_bytes()).expect("command");
            if c != u64::MAX {
                let mut b = [0u8; 1];
                nix::unistd::read(&self.ack, &mut b).expect("ack");
            }
        }

        /// Ends it; its exit status.
        fn end(self) -> i32 {
            self.tell(u64::MAX);
            match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(self.pid as i32), None) {
                Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => code,
                other => panic!("the child ended so: {other:?}"),
            }
        }
    }

    fn written(c: &Changed) -> Vec<Key> {
        c.written().to_vec()
    }

    #[test]
    fn write_protect_tracking_reports_exactly_the_pages_written_and_the_process_goes_on() {
        let child = Child::start(false);
        let r = [child.region()];
        let mut t = Trackers::default();
        let first = t.changed(&r);
        assert_eq!(t.tracked(), 1, "pid {} could not be tracked (see the log)", child.pid);
        assert!(first.all_of.contains(&child.pid) && first.may_have(child.page(0)), "the first look counts every page");
        assert_eq!(written(&t.changed(&r)), vec![], "nothing written since");
        // Its read(2) was interrupted by the injection: it must have restarted, or the child exits 2.
        child.tell(3);
        child.tell(700);
        child.tell(700);
        assert_eq!(written(&t.changed(&r)), vec![child.page(3), child.page(700)]);
        child.tell(5 | 1 << 63);
        assert_eq!(written(&t.changed(&r)), vec![child.page(5)], "a discarded page is changed (now zero)");
        assert!(t.changed(&r).written().is_empty());
        assert_eq!(child.end(), 0, "the child saw a broken read(2)");
    }

    #[test]
    fn an_interrupted_sleep_sleeps_its_full_time() {
        // clock_nanosleep returns -ERESTART_RESTARTBLOCK when interrupted: the restart goes through
        // restart_syscall(2) with the time left.
        // SAFETY: the child only makes system calls until _exit.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            // SAFETY: system calls on the child's own stack variables.
            nix::unistd::ForkResult::Child => unsafe {
                let mut t0 = std::mem::zeroed::<libc::timespec>();
                libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t0);
                let d = libc::timespec { tv_sec: 0, tv_nsec: 400_000_000 };
                let r = libc::clock_nanosleep(libc::CLOCK_MONOTONIC, 0, &d, std::ptr::null_mut());
                let mut t1 = std::mem::zeroed::<libc::timespec>();
                libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t1);
                let ns = (t1.tv_sec - t0.tv_sec) * 1_000_000_000 + (t1.tv_nsec - t0.tv_nsec);
                libc::_exit(if r != 0 {
                    3
                } else if ns < 400_000_000 {
                    4
                } else {
                    0
                });
            },
            nix::unistd::ForkResult::Parent { child } => {
                std::thread::sleep(Duration::from_millis(100));
                let started = Instant::now();
                let tracker = Tracker::attach(child.as_raw() as u32);
                let took = started.elapsed();
                let status = nix::sys::wait::waitpid(child, None).expect("waitpid");
                assert!(tracker.is_ok(), "{:?}", tracker.err());
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0), "3: sleep failed, 4: cut short");
                assert!(took < Duration::from_millis(200), "attaching took {took:?}");
            }
        }
    }

    #[test]
    fn a_process_under_seccomp_is_compared_in_full_not_injected() {
        let child = Child::start(true);
        let mut t = Trackers::default();
        let c = t.changed(&[child.region()]);
        assert_eq!(t.tracked(), 0);
        assert!(c.all_of.contains(&child.pid) && c.may_have(child.page(9)));
        // Strict seccomp kills a process for any call but read, write and exit: it is still alive.
        child.tell(9);
        assert_eq!(child.end(), 0);
    }
}
