//! Test workloads that can prove their state survived a migration. Each answers on the abstract unix
//! socket `migrate-workload-NAME` (per network namespace, so per testbed host) with one JSON line.
//!
//!   workload mem  --name N --mib M [--seed S] [--compressible] [--dirty-pct P] [--hold-open PATH] --pidfile F
//!       M MiB of known content (splitmix64 of S; with --compressible, mostly zeros with one random word
//!       per 64 bytes) and a counter bumped every millisecond by a thread. With --dirty-pct, another
//!       thread rewrites P percent of the pages per second (random pages), as a busy program would.
//!       Answers {kind, pid, counter, checksum, expected, mib}: checksum is the xxh3 of the memory now,
//!       expected the one of the content it was filled with.
//!   workload tree --name N --pidfile F
//!       A parent with two children: a writer sends a counter into a pipe every 5 ms, a reader reads it.
//!       The reader answers {kind, pid, parent, writer, last, reads}.
//!   workload hold --name N [--flock P] [--open P] [--unix-bind-relative DIR/NAME] [--unix-connect P]
//!                 [--sysv-shm] [--udp-cork] [--o-direct-pipe] [--tcp-established] [--raw-socket] --pidfile F
//!       Holds the resources named (each one something a migration must refuse) and a counter.
//!       Answers {kind, pid, counter}.
//!   workload listen --path P --pidfile F
//!       A unix stream server at P that accepts and keeps every connection (an external peer).
//!   workload trace --pid P --pidfile F
//!       Attaches to P with ptrace (PTRACE_SEIZE) and stays attached (a debugger).
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

fn fill(mib: usize, seed: u64, compressible: bool) -> Vec<u64> {
    let words = mib << 17; // 1 MiB = 131072 u64
    (0..words as u64).map(|i| if compressible && i % 8 != 0 { 0 } else { splitmix(seed ^ i) }).collect()
}

fn checksum(mem: &[u64]) -> u64 {
    // SAFETY: reinterpreting initialised u64s as bytes; u8 has no alignment or validity requirements.
    let bytes = unsafe { std::slice::from_raw_parts(mem.as_ptr() as *const u8, std::mem::size_of_val(mem)) };
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// A counter bumped every millisecond by its own thread.
fn start_counter() -> Arc<AtomicU64> {
    let counter = Arc::new(AtomicU64::new(0));
    let c = counter.clone();
    std::thread::spawn(move || {
        loop {
            c.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    counter
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
    let compressible = has(args, "--compressible");
    let dirty_pct: f64 = arg(args, "--dirty-pct").map(|p| p.parse().expect("--dirty-pct")).unwrap_or(0.0);
    let memory = Arc::new(fill(mib, seed, compressible));
    let expected = checksum(&memory);
    let counter = start_counter();
    if dirty_pct > 0.0 {
        // Rewrites dirty_pct % of the pages per second, in 10 ms ticks, through a raw pointer: the
        // answering thread may read a page while it changes, which only matters to the checksum, and
        // a dirtying workload's checksum is not compared.
        let pages = memory.len() / 512;
        let per_tick = ((pages as f64 * dirty_pct / 100.0) / 100.0).ceil() as usize;
        let base = memory.as_ptr() as usize;
        std::thread::spawn(move || {
            let mut x = seed | 1;
            loop {
                for _ in 0..per_tick {
                    x = splitmix(x);
                    let page = (x as usize) % pages;
                    // SAFETY: page < pages, so the word is inside the vector, which lives as long as the
                    // process (the Arc is never dropped: serve() never returns).
                    unsafe { ((base as *mut u64).add(page * 512)).write_volatile(x) };
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
    }
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

fn has(args: &[String], flag: &str) -> bool {
    args.iter().any(|a| a == flag)
}

fn check(r: libc::c_int, what: &str) -> libc::c_int {
    if r < 0 {
        panic!("{what}: {}", std::io::Error::last_os_error());
    }
    r
}

fn hold(args: &[String]) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let name = arg(args, "--name").expect("--name");
    let pidfile = arg(args, "--pidfile").expect("--pidfile");
    let mut held: Vec<OwnedFd> = Vec::new();
    let mut streams: Vec<Box<dyn std::any::Any>> = Vec::new();
    if let Some(p) = arg(args, "--flock") {
        let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&p).expect("flock file");
        // SAFETY: flock on an fd we own.
        check(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, "flock");
        held.push(f.into());
    }
    if let Some(p) = arg(args, "--open") {
        held.push(std::fs::File::open(&p).unwrap_or_else(|e| panic!("{p}: {e}")).into());
    }
    if let Some(p) = arg(args, "--unix-bind-relative") {
        let path = std::path::Path::new(&p);
        std::env::set_current_dir(path.parent().expect("dir")).expect("chdir");
        let l = UnixListener::bind(path.file_name().expect("name")).expect("bind relative");
        streams.push(Box::new(l));
    }
    if let Some(p) = arg(args, "--unix-connect") {
        streams.push(Box::new(UnixStream::connect(&p).unwrap_or_else(|e| panic!("connect {p}: {e}"))));
    }
    if has(args, "--sysv-shm") {
        // SAFETY: plain SysV calls; the segment is marked for removal once attached, so it goes away
        // with the process.
        unsafe {
            let id = check(libc::shmget(libc::IPC_PRIVATE, 4096, libc::IPC_CREAT | 0o600), "shmget");
            let addr = libc::shmat(id, std::ptr::null(), 0);
            assert!(addr as isize != -1, "shmat: {}", std::io::Error::last_os_error());
            (addr as *mut u8).write_volatile(1);
            libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
        }
    }
    if has(args, "--udp-cork") {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with a valid int on a socket we own.
        check(
            unsafe {
                libc::setsockopt(s.as_raw_fd(), libc::SOL_UDP, libc::UDP_CORK, (&one as *const libc::c_int).cast(), 4)
            },
            "UDP_CORK",
        );
        streams.push(Box::new(s));
    }
    if has(args, "--o-direct-pipe") {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_DIRECT | libc::O_CLOEXEC) }, "pipe2");
        // SAFETY: both fds were just created and are owned here.
        held.extend(fds.iter().map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) }));
    }
    if has(args, "--tcp-established") {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp listen");
        let c = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("tcp connect");
        let (a, _) = l.accept().expect("accept");
        streams.push(Box::new((l, c, a)));
    }
    if has(args, "--raw-socket") {
        // SAFETY: socket(2) returns a new fd or -1.
        let fd = check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) }, "raw socket");
        // SAFETY: fd was just created and is owned here.
        held.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let counter = start_counter();
    let listener = UnixListener::bind_addr(&socket_addr(&name)).expect("bind");
    write_pidfile(&pidfile, std::process::id());
    serve(listener, move || {
        let _ = (&held, &streams);
        serde_json::json!({ "kind": "hold", "pid": std::process::id(), "counter": counter.load(Ordering::SeqCst) })
    })
}

fn listen(args: &[String]) {
    let path = arg(args, "--path").expect("--path");
    let pidfile = arg(args, "--pidfile").expect("--pidfile");
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).unwrap_or_else(|e| panic!("bind {path}: {e}"));
    write_pidfile(&pidfile, std::process::id());
    let mut kept = Vec::new();
    for s in l.incoming().flatten() {
        kept.push(s);
    }
}

fn trace(args: &[String]) {
    let pid: i32 = arg(args, "--pid").expect("--pid").parse().expect("pid");
    let pidfile = arg(args, "--pidfile").expect("--pidfile");
    nix::sys::ptrace::seize(nix::unistd::Pid::from_raw(pid), nix::sys::ptrace::Options::empty()).expect("PTRACE_SEIZE");
    write_pidfile(&pidfile, std::process::id());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
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
        Some("hold") => hold(&args),
        Some("listen") => listen(&args),
        Some("trace") => trace(&args),
        _ => {
            eprintln!("usage: workload mem|tree|hold|listen|trace|query ...");
            std::process::exit(2);
        }
    }
}
