//! The fault link, target side: the agent's fault endpoint takes each source's fault link and hands it
//! to that migration's session; during post-copy the session asks on it for the pages its restored
//! tasks fault on ([`fetch`]), puts the answers into its page store and fills them into the tasks
//! parked on them right there ([`crate::lazy::ParkedFaults`]).
//!
//! The endpoint and every fault link run on a lane of their own ([`protocol::lane`]): a thread with its
//! own runtime and UDP socket at a higher priority, so an answer is never queued behind the bulk pages
//! that fill the main connection. The link only speeds faults up: a page it cannot fetch arrives with
//! the pages stream, and the fault waits for that.
//!
//! A link is taken only when its first frame names a migration whose session waits for one
//! ([`FaultLinks::expect`]), and only once; the peer proved fleet membership in the TLS handshake already.
//! The link must come from the address of the migration's main connection, with the certificate that
//! connection's peer presented: another host of the fleet cannot take a migration's faults, even
//! knowing its id and behind the same address (a NAT, a shared host). Since the lane runs at
//! real-time priority, connections are refused before their handshake unless a migration from that
//! address waits for a link, and beyond [`MAX_HANDSHAKES`] at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use protocol::frame::{read_frame, write_frame};
use protocol::lane::Lane;
use protocol::{ProtocolError, pb};

/// How long a connecting source may take to finish the handshake and name its migration.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Fault links in their handshake at once; more are refused (each migration opens one).
const MAX_HANDSHAKES: usize = 8;

/// One migration's fault link: the stream the source opened, and its connection.
pub struct Link {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

/// The main connection of a migration, as its fault link must match it.
struct Source {
    addr: std::net::IpAddr,
    /// Its peer's leaf certificate (DER).
    certificate: Vec<u8>,
}

/// Per migration id: the main connection's source, and where its link goes.
type Waiting = Mutex<HashMap<String, (Source, tokio::sync::oneshot::Sender<Link>)>>;

/// The agent's fault endpoint.
pub struct FaultLinks {
    endpoint: quinn::Endpoint,
    waiting: Arc<Waiting>,
    // Last: the lane stops (and its tasks end) after the endpoint was closed.
    lane: Lane,
}

impl FaultLinks {
    /// Listens on `addr` (UDP) on a lane of its own.
    pub fn start(server: quinn::ServerConfig, addr: SocketAddr) -> std::io::Result<FaultLinks> {
        let lane = Lane::start("fault-link")?;
        let endpoint = lane.server(server, addr)?;
        let waiting: Arc<Waiting> = Default::default();
        lane.spawn(accept(endpoint.clone(), Arc::downgrade(&waiting)));
        Ok(FaultLinks { endpoint, waiting, lane })
    }

    /// The UDP port sources connect to (told in Prepared).
    pub fn port(&self) -> u16 {
        self.endpoint.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Waits for the fault link of migration `id` from the peer of `main` (the migration's main
    /// connection: the same address and certificate), from now until the returned [`Expected`] is
    /// dropped.
    pub fn expect(&self, id: &str, main: &quinn::Connection) -> Expected {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let source = Source {
            addr: main.remote_address().ip(),
            certificate: protocol::tls::peer_certificate(main).unwrap_or_default(),
        };
        self.waiting.lock().expect("not poisoned").insert(id.to_string(), (source, tx));
        Expected { id: id.to_string(), rx: Some(rx), waiting: Arc::downgrade(&self.waiting) }
    }

    /// Post-copy: runs [`fetch`] on the lane.
    pub fn fetch(
        &self,
        link: Link,
        requests: tokio::sync::mpsc::UnboundedReceiver<(u32, u64)>,
        store: Arc<crate::pages::PageStore>,
        stats: Arc<crate::stats::Stats>,
    ) -> tokio::task::JoinHandle<()> {
        self.lane.spawn(fetch(link, requests, store, stats))
    }
}

impl Drop for FaultLinks {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"shutting down");
    }
}

/// A session's claim on its fault link.
pub struct Expected {
    id: String,
    rx: Option<tokio::sync::oneshot::Receiver<Link>>,
    waiting: Weak<Waiting>,
}

impl Expected {
    /// The link, once the source opened it; an error when it did not within `timeout`.
    pub async fn link(&mut self, timeout: Duration) -> Result<Link, String> {
        let rx = self.rx.take().ok_or("the fault link was taken already")?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(link)) => Ok(link),
            Ok(Err(_)) => {
                Err("the source's fault link broke while it was being taken (see the agent's warning for it)".into())
            }
            Err(_) => Err(format!(
                "the source opened no fault link within {}s (is the target's fault port reachable over UDP from the source?)",
                timeout.as_secs()
            )),
        }
    }
}

impl Drop for Expected {
    fn drop(&mut self) {
        if let Some(w) = self.waiting.upgrade() {
            w.lock().expect("not poisoned").remove(&self.id);
        }
    }
}

async fn accept(endpoint: quinn::Endpoint, waiting: Weak<Waiting>) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    while let Some(incoming) = endpoint.accept().await {
        // The lane runs at real-time priority: TLS handshakes nobody asked for must not take its time.
        let from = incoming.remote_address().ip();
        let expected = waiting
            .upgrade()
            .is_some_and(|w| w.lock().expect("not poisoned").values().any(|(s, _)| same_host(s.addr, from)));
        let Some(permit) = expected.then(|| handshakes.clone().try_acquire_owned().ok()).flatten() else {
            tracing::warn!(remote = %incoming.remote_address(), expected, "refused a fault link before its handshake: no migration from there waits for one, or {MAX_HANDSHAKES} handshakes are running");
            incoming.refuse();
            continue;
        };
        let waiting = waiting.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let remote = incoming.remote_address();
            match tokio::time::timeout(HELLO_TIMEOUT, take(incoming, &waiting)).await {
                Ok(Ok(id)) => tracing::info!(%remote, id, "fault link open"),
                Ok(Err(e)) => tracing::warn!(%remote, "refused a fault link: {e}"),
                Err(_) => tracing::warn!(%remote, "refused a fault link: no FaultLinkHello within {HELLO_TIMEOUT:?}"),
            }
        });
    }
}

/// Handshake, FaultLinkHello, hand-over to the waiting session, echo.
async fn take(incoming: quinn::Incoming, waiting: &Weak<Waiting>) -> Result<String, String> {
    let conn = incoming.await.map_err(|e| format!("TLS handshake: {e}"))?;
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
    let hello: pb::FaultLinkHello =
        read_frame(&mut recv).await.map_err(|e| e.to_string())?.ok_or("the stream ended before its FaultLinkHello")?;
    let id = hello.migration_id.clone();
    let from = conn.remote_address().ip();
    let certificate = protocol::tls::peer_certificate(&conn);
    let tx = waiting.upgrade().ok_or("the agent is stopping").and_then(|w| {
        let mut w = w.lock().expect("not poisoned");
        const NOT_WAITING: &str = "no migration here waits for this fault link";
        match w.get(&id) {
            None => Err(NOT_WAITING),
            Some((s, _)) if !same_host(s.addr, from) => Err(NOT_WAITING),
            Some((s, _)) if certificate.is_none_or(|c| c.is_empty() || c != s.certificate) => {
                Err("this fault link's certificate is not the one of the migration's source")
            }
            Some(_) => w.remove(&id).map(|(_, tx)| tx).ok_or(NOT_WAITING),
        }
    });
    let tx = match tx {
        Ok(tx) => tx,
        Err(why) => {
            conn.close(1u32.into(), why.as_bytes());
            return Err(format!("{why} ({id:?})"));
        }
    };
    write_frame(&mut send, &hello).await.map_err(|e| e.to_string())?;
    tx.send(Link { conn, send, recv }).map_err(|_| "its session ended meanwhile".to_string())?;
    Ok(id)
}

/// Whether two addresses are the same host (an IPv4 address and its IPv6-mapped form are).
fn same_host(a: std::net::IpAddr, b: std::net::IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

/// Sends the store's requests for pending pages and applies the answers, until the source ends the
/// stream, the link breaks, or the session drops this task.
pub async fn fetch(
    link: Link,
    mut requests: tokio::sync::mpsc::UnboundedReceiver<(u32, u64)>,
    store: Arc<crate::pages::PageStore>,
    stats: Arc<crate::stats::Stats>,
) {
    let Link { conn, mut send, mut recv } = link;
    // When each request went out, and the round trips (request written -> answer applied), for the log.
    let sent_at = std::sync::Mutex::new(HashMap::<(u32, u64), std::time::Instant>::new());
    let mut rtts: Vec<std::time::Duration> = Vec::new();
    let sender = async {
        let mut out = Vec::new();
        let mut batched = Vec::new();
        while let Some((pid, vaddr)) = requests.recv().await {
            // Every request queued meanwhile goes out in the same write.
            out.clear();
            let mut next = Some((pid, vaddr));
            while let Some((pid, vaddr)) = next {
                batched.push((pid, vaddr));
                let req = pb::FaultRequest { pid, vaddr };
                out.extend_from_slice(&(prost::Message::encoded_len(&req) as u32).to_le_bytes());
                prost::Message::encode(&req, &mut out).expect("Vec grows");
                next = requests.try_recv().ok();
            }
            tokio::io::AsyncWriteExt::write_all(&mut send, &out).await?;
            let now = std::time::Instant::now();
            sent_at.lock().expect("lock").extend(batched.drain(..).map(|k| (k, now)));
        }
        Ok::<_, ProtocolError>(())
    };
    let receiver = async {
        while let Some((batch, data, wire)) = protocol::pages::read_batch(&mut recv).await? {
            stats.bytes_received.add(wire);
            if !batch.frozen || batch.end || protocol::pages::records(&batch) != 1 || !batch.current.is_empty() {
                return Err(ProtocolError::BadChunk("a fault answer must be one page from the frozen tree".into()));
            }
            store.apply(&batch, &data).map_err(|e| ProtocolError::BadChunk(e.to_string()))?;
            // The page and its bytes (None: a zero page); a copy record is left to the daemon.
            let page = match (batch.data.first(), batch.zero.first()) {
                (Some(&vaddr), _) => Some((vaddr, Some(&data[..]))),
                (None, Some(&vaddr)) => Some((vaddr, None)),
                _ => None,
            };
            // The faults waiting for it get it from here: this lane runs at once, the daemon's thread
            // may wait for a core.
            if let Some((vaddr, bytes)) = page {
                store.fill_parked(batch.pid, vaddr, bytes);
            }
            let key = (batch.pid, page.map_or(0, |(vaddr, _)| vaddr));
            store.answered(key.0, key.1);
            if let Some(t) = sent_at.lock().expect("lock").remove(&key) {
                rtts.push(t.elapsed());
            }
        }
        Ok(())
    };
    let r = tokio::select! { r = sender => r, r = receiver => r };
    if !rtts.is_empty() {
        rtts.sort_unstable();
        let at = |p: f64| rtts[((rtts.len() - 1) as f64 * p) as usize].as_micros();
        tracing::info!(
            answers = rtts.len(),
            p50_us = at(0.5),
            p99_us = at(0.99),
            max_us = at(1.0),
            "fault link round trips (request sent -> answer in the page store)"
        );
    }
    // The source closes the link with code 0 once every page was delivered: that is its normal end.
    let closed_by_source = matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(ref c)) if c.error_code == quinn::VarInt::from_u32(0)
    );
    match r {
        Err(e) if !closed_by_source => {
            tracing::warn!("fault link: {e}; faults wait for the pages stream instead");
            conn.close(1u32.into(), b"fault link error");
        }
        _ => tracing::debug!("fault link closed"),
    }
}
