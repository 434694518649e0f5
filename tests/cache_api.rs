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
