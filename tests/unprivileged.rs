//! lazyfree as an ordinary user: a child process drops to uid/gid 65534 and runs every mode.
//! Which userfaultfd it gets depends on the system (`vm.unprivileged_userfaultfd`, the access
//! mode of `/dev/userfaultfd`); the child reads both and asserts the kind the documented order
//! gives: the plain syscall, `/dev/userfaultfd`, then `UFFD_USER_MODE_ONLY`. With a
//! user-mode-only fd a `write(2)` from a reclaimed entry fails with EFAULT, and works once pinned.

mod common;

use std::time::Duration;

use common::*;
use lazyfree::{testing, Cache, Config, Entry, Mode};

const NOBODY: u32 = 65534;

#[test]
#[ignore = "child-process entry point, run by the other tests"]
fn child() {
    child_main(&|case| match case {
        "monitor" => child_unprivileged(Mode::Monitor, true),
        "sigbus" => child_unprivileged(Mode::Sigbus, true),
        "explicit" => child_unprivileged(Mode::Explicit, true),
        "auto" => child_unprivileged(Mode::Auto, true),
        "user_mode_only_root" => child_unprivileged(Mode::Monitor, false),
        other => panic!("unknown child case {other}"),
    });
}

/// Drops to uid/gid 65534 for the whole process (glibc applies setuid/setgid to every thread).
fn drop_privileges() {
    // SAFETY: plain integer arguments; setgroups with size 0 takes no list.
    unsafe {
        assert_eq!(libc::setgroups(0, std::ptr::null()), 0, "setgroups");
        assert_eq!(libc::setgid(NOBODY), 0, "setgid");
        assert_eq!(libc::setuid(NOBODY), 0, "setuid");
        assert_eq!(libc::geteuid(), NOBODY);
        assert_eq!(libc::getegid(), NOBODY);
    }
    // SAFETY: setuid(0) only tries; it must fail now.
    assert_ne!(unsafe { libc::setuid(0) }, 0, "privileges were not dropped");
}

/// The userfaultfd kind this process should get in monitor mode, by the documented order.
fn expected_monitor_kind() -> &'static str {
    let sysctl = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    // SAFETY: a valid NUL-terminated path.
    let node = unsafe { libc::access(c"/dev/userfaultfd".as_ptr(), libc::R_OK | libc::W_OK) } == 0;
    println!("vm.unprivileged_userfaultfd={sysctl}, /dev/userfaultfd usable: {node}, root: {root}");
    if root || sysctl == "1" {
        "userfaultfd(2)"
    } else if node {
        "/dev/userfaultfd"
    } else {
        "userfaultfd(UFFD_USER_MODE_ONLY)"
    }
}

/// Reclaims until some pages of `e` drop (without root, per-CPU batches are not drained first,
/// so fewer pages may drop); returns the pages dropped.
fn reclaim_some(e: &Entry) -> usize {
    let mut dropped = 0;
    for _ in 0..20 {
        dropped += testing::reclaim(e);
        if dropped > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    dropped
}

fn child_unprivileged(mode: Mode, drop: bool) {
    if drop {
        drop_privileges();
    }
    let expected_kind = match mode {
        Mode::Explicit => "none (explicit mode)",
        // SIGBUS mode asks for a user-mode-only fd first: it cannot serve kernel faults anyway.
        Mode::Sigbus => "userfaultfd(UFFD_USER_MODE_ONLY)",
        _ if std::env::var_os("LAZYFREE_UFFD_USER_MODE_ONLY").is_some() => {
            "userfaultfd(UFFD_USER_MODE_ONLY)"
        }
        _ => expected_monitor_kind(),
    };
    let cache: Cache<u64> = Cache::new(Config::default().mode(mode)).expect("cache");
    let s = cache.stats();
    println!("mode {mode:?} -> {:?}, uffd: {}", s.mode, s.uffd_kind);
    assert_eq!(s.uffd_kind, expected_kind);
    if mode == Mode::Auto {
        assert_eq!(
            s.mode,
            Mode::Monitor,
            "Auto uses a user-mode-only fd over none"
        );
    }
    let mut entries = Vec::new();
    for i in 0..40u64 {
        let len = 1 + (i as usize * 37_003) % (300 * 1024);
        let e = if i % 2 == 0 {
            cache.insert(i, len, regen(i)).expect("insert")
        } else {
            cache
                .insert_with(i, &expected(i, len), regen(i))
                .expect("insert_with")
        };
        assert_eq!(mismatches(&e, i), 0, "first read of entry {i}");
        entries.push(e);
    }
    let mut dropped = 0;
    for _ in 0..10 {
        dropped += testing::reclaim_all(&entries);
        if dropped > 0 {
            break;
        }
    }
    println!("reclaim without root dropped {dropped} pages");
    assert!(dropped > 0, "nothing was reclaimed");
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(mismatches(e, i as u64), 0, "entry {i} after reclaim");
    }
    let s = cache.stats();
    println!("{s}");
    assert!(s.pages_regenerated > 0);

    // A system call reading a reclaimed entry.
    let e = cache
        .insert_with(100, &expected(100, 256 * 1024), regen(100))
        .unwrap();
    let d = reclaim_some(&e);
    assert!(d > 0, "the entry for the write(2) test was not reclaimed");
    if mode == Mode::Explicit {
        // Unpinned bytes are not the entry's here: a syscall needs a pin, like any read.
        println!("explicit mode: write(2) only through a pin");
    } else if s.kernel_faults_handled {
        assert_eq!(
            write_to_pipe(&e).expect("write(2) served"),
            expected(100, e.len())
        );
    } else {
        let r = write_to_pipe(&e);
        println!(
            "write(2) from a reclaimed entry without pin: {r:?}",
            r = r.as_ref().err()
        );
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EFAULT));
    }
    {
        let _p = e.pin().expect("pin");
        assert_eq!(
            write_to_pipe(&e).expect("write(2) of a pinned entry"),
            expected(100, e.len())
        );
    }
    println!("UNPRIVILEGED-OK {expected_kind}");
}

fn run(case: &str, envs: &[(&str, &str)]) {
    // SAFETY: geteuid has no preconditions.
    if case != "user_mode_only_root" && unsafe { libc::geteuid() } != 0 {
        common::skipped(format_args!(
            "{case}: dropping to uid 65534 needs root (running as another user)"
        ));
        return;
    }
    let (status, out) = run_child(case, envs, Duration::from_secs(120));
    println!("--- child {case}: {status:?}\n{out}");
    assert!(status.success(), "child {case} ended {status:?}\n{out}");
    assert!(out.contains("UNPRIVILEGED-OK"), "{out}");
}

#[test]
fn unprivileged_monitor() {
    run("monitor", &[]);
}

#[test]
fn unprivileged_sigbus() {
    run("sigbus", &[]);
}

#[test]
fn unprivileged_explicit() {
    run("explicit", &[]);
}

#[test]
fn unprivileged_auto() {
    run("auto", &[]);
}

/// As root, `LAZYFREE_UFFD_USER_MODE_ONLY=1` forces the user-mode-only fd an unprivileged
/// process gets by default: the same EFAULT-then-pin behaviour, testable without dropping root.
#[test]
fn user_mode_only_forced_as_root() {
    run(
        "user_mode_only_root",
        &[("LAZYFREE_UFFD_USER_MODE_ONLY", "1")],
    );
}
