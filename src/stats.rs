//! Counters kept by the fault paths (atomics only: the SIGBUS handler updates them too).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the regenerate latency histogram buckets; the last bucket is open-ended.
pub const LATENCY_BUCKETS_US: [u64; 7] = [10, 100, 1_000, 10_000, 100_000, 1_000_000, u64::MAX];

#[derive(Default, Debug)]
pub(crate) struct Counters {
    pub faults: AtomicU64,
    pub pages_regenerated: AtomicU64,
    /// Pages rebuilt that had held the entry's bytes before: the kernel had taken them back.
    pub pages_reclaimed: AtomicU64,
    /// Of `pages_regenerated`, pages filled ahead of sequential faults (`Config::read_ahead`).
    pub pages_read_ahead: AtomicU64,
    pub regen_calls: AtomicU64,
    pub regen_failures: AtomicU64,
    pub regen_nanos: AtomicU64,
    pub hist: [AtomicU64; 7],
    pub evictions: AtomicU64,
}

impl Counters {
    /// A fill installed `pages`, of which `reclaimed` had held the entry's bytes before.
    pub(crate) fn record_fill(&self, pages: usize, reclaimed: usize) {
        self.pages_regenerated.fetch_add(pages as u64, Relaxed);
        self.pages_reclaimed.fetch_add(reclaimed as u64, Relaxed);
    }

    pub(crate) fn record_regen(&self, nanos: u64) {
        self.regen_calls.fetch_add(1, Relaxed);
        self.regen_nanos.fetch_add(nanos, Relaxed);
        let us = nanos / 1000;
        let b = LATENCY_BUCKETS_US
            .iter()
            .position(|&lim| us < lim)
            .unwrap_or(LATENCY_BUCKETS_US.len() - 1);
        self.hist[b].fetch_add(1, Relaxed);
    }
}

/// A snapshot of a cache's state and counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Entries in the cache (removed entries still held by a handle are not counted).
    pub entries: usize,
    /// Their bytes, as inserted.
    pub bytes: usize,
    /// Their bytes present in memory now (mincore), in whole pages: the sum of the next two.
    pub resident_bytes: usize,
    /// Of those, bytes of pinned entries (a first pin under way included), and of entries
    /// unpinned within their [`unpin_delay`](crate::Config::unpin_delay): memory the kernel
    /// cannot take back now.
    pub resident_pinned_bytes: usize,
    /// Of those, bytes of unpinned entries: volatile, reclaimable at once under pressure, so
    /// memory a program can report as given back on demand.
    pub resident_volatile_bytes: usize,
    /// Entries pinned now, or whose first pin is under way.
    pub pinned_entries: usize,
    /// Entries whose last regeneration failed.
    pub failed_entries: usize,
    /// Missing-page faults served for this cache's entries.
    pub faults_handled: u64,
    /// Pages installed by regeneration.
    pub pages_regenerated: u64,
    /// Of those, pages that had held the entry's bytes before: the kernel took them back and a
    /// touch (or pin) rebuilt them. Pages taken back and never touched again are not counted
    /// (nothing sees them go).
    pub pages_reclaimed: u64,
    /// Of `pages_regenerated`, pages filled ahead of sequential faults, before anything
    /// touched them ([`Config::read_ahead`](crate::Config::read_ahead)).
    pub pages_read_ahead: u64,
    /// Calls of regenerate callbacks.
    pub regenerate_calls: u64,
    /// Calls that returned an error or panicked.
    pub regenerate_failures: u64,
    /// Time spent inside regenerate callbacks.
    pub regenerate_time: Duration,
    /// Callback latency histogram; bucket `i` counts calls under `LATENCY_BUCKETS_US[i]` µs.
    pub regenerate_latency: [u64; 7],
    /// Entries evicted by the byte budget.
    pub evictions: u64,
    /// How the userfaultfd was obtained: `"userfaultfd(2)"`, `"/dev/userfaultfd"`,
    /// `"userfaultfd(UFFD_USER_MODE_ONLY)"`, or `"none (explicit mode)"`.
    pub uffd_kind: &'static str,
    /// Whether faults taken inside the kernel (a `write(2)` from an entry) are served; if not,
    /// such syscalls fail with EFAULT on a reclaimed page and you must `pin()` first. False in
    /// explicit mode, where every read, system calls included, needs a pin.
    pub kernel_faults_handled: bool,
    /// Whether `FailurePolicy::Poison` makes an access to a failed page fault loudly here: SIGBUS
    /// with the kernel's `UFFDIO_POISON` (Linux 6.6) and in SIGBUS mode; before 6.6 the monitor
    /// makes the failed pages inaccessible instead (SIGSEGV; `EFAULT` for system calls). False
    /// only in explicit mode, where a pin returns the error.
    pub poison_supported: bool,
    /// Address space reserved by the slabs of this cache's mode (shared by its caches): virtual,
    /// not memory in use.
    pub slab_bytes: usize,
    /// The mode the cache runs in: the one configured, or for `Mode::Auto` the one chosen
    /// (`Monitor` or `Explicit`).
    pub mode: crate::config::Mode,
    /// Why a `Mode::Auto` cache runs in explicit mode (the userfaultfd error, or
    /// `LAZYFREE_MODE=explicit`); `None` otherwise.
    pub fallback_reason: Option<String>,
}

impl Stats {
    pub(crate) fn fill_counters(&mut self, c: &Counters) {
        self.faults_handled = c.faults.load(Relaxed);
        self.pages_regenerated = c.pages_regenerated.load(Relaxed);
        self.pages_reclaimed = c.pages_reclaimed.load(Relaxed);
        self.pages_read_ahead = c.pages_read_ahead.load(Relaxed);
        self.regenerate_calls = c.regen_calls.load(Relaxed);
        self.regenerate_failures = c.regen_failures.load(Relaxed);
        self.regenerate_time = Duration::from_nanos(c.regen_nanos.load(Relaxed));
        for (o, h) in self.regenerate_latency.iter_mut().zip(c.hist.iter()) {
            *o = h.load(Relaxed);
        }
        self.evictions = c.evictions.load(Relaxed);
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "entries {} ({} bytes, {} resident: {} pinned, {} volatile), pinned {}, failed {}, \
             faults {}, pages rebuilt {} ({} taken back by the kernel, {} read ahead), regenerate \
             calls {} ({} \
             failed, {:?} total), evictions {}, uffd {}",
            self.entries,
            self.bytes,
            self.resident_bytes,
            self.resident_pinned_bytes,
            self.resident_volatile_bytes,
            self.pinned_entries,
            self.failed_entries,
            self.faults_handled,
            self.pages_regenerated,
            self.pages_reclaimed,
            self.pages_read_ahead,
            self.regenerate_calls,
            self.regenerate_failures,
            self.regenerate_time,
            self.evictions,
            self.uffd_kind
        )
    }
}
