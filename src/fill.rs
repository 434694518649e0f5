//! Serving one missing-page fault: find the region and chunk, regenerate the chunk into scratch
//! memory, install only the pages still missing, re-advise them MADV_FREE, wake the waiters.
//!
//! Shared by every fault path. It takes no locks other than `try_lock` and allocates only when
//! `may_allocate` (to keep a failure message), so a signal handler can run it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;

use crate::arena::Arena;
use crate::config::FailurePolicy;
use crate::hazard;
use crate::region::Region;
use crate::sys::mem::{self, UncheckedAdvice, PAGE};
use crate::sys::os;
use crate::sys::uffd::{Fill, Uffd, UFFD_FEATURE_POISON};

/// Page-aligned scratch memory for one chunk; grows on demand (outside signal handlers).
pub(crate) struct Scratch {
    ptr: *mut u8,
    cap: usize,
}

// SAFETY: Scratch owns its mapping exclusively.
unsafe impl Send for Scratch {}

impl Scratch {
    pub(crate) fn new() -> Scratch {
        Scratch {
            ptr: std::ptr::null_mut(),
            cap: 0,
        }
    }

    /// A buffer of at least `len` bytes, or `None` if it cannot be mapped.
    pub(crate) fn get(&mut self, len: usize) -> Option<&mut [u8]> {
        if len > self.cap {
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
        if !self.ptr.is_null() {
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
    let idx = (page - r.base) / PAGE;
    let first = idx / r.chunk_pages * r.chunk_pages;
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
    if nruns == 0 {
        uffd.wake(start, bytes);
        return Served::Present;
    }

    let off = first * PAGE;
    let data_len = bytes.min(r.len - off);
    let outcome = match scratch.get(bytes) {
        None => Err(may_allocate.then(|| "no scratch memory for the chunk".to_string())),
        Some(buf) => {
            buf[data_len..].fill(0);
            let t0 = os::now_ns();
            let res = catch_unwind(AssertUnwindSafe(|| (r.regen)(off, &mut buf[..data_len])));
            r.counters.record_regen(os::now_ns().saturating_sub(t0));
            match res {
                Ok(Ok(())) => Ok(buf.as_ptr()),
                Ok(Err(e)) => Err(may_allocate.then(|| e.to_string())),
                Err(_) => Err(may_allocate.then(|| "the callback panicked".to_string())),
            }
        }
    };

    let served = match outcome {
        Ok(src) => {
            let mut installed = 0;
            for &(s, l) in &runs[..nruns] {
                let dst = start + s * PAGE;
                let len = l * PAGE;
                // SAFETY: src holds `bytes` readable bytes; dst..dst+len is inside the region.
                let got = fill_retrying(
                    |d| unsafe { uffd.copy(dst + d, src.add(s * PAGE + d), len - d) },
                    len,
                );
                installed += got;
                // Re-advise from this thread, before waking anyone: MADV_FREE drains this CPU's
                // LRU batch first, and no thread can have written these pages yet.
                // SAFETY: the pages were just filled with regenerable bytes and nobody was woken.
                let _ = unsafe { mem::advise_unchecked(dst, len, UncheckedAdvice::Free) };
            }
            r.counters
                .pages_regenerated
                .fetch_add((installed / PAGE) as u64, Ordering::Relaxed);
            if r.failed.load(Ordering::Relaxed) {
                r.failed.store(false, Ordering::SeqCst);
            }
            Served::Filled(installed / PAGE)
        }
        Err(msg) => {
            r.counters.regen_failures.fetch_add(1, Ordering::Relaxed);
            if let Some(m) = msg {
                if let Ok(mut slot) = r.last_error.try_lock() {
                    *slot = Some(m);
                }
            }
            r.failed.store(true, Ordering::SeqCst);
            r.fail_seq.fetch_add(1, Ordering::SeqCst);
            fail_fill(uffd, r, start, &runs[..nruns]);
            Served::Failed
        }
    };
    uffd.wake(start, bytes);
    served
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
