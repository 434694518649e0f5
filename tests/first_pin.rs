//! The first pins of an entry racing: the pin state is made lazily by the first pin (a
//! compare-and-swap publishes it; see `region.rs`). Many threads, more than the CPUs, pin an
//! entry never pinned before at once, with a delay injected between making the state and
//! publishing it, so that several make one and all but one lose; readers of the pin state
//! (`is_pinned`, `stats`) and unpins of other, never-pinned entries run alongside. Every pin
//! must hold the right bytes, and once every pin ended the entry must be unpinned and its pages
//! reclaimable again (the count the pins shared is right).

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::*;
use lazyfree::testing::{self, Step};
use lazyfree::{Cache, Config, Error, FailurePolicy, Mode, RegenError};

/// The entry whose state the hook delays (its base), and the publications it delayed.
static TARGET: AtomicUsize = AtomicUsize::new(0);
static MADE: AtomicUsize = AtomicUsize::new(0);
/// While set, the pin that made the target's state parks before publishing it, until cleared.
static PARK: AtomicBool = AtomicBool::new(false);
/// While set, the first to make the target's state parks so, and no other.
static PARK_FIRST: AtomicBool = AtomicBool::new(false);

/// First pins of the target that closed its gate and started making its pages resident.
static STARTED: AtomicUsize = AtomicUsize::new(0);

fn hook(s: Step, addr: usize) {
    if s == Step::PinStarted && addr == TARGET.load(SeqCst) {
        STARTED.fetch_add(1, SeqCst);
    }
    if s == Step::PinStateMade && addr == TARGET.load(SeqCst) {
        let first = MADE.fetch_add(1, SeqCst) == 0;
        let t = std::time::Instant::now();
        while (PARK.load(SeqCst) || (first && PARK_FIRST.load(SeqCst)))
            && t.elapsed() < Duration::from_secs(20)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(3));
    }
}

/// One test at a time: they share the hook.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn first_pins_race_on_an_entry_never_pinned() {
    let _s = serial();
    let _w = Watchdog::new("first_pins_race_on_an_entry_never_pinned", 300);
    testing::set_step_hook(Some(hook));
    let threads = 12;
    for mode in [Mode::Monitor, Mode::Sigbus, Mode::Explicit] {
        // No unpin delay: the last unpin advises at once, so reclaim shows the count's end.
        let cfg = Config::default().mode(mode).unpin_delay(Duration::ZERO);
        let cache: Arc<Cache<u64>> = Arc::new(Cache::new(cfg).unwrap());
        let mut raced = 0;
        for round in 0..8u64 {
            let e = cache.insert(round, 16 * PAGE, regen(round)).unwrap();
            let bystander = cache.insert(1000 + round, PAGE, regen(1)).unwrap();
            MADE.store(0, SeqCst);
            TARGET.store(e.as_ptr() as usize, SeqCst);
            let barrier = Arc::new(Barrier::new(threads + 1));
            let stop = Arc::new(AtomicBool::new(false));
            let pinners: Vec<_> = (0..threads)
                .map(|_| {
                    let (e, barrier) = (e.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        let p = e.pin().expect("pin");
                        assert_eq!(p[..], expected(round, p.len())[..], "{mode:?}");
                        assert!(e.is_pinned());
                        std::thread::sleep(Duration::from_millis(1));
                    })
                })
                .collect();
            // Readers of the pin state, and unpins of an entry never pinned, alongside.
            let watcher = {
                let (e, cache, stop, bystander) =
                    (e.clone(), cache.clone(), stop.clone(), bystander.clone());
                std::thread::spawn(move || {
                    while !stop.load(SeqCst) {
                        let _ = e.is_pinned();
                        let _ = cache.stats();
                        assert!(matches!(bystander.unpin_unguarded(), Err(Error::NotPinned)));
                    }
                })
            };
            barrier.wait();
            for t in pinners {
                t.join().unwrap();
            }
            stop.store(true, SeqCst);
            watcher.join().unwrap();
            TARGET.store(0, SeqCst);
            let made = MADE.load(SeqCst);
            assert!(made >= 1, "{mode:?} round {round}: the hook never ran");
            raced += (made > 1) as usize;
            assert!(!e.is_pinned(), "{mode:?} round {round}: a pin is left");
            assert!(!bystander.is_pinned());
            // Every pin ended: the pages are volatile again (explicit mode: the next pin
            // rebuilds what the kernel took).
            if mode == Mode::Explicit {
                testing::reclaim(&e);
            } else {
                // A page the unpin's advice missed (still in a CPU's batch, off the LRU lists)
                // is caught by the later advices (README's guarantees): allow them 200 ms.
                let mut tries = 0;
                while testing::reclaim(&e) == 0 {
                    tries += 1;
                    assert!(
                        tries < 20,
                        "{mode:?} round {round}: no page reclaimable 200 ms after the last unpin"
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            assert_eq!(mismatches(&e, round), 0, "{mode:?} round {round}");
            // The state made in the race serves the next pins.
            let p = e.pin().unwrap();
            assert_eq!(p[..], expected(round, p.len())[..]);
            drop(p);
            assert!(!e.is_pinned());
        }
        assert!(
            raced > 0,
            "{mode:?}: in no round did two pins make the state (the race was not exercised)"
        );
        println!("{mode:?}: {raced} of 8 rounds had several pins make the pin state");
    }
    testing::set_step_hook(None);
}

/// A fork while a parent thread is inside an entry's first pin (its pin state made, not yet
/// published): in the child, a pin of that entry is refused at once with `ForkedChild` (it
/// neither waits for the parent's pin nor makes a state of its own), the entry reads as
/// unpinned, and dropping its handles does nothing. The parent's pin then completes with the
/// right bytes, and the entry pins and unpins as before.
#[test]
fn a_fork_during_a_first_pin() {
    let _s = serial();
    let _w = Watchdog::new("a_fork_during_a_first_pin", 120);
    testing::set_step_hook(Some(hook));
    for mode in [Mode::Monitor, Mode::Sigbus, Mode::Explicit] {
        let cache: Arc<Cache<u64>> = Arc::new(Cache::new(Config::default().mode(mode)).unwrap());
        let e = cache.insert(7, 8 * PAGE, regen(7)).unwrap();
        MADE.store(0, SeqCst);
        PARK.store(true, SeqCst);
        TARGET.store(e.as_ptr() as usize, SeqCst);
        let pinner = {
            let e = e.clone();
            std::thread::spawn(move || {
                let p = e.pin().expect("the parent's pin");
                p[..] == expected(7, p.len())[..]
            })
        };
        wait_until("the first pin never made its state", 20, || {
            MADE.load(SeqCst) > 0
        });
        // SAFETY: the child calls lazyfree and ends with _exit; it touches no entry memory.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = match e.pin().map(std::mem::forget) {
                Err(Error::ForkedChild) if e.is_pinned() => 4,
                Err(Error::ForkedChild) => match cache.get(&7).map(|c| c.len()) {
                    Some(n) if n == 8 * PAGE => {
                        drop(e);
                        0
                    }
                    _ => 5,
                },
                Err(_) => 2,
                Ok(()) => 3,
            };
            // SAFETY: ends the child without the parent's exit handlers.
            unsafe { libc::_exit(code) };
        }
        assert!(pid > 0, "fork: {}", std::io::Error::last_os_error());
        let status = wait_forked(pid, 20);
        PARK.store(false, SeqCst);
        assert!(
            pinner.join().unwrap(),
            "{mode:?}: the parent's pin held wrong bytes"
        );
        TARGET.store(0, SeqCst);
        let what = match status.map(|s| (libc::WIFEXITED(s), libc::WEXITSTATUS(s))) {
            Some((true, 0)) => None,
            Some((true, 2)) => Some("the pin failed with another error than ForkedChild"),
            Some((true, 3)) => Some("the pin succeeded"),
            Some((true, 4)) => Some("the entry read as pinned"),
            Some((true, 5)) => Some("the entry was not found by get"),
            _ => Some("the child did not end by itself"),
        };
        if let Some(what) = what {
            panic!(
                "{mode:?}: in the child forked during a first pin, {what} ({})",
                describe_status(status)
            );
        }
        assert!(!e.is_pinned(), "{mode:?}: the parent's pin was not undone");
        testing::reclaim(&e);
        let p = e.pin().unwrap();
        assert_eq!(p[..], expected(7, p.len())[..], "{mode:?}");
    }
    testing::set_step_hook(None);
}

/// A first pin and a first failure racing to make the side block that holds both the pin state
/// and the failure's message (`region.rs`): the pin is held between making its block and
/// publishing it while a failure makes and publishes its own (the SIGBUS handler from a block
/// made in advance, a monitor worker, a second pin in explicit mode). The held pin then loses
/// its compare-and-swap and uses the failure's block: the message stays readable, the pin holds
/// the right bytes and rebuilds the failed chunk.
#[test]
fn a_first_failure_races_a_first_pin() {
    let _s = serial();
    let _w = Watchdog::new("a_first_failure_races_a_first_pin", 120);
    testing::set_step_hook(Some(hook));
    for mode in [Mode::Monitor, Mode::Sigbus, Mode::Explicit] {
        let cfg = Config::default()
            .mode(mode)
            .on_failure(FailurePolicy::Zero)
            .unpin_delay(Duration::ZERO);
        let cache: Cache<u64> = Cache::new(cfg).unwrap();
        let broken = Arc::new(AtomicBool::new(false));
        let e = {
            let broken = broken.clone();
            cache
                .insert(9, 4 * PAGE, move |off, buf: &mut [u8]| {
                    if broken.load(SeqCst) {
                        return Err(format!("broken at {off}").into());
                    }
                    fill(9, off, buf);
                    Ok::<(), RegenError>(())
                })
                .unwrap()
        };
        MADE.store(0, SeqCst);
        PARK_FIRST.store(true, SeqCst);
        TARGET.store(e.as_ptr() as usize, SeqCst);
        let pinner = {
            let e = e.clone();
            std::thread::spawn(move || {
                let p = e.pin().expect("the held pin");
                p[..] == expected(9, p.len())[..]
            })
        };
        wait_until("the first pin never made its block", 20, || {
            MADE.load(SeqCst) > 0
        });
        broken.store(true, SeqCst);
        // The failure: a touch, or in explicit mode a pin (nothing to touch).
        match e.try_as_slice() {
            Some(b) => assert_eq!(b[0], 0, "{mode:?}: a failed page reads as zeros"),
            None => assert!(e.pin().is_err(), "{mode:?}: a pin of a failing entry"),
        }
        wait_until("the failure left no message", 20, || {
            e.last_error().is_some()
        });
        let msg = e.last_error().unwrap();
        assert_eq!(msg, "broken at 0", "{mode:?}");
        assert!(e.is_failed(), "{mode:?}");
        broken.store(false, SeqCst);
        PARK_FIRST.store(false, SeqCst);
        assert!(
            pinner.join().unwrap(),
            "{mode:?}: the pin that lost held wrong bytes"
        );
        TARGET.store(0, SeqCst);
        let made = MADE.load(SeqCst);
        // The handler takes a block made in advance, not through the hook.
        let makers = if mode == Mode::Sigbus { 1 } else { 2 };
        assert_eq!(made, makers, "{mode:?}: blocks made");
        assert_eq!(
            e.last_error().as_deref(),
            Some(&msg[..]),
            "{mode:?}: the message went with a block"
        );
        assert!(!e.is_failed(), "{mode:?}: the pin rebuilt the failed chunk");
        assert!(!e.is_pinned(), "{mode:?}");
        assert_eq!(mismatches(&e, 9), 0, "{mode:?}");
    }
    testing::set_step_hook(None);
}

/// A callback that does not return (until the test lets it) holds chunk 0 of a two-chunk entry
/// while the entry's first pin makes its side block, closes its gate and waits for that chunk
/// (holding the entry's pin lock), and a second pin waits behind it. Nothing else waits for
/// them: another entry's first pin and unpin, a read of the entry's other chunk, `stats`,
/// `is_pinned` and `last_error` all return while the callback is stuck (`stats` used to wait
/// for the pin lock, so until the callback returned), the entry counts as pinned from the
/// start of its first pin, and neither pin returns before the callback does (they cannot hold
/// the bytes). Once it returns, every pin holds the right bytes and the entry ends unpinned.
#[test]
fn a_first_pin_waits_for_a_stuck_callback() {
    const CHUNK: usize = 64 * 1024;
    let _s = serial();
    let _w = Watchdog::new("a_first_pin_waits_for_a_stuck_callback", 120);
    testing::set_step_hook(Some(hook));
    for mode in [Mode::Monitor, Mode::Sigbus] {
        let cfg = Config::default().mode(mode).unpin_delay(Duration::ZERO);
        let cache: Arc<Cache<u64>> = Arc::new(Cache::new(cfg).unwrap());
        let stuck = Arc::new(AtomicBool::new(true));
        let entered = Arc::new(AtomicBool::new(false));
        let e = {
            let (stuck, entered) = (stuck.clone(), entered.clone());
            cache
                .insert(5, 2 * CHUNK, move |off, buf: &mut [u8]| {
                    if off < CHUNK {
                        entered.store(true, SeqCst);
                        let t = std::time::Instant::now();
                        while stuck.load(SeqCst) && t.elapsed() < Duration::from_secs(60) {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                    fill(5, off, buf);
                    Ok::<(), RegenError>(())
                })
                .unwrap()
        };
        let other = cache.insert(6, 4 * PAGE, regen(6)).unwrap();
        MADE.store(0, SeqCst);
        STARTED.store(0, SeqCst);
        TARGET.store(e.as_ptr() as usize, SeqCst);
        let reader = {
            let e = e.clone();
            std::thread::spawn(move || e[0])
        };
        wait_until("the callback was never called", 20, || entered.load(SeqCst));
        let pin = |e: &lazyfree::Entry| {
            let e = e.clone();
            std::thread::spawn(move || {
                let p = e.pin().expect("a pin behind a stuck callback");
                p[..] == expected(5, p.len())[..]
            })
        };
        let first = pin(&e);
        wait_until(
            "the first pin never started making the pages resident",
            20,
            || STARTED.load(SeqCst) > 0,
        );
        assert_eq!(MADE.load(SeqCst), 1, "{mode:?}: side blocks made");
        let second = pin(&e);
        // Everything else goes on while the callback is stuck.
        {
            let p = other.pin().expect("another entry's first pin");
            assert_eq!(p[..], expected(6, p.len())[..], "{mode:?}");
        }
        assert!(!other.is_pinned(), "{mode:?}");
        assert_eq!(
            e[CHUNK..],
            expected(5, 2 * CHUNK)[CHUNK..],
            "{mode:?}: chunk 1"
        );
        let stats = {
            let cache = cache.clone();
            std::thread::spawn(move || cache.stats())
        };
        wait_until(
            "stats() waited for a first pin that waits for a stuck callback",
            20,
            || stats.is_finished(),
        );
        let stats = stats.join().unwrap();
        assert_eq!(stats.pinned_entries, 1, "{mode:?}: a first pin under way");
        assert!(
            e.is_pinned(),
            "{mode:?}: not pinned while its first pin is under way"
        );
        assert_eq!(e.last_error(), None, "{mode:?}");
        assert!(
            !first.is_finished() && !second.is_finished() && !reader.is_finished(),
            "{mode:?}: a pin or the read returned while the callback for their bytes is stuck"
        );
        stuck.store(false, SeqCst);
        assert_eq!(
            reader.join().unwrap(),
            expected(5, 1)[0],
            "{mode:?}: the read"
        );
        assert!(first.join().unwrap(), "{mode:?}: the first pin's bytes");
        assert!(second.join().unwrap(), "{mode:?}: the second pin's bytes");
        TARGET.store(0, SeqCst);
        assert!(!e.is_pinned(), "{mode:?}: pinned after every pin ended");
        assert!(!e.is_failed(), "{mode:?}");
        assert_eq!(mismatches(&e, 5), 0, "{mode:?}");
    }
    testing::set_step_hook(None);
}

/// More pins rebuilding at once than the 64 pin rebuilds the self-read check records (threads
/// well past the CPUs and the monitor's workers): 80 threads each pin an entry never touched,
/// whose callback is slow (300 ms), so that all rebuilds overlap. Those past the record go
/// unrecorded; every pin must still hold the right bytes, and a read of each entry after.
#[test]
fn more_pin_rebuilds_at_once_than_recorded() {
    let _s = serial();
    let _w = Watchdog::new("more_pin_rebuilds_at_once_than_recorded", 120);
    let threads = 80u64;
    for mode in [Mode::Monitor, Mode::Sigbus] {
        let cfg = Config::default().mode(mode).unpin_delay(Duration::ZERO);
        let cache: Cache<u64> = Cache::new(cfg).unwrap();
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let entries: Vec<_> = (0..threads)
            .map(|k| {
                let (inside, most) = (inside.clone(), most.clone());
                cache
                    .insert(k, 2 * PAGE, move |off, buf: &mut [u8]| {
                        let n = inside.fetch_add(1, SeqCst) + 1;
                        most.fetch_max(n, SeqCst);
                        std::thread::sleep(Duration::from_millis(300));
                        fill(k, off, buf);
                        inside.fetch_sub(1, SeqCst);
                        Ok::<(), RegenError>(())
                    })
                    .unwrap()
            })
            .collect();
        let barrier = Arc::new(Barrier::new(threads as usize));
        let pinners: Vec<_> = entries
            .iter()
            .enumerate()
            .map(|(k, e)| {
                let (e, barrier) = (e.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let p = e.pin().expect("pin");
                    p[..] == expected(k as u64, p.len())[..]
                })
            })
            .collect();
        for (k, p) in pinners.into_iter().enumerate() {
            assert!(p.join().unwrap(), "{mode:?}: pin {k} held wrong bytes");
        }
        let most = most.load(SeqCst);
        println!("{mode:?}: at most {most} callbacks of pins ran at once");
        assert!(most > 64, "{mode:?}: only {most} pin rebuilds overlapped");
        for (k, e) in entries.iter().enumerate() {
            assert!(!e.is_pinned(), "{mode:?}");
            assert_eq!(mismatches(e, k as u64), 0, "{mode:?}: entry {k}");
        }
    }
}
