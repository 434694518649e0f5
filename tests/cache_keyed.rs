//! A cache with one regenerate function for every key (`Cache::with_regen`): the right key's
//! bytes after the kernel took them back, in every mode; the key's and the function's lifetimes;
//! single flight; a failing, panicking and slow function for some keys while others succeed.

mod common;

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::*;
use lazyfree::{testing, Cache, Config, Entry, Error, Mode, RegenError};

const MODES: [Mode; 3] = [Mode::Monitor, Mode::Sigbus, Mode::Explicit];

/// Every entry is rebuilt by the one function from its own key, after the kernel took them all
/// back, in every mode; lazy entries, entries inserted with their bytes and entries found by
/// `get_or_insert_lazy` alike.
#[test]
fn one_function_rebuilds_every_key() {
    let _w = Watchdog::new("one_function_rebuilds_every_key", 120);
    for mode in MODES {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let cache: Cache<u64> =
            Cache::with_regen(Config::default().mode(mode), move |&k, off, buf| {
                counted.fetch_add(1, Ordering::Relaxed);
                fill(k, off, buf);
                Ok::<(), RegenError>(())
            })
            .unwrap();
        let mut entries = Vec::new();
        for k in 0..48u64 {
            let len = (1 + k as usize % 5) * PAGE + k as usize;
            let e = match k % 3 {
                0 => cache.insert_lazy(k, len).unwrap(),
                1 => cache.insert_bytes(k, &expected(k, len)).unwrap(),
                _ => cache.get_or_insert_lazy(k, len).unwrap(),
            };
            entries.push((k, e));
        }
        for round in 0..2 {
            let dropped = testing::reclaim_all(entries.iter().map(|(_, e)| e));
            assert!(dropped > 0, "{mode:?} round {round}: nothing reclaimed");
            for (k, e) in &entries {
                let want = expected(*k, e.len());
                assert!(
                    e.read(|b| b == &want[..]).unwrap(),
                    "{mode:?} round {round}: key {k} read another key's bytes"
                );
                let found = cache.get_or_insert_lazy(*k, 1).unwrap();
                assert_eq!(found.as_ptr(), e.as_ptr(), "{mode:?}: key {k} made again");
            }
        }
        assert!(calls.load(Ordering::Relaxed) > 0, "{mode:?}: never called");
    }
}

/// The keyed inserts on a cache made without a function: a typed error that says what to do,
/// nothing inserted.
#[test]
fn a_cache_without_a_function_says_so() {
    let cache: Cache<u64> = Cache::new(Config::default()).unwrap();
    let errs = [
        cache.insert_lazy(1, PAGE).err(),
        cache.insert_bytes(1, &[1, 2, 3]).err(),
        cache.get_or_insert_lazy(1, PAGE).err(),
    ];
    for e in errs {
        match e {
            Some(Error::NoCacheRegen) => {}
            other => panic!("expected NoCacheRegen, got {other:?}"),
        }
    }
    let msg = Error::NoCacheRegen.to_string();
    assert!(msg.contains("Cache::with_regen"), "{msg}");
    assert!(!msg.contains("  "), "broken line continuation: {msg}");
    assert!(cache.is_empty());
    // Bad lengths are refused as in every insert.
    let keyed: Cache<u64> = Cache::with_regen(Config::default(), |_: &u64, _, _: &mut [u8]| {
        Ok::<(), RegenError>(())
    })
    .unwrap();
    assert!(matches!(
        keyed.insert_lazy(1, 0),
        Err(Error::InvalidLength { .. })
    ));
    assert!(matches!(
        keyed.insert_lazy(1, usize::MAX),
        Err(Error::InvalidLength { .. })
    ));
    assert!(matches!(
        keyed.insert_bytes(1, &[]),
        Err(Error::InvalidLength { .. })
    ));
    assert!(keyed.is_empty());
}

/// A key that counts its live copies.
#[derive(Debug)]
struct Counted(u64, Arc<AtomicIsize>);

impl Counted {
    fn new(k: u64, live: &Arc<AtomicIsize>) -> Counted {
        live.fetch_add(1, Ordering::SeqCst);
        Counted(k, live.clone())
    }
}
impl Clone for Counted {
    fn clone(&self) -> Counted {
        Counted::new(self.0, &self.1)
    }
}
impl Drop for Counted {
    fn drop(&mut self) {
        self.1.fetch_sub(1, Ordering::SeqCst);
    }
}
impl PartialEq for Counted {
    fn eq(&self, o: &Counted) -> bool {
        self.0 == o.0
    }
}
impl Eq for Counted {}
impl Hash for Counted {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.hash(h)
    }
}

/// An entry keeps a copy of its key and the cache's function while it lives, also after it left
/// the cache and after the cache dropped (it is still rebuilt right); both go with the last
/// handle.
#[test]
fn keys_and_the_function_live_as_long_as_their_entries() {
    let _w = Watchdog::new("keys_and_the_function_live_as_long_as_their_entries", 60);
    for mode in [Mode::Monitor, Mode::Sigbus] {
        let live = Arc::new(AtomicIsize::new(0));
        let token = Arc::new(());
        let held = token.clone();
        let cache: Cache<Counted> = Cache::with_regen(
            Config::default().mode(mode),
            move |k: &Counted, off, buf| {
                let _ = &held;
                fill(k.0, off, buf);
                Ok::<(), RegenError>(())
            },
        )
        .unwrap();
        let kept = cache.insert_lazy(Counted::new(1, &live), 3 * PAGE).unwrap();
        let removed = cache.insert_lazy(Counted::new(2, &live), 2 * PAGE).unwrap();
        cache.insert_lazy(Counted::new(3, &live), PAGE).unwrap();
        // Each entry: one key in the map, one with its callback.
        assert_eq!(live.load(Ordering::SeqCst), 6, "{mode:?}");
        assert!(cache.remove(&Counted::new(2, &live)).is_some());
        assert_eq!(
            live.load(Ordering::SeqCst),
            5,
            "{mode:?}: the map's copy of 2 went"
        );
        drop(removed);
        assert_eq!(
            live.load(Ordering::SeqCst),
            4,
            "{mode:?}: entry 2's copy stays"
        );
        drop(cache);
        assert_eq!(
            live.load(Ordering::SeqCst),
            1,
            "{mode:?}: only the held entry's copy"
        );
        assert_eq!(
            Arc::strong_count(&token),
            2,
            "{mode:?}: the held entry keeps the function after the cache dropped"
        );
        testing::reclaim(&kept);
        assert_eq!(
            mismatches(&kept, 1),
            0,
            "{mode:?}: rebuilt after the cache dropped"
        );
        drop(kept);
        assert_eq!(
            live.load(Ordering::SeqCst),
            0,
            "{mode:?}: a key copy leaked"
        );
        assert_eq!(
            Arc::strong_count(&token),
            1,
            "{mode:?}: the function leaked"
        );
    }
}

/// 8 threads ask for one missing key at once: one entry, and no key copy is left behind but the
/// map's and the entry's.
#[test]
fn get_or_insert_lazy_is_single_flight() {
    let _w = Watchdog::new("get_or_insert_lazy_is_single_flight", 120);
    for mode in MODES {
        let live = Arc::new(AtomicIsize::new(0));
        let cache: Arc<Cache<Counted>> = Arc::new(
            Cache::with_regen(Config::default().mode(mode), |k: &Counted, off, buf| {
                fill(k.0, off, buf);
                Ok::<(), RegenError>(())
            })
            .unwrap(),
        );
        let barrier = Arc::new(Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (cache, barrier, live) = (cache.clone(), barrier.clone(), live.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let e = cache
                        .get_or_insert_lazy(Counted::new(7, &live), 64 * PAGE)
                        .unwrap();
                    assert_eq!(mismatches(&e, 7), 0, "{mode:?}");
                    e.as_ptr() as usize
                })
            })
            .collect();
        let ptrs: Vec<usize> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(
            ptrs.iter().all(|&p| p == ptrs[0]),
            "{mode:?}: different entries"
        );
        assert_eq!(cache.len(), 1, "{mode:?}");
        assert_eq!(
            live.load(Ordering::SeqCst),
            2,
            "{mode:?}: key copies left behind"
        );
    }
}

/// The one function fails for one key, panics for another and is slow for a third; four
/// threads pin all four keys (the fourth succeeds) at once, each in another order, and the
/// kernel takes them back between pins: each failure stays with its own key, the others read
/// their own bytes.
#[test]
fn a_failing_key_leaves_the_others_right() {
    let _w = Watchdog::new("a_failing_key_leaves_the_others_right", 120);
    for mode in MODES {
        let cache: Arc<Cache<u64>> = Arc::new(
            Cache::with_regen(
                Config::default().mode(mode),
                |&k: &u64, off, buf: &mut [u8]| {
                    match k {
                        1 => {
                            return Err(RegenError::from(format!(
                                "key {k} cannot be rebuilt (test)"
                            )))
                        }
                        2 => panic!("key {k} panicked (test)"),
                        3 => std::thread::sleep(Duration::from_millis(20)),
                        _ => {}
                    }
                    fill(k, off, buf);
                    Ok(())
                },
            )
            .unwrap(),
        );
        let entries: Vec<_> = (1..=4u64)
            .map(|k| cache.insert_lazy(k, 8 * PAGE).unwrap())
            .collect();
        let barrier = Arc::new(Barrier::new(4));
        let threads: Vec<_> = (0..4usize)
            .map(|t| {
                let (barrier, entries) = (barrier.clone(), entries.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    for round in 0..12 {
                        let i = (t + round) % 4;
                        let (e, k) = (&entries[i], i as u64 + 1);
                        match (k, e.pin()) {
                            (1 | 2, Err(Error::RegenerateFailed(m))) => {
                                assert!(m.contains(&format!("key {k}")), "{mode:?}: {m}")
                            }
                            (3 | 4, Ok(p)) => {
                                assert_eq!(p[..], expected(k, p.len())[..], "{mode:?} key {k}")
                            }
                            (_, other) => panic!(
                                "{mode:?} key {k} round {round}: {:?}",
                                other.map(|p| p.len())
                            ),
                        }
                        testing::reclaim(e);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}

/// Under a budget, keyed entries are evicted (their key copies go with them), replaced by key,
/// and mixed with entries that have their own callback.
#[test]
fn keyed_entries_under_a_budget_and_replaced() {
    let _w = Watchdog::new("keyed_entries_under_a_budget_and_replaced", 60);
    let live = Arc::new(AtomicIsize::new(0));
    let token = Arc::new(());
    let held = token.clone();
    let cache: Cache<Counted> = Cache::with_regen(
        Config::default().budget(Some(8 * PAGE)),
        move |k: &Counted, off, buf| {
            let _ = &held;
            fill(k.0, off, buf);
            Ok::<(), RegenError>(())
        },
    )
    .unwrap();
    for k in 0..20u64 {
        drop(cache.insert_lazy(Counted::new(k, &live), 2 * PAGE).unwrap());
    }
    assert_eq!(cache.len(), 4, "budget of 8 pages, 2 pages each");
    // Three copies an entry: the map's, the recency order's (a budget keeps one) and its own.
    assert_eq!(
        live.load(Ordering::SeqCst),
        12,
        "evicted entries left key copies"
    );
    assert_eq!(
        Arc::strong_count(&token),
        2,
        "one function however many entries"
    );
    for k in 16..20u64 {
        let e = cache
            .get(&Counted::new(k, &live))
            .expect("the last four stay");
        assert_eq!(mismatches(&e, k), 0);
    }
    // Replaced by key: the old entry leaves the map, the new one is rebuilt by the function.
    let old = cache.get(&Counted::new(17, &live)).unwrap();
    let new = cache
        .insert_lazy(Counted::new(17, &live), 2 * PAGE + 1)
        .unwrap();
    assert_ne!(old.as_ptr(), new.as_ptr());
    assert_eq!(new.len(), 2 * PAGE + 1);
    testing::reclaim(&old);
    assert_eq!(
        mismatches(&old, 17),
        0,
        "a replaced entry held still rebuilds"
    );
    assert_eq!(mismatches(&new, 17), 0);
    drop(old);
    // An entry with its own callback in a keyed cache.
    let own = cache
        .insert(Counted::new(99, &live), PAGE, regen(5))
        .unwrap();
    testing::reclaim(&own);
    assert_eq!(mismatches(&own, 5), 0, "its own callback, not the cache's");
    drop((new, own));
    drop(cache);
    assert_eq!(live.load(Ordering::SeqCst), 0, "a key copy leaked");
    assert_eq!(Arc::strong_count(&token), 1, "the function leaked");
}

/// A fork while a parent thread leads a single flight (its maker slow): the child's keyed
/// inserts, and its get-or-inserts of the key in flight, are refused with `ForkedChild` at
/// once (the flight's leader does not exist in the child: waiting for it would hang); a key
/// found is a handle, as `get` gives. The parent goes on unharmed.
#[test]
fn a_forked_child_is_refused_without_waiting_for_a_parent_flight() {
    let _w = Watchdog::new(
        "a_forked_child_is_refused_without_waiting_for_a_parent_flight",
        60,
    );
    for mode in MODES {
        let cache: Arc<Cache<u64>> = Arc::new(
            Cache::with_regen(Config::default().mode(mode), |&k: &u64, off, buf| {
                fill(k, off, buf);
                Ok::<(), RegenError>(())
            })
            .unwrap(),
        );
        let present = cache.insert_lazy(1, 2 * PAGE).unwrap();
        let making = Arc::new(Barrier::new(2));
        let leader = {
            let (cache, making) = (cache.clone(), making.clone());
            std::thread::spawn(move || {
                cache
                    .try_get_or_insert_with(7, || {
                        making.wait();
                        std::thread::sleep(Duration::from_millis(300));
                        Ok((PAGE, regen(7)))
                    })
                    .unwrap()
            })
        };
        making.wait();
        // SAFETY: the child only calls the cache's API, which refuses to act in a forked
        // child, and ends with _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let mut code = 0;
            let refused = |r: Result<Entry, Error>| matches!(r, Err(Error::ForkedChild));
            code |= !refused(cache.get_or_insert_lazy(7, PAGE)) as i32;
            code |= (!refused(cache.get_or_insert_with(7, PAGE, regen(7))) as i32) << 1;
            code |= (!refused(cache.insert_lazy(2, PAGE)) as i32) << 2;
            code |= (!refused(cache.insert_bytes(3, &[1; 10])) as i32) << 3;
            code |= (!refused(cache.get_or_insert_lazy(4, PAGE)) as i32) << 4;
            code |= (cache.get_or_insert_lazy(1, PAGE).is_err() as i32) << 5;
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(code) }
        }
        assert!(pid > 0, "fork: {}", std::io::Error::last_os_error());
        let status = wait_forked(pid, 20);
        let e7 = leader.join().unwrap();
        match status {
            Some(s) if libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0 => {}
            Some(s) if libc::WIFEXITED(s) => panic!(
                "{mode:?}: the child's calls went wrong (bits of failed checks): {:#b}",
                libc::WEXITSTATUS(s)
            ),
            Some(s) => panic!("{mode:?}: the child ended with status {s:#x}"),
            None => panic!("{mode:?}: the child hung (waiting for the parent's flight?)"),
        }
        assert_eq!(mismatches(&e7, 7), 0, "{mode:?}");
        testing::reclaim(&present);
        assert_eq!(mismatches(&present, 1), 0, "{mode:?}");
        assert_eq!(mismatches(&cache.insert_lazy(2, PAGE).unwrap(), 2), 0);
    }
}
