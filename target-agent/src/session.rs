//! One migration as the target sees it, from the first Hello to commit or drop.
//!
//! ```text
//! source                          target
//! Hello            ───────────▶   check compatibility      ◀── Hello
//! Prepare{pids}    ───────────▶   pids free? work dir,     ◀── Prepared{free} | Failed
//!                                 watchdog started (crate::watchdog)
//! pages stream     ═══════════▶   page store (crate::pages), while the rounds run
//! (freeze + dump on the source)
//! file streams     ═══════════▶   incoming/<id>/NAME, sizes bounded, xxh3 checked
//! ImagesDone       ───────────▶   exactly these files? (pre-copy: the pages stream ended?)
//!                                 lazy-pages daemon listening (crate::lazy), watchdog told
//!                                 pstree.img's pids, criu restore [--lazy-pages] --leave-stopped,
//!                                 watchdog told what CRIU restored
//!                                                          ◀── Restored{pid} | Failed
//! Commit           ───────────▶   SIGCONT the copy         ◀── Resumed
//! pages stream     ═══════════▶   post-copy: the rest, while faults go out on
//! fault link       ◀══════════▶   the fault link (crate::fault_link, opened after Prepared)
//!                                 every page in place      ◀── Complete | Failed{post-copy}
//! ```
//! Rollback rule: the restored copy stays stopped until Commit. Abort, a dropped connection or no Commit
//! within `commit_timeout` → the copy is killed here, and the source resumes its original. With lazy
//! memory the copy runs from Commit on, and is killed here if filling it in fails, or (post-copy) if the
//! rest of its memory cannot arrive: the link silent for the grace, or the pages stream broken; the
//! Failed says so (with `copy_gone` once the copy has exited) and the source resumes its original. A
//! process of the stopped copy that died before Commit (the OOM killer) fails the resume the same way.
//! If this agent dies from the restore on (during `criu restore` too), its watchdog (crate::watchdog)
//! kills the copy. After Complete
//! (stop-and-copy: after Commit) the copy runs whatever happens; the source kills its original only then,
//! and otherwise leaves it stopped and says so (at most one copy ever runs).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use protocol::frame::{read_frame, write_frame};
use protocol::pb::{self, source_msg, target_msg};
use protocol::{ProtocolError, file_stream, names};
use tracing::Instrument;

use crate::Config;

/// Most image files one migration may send. A tree's dump has a few files per process.
pub const MAX_FILES: usize = 20_000;
/// How long the files may still be arriving after ImagesDone (the source sends it once every stream
/// was read to the end, so this only covers the last writes to disk here).
const FILES_SETTLE: Duration = Duration::from_secs(60);
/// Most pids or files one Prepare may ask about.
const MAX_CHECKED_FILES: usize = 100_000;
/// Free space kept back on the work dir's file system.
const DISK_RESERVE: u64 = 64 << 20;
/// What to do when the image files do not fit.
const DISK_FIX: &str =
    "free space there, restart this target-agent with --state-dir on a larger file system, or migrate to another host";
/// Memory kept back from the page store: the restored tree and this agent need some too.
const MEM_RESERVE: u64 = 512 << 20;
/// How long a post-copy migration's fault link may still be on its way at ImagesDone (the source waits
/// for it before it freezes the tree, so it is normally here already).
const FAULT_LINK_WAIT: Duration = Duration::from_secs(5);
/// How long a lazy restore may take to hand over every task and say it finished (RSTF) after `criu
/// restore` itself returned.
const LAZY_HANDOFF: Duration = Duration::from_secs(30);

/// What every session shares.
pub struct Context {
    pub criu: criu::Criu,
    pub cfg: Config,
    pub hello: pb::Hello,
    pub stats: Arc<crate::stats::Stats>,
    /// The fault endpoint, on its own lane: sources open their fault links there.
    pub faults: crate::fault_link::FaultLinks,
}

/// What a session learned, for the stats and for its Failed, and what it holds until its connection ends.
#[derive(Default)]
struct Record {
    /// Set once Prepare was accepted (not a dry run).
    id: Option<String>,
    pid: u32,
    /// A copy was restored (and killed unless committed).
    restored: bool,
    /// The restored copy was killed and has exited ([`StoppedCopy`]).
    copy_killed: Arc<std::sync::atomic::AtomicBool>,
    /// From Prepare on, until released. Waiting for it when it is dropped takes a moment; held here, that
    /// comes after the Failed was sent (the source tears its streams down when the fault link closes, and
    /// a pages stream ended early closes the connection, which would lose a Failed not yet sent).
    watchdog: Option<crate::watchdog::Watchdog>,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("peer sent {got} where {expected} was expected")]
    Unexpected { got: String, expected: &'static str },
    #[error("peer closed the control stream")]
    Closed,
    /// Told to the source as Failed{stage, reason}.
    #[error("{stage}: {reason}")]
    Refused { stage: &'static str, reason: String },
    #[error("source aborted: {0}")]
    Aborted(String),
    #[error("answered a check (or refused with blockers); nothing to receive")]
    Checked,
}

fn refuse(stage: &'static str, reason: impl Into<String>) -> SessionError {
    SessionError::Refused { stage, reason: reason.into() }
}

/// Handles one connection; logs the outcome.
pub async fn handle(ctx: Arc<Context>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    let span = tracing::info_span!("migration", %remote, id = tracing::field::Empty);
    async move {
        let mut work_dir = None;
        let mut rec = Record::default();
        let result = serve(&ctx, &conn, &mut work_dir, &mut rec).await;
        if let Some(dir) = work_dir {
            // Images are not kept: the source still holds its own until it commits.
            let _ = tokio::fs::remove_dir_all(&dir).await;
        }
        if let Some(id) = rec.id.take() {
            let stats = &ctx.stats;
            let outcome = match (&result, rec.restored) {
                (Ok(_), _) => {
                    stats.succeeded.inc();
                    "moved"
                }
                (Err(_), true) => {
                    stats.failed.inc();
                    stats.rolled_back.inc();
                    "rolled_back"
                }
                (Err(_), false) => {
                    stats.failed.inc();
                    "failed"
                }
            };
            stats.migrations.finish(
                &id.clone(),
                telemetry::Finished {
                    id,
                    pid: rec.pid,
                    target: remote.to_string(),
                    outcome: outcome.into(),
                    downtime_ms: None,
                    wire_bytes: 0,
                    error: result.as_ref().err().map(|e| e.to_string()),
                    finished_unix: telemetry::now_unix(),
                },
            );
        }
        match &result {
            Ok(pid) => tracing::info!(pid, "migration committed: the restored copy runs"),
            Err(SessionError::Checked) => tracing::info!("answered a check"),
            Err(e) => tracing::warn!("migration not completed here: {e}"),
        }
        match result {
            Ok(_) | Err(SessionError::Checked) => conn.close(0u32.into(), b"done"),
            // The peer learns why: a protocol violation closes the connection with the reason.
            Err(e) => conn.close(1u32.into(), truncate(&e.to_string(), 512).as_bytes()),
        }
    }
    .instrument(span)
    .await
}

async fn recv_msg(recv: &mut quinn::RecvStream) -> Result<source_msg::Msg, SessionError> {
    let m: pb::SourceMsg = read_frame(recv).await?.ok_or(SessionError::Closed)?;
    m.msg.ok_or(SessionError::Unexpected { got: "an empty message".into(), expected: "a message" })
}

fn unexpected(got: &source_msg::Msg, expected: &'static str) -> SessionError {
    let got = match got {
        source_msg::Msg::Abort(a) => return SessionError::Aborted(protocol::peer_text(&a.reason)),
        source_msg::Msg::Hello(_) => "Hello".into(),
        source_msg::Msg::Prepare(_) => "Prepare".into(),
        source_msg::Msg::ImagesDone(_) => "ImagesDone".into(),
        source_msg::Msg::Commit(_) => "Commit".into(),
        source_msg::Msg::Detach(_) => "Detach".into(),
    };
    SessionError::Unexpected { got, expected }
}

async fn send_msg(send: &mut quinn::SendStream, msg: target_msg::Msg) -> Result<(), SessionError> {
    write_frame(send, &pb::TargetMsg { msg: Some(msg) }).await?;
    Ok(())
}

async fn serve(
    ctx: &Context,
    conn: &quinn::Connection,
    work_dir: &mut Option<PathBuf>,
    rec: &mut Record,
) -> Result<u32, SessionError> {
    let (mut send, mut recv) = conn.accept_bi().await?;
    let result = serve_control(ctx, conn, &mut send, &mut recv, work_dir, rec).await;
    if let Err(SessionError::Refused { stage, reason }) = &result {
        // Best effort: the source learns why; the connection may already be gone.
        let copy_gone = !rec.restored || rec.copy_killed.load(std::sync::atomic::Ordering::SeqCst);
        let failed = pb::Failed { stage: (*stage).into(), reason: reason.clone(), copy_gone };
        let _ = send_msg(&mut send, target_msg::Msg::Failed(failed)).await;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    }
    result
}

async fn serve_control(
    ctx: &Context,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    work_dir: &mut Option<PathBuf>,
    rec: &mut Record,
) -> Result<u32, SessionError> {
    // Hello
    let hello = match recv_msg(recv).await? {
        source_msg::Msg::Hello(mut h) => {
            h.host_name = protocol::peer_text(&h.host_name);
            h
        }
        other => return Err(unexpected(&other, "Hello")),
    };
    send_msg(send, target_msg::Msg::Hello(ctx.hello.clone())).await?;
    protocol::hello::check_compatible(&hello, &ctx.hello).map_err(|r| refuse("hello", r))?;

    // Prepare
    let prepare = match recv_msg(recv).await? {
        source_msg::Msg::Prepare(p) => p,
        other => return Err(unexpected(&other, "Prepare")),
    };
    names::check_image_name(&prepare.migration_id).map_err(|e| refuse("prepare", format!("migration id: {e}")))?;
    tracing::Span::current().record("id", prepare.migration_id.as_str());
    tracing::info!(from = %hello.host_name, pids = ?prepare.pids, comm = %protocol::peer_text(&prepare.comm), "prepare");
    if prepare.files.len() > MAX_CHECKED_FILES || prepare.pids.len() > MAX_CHECKED_FILES {
        return Err(refuse("prepare", format!("more than {MAX_CHECKED_FILES} pids or files to check")));
    }
    let mut blockers = target_blockers(&prepare, &ctx.hello.host_name);
    blockers.extend(crate::external::check(&prepare, &ctx.hello.host_name));
    let state = ctx.cfg.state_dir.join("incoming");
    let free = criu::images::free_bytes(&state).saturating_sub(DISK_RESERVE);
    if prepare.dry_run || !blockers.is_empty() {
        tracing::info!(blockers = blockers.len(), dry_run = prepare.dry_run, "answered a check");
        let prepared = pb::Prepared { free_bytes: free, blockers, warnings: vec![], fault_port: 0 };
        send_msg(send, target_msg::Msg::Prepared(prepared)).await?;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        return Err(SessionError::Checked);
    }
    let dir = state.join(&prepare.migration_id);
    std::fs::create_dir(&dir)
        .map_err(|e| refuse("prepare", format!("cannot create work dir {}: {e}", dir.display())))?;
    *work_dir = Some(dir.clone());
    ctx.stats.started.inc();
    rec.id = Some(prepare.migration_id.clone());
    rec.pid = prepare.pids.first().copied().unwrap_or(0);
    ctx.stats.migrations.start(telemetry::Running {
        id: prepare.migration_id.clone(),
        pid: rec.pid,
        target: conn.remote_address().to_string(),
        phase: "receive".into(),
        started_unix: telemetry::now_unix(),
    });
    let set_phase = |phase: &str| ctx.stats.migrations.set_phase(&prepare.migration_id, phase);
    // Should this agent die from the restore on, before the copy may live on its own (stop-and-copy:
    // before it runs; lazy memory: before every page is in place), the copy dies with it, and so does what
    // a `criu restore` running then makes: the source resumes its original. Started here, off the freeze.
    rec.watchdog = Some(
        crate::watchdog::Watchdog::arm(Path::new("/proc/self/exe"))
            .map_err(|e| refuse("prepare", format!("cannot start the watchdog: {e}")))?,
    );
    // A lazy migration opens its fault link before it freezes the tree.
    let mut fault_link = ctx.faults.expect(&prepare.migration_id, conn);
    let prepared =
        pb::Prepared { free_bytes: free, blockers: vec![], warnings: vec![], fault_port: ctx.faults.port().into() };
    send_msg(send, target_msg::Msg::Prepared(prepared)).await?;

    // Files (and the pages stream) arrive on their own streams while the control stream waits for
    // ImagesDone.
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let (pages_tx, pages_rx) = tokio::sync::oneshot::channel();
    let store = Arc::new(crate::pages::PageStore::new(protocol::host::mem_available().saturating_sub(MEM_RESERVE)));
    let receiver = tokio::spawn(receive_files(
        Incoming {
            conn: conn.clone(),
            dir: dir.clone(),
            id: prepare.migration_id.clone(),
            store: store.clone(),
            stats: ctx.stats.clone(),
        },
        free,
        tx,
        pages_tx,
    ));
    let _abort_receiver = AbortOnDrop(receiver);
    let done = match recv_msg(recv).await? {
        source_msg::Msg::ImagesDone(d) => d,
        other => return Err(unexpected(&other, "ImagesDone")),
    };
    wait_for_files(&done, &mut rx).await?;
    let mut pages_rx = Some(pages_rx);
    if done.lazy && !done.postcopy {
        // Pre-copy: every page is here before the restore.
        let applied = tokio::time::timeout(FILES_SETTLE, pages_rx.take().expect("pages result"))
            .await
            .map_err(|_| refuse("receive", "the pages stream did not end"))?
            .map_err(|_| refuse("receive", "the connection ended before the pages stream did"))?
            .map_err(|e| refuse("receive", e))?;
        if applied != done.page_records {
            return Err(refuse(
                "receive",
                format!("applied {applied} page records, the source sent {}", done.page_records),
            ));
        }
        tracing::info!(records = applied, pages = store.len(), "page store complete");
    }
    // Post-copy: pages a restored task faults on before they are known current are asked for on the
    // fault link (crate::fault_link), which the source opened before the freeze.
    let faults = if done.postcopy {
        let link = fault_link.link(FAULT_LINK_WAIT).await.map_err(|e| refuse("receive", e))?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        store.set_requests(tx);
        Some(AbortOnDrop(ctx.faults.fetch(link, rx, store.clone(), ctx.stats.clone())))
    } else {
        None
    };
    drop(fault_link);

    // Restore, stopped; with lazy pages, this agent fills the private memory (see crate::lazy).
    set_phase("restore");
    let started = Instant::now();
    // The tree's connections to the outside, set up again here and handed in (crate::external).
    let handover = {
        let (p, d) = (prepare.clone(), dir.clone());
        tokio::task::spawn_blocking(move || crate::external::hand_over(&p, &d))
            .await
            .map_err(|e| refuse("restore", format!("outside connections: {e}")))?
            .map_err(|e| refuse("restore", format!("outside connections: {e}")))?
    };
    if !handover.inherit.is_empty() || handover.ext_unix_sk {
        tracing::info!(inherit = %handover.describe(), ext_unix_sk = handover.ext_unix_sk, "outside connections ready");
    }
    let lazy = if done.lazy {
        let ranges = criu::images::lazy_ranges(&dir).map_err(|e| refuse("restore", e.to_string()))?;
        store.expect_lazy(ranges.iter().map(|(_, r)| criu::images::pages_in(r)).sum());
        let listener = crate::lazy::LazyPages::listen(&dir).map_err(|e| refuse("restore", e.to_string()))?;
        Some(LazyCopy(Some(listener.start(ranges, store.clone()))))
    } else {
        None
    };
    // CRIU gives each process the pid it had (pstree.img); the watchdog is to kill those if this agent
    // dies while CRIU restores them.
    let guard = rec.watchdog.as_ref().expect("armed");
    let tree = criu::images::read_pstree(&dir).map_err(|e| refuse("restore", e.to_string()))?;
    guard
        .expect(&tree.iter().map(|t| t.pid).collect::<Vec<_>>())
        .map_err(|e| refuse("restore", format!("watchdog: {e}")))?;
    let restore = ctx
        .criu
        .restore(&criu::RestoreRequest {
            images_dir: dir.clone(),
            lazy_pages: lazy.is_some(),
            inherit: handover.inherit.clone(),
            ext_unix_sk: handover.ext_unix_sk,
            announce: guard.announce(),
        })
        .await;
    // CRIU holds its own copies now. The pty masters stay open until the copy was resumed: closing one
    // hangs its terminal up, which would SIGCONT a stopped session leader whose controlling terminal it
    // is, before Commit.
    let masters = handover.into_masters();
    // CRIU has returned: the watchdog learns what it restored (nothing if it failed: CRIU kills what it
    // made), and so does the StoppedCopy that kills the copy should this session fail from here on.
    let (root, _) = match restore {
        Ok(r) => r,
        Err(e) => {
            let _ = guard.settle(&[]);
            return Err(restore_failure(ctx, &dir, &prepare.migration_id, e));
        }
    };
    let pids = criu::tree::processes(root).unwrap_or_else(|_| vec![root]);
    let alive_at_restore: Vec<u32> = pids.iter().copied().filter(|&p| criu::tree::is_alive(p)).collect();
    let mut copy = StoppedCopy { pids: pids.clone(), committed: false, killed: rec.copy_killed.clone() };
    rec.restored = true;
    guard.settle(&pids).map_err(|e| refuse("restore", format!("watchdog: {e}")))?;
    if let Some(l) = &lazy {
        // CRIU said RSTF before it exited, so this returns at once unless something is off.
        let handle = l.0.as_ref().expect("lazy handle");
        tokio::task::block_in_place(|| handle.wait_restored(LAZY_HANDOFF))
            .map_err(|e| refuse("restore", format!("lazy restore: {e}")))?;
    }
    ctx.stats.restore.observe(started.elapsed().as_secs_f64());
    set_phase("commit");
    tracing::info!(root, ?pids, elapsed = ?started.elapsed(), "restored, stopped until commit");
    send_msg(
        send,
        target_msg::Msg::Restored(pb::Restored {
            root_pid: root,
            restore_micros: started.elapsed().as_micros() as u64,
        }),
    )
    .await?;

    // Commit or drop.
    let msg = match tokio::time::timeout(ctx.cfg.commit_timeout, recv_msg(recv)).await {
        Err(_) => {
            let waited = ctx.cfg.commit_timeout;
            return Err(refuse("commit", format!("no Commit within {waited:?}: the restored copy was killed")));
        }
        Ok(m) => m?,
    };
    match msg {
        source_msg::Msg::Commit(_) => {}
        other => return Err(unexpected(&other, "Commit")),
    }
    // A process of the stopped copy that died (the OOM killer, an operator's kill) leaves a broken tree:
    // the copy is killed instead of run, and the source, told so (Failed.copy_gone), resumes its original.
    // (A zombie restored as one, a child that had exited but was not reaped yet at the freeze, is no
    // such death: only those alive after the restore count.)
    if let Some(dead) = alive_at_restore.iter().find(|&&p| !criu::tree::is_alive(p)) {
        let what = if *dead == root { "its root" } else { "one of its processes" };
        return Err(refuse(
            "resume",
            format!(
                "restored pid {dead} ({what}) died before the copy could run (killed on {}: see its kernel log for \
                 the OOM killer); the copy was killed",
                ctx.hello.host_name
            ),
        ));
    }
    // Lazy memory: until it is filled in, the copy is killed here if that fails (post-copy: if the rest
    // of its memory cannot arrive), and the source resumes its original.
    copy.committed = !done.lazy;
    criu::tree::resume(&pids).map_err(|e| refuse("resume", format!("restored pid {root}: {e}")))?;
    // The outside terminals handed in hang up now, as when their client has gone.
    drop(masters);
    if !done.lazy
        && let Some(w) = rec.watchdog.take()
    {
        w.release();
    }
    send_msg(send, target_msg::Msg::Resumed(pb::Resumed { root_pid: root })).await?;
    if let Some(mut l) = lazy {
        // The copy runs; the daemon fills the rest of its memory from the page store (post-copy: as
        // the pages arrive). The source is told when every page is in place.
        set_phase("post-copy");
        let handle = l.0.take().expect("lazy handle");
        let cancel = handle.clone();
        let mut filling = tokio::task::spawn_blocking(move || handle.wait_done());
        let pages = async {
            match pages_rx.take() {
                Some(rx) => rx.await.unwrap_or_else(|_| Err("the pages stream was dropped".into())),
                None => std::future::pending().await,
            }
        };
        tokio::pin!(pages);
        let mut pages_done = !done.postcopy;
        // Post-copy: until the source says it will not resume its original on its own (Detach, sent
        // once it has seen this side acknowledge the whole pages stream), a lost link kills the copy,
        // also after every page arrived here: the source, which cannot know that, resumes the original.
        let mut detached = !done.postcopy;
        let control = recv_msg(recv);
        tokio::pin!(control);
        let filled = loop {
            tokio::select! {
                r = &mut filling => break r,
                m = &mut control, if !detached => match m {
                    Ok(source_msg::Msg::Detach(_)) => {
                        detached = true;
                        tracing::info!("post-copy: the source keeps its original stopped; the copy no longer needs the link");
                    }
                    Ok(other) => {
                        cancel.cancel();
                        return Err(unexpected(&other, "Detach"));
                    }
                    Err(e) => {
                        cancel.cancel();
                        return Err(refuse("post-copy", format!("the source's control stream ended before it let the copy go ({e}): the copy was killed")));
                    }
                },
                r = &mut pages, if !pages_done => match r {
                    Ok(n) => {
                        pages_done = true;
                        tracing::info!(records = n, "post-copy: every page arrived");
                    }
                    Err(e) => {
                        cancel.cancel();
                        return Err(refuse("post-copy", format!("the rest of the memory cannot arrive ({e}): the copy was killed")));
                    }
                },
                e = conn.closed(), if !detached => {
                    cancel.cancel();
                    let when = if pages_done { "before the source let the copy go" } else { "before all memory arrived" };
                    return Err(refuse("post-copy", format!("link to the source lost {when} ({e}): the copy was killed")));
                }
            }
        };
        let complete = match filled {
            Ok(Ok(s)) => {
                tracing::info!(?s, "every lazy page is in place");
                copy.committed = true;
                if let Some(w) = rec.watchdog.take() {
                    w.release();
                }
                pb::Complete {
                    pushed_pages: s.pushed_pages,
                    faults: s.faults,
                    fault_p50_us: s.fault_p50.as_micros() as u64,
                    fault_p99_us: s.fault_p99.as_micros() as u64,
                    micros: started.elapsed().as_micros() as u64,
                }
            }
            Ok(Err(e)) => {
                return Err(refuse("post-copy", format!("filling the copy's memory failed: {e}; the copy was killed")));
            }
            Err(e) => return Err(refuse("post-copy", format!("the lazy-pages daemon: {e}; the copy was killed"))),
        };
        // No fault waits for the source any more.
        drop(faults);
        let _ = send_msg(send, target_msg::Msg::Complete(complete)).await;
    }
    let _ = send.finish();
    // Let the Resumed frame reach the source before the connection is closed.
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    Ok(root)
}

/// Says why a restore failed, with CRIU's error lines, and keeps its log.
fn restore_failure(ctx: &Context, dir: &Path, id: &str, e: criu::CriuError) -> SessionError {
    let kept = ctx.cfg.state_dir.join("logs").join(format!("{id}-restore.log"));
    let _ = std::fs::copy(dir.join("restore.log"), &kept);
    let reason = match &e {
        criu::CriuError::Failed { status, errors, .. } => format!(
            "criu restore failed on {} ({status}): {errors} (full log there: {})",
            ctx.hello.host_name,
            kept.display()
        ),
        other => other.to_string(),
    };
    refuse("restore", reason)
}

/// A lazy-pages daemon serving a restored copy: stopped when dropped before it finished (the copy is
/// being killed).
struct LazyCopy(Option<crate::lazy::LazyHandle>);

impl Drop for LazyCopy {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.cancel();
        }
    }
}

/// A restored tree that has not been committed yet: killed when dropped.
struct StoppedCopy {
    pids: Vec<u32>,
    committed: bool,
    /// Set once it was killed and every process of it has exited: the source may resume its original.
    killed: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for StoppedCopy {
    fn drop(&mut self) {
        if !self.committed {
            tracing::warn!(pids = ?self.pids, "killing the restored copy: the source keeps the original");
            // Waits (briefly: a stopped copy whose memory is mostly lazy exits fast) so that the copy is
            // gone before the source hears that it may resume the original.
            match criu::tree::kill_all(&self.pids, std::time::Duration::from_secs(5)) {
                Ok(()) => self.killed.store(true, std::sync::atomic::Ordering::SeqCst),
                Err(e) => tracing::error!("could not kill the restored copy {:?}: {e}", self.pids),
            }
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);
impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What on this host would stop the tree: pids in use (CRIU restores every process with its original
/// pid) and files that CRIU will reopen by path but that are missing or have another size here.
fn target_blockers(prepare: &pb::Prepare, host: &str) -> Vec<pb::Finding> {
    let mut out = Vec::new();
    for &p in &prepare.pids {
        if criu::tree::state(p).is_some() {
            out.push(pb::Finding {
                code: "pid-taken".into(),
                pid: p,
                detail: format!(
                    "pid {p} (used by `{}`) already taken on {host}; CRIU restores every process with its original pid",
                    criu::tree::comm(p)
                ),
                fix: format!(
                    "stop the process holding pid {p} on {host}, or start the workload in its own pid namespace"
                ),
            });
        }
    }
    for f in &prepare.files {
        if !f.path.starts_with('/') || f.path.len() > 4096 {
            out.push(pb::Finding {
                code: "bad-path".into(),
                pid: 0,
                detail: format!("{:?} is not an absolute path", f.path),
                fix: "report this bug".into(),
            });
            continue;
        }
        match std::fs::metadata(&f.path) {
            Err(e) => out.push(pb::Finding {
                code: "missing-file".into(),
                pid: 0,
                detail: format!(
                    "{} ({} bytes), which the process holds open or maps, is missing on {host}: {e}",
                    f.path, f.size
                ),
                fix: format!(
                    "make the same file available at the same path on {host} (copy it, or use shared storage)"
                ),
            }),
            Ok(m) if m.is_file() && m.len() != f.size => out.push(pb::Finding {
                code: "file-size".into(),
                pid: 0,
                detail: format!(
                    "{} is {} bytes on {host} but {} bytes on the source; CRIU insists on the same size",
                    f.path,
                    m.len(),
                    f.size
                ),
                fix: format!("make {} on {host} identical to the source's", f.path),
            }),
            Ok(_) => {}
        }
    }
    out
}

type FileResult = Result<pb::FileSummary, String>;

/// Where incoming streams go.
struct Incoming {
    conn: quinn::Connection,
    dir: PathBuf,
    id: String,
    store: Arc<crate::pages::PageStore>,
    stats: Arc<crate::stats::Stats>,
}

/// Accepts streams until the connection ends: image files (each result goes to `tx`) and the one pages
/// stream (its record count goes to `pages_tx`). Bytes are taken from a shared budget (free disk space)
/// before a file is received, so a peer cannot fill the disk; the page store bounds memory likewise.
async fn receive_files(
    inc: Incoming,
    budget: u64,
    tx: tokio::sync::mpsc::Sender<FileResult>,
    pages_tx: tokio::sync::oneshot::Sender<Result<u64, String>>,
) {
    let budget = Arc::new(AtomicU64::new(budget));
    let pages_tx = Arc::new(std::sync::Mutex::new(Some(pages_tx)));
    // Names taken so far: a second stream with one of them would overwrite the file, or delete it when
    // it fails.
    let names = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let inc = Arc::new(inc);
    let mut count = 0usize;
    while let Ok(mut stream) = inc.conn.accept_uni().await {
        count += 1;
        if count > MAX_FILES {
            let _ = tx.send(Err(format!("more than {MAX_FILES} files"))).await;
            return;
        }
        let (inc, tx, budget, pages_tx, names) =
            (inc.clone(), tx.clone(), budget.clone(), pages_tx.clone(), names.clone());
        tokio::spawn(async move {
            let (dir, id, stats) = (&inc.dir, &inc.id, &inc.stats);
            let header = file_stream::read_stream_header(&mut stream).await.map_err(|e| e.to_string());
            let h = match header {
                Ok(file_stream::Incoming::File(h)) => Ok(h),
                Ok(file_stream::Incoming::Pages(p)) => {
                    let Some(ptx) = pages_tx.lock().expect("lock").take() else {
                        tracing::warn!("a second pages stream, closing the connection");
                        inc.conn.close(1u32.into(), b"pages refused: a second pages stream");
                        return;
                    };
                    let r = receive_pages(&mut stream, &p, id, &inc.store, stats).await;
                    if let Err(e) = &r {
                        tracing::warn!("pages stream refused, closing the connection: {e}");
                        let _ = stream.stop(1u32.into());
                        inc.conn.close(1u32.into(), truncate(&format!("pages refused: {e}"), 512).as_bytes());
                    }
                    let _ = ptx.send(r);
                    return;
                }
                Err(e) => Err(e),
            };
            let r = async {
                let h = h?;
                // Count the header frame as the sender does, so both sides' byte counters agree.
                let framed = pb::StreamHeader { kind: Some(pb::stream_header::Kind::File(h.clone())) };
                stats.bytes_received.add(4 + prost::Message::encoded_len(&framed) as u64);
                if &h.migration_id != id {
                    return Err(format!(
                        "file {} belongs to migration {:?}, not {id:?}",
                        h.name,
                        protocol::peer_text(&h.migration_id)
                    ));
                }
                if !names.lock().expect("names lock").insert(h.name.clone()) {
                    return Err(format!("file {} was sent twice", h.name));
                }
                let reserved = budget.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(h.size));
                if reserved.is_err() {
                    return Err(format!(
                        "no room for {} ({} bytes) in {}: the target's disk is full; {DISK_FIX}",
                        h.name,
                        h.size,
                        dir.display()
                    ));
                }
                let (summary, t) =
                    file_stream::receive_body(&mut stream, &h, dir, h.size, |_| {}).await.map_err(|e| {
                        match &e {
                            // Filled by something else since Prepare measured it.
                            ProtocolError::Io(io) if matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) => {
                                format!("no room for {} in {}: {io}; {DISK_FIX}", h.name, dir.display())
                            }
                            _ => e.to_string(),
                        }
                    })?;
                stats.bytes_received.add(t.wire);
                // Read up to the stream's end: dropping a stream whose FIN was not read makes quinn send
                // STOP_SENDING (code 0), which the source would take for a refusal of a good file.
                match stream.read_to_end(0).await {
                    Ok(_) => Ok(summary),
                    Err(e) => Err(format!("{}: data after the checksum, or the stream broke: {e}", h.name)),
                }
            }
            .await;
            if let Err(e) = &r {
                // A bad file (hostile name, wrong size, bad checksum, no room) ends the migration.
                tracing::warn!("file stream refused, closing the connection: {e}");
                let _ = stream.stop(1u32.into());
                inc.conn.close(1u32.into(), truncate(&format!("file refused: {e}"), 512).as_bytes());
            }
            let _ = tx.send(r).await;
        });
    }
}

/// Applies the pages stream to the store until its end; returns the records applied.
async fn receive_pages(
    stream: &mut quinn::RecvStream,
    header: &pb::PagesHeader,
    id: &str,
    store: &Arc<crate::pages::PageStore>,
    stats: &crate::stats::Stats,
) -> Result<u64, String> {
    if header.migration_id != id {
        return Err(format!("pages stream of migration {:?}, not {id:?}", header.migration_id));
    }
    // Batches are applied in order on a thread of their own, so that reading the next batch from the
    // network overlaps copying this one into the store.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(pb::PageBatch, Vec<u8>)>(16);
    let applier = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            while let Some((batch, data)) = rx.blocking_recv() {
                if batch.end {
                    store.set_complete();
                } else {
                    store.apply(&batch, &data).map_err(|e| e.to_string())?;
                }
            }
            Ok::<_, String>(())
        })
    };
    let mut records = 0u64;
    let read = async {
        while let Some((batch, data, wire)) = protocol::pages::read_batch(stream).await.map_err(|e| e.to_string())? {
            stats.bytes_received.add(wire);
            if batch.end {
                if batch.total != records {
                    return Err(format!("the pages stream carried {records} records, the source says {}", batch.total));
                }
                // Nothing may follow the end.
                if protocol::pages::read_batch(stream).await.map_err(|e| e.to_string())?.is_some() {
                    return Err("pages after the end of the pages stream".into());
                }
                tx.send((batch, data)).await.map_err(|_| "the page store stopped".to_string())?;
                return Ok(records);
            }
            records += protocol::pages::records(&batch) as u64;
            if tx.send((batch, data)).await.is_err() {
                break; // the applier failed: its error is the one to report
            }
        }
        Err(format!("the pages stream ended after {records} records without its end"))
    };
    let r = read.await;
    drop(tx);
    let applied = applier.await.map_err(|e| e.to_string())?;
    applied.and(r)
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

async fn wait_for_files(
    done: &pb::ImagesDone,
    rx: &mut tokio::sync::mpsc::Receiver<FileResult>,
) -> Result<(), SessionError> {
    if done.files.len() > MAX_FILES {
        return Err(refuse("receive", format!("{} files announced, more than {MAX_FILES}", done.files.len())));
    }
    let mut expected: HashMap<&str, &pb::FileSummary> = HashMap::new();
    for f in &done.files {
        names::check_image_name(&f.name).map_err(|e| refuse("receive", e.to_string()))?;
        expected.insert(f.name.as_str(), f);
    }
    let mut got = 0usize;
    let deadline = tokio::time::Instant::now() + FILES_SETTLE;
    while got < expected.len() {
        let r = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .map_err(|_| refuse("receive", format!("only {got} of {} image files arrived", expected.len())))?
            .ok_or_else(|| refuse("receive", "connection ended before all image files arrived"))?;
        let f = r.map_err(|e| refuse("receive", e))?;
        match expected.get(f.name.as_str()) {
            Some(want) if want.size == f.size && want.xxh3 == f.xxh3 => got += 1,
            Some(want) => {
                return Err(refuse(
                    "receive",
                    format!(
                        "{}: received {} bytes xxh3 {:016x}, source announced {} bytes xxh3 {:016x}",
                        f.name, f.size, f.xxh3, want.size, want.xxh3
                    ),
                ));
            }
            None => {
                return Err(refuse("receive", format!("{} was sent but is not in the image list", f.name)));
            }
        }
    }
    Ok(())
}
