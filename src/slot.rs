//! [`Slot`]: one boxed value in one word, swapped in by writers that never wait and read by
//! readers that may: where a region keeps its last failure's message (`region.rs`), written by
//! fault paths, the SIGBUS handler among them (which must neither wait nor free memory), and
//! read by `Entry::last_error`. A `Mutex<Option<Box<T>>>` would take two words in every region.
//!
//! ## States and transitions
//! The word is the box's address (null: empty) with bit 0 as a lock:
//! - **empty** (null) and **holding** (`p`): `try_put` swaps a new box in by compare-and-swap
//!   from either (again if another put won the race), and hands the one it replaced (if any) to
//!   the writer, which frees or recycles it;
//! - **locked** (`p` plus one byte): a reader took the lock by compare-and-swap from
//!   **holding**, reads `*p`, and stores `p` back (→ **holding**). A `try_put` meanwhile fails
//!   at once and gets its box back (its value is lost: a later failure's would replace it).
//!
//! So a box is freed only by the writer whose swap removed it from the word, and no swap happens
//! while a reader holds the lock: no reader reads a freed value. `tests/loom.rs` checks it
//! (`a_reader_never_reads_a_value_a_writer_frees`).

use std::marker::PhantomData;

use crate::sync::atomic::{AtomicPtr, Ordering};

/// Whether `p` is the locked form of a value's address (bit 0 set).
fn is_locked<T>(p: *mut T) -> bool {
    p as usize & 1 != 0
}

/// The locked form of `p` (its address plus one byte, keeping its provenance).
fn locked<T>(p: *mut T) -> *mut T {
    p.cast::<u8>().wrapping_add(1).cast::<T>()
}

pub(crate) struct Slot<T> {
    word: AtomicPtr<T>,
    _owns: PhantomData<Box<T>>,
}

// SAFETY: the slot owns a `Box<T>` (sent with it) and hands out `&T` to readers on any thread.
unsafe impl<T: Send> Send for Slot<T> {}
// SAFETY: as above: shared access gives `&T` (needs `T: Sync`) and moves boxes between threads
// (needs `T: Send`).
unsafe impl<T: Send + Sync> Sync for Slot<T> {}

impl<T> Slot<T> {
    pub(crate) fn new() -> Slot<T> {
        const {
            assert!(
                std::mem::align_of::<T>() >= 2,
                "bit 0 of the address is the lock"
            )
        };
        Slot {
            word: AtomicPtr::new(std::ptr::null_mut()),
            _owns: PhantomData,
        }
    }

    /// Puts `v` in and returns the value it replaced; gives `v` back if a reader holds the slot
    /// now. Never waits and frees nothing (safe in a signal handler): a put that loses a race
    /// with another put tries again, one refused by a reader's lock does not.
    pub(crate) fn try_put(&self, v: Box<T>) -> Result<Option<Box<T>>, Box<T>> {
        let new = Box::into_raw(v);
        let mut cur = self.word.load(Ordering::Acquire);
        loop {
            if is_locked(cur) {
                // SAFETY: `new` came from `Box::into_raw` above and was never published.
                return Err(unsafe { Box::from_raw(new) });
            }
            match self
                .word
                .compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire)
            {
                // SAFETY: `cur` was the unlocked word: null, or a box the slot owned, now ours.
                Ok(_) => return Ok((!cur.is_null()).then(|| unsafe { Box::from_raw(cur) })),
                Err(now) => cur = now,
            }
        }
    }

    /// Calls `f` with the value, if any, holding the lock meanwhile (writers fail until it
    /// returns; other readers wait).
    pub(crate) fn read<R>(&self, f: impl FnOnce(&T) -> R) -> Option<R> {
        let mut spins = 0;
        loop {
            let cur = self.word.load(Ordering::Acquire);
            if cur.is_null() {
                return None;
            }
            if !is_locked(cur)
                && self
                    .word
                    .compare_exchange(cur, locked(cur), Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                /// Unlocks on every way out of `f`, a panic included.
                struct Unlock<'a, T>(&'a AtomicPtr<T>, *mut T);
                impl<T> Drop for Unlock<'_, T> {
                    fn drop(&mut self) {
                        self.0.store(self.1, Ordering::Release);
                    }
                }
                let _unlock = Unlock(&self.word, cur);
                // SAFETY: locked: no writer replaces (and frees) the value until `_unlock`.
                return Some(f(unsafe { &*cur }));
            }
            crate::sync::backoff(&mut spins);
        }
    }
}

impl<T> Drop for Slot<T> {
    fn drop(&mut self) {
        let cur = self.word.load(Ordering::Acquire);
        if !cur.is_null() {
            // `&mut self`: no reader holds the lock, so `cur` is the value's own address.
            debug_assert!(!is_locked(cur));
            // SAFETY: the slot owns its value.
            drop(unsafe { Box::from_raw(cur) });
        }
    }
}

// Not under loom (tests/loom.rs includes this file, with loom's atomics, outside `loom::model`).
#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::atomic::AtomicUsize;

    /// Writers (one try each, as the SIGBUS handler does) and readers of a failure message at
    /// once: a reader gets a whole message some writer put, never a freed or torn one; a writer
    /// refused while a reader holds the slot gets its message back.
    #[test]
    fn readers_and_writers_at_once() {
        let slot: Slot<String> = Slot::new();
        assert_eq!(slot.read(String::clone), None);
        let refused = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for w in 0..3 {
                let (slot, refused) = (&slot, &refused);
                s.spawn(move || {
                    for n in 0..20_000 {
                        let text = format!("writer {w} message {n} {}", "x".repeat(n % 64));
                        match slot.try_put(Box::new(text.clone())) {
                            Ok(old) => {
                                if let Some(old) = old {
                                    assert!(old.starts_with("writer "), "{old}");
                                }
                            }
                            Err(back) => {
                                assert_eq!(*back, text);
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
            for _ in 0..3 {
                let slot = &slot;
                s.spawn(move || {
                    for _ in 0..20_000 {
                        if let Some(m) = slot.read(String::clone) {
                            let mut parts = m.split(' ');
                            assert_eq!(parts.next(), Some("writer"), "{m}");
                            let n: usize = parts.nth(2).unwrap().parse().unwrap();
                            assert_eq!(parts.next().map_or(0, str::len), n % 64, "{m}");
                        }
                    }
                });
            }
        });
        assert!(slot
            .read(String::clone)
            .is_some_and(|m| m.starts_with("writer ")));
        println!("refused puts: {}", refused.load(Ordering::Relaxed));
    }
}
