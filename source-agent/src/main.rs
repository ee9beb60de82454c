//! `source-agent`: gives process trees away on request of the `migrate` command. See the crate docs.

use std::path::PathBuf;

use clap::Parser;
use protocol::tls::TlsFiles;

/// Checkpoints process trees with CRIU and streams them to target agents over QUIC (mutual TLS).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Unix socket for the `migrate` command.
    #[arg(long, default_value = source_agent::control::DEFAULT_SOCKET)]
    control_socket: PathBuf,
    /// Directory with ca.pem, HOST.pem and HOST.key (deploy/certs.sh).
    #[arg(long, default_value = "/etc/migrate/tls")]
    tls_dir: PathBuf,
    /// Name of this host's certificate in --tls-dir.
    #[arg(long)]
    host: String,
    /// Work directory for dumps; put it on tmpfs (the dump is written there while the process is frozen).
    #[arg(long, default_value = "/run/migrate/source")]
    state_dir: PathBuf,
    /// Local HTTP address for /metrics (Prometheus text) and /status (JSON); "off" to disable.
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics_listen: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init_logging();
    let a = Args::parse();
    let cfg = source_agent::Config {
        control_socket: a.control_socket,
        tls: TlsFiles::in_dir(&a.tls_dir, &a.host),
        name: a.host.clone(),
        state_dir: a.state_dir,
        metrics_listen: if a.metrics_listen == "off" { None } else { Some(a.metrics_listen.parse()?) },
    };
    let shutdown = telemetry::shutdown_signal();
    source_agent::run(cfg, shutdown).await?;
    Ok(())
}
