//! Filling chunks: serving one missing-page fault (generic over the path serving it: a monitor
//! worker or the SIGBUS handler), making a region resident for its first pin (`pin.rs`),
//! copying an entry's initial bytes in, and re-advising installed pages (`readvise.rs`).
//!
//! A fault finds its region under a hazard pointer (turned at once into a count on the region,
//! `RegionRef`), claims the chunk around the page (`chunk.rs`: at most one fill per chunk; a
//! fault on a chunk being filled waits for that fill instead of calling the callback again),
//! regenerates it into scratch memory, installs only the pages still missing with UFFDIO_COPY,
//! re-advises exactly those pages MADV_FREE through the pin gate (skipped while a pin is in
//! progress or held), releases the chunk and wakes its waiters. A chunk whose last fill failed
//! is dropped whole first (its zero or poisoned pages are not the entry's), so the failure mark
//! goes only when every page of that chunk was rebuilt.
//!
//! The fault path takes no locks and allocates nothing itself; whether the path may allocate
//! (grow its scratch, format a failure's message) is the path's: with a fixed scratch buffer
//! (the SIGBUS handler's), a chunk larger than the buffer is regenerated in buffer-sized pieces.
//!
//! Scratch memory: a monitor worker keeps at most `scratch::KEEP` (64 KiB) of scratch between
//! fills, advised MADV_FREE when it runs out of work; a larger buffer (a larger fill chunk) is
//! unmapped after each fill. The SIGBUS handler advises the part of its buffer a fill used
//! after each fill (a one-page chunk it rebuilds on the faulting thread's stack). So the bytes of a rebuilt chunk stay behind in memory the kernel cannot
//! take only while a worker is busy, and 64 KiB per worker at most.

mod fill;
mod pin;
pub(crate) mod readvise;
mod runs;
mod scratch;

pub use pin::PinSweep;
pub(crate) use pin::{fill_from, make_resident, pin_filling, set_pin_sweep};
pub(crate) use scratch::Scratch;

use std::sync::atomic::Ordering;

use crate::arena::Arena;
use crate::chunk::Claim;
use crate::hook::{self, Step};
use crate::region::{hazards, Failure, Region, RegionRef};
use crate::sys::mem::PAGE;
use crate::sys::uffd::Uffd;
use fill::{fill_chunk, Filler};

/// What a serving path may do, where the two differ (a monitor worker, the SIGBUS handler).
pub(crate) trait Path {
    /// Keeps a failed fill's error for `Entry::last_error`, and counts the failure.
    fn keep_failure(&self, r: &Region, f: Failure);
    /// A fault on chunk `c`, which another fill owns and will wake after its release (the fault
    /// noted itself waiting: `Chunks::note_waiter`): return once the faulting thread will be
    /// released by that fill (a monitor worker: at once; the handler: when the fill ended).
    fn busy(&self, r: &Region, c: usize);
    /// Whether this path fills ahead of sequential faults now (`Config::read_ahead`): a monitor
    /// worker does while the pool has room (see `Worker`); the SIGBUS handler does not (it runs
    /// in the faulting thread, which a fill ahead would hold up on every sequential fault, and
    /// the handler's scratch is fixed).
    fn fills_ahead(&self) -> bool {
        false
    }
    /// Before filling ahead of a fault whose chunk is installed but whose thread is not woken
    /// yet: arranges for `[start, start + bytes)` to be woken by someone else if the fills ahead
    /// take longer than a short bound (a callback ahead may be slow or never return). Returns a
    /// ticket for [`woken`](Path::woken).
    fn wake_later(&self, _start: usize, _bytes: usize) -> u64 {
        0
    }
    /// The fills ahead are done and the fault's thread is being woken: cancels `wake_later`.
    fn woken(&self, _ticket: u64) {}
    /// About to fill the chunk at `start` ahead of the fault it served: a path that records
    /// which chunk its thread rebuilds (the monitor's, for its self-read check) records this one
    /// now (a callback ahead reading its own chunk is caught, one reading the chunk of the fault
    /// served is not taken for it).
    fn filling_ahead(&self, _start: usize) {}
}

/// What serving a fault did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Served {
    /// The address belongs to no live region: waiters woken. A thread that keeps faulting there
    /// touches memory no entry owns (a use after release).
    Unowned,
    /// Another fill owns the chunk (see `Path::busy`).
    Busy,
    /// Every page of the chunk was already present: waiters woken.
    Present,
    /// The chunk was regenerated; this many pages installed.
    Filled(usize),
    /// The callback failed; the missing pages were zero-filled or poisoned.
    Failed,
    /// The callback failed under the poison policy in SIGBUS mode: the pages were left missing
    /// and the faulting access must raise SIGBUS. A poisoned page cannot be told from a missing
    /// one in the handler (both fault with `BUS_ADRERR` where the kernel lacks
    /// CONFIG_MEMORY_FAILURE), so nothing is poisoned in that mode.
    Raise,
}

/// The start and length of the chunk holding `addr`, if `addr` is in a live region of `arena`.
/// Takes no lock and does not allocate (the SIGBUS handler uses it).
pub(crate) fn chunk_of(arena: &Arena, addr: usize) -> Option<(usize, usize)> {
    let page = addr & !(PAGE - 1);
    let guard = arena.slot(page).and_then(|s| hazards().protect(s))?;
    let r: &Region = guard.get();
    Some(r.chunk_span(r.chunk_of_addr(page)))
}

/// Serves a fault at `addr` in `arena`, whose slabs are registered with `uffd`.
pub(crate) fn serve(
    arena: &Arena,
    uffd: &Uffd,
    addr: usize,
    scratch: &mut Scratch,
    path: &impl Path,
) -> Served {
    let page = addr & !(PAGE - 1);
    let Some(r) = arena.slot(page).and_then(RegionRef::from_slot) else {
        uffd.wake(page, PAGE);
        return Served::Unowned;
    };
    r.counters().faults.fetch_add(1, Ordering::Relaxed);
    let c = r.chunk_of_addr(page);
    let (start, bytes) = r.chunk_span(c);
    let was_failed = loop {
        match r.chunks().try_claim(c) {
            Claim::Owned { failed } => break failed,
            // Released meanwhile: claim it again.
            Claim::Busy if !r.chunks().note_waiter(c) => continue,
            Claim::Busy => {
                path.busy(&r, c);
                return Served::Busy;
            }
        }
    };
    hook::step(Step::FillClaimed, start);
    let f = fill_chunk(uffd, &r, c, was_failed, scratch, Filler::Fault, |failure| {
        path.keep_failure(&r, failure)
    });
    let served = match f.failed {
        false if f.installed == 0 => Served::Present,
        false => Served::Filled(f.installed),
        true if f.raise => Served::Raise,
        true => Served::Failed,
    };
    // Release before waking: a monitor worker that found the chunk busy and dropped its fault
    // message relies on this wake coming after (see `chunk.rs`). The faulting thread itself
    // waits for it, so it is made whether or not a waiter was noted.
    let _ = r.chunks().release(c, f.outcome);
    let filled = matches!(served, Served::Filled(_));
    if filled && path.fills_ahead() {
        let window = r.ahead_of(c);
        if window > 0 {
            let ticket = path.wake_later(start, bytes);
            fill_ahead(arena, uffd, &r, c, window, scratch, path);
            path.woken(ticket);
        }
    }
    // (The faulting thread finds its pages lazily freed already: each advice of a fill drains
    // its CPU's batches at once, `readvise::readvise`; tests/readvise.rs.)
    uffd.wake(start, bytes);
    drop(r);
    // After the wake: a full queue makes this advise an older chunk now (a system call, maybe
    // on another CPU), which the faulting thread need not wait for.
    if filled {
        readvise::later(arena, start, f.cpus);
    }
    served
}

/// After a fault on chunk `c` was served, before its thread is woken: fills the `window` chunks
/// that follow (the faults on `r` are sequential: `Region::ahead_of`), each released and woken
/// as it is done. Stops at the first chunk another fill owns or whose last fill failed (left to
/// its own fault or a pin); a chunk whose callback fails here stays missing. The fault's thread
/// is woken by the path after a short bound if this takes longer (`Path::wake_later`), so a
/// slow or stuck callback ahead holds it up for that bound at most.
///
/// Before the wake, not after: a woken sequential reader reaches the next chunk while it is
/// being filled and faults on it (a fault that costs the reader, a worker and a wake-up each
/// time), so it would follow the fills in lock-step. Measured on the bulk-rebuild bench (1 MiB
/// read front to back, 64 KiB chunks, ÷ writing fresh memory, interleaved medians of one run):
/// filling ahead after the wake 1.91 (10.6 faults a rebuild) against 1.87 without filling ahead
/// (16 faults); before the wake 1.32 (5 faults) against 2.21. The cost: the first fault of a
/// sequential run waits for the chunks filled ahead too (up to `Config::read_ahead`).
fn fill_ahead(
    arena: &Arena,
    uffd: &Uffd,
    r: &Region,
    c: usize,
    window: usize,
    scratch: &mut Scratch,
    path: &impl Path,
) {
    for next in c + 1..=c + window {
        let (start, bytes) = r.chunk_span(next);
        match r.chunks().try_claim(next) {
            Claim::Owned { failed: false } => {}
            Claim::Owned { failed: true } => {
                if r.chunks().release(next, crate::chunk::Outcome::Unchanged) {
                    uffd.wake(start, bytes);
                }
                return;
            }
            Claim::Busy => return,
        }
        path.filling_ahead(start);
        // (A failure ahead changes nothing and is not kept: `fill_chunk` does not call `keep`.)
        let f = fill_chunk(uffd, r, next, false, scratch, Filler::Ahead, |_| {});
        r.counters()
            .pages_read_ahead
            .fetch_add(f.installed as u64, Ordering::Relaxed);
        // A thread that faulted here meanwhile has its message read by a worker, which noted
        // itself waiting (then this wakes it) or claims the chunk after this release.
        if r.chunks().release(next, f.outcome) {
            uffd.wake(start, bytes);
        }
        if f.installed > 0 {
            readvise::later(arena, start, f.cpus);
        }
    }
}
