//! mmap / madvise / mincore wrappers. Everything that can destroy contents is `unsafe`.

use std::io;

pub const PAGE: usize = 4096;

/// The kernel's page size must be the one this crate is built for.
pub fn check_page_size() -> bool {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize == PAGE }
}

pub const fn pages_for(bytes: usize) -> usize {
    bytes.div_ceil(PAGE)
}

/// Makes `[addr, addr + len)` inaccessible (`false`) or readable and writable again (`true`).
/// Inaccessible pages fault on any access before userfaultfd sees it: SIGSEGV for the program,
/// EFAULT for a system call.
///
/// # Safety
/// The range must be memory of ours that nobody relies on being accessible (or, when opening
/// it again, that may be read and written).
pub unsafe fn protect(addr: usize, len: usize, open: bool) -> io::Result<()> {
    let prot = if open {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_NONE
    };
    // SAFETY: by the caller's contract.
    if unsafe { libc::mprotect(addr as *mut libc::c_void, len, prot) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reserves `len` bytes of private anonymous memory (no swap reservation).
pub fn map_anon(len: usize) -> io::Result<*mut u8> {
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choice touches nothing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
}

/// # Safety
/// `[addr, addr+len)` must be a mapping this crate owns and nobody uses any more.
pub unsafe fn unmap(addr: *mut u8, len: usize) {
    // SAFETY: by the caller's contract.
    unsafe { libc::munmap(addr.cast(), len) };
}

/// Advice that never changes what a program reads.
#[derive(Debug, Clone, Copy)]
pub enum Advice {
    NoHugePage,
    DontFork,
    /// Fault every page in for writing (Linux 5.14): a write fault, so a pending MADV_FREE is
    /// cancelled and the page stays; contents unchanged. EINVAL on older kernels.
    PopulateWrite,
}

/// Advice that may make the kernel drop contents: the range then reads as missing (and, registered
/// with userfaultfd, is rebuilt).
#[derive(Debug, Clone, Copy)]
pub enum UncheckedAdvice {
    /// Lazily free: the kernel may drop the pages under pressure; a write cancels it.
    Free,
    /// Drop now.
    DontNeed,
    /// Push through reclaim now (lazily freed pages are discarded).
    PageOut,
}

fn raw_madvise(addr: usize, len: usize, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: madvise validates the range; the callers below decide which advice is safe.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn advise(addr: usize, len: usize, advice: Advice) -> io::Result<()> {
    let a = match advice {
        Advice::NoHugePage => libc::MADV_NOHUGEPAGE,
        Advice::DontFork => libc::MADV_DONTFORK,
        Advice::PopulateWrite => libc::MADV_POPULATE_WRITE,
    };
    raw_madvise(addr, len, a)
}

/// Whether this kernel has `MADV_POPULATE_WRITE` (Linux 5.14), probed once on a page of our own:
/// on a kernel that has it, EINVAL from it means a range it cannot write (a `PROT_NONE` part),
/// not a missing feature.
pub fn has_populate_write() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        let Ok(p) = map_anon(PAGE) else {
            return false;
        };
        let ok = advise(p as usize, PAGE, Advice::PopulateWrite).is_ok();
        // SAFETY: the page was mapped just now and nothing refers to it.
        unsafe { unmap(p, PAGE) };
        ok
    })
}

/// # Safety
/// Nobody may rely on the range's bytes surviving: they must be rebuildable (registered with a
/// regenerate callback) or unused.
pub unsafe fn advise_unchecked(addr: usize, len: usize, advice: UncheckedAdvice) -> io::Result<()> {
    let a = match advice {
        UncheckedAdvice::Free => libc::MADV_FREE,
        UncheckedAdvice::DontNeed => libc::MADV_DONTNEED,
        UncheckedAdvice::PageOut => libc::MADV_PAGEOUT,
    };
    raw_madvise(addr, len, a)
}

/// Which pages of `[addr, addr + pages*PAGE)` are present; `out` gets one byte per page (bit 0).
pub fn mincore(addr: usize, pages: usize, out: &mut [u8]) -> io::Result<()> {
    assert!(out.len() >= pages);
    // SAFETY: out has room for one byte per page; mincore only reads page tables.
    let r = unsafe { libc::mincore(addr as *mut libc::c_void, pages * PAGE, out.as_mut_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Number of present pages in the range, by mincore in bounded steps (no allocation).
pub fn resident_pages(addr: usize, pages: usize) -> usize {
    let mut vec = [0u8; 512];
    let mut count = 0;
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(vec.len());
        if mincore(addr + done * PAGE, n, &mut vec).is_err() {
            return count;
        }
        count += vec[..n].iter().filter(|b| **b & 1 != 0).count();
        done += n;
    }
    count
}

/// One atomic read-modify-write of the 8 bytes at `addr` that leaves them unchanged: a real
/// write, so a pending MADV_FREE of the page is cancelled and a missing page is faulted in.
///
/// A `fetch_add(0)` whose result is unused is not enough: LLVM turns idempotent RMWs into plain
/// loads and may then delete them. A compare-exchange of the value with itself is a write on
/// every architecture (x86 `lock cmpxchg` writes even when it fails).
///
/// # Safety
/// `addr` must be 8-byte aligned and mapped writable.
pub unsafe fn touch_write(addr: usize) {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    // SAFETY: aligned and mapped by the caller's contract; the value written is the value read.
    let a = unsafe { &*(addr as *const AtomicU64) };
    let mut v = a.load(Relaxed);
    while let Err(now) = a.compare_exchange_weak(v, v, Relaxed, Relaxed) {
        v = now;
    }
}
