//! Reader counts that readers write on cache lines of their own: the fast path of a cache's
//! gets. A pure protocol over `crate::sync` (`tests/loom.rs` checks it with loom).
//!
//! Through a read-write lock, every get writes its shard's lock word (two atomic
//! read-modify-writes), so threads getting random keys move the shards' lock lines between
//! their CPUs at most gets. Here a reader counts itself in its thread's slot (threads are given
//! slots round-robin; a slot's counts for every shard lie together, written only by the threads
//! of that slot) and checks the shard's writer flag, which only writers write:
//!
//! - **reader**: `count += 1` (SeqCst), load the flag (SeqCst); if it is up, `count -= 1` and
//!   take the slow path (the shard's lock for reading, which waits for the writer); else read,
//!   then `count -= 1` (Release).
//! - **writer** (holding the shard's lock for writing: one writer at a time, no slow reader):
//!   raise the flag (SeqCst), wait until the shard's count in every slot is 0 (SeqCst loads),
//!   write, lower the flag (Release; on drop of its guard, so also if it panics).
//!
//! States of a shard: **open** (flag down: readers come and go); **draining** (flag up, some
//! count above 0: no reader starts reading, one that counted itself before seeing the flag
//! leaves at once, readers already reading finish); **closed** (flag up, every count 0: the
//! writer alone touches the shard). Transitions: open → draining (a writer raises the flag),
//! draining → closed (the last reader inside leaves), closed → open (the writer lowers it).
//!
//! Why no reader reads while a writer writes: the reader's increment and flag load and the
//! writer's flag store and count loads are SeqCst, in one total order: either the increment
//! comes first (the writer's loads see it and it waits) or the flag store does (the reader's
//! load sees it and the reader leaves). loom models SeqCst accesses as acquire/release only, so
//! for its model `crate::sync::sc_fence` (nothing here) is a SeqCst fence between the two
//! accesses of each side, which gives the same order. A reader that finds the flag lowered by a writer (Release,
//! read with SeqCst) sees what that writer wrote; a writer that finds a count at 0 sees every
//! read before the decrements finished (each decrement is Release, and the increments and
//! decrements of one count continue its release sequence).
//!
//! A forked child: counts of parent threads that were reading at the fork never drop there, so
//! a writer there would wait forever: the cache writes nothing to its map in a forked child
//! (`Cache::remove` returns `None` there; inserts are refused before they reach the map).
//!
//! A writer waits by `crate::sync::backoff` (yields, then 1 ms sleeps) holding the shard's lock:
//! readers inside take a table probe and a clone, so the wait is short unless a reader is
//! preempted inside, and gets of that shard then wait on the lock as long.

use crate::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// Counts per cache line.
const LANES: usize = 16;

/// One cache line of counts, written by the threads of one slot only.
#[repr(align(64))]
struct Line([AtomicU32; LANES]);

/// The reader counts of every shard of one map, per slot.
pub(crate) struct Readers {
    lines: Box<[Line]>,
    /// Lines per slot.
    per_slot: usize,
    slots: usize,
}

/// A reader counted in: reading the shard is safe until this drops.
pub(crate) struct Reading<'a>(&'a AtomicU32);

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

impl Readers {
    /// Counts for `shards` shards in `slots` slots (rounded up to a power of two).
    pub(crate) fn new(shards: usize, slots: usize) -> Readers {
        let slots = slots.max(1).next_power_of_two();
        let per_slot = shards.div_ceil(LANES);
        let lines = (0..per_slot * slots)
            .map(|_| Line(std::array::from_fn(|_| AtomicU32::new(0))))
            .collect();
        Readers {
            lines,
            per_slot,
            slots,
        }
    }

    fn count(&self, shard: usize, slot: usize) -> &AtomicU32 {
        let line = &self.lines[(slot & (self.slots - 1)) * self.per_slot + shard / LANES];
        &line.0[shard % LANES]
    }

    /// Counts the caller (of `slot`) in as a reader of `shard`, whose writer flag is `flag`;
    /// `None` if a writer is there (the caller takes the slow path).
    pub(crate) fn enter<'a>(
        &'a self,
        shard: usize,
        slot: usize,
        flag: &AtomicBool,
    ) -> Option<Reading<'a>> {
        let c = self.count(shard, slot);
        // Must stay SeqCst, as must the flag load below and the writer's store and loads: the
        // argument above rests on their one order, which loom cannot check (it models them
        // as acquire/release and is given fences instead).
        c.fetch_add(1, Ordering::SeqCst);
        let reading = Reading(c);
        crate::sync::sc_fence();
        if flag.load(Ordering::SeqCst) {
            return None; // `reading` drops: counted out again
        }
        Some(reading)
    }

    /// Raises `flag` for `shard`, calls `closing` (the test hook's step) and waits until no
    /// reader is inside. The caller holds the shard's lock for writing and lowers the flag when
    /// it is done ([`lower`](Readers::lower)).
    pub(crate) fn close(&self, shard: usize, flag: &AtomicBool, closing: impl Fn()) {
        // SeqCst, as the loads below: see `enter`.
        flag.store(true, Ordering::SeqCst);
        crate::sync::sc_fence();
        closing();
        for slot in 0..self.slots {
            let c = self.count(shard, slot);
            let mut spins = 0;
            while c.load(Ordering::SeqCst) != 0 {
                crate::sync::backoff(&mut spins);
            }
        }
    }

    /// Opens the shard to readers again after a writer's [`close`](Readers::close).
    pub(crate) fn lower(flag: &AtomicBool) {
        flag.store(false, Ordering::Release);
    }
}
