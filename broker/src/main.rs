//! `migrate-broker`: the reference socket broker for the target host (protocol in the `broker` crate
//! doc). It answers each request by the first rule of its config file that matches:
//!
//! - `connect = PATH`: a new socket of the request's type, connected to PATH, is handed over;
//! - `accept = PATH`: the broker listens on PATH from its start and hands over the next client that
//!   connects there;
//! - `spawn = [CMD, ARGS...]`: a socketpair of the request's type; CMD runs with one end as stdin,
//!   stdout and fd 3, and the other end is handed over.
//!
//! Only `spawn` can put the queued bytes in front (`replayed: true`): for `connect` and `accept` the
//! other end belongs to someone else, so the agent gets `replayed: false` and deals with them.
//!
//! A commented example config is `deploy/broker.toml`.

use std::collections::HashSet;
use std::io::ErrorKind;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use broker::{Reply, Request, SockType, unix_addr};
use clap::Parser;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{AddressFamily, Backlog, SockFlag, bind, listen, socket};
use nix::sys::stat::{Mode, umask};
use serde::Deserialize;

/// Hands sockets to restored processes for their connections to peers outside the migrated tree.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Unix socket to listen on for the target agent (mode 0600; `@name` for an abstract name).
    #[arg(long, default_value = broker::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Rule file (TOML; example: deploy/broker.toml).
    #[arg(long)]
    config: PathBuf,
}

/// How long an `accept` rule waits for a client unless its `accept_timeout_s` says otherwise.
const DEFAULT_ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Listen backlog of the broker's socket and of the `accept` rules' listeners. Agents ask one request
/// at a time per migration, and an `accept` rule's clients wait there for a request to pair them; a
/// full backlog makes a connecting client block, not fail.
const BACKLOG: i32 = 16;

/// The rule file.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Config {
    /// The rules, tried in order; the first that matches answers.
    #[serde(default, rename = "rule")]
    rules: Vec<RuleConfig>,
}

/// One `[[rule]]`: a match and exactly one action.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RuleConfig {
    /// Which requests the rule takes; absent or empty: all.
    #[serde(default, rename = "match")]
    matches: Match,
    /// Action: connect a new socket to this path (`@name`: abstract) and hand it over.
    connect: Option<String>,
    /// Action: listen on this path from the start and hand over the next client connecting there.
    accept: Option<String>,
    /// Action: socketpair; run this command on one end (stdin, stdout, fd 3), hand over the other.
    spawn: Option<Vec<String>>,
    /// For `accept`: how long to wait for a client, in seconds (default 30).
    accept_timeout_s: Option<u64>,
}

/// Conditions of a rule: every field given must equal the request's.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
struct Match {
    /// The peer's bound name (for an accepted connection, the listener's path; `@name`: abstract).
    peer_name: Option<String>,
    /// The peer process' comm on the source host.
    peer_comm: Option<String>,
    /// The operator's tag from the socket's policy.
    tag: Option<String>,
    /// `stream`, `seqpacket` or `dgram`; for an `accept` rule also the type of its listener.
    sock_type: Option<SockType>,
    /// The socket's inode on the source host.
    socket_ino: Option<u64>,
}

impl Match {
    fn matches(&self, r: &Request) -> bool {
        fn eq<T: PartialEq>(want: &Option<T>, have: &T) -> bool {
            want.as_ref().is_none_or(|w| w == have)
        }
        eq(&self.peer_name, &r.peer_name)
            && eq(&self.peer_comm, &r.peer_comm)
            && eq(&self.tag, &r.tag)
            && eq(&self.sock_type, &r.sock_type)
            && eq(&self.socket_ino, &r.socket_ino)
    }
}

/// A rule ready to run: listeners of `accept` rules are open.
#[derive(Debug)]
struct Rule {
    /// 1-based, as operators count `[[rule]]` sections.
    number: usize,
    matches: Match,
    action: Action,
}

#[derive(Debug)]
enum Action {
    Connect { target: String },
    Accept { path: String, listener: UnixListener, sock_type: SockType, timeout: Duration },
    Spawn { argv: Vec<String> },
}

impl Action {
    fn describe(&self) -> String {
        match self {
            Action::Connect { target } => format!("connect {target}"),
            Action::Accept { path, .. } => format!("accept {path}"),
            Action::Spawn { argv } => format!("spawn {argv:?}"),
        }
    }
}

/// Checks a rule file without opening anything: what [`Broker::load`] will do, with every mistake
/// named by its rule number.
fn parse_config(text: &str, config_path: &Path, own_socket: &Path) -> anyhow::Result<Vec<(Match, PlannedAction)>> {
    let cfg: Config =
        toml::from_str(text).with_context(|| format!("{} is not a valid rule file", config_path.display()))?;
    let mut accept_paths = HashSet::new();
    let mut out = Vec::new();
    for (i, r) in cfg.rules.into_iter().enumerate() {
        let n = i + 1;
        let at = || format!("rule {n} of {}", config_path.display());
        let action = match (r.connect, r.accept, r.spawn) {
            (Some(target), None, None) => {
                if target.is_empty() {
                    bail!("{}: connect is empty; give the path of the socket to connect to", at());
                }
                PlannedAction::Connect { target }
            }
            (None, Some(path), None) => {
                if path.is_empty() {
                    bail!("{}: accept is empty; give the path to listen on", at());
                }
                if Path::new(&path) == own_socket {
                    bail!("{}: accept = {path:?} is the broker's own socket; choose another path", at());
                }
                if !accept_paths.insert(path.clone()) {
                    bail!(
                        "{}: accept = {path:?} is already used by an earlier rule; one listener serves one rule",
                        at()
                    );
                }
                let sock_type = match r.matches.sock_type {
                    None | Some(SockType::Stream) => SockType::Stream,
                    Some(SockType::Seqpacket) => SockType::Seqpacket,
                    Some(SockType::Dgram) => {
                        bail!(
                            "{}: accept cannot serve dgram sockets (they have no connections to accept); use connect or spawn",
                            at()
                        )
                    }
                };
                let timeout = match r.accept_timeout_s {
                    None => DEFAULT_ACCEPT_TIMEOUT,
                    Some(0) => bail!("{}: accept_timeout_s must be at least 1", at()),
                    Some(s) => Duration::from_secs(s),
                };
                PlannedAction::Accept { path, sock_type, timeout }
            }
            (None, None, Some(argv)) => {
                if argv.is_empty() || argv[0].is_empty() {
                    bail!("{}: spawn needs a command: spawn = [\"/path/to/cmd\", \"arg\", ...]", at());
                }
                PlannedAction::Spawn { argv }
            }
            _ => bail!("{}: give exactly one of connect, accept or spawn", at()),
        };
        if r.accept_timeout_s.is_some() && !matches!(action, PlannedAction::Accept { .. }) {
            bail!("{}: accept_timeout_s only applies to accept rules", at());
        }
        out.push((r.matches, action));
    }
    Ok(out)
}

/// A rule's action as read from the file, before its listener (if any) exists.
#[derive(Debug, PartialEq)]
enum PlannedAction {
    Connect { target: String },
    Accept { path: String, sock_type: SockType, timeout: Duration },
    Spawn { argv: Vec<String> },
}

/// The broker: its rules and where they came from (named in refusals).
struct Broker {
    config_path: PathBuf,
    rules: Vec<Rule>,
}

impl Broker {
    /// Reads the rule file and opens the `accept` rules' listeners, so that clients can connect there
    /// before any request arrives.
    fn load(config_path: &Path, own_socket: &Path) -> anyhow::Result<Broker> {
        let text = std::fs::read_to_string(config_path)
            .with_context(|| format!("cannot read the rule file {}", config_path.display()))?;
        let planned = parse_config(&text, config_path, own_socket)?;
        let mut rules = Vec::new();
        for (i, (matches, p)) in planned.into_iter().enumerate() {
            let action = match p {
                PlannedAction::Connect { target } => Action::Connect { target },
                PlannedAction::Spawn { argv } => Action::Spawn { argv },
                PlannedAction::Accept { path, sock_type, timeout } => {
                    let listener = listen_at(Path::new(&path), sock_type, None).with_context(|| {
                        format!("rule {} of {}: cannot listen on {path}", i + 1, config_path.display())
                    })?;
                    listener.set_nonblocking(true).context("O_NONBLOCK on an accept listener")?;
                    Action::Accept { path, listener, sock_type, timeout }
                }
            };
            rules.push(Rule { number: i + 1, matches, action });
        }
        Ok(Broker { config_path: config_path.to_owned(), rules })
    }

    /// Answers one request and logs one line about it.
    fn handle(&self, req: &Request) -> Reply {
        let started = Instant::now();
        let rule = self.rules.iter().find(|r| r.matches.matches(req));
        let outcome = match rule {
            None => Err(format!(
                "no rule of {} matches socket {} (peer_name {:?}, peer_comm {:?}, tag {:?}, sock_type {}); add a [[rule]] for it or choose another policy",
                self.config_path.display(),
                req.socket_ino,
                req.peer_name,
                req.peer_comm,
                req.tag,
                req.sock_type
            )),
            Some(rule) => rule.run(req).map_err(|e| {
                format!("rule {} of {} ({}): {e}", rule.number, self.config_path.display(), rule.action.describe())
            }),
        };
        let rule_no = rule.map(|r| r.number);
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match outcome {
            Ok((fd, replayed)) => {
                tracing::info!(
                    migration = %req.migration_id, socket_ino = req.socket_ino, sock_type = %req.sock_type,
                    peer_name = %req.peer_name, peer_comm = %req.peer_comm, tag = %req.tag,
                    queued = req.queued.len(), rule = rule_no, replayed, elapsed_ms,
                    "handed over a socket"
                );
                Reply::Socket { fd, replayed }
            }
            Err(reason) => {
                tracing::info!(
                    migration = %req.migration_id, socket_ino = req.socket_ino, sock_type = %req.sock_type,
                    peer_name = %req.peer_name, peer_comm = %req.peer_comm, tag = %req.tag,
                    queued = req.queued.len(), rule = rule_no, elapsed_ms,
                    "refused: {reason}"
                );
                Reply::Refuse(reason)
            }
        }
    }
}

impl Rule {
    /// The socket to hand over and whether the queued bytes are already in it.
    fn run(&self, req: &Request) -> Result<(OwnedFd, bool), String> {
        match &self.action {
            Action::Connect { target } => broker::socket::connect(target, req.sock_type).map(|fd| (fd, false)),
            Action::Accept { path, listener, sock_type, timeout } => {
                if req.sock_type != *sock_type {
                    return Err(format!(
                        "it listens for {sock_type} connections, the socket is {}; give the rule a sock_type match",
                        req.sock_type
                    ));
                }
                accept_one(listener, path, *timeout).map(|fd| (fd, false))
            }
            Action::Spawn { argv } => spawn_on_pair(argv, req).map(|fd| (fd, true)),
        }
    }
}

/// Waits up to `timeout` for a client on `listener` (non-blocking, shared by concurrent requests:
/// each `accept` takes a different client). A client that already hung up while it waited in the
/// backlog is skipped: handing it over would give the process a dead connection.
fn accept_one(listener: &UnixListener, path: &str, timeout: Duration) -> Result<OwnedFd, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            // Linux does not pass O_NONBLOCK from the listener to the accepted socket: it blocks, as the
            // process' original socket did.
            Ok((stream, _)) => {
                if peer_hung_up(&stream) {
                    tracing::debug!("accept {path}: skipped a client that hung up while waiting");
                    continue;
                }
                return Ok(stream.into());
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(format!(
                        "no client connected to {path} within {}s; connect the peer there, or raise accept_timeout_s",
                        timeout.as_secs()
                    ));
                }
                let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                let wait = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
                match poll(&mut fds, wait) {
                    Ok(_) | Err(Errno::EINTR) => continue,
                    Err(e) => return Err(format!("poll on {path}: {e}")),
                }
            }
            Err(e) => return Err(format!("accept on {path}: {e}")),
        }
    }
}

/// A unix stream or seqpacket peer's close sets `SHUTDOWN_MASK` on our end, which `poll` reports as
/// POLLHUP (always reported, whatever events were asked for).
fn peer_hung_up(stream: &UnixStream) -> bool {
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::empty())];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(n) if n > 0 => fds[0].revents().is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
        _ => false,
    }
}

/// Makes a socketpair of the request's type, writes the queued bytes into the command's end (so they
/// wait in the handed-over end's receive queue, message by message), then starts the command with
/// that end as stdin, stdout and fd 3. The command starts after the bytes are in: nothing it writes can
/// get in front of them.
fn spawn_on_pair(argv: &[String], req: &Request) -> Result<OwnedFd, String> {
    let (ours, theirs) =
        nix::sys::socket::socketpair(AddressFamily::Unix, req.sock_type.to_nix(), None, SockFlag::SOCK_CLOEXEC)
            .map_err(|e| format!("socketpair: {e}"))?;
    broker::socket::put_queued(&theirs, &req.queued_messages(), req.sock_type)?;
    let stdin = theirs.try_clone().map_err(|e| format!("dup: {e}"))?;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(theirs))
        .env("MIGRATE_MIGRATION_ID", &req.migration_id)
        .env("MIGRATE_SOCKET_INO", req.socket_ino.to_string())
        .env("MIGRATE_SOCK_TYPE", req.sock_type.as_str())
        .env("MIGRATE_PEER_NAME", &req.peer_name)
        .env("MIGRATE_PEER_PID", req.peer_pid.to_string())
        .env("MIGRATE_PEER_COMM", &req.peer_comm)
        .env("MIGRATE_TAG", &req.tag);
    // SAFETY: the closure runs in the forked child before exec and only calls dup2(2), which is
    // async-signal-safe, and reads errno; it allocates nothing and touches no lock. std runs it after
    // setting up stdin, so fd 0 is the socket end here and dup2 gives fd 3 the same end without
    // FD_CLOEXEC.
    unsafe {
        cmd.pre_exec(|| {
            if libc::dup2(0, 3) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("cannot start {:?}: {e}", argv[0]))?;
    // The Command's copies of the command's end close with it, so the command alone holds that end:
    // when it exits, the process reads end of file.
    drop(cmd);
    let pid = child.id();
    let argv0 = argv[0].clone();
    let reaper = std::thread::Builder::new().name(format!("reap-{pid}")).spawn(move || match child.wait() {
        Ok(status) => tracing::info!(pid, command = %argv0, "spawned command ended: {status}"),
        Err(e) => tracing::warn!(pid, command = %argv0, "cannot wait for the spawned command: {e}"),
    });
    if let Err(e) = reaper {
        // The child lives on unreaped (a zombie once it exits); the handover still stands.
        tracing::warn!(pid, "cannot start a thread to reap the spawned command: {e}");
    }
    Ok(ours)
}

/// Listens on `path` (`@name`: abstract). For a filesystem path: creates the parent directory, removes
/// a stale socket file left by a broker that died, and refuses to replace a live one or a file that is
/// not a socket. With `mode`, the socket is created with that mode: the umask is set around `bind` so
/// that it is never reachable with wider permissions, even briefly.
fn listen_at(path: &Path, ty: SockType, mode: Option<u32>) -> anyhow::Result<UnixListener> {
    let abstract_name = path.as_os_str().as_encoded_bytes().starts_with(b"@");
    if !abstract_name {
        prepare_path(path)?;
    }
    let addr = unix_addr(path)?;
    let fd = socket(AddressFamily::Unix, ty.to_nix(), SockFlag::SOCK_CLOEXEC, None)?;
    let bound = match mode {
        Some(m) => {
            let old = umask(Mode::from_bits_truncate(!m & 0o777));
            let r = bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr);
            umask(old);
            r
        }
        None => bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr),
    };
    bound.with_context(|| format!("bind {}", path.display()))?;
    if let (Some(m), false) = (mode, abstract_name) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(m))?;
    }
    let backlog = Backlog::new(BACKLOG).unwrap_or(Backlog::MAXCONN);
    listen(&fd, backlog).with_context(|| format!("listen {}", path.display()))?;
    // std's UnixListener only calls accept4 on it, which works for seqpacket listeners too.
    Ok(UnixListener::from(fd))
}

fn prepare_path(path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    };
    if !meta.file_type().is_socket() {
        bail!("{} exists and is not a socket; remove it or choose another path", path.display());
    }
    match UnixStream::connect(path) {
        Ok(_) => bail!("another process listens on {}; stop it or choose another path", path.display()),
        // ECONNREFUSED: a socket file nobody listens on any more. A seqpacket listener answers a
        // stream connect with EPROTOTYPE: live, but of the other type; also not ours to remove.
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            std::fs::remove_file(path).with_context(|| format!("cannot remove the stale socket {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("{} exists and may be in use", path.display())),
    }
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> anyhow::Result<()> {
    init_logging();
    let args = Args::parse();
    let broker = Broker::load(&args.config, &args.socket)?;
    // Only root's target agent may ask: whoever can reach this socket gets sockets connected to the
    // rules' peers.
    let listener = listen_at(&args.socket, SockType::Stream, Some(0o600))
        .with_context(|| format!("cannot listen on {}", args.socket.display()))?;
    tracing::info!(
        socket = %args.socket.display(), config = %args.config.display(), rules = broker.rules.len(),
        "migrate-broker listening"
    );
    broker::serve(listener, move |req| broker.handle(req))
        .with_context(|| format!("serving on {}", args.socket.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<Vec<(Match, PlannedAction)>> {
        parse_config(text, Path::new("/etc/migrate/broker.toml"), Path::new(broker::DEFAULT_SOCKET))
    }

    fn err(text: &str) -> String {
        format!("{:#}", parse(text).unwrap_err())
    }

    #[test]
    fn the_example_config_is_valid() {
        let rules = parse(include_str!("../../deploy/broker.toml")).unwrap();
        assert!(!rules.is_empty());
    }

    #[test]
    fn actions_and_defaults() {
        let rules = parse(
            r#"
            [[rule]]
            match = { peer_name = "/run/app.sock", sock_type = "seqpacket" }
            accept = "/run/migrate/a.sock"
            [[rule]]
            connect = "@abstract"
            [[rule]]
            match = { tag = "logger", socket_ino = 7 }
            spawn = ["sh", "-c", "cat"]
            "#,
        )
        .unwrap();
        assert_eq!(
            rules[0].1,
            PlannedAction::Accept {
                path: "/run/migrate/a.sock".into(),
                sock_type: SockType::Seqpacket,
                timeout: DEFAULT_ACCEPT_TIMEOUT
            }
        );
        assert_eq!(rules[1].1, PlannedAction::Connect { target: "@abstract".into() });
        assert_eq!(rules[2].0.socket_ino, Some(7));
    }

    #[test]
    fn matching_needs_every_given_field() {
        let m = Match { peer_comm: Some("client".into()), tag: Some("x".into()), ..Match::default() };
        let mut r = Request::new("m", 1, SockType::Stream);
        r.peer_comm = "client".into();
        assert!(!m.matches(&r));
        r.tag = "x".into();
        assert!(m.matches(&r));
        assert!(Match::default().matches(&r));
        let typed = Match { sock_type: Some(SockType::Dgram), ..Match::default() };
        assert!(!typed.matches(&r));
    }

    #[test]
    fn mistakes_are_named_by_rule() {
        assert_eq!(
            err("[[rule]]\nconnect = \"/a\"\n[[rule]]\nconnect = \"/b\"\nspawn = [\"x\"]\n"),
            "rule 2 of /etc/migrate/broker.toml: give exactly one of connect, accept or spawn"
        );
        assert!(err("[[rule]]\nspawn = []\n").contains("rule 1 of /etc/migrate/broker.toml: spawn needs a command"));
        assert!(err("[[rule]]\nconnect = \"/a\"\naccept_timeout_s = 3\n").contains("only applies to accept rules"));
        assert!(
            err("[[rule]]\nmatch = { sock_type = \"dgram\" }\naccept = \"/a\"\n").contains("accept cannot serve dgram")
        );
        assert!(
            err("[[rule]]\naccept = \"/a\"\n[[rule]]\naccept = \"/a\"\n").contains("already used by an earlier rule")
        );
        assert!(err("[[rule]]\naccept = \"/run/migrate/broker.sock\"\n").contains("the broker's own socket"));
        // Unknown keys are refused: a typo would silently widen a match.
        let typo = err("[[rule]]\nmatch = { peer_nam = \"/x\" }\nconnect = \"/a\"\n");
        assert!(typo.starts_with("/etc/migrate/broker.toml is not a valid rule file"), "{typo}");
        assert!(typo.contains("peer_nam"), "{typo}");
    }

    #[test]
    fn cli() {
        let a = Args::try_parse_from(["migrate-broker", "--config", "/etc/b.toml"]).unwrap();
        assert_eq!(a.socket, Path::new(broker::DEFAULT_SOCKET));
        assert_eq!(a.config, Path::new("/etc/b.toml"));
        assert!(Args::try_parse_from(["migrate-broker"]).is_err());
    }
}
