//! Hazard pointers: how a fault path reads a region without locks or allocation while other
//! threads remove regions.
//!
//! A reader claims a hazard slot, publishes the pointer it read, and re-reads the source: if it
//! still holds the pointer, the region cannot be freed until the slot is released, because the
//! remover clears the source first and then waits until no slot holds the pointer. Everything is
//! atomics over arrays made once, so the SIGBUS handler can use it too.
//!
//! Slots are held for a few instructions only: a fault path turns its hazard into a count on the
//! region (`RegionRef`) and releases the slot before calling any callback. So however many fault
//! paths run or nest at once, a thread waiting for a free slot waits only for other threads to
//! pass those few instructions; no slot is ever held by a thread that waits for another fault.
//!
//! This file is pure protocol (no system calls, atomics from `crate::sync`): `tests/loom.rs`
//! includes it to check every interleaving of a reader and a remover.

use crate::sync::atomic::{fence, AtomicBool, AtomicPtr, Ordering};

/// A set of hazard slots.
pub(crate) struct Domain {
    hazard: Box<[AtomicPtr<()>]>,
    claimed: Box<[AtomicBool]>,
}

/// A published hazard; the pointer it protects stays valid until this is dropped.
pub(crate) struct Guard<'d, T> {
    domain: &'d Domain,
    slot: usize,
    ptr: *const T,
}

impl<T> Guard<'_, T> {
    pub(crate) fn get(&self) -> &T {
        // SAFETY: the pointer was non-null and still published in its source after we announced
        // it, so the remover is waiting for us (see `wait_unprotected`).
        unsafe { &*self.ptr }
    }
}

impl<T> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        self.domain.hazard[self.slot].store(std::ptr::null_mut(), Ordering::SeqCst);
        self.domain.claimed[self.slot].store(false, Ordering::Release);
    }
}

impl Domain {
    /// A domain of `slots` hazard slots (allocated here, never again).
    pub(crate) fn new(slots: usize) -> Domain {
        Domain {
            hazard: (0..slots)
                .map(|_| AtomicPtr::new(std::ptr::null_mut()))
                .collect(),
            claimed: (0..slots).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    fn claim(&self) -> usize {
        let mut spins = 0;
        loop {
            for (i, c) in self.claimed.iter().enumerate() {
                if !c.load(Ordering::Relaxed)
                    && c.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                {
                    return i;
                }
            }
            // Every slot busy: that many threads are inside `protect` right now, each for a few
            // instructions (see the module docs). Wait for one to finish (async-signal-safe).
            crate::sync::backoff(&mut spins);
        }
    }

    /// Reads `src` and protects what it points to; `None` if it is null.
    pub(crate) fn protect<'d, T>(&'d self, src: &AtomicPtr<T>) -> Option<Guard<'d, T>> {
        let slot = self.claim();
        loop {
            let p = src.load(Ordering::SeqCst);
            if p.is_null() {
                // A retry may have published an older pointer in the slot: clear it, or its
                // remover would wait for this slot until someone reused it.
                self.hazard[slot].store(std::ptr::null_mut(), Ordering::SeqCst);
                self.claimed[slot].store(false, Ordering::Release);
                return None;
            }
            self.hazard[slot].store(p.cast(), Ordering::SeqCst);
            // Store-load ordering with the remover (which stores the source, then loads the
            // slots): one of the two sees the other's store.
            fence(Ordering::SeqCst);
            if src.load(Ordering::SeqCst) == p {
                return Some(Guard {
                    domain: self,
                    slot,
                    ptr: p,
                });
            }
        }
    }

    /// Waits until no hazard slot publishes any pointer of `sorted` (sorted ascending): one pass
    /// over the slots for many removed pointers. Call after every source stopped pointing to them.
    pub(crate) fn wait_unprotected_all<T>(&self, sorted: &[*const T]) {
        // Pairs with the fence in `protect`, as in `wait_unprotected`.
        fence(Ordering::SeqCst);
        for h in self.hazard.iter() {
            let mut spins = 0;
            while {
                let cur = h.load(Ordering::SeqCst) as *const T;
                !cur.is_null() && sorted.binary_search(&cur).is_ok()
            } {
                crate::sync::backoff(&mut spins);
            }
        }
    }

    /// Waits until no hazard slot publishes `p`. Call after every source stopped pointing to `p`.
    pub(crate) fn wait_unprotected<T>(&self, p: *const T) {
        // Pairs with the fence in `protect`.
        fence(Ordering::SeqCst);
        for h in self.hazard.iter() {
            let mut spins = 0;
            while h.load(Ordering::SeqCst) == p as *mut () {
                crate::sync::backoff(&mut spins);
            }
        }
    }
}
