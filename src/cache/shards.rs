//! The cache's map: keys to entries in independent shards, so gets from many threads do not
//! serialise, with an exact least-recently-used order kept lazily for caches with a budget.
//!
//! ## Shards
//! A key's hash (computed once, with foldhash's quality hasher seeded per cache from the
//! kernel's random source; std's SipHash made gets 1.9 times slower; foldhash claims no
//! resistance to keys chosen to collide: see `Cache`) picks one of
//! [`shard_count`] shards and is the key's hash in that shard's table (hashbrown's `HashTable`,
//! std's `HashMap` underneath, which cannot take a hash computed before). A get reads its shard
//! counted in as a reader in its thread's slot (`readers.rs`): it writes no cache line another
//! thread's gets write, unless the two threads share a slot. Inserts, removes and evictions take
//! the shard's lock for writing and drain its readers; a get that finds a writer there waits for
//! it on the shard's lock for reading.
//!
//! ## Recency (only where the cache has a budget)
//! Each value carries two stamps ([`Recency`]): `used`, raised by every get (an atomic
//! `fetch_max` after reading the shard, from a clock that is strictly increasing in each thread), and
//! `recorded`, the stamp under which the shard's `order` (a `BTreeMap` keyed by
//! `(recorded, id)`) lists it. A get never touches `order`. States of a value in a shard:
//!
//! - **current**: `used == recorded`; `order` places it exactly;
//! - **stale**: `used > recorded` (got since it was ordered); `order` places it too early.
//!
//! Transitions: insert → current (both stamps = now); get: current/stale → stale; eviction scan
//! of a shard (write lock): stale → current (re-keyed at `used`), from the front of `order`
//! until the first current, evictable value; remove/evict: → gone (its `order` key is
//! `(recorded, id)`, known from the value).
//!
//! Because `used >= recorded` always, the front of a shard's `order` after the scan is the
//! shard's least recently used evictable value, and each shard's first `recorded`
//! (`Shard::hint`, read without the lock) is a lower bound on it. An eviction scans shards in
//! order of their hints and stops when the next hint is past the best candidate: the victim is
//! the least recently used evictable value of the whole map, up to gets racing the eviction.
//! Caches without a budget never evict: they keep no `order` and take no stamps.

use std::cell::{Cell, UnsafeCell};
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hash};
use std::ops::Bound::{Excluded, Unbounded};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, RwLock, RwLockWriteGuard};

use foldhash::quality::SeedableRandomState as RandomState;
use foldhash::SharedSeed;
use hashbrown::hash_table::{Entry as Slot, HashTable};

use super::readers::Readers;
use crate::hook::{self, Step};
use crate::sys::os;

/// What the map needs of a value to order it.
pub(crate) trait Recency: Clone {
    /// Stamp of the last get or insert (raised by gets with `fetch_max`).
    fn used(&self) -> &AtomicU64;
    /// Stamp under which the shard's `order` lists it (written under the shard's write lock).
    fn recorded(&self) -> &AtomicU64;
    /// An identity, unique among the values in the map (an address).
    fn id(&self) -> usize;
    /// The address the test hook is given for it at the eviction's steps (an entry's bytes).
    fn hook_addr(&self) -> usize;
}

/// A stamp strictly greater than every earlier one of this thread, and ordered with other
/// threads' by the monotonic clock.
pub(crate) fn stamp() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static LAST: Cell<u64> = const { Cell::new(0) };
    }
    let now = crate::sys::os::now_ns();
    LAST.with(|last| {
        let s = now.max(last.get() + 1);
        last.set(s);
        s
    })
}

/// The part of the hashers' seed all caches of the process share, from the kernel's random
/// source (each cache adds its own).
fn shared_seed() -> &'static SharedSeed {
    static SEED: OnceLock<SharedSeed> = OnceLock::new();
    SEED.get_or_init(|| SharedSeed::from_u64(os::random_u64()))
}

/// Number of shards: 16 per CPU rounded up to a power of two, at least 16, at most 1024.
pub(crate) fn shard_count() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpus * 16).next_power_of_two().clamp(16, 1024)
}

struct Shard<K, V> {
    map: HashTable<(K, V)>,
    /// `(recorded, id)` → key, for caches with a budget; empty otherwise.
    order: BTreeMap<(u64, usize), K>,
}

/// One shard, alone on its cache lines.
#[repr(align(128))]
struct Padded<K, V> {
    /// Taken for writing by writers, for reading by readers that found a writer's flag up
    /// (the slow path; see `readers.rs`).
    lock: RwLock<()>,
    /// A writer's flag: up while a writer drains the readers and writes.
    writing: AtomicBool,
    /// The shard's index.
    index: usize,
    /// Read by readers counted in with the flag down, or holding `lock` for reading; written
    /// by the writer holding `lock` for writing after draining the readers.
    shard: UnsafeCell<Shard<K, V>>,
    /// The first `recorded` of `order` (`u64::MAX` if empty): a lower bound on every stamp in
    /// the shard. Written under the write lock.
    hint: AtomicU64,
}

// SAFETY: the shard in the `UnsafeCell` is read only under the readers' protocol or `lock` for
// reading, and written only under `lock` for writing with every reader drained (`readers.rs`),
// so sharing `Padded` is sharing a read-write lock over `Shard`, which needs `K`, `V` to be
// `Send + Sync`.
unsafe impl<K: Send + Sync, V: Send + Sync> Sync for Padded<K, V> {}

/// A reader's slot (see `readers.rs`): threads take slots round-robin.
fn slot() -> usize {
    use std::sync::atomic::AtomicUsize;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    SLOT.with(|s| {
        if s.get() == usize::MAX {
            s.set(NEXT.fetch_add(1, Ordering::Relaxed));
        }
        s.get()
    })
}

/// Reader slots: two per CPU, at most 32, rounded up to a power of two by `Readers::new`
/// (memory: a cache line per 16 shards per slot).
fn slot_count() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpus * 2).clamp(2, 32)
}

/// A shard held for writing: its lock, with the readers drained; opens it again on drop.
struct Writing<'a, K, V> {
    p: &'a Padded<K, V>,
    _lock: RwLockWriteGuard<'a, ()>,
}

impl<K, V> std::ops::Deref for Writing<'_, K, V> {
    type Target = Shard<K, V>;
    fn deref(&self) -> &Shard<K, V> {
        // SAFETY: the lock for writing is held and the readers are drained (`Shards::write`).
        unsafe { &*self.p.shard.get() }
    }
}

impl<K, V> std::ops::DerefMut for Writing<'_, K, V> {
    fn deref_mut(&mut self) -> &mut Shard<K, V> {
        // SAFETY: as above; `&mut self` makes this the only reference made through the guard.
        unsafe { &mut *self.p.shard.get() }
    }
}

impl<K, V> Drop for Writing<'_, K, V> {
    fn drop(&mut self) {
        // Before the lock is released (fields drop after this).
        Readers::lower(&self.p.writing);
    }
}

/// Keys to values in shards; see the module docs.
pub(crate) struct Shards<K, V> {
    shards: Box<[Padded<K, V>]>,
    /// The readers' counts (the fast path of gets).
    readers: Readers,
    hasher: RandomState,
    /// Keep the recency order (the cache has a budget).
    ordered: bool,
}

impl<K: Hash + Eq + Clone, V: Recency> Shards<K, V> {
    pub(crate) fn new(ordered: bool) -> Self {
        let shards: Box<[Padded<K, V>]> = (0..shard_count())
            .map(|index| Padded {
                lock: RwLock::new(()),
                writing: AtomicBool::new(false),
                index,
                shard: UnsafeCell::new(Shard {
                    map: HashTable::new(),
                    order: BTreeMap::new(),
                }),
                hint: AtomicU64::new(u64::MAX),
            })
            .collect();
        Shards {
            readers: Readers::new(shards.len(), slot_count()),
            shards,
            hasher: RandomState::with_seed(os::random_u64(), shared_seed()),
            ordered,
        }
    }

    /// The key's hash and its shard. The shard takes the hash's top bits, the table (hashbrown
    /// uses the low bits for the bucket and the top 7 for its tags) the whole hash.
    fn shard(&self, key: &K) -> (u64, &Padded<K, V>) {
        let h = self.hasher.hash_one(key);
        let i = (h >> 40) as usize & (self.shards.len() - 1);
        (h, &self.shards[i])
    }

    fn rehash(&self) -> impl Fn(&(K, V)) -> u64 + '_ {
        |(k, _)| self.hasher.hash_one(k)
    }

    /// Runs `f` on shard `p` for reading: counted in as a reader, or, while a writer is there,
    /// under the shard's lock for reading.
    fn read<R>(&self, p: &Padded<K, V>, f: impl FnOnce(&Shard<K, V>) -> R) -> R {
        if let Some(_reading) = self.readers.enter(p.index, slot(), &p.writing) {
            hook::step(Step::MapReading, p.index);
            // SAFETY: counted in with the writer flag down: no writer touches the shard until
            // this reader leaves (`readers.rs`).
            return f(unsafe { &*p.shard.get() });
        }
        let _lock = p.lock.read().unwrap_or_else(|e| e.into_inner());
        // SAFETY: writers hold the lock for writing while they write.
        f(unsafe { &*p.shard.get() })
    }

    /// Shard `p` for writing: its lock, and every reader drained.
    fn write<'a>(&self, p: &'a Padded<K, V>) -> Writing<'a, K, V> {
        let lock = p.lock.write().unwrap_or_else(|e| e.into_inner());
        // The guard first: it lowers the flag whatever happens after it is raised.
        let w = Writing { p, _lock: lock };
        self.readers.close(p.index, &p.writing, || {
            hook::step(Step::MapClosing, p.index)
        });
        w
    }

    /// The value under `key`, marked used now.
    pub(crate) fn get(&self, key: &K) -> Option<V> {
        let (h, p) = self.shard(key);
        let v = self.read(p, |shard| {
            shard.map.find(h, |(k, _)| k == key).map(|(_, v)| v.clone())
        })?;
        if self.ordered {
            let now = stamp();
            if v.used().load(Ordering::Relaxed) < now {
                v.used().fetch_max(now, Ordering::Relaxed);
            }
        }
        Some(v)
    }

    /// The value under `key`, without marking it used.
    pub(crate) fn peek(&self, key: &K) -> Option<V> {
        let (h, p) = self.shard(key);
        self.read(p, |shard| {
            shard.map.find(h, |(k, _)| k == key).map(|(_, v)| v.clone())
        })
    }

    pub(crate) fn contains_key(&self, key: &K) -> bool {
        let (h, p) = self.shard(key);
        self.read(p, |shard| shard.map.find(h, |(k, _)| k == key).is_some())
    }

    /// Puts `v` under `key`, most recently used; returns the value it replaced.
    pub(crate) fn insert(&self, key: K, v: V) -> Option<V> {
        let (h, p) = self.shard(&key);
        let mut shard = self.write(p);
        let order_key = self.ordered.then(|| key.clone());
        let old = match shard.map.entry(h, |(k, _)| *k == key, self.rehash()) {
            Slot::Occupied(mut o) => Some(std::mem::replace(&mut o.get_mut().1, v.clone())),
            Slot::Vacant(vac) => {
                vac.insert((key, v.clone()));
                None
            }
        };
        if let Some(key) = order_key {
            if let Some(old) = &old {
                let rec = old.recorded().load(Ordering::Relaxed);
                shard.order.remove(&(rec, old.id()));
            }
            let now = stamp();
            v.used().store(now, Ordering::Relaxed);
            v.recorded().store(now, Ordering::Relaxed);
            shard.order.insert((now, v.id()), key);
            Self::set_hint(p, &shard);
        }
        old
    }

    /// Removes the value under `key`.
    pub(crate) fn remove(&self, key: &K) -> Option<V> {
        let (h, p) = self.shard(key);
        let mut shard = self.write(p);
        let (_, v) = shard.map.find_entry(h, |(k, _)| k == key).ok()?.remove().0;
        if self.ordered {
            let rec = v.recorded().load(Ordering::Relaxed);
            shard.order.remove(&(rec, v.id()));
            Self::set_hint(p, &shard);
        }
        Some(v)
    }

    fn set_hint(p: &Padded<K, V>, shard: &Shard<K, V>) {
        let first = shard.order.keys().next().map_or(u64::MAX, |k| k.0);
        p.hint.store(first, Ordering::Relaxed);
    }

    /// Re-keys the stale values at the front of shard `p`'s order and returns its least recently
    /// used value that `evictable` accepts, with its stamp.
    fn candidate(
        &self,
        p: &Padded<K, V>,
        evictable: &impl Fn(&K, &V) -> bool,
    ) -> Option<(u64, K, V)> {
        let mut shard = self.write(p);
        let shard = &mut *shard;
        // Walks `order` from the front. A stale value is re-keyed at its `used` stamp, later
        // in `order`, where the walk meets it again (now current, unless a get raced it).
        let mut past: Option<(u64, usize)> = None;
        let found = loop {
            let next = match past {
                None => shard.order.iter().next(),
                Some(p) => shard.order.range((Excluded(p), Unbounded)).next(),
            };
            let Some((&(rec, id), key)) = next else {
                break None;
            };
            let h = self.hasher.hash_one(key);
            let (_, v) = shard
                .map
                .find(h, |(k, _)| k == key)
                .expect("ordered key in map");
            let used = v.used().load(Ordering::Relaxed);
            if used != rec {
                v.recorded().store(used, Ordering::Relaxed);
                let key = shard.order.remove(&(rec, id)).expect("ordered key");
                shard.order.insert((used, id), key);
                continue;
            }
            if evictable(key, v) {
                break Some((rec, key.clone(), v.clone()));
            }
            past = Some((rec, id));
        };
        Self::set_hint(p, shard);
        found
    }

    /// Removes and returns the least recently used value `evictable` accepts (see the module
    /// docs); `None` if there is none. Only for a map made `ordered`.
    pub(crate) fn evict(&self, evictable: impl Fn(&K, &V) -> bool) -> Option<(K, V)> {
        debug_assert!(self.ordered);
        loop {
            let mut by_hint: Vec<(u64, usize)> = self
                .shards
                .iter()
                .enumerate()
                .map(|(i, p)| (p.hint.load(Ordering::Relaxed), i))
                .filter(|&(h, _)| h != u64::MAX)
                .collect();
            by_hint.sort_unstable();
            let mut best: Option<(u64, usize, K, V)> = None;
            for (hint, i) in by_hint {
                if best.as_ref().is_some_and(|b| b.0 <= hint) {
                    break;
                }
                if let Some((s, k, v)) = self.candidate(&self.shards[i], &evictable) {
                    if best.as_ref().map_or(true, |b| s < b.0) {
                        best = Some((s, i, k, v));
                    }
                }
            }
            let (s, i, key, v) = best?;
            hook::step(Step::EvictChosen, v.hook_addr());
            let p = &self.shards[i];
            let mut shard = self.write(p);
            // Still the same value, not got since, still evictable? Else look again.
            let h = self.hasher.hash_one(&key);
            let Ok(cur) = shard.map.find_entry(h, |(k, _)| *k == key) else {
                continue;
            };
            let (_, now) = cur.get();
            let same = now.id() == v.id() && now.used().load(Ordering::Relaxed) == s;
            if same && evictable(&key, &v) {
                hook::step(Step::EvictChecked, v.hook_addr());
                cur.remove();
                shard.order.remove(&(s, v.id()));
                Self::set_hint(p, &shard);
                return Some((key, v));
            }
        }
    }

    /// Number of values.
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|p| self.read(p, |shard| shard.map.len()))
            .sum()
    }

    /// A snapshot of every value.
    pub(crate) fn values(&self) -> Vec<V> {
        let mut out = Vec::new();
        for p in self.shards.iter() {
            self.read(p, |shard| {
                out.extend(shard.map.iter().map(|(_, v)| v.clone()))
            });
        }
        out
    }
}

impl<K, V> Shards<K, V> {
    /// Removes every value and returns them.
    pub(crate) fn drain(&mut self) -> Vec<V> {
        let mut out = Vec::new();
        for p in self.shards.iter_mut() {
            let shard = p.shard.get_mut();
            shard.order.clear();
            out.extend(shard.map.drain().map(|(_, v)| v));
            *p.hint.get_mut() = u64::MAX;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone)]
    struct V(Arc<(AtomicU64, AtomicU64, bool)>);

    impl V {
        fn new(pinned: bool) -> V {
            V(Arc::new((AtomicU64::new(0), AtomicU64::new(0), pinned)))
        }
    }

    impl Recency for V {
        fn used(&self) -> &AtomicU64 {
            &self.0 .0
        }
        fn recorded(&self) -> &AtomicU64 {
            &self.0 .1
        }
        fn id(&self) -> usize {
            Arc::as_ptr(&self.0) as usize
        }
        fn hook_addr(&self) -> usize {
            self.id()
        }
    }

    fn unpinned(_: &u32, v: &V) -> bool {
        !v.0 .2
    }

    #[test]
    fn evicts_in_least_recently_used_order_across_shards() {
        let m: Shards<u32, V> = Shards::new(true);
        for k in 0..100 {
            m.insert(k, V::new(false));
        }
        // Use the even keys, in descending order: the odd keys are older, then 98, 96, ..., 0.
        for k in (0..100).rev().filter(|k| k % 2 == 0) {
            m.get(&k).unwrap();
        }
        let order: Vec<u32> = std::iter::from_fn(|| m.evict(unpinned).map(|(k, _)| k)).collect();
        let want: Vec<u32> = (0..100)
            .filter(|k| k % 2 == 1)
            .chain((0..100).rev().filter(|k| k % 2 == 0))
            .collect();
        assert_eq!(order, want);
        assert_eq!(m.len(), 0);
    }

    #[test]
    fn skips_what_is_not_evictable_and_replaces_in_place() {
        let m: Shards<u32, V> = Shards::new(true);
        m.insert(0, V::new(true));
        m.insert(1, V::new(false));
        m.insert(2, V::new(false));
        assert!(m.insert(1, V::new(false)).is_some()); // now the newest
        assert_eq!(m.evict(unpinned).map(|(k, _)| k), Some(2));
        assert_eq!(m.evict(unpinned).map(|(k, _)| k), Some(1));
        assert!(m.evict(unpinned).is_none(), "a pinned value was evicted");
        assert_eq!(m.len(), 1);
        assert!(m.remove(&0).is_some());
        assert!(m.evict(|_, _| true).is_none());
    }

    #[test]
    fn full_of_new_entries_evicts_the_oldest() {
        let m: Shards<u32, V> = Shards::new(true);
        for k in 0..32 {
            m.insert(k, V::new(k == 3));
        }
        for k in 0..32 {
            m.get(&k);
        }
        for k in 100..131 {
            m.insert(k, V::new(false));
            let (gone, _) = m.evict(unpinned).unwrap();
            assert!(gone < 32 && gone != 3, "{gone}");
        }
        assert_eq!(m.evict(unpinned).map(|(k, _)| k), Some(100));
    }

    #[test]
    fn unordered_maps_take_no_stamps() {
        let m: Shards<u32, V> = Shards::new(false);
        let v = V::new(false);
        m.insert(7, v.clone());
        m.get(&7).unwrap();
        assert_eq!(v.used().load(Ordering::Relaxed), 0);
        assert_eq!(m.values().len(), 1);
        let mut m = m;
        assert_eq!(m.drain().len(), 1);
        assert!(m.peek(&7).is_none());
    }

    #[test]
    fn stamps_increase_in_a_thread() {
        let a = stamp();
        let b = stamp();
        assert!(b > a);
    }
}
