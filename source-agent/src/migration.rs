//! One migration as the source sees it.
//!
//! Steps: find the tree → connect (QUIC, mutual TLS) → Hello → Prepare (target checks its pids) →
//! post-copy and hybrid: open the fault link ([`crate::fault_link`]) → pre-copy rounds while the tree
//! runs ([`crate::precopy`]; none in post-copy; in pre-copy and hybrid as the round policy decides) → **freeze**: `criu dump --lazy-pages --leave-stopped` (private memory
//! stays in the stopped tree) → every image file on its own stream and, in pre-copy, the final delta of
//! the memory on the pages stream → ImagesDone → the target restores, stopped, with its private memory
//! lazy → Restored → Commit → the target resumes its copy → Resumed (downtime ends) → the target fills
//! in the memory (post-copy and hybrid: while the final delta streams from here, from Commit on, and page faults are
//! answered on the fault link, [`PostCopy`]) → Complete → kill the original.
//!
//! `--mode stopcopy` skips the rounds and dumps every page into the images (`criu dump
//! --leave-stopped`), which cross as files; the target restores them as they are, and the original is
//! killed at Resumed.
//!
//! Rollback rule, in [`run`] where every failure lands:
//! - failure before the freeze: nothing was touched, the process runs as before;
//! - failure after the freeze and before Commit was sent (dump, transfer, restore, link): the original is
//!   resumed with SIGCONT here and the target is told to Abort (and kills its stopped copy on its own if
//!   the link is gone);
//! - stop-and-copy, failure after Commit was sent and before Resumed arrived: the target may be running
//!   the copy, so the original stays stopped and the error says so ([`Original::StoppedInDoubt`]);
//! - lazy modes, failure after Commit and before Complete ([`Stage::PostCopy`]): while pages are still
//!   on their way the copy cannot finish without this host, and the target kills it when it says so
//!   (Failed) or when the link has been gone for the grace; the original is resumed then (after the
//!   grace and [`ROLLBACK_MARGIN`] when the target could not say). Once every page reached the target
//!   (always in pre-copy), the copy may live on: the original stays stopped, in doubt.
//!
//! A journal file in the migration's work dir records which case holds ("frozen", "commit-sent",
//! "postcopy", "delivered"), so that an agent restarted after a crash resumes originals that were
//! frozen but never committed, or whose post-copy could not finish ([`recover`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use protocol::frame::{read_frame, write_frame};
use protocol::pages::BatchSink;
use protocol::pb::{self, source_msg, target_msg};
use protocol::stall::Watched;
use protocol::{ProtocolError, file_stream};
use tokio::sync::mpsc::UnboundedSender;

use crate::control::{Event, MigrateOptions, Mode, Original, Phase, Summary};
use crate::{dirty, precopy};

/// How long to wait for the target to answer the QUIC handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the target may take to restore once all images arrived: this, plus a second per
/// [`RESTORE_FLOOR_RATE`] bytes of images ([`restore_deadline`]). The tree stays frozen meanwhile.
pub const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);
/// The slowest restore allowed, bytes of images per second: a tenth of what CRIU restored from tmpfs on
/// the test VM (about 1 GB/s for a 2 GiB stop-and-copy).
pub const RESTORE_FLOOR_RATE: u64 = 100_000_000;
/// How long to wait for Resumed after Commit.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait, after Resumed, for the target to say every page is in place.
pub const COMPLETE_TIMEOUT: Duration = Duration::from_secs(600);
/// After the link to a post-copy target is lost, how much longer than the grace this side waits before
/// resuming the original: the target's own idle timer may start up to a keep-alive interval later
/// (protocol::tls::KEEP_ALIVE), and it then has to kill its copy.
pub const ROLLBACK_MARGIN: Duration = Duration::from_secs(3);
/// How long the original may take to exit once killed (a large address space takes a while to free).
pub const ORIGINAL_EXIT: Duration = Duration::from_secs(10);
/// Image files sent at once.
const PARALLEL_FILES: usize = 4;

/// What every migration of this agent shares.
pub struct Context {
    pub criu: criu::Criu,
    pub hello: pb::Hello,
    pub client: quinn::ClientConfig,
    pub state_dir: PathBuf,
    pub stats: Arc<crate::stats::Stats>,
    /// The agent's own policies for connections to the outside (its config file).
    pub rules: crate::external::Rules,
    /// Where fault links run (crate::fault_link).
    pub fault_lane: protocol::lane::Lane,
    /// Processes of the trees being migrated ([`Claim`]).
    pub busy: std::sync::Mutex<std::collections::HashSet<u32>>,
    /// Cancelled when the agent is asked to stop: each migration that has not sent its commit ends
    /// there, with its rollback ([`run`]).
    pub stopping: tokio_util::sync::CancellationToken,
    /// The migrations under way, which a stopping agent waits for.
    pub jobs: tokio_util::task::TaskTracker,
}

/// The processes of a tree this agent migrates, claimed from its pre-flight until the migration has
/// ended, rollback included: a second migration of any of them (the command run again after a Ctrl-C,
/// which does not stop the first; two drains; a parent and its child) is refused. Otherwise the
/// second one's rollback could resume an original whose copy the first one runs.
struct Claim<'a> {
    busy: &'a std::sync::Mutex<std::collections::HashSet<u32>>,
    pids: Vec<u32>,
}

impl<'a> Claim<'a> {
    fn take(busy: &'a std::sync::Mutex<std::collections::HashSet<u32>>, pids: &[u32]) -> Result<Self, String> {
        let mut set = busy.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = pids.iter().find(|p| set.contains(p)) {
            return Err(format!(
                "pid {p} is already being migrated by this agent (by another migrate command, or in another \
                 tree): wait until that migration has ended (see the agent's log or its /status)"
            ));
        }
        set.extend(pids);
        Ok(Claim { busy, pids: pids.to_vec() })
    }

    /// Processes forked into the tree before the freeze.
    fn extend(&mut self, pids: &[u32]) {
        let mut set = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        for &p in pids {
            if set.insert(p) {
                self.pids.push(p);
            }
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut set = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        for p in &self.pids {
            set.remove(p);
        }
    }
}

/// A failure, with where the original stands.
#[derive(Debug)]
pub struct Failure {
    pub error: String,
    pub original: Original,
}

/// Where the original is; decides the rollback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Untouched,
    Frozen,
    CommitSent,
    /// Post-copy: the target runs (or is about to run) the copy, which fetches its memory from here.
    /// The target kills it when the link is gone longer than the grace, unless every page had reached
    /// it (`delivered`): before that the original is resumed after the grace, after it is in doubt.
    PostCopy,
}

struct Migration<'a> {
    ctx: &'a Context,
    id: String,
    events: UnboundedSender<Event>,
    stage: Stage,
    pids: Vec<u32>,
    work_dir: PathBuf,
    /// The pre-flight found nothing: from here on this counts as a started migration.
    preflight_passed: bool,
    options: MigrateOptions,
    /// Post-copy: the target acknowledged the whole pages stream (it may complete without this host).
    delivered: Arc<std::sync::atomic::AtomicBool>,
    /// The target said no copy runs there, nor can (Failed.copy_gone): after Commit, the original is
    /// resumed at once on that word.
    copy_gone: Arc<std::sync::atomic::AtomicBool>,
    /// A lazy dump's CRIU ending its session (see LazyDump::finish).
    criu_finishing: Option<tokio::task::JoinHandle<Result<criu::Ran, criu::CriuError>>>,
    /// Pre-copy rounds run, their time and bytes on the wire.
    rounds: u32,
    precopy_ms: f64,
    precopy_wire: u64,
    /// How they learnt what changed (Summary.dirty_tracking).
    dirty_tracking: &'static str,
    /// Policies for connections to the outside: the command's, then the agent's.
    rules: crate::external::Rules,
    /// What the pre-flight decided for them.
    external: crate::external::Plan,
    /// The tree's processes, claimed from the pre-flight on (dropped when `run` returns).
    claim: Option<Claim<'a>>,
    /// Whether a stopping agent may drop the migration where it stands ([`Migration::cancellable`]).
    cancellable: tokio::sync::watch::Sender<bool>,
}

/// What the pre-copy rounds leave for the freeze: the pages stream and what the target holds.
struct PreCopied {
    stream: quinn::SendStream,
    held: precopy::Held,
    level: protocol::chunk::AdaptiveLevel,
    rounds: u32,
    /// How the rounds learnt what changed; with write-protect tracking the pass over the frozen tree
    /// too reads only what was written since the last round.
    tracking: Tracking,
}

/// How pre-copy learns what changed between passes (see [`dirty`]).
enum Tracking {
    WriteProtect(dirty::Trackers),
    SoftDirty,
    Compare,
}

impl Tracking {
    fn name(&self) -> &'static str {
        match self {
            Tracking::WriteProtect(_) => "write-protect",
            Tracking::SoftDirty => "soft-dirty",
            Tracking::Compare => "compare",
        }
    }
}

impl PreCopied {
    /// What changed in `regions` of the frozen tree since the last round, when that is known exactly.
    fn changed_at_freeze(&mut self, regions: &[precopy::Region]) -> Option<dirty::Changed> {
        let Tracking::WriteProtect(t) = &mut self.tracking else { return None };
        let c = t.changed(regions);
        tracing::info!(pages = c.written().len(), untracked = c.all_of.len(), "written since the last round");
        Some(c)
    }
}

/// Stream priority of the bulk pages (quinn: higher first): control and files go before them. Fault
/// answers do not share their connection (crate::fault_link).
const PRIORITY_BULK: i32 = -10;

/// The source's side of post-copy, after ImagesDone: streams every page that differs from what the
/// target holds (all of them after no rounds), going first where the faults are, while the fault link
/// answers the faults themselves (crate::fault_link::serve, which is given the other end of `hints`).
///
/// The fault link outlives the stream: it serves until the migration ends (the caller holds it), so
/// a page the target still lacks once the stream is in (it asks only then for a page its daemon let go
/// of and needs again, see target-agent's lazy module) is answered rather than waited for forever.
struct PostCopy {
    regions: Vec<precopy::Region>,
    delivered: Arc<std::sync::atomic::AtomicBool>,
    work_dir: PathBuf,
    pids: Vec<u32>,
    /// The fault link's server (the caller aborts it when the migration ends).
    faults: tokio::task::JoinHandle<Result<(), String>>,
    hints: std::sync::mpsc::Receiver<precopy::Key>,
    /// Fired when Commit is sent: the stream sends nothing before (what the pass reads meanwhile waits
    /// in [`UntilCommit`]), so that it does not take the cores from the target's restore, which is
    /// downtime (the copy cannot fault before it runs anyway).
    go: tokio::sync::oneshot::Receiver<()>,
    /// Fired once delivery is recorded (`delivered`, the journal): the migration then sends Detach.
    detach: tokio::sync::oneshot::Sender<()>,
}

impl PostCopy {
    /// Returns the bytes it put on the pages stream and the pages the target holds.
    async fn run(self, mut pre: PreCopied) -> Result<(u64, u64), String> {
        let PostCopy { regions, delivered, work_dir, pids, mut faults, hints, go, detach } = self;
        // The tree is stopped: what changed since the last round is known now, and the pass reads it while
        // the target restores (the tree's own cores are idle then). What it reads waits here until
        // Commit (UntilCommit). Until Commit only the restore can fault (CRIU's restorer touches some
        // lazy pages, e.g. the rseq area): the fault link alone answers it, and if the link fails the
        // restore would wait.
        let only = pre.changed_at_freeze(&regions);
        let gate = async {
            tokio::select! {
                r = &mut faults => {
                    let e = match r {
                        Ok(Ok(())) => "the target closed it".to_string(),
                        Ok(Err(e)) => e,
                        Err(e) => e.to_string(),
                    };
                    Err(format!("the fault link failed before the commit: {e}"))
                }
                go = go => go.map_err(|_| "the migration ended before the commit".to_string()),
            }
        };
        let mut sink = UntilCommit::new(&mut pre.stream, gate, HOLD_UNTIL_COMMIT);
        let pass =
            precopy::Pass { round: pre.rounds, frozen: true, only, hints: Some(hints), no_copies: true, current: true };
        // A failure returns at once, also before Commit (a gate that failed is in the sink's error).
        let stats = precopy::send_round(&mut pre.held, &mut sink, regions, pass, &pre.level).await?;
        let end = precopy::send_end(&mut sink, pre.held.records).await?;
        sink.open().await.map_err(|e| e.to_string())?;
        drop(sink);
        pre.stream.finish().map_err(|e| format!("pages stream: {e}"))?;
        tracing::info!(
            pages = stats.sent,
            scanned = stats.scanned,
            secs = stats.secs,
            read_secs = stats.read_secs,
            "post-copy: every page sent"
        );
        // Once the target has the whole stream it can complete without this host: from then on the
        // original is not resumed on our own (a failure leaves it stopped, in doubt), and Detach tells
        // the target so. Until Detach arrives the target kills its copy when the link fails, so the
        // two agents never decide apart (the target reads the stream's end before its acknowledgement
        // arrives here).
        match pre.stream.stopped().await {
            Ok(None) => {
                delivered.store(true, Ordering::SeqCst);
                write_journal(&work_dir, "delivered", &pids);
                let _ = detach.send(());
            }
            Ok(Some(code)) => return Err(format!("the target stopped the pages stream (code {code})")),
            Err(e) => return Err(format!("pages stream: {e}")),
        }
        if faults.is_finished()
            && let Ok(Err(e)) = faults.await
        {
            tracing::warn!("fault link: {e}");
        }
        Ok((stats.wire + end, pre.held.len() as u64))
    }
}

/// How much of the post-copy pages stream [`UntilCommit`] holds back at most (the source's memory).
const HOLD_UNTIL_COMMIT: usize = 64 << 20;

/// The post-copy pages stream before Commit: batches the pass over the stopped tree reads while the
/// target restores are held here, up to `cap` bytes, and go out once `gate` opens (at Commit): sent
/// earlier they would take the target's cores from its restore, which is downtime.
struct UntilCommit<'a, W, G> {
    stream: &'a mut W,
    /// Ok at Commit, Err when the migration cannot get there; None once it opened.
    gate: Option<std::pin::Pin<Box<G>>>,
    held: Vec<Vec<bytes::Bytes>>,
    bytes: usize,
    cap: usize,
}

impl<'a, W: BatchSink + Send, G: std::future::Future<Output = Result<(), String>> + Send> UntilCommit<'a, W, G> {
    fn new(stream: &'a mut W, gate: G, cap: usize) -> Self {
        UntilCommit { stream, gate: Some(Box::pin(gate)), held: Vec::new(), bytes: 0, cap }
    }

    /// Waits for the gate (if it did not open yet), then sends what was held.
    async fn open(&mut self) -> std::io::Result<()> {
        if let Some(gate) = self.gate.take() {
            gate.await.map_err(std::io::Error::other)?;
        }
        for parts in std::mem::take(&mut self.held) {
            self.stream.put(parts).await?;
        }
        self.bytes = 0;
        Ok(())
    }
}

impl<W: BatchSink + Send, G: std::future::Future<Output = Result<(), String>> + Send> BatchSink
    for UntilCommit<'_, W, G>
{
    async fn put(&mut self, parts: Vec<bytes::Bytes>) -> std::io::Result<()> {
        if let Some(gate) = self.gate.as_mut() {
            let len: usize = parts.iter().map(|p| p.len()).sum();
            match futures::poll!(gate.as_mut()) {
                std::task::Poll::Pending if self.bytes + len <= self.cap => {
                    self.held.push(parts);
                    self.bytes += len;
                    return Ok(());
                }
                // Full: open() waits for the gate.
                std::task::Poll::Pending => {}
                std::task::Poll::Ready(r) => {
                    self.gate = None;
                    r.map_err(std::io::Error::other)?;
                }
            }
            self.open().await?;
        }
        self.stream.put(parts).await
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs one migration and applies the rollback rule to any failure.
pub async fn run(
    ctx: &Context,
    pid: u32,
    target: &str,
    options: MigrateOptions,
    rules: &crate::external::Rules,
    caller_uid: u32,
    events: UnboundedSender<Event>,
) -> Result<Summary, Failure> {
    if let Err(error) = rules.check_caller(caller_uid) {
        return Err(Failure { error, original: Original::Running });
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    let work_dir = ctx.state_dir.join("outgoing").join(&id);
    let mut m = Migration {
        ctx,
        id: id.clone(),
        events,
        stage: Stage::Untouched,
        pids: Vec::new(),
        work_dir,
        preflight_passed: false,
        options,
        delivered: Default::default(),
        copy_gone: Default::default(),
        criu_finishing: None,
        rounds: 0,
        precopy_ms: 0.0,
        precopy_wire: 0,
        dirty_tracking: "",
        rules: rules.then(&ctx.rules),
        external: Default::default(),
        claim: None,
        cancellable: tokio::sync::watch::Sender::new(true),
    };
    ctx.stats.migrations.start(telemetry::Running {
        id: id.clone(),
        pid,
        target: target.into(),
        phase: "inspect".into(),
        started_unix: telemetry::now_unix(),
    });
    let stop = stop_requested(&ctx.stopping, m.cancellable.subscribe());
    let result = tokio::select! {
        biased;
        r = m.steps(pid, target, caller_uid) => r,
        () = stop => {
            tracing::warn!(id = %m.id, stage = ?m.stage, "the agent is stopping: this migration ends here");
            Err("the source agent was asked to stop (SIGTERM or SIGINT) before this migration's commit".into())
        }
    };
    if result.is_err() {
        // CRIU leaves the tree stopped when it is done; resuming it before would race with that.
        let _ = m.criu_finished().await;
    }
    let original = match (&result, m.stage) {
        (Ok(_), _) => Original::Running,
        (Err(_), Stage::Untouched) => Original::Running,
        (Err(e), Stage::Frozen) => {
            // Before Commit: the target will not run its copy, so the original must run again.
            tracing::warn!(pids = ?m.pids, "rolling back: resuming the original ({e})");
            resume_original(&m.pids, e)?
        }
        (Err(e), Stage::CommitSent | Stage::PostCopy) if m.copy_gone.load(Ordering::SeqCst) => {
            // The target killed its copy and saw it exit (it said so): the original must run again.
            tracing::warn!(pids = ?m.pids, "the target's copy is gone ({e}); resuming the original");
            resume_original(&m.pids, e)?
        }
        (Err(_), Stage::CommitSent) => Original::StoppedInDoubt,
        (Err(_), Stage::PostCopy) if m.delivered.load(Ordering::SeqCst) => Original::StoppedInDoubt,
        (Err(e), Stage::PostCopy) => {
            // The target will kill its copy: it cannot finish without this host's pages, and the target
            // drops it once the link has been gone for the grace. Wait that long (and a margin), then the
            // original runs again.
            let wait = Duration::from_secs(m.options.grace_s) + ROLLBACK_MARGIN;
            tracing::warn!(pids = ?m.pids, ?wait, "post-copy failed ({e}); resuming the original once the target has dropped its copy");
            tokio::time::sleep(wait).await;
            resume_original(&m.pids, e)?
        }
    };
    if original == Original::Running || result.is_ok() {
        let _ = std::fs::remove_dir_all(&m.work_dir);
    }
    let stats = &ctx.stats;
    let outcome = match (&result, m.stage) {
        (Ok(s), _) => {
            stats.succeeded.inc();
            stats.bytes_sent.add(s.wire_bytes);
            stats.image_bytes.add(s.image_bytes);
            stats.downtime.observe(s.downtime_ms / 1000.0);
            "moved"
        }
        (Err(_), Stage::Untouched) => "refused",
        (Err(_), Stage::Frozen) => "rolled_back",
        (Err(_), Stage::CommitSent | Stage::PostCopy) if original == Original::Running => "rolled_back",
        (Err(_), Stage::CommitSent | Stage::PostCopy) => "in_doubt",
    };
    if result.is_err() && m.preflight_passed {
        stats.failed.inc();
        match (m.stage, original) {
            (Stage::Untouched, _) => {}
            (_, Original::Running) => stats.rolled_back.inc(),
            (_, Original::StoppedInDoubt) => stats.in_doubt.inc(),
        }
    }
    stats.migrations.finish(
        &id,
        telemetry::Finished {
            id: m.id.clone(),
            pid,
            target: target.into(),
            outcome: outcome.into(),
            downtime_ms: result.as_ref().ok().map(|s| s.downtime_ms),
            wire_bytes: result.as_ref().map(|s| s.wire_bytes).unwrap_or(0),
            error: result.as_ref().err().cloned(),
            finished_unix: telemetry::now_unix(),
        },
    );
    result.map_err(|error| {
        // Each error is a sentence; the rollback outcome is the next one.
        let error = if error.ends_with(['.', '?', '!']) { error } else { format!("{error}.") };
        let error = match original {
            Original::Running if m.stage == Stage::Frozen => format!("{error} The original was resumed on this host."),
            Original::Running if m.copy_gone.load(Ordering::SeqCst) => {
                format!("{error} The target says its copy is gone; the original was resumed on this host.")
            }
            Original::Running if m.stage == Stage::PostCopy => format!(
                "{error} The copy on the target could not get the rest of its memory and was dropped there; the original \
                 was resumed on this host."
            ),
            Original::Running => format!("{error} The process was not touched."),
            Original::StoppedInDoubt if m.stage == Stage::PostCopy => format!(
                "{error} The target had received all memory, so its copy may run: the original (pids {:?}) is kept stopped \
                 here. If the target does not run it, resume the original with kill -CONT; otherwise kill it.",
                m.pids
            ),
            Original::StoppedInDoubt => format!(
                "{error} Commit was sent but not confirmed: the copy may run on the target, so the original (pids {:?}) is kept \
                 stopped here. If the target does not run it, resume the original with kill -CONT; otherwise kill it.",
                m.pids
            ),
        };
        Failure { error, original }
    })
}

/// Resolves once the agent is stopping and the migration may be dropped where it stands: before the
/// freeze, or after it until the commit is sent, except while CRIU dumps (the tree is CRIU's until the
/// dump returns). Dropped there, a migration fails as if its link had failed at that point, and [`run`]
/// applies the rollback rule. Past the commit it is never dropped: the copy may run on the target.
async fn stop_requested(
    stopping: &tokio_util::sync::CancellationToken,
    mut cancellable: tokio::sync::watch::Receiver<bool>,
) {
    stopping.cancelled().await;
    if cancellable.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Resumes the stopped original after the failure `e`; a failure to do so is the error the user sees.
fn resume_original(pids: &[u32], e: &str) -> Result<Original, Failure> {
    criu::tree::resume(pids).map(|()| Original::Running).map_err(|re| Failure {
        error: format!("{e}; and resuming the original failed: {re}: resume it with kill -CONT {pids:?}"),
        original: Original::StoppedInDoubt,
    })
}

/// The journal in the work dir: the stage ("frozen", "commit-sent", "postcopy", "delivered"), then the pids.
/// Written beside and renamed over the last one, so that an agent killed while it writes leaves the
/// old stage or the new, never a truncated file.
fn write_journal(dir: &Path, stage: &str, pids: &[u32]) {
    let text = format!("{stage}\n{}\n", pids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" "));
    let next = dir.join("journal.next");
    if let Err(e) = std::fs::write(&next, text).and_then(|()| std::fs::rename(&next, dir.join("journal"))) {
        tracing::error!("cannot write the journal in {}: {e}", dir.display());
    }
}

/// At start: resume originals left frozen by a crashed agent; keep those whose commit is in doubt.
pub fn recover(state_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(state_dir.join("outgoing")) else {
        return;
    };
    for e in entries.flatten() {
        let dir = e.path();
        let text = std::fs::read_to_string(dir.join("journal")).unwrap_or_default();
        let mut lines = text.lines();
        let stage = lines.next().unwrap_or("");
        let pids: Vec<u32> = lines.next().unwrap_or("").split_whitespace().filter_map(|p| p.parse().ok()).collect();
        match stage {
            "commit-sent" | "delivered" => {
                tracing::error!(dir = %dir.display(), ?pids, "a migration's commit is in doubt: the original is kept stopped; check the target");
                continue;
            }
            "postcopy" => {
                // The copy on the target depended on this host's pages; it is killed there once the
                // link has been gone for the grace (at most MAX_GRACE). Resume after that, without
                // holding up the agent's start.
                std::thread::spawn(move || {
                    std::thread::sleep(crate::control::MAX_GRACE + ROLLBACK_MARGIN);
                    tracing::warn!(
                        ?pids,
                        "resuming an original whose post-copy an earlier run of this agent left unfinished"
                    );
                    let _ = criu::tree::resume(&pids);
                    let _ = std::fs::remove_dir_all(&dir);
                });
                continue;
            }
            "frozen" => {
                // A CRIU started by the crashed agent may still be dumping into this directory; it
                // leaves the tree stopped when it ends, so resume only after it is gone.
                wait_for_criu_in(&dir);
                // The journal names the tree as the pre-flight saw it until the dump is in; a child forked
                // since then was frozen too, and the dump's process tree names it.
                let mut pids = pids;
                for t in criu::images::read_pstree(&dir).unwrap_or_default() {
                    if !pids.contains(&t.pid) {
                        pids.push(t.pid);
                    }
                }
                tracing::warn!(?pids, "resuming an original left frozen by an earlier run of this agent");
                let _ = criu::tree::resume(&pids);
            }
            // Nothing was frozen yet (the journal is written before the freeze).
            "" if !dir.join("journal").exists() => {}
            other => {
                tracing::error!(
                    dir = %dir.display(),
                    stage = other,
                    "a migration's journal is unreadable: kept, and nothing resumed; check the processes it names"
                );
                continue;
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Waits (at most 5 minutes) until no process has `dir` on its command line. A lazy dump among them that
/// is ready but has no page-server session (the earlier run died between CRIU's ready byte and its
/// connection) would wait for ever with the tree frozen: its session is reset, so that CRIU resumes
/// the tree and ends ([`criu::release_orphaned_lazy_dump`]).
fn wait_for_criu_in(dir: &Path) {
    let needle = dir.as_os_str().as_encoded_bytes().to_vec();
    let holders = || -> Vec<Vec<u8>> {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .filter(|c| c.windows(needle.len()).any(|w| w == needle.as_slice()))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let busy = holders();
        if busy.is_empty() || Instant::now() >= deadline {
            break;
        }
        for cmdline in &busy {
            if criu::release_orphaned_lazy_dump(cmdline) {
                tracing::warn!(dir = %dir.display(), "reset the page-server session of an orphaned lazy dump of the earlier run: CRIU resumes the tree");
            }
        }
        tracing::info!(dir = %dir.display(), "waiting for a CRIU of the earlier run to finish");
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Migration<'_> {
    /// Whether a stopping agent may drop this migration from here on ([`stop_requested`]). Set before
    /// each await it concerns, never after: the flag must hold whenever the migration is suspended.
    fn cancellable(&self, yes: bool) {
        self.cancellable.send_replace(yes);
    }

    /// How long the target may take no data while the link is up before the migration fails as if the
    /// link were down: the grace.
    fn stall_limit(&self) -> Duration {
        Duration::from_secs(self.options.grace_s)
    }

    fn phase(&self, phase: Phase, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(id = %self.id, ?phase, "{message}");
        self.ctx.stats.migrations.set_phase(&self.id, &format!("{phase:?}").to_lowercase());
        let _ = self.events.send(Event::Phase { phase, message });
    }

    async fn steps(&mut self, pid: u32, target: &str, caller_uid: u32) -> Result<Summary, String> {
        let started = Instant::now();
        // The tree, and the pre-flight on it: nothing is frozen while anything would stop the migration.
        let facts = inspect_tree(pid)?;
        let rules = self.rules.parse()?;
        let report = crate::preflight::judge(&facts, caller_uid, &rules);
        if !report.blockers.is_empty() {
            return Err(format!("pre-flight: pid {pid} cannot migrate: {}", report.blocker_summary()));
        }
        self.external = report.external;
        let pids = facts.pids();
        let comm = facts.processes[0].comm.clone();
        self.claim = Some(Claim::take(&self.ctx.busy, &pids)?);
        self.pids = pids.clone();
        self.preflight_passed = true;
        self.ctx.stats.started.inc();

        self.phase(Phase::Connect, format!("connecting to {target}"));
        let session = connect_with(self.ctx, target, Duration::from_secs(self.options.grace_s)).await?;
        let result = self.with_connection(&session, pid, &comm, &pids, &facts.files(), target, started).await;
        session.close().await;
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn with_connection(
        &mut self,
        session: &Session,
        pid: u32,
        comm: &str,
        pids: &[u32],
        files: &[(String, u64)],
        target: &str,
        started: Instant,
    ) -> Result<Summary, String> {
        let conn = &session.conn;
        let remote = &session.remote;
        let send_msg = |m: source_msg::Msg| pb::SourceMsg { msg: Some(m) };

        // Prepare.
        self.phase(
            Phase::Prepare,
            format!("{} process(es) of {comm}; asking {} whether it can take them", pids.len(), remote.host_name),
        );
        let prepared = prepare(session, &self.id, pids, comm, files, &self.external, false).await?;
        if !prepared.blockers.is_empty() {
            return Err(format!("{} cannot take pid {pid}: {}", remote.host_name, findings_text(&prepared.blockers)));
        }
        // From here this migration is the streams' only user.
        let (mut send, mut recv) = (session.send.lock().await, session.recv.lock().await);
        let (send, recv) = (&mut *send, &mut *recv);
        let free = prepared.free_bytes;

        let mode = self.options.mode;
        // Before anything is frozen: a target without room for the image files. Stop-and-copy's images
        // hold at least the tree's private memory ([`private_bytes`]); the others' hold little, but never
        // nothing. The exact size is checked again after the dump.
        let least = match mode {
            Mode::Stopcopy => private_bytes(pids),
            _ => 1,
        };
        if free < least {
            return Err(no_room(&remote.host_name, free, least, "the images need at least"));
        }
        let postcopy = matches!(mode, Mode::Postcopy | Mode::Hybrid);
        // Post-copy: the fault link is opened now, so that it is there the moment the copy runs.
        let fault_link = if postcopy {
            let addr = std::net::SocketAddr::new(conn.remote_address().ip(), prepared.fault_port as u16);
            if prepared.fault_port == 0 || prepared.fault_port > u16::MAX as u32 {
                return Err(format!(
                    "{} offers no fault link (port {}), which post-copy needs: upgrade its target agent, or use --mode precopy",
                    remote.host_name, prepared.fault_port
                ));
            }
            Some(
                crate::fault_link::open(
                    &self.ctx.fault_lane,
                    self.ctx.client.clone(),
                    addr,
                    &session.server_name,
                    &self.id,
                )
                .await?,
            )
        } else {
            None
        };
        let mut pre = match mode {
            Mode::Stopcopy => None,
            Mode::Postcopy => Some(self.precopy(conn, pid, pids, 0).await?),
            // The same rounds: hybrid differs at the freeze, where it leaves what changed to post-copy.
            // Capped at 3 rounds it froze earlier and left more to post-copy's faults: 2 GiB hybrids
            // completed in 1004-1457 ms (median 1112) against 986-1134 ms (median 1065) under the policy
            // alone, 4-5 rounds (9 alternated pairs, 10 %/s).
            Mode::Hybrid | Mode::Precopy => Some(self.precopy(conn, pid, pids, self.options.max_rounds).await?),
        };

        // Freeze and dump.
        std::fs::create_dir_all(&self.work_dir)
            .map_err(|e| format!("cannot create {}: {e}", self.work_dir.display()))?;
        // This host's own room for the dump, as for the target's above.
        let here = criu::images::free_bytes(&self.work_dir);
        if here < least {
            return Err(format!(
                "this host has {here} bytes free in {} for the dump, which needs at least {least} bytes: free \
                 space there, or restart the source-agent with --state-dir on a larger file system",
                self.work_dir.display()
            ));
        }
        self.phase(Phase::Dump, format!("freezing and dumping pid {pid}"));
        let criu_started = Instant::now();
        let watch = criu::tree::StopWatch::start(pid);
        self.cancellable(false);
        self.stage = Stage::Frozen;
        write_journal(&self.work_dir, "frozen", pids);
        let req =
            criu::DumpRequest { pid, images_dir: self.work_dir.clone(), externals: self.external.dump_externals() };
        let dumped = match pre {
            // The private memory stays in the stopped tree (PE_LAZY in the pagemaps); CRIU's own page
            // server is not needed: this agent reads the stopped tree directly. The images are complete
            // once the dump is ready; CRIU's session end and exit (it then leaves the tree stopped) run
            // while the images travel, and are waited for before Commit (or a rollback).
            Some(_) => self.ctx.criu.dump_lazy(&req, criu::LazyMemory::InPlace).await.map(|lazy| {
                self.criu_finishing = Some(tokio::spawn(lazy.finish()));
            }),
            None => self.ctx.criu.dump(&req).await.map(|_| ()),
        };
        let dumped_at = Instant::now();
        // The tree is stopped (stop-and-copy) or held by a lazy dump whose drop leaves it stopped.
        self.cancellable(true);
        // The downtime counts from the freeze, not from CRIU's start (its kernel probe and tree walk run
        // while the tree still does); when the freeze was not seen, from CRIU's start.
        let frozen_at = watch.stopped_at().unwrap_or_else(|| {
            if dumped.is_ok() {
                tracing::debug!(pid, "the freeze was not seen; downtime counts from CRIU's start");
            }
            criu_started
        });
        let dump_ms = ms(dumped_at - frozen_at);
        if let Err(e) = dumped {
            let _ =
                write_frame(send, &send_msg(source_msg::Msg::Abort(pb::Abort { reason: "dump failed".into() }))).await;
            return Err(e.to_string());
        }
        // From here on, the tree as CRIU froze it: a child forked since the pre-flight is in it (and one
        // that exited is not). The fault link, a rollback's resume and the final kill must cover exactly
        // these: a `sleep` a shell forked meanwhile would otherwise stay stopped, or its faults unanswered.
        let frozen: Vec<u32> = match criu::images::read_pstree(&self.work_dir) {
            Ok(tree) => tree.into_iter().map(|t| t.pid).collect(),
            Err(e) => {
                let abort = pb::Abort { reason: "the dump's process tree is unreadable".into() };
                let _ = write_frame(send, &send_msg(source_msg::Msg::Abort(abort))).await;
                return Err(format!("after the dump: {e}"));
            }
        };
        let forked: Vec<u32> = frozen.iter().copied().filter(|p| !pids.contains(p)).collect();
        let gone: Vec<u32> = pids.iter().copied().filter(|p| !frozen.contains(p)).collect();
        if !forked.is_empty() || !gone.is_empty() {
            tracing::info!(id = %self.id, ?forked, ?gone, "the tree changed between the pre-flight and the freeze");
        }
        self.pids = frozen.clone();
        if let Some(c) = self.claim.as_mut() {
            c.extend(&frozen);
        }
        write_journal(&self.work_dir, "frozen", &frozen);
        let pids: &[u32] = &frozen;

        // Transfer: the image files and, with pre-copy, what changed in memory since the last round
        // (post-copy sends that after the restore, see post_copy).
        let files = image_files(&self.work_dir)?;
        let total: u64 = files.iter().map(|(_, s)| s).sum();
        let page_bytes: u64 = files.iter().filter(|(n, _)| n.starts_with("pages-")).map(|(_, s)| s).sum();
        if pre.is_some() && page_bytes > precopy::NOT_LAZY_BYTES {
            // The migration still works (the target restores those pages from the files), but they cross
            // during the freeze. CRIU's log is kept beside the work dir (which goes at the end), for why.
            let kept = self.work_dir.with_extension("dump.log");
            let kept = match std::fs::copy(self.work_dir.join("dump.log"), &kept) {
                Ok(_) => format!("CRIU's log of that dump: {}", kept.display()),
                Err(e) => format!("CRIU's log of that dump could not be kept: {e}"),
            };
            // Locked (`lo`) and hugetlb (`ht`) memory is never lazy; with an unpatched CRIU any memory may
            // not be (Criu::stack_bug), which the VmFlags cannot show.
            let stack_bug =
                self.ctx.criu.stack_bug().map(|b| format!("; if those mappings are neither locked nor hugetlb: {b}"));
            tracing::warn!(
                id = %self.id,
                "CRIU's lazy dump wrote {} MiB of memory into the image files instead of leaving it in the \
                 frozen tree, so it crosses during the freeze: {}{}; {kept}",
                page_bytes >> 20,
                precopy::written_ranges(&self.work_dir),
                stack_bug.unwrap_or_default()
            );
        }
        if total > free {
            let reason = no_room(&remote.host_name, free, total, "the images need");
            let _ = write_frame(send, &send_msg(source_msg::Msg::Abort(pb::Abort { reason: reason.clone() }))).await;
            return Err(reason);
        }
        let lazy_regions = match pre {
            Some(_) => precopy::lazy_regions(&self.work_dir)?,
            None => Vec::new(),
        };
        self.phase(Phase::Transfer, format!("sending {} image files, {total} bytes", files.len()));
        let transfer_started = Instant::now();
        let stall_limit = self.stall_limit();
        let delta = async {
            let Some(p) = pre.as_mut().filter(|_| !postcopy) else { return Ok(precopy::RoundStats::default()) };
            let only = p.changed_at_freeze(&lazy_regions);
            let pass = precopy::Pass { round: p.rounds, frozen: true, only, ..Default::default() };
            let mut stream = Watched::new(&mut p.stream, stall_limit);
            let mut s = precopy::send_round(&mut p.held, &mut stream, lazy_regions.clone(), pass, &p.level).await?;
            s.wire += precopy::send_end(&mut stream, p.held.records).await?;
            p.stream.finish().map_err(|e| format!("pages stream: {e}"))?;
            Ok::<_, String>(s)
        };
        let sent = match tokio::try_join!(self.send_files(conn, &files, total), delta) {
            Ok(s) => s,
            Err(e) => {
                // The target may have said why it stopped a stream (disk full, bad file): prefer its words.
                let reason = match tokio::time::timeout(Duration::from_secs(2), recv_msg(recv, target, &self.copy_gone))
                    .await
                {
                    Ok(Ok(target_msg::Msg::Failed(f))) => {
                        format!("target {} refused the images: {}", remote.host_name, protocol::peer_text(&f.reason))
                    }
                    _ => match conn.close_reason() {
                        Some(quinn::ConnectionError::TimedOut) => format!(
                            "link to {target} lost while sending the images: the connection timed out (no answer from the target); {e}"
                        ),
                        // The target ended the connection on purpose (a bad file, a full disk): its reason.
                        Some(quinn::ConnectionError::ApplicationClosed(c)) => format!(
                            "target {} refused the images: {}",
                            remote.host_name,
                            protocol::peer_text(&String::from_utf8_lossy(&c.reason))
                        ),
                        Some(why) => format!("link to {target} lost while sending the images: {why}; {e}"),
                        None => format!("sending the images to {target} failed: {e}"),
                    },
                };
                let _ =
                    write_frame(send, &send_msg(source_msg::Msg::Abort(pb::Abort { reason: reason.clone() }))).await;
                return Err(reason);
            }
        };
        let (sent, delta) = sent;
        let transfer_ms = ms(transfer_started.elapsed());
        let wire: u64 = sent.iter().map(|(_, t)| t.wire).sum::<u64>() + delta.wire;
        let summaries: Vec<pb::FileSummary> = sent.into_iter().map(|(s, _)| s).collect();
        let nfiles = summaries.len();
        let page_records = match &pre {
            Some(p) if !postcopy => p.held.records,
            _ => 0,
        };
        if pre.is_some() && !postcopy {
            tracing::info!(id = %self.id, pages = delta.sent, data = delta.data, scanned = delta.scanned, read_ms = delta.read_secs * 1e3, "final delta sent");
        }
        let done = pb::ImagesDone { files: summaries, lazy: pre.is_some(), page_records, postcopy };
        write_frame(send, &send_msg(source_msg::Msg::ImagesDone(done))).await.map_err(link(target))?;

        // Post-copy: the rest of the memory streams from the stopped tree once the copy was restored
        // (from Commit on), and pages the copy faults on are answered first.
        let mut stream_start = None;
        let mut postcopy_failed = None;
        // Post-copy: fired once the whole pages stream is acknowledged and that is recorded (Detach).
        let mut delivery: Option<tokio::sync::oneshot::Receiver<()>> = None;
        // The fault link's server, stopped when this returns, and the bytes it answered.
        let mut fault_server: Option<(AbortOnDrop, Arc<AtomicU64>)> = None;
        let background = match pre.take() {
            Some(p) if postcopy => {
                let (hint_tx, hints) = std::sync::mpsc::channel();
                let answered = Arc::new(AtomicU64::new(0));
                let lazy = crate::fault_link::Lazy { pids: pids.to_vec(), regions: lazy_regions.clone() };
                let link = fault_link.expect("opened for post-copy");
                let faults = crate::fault_link::serve(&self.ctx.fault_lane, link, lazy, hint_tx, answered.clone());
                fault_server = Some((AbortOnDrop(faults.abort_handle()), answered));
                let (start, go) = tokio::sync::oneshot::channel();
                stream_start = Some(start);
                let (detach, detached) = tokio::sync::oneshot::channel();
                delivery = Some(detached);
                let task = PostCopy {
                    go,
                    detach,
                    pids: pids.to_vec(),
                    regions: lazy_regions,
                    delivered: self.delivered.clone(),
                    work_dir: self.work_dir.clone(),
                    faults,
                    hints,
                };
                let (fail_tx, fail_rx) = tokio::sync::oneshot::channel();
                postcopy_failed = Some(fail_rx);
                Some(tokio::spawn(async move {
                    let r = task.run(p).await;
                    if let Err(e) = &r {
                        let _ = fail_tx.send(e.clone());
                    }
                    r
                }))
            }
            other => {
                pre = other;
                None
            }
        };
        let _abort_background = background.as_ref().map(|b| AbortOnDrop(b.abort_handle()));

        // Restore on the target.
        self.phase(Phase::Restore, format!("{} is restoring", remote.host_name));
        let restoring =
            recv_within(recv, target, &self.copy_gone, restore_deadline(total), &remote.host_name, "finish restoring");
        let restored = match unless_failed(restoring, &mut postcopy_failed).await? {
            target_msg::Msg::Restored(r) => r,
            other => return Err(unexpected(target, &other, "Restored")),
        };

        // CRIU must be gone (the original stopped, not frozen by it) before the copy may run.
        if let Err(e) = self.criu_finished().await {
            let abort = pb::Abort { reason: "the dump failed".into() };
            let _ = write_frame(send, &send_msg(source_msg::Msg::Abort(abort))).await;
            return Err(e);
        }

        // Commit: from here on the target may run the copy.
        self.phase(Phase::Commit, format!("restored as pid {} on {}; committing", restored.root_pid, remote.host_name));
        let lazy = pre.is_some() || background.is_some();
        self.cancellable(false);
        if lazy {
            // The copy depends on the target agent until its memory is filled in (and, in post-copy, on
            // this host's pages): the original stays stopped until the target says Complete.
            if !postcopy {
                self.delivered.store(true, Ordering::SeqCst);
            }
            write_journal(&self.work_dir, if postcopy { "postcopy" } else { "delivered" }, pids);
            self.stage = Stage::PostCopy;
        } else {
            write_journal(&self.work_dir, "commit-sent", pids);
            self.stage = Stage::CommitSent;
        }
        write_frame(send, &send_msg(source_msg::Msg::Commit(pb::Commit {}))).await.map_err(link(target))?;
        if let Some(start) = stream_start.take() {
            let _ = start.send(());
        }
        let resuming =
            recv_within(recv, target, &self.copy_gone, COMMIT_TIMEOUT, &remote.host_name, "confirm the commit");
        let resumed = match unless_failed(resuming, &mut postcopy_failed).await? {
            target_msg::Msg::Resumed(r) => r,
            other => return Err(unexpected(target, &other, "Resumed")),
        };
        let downtime_ms = ms(frozen_at.elapsed());
        if !lazy {
            // Stop-and-copy: the copy has everything it needs.
            self.kill_original(pids, &remote.host_name).await;
        }

        // With lazy memory the target now fills it in (post-copy: as it streams from here, faults
        // answered first) and says when every page is in place; only then is the original killed.
        let mut complete = None;
        if lazy {
            let what = if postcopy {
                "its memory streams from here, faults answered first"
            } else {
                "its memory is being filled in"
            };
            self.phase(Phase::Complete, format!("pid {pid}: post-copy: the copy runs on {}; {what}", remote.host_name));
            let copy_gone = self.copy_gone.clone();
            let completing =
                recv_within(recv, target, &copy_gone, COMPLETE_TIMEOUT, &remote.host_name, "finish the post-copy");
            let completing = unless_failed(completing, &mut postcopy_failed);
            tokio::pin!(completing);
            let answer = loop {
                tokio::select! {
                    a = &mut completing => break a,
                    d = async { delivery.as_mut().expect("polled only while set").await }, if delivery.is_some() => {
                        delivery = None;
                        if d.is_ok() {
                            // A failed send leaves the target to kill its copy: the original stays
                            // stopped, in doubt, as for any failure from here on.
                            let detach = send_msg(source_msg::Msg::Detach(pb::Detach {}));
                            if let Err(e) = write_frame(send, &detach).await {
                                tracing::warn!(id = %self.id, "Detach not sent: {e}");
                            }
                        }
                    }
                }
            };
            let c = match answer {
                // Every page is in place on the target now: that is when the migration is complete (the
                // commit's kill of the original, which frees its memory, comes after).
                Ok(target_msg::Msg::Complete(c)) => (ms(frozen_at.elapsed()), c),
                Ok(other) => return Err(unexpected(target, &other, "Complete")),
                Err(e) => {
                    let why = match background {
                        Some(task) if task.is_finished() => task.await.ok().and_then(|r| r.err()),
                        _ => None,
                    };
                    return Err(match why {
                        Some(w) => format!("post-copy to {target} failed: {e}; {w}"),
                        None => format!("post-copy to {target} failed: {e}"),
                    });
                }
            };
            let (wire_after, held_after) = match background {
                Some(task) => match task.await {
                    Ok(Ok(w)) => w,
                    Ok(Err(e)) => {
                        tracing::warn!(id = %self.id, "the target completed but the page sender says: {e}");
                        (0, 0)
                    }
                    Err(e) => {
                        tracing::warn!(id = %self.id, "page sender task: {e}");
                        (0, 0)
                    }
                },
                None => (0, pre.as_ref().map(|p| p.held.len() as u64).unwrap_or(0)),
            };
            let answered = fault_server.as_ref().map_or(0, |(_, a)| a.load(Ordering::Relaxed));
            self.kill_original(pids, &remote.host_name).await;
            complete = Some((c.0, c.1, wire_after + answered, held_after));
        }
        let _ = send.finish();
        let held_pages = complete.as_ref().map(|c| c.3).unwrap_or(0);
        Ok(Summary {
            migration_id: self.id.clone(),
            pid,
            comm: comm.into(),
            processes: pids.len(),
            target: target.into(),
            target_host: remote.host_name.clone(),
            target_pid: resumed.root_pid,
            downtime_ms,
            dump_ms,
            transfer_ms,
            restore_ms: restored.restore_micros as f64 / 1000.0,
            total_ms: ms(started.elapsed()),
            // With lazy memory the private pages are not in the image files: count what the target got.
            image_bytes: total + held_pages * protocol::pages::PAGE_SIZE as u64,
            image_page_bytes: page_bytes,
            wire_bytes: wire + self.precopy_wire + complete.as_ref().map(|c| c.2).unwrap_or(0),
            compression_ratio: 0.0,
            files: nfiles,
            mode,
            rounds: self.rounds,
            precopy_ms: self.precopy_ms,
            freeze_pages: delta.sent,
            dirty_tracking: self.dirty_tracking.into(),
            complete_ms: complete.as_ref().map(|c| c.0),
            faults: complete.as_ref().map(|c| c.1.faults).unwrap_or(0),
            fault_p50_us: complete.as_ref().filter(|c| c.1.faults > 0).map(|c| c.1.fault_p50_us),
            fault_p99_us: complete.as_ref().filter(|c| c.1.faults > 0).map(|c| c.1.fault_p99_us),
        }
        .with_ratio())
    }

    /// Waits for a lazy dump's CRIU to end its session and exit, leaving the tree stopped.
    async fn criu_finished(&mut self) -> Result<(), String> {
        match self.criu_finishing.take() {
            None => Ok(()),
            Some(h) => match h.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(format!("criu dump: {e}")),
            },
        }
    }

    async fn kill_original(&self, pids: &[u32], host: &str) {
        // Waits until they have exited: the summary's "original killed" is then true when it is read.
        let owned = pids.to_vec();
        let r = tokio::task::spawn_blocking(move || criu::tree::kill_all(&owned, ORIGINAL_EXIT))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(format!("kill task: {e}"))));
        if let Err(e) = r {
            tracing::error!(?pids, "the copy runs on {host} but killing the original failed: {e}");
        }
    }

    /// Pre-copy rounds while the tree runs, at most `max_rounds`, until the policy says freeze (see
    /// [`precopy::decide`]). Opens the pages stream either way.
    async fn precopy(
        &mut self,
        conn: &quinn::Connection,
        pid: u32,
        pids: &[u32],
        max_rounds: u32,
    ) -> Result<PreCopied, String> {
        let started = Instant::now();
        let mut stream = conn.open_uni().await.map_err(|e| format!("link: {e}"))?;
        // Bulk pages yield to everything else on the connection, fault answers first.
        let _ = stream.set_priority(PRIORITY_BULK);
        let header = pb::StreamHeader {
            kind: Some(pb::stream_header::Kind::Pages(pb::PagesHeader { migration_id: self.id.clone() })),
        };
        write_frame(&mut stream, &header).await.map_err(|e| format!("pages stream: {e}"))?;
        let policy = precopy::Policy { max_downtime: Duration::from_millis(self.options.max_downtime_ms), max_rounds };
        let level = protocol::chunk::AdaptiveLevel::new(protocol::chunk::DEFAULT_LEVEL);
        let mut held = precopy::Held::default();
        let mut rounds: Vec<precopy::RoundStats> = Vec::new();
        // How the rounds after the first learn what changed (see crate::dirty): write-protect tracking
        // where it can be set up, soft-dirty where the kernel has that, else every page is compared.
        // Either is armed before round 0 reads anything.
        let mut tracking = Tracking::Compare;
        if max_rounds > 0 {
            let regions = precopy::tree_regions(pid);
            let mut trackers = dirty::Trackers::default();
            if !self.options.no_write_protect {
                trackers.changed(&regions);
            }
            tracking = if trackers.tracked() > 0 {
                Tracking::WriteProtect(trackers)
            } else if self.ctx.hello.soft_dirty {
                dirty::soft_dirty_pages(&regions);
                Tracking::SoftDirty
            } else {
                Tracking::Compare
            };
            self.dirty_tracking = tracking.name();
            self.phase(
                Phase::Precopy,
                format!(
                    "copying the memory of {} process(es) while they run ({})",
                    pids.len(),
                    match &tracking {
                        Tracking::WriteProtect(t) => format!("write-protect dirty tracking of {} of them", t.tracked()),
                        Tracking::SoftDirty => "soft-dirty dirty tracking".into(),
                        Tracking::Compare => "every page compared".into(),
                    }
                ),
            );
        }
        while (rounds.len() as u32) < max_rounds {
            let round = rounds.len() as u32;
            let regions = precopy::tree_regions(pid);
            let only = match &mut tracking {
                _ if round == 0 => None,
                Tracking::WriteProtect(t) => Some(t.changed(&regions)),
                Tracking::SoftDirty => Some(dirty::soft_dirty_pages(&regions)),
                Tracking::Compare => None,
            };
            let pass = precopy::Pass { round, only, ..Default::default() };
            let mut watched = Watched::new(&mut stream, self.stall_limit());
            let stats = precopy::send_round(&mut held, &mut watched, regions, pass, &level).await?;
            rounds.push(stats);
            let d = precopy::decide(&policy, &rounds);
            tracing::info!(id = %self.id, ?stats, ?d, "pre-copy round");
            let _ = self.events.send(Event::Round {
                round,
                pages_sent: stats.sent,
                wire_bytes: stats.wire,
                dirty_pages_per_s: d.dirty_rate,
                est_downtime_ms: d.est_downtime.as_secs_f64() * 1e3,
                freeze: d.freeze.map(str::to_string),
            });
            if d.freeze.is_some() {
                break;
            }
        }
        self.rounds = rounds.len() as u32;
        self.precopy_ms = ms(started.elapsed());
        self.precopy_wire = rounds.iter().map(|r| r.wire).sum();
        Ok(PreCopied { stream, held, level, rounds: self.rounds, tracking })
    }

    async fn send_files(
        &self,
        conn: &quinn::Connection,
        files: &[(String, u64)],
        total: u64,
    ) -> Result<Vec<(pb::FileSummary, file_stream::Transferred)>, String> {
        let raw = Arc::new(AtomicU64::new(0));
        let wire = Arc::new(AtomicU64::new(0));
        let ticker = {
            let (raw, wire, events) = (raw.clone(), wire.clone(), self.events.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tick.tick().await;
                    let done = raw.load(Ordering::Relaxed);
                    if events.send(Event::Transfer { done, total, wire: wire.load(Ordering::Relaxed) }).is_err() {
                        break;
                    }
                }
            })
        };
        let results: Vec<Result<_, String>> = futures::stream::iter(files.iter().cloned())
            .map(|(name, _)| {
                let (raw, wire) = (raw.clone(), wire.clone());
                let path = self.work_dir.join(&name);
                let id = self.id.clone();
                let limit = self.stall_limit();
                async move {
                    let mut s = conn.open_uni().await.map_err(|e| format!("link: {e}"))?;
                    let mut last = file_stream::Transferred::default();
                    let mut watched = Watched::new(&mut s, limit);
                    let r =
                        file_stream::send_file(&mut watched, &id, &name, &path, protocol::chunk::DEFAULT_LEVEL, |t| {
                            raw.fetch_add(t.raw - last.raw, Ordering::Relaxed);
                            wire.fetch_add(t.wire - last.wire, Ordering::Relaxed);
                            last = t;
                        })
                        .await
                        .map_err(|e| format!("sending {name}: {e}"))?;
                    s.finish().map_err(|e| format!("sending {name}: {e}"))?;
                    // Not waiting for the target to acknowledge the stream: that costs up to QUIC's ack
                    // delay (25 ms) per file, in the downtime. The target checks every file against
                    // ImagesDone (name, size, xxh3) before it restores, and closes the connection with
                    // its reason when one is bad, which the wait for Restored reports.
                    Ok(r)
                }
            })
            .buffer_unordered(PARALLEL_FILES)
            .collect()
            .await;
        ticker.abort();
        let _ = self.events.send(Event::Transfer {
            done: raw.load(Ordering::Relaxed),
            total,
            wire: wire.load(Ordering::Relaxed),
        });
        results.into_iter().collect()
    }
}

/// The tree's facts, or why they cannot be read.
fn inspect_tree(pid: u32) -> Result<crate::inspect::Tree, String> {
    let facts = crate::inspect::tree(pid).map_err(|_| {
        format!("no process with pid {pid} on this host (as seen by the source agent); check the pid with ps")
    })?;
    if facts.processes.is_empty() {
        return Err(format!("no process with pid {pid} on this host"));
    }
    Ok(facts)
}

/// An open connection to a target agent after the Hello exchange.
pub struct Session {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    /// The name the target's certificate was verified for.
    server_name: String,
    send: tokio::sync::Mutex<quinn::SendStream>,
    recv: tokio::sync::Mutex<quinn::RecvStream>,
    remote: pb::Hello,
}

impl Session {
    async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        self.endpoint.wait_idle().await;
    }
}

/// Connects to `target`, with mutual TLS, and exchanges Hello; refuses an incompatible target. A link
/// silent for `grace` ends the connection (see protocol::tls::transport).
async fn connect(ctx: &Context, target: &str) -> Result<Session, String> {
    connect_with(ctx, target, crate::control::DEFAULT_GRACE).await
}

async fn connect_with(ctx: &Context, target: &str, grace: Duration) -> Result<Session, String> {
    let (addr, server_name) = resolve(target).await?;
    let mut endpoint = protocol::endpoint::client(addr).map_err(|e| format!("cannot open a UDP socket: {e}"))?;
    let mut client = ctx.client.clone();
    client.transport_config(protocol::tls::transport(grace));
    endpoint.set_default_client_config(client);
    let connecting = endpoint.connect(addr, &server_name).map_err(|e| format!("cannot connect to {target}: {e}"))?;
    // Silence until our timeout, or until QUIC's own idle timeout (the grace, which may be the shorter
    // or fire first at equal length): either way the target did not answer.
    let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Err(_) | Ok(Err(quinn::ConnectionError::TimedOut)) => {
            return Err(format!(
                "target {target} ({addr}) did not answer within {}s: is target-agent running there, and is UDP port {} reachable?",
                CONNECT_TIMEOUT.min(grace).as_secs(),
                addr.port()
            ));
        }
        Ok(Err(e)) => return Err(connect_error(target, &e.to_string())),
        Ok(Ok(c)) => c,
    };
    // A target that rejects our certificate does so after the handshake looked complete from here:
    // errors up to the target's Hello are TLS errors as well.
    let hello = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        write_frame(&mut send, &pb::SourceMsg { msg: Some(source_msg::Msg::Hello(ctx.hello.clone())) })
            .await
            .map_err(|e| e.to_string())?;
        let remote = match read_frame::<_, pb::TargetMsg>(&mut recv).await {
            Ok(Some(pb::TargetMsg { msg: Some(target_msg::Msg::Hello(mut h)) })) => {
                h.host_name = protocol::peer_text(&h.host_name);
                h
            }
            Ok(other) => return Err(format!("expected Hello, got {other:?}")),
            Err(e) => return Err(e.to_string()),
        };
        Ok((send, recv, remote))
    }
    .await;
    let (send, recv, remote) = match hello {
        Ok(h) => h,
        Err(e) => {
            let why = conn.close_reason().map(|r| r.to_string()).unwrap_or(e);
            return Err(connect_error(target, &why));
        }
    };
    protocol::hello::check_compatible(&ctx.hello, &remote).map_err(|e| format!("cannot migrate to {target}: {e}"))?;
    Ok(Session {
        endpoint,
        conn,
        server_name,
        send: tokio::sync::Mutex::new(send),
        recv: tokio::sync::Mutex::new(recv),
        remote,
    })
}

/// Sends Prepare and returns the target's answer.
async fn prepare(
    s: &Session,
    id: &str,
    pids: &[u32],
    comm: &str,
    files: &[(String, u64)],
    external: &crate::external::Plan,
    dry_run: bool,
) -> Result<pb::Prepared, String> {
    let target = s.remote.host_name.as_str();
    let msg = pb::Prepare {
        migration_id: id.into(),
        pids: pids.to_vec(),
        comm: comm.into(),
        files: files.iter().map(|(path, size)| pb::FileRef { path: path.clone(), size: *size }).collect(),
        dry_run,
        external_unix: external.unix.iter().map(external_unix_msg).collect(),
        external_tty: external
            .tty
            .iter()
            .map(|t| pb::ExternalTty {
                key: t.key.clone(),
                pid: t.pid,
                fd: t.fd,
                path: t.path.clone(),
                rule: t.rule.clone(),
            })
            .collect(),
        own_ptys: external.own_ptys.clone(),
    };
    write_frame(&mut *s.send.lock().await, &pb::SourceMsg { msg: Some(source_msg::Msg::Prepare(msg)) })
        .await
        .map_err(link(target))?;
    match recv_msg(&mut *s.recv.lock().await, target, &Default::default()).await? {
        target_msg::Msg::Prepared(p) => Ok(p),
        other => Err(unexpected(target, &other, "Prepared")),
    }
}

fn external_unix_msg(u: &crate::external::UnixPlan) -> pb::ExternalUnix {
    use crate::external::Action;
    use pb::external_unix::Action as A;
    pb::ExternalUnix {
        ino: u.ino,
        pid: u.pid,
        fd: u.fd,
        sock_type: u.sock_type as u32,
        name: u.name.clone(),
        peer_name: u.peer_name.clone(),
        peer_pid: u.peer_owner.as_ref().map(|o| o.0).unwrap_or(0),
        peer_comm: u.peer_owner.as_ref().map(|o| o.1.clone()).unwrap_or_default(),
        rule: u.rule.clone(),
        action: Some(match &u.action {
            Action::Connect { path } => A::Connect(path.clone()),
            Action::Broker { socket } => A::Broker(socket.clone()),
            Action::Hangup => A::Hangup(true),
        }),
    }
}

/// What a full dump of these processes writes at least: the private anonymous memory of the largest of
/// them (RssAnon). Not the sum, as a child shares its parent's pages until either writes them; not
/// shared memory (RssShmem), which includes files on tmpfs that CRIU does not copy.
fn private_bytes(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|&p| criu::tree::Status::read(p).ok()?.bytes("RssAnon:")).max().unwrap_or(0)
}

/// The error for a target whose state directory cannot take the image files.
fn no_room(host: &str, free: u64, need: u64, what: &str) -> String {
    format!(
        "{host} has {free} bytes free for image files in its target agent's state directory (beyond what it keeps \
         in reserve) and {what} {need} bytes: free space there, or restart that target-agent with --state-dir \
         on a larger file system"
    )
}

fn findings_text(f: &[pb::Finding]) -> String {
    f.iter().map(|f| format!("[{}] {} (fix: {})", f.code, f.detail, f.fix)).collect::<Vec<_>>().join("; ")
}

/// What a target states about itself (its Hello), for placing trees during a drain.
pub async fn probe(ctx: &Context, target: &str) -> Result<pb::Hello, String> {
    let s = connect(ctx, target).await?;
    let hello = s.remote.clone();
    s.close().await;
    Ok(hello)
}

/// `migrate check`: the pre-flight on this host and, when `target` is named, the target's answer to a
/// dry-run Prepare. Touches nothing.
pub async fn check(
    ctx: &Context,
    pid: u32,
    target: Option<&str>,
    rules: &crate::external::Rules,
    caller_uid: u32,
) -> Result<crate::preflight::Report, String> {
    rules.check_caller(caller_uid)?;
    let facts = inspect_tree(pid)?;
    let rules = rules.then(&ctx.rules).parse()?;
    let mut report = crate::preflight::judge(&facts, caller_uid, &rules);
    if let Some(target) = target {
        report.target = Some(target.into());
        let s = connect(ctx, target).await?;
        let comm = facts.processes[0].comm.clone();
        let answer = prepare(
            &s,
            &format!("check-{}", uuid::Uuid::new_v4().simple()),
            &facts.pids(),
            &comm,
            &facts.files(),
            &report.external,
            true,
        )
        .await;
        s.close().await;
        let answer = answer?;
        let conv =
            |f: pb::Finding| crate::preflight::Finding { code: f.code, pid: f.pid, detail: f.detail, fix: f.fix };
        report.blockers.extend(answer.blockers.into_iter().map(conv));
        report.warnings.extend(answer.warnings.into_iter().map(conv));
    }
    Ok(report)
}

/// How long a target may take to restore `image_bytes` of images before the migration gives up on it.
fn restore_deadline(image_bytes: u64) -> Duration {
    RESTORE_TIMEOUT + Duration::from_secs(image_bytes / RESTORE_FLOOR_RATE)
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The image files of a dump (everything but CRIU's log and statistics), with sizes, largest first so
/// the big pages file starts early.
fn image_files(dir: &Path) -> Result<Vec<(String, u64)>, String> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // CRIU's log and statistics are not images (restore reads neither), and a lazy dump's CRIU may
        // still be writing them while the images travel (its session ends in the background).
        if name == "dump.log" || name == "stats-dump" || name == "journal" {
            continue;
        }
        let meta = e.metadata().map_err(|err| format!("{name}: {err}"))?;
        if !meta.is_file() {
            return Err(format!("unexpected non-file {name} in the images dir {}", dir.display()));
        }
        protocol::names::check_image_name(&name).map_err(|err| err.to_string())?;
        out.push((name, meta.len()));
    }
    out.sort_by_key(|f| std::cmp::Reverse(f.1));
    Ok(out)
}

async fn resolve(target: &str) -> Result<(std::net::SocketAddr, String), String> {
    // host, host:port, [v6]:port, v6
    let (host, port) = if let Ok(sa) = target.parse::<std::net::SocketAddr>() {
        return Ok((sa, sa.ip().to_string()));
    } else if let Ok(ip) = target.parse::<std::net::IpAddr>() {
        return Ok(((ip, protocol::DEFAULT_PORT).into(), ip.to_string()));
    } else if let Some((h, p)) = target.rsplit_once(':') {
        (h.to_string(), p.parse::<u16>().map_err(|_| format!("bad port in {target:?}: expected host[:port]"))?)
    } else {
        (target.to_string(), protocol::DEFAULT_PORT)
    };
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host} has no address"))?;
    Ok((addr, host))
}

fn connect_error(target: &str, text: &str) -> String {
    let lower = text.to_lowercase();
    if ["certificate", "crypto", "tls", "alert", "unknownissuer"].iter().any(|w| lower.contains(w)) {
        format!(
            "TLS handshake with {target} failed: {text}. Both agents must hold certificates from the same fleet CA \
             (deploy/certs.sh), and the target's certificate must name {target}'s host"
        )
    } else {
        format!("cannot connect to {target}: {text}")
    }
}

fn link(target: &str) -> impl Fn(ProtocolError) -> String + '_ {
    move |e| link_failed(target, &e)
}

/// A broken link to `target`, or the target's own words when it closed the connection on purpose.
fn link_failed(target: &str, e: &ProtocolError) -> String {
    match e.peer_reason() {
        Some(reason) => format!("target {target} ended the migration: {reason}"),
        None => format!("link to {target} failed: {e}"),
    }
}

/// The target's next message; its Failed is an error, and `copy_gone` is set when it says its copy is
/// gone.
async fn recv_msg(
    recv: &mut quinn::RecvStream,
    target: &str,
    copy_gone: &std::sync::atomic::AtomicBool,
) -> Result<target_msg::Msg, String> {
    match read_frame::<_, pb::TargetMsg>(recv).await {
        Ok(Some(pb::TargetMsg { msg: Some(target_msg::Msg::Failed(f)) })) => {
            if f.copy_gone {
                copy_gone.store(true, Ordering::SeqCst);
            }
            Err(format!(
                "target {target} refused at {}: {}",
                protocol::peer_text(&f.stage),
                protocol::peer_text(&f.reason)
            ))
        }
        Ok(Some(pb::TargetMsg { msg: Some(m) })) => Ok(m),
        Ok(Some(pb::TargetMsg { msg: None })) => Err(format!("target {target} sent an empty message")),
        Ok(None) => Err(format!("target {target} closed the connection")),
        Err(e) => Err(link_failed(target, &e)),
    }
}

/// [`recv_msg`] with a time limit: "HOST did not WHAT within Ns" when it passes.
async fn recv_within(
    recv: &mut quinn::RecvStream,
    target: &str,
    copy_gone: &std::sync::atomic::AtomicBool,
    limit: Duration,
    host: &str,
    what: &str,
) -> Result<target_msg::Msg, String> {
    tokio::time::timeout(limit, recv_msg(recv, target, copy_gone))
        .await
        .map_err(|_| format!("{host} did not {what} within {}s", limit.as_secs()))?
}

/// `answer`, unless post-copy's background task fails first: then an error without waiting out
/// `answer`'s own limit (the target may be waiting for pages that will not come). The target's words
/// come first when they follow within [`THEIR_WORDS`] (a failed restore closes the fault link too, and
/// "criu restore failed: ..." says more than "connection lost"). `failed` is emptied once the task
/// ended well.
async fn unless_failed<T>(
    answer: impl std::future::Future<Output = Result<T, String>>,
    failed: &mut Option<tokio::sync::oneshot::Receiver<String>>,
) -> Result<T, String> {
    let Some(rx) = failed.as_mut() else { return answer.await };
    tokio::pin!(answer);
    tokio::select! {
        r = &mut answer => r,
        e = rx => match e {
            Ok(e) => match tokio::time::timeout(THEIR_WORDS, answer).await {
                Ok(Err(theirs)) => Err(theirs),
                _ => Err(format!("post-copy: {e}")),
            },
            Err(_) => {
                *failed = None;
                answer.await
            }
        },
    }
}

/// How long a failure of ours waits for the target's account of it.
const THEIR_WORDS: Duration = Duration::from_secs(2);

fn unexpected(target: &str, got: &target_msg::Msg, expected: &str) -> String {
    format!("target {target} sent {got:?} where {expected} was expected")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(b: u8, len: usize) -> Vec<bytes::Bytes> {
        vec![bytes::Bytes::from(vec![b; len])]
    }

    /// A gate as the post-copy pass gets it: opened by the sender, failed when the sender is dropped.
    fn gate() -> (tokio::sync::oneshot::Sender<()>, impl std::future::Future<Output = Result<(), String>> + Send) {
        let (go, gate) = tokio::sync::oneshot::channel::<()>();
        (go, async move { gate.await.map_err(|_| "the migration ended before the commit".to_string()) })
    }

    /// Until the gate opens, batches are held (up to the cap) and nothing reaches the stream; then the
    /// held ones go first, in order.
    #[tokio::test]
    async fn until_commit_holds_batches_until_the_gate_opens() {
        let mut out = Vec::new();
        let (go, gate) = gate();
        let mut sink = UntilCommit::new(&mut out, gate, 10);
        sink.put(batch(1, 4)).await.unwrap();
        sink.put(batch(2, 6)).await.unwrap();
        assert_eq!(sink.bytes, 10);
        // Over the cap: waits for the gate.
        let mut third = Box::pin(sink.put(batch(3, 1)));
        assert!(futures::poll!(third.as_mut()).is_pending(), "a batch over the cap must wait for the gate");
        go.send(()).unwrap();
        third.await.unwrap();
        sink.put(batch(4, 2)).await.unwrap();
        sink.open().await.unwrap();
        assert_eq!(out, [vec![1; 4], vec![2; 6], vec![3; 1], vec![4; 2]].concat());
    }

    /// A gate that fails (the migration ended before Commit) sends nothing and says why.
    #[tokio::test]
    async fn until_commit_sends_nothing_when_the_gate_fails() {
        let mut out = Vec::new();
        let (go, gate) = gate();
        let mut sink = UntilCommit::new(&mut out, gate, 10);
        sink.put(batch(1, 8)).await.unwrap();
        drop(go);
        let over = sink.put(batch(2, 8)).await.unwrap_err();
        assert!(over.to_string().contains("ended before the commit"), "{over}");
        drop(sink);
        assert!(out.is_empty());
    }

    /// A tree's processes are claimed until the claim is dropped; any overlap is refused, naming the
    /// pid; processes forked in later join the claim and leave with it.
    #[test]
    fn overlapping_trees_are_refused_while_claimed() {
        let busy = std::sync::Mutex::new(std::collections::HashSet::new());
        let mut first = Claim::take(&busy, &[10, 11]).unwrap();
        let e = Claim::take(&busy, &[12, 11]).err().expect("an overlapping tree was claimed twice");
        assert!(e.starts_with("pid 11 is already being migrated"), "{e}");
        let other = Claim::take(&busy, &[12]).unwrap();
        first.extend(&[11, 13]);
        assert!(Claim::take(&busy, &[13]).is_err(), "a process forked into a claimed tree is claimed");
        drop(first);
        assert_eq!(busy.lock().unwrap().iter().copied().collect::<Vec<_>>(), vec![12]);
        drop(other);
        assert!(Claim::take(&busy, &[10, 11, 12, 13]).is_ok());
    }
}
