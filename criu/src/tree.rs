//! The process tree CRIU dumps and restores, seen through procfs: which processes belong to it, and the
//! two signals the agents send it (SIGCONT to resume a tree CRIU left stopped, SIGKILL to drop a copy).

use std::io;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// State letter of `pid` from /proc/PID/stat (R, S, D, T, t, Z, X, ...), or None if there is no such
/// process in this pid namespace.
pub fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm is in parentheses and may itself contain ") "; the state follows the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    after.trim_start().chars().next()
}

/// True when `pid` exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    matches!(state(pid), Some(s) if s != 'Z' && s != 'X')
}

/// Command name of `pid` (`/proc/PID/comm`), or "?".
pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).map(|s| s.trim().to_string()).unwrap_or_else(|_| "?".into())
}

/// `pid` and all its descendants (processes, not threads), parents before children.
pub fn processes(root: u32) -> io::Result<Vec<u32>> {
    if state(root).is_none() {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("no process {root}")));
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let pid = out[i];
        i += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(children) = std::fs::read_to_string(task.path().join("children")) else {
                continue;
            };
            for child in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
                if !out.contains(&child) {
                    out.push(child);
                }
            }
        }
    }
    Ok(out)
}

fn signal_all(pids: &[u32], sig: Signal) -> Vec<(u32, nix::Error)> {
    pids.iter()
        .filter_map(|&p| match kill(Pid::from_raw(p as i32), sig) {
            Ok(()) | Err(nix::Error::ESRCH) => None,
            Err(e) => Some((p, e)),
        })
        .collect()
}

/// Resumes a tree that CRIU left stopped (`--leave-stopped`). Processes that are gone are skipped.
pub fn resume(pids: &[u32]) -> io::Result<()> {
    match signal_all(pids, Signal::SIGCONT).first() {
        None => Ok(()),
        Some((p, e)) => Err(io::Error::other(format!("SIGCONT to {p}: {e}"))),
    }
}

/// Kills every process of a tree. Processes that are gone are skipped.
pub fn kill_all(pids: &[u32]) -> io::Result<()> {
    match signal_all(pids, Signal::SIGKILL).first() {
        None => Ok(()),
        Some((p, e)) => Err(io::Error::other(format!("SIGKILL to {p}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_and_children() {
        let me = std::process::id();
        assert!(is_alive(me));
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pids = processes(me).unwrap();
        assert_eq!(pids[0], me);
        assert!(pids.contains(&child.id()), "{pids:?}");
        assert_eq!(comm(child.id()), "sleep");
        kill_all(&[child.id()]).unwrap();
        child.wait().unwrap();
        assert!(!is_alive(child.id()));
        assert!(processes(u32::MAX / 2).is_err());
    }
}
