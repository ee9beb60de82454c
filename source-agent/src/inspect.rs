//! Facts about a process tree, read without changing it: for each process its ids, tracer, ELF class,
//! namespaces, open files (with device numbers, flags and locks), mappings, and sockets. Unix sockets
//! come from sock_diag (NETLINK_SOCK_DIAG over netlink-sys: name, type, state, peer inode); the family,
//! type and options of other sockets are read on a duplicate of the socket taken with pidfd_getfd(2).
//!
//! The facts are plain data so that [`crate::preflight`] can judge them in unit tests without processes.
//! Everything unsafe is in the `sys` module below.

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use criu::tree::Status;
use serde::{Deserialize, Serialize};

/// One process of the tree.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Process {
    pub pid: u32,
    pub ppid: u32,
    pub sid: u32,
    pub comm: String,
    /// State letter from /proc/PID/stat.
    pub state: char,
    /// Real, effective, saved, filesystem uid.
    pub uids: Vec<u32>,
    pub tracer: u32,
    /// False for a 32-bit (compat) executable.
    pub elf64: bool,
    pub kernel_thread: bool,
    /// Inode of /proc/PID/ns/ipc, to compare with the agent's own.
    pub ipc_ns: u64,
    pub fds: Vec<Fd>,
    /// Paths of file-backed mappings (unique).
    pub mapped: Vec<Mapped>,
    pub has_sysv_shm_mapping: bool,
}

/// A file-backed mapping.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Mapped {
    pub path: String,
    /// Device number of the mapped file when it is a device, else None.
    pub rdev: Option<(u32, u32)>,
}

/// What an fd refers to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FdKind {
    Regular { path: String, size: u64, deleted: bool },
    Directory { path: String },
    CharDevice { path: String, major: u32, minor: u32 },
    BlockDevice { path: String, major: u32, minor: u32 },
    Pipe { o_direct: bool },
    Socket(Socket),
    Other { link: String },
}

/// An open file descriptor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Fd {
    pub fd: i32,
    pub kind: FdKind,
    /// The fd's open file description holds a lock (fdinfo `lock:` lines).
    pub locked: bool,
    /// Terminals only (tty, console, ptmx and pts devices).
    #[serde(default)]
    pub tty: Option<Tty>,
}

/// A terminal fd.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Tty {
    /// st_rdev and st_dev of the fd: CRIU names an external terminal `tty[RDEV:DEV]` (hex) by them.
    pub rdev: u64,
    pub dev: u64,
    /// A pty slave (/dev/pts/N): N.
    pub pts_index: Option<u32>,
    /// A pty master (/dev/ptmx): the index of its slave (fdinfo `tty-index:`).
    pub master_of: Option<u32>,
    /// Who outside the tree holds the same terminal, when found: (pid, comm).
    pub owner: Option<(u32, String)>,
}

impl Tty {
    /// CRIU's key for this terminal (`--external tty[..]`, `--inherit-fd fd[N]:tty[..]`).
    pub fn key(&self) -> String {
        format!("tty[{:x}:{:x}]", self.rdev, self.dev)
    }
}

/// A socket, as far as it could be read.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Socket {
    pub ino: u64,
    /// AF_* number, 0 when unknown.
    pub family: i32,
    /// SOCK_* number, 0 when unknown.
    pub sock_type: i32,
    pub protocol: i32,
    /// TCP state number (1 = established, 10 = listen), 0 when not TCP.
    pub tcp_state: u8,
    pub udp_corked: bool,
    /// Unix sockets only (sock_diag).
    pub unix: Option<UnixInfo>,
}

/// A unix socket from sock_diag.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct UnixInfo {
    /// Bound name: a path, "@name" for abstract names, empty when unbound.
    pub name: String,
    /// Peer inode, 0 when not connected.
    pub peer: u64,
    /// The peer's bound name (for an accepted connection: the listener's path).
    pub peer_name: String,
    /// Who holds the peer, when found in /proc: (pid, comm).
    pub peer_owner: Option<(u32, String)>,
    pub state: u8,
}

/// The facts about a tree.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tree {
    pub root: u32,
    pub processes: Vec<Process>,
    /// This agent's pid and IPC namespace, to tell "shares the host's IPC namespace".
    pub agent_ipc_ns: u64,
    /// This agent has CAP_SYS_RESOURCE: CRIU needs it to read the rlimits (prlimit(2)) of a process
    /// of another user.
    pub agent_cap_sys_resource: bool,
    /// This agent's uid.
    pub agent_uid: u32,
    /// Pids with locks in /proc/locks.
    pub lock_holders: Vec<u32>,
    /// Pids that created or last used a SysV shm segment or message queue (/proc/sysvipc).
    pub sysv_users: Vec<u32>,
}

impl Tree {
    /// Every pid of the tree.
    pub fn pids(&self) -> Vec<u32> {
        self.processes.iter().map(|p| p.pid).collect()
    }

    /// Regular files the tree holds open or maps, with sizes, for the target to check.
    pub fn files(&self) -> Vec<(String, u64)> {
        let mut out: HashMap<String, u64> = HashMap::new();
        for p in &self.processes {
            for fd in &p.fds {
                if let FdKind::Regular { path, size, deleted: false } = &fd.kind {
                    out.insert(path.clone(), *size);
                }
            }
            for m in &p.mapped {
                if m.rdev.is_none()
                    && m.path.starts_with('/')
                    && let Ok(md) = std::fs::metadata(&m.path)
                {
                    out.entry(m.path.clone()).or_insert(md.len());
                }
            }
        }
        let mut v: Vec<_> = out.into_iter().collect();
        v.sort();
        v
    }
}

/// Reads the facts of the tree rooted at `root`.
pub fn tree(root: u32) -> std::io::Result<Tree> {
    let pids = criu::tree::processes(root)?;
    let unix = sockdiag::unix_sockets().unwrap_or_else(|e| {
        tracing::warn!("sock_diag failed, unix socket peers unknown: {e}");
        HashMap::new()
    });
    let owners = socket_owners(&pids);
    let mut processes = Vec::new();
    for &pid in &pids {
        processes.push(process(pid, &unix, &owners));
    }
    let ttys = tty_owners(&processes, &pids);
    for p in &mut processes {
        for fd in &mut p.fds {
            if let Some(t) = &mut fd.tty {
                t.owner = ttys.get(&t.rdev).cloned();
            }
        }
    }
    Ok(Tree {
        root,
        processes,
        agent_ipc_ns: ns_ino("self", "ipc"),
        agent_cap_sys_resource: agent_has_cap(24),
        agent_uid: nix::unistd::getuid().as_raw(),
        lock_holders: lock_holders(),
        sysv_users: sysv_users(),
    })
}

/// Whether this agent has capability number `cap` in its effective set.
fn agent_has_cap(cap: u32) -> bool {
    let status = Status::read_self().unwrap_or_default();
    u64::from_str_radix(status.field("CapEff:"), 16).is_ok_and(|bits| bits & (1 << cap) != 0)
}

fn ns_ino(pid: &str, ns: &str) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/ns/{ns}")).map(|m| m.ino()).unwrap_or(0)
}

fn process(pid: u32, unix: &HashMap<u64, sockdiag::UnixDiag>, owners: &HashMap<u64, (u32, String)>) -> Process {
    let base = format!("/proc/{pid}");
    let status = Status::read(pid).unwrap_or_default();
    let stat = std::fs::read_to_string(format!("{base}/stat")).unwrap_or_default();
    let after: Vec<&str> = stat.rfind(')').map(|i| stat[i + 2..].split_whitespace().collect()).unwrap_or_default();
    let num = |i: usize| after.get(i).and_then(|v| v.parse::<u32>().ok()).unwrap_or(0);
    let flags = after.get(6).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let mut elf = [0u8; 5];
    let elf64 = match std::fs::File::open(format!("{base}/exe")) {
        Ok(mut f) => std::io::Read::read_exact(&mut f, &mut elf).map(|_| elf[4] != 1).unwrap_or(true),
        Err(_) => true,
    };
    let maps = std::fs::read_to_string(format!("{base}/maps")).unwrap_or_default();
    let mut mapped: Vec<Mapped> = Vec::new();
    let mut has_sysv_shm_mapping = false;
    for line in maps.lines() {
        let cols: Vec<&str> = line.splitn(6, ' ').collect();
        let Some(path) = cols.get(5).map(|p| p.trim()) else {
            continue;
        };
        if path.starts_with("/SYSV") {
            has_sysv_shm_mapping = true;
        }
        if !path.starts_with('/') || mapped.iter().any(|m| m.path == path) {
            continue;
        }
        let rdev = std::fs::metadata(path)
            .ok()
            .filter(|m| m.file_type().is_char_device() || m.file_type().is_block_device())
            .map(|m| (major(m.rdev()), minor(m.rdev())));
        mapped.push(Mapped { path: path.to_string(), rdev });
    }
    Process {
        pid,
        ppid: num(1),
        sid: num(3),
        comm: criu::tree::comm(pid),
        state: after.first().and_then(|s| s.chars().next()).unwrap_or('?'),
        uids: status.uids(),
        tracer: status.field("TracerPid:").parse().unwrap_or(0),
        elf64,
        kernel_thread: flags & 0x0020_0000 != 0, // PF_KTHREAD
        ipc_ns: ns_ino(&pid.to_string(), "ipc"),
        fds: fds(pid, unix, owners),
        mapped,
        has_sysv_shm_mapping,
    }
}

/// tty (4), console/ptmx (5) and Unix98 pty slaves (136-143).
pub fn is_tty_major(major: u32) -> bool {
    matches!(major, 4 | 5 | 136..=143)
}

fn major(dev: u64) -> u32 {
    (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff)) as u32
}

fn minor(dev: u64) -> u32 {
    (((dev >> 12) & 0xffff_ff00) | (dev & 0xff)) as u32
}

fn fds(pid: u32, unix: &HashMap<u64, sockdiag::UnixDiag>, owners: &HashMap<u64, (u32, String)>) -> Vec<Fd> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let tcp = tcp_states(pid);
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Ok(fd) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let link = std::fs::read_link(e.path()).map(|l| l.to_string_lossy().into_owned()).unwrap_or_default();
        let fdinfo = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
        let flags = fdinfo
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u64::from_str_radix(f.trim(), 8).ok())
            .unwrap_or(0);
        let locked = fdinfo.lines().any(|l| l.starts_with("lock:"));
        let mut tty = None;
        let kind = if let Some(ino) = link.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
            let ino: u64 = ino.parse().unwrap_or(0);
            FdKind::Socket(socket(pid, fd, ino, unix, owners, &tcp))
        } else if link.starts_with("pipe:[") {
            FdKind::Pipe { o_direct: flags & libc::O_DIRECT as u64 != 0 }
        } else if link.starts_with('/') {
            let deleted = link.ends_with(" (deleted)");
            match std::fs::metadata(e.path()) {
                Ok(m) if m.file_type().is_char_device() => {
                    let (ma, mi) = (major(m.rdev()), minor(m.rdev()));
                    if is_tty_major(ma) {
                        tty = Some(Tty {
                            rdev: m.rdev(),
                            dev: m.dev(),
                            pts_index: (136..=143).contains(&ma).then_some((ma - 136) * 256 + mi),
                            master_of: fdinfo
                                .lines()
                                .find_map(|l| l.strip_prefix("tty-index:"))
                                .and_then(|v| v.trim().parse().ok()),
                            owner: None,
                        });
                    }
                    FdKind::CharDevice { path: link, major: ma, minor: mi }
                }
                Ok(m) if m.file_type().is_block_device() => {
                    FdKind::BlockDevice { path: link, major: major(m.rdev()), minor: minor(m.rdev()) }
                }
                Ok(m) if m.is_dir() => FdKind::Directory { path: link },
                Ok(m) if m.is_file() => FdKind::Regular { path: link, size: m.len(), deleted },
                _ => FdKind::Other { link },
            }
        } else {
            FdKind::Other { link }
        };
        out.push(Fd { fd, kind, locked, tty });
    }
    out.sort_by_key(|f| f.fd);
    out
}

fn socket(
    pid: u32,
    fd: i32,
    ino: u64,
    unix: &HashMap<u64, sockdiag::UnixDiag>,
    owners: &HashMap<u64, (u32, String)>,
    tcp: &HashMap<u64, u8>,
) -> Socket {
    let mut s = Socket { ino, ..Default::default() };
    if let Some(u) = unix.get(&ino) {
        s.family = libc::AF_UNIX;
        s.sock_type = u.sock_type as i32;
        let peer_name = unix.get(&u.peer).map(|p| p.name.clone()).unwrap_or_default();
        s.unix = Some(UnixInfo {
            name: u.name.clone(),
            peer: u.peer,
            peer_name,
            peer_owner: if u.peer != 0 { owners.get(&u.peer).cloned() } else { None },
            state: u.state,
        });
        return s;
    }
    if let Some(o) = sys::socket_options(pid, fd) {
        s.family = o.family;
        s.sock_type = o.sock_type;
        s.protocol = o.protocol;
        s.udp_corked = o.udp_corked;
    }
    s.tcp_state = tcp.get(&ino).copied().unwrap_or(0);
    s
}

/// inode -> TCP state, from the process' own network namespace view.
fn tcp_states(pid: u32) -> HashMap<u64, u8> {
    let mut out = HashMap::new();
    for f in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if let (Some(st), Some(ino)) = (cols.get(3), cols.get(9))
                && let (Ok(st), Ok(ino)) = (u8::from_str_radix(st, 16), ino.parse::<u64>())
            {
                out.insert(ino, st);
            }
        }
    }
    out
}

/// socket inode -> (pid, comm) of a process holding it, one outside the tree when there is one (the
/// peer of an external connection may also have been passed into the tree).
fn socket_owners(tree: &[u32]) -> HashMap<u64, (u32, String)> {
    sockdiag::holders()
        .into_iter()
        .filter_map(|(ino, hs)| {
            let &(pid, _) = hs.iter().find(|(p, _)| !tree.contains(p)).or(hs.first())?;
            Some((ino, (pid, criu::tree::comm(pid))))
        })
        .collect()
}

/// Terminal rdev -> (pid, comm) of a process outside the tree that holds it (the user's shell, a tmux
/// client, ...), for the terminals of the tree that are not its own ptys.
fn tty_owners(processes: &[Process], tree: &[u32]) -> HashMap<u64, (u32, String)> {
    let wanted: Vec<u64> =
        processes.iter().flat_map(|p| p.fds.iter()).filter_map(|f| f.tty.as_ref().map(|t| t.rdev)).collect();
    let mut out = HashMap::new();
    if wanted.is_empty() {
        return out;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    let mut pids: Vec<u32> = procs.flatten().filter_map(|p| p.file_name().to_string_lossy().parse().ok()).collect();
    pids.sort_unstable();
    for pid in pids.into_iter().filter(|p| !tree.contains(p)) {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(m) = std::fs::metadata(fd.path())
                && m.file_type().is_char_device()
                && wanted.contains(&m.rdev())
            {
                out.entry(m.rdev()).or_insert_with(|| (pid, criu::tree::comm(pid)));
            }
        }
    }
    out
}

fn lock_holders() -> Vec<u32> {
    let text = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; "->" lines are blocked waiters.
    text.lines().filter(|l| !l.contains("->")).filter_map(|l| l.split_whitespace().nth(4)?.parse().ok()).collect()
}

fn sysv_users() -> Vec<u32> {
    let mut out = Vec::new();
    for (file, cols) in [("shm", &["cpid", "lpid"][..]), ("msg", &["lspid", "lrpid"][..])] {
        let text = std::fs::read_to_string(format!("/proc/sysvipc/{file}")).unwrap_or_default();
        let mut lines = text.lines();
        let Some(header) = lines.next() else { continue };
        let names: Vec<&str> = header.split_whitespace().collect();
        let idx: Vec<usize> = cols.iter().filter_map(|c| names.iter().position(|n| n == c)).collect();
        for l in lines {
            let v: Vec<&str> = l.split_whitespace().collect();
            out.extend(idx.iter().filter_map(|&i| v.get(i)?.parse::<u32>().ok()));
        }
    }
    out
}

/// Reading another process' socket options on a duplicate (pidfd_getfd).
mod sys {
    use std::os::fd::{AsRawFd, RawFd};

    /// Family, type, protocol and UDP_CORK of another process' socket fd.
    pub struct SockOpts {
        pub family: i32,
        pub sock_type: i32,
        pub protocol: i32,
        pub udp_corked: bool,
    }

    fn getsockopt_int(fd: RawFd, level: i32, name: i32) -> Option<i32> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: v and len are valid for writes of the sizes given; fd is an open socket we own.
        let r = unsafe { libc::getsockopt(fd, level, name, (&mut v as *mut libc::c_int).cast(), &mut len) };
        (r == 0).then_some(v)
    }

    pub fn socket_options(pid: u32, fd: i32) -> Option<SockOpts> {
        let dup = sockdiag::dup_from(pid, fd).ok()?;
        let raw = dup.as_raw_fd();
        let family = getsockopt_int(raw, libc::SOL_SOCKET, libc::SO_DOMAIN)?;
        let sock_type = getsockopt_int(raw, libc::SOL_SOCKET, libc::SO_TYPE)?;
        let protocol = getsockopt_int(raw, libc::SOL_SOCKET, libc::SO_PROTOCOL).unwrap_or(0);
        let udp_corked =
            protocol == libc::IPPROTO_UDP && getsockopt_int(raw, libc::SOL_UDP, libc::UDP_CORK).unwrap_or(0) != 0;
        Some(SockOpts { family, sock_type, protocol, udp_corked })
    }
}
