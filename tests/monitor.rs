//! The content suite and the monitor-specific tests, in monitor mode (the default).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use lazyfree::{testing, Cache, Config, Error, FillChunk};

fn cfg() -> Config {
    Config::default()
}

#[test]
#[ignore = "child-process entry point, run by the other tests"]
fn child() {
    child_main(&|case| match case {
        "poison_error" => child_poison_touch(cfg(), false),
        "poison_panic" => child_poison_touch(cfg(), true),
        "poison_kernel" => failure_poison_kernel_access(cfg()),
        "cgroup" => child_cgroup(cfg()),
        "shutdown" => child_shutdown(),
        "vmas" => child_vmas(),
        "self_read" => child_self_read(),
        "self_read_ahead" => child_self_read_ahead(),
        "self_read_pin" => child_self_read_pin(),
        "use_after_release" => child_use_after_release(),
        other => panic!("unknown child case {other}"),
    });
}

#[test]
fn content_1000_entries_monitor() {
    content_1000_entries(cfg());
}

#[test]
fn content_1000_entries_page_chunks() {
    content_1000_entries(cfg().fill_chunk(FillChunk::Page));
}

#[test]
fn content_1000_entries_whole_entry_chunks() {
    content_1000_entries(cfg().fill_chunk(FillChunk::Entry));
}

#[test]
fn concurrency_monitor() {
    concurrency(cfg(), 8);
}

#[test]
fn same_page_race_monitor() {
    same_page_race(cfg());
}

#[test]
fn nested_regen_monitor() {
    nested_regen(cfg());
}

#[test]
fn failure_zero_policy_monitor() {
    failure_zero_policy(cfg());
}

#[test]
fn failure_poison_kernel_access_monitor() {
    failure_poison_kernel_access(cfg());
}

#[test]
fn failure_poison_touch_kills_with_sigbus_monitor() {
    poison_touch_kills("monitor");
}

/// The poison policy on a kernel without UFFDIO_POISON (before 6.6), as if by
/// `LAZYFREE_TEST_NO_UFFDIO_POISON=1`: the monitor leaves the failed pages missing and makes
/// them inaccessible. A touch dies of SIGSEGV, never reads zeros.
#[test]
fn failure_poison_emulated_touch_kills_with_sigsegv_monitor() {
    poison_touch_kills_with(
        "monitor",
        &[("LAZYFREE_TEST_NO_UFFDIO_POISON", "1")],
        libc::SIGSEGV,
    );
}

/// As above, for a kernel-mode read: write(2) from the failed entry fails (EFAULT) and sends no
/// zeros out; after the callback recovers, a pin rebuilds the entry.
#[test]
fn failure_poison_emulated_kernel_access_monitor() {
    let (status, out) = run_child(
        "poison_kernel",
        &[("LAZYFREE_TEST_NO_UFFDIO_POISON", "1")],
        Duration::from_secs(120),
    );
    assert!(status.success(), "child ended {status:?}\n{out}");
    assert!(!out.contains("SKIPPED"), "{out}");
}

#[test]
fn cgroup_pressure_monitor() {
    cgroup_pressure("monitor");
}

/// A kernel-mode fault (write(2) from a reclaimed entry) is served by the monitor when the fd
/// handles kernel faults; with a user-mode-only fd it fails with EFAULT instead.
#[test]
fn write_syscall_from_reclaimed_entry() {
    let cache: Cache<u64> = Cache::new(cfg()).unwrap();
    let e = cache.insert(1, 300 * 1024 + 7, regen(42)).unwrap();
    assert_eq!(mismatches(&e, 42), 0);
    let dropped = testing::reclaim(&e);
    assert!(dropped > 0);
    let s = cache.stats();
    let r = write_to_pipe(&e);
    if s.kernel_faults_handled {
        let got = r.expect("write(2) from a reclaimed entry");
        assert_eq!(got, expected(42, e.len()));
    } else {
        println!("user-mode-only userfaultfd: write(2) must fail with EFAULT");
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EFAULT));
        let _p = e.pin().unwrap();
        assert_eq!(write_to_pipe(&e).unwrap(), expected(42, e.len()));
    }
}

/// The bytes past an entry's length in its last page read as zero, after a lazy first touch,
/// after insert_with, and after a rebuild.
#[test]
fn bytes_past_the_end_are_zero() {
    let cache: Cache<u64> = Cache::new(cfg()).unwrap();
    let tail = |e: &lazyfree::Entry| {
        let end = e.len().div_ceil(PAGE) * PAGE;
        // SAFETY: the entry's span is whole pages; the bytes after len up to the page end belong
        // to it and are mapped while `e` lives.
        unsafe { std::slice::from_raw_parts(e.as_ptr().add(e.len()), end - e.len()) }
            .iter()
            .all(|&b| b == 0)
    };
    // A callback that writes 0xff everywhere it is asked to: the tail must still be zero.
    let ones = |_off: usize, buf: &mut [u8]| {
        buf.fill(0xff);
        Ok::<(), lazyfree::RegenError>(())
    };
    let lazy = cache.insert(1, 3 * PAGE + 123, ones).unwrap();
    assert!(lazy.iter().all(|&b| b == 0xff));
    assert!(tail(&lazy));
    let eager = cache.insert_with(2, &[0xffu8; 5000], ones).unwrap();
    assert!(tail(&eager));
    for e in [&lazy, &eager] {
        assert!(testing::reclaim(e) > 0);
        assert!(e.iter().all(|&b| b == 0xff));
        assert!(tail(e));
    }
}

/// A chunk whose missing pages form more than 64 runs: rebuilt on a read, and during a pin
/// without making volatile again the pages the pin's sweep already went over (the first 128
/// pages stay present, so the sweep passes them before it faults on the fragmented part).
#[test]
fn fragmented_chunk_of_many_runs() {
    let cache: Cache<u64> = Cache::new(cfg().fill_chunk(FillChunk::Entry)).unwrap();
    let e = cache
        .insert_with(1, &expected(77, 2 << 20), regen(77))
        .unwrap();
    let fragment = || {
        for p in (128..512).step_by(2) {
            // SAFETY: the page lies inside the entry's 2 MiB.
            testing::reclaim_ptr(unsafe { e.as_ptr().add(p * PAGE) }, PAGE);
        }
        let resident = e.resident_pages();
        assert!(resident <= 360, "{resident} of 512 pages still resident");
    };
    fragment();
    assert_eq!(mismatches(&e, 77), 0);
    fragment();
    let p = e.pin().unwrap();
    assert_eq!(
        testing::reclaim(&e),
        0,
        "pages of a pinned entry were dropped"
    );
    drop(p);
    assert_eq!(mismatches(&e, 77), 0);
}

/// A callback that reads the chunk it is rebuilding would wait for itself: the monitor aborts
/// with a message instead of hanging.
#[test]
fn callback_reading_its_own_chunk_aborts_with_a_message() {
    let (status, out) = run_child("self_read", &[], Duration::from_secs(60));
    assert_eq!(signal_of(&status), Some(libc::SIGABRT), "{status:?}\n{out}");
    assert!(out.contains("read the chunk it is rebuilding"), "{out}");
    assert!(!out.contains("RETURNED"), "{out}");
}

fn child_self_read() {
    let cache: Cache<u64> = Cache::new(cfg()).unwrap();
    let e = self_reading_entry(&cache);
    let x = std::hint::black_box(e[0]);
    println!("RETURNED {x}");
}

/// The same for a chunk filled ahead of a sequential reader: reads of chunks 0 and 1 make the
/// worker that served chunk 1 fill chunk 2 ahead, and chunk 2's callback reads chunk 2. The
/// monitor aborts with the message; before, its self-read check still named chunk 1 (the fault
/// it served), so the worker waited for itself, chunk 2 stayed claimed for good and the reader,
/// woken after a short bound, returned.
#[test]
fn callback_filling_ahead_reading_its_own_chunk_aborts_with_a_message() {
    let (status, out) = run_child("self_read_ahead", &[], Duration::from_secs(60));
    assert_eq!(signal_of(&status), Some(libc::SIGABRT), "{status:?}\n{out}");
    assert!(out.contains("read the chunk it is rebuilding"), "{out}");
    assert!(!out.contains("RETURNED"), "{out}");
}

fn child_self_read_ahead() {
    const CHUNK: usize = 64 * 1024;
    let cache: Cache<u64> = Cache::new(cfg().read_ahead(4 * CHUNK)).unwrap();
    let me: Arc<std::sync::OnceLock<lazyfree::Entry>> = Arc::default();
    let me2 = me.clone();
    let e = cache
        .insert(1, 4 * CHUNK, move |off, buf: &mut [u8]| {
            if off >= 2 * CHUNK {
                let own = me2.get().expect("set before the first touch");
                buf.fill(own[off]); // chunk 2 (or 3) reads the very bytes being rebuilt
            } else {
                fill(1, off, buf);
            }
            Ok::<(), lazyfree::RegenError>(())
        })
        .unwrap();
    me.set(e.clone()).unwrap();
    let a = std::hint::black_box(e[0]);
    let b = std::hint::black_box(e[CHUNK]);
    // Chunk 2 is filled ahead of this reader, which is woken after a short bound if that fill
    // is slow: give the worker time to abort before saying the reads returned.
    std::thread::sleep(Duration::from_secs(5));
    println!("RETURNED {a} {b}");
}

/// The same for a pin's own rebuild, whose callback runs in the pinning thread (no worker):
/// the monitor aborts with the message; before, it took the fault for an ordinary one, and the
/// pinning thread waited for its own claim for good.
#[test]
fn a_pins_callback_reading_its_own_chunk_aborts_with_a_message() {
    let (status, out) = run_child("self_read_pin", &[], Duration::from_secs(60));
    println!("--- child self_read_pin: {status:?}\n{out}");
    assert_eq!(signal_of(&status), Some(libc::SIGABRT), "{status:?}\n{out}");
    assert!(out.contains("read the chunk it is rebuilding"), "{out}");
    assert!(!out.contains("RETURNED"), "{out}");
}

fn child_self_read_pin() {
    let cache: Cache<u64> = Cache::new(cfg()).unwrap();
    let e = self_reading_entry(&cache);
    let got = e.pin().map(|p| p[0]);
    println!("RETURNED {got:?}");
}

/// 1,000,000 small entries add only a few VMAs: slabs are registered once. In a child process,
/// so no other test's mappings or slabs blur the count. Besides the slabs and their lookup
/// tables, the count has the cache map's shard tables (16 shards per CPU): malloc maps each on
/// its own once it passes its mmap threshold (128 KiB: 8,192 entries of 16 bytes), so up to
/// 1,000,000 / 8,192 = 122 of them.
#[test]
fn vma_count_for_1m_entries() {
    let (status, out) = run_child("vmas", &[], Duration::from_secs(240));
    println!("{out}");
    assert!(status.success(), "{status:?}\n{out}");
    let added: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("VMAS-ADDED "))
        .and_then(|v| v.trim().parse().ok())
        .expect("child prints VMAS-ADDED");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let shards = (cpus * 16).next_power_of_two().clamp(16, 1024);
    let limit = 36 + shards.min(122);
    assert!(
        added <= limit,
        "{added} VMAs added for 1,000,000 entries (limit {limit})"
    );
}

fn child_vmas() {
    let count = || {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .count()
    };
    let before = count();
    let cache: Cache<u64> = Cache::new(cfg()).unwrap();
    let mut keep = Vec::with_capacity(1_000_000);
    for i in 0..1_000_000u64 {
        keep.push(
            cache
                .insert(i, 100 + (i as usize % 4000), regen(i))
                .unwrap(),
        );
        if i == 99_999 {
            println!("VMAs after 100,000 entries: {} added", count() - before);
        }
    }
    let after = count();
    println!("VMAs: {before} before the cache, {after} after 1,000,000 entries");
    // They are real entries.
    for i in (0..1_000_000u64).step_by(99_991) {
        assert_eq!(mismatches(&keep[i as usize], i), 0);
    }
    println!("VMAS-ADDED {}", after.saturating_sub(before));
}

#[test]
fn bad_input() {
    let cache: Cache<u64> = Cache::new(cfg()).unwrap();
    assert!(matches!(
        cache.insert(1, 0, regen(1)),
        Err(Error::InvalidLength { len: 0, .. })
    ));
    assert!(matches!(
        cache.insert(1, usize::MAX, regen(1)),
        Err(Error::InvalidLength { .. })
    ));
    assert!(matches!(
        cache.insert_with(1, &[], regen(1)),
        Err(Error::InvalidLength { .. })
    ));
    assert!(cache.is_empty());
    let msg = cache.insert(1, 0, regen(1)).unwrap_err().to_string();
    assert!(msg.contains("at least one byte"), "{msg}");
    assert!(matches!(
        Cache::<u64>::new(cfg().fill_chunk(FillChunk::Bytes(0))),
        Err(Error::InvalidConfig(_))
    ));
    assert!(matches!(
        Cache::<u64>::new(cfg().budget(Some(100))),
        Err(Error::InvalidConfig(_))
    ));
    assert!(cache.get(&77).is_none());
    assert!(cache.remove(&77).is_none());
}

/// Insert of an existing key replaces it; old handles stay valid.
#[test]
fn insert_existing_key_replaces() {
    let cache: Cache<&'static str> = Cache::new(cfg()).unwrap();
    let old = cache.insert("k", 10_000, regen(1)).unwrap();
    let new = cache.insert("k", 20_000, regen(2)).unwrap();
    assert_eq!(cache.len(), 1);
    assert_eq!(cache.get(&"k").unwrap().len(), 20_000);
    testing::reclaim(&old);
    assert_eq!(mismatches(&old, 1), 0);
    assert_eq!(mismatches(&new, 2), 0);
}

/// A removed entry keeps its memory, rebuildable, until its last handle drops.
#[test]
fn remove_while_held_and_pinned() {
    let cache: Cache<u64> = Cache::new(cfg()).unwrap();
    let e = cache.insert(1, 50_000, regen(8)).unwrap();
    let p = e.pin().unwrap();
    let removed = cache.remove(&1).expect("removed");
    assert!(!cache.contains_key(&1));
    assert_eq!(p[..], expected(8, 50_000)[..]);
    drop(p);
    drop(removed);
    testing::reclaim(&e);
    assert_eq!(mismatches(&e, 8), 0);
    assert_eq!(cache.stats().entries, 0);
}

#[test]
fn budget_evicts_least_recently_used_unpinned() {
    let cache: Cache<u64> = Cache::new(cfg().budget(Some(10 * PAGE))).unwrap();
    let big = cache.insert(99, 11 * PAGE, regen(1));
    assert!(matches!(big, Err(Error::OverBudget { .. })), "{big:?}");
    for k in 0..5 {
        cache.insert(k, 2 * PAGE, regen(k)).unwrap();
    }
    let pinned_entry = cache.get(&0).unwrap(); // 0 is now most recent... and pinned
    let _pin = pinned_entry.pin().unwrap();
    cache.get(&1); // 1 is used after 0
    cache.insert(5, 2 * PAGE, regen(5)).unwrap(); // evicts 2, the least recently used
    assert!(!cache.contains_key(&2));
    assert!(cache.contains_key(&0) && cache.contains_key(&1));
    cache.insert(6, 6 * PAGE, regen(6)).unwrap(); // evicts 3, 4, 1 — never the pinned 0
    assert!(cache.contains_key(&0), "pinned entry evicted");
    assert!(cache.stats().bytes <= 10 * PAGE);
    assert_eq!(cache.stats().evictions, 4);
    // Everything left pinned or too big: an error, not an overrun.
    let r = cache.insert(7, 9 * PAGE, regen(7));
    assert!(matches!(r, Err(Error::OverBudget { .. })), "{r:?}");
}

#[test]
fn entry_is_send_sync_clone_and_stats_counts() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<lazyfree::Entry>();
    fn assert_cache_send_sync<T: Send + Sync>() {}
    assert_cache_send_sync::<Cache<String>>();
    let cache: Arc<Cache<u64>> = Arc::new(Cache::new(cfg().fill_chunk(FillChunk::Page)).unwrap());
    let e = cache.insert(1, 8 * PAGE, regen(4)).unwrap();
    let s0 = cache.stats();
    assert_eq!(s0.resident_bytes, 0, "lazy entry starts empty");
    assert_eq!(mismatches(&e, 4), 0);
    let s1 = cache.stats();
    assert_eq!(s1.resident_bytes, 8 * PAGE);
    assert_eq!(
        s1.regenerate_calls - s0.regenerate_calls,
        8,
        "one call per page chunk"
    );
    assert_eq!(s1.pages_regenerated - s0.pages_regenerated, 8);
    assert_eq!(
        s1.regenerate_latency.iter().sum::<u64>(),
        s1.regenerate_calls
    );
    // Every page chunk was faulted on or filled ahead of a sequential fault (read_ahead).
    assert!(s1.faults_handled >= 2, "{s1:?}");
    assert!(
        s1.faults_handled + s1.pages_read_ahead >= 8,
        "{} faults, {} pages read ahead",
        s1.faults_handled,
        s1.pages_read_ahead
    );
}

/// When the last cache and entry go, the monitor threads stop; a new cache starts them again.
#[test]
fn runtime_shuts_down_and_restarts() {
    let (status, out) = run_child("shutdown", &[], Duration::from_secs(60));
    assert!(status.success(), "{status:?}\n{out}");
    assert!(out.contains("SHUTDOWN-OK"), "{out}");
}

fn child_shutdown() {
    let threads = || {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter(|t| {
                let p = t.as_ref().unwrap().path().join("comm");
                std::fs::read_to_string(p)
                    .unwrap_or_default()
                    .starts_with("lazyfree")
            })
            .count()
    };
    for _ in 0..2 {
        let cache: Cache<u64> = Cache::new(cfg()).unwrap();
        let e = cache.insert(1, 100_000, regen(3)).unwrap();
        assert_eq!(mismatches(&e, 3), 0);
        assert!(lazyfree::testing::monitor_running());
        // A thread takes its name when it first runs: a worker spinning on the uffd may have
        // served every fault before the reader ran at all.
        let t0 = std::time::Instant::now();
        while threads() < 2 && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(threads() >= 2, "monitor threads running");
        drop(cache);
        assert!(
            lazyfree::testing::monitor_running(),
            "the entry keeps the runtime"
        );
        testing::reclaim(&e);
        assert_eq!(mismatches(&e, 3), 0);
        drop(e);
        assert!(!lazyfree::testing::monitor_running());
        // The monitor joined its threads; the kernel lists a joined thread in /proc/self/task
        // until it has released it, a moment later (seen under qemu's TCG).
        let t0 = std::time::Instant::now();
        while threads() > 0 && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(threads(), 0, "monitor threads stopped");
    }
    println!("SHUTDOWN-OK");
}

/// Child side: reads an entry's bytes through a pointer kept after the entry was removed and
/// released (what a C program does with an `lf_entry_data` pointer after `lf_entry_release`).
fn child_use_after_release() {
    let cache: Cache<u64> = Cache::new(cfg()).expect("cache");
    let e = cache.insert(1, PAGE, regen(1)).expect("insert");
    let p = e.as_ptr();
    cache.remove(&1);
    drop(e);
    println!("TOUCHING AFTER RELEASE");
    // SAFETY: none: the entry is gone; this read is the use after release the test is about.
    let b = unsafe { std::ptr::read_volatile(p) };
    println!("READ {b} AFTER RELEASE");
}

/// A thread that touches memory no entry owns any more is woken into the same fault forever;
/// the monitor sees it keep faulting there (a streak of 2 s without pause, not the burst of
/// stale messages signals leave behind) and aborts the process with a message naming the
/// address, instead of a silent hang.
#[test]
fn use_after_release_aborts_with_a_message() {
    let t = std::time::Instant::now();
    let (status, out) = run_child("use_after_release", &[], Duration::from_secs(60));
    assert_eq!(
        signal_of(&status),
        Some(libc::SIGABRT),
        "child ended {status:?}\n{out}"
    );
    assert!(out.contains("TOUCHING AFTER RELEASE"), "{out}");
    assert!(
        !out.contains("AFTER RELEASE\n") || !out.contains("READ "),
        "{out}"
    );
    assert!(
        out.contains("keeps touching address") && out.contains("owned by no live entry"),
        "{out}"
    );
    report(format_args!(
        "use after release: aborted after {:.1} s",
        t.elapsed().as_secs_f64()
    ));
}
