//! The index in the file: key → record, an open-addressed table of fixed size.
//!
//! ## States of a record (`Record::state`)
//! - **empty** → **claimed** (`CLAIMED | s`): a CAS by the process with mark `s` inserting a key
//!   whose probe reached this record. It takes a span, writes key, span and the chunks' owner,
//!   punches the span (no stray page may stand in for a chunk), then
//! - **claimed** → **ready** (release): from then on key, span and length never change.
//! - **claimed** by a dead process → **empty** (its span is lost), by whoever finds it so.
//!
//! Lookups and inserts that meet a claimed record wait for it (futex on the state word), since it
//! may hold their key. Records are never removed, so a ready record stays ready: an entry's
//! address stays valid for the life of the file.

use std::sync::atomic::Ordering;

use super::file::{File, CLAIMED, EMPTY, READY};
use super::procs;
use crate::error::Error;
use crate::sys::shm;

/// A key's hash, the same in every process (no per-process seed).
fn hash(key: u64) -> u64 {
    let mut z = key.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What a probe found at a record.
enum Probe {
    Mine(usize),
    Other,
    Empty,
}

/// Waits while record `i` is claimed by a live process; a dead claimer's record is emptied.
/// Returns the state once it is not claimed.
fn settled(f: &File, i: usize, me: Option<u32>) -> u32 {
    let r = f.record(i);
    loop {
        let st = r.state.load(Ordering::Acquire);
        if st & CLAIMED == 0 {
            return st;
        }
        let s = st & !CLAIMED;
        if Some(s) != me && !procs::alive_mark(f, s) {
            if r.state
                .compare_exchange(st, EMPTY, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                shm::futex_wake(&r.state);
            }
            continue;
        }
        shm::futex_wait(&r.state, st, 10);
    }
}

fn look(f: &File, i: usize, key: u64, me: Option<u32>) -> Probe {
    match settled(f, i, me) {
        EMPTY => Probe::Empty,
        _ if f.record(i).key.load(Ordering::Relaxed) == key => Probe::Mine(i),
        _ => Probe::Other,
    }
}

/// The record of `key`, if there is one.
pub fn find(f: &File, key: u64) -> Option<usize> {
    let h = hash(key) as usize;
    for p in 0..f.slots {
        let i = (h + p) & (f.slots - 1);
        match look(f, i, key, None) {
            Probe::Mine(i) => return Some(i),
            Probe::Empty => return None,
            Probe::Other => {}
        }
    }
    None
}

/// The record of `key`, made with a span of `len` bytes if there is none. Returns it and
/// whether it was made here.
pub fn insert(f: &File, me: u32, key: u64, len: usize) -> Result<(usize, bool), Error> {
    if len == 0 || len > f.capacity {
        return Err(Error::InvalidLength {
            len,
            reason: "an entry of a shared cache holds 1 byte up to the cache's capacity",
        });
    }
    let h = hash(key) as usize;
    let mut p = 0;
    while p < f.slots {
        let i = (h + p) & (f.slots - 1);
        match look(f, i, key, Some(me)) {
            Probe::Mine(i) => {
                let have = f.record(i).len.load(Ordering::Relaxed) as usize;
                if have != len {
                    return Err(Error::SharedLengthMismatch {
                        key,
                        have,
                        asked: len,
                    });
                }
                return Ok((i, false));
            }
            Probe::Other => p += 1,
            Probe::Empty => {
                let r = f.record(i);
                let claim = CLAIMED | me;
                if r.state
                    .compare_exchange(EMPTY, claim, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    continue; // someone else claimed it: look again
                }
                return match fill_record(f, i, key, len) {
                    Ok(()) => {
                        // A CAS from our own claim: only a process that took this one for dead
                        // could have changed it, and then it is not ours to publish.
                        let published = r
                            .state
                            .compare_exchange(claim, READY, Ordering::AcqRel, Ordering::Acquire)
                            .is_ok();
                        shm::futex_wake(&r.state);
                        if !published {
                            continue;
                        }
                        f.header().entries.fetch_add(1, Ordering::Relaxed);
                        Ok((i, true))
                    }
                    Err(e) => {
                        let _ = r.state.compare_exchange(
                            claim,
                            EMPTY,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        );
                        shm::futex_wake(&r.state);
                        Err(e)
                    }
                };
            }
        }
    }
    Err(Error::SharedFull {
        what: "entry records",
        have: f.slots,
    })
}

/// Writes a claimed record: a span from the data area, key and length, the chunks' owner.
fn fill_record(f: &File, i: usize, key: u64, len: usize) -> Result<(), Error> {
    let span = len.div_ceil(f.chunk) * f.chunk;
    let h = f.header();
    let cap = f.capacity as u64;
    let offset = h
        .next_data
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n + span as u64 <= cap).then_some(n + span as u64)
        })
        .map_err(|_| Error::SharedFull {
            what: "bytes of capacity",
            have: f.capacity,
        })? as usize;
    let r = f.record(i);
    r.key.store(key, Ordering::Relaxed);
    r.offset.store(offset as u64, Ordering::Relaxed);
    r.len.store(len as u64, Ordering::Relaxed);
    r.pins.store(0, Ordering::Relaxed);
    r.fills.store(0, Ordering::Relaxed);
    r.used
        .store(h.tick.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
    let first = offset / f.chunk;
    for c in first..first + span / f.chunk {
        f.chunk_word(c).owner.store(i as u32 + 1, Ordering::Release);
    }
    // A stray read of this span before it was handed out installed zeros: drop them.
    shm::punch(&f.fd, f.data_off + offset, span).map_err(|e| Error::kernel("fallocate", e))
}
