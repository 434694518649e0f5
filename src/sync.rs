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
