//! Filling chunks: serving one missing-page fault (shared by the monitor's workers and the
//! SIGBUS handler), making a region resident for its first pin, and copying an entry's initial
//! bytes in.
//!
//! A fault finds its region under a hazard pointer (turned at once into a count on the region,
//! `RegionRef`), claims the chunk around the page (`chunk.rs`: at most one fill per chunk; a
//! fault on a chunk being filled waits for that fill's wake instead of calling the callback
//! again), regenerates it into scratch memory, installs only the pages still missing with
//! UFFDIO_COPY, re-advises exactly those pages MADV_FREE through the pin gate (skipped while a
//! pin is in progress or held), releases the chunk and wakes its waiters. A chunk whose last
//! fill failed is dropped whole first (its zero or poisoned pages are not the entry's), so the
//! failure mark goes only when every page of that chunk was rebuilt.
//!
//! A pin does not fault its pages in through the fault paths: with the gate closed, it rebuilds
//! missing and failed chunks from its own thread (waiting for fills in flight), then populates
//! every page for writing (`MADV_POPULATE_WRITE`, which returns an error instead of raising a
//! signal on a page that is missing or poisoned), and goes round again until no page is missing
//! and no chunk failed. So a pin never takes a failure policy's SIGBUS and never needs the
//! fault paths to treat its faults specially: a pin's failed rebuild is applied like any other
//! (zeros, poison, or pages left missing for the SIGBUS handler), so other readers of that chunk
//! get the failure policy, and the pin returns `RegenerateFailed`.
//!
//! The fault path takes no locks other than `try_lock` and allocates only when `may_allocate`
//! (to keep a failure message), so a signal handler can run it. Without `may_allocate` (the
//! SIGBUS handler) it also never maps scratch memory: a chunk larger than the scratch buffer it
//! is given is regenerated in buffer-sized pieces, and a failure's boxed error is handed to
//! `sigbus::keep_failure` instead of being formatted or dropped.
//!
//! Scratch memory: a monitor worker keeps at most `KEEP` (64 KiB) of scratch between fills,
//! advised MADV_FREE; a larger buffer (a larger fill chunk) is unmapped after each fill. So the
//! bytes of a rebuilt chunk never stay behind in memory the kernel cannot take.

use std::any::Any;
use std::cell::Cell;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;

use crate::arena::Arena;
use crate::chunk::{Claim, Outcome, PinGate};
use crate::config::FailurePolicy;
use crate::error::Error;
use crate::region::{hazards, RegenError, Region, RegionRef};
use crate::sys::mem::{self, Advice, UncheckedAdvice, PAGE};
use crate::sys::os;
use crate::sys::uffd::{Fill, Uffd, UFFD_FEATURE_POISON, UFFD_FEATURE_SIGBUS};
use crate::testing::Step;

/// Scratch bytes a monitor worker keeps mapped between fills (see `Scratch::forget_contents`).
pub(crate) const KEEP: usize = 64 * 1024;

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

    /// After a fill: the buffer holds a copy of the bytes just installed, which must not stay in
    /// memory the kernel cannot take (there is no swap). A mapping of up to `KEEP` bytes is kept
    /// for the next fill but advised MADV_FREE (the next fill's writes cancel that); a larger
    /// one is given back. So a worker keeps at most `KEEP` bytes between fills, all reclaimable.
    pub(crate) fn forget_contents(&mut self) {
        if self.ptr.is_null() || self.fixed {
            return;
        }
        if self.cap > KEEP {
            self.release();
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
        } else {
            // SAFETY: our own mapping, not borrowed now; its bytes mean nothing after a fill.
            let _ = unsafe {
                mem::advise_unchecked(self.ptr as usize, self.cap, UncheckedAdvice::Free)
            };
        }
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
    /// The address belongs to no live region: waiters woken. A thread that keeps faulting there
    /// touches memory no entry owns (a use after release).
    Unowned,
    /// Another fill owns the chunk. In monitor mode nothing was done: that fill's wake releases
    /// the faulting thread. In the SIGBUS handler the fill has ended: retry the access.
    Busy,
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

/// Runs of missing pages of one chunk, relative to its first page. More runs than fit are
/// folded into one run over the whole chunk (the copy skips present pages).
struct Runs {
    list: [(usize, usize); 64],
    len: usize,
}

impl Runs {
    fn of(start: usize, pages: usize) -> Runs {
        let mut runs = Runs {
            list: [(0, 0); 64],
            len: 0,
        };
        let mut overflow = false;
        missing_runs(start, pages, |s, l| {
            if runs.len < runs.list.len() {
                runs.list[runs.len] = (s, l);
                runs.len += 1;
            } else {
                overflow = true;
            }
        });
        if overflow {
            runs.list[0] = (0, pages);
            runs.len = 1;
        }
        runs
    }

    fn all(&self) -> &[(usize, usize)] {
        &self.list[..self.len]
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
    let guard = arena.slot(page).and_then(|s| hazards().protect(s))?;
    let r: &Region = guard.get();
    Some(r.base + r.chunk_first(page) * PAGE)
}

thread_local! {
    /// Bases of the regions whose chunks this thread is filling now, innermost last: a callback
    /// that pins its own entry would wait for itself (see `filling_here`). Const-initialized
    /// plain cells: safe to touch in the SIGBUS handler (no allocation, no destructor).
    static FILLING_HERE: Cell<[usize; 16]> = const { Cell::new([0; 16]) };
    static FILLING_DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// Marks, for its lifetime, that this thread fills a chunk of the region at `base`.
struct FillingHere;

impl FillingHere {
    fn enter(base: usize) -> FillingHere {
        let d = FILLING_DEPTH.get();
        if d < 16 {
            let mut here = FILLING_HERE.get();
            here[d] = base;
            FILLING_HERE.set(here);
        }
        FILLING_DEPTH.set(d + 1);
        FillingHere
    }
}

impl Drop for FillingHere {
    fn drop(&mut self) {
        FILLING_DEPTH.set(FILLING_DEPTH.get() - 1);
    }
}

/// Whether this thread is inside a fill of the region at `base` (its callback is running).
pub(crate) fn filling_here(base: usize) -> bool {
    let d = FILLING_DEPTH.get().min(16);
    FILLING_HERE.get()[..d].contains(&base)
}

/// Who fills a chunk.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Filler {
    /// A fault path: re-advises what it installs (through the pin gate); `in_handler` is the
    /// SIGBUS handler (no allocation, the poison policy raises).
    Fault { in_handler: bool },
    /// The first pin of the region, which holds the gate closed: installs, never advises.
    Pin,
}

/// How filling one claimed chunk went.
struct ChunkFill {
    installed: usize,
    /// The CPUs the pages were installed on.
    cpus: Cpus,
    outcome: Outcome,
    failure: Option<Failure>,
    raise: bool,
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
    let Some(r) = arena.slot(page).and_then(RegionRef::from_slot) else {
        uffd.wake(page, PAGE);
        return Served::Unowned;
    };
    r.counters.faults.fetch_add(1, Ordering::Relaxed);
    let c = r.chunk_of_page((page - r.base) / PAGE);
    let (first, n) = r.chunk_pages_of(c);
    let start = r.base + first * PAGE;
    let was_failed = match r.chunks.try_claim(c) {
        Claim::Owned { failed } => failed,
        Claim::Busy => {
            if !may_allocate {
                // The handler cannot sleep in the kernel like a monitor-mode fault: wait for the
                // owner to release the chunk, then let the access retry.
                let mut spins = 0;
                while r.chunks.is_filling(c) {
                    crate::sync::backoff(&mut spins);
                }
            }
            return Served::Busy;
        }
    };
    crate::testing::step(Step::FillClaimed, start);
    let f = fill_chunk(
        uffd,
        &r,
        c,
        was_failed,
        scratch,
        Filler::Fault {
            in_handler: !may_allocate,
        },
    );
    r.counters
        .pages_regenerated
        .fetch_add(f.installed as u64, Ordering::Relaxed);
    let cpus = f.cpus;
    let served = match f.failure {
        None if f.installed == 0 => Served::Present,
        None => Served::Filled(f.installed),
        Some(failure) => {
            if may_allocate {
                r.record_failure(failure.to_string());
            } else {
                r.counters.regen_failures.fetch_add(1, Ordering::Relaxed);
                crate::sigbus::keep_failure(&r.last_error, failure);
            }
            if f.raise {
                Served::Raise
            } else {
                Served::Failed
            }
        }
    };
    // Release before waking: a monitor worker that found the chunk busy and dropped its fault
    // message relies on this wake coming after (see `chunk.rs`).
    r.chunks.release(c, f.outcome);
    uffd.wake(start, n * PAGE);
    drop(r);
    if let Served::Filled(_) = served {
        readvise_later(arena, start, cpus);
    }
    served
}

/// How long after a fill its chunk is advised MADV_FREE once more.
const READVISE_AFTER_NS: u64 = 50_000_000;

/// Queues the chunk at `start` to be advised MADV_FREE once more a little later
/// (`readvise_due`), from the CPUs that installed it. The advice right after a fill can miss
/// pages that are off the LRU lists for a moment, which the per-CPU check in `readvise` cannot
/// see: pages a kernel memory scanner (DAMON's pageout scheme, compaction) has isolated, pages
/// still in a batch of a CPU the thread left and came back to during the copy. Without swap a page the advice missed is
/// never reclaimable; a second advice, once such scans have put the pages back, catches it.
/// When the queue is full the oldest chunk is advised now to make room. No allocation.
fn readvise_later(arena: &Arena, start: usize, cpus: Cpus) {
    let due = os::now_ns() + READVISE_AFTER_NS;
    let mut item = (start, due, cpus);
    for _ in 0..4 {
        match arena.readvise.push(item) {
            Ok(()) => return,
            Err(back) => {
                item = back;
                if let Some((old, _, cpus)) = arena.readvise.pop() {
                    readvise_chunk(arena, old, cpus);
                }
            }
        }
    }
}

/// Advises again the queued chunks that are due, at most `max` of them (the monitor's reader
/// between polls, the SIGBUS handler after a fault). Returns whether chunks remain queued.
pub(crate) fn readvise_due(arena: &Arena, max: usize) -> bool {
    if arena.readvise.is_empty() || arena.forked() {
        return false;
    }
    let now = os::now_ns();
    for _ in 0..max {
        let Some((start, due, cpus)) = arena.readvise.pop() else {
            return false;
        };
        if due > now {
            // Not yet (the queue is roughly in due order): put it back and stop.
            if arena.readvise.push((start, due, cpus)).is_err() {
                readvise_chunk(arena, start, cpus);
            }
            return true;
        }
        readvise_chunk(arena, start, cpus);
    }
    !arena.readvise.is_empty()
}

/// Advises the chunk at `start` MADV_FREE again, if a live region holds it, nothing pins it and
/// no fill owns it. The region may have been removed and its span reused since the chunk was
/// queued: whatever unpinned region holds it now, its present pages are volatile by contract.
fn readvise_chunk(arena: &Arena, start: usize, cpus: Cpus) {
    let Some(r) = arena.slot(start).and_then(RegionRef::from_slot) else {
        return;
    };
    let c = r.chunk_of_page((start - r.base) / PAGE);
    let (first, n) = r.chunk_pages_of(c);
    if r.chunks.is_filling(c) || r.chunks.is_failed(c) {
        return;
    }
    // From the CPUs that installed the pages: their batches may still hold them.
    readvise(&r.gate, r.base + first * PAGE, n * PAGE, cpus);
}

/// Fills chunk `c` of `r`, which the caller claimed: drops a failed chunk's pages first (so it is
/// rebuilt whole), regenerates, installs only the missing pages and, for a fault path, re-advises
/// them MADV_FREE through the pin gate. On failure applies the failure policy to the missing
/// pages. The caller releases the chunk and wakes its waiters.
fn fill_chunk(
    uffd: &Uffd,
    r: &Region,
    c: usize,
    was_failed: bool,
    scratch: &mut Scratch,
    who: Filler,
) -> ChunkFill {
    let (first, n) = r.chunk_pages_of(c);
    let start = r.base + first * PAGE;
    let bytes = n * PAGE;
    let _here = FillingHere::enter(r.base);
    // A failed chunk's pages hold zeros or poison, or are missing: drop them all, so that the
    // whole chunk is rebuilt and its mark can go. A fault path cannot while a pin holds the gate
    // (the drop could take pages the pin made resident): it fills what is missing and leaves
    // the mark, and the pin rebuilds the chunk itself.
    let mut dropped = false;
    if was_failed {
        let pass = match who {
            Filler::Pin => None,
            Filler::Fault { .. } => r.gate.enter(),
        };
        if who == Filler::Pin || pass.is_some() {
            // SAFETY: the chunk is ours (claimed) and its bytes are rebuilt below; nothing pins
            // it (the gate is open, or this is the pin that closed it and has not returned).
            let _ = unsafe { mem::advise_unchecked(start, bytes, UncheckedAdvice::DontNeed) };
            dropped = true;
        }
    }
    let kept = if was_failed && !dropped {
        Outcome::Unchanged
    } else {
        Outcome::Rebuilt
    };
    let runs = Runs::of(start, n);
    if runs.len == 0 {
        return ChunkFill {
            installed: 0,
            cpus: Cpus::UNKNOWN,
            outcome: kept,
            failure: None,
            raise: false,
        };
    }
    let gate = match who {
        Filler::Fault { .. } => Some(&r.gate),
        Filler::Pin => None,
    };
    let off = first * PAGE;
    let in_handler = who == (Filler::Fault { in_handler: true });
    let cpus = Cpus::start();
    // In the handler the scratch cannot grow: a larger chunk is regenerated in pieces.
    let (installed, outcome) = if in_handler && scratch.capacity() < bytes {
        in_pieces(uffd, r, first, runs.all(), scratch, gate)
    } else {
        match scratch.get(bytes) {
            Some(buf) => match regenerate(r, off, buf) {
                Ok(()) => {
                    crate::testing::step(Step::FillRegenerated, start);
                    let src = buf.as_ptr();
                    let mut installed = 0;
                    for &(s, l) in runs.all() {
                        // SAFETY: src holds `bytes` readable bytes, of which this run is a part.
                        let run_src = unsafe { src.add(s * PAGE) };
                        installed += install(uffd, start + s * PAGE, run_src, l * PAGE, gate);
                    }
                    (installed, Ok(()))
                }
                Err(f) => (0, Err(f)),
            },
            None => (0, Err(Failure::NoScratch)),
        }
    };
    match outcome {
        Ok(()) => ChunkFill {
            installed: installed / PAGE,
            cpus: cpus.end(),
            outcome: kept,
            failure: None,
            raise: false,
        },
        Err(f) => ChunkFill {
            installed: installed / PAGE,
            cpus: cpus.end(),
            outcome: Outcome::Failed,
            failure: Some(f),
            // Pages a piecewise fill installed before the failure are present: skipped.
            raise: apply_failure(uffd, r, start, runs.all()),
        },
    }
}

/// Makes every page of `r` resident for its first pin, from the calling thread (the gate is
/// closed): rebuilds the chunks that are failed or have missing pages, then populates every page
/// for writing (MADV_POPULATE_WRITE: a write fault per page, which cancels a pending MADV_FREE;
/// a page dropped meanwhile makes it fail or, with a monitor that serves kernel faults, is
/// rebuilt by the monitor), and repeats until no page is missing and no chunk failed.
pub(crate) fn make_resident(uffd: &Uffd, r: &Region) -> Result<(), Error> {
    let mut scratch = Scratch::new();
    let mut rounds = 0;
    loop {
        // Chunks with missing pages (one mincore pass over the region), failed chunks and
        // chunks being filled get the pin's attention; the others are resident already.
        let mut todo: Vec<usize> = Vec::new();
        missing_runs(r.base, r.pages, |s, l| {
            let (a, b) = (r.chunk_of_page(s), r.chunk_of_page(s + l - 1));
            for c in a..=b {
                if todo.last() != Some(&c) {
                    todo.push(c);
                }
            }
        });
        if r.chunks.failed_chunks() > 0 || (0..r.chunks.len()).any(|c| r.chunks.is_filling(c)) {
            todo.extend(
                (0..r.chunks.len()).filter(|&c| r.chunks.is_failed(c) || r.chunks.is_filling(c)),
            );
            todo.sort_unstable();
            todo.dedup();
        }
        for c in todo {
            rebuild_for_pin(uffd, r, c, &mut scratch)?;
        }
        let populated = populate(r.base, r.pages);
        if populated.is_ok() && r.chunks.failed_chunks() == 0 {
            return Ok(());
        }
        // A page was dropped between the rebuild and the populate, or a fault path's fill of
        // it failed meanwhile: go round again.
        rounds += 1;
        if rounds >= 100 {
            return Err(match populated {
                Err(errno) => Error::Kernel {
                    op: "MADV_POPULATE_WRITE (pages kept being dropped)",
                    errno,
                },
                Ok(()) => Error::RegenerateFailed(r.error_text()),
            });
        }
    }
}

/// Makes the pages of the whole span present and written, so none is volatile. MADV_POPULATE_WRITE
/// where the kernel has it (5.14); else one atomic write per page, which may fault (and is then
/// served like any fault).
fn populate(base: usize, pages: usize) -> Result<(), i32> {
    match mem::advise(base, pages * PAGE, Advice::PopulateWrite) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            for p in 0..pages {
                // SAFETY: the page lies in a live region's span, mapped writable and aligned;
                // the write leaves the bytes as they are.
                unsafe { mem::touch_write(base + p * PAGE) };
            }
            Ok(())
        }
        Err(e) => Err(e.raw_os_error().unwrap_or(libc::EFAULT)),
    }
}

/// For a pin: rebuilds chunk `c` if it failed or has missing pages, waiting for a fill in flight.
fn rebuild_for_pin(uffd: &Uffd, r: &Region, c: usize, scratch: &mut Scratch) -> Result<(), Error> {
    let (first, n) = r.chunk_pages_of(c);
    let start = r.base + first * PAGE;
    let mut spins = 0;
    loop {
        if !r.chunks.is_failed(c) && !r.chunks.is_filling(c) && Runs::of(start, n).len == 0 {
            return Ok(());
        }
        let was_failed = match r.chunks.try_claim(c) {
            Claim::Owned { failed } => failed,
            Claim::Busy => {
                crate::sync::backoff(&mut spins);
                continue;
            }
        };
        crate::testing::step(Step::FillClaimed, start);
        let f = fill_chunk(uffd, r, c, was_failed, scratch, Filler::Pin);
        r.counters
            .pages_regenerated
            .fetch_add(f.installed as u64, Ordering::Relaxed);
        let failure = f.failure.map(|failure| {
            let text = failure.to_string();
            r.record_failure(text.clone());
            text
        });
        r.chunks.release(c, f.outcome);
        uffd.wake(start, n * PAGE);
        return match failure {
            Some(text) => Err(Error::RegenerateFailed(text)),
            None => Ok(()),
        };
    }
}

/// Copies `bytes` (the region's length) into a fresh region with batched UFFDIO_COPY and makes
/// them volatile. A source the kernel cannot read (a reclaimed page of a SIGBUS-mode entry, or
/// of any entry under a user-mode-only userfaultfd: EFAULT) is copied through a bounce buffer
/// by ordinary reads, which rebuild it.
pub(crate) fn fill_from(uffd: &Uffd, r: &Region, bytes: &[u8]) -> Result<(), Error> {
    debug_assert_eq!(bytes.len(), r.len);
    let full = r.len / PAGE * PAGE;
    let cpus = Cpus::start();
    let mut done = 0;
    let mut tries = 0;
    let mut bounce: Vec<u8> = Vec::new();
    while done < r.pages * PAGE {
        let left = r.pages * PAGE - done;
        let direct = bounce.is_empty() && done < full;
        let (src, len) = if direct {
            // SAFETY: `done < full <= bytes.len()`.
            (unsafe { bytes.as_ptr().add(done) }, full - done)
        } else {
            // The tail page (zero past the entry's end), or the bounce path.
            let len = left.min(1 << 20);
            if bounce.len() < len {
                bounce.resize(len, 0);
            }
            let avail = bytes.len().saturating_sub(done).min(len);
            bounce[..avail].copy_from_slice(&bytes[done..done + avail]);
            bounce[avail..len].fill(0);
            (bounce.as_ptr(), len)
        };
        // SAFETY: `src` is readable for `len` bytes; the destination lies in the region's span.
        match unsafe { uffd.copy(r.base + done, src, len) } {
            Fill::Done { .. } => done += len,
            Fill::Retry { installed } => {
                done += installed;
                tries += 1;
                if tries > 1000 {
                    return Err(Error::Kernel {
                        op: "UFFDIO_COPY (address space kept changing)",
                        errno: libc::EAGAIN,
                    });
                }
                os::sleep_ms(1);
            }
            Fill::Failed { installed, errno } if errno == libc::EFAULT && direct => {
                done += installed;
                bounce.resize(PAGE, 0); // from here on through the bounce buffer
            }
            Fill::Failed { errno, .. } => {
                return Err(Error::Kernel {
                    op: "UFFDIO_COPY",
                    errno,
                })
            }
        }
    }
    readvise(&r.gate, r.base, r.pages * PAGE, cpus.end());
    Ok(())
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

/// Installs `len` bytes from `src` at `dst` (present pages skipped) and, given the region's
/// gate, re-advises them MADV_FREE unless a pin closed it; returns the bytes installed.
fn install(uffd: &Uffd, dst: usize, src: *const u8, len: usize, gate: Option<&PinGate>) -> usize {
    let cpus = Cpus::start();
    // SAFETY: the callers pass `src` readable for `len` bytes and `dst..dst+len` inside a region.
    let got = fill_retrying(|d| unsafe { uffd.copy(dst + d, src.add(d), len - d) }, len);
    let cpus = cpus.end();
    crate::testing::step(Step::FillInstalled, dst);
    if let Some(gate) = gate {
        readvise(gate, dst, len, cpus);
    }
    got
}

/// The CPUs a thread ran on when it installed pages: before and after the copy (`u16::MAX`:
/// unknown). Pages just installed sit in the per-CPU batch of the CPU that installed them.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cpus([u16; 2]);

impl Cpus {
    fn now() -> u16 {
        os::cpu().map_or(u16::MAX, |c| c.min(u16::MAX as usize - 1) as u16)
    }

    /// Around an install: call `start` before it and `end` after.
    fn start() -> Cpus {
        let c = Self::now();
        Cpus([c, c])
    }

    fn end(self) -> Cpus {
        Cpus([self.0[0], Self::now()])
    }

    const UNKNOWN: Cpus = Cpus([u16::MAX, u16::MAX]);
}

/// Advises `[dst, dst + len)` MADV_FREE through the pin gate (nothing if a pin closed it),
/// before anyone is woken: no thread can have written these pages yet.
///
/// MADV_FREE skips pages that are not on an LRU list yet, such as pages just installed that
/// still sit in the per-CPU batch of the CPU that installed them (KERNEL-NOTES); it drains only
/// the batch of the CPU it runs on. Without swap a skipped page is never reclaimable. So the
/// advice is given again from each CPU the pages were installed on (`cpus`) that is not the
/// one this thread runs on now: the thread moves there for the call, which drains that batch.
fn readvise(gate: &PinGate, dst: usize, len: usize, cpus: Cpus) {
    let Some(_pass) = gate.enter() else {
        return;
    };
    let free = || {
        // SAFETY: the range holds pages of an unpinned region (the gate is open and we are
        // inside it): their bytes are the callback's, volatile by contract.
        let _ = unsafe { mem::advise_unchecked(dst, len, UncheckedAdvice::Free) };
    };
    free();
    let here = Cpus::now();
    let [a, b] = cpus.0;
    for c in [a, if b != a { b } else { u16::MAX }] {
        if c != u16::MAX && c != here {
            os::on_cpu(c as usize, free);
        }
    }
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
    gate: Option<&PinGate>,
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
            installed += install(uffd, r.base + page * PAGE, piece.as_ptr(), n * PAGE, gate);
            p += n;
        }
    }
    (installed, Ok(()))
}

/// Applies the failure policy to the missing pages of `runs` (relative to `start`). Returns
/// true if the faulting access must raise SIGBUS itself (the pages stay missing).
fn apply_failure(uffd: &Uffd, r: &Region, start: usize, runs: &[(usize, usize)]) -> bool {
    let poison = match r.policy {
        FailurePolicy::Zero => false,
        // The SIGBUS mode's uffd raises SIGBUS on a missing page by itself: leave them missing.
        FailurePolicy::Poison if uffd.has(UFFD_FEATURE_SIGBUS) => return true,
        FailurePolicy::Poison => uffd.has(UFFD_FEATURE_POISON),
    };
    for &(s, l) in runs {
        let dst = start + s * PAGE;
        let len = l * PAGE;
        if poison {
            fill_retrying(|d| uffd.poison(dst + d, len - d), len);
        } else {
            // Zero policy, or poison without UFFDIO_POISON (Linux < 6.6): zeros, marked failed.
            fill_retrying(|d| uffd.zeropage(dst + d, len - d), len);
        }
    }
    false
}
