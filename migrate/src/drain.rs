//! `migrate drain`: empty this host onto others. Select trees, pre-flight each one, place them by the
//! targets' free memory (largest tree first, onto the target with the most room left), move them with
//! bounded concurrency, and report what moved, what was refused and what failed (with proof that the
//! original still runs). A second drain over the same selection finds only what is left.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use criu::tree::Status;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use source_agent::control::{self, Event, Request};

/// What to drain, and how.
#[derive(clap::Args, Debug, PartialEq)]
#[command(group(clap::ArgGroup::new("selection").required(true).args(["cgroup", "unit", "pids_file", "user"])))]
pub struct DrainArgs {
    /// Target agents, as host[:port], comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub to: Vec<String>,
    /// Every process of this cgroup (v2; a path under /sys/fs/cgroup, or absolute), sub-cgroups included.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Every process of this systemd unit's cgroup (e.g. myapp.service).
    #[arg(long)]
    pub unit: Option<String>,
    /// The pids listed in this file, one per line ('#' starts a comment).
    #[arg(long)]
    pub pids_file: Option<PathBuf>,
    /// Every process of this user.
    #[arg(long)]
    pub user: Option<String>,
    /// Migrations run at once.
    #[arg(long, default_value_t = 2)]
    pub parallel: usize,
    /// Only show the plan: what would move where, and what is refused.
    #[arg(long)]
    pub dry_run: bool,
}

/// One tree in the report.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    pub pid: u32,
    pub comm: String,
    /// Resident memory of the tree, bytes.
    pub rss: u64,
    pub target: Option<String>,
    pub target_host: Option<String>,
    pub downtime_ms: Option<f64>,
    pub wire_bytes: Option<u64>,
    /// Why it was refused or failed.
    pub reason: Option<String>,
    /// For a failure: whether the original still runs here (checked after the failure).
    pub still_running_here: Option<bool>,
}

/// The drain's report.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub dry_run: bool,
    pub moved: Vec<Item>,
    pub planned: Vec<Item>,
    pub refused: Vec<Item>,
    pub failed: Vec<Item>,
}

impl Report {
    pub fn text(&self) -> String {
        let mut s = String::new();
        let line = |i: &Item| format!("pid {} ({}, {})", i.pid, i.comm, crate::bytes(i.rss));
        for i in &self.planned {
            s.push_str(&format!("  would move {} to {}\n", line(i), i.target.as_deref().unwrap_or("?")));
        }
        for i in &self.moved {
            s.push_str(&format!(
                "  moved {} to {}: downtime {:.0} ms, {} on the wire\n",
                line(i),
                i.target_host.as_deref().unwrap_or("?"),
                i.downtime_ms.unwrap_or(0.0),
                crate::bytes(i.wire_bytes.unwrap_or(0))
            ));
        }
        for i in &self.refused {
            s.push_str(&format!("  refused {}: {}\n", line(i), i.reason.as_deref().unwrap_or("")));
        }
        for i in &self.failed {
            s.push_str(&format!(
                "  FAILED {}: {} [original {}]\n",
                line(i),
                i.reason.as_deref().unwrap_or(""),
                if i.still_running_here == Some(true) {
                    "still runs here"
                } else {
                    "does NOT run here: check the targets"
                }
            ));
        }
        let head = if self.dry_run {
            format!("drain plan: {} to move, {} refused\n", self.planned.len(), self.refused.len())
        } else if self.moved.is_empty() && self.failed.is_empty() {
            format!("nothing moved: nothing movable is left here ({} refused)\n", self.refused.len())
        } else {
            format!("drain: moved {}, refused {}, failed {}\n", self.moved.len(), self.refused.len(), self.failed.len())
        };
        head + &s
    }
}

/// The pids selected (processes, not threads), this command, its ancestors and init left out.
pub fn select(a: &DrainArgs) -> Result<Vec<u32>, String> {
    let mut pids: Vec<u32> = if let Some(cg) = &a.cgroup {
        let dir = if cg.is_absolute() { cg.clone() } else { Path::new("/sys/fs/cgroup").join(cg) };
        cgroup_pids(&dir)?
    } else if let Some(unit) = &a.unit {
        let unit = if unit.contains('.') { unit.clone() } else { format!("{unit}.service") };
        let dir = find_dir(Path::new("/sys/fs/cgroup"), &unit, 4)
            .ok_or_else(|| format!("no cgroup for unit {unit} under /sys/fs/cgroup: is it running?"))?;
        cgroup_pids(&dir)?
    } else if let Some(f) = &a.pids_file {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let mut v = Vec::new();
        for (n, l) in text.lines().enumerate() {
            let l = l.split('#').next().unwrap_or("").trim();
            if l.is_empty() {
                continue;
            }
            v.push(l.parse().map_err(|_| format!("{}:{}: {l:?} is not a pid", f.display(), n + 1))?);
        }
        v
    } else if let Some(user) = &a.user {
        let uid = nix::unistd::User::from_name(user)
            .map_err(|e| format!("looking up user {user}: {e}"))?
            .ok_or_else(|| format!("no user {user}"))?
            .uid
            .as_raw();
        all_pids().into_iter().filter(|&p| real_uid(p) == Some(uid)).collect()
    } else {
        return Err("choose what to drain: --cgroup, --unit, --pids-file or --user".into());
    };
    // Never this command, its ancestors, or init.
    let mut me = std::process::id();
    let mut mine = HashSet::from([1]);
    while me > 1 && mine.insert(me) {
        me = ppid(me).unwrap_or(0);
    }
    pids.retain(|p| !mine.contains(p) && criu::tree::is_alive(*p));
    pids.sort_unstable();
    pids.dedup();
    Ok(pids)
}

/// The roots among `pids`: those whose parent is not selected too (a tree moves whole).
pub fn roots(pids: &[u32], parent: impl Fn(u32) -> Option<u32>) -> Vec<u32> {
    let set: HashSet<u32> = pids.iter().copied().collect();
    pids.iter().copied().filter(|&p| parent(p).is_none_or(|pp| !set.contains(&pp))).collect()
}

/// Places trees (pid, rss), largest first, on the target with the most memory left. Returns
/// pid -> target index, and the pids that fit nowhere.
pub fn place(trees: &[(u32, u64)], free: &[u64]) -> (HashMap<u32, usize>, Vec<u32>) {
    let mut left = free.to_vec();
    let mut order = trees.to_vec();
    order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut placed = HashMap::new();
    let mut nowhere = Vec::new();
    for (pid, rss) in order {
        match (0..left.len()).filter(|&i| left[i] >= rss).max_by_key(|&i| (left[i], std::cmp::Reverse(i))) {
            Some(i) => {
                left[i] -= rss;
                placed.insert(pid, i);
            }
            None => nowhere.push(pid),
        }
    }
    (placed, nowhere)
}

fn cgroup_pids(dir: &Path) -> Result<Vec<u32>, String> {
    let procs = dir.join("cgroup.procs");
    let text = std::fs::read_to_string(&procs)
        .map_err(|e| format!("{}: {e} (is it a cgroup v2 directory?)", procs.display()))?;
    let mut v: Vec<u32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                v.extend(cgroup_pids(&e.path())?);
            }
        }
    }
    Ok(v)
}

fn find_dir(root: &Path, name: &str, depth: usize) -> Option<PathBuf> {
    let rd = std::fs::read_dir(root).ok()?;
    let dirs: Vec<PathBuf> =
        rd.flatten().filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false)).map(|e| e.path()).collect();
    if let Some(d) = dirs.iter().find(|d| d.file_name().is_some_and(|n| n == name)) {
        return Some(d.clone());
    }
    if depth == 0 {
        return None;
    }
    dirs.iter().find_map(|d| find_dir(d, name, depth - 1))
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|rd| rd.flatten().filter_map(|e| e.file_name().to_string_lossy().parse().ok()).collect())
        .unwrap_or_default()
}

fn real_uid(pid: u32) -> Option<u32> {
    Status::read(pid).ok()?.uids().first().copied()
}

fn ppid(pid: u32) -> Option<u32> {
    Status::read(pid).ok()?.field("PPid:").parse().ok()
}

/// Resident memory of a tree, bytes.
fn tree_rss(root: u32) -> u64 {
    criu::tree::processes(root)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| Status::read(p).ok()?.bytes("VmRSS:"))
        .sum::<u64>()
}

fn item(pid: u32, rss: u64) -> Item {
    Item {
        pid,
        comm: criu::tree::comm(pid),
        rss,
        target: None,
        target_host: None,
        downtime_ms: None,
        wire_bytes: None,
        reason: None,
        still_running_here: None,
    }
}

/// Runs a drain; returns the report (Err for a drain that could not start at all).
pub async fn run(
    socket: &Path,
    a: &DrainArgs,
    options: source_agent::control::MigrateOptions,
    rules: source_agent::external::Rules,
    show_progress: bool,
) -> Result<Report, String> {
    let pids = select(a)?;
    let roots = roots(&pids, ppid);
    let mut report = Report { dry_run: a.dry_run, ..Default::default() };
    // Pre-flight on everything first.
    let mut movable = Vec::new();
    for &pid in &roots {
        let rss = tree_rss(pid);
        match control::request(socket, &Request::Check { pid, target: None, rules: rules.clone() }, |_| {}).await {
            Ok(Event::Checked { report: r }) if r.blockers.is_empty() => movable.push((pid, rss)),
            Ok(Event::Checked { report: r }) => {
                report.refused.push(Item { reason: Some(r.blocker_summary()), ..item(pid, rss) })
            }
            Ok(other) => return Err(format!("unexpected answer from the source agent: {other:?}")),
            Err(e) => report.refused.push(Item { reason: Some(e.to_string()), ..item(pid, rss) }),
        }
    }
    // Targets and their free memory.
    let mut free = Vec::new();
    let mut names = Vec::new();
    for t in &a.to {
        match control::request(socket, &Request::Probe { target: t.clone() }, |_| {}).await {
            Ok(Event::Probed { host, mem_available }) => {
                free.push(mem_available);
                names.push(host);
            }
            Ok(other) => return Err(format!("unexpected answer from the source agent: {other:?}")),
            Err(e) => return Err(format!("target {t}: {e}")),
        }
    }
    let (placed, nowhere) = place(&movable, &free);
    for pid in nowhere {
        let rss = movable.iter().find(|m| m.0 == pid).map(|m| m.1).unwrap_or(0);
        report.refused.push(Item { reason: Some("no target has enough free memory".into()), ..item(pid, rss) });
    }
    let mut plan: Vec<(u32, u64, usize)> =
        movable.iter().filter_map(|&(pid, rss)| placed.get(&pid).map(|&i| (pid, rss, i))).collect();
    plan.sort_by_key(|x| std::cmp::Reverse(x.1));
    if a.dry_run {
        report.planned = plan
            .iter()
            .map(|&(pid, rss, i)| Item {
                target: Some(a.to[i].clone()),
                target_host: Some(names[i].clone()),
                ..item(pid, rss)
            })
            .collect();
        return Ok(report);
    }

    // Move, at most `parallel` at once, one bar each plus an overall one.
    let multi = MultiProgress::with_draw_target(if show_progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let overall = multi.add(ProgressBar::new(plan.len() as u64));
    overall.set_style(ProgressStyle::with_template("drain [{bar:30}] {pos}/{len} trees {wide_msg}").expect("template"));
    let permits = Arc::new(tokio::sync::Semaphore::new(a.parallel.max(1)));
    let mut jobs = Vec::new();
    for (pid, rss, i) in plan {
        let (target, host) = (a.to[i].clone(), names[i].clone());
        let (socket, permits, overall, multi) = (socket.to_owned(), permits.clone(), overall.clone(), multi.clone());
        let rules = rules.clone();
        jobs.push(tokio::spawn(async move {
            let _permit = permits.acquire().await.expect("semaphore open");
            // A bar per running migration: it appears when the migration starts.
            let bar = multi.add(ProgressBar::new(0));
            bar.set_style(crate::bar_style());
            bar.set_prefix(format!("{pid}->{host}"));
            let req = Request::Migrate { pid, target: target.clone(), options, rules };
            let r = control::request(&socket, &req, |ev| crate::show(&bar, ev)).await;
            bar.finish_and_clear();
            overall.inc(1);
            let base = Item { target: Some(target), target_host: Some(host), ..item(pid, rss) };
            match r {
                Ok(Event::Done { summary }) => (
                    true,
                    Item { downtime_ms: Some(summary.downtime_ms), wire_bytes: Some(summary.wire_bytes), ..base },
                ),
                Ok(other) => (false, Item { reason: Some(format!("unexpected answer: {other:?}")), ..base }),
                Err(e) => (
                    false,
                    Item { reason: Some(e.to_string()), still_running_here: Some(criu::tree::is_alive(pid)), ..base },
                ),
            }
        }));
    }
    for j in jobs {
        let (ok, it) = j.await.map_err(|e| format!("migration task: {e}"))?;
        if ok {
            report.moved.push(it);
        } else {
            report.failed.push(it);
        }
    }
    overall.finish_and_clear();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_keep_trees_whole() {
        let parent = |p: u32| {
            Some(match p {
                11 | 12 => 10,
                13 => 12,
                _ => 1,
            })
        };
        assert_eq!(roots(&[10, 11, 12, 13, 20], parent), vec![10, 20]);
    }

    #[test]
    fn placement_largest_first_onto_most_room() {
        let (placed, nowhere) = place(&[(1, 100), (2, 300), (3, 200), (4, 50), (5, 10_000)], &[500, 400]);
        assert_eq!(placed[&2], 0); // 300 -> a (500 free), a has 200 left
        assert_eq!(placed[&3], 1); // 200 -> b (400), b has 200 left
        assert_eq!(placed[&1], 0); // 100 -> a (tie 200/200: first), a 100 left
        assert_eq!(placed[&4], 1); // 50 -> b (200)
        assert_eq!(nowhere, vec![5]);
    }

    #[test]
    fn cgroup_selection_includes_sub_cgroups() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.procs"), "10\n11\n").unwrap();
        std::fs::create_dir(dir.path().join("child")).unwrap();
        std::fs::write(dir.path().join("child/cgroup.procs"), "12\n").unwrap();
        let mut v = cgroup_pids(dir.path()).unwrap();
        v.sort();
        assert_eq!(v, vec![10, 11, 12]);
        assert!(cgroup_pids(&dir.path().join("missing")).unwrap_err().contains("cgroup v2"));
        assert_eq!(find_dir(dir.path(), "child", 2), Some(dir.path().join("child")));
    }

    #[test]
    fn pids_file_and_self_exclusion() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pids");
        let me = std::process::id();
        std::fs::write(&f, format!("# mine\n{me}\n1 # init\n")).unwrap();
        let args = DrainArgs {
            to: vec!["b".into()],
            cgroup: None,
            unit: None,
            pids_file: Some(f.clone()),
            user: None,
            parallel: 1,
            dry_run: true,
        };
        // This process and its ancestors (up to init) are never selected.
        assert_eq!(select(&args).unwrap(), Vec::<u32>::new());
        std::fs::write(&f, "12x\n").unwrap();
        assert!(select(&args).unwrap_err().contains("is not a pid"));
    }

    #[test]
    fn report_says_when_nothing_moved() {
        let r = Report { refused: vec![item(1, 0)], ..Default::default() };
        assert!(r.text().starts_with("nothing moved"), "{}", r.text());
    }
}
