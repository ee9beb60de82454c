//! The integration suite: real CRIU, real processes, real QUIC between two namespaced hosts.
//!
//! One testbed (`deploy/testbed`, named after this process) is brought up before the cases and taken
//! down after them, whatever happens. Cases run one at a time: they share the hosts. The suite fails,
//! never skips, when it cannot run here (not root, no CRIU, binaries not built).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use libtest_mimic::{Arguments, Failed, Trial};
use tests::{Testbed, unique, wait_until};

static TB: OnceLock<Testbed> = OnceLock::new();

fn tb() -> &'static Testbed {
    TB.get().expect("testbed is up")
}

fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MIGRATE_BIN_DIR") {
        return d.into();
    }
    // target/<profile>/deps/testbed-HASH -> target/<profile>
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .to_path_buf()
}

fn check(cond: bool, what: impl Into<String>) -> Result<(), Failed> {
    if cond {
        Ok(())
    } else {
        Err(what.into().into())
    }
}

fn counter(v: &serde_json::Value) -> u64 {
    v["counter"].as_u64().expect("counter")
}

/// 256 MiB of known content and a counter move from a to b.
fn memory_and_counter_survive() -> Result<(), Failed> {
    let tb = tb();
    let name = format!("mem{}", unique());
    let pid = tb.start_workload(
        "a",
        &["mem", "--name", &name, "--mib", "256", "--seed", "7"],
    );
    let before = tb.query("a", &name)?;
    check(
        before["checksum"] == before["expected"],
        "workload checksum differs from its content before migration",
    )?;
    let r = tb.migrate("a", pid, &tb.addr("b"), None);
    check(
        r.success,
        format!("migrate failed: {} {}", r.json, r.stderr),
    )?;
    let s = &r.json;
    check(
        s["pid"] == pid && s["target_pid"] == pid,
        format!("pids in summary: {s}"),
    )?;
    check(
        s["image_bytes"].as_u64().unwrap_or(0) >= 256 << 20,
        format!("image smaller than the workload: {s}"),
    )?;
    check(
        s["wire_bytes"].as_u64().unwrap_or(0) > 0,
        format!("no bytes on the wire: {s}"),
    )?;
    let downtime = s["downtime_ms"].as_f64().unwrap_or(0.0);
    check(
        downtime > 0.0 && downtime <= s["total_ms"].as_f64().unwrap_or(0.0),
        format!("downtime/total: {s}"),
    )?;
    check(
        s["compression_ratio"].as_f64().unwrap_or(0.0) > 0.0,
        format!("compression ratio: {s}"),
    )?;

    check(
        tb.running("b", pid),
        format!(
            "pid {pid} does not run in b's pid namespace (state {:?})",
            tb.state("b", pid)
        ),
    )?;
    check(
        !tb.running("a", pid),
        format!("pid {pid} still runs on a (state {:?})", tb.state("a", pid)),
    )?;
    check(
        tb.query("a", &name).is_err(),
        "the workload still answers on a",
    )?;
    let after = tb.query("b", &name)?;
    check(
        after["pid"] == pid,
        format!("answer from the wrong process: {after}"),
    )?;
    check(
        after["checksum"] == before["checksum"],
        format!("memory checksum changed: before {before}, after {after}"),
    )?;
    check(
        counter(&after) >= counter(&before),
        format!("counter went back: before {before}, after {after}"),
    )?;
    let progressed = wait_until(Duration::from_secs(5), || {
        tb.query("b", &name)
            .map(|v| counter(&v) > counter(&after))
            .unwrap_or(false)
    });
    check(progressed, "the counter does not advance on b")?;
    tb.kill("b", pid);
    Ok(())
}

/// A parent and two children linked by a pipe move together and keep talking.
fn process_tree_with_pipe() -> Result<(), Failed> {
    let tb = tb();
    let name = format!("tree{}", unique());
    let root = tb.start_workload("a", &["tree", "--name", &name]);
    let before = tb.query("a", &name)?;
    let reader = before["pid"].as_u64().expect("pid") as u32;
    let writer = before["writer"].as_u64().expect("writer") as u32;
    check(
        before["parent"] == root,
        format!("reader's parent is not the root: {before}"),
    )?;
    let r = tb.migrate("a", root, &tb.addr("b"), None);
    check(
        r.success,
        format!("migrate failed: {} {}", r.json, r.stderr),
    )?;
    check(
        r.json["processes"] == 3,
        format!("expected 3 processes: {}", r.json),
    )?;
    for p in [root, reader, writer] {
        check(tb.running("b", p), format!("pid {p} does not run on b"))?;
        check(!tb.running("a", p), format!("pid {p} still runs on a"))?;
    }
    let after = tb.query("b", &name)?;
    check(
        after["parent"] == root && after["writer"] == writer,
        format!("tree changed shape: {after}"),
    )?;
    let last = after["last"].as_u64().expect("last");
    check(
        last >= before["last"].as_u64().expect("last"),
        format!("pipe went back: {before} -> {after}"),
    )?;
    let flowing = wait_until(Duration::from_secs(5), || {
        tb.query("b", &name)
            .map(|v| v["last"].as_u64().unwrap_or(0) > last)
            .unwrap_or(false)
    });
    check(flowing, "nothing flows through the pipe on b")?;
    tb.kill("b", root);
    tb.kill("b", reader);
    tb.kill("b", writer);
    Ok(())
}

/// The restore on b fails for real (a file the process holds open does not exist there): the original
/// runs on a with its state, and the error names the cause.
fn failed_restore_rolls_back() -> Result<(), Failed> {
    let tb = tb();
    let name = format!("rb{}", unique());
    let held = tb.hostlocal().join(format!("held-{name}.dat"));
    std::fs::write(&held, b"only on host a")?;
    let held_s = held.to_str().expect("utf8");
    let pid = tb.start_workload(
        "a",
        &["mem", "--name", &name, "--mib", "16", "--hold-open", held_s],
    );
    let before = tb.query("a", &name)?;
    let r = tb.migrate("a", pid, &tb.addr("b"), None);
    check(
        !r.success,
        format!("migrate should have failed: {}", r.json),
    )?;
    let err = r.json["error"].as_str().unwrap_or_default();
    check(
        err.contains("restore"),
        format!("error does not say the restore failed: {err}"),
    )?;
    check(
        err.contains(&format!("held-{name}.dat")),
        format!("error does not name the missing file: {err}"),
    )?;
    check(
        err.contains("No such file"),
        format!("error does not give the cause: {err}"),
    )?;
    check(
        err.contains("resumed on this host"),
        format!("error does not say the original was resumed: {err}"),
    )?;
    check(
        r.json["original"] == "running",
        format!("original: {}", r.json),
    )?;
    check(
        tb.running("a", pid),
        format!(
            "original is not running on a (state {:?})",
            tb.state("a", pid)
        ),
    )?;
    check(tb.state("b", pid).is_none(), "a copy was left on b")?;
    let after = tb.query("a", &name)?;
    check(
        after["checksum"] == before["checksum"],
        "memory changed after rollback",
    )?;
    let progressed = wait_until(Duration::from_secs(5), || {
        tb.query("a", &name)
            .map(|v| counter(&v) > counter(&after))
            .unwrap_or(false)
    });
    check(progressed, "counter does not advance after rollback")?;
    tb.kill("a", pid);
    std::fs::remove_file(&held)?;
    Ok(())
}

/// Starts an agent with certificates from another CA on `host`; returns its pid file path.
fn start_rogue_agent(host: &str, role: &str, extra: &[&str]) -> PathBuf {
    let tb = tb();
    let dir = tb.dir.join(format!("rogue-{role}-{}", unique()));
    let out = std::process::Command::new(tb.repo.join("deploy/certs.sh"))
        .args([dir.join("tls").to_str().unwrap(), host, &tb.addr(host)])
        .output()
        .expect("certs.sh");
    assert!(
        out.status.success(),
        "certs.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pidfile = dir.join("pid");
    let agent = tb.bin.join(format!("{role}-agent"));
    let mut cmd = format!(
        "echo $$ > {} && exec {} --tls-dir {} --host {host} --state-dir {}",
        pidfile.display(),
        agent.display(),
        dir.join("tls").display(),
        dir.join("state").display()
    );
    for e in extra {
        cmd.push(' ');
        cmd.push_str(e);
    }
    cmd.push_str(&format!(" >{} 2>&1", dir.join("log").display()));
    assert!(
        tb.exec_detached(host, &["setsid", "-f", "sh", "-c", &cmd]),
        "starting a rogue {role} agent on {host}"
    );
    assert!(wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(dir.join("log"))
            .map(|l| l.contains("ready"))
            .unwrap_or(false)
    }));
    pidfile
}

fn stop_rogue(host: &str, pidfile: &PathBuf) {
    if let Ok(p) = std::fs::read_to_string(pidfile) {
        tb().kill(host, p.trim().parse().unwrap_or(0));
    }
}

/// A target whose certificate is not from the fleet CA is refused before the process is touched, and so
/// is a source with such a certificate.
fn foreign_certificates_are_refused() -> Result<(), Failed> {
    let tb = tb();
    let name = format!("tls{}", unique());
    let pid = tb.start_workload("a", &["mem", "--name", &name, "--mib", "8"]);

    // A target agent on b with a certificate from another CA.
    let rogue_target = start_rogue_agent("b", "target", &["--listen", "0.0.0.0:7421"]);
    let r = tb.migrate("a", pid, &format!("{}:7421", tb.addr("b")), None);
    stop_rogue("b", &rogue_target);
    check(!r.success, "migration to a foreign target succeeded")?;
    let err = r.json["error"].as_str().unwrap_or_default();
    check(
        err.contains("TLS handshake") && err.contains("fleet CA"),
        format!("error does not blame the certificate: {err}"),
    )?;
    check(
        err.contains("not touched") && r.json["original"] == "running",
        format!("{}", r.json),
    )?;
    check(
        tb.running("a", pid),
        "the process does not run on a after a refused target",
    )?;

    // A source agent on a with a certificate from another CA, talking to the real target on b.
    let rogue_source_sock = tb.dir.join(format!("rogue-{}.sock", unique()));
    let sock = rogue_source_sock.to_str().unwrap().to_string();
    let rogue_source = start_rogue_agent("a", "source", &["--control-socket", &sock]);
    let r = tb.migrate("a", pid, &tb.addr("b"), Some(&rogue_source_sock));
    stop_rogue("a", &rogue_source);
    check(!r.success, "a foreign source was accepted")?;
    let err = r.json["error"].as_str().unwrap_or_default();
    check(
        err.contains("TLS handshake"),
        format!("error does not blame the certificate: {err}"),
    )?;
    check(r.json["original"] == "running", format!("{}", r.json))?;
    check(
        tb.running("a", pid),
        "the process does not run on a after being refused by the target",
    )?;
    let log = std::fs::read_to_string(tb.dir.join("b/target-agent.log"))?;
    check(
        log.contains("refused peer during TLS handshake"),
        "the target did not log the refused peer",
    )?;
    tb.kill("a", pid);
    Ok(())
}

/// Bad input gives a clear error and a non-zero exit, and the process keeps running on a.
fn wrong_pid_dead_host_taken_pid() -> Result<(), Failed> {
    let tb = tb();
    // A pid that does not exist: one that just exited.
    let mut gone = std::process::Command::new("true").spawn()?;
    let gone_pid = gone.id();
    gone.wait()?;
    let r = tb.migrate("a", gone_pid, &tb.addr("b"), None);
    check(!r.success, "migrating a missing pid succeeded")?;
    let err = r.json["error"].as_str().unwrap_or_default();
    check(
        err.contains(&format!("no process with pid {gone_pid}")),
        format!("{err}"),
    )?;

    let name = format!("bad{}", unique());
    let pid = tb.start_workload("a", &["mem", "--name", &name, "--mib", "8"]);

    // A host that does not answer: b's address, a port with no agent.
    let r = tb.migrate("a", pid, &format!("{}:7999", tb.addr("b")), None);
    check(!r.success, "migration to a dead port succeeded")?;
    let err = r.json["error"].as_str().unwrap_or_default();
    check(
        err.contains("did not answer") && err.contains("not touched"),
        format!("{err}"),
    )?;
    check(
        tb.running("a", pid),
        "process not running after a dead target",
    )?;

    // A pid already taken on b: make the next pid in b's namespace `pid` and start a sleeper there.
    let mut taken = false;
    for _ in 0..5 {
        let script = format!(
            "echo {} > /proc/sys/kernel/ns_last_pid && exec setsid -f sleep 300",
            pid - 1
        );
        tb.exec_detached("b", &["sh", "-c", &script]);
        if wait_until(Duration::from_secs(2), || tb.state("b", pid).is_some()) {
            taken = true;
            break;
        }
    }
    check(taken, format!("could not occupy pid {pid} on b"))?;
    let r = tb.migrate("a", pid, &tb.addr("b"), None);
    tb.kill("b", pid);
    check(!r.success, "migration onto a taken pid succeeded")?;
    let err = r.json["error"].as_str().unwrap_or_default();
    check(
        err.contains(&format!("pid {pid} (used by `sleep`) already taken on b")),
        format!("{err}"),
    )?;
    check(err.contains("not touched"), format!("{err}"))?;
    check(
        tb.running("a", pid),
        "process not running after a taken pid",
    )?;
    tb.kill("a", pid);
    Ok(())
}

fn main() {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    let cases: Vec<(&str, fn() -> Result<(), Failed>)> = vec![
        ("memory_and_counter_survive", memory_and_counter_survive),
        ("process_tree_with_pipe", process_tree_with_pipe),
        ("failed_restore_rolls_back", failed_restore_rolls_back),
        (
            "foreign_certificates_are_refused",
            foreign_certificates_are_refused,
        ),
        (
            "wrong_pid_dead_host_taken_pid",
            wrong_pid_dead_host_taken_pid,
        ),
    ];
    let listing = args.list;
    let bin = bin_dir();
    if !listing {
        let problems = tests::environment_problems(&bin);
        if !problems.is_empty() {
            eprintln!(
                "the integration suite cannot run here:\n  - {}",
                problems.join("\n  - ")
            );
            std::process::exit(1);
        }
        let name = format!("t{}", std::process::id() % 100_000);
        match Testbed::up(&name, &bin) {
            Ok(tb) => {
                let _ = TB.set(tb);
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
    }
    let trials = cases
        .into_iter()
        .map(|(n, f)| Trial::test(n, move || f()))
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    if let Some(tb) = TB.get() {
        // A static is never dropped: tear down explicitly.
        tb.down();
    }
    conclusion.exit();
}
