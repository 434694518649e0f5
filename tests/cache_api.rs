//! The cache API a program drops in: single-flight get-or-insert, one way to read in every mode,
//! and the footprint the stats report.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::*;
use lazyfree::{testing, Cache, Config, Entry, Error, Mode};

const MODES: [Mode; 3] = [Mode::Monitor, Mode::Sigbus, Mode::Explicit];

/// A callback type for makers that never make one.
type NoRegen = fn(usize, &mut [u8]) -> Result<(), Error>;

/// 8 threads ask for one missing key at once: the maker runs once, one callback is boxed (the
/// one that runs), every caller gets the same entry, and the cache holds one entry.
#[test]
fn get_or_insert_is_single_flight() {
    let _w = Watchdog::new("get_or_insert_is_single_flight", 120);
    for mode in MODES {
        let cache: Arc<Cache<u64>> = Arc::new(Cache::new(Config::default().mode(mode)).unwrap());
        let makes = Arc::new(AtomicUsize::new(0));
        // Which maker's callback serves reads: each maker's callback records its own number.
        let served_by = Arc::new(AtomicUsize::new(usize::MAX));
        let barrier = Arc::new(Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (cache, makes, served_by, barrier) = (
                    cache.clone(),
                    makes.clone(),
                    served_by.clone(),
                    barrier.clone(),
                );
                std::thread::spawn(move || {
                    barrier.wait();
                    let e = cache
                        .try_get_or_insert_with(7, || {
                            let me = makes.fetch_add(1, Ordering::SeqCst);
                            // Slow, so that the others arrive while this one makes it.
                            std::thread::sleep(Duration::from_millis(100));
                            let served_by = served_by.clone();
                            Ok((64 * PAGE, move |off: usize, buf: &mut [u8]| {
                                served_by.store(me, Ordering::SeqCst);
                                fill(7, off, buf);
                                Ok::<(), lazyfree::RegenError>(())
                            }))
                        })
                        .expect("get_or_insert");
                    assert_eq!(mismatches(&e, 7), 0, "{mode:?}");
                    e.as_ptr() as usize
                })
            })
            .collect();
        let ptrs: Vec<usize> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(
            makes.load(Ordering::SeqCst),
            1,
            "{mode:?}: the maker ran more than once"
        );
        assert!(
            ptrs.iter().all(|&p| p == ptrs[0]),
            "{mode:?}: different entries"
        );
        assert_eq!(cache.len(), 1, "{mode:?}");
        assert_eq!(
            served_by.load(Ordering::SeqCst),
            0,
            "{mode:?}: the first maker's callback"
        );
        // Found from now on: the maker is not called.
        let e = cache
            .try_get_or_insert_with(7, || -> Result<(usize, NoRegen), Error> {
                panic!("the maker ran for a key that is present")
            })
            .unwrap();
        assert_eq!(e.as_ptr() as usize, ptrs[0]);
    }
}

/// A maker that fails or panics: its caller gets the error (or the panic), and the callers
/// waiting on it do not hang: the next one makes the entry.
#[test]
fn get_or_insert_after_a_failed_or_panicking_maker() {
    let _w = Watchdog::new("get_or_insert_after_a_failed_or_panicking_maker", 60);
    let cache: Arc<Cache<u64>> = Arc::new(Cache::new(Config::default()).unwrap());
    for panics in [false, true] {
        let key = panics as u64;
        let started = Arc::new(Barrier::new(2));
        let leader = {
            let (cache, started) = (cache.clone(), started.clone());
            std::thread::spawn(move || {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    cache.try_get_or_insert_with(key, || {
                        started.wait();
                        std::thread::sleep(Duration::from_millis(100));
                        if panics {
                            panic!("maker panicked (test)");
                        }
                        Err::<(usize, NoRegen), _>(Error::InvalidConfig(
                            "maker failed (test)".into(),
                        ))
                    })
                }))
            })
        };
        started.wait();
        // Arrives while the leader makes: waits for it, then makes it itself.
        let e = cache
            .get_or_insert_with(key, PAGE, regen(3))
            .expect("second caller");
        assert_eq!(mismatches(&e, 3), 0);
        match leader.join().unwrap() {
            Ok(Err(Error::InvalidConfig(m))) => assert!(!panics && m.contains("test")),
            Err(_) => assert!(panics, "only the panicking maker panics"),
            other => panic!("the leader got {:?}", other.map(|r| r.map(|_| ()))),
        }
    }
}

/// `Entry::read` reads in every mode, also after the kernel took the pages back.
#[test]
fn read_works_in_every_mode() {
    for mode in MODES {
        let cache: Cache<u8> = Cache::new(Config::default().mode(mode)).unwrap();
        let e = cache.insert(1, 100 * PAGE + 5, regen(9)).unwrap();
        let want = expected(9, e.len());
        for round in 0..2 {
            let same = e.read(|b| b == &want[..]).expect("read");
            assert!(same, "{mode:?} round {round}");
            testing::reclaim(&e);
        }
        assert_eq!(e.read(|b| b.len()).unwrap(), 100 * PAGE + 5);
        assert!(!e.is_pinned(), "{mode:?}: read left a pin behind");
    }
}

fn resident(e: &Entry) -> usize {
    e.resident_pages() * PAGE
}

/// The footprint in `Stats`: resident bytes split into pinned and volatile, checked against
/// mincore; pages the kernel took back counted when rebuilt, and never for a first fill.
#[test]
fn stats_report_the_footprint() {
    for mode in MODES {
        let cache: Cache<u8> = Cache::new(Config::default().mode(mode)).unwrap();
        let a = cache.insert(1, 64 * PAGE, regen(1)).unwrap();
        let b = cache
            .insert_with(2, &expected(2, 32 * PAGE), regen(2))
            .unwrap();
        assert_eq!(mismatches(&a, 1), 0);
        assert_eq!(mismatches(&b, 2), 0);
        let s = cache.stats();
        assert_eq!(
            s.pages_reclaimed, 0,
            "{mode:?}: a first fill is not a reclaim"
        );
        assert_eq!(s.resident_bytes, resident(&a) + resident(&b), "{mode:?}");
        assert_eq!(
            s.resident_pinned_bytes + s.resident_volatile_bytes,
            s.resident_bytes
        );
        assert_eq!(s.resident_pinned_bytes, 0, "{mode:?}: nothing pinned");

        let pinned = a.pin().unwrap();
        let s = cache.stats();
        assert_eq!(s.resident_pinned_bytes, 64 * PAGE, "{mode:?}");
        assert_eq!(s.resident_volatile_bytes, resident(&b), "{mode:?}");
        drop(pinned);

        let dropped = testing::reclaim_all([&a, &b]);
        assert!(dropped > 0, "{mode:?}: nothing reclaimed");
        let before = cache.stats();
        assert_eq!(mismatches(&a, 1), 0);
        assert_eq!(mismatches(&b, 2), 0);
        let after = cache.stats();
        let rebuilt = after.pages_regenerated - before.pages_regenerated;
        let reclaimed = after.pages_reclaimed - before.pages_reclaimed;
        assert_eq!(
            reclaimed, rebuilt,
            "{mode:?}: every rebuilt page had been filled before"
        );
        assert!(
            reclaimed as usize >= dropped,
            "{mode:?}: {reclaimed} pages counted, {dropped} dropped"
        );
        println!("{mode:?}: {}", after);
    }
}

/// The budget's eviction order, across the map's shards: one thread inserts 32 one-page entries
/// under a 32-page budget, uses them in a shuffled order, then inserts 32 more: they evict the
/// first 32 in exactly the order they were used, and a pinned one is skipped.
#[test]
fn eviction_follows_the_order_of_use() {
    let _w = Watchdog::new("eviction_follows_the_order_of_use", 120);
    for mode in MODES {
        let cache: Cache<u64> =
            Cache::new(Config::default().mode(mode).budget(Some(32 * PAGE))).unwrap();
        for k in 0..32 {
            cache.insert(k, PAGE, regen(k)).unwrap();
        }
        let order: Vec<u64> = (0..32).map(|i| (i * 13 + 5) % 32).collect(); // a permutation
        for &k in &order {
            cache.get(&k).unwrap();
        }
        let pinned = cache.get(&order[3]).unwrap();
        let guard = pinned.pin().unwrap();
        // That get is a use too: order[3] is now the most recently used, and pinned.
        let mut evicted = Vec::new();
        for k in 100..131 {
            cache.insert(k, PAGE, regen(k)).unwrap();
            let gone: Vec<u64> = order
                .iter()
                .copied()
                .filter(|k| !evicted.contains(k) && !cache.contains_key(k))
                .collect();
            assert_eq!(
                gone.len(),
                1,
                "{mode:?}: one eviction per insert, got {gone:?}"
            );
            evicted.push(gone[0]);
        }
        let want: Vec<u64> = order.iter().copied().filter(|&k| k != order[3]).collect();
        assert_eq!(evicted, want, "{mode:?}: eviction order");
        // Full: only the pinned entry and the new ones are left, and the pinned one stays.
        cache.insert(131, PAGE, regen(131)).unwrap();
        assert!(
            cache.contains_key(&order[3]),
            "{mode:?}: pinned entry evicted"
        );
        assert!(
            !cache.contains_key(&100),
            "{mode:?}: 100 was the least recently used"
        );
        assert_eq!(cache.len(), 32);
        drop(guard);
        assert_eq!(cache.stats().evictions, 32);
    }
}

/// Many threads get, insert and remove at once under a budget while some entries stay pinned:
/// the budget holds after every insert, pinned entries are never evicted, and every entry a get
/// returns has its own bytes.
#[test]
fn concurrent_gets_inserts_and_evictions_keep_the_budget_and_the_pins() {
    let _w = Watchdog::new(
        "concurrent_gets_inserts_and_evictions_keep_the_budget_and_the_pins",
        300,
    );
    for mode in [Mode::Monitor, Mode::Sigbus] {
        let budget = 64 * PAGE;
        let cache: Arc<Cache<u64>> =
            Arc::new(Cache::new(Config::default().mode(mode).budget(Some(budget))).unwrap());
        // Pinned from the start to the end: 8 entries of 2 pages.
        let pinned: Vec<Entry> = (0..8)
            .map(|k| cache.insert(k, 2 * PAGE, regen(k)).unwrap())
            .collect();
        for e in &pinned {
            e.pin_unguarded().unwrap();
        }
        let threads = 6; // past the 2 CPUs here
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads as u64)
            .map(|t| {
                let (cache, barrier) = (cache.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                    let mut checked = 0;
                    for i in 0..3000u64 {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let k = 8 + rng % 200;
                        match i % 4 {
                            0 => {
                                let pages = 1 + (rng >> 32) as usize % 3;
                                cache.insert(k, pages * PAGE - 7, regen(k)).unwrap();
                            }
                            1 => {
                                cache.remove(&k);
                            }
                            _ => {
                                if let Some(e) = cache.get(&k) {
                                    assert_eq!(mismatches(&e, k), 0, "key {k}");
                                    checked += 1;
                                }
                            }
                        }
                    }
                    checked
                })
            })
            .collect();
        let checked: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert!(checked > 0, "{mode:?}: no get found an entry");
        for k in 0..8 {
            assert!(cache.contains_key(&k), "{mode:?}: pinned entry {k} evicted");
        }
        // At rest the budget holds exactly (entries are charged by pages).
        let pages: usize = (0..208u64)
            .filter_map(|k| cache.get(&k))
            .map(|e| e.len().div_ceil(PAGE))
            .sum();
        assert!(
            pages * PAGE <= budget,
            "{mode:?}: {pages} pages over the budget"
        );
        for e in &pinned {
            e.unpin_unguarded().unwrap();
        }
    }
}

/// Dropping a cache frees its entries together (one `madvise` per run of neighbours): the
/// entries a handle still holds live on with their bytes while another thread reads them, and
/// the freed spans, reused by a new cache, hold the new entries' bytes, never the old ones.
#[test]
fn dropping_a_cache_frees_its_entries_together_and_keeps_held_ones() {
    let _w = Watchdog::new(
        "dropping_a_cache_frees_its_entries_together_and_keeps_held_ones",
        300,
    );
    for mode in MODES {
        let cache: Cache<u64> = Cache::new(Config::default().mode(mode)).unwrap();
        let mut src = vec![0u8; 3 * PAGE];
        // Start → end of each old entry's span.
        let mut old_spans = std::collections::BTreeMap::new();
        for k in 0..2000u64 {
            let len = (1 + k as usize % 3) * PAGE - 5;
            fill(k, 0, &mut src[..len]);
            // Resident from the start: stale bytes would be there to see if a span were reused
            // before it was dropped.
            let e = cache.insert_with(k, &src[..len], regen(k)).unwrap();
            old_spans.insert(
                e.as_ptr() as usize,
                e.as_ptr() as usize + len.div_ceil(PAGE) * PAGE,
            );
        }
        let held: Vec<(u64, Entry)> = (0..2000)
            .step_by(97)
            .map(|k| (k, cache.get(&k).unwrap()))
            .collect();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (held, stop) = (held.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rounds = 0;
                while !stop.load(Ordering::SeqCst) || rounds == 0 {
                    for (k, e) in &held {
                        assert_eq!(mismatches(e, *k), 0, "held entry {k} during the drop");
                    }
                    rounds += 1;
                }
                rounds
            })
        };
        drop(cache);
        stop.store(true, Ordering::SeqCst);
        assert!(reader.join().unwrap() > 0);
        for (k, e) in &held {
            testing::reclaim(e);
            assert_eq!(
                mismatches(e, *k),
                0,
                "{mode:?}: held entry {k} after the drop"
            );
        }
        let cache: Cache<u64> = Cache::new(Config::default().mode(mode)).unwrap();
        let mut reused = 0;
        for k in 0..2000u64 {
            let len = (1 + k as usize % 3) * PAGE - 5;
            let e = cache.insert(k, len, regen(k + 10_000)).unwrap();
            // (Other tests of this binary allocate from the same arena meanwhile, so the new
            // spans need not start where old ones did: count those overlapping an old one.)
            let (start, end) = (
                e.as_ptr() as usize,
                e.as_ptr() as usize + len.div_ceil(PAGE) * PAGE,
            );
            let overlaps = old_spans
                .range(..end)
                .next_back()
                .is_some_and(|(_, &old_end)| old_end > start);
            reused += overlaps as usize;
            assert_eq!(mismatches(&e, k + 10_000), 0, "{mode:?}: new entry {k}");
        }
        assert!(
            reused > 1000,
            "{mode:?}: only {reused} freed spans were reused"
        );
    }
}

/// An entry's clones are counted in its region's allocation (no `Arc` of their own). 6 threads
/// clone, read and drop clones of entries while the cache replaces and removes them and, last,
/// is dropped itself with clones still moving: every read is the entry's, and every region is
/// freed exactly once when its last clone goes (each callback holds a token: a region freed
/// twice crashes, one never freed keeps its token).
#[test]
fn clones_race_replacement_removal_and_the_caches_drop() {
    let _w = Watchdog::new("clones_race_replacement_removal_and_the_caches_drop", 300);
    for mode in MODES {
        let token = Arc::new(());
        let cache: Arc<Cache<u64>> = Arc::new(Cache::new(Config::default().mode(mode)).unwrap());
        let make = |k: u64| {
            let held = token.clone();
            move |off: usize, buf: &mut [u8]| {
                let _ = &held;
                fill(k, off, buf);
                Ok::<(), lazyfree::RegenError>(())
            }
        };
        for k in 0..8 {
            cache.insert(k, 2 * PAGE + 1, make(k)).unwrap();
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reads = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..6u64)
            .map(|t| {
                let (stop, reads) = (stop.clone(), reads.clone());
                // Each thread starts with clones of every entry and keeps cycling them; it
                // holds the cache weakly, so the cache's drop below is the test's own.
                let mut mine: Vec<(u64, Entry)> = (0..8)
                    .filter_map(|k| cache.get(&k).map(|e| (k, e)))
                    .collect();
                let cache = Arc::downgrade(&cache);
                std::thread::spawn(move || {
                    let mut rng = Rng(t + 3);
                    while !stop.load(Ordering::SeqCst) {
                        let i = rng.below(mine.len() as u64) as usize;
                        let (k, e) = &mine[i];
                        let c = e.clone();
                        let ok = c
                            .read(|b| {
                                let mut want = vec![0u8; b.len()];
                                fill(*k % 1000, 0, &mut want);
                                b == &want[..]
                            })
                            .unwrap();
                        assert!(ok, "{mode:?}: a clone of entry {k} read other bytes");
                        reads.fetch_add(1, Ordering::SeqCst);
                        drop(c);
                        if rng.below(4) == 0 {
                            // Trade this clone for the cache's current entry of the key, if any.
                            let k = *k;
                            if let Some(e) = cache.upgrade().and_then(|c| c.get(&k)) {
                                mine[i] = (k, e);
                            }
                        }
                        if rng.below(8) == 0 {
                            testing::reclaim(&mine[i].1);
                        }
                    }
                    drop(mine);
                })
            })
            .collect();
        for round in 1..200u64 {
            let k = round % 8;
            // Replacement: same key, same bytes (the readers check by key), a new region.
            cache.insert(k, 2 * PAGE + 1, make(k)).unwrap();
            if round % 5 == 0 {
                cache.remove(&((round + 3) % 8));
                cache
                    .insert((round + 3) % 8, 2 * PAGE + 1, make((round + 3) % 8))
                    .unwrap();
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // The cache goes while clones still move between threads (a thread's upgrade may hold
        // it a moment longer: wait for that).
        let weak = Arc::downgrade(&cache);
        drop(cache);
        wait_until("the cache was never dropped", 20, || {
            weak.strong_count() == 0
        });
        std::thread::sleep(Duration::from_millis(20));
        stop.store(true, Ordering::SeqCst);
        for t in threads {
            t.join().unwrap();
        }
        assert!(reads.load(Ordering::SeqCst) > 100, "{mode:?}: few reads");
        assert_eq!(
            Arc::strong_count(&token),
            1,
            "{mode:?}: a region outlived its last clone (its callback was not dropped)"
        );
    }
}

/// A region's failure message is one word (`src/slot.rs`): failing fills keep writing it (the
/// monitor's threads, the SIGBUS handler, which only tries, and pins retrying) while other
/// threads read it. Every message read is whole and one the callback gave, in every mode.
#[test]
fn failure_messages_read_while_failures_write_them() {
    let _w = Watchdog::new("failure_messages_read_while_failures_write_them", 300);
    for mode in MODES {
        let cfg = Config::default()
            .mode(mode)
            .on_failure(lazyfree::FailurePolicy::Zero)
            .fill_chunk(lazyfree::FillChunk::Page);
        let cache: Cache<u64> = Cache::new(cfg).unwrap();
        let attempt = Arc::new(AtomicUsize::new(0));
        let read = AtomicUsize::new(0);
        for round in 0..30u64 {
            let e = {
                let attempt = attempt.clone();
                cache
                    .insert(round, 16 * PAGE, move |off, _buf: &mut [u8]| {
                        let n = attempt.fetch_add(1, Ordering::SeqCst);
                        Err::<(), lazyfree::RegenError>(
                            format!("attempt {n} at {off} of {}", "y".repeat(n % 97)).into(),
                        )
                    })
                    .unwrap()
            };
            let done = std::sync::atomic::AtomicUsize::new(0);
            // The writers start once both readers read: on a loaded machine they could
            // otherwise be done before a reader runs.
            let reading = std::sync::atomic::AtomicUsize::new(0);
            std::thread::scope(|s| {
                for t in 0..2 {
                    let (e, done, reading) = (&e, &done, &reading);
                    s.spawn(move || {
                        while reading.load(Ordering::SeqCst) < 2 {
                            std::thread::yield_now();
                        }
                        // Touches fail in the fault paths (explicit mode: nothing to touch),
                        // then pins retry the failed pages and fail again.
                        if let Some(b) = e.try_as_slice() {
                            for p in (0..16).map(|i| (i * 7 + t * 3) % 16) {
                                assert_eq!(b[p * PAGE], 0, "{mode:?}: a failed page");
                            }
                        }
                        for _ in 0..4 {
                            assert!(e.pin().is_err(), "{mode:?}: a pin of a failing entry");
                        }
                        done.fetch_add(1, Ordering::SeqCst);
                    });
                }
                for _ in 0..2 {
                    let (e, done, read, reading) = (&e, &done, &read, &reading);
                    s.spawn(move || {
                        reading.fetch_add(1, Ordering::SeqCst);
                        while done.load(Ordering::SeqCst) < 2 {
                            let Some(m) = e.last_error() else { continue };
                            let n: usize = m
                                .strip_prefix("attempt ")
                                .and_then(|r| r.split(' ').next())
                                .and_then(|n| n.parse().ok())
                                .unwrap_or_else(|| panic!("{mode:?}: a torn message: {m:?}"));
                            assert!(
                                m.ends_with(&format!(" of {}", "y".repeat(n % 97))),
                                "{mode:?}: a torn message: {m:?}"
                            );
                            read.fetch_add(1, Ordering::SeqCst);
                        }
                    });
                }
            });
            assert!(e.is_failed(), "{mode:?}");
            assert!(e.last_error().is_some(), "{mode:?}: no message kept");
        }
        let (attempts, read) = (attempt.load(Ordering::SeqCst), read.load(Ordering::SeqCst));
        report(format_args!(
            "{mode:?}: {attempts} failed fills, {read} messages read while they were written"
        ));
        assert!(
            attempts >= 30 * 8 && read > 0,
            "{mode:?}: the race did not happen"
        );
    }
}
