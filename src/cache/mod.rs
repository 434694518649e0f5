//! The public cache: keyed volatile entries.
//!
//! `entry.rs` is the handle to one entry, `shards.rs` the map (shards, and the recency order of a
//! cache with a budget). Here: making entries, the budget, single flight, stats.

mod entry;
mod readers;
mod shards;

pub use entry::{Entry, Pinned};

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::config::Config;
use crate::error::Error;
use crate::handle::{self, RegionHandle};
use crate::mode::{Reads, Runtime};
use crate::region::{check_len, Profile, RegenError, RegenFn, RegionSpec};
use crate::stats::{Counters, Stats};
use crate::sys::mem::PAGE;
use crate::sys::uffd::UffdKind;

use shards::{Recency, Shards};

/// A cache of volatile entries keyed by `K`.
///
/// `Cache` is `Send + Sync`; all methods take `&self`.
///
/// # Concurrency
/// The map is split in shards (16 per CPU). A [`get`](Cache::get) reads its shard counted in
/// as a reader on a cache line of its thread's (no lock word shared with other threads' gets),
/// so gets of any keys from many threads run in parallel; an insert or a remove locks one shard
/// and waits for the gets inside it to leave. Threads share a slot beyond two per CPU (at most
/// 32, a power of two); the counts take 4 bytes per shard per slot: 512 bytes a cache on 2
/// CPUs, 128 KiB on 64. Where there is a
/// [`budget`](Config::budget), inserts and removes also take one lock of the cache's while they
/// make room, so the budget holds after each of them.
///
/// # Keys from untrusted input
/// Keys are hashed with foldhash (seeded at random per cache), which is fast but claims no
/// resistance to keys chosen to collide: where a remote party chooses the keys (URLs, file
/// names from a request), hash them first with a keyed hash of your own and use that as the
/// key, or expect such keys to make one shard slow.
///
/// # Eviction order
/// With a budget, an insert evicts the least recently used unpinned entries (a get or an insert
/// uses an entry). The order is exact for the calls of one thread; for calls of several threads
/// it follows the monotonic clock at each call, and a get racing an eviction may or may not save
/// its entry. An entry pinned when the eviction looks at it is never evicted. Each entry costs
/// its page-rounded size. A cache without a budget keeps no order at all, and its gets write
/// nothing.
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
/// - [`Cache::remove`] removes nothing and returns `None` (nothing of the map is written);
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
    /// What the entries' regions share (see `region::Profile`).
    profile: Arc<Profile>,
    map: Shards<K, Entry>,
    /// Page-rounded bytes of the entries in the map, for the budget.
    charged: AtomicUsize,
    /// Held by an insert while it makes room and puts its entry, where there is a budget: the
    /// budget holds after every insert.
    room: Mutex<()>,
    /// Keys a `get_or_insert_with` is making an entry for now (single flight).
    flights: Mutex<HashMap<K, Arc<Flight>>>,
    /// The one regenerate function of a cache made by [`with_regen`](Cache::with_regen).
    shared: Option<Arc<SharedRegen<K>>>,
}

/// A cache's one regenerate function, `f(key, offset, buf)` (boxed once per cache, kept in the
/// profile its entries' regions share).
type SharedRegen<K> = Box<dyn Fn(&K, usize, &mut [u8]) -> Result<(), RegenError> + Send + Sync>;

/// The callback of an entry of a keyed cache: its key alone. The function is the cache's, found
/// in the region's profile when a chunk is rebuilt.
struct Keyed<K> {
    key: K,
}

impl<K: Send + Sync + 'static> RegenFn for Keyed<K> {
    fn regen(&self, profile: &Profile, off: usize, buf: &mut [u8]) -> Result<(), RegenError> {
        // A `Keyed<K>` is made only by `Cache::<K>::keyed`, for the regions of a profile whose
        // function is a `SharedRegen<K>` (`Cache::make`): the check is one type id compare.
        let f = profile
            .shared
            .as_ref()
            .and_then(|f| (**f).downcast_ref::<SharedRegen<K>>())
            .ok_or("lazyfree: a keyed entry's cache has no function for its key type (a bug)")?;
        f(&self.key, off, buf)
    }
}

/// A caller's callback as a region's.
fn own<F, E>(regen: F) -> impl RegenFn
where
    F: Fn(usize, &mut [u8]) -> Result<(), E> + Send + Sync + 'static,
    E: Into<RegenError>,
{
    move |off, buf: &mut [u8]| regen(off, buf).map_err(Into::into)
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
        Cache::make(config, None, None)
    }

    /// A cache whose regions share `shared`'s function, if given
    /// ([`with_regen`](Cache::with_regen)); `in_profile` is the same function, as the profile
    /// keeps it.
    fn make(
        config: Config,
        shared: Option<Arc<SharedRegen<K>>>,
        in_profile: Option<Arc<dyn std::any::Any + Send + Sync>>,
    ) -> Result<Cache<K>, Error> {
        let (rt, fallback_reason) = Runtime::for_config(&config, Reads::Entry)?;
        let counters = Arc::new(Counters::default());
        // A cache with a budget orders its entries by recency stamps, kept in their regions.
        let ordered = config.budget.is_some();
        Ok(Cache {
            profile: handle::profile(rt.clone(), &config, counters.clone(), ordered, in_profile),
            rt,
            fallback_reason,
            counters,
            map: Shards::new(ordered),
            charged: AtomicUsize::new(0),
            room: Mutex::new(()),
            flights: Mutex::new(HashMap::new()),
            shared,
            config,
        })
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

    fn new_entry(&self, len: usize, regen: impl RegenFn) -> Result<Entry, Error> {
        let spec = RegionSpec {
            len,
            profile: self.profile.clone(),
        };
        Ok(Entry::new(RegionHandle::new(spec, regen)?))
    }

    /// Evicts least recently used unpinned entries until `needed` more bytes fit the budget
    /// (the entry under `key`, which the caller replaces, counts as gone). Called with `room`
    /// held.
    fn make_room(&self, key: &K, needed: usize) -> Result<(), Error> {
        let Some(budget) = self.config.budget else {
            return Ok(());
        };
        let err = Error::OverBudget { needed, budget };
        if needed > budget {
            return Err(err);
        }
        let replaced = self.map.peek(key).map_or(0, |e| e.region().pages() * PAGE);
        while self.charged.load(Ordering::Relaxed) - replaced + needed > budget {
            let Some((_, victim)) = self.map.evict(|k, e| k != key && !e.is_pinned()) else {
                return Err(err);
            };
            self.charged
                .fetch_sub(victim.region().pages() * PAGE, Ordering::Relaxed);
            self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Puts `entry` under `key` (making room first where there is a budget).
    fn put(&self, key: K, entry: &Entry) -> Result<(), Error> {
        let charge = entry.region().pages() * PAGE;
        let _room = self
            .config
            .budget
            .map(|_| self.room.lock().unwrap_or_else(|p| p.into_inner()));
        self.make_room(&key, charge)?;
        self.charged.fetch_add(charge, Ordering::Relaxed);
        if let Some(old) = self.map.insert(key, entry.clone()) {
            self.charged
                .fetch_sub(old.region().pages() * PAGE, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Fails early, before an entry is made, where no room can be made for `charge` bytes.
    fn check_room(&self, key: &K, charge: usize) -> Result<(), Error> {
        if self.config.budget.is_none() {
            return Ok(());
        }
        // Before the lock: in a forked child a parent thread may have held it at the fork, and
        // no thread of the child will ever release it.
        self.check_process()?;
        let _room = self.room.lock().unwrap_or_else(|p| p.into_inner());
        self.make_room(key, charge)
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
        self.insert_regen(key, len, own(regen))
    }

    fn insert_regen(&self, key: K, len: usize, regen: impl RegenFn) -> Result<Entry, Error> {
        let charge = Self::check_len(len)?;
        self.check_room(&key, charge)?;
        let entry = self.new_entry(len, regen)?;
        self.put(key, &entry)?;
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
        self.insert_with_regen(key, bytes, own(regen))
    }

    fn insert_with_regen(&self, key: K, bytes: &[u8], regen: impl RegenFn) -> Result<Entry, Error> {
        let charge = Self::check_len(bytes.len())?;
        self.check_room(&key, charge)?;
        let entry = self.new_entry(bytes.len(), regen)?;
        entry.handle().fill_from(bytes)?;
        self.put(key, &entry)?;
        Ok(entry)
    }

    /// The entry under `key`, marking it most recently used. Gets of any keys from many threads
    /// run in parallel (the map is sharded; see "Concurrency" above).
    pub fn get(&self, key: &K) -> Option<Entry> {
        self.map.get(key)
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
        self.get_or_insert_regen(key, || make().map(|(len, f)| (len, own(f))))
    }

    fn get_or_insert_regen<R: RegenFn>(
        &self,
        key: K,
        make: impl FnOnce() -> Result<(usize, R), Error>,
    ) -> Result<Entry, Error> {
        loop {
            if let Some(e) = self.get(&key) {
                return Ok(e);
            }
            // Before the lock: in a forked child a parent thread may have held it at the fork.
            self.check_process()?;
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
                    return make()
                        .and_then(|(len, regen)| self.insert_regen(key.clone(), len, regen));
                }
            }
        }
    }

    /// Removes the entry under `key` and returns it. Handles to it (including the one returned)
    /// keep its bytes valid and rebuildable; the memory goes back when the last one drops. In a
    /// forked child it removes nothing and returns `None`.
    pub fn remove(&self, key: &K) -> Option<Entry> {
        // A forked child writes nothing to the map: a parent thread may have held its locks or
        // been reading it at the fork, and would never leave (see "fork" above).
        self.check_process().ok()?;
        let _room = self
            .config
            .budget
            .map(|_| self.room.lock().unwrap_or_else(|p| p.into_inner()));
        let e = self.map.remove(key)?;
        self.charged
            .fetch_sub(e.region().pages() * PAGE, Ordering::Relaxed);
        Some(e)
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &K) -> bool {
        self.map.contains_key(key)
    }

    /// Number of entries (the sum over the map's shards).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether it has no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A snapshot of the cache's entries and counters. Costs one mincore per entry.
    pub fn stats(&self) -> Stats {
        let entries: Vec<Entry> = self.map.values();
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
            if e.is_pinned() || e.region().is_lingering() {
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

/// A cache with one regenerate function for every key.
impl<K: Hash + Eq + Clone + Send + Sync + 'static> Cache<K> {
    /// Makes a cache whose entries share one regenerate function, `regen(key, offset, buf)`,
    /// which fills `buf` with the bytes at `offset` of the entry under `key`. Its entries are
    /// inserted by key and length ([`insert_lazy`](Cache::insert_lazy),
    /// [`get_or_insert_lazy`](Cache::get_or_insert_lazy)) or with their first bytes
    /// ([`insert_bytes`](Cache::insert_bytes)); an entry then holds no callback of its own, only
    /// a copy of its key, in its region's allocation (the function is found through what the
    /// cache's entries share; no allocation per entry for the callback, unless cloning `K`
    /// allocates, as a `String`'s clone does). The closure-taking inserts work here too, for
    /// entries that need another callback.
    ///
    /// The function (and what it captures) lives until the cache and every handle to its
    /// entries are gone: an entry held after the cache dropped is still rebuilt. A function
    /// that captures the cache itself (an `Arc<Cache>`) or one of its entries makes a cycle that
    /// is never freed.
    ///
    /// ```
    /// use lazyfree::{Cache, Config};
    ///
    /// // Tile `k` is the byte `k` repeated: one function rebuilds every tile.
    /// let cache: Cache<u8> = Cache::with_regen(Config::default(), |&k: &u8, _off, buf: &mut [u8]| {
    ///     buf.fill(k);
    ///     Ok::<(), lazyfree::RegenError>(())
    /// })?;
    /// let seven = cache.insert_lazy(7, 10_000)?;
    /// let nine = cache.get_or_insert_lazy(9, 4096)?;
    /// assert!(seven.read(|b| b.iter().all(|&x| x == 7))?);
    /// assert!(nine.read(|b| b.iter().all(|&x| x == 9))?);
    /// # Ok::<(), lazyfree::Error>(())
    /// ```
    pub fn with_regen<F, E>(config: Config, regen: F) -> Result<Cache<K>, Error>
    where
        F: Fn(&K, usize, &mut [u8]) -> Result<(), E> + Send + Sync + 'static,
        E: Into<RegenError>,
    {
        let shared: SharedRegen<K> =
            Box::new(move |k, off, buf| regen(k, off, buf).map_err(Into::into));
        let shared = Arc::new(shared);
        let in_profile: Arc<dyn std::any::Any + Send + Sync> = shared.clone();
        Cache::make(config, Some(shared), Some(in_profile))
    }

    /// The callback of `key`'s entry: the key, which calls the cache's function (kept in the
    /// regions' profile: an entry holds no pointer to it).
    fn keyed(&self, key: &K) -> Result<Keyed<K>, Error> {
        if self.shared.is_none() {
            return Err(Error::NoCacheRegen);
        }
        Ok(Keyed { key: key.clone() })
    }

    /// Inserts a lazy entry of `len` bytes under `key`, rebuilt by the cache's function (see
    /// [`with_regen`](Cache::with_regen)); otherwise as [`insert`](Cache::insert).
    /// [`Error::NoCacheRegen`] on a cache made by [`new`](Cache::new).
    pub fn insert_lazy(&self, key: K, len: usize) -> Result<Entry, Error> {
        let regen = self.keyed(&key)?;
        self.insert_regen(key, len, regen)
    }

    /// Inserts an entry under `key` that starts resident with `bytes`, rebuilt by the cache's
    /// function once the kernel drops them; otherwise as [`insert_with`](Cache::insert_with).
    /// [`Error::NoCacheRegen`] on a cache made by [`new`](Cache::new).
    pub fn insert_bytes(&self, key: K, bytes: &[u8]) -> Result<Entry, Error> {
        let regen = self.keyed(&key)?;
        self.insert_with_regen(key, bytes, regen)
    }

    /// The entry under `key`, or a new lazy one of `len` bytes rebuilt by the cache's function,
    /// made once however many threads ask at the same time (as
    /// [`get_or_insert_with`](Cache::get_or_insert_with)); `len` is not checked against an
    /// entry found. [`Error::NoCacheRegen`] on a cache made by [`new`](Cache::new).
    pub fn get_or_insert_lazy(&self, key: K, len: usize) -> Result<Entry, Error> {
        if self.shared.is_none() {
            return Err(Error::NoCacheRegen);
        }
        // A hit writes nothing shared (no key clone, no count on the function).
        if let Some(e) = self.get(&key) {
            return Ok(e);
        }
        let regen = self.keyed(&key)?;
        self.get_or_insert_regen(key, || Ok((len, regen)))
    }
}

impl<K> Drop for Cache<K> {
    /// Drops the entries no handle holds any more all at once (see `RegionHandle::drop_all`);
    /// entries still held elsewhere live on.
    fn drop(&mut self) {
        let mut entries = self.map.drain();
        // Freed in the order they were made (by address), not the map's: the allocator's
        // neighbours are then in cache (a random order costs ~4 us an entry at a million).
        entries.sort_unstable_by_key(|e| e.id());
        let handles = entries.into_iter().filter_map(Entry::into_handle).collect();
        RegionHandle::drop_all(handles);
    }
}

impl<K> std::fmt::Debug for Cache<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("config", &self.config)
            .finish()
    }
}
