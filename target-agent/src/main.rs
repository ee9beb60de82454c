//! `target-agent`: receives migrated process trees. See the crate docs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use protocol::tls::TlsFiles;

/// Receives process trees from source agents over QUIC (mutual TLS) and restores them with CRIU.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// UDP address to listen on.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], protocol::DEFAULT_PORT)))]
    listen: SocketAddr,
    /// UDP address of the fault endpoint (post-copy page faults travel on a QUIC connection of their
    /// own); default: the --listen address with the next port (7421), or any port with --listen port 0.
    #[arg(long)]
    fault_listen: Option<SocketAddr>,
    /// Directory with ca.pem, HOST.pem and HOST.key (deploy/certs.sh).
    #[arg(long, default_value = "/etc/migrate/tls")]
    tls_dir: PathBuf,
    /// Name of this host's certificate in --tls-dir.
    #[arg(long)]
    host: String,
    /// Work directory for received images and kept logs; put it on tmpfs (images arrive there while the
    /// process is frozen).
    #[arg(long, default_value = "/run/migrate/target")]
    state_dir: PathBuf,
    /// Seconds a restored copy waits, stopped, for the source's commit before it is killed.
    #[arg(long, default_value_t = 30)]
    commit_timeout: u64,
    /// Migrations received at once.
    #[arg(long, default_value_t = 4)]
    max_sessions: usize,
    /// Local HTTP address for /metrics (Prometheus text) and /status (JSON); "off" to disable.
    #[arg(long, default_value = "127.0.0.1:9465")]
    metrics_listen: String,
}

fn main() -> anyhow::Result<()> {
    // This executable run again as a restored copy's watchdog (target_agent::watchdog).
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let Some(never) = target_agent::watchdog::child_main(&args) {
        match never {}
    }
    serve()
}

#[tokio::main]
async fn serve() -> anyhow::Result<()> {
    telemetry::init_logging();
    let a = Args::parse();
    let cfg = target_agent::Config {
        listen: a.listen,
        fault_listen: a.fault_listen.unwrap_or_else(|| target_agent::default_fault_listen(a.listen)),
        tls: TlsFiles::in_dir(&a.tls_dir, &a.host),
        name: a.host.clone(),
        state_dir: a.state_dir,
        commit_timeout: Duration::from_secs(a.commit_timeout),
        max_sessions: a.max_sessions,
        metrics_listen: if a.metrics_listen == "off" { None } else { Some(a.metrics_listen.parse()?) },
    };
    let shutdown = telemetry::shutdown_signal();
    target_agent::run(cfg, shutdown).await?;
    Ok(())
}
