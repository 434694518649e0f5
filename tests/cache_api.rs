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
