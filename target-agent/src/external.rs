//! The tree's connections to the outside, set up again on this host: the source decided a policy for
//! each (the source agent's `external.rs`) and dumped them as CRIU externals; Prepare carries the plan.
//!
//! - At Prepare ([`check`]): every path and broker named exists here, the terminals the tree owns are
//!   free here; otherwise a blocker, and nothing is frozen on the source.
//! - Before the restore ([`hand_over`]), for each unix stream or seqpacket socket: a new socket, by
//!   `connect` (to the path), `broker` (an fd from the broker, see the `broker` crate) or `hangup` (one
//!   end of a fresh socketpair whose other end is closed), handed to CRIU as `--inherit-fd
//!   fd[N]:socket:[INO]`. Datagram sockets cannot be handed in (CRIU's restore then hangs); CRIU
//!   reconnects them by path itself (`--ext-unix-sk`), and re-injects their queue.
//! - Unread bytes: CRIU saves an external stream socket's receive queue (`sk-queues.img`) but never puts
//!   it back. They go into the new socket's other end before the restore, so that they are the first
//!   thing the restored process reads: written into the socketpair's other end (hangup), by the broker
//!   when it says so, or else into the peer's own socket, found through sock_diag and /proc and
//!   duplicated with pidfd_getfd. A peer that writes on its own right after accepting races with that
//!   write; what it wrote before is read back out and put after the replayed bytes.
//! - Terminals of the outside (hangup): a fresh pty whose slave is handed in (`--inherit-fd
//!   fd[N]:tty[RDEV:DEV]`); its master stays open until CRIU is done (CRIU sets the terminal up and
//!   fails on a hung-up one), then is closed, so the restored program sees its terminal gone. The new
//!   pty must not take an index the tree's own ptys need (CRIU reopens those with their old index).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use protocol::pb::{self, external_unix::Action};

/// Most external connections one Prepare may carry.
pub const MAX_EXTERNALS: usize = 1024;
/// Most unread bytes replayed into one socket.
pub const MAX_QUEUED: usize = 8 << 20;
/// How long a broker may take to answer.
const BROKER_TIMEOUT: Duration = Duration::from_secs(45);
/// How long a peer may take to accept a connection (the unread bytes go into its end of it).
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

fn blocker(code: &str, pid: u32, detail: String, fix: String) -> pb::Finding {
    pb::Finding { code: code.into(), pid, detail, fix }
}

fn type_ok(t: u32) -> bool {
    matches!(t as i32, libc::SOCK_STREAM | libc::SOCK_DGRAM | libc::SOCK_SEQPACKET)
}

/// A name from the wire that may be connected to: an absolute path or `@abstract`, bounded.
fn name_ok(p: &str) -> bool {
    (p.starts_with('/') || p.starts_with('@')) && p.len() < 108 && !p.contains('\0')
}

/// `tty[HEX:HEX]`.
fn tty_key_ok(k: &str) -> bool {
    k.strip_prefix("tty[").and_then(|r| r.strip_suffix(']')).and_then(|r| r.split_once(':')).is_some_and(|(a, b)| {
        !a.is_empty()
            && !b.is_empty()
            && a.len() <= 16
            && b.len() <= 16
            && a.chars().chain(b.chars()).all(|c| c.is_ascii_hexdigit())
    })
}

/// What stops this host from setting the tree's outside connections up again (Prepare).
pub fn check(prepare: &pb::Prepare, host: &str) -> Vec<pb::Finding> {
    let mut out = Vec::new();
    if prepare.external_unix.len() + prepare.external_tty.len() + prepare.own_ptys.len() > MAX_EXTERNALS {
        out.push(blocker(
            "external-count",
            0,
            format!("more than {MAX_EXTERNALS} outside connections"),
            "close some of the tree's connections to the outside".into(),
        ));
        return out;
    }
    let is_socket = |p: &str| {
        use std::os::unix::fs::FileTypeExt;
        std::fs::metadata(p).map(|m| m.file_type().is_socket())
    };
    for u in &prepare.external_unix {
        let bad =
            |what: &str| blocker("bad-external", u.pid, format!("socket {}: {what}", u.ino), "report this bug".into());
        if u.ino == 0 || !type_ok(u.sock_type) {
            out.push(bad("no inode or an unknown socket type"));
            continue;
        }
        match &u.action {
            None => out.push(bad("no action")),
            Some(Action::Connect(p)) if !name_ok(p) => out.push(bad(&format!("{p:?} cannot be connected to"))),
            Some(Action::Connect(p)) if p.starts_with('/') => {
                if let Err(e) | Ok(Err(e)) =
                    is_socket(p).map(|s| if s { Ok(()) } else { Err(std::io::Error::other("not a unix socket")) })
                {
                    out.push(blocker(
                        "external-path",
                        u.pid,
                        format!("socket {} is to connect to {p}, but there is no socket there on {host}: {e}", u.ino),
                        format!(
                            "start the program that listens at {p} on {host} first, or choose another policy \
                             (--unix ino:{}=broker or =hangup, or connect:OTHER-PATH)",
                            u.ino
                        ),
                    ));
                }
            }
            Some(Action::Connect(_)) => {} // abstract: only a connect would tell, and that is not harmless
            Some(Action::Broker(b)) if !name_ok(b) => out.push(bad(&format!("broker {b:?} cannot be connected to"))),
            Some(Action::Broker(b)) => {
                if b.starts_with('/') && !is_socket(b).unwrap_or(false) {
                    out.push(blocker(
                        "no-broker",
                        u.pid,
                        format!(
                            "socket {} is to come from the broker at {b}, but no broker listens there on {host}",
                            u.ino
                        ),
                        format!(
                            "start migrate-broker on {host} (see deploy/broker.toml) or an application acting as \
                             broker at {b}; or choose another policy for it"
                        ),
                    ));
                }
            }
            Some(Action::Hangup(_)) => {}
        }
        if u.sock_type as i32 == libc::SOCK_DGRAM && !matches!(u.action, Some(Action::Connect(_))) {
            out.push(bad("a datagram socket can only be reconnected"));
        }
    }
    for t in &prepare.external_tty {
        if !tty_key_ok(&t.key) {
            out.push(blocker(
                "bad-external",
                t.pid,
                format!("{:?} is not a terminal key", t.key),
                "report this bug".into(),
            ));
        }
    }
    for &n in &prepare.own_ptys {
        if Path::new(&format!("/dev/pts/{n}")).exists() {
            out.push(blocker(
                "pty-taken",
                0,
                format!("the tree's terminal /dev/pts/{n} is taken on {host}; CRIU restores each pty with its index"),
                format!("close /dev/pts/{n} on {host}, or give the target agent its own devpts instance"),
            ));
        }
    }
    out
}

/// What goes into `criu restore`: the fds to inherit (and whatever must stay open until it is done).
#[derive(Default)]
pub struct Handover {
    /// (CRIU key, fd): `socket:[INO]` or `tty[RDEV:DEV]`.
    pub inherit: Vec<(String, RawFd)>,
    /// `--ext-unix-sk`: CRIU reconnects datagram sockets itself.
    pub ext_unix_sk: bool,
    /// The fds in `inherit`, owned here.
    files: Vec<OwnedFd>,
    /// Pty masters of the terminals handed in: closed after the restore.
    masters: Vec<OwnedFd>,
}

impl Handover {
    /// Closes the handed-in files (CRIU has its own copies once it ran) and keeps the pty masters, to be
    /// dropped once the copy runs.
    pub fn into_masters(self) -> Vec<OwnedFd> {
        self.masters
    }

    /// Lines for the log.
    pub fn describe(&self) -> String {
        self.inherit.iter().map(|(k, fd)| format!("fd[{fd}]:{k}")).collect::<Vec<_>>().join(" ")
    }
}

/// Sets up every outside connection of the plan (blocking: connects, asks brokers, waits for peers to
/// accept). `images` holds the dump (for the unread bytes).
pub fn hand_over(prepare: &pb::Prepare, images: &Path) -> Result<Handover, String> {
    let mut h = Handover::default();
    for u in &prepare.external_unix {
        let what = format!(
            "socket {} (fd {} of pid {}, peer {:?})",
            u.ino,
            u.fd,
            u.pid,
            if u.peer_name.is_empty() { &u.name } else { &u.peer_name }
        );
        if u.sock_type as i32 == libc::SOCK_DGRAM {
            h.ext_unix_sk = true;
            continue;
        }
        let queued = criu::images::queued_bytes(images, u.ino, MAX_QUEUED)
            .map_err(|e| format!("{what}: its unread bytes: {e}"))?;
        if !queued.is_empty() && u.sock_type as i32 == libc::SOCK_SEQPACKET {
            // Their message boundaries are not kept by this agent yet: refuse rather than merge them.
            return Err(format!(
                "{what}: {} unread bytes in a seqpacket socket cannot be put back as the messages they were; \
                 migrate once the program has read them",
                queued.len()
            ));
        }
        let fd = match &u.action {
            Some(Action::Connect(path)) => {
                let s = broker::socket::connect(path, sock_type(u)).map_err(|e| format!("{what}: {e}"))?;
                if !queued.is_empty() {
                    replay_via_peer(&s, &queued).map_err(|e| format!("{what}: {e}"))?;
                }
                s
            }
            Some(Action::Broker(at)) => from_broker(prepare, u, at, &queued).map_err(|e| format!("{what}: {e}"))?,
            Some(Action::Hangup(_)) => {
                let (mine, other) = socketpair(u.sock_type as i32).map_err(|e| format!("{what}: socketpair: {e}"))?;
                if !queued.is_empty() {
                    broker::socket::put_queued(&other, &[&queued], broker::SockType::Stream)
                        .map_err(|e| format!("{what}: {e}"))?;
                }
                drop(other); // the peer has gone: after the unread bytes, EOF
                mine
            }
            None => return Err(format!("{what}: no action")),
        };
        tracing::info!(ino = u.ino, queued = queued.len(), fd = fd.as_raw_fd(), "outside connection handed in");
        h.inherit.push((format!("socket:[{}]", u.ino), fd.as_raw_fd()));
        h.files.push(fd);
    }
    for t in &prepare.external_tty {
        let (master, slave) = pty_avoiding(&prepare.own_ptys)
            .map_err(|e| format!("terminal {} (fd {} of pid {}): cannot open a pty: {e}", t.path, t.fd, t.pid))?;
        h.inherit.push((t.key.clone(), slave.as_raw_fd()));
        h.files.push(slave);
        h.masters.push(master);
    }
    Ok(h)
}

fn from_broker(prepare: &pb::Prepare, u: &pb::ExternalUnix, at: &str, queued: &[u8]) -> Result<OwnedFd, String> {
    let mut req = broker::Request::new(prepare.migration_id.clone(), u.ino, sock_type(u));
    req.name = u.name.clone();
    req.peer_name = u.peer_name.clone();
    req.peer_pid = u.peer_pid;
    req.peer_comm = u.peer_comm.clone();
    req.tag = u.rule.clone();
    req.queued = queued.to_vec();
    match broker::request(Path::new(at), &req, BROKER_TIMEOUT).map_err(|e| e.to_string())? {
        broker::Answer::Refused { reason } => Err(format!("the broker at {at} refused: {reason}")),
        broker::Answer::Socket { fd, replayed } => {
            if !replayed && !queued.is_empty() {
                replay_via_peer(&fd, queued)?;
            }
            Ok(fd)
        }
    }
}

/// The broker crate's name for a stream or seqpacket socket of the plan (datagram sockets are not
/// handed in).
fn sock_type(u: &pb::ExternalUnix) -> broker::SockType {
    match u.sock_type as i32 {
        libc::SOCK_SEQPACKET => broker::SockType::Seqpacket,
        _ => broker::SockType::Stream,
    }
}

fn socketpair(ty: i32) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two new fds into the array on success.
    if unsafe { libc::socketpair(libc::AF_UNIX, ty | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned only here.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Puts `bytes` in front of whatever `mine`'s peer sends: writes them into the peer's own socket (a
/// duplicate of it, taken from the process holding it, once it holds it: a server must accept first).
fn replay_via_peer(mine: &OwnedFd, bytes: &[u8]) -> Result<(), String> {
    let ino = sockdiag::inode_of(mine).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + ACCEPT_TIMEOUT;
    let (pid, fd) = loop {
        let peer = sockdiag::unix_sockets()
            .map_err(|e| format!("cannot read unix sockets (sock_diag): {e}"))?
            .get(&ino)
            .map(|d| d.peer)
            .unwrap_or(0);
        // Until the server accepts, the other end is an embryo without an inode (peer 0).
        if peer != 0
            && let Some(&h) = sockdiag::holders().get(&peer).and_then(|hs| hs.first())
        {
            break h;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} unread bytes cannot be put back: no process took the other end of the new connection within \
                 {} s (a server that does not accept, a peer outside this host's pid namespace, or one that closed \
                 the connection at once)",
                bytes.len(),
                ACCEPT_TIMEOUT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let theirs = sockdiag::dup_from(pid, fd)
        .map_err(|e| format!("cannot reach the peer's socket (pid {pid} fd {fd}) to put back unread bytes: {e}"))?;
    // What the peer already sent (a greeting on accept) comes after the unread bytes.
    let early = drain(mine);
    let mut all = bytes.to_vec();
    all.extend_from_slice(&early);
    broker::socket::put_queued(&theirs, &[&all], broker::SockType::Stream)?;
    // The peer may have written again between the drain and this write: then its bytes are in front.
    let mut head = vec![0u8; bytes.len()];
    // SAFETY: recv writes at most head.len() bytes into head; MSG_PEEK leaves them queued.
    let n = unsafe {
        libc::recv(mine.as_raw_fd(), head.as_mut_ptr().cast(), head.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT)
    };
    if n < 0 || n as usize != bytes.len() || head != bytes {
        return Err(format!(
            "{} unread bytes could not be put in front: the peer (pid {pid}) wrote at the same instant; retry the \
             migration",
            bytes.len()
        ));
    }
    tracing::info!(pid, fd, bytes = bytes.len(), early = early.len(), "unread bytes put back through the peer");
    Ok(())
}

/// Everything readable now on `fd`, without blocking.
fn drain(fd: &OwnedFd) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        // SAFETY: recv writes at most buf.len() bytes into buf.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n <= 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n as usize]);
    }
}

/// A new pty (master, slave) whose index is none of `avoid`. Ptys with such an index are held while
/// looking (so that the next one gets another index) and closed at the end, leaving them to CRIU.
fn pty_avoiding(avoid: &[u32]) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut skipped = Vec::new();
    for _ in 0..=avoid.len() {
        // SAFETY: posix_openpt returns a new fd or -1.
        let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        if m < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: m was just returned and is owned only here.
        let master = unsafe { OwnedFd::from_raw_fd(m) };
        let mut index: libc::c_uint = 0;
        // SAFETY: TIOCGPTN writes the slave's index into `index`; unlockpt takes the master fd.
        if unsafe { libc::ioctl(m, libc::TIOCGPTN, &mut index) } != 0 || unsafe { libc::unlockpt(m) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if avoid.contains(&index) {
            skipped.push(master);
            continue;
        }
        // TIOCGPTPEER opens the slave of this very master (no path lookup, whatever devpts is mounted).
        // SAFETY: ioctl returns a new fd or -1.
        let s = unsafe { libc::ioctl(m, libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        if s < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: s was just returned and is owned only here.
        let slave = unsafe { OwnedFd::from_raw_fd(s) };
        drop(skipped);
        return Ok((master, slave));
    }
    Err(std::io::Error::other("every pty opened had an index the tree needs"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};

    #[test]
    fn keys_and_names_from_the_wire_are_checked() {
        assert!(tty_key_ok("tty[8801:1a]"));
        for bad in ["tty[8801]", "tty[:1a]", "tty[zz:1]", "socket:[1]", "tty[8801:1a]x"] {
            assert!(!tty_key_ok(bad), "{bad}");
        }
        assert!(name_ok("/run/a.sock") && name_ok("@abs"));
        assert!(!name_ok("rel.sock") && !name_ok(&format!("/{}", "x".repeat(200))) && !name_ok("/a\0b"));
    }

    #[test]
    fn check_names_missing_paths_and_brokers() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live.sock");
        let _l = UnixListener::bind(&live).unwrap();
        let unix = |ino, ty: i32, action| pb::ExternalUnix {
            ino,
            pid: 5,
            sock_type: ty as u32,
            action: Some(action),
            ..Default::default()
        };
        let p = pb::Prepare {
            external_unix: vec![
                unix(1, libc::SOCK_STREAM, Action::Connect(live.to_string_lossy().into())),
                unix(2, libc::SOCK_STREAM, Action::Connect("/nonexistent/x.sock".into())),
                unix(3, libc::SOCK_STREAM, Action::Broker("/nonexistent/broker.sock".into())),
                unix(4, libc::SOCK_DGRAM, Action::Hangup(true)),
                unix(5, libc::SOCK_STREAM, Action::Hangup(true)),
                unix(6, 99, Action::Hangup(true)),
            ],
            external_tty: vec![pb::ExternalTty { key: "tty[1:x]".into(), ..Default::default() }],
            ..Default::default()
        };
        let codes: Vec<_> = check(&p, "b").into_iter().map(|f| (f.code, f.detail)).collect();
        let just: Vec<&str> = codes.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(just, ["external-path", "no-broker", "bad-external", "bad-external", "bad-external"], "{codes:?}");
        assert!(codes[0].1.contains("/nonexistent/x.sock"));
    }

    #[test]
    fn hangup_hands_in_the_unread_bytes_then_eof() {
        let (mine, other) = socketpair(libc::SOCK_STREAM).unwrap();
        broker::socket::put_queued(&other, &[&vec![7u8; 300 << 10]], broker::SockType::Stream).unwrap();
        drop(other);
        let mut got = Vec::new();
        UnixStream::from(mine).read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), 300 << 10, "more than a default socket buffer, nobody reading meanwhile");
    }

    #[test]
    fn unread_bytes_go_in_front_of_what_the_peer_sends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("srv.sock");
        let l = UnixListener::bind(&path).unwrap();
        // A peer that greets right after accepting: the greeting must come after the unread bytes.
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"hello ").unwrap();
            std::thread::sleep(Duration::from_millis(300));
            s.write_all(b"later").unwrap();
            std::thread::sleep(Duration::from_millis(300));
        });
        let mine = broker::socket::connect(&path.to_string_lossy(), broker::SockType::Stream).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        replay_via_peer(&mine, b"UNREAD ").unwrap();
        let mut s = UnixStream::from(mine);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = vec![0u8; b"UNREAD hello later".len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, b"UNREAD hello later");
        server.join().unwrap();
    }

    #[test]
    fn ptys_skip_the_indexes_the_tree_needs() {
        let index = |m: &OwnedFd| {
            let mut n: libc::c_uint = 0;
            // SAFETY: TIOCGPTN writes an index into n.
            assert_eq!(unsafe { libc::ioctl(m.as_raw_fd(), libc::TIOCGPTN, &mut n) }, 0);
            n
        };
        let (m, s) = pty_avoiding(&[]).unwrap();
        let first = index(&m);
        drop((m, s));
        // The index just freed is the next one given out: asked to avoid it, another one is used, and the
        // avoided one is free again afterwards (for CRIU to take).
        let (m2, _s2) = pty_avoiding(&[first]).unwrap();
        assert_ne!(index(&m2), first);
        let (m3, _s3) = pty_avoiding(&[]).unwrap();
        assert_eq!(index(&m3), first, "the avoided index was left taken");
    }
}
