//! Unix sockets as the kernel sees them, for both agents: every unix socket of this network namespace
//! with its name, type, state and peer inode (NETLINK_SOCK_DIAG over netlink-sys, [`unix_sockets`]),
//! which processes hold a socket ([`holders`], from /proc), and a duplicate of another process' fd
//! ([`dup_from`], pidfd_getfd(2)).
//!
//! The source agent uses them to find the tree's connections to the outside; the target agent to find
//! who holds the other end of a socket it handed in, to put back bytes that were unread at the freeze.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// One unix socket as sock_diag reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnixDiag {
    /// SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET.
    pub sock_type: u8,
    /// TCP-style state number: 1 established, 7 close (unconnected), 10 listen.
    pub state: u8,
    /// Bound name: a path, "@name" for an abstract name, empty when unbound.
    pub name: String,
    /// Inode of the peer, 0 when not connected.
    pub peer: u64,
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const UDIAG_SHOW_NAME: u32 = 1;
const UDIAG_SHOW_PEER: u32 = 4;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_PEER: u16 = 2;

/// Every unix socket of this network namespace, by inode.
pub fn unix_sockets() -> std::io::Result<HashMap<u64, UnixDiag>> {
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};
    let mut sock = Socket::new(NETLINK_SOCK_DIAG)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    // nlmsghdr (16) + unix_diag_req (24)
    let mut req = Vec::with_capacity(40);
    req.extend_from_slice(&40u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // port id
    req.push(libc::AF_UNIX as u8); // sdiag_family
    req.push(0); // sdiag_protocol
    req.extend_from_slice(&0u16.to_ne_bytes()); // pad
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // all states
    req.extend_from_slice(&0u32.to_ne_bytes()); // ino
    req.extend_from_slice(&(UDIAG_SHOW_NAME | UDIAG_SHOW_PEER).to_ne_bytes());
    req.extend_from_slice(&[0xff; 8]); // cookie: none
    sock.send(&req, 0)?;
    let mut out = HashMap::new();
    loop {
        let (buf, _) = sock.recv_from_full()?;
        let mut off = 0;
        while off + 16 <= buf.len() {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4")) as usize;
            let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().expect("2"));
            if len < 16 || off + len > buf.len() {
                return Err(std::io::Error::other("malformed sock_diag answer"));
            }
            match ty {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    if len < 20 {
                        return Err(std::io::Error::other("malformed sock_diag error"));
                    }
                    let errno = i32::from_ne_bytes(buf[off + 16..off + 20].try_into().expect("4"));
                    return Err(std::io::Error::from_raw_os_error(-errno));
                }
                SOCK_DIAG_BY_FAMILY => {
                    if let Some((ino, d)) = parse_unix(&buf[off + 16..off + len]) {
                        out.insert(ino, d);
                    }
                }
                _ => {}
            }
            off += (len + 3) & !3;
        }
    }
}

/// unix_diag_msg (16 bytes) then rtattrs.
fn parse_unix(m: &[u8]) -> Option<(u64, UnixDiag)> {
    if m.len() < 16 {
        return None;
    }
    let ino = u32::from_ne_bytes(m[4..8].try_into().ok()?) as u64;
    let mut d = UnixDiag { sock_type: m[1], state: m[2], name: String::new(), peer: 0 };
    let mut off = 16;
    while off + 4 <= m.len() {
        let alen = u16::from_ne_bytes(m[off..off + 2].try_into().ok()?) as usize;
        let aty = u16::from_ne_bytes(m[off + 2..off + 4].try_into().ok()?);
        if alen < 4 || off + alen > m.len() {
            break;
        }
        let data = &m[off + 4..off + alen];
        match aty {
            UNIX_DIAG_NAME if !data.is_empty() => {
                d.name = if data[0] == 0 {
                    format!("@{}", String::from_utf8_lossy(&data[1..]))
                } else {
                    String::from_utf8_lossy(data.split(|&b| b == 0).next().unwrap_or(data)).into_owned()
                };
            }
            UNIX_DIAG_PEER if data.len() >= 4 => d.peer = u32::from_ne_bytes(data[..4].try_into().ok()?) as u64,
            _ => {}
        }
        off += (alen + 3) & !3;
    }
    Some((ino, d))
}

/// The inode in an fd link such as `socket:[1234]`.
pub fn socket_ino(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// socket inode -> every (pid, fd) holding it, over all of /proc (as this process sees it). Processes
/// are visited in pid order, so the first holder of a socket is the oldest process holding it.
pub fn holders() -> HashMap<u64, Vec<(u32, i32)>> {
    let mut out: HashMap<u64, Vec<(u32, i32)>> = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    let mut pids: Vec<u32> = procs.flatten().filter_map(|p| p.file_name().to_string_lossy().parse().ok()).collect();
    pids.sort_unstable();
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(n) = fd.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if let Some(ino) = socket_ino(&link.to_string_lossy()) {
                out.entry(ino).or_default().push((pid, n));
            }
        }
    }
    out
}

/// A duplicate of fd `fd` of process `pid` (pidfd_getfd(2); needs ptrace access to the process). The
/// duplicate shares the open file description: reading or writing it acts on the same socket.
pub fn dup_from(pid: u32, fd: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pidfd was just returned by the kernel and is owned only here.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    // SAFETY: pidfd_getfd duplicates fd `fd` of the process into this one (it does not change the other
    // process); returns a new fd (close-on-exec) or -1.
    let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if dup < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: dup was just returned by the kernel and is owned only here.
    Ok(unsafe { OwnedFd::from_raw_fd(dup as RawFd) })
}

/// The inode of a socket this process holds.
pub fn inode_of(fd: &impl AsRawFd) -> std::io::Result<u64> {
    // SAFETY: an all-zero stat is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into st, which is valid for writes; the fd is open for the call's duration.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.st_ino)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};

    #[test]
    fn sees_a_connection_and_its_holders() {
        let dir = std::env::temp_dir().join(format!("sockdiag-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("l.sock");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let c = UnixStream::connect(&path).unwrap();
        let (a, _) = l.accept().unwrap();
        let all = unix_sockets().unwrap();
        let (ci, ai, li) = (inode_of(&c).unwrap(), inode_of(&a).unwrap(), inode_of(&l).unwrap());
        assert_eq!(all[&ci].peer, ai);
        assert_eq!(all[&ai].peer, ci);
        assert_eq!(all[&ai].name, path.to_string_lossy(), "the accepted end reports the listener's path");
        assert_eq!(all[&li].state, 10);
        assert_eq!(all[&ci].sock_type, libc::SOCK_STREAM as u8);
        let h = holders();
        let me = std::process::id();
        assert_eq!(h[&ai], vec![(me, a.as_raw_fd())]);
        // A duplicate taken through pidfd_getfd is the same socket: bytes written there arrive at c.
        let dup = dup_from(me, a.as_raw_fd()).unwrap();
        assert_eq!(inode_of(&dup).unwrap(), ai);
        let dup = UnixStream::from(dup);
        std::io::Write::write_all(&mut &dup, b"hi").unwrap();
        let mut buf = [0u8; 2];
        std::io::Read::read_exact(&mut &c, &mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn parse_rejects_short_messages() {
        assert!(parse_unix(&[0; 8]).is_none());
        assert_eq!(socket_ino("socket:[42]"), Some(42));
        assert_eq!(socket_ino("pipe:[42]"), None);
    }
}
