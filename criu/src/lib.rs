//! Talking to CRIU, for both agents. This crate owns:
//! - finding the `criu` binary and checking it is new enough ([`Criu::find`]), and knowing a bug of
//!   released CRIU that deploy/install.sh patches ([`Criu::stack_bug`]); having CRIU probe the kernel
//!   once, at an agent's start, so that its later runs load what it found ([`Criu::keep_kernel_probe`]);
//! - every `criu dump` and `criu restore` command line, one option per line with its reason
//!   ([`Criu::dump`], [`Criu::dump_lazy`], [`Criu::restore`]), and failures that carry the command, the
//!   exit status and the `Error` lines of CRIU's log ([`CriuError`]);
//! - the session with the lazy page server of a `criu dump --lazy-pages` ([`LazyDump`], [`PsIov`]);
//! - the process tree CRIU works on: enumerate, resume, kill ([`tree`]);
//! - reading the image files the agents need (pagemaps: which pages are lazy) ([`images`]).
//!
//! It does not decide when to dump or restore, nor move images: the agents do.

pub mod images;
pub mod tree;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Oldest CRIU accepted: 3.17 (Debian bookworm) fails on kernels of 2025 and later with a vDSO error.
pub const MIN_VERSION: (u32, u32) = (4, 1);

/// CRIU's log level: warnings and errors (every `Error (file:line)` line [`log_errors`] reports).
/// `-v4` would log each memory area and costs about 0.2 s per GiB restored (measured on the testbed),
/// all of it downtime.
const LOG_LEVEL: &str = "-v2";

/// Where CRIU keeps what it probed of the kernel between runs (criu/kerndat.c: `KDAT_RUNDIR
/// "/criu.kdat"`). It writes the file only where `statfs` says tmpfs, so that a reboot into another
/// kernel clears it.
pub const KERNEL_PROBE_CACHE: &str = "/run/criu.kdat";
/// What a run without [`KERNEL_PROBE_CACHE`] costs, for the warnings (CRIU's log, 2-core test VM).
const PROBE_COST: &str = "about 15 ms more of every restore's downtime on a 2-core VM";

/// How long `criu dump --lazy-pages` may take to write the images and start its page server. It copies no
/// private memory (0.06 s for a 64 MiB process here), so this is only reached when CRIU is stuck; what
/// happens then is written at [`Criu::dump_lazy`].
pub const LAZY_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`LazyDump::finish`] waits for CRIU's answer to CLOSE, and then for CRIU to exit (it only
/// detaches from the tree and writes its stats: milliseconds).
pub const LAZY_FINISH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long dropping a [`LazyDump`] may block to close CRIU's session (CRIU answers CLOSE at once).
const LAZY_DROP_TIMEOUT: Duration = Duration::from_secs(2);

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
    /// `errors`: CRIU's error lines, after the cause and fix where this crate knows them (a full disk).
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
    /// The `GitID:` line of `criu --version`, if any: deploy/install.sh builds CRIU with the patches in
    /// deploy/criu-patches and names the set there, `migrate-<sha256 prefix>`.
    pub gitid: Option<String>,
}

/// The `GitID` deploy/install.sh builds into CRIU: "migrate-" and the first 12 hex digits of the sha256
/// of deploy/criu-patches/*.patch in order (a unit test recomputes it).
pub const PATCHED_GITID: &str = "migrate-18343a8f6699";

/// Where a lazy dump's private memory is read from afterwards ([`Criu::dump_lazy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LazyMemory {
    /// Over CRIU's page server ([`LazyDump::page_server`]): CRIU collects every lazy page into its page
    /// pipes while the tree is frozen (vmsplice through its parasite: about 60 ms of the freeze for 2 GiB
    /// on the test VM).
    Served,
    /// From the stopped tree itself (/proc/PID/mem; the tree stays stopped until it is killed or
    /// resumed), as this project's source agent does. The CRIU deploy/install.sh builds
    /// ([`PATCHED_GITID`]) then leaves the lazy pages where they are (`--lazy-pages-in-place`,
    /// deploy/criu-patches/0002), which shortens the freeze, and its page server has none of them to
    /// serve. Any other CRIU collects them all the same, as for `Served`.
    InPlace,
}

/// What to dump.
#[derive(Debug, Clone)]
pub struct DumpRequest {
    /// Root of the tree.
    pub pid: u32,
    /// Directory for the images and `dump.log` (must exist).
    pub images_dir: PathBuf,
    /// `--external` keys: `unix[INO]` for a socket whose peer is outside the tree (dumped as is, any
    /// type; the restore must hand a socket in for it, or reconnect it), `tty[RDEV:DEV]` for a terminal
    /// of the outside (the restore must hand one in).
    pub externals: Vec<String>,
}

/// What to restore.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    /// Directory holding the images; `restore.log` and `restore.pid` are written there.
    pub images_dir: PathBuf,
    /// Restore private memory lazily (`--lazy-pages`): CRIU hands each task's userfaultfd to the
    /// lazy-pages daemon listening on `<images_dir>/lazy-pages.socket`, which must listen before the call.
    pub lazy_pages: bool,
    /// `--inherit-fd fd[N]:KEY`: (KEY, N) for each file handed in, where N is an fd of this process
    /// (CRIU inherits it under the same number). KEY is `socket:[INO]` for a unix socket dumped as
    /// `unix[INO]`, `tty[RDEV:DEV]` for an external terminal.
    pub inherit: Vec<(String, std::os::fd::RawFd)>,
    /// `--ext-unix-sk`: CRIU itself reconnects the sockets whose peer was outside (by the peer's path);
    /// needed for datagram sockets, which cannot be handed in (CRIU's restore would hang).
    pub ext_unix_sk: bool,
    /// `(fd, tag)`: CRIU's own process writes `tag` and its pid (u32, little-endian) to `fd` between its
    /// fork and its exec, so that a watcher (the target agent's watchdog) knows the restore's process
    /// even if this one dies right after starting it. `fd` is a pipe (the 5 bytes go in one write) and
    /// close-on-exec.
    pub announce: Option<(std::os::fd::RawFd, u8)>,
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
        let line = |key: &str| text.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_string());
        let (version, gitid) = (line("Version:").unwrap_or_default(), line("GitID:"));
        let parsed = parse_version(&version);
        match parsed {
            Some(v) if v >= MIN_VERSION => Ok(Criu { bin, version, gitid }),
            _ => Err(CriuError::TooOld { bin, version }),
        }
    }

    /// Why a lazy dump by this CRIU may write all private memory into the images: CRIU as released (4.2.1
    /// and every release before it that this project runs on; none is known to have the fix) leaves no
    /// page lazy when one of the tree's threads has its stack pointer on a page boundary at the freeze
    /// (criu/mem.c `is_stack` compares the offset in the page instead of the page). A thread that waits
    /// where its stack pointer is page aligned does so at every freeze; any thread may by chance. `None`
    /// for the CRIU deploy/install.sh builds with the fix ([`PATCHED_GITID`], deploy/criu-patches/0001).
    pub fn stack_bug(&self) -> Option<String> {
        (!self.patched()).then(|| {
            format!(
                "{} (CRIU {}, GitID {}) leaves no memory lazy when a thread's stack pointer is page aligned at \
                 the freeze (a thread waiting where its stack pointer is page aligned does so at every \
                 freeze), and the migration then copies all memory while the process is frozen; \
                 deploy/install.sh builds CRIU with the fix (deploy/criu-patches/0001, GitID {PATCHED_GITID})",
                self.bin.display(),
                self.version,
                self.gitid.as_deref().unwrap_or("none"),
            )
        })
    }

    /// Has CRIU probe the kernel now, while nothing waits for it, so that its later runs load what it
    /// found from [`KERNEL_PROBE_CACHE`] instead of probing again. Every CRIU run starts with that probe
    /// unless the cache is there: 15 ms of each `criu restore` on the 2-core test VM (CRIU's own log,
    /// 256 MiB hybrid migrations), and a restore is all downtime. Returns a warning for the operator
    /// when the cache cannot be kept: `/run` is no tmpfs (systemd mounts one; the VMs this was built on
    /// have none), or CRIU's probe failed.
    pub fn keep_kernel_probe(&self) -> Option<String> {
        let cache = Path::new(KERNEL_PROBE_CACHE);
        let dir = cache.parent().unwrap_or(Path::new("/"));
        let kind = nix::sys::statfs::statfs(dir).map(|s| s.filesystem_type());
        if let Some(warning) = kernel_probe_warning(dir, kind) {
            return Some(warning);
        }
        if cache.exists() {
            return None;
        }
        // Any command probes first. This one only asks whether restores can take userfaultfds from
        // tasks they create (`--lazy-pages` needs it); its answer does not matter here.
        let out = std::process::Command::new(&self.bin)
            .args(["check", "--feature", "uffd-noncoop"])
            .stdin(std::process::Stdio::null())
            .output();
        match out {
            // Another CRIU (the other agent of this host, starting too) may have won the race to write
            // the cache; this one then writes nothing, and the cache appears a moment later.
            Ok(out) if out.status.success() || cache.exists() => None,
            Ok(out) => Some(format!(
                "`{} check --feature uffd-noncoop` failed ({}) and left no {KERNEL_PROBE_CACHE}, so every CRIU run \
                 probes the kernel again ({PROBE_COST}): {}",
                self.bin.display(),
                describe_status(out.status),
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => Some(format!("cannot run {} to probe the kernel: {e}", self.bin.display())),
        }
    }

    /// Built by deploy/install.sh from this checkout's deploy/criu-patches.
    fn patched(&self) -> bool {
        self.gitid.as_deref() == Some(PATCHED_GITID)
    }

    /// `criu dump` of the tree rooted at `req.pid`, leaving it **stopped** on success so that the caller
    /// decides: kill it once the target runs the copy (commit), or SIGCONT it (rollback). On failure CRIU
    /// itself resumes the tree.
    pub async fn dump(&self, req: &DumpRequest) -> Result<Ran, CriuError> {
        let args = dump_args(req);
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        self.run("dump", &args, &req.images_dir.join("dump.log")).await
    }

    /// `criu dump --lazy-pages --leave-stopped` of the tree rooted at `req.pid` into `req.images_dir`:
    /// returns once every image file is written (lazy private pages are NOT in `pages-*.img`: they stay in
    /// the frozen tree, PE_LAZY in `pagemap-<pid>.img`) and CRIU's lazy page server listens on 127.0.0.1.
    /// The tree is frozen from the call until [`LazyDump::finish`]. `memory` says how the caller reads the
    /// lazy pages afterwards ([`LazyMemory`]); [`LazyDump::in_place`] whether CRIU left them out of its
    /// page pipes.
    ///
    /// On `Err` the tree runs again, or will: CRIU resumes it itself when a dump fails. When CRIU is not
    /// ready within [`LAZY_READY_TIMEOUT`] (or this future is dropped before it is), CRIU is not killed
    /// (that could leave its parasite in the tree): a thread waits for CRIU to get ready and then resets
    /// the page-server connection, which CRIU takes as a failed transfer ("Lazy pages transfer FAILED"),
    /// so it resumes the tree and exits 1; if CRIU ends before it is ready, it resumed the tree itself.
    /// The one exception: CRIU said it was ready but refused our connection (another local process
    /// connected first); the tree's fate is then up to that session, and the error says so.
    ///
    /// # Cancel safety
    /// The dump is lost, the tree is not: dropping the future is handled like the timeout above.
    pub async fn dump_lazy(&self, req: &DumpRequest, memory: LazyMemory) -> Result<LazyDump, CriuError> {
        let log = req.images_dir.join("dump.log");
        let spawn_error = |source| CriuError::Spawn { bin: self.bin.clone(), source };
        // Found empirically (CRIU 4.2.1, kernel 6.18): `--status-fd` works in `dump --lazy-pages` mode.
        // CRIU writes one byte (\0) right after its page server listens, which is after every image is
        // written and the post-dump scripts ran:
        //   (00.064964) Running post-dump scripts / Starting lazy pages server /
        //   (00.064971) Starting page server on port 27123 / (00.065308) Running status-ready scripts
        // and the byte arrived 0.07 s after the start, while the tree was in state `t` (ptrace-frozen).
        // When CRIU fails before that point it closes the pipe without writing (read gives EOF). When the
        // read end is closed before CRIU writes, CRIU fails with "Unable to write into the status fd:
        // Broken pipe" and resumes the tree. Polling the port would race with CRIU's accept (it accepts
        // exactly one client), and a post-dump action script runs *before* the server listens.
        let (status_rx, status_tx) = status_pipe().map_err(spawn_error)?;
        let port = free_loopback_port().map_err(spawn_error)?;
        let port_arg = port.to_string();
        let status_fd = status_tx.as_raw_fd();
        let status_fd_arg = status_fd.to_string();
        // With --lazy-pages, --leave-stopped acts when the page-server session ends; until then the tree
        // is frozen by CRIU (state `t`).
        let common = dump_args(req);
        let mut args: Vec<&std::ffi::OsStr> = common.iter().map(|a| a.as_os_str()).collect();
        let lazy: [&std::ffi::OsStr; 7] = [
            // Private anonymous memory stays in the frozen tree (PE_LAZY entries in pagemap-<pid>.img, no
            // bytes in pages-*.img); CRIU then serves it over its page server until the session ends
            // (unless it is left in place, below).
            "--lazy-pages".as_ref(),
            // Loopback only: whoever connects first reads the frozen tree's memory, so we connect as soon
            // as CRIU is ready; CRIU accepts one client and closes its listening socket (a second connect
            // is refused, tested).
            "--address".as_ref(),
            "127.0.0.1".as_ref(),
            // A port the kernel had free a moment ago (bind :0, read, close). CRIU binds it only after the
            // dump; if something took it meanwhile, CRIU fails and resumes the tree.
            "--port".as_ref(),
            port_arg.as_ref(),
            // One byte once the images are written and the page server listens (see above); the fd is
            // inherited by CRIU alone (close-on-exec is cleared in the child only).
            "--status-fd".as_ref(),
            status_fd_arg.as_ref(),
        ];
        args.extend(lazy);
        let in_place = memory == LazyMemory::InPlace && self.patched();
        if in_place {
            // Needs --lazy-pages and --leave-stopped (both above); deploy/criu-patches/0002.
            args.push("--lazy-pages-in-place".as_ref());
        }
        let command = self.command_line(&args);
        tracing::debug!(%command, "running criu");
        let mut cmd = self.command(&args);
        // SAFETY: fcntl is async-signal-safe; it clears close-on-exec on the write end of the status pipe in
        // the child only, so no other child of this process inherits it and CRIU's exit closes the last
        // write end (the read end then sees EOF).
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(status_fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(spawn_error)?;
        drop(status_tx);
        let stderr = child.stderr.take().map(|mut e| {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let _ = e.read_to_end(&mut buf).await;
                buf
            })
        });
        // From here until the LazyDump exists, dropping `pending` makes CRIU resume the tree.
        let mut pending = Pending { status: Some(status_rx), ready: false, port };
        let mut byte = [0u8; 1];
        let status = pending.status.as_mut().expect("set above");
        let ready = tokio::time::timeout(LAZY_READY_TIMEOUT, status.read(&mut byte)).await;
        let not_ready = |status: String| failed("dump", command.clone(), status, &[], &log);
        match ready {
            Ok(Ok(1)) => {}
            Ok(Ok(_)) => {
                // EOF: CRIU ended (or is ending) before it was ready; it resumed the tree itself.
                pending.status = None;
                let exited = tokio::time::timeout(LAZY_FINISH_TIMEOUT, child.wait()).await;
                let stderr = match stderr {
                    Some(h) => h.await.unwrap_or_default(),
                    None => Vec::new(),
                };
                return Err(match exited {
                    Ok(Ok(st)) if st.success() => CriuError::Unexpected {
                        op: "dump",
                        what: "it exited without its lazy page server ever getting ready".into(),
                    },
                    Ok(Ok(st)) => failed("dump", command, describe_status(st), &stderr, &log),
                    Ok(Err(e)) => not_ready(format!("closed its status fd and could not be waited for: {e}")),
                    Err(_) => not_ready("closed its status fd without getting ready and is still running".into()),
                });
            }
            Ok(Err(e)) => {
                return Err(not_ready(format!(
                    "its status fd is unreadable ({e}); abandoned, the tree will be resumed"
                )));
            }
            Err(_) => {
                return Err(not_ready(format!(
                    "not ready after {} s; abandoned, CRIU resumes the tree when it gets there",
                    LAZY_READY_TIMEOUT.as_secs()
                )));
            }
        }
        let dumped_in = started.elapsed();
        pending.ready = true;
        // The page server listens now; take its one connection before anybody else on this host can.
        let session = match tokio::time::timeout(
            LAZY_FINISH_TIMEOUT,
            tokio::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port)),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                // Refused: CRIU died, or another local process connected first (CRIU then serves it and
                // closes its listening socket). Nothing here can end that session; CRIU ends when it does.
                pending.status = None;
                return Err(not_ready(format!(
                    "its page server on 127.0.0.1:{port} said it was ready but refused us: {e}"
                )));
            }
            Err(_) => {
                return Err(not_ready(format!(
                    "its page server on 127.0.0.1:{port} did not accept within {} s",
                    LAZY_FINISH_TIMEOUT.as_secs()
                )));
            }
        };
        let _ = session.set_nodelay(true);
        // Ready and connected: from now on the LazyDump's own Drop applies.
        pending.status = None;
        tracing::debug!(pid = req.pid, port, ?dumped_in, "lazy dump ready");
        Ok(LazyDump {
            pid: req.pid,
            port,
            layout: PsLayout::for_version(&self.version),
            log,
            command,
            started,
            dumped_in,
            in_place,
            session: Some(session),
            child: Some(child),
            stderr,
        })
    }

    /// `criu restore` of the images in `req.images_dir`, leaving the tree **stopped**: it is resumed only
    /// when the source has given up its original (see [`tree::resume`]). Returns the root pid.
    pub async fn restore(&self, req: &RestoreRequest) -> Result<(u32, Ran), CriuError> {
        let pidfile = req.images_dir.join("restore.pid");
        let _ = std::fs::remove_file(&pidfile);
        let mut args: Vec<&std::ffi::OsStr> = vec![
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
        if req.lazy_pages {
            // Leave every PE_LAZY page out and register those areas with userfaultfd; CRIU connects once,
            // early, to `lazy-pages.socket` in its work dir (= the images dir: no -W here) and fails at once
            // if nothing listens there. The daemon then fills the pages in.
            args.push("--lazy-pages".as_ref());
        }
        if req.ext_unix_sk {
            args.push("--ext-unix-sk".as_ref());
        }
        let inherit: Vec<std::ffi::OsString> = req
            .inherit
            .iter()
            .flat_map(|(key, fd)| ["--inherit-fd".into(), format!("fd[{fd}]:{key}").into()])
            .collect();
        args.extend(inherit.iter().map(|a| a.as_os_str()));
        let fds: Vec<std::os::fd::RawFd> = req.inherit.iter().map(|(_, fd)| *fd).collect();
        let log = req.images_dir.join("restore.log");
        let ran = self.run_inheriting("restore", &args, &log, fds, req.announce).await?;
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
        self.run_inheriting(op, args, log, Vec::new(), None).await
    }

    /// [`Criu::run`], with the fds `inherit` left open in CRIU (under their numbers here), and CRIU's
    /// pid written as [`RestoreRequest::announce`] says.
    async fn run_inheriting(
        &self,
        op: &'static str,
        args: &[&std::ffi::OsStr],
        log: &Path,
        inherit: Vec<std::os::fd::RawFd>,
        announce: Option<(std::os::fd::RawFd, u8)>,
    ) -> Result<Ran, CriuError> {
        let command = self.command_line(args);
        tracing::debug!(%command, "running criu");
        let mut cmd = self.command(args);
        if !inherit.is_empty() {
            // SAFETY: fcntl is async-signal-safe; it clears close-on-exec on the fds handed in, in the
            // child only, so no other child of this process inherits them.
            unsafe {
                cmd.pre_exec(move || {
                    for &fd in &inherit {
                        if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        if let Some((fd, tag)) = announce {
            // SAFETY: getpid, signal and write are async-signal-safe; the buffer lives on this closure's
            // stack.
            unsafe {
                cmd.pre_exec(move || {
                    let mut m = [tag, 0, 0, 0, 0];
                    m[1..].copy_from_slice(&(libc::getpid() as u32).to_le_bytes());
                    // A watcher that is gone fails the spawn (EPIPE) rather than kill this child with
                    // SIGPIPE, which std has just set back to its default for CRIU (and which is put
                    // back).
                    libc::signal(libc::SIGPIPE, libc::SIG_IGN);
                    let written = libc::write(fd, m.as_ptr().cast(), m.len());
                    let error = std::io::Error::last_os_error();
                    libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                    if written != m.len() as isize {
                        return Err(error);
                    }
                    Ok(())
                });
            }
        }
        let start = Instant::now();
        let out = cmd.output().await.map_err(|source| CriuError::Spawn { bin: self.bin.clone(), source })?;
        let elapsed = start.elapsed();
        if out.status.success() {
            tracing::debug!(op, ?elapsed, "criu finished");
            return Ok(Ran { elapsed });
        }
        Err(failed(op, command, describe_status(out.status), &out.stderr, log))
    }

    /// The command line as text, for errors and logs.
    fn command_line(&self, args: &[&std::ffi::OsStr]) -> String {
        std::iter::once(self.bin.as_os_str())
            .chain(args.iter().copied())
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// `criu ARGS` with stdin and stdout on /dev/null, stderr piped, the NOFILE limit raised, and never
    /// killed on drop.
    fn command(&self, args: &[&std::ffi::OsStr]) -> tokio::process::Command {
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
        cmd
    }
}

/// The arguments of every dump, lazy or not: the tree, where its images go, the log, and `--external
/// KEY` for each of the request's keys.
fn dump_args(req: &DumpRequest) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec![
        "dump".into(),
        "--tree".into(),
        req.pid.to_string().into(),
        "--images-dir".into(),
        req.images_dir.clone().into(),
        // Keep the original stopped, not killed: it is the rollback until the target confirms.
        "--leave-stopped".into(),
        // Log into the images dir (relative to the work dir, which defaults to -D).
        "--log-file".into(),
        "dump.log".into(),
        LOG_LEVEL.into(),
    ];
    args.extend(req.externals.iter().flat_map(|k| ["--external".into(), k.into()]));
    args
}

/// The failure of a CRIU run: the log's error lines, else the end of its stderr.
fn failed(op: &'static str, command: String, status: String, stderr: &[u8], log: &Path) -> CriuError {
    let mut errors = log_errors(log);
    if errors.is_empty() {
        let stderr = String::from_utf8_lossy(stderr);
        errors = stderr.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" / ");
    }
    let errors = format!("{}{errors}", hint(&errors, log));
    CriuError::Failed { op, command, status, errors, log: log.to_owned() }
}

/// The cause and fix of a CRIU failure that this host's set-up explains, ahead of CRIU's own words
/// ("" when none does). The log lies in the images directory.
fn hint(errors: &str, log: &Path) -> String {
    if errors.contains("No space left on device") || errors.contains("Disk quota exceeded") {
        let dir = log.parent().unwrap_or(log);
        return format!(
            "the file system of {} is full: free space there, or start this agent with --state-dir on a larger \
             file system. CRIU said: ",
            dir.display()
        );
    }
    String::new()
}

/// A running `criu dump --lazy-pages`: the tree is frozen and CRIU serves its lazy pages.
///
/// It holds the one connection CRIU's page server accepts ([`LazyDump::page_server`]). The tree stays
/// frozen until the session ends: by [`LazyDump::finish`], or by dropping this value, which does the same
/// synchronously (CLOSE, at most about 2 s, no wait for CRIU's exit) and leaves the tree **stopped**, so
/// the caller's rollback (SIGCONT) or commit (kill) applies either way.
///
/// Found empirically (CRIU 4.2.1): how CRIU's lazy session ends decides the tree's final state.
/// - CLOSE, or a plain EOF (FIN) between two requests: "Lazy pages transfer finished successfully",
///   "Unfreezing tasks into 3" (stopped, /proc/PID/stat state `T`), exit 0.
/// - A reset (closing with unread replies makes the kernel send RST: an agent that crashes mid-GET), a
///   truncated or unknown request: "Lazy pages transfer FAILED", "Unfreezing tasks into 1" (the tree
///   **runs** again), exit 1.
/// - No connection at all: CRIU waits in accept() with the tree frozen (`t`), indefinitely (20 s tested).
///   That is why [`Criu::dump_lazy`] connects as soon as CRIU is ready.
#[derive(Debug)]
pub struct LazyDump {
    pid: u32,
    port: u16,
    layout: PsLayout,
    log: PathBuf,
    command: String,
    started: Instant,
    dumped_in: Duration,
    in_place: bool,
    /// Some until finish() or drop.
    session: Option<tokio::net::TcpStream>,
    child: Option<tokio::process::Child>,
    stderr: Option<tokio::task::JoinHandle<Vec<u8>>>,
}

impl LazyDump {
    /// Root pid of the frozen tree.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Where CRIU's page server listened (127.0.0.1); it accepts nobody else now.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// How long CRIU took to write the images and get its page server ready (the tree was frozen at the
    /// start of it).
    pub fn dumped_in(&self) -> Duration {
        self.dumped_in
    }

    /// CRIU left the lazy pages in the stopped tree, out of its page pipes ([`LazyMemory::InPlace`] with
    /// the patched CRIU): its page server cannot serve them.
    pub fn in_place(&self) -> bool {
        self.in_place
    }

    /// The layout of the page-server headers this CRIU speaks (it changed in 4.2).
    pub fn layout(&self) -> PsLayout {
        self.layout
    }

    /// The connection CRIU serves lazy pages on (none if [`LazyDump::in_place`]): write GET requests
    /// ([`PsIov::get`], encoded with [`LazyDump::layout`]) and read each reply (a header, then `nr_pages`
    /// pages). CRIU answers in order; a GET for pages it does not hold ends the session (the tree then
    /// runs again). Leave no reply unread before [`LazyDump::finish`].
    pub fn page_server(&mut self) -> &mut tokio::net::TcpStream {
        self.session.as_mut().expect("the session exists until finish() or drop")
    }

    /// Ends CRIU's page-server session cleanly (page-server CLOSE command 0x1023, read the int32 status)
    /// and waits for `criu dump` to exit. The tree stays **stopped** (--leave-stopped): the caller kills it
    /// (commit) or SIGCONTs it (rollback, see [`tree::resume`]). The time returned runs from the start of
    /// `criu dump` to its exit, i.e. how long CRIU held the tree. CRIU queues a SIGSTOP and detaches, so
    /// /proc/PID/stat may read `R` for a moment after this returns, until the task takes that signal (it
    /// runs no user code meanwhile; seen in 1 run of ~20), then `T`.
    ///
    /// On `Err` from CRIU's exit status, CRIU failed the transfer and resumed the tree itself.
    ///
    /// # Cancel safety
    /// Dropping the future closes the connection wherever the session was: at a request boundary CRIU
    /// ends cleanly (tree stopped), in the middle of a reply it fails the transfer (tree running).
    pub async fn finish(mut self) -> Result<Ran, CriuError> {
        let session = self.session.take().expect("the session exists until finish() or drop");
        let mut child = self.child.take().expect("the child exists until finish() or drop");
        let closed = tokio::time::timeout(LAZY_FINISH_TIMEOUT, close_session(session, self.layout)).await;
        let exited = tokio::time::timeout(LAZY_FINISH_TIMEOUT, child.wait()).await;
        let elapsed = self.started.elapsed();
        let stderr = match self.stderr.take() {
            Some(h) if matches!(exited, Ok(Ok(_))) => h.await.unwrap_or_default(),
            _ => Vec::new(),
        };
        let command = std::mem::take(&mut self.command);
        match exited {
            Ok(Ok(st)) if st.success() => {}
            Ok(Ok(st)) => return Err(failed("dump", command, describe_status(st), &stderr, &self.log)),
            Ok(Err(e)) => return Err(failed("dump", command, format!("could not be waited for: {e}"), &[], &self.log)),
            Err(_) => {
                let what =
                    format!("still running {} s after the page-server session ended", LAZY_FINISH_TIMEOUT.as_secs());
                return Err(failed("dump", command, what, &[], &self.log));
            }
        }
        match closed {
            Ok(Ok(0)) => {
                tracing::debug!(pid = self.pid, ?elapsed, "lazy dump finished");
                Ok(Ran { elapsed })
            }
            Ok(Ok(status)) => Err(CriuError::Unexpected {
                op: "dump",
                what: format!("its page server answered CLOSE with status {status}"),
            }),
            Ok(Err(e)) => {
                Err(CriuError::Unexpected { op: "dump", what: format!("closing its page-server session failed: {e}") })
            }
            Err(_) => Err(CriuError::Unexpected {
                op: "dump",
                what: format!("its page server did not answer CLOSE within {} s", LAZY_FINISH_TIMEOUT.as_secs()),
            }),
        }
    }
}

impl Drop for LazyDump {
    /// Dropped without [`LazyDump::finish`] (an error path): sends CLOSE synchronously, best effort, so
    /// that CRIU leaves the tree stopped and exits 0 (the caller resumes or kills it, as after finish).
    /// CRIU is not waited for (it exits within milliseconds; tokio reaps it). If the session is broken,
    /// CRIU fails the transfer and resumes the tree itself.
    fn drop(&mut self) {
        let Some(session) = self.session.take() else { return };
        tracing::warn!(
            pid = self.pid,
            "lazy dump dropped without finish(): closing CRIU's session, the tree stays stopped"
        );
        let closed = session.into_std().and_then(|s| close_session_blocking(s, self.layout, LAZY_DROP_TIMEOUT));
        if let Err(e) = closed {
            tracing::warn!(pid = self.pid, "closing CRIU's page-server session: {e} (CRIU then resumes the tree)");
        }
    }
}

/// Until [`Criu::dump_lazy`] hands its dump over: if dropped armed (`status` still set), CRIU must not
/// stay in accept() forever with the tree frozen. A thread waits for CRIU's ready byte (unless it was
/// already read) and then connects and resets the connection, which makes CRIU fail the transfer and
/// resume the tree (tested: "Can't read pagemap from socket: Connection reset by peer", "Lazy pages
/// transfer FAILED", state `S`, exit 1). EOF on the pipe means CRIU ended before it was ready (and resumed
/// the tree itself). A thread, not a task: it must work from Drop, with or without a runtime.
struct Pending {
    status: Option<tokio::net::unix::pipe::Receiver>,
    ready: bool,
    port: u16,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(status) = self.status.take() else { return };
        let (ready, port) = (self.ready, self.port);
        tracing::warn!(port, "abandoning a lazy dump: CRIU resumes the tree once it is ready");
        let status = status.into_blocking_fd();
        std::thread::spawn(move || abandon(status, ready, port));
    }
}

fn abandon(status: std::io::Result<OwnedFd>, ready: bool, port: u16) {
    if !ready {
        // Without the fd (could not be made blocking), closing it already makes CRIU fail at status-ready.
        let Ok(fd) = status else { return };
        let mut byte = [0u8; 1];
        if !matches!(std::fs::File::from(fd).read(&mut byte), Ok(1)) {
            return;
        }
    }
    reset_session(port, Duration::from_secs(5));
}

/// Connects to the lazy page server on 127.0.0.1:`port` and resets the connection at once, which makes
/// CRIU fail the transfer and resume the tree. Whether it connected.
fn reset_session(port: u16, timeout: Duration) -> bool {
    let addr = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
    let Ok(s) = std::net::TcpStream::connect_timeout(&addr, timeout) else { return false };
    // Linger 0: close sends RST instead of FIN; a FIN would be a clean end (tree left stopped).
    let _ = linger_zero(&s);
    true
}

/// For an agent that starts again after a crash: a `criu dump --lazy-pages` that got ready (its page
/// server listening) after the agent that started it died, so that nobody took its one page-server
/// connection, waits in accept() for ever with the tree frozen (state `t`). Given a process's command
/// line (`/proc/PID/cmdline`, NUL-separated) that is such a dump of this crate (`--lazy-pages`, `--address
/// 127.0.0.1 --port N`), connects to its page server and resets the connection, as `Pending`'s drop
/// does: CRIU fails the transfer and resumes the tree. True if it connected; false for another command
/// line or a dump that does not listen (not ready yet: it then resumes the tree itself when it finds its
/// status fd closed; or already served).
pub fn release_orphaned_lazy_dump(cmdline: &[u8]) -> bool {
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let after = |flag: &[u8]| args.windows(2).find(|w| w[0] == flag).map(|w| w[1]);
    let is_ours = args.iter().any(|a| *a == b"dump")
        && args.iter().any(|a| *a == b"--lazy-pages")
        && after(b"--address") == Some(b"127.0.0.1".as_slice());
    let port = after(b"--port").and_then(|p| std::str::from_utf8(p).ok()?.parse::<u16>().ok());
    let (true, Some(port)) = (is_ours, port) else { return false };
    reset_session(port, Duration::from_secs(1))
}

/// SO_LINGER {on, 0}: closing the socket resets the connection.
fn linger_zero(s: &std::net::TcpStream) -> std::io::Result<()> {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::Linger, &linger).map_err(std::io::Error::from)
}

/// The status pipe: a read end for tokio and a blocking write end for CRIU, both close-on-exec here.
fn status_pipe() -> std::io::Result<(tokio::net::unix::pipe::Receiver, OwnedFd)> {
    let (rx, tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
    Ok((tokio::net::unix::pipe::Receiver::from_owned_fd(rx)?, tx))
}

/// A TCP port free on 127.0.0.1 right now (the kernel's choice).
fn free_loopback_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

/// CLOSE, then our FIN, then CRIU's int32 status and its EOF. CRIU's lazy server keeps TCP_CORK on, so
/// the status alone would sit for the kernel's 200 ms cork ceiling (measured: 0.27 s vs 0.1 s); it goes
/// out at once when CRIU closes, which it does on our EOF. Reading to EOF also leaves nothing unread, so
/// our close is not a reset.
async fn close_session(mut s: tokio::net::TcpStream, layout: PsLayout) -> std::io::Result<i32> {
    s.write_all(&PsIov::close().encode(layout)).await?;
    s.shutdown().await?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await?;
    close_status(&rest)
}

/// [`close_session`] without a runtime, each read and write bounded by `timeout`.
fn close_session_blocking(mut s: std::net::TcpStream, layout: PsLayout, timeout: Duration) -> std::io::Result<i32> {
    s.set_nonblocking(false)?;
    s.set_write_timeout(Some(timeout))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(&PsIov::close().encode(layout))?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    close_status(&rest)
}

fn close_status(rest: &[u8]) -> std::io::Result<i32> {
    match <[u8; 4]>::try_from(rest) {
        Ok(b) => Ok(i32::from_ne_bytes(b)),
        Err(_) => Err(std::io::Error::other(format!(
            "expected the 4-byte CLOSE status, got {} bytes (replies to requests were left unread?)",
            rest.len()
        ))),
    }
}

/// Page-server command: pages follow (a GET's reply is `ADD_F | PE_PRESENT << 16`).
pub const PS_IOV_ADD_F: u32 = 6;
/// Page-server command: send me `nr_pages` at `vaddr` of task `dst_id` (its pid in the images).
pub const PS_IOV_GET: u32 = 7;
/// Page-server command: end of the session; the server answers an int32 status (0) and waits for EOF.
pub const PS_IOV_CLOSE: u32 = 0x1023;

/// Layout of CRIU's page-server header, `struct page_server_iov` (criu/page-xfer.c), native endian.
///
/// Found empirically: CRIU 4.2.1 reads **32** bytes, `u32 cmd; u32 padding; u64 nr_pages; u64 vaddr; u64
/// dst_id` (nr_pages became u64). A 24-byte CLOSE (the 4.1 layout, `u32 nr_pages`, tested against 4.1.1
/// in docs/criu-interfaces.md §5) leaves it waiting for the rest (recv MSG_WAITALL), and EOF after it
/// gives "Can't read pagemap from socket" and a failed transfer. The 32-byte CLOSE is answered with
/// status 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PsLayout {
    /// CRIU 4.1: 24 bytes.
    V4_1,
    /// CRIU 4.2 and later: 32 bytes.
    V4_2,
}

impl PsLayout {
    /// The layout a CRIU version string ("4.2.1") speaks.
    pub fn for_version(version: &str) -> PsLayout {
        match parse_version(version) {
            Some(v) if v < (4, 2) => PsLayout::V4_1,
            _ => PsLayout::V4_2,
        }
    }

    /// Bytes of one header.
    pub fn size(self) -> usize {
        match self {
            PsLayout::V4_1 => 24,
            PsLayout::V4_2 => 32,
        }
    }
}

/// One page-server header: `cmd` holds the command in its low 16 bits and PE_* flags in the high ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PsIov {
    pub cmd: u32,
    pub nr_pages: u64,
    pub vaddr: u64,
    pub dst_id: u64,
}

impl PsIov {
    /// CLOSE.
    pub fn close() -> PsIov {
        PsIov { cmd: PS_IOV_CLOSE, nr_pages: 0, vaddr: 0, dst_id: 0 }
    }

    /// GET `nr_pages` at the dump-time address `vaddr` of the task whose pid in the images is `pid`.
    pub fn get(pid: u32, vaddr: u64, nr_pages: u64) -> PsIov {
        PsIov { cmd: PS_IOV_GET, nr_pages, vaddr, dst_id: pid as u64 }
    }

    /// The command, without flags.
    pub fn command(&self) -> u32 {
        self.cmd & 0xffff
    }

    /// The PE_* flags.
    pub fn flags(&self) -> u32 {
        self.cmd >> 16
    }

    /// The header's bytes in `layout`. With [`PsLayout::V4_1`], `nr_pages` is truncated to 32 bits.
    pub fn encode(&self, layout: PsLayout) -> Vec<u8> {
        let mut out = Vec::with_capacity(layout.size());
        out.extend_from_slice(&self.cmd.to_ne_bytes());
        match layout {
            PsLayout::V4_1 => out.extend_from_slice(&(self.nr_pages as u32).to_ne_bytes()),
            PsLayout::V4_2 => {
                out.extend_from_slice(&[0; 4]);
                out.extend_from_slice(&self.nr_pages.to_ne_bytes());
            }
        }
        out.extend_from_slice(&self.vaddr.to_ne_bytes());
        out.extend_from_slice(&self.dst_id.to_ne_bytes());
        out
    }

    /// Reads a header in `layout`; None unless `b` is exactly one header long.
    pub fn decode(layout: PsLayout, b: &[u8]) -> Option<PsIov> {
        if b.len() != layout.size() {
            return None;
        }
        let u32_at = |i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_ne_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Some(match layout {
            PsLayout::V4_1 => {
                PsIov { cmd: u32_at(0), nr_pages: u32_at(4) as u64, vaddr: u64_at(8), dst_id: u64_at(16) }
            }
            PsLayout::V4_2 => PsIov { cmd: u32_at(0), nr_pages: u64_at(8), vaddr: u64_at(16), dst_id: u64_at(24) },
        })
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

/// Why CRIU cannot keep its kernel probe in `dir` (the directory of [`KERNEL_PROBE_CACHE`]), given what
/// `statfs` said of it; `None` on a tmpfs.
fn kernel_probe_warning(dir: &Path, kind: nix::Result<nix::sys::statfs::FsType>) -> Option<String> {
    let fix = "mount a tmpfs on it, as systemd does";
    match kind {
        Ok(kind) if kind == nix::sys::statfs::TMPFS_MAGIC => None,
        Ok(_) => Some(format!(
            "{} is not a tmpfs, so CRIU cannot keep what it probed of the kernel ({KERNEL_PROBE_CACHE}) and \
             probes it again at the start of every run ({PROBE_COST}); {fix}",
            dir.display()
        )),
        Err(e) => Some(format!(
            "cannot tell whether {} is a tmpfs ({e}), where CRIU keeps what it probed of the kernel \
             ({KERNEL_PROBE_CACHE}); without it every CRIU run probes again ({PROBE_COST}); {fix}",
            dir.display()
        )),
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
    fn the_kernel_probe_is_kept_only_on_tmpfs() {
        use nix::sys::statfs::{TMPFS_MAGIC, statfs};
        let run = Path::new("/run");
        assert_eq!(kernel_probe_warning(run, Ok(TMPFS_MAGIC)), None);
        // Real file systems: /dev/shm is a tmpfs wherever glibc's shm_open works; /proc never is one.
        assert_eq!(kernel_probe_warning(Path::new("/dev/shm"), statfs("/dev/shm").map(|s| s.filesystem_type())), None);
        let proc = kernel_probe_warning(Path::new("/proc"), statfs("/proc").map(|s| s.filesystem_type()))
            .expect("/proc is no tmpfs");
        assert!(proc.starts_with("/proc is not a tmpfs") && proc.contains(KERNEL_PROBE_CACHE), "{proc}");
        assert!(proc.contains("mount a tmpfs"), "names the fix: {proc}");
        let failed = kernel_probe_warning(run, Err(nix::errno::Errno::EACCES)).expect("an error is a warning");
        assert!(failed.contains("cannot tell whether /run is a tmpfs"), "{failed}");
    }

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
    fn a_full_images_directory_is_named_with_its_fix() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("dump.log");
        std::fs::write(&log, "(00.100) Error (criu/bfd.c:131): bfd: Error flushing image: No space left on device\n")
            .unwrap();
        let e = failed("dump", "criu dump".into(), "exit status 1".into(), b"", &log).to_string();
        assert!(
            e.starts_with(&format!(
                "criu dump failed (exit status 1): the file system of {} is full",
                dir.path().display()
            )),
            "{e}"
        );
        assert!(e.contains("--state-dir") && e.contains("CRIU said: Error (criu/bfd.c:131)"), "{e}");
        std::fs::write(&log, "(00.100) Error (criu/cr-dump.c:1975): Dumping FAILED.\n").unwrap();
        let e = failed("dump", "criu dump".into(), "exit status 1".into(), b"", &log).to_string();
        assert!(
            e.starts_with("criu dump failed (exit status 1): Error (criu/cr-dump.c"),
            "no hint without a cause: {e}"
        );
    }

    #[test]
    fn page_server_headers_in_both_layouts() {
        assert_eq!(PsLayout::for_version("4.2.1"), PsLayout::V4_2);
        assert_eq!(PsLayout::for_version("4.1.1"), PsLayout::V4_1);
        assert_eq!(PsLayout::for_version("5.0"), PsLayout::V4_2);
        let get = PsIov::get(4242, 0x7f00_0000_1000, 16);
        for layout in [PsLayout::V4_1, PsLayout::V4_2] {
            let b = get.encode(layout);
            assert_eq!(b.len(), layout.size());
            assert_eq!(PsIov::decode(layout, &b), Some(get));
            assert_eq!(PsIov::decode(layout, &b[1..]), None);
        }
        // What CRIU 4.2.1 answered a GET with (cmd ADD_F | PE_PRESENT << 16), as it reads on the wire.
        let mut reply = vec![0x06, 0x00, 0x04, 0x00, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0];
        reply.extend_from_slice(&0xac4000u64.to_le_bytes());
        reply.extend_from_slice(&10947u64.to_le_bytes());
        let r = PsIov::decode(PsLayout::V4_2, &reply).unwrap();
        assert_eq!((r.command(), r.flags(), r.nr_pages, r.vaddr, r.dst_id), (PS_IOV_ADD_F, 4, 2, 0xac4000, 10947));
        assert_eq!(PsIov::close().encode(PsLayout::V4_2)[..4], [0x23, 0x10, 0, 0]);
        assert_eq!(close_status(&[0, 0, 0, 0]).unwrap(), 0);
        assert!(close_status(&[0; 4100]).is_err());
    }

    #[test]
    fn versions() {
        assert_eq!(parse_version("4.2.1"), Some((4, 2)));
        assert!(parse_version("3.17").unwrap() < MIN_VERSION);
    }

    #[test]
    fn the_stack_bug_is_named_for_every_criu_but_the_patched_build() {
        let criu = |gitid: Option<&str>| Criu {
            bin: "/usr/sbin/criu".into(),
            version: "4.2.1".into(),
            gitid: gitid.map(String::from),
        };
        let warning = criu(None).stack_bug().expect("4.2.1 as released has the bug");
        assert!(warning.contains("/usr/sbin/criu (CRIU 4.2.1, GitID none)"), "{warning}");
        assert!(warning.contains("deploy/install.sh"), "{warning}");
        assert!(criu(Some("v4.2.1-3-gabc")).stack_bug().is_some(), "a git build is not the patch set");
        assert!(criu(Some("migrate-000000000000")).stack_bug().is_some(), "another patch set");
        assert_eq!(criu(Some(PATCHED_GITID)).stack_bug(), None, "built by deploy/install.sh");
    }

    /// PATCHED_GITID is what deploy/install.sh computes from the patches: `cat deploy/criu-patches/*.patch
    /// | sha256sum | cut -c1-12` (the glob sorts by name, as here).
    #[test]
    fn the_patched_gitid_is_the_patch_sets_hash() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/criu-patches");
        let mut patches: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("deploy/criu-patches")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "patch"))
            .collect();
        patches.sort();
        assert!(!patches.is_empty(), "no patches in {}", dir.display());
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg("cat \"$@\" | sha256sum")
            .arg("sh")
            .args(&patches)
            .output()
            .expect("run sha256sum");
        assert!(out.status.success(), "sha256sum: {}", String::from_utf8_lossy(&out.stderr));
        let sum = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            format!("migrate-{}", &sum[..12]),
            PATCHED_GITID,
            "deploy/criu-patches changed: set PATCHED_GITID to what deploy/install.sh now builds in"
        );
    }
}
