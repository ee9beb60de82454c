//! `bench`: measures migrations between the two namespaced testbed hosts and compares this project with
//! plain CRIU, in one run, on the same workloads. Prints a table and writes JSON.
//!
//!   bench [--sizes 256,1024] [--dirty 0,1,10] [--content random,compressible]
//!         [--modes precopy,criu-cold] [--json bench.json]
//!
//! Modes:
//! - `precopy`: this project's `migrate` (default mode): rounds while the workload runs, a lazy dump,
//!   the final delta, a lazy restore filled from the target's page store. `complete ms` is the time
//!   from the freeze until every page was in place on b.
//! - `stopcopy`: this project's `migrate --mode stopcopy`: freeze, dump, stream over QUIC, restore.
//! - `criu-cold`: plain CRIU cold migration: `criu dump` to tmpfs on a, the files copied over the same
//!   veth link with a plain TCP stream (this binary's `copy-send`/`copy-recv`), `criu restore` on b.
//!   Downtime runs from the start of the dump to the end of the restore, on the bench's clock; it
//!   includes a few ms of `nsenter` per step.
//!
//! Workloads (`workload mem`) dirty `--dirty` percent of their pages per second while they run, for two
//! seconds before the migration starts. Needs root, CRIU and a release build (like the integration
//! suite); it brings up its own testbed named "bench" and takes it down at the end.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tests::{Testbed, unique, wait_until};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn list<T: std::str::FromStr>(args: &[String], name: &str, default: &str) -> Vec<T> {
    arg(args, name).unwrap_or_else(|| default.into()).split(',').filter_map(|v| v.trim().parse().ok()).collect()
}

#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    mib: u64,
    dirty_pct_per_s: f64,
    content: String,
    mode: String,
    ok: bool,
    downtime_ms: f64,
    total_ms: f64,
    wire_bytes: u64,
    rounds: u32,
    /// From the freeze until all memory was in place on the target (pre-copy's lazy restore).
    complete_ms: Option<f64>,
    note: String,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("copy-send") => return copy_send(&args),
        Some("copy-recv") => return copy_recv(&args),
        _ => {}
    }
    let sizes: Vec<u64> = list(&args, "--sizes", "256,1024");
    let dirty: Vec<f64> = list(&args, "--dirty", "0,1,10");
    let contents: Vec<String> = list(&args, "--content", "random,compressible");
    let modes: Vec<String> = list(&args, "--modes", "precopy,criu-cold");
    let json_path = PathBuf::from(arg(&args, "--json").unwrap_or_else(|| "bench.json".into()));
    let bin = std::env::current_exe().expect("exe").parent().expect("dir").to_path_buf();
    let problems = tests::environment_problems(&bin);
    if !problems.is_empty() {
        eprintln!("bench cannot run here:\n  - {}", problems.join("\n  - "));
        std::process::exit(1);
    }
    let tb = match Testbed::up("bench", &bin) {
        Ok(tb) => tb,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    println!(
        "{:>6} {:>8} {:>12} {:>10} {:>12} {:>10} {:>12} {:>6} {:>12}  note",
        "MiB", "dirty%/s", "content", "mode", "downtime ms", "total ms", "wire MiB", "rounds", "complete ms"
    );
    let mut rows = Vec::new();
    let mut case = 0usize;
    for &mib in &sizes {
        for &d in &dirty {
            for content in &contents {
                // Alternate which mode goes first: on a VM, memory freed by the previous run costs
                // host page faults when it is touched again (measured here: the same 1 GiB restore took
                // 3.2 s right after a large free and about 1 s afterwards), which favours whoever runs
                // second.
                case += 1;
                let mut order: Vec<&String> = modes.iter().collect();
                if case.is_multiple_of(2) {
                    order.reverse();
                }
                for mode in order {
                    let row = run_case(&tb, mib, d, content, mode);
                    println!(
                        "{:>6} {:>8} {:>12} {:>10} {:>12.0} {:>10.0} {:>12.1} {:>6} {:>12}  {}",
                        row.mib,
                        row.dirty_pct_per_s,
                        row.content,
                        row.mode,
                        row.downtime_ms,
                        row.total_ms,
                        row.wire_bytes as f64 / (1 << 20) as f64,
                        row.rounds,
                        row.complete_ms.map(|c| format!("{c:.0}")).unwrap_or_else(|| "-".into()),
                        if row.ok { row.note.clone() } else { format!("FAILED: {}", row.note) }
                    );
                    rows.push(row);
                }
            }
        }
    }
    // The target of pre-copy: downtime against CRIU cold migration of the same case.
    let mut ratios = Vec::new();
    for r in rows.iter().filter(|r| r.mode == "precopy" && r.ok) {
        let same = |c: &&Row| c.mib == r.mib && c.dirty_pct_per_s == r.dirty_pct_per_s && c.content == r.content;
        if let Some(cold) = rows.iter().filter(|c| c.mode == "criu-cold" && c.ok).find(same) {
            let ratio = r.downtime_ms / cold.downtime_ms;
            println!(
                "{:>6} MiB {:>4} %/s {:>12}: pre-copy downtime {:.0} ms = {:.2} x CRIU cold's {:.0} ms",
                r.mib, r.dirty_pct_per_s, r.content, r.downtime_ms, ratio, cold.downtime_ms
            );
            ratios.push(serde_json::json!({
                "mib": r.mib, "dirty_pct_per_s": r.dirty_pct_per_s, "content": r.content,
                "precopy_downtime_ms": r.downtime_ms, "criu_cold_downtime_ms": cold.downtime_ms, "ratio": ratio,
            }));
        }
    }
    let meta = serde_json::json!({
        "precopy_vs_criu_cold": ratios,
        "command": args.join(" "),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "rows": rows,
    });
    std::fs::write(&json_path, serde_json::to_string_pretty(&meta).expect("json")).expect("write json");
    println!("wrote {}", json_path.display());
    drop(tb);
    if rows.iter().any(|r| !r.ok) {
        std::process::exit(1);
    }
}

fn start(tb: &Testbed, mib: u64, dirty: f64, content: &str) -> (String, u32) {
    let name = format!("bench{}", unique());
    let (m, d) = (mib.to_string(), dirty.to_string());
    // Two writer threads rewrite whole random pages; the workload can prove afterwards that every write
    // survived (its `verified`).
    let mut a = vec!["mem", "--name", &name, "--mib", &m, "--dirty-pct", &d, "--writers", "2"];
    if content == "compressible" {
        a.push("--compressible");
    }
    let pid = tb.start_workload("a", &a);
    std::thread::sleep(Duration::from_secs(2)); // let it dirty pages for a while
    (name, pid)
}

fn run_case(tb: &Testbed, mib: u64, dirty: f64, content: &str, mode: &str) -> Row {
    let mut row = Row {
        mib,
        dirty_pct_per_s: dirty,
        content: content.into(),
        mode: mode.into(),
        ok: false,
        downtime_ms: 0.0,
        total_ms: 0.0,
        wire_bytes: 0,
        rounds: 0,
        complete_ms: None,
        note: String::new(),
    };
    let (name, pid) = start(tb, mib, dirty, content);
    match mode {
        "precopy" | "stopcopy" => {
            let r = tb.migrate_with("a", pid, &tb.addr("b"), &["--mode", mode]);
            row.ok = r.success;
            if r.success {
                let j = &r.json;
                row.downtime_ms = j["downtime_ms"].as_f64().unwrap_or(0.0);
                row.total_ms = j["total_ms"].as_f64().unwrap_or(0.0);
                row.wire_bytes = j["wire_bytes"].as_u64().unwrap_or(0);
                row.rounds = j["rounds"].as_u64().unwrap_or(0) as u32;
                row.complete_ms = j["complete_ms"].as_f64();
                let f = |k: &str| j[k].as_f64().unwrap_or(0.0);
                row.note = format!(
                    "dump {:.0} ms, transfer {:.0} ms, restore {:.0} ms, {} pages at the freeze",
                    f("dump_ms"),
                    f("transfer_ms"),
                    f("restore_ms"),
                    j["freeze_pages"]
                );
                // The workload replays its writes and compares all its memory: a wrong page is a failure.
                match tb.query("b", &name) {
                    Ok(v) if v["verified"] == true => row.note.push_str(", memory verified"),
                    other => {
                        row.ok = false;
                        row.note.push_str(&format!(", MEMORY DIFFERS: {other:?}"));
                    }
                }
            } else {
                row.note = r.json["error"].as_str().unwrap_or("").chars().take(200).collect();
                tb.kill("a", pid);
            }
        }
        "criu-cold" => match criu_cold(tb, pid) {
            Ok((downtime, wire, note)) => {
                row.ok = true;
                row.downtime_ms = downtime;
                row.total_ms = downtime;
                row.wire_bytes = wire;
                row.note = note;
            }
            Err(e) => {
                row.note = e;
                tb.kill("a", pid);
            }
        },
        other => row.note = format!("unknown mode {other}"),
    }
    tb.kill("b", pid);
    row
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// criu dump (tmpfs on a) -> TCP copy over the veth -> criu restore on b. Returns (downtime ms, bytes
/// copied, breakdown).
fn criu_cold(tb: &Testbed, pid: u32) -> Result<(f64, u64, String), String> {
    let n = unique();
    let src = PathBuf::from(format!("/dev/shm/bench-{}-{n}-a", std::process::id()));
    let dst = PathBuf::from(format!("/dev/shm/bench-{}-{n}-b", std::process::id()));
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&src).map_err(|e| e.to_string())?;
    let (s, d) = (src.to_str().expect("utf8").to_string(), dst.to_str().expect("utf8").to_string());
    let bench = tb.bin.join("bench");
    let port = 7600 + (n % 100) as u16;
    let listen = format!("{}:{port}", tb.addr("b"));
    // The receiver waits on b before the freeze, as a prepared operator would.
    let mut recv = std::process::Command::new(tb.repo.join("deploy/testbed"))
        .args(["exec", "b", bench.to_str().expect("utf8"), "copy-recv", "--dir", &d, "--listen", &listen])
        .env("TESTBED_NAME", &tb.name)
        .env("MIGRATE_BIN_DIR", &tb.bin)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut first = [0u8; 10];
    let _ = recv.stdout.as_mut().expect("piped").read(&mut first); // "listening\n"
    let result = (|| {
        let t0 = Instant::now();
        let dump = tb.exec(
            "a",
            &[
                "criu",
                "dump",
                "--tree",
                &pid.to_string(),
                "--images-dir",
                &s,
                "--leave-stopped",
                "--log-file",
                "dump.log",
            ],
        );
        if !dump.status.success() {
            return Err(format!("criu dump failed: {}", criu::log_errors(&src.join("dump.log"))));
        }
        let t1 = Instant::now();
        let sent = tb.exec("a", &[bench.to_str().expect("utf8"), "copy-send", "--dir", &s, "--to", &listen]);
        if !sent.status.success() {
            return Err(format!("copy failed: {}", String::from_utf8_lossy(&sent.stderr)));
        }
        let wire: u64 = String::from_utf8_lossy(&sent.stdout).trim().parse().unwrap_or(0);
        let _ = recv.wait();
        let t2 = Instant::now();
        let restore =
            tb.exec("b", &["criu", "restore", "--images-dir", &d, "--restore-detached", "--log-file", "restore.log"]);
        if !restore.status.success() {
            return Err(format!("criu restore failed: {}", criu::log_errors(&dst.join("restore.log"))));
        }
        let t3 = Instant::now();
        let running = wait_until(Duration::from_secs(5), || tb.running("b", pid));
        if !running {
            return Err("restored process does not run on b".into());
        }
        Ok((
            ms(t3 - t0),
            wire,
            format!("dump {:.0} ms, copy {:.0} ms, restore {:.0} ms", ms(t1 - t0), ms(t2 - t1), ms(t3 - t2)),
        ))
    })();
    let _ = recv.kill();
    let _ = recv.wait();
    tb.kill("a", pid);
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(&dst);
    result
}

/// Sends every file of --dir (but CRIU's log) to --to: u16 name length, name, u64 size, bytes; a zero
/// name length ends. Prints the bytes sent.
fn copy_send(args: &[String]) {
    let dir = PathBuf::from(arg(args, "--dir").expect("--dir"));
    let to = arg(args, "--to").expect("--to");
    let mut s = None;
    for _ in 0..100 {
        if let Ok(c) = std::net::TcpStream::connect(&to) {
            s = Some(c);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut s = s.unwrap_or_else(|| panic!("cannot connect to {to}"));
    let mut total = 0u64;
    for e in std::fs::read_dir(&dir).expect("dir").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "dump.log" {
            continue;
        }
        // Streamed through a small buffer, as the agents do: a buffer as large as the file would leave a
        // GiB of just-freed memory that the restore then reuses warm (on a VM that is much faster to
        // touch than cold memory), which would flatter this baseline.
        let mut f = std::fs::File::open(e.path()).expect("open");
        let size = f.metadata().expect("stat").len();
        s.write_all(&(name.len() as u16).to_le_bytes()).expect("send");
        s.write_all(name.as_bytes()).expect("send");
        s.write_all(&size.to_le_bytes()).expect("send");
        let copied = std::io::copy(&mut f, &mut s).expect("send");
        assert_eq!(copied, size, "{name} changed while being sent");
        total += 10 + name.len() as u64 + size;
    }
    s.write_all(&0u16.to_le_bytes()).expect("send");
    let mut ack = [0u8; 1];
    let _ = s.read_exact(&mut ack);
    println!("{total}");
}

/// Receives what copy-send sends into --dir, then acknowledges and exits.
fn copy_recv(args: &[String]) {
    let dir = PathBuf::from(arg(args, "--dir").expect("--dir"));
    let listen = arg(args, "--listen").expect("--listen");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let l = std::net::TcpListener::bind(&listen).unwrap_or_else(|e| panic!("bind {listen}: {e}"));
    println!("listening");
    let _ = std::io::stdout().flush();
    let (mut s, _) = l.accept().expect("accept");
    loop {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).expect("read");
        let len = u16::from_le_bytes(len) as usize;
        if len == 0 {
            break;
        }
        let mut name = vec![0u8; len];
        s.read_exact(&mut name).expect("read");
        let name = String::from_utf8(name).expect("utf8");
        assert!(!name.contains('/') && !name.starts_with('.'), "bad name {name}");
        let mut size = [0u8; 8];
        s.read_exact(&mut size).expect("read");
        let size = u64::from_le_bytes(size);
        let mut f = std::fs::File::create(Path::new(&dir).join(&name)).expect("create");
        let copied = std::io::copy(&mut (&mut s).take(size), &mut f).expect("receive");
        assert_eq!(copied, size, "{name}: connection ended early");
    }
    s.write_all(&[1]).expect("ack");
}
