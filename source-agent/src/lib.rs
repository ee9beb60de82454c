//! The source agent: the daemon on the host that gives a process tree away.
//!
//! It owns: the local control socket the `migrate` command talks to ([`control`] is that protocol,
//! [`server`] the socket and its permission check), and each migration from the first look at the tree
//! to commit or rollback ([`migration`]): QUIC connection to the target agent, pre-copy rounds of the
//! running tree's memory ([`precopy`]), CRIU dump with the original left stopped, image streaming, the
//! post-copy side (fault answers and the rest of the memory from the stopped tree), and the decision to
//! kill the original (commit) or resume it (rollback).
//!
//! It leaves restoring to the target agent, the wire format to `protocol`, and CRIU's command lines to
//! the `criu` crate.

pub mod control;
pub mod dirty;
pub mod external;
pub mod fault_link;
pub mod inspect;
pub mod migration;
pub mod precopy;
pub mod preflight;
pub mod server;
pub mod stats;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use protocol::tls::TlsFiles;

/// Configuration of a source agent.
#[derive(Debug, Clone)]
pub struct Config {
    /// Unix socket the `migrate` command connects to.
    pub control_socket: PathBuf,
    pub tls: TlsFiles,
    /// This host's name in the fleet (the name on its certificate), stated in the Hello.
    pub name: String,
    /// Work directory; dumps go to `outgoing/<migration id>/`.
    pub state_dir: PathBuf,
    /// Local HTTP address for `/metrics` (Prometheus) and `/status`; None: not served.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Policies for connections to the outside from the agent's config file, tried after the ones a
    /// `migrate` command gives.
    pub rules: external::Rules,
}

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
    #[error(transparent)]
    Criu(#[from] criu::CriuError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot start the fault lane's thread: {0}")]
    Lane(std::io::Error),
    #[error("cannot serve metrics on TCP {addr}: {source}; choose another --metrics-listen, or off")]
    Metrics { addr: std::net::SocketAddr, source: std::io::Error },
}

/// Runs the agent until it is asked to stop: `stop` counts SIGTERM and SIGINT
/// ([`telemetry::stop_requests`]). On the first, it stops taking commands, rolls back every migration
/// that has not sent its commit (each original resumed where it was frozen, or left untouched) and waits
/// for those past it, which need this agent until the target has every page; on the second it returns
/// at once, and the next start recovers what was left from the journals ([`migration::recover`]).
pub async fn run(cfg: Config, mut stop: tokio::sync::watch::Receiver<u32>) -> Result<(), AgentError> {
    let criu = criu::Criu::find()?;
    // Before the first migration, so that no freeze waits for CRIU's probe of the kernel.
    if let Some(warning) = criu.keep_kernel_probe() {
        tracing::warn!("{warning}");
    }
    if let Some(bug) = criu.stack_bug() {
        tracing::warn!("{bug}");
    }
    let io = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| AgentError::Io { path, source }
    };
    std::fs::create_dir_all(cfg.state_dir.join("outgoing")).map_err(io(&cfg.state_dir))?;
    migration::recover(&cfg.state_dir);
    let client = protocol::tls::client_config(&cfg.tls)?;
    if let Some(parent) = cfg.control_socket.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let _ = std::fs::remove_file(&cfg.control_socket);
    let listener = tokio::net::UnixListener::bind(&cfg.control_socket).map_err(io(&cfg.control_socket))?;
    // Anyone may connect; the server checks each caller's credentials (SO_PEERCRED).
    std::fs::set_permissions(&cfg.control_socket, std::fs::Permissions::from_mode(0o666))
        .map_err(io(&cfg.control_socket))?;
    let hello = protocol::host::local_hello(&cfg.name, &criu.version);
    let stats = Arc::new(stats::Stats::default());
    let _metrics = match cfg.metrics_listen {
        Some(addr) => {
            Some(telemetry::serve(addr, stats.clone()).await.map_err(|source| AgentError::Metrics { addr, source })?)
        }
        None => None,
    };
    let ctx = Arc::new(migration::Context {
        criu,
        hello,
        client,
        state_dir: cfg.state_dir.clone(),
        stats,
        rules: cfg.rules.clone(),
        fault_lane: protocol::lane::Lane::start("fault-link").map_err(AgentError::Lane)?,
        busy: Default::default(),
        stopping: Default::default(),
        jobs: Default::default(),
    });
    tracing::info!(socket = %cfg.control_socket.display(), criu = %ctx.criu.version, "source agent ready");
    let mut asked = stop.clone();
    server::serve(listener, ctx.clone(), async move {
        let _ = asked.wait_for(|n| *n >= 1).await;
    })
    .await;
    let _ = std::fs::remove_file(&cfg.control_socket);
    ctx.stopping.cancel();
    ctx.jobs.close();
    if !ctx.jobs.is_empty() {
        tracing::warn!(
            migrations = ctx.jobs.len(),
            "stopping: migrations that have not sent their commit are rolled back (originals resumed), those past \
             it finish first; a second SIGTERM or SIGINT stops at once, and the next start recovers what is left \
             from the journals"
        );
        tokio::select! {
            () = ctx.jobs.wait() => tracing::info!("every migration has ended; stopping"),
            _ = stop.wait_for(|n| *n >= 2) => {
                tracing::warn!("stopping at once: the next start of this agent recovers the migrations left unfinished")
            }
        }
    }
    Ok(())
}
