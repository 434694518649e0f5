//! fork(2): cache memory is MADV_DONTFORK, so a forked child has no mapping there. Touching an
//! entry in the child must end it with SIGSEGV, never read zeros; dropping its copies of caches
//! and entries must neither hang it nor disturb the parent; making a cache there is refused.
//!
//! Each case runs in a child process (re-exec of this binary) that makes a cache and forks a
//! grandchild; the child asserts how the grandchild ended and that its own cache still works.

mod common;

use std::time::Duration;

use common::*;
use lazyfree::{testing, Cache, Config, Entry, Error, Mode};

#[test]
#[ignore = "child-process entry point, run by the other tests"]
fn child() {
    child_main(&|case| {
        let (what, mode) = case.split_once('/').expect("case what/mode");
        let mode = match mode {
            "monitor" => Mode::Monitor,
            "sigbus" => Mode::Sigbus,
            "explicit" => Mode::Explicit,
            other => panic!("unknown mode {other}"),
        };
        match what {
            "touch" => child_fork(mode, Grandchild::Touch),
            "touch_pinned" => child_fork(mode, Grandchild::TouchPinned),
            "drop" => child_fork(mode, Grandchild::Drop),
            "new_cache" => child_fork(mode, Grandchild::NewCache),
            other => panic!("unknown case {other}"),
        }
    });
}

#[derive(Clone, Copy, Debug)]
enum Grandchild {
    /// Read an entry that was reclaimed in the parent.
    Touch,
    /// Read an entry that is pinned (resident) in the parent.
    TouchPinned,
    /// Drop the copies of the cache and the entries, then exit 0.
    Drop,
    /// Make a new cache of the same mode; exit 0 if it is refused with `Error::ForkedChild`.
    NewCache,
}

/// Writes `msg` to stdout with write(2): no lock a parent thread may have held at fork.
fn say(msg: &str) {
    // SAFETY: writes the bytes of a live str.
    unsafe { libc::write(1, msg.as_ptr().cast(), msg.len()) };
}

/// Reads one byte of the entry as the program would in this mode. In explicit mode the read
/// goes through `pin()`, which a forked child is refused: the grandchild then exits with 44.
fn read_byte(e: &Entry) -> u8 {
    match e.try_as_slice() {
        Some(b) => std::hint::black_box(b[PAGE + 5]),
        None => match e.pin() {
            Ok(p) => std::hint::black_box(p[PAGE + 5]),
            Err(Error::ForkedChild) => {
                say("GRANDCHILD PIN REFUSED\n");
                // SAFETY: ends the grandchild at once, as the other cases do.
                unsafe { libc::_exit(44) }
            }
            Err(e) => {
                say(&format!("GRANDCHILD PIN FAILED {e}\n"));
                // SAFETY: as above.
                unsafe { libc::_exit(45) }
            }
        },
    }
}

fn child_fork(mode: Mode, what: Grandchild) {
    let cache: Cache<u64> = Cache::new(Config::default().mode(mode)).expect("cache");
    let reclaimed = cache.insert(1, 64 * PAGE, regen(1)).unwrap();
    let pinned = cache
        .insert_with(2, &expected(2, 64 * PAGE), regen(2))
        .unwrap();
    assert_eq!(mismatches(&reclaimed, 1), 0);
    let guard = pinned.pin().unwrap();
    assert!(testing::reclaim(&reclaimed) > 0, "nothing reclaimed");
    let want = expected(1, 2 * PAGE)[PAGE + 5];
    println!("forking: {what:?} in {mode:?} mode");

    // SAFETY: the grandchild only reads memory, uses lazyfree as the case says and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = match what {
            Grandchild::Touch => {
                let b = read_byte(&reclaimed);
                say(&format!("GRANDCHILD READ {b} (want {want})\n"));
                if b == 0 {
                    40
                } else {
                    41
                }
            }
            Grandchild::TouchPinned => {
                let b = read_byte(&pinned);
                say(&format!("GRANDCHILD READ PINNED {b}\n"));
                42
            }
            Grandchild::Drop => {
                std::mem::forget(guard); // a guard borrows `pinned`; dropping it touches nothing
                drop(reclaimed);
                drop(pinned);
                drop(cache);
                say("GRANDCHILD DROPPED\n");
                0
            }
            Grandchild::NewCache => match Cache::<u64>::new(Config::default().mode(mode)) {
                Err(Error::ForkedChild) => {
                    say("GRANDCHILD REFUSED\n");
                    0
                }
                other => {
                    say(&format!("GRANDCHILD GOT {other:?}\n"));
                    43
                }
            },
        };
        // SAFETY: ends the grandchild without running the parent's atexit handlers or flushing
        // its copied buffers.
        unsafe { libc::_exit(code) };
    }

    // Wait for the grandchild, at most 30 s.
    let status =
        wait_forked(pid, 30).unwrap_or_else(|| panic!("the grandchild ({what:?}, {mode:?}) hung"));
    if libc::WIFSIGNALED(status) {
        println!("GRANDCHILD-SIGNAL {}", libc::WTERMSIG(status));
    } else {
        println!("GRANDCHILD-EXIT {}", libc::WEXITSTATUS(status));
    }

    // The parent's cache works as before: reclaim again, read everything.
    drop(guard);
    let cache2 = &cache;
    for k in [1u64, 2] {
        let e = cache2.get(&k).expect("entry");
        testing::reclaim(&e);
        assert_eq!(mismatches(&e, k), 0, "parent's entry {k} after the fork");
    }
    let extra = cache.insert(3, 10 * PAGE, regen(3)).unwrap();
    assert_eq!(mismatches(&extra, 3), 0);
    println!("PARENT-OK");
}

fn run(case: &str) -> String {
    let (status, out) = run_child(case, &[], Duration::from_secs(120));
    println!("--- child {case}: {status:?}\n{out}");
    assert!(status.success(), "child {case} ended {status:?}\n{out}");
    assert!(out.contains("PARENT-OK"), "{out}");
    out
}

fn grandchild_signal(out: &str) -> Option<i32> {
    out.lines()
        .find_map(|l| l.strip_prefix("GRANDCHILD-SIGNAL "))
        .and_then(|v| v.trim().parse().ok())
}

fn assert_sigsegv(case: &str) {
    let out = run(case);
    assert!(
        !out.contains("GRANDCHILD READ"),
        "the child read cache bytes:\n{out}"
    );
    assert_eq!(grandchild_signal(&out), Some(libc::SIGSEGV), "{out}");
}

fn assert_clean_exit(case: &str) {
    let out = run(case);
    assert!(out.contains("GRANDCHILD-EXIT 0"), "{out}");
}

#[test]
fn touch_in_forked_child_is_sigsegv_monitor() {
    assert_sigsegv("touch/monitor");
    assert_sigsegv("touch_pinned/monitor");
}

#[test]
fn touch_in_forked_child_is_sigsegv_sigbus() {
    assert_sigsegv("touch/sigbus");
    assert_sigsegv("touch_pinned/sigbus");
}

/// Explicit mode reads through `pin()`, which a forked child is refused with
/// `Error::ForkedChild` before anything is touched.
#[test]
fn pin_in_forked_child_is_refused_explicit() {
    for case in ["touch/explicit", "touch_pinned/explicit"] {
        let out = run(case);
        assert!(
            !out.contains("GRANDCHILD READ"),
            "the child read cache bytes:\n{out}"
        );
        assert!(out.contains("GRANDCHILD PIN REFUSED"), "{out}");
        assert!(out.contains("GRANDCHILD-EXIT 44"), "{out}");
    }
}

#[test]
fn drop_in_forked_child_neither_hangs_nor_disturbs_the_parent() {
    for mode in ["monitor", "sigbus", "explicit"] {
        assert_clean_exit(&format!("drop/{mode}"));
    }
}

#[test]
fn new_cache_in_forked_child_is_refused() {
    for mode in ["monitor", "sigbus", "explicit"] {
        assert_clean_exit(&format!("new_cache/{mode}"));
    }
}
