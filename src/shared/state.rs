//! A shared chunk's state word, the one truth about its pages that every process reads.
//!
//! ## States
//! - **absent** (`ABSENT`): its pages are missing (never filled, or punched), or some are left
//!   from a fill whose process died; a touch must rebuild it.
//! - **filling** (`FILLING | s`): the process whose mark (its slot and the slot's
//!   generation) is `s` runs the callback and installs the pages. Nobody else rebuilds it
//!   meanwhile: a fault elsewhere waits, so each chunk is decoded once across all processes.
//! - **failing** (`FILLING | FAIL | s`): the callback failed; `s` installs zero pages over the
//!   missing ones. The mark comes first, so zeros are never read while the chunk looks right.
//! - **present** (`PRESENT`): every page is in the file. A fault on it (raised before the fill
//!   ended) only needs a wake.
//! - **failed** (`FAILED`): zeros stand for its bytes; readers that check (`read`, `pin`) get
//!   the error. A fault installs zeros over any page still missing.
//! - **punching** (`PUNCHING | s`, with `FAIL` if it was failed): the process with mark `s`
//!   punches its pages out of the file.
//!
//! ## Transitions
//! - absent → filling (CAS by the process that serves the fault) → present, or → failing →
//!   failed;
//! - failed → failing (CAS by a process that installs zeros over missing pages of it, faulted
//!   after the failure) → failed;
//! - present → punching (CAS by the purging process, which then checks the entry's pins and
//!   goes back if one appeared) → absent;
//! - a pinning process turns failed → punching → absent itself, to retry the callback (purges
//!   leave failed chunks alone, so zeros read from one stay marked until a pin retries it);
//! - filling, failing or punching by a dead process → absent (failed if `FAIL`): any process
//!   that finds it so does this (`abandon`). Pages a dead filler installed are right, and the
//!   next fill installs only the missing ones.

//!
//! The functions here are the protocol itself, on bare atomics (`crate::sync`), so that
//! `tests/loom.rs` runs them under every interleaving; the callers add the file, the futex
//! wakes and the kernel calls.

use crate::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use crate::sync::sc_fence;

pub const ABSENT: u32 = 0;
pub const PRESENT: u32 = 1;
pub const FAILED: u32 = 2;
pub const FILLING: u32 = 1 << 28;
pub const PUNCHING: u32 = 1 << 29;
pub const FAIL: u32 = 1 << 30;
/// The bits of a process's mark in a state word: its slot (low 8) and the slot's generation
/// (`procs.rs`; next 8), so a mark left by a dead process is never mistaken for one of the
/// process that took the slot after it.
pub const MARK: u32 = 0xffff;

/// The mark of the process that owns a filling, failing or punching chunk.
pub fn owner(st: u32) -> Option<u32> {
    (st & (FILLING | PUNCHING) != 0).then_some(st & MARK)
}

/// Whether readers of a chunk in this state may see zeros standing for failed bytes.
pub fn failed(st: u32) -> bool {
    st == FAILED || st & FAIL != 0
}

/// Absent → filling by mark `me`: true if this call claimed the chunk.
pub fn claim(w: &AtomicU32, me: u32) -> bool {
    w.compare_exchange(ABSENT, FILLING | me, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// Failed → failing by `me`, to install zeros over its missing pages: while it is failing no
/// pin can punch it to retry the callback, so no zero lands in a retried fill.
pub fn claim_failed(w: &AtomicU32, me: u32) -> bool {
    w.compare_exchange(
        FAILED,
        FILLING | FAIL | me,
        Ordering::AcqRel,
        Ordering::Acquire,
    )
    .is_ok()
}

/// Ends a fill by `me`: present, or failed. False if the claim was taken away (this process
/// was taken for dead): the state is then left alone.
pub fn end_fill(w: &AtomicU32, me: u32, ok: bool) -> bool {
    let to = if ok { PRESENT } else { FAILED };
    let from = FILLING | me | if ok { 0 } else { FAIL };
    w.compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// Filling → failing, before the fill by `me` installs any zero.
pub fn mark_failing(w: &AtomicU32, me: u32) -> bool {
    let mine = FILLING | me;
    w.compare_exchange(mine, mine | FAIL, Ordering::SeqCst, Ordering::Acquire)
        .is_ok()
}

/// Present → punching by `me`, if no pin holds the entry; failed → punching only with `force`
/// (a pin retrying the callback: a purge leaves failed chunks, so a reader that read their zeros
/// finds them marked). `pinned` reads the entry's pins (`pins_held`) after the state changed.
/// Returns the state before on success; on `None` the chunk is as it was.
pub fn begin_punch(
    w: &AtomicU32,
    me: u32,
    force: bool,
    pinned: impl FnOnce() -> bool,
) -> Option<u32> {
    let st = w.load(Ordering::Acquire);
    if st != PRESENT && !(force && st == FAILED) {
        return None;
    }
    let mine = PUNCHING | me | if st == FAILED { FAIL } else { 0 };
    if w.compare_exchange(st, mine, Ordering::SeqCst, Ordering::Acquire)
        .is_err()
    {
        return None;
    }
    // The chunk's change before the pins' read, against a pin's bit before its state reads.
    sc_fence();
    if !force && pinned() {
        w.store(st, Ordering::Release);
        return None;
    }
    Some(st)
}

/// Punching by `me` → absent (punched) or back to `prior` (the punch failed).
pub fn end_punch(w: &AtomicU32, me: u32, prior: u32, punched: bool) {
    let mine = PUNCHING | me | if prior == FAILED { FAIL } else { 0 };
    let to = if punched { ABSENT } else { prior };
    let _ = w.compare_exchange(mine, to, Ordering::AcqRel, Ordering::Acquire);
}

/// The pin mask of an entry with bit `me` set; after it, the chunk states are read.
pub fn mark_pin(pins: &AtomicU64, me: usize) {
    pins.fetch_or(1 << me, Ordering::SeqCst);
    sc_fence();
}

/// Clears bit `me` of the pin mask.
pub fn clear_pin(pins: &AtomicU64, me: usize) {
    pins.fetch_and(!(1u64 << me), Ordering::SeqCst);
}

/// Whether a slot that `live` says is alive holds a pin.
pub fn pins_held(pins: &AtomicU64, slots: usize, live: impl Fn(usize) -> bool) -> bool {
    let p = pins.load(Ordering::SeqCst);
    (0..slots).any(|s| p & (1 << s) != 0 && live(s))
}

/// If the chunk is filled, failed or punched by mark `s` (a dead process), ends that: absent,
/// or failed if it was failing or a failed chunk being punched. Returns the state it ended, if
/// it did.
pub fn abandon(w: &AtomicU32, s: u32) -> Option<u32> {
    let st = w.load(Ordering::Acquire);
    if owner(st) != Some(s) {
        return None;
    }
    let to = if st & FAIL != 0 { FAILED } else { ABSENT };
    w.compare_exchange(st, to, Ordering::AcqRel, Ordering::Acquire)
        .ok()
}
