//! The pre-flight: what would stop a migration, judged before anything is frozen, each with its cause
//! and its fix. [`judge`] is a pure function of the facts ([`crate::inspect::Tree`]) so that every rule
//! is unit-tested; the target adds its own findings (pids, files) in its answer to Prepare.
//!
//! The rules follow what CRIU refuses or needs an option for (see shared/docs/criu-interfaces.md): a
//! blocker is something CRIU would refuse, or would restore wrongly, with the options this agent uses.

use serde::{Deserialize, Serialize};

use crate::inspect::{FdKind, Tree};

/// One thing found.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Finding {
    /// Stable identifier, e.g. "tracer", "file-lock" (tests and scripts match on it).
    pub code: String,
    /// Process concerned (0 for the target host).
    pub pid: u32,
    /// What was found, naming the resource.
    pub detail: String,
    /// What to do about it.
    pub fix: String,
}

/// The verdict on a tree.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Report {
    pub pid: u32,
    pub processes: usize,
    /// The target asked, when one was named.
    pub target: Option<String>,
    pub blockers: Vec<Finding>,
    pub warnings: Vec<Finding>,
    /// Connections to the outside that the target sets up again (see [`crate::external`]).
    #[serde(default)]
    pub external: crate::external::Plan,
}

impl Report {
    /// One block of text: blockers, then warnings, each with its fix.
    pub fn text(&self) -> String {
        let mut s = format!(
            "pid {} ({} process{}){}: {}\n",
            self.pid,
            self.processes,
            if self.processes == 1 { "" } else { "es" },
            self.target.as_ref().map(|t| format!(" to {t}")).unwrap_or_default(),
            if self.blockers.is_empty() { "can migrate" } else { "cannot migrate" }
        );
        for line in self.external.lines() {
            s.push_str(&format!("  external {line}\n"));
        }
        for (label, list) in [("blocker", &self.blockers), ("warning", &self.warnings)] {
            for f in list {
                let who = if f.pid == 0 { "target".to_string() } else { format!("pid {}", f.pid) };
                s.push_str(&format!("  {label} [{}] {who}: {}\n    fix: {}\n", f.code, f.detail, f.fix));
            }
        }
        s
    }

    /// The blockers as one sentence for an error message.
    pub fn blocker_summary(&self) -> String {
        self.blockers
            .iter()
            .map(|f| format!("[{}] pid {}: {} (fix: {})", f.code, f.pid, f.detail, f.fix))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn finding(code: &str, pid: u32, detail: String, fix: &str) -> Finding {
    Finding { code: code.into(), pid, detail, fix: fix.into() }
}

/// Devices CRIU handles: mem devices null/zero/random/urandom, terminals, and tun.
fn device_allowed(major: u32, minor: u32) -> bool {
    match major {
        1 => matches!(minor, 3 | 5 | 8 | 9), // null, zero, random, urandom
        4 | 5 | 136..=143 => true,           // tty, console/ptmx, pts
        10 => minor == 200,                  // net/tun
        _ => false,
    }
}

fn is_terminal(path: &str) -> bool {
    path.starts_with("/dev/pts/") || path.starts_with("/dev/tty") || path == "/dev/console" || path == "/dev/ptmx"
}

/// Judges a tree. `caller_uid` is who asked (root may move anyone's processes); `rules` decide the
/// connections to the outside ([`crate::external::plan`]).
pub fn judge(t: &Tree, caller_uid: u32, rules: &crate::external::Parsed) -> Report {
    let mut blockers = Vec::new();
    let mut warnings = Vec::new();
    let pids = t.pids();
    let (external, mut external_blockers) = crate::external::plan(t, rules);
    let own_pid = std::process::id();
    for p in &t.processes {
        let pid = p.pid;
        if p.pid == 1 {
            blockers.push(finding(
                "init",
                pid,
                "pid 1 is the init of its pid namespace".into(),
                "migrate its children, or the whole container with its namespaces",
            ));
        }
        if p.kernel_thread {
            blockers.push(finding(
                "kernel-thread",
                pid,
                format!("{} is a kernel thread", p.comm),
                "kernel threads cannot move; choose a user process",
            ));
        }
        if p.pid == own_pid {
            blockers.push(finding(
                "agent",
                pid,
                "the tree contains the source agent itself".into(),
                "choose a process below the agent",
            ));
        }
        if pid == t.root && p.state == 'Z' {
            blockers.push(finding("zombie", pid, "the process has exited (zombie)".into(), "nothing to migrate"));
        }
        if caller_uid != 0 && p.uids.iter().any(|&u| u != caller_uid) {
            blockers.push(finding(
                "other-user",
                pid,
                format!("{} runs as uid {:?}, not as the caller's uid {caller_uid}", p.comm, p.uids),
                "ask root to migrate it, or migrate only your own processes",
            ));
        }
        if !t.agent_cap_sys_resource && p.uids.iter().any(|&u| u != t.agent_uid) {
            blockers.push(finding(
                "needs-cap-sys-resource",
                pid,
                format!(
                    "{} runs as uid {:?}; CRIU reads a process' resource limits with prlimit(2), which for another user's \
                     process needs CAP_SYS_RESOURCE, and this source agent lacks it",
                    p.comm, p.uids
                ),
                "run the source agent with CAP_SYS_RESOURCE (as a full-root service, not under a capability bounding set that drops it)",
            ));
        }
        if p.tracer != 0 && !pids.contains(&p.tracer) {
            blockers.push(finding(
                "tracer",
                pid,
                format!(
                    "traced by pid {} ({}); CRIU must be the only tracer while it dumps",
                    p.tracer,
                    criu::tree::comm(p.tracer)
                ),
                "detach the debugger or strace (quit gdb, stop strace), then migrate",
            ));
        }
        if !p.elf64 {
            blockers.push(finding(
                "compat-32bit",
                pid,
                format!("{} is a 32-bit (compat) program", p.comm),
                "build the program for 64 bits; CRIU here does not restore compat tasks",
            ));
        }
        if pid == t.root && p.sid != pid && !pids.contains(&p.sid) {
            blockers.push(finding(
                "session",
                pid,
                format!("its session leader {} ({}) is outside the tree", p.sid, criu::tree::comm(p.sid)),
                "start the program with setsid (its own session) and without a terminal",
            ));
        }
        if t.lock_holders.contains(&pid) || p.fds.iter().any(|f| f.locked) {
            blockers.push(finding(
                "file-lock",
                pid,
                "holds a file lock (flock/fcntl)".into(),
                "release the lock before migrating; file locks are not migrated",
            ));
        }
        let uses_sysv = p.has_sysv_shm_mapping || t.sysv_users.contains(&pid);
        if uses_sysv && p.ipc_ns == t.agent_ipc_ns {
            blockers.push(finding(
                "sysv-ipc",
                pid,
                "uses SysV IPC (shared memory or message queues) in the host's IPC namespace".into(),
                "run the program in its own IPC namespace (unshare --ipc) so the objects move with it",
            ));
        }
        for m in &p.mapped {
            if let Some((ma, mi)) = m.rdev
                && !device_allowed(ma, mi)
            {
                blockers.push(finding(
                    "device",
                    pid,
                    format!("maps device {} ({ma}:{mi})", m.path),
                    "unmap the device; only null, zero, random, urandom, terminals and tun can move",
                ));
            }
        }
        for fd in &p.fds {
            let n = fd.fd;
            match &fd.kind {
                FdKind::CharDevice { path, major, minor } | FdKind::BlockDevice { path, major, minor } => {
                    if fd.tty.as_ref().is_some_and(|t| t.pts_index.is_some() || t.master_of.is_some()) {
                        // A pty: its master in the tree, or a terminal of the outside (crate::external).
                    } else if is_terminal(path) {
                        blockers.push(finding(
                            "terminal",
                            pid,
                            format!("fd {n} is the terminal {path}"),
                            "start the program with setsid and its stdio redirected (or inside tmux/screen and migrate that)",
                        ));
                    } else if !device_allowed(*major, *minor) || matches!(fd.kind, FdKind::BlockDevice { .. }) {
                        blockers.push(finding(
                            "device",
                            pid,
                            format!("fd {n} is the device {path} ({major}:{minor})"),
                            "close it before migrating; only null, zero, random, urandom, terminals and tun can move",
                        ));
                    }
                }
                FdKind::Pipe { o_direct: true } => {
                    blockers.push(finding(
                        "pipe-o-direct",
                        pid,
                        format!("fd {n} is a pipe opened with O_DIRECT (packet mode)"),
                        "use a plain pipe; CRIU cannot restore O_DIRECT pipes",
                    ));
                }
                FdKind::Regular { path, deleted: true, .. } => {
                    warnings.push(finding(
                        "deleted-file",
                        pid,
                        format!("fd {n} is the deleted file {path}"),
                        "its content travels in the images; nothing to do unless it is large",
                    ));
                }
                FdKind::Socket(s) => {
                    let ino = s.ino;
                    match (s.family, &s.unix) {
                        (libc::AF_UNIX, Some(u)) => {
                            if !u.name.is_empty() && !u.name.starts_with('/') && !u.name.starts_with('@') {
                                blockers.push(finding(
                                    "unix-relative-path",
                                    pid,
                                    format!("fd {n} (socket {ino}) is bound to the relative path {:?}", u.name),
                                    "bind unix sockets to absolute paths (or abstract names)",
                                ));
                            }
                            // Connections to the outside: crate::external.
                        }
                        (libc::AF_INET | libc::AF_INET6, _)
                            if s.sock_type == libc::SOCK_STREAM && s.protocol == libc::IPPROTO_TCP =>
                        {
                            match s.tcp_state {
                                10 => warnings.push(finding(
                                    "tcp-listen",
                                    pid,
                                    format!("fd {n} listens on TCP (socket {ino})"),
                                    "the same address and port must be free on the target",
                                )),
                                0 | 7 => {}
                                st => blockers.push(finding(
                                    "tcp-established",
                                    pid,
                                    format!("fd {n} is a TCP connection (socket {ino}, state {st})"),
                                    "close the connection before migrating; established TCP connections need the same IP address on the target",
                                )),
                            }
                        }
                        (libc::AF_INET | libc::AF_INET6, _)
                            if s.sock_type == libc::SOCK_DGRAM && s.protocol == libc::IPPROTO_UDP =>
                        {
                            if s.udp_corked {
                                blockers.push(finding(
                                    "udp-corked",
                                    pid,
                                    format!("fd {n} is a corked UDP socket (socket {ino})"),
                                    "uncork it (UDP_CORK 0) before migrating",
                                ));
                            }
                        }
                        (libc::AF_PACKET | libc::AF_NETLINK, _) => {}
                        (fam, _) => blockers.push(finding(
                            "socket-family",
                            pid,
                            format!(
                                "fd {n} is a socket of family {} type {} protocol {} (socket {ino})",
                                family_name(fam),
                                s.sock_type,
                                s.protocol
                            ),
                            "close it; only unix, TCP, UDP, packet and netlink sockets can move",
                        )),
                    }
                }
                _ => {}
            }
        }
        if p.state == 'T' || p.state == 't' {
            warnings.push(finding(
                "stopped",
                pid,
                "the process is stopped".into(),
                "it will be resumed (SIGCONT) if the migration rolls back",
            ));
        }
    }
    blockers.append(&mut external_blockers);
    Report { pid: t.root, processes: t.processes.len(), target: None, blockers, warnings, external }
}

fn family_name(f: i32) -> String {
    match f {
        libc::AF_INET => "AF_INET".into(),
        libc::AF_INET6 => "AF_INET6".into(),
        libc::AF_ALG => "AF_ALG".into(),
        libc::AF_VSOCK => "AF_VSOCK".into(),
        libc::AF_BLUETOOTH => "AF_BLUETOOTH".into(),
        libc::AF_KEY => "AF_KEY".into(),
        0 => "unknown".into(),
        n => format!("{n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::{Fd, Process, Socket, UnixInfo};

    fn tree(fds: Vec<FdKind>) -> Tree {
        let p = Process {
            pid: 100,
            ppid: 1,
            sid: 100,
            comm: "w".into(),
            state: 'S',
            uids: vec![1000; 4],
            elf64: true,
            ipc_ns: 5,
            fds: fds
                .into_iter()
                .enumerate()
                .map(|(i, kind)| Fd { fd: i as i32, kind, locked: false, tty: None })
                .collect(),
            ..Default::default()
        };
        Tree { root: 100, processes: vec![p], agent_ipc_ns: 5, agent_cap_sys_resource: true, ..Default::default() }
    }

    fn codes(r: &Report) -> Vec<&str> {
        r.blockers.iter().map(|f| f.code.as_str()).collect()
    }

    #[test]
    fn clean_tree_has_no_blockers() {
        let t = tree(vec![
            FdKind::CharDevice { path: "/dev/null".into(), major: 1, minor: 3 },
            FdKind::Pipe { o_direct: false },
        ]);
        assert!(judge(&t, 0, &Default::default()).blockers.is_empty());
        assert!(judge(&t, 1000, &Default::default()).blockers.is_empty(), "own process");
        assert_eq!(codes(&judge(&t, 1001, &Default::default())), ["other-user"]);
    }

    #[test]
    fn devices_terminals_pipes() {
        let t = tree(vec![
            FdKind::CharDevice { path: "/dev/kmsg".into(), major: 1, minor: 11 },
            FdKind::CharDevice { path: "/dev/pts/3".into(), major: 136, minor: 3 },
            FdKind::Pipe { o_direct: true },
            FdKind::CharDevice { path: "/dev/net/tun".into(), major: 10, minor: 200 },
        ]);
        assert_eq!(codes(&judge(&t, 0, &Default::default())), ["device", "terminal", "pipe-o-direct"]);
    }

    #[test]
    fn sockets() {
        let unix = |name: &str, peer: u64, peer_name: &str| {
            FdKind::Socket(Socket {
                ino: 10 + peer,
                family: libc::AF_UNIX,
                sock_type: libc::SOCK_STREAM,
                unix: Some(UnixInfo {
                    name: name.into(),
                    peer,
                    peer_name: peer_name.into(),
                    peer_owner: Some((7, "srv".into())),
                    state: 1,
                }),
                ..Default::default()
            })
        };
        let inet = |ty, proto, st, corked| {
            FdKind::Socket(Socket {
                ino: 99,
                family: libc::AF_INET,
                sock_type: ty,
                protocol: proto,
                tcp_state: st,
                udp_corked: corked,
                unix: None,
            })
        };
        let t = tree(vec![
            unix("rel.sock", 0, ""),
            unix("", 1, "/run/srv.sock"),
            unix("", 2, "/tmp/.X11-unix/X0"),
            unix("@abstract", 0, ""),
            inet(libc::SOCK_STREAM, libc::IPPROTO_TCP, 1, false),
            inet(libc::SOCK_STREAM, libc::IPPROTO_TCP, 10, false),
            inet(libc::SOCK_DGRAM, libc::IPPROTO_UDP, 0, true),
            inet(libc::SOCK_RAW, libc::IPPROTO_ICMP, 0, false),
        ]);
        let r = judge(&t, 0, &Default::default());
        assert_eq!(
            codes(&r),
            ["unix-relative-path", "tcp-established", "udp-corked", "socket-family", "external-unix", "graphical"]
        );
        assert!(r.blockers[4].detail.contains("/run/srv.sock") && r.blockers[4].detail.contains("pid 7 (srv)"));
        assert!(r.blockers[4].fix.contains("--unix path:/run/srv.sock=connect"), "{}", r.blockers[4].fix);
        assert_eq!(r.warnings.iter().map(|w| w.code.as_str()).collect::<Vec<_>>(), ["tcp-listen"]);
    }

    #[test]
    fn connection_inside_the_tree_is_fine() {
        let a = FdKind::Socket(Socket {
            ino: 1,
            family: libc::AF_UNIX,
            unix: Some(UnixInfo { peer: 2, ..Default::default() }),
            ..Default::default()
        });
        let b = FdKind::Socket(Socket {
            ino: 2,
            family: libc::AF_UNIX,
            unix: Some(UnixInfo { peer: 1, ..Default::default() }),
            ..Default::default()
        });
        assert!(judge(&tree(vec![a, b]), 0, &Default::default()).blockers.is_empty());
    }

    #[test]
    fn another_users_process_needs_cap_sys_resource() {
        let mut t = tree(vec![]);
        assert!(judge(&t, 0, &Default::default()).blockers.is_empty());
        t.agent_cap_sys_resource = false;
        assert_eq!(codes(&judge(&t, 0, &Default::default())), ["needs-cap-sys-resource"]);
        t.processes[0].uids = vec![0; 4];
        assert!(judge(&t, 0, &Default::default()).blockers.is_empty(), "root's own process needs nothing more");
    }

    #[test]
    fn process_level_rules() {
        let mut t = tree(vec![]);
        t.processes[0].tracer = 4242;
        t.processes[0].elf64 = false;
        t.processes[0].sid = 55;
        t.lock_holders = vec![100];
        t.sysv_users = vec![100];
        assert_eq!(
            codes(&judge(&t, 0, &Default::default())),
            ["tracer", "compat-32bit", "session", "file-lock", "sysv-ipc"]
        );
        t.processes[0].ipc_ns = 6; // its own IPC namespace: SysV objects move with it
        assert!(!codes(&judge(&t, 0, &Default::default())).contains(&"sysv-ipc"));
    }
}
