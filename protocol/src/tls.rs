//! Mutual TLS between agents: both sides present a certificate signed by the fleet CA and accept only
//! peers whose certificate chains to it. TLS 1.3 only (QUIC requires it), ALPN [`crate::ALPN`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::ProtocolError;

/// Where an agent finds its TLS material (deploy/certs.sh makes these files).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The fleet CA certificate (PEM).
    pub ca: PathBuf,
    /// This host's certificate chain (PEM).
    pub cert: PathBuf,
    /// This host's private key (PEM).
    pub key: PathBuf,
}

impl TlsFiles {
    /// The usual layout: `DIR/ca.pem`, `DIR/HOST.pem`, `DIR/HOST.key`.
    pub fn in_dir(dir: &Path, host: &str) -> Self {
        TlsFiles { ca: dir.join("ca.pem"), cert: dir.join(format!("{host}.pem")), key: dir.join(format!("{host}.key")) }
    }
}

/// The leaf certificate (DER) that the peer of `conn` presented in the handshake: who it is, beyond
/// being of the fleet. None before the handshake completed.
pub fn peer_certificate(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let chain = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().map(|c| c.as_ref().to_vec())
}

fn tls_err(what: String) -> ProtocolError {
    ProtocolError::Tls(what)
}

fn load(
    files: &TlsFiles,
) -> Result<(RootCertStore, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ProtocolError> {
    let hint = "make them with deploy/certs.sh";
    let mut roots = RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(&files.ca)
        .map_err(|e| tls_err(format!("fleet CA {}: {e}; {hint}", files.ca.display())))?;
    for ca in cas {
        let ca = ca.map_err(|e| tls_err(format!("fleet CA {}: {e}", files.ca.display())))?;
        roots.add(ca).map_err(|e| tls_err(format!("fleet CA {}: {e}", files.ca.display())))?;
    }
    if roots.is_empty() {
        return Err(tls_err(format!("fleet CA {} holds no certificate", files.ca.display())));
    }
    let chain: Vec<_> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| tls_err(format!("certificate {}: {e}; {hint}", files.cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls_err(format!("certificate {}: {e}", files.cert.display())))?;
    if chain.is_empty() {
        return Err(tls_err(format!("certificate {} holds no certificate", files.cert.display())));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| tls_err(format!("private key {}: {e}; {hint}", files.key.display())))?;
    Ok((roots, chain, key))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The target agent's idle timeout: the longest link outage any migration can ride out. A source asks
/// for its own (the migration's grace, [`transport`]) and QUIC takes the shorter of the two.
pub const MAX_IDLE: Duration = Duration::from_secs(60);
/// Keep-alive interval: an idle connection still hears from its peer this often, so the idle timeout
/// measures how long the link has been silent, give or take this.
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);

/// Flow-control windows sized for a fast local link (image files are large and several stream at
/// once), and the idle timeout: a link silent for `idle` ends the connection; a shorter outage is
/// ridden out by QUIC's loss recovery, with nothing lost.
pub fn transport(idle: Duration) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(idle.min(MAX_IDLE).try_into().expect("at most 60 s fits")));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.stream_receive_window(quinn::VarInt::from_u32(16 << 20));
    t.receive_window(quinn::VarInt::from_u32(64 << 20));
    t.send_window(64 << 20);
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(256));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(8));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(crate::endpoint::MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

/// Server side (target agent): requires a client certificate from the fleet CA.
pub fn server_config(files: &TlsFiles) -> Result<quinn::ServerConfig, ProtocolError> {
    let (roots, chain, key) = load(files)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| tls_err(format!("client verifier: {e}")))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| tls_err(format!("certificate {} / key {}: {e}", files.cert.display(), files.key.display())))?;
    cfg.alpn_protocols = vec![crate::ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(cfg).map_err(|e| tls_err(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(transport(MAX_IDLE));
    Ok(server)
}

/// Client side (source agent): verifies the target's certificate against the fleet CA and the name
/// dialled, and presents its own.
pub fn client_config(files: &TlsFiles) -> Result<quinn::ClientConfig, ProtocolError> {
    let (roots, chain, key) = load(files)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| tls_err(format!("certificate {} / key {}: {e}", files.cert.display(), files.key.display())))?;
    cfg.alpn_protocols = vec![crate::ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(cfg).map_err(|e| tls_err(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(transport(Duration::from_secs(20)));
    Ok(client)
}
