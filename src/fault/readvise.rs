//! Making installed pages volatile again (MADV_FREE), reliably.
//!
//! MADV_FREE skips pages that are not on an LRU list at that moment, and without swap a skipped
//! page is never reclaimable: the cache would leak exactly under the pressure it exists for.
//! Two causes, two remedies:
//! - pages just installed sit in the per-CPU batch of the CPU that installed them, and MADV_FREE
//!   drains only the batch of the CPU it runs on: the advice is given again from each CPU the
//!   pages were installed on (`Cpus`), if the thread is elsewhere by then;
//! - a kernel memory scanner (reclaim, DAMON's pageout scheme, compaction) may have the pages
//!   isolated for a moment, and puts them back through the batch of the CPU it runs on: every
//!   filled chunk is queued and advised once more `READVISE_AFTER_NS` later (by the monitor's
//!   reader between polls; in SIGBUS mode, which has no thread, by later faults, pins and
//!   unpins), and a region an unpin made volatile twice more (`LAST`), from every CPU.
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
        // The marks wait in this CPU's lazyfree batch until it is drained, and a page reclaim
        // has off the LRU lists when it is drained stays unmarked: drained at once, so that the
        // window is the advice's own.
        drain_this_cpu();
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

/// A page never written, for `drain_this_cpu` (0: not mapped yet).
static DRAIN_PAGE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The number of CPUs the machine has (configured), for `on_every_cpu`; read once by
/// `prepare_drain` (0 before: then only the calling CPU is used).
static CPUS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Maps the page `drain_this_cpu` advises and counts the CPUs, once (outside signal handlers:
/// every runtime calls it when it starts).
pub(crate) fn prepare_drain() {
    use std::sync::atomic::Ordering;
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    CPUS.store(cpus.clamp(1, 1024) as usize, Ordering::Relaxed);
    if DRAIN_PAGE.load(Ordering::Acquire) != 0 {
        return;
    }
    if let Ok(p) = mem::map_anon(PAGE) {
        if DRAIN_PAGE
            .compare_exchange(0, p as usize, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // SAFETY: our own fresh mapping, which lost the race: nothing refers to it.
            unsafe { mem::unmap(p, PAGE) };
        }
    }
}

/// Empties this CPU's per-CPU LRU batches, so that the pages this CPU advised or installed last
/// are on the LRU lists as they should be. A `MADV_FREE` drains the calling CPU's batches
/// *before* it marks its pages, and the marks themselves go through a per-CPU batch: without
/// another drain the last pages advised (up to a batch of them) are not lazily freed yet, and
/// a reclaim from another CPU cannot take them. Any `MADV_FREE` drains, so one on a page that
/// was never written (no page table entry to change, no TLB flush) does it for one cheap system
/// call. Also makes pages a pin rebuilt on this CPU reachable by a later unpin's advice from
/// another CPU (explicit mode). No allocation, no lock (the SIGBUS handler calls it).
pub(crate) fn drain_this_cpu() {
    let page = DRAIN_PAGE.load(std::sync::atomic::Ordering::Acquire);
    if page != 0 {
        // SAFETY: the page is ours and never written: there is nothing to lose.
        let _ = unsafe { mem::advise_unchecked(page, PAGE, UncheckedAdvice::Free) };
    }
}

/// A last unpin's work where a fault rebuilds lost pages (monitor and SIGBUS modes): the whole
/// span advised MADV_FREE, and queued to be advised once more (`later_region`). Called under
/// the region's pin lock with its gate just opened.
pub(crate) fn unpinned(arena: &Arena, r: &Region) {
    // SAFETY: unpinned bytes are volatile by contract: lost pages are regenerated.
    let _ = unsafe { mem::advise_unchecked(r.base(), r.pages() * PAGE, UncheckedAdvice::Free) };
    drain_this_cpu();
    later_region(arena, r, Cpus::UNKNOWN);
}

/// The ends of lingering found by one round of the monitor's reader (or forced by
/// `testing::reclaim`), given as the regions' bases (see `Region::check_linger`, which opened
/// their gates): each span advised MADV_FREE through its gate from every CPU in turn, each CPU
/// visited once for all of them, then queued for its two later advices. Every CPU, not only
/// those of the pin and the unpin: a pin's thread may move while it makes the pages resident,
/// and the pages then wait in the per-CPU batch of a CPU neither recorded, where an advice
/// from elsewhere skips them. (Pages off the LRU lists for another reason at that moment are
/// still missed, and caught by the later advices: docs/bench-notes.md.) Moves the calling thread: lazyfree's own threads, and
/// the thread calling `testing::reclaim` (a test's).
pub(crate) fn lingers_ended(arena: &Arena, bases: &[usize]) {
    if bases.is_empty() {
        return;
    }
    on_every_cpu(|| {
        for &base in bases {
            region(arena, base);
        }
    });
    for &base in bases {
        queue(arena, base | WHOLE_REGION, Cpus::UNKNOWN);
    }
}

/// How long after a fill its chunk is advised MADV_FREE once more.
pub(crate) const READVISE_AFTER_NS: u64 = 50_000_000;

/// Marks a queue item that stands for a whole region (the base of a region's span; chunk
/// starts and bases are page-aligned, so the low bits are free).
const WHOLE_REGION: usize = 1;
/// Marks a region's last advice. A region gets two more after its unpin: 50 ms and then
/// `LAST_AFTER_NS` later, since reclaim scanning the region for a while (under pressure, which
/// takes pages off the LRU lists as it goes) can make one advice miss pages.
const LAST: usize = 2;
/// How long after its second advice a region gets its last.
const LAST_AFTER_NS: u64 = 500_000_000;

/// Queues the chunk at `start` (installed on `cpus`) to be advised once more when due. When
/// the queue is full the oldest item is advised now to make room. No allocation.
pub(crate) fn later(arena: &Arena, start: usize, cpus: Cpus) {
    queue(arena, start, cpus);
}

/// Queues a region made volatile by an unpin (its whole span advised just now) to be advised
/// twice more (see `LAST`): a page a kernel scanner had off the LRU at that advice would
/// otherwise stay unreclaimable until the next unpin.
pub(crate) fn later_region(arena: &Arena, r: &Region, cpus: Cpus) {
    queue(arena, r.base() | WHOLE_REGION, cpus);
}

fn queue(arena: &Arena, what: usize, cpus: Cpus) {
    queue_at(arena, what, os::now_ns() + READVISE_AFTER_NS, cpus);
}

fn queue_at(arena: &Arena, what: usize, when: u64, cpus: Cpus) {
    let mut item = (what, when, cpus.0);
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

/// How many due region items one pass gathers before advising them from every CPU.
const REGIONS_PER_PASS: usize = 16;

/// Which thread runs a readvise pass (`due`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Runner {
    /// A thread of lazyfree's (the monitor's reader, or the watcher standing in for it): it
    /// advises due regions from every CPU in turn.
    Ours,
    /// A program's thread (a pin, an unpin, a SIGBUS handler): it advises due items from its
    /// own CPU and the CPUs recorded with them (a chunk's installing CPUs), never moving to
    /// every CPU (that would cost a pin one move per CPU of the machine).
    Program,
}

/// Advises again the queued chunks (and regions) that are due, at most `max` of them. Returns
/// whether items remain queued.
///
/// Run by lazyfree's own thread, due region items (`WHOLE_REGION`) are gathered and advised
/// from every CPU in turn, each CPU visited once for all of them (`advise_regions`): a region's
/// pages may sit in the per-CPU batch of any CPU by then (reclaim that scanned them, or a
/// thread that touched them, puts them back through its own CPU's batch), and a page in a
/// batch that is never drained by an advice stays unreclaimable until the next unpin.
pub(crate) fn due(arena: &Arena, max: usize, runner: Runner) -> bool {
    if arena.readvise.is_empty() || arena.forked() {
        return false;
    }
    let now = os::now_ns();
    let mut regions = [0usize; REGIONS_PER_PASS];
    let mut n = 0;
    // Each queued item is looked at once at most (a lone item not yet due is not popped and
    // pushed back `max` times).
    for _ in 0..max.min(arena.readvise.len()) {
        let Some((start, when, cpus)) = arena.readvise.pop() else {
            break;
        };
        if when > now {
            // Not yet: to the back of the queue. Items of different delays are queued (a
            // region's last advice comes later than a chunk's second), so the queue is not in
            // due order: go on looking instead of stopping here.
            if arena.readvise.push((start, when, cpus)).is_err() {
                chunk(arena, start, Cpus(cpus));
            }
            continue;
        }
        if start & WHOLE_REGION == 0 || runner == Runner::Program {
            chunk(arena, start, Cpus(cpus));
            if start & (WHOLE_REGION | LAST) == WHOLE_REGION {
                queue_at(
                    arena,
                    start | LAST,
                    os::now_ns() + LAST_AFTER_NS,
                    Cpus(cpus),
                );
            }
            continue;
        }
        regions[n] = start;
        n += 1;
        if n == REGIONS_PER_PASS {
            advise_regions(arena, &regions);
            n = 0;
        }
    }
    advise_regions(arena, &regions[..n]);
    !arena.readvise.is_empty()
}

/// Advises each region item in `items` from every CPU (see `due`), and queues the last advice
/// of those that were not their last.
fn advise_regions(arena: &Arena, items: &[usize]) {
    if items.is_empty() {
        return;
    }
    on_every_cpu(|| {
        for &item in items {
            region(arena, item);
        }
    });
    for &item in items.iter().filter(|&&i| i & LAST == 0) {
        queue_at(
            arena,
            item | LAST,
            os::now_ns() + LAST_AFTER_NS,
            Cpus::UNKNOWN,
        );
    }
}

/// Runs `f` on this CPU, then on each other CPU the thread may run on (moved there for it). No
/// allocation.
fn on_every_cpu(f: impl Fn()) {
    f();
    let here = Cpus::now() as usize;
    for c in 0..CPUS.load(std::sync::atomic::Ordering::Relaxed) {
        if c != here {
            os::on_cpu(c, &f);
        }
    }
}

/// Advises the span of the region that starts at the item's address, if one does, MADV_FREE
/// through its gate (like the unpin's advice), from this CPU.
fn region(arena: &Arena, item: usize) {
    let start = item & !(WHOLE_REGION | LAST);
    let Some(r) = arena.slot(start).and_then(RegionRef::from_slot) else {
        return;
    };
    if r.base() == start {
        readvise(r.gate(), start, r.pages() * PAGE, Cpus::UNKNOWN);
    }
}

/// Advises the chunk at `start` MADV_FREE again, if a live region holds it and no fill owns it
/// and it is not failed (the gate keeps pinned regions out). The region may have been removed
/// and its span reused since the chunk was queued: whatever unpinned region holds it now, its
/// present pages are volatile by contract. A `WHOLE_REGION` item advises its region, from this
/// CPU and `cpus`.
fn chunk(arena: &Arena, item: usize, cpus: Cpus) {
    if item & WHOLE_REGION != 0 {
        let start = item & !(WHOLE_REGION | LAST);
        if let Some(r) = arena.slot(start).and_then(RegionRef::from_slot) {
            if r.base() == start {
                readvise(r.gate(), start, r.pages() * PAGE, cpus);
            }
        }
        return;
    }
    let start = item;
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
