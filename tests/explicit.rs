//! Explicit mode (no userfaultfd): the shared content suite read through pins, lost pages found
//! and rebuilt one by one, the checked read API, failures, and `Mode::Auto`'s fallback when a
//! seccomp filter denies userfaultfd (in a child process: the filter, like `LAZYFREE_MODE`, is
//! process-wide).

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use lazyfree::{testing, Cache, Config, Error, FillChunk, Mode, RegenError, VolatileArena};

fn cfg() -> Config {
    Config::default().mode(Mode::Explicit)
}

#[test]
#[ignore = "child-process entry point, run by the other tests"]
fn child() {
    child_main(&|case| match case {
        "cgroup" => child_cgroup(cfg()),
        "seccomp_fallback" => child_seccomp_fallback(),
        "env_explicit" => child_env(Some("explicit")),
        "env_bogus" => child_env(Some("sometimes")),
        other => panic!("unknown child case {other}"),
    });
}

// ---------------------------------------------------------------------------------------------
// The shared content suite, read through pins

#[test]
fn content_1000_entries_explicit() {
    content_1000_entries(cfg());
}

#[test]
fn content_1000_entries_page_chunks_explicit() {
    content_1000_entries(cfg().fill_chunk(FillChunk::Page));
}

#[test]
fn content_1000_entries_whole_entry_chunks_explicit() {
    content_1000_entries(cfg().fill_chunk(FillChunk::Entry));
}

#[test]
fn concurrency_explicit() {
    concurrency(cfg(), 5);
}

#[test]
fn same_page_race_explicit() {
    same_page_race(cfg());
}

#[test]
fn nested_regen_explicit() {
    nested_regen(cfg());
}

#[test]
fn failure_zero_policy_explicit() {
    failure_zero_policy(cfg());
}

#[test]
fn cgroup_pressure_explicit() {
    cgroup_pressure("explicit");
}

// ---------------------------------------------------------------------------------------------
// This mode's own behaviour

/// Unpinned bytes cannot be read by accident: `Deref` panics naming `pin()`, `try_as_slice`
/// gives `None`; the pin reads them.
#[test]
fn unpinned_reads_are_refused() {
    let cache: Cache<u64> = Cache::new(cfg()).unwrap();
    let e = cache
        .insert_with(1, &expected(3, 10_000), regen(3))
        .unwrap();
    assert!(e.try_as_slice().is_none());
    let panic = catch_unwind(AssertUnwindSafe(|| e[0])).expect_err("Deref must panic");
    let msg = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(
        msg.contains("Entry::pin()") && msg.contains("explicit"),
        "{msg}"
    );
    assert!(catch_unwind(AssertUnwindSafe(|| e.as_slice().len())).is_err());
    let p = e.pin().unwrap();
    assert_eq!(p[..], expected(3, 10_000)[..]);
    // Still refused while pinned: a slice could outlive the pin.
    assert!(e.try_as_slice().is_none());
}

/// Only the lost pages are copied in: a callback that gives different bytes on each call shows
/// which pages came from which call.
#[test]
fn only_lost_pages_are_rebuilt() {
    let cache: Cache<u64> = Cache::new(cfg().fill_chunk(FillChunk::Entry)).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let pages = 16;
    // Call n produces stream 100 + n.
    let e = cache
        .insert(1, pages * PAGE, move |off, buf: &mut [u8]| {
            let n = c.fetch_add(1, Ordering::SeqCst) as u64 + 1;
            fill(100 + n, off, buf);
            Ok::<(), RegenError>(())
        })
        .unwrap();
    assert_eq!(mismatches(&e, 101), 0, "first pin: call 1 fills every page");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let s0 = cache.stats();
    // Drop pages 3, 4 and 9 only.
    let dropped = testing::reclaim_ptr(e.as_ptr().wrapping_add(3 * PAGE), 2 * PAGE)
        + testing::reclaim_ptr(e.as_ptr().wrapping_add(9 * PAGE), PAGE);
    if dropped == 0 {
        common::skipped(format_args!(
            "only_lost_pages_are_rebuilt: reclaim dropped nothing"
        ));
        return;
    }
    let p = e.pin().unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one call for the chunk");
    let (first, second) = (expected(101, pages * PAGE), expected(102, pages * PAGE));
    let mut rebuilt = Vec::new();
    for pg in 0..pages {
        let r = pg * PAGE..(pg + 1) * PAGE;
        if p[r.clone()] == second[r.clone()] {
            rebuilt.push(pg);
        } else {
            assert_eq!(p[r.clone()], first[r], "page {pg} is neither call's bytes");
        }
    }
    println!("dropped {dropped} pages, rebuilt pages {rebuilt:?}");
    assert_eq!(rebuilt.len(), dropped);
    assert!(
        rebuilt.iter().all(|pg| [3, 4, 9].contains(pg)),
        "{rebuilt:?}"
    );
    let s1 = cache.stats();
    assert_eq!(s1.pages_regenerated - s0.pages_regenerated, dropped as u64);
}

/// The word under each page's marker is the user's and survives: pages beginning with zeros,
/// with the marker's own bytes, and bytes written while pinned.
#[test]
fn first_words_survive_marking() {
    let cache: Cache<u64> = Cache::new(cfg()).unwrap();
    let pages = 8;
    let mut data = expected(7, pages * PAGE);
    for pg in 0..pages {
        let w: [u8; 8] = match pg % 3 {
            0 => [0; 8],
            1 => 0x6c61_7a79_6672_6565u64.to_le_bytes(), // the marker, as stored
            _ => *b"lazyfree",
        };
        data[pg * PAGE..pg * PAGE + 8].copy_from_slice(&w);
    }
    let d2 = data.clone();
    let e = cache
        .insert_with(1, &data, move |off, buf: &mut [u8]| {
            buf.copy_from_slice(&d2[off..off + buf.len()]);
            Ok::<(), RegenError>(())
        })
        .unwrap();
    for round in 0..3 {
        assert_eq!(e.pin().unwrap()[..], data[..], "round {round}");
        if round == 1 {
            testing::reclaim(&e);
        }
    }
    // A write while pinned stays while the page is kept (no reclaim in between).
    {
        let mut p = e.pin().unwrap();
        // SAFETY: no other reference to the entry's bytes is alive.
        unsafe { p.as_mut_slice()[..8].copy_from_slice(b"written!") };
    }
    assert_eq!(&e.pin().unwrap()[..8], b"written!");
    testing::reclaim(&e);
    assert_eq!(
        e.pin().unwrap()[..],
        data[..],
        "after reclaim: the callback's bytes"
    );
}

/// A failing chunk fails the pin; earlier chunks stay rebuilt and kept pages stay; after the
/// fix a pin rebuilds the rest. Nothing reads as zeros in between.
#[test]
fn failure_in_a_middle_chunk() {
    let cache: Cache<u64> = Cache::new(cfg().fill_chunk(FillChunk::Page)).unwrap();
    let broken = Arc::new(AtomicBool::new(false));
    let b = broken.clone();
    let e = cache
        .insert(1, 4 * PAGE, move |off, buf: &mut [u8]| {
            if off == 2 * PAGE && b.load(Ordering::SeqCst) {
                return Err("page 2 is broken (test)".into());
            }
            fill(12, off, buf);
            Ok::<(), RegenError>(())
        })
        .unwrap();
    broken.store(true, Ordering::SeqCst);
    let r = e.pin();
    assert!(
        matches!(&r, Err(Error::RegenerateFailed(m)) if m.contains("page 2 is broken")),
        "{r:?}"
    );
    drop(r);
    assert!(e.is_failed() && !e.is_pinned());
    let s = cache.stats();
    assert_eq!(s.failed_entries, 1);
    assert_eq!(
        s.pages_regenerated, 2,
        "pages 0 and 1 rebuilt before the failure"
    );
    assert!(e.pin().is_err(), "still broken");
    broken.store(false, Ordering::SeqCst);
    assert_eq!(mismatches(&e, 12), 0);
    assert!(!e.is_failed());
    // Pages 0 and 1 were kept (marked again after the failure), 2 and 3 rebuilt now.
    assert_eq!(cache.stats().pages_regenerated, 4);
    testing::reclaim(&e);
    assert_eq!(mismatches(&e, 12), 0);
}

/// A callback that pins its own entry gets an error instead of waiting for itself.
#[test]
fn callback_pinning_its_own_entry_fails_instead_of_hanging() {
    let _w = Watchdog::new("self pin", 60);
    let cache: Cache<u64> = Cache::new(cfg()).unwrap();
    let me: Arc<std::sync::OnceLock<lazyfree::Entry>> = Arc::default();
    let m = me.clone();
    let e = cache
        .insert(1, PAGE, move |_off, buf: &mut [u8]| {
            let own = m.get().expect("set");
            let p = own.pin()?;
            buf.copy_from_slice(&p[..]);
            Ok::<(), RegenError>(())
        })
        .unwrap();
    me.set(e.clone()).unwrap();
    match e.pin() {
        Err(Error::RegenerateFailed(m)) => assert!(m.contains("rebuilding"), "{m}"),
        other => panic!("{other:?}"),
    }
    drop(me);
}

#[test]
fn stats_and_api_in_explicit_mode() {
    let cache: Cache<u64> = Cache::new(cfg()).unwrap();
    let e = cache.insert(1, 3 * PAGE, regen(2)).unwrap();
    let s = cache.stats();
    assert_eq!(s.mode, Mode::Explicit);
    assert_eq!(s.uffd_kind, "none (explicit mode)");
    assert!(!s.kernel_faults_handled && !s.poison_supported);
    assert_eq!(s.fallback_reason, None);
    assert_eq!(cache.worker_threads(), 0);
    assert_eq!(s.resident_bytes, 0, "lazy entry starts empty");
    assert!(matches!(e.unpin_unguarded(), Err(Error::NotPinned)));
    e.pin_unguarded().unwrap();
    e.pin_unguarded().unwrap();
    assert!(e.is_pinned());
    // A syscall reads a pinned entry.
    assert_eq!(write_to_pipe(&e).unwrap(), expected(2, 3 * PAGE));
    e.unpin_unguarded().unwrap();
    assert!(e.is_pinned(), "pins nest");
    assert_eq!(testing::reclaim(&e), 0, "pinned pages stay");
    e.unpin_unguarded().unwrap();
    assert!(!e.is_pinned());
    assert!(testing::reclaim(&e) > 0, "unpinned pages can be dropped");
    assert_eq!(mismatches(&e, 2), 0);
    // Budget eviction skips pinned entries here too.
    let small: Cache<u64> = Cache::new(cfg().budget(Some(4 * PAGE))).unwrap();
    let a = small.insert(1, 2 * PAGE, regen(1)).unwrap();
    let _pin = a.pin().unwrap();
    small.insert(2, 2 * PAGE, regen(2)).unwrap();
    small.insert(3, 2 * PAGE, regen(3)).unwrap();
    assert!(small.contains_key(&1) && !small.contains_key(&2));
    // The allocator interfaces need a userfaultfd.
    assert!(matches!(
        VolatileArena::new(cfg()),
        Err(Error::InvalidConfig(m)) if m.contains("userfaultfd")
    ));
}

/// Where a userfaultfd can be had (here), `Mode::Auto` is the monitor mode.
#[test]
fn auto_uses_the_monitor_where_it_can() {
    if std::env::var_os("LAZYFREE_MODE").is_some() {
        common::skipped(format_args!(
            "auto_uses_the_monitor_where_it_can: LAZYFREE_MODE is set"
        ));
        return;
    }
    let cache: Cache<u64> = Cache::new(Config::default().mode(Mode::Auto)).unwrap();
    let s = cache.stats();
    if s.mode == Mode::Explicit {
        common::skipped(format_args!(
            "auto_uses_the_monitor_where_it_can: no userfaultfd here ({:?})",
            s.fallback_reason
        ));
        return;
    }
    assert_eq!(s.mode, Mode::Monitor);
    assert_eq!(s.fallback_reason, None);
    let e = cache.insert(1, 5 * PAGE, regen(1)).unwrap();
    assert_eq!(mismatches(&e, 1), 0);
}

// ---------------------------------------------------------------------------------------------
// LAZYFREE_MODE

#[test]
fn env_forces_explicit_for_auto_caches_only() {
    let (status, out) = run_child(
        "env_explicit",
        &[("LAZYFREE_MODE", "explicit")],
        Duration::from_secs(60),
    );
    println!("{out}");
    assert!(status.success(), "{status:?}\n{out}");
    assert!(out.contains("ENV-OK"), "{out}");
    let (status, out) = run_child(
        "env_bogus",
        &[("LAZYFREE_MODE", "sometimes")],
        Duration::from_secs(60),
    );
    println!("{out}");
    assert!(status.success(), "{status:?}\n{out}");
    assert!(out.contains("ENV-REFUSED"), "{out}");
}

fn child_env(value: Option<&str>) {
    let auto = Cache::<u64>::new(Config::default().mode(Mode::Auto));
    if value == Some("explicit") {
        let auto = auto.expect("auto cache");
        let s = auto.stats();
        assert_eq!(s.mode, Mode::Explicit);
        assert_eq!(s.fallback_reason.as_deref(), Some("LAZYFREE_MODE=explicit"));
        let e = auto.insert(1, 20_000, regen(5)).unwrap();
        assert!(e.try_as_slice().is_none());
        assert_eq!(mismatches(&e, 5), 0);
        // A mode set in the Config wins over the variable.
        let monitor: Cache<u64> = Cache::new(Config::default()).expect("monitor cache");
        assert_eq!(monitor.stats().mode, Mode::Monitor);
        assert!(monitor
            .insert(1, 10, regen(1))
            .unwrap()
            .try_as_slice()
            .is_some());
        println!("ENV-OK");
    } else {
        match auto {
            Err(Error::InvalidConfig(m)) => {
                assert!(m.contains("LAZYFREE_MODE") && m.contains("explicit"), "{m}");
                println!("ENV-REFUSED: {m}");
            }
            other => panic!("LAZYFREE_MODE={value:?} gave {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The fallback: a seccomp filter denies userfaultfd

/// Installs a seccomp filter (on every thread of the process) that fails `userfaultfd(2)` and the
/// `USERFAULTFD_IOC_NEW` ioctl of `/dev/userfaultfd` with EPERM, as a container runtime that
/// denies userfaultfd does (Docker's default profile has no rule allowing `userfaultfd`, and
/// containers get no `/dev/userfaultfd`). Opening the node cannot be filtered by path in seccomp,
/// so its one ioctl is denied instead: the node is useless without it.
fn deny_userfaultfd() {
    #[cfg(target_arch = "x86_64")]
    const AUDIT_ARCH: u32 = 0xc000_003e;
    #[cfg(target_arch = "aarch64")]
    const AUDIT_ARCH: u32 = 0xc000_00b7;
    const USERFAULTFD_IOC_NEW: u32 = 0xaa00;
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let ld = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let ret = libc::BPF_RET | libc::BPF_K;
    // struct seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8 i (little-endian: low half).
    let mut prog = [
        stmt(ld, 4),                                             // 0: arch
        jeq(AUDIT_ARCH, 0, 6),                                   // 1: other arch -> allow
        stmt(ld, 0),                                             // 2: syscall number
        jeq(libc::SYS_userfaultfd as u32, 3, 0),                 // 3: -> EPERM
        jeq(libc::SYS_ioctl as u32, 0, 3),                       // 4: not ioctl -> allow
        stmt(ld, 24),                                            // 5: ioctl request (args[1])
        jeq(USERFAULTFD_IOC_NEW, 0, 1),                          // 6: other request -> allow
        stmt(ret, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32), // 7
        stmt(ret, libc::SECCOMP_RET_ALLOW),                      // 8
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers.
    let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    assert_eq!(
        r,
        0,
        "PR_SET_NO_NEW_PRIVS: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fprog points at a valid BPF program that outlives the call (the kernel copies it).
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_TSYNC,
            &fprog as *const libc::sock_fprog,
        )
    };
    assert_eq!(r, 0, "seccomp: {}", std::io::Error::last_os_error());
}

fn child_seccomp_fallback() {
    deny_userfaultfd();
    // SAFETY: userfaultfd(2) with flags only; the filter must make it fail.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
    assert!(fd < 0, "the filter did not deny userfaultfd(2)");
    // Forced modes report why.
    for mode in [Mode::Monitor, Mode::Sigbus] {
        match Cache::<u64>::new(Config::default().mode(mode)) {
            Err(
                e @ Error::UserfaultfdUnavailable {
                    syscall_errno,
                    devnode_errno,
                    user_mode_only_errno,
                },
            ) => {
                println!("{mode:?}: {e}");
                assert_eq!(syscall_errno, libc::EPERM);
                assert_eq!(user_mode_only_errno, libc::EPERM);
                // EPERM from the filtered ioctl, or EACCES/ENOENT where the node is not ours.
                assert_ne!(devnode_errno, 0);
                assert!(e.to_string().contains("seccomp"), "{e}");
            }
            other => panic!("{mode:?} under the filter gave {other:?}"),
        }
    }
    // Auto falls back, says why, logs once.
    for _ in 0..2 {
        let cache: Cache<u64> = Cache::new(Config::default().mode(Mode::Auto)).expect("auto");
        let s = cache.stats();
        assert_eq!(s.mode, Mode::Explicit);
        let why = s.fallback_reason.expect("a fallback reason");
        assert!(why.contains("EPERM"), "{why}");
        println!("FALLBACK-REASON {why}");
    }
    // And works: the suite's content test, through pins.
    content_1000_entries(Config::default().mode(Mode::Auto));
    failure_zero_policy(Config::default().mode(Mode::Auto));
    println!("FALLBACK-OK");
}

#[test]
fn auto_falls_back_to_explicit_under_seccomp() {
    let (status, out) = run_child("seccomp_fallback", &[], Duration::from_secs(240));
    println!("{out}");
    assert!(status.success(), "{status:?}\n{out}");
    assert!(out.contains("FALLBACK-OK"), "{out}");
    let logs = out
        .lines()
        .filter(|l| l.starts_with("lazyfree: Mode::Auto uses the explicit mode"))
        .count();
    assert_eq!(logs, 1, "the fallback is logged once:\n{out}");
}

/// Pages a pin rebuilt on one CPU and unpinned from another are reclaimable at once (MADV_FREE
/// skips pages still in another CPU's LRU batch; the pin drains its CPU's batch).
#[test]
fn rebuilt_on_one_cpu_unpinned_on_another_is_reclaimable() {
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if cpus < 2 {
        common::skipped(format_args!(
            "rebuilt_on_one_cpu_unpinned_on_another_is_reclaimable: one CPU"
        ));
        return;
    }
    fn on_cpu(c: usize) -> bool {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes within it; the call
        // changes the calling thread's affinity only.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(c, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) == 0
        }
    }
    std::thread::spawn(|| {
        let cache: Cache<u64> = Cache::new(cfg()).unwrap();
        for round in 0..5 {
            let e = cache.insert(round, 8 * PAGE, regen(2)).unwrap();
            if !on_cpu(0) {
                common::skipped(format_args!("rebuilt_on_one_cpu_unpinned_on_another_is_reclaimable: cannot move the thread to CPU 0"));
                return;
            }
            e.pin_unguarded().unwrap(); // rebuilds all 8 pages on CPU 0
            assert!(on_cpu(1), "cannot move the thread to CPU 1");
            e.unpin_unguarded().unwrap();
            let d = testing::reclaim(&e);
            println!("round {round}: {d} of 8 pages dropped");
            assert_eq!(d, 8, "round {round}");
            assert_eq!(mismatches(&e, 2), 0);
        }
    })
    .join()
    .unwrap();
}
