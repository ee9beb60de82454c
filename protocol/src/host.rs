//! What this host offers to a migration, stated in the Hello: architecture, page size, kernel, and the two
//! kernel features the memory modes depend on (userfaultfd for post-copy, soft-dirty for pre-copy
//! dirty tracking; without soft-dirty pre-copy tracks pages by content).

/// Facts about this host.
#[derive(Debug, Clone)]
pub struct HostFacts {
    pub host_name: String,
    pub arch: String,
    pub kernel_release: String,
    pub page_size: u32,
    pub uffd: bool,
    pub soft_dirty: bool,
}

/// Reads the facts. Never fails: an unknown value is reported as empty or false.
pub fn facts() -> HostFacts {
    let uts = nix::sys::utsname::uname().ok();
    let s = |f: fn(&nix::sys::utsname::UtsName) -> &std::ffi::OsStr| {
        uts.as_ref().map(|u| f(u).to_string_lossy().into_owned()).unwrap_or_default()
    };
    HostFacts {
        host_name: s(|u| u.nodename()),
        arch: s(|u| u.machine()),
        kernel_release: s(|u| u.release()),
        page_size: page_size(),
        uffd: uffd_available(),
        soft_dirty: soft_dirty_available(),
    }
}

/// The system page size.
pub fn page_size() -> u32 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096) as u32
}

fn uffd_available() -> bool {
    // SAFETY: userfaultfd(2) takes only flags and returns a new fd or -1; the fd is closed at once.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return std::path::Path::new("/dev/userfaultfd").exists();
    }
    // SAFETY: fd was just returned by the kernel and is owned here.
    unsafe { libc::close(fd as i32) };
    true
}

/// The kernel has soft-dirty when, after clearing it with `4 > clear_refs`, a write to a page sets bit 55
/// of that page's pagemap entry (the same probe CRIU's kerndat runs).
fn soft_dirty_available() -> bool {
    use std::io::{Read, Seek, SeekFrom, Write};
    let page = page_size() as usize;
    let mut buf = vec![0u8; page * 2];
    let addr = (buf.as_mut_ptr() as usize).next_multiple_of(page);
    let Ok(mut clear) = std::fs::OpenOptions::new().write(true).open("/proc/self/clear_refs") else {
        return false;
    };
    if clear.write_all(b"4").is_err() {
        return false;
    }
    // SAFETY: addr lies inside buf (rounded up by less than a page within a 2-page buffer).
    unsafe { std::ptr::write_volatile(addr as *mut u8, 1) };
    let Ok(mut pm) = std::fs::File::open("/proc/self/pagemap") else {
        return false;
    };
    let mut entry = [0u8; 8];
    if pm.seek(SeekFrom::Start((addr / page * 8) as u64)).is_err() || pm.read_exact(&mut entry).is_err() {
        return false;
    }
    std::hint::black_box(&buf);
    u64::from_le_bytes(entry) & (1 << 55) != 0
}

/// This host's Hello, given its name in the fleet (the name on its certificate) and its CRIU version.
pub fn local_hello(fleet_name: &str, criu_version: &str) -> crate::pb::Hello {
    let f = facts();
    crate::pb::Hello {
        protocol_version: crate::hello::PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        host_name: fleet_name.into(),
        criu_version: criu_version.into(),
        arch: f.arch,
        page_size: f.page_size,
        kernel_release: f.kernel_release,
        uffd: f.uffd,
        soft_dirty: f.soft_dirty,
        mem_available: mem_available(),
    }
}

/// MemAvailable from /proc/meminfo, in bytes (0 when unknown).
pub fn mem_available() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}
