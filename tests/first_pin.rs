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
use lazyfree::{Cache, Config, Error, Mode};

/// The entry whose state the hook delays (its base), and the publications it delayed.
static TARGET: AtomicUsize = AtomicUsize::new(0);
static MADE: AtomicUsize = AtomicUsize::new(0);

fn hook(s: Step, addr: usize) {
    if s == Step::PinStateMade && addr == TARGET.load(SeqCst) {
        MADE.fetch_add(1, SeqCst);
        std::thread::sleep(Duration::from_millis(3));
    }
}

#[test]
fn first_pins_race_on_an_entry_never_pinned() {
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
