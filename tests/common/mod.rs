//! The content suite, shared by every mode: each function takes the `Config` to test.
//!
//! Children: tests that change process-wide state run in a child process. A test file that uses
//! `run_child` must define `#[test] #[ignore] fn child()` calling `common::child_main(&dispatch)`.
#![allow(dead_code)] // each test file uses a part of it

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use lazyfree::{testing, Cache, Config, Entry, FailurePolicy, FillChunk, RegenError};

pub const PAGE: usize = 4096;

/// Says loudly that a test could not run its check here: the line goes straight to the
/// process's stderr, past the test harness's output capture, so it shows in every `cargo test`
/// run (and `.ci/run` lists it). Never a silent pass.
pub fn skipped(why: std::fmt::Arguments) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {why}");
}

/// Prints a result line that must show in `cargo test` output, past the harness's capture.
pub fn report(line: std::fmt::Arguments) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Deterministic pseudo-random content: byte `p` of stream `seed`.
pub fn fill(seed: u64, off: usize, buf: &mut [u8]) {
    let word = |w: u64| {
        let mut z = seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(w)
            .wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z ^= z >> 31;
        z = z.wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 29)
    };
    let mut i = 0;
    while i < buf.len() {
        let p = off + i;
        let w = word((p / 8) as u64).to_le_bytes();
        let k = p % 8;
        let n = (8 - k).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&w[k..k + n]);
        i += n;
    }
}

pub fn expected(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill(seed, 0, &mut v);
    v
}

/// A regenerate callback producing stream `seed`.
pub fn regen(
    seed: u64,
) -> impl Fn(usize, &mut [u8]) -> Result<(), RegenError> + Send + Sync + 'static {
    move |off, buf| {
        fill(seed, off, buf);
        Ok(())
    }
}

/// An entry's bytes: read directly where reads are transparent, through a pin in explicit mode
/// (where a failed rebuild panics here: check with `pin()` where failures are expected).
pub enum Bytes<'a> {
    Direct(&'a [u8]),
    Pinned(lazyfree::Pinned<'a>),
}

impl std::ops::Deref for Bytes<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Direct(b) => b,
            Bytes::Pinned(p) => p,
        }
    }
}

pub fn bytes(e: &Entry) -> Bytes<'_> {
    match e.try_as_slice() {
        Some(b) => Bytes::Direct(b),
        None => Bytes::Pinned(e.pin().expect("pin (explicit mode)")),
    }
}

/// Whether the entry's bytes are read through pins only (explicit mode).
pub fn reads_need_pin(e: &Entry) -> bool {
    e.try_as_slice().is_none()
}

/// Counts mismatching bytes between an entry and stream `seed`, comparing 1 MiB at a time.
pub fn mismatches(e: &Entry, seed: u64) -> usize {
    let e_bytes = bytes(e);
    let mut want = vec![0u8; (1 << 20).min(e.len())];
    let mut bad = 0;
    let mut off = 0;
    while off < e.len() {
        let n = want.len().min(e.len() - off);
        fill(seed, off, &mut want[..n]);
        let got = &e_bytes[off..off + n];
        if got != &want[..n] {
            bad += got.iter().zip(&want[..n]).filter(|(a, b)| a != b).count();
        }
        off += n;
    }
    bad
}

pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// The next number of a generator shared by threads (a step hook's delays): `state` must
    /// not start at zero.
    pub fn next_shared(state: &AtomicU64) -> u64 {
        state
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |x| Some(Rng(x).next()))
            .map(|x| Rng(x).next())
            .unwrap_or(1)
    }
}

/// Waits until `cond` holds, polling every millisecond; panics saying `what` never happened
/// after `secs`.
pub fn wait_until(what: &str, secs: u64, cond: impl Fn() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "{what} (waited {secs} s)"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits for the forked child `pid` to end, at most `secs`: its wait status, or `None` if it
/// was still running then (it is killed and reaped: a hang fails the test, never blocks it).
pub fn wait_forked(pid: libc::pid_t, secs: u64) -> Option<i32> {
    let t = Instant::now();
    let mut status = 0;
    loop {
        // SAFETY: pid is our child; status is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Some(status);
        }
        assert_eq!(r, 0, "waitpid: {}", std::io::Error::last_os_error());
        if t.elapsed() > Duration::from_secs(secs) {
            // SAFETY: pid is our child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // SAFETY: as above; reaps it.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A forked child's end as `wait_forked` gives it, in words.
pub fn describe_status(status: Option<i32>) -> String {
    match status {
        None => "HUNG (killed)".to_string(),
        Some(s) if libc::WIFSIGNALED(s) => format!("signal {}", libc::WTERMSIG(s)),
        Some(s) => format!("exit {}", libc::WEXITSTATUS(s)),
    }
}

/// Aborts the process if not disarmed within `secs`: a hang fails loudly instead of blocking CI.
pub struct Watchdog(Arc<AtomicBool>);
impl Watchdog {
    pub fn new(what: &'static str, secs: u64) -> Watchdog {
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(secs) {
                if d.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("WATCHDOG: {what} did not finish within {secs} s: hang");
            std::process::abort();
        });
        Watchdog(done)
    }
}
impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Sizes from 1 byte to 4 MiB, log-uniform, with the edge cases first.
fn mixed_sizes(n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut v = vec![1, PAGE - 1, PAGE, PAGE + 1, 64 * 1024, 4 << 20];
    while v.len() < n {
        let bits = 1 + rng.below(22);
        v.push(1 + rng.below(1 << bits) as usize);
    }
    v
}

/// 1,000 entries of mixed sizes: verified on first touch, reclaimed, verified again; stats show
/// pages rebuilt.
pub fn content_1000_entries(cfg: Config) {
    let _w = Watchdog::new("content_1000_entries", 300);
    let cache: Cache<u64> = Cache::new(cfg).expect("cache");
    let mut rng = Rng(0x1234_5678);
    let sizes = mixed_sizes(1000, &mut rng);
    let mut entries = Vec::new();
    for (i, &len) in sizes.iter().enumerate() {
        let seed = i as u64 + 1;
        let e = if i % 2 == 0 {
            cache.insert(i as u64, len, regen(seed)).expect("insert")
        } else {
            cache
                .insert_with(i as u64, &expected(seed, len), regen(seed))
                .expect("insert_with")
        };
        entries.push((e, seed));
    }
    for (e, seed) in &entries {
        assert_eq!(
            mismatches(e, *seed),
            0,
            "first read of entry of {} bytes",
            e.len()
        );
    }
    let before = cache.stats();
    let dropped = testing::reclaim_all(entries.iter().map(|(e, _)| e));
    let total_pages: usize = entries.iter().map(|(e, _)| e.len().div_ceil(PAGE)).sum();
    println!("reclaimed {dropped} of {total_pages} pages");
    assert!(
        dropped > total_pages / 2,
        "reclaim dropped only {dropped} of {total_pages} pages"
    );
    for (e, seed) in &entries {
        assert_eq!(
            mismatches(e, *seed),
            0,
            "read after reclaim of entry of {} bytes",
            e.len()
        );
    }
    let after = cache.stats();
    println!("{after}");
    assert!(after.pages_regenerated > before.pages_regenerated);
    assert!(after.pages_regenerated - before.pages_regenerated >= dropped as u64);
    assert_eq!(after.entries, 1000);
    assert_eq!(after.failed_entries, 0);
}

/// Readers on shared and distinct entries while another thread reclaims in a loop.
pub fn concurrency(cfg: Config, secs: u64) {
    let _w = Watchdog::new("concurrency", secs + 120);
    let cache: Arc<Cache<u64>> = Arc::new(Cache::new(cfg).expect("cache"));
    let n = 24;
    for i in 0..n {
        let len = 37 * 1024 + i * 5000;
        cache
            .insert(i as u64, len, regen(100 + i as u64))
            .expect("insert");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let verified = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    for t in 0..3u64 {
        let (cache, stop, verified, bad) =
            (cache.clone(), stop.clone(), verified.clone(), bad.clone());
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(t + 7);
            while !stop.load(Ordering::Relaxed) {
                // Entries 0..8 are shared by all readers, the rest are this reader's own.
                let k = if rng.below(2) == 0 {
                    rng.below(8)
                } else {
                    8 + t * 5 + rng.below(5)
                };
                let e = cache.get(&k).expect("present");
                bad.fetch_add(mismatches(&e, 100 + k), Ordering::Relaxed);
                verified.fetch_add(e.len() as u64, Ordering::Relaxed);
            }
        }));
    }
    let reclaimer = {
        let (cache, stop) = (cache.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut dropped = 0;
            while !stop.load(Ordering::Relaxed) {
                let entries: Vec<Entry> = (0..n as u64).filter_map(|k| cache.get(&k)).collect();
                dropped += testing::reclaim_all(&entries);
            }
            dropped
        })
    };
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().expect("reader");
    }
    let dropped = reclaimer.join().expect("reclaimer");
    let s = cache.stats();
    println!(
        "concurrency: verified {} bytes, reclaimer dropped {dropped} pages, {s}",
        verified.load(Ordering::Relaxed)
    );
    assert_eq!(bad.load(Ordering::Relaxed), 0, "mismatched bytes");
    assert!(
        dropped > 0 && s.pages_regenerated > 0,
        "no reclaim happened"
    );
}

/// Several threads fault the same page at once.
pub fn same_page_race(cfg: Config) {
    let _w = Watchdog::new("same_page_race", 120);
    let cache: Cache<u64> = Cache::new(cfg.fill_chunk(FillChunk::Page)).expect("cache");
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let e = cache
        .insert(1, 16 * PAGE, move |off, buf: &mut [u8]| {
            c.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(30));
            fill(5, off, buf);
            Ok::<(), RegenError>(())
        })
        .expect("insert");
    for round in 0..5 {
        testing::reclaim(&e);
        let threads = 8;
        let barrier = Arc::new(Barrier::new(threads));
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                let (e, b) = (e.clone(), barrier.clone());
                std::thread::spawn(move || {
                    b.wait();
                    let page = round * 3 % 16;
                    let mut want = vec![0u8; PAGE];
                    fill(5, page * PAGE, &mut want);
                    bytes(&e)[page * PAGE..(page + 1) * PAGE] == want[..]
                })
            })
            .collect();
        for h in hs {
            assert!(h.join().expect("thread"), "a thread saw wrong bytes");
        }
    }
    assert_eq!(mismatches(&e, 5), 0);
    println!(
        "same_page_race: {} regenerate calls",
        calls.load(Ordering::SeqCst)
    );
}

/// A regenerate callback that reads another volatile entry.
pub fn nested_regen(cfg: Config) {
    let _w = Watchdog::new("nested_regen", 120);
    let cache: Arc<Cache<u64>> = Arc::new(Cache::new(cfg).expect("cache"));
    let a = cache.insert(1, 256 * 1024, regen(11)).expect("insert a");
    let a2 = a.clone();
    // b[i] = a[i] ^ 0x5a: b's callback reads a.
    let b = cache
        .insert(2, 256 * 1024, move |off, buf: &mut [u8]| {
            let a2 = bytes(&a2);
            for (i, x) in buf.iter_mut().enumerate() {
                *x = a2[off + i] ^ 0x5a;
            }
            Ok::<(), RegenError>(())
        })
        .expect("insert b");
    for _ in 0..3 {
        testing::reclaim(&a);
        testing::reclaim(&b);
        let want = expected(11, a.len());
        assert!(
            bytes(&b).iter().zip(&want).all(|(x, y)| *x == y ^ 0x5a),
            "b derived from a"
        );
        assert_eq!(mismatches(&a, 11), 0);
    }
}

/// Callback errors and panics under the zero policy: zeros, the failed mark, the stats; a pin
/// after the cause is fixed rebuilds the bytes and clears the mark.
pub fn failure_zero_policy(cfg: Config) {
    let _w = Watchdog::new("failure_zero_policy", 120);
    let cache: Cache<u64> = Cache::new(cfg.on_failure(FailurePolicy::Zero)).expect("cache");
    for panics in [false, true] {
        let broken = Arc::new(AtomicBool::new(true));
        let b = broken.clone();
        let e = cache
            .insert(panics as u64, 3 * PAGE + 100, move |off, buf: &mut [u8]| {
                if b.load(Ordering::SeqCst) {
                    if panics {
                        panic!("decoder exploded (test)");
                    }
                    return Err("decoder failed (test)".into());
                }
                fill(9, off, buf);
                Ok::<(), RegenError>(())
            })
            .expect("insert");
        let fails = cache.stats().regenerate_failures;
        let t = Instant::now();
        if reads_need_pin(&e) {
            // Explicit mode: never zeros; the pin that reads reports the failure.
            match e.pin() {
                Err(lazyfree::Error::RegenerateFailed(_)) => {}
                other => panic!("explicit pin of a broken entry gave {other:?}"),
            }
        } else {
            assert!(e.iter().all(|&x| x == 0), "failed pages read as zeros");
        }
        println!(
            "failure (panic={panics}) released the reader in {:?}",
            t.elapsed()
        );
        assert!(e.is_failed());
        assert!(cache.stats().regenerate_failures > fails);
        assert_eq!(cache.stats().failed_entries, 1);
        let msg = e.last_error().expect("message");
        assert!(
            msg.contains(if panics { "panicked" } else { "decoder failed" }),
            "{msg}"
        );
        // Still broken: pin reports the failure instead of handing out zeros.
        match e.pin() {
            Err(lazyfree::Error::RegenerateFailed(_)) => {}
            other => panic!("pin of a broken entry gave {other:?}"),
        }
        assert!(e.is_failed(), "a failed pin keeps the mark");
        broken.store(false, Ordering::SeqCst);
        {
            let p = e.pin().expect("pin after the fix");
            assert_eq!(p.len(), e.len());
        }
        assert!(!e.is_failed(), "successful regeneration clears the mark");
        assert_eq!(mismatches(&e, 9), 0);
        cache.remove(&(panics as u64));
    }
}

/// Poison policy, in-process: a kernel-mode read of a poisoned page fails (EFAULT) instead of
/// reading unexplained bytes; after the fix, pin clears the poison and rebuilds.
pub fn failure_poison_kernel_access(cfg: Config) {
    let _w = Watchdog::new("failure_poison_kernel_access", 120);
    let cache: Cache<u64> = Cache::new(cfg.on_failure(FailurePolicy::Poison)).expect("cache");
    if !cache.stats().poison_supported {
        skipped(format_args!(
            "failure_poison_kernel_access: the kernel has no UFFDIO_POISON"
        ));
        return;
    }
    let broken = Arc::new(AtomicBool::new(true));
    let b = broken.clone();
    let e = cache
        .insert(1, 4 * PAGE, move |off, buf: &mut [u8]| {
            if b.load(Ordering::SeqCst) {
                return Err("broken (test)".into());
            }
            fill(3, off, buf);
            Ok::<(), RegenError>(())
        })
        .expect("insert");
    let r = write_to_pipe(&e);
    assert!(
        r.is_err(),
        "write(2) from a poisoned entry must fail, got {r:?}"
    );
    assert!(e.is_failed());
    broken.store(false, Ordering::SeqCst);
    drop(e.pin().expect("pin after the fix"));
    assert!(!e.is_failed());
    assert_eq!(mismatches(&e, 3), 0);
}

/// write(2) of the entry's bytes into a pipe (a reader thread drains it); the bytes read back.
pub fn write_to_pipe(e: &Entry) -> std::io::Result<Vec<u8>> {
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid array of two ints.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let reader = std::thread::spawn(move || {
        use std::os::fd::FromRawFd;
        // SAFETY: fds[0] is the read end we just made; the File owns it from here.
        let mut f = unsafe { std::fs::File::from_raw_fd(fds[0]) };
        let mut v = Vec::new();
        f.read_to_end(&mut v).expect("read pipe");
        v
    });
    let mut off = 0;
    let mut err = None;
    while off < e.len() {
        // SAFETY: the entry's bytes are mapped for its lifetime; write(2) only reads them.
        let n = unsafe { libc::write(fds[1], e.as_ptr().add(off).cast(), e.len() - off) };
        if n < 0 {
            err = Some(std::io::Error::last_os_error());
            break;
        }
        off += n as usize;
    }
    // SAFETY: closing our write end.
    unsafe { libc::close(fds[1]) };
    let got = reader.join().expect("reader");
    match err {
        Some(e) => Err(e),
        None => Ok(got),
    }
}

/// After a rebuild, after an unpin, and after insert_with, the pages are reclaimable again.
pub fn readvise(cfg: Config) {
    let _w = Watchdog::new("readvise", 120);
    let cache: Cache<u64> = Cache::new(cfg).expect("cache");
    let len = 4 << 20;
    let pages = len / PAGE;
    let need = pages * 99 / 100;
    let e = cache
        .insert_with(1, &expected(21, len), regen(21))
        .expect("insert_with");
    let d = testing::reclaim(&e);
    assert!(d >= need, "after insert_with: {d} of {pages} pages dropped");
    for round in 0..3 {
        assert_eq!(mismatches(&e, 21), 0); // rebuild every page
        let d = testing::reclaim(&e);
        assert!(
            d >= need,
            "after rebuild (round {round}): {d} of {pages} pages dropped"
        );
    }
    {
        let p = e.pin().expect("pin"); // rebuilds every page through faults
        assert_eq!(testing::reclaim(&e), 0, "pinned pages must not be dropped");
        assert_eq!(p[..16], expected(21, 16)[..]);
    }
    let d = testing::reclaim(&e);
    assert!(d >= need, "after unpin: {d} of {pages} pages dropped");
    assert_eq!(mismatches(&e, 21), 0);
}

/// Runs this test binary's `child` test in a child process with `LAZYFREE_CHILD=case`, killing it
/// after `timeout`. Returns the exit status and the child's output.
pub fn run_child(case: &str, envs: &[(&str, &str)], timeout: Duration) -> (ExitStatus, String) {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        "child",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("LAZYFREE_CHILD", case)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn child");
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if t.elapsed() > timeout {
            let _ = child.kill();
            let s = child.wait().expect("wait");
            panic!("child case {case} hung for {timeout:?} and was killed ({s:?})");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).ok();
    child.stderr.take().unwrap().read_to_string(&mut out).ok();
    (status, out)
}

/// The child side: runs `dispatch(case)` if this process is a child, then exits 0.
pub fn child_main(dispatch: &dyn Fn(&str)) {
    let Ok(case) = std::env::var("LAZYFREE_CHILD") else {
        panic!("the `child` test is run by other tests in a child process, not directly");
    };
    dispatch(&case);
    std::process::exit(0);
}

pub fn signal_of(s: &ExitStatus) -> Option<i32> {
    s.signal()
}

/// Under the poison policy a touched page whose regeneration fails raises SIGBUS. Child side.
pub fn child_poison_touch(cfg: Config, panics: bool) {
    let cache: Cache<u64> = Cache::new(cfg.on_failure(FailurePolicy::Poison)).expect("cache");
    if !cache.stats().poison_supported {
        println!("NO-POISON-SUPPORT");
        std::process::exit(3);
    }
    let e = cache
        .insert(1, 2 * PAGE, move |_off, _buf: &mut [u8]| {
            if panics {
                panic!("decoder exploded (test)");
            }
            Err::<(), RegenError>("decoder failed (test)".into())
        })
        .expect("insert");
    println!("touching");
    let x = std::hint::black_box(e[10]);
    println!("READ {x}: the poisoned access returned");
    std::process::exit(4);
}

/// Whether the running kernel is at least `maj.min`.
pub fn kernel_at_least(maj: u32, min: u32) -> bool {
    // SAFETY: an all-zero utsname is valid; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer.
    if unsafe { libc::uname(&mut u) } != 0 {
        return true;
    }
    let release: String = u
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8 as char)
        .collect();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let a: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let b: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    a > maj || (a == maj && b >= min)
}

/// The signal an access to a page whose rebuild failed raises under the poison policy: SIGBUS,
/// except in monitor mode before Linux 6.6 (no UFFDIO_POISON), where lazyfree makes the pages
/// inaccessible instead: SIGSEGV.
pub fn poison_signal(monitor: bool) -> i32 {
    if monitor && !kernel_at_least(6, 6) {
        libc::SIGSEGV
    } else {
        libc::SIGBUS
    }
}

/// Parent side of `child_poison_touch`.
pub fn poison_touch_kills(cfg_name: &str) {
    poison_touch_kills_with(cfg_name, &[], poison_signal(cfg_name == "monitor"));
}

/// `poison_touch_kills` with more environment for the child, and the signal it must die of.
pub fn poison_touch_kills_with(cfg_name: &str, envs: &[(&str, &str)], signal: i32) {
    for case in ["poison_error", "poison_panic"] {
        let t = Instant::now();
        let mut all = vec![("LAZYFREE_TEST_MODE", cfg_name)];
        all.extend_from_slice(envs);
        let (status, out) = run_child(case, &all, Duration::from_secs(60));
        if status.code() == Some(3) {
            skipped(format_args!("{case}: the kernel has no UFFDIO_POISON"));
            continue;
        }
        println!("{case}: child ended {status:?} after {:?}", t.elapsed());
        assert_eq!(
            signal_of(&status),
            Some(signal),
            "{case}: {status:?}\n{out}"
        );
        assert!(out.contains("touching") && !out.contains("READ"), "{out}");
    }
}

/// A cache of about twice the memory cgroup's limit plus ordinary allocations: everything
/// verifies and the child is not OOM-killed. Parent side; the child runs `child_cgroup`.
pub fn cgroup_pressure(cfg_name: &str) {
    let limit = cgroup_limit();
    let Some(cg) = MemCgroup::create(
        &format!("lazyfree-test-{}-{cfg_name}", std::process::id()),
        limit,
    ) else {
        return;
    };
    let (status, out) = run_child(
        "cgroup",
        &[
            ("LAZYFREE_TEST_MODE", cfg_name),
            ("LAZYFREE_CGROUP_PROCS", &cg.procs_file()),
            ("LAZYFREE_CGROUP_MIB", &(limit >> 20).to_string()),
        ],
        Duration::from_secs(240),
    );
    let pressure = cg.pressure_events();
    println!("{out}");
    println!(
        "cgroup {}: limit {} MiB, pressure events {pressure}",
        cg.kind,
        limit >> 20
    );
    assert!(
        status.success(),
        "child under memory pressure ended {status:?} (OOM kill is SIGKILL)"
    );
    assert!(out.contains("VERIFIED"), "child did not verify");
    let regenerated: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("REGENERATED "))
        .and_then(|v| v.trim().parse().ok())
        .expect("child prints REGENERATED");
    assert!(pressure > 0, "the cgroup limit was never hit");
    assert!(regenerated > 0, "no page was reclaimed and rebuilt");
}

/// The memory limit of `cgroup_pressure`: 256 MiB, or `LAZYFREE_CGROUP_MIB` (at least 16) where
/// the test must be smaller (the kernel matrix's 2 GiB virtual machines run it at 64).
pub fn cgroup_limit() -> usize {
    let mib = match std::env::var("LAZYFREE_CGROUP_MIB") {
        Ok(v) => v
            .parse::<usize>()
            .ok()
            .filter(|&m| m >= 16)
            .unwrap_or_else(|| panic!("LAZYFREE_CGROUP_MIB={v:?}: give a whole number >= 16")),
        Err(_) => 256,
    };
    mib << 20
}

/// Child side of `cgroup_pressure`: joins the cgroup, fills 2x its limit with entries and a
/// quarter of it with ordinary memory, verifies every byte twice.
pub fn child_cgroup(cfg: Config) {
    let procs = std::env::var("LAZYFREE_CGROUP_PROCS").expect("cgroup procs file");
    std::fs::write(&procs, std::process::id().to_string()).expect("join cgroup");
    let cache: Cache<u64> = Cache::new(cfg).expect("cache");
    let entry_len = 4 << 20;
    let limit = cgroup_limit();
    let n = (2 * limit / entry_len) as u64; // 2x the limit in entries (512 MiB under 256 MiB)
    let mut src = vec![0u8; entry_len];
    for i in 0..n {
        fill(1000 + i, 0, &mut src);
        cache.insert_with(i, &src, regen(1000 + i)).expect("insert");
    }
    drop(src);
    // Ordinary memory too: a quarter of the limit, touched.
    let ordinary: Vec<Vec<u8>> = (0..limit / 4 / entry_len)
        .map(|i| vec![i as u8 + 1; entry_len])
        .collect();
    for round in 0..2 {
        for i in 0..n {
            let e = cache.get(&i).expect("entry");
            let bad = mismatches(&e, 1000 + i);
            assert_eq!(bad, 0, "entry {i} round {round}");
        }
    }
    for (i, v) in ordinary.iter().enumerate() {
        assert!(v.iter().all(|&x| x == i as u8 + 1));
    }
    let s = cache.stats();
    println!("{s}");
    println!("REGENERATED {}", s.pages_regenerated);
    println!("VERIFIED");
}

/// A memory cgroup made for a test (v1 `memory.limit_in_bytes`, or v2 `memory.max`); removed on
/// drop. `create` prints a loud SKIPPED line and returns None where none can be made.
pub struct MemCgroup {
    dir: std::path::PathBuf,
    pub kind: &'static str,
}

impl MemCgroup {
    pub fn create(name: &str, limit: usize) -> Option<MemCgroup> {
        let v1 = std::path::Path::new("/sys/fs/cgroup/memory");
        let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers");
        let (dir, kind, file) = if v1.join("memory.limit_in_bytes").exists() {
            (v1.join(name), "v1", "memory.limit_in_bytes")
        } else if v2.exists() {
            (
                std::path::Path::new("/sys/fs/cgroup").join(name),
                "v2",
                "memory.max",
            )
        } else {
            skipped(format_args!(
                "memory cgroup test: no memory cgroup controller mounted (v1 or v2)"
            ));
            return None;
        };
        if let Err(e) = std::fs::create_dir(&dir) {
            skipped(format_args!(
                "memory cgroup test: cannot create memory cgroup {}: {e}",
                dir.display()
            ));
            return None;
        }
        let cg = MemCgroup { dir, kind };
        if let Err(e) = std::fs::write(cg.dir.join(file), limit.to_string()) {
            skipped(format_args!("memory cgroup test: cannot set {file}: {e}"));
            return None;
        }
        Some(cg)
    }

    pub fn procs_file(&self) -> String {
        self.dir.join("cgroup.procs").display().to_string()
    }

    /// How often the limit was hit (v1 failcnt, v2 `max` events).
    pub fn pressure_events(&self) -> u64 {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        if self.kind == "v1" {
            read("memory.failcnt").trim().parse().unwrap_or(0)
        } else {
            read("memory.events")
                .lines()
                .filter_map(|l| l.strip_prefix("max "))
                .filter_map(|v| v.trim().parse::<u64>().ok())
                .sum()
        }
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// MADV_PAGEOUT on the entry's pages, after draining the per-CPU LRU batches, without ending any
/// unpin delay (unlike `testing::reclaim`), as the kernel's reclaim would; returns the pages
/// dropped.
pub fn pageout(e: &Entry) -> usize {
    testing::drain_lru_batches();
    let before = e.resident_pages();
    for _ in 0..4 {
        // SAFETY: MADV_PAGEOUT drops only clean, lazily freed pages; others stay (no swap).
        unsafe {
            libc::madvise(
                e.as_ptr() as *mut libc::c_void,
                e.len().div_ceil(PAGE) * PAGE,
                libc::MADV_PAGEOUT,
            )
        };
    }
    before.saturating_sub(e.resident_pages())
}

/// A lazy 4-page entry of `cache` whose callback reads the very bytes it is asked to produce
/// (its own chunk): the self-read the fault paths and pins must abort on, with a message.
pub fn self_reading_entry(cache: &Cache<u64>) -> Entry {
    let me: Arc<std::sync::OnceLock<Entry>> = Arc::default();
    let me2 = me.clone();
    let e = cache
        .insert(1, 4 * PAGE, move |off, buf: &mut [u8]| {
            let own = me2.get().expect("set before the first touch");
            buf.fill(own[off]); // reads the very bytes being rebuilt
            Ok::<(), RegenError>(())
        })
        .unwrap();
    me.set(e.clone()).unwrap();
    e
}
