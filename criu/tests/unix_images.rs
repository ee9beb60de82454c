//! Unix sockets in CRIU images ([`criu::images::unix_sockets`], [`criu::images::queued_bytes`]): a real
//! `criu dump` of a process whose stream socket's peer is held by this test (outside the dumped tree), and
//! crafted hostile images. The dump test needs root and CRIU (>= 4.1) and fails, never skips, without
//! them; its process (a `sleep` in its own session, stdio on /dev/null) is killed at the end, also on
//! failure.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use criu::Criu;
use criu::images::{
    FD_TYPE_UNIXSK, FILES_MAGIC, IMG_COMMON_MAGIC, ImageError, MAX_ENTRY, SK_QUEUES_MAGIC, UNIXSK_MAGIC, USK_EXTERN,
    UnixSocketImage, queued_bytes, unix_sockets,
};

mod common;
use common::{require_criu, wait_for};

/// Bound on the dump (it takes well under a second on this VM).
const STEP: Duration = Duration::from_secs(60);
const TCP_ESTABLISHED: u32 = 1;

fn ino_of(fd: impl AsFd) -> u64 {
    nix::sys::stat::fstat(fd).expect("fstat a socket").st_ino
}

/// A `sleep` in its own session that inherits `fds` (same numbers). Killed on drop.
struct Child {
    pid: u32,
    child: std::process::Child,
}

impl Child {
    fn start(fds: &[RawFd]) -> Child {
        let fds = fds.to_vec();
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("1000")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: setsid and fcntl are async-signal-safe and touch only the forked child. CRIU dumps only
        // trees whose root leads its own session (without --shell-job); clearing FD_CLOEXEC in the child
        // alone keeps the sockets across its exec and nowhere else.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                for &fd in &fds {
                    if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn sleep");
        let c = Child { pid: child.id(), child };
        wait_for(Duration::from_secs(10), "the child to exec sleep", || {
            (criu::tree::comm(c.pid).trim() == "sleep").then_some(())
        });
        c
    }

    /// The inode behind the child's fd `fd`, from `/proc/PID/fd/N` → `socket:[INO]`.
    fn socket_ino(&self, fd: RawFd) -> u64 {
        let link = std::fs::read_link(format!("/proc/{}/fd/{fd}", self.pid)).expect("the child's fd");
        let link = link.to_str().expect("utf-8 link");
        link.strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("fd {fd} of the child is {link}, not a socket"))
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = criu::tree::kill_all(&[self.pid], std::time::Duration::from_secs(10));
        let _ = self.child.wait();
    }
}

/// Runs `criu dump` with `args`, bounded by [`STEP`]; panics with the log's errors on failure.
fn criu_dump(criu: &Criu, images: &Path, args: &[String]) {
    let mut child = std::process::Command::new(&criu.bin)
        .arg("dump")
        .arg("-D")
        .arg(images)
        .args(["-o", "dump.log", "-v4"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn criu dump");
    let until = Instant::now() + STEP;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for criu") {
            break status;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("criu dump still running after {STEP:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "criu dump failed ({status}): {}", criu::log_errors(&images.join("dump.log")));
}

fn malformed(r: Result<impl std::fmt::Debug, ImageError>) -> String {
    match r {
        Err(ImageError::Malformed { what, .. }) => what,
        other => panic!("expected Malformed, got {other:?}"),
    }
}

#[test]
fn stream_socket_with_external_peer_and_its_unread_bytes() {
    let criu = require_criu();
    let dir = tempfile::tempdir().expect("tempdir");
    let images = dir.path().join("images");
    std::fs::create_dir(&images).expect("images dir");

    // The listener and the accepted end stay here, outside the dumped tree; the connected end is the
    // child's. The child also holds both ends of a socketpair with bytes queued in one of them.
    let path = dir.path().join("listener.sock");
    let listener = UnixListener::bind(&path).expect("bind the listener");
    let connected = UnixStream::connect(&path).expect("connect");
    let (mut accepted, _) = listener.accept().expect("accept");
    let (mut pair_a, pair_b) = UnixStream::pair().expect("socketpair");
    const EXTERNAL: &[u8; 20] = b"twenty unread bytes!";
    const INTERNAL: &[u8] = b"queued between two sockets of the dump";
    accepted.write_all(EXTERNAL).expect("write to the child's socket");
    pair_a.write_all(INTERNAL).expect("write into the pair");

    let fds = [connected.as_raw_fd(), pair_a.as_raw_fd(), pair_b.as_raw_fd()];
    let child = Child::start(&fds);
    let ino = child.socket_ino(connected.as_raw_fd());
    assert_eq!(ino, ino_of(&connected), "the child's socket is the one connected here");
    let (a_ino, b_ino) = (child.socket_ino(pair_a.as_raw_fd()), child.socket_ino(pair_b.as_raw_fd()));
    // Only the child holds them now.
    drop((connected, pair_a, pair_b));

    criu_dump(
        &criu,
        &images,
        &["-t".into(), child.pid.to_string(), "--external".into(), format!("unix[{ino}]"), "--leave-stopped".into()],
    );
    drop(child);

    let socks = unix_sockets(&images).expect("unix sockets of the dump");
    let find = |ino: u64| -> &UnixSocketImage {
        socks.iter().find(|s| s.ino == ino).unwrap_or_else(|| panic!("no entry of ino {ino} in {socks:#?}"))
    };
    let me = find(ino);
    assert_eq!(me.sock_type, libc::SOCK_STREAM as u32, "{me:?}");
    assert_eq!(me.state, TCP_ESTABLISHED, "{me:?}");
    assert!(!me.is_extern(), "{me:?}");
    assert_eq!(me.peer, ino_of(&accepted), "the peer is the accepted end: {me:?}");
    let peer = find(me.peer);
    assert_eq!(peer.uflags & USK_EXTERN, USK_EXTERN, "CRIU's entry for the external peer: {peer:?}");
    let mut name = path.as_os_str().as_encoded_bytes().to_vec();
    name.push(0); // the kernel counts a path name's terminating NUL
    assert_eq!(peer.name, name, "the accepted end reports the listener's name");
    assert_ne!(peer.id, me.id);
    let (a, b) = (find(a_ino), find(b_ino));
    assert_eq!((a.peer, b.peer), (b_ino, a_ino), "the pair is connected to itself");
    assert!(!a.is_extern() && !b.is_extern());

    assert_eq!(queued_bytes(&images, ino, 1 << 20).expect("queued bytes"), EXTERNAL);
    assert_eq!(queued_bytes(&images, b_ino, 1 << 20).expect("queued bytes of the pair"), INTERNAL);
    assert_eq!(queued_bytes(&images, a_ino, 1 << 20).expect("queued bytes of the pair"), b"");
    assert_eq!(queued_bytes(&images, ino, EXTERNAL.len()).expect("limit = exactly the queue"), EXTERNAL);
    let what = malformed(queued_bytes(&images, ino, 10));
    assert!(what.contains("limit of 10"), "{what}");
    let what = malformed(queued_bytes(&images, me.peer, 1 << 20));
    assert!(what.contains("no unix socket"), "the external peer is no socket of the dump: {what}");
    drop((listener, accepted));
}

// ---- crafted images ----

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field_varint(out: &mut Vec<u8>, tag: u32, v: u64) {
    varint(out, u64::from(tag) << 3);
    varint(out, v);
}

fn field_bytes(out: &mut Vec<u8>, tag: u32, b: &[u8]) {
    varint(out, u64::from(tag) << 3 | 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn unix_sk_entry(s: &UnixSocketImage) -> Vec<u8> {
    let mut m = Vec::new();
    for (tag, v) in [(1, s.id.into()), (2, s.ino), (3, s.sock_type.into()), (4, s.state.into())] {
        field_varint(&mut m, tag, v);
    }
    for (tag, v) in [(5, 0), (6, s.uflags.into()), (7, 0), (8, s.peer)] {
        field_varint(&mut m, tag, v);
    }
    field_bytes(&mut m, 9, &[8, 0, 16, 0, 24, 0, 32, 0]); // fown_entry, skipped by the reader
    field_bytes(&mut m, 10, &[8, 1, 16, 2]); // sk_opts_entry, skipped by the reader
    field_bytes(&mut m, 11, &s.name);
    m
}

fn image(magic: u32, entries: &[Vec<u8>]) -> Vec<u8> {
    let mut out = IMG_COMMON_MAGIC.to_le_bytes().to_vec();
    out.extend_from_slice(&magic.to_le_bytes());
    for e in entries {
        out.extend_from_slice(&(e.len() as u32).to_le_bytes());
        out.extend_from_slice(e);
    }
    out
}

fn files_img(socks: &[UnixSocketImage]) -> Vec<u8> {
    let mut entries = Vec::new();
    // A regular file first, with a field the reader does not know (reg = 3).
    let mut reg = Vec::new();
    field_varint(&mut reg, 1, 1);
    field_varint(&mut reg, 2, 1);
    field_bytes(&mut reg, 3, b"\x08\x01\x12\x04/bin");
    entries.push(reg);
    for s in socks {
        let mut fe = Vec::new();
        field_varint(&mut fe, 1, FD_TYPE_UNIXSK as u64);
        field_varint(&mut fe, 2, s.id.into());
        field_bytes(&mut fe, 16, &unix_sk_entry(s));
        entries.push(fe);
    }
    image(FILES_MAGIC, &entries)
}

/// `sk-queues.img` with `(id_for, payload)` entries.
fn sk_queues_img(queues: &[(u32, &[u8])]) -> Vec<u8> {
    let mut out = image(SK_QUEUES_MAGIC, &[]);
    for (id, data) in queues {
        let mut e = Vec::new();
        field_varint(&mut e, 1, (*id).into());
        field_varint(&mut e, 2, data.len() as u64);
        out.extend_from_slice(&(e.len() as u32).to_le_bytes());
        out.extend_from_slice(&e);
        out.extend_from_slice(data);
    }
    out
}

fn sock(id: u32, ino: u64, peer: u64, uflags: u32, name: &[u8]) -> UnixSocketImage {
    UnixSocketImage { id, ino, sock_type: 1, state: 1, peer, name: name.to_vec(), uflags }
}

#[test]
fn crafted_images_read_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let socks =
        [sock(0x12, 100, 101, 0, b""), sock(0x15, 101, 0, USK_EXTERN, b"/run/x.sock"), sock(7, 5, 0, 0, b"\0abs")];
    std::fs::write(d.join("files.img"), files_img(&socks)).unwrap();
    assert_eq!(unix_sockets(d).unwrap(), socks, "only the unix sockets, in order");
    // No sk-queues.img: nothing queued.
    assert_eq!(queued_bytes(d, 100, 10).unwrap(), b"");
    std::fs::write(d.join("sk-queues.img"), sk_queues_img(&[(7, b"other"), (0x12, b"abc"), (7, b"x"), (0x12, b"def")]))
        .unwrap();
    assert_eq!(queued_bytes(d, 100, 6).unwrap(), b"abcdef");
    assert_eq!(queued_bytes(d, 5, 6).unwrap(), b"otherx");
    assert!(malformed(queued_bytes(d, 100, 5)).contains("limit of 5"));
    assert!(
        malformed(queued_bytes(d, 101, 100)).contains("no unix socket"),
        "an EXTERN entry is no socket of the dump"
    );
    assert!(malformed(queued_bytes(d, 999, 100)).contains("no unix socket"));
    // Legacy unixsk.img is read too.
    let legacy = sock(9, 77, 0, 0, b"old");
    std::fs::write(d.join("unixsk.img"), image(UNIXSK_MAGIC, &[unix_sk_entry(&legacy)])).unwrap();
    assert_eq!(unix_sockets(d).unwrap().last(), Some(&legacy));
}

#[test]
fn hostile_images_are_malformed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    assert!(matches!(unix_sockets(d), Err(ImageError::Io { .. })), "no files.img");

    let socks = [sock(1, 100, 0, 0, b"name")];
    let files = files_img(&socks);
    // Every strict prefix: a shorter valid image (cut at an entry boundary) or Malformed, never a panic.
    for cut in 0..files.len() {
        std::fs::write(d.join("files.img"), &files[..cut]).unwrap();
        match unix_sockets(d) {
            Ok(s) => assert!(s.is_empty() && cut >= 8, "cut at {cut}: {s:?}"),
            Err(ImageError::Malformed { .. }) => {}
            Err(e) => panic!("cut at {cut}: {e}"),
        }
    }
    std::fs::write(d.join("files.img"), &files[..files.len() - 1]).unwrap();
    assert!(malformed(unix_sockets(d)).contains("beyond"));

    // Huge entry lengths: refused before any allocation.
    for len in [u32::MAX, MAX_ENTRY as u32 + 1, 1000] {
        let mut img = image(FILES_MAGIC, &[]);
        img.extend_from_slice(&len.to_le_bytes());
        img.extend_from_slice(&[0; 16]);
        std::fs::write(d.join("files.img"), &img).unwrap();
        assert!(malformed(unix_sockets(d)).contains("beyond"), "length {len}");
    }
    // Wrong magic: a pagemap is no files.img; an sk-queues header is no files.img either.
    std::fs::write(d.join("files.img"), image(SK_QUEUES_MAGIC, &[])).unwrap();
    assert!(malformed(unix_sockets(d)).contains("magic"));
    // A unix socket file without its unix_sk_entry, and one whose entry has another id.
    let mut bare = Vec::new();
    field_varint(&mut bare, 1, FD_TYPE_UNIXSK as u64);
    field_varint(&mut bare, 2, 3);
    std::fs::write(d.join("files.img"), image(FILES_MAGIC, &[bare.clone()])).unwrap();
    assert!(malformed(unix_sockets(d)).contains("without its unix_sk_entry"));
    field_bytes(&mut bare, 16, &unix_sk_entry(&sock(4, 1, 0, 0, b"")));
    std::fs::write(d.join("files.img"), image(FILES_MAGIC, &[bare])).unwrap();
    assert!(malformed(unix_sockets(d)).contains("of id"));
    // Garbage in an entry.
    std::fs::write(d.join("files.img"), image(FILES_MAGIC, &[vec![0xff; 12]])).unwrap();
    assert!(malformed(unix_sockets(d)).contains("does not decode"));
    // A broken unixsk.img next to a good files.img.
    std::fs::write(d.join("files.img"), &files).unwrap();
    std::fs::write(d.join("unixsk.img"), &image(UNIXSK_MAGIC, &[])[..6]).unwrap();
    assert!(malformed(unix_sockets(d)).contains("header"));
    std::fs::remove_file(d.join("unixsk.img")).unwrap();

    // sk-queues.img: every strict prefix is Malformed or holds a prefix of the queue, never a panic.
    let queues = sk_queues_img(&[(1, b"0123456789"), (2, b"skipped"), (1, b"abc")]);
    std::fs::write(d.join("sk-queues.img"), &queues).unwrap();
    assert_eq!(queued_bytes(d, 100, 100).unwrap(), b"0123456789abc");
    for cut in 0..queues.len() {
        std::fs::write(d.join("sk-queues.img"), &queues[..cut]).unwrap();
        match queued_bytes(d, 100, 100) {
            Ok(b) => assert!(b"0123456789abc".starts_with(&b) && cut >= 8, "cut at {cut}: {b:?}"),
            Err(ImageError::Malformed { what, .. }) => assert!(
                what.contains("truncated") || what.contains("beyond") || what.contains("header"),
                "cut at {cut}: {what}"
            ),
            Err(e) => panic!("cut at {cut}: {e}"),
        }
    }
    std::fs::write(d.join("sk-queues.img"), &queues[..queues.len() - 1]).unwrap();
    assert!(malformed(queued_bytes(d, 100, 100)).contains("truncated queued data"));
    // A huge announced payload (for this socket or another): refused, not allocated, whatever the limit.
    for id in [1, 2] {
        let mut e = Vec::new();
        field_varint(&mut e, 1, id);
        field_varint(&mut e, 2, u32::MAX.into());
        let mut img = image(SK_QUEUES_MAGIC, &[e]);
        img.extend_from_slice(b"short");
        std::fs::write(d.join("sk-queues.img"), &img).unwrap();
        let what = malformed(queued_bytes(d, 100, usize::MAX));
        assert!(what.contains("4294967295 bytes announced"), "{what}");
    }
    // A huge entry length.
    let mut img = image(SK_QUEUES_MAGIC, &[]);
    img.extend_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(d.join("sk-queues.img"), &img).unwrap();
    assert!(malformed(queued_bytes(d, 100, 100)).contains("beyond"));
    // Wrong magic (a files.img header).
    std::fs::write(d.join("sk-queues.img"), image(FILES_MAGIC, &[])).unwrap();
    assert!(malformed(queued_bytes(d, 100, 100)).contains("magic"));
    // Garbage entry.
    std::fs::write(d.join("sk-queues.img"), image(SK_QUEUES_MAGIC, &[vec![0xff; 6]])).unwrap();
    assert!(malformed(queued_bytes(d, 100, 100)).contains("does not decode"));
}
