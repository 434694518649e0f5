//! The test hook: points in the fill, pin and eviction paths where a test can inject a delay
//! between two steps (re-exported by `testing`). A leaf: the fault paths and the cache's map call
//! `step` and import nothing else from the test helpers.

/// Points in lazyfree's fill, pin and eviction paths, and in the cache map's gets and writes,
/// where a test can inject a delay (or move the thread to another CPU) to make an interleaving
/// of two operations deterministic. See [`set_step_hook`].
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A fault path (or a pin) claimed a chunk and is about to call the regenerate callback.
    FillClaimed,
    /// The callback returned successfully; the chunk's missing pages are about to be installed.
    FillRegenerated,
    /// The pages were installed (UFFDIO_COPY); they are about to be advised MADV_FREE.
    FillInstalled,
    /// The callback failed: the chunk is marked failed, the message kept, and the failure
    /// policy applied (zero pages installed, poisoned, protected, or left missing to raise
    /// SIGBUS); the chunk is about to be released and its waiters woken. Zero pages are
    /// readable from here without a fault.
    FailureApplied,
    /// The first pin of a region closed it to re-advice and is about to make its pages resident.
    PinStarted,
    /// A cache's eviction (an insert making room under its budget) chose its victim, the least
    /// recently used evictable entry, and released the shard's lock; it is about to take the
    /// lock again to check that the victim is still there, not used since and not pinned, and
    /// to remove it.
    EvictChosen,
    /// The eviction checked its victim under the shard's write lock (still there, not used since,
    /// not pinned) and is about to remove it from the map. The lock is held during the hook.
    EvictChecked,
    /// The monitor's reader (or the watcher standing in for it) is about to take the regions that
    /// started lingering since its last round from its inbox and end those whose unpin delay is
    /// over (the address is 0). While the hook holds it, new lingering regions fill the inbox,
    /// and unpins past its capacity make their pages volatile at once.
    LingerRound,
    /// The monitor's reader served a fault itself and has just marked itself no longer serving
    /// (the address is the faulting page): the watcher stops standing in for it (after the
    /// read it may be in), and until the reader goes on only a spinning worker reads the
    /// userfaultfd.
    ReaderServed,
    /// A pin found its region without its side block (the pin state and failure message:
    /// never pinned, never failed before), made one, and is about to publish it
    /// (compare-and-swap: one that lost the race drops its own and uses the winner's). The
    /// address is the region's base. Reached by pins (and by explicit mode's initial bytes, and
    /// failures recorded outside the SIGBUS handler), never in a signal handler.
    PinStateMade,
    /// A cache's get counted itself in as a reader of a shard of the map, found no writer there
    /// and is about to read the shard's table (the address is the shard's index): writers of
    /// that shard wait until it leaves (`cache/readers.rs`). A hook that writes that shard from
    /// here (an insert or remove of the cache) waits for itself.
    MapReading,
    /// A writer of a shard of a cache's map (an insert, a remove, an eviction) holds the shard's
    /// lock and raised its flag, and is about to wait for the readers inside (the address is
    /// the shard's index).
    MapClosing,
    /// A process claimed a chunk of a [`SharedCache`](crate::SharedCache) (it is now filling in
    /// every process's eyes) and is about to call the regenerate callback. The address is the
    /// chunk in this process.
    SharedFillClaimed,
    /// A purge of a shared cache moved a chunk from present (or failed) to punching and is about
    /// to check its entry's pins, then punch it (or, if pinned, put it back). The address is the
    /// chunk in this process.
    SharedPunchClaimed,
    /// A pin of a shared entry set this process's bit in the entry's pin mask and is about to
    /// read its chunks' states. The address is the entry's first byte.
    SharedPinMarked,
}

static STEP_HOOK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Installs (or, with `None`, removes) a process-wide hook that lazyfree calls at each [`Step`]
/// with the address of the chunk concerned (the region's base for [`Step::PinStarted`] and
/// [`Step::PinStateMade`], the victim entry's bytes for [`Step::EvictChosen`] and
/// [`Step::EvictChecked`], the shard's index for [`Step::MapReading`] and [`Step::MapClosing`],
/// 0 for [`Step::LingerRound`]).
///
/// For tests only: it runs on whatever thread takes the step, in SIGBUS mode inside the signal
/// handler, so it may sleep or change the thread's CPU affinity but must not allocate, lock or
/// touch cache memory. Costs one atomic load per step when unset.
pub fn set_step_hook(hook: Option<fn(Step, usize)>) {
    STEP_HOOK.store(
        hook.map_or(0, |f| f as usize),
        std::sync::atomic::Ordering::SeqCst,
    );
}

/// Calls the step hook, if one is set. Called by the fill, pin and eviction paths.
#[inline]
pub(crate) fn step(s: Step, addr: usize) {
    let h = STEP_HOOK.load(std::sync::atomic::Ordering::Relaxed);
    if h != 0 {
        // SAFETY: only `set_step_hook` stores non-zero values, each a `fn(Step, usize)`.
        let f: fn(Step, usize) = unsafe { std::mem::transmute::<usize, fn(Step, usize)>(h) };
        f(s, addr);
    }
}
