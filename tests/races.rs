//! Adversarial interleavings of three mechanisms that no test attacked before:
//!
//! 1. **Eviction** under a budget (`src/cache/shards.rs`): a delay between the eviction's choice
//!    of a victim and its removal (`Step::EvictChosen`, `Step::EvictChecked`) while other threads
//!    get, pin, remove and re-insert that same key. A holder's bytes are always its entry's, a
//!    pinned entry is never evicted, the budget holds at rest and the charge is exact.
//! 2. **Fill ahead** (`Config::read_ahead`, monitor mode): more sequential readers than the
//!    monitor has workers for the program's faults (64), many readers on one entry, and callbacks
//!    that fail, panic or block for a chunk being filled ahead. Every byte right, or the failure
//!    policy on the failing chunk only; a blocked callback ahead holds up no reader.
//! 3. **fork with lingering entries** (`Config::unpin_delay`): a child forked while entries
//!    linger after their last unpin, while another thread is in the middle of a first pin and a
//!    fill is in flight, calls the API on everything and exits; the parent's entries stay right
//!    and their lingering still ends.
//!
//! Every test takes `SERIAL`: several install the process-wide step hook, and
//! `testing::reclaim` ends every unpin delay of the process. Cases that fork, or end by a signal,
//! run in a child process (a re-exec of this binary through `run_child`, entry point the
//! ignored `child` test). Each has a `Watchdog` (or `run_child`'s timeout) so that a hang fails.
//!
//! No assertion is about time: bounded waits only turn a hang into a failure, and the assertions
//! are about progress ("the readers finished while the callback ahead was still blocked"),
//! counts, bytes and how a process ended.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Barrier, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::*;
use lazyfree::testing::{self, Step};
use lazyfree::{Cache, Config, Entry, Error, FailurePolicy, Mode, RegenError};

const CHUNK: usize = 64 << 10;

/// The tests of this file one at a time (the step hook and `testing::reclaim` are process-wide).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
#[ignore = "child-process entry point, run by the other tests"]
fn child() {
    child_main(&|case| match case {
        "poison_ahead" => child_poison_ahead(),
        "fork_linger" => child_fork_linger(),
        "fork_storm" => child_fork_storm(),
        "fork_mid_eviction" => child_fork_mid_eviction(),
        other => panic!("unknown child case {other}"),
    });
}

// ---------------------------------------------------------------------------------------------
// The step hook: parks a thread at one step (until released), or delays every matching step by
// a random time. Atomics only: it may run in a SIGBUS handler, and with a shard's lock held.

const AT_EVICT_CHOSEN: usize = 1;
const AT_EVICT_CHECKED: usize = 2;
const AT_PIN_STARTED: usize = 4;
const AT_FILL: usize = 8;

/// Steps the hook acts at (`AT_*` bits).
static HOOK_AT: AtomicUsize = AtomicUsize::new(0);
/// The address it acts at; 0: any.
static HOOK_ADDR: AtomicUsize = AtomicUsize::new(0);
/// The next matching step parks until `RELEASE` (once).
static PARK_ARMED: AtomicBool = AtomicBool::new(false);
static PARKED: AtomicUsize = AtomicUsize::new(0);
static RELEASE: AtomicBool = AtomicBool::new(false);
/// Otherwise each matching step sleeps a random time below this.
static DELAY_MAX_US: AtomicU64 = AtomicU64::new(0);
static HOOK_RNG: AtomicU64 = AtomicU64::new(0x2545_f491_4f6c_dd1d);
/// Matching steps seen.
static HOOK_HITS: AtomicUsize = AtomicUsize::new(0);
/// A parked thread goes on by itself after this (a test that failed before releasing it).
const PARK_MAX: Duration = Duration::from_secs(20);

fn step_bit(s: Step) -> usize {
    match s {
        Step::EvictChosen => AT_EVICT_CHOSEN,
        Step::EvictChecked => AT_EVICT_CHECKED,
        Step::PinStarted => AT_PIN_STARTED,
        // The map's reader and writer steps: not this file's (tests/map_readers.rs).
        Step::MapReading | Step::MapClosing => 0,
        _ => AT_FILL,
    }
}

fn race_hook(s: Step, addr: usize) {
    if HOOK_AT.load(SeqCst) & step_bit(s) == 0 {
        return;
    }
    let want = HOOK_ADDR.load(SeqCst);
    if want != 0 && want != addr {
        return;
    }
    HOOK_HITS.fetch_add(1, SeqCst);
    if PARK_ARMED.swap(false, SeqCst) {
        PARKED.fetch_add(1, SeqCst);
        let t = Instant::now();
        while !RELEASE.load(SeqCst) && t.elapsed() < PARK_MAX {
            std::thread::sleep(Duration::from_millis(1));
        }
        return;
    }
    let max = DELAY_MAX_US.load(SeqCst);
    if max > 0 {
        let r = Rng::next_shared(&HOOK_RNG);
        std::thread::sleep(Duration::from_micros(r % max));
    }
}

/// The installed hook; removed (and any parked thread released) on drop.
struct Hook;

impl Hook {
    fn install(at: usize, addr: usize, park: bool, delay_max_us: u64) -> Hook {
        HOOK_AT.store(at, SeqCst);
        HOOK_ADDR.store(addr, SeqCst);
        PARKED.store(0, SeqCst);
        RELEASE.store(false, SeqCst);
        DELAY_MAX_US.store(delay_max_us, SeqCst);
        HOOK_HITS.store(0, SeqCst);
        PARK_ARMED.store(park, SeqCst);
        testing::set_step_hook(Some(race_hook));
        Hook
    }

    /// Parks the first thread that takes a step of `at` at `addr`.
    fn park(at: usize, addr: usize) -> Hook {
        Hook::install(at, addr, true, 0)
    }

    /// Delays every step of `at` by up to `max_us` microseconds.
    fn delays(at: usize, max_us: u64) -> Hook {
        Hook::install(at, 0, false, max_us)
    }

    /// Waits (at most 30 s) until a thread is parked.
    fn wait_parked(&self, what: &str) {
        let t = Instant::now();
        while PARKED.load(SeqCst) == 0 {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{what}: no thread reached the parking step"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn release(&self) {
        RELEASE.store(true, SeqCst);
    }

    fn hits(&self) -> usize {
        HOOK_HITS.load(SeqCst)
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        testing::set_step_hook(None);
        RELEASE.store(true, SeqCst);
        PARK_ARMED.store(false, SeqCst);
        HOOK_AT.store(0, SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// Writes `msg` to stdout with write(2): for a forked child, which must take no lock a parent
/// thread may have held at the fork (stdout's).
fn say(msg: &str) {
    // SAFETY: writes the bytes of a live str.
    unsafe { libc::write(1, msg.as_ptr().cast(), msg.len()) };
}

/// First thing in a forked child: it dies with its parent (a parent that aborts must not leave
/// a hung child behind) and after 30 s in any case.
fn forked_child_limits() {
    // SAFETY: plain system calls on this process.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        libc::alarm(30);
    }
}

/// Whether the kernel's reclaim drops every page of the entry within 5 s (its lingering, if
/// any, ended: the pages are volatile).
fn eventually_volatile(e: &Entry) -> bool {
    let t0 = Instant::now();
    while e.resident_pages() > 0 {
        if t0.elapsed() > Duration::from_secs(5) {
            return false;
        }
        pageout(e);
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Receives `n` results from threads that send when they finish, for at most `secs`; the
/// indexes that did not finish in `Err`.
fn collect<T>(rx: &mpsc::Receiver<(usize, T)>, n: usize, secs: u64) -> Result<Vec<T>, Vec<usize>> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut got: Vec<Option<T>> = (0..n).map(|_| None).collect();
    let mut left = n;
    while left > 0 {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        match rx.recv_timeout(deadline - now) {
            Ok((i, v)) => {
                if got[i].replace(v).is_none() {
                    left -= 1;
                }
            }
            Err(_) => break,
        }
    }
    if left > 0 {
        return Err((0..n).filter(|&i| got[i].is_none()).collect());
    }
    Ok(got.into_iter().map(|v| v.expect("all in")).collect())
}

/// A panic hook that keeps quiet about the callbacks' deliberate panics (they contain
/// `QUIET_PANIC`) and hands every other one to the hook it replaced; the default hook is set
/// again on drop.
struct QuietPanics;

const QUIET_PANIC: &str = "deliberate test panic ahead";

impl QuietPanics {
    fn install() -> QuietPanics {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            if !msg.contains(QUIET_PANIC) {
                previous(info);
            }
        }));
        QuietPanics
    }
}

impl Drop for QuietPanics {
    fn drop(&mut self) {
        let _ = std::panic::take_hook(); // back to the default hook
    }
}

// ---------------------------------------------------------------------------------------------
// Tagged content: an entry's first 8 bytes are its seed (key << 32 | generation), the rest the
// seed's stream. A holder learns from its bytes which entry it holds, so a span freed under it
// and reused by another entry (another key, or the same key's next generation) shows.

fn seed_of(key: u64, gen: u64) -> u64 {
    (key << 32) | gen
}

fn tagged_fill(seed: u64, off: usize, buf: &mut [u8]) {
    fill(seed, off, buf);
    let tag = seed.to_le_bytes();
    for (i, b) in buf.iter_mut().enumerate().take(8usize.saturating_sub(off)) {
        *b = tag[off + i];
    }
}

fn tagged(seed: u64) -> impl Fn(usize, &mut [u8]) -> Result<(), RegenError> + Send + Sync {
    move |off, buf| {
        tagged_fill(seed, off, buf);
        Ok(())
    }
}

/// The seed of `bytes` if they are an entry of `key` with every byte right; else what is wrong.
fn check_tagged(bytes: &[u8], key: u64) -> Result<u64, String> {
    let seed = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if seed >> 32 != key {
        return Err(format!("key {key}: holds the bytes of seed {seed:#x}"));
    }
    let mut want = vec![0u8; CHUNK];
    let mut off = 0;
    while off < bytes.len() {
        let n = CHUNK.min(bytes.len() - off);
        tagged_fill(seed, off, &mut want[..n]);
        if bytes[off..off + n] != want[..n] {
            let bad = (0..n).find(|&i| bytes[off + i] != want[i]).unwrap_or(0);
            return Err(format!(
                "key {key} seed {seed:#x}: wrong byte at {}",
                off + bad
            ));
        }
        off += n;
    }
    Ok(seed)
}

/// Pages of the entries under `keys` now.
fn charged_pages(cache: &Cache<u64>, keys: impl Iterator<Item = u64>) -> usize {
    keys.filter_map(|k| cache.get(&k))
        .map(|e| e.len().div_ceil(PAGE))
        .sum()
}

/// The budget's charge is exact: with every key in `keys` removed (and only `kept_pages` left),
/// one-page entries filling the rest of the budget fit without an eviction, and one more page
/// evicts exactly one. The fresh entries are removed again.
fn assert_charge_exact(cache: &Cache<u64>, keys: impl Iterator<Item = u64>, budget: usize) {
    for k in keys {
        cache.remove(&k);
    }
    let kept = cache.len();
    let kept_pages: usize = cache.stats().bytes.div_ceil(PAGE); // only page-sized entries left
    let free = budget / PAGE - kept_pages;
    let before = cache.stats().evictions;
    let base = 1 << 40;
    for i in 0..free as u64 {
        cache
            .insert(base + i, PAGE, regen(base + i))
            .unwrap_or_else(|e| panic!("insert {i} of {free} into the free budget: {e}"));
    }
    assert_eq!(
        cache.stats().evictions,
        before,
        "filling the budget's {free} free pages evicted: the charge is too high"
    );
    cache
        .insert(base + free as u64, PAGE, regen(0))
        .expect("one more page");
    assert_eq!(
        cache.stats().evictions,
        before + 1,
        "one page past the budget evicted {} entries: the charge is wrong",
        cache.stats().evictions - before
    );
    assert_eq!(cache.len(), kept + free);
    for i in 0..=free as u64 {
        cache.remove(&(base + i));
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Eviction: between the choice of the victim and its removal.

const EVICT_PAGES: usize = 4;
const EVICT_BUDGET: usize = 8 * EVICT_PAGES * PAGE;

/// A cache of 8 entries of 4 pages filling its 32-page budget (keys 0..8, generation 0, all
/// reclaimed); key 0 is the least recently used.
fn full_cache(mode: Mode) -> (Arc<Cache<u64>>, Vec<Entry>) {
    let cache: Arc<Cache<u64>> = Arc::new(
        Cache::new(Config::default().mode(mode).budget(Some(EVICT_BUDGET))).expect("cache"),
    );
    let entries: Vec<Entry> = (0..8u64)
        .map(|k| {
            cache
                .insert(k, EVICT_PAGES * PAGE, tagged(seed_of(k, 0)))
                .expect("insert")
        })
        .collect();
    for (k, e) in entries.iter().enumerate() {
        check_tagged(e, k as u64).expect("first read");
    }
    testing::reclaim_all(&entries);
    (cache, entries)
}

/// An insert evicts; the step hook stops the eviction between its choice of key 0 and the
/// removal, and a holder pins key 0 there (through a handle it had, so no get refreshes it).
/// The eviction must see the pin and evict another entry: an entry pinned when the eviction
/// looks at it is never evicted. The pinned holder's bytes are right and stay resident.
#[test]
fn eviction_a_pin_between_choice_and_removal_saves_the_victim() {
    let _s = serial();
    let _w = Watchdog::new(
        "eviction_a_pin_between_choice_and_removal_saves_the_victim",
        120,
    );
    for mode in [Mode::Monitor, Mode::Sigbus] {
        let (cache, entries) = full_cache(mode);
        let victim = entries[0].clone();
        let hook = Hook::park(AT_EVICT_CHOSEN, victim.as_ptr() as usize);
        let inserter = {
            let cache = cache.clone();
            std::thread::spawn(move || {
                cache
                    .insert(100, EVICT_PAGES * PAGE, tagged(seed_of(100, 0)))
                    .map(|_| ())
            })
        };
        hook.wait_parked("the eviction of key 0");
        let pinned = victim.pin().expect("pin in the window");
        hook.release();
        inserter.join().expect("inserter").expect("insert");
        drop(hook);
        assert!(
            cache.get(&0).is_some_and(|e| e.as_ptr() == victim.as_ptr()),
            "{mode:?}: key 0, pinned between the eviction's choice and its removal, was evicted"
        );
        assert_eq!(
            cache.stats().evictions,
            1,
            "{mode:?}: one eviction made room"
        );
        assert!(
            charged_pages(&cache, (0..8).chain([100])) * PAGE <= EVICT_BUDGET,
            "{mode:?}: over the budget"
        );
        assert_eq!(
            testing::reclaim(&victim),
            0,
            "{mode:?}: pinned pages dropped"
        );
        check_tagged(&pinned, 0).unwrap_or_else(|e| panic!("{mode:?}: pinned holder: {e}"));
        drop(pinned);
        testing::reclaim(&victim);
        check_tagged(&victim, 0).unwrap_or_else(|e| panic!("{mode:?}: after the unpin: {e}"));
        assert_charge_exact(&cache, (0..8).chain([100]), EVICT_BUDGET);
    }
}

/// The eviction checked key 0 (unpinned, not used since) and is stopped just before removing it,
/// with the shard's lock held; a holder pins key 0 there. The eviction goes on and removes it
/// (the pin came after the look), but the pinned holder keeps its entry whole: every byte
/// right, resident, not reclaimable, also once new entries took the freed spans; after the
/// unpin it is rebuilt right. The evicted entry is no longer charged.
#[test]
fn eviction_a_pin_after_the_check_keeps_the_entry_for_its_holder() {
    let _s = serial();
    let _w = Watchdog::new(
        "eviction_a_pin_after_the_check_keeps_the_entry_for_its_holder",
        120,
    );
    for mode in [Mode::Monitor, Mode::Sigbus] {
        let (cache, mut entries) = full_cache(mode);
        let victim = entries.remove(0);
        drop(entries);
        let hook = Hook::park(AT_EVICT_CHECKED, victim.as_ptr() as usize);
        let inserter = {
            let cache = cache.clone();
            std::thread::spawn(move || {
                cache
                    .insert(100, EVICT_PAGES * PAGE, tagged(seed_of(100, 0)))
                    .map(|_| ())
            })
        };
        hook.wait_parked("the removal of key 0");
        let pinned = victim.pin().expect("pin in the window");
        hook.release();
        inserter.join().expect("inserter").expect("insert");
        drop(hook);
        assert!(
            !cache.contains_key(&0),
            "{mode:?}: key 0 was not evicted: the scenario (a pinned holder of an evicted entry) \
             did not happen"
        );
        // Turn the cache over: the spans of the entries evicted now are reused.
        for k in 200..216u64 {
            cache
                .insert(k, EVICT_PAGES * PAGE, tagged(seed_of(k, 0)))
                .expect("turn over");
        }
        assert_eq!(
            testing::reclaim(&victim),
            0,
            "{mode:?}: pinned pages dropped"
        );
        assert_eq!(
            check_tagged(&pinned, 0),
            Ok(seed_of(0, 0)),
            "{mode:?}: the pinned holder's entry changed under it"
        );
        drop(pinned);
        testing::reclaim(&victim);
        assert_eq!(
            check_tagged(&victim, 0),
            Ok(seed_of(0, 0)),
            "{mode:?}: rebuilt after the unpin"
        );
        let keys = || (0..8).chain([100]).chain(200..216);
        assert!(
            charged_pages(&cache, keys()) * PAGE <= EVICT_BUDGET,
            "{mode:?}: over the budget at rest"
        );
        assert_charge_exact(&cache, keys(), EVICT_BUDGET);
    }
}

/// The eviction stopped between its choice of key 0 and the removal; meanwhile a thread gets
/// key 0 (a holder), another removes it and re-inserts a new generation (both wait for the
/// eviction, which holds the cache's room lock). Whatever the eviction decides, the holder's
/// bytes stay generation 0's (also rebuilt after reclaim, and after the spans of the cache
/// turned over), key 0 ends up holding generation 1, the budget holds at rest and the charge
/// is exact. The handles to keys 1..8 are held throughout: those evicted keep their bytes.
#[test]
fn eviction_get_remove_and_reinsert_of_the_victim_in_the_window() {
    let _s = serial();
    let _w = Watchdog::new(
        "eviction_get_remove_and_reinsert_of_the_victim_in_the_window",
        120,
    );
    for mode in [Mode::Monitor, Mode::Sigbus] {
        let (cache, mut entries) = full_cache(mode);
        // Key 0: only the cache's reference (an evicted victim would be freed). Keys 1..8:
        // holders from the start, whose entries the evictions below take out of the map.
        let victim_addr = entries.remove(0).as_ptr() as usize;
        let hook = Hook::park(AT_EVICT_CHOSEN, victim_addr);
        let inserter = {
            let cache = cache.clone();
            std::thread::spawn(move || {
                cache
                    .insert(100, EVICT_PAGES * PAGE, tagged(seed_of(100, 0)))
                    .map(|_| ())
            })
        };
        hook.wait_parked("the eviction of key 0");
        let got = cache.get(&0).expect("key 0 during the window");
        let replacer = {
            let cache = cache.clone();
            std::thread::spawn(move || {
                let old = cache.remove(&0).map(|e| e.as_ptr() as usize);
                let new = cache
                    .insert(0, EVICT_PAGES * PAGE, tagged(seed_of(0, 1)))
                    .map(|e| e.as_ptr() as usize);
                (old, new)
            })
        };
        // (Only to let the replacer reach the room lock before the eviction goes on.)
        std::thread::sleep(Duration::from_millis(20));
        hook.release();
        inserter.join().expect("inserter").expect("insert");
        let (old, new) = replacer.join().expect("replacer");
        let new = new.expect("re-insert of key 0");
        drop(hook);
        if let Some(old) = old {
            assert_eq!(
                old,
                got.as_ptr() as usize,
                "{mode:?}: removed another entry"
            );
        }
        let saved = old.is_some();
        report(format_args!(
            "{mode:?}: the get in the window saved key 0 from the eviction: {saved}"
        ));
        // The holder's entry: generation 0, now and after reclaim, also once the cache turned
        // over (new entries take the freed spans).
        check_tagged(&got, 0).unwrap_or_else(|e| panic!("{mode:?}: holder: {e}"));
        for k in 200..216u64 {
            cache
                .insert(k, EVICT_PAGES * PAGE, tagged(seed_of(k, 0)))
                .expect("turn over");
        }
        testing::reclaim(&got);
        assert_eq!(
            check_tagged(&got, 0),
            Ok(seed_of(0, 0)),
            "{mode:?}: the holder's entry changed under it"
        );
        if let Some(e) = cache.get(&0) {
            assert_eq!(e.as_ptr() as usize, new);
            assert_eq!(check_tagged(&e, 0), Ok(seed_of(0, 1)), "{mode:?}: key 0");
        }
        // The other holders, whose entries were evicted meanwhile: their own bytes.
        let evicted = (1..8u64).filter(|k| !cache.contains_key(k)).count();
        assert!(evicted > 0, "{mode:?}: no held entry was evicted");
        testing::reclaim_all(&entries);
        for (i, e) in entries.iter().enumerate() {
            let k = i as u64 + 1;
            assert_eq!(
                check_tagged(e, k),
                Ok(seed_of(k, 0)),
                "{mode:?}: a holder of key {k} (evicted: {})",
                !cache.contains_key(&k)
            );
        }
        drop(entries);
        drop(got);
        let keys = || (0..8).chain([100]).chain(200..216);
        assert!(
            charged_pages(&cache, keys()) * PAGE <= EVICT_BUDGET,
            "{mode:?}: over the budget at rest"
        );
        assert_charge_exact(&cache, keys(), EVICT_BUDGET);
    }
}

/// Ten threads (past the 2 CPUs) insert, re-insert, remove, get, pin and hold entries of 24 keys
/// under a 48-page budget, while every eviction is delayed at random between its choice and its
/// removal (both steps). Five entries stay pinned throughout. Every holder's bytes are its
/// entry's, the same seed each time it looks (also after reclaim and rebuild); the pinned
/// entries are never evicted; at rest the budget holds and the charge is exact.
#[test]
fn eviction_storm_with_delays_between_choice_and_removal() {
    let _s = serial();
    let _w = Watchdog::new("eviction_storm_with_delays_between_choice_and_removal", 300);
    for mode in [Mode::Monitor, Mode::Sigbus] {
        let budget = 48 * PAGE;
        let cache: Arc<Cache<u64>> =
            Arc::new(Cache::new(Config::default().mode(mode).budget(Some(budget))).unwrap());
        let long: Vec<Entry> = (1000..1005u64)
            .map(|k| {
                let e = cache.insert(k, 2 * PAGE, tagged(seed_of(k, 0))).unwrap();
                e.pin_unguarded().unwrap();
                e
            })
            .collect();
        let keys = 24u64;
        let gens: Arc<Vec<AtomicU64>> = Arc::new((0..keys).map(|_| AtomicU64::new(0)).collect());
        let hook = Hook::delays(AT_EVICT_CHOSEN | AT_EVICT_CHECKED, 300);
        let threads = 10;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads as u64)
            .map(|t| {
                let (cache, gens, barrier) = (cache.clone(), gens.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let mut rng = Rng(0x9e37_79b9 ^ ((t + 1) * 0x1234_5677));
                    let mut holders: Vec<(u64, Entry, u64)> = Vec::new();
                    let (mut checked, mut over) = (0u64, 0u64);
                    let t0 = Instant::now();
                    while t0.elapsed() < Duration::from_secs(2) {
                        let k = rng.below(keys);
                        match rng.below(10) {
                            0 | 1 => {
                                let g = gens[k as usize].fetch_add(1, SeqCst) + 1;
                                let pages = 1 + ((k + g) % 4) as usize;
                                match cache.insert(k, pages * PAGE, tagged(seed_of(k, g))) {
                                    Ok(_) => {}
                                    Err(Error::OverBudget { .. }) => over += 1,
                                    Err(e) => panic!("insert {k}: {e}"),
                                }
                            }
                            2 => drop(cache.remove(&k)),
                            3..=5 => {
                                if let Some(e) = cache.get(&k) {
                                    check_tagged(&e, k).unwrap_or_else(|m| panic!("get: {m}"));
                                    checked += 1;
                                }
                            }
                            6 | 7 => {
                                if let Some(e) = cache.get(&k) {
                                    let p = e.pin().expect("pin");
                                    let seed =
                                        check_tagged(&p, k).unwrap_or_else(|m| panic!("pin: {m}"));
                                    std::thread::yield_now();
                                    if rng.below(50) == 0 {
                                        assert_eq!(testing::reclaim(&e), 0, "pinned, dropped");
                                    }
                                    assert_eq!(check_tagged(&p, k), Ok(seed), "under the pin");
                                    checked += 1;
                                }
                            }
                            8 => {
                                if let Some(e) = cache.get(&k) {
                                    let seed =
                                        check_tagged(&e, k).unwrap_or_else(|m| panic!("hold: {m}"));
                                    holders.push((k, e, seed));
                                    if holders.len() > 8 {
                                        holders.remove(0);
                                    }
                                }
                            }
                            _ => {
                                if !holders.is_empty() {
                                    let i = rng.below(holders.len() as u64) as usize;
                                    let (k, e, seed) = holders.swap_remove(i);
                                    if rng.below(20) == 0 {
                                        testing::reclaim(&e);
                                    }
                                    assert_eq!(
                                        check_tagged(&e, k),
                                        Ok(seed),
                                        "a holder's entry changed under it"
                                    );
                                    checked += 1;
                                }
                            }
                        }
                    }
                    for (k, e, seed) in holders {
                        assert_eq!(check_tagged(&e, k), Ok(seed), "a holder at the end");
                    }
                    (checked, over)
                })
            })
            .collect();
        let (mut checked, mut over) = (0, 0);
        for h in handles {
            let (c, o) = h.join().expect("a thread failed");
            checked += c;
            over += o;
        }
        let hits = hook.hits();
        drop(hook);
        let s = cache.stats();
        report(format_args!(
            "{mode:?}: eviction storm: {checked} checks, {} evictions, {hits} delayed steps, \
             {over} inserts over the budget",
            s.evictions
        ));
        assert!(
            s.evictions > 100 && hits > 100,
            "{mode:?}: too few evictions"
        );
        for (i, e) in long.iter().enumerate() {
            let k = 1000 + i as u64;
            assert!(
                cache.get(&k).is_some_and(|c| c.as_ptr() == e.as_ptr()),
                "{mode:?}: entry {k}, pinned throughout, was evicted"
            );
            assert_eq!(check_tagged(e, k), Ok(seed_of(k, 0)));
            e.unpin_unguarded().unwrap();
        }
        assert!(
            charged_pages(&cache, (0..keys).chain(1000..1005)) * PAGE <= budget,
            "{mode:?}: over the budget at rest"
        );
        drop(long);
        assert_charge_exact(&cache, (0..keys).chain(1000..1005), budget);
    }
}

/// fork while an eviction holds the cache's room lock (stopped between its choice and the
/// removal): the child's `insert`, `insert_with` and `get_or_insert_with` must return
/// `Error::ForkedChild`, as the fork section of the docs promises, not wait forever for a lock
/// that no thread of the child will ever release.
#[test]
fn fork_while_an_eviction_holds_the_room_lock() {
    let _s = serial();
    let (status, out) = run_child("fork_mid_eviction", &[], Duration::from_secs(120));
    println!("--- child: {status:?}\n{out}");
    assert!(status.success(), "child ended {status:?}\n{out}");
    assert!(out.contains("GRANDCHILD-STATUS exit 0"), "{out}");
    assert!(out.contains("PARENT-OK"), "{out}");
}

fn child_fork_mid_eviction() {
    let _w = Watchdog::new("fork_mid_eviction", 100);
    let (cache, entries) = full_cache(Mode::Monitor);
    let hook = Hook::park(AT_EVICT_CHOSEN, entries[0].as_ptr() as usize);
    let inserter = {
        let cache = cache.clone();
        std::thread::spawn(move || {
            cache
                .insert(100, EVICT_PAGES * PAGE, tagged(seed_of(100, 0)))
                .map(|_| ())
        })
    };
    hook.wait_parked("the eviction of key 0");
    println!("forking while the eviction holds the room lock");
    // SAFETY: the grandchild calls the API on inherited objects (the test), writes with
    // write(2) and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        forked_child_limits();
        let mut bad = 0;
        let mut check = |what: &str, r: Result<Entry, Error>| {
            let ok = matches!(r, Err(Error::ForkedChild));
            say(&format!(
                "GRANDCHILD {what}: {} {:?}\n",
                if ok { "ok" } else { "WRONG" },
                r.as_ref().err()
            ));
            bad += !ok as i32;
            std::mem::forget(r);
        };
        say("GRANDCHILD insert\n");
        check("insert", cache.insert(200, PAGE, regen(200)));
        check(
            "insert_with",
            cache.insert_with(201, &[7u8; PAGE], regen(201)),
        );
        check(
            "get_or_insert_with",
            cache.get_or_insert_with(202, PAGE, regen(202)),
        );
        // SAFETY: ends the grandchild without running the parent's atexit handlers.
        unsafe { libc::_exit(bad) };
    }
    let status = wait_forked(pid, 10);
    println!("GRANDCHILD-STATUS {}", describe_status(status));
    hook.release();
    inserter
        .join()
        .expect("inserter")
        .expect("insert in the parent");
    drop(hook);
    for k in 1..8u64 {
        if let Some(e) = cache.get(&k) {
            check_tagged(&e, k).expect("parent's entry");
        }
    }
    println!("PARENT-OK");
}

// ---------------------------------------------------------------------------------------------
// 2. Fill ahead.

const AHEAD_CHUNKS: usize = 16; // a 1 MiB entry

/// A lazy entry whose callback counts its calls per chunk (`calls[c]`).
fn counted_entry(cache: &Cache<u64>, key: u64, chunks: usize) -> (Entry, Arc<Vec<AtomicUsize>>) {
    let calls: Arc<Vec<AtomicUsize>> = Arc::new((0..chunks).map(|_| AtomicUsize::new(0)).collect());
    let c = calls.clone();
    let e = cache
        .insert(key, chunks * CHUNK, move |off, buf: &mut [u8]| {
            c[off / CHUNK].fetch_add(1, SeqCst);
            fill(key, off, buf);
            Ok::<(), RegenError>(())
        })
        .expect("insert");
    (e, calls)
}

/// Reads chunks `from..to` front to back (every byte) and returns the wrong bytes.
fn read_front_to_back(e: &Entry, seed: u64, from: usize, to: usize) -> usize {
    let mut want = vec![0u8; CHUNK];
    let mut bad = 0;
    for c in from..to {
        fill(seed, c * CHUNK, &mut want);
        let got = &e[c * CHUNK..(c + 1) * CHUNK];
        if got != &want[..] {
            bad += got.iter().zip(&want).filter(|(a, b)| a != b).count();
        }
    }
    bad
}

/// 96 threads (past the monitor's 64 workers for the program's faults) each read their own
/// reclaimed 1 MiB entry front to back, at once, with random delays between the steps of every
/// fill. Every byte right, each chunk's callback called at most once (one fill per chunk, ahead
/// or not), and chunks were filled ahead.
#[test]
fn read_ahead_more_sequential_readers_than_workers() {
    let _s = serial();
    let _w = Watchdog::new("read_ahead_more_sequential_readers_than_workers", 300);
    let cache: Cache<u64> = Cache::new(Config::default().mode(Mode::Monitor)).unwrap();
    let readers = 96;
    let entries: Vec<(Entry, Arc<Vec<AtomicUsize>>)> = (0..readers as u64)
        .map(|k| counted_entry(&cache, k, AHEAD_CHUNKS))
        .collect();
    for (k, (e, calls)) in entries.iter().enumerate() {
        assert_eq!(mismatches(e, k as u64), 0);
        calls.iter().for_each(|c| c.store(0, SeqCst));
    }
    let dropped = testing::reclaim_all(entries.iter().map(|(e, _)| e));
    assert!(
        dropped > readers * AHEAD_CHUNKS * CHUNK / PAGE / 2,
        "{dropped} pages dropped"
    );
    let before = cache.stats();
    let hook = Hook::delays(AT_FILL, 100);
    let barrier = Arc::new(Barrier::new(readers));
    let (tx, rx) = mpsc::channel();
    for (k, (e, _)) in entries.iter().enumerate() {
        let (e, barrier, tx) = (e.clone(), barrier.clone(), tx.clone());
        std::thread::spawn(move || {
            barrier.wait();
            let bad = read_front_to_back(&e, k as u64, 0, AHEAD_CHUNKS);
            let _ = tx.send((k, bad));
        });
    }
    let bad = collect(&rx, readers, 120)
        .unwrap_or_else(|left| panic!("readers {left:?} did not finish: a hang"));
    drop(hook);
    let s = cache.stats();
    let ahead = s.pages_read_ahead - before.pages_read_ahead;
    report(format_args!(
        "{readers} sequential readers: {} faults, {ahead} pages filled ahead, {} workers now",
        s.faults_handled - before.faults_handled,
        cache.worker_threads()
    ));
    assert!(bad.iter().all(|&b| b == 0), "wrong bytes: {bad:?}");
    for (k, (_, calls)) in entries.iter().enumerate() {
        for (c, n) in calls.iter().enumerate() {
            assert!(
                n.load(SeqCst) <= 1,
                "entry {k} chunk {c} filled {n:?} times"
            );
        }
    }
    assert!(ahead > 0, "nothing was filled ahead");
}

/// 96 threads read one reclaimed 4 MiB entry front to back at once, three rounds, with random
/// delays between the steps of every fill: their faults and the fills ahead of each other race
/// on the same chunks. Every byte right; each chunk's callback called at most once a round.
#[test]
fn read_ahead_many_readers_on_one_entry() {
    let _s = serial();
    let _w = Watchdog::new("read_ahead_many_readers_on_one_entry", 300);
    let cache: Cache<u64> = Cache::new(Config::default().mode(Mode::Monitor)).unwrap();
    let chunks = 64;
    let (e, calls) = counted_entry(&cache, 7, chunks);
    assert_eq!(mismatches(&e, 7), 0);
    let hook = Hook::delays(AT_FILL, 200);
    let readers = 96;
    for round in 0..3 {
        calls.iter().for_each(|c| c.store(0, SeqCst));
        testing::reclaim(&e);
        let before = cache.stats().pages_read_ahead;
        let barrier = Arc::new(Barrier::new(readers));
        let (tx, rx) = mpsc::channel();
        for t in 0..readers {
            let (e, barrier, tx) = (e.clone(), barrier.clone(), tx.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let _ = tx.send((t, read_front_to_back(&e, 7, 0, chunks)));
            });
        }
        let bad = collect(&rx, readers, 120)
            .unwrap_or_else(|left| panic!("round {round}: readers {left:?} hang"));
        assert!(bad.iter().all(|&b| b == 0), "round {round}: {bad:?}");
        let max = calls.iter().map(|c| c.load(SeqCst)).max().unwrap_or(0);
        assert!(max <= 1, "round {round}: a chunk filled {max} times");
        report(format_args!(
            "one entry, {readers} readers, round {round}: {} pages filled ahead",
            cache.stats().pages_read_ahead - before
        ));
    }
    drop(hook);
}

/// How the callback of `broken_entry` treats its broken chunk.
#[derive(Clone, Copy, Debug)]
enum Broken {
    Fails,
    Panics,
}

/// A lazy entry of `AHEAD_CHUNKS` chunks (stream `seed`) whose chunk `bad` fails or panics
/// while `broken` is set.
fn broken_entry(
    cache: &Cache<u64>,
    key: u64,
    seed: u64,
    bad: usize,
    how: Broken,
    broken: &Arc<AtomicBool>,
) -> Entry {
    let b = broken.clone();
    cache
        .insert(key, AHEAD_CHUNKS * CHUNK, move |off, buf: &mut [u8]| {
            if off / CHUNK == bad && b.load(SeqCst) {
                match how {
                    Broken::Fails => return Err(format!("chunk {bad} failed (test)").into()),
                    Broken::Panics => panic!("{QUIET_PANIC}: chunk {bad}"),
                }
            }
            fill(seed, off, buf);
            Ok::<(), RegenError>(())
        })
        .expect("insert")
}

const BAD_CHUNK: usize = 8;

/// Under the zero policy, 80 readers on their own entries plus 16 on one shared entry read
/// front to back while chunk 8 of every entry fails (half return an error, half panic) every
/// time: when it is filled ahead, and when its own fault asks. Chunk 8 reads as zeros, every
/// other byte is right, each entry is marked failed (and no process aborts); once the cause is
/// fixed a pin rebuilds every entry whole.
#[test]
fn read_ahead_failing_and_panicking_chunks_zero_policy() {
    let _s = serial();
    let _w = Watchdog::new("read_ahead_failing_and_panicking_chunks_zero_policy", 300);
    let _quiet = QuietPanics::install();
    let cache: Cache<u64> = Cache::new(
        Config::default()
            .mode(Mode::Monitor)
            .on_failure(FailurePolicy::Zero),
    )
    .unwrap();
    let broken = Arc::new(AtomicBool::new(true));
    let own = 80;
    let entries: Vec<Entry> = (0..=own as u64)
        .map(|k| {
            let how = if k % 2 == 0 {
                Broken::Fails
            } else {
                Broken::Panics
            };
            broken_entry(&cache, k, 100 + k, BAD_CHUNK, how, &broken)
        })
        .collect();
    let shared = own; // entry 80 is read by 16 threads
    let readers = own + 16;
    let barrier = Arc::new(Barrier::new(readers));
    let (tx, rx) = mpsc::channel();
    for t in 0..readers {
        let k = t.min(shared);
        let (e, barrier, tx) = (entries[k].clone(), barrier.clone(), tx.clone());
        std::thread::spawn(move || {
            barrier.wait();
            let seed = 100 + k as u64;
            let before = read_front_to_back(&e, seed, 0, BAD_CHUNK);
            let zeros = e[BAD_CHUNK * CHUNK..(BAD_CHUNK + 1) * CHUNK]
                .iter()
                .all(|&b| b == 0);
            let after = read_front_to_back(&e, seed, BAD_CHUNK + 1, AHEAD_CHUNKS);
            let _ = tx.send((t, (before + after, zeros)));
        });
    }
    let got = collect(&rx, readers, 120)
        .unwrap_or_else(|left| panic!("readers {left:?} did not finish: a hang"));
    for (t, &(bad, zeros)) in got.iter().enumerate() {
        assert_eq!(bad, 0, "reader {t}: wrong bytes outside the failing chunk");
        assert!(zeros, "reader {t}: the failing chunk did not read as zeros");
    }
    let s = cache.stats();
    report(format_args!(
        "failing chunks: {} failures, {} pages filled ahead, {} failed entries",
        s.regenerate_failures, s.pages_read_ahead, s.failed_entries
    ));
    assert_eq!(s.failed_entries, own + 1);
    for (k, e) in entries.iter().enumerate() {
        assert!(e.is_failed(), "entry {k} not marked failed");
        let msg = e.last_error().unwrap_or_default();
        let want = if k % 2 == 0 {
            "failed (test)"
        } else {
            "panicked"
        };
        assert!(msg.contains(want), "entry {k}: {msg}");
    }
    broken.store(false, SeqCst);
    for (k, e) in entries.iter().enumerate() {
        drop(e.pin().expect("pin after the fix"));
        assert!(!e.is_failed(), "entry {k} still failed after its rebuild");
        assert_eq!(mismatches(e, 100 + k as u64), 0, "entry {k} after the fix");
    }
}

/// Under the poison policy (child process): 70 readers on their own entries read every chunk
/// but chunk 8, which fails (error or panic) every time, including when it is filled ahead of
/// them: none of them is killed and their bytes are right (a failure ahead poisons nothing).
/// Then a touch of chunk 8 itself gets the policy: SIGBUS (SIGSEGV where the kernel has no
/// UFFDIO_POISON).
#[test]
fn read_ahead_failing_chunks_poison_only_when_touched() {
    let _s = serial();
    let (status, out) = run_child("poison_ahead", &[], Duration::from_secs(240));
    println!("--- child: {status:?}\n{out}");
    assert!(
        out.contains("READERS-OK"),
        "the readers did not finish:\n{out}"
    );
    assert!(out.contains("touching") && !out.contains("READ "), "{out}");
    assert_eq!(
        signal_of(&status),
        Some(poison_signal(true)),
        "the touch of the failing chunk: {status:?}\n{out}"
    );
}

fn child_poison_ahead() {
    let _w = Watchdog::new("poison_ahead", 200);
    let _quiet = QuietPanics::install();
    let cache: Cache<u64> = Cache::new(
        Config::default()
            .mode(Mode::Monitor)
            .on_failure(FailurePolicy::Poison),
    )
    .unwrap();
    let broken = Arc::new(AtomicBool::new(true));
    let readers = 70;
    let entries: Vec<Entry> = (0..readers as u64)
        .map(|k| {
            let how = if k % 2 == 0 {
                Broken::Fails
            } else {
                Broken::Panics
            };
            broken_entry(&cache, k, 300 + k, BAD_CHUNK, how, &broken)
        })
        .collect();
    let barrier = Arc::new(Barrier::new(readers));
    let (tx, rx) = mpsc::channel();
    for (k, e) in entries.iter().enumerate() {
        let (e, barrier, tx) = (e.clone(), barrier.clone(), tx.clone());
        std::thread::spawn(move || {
            barrier.wait();
            let seed = 300 + k as u64;
            let bad = read_front_to_back(&e, seed, 0, BAD_CHUNK)
                + read_front_to_back(&e, seed, BAD_CHUNK + 1, AHEAD_CHUNKS);
            let _ = tx.send((k, bad));
        });
    }
    let bad = collect(&rx, readers, 150)
        .unwrap_or_else(|left| panic!("readers {left:?} did not finish: a hang"));
    assert!(bad.iter().all(|&b| b == 0), "wrong bytes: {bad:?}");
    let s = cache.stats();
    println!(
        "READERS-OK: {} failures, {} pages filled ahead",
        s.regenerate_failures, s.pages_read_ahead
    );
    println!("touching");
    let x = std::hint::black_box(entries[1][BAD_CHUNK * CHUNK + 10]);
    println!("READ {x}: the failing chunk was read");
    std::process::exit(4);
}

/// Releases callbacks blocked in `Blocker::wait`; counts them.
#[derive(Default)]
struct Blocker {
    released: Mutex<bool>,
    cv: std::sync::Condvar,
    /// Callbacks blocked now, and in all.
    now: AtomicUsize,
    total: AtomicUsize,
}

impl Blocker {
    /// Blocks until released (at most 100 s: a failing test must end).
    fn wait(&self) {
        self.now.fetch_add(1, SeqCst);
        self.total.fetch_add(1, SeqCst);
        let mut go = self.released.lock().unwrap_or_else(|p| p.into_inner());
        let t = Instant::now();
        while !*go && t.elapsed() < Duration::from_secs(100) {
            go = self
                .cv
                .wait_timeout(go, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        self.now.fetch_sub(1, SeqCst);
    }

    fn release(&self) {
        *self.released.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
    }
}

/// A lazy entry (stream `seed`) whose callback blocks for every chunk from `from` on until
/// `blocker` is released.
fn blocking_entry(
    cache: &Cache<u64>,
    key: u64,
    seed: u64,
    from: usize,
    blocker: &Arc<Blocker>,
) -> Entry {
    let b = blocker.clone();
    cache
        .insert(key, AHEAD_CHUNKS * CHUNK, move |off, buf: &mut [u8]| {
            if off / CHUNK >= from {
                b.wait();
            }
            fill(seed, off, buf);
            Ok::<(), RegenError>(())
        })
        .expect("insert")
}

/// Readers read chunks 0..8 of their entries front to back; the callback blocks (never returns
/// until the test lets it) for chunks 8 on, which only fills ahead of them ask for. `own`
/// readers have their own entry; `shared` more read one entry together. Waits at most 60 s for
/// the readers, then releases the callbacks and checks every byte. Returns how many callbacks
/// were still blocked when the readers were done, or which readers did not finish.
fn blocked_ahead(own: usize, shared: usize) -> Result<usize, String> {
    let cache: Cache<u64> = Cache::new(Config::default().mode(Mode::Monitor)).unwrap();
    let blocker = Arc::new(Blocker::default());
    let entries: Vec<Entry> = (0..=own as u64)
        .map(|k| blocking_entry(&cache, k, 500 + k, BAD_CHUNK, &blocker))
        .collect();
    let readers = own + shared;
    let barrier = Arc::new(Barrier::new(readers));
    let (tx, rx) = mpsc::channel();
    let mut handles = Vec::new();
    for t in 0..readers {
        let k = t.min(own);
        let (e, barrier, tx) = (entries[k].clone(), barrier.clone(), tx.clone());
        handles.push(std::thread::spawn(move || {
            barrier.wait();
            let _ = tx.send((t, read_front_to_back(&e, 500 + k as u64, 0, BAD_CHUNK)));
        }));
    }
    let done = collect(&rx, readers, 60);
    let blocked = blocker.now.load(SeqCst);
    let workers = cache.worker_threads();
    blocker.release();
    for h in handles {
        h.join().expect("reader");
    }
    // Released: every byte of every entry right (the blocked fills ahead completed).
    for (k, e) in entries.iter().enumerate() {
        assert_eq!(
            mismatches(e, 500 + k as u64),
            0,
            "entry {k} after the release"
        );
    }
    report(format_args!(
        "blocked ahead: {own}+{shared} readers, {blocked} callbacks blocked when the readers \
         were done (or given up on), {} in all, {workers} workers",
        blocker.total.load(SeqCst)
    ));
    match done {
        Ok(bad) => {
            assert!(bad.iter().all(|&b| b == 0), "wrong bytes: {bad:?}");
            Ok(blocked)
        }
        Err(left) => Err(format!(
            "{} of {readers} readers (e.g. {:?}) did not finish while {blocked} callbacks ahead \
             were blocked ({workers} workers)",
            left.len(),
            &left[..left.len().min(8)]
        )),
    }
}

/// 16 readers on their own entries and 32 on one shared entry (fewer blocked fills than the
/// monitor's 64 workers): callbacks that never return (until released) for chunks filled ahead
/// hold up no reader: every reader finishes while they are still blocked.
#[test]
fn read_ahead_a_blocked_callback_ahead_holds_up_no_reader() {
    let _s = serial();
    let _w = Watchdog::new(
        "read_ahead_a_blocked_callback_ahead_holds_up_no_reader",
        300,
    );
    let blocked = blocked_ahead(16, 32).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        blocked > 0,
        "no callback was blocked when the readers finished: the scenario did not happen"
    );
}

/// 100 readers on their own entries, each entry's callback blocking (until released) for the
/// chunks that only fills ahead of the reader ask for: more blocked fills ahead than the
/// monitor's 64 workers for the program's faults. The readers asked for none of those chunks,
/// so they must all finish while the callbacks are blocked.
#[test]
fn read_ahead_blocked_callbacks_ahead_past_the_worker_cap() {
    let _s = serial();
    let _w = Watchdog::new(
        "read_ahead_blocked_callbacks_ahead_past_the_worker_cap",
        300,
    );
    blocked_ahead(100, 0).unwrap_or_else(|e| panic!("{e}"));
}

// ---------------------------------------------------------------------------------------------
// 3. fork while entries linger after their last unpin.

/// The calls a forked child makes on inherited entries and caches: each must give
/// `Error::ForkedChild` (or, for plain map lookups, nothing harmful), then everything is
/// dropped. Writes one line per check with write(2) and `_exit`s with the number of wrong ones.
/// `verbose`: a line for every check, else for the wrong ones only (the output goes to a pipe
/// that is read only once the test's child process ends: many forks must not fill it).
fn grandchild_api(cache: Arc<Cache<u64>>, entries: Vec<Entry>, verbose: bool) -> ! {
    let (mut bad, mut checks) = (0, 0);
    let mut check = |what: String, ok: bool, got: String| {
        if verbose || !ok {
            say(&format!(
                "GRANDCHILD {what}: {} {got}\n",
                if ok { "ok" } else { "WRONG" }
            ));
        }
        bad += !ok as i32;
        checks += 1;
    };
    let forked = |r: &Result<(), Error>| matches!(r, Err(Error::ForkedChild));
    for (i, e) in entries.iter().enumerate() {
        let r = e.read(|b| b[0]).map(|_| ());
        check(format!("entry {i} read"), forked(&r), format!("{r:?}"));
        let r = e.pin();
        let ok = matches!(r, Err(Error::ForkedChild));
        check(
            format!("entry {i} pin"),
            ok,
            format!("{:?}", r.as_ref().err()),
        );
        std::mem::forget(r);
        let r = e.pin_unguarded();
        check(
            format!("entry {i} pin_unguarded"),
            forked(&r),
            format!("{r:?}"),
        );
        let r = e.unpin_unguarded();
        check(
            format!("entry {i} unpin_unguarded"),
            forked(&r),
            format!("{r:?}"),
        );
        let r = e.check_process();
        check(
            format!("entry {i} check_process"),
            forked(&r),
            format!("{r:?}"),
        );
    }
    let r = cache.insert(1 << 20, 4 * PAGE, regen(1)).map(|_| ());
    check("insert".into(), forked(&r), format!("{r:?}"));
    let r = cache
        .insert_with(1 << 21, &[5u8; PAGE], regen(2))
        .map(|_| ());
    check("insert_with".into(), forked(&r), format!("{r:?}"));
    let r = cache
        .get_or_insert_with(1 << 22, PAGE, regen(3))
        .map(|_| ());
    check("get_or_insert_with".into(), forked(&r), format!("{r:?}"));
    let r = Cache::<u64>::new(Config::default().mode(Mode::Monitor)).map(|_| ());
    check("Cache::new".into(), forked(&r), format!("{r:?}"));
    // Lookups in the child's copy of the map: handles it may drop.
    drop(cache.get(&0));
    drop(cache.remove(&1));
    drop(entries);
    drop(cache);
    say(&format!("GRANDCHILD DONE: {checks} checks, {bad} wrong\n"));
    // SAFETY: ends the grandchild without running the parent's atexit handlers.
    unsafe { libc::_exit(bad) }
}

/// Opens when released; counts callbacks waiting at it.
#[derive(Default)]
struct FillGate {
    armed: AtomicBool,
    entered: AtomicUsize,
    released: AtomicBool,
}

impl FillGate {
    fn pass(&self) {
        if !self.armed.load(SeqCst) {
            return;
        }
        self.entered.fetch_add(1, SeqCst);
        let t = Instant::now();
        while !self.released.load(SeqCst) && t.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Entries 0..6 linger (1 s unpin delay), entry 6 is pinned (and 10, by a guard the child
/// drops), a first pin of entry 7 is stopped
/// inside (its pin lock held: `Step::PinStarted`), a fill of entry 8 is in flight (its callback
/// blocked), entry 9 is reclaimed: then fork. The child calls the API on all of them and on the
/// cache (every call refused with `Error::ForkedChild`, no hang), drops everything and exits 0.
/// The parent's pin and fill go on during the child; afterwards every entry of the parent is
/// right, the lingering entries become volatile (the kernel's own reclaim drops every page),
/// and so do the pinned ones after their unpins.
#[test]
fn fork_while_entries_linger_and_a_pin_is_in_progress() {
    let _s = serial();
    let (status, out) = run_child("fork_linger", &[], Duration::from_secs(180));
    println!("--- child: {status:?}\n{out}");
    assert!(status.success(), "child ended {status:?}\n{out}");
    assert!(out.contains("GRANDCHILD DONE"), "{out}");
    assert!(!out.contains("WRONG"), "{out}");
    assert!(out.contains("GRANDCHILD-STATUS exit 0"), "{out}");
    assert!(out.contains("PARENT-OK"), "{out}");
}

fn child_fork_linger() {
    let _w = Watchdog::new("fork_linger", 150);
    let cache: Arc<Cache<u64>> = Arc::new(
        Cache::new(
            Config::default()
                .mode(Mode::Monitor)
                .unpin_delay(Duration::from_secs(1)),
        )
        .unwrap(),
    );
    let pages = 16;
    let n = 11;
    let (pinned, mid_pin, mid_fill, guarded) = (6, 7, 8, 10);
    let gate = Arc::new(FillGate::default());
    let entries: Vec<Entry> = (0..n as u64)
        .map(|k| {
            let g = gate.clone();
            cache
                .insert(k, pages * PAGE, move |off, buf: &mut [u8]| {
                    if k == 8 {
                        g.pass();
                    }
                    fill(400 + k, off, buf);
                    Ok::<(), RegenError>(())
                })
                .unwrap()
        })
        .collect();
    for (k, e) in entries.iter().enumerate() {
        assert_eq!(mismatches(e, 400 + k as u64), 0);
    }
    testing::reclaim_all(&entries);
    // Entry 8's fill must have pages to rebuild (a page the reclaim missed stays).
    for _ in 0..20 {
        if entries[mid_fill].resident_pages() < pages {
            break;
        }
        testing::reclaim(&entries[mid_fill]);
    }
    assert!(
        entries[mid_fill].resident_pages() < pages,
        "entry 8 not reclaimed"
    );
    for e in &entries[..6] {
        drop(e.pin().unwrap()); // rebuilt by the pin, then lingering
    }
    entries[pinned].pin_unguarded().unwrap();
    let guard = entries[guarded].pin().unwrap();
    // Lingering (the kernel's side of it is tests/unpin_delay.rs's; a MADV_PAGEOUT here would
    // leave the pages in a per-CPU batch, off the LRU, when the lingering ends).
    for (k, e) in entries[..6].iter().enumerate() {
        assert_eq!(e.resident_pages(), pages, "entry {k} not resident");
    }
    let s = cache.stats();
    assert_eq!(
        s.resident_pinned_bytes,
        8 * pages * PAGE,
        "6 entries lingering and 2 pinned: {s}"
    );
    let hook = Hook::park(AT_PIN_STARTED, entries[mid_pin].as_ptr() as usize);
    let pinner = {
        let e = entries[mid_pin].clone();
        std::thread::spawn(move || e.pin_unguarded())
    };
    hook.wait_parked("the first pin of entry 7");
    gate.armed.store(true, SeqCst);
    let filler = {
        let e = entries[mid_fill].clone();
        std::thread::spawn(move || mismatches(&e, 408))
    };
    let t = Instant::now();
    while gate.entered.load(SeqCst) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the fill of entry 8 never started"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    println!("forking: entries 0..6 linger, 6 and 10 pinned, 7 mid-pin, 8 mid-fill");
    // SAFETY: the grandchild calls the API on inherited objects (the test), writes with
    // write(2) and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        forked_child_limits();
        drop(guard); // its unpin does nothing here
        say("GRANDCHILD guard dropped\n");
        grandchild_api(cache, entries, true);
    }
    // The pin and the fill go on while the grandchild runs.
    hook.release();
    gate.released.store(true, SeqCst);
    let status = wait_forked(pid, 30);
    println!("GRANDCHILD-STATUS {}", describe_status(status));
    pinner
        .join()
        .expect("pinner")
        .expect("the parent's pin of entry 7");
    assert_eq!(filler.join().expect("filler"), 0, "entry 8's bytes");
    drop(hook);
    for (k, e) in entries.iter().enumerate() {
        assert_eq!(
            mismatches(e, 400 + k as u64),
            0,
            "parent's entry {k} after the fork"
        );
    }
    // The lingering ends (the three pinned entries left), and once the region's later advices
    // are done too (50 ms and 500 ms after the first: nothing of the test's own reclaim takes
    // pages off the LRU meanwhile), the kernel's own reclaim (not `testing::reclaim`, which
    // would end the lingering itself) takes every page.
    let s = cache.stats();
    assert!(
        lingering_over(&cache, 3 * pages * PAGE),
        "the lingering never ended after the fork: {s}"
    );
    std::thread::sleep(Duration::from_millis(700));
    for (k, e) in entries[..6].iter().enumerate() {
        assert!(
            eventually_volatile(e),
            "entry {k}: lingering never ended after the fork: {} pages resident; {}",
            e.resident_pages(),
            cache.stats()
        );
    }
    assert_eq!(cache.stats().pinned_entries, 3);
    for &k in &[pinned, mid_pin, guarded] {
        assert_eq!(
            entries[k].resident_pages(),
            pages,
            "entry {k}: pinned pages dropped"
        );
    }
    drop(guard);
    for &k in &[pinned, mid_pin] {
        entries[k].unpin_unguarded().expect("unpin");
    }
    assert!(lingering_over(&cache, 0), "the last lingering never ended");
    std::thread::sleep(Duration::from_millis(700));
    for &k in &[pinned, mid_pin, guarded] {
        assert!(
            eventually_volatile(&entries[k]),
            "entry {k}: never volatile after its unpin: {} pages resident; {}",
            entries[k].resident_pages(),
            cache.stats()
        );
    }
    let s = cache.stats();
    assert_eq!(s.resident_pinned_bytes, 0, "{s}");
    for (k, e) in entries.iter().enumerate() {
        assert_eq!(mismatches(e, 400 + k as u64), 0, "entry {k} rebuilt");
    }
    let extra = cache.insert(100, 10 * PAGE, regen(100)).unwrap();
    assert_eq!(mismatches(&extra, 100), 0);
    println!("PARENT-OK");
}

/// Waits at most 5 s until the cache's entries linger no more: `Stats::resident_pinned_bytes`
/// (pinned and lingering bytes) is down to `pinned_bytes`. The end of a lingering has advised
/// the pages by then (it runs under the pin lock that `stats` takes).
fn lingering_over(cache: &Cache<u64>, pinned_bytes: usize) -> bool {
    let t0 = Instant::now();
    while cache.stats().resident_pinned_bytes > pinned_bytes {
        if t0.elapsed() > Duration::from_secs(5) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// The end of lingering gives an entry's pages one MADV_FREE (from the monitor's thread, and
/// from the CPUs of the pin and the unpin); an unpin without delay gives one too. MADV_FREE
/// skips a page that is off the LRU lists at that moment, and without swap a skipped page then
/// stays resident for good: the entry is unpinned, `Stats` count it volatile, but the kernel can
/// never take it. Reclaim takes pages off the LRU while it scans them (and puts pages it cannot
/// drop, as lingering ones, back through a per-CPU batch): here a thread runs the kernel's
/// reclaim (MADV_PAGEOUT) over 32 entries for 45 ms while they are unpinned and their delays
/// end, as kswapd or proactive reclaim (`memory.reclaim`) would under pressure. Then reclaim
/// stops, the per-CPU batches are drained, and 700 ms later (past the two more advices a region
/// gets after its unpin, 50 ms and then 500 ms later, each from every CPU in turn: reclaim puts
/// back the pages it scanned through the batch of whichever CPU it ran on, and an advice drains
/// only its own CPU's batch) every page of every entry must be
/// droppable: the test's own reclaim (`eventually_volatile`) starts only then, so that it does
/// not take pages off the LRU while an advice comes. Run with a 30 ms delay and with none.
#[test]
fn unpinned_entries_end_volatile_while_reclaim_scans_them() {
    let _s = serial();
    let _w = Watchdog::new(
        "unpinned_entries_end_volatile_while_reclaim_scans_them",
        300,
    );
    let mut stuck = Vec::new();
    for delay in [Duration::from_millis(30), Duration::ZERO] {
        let cache: Cache<u64> =
            Cache::new(Config::default().mode(Mode::Monitor).unpin_delay(delay)).unwrap();
        let pages = 16;
        let entries: Arc<Vec<Entry>> = Arc::new(
            (0..32u64)
                .map(|k| cache.insert(k, pages * PAGE, regen(700 + k)).unwrap())
                .collect(),
        );
        for round in 0..6 {
            let stop = Arc::new(AtomicBool::new(false));
            let reclaimer = {
                let (entries, stop) = (entries.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(SeqCst) {
                        for e in entries.iter() {
                            // SAFETY: MADV_PAGEOUT drops only clean, lazily freed pages.
                            unsafe {
                                libc::madvise(
                                    e.as_ptr() as *mut libc::c_void,
                                    e.len(),
                                    libc::MADV_PAGEOUT,
                                )
                            };
                        }
                    }
                })
            };
            for e in entries.iter() {
                drop(e.pin().unwrap()); // rebuilt if need be, then lingering (or volatile)
            }
            std::thread::sleep(Duration::from_millis(45)); // the delays end meanwhile
            stop.store(true, SeqCst);
            reclaimer.join().unwrap();
            // MADV_PAGEOUT puts the pages it could not drop back through the calling CPU's
            // batch (kswapd puts them on the LRU lists directly): drained, so that nothing of
            // the test's own stays off the LRU.
            testing::drain_lru_batches();
            std::thread::sleep(Duration::from_millis(700));
            assert!(
                lingering_over(&cache, 0),
                "{delay:?} round {round}: still lingering"
            );
            for (k, e) in entries.iter().enumerate() {
                if !eventually_volatile(e) {
                    stuck.push((delay.as_millis(), round, k, e.resident_pages()));
                }
            }
            assert_eq!(mismatches(&entries[round], 700 + round as u64), 0);
        }
    }
    assert!(
        stuck.is_empty(),
        "entries (delay ms, round, index, pages resident) unpinned and no longer lingering \
         whose pages the kernel can never take: {stuck:?}"
    );
}

/// 40 forks while four threads pin and unpin 12 entries (2 ms unpin delay, so that entries
/// start and end lingering all the time), every first pin delayed at random by up to 2 ms inside
/// (`Step::PinStarted`, pin lock held: most forks come during a pin) and another thread
/// reclaims. Each child calls the API on everything and exits 0; the parent's entries stay
/// right and end volatile.
#[test]
fn forks_race_pins_and_the_end_of_lingering() {
    let _s = serial();
    let (status, out) = run_child("fork_storm", &[], Duration::from_secs(240));
    println!("--- child: {status:?}\n{out}");
    assert!(status.success(), "child ended {status:?}\n{out}");
    assert!(!out.contains("WRONG"), "{out}");
    assert!(out.contains("PARENT-OK"), "{out}");
}

fn child_fork_storm() {
    let _w = Watchdog::new("fork_storm", 200);
    let cache: Arc<Cache<u64>> = Arc::new(
        Cache::new(
            Config::default()
                .mode(Mode::Monitor)
                .unpin_delay(Duration::from_millis(2)),
        )
        .unwrap(),
    );
    let n = 12u64;
    let pages = 8;
    let entries: Vec<Entry> = (0..n)
        .map(|k| cache.insert(k, pages * PAGE, regen(600 + k)).unwrap())
        .collect();
    let hook = Hook::delays(AT_PIN_STARTED, 2000);
    let stop = Arc::new(AtomicBool::new(false));
    let in_pin = Arc::new(AtomicUsize::new(0));
    let want: Arc<Vec<Vec<u8>>> =
        Arc::new((0..n).map(|k| expected(600 + k, pages * PAGE)).collect());
    let mut threads = Vec::new();
    for t in 0..4u64 {
        let (entries, stop, in_pin, want) =
            (entries.clone(), stop.clone(), in_pin.clone(), want.clone());
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(t * 77 + 5);
            let mut pins = 0u64;
            while !stop.load(SeqCst) {
                let k = rng.below(n) as usize;
                in_pin.fetch_add(1, SeqCst);
                let p = entries[k].pin().expect("pin");
                in_pin.fetch_sub(1, SeqCst);
                assert!(p[..] == want[k][..], "entry {k}: wrong bytes under a pin");
                drop(p);
                pins += 1;
                if rng.below(4) == 0 {
                    std::thread::sleep(Duration::from_millis(3)); // lingering ends meanwhile
                }
            }
            pins
        }));
    }
    let reclaimer = {
        let (entries, stop) = (entries.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(SeqCst) {
                testing::reclaim_all(&entries);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let mut rng = Rng(99);
    let (mut forks, mut mid) = (0, 0);
    for round in 0..40 {
        std::thread::sleep(Duration::from_micros(rng.below(3000)));
        mid += (in_pin.load(SeqCst) > 0) as usize;
        // SAFETY: the grandchild calls the API on inherited objects (the test), writes with
        // write(2) and _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            forked_child_limits();
            grandchild_api(cache, entries, false);
        }
        let status = wait_forked(pid, 10);
        let st = describe_status(status);
        forks += 1;
        if st != "exit 0" {
            println!("round {round}: GRANDCHILD-STATUS {st} WRONG");
            break;
        }
    }
    stop.store(true, SeqCst);
    let pins: u64 = threads.into_iter().map(|h| h.join().expect("pinner")).sum();
    reclaimer.join().expect("reclaimer");
    drop(hook);
    println!("{forks} forks ({mid} with a pin in progress just before), {pins} pins");
    assert!(
        mid > 0,
        "no fork came during a pin: the scenario did not happen"
    );
    for (k, e) in entries.iter().enumerate() {
        assert_eq!(mismatches(e, 600 + k as u64), 0, "entry {k}");
    }
    // The 2 ms delays end; the reclaimer's last MADV_PAGEOUT may have left pages in a per-CPU
    // batch (drained); the regions' later advices (50 ms and 500 ms after an unpin) come.
    assert!(lingering_over(&cache, 0), "the lingering never ended");
    testing::drain_lru_batches();
    std::thread::sleep(Duration::from_millis(700));
    for (k, e) in entries.iter().enumerate() {
        assert!(
            eventually_volatile(e),
            "entry {k}: lingering never ended: {} pages resident; {}",
            e.resident_pages(),
            cache.stats()
        );
    }
    assert_eq!(cache.stats().resident_pinned_bytes, 0);
    for (k, e) in entries.iter().enumerate() {
        assert_eq!(mismatches(e, 600 + k as u64), 0, "entry {k} rebuilt");
    }
    println!("PARENT-OK");
}
