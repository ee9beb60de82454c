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
use std::os::fd::AsRawFd;
use std::sync::Arc;

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
    grow(&s, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, "net.core.rmem_max");
    grow(&s, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, "net.core.wmem_max");
    Ok(s)
}

/// Sets one buffer to SOCKET_BUFFER, forced past the sysctl limit where allowed.
fn grow(s: &UdpSocket, force: libc::c_int, plain: libc::c_int, sysctl: &str) {
    let want = SOCKET_BUFFER as libc::c_int;
    if setsockopt(s, force, want).is_ok() {
        return;
    }
    let _ = setsockopt(s, plain, want);
    // The kernel reports twice what it granted (bookkeeping overhead).
    let got = getsockopt(s, plain).unwrap_or(0) as usize / 2;
    if got < SOCKET_BUFFER {
        tracing::warn!(
            "UDP socket buffer is {} KiB, not {} KiB: a fast migration may lose datagrams and slow down; \
             run the agent as root or raise {sysctl} (sysctl -w {sysctl}={SOCKET_BUFFER})",
            got >> 10,
            SOCKET_BUFFER >> 10
        );
    }
}

fn setsockopt(s: &UdpSocket, opt: libc::c_int, value: libc::c_int) -> std::io::Result<()> {
    // SAFETY: a socket fd we own, an int option and the int's size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

fn getsockopt(s: &UdpSocket, opt: libc::c_int) -> std::io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a socket fd we own, an int to write into and its size.
    let r = unsafe {
        libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, opt, (&mut value as *mut libc::c_int).cast(), &mut len)
    };
    if r == 0 { Ok(value) } else { Err(std::io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_get_big_buffers_when_root() {
        let s = socket("127.0.0.1:0".parse().unwrap()).unwrap();
        let rcv = getsockopt(&s, libc::SO_RCVBUF).unwrap() as usize / 2;
        let snd = getsockopt(&s, libc::SO_SNDBUF).unwrap() as usize / 2;
        assert!(nix::unistd::geteuid().is_root(), "this test needs root (SO_RCVBUFFORCE), as the agents have");
        assert_eq!((rcv, snd), (SOCKET_BUFFER, SOCKET_BUFFER));
    }
}
