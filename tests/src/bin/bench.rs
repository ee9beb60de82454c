//! `bench`: measures migrations between the two namespaced testbed hosts and compares this project with
//! plain CRIU, in one run, on the same workloads. Prints a table and writes JSON.
//!
//!   bench [--sizes 256,1024] [--dirty 0,1,10] [--content random,compressible]
//!         [--modes hybrid,postcopy,precopy,criu-cold,criu-lazy] [--repeat 1] [--json bench.json]
//!         [--link-mib 1024] [--testbed bench]
//!
//! The post-copy comparison: `bench --sizes 256,1024,2048 --dirty 10 --content random
//! --modes hybrid,postcopy,precopy,criu-cold,criu-lazy`.
//!
//! Modes:
//! - `precopy`, `postcopy`, `hybrid`, `stopcopy`: this project's `migrate --mode MODE`. Downtime, total
//!   time, bytes, rounds, `complete ms` (from the freeze until every page was in place on b), the
//!   faults the target answered meanwhile (`faults`) and their latencies (`fault p50/p99 us`, pages
//!   fetched on a fault) are what `migrate --json` reports.
//! - `criu-cold`: plain CRIU cold migration: `criu dump` to tmpfs on a, the files copied over the same
//!   veth link with a plain TCP stream (this binary's `copy-send`/`copy-recv`), `criu restore` on b.
//!   Downtime runs from the freeze (when CRIU stopped the tree, seen as the agents see it:
//!   `criu::tree::StopWatch`) to the end of the restore, on the bench's clock; it includes a few ms of
//!   `nsenter` per step.
//! - `criu-lazy`: plain CRIU lazy (post-copy) migration: `criu dump --lazy-pages --address A --port P`
//!   on a (every image but the private memory, which stays in the frozen tree and is served by CRIU's
//!   page server), the image files copied to b as for `criu-cold`, then on b `criu lazy-pages
//!   --page-server` (waited for on its `--status-fd`) and `criu restore --lazy-pages --restore-detached`.
//!   Downtime runs from the freeze (as above) until the restore returned; `complete ms` until `criu
//!   lazy-pages` exited, i.e. every page had crossed; `total ms` until the dump on a exited (after the
//!   transfer CRIU kills the source tree, its default). Bytes on the wire: the image files plus the lazy
//!   pages (4 KiB each, as `pagemap-*.img` lists them).
//!
//! After every migration the workload on b replays its writes and compares all its memory (`workload
//! query`, `verified`); a difference fails the case. It also says how long it did not run: `paused
//! ms` is the longest gap between two ticks of its 1 ms counter thread (by CLOCK_REALTIME, which the
//! restored copy's new time namespace leaves alone) that ended during the case. That is the downtime
//! the program saw, for every mode alike; `downtime ms` is the tools' own account, which for this
//! project's modes ends only once the source agent heard that the copy runs. Neither counts CRIU's
//! start before it stops the tree (about 35 ms here, as `/run` is no tmpfs and CRIU cannot keep its
//! kerndat cache).
//!
//! `--repeat N` runs every case N times (all its modes, then all of them again, so that each mode meets
//! the machine in the same states), prints a row per migration and then, per case and mode, the median
//! and the range of `downtime ms`, `complete ms`, `x link` and `faults` (`repeats` in the JSON). A single
//! migration varies: 2 GiB hybrids on the test VM completed anywhere in 1.1-1.5 s from one run to the
//! next.
//!
//! Every step has a time limit; a step that overruns is killed with everything it started, and the
//! case fails with a note saying which step it was.
//!
//! Once per run, before the cases, the bench measures the TCP throughput from a to b over the same veth
//! (`--link-mib`, default 1 GiB, this binary's `rate-send`/`rate-recv`): `link_mb_s` in the JSON, in
//! 10^6 bytes per second. The post-copy target is every page on the target within 1.2 x (memory / link
//! rate); the `x link` column is `complete ms / (memory bytes / link rate)` for every row with a complete
//! time. It also measures one QUIC stream from a to b with the agents' own TLS, transport settings and
//! sockets (`quic-send`/`quic-recv`, the same size): `quic_mb_s` in the JSON, with the path MTU quinn
//! reached and its losses (`quic_path`). That is the most the pages stream can carry on this machine.
//! And it measures, on b, how fast pages can be placed into fresh memory at all, with no network: one
//! process copies `--link-mib` of pages into a new mapping of its own with UFFDIO_COPY, 64 pages per
//! ioctl as the lazy-pages daemon does (`fill`): `fill_mb_s` in the JSON, the floor of `complete ms`
//! whatever the link. The kernel may back that mapping with memory freed just before; on a VM whose
//! host backs guest memory only on first touch, memory never touched fills several times slower
//! (measured here: 2 GiB at 2.4-3.8 GB/s after earlier use, 16 GiB at 656 MB/s mostly untouched), so
//! a migration can place pages slower than `fill` says. Then the same with the pages taken out of a
//! held copy, as hybrid's complete phase takes them out of the page store (`fill --from-store`: copy
//! out, UFFDIO_COPY, give the source back): `store_fill_mb_s`, the floor of hybrid's `complete ms`.
//!
//! Workloads (`workload mem`) dirty `--dirty` percent of their pages per second while they run, for two
//! seconds before the migration starts. Needs root, CRIU and a release build (like the integration
//! suite); it brings up its own testbed (named `--testbed`, default "bench") and takes it down at the end.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tests::{Testbed, longest_stall, unique, unix_ms, wait_until};

/// The modes that run through this project's `migrate --mode MODE`.
const MIGRATE_MODES: [&str; 4] = ["precopy", "postcopy", "hybrid", "stopcopy"];

/// The post-copy target: every page on the target within this many times memory / link rate.
const LINK_TARGET: f64 = 1.2;

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
    /// How long the workload itself did not run during the migration: the longest gap between two
    /// ticks of its 1 ms counter thread, by CLOCK_REALTIME, that ended while the case ran (the
    /// workload's `stalls`). Unlike `downtime_ms` it leaves out the wait for the word that the copy
    /// runs.
    paused_ms: Option<f64>,
    total_ms: f64,
    wire_bytes: u64,
    rounds: u32,
    /// From the freeze until all memory was in place on the target.
    complete_ms: Option<f64>,
    /// `complete_ms / (memory bytes / link rate)`; the post-copy target is at most [`LINK_TARGET`].
    complete_vs_link: Option<f64>,
    /// Page faults of the restored tree that the target answered while it filled the memory in (this
    /// project's post-copy modes); each one cost the lazy-pages daemon's thread a wake-up of the faulting
    /// task (README, "Not done yet").
    faults: Option<u64>,
    /// Latency of the faults served over the network (this project's post-copy modes).
    fault_p50_us: Option<f64>,
    fault_p99_us: Option<f64>,
    note: String,
}

impl Row {
    /// Whether `other` measured the same case (size, dirty rate, content), in whatever mode.
    fn same_case(&self, other: &Row) -> bool {
        self.mib == other.mib && self.dirty_pct_per_s == other.dirty_pct_per_s && self.content == other.content
    }
}

/// Per case and mode of a `--repeat` run: the median and range of the figures a single migration
/// varies in, printed as a line each and returned for the JSON. Only migrations that succeeded count.
fn summarize_repeats(rows: &[Row]) -> Vec<serde_json::Value> {
    fn spread(mut v: Vec<f64>) -> Option<(f64, f64, f64)> {
        v.sort_by(f64::total_cmp);
        let median = match v.len() {
            0 => return None,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        Some((median, v[0], v[v.len() - 1]))
    }
    let show = |s: Option<(f64, f64, f64)>, decimals: usize| match s {
        Some((m, lo, hi)) => format!("{m:.decimals$} ({lo:.decimals$}-{hi:.decimals$})"),
        None => "-".into(),
    };
    let alike = |a: &Row, b: &Row| a.same_case(b) && a.mode == b.mode;
    let mut out = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        if rows[..i].iter().any(|o| alike(o, r)) {
            continue;
        }
        let runs: Vec<&Row> = rows.iter().filter(|o| alike(o, r)).collect();
        let ok: Vec<&&Row> = runs.iter().filter(|o| o.ok).collect();
        let downtime = spread(ok.iter().map(|o| o.downtime_ms).collect());
        let complete = spread(ok.iter().filter_map(|o| o.complete_ms).collect());
        let vs_link = spread(ok.iter().filter_map(|o| o.complete_vs_link).collect());
        let faults = spread(ok.iter().filter_map(|o| o.faults.map(|f| f as f64)).collect());
        let within = ok.iter().filter(|o| o.complete_vs_link.is_some_and(|x| x <= LINK_TARGET)).count();
        println!(
            "{:>6} MiB {:>4} %/s {:>12} {:>10}: {} of {} succeeded; downtime ms {}; complete ms {}; x link {} \
             ({within} within {LINK_TARGET}); faults {}",
            r.mib,
            r.dirty_pct_per_s,
            r.content,
            r.mode,
            ok.len(),
            runs.len(),
            show(downtime, 0),
            show(complete, 0),
            show(vs_link, 2),
            show(faults, 0),
        );
        let json = |s: Option<(f64, f64, f64)>| {
            s.map(|(median, min, max)| serde_json::json!({"median": median, "min": min, "max": max}))
        };
        out.push(serde_json::json!({
            "mib": r.mib, "dirty_pct_per_s": r.dirty_pct_per_s, "content": r.content, "mode": r.mode,
            "runs": runs.len(), "succeeded": ok.len(), "within_link_target": within,
            "downtime_ms": json(downtime), "complete_ms": json(complete), "complete_vs_link": json(vs_link),
            "faults": json(faults),
        }));
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("copy-send") => return copy_send(&args),
        Some("copy-recv") => return copy_recv(&args),
        Some("rate-send") => return rate_send(&args),
        Some("rate-recv") => return rate_recv(&args),
        Some("quic-send") => return quic_send(&args),
        Some("quic-recv") => return quic_recv(&args),
        Some("fill") => return fill(&args),
        _ => {}
    }
    // Unknown words would otherwise be ignored and start the whole default run.
    const OPTIONS: [&str; 8] =
        ["--sizes", "--dirty", "--content", "--modes", "--repeat", "--json", "--link-mib", "--testbed"];
    if let Some(bad) = args[1..].iter().step_by(2).find(|a| !OPTIONS.contains(&a.as_str())) {
        let usage = "usage: bench [--sizes 256,1024] [--dirty 0,1,10] [--content random,compressible]\n             [--modes hybrid,postcopy,precopy,criu-cold,criu-lazy] [--repeat 1] [--json bench.json]\n             [--link-mib 1024] [--testbed bench]\n(the doc comment of tests/src/bin/bench.rs says what each column means)";
        if bad == "--help" || bad == "-h" {
            println!("{usage}");
            return;
        }
        eprintln!("bench: unknown option {bad:?}\n{usage}");
        std::process::exit(2);
    }
    let sizes: Vec<u64> = list(&args, "--sizes", "256,1024");
    let dirty: Vec<f64> = list(&args, "--dirty", "0,1,10");
    let contents: Vec<String> = list(&args, "--content", "random,compressible");
    let modes: Vec<String> = list(&args, "--modes", "hybrid,postcopy,precopy,criu-cold,criu-lazy");
    let repeat: usize = match arg(&args, "--repeat").map(|r| r.parse::<usize>()) {
        None => 1,
        Some(Ok(n)) if n >= 1 => n,
        Some(_) => {
            eprintln!("bench: --repeat takes a whole number of at least 1");
            std::process::exit(2);
        }
    };
    let json_path = PathBuf::from(arg(&args, "--json").unwrap_or_else(|| "bench.json".into()));
    let link_mib: u64 = arg(&args, "--link-mib").and_then(|m| m.parse().ok()).unwrap_or(1024);
    let testbed = arg(&args, "--testbed").unwrap_or_else(|| "bench".into());
    let bin = std::env::current_exe().expect("exe").parent().expect("dir").to_path_buf();
    let problems = tests::environment_problems(&bin);
    if !problems.is_empty() {
        eprintln!("bench cannot run here:\n  - {}", problems.join("\n  - "));
        std::process::exit(1);
    }
    let tb = match Testbed::up(&testbed, &bin) {
        Ok(tb) => tb,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    // Bytes per second from a to b over the veth, once per run.
    let link = link_rate(&tb, link_mib << 20);
    match &link {
        Ok(rate) => println!(
            "link a -> b: {:.0} MB/s ({:.0} MiB/s), {link_mib} MiB over one TCP stream; post-copy target: \
             complete ms <= {LINK_TARGET} x memory / link rate (column `x link`)",
            rate / 1e6,
            rate / (1 << 20) as f64
        ),
        Err(e) => println!("link a -> b: NOT MEASURED: {e}"),
    }
    let quic = quic_rate(&tb, link_mib << 20);
    match &quic {
        Ok((rate, path)) => println!(
            "QUIC a -> b: {:.0} MB/s, {link_mib} MiB on one stream with the agents' TLS and transport (the \
             ceiling of the pages stream here; {path})",
            rate / 1e6
        ),
        Err(e) => println!("QUIC a -> b: NOT MEASURED: {e}"),
    }
    let fill = fill_rate(&tb, link_mib << 20, &[]);
    match &fill {
        Ok(rate) => println!(
            "fill on b: {:.0} MB/s, {link_mib} MiB placed with UFFDIO_COPY ({} pages per call) into fresh memory, \
             no network (the most the target can place here)",
            rate / 1e6,
            target_agent::lazy::PUSH_BATCH_PAGES
        ),
        Err(e) => println!("fill on b: NOT MEASURED: {e}"),
    }
    let store_fill = fill_rate(&tb, link_mib << 20, &["--from-store"]);
    match &store_fill {
        Ok(rate) => println!(
            "fill from a store on b: {:.0} MB/s, {link_mib} MiB as the daemon's one thread takes a held copy: \
             copied out, UFFDIO_COPY, source given back (hybrid's complete phase at its floor)",
            rate / 1e6
        ),
        Err(e) => println!("fill from a store on b: NOT MEASURED: {e}"),
    }
    println!(
        "{:>6} {:>8} {:>12} {:>10} {:>12} {:>10} {:>10} {:>10} {:>6} {:>12} {:>7} {:>7} {:>12} {:>12}  note",
        "MiB",
        "dirty%/s",
        "content",
        "mode",
        "downtime ms",
        "paused ms",
        "total ms",
        "wire MiB",
        "rounds",
        "complete ms",
        "x link",
        "faults",
        "fault p50 us",
        "fault p99 us"
    );
    let opt = |v: Option<f64>, decimals: usize| v.map(|c| format!("{c:.decimals$}")).unwrap_or_else(|| "-".into());
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
                for mode in (0..repeat).flat_map(|_| order.iter().copied()) {
                    let mut row = run_case(&tb, mib, d, content, mode);
                    if let (Some(c), Ok(rate)) = (row.complete_ms, &link) {
                        row.complete_vs_link = Some(c / ((mib << 20) as f64 / rate * 1000.0));
                    }
                    println!(
                        "{:>6} {:>8} {:>12} {:>10} {:>12.0} {:>10} {:>10.0} {:>10.1} {:>6} {:>12} {:>7} {:>7} {:>12} {:>12}  {}",
                        row.mib,
                        row.dirty_pct_per_s,
                        row.content,
                        row.mode,
                        row.downtime_ms,
                        opt(row.paused_ms, 0),
                        row.total_ms,
                        row.wire_bytes as f64 / (1 << 20) as f64,
                        row.rounds,
                        opt(row.complete_ms, 0),
                        opt(row.complete_vs_link, 2),
                        opt(row.faults.map(|f| f as f64), 0),
                        opt(row.fault_p50_us, 0),
                        opt(row.fault_p99_us, 0),
                        if row.ok { row.note.clone() } else { format!("FAILED: {}", row.note) }
                    );
                    rows.push(row);
                }
            }
        }
    }
    let repeats = if repeat > 1 { summarize_repeats(&rows) } else { Vec::new() };
    // "; paused P ms = R x NAME's Q ms", when both workloads saw their stall.
    let paused = |r: &Row, base: &Row, name: &str| match (r.paused_ms, base.paused_ms) {
        (Some(a), Some(b)) => format!("; paused {a:.0} ms = {:.2} x {name}'s {b:.0} ms", a / b),
        _ => String::new(),
    };
    // The target of pre-copy: downtime against CRIU cold migration of the same case.
    let mut ratios = Vec::new();
    for r in rows.iter().filter(|r| r.mode == "precopy" && r.ok) {
        if let Some(cold) = rows.iter().filter(|c| c.mode == "criu-cold" && c.ok).find(|c| r.same_case(c)) {
            let ratio = r.downtime_ms / cold.downtime_ms;
            println!(
                "{:>6} MiB {:>4} %/s {:>12}: pre-copy downtime {:.0} ms = {:.2} x CRIU cold's {:.0} ms{}",
                r.mib,
                r.dirty_pct_per_s,
                r.content,
                r.downtime_ms,
                ratio,
                cold.downtime_ms,
                paused(r, cold, "CRIU cold")
            );
            ratios.push(serde_json::json!({
                "mib": r.mib, "dirty_pct_per_s": r.dirty_pct_per_s, "content": r.content,
                "precopy_downtime_ms": r.downtime_ms, "criu_cold_downtime_ms": cold.downtime_ms, "ratio": ratio,
                "precopy_paused_ms": r.paused_ms, "criu_cold_paused_ms": cold.paused_ms,
            }));
        }
    }
    // Post-copy against CRIU's own lazy migration of the same case: downtime, and time to complete.
    let mut lazy_ratios = Vec::new();
    for r in rows.iter().filter(|r| (r.mode == "hybrid" || r.mode == "postcopy") && r.ok) {
        if let Some(lazy) = rows.iter().filter(|c| c.mode == "criu-lazy" && c.ok).find(|c| r.same_case(c)) {
            let ratio = r.downtime_ms / lazy.downtime_ms;
            let complete = match (r.complete_ms, lazy.complete_ms) {
                (Some(a), Some(b)) => format!("; complete {a:.0} ms = {:.2} x CRIU lazy's {b:.0} ms", a / b),
                _ => String::new(),
            };
            println!(
                "{:>6} MiB {:>4} %/s {:>12}: {} downtime {:.0} ms = {:.2} x CRIU lazy's {:.0} ms{}{complete}",
                r.mib,
                r.dirty_pct_per_s,
                r.content,
                r.mode,
                r.downtime_ms,
                ratio,
                lazy.downtime_ms,
                paused(r, lazy, "CRIU lazy")
            );
            lazy_ratios.push(serde_json::json!({
                "mib": r.mib, "dirty_pct_per_s": r.dirty_pct_per_s, "content": r.content, "mode": r.mode,
                "downtime_ms": r.downtime_ms, "criu_lazy_downtime_ms": lazy.downtime_ms, "ratio": ratio,
                "paused_ms": r.paused_ms, "criu_lazy_paused_ms": lazy.paused_ms,
                "complete_ms": r.complete_ms, "criu_lazy_complete_ms": lazy.complete_ms,
            }));
        }
    }
    let meta = serde_json::json!({
        "link_mb_s": link.as_ref().ok().map(|r| r / 1e6),
        "link_error": link.as_ref().err(),
        "quic_mb_s": quic.as_ref().ok().map(|(r, _)| r / 1e6),
        "quic_path": quic.as_ref().ok().map(|(_, p)| p.clone()),
        "quic_error": quic.as_ref().err(),
        "fill_mb_s": fill.as_ref().ok().map(|r| r / 1e6),
        "fill_error": fill.as_ref().err(),
        "store_fill_mb_s": store_fill.as_ref().ok().map(|r| r / 1e6),
        "store_fill_error": store_fill.as_ref().err(),
        "link_target": LINK_TARGET,
        "repeat": repeat,
        "repeats": repeats,
        "precopy_vs_criu_cold": ratios,
        "postcopy_vs_criu_lazy": lazy_ratios,
        "command": args.join(" "),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "rows": rows,
    });
    std::fs::write(&json_path, serde_json::to_string_pretty(&meta).expect("json")).expect("write json");
    println!("wrote {}", json_path.display());
    drop(tb);
    if link.is_err() || rows.iter().any(|r| !r.ok) {
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

/// The time a step that moves `mib` MiB may take before it counts as hung.
fn limit(mib: u64) -> Duration {
    Duration::from_secs(60) + Duration::from_millis(mib * 100)
}

/// How long CRIU's own lazy migration may take to fetch every page after its restore. Its daemon
/// fetches a page per fault and pushes the rest slowly: measured here at 2 GiB and 10 %/s, 617 s in one
/// run and over 794 s in another, so six times the usual limit (26 min at 2 GiB).
fn lazy_limit(mib: u64) -> Duration {
    limit(mib) * 6
}

fn run_case(tb: &Testbed, mib: u64, dirty: f64, content: &str, mode: &str) -> Row {
    let mut row = Row {
        mib,
        dirty_pct_per_s: dirty,
        content: content.into(),
        mode: mode.into(),
        ok: false,
        downtime_ms: 0.0,
        paused_ms: None,
        total_ms: 0.0,
        wire_bytes: 0,
        rounds: 0,
        complete_ms: None,
        complete_vs_link: None,
        faults: None,
        fault_p50_us: None,
        fault_p99_us: None,
        note: String::new(),
    };
    let (name, pid) = start(tb, mib, dirty, content);
    let from = unix_ms();
    match mode {
        m if MIGRATE_MODES.contains(&m) => match migrate(tb, pid, m, limit(mib) * 2) {
            Ok(j) => {
                row.ok = true;
                row.downtime_ms = j["downtime_ms"].as_f64().unwrap_or(0.0);
                row.total_ms = j["total_ms"].as_f64().unwrap_or(0.0);
                row.wire_bytes = j["wire_bytes"].as_u64().unwrap_or(0);
                row.rounds = j["rounds"].as_u64().unwrap_or(0) as u32;
                row.complete_ms = j["complete_ms"].as_f64();
                row.faults = row.complete_ms.and(j["faults"].as_u64());
                row.fault_p50_us = j["fault_p50_us"].as_f64();
                row.fault_p99_us = j["fault_p99_us"].as_f64();
                let f = |k: &str| j[k].as_f64().unwrap_or(0.0);
                row.note = format!(
                    "dump {:.0} ms, transfer {:.0} ms, restore {:.0} ms, {} pages at the freeze",
                    f("dump_ms"),
                    f("transfer_ms"),
                    f("restore_ms"),
                    j["freeze_pages"]
                );
                // A lazy dump that left memory out of the lazy ranges (it then crosses in the image files,
                // during the freeze): locked or hugetlb memory, or a CRIU without deploy/criu-patches
                // (criu::Criu::stack_bug); keep the source agent's account of it.
                let written = j["image_page_bytes"].as_u64().unwrap_or(0);
                if m != "stopcopy" && written > source_agent::precopy::NOT_LAZY_BYTES {
                    let why = tb.not_lazy_warnings("a", &j).pop().unwrap_or_default();
                    row.note += &format!("; {} MiB of memory in the image files: {why}", written >> 20);
                }
            }
            Err(e) => {
                row.note = e.chars().take(300).collect();
                tb.kill("a", pid);
            }
        },
        "criu-cold" => match criu_cold(tb, pid, mib) {
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
        "criu-lazy" => match criu_lazy(tb, pid, mib) {
            Ok(l) => {
                row.ok = true;
                row.downtime_ms = l.downtime_ms;
                row.total_ms = l.total_ms;
                row.complete_ms = Some(l.complete_ms);
                row.wire_bytes = l.wire_bytes;
                row.note = l.note;
            }
            Err(e) => {
                row.note = e;
                tb.kill("a", pid);
            }
        },
        other => row.note = format!("unknown mode {other}"),
    }
    let to = unix_ms();
    if row.ok {
        // The workload replays its writes and compares all its memory: a wrong page is a failure.
        match tb.query("b", &name) {
            Ok(v) if v["verified"] == true => {
                row.note.push_str(", memory verified");
                row.paused_ms = longest_stall(&v["stalls"], from, to);
            }
            other => {
                row.ok = false;
                row.note.push_str(&format!(", MEMORY DIFFERS: {other:?}"));
            }
        }
    }
    tb.kill("b", pid);
    row
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A command on a testbed host (`deploy/testbed exec HOST ...`) that leads its own process group: nsenter,
/// its child inside the host's namespaces and what that execs (CRIU, a helper) all stay in the group, so a
/// timeout ends every one of them by the group's id. Dropped while it still runs, the group is killed.
struct HostProc {
    what: String,
    child: Child,
    status: Option<ExitStatus>,
    /// Its stderr, read all along by a thread (so a chatty command never blocks on a full pipe).
    stderr: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl HostProc {
    fn spawn(tb: &Testbed, host: &str, args: &[&str], what: &str) -> Result<HostProc, String> {
        let mut a = vec!["exec", host];
        a.extend_from_slice(args);
        let mut child = tb
            .command(&a)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {what}: {e}"))?;
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        if let Some(mut e) = child.stderr.take() {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = e.read(&mut buf) {
                    sink.lock().expect("stderr buffer").extend_from_slice(&buf[..n]);
                }
            });
        }
        Ok(HostProc { what: what.into(), child, status: None, stderr })
    }

    /// `criu ARGS` on `host`, with CRIU's `--status-fd 3` on our stdout pipe (its own stdout goes to
    /// /dev/null): [`HostProc::ready`] then reads the `\0` CRIU writes once it is ready.
    fn criu_with_status(tb: &Testbed, host: &str, args: &[&str], what: &str) -> Result<HostProc, String> {
        let mut a = vec!["sh", "-c", "exec \"$@\" --status-fd 3 3>&1 >/dev/null", "sh", "criu"];
        a.extend_from_slice(args);
        HostProc::spawn(tb, host, &a, what)
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits until it exits, at most until `deadline`. Polls every millisecond: this is on timed paths.
    fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Exits 0 within `timeout`; otherwise it is killed and the error says which it was.
    fn finish(&mut self, timeout: Duration) -> Result<(), String> {
        match self.wait_until(Instant::now() + timeout) {
            Some(s) if s.success() => Ok(()),
            Some(s) => Err(format!("{} failed ({s}){}", self.what, self.stderr_tail())),
            None => {
                self.kill();
                Err(format!("{} did not finish within {} s (killed)", self.what, timeout.as_secs()))
            }
        }
    }

    /// Reads its stdout up to the first `\0` or newline (CRIU's status byte, a helper's "listening"),
    /// at most `timeout`. On EOF first, it is waited for (briefly) and the error carries its stderr; on
    /// timeout it is killed.
    fn ready(&mut self, timeout: Duration) -> Result<(), String> {
        let mut out = self.child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut byte = [0u8; 1];
            let ready = loop {
                match out.read(&mut byte) {
                    Ok(1) if byte[0] == 0 || byte[0] == b'\n' => break true,
                    Ok(1) => continue,
                    _ => break false,
                }
            };
            let _ = tx.send(ready);
        });
        match rx.recv_timeout(timeout) {
            Ok(true) => Ok(()),
            Ok(false) => {
                let status = self.wait_until(Instant::now() + Duration::from_secs(5));
                Err(format!(
                    "{} ended before it was ready ({}){}",
                    self.what,
                    status.map(|s| s.to_string()).unwrap_or_else(|| "still running".into()),
                    self.stderr_tail()
                ))
            }
            Err(_) => {
                self.kill();
                Err(format!("{} was not ready within {} s (killed)", self.what, timeout.as_secs()))
            }
        }
    }

    /// Its stdout to the end (after it exited).
    fn stdout(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_string(&mut s);
        }
        s
    }

    /// The end of what it wrote on stderr so far (": ..."), or nothing.
    fn stderr_tail(&self) -> String {
        let text = String::from_utf8_lossy(&self.stderr.lock().expect("stderr buffer")).into_owned();
        let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(3)..].join(" / ");
        if tail.is_empty() { tail } else { format!(": {tail}") }
    }

    /// Kills the whole group unless it already ended (then its id may belong to someone else).
    fn kill(&mut self) {
        if self.exited().is_some() {
            return;
        }
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        self.status = self.child.wait().ok();
    }
}

impl Drop for HostProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `migrate --mode MODE --json PID b` on a, at most `timeout`: its JSON when it succeeded, else why not.
fn migrate(tb: &Testbed, pid: u32, mode: &str, timeout: Duration) -> Result<serde_json::Value, String> {
    let p = pid.to_string();
    let b = tb.addr("b");
    let mut m = HostProc::spawn(tb, "a", &["migrate", "--mode", mode, "--json", &p, &b], "migrate")?;
    // migrate prints its JSON only at the end, far below a pipe's capacity: reading after the exit is fine.
    let status = m.wait_until(Instant::now() + timeout);
    if status.is_none() {
        m.kill();
        return Err(format!("migrate did not finish within {} s (killed; the agents go on alone)", timeout.as_secs()));
    }
    let out = m.stdout();
    match serde_json::from_str::<serde_json::Value>(&out) {
        Ok(j) if status.is_some_and(|s| s.success()) => Ok(j),
        Ok(j) => Err(j["error"].as_str().map(str::to_string).unwrap_or_else(|| j.to_string())),
        Err(_) => Err(format!("migrate printed no JSON{}", m.stderr_tail())),
    }
}

/// Temporary images dirs on a and b (both see /dev/shm), removed on drop.
struct Dirs {
    a: PathBuf,
    b: PathBuf,
}

impl Dirs {
    fn new(n: u64) -> Result<Dirs, String> {
        let a = PathBuf::from(format!("/dev/shm/bench-{}-{n}-a", std::process::id()));
        let b = PathBuf::from(format!("/dev/shm/bench-{}-{n}-b", std::process::id()));
        let _ = std::fs::remove_dir_all(&a);
        let _ = std::fs::remove_dir_all(&b);
        std::fs::create_dir_all(&a).map_err(|e| format!("mkdir {}: {e}", a.display()))?;
        Ok(Dirs { a, b })
    }

    fn a(&self) -> &str {
        self.a.to_str().expect("utf8")
    }

    fn b(&self) -> &str {
        self.b.to_str().expect("utf8")
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.a);
        let _ = std::fs::remove_dir_all(&self.b);
    }
}

/// `bench copy-recv` on b into `dir`, listening on `listen` once this returns (as a prepared operator
/// would have it waiting before the freeze).
fn copy_receiver(tb: &Testbed, dir: &str, listen: &str) -> Result<HostProc, String> {
    let bench = tb.bin.join("bench");
    let mut recv = HostProc::spawn(
        tb,
        "b",
        &[bench.to_str().expect("utf8"), "copy-recv", "--dir", dir, "--listen", listen],
        "copy-recv on b",
    )?;
    recv.ready(Duration::from_secs(10))?;
    Ok(recv)
}

/// Copies the image files of `dir` on a to the receiver: bytes sent.
fn copy_images(tb: &Testbed, dir: &str, to: &str, recv: &mut HostProc, timeout: Duration) -> Result<u64, String> {
    let bench = tb.bin.join("bench");
    let mut send = HostProc::spawn(
        tb,
        "a",
        &[bench.to_str().expect("utf8"), "copy-send", "--dir", dir, "--to", to],
        "copy-send on a",
    )?;
    send.finish(timeout)?;
    recv.finish(Duration::from_secs(10))?;
    Ok(send.stdout().trim().parse().unwrap_or(0))
}

/// criu dump (tmpfs on a) -> TCP copy over the veth -> criu restore on b. Returns (downtime ms, bytes
/// copied, breakdown).
fn criu_cold(tb: &Testbed, pid: u32, mib: u64) -> Result<(f64, u64, String), String> {
    let n = unique();
    let dirs = Dirs::new(n)?;
    let listen = format!("{}:{}", tb.addr("b"), 7600 + (n % 100) as u16);
    let mut recv = copy_receiver(tb, dirs.b(), &listen)?;
    let result = (|| {
        let started = Instant::now();
        let watch = criu::tree::StopWatch::start(pid);
        let p = pid.to_string();
        let args =
            ["criu", "dump", "--tree", &p, "--images-dir", dirs.a(), "--leave-stopped", "--log-file", "dump.log"];
        HostProc::spawn(tb, "a", &args, "criu dump")?
            .finish(limit(mib))
            .map_err(|e| format!("{e}: {}", criu::log_errors(&dirs.a.join("dump.log"))))?;
        let t1 = Instant::now();
        // From the freeze, as the agents count it.
        let t0 = watch.stopped_at().unwrap_or(started);
        let wire = copy_images(tb, dirs.a(), &listen, &mut recv, limit(mib))?;
        let t2 = Instant::now();
        let args = ["criu", "restore", "--images-dir", dirs.b(), "--restore-detached", "--log-file", "restore.log"];
        HostProc::spawn(tb, "b", &args, "criu restore")?
            .finish(limit(mib))
            .map_err(|e| format!("{e}: {}", criu::log_errors(&dirs.b.join("restore.log"))))?;
        let t3 = Instant::now();
        if !wait_until(Duration::from_secs(5), || tb.running("b", pid)) {
            return Err("restored process does not run on b".into());
        }
        Ok((
            ms(t3 - t0),
            wire,
            format!("dump {:.0} ms, copy {:.0} ms, restore {:.0} ms", ms(t1 - t0), ms(t2 - t1), ms(t3 - t2)),
        ))
    })();
    drop(recv);
    tb.kill("a", pid);
    result
}

struct Lazy {
    downtime_ms: f64,
    complete_ms: f64,
    total_ms: f64,
    wire_bytes: u64,
    note: String,
}

/// Plain CRIU lazy migration: `criu dump --lazy-pages` on a (its page server on a's address), the image
/// files copied to b, `criu lazy-pages --page-server` and `criu restore --lazy-pages` on b.
fn criu_lazy(tb: &Testbed, pid: u32, mib: u64) -> Result<Lazy, String> {
    let n = unique();
    let dirs = Dirs::new(n)?;
    let listen = format!("{}:{}", tb.addr("b"), 7600 + (n % 100) as u16);
    let (a_addr, port) = (tb.addr("a"), (7700 + (n % 100) as u16).to_string());
    let mut recv = copy_receiver(tb, dirs.b(), &listen)?;
    let p = pid.to_string();
    let started = Instant::now();
    let watch = criu::tree::StopWatch::start(pid);
    // No --leave-stopped: once the page-server session ends CRIU kills the source tree (its default).
    let mut dump = HostProc::criu_with_status(
        tb,
        "a",
        &[
            "dump",
            "--tree",
            &p,
            "--images-dir",
            dirs.a(),
            "--lazy-pages",
            "--address",
            &a_addr,
            "--port",
            &port,
            "--log-file",
            "dump.log",
        ],
        "criu dump --lazy-pages",
    )?;
    // CRIU writes its status byte once every image is written and its page server listens.
    dump.ready(limit(mib)).map_err(|e| format!("{e}: {}", criu::log_errors(&dirs.a.join("dump.log"))))?;
    let t1 = Instant::now();
    // From the freeze, as the agents count it.
    let t0 = watch.stopped_at().unwrap_or(started);
    let lazy_pages: u64 = criu::images::lazy_ranges(&dirs.a)
        .map_err(|e| format!("reading the lazy dump's pagemaps: {e}"))?
        .iter()
        .flat_map(|(_, ranges)| ranges.iter().map(|r| (r.end - r.start) / 4096))
        .sum();
    let copied = copy_images(tb, dirs.a(), &listen, &mut recv, limit(mib))?;
    let t2 = Instant::now();
    // The daemon reads pstree.img when it starts, so it can only start once the images are on b; restore
    // connects to its lazy-pages.socket (in the images dir, the work dir of both) at once and fails if
    // nothing listens there yet, hence the wait for the daemon's status byte.
    let mut daemon = HostProc::criu_with_status(
        tb,
        "b",
        &[
            "lazy-pages",
            "--page-server",
            "--address",
            &a_addr,
            "--port",
            &port,
            "--images-dir",
            dirs.b(),
            "--log-file",
            "lazy-pages.log",
        ],
        "criu lazy-pages",
    )?;
    daemon
        .ready(Duration::from_secs(30))
        .map_err(|e| format!("{e}: {}", criu::log_errors(&dirs.b.join("lazy-pages.log"))))?;
    let t3 = Instant::now();
    let args = [
        "criu",
        "restore",
        "--images-dir",
        dirs.b(),
        "--lazy-pages",
        "--restore-detached",
        "--log-file",
        "restore.log",
    ];
    HostProc::spawn(tb, "b", &args, "criu restore --lazy-pages")?
        .finish(limit(mib))
        .map_err(|e| format!("{e}: {}", criu::log_errors(&dirs.b.join("restore.log"))))?;
    let t4 = Instant::now();
    if !wait_until(Duration::from_secs(5), || tb.running("b", pid)) {
        return Err("restored process does not run on b".into());
    }
    // Every page crosses now: on a fault, and in the background. The daemon exits once all are in place
    // and it has closed the session; the dump then kills the source tree and exits.
    // CRIU's own background transfer is slow under a dirtying workload (about 325 s for 2 GiB at 10 %/s
    // measured here), so it gets three times the usual limit.
    let deadline = Instant::now() + lazy_limit(mib);
    let (daemon_log, dump_log) = (dirs.b.join("lazy-pages.log"), dirs.a.join("dump.log"));
    let (mut complete, mut total) = (None, None);
    while complete.is_none() || total.is_none() {
        if complete.is_none()
            && let Some(s) = daemon.exited()
        {
            complete = Some(Instant::now());
            if !s.success() {
                return Err(format!("criu lazy-pages failed ({s}): {}", criu::log_errors(&daemon_log)));
            }
        }
        if total.is_none()
            && let Some(s) = dump.exited()
        {
            total = Some(Instant::now());
            if !s.success() {
                return Err(format!("criu dump --lazy-pages failed ({s}): {}", criu::log_errors(&dump_log)));
            }
        }
        if Instant::now() >= deadline {
            let (which, log) = if complete.is_none() {
                ("criu lazy-pages", &daemon_log)
            } else {
                ("criu dump --lazy-pages", &dump_log)
            };
            return Err(format!(
                "{which} did not finish within {} s of the restore (killed): {}",
                lazy_limit(mib).as_secs(),
                criu::log_errors(log)
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let (complete, total) = (complete.expect("set"), total.expect("set"));
    // After the session CRIU kills the source tree (a zombie until its parent reaps it).
    let source = match tb.state("a", pid) {
        None | Some('Z') => "source killed by CRIU".to_string(),
        Some(s) => format!("SOURCE LEFT IN STATE {s}"),
    };
    drop(recv);
    Ok(Lazy {
        downtime_ms: ms(t4 - t0),
        complete_ms: ms(complete - t0),
        total_ms: ms(total - t0),
        wire_bytes: copied + lazy_pages * 4096,
        note: format!(
            "dump {:.0} ms, copy {:.0} ms ({:.1} MiB), lazy-pages daemon {:.0} ms, restore {:.0} ms; {lazy_pages} lazy \
             pages fetched from a in {:.0} ms after the restore; {source}",
            ms(t1 - t0),
            ms(t2 - t1),
            copied as f64 / (1 << 20) as f64,
            ms(t3 - t2),
            ms(t4 - t3),
            ms(complete - t4),
        ),
    })
}

/// TCP throughput from a to b over the veth: `bytes` through one connection (`rate-send` on a,
/// `rate-recv` on b). Bytes per second.
fn link_rate(tb: &Testbed, bytes: u64) -> Result<f64, String> {
    throughput(tb, bytes, "rate", 7599, &[]).map(|(rate, _)| rate)
}

/// QUIC throughput from a to b: `bytes` on one stream of one connection, with the agents' own TLS,
/// transport settings and sockets (`quic-send` on a, `quic-recv` on b). Bytes per second, and what the
/// sender said of the path. This is the ceiling of the pages stream on this machine.
fn quic_rate(tb: &Testbed, bytes: u64) -> Result<(f64, String), String> {
    let tls = tb.dir.join("tls");
    throughput(tb, bytes, "quic", 7598, &["--tls", tls.to_str().expect("utf8")])
}

/// Runs `KIND-recv --listen B:PORT EXTRA...` on b, then `KIND-send --to B:PORT --bytes BYTES EXTRA...`
/// on a, which prints "BYTES SECONDS [what else]". Bytes per second, and the what else.
fn throughput(tb: &Testbed, bytes: u64, kind: &str, port: u16, extra: &[&str]) -> Result<(f64, String), String> {
    let bench = tb.bin.join("bench");
    let bench = bench.to_str().expect("utf8");
    let listen = format!("{}:{port}", tb.addr("b"));
    let (recv_cmd, send_cmd) = (format!("{kind}-recv"), format!("{kind}-send"));
    let recv_args = [&[bench, &recv_cmd, "--listen", &listen][..], extra].concat();
    let mut recv = HostProc::spawn(tb, "b", &recv_args, &format!("{recv_cmd} on b"))?;
    recv.ready(Duration::from_secs(10))?;
    let n = bytes.to_string();
    let send_args = [&[bench, &send_cmd, "--to", &listen, "--bytes", &n][..], extra].concat();
    let mut send = HostProc::spawn(tb, "a", &send_args, &format!("{send_cmd} on a"))?;
    send.finish(Duration::from_secs(120))?;
    recv.finish(Duration::from_secs(10))?;
    let out = send.stdout();
    let secs: f64 =
        out.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or(format!("{send_cmd} said {out:?}"))?;
    let rest = out.split_whitespace().skip(2).collect::<Vec<_>>().join(" ");
    Ok((bytes as f64 / secs, rest))
}

/// How fast b places pages into fresh memory with UFFDIO_COPY (`bench fill` run there, with `extra`
/// arguments). Bytes per second.
fn fill_rate(tb: &Testbed, bytes: u64, extra: &[&str]) -> Result<f64, String> {
    let bench = tb.bin.join("bench");
    let n = bytes.to_string();
    let mut cmd = vec![bench.to_str().expect("utf8"), "fill", "--bytes", &n];
    cmd.extend(extra);
    let mut p = HostProc::spawn(tb, "b", &cmd, "fill on b")?;
    p.finish(Duration::from_secs(120))?;
    let out = p.stdout();
    let secs: f64 = out.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or(format!("fill said {out:?}"))?;
    Ok(bytes as f64 / secs)
}

/// Maps --bytes of fresh anonymous memory, registers it with a userfaultfd (missing pages) and fills it
/// with UFFDIO_COPY, PUSH_BATCH_PAGES per call, from a buffer, as the lazy-pages daemon of
/// target-agent/src/lazy.rs does (same ioctls). Prints "BYTES SECONDS".
///
/// With `--from-store`, the pages come out of a second mapping of --bytes, written before the clock
/// starts, as a hybrid migration's complete phase takes them out of the page store: per batch a copy
/// into the buffer, the UFFDIO_COPY, and MADV_DONTNEED of the batch's source (the store giving its
/// memory back, which the next pages reuse). That is the bulk work of the daemon's one thread at its
/// floor: no faults, no bookkeeping, no other thread.
fn fill(args: &[String]) {
    use std::os::fd::AsFd;
    const BATCH: usize = target_agent::lazy::PUSH_BATCH_PAGES as usize * 4096;
    let bytes: usize = arg(args, "--bytes").expect("--bytes").parse().expect("--bytes");
    let from_store = args.iter().any(|a| a == "--from-store");
    let len = bytes.div_ceil(BATCH) * BATCH;
    let uffd = uffd::create(libc::O_CLOEXEC).expect("userfaultfd(2)");
    uffd::api(uffd.as_fd(), 0).expect("UFFDIO_API");
    use nix::sys::mman::{MapFlags, MmapAdvise, ProtFlags, madvise, mmap_anonymous};
    let fresh = || {
        let n = std::num::NonZeroUsize::new(len).expect("--bytes above 0");
        let prot = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
        // SAFETY: a fresh mapping at an address of the kernel's choice touches no existing memory.
        let m = unsafe { mmap_anonymous(None, n, prot, MapFlags::MAP_PRIVATE) }.expect("mmap");
        m.cast::<u8>().as_ptr()
    };
    let map = fresh();
    // SAFETY: `map` is a fresh mapping of this function's, only ever accessed through raw pointers.
    unsafe { uffd::register(uffd.as_fd(), map as u64, len as u64, uffd::REGISTER_MODE_MISSING) }
        .expect("UFFDIO_REGISTER");
    let store = from_store.then(|| {
        let m = fresh();
        // SAFETY: `m` is a fresh private mapping of `len` bytes, only used through this pointer here.
        unsafe { std::ptr::write_bytes(m, 0x5a, len) };
        m
    });
    // The content does not matter to UFFDIO_COPY, which copies every byte.
    let mut buf = vec![0x5au8; BATCH];
    let t = Instant::now();
    for off in (0..len).step_by(BATCH) {
        if let Some(store) = store {
            // SAFETY: `off + BATCH <= len`: inside the store mapping, which `buf` does not overlap.
            unsafe { std::ptr::copy_nonoverlapping(store.add(off), buf.as_mut_ptr(), BATCH) };
        }
        let (_, err) = uffd::copy(uffd.as_fd(), map as u64 + off as u64, &buf);
        assert_eq!(err, None, "UFFDIO_COPY at +{off}");
        if let Some(store) = store {
            let part = std::ptr::NonNull::new(store.wrapping_add(off)).expect("inside a mapping").cast();
            // SAFETY: drops the content of a range of the store mapping that nothing reads again.
            unsafe { madvise(part, BATCH, MmapAdvise::MADV_DONTNEED) }.expect("madvise");
        }
    }
    println!("{len} {}", t.elapsed().as_secs_f64());
}

fn quic_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime")
}

/// Sends --bytes bytes on one QUIC stream to --to as host a of the testbed whose certificates are in
/// --tls, waits for the receiver to close the stream, prints "BYTES SECONDS".
fn quic_send(args: &[String]) {
    let to: std::net::SocketAddr = arg(args, "--to").expect("--to").parse().expect("--to ADDR:PORT");
    let bytes: u64 = arg(args, "--bytes").expect("--bytes").parse().expect("--bytes");
    let tls = protocol::tls::TlsFiles::in_dir(Path::new(&arg(args, "--tls").expect("--tls")), "a");
    quic_runtime().block_on(async move {
        let mut endpoint = protocol::endpoint::client(to).expect("endpoint");
        endpoint.set_default_client_config(protocol::tls::client_config(&tls).expect("client config"));
        let conn = endpoint.connect(to, &to.ip().to_string()).expect("connect").await.expect("handshake");
        let t = Instant::now();
        let (mut send, mut recv) = conn.open_bi().await.expect("stream");
        let buf = bytes::Bytes::from(vec![0x5au8; 1 << 20]);
        let mut left = bytes;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            send.write_chunk(buf.slice(..k)).await.expect("send");
            left -= k as u64;
        }
        send.finish().expect("finish");
        let mut ack = [0u8; 1];
        recv.read_exact(&mut ack).await.expect("acknowledgement");
        let path = conn.stats().path;
        println!(
            "{bytes} {} mtu {} lost {} congestion_events {} cwnd {}",
            t.elapsed().as_secs_f64(),
            path.current_mtu,
            path.lost_packets,
            path.congestion_events,
            path.cwnd
        );
        conn.close(0u32.into(), b"");
        endpoint.wait_idle().await;
    });
}

/// Receives one quic-send stream on --listen as host b, discards it, acknowledges and exits.
fn quic_recv(args: &[String]) {
    let listen: std::net::SocketAddr = arg(args, "--listen").expect("--listen").parse().expect("--listen ADDR:PORT");
    let tls = protocol::tls::TlsFiles::in_dir(Path::new(&arg(args, "--tls").expect("--tls")), "b");
    quic_runtime().block_on(async move {
        let config = protocol::tls::server_config(&tls).expect("server config");
        let endpoint = protocol::endpoint::server(config, listen).expect("endpoint");
        println!("listening");
        let _ = std::io::stdout().flush();
        let conn = endpoint.accept().await.expect("a connection").await.expect("handshake");
        let (mut send, mut recv) = conn.accept_bi().await.expect("stream");
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.expect("read") {
            drop(chunk);
        }
        send.write_all(&[1]).await.expect("ack");
        send.finish().expect("finish");
        let _ = conn.closed().await;
    });
}

/// Connects to `to`, retrying for 2 s (the receiver may be starting).
fn connect(to: &str) -> std::net::TcpStream {
    for _ in 0..100 {
        if let Ok(c) = std::net::TcpStream::connect(to) {
            let _ = c.set_read_timeout(Some(Duration::from_secs(60)));
            let _ = c.set_write_timeout(Some(Duration::from_secs(60)));
            return c;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("cannot connect to {to}")
}

/// Sends --bytes bytes to --to (u64 length, then the bytes from a 4 MiB buffer), waits for the one-byte
/// acknowledgement, prints "BYTES SECONDS", the seconds from the connection to the acknowledgement.
fn rate_send(args: &[String]) {
    let to = arg(args, "--to").expect("--to");
    let bytes: u64 = arg(args, "--bytes").expect("--bytes").parse().expect("--bytes");
    // Content that does not compress, not that TCP would care.
    let mut x = 0x9e3779b97f4a7c15u64;
    let buf: Vec<u8> = (0..1 << 19)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    let mut s = connect(&to);
    let t = Instant::now();
    s.write_all(&bytes.to_le_bytes()).expect("send");
    let mut left = bytes;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..k]).expect("send");
        left -= k as u64;
    }
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).expect("acknowledgement");
    println!("{bytes} {}", t.elapsed().as_secs_f64());
}

/// Receives one rate-send stream on --listen, discards it, acknowledges and exits.
fn rate_recv(args: &[String]) {
    let listen = arg(args, "--listen").expect("--listen");
    let l = std::net::TcpListener::bind(&listen).unwrap_or_else(|e| panic!("bind {listen}: {e}"));
    println!("listening");
    let _ = std::io::stdout().flush();
    let (mut s, _) = l.accept().expect("accept");
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let mut len = [0u8; 8];
    s.read_exact(&mut len).expect("read");
    let mut left = u64::from_le_bytes(len);
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        let got = s.read(&mut buf[..k]).expect("read");
        assert!(got > 0, "connection ended {left} bytes early");
        left -= got as u64;
    }
    s.write_all(&[1]).expect("ack");
}

/// Sends every file of --dir (but CRIU's logs and stats) to --to: u16 name length, name, u64 size,
/// bytes; a zero name length ends. Prints the bytes sent.
fn copy_send(args: &[String]) {
    let dir = PathBuf::from(arg(args, "--dir").expect("--dir"));
    let to = arg(args, "--to").expect("--to");
    let mut s = connect(&to);
    let mut total = 0u64;
    for e in std::fs::read_dir(&dir).expect("dir").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // A lazy dump still runs (and writes its log, and later its stats) while its images are copied;
        // restore needs neither.
        if name.ends_with(".log") || name == "stats-dump" {
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
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
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
