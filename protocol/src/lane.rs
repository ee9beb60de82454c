//! The fault lane: a thread of its own, with a single-threaded tokio runtime and real-time scheduling
//! priority ([`LANE_RT_PRIORITY`]), for the QUIC endpoint that carries page-fault requests and their answers.
//!
//! Why a lane and not just a high-priority stream: during post-copy the bulk pages fill the main
//! connection's congestion window, the target's UDP receive queue and both agents' runtimes. A fault
//! answer on a stream of that connection, however high its priority, waits until the bulk data ahead of
//! it was acknowledged, queued, decrypted and read (milliseconds at a few hundred MB/s). On its own
//! connection, its own UDP sockets and its own threads at both ends, nothing is queued ahead of it.
//!
//! The runtime's tasks (the endpoint's driver, whatever [`Lane::spawn`] gets) run on the lane's thread
//! only. quinn starts a connection's driver on the runtime that calls `Endpoint::connect` (a client) or
//! that drives the endpoint (a server): connect from inside [`Lane::spawn`]. Dropping the [`Lane`] stops the runtime: its tasks are cancelled and
//! its sockets closed.

use std::future::Future;
use std::net::SocketAddr;

/// Real-time priority of a lane's thread (SCHED_FIFO, the lowest level: above every ordinary thread,
/// below the kernel's own real-time threads). With both cores busy (bulk pages, both agents, the
/// workload), a woken thread at nice 0 or even -10 often waits milliseconds for its turn; under
/// SCHED_FIFO it preempts at once.
pub const LANE_RT_PRIORITY: i32 = 1;
/// Nice value where real-time is not allowed, and of the other threads on the fault path.
pub const LANE_NICE: i32 = -10;

/// A thread running a current-thread tokio runtime.
pub struct Lane {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Lane {
    /// Starts the thread, named `name` (at most 15 bytes show in /proc), real-time where this process
    /// may ([`LANE_RT_PRIORITY`], else [`LANE_NICE`]).
    pub fn start(name: &str) -> std::io::Result<Lane> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new().name(name.into()).spawn(move || {
            realtime();
            // Until the Lane is dropped; its tasks are cancelled with the runtime.
            let _ = rt.block_on(stopped);
        })?;
        Ok(Lane { handle, stop: Some(stop) })
    }

    /// A QUIC server endpoint on `addr`, driven by the lane.
    pub fn server(&self, config: quinn::ServerConfig, addr: SocketAddr) -> std::io::Result<quinn::Endpoint> {
        let _in_lane = self.handle.enter();
        crate::endpoint::server(config, addr)
    }

    /// A QUIC client endpoint on an ephemeral port of the same address family as `peer`, driven by the lane.
    pub fn client(&self, peer: SocketAddr) -> std::io::Result<quinn::Endpoint> {
        let _in_lane = self.handle.enter();
        crate::endpoint::client(peer)
    }

    /// Runs `f` on the lane.
    pub fn spawn<F>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(f)
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Puts the calling thread (a lane's) under SCHED_FIFO at [`LANE_RT_PRIORITY`], so that it runs the
/// moment a fault request or answer wakes it, ahead of every ordinary thread; where this process may
/// not (no CAP_SYS_NICE), at nice [`LANE_NICE`] instead, and where not even that, as it is.
///
/// A lane only runs when a fault request or answer is there, for microseconds each, and the kernel's
/// real-time throttling (`kernel.sched_rt_runtime_us`) keeps any real-time thread from taking a whole
/// core.
fn realtime() {
    let param = libc::sched_param { sched_priority: LANE_RT_PRIORITY };
    // SAFETY: `param` is a valid sched_param that outlives the call; pid 0 is the calling thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0 {
        return;
    }
    tracing::debug!("fault lane not real-time: {}", std::io::Error::last_os_error());
    raise_priority();
}

/// Lowers the calling thread's nice value to [`LANE_NICE`]; without the privilege, logs why and goes on.
/// For threads on the fault path that also do bulk work (the target's lazy-pages daemon).
pub fn raise_priority() {
    let tid = nix::unistd::gettid().as_raw();
    // SAFETY: setpriority only reads its integer arguments; PRIO_PROCESS with a thread id sets that
    // thread's nice value on Linux.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, LANE_NICE) };
    if r != 0 {
        tracing::debug!("thread stays at normal priority: {}", std::io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_the_lane_thread_and_stop_with_it() {
        let lane = Lane::start("test-lane").unwrap();
        let name =
            futures::executor::block_on(lane.spawn(async { std::thread::current().name().map(String::from) })).unwrap();
        assert_eq!(name.as_deref(), Some("test-lane"));
        let forever = lane.spawn(std::future::pending::<()>());
        drop(lane);
        let err = futures::executor::block_on(forever).unwrap_err();
        assert!(err.is_cancelled(), "{err}");
    }
}
