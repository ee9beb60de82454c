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
    let w = Watchdog::arm(Path::new(AGENT)).expect("arm");
    let mut a = copy();
    w.settle(&[a.id()]).expect("settle");
    w.release();
    assert!(criu::tree::is_alive(a.id()), "a released watchdog killed the copy");
    let w = Watchdog::arm(Path::new(AGENT)).expect("arm");
    let mut b = copy();
    w.settle(&[b.id()]).expect("settle");
    drop(w);
    let st = ended(&mut b).expect("a dropped watchdog left the copy running");
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    a.kill().expect("kill");
    a.wait().expect("wait");
}

/// A `sleep` standing in for the restore's CRIU, named to the watchdog as the agent has CRIU do it
/// (between fork and exec, [`Watchdog::announce`]).
fn restorer(w: &Watchdog) -> Child {
    let (fd, tag) = w.announce().expect("announce");
    let mut cmd = Command::new("sleep");
    cmd.arg("30");
    // SAFETY: getpid and write are async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            let m = target_agent::watchdog::message(tag, libc::getpid() as u32);
            match libc::write(fd, m.as_ptr().cast(), m.len()) {
                5 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
    cmd.spawn().expect("stand-in criu")
}

/// Fired while the restore's CRIU runs (the agent died during `criu restore`), the watchdog kills the
/// process on an expected pid that is younger than that CRIU (one it made), spares one older than it
/// (not CRIU's: it is why such a restore fails), and goes on until CRIU is gone, as CRIU may still be
/// making processes.
#[test]
fn fired_during_the_restore_it_kills_what_criu_made_until_criu_is_gone() {
    let w = Watchdog::arm(Path::new(AGENT)).expect("arm");
    let mut old = copy();
    // /proc's start times count in clock ticks (10 ms).
    std::thread::sleep(Duration::from_millis(50));
    let mut restorer = restorer(&w);
    let mut young = copy();
    w.expect(&[old.id(), young.id()]).expect("expect");
    let fired = std::thread::spawn(move || drop(w));
    let st = ended(&mut young).expect("what CRIU made outlived a fired watchdog");
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
    assert!(old.try_wait().expect("try_wait").is_none(), "the watchdog killed a process older than CRIU");
    old.kill().expect("kill");
    old.wait().expect("wait");
}

/// Once CRIU has returned the expected pids are forgotten: after a failed restore (nothing restored),
/// a process that took one of them since is not the copy's.
#[test]
fn settled_it_forgets_the_pids_expected() {
    let w = Watchdog::arm(Path::new(AGENT)).expect("arm");
    let mut restorer = restorer(&w);
    // The watchdog has read CRIU's name before CRIU is gone.
    std::thread::sleep(Duration::from_millis(100));
    let mut later = copy();
    w.expect(&[later.id()]).expect("expect");
    restorer.kill().expect("kill the stand-in criu");
    restorer.wait().expect("wait");
    w.settle(&[]).expect("settle");
    drop(w);
    assert!(later.try_wait().expect("try_wait").is_none(), "the watchdog killed a pid it had been told to forget");
    later.kill().expect("kill");
    later.wait().expect("wait");
}

/// A process of the copy goes with its descendants (children the copy forked while it ran).
#[test]
fn a_guarded_process_goes_with_its_children() {
    let w = Watchdog::arm(Path::new(AGENT)).expect("arm");
    let mut parent = Command::new("sh").args(["-c", "sleep 30 & wait"]).spawn().expect("sh");
    let deadline = Instant::now() + Duration::from_secs(10);
    let child = loop {
        let tree = criu::tree::processes(parent.id()).expect("tree");
        if let Some(&c) = tree.get(1) {
            break c;
        }
        assert!(Instant::now() < deadline, "sh started no child");
        std::thread::sleep(Duration::from_millis(10));
    };
    w.settle(&[parent.id()]).expect("settle");
    drop(w);
    assert_eq!(ended(&mut parent).expect("the copy outlived a dropped watchdog").signal(), Some(libc::SIGKILL));
    let deadline = Instant::now() + Duration::from_secs(10);
    while criu::tree::is_alive(child) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!criu::tree::is_alive(child), "the copy's child outlived a dropped watchdog");
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
        .arg(CHILD_ARG)
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
    // (A process named to it is then held as a pidfd of its own.)
    nix::unistd::write(&write, &target_agent::watchdog::message(GUARD, copy.id())).expect("guard");
    nix::unistd::write(&write, &target_agent::watchdog::message(target_agent::watchdog::RELEASE, 0)).expect("release");
    assert!(ended(&mut watchdog).expect("a released watchdog stays").success());
    assert!(criu::tree::is_alive(copy.id()), "a released watchdog killed the copy");
    copy.kill().expect("kill");
    copy.wait().expect("wait");
}
