//! The protocol end to end on real unix sockets: `request` against `serve`, against raw bytes, and
//! against fake brokers that break the protocol.

mod common;

use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use broker::{Answer, BrokerError, MAX_FRAME, MAX_QUEUED, Reply, Request, SockType};
use common::{STEP, assert_both_ways, is_cloexec, read_n, stream};
use nix::sys::socket::{AddressFamily, ControlMessage, MsgFlags, SockFlag, sendmsg, socketpair};

fn pair(ty: SockType) -> (OwnedFd, OwnedFd) {
    socketpair(AddressFamily::Unix, ty.to_nix(), None, SockFlag::SOCK_CLOEXEC).unwrap()
}

/// A broker served by `broker::serve` in a thread, at a socket in its own temporary directory.
fn start(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || broker::serve(listener, handler));
    (dir, path)
}

/// A fake broker that accepts one connection and does `f` with it.
fn fake(f: impl FnOnce(UnixStream) + Send + 'static) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(STEP)).unwrap();
        f(s)
    });
    (dir, path)
}

fn sample(ty: SockType) -> Request {
    let mut r = Request::new("mig-42", 123456, ty);
    r.name = "@client".into();
    r.peer_name = "/run/app.sock".into();
    r.peer_pid = 777;
    r.peer_comm = "appd".into();
    r.tag = "db".into();
    r
}

/// Writes raw bytes to the broker, optionally closes our write side, and returns the answer's JSON and
/// the number of fds that came with it.
fn raw_exchange(path: &Path, bytes: &[u8], shutdown: bool) -> (serde_json::Value, usize) {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(STEP)).unwrap();
    s.write_all(bytes).unwrap();
    if shutdown {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 4]);
    let mut len = [0u8; 4];
    let mut iov = [std::io::IoSliceMut::new(&mut len)];
    let msg =
        nix::sys::socket::recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC).unwrap();
    assert_eq!(msg.bytes, 4);
    let fds = msg.cmsgs().unwrap().count();
    let len = u32::from_le_bytes(len) as usize;
    let body = read_n(&mut s, len);
    (serde_json::from_slice(&body).unwrap(), fds)
}

fn frame(json: &str) -> Vec<u8> {
    let mut f = (json.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(json.as_bytes());
    f
}

#[test]
fn round_trip_hands_over_a_socket_that_carries_data_both_ways() {
    let (seen_tx, seen_rx) = mpsc::channel();
    let (peer_tx, peer_rx) = mpsc::channel();
    let peer_tx = Mutex::new(peer_tx);
    let seen_tx = Mutex::new(seen_tx);
    let (_dir, path) = start(move |req| {
        seen_tx.lock().unwrap().send(req.clone()).unwrap();
        let (ours, theirs) = pair(req.sock_type);
        peer_tx.lock().unwrap().send(theirs).unwrap();
        Reply::Socket { fd: ours, replayed: true }
    });

    let mut req = sample(SockType::Stream);
    req.queued = b"bytes that sat unread".to_vec();
    let answer = broker::request(&path, &req, STEP).unwrap();
    let Answer::Socket { fd, replayed } = answer else { panic!("refused: {answer:?}") };
    assert!(replayed);
    assert!(is_cloexec(&fd), "the received fd must be close-on-exec");
    assert_eq!(seen_rx.recv_timeout(STEP).unwrap(), req, "the broker saw another request than was sent");

    let mut restored = stream(fd);
    let mut peer = stream(peer_rx.recv_timeout(STEP).unwrap());
    assert_both_ways(&mut restored, &mut peer);
}

#[test]
fn message_lengths_and_queued_bytes_arrive_intact() {
    let (seen_tx, seen_rx) = mpsc::channel();
    let seen_tx = Mutex::new(seen_tx);
    let (_dir, path) = start(move |req| {
        seen_tx.lock().unwrap().send(req.clone()).unwrap();
        Reply::Socket { fd: pair(req.sock_type).0, replayed: false }
    });
    let mut req = sample(SockType::Seqpacket);
    req.queued = (0..=255u8).cycle().take(300_000).collect();
    req.queued_msgs = vec![0, 100_000, 199_999, 1];
    let Answer::Socket { replayed, .. } = broker::request(&path, &req, STEP).unwrap() else { panic!() };
    assert!(!replayed);
    let seen = seen_rx.recv_timeout(STEP).unwrap();
    assert_eq!(seen, req);
    let lens: Vec<usize> = seen.queued_messages().iter().map(|m| m.len()).collect();
    assert_eq!(lens, [0, 100_000, 199_999, 1]);
}

#[test]
fn a_refusal_carries_its_reason_and_no_fd() {
    let (_dir, path) = start(|req| Reply::Refuse(format!("no socket for {} today", req.peer_name)));
    match broker::request(&path, &sample(SockType::Stream), STEP).unwrap() {
        Answer::Refused { reason } => assert_eq!(reason, "no socket for /run/app.sock today"),
        a => panic!("expected a refusal, got {a:?}"),
    }
    let json = r#"{"version":1,"migration_id":"m","socket_ino":1,"sock_type":"dgram"}"#;
    let (answer, fds) = raw_exchange(&path, &frame(json), false);
    assert_eq!(answer, serde_json::json!({"version": 1, "ok": false, "reason": "no socket for  today"}));
    assert_eq!(fds, 0);
}

#[test]
fn malformed_requests_are_refused_and_the_broker_keeps_serving() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let (_dir, path) = start(move |req| {
        c.fetch_add(1, Ordering::SeqCst);
        Reply::Socket { fd: pair(req.sock_type).0, replayed: false }
    });
    let over = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
    let ok = r#""migration_id":"m","socket_ino":1,"sock_type":"stream""#;
    let mut truncated = 100u32.to_le_bytes().to_vec();
    truncated.extend_from_slice(b"{\"version\"");
    let mut short_queue = frame(&format!(r#"{{"version":1,{ok},"queued_len":10}}"#));
    short_queue.extend_from_slice(b"abc");
    let cases: Vec<(&str, Vec<u8>, bool, String)> = vec![
        ("oversized length", over, false, format!("the request frame is {} bytes, over the limit of {MAX_FRAME}", MAX_FRAME + 1)),
        ("largest length", u32::MAX.to_le_bytes().to_vec(), false, "over the limit".into()),
        ("half a length", vec![1, 0], true, "the request ended in the middle of the length".into()),
        ("truncated frame", truncated, true, "the request ended in the middle of the JSON frame".into()),
        ("missing queued bytes", short_queue, true, "the request ended in the middle of the queued bytes".into()),
        ("bad JSON", frame("{not json"), false, "the request is not valid protocol-version-1 JSON: key must be a string".into()),
        ("empty frame", frame(""), false, "not valid protocol-version-1 JSON".into()),
        ("not an object", frame("[1,2]"), false, "the frame is not a JSON object".into()),
        ("no version", frame(&format!("{{{ok}}}")), false, "missing field `version`".into()),
        ("missing field", frame(r#"{"version":1,"socket_ino":1,"sock_type":"stream"}"#), false, "missing field `migration_id`".into()),
        ("bad sock_type", frame(r#"{"version":1,"migration_id":"m","socket_ino":1,"sock_type":"raw"}"#), false, "unknown variant `raw`".into()),
        (
            "other version",
            frame(r#"{"version":2,"whatever":true}"#),
            false,
            "this broker speaks protocol version 1, the request is version 2; use the same migrate version for the agent and the broker".into(),
        ),
        (
            "queued_len over the limit",
            frame(&format!(r#"{{"version":1,{ok},"queued_len":{}}}"#, MAX_QUEUED + 1)),
            false,
            format!("the request announces {} queued bytes, over the limit of {MAX_QUEUED}", MAX_QUEUED + 1),
        ),
        ("queued_msgs on a stream", frame(&format!(r#"{{"version":1,{ok},"queued_msgs":[0]}}"#)), false, "no message boundaries".into()),
        (
            "queued_msgs not adding up",
            frame(r#"{"version":1,"migration_id":"m","socket_ino":1,"sock_type":"dgram","queued_msgs":[1,2]}"#),
            false,
            "invalid request: the lengths in queued_msgs do not add up to the 0 queued bytes".into(),
        ),
        (
            "queued_msgs overflowing",
            frame(&format!(
                r#"{{"version":1,"migration_id":"m","socket_ino":1,"sock_type":"dgram","queued_msgs":[{},{}]}}"#,
                u64::MAX,
                u64::MAX
            )),
            false,
            "do not add up".into(),
        ),
    ];
    for (name, bytes, shutdown, want) in cases {
        let (answer, fds) = raw_exchange(&path, &bytes, shutdown);
        assert_eq!(answer["version"], 1, "{name}: {answer}");
        assert_eq!(answer["ok"], false, "{name}: {answer}");
        assert_eq!(fds, 0, "{name}: a refusal came with an fd");
        let reason = answer["reason"].as_str().unwrap();
        assert!(reason.contains(&want), "{name}: reason {reason:?} does not contain {want:?}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0, "a malformed request reached the handler");

    // A connection that closes without a word gets no answer and does not disturb anything.
    drop(UnixStream::connect(&path).unwrap());
    let Answer::Socket { .. } = broker::request(&path, &sample(SockType::Stream), STEP).unwrap() else {
        panic!("the broker stopped serving well-formed requests")
    };
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn a_panicking_handler_is_a_refusal_and_the_broker_keeps_serving() {
    let (_dir, path) = start(|req| {
        if req.tag == "boom" {
            panic!("handler bug (expected by the test)");
        }
        Reply::Refuse("fine".into())
    });
    let mut req = sample(SockType::Stream);
    req.tag = "boom".into();
    let Answer::Refused { reason } = broker::request(&path, &req, STEP).unwrap() else { panic!() };
    assert_eq!(reason, "the broker failed on this request (socket 123456): its handler panicked; see the broker's log");
    req.tag = "calm".into();
    let Answer::Refused { reason } = broker::request(&path, &req, STEP).unwrap() else { panic!() };
    assert_eq!(reason, "fine");
}

#[test]
fn no_broker_names_the_path_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.sock");
    let err = broker::request(&path, &sample(SockType::Stream), STEP).unwrap_err();
    assert!(matches!(err, BrokerError::Connect { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "cannot connect to the socket broker at {}: No such file or directory (os error 2); start migrate-broker on this host or choose another policy for this socket",
            path.display()
        )
    );
}

#[test]
fn a_silent_broker_times_out() {
    let (hold_tx, hold_rx) = mpsc::channel::<()>();
    let (_dir, path) = fake(move |s| {
        // Keep the connection open, unanswered, until the test is over.
        let _ = hold_rx.recv_timeout(STEP);
        drop(s);
    });
    let started = Instant::now();
    let err = broker::request(&path, &sample(SockType::Stream), Duration::from_millis(300)).unwrap_err();
    let took = started.elapsed();
    drop(hold_tx);
    assert!(matches!(err, BrokerError::Timeout { during: "answer", .. }), "{err:?}");
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(5), "took {took:?}");
    assert!(
        err.to_string().starts_with(&format!("the socket broker at {} did not answer within 300ms", path.display()))
    );
}

#[test]
fn a_broker_that_hangs_up_is_no_answer() {
    let (_dir, path) = fake(|mut s| {
        let _ = broker::read_request(&mut s);
    });
    let err = broker::request(&path, &sample(SockType::Stream), STEP).unwrap_err();
    assert!(matches!(err, BrokerError::NoAnswer { .. }), "{err:?}");
}

#[test]
fn ok_without_an_fd_is_an_error() {
    let (_dir, path) = fake(|mut s| {
        broker::read_request(&mut s).unwrap();
        s.write_all(&frame(r#"{"version":1,"ok":true,"replayed":false}"#)).unwrap();
    });
    let err = broker::request(&path, &sample(SockType::Stream), STEP).unwrap_err();
    assert!(matches!(err, BrokerError::NoFd { .. }), "{err:?}");
}

#[test]
fn more_than_one_fd_is_an_error_and_all_are_closed() {
    let (peers_tx, peers_rx) = mpsc::channel();
    let (_dir, path) = fake(move |mut s| {
        broker::read_request(&mut s).unwrap();
        let (a1, b1) = pair(SockType::Stream);
        let (a2, b2) = pair(SockType::Stream);
        let body = frame(r#"{"version":1,"ok":true,"replayed":false}"#);
        let fds = [a1.as_raw_fd(), a2.as_raw_fd()];
        sendmsg::<()>(
            s.as_raw_fd(),
            &[IoSlice::new(&body)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        peers_tx.send((b1, b2)).unwrap();
    });
    let err = broker::request(&path, &sample(SockType::Stream), STEP).unwrap_err();
    assert!(matches!(err, BrokerError::TooManyFds { count: 2, .. }), "{err:?}");
    // The fake closed its copies after sending: end of stream on the peers proves the client closed
    // the two it received.
    let (b1, b2) = peers_rx.recv_timeout(STEP).unwrap();
    for b in [b1, b2] {
        let mut b = stream(b);
        let mut buf = [0u8; 1];
        assert_eq!(b.read(&mut buf).unwrap(), 0, "a received fd was left open");
    }
}

#[test]
fn another_version_is_named() {
    let (_dir, path) = fake(|mut s| {
        let _ = broker::read_request(&mut s);
        s.write_all(&frame(r#"{"version":2,"status":"different"}"#)).unwrap();
    });
    let err = broker::request(&path, &sample(SockType::Stream), STEP).unwrap_err();
    assert!(matches!(err, BrokerError::Version { got: 2, .. }), "{err:?}");
    assert!(err.to_string().contains("speaks protocol version 2, this agent version 1"), "{err}");
}

#[test]
fn a_socket_of_the_wrong_kind_is_refused() {
    let (_dir, path) = start(|req| match req.tag.as_str() {
        "dgram" => Reply::Socket { fd: pair(SockType::Dgram).0, replayed: false },
        "pipe" => Reply::Socket { fd: nix::unistd::pipe().unwrap().0, replayed: false },
        _ => {
            // Unconnected: the process could not use it as its connection.
            let fd = nix::sys::socket::socket(
                AddressFamily::Unix,
                nix::sys::socket::SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .unwrap();
            Reply::Socket { fd, replayed: false }
        }
    });
    let mut req = sample(SockType::Stream);
    for (tag, want) in [
        ("dgram", "the socket is of type Datagram, the connection is stream"),
        ("pipe", "the fd is not a socket"),
        ("unconnected", "the socket is not connected"),
    ] {
        req.tag = tag.into();
        let err = broker::request(&path, &req, STEP).unwrap_err();
        assert!(matches!(err, BrokerError::WrongSocket { .. }), "{tag}: {err:?}");
        assert!(err.to_string().contains(want), "{tag}: {err}");
    }
}

#[test]
fn an_early_refusal_is_read_even_while_the_request_is_still_being_sent() {
    let (_dir, path) = fake(|s| {
        // Refuse without reading a byte, then close with the request unread.
        s.set_write_timeout(Some(STEP)).unwrap();
        broker::write_answer(&s.as_fd(), Reply::Refuse("not reading all that".into())).unwrap();
    });
    let mut req = sample(SockType::Stream);
    req.queued = vec![7u8; MAX_QUEUED as usize];
    let Answer::Refused { reason } = broker::request(&path, &req, STEP).unwrap() else { panic!() };
    assert_eq!(reason, "not reading all that");
}

#[test]
fn an_invalid_request_is_caught_before_connecting() {
    let mut req = sample(SockType::Stream);
    req.queued = vec![0u8; MAX_QUEUED as usize + 1];
    let err = broker::request(Path::new("/nonexistent/broker.sock"), &req, STEP).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "socket 123456 cannot be brokered: {} queued bytes, over the limit of {MAX_QUEUED}; choose another policy for it",
            MAX_QUEUED + 1
        )
    );
}

#[test]
fn abstract_broker_names_work() {
    let name = format!("@migrate-broker-test-{}", std::process::id());
    let addr = broker::unix_addr(Path::new(&name)).unwrap();
    let fd =
        nix::sys::socket::socket(AddressFamily::Unix, nix::sys::socket::SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
            .unwrap();
    nix::sys::socket::bind(fd.as_raw_fd(), &addr).unwrap();
    nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(4).unwrap()).unwrap();
    let listener = UnixListener::from(fd);
    std::thread::spawn(move || broker::serve(listener, |_| Reply::Refuse("abstract works".into())));
    let Answer::Refused { reason } = broker::request(Path::new(&name), &sample(SockType::Stream), STEP).unwrap() else {
        panic!()
    };
    assert_eq!(reason, "abstract works");
}
