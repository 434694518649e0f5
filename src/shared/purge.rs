//! Purging: shared memory has no `MADV_FREE`, so the cache gives memory back itself, punching
//! holes in the file (`fallocate(FALLOC_FL_PUNCH_HOLE)`) over unpinned chunks, least recently
//! used entries first.
//!
//! ## One purger at a time
//! `Header::purger` holds 1 + the slot of the purging process (a CAS from 0). A process that
//! finds it held by a dead one takes it over. Others skip purging meanwhile: it is under way.
//!
//! ## A punch never meets a pin
//! The purger moves the chunk present → punching (a CAS), *then* reads the entry's pin bits; a
//! pinning process sets its bit, *then* reads the chunk states (all sequentially consistent). So
//! either the purger sees the bit and puts the chunk back, or the pinner sees the punch and waits
//! for it to end before touching the pages, which rebuilds them. A punch racing a plain reader
//! or a fault is harmless: the page is there (right bytes) or missing (rebuilt on touch).

use std::sync::atomic::Ordering;

use super::file::{File, MAX_PROCS, READY};
use super::procs;
use super::serve::Core;
use super::state::{self, PRESENT};
use crate::hook::{self, Step};
use crate::sys::shm;

/// Whether a live process pins record `i`.
fn pinned(f: &File, i: usize) -> bool {
    state::pins_held(&f.record(i).pins, MAX_PROCS, |s| procs::alive(f, s))
}

/// Punches chunk `c` of record `i` if it is present and the entry is not pinned. `force`: punch
/// a failed chunk, pinned or not (a pinning process retrying the callback).
/// Returns whether it punched.
pub fn punch_chunk(core: &Core, i: usize, c: usize, force: bool) -> bool {
    let f = &core.file;
    let w = &f.chunk_word(c).state;
    let st = w.load(Ordering::Acquire);
    if st != state::PRESENT && !(force && st == state::FAILED) {
        return false;
    }
    let pinned = || {
        hook::step(Step::SharedPunchClaimed, f.chunk_addr(c));
        pinned(f, i)
    };
    let Some(prior) = state::begin_punch(w, core.mark, force, pinned) else {
        shm::futex_wake(w);
        return false;
    };
    let punched = shm::punch(&f.fd, f.data_off + c * f.chunk, f.chunk).is_ok();
    let h = f.header();
    state::end_punch(w, core.mark, prior, punched);
    if punched {
        if prior == PRESENT {
            h.present.fetch_sub(1, Ordering::AcqRel);
        }
        h.purged.fetch_add(1, Ordering::Relaxed);
    }
    shm::futex_wake(w);
    punched
}

/// Takes the purge lock; false if a live process holds it.
fn lock(core: &Core) -> bool {
    let p = &core.file.header().purger;
    let mine = core.mark + 1;
    loop {
        match p.compare_exchange(0, mine, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return true,
            Err(held) => {
                let s = held - 1;
                if s == core.mark || procs::alive_mark(&core.file, s) {
                    return false;
                }
                if p.compare_exchange(held, mine, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return true;
                }
            }
        }
    }
}

/// If the present bytes exceed `target`, purges unpinned chunks, least recently used entries
/// first, until they do not (or nothing unpinned is left). Returns the chunks punched; 0 also
/// when another process is purging.
pub fn purge_to(core: &Core, target: usize) -> usize {
    let f = &core.file;
    let h = f.header();
    let over = || h.present.load(Ordering::Acquire) as usize * f.chunk > target;
    if !over() || !lock(core) {
        return 0;
    }
    h.purges.fetch_add(1, Ordering::Relaxed);
    let mut order: Vec<(u64, usize)> = (0..f.slots)
        .filter(|&i| f.record(i).state.load(Ordering::Acquire) == READY)
        .map(|i| (f.record(i).used.load(Ordering::Relaxed), i))
        .collect();
    order.sort_unstable();
    let mut punched = 0;
    'entries: for (_, i) in order {
        if pinned(f, i) {
            continue;
        }
        let r = f.record(i);
        let first = r.offset.load(Ordering::Relaxed) as usize / f.chunk;
        let n = (r.len.load(Ordering::Relaxed) as usize).div_ceil(f.chunk);
        for c in first..first + n {
            if !over() {
                break 'entries;
            }
            if punch_chunk(core, i, c, false) {
                punched += 1;
            }
        }
    }
    h.purger.store(0, Ordering::Release);
    punched
}

/// Purges down to 7/8 of the budget when the present bytes exceed it.
pub fn if_over_budget(core: &Core) -> usize {
    let budget = core.file.header().budget.load(Ordering::Relaxed) as usize;
    if core.file.header().present.load(Ordering::Acquire) as usize * core.file.chunk <= budget {
        return 0;
    }
    purge_to(core, budget / 8 * 7)
}

/// Frees at least one chunk if an unpinned present one exists (`Core::make_room`).
pub fn make_room(core: &Core) -> usize {
    let present = core.file.header().present.load(Ordering::Acquire) as usize;
    purge_to(core, present.saturating_sub(1) * core.file.chunk)
}
