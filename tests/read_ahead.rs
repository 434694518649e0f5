//! Fill ahead (`Config::read_ahead`): sequential faults on an entry make the monitor fill the
//! chunks that follow; random access gets none; a failing callback in a chunk filled ahead
//! changes nothing until that chunk is touched.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use lazyfree::{testing, Cache, Config, FailurePolicy, Mode};

const CHUNK: usize = 64 << 10;
const CHUNKS: usize = 32; // a 2 MiB entry

/// A cache and a reclaimed entry of `CHUNKS` chunks whose callback counts its calls.
fn reclaimed_entry(config: Config) -> (Cache<u64>, lazyfree::Entry, Arc<AtomicUsize>) {
    reclaimed_entry_of(config, CHUNKS)
}

/// The same with `chunks` chunks.
fn reclaimed_entry_of(
    config: Config,
    chunks: usize,
) -> (Cache<u64>, lazyfree::Entry, Arc<AtomicUsize>) {
    let cache: Cache<u64> = Cache::new(config).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let e = cache
        .insert(1, chunks * CHUNK, move |off, buf: &mut [u8]| {
            c2.fetch_add(1, Ordering::SeqCst);
            fill(1, off, buf);
            Ok::<(), lazyfree::RegenError>(())
        })
        .unwrap();
    assert_eq!(mismatches(&e, 1), 0);
    assert_eq!(testing::reclaim(&e), chunks * CHUNK / PAGE);
    calls.store(0, Ordering::SeqCst);
    (cache, e, calls)
}

/// Reads one byte of every page of chunk `c`.
fn read_chunk(e: &lazyfree::Entry, c: usize) -> u64 {
    (0..CHUNK / PAGE)
        .map(|p| e[c * CHUNK + p * PAGE] as u64)
        .sum()
}

#[test]
fn a_sequential_read_is_filled_ahead() {
    let _w = Watchdog::new("a_sequential_read_is_filled_ahead", 120);
    // 7 chunks: the most whose states (and fill-ahead state) a region keeps inline; 8: the
    // fewest kept in a block of their own.
    for chunks in [7, 8, CHUNKS] {
        sequential_read_of(chunks);
    }
}

fn sequential_read_of(chunks: usize) {
    let (cache, e, calls) = reclaimed_entry_of(Config::default().mode(Mode::Monitor), chunks);
    let before = cache.stats();
    let mut sum = 0;
    for c in 0..chunks {
        sum += read_chunk(&e, c);
        // A reader slower than the fills ahead (so that no fault races them here: the bench
        // measures the race).
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    std::hint::black_box(sum);
    let s = cache.stats();
    let faults = s.faults_handled - before.faults_handled;
    let ahead = s.pages_read_ahead - before.pages_read_ahead;
    report(format_args!(
        "read ahead: {faults} faults for {chunks} chunks, {ahead} pages filled ahead, {} calls",
        calls.load(Ordering::SeqCst)
    ));
    assert!(
        ahead > 0,
        "nothing was filled ahead of a sequential read of {chunks} chunks"
    );
    // Windows of 1, 2, 4, ... chunks: 4 faults for 7 or 8 chunks.
    let most = if chunks >= 32 {
        chunks / 2 - 1
    } else {
        chunks - 3
    };
    assert!(faults <= most as u64, "{faults} faults for {chunks} chunks");
    // Each chunk built once: nothing filled twice, nothing past the end.
    assert_eq!(calls.load(Ordering::SeqCst), chunks);
    assert_eq!(mismatches(&e, 1), 0);
}

#[test]
fn no_read_ahead_when_off_or_in_sigbus_mode() {
    let _w = Watchdog::new("no_read_ahead_when_off_or_in_sigbus_mode", 120);
    for config in [
        Config::default().mode(Mode::Monitor).read_ahead(0),
        Config::default().mode(Mode::Sigbus),
    ] {
        let mode = config.mode;
        let (cache, e, calls) = reclaimed_entry(config);
        for c in 0..CHUNKS {
            read_chunk(&e, c);
        }
        let s = cache.stats();
        // (None in the setup's first read either.)
        assert_eq!(s.pages_read_ahead, 0, "{mode:?}");
        assert_eq!(calls.load(Ordering::SeqCst), CHUNKS, "{mode:?}");
    }
}

/// Touches in a shuffled order with no two consecutive ascending chunks: no read-ahead, one
/// call per chunk touched.
#[test]
fn random_access_gets_no_read_ahead() {
    let _w = Watchdog::new("random_access_gets_no_read_ahead", 120);
    let (cache, e, calls) = reclaimed_entry(Config::default().mode(Mode::Monitor));
    let mut order: Vec<usize> = (0..CHUNKS).collect();
    let mut rng = Rng(7);
    loop {
        for i in (1..order.len()).rev() {
            order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
        }
        if order.windows(2).all(|w| w[1] != w[0] + 1) {
            break;
        }
    }
    let before = cache.stats().pages_read_ahead;
    for &c in &order {
        std::hint::black_box(e[c * CHUNK + 100]);
    }
    assert_eq!(cache.stats().pages_read_ahead, before);
    assert_eq!(calls.load(Ordering::SeqCst), CHUNKS);
    assert_eq!(mismatches(&e, 1), 0);
}

/// The callback fails the first time it is asked for chunk 5, which a sequential read fills
/// ahead: nothing is marked failed, nothing is poisoned, and chunk 5's own fault rebuilds it.
#[test]
fn a_failure_filling_ahead_changes_nothing() {
    let _w = Watchdog::new("a_failure_filling_ahead_changes_nothing", 120);
    for policy in [FailurePolicy::Poison, FailurePolicy::Zero] {
        let cache: Cache<u64> =
            Cache::new(Config::default().mode(Mode::Monitor).on_failure(policy)).unwrap();
        let failed_once = Arc::new(AtomicUsize::new(0));
        let f2 = failed_once.clone();
        let e = cache
            .insert(1, CHUNKS * CHUNK, move |off, buf: &mut [u8]| {
                if off == 5 * CHUNK && f2.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Err("not now".into());
                }
                fill(1, off, buf);
                Ok::<(), lazyfree::RegenError>(())
            })
            .unwrap();
        // First touch of chunk 0, 1, 2, ...: 5 is filled ahead (and fails) before it is read
        // (the reader waits after each chunk so that the fills ahead are done before it goes
        // on: else its own fault on chunk 5 could come first and get the failure).
        for c in 0..CHUNKS {
            read_chunk(&e, c);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(
            failed_once.load(Ordering::SeqCst) >= 1,
            "{policy:?}: chunk 5 never asked"
        );
        assert!(
            !e.is_failed(),
            "{policy:?}: a failure filling ahead marked the entry"
        );
        assert_eq!(mismatches(&e, 1), 0, "{policy:?}");
        assert!(cache.stats().pages_read_ahead > 0, "{policy:?}");
    }
}

#[test]
fn a_read_ahead_over_64_mib_is_refused() {
    assert!(matches!(
        Cache::<u64>::new(Config::default().read_ahead((64 << 20) + 1)),
        Err(lazyfree::Error::InvalidConfig(_))
    ));
}

/// A callback that never returns (until the test lets it) for a chunk being filled ahead: the
/// thread whose fault started the fill ahead is woken anyway within a few milliseconds, and
/// reads on; only the stuck chunk waits.
#[test]
fn a_stuck_callback_ahead_holds_up_only_its_chunk() {
    let _w = Watchdog::new("a_stuck_callback_ahead_holds_up_only_its_chunk", 120);
    let cache: Cache<u64> = Cache::new(Config::default().mode(Mode::Monitor)).unwrap();
    let release = Arc::new(std::sync::Mutex::new(false));
    let cv = Arc::new(std::sync::Condvar::new());
    let (r2, cv2) = (release.clone(), cv.clone());
    let e = cache
        .insert(1, CHUNKS * CHUNK, move |off, buf: &mut [u8]| {
            if off == 2 * CHUNK {
                let mut go = r2.lock().unwrap();
                while !*go {
                    go = cv2.wait(go).unwrap();
                }
            }
            fill(1, off, buf);
            Ok::<(), lazyfree::RegenError>(())
        })
        .unwrap();
    // Faults on chunk 0, then 1: the second is sequential, so its worker fills chunk 2 ahead
    // before waking the reader, and chunk 2's callback blocks.
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = {
        let e = e.clone();
        std::thread::spawn(move || {
            let a = read_chunk(&e, 0);
            let b = read_chunk(&e, 1);
            tx.send(a + b).unwrap();
        })
    };
    let got = rx.recv_timeout(std::time::Duration::from_secs(10));
    let stuck = cache.stats().regenerate_calls;
    *release.lock().unwrap() = true;
    cv.notify_all();
    reader.join().unwrap();
    assert!(
        got.is_ok(),
        "the reader of chunk 1 waited for the stuck callback of chunk 2, filled ahead"
    );
    assert!(stuck >= 2, "{stuck} callback calls");
    assert_eq!(mismatches(&e, 1), 0);
}
