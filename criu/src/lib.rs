//! Talking to CRIU, for both agents. This crate owns:
//! - finding the `criu` binary and checking it is new enough ([`Criu::find`]);
//! - every `criu dump` and `criu restore` command line, one option per line with its reason
//!   ([`Criu::dump`], [`Criu::restore`]), and failures that carry the command, the exit status and the
//!   `Error` lines of CRIU's log ([`CriuError`]);
//! - the process tree CRIU works on: enumerate, resume, kill ([`tree`]);
//! - reading the image files the agents need (pagemaps: which pages are lazy) ([`images`]).
//!
//! It does not decide when to dump or restore, nor move images: the agents do.

pub mod images;
pub mod tree;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

/// Oldest CRIU accepted: 3.17 (Debian bookworm) fails on kernels of 2025 and later with a vDSO error.
pub const MIN_VERSION: (u32, u32) = (4, 1);

/// CRIU's log level: warnings and errors (every `Error (file:line)` line [`log_errors`] reports).
/// `-v4` would log each memory area and costs about 0.2 s per GiB restored (measured on the testbed),
/// all of it downtime.
const LOG_LEVEL: &str = "-v2";

/// Errors from running CRIU.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error(
        "CRIU was not found (looked at $CRIU_BIN, PATH, /usr/local/sbin/criu, /usr/sbin/criu); install CRIU >= 4.1 with deploy/install.sh"
    )]
    NotFound,
    #[error("{bin} is CRIU {version}, older than 4.1; install a newer one with deploy/install.sh")]
    TooOld { bin: PathBuf, version: String },
    #[error("could not run {bin}: {source}")]
    Spawn { bin: PathBuf, source: std::io::Error },
    #[error("criu {op} failed ({status}): {errors} (command: {command}; full log: {log})", log = .log.display())]
    Failed { op: &'static str, command: String, status: String, errors: String, log: PathBuf },
    #[error("criu {op} succeeded but {what}")]
    Unexpected { op: &'static str, what: String },
}

/// A CRIU binary that was found and checked.
#[derive(Debug, Clone)]
pub struct Criu {
    pub bin: PathBuf,
    /// e.g. "4.2.1"
    pub version: String,
}

/// What to dump.
#[derive(Debug, Clone)]
pub struct DumpRequest {
    /// Root of the tree.
    pub pid: u32,
    /// Directory for the images and `dump.log` (must exist).
    pub images_dir: PathBuf,
}

/// What to restore.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    /// Directory holding the images; `restore.log` and `restore.pid` are written there.
    pub images_dir: PathBuf,
}

/// Timing of one CRIU run.
#[derive(Debug, Clone, Copy)]
pub struct Ran {
    pub elapsed: Duration,
}

impl Criu {
    /// Finds CRIU: `$CRIU_BIN`, then `criu` on PATH, then the places deploy/install.sh and Debian use.
    pub fn find() -> Result<Criu, CriuError> {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(p) = std::env::var_os("CRIU_BIN") {
            candidates.push(p.into());
        }
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path).map(|d| d.join("criu")));
        }
        candidates.push("/usr/local/sbin/criu".into());
        candidates.push("/usr/sbin/criu".into());
        let bin = candidates.into_iter().find(|p| p.is_file()).ok_or(CriuError::NotFound)?;
        let out = std::process::Command::new(&bin)
            .arg("--version")
            .output()
            .map_err(|source| CriuError::Spawn { bin: bin.clone(), source })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version =
            text.lines().find_map(|l| l.strip_prefix("Version:")).map(|v| v.trim().to_string()).unwrap_or_default();
        let parsed = parse_version(&version);
        match parsed {
            Some(v) if v >= MIN_VERSION => Ok(Criu { bin, version }),
            _ => Err(CriuError::TooOld { bin, version }),
        }
    }

    /// `criu dump` of the tree rooted at `req.pid`, leaving it **stopped** on success so that the caller
    /// decides: kill it once the target runs the copy (commit), or SIGCONT it (rollback). On failure CRIU
    /// itself resumes the tree.
    pub async fn dump(&self, req: &DumpRequest) -> Result<Ran, CriuError> {
        let pid = req.pid.to_string();
        let args: Vec<&std::ffi::OsStr> = vec![
            "dump".as_ref(),
            "--tree".as_ref(),
            pid.as_ref(),
            "--images-dir".as_ref(),
            req.images_dir.as_os_str(),
            // Keep the original stopped, not killed: it is the rollback until the target confirms.
            "--leave-stopped".as_ref(),
            // Log into the images dir (relative to the work dir, which defaults to -D).
            "--log-file".as_ref(),
            "dump.log".as_ref(),
            LOG_LEVEL.as_ref(),
        ];
        self.run("dump", &args, &req.images_dir.join("dump.log")).await
    }

    /// `criu restore` of the images in `req.images_dir`, leaving the tree **stopped**: it is resumed only
    /// when the source has given up its original (see [`tree::resume`]). Returns the root pid.
    pub async fn restore(&self, req: &RestoreRequest) -> Result<(u32, Ran), CriuError> {
        let pidfile = req.images_dir.join("restore.pid");
        let _ = std::fs::remove_file(&pidfile);
        let args: Vec<&std::ffi::OsStr> = vec![
            "restore".as_ref(),
            "--images-dir".as_ref(),
            req.images_dir.as_os_str(),
            // Detach: CRIU exits once the tree is restored; the tree is reparented to this namespace's
            // init (or a subreaper), not left as CRIU's children.
            "--restore-detached".as_ref(),
            // Stopped until commit, so that at no instant do two copies run.
            "--leave-stopped".as_ref(),
            // Relative to the work dir (= images dir): the real pid of the restored root.
            "--pidfile".as_ref(),
            "restore.pid".as_ref(),
            "--log-file".as_ref(),
            "restore.log".as_ref(),
            LOG_LEVEL.as_ref(),
        ];
        let ran = self.run("restore", &args, &req.images_dir.join("restore.log")).await?;
        let text = std::fs::read_to_string(&pidfile).map_err(|e| CriuError::Unexpected {
            op: "restore",
            what: format!("its pidfile {} is unreadable: {e}", pidfile.display()),
        })?;
        let pid = text.trim().parse::<u32>().map_err(|_| CriuError::Unexpected {
            op: "restore",
            what: format!("its pidfile {} holds {text:?}", pidfile.display()),
        })?;
        Ok((pid, ran))
    }

    async fn run(&self, op: &'static str, args: &[&std::ffi::OsStr], log: &Path) -> Result<Ran, CriuError> {
        let command = std::iter::once(self.bin.as_os_str())
            .chain(args.iter().copied())
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        tracing::debug!(%command, "running criu");
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            // Never kill CRIU in the middle of a dump or restore: that can leave the tree half-infected.
            .kill_on_drop(false);
        // SAFETY: the closure only calls async-signal-safe functions (getrlimit/setrlimit) between fork
        // and exec.
        unsafe {
            cmd.pre_exec(|| {
                raise_nofile_soft_limit();
                Ok(())
            });
        }
        let start = Instant::now();
        let out = cmd.output().await.map_err(|source| CriuError::Spawn { bin: self.bin.clone(), source })?;
        let elapsed = start.elapsed();
        if out.status.success() {
            tracing::debug!(op, ?elapsed, "criu finished");
            return Ok(Ran { elapsed });
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut errors = log_errors(log);
        if errors.is_empty() {
            errors = stderr.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" / ");
        }
        Err(CriuError::Failed { op, command, status: describe_status(out.status), errors, log: log.to_owned() })
    }
}

/// CRIU keeps its service fds just below its soft RLIMIT_NOFILE and raises it itself only with
/// CAP_SYS_RESOURCE; give it the hard limit up front.
fn raise_nofile_soft_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit write/read a valid, owned rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn parse_version(v: &str) -> Option<(u32, u32)> {
    let mut it = v.split('.');
    Some((it.next()?.parse().ok()?, it.next().unwrap_or("0").parse().ok()?))
}

fn describe_status(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (_, Some(sig)) => format!("killed by signal {sig}"),
        _ => s.to_string(),
    }
}

/// The `Error` lines of a CRIU log, minus the RLIMIT_NOFILE one CRIU logs on every run without
/// CAP_SYS_RESOURCE (harmless), joined with " / ". At most the last 6, each trimmed of its timestamp.
pub fn log_errors(log: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(log) else {
        return String::new();
    };
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error (") && !l.contains("RLIMIT_NOFILE"))
        .map(|l| match l.find("Error (") {
            Some(i) => l[i..].trim(),
            None => l.trim(),
        })
        .collect();
    let start = lines.len().saturating_sub(6);
    lines[start..].join(" / ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_errors_skip_the_rlimit_noise() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("restore.log");
        std::fs::write(
            &log,
            "(00.000) Error (criu/util.c:123): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n\
             (00.010) info\n\
             (00.020)    42: Error (criu/files-reg.c:2200): Can't open file tmp/x on restore: No such file or directory\n",
        )
        .unwrap();
        let e = log_errors(&log);
        assert_eq!(e, "Error (criu/files-reg.c:2200): Can't open file tmp/x on restore: No such file or directory");
    }

    #[test]
    fn versions() {
        assert_eq!(parse_version("4.2.1"), Some((4, 2)));
        assert!(parse_version("3.17").unwrap() < MIN_VERSION);
    }
}
