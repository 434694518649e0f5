//! Failures in the SIGBUS handler: nothing is formatted into new memory or dropped there. A
//! callback's boxed error (or panic payload) is parked in `Reserves::leftovers` and dropped by
//! the next `refresh` (outside the handler); its text goes into a `String` allocated in advance
//! (`Reserves::texts`), in the region's side block, which is taken from blocks made in advance
//! (`Reserves::sides`) where the region has none yet.

use std::fmt::{self, Write as _};
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use crossbeam_queue::ArrayQueue;

use crate::region::{ErrorText, Failure, Region, Side};

/// Message buffers kept ready for `Region::last_error`, and the bytes of each.
const TEXTS: usize = 64;
const TEXT_CAP: usize = 512;
/// Side blocks kept ready for regions whose first failure is the handler's.
const SIDES: usize = 64;
/// Failures (boxed errors, panic payloads, displaced texts) waiting to be dropped.
const LEFTOVERS: usize = 1024;

static RESERVES: OnceLock<Reserves> = OnceLock::new();

/// Makes the reserves (once), outside the handler.
pub(super) fn init() {
    RESERVES.get_or_init(|| Reserves {
        texts: ArrayQueue::new(TEXTS),
        sides: ArrayQueue::new(SIDES),
        leftovers: ArrayQueue::new(LEFTOVERS),
    });
}

/// Outside the handler, for each SIGBUS-mode cache made: drops parked failures and tops up the
/// message buffers.
pub(super) fn refresh() {
    if let Some(res) = RESERVES.get() {
        while let Some(l) = res.leftovers.pop() {
            drop(l);
        }
        while res.texts.len() < TEXTS {
            if res
                .texts
                .push(Box::new(String::with_capacity(TEXT_CAP)))
                .is_err()
            {
                break;
            }
        }
        while res.sides.len() < SIDES {
            if res.sides.push(Side::spare()).is_err() {
                break;
            }
        }
    }
}

/// What the handler must not drop.
enum Leftover {
    // The fields are only held, to be dropped outside the handler.
    Failure(#[allow(dead_code)] Failure),
    Text(#[allow(dead_code)] ErrorText),
    Side(#[allow(dead_code)] Box<Side>),
}

struct Reserves {
    /// Empty `String`s of `TEXT_CAP` bytes for failure messages (boxed, as the region keeps
    /// them).
    texts: ArrayQueue<ErrorText>,
    /// Side blocks for regions that have none (`Region::install_side`).
    sides: ArrayQueue<Box<Side>>,
    leftovers: ArrayQueue<Leftover>,
}

impl Reserves {
    fn recycle(&self, text: ErrorText) {
        if text.capacity() >= TEXT_CAP {
            if let Err(t) = self.texts.push(text) {
                self.park(Leftover::Text(t));
            }
        } else {
            self.park(Leftover::Text(text));
        }
    }

    /// Where the message of a failure of `r` goes: its side block, made from a spare if it has
    /// none yet; `None` if it has none and no spare is left (the message is then lost; the
    /// failure is still counted and marked on its chunk).
    fn slot_of<'r>(&self, r: &'r Region) -> Option<&'r crate::region::ErrorSlot> {
        if r.last_error_slot().is_none() {
            if let Some(spare) = self.sides.pop() {
                // Lost to another thread's: kept for the next.
                if let Err(spare) = r.install_side(spare) {
                    if let Err(spare) = self.sides.push(spare) {
                        self.park(Leftover::Side(spare));
                    }
                }
            }
        }
        r.last_error_slot()
    }

    fn park(&self, l: Leftover) {
        if let Err(l) = self.leftovers.push(l) {
            // Full: leaking is the only way not to free memory here (documented on Mode::Sigbus).
            std::mem::forget(l);
        }
    }
}

/// Appends to a `String` only within its capacity (no reallocation), cutting at a char boundary.
struct Bounded<'a>(&'a mut String);

impl fmt::Write for Bounded<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.0.capacity() - self.0.len();
        let mut n = s.len().min(room);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.0.push_str(&s[..n]);
        if n < s.len() {
            Err(fmt::Error)
        } else {
            Ok(())
        }
    }
}

/// The handler's failure record: counts it; the message goes into a reserved `String` in the
/// region's `last_error`, the failure is parked to be dropped later.
pub(super) fn keep_failure(r: &Region, failure: Failure) {
    r.counters().regen_failures.fetch_add(1, Ordering::Relaxed);
    let Some(res) = RESERVES.get() else {
        std::mem::forget(failure);
        return;
    };
    // A text first: with none left, a region without a side block does not spend a spare one
    // on a message it cannot keep. One taken with no slot to go to goes back (dropped here, it
    // would be freed in the handler).
    let Some(mut text) = res.texts.pop() else {
        res.park(Leftover::Failure(failure));
        return;
    };
    let Some(slot) = res.slot_of(r) else {
        res.recycle(text);
        res.park(Leftover::Failure(failure));
        return;
    };
    text.clear();
    let _ = write!(Bounded(&mut text), "{failure}");
    match slot.try_put(text) {
        Ok(Some(old)) => res.recycle(old),
        Ok(None) => {}
        // A reader is copying the last message: keep this one's string for later.
        Err(text) => res.recycle(text),
    }
    res.park(Leftover::Failure(failure));
}
