//! Hazard pointers: how a fault path reads a region without locks or allocation while other
//! threads remove regions.
//!
//! A reader claims a hazard slot, publishes the pointer it read, and re-reads the source: if it
//! still holds the pointer, the region cannot be freed until the slot is released, because the
//! remover clears the source first and then waits until no slot holds the pointer. Everything is
//! atomics over a static array, so the SIGBUS handler can use it too.

use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

const SLOTS: usize = 256;

#[allow(clippy::declare_interior_mutable_const)] // the const only seeds the static arrays
const NULL: AtomicPtr<()> = AtomicPtr::new(std::ptr::null_mut());
#[allow(clippy::declare_interior_mutable_const)] // likewise
const FREE: AtomicBool = AtomicBool::new(false);
static HAZARD: [AtomicPtr<()>; SLOTS] = [NULL; SLOTS];
static CLAIMED: [AtomicBool; SLOTS] = [FREE; SLOTS];

/// A published hazard; the pointer it protects stays valid until this is dropped.
pub(crate) struct Guard<T> {
    slot: usize,
    ptr: *const T,
}

impl<T> Guard<T> {
    pub(crate) fn get(&self) -> &T {
        // SAFETY: the pointer was non-null and still published in its source after we announced
        // it, so the remover is waiting for us (see `wait_unprotected`).
        unsafe { &*self.ptr }
    }
}

impl<T> Drop for Guard<T> {
    fn drop(&mut self) {
        HAZARD[self.slot].store(std::ptr::null_mut(), Ordering::SeqCst);
        CLAIMED[self.slot].store(false, Ordering::Release);
    }
}

fn claim() -> usize {
    loop {
        for (i, c) in CLAIMED.iter().enumerate() {
            if !c.load(Ordering::Relaxed)
                && c.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return i;
            }
        }
        // Every slot busy: 256 concurrent fault paths. Yield (async-signal-safe) and retry.
        // SAFETY: sched_yield has no preconditions.
        unsafe { libc::sched_yield() };
    }
}

/// Reads `src` and protects what it points to; `None` if it is null.
pub(crate) fn protect<T>(src: &AtomicPtr<T>) -> Option<Guard<T>> {
    let slot = claim();
    loop {
        let p = src.load(Ordering::SeqCst);
        if p.is_null() {
            CLAIMED[slot].store(false, Ordering::Release);
            return None;
        }
        HAZARD[slot].store(p.cast(), Ordering::SeqCst);
        if src.load(Ordering::SeqCst) == p {
            return Some(Guard { slot, ptr: p });
        }
    }
}

/// Waits until no hazard slot publishes `p`. Call after every source stopped pointing to `p`.
pub(crate) fn wait_unprotected<T>(p: *const T) {
    for h in HAZARD.iter() {
        while h.load(Ordering::SeqCst) == p as *mut () {
            std::thread::yield_now();
        }
    }
}
