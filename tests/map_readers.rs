//! The cache map's readers (`src/cache/readers.rs`): gets read a shard counted in on their own
//! cache line, writers drain them. Attacked with more reader threads than slots, writers that
//! grow, replace and remove all the time, and delays injected inside the readers' reads
//! (`Step::MapReading`) and between a writer's flag and its wait (`Step::MapClosing`); and a
//! fork while a reader of the parent is inside a shard.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::*;
use lazyfree::testing::{self, Step};
use lazyfree::{Cache, Config, RegenError};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Steps delayed, and the longest delay in microseconds (0: none).
static READING: AtomicUsize = AtomicUsize::new(0);
static CLOSING: AtomicUsize = AtomicUsize::new(0);
static DELAY_US: AtomicU64 = AtomicU64::new(0);
static RNG: AtomicU64 = AtomicU64::new(0x2545_f491_4f6c_dd1d);
/// While set, the next reader to reach `MapReading` parks there until it is cleared.
static PARK: AtomicBool = AtomicBool::new(false);
static PARKED: AtomicBool = AtomicBool::new(false);

fn hook(s: Step, _shard: usize) {
    let counter = match s {
        Step::MapReading => &READING,
        Step::MapClosing => &CLOSING,
        _ => return,
    };
    counter.fetch_add(1, SeqCst);
    if s == Step::MapReading && PARK.swap(false, SeqCst) {
        PARKED.store(true, SeqCst);
        let t = Instant::now();
        while PARKED.load(SeqCst) && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(1));
        }
        return;
    }
    let max = DELAY_US.load(SeqCst);
    if max > 0 {
        let r = Rng::next_shared(&RNG);
        // One step in four waits, up to `max`.
        if r % 4 == 0 {
            std::thread::sleep(Duration::from_micros((r >> 8) % max));
        }
    }
}

/// The length of key `k`'s entry: its bytes and its length both say which key it is.
fn len_of(k: u64) -> usize {
    (1 + k as usize % 3) * PAGE + k as usize % 7
}

/// 8 reader threads (more than the slots on a small machine, so slots are shared) get random
/// keys while 2 writers insert new keys (the tables grow and rehash), replace and remove, with
/// random delays inside reads and between a writer's flag and its wait. Every entry a get
/// returns is its key's (length and bytes), no get or write hangs, and the steps were taken.
#[test]
fn gets_race_writers_that_grow_replace_and_remove() {
    let _s = serial();
    let _w = Watchdog::new("gets_race_writers_that_grow_replace_and_remove", 240);
    READING.store(0, SeqCst);
    CLOSING.store(0, SeqCst);
    DELAY_US.store(200, SeqCst);
    testing::set_step_hook(Some(hook));
    let cache: Arc<Cache<u64>> = Arc::new(
        Cache::with_regen(Config::default(), |&k: &u64, off, buf| {
            fill(k, off, buf);
            Ok::<(), RegenError>(())
        })
        .unwrap(),
    );
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let found = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (cache, next, stop) = (cache.clone(), next.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(w + 11);
                while !stop.load(SeqCst) {
                    match rng.below(4) {
                        // New keys: the shards' tables grow and rehash under the readers.
                        0 | 1 => {
                            let k = next.fetch_add(1, SeqCst);
                            cache.insert_lazy(k, len_of(k)).unwrap();
                        }
                        2 => {
                            let n = next.load(SeqCst).max(1);
                            let k = rng.below(n);
                            cache.insert_lazy(k, len_of(k)).unwrap();
                        }
                        _ => {
                            let n = next.load(SeqCst).max(1);
                            cache.remove(&rng.below(n));
                        }
                    }
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..8u64)
        .map(|r| {
            let (cache, next, stop, found) =
                (cache.clone(), next.clone(), stop.clone(), found.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(r + 101);
                while !stop.load(SeqCst) {
                    let n = next.load(SeqCst).max(1);
                    let k = rng.below(n);
                    if let Some(e) = cache.get(&k) {
                        assert_eq!(e.len(), len_of(k), "key {k}: another key's entry");
                        if rng.below(16) == 0 {
                            assert_eq!(mismatches(&e, k), 0, "key {k}: another key's bytes");
                        }
                        found.fetch_add(1, SeqCst);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, SeqCst);
    for t in writers.into_iter().chain(readers) {
        t.join().unwrap();
    }
    testing::set_step_hook(None);
    DELAY_US.store(0, SeqCst);
    let (reading, closing) = (READING.load(SeqCst), CLOSING.load(SeqCst));
    println!(
        "{} keys made, {} gets found their entry, {reading} reads and {closing} writer closes \
         stepped",
        next.load(SeqCst),
        found.load(SeqCst)
    );
    assert!(found.load(SeqCst) > 1000, "too few gets found an entry");
    assert!(reading > 1000 && closing > 1000, "the steps were not taken");
    // Every key's entry is still its own, read once more.
    for k in 0..next.load(SeqCst) {
        if let Some(e) = cache.get(&k) {
            assert_eq!(e.len(), len_of(k));
        }
    }
}

/// A writer waits for a reader inside its shard: a reader parked inside a read holds up a
/// remove of the same key until it leaves, and the remove then completes.
#[test]
fn a_writer_waits_for_a_reader_inside() {
    let _s = serial();
    let _w = Watchdog::new("a_writer_waits_for_a_reader_inside", 60);
    let cache: Arc<Cache<u64>> = Arc::new(
        Cache::with_regen(Config::default(), |&k: &u64, off, buf| {
            fill(k, off, buf);
            Ok::<(), RegenError>(())
        })
        .unwrap(),
    );
    cache.insert_lazy(5, PAGE).unwrap();
    PARKED.store(false, SeqCst);
    PARK.store(true, SeqCst);
    testing::set_step_hook(Some(hook));
    let reader = {
        let cache = cache.clone();
        std::thread::spawn(move || cache.get(&5).map(|e| e.len()))
    };
    wait_until("the reader never parked", 10, || PARKED.load(SeqCst));
    let removed = Arc::new(AtomicBool::new(false));
    let closes = CLOSING.load(SeqCst);
    let writer = {
        let (cache, removed) = (cache.clone(), removed.clone());
        std::thread::spawn(move || {
            let e = cache.remove(&5);
            removed.store(true, SeqCst);
            e.is_some()
        })
    };
    // The writer raised its flag and is waiting (its step was taken), then give it time.
    wait_until("the remove never came to its wait", 10, || {
        CLOSING.load(SeqCst) != closes
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !removed.load(SeqCst),
        "the remove did not wait for the reader inside the shard"
    );
    PARKED.store(false, SeqCst);
    assert_eq!(
        reader.join().unwrap(),
        Some(PAGE),
        "the parked get lost its entry"
    );
    assert!(writer.join().unwrap(), "the remove found nothing");
    testing::set_step_hook(None);
    assert!(cache.get(&5).is_none());
}

/// A fork while a parent thread is inside a read of a shard (parked there): the child's remove
/// of a key of that shard does not wait for the reader (it does not exist in the child): it
/// removes nothing (a forked child writes nothing to the map) and returns at once; the parent
/// goes on.
#[test]
fn a_forked_child_does_not_wait_for_the_parents_readers() {
    let _s = serial();
    let _w = Watchdog::new("a_forked_child_does_not_wait_for_the_parents_readers", 60);
    let cache: Arc<Cache<u64>> = Arc::new(
        Cache::with_regen(Config::default(), |&k: &u64, off, buf| {
            fill(k, off, buf);
            Ok::<(), RegenError>(())
        })
        .unwrap(),
    );
    cache.insert_lazy(9, PAGE).unwrap();
    PARKED.store(false, SeqCst);
    PARK.store(true, SeqCst);
    testing::set_step_hook(Some(hook));
    let reader = {
        let cache = cache.clone();
        std::thread::spawn(move || cache.get(&9).is_some())
    };
    wait_until("the reader never parked", 10, || PARKED.load(SeqCst));
    // SAFETY: the child only removes a key from its copy of the map (no memory of the cache
    // touched) and ends with _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let gone = cache.remove(&9).is_some();
        // SAFETY: ends the child without the parent's exit handlers.
        unsafe { libc::_exit(if gone { 3 } else { 0 }) }
    }
    assert!(pid > 0, "fork: {}", std::io::Error::last_os_error());
    let status = wait_forked(pid, 20);
    PARKED.store(false, SeqCst);
    assert!(reader.join().unwrap());
    testing::set_step_hook(None);
    let status = status.expect("the child's remove waited for a reader of the parent");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child: {}",
        describe_status(Some(status))
    );
    assert!(
        cache.get(&9).is_some(),
        "the child's remove reached the parent"
    );
}

/// A key whose comparison panics while `PANIC_EQ` is set: the map compares keys inside a read.
#[derive(Clone, Debug)]
struct TouchyKey(u64);

impl std::hash::Hash for TouchyKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.hash(h);
    }
}

static PANIC_EQ: AtomicBool = AtomicBool::new(false);

impl PartialEq for TouchyKey {
    fn eq(&self, other: &Self) -> bool {
        assert!(!PANIC_EQ.load(SeqCst), "a key's Eq panicked on purpose");
        self.0 == other.0
    }
}
impl Eq for TouchyKey {}

/// A key's `Eq` that panics inside a get (the get is counted in as a reader of its shard):
/// the panic leaves the get and its count with it, so a writer of that shard afterwards does
/// not wait for a reader that is gone. Fails (the remove never returns) if the count is not
/// released on unwind.
#[test]
fn a_panicking_key_comparison_inside_a_get_leaves_no_reader_behind() {
    let _s = serial();
    let _w = Watchdog::new(
        "a_panicking_key_comparison_inside_a_get_leaves_no_reader_behind",
        60,
    );
    let cache: Arc<Cache<TouchyKey>> = Arc::new(
        Cache::with_regen(Config::default(), |k: &TouchyKey, off, buf| {
            fill(k.0, off, buf);
            Ok::<(), RegenError>(())
        })
        .unwrap(),
    );
    let key = TouchyKey(3);
    cache.insert_lazy(key.clone(), PAGE).unwrap();
    PANIC_EQ.store(true, SeqCst);
    let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cache.get(&key)));
    PANIC_EQ.store(false, SeqCst);
    assert!(
        got.is_err(),
        "the get did not compare the key: the test did not reach its point"
    );
    let removed = Arc::new(AtomicBool::new(false));
    let writer = {
        let (cache, removed, key) = (cache.clone(), removed.clone(), key.clone());
        std::thread::spawn(move || {
            let e = cache.remove(&key);
            removed.store(true, SeqCst);
            e.map(|e| e.len())
        })
    };
    wait_until(
        "a remove after a get whose key panicked waits for a reader that left",
        20,
        || removed.load(SeqCst),
    );
    assert_eq!(writer.join().unwrap(), Some(PAGE));
    assert!(cache.get(&key).is_none());
}
