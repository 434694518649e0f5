//! SIGBUS mode: the shared content suite, and how the handler behaves with signals that are not
//! its own. Every test runs in a child process (the handler is process-wide state that stays once
//! installed): each `#[test]` re-runs this binary's `child` test with a case name and asserts how
//! the child ended.

mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use lazyfree::{testing, Cache, Config, Entry, FailurePolicy, FillChunk, Mode, RegenError};

fn cfg() -> Config {
    Config::default().mode(Mode::Sigbus)
}

#[test]
#[ignore = "child-process entry point, run by the other tests"]
fn child() {
    child_main(&|case| match case {
        // The shared suite.
        "content" => content_1000_entries(cfg()),
        "content_page" => content_1000_entries(cfg().fill_chunk(FillChunk::Page)),
        "content_entry" => content_1000_entries(cfg().fill_chunk(FillChunk::Entry)),
        "concurrency" => concurrency(cfg(), 5),
        "same_page_race" => same_page_race(cfg()),
        "nested_regen" => nested_regen(cfg()),
        "failure_zero" => failure_zero_policy(cfg()),
        "poison_error" => child_poison_touch(cfg(), false),
        "poison_panic" => child_poison_touch(cfg(), true),
        "cgroup" => child_cgroup(cfg()),
        // This file's.
        "foreign_sigbus" => child_foreign_sigbus(true),
        "foreign_sigbus_control" => child_foreign_sigbus(false),
        "foreign_sigbus_user_handler" => child_foreign_sigbus_user_handler(),
        "forked_slab_sigbus" => child_forked_slab_sigbus(),
        "null_deref" => child_null_deref(),
        "stack_overflow" => child_stack_overflow(),
        "write_efault" => child_write_efault(),
        "big_stack" => child_big_stack(),
        "mixed" => child_mixed(),
        "panic_zero" => child_panic_zero(),
        "failures_past_reserves" => child_failures_past_reserves(),
        "chain" => child_chain(10),
        "chain_pages" => chain_with(16, cfg().fill_chunk(FillChunk::Page), 8),
        "chain_too_deep" => child_chain(20),
        "self_read" => child_self_read(),
        "self_read_pin" => child_self_read_pin(),
        "signal_reads_awaited_chunk" => child_signal_reads_awaited_chunk(),
        "one_buffer" => child_one_buffer(),
        "entry_chunk_pieces" => child_entry_chunk_pieces(),
        "errno" => child_errno(),
        "no_threads" => child_no_threads(),
        other => panic!("unknown child case {other}"),
    });
}

/// Runs `case` in a child with `envs`; returns its exit status and output (printed).
fn run(case: &str, envs: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let (status, out) = run_child(case, envs, Duration::from_secs(240));
    println!("--- child {case}: {status:?}\n{out}");
    (status, out)
}

/// Runs `case` in a child that must exit successfully.
fn run_ok(case: &str) -> String {
    let (status, out) = run(case, &[]);
    assert!(status.success(), "child {case} ended {status:?}\n{out}");
    out
}

// ---------------------------------------------------------------------------------------------
// The shared content suite in SIGBUS mode

#[test]
fn content_1000_entries_sigbus() {
    run_ok("content");
}

#[test]
fn content_1000_entries_page_chunks_sigbus() {
    run_ok("content_page");
}

#[test]
fn content_1000_entries_whole_entry_chunks_sigbus() {
    run_ok("content_entry");
}

#[test]
fn concurrency_sigbus() {
    run_ok("concurrency");
}

#[test]
fn same_page_race_sigbus() {
    run_ok("same_page_race");
}

#[test]
fn nested_regen_sigbus() {
    run_ok("nested_regen");
}

#[test]
fn failure_zero_policy_sigbus() {
    run_ok("failure_zero");
}

/// Errors and panics under the poison policy: the touch ends the process with SIGBUS (the
/// poisoned page's SIGBUS is not lazyfree's to serve; it reaches the default action).
#[test]
fn failure_poison_touch_kills_with_sigbus_sigbus() {
    poison_touch_kills("sigbus");
}

#[test]
fn cgroup_pressure_sigbus() {
    cgroup_pressure("sigbus");
}

// `failure_poison_kernel_access` is not run in this mode: a kernel-mode access never reaches the
// callback here (it gets EFAULT at once, see `write_syscall_efault_then_pin`), so there is no
// failure to observe.

// ---------------------------------------------------------------------------------------------
// Signals that are not ours

/// A SIGBUS-mode cache whose handler is proven live: an entry rebuilt after real reclaim.
fn live_cache() -> (Cache<u64>, Entry) {
    let cache: Cache<u64> = Cache::new(cfg()).expect("SIGBUS-mode cache");
    let e = cache.insert(1, 200 * 1024, regen(77)).expect("insert");
    assert_eq!(mismatches(&e, 77), 0);
    let dropped = testing::reclaim(&e);
    assert!(dropped > 0, "reclaim dropped nothing");
    assert_eq!(mismatches(&e, 77), 0, "rebuilt through the SIGBUS handler");
    assert!(cache.stats().pages_regenerated > 0);
    println!("HANDLER-LIVE");
    (cache, e)
}

/// Maps a file, truncates it, and reads past the new end: a SIGBUS that is not lazyfree's.
fn touch_truncated_file() {
    use std::io::Write;
    let path = std::env::temp_dir().join(format!("lazyfree-foreign-{}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("temp file");
    f.set_len(2 * PAGE as u64).expect("set_len");
    // SAFETY: a fresh shared read-only mapping of our own file.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            2 * PAGE,
            libc::PROT_READ,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    f.set_len(0).expect("truncate");
    let _ = std::fs::remove_file(&path);
    println!("touching");
    std::io::stdout().flush().unwrap();
    // SAFETY: the page is mapped; reading it past the file's end raises SIGBUS, which is the test.
    let x = unsafe { std::ptr::read_volatile((p as *const u8).add(PAGE)) };
    println!("SURVIVED {x}");
}

fn child_foreign_sigbus(with_lazyfree: bool) {
    let _keep = with_lazyfree.then(live_cache);
    touch_truncated_file();
}

/// A foreign SIGBUS ends the process as it would without lazyfree: same signal, same core dump
/// flag as a child that never made a cache.
#[test]
fn foreign_sigbus_still_kills_with_sigbus() {
    let (control, cout) = run("foreign_sigbus_control", &[]);
    let (status, out) = run("foreign_sigbus", &[]);
    assert!(
        out.contains("HANDLER-LIVE") && out.contains("touching"),
        "{out}"
    );
    assert!(!out.contains("SURVIVED") && !cout.contains("SURVIVED"));
    assert_eq!(
        signal_of(&control),
        Some(libc::SIGBUS),
        "control: {control:?}"
    );
    assert_eq!(
        signal_of(&status),
        Some(libc::SIGBUS),
        "with lazyfree: {status:?}"
    );
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.core_dumped(), control.core_dumped());
}

extern "C" fn user_sigbus_handler(
    _: libc::c_int,
    info: *mut libc::siginfo_t,
    _: *mut libc::c_void,
) {
    let msg = b"USER-HANDLER\n";
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the kernel passes a valid siginfo.
    unsafe {
        libc::write(1, msg.as_ptr().cast(), msg.len());
        let code = if (*info).si_code == libc::BUS_ADRERR {
            42
        } else {
            43
        };
        libc::_exit(code);
    }
}

/// A program's own SA_SIGINFO handler, installed before lazyfree, still gets foreign SIGBUS
/// signals, with their siginfo.
fn child_foreign_sigbus_user_handler() {
    // SAFETY: all-zero is a valid sigaction; the fields we need are set.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    let h: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
        user_sigbus_handler;
    sa.sa_sigaction = h as libc::sighandler_t;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installing a valid action whose handler only calls write(2) and _exit(2).
    let rc = unsafe { libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) };
    assert_eq!(rc, 0);
    let _keep = live_cache();
    touch_truncated_file();
}

#[test]
fn foreign_sigbus_reaches_the_programs_own_handler() {
    let (status, out) = run("foreign_sigbus_user_handler", &[]);
    assert!(
        out.contains("HANDLER-LIVE") && out.contains("USER-HANDLER"),
        "{out}"
    );
    assert_eq!(status.code(), Some(42), "{status:?}");
}

/// A forked child maps a file where one of its parent's entries lies (the slabs are not
/// mapped in a child: MADV_DONTFORK) and reads it past the file's end: that SIGBUS is the
/// child's own, not lazyfree's. It must kill the child as without lazyfree; the handler the
/// child inherited must not run the entry's callback there (nor issue the parent's userfaultfd
/// ioctls). Before the handler checked for a fork, it served the fault in the child.
#[test]
fn a_sigbus_in_a_forked_child_at_a_slab_address_is_not_served() {
    let (status, out) = run_child("forked_slab_sigbus", &[], Duration::from_secs(60));
    println!("--- child forked_slab_sigbus: {status:?}\n{out}");
    assert!(status.success(), "{status:?}\n{out}");
    assert!(out.contains("GRANDCHILD-STATUS signal 7"), "{out}");
    assert!(!out.contains("CALLBACK-IN-CHILD"), "{out}");
    assert!(!out.contains("SURVIVED"), "{out}");
}

fn child_forked_slab_sigbus() {
    let cache: Cache<u64> = Cache::new(cfg()).expect("SIGBUS-mode cache");
    let parent = std::process::id();
    let e = cache
        .insert(1, 2 * PAGE, move |off, buf: &mut [u8]| {
            if std::process::id() != parent {
                let msg = b"CALLBACK-IN-CHILD\n";
                // SAFETY: writes the bytes of a live array.
                unsafe { libc::write(1, msg.as_ptr().cast(), msg.len()) };
            }
            fill(3, off, buf);
            Ok::<(), RegenError>(())
        })
        .expect("insert");
    let at = e.as_ptr() as usize;
    let path = std::env::temp_dir().join(format!("lazyfree-forked-{}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("temp file");
    f.set_len(2 * PAGE as u64).expect("set_len");
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    // SAFETY: fork in a process whose other threads hold no lock the child needs: the child
    // calls only mmap, ftruncate, write(2) and _exit before its read.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: the entry's pages are not mapped in this child (the slab is MADV_DONTFORK):
        // the fixed mapping takes their place, in this process only.
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                2 * PAGE,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd,
                0,
            )
        };
        if p as usize != at {
            say_and_exit(b"MMAP-FAILED\n", 2);
        }
        // SAFETY: a valid fd of ours.
        unsafe { libc::ftruncate(fd, 0) };
        // SAFETY: mapped above; past the file's end the read raises SIGBUS, which is the test.
        let x = unsafe { std::ptr::read_volatile((at as *const u8).add(PAGE)) };
        say_and_exit(
            if x == 0 {
                b"SURVIVED\n"
            } else {
                b"SURVIVED!\n"
            },
            0,
        );
    }
    let status = wait_forked(pid, 20);
    let _ = std::fs::remove_file(&path);
    println!("GRANDCHILD-STATUS {}", describe_status(status));
    assert_eq!(mismatches(&e, 3), 0, "the parent's entry");
}

/// Writes `msg` with write(2) and ends the process with `_exit(code)`: for a forked child.
fn say_and_exit(msg: &[u8], code: i32) -> ! {
    // SAFETY: write(2) of a live slice, then _exit.
    unsafe {
        libc::write(1, msg.as_ptr().cast(), msg.len());
        libc::_exit(code)
    }
}

fn child_null_deref() {
    let _keep = live_cache();
    println!("touching");
    // SAFETY: none: this reads address 0 on purpose, to die of SIGSEGV as a C program would.
    unsafe { std::arch::asm!("mov {0}, qword ptr [{1}]", out(reg) _, in(reg) 0usize) };
    println!("SURVIVED");
}

#[test]
fn null_dereference_still_gives_sigsegv() {
    let (status, out) = run("null_deref", &[]);
    assert!(
        out.contains("HANDLER-LIVE") && out.contains("touching"),
        "{out}"
    );
    assert!(!out.contains("SURVIVED"));
    assert_eq!(signal_of(&status), Some(libc::SIGSEGV), "{status:?}");
}

#[allow(unconditional_recursion)] // the point
fn recurse(depth: u64) -> u64 {
    let mut frame = [depth as u8; 512];
    black_box(&mut frame);
    recurse(depth + 1) + frame[7] as u64
}

fn child_stack_overflow() {
    let _keep = live_cache();
    let h = std::thread::Builder::new()
        .name("overflower".into())
        .spawn(|| recurse(0))
        .unwrap();
    let _ = h.join();
    println!("SURVIVED");
}

#[test]
fn rust_stack_overflow_still_reported() {
    let (status, out) = run("stack_overflow", &[]);
    assert!(out.contains("HANDLER-LIVE"), "{out}");
    assert!(
        out.contains("thread 'overflower'") && out.contains("has overflowed its stack"),
        "Rust's message is missing:\n{out}"
    );
    assert_eq!(signal_of(&status), Some(libc::SIGABRT), "{status:?}");
}

// ---------------------------------------------------------------------------------------------
// The mode's own behaviour

/// write(2) of a reclaimed SIGBUS-mode entry fails with EFAULT (the kernel-mode fault raises no
/// signal); after pin() it succeeds.
fn child_write_efault() {
    let cache: Cache<u64> = Cache::new(cfg()).unwrap();
    assert!(!cache.stats().kernel_faults_handled, "{}", cache.stats());
    let len = 300 * 1024 + 7;
    // Never touched: every page is missing.
    let lazy = cache.insert(1, len, regen(42)).unwrap();
    let err = write_to_pipe(&lazy).expect_err("write(2) from a never-touched entry");
    assert_eq!(err.raw_os_error(), Some(libc::EFAULT), "{err}");
    // Reclaimed after use.
    let used = cache.insert(2, len, regen(43)).unwrap();
    assert_eq!(mismatches(&used, 43), 0);
    let dropped = testing::reclaim(&used);
    let pages = len.div_ceil(PAGE);
    println!("reclaim dropped {dropped} of {pages} pages");
    assert!(used.resident_pages() < pages, "reclaim dropped nothing");
    let err = write_to_pipe(&used).expect_err("write(2) from a reclaimed entry");
    assert_eq!(err.raw_os_error(), Some(libc::EFAULT), "{err}");
    println!("EFAULT: {err}");
    for (e, seed) in [(&lazy, 42), (&used, 43)] {
        let p = e.pin().unwrap();
        assert_eq!(
            write_to_pipe(e).expect("write(2) after pin"),
            expected(seed, len)
        );
        drop(p);
    }
    println!("WRITE-OK");
}

#[test]
fn write_syscall_efault_then_pin() {
    let out = run_ok("write_efault");
    assert!(out.contains("WRITE-OK"));
}

/// Whether this thread is running on its alternate signal stack now.
fn on_alt_stack() -> (bool, usize) {
    // SAFETY: all-zero is a valid stack_t; sigaltstack with a null new stack only queries.
    let mut ss: libc::stack_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::sigaltstack(std::ptr::null(), &mut ss) }, 0);
    (ss.ss_flags & libc::SS_ONSTACK != 0, ss.ss_size)
}

/// A callback with a 64 KiB array on its stack, on threads that have Rust's small alternate
/// signal stack: it must not run there.
fn child_big_stack() {
    let cache: Cache<u64> = Cache::new(cfg()).unwrap();
    let on_alt = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let (a, c) = (on_alt.clone(), calls.clone());
    let e = cache
        .insert(1, 1 << 20, move |off, buf: &mut [u8]| {
            let mut big = [0u8; 64 * 1024];
            fill(31, off, &mut big[..buf.len().min(64 * 1024)]);
            black_box(&mut big);
            buf.copy_from_slice(&big[..buf.len()]);
            if on_alt_stack().0 {
                a.store(true, Ordering::SeqCst);
            }
            c.fetch_add(1, Ordering::SeqCst);
            Ok::<(), RegenError>(())
        })
        .unwrap();
    let (_, alt_size) = on_alt_stack();
    println!("this thread's alternate signal stack: {alt_size} bytes");
    assert_eq!(mismatches(&e, 31), 0);
    testing::reclaim(&e);
    let e2 = e.clone();
    let t = std::thread::spawn(move || {
        let (_, alt) = on_alt_stack();
        println!("spawned thread's alternate signal stack: {alt} bytes");
        mismatches(&e2, 31)
    });
    assert_eq!(t.join().unwrap(), 0);
    assert!(calls.load(Ordering::SeqCst) >= 16);
    assert!(
        !on_alt.load(Ordering::SeqCst),
        "the callback ran on the alternate signal stack"
    );
    println!("BIG-STACK-OK");
}

#[test]
fn callback_with_64k_stack_array() {
    let out = run_ok("big_stack");
    assert!(out.contains("BIG-STACK-OK"));
}

/// A monitor-mode and a SIGBUS-mode cache in one process, each callback reading the other
/// mode's entry; both rebuilt correctly after reclaim.
fn child_mixed() {
    let mon: Cache<u64> = Cache::new(Config::default()).unwrap();
    let sig: Cache<u64> = Cache::new(cfg()).unwrap();
    let len = 256 * 1024;
    let m_plain = mon.insert(1, len, regen(1)).unwrap();
    let s_plain = sig.insert(1, len, regen(2)).unwrap();
    let mp = m_plain.clone();
    // A SIGBUS-mode entry derived from a monitor-mode one, and the other way round.
    let s_from_m = sig
        .insert(2, len, move |off, buf: &mut [u8]| {
            for (i, x) in buf.iter_mut().enumerate() {
                *x = mp[off + i] ^ 0x11;
            }
            Ok::<(), RegenError>(())
        })
        .unwrap();
    let sp = s_plain.clone();
    let m_from_s = mon
        .insert(2, len, move |off, buf: &mut [u8]| {
            for (i, x) in buf.iter_mut().enumerate() {
                *x = sp[off + i] ^ 0x22;
            }
            Ok::<(), RegenError>(())
        })
        .unwrap();
    let check = || {
        assert_eq!(mismatches(&m_plain, 1), 0);
        assert_eq!(mismatches(&s_plain, 2), 0);
        let (w1, w2) = (expected(1, len), expected(2, len));
        assert!(s_from_m.iter().zip(&w1).all(|(x, y)| *x == y ^ 0x11));
        assert!(m_from_s.iter().zip(&w2).all(|(x, y)| *x == y ^ 0x22));
    };
    check();
    for round in 0..3 {
        let all = [&m_plain, &s_plain, &s_from_m, &m_from_s];
        let dropped = testing::reclaim_all(all);
        println!("round {round}: reclaim dropped {dropped} pages");
        assert!(dropped > 0);
        // Derived entries first, so their callbacks fault the other mode's pages.
        let (w1, w2) = (expected(1, len), expected(2, len));
        assert!(s_from_m.iter().zip(&w1).all(|(x, y)| *x == y ^ 0x11));
        assert!(m_from_s.iter().zip(&w2).all(|(x, y)| *x == y ^ 0x22));
        check();
    }
    let (ms, ss) = (mon.stats(), sig.stats());
    println!("monitor: {ms}\nsigbus: {ss}");
    assert!(ms.pages_regenerated > 0 && ss.pages_regenerated > 0);
    assert!(mon.worker_threads() > 0);
    assert_eq!(sig.worker_threads(), 0);
    println!("MIXED-OK");
}

#[test]
fn monitor_and_sigbus_caches_in_one_process() {
    let out = run_ok("mixed");
    assert!(out.contains("MIXED-OK"));
}

/// A panic in the callback is caught in the handler and handled by the zero policy; the process
/// goes on and the handler keeps serving.
fn child_panic_zero() {
    let cache: Cache<u64> = Cache::new(cfg().on_failure(FailurePolicy::Zero)).unwrap();
    let broken = Arc::new(AtomicBool::new(true));
    let b = broken.clone();
    let e = cache
        .insert(1, 5 * PAGE, move |off, buf: &mut [u8]| {
            if b.load(Ordering::SeqCst) {
                panic!("callback panic (test)");
            }
            fill(6, off, buf);
            Ok::<(), RegenError>(())
        })
        .unwrap();
    assert!(e.iter().all(|&x| x == 0), "a failed chunk reads as zeros");
    assert!(e.is_failed());
    assert!(e.last_error().unwrap().contains("panicked"));
    assert!(cache.stats().regenerate_failures >= 1);
    // The handler still works, for this entry once fixed and for others.
    let other = cache.insert(2, 3 * PAGE, regen(8)).unwrap();
    assert_eq!(mismatches(&other, 8), 0);
    broken.store(false, Ordering::SeqCst);
    drop(e.pin().expect("pin after the fix"));
    assert!(!e.is_failed());
    assert_eq!(mismatches(&e, 6), 0);
    println!("PANIC-HANDLED");
}

#[test]
fn panic_in_callback_handled_by_failure_policy() {
    let out = run_ok("panic_zero");
    assert!(
        out.contains("callback panic (test)"),
        "the panic message is printed"
    );
    assert!(out.contains("PANIC-HANDLED"));
}

/// More first failures in the handler than it has blocks and message buffers made in advance
/// (64 each, topped up at each SIGBUS-mode `Cache::new`): 100 entries whose callbacks fail,
/// each touched once, no pin. Every failure is counted and marked, nothing crashes; the first
/// 64 keep their own message, the rest none (`Config::mode`'s docs); after a new cache is made,
/// a failure keeps its message again.
fn child_failures_past_reserves() {
    let cache: Cache<u64> = Cache::new(cfg().on_failure(FailurePolicy::Zero)).unwrap();
    let failing = |i: u64| {
        cache
            .insert(i, PAGE, move |off, _buf: &mut [u8]| {
                Err::<(), RegenError>(format!("entry {i} broken at {off}").into())
            })
            .unwrap()
    };
    let entries: Vec<Entry> = (0..100).map(failing).collect();
    for e in &entries {
        assert_eq!(black_box(e[0]), 0, "a failed page reads as zeros");
    }
    assert!(
        entries.iter().all(|e| e.is_failed()),
        "a failure not marked"
    );
    assert!(cache.stats().regenerate_failures >= 100);
    let kept: Vec<usize> = (0..100)
        .filter(|&i| entries[i].last_error().is_some())
        .collect();
    for &i in &kept {
        assert_eq!(
            entries[i].last_error().unwrap(),
            format!("entry {i} broken at 0"),
            "entry {i} holds another's message"
        );
    }
    println!("messages kept: {} of 100", kept.len());
    assert_eq!(kept, (0..64).collect::<Vec<_>>(), "not the first 64 kept");
    let _topped_up: Cache<u64> = Cache::new(cfg()).unwrap();
    let late = failing(100);
    assert_eq!(black_box(late[0]), 0);
    assert_eq!(late.last_error().as_deref(), Some("entry 100 broken at 0"));
    println!("RESERVES-OK");
}

#[test]
fn failures_past_the_handlers_reserves() {
    let out = run_ok("failures_past_reserves");
    assert!(out.contains("RESERVES-OK"));
}

/// `n` entries, each callback reading the next entry: a chain of `n - 1` nested faults.
fn child_chain(n: usize) {
    chain_with(n, cfg(), 1);
}

/// A chain of `n` entries in `config`, whose head is read after a reclaim by `threads` threads
/// at once.
fn chain_with(n: usize, config: Config, threads: usize) {
    let cache: Cache<u64> = Cache::new(config).unwrap();
    let len = 64 * 1024;
    let mut next: Option<Entry> = None;
    let mut entries = Vec::new();
    for i in (0..n).rev() {
        let e = match next.take() {
            None => cache.insert(i as u64, len, regen(500)).unwrap(),
            Some(nx) => cache
                .insert(i as u64, len, move |off, buf: &mut [u8]| {
                    for (j, x) in buf.iter_mut().enumerate() {
                        *x = nx[off + j] ^ (i as u8 + 1);
                    }
                    Ok::<(), RegenError>(())
                })
                .unwrap(),
        };
        next = Some(e.clone());
        entries.push(e);
    }
    entries.reverse();
    let want = |i: usize| -> Vec<u8> {
        let mut v = expected(500, len);
        for k in i..n - 1 {
            v.iter_mut().for_each(|x| *x ^= k as u8 + 1);
        }
        v
    };
    println!("reading the head of a chain of {n}");
    // Nothing touched yet: the first read nests n - 1 deep.
    assert_eq!(entries[0][..], want(0)[..]);
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e[..], want(i)[..], "entry {i}");
    }
    testing::reclaim_all(&entries);
    let head = want(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| assert_eq!(entries[0][..], head[..]));
        }
    });
    println!("CHAIN-OK");
}

#[test]
fn nested_faults_ten_deep() {
    let out = run_ok("chain");
    assert!(out.contains("CHAIN-OK"));
}

/// One-page chunks are rebuilt on the faulting thread's stack, not in a pooled buffer: a
/// chain nested 15 deep (the most the handler allows is 16 frames), its head read by 8 threads
/// at once after a reclaim, so 8 threads each stack 15 handler frames with a page of scratch in
/// each, racing on the same chunks.
#[test]
fn nested_one_page_chunks_on_the_stack_from_eight_threads() {
    let out = run_ok("chain_pages");
    assert!(out.contains("CHAIN-OK"));
}

#[test]
fn nesting_too_deep_aborts_with_message() {
    let (status, out) = run("chain_too_deep", &[]);
    assert_eq!(signal_of(&status), Some(libc::SIGABRT), "{status:?}");
    assert!(out.contains("nested more than 16 deep"), "{out}");
    assert!(!out.contains("CHAIN-OK"));
}

/// A pin's own rebuild (the callback runs in the pinning thread, outside any handler frame)
/// whose callback reads the chunk it rebuilds: the handler aborts with the message instead of
/// waiting for the pinning thread's own claim for good (as it did before it looked at the
/// thread's callbacks in flight).
#[test]
fn a_pins_callback_reading_its_own_chunk_aborts_with_a_message() {
    let (status, out) = run_child("self_read_pin", &[], Duration::from_secs(60));
    println!("--- child self_read_pin: {status:?}\n{out}");
    assert_eq!(signal_of(&status), Some(libc::SIGABRT), "{status:?}\n{out}");
    assert!(out.contains("read the chunk it is rebuilding"), "{out}");
    assert!(!out.contains("SURVIVED"), "{out}");
}

/// A signal nobody expected, whose handler reads cache memory: thread B faults on a chunk that
/// thread A is rebuilding (a slow callback) and waits in the SIGBUS handler; a signal then runs
/// a handler on B that reads another page of that chunk. That nested fault must wait for A's
/// rebuild too, and every byte be right. Before, the handler took it for a callback reading its
/// own chunk (an outer frame of B named that chunk) and aborted.
#[test]
fn a_signal_handler_reading_a_chunk_its_thread_waits_for_waits_too() {
    let (status, out) = run_child("signal_reads_awaited_chunk", &[], Duration::from_secs(60));
    println!("--- child signal_reads_awaited_chunk: {status:?}\n{out}");
    assert!(status.success(), "{status:?}\n{out}");
    assert!(out.contains("SIGNAL-READ-OK"), "{out}");
}

/// The page the signal handler reads, and what it read (+1; 0: not yet).
static SIGNAL_READS_AT: AtomicUsize = AtomicUsize::new(0);
static SIGNAL_READ: AtomicUsize = AtomicUsize::new(0);

extern "C" fn read_in_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let at = SIGNAL_READS_AT.load(Ordering::SeqCst);
    // SAFETY: the address of a live entry's byte, set before the signal is sent.
    let b = unsafe { std::ptr::read_volatile(at as *const u8) };
    SIGNAL_READ.store(b as usize + 1, Ordering::SeqCst);
}

fn child_signal_reads_awaited_chunk() {
    const CHUNK: usize = 64 * 1024;
    let _w = Watchdog::new("signal_reads_awaited_chunk", 50);
    let cache: Cache<u64> = Cache::new(cfg()).unwrap();
    let entered = Arc::new(AtomicBool::new(false));
    let returned = Arc::new(AtomicBool::new(false));
    let e = {
        let (entered, returned) = (entered.clone(), returned.clone());
        cache
            .insert(4, CHUNK, move |off, buf: &mut [u8]| {
                if !entered.swap(true, Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1500));
                }
                fill(4, off, buf);
                returned.store(true, Ordering::SeqCst);
                Ok::<(), RegenError>(())
            })
            .unwrap()
    };
    SIGNAL_READS_AT.store(e.as_ptr() as usize + 5 * PAGE + 7, Ordering::SeqCst);
    // SAFETY: all-zero is a valid sigaction; the fields needed are set. The handler only reads
    // an entry's byte (through lazyfree's SIGBUS handler if missing) and stores an atomic.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        let h: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            read_in_handler;
        sa.sa_sigaction = h as libc::sighandler_t;
        sa.sa_flags = libc::SA_SIGINFO;
        assert_eq!(libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut()), 0);
    }
    let a = {
        let e = e.clone();
        std::thread::spawn(move || e[0])
    };
    wait_until("the slow callback never ran", 20, || {
        entered.load(Ordering::SeqCst)
    });
    let b = {
        let e = e.clone();
        std::thread::spawn(move || e[2 * PAGE])
    };
    // B faults and waits in the handler for A's rebuild (1.5 s); signal it meanwhile.
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !returned.load(Ordering::SeqCst),
        "the slow callback returned too soon to test"
    );
    use std::os::unix::thread::JoinHandleExt;
    // SAFETY: B is alive (it waits for the slow rebuild); SIGUSR2 has the handler above.
    let rc = unsafe { libc::pthread_kill(b.as_pthread_t(), libc::SIGUSR2) };
    assert_eq!(rc, 0, "pthread_kill");
    let want = expected(4, CHUNK);
    assert_eq!(a.join().unwrap(), want[0], "A's byte");
    assert_eq!(b.join().unwrap(), want[2 * PAGE], "B's byte");
    wait_until("the signal handler never ran", 20, || {
        SIGNAL_READ.load(Ordering::SeqCst) != 0
    });
    assert_eq!(
        SIGNAL_READ.load(Ordering::SeqCst),
        want[5 * PAGE + 7] as usize + 1,
        "the byte the signal handler read"
    );
    assert_eq!(mismatches(&e, 4), 0);
    println!("SIGNAL-READ-OK");
}

fn child_self_read_pin() {
    let cache: Cache<u64> = Cache::new(cfg()).unwrap();
    let e = self_reading_entry(&cache);
    println!("pinning");
    let got = e.pin().map(|p| p[0]);
    println!("SURVIVED {got:?}");
}

fn child_self_read() {
    let cache: Cache<u64> = Cache::new(cfg()).unwrap();
    let e = self_reading_entry(&cache);
    println!("touching");
    println!("SURVIVED {}", e[0]);
}

#[test]
fn callback_reading_its_own_chunk_aborts_with_message() {
    let (status, out) = run("self_read", &[]);
    assert_eq!(signal_of(&status), Some(libc::SIGABRT), "{status:?}");
    assert!(out.contains("read the chunk it is rebuilding"), "{out}");
    assert!(!out.contains("SURVIVED"));
}

/// With one pooled buffer: threads that fault at once wait for it, and a nested fault, finding
/// it taken, rebuilds from a stack buffer in pieces.
fn child_one_buffer() {
    let cache: Arc<Cache<u64>> = Arc::new(Cache::new(cfg()).unwrap());
    let len = 256 * 1024;
    let pieces = Arc::new(Mutex::new(Vec::new()));
    let p = pieces.clone();
    let inner = cache
        .insert(100, len, move |off, buf: &mut [u8]| {
            p.lock().unwrap().push(buf.len());
            fill(100, off, buf);
            Ok::<(), RegenError>(())
        })
        .unwrap();
    let outer = {
        let inner = inner.clone();
        cache
            .insert(101, len, move |off, buf: &mut [u8]| {
                for (j, x) in buf.iter_mut().enumerate() {
                    *x = inner[off + j] ^ 0x77;
                }
                Ok::<(), RegenError>(())
            })
            .unwrap()
    };
    let w = expected(100, len);
    assert!(outer.iter().zip(&w).all(|(x, y)| *x == y ^ 0x77));
    assert_eq!(mismatches(&inner, 100), 0);
    let seen = pieces.lock().unwrap().clone();
    println!("inner callback buffer sizes: {seen:?}");
    assert!(
        seen.iter().all(|&n| n <= 16 * 1024),
        "nested rebuilds used the stack buffer"
    );
    assert_eq!(seen.iter().sum::<usize>(), len, "each page rebuilt once");

    // Four threads fault distinct entries at once; slow callbacks hold the one buffer.
    let entries: Vec<Entry> = (0..4)
        .map(|k| {
            cache
                .insert(k, len, move |off, buf: &mut [u8]| {
                    std::thread::sleep(Duration::from_millis(5));
                    fill(k, off, buf);
                    Ok::<(), RegenError>(())
                })
                .unwrap()
        })
        .collect();
    let barrier = Arc::new(std::sync::Barrier::new(4));
    let hs: Vec<_> = entries
        .iter()
        .enumerate()
        .map(|(k, e)| {
            let (e, b) = (e.clone(), barrier.clone());
            std::thread::spawn(move || {
                b.wait();
                mismatches(&e, k as u64)
            })
        })
        .collect();
    for h in hs {
        assert_eq!(h.join().unwrap(), 0);
    }
    println!("ONE-BUFFER-OK");
}

#[test]
fn one_pooled_buffer_waits_and_nested_uses_the_stack() {
    let (status, out) = run("one_buffer", &[("LAZYFREE_SIGBUS_SCRATCH_BUFFERS", "1")]);
    assert!(status.success(), "{status:?}\n{out}");
    assert!(out.contains("ONE-BUFFER-OK"));
}

/// `FillChunk::Entry` with an entry larger than the pooled buffers (64 MiB): regenerated in two
/// pieces, each installed correctly.
fn child_entry_chunk_pieces() {
    let cache: Cache<u64> = Cache::new(cfg().fill_chunk(FillChunk::Entry)).unwrap();
    let len = (64 << 20) + 3 * PAGE + 100;
    let calls = Arc::new(Mutex::new(Vec::new()));
    let c = calls.clone();
    let e = cache
        .insert(1, len, move |off, buf: &mut [u8]| {
            c.lock().unwrap().push((off, buf.len()));
            fill(64, off, buf);
            Ok::<(), RegenError>(())
        })
        .unwrap();
    assert_eq!(mismatches(&e, 64), 0);
    let first = calls.lock().unwrap().clone();
    println!("callback calls (offset, len): {first:?}");
    assert_eq!(first, vec![(0, 64 << 20), (64 << 20, 3 * PAGE + 100)]);
    let dropped = testing::reclaim(&e);
    println!("reclaim dropped {dropped} pages");
    assert!(dropped > 0);
    assert_eq!(mismatches(&e, 64), 0);
    println!("PIECES-OK");
}

#[test]
fn chunk_larger_than_pool_buffers_is_rebuilt_in_pieces() {
    let out = run_ok("entry_chunk_pieces");
    assert!(out.contains("PIECES-OK"));
}

/// The handler saves and restores errno around a callback that changes it.
fn child_errno() {
    let cache: Cache<u64> = Cache::new(cfg()).unwrap();
    let e = cache
        .insert(1, 8 * PAGE, |off, buf: &mut [u8]| {
            // SAFETY: closing an invalid fd only sets errno (EBADF).
            unsafe { libc::close(-1) };
            fill(12, off, buf);
            Ok::<(), RegenError>(())
        })
        .unwrap();
    for round in 0..2 {
        // SAFETY: this thread's errno slot.
        unsafe { *libc::__errno_location() = 12345 };
        let x = black_box(e[round * 5 * PAGE + 3]);
        // SAFETY: as above.
        let after = unsafe { *libc::__errno_location() };
        assert_eq!(after, 12345, "errno changed by the fault (read {x})");
        testing::reclaim(&e);
    }
    assert_eq!(mismatches(&e, 12), 0);
    assert!(cache.stats().regenerate_calls >= 2);
    println!("ERRNO-OK");
}

#[test]
fn errno_is_preserved_across_a_fault() {
    let out = run_ok("errno");
    assert!(out.contains("ERRNO-OK"));
}

/// SIGBUS mode starts no thread.
fn child_no_threads() {
    let count = || std::fs::read_dir("/proc/self/task").unwrap().count();
    let before = count();
    let cache: Cache<u64> = Cache::new(cfg()).unwrap();
    let e = cache.insert(1, 1 << 20, regen(3)).unwrap();
    assert_eq!(mismatches(&e, 3), 0);
    testing::reclaim(&e);
    assert_eq!(mismatches(&e, 3), 0);
    assert_eq!(count(), before, "threads started");
    assert_eq!(cache.worker_threads(), 0);
    assert!(!lazyfree::testing::monitor_running());
    println!("NO-THREADS-OK");
}

#[test]
fn no_thread_is_started() {
    let out = run_ok("no_threads");
    assert!(out.contains("NO-THREADS-OK"));
}
