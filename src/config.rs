//! What a cache is made with.

use crate::error::Error;
use crate::sys::mem::{pages_for, PAGE};

/// How missing pages are caught.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Mode {
    /// A process-wide background thread reads faults from a userfaultfd and rebuilds pages on a
    /// small worker pool. Handles faults taken inside the kernel too (a `write(2)` from an entry)
    /// when the fd is not user-mode-only.
    #[default]
    Monitor,
    /// No thread: a missing page raises SIGBUS in the thread that touched it (a userfaultfd with
    /// `UFFD_FEATURE_SIGBUS`), and lazyfree's SIGBUS handler rebuilds the chunk right there, on
    /// that thread, and returns; the access is then retried. No hand-off to another thread and
    /// nothing running in the background.
    ///
    /// The handler is installed when the first SIGBUS-mode cache is made and stays for the rest
    /// of the process, with the userfaultfd and the slabs it serves (a handler cannot be taken
    /// out safely once another one may have chained to it). A SIGBUS that is not about
    /// lazyfree's memory goes to the handler that was there before: Rust's own, or the default
    /// action, so the process ends exactly as it would have without lazyfree. If that handler
    /// replaces itself while handling it (Rust's std resets SIGBUS to the default action on a
    /// SIGBUS that is not a stack overflow), the replacement becomes the handler lazyfree
    /// chains to and lazyfree's handler is installed again. Caches of both modes can be used in
    /// one process.
    ///
    /// # The callback runs inside the interrupted code
    /// The regenerate callback runs in the signal handler, in the middle of whatever the
    /// thread was doing when it read the entry. So:
    /// - It must not take a lock that the program may hold while it reads cache memory (a
    ///   `Mutex` held while reading an entry, `stdout` while printing an entry's bytes): the
    ///   thread would wait for itself.
    /// - It may allocate (and panic, which allocates) only if the program never reads cache
    ///   memory from inside the allocator (say, a global allocator that keeps data in entries).
    ///   Ordinary programs never do.
    /// - It must not read the chunk it is rebuilding (for a fault or for a pin): the process
    ///   aborts with a message saying so (it would otherwise call itself forever); nor pin its
    ///   own entry (the pin returns
    ///   [`Error::RegenerateFailed`](crate::Error::RegenerateFailed)). It may read other
    ///   entries, of either mode; such nested rebuilds run on the same stack, at most 16 deep
    ///   (deeper aborts with a message). Two callbacks must not read each other's entries: each
    ///   would wait for the other's rebuild. A thread that touches a chunk another thread is
    ///   rebuilding waits in the handler until that rebuild ends (one rebuild per chunk).
    /// - It runs on the faulting thread's own stack, with the room that thread has left, not on
    ///   a small alternate signal stack: tens of KiB of locals are fine on threads with the
    ///   usual 2 MiB or 8 MiB stacks.
    /// - An error or a panic is handled by the [`FailurePolicy`]; a panic never unwinds out of
    ///   the handler. Under [`FailurePolicy::Poison`] the handler passes the SIGBUS on to the
    ///   previous action (by default the process dies of SIGBUS, as with a poisoned page in
    ///   monitor mode); the pages stay missing, so a later touch calls the callback again. This
    ///   needs no kernel poison support.
    /// - Threads that read cache memory must not block SIGBUS (the kernel then kills the
    ///   process).
    ///
    /// lazyfree itself neither allocates, frees nor takes locks in the handler: it finds the
    /// entry through lock-free lookup tables whose entries cannot be freed while it reads them
    /// (hazard pointers), takes its scratch buffer from a pool made in advance (lock-free), and
    /// saves and restores `errno`. Since it must not free memory there, the error a callback
    /// returns (or a panic's payload) is not dropped in the handler: it is kept and dropped at
    /// the next SIGBUS-mode `Cache::new` (past 1024 such values waiting, further ones are
    /// leaked). Its text goes into a buffer allocated in advance for
    /// [`Entry::last_error`](crate::Entry::last_error), cut at 512 bytes, kept in a 64-byte
    /// block the entry gets on its first pin or failure (one made in advance, where this
    /// failure is its first); 64 buffers and 64 blocks are topped up at each SIGBUS-mode
    /// `Cache::new`, and when either runs out the text is not kept (the failure is still
    /// counted, and [`Entry::is_failed`](crate::Entry::is_failed) says so).
    ///
    /// # Chunks
    /// The handler's scratch buffers are sized to the largest `fill_chunk` among the SIGBUS-mode
    /// caches made (`FillChunk::Entry` counts as 64 MiB). A chunk larger than the buffer at hand
    /// (an `Entry` chunk of a larger entry; the 16 KiB stack buffer a nested rebuild uses when
    /// every pooled buffer is taken) is regenerated in pieces: the callback is then called for
    /// page-aligned parts of the chunk (`offset` a multiple of 4096) covering the pages still
    /// missing. A callback that fills "the bytes at `offset`", whatever the offset, need not care.
    ///
    /// # System calls: pin first
    /// A page touched *inside the kernel* (a `write(2)` from an entry, a `read(2)` into one,
    /// O_DIRECT) raises no signal: if it was reclaimed, the system call fails with `EFAULT`
    /// (`std::io::Error` "Bad address", os error 14). [`Entry::pin`](crate::Entry::pin) the
    /// entry before handing its bytes to the kernel. `Stats::kernel_faults_handled` is false in
    /// this mode.
    ///
    /// Needs Linux 4.14 (`UFFD_FEATURE_SIGBUS`). The userfaultfd is opened with
    /// `UFFD_USER_MODE_ONLY` where the kernel has it (5.11), so no privilege is needed.
    ///
    /// ```
    /// use lazyfree::{testing, Cache, Config, Mode};
    ///
    /// let cache: Cache<u8> = Cache::new(Config::default().mode(Mode::Sigbus))?;
    /// let e = cache.insert(0, 65536, |off, buf: &mut [u8]| {
    ///     // Runs on the reading thread, in the signal handler.
    ///     for (i, b) in buf.iter_mut().enumerate() {
    ///         *b = ((off + i) >> 12) as u8; // the page's number
    ///     }
    ///     Ok::<(), lazyfree::RegenError>(())
    /// })?;
    /// testing::reclaim(&e);
    /// assert_eq!(e[5 * 4096], 5); // SIGBUS, rebuilt, read: no thread involved
    /// assert_eq!(cache.worker_threads(), 0);
    /// # Ok::<(), lazyfree::Error>(())
    /// ```
    Sigbus,
    /// No userfaultfd at all, for where it is denied (Docker's default seccomp profile, hardened
    /// kernels, `CONFIG_USERFAULTFD=n`). The memory is advised MADV_FREE while unpinned, as in
    /// the other modes, but nothing catches a touch of a dropped page, so **the bytes can only
    /// be read through a pin**: [`Entry::pin`](crate::Entry::pin) finds the pages the kernel
    /// dropped, one by one, and calls the regenerate callback for the chunks holding them,
    /// copying in only the lost pages.
    ///
    /// - [`Entry::as_slice`](crate::Entry::as_slice), `Deref` and `AsRef` panic with a message
    ///   naming `pin()`: unpinned bytes are not the entry's (each page's first word holds a
    ///   marker, and a dropped page reads as zeros). [`Entry::try_as_slice`](crate::Entry::try_as_slice)
    ///   returns `None` instead of panicking. Read through the [`Pinned`](crate::Pinned) guard.
    /// - A failed callback makes `pin` return [`Error::RegenerateFailed`]; nothing is ever
    ///   zero-filled or poisoned, so [`FailurePolicy`] does not apply. The entry is marked failed
    ///   until a pin succeeds.
    /// - How it detects lost pages: when the last pin ends, the first 8 bytes of every page are
    ///   saved aside and replaced by a non-zero marker, then the pages are advised MADV_FREE. A
    ///   pin compares-and-swaps each page's marker back to the saved word: the write cancels
    ///   the pending free of a page the kernel kept, and a page it dropped reads as zero, which
    ///   is not the marker. Costs 8 bytes per page aside and one atomic operation per page per
    ///   pin and unpin.
    /// - A callback must not pin the entry it rebuilds (the pin fails with
    ///   [`Error::RegenerateFailed`] instead of waiting for itself); it may pin other entries,
    ///   as long as no two callbacks pin each other's entries (they would wait for each other).
    /// - The first pin of a lazy entry ([`Cache::insert`](crate::Cache::insert)) rebuilds all
    ///   of it. Pins of one entry are serialized while it is rebuilt.
    /// - Only [`Cache`](crate::Cache) supports it; `VolatileArena` needs a userfaultfd.
    ///
    /// [`Error::RegenerateFailed`]: crate::Error::RegenerateFailed
    Explicit,
    /// [`Mode::Monitor`] if a userfaultfd can be had, else [`Mode::Explicit`]; `Stats::mode`
    /// says which, and `Stats::fallback_reason` why (the fallback is also logged once to
    /// stderr). Code written for `Auto` must follow the explicit mode's rule: read through
    /// [`Entry::pin`](crate::Entry::pin) (or [`Entry::try_as_slice`](crate::Entry::try_as_slice)
    /// with a pin as the fallback).
    ///
    /// The environment variable `LAZYFREE_MODE` decides for `Auto` caches only: `explicit`
    /// forces the explicit mode, `monitor` the monitor mode (failing where there is no
    /// userfaultfd), `auto` or unset probes; any other value is an
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig). A mode set in the `Config`
    /// (anything but `Auto`) always wins over the variable: code that reads through `Deref` is
    /// never switched to explicit mode behind its back.
    ///
    /// `VolatileArena` has no explicit mode: there `Auto` is `Monitor`, and fails without a
    /// userfaultfd.
    Auto,
}

/// The unit handed to the regenerate callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillChunk {
    /// One page (4 KiB) at a time: the least work per fault, the most faults.
    Page,
    /// This many bytes, rounded up to whole pages (the default is 64 KiB).
    Bytes(usize),
    /// The whole entry at once.
    Entry,
}

impl Default for FillChunk {
    fn default() -> Self {
        FillChunk::Bytes(64 * 1024)
    }
}

impl FillChunk {
    /// Pages per chunk for an entry of `entry_pages` pages.
    pub(crate) fn pages(self, entry_pages: usize) -> usize {
        match self {
            FillChunk::Page => 1,
            FillChunk::Bytes(n) => pages_for(n).max(1),
            FillChunk::Entry => entry_pages.max(1),
        }
        .min(entry_pages.max(1))
    }
}

/// What a fault gets when the regenerate callback fails (returns `Err` or panics). The failure
/// is kept per fill chunk until that chunk is rebuilt; [`Entry::pin`](crate::Entry::pin)
/// rebuilds failed chunks or returns [`Error::RegenerateFailed`](crate::Error::RegenerateFailed).
///
/// ```
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use std::sync::Arc;
/// use lazyfree::{Cache, Config, FailurePolicy};
///
/// let cache: Cache<u8> = Cache::new(Config::default().on_failure(FailurePolicy::Zero))?;
/// let broken = Arc::new(AtomicBool::new(true));
/// let b = broken.clone();
/// let e = cache.insert(0, 4096, move |_, buf: &mut [u8]| {
///     if b.load(Ordering::SeqCst) {
///         return Err("the source file is gone".into());
///     }
///     buf.fill(9);
///     Ok::<(), lazyfree::RegenError>(())
/// })?;
/// assert_eq!(e[0], 0); // zeros, and the entry says so:
/// assert!(e.is_failed());
/// assert_eq!(e.last_error().as_deref(), Some("the source file is gone"));
/// broken.store(false, Ordering::SeqCst);
/// assert_eq!(e.pin()?[0], 9); // a pin rebuilds the failed chunk
/// assert!(!e.is_failed());
/// # Ok::<(), lazyfree::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// The missing pages are poisoned (`UFFDIO_POISON`): the access raises SIGBUS, which ends a
    /// program that does not handle it. Loud, and nobody computes on bytes that are not the
    /// entry's. Falls back to [`FailurePolicy::Zero`] where the kernel has no poison support
    /// (before 6.6); `Stats::poison_supported` tells. The default.
    #[default]
    Poison,
    /// The missing pages read as zeros and the entry is marked failed (`Entry::is_failed`,
    /// `Stats::failed_entries`). The program goes on and must check.
    Zero,
}

/// Configuration of a [`crate::Cache`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// How missing pages are caught (default: [`Mode::Monitor`]).
    pub mode: Mode,
    /// How much is rebuilt around a missing page (default: 64 KiB).
    pub fill_chunk: FillChunk,
    /// What a failed rebuild does (default: [`FailurePolicy::Poison`]).
    pub on_failure: FailurePolicy,
    /// Byte budget: inserting past it evicts the least recently used unpinned entries.
    /// Entries are counted by their page-rounded size. `None`: no budget.
    pub budget: Option<usize>,
    /// How long the pages of an entry stay resident and non-volatile after its last unpin, in
    /// monitor mode (default: 10 ms; at most 1 s; zero: volatile at once). A pin within the
    /// delay finds them as the last pin left them and costs almost nothing; after it the
    /// monitor advises them MADV_FREE (within about 10 ms of the delay's end). SIGBUS and
    /// explicit modes have no thread to do it later: their unpins advise at once.
    pub unpin_delay: std::time::Duration,
    /// Fill ahead, in monitor mode: after two faults on consecutive chunks of an entry, the
    /// worker that serves the second fills the chunks that follow too, as the kernel's
    /// readahead does: 1 chunk, then 2, 4, ... up to this many bytes while the pattern holds,
    /// never past the entry's end, and then wakes the faulting thread (which would otherwise
    /// fault on each chunk as it is being filled). A fault elsewhere starts over, so random
    /// access gets none. A chunk filled ahead whose callback fails is left missing (its own
    /// fault retries it). A fault's thread waits for the fills ahead for 2 ms at most (a slow
    /// callback ahead holds up only its own chunk), and workers fill ahead only while fewer
    /// than half of the monitor's 64 workers are busy, so callbacks ahead that never return
    /// cannot take the workers the program's own faults need. Default: 512 KiB; 0: off; at
    /// most 64 MiB. SIGBUS mode does not fill ahead (the handler runs in the faulting thread).
    pub read_ahead: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Monitor,
            fill_chunk: FillChunk::default(),
            on_failure: FailurePolicy::default(),
            budget: None,
            unpin_delay: std::time::Duration::from_millis(10),
            read_ahead: 512 << 10,
        }
    }
}

impl Config {
    /// Sets [`mode`](Config::mode).
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }
    /// Sets [`fill_chunk`](Config::fill_chunk).
    pub fn fill_chunk(mut self, chunk: FillChunk) -> Self {
        self.fill_chunk = chunk;
        self
    }
    /// Sets [`on_failure`](Config::on_failure).
    pub fn on_failure(mut self, policy: FailurePolicy) -> Self {
        self.on_failure = policy;
        self
    }
    /// Sets [`budget`](Config::budget).
    pub fn budget(mut self, bytes: Option<usize>) -> Self {
        self.budget = bytes;
        self
    }
    /// Sets [`read_ahead`](Config::read_ahead).
    pub fn read_ahead(mut self, bytes: usize) -> Self {
        self.read_ahead = bytes;
        self
    }
    /// Sets [`unpin_delay`](Config::unpin_delay).
    pub fn unpin_delay(mut self, delay: std::time::Duration) -> Self {
        self.unpin_delay = delay;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        if let FillChunk::Bytes(n) = self.fill_chunk {
            if n == 0 || n > MAX_CHUNK {
                return Err(Error::InvalidConfig(format!(
                    "fill_chunk Bytes({n}): use 1 byte .. {} MiB (it is rounded up to 4 KiB pages)",
                    MAX_CHUNK >> 20
                )));
            }
        }
        if self.read_ahead > MAX_READ_AHEAD {
            return Err(Error::InvalidConfig(format!(
                "read_ahead of {} bytes is over the 64 MiB limit",
                self.read_ahead
            )));
        }
        if self.unpin_delay > MAX_UNPIN_DELAY {
            return Err(Error::InvalidConfig(format!(
                "unpin_delay of {:?} is longer than the 1 s limit: unpinned bytes that the \
                 kernel cannot take back for longer defeat volatile memory",
                self.unpin_delay
            )));
        }
        if let Some(b) = self.budget {
            if b < PAGE {
                return Err(Error::InvalidConfig(format!(
                    "budget of {b} bytes is smaller than one page (4096 bytes)"
                )));
            }
        }
        Ok(())
    }
}

/// Largest [`Config::read_ahead`].
pub(crate) const MAX_READ_AHEAD: usize = 64 << 20;

/// Longest [`Config::unpin_delay`].
pub(crate) const MAX_UNPIN_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// Largest explicit fill chunk.
pub(crate) const MAX_CHUNK: usize = 256 << 20;
