//! The userfaultfd ABI, in one place for both agents, their tests and the bench: the request numbers
//! and structs of `linux/userfaultfd.h` (docs/criu-interfaces.md §1.4), the ioctls made on a uffd, and
//! the messages read from one.
//!
//! - the target agent's lazy-pages daemon fills the restored tasks' memory ([`copy`], [`zeropage`]),
//!   reads their faults and events ([`read_msg`]) and drops ranges ([`unregister`]);
//! - the source agent's dirty tracking asks for asynchronous write-protection ([`api`] with
//!   [`FEATURE_WP_ASYNC`], [`register`] with [`REGISTER_MODE_WP`]) on a uffd it injected into the tree;
//! - tests and `bench fill` make a uffd of their own ([`create`]) and register memory of theirs.
//!
//! Not the `userfaultfd` crate: why is said in the workspace Cargo.toml.
//!
//! Every call takes the uffd as a [`BorrowedFd`] and returns the kernel's errno. Fills report how far
//! they got as well, as the daemon needs it: a fill can stop part-way (EAGAIN while the process's
//! mappings change, EEXIST at a page already there).

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

/// `uffdio_api.api`: the only API version there is.
pub const API: u64 = 0xAA;
/// userfaultfd(2) flag: handle faults of user-mode accesses only (no privilege needed for that).
pub const USER_MODE_ONLY: libc::c_int = 1;
/// Write-protect faults on pages not populated yet too (with WP_ASYNC: they count as written).
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// Write-protection resolved by the kernel itself, recording the write for PAGEMAP_SCAN (Linux 6.7).
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;
/// Register for faults on missing pages.
pub const REGISTER_MODE_MISSING: u64 = 1 << 0;
/// Register for write-protect faults.
pub const REGISTER_MODE_WP: u64 = 1 << 1;

// Request numbers: _IOWR/_IOR(0xAA, nr, struct) in the asm-generic encoding (x86-64, arm64, riscv64);
// the test `request_numbers_are_the_kernels` recomputes them from the structs' sizes.
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
const UFFDIO_UNREGISTER: u64 = 0x8010_aa01;
const UFFDIO_COPY: u64 = 0xc028_aa03;
const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;
const UFFDIO_API: u64 = 0xc018_aa3f;

const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_FORK: u8 = 0x13;
const UFFD_EVENT_REMAP: u8 = 0x14;
const UFFD_EVENT_REMOVE: u8 = 0x15;
const UFFD_EVENT_UNMAP: u8 = 0x16;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// A new userfaultfd of this process (userfaultfd(2) with `flags`, e.g. O_CLOEXEC | O_NONBLOCK),
/// before UFFDIO_API.
pub fn create(flags: libc::c_int) -> Result<OwnedFd, Errno> {
    // SAFETY: userfaultfd(2) takes only flags and returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if raw < 0 {
        return Err(Errno::last());
    }
    // SAFETY: a new fd just returned by the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as RawFd) })
}

/// UFFDIO_API with `features`; Err (EINVAL) when the kernel lacks one of them.
pub fn api(uffd: BorrowedFd<'_>, features: u64) -> Result<(), Errno> {
    let mut a = UffdioApi { api: API, features, ioctls: 0 };
    // SAFETY: UFFDIO_API reads and writes `a`, laid out as struct uffdio_api.
    Errno::result(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API as _, &mut a) }).map(drop)
}

/// UFFDIO_REGISTER of `[start, start + len)` in `mode` ([`REGISTER_MODE_MISSING`], [`REGISTER_MODE_WP`]).
/// Registering a range again with the same uffd and mode changes nothing.
///
/// # Safety
/// Once registered for missing pages, [`copy`] and [`zeropage`] can write into the range wherever a page
/// is not populated yet. When `uffd` belongs to this process, no Rust value may live in the range (e.g. a
/// zeroed allocation whose pages were never touched): use it only for mappings accessed through raw
/// pointers. A uffd of another process (the agents' case) puts nothing of this process at risk.
pub unsafe fn register(uffd: BorrowedFd<'_>, start: u64, len: u64, mode: u64) -> Result<(), Errno> {
    let mut a = UffdioRegister { range: UffdioRange { start, len }, mode, ioctls: 0 };
    // SAFETY: UFFDIO_REGISTER reads `a` and writes its `ioctls` field, laid out as struct
    // uffdio_register; what the registration allows later is the caller's contract above.
    Errno::result(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER as _, &mut a) }).map(drop)
}

/// UFFDIO_UNREGISTER of `[start, start + len)`.
pub fn unregister(uffd: BorrowedFd<'_>, start: u64, len: u64) -> Result<(), Errno> {
    let a = UffdioRange { start, len };
    // SAFETY: UFFDIO_UNREGISTER only reads `a`, laid out as struct uffdio_range.
    Errno::result(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_UNREGISTER as _, &a) }).map(drop)
}

/// What a fill did: bytes filled, and the errno when not all. The kernel's `copy`/`zeropage` field holds
/// the bytes done or a negative errno; a partial fill returns EAGAIN (or the error that stopped it).
fn outcome(r: libc::c_int, len: u64, field: i64) -> (u64, Option<Errno>) {
    if r == 0 {
        return (len, None);
    }
    let e = Errno::last();
    (u64::try_from(field).unwrap_or(0).min(len), Some(e))
}

/// UFFDIO_COPY of `src` to `dst` in the uffd's process, waking the threads that wait on the range: the
/// bytes copied, and the errno if not all (EEXIST: a page there already; EAGAIN: the process's
/// mappings are changing and the event saying how is not read yet; ESRCH, ENOSPC: its mm is gone).
pub fn copy(uffd: BorrowedFd<'_>, dst: u64, src: &[u8]) -> (u64, Option<Errno>) {
    let mut a = UffdioCopy { dst, src: src.as_ptr() as u64, len: src.len() as u64, mode: 0, copy: 0 };
    // SAFETY: UFFDIO_COPY reads `len` bytes at `src`, a live slice of exactly that length, and writes
    // only the `copy` field of `a` (struct uffdio_copy). It fills only pages that are missing in a
    // registered range of the uffd's mm and never overwrites one (EEXIST); when that mm is this
    // process, `register`'s contract keeps Rust values out of such a range.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY as _, &mut a) };
    outcome(r, a.len, a.copy)
}

/// UFFDIO_ZEROPAGE of `[start, start + len)`, waking the threads that wait on it; as [`copy`].
pub fn zeropage(uffd: BorrowedFd<'_>, start: u64, len: u64) -> (u64, Option<Errno>) {
    let mut a = UffdioZeropage { range: UffdioRange { start, len }, mode: 0, zeropage: 0 };
    // SAFETY: UFFDIO_ZEROPAGE writes only the `zeropage` field of `a` (struct uffdio_zeropage) and maps
    // zero pages where pages are missing in a registered range of the uffd's mm.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut a) };
    outcome(r, len, a.zeropage)
}

/// A message read from a userfaultfd.
#[derive(Debug)]
pub enum Msg {
    /// A thread waits for the page at `addr` (not page aligned: the faulting address).
    Fault { addr: u64 },
    /// The process forked; the child's uffd, installed in this process's fd table by the read.
    Fork(OwnedFd),
    /// mremap moved `[from, from + len)` to `to`.
    Remap { from: u64, to: u64, len: u64 },
    /// madvise(MADV_DONTNEED/MADV_REMOVE) of `[start, end)`.
    Remove { start: u64, end: u64 },
    /// munmap of `[start, end)`.
    Unmap { start: u64, end: u64 },
    /// An event this ABI does not know.
    Other(u8),
}

/// Reads one `struct uffd_msg` (32 bytes: u8 event, 7 reserved, 24-byte union); None when there is none
/// (EAGAIN on a non-blocking uffd).
pub fn read_msg(uffd: BorrowedFd<'_>) -> Result<Option<Msg>, Errno> {
    let mut b = [0u8; 32];
    match nix::unistd::read(uffd, &mut b) {
        Ok(32) => {}
        Ok(_) => return Err(Errno::EIO),
        Err(Errno::EAGAIN) => return Ok(None),
        Err(e) => return Err(e),
    }
    let u64_at = |o: usize| u64::from_ne_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    Ok(Some(match b[0] {
        UFFD_EVENT_PAGEFAULT => Msg::Fault { addr: u64_at(16) },
        UFFD_EVENT_FORK => {
            let raw = u32::from_ne_bytes(b[8..12].try_into().expect("4 bytes")) as RawFd;
            // SAFETY: the kernel installed this fd in our table while producing the FORK message we
            // just read (fs/userfaultfd.c resolve_userfault_fork); nothing else knows its number, so
            // this OwnedFd is its only owner.
            Msg::Fork(unsafe { OwnedFd::from_raw_fd(raw) })
        }
        UFFD_EVENT_REMAP => Msg::Remap { from: u64_at(8), to: u64_at(16), len: u64_at(24) },
        UFFD_EVENT_REMOVE => Msg::Remove { start: u64_at(8), end: u64_at(16) },
        UFFD_EVENT_UNMAP => Msg::Unmap { start: u64_at(8), end: u64_at(16) },
        e => Msg::Other(e),
    }))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn request_numbers_are_the_kernels() {
        const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
            (dir << 30) | ((size as u64) << 16) | (0xaa << 8) | nr
        }
        assert_eq!(UFFDIO_REGISTER, ioc(3, 0x00, size_of::<UffdioRegister>()));
        assert_eq!(UFFDIO_UNREGISTER, ioc(2, 0x01, size_of::<UffdioRange>()));
        assert_eq!(UFFDIO_COPY, ioc(3, 0x03, size_of::<UffdioCopy>()));
        assert_eq!(UFFDIO_ZEROPAGE, ioc(3, 0x04, size_of::<UffdioZeropage>()));
        assert_eq!(UFFDIO_API, ioc(3, 0x3f, size_of::<UffdioApi>()));
        // The sizes of linux/userfaultfd.h.
        assert_eq!(
            [size_of::<UffdioRegister>(), size_of::<UffdioCopy>(), size_of::<UffdioZeropage>(), size_of::<UffdioApi>()],
            [32, 40, 32, 24]
        );
    }

    /// A fresh private anonymous mapping of `len` bytes, never touched.
    fn mapping(len: usize) -> u64 {
        // SAFETY: a new mapping at an address of the kernel's choice touches no existing memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        p as u64
    }

    /// Fills, their partial outcomes, and an event a change of the process's own mm sends: every call of
    /// this module on a uffd of the test's own. Only filled pages are read, so no access waits for a
    /// fault.
    #[test]
    fn fills_report_how_far_they_got_and_events_are_read() {
        let uffd = create(libc::O_CLOEXEC | libc::O_NONBLOCK).expect("userfaultfd(2) (the unit tests run as root)");
        // UFFD_FEATURE_EVENT_UNMAP (1 << 6) and EVENT_REMOVE (1 << 3): munmap and madvise are reported.
        api(uffd.as_fd(), (1 << 6) | (1 << 3)).expect("UFFDIO_API");
        let len = 4 * 4096;
        let base = mapping(len);
        // SAFETY: a mapping of this test's, only ever accessed through raw pointers.
        unsafe { register(uffd.as_fd(), base, len as u64, REGISTER_MODE_MISSING) }.expect("UFFDIO_REGISTER");
        assert!(read_msg(uffd.as_fd()).expect("read").is_none(), "no message yet");

        let page = vec![0x5au8; 4096];
        assert_eq!(copy(uffd.as_fd(), base + 4096, &page), (4096, None));
        // Two pages from page 0: the second is there already, so the copy stops after the first.
        let two = vec![0x6bu8; 8192];
        assert_eq!(copy(uffd.as_fd(), base, &two), (4096, Some(Errno::EAGAIN)));
        assert_eq!(copy(uffd.as_fd(), base + 4096, &page), (0, Some(Errno::EEXIST)));
        assert_eq!(zeropage(uffd.as_fd(), base + 2 * 4096, 4096), (4096, None));
        let mut got = [0u8; 3];
        // SAFETY: the three pages were filled above; reading them faults nothing.
        unsafe {
            got[0] = std::ptr::read_volatile(base as *const u8);
            got[1] = std::ptr::read_volatile((base + 4096) as *const u8);
            got[2] = std::ptr::read_volatile((base + 2 * 4096) as *const u8);
        }
        assert_eq!(got, [0x6b, 0x5a, 0]);

        // madvise waits until its REMOVE event is read, so it runs on a thread of its own.
        let advise = std::thread::spawn(move || {
            // SAFETY: the test's own mapping; nothing refers into it.
            unsafe { libc::madvise((base + 4096) as *mut libc::c_void, 4096, libc::MADV_DONTNEED) }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let msg = loop {
            match read_msg(uffd.as_fd()).expect("read") {
                Some(m) => break m,
                None if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(1)),
                None => panic!("no REMOVE event within 10 s"),
            }
        };
        assert!(matches!(msg, Msg::Remove { start, end } if (start, end) == (base + 4096, base + 2 * 4096)), "{msg:?}");
        assert_eq!(advise.join().expect("madvise thread"), 0);
        unregister(uffd.as_fd(), base, len as u64).expect("UFFDIO_UNREGISTER");
        // SAFETY: as above.
        assert_eq!(unsafe { libc::munmap(base as *mut libc::c_void, len) }, 0);
        assert!(read_msg(uffd.as_fd()).expect("read").is_none(), "an unregistered range sends no UNMAP");
    }
}
