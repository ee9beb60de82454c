//! The fault link, source side: a QUIC connection of its own to the target's fault port, opened after
//! Prepared and before the freeze of a lazy migration ([`open`]), on which the source answers the
//! target's page faults from the stopped tree during post-copy ([`serve`]), until the migration ends:
//! also after the whole pages stream arrived, when the target asks only for a page it let go of and
//! needs again.
//!
//! It runs on the agent's fault lane ([`protocol::lane`]): its own thread, runtime and UDP socket at a
//! higher priority, so an answer leaves as soon as its request came in, ahead of the bulk pages that
//! fill the main connection. See protocol/proto/migrate.proto (FaultLinkHello) for the exchange.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use protocol::frame::{read_frame, write_frame};
use protocol::lane::Lane;
use protocol::pb;

use crate::precopy;

/// How long the target's fault endpoint may take to take the link.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// An open fault link.
pub struct FaultLink {
    /// The link's own UDP socket: open as long as the link.
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Drop for FaultLink {
    fn drop(&mut self) {
        self.conn.close(0u32.into(), b"done");
    }
}

/// Opens the fault link of migration `id` to `addr` (the target's address with its fault port),
/// verifying the target's certificate for `server_name` as the main connection does.
pub async fn open(
    lane: &Lane,
    client: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
    id: &str,
) -> Result<FaultLink, String> {
    let fail = |what: String| {
        format!(
            "cannot open the fault link to {addr}: {what}; post-copy needs the target's fault port (UDP {}, target-agent --fault-listen) reachable from here",
            addr.port()
        )
    };
    let mut endpoint = lane.client(addr).map_err(|e| fail(format!("cannot open a UDP socket: {e}")))?;
    endpoint.set_default_client_config(client);
    let (server_name, id) = (server_name.to_string(), id.to_string());
    // On the lane: quinn starts a connection's driver on the runtime that connects.
    let opening = async move {
        let conn = endpoint.connect(addr, &server_name).map_err(|e| e.to_string())?.await.map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let hello = pb::FaultLinkHello { migration_id: id };
        write_frame(&mut send, &hello).await.map_err(|e| e.to_string())?;
        match read_frame::<_, pb::FaultLinkHello>(&mut recv).await {
            Ok(Some(echo)) if echo == hello => Ok(FaultLink { _endpoint: endpoint, conn, send, recv }),
            Ok(_) => Err("the target answered with another migration".to_string()),
            Err(e) => Err(conn.close_reason().map(|r| r.to_string()).unwrap_or_else(|| e.to_string())),
        }
    };
    let opening = lane.spawn(async move {
        tokio::time::timeout(OPEN_TIMEOUT, opening)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {}s", OPEN_TIMEOUT.as_secs())))
    });
    match opening.await {
        Ok(r) => r.map_err(fail),
        Err(e) => Err(fail(format!("the fault lane: {e}"))),
    }
}

/// What [`serve`] may answer: pages of these processes inside these ranges, nothing else.
pub struct Lazy {
    pub pids: Vec<u32>,
    pub regions: Vec<precopy::Region>,
}

impl Lazy {
    fn contains(&self, pid: u32, vaddr: u64) -> bool {
        self.pids.contains(&pid)
            && vaddr.is_multiple_of(protocol::pages::PAGE_SIZE as u64)
            && self.regions.iter().any(|r| r.pid == pid && r.start <= vaddr && vaddr < r.end)
    }
}

/// Answers fault requests on the link, on the lane, until the target ends the stream. A request must
/// name a page of the tree's lazy memory: anything else is a hostile or broken peer asking to read this
/// host's memory, and ends the link. Each page asked for is also passed to `hints`, so the background
/// stream goes there next. `wire` counts the bytes answered.
pub fn serve(
    lane: &Lane,
    link: FaultLink,
    lazy: Lazy,
    hints: std::sync::mpsc::Sender<precopy::Key>,
    wire: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Result<(), String>> {
    lane.spawn(async move {
        let mut link = link;
        let r = answer(&mut link, &lazy, &hints, &wire).await;
        if r.is_err() {
            let _ = link.send.reset(1u32.into());
        } else {
            let _ = link.send.finish();
            let _ = link.send.stopped().await;
        }
        r
    })
}

async fn answer(
    link: &mut FaultLink,
    lazy: &Lazy,
    hints: &std::sync::mpsc::Sender<precopy::Key>,
    wire: &AtomicU64,
) -> Result<(), String> {
    while let Some(req) =
        read_frame::<_, pb::FaultRequest>(&mut link.recv).await.map_err(|e| format!("fault link: {e}"))?
    {
        if !lazy.contains(req.pid, req.vaddr) {
            return Err(format!(
                "the target asked for page {}:{:#x}, which is not lazy memory of the tree",
                req.pid, req.vaddr
            ));
        }
        let _ = hints.send((req.pid, req.vaddr));
        // One page from a stopped process: a few microseconds, done right here.
        let Some(out) = precopy::fault_answer(req.pid, req.vaddr) else {
            // The lazy memory of a stopped tree that cannot be read: its zero-fill would be a wrong page.
            // Left unanswered, the fault waits for the pages stream, whose pass over the frozen tree fails
            // on the same page: the copy is then killed and the original resumed.
            tracing::error!(
                pid = req.pid,
                vaddr = req.vaddr,
                "a page of the frozen tree cannot be read: fault not answered"
            );
            continue;
        };
        link.send.write_all(&out).await.map_err(|e| format!("fault link: {e}"))?;
        wire.fetch_add(out.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lazy_pages_of_the_tree_are_answered() {
        let lazy = Lazy { pids: vec![7], regions: vec![precopy::Region { pid: 7, start: 0x10000, end: 0x20000 }] };
        assert!(lazy.contains(7, 0x10000));
        assert!(lazy.contains(7, 0x1f000));
        assert!(!lazy.contains(7, 0x20000), "end is exclusive");
        assert!(!lazy.contains(7, 0x10008), "unaligned");
        assert!(!lazy.contains(8, 0x10000), "another process");
    }
}
