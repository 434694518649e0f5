//! Attacks on `SharedCache`: interleavings and inputs that once broke it (wrong bytes, hangs,
//! a use after free, leaked slots). Each test failed (or hung, turned into a failure by a
//! timeout) before the fix its comment names; see the comment on each for the scenario.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lazyfree::testing::{set_step_hook, Step};
use lazyfree::{Error, Mode, RegenError, SharedCache, SharedConfig};

/// The step hook is process-wide: tests that use it take turns.
static TURN: Mutex<()> = Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    TURN.lock().unwrap_or_else(|p| p.into_inner())
}

/// A cache name removed when dropped.
struct Named(String);
impl Named {
    fn new(tag: &str) -> Named {
        static N: AtomicU64 = AtomicU64::new(0);
        Named(format!(
            "test-{}-rv-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }
}
impl Drop for Named {
    fn drop(&mut self) {
        let _ = SharedCache::remove(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Hook plumbing: sleep once at an armed (step, address).

static ARMED_STEP: AtomicUsize = AtomicUsize::new(0);
static ARMED_ADDR: AtomicUsize = AtomicUsize::new(0);
static ARMED_MS: AtomicU64 = AtomicU64::new(0);
static REACHED: AtomicBool = AtomicBool::new(false);

fn step_id(s: Step) -> usize {
    match s {
        Step::SharedFillClaimed => 1,
        Step::SharedPunchClaimed => 2,
        Step::SharedPinMarked => 3,
        _ => 0,
    }
}

fn hook(s: Step, addr: usize) {
    let want = ARMED_STEP.load(Ordering::SeqCst);
    if want != 0
        && want == step_id(s)
        && addr == ARMED_ADDR.load(Ordering::SeqCst)
        && !REACHED.swap(true, Ordering::SeqCst)
    {
        std::thread::sleep(Duration::from_millis(ARMED_MS.load(Ordering::SeqCst)));
    }
}

fn arm(s: Step, addr: usize, ms: u64) {
    REACHED.store(false, Ordering::SeqCst);
    ARMED_MS.store(ms, Ordering::SeqCst);
    ARMED_ADDR.store(addr, Ordering::SeqCst);
    ARMED_STEP.store(step_id(s), Ordering::SeqCst);
    set_step_hook(Some(hook));
}

fn disarm() {
    ARMED_STEP.store(0, Ordering::SeqCst);
    set_step_hook(None);
}

fn wait_reached(secs: u64) {
    common::wait_until("the armed step", secs, || REACHED.load(Ordering::SeqCst));
}

/// Reads one byte through a raw pointer (a plain reader: faults are served by the cache).
fn touch(addr: usize) -> u8 {
    // SAFETY: the callers pass addresses inside a cache's data mapping.
    unsafe { std::ptr::read_volatile(addr as *const u8) }
}

// ---------------------------------------------------------------------------------------------
// 1. WRONG BYTES: zeros installed for a failed chunk land in its retried fill.
//
// A fault on a chunk raised while it is being filled waits (monitor: `pending`; SIGBUS: the
// futex). The fill fails: the chunk is FAILED, zeros in place. The waiting fault then runs
// `serve::claim`, sees FAILED and calls `zeros()`, which installs zeros over the chunk page by
// page (every page is present: one EEXIST ioctl a page). Meanwhile a pin retries the failed
// chunk: it punches it (FAILED -> PUNCHING -> ABSENT), claims it and installs the callback's
// bytes. Nothing stops the first `zeros()` from going on installing zeros into the pages the
// punch just emptied; the retry's UFFDIO_COPY then skips them (EEXIST = "present") and marks the
// chunk PRESENT. The pin returns Ok with zeros in it, and every process reads those zeros.
//
// Fixed: whoever installs zeros for a failed chunk first takes it (failed -> failing, a CAS:
// `state::claim_failed`), so no pin can punch it to retry meanwhile.

const BIG_CHUNK: usize = 16 << 20;
static FAIL_NEXT: AtomicBool = AtomicBool::new(false);

fn fail_once_regen(_key: u64, _off: usize, buf: &mut [u8]) -> Result<(), RegenError> {
    if FAIL_NEXT.swap(false, Ordering::SeqCst) {
        return Err("injected failure".into());
    }
    buf.fill(0xAB);
    Ok(())
}

fn zeros_race(mode: Mode) {
    let _t = turn();
    let name = Named::new("zerosrace");
    let cfg = SharedConfig {
        capacity: 4 * BIG_CHUNK,
        chunk: BIG_CHUNK,
        entries: 16,
        mode,
        ..SharedConfig::default()
    };
    let cache = Arc::new(SharedCache::create(&name.0, &cfg, fail_once_regen).unwrap());
    let e = cache.insert(1, BIG_CHUNK).unwrap();
    let base = e.as_ptr() as usize;
    let mut bad = None;
    let t0 = Instant::now();
    for trial in 0..40u64 {
        if t0.elapsed() > Duration::from_secs(60) {
            break;
        }
        cache.purge(0).unwrap();
        FAIL_NEXT.store(true, Ordering::SeqCst);
        arm(Step::SharedFillClaimed, base, 30);
        // A pin claims the chunk and sleeps in the hook before its (failing) callback; then
        // it finds the chunk FAILED and retries it at once (punch, claim, callback, install).
        let c2 = cache.clone();
        let pinner = std::thread::spawn(move || {
            let e = c2.get(1).unwrap().unwrap();
            let p = e.pin().expect("the retry's callback succeeds");
            p.iter().position(|&b| b != 0xAB).map(|at| (at, p[at]))
        });
        wait_reached(10);
        // A plain reader faults on the chunk meanwhile: its fault waits for the fill, then
        // finds it FAILED and installs zeros, racing the pin's retry.
        let reader = std::thread::spawn(move || touch(base + (trial as usize % 4) * 4096));
        let got = pinner.join().unwrap();
        reader.join().unwrap();
        disarm();
        if let Some((at, v)) = got {
            bad = Some((trial, at, v));
            break;
        }
    }
    disarm();
    assert!(
        bad.is_none(),
        "WRONG BYTES: a pin that returned Ok holds byte {:?} (trial, offset, value) where the \
         callback wrote 0xAB",
        bad
    );
}

#[test]
fn late_zeros_of_a_failed_chunk_land_in_its_retried_fill_sigbus() {
    zeros_race(Mode::Sigbus);
}

/// The same race in monitor mode, where the late zeros come from the fault thread: a raw read
/// claims the chunk (its worker's callback fails after 30 ms), a second raw read's fault waits
/// in the monitor's pending list, and once the chunk is FAILED a pin retries it while the
/// monitor's next round installs zeros over it (4096 EEXIST ioctls for a 16 MiB chunk).
#[test]
fn late_zeros_of_a_failed_chunk_land_in_a_pins_retry_monitor_pending() {
    let _t = turn();
    let name = Named::new("zerosmon");
    let cfg = SharedConfig {
        capacity: 4 * BIG_CHUNK,
        chunk: BIG_CHUNK,
        entries: 16,
        mode: Mode::Monitor,
        ..SharedConfig::default()
    };
    let cache = Arc::new(SharedCache::create(&name.0, &cfg, fail_once_regen).unwrap());
    let e = cache.insert(1, BIG_CHUNK).unwrap();
    let base = e.as_ptr() as usize;
    let mut bad = None;
    let t0 = Instant::now();
    for trial in 0..200u64 {
        if t0.elapsed() > Duration::from_secs(90) {
            break;
        }
        cache.purge(0).unwrap();
        FAIL_NEXT.store(true, Ordering::SeqCst);
        arm(Step::SharedFillClaimed, base, 30);
        let r1 = std::thread::spawn(move || touch(base));
        wait_reached(10);
        let r2 = std::thread::spawn(move || touch(base + BIG_CHUNK - 4096));
        common::wait_until("the chunk to fail", 10, || e.is_failed());
        let jitter = trial % 6;
        if jitter > 0 {
            std::thread::sleep(Duration::from_micros(jitter * 250));
        }
        let got = {
            let p = e.pin().expect("the retry's callback succeeds");
            p.iter().position(|&b| b != 0xAB).map(|at| (at, p[at]))
        };
        r1.join().unwrap();
        r2.join().unwrap();
        disarm();
        if let Some((at, v)) = got {
            bad = Some((trial, at, v));
            break;
        }
    }
    disarm();
    assert!(
        bad.is_none(),
        "WRONG BYTES: a pin that returned Ok holds byte {:?} (trial, offset, value) where the \
         callback wrote 0xAB",
        bad
    );
}

// ---------------------------------------------------------------------------------------------
// 2. LEAK: an open that fails at the pressure trigger keeps its process slot (and its fault
// thread, its mappings and the regenerate function) forever.
//
// `SharedCache::start` spawns the monitor thread (holding a clone of the Core and of the stop
// eventfd), *then* opens the PSI trigger. When the trigger fails it returns `fail(e)`: `runs`
// is dropped without signalling the eventfd, so the monitor thread polls on forever, holds the
// Core, and the Core's drop (which releases the slot) never runs. The slot's pid is this live
// process, so no reap frees it. A process whose trigger cannot be opened (for one without
// CAP_SYS_RESOURCE, a window that is not a multiple of 2 s, as the docs say; or a kernel with
// psi=0) leaks one of the 63 slots per attempt, until every process gets
// `SharedTooManyProcesses`.
//
// Fixed: the trigger is opened before anything runs, and once the runtime runs the
// `SharedCache` value owns it, so a later error stops it in its drop.

/// Offset of `Header::psi_window_us` in the file (see `src/shared/file.rs`).
const PSI_WINDOW_OFF: u64 = 160;

fn has_cap_sys_resource() -> bool {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = s
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    eff & (1 << 24) != 0
}

/// The shared caches' threads of this process (by name: the test harness's own threads come and
/// go with the other tests, which run at the same time).
fn threads_here() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.starts_with("lazyfree-shared") || c.starts_with("lazyfree-press"))
        })
        .count()
}

#[test]
fn an_open_failing_at_the_pressure_trigger_leaks_its_slot() {
    let _t = turn();
    if has_cap_sys_resource() {
        common::skipped(format_args!(
            "shared_attacks leak test: this process has CAP_SYS_RESOURCE, so a 1 s PSI window \
             does not fail here"
        ));
        return;
    }
    let name = Named::new("psileak");
    let cfg = SharedConfig {
        capacity: 1 << 20,
        chunk: 64 << 10,
        entries: 16,
        pressure: Some(lazyfree::Pressure {
            stall: Duration::from_millis(100),
            window: Duration::from_secs(2),
        }),
        ..SharedConfig::default()
    };
    let ok = |_: u64, _: usize, b: &mut [u8]| -> Result<(), RegenError> {
        b.fill(1);
        Ok(())
    };
    let cache = SharedCache::create(&name.0, &cfg, ok).unwrap();
    assert_eq!(cache.stats().processes, 1);
    // As if a process with CAP_SYS_RESOURCE had made it with a 1 s window: valid for `open`'s
    // checks, refused by the kernel for this process.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/dev/shm/lazyfree.{}", name.0))
            .unwrap();
        f.write_at(&1_000_000u64.to_le_bytes(), PSI_WINDOW_OFF)
            .unwrap();
    }
    // A new thread names itself once it runs: let the cache's own threads get there first.
    std::thread::sleep(Duration::from_millis(200));
    let threads = threads_here();
    for _ in 0..3 {
        let r = SharedCache::open(&name.0, ok);
        assert!(
            matches!(r, Err(Error::Kernel { .. })),
            "the 1 s trigger should fail here: {:?}",
            r.as_ref().err()
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    let after = cache.stats().processes;
    let leaked_threads = threads_here().saturating_sub(threads);
    assert!(
        after == 1 && leaked_threads == 0,
        "LEAK: after 3 failed opens the file counts {after} processes (want 1) and this \
         process has {leaked_threads} more threads (the failed opens' fault threads)"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. CRASH (use after free): the same failed open in SIGBUS mode leaves its range registered
// with the SIGBUS handler (`mode::foreign`) pointing at a freed Core.
//
// In `start`, SIGBUS mode registers the data range with `foreign::add(.., ctx = the Core)` and
// then fails at the trigger: `fail(e)` drops `runs` (`Runs::Handler(slot)` has no drop) and the
// last Arc of the Core, so the File unmaps the data and the Core is freed, but the slot in
// `foreign::TABLE` stays published. The next SIGBUS-mode open maps its data at the same address
// (the hole just left), registers a second slot, and its first fault is matched to the stale
// slot first (`serve_at` returns the first match): `serve_fault` runs on freed memory.
//
// Fixed: as for 2 (the range is registered only after the trigger opened, and retired by the
// cache's drop); `serve_at` also goes on to the next range when one does not serve.

#[test]
#[ignore = "run by the other tests in a child process"]
fn child() {
    common::child_main(&|case| match case {
        "sigbus_failed_open_then_open" => child_sigbus_failed_open_then_open(),
        "self_read_deduped" => child_self_read_deduped(),
        "hold_one" => child_hold_one(),
        "race_open" => child_race_open(),
        "huge_failed_reader" => child_huge_failed_reader(),
        other => panic!("unknown case {other}"),
    });
}

fn child_sigbus_failed_open_then_open() {
    let name = std::env::var("SHARED_ATTACK_NAME").unwrap();
    let key = |_: u64, off: usize, b: &mut [u8]| -> Result<(), RegenError> {
        common::fill(5, off, b);
        Ok(())
    };
    let set_window = |w: u64| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/dev/shm/lazyfree.{name}"))
            .unwrap();
        f.write_at(&w.to_le_bytes(), PSI_WINDOW_OFF).unwrap();
    };
    if std::env::var("SHARED_ATTACK_SKIP_FAIL").is_err() {
        set_window(1_000_000);
        let r = SharedCache::open_in(&name, Mode::Sigbus, key);
        assert!(r.is_err(), "the 1 s trigger should fail here");
        drop(r);
    }
    // Scribble over freed memory the way any program would, then open again.
    let junk: Vec<Vec<u8>> = (0..64).map(|i| vec![0x5Au8; 64 + i * 8]).collect();
    set_window(2_000_000);
    let c = SharedCache::open_in(&name, Mode::Sigbus, key).unwrap();
    let e = c.insert(5, 300_000).unwrap();
    // SAFETY: mapped for the cache's life.
    let b = unsafe { std::slice::from_raw_parts(e.as_ptr(), 300_000) };
    let ok = b == &common::expected(5, 300_000)[..];
    drop(junk);
    println!("ATTACK-RESULT bytes_ok={ok}");
}

#[test]
fn a_failed_sigbus_open_leaves_a_dangling_handler_range() {
    if has_cap_sys_resource() {
        common::skipped(format_args!(
            "shared_attacks: this process has CAP_SYS_RESOURCE, a 1 s PSI window does not fail"
        ));
        return;
    }
    let name = Named::new("psiuaf");
    let cfg = SharedConfig {
        capacity: 1 << 20,
        chunk: 64 << 10,
        entries: 16,
        pressure: Some(lazyfree::Pressure {
            stall: Duration::from_millis(100),
            window: Duration::from_secs(2),
        }),
        ..SharedConfig::default()
    };
    let ok = |_: u64, _: usize, b: &mut [u8]| -> Result<(), RegenError> {
        b.fill(1);
        Ok(())
    };
    let cache = SharedCache::create(&name.0, &cfg, ok).unwrap();
    let (st, out) = common::run_child(
        "sigbus_failed_open_then_open",
        &[("SHARED_ATTACK_NAME", &name.0)],
        Duration::from_secs(30),
    );
    drop(cache);
    assert!(
        st.success() && out.contains("ATTACK-RESULT bytes_ok=true"),
        "CRASH/WRONG: a SIGBUS-mode open after a failed one ended {st:?}:\n{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. HANG instead of the promised abort: a callback reading its own chunk, in monitor mode,
// when another thread's fault on that chunk came first.
//
// The monitor keeps one pending fault per chunk (`pending.iter().any(|&(p, _)| p == c)`) and
// remembers the first faulting thread only; the self-read check compares that thread with the
// filler (`core.fillers.of(c) == Some(tid)`). If a plain reader R faulted on chunk c while a
// pin in thread T fills it, T's own fault on c (its callback reading its output) is dropped as
// a duplicate: no abort, T and R wait forever. The README promises "one reading the chunk it
// rebuilds aborts the process with a message".
//
// Fixed: pending faults are kept per (chunk, thread).

static SELF_BASE: AtomicUsize = AtomicUsize::new(0);

fn child_self_read_deduped() {
    let name = std::env::var("SHARED_ATTACK_NAME").unwrap();
    let regen = |key: u64, off: usize, b: &mut [u8]| -> Result<(), RegenError> {
        if key == 1 && off == 0 {
            // Reads its own chunk's missing page (a bug in the callback).
            let _ = touch(SELF_BASE.load(Ordering::SeqCst) + 8192);
        }
        common::fill(key, off, b);
        Ok(())
    };
    let cfg = SharedConfig {
        capacity: 1 << 20,
        chunk: 64 << 10,
        entries: 16,
        ..SharedConfig::default()
    };
    let c = SharedCache::create(&name, &cfg, regen).unwrap();
    let e = c.insert(1, 64 << 10).unwrap();
    let base = e.as_ptr() as usize;
    SELF_BASE.store(base, Ordering::SeqCst);
    // The pin's fill stops 300 ms before its callback: a plain reader faults meanwhile.
    arm(Step::SharedFillClaimed, base, 300);
    std::thread::scope(|s| {
        s.spawn(|| e.pin().map(|_| ()));
        wait_reached(10);
        s.spawn(|| touch(base + 4096 * 3));
    });
    println!("ATTACK-RESULT returned");
}

#[test]
fn a_self_reading_callback_hangs_when_another_fault_came_first() {
    let name = Named::new("selfdedup");
    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new(exe)
        .args([
            "--exact",
            "child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("LAZYFREE_CHILD", "self_read_deduped")
        .env("SHARED_ATTACK_NAME", &name.0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if t.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    use std::io::Read;
    child.stdout.take().unwrap().read_to_string(&mut out).ok();
    child.stderr.take().unwrap().read_to_string(&mut out).ok();
    let Some(status) = status else {
        panic!(
            "HANG: the self-reading callback's process waited 15 s (killed) instead of \
             aborting with the self-read message\n{out}"
        );
    };
    assert!(
        !status.success() && out.contains("read the chunk it is rebuilding"),
        "{status:?}\n{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Two live processes in one slot: concurrent reaps of the same dead slot.
//
// A process that finds every slot taken calls `procs::reap_all(f, None)` before it has a slot,
// so it marks a dead slot `REAPING | MAX_PROCS` (63). Another process doing the same sees
// `REAPING | 63`, takes reaper 63 for dead (`r >= MAX_PROCS`), and "takes over" with a CAS from
// `REAPING|63` to the very same value, so both clear the slot at once. The first to finish frees
// it (`pid = 0`) and claims it in its second round; the second, still in `clear_marks` (a scan of
// every chunk word), then clears the new owner's marks and stores `pid = 0` again, freeing the
// slot of a live process, and claims it too. Two processes then share one slot: more than 63
// have the cache open, one's pins and fills are the other's, one's close releases the other's
// pins, and when one dies its marks are never reaped (the slot's pid is the other, alive).
//
// Fixed: a reaper's mark names its pid, and a reap is taken over only from a dead reaper.

fn big_cfg() -> SharedConfig {
    SharedConfig {
        // 2^22 chunk words: each reap scans 32 MiB of them.
        capacity: 4096 << 22,
        chunk: 4096,
        // 2^20 records: and 64 MiB of them.
        entries: 1 << 20,
        ..SharedConfig::default()
    }
}

fn ok_regen(_: u64, _: usize, b: &mut [u8]) -> Result<(), RegenError> {
    b.fill(7);
    Ok(())
}

fn child_hold_one() {
    let name = std::env::var("SHARED_ATTACK_NAME").unwrap();
    let _c = SharedCache::open(&name, ok_regen).unwrap();
    println!("ATTACK-READY");
    std::thread::sleep(Duration::from_secs(120));
}

fn child_race_open() {
    let name = std::env::var("SHARED_ATTACK_NAME").unwrap();
    let go = std::env::var("SHARED_ATTACK_GO").unwrap();
    while !std::path::Path::new(&go).exists() {
        std::hint::spin_loop();
    }
    match SharedCache::open(&name, ok_regen) {
        Ok(c) => {
            println!("ATTACK-OPENED");
            std::thread::sleep(Duration::from_secs(3));
            drop(c);
        }
        Err(e) => println!("ATTACK-REFUSED {e}"),
    }
}

fn spawn_child(case: &str, envs: &[(&str, &str)]) -> std::process::Child {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = std::process::Command::new(exe);
    cmd.args([
        "--exact",
        "child",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("LAZYFREE_CHILD", case)
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

fn output_of(mut child: std::process::Child, secs: u64) -> String {
    use std::io::Read;
    let t = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if t.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).ok();
    child.stderr.take().unwrap().read_to_string(&mut out).ok();
    out
}

#[test]
fn two_processes_reaping_one_dead_slot_both_get_it() {
    let _t = turn();
    let name = Named::new("reaprace");
    let mut handles = vec![SharedCache::create(&name.0, &big_cfg(), ok_regen).unwrap()];
    // This process holds 62 slots; a child holds the 63rd and is killed.
    for _ in 0..61 {
        handles.push(SharedCache::open(&name.0, ok_regen).unwrap());
    }
    let mut dead = spawn_child("hold_one", &[("SHARED_ATTACK_NAME", &name.0)]);
    {
        use std::io::{BufRead, BufReader};
        let mut line = String::new();
        let mut r = BufReader::new(dead.stdout.as_mut().unwrap());
        while !line.contains("ATTACK-READY") {
            line.clear();
            assert!(
                r.read_line(&mut line).unwrap() > 0,
                "the holder ended early"
            );
        }
    }
    assert_eq!(handles[0].stats().processes, 63);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(dead.id() as libc::pid_t, libc::SIGKILL) };
    let _ = dead.wait();
    let go = format!("{}/attack-go-{}", std::env::temp_dir().display(), name.0);
    let _ = std::fs::remove_file(&go);
    let a = spawn_child(
        "race_open",
        &[("SHARED_ATTACK_NAME", &name.0), ("SHARED_ATTACK_GO", &go)],
    );
    let b = spawn_child(
        "race_open",
        &[("SHARED_ATTACK_NAME", &name.0), ("SHARED_ATTACK_GO", &go)],
    );
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&go, b"go").unwrap();
    let (oa, ob) = std::thread::scope(|s| {
        let ha = s.spawn(|| output_of(a, 60));
        let hb = s.spawn(|| output_of(b, 60));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    let _ = std::fs::remove_file(&go);
    drop(handles);
    let opened = [&oa, &ob]
        .iter()
        .filter(|o| o.contains("ATTACK-OPENED"))
        .count();
    assert!(
        opened <= 1,
        "TWO PROCESSES IN ONE SLOT: one slot was free (62 live + 1 dead of 63) and both \
         concurrent opens got it:\n--- A:\n{oa}\n--- B:\n{ob}"
    );
    assert_eq!(opened, 1, "nobody got the dead slot:\n{oa}\n{ob}");
}

// ---------------------------------------------------------------------------------------------
// 6. HANG (livelock): a failed chunk whose zeros cannot be installed is "served" forever.
//
// With huge pages, when the pool is used up and nothing is purgeable, a fill's install fails
// (ENOMEM after 8 tries of `make_room`): the chunk is marked failing and `zeros()` tries to
// install zero pages, which fails the same way and is ignored (`let _ = ...fill_all_paged`).
// The chunk is FAILED with its pages missing. The reader's fault is then served by
// `serve::claim`: FAILED -> `zeros()` (fails again) -> `uffd.wake` -> the thread refaults -> ...
// forever, at full CPU, and still forever after memory comes back: nothing ever purges (the
// budget is not exceeded) and nothing retries the callback (only a pin does). The same holds on
// 4 KiB pages where UFFDIO_COPY fails with ENOMEM (a memory cgroup at its limit charges it from
// a syscall, which fails instead of reclaiming by an OOM kill).
//
// Fixed: zeros that cannot be installed make room (a purge) and are retried; meanwhile the
// fault stays pending (monitor) or the access is retried 10 ms later (handler), and a huge page
// reported present is believed only where it is mapped.

/// A hugetlbfs mount with `pages` more huge pages reserved; undone on drop.
struct HugeMount {
    dir: std::path::PathBuf,
    old_nr: String,
}

fn free_huge_pages() -> usize {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

impl HugeMount {
    fn new(pages: usize) -> Option<HugeMount> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            common::skipped(format_args!("shared_attacks huge pages: not root"));
            return None;
        }
        let nr = "/proc/sys/vm/nr_hugepages";
        let old_nr = std::fs::read_to_string(nr).ok()?;
        let old: usize = old_nr.trim().parse().unwrap();
        if free_huge_pages() != 0 {
            common::skipped(format_args!(
                "shared_attacks huge pages: free huge pages exist already (the pool must be \
                 exactly what the test reserves)"
            ));
            return None;
        }
        let _ = std::fs::write(nr, (old + pages).to_string());
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("attack-hugetlbfs-{}", std::process::id()));
        let m = HugeMount { dir, old_nr };
        if free_huge_pages() != pages {
            common::skipped(format_args!(
                "shared_attacks huge pages: the kernel gave {} free huge pages of {pages}",
                free_huge_pages()
            ));
            return None;
        }
        std::fs::create_dir_all(&m.dir).unwrap();
        let c = |s: &str| std::ffi::CString::new(s).unwrap();
        let (src, target, fs) = (c("none"), c(m.dir.to_str().unwrap()), c("hugetlbfs"));
        // SAFETY: valid NUL-terminated strings; no data argument.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fs.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if r != 0 {
            common::skipped(format_args!(
                "shared_attacks huge pages: mounting hugetlbfs failed: {}",
                std::io::Error::last_os_error()
            ));
            return None;
        }
        Some(m)
    }
}

impl Drop for HugeMount {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(self.dir.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path we mounted.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.dir);
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", self.old_nr.trim());
    }
}

const HUGE: usize = 2 << 20;

fn child_huge_failed_reader() {
    let name = std::env::var("SHARED_ATTACK_NAME").unwrap();
    let cfg = SharedConfig {
        capacity: 16 * HUGE,
        chunk: HUGE,
        entries: 16,
        huge_pages: true,
        ..SharedConfig::default()
    };
    let regen = |k: u64, off: usize, b: &mut [u8]| -> Result<(), RegenError> {
        common::fill(k, off, b);
        Ok(())
    };
    let cache = SharedCache::create(&name, &cfg, regen).unwrap();
    // Four entries pinned: the whole pool of four huge pages.
    let entries: Vec<_> = (0..4u64).map(|k| cache.insert(k, HUGE).unwrap()).collect();
    let pins: Vec<_> = entries.iter().map(|e| e.pin().unwrap()).collect();
    let fifth = cache.insert(4, HUGE).unwrap();
    let at = fifth.as_ptr() as usize;
    println!("ATTACK-PINNED");
    std::thread::scope(|s| {
        let reader = s.spawn(move || touch(at));
        std::thread::sleep(Duration::from_secs(3));
        println!("ATTACK-FAILED={}", fifth.is_failed());
        // Memory comes back: the pins go.
        drop(pins);
        let t = Instant::now();
        while !reader.is_finished() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !reader.is_finished() {
            println!("ATTACK-HANG stats {:?}", cache.stats());
            std::process::exit(3);
        }
        println!("ATTACK-RETURNED");
    });
    drop(cache);
    let _ = SharedCache::remove(&name);
}

#[test]
fn a_failed_chunk_whose_zeros_cannot_be_installed_livelocks_its_reader() {
    let _t = turn();
    // Three huge pages hold the header, the records and the chunk words; four the data.
    let Some(mount) = HugeMount::new(7) else {
        return;
    };
    let name = Named::new("hugelive");
    let (st, out) = common::run_child(
        "huge_failed_reader",
        &[("SHARED_ATTACK_NAME", &name.0)],
        Duration::from_secs(60),
    );
    drop(name);
    drop(mount);
    assert!(
        st.success() && out.contains("ATTACK-RETURNED"),
        "HANG: a plain reader of a chunk that failed for want of huge pages never returned, \
         even after the pins were dropped ({st:?}):\n{out}"
    );
}
