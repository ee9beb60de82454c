//! The target agent: the daemon on the host that receives a process tree.
//!
//! It owns, per migration (one QUIC connection from a source agent, mutual TLS against the fleet CA):
//! answering Hello and Prepare (are the tree's pids free here?), receiving image files into
//! `STATE/incoming/<migration id>/` (names checked, sizes bounded, checksums verified) and memory pages
//! into its page store ([`pages`]), restoring them with CRIU **stopped**, and then either resuming the
//! copy when the source commits or killing it when the source aborts, times out or disappears. With
//! lazy memory it is CRIU's lazy-pages daemon ([`lazy`]: userfaultfd, faults first, fetched on the source's
//! [`fault_link`], the rest pushed). A [`watchdog`] kills the copy should the agent die from the restore
//! on (during it too) before the copy may live on its own: before it runs, or before its memory is in
//! place. At no
//! instant does it let its copy run while the source may still resume the original: it resumes only
//! after an explicit Commit, and kills a copy that cannot get the rest of its memory.
//!
//! It does not decide what to migrate, and never talks to CRIU except through the `criu` crate.

pub mod external;
pub mod fault_link;
pub mod lazy;
pub mod pages;
pub mod session;
pub mod stats;
pub mod watchdog;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use protocol::tls::TlsFiles;

/// Configuration of a target agent.
#[derive(Debug, Clone)]
pub struct Config {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// UDP address of the fault endpoint, where sources open their fault links (crate::fault_link).
    pub fault_listen: SocketAddr,
    /// TLS material.
    pub tls: TlsFiles,
    /// This host's name in the fleet (the name on its certificate), stated in the Hello.
    pub name: String,
    /// Work directory; images land in `incoming/`, kept logs in `logs/`.
    pub state_dir: PathBuf,
    /// How long a restored, stopped copy waits for Commit before it is killed.
    pub commit_timeout: Duration,
    /// How many migrations may be received at once.
    pub max_sessions: usize,
    /// Local HTTP address for `/metrics` (Prometheus) and `/status`; None: not served.
    pub metrics_listen: Option<SocketAddr>,
}

/// The fault endpoint's default address: the main one with the next port, or any port when the main
/// one is chosen by the system (port 0).
pub fn default_fault_listen(listen: SocketAddr) -> SocketAddr {
    let port = match listen.port() {
        0 => 0,
        p => p.checked_add(1).unwrap_or(0),
    };
    SocketAddr::new(listen.ip(), port)
}

/// Errors that stop the agent itself (not one migration).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
    #[error(transparent)]
    Criu(#[from] criu::CriuError),
    #[error("cannot listen on UDP {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot serve metrics on TCP {addr}: {source}; choose another --metrics-listen, or off")]
    Metrics { addr: SocketAddr, source: std::io::Error },
    #[error("state directory {path}: {source}")]
    StateDir { path: PathBuf, source: std::io::Error },
}

/// Runs the agent until `shutdown` resolves. Each connection is one migration, handled by its own task.
pub async fn run(cfg: Config, shutdown: impl std::future::Future<Output = ()>) -> Result<(), AgentError> {
    let criu = criu::Criu::find()?;
    // Before the first migration, so that no freeze waits for CRIU's probe of the kernel.
    if let Some(warning) = criu.keep_kernel_probe() {
        tracing::warn!("{warning}");
    }
    for sub in ["incoming", "logs"] {
        let p = cfg.state_dir.join(sub);
        std::fs::create_dir_all(&p).map_err(|source| AgentError::StateDir { path: p, source })?;
    }
    let server = protocol::tls::server_config(&cfg.tls)?;
    let endpoint = protocol::endpoint::server(server.clone(), cfg.listen)
        .map_err(|source| AgentError::Bind { addr: cfg.listen, source })?;
    let faults = fault_link::FaultLinks::start(server, cfg.fault_listen)
        .map_err(|source| AgentError::Bind { addr: cfg.fault_listen, source })?;
    let hello = protocol::host::local_hello(&cfg.name, &criu.version);
    let stats = Arc::new(stats::Stats::default());
    let _metrics = match cfg.metrics_listen {
        Some(addr) => {
            Some(telemetry::serve(addr, stats.clone()).await.map_err(|source| AgentError::Metrics { addr, source })?)
        }
        None => None,
    };
    tracing::info!(listen = %endpoint.local_addr().map_err(|source| AgentError::Bind { addr: cfg.listen, source })?, fault_port = faults.port(), criu = %criu.version, "target agent ready");
    let ctx = Arc::new(session::Context { criu, cfg: cfg.clone(), hello, stats, faults });
    let permits = Arc::new(tokio::sync::Semaphore::new(cfg.max_sessions));
    tokio::pin!(shutdown);
    loop {
        let incoming = tokio::select! {
            _ = &mut shutdown => break,
            i = endpoint.accept() => match i { Some(i) => i, None => break },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(remote = %incoming.remote_address(), "refusing connection: {} migrations already running", cfg.max_sessions);
            incoming.refuse();
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => session::handle(ctx, conn).await,
                // A peer without a fleet-CA certificate ends here, before any message is read.
                Err(e) => tracing::warn!(%remote, "refused peer during TLS handshake: {e}"),
            }
            drop(permit);
        });
    }
    endpoint.close(0u32.into(), b"shutting down");
    endpoint.wait_idle().await;
    Ok(())
}
