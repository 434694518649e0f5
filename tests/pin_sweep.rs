//! A pin's sweep (`PinSweep`): after rebuilding the missing chunks from its own thread, a pin
//! writes every page (MADV_POPULATE_WRITE by default). A page the
//! kernel drops after the pin looked, whose callback then fails, must give the pin an error, never
//! the pinning thread a signal, and never leave the pin holding zeros.
//!
//! The interleaving: chunk 0 is dropped before the pin, so the pin rebuilds it, calling back
//! from the pinning thread after it looked for missing pages; that call drops a page of chunk 1
//! and makes chunk 1's callback fail. The sweep then meets the missing page.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use lazyfree::{testing, Cache, Config, Error, FailurePolicy, Mode, RegenError};

const CHUNK: usize = 64 << 10;
const SEED: u64 = 11;

fn dropped_page_fails_during_the_sweep(mode: Mode, policy: FailurePolicy) {
    let _w = Watchdog::new("dropped_page_fails_during_the_sweep", 120);
    let cache: Cache<u64> = Cache::new(
        Config::default()
            .mode(mode)
            .on_failure(policy)
            .read_ahead(0),
    )
    .unwrap();
    let armed = Arc::new(AtomicBool::new(false));
    let failing = Arc::new(AtomicBool::new(false));
    let chunk1_calls = Arc::new(AtomicUsize::new(0));
    let base = Arc::new(AtomicUsize::new(0));
    let (a2, f2, c2, b2) = (
        armed.clone(),
        failing.clone(),
        chunk1_calls.clone(),
        base.clone(),
    );
    let e = cache
        .insert(1, 2 * CHUNK, move |off, buf: &mut [u8]| {
            if off >= CHUNK {
                c2.fetch_add(1, Ordering::SeqCst);
                if f2.load(Ordering::SeqCst) {
                    return Err(RegenError::from("chunk 1 cannot be rebuilt now"));
                }
            }
            fill(SEED, off, buf);
            if off == 0 && a2.swap(false, Ordering::SeqCst) {
                // The pin's rebuild of chunk 0: it looked for missing pages already.
                let page = b2.load(Ordering::SeqCst) + CHUNK + 3 * PAGE;
                assert_eq!(
                    testing::reclaim_ptr(page as *const u8, PAGE),
                    1,
                    "a page of chunk 1 could not be dropped: the interleaving cannot be made"
                );
                f2.store(true, Ordering::SeqCst);
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(mismatches(&e, SEED), 0);
    base.store(e.as_ptr() as usize, Ordering::SeqCst);
    // (A page a kernel scanner had off the LRU when its fill advised it, as the compaction of
    // another test's reclaim can, stays until its next advice: a pin and an unpin give one.)
    // (The pin rebuilds what the reclaim before it dropped: each try drops all 16 or fails.)
    let t0 = std::time::Instant::now();
    let mut dropped = testing::reclaim_ptr(e.as_ptr(), CHUNK);
    while dropped < CHUNK / PAGE && t0.elapsed() < std::time::Duration::from_secs(2) {
        std::thread::sleep(std::time::Duration::from_millis(20));
        drop(e.pin().unwrap());
        dropped = testing::reclaim_ptr(e.as_ptr(), CHUNK);
    }
    assert_eq!(
        dropped,
        CHUNK / PAGE,
        "chunk 0's pages never became droppable"
    );
    armed.store(true, Ordering::SeqCst);
    chunk1_calls.store(0, Ordering::SeqCst);
    match e.pin() {
        Err(Error::RegenerateFailed(why)) => {
            assert!(why.contains("chunk 1 cannot be rebuilt"), "{why}")
        }
        Err(other) => panic!("pin: {other}"),
        Ok(_) => panic!("the pin succeeded though chunk 1 could not be rebuilt"),
    }
    assert!(
        chunk1_calls.load(Ordering::SeqCst) >= 1,
        "chunk 1's callback was never asked: the sweep did not meet the dropped page"
    );
    assert!(e.is_failed());
    // Once the callback works again a pin rebuilds chunk 1 and holds the right bytes.
    failing.store(false, Ordering::SeqCst);
    let p = e.pin().expect("pin after the callback recovered");
    assert_eq!(p[..], expected(SEED, 2 * CHUNK)[..]);
    drop(p);
    assert!(!e.is_failed());
}

#[test]
fn zero_policy_monitor() {
    dropped_page_fails_during_the_sweep(Mode::Monitor, FailurePolicy::Zero);
}

#[test]
fn zero_policy_sigbus() {
    dropped_page_fails_during_the_sweep(Mode::Sigbus, FailurePolicy::Zero);
}

#[test]
fn poison_policy_monitor() {
    dropped_page_fails_during_the_sweep(Mode::Monitor, FailurePolicy::Poison);
}

#[test]
fn poison_policy_sigbus() {
    dropped_page_fails_during_the_sweep(Mode::Sigbus, FailurePolicy::Poison);
}

/// The poison policy on a kernel without UFFDIO_POISON (Linux 6.1 to 6.5, where failed pages
/// are left missing and made inaccessible), as if by `LAZYFREE_TEST_NO_UFFDIO_POISON=1`: the
/// monitor-mode case again, in a child process (the setting is read once per process). There
/// MADV_POPULATE_WRITE stops at the inaccessible page with EINVAL, which must not be taken for
/// a kernel without it (atomic writes there die of SIGSEGV).
#[test]
fn poison_policy_emulated_monitor() {
    let exe = std::env::current_exe().expect("the test binary");
    let out = std::process::Command::new(exe)
        .args(["--exact", "poison_policy_monitor", "--test-threads=1"])
        .env("LAZYFREE_TEST_NO_UFFDIO_POISON", "1")
        .output()
        .expect("run the test binary");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child ended {:?}\n{text}", out.status);
    assert!(text.contains("1 passed"), "{text}");
}
