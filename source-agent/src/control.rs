//! The local control protocol between the `migrate` command and the source agent: one JSON object per
//! line on a unix stream socket. The client sends one [`Request`]; the agent answers with [`Event`]s and
//! ends with `done` or `failed`. Both sides live here ([`request`] is the client).
//!
//! JSON rather than protobuf: it is local, low-rate, and an operator can speak it with `socat`.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Longest line either side accepts.
pub const MAX_LINE: usize = 64 << 10;

/// Default control socket of the source agent.
pub const DEFAULT_SOCKET: &str = "/run/migrate/source.sock";

/// What the `migrate` command asks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// Move the tree rooted at `pid` to the target agent at `target` (`host[:port]`).
    Migrate {
        pid: u32,
        target: String,
        #[serde(default)]
        options: MigrateOptions,
        /// Policies for the tree's connections to the outside, tried before the agent's own.
        #[serde(default)]
        rules: crate::external::Rules,
    },
    /// Pre-flight only: what would stop the tree from moving (to `target`, when given). Touches nothing.
    Check {
        pid: u32,
        target: Option<String>,
        #[serde(default)]
        rules: crate::external::Rules,
    },
    /// What the target agent at `target` states about itself (name, free memory), for placement.
    Probe { target: String },
}

/// How memory moves.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Pre-copy rounds as in `Precopy`, then post-copy for the rest: the copy runs on the target after
    /// a short freeze, whatever the dirty rate, and most of its memory is already there.
    #[default]
    Hybrid,
    /// Restore at once with all private memory missing; the target fetches each page on first touch
    /// while the rest streams in.
    Postcopy,
    /// Copy memory round after round while the tree runs, freeze only for what changed since; the
    /// target holds all memory before the copy runs.
    Precopy,
    /// Freeze, dump everything, copy it, restore: no rounds (CRIU cold migration, over QUIC).
    Stopcopy,
}

/// How a migration runs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct MigrateOptions {
    pub mode: Mode,
    /// Pre-copy: freeze once the estimated downtime is at most this.
    pub max_downtime_ms: u64,
    /// Pre-copy: rounds at most, the first (all memory) included.
    pub max_rounds: u32,
    /// Post-copy and hybrid: how long a link outage is ridden out (seconds, at most MAX_GRACE). Longer,
    /// and the copy is dropped on the target and the original resumed here.
    pub grace_s: u64,
    /// Pre-copy: no write-protect dirty tracking (crate::dirty), even where it works.
    pub no_write_protect: bool,
}

impl MigrateOptions {
    /// Err names an option out of range. The `migrate` command checks them too; this is for any other
    /// client of the control socket (a grace of 0 would turn the link's idle timeout off, so that a lost
    /// target went unnoticed for a minute while the original waited).
    pub fn check(&self) -> Result<(), String> {
        let most = MAX_GRACE.as_secs();
        if !(1..=most).contains(&self.grace_s) {
            return Err(format!("bad request: a grace of {} s; it must be 1 to {most} s", self.grace_s));
        }
        if self.max_rounds == 0 {
            return Err("bad request: max_rounds 0; at least 1 (the first round copies all memory)".into());
        }
        Ok(())
    }
}

/// Default of MigrateOptions::grace_s.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);
/// Longest grace: the target agent's own idle timeout (protocol::tls::MAX_IDLE).
pub const MAX_GRACE: Duration = protocol::tls::MAX_IDLE;

impl Default for MigrateOptions {
    fn default() -> Self {
        let p = crate::precopy::Policy::default();
        MigrateOptions {
            mode: Mode::default(),
            max_downtime_ms: p.max_downtime.as_millis() as u64,
            max_rounds: p.max_rounds,
            grace_s: DEFAULT_GRACE.as_secs(),
            no_write_protect: false,
        }
    }
}

/// Phases of a migration, in order.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Connect,
    Prepare,
    /// Pre-copy rounds while the tree runs.
    Precopy,
    Dump,
    Transfer,
    Restore,
    Commit,
    /// The copy runs; the target fills in the rest of its memory from what it received.
    Complete,
}

/// Where the original process is after a failure.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Original {
    /// It was never frozen, or it was resumed: it runs on the source as before.
    Running,
    /// Commit was sent but not confirmed: it is kept stopped on the source, because the target may be
    /// running the copy. Check the target; resume the original with `kill -CONT` only if it does not.
    StoppedInDoubt,
}

/// What the agent tells the `migrate` command.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Phase {
        phase: Phase,
        message: String,
    },
    /// Image bytes sent so far (`done` of `total`), and bytes on the wire.
    Transfer {
        done: u64,
        total: u64,
        wire: u64,
    },
    /// A pre-copy round ended.
    Round {
        round: u32,
        /// Pages sent in this round (bytes, zero and copy records).
        pages_sent: u64,
        /// Bytes this round put on the wire.
        wire_bytes: u64,
        /// Pages per second the tree changed during the round.
        dirty_pages_per_s: f64,
        /// Downtime if frozen now.
        est_downtime_ms: f64,
        /// Why the rounds stop here, if they do.
        freeze: Option<String>,
    },
    Done {
        summary: Summary,
    },
    /// The answer to a Check.
    Checked {
        report: crate::preflight::Report,
    },
    /// The answer to a Probe.
    Probed {
        host: String,
        mem_available: u64,
    },
    Failed {
        error: String,
        original: Original,
    },
}

/// The outcome of a migration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub migration_id: String,
    pub pid: u32,
    pub comm: String,
    /// Processes in the tree.
    pub processes: usize,
    pub target: String,
    pub target_host: String,
    /// Root pid on the target (CRIU keeps pids, so normally equal to `pid`).
    pub target_pid: u32,
    /// From the freeze (when `criu dump` stopped the tree, seen within about a millisecond; CRIU's start
    /// before that is not counted) until the target confirmed the copy runs, on the source's clock
    /// (CLOCK_MONOTONIC).
    pub downtime_ms: f64,
    /// From the freeze until the images were written.
    pub dump_ms: f64,
    pub transfer_ms: f64,
    pub restore_ms: f64,
    /// From the request until the end.
    pub total_ms: f64,
    pub image_bytes: u64,
    /// Memory in the image files (`pages-*.img`): all of it in stop-copy; in the lazy modes only what
    /// CRIU does not leave in the frozen tree (file-backed and shared pages, locked memory), normally
    /// well under a MiB.
    #[serde(default)]
    pub image_page_bytes: u64,
    pub wire_bytes: u64,
    /// image_bytes / wire_bytes.
    pub compression_ratio: f64,
    pub files: usize,
    #[serde(default)]
    pub mode: Mode,
    /// Pre-copy rounds while the tree ran.
    #[serde(default)]
    pub rounds: u32,
    /// Time spent in those rounds.
    #[serde(default)]
    pub precopy_ms: f64,
    /// Page records sent during the freeze (what changed since the last round).
    #[serde(default)]
    pub freeze_pages: u64,
    /// How the rounds learnt what changed (source_agent::dirty): "write-protect", "soft-dirty" or
    /// "compare" (every page read again); empty without rounds.
    #[serde(default)]
    pub dirty_tracking: String,
    /// From the freeze until every page was in place on the target (lazy restore); None when the
    /// target did not say.
    #[serde(default)]
    pub complete_ms: Option<f64>,
    /// Page faults the target served while it filled the memory in.
    #[serde(default)]
    pub faults: u64,
    /// Fault service time on the target (from the fault to the filled page), median and 99th
    /// percentile, microseconds; None without faults.
    #[serde(default)]
    pub fault_p50_us: Option<u64>,
    #[serde(default)]
    pub fault_p99_us: Option<u64>,
}

impl Summary {
    /// Sets compression_ratio from the byte counts.
    pub fn with_ratio(mut self) -> Self {
        self.compression_ratio =
            if self.wire_bytes > 0 { self.image_bytes as f64 / self.wire_bytes as f64 } else { 1.0 };
        self
    }
}

/// Errors of the control client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the source agent at {path}: {source}; is source-agent running on this host (or set --agent-socket / MIGRATE_AGENT_SOCKET)?"
    )]
    Connect { path: String, source: std::io::Error },
    #[error("source agent connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("source agent sent an unreadable line: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("source agent closed the connection without a result")]
    NoResult,
    #[error("{error}")]
    Failed { error: String, original: Original },
}

/// Sends `req` to the agent at `socket`, calling `on_event` for every event, and returns the final one
/// (`Done` or `Checked`); `Failed` becomes an error.
pub async fn request(socket: &Path, req: &Request, mut on_event: impl FnMut(&Event)) -> Result<Event, ClientError> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect { path: socket.display().to_string(), source })?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let mut lines = BufReader::new(r).lines();
    while let Some(l) = lines.next_line().await? {
        let ev: Event = serde_json::from_str(&l)?;
        on_event(&ev);
        match ev {
            Event::Done { .. } | Event::Checked { .. } | Event::Probed { .. } => return Ok(ev),
            Event::Failed { error, original } => {
                return Err(ClientError::Failed { error, original });
            }
            _ => {}
        }
    }
    Err(ClientError::NoResult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_stable() {
        let r: Request = serde_json::from_str(r#"{"request":"migrate","pid":42,"target":"b:7420"}"#).unwrap();
        assert_eq!(
            r,
            Request::Migrate {
                pid: 42,
                target: "b:7420".into(),
                options: MigrateOptions::default(),
                rules: Default::default()
            }
        );
        let r: Request = serde_json::from_str(
            r#"{"request":"migrate","pid":42,"target":"b","options":{"mode":"stopcopy","max_downtime_ms":50}}"#,
        )
        .unwrap();
        let Request::Migrate { options, .. } = r else { panic!("{r:?}") };
        assert_eq!((options.mode, options.max_downtime_ms, options.max_rounds), (Mode::Stopcopy, 50, 8));
        assert_eq!(MigrateOptions::default().mode, Mode::Hybrid);
        assert_eq!(MigrateOptions::default().check(), Ok(()));
        for (grace_s, max_rounds) in [(0, 8), (MAX_GRACE.as_secs() + 1, 8), (10, 0)] {
            let e = MigrateOptions { grace_s, max_rounds, ..Default::default() }.check().unwrap_err();
            assert!(e.starts_with("bad request"), "{e}");
        }
        let e = Event::Failed { error: "x".into(), original: Original::Running };
        assert_eq!(serde_json::to_string(&e).unwrap(), r#"{"event":"failed","error":"x","original":"running"}"#);
    }
}
