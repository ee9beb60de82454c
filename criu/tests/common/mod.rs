//! What the CRIU integration tests share: finding CRIU (failing, never skipping, without it) and a
//! bounded wait.

use std::time::{Duration, Instant};

use criu::Criu;

/// CRIU, or a panic saying what is missing: these tests dump real processes and must run as root.
pub fn require_criu() -> Criu {
    assert!(nix::unistd::geteuid().is_root(), "these tests dump processes with CRIU and must run as root");
    let criu = Criu::find().unwrap_or_else(|e| panic!("these tests need CRIU: {e}"));
    // Else a lazy dump now and then leaves no page lazy and the cases that check it fail at random.
    assert_eq!(criu.stack_bug(), None, "these tests need CRIU with the fixes of deploy/install.sh");
    criu
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
