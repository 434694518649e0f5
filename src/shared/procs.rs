//! Process slots: which processes have the cache open, whether each is still alive, and clearing
//! after one that died.
//!
//! ## States of a slot (`Proc::pid`)
//! - **free** (0) → **owned** (pid): a process opening the cache claims it with a CAS, then
//!   stores its start time (0 meanwhile: "not known yet", the pid alone decides).
//! - **owned** → **free**: the owner closes the cache, after clearing its pins.
//! - **owned** by a dead process → **reaping** (`REAPING` | the reaper's slot): one live process
//!   wins the CAS and clears what the dead one held (its pin bits, chunks it was filling or
//!   punching, a record it was making, the purge lock), then frees the slot. A reaper that dies
//!   in turn is itself dead, so its claim is taken over the same way.
//!
//! A slot is freed only after everything naming it is cleared, and its generation is bumped as
//! it is freed, so a mark in a state word (slot and generation) names one process only: a check
//! that finds its writer dead and then acts on the word (a CAS from that very mark) can never
//! hit a mark of the slot's next owner. A pin bit names the slot only; bits are cleared before
//! the slot is freed.

use std::sync::atomic::Ordering;

use super::file::{File, CLAIMED, EMPTY, MAX_PROCS, REAPING};
use super::state;
use crate::error::Error;
use crate::sys::shm;

/// The mark of the process in slot `s` (state words carry it): the slot and its generation.
pub fn mark_of(f: &File, s: usize) -> u32 {
    s as u32 | (f.header().procs[s].gen.load(Ordering::Acquire) & 0xff) << 8
}

/// Whether the process that wrote `mark` is alive: its slot still has that generation and its
/// process lives. A mark from an earlier owner of the slot is dead.
pub fn alive_mark(f: &File, mark: u32) -> bool {
    let s = (mark & 0xff) as usize;
    s < MAX_PROCS && mark_of(f, s) == mark && alive(f, s)
}

/// Whether the process in slot `s` is alive (false for a free or reaping slot).
pub fn alive(f: &File, s: usize) -> bool {
    let p = &f.header().procs[s];
    let pid = p.pid.load(Ordering::Acquire);
    if pid == 0 || pid & REAPING != 0 {
        return false;
    }
    shm::alive(pid, p.start.load(Ordering::Acquire))
}

/// Claims a free slot for this process, reaping dead processes' slots if none is free.
/// Returns the slot and this process's mark.
pub fn claim(f: &File) -> Result<(usize, u32), Error> {
    let me = std::process::id();
    let start = shm::start_time(me).unwrap_or(0);
    for round in 0..2 {
        for (s, p) in f.header().procs.iter().enumerate() {
            if p.pid
                .compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                p.start.store(start, Ordering::Release);
                return Ok((s, mark_of(f, s)));
            }
        }
        if round == 0 {
            reap_all(f, None);
        }
    }
    Err(Error::SharedTooManyProcesses(MAX_PROCS))
}

/// Frees this process's slot `s` on close: its pins are dropped first.
pub fn release(f: &File, s: usize) {
    clear_marks(f, s);
    let p = &f.header().procs[s];
    p.gen.fetch_add(1, Ordering::AcqRel);
    p.pid.store(0, Ordering::Release);
}

/// Reaps every slot whose process died. `me` is the caller's slot, if it has one.
pub fn reap_all(f: &File, me: Option<usize>) {
    for s in 0..MAX_PROCS {
        reap(f, s, me);
    }
}

/// Clears slot `s` if its process died (or its reaper did). Returns whether it did.
pub fn reap(f: &File, s: usize, me: Option<usize>) -> bool {
    let p = &f.header().procs[s];
    let pid = p.pid.load(Ordering::Acquire);
    if pid == 0 || Some(s) == me {
        return false;
    }
    let dead = if pid & REAPING != 0 {
        // Being reaped: only if that reaper died too (the mark names its pid: a process
        // without a slot of its own reaps too, when it opens a cache whose slots are all
        // taken).
        !shm::alive(pid & !REAPING, 0)
    } else {
        !shm::alive(pid, p.start.load(Ordering::Acquire))
    };
    if !dead {
        return false;
    }
    let mark = REAPING | crate::sys::os::pid();
    if p.pid
        .compare_exchange(pid, mark, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return false;
    }
    clear_marks(f, s);
    p.start.store(0, Ordering::Release);
    p.gen.fetch_add(1, Ordering::AcqRel);
    p.pid.store(0, Ordering::Release);
    true
}

/// Clears everything that names slot `s` (its current mark: the generation changes only when
/// the slot is freed, after this): pin bits, chunks it fills or punches, a record it makes, the
/// purge lock.
fn clear_marks(f: &File, s: usize) {
    let bit = 1u64 << s;
    let mark = mark_of(f, s);
    for i in 0..f.slots {
        let r = f.record(i);
        if r.pins.load(Ordering::Relaxed) & bit != 0 {
            r.pins.fetch_and(!bit, Ordering::SeqCst);
        }
        let st = r.state.load(Ordering::Acquire);
        if st == CLAIMED | mark
            && r.state
                .compare_exchange(st, EMPTY, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // A record half made: its span is lost (spans are never reused), the slot is free.
            crate::sys::shm::futex_wake(&r.state);
        }
    }
    for c in 0..f.chunks() {
        abandon(f, c, mark);
    }
    let _ = f
        .header()
        .purger
        .compare_exchange(mark + 1, 0, Ordering::AcqRel, Ordering::Acquire);
}

/// Ends what the process with mark `s` (dead) was doing to chunk `c` (`state::abandon`),
/// counting a present chunk it was punching out, and wakes the waiters. Returns whether it did.
pub fn abandon(f: &File, c: usize, s: u32) -> bool {
    let w = &f.chunk_word(c).state;
    let Some(st) = state::abandon(w, s) else {
        return false;
    };
    if st & state::PUNCHING != 0 && st & state::FAIL == 0 {
        // It was present when the punch began; the dead purger had not counted it out yet.
        f.header().present.fetch_sub(1, Ordering::AcqRel);
    }
    shm::futex_wake(w);
    true
}
