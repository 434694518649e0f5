//! A signal nobody expected: a program (a profiler's timer, a runtime's preemption signal, a
//! debugger) sends signals to every thread of the process, lazyfree's own included, while faults
//! are served, callbacks run and entries are pinned. The handler here is installed without
//! `SA_RESTART`, so every blocking system call it interrupts fails with EINTR; a thread waiting in
//! the kernel for a missing page leaves that wait to run the handler and faults again (a second
//! fault message for the same page); a thread inside lazyfree's SIGBUS handler runs this one
//! nested. Nothing may be lost, wrong or hung, in either mode.
//!
//! Each test checks that the signals reached the threads it means to disturb: in monitor mode
//! the reader ("lazyfree-monitor"), the watcher ("lazyfree-watch") and the workers, and in both
//! modes the threads faulting and pinning (the handler counts the deliveries).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use lazyfree::{testing, Cache, Config, Entry, FillChunk, Mode};

/// Deliveries of the stray signal, counted by its handler.
static DELIVERED: AtomicUsize = AtomicUsize::new(0);

/// Deliveries per thread: the thread ids the handler ran on, and how many times on each (a
/// fixed table: the handler may neither lock nor allocate).
const SLOTS: usize = 4096;
static TIDS: [AtomicI32; SLOTS] = [const { AtomicI32::new(0) }; SLOTS];
static COUNTS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];

extern "C" fn stray(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    DELIVERED.fetch_add(1, Ordering::Relaxed);
    // SAFETY: gettid has no preconditions (and is async-signal-safe).
    let tid = unsafe { libc::gettid() };
    for (t, c) in TIDS.iter().zip(&COUNTS) {
        // The first free slot is claimed; a slot taken by this thread is counted in.
        let cur = t
            .compare_exchange(0, tid, Ordering::Relaxed, Ordering::Relaxed)
            .unwrap_or_else(|v| v);
        if cur == 0 || cur == tid {
            c.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
}

/// Deliveries so far by thread name (threads still alive), for the names given.
fn delivered_to(names: &[&str]) -> HashMap<String, usize> {
    let mut by_name = HashMap::new();
    for (t, c) in TIDS.iter().zip(&COUNTS) {
        let tid = t.load(Ordering::SeqCst);
        if tid == 0 {
            break;
        }
        let comm =
            std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap_or_default();
        let comm = comm.trim();
        for name in names {
            // The kernel keeps 15 bytes of a thread's name.
            if comm == &name[..name.len().min(15)] {
                *by_name.entry(name.to_string()).or_default() += c.load(Ordering::SeqCst);
            }
        }
    }
    by_name
}

/// One attack at a time: the signals go to every thread of the process, and each test counts
/// what its own reached.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Installs the counting handler for SIGUSR1, without `SA_RESTART`.
fn install_handler() {
    // SAFETY: all-zero is a valid sigaction; the fields needed are set.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    let h: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = stray;
    sa.sa_sigaction = h as libc::sighandler_t;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installs a handler that only increments an atomic counter.
    let rc = unsafe { libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "sigaction: {}", std::io::Error::last_os_error());
}

/// The process's threads: (tid, name).
fn threads() -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for d in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let Ok(d) = d else { continue };
        let Some(tid) = d.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let name = std::fs::read_to_string(d.path().join("comm")).unwrap_or_default();
        out.push((tid, name.trim().to_string()));
    }
    out
}

/// Sends SIGUSR1 to every other thread of the process, one round about every 50 µs, until
/// stopped. Returns how many signals were sent to threads of each name.
fn blast(stop: Arc<AtomicBool>) -> std::thread::JoinHandle<HashMap<String, usize>> {
    std::thread::spawn(move || {
        // SAFETY: gettid and getpid have no preconditions.
        let (me, pid) = unsafe { (libc::gettid(), libc::getpid()) };
        let mut sent: HashMap<String, usize> = HashMap::new();
        let mut list = threads();
        let mut listed = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            if listed.elapsed() > Duration::from_millis(2) {
                list = threads();
                listed = Instant::now();
            }
            for (tid, name) in &list {
                if *tid == me {
                    continue;
                }
                // SAFETY: tgkill has no memory preconditions; a thread gone meanwhile is ESRCH.
                let rc = unsafe { libc::syscall(libc::SYS_tgkill, pid, *tid, libc::SIGUSR1) };
                if rc == 0 {
                    *sent.entry(name.clone()).or_default() += 1;
                }
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        sent
    })
}

/// Reads the entry's pages in random order (one byte each, then the page), and counts wrong
/// bytes against `want`.
fn read_at_random(e: &Entry, want: &[u8], rng: &mut Rng) -> usize {
    let pages = e.len().div_ceil(PAGE);
    let mut order: Vec<usize> = (0..pages).collect();
    for i in (1..pages).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let b = bytes(e);
    let mut bad = 0;
    for p in order {
        let r = p * PAGE..((p + 1) * PAGE).min(e.len());
        bad += b[r.clone()]
            .iter()
            .zip(&want[r])
            .filter(|(a, b)| a != b)
            .count();
    }
    bad
}

/// The attack: while signals fly at every thread, for `rounds` rounds,
/// - one thread reads a 256-page entry at random after each reclaim (many faults, one page
///   each, served by the reader or a spinning worker in monitor mode),
/// - four threads read one 64 KiB entry whose callback takes 2 ms (all on one chunk: three wait
///   for the fourth's fill; in monitor mode a lone one is served by the reader, long enough for
///   the watcher to stand in),
/// - one thread pins and unpins a third entry after each reclaim and checks it pinned.
///
/// Every byte is checked; the signals must have reached the threads named in `disturbed`.
fn attack(cfg: Config, rounds: usize, disturbed: &[&str]) {
    let _s = serial();
    let _w = Watchdog::new("stray signals", 300);
    install_handler();
    let cache: Cache<u64> = Cache::new(cfg).expect("cache");
    let many = cache.insert(1, 256 * PAGE, regen(11)).expect("insert");
    let slow = cache
        .insert(2, 64 << 10, |off, buf: &mut [u8]| {
            // Sleeps through signals (std retries the interrupted nanosleep).
            std::thread::sleep(Duration::from_millis(2));
            fill(12, off, buf);
            Ok::<(), lazyfree::RegenError>(())
        })
        .expect("insert");
    let pinned = cache.insert(3, 64 * PAGE, regen(13)).expect("insert");
    let before = DELIVERED.load(Ordering::SeqCst);
    let before_by_name = delivered_to(disturbed);
    let stop = Arc::new(AtomicBool::new(false));
    let blaster = blast(stop.clone());
    let bad = Arc::new(AtomicUsize::new(0));
    std::thread::scope(|s| {
        s.spawn(|| {
            let want = expected(11, many.len());
            let mut rng = Rng(0x5eed);
            for _ in 0..rounds {
                testing::reclaim(&many);
                bad.fetch_add(read_at_random(&many, &want, &mut rng), Ordering::SeqCst);
            }
        });
        s.spawn(|| {
            let want = expected(12, slow.len());
            for _ in 0..rounds / 4 {
                testing::reclaim(&slow);
                std::thread::scope(|s2| {
                    for _ in 0..4 {
                        s2.spawn(|| {
                            let got = &bytes(&slow)[..];
                            let n = got.iter().zip(&want).filter(|(a, b)| a != b).count();
                            bad.fetch_add(n, Ordering::SeqCst);
                        });
                    }
                });
            }
        });
        s.spawn(|| {
            for _ in 0..rounds {
                testing::reclaim(&pinned);
                let g = pinned.pin().expect("pin under stray signals");
                bad.fetch_add(mismatches(&pinned, 13), Ordering::SeqCst);
                drop(g);
            }
        });
    });
    stop.store(true, Ordering::SeqCst);
    let sent = blaster.join().expect("blaster");
    let delivered = DELIVERED.load(Ordering::SeqCst) - before;
    let mut names: Vec<_> = sent.iter().collect();
    names.sort();
    report(format_args!(
        "stray signals: {delivered} delivered; sent by thread name: {names:?}"
    ));
    assert_eq!(
        bad.load(Ordering::SeqCst),
        0,
        "wrong bytes under stray signals"
    );
    for n in [many, slow, pinned] {
        assert!(!n.is_failed(), "an entry failed under stray signals");
    }
    assert!(
        delivered >= 100,
        "only {delivered} stray signals were delivered: the attack did not happen"
    );
    let after_by_name = delivered_to(disturbed);
    for name in disturbed {
        let n = after_by_name.get(*name).copied().unwrap_or(0)
            - before_by_name.get(*name).copied().unwrap_or(0);
        report(format_args!("stray signals delivered to {name}: {n}"));
        assert!(
            n >= 10,
            "only {n} stray signals were delivered to threads named {name}: the attack missed \
             them"
        );
    }
}

/// Rounds of each attack: `LAZYFREE_SIGNALS_ROUNDS`, 200 by default (the kernel matrix runs
/// fewer under emulation).
fn rounds() -> usize {
    std::env::var("LAZYFREE_SIGNALS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 4)
        .unwrap_or(200)
}

/// Monitor mode, one-page chunks and no read-ahead: most faults are lone, served by the reader
/// itself, and the slow entry's 2 ms callback on the reader makes the watcher stand in.
#[test]
fn stray_signals_at_every_thread_change_no_byte_monitor() {
    let cfg = Config::default()
        .mode(Mode::Monitor)
        .fill_chunk(FillChunk::Page)
        .read_ahead(0);
    attack(
        cfg,
        rounds(),
        &["lazyfree-monitor", "lazyfree-watch", "lazyfree-worker"],
    );
}

/// Monitor mode as configured by default (64 KiB chunks, read-ahead on).
#[test]
fn stray_signals_at_every_thread_change_no_byte_monitor_default() {
    attack(
        Config::default().mode(Mode::Monitor),
        rounds(),
        &["lazyfree-monitor", "lazyfree-watch"],
    );
}

/// SIGBUS mode: the stray signal lands inside lazyfree's SIGBUS handler (during a callback, or
/// while a thread waits there for another thread's fill of the same chunk).
#[test]
fn stray_signals_at_every_thread_change_no_byte_sigbus() {
    attack(Config::default().mode(Mode::Sigbus), rounds(), &[]);
}

/// Deliveries of the stray signal to the calling thread so far.
fn delivered_here() -> usize {
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() };
    TIDS.iter()
        .zip(&COUNTS)
        .find(|(t, _)| t.load(Ordering::SeqCst) == me)
        .map_or(0, |(_, c)| c.load(Ordering::SeqCst))
}

/// Gets and writes of the map while signals fly: 4 threads get keys (1,000 gets a round each,
/// counted in and out of their shards' readers), 2 insert, replace and remove under a budget
/// (waiting for the readers inside, and evicting). A signal landing between a reader's count and
/// its leaving, or in a writer's wait, must neither lose a count (writers would wait forever) nor
/// let a writer in early (a get would return another key's entry): every entry got is its key's,
/// by length and bytes, and nothing hangs.
#[test]
fn stray_signals_during_gets_and_writes_of_the_map() {
    let _s = serial();
    let _w = Watchdog::new("stray signals during gets", 120);
    install_handler();
    let len_of = |k: u64| (1 + k as usize % 3) * PAGE + k as usize % 5;
    let cache: Cache<u64> = Cache::with_regen(
        Config::default().budget(Some(512 * PAGE)),
        |&k: &u64, off, buf| {
            fill(k, off, buf);
            Ok::<(), lazyfree::RegenError>(())
        },
    )
    .expect("cache");
    for k in 0..64 {
        cache.insert_lazy(k, len_of(k)).expect("insert");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let blaster = blast(stop.clone());
    let (found, bad) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let (to_readers, to_writers) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let readers_left = AtomicUsize::new(4);
    std::thread::scope(|s| {
        for w in 0..2u64 {
            let (cache, readers_left, to_writers) = (&cache, &readers_left, &to_writers);
            s.spawn(move || {
                let mut rng = Rng(w + 7);
                while readers_left.load(Ordering::SeqCst) > 0 {
                    let k = rng.below(256);
                    if rng.below(3) == 0 {
                        cache.remove(&k);
                    } else {
                        cache
                            .insert_lazy(k, len_of(k))
                            .expect("insert under signals");
                    }
                }
                to_writers.fetch_add(delivered_here(), Ordering::SeqCst);
            });
        }
        for r in 0..4u64 {
            let (cache, found, bad) = (&cache, &found, &bad);
            let (readers_left, to_readers) = (&readers_left, &to_readers);
            s.spawn(move || {
                let mut rng = Rng(r + 101);
                for i in 0..1000 * rounds() as u64 {
                    let k = rng.below(256);
                    if let Some(e) = cache.get(&k) {
                        found.fetch_add(1, Ordering::SeqCst);
                        if e.len() != len_of(k) || (i % 64 == 0 && mismatches(&e, k) != 0) {
                            bad.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
                to_readers.fetch_add(delivered_here(), Ordering::SeqCst);
                readers_left.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    stop.store(true, Ordering::SeqCst);
    blaster.join().expect("blaster");
    let (found, bad) = (found.into_inner(), bad.into_inner());
    let (to_readers, to_writers) = (to_readers.into_inner(), to_writers.into_inner());
    report(format_args!(
        "stray signals during gets: {found} entries got; delivered to the readers \
         {to_readers}, to the writers {to_writers}"
    ));
    assert_eq!(
        bad, 0,
        "gets under stray signals returned another key's entry"
    );
    assert!(
        found > 1000,
        "the gets found only {found} entries: the attack did not happen"
    );
    assert!(
        to_readers >= 10 && to_writers >= 10,
        "too few stray signals reached the readers ({to_readers}) or the writers \
         ({to_writers}): the attack missed them"
    );
}

/// Regions dropped (their callbacks' tokens), counted by the tokens.
static DROPPED: AtomicUsize = AtomicUsize::new(0);

/// Counts its drop: a region's callback holds one, so a region freed twice or never shows.
struct Token;

impl Drop for Token {
    fn drop(&mut self) {
        DROPPED.fetch_add(1, Ordering::SeqCst);
    }
}

/// Teardowns while signals fly: each round an entry of 32 one-page chunks is read at random by
/// two threads (faults, fills ahead in monitor mode) while the cache removes it, and the last of
/// the three to let go tears the region down (unpublish, wait for hazards and fault paths, give
/// the span back) with signals landing in its waits, in the fault paths it waits for, and in
/// threads faulting again after a signal (stale fault messages for a region about to go). Every
/// byte read is right, nothing hangs, every region is freed exactly once.
#[test]
fn stray_signals_during_teardowns() {
    let _s = serial();
    let _w = Watchdog::new("stray signals during teardowns", 300);
    install_handler();
    for mode in [Mode::Monitor, Mode::Sigbus] {
        let cfg = Config::default().mode(mode).fill_chunk(FillChunk::Page);
        let cache: Cache<u64> = Cache::new(cfg).expect("cache");
        let dropped_before = DROPPED.load(Ordering::SeqCst);
        let stop = Arc::new(AtomicBool::new(false));
        let blaster = blast(stop.clone());
        let (bad, to_readers) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let rounds = rounds() as u64;
        for k in 0..rounds {
            let token = Token;
            let e = cache
                .insert(k, 32 * PAGE, move |off, buf: &mut [u8]| {
                    let _ = &token;
                    fill(k, off, buf);
                    Ok::<(), lazyfree::RegenError>(())
                })
                .expect("insert under signals");
            let want = expected(k, e.len());
            std::thread::scope(|s| {
                for r in 0..2u64 {
                    let (e, want, bad, to_readers) = (e.clone(), &want, &bad, &to_readers);
                    s.spawn(move || {
                        let mut rng = Rng(k * 2 + r + 1);
                        bad.fetch_add(read_at_random(&e, want, &mut rng), Ordering::SeqCst);
                        drop(e);
                        to_readers.fetch_add(delivered_here(), Ordering::SeqCst);
                    });
                }
                // The cache's handle and this one go while the readers read (or after).
                std::thread::sleep(Duration::from_micros(k % 7 * 100));
                cache.remove(&k);
                drop(e);
            });
        }
        stop.store(true, Ordering::SeqCst);
        blaster.join().expect("blaster");
        assert!(cache.is_empty(), "{mode:?}: entries left");
        drop(cache);
        let freed = DROPPED.load(Ordering::SeqCst) - dropped_before;
        let to_readers = to_readers.into_inner();
        report(format_args!(
            "{mode:?}: {rounds} teardowns under stray signals, {to_readers} signals delivered to \
             the readers"
        ));
        assert_eq!(bad.into_inner(), 0, "{mode:?}: wrong bytes");
        assert_eq!(
            freed, rounds as usize,
            "{mode:?}: regions freed, against regions made"
        );
        assert!(
            to_readers >= 10,
            "{mode:?}: only {to_readers} stray signals reached the readers: the attack missed"
        );
    }
}
