//! What the CRIU integration tests share: finding CRIU (failing, never skipping, without it) and a
//! bounded wait.

use std::time::{Duration, Instant};

use criu::Criu;

/// CRIU, or a panic saying what is missing: these tests dump real processes and must run as root.
pub fn require_criu() -> Criu {
    assert!(nix::unistd::geteuid().is_root(), "these tests dump processes with CRIU and must run as root");
    Criu::find().unwrap_or_else(|e| panic!("these tests need CRIU: {e}"))
}

/// Polls `f` every 20 ms until it gives Some, at most `within`.
pub fn wait_for<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < until, "timed out after {within:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
