//! Connections of the tree to the outside that CRIU will not carry by itself, and what to do with each:
//! unix sockets whose peer is outside the tree, and terminals the tree does not own (a tmux server holds
//! its attached client's terminal). Nothing outside the tree moves, so each needs a policy:
//!
//! | policy            | unix stream / seqpacket                                    | unix datagram              | terminal |
//! |-------------------|------------------------------------------------------------|----------------------------|----------|
//! | `connect[:PATH]`  | the target connects a new socket to PATH (default: the peer's path) and hands it in | CRIU reconnects to the same path | - |
//! | `broker[:SOCKET]` | the broker on the target (default [`broker::DEFAULT_SOCKET`]) hands over a socket | - | - |
//! | `hangup`          | a socket whose peer has gone (reads give the unread bytes, then EOF) | - | a fresh terminal whose other side has gone |
//! | `refuse`          | the default: the migration stops before anything is frozen, naming the socket and the flag | | |
//!
//! Rules come from the `migrate` command (`--unix MATCH=POLICY`, `--tty MATCH=POLICY`, tried first) and
//! from the source agent's config file (`unix = [...]`, `tty = [...]`), first match wins. MATCH is
//! `ino:N` (the tree's socket inode, as `migrate check` shows it), `path:P` (the connection's path: the
//! peer's name, or for an accepted connection the listener's path; for a terminal its /dev/pts path),
//! `comm:C` (the peer's command, or the command outside the tree holding the terminal), or `*`.
//!
//! How the target carries out each policy is in the target agent (`external.rs` there); this module
//! only decides, from the facts in [`crate::inspect`], so that every rule is unit-tested.

use serde::{Deserialize, Serialize};

use crate::inspect::{FdKind, Tree};
use crate::preflight::Finding;

/// What a rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    Ino(u64),
    Path(String),
    Comm(String),
    Any,
}

/// What to do with a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    Connect(Option<String>),
    Broker(Option<String>),
    Hangup,
    Refuse,
}

/// One rule: `MATCH=POLICY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub matcher: Match,
    pub policy: Policy,
    /// The rule as written, for messages and as the broker's tag.
    pub text: String,
}

impl std::str::FromStr for Rule {
    type Err = String;

    fn from_str(text: &str) -> Result<Rule, String> {
        let bad = |why: &str| {
            format!(
                "bad rule {text:?}: {why}; write MATCH=POLICY with MATCH one of ino:N, path:P, comm:C, * and POLICY one \
                 of connect[:PATH], broker[:SOCKET], hangup, refuse"
            )
        };
        // The policy is after the last '=' (a path or a command may contain '=' only on the match side).
        let (m, p) = text.rsplit_once('=').ok_or_else(|| bad("no '='"))?;
        let matcher = match m.split_once(':') {
            _ if m == "*" => Match::Any,
            Some(("ino", n)) => Match::Ino(n.parse().map_err(|_| bad("ino: takes a number"))?),
            Some(("path", p)) if !p.is_empty() => Match::Path(p.into()),
            Some(("comm", c)) if !c.is_empty() => Match::Comm(c.into()),
            _ => return Err(bad("unknown match")),
        };
        let arg = |rest: &str| (!rest.is_empty()).then(|| rest.to_string());
        let policy = match p.split_once(':').unwrap_or((p, "")) {
            ("connect", rest) => Policy::Connect(arg(rest)),
            ("broker", rest) => Policy::Broker(arg(rest)),
            ("hangup", "") => Policy::Hangup,
            ("refuse", "") => Policy::Refuse,
            _ => return Err(bad("unknown policy")),
        };
        if let Policy::Connect(Some(path)) | Policy::Broker(Some(path)) = &policy
            && !path.starts_with('/')
            && !path.starts_with('@')
        {
            return Err(bad("a path must be absolute (or @abstract)"));
        }
        Ok(Rule { matcher, policy, text: text.into() })
    }
}

/// The rules in force for one migration, as the `migrate` command and the agent's config give them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Rules {
    /// `MATCH=POLICY` for unix sockets.
    pub unix: Vec<String>,
    /// `MATCH=POLICY` for terminals.
    pub tty: Vec<String>,
}

impl Rules {
    /// These rules first, then `then`'s.
    pub fn then(&self, then: &Rules) -> Rules {
        Rules {
            unix: self.unix.iter().chain(&then.unix).cloned().collect(),
            tty: self.tty.iter().chain(&then.tty).cloned().collect(),
        }
    }

    /// Rules a caller other than root may give: those that only drop the connection (`hangup`,
    /// `refuse`). `connect` and `broker` make the root target agent open a socket and hand it to the
    /// tree, which could reach what its user may not (a root-only socket on the target); for other users
    /// they must come from the agent's config, which root writes.
    pub fn check_caller(&self, uid: u32) -> Result<(), String> {
        if uid == 0 {
            return Ok(());
        }
        let parsed = self.parse()?;
        for r in parsed.unix.iter().chain(&parsed.tty) {
            if matches!(r.policy, Policy::Connect(_) | Policy::Broker(_)) {
                return Err(format!(
                    "permission denied: rule {} asks the target agent (root) to open a socket for the tree; only root \
                     may give connect and broker rules on the command line, other users get them from the source \
                     agent's config (/etc/migrate/source-agent.toml)",
                    r.text
                ));
            }
        }
        Ok(())
    }

    /// Parses every rule; the first bad one is the error.
    pub fn parse(&self) -> Result<Parsed, String> {
        let p = |v: &[String]| v.iter().map(|r| r.parse::<Rule>()).collect::<Result<Vec<_>, _>>();
        Ok(Parsed { unix: p(&self.unix)?, tty: p(&self.tty)? })
    }

    /// Reads the `unix` and `tty` lists of a source agent config file (TOML).
    pub fn from_config(path: &std::path::Path) -> Result<Rules, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let rules: Rules = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        rules.parse().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(rules)
    }
}

/// Parsed rules.
#[derive(Debug, Clone, Default)]
pub struct Parsed {
    pub unix: Vec<Rule>,
    pub tty: Vec<Rule>,
}

/// A unix socket of the tree connected outside it, and what the target will do.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UnixPlan {
    pub pid: u32,
    pub fd: i32,
    /// The tree's socket inode here (CRIU's `unix[INO]` and `socket:[INO]`).
    pub ino: u64,
    pub sock_type: i32,
    /// The socket's own name (an accepted connection: its listener's path).
    pub name: String,
    pub peer_name: String,
    pub peer_owner: Option<(u32, String)>,
    /// `connect:PATH` (resolved), `broker:SOCKET` (resolved) or `hangup`.
    pub action: Action,
    /// The rule that chose it.
    pub rule: String,
}

/// What the target does for a connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Connect { path: String },
    Broker { socket: String },
    Hangup,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Connect { path } => write!(f, "connect to {path}"),
            Action::Broker { socket } => write!(f, "ask the broker at {socket}"),
            Action::Hangup => write!(f, "hang up"),
        }
    }
}

/// A terminal of the tree that it does not own.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TtyPlan {
    pub pid: u32,
    pub fd: i32,
    pub path: String,
    /// CRIU's `tty[RDEV:DEV]`.
    pub key: String,
    pub owner: Option<(u32, String)>,
    pub rule: String,
}

/// Everything the target must set up again.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Plan {
    pub unix: Vec<UnixPlan>,
    pub tty: Vec<TtyPlan>,
    /// Indexes of the ptys the tree owns (it holds their master): the target must have them free.
    #[serde(default)]
    pub own_ptys: Vec<u32>,
}

impl Plan {
    /// CRIU's `--external` keys for the dump: each socket and each terminal (one key per terminal).
    pub fn dump_externals(&self) -> Vec<String> {
        let mut v: Vec<String> = self.unix.iter().map(|u| format!("unix[{}]", u.ino)).collect();
        v.sort();
        v.dedup();
        let mut t: Vec<String> = self.tty.iter().map(|t| t.key.clone()).collect();
        t.sort();
        t.dedup();
        v.extend(t);
        v
    }

    /// One line per connection, for `migrate check`.
    pub fn lines(&self) -> Vec<String> {
        let owner = |o: &Option<(u32, String)>| {
            o.as_ref().map(|(p, c)| format!("pid {p} ({c})")).unwrap_or_else(|| "an unknown process".into())
        };
        let mut out: Vec<String> = self
            .unix
            .iter()
            .map(|u| {
                format!(
                    "pid {} fd {} (unix {} socket {}) <-> {} held by {}: {} (rule {})",
                    u.pid,
                    u.fd,
                    type_name(u.sock_type),
                    u.ino,
                    peer_text(&u.peer_name, &u.name),
                    owner(&u.peer_owner),
                    u.action,
                    u.rule
                )
            })
            .collect();
        out.extend(self.tty.iter().map(|t| {
            format!(
                "pid {} fd {} (terminal {}) held outside by {}: a fresh terminal whose other side has gone (rule {})",
                t.pid,
                t.fd,
                t.path,
                owner(&t.owner),
                t.rule
            )
        }));
        out
    }
}

fn type_name(t: i32) -> &'static str {
    match t {
        libc::SOCK_STREAM => "stream",
        libc::SOCK_DGRAM => "datagram",
        libc::SOCK_SEQPACKET => "seqpacket",
        _ => "unknown-type",
    }
}

fn peer_text(peer_name: &str, name: &str) -> String {
    match (peer_name.is_empty(), name.is_empty()) {
        (false, _) => format!("{peer_name:?}"),
        (true, false) => format!("an unnamed client of {name:?}"),
        (true, true) => "an unnamed socket".into(),
    }
}

fn finding(code: &str, pid: u32, detail: String, fix: String) -> Finding {
    Finding { code: code.into(), pid, detail, fix }
}

/// The first rule matching, or None (refuse).
fn choose<'r>(rules: &'r [Rule], ino: Option<u64>, path: &str, comm: Option<&str>) -> Option<&'r Rule> {
    rules.iter().find(|r| match &r.matcher {
        Match::Any => true,
        Match::Ino(n) => ino == Some(*n),
        Match::Path(p) => p == path,
        Match::Comm(c) => comm == Some(c.as_str()),
    })
}

/// Whether a path can be connected to on the target as written (absolute or abstract).
fn connectable(path: &str) -> bool {
    path.starts_with('/') || path.starts_with('@')
}

/// Decides every external connection of the tree: the plan, and a blocker for each one refused or
/// impossible (with the flag that would allow it).
pub fn plan(t: &Tree, rules: &Parsed) -> (Plan, Vec<Finding>) {
    let mut plan = Plan::default();
    let mut blockers = Vec::new();
    let sockets: Vec<u64> = t
        .processes
        .iter()
        .flat_map(|p| &p.fds)
        .filter_map(|f| match &f.kind {
            FdKind::Socket(s) => Some(s.ino),
            _ => None,
        })
        .collect();
    let mut masters: Vec<u32> =
        t.processes.iter().flat_map(|p| &p.fds).filter_map(|f| f.tty.as_ref()?.master_of).collect();
    masters.sort_unstable();
    masters.dedup();
    plan.own_ptys = masters.clone();
    for p in &t.processes {
        for fd in &p.fds {
            let n = fd.fd;
            match &fd.kind {
                FdKind::Socket(s) => {
                    let Some(u) = s.unix.as_ref().filter(|u| u.peer != 0 && !sockets.contains(&u.peer)) else {
                        continue;
                    };
                    // Two fds of the tree on one socket: one plan (CRIU restores the socket once).
                    if plan.unix.iter().any(|x| x.ino == s.ino) {
                        continue;
                    }
                    // Rules match an accepted connection by its listener's path (it has no peer path); only a
                    // peer path can be connected to.
                    let path = if u.peer_name.is_empty() { &u.name } else { &u.peer_name };
                    let peer_path = &u.peer_name;
                    let comm = u.peer_owner.as_ref().map(|(_, c)| c.as_str());
                    let owner = u
                        .peer_owner
                        .as_ref()
                        .map(|(pp, c)| format!("pid {pp} ({c})"))
                        .unwrap_or_else(|| "an unknown process".into());
                    let what = format!(
                        "fd {n} (unix {} socket {}) is connected to {}, held by {owner}, outside the tree",
                        type_name(s.sock_type),
                        s.ino,
                        peer_text(&u.peer_name, &u.name)
                    );
                    if is_graphical(&u.peer_name) {
                        // Nothing can hand a window over to another display.
                        blockers.push(finding(
                            "graphical",
                            p.pid,
                            format!(
                                "fd {n} (socket {}) is connected to a display server at {:?}, held by {owner}",
                                s.ino, u.peer_name
                            ),
                            "close the program's window (or run it under a virtual display inside the tree); display \
                             connections cannot move"
                                .into(),
                        ));
                        continue;
                    }
                    let by = if connectable(path) { format!("path:{path}") } else { format!("ino:{}", s.ino) };
                    let rule = choose(&rules.unix, Some(s.ino), path, comm);
                    let dgram = s.sock_type == libc::SOCK_DGRAM;
                    let refuse = |why: &str| {
                        let allow = if dgram && connectable(peer_path) {
                            format!(
                                "allow it with --unix {by}=connect (CRIU connects a new socket to the same path on the target)"
                            )
                        } else if dgram {
                            "a datagram socket connected to an unnamed peer cannot move: close it, or bind its peer \
                             to a path"
                                .to_string()
                        } else if connectable(peer_path) {
                            format!(
                                "allow it with --unix {by}=connect (a new connection to {path} on the target), \
                                 --unix {by}=broker (a socket from the target's broker) or --unix {by}=hangup (the peer \
                                 is gone after the move); or add such a rule to the source agent's config"
                            )
                        } else {
                            format!(
                                "allow it with --unix {by}=broker (a socket from the target's broker), --unix {by}=hangup, \
                                 or --unix {by}=connect:PATH; or add such a rule to the source agent's config"
                            )
                        };
                        finding("external-unix", p.pid, format!("{what}{why}"), allow)
                    };
                    let Some(rule) = rule else {
                        blockers.push(refuse(""));
                        continue;
                    };
                    let action = match (&rule.policy, dgram) {
                        (Policy::Refuse, _) => {
                            blockers.push(refuse(&format!("; rule {} refuses it", rule.text)));
                            continue;
                        }
                        (Policy::Connect(None), _) if connectable(peer_path) => {
                            Action::Connect { path: peer_path.clone() }
                        }
                        (Policy::Connect(None), _) => {
                            blockers.push(refuse("; connect needs a path and the peer has none usable here"));
                            continue;
                        }
                        (Policy::Connect(Some(to)), true) if to != peer_path => {
                            blockers.push(refuse(&format!(
                                "; a datagram socket can only be reconnected to its own peer path, not to {to} \
                                 (CRIU reconnects it)"
                            )));
                            continue;
                        }
                        (Policy::Connect(Some(to)), _) => Action::Connect { path: to.clone() },
                        (Policy::Broker(_) | Policy::Hangup, true) => {
                            blockers.push(refuse(&format!(
                                "; rule {} asks for something a datagram socket cannot get: only connect (CRIU \
                                 reconnects datagram sockets by path; handing one in hangs CRIU's restore)",
                                rule.text
                            )));
                            continue;
                        }
                        (Policy::Broker(sock), false) => {
                            Action::Broker { socket: sock.clone().unwrap_or_else(|| broker::DEFAULT_SOCKET.into()) }
                        }
                        (Policy::Hangup, false) => Action::Hangup,
                    };
                    plan.unix.push(UnixPlan {
                        pid: p.pid,
                        fd: n,
                        ino: s.ino,
                        sock_type: s.sock_type,
                        name: u.name.clone(),
                        peer_name: u.peer_name.clone(),
                        peer_owner: u.peer_owner.clone(),
                        action,
                        rule: rule.text.clone(),
                    });
                }
                FdKind::CharDevice { path, .. } => {
                    let Some(tty) = &fd.tty else { continue };
                    let Some(index) = tty.pts_index else { continue };
                    if masters.contains(&index) || plan.tty.iter().any(|x| x.key == tty.key()) {
                        continue;
                    }
                    let comm = tty.owner.as_ref().map(|(_, c)| c.as_str());
                    let owner = tty
                        .owner
                        .as_ref()
                        .map(|(pp, c)| format!("held outside the tree by pid {pp} ({c})"))
                        .unwrap_or_else(|| "whose other side is outside the tree".into());
                    let detail = format!("fd {n} is the terminal {path}, {owner}");
                    let fix = format!(
                        "allow it with --tty path:{path}=hangup (the restored program gets a fresh terminal whose \
                         other side has gone, as when a terminal is closed); or start the program with setsid and \
                         its stdio redirected"
                    );
                    match choose(&rules.tty, None, path, comm) {
                        Some(r) if r.policy == Policy::Hangup => plan.tty.push(TtyPlan {
                            pid: p.pid,
                            fd: n,
                            path: path.clone(),
                            key: tty.key(),
                            owner: tty.owner.clone(),
                            rule: r.text.clone(),
                        }),
                        Some(r) if r.policy == Policy::Refuse => blockers.push(finding(
                            "external-tty",
                            p.pid,
                            format!("{detail}; rule {} refuses it", r.text),
                            fix,
                        )),
                        Some(r) => blockers.push(finding(
                            "external-tty",
                            p.pid,
                            format!("{detail}; rule {} asks for a policy terminals do not have", r.text),
                            format!("terminals take hangup or refuse only; {fix}"),
                        )),
                        None => blockers.push(finding("external-tty", p.pid, detail, fix)),
                    }
                }
                _ => {}
            }
        }
    }
    (plan, blockers)
}

fn is_graphical(name: &str) -> bool {
    name.contains("/.X11-unix/") || name.contains("wayland-") || name.contains("/.ICE-unix/")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::{Fd, Process, Socket, Tty, UnixInfo};

    fn rules(unix: &[&str], tty: &[&str]) -> Parsed {
        Rules { unix: unix.iter().map(|s| s.to_string()).collect(), tty: tty.iter().map(|s| s.to_string()).collect() }
            .parse()
            .unwrap()
    }

    fn sock(ino: u64, ty: i32, name: &str, peer: u64, peer_name: &str, comm: &str) -> FdKind {
        FdKind::Socket(Socket {
            ino,
            family: libc::AF_UNIX,
            sock_type: ty,
            unix: Some(UnixInfo {
                name: name.into(),
                peer,
                peer_name: peer_name.into(),
                peer_owner: Some((7, comm.into())),
                state: 1,
            }),
            ..Default::default()
        })
    }

    fn tree(fds: Vec<(FdKind, Option<Tty>)>) -> Tree {
        let p = Process {
            pid: 100,
            fds: fds
                .into_iter()
                .enumerate()
                .map(|(i, (kind, tty))| Fd { fd: i as i32, kind, locked: false, tty })
                .collect(),
            ..Default::default()
        };
        Tree { root: 100, processes: vec![p], ..Default::default() }
    }

    #[test]
    fn rules_parse_and_reject() {
        let r: Rule = "path:/run/a=b.sock=connect:/run/x".parse().unwrap();
        assert_eq!(r.matcher, Match::Path("/run/a=b.sock".into()));
        assert_eq!(r.policy, Policy::Connect(Some("/run/x".into())));
        assert_eq!("ino:5=hangup".parse::<Rule>().unwrap().matcher, Match::Ino(5));
        assert_eq!("*=broker".parse::<Rule>().unwrap().policy, Policy::Broker(None));
        assert_eq!("comm:tmux: client=refuse".parse::<Rule>().unwrap().matcher, Match::Comm("tmux: client".into()));
        for bad in ["connect", "ino:x=connect", "path:=hangup", "pid:3=hangup", "*=teleport", "*=connect:rel.sock"] {
            let e = bad.parse::<Rule>().unwrap_err();
            assert!(e.contains("MATCH=POLICY"), "{bad}: {e}");
        }
    }

    #[test]
    fn config_file_rules_come_after_the_commands() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("source-agent.toml");
        std::fs::write(&f, "unix = [\"path:/run/a.sock=connect\", \"*=refuse\"]\ntty = [\"*=hangup\"]\n").unwrap();
        let from_file = Rules::from_config(&f).unwrap();
        let cmd = Rules { unix: vec!["ino:3=hangup".into()], tty: vec![] };
        let all = cmd.then(&from_file);
        assert_eq!(all.unix, ["ino:3=hangup", "path:/run/a.sock=connect", "*=refuse"]);
        assert_eq!(all.tty, ["*=hangup"]);
        std::fs::write(&f, "unix = [\"*=teleport\"]\n").unwrap();
        let e = Rules::from_config(&f).unwrap_err();
        assert!(e.contains("source-agent.toml") && e.contains("unknown policy"), "{e}");
        std::fs::write(&f, "unx = []\n").unwrap();
        assert!(Rules::from_config(&f).is_err(), "a misspelt key is an error, not an empty rule set");
    }

    #[test]
    fn refused_by_default_with_the_flag_to_use() {
        let t = tree(vec![(sock(11, libc::SOCK_STREAM, "", 1, "/run/srv.sock", "srv"), None)]);
        let (plan, b) = plan(&t, &Parsed::default());
        assert!(plan.unix.is_empty());
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].code, "external-unix");
        assert!(b[0].detail.contains("socket 11") && b[0].detail.contains("/run/srv.sock"), "{}", b[0].detail);
        assert!(b[0].detail.contains("pid 7 (srv)"));
        assert!(b[0].fix.contains("--unix path:/run/srv.sock=connect"), "{}", b[0].fix);
    }

    #[test]
    fn policies_resolve_per_type() {
        let t = tree(vec![
            (sock(11, libc::SOCK_STREAM, "", 1, "/run/srv.sock", "srv"), None),
            (sock(12, libc::SOCK_STREAM, "/run/mine.sock", 2, "", "client"), None),
            (sock(13, libc::SOCK_DGRAM, "", 3, "/dev/log", "syslogd"), None),
            (sock(14, libc::SOCK_SEQPACKET, "", 4, "@abstract", "x"), None),
        ]);
        let r = rules(&["path:/run/srv.sock=connect", "comm:client=broker", "*=connect"], &[]);
        let (plan, b) = plan(&t, &r);
        assert!(b.is_empty(), "{b:?}");
        let actions: Vec<_> = plan.unix.iter().map(|u| (u.ino, u.action.clone())).collect();
        assert_eq!(
            actions,
            [
                (11, Action::Connect { path: "/run/srv.sock".into() }),
                (12, Action::Broker { socket: "/run/migrate/broker.sock".into() }),
                (13, Action::Connect { path: "/dev/log".into() }),
                (14, Action::Connect { path: "@abstract".into() }),
            ]
        );
        assert_eq!(plan.dump_externals(), ["unix[11]", "unix[12]", "unix[13]", "unix[14]"]);
    }

    #[test]
    fn only_root_gives_connect_and_broker_rules() {
        let r = Rules { unix: vec!["*=hangup".into(), "path:/run/docker.sock=connect".into()], tty: vec![] };
        assert!(r.check_caller(0).is_ok());
        let e = r.check_caller(1000).unwrap_err();
        assert!(e.contains("path:/run/docker.sock=connect") && e.contains("only root"), "{e}");
        assert!(Rules { unix: vec!["*=hangup".into()], tty: vec!["*=hangup".into()] }.check_caller(1000).is_ok());
    }

    #[test]
    fn an_accepted_connection_has_no_path_to_connect_to() {
        // The tree's server end of a connection it accepted: its own name is the listener's path.
        let t = tree(vec![(sock(16, libc::SOCK_STREAM, "/run/mine.sock", 6, "", "client"), None)]);
        let (p, b) = plan(&t, &rules(&["path:/run/mine.sock=connect"], &[]));
        assert!(p.unix.is_empty());
        assert!(b[0].detail.contains("connect needs a path"), "{}", b[0].detail);
        assert!(!b[0].fix.contains("=connect ("), "connect is not offered: {}", b[0].fix);
        let (p, b) = plan(&t, &rules(&["path:/run/mine.sock=broker"], &[]));
        assert!(b.is_empty() && p.unix.len() == 1, "{b:?}");
    }

    #[test]
    fn impossible_policies_are_blockers() {
        let t = tree(vec![
            (sock(13, libc::SOCK_DGRAM, "", 3, "/dev/log", "syslogd"), None),
            (sock(15, libc::SOCK_STREAM, "", 5, "", "anon"), None),
        ]);
        let (_, b) = plan(&t, &rules(&["ino:13=hangup", "ino:15=connect"], &[]));
        assert_eq!(b.len(), 2);
        assert!(b[0].detail.contains("datagram"), "{}", b[0].detail);
        assert!(b[1].detail.contains("connect needs a path"), "{}", b[1].detail);
        assert!(b[1].fix.contains("--unix ino:15=broker"), "{}", b[1].fix);
        let (_, b) = plan(&t, &rules(&["ino:13=connect:/other", "ino:15=refuse"], &[]));
        assert!(b[0].detail.contains("only be reconnected to its own peer path"), "{}", b[0].detail);
        assert!(b[1].detail.contains("rule ino:15=refuse refuses it"), "{}", b[1].detail);
    }

    #[test]
    fn terminals_of_others_need_hangup_and_own_ptys_do_not() {
        let pts = |index: u32, owner: &str| Tty {
            rdev: (136 << 8) | index as u64,
            dev: 0x19,
            pts_index: Some(index),
            master_of: None,
            owner: Some((9, owner.into())),
        };
        let master = Tty { rdev: (5 << 8) | 2, dev: 6, pts_index: None, master_of: Some(4), owner: None };
        let dev = |p: &str, mi| FdKind::CharDevice { path: p.into(), major: 136, minor: mi };
        let t = tree(vec![
            (FdKind::CharDevice { path: "/dev/ptmx".into(), major: 5, minor: 2 }, Some(master)),
            (dev("/dev/pts/4", 4), Some(pts(4, "tmux: server"))),
            (dev("/dev/pts/3", 3), Some(pts(3, "tmux: client"))),
            (dev("/dev/pts/3", 3), Some(pts(3, "tmux: client"))),
        ]);
        let (p, b) = plan(&t, &Parsed::default());
        assert!(p.tty.is_empty());
        assert_eq!(b.len(), 2, "one per fd of the outside terminal: {b:?}");
        assert!(b[0].fix.contains("--tty path:/dev/pts/3=hangup"), "{}", b[0].fix);
        let (p, b) = plan(&t, &rules(&[], &["comm:tmux: client=hangup"]));
        assert!(b.is_empty(), "{b:?}");
        assert_eq!(p.tty.len(), 1, "one key for one terminal");
        assert_eq!(p.tty[0].key, "tty[8803:19]");
        assert_eq!(p.dump_externals(), ["tty[8803:19]"]);
        let (_, b) = plan(&t, &rules(&[], &["*=connect"]));
        assert!(b[0].fix.starts_with("terminals take hangup or refuse only"), "{}", b[0].fix);
    }
}
