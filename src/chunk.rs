//! The state of a region's chunks and its pin gate: the pure part of the fill protocol, with no
//! system calls, so that `tests/loom.rs` can check every interleaving of it (it includes this
//! file with `crate::sync` pointing at loom's atomics).
//!
//! ## A chunk's states
//! One `AtomicU8` per fill chunk, two bits:
//!
//! | state | meaning |
//! |---|---|
//! | `IDLE` | no fill in flight; every page is present with the entry's bytes, or missing |
//! | `FILLING` | one thread (a fault path or a pin) owns the chunk and is rebuilding it |
//! | `FAILED` | the last fill failed: missing pages hold zeros, poison, or are left missing |
//! | `FILLING \| FAILED` | a fill is retrying a failed chunk |
//!
//! Transitions:
//! - `try_claim`: `IDLE → FILLING` or `FAILED → FILLING|FAILED`, by compare-and-swap, so at most
//!   one fill per chunk is in flight. A fault on a chunk being filled does not start another
//!   fill: in monitor mode the faulting thread stays asleep in the kernel until the owner's wake,
//!   in SIGBUS mode the handler waits for the owner to release the chunk and retries the access.
//! - `release(Rebuilt)`: the owner rebuilt every page that was not the entry's: `→ IDLE`.
//! - `mark_failed`: the callback failed and the failure policy is about to install zero pages
//!   (or poison, or protect them): `FILLING → FILLING|FAILED`, counted in `failed`, while the
//!   owner still holds the chunk. Those pages are readable without a fault the moment they are
//!   in, before the release, so the mark comes first: whoever reads the zeros sees the entry
//!   failed. Model: `zeros_are_read_only_as_failed` in `tests/loom.rs`.
//! - `release(Failed)`: the callback failed: `→ FAILED` (counted unless `mark_failed` did).
//! - `release(Unchanged)`: the owner left the failure bit as it was (it could not drop a failed
//!   chunk's zero or poisoned pages because a pin was in progress; the pin rebuilds them).
//!
//! Only the owner (the thread that claimed) writes the `FAILED` bit. The owner releases *before*
//! it wakes the chunk's waiters: a monitor worker that saw `FILLING` and dropped its fault
//! message is then sure the wake comes after, and wakes that thread too.
//!
//! A fourth bit, `WAITED`, lets an owner that nobody faulted on skip that wake (a fill ahead of
//! a sequential reader, which serves no fault of its own): a fault path that finds the chunk
//! busy sets it (`note_waiter`, by compare-and-swap, and only while `FILLING` is set; if the
//! chunk was released meanwhile it claims the chunk itself), and `release` (a swap) returns it
//! and clears it. The owner wakes the chunk after its release if it was set; a thread that
//! faulted there has its message read by a worker, which either notes itself before the
//! release or claims the chunk after it. Model: `busy_fault_is_woken_by_a_noted_wake` in
//! `tests/loom.rs`.

//! A third bit, `FILLED`, records that the chunk held the entry's bytes once (a fill rebuilt it,
//! or the entry's initial bytes were copied in): pages a later fill finds missing were taken
//! back by the kernel (counted for `Stats::pages_reclaimed`).
//!
//! `failed` counts the chunks in `FAILED`: an entry is failed while any of its chunks is, and
//! stays so until each of them is rebuilt (a success in another chunk does not clear it).
//!
//! ## The pin gate
//! Re-advising pages MADV_FREE must never happen to a page a pin holds: the pin's writes would be
//! lost the moment the kernel drops the page. Every re-advice of a fill (and every MADV_DONTNEED a
//! fault path does on a failed chunk) goes through the gate: `enter` counts the adviser in, or
//! refuses if a pin closed the gate. `close` (the first pin) shuts it and waits until no adviser
//! is inside; from then until `open` (the last unpin, or a failed pin) no fill advises anything,
//! so the pin's writes, made after `close` returns, are never undone. A fill that started before
//! the pin and finishes during or after it therefore never re-advises pinned pages: it simply
//! skips the advice. The wait in `close` lasts one madvise call, never a callback.
//!
//! Both sides update one atomic word (closed bit + adviser count) with read-modify-writes, so
//! they are totally ordered: either the adviser's `enter` comes first (and `close` waits for its
//! `exit`) or `close` comes first (and `enter` sees it).

use std::alloc::Layout;
use std::mem::ManuallyDrop;
use std::ptr::NonNull;

use crate::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

/// No fill in flight.
pub(crate) const IDLE: u8 = 0;
/// A fill owns the chunk.
pub(crate) const FILLING: u8 = 1;
/// The last fill of the chunk failed.
pub(crate) const FAILED: u8 = 2;
/// The chunk held the entry's bytes once.
pub(crate) const FILLED: u8 = 4;
/// A fault path found the chunk busy and counts on the owner's wake.
pub(crate) const WAITED: u8 = 8;

/// How a fill ended, for [`Chunks::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Every page that was not the entry's was rebuilt: clears `FAILED`.
    Rebuilt,
    /// The callback failed: sets `FAILED`.
    Failed,
    /// Keeps `FAILED` as it was.
    Unchanged,
}

/// What [`Chunks::try_claim`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// The caller owns the chunk now; `failed` says whether its last fill had failed.
    Owned { failed: bool },
    /// Another fill owns it.
    Busy,
}

/// Regions of up to this many chunks keep their states inline (no allocation of their own); the
/// word's last byte is then their fill-ahead state.
const INLINE: usize = 7;

/// Where a region's chunk states and its fill-ahead state are: inline, or (more than `INLINE`
/// chunks) in a block of their own (the fill-ahead state, then `Chunks::len` states: see
/// [`heap_layout`]). One word either way; `Chunks::len` says which.
union States {
    inline: ManuallyDrop<[AtomicU8; INLINE + 1]>,
    heap: NonNull<u8>,
}

/// The layout of a heap block of `len` chunk states, and the offset of its first state.
fn heap_layout(len: usize) -> (Layout, usize) {
    let states = Layout::array::<AtomicU8>(len).expect("chunk states fit in memory");
    let (layout, off) = Layout::new::<AtomicU64>()
        .extend(states)
        .expect("chunk states fit in memory");
    debug_assert_eq!(off, HEAP_STATES);
    (layout, off)
}

/// Where a heap block's first state is: right after the fill-ahead state (bytes need no
/// alignment), so the states are found with no layout arithmetic on each access.
const HEAP_STATES: usize = std::mem::size_of::<AtomicU64>();

/// The states of a region's chunks, and where a sequential reader of it is (the fill-ahead
/// state: see [`Chunks::ahead`]).
pub(crate) struct Chunks {
    states: States,
    len: u32,
    failed: AtomicU32,
}

// SAFETY: the states are atomics, shared by reference only; the heap block is owned by the
// `Chunks` (freed in its drop), like a `Box` of atomics.
unsafe impl Send for Chunks {}
// SAFETY: as above.
unsafe impl Sync for Chunks {}

impl Chunks {
    pub(crate) fn new(chunks: usize) -> Chunks {
        let len = u32::try_from(chunks).expect("chunks per region fit in 32 bits");
        let states = if chunks <= INLINE {
            States {
                inline: ManuallyDrop::new(std::array::from_fn(|_| AtomicU8::new(IDLE))),
            }
        } else {
            let (layout, off) = heap_layout(chunks);
            // SAFETY: the layout has a nonzero size (it holds an `AtomicU64`).
            let p = unsafe { std::alloc::alloc(layout) };
            let Some(heap) = NonNull::new(p) else {
                std::alloc::handle_alloc_error(layout)
            };
            // SAFETY: a fresh block of `layout`: the fill-ahead state at its start and `chunks`
            // states from `off`, each written once, in bounds and aligned.
            unsafe {
                heap.as_ptr().cast::<AtomicU64>().write(AtomicU64::new(0));
                let first = heap.as_ptr().add(off).cast::<AtomicU8>();
                for i in 0..chunks {
                    first.add(i).write(AtomicU8::new(IDLE));
                }
            }
            States { heap }
        };
        Chunks {
            states,
            len,
            failed: AtomicU32::new(0),
        }
    }

    /// Every chunk's state.
    fn states(&self) -> &[AtomicU8] {
        let len = self.len as usize;
        if len <= INLINE {
            // SAFETY: `new` made the inline variant for this length.
            unsafe { &self.states.inline[..len] }
        } else {
            // SAFETY: `new` made the heap variant for this length: `len` states from
            // `HEAP_STATES` (see `heap_layout`), owned, alive as long as `self`.
            unsafe {
                std::slice::from_raw_parts(self.states.heap.as_ptr().add(HEAP_STATES).cast(), len)
            }
        }
    }

    /// The fill-ahead state: the chunk a sequential reader faults on next, plus one (0: none
    /// yet), and the window of chunks filled ahead of its last fault. A hint: read and written
    /// with no order to anything else (`Region::ahead_of`).
    pub(crate) fn ahead(&self) -> (usize, usize) {
        if self.len as usize <= INLINE {
            // SAFETY: the inline variant (see `states`); its last byte is the fill-ahead state.
            let b = unsafe { &self.states.inline[INLINE] }.load(Ordering::Relaxed);
            ((b >> 4) as usize, (b & 0xf) as usize)
        } else {
            let w = self.heap_ahead().load(Ordering::Relaxed);
            ((w >> 32) as usize, (w & 0xffff_ffff) as usize)
        }
    }

    /// Sets the fill-ahead state (see [`ahead`](Self::ahead)): `next` at most the number of
    /// chunks plus one, `window` less than the number of chunks.
    pub(crate) fn set_ahead(&self, next: usize, window: usize) {
        let len = self.len as usize;
        debug_assert!(next <= len + 1 && window < len.max(1));
        if len <= INLINE {
            // Inline: at most 7 chunks, so `next` ≤ 8 and `window` ≤ 6 fit a nibble each.
            let b = ((next.min(0xf) as u8) << 4) | window.min(0xf) as u8;
            // SAFETY: as in `ahead`.
            unsafe { &self.states.inline[INLINE] }.store(b, Ordering::Relaxed);
        } else {
            self.heap_ahead()
                .store(((next as u64) << 32) | window as u64, Ordering::Relaxed);
        }
    }

    /// The heap block's fill-ahead state (more than `INLINE` chunks only).
    fn heap_ahead(&self) -> &AtomicU64 {
        debug_assert!(self.len as usize > INLINE);
        // SAFETY: the heap variant: the block starts with the fill-ahead state, alive as long
        // as `self`.
        unsafe { &*self.states.heap.as_ptr().cast::<AtomicU64>() }
    }

    /// Number of chunks.
    pub(crate) fn len(&self) -> usize {
        self.len as usize
    }

    /// Takes chunk `c` for a fill, unless another fill owns it.
    pub(crate) fn try_claim(&self, c: usize) -> Claim {
        let s = &self.states()[c];
        let mut cur = s.load(Ordering::Acquire);
        loop {
            if cur & FILLING != 0 {
                return Claim::Busy;
            }
            match s.compare_exchange_weak(cur, cur | FILLING, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    return Claim::Owned {
                        failed: cur & FAILED != 0,
                    }
                }
                Err(now) => cur = now,
            }
        }
    }

    /// A fault path found chunk `c` busy: records that it counts on the owner's wake. False if
    /// no fill owns the chunk any more (the caller tries to claim it again).
    pub(crate) fn note_waiter(&self, c: usize) -> bool {
        let s = &self.states()[c];
        let mut cur = s.load(Ordering::Acquire);
        loop {
            if cur & FILLING == 0 {
                return false;
            }
            if cur & WAITED != 0 {
                return true;
            }
            match s.compare_exchange_weak(cur, cur | WAITED, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Marks chunk `c`, which the caller owns, failed before the failure policy changes its
    /// pages (see the module docs); its `release(Failed)` then keeps the mark and the count.
    pub(crate) fn mark_failed(&self, c: usize) {
        let was = self.states()[c].fetch_or(FAILED, Ordering::AcqRel);
        debug_assert!(was & FILLING != 0, "failure of a chunk nobody claimed");
        if was & FAILED == 0 {
            self.failed.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Ends the fill the caller owns (after `try_claim` gave `Owned`). Returns whether a fault
    /// path noted itself as waiting meanwhile (`note_waiter`): the caller must wake the chunk.
    #[must_use = "a noted waiter must be woken"]
    pub(crate) fn release(&self, c: usize, outcome: Outcome) -> bool {
        let s = &self.states()[c];
        let cur = s.load(Ordering::Acquire);
        debug_assert!(cur & FILLING != 0, "release of a chunk nobody claimed");
        // (Only the owner writes FAILED and FILLED while FILLING is set; others may add WAITED,
        // so the new state is swapped in and the old one's WAITED returned.)
        let was_failed = cur & FAILED != 0;
        let failed = match outcome {
            Outcome::Rebuilt => false,
            Outcome::Failed => true,
            Outcome::Unchanged => was_failed,
        };
        match (was_failed, failed) {
            (false, true) => {
                self.failed.fetch_add(1, Ordering::SeqCst);
            }
            (true, false) => {
                self.failed.fetch_sub(1, Ordering::SeqCst);
            }
            _ => {}
        }
        let filled = outcome == Outcome::Rebuilt || cur & FILLED != 0;
        let next = if failed { FAILED } else { IDLE } | if filled { FILLED } else { IDLE };
        s.swap(next, Ordering::AcqRel) & WAITED != 0
    }

    /// Whether chunk `c` held the entry's bytes once (read by its owner during a fill).
    pub(crate) fn was_filled(&self, c: usize) -> bool {
        self.states()[c].load(Ordering::Acquire) & FILLED != 0
    }

    /// Marks every chunk as having held the entry's bytes (its initial bytes were copied in).
    pub(crate) fn mark_all_filled(&self) {
        for s in self.states() {
            s.fetch_or(FILLED, Ordering::AcqRel);
        }
    }

    /// Whether a fill owns chunk `c` now.
    pub(crate) fn is_filling(&self, c: usize) -> bool {
        self.states()[c].load(Ordering::Acquire) & FILLING != 0
    }

    /// Whether chunk `c`'s last fill failed.
    pub(crate) fn is_failed(&self, c: usize) -> bool {
        self.states()[c].load(Ordering::Acquire) & FAILED != 0
    }

    /// Chunks whose last fill failed.
    pub(crate) fn failed_chunks(&self) -> usize {
        self.failed.load(Ordering::SeqCst) as usize
    }
}

impl Drop for Chunks {
    fn drop(&mut self) {
        let len = self.len as usize;
        if len <= INLINE {
            // SAFETY: the inline variant (see `states`), dropped once.
            unsafe { ManuallyDrop::drop(&mut self.states.inline) };
        } else {
            let (layout, off) = heap_layout(len);
            // SAFETY: the heap variant: the block `new` allocated with this layout and wrote
            // these values into; each is dropped once, then the block is freed once.
            unsafe {
                let p = self.states.heap.as_ptr();
                std::ptr::drop_in_place(p.cast::<AtomicU64>());
                std::ptr::drop_in_place(std::ptr::slice_from_raw_parts_mut(
                    p.add(off).cast::<AtomicU8>(),
                    len,
                ));
                std::alloc::dealloc(p, layout);
            }
        }
    }
}

const CLOSED: u32 = 1 << 31;

/// Keeps fills from advising pages while a pin is in progress or held (see the module docs).
pub(crate) struct PinGate {
    /// `CLOSED`, plus the advisers inside (fewer than 2^31: each is a thread in one madvise).
    word: AtomicU32,
}

/// One adviser inside the gate; leaves on drop.
pub(crate) struct Pass<'a>(&'a PinGate);

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.0.word.fetch_sub(1, Ordering::SeqCst);
    }
}

impl PinGate {
    pub(crate) fn new() -> PinGate {
        PinGate {
            word: AtomicU32::new(0),
        }
    }

    /// Enters to advise pages, or `None` if a pin closed the gate: then advise nothing.
    pub(crate) fn enter(&self) -> Option<Pass<'_>> {
        let prev = self.word.fetch_add(1, Ordering::SeqCst);
        if prev & CLOSED != 0 {
            self.word.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Pass(self))
    }

    /// Shuts the gate and waits until every adviser inside has left. Called by the first pin,
    /// under the region's pin lock.
    pub(crate) fn close(&self) {
        let mut w = self.word.fetch_or(CLOSED, Ordering::SeqCst) | CLOSED;
        let mut spins = 0u32;
        while w & !CLOSED != 0 {
            crate::sync::backoff(&mut spins);
            w = self.word.load(Ordering::SeqCst);
        }
    }

    /// Opens the gate again (the last unpin, or a pin that failed).
    pub(crate) fn open(&self) {
        self.word.fetch_and(!CLOSED, Ordering::SeqCst);
    }
}

// Not under loom (tests/loom.rs includes this file, with loom's atomics, outside `loom::model`).
#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn one_owner_per_chunk() {
        let c = Chunks::new(2);
        assert_eq!(c.try_claim(0), Claim::Owned { failed: false });
        assert_eq!(c.try_claim(0), Claim::Busy);
        assert!(c.is_filling(0));
        // The other chunk is free.
        assert_eq!(c.try_claim(1), Claim::Owned { failed: false });
        assert!(!c.release(0, Outcome::Rebuilt));
        assert!(!c.release(1, Outcome::Rebuilt));
        assert!(!c.is_filling(0) && !c.is_filling(1));
    }

    /// Up to `INLINE` chunks keep their states in the region, more in a slice of their own:
    /// each chunk of either has its own state, at both ends.
    #[test]
    fn inline_and_heap_states_are_each_chunks_own() {
        for n in [1, INLINE - 1, INLINE, INLINE + 1, 1000] {
            let c = Chunks::new(n);
            assert_eq!(c.len(), n);
            assert_eq!(c.try_claim(n - 1), Claim::Owned { failed: false });
            assert!(!c.release(n - 1, Outcome::Failed));
            assert_eq!(c.try_claim(0), Claim::Owned { failed: n == 1 });
            assert!(c.is_filling(0));
            assert_eq!(c.failed_chunks(), 1);
            assert!(c.is_failed(n - 1));
            assert!(n == 1 || (!c.is_failed(0) && !c.is_filling(n - 1)));
            c.mark_all_filled();
            assert!((0..n).all(|i| c.was_filled(i)));
        }
    }

    /// The fill-ahead state shares the inline word with up to 7 states, or heads the heap
    /// block: writing either never changes the other.
    #[test]
    fn the_fill_ahead_state_and_the_last_chunk_are_apart() {
        for n in [1, 2, INLINE, INLINE + 1, 1000] {
            let c = Chunks::new(n);
            assert_eq!(
                c.ahead(),
                (0, 0),
                "{n} chunks: a fresh region has no reader"
            );
            assert_eq!(c.try_claim(n - 1), Claim::Owned { failed: false });
            c.set_ahead(n + 1, n - 1);
            assert_eq!(c.ahead(), (n + 1, n - 1), "{n} chunks");
            assert!(
                c.is_filling(n - 1),
                "{n} chunks: the fill-ahead state overwrote a state"
            );
            assert!(!c.release(n - 1, Outcome::Failed));
            assert_eq!(
                c.ahead(),
                (n + 1, n - 1),
                "{n} chunks: a release overwrote it"
            );
            c.set_ahead(0, 0);
            assert!(c.is_failed(n - 1) && !c.is_filling(n - 1), "{n} chunks");
        }
    }

    #[test]
    fn failure_stays_until_its_chunk_is_rebuilt() {
        let c = Chunks::new(2);
        assert!(matches!(c.try_claim(0), Claim::Owned { .. }));
        assert!(!c.release(0, Outcome::Failed));
        assert!(c.is_failed(0));
        assert_eq!(c.failed_chunks(), 1);
        // A success elsewhere does not clear it.
        assert!(matches!(c.try_claim(1), Claim::Owned { .. }));
        assert!(!c.release(1, Outcome::Rebuilt));
        assert_eq!(c.failed_chunks(), 1);
        // A fill that could not drop the failed pages keeps the mark.
        assert_eq!(c.try_claim(0), Claim::Owned { failed: true });
        assert!(!c.release(0, Outcome::Unchanged));
        assert!(c.is_failed(0));
        // A rebuild clears it.
        assert_eq!(c.try_claim(0), Claim::Owned { failed: true });
        assert!(!c.release(0, Outcome::Rebuilt));
        assert!(!c.is_failed(0));
        assert_eq!(c.failed_chunks(), 0);
    }

    #[test]
    fn a_noted_waiter_is_returned_by_the_release() {
        let c = Chunks::new(1);
        // Nothing owns the chunk: no waiter can be noted (the fault claims it instead).
        assert!(!c.note_waiter(0));
        assert_eq!(c.try_claim(0), Claim::Owned { failed: false });
        assert!(c.note_waiter(0));
        assert!(c.note_waiter(0), "a second waiter on a noted chunk");
        assert!(
            c.release(0, Outcome::Rebuilt),
            "the release reports the waiter"
        );
        assert!(c.was_filled(0) && !c.is_filling(0) && !c.is_failed(0));
        // The mark went with the release.
        assert_eq!(c.try_claim(0), Claim::Owned { failed: false });
        assert!(!c.release(0, Outcome::Failed));
        assert!(c.is_failed(0), "WAITED does not disturb the failure bit");
    }

    #[test]
    fn gate_refuses_advice_while_closed() {
        let g = PinGate::new();
        {
            let _pass = g.enter().expect("open");
        }
        g.close();
        assert!(g.enter().is_none());
        g.open();
        assert!(g.enter().is_some());
    }
}
