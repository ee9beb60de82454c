//! The control socket: accepts `migrate` commands from local users, checks who asks (SO_PEERCRED), and
//! streams events back while the migration runs. A migration goes on if the client disconnects.

use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::control::{Event, MAX_LINE, Original, Request};
use crate::migration::{self, Context};

/// Serves the control socket until `shutdown` resolves.
pub async fn serve(listener: UnixListener, ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => { tracing::warn!("control socket accept: {e}"); continue; }
            },
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = client(stream, ctx).await {
                tracing::warn!("control client: {e}");
            }
        });
    }
}

async fn client(stream: UnixStream, ctx: Arc<Context>) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r.take(MAX_LINE as u64));
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let send = |ev: &Event| {
        let mut l = serde_json::to_vec(ev).expect("events serialize");
        l.push(b'\n');
        l
    };
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let ev = Event::Failed { error: format!("bad request: {e}"), original: Original::Running };
            return w.write_all(&send(&ev)).await;
        }
    };
    match req {
        Request::Migrate { pid, target, options, rules } => {
            if let Err(why) = may_migrate(cred.uid(), pid).and_then(|()| options.check()) {
                let ev = Event::Failed { error: why, original: Original::Running };
                return w.write_all(&send(&ev)).await;
            }
            tracing::info!(pid, %target, uid = cred.uid(), "migrate requested");
            // Tracked until the last event is written, so that a stopping agent waits for the migration
            // and its answer to the command (see crate::run).
            let _tracked = ctx.jobs.token();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let job = tokio::spawn(async move {
                let r = migration::run(&ctx, pid, &target, options, &rules, cred.uid(), tx.clone()).await;
                let ev = match r {
                    Ok(summary) => Event::Done { summary },
                    Err(f) => Event::Failed { error: f.error, original: f.original },
                };
                let _ = tx.send(ev);
            });
            let mut client_gone = false;
            while let Some(ev) = rx.recv().await {
                if !client_gone && w.write_all(&send(&ev)).await.is_err() {
                    client_gone = true; // keep draining: the migration must finish either way
                }
            }
            let _ = job.await;
            Ok(())
        }
        Request::Probe { target } => {
            let ev = match migration::probe(&ctx, &target).await {
                Ok(h) => Event::Probed { host: h.host_name, mem_available: h.mem_available },
                Err(error) => Event::Failed { error, original: Original::Running },
            };
            w.write_all(&send(&ev)).await
        }
        Request::Check { pid, target, rules } => {
            if let Err(why) = may_migrate(cred.uid(), pid) {
                let ev = Event::Failed { error: why, original: Original::Running };
                return w.write_all(&send(&ev)).await;
            }
            let ev = match migration::check(&ctx, pid, target.as_deref(), &rules, cred.uid()).await {
                Ok(report) => Event::Checked { report },
                Err(error) => Event::Failed { error, original: Original::Running },
            };
            w.write_all(&send(&ev)).await
        }
    }
}

/// Root may migrate any process; another user only a tree whose every process is entirely theirs
/// (real, effective, saved and filesystem uid).
fn may_migrate(uid: u32, pid: u32) -> Result<(), String> {
    if uid == 0 {
        return Ok(());
    }
    let pids = criu::tree::processes(pid).map_err(|_| format!("no process with pid {pid} on this host"))?;
    for p in pids {
        let uids = criu::tree::Status::read(p).map(|s| s.uids()).unwrap_or_default();
        if uids.is_empty() || uids.iter().any(|&u| u != uid) {
            return Err(format!(
                "permission denied: process {p} (in the tree of {pid}) does not belong entirely to uid {uid}; \
                 only root may migrate other users' processes"
            ));
        }
    }
    Ok(())
}
