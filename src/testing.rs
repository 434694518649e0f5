//! Helpers for testing code that uses lazyfree, against the kernel's real reclaim.

use crate::cache::Entry;
use crate::sys::mem::{self, UncheckedAdvice, PAGE};

pub use crate::hook::{set_step_hook, Step};

pub use crate::fault::PinSweep;

/// Forces how every pin from now on makes its entry's pages written after rebuilding the
/// missing ones (process-wide), or with `None` goes back to the default (see [`PinSweep`]). For
/// benches comparing the two in one run.
pub fn set_pin_sweep(sweep: Option<PinSweep>) {
    crate::fault::set_pin_sweep(sweep);
}

/// Whether the monitor mode's runtime (its thread and worker pool) is running now: for tests of
/// the shutdown path (the last cache, arena and entry of the mode gone: no thread left).
pub fn monitor_running() -> bool {
    crate::mode::monitor_running()
}

/// Times the monitor's watcher stood in for its reader (read the userfaultfd while the reader
/// ran a callback longer than about 100 µs), since the process started: for tests that mean to
/// exercise that path.
pub fn monitor_stand_ins() -> u64 {
    crate::mode::monitor_stand_ins()
}

/// Drains the per-CPU LRU batches of every CPU this thread may run on, so that MADV_FREE'd
/// pages sitting in them reach the LRU lists: an madvise made from each CPU (an madvise drains
/// the batches of the CPU it runs on). Not `/proc/sys/vm/compact_memory`, which drains every
/// CPU's but takes pages of the whole machine off the LRU lists to move them: an advice that
/// comes meanwhile (another test's, another program's) skips them, and they stay unreclaimable
/// until the next.
pub fn drain_lru_batches() {
    let Ok(page) = mem::map_anon(PAGE) else {
        return;
    };
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as usize;
    for cpu in 0..cpus {
        // (A CPU this thread may not run on is skipped: on_cpu returns false.)
        crate::sys::os::on_cpu(cpu, || {
            // SAFETY: the page is ours and was never written: there is nothing to lose.
            let _ = unsafe { mem::advise_unchecked(page as usize, PAGE, UncheckedAdvice::Free) };
        });
    }
    // SAFETY: mapped above; nothing refers to it.
    unsafe { mem::unmap(page, PAGE) };
}

/// Pushes the pages of `[base, base + pages*PAGE)` through reclaim; returns the pages dropped.
/// First ends every unpin delay of the monitor mode (`Config::unpin_delay`): the helpers stand
/// for the kernel reclaiming *later*, once an entry unpinned just now is volatile.
pub(crate) fn reclaim_range(base: usize, pages: usize, drain: bool) -> usize {
    crate::mode::end_lingering_now();
    if drain {
        drain_lru_batches();
    }
    let before = mem::resident_pages(base, pages);
    let mut last = before;
    for _ in 0..4 {
        // SAFETY: MADV_PAGEOUT only drops pages that are lazily freed (clean, volatile); pinned
        // (dirty) pages stay, as there is no swap to write them to (or, with swap, are swapped).
        let _ = unsafe { mem::advise_unchecked(base, pages * PAGE, UncheckedAdvice::PageOut) };
        let now = mem::resident_pages(base, pages);
        if now == 0 || now == last {
            last = now;
            break;
        }
        last = now;
    }
    // Concurrent readers may rebuild pages meanwhile: never report a negative count.
    before.saturating_sub(last)
}

/// Pushes an entry's volatile pages through the kernel's real reclaim path (MADV_PAGEOUT, after
/// draining per-CPU batches) and returns how many pages were dropped. Pinned pages stay.
/// Entries unpinned within their [`unpin_delay`](crate::Config::unpin_delay) are made volatile
/// first, as if the delay were over.
///
/// The next touch of a dropped page calls the regenerate callback, as it would after memory
/// pressure: use it to test your callbacks.
pub fn reclaim(entry: &Entry) -> usize {
    let r = entry.region();
    reclaim_range(r.base(), r.pages(), true)
}

/// Like [`reclaim`] for many entries, draining per-CPU batches once.
pub fn reclaim_all<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> usize {
    drain_lru_batches();
    entries
        .into_iter()
        .map(|e| {
            let r = e.region();
            reclaim_range(r.base(), r.pages(), false)
        })
        .sum()
}

/// Pushes the pages holding `[ptr, ptr + len)` through the kernel's real reclaim path, like
/// [`reclaim`], and returns how many pages were dropped: for
/// [`VolatileArena`](crate::VolatileArena) allocations and [`VolatileBox`](crate::VolatileBox)es
/// (pass the length in bytes). Only volatile, unpinned pages are dropped; ordinary memory keeps
/// its contents (without swap it stays, with swap it is swapped out and back in on touch), so any
/// pointer is safe to pass.
pub fn reclaim_ptr<T>(ptr: *const T, len: usize) -> usize {
    let start = ptr as usize & !(PAGE - 1);
    let Some(end) = (ptr as usize).checked_add(len) else {
        return 0;
    };
    reclaim_range(start, (end - start).div_ceil(PAGE), true)
}
