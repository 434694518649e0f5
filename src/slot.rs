//! [`Slot`]: one boxed value in one word, swapped in by writers that never wait and read by
//! readers that may: where a region keeps its last failure's message (`region.rs`), written by
//! fault paths, the SIGBUS handler among them (which must neither wait nor free memory), and
//! read by `Entry::last_error`. A `Mutex<Option<Box<T>>>` would take two words in every region.
//!
//! ## States and transitions
//! The word is the box's address (0: empty) with bit 0 as a lock:
//! - **empty** (0) and **holding** (`p`): `try_put` swaps a new box in by compare-and-swap from
//!   either, and hands the one it replaced (if any) to the writer, which frees or recycles it;
//! - **locked** (`p | 1`): a reader took the lock by compare-and-swap from **holding**, reads
//!   `*p`, and stores `p` back (→ **holding**). A `try_put` meanwhile fails at once and gets
//!   its box back (its value is lost: a later failure's would replace it anyway).
//!
//! So a box is freed only by the writer whose swap removed it from the word, and no swap happens
//! while a reader holds the lock: no reader reads a freed value. `tests/loom.rs` checks it
//! (`a_reader_never_reads_a_value_a_writer_frees`).

use std::marker::PhantomData;

use crate::sync::atomic::{AtomicUsize, Ordering};

const LOCKED: usize = 1;

pub(crate) struct Slot<T> {
    word: AtomicUsize,
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
            word: AtomicUsize::new(0),
            _owns: PhantomData,
        }
    }

    /// Puts `v` in and returns the value it replaced; gives `v` back if a reader holds the slot
    /// now. Never waits and frees nothing (safe in a signal handler).
    pub(crate) fn try_put(&self, v: Box<T>) -> Result<Option<Box<T>>, Box<T>> {
        let new = Box::into_raw(v) as usize;
        let cur = self.word.load(Ordering::Acquire);
        let swapped = cur & LOCKED == 0
            && self
                .word
                .compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
        if swapped {
            // SAFETY: `cur` was the unlocked word: null, or a box the slot owned and now ours.
            Ok((cur != 0).then(|| unsafe { Box::from_raw(cur as *mut T) }))
        } else {
            // SAFETY: `new` came from `Box::into_raw` above and was never published.
            Err(unsafe { Box::from_raw(new as *mut T) })
        }
    }

    /// Calls `f` with the value, if any, holding the lock meanwhile (writers fail until it
    /// returns; other readers wait).
    pub(crate) fn read<R>(&self, f: impl FnOnce(&T) -> R) -> Option<R> {
        let mut spins = 0;
        loop {
            let cur = self.word.load(Ordering::Acquire);
            if cur == 0 {
                return None;
            }
            if cur & LOCKED == 0
                && self
                    .word
                    .compare_exchange(cur, cur | LOCKED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                /// Unlocks on every way out of `f`, a panic included.
                struct Unlock<'a>(&'a AtomicUsize, usize);
                impl Drop for Unlock<'_> {
                    fn drop(&mut self) {
                        self.0.store(self.1, Ordering::Release);
                    }
                }
                let _unlock = Unlock(&self.word, cur);
                // SAFETY: locked: no writer replaces (and frees) the value until `_unlock`.
                return Some(f(unsafe { &*(cur as *const T) }));
            }
            crate::sync::backoff(&mut spins);
        }
    }
}

impl<T> Drop for Slot<T> {
    fn drop(&mut self) {
        let cur = self.word.load(Ordering::Acquire) & !LOCKED;
        if cur != 0 {
            // SAFETY: the slot owns its value; `&mut self`: no reader holds it.
            drop(unsafe { Box::from_raw(cur as *mut T) });
        }
    }
}

// Not under loom (tests/loom.rs includes this file, with loom's atomics, outside `loom::model`).
#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

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
