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
    /// Config file (TOML): `unix = ["MATCH=POLICY", ...]` and `tty = [...]`, the policies for the
    /// connections of migrated trees to the outside (see `migrate --help`). Read when it exists.
    #[arg(long, default_value = "/etc/migrate/source-agent.toml")]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init_logging();
    let a = Args::parse();
    let rules = if a.config.exists() {
        source_agent::external::Rules::from_config(&a.config).map_err(anyhow::Error::msg)?
    } else {
        Default::default()
    };
    let cfg = source_agent::Config {
        rules,
        control_socket: a.control_socket,
        tls: TlsFiles::in_dir(&a.tls_dir, &a.host),
        name: a.host.clone(),
        state_dir: a.state_dir,
        metrics_listen: if a.metrics_listen == "off" { None } else { Some(a.metrics_listen.parse()?) },
    };
    source_agent::run(cfg, telemetry::stop_requests()).await?;
    Ok(())
}
