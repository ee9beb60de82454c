//! The watchdog (target_agent::watchdog) as it runs: this package's `target-agent` executable started
//! with its watchdog argument, guarding `sleep` processes that stand in for a restored copy.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use target_agent::watchdog::{CHILD_ARG, GUARD, Watchdog};

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
    let w = Watchdog::arm(Path::new(AGENT), &[]).expect("arm");
    let mut a = copy();
    w.guard(&[a.id()]).expect("guard");
    w.release();
    assert!(criu::tree::is_alive(a.id()), "a released watchdog killed the copy");
    let w = Watchdog::arm(Path::new(AGENT), &[]).expect("arm");
    let mut b = copy();
    w.guard(&[b.id()]).expect("guard");
    drop(w);
    let st = ended(&mut b).expect("a dropped watchdog left the copy running");
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    a.kill().expect("kill");
    a.wait().expect("wait");
}

/// A pid named to the watchdog that a process older than the watchdog holds is not the copy's (CRIU
/// could not have restored it there): a fired watchdog spares that process, and kills the young one.
#[test]
fn an_older_process_on_a_named_pid_is_spared() {
    let mut old = copy();
    // /proc's start times count in clock ticks (10 ms).
    std::thread::sleep(Duration::from_millis(50));
    let w = Watchdog::arm(Path::new(AGENT), &[old.id()]).expect("arm");
    let mut young = copy();
    w.guard(&[young.id()]).expect("guard");
    drop(w);
    let st = ended(&mut young).expect("the copy outlived a dropped watchdog");
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    assert!(old.try_wait().expect("try_wait").is_none(), "the watchdog killed a process older than itself");
    old.kill().expect("kill");
    old.wait().expect("wait");
}

/// Fired while the restore's CRIU runs (the agent died during `criu restore`), the watchdog kills the
/// copy at once and goes on until that CRIU has exited, as CRIU may still be making processes of it. A
/// `sleep` stands in for CRIU and names itself as the agent has CRIU do it (between fork and exec).
#[test]
fn a_watchdog_fired_during_the_restore_stays_until_criu_is_gone() {
    let w = Watchdog::arm(Path::new(AGENT), &[]).expect("arm");
    let mut copy = copy();
    w.guard(&[copy.id()]).expect("guard");
    let (fd, tag) = w.announce().expect("announce");
    let mut restorer = Command::new("sleep");
    restorer.arg("30");
    // SAFETY: getpid and write are async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        restorer.pre_exec(move || {
            let m = target_agent::watchdog::message(tag, libc::getpid() as u32);
            assert_eq!(libc::write(fd, m.as_ptr().cast(), m.len()), 5);
            Ok(())
        });
    }
    let mut restorer = restorer.spawn().expect("stand-in criu");
    let fired = std::thread::spawn(move || drop(w));
    let st = ended(&mut copy).expect("the copy outlived a fired watchdog");
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!fired.is_finished(), "the watchdog ended while the restore's CRIU still ran");
    assert!(restorer.try_wait().expect("try_wait").is_none(), "the watchdog killed CRIU before its grace");
    restorer.kill().expect("kill the stand-in criu");
    restorer.wait().expect("wait");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fired.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(fired.is_finished(), "the watchdog stayed after the restore's CRIU had gone");
    fired.join().expect("drop");
}

/// The agent dying is the watchdog's reason to be: the only holder of the pipe's write end (a stand-in
/// for the agent) is SIGKILLed, and the copy with it; a SIGTERM to the watchdog before does not end it.
#[test]
fn the_agent_dying_kills_the_copy() {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    let mut watchdog =
        Command::new(AGENT).args([CHILD_ARG.to_string()]).stdin(Stdio::from(read)).spawn().expect("watchdog");
    // Younger than the watchdog, as a restored copy is.
    let mut copy = copy();
    nix::unistd::write(&write, &target_agent::watchdog::message(GUARD, copy.id())).expect("guard");
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
    nix::unistd::write(&write, &target_agent::watchdog::message(target_agent::watchdog::RELEASE, 0)).expect("release");
    assert!(ended(&mut watchdog).expect("a released watchdog stays").success());
    assert!(criu::tree::is_alive(copy.id()), "a released watchdog killed the copy");
    copy.kill().expect("kill");
    copy.wait().expect("wait");
}
