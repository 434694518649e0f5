//! The atomics and the waiting that the pure concurrent protocols (`chunk.rs`) use: std's here;
//! `tests/loom.rs` provides a module of the same shape over loom's, to check every interleaving.

pub(crate) use std::sync::atomic;

/// One step of a bounded-cost wait for another thread: yields the CPU for the first 64 steps,
/// then sleeps 1 ms a step. Async-signal-safe (the SIGBUS handler waits with it).
pub(crate) fn backoff(spins: &mut u32) {
    if *spins < 64 {
        crate::sys::os::yield_now();
    } else {
        crate::sys::os::sleep_ms(1);
    }
    *spins = spins.saturating_add(1);
}

/// Orders the SeqCst accesses before it against those after it, for loom: its model treats
/// SeqCst accesses as acquire/release only and checks SeqCst fences, so `tests/loom.rs` makes
/// this a `fence(SeqCst)`. Here nothing: SeqCst accesses are in one total order already (what
/// the fence gives loom), and on x86 a fence after a locked instruction would cost a few dozen
/// cycles for nothing.
#[inline(always)]
pub(crate) fn sc_fence() {}
