//! Who wakes a thread waiting for a page. In monitor mode a fill wakes its chunk after it
//! installed and advised the pages and released the chunk; a fill *ahead* of a sequential reader
//! (which serves no fault of its own) wakes it only if a fault path found the chunk busy and
//! noted itself waiting (`chunk.rs`). These tests make a thread wait on a page of a chunk being
//! filled (one the fill does not install: the kernel took it after the fill looked; one being
//! filled ahead), and check that it is woken with the right bytes; in SIGBUS mode the same
//! interleaving, where the handler waits for the fill. And a fault taken by a worker spinning
//! on the userfaultfd (the reader stands down meanwhile), or a fault the reader serves
//! itself (the watcher stands in for it), whose callback blocks or reads other entries, must not
//! hold up other threads' faults.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::*;
use lazyfree::{testing, Cache, Config, Mode};

const CHUNK: usize = 64 << 10;
const SEED: u64 = 7;

/// One test at a time: the monitor's threads are the process's, and which thread serves a fault
/// (a spinning worker, the reader, a woken worker) depends on what the others are doing.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where the held callback call is: 0 not yet, 1 inside (waiting), 2 told to go on.
#[derive(Default)]
struct Hold {
    state: Mutex<u8>,
    cv: Condvar,
}

impl Hold {
    fn set(&self, s: u8) {
        *self.state.lock().unwrap() = s;
        self.cv.notify_all();
    }

    fn wait_for(&self, s: u8) {
        let mut g = self.state.lock().unwrap();
        while *g != s {
            g = self.cv.wait(g).unwrap();
        }
    }
}

fn page_taken_during_a_fill_is_woken(mode: Mode) {
    let _s = serial();
    let _w = Watchdog::new("page_taken_during_a_fill_is_woken", 60);
    let cache: Cache<u64> = Cache::new(Config::default().mode(mode).read_ahead(0)).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let armed = Arc::new(AtomicBool::new(false));
    let hold = Arc::new(Hold::default());
    let (c2, a2, h2) = (calls.clone(), armed.clone(), hold.clone());
    let e = cache
        .insert(1, CHUNK, move |off, buf: &mut [u8]| {
            c2.fetch_add(1, Ordering::SeqCst);
            fill(SEED, off, buf);
            // The first call after arming holds the fill (the chunk stays claimed).
            if a2.swap(false, Ordering::SeqCst) {
                h2.set(1);
                h2.wait_for(2);
            }
            Ok::<(), lazyfree::RegenError>(())
        })
        .unwrap();
    assert_eq!(mismatches(&e, SEED), 0);
    let p = e.as_ptr() as usize;
    // The first half of the chunk is taken back: a fault there fills those 8 pages only.
    assert_eq!(testing::reclaim_ptr(p as *const u8, CHUNK / 2), 8);
    armed.store(true, Ordering::SeqCst);
    let a = std::thread::spawn(move || peek(p));
    hold.wait_for(1);
    // The fill looked for missing pages before calling back: page 12 was present then. Now
    // the kernel takes it, and thread B faults on it while the chunk is claimed.
    assert_eq!(
        testing::reclaim_ptr((p + 12 * PAGE) as *const u8, PAGE),
        1,
        "page 12 (volatile) could not be dropped: the interleaving cannot be made"
    );
    let b = std::thread::spawn(move || peek(p + 12 * PAGE));
    // B's fault reaches a fault path, which finds the chunk busy.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !b.is_finished(),
        "page 12 was read while its chunk was claimed"
    );
    hold.set(2);
    let want = expected(SEED, CHUNK);
    assert_eq!(a.join().unwrap(), want[0]);
    // Without the owner's wake after its release B waits in the kernel for ever (the watchdog
    // ends the test).
    assert_eq!(b.join().unwrap(), want[12 * PAGE]);
    assert_eq!(mismatches(&e, SEED), 0);
    // The first fill, the held one (8 pages), and page 12's after B was woken and faulted again.
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

/// One byte read through a raw pointer.
fn peek(p: usize) -> u8 {
    // SAFETY: `p` lies in a live entry's bytes (the entry outlives the reading threads).
    unsafe { std::ptr::read_volatile(p as *const u8) }
}

#[test]
fn page_taken_during_a_fill_is_woken_monitor() {
    page_taken_during_a_fill_is_woken(Mode::Monitor);
}

#[test]
fn page_taken_during_a_fill_is_served_after_it_sigbus() {
    page_taken_during_a_fill_is_woken(Mode::Sigbus);
}

/// Monitor mode: a worker that ran out of work spins on the userfaultfd and the reader stands
/// down meanwhile. When that worker picks up a fault whose callback blocks, the reader must read
/// again soon: another thread's fault on another entry is served while the callback is still
/// blocked (it is released only after that thread got its bytes: without the hand-off bound
/// this waits for ever and the watchdog ends the test). Rounds repeat the race; in each, the
/// blocking fault comes right after quick faults, so a worker is spinning when it comes.
#[test]
fn a_blocked_callback_of_a_spinning_worker_does_not_hold_up_others() {
    let _s = serial();
    let _w = Watchdog::new("a_blocked_callback_of_a_spinning_worker", 120);
    let cache = one_page_chunks_monitor();
    let warm = cache.insert(1, 64 * PAGE, common::regen(21)).unwrap();
    let other = cache.insert(2, 16 * PAGE, common::regen(22)).unwrap();
    assert_eq!(mismatches(&warm, 21) + mismatches(&other, 22), 0);
    for round in 0..20u64 {
        let hold = Arc::new(Hold::default());
        let h2 = hold.clone();
        let slow = cache
            .insert(100 + round, PAGE, move |off, buf: &mut [u8]| {
                h2.set(1);
                h2.wait_for(2);
                fill(round, off, buf);
                Ok::<(), lazyfree::RegenError>(())
            })
            .unwrap();
        assert_eq!(testing::reclaim(&warm), 64);
        testing::reclaim(&other);
        let (w, s) = (warm.as_ptr() as usize, slow.as_ptr() as usize);
        let a = std::thread::spawn(move || {
            // Quick faults one after another: a worker is spinning when the last one is served.
            let sum: u64 = (0..64).map(|p| peek(w + p * PAGE) as u64).sum();
            (sum, peek(s))
        });
        hold.wait_for(1);
        // The slow callback runs (its worker blocked): this thread's faults must be served.
        assert_eq!(
            mismatches(&other, 22),
            0,
            "round {round}: wrong bytes while another entry's callback is blocked"
        );
        hold.set(2);
        let (_, b) = a.join().unwrap();
        assert_eq!(b, expected(round, 1)[0], "round {round}");
        assert_eq!(mismatches(&warm, 21), 0);
    }
}

/// Monitor mode: a thread faults on a chunk while it is being filled ahead of another thread's
/// sequential reads (its callback held). The fill ahead serves no fault of its own; it must wake
/// the chunk because the fault found it busy (without that wake the thread waits for ever and
/// the watchdog ends the test).
#[test]
fn a_fault_on_a_chunk_being_filled_ahead_is_woken() {
    let _s = serial();
    let _w = Watchdog::new("a_fault_on_a_chunk_being_filled_ahead_is_woken", 60);
    let cache: Cache<u64> = Cache::new(Config::default().mode(Mode::Monitor)).unwrap();
    let armed = Arc::new(AtomicBool::new(false));
    let hold = Arc::new(Hold::default());
    let calls = Arc::new(AtomicUsize::new(0));
    let (a2, h2, c2) = (armed.clone(), hold.clone(), calls.clone());
    let e = cache
        .insert(1, 8 * CHUNK, move |off, buf: &mut [u8]| {
            c2.fetch_add(1, Ordering::SeqCst);
            fill(SEED, off, buf);
            if off == 4 * CHUNK && a2.swap(false, Ordering::SeqCst) {
                h2.set(1);
                h2.wait_for(2);
            }
            Ok::<(), lazyfree::RegenError>(())
        })
        .unwrap();
    assert_eq!(mismatches(&e, SEED), 0);
    assert_eq!(testing::reclaim(&e), 8 * CHUNK / PAGE);
    let before = cache.stats().pages_read_ahead;
    armed.store(true, Ordering::SeqCst);
    let p = e.as_ptr() as usize;
    // Faults on chunks 0, 1 and 3 (chunk 2 is filled ahead of the fault on 1); the fault on 3
    // fills 4 and 5 ahead, and chunk 4's callback holds.
    let a = std::thread::spawn(move || (0..4).map(|c| peek(p + c * CHUNK) as u64).sum::<u64>());
    hold.wait_for(1);
    let b = std::thread::spawn(move || peek(p + 4 * CHUNK + 2 * PAGE));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !b.is_finished(),
        "chunk 4 was read while it was being filled"
    );
    hold.set(2);
    assert_eq!(
        b.join().unwrap(),
        expected(SEED, 8 * CHUNK)[4 * CHUNK + 2 * PAGE]
    );
    a.join().unwrap();
    assert!(
        cache.stats().pages_read_ahead - before >= (CHUNK / PAGE) as u64,
        "chunk 4 was not filled ahead: the interleaving was not made"
    );
    assert_eq!(mismatches(&e, SEED), 0);
}

/// A monitor-mode cache whose every fault is one page, without read-ahead.
fn one_page_chunks_monitor() -> Cache<u64> {
    Cache::new(
        Config::default()
            .mode(Mode::Monitor)
            .fill_chunk(lazyfree::FillChunk::Page)
            .read_ahead(0),
    )
    .unwrap()
}

/// The name of the thread running this callback call.
fn thread_name() -> String {
    std::thread::current().name().unwrap_or("?").to_string()
}

/// Monitor mode: a fault that comes alone (no worker spinning: the test waits past the spin
/// first) is served by the reader thread itself, and the watcher stands in for it on the
/// userfaultfd. When that callback blocks, another thread's faults on another entry must still
/// be served (the callback is released only after they were: without the stand-in nobody reads
/// the userfaultfd and the watchdog ends the test). Each round also checks that the blocked
/// callback ran on the reader thread, so the path under test is the one taken.
#[test]
fn a_blocked_callback_of_a_lone_fault_the_reader_serves_does_not_hold_up_others() {
    let _s = serial();
    let _w = Watchdog::new("a_blocked_callback_of_a_lone_fault_the_reader_serves", 120);
    let cache = one_page_chunks_monitor();
    let other = cache.insert(2, 16 * PAGE, common::regen(22)).unwrap();
    assert_eq!(mismatches(&other, 22), 0);
    for round in 0..10u64 {
        let hold = Arc::new(Hold::default());
        let ran_on = Arc::new(Mutex::new(String::new()));
        let (h2, r2) = (hold.clone(), ran_on.clone());
        let slow = cache
            .insert(100 + round, PAGE, move |off, buf: &mut [u8]| {
                *r2.lock().unwrap() = thread_name();
                h2.set(1);
                h2.wait_for(2);
                fill(round, off, buf);
                Ok::<(), lazyfree::RegenError>(())
            })
            .unwrap();
        testing::reclaim(&other);
        // Past any worker's spin: the next fault is read by the reader.
        std::thread::sleep(Duration::from_millis(5));
        let s = slow.as_ptr() as usize;
        let a = std::thread::spawn(move || peek(s));
        hold.wait_for(1);
        let name = ran_on.lock().unwrap().clone();
        // The reader is blocked in the callback: this thread's faults must be served.
        let wrong = mismatches(&other, 22);
        // (Released before any assertion: a blocked callback would hang the cache's drop.)
        hold.set(2);
        assert_eq!(a.join().unwrap(), expected(round, 1)[0], "round {round}");
        assert_eq!(
            wrong, 0,
            "round {round}: wrong bytes while the reader's callback is blocked"
        );
        assert_eq!(
            name, "lazyfree-monitor",
            "round {round}: the lone fault was not served by the reader"
        );
    }
}

/// Monitor mode: the callback of a lone fault the reader serves itself reads two other lost
/// entries, nested (its fault is read by the watcher standing in, and the callback of the
/// second entry reads the third): every byte comes back right, and the first callback ran on
/// the reader thread.
#[test]
fn a_lone_fault_the_reader_serves_may_read_other_entries() {
    let _s = serial();
    let _w = Watchdog::new("a_lone_fault_the_reader_serves_may_read_other_entries", 120);
    let cache = one_page_chunks_monitor();
    let third = cache.insert(3, 4 * PAGE, common::regen(33)).unwrap();
    let t = third.clone();
    let second = cache
        .insert(2, 4 * PAGE, move |off, buf: &mut [u8]| {
            // Nested: reads the third entry.
            assert_eq!(mismatches(&t, 33), 0);
            fill(32, off, buf);
            Ok::<(), lazyfree::RegenError>(())
        })
        .unwrap();
    let ran_on = Arc::new(Mutex::new(Vec::new()));
    let (s2, r2) = (second.clone(), ran_on.clone());
    let first = cache
        .insert(1, PAGE, move |off, buf: &mut [u8]| {
            r2.lock().unwrap().push(thread_name());
            assert_eq!(mismatches(&s2, 32), 0);
            fill(31, off, buf);
            Ok::<(), lazyfree::RegenError>(())
        })
        .unwrap();
    for round in 0..10 {
        for e in [&first, &second, &third] {
            testing::reclaim(e);
        }
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            peek(first.as_ptr() as usize),
            expected(31, 1)[0],
            "round {round}"
        );
        assert_eq!(mismatches(&first, 31), 0, "round {round}");
    }
    let ran_on = ran_on.lock().unwrap();
    assert_eq!(ran_on.len(), 10, "one rebuild of the first entry a round");
    assert!(
        ran_on.iter().all(|n| n == "lazyfree-monitor"),
        "the lone faults were not all served by the reader: {ran_on:?}"
    );
}

/// Whether `held_reader_hook` holds the reader (set by the test using it).
static HOLD_READER: AtomicBool = AtomicBool::new(false);
/// How many times it held the reader.
static READER_HELD: AtomicUsize = AtomicUsize::new(0);

fn held_reader_hook(step: testing::Step, _addr: usize) {
    if step == testing::Step::ReaderServed
        && HOLD_READER.load(Ordering::SeqCst)
        && thread_name() == "lazyfree-monitor"
    {
        READER_HELD.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(3));
    }
}

/// Monitor mode, a delay injected between the reader's end of a serve (it no longer counts as
/// serving, so the watcher stops standing in or will not start) and its next read of the
/// userfaultfd: a slow callback served by the reader makes the watcher stand in, the reader is
/// held 3 ms after each serve, and meanwhile another thread reads an entry at random, one fault
/// a page. Every byte comes back right, and no fault is left unserved (the watchdog).
#[test]
fn a_reader_held_after_its_serve_leaves_no_fault_unserved() {
    let _s = serial();
    let _w = Watchdog::new("a_reader_held_after_its_serve", 120);
    let cache = one_page_chunks_monitor();
    let many = cache.insert(1, 128 * PAGE, common::regen(41)).unwrap();
    let started = Arc::new(AtomicBool::new(false));
    let st2 = started.clone();
    let slow = cache
        .insert(2, PAGE, move |off, buf: &mut [u8]| {
            st2.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(2));
            fill(42, off, buf);
            Ok::<(), lazyfree::RegenError>(())
        })
        .unwrap();
    READER_HELD.store(0, Ordering::SeqCst);
    let stood = testing::monitor_stand_ins();
    testing::set_step_hook(Some(held_reader_hook));
    HOLD_READER.store(true, Ordering::SeqCst);
    let mut wrong = 0;
    for _ in 0..30 {
        testing::reclaim(&many);
        testing::reclaim(&slow);
        // Past any spin: the slow entry's fault is lone, and the reader serves it.
        std::thread::sleep(Duration::from_millis(5));
        let s = slow.as_ptr() as usize;
        started.store(false, Ordering::SeqCst);
        let a = std::thread::spawn(move || peek(s));
        // The other entry's faults come while the slow callback runs.
        while !started.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        wrong += mismatches(&many, 41);
        assert_eq!(a.join().unwrap(), expected(42, 1)[0]);
    }
    HOLD_READER.store(false, Ordering::SeqCst);
    testing::set_step_hook(None);
    let held = READER_HELD.load(Ordering::SeqCst);
    let stood = testing::monitor_stand_ins() - stood;
    println!("reader held after {held} serves; the watcher stood in {stood} times");
    assert_eq!(
        wrong, 0,
        "wrong bytes with the reader held after its serves"
    );
    assert!(
        held >= 30,
        "the reader was held after only {held} serves: the path under test was not taken"
    );
    // Each round's slow callback, when the reader runs it, outlasts the stand-in threshold.
    assert!(
        stood >= 10,
        "the watcher stood in {stood} times in 30 rounds: the path under test was not taken"
    );
}
