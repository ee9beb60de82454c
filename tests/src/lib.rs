//! Helpers for the integration suite: a [`Testbed`] fixture around `deploy/testbed` (two namespaced
//! hosts, each running real agents), and small ways to start workloads, query them and run `migrate` on
//! a host. The suite itself is `tests/testbed.rs`; the workloads are `src/bin/workload.rs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A testbed brought up for this process, torn down on drop.
pub struct Testbed {
    pub name: String,
    pub repo: PathBuf,
    pub bin: PathBuf,
    pub dir: PathBuf,
}

/// What `migrate --json` printed and how it exited.
#[derive(Debug)]
pub struct MigrateResult {
    pub success: bool,
    pub json: serde_json::Value,
    pub stderr: String,
}

/// Why the suite cannot run here; it fails with this rather than pass silently.
pub fn environment_problems(bin: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        problems.push("the integration suite must run as root (it creates namespaces and runs CRIU)".to_string());
    }
    // The CRIU the agents will find, found the same way.
    match criu::Criu::find() {
        Err(e) => problems.push(e.to_string()),
        Ok(c) => {
            let ok = Command::new(&c.bin).arg("check").stdout(Stdio::null()).stderr(Stdio::null()).status();
            if ok.map(|s| s.success()).ok() != Some(true) {
                problems.push(format!("{} check fails: run deploy/install.sh", c.bin.display()));
            }
            // Else a lazy dump is now and then not lazy, and the cases that check it fail at random.
            if let Some(bug) = c.stack_bug() {
                problems.push(bug);
            }
        }
    }
    if !std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("tmux").exists())) {
        problems.push("tmux is not installed (the tmux case needs it): run deploy/install.sh".to_string());
    }
    for b in ["source-agent", "target-agent", "migrate", "workload", "migrate-broker"] {
        if !bin.join(b).exists() {
            problems.push(format!("{} is missing: cargo build --release --workspace first", bin.join(b).display()));
        }
    }
    problems
}

impl Testbed {
    /// Brings up a testbed named `name` with the binaries in `bin`.
    pub fn up(name: &str, bin: &Path) -> Result<Testbed, String> {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf();
        let tb = Testbed {
            name: name.into(),
            repo,
            bin: bin.into(),
            dir: PathBuf::from(format!("/dev/shm/migrate-testbed/{name}")),
        };
        let _ = tb.script(&["down"]);
        let out = tb.script(&["up", "--with-c"]);
        if !out.status.success() {
            return Err(format!("testbed up failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(tb)
    }

    /// `deploy/testbed ARGS...` for this testbed (its name and binaries in the environment), standard
    /// input from /dev/null; the caller sets the rest.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.repo.join("deploy/testbed"));
        c.args(args).env("TESTBED_NAME", &self.name).env("MIGRATE_BIN_DIR", &self.bin).stdin(Stdio::null());
        c
    }

    fn script(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run deploy/testbed")
    }

    /// Runs a command on `host` that leaves a process behind (`setsid -f ...`): its standard streams are
    /// /dev/null, so nothing it leaves running holds our pipes. Returns whether it exited 0.
    pub fn exec_detached(&self, host: &str, args: &[&str]) -> bool {
        let mut a = vec!["exec", host];
        a.extend_from_slice(args);
        self.command(&a).stdout(Stdio::null()).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false)
    }

    /// Runs a command on `host` and returns its output.
    pub fn exec(&self, host: &str, args: &[&str]) -> Output {
        let mut a = vec!["exec", host];
        a.extend_from_slice(args);
        self.script(&a)
    }

    /// Plugs (`true`) or unplugs a host's network link.
    pub fn link(&self, host: &str, up: bool) -> bool {
        self.script(&["link", host, if up { "up" } else { "down" }]).status.success()
    }

    /// The address of a host.
    pub fn addr(&self, host: &str) -> String {
        String::from_utf8(self.script(&["addr", host]).stdout).expect("utf8").trim().to_string()
    }

    /// A directory whose content is private to host b (a tmpfs there, a plain directory on a).
    pub fn hostlocal(&self) -> PathBuf {
        self.dir.join("hostlocal")
    }

    /// Starts `workload ARGS --pidfile ...` detached in its own session on `host`; returns its pid once
    /// it is ready (as numbered in that host's pid namespace).
    pub fn start_workload(&self, host: &str, args: &[&str]) -> u32 {
        self.start_with(host, &["setsid", "-f"], &self.bin.join("workload"), args)
    }

    /// Starts `PREFIX... WORKLOAD ARGS --pidfile ...` on `host`, where PREFIX must leave the workload
    /// running in the background; returns its pid once it is ready.
    pub fn start_with(&self, host: &str, prefix: &[&str], workload: &Path, args: &[&str]) -> u32 {
        let pidfile = std::env::temp_dir().join(format!("migrate-test-{}-{}.pid", std::process::id(), unique()));
        let mut a: Vec<&str> = prefix.to_vec();
        a.push(workload.to_str().expect("utf8"));
        let pf = pidfile.to_str().expect("utf8").to_string();
        // Before a `--` that starts a command line of the workload's own (pty-client), else at the end.
        let split = args.iter().position(|&x| x == "--").unwrap_or(args.len());
        a.extend_from_slice(&args[..split]);
        a.extend_from_slice(&["--pidfile", &pf]);
        a.extend_from_slice(&args[split..]);
        assert!(self.exec_detached(host, &a), "starting workload {args:?} on {host} failed");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(s) = std::fs::read_to_string(&pidfile) {
                let _ = std::fs::remove_file(&pidfile);
                return s.trim().parse().expect("pid in pidfile");
            }
            assert!(Instant::now() < deadline, "workload {args:?} did not become ready within 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Asks the workload `name` on `host` for its state.
    pub fn query(&self, host: &str, name: &str) -> Result<serde_json::Value, String> {
        let workload = self.bin.join("workload");
        let out = self.exec(host, &[workload.to_str().expect("utf8"), "query", "--name", name]);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("bad answer {:?}: {e}", String::from_utf8_lossy(&out.stdout)))
    }

    /// The state letter of `pid` on `host` (None: no such process there).
    pub fn state(&self, host: &str, pid: u32) -> Option<char> {
        let out = self.exec(host, &["cat", &format!("/proc/{pid}/stat")]);
        if !out.status.success() {
            return None;
        }
        let s = String::from_utf8_lossy(&out.stdout);
        s[s.rfind(')')? + 1..].trim_start().chars().next()
    }

    /// True when `pid` runs on `host` (exists, not a zombie, not stopped).
    pub fn running(&self, host: &str, pid: u32) -> bool {
        matches!(self.state(host, pid), Some(s) if !"ZXTt".contains(s))
    }

    /// Runs `migrate --json PID TARGET EXTRA...` on `host` with that host's source agent, or with the
    /// agent socket `agent` when given.
    pub fn migrate(&self, host: &str, pid: u32, target: &str, agent: Option<&Path>) -> MigrateResult {
        self.migrate_as(host, &[], "migrate", pid, target, agent)
    }

    /// `migrate --json EXTRA... PID TARGET` on `host` with its own source agent (e.g. `--mode stopcopy`).
    pub fn migrate_with(&self, host: &str, pid: u32, target: &str, extra: &[&str]) -> MigrateResult {
        self.run_migrate(host, &[], "migrate", extra, pid, target, None)
    }

    /// Like [`Testbed::migrate`], with `prefix` before the command `migrate` (e.g. setpriv to run it as
    /// a user, with `migrate` a path that user can reach).
    pub fn migrate_as(
        &self,
        host: &str,
        prefix: &[&str],
        migrate: &str,
        pid: u32,
        target: &str,
        agent: Option<&Path>,
    ) -> MigrateResult {
        self.run_migrate(host, prefix, migrate, &[], pid, target, agent)
    }

    /// `[PREFIX...] MIGRATE EXTRA... --json PID TARGET [--agent-socket AGENT]` on `host`.
    #[allow(clippy::too_many_arguments)]
    pub fn run_migrate(
        &self,
        host: &str,
        prefix: &[&str],
        migrate: &str,
        extra: &[&str],
        pid: u32,
        target: &str,
        agent: Option<&Path>,
    ) -> MigrateResult {
        let pid = pid.to_string();
        let mut a: Vec<&str> = prefix.to_vec();
        a.push(migrate);
        a.extend_from_slice(extra);
        a.extend_from_slice(&["--json", &pid, target]);
        let sock;
        if let Some(s) = agent {
            sock = s.to_str().expect("utf8").to_string();
            a.extend_from_slice(&["--agent-socket", &sock]);
        }
        let out = self.exec(host, &a);
        let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "migrate printed no JSON ({e}): stdout {:?} stderr {:?}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        MigrateResult { success: out.status.success(), json, stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
    }

    /// Runs `migrate check --json PID [TARGET]` on `host` (as `user` when given, through setpriv, with
    /// `migrate` at `bin`); returns (exit 0, JSON).
    pub fn check(&self, host: &str, pid: u32, target: Option<&str>) -> (bool, serde_json::Value) {
        let pid = pid.to_string();
        let mut a = vec!["migrate", "check", "--json", &pid];
        a.extend(target);
        let out = self.exec(host, &a);
        let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "migrate check printed no JSON ({e}): {:?} {:?}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.success(), json)
    }

    /// `path` as seen on `host`, reached from this (the outer) host without starting a process there:
    /// through /proc/INIT/root of the host's own pid and mount namespaces (b, c); a shares this mount
    /// namespace.
    pub fn path_on(&self, host: &str, path: &str) -> PathBuf {
        match std::fs::read_to_string(self.dir.join(host).join("init.pid")) {
            Ok(init) => PathBuf::from(format!("/proc/{}/root{path}", init.trim())),
            Err(_) => PathBuf::from(path),
        }
    }

    /// The source agent's log on `host`.
    pub fn source_log(&self, host: &str) -> String {
        std::fs::read_to_string(self.dir.join(host).join("source-agent.log")).unwrap_or_default()
    }

    /// The warnings of the source agent on `host` that the lazy dump of the migration summed up in
    /// `summary` (its `migration_id`) wrote memory into the image files, with what it wrote.
    pub fn not_lazy_warnings(&self, host: &str, summary: &serde_json::Value) -> Vec<String> {
        let id = summary["migration_id"].as_str().unwrap_or("?");
        self.source_log(host)
            .lines()
            .filter(|l| l.contains(id) && l.contains("lazy dump wrote"))
            .map(String::from)
            .collect()
    }

    /// The last `lines` lines of each agent's log on each host (what a failure report needs: the
    /// testbed and its logs are gone once the suite ends).
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for host in ["a", "b", "c"] {
            for agent in ["source-agent", "target-agent"] {
                let path = self.dir.join(host).join(format!("{agent}.log"));
                let Ok(log) = std::fs::read_to_string(&path) else { continue };
                let all: Vec<&str> = log.lines().collect();
                out += &format!("--- {} (last {} of {} lines)\n", path.display(), lines.min(all.len()), all.len());
                for l in &all[all.len().saturating_sub(lines)..] {
                    out += l;
                    out.push('\n');
                }
            }
        }
        out
    }

    /// Scrapes `/metrics` of the agent listening on `port` of `host`'s loopback (9464 source, 9465
    /// target): metric name (with labels) -> value.
    pub fn metrics(&self, host: &str, port: u16) -> std::collections::HashMap<String, f64> {
        let script =
            format!("exec 3<>/dev/tcp/127.0.0.1/{port} && printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3");
        let out = self.exec(host, &["bash", "-c", &script]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("migrate_"))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    /// Kills a process on a host (cleanup).
    pub fn kill(&self, host: &str, pid: u32) {
        let _ = self.exec(host, &["kill", "-KILL", &pid.to_string()]);
    }
}

impl Testbed {
    /// Takes the testbed down (also done on drop).
    pub fn down(&self) {
        let out = self.script(&["down"]);
        if !out.status.success() {
            eprintln!("testbed down failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.down();
    }
}

/// A number unique within this process.
pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// Now, in Unix milliseconds (CLOCK_REALTIME: the clock `workload`'s stalls are stamped with, which a
/// restored task's new time namespace leaves alone).
pub fn unix_ms() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// The longest of a workload's `stalls` ([ended at, Unix ms; length, ms]) that ended between `from` and
/// `to` (Unix ms): how long it did not run during a migration in that window.
pub fn longest_stall(stalls: &serde_json::Value, from: f64, to: f64) -> Option<f64> {
    stalls
        .as_array()?
        .iter()
        .filter_map(|s| Some((s[0].as_f64()?, s[1].as_f64()?)))
        .filter(|&(end, _)| (from..=to).contains(&end))
        .map(|(_, len)| len)
        .max_by(f64::total_cmp)
}
