//! The `migrate` command, as a library so its argument parsing and output are testable. It is a thin
//! client: everything happens in the local source agent, which it asks over the control socket
//! (`source_agent::control`) and whose events it shows as a progress bar and a summary.

pub mod drain;

use std::path::PathBuf;

use clap::Parser;
use source_agent::control::{Event, MigrateOptions, Mode, Phase, Summary};

/// Move a running process tree to another host, with as little downtime as possible.
///
/// The local source agent freezes the tree with CRIU, streams it over QUIC (mutual TLS) to the target
/// agent, which restores it; only when the copy runs there is the original killed. On any failure before
/// that, the original is resumed here.
#[derive(Parser, Debug, PartialEq)]
#[command(name = "migrate", version, args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Pid of the root of the process tree to move.
    #[arg(required = true)]
    pub pid: Option<u32>,
    /// Target agent, as host[:port] (default port 7420).
    #[arg(required = true)]
    pub host: Option<String>,
    /// Print the result (or the error) as one JSON object on stdout instead of text and a progress bar.
    #[arg(long, global = true)]
    pub json: bool,
    /// Control socket of the local source agent.
    #[arg(long, global = true, env = "MIGRATE_AGENT_SOCKET", default_value = source_agent::control::DEFAULT_SOCKET)]
    pub agent_socket: PathBuf,
    #[command(flatten)]
    pub how: How,
    #[command(flatten)]
    pub external: External,
}

/// Policies for the tree's connections to the outside (migrate, check and drain). Without one, such a
/// connection stops the migration before anything is frozen, and the error names the flag to use.
#[derive(clap::Args, Debug, PartialEq, Clone, Default)]
pub struct External {
    /// A unix socket connected outside the tree: MATCH=POLICY, may repeat, first match wins (then the
    /// source agent's config). MATCH: ino:N (the socket's inode, as `migrate check` shows), path:P (the
    /// peer's path, or an accepted connection's listener path), comm:C (the peer's command), or *.
    /// POLICY: connect[:PATH] (on the target, a new connection to the same or the given path; datagram
    /// sockets: the same path only), broker[:SOCKET] (a socket from the broker on the target, default
    /// /run/migrate/broker.sock), hangup (the peer is gone after the move: EOF), refuse.
    #[arg(long = "unix", global = true, value_name = "MATCH=POLICY", value_parser = rule)]
    pub unix: Vec<String>,
    /// A terminal of the tree held by a process outside it (a tmux server's attached client):
    /// MATCH=POLICY with MATCH path:/dev/pts/N, comm:C (who holds it outside) or *, and POLICY hangup
    /// (the restored program gets a fresh terminal whose other side has gone) or refuse.
    #[arg(long = "tty", global = true, value_name = "MATCH=POLICY", value_parser = rule)]
    pub tty: Vec<String>,
}

impl External {
    pub fn rules(&self) -> source_agent::external::Rules {
        source_agent::external::Rules { unix: self.unix.clone(), tty: self.tty.clone() }
    }
}

fn rule(s: &str) -> Result<String, String> {
    s.parse::<source_agent::external::Rule>().map(|_| s.to_string())
}

/// How memory moves (migrate and drain).
#[derive(clap::Args, Debug, PartialEq, Clone, Copy)]
pub struct How {
    /// hybrid: pre-copy rounds, then post-copy for the rest; postcopy: run on the target at once, memory
    /// fetched on first touch while the rest streams in; precopy: copy memory while the tree runs and
    /// freeze only for what changed since; stopcopy: freeze, dump everything, copy, restore.
    #[arg(long, global = true, value_enum, default_value_t = Mode::Hybrid)]
    pub mode: Mode,
    /// Pre-copy and hybrid: stop the rounds once the estimated downtime (of sending the rest during the
    /// freeze) is at most this many milliseconds.
    #[arg(long, global = true, default_value_t = MigrateOptions::default().max_downtime_ms)]
    pub max_downtime: u64,
    /// Pre-copy and hybrid: at most this many rounds (the first, which copies everything, included).
    #[arg(long, global = true, default_value_t = MigrateOptions::default().max_rounds, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_rounds: u32,
    /// Post-copy and hybrid: ride out link outages up to this many seconds; after a longer one the copy
    /// is dropped on the target and the original resumes here.
    #[arg(long, global = true, default_value_t = MigrateOptions::default().grace_s, value_parser = clap::value_parser!(u64).range(1..=source_agent::control::MAX_GRACE.as_secs()))]
    pub grace: u64,
    /// Pre-copy: do not give the tree's processes a write-protect userfaultfd (one system call injected
    /// through ptrace) to learn which pages they write; compare every page's content every round.
    #[arg(long, global = true)]
    pub no_write_protect: bool,
}

impl How {
    pub fn options(&self) -> MigrateOptions {
        MigrateOptions {
            mode: self.mode,
            max_downtime_ms: self.max_downtime,
            max_rounds: self.max_rounds,
            grace_s: self.grace,
            no_write_protect: self.no_write_protect,
        }
    }
}

/// Other things `migrate` does.
#[derive(clap::Subcommand, Debug, PartialEq)]
pub enum Command {
    /// Say, before anything is frozen, what would stop PID from migrating (to HOST, when given) and how
    /// to fix it. Exit status 0 when it can migrate, 1 when something blocks it.
    Check {
        /// Pid of the root of the process tree.
        pid: u32,
        /// Target agent to ask as well, as host[:port].
        host: Option<String>,
    },
    /// Move every migratable tree of a selection to other hosts, report the rest. Exit status 0 when
    /// nothing failed (refused trees are reported, not failures), 1 otherwise.
    Drain(drain::DrainArgs),
    /// List migrations running and recently finished on this host's agents.
    Status {
        /// HTTP address of the local source agent's /status.
        #[arg(long, default_value = "127.0.0.1:9464")]
        source_http: std::net::SocketAddr,
        /// HTTP address of the local target agent's /status.
        #[arg(long, default_value = "127.0.0.1:9465")]
        target_http: std::net::SocketAddr,
    },
}

/// The progress bar style of one migration.
pub fn bar_style() -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(
        "{spinner} {prefix:>9} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {wide_msg}",
    )
    .expect("valid template")
    .progress_chars("=> ")
}

/// Shows one agent event on a migration's bar (a bar whose prefix names pid->host keeps it).
pub fn show(bar: &indicatif::ProgressBar, ev: &Event) {
    match ev {
        Event::Phase { phase, message } => {
            if !bar.prefix().contains("->") {
                bar.set_prefix(format!("{phase:?}").to_lowercase());
            }
            if *phase != Phase::Transfer {
                bar.set_message(message.clone());
            }
        }
        Event::Transfer { done, total, wire } => {
            bar.set_length(*total);
            bar.set_position(*done);
            bar.set_message(format!("{} on the wire", bytes(*wire)));
        }
        Event::Round { .. } => {
            // Each round stays on screen above the bar.
            if let Some(line) = round_text(ev) {
                bar.println(line);
            }
        }
        _ => {}
    }
}

/// One line per pre-copy round: pages sent, dirty rate, estimated downtime, and why the rounds stop.
pub fn round_text(ev: &Event) -> Option<String> {
    let Event::Round { round, pages_sent, wire_bytes, dirty_pages_per_s, est_downtime_ms, freeze } = ev else {
        return None;
    };
    Some(format!(
        "round {round}: {pages_sent} pages sent ({} on the wire), dirtying {:.0} pages/s, downtime if frozen now ~{}{}",
        bytes(*wire_bytes),
        dirty_pages_per_s,
        duration_ms(*est_downtime_ms),
        freeze.as_ref().map(|f| format!("; freezing: {f}")).unwrap_or_default()
    ))
}

/// Human size, binary units.
pub fn bytes(n: u64) -> String {
    let n = n as f64;
    match n {
        n if n >= (1u64 << 30) as f64 => format!("{:.2} GiB", n / (1u64 << 30) as f64),
        n if n >= (1u64 << 20) as f64 => format!("{:.1} MiB", n / (1u64 << 20) as f64),
        n if n >= 1024.0 => format!("{:.1} KiB", n / 1024.0),
        n => format!("{n} B"),
    }
}

fn duration_ms(ms: f64) -> String {
    if ms >= 1000.0 { format!("{:.2} s", ms / 1000.0) } else { format!("{ms:.0} ms") }
}

/// The summary as text: one line with the figures that matter, then the breakdown.
pub fn summary_text(s: &Summary) -> String {
    format!(
        "migrated pid {} ({}, {} process{}) to {} as pid {}: downtime {}, total {}, {} image, {} on the wire ({:.1}x compression)\n  \
         dump {}, transfer {}, restore {}; {} files; target host {}{}",
        s.pid,
        s.comm,
        s.processes,
        if s.processes == 1 { "" } else { "es" },
        s.target,
        s.target_pid,
        duration_ms(s.downtime_ms),
        duration_ms(s.total_ms),
        bytes(s.image_bytes),
        bytes(s.wire_bytes),
        s.compression_ratio,
        duration_ms(s.dump_ms),
        duration_ms(s.transfer_ms),
        duration_ms(s.restore_ms),
        s.files,
        s.target_host,
        match s.mode {
            Mode::Stopcopy => String::new(),
            mode => format!(
                "\n  {}: {} round{} in {}{}, {} pages sent during the freeze, {} of memory in the image files; all memory in place on the target {}",
                match mode {
                    Mode::Precopy => "pre-copy",
                    Mode::Postcopy => "post-copy",
                    _ => "hybrid",
                },
                s.rounds,
                if s.rounds == 1 { "" } else { "s" },
                duration_ms(s.precopy_ms),
                match s.dirty_tracking.as_str() {
                    "" => String::new(),
                    t => format!(" ({t} dirty tracking)"),
                },
                s.freeze_pages,
                bytes(s.image_page_bytes),
                match (s.complete_ms, s.fault_p50_us, s.fault_p99_us) {
                    (Some(ms), Some(p50), Some(p99)) => format!(
                        "{} after the freeze ({} faults served, p50 {p50} us, p99 {p99} us)",
                        duration_ms(ms),
                        s.faults
                    ),
                    (Some(ms), _, _) => format!("{} after the freeze ({} faults served)", duration_ms(ms), s.faults),
                    (None, _, _) => "(not confirmed by the target)".into(),
                }
            ),
        }
    )
}

/// Runs the command; returns the process exit code.
pub async fn run(cli: Cli) -> i32 {
    match (&cli.command, cli.pid, &cli.host) {
        (Some(Command::Check { pid, host }), _, _) => check(&cli, *pid, host.clone()).await,
        (Some(Command::Drain(a)), _, _) => {
            match drain::run(&cli.agent_socket, a, cli.how.options(), cli.external.rules(), !cli.json).await {
                Ok(r) => {
                    if cli.json {
                        println!("{}", serde_json::to_string(&r).expect("report serializes"));
                    } else {
                        print!("{}", r.text());
                    }
                    if r.failed.is_empty() { 0 } else { 1 }
                }
                Err(e) => fail(&cli, e, None),
            }
        }
        (Some(Command::Status { source_http, target_http }), _, _) => status(&cli, *source_http, *target_http).await,
        (None, Some(pid), Some(host)) => migrate(&cli, pid, host.clone()).await,
        _ => unreachable!("clap requires pid and host without a subcommand"),
    }
}

async fn check(cli: &Cli, pid: u32, target: Option<String>) -> i32 {
    let req = source_agent::control::Request::Check { pid, target, rules: cli.external.rules() };
    match source_agent::control::request(&cli.agent_socket, &req, |_| {}).await {
        Ok(Event::Checked { report }) => {
            if cli.json {
                println!("{}", serde_json::to_string(&report).expect("report serializes"));
            } else {
                print!("{}", report.text());
            }
            if report.blockers.is_empty() { 0 } else { 1 }
        }
        Ok(other) => fail(cli, format!("unexpected answer from the source agent: {other:?}"), None),
        Err(e) => fail(cli, e.to_string(), None),
    }
}

async fn status(cli: &Cli, source: std::net::SocketAddr, target: std::net::SocketAddr) -> i32 {
    let mut out = serde_json::Map::new();
    let mut text = String::new();
    for (role, addr) in [("source", source), ("target", target)] {
        let v = match telemetry::get(addr, "/status").await {
            Ok(body) => serde_json::from_str(&body).unwrap_or(serde_json::json!({ "error": "unreadable status" })),
            Err(e) => serde_json::json!({ "error": format!("{role} agent at {addr}: {e}") }),
        };
        text.push_str(&format!("{role} agent ({addr}):\n"));
        if let Some(e) = v["error"].as_str() {
            text.push_str(&format!("  unreachable: {e}\n"));
        }
        let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
        for r in v["running"].as_array().into_iter().flatten() {
            text.push_str(&format!(
                "  running     pid {} with {} ({}) id {}\n",
                r["pid"],
                s(&r["target"]),
                s(&r["phase"]),
                s(&r["id"])
            ));
        }
        for r in v["recent"].as_array().into_iter().flatten().rev() {
            let detail = match (r["downtime_ms"].as_f64(), r["error"].as_str()) {
                (Some(d), _) => format!("downtime {d:.0} ms"),
                (_, Some(e)) => e.chars().take(120).collect(),
                _ => String::new(),
            };
            text.push_str(&format!("  {:<11} pid {} with {}: {detail}\n", s(&r["outcome"]), r["pid"], s(&r["target"])));
        }
        out.insert(role.into(), v);
    }
    if cli.json {
        println!("{}", serde_json::Value::Object(out));
    } else {
        print!("{text}");
    }
    0
}

fn fail(cli: &Cli, error: String, original: Option<serde_json::Value>) -> i32 {
    if cli.json {
        println!("{}", serde_json::json!({ "error": error, "original": original }));
    }
    eprintln!("migrate: error: {error}");
    1
}

async fn migrate(cli: &Cli, pid: u32, host: String) -> i32 {
    use indicatif::{ProgressBar, ProgressDrawTarget};
    let bar = if cli.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr())
    };
    bar.set_style(bar_style());
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    let req = source_agent::control::Request::Migrate {
        pid,
        target: host,
        options: cli.how.options(),
        rules: cli.external.rules(),
    };
    let result = source_agent::control::request(&cli.agent_socket, &req, |ev| show(&bar, ev)).await;
    bar.finish_and_clear();
    match result {
        Ok(Event::Done { summary }) => {
            if cli.json {
                println!("{}", serde_json::to_string(&summary).expect("summary serializes"));
            } else {
                println!("{}", summary_text(&summary));
            }
            0
        }
        Ok(other) => fail(cli, format!("unexpected answer from the source agent: {other:?}"), None),
        Err(e) => {
            let original = match &e {
                source_agent::control::ClientError::Failed { original, .. } => serde_json::to_value(original).ok(),
                _ => None,
            };
            fail(cli, e.to_string(), original)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pid_host_and_flags() {
        let c =
            Cli::try_parse_from(["migrate", "--json", "123", "10.0.0.2:7420", "--agent-socket", "/x.sock"]).unwrap();
        assert_eq!(
            c,
            Cli {
                command: None,
                pid: Some(123),
                host: Some("10.0.0.2:7420".into()),
                json: true,
                agent_socket: "/x.sock".into(),
                how: How { mode: Mode::Hybrid, max_downtime: 100, max_rounds: 8, grace: 10, no_write_protect: false },
                external: External::default(),
            }
        );
        assert!(Cli::try_parse_from(["migrate", "notapid", "b"]).is_err());
        assert!(Cli::try_parse_from(["migrate", "123"]).is_err());
        assert!(Cli::try_parse_from(["migrate"]).is_err());
        let c = Cli::try_parse_from(["migrate", "check", "--json", "42"]).unwrap();
        assert_eq!(c.command, Some(Command::Check { pid: 42, host: None }));
        assert!(c.json);
        let c = Cli::try_parse_from(["migrate", "--mode", "stopcopy", "--max-downtime", "300", "1", "b"]).unwrap();
        assert_eq!(
            c.how,
            How { mode: Mode::Stopcopy, max_downtime: 300, max_rounds: 8, grace: 10, no_write_protect: false }
        );
        assert!(Cli::try_parse_from(["migrate", "--grace", "0", "1", "b"]).is_err());
        assert!(Cli::try_parse_from(["migrate", "--grace", "61", "1", "b"]).is_err());
        assert!(Cli::try_parse_from(["migrate", "--mode", "teleport", "1", "b"]).is_err());
        assert!(Cli::try_parse_from(["migrate", "--max-rounds", "0", "1", "b"]).is_err());
        let c =
            Cli::try_parse_from(["migrate", "drain", "--to", "b", "--pids-file", "f", "--max-rounds", "3"]).unwrap();
        assert_eq!(c.how.max_rounds, 3);
        let c = Cli::try_parse_from(["migrate", "check", "42", "b:7420"]).unwrap();
        assert_eq!(c.command, Some(Command::Check { pid: 42, host: Some("b:7420".into()) }));
        let c = Cli::try_parse_from([
            "migrate",
            "--unix",
            "path:/run/a.sock=connect",
            "--unix",
            "*=hangup",
            "--tty",
            "comm:tmux: client=hangup",
            "1",
            "b",
        ])
        .unwrap();
        assert_eq!(c.external.rules().unix, ["path:/run/a.sock=connect", "*=hangup"]);
        assert_eq!(c.external.rules().tty, ["comm:tmux: client=hangup"]);
        let e = Cli::try_parse_from(["migrate", "--unix", "path:/x=teleport", "1", "b"]).unwrap_err().to_string();
        assert!(e.contains("MATCH=POLICY"), "{e}");
    }

    #[test]
    fn summary_line() {
        let s = Summary {
            migration_id: "m".into(),
            pid: 7,
            comm: "work".into(),
            processes: 3,
            target: "b".into(),
            target_host: "b".into(),
            target_pid: 7,
            downtime_ms: 812.4,
            dump_ms: 500.0,
            transfer_ms: 200.0,
            restore_ms: 100.0,
            total_ms: 1520.0,
            image_bytes: 256 << 20,
            image_page_bytes: 255 << 20,
            wire_bytes: 3 << 20,
            compression_ratio: 85.3,
            files: 20,
            mode: Mode::Stopcopy,
            rounds: 0,
            precopy_ms: 0.0,
            freeze_pages: 0,
            dirty_tracking: String::new(),
            complete_ms: None,
            faults: 0,
            fault_p50_us: None,
            fault_p99_us: None,
        };
        let t = summary_text(&s);
        assert!(t.starts_with("migrated pid 7 (work, 3 processes) to b as pid 7: downtime 812 ms, total 1.52 s, 256.0 MiB image, 3.0 MiB on the wire (85.3x compression)"), "{t}");
        assert!(!t.contains("pre-copy"), "{t}");
        let p = Summary {
            mode: Mode::Precopy,
            rounds: 3,
            precopy_ms: 2500.0,
            freeze_pages: 812,
            dirty_tracking: "write-protect".into(),
            image_page_bytes: 96 << 10,
            complete_ms: Some(1900.0),
            faults: 12,
            ..s
        };
        let t = summary_text(&p);
        assert!(t.ends_with("pre-copy: 3 rounds in 2.50 s (write-protect dirty tracking), 812 pages sent during the freeze, 96.0 KiB of memory in the image files; all memory in place on the target 1.90 s after the freeze (12 faults served)"), "{t}");
        let round = Event::Round {
            round: 1,
            pages_sent: 2600,
            wire_bytes: 10 << 20,
            dirty_pages_per_s: 5200.4,
            est_downtime_ms: 340.0,
            freeze: Some("the dirty set stopped shrinking".into()),
        };
        assert_eq!(
            round_text(&round).unwrap(),
            "round 1: 2600 pages sent (10.0 MiB on the wire), dirtying 5200 pages/s, downtime if frozen now ~340 ms; freezing: the dirty set stopped shrinking"
        );
    }
}
