//! The `migrate-broker` binary with real rule files: each action hands over a socket that works, and a
//! request no rule takes is refused with a reason naming the rule file.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use broker::{Answer, Request, SockType};
use common::{STEP, assert_both_ways, is_cloexec, read_n, stream, wait_for};

/// A running daemon in its own temporary directory (socket, rule file, log). Killed on drop.
struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
    config: PathBuf,
}

impl Daemon {
    /// Starts the daemon with `rules`, where `{dir}` stands for the temporary directory, and waits until
    /// it answers.
    fn start(rules: &str) -> Daemon {
        Self::start_in(tempfile::tempdir().unwrap(), rules)
    }

    fn start_in(dir: tempfile::TempDir, rules: &str) -> Daemon {
        let socket = dir.path().join("run/broker.sock");
        let config = dir.path().join("broker.toml");
        std::fs::write(&config, rules.replace("{dir}", dir.path().to_str().unwrap())).unwrap();
        let log = std::fs::File::create(dir.path().join("broker.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_migrate-broker"))
            .arg("--socket")
            .arg(&socket)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut d = Daemon { child, dir, socket, config };
        wait_for("the broker to listen", || {
            if let Some(status) = d.child.try_wait().unwrap() {
                panic!("the broker exited ({status}): {}", d.log());
            }
            UnixStream::connect(&d.socket).ok()
        });
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ask(&self, req: &Request) -> Answer {
        broker::request(&self.socket, req, STEP).unwrap_or_else(|e| panic!("{e}; broker log:\n{}", self.log()))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn req(ty: SockType, peer_name: &str, peer_comm: &str, tag: &str) -> Request {
    let mut r = Request::new("mig-7", 4242, ty);
    r.peer_name = peer_name.into();
    r.peer_comm = peer_comm.into();
    r.tag = tag.into();
    r
}

#[test]
fn connect_rule_connects_to_the_peer_and_bytes_flow_both_ways() {
    let d = Daemon::start(
        r#"
        [[rule]]
        match = { peer_name = "/run/other.sock" }
        spawn = ["false"]
        [[rule]]
        match = { peer_name = "/run/app.sock" }
        connect = "{dir}/app.sock"
        "#,
    );
    let app = UnixListener::bind(d.path("app.sock")).unwrap();
    app.set_nonblocking(true).unwrap();

    let mut r = req(SockType::Stream, "/run/app.sock", "appd", "");
    r.queued = b"unread".to_vec();
    let Answer::Socket { fd, replayed } = d.ask(&r) else { panic!("refused; log:\n{}", d.log()) };
    assert!(!replayed, "a connect rule cannot put queued bytes in front");
    assert!(is_cloexec(&fd));
    let (peer, _) = wait_for("the broker's connection at the app", || app.accept().ok());
    peer.set_nonblocking(false).unwrap();
    let mut peer = stream(peer.into());
    assert_both_ways(&mut stream(fd), &mut peer);

    let log = d.log();
    assert!(log.contains("handed over a socket") && log.contains("rule=2"), "{log}");
}

#[test]
fn connect_rule_with_nothing_listening_is_refused_with_the_cause() {
    let d = Daemon::start("[[rule]]\nconnect = \"{dir}/nobody.sock\"\n");
    let Answer::Refused { reason } = d.ask(&req(SockType::Stream, "/x", "y", "")) else { panic!() };
    let want = format!(
        "rule 1 of {} (connect {dir}/nobody.sock): nothing listens at {dir}/nobody.sock (ENOENT: No such file or directory); start the service that should",
        d.config.display(),
        dir = d.dir.path().display()
    );
    assert_eq!(reason, want);
}

#[test]
fn accept_rule_pairs_the_next_client_and_bytes_flow_both_ways() {
    let d = Daemon::start(
        r#"
        [[rule]]
        match = { peer_comm = "client" }
        accept = "{dir}/accept/app.sock"
        accept_timeout_s = 10
        "#,
    );
    // The listener exists as soon as the broker answers: the client may come before the request.
    let accept_path = d.path("accept/app.sock");
    assert!(std::fs::metadata(&accept_path).unwrap().file_type().is_socket());
    let (tx, rx) = mpsc::channel();
    let socket = d.socket.clone();
    std::thread::spawn(move || {
        let r = req(SockType::Stream, "", "client", "");
        let _ = tx.send(broker::request(&socket, &r, STEP));
    });
    let mut client = UnixStream::connect(&accept_path).unwrap();
    client.set_read_timeout(Some(STEP)).unwrap();
    let answer = rx.recv_timeout(STEP).unwrap().unwrap_or_else(|e| panic!("{e}; log:\n{}", d.log()));
    let Answer::Socket { fd, replayed } = answer else { panic!("refused; log:\n{}", d.log()) };
    assert!(!replayed);
    assert_both_ways(&mut stream(fd), &mut client);
}

#[test]
fn accept_rule_without_a_client_is_refused_after_its_timeout() {
    let d = Daemon::start("[[rule]]\naccept = \"{dir}/lonely.sock\"\naccept_timeout_s = 1\n");
    let Answer::Refused { reason } = d.ask(&req(SockType::Stream, "", "", "")) else { panic!() };
    assert!(
        reason.ends_with(&format!(
            "no client connected to {} within 1s; connect the peer there, or raise accept_timeout_s",
            d.path("lonely.sock").display()
        )),
        "{reason}"
    );
    // A seqpacket socket cannot be paired with the rule's stream listener.
    let Answer::Refused { reason } = d.ask(&req(SockType::Seqpacket, "", "", "")) else { panic!() };
    assert!(reason.contains("it listens for stream connections, the socket is seqpacket"), "{reason}");
}

#[test]
fn spawn_rule_replays_the_queued_bytes_before_the_commands_output() {
    let d = Daemon::start(
        r#"
        [[rule]]
        match = { tag = "logger" }
        spawn = ["sh", "-c", "printf '%s|' \"$MIGRATE_TAG\" >&3; exec cat"]
        "#,
    );
    let mut r = req(SockType::Stream, "", "", "logger");
    r.queued = b"queued-first|".to_vec();
    let Answer::Socket { fd, replayed } = d.ask(&r) else { panic!("refused; log:\n{}", d.log()) };
    assert!(replayed);
    let mut s = stream(fd);
    s.write_all(b"ping").unwrap();
    // What sat unread comes first, then what the command wrote (on fd 3), then cat's echo of "ping".
    assert_eq!(read_n(&mut s, 24), b"queued-first|logger|ping");
    // The command holds the only other end: when it ends, the process reads end of file.
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
}

#[test]
fn spawn_rule_keeps_message_boundaries() {
    let d = Daemon::start("[[rule]]\nmatch = { sock_type = \"seqpacket\" }\nspawn = [\"cat\"]\n");
    let mut r = req(SockType::Seqpacket, "", "", "");
    r.queued = b"onetwo!three".to_vec();
    r.queued_msgs = vec![3, 4, 5];
    let Answer::Socket { fd, replayed } = d.ask(&r) else { panic!("refused; log:\n{}", d.log()) };
    assert!(replayed);
    let mut s = stream(fd);
    let mut buf = [0u8; 64];
    for want in [&b"one"[..], b"two!", b"three"] {
        let n = s.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], want);
    }
}

#[test]
fn spawn_rule_that_cannot_start_is_refused() {
    let d = Daemon::start("[[rule]]\nspawn = [\"/nonexistent/cmd\"]\n");
    let Answer::Refused { reason } = d.ask(&req(SockType::Stream, "", "", "")) else { panic!() };
    assert!(reason.contains("cannot start \"/nonexistent/cmd\": No such file or directory"), "{reason}");
}

#[test]
fn no_matching_rule_is_refused_naming_the_request_and_the_config() {
    let d = Daemon::start("[[rule]]\nmatch = { peer_name = \"/run/other.sock\" }\nconnect = \"/run/other.sock\"\n");
    let Answer::Refused { reason } = d.ask(&req(SockType::Stream, "/run/app.sock", "appd", "db")) else { panic!() };
    assert_eq!(
        reason,
        format!(
            "no rule of {} matches socket 4242 (peer_name \"/run/app.sock\", peer_comm \"appd\", tag \"db\", sock_type stream); add a [[rule]] for it or choose another policy",
            d.config.display()
        )
    );
    let log = d.log();
    assert!(log.contains("refused: no rule of") && log.contains("migration=mig-7"), "{log}");
}

#[test]
fn the_socket_is_private_and_a_stale_one_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    // A socket file left behind by a broker that died: nobody listens on it any more.
    std::fs::create_dir(dir.path().join("run")).unwrap();
    drop(UnixListener::bind(dir.path().join("run/broker.sock")).unwrap());
    let d = Daemon::start_in(dir, "");
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A second broker on the same live socket refuses to start rather than steal it.
    let out = Command::new(env!("CARGO_BIN_EXE_migrate-broker"))
        .arg("--socket")
        .arg(&d.socket)
        .arg("--config")
        .arg(&d.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("another process listens on {}", d.socket.display())), "{stderr}");
}

#[test]
fn a_bad_rule_file_stops_the_daemon_with_the_file_and_rule_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[[rule]]\nconnect = \"/a\"\n[[rule]]\naccept = \"/b\"\nspawn = [\"x\"]\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_migrate-broker"))
        .arg("--socket")
        .arg(dir.path().join("b.sock"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let want = format!("rule 2 of {}: give exactly one of connect, accept or spawn", config.display());
    assert!(stderr.contains(&want), "{stderr}");
    assert!(!Path::new(&dir.path().join("b.sock")).exists(), "the broker listened despite a bad rule file");
}
