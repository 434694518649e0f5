//! The public cache: keyed volatile entries.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::ops::Deref;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::config::Config;
use crate::error::Error;
use crate::handle::RegionHandle;
use crate::mode::{Reads, Runtime};
use crate::region::{check_len, RegenError, Region, RegionSpec};
use crate::stats::{Counters, Stats};
use crate::sys::mem::{self, PAGE};
use crate::sys::uffd::UffdKind;

/// A handle to volatile bytes. Cheap to clone; the bytes stay valid until the last clone drops,
/// even after the entry is removed from its cache.
///
/// Reading (`Deref<Target = [u8]>`, `as_slice`) is transparent: a page the kernel dropped is
/// rebuilt by the regenerate callback before the read completes. The bytes are read-only; to
/// write, or to hand them to a syscall, [`pin`](Entry::pin) them.
///
/// In [`Mode::Explicit`](crate::Mode::Explicit) (and `Mode::Auto` where it falls back to it)
/// nothing rebuilds a page on touch: read through [`pin`](Entry::pin) only. `as_slice`,
/// `Deref` and `AsRef` then panic with a message saying so, and
/// [`try_as_slice`](Entry::try_as_slice) gives `None`.
#[derive(Clone)]
pub struct Entry {
    handle: Arc<RegionHandle>,
}

impl Entry {
    pub(crate) fn region(&self) -> &Region {
        self.handle.region()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.region().len()
    }

    /// Always false: entries hold at least one byte.
    pub fn is_empty(&self) -> bool {
        self.region().len() == 0
    }

    /// The bytes; lost pages are rebuilt on touch.
    ///
    /// # Panics
    /// In explicit mode, where unpinned bytes are not the entry's: use [`pin`](Entry::pin).
    pub fn as_slice(&self) -> &[u8] {
        if !self.handle.readable() {
            panic!(
                "lazyfree: this entry is in explicit mode (no userfaultfd): read its bytes \
                 through Entry::pin(), not Deref/as_slice (Entry::try_as_slice() returns None \
                 here instead of panicking)"
            );
        }
        self.bytes()
    }

    /// Calls `f` with the entry's bytes, in every mode: directly where reads are transparent
    /// (monitor and SIGBUS modes), through a pin held for the call in explicit mode. The one
    /// way to read that code for [`Mode::Auto`](crate::Mode::Auto) should use: it never
    /// branches on the mode. Fails only where a pin would ([`Error::RegenerateFailed`] in
    /// explicit mode; [`Error::ForkedChild`]).
    ///
    /// Use [`pin`](Entry::pin) instead to hand the bytes to a system call or to write them, and
    /// `Deref` where the mode is known to be monitor or SIGBUS.
    ///
    /// ```
    /// use lazyfree::{Cache, Config, Mode};
    ///
    /// for mode in [Mode::Monitor, Mode::Sigbus, Mode::Explicit] {
    ///     let cache: Cache<u8> = Cache::new(Config::default().mode(mode))?;
    ///     let e = cache.insert(0, 10_000, |off, buf: &mut [u8]| {
    ///         buf.iter_mut().enumerate().for_each(|(i, b)| *b = ((off + i) % 7) as u8);
    ///         Ok::<(), lazyfree::RegenError>(())
    ///     })?;
    ///     let sum: u64 = e.read(|bytes| bytes.iter().map(|&b| b as u64).sum())?;
    ///     assert_eq!(sum, (0..10_000u64).map(|i| i % 7).sum::<u64>());
    /// }
    /// # Ok::<(), lazyfree::Error>(())
    /// ```
    pub fn read<R>(&self, f: impl FnOnce(&[u8]) -> R) -> Result<R, Error> {
        self.handle.check_owner()?;
        match self.try_as_slice() {
            Some(bytes) => Ok(f(bytes)),
            None => {
                let pinned = self.pin()?;
                Ok(f(&pinned))
            }
        }
    }

    /// The bytes, where reading them needs no pin (the userfaultfd modes); `None` in explicit
    /// mode, where only [`pin`](Entry::pin) reads them.
    pub fn try_as_slice(&self) -> Option<&[u8]> {
        if !self.handle.readable() {
            return None;
        }
        Some(self.bytes())
    }

    /// The span as a slice, unchecked: callers make sure the bytes are the entry's (a pin, or
    /// a userfaultfd mode).
    fn bytes(&self) -> &[u8] {
        let r = self.region();
        // SAFETY: base..base+len is mapped for the region's lifetime (tied to &self), and its
        // bytes only change when a pin's holder writes (see `Pinned::as_mut_slice`).
        unsafe { std::slice::from_raw_parts(r.base() as *const u8, r.len()) }
    }

    /// Start of the bytes (page-aligned). In explicit mode the bytes behind it are the entry's
    /// only while it is pinned.
    pub fn as_ptr(&self) -> *const u8 {
        self.region().base() as *const u8
    }

    /// Makes every page resident and non-volatile until the guard drops; rebuilds lost pages
    /// first, from the calling thread. Pins nest. Fails with [`Error::RegenerateFailed`] if a
    /// rebuild fails (nothing is pinned then, and a later touch or pin retries); never raises
    /// SIGBUS.
    ///
    /// Pin before handing the bytes to a system call, or to write them:
    ///
    /// ```
    /// use lazyfree::{testing, Cache, Config};
    ///
    /// let cache: Cache<u32> = Cache::new(Config::default())?;
    /// let e = cache.insert(1, 8192, |off, buf: &mut [u8]| {
    ///     for (i, b) in buf.iter_mut().enumerate() {
    ///         *b = ((off + i) / 4096) as u8; // the page's number
    ///     }
    ///     Ok::<(), lazyfree::RegenError>(())
    /// })?;
    /// testing::reclaim(&e);
    /// let mut pinned = e.pin()?; // every page rebuilt and resident until `pinned` drops
    /// assert!(pinned[4096..].iter().all(|&b| b == 1));
    /// assert_eq!(testing::reclaim(&e), 0); // the kernel cannot take pinned pages
    /// // SAFETY: no other reference to the entry's bytes is in use.
    /// unsafe { pinned.as_mut_slice()[0] = 7 }; // kept while pinned
    /// assert_eq!(pinned[0], 7);
    /// # Ok::<(), lazyfree::Error>(())
    /// ```
    pub fn pin(&self) -> Result<Pinned<'_>, Error> {
        self.pin_unguarded()?;
        Ok(Pinned { entry: self })
    }

    /// Pins without a guard, for callers that cannot hold a [`Pinned`] borrow (the C ABI): like
    /// [`pin`](Entry::pin), but the pin lasts until a matching
    /// [`unpin_unguarded`](Entry::unpin_unguarded). Pins are counted per entry (shared by its
    /// clones) and nest with guarded pins.
    pub fn pin_unguarded(&self) -> Result<(), Error> {
        self.handle.pin()
    }

    /// Ends one pin; false if the entry was not pinned.
    fn unpin(&self) -> bool {
        self.handle.unpin()
    }

    /// Ends one pin taken with [`pin_unguarded`](Entry::pin_unguarded); the last pin to end
    /// makes the bytes volatile again. Returns [`Error::NotPinned`] if the entry is not pinned.
    ///
    /// Pair each call with a `pin_unguarded` you made: ending a pin that a [`Pinned`] guard holds
    /// makes the bytes volatile while the guard is alive. Not undefined behaviour, but a bug.
    pub fn unpin_unguarded(&self) -> Result<(), Error> {
        self.handle.check_owner()?;
        if self.unpin() {
            Ok(())
        } else {
            Err(Error::NotPinned)
        }
    }

    /// Whether the last regeneration of this entry failed (its missing pages then read as zeros
    /// under `FailurePolicy::Zero`). A later successful regeneration clears it; `pin` retries.
    pub fn is_failed(&self) -> bool {
        self.region().is_failed()
    }

    /// The message of the last failed regeneration, if any.
    pub fn last_error(&self) -> Option<String> {
        self.region().last_error()
    }

    /// `Err(Error::ForkedChild)` if this process is a fork of the one whose cache made the
    /// entry: nothing of it is mapped here and its userfaultfd acts on the parent, so every
    /// operation that would touch, advise or fill its memory gives that error.
    pub fn check_process(&self) -> Result<(), Error> {
        self.handle.check_owner()
    }

    /// Whether it is pinned now.
    pub fn is_pinned(&self) -> bool {
        self.region().is_pinned()
    }

    /// Pages of it present in memory now.
    pub fn resident_pages(&self) -> usize {
        let r = self.region();
        mem::resident_pages(r.base(), r.pages())
    }
}

impl Deref for Entry {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsRef<[u8]> for Entry {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("addr", &self.as_ptr())
            .field("len", &self.len())
            .field("pinned", &self.is_pinned())
            .field("failed", &self.is_failed())
            .finish()
    }
}

/// A pin: the entry's pages are resident and will not be dropped until this guard drops, when
/// they become volatile again (MADV_FREE).
pub struct Pinned<'a> {
    entry: &'a Entry,
}

impl Pinned<'_> {
    /// The bytes, mutable.
    ///
    /// Bytes written here are kept only while pinned: once unpinned, a page the kernel drops is
    /// rebuilt by the regenerate callback, so write only what the callback reproduces, or keep it
    /// pinned.
    ///
    /// # Safety
    /// No other reference to this entry's bytes (from any clone of the entry, on any thread) may
    /// be used while the returned slice is alive: Rust's aliasing rules apply to the entry's bytes
    /// like to any memory.
    pub unsafe fn as_mut_slice(&mut self) -> &mut [u8] {
        let r = self.entry.region();
        // SAFETY: mapped and resident while pinned; exclusive by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(r.base() as *mut u8, r.len()) }
    }
}

impl Deref for Pinned<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // Pinned: the bytes are the entry's in every mode.
        self.entry.bytes()
    }
}

impl std::fmt::Debug for Pinned<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pinned").field("entry", self.entry).finish()
    }
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        let was_pinned = self.entry.unpin();
        // (In a forked child nothing is unpinned: the memory is the parent's.)
        debug_assert!(
            was_pinned || self.entry.handle.check_owner().is_err(),
            "a guard's pin was ended by unpin_unguarded"
        );
    }
}

struct Slot {
    entry: Entry,
    stamp: u64,
}

struct Map<K> {
    entries: HashMap<K, Slot>,
    lru: BTreeMap<u64, K>,
    clock: u64,
    /// Page-rounded bytes of the entries, for the budget.
    charged: usize,
}

/// A cache of volatile entries keyed by `K`.
///
/// `Cache` is `Send + Sync`; all methods take `&self`.
///
/// # fork
/// Cache memory is advised MADV_DONTFORK: a process forked from the one holding caches has no
/// mapping there (otherwise it would read the parent's dropped pages as silent zeros, since the
/// userfaultfd serves the parent only). In the child:
/// - every operation that would act on the inherited memory returns [`Error::ForkedChild`]
///   and does nothing: [`Cache::insert`], [`Cache::insert_with`], [`Entry::pin`],
///   [`Entry::pin_unguarded`], [`Entry::unpin_unguarded`], and `VolatileArena`'s methods
///   (`alloc` gives null). The userfaultfd is the parent's, and its ioctls would act on the
///   parent's memory: lazyfree refuses them in the child at the lowest level too.
///   [`Cache::check_process`] and [`Entry::check_process`] tell;
/// - reading an entry's bytes directly (`Deref`, `as_slice`, a pointer from
///   [`Entry::as_ptr`], or `lf_entry_data()` through the C ABI) ends the child with SIGSEGV: a
///   clean crash, never wrong bytes. Pinned entries are no exception;
/// - [`Cache::new`] (and `VolatileArena::new`) of a mode whose runtime the parent started
///   returns [`Error::ForkedChild`];
/// - dropping its copies of caches and entries is safe and does nothing: it neither waits for
///   the parent's threads nor stops them, and unmaps nothing;
/// - everything else is as in any forked child of a multi-threaded program: call only
///   async-signal-safe functions until `exec`. `fork` + `exec` (what `std::process::Command`
///   does) is unaffected: nothing of lazyfree's crosses `exec` (its descriptors are
///   close-on-exec).
///
/// The parent is not affected by the fork: its caches keep working.
pub struct Cache<K> {
    rt: Arc<Runtime>,
    config: Config,
    /// Why a `Mode::Auto` cache is in explicit mode.
    fallback_reason: Option<String>,
    counters: Arc<Counters>,
    map: Mutex<Map<K>>,
    /// Keys a `get_or_insert_with` is making an entry for now (single flight).
    flights: Mutex<HashMap<K, Arc<Flight>>>,
}

/// One `get_or_insert_with` making an entry; the others for its key wait for it to land.
#[derive(Default)]
struct Flight {
    landed: Mutex<bool>,
    cv: Condvar,
}

/// Lands the flight of `key` when dropped.
struct Landing<'a, K: Hash + Eq> {
    cache: &'a Cache<K>,
    key: &'a K,
}

impl<K: Hash + Eq> Drop for Landing<'_, K> {
    fn drop(&mut self) {
        let f = self
            .cache
            .flights
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(self.key);
        if let Some(f) = f {
            f.land();
        }
    }
}

impl Flight {
    fn wait(&self) {
        let mut landed = self.landed.lock().unwrap_or_else(|p| p.into_inner());
        while !*landed {
            landed = self.cv.wait(landed).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn land(&self) {
        *self.landed.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
    }
}

impl<K: Hash + Eq + Clone> Cache<K> {
    /// Makes a cache, starting the process-wide runtime for its mode if needed.
    pub fn new(config: Config) -> Result<Cache<K>, Error> {
        let (rt, fallback_reason) = Runtime::for_config(&config, Reads::Entry)?;
        Ok(Cache {
            rt,
            config,
            fallback_reason,
            counters: Arc::new(Counters::default()),
            map: Mutex::new(Map {
                entries: HashMap::new(),
                lru: BTreeMap::new(),
                clock: 0,
                charged: 0,
            }),
            flights: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Map<K>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The configuration it was made with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// `Err(Error::ForkedChild)` if this process is a fork of the one that made the cache (see
    /// "fork" above): inserts, pins and unpins then give that error.
    pub fn check_process(&self) -> Result<(), Error> {
        self.rt.arena().check_owner()
    }

    fn new_entry<F, E>(&self, len: usize, regen: F) -> Result<Entry, Error>
    where
        F: Fn(usize, &mut [u8]) -> Result<(), E> + Send + Sync + 'static,
        E: Into<RegenError>,
    {
        let spec = RegionSpec {
            len,
            chunk: self.config.fill_chunk,
            policy: self.config.on_failure,
            counters: self.counters.clone(),
            align_pages: 1,
        };
        let handle = RegionHandle::new(
            self.rt.clone(),
            spec,
            Box::new(move |off, buf| regen(off, buf).map_err(Into::into)),
        )?;
        Ok(Entry {
            handle: Arc::new(handle),
        })
    }

    /// Evicts least recently used unpinned entries until `needed` more bytes fit the budget.
    fn make_room(&self, map: &mut Map<K>, key: &K, needed: usize) -> Result<(), Error> {
        let Some(budget) = self.config.budget else {
            return Ok(());
        };
        let err = Error::OverBudget { needed, budget };
        if needed > budget {
            return Err(err);
        }
        let replaced = map
            .entries
            .get(key)
            .map_or(0, |s| s.entry.region().pages() * PAGE);
        let mut skip = Vec::new();
        while map.charged - replaced + needed > budget {
            let victim = map
                .lru
                .values()
                .find(|k| *k != key && !skip.contains(*k))
                .cloned();
            let Some(victim) = victim else {
                return Err(err);
            };
            if map.entries[&victim].entry.is_pinned() {
                skip.push(victim);
                continue;
            }
            Self::take(map, &victim);
            self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn take(map: &mut Map<K>, key: &K) -> Option<Entry> {
        let slot = map.entries.remove(key)?;
        map.lru.remove(&slot.stamp);
        map.charged -= slot.entry.region().pages() * PAGE;
        Some(slot.entry)
    }

    fn put(map: &mut Map<K>, key: K, entry: Entry) {
        Self::take(map, &key);
        map.clock += 1;
        let stamp = map.clock;
        map.charged += entry.region().pages() * PAGE;
        map.lru.insert(stamp, key.clone());
        map.entries.insert(key, Slot { entry, stamp });
    }

    fn check_len(len: usize) -> Result<usize, Error> {
        Ok(check_len(len)? * PAGE)
    }

    /// Inserts a lazy entry of `len` bytes: nothing is computed now; the first touch of each
    /// chunk calls `regen(offset, buf)` to fill `buf` with the bytes at `offset`.
    ///
    /// An existing entry under `key` is replaced (handles to it stay valid). If a budget is set,
    /// least recently used unpinned entries are evicted to make room.
    ///
    /// ```
    /// use lazyfree::{Cache, Config};
    ///
    /// let cache: Cache<&str> = Cache::new(Config::default())?;
    /// // The callback must produce the same bytes every time: here, a pattern of the offset.
    /// let tile = cache.insert("tile", 1 << 20, |off, buf: &mut [u8]| {
    ///     for (i, b) in buf.iter_mut().enumerate() {
    ///         *b = ((off + i) % 251) as u8;
    ///     }
    ///     Ok::<(), lazyfree::RegenError>(())
    /// })?;
    /// assert_eq!(tile[300_000], (300_000 % 251) as u8); // its chunk is built on this touch
    /// assert!(cache.get(&"tile").is_some());
    /// # Ok::<(), lazyfree::Error>(())
    /// ```
    pub fn insert<F, E>(&self, key: K, len: usize, regen: F) -> Result<Entry, Error>
    where
        F: Fn(usize, &mut [u8]) -> Result<(), E> + Send + Sync + 'static,
        E: Into<RegenError>,
    {
        let charge = Self::check_len(len)?;
        {
            let mut map = self.lock();
            self.make_room(&mut map, &key, charge)?;
        }
        let entry = self.new_entry(len, regen)?;
        let mut map = self.lock();
        self.make_room(&mut map, &key, charge)?;
        Self::put(&mut map, key, entry.clone());
        Ok(entry)
    }

    /// Inserts an entry that starts resident with `bytes` (copied in with UFFDIO_COPY; in
    /// explicit mode copied, then made volatile as an unpin does); `regen` rebuilds them once
    /// the kernel drops them.
    pub fn insert_with<F, E>(&self, key: K, bytes: &[u8], regen: F) -> Result<Entry, Error>
    where
        F: Fn(usize, &mut [u8]) -> Result<(), E> + Send + Sync + 'static,
        E: Into<RegenError>,
    {
        let charge = Self::check_len(bytes.len())?;
        {
            let mut map = self.lock();
            self.make_room(&mut map, &key, charge)?;
        }
        let entry = self.new_entry(bytes.len(), regen)?;
        entry.handle.fill_from(bytes)?;
        let mut map = self.lock();
        self.make_room(&mut map, &key, charge)?;
        Self::put(&mut map, key, entry.clone());
        Ok(entry)
    }

    /// The entry under `key`, marking it most recently used.
    pub fn get(&self, key: &K) -> Option<Entry> {
        let mut map = self.lock();
        map.clock += 1;
        let now = map.clock;
        let map = &mut *map;
        let slot = map.entries.get_mut(key)?;
        let old = std::mem::replace(&mut slot.stamp, now);
        if let Some(k) = map.lru.remove(&old) {
            map.lru.insert(now, k);
        }
        Some(slot.entry.clone())
    }

    /// The entry under `key`, or a new lazy one of `len` bytes rebuilt by `regen` if there is
    /// none, made once however many threads ask at the same time: concurrent callers for one key
    /// get the same entry, and one `regen` is kept (the others are dropped unused). Marks the
    /// entry most recently used.
    ///
    /// ```
    /// use lazyfree::{Cache, Config};
    ///
    /// let cache: Cache<&str> = Cache::new(Config::default())?;
    /// let zeros = |_: usize, buf: &mut [u8]| {
    ///     buf.fill(0);
    ///     Ok::<(), lazyfree::RegenError>(())
    /// };
    /// let a = cache.get_or_insert_with("k", 4096, zeros)?;
    /// let b = cache.get_or_insert_with("k", 4096, zeros)?; // found: nothing made
    /// assert_eq!(a.as_ptr(), b.as_ptr());
    /// # Ok::<(), lazyfree::Error>(())
    /// ```
    pub fn get_or_insert_with<F, E>(&self, key: K, len: usize, regen: F) -> Result<Entry, Error>
    where
        F: Fn(usize, &mut [u8]) -> Result<(), E> + Send + Sync + 'static,
        E: Into<RegenError>,
    {
        self.try_get_or_insert_with(key, || Ok((len, regen)))
    }

    /// Like [`get_or_insert_with`](Cache::get_or_insert_with), with a fallible maker that
    /// gives the length and the callback (for example after reading an image's header): it
    /// runs only if the key is missing, and in one thread at a time per key. If it fails, its
    /// error is returned to that caller and the next waiting caller tries in turn.
    pub fn try_get_or_insert_with<F, E>(
        &self,
        key: K,
        make: impl FnOnce() -> Result<(usize, F), Error>,
    ) -> Result<Entry, Error>
    where
        F: Fn(usize, &mut [u8]) -> Result<(), E> + Send + Sync + 'static,
        E: Into<RegenError>,
    {
        loop {
            if let Some(e) = self.get(&key) {
                return Ok(e);
            }
            let flight = {
                let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
                // Checked again under the flights lock: a leader inserts before it lands.
                if let Some(e) = self.get(&key) {
                    return Ok(e);
                }
                match flights.get(&key) {
                    Some(f) => Some(f.clone()),
                    None => {
                        flights.insert(key.clone(), Arc::new(Flight::default()));
                        None
                    }
                }
            };
            match flight {
                // Another caller is making the entry: wait for it to land, then look again.
                Some(f) => f.wait(),
                // This caller leads: make it, insert it, land the flight (also if `make` panics:
                // the waiters must not wait forever).
                None => {
                    let _landing = Landing {
                        cache: self,
                        key: &key,
                    };
                    return make().and_then(|(len, regen)| self.insert(key.clone(), len, regen));
                }
            }
        }
    }

    /// Removes the entry under `key` and returns it. Handles to it (including the one returned)
    /// keep its bytes valid and rebuildable; the memory goes back when the last one drops.
    pub fn remove(&self, key: &K) -> Option<Entry> {
        Self::take(&mut self.lock(), key)
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &K) -> bool {
        self.lock().entries.contains_key(key)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether it has no entries.
    pub fn is_empty(&self) -> bool {
        self.lock().entries.is_empty()
    }

    /// A snapshot of the cache's entries and counters. Costs one mincore per entry.
    pub fn stats(&self) -> Stats {
        let entries: Vec<Entry> = self
            .lock()
            .entries
            .values()
            .map(|s| s.entry.clone())
            .collect();
        let mut s = Stats {
            entries: entries.len(),
            uffd_kind: match self.rt.kind() {
                Some(UffdKind::Syscall) => "userfaultfd(2)",
                Some(UffdKind::DevNode) => "/dev/userfaultfd",
                Some(UffdKind::UserModeOnly) => "userfaultfd(UFFD_USER_MODE_ONLY)",
                None => "none (explicit mode)",
            },
            kernel_faults_handled: self.rt.kind().is_some_and(|k| k.handles_kernel_faults()),
            mode: self.rt.mode(),
            fallback_reason: self.fallback_reason.clone(),
            poison_supported: self.rt.poison_supported(),
            slab_bytes: self.rt.arena().reserved_bytes(),
            ..Stats::default()
        };
        for e in &entries {
            s.bytes += e.len();
            let resident = e.resident_pages() * PAGE;
            s.resident_bytes += resident;
            if e.is_pinned() {
                s.resident_pinned_bytes += resident;
            } else {
                s.resident_volatile_bytes += resident;
            }
            s.pinned_entries += e.is_pinned() as usize;
            s.failed_entries += e.is_failed() as usize;
        }
        s.fill_counters(&self.counters);
        s
    }

    /// Threads serving faults for this cache's mode now (monitor workers).
    pub fn worker_threads(&self) -> usize {
        self.rt.workers()
    }
}

impl<K> std::fmt::Debug for Cache<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("config", &self.config)
            .finish()
    }
}
