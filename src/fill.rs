//! Serving one missing-page fault: find the region and chunk, regenerate the chunk into scratch
//! memory, install only the pages still missing, re-advise them MADV_FREE, wake the waiters.
//!
//! Shared by every fault path. It takes no locks other than `try_lock` and allocates only when
//! `may_allocate` (to keep a failure message), so a signal handler can run it. Without
//! `may_allocate` (the SIGBUS handler) it also never maps scratch memory: a chunk larger than the
//! scratch buffer it is given is regenerated in buffer-sized pieces, and a failure's boxed error
//! is handed to `sigbus::keep_failure` instead of being formatted or dropped.

use std::any::Any;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;

use crate::arena::Arena;
use crate::config::FailurePolicy;
use crate::hazard;
use crate::region::{RegenError, Region};
use crate::sys::mem::{self, UncheckedAdvice, PAGE};
use crate::sys::os;
use crate::sys::uffd::{Fill, Uffd, UFFD_FEATURE_POISON};

/// Page-aligned scratch memory for one chunk; grows on demand (outside signal handlers).
pub(crate) struct Scratch {
    ptr: *mut u8,
    cap: usize,
    /// Memory the caller owns, of a fixed size: never grown or unmapped here (the SIGBUS
    /// handler's pooled buffers and its stack fallback).
    fixed: bool,
}

// SAFETY: Scratch owns its mapping exclusively.
unsafe impl Send for Scratch {}

impl Scratch {
    pub(crate) fn new() -> Scratch {
        Scratch {
            ptr: std::ptr::null_mut(),
            cap: 0,
            fixed: false,
        }
    }

    /// Scratch over `cap` bytes at `ptr` that the caller owns; `get` never grows it.
    ///
    /// # Safety
    /// `ptr` must be page-aligned and writable for `cap` bytes, and used by nobody else while the
    /// returned value lives.
    pub(crate) unsafe fn fixed(ptr: *mut u8, cap: usize) -> Scratch {
        Scratch {
            ptr,
            cap,
            fixed: true,
        }
    }

    /// Bytes `get` hands out without growing.
    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }

    /// A buffer of at least `len` bytes, or `None` if it cannot be mapped.
    /// A fixed scratch gives `None` for more than its capacity.
    pub(crate) fn get(&mut self, len: usize) -> Option<&mut [u8]> {
        if len > self.cap {
            if self.fixed {
                return None;
            }
            let cap = len.next_power_of_two().max(64 * 1024);
            let p = mem::map_anon(cap).ok()?;
            self.release();
            self.ptr = p;
            self.cap = cap;
        }
        // SAFETY: ptr maps cap >= len bytes that only this Scratch uses.
        Some(unsafe { std::slice::from_raw_parts_mut(self.ptr, len) })
    }

    fn release(&mut self) {
        if !self.ptr.is_null() && !self.fixed {
            // SAFETY: our own mapping; no slice into it outlives `get`'s borrow.
            unsafe { mem::unmap(self.ptr, self.cap) };
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.release();
    }
}

/// What serving a fault did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Served {
    /// The address belongs to no live region (a stale duplicate message): waiters woken.
    Unowned,
    /// Every page of the chunk was already present: waiters woken.
    Present,
    /// The chunk was regenerated; this many pages installed.
    Filled(usize),
    /// The callback failed; the missing pages were zero-filled or poisoned.
    Failed,
    /// The callback failed under the poison policy on the no-allocation path (the SIGBUS
    /// handler): the pages were left missing and the faulting access must raise SIGBUS. A
    /// poisoned page cannot be told from a missing one in the handler (both fault with
    /// `BUS_ADRERR` where the kernel lacks CONFIG_MEMORY_FAILURE), so nothing is poisoned there.
    Raise,
}

/// Calls `f(first_page, pages)` for each run of missing pages in `[addr, addr + pages*PAGE)`.
fn missing_runs(addr: usize, pages: usize, mut f: impl FnMut(usize, usize)) {
    let mut vec = [0u8; 512];
    let mut run: Option<(usize, usize)> = None;
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(vec.len());
        if mem::mincore(addr + done * PAGE, n, &mut vec).is_err() {
            vec[..n].fill(0); // unknown: treat as missing, the fill skips present pages anyway
        }
        for (i, b) in vec[..n].iter().enumerate() {
            let p = done + i;
            if b & 1 == 0 {
                run = match run {
                    Some((s, l)) if s + l == p => Some((s, l + 1)),
                    Some((s, l)) => {
                        f(s, l);
                        Some((p, 1))
                    }
                    None => Some((p, 1)),
                };
            }
        }
        done += n;
    }
    if let Some((s, l)) = run {
        f(s, l);
    }
}

/// Runs a fill ioctl to completion, retrying while the address space changes (bounded: ~1 s).
fn fill_retrying(mut op: impl FnMut(usize) -> Fill, len: usize) -> usize {
    let mut done = 0;
    for _ in 0..1000 {
        match op(done) {
            Fill::Done { installed } => return done + installed,
            Fill::Retry { installed } => {
                done += installed;
                os::sleep_ms(1);
            }
            Fill::Failed { installed, .. } => return done + installed,
        }
        if done >= len {
            break;
        }
    }
    done
}

/// The start of the chunk holding `addr`, if `addr` is in a live region of `arena`. Takes no
/// lock and does not allocate (the SIGBUS handler uses it).
pub(crate) fn chunk_of(arena: &Arena, addr: usize) -> Option<usize> {
    let page = addr & !(PAGE - 1);
    let guard = arena.slot(page).and_then(hazard::protect)?;
    let r: &Region = guard.get();
    Some(r.base + r.chunk_first(page) * PAGE)
}

/// Serves a fault at `addr` in `arena`.
pub(crate) fn serve(
    arena: &Arena,
    addr: usize,
    scratch: &mut Scratch,
    may_allocate: bool,
) -> Served {
    let uffd = arena.uffd();
    let page = addr & !(PAGE - 1);
    let guard = match arena.slot(page).and_then(hazard::protect) {
        Some(g) => g,
        None => {
            uffd.wake(page, PAGE);
            return Served::Unowned;
        }
    };
    let r: &Region = guard.get();
    r.counters.faults.fetch_add(1, Ordering::Relaxed);
    let first = r.chunk_first(page);
    let n = r.chunk_pages.min(r.pages - first);
    let start = r.base + first * PAGE;
    let bytes = n * PAGE;

    let mut runs = [(0usize, 0usize); 64];
    let mut nruns = 0;
    let mut overflow = false;
    missing_runs(start, n, |s, l| {
        if nruns < runs.len() {
            runs[nruns] = (s, l);
            nruns += 1;
        } else {
            overflow = true;
        }
    });
    if overflow {
        // Too fragmented to list: copy the whole chunk, present pages are skipped by the copy.
        runs[0] = (0, n);
        nruns = 1;
    }
    // Re-advise what was installed, except where that could include present pages a running
    // pin sweep already made non-volatile: the whole-chunk fallback during a pin.
    let advise = !(overflow && r.pinning.load(Ordering::SeqCst));
    if nruns == 0 {
        uffd.wake(start, bytes);
        return Served::Present;
    }

    let off = first * PAGE;
    // Without may_allocate the scratch cannot grow: a larger chunk is regenerated in pieces.
    let in_one_go = may_allocate || scratch.capacity() >= bytes;
    let (installed, outcome) = if !in_one_go {
        in_pieces(uffd, r, first, &runs[..nruns], scratch, advise)
    } else {
        match scratch.get(bytes) {
            Some(buf) => match regenerate(r, off, buf) {
                Ok(()) => {
                    let src = buf.as_ptr();
                    let mut installed = 0;
                    for &(s, l) in &runs[..nruns] {
                        // SAFETY: src holds `bytes` readable bytes, of which this run is a part.
                        let run_src = unsafe { src.add(s * PAGE) };
                        installed += install(uffd, start + s * PAGE, run_src, l * PAGE, advise);
                    }
                    (installed, Ok(()))
                }
                Err(f) => (0, Err(f)),
            },
            None => (0, Err(Failure::NoScratch)),
        }
    };
    r.counters
        .pages_regenerated
        .fetch_add((installed / PAGE) as u64, Ordering::Relaxed);

    let served = match outcome {
        Ok(()) => {
            if r.failed.load(Ordering::Relaxed) {
                r.failed.store(false, Ordering::SeqCst);
            }
            Served::Filled(installed / PAGE)
        }
        Err(f) => {
            r.counters.regen_failures.fetch_add(1, Ordering::Relaxed);
            if may_allocate {
                let m = f.to_string();
                if let Ok(mut slot) = r.last_error.try_lock() {
                    *slot = Some(m);
                }
            } else {
                crate::sigbus::keep_failure(&r.last_error, f);
            }
            r.failed.store(true, Ordering::SeqCst);
            r.fail_seq.fetch_add(1, Ordering::SeqCst);
            if !may_allocate
                && r.policy == FailurePolicy::Poison
                && !r.pinning.load(Ordering::SeqCst)
            {
                Served::Raise
            } else {
                // Pages a piecewise fill installed before the failure are present: the fill
                // skips them.
                fail_fill(uffd, r, start, &runs[..nruns]);
                Served::Failed
            }
        }
    };
    uffd.wake(start, bytes);
    served
}

/// Why a chunk could not be regenerated. The no-allocation path must neither format nor drop
/// it (the boxes free memory), so it is handed on whole.
pub(crate) enum Failure {
    /// No scratch memory could be had for the chunk.
    NoScratch,
    /// The callback returned an error.
    Error(RegenError),
    /// The callback panicked; the panic payload.
    Panic(#[allow(dead_code)] Box<dyn Any + Send>), // kept to be dropped outside the handler
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::NoScratch => f.write_str("no scratch memory for the chunk"),
            Failure::Error(e) => write!(f, "{e}"),
            Failure::Panic(_) => f.write_str("the callback panicked"),
        }
    }
}

/// Calls the callback for the region's bytes at `off` into `buf` (its tail past the region's
/// length zeroed), catching panics.
fn regenerate(r: &Region, off: usize, buf: &mut [u8]) -> Result<(), Failure> {
    let data_len = buf.len().min(r.len - off);
    buf[data_len..].fill(0);
    let t0 = os::now_ns();
    let res = catch_unwind(AssertUnwindSafe(|| (r.regen)(off, &mut buf[..data_len])));
    r.counters.record_regen(os::now_ns().saturating_sub(t0));
    match res {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Failure::Error(e)),
        Err(p) => Err(Failure::Panic(p)),
    }
}

/// Installs `len` bytes from `src` at `dst` (present pages skipped) and, if `advise`, re-advises
/// the range; returns the bytes installed.
fn install(uffd: &Uffd, dst: usize, src: *const u8, len: usize, advise: bool) -> usize {
    // SAFETY: the callers pass `src` readable for `len` bytes and `dst..dst+len` inside a region.
    let got = fill_retrying(|d| unsafe { uffd.copy(dst + d, src.add(d), len - d) }, len);
    if advise {
        // Re-advise from this thread, before waking anyone: MADV_FREE drains this CPU's LRU
        // batch first, and no thread can have written these pages yet.
        // SAFETY: the range holds only pages just filled with regenerable bytes, or present
        // volatile ones (the caller passes `advise = false` where a pin may hold some).
        let _ = unsafe { mem::advise_unchecked(dst, len, UncheckedAdvice::Free) };
    }
    got
}

/// The no-allocation path for a chunk larger than the scratch buffer: regenerates only the
/// missing runs, in pieces of at most the buffer's size, installing each piece before the next.
/// `first` is the chunk's first page in the region; `runs` are relative to it. Returns the bytes
/// installed and how it ended.
fn in_pieces(
    uffd: &Uffd,
    r: &Region,
    first: usize,
    runs: &[(usize, usize)],
    scratch: &mut Scratch,
    advise: bool,
) -> (usize, Result<(), Failure>) {
    let piece_pages = scratch.capacity() / PAGE;
    let Some(buf) = scratch.get(piece_pages * PAGE).filter(|_| piece_pages > 0) else {
        return (0, Err(Failure::NoScratch));
    };
    let mut installed = 0;
    for &(s, l) in runs {
        let mut p = 0;
        while p < l {
            let n = (l - p).min(piece_pages);
            let page = first + s + p;
            let piece = &mut buf[..n * PAGE];
            if let Err(f) = regenerate(r, page * PAGE, piece) {
                return (installed, Err(f));
            }
            installed += install(uffd, r.base + page * PAGE, piece.as_ptr(), n * PAGE, advise);
            p += n;
        }
    }
    (installed, Ok(()))
}

fn fail_fill(uffd: &Uffd, r: &Region, start: usize, runs: &[(usize, usize)]) {
    let poison = r.policy == FailurePolicy::Poison
        && uffd.has(UFFD_FEATURE_POISON)
        && !r.pinning.load(Ordering::SeqCst);
    for &(s, l) in runs {
        let dst = start + s * PAGE;
        let len = l * PAGE;
        if poison {
            fill_retrying(|d| uffd.poison(dst + d, len - d), len);
        } else {
            fill_retrying(|d| uffd.zeropage(dst + d, len - d), len);
        }
    }
}
