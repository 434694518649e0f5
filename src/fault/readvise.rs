//! Making installed pages volatile again (MADV_FREE), reliably.
//!
//! MADV_FREE skips pages that are not on an LRU list at that moment, and without swap a skipped
//! page is never reclaimable: the cache would leak exactly under the pressure it exists for.
//! Two causes, two remedies:
//! - pages just installed sit in the per-CPU batch of the CPU that installed them, and MADV_FREE
//!   drains only the batch of the CPU it runs on: the advice is given again from each CPU the
//!   pages were installed on (`Cpus`), if the thread is elsewhere by then;
//! - a kernel memory scanner (DAMON's pageout scheme, compaction) may have the pages isolated
//!   for a moment: every filled chunk is queued and advised once more `READVISE_AFTER_NS` later
//!   (by the monitor's reader between polls; in SIGBUS mode, which has no thread, by later
//!   faults, pins and unpins).
//!
//! Every advice goes through the region's pin gate (`chunk.rs`), so none reaches a pinned page.

use crate::arena::Arena;
use crate::chunk::PinGate;
use crate::region::{Region, RegionRef};
use crate::sys::mem::{self, UncheckedAdvice, PAGE};
use crate::sys::os;

/// The CPUs a thread ran on when it installed pages: before and after the copy (`u16::MAX`:
/// unknown).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Cpus(pub [u16; 2]);

impl Cpus {
    fn now() -> u16 {
        os::cpu().map_or(u16::MAX, |c| c.min(u16::MAX as usize - 1) as u16)
    }

    /// Call before an install, and `end` after it.
    pub(crate) fn start() -> Cpus {
        let c = Self::now();
        Cpus([c, c])
    }

    pub(crate) fn end(self) -> Cpus {
        Cpus([self.0[0], Self::now()])
    }

    pub(crate) const UNKNOWN: Cpus = Cpus([u16::MAX, u16::MAX]);
}

/// Advises `[dst, dst + len)` MADV_FREE through the pin gate (nothing if a pin closed it), from
/// this CPU and from each CPU in `cpus` the thread is not on now (it moves there for the call,
/// which drains that CPU's batch first).
pub(crate) fn readvise(gate: &PinGate, dst: usize, len: usize, cpus: Cpus) {
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

/// A last unpin's work where a fault rebuilds lost pages (monitor and SIGBUS modes): the whole
/// span advised MADV_FREE. Called under the region's pin lock with its gate just opened.
pub(crate) fn unpinned(r: &Region, _marks: &mut Vec<u64>) {
    // SAFETY: unpinned bytes are volatile by contract: lost pages are regenerated.
    let _ = unsafe { mem::advise_unchecked(r.base(), r.pages() * PAGE, UncheckedAdvice::Free) };
}

/// The end of a region's lingering after its last unpin (see `Region::check_linger`): the whole
/// span advised MADV_FREE through the gate, also from the CPUs of the pin and the unpin.
pub(crate) fn linger_ended(r: &Region, cpus: [u16; 2]) {
    readvise(r.gate(), r.base(), r.pages() * PAGE, Cpus(cpus));
}

/// How long after a fill its chunk is advised MADV_FREE once more.
pub(crate) const READVISE_AFTER_NS: u64 = 50_000_000;

/// Queues the chunk at `start` (installed on `cpus`) to be advised once more when due. When
/// the queue is full the oldest chunk is advised now to make room. No allocation.
pub(crate) fn later(arena: &Arena, start: usize, cpus: Cpus) {
    let mut item = (start, os::now_ns() + READVISE_AFTER_NS, cpus.0);
    for _ in 0..4 {
        match arena.readvise.push(item) {
            Ok(()) => return,
            Err(back) => {
                item = back;
                if let Some((old, _, cpus)) = arena.readvise.pop() {
                    chunk(arena, old, Cpus(cpus));
                }
            }
        }
    }
}

/// Advises again the queued chunks that are due, at most `max` of them. Returns whether chunks
/// remain queued.
pub(crate) fn due(arena: &Arena, max: usize) -> bool {
    if arena.readvise.is_empty() || arena.forked() {
        return false;
    }
    let now = os::now_ns();
    for _ in 0..max {
        let Some((start, when, cpus)) = arena.readvise.pop() else {
            return false;
        };
        if when > now {
            // Not yet (the queue is roughly in due order): put it back and stop.
            if arena.readvise.push((start, when, cpus)).is_err() {
                chunk(arena, start, Cpus(cpus));
            }
            return true;
        }
        chunk(arena, start, Cpus(cpus));
    }
    !arena.readvise.is_empty()
}

/// Advises the chunk at `start` MADV_FREE again, if a live region holds it and no fill owns it
/// and it is not failed (the gate keeps pinned regions out). The region may have been removed
/// and its span reused since the chunk was queued: whatever unpinned region holds it now, its
/// present pages are volatile by contract.
fn chunk(arena: &Arena, start: usize, cpus: Cpus) {
    let Some(r) = arena.slot(start).and_then(RegionRef::from_slot) else {
        return;
    };
    let c = r.chunk_of_addr(start);
    if r.chunks().is_filling(c) || r.chunks().is_failed(c) {
        return;
    }
    let (s, len) = r.chunk_span(c);
    readvise(r.gate(), s, len, cpus);
}
