//! userfaultfd: structs, ioctl numbers and thin wrappers.
//!
//! Defined here rather than taken from kernel headers or the `userfaultfd` crate: the build machine's
//! headers may be older than the running kernel, and the wrappers must report partial copies and
//! EEXIST exactly (see `KERNEL-NOTES`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub const UFFD_API: u64 = 0xAA;
const UFFDIO: u32 = 0xAA;

pub const UFFD_USER_MODE_ONLY: libc::c_int = 1;

pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_POISON_MODE_DONTWAKE: u64 = 1 << 0;

#[allow(dead_code)] // the feature bit of the SIGBUS mode
pub const UFFD_FEATURE_SIGBUS: u64 = 1 << 7;
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
/// MISSING mode on hugetlbfs files.
pub const UFFD_FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
/// MISSING mode on shared memory (shmem, memfd, `/dev/shm`).
pub const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
pub const UFFD_FEATURE_POISON: u64 = 1 << 14;

#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}

/// Same layout for UFFDIO_ZEROPAGE (`zeropage`) and UFFDIO_POISON (`updated`).
#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct UffdioFill {
    pub range: UffdioRange,
    pub mode: u64,
    pub result: i64,
}

/// `struct uffd_msg`: an event byte, padding, then a 24-byte union. Only the pagefault arm is read.
#[repr(C, packed)]
#[derive(Default, Clone, Copy)]
pub struct UffdMsg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    pub pf_flags: u64,
    pub pf_address: u64,
    pub pf_ptid: u32,
    pub pad: u32,
}

const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRange>() == 16);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);
const _: () = assert!(std::mem::size_of::<UffdioFill>() == 32);
const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);

/// The generic Linux `_IOC` encoding, shared by x86_64 and aarch64 (and riscv64). Architectures
/// with another encoding (powerpc, mips, sparc) fail to compile below rather than guess.
#[cfg(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
))]
const fn ioc(dir: u32, nr: u32, size: usize) -> u64 {
    ((dir << 30) | ((size as u32) << 16) | (UFFDIO << 8) | nr) as u64
}
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

pub const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, 0x3F, 24);
pub const UFFDIO_REGISTER: u64 = ioc(IOC_READ | IOC_WRITE, 0x00, 32);
pub const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, 0x01, 16);
pub const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, 16);
pub const UFFDIO_COPY: u64 = ioc(IOC_READ | IOC_WRITE, 0x03, 40);
pub const UFFDIO_ZEROPAGE: u64 = ioc(IOC_READ | IOC_WRITE, 0x04, 32);
pub const UFFDIO_POISON: u64 = ioc(IOC_READ | IOC_WRITE, 0x08, 32);
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`: `_IO(0xAA, 0x00)`.
pub const USERFAULTFD_IOC_NEW: u64 = (UFFDIO << 8) as u64;

// The numbers the kernel documents for x86_64 (KERNEL-NOTES); aarch64 uses the same encoding.
const _: () = assert!(UFFDIO_API == 0xc018aa3f);
const _: () = assert!(UFFDIO_REGISTER == 0xc020aa00);
const _: () = assert!(UFFDIO_UNREGISTER == 0x8010aa01);
const _: () = assert!(UFFDIO_WAKE == 0x8010aa02);
const _: () = assert!(UFFDIO_COPY == 0xc028aa03);
const _: () = assert!(UFFDIO_ZEROPAGE == 0xc020aa04);
const _: () = assert!(UFFDIO_POISON == 0xc020aa08);
const _: () = assert!(USERFAULTFD_IOC_NEW == 0xaa00);

/// How the userfaultfd was obtained; decides whether faults taken inside the kernel (a `write(2)`
/// from volatile memory) are caught.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdKind {
    /// `userfaultfd(2)` without flags: user and kernel faults are handled.
    Syscall,
    /// `/dev/userfaultfd` + `USERFAULTFD_IOC_NEW`: user and kernel faults are handled.
    DevNode,
    /// `userfaultfd(UFFD_USER_MODE_ONLY)`: only the program's own accesses are handled; a syscall
    /// touching a reclaimed page fails with EFAULT (pin first).
    UserModeOnly,
}

impl UffdKind {
    pub fn handles_kernel_faults(self) -> bool {
        !matches!(self, UffdKind::UserModeOnly)
    }
}

/// Which fill ioctl [`Uffd::fill_all`] runs.
#[derive(Debug, Clone, Copy)]
pub enum FillOp {
    /// UFFDIO_COPY from this source (as long as the range).
    Copy(*const u8),
    /// UFFDIO_ZEROPAGE: the shared zero page.
    Zero,
    /// UFFDIO_POISON: an access raises SIGBUS.
    Poison,
}

/// Why no userfaultfd could be had: the errno of each attempt.
#[derive(Debug, Clone, Copy)]
pub struct OpenFailure {
    pub syscall_errno: i32,
    pub devnode_errno: i32,
    pub user_mode_only_errno: i32,
}

/// An open userfaultfd, API handshake done.
#[derive(Debug)]
pub struct Uffd {
    /// The process that opened it. Its ioctls act on that process's memory whoever calls them,
    /// so in a forked child (which inherits the fd) every fill and wake is refused.
    owner: u32,
    fd: OwnedFd,
    kind: UffdKind,
    features: u64,
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn raw_syscall(flags: libc::c_int) -> Result<OwnedFd, i32> {
    // SAFETY: userfaultfd(2) takes one int of flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn raw_devnode(flags: libc::c_int) -> Result<OwnedFd, i32> {
    let path = c"/dev/userfaultfd";
    // SAFETY: path is a valid NUL-terminated string.
    let dev = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if dev < 0 {
        return Err(errno());
    }
    // SAFETY: dev is an fd we just opened; the ioctl takes the new fd's flags as its argument.
    let fd = unsafe { libc::ioctl(dev, USERFAULTFD_IOC_NEW as _, flags) };
    let err = errno();
    // SAFETY: dev is ours and not used after this.
    unsafe { libc::close(dev) };
    if fd < 0 {
        return Err(err);
    }
    // SAFETY: the ioctl returned a new fd owned by us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a userfaultfd the first way that works: the plain syscall, `/dev/userfaultfd`, then
/// `UFFD_USER_MODE_ONLY` (see `UffdKind`).
fn open_raw(nonblock: bool) -> Result<(OwnedFd, UffdKind), OpenFailure> {
    let flags = libc::O_CLOEXEC | if nonblock { libc::O_NONBLOCK } else { 0 };
    if std::env::var_os("LAZYFREE_UFFD_USER_MODE_ONLY").is_none() {
        let syscall_errno = match raw_syscall(flags) {
            Ok(fd) => return Ok((fd, UffdKind::Syscall)),
            Err(e) => e,
        };
        let devnode_errno = match raw_devnode(flags) {
            Ok(fd) => return Ok((fd, UffdKind::DevNode)),
            Err(e) => e,
        };
        return match raw_syscall(flags | UFFD_USER_MODE_ONLY) {
            Ok(fd) => Ok((fd, UffdKind::UserModeOnly)),
            Err(user_mode_only_errno) => Err(OpenFailure {
                syscall_errno,
                devnode_errno,
                user_mode_only_errno,
            }),
        };
    }
    match raw_syscall(flags | UFFD_USER_MODE_ONLY) {
        Ok(fd) => Ok((fd, UffdKind::UserModeOnly)),
        Err(e) => Err(OpenFailure {
            syscall_errno: e,
            devnode_errno: e,
            user_mode_only_errno: e,
        }),
    }
}

fn api(fd: RawFd, features: u64) -> Result<UffdioApi, i32> {
    let mut a = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: fd is a userfaultfd; `a` is a valid uffdio_api the kernel reads and writes.
    let r = unsafe { libc::ioctl(fd, UFFDIO_API as _, &mut a) };
    if r < 0 {
        return Err(errno());
    }
    Ok(a)
}

/// The outcome of a fill ioctl over a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Every byte of the range is now present (copied here, or already there).
    Done {
        /// Bytes this call installed.
        installed: usize,
    },
    /// The address space is changing (`EAGAIN` with nothing copied): retry a little later.
    Retry { installed: usize },
    /// The range is gone (`ENOENT`, `ESRCH`, `ENOSPC`) or the call failed otherwise.
    Failed { installed: usize, errno: i32 },
}

impl Uffd {
    /// Probes the kernel's features on a throwaway fd (UFFDIO_API may be called once per fd).
    pub fn probe_features() -> Result<(u64, UffdKind), OpenFailure> {
        let (fd, kind) = open_raw(true)?;
        match api(fd.as_raw_fd(), 0) {
            Ok(a) => Ok((a.features, kind)),
            Err(e) => Err(OpenFailure {
                syscall_errno: e,
                devnode_errno: e,
                user_mode_only_errno: e,
            }),
        }
    }

    /// Opens a non-blocking userfaultfd asking for `wanted` features (only those the kernel has).
    pub fn open(wanted: u64) -> Result<Uffd, OpenFailure> {
        let (supported, _) = Self::probe_features()?;
        let (fd, kind) = open_raw(true)?;
        let features = wanted & supported;
        let a = api(fd.as_raw_fd(), features).map_err(|e| OpenFailure {
            syscall_errno: e,
            devnode_errno: e,
            user_mode_only_errno: e,
        })?;
        Ok(Uffd {
            owner: super::os::pid(),
            fd,
            kind,
            features: a.features & features,
        })
    }

    /// Like [`Uffd::open`], but tries `UFFD_USER_MODE_ONLY` first, falling back to `open`. For a
    /// user that cannot serve faults taken inside the kernel anyway (SIGBUS mode: such faults get
    /// EFAULT whatever the fd), user-mode-only needs no privilege, and its kind says so.
    pub fn open_user_mode_first(wanted: u64) -> Result<Uffd, OpenFailure> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY;
        let user_mode_only = || -> Result<Uffd, i32> {
            let probe = raw_syscall(flags)?;
            let supported = api(probe.as_raw_fd(), 0)?.features;
            let fd = raw_syscall(flags)?;
            let features = wanted & supported;
            let a = api(fd.as_raw_fd(), features)?;
            Ok(Uffd {
                owner: super::os::pid(),
                fd,
                kind: UffdKind::UserModeOnly,
                features: a.features & features,
            })
        };
        user_mode_only().or_else(|_| Self::open(wanted))
    }

    /// Whether this is a forked child of the process that opened the fd.
    pub fn forked(&self) -> bool {
        super::os::pid() != self.owner
    }

    pub fn kind(&self) -> UffdKind {
        self.kind
    }

    pub fn has(&self, feature: u64) -> bool {
        self.features & feature == feature
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Registers `[start, start+len)` in MISSING mode.
    pub fn register(&self, start: usize, len: usize) -> io::Result<()> {
        let mut r = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: valid uffdio_register for a range we mapped.
        let rc = unsafe { libc::ioctl(self.raw(), UFFDIO_REGISTER as _, &mut r) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Wakes every thread waiting on a fault in the range.
    ///
    /// Nothing to do on a fd with `UFFD_FEATURE_SIGBUS`: there a missing-page fault raises
    /// SIGBUS at once and no thread ever waits on the fd (the kernel returns before queueing).
    pub fn wake(&self, start: usize, len: usize) {
        if self.forked() || self.has(UFFD_FEATURE_SIGBUS) {
            return;
        }
        let mut r = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: valid uffdio_range; WAKE only wakes waiters and cannot corrupt memory.
        unsafe { libc::ioctl(self.raw(), UFFDIO_WAKE as _, &mut r) };
    }

    /// UFFDIO_COPY of `len` bytes from `src` to `dst` without waking (the caller wakes once),
    /// in a mapping of `page`-sized pages (4 KiB, or a hugetlbfs file's). A present page is not
    /// an error: the copy continues past it.
    ///
    /// # Safety
    /// `src` must be readable for `len` bytes; `dst..dst+len` must lie in a registered range;
    /// `dst` and `len` are multiples of `page`.
    pub unsafe fn copy_paged(&self, dst: usize, src: *const u8, len: usize, page: usize) -> Fill {
        if self.forked() {
            return Fill::Failed {
                installed: 0,
                errno: libc::ECHILD,
            };
        }
        let mut done = 0usize;
        let mut installed = 0usize;
        while done < len {
            let mut c = UffdioCopy {
                dst: (dst + done) as u64,
                src: src as u64 + done as u64,
                len: (len - done) as u64,
                mode: UFFDIO_COPY_MODE_DONTWAKE,
                copy: 0,
            };
            // SAFETY: by the caller's contract src is readable and dst registered.
            let rc = unsafe { libc::ioctl(self.raw(), UFFDIO_COPY as _, &mut c) };
            if rc == 0 {
                return Fill::Done {
                    installed: installed + (len - done),
                };
            }
            let e = errno();
            if c.copy > 0 {
                // Partial copy: it stopped at a present page (EAGAIN) or an error; go on after it.
                done += c.copy as usize;
                installed += c.copy as usize;
                continue;
            }
            match e {
                libc::EEXIST => done += page, // first page present: skip it
                libc::EAGAIN => return Fill::Retry { installed },
                _ => {
                    return Fill::Failed {
                        installed,
                        errno: e,
                    }
                }
            }
        }
        Fill::Done { installed }
    }

    fn fill(&self, op: u64, dst: usize, len: usize, mode: u64) -> Fill {
        if self.forked() {
            return Fill::Failed {
                installed: 0,
                errno: libc::ECHILD,
            };
        }
        let mut done = 0usize;
        let mut installed = 0usize;
        while done < len {
            let mut z = UffdioFill {
                range: UffdioRange {
                    start: (dst + done) as u64,
                    len: (len - done) as u64,
                },
                mode,
                result: 0,
            };
            // SAFETY: valid struct for ZEROPAGE/POISON; they only install pte's in registered ranges.
            let rc = unsafe { libc::ioctl(self.raw(), op as _, &mut z) };
            if rc == 0 {
                return Fill::Done {
                    installed: installed + (len - done),
                };
            }
            let e = errno();
            if z.result > 0 {
                done += z.result as usize;
                installed += z.result as usize;
                continue;
            }
            match e {
                libc::EEXIST => done += super::mem::PAGE,
                libc::EAGAIN => return Fill::Retry { installed },
                _ => {
                    return Fill::Failed {
                        installed,
                        errno: e,
                    }
                }
            }
        }
        Fill::Done { installed }
    }

    /// Runs `op` over `[dst, dst + len)` to completion, without waking: present pages are
    /// skipped, and while the address space is changing (EAGAIN) it retries 1 ms apart, for
    /// about a second at most. The one retry loop of every fill. Returns the bytes installed,
    /// or the errno that stopped it with the bytes installed before.
    ///
    /// # Safety
    /// For `FillOp::Copy(src)`, `src` must be readable for `len` bytes; `dst..dst+len` must lie
    /// in a registered range.
    pub unsafe fn fill_all(
        &self,
        op: FillOp,
        dst: usize,
        len: usize,
    ) -> Result<usize, (usize, i32)> {
        // SAFETY: the caller's contract.
        unsafe { self.fill_all_paged(op, dst, len, super::mem::PAGE) }
    }

    /// [`Uffd::fill_all`] for a mapping of `page`-sized pages (only `FillOp::Copy` there).
    ///
    /// # Safety
    /// As for `fill_all`; `dst` and `len` are multiples of `page`.
    pub unsafe fn fill_all_paged(
        &self,
        op: FillOp,
        dst: usize,
        len: usize,
        page: usize,
    ) -> Result<usize, (usize, i32)> {
        let mut done = 0;
        for _ in 0..1000 {
            let res = match op {
                // SAFETY: by the caller's contract `src` is readable for `len` bytes.
                FillOp::Copy(src) => unsafe {
                    self.copy_paged(dst + done, src.add(done), len - done, page)
                },
                FillOp::Zero => self.zeropage(dst + done, len - done),
                FillOp::Poison => self.poison(dst + done, len - done),
            };
            match res {
                Fill::Done { installed } => return Ok(done + installed),
                Fill::Retry { installed } => {
                    done += installed;
                    if done >= len {
                        return Ok(done);
                    }
                    super::os::sleep_ms(1);
                }
                Fill::Failed { installed, errno } => return Err((done + installed, errno)),
            }
        }
        Err((done, libc::EAGAIN))
    }

    /// Maps the shared zero page over the missing pages of the range, without waking.
    pub fn zeropage(&self, dst: usize, len: usize) -> Fill {
        self.fill(UFFDIO_ZEROPAGE, dst, len, UFFDIO_ZEROPAGE_MODE_DONTWAKE)
    }

    /// Marks the missing pages of the range poisoned (access raises SIGBUS), without waking.
    pub fn poison(&self, dst: usize, len: usize) -> Fill {
        self.fill(UFFDIO_POISON, dst, len, UFFDIO_POISON_MODE_DONTWAKE)
    }

    /// Reads up to `buf.len()` fault messages. `Ok(0)` means nothing now (EAGAIN); `Err` with
    /// `ErrorKind::UnexpectedEof` means the fd is gone.
    pub fn read_msgs(&self, buf: &mut [UffdMsg]) -> io::Result<usize> {
        loop {
            // SAFETY: buf is valid for writes of its full byte length.
            let n = unsafe {
                libc::read(
                    self.raw(),
                    buf.as_mut_ptr().cast(),
                    std::mem::size_of_val(buf),
                )
            };
            if n > 0 {
                return Ok(n as usize / std::mem::size_of::<UffdMsg>());
            }
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            match errno() {
                libc::EINTR => continue,
                libc::EAGAIN => return Ok(0),
                e => return Err(io::Error::from_raw_os_error(e)),
            }
        }
    }
}
