//! QUIC endpoints whose UDP sockets have buffers sized for a migration's bulk pages.
//!
//! A kernel's default UDP receive buffer (`net.core.rmem_default`, 208 KiB) holds about a millisecond of
//! a fast link. When the receiving agent is not scheduled for longer than that (two agents and the
//! workload share the cores), datagrams are dropped (`RcvbufErrors` in /proc/net/snmp), and QUIC's
//! congestion control takes every drop for congestion: measured on the 2-core testbed, about 1 % of a
//! post-copy's datagrams were dropped and the pages stream ran at a fraction of the link. Both ends
//! therefore ask for [`SOCKET_BUFFER`]: with `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE` when the agent has
//! CAP_NET_ADMIN (it runs as root), else as much as `net.core.rmem_max`/`wmem_max` allow, with a warning
//! naming the sysctl to raise.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

use nix::sys::socket::{GetSockOpt, SetSockOpt, getsockopt, setsockopt, sockopt};

/// The largest UDP payload path MTU discovery probes for (see [`crate::tls::transport`]), and the
/// largest this endpoint accepts (its `max_udp_payload_size`).
///
/// Each QUIC packet costs a fixed amount of CPU (a share of a syscall, AEAD setup, bookkeeping) on both
/// agents, so on a LAN with jumbo frames (MTU 9000) fewer, bigger packets carry the same pages, and a
/// fault answer fits in one. Not the whole jumbo frame: quinn sends up to 10 packets in one GSO
/// `sendmsg`, whose total must stay under UDP's 64 KiB, and the kernel refuses a bigger one with
/// EMSGSIZE, which quinn takes for a lost MTU probe (measured: a 8952-byte bound lost every tenth
/// batch, and black-hole detection fell back to 1200 bytes). 10 x 6500 fits. On a 1500-byte path
/// discovery stops at 1472 bytes, as before.
pub const MAX_UDP_PAYLOAD: u16 = 6500;

/// Receive and send buffer asked for on every agent socket: about 20 ms of a 1.7 GB/s link.
pub const SOCKET_BUFFER: usize = 32 << 20;

/// A QUIC server endpoint on `addr`. Must be called inside the tokio runtime that is to drive it.
pub fn server(config: quinn::ServerConfig, addr: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::new(endpoint_config(), Some(config), socket(addr)?, Arc::new(quinn::TokioRuntime))
}

/// A QUIC client endpoint on an ephemeral port of `peer`'s address family (IPv6 sockets are dual-stack).
/// Must be called inside the tokio runtime that is to drive it.
pub fn client(peer: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let any: SocketAddr = match peer {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    quinn::Endpoint::new(endpoint_config(), None, socket(any)?, Arc::new(quinn::TokioRuntime))
}

fn endpoint_config() -> quinn::EndpointConfig {
    let mut c = quinn::EndpointConfig::default();
    c.max_udp_payload_size(MAX_UDP_PAYLOAD).expect("within QUIC's limits");
    c
}

fn socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = UdpSocket::bind(addr)?;
    grow(&s, sockopt::RcvBufForce, sockopt::RcvBuf, "net.core.rmem_max");
    grow(&s, sockopt::SndBufForce, sockopt::SndBuf, "net.core.wmem_max");
    Ok(s)
}

/// Sets one buffer to SOCKET_BUFFER, forced past the sysctl limit where allowed.
fn grow<F, P>(s: &UdpSocket, force: F, plain: P, sysctl: &str)
where
    F: SetSockOpt<Val = usize>,
    P: SetSockOpt<Val = usize> + GetSockOpt<Val = usize>,
{
    if setsockopt(s, force, &SOCKET_BUFFER).is_ok() {
        return;
    }
    let _ = setsockopt(s, plain, &SOCKET_BUFFER);
    // The kernel reports twice what it granted (bookkeeping overhead).
    let got = getsockopt(s, plain).unwrap_or(0) / 2;
    if got < SOCKET_BUFFER {
        tracing::warn!(
            "UDP socket buffer is {} KiB, not {} KiB: a fast migration may lose datagrams and slow down; \
             run the agent as root or raise {sysctl} (sysctl -w {sysctl}={SOCKET_BUFFER})",
            got >> 10,
            SOCKET_BUFFER >> 10
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_get_big_buffers_when_root() {
        let s = socket("127.0.0.1:0".parse().unwrap()).unwrap();
        let rcv = getsockopt(&s, sockopt::RcvBuf).unwrap() / 2;
        let snd = getsockopt(&s, sockopt::SndBuf).unwrap() / 2;
        assert!(nix::unistd::geteuid().is_root(), "this test needs root (SO_RCVBUFFORCE), as the agents have");
        assert_eq!((rcv, snd), (SOCKET_BUFFER, SOCKET_BUFFER));
    }
}
