//! The watchdog (target_agent::watchdog) as it runs: this package's `target-agent` executable started
//! with its watchdog argument, guarding `sleep` processes that stand in for a restored copy.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use target_agent::watchdog::{CHILD_ARG, Watchdog};

const AGENT: &str = env!("CARGO_BIN_EXE_target-agent");

fn copy() -> Child {
    Command::new("sleep").arg("30").spawn().expect("sleep")
}

/// Waits (at most 10 s) for `child` to end; its status, None if it still runs.
fn ended(child: &mut Child) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

#[test]
fn released_spares_the_copy_and_dropped_kills_it() {
    let (mut a, mut b) = (copy(), copy());
    Watchdog::arm(Path::new(AGENT), &[a.id()]).expect("arm").release();
    assert!(criu::tree::is_alive(a.id()), "a released watchdog killed the copy");
    drop(Watchdog::arm(Path::new(AGENT), &[b.id()]).expect("arm"));
    let st = ended(&mut b).expect("a dropped watchdog left the copy running");
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    a.kill().expect("kill");
    a.wait().expect("wait");
}

/// The agent dying is the watchdog's reason to be: the only holder of the pipe's write end (a stand-in
/// for the agent) is SIGKILLed, and the copy with it; a SIGTERM to the watchdog before does not end it.
#[test]
fn the_agent_dying_kills_the_copy() {
    let mut copy = copy();
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    let mut watchdog = Command::new(AGENT)
        .args([CHILD_ARG.to_string(), copy.id().to_string()])
        .stdin(Stdio::from(read))
        .spawn()
        .expect("watchdog");
    let mut agent = Command::new("sleep").arg("30").stdout(Stdio::from(write)).spawn().expect("stand-in agent");
    std::thread::sleep(Duration::from_millis(300));
    assert!(criu::tree::is_alive(copy.id()), "the watchdog killed the copy while the agent lived");
    // Stopping the whole service signals the watchdog too: it stays until the agent is gone.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(watchdog.id() as i32), nix::sys::signal::Signal::SIGTERM)
        .expect("SIGTERM");
    std::thread::sleep(Duration::from_millis(200));
    assert!(watchdog.try_wait().expect("try_wait").is_none(), "SIGTERM ended the watchdog");
    agent.kill().expect("kill the stand-in agent");
    agent.wait().expect("wait");
    let st = ended(&mut copy).expect("the copy outlived its agent");
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    assert!(ended(&mut watchdog).expect("the watchdog stays").success());
}

/// The watchdog keeps nothing of what it inherited but its stdin: an agent's userfaultfd or socket left
/// open in there would outlive the agent.
#[test]
fn the_watchdog_closes_every_inherited_fd() {
    let mut copy = copy();
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    // Not close-on-exec: the watchdog inherits it.
    let (leak, _leak_w): (OwnedFd, OwnedFd) = nix::unistd::pipe().expect("pipe");
    let mut watchdog = Command::new(AGENT)
        .args([CHILD_ARG.to_string(), copy.id().to_string()])
        .stdin(Stdio::from(read))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("watchdog");
    let fds = |pid: u32| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned())).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    let leaked = leak.as_raw_fd().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    while fds(watchdog.id()).contains(&leaked) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(fds(watchdog.id()), ["0", "1", "2"], "fds left open in the watchdog");
    nix::unistd::write(&write, &[1]).expect("release");
    assert!(ended(&mut watchdog).expect("a released watchdog stays").success());
    assert!(criu::tree::is_alive(copy.id()), "a released watchdog killed the copy");
    copy.kill().expect("kill");
    copy.wait().expect("wait");
}
