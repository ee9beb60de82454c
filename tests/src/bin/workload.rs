//! Test workloads that can prove their state survived a migration. Each answers on the abstract unix
//! socket `migrate-workload-NAME` (per network namespace, so per testbed host) with one JSON line.
//!
//!   workload mem  --name N --mib M [--seed S] [--hold-open PATH] --pidfile F
//!       M MiB of known content (splitmix64 of S) and a counter bumped every millisecond by a thread.
//!       Answers {kind, pid, counter, checksum, expected, mib}: checksum is the xxh3 of the memory now,
//!       expected the one of the content it was filled with.
//!   workload tree --name N --pidfile F
//!       A parent with two children: a writer sends a counter into a pipe every 5 ms, a reader reads it.
//!       The reader answers {kind, pid, parent, writer, last, reads}.
//!   workload query --name N
//!       Prints the answer of the workload NAME in this network namespace.
//!
//! The pidfile (root pid) is written once the workload is ready.

use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn socket_addr(name: &str) -> SocketAddr {
    SocketAddr::from_abstract_name(format!("migrate-workload-{name}").as_bytes()).expect("abstract name")
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e3779b97f4a7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    x ^ (x >> 31)
}

fn fill(mib: usize, seed: u64) -> Vec<u64> {
    let words = mib << 17; // 1 MiB = 131072 u64
    (0..words as u64).map(|i| splitmix(seed ^ i)).collect()
}

fn checksum(mem: &[u64]) -> u64 {
    // SAFETY: reinterpreting initialised u64s as bytes; u8 has no alignment or validity requirements.
    let bytes = unsafe { std::slice::from_raw_parts(mem.as_ptr() as *const u8, std::mem::size_of_val(mem)) };
    xxhash_rust::xxh3::xxh3_64(bytes)
}

fn write_pidfile(path: &str, pid: u32) {
    let tmp = format!("{path}.tmp");
    std::fs::write(&tmp, format!("{pid}\n")).expect("write pidfile");
    std::fs::rename(&tmp, path).expect("rename pidfile");
}

fn serve(listener: UnixListener, answer: impl Fn() -> serde_json::Value) -> ! {
    loop {
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.write_all(format!("{}\n", answer()).as_bytes());
        }
    }
}

fn mem(args: &[String]) {
    let name = arg(args, "--name").expect("--name");
    let mib: usize = arg(args, "--mib").map(|m| m.parse().expect("--mib")).unwrap_or(64);
    let seed: u64 = arg(args, "--seed").map(|s| s.parse().expect("--seed")).unwrap_or(1);
    let pidfile = arg(args, "--pidfile").expect("--pidfile");
    let held = arg(args, "--hold-open").map(|p| std::fs::File::open(&p).unwrap_or_else(|e| panic!("{p}: {e}")));
    let memory = fill(mib, seed);
    let expected = checksum(&memory);
    let counter = Arc::new(AtomicU64::new(0));
    let c = counter.clone();
    std::thread::spawn(move || {
        loop {
            c.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let listener = UnixListener::bind_addr(&socket_addr(&name)).expect("bind");
    write_pidfile(&pidfile, std::process::id());
    serve(listener, move || {
        let _ = &held;
        serde_json::json!({
            "kind": "mem",
            "pid": std::process::id(),
            "counter": counter.load(Ordering::SeqCst),
            "checksum": format!("{:016x}", checksum(&memory)),
            "expected": format!("{expected:016x}"),
            "mib": mib,
        })
    })
}

fn tree(args: &[String]) {
    let name = arg(args, "--name").expect("--name");
    let pidfile = arg(args, "--pidfile").expect("--pidfile");
    let (data_r, data_w) = nix::unistd::pipe().expect("pipe");
    let (ready_r, ready_w) = nix::unistd::pipe().expect("pipe");
    // SAFETY: the process is single-threaded here; the child only runs plain Rust until it loops forever.
    let writer = match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            drop((data_r, ready_r, ready_w));
            let mut w = std::fs::File::from(data_w);
            let mut i: u64 = 0;
            loop {
                i += 1;
                if w.write_all(&i.to_le_bytes()).is_err() {
                    std::process::exit(1);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        nix::unistd::ForkResult::Parent { child } => child.as_raw() as u32,
    };
    drop(data_w);
    // SAFETY: as above, still single-threaded.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            drop(ready_r);
            let last = Arc::new(AtomicU64::new(0));
            let reads = Arc::new(AtomicU64::new(0));
            let (l, n) = (last.clone(), reads.clone());
            let listener = UnixListener::bind_addr(&socket_addr(&name)).expect("bind");
            std::fs::File::from(ready_w).write_all(b"r").expect("ready");
            std::thread::spawn(move || {
                let mut r = std::fs::File::from(data_r);
                let mut buf = [0u8; 8];
                while r.read_exact(&mut buf).is_ok() {
                    l.store(u64::from_le_bytes(buf), Ordering::SeqCst);
                    n.fetch_add(1, Ordering::SeqCst);
                }
                std::process::exit(2);
            });
            serve(listener, move || {
                serde_json::json!({
                    "kind": "tree",
                    "pid": std::process::id(),
                    "parent": nix::unistd::getppid().as_raw(),
                    "writer": writer,
                    "last": last.load(Ordering::SeqCst),
                    "reads": reads.load(Ordering::SeqCst),
                })
            })
        }
        nix::unistd::ForkResult::Parent { .. } => {
            drop((data_r, ready_w));
            let mut b = [0u8; 1];
            std::fs::File::from(ready_r).read_exact(&mut b).expect("reader ready");
            write_pidfile(&pidfile, std::process::id());
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
}

fn query(args: &[String]) {
    let name = arg(args, "--name").expect("--name");
    let mut s = match UnixStream::connect_addr(&socket_addr(&name)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("workload {name} does not answer here: {e}");
            std::process::exit(3);
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read answer");
    print!("{out}");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("mem") => mem(&args),
        Some("tree") => tree(&args),
        Some("query") => query(&args),
        _ => {
            eprintln!("usage: workload mem|tree|query --name N [...]");
            std::process::exit(2);
        }
    }
}
